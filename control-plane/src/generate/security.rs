//! Mutual TLS between sidecars, as Istio configures it:
//! - **PeerAuthentication** decides, per workload and port, what an inbound listener accepts:
//!   STRICT (mTLS only), PERMISSIVE (mTLS and plaintext on one port, told apart by the TLS
//!   inspector) or DISABLE. The most specific policy wins: a workload selector in the
//!   workload's namespace, then the namespace-wide policy, then the mesh-wide one in the root
//!   namespace; UNSET inherits; nothing at all is PERMISSIVE.
//! - **Auto mTLS**: a client sidecar's clusters send mTLS to endpoints labelled
//!   `security.istio.io/tlsMode: istio` (they run a sidecar) and plaintext to the rest, through
//!   `transport_socket_matches`, unless a DestinationRule sets `tls` (ISTIO_MUTUAL forces mTLS,
//!   DISABLE plaintext, SIMPLE/MUTUAL originate TLS with files).
//!
//! Certificates are named by Istio's SDS secrets, `default` (the workload certificate) and
//! `ROOTCA` (the trust bundle), served by the agent next to each proxy over the bootstrap
//! cluster `sds-grpc`; weft-proxy is its own agent. Only proxies whose workload carries the
//! tlsMode label (their sidecar has an identity) get any of this.

use weft_xds_proto::envoy::config::cluster::v3::{Cluster, cluster};
use weft_xds_proto::envoy::config::core::v3::{
    ApiConfigSource, ConfigSource, GrpcService, TransportSocket, api_config_source, config_source,
    grpc_service, transport_socket,
};
use weft_xds_proto::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use weft_xds_proto::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use weft_xds_proto::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsParameters, UpstreamTlsContext, common_tls_context,
    subject_alt_name_matcher, tls_parameters::TlsProtocol,
};
use weft_xds_proto::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use weft_xds_proto::pack;
use weft_xds_proto::wkt::{BoolValue, Struct, Value, value};

use crate::config::{Labels, MtlsMode};
use crate::model::{Mesh, ROOT_NAMESPACE, selector_matches};

/// The label Istio's injector puts on pods that run a sidecar.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// The metadata namespace Envoy's transport socket matches read.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// Whether a workload runs a sidecar with a mesh identity.
pub fn has_sidecar(labels: &Labels) -> bool {
    labels.get(TLS_MODE_LABEL).is_some_and(|v| v == "istio")
}

/// The PeerAuthentication mode for a workload's inbound `port`.
pub fn peer_mode(mesh: &Mesh, namespace: &str, labels: &Labels, port: u32) -> MtlsMode {
    let pas = &mesh.config.peer_authentications;
    let mode_of = |m: &Option<crate::config::PeerMtls>| m.as_ref().and_then(|m| m.mode);
    let known = |m: Option<MtlsMode>| m.filter(|m| *m != MtlsMode::Unset);
    // Workload level: a selector in the workload's namespace that picks it; its port-level
    // setting first.
    let workload = pas.iter().find(|p| {
        p.namespace == namespace
            && p.spec.selector.as_ref().is_some_and(|s| {
                !s.match_labels.is_empty() && selector_matches(&s.match_labels, labels)
            })
    });
    if let Some(p) = workload {
        if let Some(m) = known(
            p.spec
                .port_level_mtls
                .get(&port.to_string())
                .and_then(|m| m.mode),
        ) {
            return m;
        }
        if let Some(m) = known(mode_of(&p.spec.mtls)) {
            return m;
        }
    }
    let wide = |ns: &str| {
        pas.iter().find(|p| {
            p.namespace == ns
                && p.spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.match_labels.is_empty())
        })
    };
    if let Some(m) = wide(namespace).and_then(|p| known(mode_of(&p.spec.mtls))) {
        return m;
    }
    if let Some(m) = wide(ROOT_NAMESPACE).and_then(|p| known(mode_of(&p.spec.mtls))) {
        return m;
    }
    MtlsMode::Permissive
}

