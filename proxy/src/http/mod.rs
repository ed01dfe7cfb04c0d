//! The HTTP connection manager: serves HTTP/1.1 and h2c (prior knowledge, detected from the
//! connection preface) on a listener, and proxies each request along the route its table picks.
//! `proxy_request` is the whole request path in one function.

pub mod access_log;
mod coalesce;
mod h2server;
pub use h2server::RequestBody as H2RequestBody;
pub mod cors;
pub mod fault;
pub mod forwarded;
pub mod hash;
pub mod local_ratelimit;
pub mod normalize;
pub mod retry;
pub mod rewrite;
pub mod router;
mod server;
pub mod timeouts;
pub mod trace;
pub mod upgrade;
pub mod zipkin;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::cluster::{DownstreamBody, UpstreamHead};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_filter,
};

use crate::Rejection;
use crate::cluster::{UpstreamBody, UpstreamProtocol};
use crate::state::Proxy;
use crate::stats::{GaugeGuard, HttpStats};
use router::{Action, RouteTable};

pub type ProxyBody = Either<crate::cluster::UpstreamResponseBody, Full<Bytes>>;

/// Where a connection manager gets its routes.
#[derive(Debug)]
pub enum RouteSource {
    /// From RDS, by route configuration name.
    Rds(String),
    /// Inline in the listener.
    Static(Arc<RouteTable>),
}

#[derive(Debug)]
pub struct ConnectionManager {
    pub stat_prefix: String,
    /// Present when the chain has the fault filter: its own config (routes may override it).
    pub fault_filter: Option<fault::Fault>,
    /// Whether the chain has the CORS filter (policies come with the routes).
    pub cors_filter: bool,
    pub routes: RouteSource,
    pub stats: Arc<HttpStats>,
    /// `upgrade_configs` allows WebSocket upgrades.
    pub websocket: bool,
    /// `http_protocol_options.accept_http_10`: HTTP/1.0 requests are served (else refused with
    /// 426, as Envoy does by default).
    pub accept_http_10: bool,
    /// `access_log`: where each request is logged (None: not logged).
    pub access_logs: Option<access_log::Loggers>,
    /// RBAC filters, in chain order (AuthorizationPolicy: DENY, then ALLOW).
    pub rbac: Vec<crate::rbac::Engine>,
    /// Present when the chain has the local rate limit filter: its own config (routes and
    /// virtual hosts may replace it).
    pub local_rate_limit: Option<Arc<local_ratelimit::LocalRateLimit>>,
    /// `server_name` and `server_header_transformation`: the `server` header of every answer.
    pub server_header: ServerHeader,
    /// The router's `suppress_envoy_headers` is off: upstream answers carry
    /// `x-envoy-upstream-service-time`.
    pub envoy_headers: bool,
    /// `x-forwarded-*`, internal requests, `x-request-id` and `x-forwarded-client-cert`.
    pub forwarding: forwarded::Forwarding,
    /// `normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`.
    pub paths: normalize::PathNormalization,
    /// Idle, duration and request limits of connections; stream and request timeouts.
    pub timeouts: Arc<timeouts::Timeouts>,
    /// `max_request_headers_kb` (60 KiB by default): a larger request head is answered 431.
    pub max_request_head: usize,
    /// `http2_protocol_options`: what HTTP/2 clients are told in SETTINGS.
    pub http2: h2server::Settings,
    /// `tracing` (without a provider): the trace decision written into `x-request-id`.
    pub tracing: Option<trace::Tracing>,
}

/// What the connection manager does with a response's `server` header, as Envoy.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerHeader {
    /// OVERWRITE (the default): always this value.
    Overwrite(HeaderValue),
    /// APPEND_IF_ABSENT: this value when the response has none.
    AppendIfAbsent(HeaderValue),
    /// PASS_THROUGH: the upstream's, or none.
    PassThrough,
}

impl ServerHeader {
    fn from_xds(hcm: &HttpConnectionManager) -> Result<ServerHeader, (&'static str, String)> {
        use http_connection_manager::ServerHeaderTransformation as T;
        let name = if hcm.server_name.is_empty() {
            "envoy"
        } else {
            &hcm.server_name
        };
        // The usual names are static values, which clone without touching a reference count.
        let value = match name {
            "envoy" => HeaderValue::from_static("envoy"),
            "istio-envoy" => HeaderValue::from_static("istio-envoy"),
            other => HeaderValue::from_str(other).map_err(|_| {
                (
                    "server_name",
                    format!("{other:?} is not a valid header value"),
                )
            })?,
        };
        match T::try_from(hcm.server_header_transformation) {
            Ok(T::Overwrite) => Ok(ServerHeader::Overwrite(value)),
            Ok(T::AppendIfAbsent) => Ok(ServerHeader::AppendIfAbsent(value)),
            Ok(T::PassThrough) => Ok(ServerHeader::PassThrough),
            Err(_) => Err((
                "server_header_transformation",
                format!("unknown value {}", hcm.server_header_transformation),
            )),
        }
    }

    fn apply(&self, headers: &mut HeaderMap) {
        match self {
            ServerHeader::Overwrite(v) => {
                headers.insert(header::SERVER, v.clone());
            }
            ServerHeader::AppendIfAbsent(v) => {
                if !headers.contains_key(header::SERVER) {
                    headers.insert(header::SERVER, v.clone());
                }
            }
            ServerHeader::PassThrough => {}
        }
    }
}

const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
use weft_xds_proto::envoy::extensions::filters::http::router::v3::Router as RouterConfig;

impl ConnectionManager {
    /// Requests get Zipkin spans (`tracing.provider`): the answer's upstream and the request
    /// body's size are kept for them.
    fn reports_spans(&self) -> bool {
        self.tracing.as_ref().is_some_and(|t| t.zipkin.is_some())
    }

    pub fn from_xds(
        listener: &str,
        hcm: &HttpConnectionManager,
    ) -> Result<ConnectionManager, Rejection> {
        let reject = |field: &str, reason: String| {
            Rejection::new(
                "Listener",
                listener,
                format!("http_connection_manager.{field}"),
                reason,
            )
        };
        use http_connection_manager::CodecType;
        match CodecType::try_from(hcm.codec_type) {
            Ok(CodecType::Auto | CodecType::Http1 | CodecType::Http2) => {}
            _ => {
                return Err(reject(
                    "codec_type",
                    "only AUTO, HTTP1 and HTTP2 are supported".into(),
                ));
            }
        }
        // The fault filter (optional) then the router, last: other HTTP filters are not
        // implemented in this version.
        let mut fault_filter = None;
        let mut rbac = Vec::new();
        let mut cors_filter = false;
        let mut local_rate_limit = None;
        let mut router = false;
        let mut envoy_headers = true;
        for (i, f) in hcm.http_filters.iter().enumerate() {
            let field = format!("http_filters[{i}]");
            let any = match &f.config_type {
                Some(http_filter::ConfigType::TypedConfig(any)) => Some(any),
                _ => None,
            };
            let type_url = any.map(|a| a.type_url.as_str()).unwrap_or("");
            if router {
                return Err(reject(
                    &field,
                    "the router must be the last HTTP filter".into(),
                ));
            }
            if type_url == ROUTER || (type_url.is_empty() && f.name == "envoy.filters.http.router")
            {
                router = true;
                let cfg: RouterConfig = any
                    .map(weft_xds_proto::unpack)
                    .transpose()
                    .map_err(|e| reject(&field, e.to_string()))?
                    .unwrap_or_default();
                envoy_headers = !cfg.suppress_envoy_headers;
            } else if type_url == local_ratelimit::TYPE_URL {
                // weft runs its filters in one order: RBAC, local rate limit, CORS, fault.
                if cors_filter || fault_filter.is_some() {
                    return Err(reject(
                        &field,
                        "the local rate limit filter must come before the CORS and fault filters"
                            .into(),
                    ));
                }
                let cfg = any
                    .map(weft_xds_proto::unpack)
                    .transpose()
                    .map_err(|e| reject(&field, e.to_string()))?
                    .unwrap_or_default();
                local_rate_limit = Some(Arc::new(
                    local_ratelimit::LocalRateLimit::from_xds(&cfg)
                        .map_err(|(f2, r)| reject(&format!("{field}.{f2}"), r))?,
                ));
            } else if type_url == crate::rbac::HTTP_FILTER {
                if local_rate_limit.is_some() {
                    return Err(reject(
                        &field,
                        "RBAC filters must come before the local rate limit filter".into(),
                    ));
                }
                let cfg = any
                    .map(weft_xds_proto::unpack)
                    .transpose()
                    .map_err(|e| reject(&field, e.to_string()))?
                    .unwrap_or_default();
                rbac.push(
                    crate::rbac::http_filter(&cfg)
                        .map_err(|(f2, r)| reject(&format!("{field}.{f2}"), r))?,
                );
            } else if type_url == cors::FILTER_TYPE_URL {
                cors_filter = true;
            } else if type_url == fault::TYPE_URL {
                let cfg = any
                    .map(weft_xds_proto::unpack)
                    .transpose()
                    .map_err(|e| reject(&field, e.to_string()))?
                    .unwrap_or_default();
                fault_filter = Some(
                    fault::Fault::from_xds(&cfg)
                        .map_err(|(f2, r)| reject(&format!("{field}.{f2}"), r))?,
                );
            } else if !f.is_optional {
                return Err(reject(
                    &field,
                    format!(
                        "HTTP filter {:?} ({type_url}) is not supported by this weft-proxy version",
                        f.name
                    ),
                ));
            }
        }
        if !router {
            return Err(reject(
                "http_filters",
                "the router filter is required".into(),
            ));
        }
        let mut loggers = Vec::new();
        for (i, a) in hcm.access_log.iter().enumerate() {
            loggers.push(
                access_log::AccessLog::from_xds(a)
                    .map_err(|r| reject(&format!("access_log[{i}]"), r))?,
            );
        }
        let access_logs = (!loggers.is_empty()).then(|| Arc::new(loggers));
        let mut websocket = false;
        for (i, u) in hcm.upgrade_configs.iter().enumerate() {
            if !u.upgrade_type.eq_ignore_ascii_case("websocket") || !u.filters.is_empty() {
                return Err(reject(
                    &format!("upgrade_configs[{i}]"),
                    format!(
                        "only the websocket upgrade without filters is supported ({:?} given)",
                        u.upgrade_type
                    ),
                ));
            }
            websocket = u.enabled.is_none_or(|e| e.value);
        }
        let routes = match &hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
                RouteSource::Rds(rds.route_config_name.clone())
            }
            Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                RouteSource::Static(Arc::new(RouteTable::from_xds(rc)?))
            }
            _ => {
                return Err(reject(
                    "route_specifier",
                    "rds or route_config is required (scoped routes are not supported)".into(),
                ));
            }
        };
        // Fields that change what a request or an answer looks like, not implemented: refused
        // rather than served as if absent.
        for (field, set, what) in [
            (
                "local_reply_config",
                hcm.local_reply_config.is_some(),
                "custom local replies",
            ),
            (
                "strip_matching_host_port",
                hcm.strip_matching_host_port,
                "stripping the host's port",
            ),
            (
                "strip_any_host_port",
                hcm.strip_port_mode.is_some(),
                "stripping the host's port",
            ),
            (
                "strip_trailing_host_dot",
                hcm.strip_trailing_host_dot,
                "stripping the host's trailing dot",
            ),
            (
                "scheme_header_transformation",
                hcm.scheme_header_transformation
                    .as_ref()
                    .is_some_and(|t| t.transformation.is_some() || t.match_upstream),
                "rewriting the scheme",
            ),
            (
                "proxy_status_config",
                hcm.proxy_status_config.is_some(),
                "the proxy-status header",
            ),
            (
                "early_header_mutation_extensions",
                !hcm.early_header_mutation_extensions.is_empty(),
                "early header mutations",
            ),
        ] {
            if set {
                return Err(reject(
                    field,
                    format!("{what} is not supported by this weft-proxy version"),
                ));
            }
        }
        let server_header = ServerHeader::from_xds(hcm).map_err(|(f, r)| reject(f, r))?;
        let forwarding = forwarded::Forwarding::from_xds(hcm).map_err(|(f, r)| reject(f, r))?;
        let paths = normalize::PathNormalization::from_xds(hcm).map_err(|(f, r)| reject(f, r))?;
        let timeouts = Arc::new(timeouts::Timeouts::from_xds(hcm).map_err(|(f, r)| reject(&f, r))?);
        let tracing = trace::Tracing::from_hcm(hcm).map_err(|(f, r)| reject(f, r))?;
        let http2 = h2server::Settings::from_xds(hcm.http2_protocol_options.as_ref())
            .map_err(|(f, r)| reject(&format!("http2_protocol_options.{f}"), r))?;
        let max_request_head = match &hcm.max_request_headers_kb {
            None => 60 * 1024,
            // Envoy's bounds: 1 KiB to 8 MiB.
            Some(kb) if (1..=8192).contains(&kb.value) => kb.value as usize * 1024,
            Some(kb) => {
                return Err(reject(
                    "max_request_headers_kb",
                    format!("{} is not between 1 and 8192", kb.value),
                ));
            }
        };
        Ok(ConnectionManager {
            forwarding,
            paths,
            timeouts,
            max_request_head,
            http2,
            tracing,
            server_header,
            envoy_headers,
            stat_prefix: hcm.stat_prefix.clone(),
            fault_filter,
            rbac,
            local_rate_limit,
            cors_filter,
            websocket,
            accept_http_10: hcm
                .http_protocol_options
                .as_ref()
                .is_some_and(|o| o.accept_http_10),
            access_logs,
            routes,
            stats: Arc::new(HttpStats::default()),
        })
    }

    pub fn route_config_name(&self) -> Option<&str> {
        match &self.routes {
            RouteSource::Rds(n) => Some(n),
            RouteSource::Static(_) => None,
        }
    }
}

