//! Write coalescing for downstream HTTP/2 connections.
//!
//! hyper's HTTP/2 codec flushes the connection after every DATA frame larger than a few hundred
//! bytes, so a connection answering ten streams with 10 KB bodies made ten `writev` calls, each
//! a full trip through the kernel's TCP stack (and a wake-up of the client). Here the frames a
//! connection produces in one poll of its task are gathered and written together once that
//! poll is over: [`Coalesced`] is the I/O hyper sees, its `poll_flush` only notes that a write
//! is owed, and [`drive`] polls the connection and then writes what was gathered. No byte
//! waits longer than the poll that produced it; a full buffer is written at once, and a socket
//! that cannot take more holds the connection back as before.
//!
//! Large body chunks are not copied into the gathering buffer: an answer's body [`lend`]s its
//! chunks as it hands them to hyper, and when the codec writes a slice that lies inside a lent
//! chunk, the chunk itself is kept and written from where it is (a vectored write). The codec
//! only ever shows its writer slices; the lent chunks are how the writer finds the memory they
//! belong to (and keeps it alive until written).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Gathered bytes written before more are accepted.
const HIGH_WATER: usize = 64 * 1024;
/// A gathering buffer's size: the high-water mark and one more HTTP/2 frame of the default size.
const BUFFER: usize = HIGH_WATER + 16 * 1024 + 9;
/// Written-out buffers each worker thread keeps for the next connection that gathers.
const SPARES: usize = 4;
/// Body chunks at least this large are lent to the writer rather than copied into its buffer.
pub const LEND_MIN: usize = 2048;
/// Lent chunks a connection remembers: the oldest is forgotten (and its bytes copied, if they
/// are written after all) once more are lent before the codec writes them.
const LENT: usize = 32;
/// Slices given to one vectored write.
const SLICES: usize = 64;

std::thread_local! {
    /// A connection holds a buffer only while it has bytes to write: one that has written
    /// everything gives it back here. Taking and freeing an 80 KiB block per batch instead
    /// made glibc grow and shrink the thread's heap (`mprotect`, `madvise` and page faults
    /// on every few batches), and a buffer kept per connection would be held by idle ones.
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Vec<u8> {
    SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(BUFFER))
}

fn give_back(mut buffer: Vec<u8>) {
    if buffer.capacity() != BUFFER {
        return;
    }
    buffer.clear();
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARES {
            spare.push(buffer);
        }
    });
}

/// Where the answers of one connection lend their large body chunks to its writer.
#[derive(Clone, Default)]
pub struct Lender(Arc<Mutex<Lent>>);

#[derive(Default)]
struct Lent {
    /// Chunks, oldest first, each with the count of completed writes when it was lent.
    chunks: VecDeque<(u32, Bytes)>,
    writes: u32,
}

impl Lender {
    /// A body chunk about to be handed to the connection: if its writer is given a slice of
    /// it, it keeps the chunk instead of copying the bytes.
    pub fn lend(&self, chunk: &Bytes) {
        let mut lent = crate::lock_own(&self.0);
        if lent.chunks.len() == LENT {
            lent.chunks.pop_front();
        }
        let writes = lent.writes;
        lent.chunks.push_back((writes, chunk.clone()));
    }

    /// The lent chunk `slice` lies in, cut to `slice`. A chunk is forgotten once a slice
    /// reaching its end was found (the codec writes a frame's payload once, front to back).
    fn borrow(&self, slice: &[u8]) -> Option<Bytes> {
        let start = slice.as_ptr() as usize;
        let end = start + slice.len();
        let mut lent = crate::lock_own(&self.0);
        let i = lent.chunks.iter().position(|(_, chunk)| {
            let from = chunk.as_ptr() as usize;
            from <= start && end <= from + chunk.len()
        })?;
        let chunk = &lent.chunks[i].1;
        let found = chunk.slice_ref(slice);
        if end == chunk.as_ptr() as usize + chunk.len() {
            lent.chunks.remove(i);
        }
        Some(found)
    }

