//! ACME: one background task per host that wants a certificate, from deploy to renewal.
//!
//! A host's task ([`host_task`]) starts when its route is committed or restored and is aborted
//! when the host leaves the route (see `tls::Tls::sync`). It loops:
//! 1. decide when the next order is due ([`schedule`]): now without a certificate, or with one
//!    from another ACME directory than the configured one (compared normalized, see
//!    [`same_directory`]); else at its renewal time ([`renewal`]: a point drawn in ARI's
//!    suggested window, RFC 9773, when the directory offers `renewalInfo`, asked again every
//!    [`ARI_RECHECK`] or the CA's longer Retry-After and drawn again only when the window
//!    moved, as it does when the CA revokes; else one third of the lifetime before expiry;
//!    stored in the host's meta); never before the backoff's next attempt (unless a new
//!    deploy of the route asked to retry at once);
//!    never while the host has placed `orders_per_hour` orders in the last hour (an order
//!    recorded in the future, by a clock that was ahead, counts as placed now);
//! 2. sleep until then (at most [`RECHECK`] at a time, so a clock jump is noticed), or until a
//!    deploy of the route wakes it;
//! 3. order (see [`order`]): HTTP-01 first, or the challenge type that worked last; if that
//!    authorization fails, one immediate second order with the other type, if the cap allows;
//! 4. on success store chain, key and meta, serve the certificate; on failure double the wait
//!    (`retry_min` .. `retry_max`) and keep the CA's reason for `luma status`.
//!
//! Every order is written to the host's order history (per host, whatever its project)
//! before the CA is contacted, and the backoff's next attempt with the failure, so a proxy in
//! a crash loop, or a host moved between projects, cannot place more orders than the cap. A
//! history that cannot be read counts as a full hour's worth of orders placed just now. A
//! restart loads the certificate and meta first: a valid certificate is served at once and
//! not ordered again before its renewal time. All file I/O of a task runs on the blocking
//! pool.
//!
//! Accounts ([`Acme::account_for`]): a project with a shared account key (see `account`)
//! orders with the account of that key, loaded (or created: newAccount with an existing key
//! answers the existing account) once per process and key; every other project orders with
//! the proxy-wide account, created once and stored per directory. A lost account (the CA no
//! longer knows it) is dropped by the first task that sees it fail, and made again.

pub mod http;
pub mod order;

use super::account::ProjectKeys;
use super::certs::{unix_now, Parsed};
use super::store::{HostMeta, OrderHistory, Store};
use super::Tls;
use crate::config::AcmeSettings;
use instant_acme::{Account, AccountCredentials, CertificateIdentifier, NewAccount};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// Longest single sleep of a host task before it looks at its schedule again.
pub const RECHECK: Duration = Duration::from_secs(3600);
/// How often a certificate's ARI window is asked again, unless the CA's Retry-After is longer.
pub const ARI_RECHECK: Duration = Duration::from_secs(6 * 3600);
/// The longest Retry-After honoured between ARI checks (RFC 9773 section 4.3.2 suggests
/// treating longer ones as a day).
pub const ARI_MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Bound on account creation or loading (directory fetch included) and on an ARI query.
const ACCOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs file I/O on the blocking pool, off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("file task: {e}"))
}

/// The ACME side shared by every host task: settings, the HTTP client, the account.
pub struct Acme {
    pub settings: AcmeSettings,
    pub directory: String,
    http: http::AcmeHttp,
    store: Arc<Store>,
    /// The proxy-wide account, for projects without a shared key.
    account: tokio::sync::Mutex<Option<Account>>,
    keys: Arc<ProjectKeys>,
    /// Project -> the account of its shared key (its thumbprint tells a replaced key).
    projects: tokio::sync::Mutex<HashMap<String, Account>>,
}

