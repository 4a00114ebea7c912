//! Plain-HTTP connections: which protocol, and HTTP/1.1 connections that let go of hyper while
//! they wait for their next request.
//!
//! **Why park.** Between requests hyper keeps a keep-alive connection's whole HTTP/1 state: the
//! 8 KiB read buffer it reserves before every read, the write buffer, the last request's header
//! map, its timers and the task around them (about 20 KiB in all; the heap profile is in
//! `docs/idle-memory.md`). Browsers hold many keep-alive connections open and idle, so a
//! connection that starts no request for [`PARK_AFTER`] is *parked*: hyper is told to finish (it
//! is between messages, so it stops at once, and its shutdown of the socket is skipped), the
//! socket is taken back, and the connection waits for its next byte holding only the socket,
//! its timers and its slot. That byte gets a fresh hyper connection. A busy connection never
//! parks, so the request path pays only for counting (a few atomic operations per request).
//!
//! **When hyper is between messages.** [`Activity`] counts what is in flight on the connection:
//! requests in the handler, response bodies not yet finished, request bodies not yet read to
//! their end. At zero, with the socket's last write finished, every request has been read whole
//! and every response written and sent whole, so hyper is idle; had it meant to close after the
//! last exchange, it would have by then. A request body dropped before its end is left to hyper, which drains it or
//! closes the connection; such a connection never parks again, since the next request could
//! otherwise start in the middle of the old body. Bytes of a next request that hyper had
//! already read (a head cut in two) come back with the socket and are read first; the
//! connection then does not park again before that request starts, so the header-read timeout
//! still bounds a slow head.
//!
//! **Which protocol.** A connection's first bytes decide, once: HTTP/2's preface (prior
//! knowledge, h2c) goes to hyper's HTTP/2 server for the connection's life; anything else is
//! HTTP/1.1, with upgrades. HTTPS connections are not parked (`server`: ALPN decides there).

use crate::headers::Peer;
use crate::idle::ConnIo;
use crate::proxy::{self, ProxyCtx, ResponseBody};
use crate::server::{Drained, Ticket};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// By default, a keep-alive connection that starts no request for this long (up to twice this:
/// the check runs once per period) is parked. Long enough that a client sending request after request
/// never parks (parking and waking cost a new hyper connection), short against the idle
/// timeout.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// HTTP/2's connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP servers of plain connections, configured once per listener.
pub struct Http {
    pub h1: http1::Builder,
    pub h2: http2::Builder<TokioExecutor>,
    /// [`PARK_AFTER`] unless configured; zero never parks.
    pub park_after: Duration,
    /// How long a parked connection waits for its next request: the header-read timeout,
    /// which bounds hyper's own wait between keep-alive requests too.
    pub keep_alive: Duration,
}

/// What is in flight on one HTTP/1.1 connection, shared by its requests, its bodies, its I/O and
/// the connection itself.
#[derive(Default)]
pub struct Activity {
    /// Requests started (high 32 bits, wrapping) and things in flight (low 32 bits), in one word
    /// so that a request's start is one atomic operation.
    state: AtomicU64,
    /// Set for good when parking could lose or misplace bytes: a request body dropped before its
    /// end, or an upgrade or CONNECT (answered or not).
    unclean: AtomicBool,
    /// The socket's last write or flush could not finish (set by [`ConnIo`]): hyper may hold
    /// unsent bytes, and may mean to close once they are out, so the connection does not park.
    write_blocked: AtomicBool,
    /// Set while hyper is being told to finish for parking: the I/O then skips the socket's
    /// shutdown ([`ConnIo`]), so the socket stays open for the connection's next request.
    parking: AtomicBool,
}

const STARTED: u64 = 1 << 32;
const IN_FLIGHT: u64 = STARTED - 1;

