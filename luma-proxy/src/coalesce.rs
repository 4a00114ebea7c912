//! A connection's writes gathered into one system call, made at the end of the runtime's turn.
//!
//! Every client connection writes through [`Coalesced`]: HTTP/1.1 and HTTP/2, plain and TLS.
//! Two things come of it:
//!
//! - **Within a connection.** An HTTP/2 connection carries many requests at once, and their
//!   answers come back from the backends at nearly the same time. The `h2` crate writes each
//!   DATA frame of 256 bytes or more as its own write (it keeps the payload apart instead of
//!   copying it, and holds one such frame at a time), then flushes. With four requests in
//!   flight that is four `sendto`s, four wake-ups of the client and four segments where one
//!   would do (measured: 1.00 client write per request for luma-proxy against 0.25 for
//!   HAProxy, `docs/profile.md`, "HTTP/2: one write per wake-up"). hyper's HTTP/1.1 answer, a
//!   head and a body, leaves as one write (one TLS record) instead of a two-part `writev`.
//! - **Across connections.** A flush is put off to the end of the turn, so the answers of all
//!   the connections whose backends answered in one wake-up of the worker leave together, one
//!   after the other. A client (or a load generator on the same machine) that waits on many
//!   connections then finds several ready at once instead of one at a time. Written at once,
//!   as each task finished, they trickled out while the worker went on parsing and forwarding
//!   the others: `wrk` called `epoll_wait` 1.41 times per request through luma-proxy, 1.26
//!   through nginx, and 0.67 through HAProxy, which sends at the end of its loop's pass; with
//!   the flush put off, 0.56 (`benches/wakeups.py`; `docs/profile.md`, "Answers leave
//!   together"). What it costs an answer is the rest of the turn: at a fixed rate with 1
//!   worker, a p50 higher by a per-round median of 11 µs than a build writing at once, and no
//!   sign of a cost in the p99 (below that build's in 9 of 14 paired rounds, within the
//!   spread; `docs/profile.md`, "The answers' flush in paired rounds").
//!
//! How: writes are gathered in a buffer, and a flush that finds new bytes is put off: the
//! connection's task wakes itself and returns, so the tasks that are already ready run first
//! (and an HTTP/2 connection's streams add their frames). A flush that finds nothing new since
//! the last one writes everything out in one call. Nothing waits on a timer: each deferral is
//! one turn of the runtime's queue, so a lone answer goes out on the next turn; a connection
//! that adds bytes on every turn (HTTP/2 streams, an upgraded tunnel's small messages) is put
//! off again each time, until [`STRAIGHT_FROM`] bytes are gathered. Pipelined HTTP/1.1 requests
//! get a turn each: hyper reads the next one only once the answer before it is flushed.
//! A connection let go with bytes still gathered (an error mid-answer, a tunnel that ended)
//! writes what its socket takes at once, as it would have without the wrapper (`Drop`).
//!
//! Bounds: at most [`GATHER_LIMIT`] bytes are gathered; a write that would go past it first
//! writes out what was gathered. A write of [`STRAIGHT_FROM`] bytes or more (a large body's
//! frame) is not gathered: what was gathered goes first, then it goes straight to the socket,
//! uncopied; and a flush with that much gathered is not put off, so a large download costs no
//! extra turns. The buffer is given back at each flush: an idle connection holds none.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;

/// The most bytes gathered before they are written (h2's own write buffer is as large).
pub const GATHER_LIMIT: usize = 16 * 1024;
/// Writes this large are not gathered, and a flush with this much gathered is not put off.
pub const STRAIGHT_FROM: usize = 8 * 1024;