/// An SDS reference to one of Istio's secrets, fetched from the agent over `sds-grpc`.
pub fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            resource_api_version: 2, // V3
            initial_fetch_timeout: Some(weft_xds_proto::wkt::Duration {
                seconds: 0,
                nanos: 0,
            }),
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: api_config_source::ApiType::Grpc as i32,
                    transport_api_version: 2, // V3
                    set_node_on_first_message_only: true,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: "sds-grpc".into(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

fn san_matchers(sans: &[String], prefix: Option<&str>) -> Vec<SubjectAltNameMatcher> {
    let pattern = |p: string_matcher::MatchPattern| SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(p),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut out: Vec<_> = sans
        .iter()
        .map(|s| pattern(string_matcher::MatchPattern::Exact(s.clone())))
        .collect();
    if let Some(p) = prefix {
        out.push(pattern(string_matcher::MatchPattern::Prefix(p.to_string())));
    }
    out
}

/// The mesh certificate, the mesh roots, TLS 1.2-1.3, and the peer SANs to expect.
pub(super) fn mesh_tls_context(
    alpn: &[&str],
    sans: Vec<SubjectAltNameMatcher>,
) -> CommonTlsContext {
    CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: TlsProtocol::TlSv12 as i32,
            tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds("default")],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: sans,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds("ROOTCA")),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

fn tls_socket<M: prost::Message + prost::Name>(ctx: &M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(ctx))),
    }
}

fn raw_socket() -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(
            &RawBuffer::default(),
        ))),
    }
}

/// Istio's SNI for a mesh cluster: `outbound_.<port>_.<subset>_.<host>`.
pub fn mesh_sni(port: u32, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// The client side of sidecar-to-sidecar mTLS, expecting one of `sans` (none: any mesh
/// identity of the trust domain).
pub fn upstream_mtls(sni: &str, sans: &[String], trust_domain: &str) -> TransportSocket {
    let prefix = sans.is_empty().then(|| format!("spiffe://{trust_domain}/"));
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(mesh_tls_context(
            &["istio-peer-exchange", "istio"],
            san_matchers(sans, prefix.as_deref()),
        )),
        sni: sni.to_string(),
        ..Default::default()
    };
    tls_socket(&ctx)
}

/// DestinationRule `tls.mode: ISTIO_MUTUAL` or auto mTLS, applied to an outbound cluster.
pub fn apply_mesh_tls(c: &mut Cluster, forced: bool, sni: &str, sans: &[String], td: &str) {
    let mtls = upstream_mtls(sni, sans, td);
    if forced {
        c.transport_socket = Some(mtls);
        return;
    }
    let tls_mode = |v: &str| Struct {
        fields: [(
            "tlsMode".to_string(),
            Value {
                kind: Some(value::Kind::StringValue(v.to_string())),
            },
        )]
        .into(),
    };
    c.transport_socket_matches = vec![
        cluster::TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(tls_mode("istio")),
            transport_socket: Some(mtls),
        },
        cluster::TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Struct::default()),
            transport_socket: Some(raw_socket()),
        },
    ];
}

