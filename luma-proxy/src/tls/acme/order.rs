//! One host's order: new order, one challenge answered, finalize with our own key, download.
//!
//! Challenges are answered by the proxy itself: HTTP-01 tokens and TLS-ALPN-01 certificates
//! go into the [`CertBook`] for the length of the order only (a guard takes them out however
//! the order ends, abort included). The certificate key is a fresh ECDSA P-256 key per order,
//! generated here; the CA only ever sees the CSR.
//!
//! For a project with a shared account key, every proxy of the project also answers this
//! order's HTTP-01 token without knowing it (stateless, see `account`), so the CA may reach
//! any of the project's servers. A TLS-ALPN-01 certificate exists only here: with several
//! servers that order succeeds only if the CA's connection reaches this one.

use super::{blocking, cap_free_at, Acme, HostRef};
use crate::tls::book::CertBook;
use crate::tls::certs::{unix_now, Parsed};
use crate::tls::store::{HostMeta, OrderHistory};
use crate::tls::Tls;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Error, Identifier, NewOrder, Order, OrderStatus,
    Problem, RetryPolicy,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long the CA may take to validate, and then to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);
const ISSUE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on a whole order, every request included.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);

/// A certificate just issued.
pub struct Issued {
    pub cert: Parsed,
    pub challenge: &'static str,
    /// Whether the CA validated a challenge for this order. False when it reused an
    /// authorization still valid from an earlier order of the account (RFC 8555 lets a CA do
    /// so, and Let's Encrypt does for a while after a validation), so no challenge was
    /// answered and `challenge` is only the type that would have been.
    pub validated: bool,
}

/// A finished order: the chain and key PEMs, and whether a challenge was answered.
struct Placed {
    chain: String,
    key: String,
    validated: bool,
}

/// Why one order failed.
enum Failure {
    /// The CA could not validate the challenge: the other type may work.
    Challenge(String),
    /// The CA does not know the account (it was deactivated, or a test CA restarted): make
    /// a new one and order again.
    AccountGone(String),
    /// Anything else (the CA unreachable, a refusal, a rate limit): back off.
    Other(String),
}

/// The ACME problem type (RFC 8555 section 6.7) of an account the CA does not know.
const ACCOUNT_DOES_NOT_EXIST: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

/// Sorts a client error: an unknown account by its problem type (never by the words of its
/// detail, which are the CA's own); the rest is a failure to back off from.
fn failure(e: Error) -> Failure {
    match &e {
        Error::Api(p) if p.r#type.as_deref() == Some(ACCOUNT_DOES_NOT_EXIST) => {
            Failure::AccountGone(words(p))
        }
        e => Failure::Other(error_words(e)),
    }
}

fn name(c: &ChallengeType) -> &'static str {
    match c {
        ChallengeType::TlsAlpn01 => "tls-alpn-01",
        _ => "http-01",
    }
}

/// The CA's words for a problem: its detail, else the whole problem.
fn words(p: &Problem) -> String {
    p.detail.clone().unwrap_or_else(|| p.to_string())
}

fn error_words(e: &Error) -> String {
    match e {
        Error::Api(p) => words(p),
        e => e.to_string(),
    }
}

