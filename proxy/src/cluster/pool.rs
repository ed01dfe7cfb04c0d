//! Upstream connection pools, one per endpoint: keep-alive HTTP/1.1 connections (driven by the
//! requests themselves, see `h1`) reused oldest first and trimmed to the recent demand, or one
//! multiplexed HTTP/2 connection. The request's authority is kept as the client sent it; the pool only decides
//! which socket carries it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::h1::{self, Home as _};
use crate::stats::{Counter, Gauge};

/// What goes upstream: a body streamed through, or a buffered copy that a retry can send
/// again.
pub type UpstreamBody = http_body_util::Either<StreamedBody, http_body_util::Full<bytes::Bytes>>;

/// A body streamed upstream: the client's as it comes (`Left`), or, for a request that may be
/// retried, the client's with a copy kept for the next attempt (`Right`, see [`super::tee`]).
pub type StreamedBody = http_body_util::Either<DownstreamBody, super::tee::TeeBody>;

/// A request body as the client sends it: read by hyper (`Left`: HTTP/2, streamed HTTP/1.1
/// bodies), or already read whole by weft-proxy's own HTTP/1.1 server (`Right`).
pub type DownstreamBody = http_body_util::Either<CountedBody, http_body_util::Full<bytes::Bytes>>;

/// A request body still coming from the client: read by hyper (HTTP/1.1 bodies it streams),
/// or by weft-proxy's HTTP/2 server.
#[derive(Debug)]
pub enum RequestSource {
    Hyper(Incoming),
    H2(crate::http::H2RequestBody),
}

impl From<Incoming> for RequestSource {
    fn from(b: Incoming) -> Self {
        RequestSource::Hyper(b)
    }
}

impl From<crate::http::H2RequestBody> for RequestSource {
    fn from(b: crate::http::H2RequestBody) -> Self {
        RequestSource::H2(b)
    }
}

impl http_body::Body for RequestSource {
    type Data = bytes::Bytes;
    type Error = h1::BoxError;

