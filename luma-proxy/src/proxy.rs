//! The request path: host -> service -> backend, with retries, timeouts and upgrades.
//!
//! Retry rules, in one place:
//! - a connect failure never sent anything, so any request moves once to another backend;
//! - a pooled connection found dead before writing is skipped transparently;
//! - a connection that dies after the request was written is retried once, elsewhere, only for
//!   GET, HEAD and OPTIONS without a body. A POST that was sent is never replayed: 502. So a
//!   request that cannot be replayed is only sent on a connection proven alive very recently
//!   (the reuse rule is in `backend`), and a replay is too.
//!
//! Upstream limits, per route:
//! - `limits.max_body_bytes`: a declared Content-Length above it is answered 413 before
//!   anything goes upstream; a streamed body stops being forwarded at the cap, answered 413 if
//!   no response has started, cut otherwise.
//! - `timeouts.response_ms` runs from the end of the request body to the response head (504),
//!   so a slow upload is not cut by it. While the body uploads, the clock restarts on every
//!   chunk: a body that moves nothing for that long is answered 408 when the client stopped
//!   sending, 504 when the backend stopped reading (both close the client connection, whose
//!   body was not read whole). A chunked body's first chunk, read before anything goes
//!   upstream, gets the same bound: 408.
//!
//! HTTPS answers ahead of routing: on the TLS listener, a request whose Host the connection's
//! certificate does not cover, or whose route is in another project than that certificate's,
//! gets 421 (`misdirected`); on plain HTTP, ACME HTTP-01 tokens the proxy ordered and
//! the 308 to https once the host's own certificate is usable (`tls_answer`).
//!
//! Bodies stream both ways and are never buffered whole. The in-flight count of a backend runs
//! until the response body ends (or a tunnel closes), which is what deploy drains on.
//!
//! A request counts itself on its first backend before it touches anything, then checks that
//! its service was not stopped by a deploy meanwhile; if it was, it is routed again, untouched
//! (the handshake is explained in `service`). A retry counts itself on the next backend before
//! it releases the previous one.

use crate::backend::{Answered, Backend, InflightGuard, Reuse, SendError};
use crate::headers;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::service::Service;
use crate::tls::book::Entry;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::http::request::Parts;
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
    /// A chunked client body whose first frame `read_first_chunk` read (to check its framing
    /// before anything goes upstream): that frame, then the rest.
    Peeked(Option<Frame<Bytes>>, Incoming),
    Empty,
}

impl UpstreamBody {
    /// The client's body, with the frame `read_first_chunk` may have read first (see
    /// [`FirstFrame`]).
    fn client(body: Incoming, extensions: &mut hyper::http::Extensions) -> UpstreamBody {
        match extensions.remove::<FirstFrame>() {
            Some(FirstFrame::Data(d)) => UpstreamBody::Peeked(Some(Frame::data(d)), body),
            Some(FirstFrame::Trailers(t)) => UpstreamBody::Peeked(Some(Frame::trailers(t)), body),
            None => UpstreamBody::Incoming(body),
        }
    }
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
            UpstreamBody::Peeked(first, b) => match first.take() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => Pin::new(b).poll_frame(cx),
            },
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Incoming(b) => b.is_end_stream(),
            UpstreamBody::Peeked(first, b) => first.is_none() && b.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Incoming(b) => b.size_hint(),
            // Only chunked bodies are peeked: their length is not known.
            UpstreamBody::Peeked(..) => SizeHint::default(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A body error as hyper's client gets it. A client body error is passed on as the
/// `hyper::Error` itself (what `headers::is_client_body_error` looks for), the cap as
/// [`BodyTooLarge`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body went past its route's `limits.max_body_bytes`.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body larger than the route's limits.max_body_bytes")
    }
}

impl std::error::Error for BodyTooLarge {}

/// What goes upstream: an [`UpstreamBody`] cut at the route's body cap (no frame that would
/// pass it is forwarded), reporting its progress to the response timeout's [`UploadClock`].
pub struct Upload {
    body: UpstreamBody,
    /// Bytes the cap still allows.
    left: u64,
    clock: Option<Arc<UploadClock>>,
    /// Told when the client's body has been read to its end (a parked connection's rule).
    watch: Option<crate::park::BodyWatch>,
}

