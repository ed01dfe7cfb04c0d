//! DestinationRule traffic policies applied to an outbound cluster as Istio applies them: the
//! rule's policy, overridden by the subset's, each overridden per port by `portLevelSettings`;
//! load balancer, connection pool (circuit breakers, connect timeout, per-connection limits) and
//! outlier detection. Every outbound cluster starts from Istio's defaults: circuit breakers wide
//! open, so that only what a rule says limits traffic.

use weft_xds_proto::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlier, UpstreamConnectionOptions,
    circuit_breakers, cluster,
};
use weft_xds_proto::envoy::config::core::v3::{
    DataSource, Http1ProtocolOptions, HttpProtocolOptions as CommonHttpOptions, TcpKeepalive,
    TransportSocket, data_source, transport_socket,
};
use weft_xds_proto::envoy::config::route::v3::route_action::{HashPolicy, hash_policy};
use weft_xds_proto::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use weft_xds_proto::envoy::r#type::v3::Percent;
use weft_xds_proto::wkt::{Duration, UInt32Value, UInt64Value};
use weft_xds_proto::{pack, unpack};

use crate::config::validate::parse_duration;
use crate::config::{
    ConnectionPoolSettings, DestinationRuleSpec, LoadBalancerSettings, OutlierDetection, SimpleLb,
    TrafficPolicy,
};

const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The policy parts in force for one cluster.
#[derive(Default)]
pub struct Effective<'a> {
    lb: Option<&'a LoadBalancerSettings>,
    tls: Option<&'a crate::config::ClientTls>,
    pool: Option<&'a ConnectionPoolSettings>,
    outlier: Option<&'a OutlierDetection>,
}

impl<'a> Effective<'a> {
    fn overlay(&mut self, p: &'a TrafficPolicy, port: u32) {
        self.lb = p.load_balancer.as_ref().or(self.lb);
        self.pool = p.connection_pool.as_ref().or(self.pool);
        self.outlier = p.outlier_detection.as_ref().or(self.outlier);
        self.tls = p.tls.as_ref().or(self.tls);
        if let Some(pl) = p
            .port_level_settings
            .iter()
            .find(|pl| pl.port.as_ref().is_some_and(|s| s.number == port))
        {
            self.lb = pl.load_balancer.as_ref().or(self.lb);
            self.pool = pl.connection_pool.as_ref().or(self.pool);
            self.outlier = pl.outlier_detection.as_ref().or(self.outlier);
            self.tls = pl.tls.as_ref().or(self.tls);
        }
    }

    /// `loadBalancer.simple: PASSTHROUGH`: connections go to the original destination.
    pub fn passthrough(&self) -> bool {
        self.lb.and_then(|l| l.simple) == Some(SimpleLb::Passthrough)
    }

    /// The `tls` mode in force (None: the rule says nothing, auto mTLS decides).
    pub fn tls(&self) -> Option<&'a crate::config::ClientTls> {
        self.tls
    }

    /// The rule's policy, then the subset's, for `port`.
    pub fn of(dr: Option<&'a DestinationRuleSpec>, subset: &str, port: u32) -> Effective<'a> {
        let mut e = Effective::default();
        let Some(dr) = dr else { return e };
        if let Some(p) = &dr.traffic_policy {
            e.overlay(p, port);
        }
        if let Some(p) = dr
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .and_then(|s| s.traffic_policy.as_ref())
        {
            e.overlay(p, port);
        }
        e
    }
}

fn uint(v: Option<i64>) -> Option<UInt32Value> {
    // Istio treats 0 as "not set".
    v.filter(|n| *n > 0).map(|n| UInt32Value {
        value: n.min(i64::from(u32::MAX)) as u32,
    })
}

fn dur(s: Option<&String>) -> Option<Duration> {
    let d = parse_duration(s?).ok()?;
    Some(Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

/// The TCP proxy's idle timeout towards a destination (`connectionPool.tcp.idleTimeout`, the
/// rule's policy for `port`); None leaves Envoy's default (1 hour).
pub fn tcp_idle_timeout(dr: Option<&DestinationRuleSpec>, port: u32) -> Option<Duration> {
    let e = Effective::of(dr, "", port);
    dur(e.pool?.tcp.as_ref()?.idle_timeout.as_ref())
}

/// The route hash policy for a destination whose effective policy hashes consistently.
pub fn hash_policy(dr: Option<&DestinationRuleSpec>, subset: &str, port: u32) -> Vec<HashPolicy> {
    let e = Effective::of(dr, subset, port);
    let Some(ch) = e.lb.and_then(|l| l.consistent_hash.as_ref()) else {
        return Vec::new();
    };
    let spec = if let Some(h) = &ch.http_header_name {
        hash_policy::PolicySpecifier::Header(hash_policy::Header {
            header_name: h.clone(),
            ..Default::default()
        })
    } else if let Some(c) = &ch.http_cookie {
        hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
            name: c.name.clone(),
            path: c.path.clone().unwrap_or_default(),
            ttl: dur(c.ttl.as_ref()),
            ..Default::default()
        })
    } else if ch.use_source_ip == Some(true) {
        hash_policy::PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties {
            source_ip: true,
        })
    } else if let Some(q) = &ch.http_query_parameter_name {
        hash_policy::PolicySpecifier::QueryParameter(hash_policy::QueryParameter {
            name: q.clone(),
        })
    } else {
        return Vec::new();
    };
    vec![HashPolicy {
        policy_specifier: Some(spec),
        ..Default::default()
    }]
}

