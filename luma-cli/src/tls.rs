//! HTTPS for an app, from the CLI's side: what a deploy asks the proxy for, custom
//! certificates checked before anything changes, and the certificate state reported per host.
//!
//! A custom certificate (`proxy.ssl: {certificate, private_key}`) is read from `.luma/secrets`
//! and checked here in preflight, before any image is built or container started: it parses,
//! its key belongs to it, it is valid now, and it covers every host of the app. The proxy
//! checks the same again at its deploy gate; checking here first means a wrong certificate
//! costs nothing. Errors name the app, the secret's NAME and the hosts, never its value.
//!
//! After a deploy, [`wait_for_certificates`] asks the proxy until every host is issued or HTTP
//! only, or the wait ends; a certificate still pending is reported, not a failure.
//!
//! An app with ACME hosts on several servers gets one ACME account key for the project, shared
//! by the proxies of all its servers ([`share_acme_account`]): the CA's HTTP-01 request may
//! reach any of them, and each answers any of the project's challenges with the account's key
//! authorization, also when it renews alone, long after luma has exited.

use crate::config::{ProxyRoute, Ssl};
use crate::project::Ctx;
use crate::proxyctl;
use crate::secrets::Secrets;
use luma_api::tls::{
    CertState, CertificateSource, CertificateStatus, CertificatesRequest, CustomCertificate,
    RouteTls,
};
use std::time::Duration;

/// Gives every server the project's shared ACME account key when an app with ACME hosts runs
/// on more than one server: the key a server's proxy already has (the first in server order),
/// or a new ECDSA P-256 key. Each later switch sends it with the route. Run after setup (the
/// proxies answer).
pub async fn share_acme_account(
    ctxs: &[Ctx<'_>],
    apps: &[&crate::config::Entry],
) -> Result<(), String> {
    let needed = apps.iter().any(|a| {
        a.proxy.as_ref().is_some_and(|p| p.ssl == Ssl::Acme)
            && ctxs.iter().filter(|c| c.runs_here(a)).count() > 1
    });
    if !needed {
        return Ok(());
    }
    let mut key = None;
    for c in ctxs {
        let req = luma_api::tls::AcmeAccountRequest {
            project: c.project().to_string(),
        };
        let reply = proxyctl::ask(c.engine, &c.proxy, req).await.map_err(|e| {
            format!(
                "server {}: ask the proxy for the project's ACME account: {e}",
                c.server
            )
        })?;
        if let Some(k) = reply.key {
            key = Some(k);
            break;
        }
    }
    let key = match key {
        Some(k) => k,
        None => new_account_key()?,
    };
    for c in ctxs {
        let _ = c.acme_account.set(key.clone());
    }
    Ok(())
}

/// A new ECDSA P-256 ACME account key, as PKCS#8 PEM.
fn new_account_key() -> Result<luma_api::tls::AcmeAccountKey, String> {
    let der = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|_| "could not generate an ACME account key".to_string())?;
    Ok(luma_api::tls::AcmeAccountKey {
        pkcs8_pem: pem("PRIVATE KEY", der.as_ref()),
    })
}

/// PEM text of `der` (RFC 7468: base64 in 64-character lines).
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | *b as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// What a deploy sends for an app's HTTPS: the route's settings and, for a custom
/// certificate, the PEMs.
#[derive(Debug, Default)]
pub struct DeployTls {
    pub tls: Option<RouteTls>,
    pub certificate: Option<CustomCertificate>,
}

/// The route's HTTPS settings for an app, with its custom certificate read from the secrets and
/// checked (see [`check_custom`]). `file` is luma.yml's path, for errors.
pub fn for_route(
    file: &str,
    app: &str,
    route: &ProxyRoute,
    secrets: &Secrets,
    now: u64,
) -> Result<DeployTls, String> {
    let (source, certificate) = match &route.ssl {
        Ssl::Off => return Ok(DeployTls::default()),
        Ssl::Acme => (CertificateSource::Acme, None),
        Ssl::Custom {
            certificate,
            private_key,
        } => {
            let read = |field: &str, name: &str| -> Result<String, String> {
                let v = secrets.get(name).ok_or_else(|| {
                    format!(
                        "{file}: apps.{app}.proxy.ssl.{field}: secret {name} is not defined in {}; add it there as {name}=\"-----BEGIN ...\" (a quoted value may span lines)",
                        secrets.path.display()
                    )
                })?;
                Ok(unescape_pem(v))
            };
            let chain_pem = read("certificate", certificate)?;
            let key_pem = read("private_key", private_key)?;
            let names = SecretNames {
                file,
                app,
                certificate,
                private_key,
            };
            let checked = check_custom(&names, &chain_pem, &key_pem, &route.hosts, now)?;
            (
                CertificateSource::Custom {
                    sha256: checked.sha256,
                },
                Some(CustomCertificate { chain_pem, key_pem }),
            )
        }
    };
    Ok(DeployTls {
        tls: Some(RouteTls {
            certificate: source,
            redirect: route.ssl_redirect,
            hsts: route.hsts,
        }),
        certificate,
    })
}

