//! The deploy contract, stated once. This is what makes a release switch lose no request.
//!
//! `deploy(route)`:
//! 1. validate the route and refuse hosts that belong to another project (409, holder keeps them);
//! 2. take the route's deploy lock (two deploys of one route never interleave);
//! 3. resolve the new target in its project's network into fresh backends;
//! 4. health-check every one of them on its own until all pass or the deploy timeout (30 s)
//!    ends; if any fails, nothing changes and the error lists the reason per backend (422);
//! 5. switch the route in one atomic swap of the table, and save the table;
//! 6. drain: wait until the old release's in-flight requests finish (drain timeout, 30 s), then
//!    retire it (idle connections close, WebSocket tunnels end) and reply.
//!
//! When the reply arrives, the old containers carry no proxy traffic and may be disconnected
//! and stopped. `check` runs step 4 alone; `remove` runs 5 and 6 with an empty route.

use crate::backend::Backend;
use crate::health::{self, BackendReport};
use crate::resolve::Resolver;
use crate::route::{HealthSettings, RouteKey, RouteSpec, RouteTimeouts, Target};
use crate::router::Router;
use crate::service::Service;
use crate::state::StateStore;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DEFAULT_DEPLOY_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub route: RouteSpec,
    #[serde(default)]
    pub deploy_timeout_ms: Option<u64>,
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub project: String,
    pub target: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub health: HealthSettings,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    pub project: String,
    pub app: String,
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct DrainReport {
    pub waited_ms: u64,
    /// Requests (or tunnels) still open when the drain timeout ended them.
    pub cut: usize,
}

#[derive(Debug, Serialize)]
pub struct DeployOutcome {
    pub route: RouteSpec,
    pub backends: Vec<BackendReport>,
    pub previous_target: Option<String>,
    pub drain: Option<DrainReport>,
}

#[derive(Debug, Serialize)]
pub struct CheckOutcome {
    pub healthy: bool,
    pub backends: Vec<BackendReport>,
}

#[derive(Debug)]
pub enum DeployError {
    Invalid(String),
    Conflict(String),
    NotFound(String),
    Unresolved(String),
    Unhealthy(String, Vec<BackendReport>),
    Internal(String),
}

impl DeployError {
    pub fn status(&self) -> StatusCode {
        match self {
            DeployError::Invalid(_) => StatusCode::BAD_REQUEST,
            DeployError::Conflict(_) => StatusCode::CONFLICT,
            DeployError::NotFound(_) => StatusCode::NOT_FOUND,
            DeployError::Unresolved(_) | DeployError::Unhealthy(..) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            DeployError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            DeployError::Unhealthy(msg, backends) => {
                serde_json::json!({"error": msg, "backends": backends})
            }
            DeployError::Invalid(m)
            | DeployError::Conflict(m)
            | DeployError::NotFound(m)
            | DeployError::Unresolved(m)
            | DeployError::Internal(m) => serde_json::json!({"error": m}),
        }
    }
}

impl std::fmt::Display for DeployError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeployError::Unhealthy(m, b) => {
                write!(f, "{m}")?;
                for r in b.iter().filter(|r| !r.healthy) {
                    write!(
                        f,
                        "\n  {}: {}",
                        r.addr,
                        r.error.as_deref().unwrap_or("unhealthy")
                    )?;
                }
                Ok(())
            }
            other => write!(
                f,
                "{}",
                other.to_json()["error"].as_str().unwrap_or("error")
            ),
        }
    }
}

/// Owns the operations that change the routing table.
pub struct Deployer {
    pub router: Arc<Router>,
    pub resolver: Arc<Resolver>,
    pub state: Option<Arc<StateStore>>,
}