/// Serves one downstream connection (plain TCP, or TLS already terminated) until it closes.
/// Every request's path is given what the connection proved (`Downstream`).
pub async fn serve_connection<S>(
    proxy: Arc<Proxy>,
    hcm: Arc<ConnectionManager>,
    stream: S,
    down: crate::listener::Downstream,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    hcm.stats.downstream_cx_total.inc();
    let stats = hcm.stats.clone();
    let _active = GaugeGuard::new(&stats.downstream_cx_active);
    let local = down.local;
    let peer = down.peer;
    let down = Arc::new(down);
    let accept_http_10 = hcm.accept_http_10;
    let logged = hcm.access_logs.is_some();
    let traced = hcm.reports_spans();
    // A request refused before the request path starts (malformed, too large, HTTP/1.0 when not
    // accepted) is logged as Envoy logs a codec error: its status and `DPE`, no request fields.
    let refused = refused_logger(hcm.access_logs.clone(), hcm.stats.clone(), down.clone());
    // This hop's `x-forwarded-client-cert` element: one per connection (one client
    // certificate).
    let element = down
        .tls_peer
        .as_ref()
        .and_then(|p| hcm.forwarding.client_cert_element(p));
    let limits = hcm.timeouts.clone();
    let max_head = hcm.max_request_head;
    let http2 = hcm.http2.clone();
    // One request's handling, for weft-proxy's own HTTP/1.1 loop, its HTTP/2 server and hyper
    // alike.
    let handle = move |mut req: Request<DownstreamBody>| {
        let proxy = proxy.clone();
        let hcm = hcm.clone();
        let down = down.clone();
        // As Envoy's connection manager: the forwarding headers, and an id on every request
        // from here on (logs, upstream, retries), the client's own when it may keep it.
        let origin = hcm
            .forwarding
            .apply(req.headers_mut(), &down, element.as_ref());
        if !hcm.paths.is_off() {
            normalize_path(&hcm.paths, &mut req);
        }
        async move {
            let Some(loggers) = hcm.access_logs.clone() else {
                let mut resp = proxy_request(&proxy, &hcm, &down, &origin, &mut req).await;
                let deadline = resp.extensions_mut().remove::<BodyDeadline>();
                let idle = body_idle(&hcm, &mut resp);
                // A sampled span is finished from an entry of the answer alone.
                let log = traced_entry(&mut resp);
                return resp.map(|b| LoggedBody::new(b, log, deadline, idle));
            };
            // Boxed, here and in the body: the entry is ~500 bytes, which every request's
            // future and response would otherwise carry (and move) with logs off too.
            // Envoy logs the trusted client address (`x-forwarded-for`'s) as the remote one.
            let remote = match origin.remote {
                Some(ip) if origin.forwarded => Some(std::net::SocketAddr::new(ip, 0)),
                _ => peer,
            };
            let mut entry = Box::new(request_entry(&req, remote, local, &down));
            let mut resp = proxy_request(&proxy, &hcm, &down, &origin, &mut req).await;
            response_entry(&mut entry, &resp);
            if let Some(sent) = resp.extensions_mut().remove::<SentRequest>() {
                entry.request_headers = sent.headers;
                entry.path = sent.path;
                entry.authority = sent.authority;
            }
            if let Some(MarkedRequestId(id)) = resp.extensions_mut().remove() {
                entry.request_headers.insert(names::X_REQUEST_ID, id);
            }
            entry.span = resp.extensions_mut().remove::<Traced>().map(|t| t.0);
            let deadline = resp.extensions_mut().remove::<BodyDeadline>();
            let idle = body_idle(&hcm, &mut resp);
            // An upgraded connection's line is written when its session ends.
            if let Some(session) = resp.extensions_mut().remove::<upgrade::SessionLog>() {
                session.hand_over(entry, loggers);
                return resp.map(|b| LoggedBody::new(b, None, deadline, idle));
            }
            resp.map(|b| LoggedBody::new(b, Some((entry, loggers)), deadline, idle))
        }
    };
    // Plain HTTP/1.1 requests are served by weft-proxy's own loop; HTTP/2, upgrades and
    // streamed request bodies by hyper, from the first request that needs it.
    let stream = match server::serve(
        stream,
        limits.clone(),
        max_head,
        accept_http_10,
        &handle,
        refused,
    )
    .await
    {
        server::End::Closed => return,
        server::End::Handoff(stream) => stream,
    };
    // With access logs or spans, streamed request bodies are counted (`%BYTES_RECEIVED%`, the
    // span's `request_size`).
    let counted = logged || traced;
    // What is in flight, for the connection's idle and request limits.
    let streams = timeouts::Streams::new();
    let in_flight = streams.clone();
    let timed = limits.stream_idle.is_some() || limits.request.is_some();
    let lender = stream.is_http2().then(coalesce::Lender::default);
    let lend = lender.clone();
    // A stream's request path, whichever server read the request (hyper, or `h2server`).
    let open = move |req: Request<crate::cluster::RequestSource>| {
        let guard = in_flight.open();
        // A body still to come is timed by its progress (see `timeouts::answer_within`).
        let progress = (timed && !hyper::body::Body::is_end_stream(req.body()))
            .then(timeouts::BodyProgress::new);
        let mut req = req.map(|b| {
            Either::Left(crate::cluster::CountedBody::new(
                b,
                counted,
                progress.clone(),
            ))
        });
        if let Some(p) = progress {
            req.extensions_mut().insert(p);
        }
        // Boxed: moving a pointer is cheap, moving the request path's state is not.
        let resp = Box::pin(handle(req));
        let lend = lend.clone();
        AnswerOn {
            resp,
            stream: Some(guard),
            lend,
        }
    };
    if stream.is_http2() {
        // HTTP/2 alone, its writes gathered per poll of the connection (see `coalesce`).
        let (io, drain) = coalesce::coalesce(stream, lender.unwrap_or_default());
        // Its streams run in this task (see `h2server`).
        let builder = http2.builder(max_head as u32);
        let conn = h2server::Connection::new(io, &builder, move |req: Request<h2::RecvStream>| {
            let (parts, recv) = req.into_parts();
            let body = h2server::RequestBody::new(recv, &parts.headers);
            open(Request::from_parts(parts, body.into()))
        });
        let conn = timeouts::watch(conn, |c| c.graceful_shutdown(), streams, limits);
        if let Some(Err(e)) = coalesce::drive(conn, drain).await {
            tracing::debug!("downstream connection ended: {e}");
        }
        return;
    }
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let answer = open(req.map(Into::into));
        async move { Ok::<_, std::convert::Infallible>(answer.await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper times every wait for a head with this, idle keep-alive ones too (and ends the
        // connection without an answer): only `request_headers_timeout` is that strict; a head
        // that stalls otherwise is bounded by the connection's idle timeout (`watch`).
        .header_read_timeout(limits.request_headers)
        // hyper's smallest read buffer is 8 KiB.
        .max_buf_size(max_head.max(8192));
    builder
        .http2()
        .max_concurrent_streams(1024)
        .max_header_list_size(max_head as u32);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Some(Err(e)) = timeouts::watch(conn, |c| c.graceful_shutdown(), streams, limits).await {
        tracing::debug!("downstream connection ended: {e}");
    }
}

/// A stream's answer, with what its body keeps until it is sent: the stream's place among
/// those in flight, and where the connection borrows its large chunks (HTTP/2).
struct AnswerOn<F> {
    resp: Pin<Box<F>>,
    stream: Option<timeouts::StreamGuard>,
    lend: Option<coalesce::Lender>,
}

impl<F: Future<Output = Response<LoggedBody>>> Future for AnswerOn<F> {
    type Output = Response<LoggedBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        let mut resp = std::task::ready!(me.resp.as_mut().poll(cx));
        let body = resp.body_mut();
        body.stream = me.stream.take();
        body.lend = me.lend.take();
        Poll::Ready(resp)
    }
}

/// The stream idle timeout of an answer's body: its route's, else the connection manager's.
#[inline]
fn body_idle(hcm: &ConnectionManager, resp: &mut Response<ProxyBody>) -> Option<Duration> {
    match resp.extensions_mut().remove::<StreamIdle>() {
        Some(StreamIdle(idle)) => idle,
        None => hcm.timeouts.stream_idle,
    }
}

/// The request path: route, pick a cluster and endpoint, send upstream, count.
///
/// The request path's steps are functions returning an `async move` block, not `async fn`s:
/// an `async fn`'s future keeps each argument passed by value twice (as received, and as the
/// body's local it is moved into). The request itself is lent down (`&mut`) until the step
/// that takes it apart: a future keeps what it was given by value even after handing it on,
/// and the request (280 bytes) went down four levels. Every HTTP/2 stream's future is one
/// allocation of this state, copied whole when it is made: both made it 3 KB (40%) smaller.
#[allow(clippy::manual_async_fn)]
pub fn proxy_request(
    proxy: &Proxy,
    hcm: &ConnectionManager,
    down: &crate::listener::Downstream,
    origin: &forwarded::Origin,
    req: &mut Request<DownstreamBody>,
) -> impl std::future::Future<Output = Response<ProxyBody>> {
    async move {
        hcm.stats.downstream_rq_total.inc();
        let _active = GaugeGuard::new(&hcm.stats.downstream_rq_active);
        let grpc = router::is_grpc(req.headers());
        let progress = req
            .extensions()
            .get::<Arc<timeouts::BodyProgress>>()
            .cloned();
        let h1 = req.version() != Version::HTTP_2;
        // Pinned where it is made: moving the request path's future (several KB) into the timer's
        // would copy it on every request.
        let route_idle = timeouts::RouteIdle::default();
        // Filled only by what needs it (tracing, the request id on the answer): a pointer's room
        // in the request path's future otherwise.
        let notes: std::sync::OnceLock<Box<Notes>> = std::sync::OnceLock::new();
        // As Envoy's connection manager: the request's id goes back on the answer when the
        // connection manager says so or an internal request forces a trace.
        if hcm.forwarding.always_set_request_id
            || (origin.internal && req.headers().contains_key(names::X_ENVOY_FORCE_TRACE))
        {
            let _ = notes.set(Box::new(Notes {
                answer_id: req.headers().get(names::X_REQUEST_ID).cloned(),
                ..Notes::default()
            }));
        }
        let forward = std::pin::pin!(route_and_forward(
            proxy,
            hcm,
            down,
            origin,
            req,
            &route_idle,
            &notes
        ));
        let timed =
            timeouts::answer_within(&hcm.timeouts, progress.as_deref(), &route_idle, forward);
        let mut resp = match timed.await {
            Ok(resp) => resp,
            Err(late) => {
                match late {
                    timeouts::Expired::Request => hcm.stats.downstream_rq_timeout.inc(),
                    _ => hcm.stats.downstream_rq_idle_timeout.inc(),
                }
                let (status, body, flag, details) = late.reply();
                let mut resp = local_reply(status, body, flag, details);
                // The rest of the request will not be read: its HTTP/1.1 connection ends.
                if late != timeouts::Expired::Answer && progress.is_some() && h1 {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        };
        // The answer's body is timed by the route's idle timeout too.
        if route_idle.is_set() {
            resp.extensions_mut()
                .insert(StreamIdle(route_idle.apply(hcm.timeouts.stream_idle)));
        }
        if grpc {
            resp = grpc_local_reply(resp);
        }
        hcm.server_header.apply(resp.headers_mut());
        if let Some(notes) = notes.get() {
            notes.answer(hcm, &mut resp);
        }
        hcm.stats.downstream_rq_xx.record(resp.status().as_u16());
        resp
    }
}

/// The request's `x-request-id` after the trace decision changed it (for the access log).
#[derive(Clone)]
struct MarkedRequestId(HeaderValue);

/// What the request path learns for the answer and the access log.
#[derive(Default)]
struct Notes {
    /// The request's id as it came, for the answer.
    answer_id: Option<HeaderValue>,
    /// The request id as the trace decision marked it.
    marked_id: std::sync::OnceLock<HeaderValue>,
    /// The route's decorator operation, for the answer (ingress listeners with `tracing`).
    operation: std::sync::OnceLock<HeaderValue>,
    /// The local rate limit's `x-ratelimit-*` headers (`enable_x_ratelimit_headers`).
    rate_limit: std::sync::OnceLock<local_ratelimit::XRateLimit>,
    /// The request's sampled Zipkin span, finished when the answer is sent.
    span: std::sync::Mutex<Option<Box<zipkin::Span>>>,
}

/// A sampled span on its way from the request path to the answer's body.
#[derive(Clone)]
struct Traced(Box<zipkin::Span>);

impl Notes {
    fn answer(&self, hcm: &ConnectionManager, resp: &mut Response<ProxyBody>) {
        if let Some(id) = &self.answer_id {
            let id = self.marked_id.get().unwrap_or(id).clone();
            resp.headers_mut().insert(names::X_REQUEST_ID, id);
        }
        if let Some(op) = self.operation.get() {
            resp.headers_mut()
                .insert(names::X_ENVOY_DECORATOR_OPERATION, op.clone());
        }
        if let Some(told) = self.rate_limit.get() {
            for (name, value) in told.headers() {
                resp.headers_mut().append(name, value);
            }
        }
        // The access log shows the request's id as the trace decision left it.
        if let Some(id) = self.marked_id.get()
            && hcm.access_logs.is_some()
        {
            resp.extensions_mut().insert(MarkedRequestId(id.clone()));
        }
        if let Some(span) = self.span.lock().unwrap_or_else(|p| p.into_inner()).take() {
            resp.extensions_mut().insert(Traced(span));
        }
    }
}

/// Authorization, the virtual host and route, local rate limits and CORS (each may answer
/// here), then the rest of the request path within the route's timeout.
/// (An `async move` block, not an `async fn`: see `proxy_request`.)
#[allow(clippy::manual_async_fn)]
fn route_and_forward(
    proxy: &Proxy,
    hcm: &ConnectionManager,
    down: &crate::listener::Downstream,
    origin: &forwarded::Origin,
    req: &mut Request<DownstreamBody>,
    route_idle: &timeouts::RouteIdle,
    notes: &std::sync::OnceLock<Box<Notes>>,
) -> impl std::future::Future<Output = Response<ProxyBody>> {
    async move {
        let snapshot = proxy.snapshot();
        // 0. A path the connection manager refused (see `normalize_path`).
        if !hcm.paths.is_off()
            && let Some(refused) = req.extensions_mut().remove::<PathRefused>()
        {
            return refused.reply();
        }
        // 1. Route: virtual host by authority, then the first matching route.
        let Some(owner) = Authority::of(req) else {
            return local_reply(
                StatusCode::BAD_REQUEST,
                "missing host header",
                "DPE",
                "missing_host_header",
            );
        };
        // Read once: a `Host` value is checked again on each read.
        let authority = owner.as_str();
        let table = match &hcm.routes {
            RouteSource::Static(t) => Some(t.clone()),
            RouteSource::Rds(name) => snapshot.routes.get(name).cloned(),
        };
        if origin.envoy_headers {
            // An internal request's own retry and timeout settings, for the route to apply.
            if origin.internal
                && let Some(c) = retry::Controls::read(req.headers())
            {
                req.extensions_mut().insert(c);
            }
            strip_envoy_controls(req.headers_mut(), origin.internal);
        }
        if !origin.internal
            && let Some(t) = table.as_deref()
        {
            for name in &t.internal_only {
                req.headers_mut().remove(name);
            }
        }
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        // The route is found first: the trace decision takes its `tracing` (as Envoy's connection
        // manager decides before its filters run).
        let route = table.as_deref().and_then(|t| {
            t.route(&router::RequestView {
                method: req.method().as_str(),
                authority,
                path_and_query: path,
                headers: req.headers(),
            })
        });
        if let Some(tracing) = &hcm.tracing {
            let notes = notes.get_or_init(Box::default);
            let (marked, traced) = tracing.decide_counted(
                req.headers_mut(),
                route.and_then(|r| r.tracing.as_deref()),
                &hcm.stats,
            );
            if let Some(id) = marked {
                let _ = notes.marked_id.set(id);
            }
            // The route's operation goes upstream from an egress listener; an ingress listener
            // takes a client's own out of the request and answers with the route's otherwise.
            // Either names the span.
            let operation = route.and_then(|r| r.operation.as_ref());
            let propagated = operation.filter(|op| op.propagate).map(|op| &op.value);
            let mut client_operation = None;
            if tracing.egress {
                if let Some(op) = propagated {
                    req.headers_mut()
                        .insert(names::X_ENVOY_DECORATOR_OPERATION, op.clone());
                }
            } else {
                client_operation = req.headers_mut().remove(names::X_ENVOY_DECORATOR_OPERATION);
                if client_operation.is_none()
                    && let Some(op) = propagated
                {
                    let _ = notes.operation.set(op.clone());
                }
            }
            if let Some(z) = &tracing.zipkin
                && let Some(decision) = z.decide(req.headers_mut(), traced, tracing.egress)
            {
                let collector = snapshot.clusters.get(z.cluster()).cloned();
                // `spawn_upstream_span`: the upstream attempts make their own spans.
                if let Some(spawner) = z.spawner(&decision, req.headers(), collector.clone()) {
                    req.extensions_mut().insert(spawner);
                }
                if decision.sampled {
                    let start = zipkin::Start {
                        name: operation
                            .map(|op| &op.value)
                            .or(client_operation.as_ref())
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or(authority),
                        scheme: req
                            .headers()
                            .get(names::X_FORWARDED_PROTO)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("http"),
                        authority,
                        path: req
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str())
                            .unwrap_or("/"),
                        peer: down.peer.map(|p| p.ip()),
                        collector,
                        method: req.method().as_str(),
                        protocol: protocol_name(req.version()),
                        received: request_size(req),
                    };
                    let span = z.span(decision, req.headers(), start);
                    *notes.span.lock().unwrap_or_else(|p| p.into_inner()) = Some(span);
                }
            }
        }
        // Borrowed again: the trace decision wrote to the headers.
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        // 0. Authorization (RBAC filters, in order), before anything else looks at the request.
        if !hcm.rbac.is_empty() {
            let view = router::RequestView {
                method: req.method().as_str(),
                authority,
                path_and_query: path,
                headers: req.headers(),
            };
            let input = crate::rbac::Input {
                down,
                request: Some(&view),
                remote: origin.remote,
            };
            if let Some(denied) = hcm.rbac.iter().find_map(|e| e.denies(&input)) {
                hcm.stats.rbac_denied.inc();
                return local_reply(
                    StatusCode::FORBIDDEN,
                    "RBAC: access denied",
                    "RBAC",
                    format!("rbac_access_denied_matched_policy[{denied}]"),
                );
            }
        }
        let Some(route) = route else {
            hcm.stats.no_route.inc();
            return local_reply(StatusCode::NOT_FOUND, "", "NR", "route_not_found");
        };
        if let Action::Forward(a) = &route.action
            && let Some(idle) = a.idle_timeout
        {
            route_idle.set(idle);
        }
        // 1b. Local rate limit, when the chain has the filter: the route's (or its virtual host's)
        //     config, else the filter's.
        if let Some(filter) = &hcm.local_rate_limit {
            let limit = route.local_rate_limit.as_ref().unwrap_or(filter);
            let descriptors = match &route.action {
                Action::Forward(a) => {
                    let view = router::RequestView {
                        method: req.method().as_str(),
                        authority,
                        path_and_query: req.uri().path_and_query().map_or("/", |p| p.as_str()),
                        headers: req.headers(),
                    };
                    limit.descriptors_for(a, &view, origin.remote)
                }
                _ => Vec::new(),
            };
            let (verdict, told) = limit.check(&descriptors, &down.rate_limit);
            // Every answer to the request tells of the bucket that decided (Envoy's filter adds
            // them as the answer's head passes through it, local replies included).
            if let Some(told) = told.filter(|_| limit.x_ratelimit_headers) {
                let _ = notes.get_or_init(Box::default).rate_limit.set(told);
            }
            match verdict {
                local_ratelimit::Verdict::Pass => {}
                local_ratelimit::Verdict::PassNotEnforced => {
                    limit
                        .request_headers_when_not_enforced
                        .apply(req.headers_mut());
                }
                local_ratelimit::Verdict::Limited => {
                    let status =
                        StatusCode::from_u16(limit.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                    // Envoy 1.40 sends no `x-envoy-ratelimited` for local limits (its older docs
                    // said it did): the configured response headers only.
                    let mut resp =
                        local_reply(status, "local_rate_limited", "RL", "local_rate_limited");
                    if limit.resource_exhausted
                        && let Some(l) = resp.extensions_mut().get_mut::<LocalReply>()
                    {
                        // RESOURCE_EXHAUSTED, where the status's own would be UNAVAILABLE.
                        l.grpc_status = Some(8);
                    }
                    limit.response_headers.apply(resp.headers_mut());
                    // `enable_retry_after_header`: the seconds until the bucket has a token.
                    if let Some(told) = told.filter(|_| limit.retry_after) {
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from(told.reset));
                    }
                    routed(proxy, hcm, route, &mut resp);
                    return resp;
                }
            }
        }
        // 2. CORS, when the chain has the filter and the route a policy: an allowed preflight is
        //    answered here; an allowed actual request gets the access-control headers on its answer.
        let cors = route.cors.as_ref().filter(|_| hcm.cors_filter);
        let cors_origin = cors.and_then(|p| p.allowed_origin(req.headers()));
        if let (Some(policy), Some(origin)) = (cors, &cors_origin)
            && cors::is_preflight(req.method(), req.headers())
        {
            let mut resp = local_reply(StatusCode::OK, "", "-", "cors_response");
            resp.headers_mut().remove(names::X_WEFT_RESPONSE_FLAGS);
            policy.preflight_headers(origin.clone(), resp.headers_mut());
            routed(proxy, hcm, route, &mut resp);
            return resp;
        }
        // The route's `max_stream_duration` (else the connection manager's) runs from here to the
        // answer's last byte.
        let fallback = hcm.timeouts.max_stream_duration;
        let duration = match &route.action {
            Action::Forward(a) => match a.stream_duration {
                Some(d) => d.of(req.headers(), fallback),
                None => fallback,
            },
            _ => None,
        };
        let mut resp = match duration {
            None => route_rest(hcm, route, req, authority, snapshot, down).await,
            Some(d) => {
                let at = tokio::time::Instant::now() + d;
                let complete = http_body::Body::is_end_stream(req.body());
                let rest = route_rest(hcm, route, req, authority, snapshot, down);
                match tokio::time::timeout_at(at, rest).await {
                    Ok(resp) => {
                        BodyDeadline::arm(resp, at, || DeadlineOf::Stream(hcm.stats.clone()))
                    }
                    Err(_) => {
                        hcm.stats.downstream_rq_max_duration_reached.inc();
                        duration_reached(complete)
                    }
                }
            }
        };
        routed(proxy, hcm, route, &mut resp);
        if let (Some(policy), Some(origin)) = (cors, cors_origin) {
            policy.response_headers(origin, resp.headers_mut());
        }
        resp
    }
}

/// A request whose path normalization ends it: an escaped slash refused (`None`) or
/// redirected (`Some(location)`).
#[derive(Clone)]
struct PathRefused(Option<String>);

impl PathRefused {
    fn reply(self) -> Response<ProxyBody> {
        let status = match self.0 {
            None => StatusCode::BAD_REQUEST,
            Some(_) => StatusCode::TEMPORARY_REDIRECT,
        };
        let mut resp = local_reply(status, "", "-", "path_normalization_failed");
        if let Some(v) = self.0.and_then(|to| HeaderValue::from_str(&to).ok()) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }
}

/// Normalizes the request's path in place, before anything (the access log included) reads it;
/// a request it ends carries a `PathRefused` for the request path to answer.
fn normalize_path(paths: &normalize::PathNormalization, req: &mut Request<DownstreamBody>) {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if !paths.may_change(target) {
        return;
    }
    // A refused request keeps the path as it was when refused, for the access log.
    let (normalized, refused) = match paths.apply(target) {
        normalize::Normalized::Path(Cow::Borrowed(_)) => return,
        normalize::Normalized::Path(Cow::Owned(p)) => (p, None),
        normalize::Normalized::Reject(p) => (p, Some(PathRefused(None))),
        normalize::Normalized::Redirect(to) => (to.clone(), Some(PathRefused(Some(to)))),
    };
    if let Some(refused) = refused {
        req.extensions_mut().insert(refused);
    }
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    let uri = http::uri::PathAndQuery::try_from(normalized)
        .ok()
        .and_then(|pq| {
            parts.path_and_query = Some(pq);
            Uri::from_parts(parts).ok()
        });
    match uri {
        Some(uri) => *req.uri_mut() = uri,
        None => {
            req.extensions_mut().insert(PathRefused(None));
        }
    }
}

/// Removes the `x-envoy-*` headers that steer a proxy from a request. The router's own
/// (retries, timeouts) go from every request: Envoy's router reads them on internal requests
/// (as weft-proxy does, `retry::Controls`) and removes them before forwarding. Tracing and IP tags go from requests that are not internal
/// (one whose `x-forwarded-for` holds a single internal address, see `forwarded`), as Envoy's
/// connection manager does, so an outside client cannot set them. Called only for requests
/// with `x-envoy-*` names (most have none: `forwarded` notes it in its one pass over the names).
fn strip_envoy_controls(headers: &mut HeaderMap, internal: bool) {
    const ROUTER: [&str; 7] = [
        "x-envoy-retry-on",
        "x-envoy-retry-grpc-on",
        "x-envoy-max-retries",
        "x-envoy-upstream-alt-stat-name",
        "x-envoy-upstream-rq-timeout-ms",
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "x-envoy-upstream-rq-timeout-alt-response",
    ];
    const EXTERNAL: [&str; 3] = [
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-force-trace",
        "x-envoy-ip-tags",
    ];
    for name in ROUTER {
        headers.remove(name);
    }
    if !internal {
        for name in EXTERNAL {
            headers.remove(name);
        }
    }
}

/// For access logs: the route that matched, and its cluster when the answer is the proxy's own
/// (Envoy knows the cluster from the moment the route is chosen).
fn routed(
    proxy: &Proxy,
    hcm: &ConnectionManager,
    route: &router::Route,
    resp: &mut Response<ProxyBody>,
) {
    if hcm.access_logs.is_none() {
        return;
    }
    // A cluster that does not exist is not named (Envoy has no cluster to log then).
    if let Action::Forward(a) = &route.action
        && resp
            .extensions()
            .get::<LocalReply>()
            .is_some_and(|l| l.details != "cluster_not_found")
        && resp.extensions().get::<Upstream>().is_none()
        && let Some(cluster) = proxy.snapshot().clusters.get(a.cluster.pick())
    {
        Upstream::mark(resp, None, cluster, None);
    }
    resp.extensions_mut().insert(RouteName(route.name.clone()));
}

/// The rest of the request path once the route is known: faults, redirects and direct
/// responses, then forwarding.
/// (An `async move` block, not an `async fn`: see `proxy_request`.)
#[allow(clippy::manual_async_fn)]
fn route_rest(
    hcm: &ConnectionManager,
    route: &router::Route,
    req: &mut Request<DownstreamBody>,
    authority: &str,
    snapshot: arc_swap::Guard<Arc<crate::state::Snapshot>>,
    down: &crate::listener::Downstream,
) -> impl std::future::Future<Output = Response<ProxyBody>> {
    async move {
        // 3. Faults, when the chain has the fault filter: the route's config, else the filter's.
        if let Some(filter) = &hcm.fault_filter {
            let fault = route.fault.as_ref().unwrap_or(filter);
            if let Some((delay, share)) = fault.delay
                && share.hit()
            {
                tokio::time::sleep(delay).await;
            }
            if let Some((abort, share)) = fault.abort
                && share.hit()
            {
                return fault_abort(abort);
            }
        }
        // 3. Redirects answer here; forwarding routes go upstream. Route header edits apply on the
        //    way in and on the way out.
        let action = match &route.action {
            Action::Redirect(r) => {
                let path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                let mut resp = local_reply(
                    StatusCode::from_u16(r.status()).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                    "",
                    "-",
                    "direct_response",
                );
                resp.headers_mut().remove(names::X_WEFT_RESPONSE_FLAGS);
                if let Ok(v) = HeaderValue::from_str(&r.location(authority, path)) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                route.response_headers.apply(resp.headers_mut());
                return resp;
            }
            Action::Direct { status, body } => {
                let mut resp = Response::new(Either::Right(Full::new(body.clone())));
                *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                resp.extensions_mut().insert(LocalReply {
                    // A gRPC client gets the body as `grpc-message`, as from Envoy (copied for
                    // gRPC requests only).
                    message: if router::is_grpc(req.headers()) {
                        String::from_utf8_lossy(body).into_owned()
                    } else {
                        String::new()
                    },
                    details: Cow::Borrowed("direct_response"),
                    transport: None,
                    grpc_status: None,
                });
                if !body.is_empty() {
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                }
                route.response_headers.apply(resp.headers_mut());
                return resp;
            }
            Action::Forward(a) => a,
        };
        // Settings an internal request carries itself (`x-envoy-*` router headers). Boxed: the
        // request path's future keeps room for it across its awaits, for every request.
        let controlled: Box<router::RouteAction>;
        let controls = if req.extensions().is_empty() {
            None
        } else {
            req.extensions_mut().remove::<retry::Controls>()
        };
        // A gRPC request's `grpc-timeout` sets the route's timeout (`max_grpc_timeout`); the
        // control headers come after it, as in Envoy's router.
        let grpc_timeout = action
            .grpc_timeout
            .filter(|_| router::is_grpc(req.headers()))
            .map(|g| g.of(req.headers()));
        let action = match (controls, grpc_timeout) {
            (None, None) => action,
            (c, g) => {
                let mut a = action.clone();
                if let Some(t) = g {
                    a.timeout = t;
                    // A per-try timeout as long as the whole is none (Envoy's router).
                    if let (Some(t), Some(r)) = (t, a.retry.as_mut())
                        && r.per_try_timeout.is_some_and(|p| p >= t)
                    {
                        r.per_try_timeout = None;
                    }
                }
                if let Some(c) = c {
                    a = c.apply(&a);
                }
                controlled = Box::new(a);
                &*controlled
            }
        };
        let Some(cluster) = snapshot.clusters.get(action.cluster.pick()).cloned() else {
            hcm.stats.no_cluster.inc();
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "",
                "NC",
                "cluster_not_found",
            );
        };
        let mirrors: Vec<Mirror> = action
            .mirrors
            .iter()
            .filter(|m| m.share.hit())
            .filter_map(|m| {
                Some(Mirror {
                    cluster: snapshot.clusters.get(&m.cluster)?.clone(),
                    shadow_suffix: m.shadow_suffix,
                })
            })
            .collect();
        drop(snapshot);
        // The request is taken from its owner (`serve_connection`'s request future) only here;
        // see `proxy_request`.
        let (mut parts, body) =
            std::mem::replace(req, Request::new(Either::Right(Full::default()))).into_parts();
        route.request_headers.apply(&mut parts.headers);
        if let Some(rewrite) = &action.path_rewrite {
            let original = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            if let Ok(uri) = Uri::try_from(rewrite.apply(&original)) {
                parts.uri = uri;
                // As Envoy: the whole original path, query included.
                if let Ok(v) = HeaderValue::from_str(&original) {
                    parts
                        .headers
                        .insert(HeaderName::from_static("x-envoy-original-path"), v);
                }
            }
        }
        let (hash, set_cookie) = if action.hash_policy.is_empty() {
            (None, None)
        } else {
            hash::compute(&action.hash_policy, &parts, down.peer)
        };
        let authority = action.host_rewrite.as_deref().unwrap_or(authority);
        // Where the client sent the connection: an ORIGINAL_DST cluster's host.
        let original = down.local;
        if hcm.websocket && upgrade::is_websocket(parts.version, &parts.headers) {
            let upgrade_header = parts.headers.get(header::UPGRADE).cloned();
            let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
            if let (Some(u), Some(on_upgrade)) = (upgrade_header, on_upgrade) {
                drop(body);
                let mut head = match upstream_head(parts, authority, UpstreamProtocol::Http1) {
                    Ok(h) => h,
                    Err(resp) => return resp,
                };
                if action.attempt_header {
                    head.headers.insert(
                        names::X_ENVOY_ATTEMPT_COUNT,
                        crate::cluster::attempt_count(1),
                    );
                }
                let sent = hcm
                    .access_logs
                    .is_some()
                    .then(|| SentRequest::of(&head, authority));
                // Boxed: upgrades are rare, and the splice's state would otherwise make every
                // request's future larger.
                let mut resp = Box::pin(upgrade::forward(
                    &cluster, head, u, on_upgrade, action, original, hcm,
                ))
                .await;
                route.response_headers.apply(resp.headers_mut());
                return SentRequest::attach(resp, sent, None);
            }
        }
        // The upstream that answered, for the access log and the span.
        let logged = hcm.access_logs.is_some();
        let log = logged || hcm.reports_spans();
        let mut resp = forward(
            &cluster,
            action,
            parts,
            body,
            authority,
            mirrors,
            Pick {
                hash,
                log,
                logged,
                original,
                timed: hcm.envoy_headers,
                since: None,
                attempt_header: action.attempt_header,
                attempts_in_response: action.attempts_in_response,
                keep_limit: down
                    .buffer_limit
                    .map_or(crate::cluster::tee::KEEP_LIMIT, |l| l as usize),
            },
        )
        .await;
        if let Some(c) = set_cookie {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
        route.response_headers.apply(resp.headers_mut());
        resp
    }
}

/// Upstream request in the upstream's HTTP version with the (possibly rewritten) authority;
/// the body kept for retries when the route retries (read whole when small, else kept as it
/// streams, up to the tee's limit); every attempt, and the answer's body, within the route's
/// timeout.
/// (An `async move` block, not an `async fn`: see `proxy_request`.)
#[allow(clippy::manual_async_fn)]
fn forward(
    cluster: &Arc<crate::cluster::Cluster>,
    action: &router::RouteAction,
    mut parts: http::request::Parts,
    body: DownstreamBody,
    authority: &str,
    mirrors: Vec<Mirror>,
    mut pick: Pick,
) -> impl std::future::Future<Output = Response<ProxyBody>> {
    async move {
        let shadow_parts = (!mirrors.is_empty()).then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });
        // `retriable_request_headers`: a request that has none of them is not retried.
        let retry = action.retry.as_ref().filter(|r| {
            r.retries_request(&router::RequestView {
                method: parts.method.as_str(),
                authority,
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/"),
                headers: &parts.headers,
            })
        });
        // The per-try timeout when the route has one, else the route's.
        let expected = action
            .retry
            .as_ref()
            .and_then(|r| r.per_try_timeout)
            .or(action.timeout)
            .filter(|t| !t.is_zero());
        if pick.timed {
            tell_timeout(&mut parts.headers, expected);
        }
        // With `max_grpc_timeout`, the upstream learns the time it has in `grpc-timeout` too.
        if let Some(t) = expected
            && action.grpc_timeout.is_some()
            && router::is_grpc(&parts.headers)
        {
            parts
                .headers
                .insert("grpc-timeout", router::grpc_timeout_value(t));
        }
        // `spawn_upstream_span`: each attempt's span, and its context upstream.
        let spawn = parts.extensions.remove::<zipkin::Spawner>();
        let head = match upstream_head(parts, authority, cluster.protocol) {
            Ok(h) => h,
            Err(resp) => return resp,
        };
        let sent = pick.logged.then(|| SentRequest::of(&head, authority));
        let replay = retry.is_some_and(|r| r.num_retries > 0) || !mirrors.is_empty();
        let mut body = match AttemptBody::new(body, &head.headers, replay, pick.keep_limit).await {
            Ok(b) => b,
            Err(resp) => return SentRequest::attach(resp, sent, None),
        };
        // Envoy times the upstream from the moment the router has the whole request.
        pick.since = pick.timed.then(std::time::Instant::now);
        // Shadows need the body again: only requests whose body was kept are mirrored.
        if let (Some(original), AttemptBody::Replay(bytes)) = (shadow_parts, &body) {
            for m in mirrors {
                shadow(m, &original, authority, bytes.clone(), action.timeout);
            }
        }
        cluster.stats.upstream_rq_total.inc();
        if cluster.stats.upstream_rq_active.get() >= i64::from(cluster.breakers.max_requests) {
            cluster.stats.upstream_rq_pending_overflow.inc();
            return SentRequest::attach(overflow(), sent, None);
        }
        let _rq_active = GaugeGuard::new(&cluster.stats.upstream_rq_active);
        // Access logs name the host and connection that answered, or that a timeout cut short.
        let seen = pick
            .log
            .then(|| std::sync::Mutex::new(crate::cluster::Attempted::default()));
        // The attempts' future is built inside each arm, not bound first: a future held in a local
        // and then awaited through a wrapper takes room twice in this function's own future.
        let attempt_header = pick.attempt_header;
        let attempts = || {
            attempt_until_done(
                cluster,
                retry,
                head,
                &mut body,
                pick,
                seen.as_ref(),
                spawn.as_ref(),
            )
        };
        let resp = match action.timeout {
            Some(t) => {
                let at = tokio::time::Instant::now() + t;
                match tokio::time::timeout_at(at, attempts()).await {
                    // The route's timeout runs on until the body is complete, as Envoy's does.
                    Ok(resp) => BodyDeadline::arm(resp, at, || DeadlineOf::Route(cluster.clone())),
                    Err(_) => {
                        cluster.stats.upstream_rq_timeout.inc();
                        cluster.stats.upstream_rq_xx.record(504);
                        let mut resp = local_reply(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout",
                            "UT",
                            "response_timeout",
                        );
                        if let Some(s) = &seen {
                            let tried = crate::lock_own(s);
                            Upstream::mark(&mut resp, tried.host, cluster, tried.local);
                        }
                        resp
                    }
                }
            }
            None => attempts().await,
        };
        // The last attempt's number, as Envoy's router leaves it in the request.
        let attempts = seen
            .filter(|_| attempt_header)
            .map(|s| crate::lock_own(&s).number)
            .filter(|n| *n > 0);
        SentRequest::attach(resp, sent, attempts)
    }
}

/// The request as it went upstream, for access logs: Envoy's router changes the request it
/// was given (the route's header changes, a rewritten path with `x-envoy-original-path`, a
/// rewritten authority, `x-envoy-expected-rq-timeout-ms`, the attempt count), and its access
/// log's `%REQ(...)%` reads that request.
#[derive(Debug, Clone)]
struct SentRequest {
    headers: HeaderMap,
    path: String,
    authority: String,
}

impl SentRequest {
    fn of(head: &UpstreamHead, authority: &str) -> SentRequest {
        SentRequest {
            headers: head.headers.clone(),
            path: head
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            authority: authority.to_string(),
        }
    }

    /// `resp` with the request that got it, and the number of the attempt that did.
    fn attach(
        mut resp: Response<ProxyBody>,
        sent: Option<SentRequest>,
        attempts: Option<u32>,
    ) -> Response<ProxyBody> {
        if let Some(mut sent) = sent {
            if let Some(n) = attempts {
                sent.headers.insert(
                    names::X_ENVOY_ATTEMPT_COUNT,
                    crate::cluster::attempt_count(n),
                );
            }
            resp.extensions_mut().insert(sent);
        }
        resp
    }
}

/// When an upstream answer's body must be complete: Envoy's route timeout runs until the end
/// of the response, not only until its head (its per-try timeout does stop at the head, and so
/// does weft's). The head has gone to the client by then, so a late body is cut: the client
/// sees the answer end early, as from Envoy, the upstream request is abandoned (its connection
/// closed) and counted in `upstream_rq_timeout`, and the access log says `UT`. Carried in the
/// response's extensions from the request path to [`LoggedBody`]; only answers whose route has
/// a timeout carry one.
#[derive(Clone)]
struct BodyDeadline {
    at: tokio::time::Instant,
    /// Whose deadline it is, for its counter.
    of: DeadlineOf,
}

#[derive(Clone)]
enum DeadlineOf {
    /// The route's timeout: the cluster's `upstream_rq_timeout`, `UT`.
    Route(Arc<crate::cluster::Cluster>),
    /// The route's `max_stream_duration`: the connection manager's
    /// `downstream_rq_max_duration_reached`.
    Stream(Arc<crate::stats::HttpStats>),
    /// The cluster's `max_stream_duration`: the cluster's `upstream_rq_max_duration_reached`,
    /// `UMSDR`.
    Upstream(Arc<crate::cluster::Cluster>),
}

impl BodyDeadline {
    /// Gives an answer from upstream the deadline `at` (whose it is: `of`), unless one it has
    /// already ends sooner: the nearest of the cluster's `max_stream_duration`, the route's
    /// timeout and the route's `max_stream_duration` wins. Local replies are complete already.
    fn arm(
        mut resp: Response<ProxyBody>,
        at: tokio::time::Instant,
        of: impl FnOnce() -> DeadlineOf,
    ) -> Response<ProxyBody> {
        if matches!(resp.body(), Either::Left(_))
            && resp
                .extensions()
                .get::<BodyDeadline>()
                .is_none_or(|d| d.at > at)
        {
            resp.extensions_mut().insert(BodyDeadline { at, of: of() });
        }
        resp
    }
}

/// The answer when a route's `max_stream_duration` runs out before the upstream's head, as
/// Envoy's connection manager gives it: 504 once the request was whole, else 408; a gRPC
/// client gets DEADLINE_EXCEEDED.
fn duration_reached(complete: bool) -> Response<ProxyBody> {
    let status = if complete {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::REQUEST_TIMEOUT
    };
    let mut resp = local_reply(
        status,
        "downstream duration timeout",
        "-",
        "max_duration_timeout",
    );
    if let Some(l) = resp.extensions_mut().get_mut::<LocalReply>() {
        l.grpc_status = Some(4);
    }
    resp
}

/// A route's `idle_timeout` for the answer's body, when it replaces the connection manager's.
#[derive(Clone, Copy)]
struct StreamIdle(Option<Duration>);

/// The deadlines running under a response body: the route's ([`BodyDeadline`]) and the
/// stream's idle timeout (from the last frame), the timer set for the nearer.
struct BodyTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    deadline: Option<BodyDeadline>,
    idle: Option<(Duration, tokio::time::Instant)>,
}

