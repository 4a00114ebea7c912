//! The routing table: host -> service, swapped atomically as one snapshot.
//!
//! Lookups are exact first, then a one-level wildcard (`*.example.com` matches
//! `a.example.com`, not `example.com` nor `a.b.example.com`). Hosts are case-insensitive and the
//! port is ignored. A host belongs to exactly one route; a deploy that claims a host held by
//! another project (or another app) is refused, and the holder keeps it. Across projects a
//! wildcard counts as owning every host one level under it, both ways: an exact host inside
//! another project's wildcard is refused, and so is a wildcard over another project's host.
//!
//! Restoring saved routes at start ([`Router::restore`]) skips that last check: a table saved
//! before it existed may hold such an overlap, and a restart must not move a host to another
//! project nor drop a route the operator still has. The exact host keeps winning the lookup;
//! the caller logs the overlap for the operator to resolve.

use crate::route::{RouteKey, RouteSpec};
use crate::service::Service;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

#[derive(Default, Clone)]
struct Table {
    exact: HashMap<Box<str>, Arc<Service>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<Box<str>, Arc<Service>>,
    services: BTreeMap<RouteKey, Arc<Service>>,
}

impl Table {
    fn build(services: BTreeMap<RouteKey, Arc<Service>>) -> Table {
        let mut t = Table {
            services,
            ..Table::default()
        };
        for svc in t.services.values() {
            for h in &svc.spec.hosts {
                match h.strip_prefix("*.") {
                    Some(suffix) => t.wildcard.insert(suffix.into(), svc.clone()),
                    None => t.exact.insert(h.as_str().into(), svc.clone()),
                };
            }
        }
        t
    }

    fn owner_of(&self, host: &str) -> Option<&Arc<Service>> {
        match host.strip_prefix("*.") {
            Some(suffix) => self.wildcard.get(suffix),
            None => self.exact.get(host),
        }
    }

    /// A route of another project whose hosts overlap `host` through a one-level wildcard, and
    /// the host pattern of theirs that overlaps: for an exact host, the wildcard of its parent;
    /// for a wildcard, an exact host one level under it.
    fn cross_project_overlap(&self, host: &str, project: &str) -> Option<(&Arc<Service>, String)> {
        self.cross_project_overlaps(host, project)
            .into_iter()
            .min_by(|a, b| a.1.cmp(&b.1))
    }

    /// Every such overlap of `host` (a wildcard may cover several hosts of other projects).
    fn cross_project_overlaps(&self, host: &str, project: &str) -> Vec<(&Arc<Service>, String)> {
        let foreign = |s: &&Arc<Service>| s.spec.project != project;
        match host.strip_prefix("*.") {
            Some(suffix) => self
                .exact
                .iter()
                .filter(|(h, s)| h.split_once('.').map(|(_, p)| p) == Some(suffix) && foreign(s))
                .map(|(h, s)| (s, h.to_string()))
                .collect(),
            None => host
                .split_once('.')
                .and_then(|(_, parent)| {
                    self.wildcard
                        .get(parent)
                        .filter(foreign)
                        .map(|s| (s, format!("*.{parent}")))
                })
                .into_iter()
                .collect(),
        }
    }
}

#[derive(Default)]
pub struct Router {
    table: ArcSwap<Table>,
    /// Serializes table writers; readers never take it.
    write: Mutex<()>,
    /// One deploy at a time per route.
    deploy_locks: DashMap<RouteKey, Arc<tokio::sync::Mutex<()>>>,
}

