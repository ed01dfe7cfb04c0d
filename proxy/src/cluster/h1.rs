//! HTTP/1.1 towards upstreams, driven by the request's own task: the request head is written
//! and the response head read by the future that asked for them, and the response body is
//! read by whoever polls it (the downstream connection writing it out). No task per
//! connection, no channel between the request and its connection; a connection whose response
//! is complete goes back to its pool from the body itself.
//!
//! Framing follows RFC 9112: requests carry `content-length` when their size is known and are
//! chunked otherwise; responses are delimited by `transfer-encoding: chunked`, by
//! `content-length` (all values equal), or by the connection's close, and have no body for HEAD
//! requests and 1xx/204/304 statuses. Interim 1xx responses are skipped. A response whose
//! framing is ambiguous or invalid is an error, never passed on as something else.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body as _, Frame};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pool::UpstreamStream;
use crate::stats::Gauge;

/// Most header lines a response head may carry (Envoy's default `max_headers_count`).
const MAX_HEADERS: usize = 100;
/// Largest response head (and trailer block), as the downstream side allows.
const MAX_HEAD: usize = 96 * 1024;
/// Bytes read from the upstream at a time.
const READ_CHUNK: usize = 16 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An open HTTP/1.1 connection to an upstream: the stream and what was read past the last
/// response. Counted in the pool's active connections while it exists.
pub struct Conn {
    io: UpstreamStream,
    read: BytesMut,
    /// The connection's local address, for access logs.
    pub local: Option<std::net::SocketAddr>,
    /// Requests this connection has carried.
    pub uses: u32,
    /// When it was opened (for the cluster's `max_connection_duration`).
    pub opened: std::time::Instant,
    _active: Active,
}

struct Active(Arc<Gauge>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Conn {
    pub fn new(io: UpstreamStream, active: Arc<Gauge>) -> Conn {
        active.inc();
        Conn {
            local: io.local_addr(),
            io,
            read: BytesMut::new(),
            uses: 0,
            opened: std::time::Instant::now(),
            _active: Active(active),
        }
    }

    /// True when nothing happened on the idle connection since its last response: the upstream
    /// neither closed it nor sent unsolicited bytes. Reads readiness only (no system call: a
    /// drained socket has its readiness cleared, and a close or new bytes set it again).
    pub fn idle_ok(&self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let tcp = match &self.io {
            UpstreamStream::Plain(s) => s,
            UpstreamStream::Tls(s) => s.get_ref().0,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        tcp.poll_read_ready(&mut cx).is_pending()
    }
}

/// The request body as the exchange sends it: bytes that can be sent again on another
/// connection, or the client's stream, sent once.
pub enum Outgoing {
    Bytes(Bytes),
    Stream(Option<super::StreamedBody>),
}

impl Outgoing {
    /// The body an attempt carries: bytes kept for retries, or the client's stream.
    pub fn of(body: super::UpstreamBody) -> Outgoing {
        match body {
            http_body_util::Either::Left(stream) => Outgoing::Stream(Some(stream)),
            // `Full` yields its one frame at once, and cannot fail.
            http_body_util::Either::Right(mut full) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let bytes = match Pin::new(&mut full).poll_frame(&mut cx) {
                    Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
                    _ => Bytes::new(),
                };
                Outgoing::Bytes(bytes)
            }
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Outgoing::Bytes(_))
    }
}

/// How a body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    Length(u64),
    Chunked,
    /// Until the connection closes (responses to HTTP/1.0 clients).
    Close,
}

/// The request head in wire form. Its buffer becomes the exchange's write buffer (the head is
/// not copied again): a stale pooled connection's retry encodes the head anew.
pub struct RequestHead {
    bytes: Vec<u8>,
    framing: BodyFraming,
    /// HEAD requests' responses have no body whatever their headers say.
    head_method: bool,
    idempotent: bool,
}

impl RequestHead {
    /// Encodes the request line and headers (the URI already in origin form, Host set), adding
    /// the body's framing when the client's headers do not give it.
    pub fn encode(head: &super::UpstreamHead, body: &Outgoing) -> RequestHead {
        let (method, uri, headers) = (&head.method, &head.uri, &head.headers);
        // Room for what the exchange copies after the head: as much of the body as is at hand.
        // Sized to that, a bodiless request's buffer stays small enough for the allocator's
        // per-thread cache (a fixed kilobyte of room made every request take and free a larger
        // block, ~1,000 instructions).
        let room = match body {
            Outgoing::Bytes(b) if b.len() < COPY_LIMIT => b.len(),
            Outgoing::Bytes(_) => 0,
            Outgoing::Stream(_) => 1024,
        };
        let mut out = Vec::with_capacity(256 + room);
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        out.extend_from_slice(if target.is_empty() {
            b"/"
        } else {
            target.as_bytes()
        });
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let Some(n) = head.attempt {
            let value = super::pool::attempt_count(n);
            push_header(&mut out, b"x-envoy-attempt-count", value.as_bytes());
        }
        let declared = content_length(headers).ok().flatten();
        let framing = match (declared, body) {
            (Some(n), _) => BodyFraming::Length(n),
            (None, Outgoing::Bytes(b)) => {
                // As hyper and Envoy: a known empty body is only announced for methods that
                // usually carry one.
                if !b.is_empty() || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                    push_header(&mut out, b"content-length", b.len().to_string().as_bytes());
                }
                BodyFraming::Length(b.len() as u64)
            }
            (None, Outgoing::Stream(s)) => {
                if s.as_ref().is_none_or(|s| s.is_end_stream()) {
                    BodyFraming::Length(0)
                } else {
                    push_header(&mut out, b"transfer-encoding", b"chunked");
                    BodyFraming::Chunked
                }
            }
        };
        out.extend_from_slice(b"\r\n");
        RequestHead {
            bytes: out,
            framing,
            head_method: *method == Method::HEAD,
            idempotent: method.is_idempotent(),
        }
    }
}