impl Deployer {
    pub async fn deploy(&self, req: DeployRequest) -> Result<DeployOutcome, DeployError> {
        let spec = req.route.validate().map_err(DeployError::Invalid)?;
        if spec.hosts.is_empty() {
            return Err(DeployError::Invalid(
                "route.hosts is empty: give at least one host, e.g. app.example.com".into(),
            ));
        }
        self.router
            .check_ownership(&spec)
            .map_err(DeployError::Conflict)?;
        let key = spec.key();
        let _lock = self.router.lock(&key).await;
        let deploy_timeout =
            Duration::from_millis(req.deploy_timeout_ms.unwrap_or(DEFAULT_DEPLOY_TIMEOUT_MS));
        let candidate = self.gate(spec, deploy_timeout).await?;
        for b in candidate.balancer.backends().iter() {
            b.mark_up();
        }
        candidate.start(self.resolver.clone(), false);
        let old = match self.router.install(candidate.clone()) {
            Ok(old) => old,
            Err(e) => {
                candidate.stop();
                candidate.retire();
                return Err(DeployError::Conflict(e));
            }
        };
        self.save();
        crate::log::info(
            "route switched",
            serde_json::json!({"route": key.to_string(), "target": candidate.spec.target, "hosts": candidate.spec.hosts}),
        );
        // The project's containers changed: its other routes re-resolve now, not in a second.
        self.flush(&key.project);
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
        })
    }

    /// Health-checks a target in its network without switching anything.
    pub async fn check(&self, req: CheckRequest) -> Result<CheckOutcome, DeployError> {
        let spec = RouteSpec {
            project: req.project,
            app: String::new(),
            hosts: Vec::new(),
            target: req.target,
            network: req.network,
            health: req.health,
            timeouts: RouteTimeouts::default(),
        }
        .validate()
        .map_err(DeployError::Invalid)?;
        let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(DEFAULT_DEPLOY_TIMEOUT_MS));
        let svc = self.gate(spec, timeout).await?;
        svc.retire();
        Ok(CheckOutcome {
            healthy: true,
            backends: svc.reports(),
        })
    }

    /// Removes a route: the hosts stop matching at once, then in-flight requests drain.
    pub async fn remove(&self, req: RemoveRequest) -> Result<DrainReport, DeployError> {
        let key = RouteKey {
            project: req.project,
            app: req.app,
        };
        let _lock = self.router.lock(&key).await;
        let old = self.router.remove(&key).ok_or_else(|| {
            DeployError::NotFound(format!(
                "no route for project {:?} app {:?}",
                key.project, key.app
            ))
        })?;
        self.save();
        crate::log::info(
            "route removed",
            serde_json::json!({"route": key.to_string()}),
        );
        Ok(drain_and_retire(&old, req.drain_timeout_ms).await)
    }

    /// Re-resolves every route of a project now (after its containers changed).
    pub fn flush(&self, project: &str) -> usize {
        self.resolver.flush();
        let mut n = 0;
        for svc in self
            .router
            .services()
            .iter()
            .filter(|s| s.spec.project == project)
        {
            svc.kick();
            n += 1;
        }
        n
    }

    /// Installs saved routes without the deploy gate; their backends are checked right away
    /// and serve as soon as they pass.
    pub async fn restore(self: &Arc<Self>, routes: Vec<RouteSpec>) {
        for spec in routes {
            let key = spec.key();
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
            match self.router.install(svc.clone()) {
                Ok(_) => crate::log::info(
                    "route restored",
                    serde_json::json!({"route": key.to_string()}),
                ),
                Err(e) => {
                    svc.stop();
                    crate::log::error(
                        "restored route skipped",
                        serde_json::json!({"route": key.to_string(), "error": e}),
                    );
                }
            }
        }
    }

    /// Steps 3 and 4 of the contract: resolve and check every backend of a new target.
    async fn gate(&self, spec: RouteSpec, timeout: Duration) -> Result<Arc<Service>, DeployError> {
        let svc = Service::resolve(spec, &self.resolver)
            .await
            .map_err(DeployError::Unresolved)?;
        let backends = svc.balancer.backends();
        if backends.is_empty() {
            return Err(DeployError::Unresolved(format!(
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
            Err(DeployError::Unhealthy(
                format!(
                    "{bad} of {} backends of {} failed their health check ({} in {}); the route was not changed",
                    reports.len(),
                    svc.spec.target,
                    svc.spec.health.path,
                    svc.spec.network
                ),
                reports,
            ))
        }
    }

    fn save(&self) {
        if let Some(state) = &self.state {
            if let Err(e) = state.save(&self.router.specs()) {
                crate::log::error(
                    "saving routes failed; the change is live but not persisted",
                    serde_json::json!({"error": e}),
                );
            }
        }
    }
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
