//! Re-resolving on events on the real engine: a proxy whose background round is far beyond the
//! test (`--refresh-every 600s`) still follows its replicas, because a flush adds one started by
//! hand and a killed one is dropped once it fails; a deploy asks Docker's DNS twice (the proxy's
//! own name and the alias, at the gate) and at idle it asks nothing.

use luma_integration_tests::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The proxy image on `network` with a background round no test waits for.
fn slow_refresh_proxy(lab: &Lab, network: &str) -> String {
    let proxy = lab.run(
        &lab.name("proxy"),
        &[
            "--network",
            network,
            "-p",
            "127.0.0.1::8080",
            &proxy_image(),
            "serve",
            "--no-access-log",
            "--metrics",
            "off",
            "--refresh-every",
            "600s",
        ],
    );
    wait_for(Duration::from_secs(10), || {
        lab.proxy_cli(&proxy, &["status"]).ok()
    })
    .expect("the proxy's admin API never came up");
    proxy
}

/// The route's backend addresses as the proxy sees them.
fn backends(lab: &Lab, proxy: &str) -> Vec<String> {
    let out = lab
        .proxy_cli(proxy, &["list", "--json"])
        .expect("luma-proxy list");
    let v: serde_json::Value = serde_json::from_str(&out).expect("list --json is JSON");
    v["routes"][0]["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|b| b["addr"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `luma_proxy_dns_queries_total` from the admin API's metrics.
fn dns_queries(lab: &Lab, proxy: &str) -> u64 {
    let out = lab
        .proxy_cli(proxy, &["metrics"])
        .expect("luma-proxy metrics");
    out.lines()
        .find_map(|l| {
            l.strip_prefix("luma_proxy_dns_queries_total ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no luma_proxy_dns_queries_total in\n{out}"))
}

fn hostname(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["hostname"].as_str().unwrap_or("?").to_string()
}

/// Replicas (container hostnames) that answer `n` requests.
fn serving(http: &mut Http, host: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| match http.get(host, "/") {
            Ok((200, body)) => hostname(&body),
            other => panic!("{host}: {other:?}"),
        })
        .collect()
}

#[test]
fn replicas_follow_flushes_and_failures_without_a_background_round() {
    let lab = Lab::new("refresh");
    let project = lab.prefix.clone();
    let net = lab.network(&format!("{project}-network"));
    lab.demo(&lab.name("web-1"), &net, "web", &project);
    let proxy = slow_refresh_proxy(&lab, &net);
    let before_deploy = dns_queries(&lab, &proxy);
    lab.proxy_cli(
        &proxy,
        &[
            "deploy",
            "--host",
            "web.test",
            "--project",
            &project,
            "--target",
            "web:3000",
        ],
    )
    .unwrap_or_else(|e| panic!("deploy: {e}"));
    let mut http = Http::new(&lab.published(&proxy, "8080/tcp"));
    let first = serving(&mut http, "web.test", 20);
    assert_eq!(first.len(), 1, "{first:?}");

    // Idle: health checks run, DNS is not asked (it was twice a second per route before).
    wait_for(Duration::from_secs(10), || {
        (backends(&lab, &proxy).len() == 1).then_some(())
    })
    .expect("the route has no backend");
    let before = dns_queries(&lab, &proxy);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let idle = dns_queries(&lab, &proxy) - before;
    eprintln!(
        "idle, 1 route, --refresh-every 600s: {idle} DNS queries in {:?}",
        t.elapsed()
    );
    assert_eq!(idle, 0, "the proxy asked Docker's DNS at idle");
    // The deploy's own cost, now that any re-resolve it set off is long over: the gate learns
    // the proxy's interface and resolves the alias; the route it installs is not re-resolved
    // (it was 4 when the deploy's flush kicked it and forgot the interface).
    let deploy = before - before_deploy;
    eprintln!("deploy: {deploy} DNS queries");
    assert_eq!(deploy, 2, "a deploy's DNS queries");

    // A replica started by hand joins at the flush, not before (no background round comes).
    lab.demo(&lab.name("web-2"), &net, "web", &project);
    assert_eq!(
        serving(&mut http, "web.test", 40),
        first,
        "joined without a flush"
    );
    let before_flush = dns_queries(&lab, &proxy);
    let out = lab
        .proxy_cli(&proxy, &["flush", "--project", &project])
        .unwrap_or_else(|e| panic!("flush: {e}"));
    eprintln!("flush: {}", out.trim());
    let t = Instant::now();
    let both = wait_for(Duration::from_secs(10), || {
        let seen = serving(&mut http, "web.test", 20);
        (seen.len() == 2).then_some(seen)
    })
    .unwrap_or_else(|| {
        panic!(
            "the replica started by hand never served after the flush; the proxy sees {:?}",
            backends(&lab, &proxy)
        )
    });
    eprintln!(
        "both replicas served {:?} after the flush: {both:?}; {} DNS queries since (1 for the \
         route's re-resolve, the interface kept; a degraded retry may add one)",
        t.elapsed(),
        dns_queries(&lab, &proxy) - before_flush
    );

    // A replica killed under load: no request fails, and the set shrinks once it fails (its
    // connects or its checks), long before any background round.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let addr = lab.published(&proxy, "8080/tcp");
    let load = {
        let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
        std::thread::spawn(move || {
            let mut http = Http::new(&addr);
            while !stop.load(Ordering::Relaxed) {
                match http.get("web.test", "/") {
                    Ok((200, _)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => bad.lock().unwrap().push(format!("{other:?}")),
                }
            }
        })
    };
    docker(&["kill", &lab.name("web-1")]).unwrap();
    let t = Instant::now();
    let shrunk = wait_for(Duration::from_secs(20), || {
        (backends(&lab, &proxy).len() == 1).then_some(())
    });
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert!(
        shrunk.is_some(),
        "the killed replica stayed in the set: {:?}; proxy log:\n{}",
        backends(&lab, &proxy),
        docker(&["logs", "--tail", "40", &proxy]).unwrap_or_default()
    );
    eprintln!("the set dropped the killed replica {took:?} after the kill");
    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} requests failed after a replica was killed: {:?}",
        bad.len(),
        bad.first()
    );
    assert!(ok.load(Ordering::Relaxed) > 20);
    let left = serving(&mut http, "web.test", 20);
    assert_eq!(left.len(), 1, "{left:?}");
}
