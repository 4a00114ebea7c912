//! A certificate chain and key as the proxy serves them: parsed once, checked, summarized.
//!
//! [`Parsed::from_pem`] turns PEM text into what rustls serves (a [`CertifiedKey`] whose key is
//! checked against the leaf) plus the facts the rest of the proxy asks about: the leaf's
//! SHA-256 (how a custom certificate is named), its validity, issuer and DNS names.
//! [`Parsed::covers`] applies the one-label wildcard rule (shared with `luma`, in `luma_api`),
//! and [`Parsed::check_custom`] is the deploy gate's whole judgement of a custom certificate,
//! with reasons a user can act on.

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::sync::Arc;
use x509_parser::extensions::GeneralName;

/// A chain and its key, checked to belong together.
#[derive(Clone)]
pub struct Parsed {
    pub key: Arc<CertifiedKey>,
    /// Lowercase hex SHA-256 of the leaf's DER.
    pub sha256: String,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
    /// The issuer's common name, or its whole DN when it has none.
    pub issuer: String,
    /// DNS names of the leaf's subjectAltName (lowercase), wildcards as `*.example.com`.
    pub names: Vec<String>,
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("sha256", &self.sha256)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

pub fn sha256_hex(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unix_now() -> u64 {
    luma_api::time::unix_now()
}

impl Parsed {
    /// Parses a chain (leaf first) and its private key. Errors never quote the key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Parsed, String> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the certificate chain is not valid PEM ({e})"))?;
        if chain.is_empty() {
            return Err("the certificate PEM holds no CERTIFICATE block".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
            "the private key is not a PEM private key (PKCS#8, PKCS#1 or SEC1)".to_string()
        })?;
        Parsed::from_der(chain, key)
    }

    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Parsed, String> {
        let leaf = chain.first().ok_or("the certificate chain is empty")?;
        let sha256 = sha256_hex(leaf.as_ref());
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| format!("the leaf certificate cannot be parsed: {e}"))?;
        let validity = x509.validity();
        let not_before = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
        let not_after = u64::try_from(validity.not_after.timestamp()).unwrap_or(0);
        let issuer = x509
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| x509.issuer().to_string());
        let mut names = Vec::new();
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for n in &san.value.general_names {
                if let GeneralName::DNSName(d) = n {
                    names.push(d.trim_end_matches('.').to_ascii_lowercase());
                }
            }
        }
        let signing = any_supported_type(&key).map_err(|_| {
            "the private key is of a type the proxy cannot use (RSA, ECDSA P-256/P-384 or Ed25519)"
                .to_string()
        })?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(format!(
                    "the private key does not belong to the certificate (sha256 {sha256})"
                ))
            }
        }
        Ok(Parsed {
            key: Arc::new(certified),
            sha256,
            not_before,
            not_after,
            issuer,
            names,
        })
    }

    /// Whether the certificate is valid for the host pattern `host`: the one rule,
    /// [`luma_api::names::certificate_covers`] (one-label wildcards; a wildcard host pattern
    /// needs the same wildcard name).
    pub fn covers(&self, host: &str) -> bool {
        luma_api::names::certificate_covers(&self.names, host)
    }

    /// The deploy gate's check of a custom certificate for a route's hosts at time `now`.
    pub fn check_custom(&self, sha256: &str, hosts: &[String], now: u64) -> Result<(), String> {
        let want = sha256.trim().to_ascii_lowercase();
        if self.sha256 != want {
            return Err(format!(
                "the certificate's leaf has sha256 {}, but route.tls names {want}: send the certificate the route names",
                self.sha256
            ));
        }
        if now < self.not_before {
            return Err(format!(
                "the certificate is not valid yet (not before {})",
                luma_api::time::display(self.not_before)
            ));
        }
        if now >= self.not_after {
            return Err(format!(
                "the certificate expired on {}",
                luma_api::time::display(self.not_after)
            ));
        }
        let missing: Vec<&str> = hosts
            .iter()
            .filter(|h| !self.covers(h))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the certificate does not cover {}; it covers {}",
                missing.join(", "),
                if self.names.is_empty() {
                    "no DNS names".to_string()
                } else {
                    self.names.join(", ")
                }
            ));
        }
        Ok(())
    }

    /// When to renew with no word from the CA: one third of the lifetime before expiry.
    pub fn renew_at_third(&self) -> u64 {
        let life = self.not_after.saturating_sub(self.not_before);
        self.not_after.saturating_sub(life / 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let c = params.self_signed(&key).unwrap();
        (c.pem(), key.serialize_pem())
    }

    #[test]
    fn wildcards_cover_one_label_only() {
        let (c, k) = cert(&["*.shop.test", "shop.test"]);
        let p = Parsed::from_pem(&c, &k).unwrap();
        assert!(p.covers("shop.test"));
        assert!(p.covers("a.shop.test"));
        assert!(p.covers("*.shop.test"));
        assert!(!p.covers("a.b.shop.test"));
        assert!(!p.covers("other.test"));
        let (c, k) = cert(&["a.shop.test"]);
        let p = Parsed::from_pem(&c, &k).unwrap();
        assert!(
            !p.covers("*.shop.test"),
            "a wildcard route needs a wildcard name"
        );
    }

    #[test]
    fn custom_check_names_the_reason() {
        let (c, k) = cert(&["a.test"]);
        let p = Parsed::from_pem(&c, &k).unwrap();
        let now = unix_now();
        assert!(p
            .check_custom(&p.sha256.to_uppercase(), &["a.test".into()], now)
            .is_ok());
        let e = p
            .check_custom(&p.sha256, &["a.test".into(), "b.test".into()], now)
            .unwrap_err();
        assert!(e.contains("does not cover b.test; it covers a.test"), "{e}");
        let e = p.check_custom("00", &["a.test".into()], now).unwrap_err();
        assert!(e.contains("names 00"), "{e}");
        let e = p
            .check_custom(&p.sha256, &["a.test".into()], p.not_after + 1)
            .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let (_, other_key) = cert(&["a.test"]);
        let e = Parsed::from_pem(&c, &other_key).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        assert!(!e.contains("PRIVATE"), "{e}");
        assert!(Parsed::from_pem("junk", &k).is_err());
    }
}
