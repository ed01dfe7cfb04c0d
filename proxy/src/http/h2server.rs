//! Downstream HTTP/2, served with the `h2` crate directly.
//!
//! hyper's HTTP/2 server sits between `h2` and the request path. For every stream it parsed the
//! request's content length, wrapped the body, boxed the stream's future and handed it to an
//! executor, then looked up five connection headers and `date` in the answer by hash, and
//! piped the body through a future of its own. Here one [`Connection`] accepts the streams and
//! runs them in its own task, right before it drives the connection: what the streams answer
//! is written in the same poll (see `coalesce`). A worker is one thread, so a stream never ran
//! anywhere but beside its connection anyway. A connection that ends drops its streams, as a
//! reset stream does.
//!
//! What hyper did that still has to be done is done here, in one pass over the answer's
//! header names: the connection-specific headers HTTP/2 forbids are dropped, `date` is added
//! when missing, and so is `content-length` when the body's length is known. A client's reset
//! drops the stream's request path, whether it waits for the answer or sends its body.
//!
//! An answer's body is handed to `h2` no faster than the client's flow-control window takes
//! it, so that a stream whose client stops reading is seen waiting here: after the stream's
//! idle timeout (`stream_idle_timeout`, or the route's) it is cut as Envoy cuts it, `SI` in the
//! access log and the stream reset.
//!
//! One thing is given up against a task per stream: a stream that panicked was its task's
//! alone, and now ends its connection's other streams too (the request path answers errors,
//! it does not panic).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use h2::server::{Handshake, SendResponse};
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::server::Answer;
use crate::cluster::h1::BoxError;

/// Rounds of "run the streams, drive the connection, take the streams it opened" in one poll
/// of the task before it yields to the worker's other tasks.
const ROUNDS: usize = 8;

/// The connection manager's `http2_protocol_options`: what a client is told in SETTINGS.
///
/// The defaults are weft-proxy's, not Envoy's (2^31-1 streams, 256 MiB windows): `h2` keeps what
/// a client sends until the request path reads it, up to the window, where Envoy stops reading
/// the socket once its buffers are full. Envoy's flood limits (`max_outbound_frames` and the
/// like) are taken and left to `h2`'s own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
    /// HPACK's dynamic table for what the client sends (None: HTTP/2's 4,096 bytes).
    pub hpack_table_size: Option<u32>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_concurrent_streams: 1024,
            initial_stream_window_size: 1 << 20,
            initial_connection_window_size: 1 << 20,
            hpack_table_size: None,
        }
    }
}

/// HTTP/2's bounds for a flow-control window, as Envoy checks them.
const WINDOW: std::ops::RangeInclusive<u32> = 65_535..=2_147_483_647;

impl Settings {
    /// The options, within Envoy's bounds; `Err` names the field and why.
    pub fn from_xds(
        o: Option<&weft_xds_proto::envoy::config::core::v3::Http2ProtocolOptions>,
    ) -> Result<Settings, (&'static str, String)> {
        let mut s = Settings::default();
        let Some(o) = o else {
            return Ok(s);
        };
        for (field, set, what) in [
            (
                "allow_connect",
                o.allow_connect,
                "extended CONNECT (RFC 8441)",
            ),
            ("allow_metadata", o.allow_metadata, "METADATA frames"),
            (
                "custom_settings_parameters",
                !o.custom_settings_parameters.is_empty(),
                "custom SETTINGS parameters",
            ),
            (
                "connection_keepalive",
                o.connection_keepalive.is_some(),
                "PING keepalive",
            ),
        ] {
            if set {
                return Err((
                    field,
                    format!("{what} is not supported by this weft-proxy version"),
                ));
            }
        }
        if let Some(n) = &o.max_concurrent_streams {
            if !(1..=2_147_483_647).contains(&n.value) {
                return Err((
                    "max_concurrent_streams",
                    format!("{} is not between 1 and 2147483647", n.value),
                ));
            }
            s.max_concurrent_streams = n.value;
        }
        for (field, value, into) in [
            (
                "initial_stream_window_size",
                &o.initial_stream_window_size,
                &mut s.initial_stream_window_size,
            ),
            (
                "initial_connection_window_size",
                &o.initial_connection_window_size,
                &mut s.initial_connection_window_size,
            ),
        ] {
            if let Some(n) = value {
                if !WINDOW.contains(&n.value) {
                    return Err((
                        field,
                        format!("{} is not between 65535 and 2147483647", n.value),
                    ));
                }
                *into = n.value;
            }
        }
        s.hpack_table_size = o.hpack_table_size.as_ref().map(|n| n.value);
        Ok(s)
    }