impl Upload {
    fn new(body: UpstreamBody, cap: u64, clock: Option<Arc<UploadClock>>) -> Upload {
        Upload {
            body,
            left: cap,
            clock,
            watch: None,
        }
    }

    fn watched_by(mut self, watch: Option<crate::park::BodyWatch>) -> Upload {
        self.watch = watch;
        self
    }

    fn read_to_end(&self) {
        if let Some(w) = &self.watch {
            w.ended();
        }
    }

    /// No body (replays).
    fn empty() -> Upload {
        Upload::new(UpstreamBody::Empty, 0, None)
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => {
                if let Some(c) = &this.clock {
                    c.waiting_on_client();
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if n > this.left {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    this.left -= n;
                }
                let end = this.body.is_end_stream();
                if let Some(c) = &this.clock {
                    c.progress(end);
                }
                if end {
                    this.read_to_end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => {
                if let Some(c) = &this.clock {
                    c.progress(true);
                }
                this.read_to_end();
                Poll::Ready(None)
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How far a request body's upload has got: written by the body as the upstream connection's
/// task polls it, read by the response timeout in [`forward`]. One atomic word: the time of
/// the last chunk passed on (in microseconds since `start`), whether it was the last one, and
/// whether the body is now waiting for the client.
pub struct UploadClock {
    start: tokio::time::Instant,
    state: std::sync::atomic::AtomicU64,
}

const UPLOAD_DONE: u64 = 1 << 63;
const UPLOAD_WAITING: u64 = 1 << 62;
const UPLOAD_TIME: u64 = UPLOAD_WAITING - 1;

impl UploadClock {
    fn new() -> UploadClock {
        UploadClock {
            start: tokio::time::Instant::now(),
            state: std::sync::atomic::AtomicU64::new(0),
        }
    }

    // Only the body writes, so a plain load and store suffice; Relaxed, as nothing else is
    // published through this word.
    fn progress(&self, done: bool) {
        let us = (self.start.elapsed().as_micros() as u64).min(UPLOAD_TIME);
        let flag = if done { UPLOAD_DONE } else { 0 };
        self.state
            .store(us | flag, std::sync::atomic::Ordering::Relaxed);
    }

    fn waiting_on_client(&self) {
        let s = self.state.load(std::sync::atomic::Ordering::Relaxed);
        if s & (UPLOAD_DONE | UPLOAD_WAITING) == 0 {
            self.state
                .store(s | UPLOAD_WAITING, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// True once the whole body has been passed on.
    fn is_done(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Relaxed) & UPLOAD_DONE != 0
    }

    /// When the upload last moved (or ended), and the flags.
    fn read(&self) -> (tokio::time::Instant, u64) {
        let s = self.state.load(std::sync::atomic::Ordering::Relaxed);
        (
            self.start + Duration::from_micros(s & UPLOAD_TIME),
            s & !UPLOAD_TIME,
        )
    }
}

/// Why no response head came in time.
enum Late {
    /// The request was sent and no response head came within the response timeout: 504.
    Response,
    /// The body moved nothing for the response timeout: the client stopped sending (408), or
    /// the backend stopped reading (504).
    Upload { client: bool },
}

/// Waits for `send` under the response timeout, which runs from the end of the request body
/// (from the start without one). While a body uploads, the clock restarts on every chunk, so a
/// slow upload is not cut, but one that stalls is. The timer is re-armed lazily, when it fires.
///
/// `send` comes pinned by the caller: a future moved in by value and pinned here would take its
/// room twice in this one's state (the argument's slot and the pinned local), and every byte of
/// a request's future state is copied at each await level (see docs/profile.md).
async fn within_response_timeout<F: std::future::Future>(
    mut send: Pin<&mut F>,
    clock: Option<&UploadClock>,
    timeout: Duration,
) -> Result<F::Output, Late> {
    let mut sleep = std::pin::pin!(tokio::time::sleep(timeout));
    loop {
        tokio::select! {
            biased;
            r = send.as_mut() => return Ok(r),
            _ = &mut sleep => {}
        }
        let Some(clock) = clock else {
            return Err(Late::Response);
        };
        let (at, flags) = clock.read();
        let deadline = at + timeout;
        if deadline <= tokio::time::Instant::now() {
            return Err(if flags & UPLOAD_DONE != 0 {
                Late::Response
            } else {
                Late::Upload {
                    client: flags & UPLOAD_WAITING != 0,
                }
            });
        }
        sleep.as_mut().reset(deadline);
    }
}

/// A local answer after which the HTTP/1 connection closes: its request body was not read
/// (whole), so the connection's framing cannot be trusted.
fn closing_local(
    version: hyper::Version,
    status: StatusCode,
    text: &'static str,
) -> Response<ResponseBody> {
    let mut r = local_response(status, text);
    if version < hyper::Version::HTTP_2 {
        r.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn too_large(version: hyper::Version) -> Response<ResponseBody> {
    closing_local(
        version,
        StatusCode::PAYLOAD_TOO_LARGE,
        "413 request body too large\n",
    )
}

/// True when an upstream send failed because the body went past its cap.
fn is_too_large(e: &hyper::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<BodyTooLarge>())
}

/// Body sent to the client: a streamed upstream response, or a short local one.
pub enum ResponseBody {
    Upstream {
        body: Incoming,
        /// Goes back to the backend's pool once the body has been read to the end, if the
        /// request body has been sent whole by then.
        conn: Option<Answered>,
        /// The request body's progress (None: there was none).
        upload: Option<Arc<UploadClock>>,
        guard: Option<InflightGuard>,
    },
    /// An answer read by the inline client (`inline`): its socket goes back to the pool from
    /// here once the body has ended.
    Inline {
        body: crate::inline::InlineBody,
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
        conn: Answered,
        upload: Option<Arc<UploadClock>>,
        guard: InflightGuard,
    ) -> ResponseBody {
        let mut b = ResponseBody::Upstream {
            body,
            conn: Some(conn),
            upload,
            guard: Some(guard),
        };
        if b.is_end_stream() {
            b.finish();
        }
        b
    }

    fn finish(&mut self) {
        if let ResponseBody::Upstream {
            conn,
            upload,
            guard,
            ..
        } = self
        {
            // A connection still uploading (the backend answered before the body ended) would
            // make the next request wait for that upload: it is dropped, and closes once done.
            let uploaded = upload.as_ref().is_none_or(|u| u.is_done());
            if let (Some(c), Some(g), true) = (conn.take(), guard.as_ref(), uploaded) {
                g.backend().checkin(c);
            }
            guard.take();
        }
        if let ResponseBody::Inline { body, guard } = self {
            if let (Some(r), Some(g)) = (body.take_reusable(), guard.as_ref()) {
                g.backend().inline_checkin(r);
            }
            guard.take();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this {
            ResponseBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Inline { body, guard } => {
                let polled = body.poll_frame(cx);
                match &polled {
                    // As below: the last frame of a length-delimited body may be the last poll.
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => this.finish(),
                    Poll::Ready(None) => this.finish(),
                    Poll::Ready(Some(Err(_))) => {
                        guard.take();
                    }
                    Poll::Pending | Poll::Ready(Some(Ok(_))) => {}
                }
                polled.map(|f| f.map(|r| r.map_err(BoxError::from)))
            }
            ResponseBody::Upstream {
                body, conn, guard, ..
            } => {
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
                polled.map(|f| f.map(|r| r.map_err(BoxError::from)))
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(b) => b.is_none(),
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Inline { body, .. } => body.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Local(None) => SizeHint::with_exact(0),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Inline { body, .. } => body.size_hint(),
        }
    }
}

/// Which listener a context serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// As `X-Forwarded-Proto` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What the request path needs, shared by every connection.
pub struct ProxyCtx {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    /// Where each request's line goes (None: `--no-access-log`).
    pub access_log: Option<Arc<crate::access::AccessLog>>,
    /// The listener this context serves (`X-Forwarded-Proto`, redirects, HSTS, 421).
    pub scheme: Scheme,
    /// Peers whose forwarded headers are believed (see `headers`).
    pub trusted_proxies: headers::TrustedProxies,
    /// Certificates held and ACME HTTP-01 tokens in flight (None: no HTTPS at all).
    pub certs: Option<Arc<crate::tls::book::CertBook>>,
    /// The HTTPS port clients see, named in a redirect when it is not 443.
    pub https_public_port: u16,
}

/// Where ACME HTTP-01 validators ask for tokens.
pub const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// `Strict-Transport-Security` for routes with `hsts` (one year).
const HSTS: HeaderValue = HeaderValue::from_static("max-age=31536000");

/// The answers HTTPS adds ahead of routing: an HTTP-01 token the proxy ordered (for the host
/// it was ordered for), and on plain HTTP the 308 to https for a route with `redirect` whose
/// host has a usable certificate. Challenges are never redirected.
fn tls_answer(
    ctx: &ProxyCtx,
    req: &Parts,
    service: Option<&Arc<Service>>,
) -> Option<Response<ResponseBody>> {
    let certs = ctx.certs.as_ref()?;
    let path = req.uri.path();
    // Only a challenge or a redirect needs the host: most requests are neither, and skip it.
    let host =
        || headers::request_host(&req.uri, &req.headers).map(crate::router::normalize_request_host);
    if let Some(token) = path.strip_prefix(ACME_CHALLENGE_PATH) {
        let host = host()?;
        if certs.has_tokens() {
            if let Some(answer) = certs.http01(token, &host) {
                let mut r = Response::new(ResponseBody::local(answer));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                return Some(r);
            }
        }
        return None;
    }
    if ctx.scheme != Scheme::Http {
        return None;
    }
    let service = service?;
    let tls = service.spec.tls.as_ref()?;
    if !tls.redirect {
        return None;
    }
    let host = host()?;
    if !certs.usable(&host, &service.spec.project, luma_api::time::unix_now()) {
        return None;
    }
    let port = match ctx.https_public_port {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let tail = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = HeaderValue::from_str(&format!("https://{host}{port}{tail}")).ok()?;
    let mut r = local_response(
        StatusCode::PERMANENT_REDIRECT,
        "308 this site is served over https\n",
    );
    r.headers_mut().insert(hyper::header::LOCATION, location);
    Some(r)
}

/// On HTTPS, a request whose Host the connection's certificate (picked by SNI at the
/// handshake) does not cover, or whose route is in another project than that certificate's,
/// is answered 421 (RFC 9110 section 15.5.20): the client connects again for that name and
/// gets that host's own certificate. HTTP/2 clients reuse one connection for every name its
/// certificate covers; within one project that is served as usual.
fn misdirected(
    req: &Parts,
    service: Option<&Arc<Service>>,
    cert: Option<&Entry>,
) -> Option<Response<ResponseBody>> {
    let cert = cert?;
    let host =
        headers::request_host(&req.uri, &req.headers).map(crate::router::normalize_request_host)?;
    if cert.serves(&host, service.map(|s| s.spec.project.as_str())) {
        return None;
    }
    Some(local_response(
        StatusCode::MISDIRECTED_REQUEST,
        "421 this connection's certificate is not for this host; connect again with this host's name\n",
    ))
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

/// What [`forward`] did with a request. Not boxed: one is returned per request, and a box
/// would cost an allocation where the size only costs a copy.
#[allow(clippy::large_enum_variant)]
enum Forwarded {
    Done(Response<ResponseBody>, Option<SocketAddr>),
    /// The service was stopped before the request was counted on it. Nothing was sent: the
    /// body is handed back, and the head (which the caller kept) is unchanged, to be routed
    /// again.
    Reroute(Incoming),
}

fn lookup(ctx: &ProxyCtx, head: &Parts) -> Option<Arc<Service>> {
    headers::request_host(&head.uri, &head.headers).and_then(|h| ctx.router.lookup(h))
}

/// Serves one request. `cert`: on HTTPS, the certificate the connection's handshake was
/// admitted with (see `tls::book`).
///
/// The head stays in this function's state and the steps below borrow it: a request moved
/// by value through each async step is copied whole at every level (`docs/profile.md`).
pub async fn handle(
    ctx: Arc<ProxyCtx>,
    req: Request<Incoming>,
    peer: headers::Peer,
    cert: Option<&Entry>,
) -> Response<ResponseBody> {
    let (mut head, body) = req.into_parts();
    // Only the access log needs the clock and owned copies of the request line.
    let log = ctx.access_log.is_some().then(|| {
        let host = headers::request_host(&head.uri, &head.headers)
            .unwrap_or("")
            .to_owned();
        (
            Instant::now(),
            host,
            head.method.clone(),
            head.uri.path().to_owned(),
        )
    });
    let mut service = None;
    let (resp, backend) = match admit(&head) {
        Some(refused) => (refused, None),
        None => {
            service = lookup(&ctx, &head);
            match misdirected(&head, service.as_ref(), cert)
                .or_else(|| tls_answer(&ctx, &head, service.as_ref()))
            {
                Some(answer) => (answer, None),
                None => route(&ctx, &mut service, &mut head, body, &peer).await,
            }
        }
    };
    let mut resp = resp;
    if ctx.scheme == Scheme::Https
        && service
            .as_ref()
            .and_then(|s| s.spec.tls.as_ref())
            .is_some_and(|t| t.hsts)
    {
        resp.headers_mut()
            .entry(hyper::header::STRICT_TRANSPORT_SECURITY)
            .or_insert(HSTS);
    }
    // Local answers are the ones with a local body (a 101's empty one is no error code).
    let local = matches!(resp.body(), ResponseBody::Local(_));
    ctx.metrics.count_response(resp.status(), local);
    if let (Some((started, host, method, path)), Some(access)) = (log, &ctx.access_log) {
        access.write(&crate::access::AccessLine {
            host: &host,
            method: method.as_str(),
            path: &path,
            status: resp.status().as_u16(),
            duration_us: started.elapsed().as_micros() as u64,
            route: service
                .as_ref()
                .map(|s| (s.spec.project.as_str(), s.spec.app.as_str())),
            backend,
            client: peer.ip(),
        });
    }
    resp
}

/// The first frame of a chunked request body, read by [`read_first_chunk`] and sent upstream
/// first.
#[derive(Clone)]
enum FirstFrame {
    Data(Bytes),
    Trailers(hyper::HeaderMap),
}

/// The strict checks a request head passes before it is routed (see [`headers::refuse`]).
fn admit(head: &Parts) -> Option<Response<ResponseBody>> {
    match headers::refuse(&head.method, head.version, &head.uri, &head.headers)? {
        headers::Refusal::MethodNotAllowed => {
            let mut r = local_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "405 CONNECT and TRACE are not served\n",
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                HeaderValue::from_static(headers::ALLOWED_METHODS),
            );
            Some(r)
        }
        headers::Refusal::BadRequest(text) => {
            Some(closing(local_response(StatusCode::BAD_REQUEST, text)))
        }
    }
}

/// Serves an admitted request on `service`, looking it up again when a deploy stopped it
/// meanwhile (the last lookup is left in `service` for the access log).
async fn route(
    ctx: &ProxyCtx,
    service: &mut Option<Arc<Service>>,
    head: &mut Parts,
    mut body: Incoming,
    peer: &headers::Peer,
) -> (Response<ResponseBody>, Option<SocketAddr>) {
    if let Some(svc) = service.as_ref() {
        let timeout = Duration::from_millis(svc.spec.timeouts.response_ms);
        if let Err(refused) = read_first_chunk(head, &mut body, timeout).await {
            return (refused, None);
        }
    }
    let mut lookups = 1;
    loop {
        let Some(svc) = service.as_ref() else {
            return (
                local_response(StatusCode::NOT_FOUND, "404 no route for this host\n"),
                None,
            );
        };
        match forward(ctx, svc, head, body, peer, lookups < MAX_LOOKUPS).await {
            Forwarded::Done(resp, backend) => return (resp, backend),
            Forwarded::Reroute(b) => {
                body = b;
                lookups += 1;
                *service = lookup(ctx, head);
            }
        }
    }
}

/// Reads a chunked body's first frame before anything goes upstream (it is sent first, see
/// [`UpstreamBody::Peeked`]), so a body whose framing is bad from its first chunk is answered
/// 400 with nothing sent; a framing error further on is answered 400 by `forward` while no
/// response has started, once the backend has seen the start of the body.
///
/// The wait is bounded by the route's response timeout, the bound an upload gets between any
/// two chunks once it streams (see [`within_response_timeout`]): the first chunk is no
/// different, and the route's operator has already sized it for that route's clients. A client
/// that sends chunked headers and then nothing is answered 408, and the connection closed,
/// instead of holding its connection slot until the idle timeout.
async fn read_first_chunk(
    head: &mut Parts,
    body: &mut Incoming,
    timeout: Duration,
) -> Result<(), Response<ResponseBody>> {
    if !headers::has_chunked_body(head.version, &head.headers) {
        return Ok(());
    }
    use http_body_util::BodyExt;
    let version = head.version;
    let first = match tokio::time::timeout(timeout, body.frame()).await {
        Err(_) => {
            return Err(closing_local(
                version,
                StatusCode::REQUEST_TIMEOUT,
                "408 request body timed out\n",
            ))
        }
        Ok(None) => None,
        Ok(Some(Err(_))) => return Err(bad_body()),
        Ok(Some(Ok(f))) => match f.into_data() {
            Ok(d) => Some(FirstFrame::Data(d)),
            Err(f) => f.into_trailers().ok().map(FirstFrame::Trailers),
        },
    };
    if let Some(first) = first {
        head.extensions.insert(first);
    }
    Ok(())
}

/// A 400 for a request body whose framing broke (hyper closes that connection).
fn bad_body() -> Response<ResponseBody> {
    closing(local_response(
        StatusCode::BAD_REQUEST,
        "400 malformed request body\n",
    ))
}

/// After a malformed request, the connection's framing cannot be trusted: close it.
fn closing(mut r: Response<ResponseBody>) -> Response<ResponseBody> {
    r.headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A copy of a request head as it went upstream, for the one replay a GET, HEAD or OPTIONS
/// without a body may get (the module doc's retry rules): hyper keeps no request it has
/// written. The headers are kept as a list, not a `HeaderMap` clone: no index table to
/// allocate and copy for a copy that is almost always dropped unused.
struct Replay {
    method: Method,
    uri: hyper::Uri,
    headers: Vec<(hyper::header::HeaderName, HeaderValue)>,
}

impl Replay {
    fn of(parts: &Parts) -> Replay {
        Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// The same head again, without a body; repeated names keep their order.
    fn request(self) -> Request<Upload> {
        let mut r = Request::new(Upload::empty());
        *r.method_mut() = self.method;
        *r.uri_mut() = self.uri;
        let headers = r.headers_mut();
        headers.reserve(self.headers.len());
        for (k, v) in self.headers {
            headers.append(k, v);
        }
        r
    }
}

fn is_replayable(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Sends the request to a backend of `svc`. With `may_reroute`, a request that finds `svc`
/// stopped (a deploy replaced it) comes back untouched as [`Forwarded::Reroute`]: its body
/// handed back, `parts` unchanged. Once it is sent, `parts` holds the head as it went
/// upstream, or an empty head when hyper's client took it.
async fn forward(
    ctx: &ProxyCtx,
    svc: &Arc<Service>,
    parts: &mut Parts,
    body: Incoming,
    peer: &headers::Peer,
    may_reroute: bool,
) -> Forwarded {
    // A declared length above the cap is refused before anything goes upstream.
    let cap = svc.spec.limits.max_body_bytes;
    if body.size_hint().lower() > cap {
        return Forwarded::Done(too_large(parts.version), None);
    }
    let Some(first) = svc.balancer.pick(None) else {
        if may_reroute && svc.is_stopped() {
            return Forwarded::Reroute(body);
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
        return Forwarded::Reroute(body);
    }
    let upgrade = headers::is_upgrade(parts.version, &parts.headers);
    // What `hyper::upgrade::on` takes from a request: hyper's HTTP/1.1 server puts it on
    // every request with `Upgrade` (a superset of `is_upgrade`'s).
    let client_upgrade = upgrade
        .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    headers::prepare_upstream(
        parts,
        peer,
        ctx.scheme.as_str(),
        &ctx.trusted_proxies,
        upgrade,
    );
    // With the frame `read_first_chunk` may have read first: a body that is all in that frame
    // is not empty.
    let body = UpstreamBody::client(body, &mut parts.extensions);
    let watch = parts.extensions.remove::<crate::park::BodyWatch>();
    let replayable = is_replayable(&parts.method) && body.is_end_stream() && !upgrade;
    if replayable && frames_no_body(&parts.headers) {
        // No body, no upgrade, replayable: the inline client's (see `inline`). The body was
        // read to its end (a chunked one may have been, by `read_first_chunk`).
        if let Some(w) = watch {
            w.ended();
        }
        drop(body);
        return forward_inline(ctx, svc, parts, first, guard).await;
    }
    // Keep what a replay needs only when a replay is allowed.
    let mut replay = replayable.then(|| Replay::of(parts));
    let version = parts.version;
    // A request that cannot be replayed only goes on a connection proven alive (`backend`).
    let mut reuse = if replay.is_some() {
        Reuse::Any
    } else {
        Reuse::Recent
    };
    let clock = (!body.is_end_stream()).then(|| Arc::new(UploadClock::new()));
    // hyper's client takes the head by value; the caller's is left empty (no allocation).
    let head = std::mem::replace(parts, Request::new(()).into_parts().0);
    let mut req = Request::from_parts(
        head,
        Upload::new(body, cap, clock.clone()).watched_by(watch),
    );
    let timeout = Duration::from_millis(svc.spec.timeouts.response_ms);
    let mut backend = first;
    for attempt in 0..2 {
        let sent = {
            let send = std::pin::pin!(backend.send(req, reuse));
            within_response_timeout(send, clock.as_deref(), timeout).await
        };
        let retry_req = match sent {
            Err(Late::Upload { client: true }) => {
                return Forwarded::Done(
                    closing_local(
                        version,
                        StatusCode::REQUEST_TIMEOUT,
                        "408 request body timed out\n",
                    ),
                    Some(backend.addr),
                )
            }
            Err(Late::Response) => {
                return Forwarded::Done(
                    local_response(StatusCode::GATEWAY_TIMEOUT, "504 upstream timed out\n"),
                    Some(backend.addr),
                )
            }
            // The client's body was not read whole: its connection cannot carry another
            // request. (The abandoned upstream connection is aborted, see `backend`, so the body
            // is let go and the client connection closes after this answer.)
            Err(Late::Upload { client: false }) => {
                return Forwarded::Done(
                    closing_local(
                        version,
                        StatusCode::GATEWAY_TIMEOUT,
                        "504 upstream timed out\n",
                    ),
                    Some(backend.addr),
                )
            }
            Ok(Ok((resp, conn))) => {
                let addr = backend.addr;
                return Forwarded::Done(
                    respond(resp, conn, clock, guard, client_upgrade),
                    Some(addr),
                );
            }
            Ok(Err(SendError::Connect(e, r))) => {
                backend.mark_down(format!("connect: {e}"));
                ctx.metrics.count_connect_error();
                *r
            }
            // The body went past the route's cap and no response has started (once one has,
            // the connection is cut and the response aborts).
            Ok(Err(SendError::Sent(e))) if is_too_large(&e) => {
                return Forwarded::Done(too_large(version), Some(backend.addr))
            }
            // The client's body broke (bad chunked framing, cut short) and no response has
            // started: the client's fault, not the upstream's.
            Ok(Err(SendError::Sent(e))) if headers::is_client_body_error(&e) => {
                return Forwarded::Done(bad_body(), Some(backend.addr))
            }
            Ok(Err(SendError::Sent(_))) => match replay.take() {
                Some(replay) => {
                    // The connection died under it: the replay takes no chances either.
                    reuse = Reuse::Recent;
                    replay.request()
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
        if attempt == 1 || !next_backend(ctx, svc, &mut backend, &mut guard) {
            break;
        }
        req = retry_req;
    }
    unreachable(backend, guard)
}

/// Moves a request that failed on `backend` to another one of `svc`'s, counting the retry;
/// false when there is none. The next backend counts the request before the previous one lets
/// it go, so the service's in-flight count never dips to zero in between (a drain could end
/// there): assigning drops the old guard after `begin` has run.
fn next_backend(
    ctx: &ProxyCtx,
    svc: &Service,
    backend: &mut Arc<Backend>,
    guard: &mut InflightGuard,
) -> bool {
    ctx.metrics.count_retry();
    match svc.balancer.pick(Some(&*backend)) {
        Some(next) => {
            *guard = next.begin();
            *backend = next;
            true
        }
        None => false,
    }
}

/// The answer when no backend took the request: the in-flight count is let go first.
fn unreachable(backend: Arc<Backend>, guard: InflightGuard) -> Forwarded {
    drop(guard);
    Forwarded::Done(
        local_response(StatusCode::BAD_GATEWAY, "502 upstream unreachable\n"),
        Some(backend.addr),
    )
}

/// True when the head frames no body: the inline client writes heads as they are, and a
/// `Content-Length` above 0 would make the backend read the next request as this one's body.
fn frames_no_body(headers: &hyper::HeaderMap) -> bool {
    !headers.contains_key(hyper::header::TRANSFER_ENCODING)
        && headers
            .get_all(hyper::header::CONTENT_LENGTH)
            .iter()
            .all(|v| v.as_bytes() == b"0")
}

/// [`forward`] for a request the inline client takes: the same attempts (one more on the next
/// backend after a failure), the same response timeout and the same local answers.
async fn forward_inline(
    ctx: &ProxyCtx,
    svc: &Arc<Service>,
    parts: &Parts,
    mut backend: Arc<Backend>,
    mut guard: InflightGuard,
) -> Forwarded {
    let timeout = Duration::from_millis(svc.spec.timeouts.response_ms);
    // The replay takes a new socket (the next backend's, when there is another).
    let mut reuse = Some(Reuse::Any);
    for attempt in 0..2 {
        let sent = {
            let send = std::pin::pin!(crate::inline::exchange(&backend, parts, reuse));
            within_response_timeout(send, None, timeout).await
        };
        match sent {
            Ok(Ok(answer)) => {
                let addr = backend.addr;
                let (head, body) = crate::inline::InlineBody::new(answer);
                let mut resp = Response::new(ResponseBody::Inline {
                    body,
                    guard: Some(guard),
                });
                *resp.status_mut() = head.status;
                *resp.version_mut() = head.version;
                *resp.headers_mut() = head.headers;
                headers::strip_hop_by_hop(resp.headers_mut(), false);
                // An answer without a body may never be polled: its socket goes back now.
                if resp.body().is_end_stream() {
                    resp.body_mut().finish();
                }
                return Forwarded::Done(resp, Some(addr));
            }
            // No clock: only the answer can be late.
            Err(_) => {
                return Forwarded::Done(
                    local_response(StatusCode::GATEWAY_TIMEOUT, "504 upstream timed out\n"),
                    Some(backend.addr),
                )
            }
            Ok(Err(crate::inline::Failed::Connect(e))) => {
                backend.mark_down(format!("connect: {e}"));
                ctx.metrics.count_connect_error();
            }
            Ok(Err(crate::inline::Failed::Sent(why))) => {
                crate::log::info(
                    "upstream answer failed",
                    serde_json::json!({"backend": backend.addr.to_string(), "error": why}),
                );
                if attempt == 1 {
                    return Forwarded::Done(
                        local_response(
                            StatusCode::BAD_GATEWAY,
                            "502 upstream closed the connection or answered malformed\n",
                        ),
                        Some(backend.addr),
                    );
                }
                reuse = None;
            }
        }
        if attempt == 1 || !next_backend(ctx, svc, &mut backend, &mut guard) {
            break;
        }
    }
    unreachable(backend, guard)
}

fn respond(
    mut resp: Response<Incoming>,
    conn: Answered,
    upload: Option<Arc<UploadClock>>,
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
    Response::from_parts(parts, ResponseBody::upstream(body, conn, upload, guard))
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
        _ = crate::pipe::both_ways(&mut c, &mut u) => {}
        _ = retired.wait_for(|r| *r) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, F: std::future::Future>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    type SendFuture = Pin<Box<dyn std::future::Future<Output = ()>>>;

    /// A request's future state is copied whole at each await level and into hyper's slot for
    /// it (for HTTP/2, into a task per stream), so its size is a cost per request
    /// (`docs/profile.md`). The budget is for a debug build; it was 5,808 bytes before the
    /// response timeout stopped holding a second copy of the upstream send, and 4,616 before
    /// the request head stayed in `handle` and the steps below it borrowed it (3,480).
    #[test]
    fn request_futures_stay_small() {
        let handle = future_size(
            |(c, r, p, e): (
                Arc<ProxyCtx>,
                Request<Incoming>,
                headers::Peer,
                Option<&'static Entry>,
            )| handle(c, r, p, e),
        );
        let forward = future_size(
            |(c, s, h, b, p, m): (
                &'static ProxyCtx,
                &'static Arc<Service>,
                &'static mut Parts,
                Incoming,
                &'static headers::Peer,
                bool,
            )| forward(c, s, h, b, p, m),
        );
        let send =
            future_size(|(b, r, u): (&'static Arc<Backend>, Request<Upload>, Reuse)| b.send(r, u));
        let within = future_size(
            |(s, c, t): (
                Pin<&'static mut SendFuture>,
                Option<&'static UploadClock>,
                Duration,
            )| within_response_timeout(s, c, t),
        );
        eprintln!("future sizes: handle {handle}, forward {forward}, backend send {send}, response timeout {within}");
        // The timeout holds a pinned reference to the send, not the send itself.
        assert!(
            within < 512,
            "within_response_timeout's future is {within} bytes"
        );
        assert!(
            handle <= 4 * 1024,
            "proxy::handle's future is {handle} bytes"
        );
    }
}
