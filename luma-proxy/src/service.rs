//! A deployed route and its lifecycle: resolve -> (gate) -> start -> serve -> stop -> drain ->
//! retire.
//!
//! While started, two background tasks keep the route fresh: one re-resolves its alias, one runs
//! the active health checks. Requests never wait on either: they read the balancer's current
//! snapshot.
//!
//! # When a route re-resolves
//!
//! One proxy serves hundreds of routes, each in its own network, so resolving is driven by
//! events and otherwise slow (a re-resolve per route per second was 400 DNS queries a second at
//! 200 routes, idle; it is now about 7). A re-resolve is one DNS query (`resolve` caches the
//! proxy's interface per network and checks on every use, with one small sysfs read, that it
//! is still there). A route re-resolves:
//! - at once on a deploy of any other route of its project and on a flush (`Deployer::flush`,
//!   `luma-proxy flush --project P`): the project's containers changed. The deployed route
//!   itself was resolved by its gate a moment before, and a restored route resolves at once
//!   when it starts (nothing is known yet);
//! - at once on a failure: a failed connect on the request path ([`Backend::mark_down`]) or an
//!   active check that takes a backend down. At most one such [`Kick::failure`] per
//!   [`FAILURE_KICK_GAP`] per route, so a dead backend under load costs a query a second, not
//!   one per request. It also asks for the proxy's own name on the network again (one query
//!   more, rate-limited with the kick): a failure is the sign that something there changed,
//!   and that query is what ties an interface to its network;
//! - in the background every `--refresh-every` (default 30 s, at least 1 s), with ±25% jitter
//!   drawn per route and per round, so routes started together spread out (200 routes: ~7
//!   queries a second);
//! - sooner while the route is degraded (the last resolve failed, or a backend is down or
//!   there is none): after 1 s, doubling up to [`DEGRADED_RETRY_MAX`]. A failure's own
//!   re-resolve can come before Docker's DNS forgets a dead container (its endpoint goes a
//!   moment after the container, which may be before its first connect fails), and a route
//!   whose containers come back (a reboot, an app scaled up from 0, a proxy attached late,
//!   Docker's DNS back) must serve again within seconds. A route with a backend down, or with
//!   an empty answer (its app stopped), costs one query every 5 s until the set is healthy
//!   again: an empty answer keeps the cached interface (see `resolve`).
//!
//! So for a replica set changed outside a deploy (the contract; it was "within a second"):
//! - a replica that dies leaves rotation at its first failed connect or when its checks fail,
//!   and leaves the set at the first re-resolve after Docker's DNS forgot it (the failure's
//!   own, or a degraded retry: seconds). Requests meanwhile go to the others (a failed connect
//!   is retried on another backend, see `proxy`);
//! - a replica that comes back on a new address is found the same way;
//! - a replica added to a live alias (say `docker run --network-alias web` by hand) is found at
//!   the next flush or deploy of the project, or by the next background round (at most 1.25 x
//!   `--refresh-every`). Flush after changing containers by hand.
//!
//! Active checks keep the route's own interval (the user's setting), but each route's first
//! probe is at a random point of its first interval, so routes started together (a restart with
//! 200 routes restores them in one go) do not probe in lockstep. A restored route probes at once.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, MissedTickBehavior};

/// The background pace varies by this fraction either way, per route and per round.
pub const JITTER: f64 = 0.25;
/// Shortest gap between two failure kicks of one route (the pace every route had before).
pub const FAILURE_KICK_GAP: Duration = Duration::from_secs(1);
/// First retry of a degraded route; it doubles up to [`DEGRADED_RETRY_MAX`].
pub const DEGRADED_RETRY_MIN: Duration = Duration::from_secs(1);
pub const DEGRADED_RETRY_MAX: Duration = Duration::from_secs(5);

/// `d` scaled by a factor in `[1 - JITTER, 1 + JITTER)`; `r` is a uniform draw from `[0, 1)`.
/// Never panics: `r` outside `[0, 1]` is clamped (NaN counts as 0.5), and a product beyond
/// `Duration::MAX` saturates there (`Duration::mul_f64` panics on both).
pub fn jittered(d: Duration, r: f64) -> Duration {
    scaled(d, 1.0 - JITTER + 2.0 * JITTER * unit(r))
}