pub struct Coalesced<T: AsyncWrite + Unpin> {
    inner: T,
    gathered: Vec<u8>,
    /// How much of `gathered` is already written.
    written: usize,
    /// How much was gathered when a flush was last put off: a flush finding nothing new since
    /// then writes out.
    deferred_at: Option<usize>,
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    pub fn new(inner: T) -> Coalesced<T> {
        Coalesced {
            inner,
            gathered: Vec::new(),
            written: 0,
            deferred_at: None,
        }
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The wrapped socket, to use directly (a parked connection waits on it).
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Writes out what was gathered.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.gathered.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.gathered[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.gathered.clear();
        self.written = 0;
        self.deferred_at = None;
        Poll::Ready(Ok(()))
    }

    /// Room for `len` more bytes: what was gathered is written out first when they would not
    /// fit or are not to be gathered. Ready(true): gather them; Ready(false): write them
    /// straight.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        let gather = len < STRAIGHT_FROM;
        if !gather || self.gathered.len() + len > GATHER_LIMIT {
            ready!(self.poll_write_out(cx))?;
        }
        if gather && self.gathered.capacity() == 0 {
            // One allocation for a batch of small frames, not one per doubling.
            self.gathered.reserve(STRAIGHT_FROM);
        }
        Poll::Ready(Ok(gather))
    }
}

/// Without this wrapper, bytes gathered here would already be on the wire when a connection
/// is let go: hyper failing in the middle of an answer (a backend that reset after its head),
/// a client that half-closed right after its request, a tunnel whose other side failed. So
/// what is left gets one try, without waiting: what the socket takes now leaves.
impl<T: AsyncWrite + Unpin> Drop for Coalesced<T> {
    fn drop(&mut self) {
        if self.written < self.gathered.len() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = self.poll_write_out(&mut cx);
        }
    }
}

