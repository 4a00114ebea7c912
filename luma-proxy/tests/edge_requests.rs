//! The proxy at the edge, over raw sockets: strict request heads, chunked framing checked
//! before anything goes upstream, forwarded headers the app can believe, and one project per
//! network and per host through the admin API.

mod common;

use common::*;
use hyper::Method;
use luma_proxy::client::AdminClient;
use luma_proxy::headers::TrustedProxies;
use luma_proxy::server::RunningProxy;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Writes `request` from `from` (a loopback address) and reads until the proxy closes the
/// connection; every request here either asks for `Connection: close` or is one the proxy
/// must answer and close.
async fn exchange_from(from: &str, proxy: SocketAddr, request: &[u8]) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(proxy).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the proxy did not close the connection; read so far: {}",
                String::from_utf8_lossy(&out)
            )
        })
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn exchange(proxy: SocketAddr, request: &[u8]) -> String {
    exchange_from("127.0.0.1", proxy, request).await
}

fn status(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {resp:?}"))
}

/// The value of a response (or echoed request) header, by lowercase name.
fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

fn all_headers<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
        .collect()
}

async fn proxy_with(tag: &str, f: impl FnOnce(&mut luma_proxy::ProxyConfig)) -> RunningProxy {
    let mut cfg = config(temp_state_dir(tag));
    f(&mut cfg);
    luma_proxy::Proxy::start(cfg).await.unwrap()
}

/// A proxy with one route `shop.test` -> a test backend.
async fn shop(tag: &str) -> (RunningProxy, TestBackend) {
    let proxy = proxy_with(tag, |_| {}).await;
    let b = TestBackend::start("127.0.0.1", "shop").await;
    deploy_route(&proxy, "shop", "shop.test", &[b.addr]).await;
    (proxy, b)
}

/// A well-formed request through the same route, answered by the backend; afterwards the
/// backend has counted exactly the requests the proxy sent it.
async fn assert_backend_saw_only_a_good_request(proxy: SocketAddr, b: &TestBackend) {
    assert_eq!(get(proxy, "shop.test", "/").await, (200, "shop 0".into()));
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        1,
        "the backend received a refused request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_are_refused() {
    let (proxy, b) = shop("dup-host").await;
    let r = exchange(
        proxy.http_addr,
        b"GET / HTTP/1.1\r\nHost: shop.test\r\nHost: other.test\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(r.contains("more than one Host"), "{r}");
    // The same Host twice is still two headers.
    let r = exchange(
        proxy.http_addr,
        b"GET / HTTP/1.1\r\nHost: shop.test\r\nHost: shop.test\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");
    assert_backend_saw_only_a_good_request(proxy.http_addr, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_without_host_and_host_against_the_target_are_refused() {
    let (proxy, b) = shop("no-host").await;
    let r = exchange(proxy.http_addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(r.contains("without a Host"), "{r}");
    // Absolute-form whose authority is another host than the Host header.
    let r = exchange(
        proxy.http_addr,
        b"GET http://shop.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(r.contains("disagrees"), "{r}");
    // Matching absolute-form is routed.
    let r = exchange(
        proxy.http_addr,
        b"GET http://shop.test/ HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");
    // HTTP/1.0 may omit Host: no route, but not a malformed request.
    let r = exchange(proxy.http_addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&r), 404, "{r}");
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_trace_get_405_with_allow() {
    let (proxy, b) = shop("methods").await;
    for req in [
        &b"CONNECT shop.test:443 HTTP/1.1\r\nHost: shop.test:443\r\nConnection: close\r\n\r\n"[..],
        &b"TRACE / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"[..],
    ] {
        let r = exchange(proxy.http_addr, req).await;
        assert_eq!(status(&r), 405, "{r}");
        let allow = header(&r, "allow").unwrap_or_else(|| panic!("no Allow in {r}"));
        assert!(allow.contains("GET") && !allow.contains("TRACE"), "{allow}");
    }
    let m = proxy.metrics.render();
    assert!(
        m.contains("luma_proxy_local_errors_total{code=\"405\"} 2"),
        "{m}"
    );
    assert_backend_saw_only_a_good_request(proxy.http_addr, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_malformed_in_its_first_chunk_is_400_and_never_reaches_the_backend() {
    let (proxy, b) = shop("chunked").await;
    // Each breaks before the first chunk has yielded a byte of data, so the proxy has nothing
    // it could send: it reads that chunk before it picks a backend.
    for body in [
        // Not a chunk size.
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        // Garbage after the size.
        &b"5 x\r\nhello\r\n0\r\n\r\n"[..],
        // A size that overflows.
        &b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n"[..],
        // CR without LF.
        &b"5\rhello\r\n0\r\n\r\n"[..],
    ] {
        let mut req =
            b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        let r = exchange(proxy.http_addr, &req).await;
        assert_eq!(status(&r), 400, "{r}");
        assert!(r.contains("malformed request body"), "{r}");
        assert_eq!(header(&r, "connection"), Some("close"), "{r}");
    }
    assert_backend_saw_only_a_good_request(proxy.http_addr, &b).await;
    let m = proxy.metrics.render();
    assert!(
        m.contains("luma_proxy_local_errors_total{code=\"400\"} 4"),
        "{m}"
    );
    // A well-formed chunked body still streams through.
    let r = exchange(
        proxy.http_addr,
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.ends_with("shop 11"), "{r}");
}

/// What a raw backend saw of one request: its head once read, then whether the body ended
/// with the last chunk or the connection was cut first, and the body bytes it got.
enum Seen {
    Head(String),
    Body { complete: bool, bytes: Vec<u8> },
}

/// A raw backend that answers `/up`, reports every other request to `seen` as it reads it,
/// and answers `200 done` to a chunked body that ends well.
async fn reporting_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let Some(end) = read_head(&mut s, &mut buf).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                if head.starts_with("GET /up ") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    return;
                }
                let _ = tx.send(Seen::Head(head));
                let mut body = buf.split_off(end);
                let complete = loop {
                    if body.ends_with(b"0\r\n\r\n") {
                        break true;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break false,
                        Ok(n) => body.extend_from_slice(&chunk[..n]),
                    }
                };
                if complete {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndone")
                        .await;
                }
                let _ = tx.send(Seen::Body {
                    complete,
                    bytes: body,
                });
            });
        }
    });
    (addr, rx)
}