/// When a route's first active check runs after a deploy: a point of its first interval
/// (`r` uniform in `[0, 1)`), so routes started together do not probe in lockstep.
pub fn first_probe_after(interval: Duration, r: f64) -> Duration {
    scaled(interval, unit(r))
}

/// `r` clamped to `[0, 1]`, NaN to the middle.
fn unit(r: f64) -> f64 {
    if r.is_nan() {
        0.5
    } else {
        r.clamp(0.0, 1.0)
    }
}

/// `d * f` for a finite `f >= 0`, saturating at `Duration::MAX`.
fn scaled(d: Duration, f: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * f).unwrap_or(Duration::MAX)
}

/// `Instant::now() + d`, saturating a day ahead of now rather than overflowing `Instant`
/// (the paces are bounded, so this is belt and braces for the refresh and health tasks).
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(now)
}

/// The background pace of one route (module doc): `every` with jitter while it is well, a
/// doubling retry from [`DEGRADED_RETRY_MIN`] while it is degraded. Its own generator (fastrand,
/// already a dependency; seeded per instance from the thread's) gives each route its own draws.
pub struct Schedule {
    every: Duration,
    retry: Duration,
    rng: fastrand::Rng,
}

impl Schedule {
    pub fn new(every: Duration, rng: fastrand::Rng) -> Schedule {
        Schedule {
            every,
            retry: DEGRADED_RETRY_MIN,
            rng,
        }
    }

    /// The wait before the next round, after a round that left the route `well` or not.
    pub fn after(&mut self, well: bool) -> Duration {
        let base = if well {
            self.retry = DEGRADED_RETRY_MIN;
            self.every
        } else {
            let cap = DEGRADED_RETRY_MAX.min(self.every);
            let wait = self.retry.min(cap);
            self.retry = (wait * 2).min(cap);
            wait
        };
        jittered(base, self.rng.f64())
    }
}

/// Wakes a route's refresh task before its background round (module doc). The route's backends
/// hold it, so a failure seen on the request path or by a health check reaches the route that
/// owns the backend without either of them knowing the service.
pub struct Kick {
    notify: Notify,
    /// Set by a failure: that re-resolve learns the proxy's interface again.
    verify: AtomicBool,
    /// When the last failure kick was let through: milliseconds since `origin`, plus one (0:
    /// never).
    last_failure: AtomicU64,
    origin: std::time::Instant,
}

impl Kick {
    fn new() -> Kick {
        Kick {
            notify: Notify::new(),
            verify: AtomicBool::new(false),
            last_failure: AtomicU64::new(0),
            origin: std::time::Instant::now(),
        }
    }

    /// A deploy or a flush: re-resolve now.
    pub fn now(&self) {
        self.notify.notify_one();
    }

    /// A failure on one of the route's backends: re-resolve now, re-learning the interface,
    /// unless a failure kick was let through less than [`FAILURE_KICK_GAP`] ago. Returns
    /// whether this one was. No lock: one atomic load in the common (limited) case.
    pub fn failure(&self) -> bool {
        let now_ms = self.origin.elapsed().as_millis() as u64 + 1;
        if !self.admit(now_ms) {
            return false;
        }
        self.verify.store(true, Ordering::SeqCst);
        self.notify.notify_one();
        true
    }

    /// The rate limit, with the clock passed in so it can be tested.
    fn admit(&self, now_ms: u64) -> bool {
        let last = self.last_failure.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) < FAILURE_KICK_GAP.as_millis() as u64 {
            return false;
        }
        // Of many threads failing at once, one wins.
        self.last_failure
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    fn take_verify(&self) -> bool {
        self.verify.swap(false, Ordering::SeqCst)
    }
}

