//! The upstream side of the request path over real loopback sockets: pooled connections and
//! backends that close idle keep-alive connections, the per-route request body cap, and the
//! response timeout that starts once the request has been sent.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The idle limit of the backends below (Node closes after 5 s, gunicorn after 2 s).
const BACKEND_IDLE: Duration = Duration::from_millis(1000);

/// How long the backends below take to close a connection once they decided to.
const FIN_DELAY: Duration = Duration::from_millis(5);
/// Offsets of the wave spacing from the backends' idle limit, in microseconds: they sweep
/// over the window in which the backend is closing the connection.
const SWEEP_US: [i64; 8] = [-1000, 0, 1000, 2000, 3000, 4000, 6000, 8000];

/// `clients` keep-alive client connections each send one POST at the start of every wave, so
/// each pooled upstream connection comes up for reuse about one wave spacing after its last
/// response. Wave k starts `BACKEND_IDLE + SWEEP_US[k % 8]` after wave k-1. Returns
/// (ok, failures).
async fn post_waves(
    proxy: SocketAddr,
    host: &str,
    clients: usize,
    waves: usize,
) -> (usize, Vec<String>) {
    let start = Instant::now() + Duration::from_millis(50);
    let mut at = Vec::with_capacity(waves);
    let mut t = start;
    for k in 0..waves {
        if k > 0 {
            let us = BACKEND_IDLE.as_micros() as i64 + SWEEP_US[k % SWEEP_US.len()];
            t += Duration::from_micros(us as u64);
        }
        at.push(t);
    }
    let mut tasks = Vec::new();
    for j in 0..clients {
        let (host, at) = (host.to_string(), at.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            let mut failed = Vec::new();
            let mut conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
            for (k, wave) in at.iter().enumerate() {
                tokio::time::sleep_until(*wave).await;
                if conn.as_ref().is_none_or(|c| c.is_closed()) {
                    let s = TcpStream::connect(proxy).await.unwrap();
                    let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                        .await
                        .unwrap();
                    tokio::spawn(c);
                    conn = Some(tx);
                }
                let Some(tx) = conn.as_mut() else { continue };
                let body = format!("order {j}/{k}");
                let len = body.len();
                let req = Request::post("/order")
                    .header("host", &host)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                match tx.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let text = resp.into_body().collect().await.map(|b| b.to_bytes());
                        match text {
                            Ok(b) if status == 200 && b == len.to_string().as_bytes() => ok += 1,
                            Ok(b) => failed.push(format!(
                                "client {j} wave {k}: {status} {}",
                                String::from_utf8_lossy(&b).trim()
                            )),
                            Err(e) => failed.push(format!("client {j} wave {k}: body {e}")),
                        }
                    }
                    Err(e) => {
                        failed.push(format!("client {j} wave {k}: send {e}"));
                        conn = None;
                    }
                }
            }
            (ok, failed)
        }));
    }
    let mut ok = 0;
    let mut failed = Vec::new();
    for t in tasks {
        let (o, f) = t.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_spaced_past_the_backend_idle_limit_never_fail() {
    let proxy = start_proxy("idle-close").await;
    let a = IdleClosingBackend::start("127.0.0.2", BACKEND_IDLE, FIN_DELAY).await;
    let b = IdleClosingBackend::start("127.0.0.3", BACKEND_IDLE, FIN_DELAY).await;
    deploy_route(&proxy, "shop", "shop.test", &[a.addr, b.addr]).await;
    let (clients, waves) = (10, 13);
    let (ok, failed) = post_waves(proxy.http_addr, "shop.test", clients, waves).await;
    let idle_closes = a.idle_closes.load(Ordering::Relaxed) + b.idle_closes.load(Ordering::Relaxed);
    let delivered = a.requests.load(Ordering::Relaxed) + b.requests.load(Ordering::Relaxed);
    eprintln!(
        "POSTs: {ok} ok, {} failed of {}; backends closed {idle_closes} idle connections",
        failed.len(),
        clients * waves
    );
    // The scenario really happened: the backends closed pooled connections under the proxy.
    assert!(
        idle_closes >= waves as u64,
        "only {idle_closes} idle closes"
    );
    assert!(
        failed.is_empty(),
        "{} of {} POSTs failed: {failed:#?}",
        failed.len(),
        clients * waves
    );
    assert_eq!(ok, clients * waves);
    assert_eq!(
        delivered,
        (clients * waves) as u64,
        "a POST was delivered twice"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_reuse_idle_connections_and_posts_only_recently_proven_ones() {
    let proxy = start_proxy("reuse-rule").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.health.interval_ms = 60_000;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    let addr = proxy.http_addr;
    // Not every connection: the route's first check falls at a random point of its minute,
    // on a connection of its own, which may be inside this test's windows.
    let opened = || b.app_connections.load(Ordering::Relaxed);
    // Idle times below are the subject of this test: 400 ms is past the 250 ms within which a
    // POST may reuse a connection, and well inside the 1.5 s pool limit.
    let idle = Duration::from_millis(400);
    // One keep-alive client: between a response and the next request there is only the
    // request itself, no connect or handshake, to stay well inside the 250 ms below.
    let mut c = KeepAliveClient::connect(addr, "shop.test").await;

    assert_eq!(c.request("GET", "/", "").await.0, 200);
    let base = opened();
    tokio::time::sleep(idle).await;
    assert_eq!(c.request("GET", "/", "").await.0, 200);
    assert_eq!(
        opened(),
        base,
        "a GET did not reuse a connection idle for 400 ms"
    );
    tokio::time::sleep(idle).await;
    let (s, body) = c.request("POST", "/", "pay").await;
    assert_eq!((s, body.as_str()), (200, "b 3"));
    assert_eq!(
        opened(),
        base + 1,
        "a POST reused a connection idle for 400 ms"
    );
    // Right after a response, the connection is proven alive: the next POST takes it.
    let (s, _) = c.request("POST", "/", "pay").await;
    assert_eq!(s, 200);
    assert_eq!(
        opened(),
        base + 1,
        "a POST did not reuse a just-proven connection"
    );

    // Past the route's pool limit nothing is reused, not even by a GET.
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.health.interval_ms = 60_000;
    r.timeouts.pool_idle_ms = 200;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    assert_eq!(get(addr, "shop.test", "/").await.0, 200);
    let base = opened();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(addr, "shop.test", "/").await.0, 200);
    assert_eq!(opened(), base + 1, "a GET reused an expired connection");
    proxy.shutdown().await;
}

/// A route on `b` with a 1000-byte body cap.
async fn capped(proxy: &luma_proxy::server::RunningProxy, b: &TestBackend) {
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.limits.max_body_bytes = 1000;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_over_the_cap_is_413_before_anything_goes_upstream() {
    let proxy = start_proxy("cap-length").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    capped(&proxy, &b).await;
    // Only the head is sent: the answer cannot wait for the body.
    let out = raw_exchange(
        proxy.http_addr,
        b"POST /upload HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 1001\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert_eq!(
        b.hits.load(Ordering::Relaxed),
        0,
        "the backend saw the request"
    );
    // At the cap exactly, the body goes through.
    let body = "x".repeat(1000);
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{body}"
    );
    let out = raw_exchange(proxy.http_addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("b 1000"),
        "{out}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_cap_is_cut_and_answered_413() {
    let proxy = start_proxy("cap-chunked").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    capped(&proxy, &b).await;
    let chunked = |sizes: &[usize]| {
        let mut s = String::from(
            "POST /upload HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        );
        for n in sizes {
            s.push_str(&format!("{n:x}\r\n{}\r\n", "y".repeat(*n)));
        }
        s.push_str("0\r\n\r\n");
        s
    };
    let out = raw_exchange(
        proxy.http_addr,
        chunked(&[400, 400]).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("b 800"),
        "{out}"
    );
    let out = raw_exchange(
        proxy.http_addr,
        chunked(&[400, 400, 400]).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_timeout_starts_when_the_request_has_been_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = start_proxy("upload-timeout").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.timeouts.response_ms = 300;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();

    // A 10-byte body uploaded over about 1 s, three times the response timeout.
    let mut s = TcpStream::connect(proxy.http_addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        // The pace of the upload is what this test is about.
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"z").await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("b 10"),
        "{out}"
    );

    // A slow response still gets its 504, with a body or without one.
    for method in ["GET", "POST"] {
        let t = Instant::now();
        let (s, _) = request(proxy.http_addr, method, "shop.test", "/slow?ms=3000", "abc").await;
        assert_eq!(s, 504, "{method}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{method}: {:?}",
            t.elapsed()
        );
    }

    // An upload that stalls is not waited on forever: the client stopped sending, 408.
    let t = Instant::now();
    let out = raw_exchange(
        proxy.http_addr,
        b"POST /upload HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 10\r\n\r\nabc",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    proxy.shutdown().await;
}

/// Bytes of the large response below: far more than the socket buffers between the proxy and
/// a client with a small receive buffer (the proxy's send buffer grows to 4 MiB at most).
const BIG: usize = 16 << 20;

/// A backend that answers `GET /big` with [`BIG`] bytes, and anything else, once its body is
/// read, with `ok <length>`. Counts the connections it accepts.
struct BigBackend {
    addr: SocketAddr,
    /// Connections whose first request was not a health check (see `TestBackend`).
    app_connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl BigBackend {
    async fn start(ip: &str) -> BigBackend {
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let app_connections = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let conns = app_connections.clone();
        let big = Bytes::from(vec![b'x'; BIG]);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (big, conns) = (big.clone(), conns.clone());
                let first = std::sync::atomic::AtomicBool::new(true);
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            if first.swap(false, Ordering::Relaxed) && req.uri().path() != "/up" {
                                conns.fetch_add(1, Ordering::Relaxed);
                            }
                            let big = big.clone();
                            async move {
                                let body = if req.uri().path() == "/big" {
                                    big
                                } else {
                                    let n =
                                        req.into_body().collect().await.map(|b| b.to_bytes().len());
                                    Bytes::from(format!("ok {}", n.unwrap_or(0)))
                                };
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                    body,
                                )))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        BigBackend {
            addr,
            app_connections,
        }
    }
}

/// Connects a keep-alive client with a small receive buffer, so a response it does not read
/// waits in the proxy instead of in the client's kernel.
async fn slow_client(proxy: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(proxy).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

async fn send(
    tx: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &'static str,
) -> hyper::Response<hyper::body::Incoming> {
    tx.ready().await.unwrap();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "shop.test")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    tx.send_request(req).await.unwrap()
}

/// The backend starts its idle timer when it has written a response, not when a slow client
/// has finished reading it through the proxy: a connection is proven alive as of the arrival of
/// its response head, for the fast reuse of a POST and for the pool's expiry alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_does_not_make_an_upstream_connection_look_fresh() {
    let proxy = start_proxy("slow-client").await;
    let b = BigBackend::start("127.0.0.2").await;
    let opened = || b.app_connections.load(Ordering::Relaxed);
    // Longer than the 250 ms a POST's connection may have been proven alive.
    let slow = Duration::from_millis(400);
    for pool_idle_ms in [1_500, 300] {
        let mut r = route("shop", "shop.test", &[b.addr]);
        r.health.interval_ms = 60_000;
        r.timeouts.pool_idle_ms = pool_idle_ms;
        proxy.deployer.deploy(deploy_req(r)).await.unwrap();
        let mut c = slow_client(proxy.http_addr).await;
        let resp = send(&mut c, "GET", "/big", "").await;
        let base = opened();
        // The client's pace is the subject here: the head came, the body waits for it.
        tokio::time::sleep(slow).await;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), BIG);
        // Right after the end of a response that took 400 ms to read.
        let (method, body) = if pool_idle_ms == 1_500 {
            // Within the pool limit, but not proven alive recently enough for a POST.
            ("POST", "pay")
        } else {
            // Past the pool limit as counted from the head: not even a GET takes it.
            ("GET", "")
        };
        let resp = send(&mut c, method, "/", body).await;
        assert_eq!(resp.status(), 200);
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, format!("ok {}", body.len()).as_bytes());
        assert_eq!(
            opened(),
            base + 1,
            "a {method} (pool limit {pool_idle_ms} ms) reused a connection whose response head came 400 ms before"
        );
    }
    proxy.shutdown().await;
}

