//! The inline upstream client: a request without a body or upgrade is written, and its answer
//! read, by the request's own task on a pooled socket, with the codec in [`crate::h1`].
//!
//! Why: hyper's client puts a connection task and a channel each way between a request and its
//! socket; done inline the exchange costs 1.8x fewer instructions (docs/profile.md, "The
//! upstream exchange"), more than the whole gap to nginx. Requests with a body, upgrades and
//! anything not replayable still go through hyper's client (`backend::Backend::send`).
//!
//! The rules, and why each holds:
//! - **Only replayable requests** (GET, HEAD, OPTIONS, no body: `proxy::is_replayable`). On a
//!   pooled socket the backend may have closed, a write can succeed and only the read sees the
//!   close; hyper hands such a request back unsent, this client cannot know. So a request that
//!   gets no answer is replayed once, on a new socket of the next backend (the same one when it
//!   is alone), as hyper's path replays: harmless only because the request is replayable.
//!   Pooled sockets that closed while idle are found before the write (see `Conn::is_quiet`).
//! - **Pool**: the backend's reuse rule (`backend` module doc) in a `pool::IdlePool` of its
//!   own, one stack per serving thread, stamped with the arrival of the last answer's head. A socket goes back only
//!   when its answer was read to the end, the answer allows keep-alive, and no byte follows it.
//!   A socket that became readable while idle (a close, or bytes nobody asked for) is dropped at
//!   checkout.
//! - **Bounds**: a head larger than [`MAX_HEAD`] is refused; the response timeout is the
//!   caller's (`proxy::forward`), around [`exchange`], and it also ends an endless run of
//!   interim 1xx answers. One request is written at most twice: once, and once replayed.
//! - **Body**: [`InlineBody`] streams the answer's body to the client frame by frame from the
//!   socket's buffer; dropped before its end (the client left), it closes the socket.

use crate::backend::{Backend, Reuse};
use crate::h1::{self, Decoded, Decoder, Malformed, ResponseHead};
use bytes::{Bytes, BytesMut};
use hyper::body::Frame;
use hyper::http::request::Parts;
use std::io;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most bytes of a response head: what hyper's client allowed (8 KiB + 100 x 4 KiB), so
/// no backend that worked before is refused now.
pub const MAX_HEAD: usize = 8192 + 4096 * 100;
/// A socket idle longer than this is asked directly whether it is still quiet (a peek, one
/// system call): a backend closes idle sockets on its own clock, seconds after their last
/// answer, and the runtime may not have seen that yet. One reused sooner is trusted to the
/// runtime's readiness, which costs nothing.
const PEEK_AFTER: Duration = Duration::from_millis(50);
// A connection the pool hands out in turn must be trusted without the peek.
const _: () = assert!(crate::pool::ROTATE_WITHIN.as_nanos() < PEEK_AFTER.as_nanos());
/// A pooled socket's buffer larger than this (a big head went through it) is replaced.
const KEEP_BUFFER: usize = 16 * 1024;

/// One upstream socket with what was read ahead on it.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    head: Vec<u8>,
    /// The serving thread whose runtime drives the socket: it is pooled only there.
    worker: usize,
    /// A big head went through the buffer: its allocation is replaced before pooling (the
    /// view's `capacity()` can be small while it keeps the whole allocation).
    grew: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::with_capacity(8192),
            head: Vec::with_capacity(512),
            worker: crate::workers::index(),
            grew: false,
        }
    }

    /// At least 4 KiB free to read into (8 KiB more when less is left).
    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
    }

    /// The socket as it may be pooled: on its own thread only (the runtime that drives it),
    /// with a buffer a big head grew replaced (see [`KEEP_BUFFER`]).
    pub fn into_poolable(mut self) -> Option<Conn> {
        if self.worker != crate::workers::index() {
            return None;
        }
        if self.grew {
            self.buf = BytesMut::with_capacity(8192);
            self.grew = false;
        }
        if self.head.capacity() > KEEP_BUFFER {
            self.head = Vec::with_capacity(512);
        }
        Some(self)
    }

    /// True when nothing came on the socket while it was idle, `idle` long. The runtime's
    /// readiness answers first; a readable socket is read once, to tell a stale readiness (the
    /// last read of the previous answer did not hit WouldBlock) from a close or stray bytes.
    /// "Not readable" is only trusted for a short idle, or when the runtime may not have
    /// looked (its budget spent): otherwise the kernel is asked (see [`PEEK_AFTER`]).
    fn is_quiet(&mut self, idle: Duration) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let budget = tokio::task::coop::has_budget_remaining();
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending if budget && idle < PEEK_AFTER => true,
            Poll::Pending => {
                let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                matches!(
                    socket2::SockRef::from(&self.stream).peek(&mut byte),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock
                )
            }
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read_buf(&mut self.buf),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failed {
    /// No connection could be made: nothing was sent.
    Connect(io::Error),
    /// The request may have reached the backend, and no usable answer came.
    Sent(String),
}

/// An answer's head, and the socket its body is still to be read from.
pub struct Answer {
    pub head: ResponseHead,
    pub conn: Conn,
    /// When the head arrived: the socket's stamp if it goes back to the pool.
    pub head_at: Instant,
}

