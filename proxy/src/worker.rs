//! Thread-per-core workers, as Envoy runs them: each worker thread drives its own single-threaded
//! tokio runtime, accepts on its own SO_REUSEPORT socket of every listener, and keeps its own
//! upstream connection pools, so a request never crosses threads. The main thread runs xDS and
//! the admin server.

use std::cell::Cell;
use std::sync::OnceLock;

use tokio::runtime::Handle;

static COUNT: OnceLock<usize> = OnceLock::new();

thread_local! {
    /// 0 on the main thread (and in tests), 1..=count() on workers.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Number of workers (1 until `start` is called).
pub fn count() -> usize {
    COUNT.get().copied().unwrap_or(1)
}

/// Index of the calling thread's slot in per-worker tables: 0..=count().
#[inline]
pub fn current() -> usize {
    CURRENT.with(|c| c.get())
}

/// Starts `n` worker threads and returns their runtime handles. Call once, before any listener
/// or cluster exists.
pub fn start(n: usize) -> std::io::Result<Vec<Handle>> {
    let n = n.max(1);
    let _ = COUNT.set(n);
    let mut handles = Vec::with_capacity(n);
    for id in 1..=n {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("weft-worker-{id}"))
            .spawn(move || {
                CURRENT.with(|c| c.set(id));
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(std::future::pending::<()>());
            })?;
        handles.push(rx.recv().map_err(std::io::Error::other)??);
    }
    Ok(handles)
}
