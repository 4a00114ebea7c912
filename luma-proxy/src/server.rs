//! The proxy process: listeners, connection limits, restore on start, graceful shutdown.
//!
//! [`Proxy::start`] binds the listeners first (so a caller learns the real ports), restores
//! saved routes in the background (they serve as soon as a backend passes its first check), and
//! returns a handle.
//!
//! **Connections.** One limit holds for the whole process: every worker takes a slot from the
//! same semaphore at accept, or closes the connection at once. A worker that accepts while
//! another serves 2 fewer connections hands it over, slot and all ([`crate::spread`]). The
//! slot lives in the connection's I/O ([`ConnIo`]), so a connection upgraded to a tunnel
//! (WebSocket) keeps its slot until the tunnel ends. A connection that sends nothing is closed at the first-byte
//! timeout; one with no bytes either way at the idle timeout (HTTP/2 too: the proxy sends no
//! keep-alive pings, so nothing but the peer's traffic keeps a connection open).
//!
//! **Shutdown.** Stop accepting; let in-flight requests finish (HTTP/1.1 connections close after
//! their current response, HTTP/2 ones get a GOAWAY) for up to the shutdown timeout; then end
//! every connection still open: upgraded tunnels (which have no end the proxy could wait for,
//! so they are ended as soon as the requests are done, not held for the whole timeout) and
//! anything past the timeout. [`RunningProxy::shutdown`] returns once every connection of every
//! worker is gone (bounded by [`END_WAIT`]).

use crate::access::AccessLog;
use crate::admin::{self, AdminCtx};
use crate::config::MetricsListen;
use crate::config::ProxyConfig;
use crate::deploy::Deployer;
use crate::idle::ConnIo;
use crate::metrics::Metrics;
use crate::proxy::{self, ProxyCtx, Scheme};
use crate::resolve::Resolver;
use crate::router::Router;
use crate::spread::{Assigned, Handed, Inbox, Load, Spread};
use crate::state::StateStore;
use crate::tls::Tls;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// How long a worker waits, after ending its connections, for their tasks to let them go.
pub const END_WAIT: Duration = Duration::from_secs(5);

pub struct Proxy;

/// A running proxy.
pub struct RunningProxy {
    pub http_addr: SocketAddr,
    pub https_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The metrics listener's address when it was given as `IP:PORT` (bound at start).
    pub metrics_addr: Option<SocketAddr>,
    pub deployer: Arc<Deployer>,
    pub metrics: Arc<Metrics>,
    /// Certificates: the SNI book, custom certificates, ACME.
    pub tls: Arc<Tls>,
    /// The one connection limit, shared by every worker.
    limit: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    ctx: Arc<ProxyCtx>,
    https_ctx: Arc<ProxyCtx>,
    acceptor: TlsListen,
    cfg: ProxyConfig,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Accepted connections spread over the workers, per listener (`spread.rs`).
    spread_http: Arc<Spread>,
    spread_https: Arc<Spread>,
}

