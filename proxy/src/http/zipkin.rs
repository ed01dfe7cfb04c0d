//! Zipkin spans (`tracing.provider` `envoy.tracers.zipkin`), as Envoy's Zipkin tracer makes them.
//!
//! Every request of a connection manager with this provider gets a span context: the client's
//! B3 one (`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`, `x-b3-flags`,
//! or the single `b3` header) or a new root. The context goes upstream in the form it came in
//! (multiple headers unless the client sent `b3`). An egress listener's span is a CLIENT child of
//! the client's span; an ingress listener's is a SERVER span sharing the client's span id (with
//! `shared_span_context`, the default). Whether it is sampled is the client's `sampled` flag
//! (without one, `x-b3-flags: 1` samples), else the connection manager's trace decision. A
//! context that does not parse (a trace id that is not 16 or 32 hex digits, a span id without a
//! trace id) gets no span at all: nothing is added to the request, as Envoy's tracer gives up on
//! it.
//!
//! Sampled spans are finished when the answer has been sent, with Envoy's tags, and reported in
//! Zipkin's v2 JSON to `collector_endpoint` on `collector_cluster`: five at a time, or every five
//! seconds, whichever comes first (Envoy's `min_flush_spans` and `flush_interval_ms`).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use weft_xds_proto::envoy::config::trace::v3::ZipkinConfig;
use weft_xds_proto::envoy::config::trace::v3::zipkin_config::{
    CollectorEndpointVersion, TraceContextOption,
};
use weft_xds_proto::envoy::r#type::tracing::v3::CustomTag as XdsCustomTag;
use weft_xds_proto::envoy::r#type::tracing::v3::custom_tag;

use super::access_log::Entry;
use super::names::X_REQUEST_ID;

pub const PROVIDER: &str = "envoy.tracers.zipkin";
const TYPE_URL: &str = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig";
/// Spans gathered before they are sent (Envoy's `tracing.zipkin.min_flush_spans`).
const FLUSH_SPANS: usize = 5;
/// The longest spans wait to be sent (Envoy's `tracing.zipkin.flush_interval_ms`).
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a report may take (Envoy's `tracing.zipkin.request_timeout`).
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default `max_path_tag_length`.
pub const DEFAULT_MAX_PATH_TAG: usize = 256;

const X_B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const B3: HeaderName = HeaderName::from_static("b3");

/// What this proxy is, for the spans' `localEndpoint` and `node_id` tag: set once at start-up.
#[derive(Debug, Clone, Default)]
pub struct LocalNode {
    pub id: String,
    /// The node's `cluster`: the spans' service name.
    pub cluster: String,
    pub ipv4: Option<std::net::Ipv4Addr>,
}

static LOCAL: OnceLock<LocalNode> = OnceLock::new();

/// Envoy's `tracing.zipkin.*` counters, for every Zipkin tracer of the process (as Envoy's share
/// one scope).
#[derive(Debug, Default)]
pub struct ZipkinStats {
    /// A tracer was configured: the counters are shown from then on.
    pub in_use: std::sync::atomic::AtomicBool,
    pub spans_sent: crate::stats::Counter,
    pub timer_flushed: crate::stats::Counter,
    pub reports_skipped_no_cluster: crate::stats::Counter,
    pub reports_sent: crate::stats::Counter,
    pub reports_dropped: crate::stats::Counter,
    pub reports_failed: crate::stats::Counter,
}

pub static STATS: std::sync::LazyLock<ZipkinStats> = std::sync::LazyLock::new(ZipkinStats::default);

/// Records the node the spans name (weft-proxy's `main`, once).
pub fn set_local_node(node: LocalNode) {
    let _ = LOCAL.set(node);
}

/// This host's address as Envoy's local info has it: the one its route to elsewhere leaves
/// from (a UDP socket's connect sends nothing), else none.
pub fn host_ipv4() -> Option<std::net::Ipv4Addr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    match s.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

/// A custom tag of the connection manager's `tracing`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TagValue {
    Literal(String),
    /// An environment variable's value (read when the config is taken), else the default.
    Environment(String),
    RequestHeader(HeaderName, String),
}

/// A connection manager's Zipkin tracer and the spans it has yet to send.
#[derive(Debug)]
pub struct Zipkin {
    cluster: String,
    endpoint: String,
    host: String,
    trace_id_128bit: bool,
    shared: bool,
    tags: Vec<(String, TagValue)>,
    max_path: usize,
    /// The span context goes upstream (the connection manager's `no_context_propagation` is
    /// off).
    propagate: bool,
    /// `spawn_upstream_span`: the proxy is a hop of its own. Its span is a SERVER one whatever
    /// the listener's direction, and each upstream attempt has a CLIENT child span, whose
    /// context is what goes upstream.
    spawn: bool,
    pending: Mutex<Pending>,
}

impl PartialEq for Zipkin {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.cluster,
            &self.endpoint,
            &self.host,
            self.trace_id_128bit,
            self.shared,
            &self.tags,
            self.max_path,
            self.propagate,
            self.spawn,
        ) == (
            &o.cluster,
            &o.endpoint,
            &o.host,
            o.trace_id_128bit,
            o.shared,
            &o.tags,
            o.max_path,
            o.propagate,
            o.spawn,
        )
    }
}

impl Eq for Zipkin {}

#[derive(Debug, Default)]
struct Pending {
    spans: Vec<String>,
    /// The collector cluster as the last span found it.
    collector: Option<Arc<crate::cluster::Cluster>>,
    /// A flush timer runs.
    timer: bool,
}

