//! Upstream clusters: their endpoints (from EDS or inline), the load balancer that picks one,
//! per-endpoint connection pools and stats. Translated from Envoy `Cluster` resources, with
//! anything this version cannot honour rejected (NACKed) by field name.

pub mod dns;
pub mod h1;
pub mod health;
pub mod lb;
pub mod outlier;
pub mod pool;
pub mod tee;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use weft_xds_proto::envoy::config::cluster::v3::{Cluster as XdsCluster, cluster};
use weft_xds_proto::envoy::config::core::v3::{address, socket_address};
use weft_xds_proto::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use weft_xds_proto::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};

use crate::stats::{Counter, Gauge, StatusClasses};
use crate::{Rejection, duration};
pub use lb::LbPolicy;
pub use pool::{
    Attempted, ConnectionLimits, CountedBody, DownstreamBody, Pool, RequestSource, StreamedBody,
    UpstreamBody, UpstreamError, UpstreamHead, UpstreamProtocol, UpstreamResponseBody,
    attempt_count,
};

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// From EDS, under this service name.
    Eds(String),
    /// Inline in the cluster (`load_assignment`).
    Static,
    /// Names in `load_assignment`, resolved by the proxy (STRICT_DNS, LOGICAL_DNS).
    Dns(dns::DnsConfig),
    /// ORIGINAL_DST: the host is where the downstream connection was addressed before
    /// iptables redirected it; hosts unused for `cleanup_interval` are forgotten.
    OriginalDst { cleanup_interval: Duration },
}

#[derive(Debug, Default)]
pub struct EndpointStats {
    pub rq_total: Counter,
    pub rq_success: Counter,
    pub rq_error: Counter,
    pub rq_active: Gauge,
}

/// One upstream host: its address, weight, pool and stats. Kept across EDS updates that keep
/// the address, so pooled connections and counters survive.
#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub pool: Pool,
    pub stats: EndpointStats,
    pub health: outlier::HostHealth,
}

#[derive(Debug, Default)]
pub struct ClusterStats {
    pub upstream_rq_total: Counter,
    pub upstream_rq_xx: StatusClasses,
    pub upstream_rq_active: Gauge,
    pub upstream_cx_total: Counter,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_per_try_timeout: Counter,
    /// Upstream requests ended by the cluster's `max_stream_duration`.
    pub upstream_rq_max_duration_reached: Counter,
    pub upstream_rq_retry: Counter,
    pub upstream_cx_none_healthy: Counter,
    pub update_success: Counter,
    pub upstream_rq_pending_overflow: Counter,
    pub upstream_rq_retry_overflow: Counter,
    /// Retries given up because the request body was not kept (past the tee's limit).
    pub retry_or_shadow_abandoned: Counter,
    pub outlier_ejections: Counter,
}

/// A cluster, ready for the request path.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    /// The name its stats are kept under, and `%UPSTREAM_CLUSTER%` logs: `alt_stat_name` when
    /// given, else `name` (`%UPSTREAM_CLUSTER_RAW%` is always `name`).
    pub stat_name: String,
    pub discovery: Discovery,
    pub protocol: UpstreamProtocol,
    /// How its connections are opened (`connect_timeout`, `upstream_connection_options`).
    pub dial: pool::Dial,
    pub lb: lb::Balancer,
    pub endpoints: ArcSwap<lb::EndpointSet>,
    pub stats: ClusterStats,
    pub breakers: Breakers,
    pub outlier: Option<outlier::OutlierConfig>,
    /// Active health checking (`health_checks`).
    pub health_check: Option<health::HealthCheck>,
    pub health_stats: health::HealthStats,
    pub limits: ConnectionLimits,
    /// `common_http_protocol_options.max_stream_duration`: each upstream request's own limit,
    /// from when it is sent to its answer's last byte (`UMSDR`).
    pub max_stream_duration: Option<Duration>,
    /// Below this percentage of healthy hosts the load balancer ignores health (Envoy: 50).
    pub panic_threshold: f64,
    /// TLS towards the endpoints (transport_socket and transport_socket_matches).
    pub transport: Transport,
    /// The xDS resource this was built from, encoded, to tell whether an update changes
    /// anything (the decoded resource is several times larger).
    pub source: Vec<u8>,
    /// ORIGINAL_DST hosts by address, with when each was last picked.
    original_hosts: std::sync::Mutex<HashMap<SocketAddr, (Arc<Endpoint>, std::time::Instant)>>,
    /// Connections made to ORIGINAL_DST hosts since forgotten (the cluster's counter keeps
    /// counting them).
    pub retired_cx_total: Counter,
}

