//! The connection manager's timeouts and connection limits, as Envoy's: how long a connection
//! may sit idle (`common_http_protocol_options.idle_timeout`, 1 hour by default), live
//! (`max_connection_duration`) or serve (`max_requests_per_connection`), and how long a request
//! may take to arrive (`request_headers_timeout`, `request_timeout`) or sit without a byte
//! moving either way (`stream_idle_timeout`, 5 minutes by default).
//!
//! weft-proxy's own HTTP/1.1 loop keeps one timer per connection ([`Clock`]) that is only moved
//! when a deadline comes closer, so a keep-alive request costs a clock read, not a timer;
//! connections served by hyper (HTTP/2, streamed bodies) are watched by [`watch`], which counts
//! their streams and shuts them down gracefully (HTTP/2 `GOAWAY`, HTTP/1.1 `connection: close`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use weft_xds_proto::envoy::config::core::v3::HttpProtocolOptions;
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;

use crate::duration;

/// Envoy's defaults.
const IDLE: Duration = Duration::from_secs(3600);
const STREAM_IDLE: Duration = Duration::from_secs(300);
const DRAIN: Duration = Duration::from_secs(5);
const DELAYED_CLOSE: Duration = Duration::from_secs(1);

/// The connection manager's timeouts; `None` is disabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// A connection without requests in flight is closed after this long.
    pub idle: Option<Duration>,
    /// A connection is drained (no further requests) after this long.
    pub max_connection_duration: Option<Duration>,
    /// A connection is drained after serving this many requests.
    pub max_requests: Option<u32>,
    /// A request with no bytes moving either way for this long is ended.
    pub stream_idle: Option<Duration>,
    /// A request must be received whole within this long of its first byte.
    pub request: Option<Duration>,
    /// A request's head must be received within this long of its first byte.
    pub request_headers: Option<Duration>,
    /// How long an HTTP/2 connection told to go away has to finish its streams.
    pub drain: Duration,
    /// `common_http_protocol_options.max_stream_duration`: the limit of requests whose route
    /// sets none.
    pub max_stream_duration: Option<Duration>,
    /// How long an HTTP/1.1 connection this side closes waits for the client to close too
    /// (`delayed_close_timeout`), reading what it still sends.
    pub delayed_close: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            idle: Some(IDLE),
            max_connection_duration: None,
            max_requests: None,
            stream_idle: Some(STREAM_IDLE),
            request: None,
            request_headers: None,
            drain: DRAIN,
            max_stream_duration: None,
            delayed_close: Some(DELAYED_CLOSE),
        }
    }
}

/// A duration field: unset is `default`, zero is disabled.
pub(crate) fn field(
    d: Option<&weft_xds_proto::wkt::Duration>,
    default: Option<Duration>,
) -> Option<Duration> {
    match d {
        None => default,
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    }
}

impl Timeouts {
    /// The connection manager's timeouts; a field that would change the answers and is not
    /// implemented is refused, named.
    pub fn from_xds(hcm: &HttpConnectionManager) -> Result<Timeouts, (String, String)> {
        let unsupported = |f: &str| {
            Err((
                f.to_string(),
                "not supported by this weft-proxy version".to_string(),
            ))
        };
        if hcm.stream_flush_timeout.is_some() {
            return unsupported("stream_flush_timeout");
        }
        if hcm.http1_safe_max_connection_duration {
            return unsupported("http1_safe_max_connection_duration");
        }
        let mut t = Timeouts {
            stream_idle: field(hcm.stream_idle_timeout.as_ref(), Some(STREAM_IDLE)),
            request: field(hcm.request_timeout.as_ref(), None),
            request_headers: field(hcm.request_headers_timeout.as_ref(), None),
            drain: hcm.drain_timeout.as_ref().map(duration).unwrap_or(DRAIN),
            delayed_close: field(hcm.delayed_close_timeout.as_ref(), Some(DELAYED_CLOSE)),
            ..Timeouts::default()
        };
        if let Some(common) = &hcm.common_http_protocol_options {
            if let Some(f) = unsupported_common(common) {
                return unsupported(&format!("common_http_protocol_options.{f}"));
            }
            t.idle = field(common.idle_timeout.as_ref(), Some(IDLE));
            t.max_connection_duration = field(common.max_connection_duration.as_ref(), None);
            t.max_stream_duration = field(common.max_stream_duration.as_ref(), None);
            t.max_requests = common
                .max_requests_per_connection
                .map(|v| v.value)
                .filter(|v| *v > 0);
        }
        Ok(t)
    }
}

