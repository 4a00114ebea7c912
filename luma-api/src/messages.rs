//! Every admin operation as a request type with its reply type, and the error that says what
//! happened to the world.
//!
//! The contract a caller relies on:
//! - `Ok(reply)`: the operation finished (for a deploy: switched, saved and drained).
//! - `Err(ApiError)` with [`ApiError::changed_nothing`] true: the proxy refused; the routing table
//!   is exactly as it was.
//! - anything else (no reply, a reply that cannot be read, the caller interrupted): the outcome
//!   is unknown. Ask with [`RouteQuery`], which waits for any operation still running on that
//!   route and answers what is live.
//!
//! Operations outlive their caller: once the proxy accepts one it runs to its end even if the
//! client goes away, and repeating an identical deploy is a no-op that answers the same.

use crate::route::{HealthSettings, RouteSpec};
pub use crate::tls::{
    AcmeAccountKey, AcmeAccountReply, AcmeAccountRequest, CertificatesReply, CertificatesRequest,
    CustomCertificate,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const DEFAULT_DEPLOY_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;

/// One admin operation: its HTTP method and path, and the type of its reply.
pub trait Operation: Serialize + DeserializeOwned + Into<Request> {
    type Reply: Serialize + DeserializeOwned;
    const METHOD: &'static str;
    const PATH: &'static str;
}

/// Everything a caller can ask of the proxy, as one value (what `luma-proxy call` reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Deploy(DeployRequest),
    Check(CheckRequest),
    Remove(RemoveRequest),
    Flush(FlushRequest),
    Routes(RoutesRequest),
    Route(RouteQuery),
    Status(StatusRequest),
    Certificates(CertificatesRequest),
    AcmeAccount(AcmeAccountRequest),
}

impl Request {
    pub fn method_and_path(&self) -> (&'static str, &'static str) {
        fn mp<O: Operation>(_: &O) -> (&'static str, &'static str) {
            (O::METHOD, O::PATH)
        }
        match self {
            Request::Deploy(r) => mp(r),
            Request::Check(r) => mp(r),
            Request::Remove(r) => mp(r),
            Request::Flush(r) => mp(r),
            Request::Routes(r) => mp(r),
            Request::Route(r) => mp(r),
            Request::Status(r) => mp(r),
            Request::Certificates(r) => mp(r),
            Request::AcmeAccount(r) => mp(r),
        }
    }

    /// The JSON body sent to the admin API (none for GETs).
    pub fn body(&self) -> Option<serde_json::Value> {
        let v = match self {
            Request::Deploy(r) => serde_json::to_value(r),
            Request::Check(r) => serde_json::to_value(r),
            Request::Remove(r) => serde_json::to_value(r),
            Request::Flush(r) => serde_json::to_value(r),
            Request::Route(r) => serde_json::to_value(r),
            Request::Certificates(r) => serde_json::to_value(r),
            Request::AcmeAccount(r) => serde_json::to_value(r),
            Request::Routes(_) | Request::Status(_) => return None,
        };
        v.ok()
    }

    /// How long a caller should wait for the reply before calling the outcome unknown.
    pub fn reply_within(&self) -> Duration {
        let ms = match self {
            Request::Deploy(r) => {
                r.deploy_timeout_ms.unwrap_or(DEFAULT_DEPLOY_TIMEOUT_MS)
                    + r.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS)
            }
            Request::Check(r) => r.timeout_ms.unwrap_or(DEFAULT_DEPLOY_TIMEOUT_MS),
            Request::Remove(r) => r.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS),
            // Waits for a running operation on that route, which its own deadlines bound (a
            // deploy's health deadline may be minutes).
            Request::Route(_) => 10 * 60 * 1000,
            Request::Flush(_)
            | Request::Routes(_)
            | Request::Status(_)
            | Request::Certificates(_)
            | Request::AcmeAccount(_) => 0,
        };
        Duration::from_millis(ms) + Duration::from_secs(15)
    }
}

macro_rules! operation {
    ($req:ident => $reply:ty, $variant:ident, $method:literal, $path:literal) => {
        impl Operation for $req {
            type Reply = $reply;
            const METHOD: &'static str = $method;
            const PATH: &'static str = $path;
        }
        impl From<$req> for Request {
            fn from(r: $req) -> Request {
                Request::$variant(r)
            }
        }
    };
}

operation!(DeployRequest => DeployOutcome, Deploy, "POST", "/v1/deploy");
operation!(CheckRequest => CheckOutcome, Check, "POST", "/v1/check");
operation!(RemoveRequest => DrainReport, Remove, "POST", "/v1/remove");
operation!(FlushRequest => FlushReply, Flush, "POST", "/v1/flush");
operation!(RoutesRequest => RoutesReply, Routes, "GET", "/v1/routes");
operation!(RouteQuery => RouteQueryReply, Route, "POST", "/v1/route");
operation!(StatusRequest => StatusReply, Status, "GET", "/v1/status");
operation!(CertificatesRequest => CertificatesReply, Certificates, "POST", "/v1/certificates");
operation!(AcmeAccountRequest => AcmeAccountReply, AcmeAccount, "POST", "/v1/acme-account");

