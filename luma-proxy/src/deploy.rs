//! The deploy contract, stated once. This is what makes a release switch lose no request.
//!
//! `deploy(route)`:
//! 1. validate the route and refuse hosts that belong to another project (409, holder keeps them);
//! 2. take the route's deploy lock (two deploys of one route never interleave); an identical
//!    repeat of what is live answers at once with `already_live` and changes no routing, so a
//!    caller that lost a reply can simply ask again (the one thing it may change: a custom
//!    certificate it carries that the proxy lost is stored again and served, see below);
//! 3. resolve the new target in its project's network into fresh backends;
//! 4. health-check every one of them on its own until all pass or the deploy timeout (30 s)
//!    ends; if any fails, nothing changes and the error lists the reason per backend (422);
//! 5. save the table with the new route, then switch it in one atomic swap. The save comes
//!    first: if it fails, nothing is switched (500 `not_saved`), so a restart can never restore
//!    a release that the caller has since stopped;
//! 6. drain: wait until every request that saw the old route finishes (drain timeout, 30 s),
//!    then retire it (idle connections close, WebSocket tunnels end) and reply.
//!
//! HTTPS (`route.tls`, see `tls`) rides on the same steps and never delays nor fails a deploy
//! for a certificate it has yet to get:
//! - step 1 also checks a custom certificate (sent with the deploy, or already held for the
//!   project under the sha256 the route names): leaf sha256, key, validity, every host
//!   covered; a refusal (422 `invalid`, the reason named) changes nothing;
//! - step 5 stores a custom certificate sent with the deploy (0600) before the table is saved
//!   (one the gate found already held must still be held then, or the deploy is refused with
//!   nothing changed), and after the swap the certificate state follows the new table
//!   (`Tls::sync`): ACME orders for hosts without a certificate start then, in the
//!   background; hosts that left the table (a remove, a redeploy without them) are forgotten
//!   by the SNI book at once; custom certificates the table no longer names are deleted;
//! - step 1 also checks a project ACME account key sent with the deploy (`acme_account`: an
//!   ECDSA P-256 PKCS#8 PEM key; a refusal, 400 `invalid`, names the field and never the
//!   key); step 5 stores it for the project (0600) before the table is saved, and from then
//!   on the project's orders use that key's account and its ACME hosts answer HTTP-01
//!   statelessly (`tls::account`); an identical repeat stores it too (under the commit lock)
//!   when the proxy holds another key or none, so a project moving to more servers reaches
//!   the servers already live; a key that cannot be saved fails the deploy (500 `not_saved`)
//!   with the route unchanged (a key saved before a table save that then fails stays: it is
//!   the key `luma` sends again);
//! - a deploy of a route (an identical repeat too: it is the user's way to say "try again",
//!   e.g. after fixing DNS) makes its ACME hosts still waiting for a certificate order again
//!   at once, past their backoff but never past the hourly cap; likewise a custom certificate
//!   sent with an identical repeat is stored (under the commit lock, 0600) if the proxy does
//!   not hold it (lost from the state volume), and served at once.
//!
//! When the reply arrives, the old containers carry no proxy traffic and may be disconnected
//! and stopped. `check` runs steps 3-4 alone; `remove` runs 5 and 6 with the route taken out.
//! The admin API runs each operation in its own task, so a caller that goes away mid-drain
//! does not cut it short (see `admin`). [`Deployer::settled`] answers what is live once no
//! operation is running on a route: the question a caller asks when an outcome is unknown.