/// The first field of a `common_http_protocol_options` (a connection manager's or a cluster's)
/// that would change what weft-proxy does and is not implemented.
pub(crate) fn unsupported_common(c: &HttpProtocolOptions) -> Option<&'static str> {
    [
        (
            "max_connection_duration_jitter",
            c.max_connection_duration_jitter.is_some(),
        ),
        // weft-proxy reads at most 100 header lines each way, Envoy's default.
        (
            "max_headers_count",
            c.max_headers_count.is_some_and(|n| n.value != 100),
        ),
        (
            "max_response_headers_kb",
            c.max_response_headers_kb.is_some(),
        ),
        (
            "headers_with_underscores_action",
            c.headers_with_underscores_action != 0,
        ),
    ]
    .into_iter()
    .find_map(|(f, set)| set.then_some(f))
}

/// Polls `sleep` against a deadline that may have moved later since it was set (`deadline`,
/// read each time the timer goes off): ready once that deadline has passed; a timer woken early
/// is set again for it. The timers here are set lazily, for a deadline no later than the one
/// that applies, so that bytes moving cost no timer operation.
pub(crate) fn poll_deadline(
    sleep: &mut Pin<Box<Sleep>>,
    cx: &mut std::task::Context<'_>,
    deadline: impl Fn() -> Instant,
) -> Poll<()> {
    while sleep.as_mut().poll(cx).is_ready() {
        let at = deadline();
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        sleep.as_mut().reset(at);
    }
    Poll::Pending
}

/// What ran out, and how the request (if one had begun) is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Between requests: the connection closes.
    Connection,
    /// The connection was idle, or reached its maximum duration, between requests: it drains
    /// (as Envoy's: a request that still comes within `drain_timeout` is answered with
    /// `connection: close`, then the connection closes).
    Drain,
    /// No byte of the request arrived for `stream_idle_timeout`.
    StreamIdle,
    /// The head did not arrive within `request_headers_timeout`.
    RequestHeaders,
    /// The request did not arrive whole within `request_timeout`.
    Request,
    /// The request arrived whole, and no byte of its answer for `stream_idle_timeout`.
    Answer,
}

impl Expired {
    /// Envoy's answer: status, body, response flag, response code details.
    pub fn reply(self) -> (http::StatusCode, &'static str, &'static str, &'static str) {
        let timeout = http::StatusCode::REQUEST_TIMEOUT;
        match self {
            Expired::StreamIdle => (timeout, "stream timeout", "SI", "stream_idle_timeout"),
            Expired::Answer => (
                http::StatusCode::GATEWAY_TIMEOUT,
                "stream timeout",
                "SI",
                "stream_idle_timeout",
            ),
            Expired::RequestHeaders => (
                timeout,
                "request header timeout",
                "-",
                "request_header_timeout",
            ),
            Expired::Request | Expired::Connection | Expired::Drain => {
                (timeout, "request timeout", "-", "request_overall_timeout")
            }
        }
    }
}

/// One connection's timer for weft-proxy's own HTTP/1.1 loop. It sleeps until a deadline no
/// later than the one that applies, and is only moved when the applicable one comes closer
/// than where it sleeps: between keep-alive requests (the idle deadline moving later) it is
/// left alone and, when it wakes early, set to the deadline that applies then.
pub struct Clock {
    t: Arc<Timeouts>,
    sleep: Option<Pin<Box<Sleep>>>,
    opened: Instant,
    /// When the connection last had no request in flight.
    idle_since: Instant,
    /// The request being read: when its first byte came, when its last did.
    began: Option<Instant>,
    last_read: Instant,
    head_done: bool,
    served: u32,
    /// Since when the connection drains (idle or old enough): no request after this one.
    draining: Option<Instant>,
}

impl Clock {
    pub fn new(t: Arc<Timeouts>) -> Clock {
        let now = Instant::now();
        Clock {
            t,
            sleep: None,
            opened: now,
            idle_since: now,
            began: None,
            last_read: now,
            head_done: false,
            served: 0,
            draining: None,
        }
    }

