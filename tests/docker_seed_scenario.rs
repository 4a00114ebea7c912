//! The seed scenario on the real Docker engine: two projects, both with an app aliased `web`
//! on port 3000, behind one luma-proxy container attached to both networks.

use luma_integration_tests::*;
use std::time::{Duration, Instant};

fn project_of(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["project"].as_str().map(str::to_string)
}

/// Sends `n` requests for `host` and returns how many came from each project.
fn tally(http: &mut Http, host: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let key = match http.get(host, "/") {
            Ok((200, body)) => project_of(&body).unwrap_or_else(|| format!("unparsable: {body}")),
            Ok((status, body)) => format!("status {status}: {}", body.trim()),
            Err(e) => format!("error: {e}"),
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

fn routes(lab: &Lab, proxy: &str) -> serde_json::Value {
    let out = lab
        .proxy_cli(proxy, &["list", "--json"])
        .expect("luma-proxy list");
    serde_json::from_str(&out).expect("list --json is JSON")
}

/// (healthy, total) backends of a project's route as the proxy sees them.
fn health_of(lab: &Lab, proxy: &str, project: &str) -> (usize, usize) {
    let v = routes(lab, proxy);
    let r = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"]["project"] == project)
        .unwrap_or_else(|| panic!("no route for {project}: {v}"));
    let b = r["backends"].as_array().unwrap();
    (b.iter().filter(|b| b["healthy"] == true).count(), b.len())
}

#[test]
fn two_projects_with_the_same_app_name_never_see_each_other() {
    let lab = Lab::new("seed");
    let alpha = lab.name("alpha");
    let beta = lab.name("beta");
    let aaa = lab.name("aaa"); // sorts before alpha: Docker's bare-name answer would come from here
    let alpha_net = lab.network(&format!("{alpha}-network"));
    let beta_net = lab.network(&format!("{beta}-network"));

    lab.demo(&lab.name("alpha-web"), &alpha_net, "web", "alpha");
    lab.demo(&lab.name("beta-web"), &beta_net, "web", "beta");
    let proxy = lab.proxy(&alpha_net);
    docker(&["network", "connect", &beta_net, &proxy]).unwrap();
    let addr = lab.published(&proxy, "8080/tcp");

    let out = lab
        .proxy_cli(
            &proxy,
            &[
                "deploy",
                "--host",
                "alpha.test",
                "--project",
                &alpha,
                "--target",
                "web:3000",
            ],
        )
        .unwrap_or_else(|e| panic!("deploy alpha: {e}"));
    assert!(out.contains("1 backends healthy"), "{out}");
    lab.proxy_cli(
        &proxy,
        &[
            "deploy",
            "--host",
            "beta.test",
            "--project",
            &beta,
            "--target",
            "web:3000",
        ],
    )
    .unwrap_or_else(|e| panic!("deploy beta: {e}"));

    let mut http = Http::new(&addr);
    let only = |project: &str, n: usize| {
        [(project.to_string(), n)]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(tally(&mut http, "alpha.test", 1000), only("alpha", 1000));
    assert_eq!(tally(&mut http, "beta.test", 1000), only("beta", 1000));
    assert_eq!(http.get("gamma.test", "/").unwrap().0, 404);

    // Health checks stay in their own project: stop beta's web, alpha stays fully healthy.
    docker(&["stop", "-t", "1", &lab.name("beta-web")]).unwrap();
    let t = Instant::now();
    wait_for(Duration::from_secs(10), || {
        (http.get("beta.test", "/").ok()?.0 == 503).then_some(())
    })
    .expect("beta never answered 503 after its only backend stopped");
    eprintln!(
        "beta answered 503 {:?} after its container stopped",
        t.elapsed()
    );
    let t = Instant::now();
    let slow_503 = (0..20)
        .filter(|_| http.get("beta.test", "/").map(|r| r.0) != Ok(503))
        .count();
    assert_eq!(slow_503, 0);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "503s were slow: {:?}",
        t.elapsed()
    );
    assert_eq!(tally(&mut http, "alpha.test", 200), only("alpha", 200));
    assert_eq!(
        health_of(&lab, &proxy, &alpha),
        (1, 1),
        "alpha lost health because beta stopped"
    );

    // A third network whose name sorts first, with its own `web`. Nothing may change.
    let aaa_net = lab.network(&format!("{aaa}-network"));
    lab.demo(&lab.name("aaa-web"), &aaa_net, "web", "aaa");
    docker(&["network", "connect", &aaa_net, &proxy]).unwrap();
    // Docker may move an ephemeral published port when the container's networks change.
    let mut http = Http::new(&lab.published(&proxy, "8080/tcp"));
    docker(&["start", &lab.name("beta-web")]).unwrap();
    let back = wait_for(Duration::from_secs(10), || {
        (http.get("beta.test", "/").ok()?.0 == 200).then_some(())
    });
    if back.is_none() {
        panic!(
            "beta did not come back after its container restarted: last answer {:?}; proxy sees {}; logs:\n{}",
            http.get("beta.test", "/"),
            routes(&lab, &proxy),
            docker(&["logs", "--tail", "30", &proxy]).unwrap_or_default()
        );
    }
    assert_eq!(tally(&mut http, "alpha.test", 1000), only("alpha", 1000));
    assert_eq!(tally(&mut http, "beta.test", 1000), only("beta", 1000));
    assert_eq!(health_of(&lab, &proxy, &alpha), (1, 1));
    assert_eq!(health_of(&lab, &proxy, &beta), (1, 1));

    // Routes survive a restart of the proxy container and serve again quickly.
    docker(&["restart", "-t", "5", &proxy]).unwrap();
    let t = Instant::now();
    let addr = lab.published(&proxy, "8080/tcp");
    let mut http = Http::new(&addr);
    wait_for(Duration::from_secs(5), || {
        let a = http.get("alpha.test", "/").ok()?;
        let b = http.get("beta.test", "/").ok()?;
        (a.0 == 200 && b.0 == 200).then_some(())
    })
    .expect("routes did not come back within 5 s of a proxy restart");
    eprintln!(
        "after docker restart, both routes served within {:?}",
        t.elapsed()
    );
    assert_eq!(tally(&mut http, "alpha.test", 200), only("alpha", 200));
    assert_eq!(tally(&mut http, "beta.test", 200), only("beta", 200));
}