    /// The server's builder: these settings, and what hyper's server had for the rest.
    pub fn builder(&self, max_header_list_size: u32) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.initial_stream_window_size)
            .initial_connection_window_size(self.initial_connection_window_size)
            .max_frame_size(16 << 10)
            .max_send_buffer_size(400 << 10)
            .max_local_error_reset_streams(Some(1024))
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(max_header_list_size);
        if let Some(n) = self.hpack_table_size {
            b.header_table_size(n);
        }
        b
    }
}

/// One downstream HTTP/2 connection and its streams. `open` starts a stream's request path;
/// the connection ends with the first connection error, or when the client or a
/// [`Connection::graceful_shutdown`] closed it and its streams are done.
pub struct Connection<T, O, F, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = Response<B>> + Unpin,
    B: Body,
{
    state: State<T>,
    open: O,
    running: FuturesUnordered<Stream<F, B>>,
    /// Told to go (GOAWAY), not yet said to the client.
    go: bool,
}

enum State<T: AsyncRead + AsyncWrite + Unpin> {
    Handshaking(Handshake<T, Bytes>),
    Serving(h2::server::Connection<T, Bytes>),
}

impl<T, O, F, B> Connection<T, O, F, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    O: Unpin,
    F: Future<Output = Response<B>> + Unpin,
    B: Body,
{
    pub fn new(io: T, builder: &h2::server::Builder, open: O) -> Self {
        Connection {
            state: State::Handshaking(builder.handshake(io)),
            open,
            running: FuturesUnordered::new(),
            go: false,
        }
    }

    /// Tells the client to open no more streams (GOAWAY); those open run to their end.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let me = self.get_mut();
        match &mut me.state {
            // Said once the connection is up.
            State::Handshaking(_) => me.go = true,
            State::Serving(conn) => conn.graceful_shutdown(),
        }
    }
}

impl<T, O, F, B> Future for Connection<T, O, F, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    O: FnMut(Request<RecvStream>) -> F + Unpin,
    F: Future<Output = Response<B>> + Unpin,
    B: Answer,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        let conn = match &mut me.state {
            State::Handshaking(hs) => {
                let mut conn = ready!(Pin::new(hs).poll(cx))?;
                if me.go {
                    conn.graceful_shutdown();
                }
                me.state = State::Serving(conn);
                let State::Serving(conn) = &mut me.state else {
                    unreachable!("just set")
                };
                conn
            }
            State::Serving(conn) => conn,
        };
        for _ in 0..ROUNDS {
            // Streams that were woken: what they answer, the connection writes below.
            while let Poll::Ready(Some(())) = me.running.poll_next_unpin(cx) {}
            let mut opened = false;
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, reply)))) => {
                        me.running.push(Stream::new((me.open)(req), reply));
                        opened = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            // Streams opened in that poll start now, and the connection is driven again for
            // what they answer at once (a local reply, an error).
            if !opened {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// One stream: its request path until the answer's head, then the answer's body.
struct Stream<F, B> {
    phase: Phase<F, B>,
}

enum Phase<F, B> {
    Answering {
        path: F,
        reply: SendResponse<Bytes>,
    },
    Sending {
        body: B,
        tx: SendStream<Bytes>,
        /// What was taken from the body and waits for the client's window.
        held: Option<Held>,
    },
    Done,
}

impl<F, B> Stream<F, B> {
    fn new(path: F, reply: SendResponse<Bytes>) -> Self {
        Stream {
            phase: Phase::Answering { path, reply },
        }
    }
}

impl<F, B> Future for Stream<F, B>
where
    F: Future<Output = Response<B>> + Unpin,
    B: Answer,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = self.get_mut();
        loop {
            match &mut me.phase {
                Phase::Answering { path, reply } => {
                    let Poll::Ready(resp) = Pin::new(path).poll(cx) else {
                        // The client may reset the stream while it waits: the request path
                        // is dropped then (its upstream request too).
                        if reply.poll_reset(cx).is_ready() {
                            me.phase = Phase::Done;
                            return Poll::Ready(());
                        }
                        return Poll::Pending;
                    };
                    let (mut parts, body) = resp.into_parts();
                    let end = body.is_end_stream();
                    prepare(&mut parts.headers, (!end).then(|| body.size_hint()));
                    let head = Response::from_parts(parts, ());
                    match reply.send_response(head, end) {
                        Ok(tx) if !end => {
                            me.phase = Phase::Sending {
                                body,
                                tx,
                                held: None,
                            };
                        }
                        Ok(_) => {
                            me.phase = Phase::Done;
                            return Poll::Ready(());
                        }
                        Err(e) => {
                            tracing::debug!("HTTP/2 answer's head not sent: {e}");
                            reply.send_reset(Reason::INTERNAL_ERROR);
                            me.phase = Phase::Done;
                            return Poll::Ready(());
                        }
                    }
                }
                Phase::Sending { body, tx, held } => {
                    let sent = send_body(body, tx, held, cx);
                    if sent.is_ready() {
                        // The body (and its access log entry) goes now.
                        me.phase = Phase::Done;
                    }
                    return sent;
                }
                Phase::Done => return Poll::Ready(()),
            }
        }
    }
}

