//! Deploy gate and replicas on the real Docker engine: an unhealthy replica blocks the switch
//! and leaves the old release serving; healthy replicas share the load.

use luma_integration_tests::*;

#[test]
fn a_deploy_to_an_unhealthy_release_changes_nothing_and_replicas_share_load() {
    let lab = Lab::new("gate");
    let shop = lab.name("shop");
    let net = lab.network(&format!("{shop}-network"));
    lab.demo(&lab.name("web-1"), &net, "web-v1", "shop");
    let proxy = lab.proxy(&net);
    let addr = lab.published(&proxy, "8080/tcp");
    lab.proxy_cli(
        &proxy,
        &[
            "deploy",
            "--host",
            "shop.test",
            "--project",
            &shop,
            "--app",
            "web",
            "--target",
            "web-v1:3000",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // v2: three replicas behind one alias, one of them unhealthy.
    for i in 1..=3 {
        let env = if i == 2 {
            "DEMO_UNHEALTHY=1"
        } else {
            "DEMO_UNHEALTHY=0"
        };
        lab.demo_with(
            &lab.name(&format!("v2-{i}")),
            &net,
            "web-v2",
            "shop",
            &[env],
        );
    }
    let err = lab
        .proxy_cli(
            &proxy,
            &[
                "deploy",
                "--host",
                "shop.test",
                "--project",
                &shop,
                "--app",
                "web",
                "--target",
                "web-v2:3000",
                "--deploy-timeout",
                "2s",
            ],
        )
        .unwrap_err();
    assert!(err.contains("1 of 3 backends"), "{err}");
    assert!(
        err.contains("503"),
        "the reason per backend is missing: {err}"
    );
    let mut http = Http::new(&addr);
    let (s, body) = http.get("shop.test", "/").unwrap();
    assert_eq!(s, 200);
    let v1_host: serde_json::Value = serde_json::from_str(&body).unwrap();

    // Heal it through the proxy's own network path and deploy again: each replica gets a share.
    docker(&["rm", "-f", "-v", &lab.name("v2-2")]).unwrap();
    lab.demo(&lab.name("v2-2b"), &net, "web-v2", "shop");
    lab.proxy_cli(
        &proxy,
        &[
            "deploy",
            "--host",
            "shop.test",
            "--project",
            &shop,
            "--app",
            "web",
            "--target",
            "web-v2:3000",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut per_host = std::collections::BTreeMap::new();
    for _ in 0..600 {
        let (s, body) = http.get("shop.test", "/").unwrap();
        assert_eq!(s, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_ne!(
            v["hostname"], v1_host["hostname"],
            "old release still served after the switch"
        );
        *per_host
            .entry(v["hostname"].as_str().unwrap().to_string())
            .or_insert(0usize) += 1;
    }
    assert_eq!(per_host.len(), 3, "{per_host:?}");
    for (h, n) in &per_host {
        assert!(*n >= 120, "replica {h} got an unfair share: {per_host:?}");
    }
}
