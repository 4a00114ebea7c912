//! Admin operations outlive their caller, repeat safely, and never switch what they cannot
//! save: the three promises the CLI's recovery (ask the proxy, then settle or undo) rests on.

mod common;

use common::*;
use luma_api::route::RouteKey;
use luma_api::ErrorKind;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Polls a condition (not a fixed sleep) until it holds or 10 s pass.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn key() -> RouteKey {
    RouteKey {
        project: "shop".into(),
        app: "web".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_whose_client_disconnects_mid_drain_still_finishes() {
    let guard = TempStateDir::new("hangup");
    let dir = guard.path();
    let proxy = luma_proxy::Proxy::start(config(dir.clone())).await.unwrap();
    let old = TestBackend::start("127.0.0.2", "old").await;
    let new = TestBackend::start("127.0.0.3", "new").await;
    deploy_route(&proxy, "shop", "shop.test", &[old.addr]).await;
    let old_svc = proxy.deployer.router.get(&key()).unwrap();

    // A slow request on the old release holds the drain open.
    let addr = proxy.http_addr;
    let slow = tokio::spawn(async move { get(addr, "shop.test", "/slow?ms=1500").await });
    until("the slow request in flight", || old_svc.inflight() == 1).await;

    // The deploy is sent by hand, and the client hangs up as soon as the route has switched.
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let body = serde_json::to_string(&deploy_req(route("shop", "shop.test", &[new.addr]))).unwrap();
    let mut conn = tokio::net::TcpStream::connect(proxy.admin_addr)
        .await
        .unwrap();
    conn.write_all(
        format!(
            "POST /v1/deploy HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            token.trim(),
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let new_target = new.addr.to_string();
    until("the switch", || {
        proxy
            .deployer
            .router
            .get(&key())
            .is_some_and(|s| s.spec.target == new_target)
    })
    .await;
    // A reset, not a polite close: the connection is gone at once, as with a killed client.
    socket2::SockRef::from(&conn)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(conn);

    // The drain still runs to its end: the slow request completes on the old release, and the
    // old release is then retired (its backends closed), as a finished deploy does.
    assert_eq!(slow.await.unwrap(), (200, "old 0".into()));
    until("the old release retired", || {
        old_svc.balancer.backends().iter().all(|b| b.is_retired())
    })
    .await;
    let saved = std::fs::read_to_string(dir.join("routes.json")).unwrap();
    assert!(saved.contains(&new_target), "{saved}");
    assert_eq!(get(addr, "shop.test", "/").await, (200, "new 0".into()));

    // The caller retries the identical call: nothing switches, and it says so.
    let again = proxy
        .deployer
        .deploy(deploy_req(route("shop", "shop.test", &[new.addr])))
        .await
        .unwrap();
    assert!(again.already_live && again.drain.is_none(), "{again:?}");
    let live = proxy
        .deployer
        .settled(luma_api::RouteQuery {
            project: "shop".into(),
            app: "web".into(),
        })
        .await
        .unwrap();
    assert_eq!(live.route.unwrap().route.target, new_target);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_cannot_be_saved_is_not_switched() {
    let guard = TempStateDir::new("unsaved");
    let dir = guard.path();
    let proxy = luma_proxy::Proxy::start(config(dir.clone())).await.unwrap();
    let old = TestBackend::start("127.0.0.2", "old").await;
    let new = TestBackend::start("127.0.0.3", "new").await;
    deploy_route(&proxy, "shop", "shop.test", &[old.addr]).await;
    let saved_before = std::fs::read_to_string(dir.join("routes.json")).unwrap();
    // The save's temp path is taken by a directory: creating the file fails, as on a full or
    // read-only disk (root ignores permission bits, so they cannot stand in for this).
    let tmp = dir.join(".routes.json.tmp");
    std::fs::create_dir_all(tmp.join("x")).unwrap();
    let err = proxy
        .deployer
        .deploy(deploy_req(route("shop", "shop.test", &[new.addr])))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotSaved, "{err}");
    assert!(err.error.contains("the route was not changed"), "{err}");
    assert_eq!(
        get(proxy.http_addr, "shop.test", "/").await,
        (200, "old 0".into())
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("routes.json")).unwrap(),
        saved_before
    );
    // A remove that cannot be saved keeps the route too.
    let err = proxy
        .deployer
        .remove(luma_api::RemoveRequest {
            project: "shop".into(),
            app: "web".into(),
            drain_timeout_ms: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotSaved);
    assert_eq!(
        get(proxy.http_addr, "shop.test", "/").await,
        (200, "old 0".into())
    );
    std::fs::remove_dir_all(&tmp).unwrap();
    deploy_route(&proxy, "shop", "shop.test", &[new.addr]).await;
    assert_eq!(
        get(proxy.http_addr, "shop.test", "/").await,
        (200, "new 0".into())
    );
    proxy.shutdown().await;
}

/// A state file written before cross-project wildcard overlaps were refused may hold one (it
/// was a valid table then). A restart restores both routes as saved: the exact host still
/// reaches its own project (it is not handed to the other project's wildcard), and the next
/// save, of an unrelated route, keeps both. New deploys still get the strict check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_cross_project_wildcard_overlap_survives_a_restart() {
    let guard = TempStateDir::new("overlap-restore");
    let dir = guard.path();
    let exact = TestBackend::start("127.0.0.2", "exact").await;
    let wild = TestBackend::start("127.0.0.3", "wild").await;
    let other = TestBackend::start("127.0.0.4", "other").await;
    // In the order a save writes them (by project): the wildcard's project comes first, so
    // the exact host is the one a strict restore would refuse.
    let mut market = route("market", "*.wild.test", &[wild.addr]);
    market.hosts.push("market.test".into());
    let shop = route("shop", "shop.wild.test", &[exact.addr]);
    let file = serde_json::json!({"version": 1, "routes": [market, shop]});
    std::fs::write(dir.join("routes.json"), file.to_string()).unwrap();

    let proxy = luma_proxy::Proxy::start(config(dir.clone())).await.unwrap();
    let key = |p: &str| RouteKey {
        project: p.into(),
        app: "web".into(),
    };
    assert!(proxy.deployer.router.get(&key("market")).is_some());
    assert!(proxy.deployer.router.get(&key("shop")).is_some());
    // Restored backends serve once their first check passes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let shop_answer = get(proxy.http_addr, "shop.wild.test", "/").await;
        let wild_answer = get(proxy.http_addr, "cart.wild.test", "/").await;
        if shop_answer == (200, "exact 0".into()) && wild_answer == (200, "wild 0".into()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after restore: shop.wild.test -> {shop_answer:?}, cart.wild.test -> {wild_answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Deploys get the strict check: no new overlap.
    let mut api = route("shop", "api.wild.test", &[exact.addr]);
    api.app = "api".into();
    let err = proxy.deployer.deploy(deploy_req(api)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
    assert!(err.error.contains("inside the wildcard"), "{err}");
    // A redeploy that keeps the host it already serves is not a new overlap.
    let redeploy = proxy
        .deployer
        .deploy(deploy_req(route("shop", "shop.wild.test", &[other.addr])))
        .await
        .unwrap();
    assert!(!redeploy.already_live);
    assert_eq!(redeploy.route.target, other.addr.to_string());

    // The next save (an unrelated route) keeps both overlapping routes.
    deploy_route(&proxy, "other", "other.test", &[other.addr]).await;
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("routes.json")).unwrap()).unwrap();
    let hosts: Vec<(String, String)> = saved["routes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            let project = r["project"].as_str().unwrap().to_string();
            r["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |h| (project.clone(), h.as_str().unwrap().to_string()))
        })
        .collect();
    for (p, h) in [
        ("market", "*.wild.test"),
        ("market", "market.test"),
        ("shop", "shop.wild.test"),
        ("other", "other.test"),
    ] {
        assert!(
            hosts.contains(&(p.to_string(), h.to_string())),
            "{p} {h} missing from the saved table: {saved}"
        );
    }
    proxy.shutdown().await;
}
