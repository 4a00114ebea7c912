//! Metrics against the real engine: a container on the metrics network scrapes the proxy over
//! HTTP (no `docker exec`, no token), the port is published nowhere on the host, the proxy's
//! address on a project network refuses the metrics port, and label values are escaped in the
//! real output.

use luma_integration_tests::*;
use std::time::Duration;

/// The label value the proxy is started with: a quote, a backslash and a line feed.
const NASTY: &str = "eu \"1\" c:\\x\nnext";
/// How it must appear in the exposition.
const NASTY_ESCAPED: &str = "eu \\\"1\\\" c:\\\\x\\nnext";

fn ip_on(container: &str, network: &str) -> String {
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    let ip = docker(&["inspect", "--format", &fmt, container]).unwrap();
    assert!(!ip.is_empty(), "{container} has no address on {network}");
    ip
}

/// Runs the proxy image as a plain HTTP client in `network` (a stand-in for Prometheus, or for
/// a project's container): `luma-proxy metrics --admin ADDR` sends `GET /metrics`. The token
/// it sends is any readable file (the metrics listener asks for none). Returns (exit code,
/// stdout, stderr).
fn scrape_from(lab: &Lab, n: &mut u32, network: &str, addr: &str) -> (i64, String, String) {
    *n += 1;
    let name = lab.name(&format!("scraper-{n}"));
    lab.run(
        &name,
        &[
            "--network",
            network,
            &proxy_image(),
            "metrics",
            "--admin",
            addr,
            "--token-file",
            "/etc/hostname",
        ],
    );
    let code = docker(&["wait", &name]).unwrap();
    let out = docker(&["logs", &name]).unwrap_or_default();
    let err = std::process::Command::new("docker")
        .args(["logs", &name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    (code.trim().parse().unwrap_or(-1), out, err)
}

#[test]
fn prometheus_on_the_metrics_network_scrapes_without_exec_and_nothing_else_can() {
    let lab = Lab::new("metrics");
    // A real project: `<project>-network`, an app `web` behind a host.
    let project = lab.prefix.clone();
    let project_net = lab.network(&format!("{project}-network"));
    let metrics_net = lab.network(&lab.name("metrics"));
    lab.demo(&lab.name("web"), &project_net, "web", &project);

    let image = proxy_image();
    let metrics_env = format!("LUMA_PROXY_METRICS={metrics_net}:9100");
    let label = format!("server={NASTY}");
    let proxy = lab.run(
        &lab.name("proxy"),
        &[
            "--network",
            &project_net,
            "-e",
            &metrics_env,
            "-p",
            "127.0.0.1::8080",
            &image,
            "serve",
            "--no-access-log",
            "--metrics-label",
            &label,
        ],
    );
    wait_for(Duration::from_secs(10), || {
        lab.proxy_cli(&proxy, &["status"]).ok()
    })
    .expect("the proxy's admin API never came up");
    let host = format!("{project}.test");
    lab.proxy_cli(
        &proxy,
        &[
            "deploy",
            "--host",
            &host,
            "--project",
            &project,
            "--target",
            "web:3000",
        ],
    )
    .unwrap_or_else(|e| panic!("deploy: {e}"));
    let mut http = Http::new(&lab.published(&proxy, "8080"));
    assert_eq!(http.get(&host, "/").unwrap().0, 200);

    // The user attaches the proxy to the metrics network whenever they like; the listener
    // binds there once it sees the new interface.
    docker(&["network", "connect", &metrics_net, &proxy]).unwrap();
    let metrics_addr = format!("{}:9100", ip_on(&proxy, &metrics_net));
    let mut n = 0;
    let mut last = (0, String::new(), String::new());
    let body = wait_for(Duration::from_secs(30), || {
        last = scrape_from(&lab, &mut n, &metrics_net, &metrics_addr);
        (last.0 == 0).then(|| last.1.clone())
    })
    .unwrap_or_else(|| panic!("no scrape from the metrics network within 30 s: {last:?}"));

    // The real output: escaped constant label, global and per-backend series, OpenMetrics end.
    let escaped = format!("server=\"{NASTY_ESCAPED}\"");
    assert!(
        body.contains(&format!(
            "luma_proxy_responses_total{{{escaped},class=\"2xx\"}} 1"
        )),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "luma_proxy_backend_healthy{{{escaped},project=\"{project}\",app=\"web\",backend=\""
        )),
        "{body}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    for line in body.lines() {
        assert!(
            line.starts_with('#') || line.starts_with("luma_proxy_"),
            "a line that is neither a comment nor a sample: {line:?}\n{body}"
        );
    }

    // Published nowhere on the host: only 8080 is.
    let ports = docker(&["port", &proxy]).unwrap();
    assert!(!ports.contains("9100"), "{ports}");
    assert!(ports.contains("8080"), "{ports}");

    // A container on the project network cannot read the metrics at the proxy's address there:
    // the listener is bound to the metrics-network interface only, so a proxy that bound all
    // interfaces (0.0.0.0:9100) would fail this. (The proxy's metrics-network address is not
    // tried from the project network: Docker drops traffic between bridge networks whatever
    // the proxy binds, so that check could not fail.)
    let project_side = format!("{}:9100", ip_on(&proxy, &project_net));
    let (code, out, err) = scrape_from(&lab, &mut n, &project_net, &project_side);
    assert_ne!(code, 0, "scraped from the project network: {out}");
    assert!(!out.contains("luma_proxy_"), "{out}");
    // Refused by the proxy's host (nothing listens there), not lost on the way.
    assert!(err.contains("refused"), "{err}");
    eprintln!("project network -> {project_side}: {}", err.trim());
}
