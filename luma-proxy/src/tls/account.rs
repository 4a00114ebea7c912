//! A project's shared ACME account, and the stateless HTTP-01 answers it makes possible.
//!
//! The job: an app deployed to several servers, each with its own proxy, gets certificates
//! even though the CA's HTTP-01 validation may reach any of the servers (DNS round robin, a
//! load balancer), not the one that placed the order. So every proxy of the project uses one
//! account key, sent by `luma` with every deploy of the project's ACME routes
//! (`DeployRequest::acme_account`) and kept per project in the state volume; and every proxy
//! answers any well-formed token under `/.well-known/acme-challenge/` for the project's ACME
//! hosts with `<token>.<thumbprint>` ([`key_authorization`]), whether or not it ordered that
//! token. Each proxy still orders and renews its own certificates on its own clock, with no
//! `luma` present.
//!
//! Why answering tokens nobody ordered here is safe: a key authorization is the token joined
//! to the account key's public thumbprint (RFC 8555 section 8.1). The CA accepts it only as
//! proof for an order placed by that same account, i.e. signed with the project's private
//! key; to anyone else it proves nothing, and the thumbprint is public anyway (every HTTP-01
//! answer shows it). So the answer grants nothing a holder of the private key could not do
//! already. It is acme.sh's `--stateless` mode, with the key shared by the project's proxies.
//! Answers stay within the project: another project's hosts (with their own key or none)
//! never get this thumbprint, and hosts without an ACME route answer as before.
//!
//! TLS-ALPN-01 cannot work this way: its challenge certificate carries the digest of the key
//! authorization, so it can only be made for a token the proxy knows, and only the ordering
//! proxy knows it. With several servers a TLS-ALPN-01 order succeeds only when the CA's
//! connection reaches the server that placed it; HTTP-01 is tried first and is the one that
//! works from any server.
//!
//! A project without a key keeps the proxy-wide account (see `acme`), answering only the
//! tokens it ordered.

use super::store::Store;
use luma_api::tls::AcmeAccountKey;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The longest token answered statelessly. Tokens are base64url (RFC 8555 section 8.3), at
/// least 128 bits of entropy: 43 characters at Let's Encrypt.
pub const MAX_TOKEN_LEN: usize = 128;

/// Whether `token` could be an ACME token: 1..=[`MAX_TOKEN_LEN`] characters of the base64url
/// alphabet, nothing else (no `/`, `.`, `%`, padding).
pub fn valid_token(token: &str) -> bool {
    (1..=MAX_TOKEN_LEN).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `<token>.<thumbprint>`: the HTTP-01 answer (RFC 8555 section 8.3).
pub fn key_authorization(token: &str, thumbprint: &str) -> String {
    format!("{token}.{thumbprint}")
}

/// A project's account key, checked: ECDSA P-256 in PKCS#8. `Debug` never shows the key.
pub struct ProjectKey {
    /// PKCS#8 DER.
    der: Vec<u8>,
    /// base64url(SHA-256) of the public key's JWK (RFC 7638).
    pub thumbprint: Arc<str>,
}

impl std::fmt::Debug for ProjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectKey")
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ProjectKey {
    fn eq(&self, other: &ProjectKey) -> bool {
        self.der == other.der
    }
}

impl ProjectKey {
    /// Reads a PEM key. The error names what is wrong and never quotes the input (it is a
    /// private key).
    pub fn from_pem(pem: &str) -> Result<ProjectKey, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
            "not a PKCS#8 PEM key: expected one -----BEGIN PRIVATE KEY----- block (convert a SEC1 \"EC PRIVATE KEY\" with `openssl pkcs8 -topk8 -nocrypt`)".to_string()
        })?;
        let der = der.secret_pkcs8_der().to_vec();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| format!("not an ECDSA P-256 key ({e}); ACME accounts here are P-256"))?;
        let thumbprint = jwk_thumbprint(pair.public_key().as_ref())
            .ok_or("not an uncompressed P-256 public key")?;
        Ok(ProjectKey {
            der,
            thumbprint: thumbprint.into(),
        })
    }

    /// The key as stored and handed out: canonical PKCS#8 PEM (64 columns).
    pub fn to_pem(&self) -> String {
        let b64 = base64(&self.der, STANDARD);
        let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }

    pub fn to_api(&self) -> AcmeAccountKey {
        AcmeAccountKey {
            pkcs8_pem: self.to_pem(),
        }
    }

    /// The key as instant-acme takes it, to load (or create) the account it names.
    pub fn acme_key(
        &self,
    ) -> Result<(instant_acme::Key, rustls::pki_types::PrivateKeyDer<'static>), String> {
        let der = PrivatePkcs8KeyDer::from(self.der.clone());
        let key = instant_acme::Key::from_pkcs8_der(der.clone_key())
            .map_err(|e| format!("the project's ACME account key: {e}"))?;
        Ok((key, der.into()))
    }
}

