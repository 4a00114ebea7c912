//! A deployed route and its lifecycle: resolve -> (gate) -> start -> serve -> stop -> drain ->
//! retire.
//!
//! While started, one background task keeps the backend set fresh (re-resolving at least once a
//! second and whenever it is kicked by a flush) and runs the active health checks. Requests
//! never wait on any of this: they read the balancer's current snapshot.
//!
//! # Why a drain cannot miss a request
//!
//! A request reads the routing table (a lock-free snapshot) and only later counts itself on a
//! backend. A deploy installs the new service, then [`Service::stop`]s the old one and
//! [`Service::drain`]s it, and once that returns the old containers may be stopped at once. A
//! request that read the old service but had not yet counted itself would not be waited for
//! and would then reach a dead container. So both sides follow one rule (a Dekker-style
//! handshake; the count's increment, the flag and the drain's loads are all `SeqCst`):
//!
//! - request: count itself on the backend first ([`Backend::begin`]), *then* check
//!   [`Service::is_stopped`]. If the service is stopped it uncounts itself and looks the route
//!   up again; nothing has been sent or changed yet (`proxy::forward` hands the request back).
//! - deploy: install the new service, set the flag ([`Service::stop`]), *then* read the counts
//!   ([`Service::drain`]).
//!
//! In the single total order of `SeqCst` operations either the request's check comes before
//! the flag is set, and then its count comes before the drain's reads, which see it; or the
//! check sees the flag, and then (since the new service was installed before the flag was set)
//! the second lookup finds the new service (or no route, after a `remove`: 404). Lookups are
//! bounded (`proxy::MAX_LOOKUPS`), so a service that stays stopped in the table (shutdown)
//! still serves.
//!
//! Within one request the count never drops to zero: a retry counts itself on the next backend
//! before it releases the previous one. The drain sums per-backend counts one by one, so a
//! retry that hops between backends during one scan could hide from it; a request hops at most
//! once, so the drain only trusts a zero seen by two scans in a row. All this costs the request
//! path one atomic load and no lock or allocation; the counter was already atomic (`SeqCst`
//! instead of `Relaxed` is the same locked instruction on x86).

use crate::backend::Backend;
use crate::balancer::LoadBalancer;
use crate::health::{self, BackendReport};
use crate::resolve::{Resolution, Resolver};
use crate::route::{RouteSpec, Target};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, MissedTickBehavior};

/// How often the backend set is re-resolved in the background.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

pub struct Service {
    pub spec: RouteSpec,
    target: Target,
    pub balancer: LoadBalancer,
    /// Host header sent with health probes.
    probe_host: String,
    stop: watch::Sender<bool>,
    /// Set by [`Service::stop`]: no new request may start here (see the module docs).
    stopped: AtomicBool,
    kick: Notify,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Builds a service around already-known backends, without starting anything.
    pub fn with_backends(spec: RouteSpec, backends: Vec<Arc<Backend>>) -> Arc<Service> {
        let target = spec.parsed_target();
        let probe_host = match &target {
            Target::Name { name, .. } => name.clone(),
            Target::Literal(a) => a.first().map(|a| a.to_string()).unwrap_or_default(),
        };
        Arc::new(Service {
            spec,
            target,
            balancer: LoadBalancer::new(backends),
            probe_host,
            stop: watch::channel(false).0,
            stopped: AtomicBool::new(false),
            kick: Notify::new(),
        })
    }

    /// Resolves the target into fresh (not yet healthy) backends.
    pub async fn resolve(spec: RouteSpec, resolver: &Resolver) -> Result<Arc<Service>, String> {
        let res = resolver
            .resolve(&spec.parsed_target(), &spec.network)
            .await?;
        let backends = res
            .addrs
            .iter()
            .map(|a| Backend::new(*a, res.device.clone(), &spec.timeouts))
            .collect();
        Ok(Service::with_backends(spec, backends))
    }

    pub fn probe_host(&self) -> &str {
        &self.probe_host
    }

    pub fn reports(&self) -> Vec<BackendReport> {
        self.balancer
            .backends()
            .iter()
            .map(|b| health::report(b))
            .collect()
    }

    pub fn inflight(&self) -> usize {
        self.balancer.backends().iter().map(|b| b.inflight()).sum()
    }