pub struct Service {
    pub spec: RouteSpec,
    target: Target,
    pub balancer: LoadBalancer,
    /// Host header sent with health probes.
    probe_host: String,
    stop: watch::Sender<bool>,
    /// Set by [`Service::stop`]: no new request may start here (see the module docs).
    stopped: AtomicBool,
    kick: Arc<Kick>,
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
        let kick = Arc::new(Kick::new());
        for b in &backends {
            b.set_kick(&kick);
        }
        Arc::new(Service {
            spec,
            target,
            balancer: LoadBalancer::new(backends),
            probe_host,
            stop: watch::channel(false).0,
            stopped: AtomicBool::new(false),
            kick,
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
    /// never delays a health check (module doc). `check_now` (used on restore, where nothing
    /// has been resolved nor checked yet) resolves and probes right away; a deployed route was
    /// just resolved and checked by its gate.
    pub fn start(self: &Arc<Self>, resolver: Arc<Resolver>, check_now: bool) {
        // A literal target has nothing to resolve.
        if !matches!(self.target, Target::Literal(_)) {
            let svc = self.clone();
            let mut stop = self.stop.subscribe();
            tokio::spawn(async move {
                let mut schedule = Schedule::new(resolver.refresh_every(), fastrand::Rng::new());
                let mut next = if check_now {
                    Instant::now()
                } else {
                    deadline_after(schedule.after(true))
                };
                let mut last_error: Option<String> = None;
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep_until(next) => {}
                        _ = svc.kick.notify.notified() => {}
                    }
                    if svc.kick.take_verify() {
                        resolver.forget_interface(&svc.spec.network);
                    }
                    let resolved = svc.refresh(&resolver, &mut last_error).await;
                    let set = svc.balancer.backends();
                    let well = resolved && !set.is_empty() && set.iter().all(|b| b.is_healthy());
                    next = deadline_after(schedule.after(well));
                }
            });
        }
        let svc = self.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let every = svc.spec.health.interval();
            if check_now {
                let set = svc.balancer.backends();
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = health::check_round(&set, &svc.spec.health, &svc.probe_host) => {}
                }
            }
            // Each route keeps a phase of its own, drawn once, so that many routes' checks
            // stay spread over the interval: restored routes too (they all start together),
            // and through a stall of the thread. `Skip` keeps the phase after a late tick;
            // `Delay` would move every route whose tick fell in the stall to the same moment,
            // and such bunches only grow: 200 routes' checks at once hold a serving thread
            // for milliseconds (`docs/scale.md`).
            let first = deadline_after(first_probe_after(every, fastrand::f64()));
            let mut health = tokio::time::interval_at(first, every);
            health.set_missed_tick_behavior(MissedTickBehavior::Skip);
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
        self.kick.now();
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