    #[inline]
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, h1::BoxError>>> {
        match self.get_mut() {
            RequestSource::H2(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestSource::Hyper(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestSource::H2(b) => b.is_end_stream(),
            RequestSource::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            RequestSource::H2(b) => b.size_hint(),
            RequestSource::Hyper(b) => b.size_hint(),
        }
    }
}

/// A body read from the client as it comes, counting the bytes that came through when an
/// access log wants them (`%BYTES_RECEIVED%`).
#[derive(Debug)]
pub struct CountedBody {
    inner: RequestSource,
    count: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Notes each frame for the request's timeouts (a body that streams).
    progress: Option<Arc<crate::http::timeouts::BodyProgress>>,
}

impl CountedBody {
    /// `counted`: keep a count (see [`CountedBody::counter`]); `progress`: note each frame
    /// there.
    pub fn new(
        inner: RequestSource,
        counted: bool,
        progress: Option<Arc<crate::http::timeouts::BodyProgress>>,
    ) -> CountedBody {
        CountedBody {
            inner,
            count: counted.then(Default::default),
            progress,
        }
    }

    /// The bytes read so far, shared with whoever logs the request.
    pub fn counter(&self) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        self.count.clone()
    }
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = h1::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, h1::BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(count), std::task::Poll::Ready(Some(Ok(frame)))) = (&this.count, &polled)
            && let Some(data) = frame.data_ref()
        {
            count.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if let (Some(progress), std::task::Poll::Ready(frame)) = (&this.progress, &polled) {
            let end = !matches!(frame, Some(Ok(f)) if f.is_data()) || this.inner.is_end_stream();
            progress.frame(end);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream's response body: read by hyper's HTTP/2 client (`Left`), or straight from an
/// HTTP/1.1 connection (`Right`).
pub type UpstreamResponseBody = http_body_util::Either<Incoming, h1::ResponseBody>;

/// The upstream request's head, in the upstream's HTTP version with the client's authority;
/// built once per request and sent by each attempt.
#[derive(Debug, Clone, Default)]
pub struct UpstreamHead {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    /// This attempt's `x-envoy-attempt-count`, kept out of `headers`: the HTTP/1.1 encoder
    /// writes it after them, so numbering an attempt costs no header map insert.
    pub attempt: Option<u32>,
}

/// An attempt's number as `x-envoy-attempt-count`'s value (the first few without an
/// allocation): the HTTP/1.1 encoder, HTTP/2 requests, upgrades and answers all write it so.
pub fn attempt_count(n: u32) -> http::HeaderValue {
    const SMALL: [&str; 5] = ["1", "2", "3", "4", "5"];
    match SMALL.get(n.wrapping_sub(1) as usize) {
        Some(v) => http::HeaderValue::from_static(v),
        None => http::HeaderValue::from(n),
    }
}

impl UpstreamHead {
    /// A request with this head: taken when `give`, else copied.
    pub fn request(
        head: &mut UpstreamHead,
        give: bool,
        body: UpstreamBody,
    ) -> Request<UpstreamBody> {
        let head = if give {
            std::mem::take(head)
        } else {
            head.clone()
        };
        let mut req = Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;
        if let Some(n) = head.attempt {
            req.headers_mut()
                .insert(crate::http::names::X_ENVOY_ATTEMPT_COUNT, attempt_count(n));
        }
        req
    }
}

/// Most HTTP/1.1 connections kept per endpoint and worker (Envoy's default max_connections).
const MAX_IDLE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("connection to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream {addr} reset the request: {source}")]
    Reset {
        addr: SocketAddr,
        source: h1::BoxError,
    },
    #[error("upstream {addr} broke HTTP/1.1: {source}")]
    Protocol {
        addr: SocketAddr,
        source: h1::BoxError,
    },
}

impl UpstreamError {
    /// Envoy's words for the failure: the stream's reset reason, the response flag, and the
    /// connection's failure reason when it has one (`%UPSTREAM_TRANSPORT_FAILURE_REASON%`).
    pub fn reset_reason(&self) -> (&'static str, &'static str, Option<String>) {
        match self {
            UpstreamError::ConnectTimeout(_) => ("connection timeout", "UF", None),
            UpstreamError::Connect { source, .. } => (
                "remote connection failure",
                "UF",
                Some(format!("delayed connect error: {}", os_message(source))),
            ),
            UpstreamError::Handshake { source, .. } => (
                "remote connection failure",
                "UF",
                Some(format!("HTTP/2 handshake error: {source}")),
            ),
            UpstreamError::Tls { source, .. } => (
                "remote connection failure",
                "UF",
                Some(format!("TLS error: {source}")),
            ),
            UpstreamError::Reset { .. } => ("connection termination", "UC", None),
            UpstreamError::Protocol { .. } => ("protocol error", "UPE", None),
        }
    }

    /// True when no byte reached the upstream (Envoy's `UF`, connect-failure).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectTimeout(_)
                | UpstreamError::Connect { .. }
                | UpstreamError::Handshake { .. }
                | UpstreamError::Tls { .. }
        )
    }
}

/// The system's message for an I/O error, without Rust's " (os error N)" suffix
/// ("Connection refused").
fn os_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// An upstream connection: plain TCP, or TLS over it (the cluster's transport socket).
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// The connection's local address (one `getsockname`).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            UpstreamStream::Plain(s) => s.local_addr().ok(),
            UpstreamStream::Tls(s) => s.get_ref().0.local_addr().ok(),
        }
    }
}

impl tokio::io::AsyncRead for UpstreamStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connection counters an endpoint shares with its pool.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub cx_total: Counter,
    pub cx_active: Arc<Gauge>,
    pub cx_connect_fail: Counter,
}

/// A pooled HTTP/1.1 connection: how many requests it carried and since when it waits.
struct Idle {
    conn: h1::Conn,
    since: std::time::Instant,
}

/// A worker's idle HTTP/1.1 connections, and how many its requests held at once lately.
#[derive(Default)]
struct IdlePool {
    queue: VecDeque<Idle>,
    /// Connections out of the pool carrying a request now.
    busy: usize,
    /// The most `busy` reached in this window and in the one before.
    peak: usize,
    last_peak: usize,
    window: Option<std::time::Instant>,
}

/// How long a burst's demand keeps its connections pooled.
const DEMAND_WINDOW: Duration = Duration::from_secs(1);
/// Connections kept beyond the recent peak.
const SPARE: usize = 4;