use crate::backend::Backend;
use crate::health;
use crate::resolve::Resolver;
use crate::route::{RouteKey, RouteSpec, RouteTimeouts, Target};
use crate::router::Router;
use crate::service::Service;
use crate::state::StateStore;
use crate::tls::{CheckedAccount, CheckedCustom, Tls};
use luma_api::{
    ApiError, CheckOutcome, CheckRequest, DeployOutcome, DeployRequest, DrainReport, ErrorKind,
    RemoveRequest, RouteQuery, RouteQueryReply, RouteState, DEFAULT_DEPLOY_TIMEOUT_MS,
    DEFAULT_DRAIN_TIMEOUT_MS,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn err(kind: ErrorKind, msg: impl Into<String>) -> ApiError {
    ApiError::new(kind, msg)
}

/// Owns the operations that change the routing table.
pub struct Deployer {
    pub router: Arc<Router>,
    pub resolver: Arc<Resolver>,
    pub state: Option<Arc<StateStore>>,
    /// Certificates of routes with `tls` (None: such routes are refused).
    pub tls: Option<Arc<Tls>>,
    /// Routes to literal `ip:port` targets are accepted (`--allow-literal-targets`).
    allow_literal_targets: bool,
    /// Held across "save the table, then swap it", so two routes' changes never save a table
    /// that misses the other's (held briefly: no await inside).
    commit: Mutex<()>,
}

impl Deployer {
    pub fn new(
        router: Arc<Router>,
        resolver: Arc<Resolver>,
        state: Option<Arc<StateStore>>,
    ) -> Deployer {
        Deployer {
            router,
            resolver,
            state,
            tls: None,
            allow_literal_targets: false,
            commit: Mutex::new(()),
        }
    }

    /// Accepts routes to literal `ip:port` targets too (tests and benchmarks).
    pub fn allowing_literal_targets(mut self, allow: bool) -> Deployer {
        self.allow_literal_targets = allow;
        self
    }

    /// Manages the certificates of routes with `tls`.
    pub fn with_tls(mut self, tls: Arc<Tls>) -> Deployer {
        self.tls = Some(tls);
        self
    }

    /// Step 1 for HTTPS: a custom certificate and an ACME account key are judged before
    /// anything changes. Returns what to store at commit, of what came with the deploy.
    fn check_tls(&self, req: &DeployRequest, spec: &RouteSpec) -> Result<TlsSent, ApiError> {
        match &self.tls {
            Some(tls) => Ok(TlsSent {
                custom: tls.check_custom(spec, req.certificate.as_ref())?,
                account: req
                    .acme_account
                    .as_ref()
                    .map(|k| tls.check_account(&spec.project, k))
                    .transpose()?,
            }),
            None if spec.tls.is_none()
                && req.certificate.is_none()
                && req.acme_account.is_none() =>
            {
                Ok(TlsSent::default())
            }
            None => Err(err(
                ErrorKind::Invalid,
                "this proxy has no HTTPS listener: route.tls (or acme_account) cannot be served",
            )),
        }
    }

    /// A literal target names no project network, so it is refused unless the operator
    /// allowed literal targets when starting the proxy.
    fn check_target(&self, spec: &RouteSpec) -> Result<(), ApiError> {
        if self.allow_literal_targets || !matches!(spec.parsed_target(), Target::Literal(_)) {
            return Ok(());
        }
        Err(err(
            ErrorKind::Invalid,
            format!(
                "target {:?} is a literal address: this proxy routes only to aliases inside the project's network (alias:port, e.g. web:3000); literal targets are for tests and benchmarks and need `luma-proxy serve --allow-literal-targets`",
                spec.target
            ),
        ))
    }

    pub async fn deploy(&self, req: DeployRequest) -> Result<DeployOutcome, ApiError> {
        let spec = req
            .route
            .clone()
            .validate()
            .map_err(|e| err(ErrorKind::Invalid, e))?;
        self.check_target(&spec)?;
        let sent = self.check_tls(&req, &spec)?;
        if spec.hosts.is_empty() {
            return Err(err(
                ErrorKind::Invalid,
                "route.hosts is empty: give at least one host, e.g. app.example.com",
            ));
        }
        self.router
            .check_ownership(&spec)
            .map_err(|e| err(ErrorKind::Conflict, e))?;
        let key = spec.key();
        let _lock = self.router.lock(&key).await;
        if let Some(live) = self.router.get(&key).filter(|l| l.spec == spec) {
            if let Some(tls) = &self.tls {
                if let Some(a) = &sent.account {
                    self.restore_account(tls, a)?;
                }
                if let Some(c) = &sent.custom {
                    self.restore_custom(tls, c)?;
                }
                tls.retry_pending(&spec);
            }
            return Ok(DeployOutcome {
                route: live.spec.clone(),
                backends: live.reports(),
                previous_target: None,
                drain: None,
                already_live: true,
            });
        }
        let deploy_timeout =
            Duration::from_millis(req.deploy_timeout_ms.unwrap_or(DEFAULT_DEPLOY_TIMEOUT_MS));
        let candidate = match self.gate(spec, deploy_timeout).await {
            Ok(svc) => svc,
            Err(e) => {
                // Nothing installed: keep no interface for a network without routes.
                self.prune_interfaces();
                return Err(e);
            }
        };
        for b in candidate.balancer.backends().iter() {
            b.mark_up();
        }
        candidate.start(self.resolver.clone(), false);
        let old = match self.commit(Change::Install(candidate.clone(), sent)) {
            Ok(old) => old,
            Err(e) => {
                candidate.stop();
                candidate.retire();
                return Err(e);
            }
        };
        if let Some(tls) = &self.tls {
            tls.retry_pending(&candidate.spec);
        }
        crate::log::info(
            "route switched",
            serde_json::json!({"route": key.to_string(), "target": candidate.spec.target, "hosts": candidate.spec.hosts}),
        );
        // The project's containers changed: its other routes re-resolve now, not at their next
        // background round (see `service`). Not this one: its gate resolved it a moment ago.
        self.kick_project(&key.project, Some(&candidate));
        let previous_target = old.as_ref().map(|o| o.spec.target.clone());
        let drain = match old {
            Some(old) => Some(drain_and_retire(&old, req.drain_timeout_ms).await),
            None => None,
        };
        Ok(DeployOutcome {
            route: candidate.spec.clone(),
            backends: candidate.reports(),
            previous_target,
            drain,
            already_live: false,
        })
    }

    /// An identical deploy's custom certificate, stored again if the proxy lost it. Under the
    /// commit lock: the slots follow the table as it is, never a copy a commit made stale.
    fn restore_custom(&self, tls: &Arc<Tls>, c: &CheckedCustom) -> Result<(), ApiError> {
        let _c = self
            .commit
            .lock()
            .map_err(|_| err(ErrorKind::Internal, "commit lock poisoned"))?;
        match tls.restore_custom(c, &self.router.specs()) {
            Ok(false) => Ok(()),
            Ok(true) => {
                crate::log::info(
                    "custom certificate stored again",
                    serde_json::json!({"project": c.project, "sha256": c.sha256}),
                );
                Ok(())
            }
            Err(e) => Err(err(
                ErrorKind::NotSaved,
                format!("the custom certificate could not be saved ({e}); the route is live and unchanged, still without it"),
            )),
        }
    }

    /// An identical deploy's ACME account key, stored if the proxy holds another or none.
    /// Under the commit lock, like [`Deployer::restore_custom`].
    fn restore_account(&self, tls: &Arc<Tls>, a: &CheckedAccount) -> Result<(), ApiError> {
        let _c = self
            .commit
            .lock()
            .map_err(|_| err(ErrorKind::Internal, "commit lock poisoned"))?;
        tls.restore_account(a, &self.router.specs())
            .map(|_| ())
            .map_err(|e| {
                err(
                    ErrorKind::NotSaved,
                    format!("the ACME account key of project {:?} could not be saved ({e}); the route is live and unchanged", a.project),
                )
            })
    }

    /// What is live for a route once no deploy or remove of it is running.
    pub async fn settled(&self, q: RouteQuery) -> Result<RouteQueryReply, ApiError> {
        let key = RouteKey {
            project: q.project,
            app: q.app,
        };
        let _lock = self.router.lock(&key).await;
        Ok(RouteQueryReply {
            route: self.router.get(&key).map(|s| RouteState {
                route: s.spec.clone(),
                backends: s.reports(),
            }),
        })
    }

    /// Saves the table as it will be after `change`, then applies it in one swap. A failed
    /// save changes nothing. Returns the route replaced or removed.
    fn commit(&self, change: Change) -> Result<Option<Arc<Service>>, ApiError> {
        let _c = self
            .commit
            .lock()
            .map_err(|_| err(ErrorKind::Internal, "commit lock poisoned"))?;
        let key = match &change {
            Change::Install(svc, _) => {
                self.router
                    .check_ownership(&svc.spec)
                    .map_err(|e| err(ErrorKind::Conflict, e))?;
                svc.spec.key()
            }
            Change::Remove(key) => {
                if self.router.get(key).is_none() {
                    return Err(err(
                        ErrorKind::NotFound,
                        format!("no route for project {:?} app {:?}", key.project, key.app),
                    ));
                }
                key.clone()
            }
        };
        let mut next: Vec<RouteSpec> = self
            .router
            .specs()
            .into_iter()
            .filter(|s| s.key() != key)
            .collect();
        if let Change::Install(svc, _) = &change {
            next.push(svc.spec.clone());
        }
        if let (Change::Install(svc, sent), Some(tls)) = (&change, &self.tls) {
            if let Some(a) = &sent.account {
                tls.store_account(a).map_err(|e| {
                    err(
                        ErrorKind::NotSaved,
                        format!("the ACME account key of project {:?} could not be saved ({e}); the route was not changed", a.project),
                    )
                })?;
            }
            match &sent.custom {
                Some(custom) => tls.store_custom(custom).map_err(|e| {
                    err(
                        ErrorKind::NotSaved,
                        format!("the custom certificate could not be saved ({e}); the route was not changed"),
                    )
                })?,
                None => tls.still_holds(&svc.spec)?,
            }
        }
        next.sort_by_key(|s| s.key());
        if let Some(state) = &self.state {
            state.save(&next).map_err(|e| {
                crate::log::error(
                    "saving routes failed; the route was not changed",
                    serde_json::json!({"route": key.to_string(), "error": e}),
                );
                err(
                    ErrorKind::NotSaved,
                    format!(
                        "the routing table could not be saved ({e}); the route was not changed"
                    ),
                )
            })?;
        }
        let before = self.router.specs();
        let applied = match change {
            Change::Install(svc, _) => self.router.install(svc),
            Change::Remove(key) => Ok(self.router.remove(&key)),
        };
        if let (Ok(_), Some(tls)) = (&applied, &self.tls) {
            let now = self.router.specs();
            tls.sync(&now);
            tls.prune_custom(&now);
        }
        if applied.is_ok() {
            self.prune_interfaces();
        }
        // Ownership was checked under this lock, so only a poisoned table lock gets here; the
        // file then holds a change that did not happen: put the table back, and say "unknown".
        applied.map_err(|e| {
            if let Some(state) = &self.state {
                let _ = state.save(&before);
            }
            err(ErrorKind::Internal, e)
        })
    }

    /// Health-checks a target in its network without switching anything.
    pub async fn check(&self, req: CheckRequest) -> Result<CheckOutcome, ApiError> {
        let spec = RouteSpec {
            project: req.project,
            app: String::new(),
            hosts: Vec::new(),
            target: req.target,
            network: req.network,
            health: req.health,
            timeouts: RouteTimeouts::default(),
            limits: Default::default(),
            tls: None,
        }
        .validate()
        .map_err(|e| err(ErrorKind::Invalid, e))?;
        self.check_target(&spec)?;
        let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(DEFAULT_DEPLOY_TIMEOUT_MS));
        let svc = self.gate(spec, timeout).await;
        // A check installs nothing: the interface its gate learnt stays only if a live route
        // uses the network.
        self.prune_interfaces();
        let svc = svc?;
        svc.retire();
        Ok(CheckOutcome {
            healthy: true,
            backends: svc.reports(),
        })
    }

    /// Removes a route: the hosts stop matching at once, then in-flight requests drain.
    pub async fn remove(&self, req: RemoveRequest) -> Result<DrainReport, ApiError> {
        let key = RouteKey {
            project: req.project,
            app: req.app,
        };
        let _lock = self.router.lock(&key).await;
        let Some(old) = self.commit(Change::Remove(key.clone()))? else {
            return Err(err(ErrorKind::NotFound, format!("no route for {key}")));
        };
        crate::log::info(
            "route removed",
            serde_json::json!({"route": key.to_string()}),
        );
        Ok(drain_and_retire(&old, req.drain_timeout_ms).await)
    }

    /// Re-resolves every route of a project now (after its containers changed). The proxy's
    /// cached interfaces stay: each re-resolve checks its network's entry against the local
    /// interfaces and learns it again if the proxy was disconnected meanwhile (see `resolve`).
    pub fn flush(&self, project: &str) -> usize {
        self.kick_project(project, None)
    }

    /// Kicks every route of `project` but `except` (the route a deploy just installed).
    fn kick_project(&self, project: &str, except: Option<&Arc<Service>>) -> usize {
        self.resolver.flush();
        let mut n = 0;
        for svc in self
            .router
            .services()
            .iter()
            .filter(|s| s.spec.project == project)
            .filter(|s| !except.is_some_and(|e| Arc::ptr_eq(e, s)))
        {
            svc.kick();
            n += 1;
        }
        n
    }

    /// Keeps the resolver's interface cache to the networks of live routes: a network whose
    /// last route was removed (or moved, or only ever checked or gated) leaves it, so a later
    /// route there learns the interface afresh (see `resolve`). A gate running meanwhile on
    /// such a network may see its entry go; its route then learns it once more.
    fn prune_interfaces(&self) {
        let live: std::collections::HashSet<String> =
            self.router.specs().into_iter().map(|s| s.network).collect();
        self.resolver
            .retain_interfaces(|network| live.contains(network));
    }

    /// Installs saved routes without the deploy gate; their backends are checked right away
    /// and serve as soon as they pass. A cross-project wildcard overlap saved before it was
    /// refused is kept (and logged as a warning), so a restart never moves a host to another
    /// project nor loses a route at the next save.
    pub async fn restore(self: &Arc<Self>, routes: Vec<RouteSpec>) {
        for spec in routes {
            let key = spec.key();
            if let Err(e) = self.check_target(&spec) {
                crate::log::error(
                    "restored route skipped",
                    serde_json::json!({"route": key.to_string(), "error": e.error}),
                );
                continue;
            }
            // Installed at once, before any DNS answer: the refresh task resolves right away and
            // checks new backends as soon as they appear, so a slow DNS never delays a route.
            let backends = match spec.parsed_target() {
                Target::Literal(addrs) => addrs
                    .iter()
                    .map(|a| Backend::new(*a, None, &spec.timeouts))
                    .collect(),
                Target::Name { .. } => Vec::new(),
            };
            let svc = Service::with_backends(spec, backends);
            svc.start(self.resolver.clone(), true);
            // Not `install`: a saved table may hold a cross-project wildcard overlap from before
            // that was refused, and the route must come back as it was saved (see
            // `Router::restore`). A host of another route is still refused.
            match self.router.restore(svc.clone()) {
                Ok(overlaps) => {
                    crate::log::info(
                        "route restored",
                        serde_json::json!({"route": key.to_string()}),
                    );
                    for (ours, theirs, other) in overlaps {
                        crate::log::warn(
                            "restored routes overlap across projects; resolve it: new deploys of these hosts are refused until one side drops its host",
                            serde_json::json!({
                                "route": key.to_string(),
                                "host": ours,
                                "other_route": other.to_string(),
                                "other_host": theirs,
                                "served_by": "the exact host's route (exact hosts win over wildcards)",
                                "fix": format!(
                                    "drop {ours:?} from {key} or {theirs:?} from {other}: redeploy that app without it, or remove its route (luma-proxy remove --project .. --app ..)"
                                ),
                            }),
                        );
                    }
                }
                Err(e) => {
                    svc.stop();
                    crate::log::error(
                        "restored route skipped",
                        serde_json::json!({"route": key.to_string(), "error": e}),
                    );
                }
            }
        }
        // Certificates come back with their routes: stored ones are served at once, ACME
        // hosts without a valid one get their orders started.
        if let Some(tls) = &self.tls {
            tls.sync(&self.router.specs());
        }
    }

    /// Steps 3 and 4 of the contract: resolve and check every backend of a new target.
    async fn gate(&self, spec: RouteSpec, timeout: Duration) -> Result<Arc<Service>, ApiError> {
        // A deploy often follows a change of the network itself (created again, the proxy
        // connected again): learn the proxy's interface afresh, one query per deploy, rather
        // than lean on the cache's checks (see `resolve`). The project's other routes use the
        // fresh entry.
        self.resolver.forget_interface(&spec.network);
        let svc = Service::resolve(spec, &self.resolver)
            .await
            .map_err(|e| err(ErrorKind::Unresolved, e))?;
        let backends = svc.balancer.backends();
        if backends.is_empty() {
            return Err(err(ErrorKind::Unresolved, format!(
                "target {} has no containers in network {}: is the container running with that network alias?",
                svc.spec.target, svc.spec.network
            )));
        }
        let reports = health::gate(&backends, &svc.spec.health, svc.probe_host(), timeout).await;
        if reports.iter().all(|r| r.healthy) {
            Ok(svc)
        } else {
            svc.retire();
            let bad = reports.iter().filter(|r| !r.healthy).count();
            Err(ApiError {
                kind: ErrorKind::Unhealthy,
                error: format!(
                    "{bad} of {} backends of {} failed their health check ({} in {}); the route was not changed",
                    reports.len(),
                    svc.spec.target,
                    svc.spec.health.path,
                    svc.spec.network
                ),
                backends: reports,
            })
        }
    }
}

/// A change to the routing table, saved before it is applied.
enum Change {
    /// With what came with the deploy for HTTPS, stored before the table.
    Install(Arc<Service>, TlsSent),
    Remove(RouteKey),
}

/// What a deploy sent for HTTPS, checked at the gate: a custom certificate, the project's
/// ACME account key.
#[derive(Debug, Default)]
struct TlsSent {
    custom: Option<CheckedCustom>,
    account: Option<CheckedAccount>,
}

async fn drain_and_retire(old: &Service, drain_timeout_ms: Option<u64>) -> DrainReport {
    let started = Instant::now();
    old.stop();
    let cut = old
        .drain(Duration::from_millis(
            drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS),
        ))
        .await;
    old.retire();
    DrainReport {
        waited_ms: started.elapsed().as_millis() as u64,
        cut,
    }
}