    /// Bytes of a request arrived.
    pub fn read(&mut self, now: Instant) {
        if self.began.is_none() {
            self.began = Some(now);
            self.head_done = false;
        }
        self.last_read = now;
    }

    /// The request's head is whole: `request_headers_timeout` no longer applies.
    pub fn head_done(&mut self) {
        self.head_done = true;
    }

    /// The request was read whole and is being served: the read deadlines no longer apply.
    pub fn serving(&mut self) {
        self.began = None;
        self.served = self.served.saturating_add(1);
    }

    /// Whether the connection must close after the answer being written: it drains, or it
    /// reached its request count or its age.
    pub fn must_close(&self) -> bool {
        self.draining.is_some()
            || self.t.max_requests.is_some_and(|n| self.served >= n)
            || self
                .t
                .max_connection_duration
                .is_some_and(|d| self.opened.elapsed() >= d)
    }

    /// The answer is written: the connection is idle from now.
    pub fn answered(&mut self) {
        self.idle_since = Instant::now();
    }

    /// When the request began (for its log line).
    pub fn began(&self) -> Option<Instant> {
        self.began
    }

    /// The deadline that applies now, and what it means.
    fn deadline(&self) -> Option<(Instant, Expired)> {
        let mut best: Option<(Instant, Expired)> = None;
        let mut consider = |at: Option<Instant>, what| {
            if let Some(at) = at
                && best.is_none_or(|(b, _)| at < b)
            {
                best = Some((at, what));
            }
        };
        match self.began {
            None if self.draining.is_some() => {
                consider(
                    self.draining.map(|at| at + self.t.drain),
                    Expired::Connection,
                );
            }
            None => {
                // A connection that never carried a request just closes.
                let what = if self.served == 0 {
                    Expired::Connection
                } else {
                    Expired::Drain
                };
                consider(self.t.idle.map(|d| self.idle_since + d), what);
                consider(
                    self.t.max_connection_duration.map(|d| self.opened + d),
                    what,
                );
            }
            Some(began) => {
                consider(
                    self.t.stream_idle.map(|d| self.last_read + d),
                    Expired::StreamIdle,
                );
                if !self.head_done {
                    consider(
                        self.t.request_headers.map(|d| began + d),
                        Expired::RequestHeaders,
                    );
                }
                consider(self.t.request.map(|d| began + d), Expired::Request);
            }
        }
        best
    }

    /// Runs `fut` (a read) against the deadline that applies; a connection that drains
    /// (`Expired::Drain`) goes on waiting, for its drain period.
    pub async fn race<F: Future>(&mut self, fut: F) -> Result<F::Output, Expired> {
        let mut fut = std::pin::pin!(fut);
        loop {
            let Some((at, what)) = self.deadline() else {
                return Ok(fut.await);
            };
            // Moved only when the deadline is closer than where the timer sleeps.
            match &mut self.sleep {
                Some(s) if s.deadline() <= at => {}
                Some(s) => s.as_mut().reset(at),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            let sleep = self.sleep.as_mut().expect("set above");
            let out = std::future::poll_fn(|cx| {
                if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                    return Poll::Ready(Ok(out));
                }
                // Woken early: set for an earlier deadline that no longer applies.
                poll_deadline(sleep, cx, || at).map(|()| Err(what))
            })
            .await;
            match out {
                Err(Expired::Drain) => self.draining = Some(Instant::now()),
                out => return out,
            }
        }
    }
}

/// How a streamed request body is coming along (shared by the body, which notes each frame, and
/// the request path, which times the request by it).
#[derive(Debug)]
pub struct BodyProgress {
    opened: Instant,
    /// When the last frame came (or the body ended), in milliseconds since `opened`.
    last_ms: AtomicU64,
    done: std::sync::atomic::AtomicBool,
}

