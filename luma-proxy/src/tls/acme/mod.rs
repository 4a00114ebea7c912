//! ACME: one background task per host that wants a certificate, from deploy to renewal.
//!
//! A host's task ([`host_task`]) starts when its route is committed or restored and is aborted
//! when the host leaves the route (see `tls::Tls::sync`). It loops:
//! 1. decide when the next order is due: now without a certificate; at the renewal time with
//!    one (ARI's suggested window, RFC 9773, when the directory offers `renewalInfo`, else one
//!    third of the lifetime before expiry); never before the backoff's next attempt; never
//!    while the host has placed `orders_per_hour` orders in the last hour;
//! 2. sleep until then (at most [`RECHECK`] at a time, so a clock jump or a new ARI window is
//!    noticed);
//! 3. order (see [`order`]): HTTP-01 first, or the challenge type that worked last; if that
//!    authorization fails, one immediate second order with the other type;
//! 4. on success store chain, key and meta, serve the certificate; on failure double the wait
//!    (`retry_min` .. `retry_max`) and keep the CA's reason for `luma status`.
//!
//! Every order is written to the host's meta before the CA is contacted, and the backoff's next
//! attempt with the failure, so a proxy in a crash loop cannot place more orders than the cap.
//! A restart loads the certificate and meta first: a valid certificate is served at once and
//! not ordered again before its renewal time.

pub mod http;
pub mod order;

use super::certs::{unix_now, Parsed};
use super::store::{HostMeta, Store};
use super::Tls;
use crate::config::AcmeSettings;
use instant_acme::{Account, AccountCredentials, CertificateIdentifier, NewAccount};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Longest single sleep of a host task before it looks at its schedule again.
pub const RECHECK: Duration = Duration::from_secs(3600);
/// Bound on account creation or loading (directory fetch included) and on an ARI query.
const ACCOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// The ACME side shared by every host task: settings, the HTTP client, the account.
pub struct Acme {
    pub settings: AcmeSettings,
    pub directory: String,
    http: http::AcmeHttp,
    store: Arc<Store>,
    account: tokio::sync::Mutex<Option<Account>>,
}

impl Acme {
    pub fn new(settings: AcmeSettings, http: http::AcmeHttp, store: Arc<Store>) -> Option<Acme> {
        let directory = settings.directory.clone()?;
        Some(Acme {
            settings,
            directory,
            http,
            store,
            account: tokio::sync::Mutex::new(None),
        })
    }

