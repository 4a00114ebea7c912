//! HTTPS for a route: what a deploy asks for, and what the proxy reports about certificates.
//!
//! A route without [`RouteTls`] is served over plain HTTP only. With it, every host of the route
//! gets its own certificate (never one certificate for all of them, so one host whose DNS is
//! wrong cannot hold back the others), from one of two sources:
//! - [`CertificateSource::Acme`]: the proxy orders it in the background when the route is
//!   deployed (not on the first visitor's handshake), renews it, and reports its state;
//! - [`CertificateSource::Custom`]: the user's certificate and key, sent once with the deploy
//!   ([`CustomCertificate`], never printed) and used for exactly the hosts it covers.
//!
//! Until a host has a certificate it keeps serving HTTP and is not redirected.
//!
//! A project on several servers shares one ACME account ([`AcmeAccountKey`], sent with every
//! deploy of its ACME routes): a CA's HTTP-01 validation may reach any of its servers, and
//! every proxy of the project can answer any token for the project's hosts, since the answer
//! depends only on the token and that account's key (see luma-proxy's `tls::account`).
//! [`AcmeAccountRequest`] asks a proxy for the key it holds, so a new server gets the same.

use serde::{Deserialize, Serialize};

/// Let's Encrypt's production ACME directory: the proxy's default, and what `luma` compares a
/// running proxy's setting with.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// A route's HTTPS settings. Absent: HTTP only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTls {
    pub certificate: CertificateSource,
    /// Answer plain-HTTP requests with 308 to `https://` once the host has a certificate
    /// (ACME challenges are never redirected).
    #[serde(default = "yes")]
    pub redirect: bool,
    /// Send `Strict-Transport-Security` on HTTPS responses.
    #[serde(default)]
    pub hsts: bool,
}

fn yes() -> bool {
    true
}

/// Where a route's certificates come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CertificateSource {
    /// Ordered per host over ACME by the proxy.
    Acme,
    /// The user's own certificate, named by the SHA-256 (lowercase hex) of its leaf
    /// certificate's DER. The PEM itself travels once, in `DeployRequest::certificate`, and is
    /// kept by the proxy in its state volume (0600).
    Custom { sha256: String },
}

/// A custom certificate chain and its private key, as PEM. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCertificate {
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CustomCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomCertificate")
            .field(
                "chain_pem",
                &format_args!("<{} bytes>", self.chain_pem.len()),
            )
            .field("key_pem", &format_args!("<redacted>"))
            .finish()
    }
}

/// A project's shared ACME account key: ECDSA P-256, PKCS#8, PEM (`-----BEGIN PRIVATE
/// KEY-----`). Every proxy of the project orders with the account of this key and answers its
/// HTTP-01 challenges. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeAccountKey {
    pub pkcs8_pem: String,
}

impl std::fmt::Debug for AcmeAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeAccountKey")
            .field("pkcs8_pem", &format_args!("<redacted>"))
            .finish()
    }
}

/// The ACME account key a proxy holds for a project (sent with an earlier deploy), so that
/// `luma` gives a new server of the project the key its other servers already use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeAccountRequest {
    pub project: String,
}

/// `key`: none when this proxy holds no key for the project (it orders with its own account).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeAccountReply {
    #[serde(default)]
    pub key: Option<AcmeAccountKey>,
}

/// The certificate state of hosts: all hosts with HTTPS, or those of one project, or the
/// listed hosts (both filters apply when both are given).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatesRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertificatesReply {
    pub certificates: Vec<CertificateStatus>,
}

/// One host's certificate, as the proxy serves it now. Times are Unix seconds (UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub host: String,
    pub project: String,
    pub state: CertState,
    /// `acme` or `custom`.
    pub source: String,
    /// The issuer's common name (or whole DN) of the certificate served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    /// When renewal starts (ACME only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<u64>,
    /// Why the last order failed (the CA's words), or why the host is HTTP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next order is due after a failure (ACME only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<u64>,
}

/// Where a host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// A valid certificate is served for this host.
    Issued,
    /// No certificate yet: being ordered, or waiting to retry after `last_error`. HTTP keeps
    /// serving and is not redirected.
    Pending,
    /// No certificate will be ordered; `last_error` says why (e.g. no public CA issues for
    /// `.test` names, or ACME is off). HTTP only.
    HttpOnly,
    /// The certificate served has expired and renewal has not succeeded yet.
    Expired,
}

impl CertState {
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Issued => "issued",
            CertState::Pending => "pending",
            CertState::HttpOnly => "http-only",
            CertState::Expired => "expired",
        }
    }
}
