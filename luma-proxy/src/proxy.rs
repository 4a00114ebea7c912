//! The request path: host -> service -> backend, with retries, timeouts and upgrades.
//!
//! Retry rules, in one place:
//! - a connect failure never sent anything, so any request moves once to another backend;
//! - a pooled connection found dead before writing is skipped transparently;
//! - a connection that dies after the request was written is retried once, elsewhere, only for
//!   GET, HEAD and OPTIONS without a body. A POST that was sent is never replayed: 502.
//!
//! Bodies stream both ways and are never buffered whole. The in-flight count of a backend runs
//! until the response body ends (or a tunnel closes), which is what deploy drains on.
//!
//! A request counts itself on its first backend before it touches anything, then checks that
//! its service was not stopped by a deploy meanwhile; if it was, it is routed again, untouched
//! (the handshake is explained in `service`). A retry counts itself on the next backend before
//! it releases the previous one.

use crate::backend::{Backend, InflightGuard, SendError};
use crate::headers;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::service::Service;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Body sent upstream: the client's streaming body, or nothing (replays).
pub enum UpstreamBody {
    Incoming(Incoming),
    Empty,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Incoming(b) => b.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Incoming(b) => b.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Body sent to the client: a streamed upstream response, or a short local one.
pub enum ResponseBody {
    Upstream {
        body: Incoming,
        /// Goes back to the backend's pool once the body has been read to the end.
        conn: Option<SendRequest<UpstreamBody>>,
        guard: Option<InflightGuard>,
    },
    Local(Option<Bytes>),
}

impl ResponseBody {
    pub fn local(text: impl Into<Bytes>) -> ResponseBody {
        ResponseBody::Local(Some(text.into()))
    }

    fn upstream(
        body: Incoming,
        conn: Option<SendRequest<UpstreamBody>>,
        guard: InflightGuard,
    ) -> ResponseBody {
        let mut b = ResponseBody::Upstream {
            body,
            conn,
            guard: Some(guard),
        };
        if b.is_end_stream() {
            b.finish();
        }
        b
    }