impl Zipkin {
    /// The provider's config with the connection manager's `custom_tags` and
    /// `max_path_tag_length`. Errors name the field (under `tracing.`).
    pub fn from_xds(
        provider: &weft_xds_proto::envoy::config::trace::v3::tracing::Http,
        custom_tags: &[XdsCustomTag],
        max_path: Option<u32>,
        no_context_propagation: bool,
        spawn_upstream_span: bool,
    ) -> Result<Zipkin, (&'static str, String)> {
        use weft_xds_proto::envoy::config::trace::v3::tracing::http::ConfigType;
        let unsupported = |what: &str| {
            format!("{what} is not supported by this weft-proxy version (envoy.tracers.zipkin is)")
        };
        let any = match &provider.config_type {
            Some(ConfigType::TypedConfig(any)) => any,
            None => return Err(("provider.typed_config", "is required".into())),
        };
        if any.type_url != TYPE_URL {
            return Err(("provider.typed_config", unsupported(&any.type_url)));
        }
        let z: ZipkinConfig =
            weft_xds_proto::unpack(any).map_err(|e| ("provider.typed_config", e.to_string()))?;
        let field = "provider.typed_config";
        if z.collector_service.is_some() {
            return Err((
                field,
                "collector_service is not supported by this weft-proxy version (collector_cluster and collector_endpoint are)".into(),
            ));
        }
        if z.collector_cluster.is_empty() {
            return Err((field, "collector_cluster is required".into()));
        }
        if !z.collector_endpoint.starts_with('/') {
            return Err((
                field,
                format!(
                    "collector_endpoint {:?} must be a path (\"/api/v2/spans\")",
                    z.collector_endpoint
                ),
            ));
        }
        if http::uri::PathAndQuery::try_from(z.collector_endpoint.as_str()).is_err() {
            return Err((
                field,
                format!(
                    "collector_endpoint {:?} is not a valid path",
                    z.collector_endpoint
                ),
            ));
        }
        match CollectorEndpointVersion::try_from(z.collector_endpoint_version) {
            Ok(CollectorEndpointVersion::HttpJson) => {}
            _ => {
                return Err((
                    field,
                    "collector_endpoint_version: only HTTP_JSON is supported by this weft-proxy version".into(),
                ));
            }
        }
        if z.trace_context_option != TraceContextOption::UseB3 as i32 {
            return Err((
                field,
                "trace_context_option: only USE_B3 is supported by this weft-proxy version".into(),
            ));
        }
        #[allow(deprecated)]
        if z.split_spans_for_request {
            return Err((
                field,
                "split_spans_for_request is not supported by this weft-proxy version".into(),
            ));
        }
        if z.timestamp_trace_ids {
            return Err((
                field,
                "timestamp_trace_ids is not supported by this weft-proxy version".into(),
            ));
        }
        let host = if z.collector_hostname.is_empty() {
            z.collector_cluster.clone()
        } else {
            z.collector_hostname.clone()
        };
        if HeaderValue::from_str(&host).is_err() {
            return Err((
                field,
                format!("collector_hostname {host:?} is not a valid host"),
            ));
        }
        let mut tags = Vec::with_capacity(custom_tags.len());
        for t in custom_tags {
            if t.tag.is_empty() {
                return Err(("custom_tags", "a tag needs a name".into()));
            }
            let value = match &t.r#type {
                Some(custom_tag::Type::Literal(l)) => TagValue::Literal(l.value.clone()),
                Some(custom_tag::Type::Environment(e)) => TagValue::Environment(
                    std::env::var(&e.name).unwrap_or_else(|_| e.default_value.clone()),
                ),
                Some(custom_tag::Type::RequestHeader(h)) => TagValue::RequestHeader(
                    HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).map_err(
                        |_| ("custom_tags", format!("{:?} is not a header name", h.name)),
                    )?,
                    h.default_value.clone(),
                ),
                Some(custom_tag::Type::Metadata(m)) => {
                    use weft_xds_proto::envoy::r#type::metadata::v3::metadata_kind::Kind;
                    match m.kind.as_ref().and_then(|k| k.kind.as_ref()) {
                        // The request's dynamic metadata. No filter weft-proxy runs writes any
                        // (its RBAC has no shadow rules), so the tag is its default, as
                        // Envoy's is without the metadata (Istio's dry-run policy tags).
                        Some(Kind::Request(_)) => TagValue::Literal(m.default_value.clone()),
                        Some(_) => {
                            return Err((
                                "custom_tags",
                                format!(
                                    "{:?}: route, cluster and host metadata tags are not supported by this weft-proxy version (request metadata tags are)",
                                    t.tag
                                ),
                            ));
                        }
                        None => {
                            return Err((
                                "custom_tags",
                                format!("{:?}: a metadata tag needs its kind", t.tag),
                            ));
                        }
                    }
                }
                Some(_) | None => {
                    return Err((
                        "custom_tags",
                        format!(
                            "{:?}: only literal, environment and request_header tags are supported",
                            t.tag
                        ),
                    ));
                }
            };
            tags.push((t.tag.clone(), value));
        }
        STATS
            .in_use
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Zipkin {
            cluster: z.collector_cluster,
            endpoint: z.collector_endpoint,
            host,
            trace_id_128bit: z.trace_id_128bit,
            shared: z.shared_span_context.is_none_or(|b| b.value),
            tags,
            max_path: max_path.map_or(DEFAULT_MAX_PATH_TAG, |m| m as usize),
            propagate: !no_context_propagation,
            spawn: spawn_upstream_span,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// The collector cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}

/// A trace context read from the client's B3 headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Context {
    trace_high: Option<u64>,
    trace: u64,
    span: u64,
    parent: Option<u64>,
}

impl Context {
    /// The trace id in hex: 16 digits, or 32 for a 128-bit one.
    fn trace_id(&self) -> String {
        match self.trace_high {
            Some(high) => format!("{high:016x}{:016x}", self.trace),
            None => hex(self.trace),
        }
    }
}

/// What the client's B3 headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extracted {
    context: Option<Context>,
    sampled: Option<bool>,
    /// The client sent the single `b3` header.
    single: bool,
}