impl BodyTimer {
    fn new(deadline: Option<BodyDeadline>, idle: Option<Duration>) -> Box<BodyTimer> {
        let idle = idle.map(|d| (d, tokio::time::Instant::now()));
        let at = BodyTimer::nearer(deadline.as_ref(), idle);
        Box::new(BodyTimer {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            deadline,
            idle,
        })
    }

    fn next(&self) -> tokio::time::Instant {
        BodyTimer::nearer(self.deadline.as_ref(), self.idle)
    }

    fn nearer(
        deadline: Option<&BodyDeadline>,
        idle: Option<(Duration, tokio::time::Instant)>,
    ) -> tokio::time::Instant {
        let idle = idle.map(|(d, last)| last + d);
        match (deadline, idle) {
            (Some(d), Some(i)) => d.at.min(i),
            (Some(d), None) => d.at,
            (None, Some(i)) => i,
            // Not made without one of them.
            (None, None) => tokio::time::Instant::now() + Duration::from_secs(86_400),
        }
    }

    /// What has run out, if anything has.
    fn expired(&self) -> Option<Cut> {
        let now = tokio::time::Instant::now();
        if self.deadline.as_ref().is_some_and(|d| now >= d.at) {
            return Some(Cut::Deadline);
        }
        if self.idle.is_some_and(|(d, last)| now >= last + d) {
            return Some(Cut::Idle);
        }
        None
    }
}

