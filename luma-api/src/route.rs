//! What a route is: the unit a deploy installs, validated once at the door.
//!
//! A [`RouteSpec`] is plain data (it is what the admin API receives and what the state file
//! stores). [`RouteSpec::validate`] turns loose input into a normalized spec or an error that
//! names the field and the fix, so nothing downstream has to re-check it.

use crate::names::{app_of_alias, check_name, is_dns_name, normalize_host_pattern};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// The network value of a literal `ip:port` target: no Docker network, nothing resolved.
pub const HOST_NETWORK: &str = "host";

/// One deployed app behind one or more hosts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub project: String,
    /// Defaults to the alias part of the target.
    #[serde(default)]
    pub app: String,
    pub hosts: Vec<String>,
    /// `alias:port` inside the project's network, or `ip:port[,ip:port...]` (only where the
    /// proxy was started with `--allow-literal-targets`).
    pub target: String,
    /// Docker network to resolve the alias in: always `<project>-network` (empty means that);
    /// any other network is refused.
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub health: HealthSettings,
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    #[serde(default)]
    pub limits: RouteLimits,
    /// HTTPS for every host of the route; absent: HTTP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::RouteTls>,
}

/// Active health-check settings of a route; every backend is checked on its own with these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures before a backend is marked down.
    pub unhealthy_threshold: u32,
    /// Consecutive successes before a down backend is marked up.
    pub healthy_threshold: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            path: "/up".into(),
            interval_ms: 1000,
            timeout_ms: 2000,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        }
    }
}

impl HealthSettings {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Per-route upstream timeouts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteTimeouts {
    /// Time to establish a TCP connection to a backend.
    pub connect_ms: u64,
    /// Time from the end of the request (its last body byte handed to the backend) to the
    /// response headers (504 after). While a body uploads, the clock restarts on every chunk.
    pub response_ms: u64,
    /// How long an idle pooled connection to a backend may be reused; keep it below the
    /// backend's keep-alive idle limit. 0 opens a fresh connection for every request.
    pub pool_idle_ms: u64,
}

/// Default [`RouteTimeouts::pool_idle_ms`]: below gunicorn's 2 s keep-alive, the shortest of
/// the common defaults (Node, uvicorn and Apache 5 s, nginx 75 s), with room for the gap
/// between the backend's idle clock (from writing a response) and the proxy's (from reading it).
pub const DEFAULT_POOL_IDLE_MS: u64 = 1500;
/// Upper bound of [`RouteTimeouts::pool_idle_ms`].
pub const MAX_POOL_IDLE_MS: u64 = 600_000;

impl Default for RouteTimeouts {
    fn default() -> Self {
        RouteTimeouts {
            connect_ms: 2000,
            response_ms: 30_000,
            pool_idle_ms: DEFAULT_POOL_IDLE_MS,
        }
    }
}

/// Per-route request limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteLimits {
    /// Largest request body passed to the app (413 above it).
    pub max_body_bytes: u64,
}

/// Default [`RouteLimits::max_body_bytes`]: 100 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 100 << 20;

impl Default for RouteLimits {
    fn default() -> Self {
        RouteLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// A parsed target.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Fixed addresses: no resolution, no network (host mode and benchmarks).
    Literal(Vec<SocketAddr>),
    /// A name to resolve: a Docker alias within a network, or a plain hostname in host mode.
    Name { name: String, port: u16 },
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("target is empty: give alias:port, e.g. web:3000".into());
        }
        if s.contains(',') || s.parse::<SocketAddr>().is_ok() {
            let addrs = s
                .split(',')
                .map(|a| {
                    a.trim().parse::<SocketAddr>().map_err(|_| {
                        format!("target {s:?}: {a:?} is not ip:port (a list must be all literal addresses)")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Target::Literal(addrs));
        }
        let (name, port) = s.rsplit_once(':').ok_or_else(|| {
            format!("target {s:?} has no port: write it as alias:port, e.g. web:3000")
        })?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
            format!("target {s:?}: port {port:?} must be a number from 1 to 65535")
        })?;
        let name = name.to_ascii_lowercase();
        if !is_dns_name(&name) {
            return Err(format!(
                "target {s:?}: {name:?} is not a valid alias (letters, digits, '-', '.', '_')"
            ));
        }
        Ok(Target::Name { name, port })
    }
}

