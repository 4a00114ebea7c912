//! One replica of an app: its address, pooled HTTP/1.1 connections, in-flight count and health.
//!
//! Connection reuse, the rule in one place (HAProxy's `http-reuse safe` is the model):
//! - A connection's proof of life is the moment its last response *head* arrived. The backend
//!   starts its idle timer when it has finished writing that response, which is no earlier
//!   than when it wrote the head; the proxy may read the rest of the body much later (a slow
//!   client sets the pace), so the end of that read says nothing about the backend's clock.
//!   The head's arrival lags the backend's end of writing by at most the head's transit time,
//!   however slow the client; for a body larger than the socket buffers it comes before it.
//!   A long response simply leaves its connection too old for the fast reuse below.
//! - A connection goes back to its serving thread's pool, with that stamp, once its response
//!   has been read to the end and its request body has been sent whole (one still uploading
//!   would make the next request wait behind the upload; it is closed instead). Each pool is a
//!   stack ordered by stamp: connections that traffic keeps busy are taken in turn, so the
//!   ones a burst opened stay warm, and otherwise the freshest is reused first and the
//!   stalest sit at the bottom, where they expire (`pool::IdlePool` keeps this order for both
//!   kinds of connection). Checking out skips (and closes) a connection that is not ready for
//!   a new request.
//! - A pooled connection whose stamp is older than the route's `timeouts.pool_idle_ms` (default
//!   1.5 s, below gunicorn's 2 s keep-alive, the shortest common one) is closed, never reused;
//!   pools are also swept at every health probe. Backends close idle connections on their own
//!   clock, and a request written into a connection the backend is closing at that instant is
//!   lost.
//! - GET, HEAD and OPTIONS without a body may use any pooled connection that has not expired:
//!   if it dies under them they are replayed once, on a connection proven alive (below).
//! - Every other request (a body, another method, an upgrade) cannot be replayed, so it only
//!   takes a connection whose last response head arrived less than [`SAFE_REUSE`] ago (250 ms,
//!   far below any backend's idle limit); otherwise it opens a fresh one. HAProxy's safe mode
//!   gets the same guarantee by sending a session's first request on its own connection and
//!   leaving later ones to the client's own retry; this proxy cannot count on its clients to
//!   retry, so it asks for recent proof of life instead.
//! - GET, HEAD and OPTIONS without a body or upgrade are sent by the inline client
//!   (`inline`), which keeps its own sockets by this same rule; everything else goes through
//!   hyper's client and the pool here.
//! - Health checks never use the pool. The active checks keep one connection of their own
//!   (see [`Backend::check`]), reused by the same rule; the deploy gate's probes open a fresh
//!   one each (see [`Backend::probe`]).
//!
//! Every upstream socket is opened by [`connect`]: pinned to the project's network interface
//! (`SO_BINDTODEVICE`; binding the source IP does not pick the interface when subnets overlap),
//! with `TCP_NODELAY`, and with `TCP_USER_TIMEOUT` so that a peer that vanishes (a container
//! disconnected from its network drops packets silently) fails the socket instead of hanging.
//!
//! A `Backend` object lives as long as one deploy of one route. Redeploying creates new
//! objects even for the same IP, so draining the old release means waiting for the old objects'
//! in-flight count to reach zero. The count is the drain's half of the handshake described in
//! `service`: it is incremented with `SeqCst` *before* the request checks whether its service
//! was stopped, and read with `SeqCst` by the drain *after* the service was stopped.

use crate::pool::IdlePool;
use crate::route::RouteTimeouts;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::proxy::Upload;

