use super::*;
use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
    SubjectAltNameMatcher, TlsCertificate, TlsParameters,
    common_tls_context::CombinedCertificateValidationContext, subject_alt_name_matcher::SanType,
};

fn socket<M: prost::Message + prost::Name>(ctx: &M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(
            weft_xds_proto::pack(ctx),
        )),
    }
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineString(s.into())),
        ..Default::default()
    })
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        ..Default::default()
    }
}

#[test]
fn bad_tls_settings_are_refused_by_field() {
    let no_cert = socket(&DownstreamTlsContext::default());
    assert_eq!(
        server_config(&no_cert).unwrap_err().0,
        "common_tls_context.tls_certificates"
    );
    let garbage = socket(&DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificates: vec![TlsCertificate {
                certificate_chain: inline("not a certificate"),
                private_key: inline("not a key"),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    });
    let (field, reason) = server_config(&garbage).unwrap_err();
    assert!(field.contains("tls_certificates[0]"), "{field}: {reason}");
    let ciphers = socket(&DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("default")],
            tls_params: Some(TlsParameters {
                cipher_suites: vec!["ECDHE-RSA-AES128-GCM-SHA256".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        server_config(&ciphers).unwrap_err().0,
        "common_tls_context.tls_params"
    );
    let sni = socket(&DownstreamTlsContext {
        require_sni: Some(weft_xds_proto::wkt::BoolValue { value: true }),
        ..Default::default()
    });
    assert_eq!(server_config(&sni).unwrap_err().0, "require_sni");
}

#[test]
fn sds_names_are_istios_two() {
    let unknown = socket(&DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("file-cert:/etc/certs/cert.pem")],
            ..Default::default()
        }),
        ..Default::default()
    });
    let (field, reason) = server_config(&unknown).unwrap_err();
    assert!(
        field.ends_with("tls_certificate_sds_secret_configs[0].name"),
        "{field}"
    );
    assert!(reason.contains("ROOTCA"), "{reason}");
    // Istio's inbound mTLS context: accepted.
    let mtls = DownstreamTlsContext {
        require_client_certificate: Some(weft_xds_proto::wkt::BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("default")],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                                san_type: SanType::Uri as i32,
                                matcher: Some(StringMatcher {
                                    match_pattern: Some(string_matcher::MatchPattern::Prefix(
                                        "spiffe://cluster.local/".into(),
                                    )),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds("ROOTCA")),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let config = server_config(&socket(&mtls)).unwrap().unwrap();
    assert_eq!(
        config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    // And the client side of it.
    let up = UpstreamTlsContext {
        sni: "outbound_.8080_._.hello.default.svc.cluster.local".into(),
        common_tls_context: mtls.common_tls_context.clone(),
        ..Default::default()
    };
    let tls = client_config(&socket(&up)).unwrap().unwrap();
    assert!(matches!(tls.server_name, ServerName::DnsName(_)));
    // A regex SAN matcher is refused, by field.
    let mut regex = up.clone();
    if let Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) = regex
        .common_tls_context
        .as_mut()
        .and_then(|c| c.validation_context_type.as_mut())
    {
        c.default_validation_context
            .as_mut()
            .unwrap()
            .match_typed_subject_alt_names[0]
            .matcher
            .as_mut()
            .unwrap()
            .match_pattern = Some(string_matcher::MatchPattern::SafeRegex(Default::default()));
    }
    let (field, _) = client_config(&socket(&regex)).unwrap_err();
    assert!(
        field.contains("match_typed_subject_alt_names[0]"),
        "{field}"
    );
}

#[test]
fn raw_buffer_is_plaintext() {
    let raw = TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(
            weft_xds_proto::wkt::Any {
                type_url: RAW_BUFFER.into(),
                value: vec![],
            },
        )),
    };
    assert!(client_config(&raw).unwrap().is_none());
    assert!(server_config(&raw).unwrap().is_none());
}

#[test]
fn san_matchers() {
    let matcher = |p: string_matcher::MatchPattern, ignore_case| StringMatcher {
        match_pattern: Some(p),
        ignore_case,
    };
    use string_matcher::MatchPattern::{Exact, Prefix};
    let m = san_rule(
        &matcher(Prefix("spiffe://cluster.local/ns/default/".into()), false),
        "f",
    )
    .unwrap();
    assert!(m.matches("spiffe://cluster.local/ns/default/sa/hello"));
    assert!(!m.matches("spiffe://cluster.local/ns/prod/sa/hello"));
    assert!(
        san_rule(&matcher(Exact("A.example".into()), true), "f")
            .unwrap()
            .matches("a.EXAMPLE")
    );
    assert!(
        !san_rule(&matcher(Exact("A.example".into()), false), "f")
            .unwrap()
            .matches("a.example")
    );
}

/// A ClientHello as rustls sends it, for `name` (None: an IP, so no SNI).
fn client_hello(name: Option<&str>) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = match name {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn sni_is_read_from_a_client_hello() {
    let hello = client_hello(Some("api.example.com"));
    assert_eq!(
        client_hello_sni(&hello),
        Sni::Found("api.example.com".into())
    );
    assert_eq!(client_hello_sni(&client_hello(None)), Sni::Absent);
    // Truncated: more is needed (never a panic, whatever the cut).
    for cut in 0..hello.len() {
        assert_ne!(client_hello_sni(&hello[..cut]), Sni::Found("x".into()));
        assert_eq!(
            client_hello_sni(&hello[..cut]),
            Sni::NeedMore,
            "cut at {cut}"
        );
    }
    assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n\r\n"), Sni::Absent);
    // Garbage inside a well-framed record is Absent, not a panic.
    let mut bad = hello.clone();
    for b in bad.iter_mut().skip(9) {
        *b = 0xff;
    }
    assert_eq!(client_hello_sni(&bad), Sni::Absent);
}