    /// Everything gathered was written: chunks that no longer need remembering are let go, so
    /// that a connection (an idle one too) holds no memory for answers that went away. That is
    /// a chunk nothing else holds (its stream was reset: the codec dropped the frame) and one
    /// lent before the write before this one (it waits for flow-control window, or its stream
    /// went away while others still hold the buffer; it is copied if it is written after all).
    fn written(&self) {
        let mut lent = crate::lock_own(&self.0);
        if lent.chunks.is_empty() {
            return;
        }
        lent.writes = lent.writes.wrapping_add(1);
        let now = lent.writes;
        lent.chunks
            .retain(|(at, chunk)| now.wrapping_sub(*at) < 2 && !chunk.is_unique());
    }
}

struct State<S> {
    io: S,
    lender: Lender,
    /// Gathered bytes that were copied.
    pending: Vec<u8>,
    /// Lent chunks to write, each before the copied bytes from its offset in `pending` on.
    lent: VecDeque<(usize, Bytes)>,
    /// Bytes gathered since everything was last written, lent ones included.
    gathered: usize,
    /// How much of `pending` is written.
    written: usize,
    /// A write of gathered bytes failed: the connection's next write or flush reports it.
    failed: Option<io::ErrorKind>,
}

impl<S: AsyncWrite + Unpin> State<S> {
    /// Writes what is gathered, then flushes the stream (a TLS stream holds records until then).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        while !self.lent.is_empty() {
            let n = {
                let mut out = [IoSlice::new(&[]); SLICES];
                let count = slices(&self.pending, self.written, &self.lent, &mut out);
                match ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &out[..count])) {
                    Ok(0) => return self.fail(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) => return self.fail(e),
                }
            };
            self.advance(n);
        }
        while self.written < self.pending.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending[self.written..])) {
                Ok(0) => return self.fail(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) => return self.fail(e),
            }
        }
        if self.pending.capacity() > 0 {
            self.written = 0;
            self.gathered = 0;
            give_back(std::mem::take(&mut self.pending));
            self.lender.written();
        }
        match ready!(Pin::new(&mut self.io).poll_flush(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => self.fail(e),
        }
    }

    /// `n` more bytes are written.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.lent.front_mut() {
                Some((offset, _)) if self.written < *offset => {
                    let step = n.min(*offset - self.written);
                    self.written += step;
                    n -= step;
                }
                Some((_, chunk)) => {
                    let step = n.min(chunk.len());
                    chunk.advance(step);
                    n -= step;
                    if chunk.is_empty() {
                        self.lent.pop_front();
                    }
                }
                None => {
                    self.written += n;
                    n = 0;
                }
            }
        }
        // A chunk written to its end the write before (or an empty one) leaves no slice behind.
        while self.lent.front().is_some_and(|(_, chunk)| chunk.is_empty()) {
            self.lent.pop_front();
        }
    }

    /// Gathers `buf`: a slice of a lent chunk is kept as that chunk, other bytes are copied.
    fn gather(&mut self, buf: &[u8]) {
        self.gathered += buf.len();
        if buf.len() >= LEND_MIN
            && let Some(chunk) = self.lender.borrow(buf)
        {
            self.lent.push_back((self.pending.len(), chunk));
        } else {
            self.pending.extend_from_slice(buf);
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<io::Result<()>> {
        self.failed = Some(e.kind());
        self.pending = Vec::new();
        self.lent = VecDeque::new();
        self.gathered = 0;
        self.written = 0;
        Poll::Ready(Err(e))
    }
}

/// What is left to write, in order, as slices (as many as fit); how many.
fn slices<'a>(
    pending: &'a [u8],
    written: usize,
    lent: &'a VecDeque<(usize, Bytes)>,
    slices: &mut [IoSlice<'a>; SLICES],
) -> usize {
    let mut count = 0;
    let mut at = written;
    for (offset, chunk) in lent {
        if count + 2 > SLICES {
            return count;
        }
        if at < *offset {
            slices[count] = IoSlice::new(&pending[at..*offset]);
            count += 1;
            at = *offset;
        }
        slices[count] = IoSlice::new(chunk);
        count += 1;
    }
    if at < pending.len() {
        slices[count] = IoSlice::new(&pending[at..]);
        count += 1;
    }
    count
}

/// The connection's I/O as hyper sees it: reads pass through, writes are gathered.
pub struct Coalesced<S> {
    state: Arc<Mutex<State<S>>>,
}

/// Writes what a [`Coalesced`] stream gathered; see [`drive`].
pub struct Drain<S> {
    state: Arc<Mutex<State<S>>>,
}

/// Wraps `io`: the stream to hand to the connection, and what [`drive`] writes its bytes with;
/// the connection's answers lend their body chunks to `lender`.
pub fn coalesce<S>(io: S, lender: Lender) -> (Coalesced<S>, Drain<S>) {
    let state = Arc::new(Mutex::new(State {
        io,
        lender,
        pending: Vec::new(),
        lent: VecDeque::new(),
        gathered: 0,
        written: 0,
        failed: None,
    }));
    (
        Coalesced {
            state: state.clone(),
        },
        Drain { state },
    )
}

/// Only ever locked by the connection's own task, one poll at a time: never contended.
fn lock<S>(state: &Mutex<State<S>>) -> MutexGuard<'_, State<S>> {
    crate::lock_own(state)
}