impl Proxy {
    pub async fn start(cfg: ProxyConfig) -> Result<RunningProxy, String> {
        if !cfg.admin_addr.ip().is_loopback() {
            return Err(format!(
                "--admin {} is not a loopback address: the admin API must never be reachable from outside; use 127.0.0.1:PORT",
                cfg.admin_addr
            ));
        }
        if cfg.access_log && cfg.access_log_buffer < crate::access::MIN_LIMIT {
            return Err(format!(
                "--access-log-buffer {} is below {} bytes: batches that small cannot keep up; give 4KiB or more (2MiB by default)",
                cfg.access_log_buffer,
                crate::access::MIN_LIMIT
            ));
        }
        if cfg.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if cfg.first_byte_timeout.is_zero() || cfg.idle_timeout.is_zero() {
            return Err("--first-byte-timeout and --idle-timeout must be above 0".into());
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| format!("cannot create state dir {}: {e}", cfg.state_dir.display()))?;
        let token: Arc<str> = crate::token::load_or_create(&cfg.token_path())?.into();
        let http = crate::workers::reuseport_listener(cfg.http_addr)
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.http_addr))?;
        let https = crate::workers::reuseport_listener(cfg.https_addr)
            .map_err(|e| format!("cannot listen on {} (HTTPS): {e}", cfg.https_addr))?;
        let https_addr = https.local_addr().map_err(|e| e.to_string())?;
        let admin_listener = TcpListener::bind(cfg.admin_addr)
            .await
            .map_err(|e| format!("cannot listen on admin {}: {e}", cfg.admin_addr))?;
        let http_addr = http.local_addr().map_err(|e| e.to_string())?;
        let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
        let metrics_listener = match &cfg.metrics {
            MetricsListen::Addr(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("cannot listen on metrics {a}: {e}"))?,
            ),
            _ => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?),
            None => None,
        };

        let router = Arc::new(Router::new());
        let resolver = Arc::new(
            Resolver::new(cfg.dns, cfg.self_name.clone())?.refreshing_every(cfg.refresh_every),
        );
        let state = Arc::new(StateStore::new(&cfg.state_dir));
        let metrics = Arc::new(Metrics::new(router.clone(), &cfg.metrics_labels)?);
        // Never fails on ACME settings (ACME is then off, with the reason in every status).
        let tls = Tls::new(&cfg, resolver.clone(), metrics.clone());
        let acceptor = TlsListen {
            acceptor: tokio_rustls::TlsAcceptor::from(tls.server_config()?),
            book: tls.book.clone(),
            handshake_timeout: cfg.tls_handshake_timeout,
        };
        let deployer = Arc::new(
            Deployer::new(router.clone(), resolver.clone(), Some(state.clone()))
                .allowing_literal_targets(cfg.allow_literal_targets)
                .with_tls(tls.clone()),
        );

        let restored = state.load();
        for why in &restored.skipped {
            crate::log::warn("state entry skipped", serde_json::json!({"reason": why}));
        }
        // Restoring only installs routes (resolution and checks run in the background) and
        // loads their certificates, so the table and the SNI book are complete before the
        // first connection is accepted.
        deployer.restore(restored.routes).await;

        let access_log = if cfg.access_log {
            // Without a stdout to duplicate (fd 1 closed) the proxy still serves, as it did
            // when each line was written in place and lost.
            match AccessLog::stdout(cfg.access_log_buffer, metrics.access_log_dropped()) {
                Ok(log) => Some(Arc::new(log)),
                Err(e) => {
                    crate::log::warn(
                        "no access log: stdout cannot be written",
                        serde_json::json!({"error": e.to_string()}),
                    );
                    None
                }
            }
        } else {
            None
        };
        let (shutdown, rx) = watch::channel(false);
        let ctx = Arc::new(ProxyCtx {
            router: router.clone(),
            metrics: metrics.clone(),
            access_log: access_log.clone(),
            scheme: Scheme::Http,
            trusted_proxies: cfg.trusted_proxies.clone(),
            certs: Some(tls.book.clone()),
            https_public_port: cfg.https_public_port,
        });
        let https_ctx = Arc::new(ProxyCtx {
            router,
            metrics: metrics.clone(),
            access_log,
            scheme: Scheme::Https,
            trusted_proxies: cfg.trusted_proxies.clone(),
            certs: Some(tls.book.clone()),
            https_public_port: cfg.https_public_port,
        });
        let admin_ctx = Arc::new(AdminCtx {
            deployer: deployer.clone(),
            metrics: metrics.clone(),
            token,
            started: Instant::now(),
        });
        crate::log::info(
            "luma-proxy listening",
            serde_json::json!({"http": http_addr.to_string(), "https": https_addr.to_string(), "admin": admin_addr.to_string(), "state_dir": cfg.state_dir.display().to_string(), "max_connections": cfg.max_connections}),
        );
        let limit = Arc::new(Semaphore::new(
            cfg.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        let (spread_http, spread_https) =
            (Arc::new(Spread::default()), Arc::new(Spread::default()));
        let mut tasks = vec![
            tokio::spawn(serve_listener(
                http,
                ctx.clone(),
                cfg.clone(),
                limit.clone(),
                rx.clone(),
                None,
                spread_http.join(),
            )),
            tokio::spawn(serve_listener(
                https,
                https_ctx.clone(),
                cfg.clone(),
                limit.clone(),
                rx.clone(),
                Some(acceptor.clone()),
                spread_https.join(),
            )),
            tokio::spawn(admin::serve(admin_listener, admin_ctx, rx.clone())),
        ];
        let metrics_source = match (metrics_listener, &cfg.metrics) {
            (Some(l), _) => Some(crate::metrics::listener::Source::Bound(l)),
            (None, MetricsListen::Network { network, port }) => {
                Some(crate::metrics::listener::Source::Network {
                    network: network.clone(),
                    port: *port,
                    resolver,
                })
            }
            _ => None,
        };
        if let Some(source) = metrics_source {
            tasks.push(tokio::spawn(crate::metrics::listener::serve(
                source,
                metrics.clone(),
                rx,
            )));
        }
        let cfg = ProxyConfig {
            http_addr,
            https_addr,
            ..cfg
        };
        Ok(RunningProxy {
            http_addr,
            https_addr,
            tls,
            https_ctx,
            acceptor,
            admin_addr,
            metrics_addr,
            deployer,
            metrics,
            limit,
            shutdown,
            tasks,
            ctx,
            cfg,
            threads: Vec::new(),
            spread_http,
            spread_https,
        })
    }
}

