//! A streamed request body kept for the attempts after the first, as Envoy's router keeps it:
//! the first attempt streams the client's body upstream as it arrives (nothing waits for the
//! whole body, so a gRPC stream or a long upload starts at once) while a copy of what passed is
//! kept, up to the listener's buffer limit ([`KEEP_LIMIT`] by default). A retry sends the kept part again, then goes on reading the
//! client. A body larger than the limit is not kept: its request is not retried (Envoy's
//! `retry_or_shadow_abandoned`), and its upstream answer is passed on.
//!
//! Only bodies that are not known small go this way: a small one with a `content-length` is read
//! whole first (`AttemptBody::Replay`), which costs less.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};

use super::DownstreamBody;
use super::h1::BoxError;
use crate::lock_own as lock;

/// Envoy's default request buffer limit (`per_connection_buffer_limit_bytes`, 1 MiB).
pub const KEEP_LIMIT: usize = 1024 * 1024;

/// A frame kept for the next attempt.
enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    Done,
    Failed,
}

struct State {
    source: DownstreamBody,
    /// Every frame read from the client so far, while `keeping`.
    kept: Vec<Kept>,
    kept_bytes: usize,
    /// The most kept (the listener's `per_connection_buffer_limit_bytes`).
    limit: usize,
    /// Frames read from the client so far.
    read: usize,
    /// Frames are still kept: not past the limit, and another attempt may follow. Once a frame
    /// was read and not kept (`kept` shorter than `read`), no new attempt can send the body
    /// whole.
    keeping: bool,
    end: End,
    /// The attempt whose body this is; an earlier attempt's body reads nothing more.
    attempt: u64,
}

/// The client's body and what was kept of it; one per request.
pub struct Tee {
    state: Arc<Mutex<State>>,
}

impl Tee {
    /// Keeps at most `limit` bytes.
    pub fn new(source: DownstreamBody, limit: usize) -> Tee {
        Tee {
            state: Arc::new(Mutex::new(State {
                source,
                kept: Vec::new(),
                kept_bytes: 0,
                limit,
                read: 0,
                keeping: true,
                end: End::Open,
                attempt: 0,
            })),
        }
    }

    /// Whether another attempt can send the whole body: everything read so far was kept, and
    /// the client's body did not fail.
    pub fn replayable(&self) -> bool {
        let s = lock(&self.state);
        s.kept.len() == s.read && s.end != End::Failed
    }

    /// The body of the next attempt: what was kept, then the rest as the client sends it. The
    /// previous attempt's body reads nothing more.
    pub fn attempt(&self) -> TeeBody {
        let mut s = lock(&self.state);
        s.attempt += 1;
        TeeBody {
            state: self.state.clone(),
            attempt: s.attempt,
            at: 0,
        }
    }
}

impl Drop for Tee {
    /// No attempt follows the current one: what it reads from now on is not kept. What was
    /// kept stays until that attempt has sent it (it may not have yet).
    fn drop(&mut self) {
        lock(&self.state).keeping = false;
    }
}

/// One attempt's request body.
pub struct TeeBody {
    state: Arc<Mutex<State>>,
    attempt: u64,
    /// Frames this body has handed out.
    at: usize,
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = lock(&this.state);
        if s.attempt != this.attempt {
            return Poll::Ready(Some(Err("request body taken over by a retry".into())));
        }
        if this.at < s.read {
            // A kept frame: the retry sends again what an earlier attempt sent.
            let frame = match s.kept.get(this.at) {
                Some(Kept::Data(d)) => Frame::data(d.clone()),
                Some(Kept::Trailers(t)) => Frame::trailers(t.clone()),
                None => return Poll::Ready(Some(Err("request body no longer kept".into()))),
            };
            this.at += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        match s.end {
            End::Done => return Poll::Ready(None),
            End::Failed => return Poll::Ready(Some(Err("downstream request body failed".into()))),
            End::Open => {}
        }
        match Pin::new(&mut s.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.end = End::Done;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.end = End::Failed;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                s.read += 1;
                this.at = s.read;
                let size = frame.data_ref().map_or(0, Bytes::len);
                if s.keeping && s.kept_bytes + size <= s.limit {
                    s.kept_bytes += size;
                    let kept = match frame.data_ref() {
                        Some(d) => Some(Kept::Data(d.clone())),
                        None => frame.trailers_ref().cloned().map(Kept::Trailers),
                    };
                    // A frame of another kind is not kept: `kept` falls behind `read`, and
                    // the body can no longer be sent whole.
                    s.kept.extend(kept);
                } else if s.keeping {
                    // Past the limit: nothing more is kept, and what was is of no use to a
                    // retry.
                    s.kept = Vec::new();
                    s.keeping = false;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.state);
        s.attempt == self.attempt
            && self.at >= s.read
            && (s.end == End::Done || s.source.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Either, Full};

    fn full(bytes: &'static [u8]) -> DownstreamBody {
        Either::Right(Full::new(Bytes::from_static(bytes)))
    }

    async fn read(body: &mut TeeBody) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Some(d) = frame.data_ref() {
                out.extend_from_slice(d);
            }
        }
        Ok(out)
    }

    /// The first attempt streams the body; a retry sends the same bytes again.
    #[tokio::test]
    async fn a_retry_sends_the_body_again() {
        let tee = Tee::new(full(b"hello"), KEEP_LIMIT);
        let mut first = tee.attempt();
        assert_eq!(read(&mut first).await.unwrap(), b"hello");
        assert!(tee.replayable());
        let mut second = tee.attempt();
        assert!(!second.is_end_stream());
        assert_eq!(read(&mut second).await.unwrap(), b"hello");
        assert!(second.is_end_stream());
    }

    /// A retry that starts before the first attempt read anything reads the client itself.
    #[tokio::test]
    async fn a_retry_before_anything_was_read_reads_the_client() {
        let tee = Tee::new(full(b"abc"), KEEP_LIMIT);
        let _first = tee.attempt();
        let mut second = tee.attempt();
        assert_eq!(read(&mut second).await.unwrap(), b"abc");
    }

    /// Once a retry has started, the earlier attempt's body fails instead of taking frames.
    #[tokio::test]
    async fn an_earlier_attempt_reads_nothing_more() {
        let tee = Tee::new(full(b"abc"), KEEP_LIMIT);
        let mut first = tee.attempt();
        let _second = tee.attempt();
        let err = read(&mut first).await.unwrap_err();
        assert!(err.contains("retry"), "{err}");
    }

    /// A body past the limit is streamed once and not kept: no retry can send it.
    #[tokio::test]
    async fn a_body_past_the_limit_is_not_kept() {
        let big: &'static [u8] = Box::leak(vec![b'x'; KEEP_LIMIT + 1].into_boxed_slice());
        let tee = Tee::new(full(big), KEEP_LIMIT);
        let mut first = tee.attempt();
        assert_eq!(read(&mut first).await.unwrap().len(), KEEP_LIMIT + 1);
        assert!(!tee.replayable());
        let mut second = tee.attempt();
        assert!(read(&mut second).await.is_err());
    }

    /// A body at the limit is kept whole.
    #[tokio::test]
    async fn a_body_at_the_limit_is_kept() {
        let exact: &'static [u8] = Box::leak(vec![b'y'; KEEP_LIMIT].into_boxed_slice());
        let tee = Tee::new(full(exact), KEEP_LIMIT);
        let mut first = tee.attempt();
        read(&mut first).await.unwrap();
        assert!(tee.replayable());
        assert_eq!(read(&mut tee.attempt()).await.unwrap().len(), KEEP_LIMIT);
    }
}