/// Wire helpers shared by the upstream client and the downstream server.
pub(crate) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One chunk of a chunked body.
pub(crate) fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body, with its trailers.
pub(crate) fn push_last_chunk(out: &mut Vec<u8>, trailers: &HeaderMap) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Folds one `content-length` field value (a list of equal numbers, as some senders repeat
/// it) into the length found so far; an error when a value is not a number or disagrees.
pub(crate) fn fold_content_length(
    value: &[u8],
    found: &mut Option<u64>,
) -> Result<(), &'static str> {
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err("invalid content-length");
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        match *found {
            Some(m) if m != n => return Err("conflicting content-length values"),
            _ => *found = Some(n),
        }
    }
    Ok(())
}

/// Where each header line of a parsed head sits in its buffer, so that the header map can
/// hold slices of the head's bytes instead of copies.
pub(crate) struct HeaderSpans {
    /// The first `FEW_LINES` lines' spans: most heads have no more, and a vector for every
    /// head was an allocation per message (a fixed array for MAX_HEADERS lines cost more to
    /// clear and move than that).
    few: [Span; FEW_LINES],
    len: usize,
    /// The lines after the first `FEW_LINES`.
    more: Vec<Span>,
}

/// A header line's name start and length, value start and length.
type Span = (u32, u32, u32, u32);
const FEW_LINES: usize = 16;

impl HeaderSpans {
    /// `headers` as parsed from `buf`.
    pub(crate) fn of(buf: &[u8], headers: &[httparse::Header<'_>]) -> HeaderSpans {
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        let mut spans = HeaderSpans {
            few: [(0, 0, 0, 0); FEW_LINES],
            len: headers.len(),
            more: Vec::new(),
        };
        for (i, h) in headers.iter().enumerate() {
            let span = (
                offset(h.name.as_bytes()),
                h.name.len() as u32,
                offset(h.value),
                h.value.len() as u32,
            );
            match spans.few.get_mut(i) {
                Some(slot) => *slot = span,
                None => spans.more.push(span),
            }
        }
        spans
    }

    fn iter(&self) -> impl Iterator<Item = &Span> {
        self.few[..self.len.min(FEW_LINES)].iter().chain(&self.more)
    }

    /// The header map, its values sharing `head` (the buffer's bytes, taken out of it), with
    /// room for `added` more headers, so that what the proxy adds on the way does not rehash
    /// and reallocate the map (it did, twice per proxied request: ~1,600 instructions). Not
    /// more room than needed either: glibc serves small allocations from its per-thread
    /// cache, larger ones take a slower path.
    pub(crate) fn header_map(&self, head: &Bytes, added: usize) -> Result<HeaderMap, &'static str> {
        self.header_map_keeping(head, added, |_, _| true)
    }

    /// The header map of the lines `keep` accepts (it sees each line's name and value).
    fn header_map_keeping<'h>(
        &self,
        head: &'h Bytes,
        added: usize,
        mut keep: impl FnMut(&HeaderName, &'h [u8]) -> bool,
    ) -> Result<HeaderMap, &'static str> {
        let mut headers = HeaderMap::with_capacity(self.len + added);
        for &(ns, nl, vs, vl) in self.iter() {
            let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
            let raw = &head[ns..ns + nl];
            let name = match common_name(raw) {
                Some(n) => n,
                None => HeaderName::from_bytes(raw).map_err(|_| "invalid header name")?,
            };
            if !keep(&name, &head[vs..vs + vl]) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                .map_err(|_| "invalid header value")?;
            headers.append(name, value);
        }
        Ok(headers)
    }
}

/// The header names on nearly every request and response, recognised by length, first and
/// last letter and one case-insensitive comparison: `HeaderName::from_bytes` lowercases into a
/// scratch buffer and searches every standard name (~140-150 instructions a name, six names a
/// proxied request, nine on a typical answer). `raw` is a name httparse accepted (a token):
/// for token bytes, setting bit 5 is ASCII lowercasing, and only a letter's upper case maps
/// onto a lowercase letter (the standard library's `eq_ignore_ascii_case` lowercases byte by
/// byte, costing more than the search it would save).
fn common_name(raw: &[u8]) -> Option<HeaderName> {
    let (&first, &last) = (raw.first()?, raw.last()?);
    let (candidate, lower): (HeaderName, &[u8]) = match (raw.len(), first | 0x20, last | 0x20) {
        (4, b'h', b't') => (header::HOST, b"host"),
        (4, b'd', b'e') => (header::DATE, b"date"),
        (4, b'e', b'g') => (header::ETAG, b"etag"),
        (4, b'v', b'y') => (header::VARY, b"vary"),
        (6, b's', b'r') => (header::SERVER, b"server"),
        (6, b'a', b't') => (header::ACCEPT, b"accept"),
        (6, b'c', b'e') => (header::COOKIE, b"cookie"),
        (7, b'e', b's') => (header::EXPIRES, b"expires"),
        (8, b'l', b'n') => (header::LOCATION, b"location"),
        (10, b'c', b'n') => (header::CONNECTION, b"connection"),
        (10, b'u', b't') => (header::USER_AGENT, b"user-agent"),
        (10, b's', b'e') => (header::SET_COOKIE, b"set-cookie"),
        (12, b'c', b'e') => (header::CONTENT_TYPE, b"content-type"),
        (12, b'x', b'd') => (crate::http::names::X_REQUEST_ID, b"x-request-id"),
        (13, b'a', b's') => (header::ACCEPT_RANGES, b"accept-ranges"),
        (13, b'a', b'n') => (header::AUTHORIZATION, b"authorization"),
        (13, b'c', b'l') => (header::CACHE_CONTROL, b"cache-control"),
        (13, b'l', b'd') => (header::LAST_MODIFIED, b"last-modified"),
        (14, b'c', b'h') => (header::CONTENT_LENGTH, b"content-length"),
        (15, b'a', b'g') => (header::ACCEPT_ENCODING, b"accept-encoding"),
        (15, b'a', b'e') => (header::ACCEPT_LANGUAGE, b"accept-language"),
        (16, b'c', b'g') => (header::CONTENT_ENCODING, b"content-encoding"),
        (17, b'x', b'o') => (crate::http::names::X_FORWARDED_PROTO, b"x-forwarded-proto"),
        (17, b't', b'g') => (header::TRANSFER_ENCODING, b"transfer-encoding"),
        _ => return None,
    };
    folded_eq(raw, lower).then_some(candidate)
}

