//! The `luma` CLI against the real Docker engine: the seed scenario, deploys under load,
//! failing releases, replicas, proxy restarts and updates, name collisions, concurrency, and
//! bad configs.

use luma_integration_tests::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn app_yaml(host: &str, extra: &str) -> String {
    format!("apps:\n  web:\n    image: {}\n{extra}    health_check:\n      path: /up\n      interval: 200ms\n    proxy:\n      hosts: [{host}]\n      app_port: 3000\n", demo_image())
}

fn body_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// Ids of a project's running app containers.
fn running_app_ids(project: &str) -> Vec<String> {
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=luma.project={project}"),
        "--filter",
        "label=luma.role=app",
    ])
    .unwrap();
    ids.lines().map(str::to_string).collect()
}

/// IPs of a project's running app containers on its network.
fn running_ips(project: &str) -> Vec<String> {
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{project}-network\").IPAddress}}}}");
    let mut ips: Vec<String> = running_app_ids(project)
        .iter()
        .map(|id| docker(&["inspect", "--format", &fmt, id]).unwrap())
        .collect();
    ips.sort();
    ips
}

#[test]
fn seed_scenario_two_projects_with_web_deploy_side_by_side() {
    let lab = CliLab::new("cli-seed");
    let gmail_host = format!("gmail.{}.test", lab.prefix);
    let next_host = format!("nextjs.{}.test", lab.prefix);
    // Both build `web` from a Dockerfile, like examples/basic and examples/nextjs.
    let build = |host: &str, replicas: u32| {
        format!("apps:\n  web:\n    build:\n      context: .\n    replicas: {replicas}\n    proxy:\n      hosts: [{host}]\n      app_port: 3000\n")
    };
    let (gdir, gmail) = lab.project("gmail", &build(&gmail_host, 1));
    let (ndir, nextjs) = lab.project("nextjs", &build(&next_host, 2));
    let t = Instant::now();
    let out = lab.luma_ok(&gdir, &["deploy"]);
    assert!(
        out.contains(&gmail_host),
        "deploy prints the live URL: {out}"
    );
    eprintln!("first deploy (build + proxy setup): {:?}", t.elapsed());
    lab.luma_ok(&ndir, &["deploy"]);

    let mut http = Http::new(&lab.http_addr());
    for _ in 0..200 {
        let (s, b) = http.get(&gmail_host, "/").unwrap();
        assert_eq!(
            (s, body_json(&b)["project"].as_str()),
            (200, Some(gmail.as_str()))
        );
        let (s, b) = http.get(&next_host, "/").unwrap();
        assert_eq!(
            (s, body_json(&b)["project"].as_str()),
            (200, Some(nextjs.as_str()))
        );
    }
    // Inside each project, `web` resolves to that project's containers only.
    for (project, n) in [(&gmail, 1), (&nextjs, 2)] {
        let out = docker(&[
            "exec",
            &lab.proxy,
            "luma-proxy",
            "check",
            "--json",
            "--project",
            project,
            "--target",
            "web:3000",
            "--timeout",
            "5s",
        ])
        .unwrap();
        let mut seen: Vec<String> = body_json(&out)["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                b["addr"]
                    .as_str()
                    .unwrap()
                    .trim_end_matches(":3000")
                    .to_string()
            })
            .collect();
        seen.sort();
        assert_eq!(seen.len(), n);
        assert_eq!(
            seen,
            running_ips(project),
            "`web` in {project} is not exactly its own containers"
        );
    }
    let status = lab.luma_ok(&ndir, &["status", "--json"]);
    let v = body_json(&status)["servers"][0].clone();
    assert_eq!(v["apps"][0]["replicas"].as_array().unwrap().len(), 2);
    assert!(
        v["apps"][0]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["proxy_health"] == "healthy"),
        "{status}"
    );
    let table = lab.luma_ok(&ndir, &["status"]);
    assert!(
        table.contains("PROXY HEALTH") && table.contains("healthy"),
        "{table}"
    );
}