/// A raw backend that answers every request as soon as it has read its head (`early` for a
/// POST, `get` otherwise), then reads the request's body (Content-Length) before the next
/// request on the connection, as a server that answers before the upload ends does.
async fn early_answer_backend(ip: &str) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = read_head(&mut s, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end);
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let body = if head.starts_with("post ") {
                        "early"
                    } else {
                        "get"
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    while buf.len() < len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..len);
                }
            });
        }
    });
    addr
}

/// Reads one response with a Content-Length body from a raw stream.
async fn read_response(s: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return String::from_utf8_lossy(&buf).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("no response")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A backend that answered before the request body ended still has the upload to read: that
/// connection is busy, and an unrelated request must not be queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_uploading_is_not_reused() {
    use tokio::io::AsyncWriteExt;
    let proxy = start_proxy("uploading").await;
    let b = early_answer_backend("127.0.0.2").await;
    let mut r = route("shop", "shop.test", &[b]);
    r.health.interval_ms = 60_000;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();

    // Half of a 20-byte body; the backend answers at once.
    let mut a = TcpStream::connect(proxy.http_addr).await.unwrap();
    a.write_all(b"POST /early HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 20\r\n\r\n0123456789")
        .await
        .unwrap();
    let out = read_response(&mut a).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("early"),
        "{out}"
    );
    // The whole response has gone through the proxy, the upload has not: another client's
    // GET is answered at once, not when (if ever) that upload ends.
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        get(proxy.http_addr, "shop.test", "/"),
    )
    .await
    .expect("a GET waited behind another request's upload");
    assert_eq!(got, (200, "get".to_string()));
    // The upload ends; the first client's connection goes on.
    a.write_all(b"0123456789").await.unwrap();
    a.write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        .await
        .unwrap();
    let out = read_response(&mut a).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("get"),
        "{out}"
    );
    proxy.shutdown().await;
}

