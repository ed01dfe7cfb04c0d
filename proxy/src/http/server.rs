//! weft-proxy's own HTTP/1.1 server loop for the requests a mesh sees most: no body, or a
//! `content-length` body of at most 64 KiB (read whole before routing, which retries need
//! anyway). One loop per connection reads a head, routes it through the same request path as
//! every other request, and writes the answer as it streams, head and small bodies in one
//! write. Everything else goes to hyper for the rest of the connection, the bytes already read
//! included: HTTP/2 (by its preface), chunked or larger request bodies, `Upgrade`, `CONNECT`
//! and `Expect`.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::cluster::DownstreamBody;
use crate::cluster::h1::{self, BodyEnd, BodyFraming, push_header};
use crate::http::timeouts::{Clock, Expired, Timeouts};

/// Most header lines in a request head (Envoy's default `max_headers_count`).
const MAX_HEADERS: usize = 100;
/// Largest body this loop reads itself; larger ones stream through hyper.
const MAX_BODY: u64 = 64 * 1024;

/// How the loop ended.
pub enum End<S> {
    Closed,
    /// The rest of the connection is hyper's, starting with the bytes already read.
    Handoff(Prefixed<S>),
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
    /// `delayed_close_timeout`, for when hyper ends the connection.
    linger: Linger,
}