impl RunningProxy {
    /// Starts `n` more serving threads (workers 1..=n), each with its own runtime, listener and
    /// pools, all under the one connection limit. Call [`crate::workers::set_count`] with the
    /// total before starting the proxy. Every listener is bound when this returns.
    pub fn add_workers(&mut self, n: usize) -> Result<(), String> {
        for i in 1..=n {
            let (ctx, https_ctx, acceptor, cfg, limit, rx) = (
                self.ctx.clone(),
                self.https_ctx.clone(),
                self.acceptor.clone(),
                self.cfg.clone(),
                self.limit.clone(),
                self.shutdown.subscribe(),
            );
            let std_listener = crate::workers::reuseport_std_listener(cfg.http_addr)
                .map_err(|e| format!("worker {i}: cannot listen on {}: {e}", cfg.http_addr))?;
            let std_https =
                crate::workers::reuseport_std_listener(cfg.https_addr).map_err(|e| {
                    format!(
                        "worker {i}: cannot listen on {} (HTTPS): {e}",
                        cfg.https_addr
                    )
                })?;
            let (inbox, inbox_https) = (self.spread_http.join(), self.spread_https.join());
            let listener = std::thread::Builder::new()
                .name(format!("luma-worker-{i}"))
                .spawn(move || {
                    crate::workers::set_index(i);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            return crate::log::error(
                                "worker runtime",
                                serde_json::json!({"error": e.to_string()}),
                            )
                        }
                    };
                    rt.block_on(async move {
                        match (
                            TcpListener::from_std(std_listener),
                            TcpListener::from_std(std_https),
                        ) {
                            (Ok(l), Ok(tl)) => {
                                tokio::join!(
                                    serve_listener(
                                        l,
                                        ctx,
                                        cfg.clone(),
                                        limit.clone(),
                                        rx.clone(),
                                        None,
                                        inbox,
                                    ),
                                    serve_listener(
                                        tl,
                                        https_ctx,
                                        cfg,
                                        limit,
                                        rx,
                                        Some(acceptor),
                                        inbox_https,
                                    ),
                                );
                            }
                            (Err(e), _) | (_, Err(e)) => crate::log::error(
                                "worker listener",
                                serde_json::json!({"error": e.to_string()}),
                            ),
                        }
                    });
                })
                .map_err(|e| format!("cannot start worker thread: {e}"))?;
            self.threads.push(listener);
        }
        Ok(())
    }

    /// Stops accepting, drains in-flight requests (up to the shutdown timeout), ends tunnels and
    /// whatever is left, and returns once every connection is gone.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let threads = self.threads;
        let access_log = self.ctx.access_log.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            // Every request has ended: the lines still in memory go out before the exit, if
            // stdout takes them in time.
            if let Some(log) = access_log {
                log.close(END_WAIT);
            }
        })
        .await;
        for svc in self.deployer.router.services() {
            svc.stop();
        }
    }
}

fn builder(cfg: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    // No keep-alive pings: the proxy's own pings (and their acks) would be traffic, and an
    // idle HTTP/2 connection would never reach the idle timeout. Dead peers are found by it.
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(cfg.max_header_bytes as u32)
        .keep_alive_interval(None);
    b
}

/// The plain listener's servers, one per protocol (`park` picks the protocol itself), with
/// [`builder`]'s settings.
fn plain_http(cfg: &ProxyConfig) -> crate::park::Http {
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(cfg.max_header_bytes as u32)
        .keep_alive_interval(None);
    crate::park::Http {
        h1,
        h2,
        park_after: cfg.park_after,
        keep_alive: cfg.header_read_timeout,
    }
}