/// Drives load until `stop`, counting failures (non-200 or socket errors).
fn load(
    addr: String,
    host: String,
    method: &'static str,
    close: bool,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    bad: Arc<Mutex<Vec<String>>>,
) {
    let mut http = Http::new(&addr);
    while !stop.load(Ordering::Relaxed) {
        match http.request(
            method,
            &host,
            "/",
            if method == "POST" { "order=1" } else { "" },
            close,
        ) {
            Ok((200, _)) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok((s, b)) => bad
                .lock()
                .unwrap()
                .push(format!("{method} close={close}: {s} {}", b.trim())),
            Err(e) => bad
                .lock()
                .unwrap()
                .push(format!("{method} close={close}: {e}")),
        }
    }
}

#[test]
fn twenty_deploys_under_continuous_load_fail_no_request() {
    let lab = CliLab::new("cli-load");
    let host = format!("shop.{}.test", lab.prefix);
    let (dir, _) = lab.project("shop", &app_yaml(&host, "    replicas: 2\n"));
    lab.luma_ok(&dir, &["deploy"]);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = [
        ("GET", false),
        ("GET", true),
        ("POST", false),
        ("POST", true),
    ]
    .into_iter()
    .map(|(m, close)| {
        let (a, h, s, o, b) = (
            lab.http_addr(),
            host.clone(),
            stop.clone(),
            ok.clone(),
            bad.clone(),
        );
        std::thread::spawn(move || load(a, h, m, close, s, o, b))
    })
    .collect();
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        lab.luma_ok(&dir, &["deploy"]);
        times.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    times.sort();
    let bad = bad.lock().unwrap();
    eprintln!(
        "20 deploys: median {:?}, max {:?}; {} requests ok, {} failed",
        times[10],
        times[19],
        ok.load(Ordering::Relaxed),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "{} failed requests, first: {:?}",
        bad.len(),
        bad.first()
    );
    assert!(ok.load(Ordering::Relaxed) > 1000);
    // Only the live release runs; two earlier ones are kept stopped for rollback.
    let v = body_json(&lab.luma_ok(&dir, &["status", "--json"]))["servers"][0].clone();
    let replicas = v["apps"][0]["replicas"].as_array().unwrap();
    let running = replicas.iter().filter(|r| r["state"] == "running").count();
    assert_eq!(running, 2, "{v}");
    assert_eq!(
        v["apps"][0]["retained_releases"].as_array().unwrap().len(),
        2,
        "{v}"
    );
    // The live release is recorded twice, by the proxy's route and by labels, and they agree.
    assert_eq!(v["apps"][0]["consistent"], true, "{v}");
    assert!(v["apps"][0]["live_release"].is_string());
}

