//! Downstream TLS (a listener's `transport_socket` with `DownstreamTlsContext`), terminated with
//! rustls: the certificate and key from files or inline PEM, ALPN, TLS 1.2-1.3, and client
//! certificates verified against a CA when the context asks (MUTUAL). Settings rustls cannot
//! honour are rejected by field name.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use weft_xds_proto::envoy::config::core::v3::{
    DataSource, TransportSocket, data_source, transport_socket,
};
use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, common_tls_context, tls_parameters::TlsProtocol,
};

const TLS_CONTEXT: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

type Fail = (String, String);

fn pem(ds: Option<&DataSource>, field: &str) -> Result<Vec<u8>, Fail> {
    match ds.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::Filename(f)) => {
            std::fs::read(f).map_err(|e| (field.to_string(), format!("cannot read {f:?}: {e}")))
        }
        Some(data_source::Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        _ => Err((
            field.to_string(),
            "a filename or inline PEM is required".into(),
        )),
    }
}

/// The rustls server configuration for a listener's transport socket.
pub fn server_config(ts: &TransportSocket) -> Result<Arc<rustls::ServerConfig>, Fail> {
    let bad = |f: &str, r: &str| Err((f.to_string(), r.to_string()));
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return bad("typed_config", "a typed_config is required");
    };
    if any.type_url != TLS_CONTEXT {
        return Err((
            "typed_config".into(),
            format!(
                "transport socket {} is not supported (DownstreamTlsContext is)",
                any.type_url
            ),
        ));
    }
    let ctx: DownstreamTlsContext =
        weft_xds_proto::unpack(any).map_err(|e| ("typed_config".to_string(), e.to_string()))?;
    for (field, set) in [
        ("require_sni", ctx.require_sni.is_some_and(|b| b.value)),
        (
            "session_ticket_keys_type",
            ctx.session_ticket_keys_type.is_some(),
        ),
        ("ocsp_staple_policy", ctx.ocsp_staple_policy != 0),
    ] {
        if set {
            return bad(field, "not supported by this weft-proxy version");
        }
    }
    let common = ctx.common_tls_context.unwrap_or_default();
    #[allow(deprecated)]
    let unsupported = [
        (
            "common_tls_context.tls_certificate_sds_secret_configs",
            !common.tls_certificate_sds_secret_configs.is_empty(),
        ),
        (
            "common_tls_context.tls_certificate_provider_instance",
            common.tls_certificate_provider_instance.is_some(),
        ),
        (
            "common_tls_context.custom_handshaker",
            common.custom_handshaker.is_some(),
        ),
        ("common_tls_context.key_log", common.key_log.is_some()),
    ];
    for (field, set) in unsupported {
        if set {
            return bad(
                field,
                "not supported by this weft-proxy version (certificates come from files or inline PEM)",
            );
        }
    }
    let [cert] = common.tls_certificates.as_slice() else {
        return bad(
            "common_tls_context.tls_certificates",
            "exactly one certificate is supported",
        );
    };
    let chain_pem = pem(
        cert.certificate_chain.as_ref(),
        "common_tls_context.tls_certificates[0].certificate_chain",
    )?;
    let key_pem = pem(
        cert.private_key.as_ref(),
        "common_tls_context.tls_certificates[0].private_key",
    )?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            (
                "common_tls_context.tls_certificates[0].certificate_chain".to_string(),
                format!("not PEM certificates: {e}"),
            )
        })?;
    if chain.is_empty() {
        return bad(
            "common_tls_context.tls_certificates[0].certificate_chain",
            "no certificate in the PEM",
        );
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        (
            "common_tls_context.tls_certificates[0].private_key".to_string(),
            format!("not a PEM private key: {e}"),
        )
    })?;
    // TLS versions: rustls speaks 1.2 and 1.3 only (no 1.0/1.1, which Envoy's defaults do not
    // offer to clients either); a maximum below 1.2 cannot be served.
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> =
        vec![&rustls::version::TLS13, &rustls::version::TLS12];
    if let Some(p) = &common.tls_params {
        if !p.cipher_suites.is_empty()
            || !p.ecdh_curves.is_empty()
            || !p.signature_algorithms.is_empty()
        {
            return bad(
                "common_tls_context.tls_params",
                "cipher suites, curves and signature algorithms are rustls's modern defaults; custom lists are not supported",
            );
        }
        let max =
            TlsProtocol::try_from(p.tls_maximum_protocol_version).unwrap_or(TlsProtocol::TlsAuto);
        let min =
            TlsProtocol::try_from(p.tls_minimum_protocol_version).unwrap_or(TlsProtocol::TlsAuto);
        if matches!(max, TlsProtocol::TlSv10 | TlsProtocol::TlSv11) {
            return bad(
                "common_tls_context.tls_params.tls_maximum_protocol_version",
                "TLS 1.0 and 1.1 are not supported",
            );
        }
        if max == TlsProtocol::TlSv12 {
            versions = vec![&rustls::version::TLS12];
        }
        if min == TlsProtocol::TlSv13 {
            versions.retain(|v| v.version == rustls::ProtocolVersion::TLSv1_3);
        }
        if versions.is_empty() {
            return bad(
                "common_tls_context.tls_params",
                "the minimum version is above the maximum",
            );
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| ("common_tls_context.tls_params".to_string(), e.to_string()))?;
    let require = ctx.require_client_certificate.is_some_and(|b| b.value);
    let builder = match &common.validation_context_type {
        None if require => {
            return bad(
                "require_client_certificate",
                "needs a validation_context with trusted_ca",
            );
        }
        None => builder.with_no_client_auth(),
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => {
            if !v.match_typed_subject_alt_names.is_empty()
                || !v.verify_certificate_spki.is_empty()
                || !v.verify_certificate_hash.is_empty()
                || v.crl.is_some()
            {
                return bad(
                    "common_tls_context.validation_context",
                    "only trusted_ca is supported for client certificates",
                );
            }
            let ca = pem(
                v.trusted_ca.as_ref(),
                "common_tls_context.validation_context.trusted_ca",
            )?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca) {
                let c = c.map_err(|e| {
                    (
                        "common_tls_context.validation_context.trusted_ca".to_string(),
                        format!("not PEM certificates: {e}"),
                    )
                })?;
                roots.add(c).map_err(|e| {
                    (
                        "common_tls_context.validation_context.trusted_ca".to_string(),
                        e.to_string(),
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if require {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| {
                (
                    "common_tls_context.validation_context".to_string(),
                    e.to_string(),
                )
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        Some(_) => {
            return bad(
                "common_tls_context.validation_context_type",
                "only an inline validation_context is supported",
            );
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        (
            "common_tls_context.tls_certificates[0]".to_string(),
            format!("the certificate and key do not go together: {e}"),
        )
    })?;
    config.alpn_protocols = common
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, TlsCertificate, TlsParameters,
    };

    fn socket(ctx: DownstreamTlsContext) -> TransportSocket {
        TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(
                weft_xds_proto::pack(&ctx),
            )),
        }
    }

    fn inline(s: &str) -> Option<DataSource> {
        Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(s.into())),
            ..Default::default()
        })
    }

    #[test]
    fn bad_tls_settings_are_refused_by_field() {
        let no_cert = socket(DownstreamTlsContext::default());
        assert_eq!(
            server_config(&no_cert).unwrap_err().0,
            "common_tls_context.tls_certificates"
        );
        let garbage = socket(DownstreamTlsContext {
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
        let ciphers = socket(DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificates: vec![TlsCertificate::default()],
                tls_params: Some(TlsParameters {
                    cipher_suites: vec!["ECDHE-RSA-AES128-GCM-SHA256".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let missing_file = server_config(&ciphers).unwrap_err();
        assert!(
            missing_file.0.contains("certificate_chain"),
            "{missing_file:?}"
        );
        let sni = socket(DownstreamTlsContext {
            require_sni: Some(weft_xds_proto::wkt::BoolValue { value: true }),
            ..Default::default()
        });
        assert_eq!(server_config(&sni).unwrap_err().0, "require_sni");
    }
}