/// Orders a certificate for the host: the remembered (or HTTP-01) challenge first, the other
/// at once if that one's validation fails. No order is placed past the hourly cap, and every
/// order is recorded in `history` (and saved) before the CA sees it.
pub async fn obtain(
    acme: &Acme,
    tls: &Weak<Tls>,
    h: &HostRef,
    meta: &mut HostMeta,
    history: &mut OrderHistory,
) -> Result<Issued, String> {
    let (book, metrics) = tls
        .upgrade()
        .map(|t| (t.book.clone(), t.metrics.clone()))
        .ok_or("the proxy is stopping")?;
    let first = if meta.challenge.as_deref() == Some("tls-alpn-01") {
        ChallengeType::TlsAlpn01
    } else {
        ChallengeType::Http01
    };
    let second = match first {
        ChallengeType::TlsAlpn01 => ChallengeType::Http01,
        _ => ChallengeType::TlsAlpn01,
    };
    let mut reasons = Vec::new();
    for challenge in [first, second] {
        let now = unix_now();
        if cap_free_at(&mut history.orders, now, acme.settings.orders_per_hour) > now {
            reasons.push(format!(
                "no {} order: {} orders in the last hour (--acme-orders-per-hour)",
                name(&challenge),
                history.orders.len()
            ));
            break;
        }
        history.orders.push(now);
        let (store, host, saved) = (acme.store.clone(), h.host.clone(), history.clone());
        blocking(move || store.save_order_history(&host, &saved))
            .await
            .and_then(|r| r)
            .map_err(|e| format!("the order was not placed: {e}"))?;
        crate::log::info(
            "certificate order placed",
            serde_json::json!({"project": h.project, "host": h.host, "challenge": name(&challenge), "directory": acme.directory}),
        );
        let attempt =
            tokio::time::timeout(ORDER_TIMEOUT, with_account(acme, &book, h, &challenge)).await;
        metrics.count_acme_order(matches!(attempt, Ok(Ok(_))));
        match attempt {
            Ok(Ok(Placed {
                chain,
                key,
                validated,
            })) => {
                let cert = Parsed::from_pem(&chain, &key)
                    .map_err(|e| format!("the CA's certificate is unusable: {e}"))?;
                let (store, p, host) = (acme.store.clone(), h.project.clone(), h.host.clone());
                blocking(move || store.save_host_cert(&p, &host, &chain, &key)).await??;
                return Ok(Issued {
                    cert,
                    challenge: name(&challenge),
                    validated,
                });
            }
            Ok(Err(Failure::Challenge(r))) => reasons.push(format!("{}: {r}", name(&challenge))),
            Ok(Err(Failure::Other(r) | Failure::AccountGone(r))) => {
                reasons.push(r);
                break;
            }
            Err(_) => {
                reasons.push(format!(
                    "the order did not finish within {}s",
                    ORDER_TIMEOUT.as_secs()
                ));
                break;
            }
        }
    }
    Err(reasons.join("; "))
}

/// One order, with the project's account (see `Acme::account_for`); an account the CA no longer knows is replaced once (by
/// whichever task notices first: see `Acme::forget_account`).
async fn with_account(
    acme: &Acme,
    book: &Arc<CertBook>,
    h: &HostRef,
    challenge: &ChallengeType,
) -> Result<Placed, Failure> {
    let mut gone = None;
    for retry in [false, true] {
        let account = acme.account_for(&h.project).await.map_err(Failure::Other)?;
        match place(&account, book, h, challenge).await {
            Err(Failure::AccountGone(r)) if !retry => {
                acme.forget_account(&account).await;
                gone = Some(r);
            }
            r => return r,
        }
    }
    Err(Failure::Other(format!(
        "the CA does not know the ACME account, even a new one: {}",
        gone.unwrap_or_default()
    )))
}

/// Takes a finished order's challenges out of the book, however the order ended.
struct Answers {
    book: Arc<CertBook>,
    tokens: Vec<String>,
    /// The host and slot id of a TLS-ALPN-01 certificate put in the book.
    alpn: Option<(String, u64)>,
}

impl Drop for Answers {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.book.remove_token(t);
        }
        if let Some((host, slot)) = &self.alpn {
            self.book.remove_alpn_challenge(host, *slot);
        }
    }
}

