//! Bounded resources against the real proxy on loopback, with raw sockets: one connection limit
//! across workers, upgraded tunnels counted and ended at shutdown, the first-byte timeout,
//! HTTP/2 idle connections and clients that stop reading closed at the idle timeout, and the
//! metrics listener.

mod common;

use common::*;
use luma_proxy::config::MetricsListen;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What became of a connection after one request: answered (status line) or closed unanswered.
#[derive(Debug, PartialEq)]
enum Fate {
    Answered(String),
    Closed,
}

/// Sends one request on `s` and waits (bounded) for an answer or the proxy closing.
async fn ask(s: &mut TcpStream, host: &str) -> Fate {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return Fate::Closed;
    }
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
        Err(_) => panic!("no answer and no close within 10 s"),
        Ok(Ok(0)) | Ok(Err(_)) => Fate::Closed,
        Ok(Ok(n)) => Fate::Answered(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        ),
    }
}

/// Polls a condition (not a fixed sleep) until it holds or 10 s pass.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fresh connection that gets served (polls until a slot is free, at most `limit`).
async fn wait_for_a_slot(addr: SocketAddr, limit: Duration) -> TcpStream {
    let t = Instant::now();
    loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if let Fate::Answered(line) = ask(&mut s, "none.test").await {
            assert!(line.starts_with("HTTP/1.1 404"), "{line}");
            return s;
        }
        assert!(t.elapsed() < limit, "no slot came free within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_limit_holds_across_workers() {
    const WORKERS: usize = 3;
    const LIMIT: usize = 4;
    const TRIES: usize = 15;
    // `workers::set_count` (a process-wide global) is left alone: it only sizes the per-worker
    // upstream pools of backends created after it, and this test has no backend. The extra
    // workers still run: their pool index wraps (`index % pools`).
    let dir = TempStateDir::new("limit-workers");
    let mut cfg = config(dir.path());
    cfg.max_connections = LIMIT;
    let mut proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    proxy.add_workers(WORKERS - 1).unwrap();

    // The kernel spreads these over the three listeners; with a limit per worker, up to
    // 3 x 4 would be served.
    let mut conns = Vec::new();
    for _ in 0..TRIES {
        conns.push(TcpStream::connect(proxy.http_addr).await.unwrap());
    }
    let mut served = Vec::new();
    let mut refused = 0;
    for mut s in conns {
        match ask(&mut s, "none.test").await {
            Fate::Answered(line) => {
                assert!(line.starts_with("HTTP/1.1 404"), "{line}");
                served.push(s);
            }
            Fate::Closed => refused += 1,
        }
    }
    assert_eq!(
        served.len(),
        LIMIT,
        "served connections across {WORKERS} workers"
    );
    assert_eq!(refused, TRIES - LIMIT);
    assert_eq!(proxy.metrics.connections_open(), LIMIT as u64);
    assert_eq!(proxy.metrics.connections_refused(), (TRIES - LIMIT) as u64);

    // Closing one gives its slot back to whichever worker accepts next.
    drop(served.pop());
    served.push(wait_for_a_slot(proxy.http_addr, Duration::from_secs(10)).await);
    assert_eq!(proxy.metrics.connections_open(), LIMIT as u64);
    drop(served);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_at_the_first_byte_timeout() {
    let dir = TempStateDir::new("first-byte");
    let mut cfg = config(dir.path());
    cfg.first_byte_timeout = Duration::from_millis(400);
    cfg.header_read_timeout = Duration::from_secs(30);
    cfg.idle_timeout = Duration::from_secs(60);
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();

    let mut silent = TcpStream::connect(proxy.http_addr).await.unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut out)).await;
    let waited = t.elapsed();
    assert!(
        r.is_ok(),
        "a silent connection was still open after 10 s (idle timeout 60 s)"
    );
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(5),
        "closed after {waited:?}, first-byte timeout 400 ms"
    );
    eprintln!("silent connection closed after {waited:?}");

    // A client that spoke is past the first-byte timeout: its keep-alive connection lives on.
    let mut talker = TcpStream::connect(proxy.http_addr).await.unwrap();
    assert!(
        matches!(ask(&mut talker, "none.test").await, Fate::Answered(l) if l.starts_with("HTTP/1.1 404"))
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        matches!(ask(&mut talker, "none.test").await, Fate::Answered(l) if l.starts_with("HTTP/1.1 404"))
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_at_the_idle_timeout() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let dir = TempStateDir::new("h2-idle");
    let mut cfg = config(dir.path());
    cfg.idle_timeout = Duration::from_millis(800);
    cfg.first_byte_timeout = Duration::from_millis(800);
    cfg.header_read_timeout = Duration::from_secs(30);
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();

    let stream = TcpStream::connect(proxy.http_addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let resp = tx
        .send_request(
            hyper::Request::get("http://none.test/")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    resp.into_body().collect().await.unwrap();
    let idle_since = Instant::now();
    // The connection is open and idle; only the idle timeout may end it.
    let r = tokio::time::timeout(Duration::from_secs(10), conn).await;
    let waited = idle_since.elapsed();
    assert!(
        r.is_ok(),
        "an idle HTTP/2 connection was still open after 10 s (idle timeout 800 ms)"
    );
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
        "closed after {waited:?}, idle timeout 800 ms"
    );
    eprintln!("idle h2 connection closed after {waited:?}");
    // The client has seen the close; the proxy's task may still be dropping the connection.
    until("the idle connection's slot to come back", || {
        proxy.metrics.connections_open() == 0
    })
    .await;
    proxy.shutdown().await;
}

/// Fails with a clear message when the soft open-files limit (`ulimit -n`) is below `n`,
/// rather than with an accept or connect error half-way (Linux; elsewhere it is not checked).
fn need_open_files(n: u64) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(soft) = soft {
        assert!(
            soft >= n,
            "this test needs about {n} open files, and the soft limit is {soft}: raise it (ulimit -n {n}) before running the tests"
        );
    }
}

