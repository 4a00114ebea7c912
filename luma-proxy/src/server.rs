//! The proxy process: listeners, connection limits, restore on start, graceful shutdown.
//!
//! [`Proxy::start`] binds both listeners first (so a caller learns the real ports), restores
//! saved routes in the background (they serve as soon as a backend passes its first check), and
//! returns a handle. Shutting down stops accepting, lets in-flight requests finish for up to the
//! shutdown timeout, then returns.

use crate::admin::{self, AdminCtx};
use crate::config::ProxyConfig;
use crate::deploy::Deployer;
use crate::idle::IdleIo;
use crate::metrics::Metrics;
use crate::proxy::{self, ProxyCtx};
use crate::resolve::Resolver;
use crate::router::Router;
use crate::state::StateStore;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

pub struct Proxy;

/// A running proxy.
pub struct RunningProxy {
    pub http_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub deployer: Arc<Deployer>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    ctx: Arc<ProxyCtx>,
    cfg: ProxyConfig,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(cfg: ProxyConfig) -> Result<RunningProxy, String> {
        if !cfg.admin_addr.ip().is_loopback() {
            return Err(format!(
                "--admin {} is not a loopback address: the admin API must never be reachable from outside; use 127.0.0.1:PORT",
                cfg.admin_addr
            ));
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| format!("cannot create state dir {}: {e}", cfg.state_dir.display()))?;
        let token: Arc<str> = crate::token::load_or_create(&cfg.token_path())?.into();
        let http = crate::workers::reuseport_listener(cfg.http_addr)
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.http_addr))?;
        let admin_listener = TcpListener::bind(cfg.admin_addr)
            .await
            .map_err(|e| format!("cannot listen on admin {}: {e}", cfg.admin_addr))?;
        let http_addr = http.local_addr().map_err(|e| e.to_string())?;
        let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;

        let router = Arc::new(Router::new());
        let resolver = Arc::new(Resolver::new(cfg.dns, cfg.self_name.clone())?);
        let state = Arc::new(StateStore::new(&cfg.state_dir));
        let metrics = Arc::new(Metrics::default());
        let deployer = Arc::new(Deployer::new(router.clone(), resolver, Some(state.clone())));

        let restored = state.load();
        for why in &restored.skipped {
            crate::log::warn("state entry skipped", serde_json::json!({"reason": why}));
        }
        // Restoring only installs routes (resolution and checks run in the background), so the
        // table is complete before the first connection is accepted.
        deployer.restore(restored.routes).await;

        let (shutdown, rx) = watch::channel(false);
        let ctx = Arc::new(ProxyCtx {
            router,
            metrics: metrics.clone(),
            access_log: cfg.access_log,
            proto: "http",
        });
        let admin_ctx = Arc::new(AdminCtx {
            deployer: deployer.clone(),
            metrics: metrics.clone(),
            token,
            started: Instant::now(),
        });
        crate::log::info(
            "luma-proxy listening",
            serde_json::json!({"http": http_addr.to_string(), "admin": admin_addr.to_string(), "state_dir": cfg.state_dir.display().to_string()}),
        );
        let tasks = vec![
            tokio::spawn(serve_http(http, ctx.clone(), cfg.clone(), rx.clone())),
            tokio::spawn(admin::serve(admin_listener, admin_ctx, rx)),
        ];
        let cfg = ProxyConfig { http_addr, ..cfg };
        Ok(RunningProxy {
            http_addr,
            admin_addr,
            deployer,
            metrics,
            shutdown,
            tasks,
            ctx,
            cfg,
            threads: Vec::new(),
        })
    }
}

impl RunningProxy {
    /// Starts `n` more serving threads (workers 1..=n), each with its own runtime, listener and
    /// pools. Call [`crate::workers::set_count`] with the total before starting the proxy.
    pub fn add_workers(&mut self, n: usize) -> Result<(), String> {
        for i in 1..=n {
            let (ctx, cfg, rx) = (
                self.ctx.clone(),
                self.cfg.clone(),
                self.shutdown.subscribe(),
            );
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
                        match crate::workers::reuseport_listener(cfg.http_addr) {
                            Ok(l) => serve_http(l, ctx, cfg, rx).await,
                            Err(e) => crate::log::error(
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

    /// Stops accepting, drains in-flight requests (up to the shutdown timeout), and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
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
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(cfg.max_header_bytes as u32)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    b
}

async fn serve_http(
    listener: TcpListener,
    ctx: Arc<ProxyCtx>,
    cfg: ProxyConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&cfg));
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    crate::log::warn("accept failed", serde_json::json!({"error": e.to_string()}));
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            ctx.metrics.connection_refused();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = IdleIo::new(TokioIo::new(stream), cfg.idle_timeout);
        let c = ctx.clone();
        let svc = service_fn(move |req| {
            let c = c.clone();
            async move { Ok::<_, Infallible>(proxy::handle(c, req, peer).await) }
        });
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        let conn = graceful.watch(conn);
        let metrics = ctx.metrics.clone();
        metrics.connection_opened();
        tokio::spawn(async move {
            let _ = conn.await;
            metrics.connection_closed();
            drop(permit);
        });
    }
    drop(listener);
    crate::log::info(
        "shutting down: draining connections",
        serde_json::json!({"open": ctx.metrics.connections_open.load(std::sync::atomic::Ordering::Relaxed)}),
    );
    if tokio::time::timeout(cfg.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        crate::log::warn(
            "shutdown timeout: closing remaining connections",
            serde_json::json!({}),
        );
    }
}
