//! HTTPS: which certificate each host has, where it came from, and what the handshake serves.
//!
//! [`Tls`] is the one owner of certificate state. It keeps a slot per host of every route with
//! `tls`, keyed by host pattern and tagged with the route's project and certificate source;
//! [`Tls::sync`] rebuilds the slots from the routing table after every commit and at start, so
//! a host that leaves a route (or moves to another project, or changes source) loses its slot
//! and its certificate at once. From the slots it publishes the [`book::CertBook`] snapshot the
//! handshakes read.
//!
//! The parts, each with one job:
//! - [`book`]: the SNI book rustls asks (lock-free), plus the ACME challenges in flight;
//! - [`certs`]: parsing and checking a chain and key (custom certificates are judged here);
//! - [`store`]: certificates, meta, order history and ACME accounts on disk (0600, atomic);
//! - [`acme`]: one background task per ACME host: order, renew, back off;
//! - [`account`]: a project's shared ACME account key (sent with its deploys, so all its
//!   servers order with one account) and the stateless HTTP-01 answers it allows.
//!
//! Custom certificates are checked at the deploy gate ([`Tls::check_custom`], before anything
//! changes) and stored at commit ([`Tls::store_custom`], before the routing table is saved), so
//! a restart that reads the table always finds them; once the table no longer names one, it is
//! deleted ([`Tls::prune_custom`]).
//!
//! A project's account key is checked at the deploy gate ([`Tls::check_account`]) and stored
//! at commit ([`Tls::store_account`], before the routing table is saved), or by an identical
//! repeat ([`Tls::restore_account`]); after either, [`Tls::sync`] republishes the hosts
//! answered statelessly. It is kept when the project's routes go (it is the project's
//! identity at the CA, and `luma` asks for it with [`Tls::account_key`]).
//!
//! ACME being off (`--acme-directory off`), or unusable (a CA root the TLS library refuses),
//! never stops the proxy and never drops a certificate: stored certificates that are still
//! valid keep being served, nothing is ordered, and every ACME host says why in its status.

pub mod account;
pub mod acme;
pub mod book;
pub mod certs;
pub mod store;

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::resolve::Resolver;
use account::{ProjectKey, ProjectKeys};
use book::{CertBook, Entry};
use certs::{unix_now, Parsed};
use luma_api::route::RouteSpec;
use luma_api::tls::{
    AcmeAccountKey, CertState, CertificateSource, CertificateStatus, CertificatesReply,
    CertificatesRequest, CustomCertificate,
};
use luma_api::{ApiError, ErrorKind};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use store::Store;
use tokio::sync::Notify;

/// Why ACME hosts get no certificate when the operator turned ACME off.
pub const ACME_OFF: &str = "ACME is off";

/// Where one host's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Acme,
    Custom(String),
}

impl Source {
    fn of(c: &CertificateSource) -> Source {
        match c {
            CertificateSource::Acme => Source::Acme,
            CertificateSource::Custom { sha256 } => {
                Source::Custom(sha256.trim().to_ascii_lowercase())
            }
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Source::Acme => "acme",
            Source::Custom(_) => "custom",
        }
    }
}

/// Aborts a host's ACME task when its slot goes.
struct TaskHandle(tokio::task::JoinHandle<()>);

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One host of a route with `tls`. A host's task changes its own slot's fields (by id).
struct Slot {
    /// Tells this slot from an earlier one of the same host (a task reports by id).
    id: u64,
    project: String,
    source: Source,
    served: Option<Parsed>,
    /// Why no certificate will be ordered (or none can be served): HTTP only unless a stored
    /// certificate is still valid.
    http_only: Option<String>,
    last_error: Option<String>,
    next_attempt: Option<u64>,
    renew_at: Option<u64>,
    /// Wakes the host's task: a new deploy of its route retries a pending order at once.
    wake: Option<Arc<Notify>>,
    _task: Option<TaskHandle>,
}

/// The slots, and every exact host of every route (TLS or not) with its project.
#[derive(Default)]
struct Table {
    slots: HashMap<String, Slot>,
    /// A name some route has as its exact host gets a wildcard route's certificate only from
    /// its own project (see `book`).
    route_hosts: HashMap<String, String>,
}