/// Writes `parts` as a request without a body, once, and reads the answer's head: on a pooled
/// socket `reuse` allows (None: a new socket only) that is still quiet, or on a new one. A
/// failure after the write is the caller's to replay, once, on the next backend, as hyper's
/// path does: a pooled socket that dies under a request may mean its backend is dying too.
pub async fn exchange(
    backend: &Backend,
    parts: &Parts,
    reuse: Option<Reuse>,
) -> Result<Answer, Failed> {
    // Pooled sockets found closed before anything was written: a backend that restarted leaves
    // a stack of them; past a few, a new socket is opened.
    let mut closed = 0;
    let mut conn = loop {
        match reuse
            .filter(|_| closed < 4)
            .and_then(|r| backend.inline_checkout(r))
        {
            Some((mut c, idle)) => {
                if c.is_quiet(idle) {
                    break c;
                }
                closed += 1;
            }
            None => {
                let stream = crate::backend::connect(
                    backend.addr,
                    backend.device.as_deref(),
                    backend.connect_timeout,
                )
                .await
                .map_err(Failed::Connect)?;
                break Conn::new(stream);
            }
        }
    };
    backend.count_inline_write();
    match ask(&mut conn, parts).await {
        Ok(head) => Ok(Answer {
            head,
            conn,
            head_at: Instant::now(),
        }),
        Err(Unanswered::Silent(e)) => Err(Failed::Sent(format!(
            "upstream closed without answering: {e}"
        ))),
        Err(Unanswered::Bad(e)) => Err(Failed::Sent(e)),
    }
}

enum Unanswered {
    /// Not one byte of an answer came.
    Silent(String),
    /// Something came, and it was not a usable answer.
    Bad(String),
}

async fn ask(conn: &mut Conn, parts: &Parts) -> Result<ResponseHead, Unanswered> {
    h1::encode_request_head(parts, &mut conn.head);
    if let Err(e) = conn.stream.write_all(&conn.head).await {
        return Err(Unanswered::Silent(e.to_string()));
    }
    let mut got_any = false;
    loop {
        match h1::parse_response_head(&mut conn.buf, &parts.method, MAX_HEAD) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(e) => return Err(Unanswered::Bad(e.to_string())),
        }
        conn.make_room();
        conn.grew |= conn.buf.len() > KEEP_BUFFER;
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) if !got_any => return Err(Unanswered::Silent("connection closed".into())),
            Ok(0) => return Err(Unanswered::Bad(Malformed::Truncated.to_string())),
            Ok(_) => got_any = true,
            Err(e) if !got_any => return Err(Unanswered::Silent(e.to_string())),
            Err(e) => return Err(Unanswered::Bad(e.to_string())),
        }
    }
}

/// An answer's body, read from its socket as the client takes it.
pub struct InlineBody {
    conn: Option<Conn>,
    decoder: Decoder,
    keep_alive: bool,
    head_at: Instant,
}

/// What a finished body leaves: the socket, when it may carry another request.
pub struct Reusable {
    pub conn: Conn,
    pub head_at: Instant,
}

impl InlineBody {
    pub fn new(answer: Answer) -> (ResponseHead, InlineBody) {
        let Answer {
            head,
            conn,
            head_at,
        } = answer;
        let body = InlineBody {
            decoder: Decoder::new(head.framing),
            keep_alive: head.keep_alive,
            conn: Some(conn),
            head_at,
        };
        (head, body)
    }

    pub fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    /// The socket, once the body has ended and the socket may be reused (taken once).
    pub fn take_reusable(&mut self) -> Option<Reusable> {
        if !self.decoder.is_done() || !self.keep_alive {
            self.conn = None;
            return None;
        }
        let conn = self.conn.take()?;
        conn.buf.is_empty().then_some(Reusable {
            conn,
            head_at: self.head_at,
        })
    }

    /// The next frame: data, trailers, or the end. Errors close the socket.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = next_frame(conn, &mut self.decoder, cx);
        if matches!(polled, Poll::Ready(Some(Err(_)))) {
            self.conn = None;
        }
        polled
    }

    /// Bytes still to come, when the answer said.
    pub fn size_hint(&self) -> hyper::body::SizeHint {
        match self.decoder.remaining() {
            Some(n) => hyper::body::SizeHint::with_exact(n),
            None => hyper::body::SizeHint::default(),
        }
    }
}

fn next_frame(
    conn: &mut Conn,
    decoder: &mut Decoder,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
    loop {
        match decoder.decode(&mut conn.buf) {
            Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
            Ok(Decoded::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(Decoded::Done) => return Poll::Ready(None),
            Ok(Decoded::NeedMore) => {}
            Err(e) => return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, e)))),
        }
        conn.make_room();
        match conn.stream.try_read_buf(&mut conn.buf) {
            Ok(0) => {
                return match decoder.eof() {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => {
                        Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, e))))
                    }
                }
            }
            Ok(_) => {}
            // Woken when bytes come; readiness that came back meanwhile means read again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match conn.stream.poll_read_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                }
            }
            Err(e) => return Poll::Ready(Some(Err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn conn() -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (Conn::new(stream), peer)
    }

    #[tokio::test]
    async fn only_the_serving_threads_sockets_are_pooled_with_small_buffers() {
        let (mut c, _peer) = conn().await;
        c.grew = true;
        c.buf = BytesMut::with_capacity(MAX_HEAD);
        c.head = Vec::with_capacity(KEEP_BUFFER + 1);
        let c = c.into_poolable().expect("same thread: pooled");
        assert!(!c.grew);
        assert!(c.buf.capacity() < KEEP_BUFFER, "{}", c.buf.capacity());
        assert!(c.head.capacity() <= KEEP_BUFFER, "{}", c.head.capacity());

        // A socket whose runtime is another serving thread's is never pooled here.
        let (mut other, _peer) = conn().await;
        other.worker = crate::workers::index() + 1;
        assert!(other.into_poolable().is_none());
    }
}