/// The backend's next report.
async fn next(seen: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the backend saw nothing")
        .expect("backend gone")
}

/// Past the first chunk, the body streams: the backend has the head and the first chunk when
/// the bad framing arrives. The client gets a 400 (not a 502), the backend a body cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_framing_after_the_first_chunk_is_400_and_cuts_the_upload_short() {
    let proxy = proxy_with("chunked-later", |_| {}).await;
    let (backend, mut seen) = reporting_backend().await;
    deploy_route(&proxy, "shop", "shop.test", &[backend]).await;
    for (first, rest, upstream) in [
        // A whole first chunk, then a size that is not one.
        (
            &b"5\r\nhello\r\n"[..],
            &b"zz\r\n"[..],
            &b"5\r\nhello\r\n"[..],
        ),
        // A first chunk longer than its size says: its first 3 bytes are data.
        (
            &b"3\r\nhel"[..],
            &b"lo\r\n0\r\n\r\n"[..],
            &b"3\r\nhel\r\n"[..],
        ),
    ] {
        let mut s = TcpStream::connect(proxy.http_addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        s.write_all(first).await.unwrap();
        // Only once the backend has the request does the rest go: a later segment.
        let Seen::Head(head) = next(&mut seen).await else {
            panic!("no head first")
        };
        assert!(head.starts_with("POST / HTTP/1.1\r\n"), "{head}");
        s.write_all(rest).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the proxy did not close the connection")
            .unwrap();
        let r = String::from_utf8_lossy(&out);
        assert_eq!(status(&r), 400, "{r}");
        assert!(r.contains("malformed request body"), "{r}");
        assert_eq!(header(&r, "connection"), Some("close"), "{r}");
        let Seen::Body { complete, bytes } = next(&mut seen).await else {
            panic!("a second head")
        };
        assert!(!complete, "the backend got a whole body");
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(upstream)
        );
    }
}