/// Why a response body was cut short.
#[derive(Clone, Copy)]
enum Cut {
    Deadline,
    Idle,
}

/// Sends the request, retrying per the route's policy: each attempt on an endpoint the load
/// balancer picks among hosts outlier detection has not ejected (another one than before, with
/// `previous_hosts`), within the circuit breakers (a connection slot per HTTP/1.1 request,
/// at most `max_retries` retries in flight), bounded by the per-try timeout, with jittered
/// exponential backoff between attempts. Every outcome feeds outlier detection.
/// `seen` (access logs): the host and connection the current attempt uses, known even when a
/// timeout drops the attempt midway.
/// (An `async move` block, not an `async fn`: see `proxy_request`.)
#[allow(clippy::manual_async_fn)]
fn attempt_until_done(
    cluster: &Arc<crate::cluster::Cluster>,
    retry: Option<&retry::RetryPolicy>,
    mut head: UpstreamHead,
    body: &mut AttemptBody,
    pick: Pick,
    seen: Option<&std::sync::Mutex<crate::cluster::Attempted>>,
    spawn: Option<&zipkin::Spawner>,
) -> impl std::future::Future<Output = Response<ProxyBody>> {
    async move {
        use crate::cluster::outlier::Outcome;
        let Pick {
            hash,
            log,
            original,
            since,
            attempt_header,
            attempts_in_response,
            ..
        } = pick;
        // For access logs: which host the answer (or the failure) came from.
        let mark = |mut resp: Response<ProxyBody>,
                    host: Option<std::net::SocketAddr>,
                    local: Option<std::net::SocketAddr>| {
            if log {
                Upstream::mark(&mut resp, host, cluster, local);
            }
            resp
        };
        let max_retries = if body.may_retry() {
            retry.map(|r| r.num_retries).unwrap_or(0)
        } else {
            0
        };
        // Kept only for `previous_hosts` (retries on another host), and filled only when a
        // retry comes: the vector allocates.
        let mut tried: Vec<std::net::SocketAddr> = Vec::new();
        let mut last_host = None;
        let mut attempt = 0u32;
        let mut _retry_slot = None;
        // The client's own count goes (a scan of the names: most requests have none to remove).
        if attempt_header
            && head
                .headers
                .keys()
                .any(|k| k == names::X_ENVOY_ATTEMPT_COUNT)
        {
            head.headers.remove(names::X_ENVOY_ATTEMPT_COUNT);
        }
        loop {
            tried.extend(last_host.take());
            let may_retry = attempt < max_retries;
            let other_host = retry.filter(|r| r.other_host && attempt > 0);
            let avoid = if other_host.is_some() {
                tried.as_slice()
            } else {
                &[]
            };
            let Some(endpoint) = cluster.pick(
                original,
                avoid,
                other_host.map(|r| r.host_selection_attempts).unwrap_or(1),
                hash,
            ) else {
                cluster.stats.upstream_cx_none_healthy.inc();
                return mark(no_healthy_upstream(), None, None);
            };
            if let Some(s) = seen {
                *crate::lock_own(s) = crate::cluster::Attempted {
                    host: Some(endpoint.address),
                    local: None,
                    number: attempt + 1,
                };
            }
            if max_retries > 0 && retry.is_some_and(|r| r.other_host) {
                last_host = Some(endpoint.address);
            }
            // HTTP/1.1 carries one request per connection: wait for a connection slot as a pending
            // request, or overflow when the pending queue is full too.
            let _connection = match endpoint.pool.protocol() {
                UpstreamProtocol::Http1 => match cluster.breakers.connection().await {
                    Some(p) => Some(p),
                    None => {
                        cluster.stats.upstream_rq_pending_overflow.inc();
                        return overflow();
                    }
                },
                UpstreamProtocol::Http2 => None,
            };
            endpoint.stats.rq_total.inc();
            let _ep_active = GaugeGuard::new(&endpoint.stats.rq_active);
            // Envoy numbers the attempts from 1, over whatever the client sent.
            if attempt_header {
                head.attempt = Some(attempt + 1);
            }
            let upstream_span = spawn.map(|s| {
                s.attempt(
                    &mut head.headers,
                    attempt,
                    zipkin::Upstream {
                        cluster: cluster.clone(),
                        host: endpoint.address,
                        protocol: endpoint.pool.protocol(),
                    },
                )
            });
            // Attempts that may be retried lend the head; the last one may give it away.
            let send = endpoint.pool.send(&mut head, !may_retry, body.next(), seen);
            // The per-try timeout and the cluster's `max_stream_duration` both run from here;
            // the sooner one cuts the wait for the answer's head.
            let per_try = retry.and_then(|r| r.per_try_timeout);
            // The clock is read only for clusters with the limit.
            let ends = cluster
                .max_stream_duration
                .map(|d| tokio::time::Instant::now() + d);
            let (wait, duration_first) = match (per_try, cluster.max_stream_duration) {
                (Some(p), Some(d)) => (Some(p.min(d)), d <= p),
                (p, d) => (p.or(d), d.is_some()),
            };
            let outcome = match wait {
                Some(t) => tokio::time::timeout(t, send).await.ok(),
                None => Some(send.await),
            };
            // The attempt's span ends with the answer's head, or the attempt's failure. As
            // Envoy's router, an attempt given up on (timed out, or answered and retried) is
            // `canceled`; an answered one is finished once that is known.
            let mut answered_span = None;
            if let Some(span) = upstream_span {
                match &outcome {
                    Some(Ok(resp)) => answered_span = Some((span, resp.status().as_u16())),
                    Some(Err(_)) => span.finish(0, false),
                    None => span.finish(0, true),
                }
            }
            let again = |why: &str| {
                tracing::debug!(cluster = %cluster.name, upstream = %endpoint.address, attempt, "retrying: {why}");
            };
            // A retry needs room under max_retries (or the retry budget); without it the last
            // outcome stands, flagged as Envoy does: `URX` when the policy's retries are used up,
            // `UO` when the circuit breaker refused one.
            let mut refused: Option<&'static str> = None;
            let mut retry_allowed = |wanted: bool| {
                if !wanted {
                    return false;
                }
                if !may_retry {
                    if max_retries > 0 {
                        refused = Some("URX");
                    }
                    return false;
                }
                // A streamed body that grew past what is kept cannot be sent again (Envoy's
                // `retry_or_shadow_abandoned`): the outcome stands, without a flag.
                if !body.can_retry() {
                    cluster.stats.retry_or_shadow_abandoned.inc();
                    return false;
                }
                match cluster
                    .breakers
                    .retry(cluster.stats.upstream_rq_active.get())
                {
                    Some(slot) => {
                        _retry_slot = Some(slot);
                        true
                    }
                    None => {
                        cluster.stats.upstream_rq_retry_overflow.inc();
                        refused = Some("UO");
                        false
                    }
                }
            };
            match outcome {
                Some(Ok(mut resp)) => {
                    let status = resp.status().as_u16();
                    cluster.stats.upstream_rq_xx.record(status);
                    if status >= 500 {
                        endpoint.stats.rq_error.inc();
                        cluster.observe(&endpoint, Outcome::Status(status));
                    } else {
                        endpoint.stats.rq_success.inc();
                        cluster.observe(&endpoint, Outcome::Success);
                    }
                    if retry_allowed(
                        retry.is_some_and(|r| r.retries_response(status, resp.headers())),
                    ) {
                        again(&format!("status {status}"));
                    } else {
                        strip_hop_by_hop(resp.headers_mut());
                        if let Some(flag) = refused {
                            resp.extensions_mut().insert(ResponseFlag(flag));
                        }
                        if let Some(t) = since {
                            resp.headers_mut().insert(
                                names::X_ENVOY_UPSTREAM_SERVICE_TIME,
                                milliseconds(t.elapsed()),
                            );
                        }
                        if attempts_in_response {
                            resp.headers_mut().insert(
                                names::X_ENVOY_ATTEMPT_COUNT,
                                crate::cluster::attempt_count(attempt + 1),
                            );
                        }
                        let local = seen.and_then(|s| crate::lock_own(s).local);
                        let mut resp = resp.map(Either::Left);
                        // The answer's body is this upstream request's too.
                        if let Some(at) = ends {
                            resp = BodyDeadline::arm(resp, at, || {
                                DeadlineOf::Upstream(cluster.clone())
                            });
                        }
                        if let Some((span, status)) = answered_span.take() {
                            span.finish(status, false);
                        }
                        return mark(resp, Some(endpoint.address), local);
                    }
                }
                Some(Err(e)) => {
                    endpoint.stats.rq_error.inc();
                    // As Envoy: an upstream that broke the protocol is a bad gateway (`UPE`), any
                    // other failure before a response an unavailable service.
                    let protocol = matches!(e, crate::cluster::UpstreamError::Protocol { .. });
                    let status = if protocol {
                        StatusCode::BAD_GATEWAY
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    cluster.stats.upstream_rq_xx.record(status.as_u16());
                    cluster.observe(&endpoint, Outcome::LocalFailure);
                    if e.is_connect_failure() {
                        cluster.stats.upstream_cx_connect_fail.inc();
                    }
                    if !retry_allowed(retry.is_some_and(|r| r.retries_error(&e))) {
                        tracing::debug!(cluster = %cluster.name, "upstream failure: {e}");
                        let resp = upstream_failure(&e, attempt > 0, refused);
                        return mark(resp, Some(endpoint.address), None);
                    }
                    again(&e.to_string());
                }
                None => {
                    // The per-try timeout, or the cluster's `max_stream_duration` when it came
                    // first: to Envoy's router, that is the upstream request reset, which
                    // `reset` (and the conditions that include it) retries.
                    let (counter, text, flag, details, why) = if duration_first {
                        (
                            &cluster.stats.upstream_rq_max_duration_reached,
                            "upstream max stream duration reached",
                            "UMSDR",
                            UPSTREAM_DURATION_DETAILS,
                            "max stream duration",
                        )
                    } else {
                        cluster.observe(&endpoint, Outcome::LocalFailure);
                        (
                            &cluster.stats.upstream_rq_per_try_timeout,
                            "upstream request timeout",
                            "UT",
                            "upstream_per_try_timeout",
                            "per-try timeout",
                        )
                    };
                    endpoint.stats.rq_error.inc();
                    counter.inc();
                    if !retry_allowed(retry.is_some_and(|r| r.retries_timeout())) {
                        cluster.stats.upstream_rq_xx.record(504);
                        let mut resp =
                            local_reply(StatusCode::GATEWAY_TIMEOUT, text, flag, details);
                        if let Some(refused) = refused {
                            resp.headers_mut().insert(
                                names::X_WEFT_RESPONSE_FLAGS,
                                HeaderValue::from_static(with_retry_flag(refused, flag)),
                            );
                        }
                        let local = seen.and_then(|s| crate::lock_own(s).local);
                        return mark(resp, Some(endpoint.address), local);
                    }
                    again(why);
                }
            }
            // Answered, and retried.
            if let Some((span, status)) = answered_span.take() {
                span.finish(status, true);
            }
            cluster.stats.upstream_rq_retry.inc();
            attempt += 1;
            if let Some(r) = retry {
                tokio::time::sleep(r.backoff(attempt, fastrand::f64())).await;
            }
        }
    }
}

/// `%RESPONSE_CODE_DETAILS%` when a cluster's `max_stream_duration` ends an upstream request.
const UPSTREAM_DURATION_DETAILS: &str = "upstream_max_stream_duration_reached";

/// A mirror target resolved for one request.
struct Mirror {
    cluster: Arc<crate::cluster::Cluster>,
    shadow_suffix: bool,
}

/// `host:port` -> `host-shadow:port`, as Envoy names shadow traffic.
fn shadow_authority(authority: &str) -> String {
    let port_at = if authority.starts_with('[') {
        authority.find("]:").map(|i| i + 1)
    } else {
        authority.rfind(':')
    };
    match port_at {
        Some(i) if authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            format!("{}-shadow{}", &authority[..i], &authority[i..])
        }
        _ => format!("{authority}-shadow"),
    }
}