/// A custom certificate that passed the deploy gate and came with the deploy (to be stored at
/// commit). `Debug` never shows the key.
pub struct CheckedCustom {
    pub project: String,
    pub sha256: String,
    pem: CustomCertificate,
}

impl std::fmt::Debug for CheckedCustom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedCustom")
            .field("project", &self.project)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// A project's ACME account key that passed the deploy gate (to be stored at commit).
/// `Debug` never shows the key.
#[derive(Debug)]
pub struct CheckedAccount {
    pub project: String,
    key: Arc<ProjectKey>,
}

pub struct Tls {
    pub book: Arc<CertBook>,
    store: Arc<Store>,
    /// The projects' shared ACME account keys.
    keys: Arc<ProjectKeys>,
    /// The ACME side, or why there is none ([`ACME_OFF`], or a setup error).
    acme: Result<Arc<acme::Acme>, String>,
    /// ACME hosts under reserved names are HTTP only (a public CA refuses them).
    public_ca: bool,
    table: Mutex<Table>,
    next_id: AtomicU64,
    pub(crate) metrics: Arc<Metrics>,
}

impl Tls {
    /// Never fails on ACME settings: a CA root the TLS library refuses turns ACME off with the
    /// reason logged and shown in every ACME host's status, so plain HTTP and every stored
    /// certificate keep serving.
    pub fn new(cfg: &ProxyConfig, resolver: Arc<Resolver>, metrics: Arc<Metrics>) -> Arc<Tls> {
        let store = Arc::new(Store::new(&cfg.state_dir));
        let keys = Arc::new(ProjectKeys::new(store.clone()));
        let acme = match &cfg.acme.directory {
            None => Err(ACME_OFF.to_string()),
            Some(directory) => {
                match acme::http::AcmeHttp::new(resolver, cfg.acme.ca_roots_pem.as_deref()) {
                    Ok(http) => {
                        acme::Acme::new(cfg.acme.clone(), http, store.clone(), keys.clone())
                            .map(Arc::new)
                            .ok_or_else(|| ACME_OFF.to_string())
                    }
                    Err(e) => {
                        let why = format!(
                            "{ACME_OFF}: {e}; fix the CA root (--acme-ca-root, or proxy.acme.ca_root in luma.yml) and restart the proxy"
                        );
                        crate::log::error(
                            "ACME client setup failed; ACME is off, stored certificates keep serving",
                            serde_json::json!({"directory": directory, "reason": why}),
                        );
                        Err(why)
                    }
                }
            }
        };
        Arc::new(Tls {
            book: Arc::new(CertBook::default()),
            store,
            keys,
            acme,
            public_ca: cfg.acme.is_public_ca(),
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(1),
            metrics,
        })
    }

