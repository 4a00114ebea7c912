//! Parked HTTP/1.1 connections (`park`), against the real proxy on loopback with raw sockets:
//! an idle keep-alive connection gives hyper's state back and serves its next request on the
//! same socket; pipelined requests, request bodies (whole, chunked, unread), a head cut in two
//! across a park, an upgrade after a park, HTTP/2's preface cut in two, the keep-alive limit
//! and shutdown while parked.
//!
//! Parking is observed through `luma_proxy_connections_parked`. Two tests must show that a
//! connection did *not* park, which no event can tell: they wait several park periods.

mod common;

use common::*;
use luma_proxy::server::RunningProxy;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PARK_AFTER: Duration = Duration::from_millis(50);

struct Lab {
    proxy: RunningProxy,
    backend: TestBackend,
    _dir: TempStateDir,
}

async fn lab(tag: &str, keep_alive: Duration) -> Lab {
    let dir = TempStateDir::new(tag);
    let mut cfg = config(dir.path());
    cfg.park_after = PARK_AFTER;
    cfg.header_read_timeout = keep_alive;
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "b1").await;
    deploy_route(&proxy, "shop", "shop.test", &[backend.addr]).await;
    Lab {
        proxy,
        backend,
        _dir: dir,
    }
}

impl Lab {
    /// A connection that has made one request and is now parked, and its read buffer.
    async fn parked_connection(&self) -> (TcpStream, Vec<u8>) {
        let mut s = TcpStream::connect(self.proxy.http_addr).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(ask(&mut s, &mut buf, GET).await.1, "b1 0");
        self.until_parked(1).await;
        (s, buf)
    }

    fn parked(&self) -> u64 {
        self.proxy.metrics.connections_parked()
    }

    /// Polls (not a fixed sleep) until `n` connections are parked, or fails after 10 s.
    async fn until_parked(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.parked() != n {
            assert!(
                Instant::now() < deadline,
                "expected {n} parked, have {}",
                self.parked()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Reads one response with a Content-Length body: (status line, body).
async fn response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    let head_len = tokio::time::timeout(Duration::from_secs(10), read_head(s, buf))
        .await
        .expect("a response head within 10 s")
        .expect("the proxy closed the connection instead of answering");
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_len + len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed in the middle of a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_len..head_len + len]).into_owned();
    buf.drain(..head_len + len);
    (head.lines().next().unwrap_or("").to_string(), body)
}

async fn ask(s: &mut TcpStream, buf: &mut Vec<u8>, raw: &str) -> (String, String) {
    s.write_all(raw.as_bytes()).await.unwrap();
    response(s, buf).await
}

const GET: &str = "GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n";

/// A WebSocket upgrade request for `host`.
fn upgrade(host: &str) -> String {
    format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
}

#[tokio::test]
async fn an_idle_connection_parks_and_serves_every_kind_of_next_request_on_the_same_socket() {
    let lab = lab("park-serve", Duration::from_secs(30)).await;
    let (mut s, mut buf) = lab.parked_connection().await;

    // Woken by its next request, on the same socket.
    assert_eq!(ask(&mut s, &mut buf, GET).await.1, "b1 0");
    lab.until_parked(1).await;

    // Two pipelined requests in one write.
    s.write_all(format!("{GET}{GET}").as_bytes()).await.unwrap();
    assert_eq!(response(&mut s, &mut buf).await.1, "b1 0");
    assert_eq!(response(&mut s, &mut buf).await.1, "b1 0");
    lab.until_parked(1).await;

    // A body read whole (Content-Length, then chunked) leaves the connection parkable.
    let post = "POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(ask(&mut s, &mut buf, post).await.1, "b1 5");
    lab.until_parked(1).await;
    let chunked =
        "POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    assert_eq!(ask(&mut s, &mut buf, chunked).await.1, "b1 3");
    lab.until_parked(1).await;

    // An upgrade after a park: the tunnel gets the socket.
    let (status, _) = ask(&mut s, &mut buf, &upgrade("shop.test")).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echo))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(&echo, b"ping");
    // Every request above went through one client connection.
    assert_eq!(lab.proxy.metrics.connections_open(), 1);
    assert!(lab.backend.hits.load(std::sync::atomic::Ordering::Relaxed) >= 7);
    drop(s);
    lab.proxy.shutdown().await;
}

#[tokio::test]
async fn a_head_cut_in_two_across_a_park_is_served_whole() {
    let lab = lab("park-half-head", Duration::from_secs(30)).await;
    let (mut s, mut buf) = lab.parked_connection().await;
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    lab.until_parked(0).await;
    // Several park periods with half a head in hyper's buffer: the park finds it, gives it
    // back, and does not park again before the request starts.
    tokio::time::sleep(PARK_AFTER * 6).await;
    assert_eq!(lab.parked(), 0, "parked with half a request head");
    assert_eq!(
        ask(&mut s, &mut buf, "st: shop.test\r\n\r\n").await.1,
        "b1 0"
    );
    lab.until_parked(1).await;

    // Half a head right after a response, before the connection parks: the park takes the
    // socket back with those bytes, which the next hyper connection reads first.
    s.write_all(GET.as_bytes()).await.unwrap();
    assert_eq!(response(&mut s, &mut buf).await.1, "b1 0");
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(PARK_AFTER * 6).await;
    assert_eq!(lab.parked(), 0, "parked with half a request head");
    assert_eq!(
        ask(&mut s, &mut buf, "st: shop.test\r\n\r\n").await.1,
        "b1 0"
    );
    lab.until_parked(1).await;
    drop(s);
    lab.proxy.shutdown().await;
}