/// Sends a copy of the request to a mirror cluster and forgets it: the answer is read and
/// dropped, failures only show in the mirror cluster's stats.
/// `original`: the client's method, URI and headers.
fn shadow(
    m: Mirror,
    original: &(http::Method, Uri, HeaderMap),
    authority: &str,
    body: Bytes,
    timeout: Option<Duration>,
) {
    let authority = if m.shadow_suffix {
        shadow_authority(authority)
    } else {
        authority.to_string()
    };
    let mut req = Request::new(());
    let (method, uri, headers) = original;
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    let (parts, ()) = req.into_parts();
    let Ok(head) = upstream_head(parts, &authority, m.cluster.protocol) else {
        return;
    };
    send_and_forget(
        m.cluster,
        head,
        body,
        timeout.unwrap_or(Duration::from_secs(60)),
        |_| {},
    );
}

/// Sends a request to one of `cluster`'s hosts in a task of its own, reads the answer and drops
/// it (mirrors, span reports). The outcome shows in the cluster's stats and is told to `done`:
/// the status, or none when there was no answer (no host, a failure, `within` ran out).
pub(crate) fn send_and_forget(
    cluster: Arc<crate::cluster::Cluster>,
    mut head: UpstreamHead,
    body: Bytes,
    within: Duration,
    done: impl FnOnce(Option<u16>) + Send + 'static,
) {
    tokio::spawn(async move {
        use http_body_util::BodyExt as _;
        let Some(endpoint) = cluster.pick(None, &[], 1, None) else {
            return done(None);
        };
        cluster.stats.upstream_rq_total.inc();
        endpoint.stats.rq_total.inc();
        let send = async {
            let resp = endpoint
                .pool
                .send(&mut head, true, Either::Right(Full::new(body)), None)
                .await
                .ok()?;
            let status = resp.status().as_u16();
            cluster.stats.upstream_rq_xx.record(status);
            resp.into_body().collect().await.ok()?;
            Some(status)
        };
        done(tokio::time::timeout(within, send).await.ok().flatten());
    });
}