    /// One re-resolve; returns whether it got an answer.
    async fn refresh(&self, resolver: &Resolver, last_error: &mut Option<String>) -> bool {
        if matches!(self.target, Target::Literal(_)) {
            return true;
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
                    return true;
                }
                let added = self.apply(res);
                if !added.is_empty() {
                    health::check_round(&added, &self.spec.health, &self.probe_host).await;
                }
                true
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
                false
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
                    b.set_kick(&self.kick);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_quarter_either_way() {
        let every = Duration::from_secs(30);
        assert_eq!(jittered(every, 0.0), Duration::from_millis(22_500));
        assert_eq!(jittered(every, 0.5), every);
        assert!(jittered(every, 0.999_999) < Duration::from_millis(37_500));
        // Out-of-range draws are clamped, never a zero or runaway wait.
        assert_eq!(jittered(every, -3.0), Duration::from_millis(22_500));
        assert_eq!(jittered(every, 7.0), Duration::from_millis(37_500));
        let mut rng = fastrand::Rng::with_seed(7);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(every, rng.f64())).collect();
        let (lo, hi) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*lo >= Duration::from_millis(22_500) && *hi < Duration::from_millis(37_500));
        // 200 routes spread over most of the window, not bunched.
        assert!(*hi - *lo > Duration::from_secs(12), "{lo:?}..{hi:?}");
    }

    #[test]
    fn jitter_saturates_instead_of_panicking() {
        assert_eq!(jittered(Duration::MAX, 0.0), Duration::MAX.mul_f64(0.75));
        assert_eq!(jittered(Duration::MAX, 1.0), Duration::MAX);
        assert_eq!(jittered(Duration::MAX, f64::INFINITY), Duration::MAX);
        assert_eq!(
            jittered(Duration::from_secs(8), f64::NAN),
            Duration::from_secs(8)
        );
        assert_eq!(jittered(Duration::ZERO, 1.0), Duration::ZERO);
        assert_eq!(first_probe_after(Duration::MAX, 1.0), Duration::MAX);
        assert!(first_probe_after(Duration::MAX, f64::NAN) > Duration::MAX / 3);
        assert_eq!(
            first_probe_after(Duration::from_secs(4), f64::NEG_INFINITY),
            Duration::ZERO
        );
        // Neither does a deadline that far out.
        let far = deadline_after(Duration::MAX);
        assert!(far > Instant::now() + Duration::from_secs(3600));
        let mut s = Schedule::new(Duration::MAX, fastrand::Rng::with_seed(1));
        assert!(s.after(true) >= Duration::MAX.mul_f64(0.75));
        let retry = s.after(false);
        assert!(retry >= DEGRADED_RETRY_MIN.mul_f64(0.75) && retry < DEGRADED_RETRY_MIN * 2);
    }

    #[test]
    fn the_first_probe_is_somewhere_in_the_first_interval() {
        let every = Duration::from_secs(1);
        assert_eq!(first_probe_after(every, 0.0), Duration::ZERO);
        assert!(first_probe_after(every, 0.999_999) < every);
        assert_eq!(first_probe_after(every, 2.0), every);
        let mut rng = fastrand::Rng::with_seed(3);
        let firsts: Vec<Duration> = (0..200)
            .map(|_| first_probe_after(every, rng.f64()))
            .collect();
        assert!(firsts.iter().all(|d| *d < every));
        let early = firsts.iter().filter(|d| **d < every / 2).count();
        assert!(
            (60..=140).contains(&early),
            "{early} of 200 in the first half"
        );
    }

    #[test]
    fn a_degraded_route_retries_soon_and_backs_off_to_the_cap() {
        let mut s = Schedule::new(Duration::from_secs(30), fastrand::Rng::with_seed(1));
        let within = |d: Duration, base: u64| {
            let base = Duration::from_secs(base);
            d >= base.mul_f64(0.75) && d < base.mul_f64(1.25)
        };
        assert!(within(s.after(true), 30));
        for base in [1, 2, 4, 5, 5] {
            let d = s.after(false);
            assert!(within(d, base), "{d:?} for {base}s");
        }
        // Well again: back to the slow pace, and a later failure starts over at 1 s.
        assert!(within(s.after(true), 30));
        assert!(within(s.after(false), 1));
        // A background pace below the cap caps the retries too.
        let mut s = Schedule::new(Duration::from_secs(2), fastrand::Rng::with_seed(1));
        for base in [1, 2, 2] {
            assert!(within(s.after(false), base));
        }
    }

    #[test]
    fn failure_kicks_are_rate_limited() {
        let k = Kick::new();
        let gap = FAILURE_KICK_GAP.as_millis() as u64;
        assert!(k.admit(1));
        assert!(!k.admit(2));
        assert!(!k.admit(gap));
        assert!(k.admit(gap + 1));
        assert!(!k.admit(gap + 2));
        assert!(k.admit(5 * gap));
    }

    #[tokio::test]
    async fn a_failure_wakes_the_refresh_once_and_asks_for_a_fresh_interface() {
        let k = Kick::new();
        assert!(k.failure());
        // A burst of failures (a dead backend under load) is one wake-up, not one each.
        for _ in 0..1000 {
            assert!(!k.failure());
        }
        tokio::time::timeout(Duration::from_secs(5), k.notify.notified())
            .await
            .expect("the failure did not wake the refresh");
        assert!(k.take_verify());
        assert!(!k.take_verify());
        // No permit left behind by the burst.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), k.notify.notified())
                .await
                .is_err()
        );
        // A deploy or flush wakes it without a fresh interface.
        k.now();
        k.notify.notified().await;
        assert!(!k.take_verify());
    }

    #[test]
    fn backends_of_a_service_report_failures_to_it() {
        let spec = RouteSpec {
            project: "p".into(),
            app: "web".into(),
            hosts: vec!["p.test".into()],
            target: "web:80".into(),
            network: "p-net".into(),
            health: Default::default(),
            timeouts: Default::default(),
            limits: Default::default(),
            tls: None,
        };
        let b = Backend::new("127.0.0.1:1".parse().unwrap(), None, &spec.timeouts);
        let svc = Service::with_backends(spec, vec![b.clone()]);
        b.mark_down("connect: refused".into());
        assert!(svc.kick.take_verify(), "mark_down did not kick its route");
        // A backend added by a re-resolve is tied too.
        let added = svc.apply(Resolution {
            addrs: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            device: None,
        });
        assert_eq!(added.len(), 1);
        svc.kick.last_failure.store(0, Ordering::Relaxed);
        added[0].report_failure();
        assert!(svc.kick.take_verify());
    }
}