/// One project, one network: an alias is resolved in `<project>-network` and nowhere else, so
/// a route can never reach another project's containers nor ask the system resolver for a bare
/// name. Literal `ip:port` targets use no network (`host`); whether they are accepted at all is
/// the proxy's decision (`--allow-literal-targets`), not the spec's.
fn route_network(project: &str, target: &Target, given: &str) -> Result<String, String> {
    let own = format!("{project}-network");
    match target {
        Target::Literal(_) if given.is_empty() || given == HOST_NETWORK => {
            Ok(HOST_NETWORK.to_string())
        }
        Target::Literal(_) => Err(format!(
            "network {given:?}: a literal ip:port target uses no network; leave network empty"
        )),
        Target::Name { .. } if given.is_empty() || given == own => Ok(own),
        Target::Name { name, .. } if given == HOST_NETWORK => Err(format!(
            "network \"host\" with the alias target {name:?} is refused: a bare name would be resolved by the system resolver, outside any project network; a route of project {project:?} resolves its alias in {own:?} (leave network empty)"
        )),
        Target::Name { .. } => Err(format!(
            "network {given:?} is not project {project:?}'s network: a route resolves its alias only in its own project's network {own:?} (leave network empty)"
        )),
    }
}

/// Pool and body limits of a route.
fn check_upstream_limits(t: &RouteTimeouts, l: &RouteLimits) -> Result<(), String> {
    if t.pool_idle_ms > MAX_POOL_IDLE_MS {
        return Err(format!(
            "timeouts.pool_idle_ms {} is above {MAX_POOL_IDLE_MS}: keep it below the app's keep-alive idle limit (default {DEFAULT_POOL_IDLE_MS}; 0 turns pooling off)",
            t.pool_idle_ms
        ));
    }
    if l.max_body_bytes == 0 {
        return Err(format!(
            "limits.max_body_bytes must be at least 1 (0 does not mean unlimited): the default is {DEFAULT_MAX_BODY_BYTES}; give a larger number for bigger uploads"
        ));
    }
    Ok(())
}

impl RouteSpec {
    /// Normalizes and checks every field. Errors name the field and how to fix it.
    pub fn validate(mut self) -> Result<RouteSpec, String> {
        self.project = self.project.trim().to_string();
        check_name("project", &self.project)?;
        let target = Target::parse(&self.target)?;
        if self.app.trim().is_empty() {
            self.app = match &target {
                Target::Name { name, .. } => app_of_alias(name).to_string(),
                Target::Literal(_) => self.project.clone(),
            };
        }
        self.app = self.app.trim().to_ascii_lowercase();
        check_name("app", &self.app)?;
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for h in &self.hosts {
            let n = normalize_host_pattern(h)?;
            if !hosts.contains(&n) {
                hosts.push(n);
            }
        }
        self.hosts = hosts;
        self.network = route_network(&self.project, &target, self.network.trim())?;
        let h = &self.health;
        if !h.path.starts_with('/') {
            return Err(format!(
                "health.path {:?} must start with '/', e.g. /up",
                h.path
            ));
        }
        if h.interval_ms < 50 || h.timeout_ms < 10 || h.timeout_ms > 60_000 {
            return Err(
                "health.interval_ms must be >= 50 and health.timeout_ms between 10 and 60000"
                    .into(),
            );
        }
        if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
            return Err("health thresholds must be at least 1".into());
        }
        if self.timeouts.connect_ms == 0 || self.timeouts.response_ms == 0 {
            return Err("timeouts.connect_ms and timeouts.response_ms must be above 0".into());
        }
        check_upstream_limits(&self.timeouts, &self.limits)?;
        Ok(self)
    }

    pub fn parsed_target(&self) -> Target {
        // Validated specs always parse; fall back to an empty literal rather than panic.
        Target::parse(&self.target).unwrap_or(Target::Literal(Vec::new()))
    }

    /// The key that identifies a route across deploys.
    pub fn key(&self) -> RouteKey {
        RouteKey {
            project: self.project.clone(),
            app: self.app.clone(),
        }
    }
}

