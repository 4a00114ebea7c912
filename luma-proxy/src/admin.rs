//! The admin API: JSON over HTTP/1.1 on a loopback address, every call behind a bearer token.
//!
//! | method | path          | body                | does                                     |
//! |--------|---------------|---------------------|------------------------------------------|
//! | POST   | /v1/deploy    | `DeployRequest`     | the deploy contract (see `deploy`)       |
//! | POST   | /v1/check     | `CheckRequest`      | health-check a target without switching  |
//! | POST   | /v1/remove    | `RemoveRequest`     | remove a route and drain it              |
//! | POST   | /v1/flush     | `FlushRequest`      | re-resolve a project's routes now        |
//! | POST   | /v1/route     | `RouteQuery`        | one route, once no operation runs on it  |
//! | POST   | /v1/certificates | `CertificatesRequest` | certificate state per host of routes with HTTPS |
//! | POST   | /v1/acme-account | `AcmeAccountRequest` | the project's shared ACME account key, if held |
//! | GET    | /v1/routes    |                     | routes with per-backend health           |
//! | GET    | /v1/status    |                     | version, uptime, counts                  |
//! | GET    | /metrics      |                     | OpenMetrics text (same as the metrics listener) |
//!
//! Request and reply types are `luma-api`'s; an error is an `ApiError` whose `kind` tells a
//! refusal (nothing changed) from everything else. Each operation runs in a task of its own:
//! once accepted it finishes (swap, save, drain, retire) even if the caller goes away, so an
//! interrupted `docker exec` can never leave a switch half done.
//!
//! The `luma-proxy` binary is the client of this API (`luma-proxy call` reads one
//! `luma_api::Request` on stdin), so `docker exec -i <proxy> luma-proxy call` is all the CLI
//! needs; the proxy never needs docker.sock.

use crate::deploy::Deployer;
use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use luma_api::{ApiError, ErrorKind, FlushReply, RouteState, RoutesReply, StatusReply};
use serde::de::DeserializeOwned;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

const MAX_BODY: usize = 1024 * 1024;

pub struct AdminCtx {
    pub deployer: Arc<Deployer>,
    pub metrics: Arc<Metrics>,
    pub token: Arc<str>,
    pub started: Instant,
}

pub async fn serve(listener: TcpListener, ctx: Arc<AdminCtx>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                if backoff.succeeded() {
                    crate::log::info("admin accept recovered", serde_json::json!({}));
                }
                stream
            }
            Err(e) => {
                // EMFILE and friends: wait (doubling up to the cap) instead of spinning, and
                // log the first error of a run only.
                let (wait, first) = backoff.failed();
                if first {
                    crate::log::warn(
                        "admin accept failed; backing off",
                        serde_json::json!({"error": e.to_string(), "max_backoff_ms": ACCEPT_BACKOFF_MAX.as_millis() as u64}),
                    );
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&ctx, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// First and longest wait after a failed accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Exponential backoff for accept loops: `min`, doubling on every failure in a row up to `max`,
/// back to `min` after a success.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    failing: bool,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
            failing: false,
        }
    }

    /// How long to wait now, and whether this failure starts a run (the one to log).
    pub fn failed(&mut self) -> (Duration, bool) {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        let first = !self.failing;
        self.failing = true;
        (wait, first)
    }

    /// Resets the schedule; true if this ends a run of failures.
    pub fn succeeded(&mut self) -> bool {
        self.next = self.min;
        std::mem::replace(&mut self.failing, false)
    }
}

/// `GET /metrics`: the one registry, in the OpenMetrics text format.
pub fn metrics_response(metrics: &Metrics) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{v:#}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: &ApiError) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, &serde_json::to_value(e).unwrap_or_default())
}

