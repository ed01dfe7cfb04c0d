//! A downstream HTTP/2 connection's streams, run inside the connection's own task.
//!
//! hyper hands every HTTP/2 stream's future to an executor. With tokio's, each stream was a
//! task of its own: an allocation aligned to a cache line (glibc's slow `memalign` path), an
//! entry in the runtime's list of tasks (taken and given back under its lock), a join handle
//! made and dropped, and a trip through the scheduler's queue for every wake-up. A worker is
//! one thread, so a stream task never ran anywhere but beside its connection anyway. Here
//! [`Inline`] is the executor: it only keeps the futures hyper opens, and [`run`] polls them in
//! the connection's task, right before and after the connection itself. What the streams
//! answer is then written in the same poll of the connection (see `coalesce`), and a
//! connection that ends drops its streams with it, as a reset stream already did. One thing
//! is lost: a stream that panicked was its task's alone, and would now end its connection's
//! other streams too (the request path answers errors, it does not panic).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

/// Rounds of "poll the streams, poll the connection, take the streams it opened" in one poll
/// of the task before it yields to the worker's other tasks.
const ROUNDS: usize = 8;

/// A stream's future, as hyper hands it over. Boxed: hyper's stream type names its executor,
/// so the executor cannot name it back.
type Stream = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor a connection's streams are handed to: it keeps them for [`run`].
#[derive(Clone, Default)]
pub struct Inline {
    opened: Arc<Mutex<Vec<Stream>>>,
}

impl Inline {
    fn take(&self, running: &mut FuturesUnordered<Stream>) -> bool {
        let mut opened = self.opened.lock().unwrap_or_else(PoisonError::into_inner);
        if opened.is_empty() {
            return false;
        }
        running.extend(opened.drain(..));
        true
    }
}

impl<F> hyper::rt::Executor<F> for Inline
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::pin(stream));
    }
}

/// Runs `conn`, whose executor is `streams`, together with the streams it opens; its output
/// once the connection ends (streams still running then are dropped).
pub async fn run<C: Future>(conn: C, streams: Inline) -> C::Output {
    let mut conn = std::pin::pin!(conn);
    let mut running = FuturesUnordered::new();
    std::future::poll_fn(|cx| {
        for _ in 0..ROUNDS {
            // Streams that were woken: what they answer, the connection writes below.
            while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
            if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            // Streams the connection opened in that poll start now, and the connection is
            // polled again for what they answer at once (a local reply, an error).
            if !streams.take(&mut running) {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Streams opened by the connection run in its task until the connection ends; one that
    /// waits is woken and finished; those left when the connection ends are dropped.
    #[tokio::test]
    async fn streams_run_beside_their_connection() {
        let streams = Inline::default();
        let finished = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        let exec = streams.clone();
        let done = finished.clone();
        let conn = async move {
            // Opens one stream that finishes at once and one that waits for `tx`.
            let d = done.clone();
            exec.execute(async move {
                d.fetch_add(1, Ordering::SeqCst);
            });
            let d = done.clone();
            exec.execute(async move {
                let _ = rx.await;
                d.fetch_add(1, Ordering::SeqCst);
            });
            let d = done.clone();
            exec.execute(async move {
                std::future::pending::<()>().await;
                d.fetch_add(1, Ordering::SeqCst);
            });
            let _ = end_rx.await;
            7
        };
        let task = tokio::spawn(run(conn, streams));
        settle().await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        tx.send(()).unwrap();
        settle().await;
        assert_eq!(finished.load(Ordering::SeqCst), 2);
        end_tx.send(()).unwrap();
        assert_eq!(task.await.unwrap(), 7);
        assert_eq!(finished.load(Ordering::SeqCst), 2);
    }
}