/// RFC 7638 thumbprint of a P-256 public key given as the uncompressed point `04 || x || y`:
/// base64url of the SHA-256 of `{"crv":"P-256","kty":"EC","x":..,"y":..}` (members in
/// lexical order, no spaces).
pub fn jwk_thumbprint(point: &[u8]) -> Option<String> {
    let (&tag, xy) = point.split_first()?;
    if tag != 4 || xy.len() != 64 {
        return None;
    }
    let (x, y) = xy.split_at(32);
    let jwk = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        base64(x, URL_SAFE),
        base64(y, URL_SAFE)
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, jwk.as_bytes());
    Some(base64(digest.as_ref(), URL_SAFE))
}

const STANDARD: (&[u8; 64], bool) = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    true,
);
const URL_SAFE: (&[u8; 64], bool) = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    false,
);

/// Base64 with `alphabet`, padded or not (standard for PEM, unpadded base64url for JOSE).
fn base64(bytes: &[u8], (alphabet, pad): (&[u8; 64], bool)) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// The project keys this proxy holds: read from the store once per project, then kept in
/// memory (this process is the store's only writer).
pub struct ProjectKeys {
    store: Arc<Store>,
    cache: Mutex<HashMap<String, Option<Arc<ProjectKey>>>>,
}

impl ProjectKeys {
    pub fn new(store: Arc<Store>) -> ProjectKeys {
        ProjectKeys {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The project's key, if it has one. A stored key that no longer parses counts as none
    /// (logged): the project orders with the proxy-wide account until `luma` sends the key
    /// again with a deploy, which replaces the file. `Err`: the file exists but cannot be
    /// read (file I/O: call it off the async workers).
    pub fn get(&self, project: &str) -> Result<Option<Arc<ProjectKey>>, String> {
        if let Some(k) = self.cache.lock().ok().and_then(|c| c.get(project).cloned()) {
            return Ok(k);
        }
        let key = match self.store.account_key(project)? {
            None => None,
            Some(pem) => match ProjectKey::from_pem(&pem) {
                Ok(k) => Some(Arc::new(k)),
                Err(e) => {
                    crate::log::error(
                        "the stored ACME account key of a project is unusable; its orders use the proxy's own account until a deploy sends the key again",
                        serde_json::json!({"project": project, "file": self.store.account_key_path(project).ok().map(|p| p.display().to_string()), "error": e}),
                    );
                    None
                }
            },
        };
        if let Ok(mut c) = self.cache.lock() {
            c.insert(project.to_string(), key.clone());
        }
        Ok(key)
    }

    /// Stores `key` as the project's key (0600, atomic) unless it is already the one held.
    /// Returns whether it changed.
    pub fn set(&self, project: &str, key: &Arc<ProjectKey>) -> Result<bool, String> {
        let held = self.get(project).unwrap_or(None);
        if held.as_deref() == Some(&**key) {
            return Ok(false);
        }
        self.store.save_account_key(project, &key.to_pem())?;
        if let Ok(mut c) = self.cache.lock() {
            c.insert(project.to_string(), Some(key.clone()));
        }
        crate::log::info(
            if held.is_some() {
                "ACME account key of a project replaced"
            } else {
                "ACME account key of a project stored"
            },
            serde_json::json!({"project": project, "thumbprint": &*key.thumbprint}),
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ES256 key of RFC 7515 appendix A.3 (d = jpsQnnGQ..), as PKCS#8 PEM.
    const RFC7515_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgjpsQnnGQmL+YBIff
H1136cspYG6+0iY7X1fCE9+E9LKhRANCAAR/zc4ncPbEXUGDy+5v20t7WAczNXvp
7xO6z248e9FURcfxRM0bvZt+hyzf7bnuufSzaV1uqQskrYpGIyiFiOWt
-----END PRIVATE KEY-----
";
    /// Its RFC 7638 thumbprint, computed independently (Python's `cryptography`, `hashlib`,
    /// `base64`) from the JWK
    /// `{"crv":"P-256","kty":"EC","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}`.
    const RFC7515_THUMBPRINT: &str = "oKIywvGUpTVTyxMQ3bwIIeQUudfr_CkLMjCE19ECD-U";

    #[test]
    fn the_thumbprint_is_rfc_7638s() {
        let k = ProjectKey::from_pem(RFC7515_KEY).unwrap();
        assert_eq!(&*k.thumbprint, RFC7515_THUMBPRINT);
        // Canonical PEM round-trips to the same key.
        assert_eq!(k.to_pem(), RFC7515_KEY);
        assert_eq!(ProjectKey::from_pem(&k.to_pem()).unwrap(), k);
        // instant-acme takes the key (its thumbprint equals ours: pebble checks that in
        // tests/acme_pebble.rs, validating answers made with ours for orders signed by it).
        assert!(k.acme_key().is_ok());
        let mut point = vec![4u8];
        point.extend([1u8; 32]);
        point.extend([2u8; 32]);
        assert!(jwk_thumbprint(&point).is_some());
        assert!(jwk_thumbprint(&point[1..]).is_none(), "compressed or raw");
    }

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (raw, std, url) in [
            ("", "", ""),
            ("f", "Zg==", "Zg"),
            ("fo", "Zm8=", "Zm8"),
            ("foo", "Zm9v", "Zm9v"),
            ("foob", "Zm9vYg==", "Zm9vYg"),
            ("\u{fb}\u{ff}", "w7vDvw==", "w7vDvw"),
        ] {
            assert_eq!(base64(raw.as_bytes(), STANDARD), std, "{raw:?}");
            assert_eq!(base64(raw.as_bytes(), URL_SAFE), url, "{raw:?}");
        }
        assert_eq!(base64(&[0xfb, 0xff], STANDARD), "+/8=");
        assert_eq!(base64(&[0xfb, 0xff], URL_SAFE), "-_8");
    }

    #[test]
    fn only_p256_pkcs8_keys_are_accepted_and_errors_never_quote_the_key() {
        let p384 = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDCS/RvVzq9EnvEDaikg
ciUcEIy/TGd3ZZnX1M2jxEvKtRJztxupd9FtzQYEC4dLneKhZANiAASYMa1hvCTR
VjzFs62j8COShShyn4fTRXdpLduvdzTMnXBlzdgnCrpiB73NU2AV1tEQMa1++Wpg
VS0Z1nzp1BBK3wO+N7NazV0G/NDySDGgKX8MeyS5ofP3s1+kUL7BMuM=
-----END PRIVATE KEY-----
";
        let e = ProjectKey::from_pem(p384).unwrap_err();
        assert!(e.contains("P-256"), "{e}");
        let sec1 = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEII6bEJ5xkJi/mASH3x9dd+nLKWBuvtImO19XwhPfhPSyoAoGCCqGSM49
AwEHoUQDQgAEf83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEXH8UTNG72b
focs3+257rn0s2ldbqkLJK2KRiMohYjlrQ==
-----END EC PRIVATE KEY-----
";
        let e = ProjectKey::from_pem(sec1).unwrap_err();
        assert!(e.contains("PKCS#8") && e.contains("openssl pkcs8"), "{e}");
        let garbage = "-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n-----END PRIVATE KEY-----\n";
        let e = ProjectKey::from_pem(garbage).unwrap_err();
        assert!(!e.contains("SECRET"), "{e}");
        assert!(ProjectKey::from_pem("").is_err());
        for bad in [p384, sec1, garbage] {
            let e = ProjectKey::from_pem(bad).unwrap_err();
            assert!(!e.contains("MIG") && !e.contains("MHc"), "{e}");
        }
    }

    #[test]
    fn a_key_never_shows_in_debug() {
        let k = ProjectKey::from_pem(RFC7515_KEY).unwrap();
        let shown = format!("{k:?}");
        assert!(shown.contains(RFC7515_THUMBPRINT), "{shown}");
        assert!(!shown.contains("MIG") && !shown.contains("der"), "{shown}");
        let api = format!("{:?}", k.to_api());
        assert!(!api.contains("MIG") && api.contains("redacted"), "{api}");
    }

    #[test]
    fn tokens_are_base64url_and_bounded() {
        for ok in [
            "a",
            "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0",
            "A-_z09",
            &"x".repeat(MAX_TOKEN_LEN),
        ] {
            assert!(valid_token(ok), "{ok}");
        }
        for bad in [
            "",
            "a.b",
            "a/b",
            "../x",
            "a=",
            "a+b",
            "a%2F",
            "a b",
            "é",
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(!valid_token(bad), "{bad}");
        }
        assert_eq!(key_authorization("tok", "thumb"), "tok.thumb");
    }

    #[test]
    fn keys_are_stored_per_project_private_and_replaced() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("luma-keys-{}", fastrand::u64(..)));
        let store = Arc::new(Store::new(&dir));
        let keys = ProjectKeys::new(store.clone());
        assert!(keys.get("shop").unwrap().is_none());
        let k = Arc::new(ProjectKey::from_pem(RFC7515_KEY).unwrap());
        assert!(keys.set("shop", &k).unwrap());
        assert!(!keys.set("shop", &k).unwrap(), "the same key: unchanged");
        let path = store.account_key_path("shop").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // A new process reads it from the store.
        let again = ProjectKeys::new(store.clone());
        assert_eq!(again.get("shop").unwrap().as_deref(), Some(&*k));
        assert!(again.get("blog").unwrap().is_none(), "per project");
        // A different key replaces it.
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let other = Arc::new(ProjectKey::from_pem(&other).unwrap());
        assert!(again.set("shop", &other).unwrap());
        assert_eq!(
            ProjectKeys::new(store.clone())
                .get("shop")
                .unwrap()
                .as_deref(),
            Some(&*other)
        );
        // A damaged file counts as no key (logged), never as an error that stops orders.
        std::fs::write(&path, "not a key").unwrap();
        assert!(ProjectKeys::new(store).get("shop").unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
