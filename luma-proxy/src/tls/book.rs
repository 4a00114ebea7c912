//! The SNI certificate book: which certificate a handshake gets, read lock-free.
//!
//! The book holds one snapshot (swapped whole, like the routing table) of host pattern ->
//! certificate, built by [`super::Tls`] from the routes and the certificates it holds, so a
//! host's certificate is served only for that host's SNI and only while the host belongs to
//! the project the certificate was obtained for. Lookups follow the router's rule: a name that
//! is the exact host of some route gets that host's own certificate; without one (no `tls`,
//! or its certificate still pending) it falls back to the one-level wildcard `*.parent` only
//! when that wildcard's certificate is of the exact host's own project (never another
//! project's: after a restore, another project's `*.parent` may overlap it); a name no route
//! names exactly falls back to the wildcard as usual. An unknown or missing SNI gets no
//! certificate: rustls then fails the handshake with an alert (there is no default
//! certificate to leak).
//!
//! A resumed session never asks the book (no certificate is sent), so the HTTPS listener asks
//! it again after every handshake ([`CertBook::admit`]) and keeps the answer for the
//! connection: each request's Host must be covered by that certificate and routed to its
//! project (see `proxy`), else it is answered 421.
//!
//! Beside it, the ACME challenges in flight: TLS-ALPN-01 certificates (served only to a client
//! that offers `acme-tls/1` alone, as validators do), tagged with the slot that ordered them,
//! and HTTP-01 tokens (answered only for the host they were ordered for). And the stateless
//! HTTP-01 answers: the ACME hosts of projects with a shared account key, each with that
//! key's thumbprint, so any well-formed token for such a host is answered whichever proxy of
//! the project ordered it (see `account` for why that is safe).

use arc_swap::ArcSwap;
use dashmap::DashMap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// One host's certificate as served.
#[derive(Clone)]
pub struct Entry {
    pub key: Arc<CertifiedKey>,
    /// Unix seconds; past it the certificate is still presented in a full handshake (the
    /// client sees why it fails) but no longer counts as usable (no redirect to HTTPS, and
    /// the connection is closed after the handshake).
    pub not_after: u64,
    /// The project of the route whose host this certificate is for.
    pub project: Arc<str>,
    /// The leaf's DNS names: the hosts a request on a connection with it may name.
    pub names: Arc<[String]>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("project", &self.project)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// Whether a request for `host` (normalized) may be served on a connection that
    /// presented this certificate: the certificate covers it, and the host's route (if any)
    /// is in the certificate's project. HTTP/2 clients reuse a connection for every name the
    /// certificate covers, which holds within one project and is refused (421) across.
    pub fn serves(&self, host: &str, route_project: Option<&str>) -> bool {
        luma_api::names::certificate_covers(&self.names, host)
            && route_project.is_none_or(|p| p == &*self.project)
    }
}

/// An exact route host: its route's project, and its own certificate if it has one.
struct Exact {
    project: Arc<str>,
    own: Option<Entry>,
}

#[derive(Default)]
struct Snapshot {
    exact: HashMap<String, Exact>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Entry>,
}

#[derive(Default)]
pub struct CertBook {
    served: ArcSwap<Snapshot>,
    /// Host -> (slot id, TLS-ALPN-01 certificate) of an order in flight.
    alpn: DashMap<String, (u64, Arc<CertifiedKey>)>,
    /// Token -> (host, key authorization) of an HTTP-01 order in flight.
    tokens: DashMap<String, (String, String)>,
    /// Exact ACME host -> the thumbprint of its project's shared account key.
    stateless: ArcSwap<HashMap<String, Arc<str>>>,
}

impl std::fmt::Debug for CertBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertBook")
    }
}

impl CertBook {
    /// Replaces what is served with `hosts`: (host pattern, its route's project, its
    /// certificate). Every exact host of every route is listed, with or without a
    /// certificate, so that a wildcard certificate of another project is never served for it.
    pub fn publish(&self, hosts: impl IntoIterator<Item = (String, Arc<str>, Option<Entry>)>) {
        let mut s = Snapshot::default();
        for (h, project, e) in hosts {
            match (h.strip_prefix("*."), e) {
                (Some(suffix), Some(e)) => {
                    s.wildcard.insert(suffix.to_string(), e);
                }
                (Some(_), None) => {}
                (None, own) => {
                    s.exact.insert(h, Exact { project, own });
                }
            }
        }
        self.served.store(Arc::new(s));
    }

