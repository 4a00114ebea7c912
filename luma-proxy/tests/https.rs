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

/// Deploys a route through the deploy contract and panics if the gate refuses it.
async fn install(
    proxy: &luma_proxy::server::RunningProxy,
    req: DeployRequest,
) -> luma_api::DeployOutcome {
    proxy.deployer.deploy(req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_serves_each_projects_own_certificate_and_nothing_for_unknown_names() {
    let dir = TempStateDir::new("tls-sni");
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let (a, b) = (ca.leaf(&["a.test"]), ca.leaf(&["b.test"]));
    install(&proxy, custom_req("alpha", "a.test", &[backend.addr], &a)).await;
    install(&proxy, custom_req("beta", "b.test", &[backend.addr], &b)).await;

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
    assert_eq!(
        presented_leaf(proxy.https_addr, "a.test").await,
        Some(a.sha256.clone())
    );
    for sni in ["unknown.test", "x.a.test"] {
        assert_eq!(
            presented_leaf(proxy.https_addr, sni).await,
            None,
            "{sni}: a certificate was presented"
        );
    }
    // An IP literal sends no SNI at all: no default certificate either.
    assert_eq!(
        presented_leaf(proxy.https_addr, "127.0.0.1").await,
        None,
        "no SNI got a certificate"
    );
    eventually("handshake failures counted", 10, || async {
        (proxy.metrics.handshake_failures() >= before + 3).then_some(())
    })
    .await;
    assert!(proxy
        .metrics
        .render()
        .contains("luma_proxy_tls_handshake_failures_total"));
    assert!(proxy.metrics.render().contains(
        "luma_proxy_certificate_expiry_timestamp_seconds{project=\"alpha\",host=\"a.test\"}"
    ));

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

    // Many streams at once over TLS, their frames gathered into shared records.
    let s = connect(proxy.https_addr, "shop.test", &roots, &[b"h2"])
        .await
        .unwrap();
    streams_in_flight_together_arrive_whole(s, "shop.test", "app").await;

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
    install(
        &proxy,
        custom_req("shop", "shop.test", &[backend.addr], &good),
    )
    .await;
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

/// Writes an ACME host's stored certificate as an earlier run (or an earlier directory) left it.
fn store_acme_cert(dir: &std::path::Path, project: &str, host: &str, leaf: &Leaf, directory: &str) {
    use std::os::unix::fs::DirBuilderExt;
    let d = dir.join(format!("tls/projects/{project}/hosts/{host}"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .unwrap();
    std::fs::write(d.join("chain.pem"), &leaf.chain_pem).unwrap();
    std::fs::write(d.join("key.pem"), &leaf.key_pem).unwrap();
    let meta = serde_json::json!({"source": "acme", "directory": directory, "sha256": leaf.sha256});
    std::fs::write(d.join("meta.json"), meta.to_string()).unwrap();
}

fn status_of(
    proxy: &luma_proxy::server::RunningProxy,
    host: &str,
) -> luma_api::tls::CertificateStatus {
    proxy
        .tls
        .statuses(
            &proxy.deployer.router.specs(),
            &CertificatesRequest {
                project: None,
                hosts: vec![host.into()],
            },
        )
        .certificates
        .into_iter()
        .next()
        .expect("a status for the host")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_ends_once_its_host_left_the_route() {
    let dir = TempStateDir::new("tls-resume");
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let a = ca.leaf(&["a.test"]);
    install(&proxy, custom_req("alpha", "a.test", &[backend.addr], &a)).await;
    // One client, one session store: the second connection resumes the first's session.
    let client = client_config(&ca.pem(), &[b"http/1.1"]);
    let s = connect_with(client.clone(), proxy.https_addr, "a.test")
        .await
        .unwrap();
    assert_eq!(get_on(s, "a.test", "/").await.unwrap().0, 200);
    let s = connect_with(client.clone(), proxy.https_addr, "a.test")
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the client resumes"
    );
    assert_eq!(get_on(s, "a.test", "/").await.unwrap().0, 200);

    // a.test leaves project alpha and comes back in project beta, without a certificate.
    proxy
        .deployer
        .remove(luma_api::RemoveRequest {
            project: "alpha".into(),
            app: "web".into(),
            drain_timeout_ms: Some(1000),
        })
        .await
        .unwrap();
    deploy_route(&proxy, "beta", "a.test", &[backend.addr]).await;
    // A full handshake gets nothing; a resumed one is closed before any request is served.
    assert_eq!(presented_leaf(proxy.https_addr, "a.test").await, None);
    let served = match connect_with(client.clone(), proxy.https_addr, "a.test").await {
        Err(_) => None,
        Ok(s) => get_on(s, "a.test", "/").await.ok(),
    };
    assert_eq!(
        served, None,
        "beta's app was reached on alpha's TLS session"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_ends_once_its_certificate_expired() {
    let dir = TempStateDir::new("tls-resume-expired");
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let leaf = ca.leaf_for(&["soon.test"], std::time::Duration::from_secs(3));
    install(
        &proxy,
        custom_req("alpha", "soon.test", &[backend.addr], &leaf),
    )
    .await;
    let client = client_config(&ca.pem(), &[b"http/1.1"]);
    let s = connect_with(client.clone(), proxy.https_addr, "soon.test")
        .await
        .unwrap();
    assert_eq!(get_on(s, "soon.test", "/").await.unwrap().0, 200);
    eventually("the certificate expired", 30, || async {
        (status_of(&proxy, "soon.test").state == CertState::Expired).then_some(())
    })
    .await;
    // A resumed handshake checks no certificate, so the client would go on with an expired
    // one; the proxy ends the connection right after the handshake instead.
    let s = connect_with(client.clone(), proxy.https_addr, "soon.test")
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let served = get_on(s, "soon.test", "/").await.ok();
    assert_eq!(
        served, None,
        "served on a session whose certificate expired"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_outside_the_connections_certificate_or_project_is_misdirected() {
    let dir = TempStateDir::new("tls-421");
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let (a, b) = (ca.leaf(&["a.test"]), ca.leaf(&["b.test"]));
    install(&proxy, custom_req("alpha", "a.test", &[backend.addr], &a)).await;
    install(&proxy, custom_req("beta", "b.test", &[backend.addr], &b)).await;
    // One certificate for two hosts of project gamma, each on its own app.
    let both = ca.leaf(&["c1.test", "c2.test", "*.alpha-and-beta.test"]);
    install(
        &proxy,
        custom_req("gamma", "c1.test", &[backend.addr], &both),
    )
    .await;
    let mut api = custom_req("gamma", "c2.test", &[backend.addr], &both);
    api.route.app = "api".into();
    proxy.deployer.deploy(api).await.unwrap();
    let roots = ca.pem();

    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let what = String::from_utf8_lossy(alpn);
        // SNI a.test (alpha's certificate), Host b.test (beta's route): 421.
        let s = connect(proxy.https_addr, "a.test", &roots, &[alpn])
            .await
            .unwrap();
        let (status, body) = get_on(s, "b.test", "/").await.unwrap();
        assert_eq!(status, 421, "{what}: {body}");
        // A name the certificate does not cover, with no route at all: 421 too.
        let s = connect(proxy.https_addr, "a.test", &roots, &[alpn])
            .await
            .unwrap();
        assert_eq!(
            get_on(s, "nowhere.test", "/").await.unwrap().0,
            421,
            "{what}"
        );
        // HTTP/2 coalescing within one project: c1.test's connection serves c2.test.
        let s = connect(proxy.https_addr, "c1.test", &roots, &[alpn])
            .await
            .unwrap();
        assert_eq!(
            get_on(s, "c2.test", "/").await.unwrap(),
            (200, "app 0".into()),
            "{what}"
        );
        let s = connect(proxy.https_addr, "a.test", &roots, &[alpn])
            .await
            .unwrap();
        assert_eq!(
            get_on(s, "a.test", "/").await.unwrap(),
            (200, "app 0".into()),
            "{what}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_wildcard_overlap_never_lends_its_certificate_to_the_exact_host() {
    let dir = TempStateDir::new("tls-overlap");
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let wild = ca.leaf(&["*.shop.test"]);
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    install(
        &proxy,
        custom_req("alpha", "*.shop.test", &[backend.addr], &wild),
    )
    .await;
    let mut saved = proxy.deployer.router.specs();
    proxy.shutdown().await;
    // Project beta's exact host under alpha's wildcard, as a table saved before such overlaps
    // were refused holds it. beta's host has no certificate (ACME is off).
    let mut exact = route("beta", "a.shop.test", &[backend.addr]);
    exact.tls = Some(RouteTls {
        certificate: CertificateSource::Acme,
        redirect: true,
        hsts: false,
    });
    saved.push(exact);
    // And one of beta's hosts without `tls` at all.
    let mut plain = route("beta", "plain.shop.test", &[backend.addr]);
    plain.app = "plain".into();
    saved.push(plain);
    luma_proxy::state::StateStore::new(&dir.path())
        .save(&saved)
        .unwrap();

    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    assert!(
        proxy.deployer.router.specs().len() == 3,
        "every route restored"
    );
    for host in ["a.shop.test", "plain.shop.test"] {
        assert_eq!(
            presented_leaf(proxy.https_addr, host).await,
            None,
            "alpha's wildcard certificate was presented for beta's host {host}"
        );
    }
    assert_eq!(
        presented_leaf(proxy.https_addr, "x.shop.test").await,
        Some(wild.sha256.clone())
    );
    // beta's host has no certificate of its own: HTTP serves it, no redirect. (Restored
    // backends serve once they pass their first check.)
    eventually("beta's restored route serves HTTP", 10, || async {
        (get(proxy.http_addr, "a.shop.test", "/").await == (200, "app 0".to_string())).then_some(())
    })
    .await;
    assert_eq!(status_of(&proxy, "a.shop.test").state, CertState::HttpOnly);
    let (status, _) = get(proxy.http_addr, "x.shop.test", "/").await;
    assert_eq!(status, 308, "alpha's own hosts are redirected");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_off_keeps_serving_a_stored_certificate_and_orders_nothing() {
    let dir = TempStateDir::new("tls-acme-off");
    let ca = TestCa::new("Earlier CA");
    let leaf = ca.leaf(&["kept.test"]);
    store_acme_cert(
        &dir.path(),
        "shop",
        "kept.test",
        &leaf,
        "https://ca.test/dir",
    );
    // config() turns ACME off.
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let mut req = tls_route(
        "shop",
        "kept.test",
        &[backend.addr],
        CertificateSource::Acme,
    );
    req.route.hosts.push("none.test".into());
    proxy.deployer.deploy(req).await.unwrap();
    assert_eq!(
        presented_leaf(proxy.https_addr, "kept.test").await,
        Some(leaf.sha256.clone())
    );
    let kept = status_of(&proxy, "kept.test");
    assert_eq!(kept.state, CertState::Issued, "{kept:?}");
    let why = kept.last_error.unwrap_or_default();
    assert!(
        why.contains("ACME is off") && why.contains("not be renewed"),
        "{why}"
    );
    let (status, _) = get(proxy.http_addr, "kept.test", "/").await;
    assert_eq!(status, 308, "a usable certificate: redirected");
    let none = status_of(&proxy, "none.test");
    assert_eq!(none.state, CertState::HttpOnly);
    assert_eq!(none.last_error.as_deref(), Some("ACME is off"));
    assert!(!dir.path().join("tls/accounts").exists(), "nothing ordered");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_root_the_proxy_cannot_use_turns_acme_off_instead_of_stopping_the_proxy() {
    let dir = TempStateDir::new("tls-bad-root");
    let mut cfg = config(dir.path());
    cfg.acme = luma_proxy::config::AcmeSettings {
        directory: Some("https://127.0.0.1:9/dir".into()),
        // Valid PEM framing, not a certificate: luma's check could pass it, webpki refuses it.
        ca_roots_pem: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
        ..luma_proxy::config::AcmeSettings::default()
    };
    let proxy = luma_proxy::Proxy::start(cfg)
        .await
        .expect("the proxy starts");
    let backend = TestBackend::start("127.0.0.1", "app").await;
    proxy
        .deployer
        .deploy(tls_route(
            "shop",
            "shop.test",
            &[backend.addr],
            CertificateSource::Acme,
        ))
        .await
        .unwrap();
    let (status, body) = get(proxy.http_addr, "shop.test", "/").await;
    assert_eq!((status, body.as_str()), (200, "app 0"));
    let st = status_of(&proxy, "shop.test");
    assert_eq!(st.state, CertState::HttpOnly, "{st:?}");
    let why = st.last_error.unwrap_or_default();
    assert!(why.starts_with("ACME is off: ACME CA root"), "{why}");
    assert!(why.contains("--acme-ca-root"), "{why}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_custom_certificates_are_deleted_and_a_missing_one_says_how_to_fix_it() {
    let dir = TempStateDir::new("tls-custom-gc");
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let (old, new) = (ca.leaf(&["shop.test"]), ca.leaf(&["shop.test"]));
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let custom = dir.path().join("tls/projects/shop/custom");
    install(
        &proxy,
        custom_req("shop", "shop.test", &[backend.addr], &old),
    )
    .await;
    assert!(custom.join(&old.sha256).join("key.pem").exists());
    install(
        &proxy,
        custom_req("shop", "shop.test", &[backend.addr], &new),
    )
    .await;
    assert!(
        !custom.join(&old.sha256).exists(),
        "the replaced key stayed on disk"
    );
    assert!(custom.join(&new.sha256).join("key.pem").exists());
    proxy.shutdown().await;

    // The certificate is lost from the state volume: HTTP only, and the status says the fix.
    std::fs::remove_dir_all(custom.join(&new.sha256)).unwrap();
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let st = status_of(&proxy, "shop.test");
    assert_eq!(st.state, CertState::HttpOnly, "{st:?}");
    assert!(st
        .last_error
        .unwrap_or_default()
        .contains("deploy again from luma to send the certificate"));
    // Restored backends serve once they pass their first check.
    eventually("the restored route serves HTTP", 10, || async {
        (get(proxy.http_addr, "shop.test", "/").await == (200, "app 0".to_string())).then_some(())
    })
    .await;
    assert_eq!(presented_leaf(proxy.https_addr, "shop.test").await, None);

    // Following the advice: the same deploy again, with the certificate. It changes no
    // routing (already live), but the certificate is stored and served again.
    let again = install(
        &proxy,
        custom_req("shop", "shop.test", &[backend.addr], &new),
    )
    .await;
    assert!(again.already_live, "an identical deploy");
    assert!(custom.join(&new.sha256).join("key.pem").exists());
    assert_eq!(
        presented_leaf(proxy.https_addr, "shop.test").await,
        Some(new.sha256.clone())
    );
    assert_eq!(status_of(&proxy, "shop.test").state, CertState::Issued);
    let (status, _) = get(proxy.http_addr, "shop.test", "/").await;
    assert_eq!(status, 308, "a usable certificate: redirected");
    proxy.shutdown().await;

    // Lost again; this time the next deploy differs (HSTS on): stored at its commit, and the
    // host's slot, which held nothing, loads it.
    std::fs::remove_dir_all(custom.join(&new.sha256)).unwrap();
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    assert_eq!(status_of(&proxy, "shop.test").state, CertState::HttpOnly);
    let mut changed = custom_req("shop", "shop.test", &[backend.addr], &new);
    if let Some(t) = changed.route.tls.as_mut() {
        t.hsts = true;
    }
    let outcome = proxy.deployer.deploy(changed).await.unwrap();
    assert!(!outcome.already_live);
    assert_eq!(
        presented_leaf(proxy.https_addr, "shop.test").await,
        Some(new.sha256.clone())
    );
    assert_eq!(status_of(&proxy, "shop.test").state, CertState::Issued);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_host_without_its_own_certificate_is_served_by_its_projects_wildcard() {
    let dir = TempStateDir::new("tls-own-wildcard");
    let proxy = luma_proxy::Proxy::start(config(dir.path())).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    let ca = TestCa::new("Luma Test CA");
    let wild = ca.leaf(&["*.shop.test"]);
    install(
        &proxy,
        custom_req("shop", "*.shop.test", &[backend.addr], &wild),
    )
    .await;
    // The same project's exact hosts: one without `tls` (ssl: false), one whose own ACME
    // certificate is not there (ACME is off in these tests: HTTP only).
    let mut plain = deploy_req(route("shop", "api.shop.test", &[backend.addr]));
    plain.route.app = "api".into();
    proxy.deployer.deploy(plain).await.unwrap();
    let mut pending = tls_route(
        "shop",
        "pay.shop.test",
        &[backend.addr],
        CertificateSource::Acme,
    );
    pending.route.app = "pay".into();
    proxy.deployer.deploy(pending).await.unwrap();

    let roots = ca.pem();
    for host in ["api.shop.test", "pay.shop.test"] {
        assert_eq!(
            presented_leaf(proxy.https_addr, host).await,
            Some(wild.sha256.clone()),
            "{host}"
        );
        let s = connect(proxy.https_addr, host, &roots, &[b"http/1.1"])
            .await
            .unwrap();
        assert_eq!(
            get_on(s, host, "/").await.unwrap(),
            (200, "app 0".into()),
            "{host}"
        );
    }
    // The redirect agrees with what the handshake serves: pay's route asks for it.
    let (status, _) = get(proxy.http_addr, "pay.shop.test", "/").await;
    assert_eq!(status, 308);
    let (status, _) = get(proxy.http_addr, "api.shop.test", "/").await;
    assert_eq!(status, 200, "no tls: never redirected");
    proxy.shutdown().await;
}