/// A connection's close as [`linger_close`] does it, for connections hyper ends (it shuts the
/// connection down, then lets it go).
struct Linger {
    delay: Option<std::time::Duration>,
    /// The close (FIN) is sent.
    shut: bool,
    until: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Linger {
    fn new(delay: Option<std::time::Duration>) -> Linger {
        Linger {
            delay,
            shut: false,
            until: None,
        }
    }
}

/// How HTTP/2's connection preface begins (it reads as a request line with version 2.0).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl<S> Prefixed<S> {
    /// The connection opened with HTTP/2's preface.
    pub fn is_http2(&self) -> bool {
        self.prefix.starts_with(H2_PREFACE)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let linger = &mut this.linger;
        if !linger.shut {
            let shut = std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
            linger.shut = true;
            if shut.is_err() {
                return Poll::Ready(shut);
            }
        }
        let Some(delay) = linger.delay else {
            return Poll::Ready(Ok(()));
        };
        let until = linger
            .until
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
        let mut sink = [0; 2048];
        loop {
            if until.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut sink);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                // The client closed too, or its connection failed: nothing more to wait for.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A request head this loop serves itself.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body_len: u64,
    /// The client asked for the connection to end after this exchange.
    close: bool,
}

impl Head {
    fn into_request(self, body: Full<Bytes>) -> Request<DownstreamBody> {
        let mut req = Request::new(http_body_util::Either::Right(body));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

// Returned once per request and matched at once: boxing the head would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Partial,
    /// The head, taken out of the buffer.
    Complete(Head),
    /// Not for this loop: hyper takes the connection from this request on.
    Handoff,
    /// Refused with this status; the connection closes.
    Invalid(StatusCode, &'static str),
}

/// An answer's body as this loop writes it: it may name the stream's idle timeout, which also
/// bounds how long the client may take to read it, and is told when that cut it short.
pub trait Answer: http_body::Body<Data = Bytes> + Unpin {
    /// The stream's idle timeout (None: none).
    fn stream_idle(&self) -> Option<std::time::Duration> {
        None
    }

    /// The client read nothing for the stream's idle timeout: the answer is cut short.
    fn cut_idle(&mut self) {}
}

impl Answer for Full<Bytes> {}

/// The connection while an answer is written: a write that waits longer than the stream's
/// idle timeout for the client to take bytes fails (`TimedOut`). The timer is made only once a
/// write has had to wait.
struct Stalled<'a, S> {
    io: &'a mut S,
    idle: Option<std::time::Duration>,
    timer: Option<(Pin<Box<tokio::time::Sleep>>, tokio::time::Instant)>,
}

impl<S: AsyncWrite + Unpin> Stalled<'_, S> {
    /// Notes the outcome of a write or flush: progress moves the deadline, a wait arms it.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let Some(idle) = self.idle else {
            return polled;
        };
        match polled {
            Poll::Pending => {
                let (sleep, last) = self.timer.get_or_insert_with(|| {
                    let now = tokio::time::Instant::now();
                    (Box::pin(tokio::time::sleep_until(now + idle)), now)
                });
                let last = *last;
                crate::http::timeouts::poll_deadline(sleep, cx, || last + idle).map(|()| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client read nothing for the stream idle timeout",
                    ))
                })
            }
            ready => {
                if let Some((_, last)) = &mut self.timer {
                    *last = tokio::time::Instant::now();
                }
                ready
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stalled<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write(cx, buf);
        this.timed(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write_vectored(cx, bufs);
        this.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_flush(cx);
        this.timed(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// An answer the loop gives itself when a request cannot be read (or not in time): the
/// connection closes after it. As Envoy's: its status, plain-text body, response flag and
/// response code details (for the access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub body: &'static str,
    pub flags: &'static str,
    pub details: &'static str,
}

impl Refusal {
    /// A request the HTTP/1.1 codec refuses: the reason phrase as its body, `DPE`.
    fn codec(status: StatusCode) -> Refusal {
        Refusal {
            status,
            body: status.canonical_reason().unwrap_or(""),
            flags: "DPE",
            // As Envoy's HTTP/1.1 codec names them.
            details: match status {
                StatusCode::UPGRADE_REQUIRED => "low_version",
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "http1.headers_too_large",
                _ => "http1.codec_error",
            },
        }
    }

    fn expired(what: Expired) -> Refusal {
        let (status, body, flags, details) = what.reply();
        Refusal {
            status,
            body,
            flags,
            details,
        }
    }
}

/// Serves requests on `io` until it closes or a request needs hyper. `refused` logs what the
/// loop answered itself (with when the request began, and the request when its head was read,
/// its body as far as it came).
pub async fn serve<S, F, Fut, B>(
    mut io: S,
    timeouts: Arc<Timeouts>,
    max_head: usize,
    accept_http_10: bool,
    handle: F,
    refused: impl Fn(Refusal, usize, Option<tokio::time::Instant>, Option<Request<DownstreamBody>>),
) -> End<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Request<DownstreamBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Answer,
    B::Error: Into<h1::BoxError>,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out = Vec::with_capacity(4 * 1024);
    let delayed_close = timeouts.delayed_close;
    let mut clock = Clock::new(timeouts);
    // Refuses the request being read and ends the connection.
    macro_rules! refuse {
        ($refusal:expr) => {
            refuse!($refusal, None)
        };
        ($refusal:expr, $req:expr) => {{
            let refusal = $refusal;
            let sent = reply_error(&mut io, &refusal).await;
            refused(refusal, sent, clock.began(), $req);
            Box::pin(linger_close(&mut io, delayed_close)).await;
            return End::Closed;
        }};
    }
    loop {
        // 1. A whole head, within the connection's idle deadline while none has begun, and
        //    the request's deadlines (`Clock`) once one has.
        let head = loop {
            if !buf.is_empty() {
                match parse(&mut buf, accept_http_10, max_head) {
                    Parsed::Complete(head) => {
                        clock.head_done();
                        break head;
                    }
                    Parsed::Partial if buf.len() >= max_head => {
                        tracing::debug!("refused a request: its head is over {max_head} bytes");
                        refuse!(Refusal::codec(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
                    }
                    Parsed::Partial => {}
                    Parsed::Handoff => {
                        return End::Handoff(Prefixed {
                            prefix: buf.freeze(),
                            inner: io,
                            linger: Linger::new(delayed_close),
                        });
                    }
                    Parsed::Invalid(status, why) => {
                        tracing::debug!("refused a request: {why}");
                        refuse!(Refusal::codec(status));
                    }
                }
            }
            match read_more(&mut io, &mut buf, &mut clock).await {
                Ok(true) => {}
                Ok(false) | Err(Read::Failed) | Err(Read::Expired(Expired::Connection)) => {
                    return End::Closed;
                }
                Err(Read::Expired(what)) => refuse!(Refusal::expired(what)),
            }
        };
        // 2. Its body, when it has one.
        while (buf.len() as u64) < head.body_len {
            match read_more(&mut io, &mut buf, &mut clock).await {
                Ok(true) => {}
                Ok(false) | Err(Read::Failed) | Err(Read::Expired(Expired::Connection)) => {
                    return End::Closed;
                }
                Err(Read::Expired(what)) => {
                    // Logged with the request, and the part of its body that came.
                    let partial = Full::new(buf.split().freeze());
                    refuse!(Refusal::expired(what), Some(head.into_request(partial)))
                }
            }
        }
        let body = if head.body_len == 0 {
            Bytes::new()
        } else {
            buf.split_to(head.body_len as usize).freeze()
        };
        let head_method = head.method == Method::HEAD;
        let version = head.version;
        clock.serving();
        let close = head.close;
        let req = head.into_request(Full::new(body));
        // 3. The request path, then the answer as it streams.
        // Pinned in place and awaited through the pin: `handle(req).await` would keep room
        // for the request's future twice in this loop's own (~6 KB each) and copy it from
        // one to the other on every request.
        let resp = std::pin::pin!(handle(req)).await;
        // The client's wish, or the connection's limits (draining, requests served, age).
        let mut close = close || clock.must_close();
        match write_response(&mut io, &mut out, resp, version, head_method, &mut close).await {
            Ok(()) if !close => clock.answered(),
            _ => {
                Box::pin(linger_close(&mut io, delayed_close)).await;
                return End::Closed;
            }
        }
    }
}

/// Ends a connection this side closes, as Envoy's `delayed_close_timeout` does: the answer is
/// out and the close (FIN) sent, then what the client still sends is read and dropped until it
/// closes too or the delay passes. A socket closed with bytes unread resets the connection, and
/// a reset can destroy the answer at the client before it is read (a client still sending a
/// refused request's head or body, pipelined requests after a `connection: close`).
async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    delay: Option<std::time::Duration>,
) {
    // The same close as hyper's connections get (`Prefixed::poll_shutdown`).
    let mut closing = Prefixed {
        prefix: Bytes::new(),
        inner: io,
        linger: Linger::new(delay),
    };
    let _ = closing.shutdown().await;
}

/// Why a read brought nothing.
enum Read {
    Failed,
    Expired(Expired),
}

/// Reads once more into `buf`, within the deadline that applies: `Ok(false)` at the end of
/// the stream.
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    clock: &mut Clock,
) -> Result<bool, Read> {
    buf.reserve(8 * 1024);
    let n = clock
        .race(io.read_buf(buf))
        .await
        .map_err(Read::Expired)?
        .map_err(|_| Read::Failed)?;
    if n > 0 {
        clock.read(tokio::time::Instant::now());
    }
    Ok(n > 0)
}

/// Parses the request head at the start of `buf`, taking it out when this loop serves it; a
/// head over `max_head` bytes is refused (431).
fn parse(buf: &mut BytesMut, accept_http_10: bool, max_head: usize) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) if len > max_head => {
            return Parsed::Invalid(
                StatusCode::from_u16(431).unwrap_or(StatusCode::BAD_REQUEST),
                "head too large",
            );
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // HTTP/2's preface reads as a request line with version 2.0.
        Err(_) if buf.starts_with(H2_PREFACE) => return Parsed::Handoff,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(
                StatusCode::from_u16(431).unwrap_or(StatusCode::BAD_REQUEST),
                "too many headers",
            );
        }
        Err(_) => return Parsed::Invalid(StatusCode::BAD_REQUEST, "malformed request"),
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid(StatusCode::BAD_REQUEST, "malformed request");
    };
    if minor == 0 && !accept_http_10 {
        return Parsed::Invalid(StatusCode::UPGRADE_REQUIRED, "HTTP/1.0 is not accepted");
    }
    if method == "CONNECT" {
        return Parsed::Handoff;
    }
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // What decides whether this loop serves the request, read off the raw header lines.
    let mut body_len: Option<u64> = None;
    let mut keep_alive_token = false;
    let mut close_token = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if let Err(why) = h1::fold_content_length(h.value, &mut body_len) {
                return Parsed::Invalid(StatusCode::BAD_REQUEST, why);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Parsed::Handoff;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                close_token |= t.eq_ignore_ascii_case(b"close");
                keep_alive_token |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > MAX_BODY {
        return Parsed::Handoff;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Invalid(StatusCode::BAD_REQUEST, "invalid method");
    };
    let Ok(uri) = Uri::try_from(path) else {
        return Parsed::Invalid(StatusCode::BAD_REQUEST, "invalid request target");
    };
    let spans = h1::HeaderSpans::of(buf, req.headers);
    let head = buf.split_to(len).freeze();
    // The request path adds `x-request-id`, `x-forwarded-proto`, sometimes `te` and a route's
    // additions.
    let Ok(headers) = spans.header_map(&head, 4) else {
        return Parsed::Invalid(StatusCode::BAD_REQUEST, "invalid header");
    };
    let close = match version {
        Version::HTTP_10 => !keep_alive_token,
        _ => close_token,
    };
    Parsed::Complete(Head {
        method,
        uri,
        version,
        headers,
        body_len,
        close,
    })
}