/// A PEM written on one line with literal `\n` (PEM never contains a backslash) gets its line
/// breaks back.
fn unescape_pem(v: &str) -> String {
    if !v.contains('\n') && v.contains("\\n") {
        v.replace("\\n", "\n")
    } else {
        v.to_string()
    }
}

/// Where a custom certificate came from, for errors: never its value.
pub struct SecretNames<'a> {
    pub file: &'a str,
    pub app: &'a str,
    pub certificate: &'a str,
    pub private_key: &'a str,
}

impl SecretNames<'_> {
    fn err(&self, field: &str, msg: impl std::fmt::Display) -> String {
        format!("{}: apps.{}.proxy.ssl.{field}: {msg}", self.file, self.app)
    }
}

/// What the check learned about a custom certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// SHA-256 of the leaf certificate's DER, lowercase hex: its name in the route.
    pub sha256: String,
    /// The DNS names it covers (subjectAltName).
    pub names: Vec<String>,
    pub not_after: u64,
}

/// Checks a custom certificate chain and key for the hosts of an app at time `now` (Unix
/// seconds): the first PEM certificate is the leaf; it must be valid now, cover every host
/// (its subjectAltName DNS names; `*.example.com` covers exactly one more label), and the key
/// must be its key (where the key's format can be read here; the proxy checks every format).
pub fn check_custom(
    who: &SecretNames,
    chain_pem: &str,
    key_pem: &str,
    hosts: &[String],
    now: u64,
) -> Result<Checked, String> {
    let cert_name = who.certificate;
    let mut leaf_pem = None;
    for pem in x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes()) {
        let pem = pem.map_err(|e| {
            who.err(
                "certificate",
                format!("secret {cert_name} is not valid PEM ({e}); it must hold the certificate chain as -----BEGIN CERTIFICATE----- blocks, leaf first"),
            )
        })?;
        if pem.label == "CERTIFICATE" {
            leaf_pem = Some(pem);
            break;
        }
    }
    let leaf_pem = leaf_pem.ok_or_else(|| {
        who.err(
            "certificate",
            format!("secret {cert_name} holds no PEM certificate; it must hold the certificate chain as -----BEGIN CERTIFICATE----- blocks, leaf first"),
        )
    })?;
    let leaf = leaf_pem.parse_x509().map_err(|e| {
        who.err(
            "certificate",
            format!("the first certificate in secret {cert_name} does not parse as X.509 ({e})"),
        )
    })?;
    let validity = leaf.validity();
    let not_before = validity.not_before.timestamp().max(0) as u64;
    let not_after = validity.not_after.timestamp().max(0) as u64;
    if now >= not_after {
        return Err(who.err(
            "certificate",
            format!(
                "the certificate in secret {cert_name} expired {}; renew it and update .luma/secrets",
                luma_api::time::display(not_after)
            ),
        ));
    }
    if now < not_before {
        return Err(who.err(
            "certificate",
            format!(
                "the certificate in secret {cert_name} is not valid before {}; use it from then, or check this machine's clock",
                luma_api::time::display(not_before)
            ),
        ));
    }
    let names: Vec<String> = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(who.err(
                "certificate",
                format!(
                "the subjectAltName of the certificate in secret {cert_name} does not parse ({e})"
            ),
            ))
        }
    };
    let uncovered: Vec<&str> = hosts
        .iter()
        .map(String::as_str)
        .filter(|h| !covers(&names, h))
        .collect();
    if !uncovered.is_empty() {
        let has = if names.is_empty() {
            "no DNS names (it has no subjectAltName DNS entries)".to_string()
        } else {
            names.join(", ")
        };
        return Err(who.err(
            "certificate",
            format!(
                "the certificate in secret {cert_name} does not cover host(s) {} of app {}; it covers {has}. Use a certificate whose subjectAltName lists every host of the app (a *.domain name covers one label), or move those hosts to another app",
                uncovered.join(", "),
                who.app
            ),
        ));
    }
    check_key(who, key_pem, &leaf.public_key().subject_public_key.data)?;
    Ok(Checked {
        sha256: hex(ring::digest::digest(&ring::digest::SHA256, &leaf_pem.contents).as_ref()),
        names,
        not_after,
    })
}