/// Switch a route to a new target: gate, swap, save, drain (see luma-proxy's `deploy.rs`).
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub route: RouteSpec,
    #[serde(default)]
    pub deploy_timeout_ms: Option<u64>,
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
    /// The custom certificate that `route.tls` names by its SHA-256 (sent with every deploy of
    /// such a route; the proxy checks that it matches the name, covers every host and has not
    /// expired before anything changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CustomCertificate>,
    /// The project's shared ACME account key (see [`AcmeAccountKey`]): the proxy stores it for
    /// the project and orders this project's certificates with its account from then on. Sent
    /// by `luma` for an app with ACME on more than one server; absent (older callers too), the
    /// proxy keeps what it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_account: Option<AcmeAccountKey>,
}

/// Health-check a target in its network, changing nothing.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub project: String,
    pub target: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub health: HealthSettings,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Remove a route: its hosts stop matching at once, then in-flight requests drain.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    pub project: String,
    pub app: String,
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

/// Re-resolve every route of a project now.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FlushRequest {
    pub project: String,
}

/// Every route with per-backend health.
#[derive(Debug, Deserialize, Serialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutesRequest {}

/// Version, uptime and counts.
#[derive(Debug, Deserialize, Serialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {}

/// What is live for one route, answered after any operation still running on it has ended:
/// the question to ask when a deploy's outcome is unknown.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteQuery {
    pub project: String,
    pub app: String,
}

