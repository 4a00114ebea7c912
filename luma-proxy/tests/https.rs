//! HTTPS on loopback, no CA needed: custom certificates from a test CA, picked by SNI, the
//! deploy gate's refusals, redirects, HSTS, HTTP/2 and upgrades over TLS, and a restart.

mod common;
mod tls_support;

use common::*;
use luma_api::route::RouteKey;
use luma_api::tls::{CertState, CertificateSource, CertificatesRequest, RouteTls};
use luma_api::{DeployRequest, ErrorKind};
use std::net::SocketAddr;
use tls_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_route(
    project: &str,
    host: &str,
    addrs: &[SocketAddr],
    source: CertificateSource,
) -> DeployRequest {
    let mut r = route(project, host, addrs);
    r.tls = Some(RouteTls {
        certificate: source,
        redirect: true,
        hsts: false,
    });
    deploy_req(r)
}

fn custom_req(project: &str, host: &str, addrs: &[SocketAddr], leaf: &Leaf) -> DeployRequest {
    let mut req = tls_route(
        project,
        host,
        addrs,
        CertificateSource::Custom {
            sha256: leaf.sha256.clone(),
        },
    );
    req.certificate = Some(leaf.custom());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_serves_each_projects_own_certificate_and_nothing_for_unknown_names() {
    let dir = TempStateDir::new("tls-sni");
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let (a, b) = (ca.leaf(&["a.test"]), ca.leaf(&["b.test"]));
    proxy
        .deployer
        .deploy(custom_req("alpha", "a.test", &[backend.addr], &a))
        .await
        .unwrap();
    proxy
        .deployer
        .deploy(custom_req("beta", "b.test", &[backend.addr], &b))
        .await
        .unwrap();

    let roots = ca.pem();
    let s = connect(proxy.https_addr, "a.test", &roots, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(peer_sha256(&s), a.sha256);
    let s = connect(proxy.https_addr, "b.test", &roots, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(peer_sha256(&s), b.sha256);

    let before = proxy.metrics.handshake_failures();
    for sni in ["unknown.test", "x.a.test"] {
        let e = connect(proxy.https_addr, sni, &roots, &[b"http/1.1"])
            .await
            .unwrap_err();
        assert!(
            !e.contains("NotValidForName"),
            "{sni}: a certificate was served: {e}"
        );
    }
    // An IP literal sends no SNI at all: no default certificate either.
    let e = connect(proxy.https_addr, "127.0.0.1", &roots, &[b"http/1.1"])
        .await
        .unwrap_err();
    assert!(
        !e.contains("NotValidForName"),
        "no SNI got a certificate: {e}"
    );
    eventually("handshake failures counted", 10, || async {
        (proxy.metrics.handshake_failures() >= before + 3).then_some(())
    })
    .await;
    assert!(proxy
        .metrics
        .render()
        .contains("luma_tls_handshake_failures_total"));
    assert!(proxy
        .metrics
        .render()
        .contains("luma_certificate_expiry_timestamp_seconds{project=\"alpha\",host=\"a.test\"}"));

    // Removing the route forgets its certificate at once.
    proxy
        .deployer
        .remove(luma_api::RemoveRequest {
            project: "alpha".into(),
            app: "web".into(),
            drain_timeout_ms: Some(1000),
        })
        .await
        .unwrap();
    assert!(connect(proxy.https_addr, "a.test", &roots, &[b"http/1.1"])
        .await
        .is_err());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_http1_over_tls_reach_the_app_with_forwarded_proto_https_and_upgrades_work() {
    let dir = TempStateDir::new("tls-h2");
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let leaf = ca.leaf(&["shop.test"]);
    let mut req = custom_req("shop", "shop.test", &[backend.addr], &leaf);
    // No redirect, so plain HTTP reaches the app too.
    req.route.tls.as_mut().unwrap().redirect = false;
    proxy.deployer.deploy(req).await.unwrap();
    let roots = ca.pem();

    let r = https_get(proxy.https_addr, "shop.test", "/headers", &roots, true)
        .await
        .unwrap();
    assert_eq!(r.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(r.status, 200);
    assert!(r.body.contains("x-forwarded-proto: https"), "{}", r.body);
    let r = https_get(proxy.https_addr, "shop.test", "/headers", &roots, false)
        .await
        .unwrap();
    assert_eq!(r.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(r.body.contains("x-forwarded-proto: https"), "{}", r.body);
    // Plain HTTP still says http.
    let (_, body) = get(proxy.http_addr, "shop.test", "/headers").await;
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");

    // A WebSocket-style upgrade over TLS: the tunnel echoes.
    let mut s = connect(proxy.https_addr, "shop.test", &roots, &[b"http/1.1"])
        .await
        .unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during the upgrade");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"ping over tls").await.unwrap();
    let mut echo = vec![0u8; 13];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping over tls");
    drop(s);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_only_once_a_host_has_a_certificate_never_for_challenges_and_hsts_when_asked() {
    let dir = TempStateDir::new("tls-redirect");
    let mut cfg = config(dir.path());
    cfg.https_public_port = 8443;
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    // ACME is off in these tests: the ACME route's host stays HTTP only, so no redirect.
    proxy
        .deployer
        .deploy(tls_route(
            "plain",
            "plain.test",
            &[backend.addr],
            CertificateSource::Acme,
        ))
        .await
        .unwrap();
    let (status, body) = get(proxy.http_addr, "plain.test", "/x").await;
    assert_eq!((status, body.as_str()), (200, "app 0"));
    let st = proxy.tls.statuses(
        &proxy.deployer.router.specs(),
        &CertificatesRequest::default(),
    );
    assert_eq!(st.certificates.len(), 1);
    assert_eq!(st.certificates[0].state, CertState::HttpOnly);
    assert_eq!(
        st.certificates[0].last_error.as_deref(),
        Some("ACME is off")
    );

    let ca = TestCa::new("Luma Test CA");
    let leaf = ca.leaf(&["shop.test"]);
    let mut req = custom_req("shop", "shop.test", &[backend.addr], &leaf);
    req.route.tls.as_mut().unwrap().hsts = true;
    proxy.deployer.deploy(req).await.unwrap();
    let (status, _) = get(proxy.http_addr, "shop.test", "/a/b?c=d").await;
    assert_eq!(status, 308);
    let raw = raw_get(proxy.http_addr, "shop.test", "/a/b?c=d").await;
    assert!(
        raw.contains("location: https://shop.test:8443/a/b?c=d"),
        "{raw}"
    );
    // ACME challenge paths are never redirected (the app answers tokens the proxy did not order).
    let (status, body) = get(
        proxy.http_addr,
        "shop.test",
        "/.well-known/acme-challenge/abc",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "app 0"));
    let r = https_get(proxy.https_addr, "shop.test", "/", &ca.pem(), true)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["strict-transport-security"], "max-age=31536000");

    // Without hsts and without redirect: no header, no 308.
    let mut req = custom_req("shop", "shop.test", &[backend.addr], &leaf);
    req.route.tls.as_mut().unwrap().redirect = false;
    req.certificate = None; // held already
    proxy.deployer.deploy(req).await.unwrap();
    let (status, _) = get(proxy.http_addr, "shop.test", "/").await;
    assert_eq!(status, 200);
    let r = https_get(proxy.https_addr, "shop.test", "/", &ca.pem(), false)
        .await
        .unwrap();
    assert!(!r.headers.contains_key("strict-transport-security"));
    proxy.shutdown().await;
}

/// The response head of one plain GET, as text (lowercase header names).
async fn raw_get(addr: SocketAddr, host: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_custom_certificate_is_refused_with_its_reason_and_changes_nothing() {
    let dir = TempStateDir::new("tls-refuse");
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let good = ca.leaf(&["shop.test"]);
    proxy
        .deployer
        .deploy(custom_req("shop", "shop.test", &[backend.addr], &good))
        .await
        .unwrap();
    let key = RouteKey {
        project: "shop".into(),
        app: "web".into(),
    };
    let live = proxy.deployer.router.get(&key).unwrap().spec.clone();

    let other_host = ca.leaf(&["other.test"]);
    let expired = ca.leaf_valid(&["shop.test"], Some(((2000, 1, 1), (2001, 1, 1))));
    let future = ca.leaf_valid(&["shop.test"], Some(((2999, 1, 1), (3000, 1, 1))));
    let mut wrong_key = ca.leaf(&["shop.test"]);
    wrong_key.key_pem = ca.leaf(&["shop.test"]).key_pem;
    let mut wrong_sha = custom_req("shop", "shop.test", &[backend.addr], &good);
    wrong_sha.route.tls.as_mut().unwrap().certificate = CertificateSource::Custom {
        sha256: other_host.sha256.clone(),
    };
    let mut two_hosts = custom_req("shop", "shop.test", &[backend.addr], &good);
    two_hosts.route.hosts.push("www.shop.test".into());
    let mut not_held = custom_req("shop", "shop.test", &[backend.addr], &other_host);
    not_held.certificate = None;
    let cases = [
        (
            custom_req("shop", "shop.test", &[backend.addr], &other_host),
            "does not cover shop.test; it covers other.test",
        ),
        (
            custom_req("shop", "shop.test", &[backend.addr], &expired),
            "expired on 2001-01-01",
        ),
        (
            custom_req("shop", "shop.test", &[backend.addr], &future),
            "not valid yet",
        ),
        (
            custom_req("shop", "shop.test", &[backend.addr], &wrong_key),
            "private key does not belong",
        ),
        (wrong_sha, "route.tls names"),
        (two_hosts, "does not cover www.shop.test"),
        (not_held, "does not hold for project \"shop\""),
    ];
    for (req, reason) in cases {
        let e = proxy.deployer.deploy(req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.error.contains(reason), "want {reason:?} in: {}", e.error);
        assert!(!e.error.contains("PRIVATE KEY"), "{}", e.error);
        assert_eq!(
            proxy.deployer.router.get(&key).unwrap().spec,
            live,
            "the route changed"
        );
    }
    // The good certificate is still served.
    let s = connect(proxy.https_addr, "shop.test", &ca.pem(), &[b"h2"])
        .await
        .unwrap();
    assert_eq!(peer_sha256(&s), good.sha256);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_come_back_after_a_restart_from_private_files() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempStateDir::new("tls-restart");
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let leaf = ca.leaf(&["shop.test", "*.shop.test"]);
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let mut req = custom_req("shop", "shop.test", &[backend.addr], &leaf);
    req.route.hosts.push("*.shop.test".into());
    proxy.deployer.deploy(req).await.unwrap();
    proxy.shutdown().await;

    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    for sni in ["shop.test", "www.shop.test"] {
        let r = https_get(proxy.https_addr, sni, "/", &ca.pem(), true)
            .await
            .unwrap();
        assert_eq!(r.peer_sha256, leaf.sha256, "{sni}");
        assert_eq!(r.status, 200, "{sni}");
    }
    let st = proxy.tls.statuses(
        &proxy.deployer.router.specs(),
        &CertificatesRequest {
            project: Some("shop".into()),
            hosts: vec![],
        },
    );
    assert_eq!(st.certificates.len(), 2);
    assert!(st
        .certificates
        .iter()
        .all(|c| c.state == CertState::Issued && c.source == "custom"));
    assert_eq!(st.certificates[0].issuer.as_deref(), Some("Luma Test CA"));
    // The same through the admin API (what `luma` and `luma-proxy certs` ask).
    let admin = luma_proxy::client::AdminClient {
        addr: proxy.admin_addr,
        token: luma_proxy::token::read(&dir.path().join("admin.token")).unwrap(),
        timeout: std::time::Duration::from_secs(5),
    };
    let reply = admin
        .op(&CertificatesRequest {
            project: None,
            hosts: vec!["WWW.shop.test".into(), "*.shop.test".into()],
        })
        .await
        .unwrap();
    assert_eq!(reply.certificates.len(), 1, "{reply:?}");
    assert_eq!(reply.certificates[0].host, "*.shop.test");
    assert!(reply.certificates[0].not_after.is_some());

    let mut files = 0;
    let mut stack = vec![dir.path().join("tls")];
    while let Some(d) = stack.pop() {
        assert_eq!(
            std::fs::metadata(&d).unwrap().mode() & 0o777,
            0o700,
            "{}",
            d.display()
        );
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files += 1;
                assert_eq!(
                    std::fs::metadata(&p).unwrap().mode() & 0o777,
                    0o600,
                    "{}",
                    p.display()
                );
            }
        }
    }
    assert!(files >= 2);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_ca_gets_no_orders_for_reserved_names() {
    let dir = TempStateDir::new("tls-public");
    let mut cfg = config(dir.path());
    // The default directory (a public CA): `.test` hosts are HTTP only, and nothing is ordered.
    cfg.acme = luma_proxy::config::AcmeSettings::default();
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let mut req = tls_route(
        "shop",
        "shop.test",
        &[backend.addr],
        CertificateSource::Acme,
    );
    req.route.hosts.push("*.wild.test".into());
    proxy.deployer.deploy(req).await.unwrap();
    let st = proxy.tls.statuses(
        &proxy.deployer.router.specs(),
        &CertificatesRequest::default(),
    );
    assert_eq!(st.certificates.len(), 2);
    for c in &st.certificates {
        assert_eq!(c.state, CertState::HttpOnly, "{c:?}");
    }
    let shop = st
        .certificates
        .iter()
        .find(|c| c.host == "shop.test")
        .unwrap();
    assert!(
        shop.last_error.as_deref().unwrap().contains("no public CA"),
        "{shop:?}"
    );
    let wild = st
        .certificates
        .iter()
        .find(|c| c.host == "*.wild.test")
        .unwrap();
    assert!(
        wild.last_error.as_deref().unwrap().contains("wildcard"),
        "{wild:?}"
    );
    assert!(
        !dir.path().join("tls/accounts").exists(),
        "no account was created"
    );
    proxy.shutdown().await;
}