/// A route's identity: deploying the same (project, app) again replaces it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteKey {
    pub project: String,
    pub app: String,
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.project, self.app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: &str) -> RouteSpec {
        RouteSpec {
            project: "alpha".into(),
            app: String::new(),
            hosts: vec!["Alpha.Test.".into()],
            target: target.into(),
            network: String::new(),
            health: Default::default(),
            timeouts: Default::default(),
            limits: Default::default(),
            tls: None,
        }
    }

    #[test]
    fn pool_and_body_limits_default_and_are_checked() {
        // A route saved before these fields existed still loads, with the defaults.
        let old: RouteSpec = serde_json::from_str(
            r#"{"project":"a","hosts":["a.test"],"target":"web:1","timeouts":{"connect_ms":5,"response_ms":7}}"#,
        )
        .unwrap();
        assert_eq!(old.timeouts.pool_idle_ms, DEFAULT_POOL_IDLE_MS);
        assert_eq!(old.limits.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let mut s = spec("web:3000");
        s.timeouts.pool_idle_ms = 0;
        assert!(s.validate().is_ok(), "0 turns pooling off");
        let mut s = spec("web:3000");
        s.timeouts.pool_idle_ms = MAX_POOL_IDLE_MS + 1;
        assert!(s.validate().unwrap_err().contains("timeouts.pool_idle_ms"));
        let mut s = spec("web:3000");
        s.limits.max_body_bytes = 0;
        assert!(s.validate().unwrap_err().contains("limits.max_body_bytes"));
    }

    #[test]
    fn defaults_are_filled_from_project_and_target() {
        let s = spec("web:3000").validate().unwrap();
        assert_eq!(s.app, "web");
        assert_eq!(s.network, "alpha-network");
        assert_eq!(s.hosts, vec!["alpha.test"]);
        assert_eq!(
            s.parsed_target(),
            Target::Name {
                name: "web".into(),
                port: 3000
            }
        );
    }

    #[test]
    fn literal_targets_use_no_network() {
        let s = spec("127.0.0.1:80,127.0.0.2:80").validate().unwrap();
        assert_eq!(s.network, HOST_NETWORK);
        assert!(matches!(s.parsed_target(), Target::Literal(v) if v.len() == 2));
    }

    #[test]
    fn bad_input_names_the_fix() {
        assert!(spec("web").validate().unwrap_err().contains("alias:port"));
        assert!(spec("web:0").validate().unwrap_err().contains("1 to 65535"));
        let mut s = spec("web:3000");
        s.project = "Alpha_Project".into();
        assert!(s.validate().unwrap_err().contains("not a valid name"));
        let mut s = spec("web:3000");
        s.hosts = vec!["a.test:8080".into()];
        assert!(s.validate().unwrap_err().contains("without port"));
        let mut s = spec("web:3000");
        s.health.path = "up".into();
        assert!(s.validate().unwrap_err().contains("health.path"));
    }

    #[test]
    fn a_route_resolves_only_in_its_own_project_network() {
        let mut s = spec("web:3000");
        s.network = "alpha-network".into();
        assert_eq!(s.validate().unwrap().network, "alpha-network");
        let mut s = spec("web:3000");
        s.network = "beta-network".into();
        let err = s.validate().unwrap_err();
        assert!(err.contains("not project \"alpha\"'s network"), "{err}");
        assert!(err.contains("\"alpha-network\""), "{err}");
        let mut s = spec("web:3000");
        s.network = "host".into();
        let err = s.validate().unwrap_err();
        assert!(err.contains("system resolver"), "{err}");
        // A literal target uses no network, and names none.
        let mut s = spec("127.0.0.1:80");
        s.network = "host".into();
        assert_eq!(s.validate().unwrap().network, HOST_NETWORK);
        let mut s = spec("127.0.0.1:80");
        s.network = "beta-network".into();
        assert!(s.validate().unwrap_err().contains("uses no network"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<RouteSpec>(
            r#"{"project":"a","hosts":["a.test"],"target":"web:1","helth":{}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("helth"));
    }
}