/// How recently a response head must have arrived on a pooled connection for a request that
/// cannot be replayed to use it (see the module doc).
pub const SAFE_REUSE: Duration = Duration::from_millis(250);
/// How long unacknowledged data may sit on an upstream socket before the kernel fails it.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Backend {
    pub addr: SocketAddr,
    /// Interface the sockets are pinned to (None in host mode).
    pub device: Option<Arc<str>>,
    pub connect_timeout: Duration,
    /// A pooled connection idle this long is closed (zero: no pooling).
    pool_idle: Duration,
    /// `SAFE_REUSE`, or `pool_idle` if shorter.
    safe_reuse: Duration,
    /// hyper's idle client connections (`pool` holds the rule).
    idle: IdlePool<Upstream>,
    inflight: AtomicUsize,
    healthy: AtomicBool,
    consecutive_ok: AtomicU32,
    consecutive_fail: AtomicU32,
    /// Checks that failed, active and the deploy gate's (the tests' witness that a kept
    /// connection going stale never counts against a healthy backend).
    failed_checks: AtomicU64,
    last_error: Mutex<Option<String>>,
    requests: AtomicU64,
    /// Flips to true when the backend is retired; open tunnels end then.
    retired: watch::Sender<bool>,
    /// The owning route's refresh, woken by a failure here (set by the service; see
    /// [`Backend::report_failure`]).
    kick: OnceLock<Arc<crate::service::Kick>>,
    /// The connection the active checks left open (see [`Backend::check`]).
    checker: Arc<Mutex<CheckerSlot>>,
    /// Idle sockets of the inline client (`inline`), by the same rule.
    inline: IdlePool<crate::inline::Conn>,
    /// Requests the inline client wrote to this backend (rewrites included).
    inline_writes: AtomicU64,
}

/// Where a health check's connection waits for the next check.
#[derive(Default)]
struct CheckerSlot {
    /// The connection, and when its last answer's head came.
    kept: Option<(http1::SendRequest<Empty<Bytes>>, Instant)>,
    /// Set when the backend is retired: nothing is kept any more (a check that finishes
    /// reading its answer afterwards closes its connection).
    closed: bool,
}

impl CheckerSlot {
    fn lock(slot: &Mutex<CheckerSlot>) -> std::sync::MutexGuard<'_, CheckerSlot> {
        slot.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The most of a health answer's body read to keep its connection; a longer one is dropped
/// with its connection, and the next check opens a fresh one.
const CHECK_BODY_LIMIT: usize = 64 * 1024;

/// One upstream connection: its sender, and the task that runs it.
struct Upstream {
    sender: http1::SendRequest<Upload>,
    task: AbortHandle,
}

/// A connection that has just answered, and when the response head arrived: the stamp it goes
/// back to the pool with (see the module doc).
pub struct Answered {
    conn: Upstream,
    head_at: Instant,
}

/// Aborts a connection's task if the request written on it is abandoned before its response
/// head came (the response timeout drops the send). Left alone, the task would hold the
/// request, and so the client's body, until the backend read the rest or the kernel gave up:
/// closing a connection first flushes what is buffered, which waits forever on a backend that
/// stopped reading.
struct AbortIfAbandoned(Option<AbortHandle>);

impl AbortIfAbandoned {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortIfAbandoned {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Which pooled connections a request may be sent on (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Replayable: any connection that has not expired.
    Any,
    /// Not replayable: only a connection whose last response head arrived within
    /// [`SAFE_REUSE`].
    Recent,
}

/// Why a send failed, and whether the request can still be retried.
pub enum SendError {
    /// No connection could be made; the request was not sent and is handed back.
    Connect(std::io::Error, Box<Request<Upload>>),
    /// The connection failed after the request may have been written.
    Sent(hyper::Error),
}

impl Backend {
    pub fn new(
        addr: SocketAddr,
        device: Option<Arc<str>>,
        timeouts: &RouteTimeouts,
    ) -> Arc<Backend> {
        let pool_idle = Duration::from_millis(timeouts.pool_idle_ms);
        Arc::new(Backend {
            addr,
            device,
            connect_timeout: Duration::from_millis(timeouts.connect_ms),
            pool_idle,
            safe_reuse: SAFE_REUSE.min(pool_idle),
            idle: IdlePool::new(pool_idle),
            inflight: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            consecutive_ok: AtomicU32::new(0),
            consecutive_fail: AtomicU32::new(0),
            failed_checks: AtomicU64::new(0),
            last_error: Mutex::new(None),
            requests: AtomicU64::new(0),
            retired: watch::channel(false).0,
            kick: OnceLock::new(),
            checker: Arc::default(),
            inline: IdlePool::new(pool_idle),
            inline_writes: AtomicU64::new(0),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Requests counted on this backend now. `SeqCst`: the drain's load in the handshake
    /// described in `service` (a plain load on x86, so the balancer may use it too).
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Counts a request as in flight until the guard drops. The increment is `SeqCst` and must
    /// come before the request checks [`crate::service::Service::is_stopped`] (see `service`).
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            backend: self.clone(),
        }
    }

    /// How many checks of this backend have failed since it was created (active checks and
    /// the deploy gate's probes).
    pub fn failed_checks(&self) -> u64 {
        self.failed_checks.load(Ordering::Relaxed)
    }

    /// Records an active or passive check result; returns true if the health state changed.
    pub fn record_check(&self, result: Result<(), String>, up_after: u32, down_after: u32) -> bool {
        match result {
            Ok(()) => {
                self.consecutive_fail.store(0, Ordering::Relaxed);
                let ok = self.consecutive_ok.fetch_add(1, Ordering::Relaxed) + 1;
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                if ok >= up_after && !self.healthy.swap(true, Ordering::Relaxed) {
                    return true;
                }
            }
            Err(msg) => {
                self.failed_checks.fetch_add(1, Ordering::Relaxed);
                self.consecutive_ok.store(0, Ordering::Relaxed);
                let fails = self.consecutive_fail.fetch_add(1, Ordering::Relaxed) + 1;
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(msg);
                }
                if fails >= down_after && self.healthy.swap(false, Ordering::Relaxed) {
                    return true;
                }
            }
        }
        false
    }

