//! The SNI certificate book: which certificate a handshake gets, read lock-free.
//!
//! The book holds one snapshot (swapped whole, like the routing table) of host pattern ->
//! certificate, built by [`super::Tls`] from the routes and the certificates it holds, so a
//! host's certificate is served only for that host's SNI and only while the host belongs to
//! the project the certificate was obtained for. Lookups are exact first, then a one-level
//! wildcard pattern, the router's rule. An unknown or missing SNI gets no certificate: rustls
//! then fails the handshake with an alert (there is no default certificate to leak).
//!
//! Beside it, the ACME challenges in flight: TLS-ALPN-01 certificates (served only to a client
//! that offers `acme-tls/1` alone, as validators do) and HTTP-01 tokens (answered only for the
//! host they were ordered for).

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
    /// Unix seconds; past it the certificate is still served but no longer counts as usable
    /// (no redirect to HTTPS).
    pub not_after: u64,
}

#[derive(Default)]
struct Snapshot {
    exact: HashMap<String, Entry>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Entry>,
}

#[derive(Default)]
pub struct CertBook {
    served: ArcSwap<Snapshot>,
    /// Host -> TLS-ALPN-01 certificate of an order in flight.
    alpn: DashMap<String, Arc<CertifiedKey>>,
    /// Token -> (host, key authorization) of an HTTP-01 order in flight.
    tokens: DashMap<String, (String, String)>,
}

impl std::fmt::Debug for CertBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertBook")
    }
}

impl CertBook {
    /// Replaces what is served with `hosts` (host pattern -> certificate).
    pub fn publish(&self, hosts: impl IntoIterator<Item = (String, Entry)>) {
        let mut s = Snapshot::default();
        for (h, e) in hosts {
            match h.strip_prefix("*.") {
                Some(suffix) => s.wildcard.insert(suffix.to_string(), e),
                None => s.exact.insert(h, e),
            };
        }
        self.served.store(Arc::new(s));
    }

    /// The certificate for a server name (lowercase, no trailing dot).
    pub fn lookup(&self, name: &str) -> Option<Entry> {
        let s = self.served.load();
        if let Some(e) = s.exact.get(name) {
            return Some(e.clone());
        }
        let (_, parent) = name.split_once('.')?;
        s.wildcard.get(parent).cloned()
    }

    /// Whether plain HTTP for `host` may be redirected: a certificate that has not expired.
    pub fn usable(&self, host: &str, now: u64) -> bool {
        self.lookup(host).is_some_and(|e| e.not_after > now)
    }

    pub fn add_alpn_challenge(&self, host: &str, key: Arc<CertifiedKey>) {
        self.alpn.insert(host.to_string(), key);
    }

    pub fn remove_alpn_challenge(&self, host: &str) {
        self.alpn.remove(host);
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

    /// The key authorization for an HTTP-01 request: only for a token the proxy ordered, and
    /// only when the request's host is the host it was ordered for.
    pub fn http01(&self, token: &str, host: &str) -> Option<String> {
        let t = self.tokens.get(token)?;
        (t.0 == host).then(|| t.1.clone())
    }

    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
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
            return self.alpn.get(&name).map(|k| k.clone());
        }
        self.lookup(&name).map(|e| e.key)
    }
}