/// The TLS-ALPN-01 certificate (RFC 8737): self-signed for `host`, with the critical
/// acmeIdentifier extension holding the SHA-256 of the key authorization.
fn alpn_certificate(host: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("challenge key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
        .map_err(|e| format!("challenge certificate for {host}: {e}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("challenge certificate for {host}: {e}"))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

async fn place(
    account: &Account,
    book: &Arc<CertBook>,
    h: &HostRef,
    challenge: &ChallengeType,
) -> Result<Placed, Failure> {
    let host = h.host.as_str();
    let other = failure;
    let ids = [Identifier::Dns(host.to_string())];
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(other)?;
    let mut answers = Answers {
        book: book.clone(),
        tokens: Vec::new(),
        alpn: None,
    };
    let mut validated = false;
    {
        let mut auths = order.authorizations();
        while let Some(a) = auths.next().await {
            let mut a = a.map_err(other)?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                s => {
                    return Err(Failure::Other(format!(
                        "the CA's authorization for {host} is {s:?}"
                    )))
                }
            }
            let mut c = a.challenge(challenge.clone()).ok_or_else(|| {
                Failure::Challenge(format!("the CA offers no {} challenge", name(challenge)))
            })?;
            let ka = c.key_authorization();
            match challenge {
                ChallengeType::TlsAlpn01 => {
                    let cert =
                        alpn_certificate(host, ka.digest().as_ref()).map_err(Failure::Other)?;
                    book.add_alpn_challenge(host, h.id, cert);
                    answers.alpn = Some((host.to_string(), h.id));
                }
                _ => {
                    book.add_token(&c.token, host, ka.as_str());
                    answers.tokens.push(c.token.clone());
                }
            }
            c.set_ready().await.map_err(other)?;
            validated = true;
        }
    }
    let policy = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(VALIDATION_TIMEOUT);
    let failed = match order.poll_ready(&policy).await {
        Ok(OrderStatus::Ready) => None,
        Ok(status) => Some(format!("the order is {status:?}")),
        Err(Error::Api(p)) if p.r#type.as_deref() != Some(ACCOUNT_DOES_NOT_EXIST) => {
            Some(words(&p))
        }
        Err(Error::Timeout(_)) => {
            return Err(Failure::Other(format!(
                "the CA did not validate {host} within {}s",
                VALIDATION_TIMEOUT.as_secs()
            )))
        }
        Err(e) => return Err(other(e)),
    };
    if let Some(fallback) = failed {
        let why = challenge_errors(&mut order).await;
        return Err(Failure::Challenge(if why.is_empty() {
            fallback
        } else {
            why
        }));
    }
    drop(answers);
    let key = rcgen::KeyPair::generate().map_err(|e| Failure::Other(format!("key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
        .map_err(|e| Failure::Other(format!("CSR for {host}: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Failure::Other(format!("CSR for {host}: {e}")))?;
    order.finalize_csr(csr.der()).await.map_err(other)?;
    let policy = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(ISSUE_TIMEOUT);
    let chain = order.poll_certificate(&policy).await.map_err(other)?;
    Ok(Placed {
        chain,
        key: key.serialize_pem(),
        validated,
    })
}

/// The CA's reasons for failed challenges of an order (fresh from the CA).
async fn challenge_errors(order: &mut Order) -> String {
    let mut out = Vec::new();
    let mut auths = order.authorizations();
    while let Some(a) = auths.next().await {
        let Ok(mut a) = a else { continue };
        if let Ok(state) = a.refresh().await {
            for c in &state.challenges {
                if let Some(p) = &c.error {
                    out.push(words(p));
                }
            }
        }
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: &str, detail: &str) -> Error {
        Error::Api(
            serde_json::from_value(
                serde_json::json!({"type": kind, "detail": detail, "status": 400}),
            )
            .unwrap(),
        )
    }

    #[test]
    fn an_unknown_account_is_known_by_its_problem_type() {
        let gone = problem(ACCOUNT_DOES_NOT_EXIST, "unable to find account with ID 7");
        assert!(matches!(failure(gone), Failure::AccountGone(r) if r.contains("ID 7")));
        // The detail is the CA's prose: mentioning the type name there is no such problem.
        let other = problem(
            "urn:ietf:params:acme:error:malformed",
            "accountDoesNotExist is not what happened",
        );
        assert!(matches!(failure(other), Failure::Other(_)));
        assert!(matches!(
            failure(Error::Other("connection refused".into())),
            Failure::Other(_)
        ));
    }
}