impl Activity {
    fn begin_request(self: &Arc<Self>) -> InFlight {
        self.state.fetch_add(STARTED + 1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.state.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn never_park(&self) {
        self.unclean.store(true, Ordering::Release);
    }

    /// Called by the I/O on every write or flush that finishes or not.
    pub fn write_blocked(&self, blocked: bool) {
        if self.write_blocked.load(Ordering::Relaxed) != blocked {
            self.write_blocked.store(blocked, Ordering::Release);
        }
    }

    /// True while the socket must not be shut down (hyper finishing for a park).
    pub fn is_parking(&self) -> bool {
        self.parking.load(Ordering::Acquire)
    }

    /// (requests started, things in flight), and whether the connection may still park.
    fn snapshot(&self) -> (u64, u64, bool) {
        // `unclean` is set before the body's count drops, so a zero count read first would be
        // seen with it.
        let s = self.state.load(Ordering::Acquire);
        let clean = !self.unclean.load(Ordering::Acquire);
        (s >> 32, s & IN_FLIGHT, clean)
    }
}

/// One thing in flight (a request in the handler, a response body, a request body).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.state.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Rides in a request's extensions while its body is being read: `proxy` takes it into the
/// upload and calls [`BodyWatch::ended`] once the body has been read to its end. Dropped
/// without that, it marks the connection unclean (hyper is left with the rest of the body).
#[derive(Clone)]
pub struct BodyWatch(Arc<Watch>);

struct Watch {
    ended: AtomicBool,
    _in_flight: InFlight,
}

impl BodyWatch {
    /// The request body has been read to its end.
    pub fn ended(&self) {
        self.0.ended.store(true, Ordering::Release);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.ended.load(Ordering::Acquire) {
            // Before `_in_flight` drops the count (fields drop after this body).
            self._in_flight.0.unclean.store(true, Ordering::Release);
        }
    }
}

/// A response body that counts as in flight until hyper drops it (after writing its end).
pub struct Counted {
    body: ResponseBody,
    _in_flight: InFlight,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = proxy::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, proxy::BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// One parked connection in `luma_proxy_connections_parked`, for as long as it lives.
struct Parked<'a>(&'a crate::metrics::Metrics);

impl Parked<'_> {
    fn new(metrics: &crate::metrics::Metrics) -> Parked<'_> {
        metrics.connection_parked();
        Parked(metrics)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.connection_unparked();
    }
}

/// Serves one HTTP/2 connection (prior knowledge) until it closes. HTTP/2 connections are not
/// parked.
async fn serve_h2(
    io: ConnIo<TcpStream>,
    ctx: Arc<ProxyCtx>,
    peer: Peer,
    http: &Http,
    ticket: Ticket,
) {
    // Boxed: hyper spawns a task per stream, and moving the whole request future into it (a
    // few copies of some KiB) cost more than one allocation (docs/profile.md, "h2c").
    let svc = service_fn(move |req| {
        let (c, peer) = (ctx.clone(), peer.clone());
        Box::pin(async move { Ok::<_, Infallible>(proxy::handle(c, req, peer, None).await) })
    });
    // Answers of many streams leave in one write (coalesce.rs).
    let conn = http
        .h2
        .serve_connection(TokioIo::new(crate::coalesce::Coalesced::new(io)), svc);
    let _ = Drained::new(conn, ticket).await;
}