/// Opens a WebSocket-style tunnel through the proxy and checks the echo.
async fn open_tunnel(addr: SocketAddr, host: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("upgrade answer within 10 s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed during the upgrade: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

async fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websockets_hold_their_slots_and_are_ended_at_shutdown() {
    const TUNNELS: usize = 500;
    // Each tunnel is four sockets in this process (client, proxy's client side, proxy's
    // upstream side, backend), beside whatever the tests running in parallel hold.
    need_open_files(TUNNELS as u64 * 4 + 512);
    let dir = TempStateDir::new("ws-limit");
    let mut cfg = config(dir.path());
    cfg.max_connections = TUNNELS;
    cfg.shutdown_timeout = Duration::from_secs(30);
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let b = TestBackend::start("127.0.0.2", "b").await;
    deploy_route(&proxy, "chat", "chat.test", &[b.addr]).await;

    let mut tunnels = Vec::with_capacity(TUNNELS);
    for _ in 0..TUNNELS {
        tunnels.push(open_tunnel(proxy.http_addr, "chat.test").await);
    }
    // Every tunnel has given its HTTP connection back to hyper, and still holds its slot.
    assert_eq!(proxy.metrics.connections_open(), TUNNELS as u64);
    echo(&mut tunnels[0], b"first").await;
    echo(&mut tunnels[TUNNELS - 1], b"last").await;

    // One more connection is refused while they are open.
    let mut extra = TcpStream::connect(proxy.http_addr).await.unwrap();
    assert_eq!(ask(&mut extra, "chat.test").await, Fate::Closed);
    assert_eq!(proxy.metrics.connections_refused(), 1);

    // A tunnel that ends gives its slot back.
    drop(tunnels.pop());
    let mut spare = wait_for_a_slot(proxy.http_addr, Duration::from_secs(10)).await;
    // Fill the slot with a request that is in flight when shutdown starts.
    let slow = tokio::spawn(async move {
        spare
            .write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: chat.test\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), spare.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    let t = Instant::now();
    while b.hits.load(std::sync::atomic::Ordering::Relaxed) < TUNNELS as u64 + 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the slow request never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // SIGTERM: the in-flight request finishes, then every tunnel is ended, long before the
    // 30 s shutdown timeout.
    let metrics = proxy.metrics.clone();
    let t = Instant::now();
    proxy.shutdown().await;
    let took = t.elapsed();
    eprintln!("shutdown with {} tunnels took {took:?}", TUNNELS - 1);
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    let answer = slow.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "in-flight request: {answer}"
    );
    for (i, mut s) in tunnels.into_iter().enumerate() {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "tunnel {i} still open after shutdown returned");
    }
    assert_eq!(metrics.connections_open(), 0);
}

/// A backend that answers `/up` with `ok` and anything else with `size` bytes.
async fn big_backend(ip: &str, size: usize) -> SocketAddr {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let big = Bytes::from(vec![b'x'; size]);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let big = big.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let body = if req.uri().path() == "/up" {
                        Bytes::from_static(b"ok")
                    } else {
                        big.clone()
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A client that sends requests and never reads the answers: once the socket buffers are full
/// the proxy's writes wait, and with the next request already buffered hyper reads nothing
/// either. The idle timeout must still end the connection and give its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_at_the_idle_timeout_and_frees_its_slot() {
    const IDLE: Duration = Duration::from_millis(800);
    let dir = TempStateDir::new("no-reader");
    let mut cfg = config(dir.path());
    cfg.idle_timeout = IDLE;
    cfg.first_byte_timeout = IDLE;
    cfg.header_read_timeout = Duration::from_secs(30);
    cfg.max_connections = 1;
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    // Far more than the socket buffers on the way hold (client, proxy, backend).
    let backend = big_backend("127.0.0.2", 64 << 20).await;
    deploy_route(&proxy, "big", "big.test", &[backend]).await;

    // A small receive buffer, so the proxy's writes block early.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(proxy.http_addr).await.unwrap();
    stuck
        .write_all(
            b"GET /a HTTP/1.1\r\nHost: big.test\r\n\r\nGET /b HTTP/1.1\r\nHost: big.test\r\n\r\n",
        )
        .await
        .unwrap();
    let sent = Instant::now();
    until("the stuck connection to hold the only slot", || {
        proxy.metrics.connections_open() == 1
    })
    .await;
    // The slot comes back at the idle timeout after the writes stopped moving, never before
    // the idle timeout has passed at all.
    until(
        "the stuck connection to be closed and its slot freed",
        || proxy.metrics.connections_open() == 0,
    )
    .await;
    let freed = sent.elapsed();
    eprintln!("a client that never reads was closed after {freed:?}");
    assert!(
        freed >= IDLE,
        "closed after {freed:?}, idle timeout {IDLE:?}"
    );
    // The next client gets the slot.
    drop(wait_for_a_slot(proxy.http_addr, Duration::from_secs(10)).await);
    // And the stuck client finds its connection closed once it reads (what was buffered, then
    // the end: EOF, or a reset since its second request was never answered).
    let mut sink = vec![0u8; 1 << 20];
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stuck.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the stuck connection was still open");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_the_admin_registry_read_only() {
    let dir = TempStateDir::new("metrics");
    let mut cfg = config(dir.path());
    cfg.metrics = MetricsListen::Addr("127.0.0.1:0".parse().unwrap());
    cfg.metrics_labels = vec![("server".into(), "a\"b\\c\nd".into())];
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let addr = proxy.metrics_addr.expect("metrics listener bound");
    let b = TestBackend::start("127.0.0.2", "b").await;
    deploy_route(&proxy, "shop", "shop.test", &[b.addr]).await;
    assert_eq!(get(proxy.http_addr, "shop.test", "/").await.0, 200);

    let scrape = raw_exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(
        scrape.contains("content-type: application/openmetrics-text"),
        "{scrape}"
    );
    let label = "server=\"a\\\"b\\\\c\\nd\"";
    assert!(
        scrape.contains(&format!(
            "luma_proxy_responses_total{{{label},class=\"2xx\"}} 1"
        )),
        "{scrape}"
    );
    assert!(
        scrape.contains(&format!(
            "luma_proxy_backend_requests_total{{{label},project=\"shop\",app=\"web\",backend=\"{}\"}} 1",
            b.addr
        )),
        "{scrape}"
    );
    assert!(scrape.trim_end().ends_with("# EOF"), "{scrape}");

    let post = raw_exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let other = raw_exchange(
        addr,
        b"GET /v1/routes HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    proxy.shutdown().await;
}