/// A circuit breaker's refusal, as Envoy answers it (`UO`, `x-envoy-overloaded`).
fn overflow() -> Response<ProxyBody> {
    let mut resp = local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        "UO",
        "upstream_reset_before_response_started{overflow}",
    );
    resp.headers_mut().insert(
        HeaderName::from_static("x-envoy-overloaded"),
        HeaderValue::from_static("true"),
    );
    resp
}

/// The fault filter's abort: an HTTP status, or a gRPC status in a trailers-only response.
fn fault_abort(abort: fault::Abort) -> Response<ProxyBody> {
    match abort {
        fault::Abort::Http(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            local_reply(status, "fault filter abort", "FI", FAULT_ABORT)
        }
        fault::Abort::Grpc(code) => {
            let mut resp = local_reply(StatusCode::OK, "", "FI", FAULT_ABORT);
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(names::GRPC_STATUS, HeaderValue::from(code));
            h.insert(
                names::GRPC_MESSAGE,
                HeaderValue::from_static("fault filter abort"),
            );
            resp
        }
    }
}

/// The request's authority (its URI's, else its `Host`), sharing the request's bytes: the
/// request path keeps it after the request has moved on, and a `String` copy of it was an
/// allocation on every request.
enum Authority {
    Uri(http::uri::Authority),
    /// A `Host` value known to be visible ASCII.
    Host(HeaderValue),
}

impl Authority {
    fn of<B>(req: &Request<B>) -> Option<Authority> {
        if let Some(a) = req.uri().authority() {
            return Some(Authority::Uri(a.clone()));
        }
        let host = req.headers().get(header::HOST)?;
        host.to_str().ok()?;
        Some(Authority::Host(host.clone()))
    }

    fn as_str(&self) -> &str {
        match self {
            Authority::Uri(a) => a.as_str(),
            Authority::Host(h) => h.to_str().unwrap_or_default(),
        }
    }
}

/// Header names the request path looks up on every request, built at compile time (a name
/// given as `&str`, or `from_static` called at run time, is parsed on each use).
pub(crate) mod names {
    use http::HeaderName;
    pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const X_ENVOY_FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");
    pub const X_ENVOY_DECORATOR_OPERATION: HeaderName =
        HeaderName::from_static("x-envoy-decorator-operation");
    pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub const X_WEFT_RESPONSE_FLAGS: HeaderName = HeaderName::from_static("x-weft-response-flags");
    pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
    pub const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
        HeaderName::from_static("x-envoy-upstream-service-time");
    pub const X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
    pub const X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName =
        HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
}

static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

/// The lengths of the names in HOP_BY_HOP.
fn hop_by_hop_length(len: usize) -> bool {
    matches!(len, 7 | 10 | 16 | 17 | 18)
}

/// Whether `name` is one of the connection-level headers no proxy passes on.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_length(name.as_str().len()) && HOP_BY_HOP.contains(name)
}

/// The header a `Connection` token names as hop-by-hop besides the fixed ones: none for
/// `close`, `keep-alive` or a token that is no header name.
pub(crate) fn connection_named(token: &[u8]) -> Option<HeaderName> {
    if token.eq_ignore_ascii_case(b"close") || token.eq_ignore_ascii_case(b"keep-alive") {
        return None;
    }
    HeaderName::from_bytes(token)
        .ok()
        .filter(|name| !is_hop_by_hop(name))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) names present, without allocating: most messages carry none of
    // them, or only Connection.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for k in headers.keys() {
        // The names' lengths first: most headers are none of them, and comparing a name with
        // six others costs more than looking at its length.
        if !hop_by_hop_length(k.as_str().len()) {
            continue;
        }
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // Headers named in Connection are hop-by-hop too ("close" and "keep-alive" are the usual
    // tokens: no header, or one already listed).
    let mut named: Vec<HeaderName> = Vec::new();
    if present[0] {
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if let Some(name) = connection_named(token.as_bytes())
                && headers.contains_key(&name)
            {
                named.push(name);
            }
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    for name in &named {
        headers.remove(name);
    }
}

#[allow(clippy::result_large_err)]
fn upstream_head(
    mut parts: http::request::Parts,
    authority: &str,
    protocol: UpstreamProtocol,
) -> Result<UpstreamHead, Response<ProxyBody>> {
    strip_hop_by_hop(&mut parts.headers);
    // `te: trailers` is the one TE value allowed end to end (gRPC needs it).
    parts.headers.remove(header::TE);
    if parts.headers.contains_key(names::GRPC_TIMEOUT) || router::is_grpc(&parts.headers) {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // `x-request-id` and `x-forwarded-proto` are already set (see `forwarded`).
    let uri = std::mem::take(&mut parts.uri);
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let (uri, version) = match protocol {
        UpstreamProtocol::Http1 => {
            // The client's Host is kept when it is the only one and names the authority.
            let mut hosts = parts.headers.get_all(header::HOST).iter();
            let same_host = hosts
                .next()
                .is_some_and(|h| h.as_bytes() == authority.as_bytes())
                && hosts.next().is_none();
            if !same_host {
                let host = HeaderValue::from_str(authority).map_err(|_| {
                    local_reply(
                        StatusCode::BAD_REQUEST,
                        "invalid authority",
                        "DPE",
                        "invalid_authority",
                    )
                })?;
                parts.headers.insert(header::HOST, host);
            }
            // Origin form: an HTTP/1.1 client's URI already is; an HTTP/2 client's loses its
            // scheme and authority.
            let uri = if uri.scheme().is_none() && uri.authority().is_none() {
                uri
            } else {
                let mut p = http::uri::Parts::default();
                p.path_and_query = Some(path);
                Uri::from_parts(p).map_err(|_| {
                    local_reply(
                        StatusCode::BAD_REQUEST,
                        "invalid path",
                        "DPE",
                        "invalid_path",
                    )
                })?
            };
            (uri, Version::HTTP_11)
        }
        UpstreamProtocol::Http2 => {
            parts.headers.remove(header::HOST);
            let uri = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path)
                .build()
                .map_err(|_| {
                    local_reply(
                        StatusCode::BAD_REQUEST,
                        "invalid authority or path",
                        "DPE",
                        "invalid_authority_or_path",
                    )
                })?;
            (uri, Version::HTTP_2)
        }
    };
    Ok(UpstreamHead {
        method: parts.method,
        uri,
        version,
        headers: parts.headers,
        attempt: None,
    })
}

/// Largest request body read whole before the first attempt so that a retry can resend it.
/// Larger or unsized bodies stream through, a copy kept for retries up to the tee's limit.
const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

/// The body of every attempt: replayable bytes, the client's stream with a copy kept for
/// retries, or the client's stream for a single attempt.
enum AttemptBody {
    Replay(Bytes),
    Tee(crate::cluster::tee::Tee),
    Once(Option<DownstreamBody>),
}

impl AttemptBody {
    /// `limit`: the most of the body kept for retries (a larger one is sent once).
    async fn new(
        body: DownstreamBody,
        headers: &HeaderMap,
        replay: bool,
        limit: usize,
    ) -> Result<AttemptBody, Response<ProxyBody>> {
        use http_body::Body as _;
        use http_body_util::BodyExt as _;
        if body.is_end_stream() {
            // No body at all (GET and friends): nothing to read, always replayable.
            return Ok(if replay {
                AttemptBody::Replay(Bytes::new())
            } else {
                AttemptBody::Once(Some(body))
            });
        }
        if !replay {
            return Ok(AttemptBody::Once(Some(body)));
        }
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match length {
            // Could never be kept whole: sent once, as Envoy does past its buffer limit.
            Some(n) if n > limit as u64 => return Ok(AttemptBody::Once(Some(body))),
            Some(n) if n <= RETRY_BUFFER_LIMIT => {}
            _ => return Ok(AttemptBody::Tee(crate::cluster::tee::Tee::new(body, limit))),
        }
        match body.collect().await {
            Ok(b) => Ok(AttemptBody::Replay(b.to_bytes())),
            Err(_) => Err(local_reply(
                StatusCode::BAD_REQUEST,
                "downstream request body reset",
                "DR",
                "downstream_remote_disconnect",
            )),
        }
    }

