//! Real sockets on loopback: in-process backends and a proxy started through its public API.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use luma_api::DeployRequest;
use luma_proxy::route::{HealthSettings, RouteSpec, RouteTimeouts};
use luma_proxy::server::RunningProxy;
use luma_proxy::ProxyConfig;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A fresh state directory for one proxy, removed when the test binary exits, unless a test
/// failed: then they are kept for a look, and the next run sweeps them. It outlives the proxy on
/// purpose: some tests restart a proxy on the same directory, so no handle can remove it on
/// drop. Directories of earlier runs whose process is gone are swept on the way.
pub fn temp_state_dir(tag: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        sweep_dead_runs();
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            A_TEST_FAILED.store(true, Ordering::Relaxed);
            report(info);
        }));
        // SAFETY: `remove_state_dirs` is an `extern "C" fn()` that touches only statics.
        unsafe { libc::atexit(remove_state_dirs) };
    });
    let d = std::env::temp_dir().join(format!(
        "luma-it-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&d).unwrap();
    STATE_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(d.clone());
    d
}

static STATE_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
static A_TEST_FAILED: AtomicBool = AtomicBool::new(false);

/// Runs at exit (libtest ends with `process::exit`, after every test, also when some failed).
extern "C" fn remove_state_dirs() {
    let dirs = std::mem::take(&mut *STATE_DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    if A_TEST_FAILED.load(Ordering::Relaxed) {
        // Not eprintln!: a panic here, on a closed stderr, would abort the exit.
        let _ = writeln!(
            std::io::stderr(),
            "a panic was seen: the proxies' state directories are kept: {}/luma-it-*-{}-*",
            std::env::temp_dir().display(),
            std::process::id()
        );
        return;
    }
    for d in dirs {
        // A proxy thread may still be writing there as the process ends; what is left, the
        // next run's sweep takes.
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Removes `luma-it-<tag>-<pid>-<n>` directories whose process is gone. Without a `/proc` to
/// ask, nothing is removed.
fn sweep_dead_runs() {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("luma-it-")) else {
            continue;
        };
        let mut parts = rest.rsplitn(3, '-');
        let (Some(_n), Some(pid), Some(_tag)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub fn config(state_dir: PathBuf) -> ProxyConfig {
    ProxyConfig {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        https_addr: "127.0.0.1:0".parse().unwrap(),
        // No CA on loopback tests unless a test starts pebble.
        acme: luma_proxy::config::AcmeSettings::off(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        state_dir,
        token_file: None,
        // No Docker DNS on loopback tests: literal targets only.
        dns: "127.0.0.1:9".parse().unwrap(),
        self_name: "test".into(),
        access_log: false,
        // Loopback backends have no network alias.
        allow_literal_targets: true,
        ..ProxyConfig::default()
    }
}

pub async fn start_proxy(tag: &str) -> RunningProxy {
    luma_proxy::Proxy::start(config(temp_state_dir(tag)))
        .await
        .unwrap()
}

/// A test backend: answers `/up`, `/slow?ms=N`, `/headers` (echoes request headers as
/// `name: value` lines), websocket-style upgrades (echo), and anything else with its name.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicU64>,
    /// TCP connections accepted (to check that the proxy pools them).
    pub connections: Arc<AtomicU64>,
    /// Connections whose first request was not a health check: the ones requests through the
    /// proxy opened. A route's first periodic check comes at a random point of its interval
    /// and opens a connection of its own, even with a long interval.
    pub app_connections: Arc<AtomicU64>,
    /// Health checks answered (`/up`, not in `hits`).
    pub checks: Arc<AtomicU64>,
    pub healthy: Arc<AtomicBool>,
    tasks: Arc<std::sync::Mutex<JoinSet<()>>>,
}

impl TestBackend {
    pub async fn start(ip: &str, name: &str) -> TestBackend {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let app_connections = Arc::new(AtomicU64::new(0));
        let checks = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let tasks = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let apps = app_connections.clone();
        let (h, ok, n, t, conns, ups) = (
            hits.clone(),
            healthy.clone(),
            name.to_string(),
            tasks.clone(),
            connections.clone(),
            checks.clone(),
        );
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::Relaxed);
                let (h, ok, n, ups) = (h.clone(), ok.clone(), n.clone(), ups.clone());
                let (apps, first) = (apps.clone(), AtomicBool::new(true));
                t.lock().unwrap().spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        if first.swap(false, Ordering::Relaxed) && req.uri().path() != "/up" {
                            apps.fetch_add(1, Ordering::Relaxed);
                        }
                        let (h, ok, n, ups) = (h.clone(), ok.clone(), n.clone(), ups.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(answer(req, &h, &ok, &n, &ups).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        TestBackend {
            addr,
            name: name.into(),
            hits,
            connections,
            app_connections,
            checks,
            healthy,
            tasks,
        }
    }

    /// Kills the listener and every open connection, like a container that died.
    pub fn kill(&self) {
        self.tasks.lock().unwrap().abort_all();
    }
}

async fn answer(
    mut req: Request<Incoming>,
    hits: &AtomicU64,
    healthy: &AtomicBool,
    name: &str,
    checks: &AtomicU64,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path == "/up" {
        checks.fetch_add(1, Ordering::Relaxed);
        let s = if healthy.load(Ordering::Relaxed) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Response::builder()
            .status(s)
            .body(Full::new(Bytes::from_static(b"up")))
            .unwrap();
    }
    hits.fetch_add(1, Ordering::Relaxed);
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = up.await {
                let mut io = TokioIo::new(io);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if path == "/slow" {
        let ms = query
            .strip_prefix("ms=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if path == "/bytes" {
        let n = query
            .strip_prefix("n=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return Response::new(Full::new(Bytes::from(pattern(n))));
    }
    if path == "/headers" {
        let mut s = String::new();
        for (k, v) in req.headers() {
            s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        return Response::new(Full::new(Bytes::from(s)));
    }
    // Read the whole body so POSTs are really received.
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    Response::new(Full::new(Bytes::from(format!("{name} {body}"))))
}

/// What `/bytes?n=N` answers: N bytes of a pattern that repeats every 251 bytes, so that a
/// piece out of place shows.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A backend that answers `/up` but closes every other connection right after reading the
/// request head, without answering. Counts the requests it swallowed.
pub struct DroppingBackend {
    pub addr: SocketAddr,
    pub swallowed: Arc<AtomicU64>,
}

impl DroppingBackend {
    pub async fn start(ip: &str) -> DroppingBackend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallowed = Arc::new(AtomicU64::new(0));
        let s = swallowed.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if got.starts_with(b"GET /up ") {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
                    } else {
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        DroppingBackend { addr, swallowed }
    }
}

pub fn route(project: &str, host: &str, addrs: &[SocketAddr]) -> RouteSpec {
    RouteSpec {
        project: project.into(),
        app: "web".into(),
        hosts: vec![host.into()],
        target: addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(","),
        network: String::new(),
        health: HealthSettings {
            interval_ms: 100,
            timeout_ms: 500,
            ..HealthSettings::default()
        },
        timeouts: RouteTimeouts::default(),
        limits: Default::default(),
        tls: None,
    }
}

pub fn deploy_req(route: RouteSpec) -> DeployRequest {
    DeployRequest {
        route,
        deploy_timeout_ms: Some(5_000),
        drain_timeout_ms: Some(10_000),
        certificate: None,
        acme_account: None,
    }
}

/// Deploys `project`'s app `web` on `host` to literal backend addresses, through the deploy
/// contract, and panics if the gate refuses it.
pub async fn deploy_route(
    proxy: &RunningProxy,
    project: &str,
    host: &str,
    addrs: &[SocketAddr],
) -> luma_api::DeployOutcome {
    proxy
        .deployer
        .deploy(deploy_req(route(project, host, addrs)))
        .await
        .unwrap_or_else(|e| panic!("deploy {project} on {host}: {e}"))
}

/// One request on a fresh connection: (status, body).
pub async fn request(
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    body: &'static str,
) -> (u16, String) {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&text).into_owned())
}

pub async fn get(proxy: SocketAddr, host: &str, path: &str) -> (u16, String) {
    request(proxy, "GET", host, path, "").await
}

/// HTTP/2 with prior knowledge (h2c).
pub async fn get_h2(proxy: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{host}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

/// Many streams at once on one HTTP/2 connection over `io` to a route of `host` whose backend is
/// a [`TestBackend`] named `backend`. The proxy gathers the streams' frames into shared writes
/// (`coalesce.rs`), so every answer must still arrive whole and in order: bodies small, around
/// the sizes where writes go straight, and many times the flow-control window, so that the
/// client's WINDOW_UPDATEs and the proxy's frames interleave; with large uploads in flight too.
pub async fn streams_in_flight_together_arrive_whole<S>(io: S, host: &str, backend: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    // The smallest windows HTTP/2 allows, so the proxy's frames wait on the client's
    // WINDOW_UPDATEs all the time, with uploads waiting on the proxy's.
    let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let limit = luma_proxy::coalesce::GATHER_LIMIT;
    let sizes = [
        0,
        1,
        1024,
        5000,
        limit - 100,
        limit,
        limit + 1,
        100_000,
        300_000,
    ];
    let mut streams = tokio::task::JoinSet::new();
    for round in 0..4 {
        for &n in &sizes {
            let (mut tx, host) = (tx.clone(), host.to_string());
            streams.spawn(async move {
                let req = Request::get(format!("http://{host}/bytes?n={n}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = tx.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200, "round {round}, {n} bytes");
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert!(
                    body[..] == pattern(n)[..],
                    "round {round}: {n} bytes came out wrong"
                );
            });
        }
        let (mut tx, host, want) = (tx.clone(), host.to_string(), format!("{backend} 200000"));
        streams.spawn(async move {
            let req = Request::post(format!("http://{host}/upload"))
                .body(Full::new(Bytes::from(pattern(200_000))))
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], want.as_bytes(), "round {round}: the upload");
        });
    }
    // A frame lost or held back would leave a stream waiting: fail instead of hanging.
    let all = async {
        let mut done = 0;
        while let Some(r) = streams.join_next().await {
            r.unwrap();
            done += 1;
        }
        done
    };
    let done = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("some streams never finished");
    assert_eq!(done, 4 * (sizes.len() + 1));
}

/// Tally of a load run.
#[derive(Default, Debug)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub first_failure: std::sync::Mutex<Option<String>>,
}

impl Tally {
    pub fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_failure.lock().unwrap();
        if f.is_none() {
            *f = Some(why);
        }
    }
}

/// Sends requests until `stop` flips: keep-alive or `Connection: close`, GET or POST.
pub async fn load_worker(
    proxy: SocketAddr,
    host: String,
    keepalive: bool,
    post: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match TcpStream::connect(proxy).await {
                Ok(s) => match hyper::client::conn::http1::handshake(TokioIo::new(s)).await {
                    Ok((tx, conn)) => {
                        tokio::spawn(conn);
                        sender = Some(tx);
                    }
                    Err(e) => {
                        tally.fail(format!("handshake: {e}"));
                        continue;
                    }
                },
                Err(e) => {
                    tally.fail(format!("connect: {e}"));
                    continue;
                }
            }
        }
        let tx = sender.as_mut().unwrap();
        if tx.ready().await.is_err() {
            sender = None;
            continue;
        }
        let mut b = Request::builder().uri("/").header("host", &host);
        if !keepalive {
            b = b.header("connection", "close");
        }
        let req = if post {
            b.method("POST")
                .body(Full::new(Bytes::from_static(b"payload-0123456789")))
                .unwrap()
        } else {
            b.method("GET").body(Full::new(Bytes::new())).unwrap()
        };
        match tx.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await {
                    Ok(_) if status == StatusCode::OK => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => tally.fail(format!("status {status}")),
                    Err(e) => tally.fail(format!("body: {e}")),
                }
            }
            Err(e) => {
                tally.fail(format!("send: {e}"));
                sender = None;
            }
        }
        if !keepalive {
            sender = None;
        }
    }
}

/// A raw HTTP/1.1 backend that closes a keep-alive connection once it has waited `idle` for
/// the next request, the way Node's `keepAliveTimeout` and gunicorn's `--keep-alive` do.
/// Answers `/up` with `ok`, and anything else, once its whole body is read (Content-Length or
/// chunked), with `200` and the body's length.
///
/// Between deciding to close and closing it waits `fin_delay`, the time its FIN would take to
/// cross a real network: a request written in that window is answered with a reset, as one
/// that crossed the FIN on the wire would be. On loopback the window would be microseconds.
pub struct IdleClosingBackend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    /// Request heads read, `/up` excluded.
    pub requests: Arc<AtomicU64>,
    /// Connections this backend closed because they sat idle for the whole limit.
    pub idle_closes: Arc<AtomicU64>,
}

impl IdleClosingBackend {
    pub async fn start(ip: &str, idle: Duration, fin_delay: Duration) -> IdleClosingBackend {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let b = IdleClosingBackend {
            addr,
            connections: Arc::new(AtomicU64::new(0)),
            requests: Arc::new(AtomicU64::new(0)),
            idle_closes: Arc::new(AtomicU64::new(0)),
        };
        let (conns, reqs, closes) = (
            b.connections.clone(),
            b.requests.clone(),
            b.idle_closes.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::Relaxed);
                let (reqs, closes) = (reqs.clone(), closes.clone());
                tokio::spawn(serve_idle_closing(stream, idle, fin_delay, reqs, closes));
            }
        });
        b
    }
}

