//! Two byte streams spliced together until both ends are done, or until no byte has moved
//! either way for an idle timeout (the TCP proxy's `idle_timeout`, an upgraded HTTP stream's
//! `stream_idle_timeout`). Each read and write notes the time; one timer per splice is set again
//! only when it wakes and finds bytes moved since.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last moved, in milliseconds since the splice began; which side ended first.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
    /// 0: neither yet; else the `Side` as a number.
    first_end: std::sync::atomic::AtomicU8,
}

/// A side of a splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A = 1,
    B = 2,
}

impl Activity {
    fn note(&self) {
        self.last_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn ended(&self, side: Side) {
        let _ =
            self.first_end
                .compare_exchange(0, side as u8, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// One side, noting what moves through it and whether it ended (its end of stream read, or a
/// failure).
struct Noted<'a, T> {
    io: &'a mut T,
    activity: &'a Activity,
    side: Side,
    read: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Noted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.activity.note();
        }
        match &r {
            Poll::Ready(Ok(())) if n == 0 => self.activity.ended(self.side),
            Poll::Ready(Err(_)) => self.activity.ended(self.side),
            _ => {}
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Noted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut *self.io).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.note(),
            Poll::Ready(Err(_)) => self.activity.ended(self.side),
            _ => {}
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// How a splice ended, and the bytes read from each side (`a`, `b`).
#[derive(Debug, PartialEq, Eq)]
pub struct Spliced {
    pub a_read: u64,
    pub b_read: u64,
    /// No byte moved for the idle timeout: both sides are dropped unfinished.
    pub idle: bool,
    /// One side failed (reset, or a write to a closed peer).
    pub failed: bool,
    /// The side that ended first (read its end of stream, or failed).
    pub first_end: Option<Side>,
}

/// Copies `a` to `b` and `b` to `a` until both directions end (each side's end of stream is
/// passed on as a write shutdown), one fails, or nothing moves for `idle` (`None`: never).
pub async fn splice<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity {
        opened: Instant::now(),
        last_ms: AtomicU64::new(0),
        first_end: std::sync::atomic::AtomicU8::new(0),
    };
    let mut a = Noted {
        io: a,
        activity: &activity,
        side: Side::A,
        read: 0,
    };
    let mut b = Noted {
        io: b,
        activity: &activity,
        side: Side::B,
        read: 0,
    };
    let outcome = {
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        let mut copy = std::pin::pin!(copy);
        match idle {
            None => Some(copy.await.is_ok()),
            Some(idle) => {
                let mut sleep = Box::pin(tokio::time::sleep(idle));
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = copy.as_mut().poll(cx) {
                        return Poll::Ready(Some(r.is_ok()));
                    }
                    // Set again when bytes moved since it was set.
                    crate::http::timeouts::poll_deadline(&mut sleep, cx, || activity.last() + idle)
                        .map(|()| None)
                })
                .await
            }
        }
    };
    Spliced {
        a_read: a.read,
        b_read: b.read,
        idle: outcome.is_none(),
        failed: outcome == Some(false),
        first_end: match activity.first_end.load(Ordering::Relaxed) {
            1 => Some(Side::A),
            2 => Some(Side::B),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn bytes_keep_a_splice_alive_and_silence_ends_it() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let task =
            tokio::spawn(
                async move { splice(&mut a, &mut b, Some(Duration::from_secs(10))).await },
            );
        // A byte every 6 s, for 30 s: never 10 s without one.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.unwrap();
            let mut got = [0u8; 1];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(b"yy").await.unwrap();
            let mut back = [0u8; 2];
            client.read_exact(&mut back).await.unwrap();
        }
        let start = Instant::now();
        let done = task.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(
            done,
            Spliced {
                a_read: 5,
                b_read: 10,
                idle: true,
                failed: false,
                first_end: None,
            }
        );
        // Both sides were dropped: the client sees the end.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_splice_without_a_timeout_ends_with_its_streams() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { splice(&mut a, &mut b, None).await });
        tokio::time::sleep(Duration::from_secs(7200)).await;
        client.write_all(b"late").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"late");
        server.shutdown().await.unwrap();
        let done = task.await.unwrap();
        assert!(!done.idle && !done.failed && done.a_read == 4);
        assert_eq!(done.first_end, Some(Side::A), "the client ended first");
    }
}