/// A chunked body whose first chunk never comes does not hold its connection for the idle
/// timeout: the route's response timeout bounds the wait for it, as for any later chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_that_never_starts_is_408_at_the_response_timeout() {
    let proxy = proxy_with("chunked-silent", |_| {}).await;
    let b = TestBackend::start("127.0.0.1", "shop").await;
    let mut r = route("shop", "shop.test", &[b.addr]);
    r.timeouts.response_ms = 300;
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
    let t = std::time::Instant::now();
    let r = exchange(
        proxy.http_addr,
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 408, "{r}");
    assert_eq!(header(&r, "connection"), Some("close"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(b.hits.load(Ordering::SeqCst), 0);
    let m = proxy.metrics.render();
    assert!(
        m.contains("luma_proxy_local_errors_total{code=\"408\"} 1"),
        "{m}"
    );
}

/// The forwarded headers a client could send, also spelled with underscores, which CGI, WSGI
/// and Rack read as the same `HTTP_X_REAL_IP`... keys; and one unrelated underscore header.
const SPOOFED: &str = "GET /headers HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=https\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX_Real_IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\nX-Forwarded_Proto: https\r\nx_forwarded_host: evil.test\r\nX_App_Token: kept\r\nConnection: close\r\n\r\n";

/// The echoed header names with an underscore: only the unrelated one may get through.
fn assert_no_underscore_spoofs(echoed: &str) {
    let names: Vec<&str> = echoed
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.trim()))
        .filter(|k| k.contains('_'))
        .collect();
    assert_eq!(names, ["x_app_token"], "{echoed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_mode_forwards_only_what_the_proxy_saw() {
    let (proxy, _b) = shop("xff-edge").await;
    let r = exchange_from("127.0.0.5", proxy.http_addr, SPOOFED.as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    let (_, echoed) = r.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        all_headers(echoed, "x-forwarded-for"),
        ["127.0.0.5"],
        "{echoed}"
    );
    assert_eq!(
        header(echoed, "x-forwarded-proto"),
        Some("http"),
        "{echoed}"
    );
    assert_eq!(
        header(echoed, "x-forwarded-host"),
        Some("shop.test"),
        "{echoed}"
    );
    assert_eq!(header(echoed, "x-real-ip"), None, "{echoed}");
    assert_eq!(header(echoed, "forwarded"), None, "{echoed}");
    assert_no_underscore_spoofs(echoed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_peer_is_appended_and_an_untrusted_one_is_not() {
    let proxy = proxy_with("xff-trusted", |c| {
        c.trusted_proxies = TrustedProxies::parse("192.0.2.0/24,127.0.0.5/32").unwrap();
    })
    .await;
    let b = TestBackend::start("127.0.0.1", "shop").await;
    deploy_route(&proxy, "shop", "shop.test", &[b.addr]).await;

    let r = exchange_from("127.0.0.5", proxy.http_addr, SPOOFED.as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    let (_, echoed) = r.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        all_headers(echoed, "x-forwarded-for"),
        ["6.6.6.6, 127.0.0.5"],
        "{echoed}"
    );
    assert_eq!(
        header(echoed, "x-forwarded-proto"),
        Some("https"),
        "{echoed}"
    );
    assert_eq!(
        header(echoed, "x-forwarded-host"),
        Some("evil.test"),
        "{echoed}"
    );
    assert_eq!(header(echoed, "x-real-ip"), Some("6.6.6.6"), "{echoed}");
    assert_eq!(
        header(echoed, "forwarded"),
        Some("for=6.6.6.6;proto=https"),
        "{echoed}"
    );
    // The trusted hop passes its own client's headers through: underscore spellings are not
    // the hop's to vouch for either.
    assert_no_underscore_spoofs(echoed);

    // Next door, outside the trusted list: edge mode.
    let r = exchange_from("127.0.0.6", proxy.http_addr, SPOOFED.as_bytes()).await;
    let (_, echoed) = r.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        all_headers(echoed, "x-forwarded-for"),
        ["127.0.0.6"],
        "{echoed}"
    );
    assert_eq!(
        header(echoed, "x-forwarded-proto"),
        Some("http"),
        "{echoed}"
    );
    assert_eq!(header(echoed, "x-real-ip"), None, "{echoed}");
    assert_eq!(header(echoed, "forwarded"), None, "{echoed}");
    assert_no_underscore_spoofs(echoed);
}

/// A proxy and a client of its admin API (loopback, bearer token).
async fn start_in(tag: &str, allow_literal: bool) -> (RunningProxy, AdminClient) {
    let dir = temp_state_dir(tag);
    let mut cfg = config(dir.clone());
    cfg.allow_literal_targets = allow_literal;
    let p = luma_proxy::Proxy::start(cfg).await.unwrap();
    let c = AdminClient {
        addr: p.admin_addr,
        token: luma_proxy::token::read(&dir.join("admin.token")).unwrap(),
        timeout: Duration::from_secs(20),
    };
    (p, c)
}

/// POSTs `body` to an admin path; returns (status, reply JSON).
async fn post(c: &AdminClient, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = c.call(Method::POST, path, Some(body)).await.unwrap();
    (r.status, serde_json::from_str(&r.body).unwrap_or_default())
}

async fn routes(c: &AdminClient) -> serde_json::Value {
    let r = c.call(Method::GET, "/v1/routes", None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let mut v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    // Only what a route is, not the health counters that move on their own.
    for r in v["routes"].as_array_mut().unwrap() {
        r.as_object_mut().unwrap().remove("backends");
    }
    v
}

fn deploy_json(project: &str, hosts: &[&str], target: &str, network: &str) -> serde_json::Value {
    serde_json::json!({
        "route": {
            "project": project,
            "app": "web",
            "hosts": hosts,
            "target": target,
            "network": network,
            "health": {"interval_ms": 100, "timeout_ms": 500},
        },
        "deploy_timeout_ms": 5000,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_project_routes_are_refused_and_change_nothing() {
    let (proxy, c) = start_in("cross", true).await;
    let alpha = TestBackend::start("127.0.0.1", "alpha").await;
    let beta = TestBackend::start("127.0.0.1", "beta").await;
    let (a, b) = (alpha.addr.to_string(), beta.addr.to_string());
    let (s, v) = post(
        &c,
        "/v1/deploy",
        deploy_json("alpha", &["www.alpha.test"], &a, ""),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &c,
        "/v1/deploy",
        deploy_json("beta", &["*.wild.test"], &b, ""),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let before = routes(&c).await;

    let refused = [
        // Another project's network.
        (
            deploy_json("alpha", &["www.alpha.test"], "web:3000", "beta-network"),
            400,
            "invalid",
            "not project \"alpha\"'s network",
        ),
        // A bare name for the system resolver.
        (
            deploy_json("alpha", &["www.alpha.test"], "web:3000", "host"),
            400,
            "invalid",
            "system resolver",
        ),
        // An exact host inside another project's wildcard.
        (
            deploy_json("alpha", &["shop.wild.test"], &a, ""),
            409,
            "conflict",
            "inside the wildcard \"*.wild.test\" of project \"beta\"",
        ),
        // A wildcard over another project's exact host.
        (
            deploy_json("beta", &["*.alpha.test"], &b, ""),
            409,
            "conflict",
            "would cover host \"www.alpha.test\" of project \"alpha\"",
        ),
    ];
    for (body, want, kind, text) in refused {
        let (s, v) = post(&c, "/v1/deploy", body.clone()).await;
        assert_eq!(s, want, "{body} -> {v}");
        assert_eq!(v["kind"], kind, "{v}");
        assert!(v["error"].as_str().unwrap().contains(text), "{v}");
    }
    // A check may not look into another project's network either.
    let (s, v) = post(
        &c,
        "/v1/check",
        serde_json::json!({"project": "alpha", "target": "web:3000", "network": "beta-network"}),
    )
    .await;
    assert_eq!((s, v["kind"].as_str()), (400, Some("invalid")), "{v}");

    assert_eq!(
        routes(&c).await,
        before,
        "a refused route changed the table"
    );
    assert_eq!(
        get(proxy.http_addr, "shop.wild.test", "/").await,
        (200, "beta 0".into())
    );
    assert_eq!(
        get(proxy.http_addr, "www.alpha.test", "/").await,
        (200, "alpha 0".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literal_targets_need_the_serve_flag() {
    let (proxy, c) = start_in("literal", false).await;
    let b = TestBackend::start("127.0.0.1", "lit").await;
    let (s, v) = post(
        &c,
        "/v1/deploy",
        deploy_json("shop", &["shop.test"], &b.addr.to_string(), ""),
    )
    .await;
    assert_eq!((s, v["kind"].as_str()), (400, Some("invalid")), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("--allow-literal-targets"),
        "{v}"
    );
    let (s, v) = post(
        &c,
        "/v1/check",
        serde_json::json!({"project": "shop", "target": b.addr.to_string()}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(routes(&c).await["routes"], serde_json::json!([]));
    assert_eq!(get(proxy.http_addr, "shop.test", "/").await.0, 404);
    assert_eq!(b.hits.load(Ordering::SeqCst), 0);
}