impl Acme {
    pub fn new(
        settings: AcmeSettings,
        http: http::AcmeHttp,
        store: Arc<Store>,
        keys: Arc<ProjectKeys>,
    ) -> Option<Acme> {
        let directory = settings.directory.clone()?;
        Some(Acme {
            settings,
            directory,
            http,
            store,
            account: tokio::sync::Mutex::new(None),
            keys,
            projects: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    fn contact(&self) -> Vec<String> {
        self.settings
            .email
            .iter()
            .map(|e| format!("mailto:{e}"))
            .collect()
    }

    /// The account `project`'s orders use: the one of its shared key when it has one, else
    /// the proxy-wide account ([`Acme::account`]).
    pub async fn account_for(&self, project: &str) -> Result<Account, String> {
        let (keys, p) = (self.keys.clone(), project.to_string());
        let Some(key) = blocking(move || keys.get(&p)).await?? else {
            return self.account().await;
        };
        let mut cached = self.projects.lock().await;
        if let Some(a) = cached
            .get(project)
            .filter(|a| a.key_thumbprint() == &*key.thumbprint)
        {
            return Ok(a.clone());
        }
        let builder = Account::builder_with_http(Box::new(self.http.clone()));
        let (account, _) = tokio::time::timeout(
            ACCOUNT_TIMEOUT,
            builder.create_from_key(key.acme_key()?, self.directory.clone()),
        )
        .await
        .map_err(|_| format!("ACME directory {} did not answer", self.directory))?
        .map_err(|e| {
            format!(
                "loading the ACME account of project {project}'s shared key at {}: {e}",
                self.directory
            )
        })?;
        // newAccount with a key sends no contact: set it, as the proxy-wide account has it.
        // Best effort: the account works without one.
        let contact = self.contact();
        if !contact.is_empty() {
            let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
            let updated =
                tokio::time::timeout(ACCOUNT_TIMEOUT, account.update_contacts(&contact)).await;
            let failed = match updated {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("the CA did not answer".to_string()),
            };
            if let Some(e) = failed {
                crate::log::warn(
                    "the contact of a project's ACME account was not set",
                    serde_json::json!({"project": project, "directory": self.directory, "error": e}),
                );
            }
        }
        crate::log::info(
            "ACME account of a project's shared key ready",
            serde_json::json!({"project": project, "directory": self.directory, "account": account.id(), "thumbprint": &*key.thumbprint}),
        );
        cached.insert(project.to_string(), account.clone());
        Ok(account)
    }

    /// The account for the directory: cached, else loaded from the store, else created (and
    /// stored, 0600) with the contact address.
    pub async fn account(&self) -> Result<Account, String> {
        let mut cached = self.account.lock().await;
        if let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let builder = Account::builder_with_http(Box::new(self.http.clone()));
        let (store, dir) = (self.store.clone(), self.directory.clone());
        let stored = blocking(move || store.account(&dir)).await?;
        let account = match stored {
            Some(json) => {
                let creds: AccountCredentials = serde_json::from_str(&json)
                    .map_err(|e| format!("the stored ACME account cannot be read: {e}"))?;
                tokio::time::timeout(ACCOUNT_TIMEOUT, builder.from_credentials(creds))
                    .await
                    .map_err(|_| format!("ACME directory {} did not answer", self.directory))?
                    .map_err(|e| format!("ACME directory {}: {e}", self.directory))?
            }
            None => {
                let contact = self.contact();
                let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, creds) = tokio::time::timeout(
                    ACCOUNT_TIMEOUT,
                    builder.create(&new, self.directory.clone(), None),
                )
                .await
                .map_err(|_| format!("ACME directory {} did not answer", self.directory))?
                .map_err(|e| format!("creating an ACME account at {}: {e}", self.directory))?;
                let json = serde_json::to_string(&creds)
                    .map_err(|e| format!("encode the ACME account: {e}"))?;
                let (store, dir) = (self.store.clone(), self.directory.clone());
                blocking(move || store.save_account(&dir, &json)).await??;
                crate::log::info(
                    "ACME account created",
                    serde_json::json!({"directory": self.directory}),
                );
                account
            }
        };
        *cached = Some(account.clone());
        Ok(account)
    }

    /// Drops `failed`, an account the CA no longer knows (a test CA restarted, an account
    /// deactivated): the next order creates a new one. Only if it is still the cached one:
    /// host tasks that failed on the old account at the same time must not each drop the new
    /// account another task just made (one lost account, one new account).
    pub async fn forget_account(&self, failed: &Account) {
        {
            let mut projects = self.projects.lock().await;
            if let Some(project) = projects
                .iter()
                .find(|(_, a)| a.id() == failed.id())
                .map(|(p, _)| p.clone())
            {
                projects.remove(&project);
                crate::log::warn(
                    "the ACME CA does not know a project's account; loading it again from its key",
                    serde_json::json!({"project": project, "directory": self.directory}),
                );
                return;
            }
        }
        let mut cached = self.account.lock().await;
        if !is_current(cached.as_ref().map(Account::id), failed.id()) {
            return;
        }
        *cached = None;
        let (store, dir) = (self.store.clone(), self.directory.clone());
        let _ = blocking(move || store.forget_account(&dir)).await;
        crate::log::warn(
            "the ACME CA does not know our account; creating a new one",
            serde_json::json!({"directory": self.directory}),
        );
    }

    /// Asks the CA's ARI (RFC 9773) for `cert`'s suggested renewal window (with the account
    /// of `project`'s orders, so a project with a shared key never makes a proxy-wide one).
    pub async fn ari(&self, project: &str, cert: &Parsed) -> AriAnswer {
        let Some(leaf) = cert.key.cert.first() else {
            return AriAnswer::Failed;
        };
        let Ok(id) = CertificateIdentifier::try_from(leaf) else {
            return AriAnswer::Failed;
        };
        let Ok(account) = self.account_for(project).await else {
            return AriAnswer::Failed;
        };
        match tokio::time::timeout(ACCOUNT_TIMEOUT, account.renewal_info(&id)).await {
            Ok(Ok((info, retry_after))) => AriAnswer::Window {
                start: info.suggested_window.start.unix_timestamp().max(0) as u64,
                end: info.suggested_window.end.unix_timestamp().max(0) as u64,
                retry_after,
            },
            Ok(Err(instant_acme::Error::Unsupported(_))) => AriAnswer::Unsupported,
            _ => AriAnswer::Failed,
        }
    }
}

/// Whether `cached` (the account id in use) is the account `failed` that the CA did not know.
fn is_current(cached: Option<&str>, failed: &str) -> bool {
    cached == Some(failed)
}

/// A directory URL as compared: no surrounding space nor trailing `/`, scheme and host in
/// lowercase, no default port. The path is kept as is (it is case sensitive).
fn directory_key(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let scheme = scheme.to_ascii_lowercase();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut authority = authority.to_ascii_lowercase();
    if scheme == "https" && authority.ends_with(":443") {
        authority.truncate(authority.len() - 4);
    }
    format!("{scheme}://{authority}{path}")
}

/// Whether two directory URLs name the same directory: a cosmetic change of the setting (a
/// trailing `/`, an upper-case host) must not make every certificate "from another directory"
/// and order them all again.
pub fn same_directory(a: &str, b: &str) -> bool {
    directory_key(a) == directory_key(b)
}

/// What the CA's ARI said about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AriAnswer {
    /// The directory offers no `renewalInfo`: one third of the lifetime left is the rule.
    Unsupported,
    /// No usable answer (the CA did not answer, or no account): keep what we have.
    Failed,
    /// The suggested window (Unix seconds), and the CA's Retry-After.
    Window {
        start: u64,
        end: u64,
        retry_after: Duration,
    },
}

/// A certificate's renewal point, the ARI window it was drawn in, and when to ask ARI again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub at: u64,
    pub window: Option<(u64, u64)>,
    pub next_check: u64,
}