/// Runs `conn` (the connection served over the [`Coalesced`] half of `drain`'s pair), writing
/// what each of its polls gathered before that poll ends; its output once everything it wrote
/// is out (or could not be written).
pub async fn drive<S, F>(conn: F, drain: Drain<S>) -> F::Output
where
    S: AsyncWrite + Unpin,
    F: Future,
{
    let mut conn = std::pin::pin!(conn);
    let mut done = None;
    std::future::poll_fn(|cx| {
        if done.is_none()
            && let Poll::Ready(out) = conn.as_mut().poll(cx)
        {
            done = Some(out);
        }
        let mut state = lock(&drain.state);
        // After a failed write nothing more is written; the connection ends on its own (it
        // was told once, below, and its reads fail too).
        let drained = if state.failed.is_some() {
            Poll::Ready(Ok(()))
        } else {
            state.poll_drain(cx)
        };
        drop(state);
        match drained {
            Poll::Pending => Poll::Pending,
            // The connection learns of the failure on its next write or flush: wake it so
            // that there is one even when it was only waiting to read.
            Poll::Ready(Err(_)) if done.is_none() => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(_) => match done.take() {
                Some(out) => Poll::Ready(out),
                None => Poll::Pending,
            },
        }
    })
    .await
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.state).io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Room for more: what is gathered is written first when it reached the high-water mark.
    fn poll_room(state: &mut State<S>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = state.failed {
            return Poll::Ready(Err(kind.into()));
        }
        if state.gathered >= HIGH_WATER {
            ready!(state.poll_drain(cx))?;
        }
        if state.pending.capacity() == 0 {
            state.pending = take_buffer();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = lock(&self.state);
        ready!(Self::poll_room(&mut state, cx))?;
        state.gather(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut state = lock(&self.state);
        ready!(Self::poll_room(&mut state, cx))?;
        let mut n = 0;
        for buf in bufs {
            state.gather(buf);
            n += buf.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Owed, not done: [`drive`] writes once the connection's poll is over.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.state).failed {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = lock(&self.state);
        ready!(state.poll_drain(cx))?;
        Pin::new(&mut state.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection that writes and flushes twice in one poll, then waits for a read.
    async fn two_writes_then_read<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> Vec<u8> {
        io.write_all(b"first ").await.unwrap();
        io.flush().await.unwrap();
        io.write_all(b"second").await.unwrap();
        io.flush().await.unwrap();
        let mut got = vec![0; 4];
        io.read_exact(&mut got).await.unwrap();
        io.shutdown().await.unwrap();
        got
    }

    #[tokio::test]
    async fn writes_of_one_poll_leave_together_before_the_connection_waits() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (io, drain) = coalesce(near, Lender::default());
        let conn = tokio::spawn(drive(two_writes_then_read(io), drain));
        // Both writes arrive although the connection never returned to a flush of its own
        // before it began waiting to read.
        let mut got = vec![0; 12];
        tokio::time::timeout(Duration::from_secs(5), far.read_exact(&mut got))
            .await
            .expect("the owed write was never made")
            .unwrap();
        assert_eq!(&got, b"first second");
        far.write_all(b"pong").await.unwrap();
        assert_eq!(conn.await.unwrap(), b"pong");
        // Shut down after the read: nothing more, then the end of the stream.
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// Everything the writer sends until it shuts down (within 10 s).
    async fn read_all<R: AsyncRead + Unpin>(far: &mut R) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), far.read_to_end(&mut got))
            .await
            .expect("the writer stalled")
            .unwrap();
        got
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_writer_back_and_loses_nothing() {
        // The pipe holds 4 KiB: 1 MiB has to wait for the reader, in order.
        let (near, mut far) = tokio::io::duplex(4096);
        let (mut io, drain) = coalesce(near, Lender::default());
        let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(drive(
            async move {
                for piece in sent.chunks(10_000) {
                    io.write_all(piece).await.unwrap();
                    io.flush().await.unwrap();
                }
                io.shutdown().await.unwrap();
            },
            drain,
        ));
        let got = read_all(&mut far).await;
        writer.await.unwrap();
        assert!(got == data, "{} bytes arrived of {}", got.len(), data.len());
    }

    /// A connection that writes, per frame, a small head and a payload through one vectored
    /// write (as hyper's HTTP/2 codec does), lending every payload first.
    async fn frames_of_lent_chunks<S: AsyncWrite + Unpin>(
        mut io: S,
        lender: Lender,
        chunks: Vec<Bytes>,
    ) {
        for (i, chunk) in chunks.iter().enumerate() {
            lender.lend(chunk);
            let head = [i as u8; 9];
            let mut bufs = [IoSlice::new(&head), IoSlice::new(chunk)];
            let mut bufs = &mut bufs[..];
            while !bufs.is_empty() {
                let n = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write_vectored(cx, bufs))
                    .await
                    .unwrap();
                IoSlice::advance_slices(&mut bufs, n);
            }
            if i % 3 == 2 {
                io.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        }
        io.shutdown().await.unwrap();
    }

    fn expected(chunks: &[Bytes]) -> Vec<u8> {
        let mut all = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            all.extend_from_slice(&[i as u8; 9]);
            all.extend_from_slice(chunk);
        }
        all
    }

    fn chunks(sizes: &[usize]) -> Vec<Bytes> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (0..n)
                    .map(|j| (i * 7 + j % 13) as u8)
                    .collect::<Vec<u8>>()
                    .into()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_lent_chunk_is_kept_not_copied() {
        let (near, _far) = tokio::io::duplex(1 << 20);
        let lender = Lender::default();
        let (mut io, drain) = coalesce(near, lender.clone());
        let chunk = chunks(&[10_240]).remove(0);
        lender.lend(&chunk);
        let head = [0u8; 9];
        // A slice inside the chunk (the codec put the payload's first bytes in its own buffer).
        let bufs = [IoSlice::new(&head), IoSlice::new(&chunk[100..])];
        let n = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write_vectored(cx, &bufs))
            .await
            .unwrap();
        assert_eq!(n, 9 + 10_140);
        {
            let state = lock(&drain.state);
            assert_eq!(state.pending.len(), 9, "only the frame head is copied");
            assert_eq!(state.lent.len(), 1);
            assert_eq!(state.lent[0].1.as_ptr(), chunk[100..].as_ptr());
            assert_eq!(state.gathered, 9 + 10_140);
        }
        // The slice reached the chunk's end: the chunk is no longer lent.
        assert!(lender.borrow(&chunk[..]).is_none());
        // Bytes that were never lent are copied.
        let other = vec![5u8; 4096];
        let n = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, &other))
            .await
            .unwrap();
        assert_eq!(n, 4096);
        assert_eq!(lock(&drain.state).pending.len(), 9 + 4096);
    }

    #[tokio::test]
    async fn lent_chunks_arrive_in_order_through_partial_writes() {
        // The pipe takes 1,000 bytes at a time: writes end inside heads and inside chunks.
        let (near, mut far) = tokio::io::duplex(1000);
        let lender = Lender::default();
        let (io, drain) = coalesce(near, lender.clone());
        let sent = chunks(&[
            10_240, 2_048, 100, 16_384, 3_000, 2_047, 40_000, 9_999, 70_000,
        ]);
        let want = expected(&sent);
        let writer = tokio::spawn(drive(frames_of_lent_chunks(io, lender, sent), drain));
        let got = read_all(&mut far).await;
        writer.await.unwrap();
        assert!(got == want, "{} bytes arrived of {}", got.len(), want.len());
    }

    #[tokio::test]
    async fn chunks_forgotten_before_their_write_are_copied() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let lender = Lender::default();
        let (mut io, drain) = coalesce(near, lender.clone());
        let first = chunks(&[4096]).remove(0);
        lender.lend(&first);
        // More chunks are lent than are remembered before `first` is written.
        let others = chunks(&vec![LEND_MIN; LENT]);
        for chunk in &others {
            lender.lend(chunk);
        }
        io.write_all(&first).await.unwrap();
        assert_eq!(lock(&drain.state).pending.len(), 4096, "copied");
        io.shutdown().await.unwrap();
        drop(io);
        drive(std::future::ready(()), drain).await;
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, first);
    }

    #[tokio::test]
    async fn chunks_that_are_not_written_are_let_go() {
        let (near, _far) = tokio::io::duplex(1 << 20);
        let lender = Lender::default();
        let (mut io, drain) = coalesce(near, lender.clone());
        let chunk = chunks(&[4096]).remove(0);
        let held = chunk.clone();
        lender.lend(&chunk);
        // Its stream went away: nothing but the lender holds it. Let go at the next write.
        drop(chunk);
        let waiting = chunks(&[4096]).remove(0);
        lender.lend(&waiting);
        drop(held);
        // A byte written, and everything gathered written out.
        async fn write<S: AsyncWrite + Unpin>(io: &mut Coalesced<S>, drain: &Drain<S>) {
            io.write_all(b"x").await.unwrap();
            let drain = Drain {
                state: drain.state.clone(),
            };
            drive(std::future::ready(()), drain).await;
        }
        write(&mut io, &drain).await;
        assert_eq!(
            crate::lock_own(&lender.0).chunks.len(),
            1,
            "the held one stays"
        );
        // Still held elsewhere (waiting for window), but lent two writes ago: let go too.
        write(&mut io, &drain).await;
        assert!(crate::lock_own(&lender.0).chunks.is_empty());
        assert!(lender.borrow(&waiting[..]).is_none());
    }

    #[tokio::test]
    async fn a_failed_write_reaches_the_connection() {
        let (near, far) = tokio::io::duplex(64);
        drop(far);
        let (mut io, drain) = coalesce(near, Lender::default());
        let result = drive(
            async move {
                io.write_all(b"into a closed pipe").await?;
                io.flush().await?;
                // The write owed above fails once this poll is over; the connection hears of
                // it on its next write (it is woken for it).
                tokio::task::yield_now().await;
                std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, b"more")).await?;
                io.flush().await
            },
            drain,
        )
        .await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