impl<T: tokio::io::AsyncRead + AsyncWrite + Unpin> tokio::io::AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !ready!(this.poll_room(cx, buf.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.gathered.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.gathered.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    /// Vectored, so that h2 hands over DATA payloads as they are (its copy threshold is lower
    /// for vectored sockets); they are gathered here instead.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let gathered = this.gathered.len();
        if gathered > this.written && gathered < STRAIGHT_FROM && this.deferred_at != Some(gathered)
        {
            // The tasks already woken (other connections' answers, other streams' frames) run
            // before this one comes back. h2 also flushes whenever it holds a DATA payload
            // apart, before it takes the next frame; so a flush is put off for as long as each
            // one finds new bytes, and the one that finds none (h2 has nothing more to send)
            // writes out. STRAIGHT_FROM bounds the run.
            this.deferred_at = Some(gathered);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_write_out(cx))?;
        // Given back once written: an idle HTTP/2 connection holds no buffer here, and the
        // allocator hands the same block to the next batch.
        this.gathered = Vec::new();
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A real socket that counts the writes that reach it.
    struct Counted {
        stream: TcpStream,
        writes: usize,
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes += 1;
            Pin::new(&mut this.stream).poll_write(cx, buf)
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes += 1;
            Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().stream).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
        }
    }

    async fn pair() -> (Coalesced<Counted>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (Coalesced::new(Counted { stream, writes: 0 }), peer)
    }

    /// One poll of a flush: Ready or not, and whether it woke its task to come back.
    fn flush_once(io: &mut Coalesced<Counted>) -> (bool, bool) {
        let woke = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = waker_setting(woke.clone());
        let mut cx = Context::from_waker(&waker);
        let ready = Pin::new(io).poll_flush(&mut cx).is_ready();
        (ready, woke.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn waker_setting(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::task::Waker {
        struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        std::task::Waker::from(std::sync::Arc::new(Flag(flag)))
    }

    #[tokio::test]
    async fn frames_written_between_flushes_leave_in_one_write() {
        let (mut io, mut peer) = pair().await;
        io.write_all(b"HEADERS1").await.unwrap();
        let n = io
            .write_vectored(&[io::IoSlice::new(b"|DATA"), io::IoSlice::new(b"1|")])
            .await
            .unwrap();
        // Gathered whole, both pieces.
        assert_eq!(n, 7);
        // The first flush is put off, once, with a wake so the task comes back.
        assert_eq!(flush_once(&mut io), (false, true));
        assert_eq!(io.get_ref().writes, 0);
        // More frames came meanwhile (another stream's): put off again.
        io.write_all(b"DATA2").await.unwrap();
        assert_eq!(flush_once(&mut io), (false, true));
        // Nothing new: everything goes, in one write.
        assert_eq!(flush_once(&mut io), (true, false));
        assert_eq!(io.get_ref().writes, 1);
        let mut got = vec![0; 20];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HEADERS1|DATA1|DATA2");
        // Flushing with nothing gathered neither waits nor writes.
        assert_eq!(flush_once(&mut io), (true, false));
        assert_eq!(io.get_ref().writes, 1);
    }

    #[tokio::test]
    async fn past_the_limit_what_was_gathered_goes_first_and_big_writes_go_straight() {
        let (mut io, mut peer) = pair().await;
        io.write_all(b"small").await.unwrap();
        let big = vec![7u8; GATHER_LIMIT + 1];
        // Vectored, as h2 writes a frame head and its payload.
        let n = poll_fn(|cx| {
            Pin::new(&mut io)
                .poll_write_vectored(cx, &[io::IoSlice::new(b"head"), io::IoSlice::new(&big)])
        })
        .await
        .unwrap();
        assert!(n > 0);
        // "small" was written out before, then the big one straight to the socket: nothing
        // of it was copied into the buffer.
        assert!(io.get_ref().writes >= 2);
        assert!(io.gathered.is_empty());
        let mut got = vec![0; 5 + 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"smallhead");
    }

    #[tokio::test]
    async fn a_small_write_that_would_overflow_writes_out_first_and_is_then_gathered() {
        let (mut io, mut peer) = pair().await;
        let piece = vec![1u8; STRAIGHT_FROM - 1024];
        io.write_all(&piece).await.unwrap();
        io.write_all(&piece).await.unwrap();
        assert_eq!(io.get_ref().writes, 0);
        // A third would pass GATHER_LIMIT: the first two go out, in one write.
        io.write_all(&piece).await.unwrap();
        assert_eq!(io.get_ref().writes, 1);
        assert_eq!(io.gathered.len() - io.written, piece.len());
        let mut got = vec![0; 2 * piece.len()];
        peer.read_exact(&mut got).await.unwrap();
        // With as much gathered as STRAIGHT_FROM or more, a flush is not put off.
        io.write_all(&piece[..2048]).await.unwrap();
        assert_eq!(flush_once(&mut io), (true, false));
        assert_eq!(io.get_ref().writes, 2);
    }

    /// A peer that reads slowly: writes out stop half way (Pending), more is gathered
    /// meanwhile, and every byte still arrives, in order, and every flush finishes.
    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = Coalesced::new(near);
        let frames: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + i as usize * 37]).collect();
        let expected: Vec<u8> = frames.concat();
        let writer = async {
            for pair in frames.chunks(3) {
                for f in pair {
                    io.write_all(f).await.unwrap();
                }
                io.flush().await.unwrap();
            }
            io.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            let mut buf = [0u8; 50];
            loop {
                let n = far.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
                tokio::task::yield_now().await;
            }
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes out of order");
    }

    #[tokio::test]
    async fn shutdown_writes_out_what_was_gathered() {
        let (mut io, mut peer) = pair().await;
        io.write_all(b"GOAWAY").await.unwrap();
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got, b"GOAWAY");
    }

    #[tokio::test]
    async fn bytes_gathered_when_the_connection_is_let_go_still_leave() {
        let (mut io, mut peer) = pair().await;
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel")
            .await
            .unwrap();
        assert_eq!(io.get_ref().writes, 0, "gathered, not written");
        // No flush: hyper failed mid-answer, or the tunnel ended.
        drop(io);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel");
    }
}