    /// Whether the request may be retried at all.
    fn may_retry(&self) -> bool {
        !matches!(self, AttemptBody::Once(_))
    }

    /// Whether another attempt can send the whole body now (a streamed one may have grown
    /// past what is kept).
    fn can_retry(&self) -> bool {
        match self {
            AttemptBody::Replay(_) => true,
            AttemptBody::Tee(t) => t.replayable(),
            AttemptBody::Once(_) => false,
        }
    }

    fn next(&mut self) -> UpstreamBody {
        match self {
            AttemptBody::Replay(b) => Either::Right(Full::new(b.clone())),
            AttemptBody::Tee(t) => Either::Left(Either::Right(t.attempt())),
            AttemptBody::Once(b) => match b.take() {
                Some(incoming) => Either::Left(Either::Left(incoming)),
                None => Either::Right(Full::new(Bytes::new())),
            },
        }
    }
}

/// A random (version 4) UUID, as Envoy generates for `x-request-id`; formatted by hand into a
/// stack buffer since it runs on every request.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Version 4 (high nibble of byte 6) and the RFC 4122 variant (top bits of byte 8).
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&fastrand::u64(..).to_le_bytes());
    bytes[8..].copy_from_slice(&fastrand::u64(..).to_le_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0xf)];
        at += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A duration in whole milliseconds as a header value: under 100 ms (nearly every answer) a
/// slice of a static string, which needs no allocation; `HeaderValue::from(u64)` allocates.
/// As Envoy's router (unless `suppress_envoy_headers`): the upstream learns how long it has
/// (`x-envoy-expected-rq-timeout-ms`), when there is a limit.
fn tell_timeout(headers: &mut HeaderMap, timeout: Option<Duration>) {
    if let Some(t) = timeout.filter(|t| !t.is_zero()) {
        headers.insert(names::X_ENVOY_EXPECTED_RQ_TIMEOUT_MS, milliseconds(t));
    }
}

fn milliseconds(d: Duration) -> HeaderValue {
    const DIGITS: &str = "00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899";
    let ms = d.as_millis();
    match usize::try_from(ms) {
        Ok(n @ 0..=9) => HeaderValue::from_static(&DIGITS[2 * n + 1..2 * n + 2]),
        Ok(n @ 10..=99) => HeaderValue::from_static(&DIGITS[2 * n..2 * n + 2]),
        _ => HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX)),
    }
}

/// How a request goes upstream: the consistent-hash key, whether the host that answered is
/// recorded for the access log, and where the client's connection was addressed
/// (ORIGINAL_DST).
#[derive(Debug, Clone, Copy)]
struct Pick {
    hash: Option<u64>,
    /// Access logs or spans want to know the upstream that answered.
    log: bool,
    /// Access logs want the request as it went upstream (see `SentRequest`).
    logged: bool,
    original: Option<std::net::SocketAddr>,
    /// Upstream answers carry `x-envoy-upstream-service-time` (the router does not suppress
    /// Envoy's headers).
    timed: bool,
    /// When the request was complete and went to the attempts (set by `forward` when timed).
    since: Option<std::time::Instant>,
    /// Each attempt carries `x-envoy-attempt-count` upstream; the answer carries the count.
    attempt_header: bool,
    attempts_in_response: bool,
    /// The most of a request body kept for retries (the listener's buffer limit).
    keep_limit: usize,
}

/// The upstream host and cluster that answered (or failed), and the local address of the
/// connection that carried the answer, for access logs.
#[derive(Debug, Clone)]
struct Upstream {
    host: Option<std::net::SocketAddr>,
    cluster: String,
    /// The cluster's `alt_stat_name`, when it has one.
    stat_name: Option<String>,
    local: Option<std::net::SocketAddr>,
}

impl Upstream {
    /// Marks `resp` as having come from (or failed at) `host` of `cluster` over a connection
    /// from `local`.
    fn mark(
        resp: &mut Response<ProxyBody>,
        host: Option<std::net::SocketAddr>,
        cluster: &crate::cluster::Cluster,
        local: Option<std::net::SocketAddr>,
    ) {
        resp.extensions_mut().insert(Upstream {
            host,
            cluster: cluster.name.clone(),
            stat_name: (cluster.stat_name != cluster.name).then(|| cluster.stat_name.clone()),
            local,
        });
    }
}

/// The route that matched, for access logs.
#[derive(Debug, Clone)]
struct RouteName(String);

/// A request's protocol as access logs and spans name it.
fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// How much of a request's body came: a body read whole is its length; a streamed one is
/// counted as it goes through (when the connection counts them).
fn request_size(req: &Request<DownstreamBody>) -> zipkin::Received {
    match req.body() {
        Either::Right(full) => {
            zipkin::Received::Exact(http_body::Body::size_hint(full).exact().unwrap_or(0))
        }
        Either::Left(streamed) => streamed
            .counter()
            .map_or(zipkin::Received::Exact(0), zipkin::Received::Counted),
    }
}

fn request_entry(
    req: &Request<DownstreamBody>,
    peer: Option<std::net::SocketAddr>,
    local: Option<std::net::SocketAddr>,
    down: &crate::listener::Downstream,
) -> access_log::Entry {
    let size = request_size(req);
    access_log::Entry {
        requested_server_name: down.sni.clone(),
        start: Some(std::time::SystemTime::now()),
        started: Some(std::time::Instant::now()),
        method: req.method().as_str().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        authority: Authority::of(req)
            .map(|a| a.as_str().to_string())
            .unwrap_or_default(),
        protocol: protocol_name(req.version()),
        request_headers: req.headers().clone(),
        bytes_received: match &size {
            zipkin::Received::Exact(n) => *n,
            zipkin::Received::Counted(_) => 0,
        },
        received: match size {
            zipkin::Received::Counted(c) => Some(c),
            zipkin::Received::Exact(_) => None,
        },
        downstream_remote: peer,
        downstream_local: local,
        ..Default::default()
    }
}

/// Writes the access log line of a request weft-proxy's HTTP/1.1 loop refused (`status`, an
/// answer body of `sent` bytes).
fn refused_logger(
    loggers: Option<access_log::Loggers>,
    stats: Arc<HttpStats>,
    down: Arc<crate::listener::Downstream>,
) -> impl Fn(server::Refusal, usize, Option<tokio::time::Instant>, Option<Request<DownstreamBody>>)
{
    move |refusal, sent, began, req| {
        match refusal.details {
            "stream_idle_timeout" => stats.downstream_rq_idle_timeout.inc(),
            "request_overall_timeout" => stats.downstream_rq_timeout.inc(),
            "request_header_timeout" => stats.downstream_rq_header_timeout.inc(),
            _ => {}
        }
        let Some(loggers) = &loggers else {
            return;
        };
        let mut entry = match &req {
            Some(req) => request_entry(req, down.peer, down.local, &down),
            None => access_log::Entry {
                protocol: "HTTP/1.1",
                downstream_remote: down.peer,
                downstream_local: down.local,
                ..Default::default()
            },
        };
        let started = began.map_or_else(std::time::Instant::now, |b| b.into_std());
        entry.start = Some(std::time::SystemTime::now() - started.elapsed());
        entry.started = Some(started);
        entry.status = refusal.status.as_u16();
        entry.flags = refusal.flags.to_string();
        entry.details = Cow::Borrowed(refusal.details);
        entry.bytes_sent = sent as u64;
        for l in loggers.iter() {
            l.write(&entry);
        }
    }
}

/// The entry a sampled span of a connection manager without access logs is finished from: what
/// the answer says (status, flags, upstream); the span keeps what its request said.
#[inline]
fn traced_entry(
    resp: &mut Response<ProxyBody>,
) -> Option<(Box<access_log::Entry>, access_log::Loggers)> {
    let Traced(span) = resp.extensions_mut().remove::<Traced>()?;
    let mut entry = Box::<access_log::Entry>::default();
    response_entry(&mut entry, resp);
    entry.span = Some(span);
    Some((entry, access_log::Loggers::default()))
}

fn response_entry(e: &mut access_log::Entry, resp: &Response<ProxyBody>) {
    e.status = resp.status().as_u16();
    e.flags = resp
        .headers()
        .get(names::X_WEFT_RESPONSE_FLAGS)
        .and_then(|v| v.to_str().ok())
        .or_else(|| resp.extensions().get::<ResponseFlag>().map(|f| f.0))
        .unwrap_or("-")
        .to_string();
    e.response_headers = resp.headers().clone();
    if let Some(u) = resp.extensions().get::<Upstream>() {
        e.upstream_host = u.host;
        e.upstream_cluster_raw = u.stat_name.as_ref().map(|_| u.cluster.clone());
        e.upstream_cluster = Some(u.stat_name.clone().unwrap_or_else(|| u.cluster.clone()));
        e.upstream_local = u.local;
    }
    match resp.extensions().get::<LocalReply>() {
        Some(l) => {
            e.details = l.details.clone();
            e.transport_failure = l.transport.clone();
        }
        None => e.details = Cow::Borrowed("via_upstream"),
    }
    e.route_name = resp.extensions().get::<RouteName>().map(|r| r.0.clone());
}

/// A response body that counts what it sends and, when done (or dropped), writes the access
/// log lines of its request.
pub struct LoggedBody {
    inner: ProxyBody,
    log: Option<(Box<access_log::Entry>, access_log::Loggers)>,
    sent: u64,
    /// Boxed: most answers have none, and every response carries this body.
    timer: Option<Box<BodyTimer>>,
    /// `stream_idle_timeout`: a body that waits this long for its next frame is cut.
    idle: Option<Duration>,
    /// Counts the stream as in flight on its connection until the answer is sent.
    stream: Option<timeouts::StreamGuard>,
    /// Served on an HTTP/2 connection whose writes are gathered: large chunks are lent to its
    /// writer rather than copied (see `coalesce`).
    lend: Option<coalesce::Lender>,
}

impl LoggedBody {
    #[inline]
    fn new(
        inner: ProxyBody,
        log: Option<(Box<access_log::Entry>, access_log::Loggers)>,
        deadline: Option<BodyDeadline>,
        idle: Option<Duration>,
    ) -> LoggedBody {
        LoggedBody {
            inner,
            log,
            sent: 0,
            timer: deadline.map(|d| BodyTimer::new(Some(d), idle)),
            idle,
            stream: None,
            lend: None,
        }
    }

    /// `poll_frame` of a body with a timer: one with a route deadline, or one that had to
    /// wait for a frame (the stream's idle timeout runs from then).
    #[cold]
    #[inline(never)]
    fn poll_timed(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        // A body that never waits is cut too once its deadline has passed.
        if let Some(Cut::Deadline) = self.timer.as_ref().and_then(|t| t.expired()) {
            return self.cut(Cut::Deadline);
        }
        let polled = self.poll_counted(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(timer) = &mut self.timer
                    && let Some((_, last)) = &mut timer.idle
                {
                    *last = tokio::time::Instant::now();
                }
            }
            Poll::Ready(_) => self.timer = None,
            Poll::Pending => {
                let timer = self
                    .timer
                    .get_or_insert_with(|| BodyTimer::new(None, self.idle));
                while timer.sleep.as_mut().poll(cx).is_ready() {
                    if let Some(cut) = timer.expired() {
                        return self.cut(cut);
                    }
                    // Frames came since it was set: set for the nearer deadline now.
                    let at = timer.next();
                    timer.sleep.as_mut().reset(at);
                }
            }
        }
        polled
    }

    #[inline]
    fn poll_counted(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = hyper::body::Body::poll_frame(Pin::new(&mut self.inner), cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                self.sent += d.len() as u64;
                if let Some(lender) = &self.lend
                    && d.len() >= coalesce::LEND_MIN
                {
                    lender.lend(d);
                }
            } else if let Some(trailers) = frame.trailers_ref()
                && let Some((entry, _)) = &mut self.log
            {
                // For `%TRAILER(...)%`, `%GRPC_STATUS%` and a span's gRPC tags.
                entry.response_trailers = Some(trailers.clone());
            }
        }
        polled
    }

    /// A deadline passed before the body's end: the upstream side is dropped (its connection
    /// closed), the timeout counted and logged, and the client's stream ends with an error
    /// (its connection closed, or the HTTP/2 stream reset).
    fn cut(&mut self, why: Cut) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let timer = self.timer.take();
        self.inner = Either::Right(Full::new(Bytes::new()));
        let (flags, details, error) = match why {
            Cut::Deadline => match timer.as_ref().and_then(|t| t.deadline.as_ref()) {
                Some(BodyDeadline {
                    of: DeadlineOf::Stream(stats),
                    ..
                }) => {
                    stats.downstream_rq_max_duration_reached.inc();
                    ("-", "max_duration_timeout", "downstream duration timeout")
                }
                Some(BodyDeadline {
                    of: DeadlineOf::Upstream(c),
                    ..
                }) => {
                    c.stats.upstream_rq_max_duration_reached.inc();
                    (
                        "UMSDR",
                        UPSTREAM_DURATION_DETAILS,
                        "upstream max stream duration reached",
                    )
                }
                d => {
                    if let Some(BodyDeadline {
                        of: DeadlineOf::Route(c),
                        ..
                    }) = d
                    {
                        c.stats.upstream_rq_timeout.inc();
                    }
                    ("UT", "response_timeout", "upstream request timeout")
                }
            },
            Cut::Idle => ("SI", "stream_idle_timeout", "stream idle timeout"),
        };
        if let Some((entry, _)) = &mut self.log {
            entry.flags = flags.to_string();
            entry.details = Cow::Borrowed(details);
        }
        Poll::Ready(Some(Err(error.into())))
    }
}