    /// The certificate for a server name (lowercase, no trailing dot).
    pub fn lookup(&self, name: &str) -> Option<Entry> {
        let s = self.served.load();
        let exact = s.exact.get(name);
        if let Some(own) = exact.and_then(|x| x.own.as_ref()) {
            return Some(own.clone());
        }
        let (_, parent) = name.split_once('.')?;
        let wildcard = s.wildcard.get(parent)?;
        // An exact host without a certificate of its own borrows its own project's wildcard
        // only.
        match exact {
            Some(x) if x.project != wildcard.project => None,
            _ => Some(wildcard.clone()),
        }
    }

    /// The certificate a finished handshake for `sni` may go on with: the one the book has
    /// for it now, unexpired. `None`: close the connection (the host left its route, moved,
    /// or its certificate expired; a resumed session would otherwise outlive all three).
    pub fn admit(&self, sni: &str, now: u64) -> Option<Entry> {
        self.lookup(&normalize(sni)).filter(|e| e.not_after > now)
    }

    /// Whether plain HTTP for `host`, routed to `project`, may be redirected: what a handshake
    /// for `host` would be served ([`CertBook::lookup`]: its own certificate, or its project's
    /// wildcard) is in that project and has not expired.
    pub fn usable(&self, host: &str, project: &str, now: u64) -> bool {
        self.lookup(host)
            .is_some_and(|e| e.not_after > now && &*e.project == project)
    }

    /// Serves a TLS-ALPN-01 certificate for `host` on behalf of the slot `slot`.
    pub fn add_alpn_challenge(&self, host: &str, slot: u64, key: Arc<CertifiedKey>) {
        self.alpn.insert(host.to_string(), (slot, key));
    }

    /// Takes out `host`'s TLS-ALPN-01 certificate if the slot `slot` put it there (a newer
    /// slot's order for the same host keeps its own).
    pub fn remove_alpn_challenge(&self, host: &str, slot: u64) {
        self.alpn.remove_if(host, |_, (s, _)| *s == slot);
    }

    pub fn add_token(&self, token: &str, host: &str, key_authorization: &str) {
        self.tokens.insert(
            token.to_string(),
            (host.to_string(), key_authorization.to_string()),
        );
    }

    pub fn remove_token(&self, token: &str) {
        self.tokens.remove(token);
    }

    /// Replaces the hosts answered statelessly: (exact ACME host, its project's thumbprint).
    pub fn publish_stateless(&self, hosts: HashMap<String, Arc<str>>) {
        self.stateless.store(Arc::new(hosts));
    }

    /// The key authorization for an HTTP-01 request (`host` normalized): a token the proxy
    /// ordered, when the request's host is the host it was ordered for; else, for an ACME host
    /// of a project with a shared account key, any well-formed token joined to that key's
    /// thumbprint.
    pub fn http01(&self, token: &str, host: &str) -> Option<String> {
        if let Some(t) = self.tokens.get(token).filter(|t| t.0 == host) {
            return Some(t.1.clone());
        }
        let stateless = self.stateless.load();
        let thumbprint = stateless.get(host)?;
        super::account::valid_token(token)
            .then(|| super::account::key_authorization(token, thumbprint))
    }