impl BodyProgress {
    pub fn new() -> Arc<BodyProgress> {
        Arc::new(BodyProgress {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            done: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A frame came; `end`: it was the last.
    pub fn frame(&self, end: bool) {
        self.last_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        if end {
            self.done.store(true, Ordering::Relaxed);
        }
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The matched route's `idle_timeout`, once the request path has found it: it replaces the
/// connection manager's `stream_idle_timeout` for the rest of the stream.
#[derive(Debug)]
pub struct RouteIdle(AtomicU64);

/// Nothing said: the connection manager's timeout applies.
const ROUTE_IDLE_UNSET: u64 = u64::MAX;

impl Default for RouteIdle {
    fn default() -> RouteIdle {
        RouteIdle(AtomicU64::new(ROUTE_IDLE_UNSET))
    }
}

impl RouteIdle {
    /// The route's timeout (`None`: none at all).
    pub fn set(&self, idle: Option<Duration>) {
        let ms = idle.map_or(0, |d| (d.as_millis() as u64).clamp(1, ROUTE_IDLE_UNSET - 1));
        self.0.store(ms, Ordering::Relaxed);
    }

    /// What the stream's idle timeout is, given the connection manager's.
    pub fn apply(&self, hcm: Option<Duration>) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            ROUTE_IDLE_UNSET => hcm,
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Whether a route said anything.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed) != ROUTE_IDLE_UNSET
    }
}

/// Runs the request path `fut` within the stream's timeouts: until the request has arrived
/// whole (a streamed body, `progress`), `request_timeout` from its start and
/// `stream_idle_timeout` from its last frame; then `stream_idle_timeout` from its end (no byte
/// moves until the answer's head). The timer is moved only when woken early.
/// A route's own `idle_timeout` (`route`, set by the request path once it has matched one)
/// takes over from the connection manager's.
pub async fn answer_within<F: Future>(
    t: &Timeouts,
    progress: Option<&BodyProgress>,
    route: &RouteIdle,
    fut: F,
) -> Result<F::Output, Expired> {
    let whole = Instant::now();
    let deadline = || -> Option<(Instant, Expired)> {
        let stream_idle = route.apply(t.stream_idle);
        match progress {
            Some(p) if !p.done.load(Ordering::Relaxed) => {
                let idle = stream_idle.map(|d| (p.last() + d, Expired::StreamIdle));
                let request = t.request.map(|d| (p.opened + d, Expired::Request));
                match (idle, request) {
                    (Some(i), Some(r)) => Some(if r.0 < i.0 { r } else { i }),
                    (i, r) => i.or(r),
                }
            }
            Some(p) => stream_idle.map(|d| (p.last() + d, Expired::Answer)),
            None => stream_idle.map(|d| (whole + d, Expired::Answer)),
        }
    };
    let mut fut = std::pin::pin!(fut);
    // Without a deadline yet, one may come with the route: looked for on every poll until then.
    let mut timer = deadline().map(|(first, _)| Timer::new(first, whole));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let timer = match &mut timer {
            Some(timer) => timer,
            None => match deadline() {
                Some((at, _)) => timer.insert(Timer::new(at, Instant::now())),
                None => return Poll::Pending,
            },
        };
        while timer.poll(cx).is_ready() {
            let Some((at, what)) = deadline() else {
                return Poll::Pending;
            };
            if Instant::now() >= at {
                return Poll::Ready(Err(what));
            }
            // The body moved since: later.
            timer.reset(at);
        }
        Poll::Pending
    })
    .await
}

/// Deadlines at least this far off are kept on the coarse list.
const COARSE_MIN: Duration = Duration::from_secs(10);
/// How often the coarse list is looked at (how late its deadlines may fire).
const COARSE_TICK: Duration = Duration::from_millis(500);

/// A request's deadline. Far ones (the stream idle timeout's 5 minutes, for requests that take
/// microseconds) go on this thread's coarse list, looked at twice a second by one task while
/// it has entries: a request then costs a slot and a waker, not a timer of its own (a tokio
/// timer is an allocation and two trips through the timer wheel's lock). Near ones are tokio
/// timers.
enum Timer {
    Coarse { slot: usize, id: u64 },
    Precise(Pin<Box<Sleep>>),
}

struct Slot {
    /// 0: free.
    id: u64,
    at: Instant,
    fired: bool,
    waker: Option<std::task::Waker>,
}

#[derive(Default)]
struct Coarse {
    slots: Vec<Slot>,
    free: Vec<usize>,
    last_id: u64,
    ticking: bool,
}

std::thread_local! {
    static COARSE: std::cell::RefCell<Coarse> = std::cell::RefCell::default();
}

impl Timer {
    fn new(at: Instant, now: Instant) -> Timer {
        if at.saturating_duration_since(now) < COARSE_MIN {
            return Timer::Precise(Box::pin(tokio::time::sleep_until(at)));
        }
        COARSE.with(|c| {
            let mut c = c.borrow_mut();
            c.last_id += 1;
            let id = c.last_id;
            let entry = Slot {
                id,
                at,
                fired: false,
                waker: None,
            };
            let slot = match c.free.pop() {
                Some(i) => {
                    c.slots[i] = entry;
                    i
                }
                None => {
                    c.slots.push(entry);
                    c.slots.len() - 1
                }
            };
            if !c.ticking {
                c.ticking = true;
                tokio::spawn(tick());
            }
            Timer::Coarse { slot, id }
        })
    }