    /// Starts the background refresh and health checks, as two tasks so a slow DNS answer
    /// never delays a health check. `check_now` probes right away (used on restore, where
    /// nothing has been checked yet).
    pub fn start(self: &Arc<Self>, resolver: Arc<Resolver>, check_now: bool) {
        let svc = self.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let mut refresh = tokio::time::interval(REFRESH_EVERY);
            refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut last_error: Option<String> = None;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = refresh.tick() => svc.refresh(&resolver, &mut last_error).await,
                    _ = svc.kick.notified() => svc.refresh(&resolver, &mut last_error).await,
                }
            }
        });
        let svc = self.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let every = svc.spec.health.interval();
            let first = if check_now {
                Instant::now()
            } else {
                Instant::now() + every
            };
            let mut health = tokio::time::interval_at(first, every);
            health.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = health.tick() => {
                        let set = svc.balancer.backends();
                        health::check_round(&set, &svc.spec.health, &svc.probe_host).await;
                    }
                }
            }
        });
    }

    /// Asks the refresh task to re-resolve now (after a flush or a deploy elsewhere).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Marks the service stopped, so no new request starts on it (a request that already looked
    /// it up routes again), and stops the background tasks. The backends keep serving what
    /// they have in flight. Must come before [`Service::drain`] (see the module docs).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
    }

    /// The request's check, made right after its first [`Backend::begin`] on this service.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Waits until no request is in flight on this service or `timeout` passes. Returns the
    /// number still in flight (0 means fully drained). Call [`Service::stop`] first.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            // A zero counts only if a second scan confirms it: a retry hopping between backends
            // during one scan can hide from it, but not from the next one (module docs).
            let n = match self.inflight() {
                0 => self.inflight(),
                n => n,
            };
            if n == 0 || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Closes pooled connections and ends open tunnels on every backend.
    pub fn retire(&self) {
        for b in self.balancer.backends().iter() {
            b.retire();
        }
    }

    async fn refresh(&self, resolver: &Resolver, last_error: &mut Option<String>) {
        if matches!(self.target, Target::Literal(_)) {
            return;
        }
        match resolver.resolve(&self.target, &self.spec.network).await {
            Ok(res) => {
                if last_error.take().is_some() {
                    crate::log::info(
                        "resolution recovered",
                        serde_json::json!({"route": self.spec.key().to_string()}),
                    );
                }
                // A draining service keeps the backend set its drain is counting.
                if self.is_stopped() {
                    return;
                }
                let added = self.apply(res);
                if !added.is_empty() {
                    health::check_round(&added, &self.spec.health, &self.probe_host).await;
                }
            }
            Err(e) => {
                // Keep the last known set: a DNS hiccup must not empty a healthy route.
                if last_error.as_deref() != Some(e.as_str()) {
                    crate::log::warn(
                        "resolution failed; keeping the last backend set",
                        serde_json::json!({"route": self.spec.key().to_string(), "error": e}),
                    );
                    *last_error = Some(e);
                }
            }
        }
    }

    /// Replaces the backend set with a new resolution, keeping the objects (and their pools
    /// and health) of addresses that stay. Returns the new backends, which start unhealthy.
    fn apply(&self, res: Resolution) -> Vec<Arc<Backend>> {
        let current = self.balancer.backends();
        let unchanged = current.len() == res.addrs.len()
            && current
                .iter()
                .all(|b| res.addrs.contains(&b.addr) && b.device == res.device);
        if unchanged {
            return Vec::new();
        }
        let mut next = Vec::with_capacity(res.addrs.len());
        let mut added = Vec::new();
        for addr in &res.addrs {
            match current
                .iter()
                .find(|b| b.addr == *addr && b.device == res.device)
            {
                Some(b) => next.push(b.clone()),
                None => {
                    let b = Backend::new(*addr, res.device.clone(), &self.spec.timeouts);
                    added.push(b.clone());
                    next.push(b);
                }
            }
        }
        for gone in current
            .iter()
            .filter(|b| !next.iter().any(|n| Arc::ptr_eq(n, b)))
        {
            gone.retire();
        }
        crate::log::info(
            "backend set changed",
            serde_json::json!({"route": self.spec.key().to_string(), "backends": res.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()}),
        );
        self.balancer.replace(next);
        added
    }
}