/// `raw` (a token) equals `lower` (lowercase letters and `-`) ignoring ASCII case, with bit 5
/// set in each of `raw`'s bytes: a few word loads (overlapping at the end) instead of a loop
/// over bytes.
#[inline]
fn folded_eq(raw: &[u8], lower: &[u8]) -> bool {
    const FOLD: u64 = 0x2020_2020_2020_2020;
    let n = raw.len();
    if n != lower.len() {
        return false;
    }
    if n < 4 {
        return raw.iter().zip(lower).all(|(r, l)| r | 0x20 == *l);
    }
    if n < 8 {
        let word =
            |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        return (word(raw, 0) | FOLD as u32) == word(lower, 0)
            && (word(raw, n - 4) | FOLD as u32) == word(lower, n - 4);
    }
    let word = |b: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let mut at = 0;
    while at + 8 < n {
        if (word(raw, at) | FOLD) != word(lower, at) {
            return false;
        }
        at += 8;
    }
    (word(raw, n - 8) | FOLD) == word(lower, n - 8)
}

/// Response or request bytes gathered before a write.
const WRITE_BATCH: usize = 16 * 1024;
/// Body chunks at least this large are written from where they are (a vectored write after
/// the bytes gathered before them) instead of being copied into the gathered bytes.
const COPY_LIMIT: usize = 2048;

/// How writing a body ended, I/O errors aside.
pub(crate) enum BodyEnd {
    Complete,
    /// The body's source failed (a reset upstream or client).
    Failed(BoxError),
    /// The body was longer or shorter than its declared length; what fitted was written.
    WrongLength,
    /// The peer answered before the whole body went out (`answered`): the rest is not sent.
    Answered,
}

/// Writes `body` in `framing` after what `out` already holds (a head): frames that are ready
/// are gathered and written together, what is gathered is written before waiting for more,
/// and a chunked body ends with its trailers. `out` is left empty. While it waits for the
/// body, `answered` is polled too: once it is ready the peer has answered and nothing more is
/// sent.
pub(crate) async fn write_body<W, B, A>(
    io: &mut W,
    out: &mut Vec<u8>,
    body: &mut B,
    framing: BodyFraming,
    mut answered: A,
) -> io::Result<BodyEnd>
where
    W: tokio::io::AsyncWrite + Unpin,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    A: FnMut(&mut W, &mut Context<'_>) -> Poll<()>,
{
    use futures::FutureExt as _;
    use futures::future::Either;
    use http_body_util::BodyExt as _;
    let mut sent = 0u64;
    // A large chunk waiting to be written after `out`.
    let mut held: Option<Bytes> = None;
    let vectored = io.is_write_vectored();
    let end = loop {
        let frame = match body.frame().now_or_never() {
            Some(f) => f,
            None => {
                write_gathered(io, out, held.take()).await?;
                let answer = std::future::poll_fn(|cx| answered(io, cx));
                match futures::future::select(body.frame(), answer).await {
                    Either::Left((frame, _)) => frame,
                    Either::Right(_) => break BodyEnd::Answered,
                }
            }
        };
        match frame {
            None => {
                break match framing {
                    BodyFraming::Chunked => {
                        out.extend_from_slice(b"0\r\n\r\n");
                        BodyEnd::Complete
                    }
                    BodyFraming::Length(n) if sent != n => BodyEnd::WrongLength,
                    _ => BodyEnd::Complete,
                };
            }
            Some(Err(e)) => break BodyEnd::Failed(e.into()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    if let BodyFraming::Length(n) = framing
                        && sent > n
                    {
                        // More than declared is never passed on.
                        break BodyEnd::WrongLength;
                    }
                    if held.is_some() {
                        write_gathered(io, out, held.take()).await?;
                    }
                    match framing {
                        BodyFraming::Chunked => push_chunk(out, &data),
                        _ if vectored && data.len() >= COPY_LIMIT => held = Some(data),
                        _ => out.extend_from_slice(&data),
                    }
                    if out.len() >= WRITE_BATCH {
                        write_gathered(io, out, held.take()).await?;
                    }
                }
                Err(frame) => {
                    if let (Ok(trailers), BodyFraming::Chunked) = (frame.into_trailers(), framing) {
                        push_last_chunk(out, &trailers);
                        break BodyEnd::Complete;
                    }
                }
            },
        }
    };
    let written = write_gathered(io, out, held).await;
    out.clear();
    written?;
    Ok(end)
}

/// For `write_body` where no answer can come while the body goes out (a response's).
pub(crate) fn unanswered<W>(_: &mut W, _: &mut Context<'_>) -> Poll<()> {
    Poll::Pending
}

/// Writes `out`, then `held` (a large chunk that was not copied into it), and empties `out`.
async fn write_gathered<W>(io: &mut W, out: &mut Vec<u8>, held: Option<Bytes>) -> io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let Some(mut held) = held else {
        if !out.is_empty() {
            io.write_all(out).await?;
            out.clear();
        }
        return Ok(());
    };
    let mut done = 0;
    while done < out.len() {
        let slices = [io::IoSlice::new(&out[done..]), io::IoSlice::new(&held)];
        let n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_out = n.min(out.len() - done);
        done += from_out;
        held.advance(n - from_out);
    }
    out.clear();
    io.write_all(&held).await
}

/// The one `content-length` of a message: `Ok(None)` without one.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut found = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        fold_content_length(v.as_bytes(), &mut found)?;
    }
    Ok(found)
}

/// Why an exchange failed, and whether it can start over on another connection.
#[derive(Debug)]
pub struct ExchangeError {
    /// No byte of a response arrived: on a reused connection the upstream had closed it (or was
    /// closing it) before reading this request.
    pub nothing_received: bool,
    /// The request was not completely written.
    pub unsent: bool,
    /// The upstream's answer is not valid HTTP/1.1.
    pub protocol: bool,
    pub source: BoxError,
}

impl ExchangeError {
    /// A pooled connection turned out to be closed: the request may go out again on a new one
    /// when its body can be sent again and the upstream cannot have acted on it (it was not
    /// written, or it is idempotent and no answer began).
    pub fn stale(&self, head: &RequestHead, body: &Outgoing) -> bool {
        self.nothing_received && body.replayable() && (self.unsent || head.idempotent)
    }
}