/// The request could not be read (or not in time): a plain answer, then the connection
/// closes. Returns the body's length (for the access log), whether or not the client took it.
async fn reply_error<S: AsyncWrite + Unpin>(io: &mut S, refusal: &Refusal) -> usize {
    let status = refusal.status;
    let body = refusal.body;
    let text = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\ndate: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        String::from_utf8_lossy(&http_date()),
    );
    if io.write_all(text.as_bytes()).await.is_ok() {
        let _ = io.flush().await;
    }
    body.len()
}

/// Writes the answer: head and body in as few writes as the body's pace allows. Sets `close`
/// when the connection cannot carry another request.
async fn write_response<S, B>(
    io: &mut S,
    out: &mut Vec<u8>,
    resp: Response<B>,
    version: Version,
    head_method: bool,
    close: &mut bool,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
    B: Answer,
    B::Error: Into<h1::BoxError>,
{
    let (parts, mut body) = resp.into_parts();
    // A client that takes nothing for the stream's idle timeout has the answer cut short.
    let mut io = Stalled {
        io,
        idle: body.stream_idle(),
        timer: None,
    };
    let io = &mut io;
    let status = parts.status;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut declared = None;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            // A value that is not a length is not trusted: the body's own size decides.
            let mut n = None;
            declared = h1::fold_content_length(value.as_bytes(), &mut n)
                .ok()
                .and(n);
        } else if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            // Framing and connection handling are this hop's.
            continue;
        } else if name == header::DATE {
            has_date = true;
        }
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !has_date {
        push_header(out, b"date", &http_date());
    }
    let bodiless = head_method
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        // A HEAD answer still tells the length a GET would have had.
        if head_method
            && declared.is_none()
            && let Some(n) = body.size_hint().exact()
        {
            push_header(out, b"content-length", n.to_string().as_bytes());
        }
        None
    } else if let Some(n) = declared {
        Some(BodyFraming::Length(n))
    } else if let Some(n) = body.size_hint().exact() {
        push_header(out, b"content-length", n.to_string().as_bytes());
        Some(BodyFraming::Length(n))
    } else if version == Version::HTTP_11 {
        push_header(out, b"transfer-encoding", b"chunked");
        Some(BodyFraming::Chunked)
    } else {
        *close = true;
        Some(BodyFraming::Close)
    };
    if *close {
        push_header(out, b"connection", b"close");
    } else if version == Version::HTTP_10 {
        push_header(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    let Some(framing) = framing else {
        // The body (empty for these) is dropped unread; its access log line is written then.
        drop(body);
        return io.write_all(out).await;
    };
    let written = h1::write_body(io, out, &mut body, framing, h1::unanswered).await;
    if let Err(e) = &written
        && e.kind() == io::ErrorKind::TimedOut
    {
        body.cut_idle();
    }
    match written? {
        BodyEnd::Complete => {}
        // The upstream failed mid-body, or sent more or less than it declared: what was sent
        // stands, the connection ends so that the client sees the answer incomplete.
        // (`Answered` does not come: `unanswered` never is.)
        BodyEnd::Failed(_) | BodyEnd::WrongLength | BodyEnd::Answered => *close = true,
    }
    Ok(())
}

/// The `date` header's value, formatted once a second per thread.
pub(super) fn http_date() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static CACHE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHE.with(|c| {
        let (at, text) = c.get();
        if at == secs {
            return text;
        }
        let mut fresh = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        let n = formatted.len().min(29);
        fresh[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        c.set((secs, fresh));
        fresh
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn head(raw: &[u8]) -> Parsed {
        parse(&mut BytesMut::from(raw), true, 60 * 1024)
    }

    #[test]
    fn heads_this_loop_serves_and_those_it_hands_to_hyper() {
        let mut buf = BytesMut::from(&b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\nrest"[..]);
        let Parsed::Complete(h) = parse(&mut buf, true, 60 * 1024) else {
            panic!("complete");
        };
        assert_eq!(
            &buf[..],
            b"rest",
            "the head is taken out, what follows stays"
        );
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri, "/a?b=1");
        assert_eq!(h.headers.get("host").unwrap(), "x");
        assert_eq!(h.body_len, 0);
        assert!(!h.close);
        let Parsed::Complete(h) =
            head(b"POST / HTTP/1.0\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n")
        else {
            panic!("complete");
        };
        assert_eq!(h.body_len, 3);
        assert!(!h.close, "HTTP/1.0 with keep-alive");
        let Parsed::Complete(h) = head(b"GET / HTTP/1.0\r\n\r\n") else {
            panic!("complete");
        };
        assert!(h.close, "HTTP/1.0 closes by default");
        assert!(
            matches!(
                parse(
                    &mut BytesMut::from(&b"GET / HTTP/1.0\r\n\r\n"[..]),
                    false,
                    60 * 1024
                ),
                Parsed::Invalid(StatusCode::UPGRADE_REQUIRED, _)
            ),
            "HTTP/1.0 refused unless accept_http_10, as Envoy"
        );
        // A whole head over the limit is refused too, not only one still arriving.
        let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(2048));
        assert!(matches!(
            parse(&mut BytesMut::from(big.as_bytes()), true, 2048),
            Parsed::Invalid(s, _) if s.as_u16() == 431
        ));
        assert!(matches!(
            head(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
        for handoff in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n",
        ] {
            assert!(
                matches!(head(handoff), Parsed::Handoff),
                "{}",
                String::from_utf8_lossy(handoff)
            );
        }
        for bad in [
            &b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: 1\r\n\r\n",
            b"G@T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(head(bad), Parsed::Invalid(..)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Serves `input` on an in-memory connection with a handler answering `answer`, returns
    /// what the client received.
    async fn exchange(
        input: &[u8],
        answer: fn(&Request<DownstreamBody>) -> Response<Full<Bytes>>,
    ) -> String {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            serve(
                server,
                Arc::new(Timeouts::default()),
                60 * 1024,
                true,
                |req| {
                    let resp = answer(&req);
                    async move {
                        // The body was read whole.
                        let body = req.into_body().collect().await.map(|c| c.to_bytes());
                        let mut resp = resp;
                        if let Ok(b) = body
                            && !b.is_empty()
                        {
                            *resp.body_mut() = Full::new(b);
                        }
                        resp
                    }
                },
                |_, _, _, _| {},
            )
            .await
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        wr.write_all(input).await.unwrap();
        wr.shutdown().await.unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        let _ = task.await;
        String::from_utf8_lossy(&got).into_owned()
    }

    fn ok(_: &Request<DownstreamBody>) -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from_static(b"hello")))
    }

    #[tokio::test]
    async fn keep_alive_pipelining_bodies_and_closing() {
        let got = exchange(
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\necho",
            ok,
        )
        .await;
        assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{got}");
        assert!(got.contains("content-length: 5\r\n"), "{got}");
        assert!(got.contains("date: "), "{got}");
        assert!(got.ends_with("\r\n\r\necho"), "{got}");

        let got = exchange(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n", ok).await;
        assert_eq!(
            got.matches("HTTP/1.1 200").count(),
            1,
            "HTTP/1.0 closes: {got}"
        );
        assert!(got.contains("connection: close\r\n"), "{got}");

        let got = exchange(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", ok).await;
        assert!(got.contains("content-length: 5\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\n"), "no body for HEAD: {got}");

        let got = exchange(
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            ok,
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got}");
    }
}