/// Serves one plain-HTTP connection until it closes.
pub(crate) async fn serve(
    mut io: ConnIo<TcpStream>,
    ctx: Arc<ProxyCtx>,
    peer: Peer,
    http: Arc<Http>,
    mut ticket: Ticket,
) {
    let activity = Arc::new(Activity::default());
    io.hold_open_while_parking(activity.clone());
    let Ok(h2) = read_preface(&mut io, &mut ticket).await else {
        return;
    };
    if h2 {
        return serve_h2(io, ctx, peer, &http, ticket).await;
    }
    // Answers leave at the end of the runtime's turn, together (coalesce.rs). The wrapper stays
    // on while the connection is parked: it holds nothing then (hyper only goes idle once its
    // flush is done).
    let mut io = crate::coalesce::Coalesced::new(io);
    let svc = {
        let (activity, ctx) = (activity.clone(), ctx.clone());
        service_fn(move |mut req: Request<Incoming>| {
            let in_flight = activity.begin_request();
            if req
                .extensions()
                .get::<hyper::upgrade::OnUpgrade>()
                .is_some()
            {
                // An upgrade or CONNECT: hyper keeps the upgrade pending even when it is
                // refused, and would hand the socket to it instead of back.
                activity.never_park();
            }
            if !req.body().is_end_stream() {
                req.extensions_mut().insert(BodyWatch(Arc::new(Watch {
                    ended: AtomicBool::new(false),
                    _in_flight: activity.begin(),
                })));
            }
            let (c, peer) = (ctx.clone(), peer.clone());
            // Boxed too: once the HTTP/2 path was boxed, the compiler copied this future whole
            // into hyper's dispatcher (~450 instructions of `memcpy` per request, callgrind);
            // boxed, HTTP/1.1 costs what it did before (docs/profile.md, "h2c").
            Box::pin(async move {
                let resp = proxy::handle(c, req, peer, None).await;
                Ok::<_, Infallible>(resp.map(|body| Counted {
                    body,
                    _in_flight: in_flight,
                }))
            })
        })
    };
    let park_after = http.park_after;
    // Looked at on every wake of the connection: lazy, so it costs a check, not a poll.
    let mut timer = crate::timer::LazySleep::until(Instant::now() + park_after);
    loop {
        // Only once a request has started on this hyper connection: hyper counts itself busy
        // until its first request ends, and a head that is still arriving (perhaps the bytes
        // that woke a parked connection) stays under the header-read timeout.
        let mut may_park = false;
        let mut conn = Box::new(
            http.h1
                .serve_connection(TokioIo::new(io), svc.clone())
                .with_upgrades(),
        );
        let (mut seen, _, _) = activity.snapshot();
        timer.reset(Instant::now() + park_after);
        let mut told = false;
        let mut parking = false;
        let mut quiet_before = false;
        let finished = poll_fn(|cx| loop {
            if !told && ticket.draining(cx.waker()) {
                told = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            if let Poll::Ready(r) = Pin::new(&mut *conn).poll(cx) {
                return Poll::Ready(r.is_ok());
            }
            if told || parking || park_after.is_zero() {
                return Poll::Pending;
            }
            if timer.poll(cx).is_pending() {
                return Poll::Pending;
            }
            let (started, in_flight, clean) = activity.snapshot();
            if started != seen {
                may_park = true;
            }
            // Quiet for a whole period: no request started, and nothing in flight at either end.
            let quiet = started == seen && in_flight == 0;
            let was_quiet = std::mem::replace(&mut quiet_before, quiet);
            // With every byte written out, hyper is between messages and means to go on: an
            // exchange after which it closes (HTTP/1.0, `Connection: close` either way) has
            // already ended the connection by now.
            let flushed = !activity.write_blocked.load(Ordering::Acquire);
            if may_park && clean && quiet && was_quiet && flushed {
                // hyper is idle: it finishes at once, without a byte to send.
                parking = true;
                activity.parking.store(true, Ordering::Release);
                Pin::new(&mut *conn).graceful_shutdown();
                continue;
            }
            seen = started;
            timer.reset(Instant::now() + park_after);
        })
        .await;
        activity.parking.store(false, Ordering::Release);
        let (_, in_flight, clean) = activity.snapshot();
        if !(finished && parking && in_flight == 0 && clean) {
            // Closed (hyper shut the socket down), failed, drained or upgraded.
            return;
        }
        let Some(parts) = (*conn).into_parts() else {
            return;
        };
        // Moved out, so that hyper's read buffer (which this shares) is freed before the wait.
        let read_buf = parts.read_buf;
        io = parts.io.into_inner();
        if !read_buf.is_empty() {
            // A next request had begun: serve it now.
            io.get_mut().unread(read_buf);
            continue;
        }
        drop(read_buf);
        let _parked = Parked::new(&ctx.metrics);
        let wait = poll_fn(|cx| {
            if ticket.draining(cx.waker()) {
                return Poll::Ready(false);
            }
            io.get_mut().poll_parked(cx).map(|r| r.is_ok())
        });
        let woke = tokio::time::timeout(http.keep_alive, wait).await;
        if woke != Ok(true) {
            // Drained, ended, past the keep-alive limit, timed out or failed while idle.
            return;
        }
    }
}

/// Reads a connection's first bytes, up to the length of HTTP/2's preface, and puts them back:
/// true if they are the preface. Fails if the connection closes or times out first, or the
/// listener drains.
async fn read_preface(io: &mut ConnIo<TcpStream>, ticket: &mut Ticket) -> Result<bool, ()> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    let h2 = loop {
        let read = io.read(&mut buf[n..]);
        tokio::pin!(read);
        let got = poll_fn(|cx| {
            if ticket.draining(cx.waker()) {
                return Poll::Ready(Err(()));
            }
            read.as_mut().poll(cx).map_err(|_| ())
        })
        .await?;
        if got == 0 {
            return Err(());
        }
        n += got;
        if buf[..n] != H2_PREFACE[..n] {
            break false;
        }
        if n == H2_PREFACE.len() {
            break true;
        }
    };
    io.unread(Bytes::copy_from_slice(&buf[..n]));
    Ok(h2)
}