/// A failure of the request's side (its body) or of the connection.
fn failure(unsent: bool, nothing_received: bool, e: impl Into<BoxError>) -> ExchangeError {
    ExchangeError {
        nothing_received,
        unsent,
        protocol: false,
        source: e.into(),
    }
}

fn protocol_error(reason: &str) -> ExchangeError {
    ExchangeError {
        nothing_received: false,
        unsent: false,
        protocol: true,
        source: format!("invalid HTTP/1.1 response from upstream: {reason}").into(),
    }
}

/// A response head, with how its body is delimited and whether the connection can carry
/// another request after it.
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    framing: Decode,
    keep_alive: bool,
}

/// Writes the request (head and body) and reads the response head. An upstream may answer
/// before it has the whole request (an early 413, a server that does not read bodies it has no
/// use for): its answer is passed on, and the rest of the request is not sent. Such an upstream
/// often closes at once, and the next bytes written bring back a reset: what it sent before is
/// still readable then, and is read before the write's failure is believed.
pub async fn exchange(
    conn: &mut Conn,
    head: &mut RequestHead,
    body: &mut Outgoing,
) -> Result<ResponseHead, ExchangeError> {
    let mut sending = Sending {
        io: &mut conn.io,
        read: &mut conn.read,
        head_method: head.head_method,
        answer: None,
        ended: false,
    };
    let sent = write_request(&mut sending, head, body).await;
    if let Err(Unsent::Connection(e)) = &sent
        && matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        )
    {
        // The connection is gone: what came before its end reads at once, then its end.
        std::future::poll_fn(|cx| match sending.poll_answer(cx) {
            Poll::Pending if !sending.ended => Poll::Pending,
            _ => Poll::Ready(()),
        })
        .await;
    }
    if let Some(answer) = sending.answer.take() {
        // The request is not whole on the wire: the connection carries nothing after it.
        return answer.map(|mut h| {
            h.keep_alive = false;
            h
        });
    }
    match sent {
        Ok(()) => read_head(conn, head.head_method).await,
        Err(Unsent::Connection(e)) => Err(failure(true, true, e)),
        Err(Unsent::Request(e)) => Err(e),
    }
}

/// Why a request did not go out whole.
enum Unsent {
    /// Writing to the upstream failed.
    Connection(io::Error),
    /// The request's body failed or did not match its length.
    Request(ExchangeError),
}

/// The upstream connection while a request goes out. Writes go through; when one has to wait
/// (the upstream reads no more) or the request's body is not ready yet, what the upstream sends
/// is read, so that an answer that comes before the whole request is seen, not waited out. The
/// request's own path pays nothing for it: nothing is read while writes go through at once.
struct Sending<'a> {
    io: &'a mut UpstreamStream,
    read: &'a mut BytesMut,
    head_method: bool,
    /// The final answer's head, or why what came is not one, once the upstream sent it.
    answer: Option<Result<ResponseHead, ExchangeError>>,
    /// The upstream closed or failed: nothing more will come to watch.
    ended: bool,
}

/// A write refused because the upstream has answered (`Sending::answer` holds it).
#[derive(Debug)]
struct Answered;

impl std::fmt::Display for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream answered before the whole request was sent")
    }
}

impl std::error::Error for Answered {}