/// How a cluster's endpoints are connected to: the first `transport_socket_matches` entry
/// whose `match` fields all equal the endpoint's `envoy.transport_socket_match` metadata, else
/// the cluster's `transport_socket` (Istio's auto mTLS: endpoints labelled
/// `tlsMode: istio` get mTLS, the rest plaintext).
#[derive(Debug, Default)]
pub struct Transport {
    pub default: Option<Arc<crate::tls::UpstreamTls>>,
    pub matches: Vec<SocketMatch>,
}

/// One `transport_socket_matches` entry: the metadata it requires and the TLS it selects.
pub type SocketMatch = (Vec<(String, String)>, Option<Arc<crate::tls::UpstreamTls>>);

/// The metadata namespace transport socket matches look at.
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

impl Transport {
    fn from_xds(c: &XdsCluster) -> Result<Transport, (String, String)> {
        let default = match &c.transport_socket {
            None => None,
            Some(ts) => crate::tls::client_config(ts)
                .map_err(|(f, r)| (format!("transport_socket.{f}"), r))?,
        };
        let mut matches = Vec::new();
        for (i, m) in c.transport_socket_matches.iter().enumerate() {
            let field = format!("transport_socket_matches[{i}]");
            let mut fields = Vec::new();
            for (k, v) in m.r#match.as_ref().map(|s| &s.fields).into_iter().flatten() {
                match &v.kind {
                    Some(weft_xds_proto::wkt::value::Kind::StringValue(s)) => {
                        fields.push((k.clone(), s.clone()))
                    }
                    _ => {
                        return Err((
                            format!("{field}.match.{k}"),
                            "only string values can be matched".into(),
                        ));
                    }
                }
            }
            let tls = match &m.transport_socket {
                None => None,
                Some(ts) => crate::tls::client_config(ts)
                    .map_err(|(f, r)| (format!("{field}.transport_socket.{f}"), r))?,
            };
            matches.push((fields, tls));
        }
        Ok(Transport { default, matches })
    }

    /// The TLS for an endpoint with this metadata.
    fn for_endpoint(
        &self,
        metadata: Option<&weft_xds_proto::envoy::config::core::v3::Metadata>,
    ) -> Option<Arc<crate::tls::UpstreamTls>> {
        let labels = metadata.and_then(|m| m.filter_metadata.get(TRANSPORT_SOCKET_MATCH));
        let value = |k: &str| -> Option<&str> {
            match labels?.fields.get(k)?.kind.as_ref()? {
                weft_xds_proto::wkt::value::Kind::StringValue(s) => Some(s),
                _ => None,
            }
        };
        for (fields, tls) in &self.matches {
            if fields.iter().all(|(k, v)| value(k) == Some(v.as_str())) {
                return tls.clone();
            }
        }
        self.default.clone()
    }
}

/// Circuit breakers (the DEFAULT priority thresholds): Envoy's defaults are 1024 connections,
/// pending requests and requests, and 3 concurrent retries.
#[derive(Debug)]
pub struct Breakers {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// `retry_budget`: (percent of active and pending requests, minimum concurrency); when
    /// set it replaces `max_retries`.
    pub retry_budget: Option<(f64, u32)>,
    /// HTTP/1.1 carries one request per connection at a time: a permit is a connection.
    connections: tokio::sync::Semaphore,
    pending: std::sync::atomic::AtomicU32,
    retries: std::sync::atomic::AtomicU32,
}

/// Holds one in-flight retry against `max_retries`.
pub struct RetryGuard<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Breakers {
    fn new(
        max_connections: u32,
        max_pending: u32,
        max_requests: u32,
        max_retries: u32,
    ) -> Breakers {
        Breakers {
            max_connections,
            max_pending,
            max_requests,
            max_retries,
            retry_budget: None,
            connections: tokio::sync::Semaphore::new(
                max_connections.min(tokio::sync::Semaphore::MAX_PERMITS as u32) as usize,
            ),
            pending: Default::default(),
            retries: Default::default(),
        }
    }