/// Decides the renewal point of a certificate after asking ARI at `now`. `kept`: the point
/// drawn before for this same certificate, with the window it was drawn in; `third`: one third
/// of the lifetime before expiry. A point is drawn (`draw`, inclusive bounds) only when there
/// was none or the window changed, so asking again does not move a renewal back and forth;
/// without ARI the third rule holds; a failed ask keeps what was there. The next ask is
/// [`ARI_RECHECK`] away, or the CA's Retry-After when longer (at most [`ARI_MAX_WAIT`]).
pub fn renewal(
    kept: Option<(u64, Option<(u64, u64)>)>,
    third: u64,
    answer: AriAnswer,
    now: u64,
    draw: impl FnOnce(u64, u64) -> u64,
) -> Renewal {
    let recheck = now.saturating_add(ARI_RECHECK.as_secs());
    match answer {
        AriAnswer::Window {
            start,
            end,
            retry_after,
        } => {
            let window = (start, end.max(start));
            let at = match kept {
                Some((at, Some(w))) if w == window => at,
                _ => draw(window.0, window.1),
            };
            let wait = retry_after.clamp(ARI_RECHECK, ARI_MAX_WAIT);
            Renewal {
                at,
                window: Some(window),
                next_check: now.saturating_add(wait.as_secs()),
            }
        }
        AriAnswer::Unsupported => Renewal {
            at: third,
            window: None,
            next_check: recheck,
        },
        AriAnswer::Failed => Renewal {
            at: kept.map_or(third, |(at, _)| at),
            window: kept.and_then(|(_, w)| w),
            next_check: recheck,
        },
    }
}