/// The metadata that selects the mTLS transport socket for an endpoint running a sidecar.
pub fn endpoint_metadata(
    labels: &Labels,
) -> Option<weft_xds_proto::envoy::config::core::v3::Metadata> {
    if !has_sidecar(labels) {
        return None;
    }
    Some(weft_xds_proto::envoy::config::core::v3::Metadata {
        filter_metadata: [(
            TRANSPORT_SOCKET_MATCH.to_string(),
            Struct {
                fields: [(
                    "tlsMode".to_string(),
                    Value {
                        kind: Some(value::Kind::StringValue("istio".into())),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..Default::default()
    })
}

/// The server side: the mesh certificate, a client certificate from the mesh required.
fn inbound_tls(http: bool, trust_domain: &str) -> TransportSocket {
    let alpn: &[&str] = if http { &["h2", "http/1.1"] } else { &[] };
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(mesh_tls_context(
            alpn,
            san_matchers(&[], Some(&format!("spiffe://{trust_domain}/"))),
        )),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    tls_socket(&ctx)
}

/// The TLS inspector listener filter: reads whether a connection starts with a ClientHello,
/// and its SNI and ALPN, for filter chain matching.
pub fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack(
            &TlsInspector::default(),
        ))),
        ..Default::default()
    }
}

/// An inbound listener for `mode`: STRICT answers only mTLS, PERMISSIVE both (the TLS inspector
/// tells them apart), DISABLE only plaintext.
pub fn inbound_listener(
    name: &str,
    address: weft_xds_proto::envoy::config::core::v3::Address,
    filters: Vec<Filter>,
    http: bool,
    mode: MtlsMode,
    trust_domain: &str,
) -> Listener {
    let chain = |transport: &str, tls: Option<TransportSocket>| FilterChain {
        name: format!("{name}/{transport}"),
        filter_chain_match: Some(FilterChainMatch {
            transport_protocol: transport.to_string(),
            ..Default::default()
        }),
        transport_socket: tls,
        filters: filters.clone(),
        ..Default::default()
    };
    let inspector = tls_inspector();
    let (filter_chains, listener_filters) = match mode {
        MtlsMode::Disable | MtlsMode::Unset => (
            vec![FilterChain {
                filters: filters.clone(),
                ..Default::default()
            }],
            vec![],
        ),
        MtlsMode::Strict => (
            vec![chain("tls", Some(inbound_tls(http, trust_domain)))],
            vec![inspector],
        ),
        MtlsMode::Permissive => (
            vec![
                chain("tls", Some(inbound_tls(http, trust_domain))),
                chain("raw_buffer", None),
            ],
            vec![inspector],
        ),
    };
    Listener {
        name: name.to_string(),
        address: Some(address),
        // Istio's mark: a tracer's spans here are the server side of their hop.
        traffic_direction: weft_xds_proto::envoy::config::core::v3::TrafficDirection::Inbound
            as i32,
        filter_chains,
        listener_filters,
        ..Default::default()
    }
}

/// TLS passthrough by SNI (VirtualService `tls` routes): a filter chain per route, matched on
/// `server_names`, proxying the connection unterminated; they replace the listener's single
/// chain (a name no chain lists is not served). Needs the TLS inspector to read the SNI.
pub fn add_sni_chains(
    l: &mut Listener,
    routes: Vec<(
        Vec<String>,
        weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier,
    )>,
    stat_prefix: &str,
) {
    l.filter_chains = sni_chains(&l.name, routes, stat_prefix);
    l.listener_filters = vec![tls_inspector()];
}

/// A TCP proxy chain per TLS route, matched on its SNI names.
pub fn sni_chains(
    listener: &str,
    routes: Vec<(
        Vec<String>,
        weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier,
    )>,
    stat_prefix: &str,
) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    for (i, (names, destinations)) in routes.into_iter().enumerate() {
        chains.push(FilterChain {
            name: format!("{listener}/sni-{i}"),
            filter_chain_match: Some(FilterChainMatch {
                server_names: names,
                ..Default::default()
            }),
            filters: vec![super::build::tcp_proxy_filter(stat_prefix, destinations)],
            ..Default::default()
        });
    }
    chains
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSet;

    fn mesh(yaml: &str) -> Mesh {
        let mut c = ConfigSet::default();
        let errors = c.add_file(std::path::Path::new("t.yaml"), yaml);
        assert!(errors.is_empty(), "{errors:?}");
        c.sort();
        Mesh::build(&c)
    }

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_most_specific_peer_authentication_wins() {
        let m = mesh(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: default, namespace: istio-system }
spec: { mtls: { mode: STRICT } }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: default, namespace: legacy }
spec: { mtls: { mode: DISABLE } }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: reviews, namespace: legacy }
spec:
  selector: { matchLabels: { app: reviews } }
  mtls: { mode: UNSET }
  portLevelMtls: { "9080": { mode: PERMISSIVE } }
"#,
        );
        let none = Labels::new();
        let reviews = labels(&[("app", "reviews")]);
        assert_eq!(peer_mode(&m, "default", &none, 80), MtlsMode::Strict);
        assert_eq!(peer_mode(&m, "legacy", &none, 80), MtlsMode::Disable);
        assert_eq!(
            peer_mode(&m, "legacy", &reviews, 9080),
            MtlsMode::Permissive
        );
        // UNSET at the workload inherits the namespace's DISABLE on other ports.
        assert_eq!(peer_mode(&m, "legacy", &reviews, 9090), MtlsMode::Disable);
        // No policy at all: PERMISSIVE.
        assert_eq!(
            peer_mode(&mesh(""), "default", &none, 80),
            MtlsMode::Permissive
        );
    }

    #[test]
    fn bad_peer_authentications_are_rejected_with_the_field() {
        let mut c = ConfigSet::default();
        let errors = c.add_file(
            std::path::Path::new("pa.yaml"),
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: a, namespace: default }
spec: { portLevelMtls: { "80": { mode: STRICT } } }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: b, namespace: default }
spec: { mtls: { mode: SOMETIMES } }
"#,
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].field, "spec.portLevelMtls");
        assert!(
            errors[1].field.starts_with("spec.mtls.mode"),
            "{:?}",
            errors[1]
        );
    }
}