    fn from_xds(c: &XdsCluster) -> Result<Breakers, String> {
        let mut b = (1024, 1024, 1024, 3);
        let mut budget = None;
        if let Some(cb) = &c.circuit_breakers {
            for t in &cb.thresholds {
                if t.priority != 0 {
                    return Err("only DEFAULT priority thresholds are supported".into());
                }
                if let Some(rb) = &t.retry_budget {
                    let percent = rb.budget_percent.as_ref().map(|p| p.value).unwrap_or(20.0);
                    if !(0.0..=100.0).contains(&percent) {
                        return Err(format!(
                            "retry_budget.budget_percent {percent} is not within [0, 100]"
                        ));
                    }
                    budget = Some((
                        percent,
                        rb.min_retry_concurrency.map(|v| v.value).unwrap_or(3),
                    ));
                }
                let v = |x: Option<weft_xds_proto::wkt::UInt32Value>, d: u32| {
                    x.map(|v| v.value).unwrap_or(d)
                };
                b = (
                    v(t.max_connections, b.0),
                    v(t.max_pending_requests, b.1),
                    v(t.max_requests, b.2),
                    v(t.max_retries, b.3),
                );
            }
        }
        let mut breakers = Breakers::new(b.0, b.1, b.2, b.3);
        breakers.retry_budget = budget;
        Ok(breakers)
    }

    /// A connection slot for an HTTP/1.1 request, waiting as a pending request when every
    /// connection is busy; None when the pending queue is full too (overflow).
    pub async fn connection(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        use std::sync::atomic::Ordering;
        if let Ok(p) = self.connections.try_acquire() {
            return Some(p);
        }
        if self.pending.fetch_add(1, Ordering::Relaxed) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let permit = self.connections.acquire().await.ok();
        self.pending.fetch_sub(1, Ordering::Relaxed);
        permit
    }

    /// Room for one more concurrent retry? `active` is the cluster's active requests: with a
    /// retry budget, as many retries may run as its percentage of them and the pending
    /// requests, and never fewer than its minimum (Envoy's rule); else `max_retries`.
    pub fn retry(&self, active: i64) -> Option<RetryGuard<'_>> {
        use std::sync::atomic::Ordering;
        let limit = match self.retry_budget {
            None => self.max_retries,
            Some((percent, min)) => {
                let outstanding =
                    active.max(0) as f64 + f64::from(self.pending.load(Ordering::Relaxed));
                ((outstanding * percent / 100.0) as u32).max(min)
            }
        };
        if self.retries.fetch_add(1, Ordering::Relaxed) >= limit {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RetryGuard(&self.retries))
    }
}

