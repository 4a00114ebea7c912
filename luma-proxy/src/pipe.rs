//! Copies an upgraded connection (a WebSocket tunnel) both ways, holding no buffer while idle.
//!
//! `tokio::io::copy_bidirectional` allocates an 8 KiB buffer per direction up front and keeps
//! both for the tunnel's life, 16 KiB for a WebSocket that mostly waits. Here each direction
//! reads into a buffer on the stack and writes it on at once; only bytes the writer cannot take
//! yet are copied to the heap, and that copy is freed as soon as it is written. An idle tunnel
//! holds its two sockets and nothing else. As in tokio's copy, written bytes are flushed before
//! a direction waits on its reader. (The client's side of a tunnel is a client connection, which
//! gathers small writes until that flush: `coalesce.rs`. It holds nothing once flushed either.)
//!
//! A direction ends at its reader's end of stream, after shutting its writer down (so a
//! half-close passes through); the copy ends when both have, or at the first error.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The stack buffer of one read: as much as a read usually brings.
const CHUNK: usize = 16 * 1024;

/// One direction's state.
#[derive(Default)]
struct Flow {
    /// Read but not yet written (None while idle).
    backlog: Option<Backlog>,
    /// Written but not yet flushed: a writer may keep bytes back (a TLS stream does, when the
    /// socket is full) until flushed, so a flush is owed before waiting on the reader.
    unflushed: bool,
    /// The reader ended; the writer's shutdown is pending.
    closing: bool,
    /// The reader ended and the writer has been shut down.
    done: bool,
}

struct Backlog {
    bytes: Box<[u8]>,
    at: usize,
}

impl Flow {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(b) = &mut self.backlog {
                while b.at < b.bytes.len() {
                    let n = std::task::ready!(Pin::new(&mut *w).poll_write(cx, &b.bytes[b.at..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(write_zero()));
                    }
                    b.at += n;
                    self.unflushed = true;
                }
                self.backlog = None;
            }
            if self.closing {
                std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Nothing more to read for now: what was written goes out before the wait.
                    if self.unflushed {
                        std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
            let got = buf.filled();
            if got.is_empty() {
                self.closing = true;
                continue;
            }
            // Write what the writer takes now; keep only the rest.
            let mut at = 0;
            while at < got.len() {
                match Pin::new(&mut *w).poll_write(cx, &got[at..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(write_zero())),
                    Poll::Ready(Ok(n)) => {
                        at += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if at < got.len() {
                self.backlog = Some(Backlog {
                    bytes: got[at..].into(),
                    at: 0,
                });
                // Pending on the write: woken when the writer can take more.
                return Poll::Pending;
            }
        }
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "the peer took no bytes")
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended (or one fails).
pub struct Pipe<'a, A, B> {
    a: &'a mut A,
    b: &'a mut B,
    a_to_b: Flow,
    b_to_a: Flow,
}

pub fn both_ways<'a, A, B>(a: &'a mut A, b: &'a mut B) -> Pipe<'a, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    Pipe {
        a,
        b,
        a_to_b: Flow::default(),
        b_to_a: Flow::default(),
    }
}

impl<A, B> Future for Pipe<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let ab = this.a_to_b.poll(cx, this.a, this.b)?;
        let ba = this.b_to_a.poll(cx, this.b, this.a)?;
        if ab.is_ready() && ba.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_pass_both_ways_with_backpressure_and_half_close() {
        // Small duplex buffers, so writes go pending and the backlog path is taken.
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let pipe = tokio::spawn(async move { both_ways(&mut a, &mut b).await });
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big, "client to server");
        // The server answers after the client's half-close, then closes too.
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"bye");
        pipe.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_idle_pipe_holds_no_backlog() {
        let (mut client, mut a) = tokio::io::duplex(1 << 16);
        let (mut b, mut server) = tokio::io::duplex(1 << 16);
        let mut pipe = Box::pin(both_ways(&mut a, &mut b));
        client.write_all(b"ping").await.unwrap();
        // One poll moves the bytes and then waits on both reads.
        let waker = futures_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(pipe.as_mut().poll(&mut cx).is_pending());
        assert!(pipe.a_to_b.backlog.is_none() && pipe.b_to_a.backlog.is_none());
        drop(pipe);
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    /// Keeps written bytes until flushed, and the first flush of each batch is Pending (as a
    /// TLS stream whose socket is full), then passes them on.
    struct HoldsUntilFlushed {
        inner: tokio::io::DuplexStream,
        held: Vec<u8>,
        refused: bool,
    }

    impl AsyncRead for HoldsUntilFlushed {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for HoldsUntilFlushed {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if !self.refused {
                self.refused = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let this = &mut *self;
            while !this.held.is_empty() {
                let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &this.held))?;
                this.held.drain(..n);
            }
            this.refused = false;
            Pin::new(&mut this.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn bytes_a_writer_holds_until_flushed_are_flushed_before_waiting() {
        let (mut client, mut a) = tokio::io::duplex(1 << 16);
        let (b, mut server) = tokio::io::duplex(1 << 16);
        let mut b = HoldsUntilFlushed {
            inner: b,
            held: Vec::new(),
            refused: false,
        };
        let pipe = tokio::spawn(async move { both_ways(&mut a, &mut b).await });
        // One message, then silence: nothing else would ever wake the flow.
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            server.read_exact(&mut got),
        )
        .await
        .expect("the message was held back in the writer")
        .unwrap();
        assert_eq!(&got, b"ping");
        pipe.abort();
        drop(client);
    }

    fn futures_waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}