    /// Passive check: a failed connect takes the backend out of rotation at once, and asks its
    /// route to re-resolve (rate-limited there: see `service`).
    pub fn mark_down(&self, why: String) {
        self.healthy.store(false, Ordering::Relaxed);
        self.consecutive_ok.store(0, Ordering::Relaxed);
        // Back up only through a fresh connection: the kept one proves answers on a connection,
        // not that new ones are accepted, which is what just failed.
        CheckerSlot::lock(&self.checker).kept = None;
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(why);
        }
        self.report_failure();
    }

    /// Ties the backend to its route's refresh; a backend belongs to one route, so only the
    /// first call counts.
    pub fn set_kick(&self, kick: &Arc<crate::service::Kick>) {
        let _ = self.kick.set(kick.clone());
    }

    /// A failed connect or a failed check took this backend down: its address may be gone or
    /// changed, so the route re-resolves now ([`crate::service::Kick::failure`], at most once a
    /// second per route). No-op for a backend no started route owns.
    pub fn report_failure(&self) {
        if let Some(k) = self.kick.get() {
            k.failure();
        }
    }

    /// Marks the backend healthy without a check (the deploy gate has just checked it).
    pub fn mark_up(&self) {
        self.consecutive_fail.store(0, Ordering::Relaxed);
        self.healthy.store(true, Ordering::Relaxed);
    }

    /// Closes idle connections and tells open tunnels to end.
    pub fn retire(&self) {
        // send_replace, not send: `send` drops the value when no tunnel is subscribed, and
        // then `is_retired` would stay false and closed pools would take connections back.
        self.retired.send_replace(true);
        self.idle.clear();
        self.inline.clear();
        let mut checker = CheckerSlot::lock(&self.checker);
        checker.kept = None;
        checker.closed = true;
    }

    pub fn retired(&self) -> watch::Receiver<bool> {
        self.retired.subscribe()
    }

    pub fn is_retired(&self) -> bool {
        *self.retired.borrow()
    }