impl IdlePool {
    fn roll(&mut self, now: std::time::Instant) {
        match self.window {
            Some(start) if now.duration_since(start) < DEMAND_WINDOW => {}
            _ => {
                self.last_peak = self.peak;
                self.peak = self.busy;
                self.window = Some(now);
            }
        }
    }

    /// How many connections (busy and idle) to keep: the recent peak and a few spare. After a
    /// burst the pool shrinks to what the traffic uses instead of cycling through every
    /// connection the burst opened.
    fn keep(&self) -> usize {
        (self.peak.max(self.last_peak) + SPARE).min(MAX_IDLE)
    }
}

/// Counts a request as holding one of a worker's connections until dropped (also when the
/// request is abandoned), or until its response body takes over (`h1::Home`).
struct Busy(Option<Arc<WorkerConnections>>);

impl Busy {
    fn start(w: Arc<WorkerConnections>) -> Busy {
        let mut pool = w.idle.lock().unwrap_or_else(|p| p.into_inner());
        pool.roll(std::time::Instant::now());
        pool.busy += 1;
        pool.peak = pool.peak.max(pool.busy);
        drop(pool);
        Busy(Some(w))
    }

    /// The response body now holds the connection: it reports back through `h1::Home`.
    fn hand_over(mut self) -> Arc<WorkerConnections> {
        self.0.take().expect("a Busy is handed over once")
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.done(None);
        }
    }
}

/// One worker's connections to the endpoint.
#[derive(Default)]
struct WorkerConnections {
    idle: Mutex<IdlePool>,
    limits: ConnectionLimits,
    /// The worker's HTTP/2 connection: its sender, the streams it carried, its local address.
    h2: Mutex<Option<H2Conn>>,
}

impl std::fmt::Debug for WorkerConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("WorkerConnections")
            .field("idle", &idle.queue.len())
            .field("busy", &idle.busy)
            .finish()
    }
}

impl WorkerConnections {
    /// The connection returned longest ago that is still open and not idle past
    /// `idle_timeout` (the others are closed on the way).
    fn take_idle(&self) -> Option<h1::Conn> {
        let mut pool = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(entry) = pool.queue.pop_front() {
            let expired = self
                .limits
                .idle_timeout
                .is_some_and(|t| entry.since.elapsed() >= t)
                || !self.limits.reusable(0, entry.conn.opened);
            if !expired && entry.conn.idle_ok() {
                return Some(entry.conn);
            }
        }
        None
    }
}

impl h1::Home for WorkerConnections {
    /// A request let go of its connection: pooled again unless it has carried
    /// max_requests_per_connection or the pool holds more than the recent demand needs (it is
    /// closed then).
    fn done(&self, conn: Option<h1::Conn>) {
        let now = std::time::Instant::now();
        let mut pool = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        pool.roll(now);
        if let Some(conn) = conn
            && self.limits.reusable(conn.uses, conn.opened)
            && pool.queue.len() + pool.busy <= pool.keep()
        {
            // `busy` still counts this connection.
            pool.queue.push_back(Idle { conn, since: now });
        }
        pool.busy = pool.busy.saturating_sub(1);
    }
}

/// What an attempt got so far, for access logs when a timeout drops it midway: the host
/// picked and the local address of the connection carrying the request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Attempted {
    pub host: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// Which attempt it is, from 1.
    pub number: u32,
}

/// A worker's HTTP/2 connection to the endpoint.
#[derive(Debug)]
struct H2Conn {
    sender: http2::SendRequest<UpstreamBody>,
    /// Streams it has carried.
    uses: u32,
    opened: std::time::Instant,
    local: Option<SocketAddr>,
}

/// Per-connection limits (the cluster's `common_http_protocol_options`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Close a connection after this many requests.
    pub max_requests: Option<u32>,
    /// Close a pooled connection idle this long.
    pub idle_timeout: Option<Duration>,
    /// Send no new request on a connection older than this (`max_connection_duration`): it is
    /// closed once its requests are done.
    pub max_duration: Option<Duration>,
}

impl ConnectionLimits {
    /// Whether a connection opened at `opened` that carried `uses` requests may carry another.
    fn reusable(&self, uses: u32, opened: std::time::Instant) -> bool {
        self.max_requests.is_none_or(|m| uses < m)
            && self.max_duration.is_none_or(|d| opened.elapsed() < d)
    }
}