/// Normalizes a request's host for lookup: strips the port and a trailing dot, lowercases only
/// when needed (so the common case does not allocate).
pub fn normalize_request_host(host: &str) -> Cow<'_, str> {
    let h = if host.starts_with('[') {
        host.split(']')
            .next()
            .map(|s| &host[..s.len() + 1])
            .unwrap_or(host)
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    /// The hot path: which service serves this Host?
    pub fn lookup(&self, host: &str) -> Option<Arc<Service>> {
        let host = normalize_request_host(host);
        let table = self.table.load();
        if let Some(s) = table.exact.get(host.as_ref()) {
            return Some(s.clone());
        }
        let (_, parent) = host.split_once('.')?;
        table.wildcard.get(parent).cloned()
    }

    pub fn get(&self, key: &RouteKey) -> Option<Arc<Service>> {
        self.table.load().services.get(key).cloned()
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.table.load().services.values().cloned().collect()
    }

    pub fn specs(&self) -> Vec<RouteSpec> {
        self.table
            .load()
            .services
            .values()
            .map(|s| s.spec.clone())
            .collect()
    }

    /// Refuses a spec whose hosts belong to another route, or that overlap another project's
    /// hosts through a wildcard: an exact host under another project's `*.parent`, or a
    /// wildcard over another project's exact host. (Within one project such an overlap is
    /// allowed: the exact host wins, as in any lookup.)
    pub fn check_ownership(&self, spec: &RouteSpec) -> Result<(), String> {
        let table = self.table.load();
        // A host the route already serves stays allowed: an overlap restored from an older
        // state file must not block a plain redeploy. Only new overlaps are refused.
        let live = table.services.get(&spec.key());
        for h in &spec.hosts {
            if live.is_some_and(|l| l.spec.hosts.contains(h)) {
                continue;
            }
            if let Some((owner, covered)) = table.cross_project_overlap(h, &spec.project) {
                let o = &owner.spec;
                return Err(if h.starts_with("*.") {
                    format!(
                        "wildcard {h:?} would cover host {covered:?} of project {:?} (app {:?}); a host can belong to one project only. Remove it there first (luma-proxy remove --project {} --app {}) or list your hosts one by one",
                        o.project, o.app, o.project, o.app
                    )
                } else {
                    format!(
                        "host {h:?} is inside the wildcard {covered:?} of project {:?} (app {:?}); a host can belong to one project only. Remove the wildcard there first (luma-proxy remove --project {} --app {}) or pick another host",
                        o.project, o.app, o.project, o.app
                    )
                });
            }
        }
        Self::check_hosts_free(&table, spec)
    }

    /// Refuses a spec that lists a host (or the very same wildcard) of another route.
    fn check_hosts_free(table: &Table, spec: &RouteSpec) -> Result<(), String> {
        let key = spec.key();
        for h in &spec.hosts {
            if let Some(owner) = table.owner_of(h) {
                let ok = owner.spec.key() == key;
                if !ok {
                    let o = &owner.spec;
                    return Err(if o.project != spec.project {
                        format!(
                            "host {h:?} belongs to project {:?} (app {:?}); a host can belong to one project only. Remove it there first (luma-proxy remove --project {} --app {}) or pick another host",
                            o.project, o.app, o.project, o.app
                        )
                    } else {
                        format!(
                            "host {h:?} is already served by app {:?} of project {:?}; to move that app to a new target deploy with --app {} (\"app\": \"{}\"), or remove the host from it first",
                            o.app, o.project, o.app, o.app
                        )
                    });
                }
            }
        }
        Ok(())
    }

    /// Installs `svc` in one atomic swap, replacing the route with the same key. Returns the
    /// replaced service, which the caller drains.
    pub fn install(&self, svc: Arc<Service>) -> Result<Option<Arc<Service>>, String> {
        let _w = self
            .write
            .lock()
            .map_err(|_| "routing table lock poisoned".to_string())?;
        self.check_ownership(&svc.spec)?;
        Ok(self.swap_in(svc))
    }

    /// Installs a route restored from the state file. A host (or the same wildcard) of another
    /// route is still refused, but an overlap with another project through a wildcard is not:
    /// the file may predate that check, and refusing would hand the loser's hosts to the other
    /// project (an exact host to the foreign wildcard) and drop the route at the next save. The
    /// overlaps are returned as `(this host, their host, their route)` for the caller to log;
    /// the exact host keeps winning lookups.
    pub fn restore(&self, svc: Arc<Service>) -> Result<Vec<(String, String, RouteKey)>, String> {
        let _w = self
            .write
            .lock()
            .map_err(|_| "routing table lock poisoned".to_string())?;
        let table = self.table.load();
        Self::check_hosts_free(&table, &svc.spec)?;
        let overlaps = svc
            .spec
            .hosts
            .iter()
            .flat_map(|h| {
                table
                    .cross_project_overlaps(h, &svc.spec.project)
                    .into_iter()
                    .map(move |(owner, theirs)| (h.clone(), theirs, owner.spec.key()))
            })
            .collect();
        drop(table);
        self.swap_in(svc);
        Ok(overlaps)
    }

    /// Replaces the route with `svc`'s key in one atomic swap (the write lock is held).
    fn swap_in(&self, svc: Arc<Service>) -> Option<Arc<Service>> {
        let current = self.table.load();
        let mut services = current.services.clone();
        let old = services.insert(svc.spec.key(), svc);
        self.table.store(Arc::new(Table::build(services)));
        old
    }

    /// Removes a route in one atomic swap and returns it for draining.
    pub fn remove(&self, key: &RouteKey) -> Option<Arc<Service>> {
        let _w = self.write.lock().ok()?;
        let current = self.table.load();
        let mut services = current.services.clone();
        let old = services.remove(key)?;
        self.table.store(Arc::new(Table::build(services)));
        Some(old)
    }

    /// Held for the whole deploy of one route, so two deploys of it cannot interleave.
    pub async fn lock(&self, key: &RouteKey) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .deploy_locks
            .entry(key.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        m.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(project: &str, app: &str, hosts: &[&str]) -> Arc<Service> {
        let spec = RouteSpec {
            project: project.into(),
            app: app.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            target: "web:3000".into(),
            network: String::new(),
            health: Default::default(),
            timeouts: Default::default(),
            limits: Default::default(),
            tls: None,
        }
        .validate()
        .unwrap();
        Service::with_backends(spec, Vec::new())
    }

    fn project_of(r: &Router, host: &str) -> Option<String> {
        r.lookup(host).map(|s| s.spec.project.clone())
    }

    #[test]
    fn exact_hosts_ignore_case_port_and_trailing_dot() {
        let r = Router::new();
        r.install(svc("alpha", "web", &["alpha.test"])).unwrap();
        assert_eq!(project_of(&r, "alpha.test").as_deref(), Some("alpha"));
        assert_eq!(project_of(&r, "ALPHA.Test:8080").as_deref(), Some("alpha"));
        assert_eq!(project_of(&r, "alpha.test.").as_deref(), Some("alpha"));
        assert_eq!(project_of(&r, "beta.test"), None);
        assert_eq!(project_of(&r, "x.alpha.test"), None);
    }

    #[test]
    fn wildcard_matches_exactly_one_level_and_exact_wins() {
        let r = Router::new();
        r.install(svc("alpha", "web", &["*.example.com"])).unwrap();
        // Another app of the same project (across projects this overlap is refused).
        r.install(svc("alpha", "api", &["api.example.com"]))
            .unwrap();
        let app_of = |h: &str| r.lookup(h).map(|s| s.spec.app.clone());
        assert_eq!(app_of("a.example.com").as_deref(), Some("web"));
        assert_eq!(app_of("api.example.com").as_deref(), Some("api"));
        assert_eq!(project_of(&r, "example.com"), None);
        assert_eq!(project_of(&r, "a.b.example.com"), None);
    }

    #[test]
    fn a_host_belongs_to_one_project_and_the_first_keeps_it() {
        let r = Router::new();
        r.install(svc("alpha", "web", &["shared.test"])).unwrap();
        let err = r.install(svc("beta", "web", &["shared.test"])).unwrap_err();
        assert!(err.contains("belongs to project \"alpha\""), "{err}");
        assert_eq!(project_of(&r, "shared.test").as_deref(), Some("alpha"));
        let err = r
            .install(svc("alpha", "api", &["shared.test"]))
            .unwrap_err();
        assert!(err.contains("app \"web\""), "{err}");
    }

    #[test]
    fn wildcards_never_overlap_another_projects_hosts() {
        let r = Router::new();
        r.install(svc("beta", "web", &["*.wild.test", "exact.beta.test"]))
            .unwrap();
        // An exact host inside another project's wildcard.
        let err = r
            .install(svc("alpha", "web", &["shop.wild.test"]))
            .unwrap_err();
        assert!(err.contains("inside the wildcard \"*.wild.test\""), "{err}");
        assert!(err.contains("project \"beta\""), "{err}");
        // A wildcard over another project's exact host.
        let err = r
            .install(svc("alpha", "web", &["*.beta.test"]))
            .unwrap_err();
        assert!(
            err.contains("would cover host \"exact.beta.test\""),
            "{err}"
        );
        assert_eq!(project_of(&r, "shop.wild.test").as_deref(), Some("beta"));
        assert_eq!(project_of(&r, "exact.beta.test").as_deref(), Some("beta"));
        assert_eq!(r.services().len(), 1);
        // Not an overlap: two levels down, the parent itself, a sibling suffix.
        r.install(svc(
            "alpha",
            "web",
            &["a.b.wild.test", "wild.test", "*.x.wild.test"],
        ))
        .unwrap();
        // Inside one project the exact host wins, as before.
        r.install(svc("beta", "api", &["api.wild.test"])).unwrap();
        assert_eq!(
            r.lookup("api.wild.test")
                .map(|s| s.spec.app.clone())
                .as_deref(),
            Some("api")
        );
        // The owner redeploys its own wildcard.
        r.install(svc("beta", "web", &["*.wild.test"])).unwrap();
    }

    #[test]
    fn restore_keeps_a_saved_cross_project_overlap_and_the_exact_host_wins() {
        for wildcard_first in [true, false] {
            let r = Router::new();
            let a = svc("alpha", "web", &["shop.wild.test", "alpha.test"]);
            let b = svc("beta", "web", &["*.wild.test", "other.beta.test"]);
            let (first, second) = if wildcard_first { (b, a) } else { (a, b) };
            assert!(r.restore(first).unwrap().is_empty());
            let overlaps = r.restore(second).unwrap();
            let key = |p: &str| RouteKey {
                project: p.into(),
                app: "web".into(),
            };
            let expected = if wildcard_first {
                (
                    "shop.wild.test".to_string(),
                    "*.wild.test".to_string(),
                    key("beta"),
                )
            } else {
                (
                    "*.wild.test".to_string(),
                    "shop.wild.test".to_string(),
                    key("alpha"),
                )
            };
            assert_eq!(overlaps, vec![expected]);
            assert_eq!(r.services().len(), 2);
            assert_eq!(project_of(&r, "shop.wild.test").as_deref(), Some("alpha"));
            assert_eq!(project_of(&r, "x.wild.test").as_deref(), Some("beta"));
            // A deploy still gets the strict check.
            let err = r
                .install(svc("alpha", "api", &["cart.wild.test"]))
                .unwrap_err();
            assert!(err.contains("inside the wildcard"), "{err}");
            // A host of another route is refused on restore too.
            let err = r.restore(svc("gamma", "web", &["alpha.test"])).unwrap_err();
            assert!(err.contains("belongs to project \"alpha\""), "{err}");
            let err = r
                .restore(svc("gamma", "web", &["*.wild.test"]))
                .unwrap_err();
            assert!(err.contains("belongs to project \"beta\""), "{err}");
            assert_eq!(r.services().len(), 2);
        }
    }

    #[test]
    fn redeploy_replaces_and_drops_hosts_no_longer_listed() {
        let r = Router::new();
        r.install(svc("alpha", "web", &["a.test", "old.test"]))
            .unwrap();
        let old = r.install(svc("alpha", "web", &["a.test"])).unwrap();
        assert!(old.is_some());
        assert!(r.lookup("old.test").is_none());
        assert!(r.lookup("a.test").is_some());
        assert!(r
            .remove(&RouteKey {
                project: "alpha".into(),
                app: "web".into()
            })
            .is_some());
        assert!(r.lookup("a.test").is_none());
    }

    #[test]
    fn same_app_name_in_two_projects_stays_apart() {
        let r = Router::new();
        r.install(svc("alpha", "web", &["alpha.test"])).unwrap();
        r.install(svc("beta", "web", &["beta.test"])).unwrap();
        assert_eq!(project_of(&r, "alpha.test").as_deref(), Some("alpha"));
        assert_eq!(project_of(&r, "beta.test").as_deref(), Some("beta"));
        assert_eq!(r.services().len(), 2);
    }
}