/// A data source read from a file (certificates and keys in universal mode).
pub(super) fn file(path: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    })
}

/// TLS origination (DestinationRule `tls` SIMPLE or MUTUAL) as the cluster's transport socket;
/// without `caCertificates` the server is checked against the system's trust store, as Istio
/// does, unless `insecureSkipVerify`.
fn upstream_tls(t: &crate::config::ClientTls) -> Option<TransportSocket> {
    use crate::config::ClientTlsMode;
    use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, TlsCertificate,
        UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
    };
    use weft_xds_proto::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
    let mode = t.mode?;
    if !matches!(mode, ClientTlsMode::Simple | ClientTlsMode::Mutual) {
        return None;
    }
    let mut common = CommonTlsContext::default();
    if mode == ClientTlsMode::Mutual {
        common.tls_certificates = vec![TlsCertificate {
            certificate_chain: file(t.client_certificate.as_deref()?),
            private_key: file(t.private_key.as_deref()?),
            ..Default::default()
        }];
    }
    if t.insecure_skip_verify != Some(true) {
        let ca = t
            .ca_certificates
            .as_deref()
            .unwrap_or("/etc/ssl/certs/ca-certificates.crt");
        common.validation_context_type = Some(
            common_tls_context::ValidationContextType::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: file(ca),
                    match_typed_subject_alt_names: t
                        .subject_alt_names
                        .iter()
                        .map(|san| SubjectAltNameMatcher {
                            san_type: if san.contains("://") {
                                subject_alt_name_matcher::SanType::Uri
                            } else {
                                subject_alt_name_matcher::SanType::Dns
                            } as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(
                                    san.clone(),
                                )),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            ),
        );
    }
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: t.sni.clone().unwrap_or_default(),
        ..Default::default()
    };
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&ctx))),
    })
}