/// How connections to an endpoint are opened: the cluster's `connect_timeout` and
/// `upstream_connection_options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dial {
    pub timeout: Duration,
    /// `tcp_keepalive`: `SO_KEEPALIVE` on, the parts given replacing the kernel's defaults.
    pub keepalive: Option<Keepalive>,
}

impl Default for Dial {
    /// Envoy's: a connect timeout of 5 s, no keepalive.
    fn default() -> Dial {
        Dial {
            timeout: Duration::from_secs(5),
            keepalive: None,
        }
    }
}

/// Linux's largest `TCP_KEEPIDLE` and `TCP_KEEPINTVL` (seconds) and `TCP_KEEPCNT`.
const KEEPALIVE_MAX_SECONDS: u32 = 32767;
const KEEPALIVE_MAX_PROBES: u32 = 127;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keepalive {
    pub time: Option<u32>,
    pub interval: Option<u32>,
    pub probes: Option<u32>,
}

impl Keepalive {
    /// An Envoy `TcpKeepalive`, or the field the kernel would refuse and why (Envoy accepts
    /// such a value and then fails every connection it opens: 503 `UF`).
    pub fn from_xds(
        k: &weft_xds_proto::envoy::config::core::v3::TcpKeepalive,
    ) -> Result<Keepalive, (&'static str, String)> {
        // 0 leaves the kernel's default, as in Envoy.
        let within = |field: &'static str, v: Option<u32>, max: u32, unit: &str| match v {
            Some(n) if n > max => Err((field, format!("{n} is over {max}{unit} (Linux's limit)"))),
            _ => Ok(v.filter(|n| *n > 0)),
        };
        Ok(Keepalive {
            time: within(
                "keepalive_time",
                k.keepalive_time.as_ref().map(|v| v.value),
                KEEPALIVE_MAX_SECONDS,
                " seconds",
            )?,
            interval: within(
                "keepalive_interval",
                k.keepalive_interval.as_ref().map(|v| v.value),
                KEEPALIVE_MAX_SECONDS,
                " seconds",
            )?,
            probes: within(
                "keepalive_probes",
                k.keepalive_probes.as_ref().map(|v| v.value),
                KEEPALIVE_MAX_PROBES,
                "",
            )?,
        })
    }
}

impl Dial {
    /// The socket options of a new connection.
    fn configure(&self, stream: TcpStream) -> std::io::Result<TcpStream> {
        let _ = stream.set_nodelay(true);
        if let Some(k) = &self.keepalive {
            let mut params = socket2::TcpKeepalive::new();
            if let Some(t) = k.time {
                params = params.with_time(Duration::from_secs(t.into()));
            }
            if let Some(i) = k.interval {
                params = params.with_interval(Duration::from_secs(i.into()));
            }
            if let Some(p) = k.probes {
                params = params.with_retries(p);
            }
            socket2::SockRef::from(&stream).set_tcp_keepalive(&params)?;
        }
        Ok(stream)
    }
}

/// Connections are kept per worker (see `worker`): a worker only uses connections its own
/// runtime drives, so a request never wakes another thread. The mutexes are uncontended.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    protocol: UpstreamProtocol,
    dial: Dial,
    limits: ConnectionLimits,
    /// TLS towards this endpoint (the cluster's transport socket, or the transport socket
    /// match the endpoint's metadata selects).
    pub tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// Per worker thread (and one more for the other threads), made when that thread first
    /// uses the endpoint: most endpoints of a large mesh never carry a request from a given
    /// sidecar, and a set per worker for every endpoint was ~400 bytes each (5 MB of a
    /// 12,000-endpoint mesh's 41 MiB).
    workers: Box<[std::sync::OnceLock<Arc<WorkerConnections>>]>,
    pub stats: PoolStats,
}