#[test]
fn a_release_that_fails_its_health_check_changes_nothing_and_rollback_works() {
    let lab = CliLab::new("cli-fail");
    let host = format!("shop.{}.test", lab.prefix);
    let (dir, project) = lab.project("shop", &app_yaml(&host, ""));
    lab.luma_ok(&dir, &["deploy"]);
    let mut http = Http::new(&lab.http_addr());
    let live = body_json(&http.get(&host, "/").unwrap().1)["release"]
        .as_str()
        .unwrap()
        .to_string();

    let sick = app_yaml(&host, "    environment:\n      plain: [DEMO_UNHEALTHY=1]\n")
        .replace("interval: 200ms", "interval: 200ms\n      deadline: 3s");
    std::fs::write(dir.join("luma.yml"), format!("name: {project}\n{sick}")).unwrap();
    // While the sick release waits for its health check, neither the proxy nor `web` inside
    // the project may reach it (guarantee 1).
    let v1_ips = running_ips(&project);
    let watching = Arc::new(AtomicBool::new(true));
    let leaks = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (w, l, addr, host, proxy, project) = (
            watching.clone(),
            leaks.clone(),
            lab.http_addr(),
            host.clone(),
            lab.proxy.clone(),
            project.clone(),
        );
        let (live, v1_ips) = (live.clone(), v1_ips.clone());
        std::thread::spawn(move || {
            let mut http = Http::new(&addr);
            let mut checks = 0;
            while w.load(Ordering::Relaxed) {
                if let Ok((_, b)) = http.get(&host, "/") {
                    if body_json(&b)["release"].as_str() != Some(live.as_str()) {
                        l.lock().unwrap().push(format!("proxy served {b}"));
                    }
                }
                if let Ok(out) = docker(&[
                    "exec",
                    &proxy,
                    "luma-proxy",
                    "check",
                    "--json",
                    "--project",
                    &project,
                    "--target",
                    "web:3000",
                    "--timeout",
                    "1s",
                ]) {
                    let ips: Vec<String> = body_json(&out)["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|b| {
                            Some(b["addr"].as_str()?.trim_end_matches(":3000").to_string())
                        })
                        .collect();
                    if ips != v1_ips {
                        l.lock()
                            .unwrap()
                            .push(format!("`web` resolved to {ips:?}, not only {v1_ips:?}"));
                    }
                    checks += 1;
                }
            }
            checks
        })
    };
    let (ok, _, err) = lab.luma(&dir, &["deploy"]);
    watching.store(false, Ordering::Relaxed);
    let checks = watcher.join().unwrap();
    assert!(checks >= 3, "the watcher barely ran ({checks} checks)");
    assert!(
        leaks.lock().unwrap().is_empty(),
        "the unhealthy release got traffic: {:?}",
        leaks.lock().unwrap()
    );
    assert!(!ok, "a failing release must exit non-zero");
    assert!(
        err.contains("last log lines") && err.contains("previous release keeps serving"),
        "{err}"
    );
    assert_eq!(
        body_json(&http.get(&host, "/").unwrap().1)["release"].as_str(),
        Some(live.as_str())
    );
    let running = running_app_ids(&project);
    assert_eq!(
        running.len(),
        1,
        "a container of the failed release is left running"
    );

    // A good second release, then rollback to the first through the same gated path.
    std::fs::write(
        dir.join("luma.yml"),
        format!("name: {project}\n{}", app_yaml(&host, "")),
    )
    .unwrap();
    lab.luma_ok(&dir, &["deploy"]);
    let second = body_json(&http.get(&host, "/").unwrap().1)["release"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(second, live);
    lab.luma_ok(&dir, &["rollback", "web"]);
    assert_eq!(
        body_json(&http.get(&host, "/").unwrap().1)["release"].as_str(),
        Some(live.as_str())
    );
}