/// Applies the policy (and Istio's defaults) to an outbound cluster.
pub fn apply(c: &mut Cluster, e: &Effective<'_>) {
    if let Some(t) = e.tls {
        c.transport_socket = upstream_tls(t);
    }
    let open = Some(UInt32Value { value: u32::MAX });
    let mut thresholds = circuit_breakers::Thresholds {
        max_connections: open,
        max_pending_requests: open,
        max_requests: open,
        max_retries: open,
        track_remaining: true,
        ..Default::default()
    };
    match e.lb.and_then(|l| l.simple) {
        Some(SimpleLb::RoundRobin) => c.lb_policy = cluster::LbPolicy::RoundRobin as i32,
        Some(SimpleLb::LeastRequest | SimpleLb::LeastConn) => {
            c.lb_policy = cluster::LbPolicy::LeastRequest as i32
        }
        Some(SimpleLb::Random) => c.lb_policy = cluster::LbPolicy::Random as i32,
        // PASSTHROUGH changes the cluster's type (see `build::outbound`); unspecified keeps
        // the default.
        Some(SimpleLb::Passthrough | SimpleLb::Unspecified) | None => {}
    }
    if let Some(ch) = e.lb.and_then(|l| l.consistent_hash.as_ref()) {
        if let Some(m) = &ch.maglev {
            c.lb_policy = cluster::LbPolicy::Maglev as i32;
            c.lb_config = Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
                table_size: m.table_size.map(|value| UInt64Value { value }),
            }));
        } else {
            // Istio's default for consistentHash: a ring of at least 1024 entries.
            let min = ch
                .ring_hash
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(ch.minimum_ring_size)
                .unwrap_or(1024);
            c.lb_policy = cluster::LbPolicy::RingHash as i32;
            c.lb_config = Some(cluster::LbConfig::RingHashLbConfig(
                cluster::RingHashLbConfig {
                    minimum_ring_size: Some(UInt64Value { value: min }),
                    ..Default::default()
                },
            ));
        }
    }
    if let Some(pool) = e.pool {
        let mut max_duration = None;
        if let Some(tcp) = &pool.tcp {
            thresholds.max_connections = uint(tcp.max_connections).or(thresholds.max_connections);
            if let Some(t) = dur(tcp.connect_timeout.as_ref()) {
                c.connect_timeout = Some(t);
            }
            max_duration = dur(tcp.max_connection_duration.as_ref());
            if let Some(k) = &tcp.tcp_keepalive {
                c.upstream_connection_options = Some(UpstreamConnectionOptions {
                    tcp_keepalive: Some(keepalive(k)),
                    ..Default::default()
                });
            }
        }
        let (mut per_connection, mut idle) = (None, None);
        if let Some(http) = &pool.http {
            thresholds.max_pending_requests =
                uint(http.http1_max_pending_requests).or(thresholds.max_pending_requests);
            thresholds.max_requests = uint(http.http2_max_requests).or(thresholds.max_requests);
            thresholds.max_retries = uint(http.max_retries).or(thresholds.max_retries);
            per_connection = uint(http.max_requests_per_connection);
            idle = dur(http.idle_timeout.as_ref());
        }
        if per_connection.is_some() || idle.is_some() || max_duration.is_some() {
            set_connection_limits(c, per_connection, idle, max_duration);
        }
    }
    c.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![thresholds],
        ..Default::default()
    });
    if let Some(o) = e.outlier {
        let enforce = |v: Option<i64>| {
            Some(UInt32Value {
                value: if v.unwrap_or(0) > 0 { 100 } else { 0 },
            })
        };
        let five_xx = o.consecutive_5xx_errors.or(o.consecutive_errors);
        let mut od = EnvoyOutlier {
            interval: dur(o.interval.as_ref()),
            base_ejection_time: dur(o.base_ejection_time.as_ref()),
            max_ejection_percent: o
                .max_ejection_percent
                .map(|p| UInt32Value { value: p as u32 }),
            // Istio never enforces success-rate ejection.
            enforcing_success_rate: Some(UInt32Value { value: 0 }),
            ..Default::default()
        };
        if five_xx.is_some() {
            od.consecutive_5xx = five_xx.map(|v| UInt32Value { value: v as u32 });
            od.enforcing_consecutive_5xx = enforce(five_xx);
        }
        if let Some(gw) = o.consecutive_gateway_errors {
            od.consecutive_gateway_failure = Some(UInt32Value { value: gw as u32 });
            od.enforcing_consecutive_gateway_failure = enforce(Some(gw));
        }
        c.outlier_detection = Some(od);
        if let Some(min) = o.min_health_percent {
            c.common_lb_config = Some(cluster::CommonLbConfig {
                healthy_panic_threshold: Some(Percent { value: min as f64 }),
                ..Default::default()
            });
        }
    }
}

/// `tcpKeepalive` as istiod writes it: `SO_KEEPALIVE` with the kernel's defaults, each field
/// given replacing its default (probes when above 0; times in whole seconds). A time under a
/// second becomes one second: istiod's 0 would leave the kernel's default (2 hours for the
/// first probe), far from what was asked.
fn keepalive(k: &crate::config::TcpKeepalive) -> TcpKeepalive {
    let seconds = |s: Option<&String>| {
        let d = parse_duration(s?).ok()?;
        Some(UInt32Value {
            value: d.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
        })
    };
    TcpKeepalive {
        keepalive_probes: uint(k.probes),
        keepalive_time: seconds(k.time.as_ref()),
        keepalive_interval: seconds(k.interval.as_ref()),
    }
}

/// Per-connection limits live in the cluster's HttpProtocolOptions, next to its upstream
/// protocol (HTTP/1.1 unless the port already asked for HTTP/2).
fn set_connection_limits(
    c: &mut Cluster,
    max_requests: Option<UInt32Value>,
    idle: Option<Duration>,
    max_duration: Option<Duration>,
) {
    let mut opts: HttpProtocolOptions = c
        .typed_extension_protocol_options
        .get(HTTP_OPTIONS)
        .and_then(|a| unpack(a).ok())
        .unwrap_or_default();
    if opts.upstream_protocol_options.is_none() {
        opts.upstream_protocol_options = Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(http_protocol_options::ExplicitHttpConfig {
            protocol_config: Some(http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())),
        }));
    }
    opts.common_http_protocol_options = Some(CommonHttpOptions {
        max_requests_per_connection: max_requests,
        idle_timeout: idle,
        max_connection_duration: max_duration,
        ..Default::default()
    });
    c.typed_extension_protocol_options
        .insert(HTTP_OPTIONS.into(), pack(&opts));
}