/// A part of the answer's body that waits for the client's flow-control window, and since
/// when it waits (timed by the stream's idle timeout).
struct Held {
    chunk: Bytes,
    end: bool,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Sends `body` on `tx` until it ends, fails, stalls past its idle timeout, or the client
/// resets the stream.
fn send_body<B>(
    body: &mut B,
    tx: &mut SendStream<Bytes>,
    held: &mut Option<Held>,
    cx: &mut Context<'_>,
) -> Poll<()>
where
    B: Answer,
    B::Error: Into<BoxError>,
{
    loop {
        // Woken by a reset while the body or the window is waited for.
        if tx.poll_reset(cx).is_ready() {
            return Poll::Ready(());
        }
        if let Some(h) = held {
            // As much as the window takes now; the rest waits for more.
            let mut room = tx.capacity();
            while room == 0 {
                match tx.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(n))) => room = n,
                    // Gone: reset, or the connection ended.
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    Poll::Pending => return stall(body, tx, h, cx),
                }
            }
            let part = if room < h.chunk.len() {
                h.chunk.split_to(room)
            } else {
                std::mem::take(&mut h.chunk)
            };
            let end = h.end && h.chunk.is_empty();
            if tx.send_data(part, end).is_err() || end {
                return Poll::Ready(());
            }
            if h.chunk.is_empty() {
                *held = None;
            } else {
                h.stalled = None;
                tx.reserve_capacity(h.chunk.len());
            }
            continue;
        }
        match ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => {
                    let end = body.is_end_stream();
                    if chunk.is_empty() {
                        if tx.send_data(chunk, end).is_err() || end {
                            return Poll::Ready(());
                        }
                        continue;
                    }
                    // The chunk is in hand: the window it needs is asked for, and what comes
                    // is used at once (held by no stream that has nothing to send).
                    tx.reserve_capacity(chunk.len());
                    *held = Some(Held {
                        chunk,
                        end,
                        stalled: None,
                    });
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        tx.reserve_capacity(0);
                        let _ = tx.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            },
            Some(Err(e)) => {
                let e: BoxError = e.into();
                tracing::debug!("HTTP/2 answer's body failed: {e}");
                tx.send_reset(reset_reason(&*e));
                return Poll::Ready(());
            }
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return Poll::Ready(());
            }
        }
    }
}