    fn finish(&mut self) {
        if let ResponseBody::Upstream { conn, guard, .. } = self {
            if let (Some(c), Some(g)) = (conn.take(), guard.as_ref()) {
                g.backend().checkin(c);
            }
            guard.take();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match this {
            ResponseBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream { body, conn, guard } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    // hyper stops polling once a length-delimited body has all its bytes, so
                    // "the last frame" is noticed here, not by waiting for a None that never
                    // comes; otherwise no connection would ever return to the pool.
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => this.finish(),
                    Poll::Ready(None) => this.finish(),
                    Poll::Ready(Some(Err(_))) => {
                        conn.take();
                        guard.take();
                    }
                    _ => {}
                }
                polled
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(b) => b.is_none(),
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Local(None) => SizeHint::with_exact(0),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// What the request path needs, shared by every connection.
pub struct ProxyCtx {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    pub access_log: bool,
    /// `http` now; `https` once TLS terminates here.
    pub proto: &'static str,
}

/// A short plain-text answer that says what went wrong and leaks nothing about other projects.
pub fn local_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::local(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Route lookups one request may make. A request that finds its service stopped by a deploy
/// looks again, and the second lookup finds the new service, which a deploy installs before it
/// stops the old one. The bound only matters for a stopped service that stays in the table
/// (shutdown): the last lookup is served whatever it finds.
pub const MAX_LOOKUPS: usize = 3;

/// What [`forward`] did with a request.
enum Forwarded {
    Done(Response<ResponseBody>, Option<SocketAddr>),
    /// The service was stopped before the request was counted on it. Nothing was sent and the
    /// request is handed back unchanged, to be routed again.
    Reroute(Request<Incoming>),
}

fn lookup(ctx: &ProxyCtx, req: &Request<Incoming>) -> Option<Arc<Service>> {
    headers::request_host(req.uri(), req.headers()).and_then(|h| ctx.router.lookup(h))
}

pub async fn handle(
    ctx: Arc<ProxyCtx>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ResponseBody> {
    let started = Instant::now();
    // Only the access log needs owned copies of the request line.
    let log = ctx.access_log.then(|| {
        let host = headers::request_host(req.uri(), req.headers())
            .unwrap_or("")
            .to_owned();
        (host, req.method().clone(), req.uri().path().to_owned())
    });
    let mut service = lookup(&ctx, &req);
    let mut lookups = 1;
    let (resp, backend) = loop {
        let Some(svc) = &service else {
            break (
                local_response(StatusCode::NOT_FOUND, "404 no route for this host\n"),
                None,
            );
        };
        match forward(&ctx, svc, req, peer, lookups < MAX_LOOKUPS).await {
            Forwarded::Done(resp, backend) => break (resp, backend),
            Forwarded::Reroute(r) => {
                req = r;
                lookups += 1;
                service = lookup(&ctx, &req);
            }
        }
    };
    ctx.metrics.count_response(resp.status());
    if let Some((host, method, path)) = log {
        crate::log::access(&crate::log::AccessLine {
            host: &host,
            method: method.as_str(),
            path: &path,
            status: resp.status().as_u16(),
            duration_us: started.elapsed().as_micros() as u64,
            route: service.as_ref().map(|s| s.spec.key().to_string()),
            backend: backend.map(|b| b.to_string()),
            client: peer.ip().to_string(),
        });
    }
    resp
}

fn is_replayable(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Sends the request to a backend of `svc`. With `may_reroute`, a request that finds `svc`
/// stopped (a deploy replaced it) comes back untouched as [`Forwarded::Reroute`].
async fn forward(
    ctx: &ProxyCtx,
    svc: &Arc<Service>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    may_reroute: bool,
) -> Forwarded {
    let Some(first) = svc.balancer.pick(None) else {
        if may_reroute && svc.is_stopped() {
            return Forwarded::Reroute(req);
        }
        return Forwarded::Done(
            local_response(StatusCode::SERVICE_UNAVAILABLE, "503 no healthy backend\n"),
            None,
        );
    };
    // Count first, then check: the request's half of the handshake with `Service::stop` and
    // `Service::drain` (see `service`). Nothing may be sent or changed before this check.
    let mut guard = first.begin();
    if may_reroute && svc.is_stopped() {
        drop(guard);
        return Forwarded::Reroute(req);
    }
    let upgrade = headers::is_upgrade(req.version(), req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    headers::prepare_upstream(&mut parts, peer.ip(), ctx.proto, upgrade);
    // Keep what a replay needs only when a replay is allowed.
    let mut replay =
        (is_replayable(&parts.method) && body.is_end_stream() && !upgrade).then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });
    let mut req = Request::from_parts(parts, UpstreamBody::Incoming(body));
    let timeout = Duration::from_millis(svc.spec.timeouts.response_ms);
    let mut backend = first;
    for attempt in 0..2 {
        let sent = tokio::time::timeout(timeout, backend.send(req)).await;
        let retry_req = match sent {
            Err(_) => {
                return Forwarded::Done(
                    local_response(StatusCode::GATEWAY_TIMEOUT, "504 upstream timed out\n"),
                    Some(backend.addr),
                )
            }
            Ok(Ok((resp, conn))) => {
                let addr = backend.addr;
                return Forwarded::Done(respond(resp, conn, guard, client_upgrade), Some(addr));
            }
            Ok(Err(SendError::Connect(e, r))) => {
                backend.mark_down(format!("connect: {e}"));
                ctx.metrics.count_connect_error();
                *r
            }
            Ok(Err(SendError::Sent(_))) => match replay.take() {
                Some((method, uri, headers)) => {
                    let mut r = Request::new(UpstreamBody::Empty);
                    *r.method_mut() = method;
                    *r.uri_mut() = uri;
                    *r.headers_mut() = headers;
                    r
                }
                None => {
                    return Forwarded::Done(
                        local_response(
                            StatusCode::BAD_GATEWAY,
                            "502 upstream closed the connection\n",
                        ),
                        Some(backend.addr),
                    )
                }
            },
        };
        if attempt == 1 {
            break;
        }
        ctx.metrics.count_retry();
        match svc.balancer.pick(Some(&backend)) {
            Some(next) => {
                // The next backend counts the request before the previous one lets it go, so
                // the service's in-flight count never dips to zero in between (a drain could
                // end there). Assigning drops the old guard after `begin` has run.
                guard = next.begin();
                backend = next;
                req = retry_req;
            }
            None => break,
        }
    }
    drop(guard);
    Forwarded::Done(
        local_response(StatusCode::BAD_GATEWAY, "502 upstream unreachable\n"),
        Some(backend.addr),
    )
}

fn respond(
    mut resp: Response<Incoming>,
    conn: SendRequest<UpstreamBody>,
    guard: InflightGuard,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ResponseBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            let backend = guard.backend().clone();
            tokio::spawn(tunnel(client, upstream, backend, guard));
            // The connection now belongs to the tunnel; it never returns to the pool.
            let (parts, _empty) = resp.into_parts();
            drop(conn);
            return Response::from_parts(parts, ResponseBody::Local(None));
        }
    }
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, ResponseBody::upstream(body, Some(conn), guard))
}

/// Copies bytes both ways until either side closes or the backend is retired after a drain.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    backend: Arc<Backend>,
    _guard: InflightGuard,
) {
    let (Ok(c), Ok(u)) = tokio::join!(client, upstream) else {
        return;
    };
    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
    let mut retired = backend.retired();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
        _ = retired.wait_for(|r| *r) => {}
    }
}
