//! Active health checking, as Envoy's `health_checks` (one HTTP, gRPC or TCP checker per cluster):
//! each host is checked on its own schedule; a host is taken out of load balancing after
//! `unhealthy_threshold` failed checks (at once for an HTTP status that is neither expected nor
//! retriable, or the `x-envoy-immediate-health-check-fail` header), and put back after
//! `healthy_threshold` good ones. A host starts unhealthy until its first check passes (one
//! success is enough then). Checks go over the endpoint's own transport (TLS when the cluster
//! has it), over one connection kept between checks (`reuse_connection`, true by default as in
//! Envoy) or a new one each time.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_xds_proto::envoy::config::core::v3::{HealthCheck as XdsHealthCheck, health_check};

use super::{Cluster, Endpoint};
use crate::duration;
use crate::http::rewrite::HeaderEdits;

/// A cluster's active health check, validated.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub timeout: Duration,
    pub interval: Duration,
    pub unhealthy_interval: Duration,
    pub unhealthy_edge_interval: Duration,
    pub healthy_edge_interval: Duration,
    pub no_traffic_interval: Duration,
    pub no_traffic_healthy_interval: Duration,
    pub initial_jitter: Duration,
    pub interval_jitter: Duration,
    pub interval_jitter_percent: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub alt_port: Option<u16>,
    /// Keep the connection between checks (Envoy's `reuse_connection`, default true).
    pub reuse: bool,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Http(HttpCheck),
    Tcp {
        send: Vec<u8>,
        /// Each must be found in the response, in this order.
        receive: Vec<Vec<u8>>,
    },
    Grpc(GrpcCheck),
}