async fn serve_idle_closing(
    mut stream: TcpStream,
    idle: Duration,
    fin_delay: Duration,
    requests: Arc<AtomicU64>,
    idle_closes: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Wait for the next request for at most `idle`, then close, whatever arrives after.
        if buf.is_empty() {
            match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
                Err(_) => {
                    idle_closes.fetch_add(1, Ordering::Relaxed);
                    // Closing with unread bytes sends a reset.
                    tokio::time::sleep(fin_delay).await;
                    return;
                }
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        buf.drain(..head_end);
        let is_up = head.starts_with("get /up ");
        if !is_up {
            requests.fetch_add(1, Ordering::Relaxed);
        }
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let close = header("connection:").is_some_and(|v| v.contains("close"));
        let body_len = if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
            // Good enough for tests: the body ends at the first empty last chunk.
            let end = loop {
                if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                    break i + 5;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            buf.drain(..end);
            end
        } else {
            let len: usize = header("content-length:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < len {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..len);
            len
        };
        let body = if is_up {
            "ok".to_string()
        } else {
            body_len.to_string()
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if stream.write_all(resp.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

/// Writes a raw request on a fresh connection and reads until the proxy closes it or
/// `limit` passes; returns everything read (the status line first).
pub async fn raw_exchange(proxy: SocketAddr, request: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A temp state dir that is removed when dropped, so a test (passing or failing) leaves no
/// directory behind: `let dir = TempStateDir::new("tag"); config(dir.path())`. Keep it alive
/// until the proxy using it has shut down.
pub struct TempStateDir(PathBuf);

impl TempStateDir {
    pub fn new(tag: &str) -> TempStateDir {
        TempStateDir(temp_state_dir(tag))
    }

    pub fn path(&self) -> PathBuf {
        self.0.clone()
    }
}

impl Drop for TempStateDir {
    fn drop(&mut self) {
        // A failing test's directory is kept for a look; the next run's sweep removes it.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One keep-alive HTTP/1.1 client connection to the proxy, so a test times its requests and
/// not a connect and handshake each.
pub struct KeepAliveClient {
    tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl KeepAliveClient {
    pub async fn connect(proxy: SocketAddr, host: &str) -> KeepAliveClient {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        KeepAliveClient {
            tx,
            host: host.to_string(),
        }
    }

    /// (status, body); panics if the connection fails.
    pub async fn request(&mut self, method: &str, path: &str, body: &'static str) -> (u16, String) {
        self.tx.ready().await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = self.tx.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&text).into_owned())
    }
}

/// Reads from `s` into `buf` until it holds a whole request head; returns the head's length
/// (bytes after it stay in `buf`), or None when the peer closes first.
pub async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
