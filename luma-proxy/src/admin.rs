//! The admin API: JSON over HTTP/1.1 on a loopback address, every call behind a bearer token.
//!
//! | method | path          | body                | does                                     |
//! |--------|---------------|---------------------|------------------------------------------|
//! | POST   | /v1/deploy    | `DeployRequest`     | the deploy contract (see `deploy`)       |
//! | POST   | /v1/check     | `CheckRequest`      | health-check a target without switching  |
//! | POST   | /v1/remove    | `RemoveRequest`     | remove a route and drain it              |
//! | POST   | /v1/flush     | `{"project": "p"}`  | re-resolve a project's routes now        |
//! | GET    | /v1/routes    |                     | routes with per-backend health           |
//! | GET    | /v1/status    |                     | version, uptime, counts                  |
//! | GET    | /metrics      |                     | Prometheus text                          |
//!
//! The `luma-proxy` binary is the client of this API, so `docker exec <proxy> luma-proxy …` is
//! all the CLI needs; the proxy never needs docker.sock.

use crate::deploy::{CheckRequest, DeployError, DeployRequest, Deployer, RemoveRequest};
use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
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
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
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

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{v:#}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({"error": msg.into()}))
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("cannot read body (max 1 MiB): {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn outcome<T: serde::Serialize>(r: Result<T, DeployError>) -> Response<Full<Bytes>> {
    match r {
        Ok(v) => json(StatusCode::OK, &serde_json::to_value(v).unwrap_or_default()),
        Err(e) => json(e.status(), &e.to_json()),
    }
}

async fn route(ctx: &AdminCtx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let auth = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    if !crate::token::authorized(auth, &ctx.token) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let d = &ctx.deployer;
    match (req.method().clone(), req.uri().path()) {
        (Method::POST, "/v1/deploy") => match body::<DeployRequest>(req).await {
            Ok(r) => outcome(d.deploy(r).await),
            Err(resp) => resp,
        },
        (Method::POST, "/v1/check") => match body::<CheckRequest>(req).await {
            Ok(r) => outcome(d.check(r).await),
            Err(resp) => resp,
        },
        (Method::POST, "/v1/remove") => match body::<RemoveRequest>(req).await {
            Ok(r) => outcome(d.remove(r).await),
            Err(resp) => resp,
        },
        (Method::POST, "/v1/flush") => match body::<serde_json::Value>(req).await {
            Ok(v) => match v.get("project").and_then(|p| p.as_str()) {
                Some(p) => json(
                    StatusCode::OK,
                    &serde_json::json!({"project": p, "routes_refreshed": d.flush(p)}),
                ),
                None => error(
                    StatusCode::BAD_REQUEST,
                    "body must be {\"project\": \"NAME\"}",
                ),
            },
            Err(resp) => resp,
        },
        (Method::GET, "/v1/routes") => {
            let routes: Vec<_> = d
                .router
                .services()
                .iter()
                .map(|s| serde_json::json!({"route": s.spec, "backends": s.reports()}))
                .collect();
            json(StatusCode::OK, &serde_json::json!({"routes": routes}))
        }
        (Method::GET, "/v1/status") => {
            let services = d.router.services();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_s": ctx.started.elapsed().as_secs(),
                    "routes": services.len(),
                    "backends": services.iter().map(|s| s.balancer.backends().len()).sum::<usize>(),
                    "healthy_backends": services.iter().map(|s| s.balancer.backends().iter().filter(|b| b.is_healthy()).count()).sum::<usize>(),
                    "inflight": services.iter().map(|s| s.inflight()).sum::<usize>(),
                    "connections_open": ctx.metrics.connections_open.load(std::sync::atomic::Ordering::Relaxed),
                    "requests_total": ctx.metrics.requests_total(),
                }),
            )
        }
        (Method::GET, "/metrics") => {
            let mut out = String::new();
            ctx.metrics.render(&mut out);
            out.push_str("# TYPE luma_proxy_backend_healthy gauge\n# TYPE luma_proxy_backend_inflight gauge\n# TYPE luma_proxy_backend_requests_total counter\n");
            for s in d.router.services() {
                for b in s.balancer.backends().iter() {
                    let l = format!(
                        "project=\"{}\",app=\"{}\",backend=\"{}\"",
                        s.spec.project, s.spec.app, b.addr
                    );
                    out.push_str(&format!(
                        "luma_proxy_backend_healthy{{{l}}} {}\nluma_proxy_backend_inflight{{{l}}} {}\nluma_proxy_backend_requests_total{{{l}}} {}\n",
                        b.is_healthy() as u8,
                        b.inflight(),
                        b.requests()
                    ));
                }
            }
            let mut r = Response::new(Full::new(Bytes::from(out)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (_, path) => error(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint {path}; see `luma-proxy --help`"),
        ),
    }
}