/// `grpc.health.v1.Health/Check` over HTTP/2 (whatever the cluster's own protocol, as Envoy).
#[derive(Debug, Clone)]
pub struct GrpcCheck {
    /// `authority`, else the cluster's name.
    pub authority: String,
    /// The `service` asked about (empty: the server as a whole).
    pub service: String,
    pub metadata: HeaderEdits,
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`: status 1 is SERVING.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;

#[derive(Debug, Clone)]
pub struct HttpCheck {
    /// `host`, else the cluster's name (Envoy's default).
    pub host: String,
    pub path: String,
    pub method: http::Method,
    pub http2: bool,
    pub expected: Vec<Range<u16>>,
    pub retriable: Vec<Range<u16>>,
    pub headers: HeaderEdits,
    /// The request body (`send`).
    pub send: Option<Bytes>,
    /// Blocks the first `buffer` bytes of the response body must hold, in order (`receive`).
    pub receive: Vec<Vec<u8>>,
    pub buffer: usize,
    /// `service_name_matcher`: the answer's `x-envoy-upstream-healthchecked-cluster` must match.
    pub(crate) cluster_name: Option<crate::http::router::StringRule>,
}

type Rejected = (String, String);

fn payload(p: &health_check::Payload, field: &str) -> Result<Vec<u8>, Rejected> {
    match &p.payload {
        Some(health_check::payload::Payload::Binary(b)) => Ok(b.clone()),
        Some(health_check::payload::Payload::Text(hex)) => {
            let hex: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
            if !hex.len().is_multiple_of(2) {
                return Err((field.into(), "hex text has an odd number of digits".into()));
            }
            hex.chunks(2)
                .map(|pair| {
                    std::str::from_utf8(pair)
                        .ok()
                        .and_then(|s| u8::from_str_radix(s, 16).ok())
                        .ok_or_else(|| (field.to_string(), format!("{:?} is not hex", pair)))
                })
                .collect()
        }
        None => Err((field.into(), "a payload needs text or binary".into())),
    }
}

fn ranges(
    list: &[weft_xds_proto::envoy::r#type::v3::Int64Range],
    field: &str,
) -> Result<Vec<Range<u16>>, Rejected> {
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            if !(100..=600).contains(&r.start) || !(100..=600).contains(&r.end) || r.start >= r.end
            {
                return Err((
                    format!("{field}[{i}]"),
                    format!(
                        "[{}, {}) is not a range of HTTP statuses (start < end, within [100, 600])",
                        r.start, r.end
                    ),
                ));
            }
            Ok(r.start as u16..r.end as u16)
        })
        .collect()
}

impl HealthCheck {
    /// Validates a cluster's `health_checks` (at most one is supported); `field` names it.
    pub fn from_xds(
        checks: &[XdsHealthCheck],
        cluster: &str,
    ) -> Result<Option<HealthCheck>, Rejected> {
        let Some(h) = checks.first() else {
            return Ok(None);
        };
        if checks.len() > 1 {
            return Err((
                "health_checks".into(),
                "only one health checker per cluster is supported".into(),
            ));
        }
        let f = |s: &str| format!("health_checks[0].{s}");
        let d = |v: &Option<weft_xds_proto::wkt::Duration>| v.as_ref().map(duration);
        let (Some(timeout), Some(interval)) = (d(&h.timeout), d(&h.interval)) else {
            return Err((f("timeout"), "timeout and interval are required".into()));
        };
        if timeout.is_zero() || interval.is_zero() {
            return Err((f("interval"), "timeout and interval must be above 0".into()));
        }
        let (Some(unhealthy), Some(healthy)) = (h.unhealthy_threshold, h.healthy_threshold) else {
            return Err((
                f("unhealthy_threshold"),
                "unhealthy_threshold and healthy_threshold are required".into(),
            ));
        };
        for (field, set) in [
            #[allow(deprecated)] // refused, as every field weft does not honour
            ("event_log_path", !h.event_log_path.is_empty()),
            ("event_logger", !h.event_logger.is_empty()),
            ("event_service", h.event_service.is_some()),
            ("tls_options", h.tls_options.is_some()),
            (
                "transport_socket_match_criteria",
                h.transport_socket_match_criteria.is_some(),
            ),
        ] {
            if set {
                return Err((f(field), "not supported by this weft-proxy version".into()));
            }
        }
        let kind = match &h.health_checker {
            Some(health_check::HealthChecker::HttpHealthCheck(x)) => {
                if x.path.is_empty() || !x.path.starts_with('/') {
                    return Err((
                        f("http_health_check.path"),
                        format!("{:?} is not a request path", x.path),
                    ));
                }
                use weft_xds_proto::envoy::config::core::v3::RequestMethod;
                let method = match RequestMethod::try_from(x.method) {
                    Ok(RequestMethod::MethodUnspecified | RequestMethod::Get) => http::Method::GET,
                    Ok(RequestMethod::Head) => http::Method::HEAD,
                    Ok(RequestMethod::Post) => http::Method::POST,
                    Ok(RequestMethod::Put) => http::Method::PUT,
                    Ok(RequestMethod::Delete) => http::Method::DELETE,
                    Ok(RequestMethod::Options) => http::Method::OPTIONS,
                    Ok(RequestMethod::Trace) => http::Method::TRACE,
                    Ok(RequestMethod::Patch) => http::Method::PATCH,
                    _ => {
                        return Err((
                            f("http_health_check.method"),
                            format!("method {} cannot be used for health checks", x.method),
                        ));
                    }
                };
                use weft_xds_proto::envoy::r#type::v3::CodecClientType;
                let http2 = match CodecClientType::try_from(x.codec_client_type) {
                    Ok(CodecClientType::Http1) => false,
                    Ok(CodecClientType::Http2) => true,
                    _ => {
                        return Err((
                            f("http_health_check.codec_client_type"),
                            "only HTTP1 and HTTP2 health checks are supported".into(),
                        ));
                    }
                };
                let send = x
                    .send
                    .as_ref()
                    .map(|p| payload(p, &f("http_health_check.send")))
                    .transpose()?;
                let with_body = [
                    http::Method::POST,
                    http::Method::PUT,
                    http::Method::PATCH,
                    http::Method::OPTIONS,
                ];
                if send.as_ref().is_some_and(|b| !b.is_empty()) && !with_body.contains(&method) {
                    // Envoy refuses this configuration too.
                    return Err((
                        f("http_health_check.send"),
                        format!(
                            "a request payload needs a method with a body (POST, PUT, PATCH, OPTIONS), not {method}"
                        ),
                    ));
                }
                let mut expected = ranges(
                    &x.expected_statuses,
                    &f("http_health_check.expected_statuses"),
                )?;
                if expected.is_empty() {
                    expected.push(200..201);
                }
                Kind::Http(HttpCheck {
                    host: if x.host.is_empty() {
                        cluster.to_string()
                    } else {
                        x.host.clone()
                    },
                    path: x.path.clone(),
                    method,
                    http2,
                    expected,
                    retriable: ranges(
                        &x.retriable_statuses,
                        &f("http_health_check.retriable_statuses"),
                    )?,
                    headers: HeaderEdits::from_xds(
                        &x.request_headers_to_add,
                        &x.request_headers_to_remove,
                    )
                    .map_err(|r| (f("http_health_check.request_headers_to_add"), r))?,
                    send: send.filter(|b| !b.is_empty()).map(Bytes::from),
                    receive: x
                        .receive
                        .iter()
                        .enumerate()
                        .map(|(i, p)| payload(p, &f(&format!("http_health_check.receive[{i}]"))))
                        .collect::<Result<_, _>>()?,
                    buffer: x
                        .response_buffer_size
                        .map_or(1024, |v| usize::try_from(v.value).unwrap_or(usize::MAX)),
                    cluster_name: x
                        .service_name_matcher
                        .as_ref()
                        .map(crate::http::router::string_rule)
                        .transpose()
                        .map_err(|r| (f("http_health_check.service_name_matcher"), r))?,
                })
            }
            Some(health_check::HealthChecker::TcpHealthCheck(t)) => {
                if t.proxy_protocol_config.is_some() {
                    return Err((
                        f("tcp_health_check.proxy_protocol_config"),
                        "not supported by this weft-proxy version".into(),
                    ));
                }
                Kind::Tcp {
                    send: t
                        .send
                        .as_ref()
                        .map(|p| payload(p, &f("tcp_health_check.send")))
                        .transpose()?
                        .unwrap_or_default(),
                    receive: t
                        .receive
                        .iter()
                        .enumerate()
                        .map(|(i, p)| payload(p, &f(&format!("tcp_health_check.receive[{i}]"))))
                        .collect::<Result<_, _>>()?,
                }
            }
            Some(health_check::HealthChecker::GrpcHealthCheck(g)) => Kind::Grpc(GrpcCheck {
                authority: if g.authority.is_empty() {
                    cluster.to_string()
                } else {
                    g.authority.clone()
                },
                service: g.service_name.clone(),
                metadata: HeaderEdits::from_xds(&g.initial_metadata, &[])
                    .map_err(|r| (f("grpc_health_check.initial_metadata"), r))?,
            }),
            Some(health_check::HealthChecker::CustomHealthCheck(_)) => {
                return Err((
                    f("custom_health_check"),
                    "custom health checkers are not supported".into(),
                ));
            }
            None => {
                return Err((
                    f("health_checker"),
                    "an http_health_check, grpc_health_check or tcp_health_check is required"
                        .into(),
                ));
            }
        };
        let unhealthy_interval = d(&h.unhealthy_interval).unwrap_or(interval);
        let alt_port = match h.alt_port {
            None | Some(weft_xds_proto::wkt::UInt32Value { value: 0 }) => None,
            Some(p) if p.value <= 65535 => Some(p.value as u16),
            Some(p) => return Err((f("alt_port"), format!("port {} is out of range", p.value))),
        };
        let no_traffic_interval = d(&h.no_traffic_interval).unwrap_or(Duration::from_secs(60));
        Ok(Some(HealthCheck {
            timeout,
            interval,
            unhealthy_interval,
            unhealthy_edge_interval: d(&h.unhealthy_edge_interval).unwrap_or(unhealthy_interval),
            healthy_edge_interval: d(&h.healthy_edge_interval).unwrap_or(interval),
            no_traffic_interval,
            no_traffic_healthy_interval: d(&h.no_traffic_healthy_interval)
                .unwrap_or(no_traffic_interval),
            initial_jitter: d(&h.initial_jitter).unwrap_or_default(),
            interval_jitter: d(&h.interval_jitter).unwrap_or_default(),
            interval_jitter_percent: h.interval_jitter_percent,
            unhealthy_threshold: unhealthy.value.max(1),
            healthy_threshold: healthy.value.max(1),
            alt_port,
            reuse: h.reuse_connection.is_none_or(|r| r.value),
            kind,
        }))
    }
}

/// One host's active health state.
#[derive(Debug)]
pub struct ActiveHealth {
    /// Failed active health checking (Envoy's `/failed_active_hc`); hosts start failed.
    failed: AtomicBool,
    /// No check has completed yet (Envoy's `/pending_active_hc`).
    pending: AtomicBool,
    consecutive_ok: AtomicU32,
    consecutive_fail: AtomicU32,
}

impl Default for ActiveHealth {
    fn default() -> ActiveHealth {
        ActiveHealth::new(false)
    }
}

impl ActiveHealth {
    /// `checked`: the cluster health-checks its hosts, so a new host starts failed and pending.
    pub fn new(checked: bool) -> ActiveHealth {
        ActiveHealth {
            failed: AtomicBool::new(checked),
            pending: AtomicBool::new(checked),
            consecutive_ok: AtomicU32::new(0),
            consecutive_fail: AtomicU32::new(0),
        }
    }

    #[inline]
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// Records a check's result; returns whether the host changed state.
    fn record(&self, cfg: &HealthCheck, result: CheckResult) -> bool {
        let was_pending = self.pending.swap(false, Ordering::Relaxed);
        let was_failed = self.is_failed();
        match result {
            CheckResult::Healthy => {
                self.consecutive_fail.store(0, Ordering::Relaxed);
                let ok = self.consecutive_ok.fetch_add(1, Ordering::Relaxed) + 1;
                // A host's first check needs only one success (Envoy, at start-up).
                if was_failed && (was_pending || ok >= cfg.healthy_threshold) {
                    self.failed.store(false, Ordering::Relaxed);
                }
            }
            CheckResult::Unhealthy { immediate } => {
                self.consecutive_ok.store(0, Ordering::Relaxed);
                let bad = self.consecutive_fail.fetch_add(1, Ordering::Relaxed) + 1;
                if !was_failed && (immediate || bad >= cfg.unhealthy_threshold) {
                    self.failed.store(true, Ordering::Relaxed);
                }
            }
        }
        was_failed != self.is_failed()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckResult {
    Healthy,
    /// `immediate`: an HTTP status neither expected nor retriable (no threshold applies).
    Unhealthy {
        immediate: bool,
    },
}

/// Counters Envoy keeps under `cluster.<name>.health_check.*`.
#[derive(Debug, Default)]
pub struct HealthStats {
    pub attempt: crate::stats::Counter,
    pub success: crate::stats::Counter,
    pub failure: crate::stats::Counter,
    pub network_failure: crate::stats::Counter,
}

/// Runs the cluster's health checks for as long as the cluster lives: one session per host,
/// started when a host appears in the endpoint set and stopped when it leaves.
pub fn start(cluster: &Arc<Cluster>) {
    let Some(cfg) = cluster.health_check.clone() else {
        return;
    };
    let cfg = Arc::new(cfg);
    let weak = Arc::downgrade(cluster);
    tokio::spawn(async move {
        let mut sessions = Sessions::default();
        let mut last: Option<Arc<super::lb::EndpointSet>> = None;
        loop {
            let Some(cluster) = weak.upgrade() else { break };
            let set = cluster.endpoints.load_full();
            if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &set)) {
                let live: HashMap<usize, &Arc<Endpoint>> = set
                    .all()
                    .iter()
                    .map(|e| (Arc::as_ptr(e) as usize, e))
                    .collect();
                sessions.0.retain(|k, h| {
                    let keep = live.contains_key(k);
                    if !keep {
                        h.abort();
                    }
                    keep
                });
                for (k, e) in live {
                    sessions.0.entry(k).or_insert_with(|| {
                        tokio::spawn(session(weak.clone(), Arc::downgrade(e), cfg.clone()))
                            .abort_handle()
                    });
                }
                last = Some(set);
            }
            drop(cluster);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// The per-host sessions of a cluster, by endpoint; aborted when the cluster goes away (or
/// the supervising task is dropped with its runtime).
#[derive(Default)]
struct Sessions(HashMap<usize, tokio::task::AbortHandle>);

impl Drop for Sessions {
    fn drop(&mut self) {
        for h in self.0.values() {
            h.abort();
        }
    }
}

async fn session(cluster: Weak<Cluster>, endpoint: Weak<Endpoint>, cfg: Arc<HealthCheck>) {
    if !cfg.initial_jitter.is_zero() {
        tokio::time::sleep(cfg.initial_jitter.mul_f64(fastrand::f64())).await;
    }
    let mut kept = None;
    loop {
        let (Some(c), Some(e)) = (cluster.upgrade(), endpoint.upgrade()) else {
            return;
        };
        c.health_stats.attempt.inc();
        // A check that fails or times out leaves no connection behind: the next one connects
        // afresh (as Envoy closes the connection then).
        let result = match tokio::time::timeout(cfg.timeout, check(&e, &cfg, &mut kept)).await {
            Ok(Ok(r)) => r,
            Ok(Err(reason)) => {
                tracing::debug!(cluster = %c.name, host = %e.address, "health check failed: {reason}");
                c.health_stats.network_failure.inc();
                CheckResult::Unhealthy { immediate: false }
            }
            Err(_) => {
                tracing::debug!(cluster = %c.name, host = %e.address, "health check timed out");
                c.health_stats.network_failure.inc();
                CheckResult::Unhealthy { immediate: false }
            }
        };
        match result {
            CheckResult::Healthy => c.health_stats.success.inc(),
            CheckResult::Unhealthy { .. } => c.health_stats.failure.inc(),
        }
        let changed = e.health.active.record(&cfg, result);
        if changed {
            tracing::info!(cluster = %c.name, host = %e.address, healthy = !e.health.active.is_failed(), "active health check changed the host's state");
        }
        let mut wait = next_interval(&cfg, &c, &e, changed, fastrand::f64());
        drop((c, e));
        // As Envoy: a kept TCP connection the host closes between checks is a network failure
        // at once, and the next check is scheduled from then.
        if let Some(Kept::Tcp(stream)) = &mut kept {
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = closed(stream) => {}
            }
            kept = None;
            let (Some(c), Some(e)) = (cluster.upgrade(), endpoint.upgrade()) else {
                return;
            };
            c.health_stats.network_failure.inc();
            c.health_stats.failure.inc();
            let changed = e
                .health
                .active
                .record(&cfg, CheckResult::Unhealthy { immediate: false });
            wait = next_interval(&cfg, &c, &e, changed, fastrand::f64());
        }
        tokio::time::sleep(wait).await;
    }
}

/// Resolves when the host closes the connection (bytes it sends are dropped).
async fn closed(stream: &mut super::pool::UpstreamStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Envoy's choice of the next interval: the no-traffic intervals until the cluster has
/// carried a request, the edge intervals right after a change, the unhealthy interval while
/// the host is unhealthy; plus jitter. `unit` is a random number in [0, 1).
fn next_interval(
    cfg: &HealthCheck,
    cluster: &Cluster,
    e: &Endpoint,
    changed: bool,
    unit: f64,
) -> Duration {
    let failed = e.health.active.is_failed();
    let base = if cluster.stats.upstream_rq_total.get() == 0 {
        if failed {
            cfg.no_traffic_interval
        } else {
            cfg.no_traffic_healthy_interval
        }
    } else if changed {
        if failed {
            cfg.unhealthy_edge_interval
        } else {
            cfg.healthy_edge_interval
        }
    } else if failed {
        cfg.unhealthy_interval
    } else {
        cfg.interval
    };
    let mut jitter = Duration::ZERO;
    if cfg.interval_jitter_percent > 0 {
        jitter += base.mul_f64(f64::from(cfg.interval_jitter_percent) / 100.0 * unit);
    }
    if !cfg.interval_jitter.is_zero() {
        jitter += cfg.interval_jitter.mul_f64(unit);
    }
    base + jitter
}

/// A connection kept between a host's checks (`reuse_connection`).
pub(crate) enum Kept {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    Tcp(super::pool::UpstreamStream),
}

/// One check of one host. Err: the host could not be reached or answered garbage. `kept` is
/// the connection of the previous check, if it is to be reused; the check leaves its own
/// there when `reuse_connection` says so.
async fn check(
    e: &Endpoint,
    cfg: &HealthCheck,
    kept: &mut Option<Kept>,
) -> Result<CheckResult, String> {
    let previous = kept.take();
    match &cfg.kind {
        Kind::Http(h) if h.http2 => {
            let send = h2_sender(e, cfg, previous).await?;
            let req = http_request(h, cfg.reuse, true)?;
            let answer = send.clone().send_request(req).await;
            let result = http_result(h, answer).await?;
            if cfg.reuse {
                *kept = Some(Kept::Http2(send));
            }
            Ok(result)
        }
        Kind::Http(h) => {
            let reusable = match previous {
                Some(Kept::Http1(mut s)) => s.ready().await.is_ok().then_some(s),
                _ => None,
            };
            let mut send = match reusable {
                Some(s) => s,
                None => {
                    let io = hyper_util::rt::TokioIo::new(connect(e, cfg).await?);
                    let (send, conn) = hyper::client::conn::http1::handshake(io)
                        .await
                        .map_err(|err| err.to_string())?;
                    tokio::spawn(conn);
                    send
                }
            };
            let req = http_request(h, cfg.reuse, false)?;
            let answer = send.send_request(req).await;
            let result = http_result(h, answer).await?;
            if cfg.reuse {
                *kept = Some(Kept::Http1(send));
            }
            Ok(result)
        }
        Kind::Tcp { send, receive } => {
            let reusable = match previous {
                Some(Kept::Tcp(mut s)) => still_open(&mut s).then_some(s),
                _ => None,
            };
            let stream = match reusable {
                Some(s) => s,
                None => connect(e, cfg).await?,
            };
            if receive.is_empty() {
                // Connect-only: as Envoy, success once connected, nothing written, and the
                // connection closed whatever reuse_connection says (each check proves the host
                // still accepts connections).
                return Ok(CheckResult::Healthy);
            }
            let (result, stream) = tcp_check(stream, send, receive).await?;
            if cfg.reuse && result == CheckResult::Healthy {
                *kept = Some(Kept::Tcp(stream));
            }
            Ok(result)
        }
        Kind::Grpc(g) => {
            let send = h2_sender(e, cfg, previous).await?;
            let result = grpc_check(send.clone(), g, cfg.timeout).await?;
            if cfg.reuse {
                *kept = Some(Kept::Http2(send));
            }
            Ok(result)
        }
    }
}

/// A new connection for a check (to `alt_port` when set).
async fn connect(e: &Endpoint, cfg: &HealthCheck) -> Result<super::pool::UpstreamStream, String> {
    match cfg.alt_port {
        None => e.pool.connect().await,
        Some(port) => {
            e.pool
                .connect_to(std::net::SocketAddr::new(e.address.ip(), port))
                .await
        }
    }
    .map_err(|err| err.to_string())
}

/// The kept HTTP/2 connection while it takes streams, else a new one.
async fn h2_sender(
    e: &Endpoint,
    cfg: &HealthCheck,
    previous: Option<Kept>,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
    if let Some(Kept::Http2(mut s)) = previous
        && !s.is_closed()
        && s.ready().await.is_ok()
    {
        return Ok(s);
    }
    let io = hyper_util::rt::TokioIo::new(connect(e, cfg).await?);
    let (send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .map_err(|err| err.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// Whether a kept TCP connection is still open (the host may have closed it since); bytes it
/// sent after the last check are dropped.
fn still_open(s: &mut super::pool::UpstreamStream) -> bool {
    use futures::FutureExt;
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match s.read(&mut buf).now_or_never() {
            None => return true,
            Some(Ok(0)) | Some(Err(_)) => return false,
            Some(Ok(_)) => continue,
        }
    }
    false
}

fn http_request(
    h: &HttpCheck,
    reuse: bool,
    http2: bool,
) -> Result<http::Request<Full<Bytes>>, String> {
    let mut req = http::Request::builder()
        .method(h.method.clone())
        .body(Full::new(h.send.clone().unwrap_or_default()))
        .map_err(|err| err.to_string())?;
    let headers = req.headers_mut();
    headers.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("Envoy/HC"),
    );
    h.headers.apply(headers);
    if http2 {
        *req.uri_mut() = format!("http://{}{}", h.host, h.path)
            .parse()
            .map_err(|err: http::uri::InvalidUri| err.to_string())?;
    } else {
        *req.uri_mut() = h
            .path
            .parse()
            .map_err(|err: http::uri::InvalidUri| err.to_string())?;
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_str(&h.host).map_err(|err| err.to_string())?,
        );
        if !reuse {
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
    }
    Ok(req)
}

async fn http_result(
    h: &HttpCheck,
    answer: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<CheckResult, String> {
    let answer = answer.map_err(|err| err.to_string())?;
    let checked_cluster = answer
        .headers()
        .get("x-envoy-upstream-healthchecked-cluster")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (code, immediate_fail, body) = read_answer(answer, h.buffer).await?;
    let within = |list: &[Range<u16>]| list.iter().any(|r| r.contains(&code));
    Ok(if immediate_fail || !contains_in_order(&body, &h.receive) {
        // As Envoy: a body without the expected blocks fails at once, whatever the status.
        CheckResult::Unhealthy { immediate: true }
    } else if within(&h.expected) {
        // A good status from another cluster than the matcher wants fails at once (Envoy).
        match &h.cluster_name {
            Some(rule) if !rule.matches(&checked_cluster) => {
                CheckResult::Unhealthy { immediate: true }
            }
            _ => CheckResult::Healthy,
        }
    } else {
        CheckResult::Unhealthy {
            immediate: !within(&h.retriable),
        }
    })
}

/// One `grpc.health.v1.Health/Check` call. As Envoy: an answer other than grpc-status OK with
/// one SERVING response (a non-200 status, another content type, NOT_SERVING, a gRPC error, a
/// malformed or second message) fails the host at once; a connection that fails or resets
/// counts toward `unhealthy_threshold` (the caller's `Err`).
async fn grpc_check(
    mut send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    g: &GrpcCheck,
    timeout: Duration,
) -> Result<CheckResult, String> {
    use prost::Message;
    let request = HealthCheckRequest {
        service: g.service.clone(),
    }
    .encode_to_vec();
    let mut frame = Vec::with_capacity(5 + request.len());
    frame.push(0);
    frame.extend_from_slice(&(request.len() as u32).to_be_bytes());
    frame.extend_from_slice(&request);
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "http://{}/grpc.health.v1.Health/Check",
            g.authority
        ))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "Envoy/HC")
        .header("grpc-timeout", format!("{}m", timeout.as_millis().max(1)))
        .body(Full::new(Bytes::from(frame)))
        .map_err(|err| err.to_string())?;
    g.metadata.apply(req.headers_mut());
    let resp = send
        .send_request(req)
        .await
        .map_err(|err| err.to_string())?;
    let failed = Ok(CheckResult::Unhealthy { immediate: true });
    let grpc_ok = |h: &http::HeaderMap| h.get("grpc-status").is_some_and(|v| v == "0");
    let is_grpc = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if resp.status() != http::StatusCode::OK
        || !is_grpc
        || resp.headers().contains_key("grpc-status")
    {
        // A trailers-only answer carries no message: whatever its status, not SERVING.
        return failed;
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|err| err.to_string())?;
    let trailers_ok = body.trailers().is_some_and(grpc_ok);
    let mut data = body.to_bytes();
    let mut responses = Vec::new();
    while !data.is_empty() {
        if data.len() < 5 || data[0] != 0 {
            return failed;
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        if data.len() < 5 + len {
            return failed;
        }
        let message = data.split_to(5 + len).split_off(5);
        match HealthCheckResponse::decode(message) {
            Ok(r) => responses.push(r.status),
            Err(_) => return failed,
        }
    }
    Ok(match (trailers_ok, responses.as_slice()) {
        (true, [SERVING]) => CheckResult::Healthy,
        _ => CheckResult::Unhealthy { immediate: true },
    })
}

/// The status, whether the host asked to fail at once, and the first `keep` bytes of the body
/// (the rest is read and dropped).
async fn read_answer(
    resp: http::Response<hyper::body::Incoming>,
    keep: usize,
) -> Result<(u16, bool, Vec<u8>), String> {
    let immediate = resp
        .headers()
        .contains_key("x-envoy-immediate-health-check-fail");
    let code = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| err.to_string())?;
        if let Some(data) = frame.data_ref() {
            let room = keep.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok((code, immediate, kept))
}

async fn tcp_check(
    mut stream: super::pool::UpstreamStream,
    send: &[u8],
    receive: &[Vec<u8>],
) -> Result<(CheckResult, super::pool::UpstreamStream), String> {
    if !send.is_empty() {
        stream
            .write_all(send)
            .await
            .map_err(|err| err.to_string())?;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if contains_in_order(&got, receive) {
            return Ok((CheckResult::Healthy, stream));
        }
        let n = stream.read(&mut buf).await.map_err(|err| err.to_string())?;
        if n == 0 {
            return Ok((CheckResult::Unhealthy { immediate: false }, stream));
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether every block appears in `data`, each after the previous one.
fn contains_in_order(data: &[u8], blocks: &[Vec<u8>]) -> bool {
    let mut rest = data;
    for b in blocks {
        if b.is_empty() {
            continue;
        }
        match rest.windows(b.len()).position(|w| w == b.as_slice()) {
            Some(i) => rest = &rest[i + b.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Option<HealthCheck>, Rejected> {
        let c: weft_xds_proto::envoy::config::cluster::v3::Cluster =
            weft_xds_proto::from_yaml(yaml).unwrap();
        HealthCheck::from_xds(&c.health_checks, &c.name)
    }

    #[test]
    fn http_check_defaults_follow_envoy() {
        let hc = parse(
            "name: c\nhealth_checks: [{ timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, http_health_check: { path: /healthz } }]",
        )
        .unwrap()
        .unwrap();
        assert_eq!(hc.unhealthy_interval, Duration::from_secs(2));
        assert_eq!(hc.no_traffic_interval, Duration::from_secs(60));
        let Kind::Http(h) = hc.kind else { panic!() };
        assert_eq!(h.host, "c", "the cluster's name is the default host");
        assert_eq!(h.expected, vec![200..201]);
        assert!(h.retriable.is_empty());
    }

    #[test]
    fn grpc_check_defaults_follow_envoy() {
        let hc = parse(
            "name: c\nhealth_checks: [{ timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, grpc_health_check: { service_name: pkg.Svc } }]",
        )
        .unwrap()
        .unwrap();
        let Kind::Grpc(g) = hc.kind else { panic!() };
        assert_eq!(
            g.authority, "c",
            "the cluster's name is the default authority"
        );
        assert_eq!(g.service, "pkg.Svc");
    }

    #[test]
    fn http_payloads_follow_envoy() {
        let hc = parse(
            "name: c\nhealth_checks: [{ timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, http_health_check: { path: /h, method: POST, send: { text: '6869' }, receive: [{ text: '6f6b' }, { binary: 'IQ==' }] } }]",
        )
        .unwrap()
        .unwrap();
        let Kind::Http(h) = hc.kind else { panic!() };
        assert_eq!(h.send.as_deref(), Some(&b"hi"[..]));
        assert_eq!(h.receive, vec![b"ok".to_vec(), b"!".to_vec()]);
        assert_eq!(h.buffer, 1024, "Envoy's default response_buffer_size");
        assert!(h.cluster_name.is_none());
        let hc = parse(
            "name: c\nhealth_checks: [{ timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, http_health_check: { path: /h, service_name_matcher: { prefix: web } } }]",
        )
        .unwrap()
        .unwrap();
        let Kind::Http(h) = hc.kind else { panic!() };
        let rule = h.cluster_name.unwrap();
        assert!(rule.matches("web-v1") && !rule.matches("api"));
        // A payload on a method without a body is refused, as Envoy refuses it.
        let err = parse(
            "name: c\nhealth_checks: [{ timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, http_health_check: { path: /h, send: { text: '6869' } } }]",
        )
        .unwrap_err();
        assert_eq!(err.0, "health_checks[0].http_health_check.send", "{err:?}");
    }

    #[test]
    fn grpc_checks_need_an_http2_cluster_as_in_envoy() {
        let check = "health_checks: [{ timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, grpc_health_check: {} }]";
        let h1: weft_xds_proto::envoy::config::cluster::v3::Cluster =
            weft_xds_proto::from_yaml(&format!("name: c\n{check}")).unwrap();
        let err = super::super::Cluster::from_xds(&h1).unwrap_err();
        assert_eq!(err.field, "health_checks[0].grpc_health_check", "{err:?}");
        let h2: weft_xds_proto::envoy::config::cluster::v3::Cluster = weft_xds_proto::from_yaml(&format!(
            "name: c\n{check}\ntyped_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n    explicit_http_config: {{ http2_protocol_options: {{}} }}"
        ))
        .unwrap();
        assert!(super::super::Cluster::from_xds(&h2).is_ok());
    }

    #[test]
    fn unsupported_or_invalid_checks_are_refused_by_field() {
        for (yaml, field) in [
            (
                "{ interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {} }",
                "health_checks[0].timeout",
            ),
            (
                "{ timeout: 1s, interval: 1s, healthy_threshold: 1, tcp_health_check: {} }",
                "health_checks[0].unhealthy_threshold",
            ),
            (
                "{ timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, grpc_health_check: { initial_metadata: [{ header: { key: 'bad key', value: x } }] } }",
                "health_checks[0].grpc_health_check.initial_metadata",
            ),
            (
                "{ timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, custom_health_check: { name: x } }",
                "health_checks[0].custom_health_check",
            ),
            (
                "{ timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: { path: x } }",
                "health_checks[0].http_health_check.path",
            ),
            (
                "{ timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: { path: /, expected_statuses: [{ start: 300, end: 200 }] } }",
                "health_checks[0].http_health_check.expected_statuses[0]",
            ),
            (
                "{ timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: { send: { text: 'zz' } } }",
                "health_checks[0].tcp_health_check.send",
            ),
        ] {
            let err = parse(&format!("name: c\nhealth_checks: [{yaml}]")).unwrap_err();
            assert_eq!(err.0, field, "{yaml}: {err:?}");
        }
    }

    #[test]
    fn thresholds_decide_transitions() {
        let hc = parse(
            "name: c\nhealth_checks: [{ timeout: 1s, interval: 1s, unhealthy_threshold: 2, healthy_threshold: 3, http_health_check: { path: /h, retriable_statuses: [{ start: 503, end: 504 }] } }]",
        )
        .unwrap()
        .unwrap();
        let h = ActiveHealth::new(true);
        assert!(h.is_failed() && h.is_pending());
        // The first success of a new host is enough.
        assert!(h.record(&hc, CheckResult::Healthy));
        assert!(!h.is_failed() && !h.is_pending());
        // A retriable failure counts against the threshold: two to fail.
        assert!(!h.record(&hc, CheckResult::Unhealthy { immediate: false }));
        assert!(h.record(&hc, CheckResult::Unhealthy { immediate: false }));
        assert!(h.is_failed());
        // Then three successes to come back.
        assert!(!h.record(&hc, CheckResult::Healthy));
        assert!(!h.record(&hc, CheckResult::Healthy));
        assert!(h.record(&hc, CheckResult::Healthy));
        // An unexpected status fails at once.
        assert!(h.record(&hc, CheckResult::Unhealthy { immediate: true }));
    }

    #[test]
    fn payloads_are_hex_and_matched_in_order() {
        let p = |t: &str| health_check::Payload {
            payload: Some(health_check::payload::Payload::Text(t.into())),
        };
        assert_eq!(payload(&p("50 49 4e 47"), "f").unwrap(), b"PING");
        assert!(payload(&p("5"), "f").is_err());
        assert!(contains_in_order(
            b"xxPONGyyOK",
            &[b"PONG".to_vec(), b"OK".to_vec()]
        ));
        assert!(!contains_in_order(
            b"OK PONG",
            &[b"PONG".to_vec(), b"OK".to_vec()]
        ));
    }
}