    /// Ready once the deadline has passed (a coarse one up to a tick late).
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        match self {
            Timer::Precise(sleep) => sleep.as_mut().poll(cx),
            Timer::Coarse { slot, id } => COARSE.with(|c| {
                let mut c = c.borrow_mut();
                match c.slots.get_mut(*slot) {
                    Some(s) if s.id == *id && !s.fired => {
                        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            s.waker = Some(cx.waker().clone());
                        }
                        Poll::Pending
                    }
                    _ => Poll::Ready(()),
                }
            }),
        }
    }

    fn reset(&mut self, at: Instant) {
        match self {
            Timer::Precise(sleep) => sleep.as_mut().reset(at),
            Timer::Coarse { slot, id } => COARSE.with(|c| {
                if let Some(s) = c.borrow_mut().slots.get_mut(*slot)
                    && s.id == *id
                {
                    s.at = at;
                    s.fired = false;
                }
            }),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Timer::Coarse { slot, id } = *self {
            // `try_with`: a request dropped while its thread ends has nothing to clean up.
            let _ = COARSE.try_with(|c| {
                let mut c = c.borrow_mut();
                if let Some(s) = c.slots.get_mut(slot)
                    && s.id == id
                {
                    s.id = 0;
                    s.waker = None;
                    c.free.push(slot);
                }
            });
        }
    }
}

/// Wakes the requests on this thread's coarse list whose deadline has passed; ends when the
/// list is empty.
async fn tick() {
    let mut due = Vec::new();
    loop {
        tokio::time::sleep(COARSE_TICK).await;
        let now = Instant::now();
        let live = COARSE.with(|c| {
            let mut c = c.borrow_mut();
            let mut live = 0;
            for s in c.slots.iter_mut().filter(|s| s.id != 0) {
                live += 1;
                if !s.fired && now >= s.at {
                    s.fired = true;
                    due.extend(s.waker.take());
                }
            }
            if live == 0 {
                c.ticking = false;
            }
            live
        });
        // Woken outside the borrow: a waker may run code that looks at the list.
        for w in due.drain(..) {
            w.wake();
        }
        if live == 0 {
            return;
        }
    }
}

/// What a connection served by hyper has in flight, shared by its requests' answers.
pub struct Streams {
    active: AtomicU32,
    total: AtomicU32,
    /// When the last stream ended, in milliseconds since the connection opened.
    idle_since_ms: AtomicU64,
    opened: Instant,
}

/// A stream in flight, until its answer is sent (or dropped).
pub struct StreamGuard(Arc<Streams>);