    /// The rustls server configuration of the HTTPS listener: certificates from the book,
    /// ALPN h2 and http/1.1 (and `acme-tls/1` for validators), session resumption by tickets
    /// and by a session cache, so a returning client skips the full handshake. A resumed
    /// session never asks the book, so the listener checks it after every handshake.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS config: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.book.clone());
        c.alpn_protocols = vec![
            b"h2".to_vec(),
            b"http/1.1".to_vec(),
            book::ACME_TLS_ALPN.to_vec(),
        ];
        c.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
        c.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| format!("TLS session tickets: {e}"))?;
        Ok(Arc::new(c))
    }

    /// The deploy gate's check of a route's certificate, before anything changes. A custom
    /// route needs its certificate sent with the deploy, or already held for the project;
    /// either way it must match the route's sha256, have its key, be valid now and cover
    /// every host. Returns what to store at commit (a certificate sent with this deploy).
    pub fn check_custom(
        &self,
        spec: &RouteSpec,
        sent: Option<&CustomCertificate>,
    ) -> Result<Option<CheckedCustom>, ApiError> {
        let invalid = |m: String| ApiError::new(ErrorKind::Invalid, m);
        let sha256 = match custom_sha256(spec) {
            Some(sha) => sha,
            None => {
                return match sent {
                    None => Ok(None),
                    Some(_) => Err(invalid(
                        "a certificate was sent, but route.tls does not name a custom certificate; set route.tls.certificate to custom with its sha256".into(),
                    )),
                }
            }
        };
        let (pem, fresh) = match sent {
            Some(c) => (c.clone(), true),
            None => match self.store.custom_cert(&spec.project, &sha256) {
                Some((chain_pem, key_pem)) => (CustomCertificate { chain_pem, key_pem }, false),
                None => return Err(invalid(not_held(&spec.project, &sha256))),
            },
        };
        let parsed = Parsed::from_pem(&pem.chain_pem, &pem.key_pem)
            .map_err(|e| invalid(format!("custom certificate refused: {e}")))?;
        parsed
            .check_custom(&sha256, &spec.hosts, unix_now())
            .map_err(|e| invalid(format!("custom certificate refused: {e}")))?;
        Ok(fresh.then(|| CheckedCustom {
            project: spec.project.clone(),
            sha256,
            pem,
        }))
    }

    /// Stores a checked custom certificate (0600) under its project.
    pub fn store_custom(&self, c: &CheckedCustom) -> Result<(), String> {
        self.store
            .save_custom_cert(&c.project, &c.sha256, &c.pem.chain_pem, &c.pem.key_pem)
    }

    /// Whether the store holds `c` in a form that loads (a lost or damaged copy does not).
    fn holds(&self, c: &CheckedCustom) -> bool {
        self.store
            .custom_cert(&c.project, &c.sha256)
            .and_then(|(chain, key)| Parsed::from_pem(&chain, &key).ok())
            .is_some_and(|p| p.sha256 == c.sha256)
    }

    /// For an identical repeat of a live deploy (which changes no routing) that carries its
    /// custom certificate: if this proxy does not hold it (lost from the state volume, or
    /// damaged), stores it and serves it, as the status of such a host advises. `specs`: the
    /// routing table as now (the caller holds the commit lock). Returns whether it was stored.
    pub fn restore_custom(
        self: &Arc<Self>,
        c: &CheckedCustom,
        specs: &[RouteSpec],
    ) -> Result<bool, String> {
        if self.holds(c) {
            return Ok(false);
        }
        self.store_custom(c)?;
        self.sync(specs);
        Ok(true)
    }

    /// At commit, for a custom route deployed without its certificate: the certificate the
    /// gate found held must still be held (a commit in between may have deleted it).
    pub fn still_holds(&self, spec: &RouteSpec) -> Result<(), ApiError> {
        match custom_sha256(spec) {
            Some(sha) if self.store.custom_cert(&spec.project, &sha).is_none() => Err(
                ApiError::new(ErrorKind::Invalid, not_held(&spec.project, &sha)),
            ),
            _ => Ok(()),
        }
    }

    /// Deletes the stored custom certificates no route of `specs` (the table just saved)
    /// names any more, so a replaced certificate's key does not stay on disk.
    pub fn prune_custom(&self, specs: &[RouteSpec]) {
        let keep: HashSet<(String, String)> = specs
            .iter()
            .filter_map(|s| custom_sha256(s).map(|sha| (s.project.clone(), sha)))
            .collect();
        let gone = self.store.prune_custom(&keep);
        if gone > 0 {
            crate::log::info(
                "unused custom certificates deleted",
                serde_json::json!({"count": gone}),
            );
        }
    }

    /// Makes the slots match `specs` (the routing table as now): new hosts get a slot (their
    /// stored certificate loaded, an ACME task started), hosts gone or moved lose theirs, a
    /// custom host that served nothing while its certificate is now stored (sent again with a
    /// deploy) is loaded again, and the book is republished. Called after every commit and
    /// once at start, before the listeners accept.
    pub fn sync(self: &Arc<Self>, specs: &[RouteSpec]) {
        let mut want: HashMap<&str, (&str, Source)> = HashMap::new();
        for s in specs {
            if let Some(t) = &s.tls {
                for h in &s.hosts {
                    want.insert(h.as_str(), (s.project.as_str(), Source::of(&t.certificate)));
                }
            }
        }
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        table.route_hosts = specs
            .iter()
            .flat_map(|s| s.hosts.iter().map(move |h| (h, &s.project)))
            .filter(|(h, _)| !h.starts_with("*."))
            .map(|(h, p)| (h.clone(), p.clone()))
            .collect();
        table.slots.retain(|h, slot| {
            want.get(h.as_str())
                .is_some_and(|(p, src)| *p == slot.project && *src == slot.source)
                && !self.custom_now_stored(slot)
        });
        for (host, (project, source)) in want {
            if !table.slots.contains_key(host) {
                let slot = self.new_slot(host, project, source);
                table.slots.insert(host.to_string(), slot);
            }
        }
        self.publish(&table);
        self.publish_stateless(&table);
    }

    /// The exact ACME hosts of projects with a shared account key, answered statelessly
    /// (see `account`). Wildcards are left out: HTTP-01 cannot issue them.
    fn publish_stateless(&self, table: &Table) {
        let mut thumbprints: HashMap<&str, Option<Arc<str>>> = HashMap::new();
        let mut hosts = HashMap::new();
        for (host, slot) in &table.slots {
            if slot.source != Source::Acme || host.starts_with("*.") {
                continue;
            }
            let thumbprint = thumbprints.entry(&slot.project).or_insert_with(|| {
                match self.keys.get(&slot.project) {
                    Ok(k) => k.map(|k| k.thumbprint.clone()),
                    Err(e) => {
                        crate::log::error(
                            "a project's ACME account key cannot be read; its hosts answer only the tokens this proxy ordered",
                            serde_json::json!({"project": slot.project, "error": e}),
                        );
                        None
                    }
                }
            });
            if let Some(t) = thumbprint {
                hosts.insert(host.clone(), t.clone());
            }
        }
        self.book.publish_stateless(hosts);
    }

    /// The deploy gate's check of an ACME account key sent with a deploy of `project`: an
    /// ECDSA P-256 PKCS#8 PEM key. The refusal names the field, never the key's bytes.
    pub fn check_account(
        &self,
        project: &str,
        key: &AcmeAccountKey,
    ) -> Result<CheckedAccount, ApiError> {
        let key = ProjectKey::from_pem(&key.pkcs8_pem).map_err(|e| {
            ApiError::new(
                ErrorKind::Invalid,
                format!("acme_account.pkcs8_pem refused: {e}"),
            )
        })?;
        Ok(CheckedAccount {
            project: project.to_string(),
            key: Arc::new(key),
        })
    }

    /// Stores a checked account key (0600, atomic) as its project's, unless it is already
    /// the one held. Returns whether it changed.
    pub fn store_account(&self, c: &CheckedAccount) -> Result<bool, String> {
        self.keys.set(&c.project, &c.key)
    }

    /// For an identical repeat of a live deploy: stores the key if the proxy holds another
    /// (or none), then republishes the stateless answers. `specs`: the routing table as now
    /// (the caller holds the commit lock). Returns whether it was stored.
    pub fn restore_account(
        self: &Arc<Self>,
        c: &CheckedAccount,
        specs: &[RouteSpec],
    ) -> Result<bool, String> {
        let changed = self.store_account(c)?;
        if changed {
            self.sync(specs);
        }
        Ok(changed)
    }

    /// The ACME account key held for `project`, as sent with its deploys. A stored key that
    /// no longer parses counts as none (logged); a file that cannot be read is an error
    /// naming it.
    pub fn account_key(&self, project: &str) -> Result<Option<AcmeAccountKey>, ApiError> {
        luma_api::names::check_name("project", project)
            .map_err(|e| ApiError::new(ErrorKind::Invalid, e))?;
        self.keys
            .get(project)
            .map(|k| k.map(|k| k.to_api()))
            .map_err(|e| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("the ACME account key of project {project:?}: {e}"),
                )
            })
    }

    /// After a deploy of `spec` (an explicit user action, e.g. after fixing DNS): its ACME
    /// hosts without a usable certificate order again now instead of at their backoff's next
    /// attempt. The hourly cap still holds.
    pub fn retry_pending(&self, spec: &RouteSpec) {
        let now = unix_now();
        let Ok(table) = self.table.lock() else {
            return;
        };
        for h in &spec.hosts {
            let Some(slot) = table.slots.get(h).filter(|s| s.project == spec.project) else {
                continue;
            };
            let pending = slot.served.as_ref().is_none_or(|p| p.not_after <= now);
            if let (true, Some(wake)) = (pending, &slot.wake) {
                wake.notify_one();
            }
        }
    }

    fn new_slot(self: &Arc<Self>, host: &str, project: &str, source: Source) -> Slot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut slot = Slot {
            id,
            project: project.to_string(),
            source: source.clone(),
            served: None,
            http_only: None,
            last_error: None,
            next_attempt: None,
            renew_at: None,
            wake: None,
            _task: None,
        };
        match &source {
            Source::Custom(sha) => {
                // Nothing will ever bring a missing custom certificate but the user's next
                // deploy: say so (HTTP only), rather than pending forever.
                let resend = "deploy again from luma to send the certificate";
                match self.store.custom_cert(project, sha) {
                    Some((chain, key)) => match Parsed::from_pem(&chain, &key) {
                        Ok(p) if p.covers(host) => slot.served = Some(p),
                        Ok(p) => {
                            slot.http_only = Some(format!(
                                "the custom certificate does not cover {host}; it covers {}",
                                p.names.join(", ")
                            ))
                        }
                        Err(e) => {
                            slot.http_only =
                                Some(format!("the stored custom certificate: {e}; {resend}"))
                        }
                    },
                    None => {
                        slot.http_only = Some(format!(
                            "the custom certificate {sha} is not held by this proxy; {resend}"
                        ))
                    }
                }
            }
            Source::Acme => {
                slot.http_only = self.http_only(host);
                // A stored certificate is served whatever ACME's state: off (or a CA that
                // refuses this name) only stops ordering.
                if let Some((chain, key)) = self.store.host_cert(project, host) {
                    match Parsed::from_pem(&chain, &key) {
                        Ok(p)
                            if p.covers(host)
                                && (slot.http_only.is_none() || p.not_after > unix_now()) =>
                        {
                            slot.served = Some(p)
                        }
                        Ok(_) | Err(_) => crate::log::warn(
                            "stored certificate unusable",
                            serde_json::json!({"project": project, "host": host}),
                        ),
                    }
                }
                if slot.http_only.is_some() {
                    return slot;
                }
                let meta = self.store.host_meta(project, host);
                slot.last_error = meta.last_error.clone();
                slot.next_attempt = meta.next_attempt;
                slot.renew_at = meta.renew_at;
                if let (Ok(acme), Ok(rt)) = (&self.acme, tokio::runtime::Handle::try_current()) {
                    let wake = Arc::new(Notify::new());
                    let task = rt.spawn(acme::host_task(
                        Arc::downgrade(self),
                        acme.clone(),
                        acme::HostRef {
                            id,
                            project: project.to_string(),
                            host: host.to_string(),
                        },
                        wake.clone(),
                    ));
                    slot.wake = Some(wake);
                    slot._task = Some(TaskHandle(task));
                }
            }
        }
        slot
    }

    /// A custom slot that serves nothing although its certificate is stored now: rebuilt.
    fn custom_now_stored(&self, slot: &Slot) -> bool {
        match &slot.source {
            Source::Custom(sha) => {
                slot.served.is_none() && self.store.custom_cert(&slot.project, sha).is_some()
            }
            Source::Acme => false,
        }
    }

    /// Why an ACME host gets no certificate ordered, if so.
    fn http_only(&self, host: &str) -> Option<String> {
        if let Err(why) = &self.acme {
            return Some(why.clone());
        }
        if host.starts_with("*.") {
            return Some(format!(
                "{host} is a wildcard: HTTP-01 and TLS-ALPN-01 cannot issue wildcards; use a custom certificate"
            ));
        }
        if self.public_ca {
            return luma_api::names::no_public_certificate(host);
        }
        None
    }

    fn publish(&self, table: &Table) {
        let own = table.slots.iter().map(|(h, s)| {
            let entry = s.served.as_ref().map(|p| Entry {
                key: p.key.clone(),
                not_after: p.not_after,
                project: s.project.as_str().into(),
                names: p.names.clone().into(),
            });
            (h.clone(), s.project.as_str().into(), entry)
        });
        let without = table
            .route_hosts
            .iter()
            .filter(|(h, _)| !table.slots.contains_key(*h))
            .map(|(h, p)| (h.clone(), p.as_str().into(), None));
        self.book.publish(without.chain(own));
        self.metrics.set_certificate_expiry(
            table
                .slots
                .iter()
                .filter_map(|(h, s)| {
                    s.served
                        .as_ref()
                        .map(|p| (s.project.clone(), h.clone(), p.not_after))
                })
                .collect(),
        );
    }

    /// The certificate a host's slot serves now (for the slot's own task).
    pub(crate) fn served(&self, host: &str, id: u64) -> Option<Parsed> {
        let table = self.table.lock().ok()?;
        table
            .slots
            .get(host)
            .filter(|s| s.id == id)
            .and_then(|s| s.served.clone())
    }

    /// Lets a host's task update its slot, if it is still the one with `id`.
    fn report(&self, host: &str, id: u64, f: impl FnOnce(&mut Slot)) {
        if let Ok(mut table) = self.table.lock() {
            if let Some(s) = table.slots.get_mut(host).filter(|s| s.id == id) {
                f(s);
            }
        }
    }

    /// Serves a newly issued certificate, if the slot that ordered it is still there.
    pub(crate) fn install(&self, host: &str, id: u64, cert: Parsed, renew_at: u64) {
        if let Ok(mut table) = self.table.lock() {
            if let Some(s) = table.slots.get_mut(host).filter(|s| s.id == id) {
                s.served = Some(cert);
                s.renew_at = Some(renew_at);
                s.last_error = None;
                s.next_attempt = None;
                self.publish(&table);
            }
        }
    }

    /// One status per host of every route with `tls`, filtered by project and hosts.
    pub fn statuses(&self, specs: &[RouteSpec], req: &CertificatesRequest) -> CertificatesReply {
        let hosts: Vec<String> = req
            .hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        let now = unix_now();
        let table = match self.table.lock() {
            Ok(s) => s,
            Err(_) => return CertificatesReply::default(),
        };
        let mut out = Vec::new();
        for s in specs {
            let Some(t) = &s.tls else { continue };
            if req.project.as_ref().is_some_and(|p| *p != s.project) {
                continue;
            }
            for h in &s.hosts {
                if !hosts.is_empty() && !hosts.contains(h) {
                    continue;
                }
                let source = Source::of(&t.certificate);
                let slot = table.slots.get(h).filter(|x| x.project == s.project);
                let mut st = CertificateStatus {
                    host: h.clone(),
                    project: s.project.clone(),
                    state: CertState::Pending,
                    source: source.name().into(),
                    issuer: None,
                    not_after: None,
                    renew_at: None,
                    last_error: None,
                    next_attempt: None,
                };
                if let Some(slot) = slot {
                    st.last_error = slot.last_error.clone();
                    if source == Source::Acme && slot.http_only.is_none() {
                        st.renew_at = slot.renew_at.filter(|_| slot.served.is_some());
                        st.next_attempt = slot.next_attempt.filter(|n| *n > now);
                    }
                    match (&slot.served, &slot.http_only) {
                        (Some(p), why) => {
                            st.state = if p.not_after > now {
                                CertState::Issued
                            } else {
                                CertState::Expired
                            };
                            st.issuer = Some(p.issuer.clone());
                            st.not_after = Some(p.not_after);
                            if let Some(why) = why {
                                st.last_error =
                                    Some(format!("{why}; this certificate will not be renewed"));
                            }
                        }
                        (None, Some(why)) => {
                            st.state = CertState::HttpOnly;
                            st.last_error = Some(why.clone());
                        }
                        (None, None) => {}
                    }
                }
                out.push(st);
            }
        }
        out.sort_by(|a, b| (&a.project, &a.host).cmp(&(&b.project, &b.host)));
        CertificatesReply { certificates: out }
    }
}

/// The sha256 of the custom certificate a route names, normalized.
fn custom_sha256(spec: &RouteSpec) -> Option<String> {
    match spec.tls.as_ref().map(|t| &t.certificate) {
        Some(CertificateSource::Custom { sha256 }) => Some(sha256.trim().to_ascii_lowercase()),
        _ => None,
    }
}

fn not_held(project: &str, sha256: &str) -> String {
    format!(
        "route.tls names the custom certificate {sha256}, which this proxy does not hold for project {project:?}: send it with the deploy"
    )
}
