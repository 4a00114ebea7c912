//! The I/O wrapper of every public connection: its timeouts, its slot, and its end at shutdown.
//!
//! - **First-byte timeout.** Until the client has sent a byte, the connection lives for the
//!   first-byte timeout only (a connection that sends nothing is closed early, whatever
//!   protocol it was going to speak).
//! - **Idle timeout.** After that, a connection with no bytes in either direction for the idle
//!   timeout fails. This covers HTTP/2 (the proxy sends no keep-alive pings of its own, so an
//!   idle HTTP/2 connection really is idle) and upgraded tunnels. The clock is checked on every
//!   pending read *and* every pending write or flush: a client that stops reading its
//!   responses (pipelined requests whose answers fill the socket buffers, so hyper waits on the
//!   write and no longer reads) is closed at the idle timeout too, not held forever.
//! - **Slot.** The wrapper owns the connection's slot (a permit of the global connection limit
//!   and its gauge), so a connection that hyper hands over to an upgrade (a WebSocket tunnel)
//!   keeps counting against the limit until the tunnel drops the socket.
//! - **End.** When its worker shuts down and in-flight requests are done, every read and write
//!   fails, which ends tunnels (and anything left past the shutdown timeout).
//!
//! - **Parking** (plain HTTP/1.1, `park`): bytes read ahead come back to the wrapper
//!   ([`ConnIo::unread`]) and are read first; while hyper finishes for a park, its shutdown of
//!   the socket is skipped; a parked connection waits for its next byte in
//!   [`ConnIo::poll_parked`], under the same timeouts and end signal.
//!
//! The timer is re-armed lazily: reads and writes only store a timestamp, and the sleep is
//! reset when it fires early, so the hot path pays for a clock read, not a timer update; and it
//! is a [`LazySleep`], polled only when it needs the caller's waker.

use crate::timer::LazySleep;
use bytes::{Buf, Bytes};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Resolves when the connection must end.
pub type EndSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct ConnIo<T> {
    /// Dropped with the connection (or the tunnel that took it over). Declared first, so it is
    /// dropped before the socket: once a client sees the close, the slot is already free.
    _slot: Option<Box<dyn Send>>,
    inner: T,
    /// `Some` until the first byte arrives.
    first_byte: Option<Duration>,
    idle: Duration,
    last: Instant,
    sleep: LazySleep,
    end: Option<EndSignal>,
    ended: bool,
    /// Bytes read ahead and given back: read before the socket.
    unread: Bytes,
    /// The connection's activity, when it may park: its shutdown is skipped while parking.
    parking: Option<Arc<crate::park::Activity>>,
}

/// A socket that can wait for bytes without a buffer, then read what came.
pub trait ReadReady {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads without waiting: WouldBlock (and readiness cleared) when nothing came.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        tokio::net::TcpStream::try_read(self, buf)
    }
}

impl<T> ConnIo<T> {
    /// `first_byte` is capped at `idle`.
    pub fn new(inner: T, first_byte: Duration, idle: Duration) -> ConnIo<T> {
        let now = Instant::now();
        let first = first_byte.min(idle);
        ConnIo {
            _slot: None,
            inner,
            first_byte: Some(first),
            idle,
            last: now,
            sleep: LazySleep::until(now + first),
            end: None,
            ended: false,
            unread: Bytes::new(),
            parking: None,
        }
    }

    /// Gives back bytes read ahead: the next reads return them first.
    /// Bytes given back earlier and not yet read came after `bytes` on the wire (a hyper
    /// connection reads them only after what it had buffered), so they stay behind them.
    pub fn unread(&mut self, bytes: Bytes) {
        if self.unread.is_empty() {
            self.unread = bytes;
        } else if !bytes.is_empty() {
            let mut both = Vec::with_capacity(bytes.len() + self.unread.len());
            both.extend_from_slice(&bytes);
            both.extend_from_slice(&self.unread);
            self.unread = both.into();
        }
    }

    /// While `activity` is parking, a shutdown of this I/O is skipped (hyper shuts the socket
    /// down when it finishes; a parked connection keeps it open).
    pub fn hold_open_while_parking(&mut self, activity: Arc<crate::park::Activity>) {
        self.parking = Some(activity);
    }

    /// Every read and write fails once `end` resolves.
    pub fn with_end(mut self, end: EndSignal) -> Self {
        self.end = Some(end);
        self
    }

    /// Keeps `slot` alive exactly as long as the connection.
    pub fn with_slot(mut self, slot: Box<dyn Send>) -> Self {
        self._slot = Some(slot);
        self
    }