impl Pool {
    pub fn new(
        addr: SocketAddr,
        protocol: UpstreamProtocol,
        dial: Dial,
        limits: ConnectionLimits,
        tls: Option<Arc<crate::tls::UpstreamTls>>,
    ) -> Pool {
        Pool {
            addr,
            protocol,
            dial,
            limits,
            tls,
            workers: (0..=crate::worker::count())
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            stats: PoolStats::default(),
        }
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// Sends a request (its head already in the upstream's form: origin-form URI and Host
    /// header for HTTP/1.1, absolute URI for HTTP/2) and returns the response head. HTTP/1.1
    /// writes the head from where it is; HTTP/2 (hyper) needs a request of its own, which takes
    /// the head when `give` (the request's last attempt) and copies it otherwise. `seen`
    /// (access logs) learns the local address of the connection as soon as the request has one.
    pub async fn send(
        &self,
        head: &mut UpstreamHead,
        give: bool,
        body: UpstreamBody,
        seen: Option<&Mutex<Attempted>>,
    ) -> Result<Response<UpstreamResponseBody>, UpstreamError> {
        match self.protocol {
            UpstreamProtocol::Http1 => self.send_h1(head, body, seen).await,
            UpstreamProtocol::Http2 => {
                self.send_h2(UpstreamHead::request(head, give, body), seen)
                    .await
            }
        }
    }

    async fn send_h1(
        &self,
        head: &UpstreamHead,
        body: UpstreamBody,
        seen: Option<&Mutex<Attempted>>,
    ) -> Result<Response<UpstreamResponseBody>, UpstreamError> {
        let worker = self.mine();
        let busy = Busy::start(worker.clone());
        let mut body = h1::Outgoing::of(body);
        let mut wire = h1::RequestHead::encode(head, &body);
        // A pooled connection the upstream closed just now fails before any answer; the
        // request starts over on the next connection when it safely can (`stale`).
        loop {
            let (mut conn, reused) = match worker.take_idle() {
                Some(c) => (c, true),
                None => (Box::pin(self.connect_h1()).await?, false),
            };
            conn.uses += 1;
            if let Some(s) = seen {
                crate::lock_own(s).local = conn.local;
            }
            match h1::exchange(&mut conn, &mut wire, &mut body).await {
                Ok(resp) => {
                    let home: Arc<dyn h1::Home> = busy.hand_over();
                    let body = h1::ResponseBody::new(conn, &resp, home);
                    let mut out = Response::new(http_body_util::Either::Right(body));
                    *out.status_mut() = resp.status;
                    *out.version_mut() = resp.version;
                    *out.headers_mut() = resp.headers;
                    return Ok(out);
                }
                Err(e) if reused && e.stale(&wire, &body) => {
                    wire = h1::RequestHead::encode(head, &body);
                }
                Err(e) if e.protocol => {
                    return Err(UpstreamError::Protocol {
                        addr: self.addr,
                        source: e.source,
                    });
                }
                Err(e) => {
                    return Err(UpstreamError::Reset {
                        addr: self.addr,
                        source: e.source,
                    });
                }
            }
        }
    }

    fn mine(&self) -> &Arc<WorkerConnections> {
        let i = crate::worker::current().min(self.workers.len() - 1);
        self.workers[i].get_or_init(|| {
            Arc::new(WorkerConnections {
                limits: self.limits,
                ..Default::default()
            })
        })
    }

    /// A new connection to the endpoint (TLS when the cluster says so), counted in the pool's
    /// stats. The HTTP pool, the TCP proxy and upgrades all connect through here.
    pub async fn connect(&self) -> Result<UpstreamStream, UpstreamError> {
        self.connect_to(self.addr).await
    }

    /// As `connect`, to another port of the host (health checks' `alt_port`).
    pub async fn connect_to(&self, addr: SocketAddr) -> Result<UpstreamStream, UpstreamError> {
        let connected = tokio::time::timeout(self.dial.timeout, TcpStream::connect(addr)).await;
        let stream = match connected.map(|c| c.and_then(|s| self.dial.configure(s))) {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                self.stats.cx_connect_fail.inc();
                return Err(UpstreamError::Connect { addr, source });
            }
            Err(_) => {
                self.stats.cx_connect_fail.inc();
                return Err(UpstreamError::ConnectTimeout(addr));
            }
        };
        self.stats.cx_total.inc();
        let Some(tls) = &self.tls else {
            return Ok(UpstreamStream::Plain(stream));
        };
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let handshake = connector.connect(tls.server_name.clone(), stream);
        match tokio::time::timeout(self.dial.timeout, handshake).await {
            Ok(Ok(s)) => Ok(UpstreamStream::Tls(Box::new(s))),
            Ok(Err(source)) => {
                self.stats.cx_connect_fail.inc();
                Err(UpstreamError::Tls { addr, source })
            }
            Err(_) => {
                self.stats.cx_connect_fail.inc();
                Err(UpstreamError::ConnectTimeout(addr))
            }
        }
    }

