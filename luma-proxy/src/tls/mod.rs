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
//! - [`store`]: certificates, meta and ACME accounts on disk (0600, atomic writes);
//! - [`acme`]: one background task per ACME host: order, renew, back off.
//!
//! Custom certificates are checked at the deploy gate ([`Tls::check_custom`], before anything
//! changes) and stored at commit ([`Tls::store_custom`], before the routing table is saved), so
//! a restart that reads the table always finds them.

pub mod acme;
pub mod book;
pub mod certs;
pub mod store;

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::resolve::Resolver;
use book::{CertBook, Entry};
use certs::{unix_now, Parsed};
use luma_api::route::RouteSpec;
use luma_api::tls::{
    CertState, CertificateSource, CertificateStatus, CertificatesReply, CertificatesRequest,
    CustomCertificate,
};
use luma_api::{ApiError, ErrorKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use store::Store;

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

/// One host of a route with `tls`.
struct Slot {
    /// Tells this slot from an earlier one of the same host (a task reports by id).
    id: u64,
    project: String,
    source: Source,
    served: Option<Parsed>,
    /// Why no certificate will be ordered (HTTP only).
    http_only: Option<String>,
    last_error: Option<String>,
    next_attempt: Option<u64>,
    renew_at: Option<u64>,
    _task: Option<TaskHandle>,
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

pub struct Tls {
    pub book: Arc<CertBook>,
    store: Arc<Store>,
    acme: Option<Arc<acme::Acme>>,
    /// ACME hosts under reserved names are HTTP only (a public CA refuses them).
    public_ca: bool,
    acme_off_reason: &'static str,
    slots: Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
    pub(crate) metrics: Arc<Metrics>,
}

impl Tls {
    pub fn new(
        cfg: &ProxyConfig,
        resolver: Arc<Resolver>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Tls>, String> {
        let store = Arc::new(Store::new(&cfg.state_dir));
        let http = acme::http::AcmeHttp::new(resolver, cfg.acme.ca_roots_pem.as_deref())?;
        let acme = acme::Acme::new(cfg.acme.clone(), http, store.clone()).map(Arc::new);
        Ok(Arc::new(Tls {
            book: Arc::new(CertBook::default()),
            store,
            acme,
            public_ca: cfg.acme.is_public_ca(),
            acme_off_reason: "ACME is off",
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics,
        }))
    }

    /// The rustls server configuration of the HTTPS listener: certificates from the book,
    /// ALPN h2 and http/1.1 (and `acme-tls/1` for validators), session resumption by tickets
    /// and by a session cache, so a returning client skips the full handshake.
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
        let sha256 = match spec.tls.as_ref().map(|t| &t.certificate) {
            Some(CertificateSource::Custom { sha256 }) => sha256.trim().to_ascii_lowercase(),
            _ => {
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
                None => {
                    return Err(invalid(format!(
                        "route.tls names the custom certificate {sha256}, which this proxy does not hold for project {:?}: send it with the deploy",
                        spec.project
                    )))
                }
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

    /// Makes the slots match `specs` (the routing table as now): new hosts get a slot (their
    /// stored certificate loaded, an ACME task started), hosts gone or moved lose theirs, and
    /// the book is republished. Called after every commit and once at start, before the
    /// listeners accept.
    pub fn sync(self: &Arc<Self>, specs: &[RouteSpec]) {
        let mut want: HashMap<&str, (&str, Source)> = HashMap::new();
        for s in specs {
            if let Some(t) = &s.tls {
                for h in &s.hosts {
                    want.insert(h.as_str(), (s.project.as_str(), Source::of(&t.certificate)));
                }
            }
        }
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        slots.retain(|h, slot| {
            want.get(h.as_str())
                .is_some_and(|(p, src)| *p == slot.project && *src == slot.source)
        });
        for (host, (project, source)) in want {
            if !slots.contains_key(host) {
                let slot = self.new_slot(host, project, source);
                slots.insert(host.to_string(), slot);
            }
        }
        self.publish(&slots);
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
            _task: None,
        };
        match &source {
            Source::Custom(sha) => match self.store.custom_cert(project, sha) {
                Some((chain, key)) => match Parsed::from_pem(&chain, &key) {
                    Ok(p) if p.covers(host) => slot.served = Some(p),
                    Ok(p) => {
                        slot.last_error = Some(format!(
                            "the custom certificate does not cover {host}; it covers {}",
                            p.names.join(", ")
                        ))
                    }
                    Err(e) => slot.last_error = Some(format!("the stored custom certificate: {e}")),
                },
                None => {
                    slot.last_error = Some(format!(
                        "the custom certificate {sha} is not held by this proxy"
                    ))
                }
            },
            Source::Acme => {
                slot.http_only = self.http_only(host);
                if slot.http_only.is_some() {
                    return slot;
                }
                if let Some((chain, key)) = self.store.host_cert(project, host) {
                    match Parsed::from_pem(&chain, &key) {
                        Ok(p) if p.covers(host) => slot.served = Some(p),
                        Ok(_) | Err(_) => crate::log::warn(
                            "stored certificate unusable; ordering a new one",
                            serde_json::json!({"project": project, "host": host}),
                        ),
                    }
                }
                let meta = self.store.host_meta(project, host);
                slot.last_error = meta.last_error.clone();
                slot.next_attempt = meta.next_attempt;
                slot.renew_at = meta.renew_at;
                if let (Some(acme), Ok(rt)) = (&self.acme, tokio::runtime::Handle::try_current()) {
                    let task = rt.spawn(acme::host_task(
                        Arc::downgrade(self),
                        acme.clone(),
                        id,
                        project.to_string(),
                        host.to_string(),
                    ));
                    slot._task = Some(TaskHandle(task));
                }
            }
        }
        slot
    }

    /// Why an ACME host gets no certificate, if so.
    fn http_only(&self, host: &str) -> Option<String> {
        if self.acme.is_none() {
            return Some(self.acme_off_reason.to_string());
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

    fn publish(&self, slots: &HashMap<String, Slot>) {
        self.book.publish(slots.iter().filter_map(|(h, s)| {
            s.served.as_ref().map(|p| {
                (
                    h.clone(),
                    Entry {
                        key: p.key.clone(),
                        not_after: p.not_after,
                    },
                )
            })
        }));
        self.metrics.set_certificate_expiry(
            slots
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
        let slots = self.slots.lock().ok()?;
        slots
            .get(host)
            .filter(|s| s.id == id)
            .and_then(|s| s.served.clone())
    }

    /// Updates a host's slot, if it is still the one with `id`.
    pub(crate) fn report(&self, host: &str, id: u64, f: impl FnOnce(&mut SlotView<'_>)) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(s) = slots.get_mut(host).filter(|s| s.id == id) {
                f(&mut SlotView {
                    last_error: &mut s.last_error,
                    next_attempt: &mut s.next_attempt,
                    renew_at: &mut s.renew_at,
                });
            }
        }
    }

    /// Serves a newly issued certificate, if the slot that ordered it is still there.
    pub(crate) fn install(&self, host: &str, id: u64, cert: Parsed, renew_at: u64) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(s) = slots.get_mut(host).filter(|s| s.id == id) {
                s.served = Some(cert);
                s.renew_at = Some(renew_at);
                s.last_error = None;
                s.next_attempt = None;
                self.publish(&slots);
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
        let slots = match self.slots.lock() {
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
                let slot = slots.get(h).filter(|x| x.project == s.project);
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
                    if source == Source::Acme {
                        st.renew_at = slot.renew_at.filter(|_| slot.served.is_some());
                        st.next_attempt = slot.next_attempt.filter(|n| *n > now);
                    }
                    if let Some(why) = &slot.http_only {
                        st.state = CertState::HttpOnly;
                        st.last_error = Some(why.clone());
                    } else if let Some(p) = &slot.served {
                        st.state = if p.not_after > now {
                            CertState::Issued
                        } else {
                            CertState::Expired
                        };
                        st.issuer = Some(p.issuer.clone());
                        st.not_after = Some(p.not_after);
                    }
                }
                out.push(st);
            }
        }
        out.sort_by(|a, b| (&a.project, &a.host).cmp(&(&b.project, &b.host)));
        CertificatesReply { certificates: out }
    }
}

/// What a host's task may change in its slot.
pub(crate) struct SlotView<'a> {
    pub last_error: &'a mut Option<String>,
    pub next_attempt: &'a mut Option<u64>,
    pub renew_at: &'a mut Option<u64>,
}