/// The connections of one worker: how many are alive (tunnels included) and a wake-up when the
/// last one goes.
#[derive(Default)]
struct Live {
    open: AtomicUsize,
    empty: Notify,
}

/// Waits until `count` is zero, woken by `zeroed` (notified by whoever drops it to zero). The
/// wait is armed before the count is read, so a drop to zero in between is never missed.
async fn wait_zero(count: &AtomicUsize, zeroed: &Notify) {
    loop {
        let notified = zeroed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if count.load(Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

impl Live {
    async fn wait_empty(&self) {
        wait_zero(&self.open, &self.empty).await;
    }
}

/// A one-way switch that many connections wait on, cheap to poll: a poll reads one atomic
/// flag. A waiter's waker is registered once (again only if it changes), and flipping the
/// switch wakes every registered one.
///
/// It replaces `watch` channels on the per-request path: hyper-util's `GracefulShutdown`
/// polls a `watch` channel's `changed()` on every wake of every connection, and so did each
/// connection's end signal (about 630 instructions per request each, `docs/profile.md`).
#[derive(Default)]
struct Switch {
    on: AtomicBool,
    next_id: AtomicU64,
    /// The waker of every waiter, by id.
    wakers: Mutex<HashMap<u64, Waker>>,
}

impl Switch {
    fn flip(&self) {
        // The flag first, then the wakers: a waiter registers its waker and then reads the
        // flag, so it either sees the flag or is woken here (the lock orders the two).
        self.on.store(true, Ordering::SeqCst);
        // A poisoned lock still holds every waker: wake them all (nothing panics under it today).
        let wakers: Vec<Waker> = self
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in wakers {
            w.wake();
        }
    }
}

/// One waiter of a [`Switch`]; as a future, it resolves once the switch is flipped.
struct SwitchWait {
    switch: Arc<Switch>,
    id: u64,
    /// The waker registered for this waiter (None: not registered).
    waker: Option<Waker>,
}

impl SwitchWait {
    fn new(switch: &Arc<Switch>) -> SwitchWait {
        SwitchWait {
            switch: switch.clone(),
            id: switch.next_id.fetch_add(1, Ordering::Relaxed),
            waker: None,
        }
    }

    /// True once the switch is flipped; otherwise makes sure `waker` is woken by the flip.
    fn is_on(&mut self, waker: &Waker) -> bool {
        if self.switch.on.load(Ordering::Acquire) {
            return true;
        }
        if self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            return false;
        }
        self.switch
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.id, waker.clone());
        self.waker = Some(waker.clone());
        // Registered before this read: a flip that set the flag earlier is seen now.
        self.switch.on.load(Ordering::SeqCst)
    }
}

impl Future for SwitchWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.get_mut().is_on(cx.waker()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for SwitchWait {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.switch
                .wakers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
        }
    }
}

/// Graceful shutdown of one listener's HTTP connections: on [`Drain::shutdown`], every
/// connection is told to finish its current requests and close (HTTP/1.1 after the response,
/// HTTP/2 with a GOAWAY), and the call returns once all of them are gone. What hyper-util's
/// `GracefulShutdown` does, on a [`Switch`].
#[derive(Default)]
struct Drain {
    switch: Arc<Switch>,
    /// Tickets not yet dropped: accepted connections (a TLS one from before its handshake).
    open: AtomicUsize,
    /// Wakes the shutdown when the last ticket drops.
    empty: Notify,
}

impl Drain {
    /// Taken at accept: the shutdown waits for it to drop.
    fn ticket(self: &Arc<Self>) -> Ticket {
        self.open.fetch_add(1, Ordering::AcqRel);
        Ticket {
            drain: self.clone(),
            wait: SwitchWait::new(&self.switch),
        }
    }

    /// Tells every connection to finish and waits until every ticket has dropped.
    async fn shutdown(&self) {
        self.switch.flip();
        wait_zero(&self.open, &self.empty).await;
    }
}

/// One connection's place in its listener's [`Drain`].
pub(crate) struct Ticket {
    drain: Arc<Drain>,
    wait: SwitchWait,
}

impl Ticket {
    /// True once the listener drains (and makes sure `waker` is woken when it starts).
    pub(crate) fn draining(&mut self, waker: &Waker) -> bool {
        self.wait.is_on(waker)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.drain.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drain.empty.notify_waiters();
        }
    }
}