impl Streams {
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            active: AtomicU32::new(0),
            total: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
        })
    }

    pub fn open(self: &Arc<Streams>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since_ms
            .store(s.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        s.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `conn` (whose requests open streams on `streams`) under the connection timeouts: told
/// to wind down once idle for `idle`, older than `max_connection_duration`, or past
/// `max_requests` (`graceful`: hyper's graceful shutdown: HTTP/2 `GOAWAY`, HTTP/1.1 keep-alive
/// off); closed if it has not ended within `drain` after that.
pub async fn watch<C: Future>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    streams: Arc<Streams>,
    t: Arc<Timeouts>,
) -> Option<C::Output> {
    let opened = streams.opened;
    let mut conn = std::pin::pin!(conn);
    let mut sleep = Box::pin(tokio::time::sleep_until(opened + Duration::from_secs(3600)));
    // When the connection was told to go, and so must be closed by.
    let mut told: Option<Instant> = None;
    let next = |told: Option<Instant>| -> Option<Instant> {
        if let Some(at) = told {
            return Some(at + t.drain);
        }
        let mut best: Option<Instant> = t.max_connection_duration.map(|d| opened + d);
        if let Some(idle) = t.idle {
            let at = if streams.active.load(Ordering::Relaxed) == 0 {
                opened + Duration::from_millis(streams.idle_since_ms.load(Ordering::Relaxed)) + idle
            } else {
                // Busy: looked at again one idle period from now.
                Instant::now() + idle
            };
            best = Some(best.map_or(at, |b| b.min(at)));
        }
        best
    };
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            let done = t
                .max_requests
                .is_some_and(|n| streams.total.load(Ordering::Relaxed) >= n);
            let now = Instant::now();
            match told {
                Some(at) if now >= at + t.drain => return Poll::Ready(None),
                None if done || next(None).is_some_and(|at| now >= at) => {
                    told = Some(now);
                    graceful(conn.as_mut());
                    // Polled again: the shutdown may end it at once.
                    continue;
                }
                _ => {}
            }
            let Some(at) = next(told) else {
                return Poll::Pending;
            };
            // Moved only when the deadline is closer, or the timer has gone off (it then
            // wakes at most once per idle period while streams are in flight).
            if sleep.is_elapsed() || sleep.deadline() > at {
                sleep.as_mut().reset(at);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds_proto::wkt;

    fn secs(s: i64) -> Option<wkt::Duration> {
        Some(wkt::Duration {
            seconds: s,
            nanos: 0,
        })
    }

    #[test]
    fn envoy_defaults_zero_disables_and_unsupported_fields_are_named() {
        let hcm = HttpConnectionManager::default();
        assert_eq!(Timeouts::from_xds(&hcm).unwrap(), Timeouts::default());
        let t = Timeouts::default();
        assert_eq!(t.idle, Some(Duration::from_secs(3600)));
        assert_eq!(t.stream_idle, Some(Duration::from_secs(300)));
        assert_eq!(t.delayed_close, Some(Duration::from_secs(1)));
        let mut hcm = HttpConnectionManager {
            stream_idle_timeout: secs(0),
            request_timeout: secs(3),
            delayed_close_timeout: secs(0),
            ..Default::default()
        };
        hcm.common_http_protocol_options = Some(Default::default());
        let opts = hcm.common_http_protocol_options.as_mut().unwrap();
        opts.idle_timeout = secs(0);
        opts.max_requests_per_connection = Some(wkt::UInt32Value { value: 7 });
        let t = Timeouts::from_xds(&hcm).unwrap();
        assert_eq!(t.stream_idle, None);
        assert_eq!(t.idle, None);
        assert_eq!(t.request, Some(Duration::from_secs(3)));
        assert_eq!(t.max_requests, Some(7));
        assert_eq!(t.delayed_close, None);
        hcm.common_http_protocol_options
            .as_mut()
            .unwrap()
            .max_stream_duration = secs(1);
        assert_eq!(
            Timeouts::from_xds(&hcm).unwrap().max_stream_duration,
            Some(Duration::from_secs(1))
        );
        hcm.common_http_protocol_options
            .as_mut()
            .unwrap()
            .max_connection_duration_jitter = Some(Default::default());
        assert_eq!(
            Timeouts::from_xds(&hcm).unwrap_err().0,
            "common_http_protocol_options.max_connection_duration_jitter"
        );
        let hcm = HttpConnectionManager {
            stream_flush_timeout: secs(1),
            ..Default::default()
        };
        assert_eq!(
            Timeouts::from_xds(&hcm).unwrap_err().0,
            "stream_flush_timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_answers_for_the_deadline_that_applies() {
        let t = Arc::new(Timeouts {
            request_headers: Some(Duration::from_secs(2)),
            stream_idle: Some(Duration::from_secs(5)),
            idle: Some(Duration::from_secs(60)),
            ..Timeouts::default()
        });
        let mut clock = Clock::new(t);
        let never = std::future::pending::<()>;
        // A connection that never carried a request closes when idle.
        let start = Instant::now();
        assert_eq!(clock.race(never()).await, Err(Expired::Connection));
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        // A head begun and not finished: its own deadline, although the timer slept later.
        clock.answered();
        clock.read(Instant::now());
        let start = Instant::now();
        assert_eq!(clock.race(never()).await, Err(Expired::RequestHeaders));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // The head is whole, the body stalls: the stream's idle deadline from the last read.
        clock.head_done();
        tokio::time::advance(Duration::from_secs(3)).await;
        clock.read(Instant::now());
        let start = Instant::now();
        assert_eq!(clock.race(never()).await, Err(Expired::StreamIdle));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Served: the idle deadline again, from the answer; a read that comes in time wins.
        clock.serving();
        assert!(!clock.must_close());
        clock.answered();
        let ok = clock
            .race(tokio::time::sleep(Duration::from_secs(59)))
            .await;
        assert_eq!(ok, Ok(()));
        // Idle past its deadline after a request: it drains for `drain`, then closes; a
        // request in the drain period is the last.
        let start = Instant::now();
        assert_eq!(clock.race(never()).await, Err(Expired::Connection));
        assert_eq!(start.elapsed(), Duration::from_secs(1 + 5));
        assert!(clock.must_close());
    }

    #[tokio::test(start_paused = true)]
    async fn far_deadlines_fire_from_the_coarse_list_and_leave_it_clean() {
        let t = Timeouts {
            stream_idle: Some(Duration::from_secs(20)),
            ..Timeouts::default()
        };
        // A request answered in time takes its slot and gives it back.
        let ok = answer_within(
            &t,
            None,
            &RouteIdle::default(),
            tokio::time::sleep(Duration::from_secs(19)),
        )
        .await;
        assert_eq!(ok, Ok(()));
        // One that is not: its stream's idle timeout, at most a tick late.
        let start = Instant::now();
        let late = answer_within(
            &t,
            None,
            &RouteIdle::default(),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(late, Err(Expired::Answer));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(20) && waited <= Duration::from_secs(20) + COARSE_TICK,
            "{waited:?}"
        );
        // A streamed body that keeps coming is not cut by the idle timeout.
        let progress = BodyProgress::new();
        let p = progress.clone();
        let body = async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_secs(15)).await;
                p.frame(false);
            }
            p.frame(true);
        };
        let whole = answer_within(&t, Some(&progress), &RouteIdle::default(), body).await;
        assert_eq!(whole, Ok(()), "90 s of body, a frame every 15 s");
        // Nothing left on the list; the ticking task stops once it sees that.
        tokio::time::sleep(COARSE_TICK * 2).await;
        COARSE.with(|c| {
            let c = c.borrow();
            assert!(c.slots.iter().all(|s| s.id == 0));
            assert!(!c.ticking);
        });
    }

    #[tokio::test(start_paused = true)]
    async fn requests_and_age_drain_the_connection() {
        let mut clock = Clock::new(Arc::new(Timeouts {
            max_requests: Some(2),
            ..Timeouts::default()
        }));
        clock.serving();
        assert!(!clock.must_close());
        clock.serving();
        assert!(clock.must_close(), "the second of two closes");
        let mut clock = Clock::new(Arc::new(Timeouts {
            max_connection_duration: Some(Duration::from_secs(10)),
            ..Timeouts::default()
        }));
        clock.serving();
        assert!(!clock.must_close());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(clock.must_close(), "old enough");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_connection_is_told_to_go_when_idle_and_closed_after_its_drain() {
        let t = Arc::new(Timeouts {
            idle: Some(Duration::from_secs(10)),
            drain: Duration::from_secs(3),
            ..Timeouts::default()
        });
        let streams = Streams::new();
        let told = std::cell::Cell::new(None);
        let start = Instant::now();
        let guard = streams.open();
        let conn = async {
            // A stream in flight for 20 s: not idle meanwhile.
            tokio::time::sleep(Duration::from_secs(20)).await;
            drop(guard);
            std::future::pending::<()>().await
        };
        let out = watch(
            conn,
            |_| told.set(Some(start.elapsed())),
            streams.clone(),
            t,
        )
        .await;
        assert!(out.is_none(), "closed by the watch");
        assert_eq!(told.get(), Some(Duration::from_secs(30)));
        assert_eq!(start.elapsed(), Duration::from_secs(33));
    }
}