impl Sending<'_> {
    /// Ready once a final answer's head (interim ones skipped) or an invalid one has come.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use std::future::Future as _;
        while self.answer.is_none() && !self.ended {
            match take_final(self.read, self.head_method) {
                Ok(None) => {}
                found => {
                    self.answer = found.transpose();
                    break;
                }
            }
            if self.read.len() >= MAX_HEAD {
                self.answer = Some(Err(protocol_error("response head too large")));
                break;
            }
            self.read.reserve(READ_CHUNK);
            match std::pin::pin!(self.io.read_buf(self.read)).poll(cx) {
                Poll::Ready(Ok(n)) => self.ended = n == 0,
                // What the failure means is the write's or the read's after it to say.
                Poll::Ready(Err(_)) => self.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.answer.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// A write that has to wait fails instead once the upstream has answered.
    fn waiting<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match write {
            Poll::Pending if self.poll_answer(cx).is_ready() => {
                Poll::Ready(Err(io::Error::other(Answered)))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for Sending<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let write = Pin::new(&mut *self.io).poll_write(cx, buf);
        self.waiting(cx, write)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let write = Pin::new(&mut *self.io).poll_write_vectored(cx, bufs);
        self.waiting(cx, write)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flush = Pin::new(&mut *self.io).poll_flush(cx);
        self.waiting(cx, flush)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

async fn write_request(
    io: &mut Sending<'_>,
    head: &mut RequestHead,
    body: &mut Outgoing,
) -> Result<(), Unsent> {
    // The head and as much of the body as is at hand go out together, gathered after the head
    // in its own buffer.
    let mut out = std::mem::take(&mut head.bytes);
    let answered = Sending::poll_answer;
    let end = match body {
        Outgoing::Bytes(b) => {
            let mut full = Full::new(b.clone());
            write_body(io, &mut out, &mut full, head.framing, answered).await
        }
        Outgoing::Stream(stream) => match stream.take() {
            Some(mut stream) => write_body(io, &mut out, &mut stream, head.framing, answered).await,
            // Already sent once (a stream is never replayed): nothing more to send.
            None => {
                let mut none = Full::new(Bytes::new());
                write_body(io, &mut out, &mut none, head.framing, answered).await
            }
        },
    }
    .map_err(Unsent::Connection)?;
    match end {
        BodyEnd::Complete => {}
        // `io.answer` holds the answer.
        BodyEnd::Answered => return Ok(()),
        BodyEnd::Failed(e) => return Err(Unsent::Request(failure(true, true, e))),
        BodyEnd::WrongLength => {
            return Err(Unsent::Request(failure(
                true,
                true,
                "request body does not match its content-length",
            )));
        }
    }
    io.flush().await.map_err(Unsent::Connection)
}

/// Takes the final response head at the start of `buf` out of it, interim answers (100
/// Continue, 103 Early Hints: not passed on) before it skipped: `None` while incomplete.
fn take_final(
    buf: &mut BytesMut,
    head_method: bool,
) -> Result<Option<ResponseHead>, ExchangeError> {
    while let Some(parsed) = parse_head(buf, head_method)? {
        if !parsed.status.is_informational() || parsed.status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Some(parsed));
        }
    }
    Ok(None)
}

/// Reads until a whole final response head is buffered, then parses it.
async fn read_head(conn: &mut Conn, head_method: bool) -> Result<ResponseHead, ExchangeError> {
    loop {
        if !conn.read.is_empty() {
            if let Some(parsed) = take_final(&mut conn.read, head_method)? {
                return Ok(parsed);
            }
            if conn.read.len() >= MAX_HEAD {
                return Err(protocol_error("response head too large"));
            }
        }
        conn.read.reserve(READ_CHUNK);
        let received = !conn.read.is_empty();
        match conn.io.read_buf(&mut conn.read).await {
            Ok(0) => {
                return Err(failure(
                    false,
                    !received,
                    "upstream closed the connection before a complete response head",
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(failure(false, !received, e)),
        }
    }
}

/// Parses the response head at the start of `buf` and takes it out: `None` when incomplete.
fn parse_head(
    buf: &mut BytesMut,
    head_method: bool,
) -> Result<Option<ResponseHead>, ExchangeError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        .map_err(|e| protocol_error(&e.to_string()))?;
    let httparse::Status::Complete(len) = parsed else {
        return Ok(None);
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| protocol_error("invalid status code"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let spans = HeaderSpans::of(buf, resp.headers);
    let head = buf.split_to(len).freeze();
    // The connection-level headers are read here and left out of the map: they are this
    // hop's (the answer goes on without them, as Envoy's codec drops them), and leaving them
    // out spares inserting, looking up and removing them again on every response.
    let mut hop = HopHeaders::default();
    // A response gets few headers on its way back (a `set-cookie` from a hash policy, a
    // route's additions).
    let mut headers = spans
        .header_map_keeping(&head, 1, |name, value| hop.take(name, value))
        .map_err(protocol_error)?;
    for name in &hop.named {
        headers.remove(name);
    }
    let reuse = match version {
        Version::HTTP_10 => hop.keep_alive,
        _ => !hop.close,
    };
    // After 101 the connection speaks another protocol: it never goes back to the pool.
    let mut keep_alive = status != StatusCode::SWITCHING_PROTOCOLS && reuse;
    let framing = if head_method
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Decode::Length(0)
    } else if let Some(te) = hop.transfer_encoding {
        // A message with both is a smuggling attempt or a broken server (RFC 9112 6.3): refused,
        // as Envoy refuses it.
        if hop.content_length != Ok(None) {
            return Err(protocol_error("both transfer-encoding and content-length"));
        }
        keep_alive = false;
        let last = te.rsplit(|b| *b == b',').next().unwrap_or_default();
        if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            if hop.transfer_encodings == 1 && !te.contains(&b',') {
                // Plain `chunked`, the usual case: the connection stays usable.
                keep_alive = reuse;
            }
            Decode::Chunked(Chunk::Size)
        } else {
            Decode::Close
        }
    } else {
        match hop.content_length.map_err(protocol_error)? {
            Some(n) => Decode::Length(n),
            None => {
                keep_alive = false;
                Decode::Close
            }
        }
    };
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// What a response head's connection-level lines say. HTTP/1.1 connections persist unless
/// `Connection: close`; HTTP/1.0 ones only with `Connection: keep-alive`.
struct HopHeaders<'a> {
    close: bool,
    keep_alive: bool,
    /// Other headers the `Connection` lines name: hop-by-hop too.
    named: Vec<HeaderName>,
    /// The last `transfer-encoding` line, and how many there were.
    transfer_encoding: Option<&'a [u8]>,
    transfer_encodings: usize,
    /// The one length all `content-length` values agree on, or why there is none. Judged
    /// only where the length delimits the body (a HEAD or 304 answer's is not read).
    content_length: Result<Option<u64>, &'static str>,
}

impl Default for HopHeaders<'_> {
    fn default() -> Self {
        HopHeaders {
            close: false,
            keep_alive: false,
            named: Vec::new(),
            transfer_encoding: None,
            transfer_encodings: 0,
            content_length: Ok(None),
        }
    }
}

impl<'a> HopHeaders<'a> {
    /// Reads one header line; true when it belongs in the message's header map.
    fn take(&mut self, name: &HeaderName, value: &'a [u8]) -> bool {
        if *name == header::CONTENT_LENGTH {
            if let Ok(found) = &mut self.content_length
                && let Err(e) = fold_content_length(value, found)
            {
                self.content_length = Err(e);
            }
            return true;
        }
        if *name == header::TRANSFER_ENCODING {
            self.transfer_encoding = Some(value);
            self.transfer_encodings += 1;
            return false;
        }
        if *name == header::CONNECTION {
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if let Some(other) = crate::http::connection_named(token) {
                    self.named.push(other);
                }
            }
            return false;
        }
        !crate::http::is_hop_by_hop(name)
    }
}

/// Where the body stands.
#[derive(Debug, Clone, Copy)]
enum Decode {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// Where a response's connection goes when the response is over.
pub trait Home: Send + Sync + 'static {
    /// Called once per response: with the connection when it can carry another request,
    /// `None` when it was closed (failed, dropped early, not reusable).
    fn done(&self, conn: Option<Conn>);
}

/// A response body read straight from the upstream connection; the connection goes home once
/// the body is complete (and is closed when the body is dropped before that).
pub struct ResponseBody {
    conn: Option<Conn>,
    state: Decode,
    keep_alive: bool,
    home: Option<Arc<dyn Home>>,
}

impl ResponseBody {
    /// The body of `head` read from `conn`; `home` takes the connection back when it can carry
    /// another request.
    pub fn new(conn: Conn, head: &ResponseHead, home: Arc<dyn Home>) -> ResponseBody {
        let mut body = ResponseBody {
            conn: Some(conn),
            state: head.framing,
            keep_alive: head.keep_alive,
            home: Some(home),
        };
        if matches!(body.state, Decode::Length(0)) {
            body.finish();
        }
        body
    }

    /// The body is complete: the connection goes home if it can carry another request.
    fn finish(&mut self) {
        self.state = Decode::Done;
        let keep = self.keep_alive;
        let conn = self.conn.take().filter(|c| keep && c.read.is_empty());
        if let Some(home) = self.home.take() {
            home.done(conn);
        }
    }

    /// The body cannot complete: the connection is closed.
    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.keep_alive = false;
        self.finish();
        Poll::Ready(Some(Err(e.into())))
    }

    /// Reads more from the upstream: `Ok(false)` at the end of the stream.
    fn fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        conn.read.reserve(READ_CHUNK);
        let before = conn.read.len();
        // One `read` call: the future holds nothing across polls.
        let mut fut = std::pin::pin!(conn.io.read_buf(&mut conn.read));
        ready!(fut.as_mut().poll(cx))?;
        Poll::Ready(Ok(conn.read.len() > before))
    }
}