fn invalid(msg: impl Into<String>) -> Response<Full<Bytes>> {
    error(&ApiError::new(ErrorKind::Invalid, msg))
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| invalid(format!("cannot read body (max 1 MiB): {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("invalid JSON body: {e}")))
}

fn reply<T: serde::Serialize>(r: Result<T, ApiError>) -> Response<Full<Bytes>> {
    match r {
        Ok(v) => json(StatusCode::OK, &serde_json::to_value(v).unwrap_or_default()),
        Err(e) => error(&e),
    }
}

/// Runs an operation in a task of its own and waits for it. If the caller disconnects, this
/// future is dropped but the task is not: the operation still finishes.
async fn detached<T, F>(ctx: &AdminCtx, req: Request<Incoming>, op: F) -> Response<Full<Bytes>>
where
    T: DeserializeOwned,
    F: FnOnce(
        Arc<Deployer>,
        T,
    ) -> std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>,
{
    let input = match body::<T>(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let task = tokio::spawn(op(ctx.deployer.clone(), input));
    task.await.unwrap_or_else(|e| {
        error(&ApiError::new(
            ErrorKind::Internal,
            format!("operation task failed: {e}"),
        ))
    })
}

async fn route(ctx: &AdminCtx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let auth = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    if !crate::token::authorized(auth, &ctx.token) {
        return error(&ApiError::new(
            ErrorKind::Unauthorized,
            "missing or wrong bearer token",
        ));
    }
    let d = &ctx.deployer;
    match (req.method().clone(), req.uri().path()) {
        (Method::POST, "/v1/deploy") => {
            detached(ctx, req, |d, r| {
                Box::pin(async move { reply(d.deploy(r).await) })
            })
            .await
        }
        (Method::POST, "/v1/check") => {
            detached(ctx, req, |d, r| {
                Box::pin(async move { reply(d.check(r).await) })
            })
            .await
        }
        (Method::POST, "/v1/remove") => {
            detached(ctx, req, |d, r| {
                Box::pin(async move { reply(d.remove(r).await) })
            })
            .await
        }
        (Method::POST, "/v1/route") => {
            detached(ctx, req, |d, r| {
                Box::pin(async move { reply(d.settled(r).await) })
            })
            .await
        }
        (Method::POST, "/v1/flush") => match body::<luma_api::FlushRequest>(req).await {
            Ok(r) => reply(Ok(FlushReply {
                routes_refreshed: d.flush(&r.project),
                project: r.project,
            })),
            Err(resp) => resp,
        },
        (Method::POST, "/v1/certificates") => {
            match body::<luma_api::CertificatesRequest>(req).await {
                Ok(r) => match &d.tls {
                    Some(tls) => reply(Ok(tls.statuses(&d.router.specs(), &r))),
                    None => reply(Ok(luma_api::CertificatesReply::default())),
                },
                Err(resp) => resp,
            }
        }
        // The key is a secret: it leaves only in this reply, to a caller holding the token on
        // the loopback address (as `luma` does through `docker exec`), and is never logged.
        (Method::POST, "/v1/acme-account") => {
            match body::<luma_api::AcmeAccountRequest>(req).await {
                Ok(r) => match &d.tls {
                    Some(tls) => reply(
                        tls.account_key(&r.project)
                            .map(|key| luma_api::AcmeAccountReply { key }),
                    ),
                    None => reply(Ok(luma_api::AcmeAccountReply::default())),
                },
                Err(resp) => resp,
            }
        }
        (Method::GET, "/v1/routes") => reply(Ok(RoutesReply {
            routes: d
                .router
                .services()
                .iter()
                .map(|s| RouteState {
                    route: s.spec.clone(),
                    backends: s.reports(),
                })
                .collect(),
        })),
        (Method::GET, "/v1/status") => {
            let services = d.router.services();
            reply(Ok(StatusReply {
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_s: ctx.started.elapsed().as_secs(),
                routes: services.len(),
                backends: services.iter().map(|s| s.balancer.backends().len()).sum(),
                healthy_backends: services
                    .iter()
                    .map(|s| {
                        s.balancer
                            .backends()
                            .iter()
                            .filter(|b| b.is_healthy())
                            .count()
                    })
                    .sum(),
                inflight: services.iter().map(|s| s.inflight()).sum(),
                connections_open: ctx.metrics.connections_open(),
                requests_total: ctx.metrics.requests_total(),
            }))
        }
        (Method::GET, "/metrics") => metrics_response(&ctx.metrics),
        (_, path) => error(&ApiError::new(
            ErrorKind::NotFound,
            format!("no admin endpoint {path}; see `luma-proxy --help`"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_the_cap_logs_once_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
        let waits: Vec<(u64, bool)> = (0..10)
            .map(|_| {
                let (w, first) = b.failed();
                (w.as_millis() as u64, first)
            })
            .collect();
        assert_eq!(
            waits,
            vec![
                (5, true),
                (10, false),
                (20, false),
                (40, false),
                (80, false),
                (160, false),
                (320, false),
                (640, false),
                (1000, false),
                (1000, false)
            ]
        );
        assert!(b.succeeded(), "a success ends the run");
        assert!(!b.succeeded(), "a second success is not a recovery");
        assert_eq!(b.failed(), (Duration::from_millis(5), true));
    }
}