/// The client's window is closed: past the stream's idle timeout, the answer is cut (`SI`) and
/// the stream reset, as Envoy does.
#[cold]
fn stall<B: Answer>(
    body: &mut B,
    tx: &mut SendStream<Bytes>,
    h: &mut Held,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let Some(idle) = body.stream_idle() else {
        return Poll::Pending;
    };
    let timer = h
        .stalled
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
    if timer.as_mut().poll(cx).is_pending() {
        return Poll::Pending;
    }
    body.cut_idle();
    tx.send_reset(STALLED);
    Poll::Ready(())
}

/// The reset of a stream whose client stopped reading, as Envoy's.
const STALLED: Reason = Reason::INTERNAL_ERROR;

/// The reset a failed body gives its stream: an HTTP/2 error's own reason (an upstream's
/// reset passed on), else INTERNAL_ERROR.
fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Reason {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        at = e.source();
    }
    Reason::INTERNAL_ERROR
}

/// The answer's head made fit for HTTP/2, in one pass over its names: the connection-specific
/// headers HTTP/2 forbids go (`h2` refuses a head with any), `date` is added when missing, and
/// so is the body's length when it is known (`sized`: a body still to send).
fn prepare(headers: &mut HeaderMap, sized: Option<SizeHint>) {
    let mut date = false;
    let mut length = false;
    let mut forbidden = false;
    for name in headers.keys() {
        match name.as_str().len() {
            4 => date |= *name == header::DATE,
            14 => length |= *name == header::CONTENT_LENGTH,
            2 => forbidden |= *name == header::TE,
            _ => forbidden |= super::is_hop_by_hop(name),
        }
    }
    if forbidden {
        strip_connection_specific(headers);
    }
    if !date && let Ok(v) = HeaderValue::from_bytes(&super::server::http_date()) {
        headers.insert(header::DATE, v);
    }
    if !length && let Some(n) = sized.and_then(|s| s.exact()) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// Drops the headers HTTP/2 forbids in an answer: the hop-by-hop ones, those `connection`
/// names, and `te`.
#[cold]
fn strip_connection_specific(headers: &mut HeaderMap) {
    super::strip_hop_by_hop(headers);
    headers.remove(header::TE);
}

/// A request's body as the client streams it. Each chunk read gives its room in the flow
/// control window back at once (the request path holds no more than it forwards). A reset
/// with NO_ERROR, which a client sends when it needs no more of the stream, ends the body
/// without an error.
#[derive(Debug)]
pub struct RequestBody {
    recv: RecvStream,
    length: Option<u64>,
    data_done: bool,
}

impl RequestBody {
    pub fn new(recv: RecvStream, headers: &HeaderMap) -> Self {
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        RequestBody {
            recv,
            length,
            data_done: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = &mut *self;
        let quiet = |e: h2::Error| match e.reason() {
            Some(Reason::NO_ERROR) => None,
            _ => Some(Err(e)),
        };
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = me.recv.flow_control().release_capacity(chunk.len());
                    if let Some(left) = &mut me.length {
                        *left = left.saturating_sub(chunk.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Some(Err(e)) => return Poll::Ready(quiet(e)),
                None => me.data_done = true,
            }
        }
        Poll::Ready(match ready!(me.recv.poll_trailers(cx)) {
            Ok(trailers) => trailers.map(|t| Ok(Frame::trailers(t))),
            Err(e) => quiet(e),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// The answer's head: forbidden headers dropped (with those `connection` names), `date`
    /// and a known length added when missing, present ones kept.
    #[test]
    fn heads_are_made_fit_for_http2() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop, close"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        prepare(&mut h, Some(SizeHint::with_exact(12)));
        assert_eq!(names(&h), ["content-length", "date", "x-kept"]);
        assert_eq!(h[header::CONTENT_LENGTH], "12");
        assert_eq!(h[header::DATE].len(), 29);

        let mut h = HeaderMap::new();
        h.insert(
            header::DATE,
            HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        prepare(&mut h, Some(SizeHint::with_exact(12)));
        assert_eq!(h[header::DATE], "Mon, 01 Jan 2024 00:00:00 GMT");
        assert_eq!(h[header::CONTENT_LENGTH], "3");

        // A body of unknown length, or none to send: no length made up.
        let mut h = HeaderMap::new();
        prepare(&mut h, Some(SizeHint::default()));
        prepare(&mut h, None);
        assert_eq!(names(&h), ["date"]);
    }

    impl Answer for http_body_util::combinators::BoxBody<Bytes, BoxError> {}

    /// An answer with a stream idle timeout, telling when it was cut.
    struct Timed(Full<Bytes>, std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Body for Timed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_end_stream()
        }
    }

    impl Answer for Timed {
        fn stream_idle(&self) -> Option<std::time::Duration> {
            Some(std::time::Duration::from_millis(100))
        }
        fn cut_idle(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A client that gives no window back gets the window's worth, in parts as the window
    /// allows; the rest waits, and the stream is cut after its idle timeout. One that reads
    /// on gets the whole answer through the same small window.
    #[tokio::test]
    async fn a_stalled_window_is_timed() {
        for reads in [false, true] {
            let (near, far) = tokio::io::duplex(1 << 16);
            let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let was_cut = cut.clone();
            let open = move |_req: Request<RecvStream>| {
                std::future::ready(Response::new(Timed(
                    Full::new(Bytes::from(vec![7u8; 10_000])),
                    was_cut.clone(),
                )))
            };
            tokio::spawn(async move {
                let b = Settings::default().builder(16 << 10);
                Connection::new(far, &b, open).await
            });
            let (mut client, driver) = h2::client::Builder::new()
                .initial_window_size(1000)
                .handshake::<_, Bytes>(near)
                .await
                .unwrap();
            tokio::spawn(driver);
            let req = Request::builder().uri("http://test/").body(()).unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            let mut body = resp.await.unwrap().into_body();
            let mut got = 0;
            let end = loop {
                match body.data().await {
                    Some(Ok(chunk)) => {
                        got += chunk.len();
                        if reads {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                    }
                    Some(Err(e)) => break e.reason(),
                    None => break None,
                }
            };
            if reads {
                assert_eq!((got, end), (10_000, None));
                assert!(!cut.load(std::sync::atomic::Ordering::SeqCst));
            } else {
                assert_eq!((got, end), (1000, Some(STALLED)));
                assert!(cut.load(std::sync::atomic::Ordering::SeqCst));
            }
        }
    }

    /// Envoy's fields and bounds; what is not built is refused by name.
    #[test]
    fn settings_from_http2_protocol_options() {
        use weft_xds_proto::envoy::config::core::v3::Http2ProtocolOptions;
        let n = |v| Some(weft_xds_proto::wkt::UInt32Value { value: v });
        assert_eq!(Settings::from_xds(None), Ok(Settings::default()));
        let o = Http2ProtocolOptions {
            max_concurrent_streams: n(7),
            initial_stream_window_size: n(70_000),
            initial_connection_window_size: n(300_000),
            hpack_table_size: n(0),
            max_outbound_frames: n(5),
            ..Default::default()
        };
        assert_eq!(
            Settings::from_xds(Some(&o)),
            Ok(Settings {
                max_concurrent_streams: 7,
                initial_stream_window_size: 70_000,
                initial_connection_window_size: 300_000,
                hpack_table_size: Some(0),
            })
        );
        let refused = |o: Http2ProtocolOptions| Settings::from_xds(Some(&o)).unwrap_err();
        let small = Http2ProtocolOptions {
            initial_stream_window_size: n(1000),
            ..Default::default()
        };
        assert_eq!(
            refused(small),
            (
                "initial_stream_window_size",
                "1000 is not between 65535 and 2147483647".to_string()
            )
        );
        let none = Http2ProtocolOptions {
            max_concurrent_streams: n(0),
            ..Default::default()
        };
        assert_eq!(refused(none).0, "max_concurrent_streams");
        let connect = Http2ProtocolOptions {
            allow_connect: true,
            ..Default::default()
        };
        assert_eq!(
            refused(connect),
            (
                "allow_connect",
                "extended CONNECT (RFC 8441) is not supported by this weft-proxy version"
                    .to_string()
            )
        );
    }

    #[test]
    fn resets_keep_an_http2_reason() {
        let e: BoxError = Box::new(h2::Error::from(Reason::REFUSED_STREAM));
        assert_eq!(reset_reason(&*e), Reason::REFUSED_STREAM);
        let e: BoxError = "upstream cut".into();
        assert_eq!(reset_reason(&*e), Reason::INTERNAL_ERROR);
    }

    /// A client and this server over an in-memory pipe: streams answer (body, trailers,
    /// empty), a request body is read whole, a reset drops the stream's request path, and a
    /// graceful shutdown lets the open streams finish.
    #[tokio::test]
    async fn serves_streams_over_h2() {
        let (near, far) = tokio::io::duplex(1 << 16);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = dropped.clone();
        struct Counted(std::sync::Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        type Answer = http_body_util::combinators::BoxBody<Bytes, BoxError>;
        let open = move |req: Request<RecvStream>| -> Pin<Box<dyn Future<Output = Response<Answer>> + Send>> {
            let seen = seen.clone();
            Box::pin(async move {
                let (parts, recv) = req.into_parts();
                let path = parts.uri.path().to_string();
                let body = RequestBody::new(recv, &parts.headers);
                match path.as_str() {
                    "/echo" => {
                        let got = body.collect().await.unwrap().to_bytes();
                        Response::new(Full::new(got).map_err(|e| match e {}).boxed())
                    }
                    "/trailers" => {
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", HeaderValue::from_static("0"));
                        let frames = futures::stream::iter([
                            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hi"))),
                            Ok(Frame::trailers(t)),
                        ]);
                        Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
                    }
                    "/hang" => {
                        let _c = Counted(seen);
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    _ => {
                        let mut r = Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
                        *r.status_mut() = http::StatusCode::NO_CONTENT;
                        r
                    }
                }
            })
        };
        let server = tokio::spawn(async move {
            let b = Settings::default().builder(16 << 10);
            let mut conn = std::pin::pin!(Connection::new(far, &b, open));
            let mut told = false;
            std::future::poll_fn(|cx| {
                if !told && SHUTDOWN.load(std::sync::atomic::Ordering::SeqCst) {
                    told = true;
                    conn.as_mut().graceful_shutdown();
                }
                conn.as_mut().poll(cx)
            })
            .await
        });
        static SHUTDOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let (mut client, driver) = h2::client::handshake(near).await.unwrap();
        let driver = tokio::spawn(driver);
        let request = |path: &str| {
            Request::builder()
                .uri(format!("http://test{path}"))
                .body(())
                .unwrap()
        };

        // A body sent and echoed, with its length added to the answer.
        let (resp, mut send) = client.send_request(request("/echo"), false).unwrap();
        send.send_data(Bytes::from_static(b"ping "), false).unwrap();
        send.send_data(Bytes::from_static(b"pong"), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "9");
        assert!(resp.headers().contains_key(header::DATE));
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"ping pong");

        // Data, then trailers.
        let (resp, _) = client.send_request(request("/trailers"), true).unwrap();
        let mut body = resp.await.unwrap().into_body();
        assert_eq!(body.data().await.unwrap().unwrap(), "hi");
        assert!(body.data().await.is_none());
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");

        // An answer with no body ends the stream with its head.
        let (resp, _) = client.send_request(request("/empty"), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 204);
        assert!(resp.into_body().is_end_stream());

        // A reset while the answer is awaited drops the request path.
        let (resp, mut send) = client.send_request(request("/hang"), true).unwrap();
        tokio::task::yield_now().await;
        send.send_reset(Reason::CANCEL);
        drop(resp);
        for _ in 0..100 {
            if dropped.load(std::sync::atomic::Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 1);

        // Told to go: a stream already open is still answered, then the connection ends.
        let (resp, mut send) = client.send_request(request("/echo"), false).unwrap();
        tokio::task::yield_now().await;
        SHUTDOWN.store(true, std::sync::atomic::Ordering::SeqCst);
        send.send_data(Bytes::from_static(b"last"), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "4");
        drop(client);
        drop(resp);
        assert!(server.await.unwrap().is_ok());
        let _ = driver.await;
    }
}
