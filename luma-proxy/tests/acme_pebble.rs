//! ACME against a real CA: Debian's pebble and pebble-challtestsrv on loopback, validating
//! against the in-process proxy's own HTTP and HTTPS ports. Never skipped: where pebble is not
//! installed the tests fail and say how to install it. Every test starts its own pebble on
//! free loopback ports and kills it when it ends, pass or fail.

mod common;
mod tls_support;

use common::*;
use luma_api::tls::{
    CertState, CertificateSource, CertificateStatus, CertificatesRequest, RouteTls,
};
use luma_proxy::server::RunningProxy;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tls_support::*;

/// A loopback port free now, below the kernel's ephemeral range and never handed out before
/// in this process. The tests run at once and each gives pebble and a proxy several ports to
/// bind later: a port from the ephemeral range could meanwhile be taken by any `:0` bind or
/// outgoing connection of another test, and one handed out twice would have two binders race.
fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let below = 20000..ephemeral_low.max(21000);
    loop {
        let port = fastrand::u16(below.clone());
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.contains(&port) || std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        handed_out.push(port);
        return port;
    }
}

/// pebble and its DNS, killed on drop.
struct Pebble {
    children: Vec<Child>,
    dir: PathBuf,
    pub directory: String,
    pub ca_pem: String,
    management: u16,
    challtest: u16,
    dns: u16,
    port: u16,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failing test's logs are kept for a look; the next run's sweep removes them.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Fails the test where pebble is missing: these tests are part of the suite, not optional.
fn require_pebble() {
    assert!(
        Path::new("/usr/bin/pebble").exists() && Path::new("/usr/bin/pebble-challtestsrv").exists(),
        "pebble is not installed: install it (apt-get install pebble) to run the ACME tests"
    );
}

impl Pebble {
    async fn start(port: u16, http_port: u16, tls_port: u16, validity_s: Option<u64>) -> Pebble {
        let dir = temp_state_dir("pebble");
        let ca = TestCa::new("Pebble Listener CA");
        let leaf = ca.leaf(&["127.0.0.1", "localhost"]);
        std::fs::write(dir.join("cert.pem"), &leaf.chain_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
        let (management, dns, challtest) = (free_port(), free_port(), free_port());
        let mut cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(v) = validity_s {
            cfg["pebble"]["certificateValidityPeriod"] = v.into();
        }
        std::fs::write(dir.join("pebble.json"), cfg.to_string()).unwrap();
        let mut p = Pebble {
            children: Vec::new(),
            dir: dir.clone(),
            directory: format!("https://127.0.0.1:{port}/dir"),
            ca_pem: ca.pem(),
            management,
            challtest,
            dns,
            port,
        };
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        p.children.push(
            Command::new("/usr/bin/pebble-challtestsrv")
                .args([
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                ])
                .args(["-dns01", &format!("127.0.0.1:{dns}")])
                .args(["-management", &format!("127.0.0.1:{challtest}")])
                .stdout(log("challtestsrv.log"))
                .stderr(log("challtestsrv.err"))
                .spawn()
                .unwrap(),
        );
        let ca = p.spawn_ca();
        p.children.push(ca);
        p.wait_listening().await;
        p
    }

    fn spawn_ca(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pebble.log"))
            .unwrap();
        Command::new("/usr/bin/pebble")
            .arg("-config")
            .arg(self.dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            // Go's log package, which reports a port it cannot bind, writes to stderr.
            .stderr(log.try_clone().unwrap())
            .stdout(log)
            .spawn()
            .unwrap()
    }

    /// Waits until pebble, its management port and challtestsrv accept connections. A process
    /// that exits, or a port still closed after 20 s, fails the test with their logs.
    async fn wait_listening(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for port in [self.port, self.management, self.challtest] {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                self.fail_if_exited();
                if tokio::time::Instant::now() >= deadline {
                    panic!("127.0.0.1:{port} still closed after 20s\n{}", self.logs());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // A port that answered may be another program's, taken before pebble could bind it.
        self.fail_if_exited();
    }

    fn fail_if_exited(&mut self) {
        let exited = self
            .children
            .iter_mut()
            .enumerate()
            .find_map(|(i, c)| Some((i, c.try_wait().ok().flatten()?)));
        if let Some((i, status)) = exited {
            let which = if i == 0 {
                "pebble-challtestsrv"
            } else {
                "pebble"
            };
            panic!(
                "{which} exited ({status}) before listening\n{}",
                self.logs()
            );
        }
    }

    /// The ends of pebble's and challtestsrv's logs, for a failure message.
    fn logs(&self) -> String {
        ["pebble.log", "challtestsrv.log", "challtestsrv.err"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!(
                    "--- {name} (ports: ca {}, management {}, challtestsrv {}, dns {}):\n{}",
                    self.port,
                    self.management,
                    self.challtest,
                    self.dns,
                    tail.join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Restarts the CA on the same ports: pebble keeps nothing, so every account is gone.
    async fn restart_ca(&mut self) {
        let mut old = self.children.pop().expect("pebble runs");
        let _ = old.kill();
        let _ = old.wait();
        let ca = self.spawn_ca();
        self.children.push(ca);
        self.wait_listening().await;
    }

    /// The root pebble issues under (new on every start).
    async fn issuing_root(&self) -> String {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.management).parse().unwrap();
        let r = https_get(addr, "127.0.0.1", "/roots/0", &self.ca_pem, false)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        r.body
    }

    /// Points `host` at `ip` in pebble's DNS.
    async fn add_a(&self, host: &str, ip: &str) {
        let body = serde_json::json!({"host": host, "addresses": [ip]}).to_string();
        let addr: SocketAddr = format!("127.0.0.1:{}", self.challtest).parse().unwrap();
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("/add-a")
            .header("host", "challtestsrv")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        assert!(tx.send_request(req).await.unwrap().status().is_success());
    }
}

fn acme_config(dir: PathBuf, directory: &str, ca_pem: &str) -> luma_proxy::ProxyConfig {
    let mut cfg = config(dir);
    cfg.acme = luma_proxy::config::AcmeSettings {
        directory: Some(directory.to_string()),
        email: Some("ops@example.test".into()),
        ca_roots_pem: Some(ca_pem.to_string()),
        retry_min: Duration::from_secs(1),
        retry_max: Duration::from_secs(2),
        orders_per_hour: 50,
    };
    cfg
}

async fn deploy_acme(proxy: &RunningProxy, project: &str, host: &str, backend: SocketAddr) {
    let mut r = route(project, host, &[backend]);
    r.tls = Some(RouteTls {
        certificate: CertificateSource::Acme,
        redirect: true,
        hsts: false,
    });
    proxy.deployer.deploy(deploy_req(r)).await.unwrap();
}

fn status(proxy: &RunningProxy, host: &str) -> CertificateStatus {
    let st = proxy.tls.statuses(
        &proxy.deployer.router.specs(),
        &CertificatesRequest {
            project: None,
            hosts: vec![host.into()],
        },
    );
    st.certificates
        .into_iter()
        .next()
        .expect("a status for the host")
}

async fn issued(proxy: &RunningProxy, host: &str) -> CertificateStatus {
    eventually(&format!("a certificate for {host}"), 90, || async {
        let s = status(proxy, host);
        (s.state == CertState::Issued).then_some(s)
    })
    .await
}

/// The orders placed for `host` (per host, whatever its project).
fn orders(dir: &Path, host: &str) -> usize {
    let p = dir.join(format!("tls/orders/{host}.json"));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["orders"].as_array().unwrap().len()
}

fn meta(dir: &Path, project: &str, host: &str) -> serde_json::Value {
    let p = dir.join(format!("tls/projects/{project}/hosts/{host}/meta.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_at_deploy_redirects_after_and_a_restart_orders_nothing() {
    require_pebble();
    let dir = TempStateDir::new("acme-http01");
    let port = free_port();
    // pebble first, told the proxy's ports; then the proxy, trusting pebble's listener CA.
    let (http_port, https_port) = (free_port(), free_port());
    let pebble = Pebble::start(port, http_port, https_port, None).await;
    let mut cfg = acme_config(dir.path(), &pebble.directory, &pebble.ca_pem);
    cfg.http_addr = format!("127.0.0.1:{http_port}").parse().unwrap();
    cfg.https_addr = format!("127.0.0.1:{https_port}").parse().unwrap();
    let proxy = luma_proxy::Proxy::start(cfg.clone()).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;

    deploy_acme(&proxy, "shop", "shop.test", backend.addr).await;
    let s = issued(&proxy, "shop.test").await;
    assert_eq!(s.source, "acme");
    assert!(
        s.issuer.is_some() && s.not_after.is_some() && s.renew_at.is_some(),
        "{s:?}"
    );
    let root = pebble.issuing_root().await;
    let r = https_get(proxy.https_addr, "shop.test", "/headers", &root, true)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.alpn.as_deref(), Some(&b"h2"[..]));
    let served = r.peer_sha256.clone();
    let m = meta(&dir.path(), "shop", "shop.test");
    assert_eq!(m["challenge"], "http-01");
    assert_eq!(m["sha256"], served.as_str());
    let placed = orders(&dir.path(), "shop.test");
    assert!(proxy
        .metrics
        .render()
        .contains("luma_proxy_acme_orders_total{result=\"issued\"} 1"));
    // Now HTTP redirects, except the challenge path.
    let (code, _) = get(proxy.http_addr, "shop.test", "/page").await;
    assert_eq!(code, 308);
    let (code, _) = get(
        proxy.http_addr,
        "shop.test",
        "/.well-known/acme-challenge/nope",
    )
    .await;
    assert_eq!(code, 200);

    // A host pebble cannot reach (its DNS points at 127.0.0.2, where nothing listens) stays
    // pending with the CA's reason, and keeps serving HTTP.
    pebble.add_a("bad.test", "127.0.0.2").await;
    deploy_acme(&proxy, "shop2", "bad.test", backend.addr).await;
    let s = eventually("the CA's reason for bad.test", 90, || async {
        let s = status(&proxy, "bad.test");
        s.last_error.is_some().then_some(s)
    })
    .await;
    assert_eq!(s.state, CertState::Pending, "{s:?}");
    let why = s.last_error.unwrap();
    assert!(why.contains("127.0.0.2"), "{why}");
    let (code, body) = get(proxy.http_addr, "bad.test", "/").await;
    assert_eq!((code, body.as_str()), (200, "app 0"));
    assert!(proxy
        .metrics
        .render()
        .contains("luma_proxy_acme_orders_total{result=\"failed\"}"));

    // Restart: the same certificate at once, and no order for it.
    proxy
        .deployer
        .remove(luma_api::RemoveRequest {
            project: "shop2".into(),
            app: "web".into(),
            drain_timeout_ms: Some(100),
        })
        .await
        .unwrap();
    proxy.shutdown().await;
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let r = https_get(proxy.https_addr, "shop.test", "/", &root, false)
        .await
        .unwrap();
    assert_eq!(r.peer_sha256, served);
    eventually("the restored host's renewal time", 30, || async {
        status(&proxy, "shop.test").renew_at.map(|_| ())
    })
    .await;
    assert_eq!(orders(&dir.path(), "shop.test"), placed);
    assert!(proxy
        .metrics
        .render()
        .contains("luma_proxy_acme_orders_total{result=\"issued\"} 0"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_when_port_80_is_closed_to_the_ca() {
    require_pebble();
    let dir = TempStateDir::new("acme-alpn");
    let port = free_port();
    let https_port = free_port();
    // pebble's HTTP-01 port points where nothing listens.
    let closed = free_port();
    let pebble = Pebble::start(port, closed, https_port, None).await;
    let mut cfg = acme_config(dir.path(), &pebble.directory, &pebble.ca_pem);
    cfg.https_addr = format!("127.0.0.1:{https_port}").parse().unwrap();
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    deploy_acme(&proxy, "alpn", "alpn.test", backend.addr).await;
    issued(&proxy, "alpn.test").await;
    assert_eq!(
        meta(&dir.path(), "alpn", "alpn.test")["challenge"],
        "tls-alpn-01"
    );
    // The HTTP-01 order failed, the TLS-ALPN-01 order right after it worked.
    let text = proxy.metrics.render();
    assert!(
        text.contains("luma_proxy_acme_orders_total{result=\"failed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("luma_proxy_acme_orders_total{result=\"issued\"} 1"),
        "{text}"
    );
    let root = pebble.issuing_root().await;
    let r = https_get(proxy.https_addr, "alpn.test", "/", &root, true)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_in_the_background() {
    require_pebble();
    let dir = TempStateDir::new("acme-renew");
    let port = free_port();
    let (http_port, https_port) = (free_port(), free_port());
    let pebble = Pebble::start(port, http_port, https_port, Some(15)).await;
    let mut cfg = acme_config(dir.path(), &pebble.directory, &pebble.ca_pem);
    cfg.http_addr = format!("127.0.0.1:{http_port}").parse().unwrap();
    cfg.https_addr = format!("127.0.0.1:{https_port}").parse().unwrap();
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    deploy_acme(&proxy, "short", "short.test", backend.addr).await;
    let first = issued(&proxy, "short.test").await;
    let root = pebble.issuing_root().await;
    let sha1 = https_get(proxy.https_addr, "short.test", "/", &root, false)
        .await
        .unwrap()
        .peer_sha256;
    // One third of 15 s before expiry, a new certificate replaces it.
    let sha2 = eventually("a renewed certificate", 90, || async {
        let r = https_get(proxy.https_addr, "short.test", "/", &root, false)
            .await
            .ok()?;
        (r.peer_sha256 != sha1 && r.status == 200).then_some(r.peer_sha256)
    })
    .await;
    assert_ne!(sha1, sha2);
    let now = status(&proxy, "short.test");
    assert!(now.not_after > first.not_after, "{now:?} after {first:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_the_ca_forgot_is_replaced_and_the_next_order_succeeds() {
    require_pebble();
    let dir = TempStateDir::new("acme-account");
    let (port, http_port, https_port) = (free_port(), free_port(), free_port());
    let mut pebble = Pebble::start(port, http_port, https_port, None).await;
    let mut cfg = acme_config(dir.path(), &pebble.directory, &pebble.ca_pem);
    cfg.http_addr = format!("127.0.0.1:{http_port}").parse().unwrap();
    cfg.https_addr = format!("127.0.0.1:{https_port}").parse().unwrap();
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    deploy_acme(&proxy, "one", "one.test", backend.addr).await;
    issued(&proxy, "one.test").await;
    let account = |d: &Path| {
        std::fs::read_dir(d.join("tls/accounts"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect::<Vec<_>>()
    };
    let before = account(&dir.path());
    assert_eq!(before.len(), 1);

    // The CA forgets every account; the proxy's cached one now gets accountDoesNotExist.
    pebble.restart_ca().await;
    deploy_acme(&proxy, "two", "two.test", backend.addr).await;
    let s = issued(&proxy, "two.test").await;
    assert!(s.last_error.is_none(), "{s:?}");
    let after = account(&dir.path());
    assert_eq!(after.len(), 1);
    assert_ne!(before, after, "a new account was created and stored");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_directory_is_replaced_at_once() {
    require_pebble();
    let dir = TempStateDir::new("acme-directory");
    // A valid certificate an earlier directory issued, stored as the proxy stores them.
    let earlier = TestCa::new("Earlier CA");
    let old = earlier.leaf(&["moved.test"]);
    let d = dir.path().join("tls/projects/shop/hosts/moved.test");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("chain.pem"), &old.chain_pem).unwrap();
    std::fs::write(d.join("key.pem"), &old.key_pem).unwrap();
    let m = serde_json::json!({"source": "acme", "directory": "https://earlier.test/dir", "sha256": old.sha256, "renew_at": 4_000_000_000u64});
    std::fs::write(d.join("meta.json"), m.to_string()).unwrap();

    let (port, http_port, https_port) = (free_port(), free_port(), free_port());
    let pebble = Pebble::start(port, http_port, https_port, None).await;
    let mut cfg = acme_config(dir.path(), &pebble.directory, &pebble.ca_pem);
    cfg.http_addr = format!("127.0.0.1:{http_port}").parse().unwrap();
    cfg.https_addr = format!("127.0.0.1:{https_port}").parse().unwrap();
    let proxy = luma_proxy::Proxy::start(cfg).await.unwrap();
    let backend = TestBackend::start("127.0.0.1", "app").await;
    deploy_acme(&proxy, "shop", "moved.test", backend.addr).await;
    let s = eventually(
        "a certificate from the configured directory",
        90,
        || async {
            let s = status(&proxy, "moved.test");
            (s.state == CertState::Issued && s.issuer.as_deref() != Some("Earlier CA")).then_some(s)
        },
    )
    .await;
    assert!(s.issuer.is_some(), "{s:?}");
    let m = meta(&dir.path(), "shop", "moved.test");
    assert_eq!(m["directory"], pebble.directory.as_str());
    assert_ne!(m["sha256"], old.sha256.as_str());
    proxy.shutdown().await;
}

/// How many ACME accounts pebble holds now (it logs the count on every new account).
fn pebble_accounts(pebble: &Pebble) -> usize {
    let log = std::fs::read_to_string(pebble.dir.join("pebble.log")).unwrap();
    log.lines()
        .filter_map(|l| l.split("There are now ").nth(1))
        .filter_map(|rest| rest.strip_suffix(" accounts in memory"))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// A deploy of an ACME route that carries the project's shared account key.
fn shared_acme_req(
    project: &str,
    host: &str,
    backend: SocketAddr,
    key: Option<&str>,
) -> luma_api::DeployRequest {
    let mut r = route(project, host, &[backend]);
    r.tls = Some(RouteTls {
        certificate: CertificateSource::Acme,
        redirect: true,
        hsts: false,
    });
    let mut req = deploy_req(r);
    req.acme_account = key.map(|k| luma_api::AcmeAccountKey {
        pkcs8_pem: k.to_string(),
    });
    req
}

fn admin(proxy: &RunningProxy, dir: &Path) -> luma_proxy::client::AdminClient {
    luma_proxy::client::AdminClient {
        addr: proxy.admin_addr,
        token: std::fs::read_to_string(dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string(),
        timeout: Duration::from_secs(10),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_of_a_project_share_its_account_and_either_answers_its_challenges() {
    require_pebble();
    let (dir_a, dir_b) = (
        TempStateDir::new("acme-shared-a"),
        TempStateDir::new("acme-shared-b"),
    );
    // pebble validates HTTP-01 at proxy A's HTTP port only (both proxies are 127.0.0.1 in its
    // DNS); its TLS-ALPN-01 port is closed, so no order can pass any other way.
    let (port, a_http, closed) = (free_port(), free_port(), free_port());
    let pebble = Pebble::start(port, a_http, closed, None).await;
    let mut cfg_a = acme_config(dir_a.path(), &pebble.directory, &pebble.ca_pem);
    cfg_a.http_addr = format!("127.0.0.1:{a_http}").parse().unwrap();
    let cfg_b = acme_config(dir_b.path(), &pebble.directory, &pebble.ca_pem);
    let a = luma_proxy::Proxy::start(cfg_a).await.unwrap();
    let b = luma_proxy::Proxy::start(cfg_b.clone()).await.unwrap();
    assert_ne!(b.http_addr.port(), a_http);
    let backend = TestBackend::start("127.0.0.1", "app").await;
    // The project's key, as luma generates it: ECDSA P-256, PKCS#8 PEM.
    let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let thumb = jwk_thumbprint(&key);

    // A key that is not P-256 PKCS#8 is refused at the gate, naming the field, never the key.
    let bad = "-----BEGIN PRIVATE KEY-----\nSECRETBYTES\n-----END PRIVATE KEY-----\n";
    let e = b
        .deployer
        .deploy(shared_acme_req("bad", "bad.test", backend.addr, Some(bad)))
        .await
        .unwrap_err();
    assert_eq!(e.kind, luma_api::ErrorKind::Invalid, "{e:?}");
    assert!(e.error.contains("acme_account"), "{}", e.error);
    assert!(!e.error.contains("SECRETBYTES"), "{}", e.error);
    assert!(b.deployer.router.specs().is_empty(), "nothing changed");
    assert!(!dir_b.path().join("tls/projects/bad").exists());

    // Proxy A (the server the CA reaches) first, then B.
    a.deployer
        .deploy(shared_acme_req(
            "multi",
            "multi.test",
            backend.addr,
            Some(&key),
        ))
        .await
        .unwrap();
    issued(&a, "multi.test").await;
    b.deployer
        .deploy(shared_acme_req(
            "multi",
            "multi.test",
            backend.addr,
            Some(&key),
        ))
        .await
        .unwrap();
    // B's order was validated at A, which never saw B's token: answered statelessly. Unless
    // pebble passed B's order on A's authorization, still valid: pebble 2.4 does so 1 order in
    // 100 even at PEBBLE_AUTHZREUSE=0 (it reuses unless `rand.Intn(100) > percent`). Then B
    // answered no challenge and remembers none, pebble fetched one token, and only the direct
    // check of both proxies' answers below shows the stateless answer.
    let st = issued(&b, "multi.test").await;
    assert!(st.last_error.is_none(), "{st:?}");
    let validated = match meta(&dir_b.path(), "multi", "multi.test")["challenge"].as_str() {
        Some("http-01") => 2,
        None => 1,
        other => panic!("B remembers challenge {other:?}"),
    };
    let log = std::fs::read_to_string(pebble.dir.join("pebble.log")).unwrap();
    let at_a = format!("http://multi.test:{a_http}/.well-known/acme-challenge/");
    // (pebble validates each token from 3 perspectives, all at A's port.)
    let tokens: std::collections::HashSet<&str> = log
        .split(&at_a)
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert_eq!(
        tokens.len(),
        validated,
        "every validated order at A:\n{log}"
    );
    // Both serve a certificate pebble issued, each its own.
    let root = pebble.issuing_root().await;
    let on_a = https_get(a.https_addr, "multi.test", "/", &root, true)
        .await
        .unwrap();
    let on_b = https_get(b.https_addr, "multi.test", "/", &root, true)
        .await
        .unwrap();
    assert_eq!((on_a.status, on_b.status), (200, 200));
    assert_ne!(
        on_a.peer_sha256, on_b.peer_sha256,
        "each proxy orders its own"
    );
    // One account at pebble for both proxies: the project's; neither made one of its own.
    assert_eq!(pebble_accounts(&pebble), 1);
    assert!(!dir_a.path().join("tls/accounts").exists());
    assert!(!dir_b.path().join("tls/accounts").exists());

    // Any well-formed token, on either proxy, for the project's host: token.thumbprint.
    let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    let path = format!("/.well-known/acme-challenge/{token}");
    for p in [&a, &b] {
        let (code, body) = get(p.http_addr, "multi.test", &path).await;
        assert_eq!((code, body), (200, format!("{token}.{thumb}")));
    }
    // Not a token: routed as before (the app answers), never a key authorization.
    let (_, body) = get(a.http_addr, "multi.test", "/.well-known/acme-challenge/a.b").await;
    assert!(!body.contains(&thumb), "{body}");

    // A project without the key keeps the proxy-wide account: a second account at pebble,
    // stored by A; its host never answers with the shared thumbprint.
    a.deployer
        .deploy(shared_acme_req("solo", "solo.test", backend.addr, None))
        .await
        .unwrap();
    issued(&a, "solo.test").await;
    assert_eq!(pebble_accounts(&pebble), 2);
    assert_eq!(
        std::fs::read_dir(dir_a.path().join("tls/accounts"))
            .unwrap()
            .count(),
        1
    );
    let (_, body) = get(a.http_addr, "solo.test", &path).await;
    assert!(!body.contains(&thumb), "{body}");
    let (code, _) = get(a.http_addr, "nobody.test", &path).await;
    assert_eq!(code, 404, "an unknown host");

    // The key is held per project, 0600, and handed out only to the admin API's callers.
    use std::os::unix::fs::MetadataExt;
    for d in [dir_a.path(), dir_b.path()] {
        let f = d.join("tls/projects/multi/acme-account.pem");
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
    }
    let held = admin(&a, &dir_a.path())
        .op(&luma_api::AcmeAccountRequest {
            project: "multi".into(),
        })
        .await
        .unwrap();
    assert_eq!(jwk_thumbprint(&held.key.unwrap().pkcs8_pem), thumb);
    let none = admin(&a, &dir_a.path())
        .op(&luma_api::AcmeAccountRequest {
            project: "solo".into(),
        })
        .await
        .unwrap();
    assert_eq!(none.key, None);
    // The same through `luma-proxy call`, as luma asks over `docker exec`.
    let (admin_addr, state) = (a.admin_addr.to_string(), dir_a.path());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_luma-proxy"))
            .args(["call", "--admin", &admin_addr, "--state-dir"])
            .arg(&state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(br#"{"acme_account":{"project":"multi"}}"#)
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let env: luma_api::Envelope<luma_api::AcmeAccountReply> =
        serde_json::from_slice(&out.stdout).unwrap();
    let reply: Result<_, _> = env.into();
    assert_eq!(
        jwk_thumbprint(&reply.unwrap().key.unwrap().pkcs8_pem),
        thumb
    );

    // A route already live without a key gets its project's from an identical repeat that
    // carries it (a project moving from one server to more), and answers with that key's
    // thumbprint, not another project's.
    let late = shared_acme_req("late", "late.test", backend.addr, None);
    a.deployer.deploy(late.clone()).await.unwrap();
    let (_, body) = get(a.http_addr, "late.test", &path).await;
    assert!(!body.contains(&thumb), "{body}");
    let late_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let mut with_key = late;
    with_key.acme_account = Some(luma_api::AcmeAccountKey {
        pkcs8_pem: late_key.clone(),
    });
    assert!(a.deployer.deploy(with_key).await.unwrap().already_live);
    let (code, body) = get(a.http_addr, "late.test", &path).await;
    assert_eq!(
        (code, body),
        (200, format!("{token}.{}", jwk_thumbprint(&late_key)))
    );
    let (_, body) = get(a.http_addr, "multi.test", &path).await;
    assert_eq!(body, format!("{token}.{thumb}"), "each project its own");

    // A restart of B keeps the key: its certificate is served and tokens answered at once.
    b.shutdown().await;
    let b = luma_proxy::Proxy::start(cfg_b).await.unwrap();
    let (code, body) = get(b.http_addr, "multi.test", &path).await;
    assert_eq!((code, body), (200, format!("{token}.{thumb}")));
    let again = https_get(b.https_addr, "multi.test", "/", &root, false)
        .await
        .unwrap();
    assert_eq!(again.peer_sha256, on_b.peer_sha256);
    b.shutdown().await;
    a.shutdown().await;
}