use std::future::Future as _;

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.state {
                Decode::Done => return Poll::Ready(None),
                Decode::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Decode::Length(rest) => {
                    if conn.read.is_empty() {
                        match ready!(Self::fill(conn, cx)) {
                            Ok(true) => continue,
                            Ok(false) => {
                                return this.fail("upstream closed the connection mid-body");
                            }
                            Err(e) => return this.fail(e),
                        }
                    }
                    let take = rest.min(conn.read.len() as u64) as usize;
                    let data = conn.read.split_to(take).freeze();
                    this.state = Decode::Length(rest - take as u64);
                    if rest == take as u64 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Close => {
                    if conn.read.is_empty() {
                        match ready!(Self::fill(conn, cx)) {
                            Ok(true) => continue,
                            Ok(false) => {
                                this.keep_alive = false;
                                this.finish();
                                return Poll::Ready(None);
                            }
                            Err(e) => return this.fail(e),
                        }
                    }
                    let data = conn.read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Chunked(chunk) => match step_chunk(&mut conn.read, chunk) {
                    Ok(Step::Frame(next, frame)) => {
                        this.state = next;
                        if matches!(next, Decode::Done) {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Ok(Step::Next(next)) => {
                        this.state = next;
                        if matches!(next, Decode::Done) {
                            this.finish();
                            return Poll::Ready(None);
                        }
                    }
                    Ok(Step::NeedMore) => {
                        if conn.read.len() >= MAX_HEAD {
                            return this.fail("chunk header or trailers too large");
                        }
                        match ready!(Self::fill(conn, cx)) {
                            Ok(true) => {}
                            Ok(false) => {
                                return this.fail("upstream closed the connection mid-body");
                            }
                            Err(e) => return this.fail(e),
                        }
                    }
                    Err(reason) => return this.fail(reason),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, Decode::Done)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.state {
            Decode::Length(n) => http_body::SizeHint::with_exact(n),
            Decode::Done => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: the rest of the response is still on the wire.
        self.conn = None;
        if let Some(home) = self.home.take() {
            home.done(None);
        }
    }
}

enum Step {
    /// A frame to hand out, and the state after it.
    Frame(Decode, Frame<Bytes>),
    /// Framing consumed, nothing to hand out.
    Next(Decode),
    NeedMore,
}

/// One step of the chunked decoder over what is buffered.
fn step_chunk(buf: &mut BytesMut, chunk: Chunk) -> Result<Step, &'static str> {
    match chunk {
        Chunk::Size => match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete((used, size))) => {
                buf.advance(used);
                Ok(Step::Next(Decode::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                })))
            }
            Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
            Err(_) => Err("invalid chunk size line"),
        },
        Chunk::Data(rest) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = rest.min(buf.len() as u64) as usize;
            let data = buf.split_to(take).freeze();
            let next = if rest == take as u64 {
                Chunk::DataEnd
            } else {
                Chunk::Data(rest - take as u64)
            };
            Ok(Step::Frame(Decode::Chunked(next), Frame::data(data)))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err("chunk data not followed by CRLF");
            }
            buf.advance(2);
            Ok(Step::Next(Decode::Chunked(Chunk::Size)))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::Next(Decode::Done));
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut slots) {
                Ok(httparse::Status::Complete((used, parsed))) => {
                    let mut trailers = HeaderMap::with_capacity(parsed.len());
                    for h in parsed {
                        let name = HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|_| "invalid trailer name")?;
                        let value = HeaderValue::from_bytes(h.value)
                            .map_err(|_| "invalid trailer value")?;
                        trailers.append(name, value);
                    }
                    buf.advance(used);
                    Ok(Step::Frame(Decode::Done, Frame::trailers(trailers)))
                }
                Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
                Err(_) => Err("invalid trailers"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_header_names_are_the_parsers_names() {
        for raw in [
            "Host",
            "host",
            "DATE",
            "Server",
            "accept",
            "Connection",
            "User-Agent",
            "content-type",
            "X-Request-Id",
            "Content-Length",
            "Accept-Encoding",
            "X-Forwarded-Proto",
            "ETag",
            "vary",
            "Cookie",
            "Expires",
            "Location",
            "Set-Cookie",
            "Accept-Ranges",
            "Authorization",
            "Cache-Control",
            "Last-Modified",
            "accept-language",
            "Content-Encoding",
            "transfer-encoding",
        ] {
            let parsed = HeaderName::from_bytes(raw.as_bytes()).unwrap();
            assert_eq!(common_name(raw.as_bytes()), Some(parsed), "{raw}");
        }
        // Same length and first letter, other names: the general parser's business.
        for raw in [
            "hast",
            "dote",
            "accent",
            "connexion",
            "content-tipe",
            "x-request-ix",
            "accept-rangeS-",
            "last-modifiet",
            "authorizatiom",
            "x-forwarded-prot",
            "content-lengtH1",
            "X-Forwarded-Pr0to",
            "set-cookie\r",
            "",
        ] {
            assert_eq!(common_name(raw.as_bytes()), None, "{raw}");
        }
    }

    fn parse(raw: &[u8], head_method: bool) -> Result<Option<ResponseHead>, ExchangeError> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, head_method)
    }

    /// Runs the chunked decoder over `raw` fed in pieces of `step` bytes.
    fn dechunk(raw: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let mut buf = BytesMut::new();
        let mut input = raw.chunks(step);
        let mut state = Chunk::Size;
        let mut data = Vec::new();
        loop {
            match step_chunk(&mut buf, state)? {
                Step::Frame(next, frame) => {
                    match frame.into_data() {
                        Ok(d) => data.extend_from_slice(&d),
                        Err(f) => return Ok((data, f.into_trailers().ok())),
                    }
                    match next {
                        Decode::Chunked(c) => state = c,
                        _ => return Ok((data, None)),
                    }
                }
                Step::Next(Decode::Chunked(c)) => state = c,
                Step::Next(_) => return Ok((data, None)),
                Step::NeedMore => match input.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => return Err("incomplete"),
                },
            }
        }
    }

    #[test]
    fn response_heads_and_their_framing() {
        let head = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.status, 200);
        assert!(matches!(head.framing, Decode::Length(5)));
        assert!(head.keep_alive);
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);

        assert!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Le", false)
                .unwrap()
                .is_none()
        );

        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(
            matches!(head.framing, Decode::Length(0)),
            "HEAD has no body"
        );
        let head = parse(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(matches!(head.framing, Decode::Length(0)));

        let head = parse(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert!(matches!(head.framing, Decode::Close));
        assert!(
            !head.keep_alive,
            "read to close: the connection ends with the body"
        );

        let head = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive);
        let head = parse(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(head.keep_alive);
        let head = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!head.keep_alive);
    }

    #[test]
    fn connection_level_headers_stay_out_of_the_response_map() {
        let head = parse(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\n\
              X-Private: 1\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\n\
              Proxy-Connection: x\r\nTE: trailers\r\nX-Kept: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        let mut left: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["te", "x-kept"]);
        assert!(matches!(head.framing, Decode::Chunked(Chunk::Size)));
        assert!(head.keep_alive);

        let head = parse(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.headers.get("content-length").unwrap(), "2");
        assert!(head.headers.get("connection").is_none());
        assert!(!head.keep_alive);

        // A length that delimits nothing (a HEAD answer's) is passed on, not judged.
        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(matches!(head.framing, Decode::Length(0)));
        assert!(head.keep_alive);
    }

    #[test]
    fn heads_with_more_lines_than_kept_on_the_stack_keep_every_line_in_order() {
        for lines in [FEW_LINES - 1, FEW_LINES, FEW_LINES + 1, 3 * FEW_LINES] {
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..lines {
                // Repeated names too: a map keeps their values in order.
                raw.extend_from_slice(format!("x-line-{}: value-{i}\r\n", i % 5).as_bytes());
            }
            raw.extend_from_slice(b"content-length: 0\r\n\r\n");
            let head = parse(&raw, false).unwrap().unwrap();
            assert_eq!(head.headers.len(), lines + 1, "{lines} lines");
            for name in 0..5.min(lines) {
                let values: Vec<&str> = head
                    .headers
                    .get_all(format!("x-line-{name}"))
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect();
                let expected: Vec<String> = (name..lines)
                    .step_by(5)
                    .map(|i| format!("value-{i}"))
                    .collect();
                assert_eq!(values, expected, "{lines} lines");
            }
        }
    }

    #[test]
    fn ambiguous_or_invalid_framing_is_refused_or_made_safe() {
        let head = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(matches!(head.framing, Decode::Chunked(Chunk::Size)));
        assert!(head.keep_alive);

        let head = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(matches!(head.framing, Decode::Close));

        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n",
        ] {
            assert!(
                parse(bad, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Repeated but equal lengths are one length.
        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(matches!(head.framing, Decode::Length(3)));
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n";
        for step in [1, 2, 3, 7, raw.len()] {
            let (data, trailers) = dechunk(raw, step).unwrap();
            assert_eq!(data, b"hello world", "step {step}");
            assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");
        }
        let (data, trailers) = dechunk(b"3\r\nabc\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());
        assert!(dechunk(b"zz\r\n", 4).is_err());
        assert!(dechunk(b"3\r\nabcX\r\n", 9).is_err());
        assert!(dechunk(b"ffffffffffffffffff\r\n", 20).is_err());
    }

    /// Takes at most `max` bytes per write, vectored or not.
    struct Trickle {
        got: Vec<u8>,
        max: usize,
        vectored: bool,
    }

    impl Trickle {
        fn new(max: usize, vectored: bool) -> Trickle {
            Trickle {
                got: Vec::new(),
                max,
                vectored,
            }
        }
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.max - n);
                self.got.extend_from_slice(&buf[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn frames(
        sizes: &[usize],
    ) -> (
        Vec<u8>,
        impl http_body::Body<Data = Bytes, Error = BoxError>,
    ) {
        let chunks: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![b'a' + i as u8; n]))
            .collect();
        let all = chunks.concat();
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, BoxError>(Frame::data(c))),
        );
        (all, http_body_util::StreamBody::new(stream))
    }

    #[tokio::test]
    async fn bodies_are_written_whole_and_in_order_whatever_the_writes_take() {
        // Small chunks are copied after the head, large ones written from where they are:
        // either way the bytes arrive in order, through partial and vectored writes.
        let sizes = [100, 5000, 3000, 10, 2500, 2048, 1];
        for (max, vectored) in [(1000, true), (7, true), (1 << 20, true), (1000, false)] {
            let (all, body) = frames(&sizes);
            let mut body = std::pin::pin!(body);
            let mut io = Trickle::new(max, vectored);
            let mut out = b"HEAD\r\n\r\n".to_vec();
            let framing = BodyFraming::Length(all.len() as u64);
            let end = write_body(&mut io, &mut out, &mut body, framing, unanswered)
                .await
                .unwrap();
            assert!(matches!(end, BodyEnd::Complete));
            assert!(out.is_empty());
            assert_eq!(io.got[..8], *b"HEAD\r\n\r\n");
            assert!(io.got[8..] == all[..], "max {max}, vectored {vectored}");

            // Chunked framing: each chunk framed, large ones too.
            let (all, body) = frames(&sizes);
            let mut body = std::pin::pin!(body);
            let mut io = Trickle::new(max, vectored);
            write_body(
                &mut io,
                &mut Vec::new(),
                &mut body,
                BodyFraming::Chunked,
                unanswered,
            )
            .await
            .unwrap();
            let (data, trailers) = dechunk(&io.got, 13).unwrap();
            assert!(
                data == all && trailers.is_none(),
                "max {max}, vectored {vectored}"
            );
        }
        // A large chunk past the declared length is not passed on; what fitted was written.
        let (_, body) = frames(&[100, 5000]);
        let mut body = std::pin::pin!(body);
        let mut io = Trickle::new(1000, true);
        let end = write_body(
            &mut io,
            &mut Vec::new(),
            &mut body,
            BodyFraming::Length(4000),
            unanswered,
        )
        .await
        .unwrap();
        assert!(matches!(end, BodyEnd::WrongLength));
        assert_eq!(io.got, vec![b'a'; 100]);
    }

    /// A connection to a loopback upstream played by `serve`.
    async fn upstream<F, Fut>(serve: F) -> Conn
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            serve(s).await;
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        Conn::new(UpstreamStream::Plain(s), Arc::new(Gauge::default()))
    }

    /// Reads up to the end of the request head (and perhaps some body after it).
    async fn read_request_head(s: &mut tokio::net::TcpStream) {
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request head did not come");
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// An upstream that answers `answer` once it has the request's head, reading nothing more,
    /// and then closes or (`keep_open`) holds the connection.
    async fn answer_after_head(
        mut s: tokio::net::TcpStream,
        answer: &'static [u8],
        keep_open: bool,
    ) {
        read_request_head(&mut s).await;
        s.write_all(answer).await.unwrap();
        if keep_open {
            std::future::pending::<()>().await;
        }
    }

    /// `req`'s head as the exchange writes it, with `body`.
    fn encode(req: http::request::Builder, attempt: Option<u32>, body: &Outgoing) -> RequestHead {
        let (parts, ()) = req.header("host", "a").body(()).unwrap().into_parts();
        RequestHead::encode(
            &super::super::UpstreamHead {
                method: parts.method,
                uri: parts.uri,
                version: http::Version::HTTP_11,
                headers: parts.headers,
                attempt,
            },
            body,
        )
    }

    fn post(len: usize) -> (RequestHead, Outgoing) {
        let body = Outgoing::Bytes(Bytes::from(vec![b'x'; len]));
        (encode(http::Request::post("/upload"), None, &body), body)
    }

    /// Bounds a test that would otherwise hang when the behaviour it checks is broken.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(20), f)
            .await
            .expect("the exchange hung")
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_request_is_passed_on() {
        const BIG: usize = 8 << 20;
        // The upstream answers after the head and closes: the body's next bytes bring back a
        // reset, and the answer that came before it is still read.
        let too_large = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!";
        let mut conn = upstream(|s| answer_after_head(s, too_large, false)).await;
        let (mut head, mut body) = post(BIG);
        let got = within(exchange(&mut conn, &mut head, &mut body))
            .await
            .unwrap();
        assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!got.keep_alive, "the request is not whole on the wire");
        assert_eq!(conn.read[..], b"big!"[..]);

        // It answers and reads no more, the connection open: the answer is not waited out.
        let unauthorized = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        let mut conn = upstream(|s| answer_after_head(s, unauthorized, true)).await;
        let (mut head, mut body) = post(BIG);
        let got = within(exchange(&mut conn, &mut head, &mut body))
            .await
            .unwrap();
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        assert!(!got.keep_alive);

        // An interim answer while the body goes out is skipped, and the body is sent whole.
        let mut conn = upstream(|mut s| async move {
            read_request_head(&mut s).await;
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
            let mut rest = vec![0; 1 << 16];
            let mut n = 0;
            // What came with the head is at most a few reads' worth: read to the end.
            while n < BIG - (1 << 16) {
                match s.read(&mut rest).await.unwrap() {
                    0 => break,
                    m => n += m,
                }
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            std::future::pending::<()>().await;
        })
        .await;
        let (mut head, mut body) = post(BIG);
        let got = within(exchange(&mut conn, &mut head, &mut body))
            .await
            .unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.keep_alive);

        // A stale pooled connection still fails as one: nothing was answered.
        let mut conn = upstream(|s| async move { drop(s) }).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (mut head, mut body) = post(BIG);
        let e = within(exchange(&mut conn, &mut head, &mut body))
            .await
            .err()
            .unwrap();
        assert!(e.nothing_received && e.unsent && !e.protocol, "{e:?}");
    }

    #[tokio::test]
    async fn an_answer_while_the_body_is_awaited_ends_the_sending() {
        // The client's body has one chunk and then nothing yet; the upstream answers.
        let forbidden = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n";
        let mut conn = upstream(|s| answer_after_head(s, forbidden, true)).await;
        let first = futures::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from("abc")))]);
        let body = http_body_util::StreamBody::new(futures::StreamExt::chain(
            first,
            futures::stream::pending(),
        ));
        let mut body = std::pin::pin!(body);
        let mut sending = Sending {
            io: &mut conn.io,
            read: &mut conn.read,
            head_method: false,
            answer: None,
            ended: false,
        };
        let mut out = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let end = within(write_body(
            &mut sending,
            &mut out,
            &mut body,
            BodyFraming::Chunked,
            Sending::poll_answer,
        ))
        .await
        .unwrap();
        assert!(matches!(end, BodyEnd::Answered));
        let answer = sending.answer.take().unwrap().unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn request_heads_carry_their_framing() {
        let abc = Outgoing::Bytes(Bytes::from_static(b"abc"));
        let head = encode(http::Request::post("/p?q=1"), Some(2), &abc);
        assert_eq!(
            String::from_utf8(head.bytes).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: a\r\nx-envoy-attempt-count: 2\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(head.framing, BodyFraming::Length(3));
        assert!(!head.idempotent);

        let head = encode(
            http::Request::get("/"),
            None,
            &Outgoing::Bytes(Bytes::new()),
        );
        assert_eq!(
            String::from_utf8(head.bytes).unwrap(),
            "GET / HTTP/1.1\r\nhost: a\r\n\r\n"
        );
        assert!(head.idempotent);
    }
}