#[tokio::test]
async fn a_connection_whose_body_was_left_unread_is_served_but_never_parks() {
    let lab = lab("park-unread", Duration::from_secs(30)).await;
    let mut s = TcpStream::connect(lab.proxy.http_addr).await.unwrap();
    let mut buf = Vec::new();
    // No route for this host: answered locally, the body never read by the proxy (hyper
    // drains it or closes).
    let post = "POST / HTTP/1.1\r\nHost: nobody.test\r\nContent-Length: 5\r\n\r\nhello";
    let (status, _) = ask(&mut s, &mut buf, post).await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    match tokio::time::timeout(Duration::from_secs(10), async {
        s.write_all(GET.as_bytes()).await?;
        Ok::<_, std::io::Error>(read_head(&mut s, &mut buf).await)
    })
    .await
    .expect("an answer or a close within 10 s")
    {
        // hyper drained the body: keep-alive goes on, but the connection must not park.
        Ok(Some(_)) => {
            tokio::time::sleep(PARK_AFTER * 6).await;
            assert_eq!(lab.parked(), 0, "a connection with an unread body parked");
        }
        // hyper closed it: nothing could park.
        Ok(None) | Err(_) => assert_eq!(lab.parked(), 0),
    }
    drop(s);
    lab.proxy.shutdown().await;
}

#[tokio::test]
async fn exchanges_after_which_hyper_closes_are_closed_not_parked() {
    let lab = lab("park-close", Duration::from_secs(30)).await;
    for (what, raw) in [
        ("HTTP/1.0", "GET / HTTP/1.0\r\nHost: shop.test\r\n\r\n"),
        (
            "Connection: close",
            "GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: keep-alive, close\r\n\r\n",
        ),
    ] {
        let mut s = TcpStream::connect(lab.proxy.http_addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
            .await
            .unwrap_or_else(|_| panic!("{what}: not closed after the answer"))
            .unwrap();
        let text = String::from_utf8_lossy(&all);
        assert!(text.ends_with("b1 0"), "{what}: {text}");
        assert_eq!(lab.parked(), 0, "{what}");
    }

    // A refused upgrade: hyper keeps the upgrade pending, so the connection never parks (it
    // would hand the socket to the dead upgrade); it goes on serving.
    let mut s = TcpStream::connect(lab.proxy.http_addr).await.unwrap();
    let mut buf = Vec::new();
    let (status, _) = ask(&mut s, &mut buf, &upgrade("nobody.test")).await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert_eq!(ask(&mut s, &mut buf, GET).await.1, "b1 0");
    tokio::time::sleep(PARK_AFTER * 6).await;
    assert_eq!(lab.parked(), 0, "parked after a refused upgrade");
    assert_eq!(ask(&mut s, &mut buf, GET).await.1, "b1 0");

    // HTTP/2 connections keep their state (HPACK tables): they never park.
    let stream = TcpStream::connect(lab.proxy.http_addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let h2 = tokio::spawn(conn);
    let req = hyper::Request::get("http://shop.test/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(tx.send_request(req).await.unwrap().status(), 200);
    tokio::time::sleep(PARK_AFTER * 6).await;
    assert_eq!(lab.parked(), 0, "an HTTP/2 connection parked");
    drop(tx);
    h2.abort();
    drop(s);
    lab.proxy.shutdown().await;
}

#[tokio::test]
async fn a_parked_connection_closes_at_the_keep_alive_limit_and_at_shutdown() {
    let lab = lab("park-limit", Duration::from_millis(300)).await;
    let (mut s, _) = lab.parked_connection().await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("closed at the keep-alive limit, well within 10 s")
        .unwrap();
    assert_eq!(n, 0, "bytes on an idle connection: {rest:?}");
    lab.until_parked(0).await;

    // Shutdown: a parked connection is idle, so it closes at once.
    let (mut s, _) = lab.parked_connection().await;
    let t = Instant::now();
    let shutdown = tokio::spawn(lab.proxy.shutdown());
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("closed by the shutdown")
        .unwrap();
    assert_eq!(n, 0);
    shutdown.await.unwrap();
    // Far below the 30 s shutdown timeout: nothing waited for the idle connection.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test]
async fn http2_prior_knowledge_is_recognised_when_its_preface_comes_in_pieces() {
    let lab = lab("park-h2", Duration::from_secs(30)).await;
    let mut s = TcpStream::connect(lab.proxy.http_addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The rest of the preface and an empty SETTINGS frame.
    s.write_all(b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut frame))
        .await
        .expect("an HTTP/2 frame within 10 s")
        .unwrap();
    assert_eq!(
        frame[3], 4,
        "the server's first frame is SETTINGS: {frame:?}"
    );
    // And a whole h2c exchange through the proxy.
    assert_eq!(
        get_h2(lab.proxy.http_addr, "shop.test", "/").await.1,
        "b1 0"
    );
    drop(s);
    lab.proxy.shutdown().await;
}