/// The private key parses and belongs to the certificate (public keys compared). Keys ring
/// cannot read here as such (SEC1 `EC PRIVATE KEY`) are left to the proxy's gate.
fn check_key(who: &SecretNames, key_pem: &str, cert_public: &[u8]) -> Result<(), String> {
    use ring::signature::{self, KeyPair};
    let key_name = who.private_key;
    let pem = x509_parser::pem::Pem::iter_from_buffer(key_pem.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label.ends_with("PRIVATE KEY"))
        .ok_or_else(|| {
            who.err(
                "private_key",
                format!("secret {key_name} holds no PEM private key; it must hold -----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY)"),
            )
        })?;
    let der = pem.contents.as_slice();
    let rng = ring::rand::SystemRandom::new();
    let public: Option<Vec<u8>> = match pem.label.as_str() {
        "PRIVATE KEY" => {
            let ec = [
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            ]
            .into_iter()
            .find_map(|alg| signature::EcdsaKeyPair::from_pkcs8(alg, der, &rng).ok())
            .map(|k| k.public_key().as_ref().to_vec());
            let found = ec
                .or_else(|| {
                    signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                        .ok()
                        .map(|k| k.public_key().as_ref().to_vec())
                })
                .or_else(|| {
                    signature::RsaKeyPair::from_pkcs8(der)
                        .ok()
                        .map(|k| k.public_key().as_ref().to_vec())
                });
            Some(found.ok_or_else(|| {
                who.err(
                    "private_key",
                    format!("the key in secret {key_name} is not an ECDSA P-256/P-384, Ed25519 or RSA (2048 bits or more) key the proxy can use"),
                )
            })?)
        }
        "RSA PRIVATE KEY" => Some(
            signature::RsaKeyPair::from_der(der)
                .map_err(|e| {
                    who.err(
                        "private_key",
                        format!("the RSA key in secret {key_name} is not usable ({e}); RSA keys need 2048 bits or more"),
                    )
                })?
                .public_key()
                .as_ref()
                .to_vec(),
        ),
        _ => None,
    };
    match public {
        Some(p) if p != cert_public => Err(who.err(
            "private_key",
            format!(
                "the key in secret {key_name} does not belong to the certificate in secret {}; put the certificate's own key there",
                who.certificate
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether a certificate with these DNS names covers `host` (the rule is
/// [`luma_api::names::certificate_covers`], shared with the proxy's gate).
pub fn covers(names: &[String], host: &str) -> bool {
    luma_api::names::certificate_covers(names, host)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a host needs nothing more: it has its certificate, or will never get one.
fn settled(s: &CertificateStatus) -> bool {
    matches!(s.state, CertState::Issued | CertState::HttpOnly)
}

/// Asks the proxy about `hosts` of the project until every one is issued or HTTP only, or
/// `wait` has passed (0: ask once). Shows progress on a terminal. Hosts the proxy does not
/// report are pending.
pub async fn wait_for_certificates(
    ctx: &Ctx<'_>,
    hosts: &[String],
    wait: Duration,
) -> Result<Vec<CertificateStatus>, String> {
    let deadline = tokio::time::Instant::now() + wait;
    let started = std::time::Instant::now();
    let hosts: Vec<String> = hosts.iter().map(|h| normalized(h)).collect();
    let req = CertificatesRequest {
        project: Some(ctx.project().to_string()),
        hosts: hosts.clone(),
    };
    // On a terminal the progress line says this; elsewhere, one line before the wait.
    if !wait.is_zero() && !ctx.ui.tty {
        ctx.ui.info(format!(
            "  … certificates for {} (waiting up to {}s; --cert-wait)",
            hosts.join(", "),
            wait.as_secs()
        ));
    }
    loop {
        let reply = proxyctl::certificates(ctx.engine, &ctx.proxy, req.clone()).await?;
        let statuses = in_order(&hosts, ctx.project(), reply.certificates);
        let done = statuses.iter().filter(|s| settled(s)).count();
        if done == statuses.len() || tokio::time::Instant::now() >= deadline {
            ctx.ui.progress_done();
            if !wait.is_zero() {
                let mark = if done == statuses.len() { "✓" } else { "·" };
                ctx.ui.info(format!(
                    "  {mark} certificates: {done} of {} settled ({:.1}s)",
                    statuses.len(),
                    started.elapsed().as_secs_f64()
                ));
            }
            return Ok(statuses);
        }
        let issued = statuses
            .iter()
            .filter(|s| s.state == CertState::Issued)
            .count();
        ctx.ui.progress(format!(
            "certificates: {issued} issued, {} pending ({}s of {}s)",
            statuses.len() - done,
            started.elapsed().as_secs(),
            wait.as_secs()
        ));
        tokio::time::sleep(Duration::from_millis(500).min(deadline - tokio::time::Instant::now()))
            .await;
    }
}

/// One status per asked host, in the asked order; a host the proxy does not report yet is
/// pending.
fn in_order(
    hosts: &[String],
    project: &str,
    mut reported: Vec<CertificateStatus>,
) -> Vec<CertificateStatus> {
    hosts
        .iter()
        .map(
            |h| match reported.iter().position(|s| same_host(&s.host, h)) {
                Some(i) => reported.swap_remove(i),
                None => CertificateStatus {
                    host: h.clone(),
                    project: project.to_string(),
                    state: CertState::Pending,
                    source: String::new(),
                    issuer: None,
                    not_after: None,
                    renew_at: None,
                    last_error: Some("the proxy does not report this host yet".into()),
                    next_attempt: None,
                },
            },
        )
        .collect()
}

/// A host as the proxy names it: lowercase, without a trailing dot.
pub fn normalized(host: &str) -> String {
    luma_api::names::normalize_host_pattern(host).unwrap_or_else(|_| host.to_string())
}

/// Whether two spellings name the same host (`Shop.test.` and `shop.test`).
pub fn same_host(a: &str, b: &str) -> bool {
    normalized(a) == normalized(b)
}

/// The URL scheme a host is served with: https once it has a valid certificate.
pub fn scheme(s: Option<&CertificateStatus>) -> &'static str {
    match s {
        Some(s) if s.state == CertState::Issued => "https",
        _ => "http",
    }
}

/// One line per host, as `luma deploy` prints it:
/// `https://host  certificate issued by <issuer>, expires <date>`,
/// `http://host  pending: <reason>`, `http://host  HTTP only: <why>`,
/// `http://host  expired <date>: <reason>`.
pub fn report_line(s: &CertificateStatus) -> String {
    let url = format!("{}://{}", scheme(Some(s)), s.host);
    let date = |t: Option<u64>| t.map_or_else(|| "?".to_string(), luma_api::time::display);
    let why = s.last_error.as_deref();
    let detail = match s.state {
        CertState::Issued => format!(
            "certificate issued by {}, expires {}",
            s.issuer.as_deref().unwrap_or("an unnamed issuer"),
            date(s.not_after)
        ),
        CertState::Pending => {
            let mut d = format!(
                "pending: {}",
                why.unwrap_or("the certificate is being ordered")
            );
            if let Some(t) = s.next_attempt {
                d.push_str(&format!(" (next attempt {})", luma_api::time::display(t)));
            }
            d
        }
        CertState::HttpOnly => format!("HTTP only: {}", why.unwrap_or("no certificate is ordered")),
        CertState::Expired => format!(
            "expired {}: {}",
            date(s.not_after),
            why.unwrap_or("renewal has not succeeded yet")
        ),
    };
    format!("{url}  {detail}")
}

/// A self-signed CA root as PEM, for tests that need a `ca_root` file.
#[cfg(test)]
pub(crate) fn test_root_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_is_base64_in_lines() {
        assert_eq!(
            pem("X", b"Man"),
            "-----BEGIN X-----\nTWFu\n-----END X-----\n"
        );
        assert_eq!(
            pem("X", b"Ma"),
            "-----BEGIN X-----\nTWE=\n-----END X-----\n"
        );
        assert_eq!(pem("X", b"M"), "-----BEGIN X-----\nTQ==\n-----END X-----\n");
        let long = pem("K", &[0u8; 60]);
        assert!(long.lines().all(|l| l.len() <= 64));
        assert_eq!(long.lines().count(), 4);
        let key = new_account_key().unwrap();
        assert!(key.pkcs8_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    }
    use rcgen::{CertificateParams, DnType, KeyPair};

    const DAY: u64 = 86_400;

    fn now() -> u64 {
        luma_api::time::unix_now()
    }

    /// A self-signed certificate for `names`, valid from `from` to `to` (Unix seconds), and its
    /// key: (chain PEM, key PEM).
    fn cert(names: &[&str], from: u64, to: u64) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, "luma test");
        p.not_before = time_of(from);
        p.not_after = time_of(to);
        let c = p.self_signed(&key).unwrap();
        (c.pem(), key.serialize_pem())
    }

    fn time_of(secs: u64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
    }

    fn who() -> SecretNames<'static> {
        SecretNames {
            file: "/p/luma.yml",
            app: "web",
            certificate: "TLS_CERT",
            private_key: "TLS_KEY",
        }
    }

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn wildcards_cover_exactly_one_label() {
        let names = hosts(&["*.example.com", "example.org"]);
        assert!(covers(&names, "a.example.com"));
        assert!(covers(&names, "A.Example.COM."));
        assert!(!covers(&names, "example.com"));
        assert!(!covers(&names, "a.b.example.com"));
        assert!(covers(&names, "example.org"));
        assert!(!covers(&names, "www.example.org"));
        // A wildcard host pattern needs the wildcard itself.
        assert!(covers(&names, "*.example.com"));
        assert!(!covers(&hosts(&["a.example.com"]), "*.example.com"));
    }

    #[test]
    fn a_good_certificate_is_named_by_its_leaf_sha256() {
        let t = now();
        let (chain, key) = cert(&["shop.test", "*.shop.test"], t - DAY, t + 30 * DAY);
        let c = check_custom(
            &who(),
            &chain,
            &key,
            &hosts(&["shop.test", "www.shop.test"]),
            t,
        )
        .unwrap();
        let der = x509_parser::pem::Pem::iter_from_buffer(chain.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .contents;
        assert_eq!(
            c.sha256,
            hex(ring::digest::digest(&ring::digest::SHA256, &der).as_ref())
        );
        assert_eq!(c.sha256.len(), 64);
        assert!(c
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(c.names, hosts(&["shop.test", "*.shop.test"]));
    }

    #[test]
    fn uncovered_hosts_are_named_with_what_the_certificate_covers() {
        let t = now();
        let (chain, key) = cert(&["a.test", "*.b.test"], t - DAY, t + DAY);
        let e = check_custom(
            &who(),
            &chain,
            &key,
            &hosts(&["a.test", "x.y.b.test", "c.test"]),
            t,
        )
        .unwrap_err();
        assert!(
            e.starts_with("/p/luma.yml: apps.web.proxy.ssl.certificate: "),
            "{e}"
        );
        assert!(e.contains("TLS_CERT") && e.contains("app web"), "{e}");
        assert!(e.contains("host(s) x.y.b.test, c.test"), "{e}");
        assert!(e.contains("it covers a.test, *.b.test"), "{e}");
        assert!(!e.contains("BEGIN"), "{e}");
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused() {
        let t = now();
        let (chain, key) = cert(&["a.test"], t - 10 * DAY, t - DAY);
        let e = check_custom(&who(), &chain, &key, &hosts(&["a.test"]), t).unwrap_err();
        assert!(e.contains("TLS_CERT") && e.contains("expired"), "{e}");
        let (chain, key) = cert(&["a.test"], t + DAY, t + 10 * DAY);
        let e = check_custom(&who(), &chain, &key, &hosts(&["a.test"]), t).unwrap_err();
        assert!(e.contains("not valid before"), "{e}");
    }

    #[test]
    fn a_key_of_another_certificate_or_garbage_is_refused_without_echoing_it() {
        let t = now();
        let (chain, _) = cert(&["a.test"], t - DAY, t + DAY);
        let (_, other_key) = cert(&["a.test"], t - DAY, t + DAY);
        let e = check_custom(&who(), &chain, &other_key, &hosts(&["a.test"]), t).unwrap_err();
        assert!(
            e.contains("apps.web.proxy.ssl.private_key") && e.contains("does not belong"),
            "{e}"
        );
        assert!(!e.contains("PRIVATE KEY-----"), "{e}");
        let e =
            check_custom(&who(), &chain, "hunter2-not-a-key", &hosts(&["a.test"]), t).unwrap_err();
        assert!(e.contains("TLS_KEY") && !e.contains("hunter2"), "{e}");
        let e =
            check_custom(&who(), "garbage-value", &other_key, &hosts(&["a.test"]), t).unwrap_err();
        assert!(
            e.contains("TLS_CERT") && e.contains("no PEM certificate") && !e.contains("garbage"),
            "{e}"
        );
    }

    #[test]
    fn route_settings_come_from_the_app() {
        let t = now();
        let (chain, key) = cert(&["a.test"], t - DAY, t + DAY);
        let dir = std::env::temp_dir().join(format!("luma-tls-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".luma")).unwrap();
        // One PEM quoted over several lines, the other on one line with literal \n.
        let one_line = key.trim_end().replace('\n', "\\n");
        std::fs::write(
            dir.join(".luma/secrets"),
            format!("TLS_CERT=\"{}\"\nTLS_KEY={one_line}\n", chain.trim_end()),
        )
        .unwrap();
        let secrets = Secrets::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut route = ProxyRoute {
            hosts: hosts(&["a.test"]),
            app_port: 80,
            ssl: Ssl::Off,
            ssl_redirect: true,
            hsts: true,
            response_timeout: Duration::from_secs(30),
        };
        let none = for_route("f", "web", &route, &secrets, t).unwrap();
        assert!(none.tls.is_none() && none.certificate.is_none());
        route.ssl = Ssl::Acme;
        let acme = for_route("f", "web", &route, &secrets, t).unwrap();
        assert_eq!(
            acme.tls,
            Some(RouteTls {
                certificate: CertificateSource::Acme,
                redirect: true,
                hsts: true
            })
        );
        assert!(acme.certificate.is_none());
        route.ssl = Ssl::Custom {
            certificate: "TLS_CERT".into(),
            private_key: "TLS_KEY".into(),
        };
        let custom = for_route("f", "web", &route, &secrets, t).unwrap();
        let sent = custom.certificate.unwrap();
        assert_eq!(sent.chain_pem.trim_end(), chain.trim_end());
        assert_eq!(sent.key_pem.trim_end(), key.trim_end());
        assert!(matches!(
            custom.tls.unwrap().certificate,
            CertificateSource::Custom { sha256 } if sha256.len() == 64
        ));
        route.ssl = Ssl::Custom {
            certificate: "NOPE".into(),
            private_key: "TLS_KEY".into(),
        };
        let e = for_route("f", "web", &route, &secrets, t).unwrap_err();
        assert!(
            e.contains("apps.web.proxy.ssl.certificate: secret NOPE is not defined"),
            "{e}"
        );
    }

    #[test]
    fn report_lines_say_issued_pending_or_http_only() {
        let mut s = CertificateStatus {
            host: "shop.test".into(),
            project: "p".into(),
            state: CertState::Issued,
            source: "acme".into(),
            issuer: Some("Pebble Intermediate CA 1a2b".into()),
            not_after: Some(1_795_854_600),
            renew_at: None,
            last_error: None,
            next_attempt: None,
        };
        assert_eq!(
            report_line(&s),
            "https://shop.test  certificate issued by Pebble Intermediate CA 1a2b, expires 2026-11-28 08:30 UTC"
        );
        s.state = CertState::Pending;
        s.last_error = Some("DNS for shop.test points elsewhere".into());
        assert_eq!(
            report_line(&s),
            "http://shop.test  pending: DNS for shop.test points elsewhere"
        );
        s.state = CertState::HttpOnly;
        s.last_error = Some("ACME is off".into());
        assert_eq!(report_line(&s), "http://shop.test  HTTP only: ACME is off");
        let ordered = in_order(&hosts(&["b.test", "Shop.test."]), "p", vec![s.clone()]);
        assert_eq!(ordered[0].host, "b.test");
        assert_eq!(ordered[0].state, CertState::Pending);
        assert_eq!(ordered[1], s);
    }
}