/// A connection served under a [`Drain`]: told to shut down gracefully once the drain begins.
pub(crate) struct Drained<C> {
    /// Boxed once per connection, so this wrapper needs no pin projection.
    conn: Pin<Box<C>>,
    ticket: Ticket,
    told: bool,
}

impl<C: GracefulConnection> Drained<C> {
    pub(crate) fn new(conn: C, ticket: Ticket) -> Drained<C> {
        Drained {
            conn: Box::pin(conn),
            ticket,
            told: false,
        }
    }
}

impl<C: GracefulConnection> Future for Drained<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.told && this.ticket.draining(cx.waker()) {
            this.told = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.as_mut().poll(cx)
    }
}

/// What a connection holds while it is alive: its slot of the global limit, its place in the
/// open-connections gauge and in its worker's count. Owned by the connection's I/O, so an
/// upgraded connection keeps all three until the tunnel drops the socket.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _load: Load,
    metrics: Arc<Metrics>,
    live: Arc<Live>,
}

impl Slot {
    fn new(
        permit: OwnedSemaphorePermit,
        metrics: Arc<Metrics>,
        live: Arc<Live>,
        load: Load,
    ) -> Slot {
        metrics.connection_opened();
        live.open.fetch_add(1, Ordering::AcqRel);
        Slot {
            _permit: permit,
            _load: load,
            metrics,
            live,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connection_closed();
        if self.live.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.live.empty.notify_waiters();
        }
    }
}

/// What the HTTPS listener adds to a connection: the handshake, under its own deadline, and
/// the book's word on the certificate it may go on with.
#[derive(Clone)]
struct TlsListen {
    acceptor: tokio_rustls::TlsAcceptor,
    book: Arc<crate::tls::book::CertBook>,
    handshake_timeout: Duration,
}

/// One listener's accept loop: plain HTTP, or HTTPS with `tls` (the handshake, then the
/// certificate check, then HTTP). Both take the same slot of the global limit and the same
/// ConnIo timeouts (under TLS, on the raw socket).
async fn serve_listener(
    listener: TcpListener,
    ctx: Arc<ProxyCtx>,
    cfg: ProxyConfig,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<TlsListen>,
    mut inbox: Inbox,
) {
    if tls.is_none() {
        // One per worker thread (each has exactly one plain listener).
        tokio::spawn(crate::workers::upkeep(shutdown.clone()));
    }
    let conn = Listening {
        builder: Arc::new(builder(&cfg)),
        plain: Arc::new(plain_http(&cfg)),
        drain: Arc::new(Drain::default()),
        live: Arc::new(Live::default()),
        end: Arc::new(Switch::default()),
        ctx,
        cfg,
        tls,
    };
    let mut backoff = crate::admin::Backoff::new(
        crate::admin::ACCEPT_BACKOFF_MIN,
        crate::admin::ACCEPT_BACKOFF_MAX,
    );
    'accept: loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            Some(handed) = inbox.recv() => {
                // Accepted by another worker, which took its slot of the limit.
                serve_handed(&conn, handed);
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    if backoff.succeeded() {
                        crate::log::info("accept recovered", serde_json::json!({}));
                    }
                    a
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; log a run once.
                    let (wait, first) = backoff.failed();
                    if first {
                        crate::log::warn("accept failed; backing off", serde_json::json!({"error": e.to_string()}));
                    }
                    // Connections handed over meanwhile are still served: with its accepts
                    // failing, this worker may well be the least loaded one.
                    let pause = tokio::time::sleep(wait);
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            _ = shutdown.changed() => break 'accept,
                            Some(handed) = inbox.recv() => serve_handed(&conn, handed),
                            _ = &mut pause => break,
                        }
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            conn.ctx.metrics.connection_refused();
            drop(stream);
            continue;
        };
        if let Assigned::Here(stream, permit, load) = inbox.assign(stream, peer, permit) {
            serve_conn(&conn, stream, peer, permit, load);
        }
    }
    drop(listener);
    // Connections already handed to this worker are served, and drained with the rest; from
    // now on none is handed here.
    for handed in inbox.leave() {
        serve_handed(&conn, handed);
    }
    let Listening {
        ctx,
        cfg,
        drain,
        live,
        end,
        ..
    } = conn;
    crate::log::info(
        "shutting down: draining connections",
        serde_json::json!({"worker": crate::workers::index(), "open": live.open.load(Ordering::Relaxed), "open_all_workers": ctx.metrics.connections_open()}),
    );
    let drained = tokio::time::timeout(cfg.shutdown_timeout, drain.shutdown())
        .await
        .is_ok();
    let left = live.open.load(Ordering::Relaxed);
    if !drained {
        crate::log::warn(
            "shutdown timeout: ending remaining connections",
            serde_json::json!({"worker": crate::workers::index(), "open": left}),
        );
    } else if left > 0 {
        crate::log::info(
            "requests drained; ending upgraded connections",
            serde_json::json!({"worker": crate::workers::index(), "open": left}),
        );
    }
    end.flip();
    if tokio::time::timeout(END_WAIT, live.wait_empty())
        .await
        .is_err()
    {
        crate::log::warn(
            "connections still open after ending them",
            serde_json::json!({"worker": crate::workers::index(), "open": live.open.load(Ordering::Relaxed)}),
        );
    }
}

