//! luma-proxy at the edge, for real: the proxy started by `luma`, a real app (the demo backend's
//! `/_demo/headers` echoes the request headers it received), and the admin API reached the way
//! the CLI reaches it (`docker exec -i <proxy> luma-proxy call`).

use luma_integration_tests::*;
use std::io::{Read, Write};
use std::time::Duration;

fn app_yaml(host: &str) -> String {
    format!("apps:\n  web:\n    image: {}\n    health_check:\n      path: /up\n      interval: 200ms\n    proxy:\n      hosts: [{host}]\n      app_port: 3000\n", demo_image())
}

/// One request with extra header lines, `Connection: close`; returns (status, body).
fn raw_get(addr: &str, host: &str, path: &str, extra: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Values of a header among `name: value` lines, by name (any case).
fn values<'a>(lines: &'a str, name: &str) -> Vec<&'a str> {
    lines
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
        .collect()
}

/// The forwarded headers a client could send, the first two also spelled with underscores
/// (which CGI, WSGI and Rack apps read as the same `HTTP_X_REAL_IP`... keys).
const SPOOFED: &str = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=https\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX_Real_IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\n";

/// The underscore spellings of the forwarded headers never reach the app, in either mode.
fn assert_no_underscore_spoofs(seen: &str) {
    for name in ["x_real_ip", "x_forwarded_for"] {
        assert!(
            values(seen, name).is_empty(),
            "{name} reached the app: {seen}"
        );
    }
}

#[test]
fn forwarded_headers_as_the_app_sees_them_in_edge_and_trusted_mode() {
    let lab = CliLab::new("edge");
    let host = format!("xff.{}.test", lab.prefix);
    let (dir, _project) = lab.project("xff", &app_yaml(&host));
    lab.luma_ok(&dir, &["deploy"]);

    // Edge mode (the default): the app sees only what the proxy saw.
    let (status, seen) = raw_get(&lab.http_addr(), &host, "/_demo/headers", SPOOFED);
    assert_eq!(status, 200, "{seen}");
    let xff = values(&seen, "x-forwarded-for");
    assert_eq!(xff.len(), 1, "{seen}");
    let peer: std::net::IpAddr = xff[0]
        .parse()
        .unwrap_or_else(|_| panic!("X-Forwarded-For is not the peer address: {seen}"));
    assert_ne!(peer.to_string(), "6.6.6.6");
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"], "{seen}");
    assert_eq!(values(&seen, "x-forwarded-host"), [host.as_str()], "{seen}");
    assert!(values(&seen, "x-real-ip").is_empty(), "{seen}");
    assert!(values(&seen, "forwarded").is_empty(), "{seen}");
    assert_no_underscore_spoofs(&seen);

    // Trusted mode: the proxy is replaced with LUMA_TRUSTED_PROXIES naming the peer it saw.
    let bits = if peer.is_ipv4() { 32 } else { 128 };
    let trusted = format!("192.0.2.0/24,{peer}/{bits}");
    let (ok, out, err) = lab.luma_env(
        &dir,
        &["proxy", "update"],
        &[("LUMA_TRUSTED_PROXIES", trusted.as_str())],
    );
    assert!(ok, "luma proxy update failed:\n{out}\n{err}");
    let (status, seen) = raw_get(&lab.http_addr(), &host, "/_demo/headers", SPOOFED);
    assert_eq!(status, 200, "{seen}");
    assert_eq!(
        values(&seen, "x-forwarded-for"),
        [format!("6.6.6.6, {peer}").as_str()],
        "{seen}"
    );
    assert_eq!(values(&seen, "x-forwarded-proto"), ["https"], "{seen}");
    assert_eq!(values(&seen, "x-forwarded-host"), ["evil.test"], "{seen}");
    assert_eq!(values(&seen, "x-real-ip"), ["6.6.6.6"], "{seen}");
    assert_eq!(
        values(&seen, "forwarded"),
        ["for=6.6.6.6;proto=https"],
        "{seen}"
    );
    assert_no_underscore_spoofs(&seen);
    // Without spoofing, the trusted hop is the whole chain and the scheme is the proxy's.
    let (_, seen) = raw_get(&lab.http_addr(), &host, "/_demo/headers", "");
    assert_eq!(
        values(&seen, "x-forwarded-for"),
        [peer.to_string().as_str()],
        "{seen}"
    );
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"], "{seen}");

    // A run that asks for edge mode again is told how to get it.
    let (ok, out, err) = lab.luma(&dir, &["deploy"]);
    assert!(ok, "luma deploy failed:\n{out}\n{err}");
    assert!(
        format!("{out}{err}").contains("LUMA_TRUSTED_PROXIES"),
        "no drift warning:\n{out}\n{err}"
    );

    // A list the proxy would refuse at start is refused here, naming the setting and the fix,
    // and the running proxy is left as it was.
    let proxy_id = || docker(&["inspect", "--format", "{{.Id}}", &lab.proxy]).unwrap();
    let before = proxy_id();
    let (ok, _, err) = lab.luma_env(
        &dir,
        &["deploy"],
        &[("LUMA_TRUSTED_PROXIES", "192.0.2.0/24,10.0.0.1/8")],
    );
    assert!(!ok, "a bad LUMA_TRUSTED_PROXIES was accepted");
    assert!(
        err.contains("LUMA_TRUSTED_PROXIES") && err.contains("did you mean 10.0.0.0/8"),
        "{err}"
    );
    let (ok, _, err) = lab.luma_env(
        &dir,
        &["proxy", "update"],
        &[("LUMA_TRUSTED_PROXIES", "192.0.2.0/24,10.0.0.1/8")],
    );
    assert!(!ok, "luma proxy update took a bad LUMA_TRUSTED_PROXIES");
    assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");
    assert_eq!(proxy_id(), before);
    // Only a proxy luma makes uses the list: looking works whatever it says.
    let (ok, out, err) = lab.luma_env(
        &dir,
        &["status"],
        &[("LUMA_TRUSTED_PROXIES", "192.0.2.0/24,10.0.0.1/8")],
    );
    assert!(
        ok,
        "luma status failed on a bad LUMA_TRUSTED_PROXIES:\n{out}\n{err}"
    );
    assert!(out.contains("healthy"), "{out}");
}