/// Whether ARI is due again at `now` for a certificate whose point is `kept`: there is none
/// yet, or its next check has come. A next check further away than [`ARI_MAX_WAIT`] was
/// written by a clock that was ahead: it is due.
pub fn ari_due(kept: bool, next_check: Option<u64>, now: u64) -> bool {
    !kept || next_check.is_none_or(|t| t <= now || t > now.saturating_add(ARI_MAX_WAIT.as_secs()))
}

/// A point drawn uniformly in `start..=end`, spreading renewals as RFC 9773 asks.
fn draw_in(start: u64, end: u64) -> u64 {
    start.saturating_add(fastrand::u64(0..=end.saturating_sub(start)))
}

/// The wait after `failures` failed attempts in a row: `min`, doubling, capped at `max`.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    min.saturating_mul(1u32 << exp).min(max)
}

/// When the per-hour cap allows the next order (`now` when it does already). Also drops
/// orders older than an hour from `orders`, and records an order time in the future (a clock
/// that was ahead, or a corrupt file) as `now`: it still counts for the hour, but never blocks
/// the host for the skew on top, and no value can overflow.
pub fn cap_free_at(orders: &mut Vec<u64>, now: u64, per_hour: u32) -> u64 {
    for t in orders.iter_mut() {
        *t = (*t).min(now);
    }
    orders.retain(|t| now - *t < 3600);
    if (orders.len() as u64) < u64::from(per_hour.max(1)) {
        return now;
    }
    orders
        .iter()
        .min()
        .map_or(now, |oldest| oldest.saturating_add(3600))
}

/// Which host a task works for: its slot's id, project and host pattern.
pub struct HostRef {
    pub id: u64,
    pub project: String,
    pub host: String,
}

/// When a host's next order is due, and the next attempt to report (a failure's retry, or
/// the hourly cap's end).
#[derive(Debug, PartialEq, Eq)]
pub struct Schedule {
    pub due: u64,
    pub next_attempt: Option<u64>,
}

/// Plans the next order at `now` (see the module docs). `renew_at`: the served
/// certificate's renewal time (`None`: no certificate); `foreign`: the certificate came from
/// another directory; `retry_now`: a deploy asked to skip the backoff; `cap_free`: when the
/// hourly cap allows an order ([`cap_free_at`]).
pub fn schedule(
    now: u64,
    renew_at: Option<u64>,
    foreign: bool,
    meta: &HostMeta,
    retry_now: bool,
    cap_free: u64,
) -> Schedule {
    let mut due = match renew_at {
        Some(at) if !foreign => at,
        _ => now,
    };
    let backing_off = meta.failures > 0 && !retry_now;
    if let (true, Some(n)) = (backing_off, meta.next_attempt) {
        due = due.max(n);
    }
    let next_attempt = (backing_off || cap_free > now).then_some(due.max(cap_free));
    Schedule {
        due: due.max(cap_free),
        next_attempt: next_attempt.filter(|n| *n > now),
    }
}

fn warn_unsaved(h: &HostRef, what: &str, e: String) {
    crate::log::warn(
        &format!("{what} not saved"),
        serde_json::json!({"project": h.project, "host": h.host, "error": e}),
    );
}