    async fn connect_h1(&self) -> Result<h1::Conn, UpstreamError> {
        let stream = self.connect().await?;
        Ok(h1::Conn::new(stream, self.stats.cx_active.clone()))
    }

    async fn connect_h2(
        &self,
    ) -> Result<(http2::SendRequest<UpstreamBody>, Option<SocketAddr>), UpstreamError> {
        let stream = self.connect().await?;
        let local = stream.local_addr();
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.handshake_failed(source))?;
        self.drive(conn);
        *self.mine().h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(H2Conn {
            sender: sender.clone(),
            uses: 1,
            opened: std::time::Instant::now(),
            local,
        });
        Ok((sender, local))
    }

    fn handshake_failed(&self, source: hyper::Error) -> UpstreamError {
        UpstreamError::Handshake {
            addr: self.addr,
            source,
        }
    }

    /// Runs a connection's I/O on this worker, counted as active until it closes.
    fn drive<F: std::future::Future + Send + 'static>(&self, conn: F) {
        let active = self.stats.cx_active.clone();
        active.inc();
        tokio::spawn(async move {
            let _ = conn.await;
            active.dec();
        });
    }

    async fn send_h2(
        &self,
        req: Request<UpstreamBody>,
        seen: Option<&Mutex<Attempted>>,
    ) -> Result<Response<UpstreamResponseBody>, UpstreamError> {
        // Take the shared connection and count this stream on it; after
        // max_requests_per_connection streams the next request opens a fresh connection.
        let existing = {
            let mut h2 = self.mine().h2.lock().unwrap_or_else(|p| p.into_inner());
            let usable = h2
                .as_ref()
                .is_some_and(|c| !c.sender.is_closed() && self.limits.reusable(c.uses, c.opened));
            if usable {
                h2.as_mut().map(|c| {
                    c.uses += 1;
                    (c.sender.clone(), c.local)
                })
            } else {
                *h2 = None;
                None
            }
        };
        let (mut sender, local) = match existing {
            Some(s) => s,
            None => Box::pin(self.connect_h2()).await?,
        };
        if let Some(s) = seen {
            crate::lock_own(s).local = local;
        }
        sender
            .send_request(req)
            .await
            .map(|resp| resp.map(http_body_util::Either::Left))
            .map_err(|source| UpstreamError::Reset {
                addr: self.addr,
                source: source.into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of plain HTTP/1.1 connections with the defaults.
    fn plain_http1(addr: SocketAddr) -> Pool {
        Pool::new(
            addr,
            UpstreamProtocol::Http1,
            Dial::default(),
            Default::default(),
            None,
        )
    }

    #[test]
    fn a_workers_connections_to_an_endpoint_are_made_when_it_first_uses_it() {
        // A large mesh's sidecar knows thousands of endpoints and sends to few of them.
        let addr = "127.0.0.1:9".parse().unwrap();
        let pool = plain_http1(addr);
        assert!(pool.workers.iter().all(|w| w.get().is_none()));
        let first = Arc::as_ptr(pool.mine());
        assert_eq!(pool.workers.iter().filter(|w| w.get().is_some()).count(), 1);
        assert_eq!(Arc::as_ptr(pool.mine()), first, "made once, then kept");
    }

    #[tokio::test]
    async fn a_request_on_a_connection_the_upstream_closes_starts_over_whole_on_a_new_one() {
        use http_body_util::BodyExt as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Every request head the upstream reads, with the number of its connection.
        let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
        tokio::spawn(async move {
            for n in 0.. {
                let (mut s, _) = listener.accept().await.unwrap();
                let heads_tx = heads_tx.clone();
                tokio::spawn(async move {
                    // The first connection answers one request and closes as the next comes
                    // (a keep-alive timeout running out as the proxy reuses the connection).
                    for answered in 0.. {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        let _ = heads_tx.send((n, String::from_utf8_lossy(&head).into_owned()));
                        if n == 0 && answered == 1 {
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        s.write_all(ok).await.unwrap();
                    }
                });
            }
        });
        let pool = plain_http1(addr);
        for path in ["/first", "/second"] {
            let mut head = UpstreamHead {
                uri: path.parse().unwrap(),
                ..Default::default()
            };
            head.headers
                .insert(http::header::HOST, http::HeaderValue::from_static("up"));
            let body = http_body_util::Either::Right(http_body_util::Full::new(Default::default()));
            let send = pool.send(&mut head, false, body, None);
            let resp = tokio::time::timeout(Duration::from_secs(10), send)
                .await
                .expect("an answer")
                .unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&got[..], b"ok", "{path}");
        }
        let second = "GET /second HTTP/1.1\r\nhost: up\r\n\r\n";
        let mut seen = Vec::new();
        while let Ok(h) = heads.try_recv() {
            seen.push(h);
        }
        assert_eq!(
            seen,
            [
                (0, "GET /first HTTP/1.1\r\nhost: up\r\n\r\n".to_string()),
                (0, second.to_string()),
                (1, second.to_string())
            ],
            "the request went out again, whole, on a new connection"
        );
        assert_eq!(pool.stats.cx_total.get(), 2);
    }

    #[tokio::test]
    async fn new_connections_get_the_clusters_keepalive() {
        use weft_xds_proto::envoy::config::core::v3::TcpKeepalive;
        use weft_xds_proto::wkt::UInt32Value;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let value = |value| Some(UInt32Value { value });
        let open = |keepalive| {
            let dial = Dial {
                keepalive,
                ..Dial::default()
            };
            async move {
                let pool = Pool::new(
                    addr,
                    UpstreamProtocol::Http1,
                    dial,
                    Default::default(),
                    None,
                );
                match pool.connect().await.unwrap() {
                    UpstreamStream::Plain(s) => s,
                    _ => unreachable!("no TLS asked"),
                }
            }
        };
        // Each field given replaces the kernel's default; 0 leaves it, as in Envoy.
        let given = Keepalive::from_xds(&TcpKeepalive {
            keepalive_time: value(7),
            keepalive_interval: value(3),
            keepalive_probes: value(4),
        })
        .unwrap();
        let s = open(Some(given)).await;
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
        let defaults = socket2::SockRef::from(&open(None).await)
            .tcp_keepalive_time()
            .unwrap();
        let partial = Keepalive::from_xds(&TcpKeepalive {
            keepalive_time: value(0),
            keepalive_probes: value(2),
            ..Default::default()
        })
        .unwrap();
        let s = open(Some(partial)).await;
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), defaults);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 2);
        // Without it, no keepalive.
        assert!(
            !socket2::SockRef::from(&open(None).await)
                .keepalive()
                .unwrap()
        );
        // What the kernel would refuse is refused with its field.
        let err = Keepalive::from_xds(&TcpKeepalive {
            keepalive_probes: value(128),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.0, "keepalive_probes");
        assert!(err.1.contains("over 127"), "{}", err.1);
        let err = Keepalive::from_xds(&TcpKeepalive {
            keepalive_interval: value(40_000),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.0, "keepalive_interval");
    }

    /// After a burst, the pool keeps what the recent traffic used: the burst's peak for the
    /// rest of its window and the next one, then the new peak plus a few spare connections.
    #[test]
    fn the_idle_pool_shrinks_to_the_recent_demand() {
        let t0 = std::time::Instant::now();
        let mut pool = IdlePool::default();
        pool.roll(t0);
        pool.busy = 500;
        pool.peak = 500;
        assert_eq!(pool.keep(), 504);
        pool.busy = 50;
        pool.roll(t0 + DEMAND_WINDOW);
        assert_eq!((pool.peak, pool.last_peak), (50, 500));
        assert_eq!(
            pool.keep(),
            504,
            "the burst still counts for one more window"
        );
        pool.roll(t0 + DEMAND_WINDOW * 2);
        assert_eq!(pool.keep(), 54);
        pool.roll(t0 + DEMAND_WINDOW * 2 + Duration::from_millis(10));
        assert_eq!(pool.keep(), 54, "within a window nothing rolls");
        pool.peak = 5000;
        assert_eq!(pool.keep(), MAX_IDLE);
    }
}