/// A backend that answers `/up` and reads nothing of any other request after its head, and
/// never answers it: an app stuck before reading the body. Its receive buffer is small, so the
/// proxy's upload stalls soon.
async fn stuck_backend(ip: &str) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                // Byte by byte: nothing past the head is read.
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut byte).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => head.push(byte[0]),
                    }
                }
                if head.starts_with(b"GET /up ") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    return;
                }
                std::future::pending::<()>().await;
                drop(s);
            });
        }
    });
    addr
}

/// When the backend stops reading an upload, the 504 tells the client that its connection
/// ends: the rest of its body was never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_backend_stopped_reading_is_504_and_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = start_proxy("upload-stuck").await;
    let b = stuck_backend("127.0.0.2").await;
    let mut r = route("shop", "shop.test", &[b]);
    r.health.interval_ms = 60_000;
    r.timeouts.response_ms = 300;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();

    let total: usize = 64 << 20;
    let s = TcpStream::connect(proxy.http_addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: shop.test\r\nContent-Length: {total}\r\n\r\n");
        wr.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'u'; 64 * 1024];
        let mut sent = 0;
        // Keeps sending until the proxy stops reading and closes.
        while sent < total {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let t = Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(r.is_ok(), "the proxy did not close the connection: {out}");
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let sent = writer.await.unwrap();
    assert!(sent < total, "the whole body went through");
    proxy.shutdown().await;
}