/// Sixteen hex digits, and nothing else (`from_str_radix` alone would take a sign).
fn hex_u64(s: &[u8]) -> Option<u64> {
    if s.len() != 16 || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// A 64- or 128-bit trace id.
fn trace_id(s: &[u8]) -> Option<(Option<u64>, u64)> {
    match s.len() {
        16 => Some((None, hex_u64(s)?)),
        32 => Some((Some(hex_u64(&s[..16])?), hex_u64(&s[16..])?)),
        _ => None,
    }
}

fn sampled_flag(v: &[u8]) -> Option<bool> {
    match v {
        b"1" | b"true" | b"d" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// Reads the B3 context: Err when it is there but does not parse.
fn extract(headers: &HeaderMap) -> Result<Extracted, ()> {
    if let Some(b3) = headers.get(&B3) {
        let v = b3.as_bytes();
        // `b3: {sampled}` alone, or `{trace}-{span}[-{sampled}[-{parent}]]`.
        if v.len() <= 1 {
            return Ok(Extracted {
                context: None,
                sampled: Some(sampled_flag(v).ok_or(())?),
                single: true,
            });
        }
        let mut parts = v.split(|b| *b == b'-');
        let (trace_high, trace) = trace_id(parts.next().ok_or(())?).ok_or(())?;
        let span = hex_u64(parts.next().ok_or(())?).ok_or(())?;
        let sampled = match parts.next() {
            Some(s) => Some(sampled_flag(s).ok_or(())?),
            None => None,
        };
        let parent = match parts.next() {
            Some(p) => Some(hex_u64(p).ok_or(())?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(());
        }
        return Ok(Extracted {
            context: Some(Context {
                trace_high,
                trace,
                span,
                parent,
            }),
            sampled,
            single: true,
        });
    }
    // `x-b3-sampled` decides; without it, `x-b3-flags: 1` (debug) samples.
    let sampled = match headers.get(&X_B3_SAMPLED) {
        Some(s) => sampled_flag(s.as_bytes()),
        None => headers
            .get(&X_B3_FLAGS)
            .is_some_and(|f| f.as_bytes() == b"1")
            .then_some(true),
    };
    let trace = headers.get(&X_B3_TRACE_ID);
    let span = headers.get(&X_B3_SPAN_ID);
    let context = match (trace, span) {
        (None, None) => None,
        (Some(t), Some(s)) => {
            let (trace_high, trace) = trace_id(t.as_bytes()).ok_or(())?;
            let span = hex_u64(s.as_bytes()).ok_or(())?;
            let parent = match headers.get(&X_B3_PARENT_SPAN_ID) {
                Some(p) => Some(hex_u64(p.as_bytes()).ok_or(())?),
                None => None,
            };
            Some(Context {
                trace_high,
                trace,
                span,
                parent,
            })
        }
        _ => return Err(()),
    };
    Ok(Extracted {
        context,
        sampled,
        single: false,
    })
}

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

/// Writes a span context into the request's B3 headers: the single `b3` header when the client
/// sent that form, else the multiple ones.
fn inject(headers: &mut HeaderMap, context: &Context, sampled: bool, single: bool) {
    let trace = context.trace_id();
    let sampled_text = if sampled { "1" } else { "0" };
    let set = |h: &mut HeaderMap, name: HeaderName, v: String| {
        if let Ok(v) = HeaderValue::try_from(v) {
            h.insert(name, v);
        }
    };
    if single {
        let mut b3 = format!("{trace}-{}-{sampled_text}", hex(context.span));
        if let Some(p) = context.parent {
            let _ = write!(b3, "-{}", hex(p));
        }
        set(headers, B3, b3);
    } else {
        set(headers, X_B3_TRACE_ID, trace);
        set(headers, X_B3_SPAN_ID, hex(context.span));
        if let Some(p) = context.parent {
            set(headers, X_B3_PARENT_SPAN_ID, hex(p));
        }
        headers.insert(X_B3_SAMPLED, HeaderValue::from_static(sampled_text));
    }
}

/// What a request's upstream attempts make their spans from (`spawn_upstream_span`): each
/// attempt is a CLIENT child of the request's span, and its context is what goes upstream.
#[derive(Debug, Clone)]
pub struct Spawner {
    tracer: Arc<Zipkin>,
    /// The request's own span.
    parent: Context,
    sampled: bool,
    single: bool,
    /// The connection manager's `custom_tags`, as the request's span has them.
    tags: Vec<(String, String)>,
    collector: Option<Arc<crate::cluster::Cluster>>,
}

/// An upstream attempt's span, from its start until it has the answer's head or has failed.
/// One dropped unfinished (the route's timeout, or the client, ended the request while it
/// waited) is reported as canceled, without an answer.
#[derive(Debug)]
pub struct UpstreamSpan {
    attempt: Option<Attempt>,
}

/// Where an upstream attempt goes, for its span.
#[derive(Debug)]
pub struct Upstream {
    pub cluster: Arc<crate::cluster::Cluster>,
    pub host: std::net::SocketAddr,
    pub protocol: crate::cluster::UpstreamProtocol,
}

#[derive(Debug)]
struct Attempt {
    spawner: Spawner,
    context: Context,
    /// The attempts before this one.
    retries: u32,
    start: SystemTime,
    started: Instant,
    to: Upstream,
}

impl Spawner {
    /// Starts the span of an upstream attempt to `to` (`retries` attempts came before it) and
    /// writes its context into the attempt's `headers`. Unsampled, only the context is made.
    pub fn attempt(&self, headers: &mut HeaderMap, retries: u32, to: Upstream) -> UpstreamSpan {
        let context = Context {
            span: fastrand::u64(..),
            parent: Some(self.parent.span),
            ..self.parent
        };
        if self.tracer.propagate {
            inject(headers, &context, self.sampled, self.single);
        }
        UpstreamSpan {
            attempt: self.sampled.then(|| Attempt {
                spawner: self.clone(),
                context,
                retries,
                start: SystemTime::now(),
                started: Instant::now(),
                to,
            }),
        }
    }
}

impl UpstreamSpan {
    /// Ends the attempt's span with the answer's `status` (0: none) and, when sampled, queues
    /// it for the collector. `canceled`: the proxy gave up on the attempt (it timed out, or its
    /// answer was retried).
    pub fn finish(mut self, status: u16, canceled: bool) {
        if let Some(a) = self.attempt.take() {
            a.report(status, canceled);
        }
    }
}

impl Drop for UpstreamSpan {
    fn drop(&mut self) {
        if let Some(a) = self.attempt.take() {
            a.report(0, true);
        }
    }
}

impl Attempt {
    /// The span, named `router <cluster> egress`, with Envoy's upstream tags.
    fn report(self, status: u16, canceled: bool) {
        let sp = &self.spawner;
        let local = LOCAL.get_or_init(LocalNode::default);
        // The cluster's `alt_stat_name` (its name when it has none), and its name.
        let (observed, cluster) = (&self.to.cluster.stat_name, &self.to.cluster.name);
        let mut out = String::with_capacity(768);
        let mut tags = span_head(
            &mut out,
            &self.context,
            &format!("router {observed} egress"),
            false,
            false,
            (self.start, self.started),
            local,
        );
        let protocol = match self.to.protocol {
            crate::cluster::UpstreamProtocol::Http1 => "HTTP/1.1",
            crate::cluster::UpstreamProtocol::Http2 => "HTTP/2",
        };
        tags.add(&mut out, "http.protocol", protocol);
        let host = self.to.host.to_string();
        tags.add(&mut out, "upstream_address", &host);
        tags.add(&mut out, "peer.address", &host);
        tags.add(&mut out, "component", "proxy");
        tags.add(&mut out, "upstream_cluster", observed);
        tags.add(&mut out, "upstream_cluster.name", cluster);
        tags.add(&mut out, "http.status_code", &status.to_string());
        // The attempt's own stream: the request's flags are not its.
        tags.add(&mut out, "response_flags", "-");
        if canceled {
            tags.add(&mut out, "canceled", "true");
        }
        if self.retries > 0 {
            tags.add(&mut out, "retry.count", &self.retries.to_string());
        }
        if status >= 500 || status == 0 {
            tags.add(&mut out, "error", "true");
        }
        for (k, v) in &sp.tags {
            tags.add(&mut out, k, v);
        }
        out.push_str("}}");
        sp.tracer.queue(out, sp.collector.clone());
    }
}

/// Writes a span's JSON up to its tags (ids, name, kind, times, endpoint, annotation) and opens
/// the tags' object.
fn span_head(
    out: &mut String,
    c: &Context,
    name: &str,
    server: bool,
    shared: bool,
    (start, started): (SystemTime, Instant),
    local: &LocalNode,
) -> Tags {
    let duration = started.elapsed().as_micros() as u64;
    let start = micros(start);
    let _ = write!(
        out,
        "{{\"traceId\":\"{}\",\"id\":\"{:016x}\"",
        c.trace_id(),
        c.span
    );
    if let Some(p) = c.parent {
        let _ = write!(out, ",\"parentId\":\"{p:016x}\"");
    }
    out.push_str(",\"name\":");
    json_str(out, name);
    let (kind, annotation) = if server {
        ("SERVER", "ss")
    } else {
        ("CLIENT", "cr")
    };
    let _ = write!(
        out,
        ",\"kind\":\"{kind}\",\"timestamp\":{start},\"duration\":{duration},\"localEndpoint\":{{\"serviceName\":"
    );
    json_str(out, &local.cluster);
    if let Some(ip) = local.ipv4 {
        let _ = write!(out, ",\"ipv4\":\"{ip}\"");
    }
    let _ = write!(
        out,
        ",\"port\":0}},\"annotations\":[{{\"value\":\"{annotation}\",\"timestamp\":{}}}]",
        start + duration
    );
    if shared {
        out.push_str(",\"shared\":true");
    }
    out.push_str(",\"tags\":{");
    Tags { first: true }
}

/// The tags of a span being written.
struct Tags {
    first: bool,
}

impl Tags {
    fn add(&mut self, out: &mut String, k: &str, v: &str) {
        if !self.first {
            out.push(',');
        }
        self.first = false;
        json_str(out, k);
        out.push(':');
        json_str(out, v);
    }
}

/// A span being timed: what its request said, for the report when its answer is done.
#[derive(Debug, Clone)]
pub struct Span {
    tracer: Arc<Zipkin>,
    collector: Option<Arc<crate::cluster::Cluster>>,
    context: Context,
    server: bool,
    name: String,
    start: SystemTime,
    started: Instant,
    url: String,
    downstream_cluster: String,
    client_trace_id: Option<String>,
    peer: Option<std::net::IpAddr>,
    tags: Vec<(String, String)>,
    /// A gRPC request's `grpc.*` tags (path, authority, content type, timeout).
    grpc: Vec<(&'static str, String)>,
    method: String,
    protocol: &'static str,
    user_agent: String,
    request_id: String,
    received: Received,
}

/// How much of the request's body came: known from the start, or counted as it streams.
#[derive(Debug, Clone)]
pub enum Received {
    Exact(u64),
    Counted(Arc<std::sync::atomic::AtomicU64>),
}

impl Received {
    fn bytes(&self) -> u64 {
        match self {
            Received::Exact(n) => *n,
            Received::Counted(c) => c.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// A request's span context once decided: its span is still to be made when sampled.
pub struct Decision {
    context: Context,
    server: bool,
    pub sampled: bool,
    /// The client sent the single `b3` header: the upstream gets that form too.
    single: bool,
}

/// The request facts a sampled span is made with.
pub struct Start<'a> {
    /// The route's decorator operation, else the authority.
    pub name: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub peer: Option<std::net::IpAddr>,
    pub collector: Option<Arc<crate::cluster::Cluster>>,
    pub method: &'a str,
    /// `HTTP/1.1`, `HTTP/2`...
    pub protocol: &'static str,
    pub received: Received,
}

impl Zipkin {
    /// Gives the request its span context (the B3 headers upstream), from the client's and
    /// the connection manager's trace decision (`traced`) on an egress or ingress listener:
    /// `None` when the client's context does not parse. The span is made when it is sampled
    /// (see `span`); with `spawn_upstream_span`, the upstream attempts' spans by a `Spawner`.
    pub fn decide(&self, headers: &mut HeaderMap, traced: bool, egress: bool) -> Option<Decision> {
        let Ok(found) = extract(headers) else {
            return None;
        };
        let sampled = found.sampled.unwrap_or(traced);
        let server = !egress || self.spawn;
        let context = match found.context {
            None => {
                let id = fastrand::u64(..);
                Context {
                    trace_high: self.trace_id_128bit.then(|| fastrand::u64(..)),
                    trace: id,
                    span: id,
                    parent: None,
                }
            }
            // An ingress span shares the client's span id.
            Some(c) if server && self.shared => c,
            Some(c) => Context {
                span: fastrand::u64(..),
                parent: Some(c.span),
                ..c
            },
        };
        if self.propagate {
            inject(headers, &context, sampled, found.single);
        }
        Some(Decision {
            context,
            server,
            sampled,
            single: found.single,
        })
    }

    /// The connection manager's `custom_tags`, read from the request's `headers`.
    fn custom_tags(&self, headers: &HeaderMap) -> Vec<(String, String)> {
        self.tags
            .iter()
            .filter_map(|(tag, v)| {
                let value = match v {
                    TagValue::Literal(l) | TagValue::Environment(l) => l.clone(),
                    TagValue::RequestHeader(h, default) => headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .map_or_else(|| default.clone(), str::to_string),
                };
                (!value.is_empty()).then(|| (tag.clone(), value))
            })
            .collect()
    }

    /// With `spawn_upstream_span`, what the request's upstream attempts make their spans from.
    pub fn spawner(
        self: &Arc<Self>,
        d: &Decision,
        headers: &HeaderMap,
        collector: Option<Arc<crate::cluster::Cluster>>,
    ) -> Option<Spawner> {
        self.spawn.then(|| Spawner {
            tracer: self.clone(),
            parent: d.context,
            sampled: d.sampled,
            single: d.single,
            tags: if d.sampled {
                self.custom_tags(headers)
            } else {
                Vec::new()
            },
            collector,
        })
    }

    /// The span of a sampled request, with what the request says (its `headers` as they go
    /// upstream), to report once the answer is done.
    pub fn span(
        self: &Arc<Self>,
        decision: Decision,
        headers: &HeaderMap,
        s: Start<'_>,
    ) -> Box<Span> {
        let Decision {
            context, server, ..
        } = decision;
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let mut url = format!("{}://{}{}", s.scheme, s.authority, s.path);
        if url.len() > self.max_path {
            let mut end = self.max_path;
            while !url.is_char_boundary(end) {
                end -= 1;
            }
            url.truncate(end);
        }
        let tags = self.custom_tags(headers);
        let mut grpc = Vec::new();
        if super::router::is_grpc(headers) {
            grpc.push(("grpc.path", s.path.to_string()));
            grpc.push(("grpc.authority", s.authority.to_string()));
            for (tag, name) in [
                ("grpc.content_type", "content-type"),
                ("grpc.timeout", "grpc-timeout"),
            ] {
                if let Some(v) = text(name) {
                    grpc.push((tag, v));
                }
            }
        }
        Box::new(Span {
            tracer: self.clone(),
            collector: s.collector,
            context,
            server,
            name: s.name.to_string(),
            start: SystemTime::now(),
            started: Instant::now(),
            url,
            downstream_cluster: text("x-envoy-downstream-service-cluster")
                .unwrap_or_else(|| "-".into()),
            client_trace_id: text("x-client-trace-id"),
            peer: s.peer,
            tags,
            grpc,
            method: s.method.to_string(),
            protocol: s.protocol,
            user_agent: text("user-agent").unwrap_or_else(|| "-".into()),
            request_id: text(X_REQUEST_ID.as_str()).unwrap_or_else(|| "-".into()),
            received: s.received,
        })
    }
}

/// `s` as a JSON string.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Span {
    /// The span in Zipkin's v2 JSON, finished with its answer (the access log entry's status,
    /// flags, bytes sent and upstream cluster).
    fn json(&self, e: &Entry, local: &LocalNode) -> String {
        let mut out = String::with_capacity(1024);
        let mut tags = span_head(
            &mut out,
            &self.context,
            &self.name,
            self.server,
            self.server && self.tracer.shared,
            (self.start, self.started),
            local,
        );
        let mut tag = |k: &str, v: &str| tags.add(&mut out, k, v);
        tag("component", "proxy");
        tag("node_id", &local.id);
        tag("guid:x-request-id", &self.request_id);
        if let Some(id) = &self.client_trace_id {
            tag("guid:x-client-trace-id", id);
        }
        tag("http.url", &self.url);
        tag("http.method", &self.method);
        tag("http.protocol", self.protocol);
        tag("downstream_cluster", &self.downstream_cluster);
        tag("user_agent", &self.user_agent);
        tag("request_size", &self.received.bytes().to_string());
        tag("response_size", &e.bytes_sent.to_string());
        tag("http.status_code", &e.status.to_string());
        tag("response_flags", &e.flags);
        if let Some(peer) = self.peer {
            tag("peer.address", &peer.to_string());
        }
        if let Some(cluster) = &e.upstream_cluster {
            tag("upstream_cluster", cluster);
            tag(
                "upstream_cluster.name",
                e.upstream_cluster_raw.as_deref().unwrap_or(cluster),
            );
        }
        for (k, v) in &self.grpc {
            tag(k, v);
        }
        // The answer's gRPC status: a trailers-only answer's head, then its trailers (which
        // win). A status that means the server failed marks the span as an error, as Envoy.
        let mut grpc_error = false;
        let mut status = None;
        let mut message = None;
        for map in [Some(&e.response_headers), e.response_trailers.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(code) = super::access_log::grpc_status(map) {
                status = map.get(super::names::GRPC_STATUS);
                message = map.get(super::names::GRPC_MESSAGE).or(message);
                grpc_error |= matches!(code, 2 | 4 | 8 | 12 | 13 | 14 | 15);
            }
        }
        for (k, v) in [("grpc.status_code", status), ("grpc.message", message)] {
            if let Some(v) = v.and_then(|v| v.to_str().ok()) {
                tag(k, v);
            }
        }
        if e.status >= 500 || e.status == 0 || grpc_error {
            tag("error", "true");
        }
        for (k, v) in &self.tags {
            tag(k, v);
        }
        out.push_str("}}");
        out
    }

    /// Ends the span with its answer (the request's access log entry) and queues it for the
    /// collector.
    pub fn finish(self: Box<Self>, e: &Entry) {
        let local = LOCAL.get_or_init(LocalNode::default);
        let json = self.json(e, local);
        self.tracer.queue(json, self.collector.clone());
    }
}

impl Zipkin {
    /// Queues a finished span's JSON: sent with others once five are waiting, else by the flush
    /// timer.
    fn queue(self: &Arc<Self>, json: String, collector: Option<Arc<crate::cluster::Cluster>>) {
        let full = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.spans.push(json);
            if collector.is_some() {
                p.collector = collector;
            }
            if !p.timer {
                p.timer = true;
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(flush_every(Arc::downgrade(self)));
                }
            }
            (p.spans.len() >= FLUSH_SPANS).then(|| take(&mut p))
        };
        if let Some((spans, collector)) = full {
            self.send(spans, collector);
        }
    }
}

fn take(p: &mut Pending) -> (Vec<String>, Option<Arc<crate::cluster::Cluster>>) {
    (std::mem::take(&mut p.spans), p.collector.clone())
}

/// Sends what is pending every flush interval, while the tracer's config is in use.
async fn flush_every(tracer: Weak<Zipkin>) {
    loop {
        tokio::time::sleep(FLUSH_INTERVAL).await;
        let Some(t) = tracer.upgrade() else { return };
        STATS.timer_flushed.inc();
        let due = {
            let mut p = t.pending.lock().unwrap_or_else(|p| p.into_inner());
            (!p.spans.is_empty()).then(|| take(&mut p))
        };
        if let Some((spans, collector)) = due {
            t.send(spans, collector);
        }
    }
}

impl Zipkin {
    /// POSTs `spans` (a JSON array of them) to the collector; a report that fails is dropped,
    /// as Envoy drops it.
    fn send(&self, spans: Vec<String>, collector: Option<Arc<crate::cluster::Cluster>>) {
        let Some(cluster) = collector else {
            tracing::debug!(cluster = %self.cluster, "zipkin collector cluster not found: spans dropped");
            STATS.reports_skipped_no_cluster.inc();
            return;
        };
        STATS.spans_sent.add(spans.len() as u64);
        let body = Bytes::from(format!("[{}]", spans.join(",")));
        let mut req = Request::new(());
        *req.method_mut() = http::Method::POST;
        let Ok(uri) = http::Uri::try_from(self.endpoint.as_str()) else {
            return;
        };
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            HeaderName::from_static("x-envoy-internal"),
            HeaderValue::from_static("true"),
        );
        let (parts, ()) = req.into_parts();
        let Ok(head) = super::upstream_head(parts, &self.host, cluster.protocol) else {
            return;
        };
        // The collector accepts a report with `202` (Envoy counts anything else dropped).
        super::send_and_forget(cluster, head, body, REPORT_TIMEOUT, |status| match status {
            Some(202) => STATS.reports_sent.inc(),
            Some(_) => STATS.reports_dropped.inc(),
            None => STATS.reports_failed.inc(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn tracer(shared: bool) -> Arc<Zipkin> {
        Arc::new(Zipkin {
            cluster: "zipkin".into(),
            endpoint: "/api/v2/spans".into(),
            host: "zipkin".into(),
            trace_id_128bit: false,
            shared,
            tags: vec![("lit".into(), TagValue::Literal("v".into()))],
            max_path: 20,
            propagate: true,
            spawn: false,
            pending: Mutex::default(),
        })
    }

    impl Zipkin {
        /// `decide`, then `span` when sampled.
        fn start(
            self: &Arc<Self>,
            headers: &mut HeaderMap,
            (egress, traced, s): (bool, bool, Start<'_>),
        ) -> Option<Box<Span>> {
            let decision = self.decide(headers, traced, egress)?;
            decision.sampled.then(|| self.span(decision, headers, s))
        }
    }

    fn start(egress: bool, traced: bool) -> (bool, bool, Start<'static>) {
        let s = Start {
            name: "svc:80",
            scheme: "http",
            authority: "svc:80",
            path: "/a/very/long/path/indeed",
            peer: None,
            collector: None,
            method: "GET",
            protocol: "HTTP/1.1",
            received: Received::Exact(0),
        };
        (egress, traced, s)
    }

    #[test]
    fn b3_contexts_are_read_in_both_forms() {
        let multi = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "0"),
        ]);
        let got = extract(&multi).unwrap();
        assert_eq!(got.sampled, Some(false));
        assert!(!got.single);
        let c = got.context.unwrap();
        assert_eq!(c.trace_high, Some(0x463ac35c9f6413ad));
        assert_eq!(c.parent, Some(0x20000000000001));
        let single = headers(&[("b3", "80f198ee56343ba8-e457b5a2e4d86bd1-d-05e3ac9a4f6e3b90")]);
        let got = extract(&single).unwrap();
        assert_eq!(got.sampled, Some(true));
        assert!(got.single);
        assert_eq!(got.context.unwrap().parent, Some(0x05e3ac9a4f6e3b90));
        assert_eq!(
            extract(&headers(&[("b3", "0")])).unwrap(),
            Extracted {
                context: None,
                sampled: Some(false),
                single: true
            }
        );
        // Debug samples when `x-b3-sampled` does not say (as Envoy: it does not override it).
        let debug = headers(&[("x-b3-flags", "1")]);
        assert_eq!(extract(&debug).unwrap().sampled, Some(true));
        let debug = headers(&[("x-b3-flags", "1"), ("x-b3-sampled", "0")]);
        assert_eq!(extract(&debug).unwrap().sampled, Some(false));
        // Contexts that do not parse.
        for bad in [
            headers(&[("x-b3-traceid", "zz"), ("x-b3-spanid", "a2fb4a1d1a96d312")]),
            headers(&[("x-b3-spanid", "a2fb4a1d1a96d312")]),
            headers(&[("x-b3-traceid", "a2fb4a1d1a96d312")]),
            headers(&[("b3", "x")]),
            headers(&[(
                "b3",
                "a2fb4a1d1a96d312-a2fb4a1d1a96d312-1-a2fb4a1d1a96d312-1",
            )]),
            headers(&[("b3", "a2fb4a1d1a96d312-12")]),
            headers(&[
                ("x-b3-traceid", "+2fb4a1d1a96d312"),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ]),
            headers(&[
                ("x-b3-traceid", "a2fb4a1d1a96d312"),
                ("x-b3-spanid", "+2fb4a1d1a96d312"),
            ]),
        ] {
            assert_eq!(extract(&bad), Err(()), "{bad:?}");
        }
    }

    #[test]
    fn spans_are_children_on_egress_and_shared_on_ingress() {
        let z = tracer(true);
        let incoming = [
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ];
        // Egress: a new span under the client's.
        let mut h = headers(&incoming);
        let span = z.start(&mut h, start(true, true)).unwrap();
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_ne!(h["x-b3-spanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!span.server);
        // Ingress: the client's span id, shared.
        let mut h = headers(&incoming);
        let span = z.start(&mut h, start(false, true)).unwrap();
        assert_eq!(h["x-b3-spanid"], "a2fb4a1d1a96d312");
        assert!(h.get("x-b3-parentspanid").is_none());
        assert!(span.server);
        // Not shared: a child on ingress too.
        let mut h = headers(&incoming);
        tracer(false).start(&mut h, start(false, true)).unwrap();
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        // A root: trace id and span id the same; not sampled, no span to report.
        let mut h = HeaderMap::new();
        assert!(z.start(&mut h, start(true, false)).is_none());
        assert_eq!(h["x-b3-traceid"], h["x-b3-spanid"]);
        assert_eq!(h["x-b3-sampled"], "0");
        // The client's `sampled` wins over the trace decision.
        let mut h = headers(&[("x-b3-sampled", "1")]);
        assert!(z.start(&mut h, start(true, false)).is_some());
        // `b3` in, `b3` out.
        let mut h = headers(&[("b3", "0")]);
        assert!(z.start(&mut h, start(true, true)).is_none());
        let b3 = h["b3"].to_str().unwrap().to_string();
        assert!(b3.ends_with("-0") && b3.len() == 16 + 1 + 16 + 2, "{b3}");
        assert!(h.get("x-b3-traceid").is_none());
        // A broken context: nothing added.
        let mut h = headers(&[("x-b3-traceid", "zz"), ("x-b3-spanid", "a2fb4a1d1a96d312")]);
        assert!(z.start(&mut h, start(true, true)).is_none());
        assert!(h.get("x-b3-sampled").is_none());
    }

    #[test]
    fn a_finished_span_has_envoys_fields_and_tags() {
        let z = tracer(true);
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
            ("user-agent", "ua/1"),
        ]);
        let mut s = start(false, false);
        s.2.peer = Some("10.0.0.9".parse().unwrap());
        let span = z.start(&mut h, s).unwrap();
        let e = Entry {
            status: 503,
            flags: "UH".into(),
            bytes_sent: 19,
            upstream_cluster: Some("backend".into()),
            ..Default::default()
        };
        let local = LocalNode {
            id: "node-1".into(),
            cluster: "svc.ns".into(),
            ipv4: Some("10.1.2.3".parse().unwrap()),
        };
        let v: serde_json::Value = serde_json::from_str(&span.json(&e, &local)).unwrap();
        assert_eq!(v["traceId"], "463ac35c9f6413ad");
        assert_eq!(v["id"], "a2fb4a1d1a96d312");
        assert_eq!(v["kind"], "SERVER");
        assert_eq!(v["shared"], true);
        assert_eq!(v["name"], "svc:80");
        assert_eq!(v["localEndpoint"]["serviceName"], "svc.ns");
        assert_eq!(v["localEndpoint"]["ipv4"], "10.1.2.3");
        assert_eq!(v["annotations"][0]["value"], "ss");
        let t = &v["tags"];
        assert_eq!(t["http.url"], "http://svc:80/a/very");
        assert_eq!(t["http.status_code"], "503");
        assert_eq!(t["error"], "true");
        assert_eq!(t["response_flags"], "UH");
        assert_eq!(t["upstream_cluster.name"], "backend");
        assert_eq!(t["user_agent"], "ua/1");
        assert_eq!(t["peer.address"], "10.0.0.9");
        assert_eq!(t["node_id"], "node-1");
        assert_eq!(t["lit"], "v");
        assert!(v.get("parentId").is_none());
        // Names and tags that need escaping stay valid JSON.
        let mut h = HeaderMap::new();
        let mut s = start(true, true);
        s.2.name = "a \"quoted\" \\ name\u{1}";
        let span = z.start(&mut h, s).unwrap();
        let v: serde_json::Value = serde_json::from_str(&span.json(&e, &local)).unwrap();
        assert_eq!(v["name"], "a \"quoted\" \\ name\u{1}");
        assert_eq!(v["kind"], "CLIENT");
        assert_eq!(v["traceId"], v["id"]);
    }

    #[test]
    fn spawned_upstream_spans_are_children_with_their_own_context() {
        let mut z = Arc::into_inner(tracer(true)).unwrap();
        z.spawn = true;
        let z = Arc::new(z);
        // An egress listener's span is a SERVER one when the proxy spawns upstream spans.
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let d = z.decide(&mut h, true, true).unwrap();
        assert!(d.server && d.sampled);
        let spawner = z.spawner(&d, &h, None).unwrap();
        let xds: weft_xds_proto::envoy::config::cluster::v3::Cluster =
            weft_xds_proto::from_yaml("name: outbound|80||svc\nalt_stat_name: svc").unwrap();
        let cluster = Arc::new(crate::cluster::Cluster::from_xds(&xds).unwrap());
        let to = || Upstream {
            cluster: cluster.clone(),
            host: "10.0.0.7:8080".parse().unwrap(),
            protocol: crate::cluster::UpstreamProtocol::Http2,
        };
        let first = spawner.attempt(&mut h, 0, to());
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        let first_id = h["x-b3-spanid"].clone();
        assert_ne!(first_id, "a2fb4a1d1a96d312");
        // Each attempt has a span of its own.
        let second = spawner.attempt(&mut h, 1, to());
        assert_ne!(h["x-b3-spanid"], first_id);
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad");
        first.finish(503, true);
        second.finish(200, false);
        // One dropped unfinished (the request ended while it waited): canceled, no answer.
        drop(spawner.attempt(&mut h, 2, to()));
        let spans: Vec<serde_json::Value> = z
            .pending
            .lock()
            .unwrap()
            .spans
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        assert_eq!(spans.len(), 3);
        let (a, b, c) = (&spans[0], &spans[1], &spans[2]);
        assert_eq!(a["kind"], "CLIENT");
        assert_eq!(a["name"], "router svc egress");
        assert_eq!(a["parentId"], "a2fb4a1d1a96d312");
        assert_eq!(a["tags"]["canceled"], "true");
        assert_eq!(a["tags"]["error"], "true");
        assert_eq!(a["tags"]["upstream_address"], "10.0.0.7:8080");
        assert_eq!(a["tags"]["upstream_cluster.name"], "outbound|80||svc");
        assert_eq!(a["tags"]["upstream_cluster"], "svc");
        assert_eq!(a["tags"]["http.protocol"], "HTTP/2");
        assert_eq!(a["tags"]["lit"], "v");
        assert!(a["tags"].get("retry.count").is_none());
        assert_eq!(b["tags"]["retry.count"], "1");
        assert!(b["tags"].get("canceled").is_none() && b["tags"].get("error").is_none());
        assert_eq!(c["tags"]["canceled"], "true");
        assert_eq!(c["tags"]["http.status_code"], "0");
        assert_eq!(c["tags"]["retry.count"], "2");
        // Not sampled: the context still goes upstream, nothing is reported.
        let mut h = headers(&[("x-b3-sampled", "0")]);
        let d = z.decide(&mut h, true, true).unwrap();
        let spawner = z.spawner(&d, &h, None).unwrap();
        spawner.attempt(&mut h, 0, to()).finish(200, false);
        assert_eq!(h["x-b3-sampled"], "0");
        assert_eq!(z.pending.lock().unwrap().spans.len(), 3);
        // Without `spawn_upstream_span`, no spawner.
        let plain = tracer(true);
        let d = plain.decide(&mut HeaderMap::new(), true, true).unwrap();
        assert!(!d.server && plain.spawner(&d, &HeaderMap::new(), None).is_none());
    }

    #[test]
    fn grpc_requests_get_envoys_grpc_tags() {
        let z = tracer(true);
        let local = LocalNode::default();
        let tags = |request: &[(&'static str, &str)], head: &[(&'static str, &str)], trailers| {
            let mut h = headers(request);
            let span = z.start(&mut h, start(true, true)).unwrap();
            let e = Entry {
                status: 200,
                response_headers: headers(head),
                response_trailers: trailers,
                ..Default::default()
            };
            let v: serde_json::Value = serde_json::from_str(&span.json(&e, &local)).unwrap();
            v["tags"].clone()
        };
        let grpc = [("content-type", "application/grpc"), ("grpc-timeout", "5S")];
        // Status and message in the trailers; a client's error is not the span's.
        let t = tags(
            &grpc,
            &[],
            Some(headers(&[
                ("grpc-status", "5"),
                ("grpc-message", "no such"),
            ])),
        );
        assert_eq!(t["grpc.path"], "/a/very/long/path/indeed");
        assert_eq!(t["grpc.authority"], "svc:80");
        assert_eq!(t["grpc.content_type"], "application/grpc");
        assert_eq!(t["grpc.timeout"], "5S");
        assert_eq!(t["grpc.status_code"], "5");
        assert_eq!(t["grpc.message"], "no such");
        assert!(t.get("error").is_none(), "{t}");
        // Trailers-only: from the head; UNAVAILABLE is the server's error.
        let t = tags(&grpc, &[("grpc-status", "14")], None);
        assert_eq!(t["grpc.status_code"], "14");
        assert!(t.get("grpc.message").is_none());
        assert_eq!(t["error"], "true");
        // The trailers win over the head, the head's message stays when they have none.
        let t = tags(
            &grpc,
            &[("grpc-status", "14"), ("grpc-message", "first")],
            Some(headers(&[("grpc-status", "0")])),
        );
        assert_eq!(t["grpc.status_code"], "0");
        assert_eq!(t["grpc.message"], "first");
        // Not a gRPC request: no request tags; an answer's status is tagged all the same.
        let t = tags(
            &[("content-type", "application/grpc-web")],
            &[("grpc-status", "13")],
            None,
        );
        assert!(t.get("grpc.path").is_none(), "{t}");
        assert_eq!(t["grpc.status_code"], "13");
        assert_eq!(t["error"], "true");
    }

    #[test]
    fn configs_are_checked_by_field() {
        use weft_xds_proto::envoy::config::trace::v3::tracing::{Http, http::ConfigType};
        let provider = |z: ZipkinConfig| Http {
            name: PROVIDER.into(),
            config_type: Some(ConfigType::TypedConfig(weft_xds_proto::pack(&z))),
        };
        let good = ZipkinConfig {
            collector_cluster: "zipkin".into(),
            collector_endpoint: "/api/v2/spans".into(),
            collector_endpoint_version: CollectorEndpointVersion::HttpJson as i32,
            ..Default::default()
        };
        let z = Zipkin::from_xds(&provider(good.clone()), &[], None, false, false).unwrap();
        assert_eq!(
            (z.host.as_str(), z.shared, z.max_path),
            ("zipkin", true, 256)
        );
        for (bad, why) in [
            (
                ZipkinConfig {
                    collector_endpoint_version: CollectorEndpointVersion::HttpProto as i32,
                    ..good.clone()
                },
                "HTTP_JSON",
            ),
            (
                ZipkinConfig {
                    collector_cluster: String::new(),
                    ..good.clone()
                },
                "collector_cluster",
            ),
            (
                ZipkinConfig {
                    collector_endpoint: "api".into(),
                    ..good.clone()
                },
                "collector_endpoint",
            ),
            (
                ZipkinConfig {
                    trace_context_option: TraceContextOption::UseB3WithW3cPropagation as i32,
                    ..good.clone()
                },
                "USE_B3",
            ),
        ] {
            let err = Zipkin::from_xds(&provider(bad), &[], None, false, false).unwrap_err();
            assert!(err.1.contains(why), "{err:?}");
        }
        // Metadata tags: of the request's metadata (Istio's dry-run policy tags), which no
        // filter of weft-proxy's writes, so their default; of other kinds, refused.
        use weft_xds_proto::envoy::r#type::metadata::v3::{MetadataKind, metadata_kind};
        let metadata = |kind: Option<metadata_kind::Kind>, default: &str| XdsCustomTag {
            tag: "m".into(),
            r#type: Some(custom_tag::Type::Metadata(custom_tag::Metadata {
                kind: Some(MetadataKind { kind }),
                default_value: default.into(),
                ..Default::default()
            })),
        };
        let request = || Some(metadata_kind::Kind::Request(Default::default()));
        let z = Zipkin::from_xds(
            &provider(good.clone()),
            &[metadata(request(), ""), metadata(request(), "d")],
            None,
            false,
            false,
        )
        .unwrap();
        assert_eq!(
            z.custom_tags(&HeaderMap::new()),
            [("m".to_string(), "d".to_string())]
        );
        for bad in [
            metadata(None, ""),
            metadata(Some(metadata_kind::Kind::Route(Default::default())), ""),
        ] {
            let err =
                Zipkin::from_xds(&provider(good.clone()), &[bad], None, false, false).unwrap_err();
            assert_eq!(err.0, "custom_tags", "{err:?}");
        }
    }
}