#[test]
fn replicas_share_load_and_a_killed_replica_fails_no_get() {
    let lab = CliLab::new("cli-replicas");
    let host = format!("shop.{}.test", lab.prefix);
    let (dir, project) = lab.project("shop", &app_yaml(&host, "    replicas: 3\n"));
    lab.luma_ok(&dir, &["deploy"]);
    let mut http = Http::new(&lab.http_addr());
    let mut per = std::collections::BTreeMap::new();
    for _ in 0..600 {
        let (s, b) = http.get(&host, "/").unwrap();
        assert_eq!(s, 200);
        *per.entry(body_json(&b)["hostname"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(per.len(), 3, "{per:?}");
    assert!(per.values().all(|n| *n >= 120), "unfair shares: {per:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (a, h, s, o, b) = (
                lab.http_addr(),
                host.clone(),
                stop.clone(),
                ok.clone(),
                bad.clone(),
            );
            std::thread::spawn(move || load(a, h, "GET", false, s, o, b))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let victim = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=luma.project={project}"),
        "--filter",
        "label=luma.replica=2",
    ])
    .unwrap();
    docker(&["kill", victim.trim()]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} GETs failed after a replica was killed: {:?}",
        bad.len(),
        bad.first()
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
}

#[test]
fn routes_survive_proxy_restart_and_update() {
    let lab = CliLab::new("cli-proxy");
    let host = format!("shop.{}.test", lab.prefix);
    let (dir, _) = lab.project("shop", &app_yaml(&host, ""));
    lab.luma_ok(&dir, &["deploy"]);
    let serve = || {
        let mut http = Http::new(&lab.http_addr());
        wait_for(Duration::from_secs(5), || {
            (http.get(&host, "/").ok()?.0 == 200).then_some(())
        })
    };
    docker(&["restart", &lab.proxy]).unwrap();
    let t = Instant::now();
    assert!(
        serve().is_some(),
        "routes did not come back within 5 s of `docker restart`"
    );
    eprintln!(
        "after docker restart of the proxy, the route served within {:?}",
        t.elapsed()
    );
    let out = lab.luma_ok(&dir, &["proxy", "update"]);
    let _ = out;
    assert!(serve().is_some(), "routes lost by `luma proxy update`");
    let st = body_json(&lab.luma_ok(&dir, &["proxy", "status", "--json"]))["servers"][0].clone();
    assert_eq!(st["server"], "local");
    assert_eq!(st["state"], "running");
    assert_eq!(st["proxy"]["routes"], 1, "{st}");
}

#[test]
fn lookalike_names_coexist_and_two_projects_deploy_concurrently() {
    let lab = CliLab::new("cli-names");
    let h1 = format!("one.{}.test", lab.prefix);
    let h2 = format!("two.{}.test", lab.prefix);
    // Project `<p>-a-b` with app `c`, and project `<p>-a` with app `b-c`.
    let yaml = |app: &str, host: &str| app_yaml(host, "").replace("  web:", &format!("  {app}:"));
    let (d1, p1) = lab.project("a-b", &yaml("c", &h1));
    let (d2, p2) = lab.project("a", &yaml("b-c", &h2));
    // Concurrent deploys of two projects: both succeed.
    let (r1, r2) = std::thread::scope(|s| {
        let a = s.spawn(|| lab.luma(&d1, &["deploy"]));
        let b = s.spawn(|| lab.luma(&d2, &["deploy"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(r1.0, "{}", r1.2);
    assert!(r2.0, "{}", r2.2);
    let mut http = Http::new(&lab.http_addr());
    assert_eq!(
        body_json(&http.get(&h1, "/").unwrap().1)["project"].as_str(),
        Some(p1.as_str())
    );
    assert_eq!(
        body_json(&http.get(&h2, "/").unwrap().1)["project"].as_str(),
        Some(p2.as_str())
    );

    // Two deploys of the same project at once: one waits on nothing, the other is refused clearly.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| lab.luma(&d1, &["deploy"]));
        std::thread::sleep(Duration::from_millis(150));
        let b = s.spawn(|| lab.luma(&d1, &["deploy"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.0, "{}", a.2);
    assert!(
        !b.0 && b.2.contains("is locked by `luma deploy`"),
        "second deploy was not refused clearly: {}",
        b.2
    );
}

#[test]
fn bad_configs_fail_clearly_and_leave_docker_unchanged() {
    let lab = CliLab::new("cli-bad");
    let cases = [
        ("apps:\n  web:\n    image: x\n    replica: 2\n", "apps.web.replica: unknown key; did you mean `replicas`?"),
        ("apps:\n  web:\n    image: x\n    proxy: {hosts: [\"a.test:80\"], app_port: 3000}\n", "apps.web.proxy.hosts[0]"),
        ("apps:\n  Web:\n    image: x\n", "app \"Web\" is not a valid name"),
        ("apps:\n  web:\n    image: missing-image:none\n    proxy: {hosts: [x.test], app_port: 3000}\n", "is not on the engine"),
        ("apps:\n  web:\n    image: x\n    environment: {secret: [DB_PASSWORD]}\n", "needs secret(s) DB_PASSWORD"),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let (dir, project) = lab.project(&format!("bad{i}"), yaml);
        let (ok, _, err) = lab.luma(&dir, &["deploy"]);
        assert!(!ok, "case {i} succeeded");
        assert!(
            err.contains(want),
            "case {i}: error {err:?} does not say {want:?}"
        );
        assert!(
            err.contains("luma.yml") || err.contains(".luma/secrets"),
            "case {i}: the error does not name the file: {err}"
        );
        let left = project_containers(&project, &[]);
        assert!(left.is_empty(), "case {i} left containers behind");
        assert!(
            docker(&["network", "inspect", &format!("{project}-network")]).is_err(),
            "case {i} created a network"
        );
    }
}

#[test]
fn services_get_their_alias_clashing_ports_are_named_and_remove_cleans_up() {
    let lab = CliLab::new("cli-svc");
    let port = free_port();
    let host = format!("shop.{}.test", lab.prefix);
    let svc = |env: &str| {
        format!(
            "{}services:\n  db:\n    image: {}\n    ports: [\"127.0.0.1:{port}:3000\"]\n    environment:\n      plain: [MODE={env}]\n",
            app_yaml(&host, ""),
            demo_image()
        )
    };
    let (dir, project) = lab.project("shop", &svc("a"));
    lab.luma_ok(&dir, &["deploy"]);
    // Apps reach the service as db:3000 inside the project network.
    let out = docker(&[
        "exec",
        &lab.proxy,
        "luma-proxy",
        "check",
        "--json",
        "--project",
        &project,
        "--target",
        "db:3000",
        "--timeout",
        "5s",
    ])
    .unwrap();
    assert_eq!(
        body_json(&out)["backends"].as_array().unwrap().len(),
        1,
        "{out}"
    );
    let id = |name: &str| docker(&["inspect", "--format", "{{.Id}}", name]).unwrap();
    let db = format!("{project}_db");
    let first = id(&db);
    lab.luma_ok(&dir, &["deploy"]);
    assert_eq!(id(&db), first, "an unchanged service was recreated");
    std::fs::write(
        dir.join("luma.yml"),
        format!("name: {project}\n{}", svc("b")),
    )
    .unwrap();
    lab.luma_ok(&dir, &["deploy"]);
    assert_ne!(id(&db), first, "a changed service was not recreated");

    // Another project wanting the same host port is refused before anything changes.
    let (dir2, project2) = lab.project(
        "other",
        &format!(
            "services:\n  cache:\n    image: {}\n    ports: [\"127.0.0.1:{port}:3000\"]\n",
            demo_image()
        ),
    );
    let (ok, _, err) = lab.luma(&dir2, &["deploy"]);
    assert!(
        !ok && err.contains(&format!("container {db}")),
        "the clash does not name the holder: {err}"
    );
    assert!(
        docker(&["network", "inspect", &format!("{project2}-network")]).is_err(),
        "the refused deploy changed Docker"
    );

    // remove: refuses without a terminal unless --yes, then takes everything down.
    let (ok, _, err) = lab.luma(&dir, &["remove"]);
    assert!(!ok && err.contains("--yes"), "{err}");
    lab.luma_ok(&dir, &["remove", "--yes"]);
    assert!(project_containers(&project, &[]).is_empty());
    assert!(docker(&["network", "inspect", &format!("{project}-network")]).is_err());
    let mut http = Http::new(&lab.http_addr());
    assert_eq!(http.get(&host, "/").unwrap().0, 404);
}

#[test]
fn init_writes_a_template_once_and_logs_show_replicas() {
    let lab = CliLab::new("cli-init");
    let dir = std::env::temp_dir().join(format!("{}-init", lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let (ok, _, err) = lab.luma(&dir, &["init"]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(dir.join("luma.yml")).unwrap();
    assert!(
        text.contains("name: my-project") && text.contains("# "),
        "template is not commented"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(".luma/secrets"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(dir.join(".gitignore"))
        .unwrap()
        .contains(".luma/secrets"));
    std::fs::write(dir.join("luma.yml"), "name: mine\n").unwrap();
    let (ok, _, err) = lab.luma(&dir, &["init"]);
    assert!(ok && err.contains("left as it is"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("luma.yml")).unwrap(),
        "name: mine\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let host = format!("shop.{}.test", lab.prefix);
    let (pdir, _) = lab.project("shop", &app_yaml(&host, "    replicas: 2\n"));
    lab.luma_ok(&pdir, &["deploy"]);
    let logs = lab.luma_ok(&pdir, &["logs", "web"]);
    assert!(
        logs.contains("[1]") && logs.contains("[2]") && logs.contains("listening"),
        "{logs}"
    );
}

#[test]
fn one_replica_release_serves_quickly_after_luma_deploy_starts() {
    let lab = CliLab::new("cli-time");
    let host = format!("shop.{}.test", lab.prefix);
    let (dir, _) = lab.project("shop", &app_yaml(&host, ""));
    lab.luma_ok(&dir, &["deploy"]);
    let mut http = Http::new(&lab.http_addr());
    let mut times = Vec::new();
    for _ in 0..5 {
        let before = body_json(&http.get(&host, "/").unwrap().1)["release"]
            .as_str()
            .unwrap()
            .to_string();
        let t = Instant::now();
        let child = std::thread::scope(|s| {
            let h = s.spawn(|| lab.luma(&dir, &["deploy"]));
            let serving = wait_for(Duration::from_secs(30), || {
                let r = body_json(&http.get(&host, "/").ok()?.1)["release"]
                    .as_str()?
                    .to_string();
                (r != before).then(|| t.elapsed())
            });
            (h.join().unwrap(), serving)
        });
        assert!(child.0 .0, "{}", child.0 .2);
        times.push(child.1.expect("new release never served"));
    }
    times.sort();
    eprintln!("one replica, prebuilt image: `luma deploy` -> new release serving: median {:?} (min {:?}, max {:?})", times[2], times[0], times[4]);
}

#[test]
fn setup_builds_a_missing_proxy_image_from_the_static_binary() {
    let lab = CliLab::new("cli-setup");
    // docker/build-images.sh leaves the static binary here; tests/run.sh runs it first.
    let root = luma_bin().parent().unwrap().parent().unwrap().to_path_buf();
    let binary = root.join("x86_64-unknown-linux-gnu/release/luma-proxy");
    assert!(
        binary.exists(),
        "{} is missing: run docker/build-images.sh",
        binary.display()
    );
    let image = format!("{}-proxy-image:test", lab.prefix);
    let host = format!("shop.{}.test", lab.prefix);
    let (dir, _) = lab.project("shop", &app_yaml(&host, ""));
    let env = [
        ("LUMA_PROXY_IMAGE", image.as_str()),
        ("LUMA_PROXY_BINARY", binary.to_str().unwrap()),
    ];
    let (ok, _, err) = lab.luma_env(&dir, &["setup"], &env);
    let cleanup = || {
        let _ = docker(&["rm", "-f", "-v", &lab.proxy]);
        let _ = docker(&["rmi", "-f", &image]);
    };
    if !ok {
        cleanup();
        panic!("setup could not build the proxy image: {err}");
    }
    let built = docker(&["image", "inspect", "--format", "{{.Id}}", &image]);
    let running = docker(&[
        "inspect",
        "--format",
        "{{.State.Running}} {{.Config.Image}}",
        &lab.proxy,
    ]);
    // A dynamically linked binary is refused with a clear reason.
    let (ok2, _, err2) = lab.luma_env(
        &dir,
        &["setup"],
        &[
            ("LUMA_PROXY_IMAGE", "lumait-never-built:x"),
            ("LUMA_PROXY_BINARY", luma_bin().to_str().unwrap()),
        ],
    );
    cleanup();
    assert!(built.is_ok(), "no image {image}");
    assert_eq!(running.unwrap(), format!("true {image}"));
    assert!(!ok2 && err2.contains("not a statically linked"), "{err2}");
}

#[test]
fn a_proxy_that_exits_at_start_fails_the_deploy_with_its_own_reason() {
    let lab = CliLab::new("cli-crash");
    let host = format!("shop.{}.test", lab.prefix);
    let (dir, project) = lab.project("shop", &app_yaml(&host, ""));
    // A proxy image whose proxy refuses its settings and exits at once (code 2), as a bad
    // LUMA_PROXY_* value or a broken build would: the proxy image with one setting added.
    let image = format!("{}-crashing-proxy:test", lab.prefix);
    let crashing = format!("{}-replaced", lab.proxy); // CliLab removes this name too
    struct Cleanup(Vec<Vec<String>>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for args in &self.0 {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let _ = docker(&args);
            }
        }
    }
    let _cleanup = Cleanup(vec![
        vec!["rm".into(), "-f".into(), "-v".into(), crashing.clone()],
        // Where `luma proxy update` parks the one it replaces.
        vec![
            "rm".into(),
            "-f".into(),
            "-v".into(),
            format!("{crashing}-replaced"),
        ],
        vec!["volume".into(), "rm".into(), format!("{crashing}-state")],
        vec!["rmi".into(), "-f".into(), image.clone()],
    ]);
    let base = format!("{}-crashing-base", lab.prefix);
    docker(&["create", "--name", &base, &proxy_image()]).unwrap();
    let committed = docker(&[
        "commit",
        "--change",
        "ENV LUMA_PROXY_WORKERS=many",
        &base,
        &image,
    ]);
    // -v: the image declares a volume, which would outlive the container.
    let _ = docker(&["rm", "-f", "-v", &base]);
    committed.unwrap();

    let (ok, out, err) = lab.luma_env(
        &dir,
        &["deploy"],
        &[
            ("LUMA_PROXY_IMAGE", image.as_str()),
            ("LUMA_PROXY_NAME", crashing.as_str()),
        ],
    );
    assert!(
        !ok,
        "deploy succeeded with a proxy that cannot start:\n{out}"
    );
    // Our reason, its exit code, and the proxy's own words (clap's complaint about the value).
    assert!(err.contains("exited at start"), "{err}");
    // Its exit code, unless luma looked just after Docker restarted it (the code is then the
    // new run's, and luma says so instead).
    assert!(
        err.contains("exit code 2") || err.contains("exited and Docker restarted it"),
        "{err}"
    );
    assert!(
        err.contains("invalid value 'many'") && err.contains("--workers"),
        "the proxy's own reason is missing: {err}"
    );
    // ...and where the value came from: the image's environment, not a flag.
    assert!(err.contains("the value is LUMA_PROXY_WORKERS's"), "{err}");
    // Nothing of the project runs behind a proxy that never came up.
    assert!(running_app_ids(&project).is_empty());
    // The way out that the error names: with the cause gone (here, the image), `luma proxy
    // update` replaces the container Docker keeps restarting with its old settings.
    assert!(err.contains("`luma proxy update` replaces it"), "{err}");
    let (ok, out, err) = lab.luma_env(
        &dir,
        &["proxy", "update"],
        &[("LUMA_PROXY_NAME", crashing.as_str())],
    );
    assert!(
        ok,
        "luma proxy update did not replace the crashing proxy:\n{out}\n{err}"
    );
    assert_eq!(
        docker(&[
            "inspect",
            "--format",
            "{{.State.Running}} {{.Config.Image}}",
            &crashing
        ])
        .unwrap(),
        format!("true {}", proxy_image())
    );

    // It holds the ports the next proxy publishes.
    docker(&["rm", "-f", "-v", &crashing]).unwrap();

    // The proxy that does start keeps bounded logs when the daemon writes json-file: it logs
    // a line per request.
    lab.luma_ok(&dir, &["deploy"]);
    let driver = docker(&["info", "--format", "{{.LoggingDriver}}"]).unwrap();
    let log_config = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config \"max-size\"}} {{index .HostConfig.LogConfig.Config \"max-file\"}}",
        &lab.proxy,
    ])
    .unwrap();
    if driver == "json-file" {
        assert_eq!(log_config, "json-file 20m 5");
    } else {
        // Another driver the daemon's admin chose is left as it is.
        assert!(log_config.starts_with(&driver), "{log_config}");
    }
}