    /// The account for the directory: cached, else loaded from the store, else created (and
    /// stored, 0600) with the contact address.
    pub async fn account(&self) -> Result<Account, String> {
        let mut cached = self.account.lock().await;
        if let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let builder = Account::builder_with_http(Box::new(self.http.clone()));
        let account = match self.store.account(&self.directory) {
            Some(json) => {
                let creds: AccountCredentials = serde_json::from_str(&json)
                    .map_err(|e| format!("the stored ACME account cannot be read: {e}"))?;
                tokio::time::timeout(ACCOUNT_TIMEOUT, builder.from_credentials(creds))
                    .await
                    .map_err(|_| format!("ACME directory {} did not answer", self.directory))?
                    .map_err(|e| format!("ACME directory {}: {e}", self.directory))?
            }
            None => {
                let contact: Vec<String> = self
                    .settings
                    .email
                    .iter()
                    .map(|e| format!("mailto:{e}"))
                    .collect();
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
                self.store.save_account(&self.directory, &json)?;
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

    /// Drops an account the CA no longer knows (a test CA restarted): the next order creates
    /// a new one.
    pub async fn forget_account(&self) {
        *self.account.lock().await = None;
        self.store.forget_account(&self.directory);
    }

    /// When to renew `cert`: inside ARI's suggested window when the CA offers one, else one
    /// third of the lifetime before expiry.
    pub async fn renew_at(&self, cert: &Parsed) -> u64 {
        let third = cert.renew_at_third();
        let Some(leaf) = cert.key.cert.first() else {
            return third;
        };
        let Ok(id) = CertificateIdentifier::try_from(leaf) else {
            return third;
        };
        let Ok(account) = self.account().await else {
            return third;
        };
        match tokio::time::timeout(ACCOUNT_TIMEOUT, account.renewal_info(&id)).await {
            Ok(Ok((info, _))) => {
                let start = info.suggested_window.start.unix_timestamp().max(0) as u64;
                let end = (info.suggested_window.end.unix_timestamp().max(0) as u64).max(start);
                // A random point in the window spreads renewals, as RFC 9773 asks.
                start + fastrand::u64(0..=(end - start))
            }
            _ => third,
        }
    }
}

/// The wait after `failures` failed attempts in a row: `min`, doubling, capped at `max`.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    min.saturating_mul(1u32 << exp).min(max)
}

/// When the per-hour cap allows the next order (`now` when it does already). Also drops
/// orders older than an hour from `orders`.
pub fn cap_free_at(orders: &mut Vec<u64>, now: u64, per_hour: u32) -> u64 {
    orders.retain(|t| now.saturating_sub(*t) < 3600);
    if (orders.len() as u64) < u64::from(per_hour.max(1)) {
        return now;
    }
    orders.iter().min().map_or(now, |oldest| oldest + 3600)
}

/// The life of one host's certificate (see the module docs). Ends when the host's slot is
/// dropped (its handle aborts this task) or the proxy goes away.
pub async fn host_task(tls: Weak<Tls>, acme: Arc<Acme>, id: u64, project: String, host: String) {
    let store = acme.store.clone();
    let mut meta = store.host_meta(&project, &host);
    loop {
        let Some(served) = tls.upgrade().map(|t| t.served(&host, id)) else {
            return;
        };
        let now = unix_now();
        let mut due = now;
        let mut renew_at = None;
        if let Some(cert) = &served {
            let at = acme.renew_at(cert).await;
            renew_at = Some(at);
            due = at;
        }
        let failing = meta.failures > 0;
        if let (true, Some(n)) = (failing, meta.next_attempt) {
            due = due.max(n);
        }
        let capped = cap_free_at(&mut meta.orders, now, acme.settings.orders_per_hour);
        let next_attempt = (failing || capped > now).then_some(due.max(capped));
        due = due.max(capped);
        if let Some(t) = tls.upgrade() {
            t.report(&host, id, |s| {
                *s.renew_at = renew_at;
                *s.next_attempt = next_attempt.filter(|n| *n > now);
                *s.last_error = meta.last_error.clone();
            });
        }
        if due > now {
            let wait = Duration::from_secs(due - now).min(RECHECK);
            tokio::time::sleep(wait).await;
            continue;
        }
        match order::obtain(&acme, &tls, &project, &host, &mut meta).await {
            Ok(issued) => {
                let Some(t) = tls.upgrade() else { return };
                let renew = acme.renew_at(&issued.cert).await;
                meta = HostMeta {
                    source: "acme".into(),
                    directory: Some(acme.directory.clone()),
                    sha256: Some(issued.cert.sha256.clone()),
                    issuer: Some(issued.cert.issuer.clone()),
                    not_before: Some(issued.cert.not_before),
                    not_after: Some(issued.cert.not_after),
                    renew_at: Some(renew),
                    challenge: Some(issued.challenge.to_string()),
                    orders: std::mem::take(&mut meta.orders),
                    failures: 0,
                    last_error: None,
                    next_attempt: None,
                };
                if let Err(e) = store.save_host_meta(&project, &host, &meta) {
                    crate::log::warn(
                        "certificate meta not saved",
                        serde_json::json!({"project": project, "host": host, "error": e}),
                    );
                }
                crate::log::info(
                    "certificate issued",
                    serde_json::json!({"project": project, "host": host, "issuer": issued.cert.issuer, "not_after": issued.cert.not_after, "challenge": issued.challenge}),
                );
                t.install(&host, id, issued.cert, renew);
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
                meta.next_attempt = Some(now + wait.as_secs().max(1));
                meta.last_error = Some(reason.clone());
                if let Err(e) = store.save_host_meta(&project, &host, &meta) {
                    crate::log::warn(
                        "certificate meta not saved",
                        serde_json::json!({"project": project, "host": host, "error": e}),
                    );
                }
                crate::log::warn(
                    "certificate order failed",
                    serde_json::json!({"project": project, "host": host, "reason": reason, "retry_in_s": wait.as_secs()}),
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
}