    fn timeout(&self) -> Duration {
        self.first_byte.unwrap_or(self.idle)
    }

    /// Ready(err) once the connection has been silent for the whole current timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.sleep.poll(cx).is_ready() {
            let deadline = self.last + self.timeout();
            if Instant::now() >= deadline {
                let what = if self.first_byte.is_some() {
                    "no bytes within the first-byte timeout"
                } else {
                    "connection idle timeout"
                };
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, what));
            }
            // Fired early (the connection was active since): the next turn checks the new
            // deadline and gives the timer the waker again.
            self.sleep.reset(deadline);
        }
        Poll::Pending
    }

    /// True once the end signal has fired (and registers for it otherwise).
    fn poll_end(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.ended {
            if let Some(end) = self.end.as_mut() {
                if end.as_mut().poll(cx).is_ready() {
                    self.ended = true;
                    self.end = None;
                }
            }
        }
        self.ended
    }

    /// Tells a parkable connection's activity whether the last write or flush finished.
    fn write_done(&self, finished: bool) {
        if let Some(a) = &self.parking {
            a.write_blocked(!finished);
        }
    }

    /// Ready(Ok) once the next bytes have come (they are read first, from [`ConnIo::unread`]);
    /// Ready(Err) at the end of stream, or when the connection must end meanwhile (its timeout
    /// or the end signal).
    pub fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        T: ReadReady,
    {
        if self.poll_end(cx) {
            return Poll::Ready(Err(ended()));
        }
        if !self.unread.is_empty() {
            return Poll::Ready(Ok(()));
        }
        loop {
            match self.inner.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return self.poll_expired(cx).map(Err),
            }
            // Readiness can be stale: only bytes (or the end) wake the connection. A stale one
            // is cleared by the WouldBlock, and the loop waits again.
            let mut first = [0u8; 2048];
            match self.inner.try_read(&mut first) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => {
                    self.last = Instant::now();
                    self.unread = Bytes::copy_from_slice(&first[..n]);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// What a pending write, flush or shutdown returns: still pending, or the timeout error once
    /// no byte has moved either way for the whole timeout (the peer stopped reading).
    fn pending_write<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        self.write_done(false);
        match self.poll_expired(cx) {
            Poll::Ready(e) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn ended() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection ended by proxy shutdown",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_end(cx) {
            return Poll::Ready(Err(ended()));
        }
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.advance(n);
            if this.unread.is_empty() {
                // An empty view still holds the buffer it came from (hyper's, perhaps).
                this.unread = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.last = Instant::now();
                if buf.filled().len() > before {
                    this.first_byte = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.poll_expired(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_end(cx) {
            return Poll::Ready(Err(ended()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.pending_write(cx),
            r => {
                if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                    this.last = Instant::now();
                }
                this.write_done(true);
                r
            }
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_end(cx) {
            return Poll::Ready(Err(ended()));
        }
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.pending_write(cx),
            r => {
                if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                    this.last = Instant::now();
                }
                this.write_done(true);
                r
            }
        }
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.pending_write(cx),
            r => {
                this.write_done(true);
                r
            }
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.parking.as_ref().is_some_and(|a| a.is_parking()) {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.pending_write(cx),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn silence_fails_at_the_first_byte_timeout_then_the_idle_timeout() {
        let (a, _b) = tokio::io::duplex(64);
        let mut io = ConnIo::new(a, Duration::from_secs(10), Duration::from_secs(120));
        let t = Instant::now();
        let mut buf = [0u8; 8];
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t.elapsed(), Duration::from_secs(10));

        let (a, mut b2) = tokio::io::duplex(64);
        let mut io = ConnIo::new(a, Duration::from_secs(10), Duration::from_secs(120));
        b2.write_all(b"x").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        let t = Instant::now();
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t.elapsed(), Duration::from_secs(120));
    }

    /// The timer is registered again when another task polls (a tunnel takes the socket over
    /// from hyper's connection task): it wakes the task that waits now, not the one before.
    #[tokio::test(start_paused = true)]
    async fn the_timeout_wakes_the_task_that_polls_last() {
        let (a, _b) = tokio::io::duplex(64);
        let io = ConnIo::new(a, Duration::from_secs(10), Duration::from_secs(120));
        let t = Instant::now();
        let mut io = tokio::spawn(async move {
            let mut io = io;
            let mut buf = [0u8; 8];
            let gave_up = tokio::time::timeout(Duration::from_secs(1), io.read(&mut buf)).await;
            assert!(
                gave_up.is_err(),
                "the read ended before the first-byte timeout"
            );
            io
        })
        .await
        .unwrap();
        let e = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            tokio::time::timeout(Duration::from_secs(600), io.read(&mut buf)).await
        })
        .await
        .unwrap()
        .expect("the second task's read never ended")
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Later means the timer woke the first task and the second only saw it when polled for
        // another reason.
        assert_eq!(
            t.elapsed(),
            Duration::from_secs(10),
            "the first-byte timeout did not wake the task that waited"
        );
    }

    /// A poll made when the task's budget has run out registers nothing with the timer (tokio
    /// only schedules the task again), so it must not count as armed: the next poll registers.
    #[tokio::test(start_paused = true)]
    async fn a_poll_without_budget_leaves_the_timer_to_the_next_poll() {
        let (a, _b) = tokio::io::duplex(64);
        let mut io = ConnIo::new(a, Duration::from_secs(10), Duration::from_secs(120));
        let t = Instant::now();
        let mut buf = [0u8; 8];
        let read = async {
            let mut read = std::pin::pin!(io.read(&mut buf));
            // The read's first poll comes with the task's budget used up.
            std::future::poll_fn(|cx| {
                while std::pin::pin!(tokio::task::coop::consume_budget())
                    .poll(cx)
                    .is_ready()
                {}
                assert!(!tokio::task::coop::has_budget_remaining());
                assert!(read.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            read.await
        };
        let e = tokio::time::timeout(Duration::from_secs(600), read)
            .await
            .expect("the read never ended")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            t.elapsed(),
            Duration::from_secs(10),
            "the first-byte timeout did not fire on time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_a_pending_write_at_the_idle_timeout() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = ConnIo::new(a, Duration::from_secs(10), Duration::from_secs(120));
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        // The peer never reads: the first 64 bytes fit, then the write waits for good. No read
        // is pending meanwhile (as in hyper writing a response with the next request buffered).
        let t = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(600), io.write_all(&[0u8; 1024]))
            .await
            .expect("the write was still pending after 600 s (idle timeout 120 s)")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t.elapsed(), Duration::from_secs(120));
        // A peer that reads, however slowly, keeps it alive: each byte moved restarts the clock.
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = ConnIo::new(a, Duration::from_secs(10), Duration::from_secs(120));
        b.write_all(b"x").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        let slow_reader = tokio::spawn(async move {
            let mut got = 0;
            let mut chunk = [0u8; 64];
            while got < 1024 {
                tokio::time::sleep(Duration::from_secs(100)).await;
                got += b.read(&mut chunk).await.unwrap();
            }
            b
        });
        let t = Instant::now();
        io.write_all(&[0u8; 1024]).await.unwrap();
        assert!(t.elapsed() > Duration::from_secs(120), "{:?}", t.elapsed());
        slow_reader.await.unwrap();
    }

    #[tokio::test]
    async fn bytes_given_back_twice_are_read_in_wire_order() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = ConnIo::new(a, Duration::from_secs(10), Duration::from_secs(120));
        b.write_all(b"4").await.unwrap();
        // Given back by a first hyper connection, then (partly read) by a second one.
        io.unread(Bytes::from_static(b"23"));
        io.unread(Bytes::from_static(b"1"));
        let mut got = Vec::new();
        let mut buf = [0u8; 8];
        while got.len() < 4 {
            let n = io.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"1234");
    }

    #[tokio::test]
    async fn the_slot_is_dropped_before_the_socket() {
        struct Order(
            std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
            &'static str,
        );
        impl Drop for Order {
            fn drop(&mut self) {
                self.0.lock().unwrap().push(self.1);
            }
        }
        impl AsyncRead for Order {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Pending
            }
        }
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let io = ConnIo::new(
            Order(log.clone(), "socket"),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .with_slot(Box::new(Order(log.clone(), "slot")));
        drop(io);
        assert_eq!(*log.lock().unwrap(), ["slot", "socket"]);
    }

    #[tokio::test]
    async fn the_end_signal_fails_a_pending_read_and_drops_the_slot_with_the_io() {
        let (a, _b) = tokio::io::duplex(64);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let slot = std::sync::Arc::new(());
        let mut io = ConnIo::new(a, Duration::from_secs(60), Duration::from_secs(60))
            .with_end(Box::pin(async move {
                let _ = rx.await;
            }))
            .with_slot(Box::new(slot.clone()));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let r = io.read(&mut buf).await;
            drop(io);
            r
        });
        tx.send(()).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(std::sync::Arc::strong_count(&slot), 1);
    }
}