/// Saves a host's meta off the runtime; a failure is logged (the certificate state in memory
/// stays right, only a restart would see older meta).
async fn save_meta(store: &Arc<Store>, h: &HostRef, meta: &HostMeta) {
    let (s, m, p, host) = (
        store.clone(),
        meta.clone(),
        h.project.clone(),
        h.host.clone(),
    );
    if let Ok(Err(e)) = blocking(move || s.save_host_meta(&p, &host, &m)).await {
        warn_unsaved(h, "certificate meta", e);
    }
}

/// The life of one host's certificate (see the module docs). Ends when the host's slot is
/// dropped (its handle aborts this task) or the proxy goes away.
pub async fn host_task(tls: Weak<Tls>, acme: Arc<Acme>, h: HostRef, wake: Arc<Notify>) {
    let store = acme.store.clone();
    let cap = acme.settings.orders_per_hour;
    let (s, project, host) = (store.clone(), h.project.clone(), h.host.clone());
    let Ok((mut meta, history)) =
        blocking(move || (s.host_meta(&project, &host), s.order_history(&host))).await
    else {
        return;
    };
    let mut history = history.unwrap_or_else(|e| {
        // Not zero: the cap protects the CA's own per-name limit, which did not reset.
        crate::log::warn(
            "order history unreadable; counting the hourly cap as used",
            serde_json::json!({"host": h.host, "error": e}),
        );
        OrderHistory {
            orders: vec![unix_now(); cap.max(1) as usize],
        }
    });
    // A next attempt further away than the longest backoff was written by a clock that was
    // ahead: it must not hold the host back for the skew.
    let latest = unix_now().saturating_add(acme.settings.retry_max.as_secs().max(1));
    meta.next_attempt = meta.next_attempt.map(|n| n.min(latest));
    let mut retry_now = false;
    // The renewal time last logged, so a restored certificate's "kept until" is said once (the
    // event that shows a restart decided not to order), not at every recheck.
    let mut told: Option<u64> = None;
    loop {
        let Some(served) = tls.upgrade().map(|t| t.served(&h.host, h.id)) else {
            return;
        };
        let now = unix_now();
        let mut renew_at = None;
        let mut foreign = false;
        if let Some(cert) = &served {
            let described = meta.sha256.as_deref() == Some(cert.sha256.as_str());
            foreign = described
                && meta
                    .directory
                    .as_deref()
                    .is_some_and(|d| !same_directory(d, &acme.directory));
            let kept = meta
                .renew_at
                .filter(|_| described)
                .map(|at| (at, meta.ari_window));
            if ari_due(kept.is_some(), meta.ari_next_check, now) {
                let answer = acme.ari(&h.project, cert).await;
                let r = renewal(kept, cert.renew_at_third(), answer, unix_now(), draw_in);
                meta.sha256 = Some(cert.sha256.clone());
                meta.renew_at = Some(r.at);
                meta.ari_window = r.window;
                meta.ari_next_check = Some(r.next_check);
                save_meta(&store, &h, &meta).await;
            }
            renew_at = meta.renew_at;
        }
        let cap_free = cap_free_at(&mut history.orders, now, cap);
        let plan = schedule(now, renew_at, foreign, &meta, retry_now, cap_free);
        if let Some(t) = tls.upgrade() {
            t.report(&h.host, h.id, |s| {
                s.renew_at = renew_at;
                s.next_attempt = plan.next_attempt;
                s.last_error = meta.last_error.clone();
            });
        }
        if plan.due > now {
            if let Some(at) = renew_at.filter(|at| told != Some(*at)) {
                told = Some(at);
                crate::log::info(
                    "certificate valid; kept until its renewal time",
                    serde_json::json!({"project": h.project, "host": h.host, "renew_at": at}),
                );
            }
            let wait = Duration::from_secs(plan.due - now).min(RECHECK);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => retry_now = true,
            }
            continue;
        }
        retry_now = false;
        let result = order::obtain(&acme, &tls, &h, &mut meta, &mut history).await;
        // A deploy that asked for a retry while this order ran got it: this order.
        tokio::select! {
            biased;
            _ = wake.notified() => {}
            _ = std::future::ready(()) => {}
        }
        match result {
            Ok(issued) => {
                let Some(t) = tls.upgrade() else { return };
                let answer = acme.ari(&h.project, &issued.cert).await;
                let renew = renewal(
                    None,
                    issued.cert.renew_at_third(),
                    answer,
                    unix_now(),
                    draw_in,
                );
                meta = HostMeta {
                    source: "acme".into(),
                    directory: Some(acme.directory.clone()),
                    sha256: Some(issued.cert.sha256.clone()),
                    issuer: Some(issued.cert.issuer.clone()),
                    not_before: Some(issued.cert.not_before),
                    not_after: Some(issued.cert.not_after),
                    renew_at: Some(renew.at),
                    ari_window: renew.window,
                    ari_next_check: Some(renew.next_check),
                    // The challenge that worked, remembered to be tried first next time; an
                    // order the CA passed on an earlier authorization proved none.
                    challenge: if issued.validated {
                        Some(issued.challenge.to_string())
                    } else {
                        meta.challenge.take()
                    },
                    failures: 0,
                    last_error: None,
                    next_attempt: None,
                };
                save_meta(&store, &h, &meta).await;
                crate::log::info(
                    "certificate issued",
                    serde_json::json!({"project": h.project, "host": h.host, "issuer": issued.cert.issuer, "not_after": issued.cert.not_after, "challenge": issued.challenge, "authorization": if issued.validated { "validated" } else { "reused" }}),
                );
                t.install(&h.host, h.id, issued.cert, renew.at);
            }
            Err(reason) => {
                if tls.upgrade().is_none() {
                    return;
                }
                meta.failures = meta.failures.saturating_add(1);
                let wait = backoff(
                    meta.failures,
                    acme.settings.retry_min,
                    acme.settings.retry_max,
                );
                let now = unix_now();
                meta.next_attempt = Some(now.saturating_add(wait.as_secs().max(1)));
                meta.last_error = Some(reason.clone());
                save_meta(&store, &h, &meta).await;
                crate::log::warn(
                    "certificate order failed",
                    serde_json::json!({"project": h.project, "host": h.host, "reason": reason, "retry_in_s": wait.as_secs()}),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(600));
        let w: Vec<u64> = (1..7).map(|f| backoff(f, min, max).as_secs()).collect();
        assert_eq!(w, vec![60, 120, 240, 480, 600, 600]);
        assert_eq!(backoff(1000, min, max), max);
    }

    #[test]
    fn the_hourly_cap_counts_the_last_hour_only() {
        let mut orders = vec![100, 200, 300];
        assert_eq!(cap_free_at(&mut orders, 400, 5), 400);
        assert_eq!(
            cap_free_at(&mut orders, 400, 3),
            3700,
            "free when the oldest ages out"
        );
        assert_eq!(cap_free_at(&mut orders, 3750, 3), 3750);
        assert_eq!(orders, vec![200, 300]);
    }

    #[test]
    fn future_and_huge_order_times_never_block_past_an_hour_from_now() {
        // A clock that was a day ahead recorded these: they count as placed now.
        let mut orders = vec![100 + 86_400, 100 + 86_400];
        assert_eq!(cap_free_at(&mut orders, 100, 2), 3700);
        assert_eq!(orders, vec![100, 100], "clamped in the saved history too");
        let mut orders = vec![u64::MAX; 3];
        assert_eq!(cap_free_at(&mut orders, 100, 3), 3700, "no overflow");
        let mut orders = vec![u64::MAX; 3];
        assert_eq!(cap_free_at(&mut orders, u64::MAX, 3), u64::MAX);
    }

    #[test]
    fn only_the_account_that_failed_is_forgotten() {
        let old = "https://ca.test/acct/1";
        assert!(is_current(Some(old), old));
        // Another task already replaced it: the new account stays.
        assert!(!is_current(Some("https://ca.test/acct/2"), old));
        assert!(!is_current(None, old), "already forgotten");
    }

    #[test]
    fn directories_are_compared_normalized() {
        let d = "https://acme-v02.api.letsencrypt.org/directory";
        for same in [
            "https://acme-v02.api.letsencrypt.org/directory/",
            "HTTPS://ACME-v02.api.LetsEncrypt.org/directory",
            " https://acme-v02.api.letsencrypt.org:443/directory ",
        ] {
            assert!(same_directory(d, same), "{same}");
        }
        for other in [
            "https://acme-staging-v02.api.letsencrypt.org/directory",
            "https://acme-v02.api.letsencrypt.org/Directory",
            "https://acme-v02.api.letsencrypt.org:14000/directory",
            "https://pebble:14000/dir",
        ] {
            assert!(!same_directory(d, other), "{other}");
        }
    }

    #[test]
    fn ari_redraws_only_when_the_window_changes() {
        let h = 3600;
        let asked = |start, end, retry_s| AriAnswer::Window {
            start,
            end,
            retry_after: Duration::from_secs(retry_s),
        };
        // First answer: drawn in the window; asked again in 6 h.
        let r = renewal(None, 900, asked(500, 700, 60), 100, |a, b| (a + b) / 2);
        assert_eq!(
            r,
            Renewal {
                at: 600,
                window: Some((500, 700)),
                next_check: 100 + 6 * h
            }
        );
        // Same window: the drawn point stays (never a second draw).
        let kept = Some((r.at, r.window));
        let again = renewal(kept, 900, asked(500, 700, 0), 200, |_, _| panic!("redrawn"));
        assert_eq!(again.at, 600);
        // The window moved (e.g. the CA revokes): drawn again inside the new one.
        let moved = renewal(kept, 900, asked(150, 160, 0), 200, |a, _| a);
        assert_eq!((moved.at, moved.window), (150, Some((150, 160))));
        // A longer Retry-After is respected, up to a day.
        assert_eq!(
            renewal(kept, 900, asked(500, 700, 9 * h), 0, |a, _| a).next_check,
            9 * h
        );
        assert_eq!(
            renewal(kept, 900, asked(500, 700, 99 * h), 0, |a, _| a).next_check,
            24 * h
        );
        // A failed ask keeps the point; no ARI at all: one third of the lifetime.
        let failed = renewal(kept, 900, AriAnswer::Failed, 0, |_, _| panic!("redrawn"));
        assert_eq!((failed.at, failed.window), (600, Some((500, 700))));
        assert_eq!(renewal(None, 900, AriAnswer::Failed, 0, |a, _| a).at, 900);
        let none = renewal(None, 900, AriAnswer::Unsupported, 0, |_, _| panic!("drawn"));
        assert_eq!((none.at, none.window), (900, None));
    }

    #[test]
    fn ari_is_asked_without_a_point_when_due_and_after_a_skewed_clock() {
        assert!(ari_due(false, Some(1000), 100), "no point yet");
        assert!(!ari_due(true, Some(1000), 100));
        assert!(ari_due(true, Some(1000), 1000));
        assert!(ari_due(true, None, 100), "a meta from before ARI rechecks");
        assert!(
            ari_due(true, Some(u64::MAX), 100),
            "written by a clock far ahead"
        );
    }

    #[test]
    fn a_certificate_from_another_directory_is_due_now() {
        let m = HostMeta::default();
        assert_eq!(schedule(100, Some(500), false, &m, false, 100).due, 500);
        assert_eq!(
            schedule(100, Some(500), true, &m, false, 100).due,
            100,
            "renewed from the configured directory at once"
        );
        assert_eq!(schedule(100, None, false, &m, false, 100).due, 100);
    }

    #[test]
    fn backoff_and_cap_hold_and_a_deploy_skips_only_the_backoff() {
        let failing = HostMeta {
            failures: 2,
            next_attempt: Some(400),
            ..HostMeta::default()
        };
        let s = schedule(100, None, false, &failing, false, 100);
        assert_eq!(
            s,
            Schedule {
                due: 400,
                next_attempt: Some(400)
            }
        );
        let s = schedule(100, None, false, &failing, true, 100);
        assert_eq!(
            s,
            Schedule {
                due: 100,
                next_attempt: None
            },
            "retry at once"
        );
        let s = schedule(100, None, false, &failing, true, 3000);
        assert_eq!(s.due, 3000, "never past the hourly cap");
        assert_eq!(s.next_attempt, Some(3000));
    }
}