use crate::cluster::h1::BoxError;

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = <ProxyBody as hyper::body::Body>::Error;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.timer.is_some() {
            return this.poll_timed(cx);
        }
        let polled = this.poll_counted(cx);
        if polled.is_pending() && this.idle.is_some() {
            return this.poll_timed(cx);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl server::Answer for LoggedBody {
    fn stream_idle(&self) -> Option<Duration> {
        self.idle
    }

    fn cut_idle(&mut self) {
        if let Some((entry, _)) = &mut self.log {
            entry.flags = "SI".to_string();
            entry.details = Cow::Borrowed("stream_idle_timeout");
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some((mut entry, loggers)) = self.log.take() {
            entry.bytes_sent = self.sent;
            if let Some(received) = &entry.received {
                entry.bytes_received = received.load(std::sync::atomic::Ordering::Relaxed);
            }
            access_log::write(&mut entry, &loggers);
        }
    }
}

/// An answer the proxy makes itself: the status, a plain-text body, the response flag and
/// Envoy's response code details for access logs.
pub fn local_reply(
    status: StatusCode,
    body: &str,
    flag: &'static str,
    details: impl Into<Cow<'static, str>>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::copy_from_slice(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if !body.is_empty() {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    h.insert(names::X_WEFT_RESPONSE_FLAGS, HeaderValue::from_static(flag));
    resp.extensions_mut().insert(LocalReply {
        message: body.to_string(),
        details: details.into(),
        transport: None,
        grpc_status: None,
    });
    resp
}

/// Envoy's details for the fault filter's aborts.
const FAULT_ABORT: &str = "fault_filter_abort";

/// No endpoint to send to (`UH`).
fn no_healthy_upstream() -> Response<ProxyBody> {
    local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "no healthy upstream",
        "UH",
        "no_healthy_upstream",
    )
}

/// `URX` (retries used up) or `UO` (a retry refused by the circuit breaker) together with the
/// failure's own flag, in the order Envoy 1.40 logs them.
fn with_retry_flag(retry: &'static str, flag: &'static str) -> &'static str {
    match (retry, flag) {
        ("URX", "UF") => "URX,UF",
        ("URX", "UC") => "URX,UC",
        ("URX", "UPE") => "URX,UPE",
        ("URX", "UT") => "URX,UT",
        ("URX", "UMSDR") => "URX,UMSDR",
        ("UO", "UMSDR") => "UO,UMSDR",
        ("UO", "UF") => "UO,UF",
        ("UO", "UC") => "UO,UC",
        ("UO", "UPE") => "UO,UPE",
        ("UO", "UT") => "UO,UT",
        _ => flag,
    }
}

/// Envoy's answer when an upstream failed before any response: 503 (502 for a protocol
/// error) whose body names the reset reason, with details that also carry the connection's
/// failure reason (`%UPSTREAM_TRANSPORT_FAILURE_REASON%`) when there is one. `retried`: earlier attempts
/// failed too; `retry_flag`: why no further attempt was made (`URX`, `UO`).
fn upstream_failure(
    e: &crate::cluster::UpstreamError,
    retried: bool,
    retry_flag: Option<&'static str>,
) -> Response<ProxyBody> {
    let (reason, flag, transport) = e.reset_reason();
    let status = if flag == "UPE" {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = String::from("upstream connect error or disconnect/reset before headers. ");
    if retried {
        body.push_str("retried and the latest ");
    }
    body.push_str("reset reason: ");
    body.push_str(reason);
    let mut details = format!("upstream_reset_before_response_started{{{reason}");
    // Envoy 1.40 leaves the transport failure reason out of the body.
    if let Some(t) = &transport {
        details.push('|');
        details.push_str(t);
    }
    details.push('}');
    let flags = retry_flag.map_or(flag, |r| with_retry_flag(r, flag));
    let mut resp = local_reply(status, &body, flags, details.replace(' ', "_"));
    if let Some(l) = resp.extensions_mut().get_mut::<LocalReply>() {
        l.transport = transport;
    }
    resp
}

/// The response flag of an upstream's answer passed on (`URX`, `UO` when retries stopped):
/// local replies carry theirs in `x-weft-response-flags` instead.
#[derive(Debug, Clone, Copy)]
struct ResponseFlag(&'static str);

/// Marks a response the proxy made itself.
#[derive(Debug, Clone)]
struct LocalReply {
    /// The body's text (a gRPC client gets it as `grpc-message`).
    message: String,
    /// Envoy's response code details.
    details: Cow<'static, str>,
    /// Why the upstream connection failed, when that is the reason.
    transport: Option<String>,
    /// The gRPC status a gRPC client gets, when not the HTTP status's (`grpc_status_of`).
    grpc_status: Option<u32>,
}

/// Envoy's mapping of an HTTP status to a gRPC status, for local replies to gRPC requests.
pub(crate) fn grpc_status_of(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// As Envoy does for a gRPC request: a local reply becomes a trailers-only gRPC answer (HTTP 200,
/// `grpc-status` from the HTTP status, the message as `grpc-message`), so gRPC clients see a
/// gRPC error rather than a bare HTTP one.
fn grpc_local_reply(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(LocalReply {
        message,
        grpc_status,
        ..
    }) = resp.extensions().get::<LocalReply>().cloned()
    else {
        return resp;
    };
    if resp.headers().contains_key(names::GRPC_STATUS) {
        return resp;
    }
    let grpc = grpc_status.unwrap_or_else(|| grpc_status_of(resp.status()));
    let (mut parts, _) = resp.into_parts();
    parts.status = StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert(names::GRPC_STATUS, HeaderValue::from(grpc));
    if !message.is_empty() {
        // gRPC percent-encodes grpc-message; local reply texts are plain ASCII.
        let encoded: String = message
            .bytes()
            .map(|b| {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            parts.headers.insert(names::GRPC_MESSAGE, v);
        }
    }
    Response::from_parts(parts, Either::Right(Full::default()))
}

#[cfg(test)]
mod tests {
    /// A client cannot steer retries or timeouts through Envoy's control headers; other
    /// `x-envoy-*` headers and everything else pass.
    #[test]
    fn envoy_control_headers_are_removed_from_requests() {
        let mut h = http::HeaderMap::new();
        h.insert("x-envoy-retry-on", "5xx".parse().unwrap());
        h.insert("x-envoy-max-retries", "9".parse().unwrap());
        h.insert("x-envoy-expected-rq-timeout-ms", "300".parse().unwrap());
        h.insert("x-envoy-attempt-count", "2".parse().unwrap());
        h.insert("x-request-id", "a".parse().unwrap());
        let mut internal = h.clone();
        super::strip_envoy_controls(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["x-envoy-attempt-count", "x-request-id"]);
        // An internal request keeps what the router does not consume.
        super::strip_envoy_controls(&mut internal, true);
        let mut left: Vec<&str> = internal.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "x-envoy-attempt-count",
                "x-envoy-expected-rq-timeout-ms",
                "x-request-id"
            ]
        );
    }

    /// Envoy's words for upstream failures: body, flags and details.
    #[test]
    fn upstream_failures_are_answered_as_envoy_words_them() {
        use crate::cluster::UpstreamError;
        let refused = UpstreamError::Connect {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::Error::from_raw_os_error(111),
        };
        let detail = |r: &http::Response<super::ProxyBody>| {
            let l = r.extensions().get::<super::LocalReply>().unwrap();
            (l.details.to_string(), l.transport.clone())
        };
        let flags = |r: &http::Response<super::ProxyBody>| {
            r.headers()[super::names::X_WEFT_RESPONSE_FLAGS]
                .to_str()
                .unwrap()
                .to_string()
        };
        let once = super::upstream_failure(&refused, false, None);
        assert_eq!(once.status(), 503);
        assert_eq!(flags(&once), "UF");
        assert_eq!(
            detail(&once),
            (
                "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}".to_string(),
                Some("delayed connect error: Connection refused".to_string())
            )
        );
        let retried = super::upstream_failure(&refused, true, Some("URX"));
        assert_eq!(flags(&retried), "URX,UF");
        let reset = UpstreamError::Protocol {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: "bad".into(),
        };
        let bad = super::upstream_failure(&reset, false, None);
        assert_eq!((bad.status().as_u16(), flags(&bad)), (502, "UPE".into()));
        assert_eq!(
            detail(&bad),
            (
                "upstream_reset_before_response_started{protocol_error}".to_string(),
                None
            )
        );
    }

    #[test]
    fn the_server_header_is_overwritten_added_or_passed_as_configured() {
        use super::{HttpConnectionManager, ServerHeader, http_connection_manager};
        use http_connection_manager::ServerHeaderTransformation as T;
        let with = |name: &str, t: T| HttpConnectionManager {
            server_name: name.into(),
            server_header_transformation: t as i32,
            ..Default::default()
        };
        let upstream = || {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::SERVER, "nginx".parse().unwrap());
            h
        };
        let run = |hcm: &HttpConnectionManager, mut h: http::HeaderMap| {
            ServerHeader::from_xds(hcm).unwrap().apply(&mut h);
            h.get(http::header::SERVER)
                .map(|v| v.to_str().unwrap().to_string())
        };
        // Envoy's defaults: "envoy", overwriting.
        let default = HttpConnectionManager::default();
        assert_eq!(run(&default, upstream()).as_deref(), Some("envoy"));
        assert_eq!(
            run(&default, http::HeaderMap::new()).as_deref(),
            Some("envoy")
        );
        let istio = with("istio-envoy", T::Overwrite);
        assert_eq!(run(&istio, upstream()).as_deref(), Some("istio-envoy"));
        let absent = with("istio-envoy", T::AppendIfAbsent);
        assert_eq!(run(&absent, upstream()).as_deref(), Some("nginx"));
        assert_eq!(
            run(&absent, http::HeaderMap::new()).as_deref(),
            Some("istio-envoy")
        );
        let pass = with("istio-envoy", T::PassThrough);
        assert_eq!(run(&pass, upstream()).as_deref(), Some("nginx"));
        assert_eq!(run(&pass, http::HeaderMap::new()), None);
        // Bad values are named.
        let bad = with("bad\nname", T::Overwrite);
        assert_eq!(ServerHeader::from_xds(&bad).unwrap_err().0, "server_name");
        let unknown = HttpConnectionManager {
            server_header_transformation: 9,
            ..Default::default()
        };
        assert_eq!(
            ServerHeader::from_xds(&unknown).unwrap_err().0,
            "server_header_transformation"
        );
    }

    #[test]
    fn milliseconds_are_written_in_decimal() {
        use std::time::Duration;
        for (ms, text) in [
            (0, "0"),
            (7, "7"),
            (10, "10"),
            (42, "42"),
            (99, "99"),
            (100, "100"),
        ] {
            assert_eq!(super::milliseconds(Duration::from_millis(ms)), text);
        }
        assert_eq!(
            super::milliseconds(Duration::from_micros(12_999)),
            "12",
            "whole milliseconds"
        );
        assert_eq!(super::milliseconds(Duration::from_secs(86_400)), "86400000");
    }

    #[test]
    fn the_router_may_suppress_envoys_headers() {
        use super::{
            ConnectionManager, HttpConnectionManager, RouterConfig, http_connection_manager,
        };
        use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
            HttpFilter, http_filter,
        };
        let with = |router: RouterConfig| HttpConnectionManager {
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(
                Default::default(),
            )),
            http_filters: vec![HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(weft_xds_proto::pack(
                    &router,
                ))),
                ..Default::default()
            }],
            ..Default::default()
        };
        let on = ConnectionManager::from_xds("l", &with(RouterConfig::default())).unwrap();
        assert!(on.envoy_headers);
        let off = ConnectionManager::from_xds(
            "l",
            &with(RouterConfig {
                suppress_envoy_headers: true,
                ..Default::default()
            }),
        )
        .unwrap();
        assert!(!off.envoy_headers);
        // Connection manager fields that would change answers and are not implemented are
        // refused by name.
        let strip = HttpConnectionManager {
            strip_matching_host_port: true,
            ..with(RouterConfig::default())
        };
        let err = ConnectionManager::from_xds("l", &strip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http_connection_manager.strip_matching_host_port"),
            "{err}"
        );
    }

    #[test]
    fn hop_by_hop_lengths_are_those_of_the_names() {
        for h in &super::HOP_BY_HOP {
            assert!(super::hop_by_hop_length(h.as_str().len()), "{h}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("x-kept", "1"),
            ("content-length", "3"),
        ] {
            h.append(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        super::strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "te", "x-kept"]);
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let a = super::request_id();
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert_eq!(s.matches('-').count(), 4);
        assert_ne!(super::request_id(), a);
    }
}
