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
    r.health.interval_ms = 60_000; // no probe connections during the measurement
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    let addr = proxy.http_addr;
    let opened = || b.connections.load(Ordering::Relaxed);
    // Idle times below are the subject of this test: 400 ms is past the 250 ms within which a
    // POST may reuse a connection, and well inside the 1.5 s pool limit.
    let idle = Duration::from_millis(400);

    assert_eq!(get(addr, "shop.test", "/").await.0, 200);
    let base = opened();
    tokio::time::sleep(idle).await;
    assert_eq!(get(addr, "shop.test", "/").await.0, 200);
    assert_eq!(
        opened(),
        base,
        "a GET did not reuse a connection idle for 400 ms"
    );
    tokio::time::sleep(idle).await;
    let (s, body) = request(addr, "POST", "shop.test", "/", "pay").await;
    assert_eq!((s, body.as_str()), (200, "b 3"));
    assert_eq!(
        opened(),
        base + 1,
        "a POST reused a connection idle for 400 ms"
    );
    // Right after a response, the connection is proven alive: the next POST takes it.
    let (s, _) = request(addr, "POST", "shop.test", "/", "pay").await;
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
    let t = Instant::now();
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
    assert!(t.elapsed() >= Duration::from_millis(900));
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