/// Polls `done` every 10 ms until it holds; panics with `what` after a minute (a hang, not a
/// bound on how fast it should be).
async fn until(what: &str, done: impl Fn() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < give_up, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_ask_on_one_kept_connection() {
    let proxy = start_proxy("kept-check").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.health.interval_ms = 50;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    // The gate's probes (a fresh connection each) are over once the deploy returns.
    let (checks, opened) = (
        || b.checks.load(Ordering::Relaxed),
        || b.connections.load(Ordering::Relaxed),
    );
    let (checks0, opened0) = (checks(), opened());
    until("30 active checks", || checks() >= checks0 + 30).await;
    let new = opened() - opened0;
    assert!(
        new <= 2,
        "{} checks opened {new} connections; a kept one should serve them all",
        checks() - checks0
    );
    let svc = proxy.deployer.router.lookup("shop.test").unwrap();
    let backend = svc.balancer.backends()[0].clone();
    assert_eq!(backend.failed_checks(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_check_connection_the_backend_closed_never_fails_a_check() {
    let proxy = start_proxy("kept-check-closed").await;
    // The backend closes a connection idle for 45 ms, after a FIN delay of 5 ms in which a
    // request gets a reset, and the checks come every 50 ms: each check finds its kept
    // connection closing, closed or reset, with the timer's jitter across that window.
    let b = IdleClosingBackend::start("127.0.0.3", Duration::from_millis(45), FIN_DELAY).await;
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.health.interval_ms = 50;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    let closes = || b.idle_closes.load(Ordering::Relaxed);
    let closes0 = closes();
    until("30 kept connections closed by the backend", || {
        closes() >= closes0 + 30
    })
    .await;
    let svc = proxy.deployer.router.lookup("shop.test").unwrap();
    let backend = svc.balancer.backends()[0].clone();
    assert_eq!(
        backend.failed_checks(),
        0,
        "a check failed: {:?}",
        backend.last_error()
    );
    assert!(backend.is_healthy());
    proxy.shutdown().await;
}