impl Cluster {
    /// Validates and translates a CDS resource.
    pub fn from_xds(c: &XdsCluster) -> Result<Cluster, Rejection> {
        let reject =
            |field: &str, reason: String| Rejection::new("Cluster", &c.name, field, reason);
        if c.name.is_empty() {
            return Err(reject("name", "a cluster needs a name".into()));
        }
        let discovery = match &c.cluster_discovery_type {
            None => Discovery::Static,
            Some(cluster::ClusterDiscoveryType::Type(t)) => {
                match cluster::DiscoveryType::try_from(*t) {
                    Ok(cluster::DiscoveryType::Static) => Discovery::Static,
                    Ok(cluster::DiscoveryType::Eds) => {
                        let service = c
                            .eds_cluster_config
                            .as_ref()
                            .map(|e| e.service_name.clone())
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| c.name.clone());
                        Discovery::Eds(service)
                    }
                    Ok(
                        t
                        @ (cluster::DiscoveryType::StrictDns | cluster::DiscoveryType::LogicalDns),
                    ) => Discovery::Dns(
                        dns::DnsConfig::from_xds(c, t == cluster::DiscoveryType::LogicalDns)
                            .map_err(|(f, r)| reject(&f, r))?,
                    ),
                    Ok(cluster::DiscoveryType::OriginalDst) => {
                        original_dst_config(c).map_err(|(f, r)| reject(&f, r))?
                    }
                    Err(_) => return Err(reject("type", format!("unknown discovery type {t}"))),
                }
            }
            Some(cluster::ClusterDiscoveryType::ClusterType(t)) => {
                return Err(reject(
                    "cluster_type",
                    format!("custom cluster type {:?} is not supported", t.name),
                ));
            }
        };
        let lb = if matches!(discovery, Discovery::OriginalDst { .. }) {
            // CLUSTER_PROVIDED, checked above: the cluster picks its one host itself.
            LbPolicy::RoundRobin
        } else {
            LbPolicy::from_xds(c).map_err(|(f, r)| reject(&f, r))?
        };
        let transport = Transport::from_xds(c).map_err(|(f, r)| reject(&f, r))?;
        for (field, set) in [
            ("lb_subset_config", c.lb_subset_config.is_some()),
            ("load_balancing_policy", c.load_balancing_policy.is_some()),
            (
                "upstream_connection_options.set_local_interface_name_on_upstream_connections",
                c.upstream_connection_options
                    .as_ref()
                    .is_some_and(|o| o.set_local_interface_name_on_upstream_connections),
            ),
            (
                "upstream_connection_options.happy_eyeballs_config",
                c.upstream_connection_options
                    .as_ref()
                    .is_some_and(|o| o.happy_eyeballs_config.is_some()),
            ),
        ] {
            if set {
                return Err(reject(
                    field,
                    "not supported by this weft-proxy version".into(),
                ));
            }
        }
        let mut protocol = UpstreamProtocol::Http1;
        let mut limits = ConnectionLimits::default();
        let mut max_stream_duration = None;
        for (name, any) in &c.typed_extension_protocol_options {
            if name != HTTP_PROTOCOL_OPTIONS {
                return Err(reject(
                    &format!("typed_extension_protocol_options[{name}]"),
                    "unknown extension".into(),
                ));
            }
            let opts: HttpProtocolOptions = weft_xds_proto::unpack(any).map_err(|e| {
                reject(
                    &format!("typed_extension_protocol_options[{name}]"),
                    e.to_string(),
                )
            })?;
            let field = |f: &str| format!("typed_extension_protocol_options[{name}].{f}");
            if opts.upstream_http_protocol_options.is_some()
                || !opts.http_filters.is_empty()
                || opts.header_validation_config.is_some()
            {
                return Err(reject(
                    &field("upstream_http_protocol_options"),
                    "upstream HTTP options, filters and header validation are not supported yet"
                        .into(),
                ));
            }
            if let Some(common) = &opts.common_http_protocol_options {
                if let Some(f) = crate::http::timeouts::unsupported_common(common) {
                    return Err(reject(
                        &field(&format!("common_http_protocol_options.{f}")),
                        "not supported by this weft-proxy version".into(),
                    ));
                }
                limits.max_requests = common
                    .max_requests_per_connection
                    .map(|v| v.value)
                    .filter(|v| *v > 0);
                // Unset or zero: none.
                let field = |d| crate::http::timeouts::field(d, None);
                limits.idle_timeout = field(common.idle_timeout.as_ref());
                limits.max_duration = field(common.max_connection_duration.as_ref());
                max_stream_duration = field(common.max_stream_duration.as_ref());
            }
            protocol = match opts.upstream_protocol_options {
                None => UpstreamProtocol::Http1,
                Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                    Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
                    Some(http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(_)) | None => UpstreamProtocol::Http1,
                    Some(_) => return Err(reject("typed_extension_protocol_options.explicit_http_config", "only HTTP/1.1 and HTTP/2 upstreams are supported".into())),
                },
                Some(_) => {
                    return Err(reject(
                        "typed_extension_protocol_options.upstream_protocol_options",
                        "only explicit_http_config is supported (no auto/downstream protocol selection)".into(),
                    ));
                }
            };
        }
        let breakers = Breakers::from_xds(c).map_err(|r| reject("circuit_breakers", r))?;
        let mut panic_threshold = outlier::PANIC_THRESHOLD_PERCENT as f64;
        if let Some(lbc) = &c.common_lb_config {
            if lbc.consistent_hashing_lb_config.is_some()
                || lbc.override_host_status.is_some()
                || lbc.locality_config_specifier.is_some()
                || lbc.close_connections_on_host_set_change
            {
                return Err(reject(
                    "common_lb_config",
                    "only healthy_panic_threshold is supported".into(),
                ));
            }
            if let Some(p) = &lbc.healthy_panic_threshold {
                panic_threshold = p.value.clamp(0.0, 100.0);
            }
        }
        let outlier = c
            .outlier_detection
            .as_ref()
            .map(outlier::OutlierConfig::from_xds)
            .transpose()
            .map_err(|(f, r)| reject(&f, r))?;
        let health_check = health::HealthCheck::from_xds(&c.health_checks, &c.name)
            .map_err(|(f, r)| reject(&f, r))?;
        if health_check
            .as_ref()
            .is_some_and(|h| matches!(h.kind, health::Kind::Grpc(_)))
            && protocol != UpstreamProtocol::Http2
        {
            // As Envoy, which refuses the cluster the same way.
            return Err(reject(
                "health_checks[0].grpc_health_check",
                "the cluster must support HTTP/2 for gRPC health checking (explicit_http_config with http2_protocol_options)".into(),
            ));
        }
        let keepalive = c
            .upstream_connection_options
            .as_ref()
            .and_then(|o| o.tcp_keepalive.as_ref())
            .map(pool::Keepalive::from_xds)
            .transpose()
            .map_err(|(f, r)| {
                reject(&format!("upstream_connection_options.tcp_keepalive.{f}"), r)
            })?;
        let dial = pool::Dial {
            timeout: c
                .connect_timeout
                .as_ref()
                .map(duration)
                .unwrap_or(pool::Dial::default().timeout),
            keepalive,
        };
        let cluster = Cluster {
            name: c.name.clone(),
            stat_name: if c.alt_stat_name.is_empty() {
                c.name.clone()
            } else {
                c.alt_stat_name.clone()
            },
            discovery,
            protocol,
            dial,
            lb: lb::Balancer::new(lb),
            endpoints: ArcSwap::from_pointee(lb::EndpointSet::default()),
            stats: ClusterStats::default(),
            breakers,
            outlier,
            health_check,
            health_stats: Default::default(),
            limits,
            max_stream_duration,
            panic_threshold,
            transport,
            source: prost::Message::encode_to_vec(c),
            original_hosts: Default::default(),
            retired_cx_total: Counter::default(),
        };
        if cluster.discovery == Discovery::Static
            && let Some(cla) = &c.load_assignment
        {
            let set = cluster.endpoint_set(cla, &HashMap::new())?;
            cluster.endpoints.store(Arc::new(set));
        }
        Ok(cluster)
    }

    /// The endpoint for an address: the existing one (its pool and stats) when the address and
    /// weight are unchanged, else a new one.
    fn endpoint(
        &self,
        addr: SocketAddr,
        weight: u32,
        metadata: Option<&weft_xds_proto::envoy::config::core::v3::Metadata>,
        existing: &HashMap<SocketAddr, Arc<Endpoint>>,
    ) -> Arc<Endpoint> {
        let tls = self.transport.for_endpoint(metadata);
        let same_tls = |e: &Endpoint| match (&e.pool.tls, &tls) {
            (None, None) => true,
            (Some(a), Some(b)) => a.source == b.source,
            _ => false,
        };
        match existing.get(&addr) {
            Some(e) if e.weight == weight && same_tls(e) => e.clone(),
            _ => Arc::new(Endpoint {
                address: addr,
                weight,
                pool: Pool::new(addr, self.protocol, self.dial, self.limits, tls),
                stats: EndpointStats::default(),
                health: outlier::HostHealth::new(self.health_check.is_some()),
            }),
        }
    }

    /// Builds the endpoint set for a load assignment, reusing `existing` endpoints (pools and
    /// stats) whose address is unchanged.
    pub fn endpoint_set(
        &self,
        cla: &ClusterLoadAssignment,
        existing: &HashMap<SocketAddr, Arc<Endpoint>>,
    ) -> Result<lb::EndpointSet, Rejection> {
        let reject = |field: String, reason: String| {
            Rejection::new("ClusterLoadAssignment", &cla.cluster_name, field, reason)
        };
        if cla
            .policy
            .as_ref()
            .is_some_and(|p| !p.drop_overloads.is_empty())
        {
            return Err(reject(
                "policy.drop_overloads".into(),
                "not supported by this weft-proxy version".into(),
            ));
        }
        let mut endpoints = Vec::new();
        for (i, group) in cla.endpoints.iter().enumerate() {
            if group.priority != 0 {
                return Err(reject(
                    format!("endpoints[{i}].priority"),
                    "priorities other than 0 are not supported yet".into(),
                ));
            }
            for (j, lbe) in group.lb_endpoints.iter().enumerate() {
                let field = format!("endpoints[{i}].lb_endpoints[{j}]");
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lbe.host_identifier else {
                    return Err(reject(
                        field,
                        "only endpoint addresses are supported (no named endpoints)".into(),
                    ));
                };
                let addr = socket_addr(ep.address.as_ref())
                    .map_err(|r| reject(format!("{field}.endpoint.address"), r))?;
                let weight = lbe
                    .load_balancing_weight
                    .map(|w| w.value)
                    .unwrap_or(1)
                    .max(1);
                endpoints.push(self.endpoint(addr, weight, lbe.metadata.as_ref(), existing));
            }
        }
        Ok(lb::EndpointSet::for_policy(endpoints, self.lb.policy))
    }

    /// Picks an endpoint: the load balancer's choice among hosts neither ejected by outlier
    /// detection nor failed by active health checks (all hosts when fewer than the panic
    /// threshold are left), avoiding `tried` when
    /// another host can be had within `attempts` picks. `hash` is the request's hash for the
    /// consistent-hash balancers; further picks for the same request step it along.
    /// `original` is the downstream connection's original destination: an ORIGINAL_DST
    /// cluster's only possible host.
    pub fn pick(
        &self,
        original: Option<SocketAddr>,
        tried: &[SocketAddr],
        attempts: u32,
        hash: Option<u64>,
    ) -> Option<Arc<Endpoint>> {
        if let Discovery::OriginalDst { cleanup_interval } = self.discovery {
            return original.map(|addr| self.original_host(addr, cleanup_interval));
        }
        let set = self.endpoints.load();
        let all = set.all();
        // Without outlier detection or health checks every host is healthy: skip the scan.
        let panic = (self.outlier.is_none() && self.health_check.is_none()) || {
            let healthy = all.iter().filter(|e| e.health.is_usable()).count();
            (healthy as f64) * 100.0 < (all.len() as f64) * self.panic_threshold
        };
        if panic && tried.is_empty() {
            return self.lb.pick(&set, hash);
        }
        let usable = |e: &Endpoint| panic || e.health.is_usable();
        let mut fallback = None;
        for k in 0..(attempts.max(1) + all.len() as u32) {
            let step =
                hash.map(|h| h.wrapping_add(u64::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            let e = self.lb.pick(&set, step)?;
            if !usable(&e) {
                continue;
            }
            if !tried.contains(&e.address) {
                return Some(e);
            }
            fallback.get_or_insert(e);
        }
        fallback.or_else(|| all.iter().find(|e| usable(e)).cloned())
    }

    /// The ORIGINAL_DST host for an address, made on first use (with its own pool); hosts
    /// nothing holds and nothing picked for `cleanup` are dropped as new ones are made.
    fn original_host(&self, addr: SocketAddr, cleanup: Duration) -> Arc<Endpoint> {
        let now = std::time::Instant::now();
        let mut hosts = self
            .original_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((e, used)) = hosts.get_mut(&addr) {
            *used = now;
            return e.clone();
        }
        hosts.retain(|_, (e, used)| {
            let keep = Arc::strong_count(e) > 1 || now - *used < cleanup;
            if !keep {
                self.retired_cx_total.add(e.pool.stats.cx_total.get());
            }
            keep
        });
        let e = self.endpoint(addr, 1, None, &HashMap::new());
        hosts.insert(addr, (e.clone(), now));
        e
    }

    /// Every host: the endpoint set, and the ORIGINAL_DST hosts made so far.
    pub fn hosts(&self) -> Vec<Arc<Endpoint>> {
        let mut all = self.endpoints.load().all().to_vec();
        let original = self
            .original_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        all.extend(original.values().map(|(e, _)| e.clone()));
        all
    }

    /// Feeds a request's outcome to outlier detection; ejects the host when it crosses a
    /// threshold and the cluster's max_ejection_percent allows it.
    pub fn observe(&self, endpoint: &Endpoint, outcome: outlier::Outcome) {
        let Some(cfg) = &self.outlier else { return };
        if endpoint.health.record(cfg, outcome) {
            self.eject_if_allowed(endpoint, cfg);
        }
    }

    /// Ejects a host unless that would take more than max_ejection_percent of the cluster.
    pub fn eject_if_allowed(&self, endpoint: &Endpoint, cfg: &outlier::OutlierConfig) {
        let set = self.endpoints.load();
        let total = set.all().len().max(1);
        let ejected = set.all().iter().filter(|e| e.health.is_ejected()).count();
        if ejected * 100 / total < cfg.max_ejection_percent as usize {
            tracing::info!(cluster = %self.name, host = %endpoint.address, "outlier detection: host ejected");
            endpoint.health.eject(cfg);
            self.stats.outlier_ejections.inc();
        }
    }

    /// The current endpoints by address, to carry pools and stats into a new set.
    pub fn current_endpoints(&self) -> HashMap<SocketAddr, Arc<Endpoint>> {
        self.endpoints
            .load()
            .all()
            .iter()
            .map(|e| (e.address, e.clone()))
            .collect()
    }

    /// Replaces the endpoints from an EDS update.
    pub fn assign(&self, cla: &ClusterLoadAssignment) -> Result<(), Rejection> {
        let existing = self.current_endpoints();
        let set = self.endpoint_set(cla, &existing)?;
        self.endpoints.store(Arc::new(set));
        self.stats.update_success.inc();
        Ok(())
    }
}

/// An ORIGINAL_DST cluster's settings: Envoy's rules (lb_policy CLUSTER_PROVIDED, no
/// endpoints of its own); the HTTP-header and port-override variants are refused.
fn original_dst_config(c: &XdsCluster) -> Result<Discovery, (String, String)> {
    use weft_xds_proto::envoy::config::cluster::v3::cluster::LbPolicy as XdsLb;
    if c.lb_policy != XdsLb::ClusterProvided as i32 {
        return Err((
            "lb_policy".into(),
            "an ORIGINAL_DST cluster must use CLUSTER_PROVIDED".into(),
        ));
    }
    if c.load_assignment
        .as_ref()
        .is_some_and(|a| !a.endpoints.is_empty())
    {
        return Err((
            "load_assignment".into(),
            "an ORIGINAL_DST cluster takes its host from each connection, not from endpoints"
                .into(),
        ));
    }
    if let Some(cluster::LbConfig::OriginalDstLbConfig(o)) = &c.lb_config
        && (o.use_http_header
            || !o.http_header_name.is_empty()
            || o.upstream_port_override.is_some()
            || o.metadata_key.is_some())
    {
        return Err((
            "original_dst_lb_config".into(),
            "only the connection's original destination is supported (no HTTP header, metadata or port override)".into(),
        ));
    }
    let cleanup_interval = c
        .cleanup_interval
        .as_ref()
        .map(duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(5));
    Ok(Discovery::OriginalDst { cleanup_interval })
}

/// A socket address from an Envoy `Address` (IP literals only: weft does not resolve here).
pub fn socket_addr(
    a: Option<&weft_xds_proto::envoy::config::core::v3::Address>,
) -> Result<SocketAddr, String> {
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err("a socket address is required".into());
    };
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) if p <= 65535 => p as u16,
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            return Err(format!("port {p} is out of range"));
        }
        _ => return Err("a numeric port_value is required".into()),
    };
    if sa.protocol != 0 {
        return Err("only TCP socket addresses are supported".into());
    }
    let ip: std::net::IpAddr = sa
        .address
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", sa.address))?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds_proto::envoy::config::cluster::v3::cluster::{
        DiscoveryType, LbPolicy as XdsLb, OriginalDstLbConfig,
    };

    fn original_dst(lb: XdsLb) -> XdsCluster {
        XdsCluster {
            name: "PassthroughCluster".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                DiscoveryType::OriginalDst as i32,
            )),
            lb_policy: lb as i32,
            ..Default::default()
        }
    }

    /// The host is the connection's original destination, one host (and pool) per address;
    /// without one there is no host.
    #[test]
    fn an_original_dst_cluster_picks_where_the_client_connected() {
        let c = Cluster::from_xds(&original_dst(XdsLb::ClusterProvided)).unwrap();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let first = c.pick(Some(a), &[], 1, None).unwrap();
        assert_eq!(first.address, a);
        assert!(Arc::ptr_eq(&first, &c.pick(Some(a), &[], 1, None).unwrap()));
        assert_eq!(c.pick(Some(b), &[], 1, None).unwrap().address, b);
        assert!(c.pick(None, &[], 1, None).is_none());
        let mut hosts: Vec<SocketAddr> = c.hosts().iter().map(|e| e.address).collect();
        hosts.sort();
        assert_eq!(hosts, [a, b]);
    }

    /// `tcp_keepalive` reaches the endpoints' pools; its neighbours weft does not implement,
    /// and values the kernel refuses, are refused by field.
    #[test]
    fn upstream_connection_options_are_checked_by_field() {
        use weft_xds_proto::envoy::config::cluster::v3::{
            UpstreamConnectionOptions, upstream_connection_options::HappyEyeballsConfig,
        };
        use weft_xds_proto::envoy::config::core::v3::TcpKeepalive;
        let with = |o: UpstreamConnectionOptions| XdsCluster {
            upstream_connection_options: Some(o),
            ..original_dst(XdsLb::ClusterProvided)
        };
        let keepalive = |probes| UpstreamConnectionOptions {
            tcp_keepalive: Some(TcpKeepalive {
                keepalive_probes: Some(weft_xds_proto::wkt::UInt32Value { value: probes }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = Cluster::from_xds(&with(keepalive(5))).unwrap();
        assert_eq!(c.dial.keepalive.and_then(|k| k.probes), Some(5));
        assert_eq!(c.dial.timeout, Duration::from_secs(5));
        let e = Cluster::from_xds(&with(keepalive(1000))).unwrap_err();
        assert_eq!(
            e.field,
            "upstream_connection_options.tcp_keepalive.keepalive_probes"
        );
        let e = Cluster::from_xds(&with(UpstreamConnectionOptions {
            happy_eyeballs_config: Some(HappyEyeballsConfig::default()),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(e.field, "upstream_connection_options.happy_eyeballs_config");
        let e = Cluster::from_xds(&with(UpstreamConnectionOptions {
            set_local_interface_name_on_upstream_connections: true,
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(
            e.field,
            "upstream_connection_options.set_local_interface_name_on_upstream_connections"
        );
    }

    /// `common_http_protocol_options.max_stream_duration` limits each upstream request; zero
    /// is no limit.
    #[test]
    fn a_clusters_max_stream_duration_is_each_upstream_requests() {
        use weft_xds_proto::envoy::config::core::v3::HttpProtocolOptions as Common;
        let with = |secs: i64| {
            let opts = HttpProtocolOptions {
                common_http_protocol_options: Some(Common {
                    max_stream_duration: Some(weft_xds_proto::wkt::Duration {
                        seconds: secs,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut c = original_dst(XdsLb::ClusterProvided);
            c.typed_extension_protocol_options
                .insert(HTTP_PROTOCOL_OPTIONS.into(), weft_xds_proto::pack(&opts));
            Cluster::from_xds(&c).unwrap()
        };
        assert_eq!(with(3).max_stream_duration, Some(Duration::from_secs(3)));
        assert_eq!(with(0).max_stream_duration, None);
        let none = Cluster::from_xds(&original_dst(XdsLb::ClusterProvided)).unwrap();
        assert_eq!(none.max_stream_duration, None);
    }

    /// As Envoy: CLUSTER_PROVIDED only, no endpoints of its own; the variants weft does not
    /// implement are refused by field.
    #[test]
    fn original_dst_clusters_are_checked_as_envoy_checks_them() {
        let e = Cluster::from_xds(&original_dst(XdsLb::RoundRobin)).unwrap_err();
        assert_eq!(e.field, "lb_policy");
        let mut header = original_dst(XdsLb::ClusterProvided);
        header.lb_config = Some(cluster::LbConfig::OriginalDstLbConfig(
            OriginalDstLbConfig {
                use_http_header: true,
                ..Default::default()
            },
        ));
        let e = Cluster::from_xds(&header).unwrap_err();
        assert_eq!(e.field, "original_dst_lb_config");
        let mut eds = original_dst(XdsLb::ClusterProvided);
        eds.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            DiscoveryType::Eds as i32,
        ));
        assert_eq!(Cluster::from_xds(&eds).unwrap_err().field, "lb_policy");
    }
}