/// `docker exec -i <proxy> luma-proxy call` with one request on stdin: the reply envelope.
fn call(proxy: &str, request: serde_json::Value) -> serde_json::Value {
    luma_integration_tests::proxy_call(None, proxy, &request)
}

/// The live routes without their health counters.
fn routes(proxy: &str) -> serde_json::Value {
    let mut v = call(proxy, serde_json::json!({"routes": {}}));
    for r in v["ok"]["routes"].as_array_mut().expect("routes") {
        r.as_object_mut().unwrap().remove("backends");
    }
    v
}

fn deploy(
    project: &str,
    app: &str,
    hosts: &[&str],
    target: &str,
    network: &str,
) -> serde_json::Value {
    serde_json::json!({"deploy": {
        "route": {"project": project, "app": app, "hosts": hosts, "target": target, "network": network},
        "deploy_timeout_ms": 10000,
    }})
}

#[test]
fn cross_project_routes_are_refused_by_the_real_proxy() {
    let lab = CliLab::new("edgex");
    let alpha_host = format!("www.alpha.{}.test", lab.prefix);
    let wild = format!("wild.{}.test", lab.prefix);
    let (adir, alpha) = lab.project("alpha", &app_yaml(&alpha_host));
    let (bdir, beta) = lab.project("beta", &app_yaml(&format!("beta.{}.test", lab.prefix)));
    lab.luma_ok(&adir, &["deploy"]);
    lab.luma_ok(&bdir, &["deploy"]);
    // Beta also owns a wildcard, through the admin API.
    let star = format!("*.{wild}");
    let v = call(&lab.proxy, deploy(&beta, "wild", &[&star], "web:3000", ""));
    assert!(v.get("ok").is_some(), "{v}");
    let before = routes(&lab.proxy);

    let inside = format!("shop.{wild}");
    let over = format!("*.alpha.{}.test", lab.prefix);
    let beta_net = format!("{beta}-network");
    let attempts = [
        (
            deploy(&alpha, "web", &[&alpha_host], "web:3000", &beta_net),
            "invalid",
            "network",
        ),
        (
            deploy(&alpha, "web", &[&alpha_host], "web:3000", "host"),
            "invalid",
            "system resolver",
        ),
        (
            deploy(&alpha, "shop", &[&inside], "web:3000", ""),
            "conflict",
            "inside the wildcard",
        ),
        (
            deploy(&beta, "wild", &[&over], "web:3000", ""),
            "conflict",
            "would cover host",
        ),
        (
            deploy(&alpha, "web", &[&alpha_host], "172.17.0.1:80", ""),
            "invalid",
            "--allow-literal-targets",
        ),
        (
            serde_json::json!({"check": {"project": alpha, "target": "web:3000", "network": beta_net}}),
            "invalid",
            "network",
        ),
    ];
    for (req, kind, text) in attempts {
        let v = call(&lab.proxy, req.clone());
        assert_eq!(v["err"]["kind"], kind, "{req} -> {v}");
        assert!(
            v["err"]["error"].as_str().unwrap_or("").contains(text),
            "{req} -> {v}"
        );
    }
    assert_eq!(
        routes(&lab.proxy),
        before,
        "a refused route changed the table"
    );
    let mut http = Http::new(&lab.http_addr());
    let (s, b) = http.get(&alpha_host, "/").unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(&format!("\"project\":\"{alpha}\"")), "{b}");
    let (s, b) = http.get(&inside, "/").unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(&format!("\"project\":\"{beta}\"")), "{b}");
}