/// One backend's health.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendReport {
    pub addr: String,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub inflight: usize,
    #[serde(default)]
    pub requests: u64,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct DrainReport {
    pub waited_ms: u64,
    /// Requests (or tunnels) still open when the drain timeout ended them.
    pub cut: usize,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct DeployOutcome {
    pub route: RouteSpec,
    pub backends: Vec<BackendReport>,
    pub previous_target: Option<String>,
    pub drain: Option<DrainReport>,
    /// The same route was already live: nothing was switched (an idempotent repeat).
    #[serde(default)]
    pub already_live: bool,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct CheckOutcome {
    pub healthy: bool,
    pub backends: Vec<BackendReport>,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct FlushReply {
    pub project: String,
    pub routes_refreshed: usize,
}

/// A route as it is live now.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct RouteState {
    pub route: RouteSpec,
    pub backends: Vec<BackendReport>,
}

impl RouteState {
    /// The release this route serves, when its target is a Luma release alias.
    pub fn release(&self) -> Option<String> {
        crate::names::release_of_target(&self.route.app, &self.route.target)
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Default)]
pub struct RoutesReply {
    pub routes: Vec<RouteState>,
}

impl RoutesReply {
    pub fn find(&self, project: &str, app: &str) -> Option<&RouteState> {
        self.routes
            .iter()
            .find(|r| r.route.project == project && r.route.app == app)
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct RouteQueryReply {
    pub route: Option<RouteState>,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct StatusReply {
    pub version: String,
    pub uptime_s: u64,
    pub routes: usize,
    pub backends: usize,
    pub healthy_backends: usize,
    pub inflight: usize,
    pub connections_open: u64,
    pub requests_total: u64,
}

/// Why the proxy said no.
#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or names something invalid.
    Invalid,
    /// A host belongs to another route.
    Conflict,
    /// No such route.
    NotFound,
    /// The target has no containers in its network.
    Unresolved,
    /// A backend failed its health check by the deadline.
    Unhealthy,
    /// The routing table could not be saved, so the switch did not happen.
    NotSaved,
    /// The token is missing or wrong.
    Unauthorized,
    /// The admin API could not be reached: nothing was sent.
    Unreachable,
    /// The request was sent but no reply came: the outcome is unknown.
    NoReply,
    /// Something inside the proxy failed; whether anything changed is not known.
    Internal,
}

/// An admin API error reply.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub error: String,
    /// Per-backend reasons, for `unhealthy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendReport>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, error: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            error: error.into(),
            backends: Vec::new(),
        }
    }

    /// True when the proxy certainly left its routing table as it was: only kinds that are
    /// decided before any change. `internal` (a failed task, an unreadable error reply) may
    /// come after a switch, so it counts as unknown, like `no_reply`.
    pub fn changed_nothing(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Invalid
                | ErrorKind::Conflict
                | ErrorKind::NotFound
                | ErrorKind::Unresolved
                | ErrorKind::Unhealthy
                | ErrorKind::NotSaved
                | ErrorKind::Unauthorized
                | ErrorKind::Unreachable
        )
    }

    /// The HTTP status the admin API answers with.
    pub fn http_status(&self) -> u16 {
        match self.kind {
            ErrorKind::Invalid => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unresolved | ErrorKind::Unhealthy => 422,
            ErrorKind::NotSaved | ErrorKind::Internal => 500,
            ErrorKind::Unreachable | ErrorKind::NoReply => 502,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        for r in self.backends.iter().filter(|r| !r.healthy) {
            write!(
                f,
                "\n  {}: {}",
                r.addr,
                r.error.as_deref().unwrap_or("unhealthy")
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

/// What `luma-proxy call` prints: exactly one of a reply or an error.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Envelope<T> {
    Ok(T),
    Err(ApiError),
}

impl<T> From<Envelope<T>> for Result<T, ApiError> {
    fn from(e: Envelope<T>) -> Self {
        match e {
            Envelope::Ok(v) => Ok(v),
            Envelope::Err(e) => Err(e),
        }
    }
}

/// A failed call as the caller sees it: refused (nothing changed) or unknown (go and look).
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// The proxy answered no; its routing table is as it was.
    Refused(ApiError),
    /// The call may or may not have taken effect.
    Unknown(String),
}

impl From<ApiError> for CallError {
    fn from(e: ApiError) -> CallError {
        if e.changed_nothing() {
            CallError::Refused(e)
        } else {
            CallError::Unknown(e.error)
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused(e) => write!(f, "{e}"),
            CallError::Unknown(why) => write!(f, "outcome unknown: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy() -> DeployRequest {
        DeployRequest {
            route: RouteSpec {
                project: "shop".into(),
                app: "web".into(),
                hosts: vec!["shop.test".into()],
                target: "web--abc:3000".into(),
                network: String::new(),
                health: Default::default(),
                timeouts: Default::default(),
                limits: Default::default(),
                tls: None,
            },
            deploy_timeout_ms: Some(1000),
            drain_timeout_ms: None,
            certificate: None,
            acme_account: None,
        }
    }

    #[test]
    fn a_request_round_trips_and_knows_its_endpoint() {
        let r: Request = deploy().into();
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with("{\"deploy\":"), "{text}");
        let back: Request = serde_json::from_str(&text).unwrap();
        assert_eq!(back.method_and_path(), ("POST", "/v1/deploy"));
        assert!(matches!(back, Request::Deploy(d) if d == deploy()));
        let q: Request = RoutesRequest {}.into();
        assert_eq!(q.method_and_path(), ("GET", "/v1/routes"));
        assert!(q.body().is_none());
    }

    #[test]
    fn the_acme_account_travels_with_a_deploy_and_is_never_printed() {
        let key = AcmeAccountKey {
            pkcs8_pem: "-----BEGIN PRIVATE KEY-----\nSECRETBYTES\n-----END PRIVATE KEY-----\n"
                .into(),
        };
        let mut d = deploy();
        // An older caller's deploy has no such field, and a deploy without a key sends none.
        let old = serde_json::to_string(&d).unwrap();
        assert!(!old.contains("acme_account"), "{old}");
        assert_eq!(serde_json::from_str::<DeployRequest>(&old).unwrap(), d);
        d.acme_account = Some(key.clone());
        let r: Request = d.clone().into();
        let text = serde_json::to_string(&r).unwrap();
        let back: Request = serde_json::from_str(&text).unwrap();
        assert!(matches!(&back, Request::Deploy(b) if *b == d));
        for shown in [format!("{back:?}"), format!("{key:?}"), format!("{d:?}")] {
            assert!(!shown.contains("SECRETBYTES"), "{shown}");
        }

        let q: Request = AcmeAccountRequest {
            project: "shop".into(),
        }
        .into();
        assert_eq!(q.method_and_path(), ("POST", "/v1/acme-account"));
        let text = serde_json::to_string(&q).unwrap();
        assert_eq!(text, r#"{"acme_account":{"project":"shop"}}"#);
        let back: Request = serde_json::from_str(&text).unwrap();
        assert_eq!(back.body(), Some(serde_json::json!({"project": "shop"})));
        let reply = AcmeAccountReply { key: Some(key) };
        let text = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            serde_json::from_str::<AcmeAccountReply>(&text).unwrap(),
            reply
        );
        assert_eq!(
            serde_json::from_str::<AcmeAccountReply>("{}").unwrap(),
            AcmeAccountReply { key: None }
        );
    }

    #[test]
    fn unknown_fields_and_operations_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"deploi":{}}"#).is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"remove":{"project":"a","app":"b","drain":1}}"#
        )
        .is_err());
    }

    #[test]
    fn only_a_missing_reply_leaves_the_outcome_unknown() {
        let refused: CallError = ApiError::new(ErrorKind::NotSaved, "disk").into();
        assert!(matches!(refused, CallError::Refused(_)));
        let unknown: CallError = ApiError::new(ErrorKind::NoReply, "timeout").into();
        assert!(matches!(unknown, CallError::Unknown(_)));
        let crashed: CallError = ApiError::new(ErrorKind::Internal, "task failed").into();
        assert!(matches!(crashed, CallError::Unknown(_)));
        let env: Envelope<FlushReply> =
            serde_json::from_str(r#"{"err":{"kind":"conflict","error":"taken"}}"#).unwrap();
        let r: Result<FlushReply, ApiError> = env.into();
        assert_eq!(r.unwrap_err().kind, ErrorKind::Conflict);
    }
}
