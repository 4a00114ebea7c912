//! The inline upstream client (`luma_proxy::inline`) over real loopback sockets: GETs on pooled
//! sockets the backend closes on its own clock, every framing a backend may answer with, and
//! the answers it must refuse.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// GETs whose pooled socket the backend has closed, or is closing, when they come: each must
/// get its answer (the socket is dropped, the request written again on a fresh one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_on_sockets_the_backend_closed_never_fail() {
    let idle = Duration::from_millis(300);
    let b = IdleClosingBackend::start("127.0.0.2", idle, Duration::from_millis(5)).await;
    let proxy = start_proxy("inline-stale").await;
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.health.interval_ms = 86_400_000; // only the GETs below use the backend
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    let addr = proxy.http_addr;
    let backend = backend_of(&proxy, "shop.test");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(KeepAliveClient::connect(addr, "shop.test").await);
    }
    // Spaced around the backend's idle limit (below the pool's 1.5 s), so pooled sockets are
    // found closed, half-closed and alive.
    for offset_ms in [-20i64, -5, 0, 2, 5, 10, 20, 40] {
        for c in clients.iter_mut() {
            let (status, body) = c.request("GET", "/", "").await;
            assert_eq!((status, body.as_str()), (200, "0"));
        }
        tokio::time::sleep(Duration::from_millis((300 + offset_ms) as u64)).await;
    }
    assert!(
        b.idle_closes.load(Ordering::Relaxed) > 0,
        "the backend never closed an idle socket: the test proved nothing"
    );
    // Each GET reached the backend once (a socket found closed before the write is not a
    // request), and the inline client was the one writing them.
    assert_eq!(b.requests.load(Ordering::Relaxed), 32);
    assert!(
        backend.inline_writes() >= 32,
        "the GETs did not go through the inline client"
    );
    proxy.shutdown().await;
}

/// The backend object serving `host`: its counters witness that the inline client served.
fn backend_of(
    proxy: &luma_proxy::server::RunningProxy,
    host: &str,
) -> Arc<luma_proxy::backend::Backend> {
    let svc = proxy.deployer.router.lookup(host).expect("a route");
    svc.balancer.pick(None).expect("a healthy backend")
}

/// A backend that answers by path with a raw answer, counting its connections.
async fn raw_backend(ip: &str, connections: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = read_head(&mut s, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let (answer, close): (&[u8], bool) = match path.as_str() {
                        "/up" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                              5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\nx-sum: 12\r\n\r\n",
                            false,
                        ),
                        "/close" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
                        "/both" => (
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                              content-length: 3\r\n\r\n0\r\n\r\n",
                            false,
                        ),
                        "/switch" => (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", false),
                        "/extra" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokJUNK", false),
                        "/early-hints" => (
                            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
                              HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhints",
                            false,
                        ),
                        _ => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
                    };
                    // A HEAD answer is the head alone (what follows it would be stray bytes).
                    let answer = if head.starts_with("HEAD ") {
                        let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                        &answer[..end + 4]
                    } else {
                        answer
                    };
                    if s.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_framing_passes_and_ambiguous_answers_are_refused() {
    let connections = Arc::new(AtomicU64::new(0));
    let b = raw_backend("127.0.0.3", connections.clone()).await;
    let proxy = start_proxy("inline-framing").await;
    let mut r = route("shop", "shop.test", &[b]);
    r.health.interval_ms = 86_400_000; // no check connection during the test
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    let addr = proxy.http_addr;
    let opened = || connections.load(Ordering::Relaxed);
    let mut c = KeepAliveClient::connect(addr, "shop.test").await;
    let base = opened();
    let backend = backend_of(&proxy, "shop.test");

    assert_eq!(
        c.request("GET", "/chunked", "").await,
        (200, "hello, world".to_string())
    );
    assert_eq!(
        c.request("GET", "/early-hints", "").await,
        (200, "hints".to_string())
    );
    assert_eq!(c.request("GET", "/nothing", "").await.0, 204);
    assert_eq!(
        backend.inline_writes(),
        3,
        "not the inline client, or a rewrite"
    );
    // One socket carried all four.
    assert_eq!(c.request("GET", "/nothing", "").await.0, 204);
    assert_eq!(
        opened(),
        base + 1,
        "a socket that ended its answers cleanly was not reused"
    );

    // Read until close: the answer is whole, and the socket is not pooled.
    assert_eq!(
        c.request("GET", "/close", "").await,
        (200, "until the end".to_string())
    );
    assert_eq!(c.request("GET", "/nothing", "").await.0, 204);
    assert_eq!(
        opened(),
        base + 2,
        "the socket after a read-until-close answer"
    );

    // Bytes after an answer: it is delivered, and its socket is never reused.
    assert_eq!(
        c.request("GET", "/extra", "").await,
        (200, "ok".to_string())
    );
    let before = opened();
    assert_eq!(c.request("GET", "/nothing", "").await.0, 204);
    assert_eq!(opened(), before + 1, "a socket with stray bytes was reused");

    // Two framings at once, or a 101 nobody asked for: 502, not a guess. The backend gets the
    // request twice (the replay on the next attempt), and the client's connection lives on.
    for path in ["/both", "/switch"] {
        let (status, _) = c.request("GET", path, "").await;
        assert_eq!(status, 502, "{path}");
    }
    assert_eq!(c.request("GET", "/chunked", "").await.0, 200);
    proxy.shutdown().await;
}

/// A HEAD answer has no body whatever its length says; the socket goes straight back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_end_at_their_head() {
    let connections = Arc::new(AtomicU64::new(0));
    let b = raw_backend("127.0.0.4", connections.clone()).await;
    let proxy = start_proxy("inline-head").await;
    let mut r = route("shop", "shop.test", &[b]);
    r.health.interval_ms = 86_400_000; // no check connection during the test
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    let base = connections.load(Ordering::Relaxed);
    let mut s = TcpStream::connect(proxy.http_addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..3 {
        s.write_all(b"HEAD /up HTTP/1.1\r\nhost: shop.test\r\n\r\n")
            .await
            .unwrap();
        let end = read_head(&mut s, &mut buf).await.expect("an answer");
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-length: 2"), "{head}");
        buf.drain(..end);
    }
    // Nothing followed the three heads.
    let mut rest = [0u8; 16];
    let more = tokio::time::timeout(Duration::from_millis(100), s.read(&mut rest)).await;
    assert!(more.is_err(), "bytes after a HEAD answer: {more:?}");
    assert_eq!(
        connections.load(Ordering::Relaxed),
        base + 1,
        "three HEADs did not share one upstream socket"
    );
    proxy.shutdown().await;
}