    /// Whether any HTTP-01 request could be answered ([`CertBook::http01`]): a cheap check
    /// before the lookup.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty() || !self.stateless.load().is_empty()
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl ResolvesServerCert for CertBook {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = normalize(hello.server_name()?);
        let only_acme = hello.alpn().is_some_and(|mut protocols| {
            protocols.next() == Some(ACME_TLS_ALPN) && protocols.next().is_none()
        });
        if only_acme {
            return self.alpn.get(&name).map(|k| k.1.clone());
        }
        self.lookup(&name).map(|e| e.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(project: &str, names: &[&str], not_after: u64) -> Entry {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        Entry {
            key: Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)),
            not_after,
            project: project.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_host_with_its_own_route_never_falls_back_to_another_projects_wildcard() {
        let book = CertBook::default();
        book.publish([
            (
                "*.shop.test".into(),
                "a".into(),
                Some(entry("a", &["*.shop.test"], 100)),
            ),
            // Project b's exact host, no certificate of its own yet.
            ("b.shop.test".into(), "b".into(), None),
        ]);
        assert!(
            book.lookup("b.shop.test").is_none(),
            "another project's wildcard"
        );
        assert!(!book.usable("b.shop.test", "b", 10));
        assert!(!book.usable("b.shop.test", "a", 10));
        assert_eq!(&*book.lookup("x.shop.test").unwrap().project, "a");
        assert!(book.usable("x.shop.test", "a", 10));
        assert!(
            !book.usable("x.shop.test", "b", 10),
            "the route's own project only"
        );
        assert!(!book.usable("x.shop.test", "a", 100), "expired");
        assert!(book.admit("X.shop.test.", 10).is_some());
        assert!(book.admit("x.shop.test", 100).is_none(), "expired");
        assert!(book.admit("b.shop.test", 10).is_none());
    }

    #[test]
    fn an_exact_host_without_a_certificate_borrows_its_own_projects_wildcard() {
        let book = CertBook::default();
        let own = entry("a", &["own.shop.test"], 100);
        book.publish([
            (
                "*.shop.test".into(),
                "a".into(),
                Some(entry("a", &["*.shop.test"], 100)),
            ),
            // Project a's exact hosts: no `tls`, or a certificate still pending.
            ("api.shop.test".into(), "a".into(), None),
            ("own.shop.test".into(), "a".into(), Some(own)),
        ]);
        let e = book.lookup("api.shop.test").expect("a's own wildcard");
        assert_eq!(&*e.names, ["*.shop.test".to_string()]);
        assert!(book.usable("api.shop.test", "a", 10), "redirect agrees");
        assert!(!book.usable("api.shop.test", "a", 100), "expired");
        assert!(book.admit("api.shop.test", 10).is_some());
        assert_eq!(
            &*book.lookup("own.shop.test").unwrap().names,
            ["own.shop.test".to_string()],
            "its own certificate first"
        );
    }

    #[test]
    fn requests_stay_within_the_certificates_names_and_project() {
        let e = entry("a", &["a.test", "www.a.test"], 100);
        assert!(e.serves("a.test", Some("a")));
        assert!(
            e.serves("www.a.test", Some("a")),
            "h2 coalescing within a project"
        );
        assert!(!e.serves("www.a.test", Some("b")));
        assert!(!e.serves("b.test", Some("a")));
        assert!(e.serves("a.test", None), "no route: 404, not 421");
    }

    #[test]
    fn stateless_answers_only_for_the_projects_acme_hosts_and_good_tokens() {
        let book = CertBook::default();
        assert!(!book.has_tokens());
        book.add_token("ordered", "b.test", "ordered.other-thumb");
        book.publish_stateless(HashMap::from([
            ("a.test".to_string(), Arc::from("thumb-a")),
            ("a2.test".to_string(), Arc::from("thumb-a")),
        ]));
        assert!(book.has_tokens());
        let tok = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
        assert_eq!(
            book.http01(tok, "a.test").as_deref(),
            Some(format!("{tok}.thumb-a").as_str()),
            "a token this proxy never ordered"
        );
        assert!(book.http01(tok, "a2.test").is_some());
        // Another project's host, a host without ACME, an unknown host: as before.
        assert_eq!(book.http01(tok, "b.test"), None);
        assert_eq!(book.http01(tok, "c.test"), None);
        assert_eq!(
            book.http01("ordered", "b.test").as_deref(),
            Some("ordered.other-thumb")
        );
        // A token ordered here for another host gets the stateless answer on a.test.
        assert_eq!(
            book.http01("ordered", "a.test").as_deref(),
            Some("ordered.thumb-a")
        );
        for bad in ["", "a/b", "a.b", "../etc", &"x".repeat(129)] {
            assert_eq!(book.http01(bad, "a.test"), None, "{bad}");
        }
        book.publish_stateless(HashMap::new());
        book.remove_token("ordered");
        assert!(!book.has_tokens());
        assert_eq!(book.http01(tok, "a.test"), None);
    }

    #[test]
    fn an_old_slots_challenge_cleanup_leaves_a_newer_one() {
        let book = CertBook::default();
        let e = entry("a", &["a.test"], 100);
        book.add_alpn_challenge("a.test", 1, e.key.clone());
        book.add_alpn_challenge("a.test", 2, e.key.clone());
        book.remove_alpn_challenge("a.test", 1);
        assert_eq!(book.alpn.get("a.test").map(|v| v.0), Some(2));
        book.remove_alpn_challenge("a.test", 2);
        assert!(book.alpn.get("a.test").is_none());
    }
}