    /// Sends a request over a pooled connection that `reuse` allows, or a new one. The
    /// response body hands the connection back to the pool when it completes (see
    /// `proxy::ResponseBody`).
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Upload>,
        reuse: Reuse,
    ) -> Result<(Response<Incoming>, Answered), SendError> {
        while let Some((mut conn, _)) = self.idle.checkout(self.max_idle(reuse)) {
            // Not ready: still sending an earlier request (or its connection task has not
            // caught up yet). Waiting could mean waiting for someone else's upload: close it.
            if conn.sender.is_closed() || !conn.sender.is_ready() {
                continue;
            }
            let armed = AbortIfAbandoned(Some(conn.task.clone()));
            let sent = conn.sender.try_send_request(req).await;
            armed.disarm();
            match sent {
                Ok(resp) => return Ok((resp, answered(conn))),
                Err(mut e) => match e.take_message() {
                    // Not written: the pooled connection was already dead. Try the next one.
                    Some(r) => req = r,
                    None => return Err(SendError::Sent(e.into_error())),
                },
            }
        }
        let mut conn = match self.open().await {
            Ok(c) => c,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        let armed = AbortIfAbandoned(Some(conn.task.clone()));
        let sent = conn.sender.try_send_request(req).await;
        armed.disarm();
        match sent {
            Ok(resp) => Ok((resp, answered(conn))),
            Err(mut e) => match e.take_message() {
                Some(r) => Err(SendError::Connect(
                    std::io::Error::other("new connection closed before the request was sent"),
                    Box::new(r),
                )),
                None => Err(SendError::Sent(e.into_error())),
            },
        }
    }

    /// Returns a connection whose response completed (and whose request body was sent whole)
    /// to the idle pool, stamped with when its response head arrived.
    pub fn checkin(&self, conn: Answered) {
        let Answered { conn, head_at } = conn;
        if !conn.sender.is_closed() {
            self.idle.checkin(conn, head_at, || self.is_retired());
        }
    }

    /// Closes the expired connections of every thread's pool, so a backend that no request
    /// reaches does not keep them open (called at each health probe).
    pub fn expire_idle(&self) {
        self.idle.expire();
        self.inline.expire();
    }

    /// An idle socket of the inline client that `reuse` allows (see the module doc).
    pub fn inline_checkout(&self, reuse: Reuse) -> Option<(crate::inline::Conn, Duration)> {
        self.inline.checkout(self.max_idle(reuse))
    }

    /// How long ago a pooled connection's last answer may have come for `reuse`.
    fn max_idle(&self, reuse: Reuse) -> Duration {
        match reuse {
            Reuse::Any => self.pool_idle,
            Reuse::Recent => self.safe_reuse,
        }
    }

    pub fn count_inline_write(&self) {
        self.inline_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests the inline client wrote here (the tests' witness that it served them).
    pub fn inline_writes(&self) -> u64 {
        self.inline_writes.load(Ordering::Relaxed)
    }

    /// Takes back an inline socket whose answer was read to its end (not once retired).
    pub fn inline_checkin(&self, r: crate::inline::Reusable) {
        if self.inline.is_expired(r.head_at) {
            return;
        }
        if let Some(conn) = r.conn.into_poolable() {
            self.inline.checkin(conn, r.head_at, || self.is_retired());
        }
    }

    async fn open(&self) -> std::io::Result<Upstream> {
        let stream = connect(self.addr, self.device.as_deref(), self.connect_timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let task = tokio::spawn(async move {
            // Errors here surface to the request that owns the connection.
            let _ = conn.with_upgrades().await;
        })
        .abort_handle();
        Ok(Upstream { sender, task })
    }

    /// One health probe on a fresh connection, closed after it: what the deploy gate asks of a
    /// new release (it must accept connections, not merely answer on one).
    pub async fn probe(&self, path: &str, host: &str, timeout: Duration) -> Result<(), String> {
        self.expire_idle();
        let fut = async {
            let sender = self.check_connection().await?;
            self.ask(sender, path, host, false).await?
        };
        with_timeout(path, timeout, fut).await
    }

    /// One active health check. While the backend is healthy, it asks on the connection the
    /// last check left open when that answered within `timeouts.pool_idle_ms` (the pool's rule,
    /// module doc), so a check costs one exchange, not a connection: at 200 routes, 200
    /// connects a second were most of the proxy's idle CPU, each first packet walking all of
    /// the host's per-network firewall rules.
    ///
    /// The kept connection is only a shortcut, never a verdict against the backend: if it gives
    /// no answer within half the timeout (the backend closed it, restarted, or a busy worker
    /// holds it), the check is made again on a fresh connection, so a stale socket cannot fail
    /// a healthy backend. A backend that is down comes back up only through fresh connections
    /// (it may answer on an old one and refuse new ones).
    pub async fn check(&self, path: &str, host: &str, timeout: Duration) -> Result<(), String> {
        self.expire_idle();
        let keep = !self.pool_idle.is_zero();
        let kept = CheckerSlot::lock(&self.checker)
            .kept
            .take()
            .filter(|(sender, at)| {
                self.is_healthy() && at.elapsed() < self.pool_idle && !sender.is_closed()
            });
        let fut = async {
            if let Some((sender, _)) = kept {
                let first = tokio::time::timeout(timeout / 2, self.ask(sender, path, host, keep));
                if let Ok(Ok(verdict)) = first.await {
                    return verdict;
                }
            }
            let sender = self.check_connection().await?;
            self.ask(sender, path, host, keep).await?
        };
        with_timeout(path, timeout, fut).await
    }

    /// A fresh connection for a health check, its task spawned.
    async fn check_connection(&self) -> Result<http1::SendRequest<Empty<Bytes>>, String> {
        let stream = connect(self.addr, self.device.as_deref(), self.connect_timeout)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let (sender, conn) = http1::Builder::new()
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// `GET path` on `sender`. Err: no answer came (the connection was closed or failed
    /// before a response head). Ok: the verdict on the answer. With `keep`, an answer read to
    /// its end within `pool_idle` on a connection the backend keeps open leaves it for the next
    /// check; without, the request says `Connection: close`.
    async fn ask(
        &self,
        mut sender: http1::SendRequest<Empty<Bytes>>,
        path: &str,
        host: &str,
        keep: bool,
    ) -> Result<Result<(), String>, String> {
        use http_body_util::BodyExt;
        let mut req = Request::get(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "luma-proxy-health");
        if !keep {
            req = req.header(hyper::header::CONNECTION, "close");
        }
        let req = match req.body(Empty::new()) {
            Ok(r) => r,
            Err(e) => return Ok(Err(format!("bad health path {path:?}: {e}"))),
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let head_at = Instant::now();
        let status = resp.status();
        let verdict = if status.is_success() {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}"))
        };
        if keep {
            // Only a body read to its end leaves the connection ready for the next request.
            // The head is the verdict, as on a closed connection; the body is read apart, so
            // a slow or endless one never times a check out.
            // Past `pool_idle` the connection could not be reused anyway: the read stops there
            // and the connection closes, so no task or socket outlives it.
            let (body, slot, limit) = (resp.into_body(), self.checker.clone(), self.pool_idle);
            tokio::spawn(async move {
                let body = http_body_util::Limited::new(body, CHECK_BODY_LIMIT);
                let read = tokio::time::timeout(limit, body.collect()).await;
                if matches!(read, Ok(Ok(_))) && !sender.is_closed() {
                    let mut slot = CheckerSlot::lock(&slot);
                    if !slot.closed {
                        slot.kept = Some((sender, head_at));
                    }
                }
            });
        }
        Ok(verdict)
    }
}

/// `check` bounded by the health check's timeout.
async fn with_timeout(
    path: &str,
    timeout: Duration,
    check: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, check).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET {path} timed out after {timeout:?}")),
    }
}

fn answered(conn: Upstream) -> Answered {
    Answered {
        conn,
        head_at: Instant::now(),
    }
}

/// Decrements the backend's in-flight count when dropped.
pub struct InflightGuard {
    backend: Arc<Backend>,
}

impl InflightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        // Release: a drain that reads the count this leaves also sees everything the request did
        // before (its connection back in the pool), so retiring after it closes that too.
        self.backend.inflight.fetch_sub(1, Ordering::Release);
    }
}

/// Opens a TCP connection pinned to `device`, with upstream socket options set.
pub async fn connect(
    addr: SocketAddr,
    device: Option<&str>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(dev) = device {
        socket
            .bind_device(Some(dev.as_bytes()))
            .map_err(|e| std::io::Error::new(e.kind(), format!("SO_BINDTODEVICE {dev}: {e}")))?;
    }
    socket.set_nodelay(true)?;
    socket2::SockRef::from(&socket).set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect {addr} timed out after {timeout:?}"),
        )),
    }
}
