//! In-process tests of luma-proxy over real loopback sockets: zero-loss route switching,
//! draining, retry rules, error codes, upgrades, HTTP/2, limits, restarts.

mod common;

use common::*;
use hyper::Method;
use luma_api::RemoveRequest;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_a_route_100_times_under_load_loses_no_request() {
    let proxy = start_proxy("switch").await;
    let blue = [
        TestBackend::start("127.0.0.2", "blue").await,
        TestBackend::start("127.0.0.3", "blue").await,
    ];
    let green = [
        TestBackend::start("127.0.0.4", "green").await,
        TestBackend::start("127.0.0.5", "green").await,
    ];
    let blue_addrs: Vec<_> = blue.iter().map(|b| b.addr).collect();
    let green_addrs: Vec<_> = green.iter().map(|b| b.addr).collect();
    deploy_route(&proxy, "shop", "shop.test", &blue_addrs).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    // Keep-alive and Connection: close, GET and POST.
    for (keepalive, post) in [
        (true, false),
        (true, false),
        (true, true),
        (false, false),
        (false, true),
        (true, false),
    ] {
        workers.push(tokio::spawn(load_worker(
            proxy.http_addr,
            "shop.test".into(),
            keepalive,
            post,
            stop.clone(),
            tally.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    for i in 0..100 {
        let addrs = if i % 2 == 0 {
            &green_addrs
        } else {
            &blue_addrs
        };
        let out = deploy_route(&proxy, "shop", "shop.test", addrs).await;
        assert_eq!(out.drain.as_ref().unwrap().cut, 0, "drain cut requests");
    }
    let switching = started.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    eprintln!("100 switches in {switching:?}: {ok} ok, {failed} failed");
    assert_eq!(
        failed,
        0,
        "first failure: {:?}",
        tally.first_failure.lock().unwrap()
    );
    assert!(ok > 500, "load generator barely ran: {ok}");
    for b in blue.iter().chain(green.iter()) {
        assert!(
            b.hits.load(Ordering::Relaxed) > 0,
            "{} at {} got no traffic",
            b.name,
            b.addr
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_drains_slow_in_flight_requests_before_replying() {
    let proxy = start_proxy("drain").await;
    let old = TestBackend::start("127.0.0.2", "old").await;
    let new = TestBackend::start("127.0.0.3", "new").await;
    deploy_route(&proxy, "shop", "shop.test", &[old.addr]).await;

    let addr = proxy.http_addr;
    let slow = tokio::spawn(async move { get(addr, "shop.test", "/slow?ms=1500").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let out = deploy_route(&proxy, "shop", "shop.test", &[new.addr]).await;
    let deploy_took = t.elapsed();
    // New requests go to the new release at once, while the slow one is still running.
    let (status, body) = slow.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "old 0"));
    assert!(
        deploy_took >= Duration::from_millis(1100),
        "deploy returned before the drain: {deploy_took:?}"
    );
    let drain = out.drain.unwrap();
    assert_eq!(drain.cut, 0);
    assert!(drain.waited_ms >= 1100, "{drain:?}");
    assert_eq!(get(addr, "shop.test", "/").await, (200, "new 0".into()));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_post_is_never_replayed_but_a_get_is_retried_once() {
    let proxy = start_proxy("retry").await;
    let d1 = DroppingBackend::start("127.0.0.2").await;
    let d2 = DroppingBackend::start("127.0.0.3").await;
    deploy_route(&proxy, "shop", "shop.test", &[d1.addr, d2.addr]).await;
    let swallowed = || d1.swallowed.load(Ordering::Relaxed) + d2.swallowed.load(Ordering::Relaxed);

    let (status, _) = request(proxy.http_addr, "POST", "shop.test", "/order", "pay-once").await;
    assert_eq!(status, 502);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(swallowed(), 1, "the POST reached a backend more than once");

    let (status, _) = get(proxy.http_addr, "shop.test", "/page").await;
    assert_eq!(status, 502);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        swallowed(),
        3,
        "a GET is retried exactly once, on another backend"
    );
    assert!(
        d1.swallowed.load(Ordering::Relaxed) >= 1 && d2.swallowed.load(Ordering::Relaxed) >= 1,
        "the retry went to the same backend"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_to_a_half_broken_route_are_each_delivered_at_most_once() {
    let proxy = start_proxy("post-once").await;
    let good = TestBackend::start("127.0.0.2", "good").await;
    let bad = DroppingBackend::start("127.0.0.3").await;
    deploy_route(&proxy, "shop", "shop.test", &[good.addr, bad.addr]).await;
    let mut ok = 0;
    for _ in 0..40 {
        match request(proxy.http_addr, "POST", "shop.test", "/", "x")
            .await
            .0
        {
            200 => ok += 1,
            502 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let delivered = good.hits.load(Ordering::Relaxed) + bad.swallowed.load(Ordering::Relaxed);
    assert_eq!(delivered, 40, "some POST was delivered twice (or lost)");
    assert_eq!(ok as u64, good.hits.load(Ordering::Relaxed));
    // Every GET succeeds: a swallowed GET is retried on the good backend.
    for _ in 0..40 {
        assert_eq!(get(proxy.http_addr, "shop.test", "/").await.0, 200);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_no_get_and_is_marked_down() {
    let proxy = start_proxy("kill").await;
    let a = TestBackend::start("127.0.0.2", "a").await;
    let b = TestBackend::start("127.0.0.3", "b").await;
    deploy_route(&proxy, "shop", "shop.test", &[a.addr, b.addr]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(load_worker(
                proxy.http_addr,
                "shop.test".into(),
                true,
                false,
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "{:?}",
        tally.first_failure.lock().unwrap()
    );
    let svc = proxy.deployer.router.lookup("shop.test").unwrap();
    let reports = svc.reports();
    let ra = reports
        .iter()
        .find(|r| r.addr == a.addr.to_string())
        .unwrap();
    assert!(!ra.healthy, "killed replica still healthy: {ra:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_404_503_504_with_short_bodies() {
    let proxy = start_proxy("errors").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    let (s, body) = get(proxy.http_addr, "nobody.test", "/").await;
    assert_eq!(s, 404);
    assert!(body.len() < 100 && !body.contains("shop"));

    let mut r = route("shop", "shop.test", &[b.addr]);
    r.timeouts.response_ms = 300;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    let t = Instant::now();
    assert_eq!(
        get(proxy.http_addr, "shop.test", "/slow?ms=3000").await.0,
        504
    );
    assert!(t.elapsed() < Duration::from_secs(2));

    b.healthy.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t = Instant::now();
    let (s, body) = get(proxy.http_addr, "shop.test", "/").await;
    assert_eq!(s, 503, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "503 was slow: {:?}",
        t.elapsed()
    );
    // The only backend is still checked and comes back by itself.
    b.healthy.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(proxy.http_addr, "shop.test", "/").await.0, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deploy_leaves_the_route_unchanged_and_says_why_per_backend() {
    let proxy = start_proxy("gate").await;
    let live = TestBackend::start("127.0.0.2", "live").await;
    let sick = TestBackend::start("127.0.0.3", "sick").await;
    let fine = TestBackend::start("127.0.0.4", "fine").await;
    sick.healthy.store(false, Ordering::Relaxed);
    deploy_route(&proxy, "shop", "shop.test", &[live.addr]).await;
    let mut req = deploy_req(route("shop", "shop.test", &[sick.addr, fine.addr]));
    req.deploy_timeout_ms = Some(800);
    let err = proxy.deployer.deploy(req).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("1 of 2 backends"), "{text}");
    assert!(
        text.contains(&sick.addr.to_string()) && text.contains("503"),
        "{text}"
    );
    assert_eq!(
        get(proxy.http_addr, "shop.test", "/").await,
        (200, "live 0".into())
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_belong_to_one_project() {
    let proxy = start_proxy("owner").await;
    let a = TestBackend::start("127.0.0.2", "alpha").await;
    let b = TestBackend::start("127.0.0.3", "beta").await;
    deploy_route(&proxy, "alpha", "shared.test", &[a.addr]).await;
    let err = proxy
        .deployer
        .deploy(deploy_req(route("beta", "shared.test", &[b.addr])))
        .await
        .unwrap_err();
    assert_eq!(err.kind, luma_api::ErrorKind::Conflict);
    assert_eq!(err.http_status(), 409);
    assert!(err.to_string().contains("belongs to project \"alpha\""));
    assert_eq!(
        get(proxy.http_addr, "shared.test", "/").await,
        (200, "alpha 0".into())
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_headers_and_strips_hop_by_hop() {
    let proxy = start_proxy("headers").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    deploy_route(&proxy, "shop", "shop.test", &[b.addr]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.http_addr)
        .await
        .unwrap();
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: Shop.Test:8080\r\nConnection: close, x-hop\r\nX-Hop: secret\r\nKeep-Alive: 5\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.to_ascii_lowercase();
    assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{out}");
    assert!(body.contains("x-forwarded-proto: http"));
    assert!(body.contains("x-forwarded-host: shop.test:8080"));
    assert!(body.contains("x-request-id: "));
    assert!(
        !body.contains("x-hop") && !body.contains("keep-alive: 5"),
        "{out}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_and_end_after_drain() {
    let proxy = start_proxy("ws").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    let other = TestBackend::start("127.0.0.3", "other").await;
    deploy_route(&proxy, "chat", "chat.test", &[b.addr]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.http_addr)
        .await
        .unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping-through-proxy").await.unwrap();
    let mut echo = [0u8; 18];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping-through-proxy");
    // A deploy drains the tunnel for at most the drain timeout, then ends it.
    let mut req = deploy_req(route("chat", "chat.test", &[other.addr]));
    req.drain_timeout_ms = Some(300);
    let out = proxy.deployer.deploy(req).await.unwrap();
    assert_eq!(out.drain.unwrap().cut, 1);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "tunnel stayed open after the drain timeout");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http2_with_prior_knowledge() {
    let proxy = start_proxy("h2").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    deploy_route(&proxy, "shop", "shop.test", &[b.addr]).await;
    assert_eq!(
        get_h2(proxy.http_addr, "shop.test", "/").await,
        (200, "b 0".into())
    );
    assert_eq!(get_h2(proxy.http_addr, "none.test", "/").await.0, 404);
    proxy.shutdown().await;
}

/// Many streams at once on one HTTP/2 connection, whose frames the proxy gathers into shared
/// writes (`coalesce.rs`): every answer arrives whole (`streams_in_flight_together_arrive_whole`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_in_flight_together_all_arrive_whole() {
    let proxy = start_proxy("h2-many").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    deploy_route(&proxy, "shop", "shop.test", &[b.addr]).await;
    let stream = tokio::net::TcpStream::connect(proxy.http_addr)
        .await
        .unwrap();
    streams_in_flight_together_arrive_whole(stream, "shop.test", "b").await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_reject_huge_headers_and_slow_clients() {
    let dir = temp_state_dir("limits");
    let mut cfg = config(dir);
    cfg.header_read_timeout = Duration::from_millis(300);
    cfg.max_header_bytes = 8192;
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(proxy.http_addr)
        .await
        .unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // Slowloris: half a request head, then nothing. The proxy hangs up.
    let mut s = tokio::net::TcpStream::connect(proxy.http_addr)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.te").await.unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "slow client was not cut off");
    assert!(t.elapsed() < Duration::from_secs(2));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_the_token_and_routes_survive_a_restart() {
    let dir = temp_state_dir("restart");
    let proxy = luma_proxy::Proxy::start(config(dir.clone())).await.unwrap();
    let b = TestBackend::start("127.0.0.2", "b").await;
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let mut client = luma_proxy::client::AdminClient {
        addr: proxy.admin_addr,
        token: "wrong".into(),
        timeout: Duration::from_secs(30),
    };
    let r = client.call(Method::GET, "/v1/routes", None).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(!r.body.contains(&token), "token leaked in an error");
    client.token = token.clone();
    let req = serde_json::to_value(deploy_req(route("shop", "shop.test", &[b.addr]))).unwrap();
    let r = client
        .call(Method::POST, "/v1/deploy", Some(req))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let routes = client.op(&luma_api::RoutesRequest {}).await.unwrap();
    assert!(routes.routes[0].backends[0].healthy, "{routes:?}");
    let m = client.call(Method::GET, "/metrics", None).await.unwrap();
    assert!(
        m.body
            .contains("luma_proxy_backend_healthy{project=\"shop\""),
        "{}",
        m.body
    );
    proxy.shutdown().await;

    // Add a corrupt entry beside the good one: it is skipped, the good one comes back.
    let path = dir.join("routes.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    doc["routes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"project": "BAD!", "hosts": ["x.test"], "target": "x"}));
    std::fs::write(&path, doc.to_string()).unwrap();
    let t = Instant::now();
    let proxy = luma_proxy::Proxy::start(config(dir.clone())).await.unwrap();
    loop {
        if get(proxy.http_addr, "shop.test", "/").await.0 == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "restored route did not serve within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("restored route served {:?} after start", t.elapsed());
    proxy.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests_and_remove_drains() {
    let proxy = start_proxy("sigterm").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    deploy_route(&proxy, "shop", "shop.test", &[b.addr]).await;
    let addr = proxy.http_addr;
    let slow = tokio::spawn(async move { get(addr, "shop.test", "/slow?ms=800").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = Instant::now();
    let report = proxy
        .deployer
        .remove(RemoveRequest {
            project: "shop".into(),
            app: "web".into(),
            drain_timeout_ms: Some(5000),
        })
        .await
        .unwrap();
    assert_eq!(report.cut, 0);
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert_eq!(slow.await.unwrap().0, 200);
    assert_eq!(get(addr, "shop.test", "/").await.0, 404);

    deploy_route(&proxy, "shop", "shop.test", &[b.addr]).await;
    let slow = tokio::spawn(async move { get(addr, "shop.test", "/slow?ms=800").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxy.shutdown().await;
    assert_eq!(
        slow.await.unwrap().0,
        200,
        "shutdown cut an in-flight request"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_across_requests() {
    let proxy = start_proxy("pool").await;
    let b = TestBackend::start("127.0.0.2", "b").await;
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.health.interval_ms = 60_000;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    // Requests' connections only: the route's first check may fall inside the loop.
    let before = b.app_connections.load(Ordering::Relaxed);
    // Sequential requests, each on a new client connection: the upstream side is reused.
    for path in ["/", "/bytes", "/headers", "/"].iter().cycle().take(60) {
        assert_eq!(get(proxy.http_addr, "shop.test", path).await.0, 200);
    }
    let opened = b.app_connections.load(Ordering::Relaxed) - before;
    assert!(
        opened <= 2,
        "60 requests opened {opened} upstream connections: the pool is not reused"
    );
    proxy.shutdown().await;
}