/// What one listener of one worker serves its connections with, whether it accepted them
/// itself or another worker handed them over.
struct Listening {
    ctx: Arc<ProxyCtx>,
    cfg: ProxyConfig,
    tls: Option<TlsListen>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    plain: Arc<crate::park::Http>,
    drain: Arc<Drain>,
    live: Arc<Live>,
    /// Fired once in-flight requests are done (or the shutdown timeout passed): every
    /// connection still open, tunnels included, fails its next read or write.
    end: Arc<Switch>,
}

/// Serves a connection another worker accepted and handed over (`spread.rs`).
fn serve_handed(conn: &Listening, handed: Handed) {
    let (stream, peer, permit, load) = handed.take();
    // Registering with this runtime failed: the socket closes with the permit and load.
    match stream {
        Ok(stream) => serve_conn(conn, stream, peer, permit, load),
        Err(e) => crate::log::warn(
            "connection closed: a worker could not take it over",
            serde_json::json!({"error": e.to_string()}),
        ),
    }
}

/// Serves one connection on the current worker, under the slot and count taken for it.
fn serve_conn(
    conn: &Listening,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    load: Load,
) {
    let _ = stream.set_nodelay(true);
    let slot = Slot::new(permit, conn.ctx.metrics.clone(), conn.live.clone(), load);
    let io = ConnIo::new(stream, conn.cfg.first_byte_timeout, conn.cfg.idle_timeout)
        .with_end(Box::pin(SwitchWait::new(&conn.end)))
        .with_slot(Box::new(slot));
    // The peer's address is written out once per connection, not per request.
    let peer = crate::headers::Peer::new(peer);
    let Some(tls) = &conn.tls else {
        tokio::spawn(crate::park::serve(
            io,
            conn.ctx.clone(),
            peer,
            conn.plain.clone(),
            conn.drain.ticket(),
        ));
        return;
    };
    let (tls, builder, ticket, c) = (
        tls.clone(),
        conn.builder.clone(),
        conn.drain.ticket(),
        conn.ctx.clone(),
    );
    tokio::spawn(async move {
        let stream =
            match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(io)).await {
                Ok(Ok(s)) => s,
                // An unknown or missing SNI ends here too: rustls sent the alert.
                Ok(Err(_)) | Err(_) => {
                    c.metrics.count_handshake_failure();
                    return;
                }
            };
        let session = stream.get_ref().1;
        // A TLS-ALPN-01 validator only needs the handshake (RFC 8737).
        if session.alpn_protocol() == Some(crate::tls::book::ACME_TLS_ALPN) {
            return;
        }
        // A resumed session skipped the book: ask it now. A host that left its route,
        // moved to another project, or whose certificate expired gets no connection.
        let Some(cert) = session
            .server_name()
            .and_then(|sni| tls.book.admit(sni, luma_api::time::unix_now()))
        else {
            c.metrics.count_handshake_failure();
            return;
        };
        // Boxed, as on the plain listener (`park::serve_h2`): one allocation instead of
        // copies of the whole request future into each HTTP/2 stream's task.
        let svc = service_fn(move |req| {
            let (c, cert, peer) = (c.clone(), cert.clone(), peer.clone());
            Box::pin(
                async move { Ok::<_, Infallible>(proxy::handle(c, req, peer, Some(&cert)).await) },
            )
        });
        // Answers leave at the end of the runtime's turn, in one write and one TLS record each
        // (coalesce.rs).
        let io = TokioIo::new(crate::coalesce::Coalesced::new(stream));
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        let _ = Drained::new(conn, ticket).await;
    });
}
