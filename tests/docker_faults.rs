//! Deploy safety against the real engine: faults injected at every phase of a release, and
//! what survives each.
//!
//! - a step after the switch fails (the marker, the retire): the new release stays live and
//!   serving, luma exits 2 naming what is left, and `luma prune` finishes it;
//! - luma is SIGKILLed right after the switch: the new release serves and the lock is freed;
//! - the `docker exec` carrying the switch dies mid-drain: luma asks the proxy, which did
//!   switch, and settles;
//! - SIGINT at each step before the switch: everything this release made is undone, the old
//!   release serves, no lock is left; SIGINT while settling: settling finishes first;
//! - the proxy's state volume turns read-only: the deploy fails and the old route serves;
//! - apps that left luma.yml are found by label: `prune` and `remove` leave no container,
//!   image, route or claimed host;
//! - validation before anything changes, drift of the running proxy, and fast retire.

use luma_integration_tests::*;
use std::time::Duration;

fn app_yaml(host: &str, extra: &str) -> String {
    format!("apps:\n  web:\n    image: {}\n{extra}    health_check:\n      path: /up\n      interval: 200ms\n    proxy:\n      hosts: [{host}]\n      app_port: 3000\n", demo_image())
}

/// The release that answers for `host` through the proxy.
fn served(lab: &CliLab, host: &str) -> String {
    let (status, body) = Http::new(&lab.http_addr()).get(host, "/").expect("GET");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("demo JSON");
    v["release"].as_str().expect("release").to_string()
}

/// The status of the project's one server (`local`).
fn status_json(lab: &CliLab, dir: &std::path::Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&lab.luma_ok(dir, &["status", "--json"])).expect("status JSON");
    assert_eq!(v["servers"][0]["server"], "local", "{v:#}");
    v["servers"][0].clone()
}

/// (release, state) of every app container of a project.
fn app_containers(project: &str) -> Vec<(String, String)> {
    docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=luma.project={project}"),
        "--filter",
        "label=luma.role=app",
        "--format",
        "{{.Label \"luma.release\"}} {{.State}}",
    ])
    .unwrap()
    .lines()
    .filter_map(|l| {
        l.split_once(' ')
            .map(|(r, s)| (r.to_string(), s.to_string()))
    })
    .collect()
}

fn lock_exists(project: &str) -> bool {
    !docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("name=^luma-lock_{project}$"),
    ])
    .unwrap()
    .is_empty()
}

#[test]
fn a_failure_after_the_switch_leaves_the_new_release_live_and_prune_finishes_it() {
    let lab = CliLab::new("fault-settle");
    let host = format!("web.{}.test", lab.prefix);
    let (dir, project) = lab.project("p", &app_yaml(&host, ""));
    lab.luma_ok(&dir, &["deploy"]);
    let mut previous = served(&lab, &host);
    for (fault, left) in [
        ("settle.record=error", "record the live release"),
        (
            "settle.retire=error",
            "stop and disconnect the previous release",
        ),
    ] {
        let run = lab.luma_run(&dir, &["deploy"], &[("LUMA_FAILPOINTS", fault)]);
        assert_eq!(run.code, Some(2), "{fault}: {}", run.stderr);
        assert!(
            run.stderr.contains("is live and serving") && run.stderr.contains(left),
            "{fault}: {}",
            run.stderr
        );
        assert!(run.stderr.contains("luma prune"), "{}", run.stderr);
        let now = served(&lab, &host);
        assert_ne!(
            now, previous,
            "{fault}: the new release must be the one serving"
        );
        let live = status_json(&lab, &dir)["apps"][0]["live_release"].clone();
        assert_eq!(live.as_str(), Some(now.as_str()));
        previous = now;
    }
    // Two releases are still running (the retire failed); prune settles from the proxy's truth.
    assert!(
        app_containers(&project)
            .iter()
            .filter(|(_, s)| s == "running")
            .count()
            > 1
    );
    lab.luma_ok(&dir, &["prune", "--yes"]);
    let st = status_json(&lab, &dir);
    assert_eq!(st["apps"][0]["consistent"], true, "{st:#}");
    assert_eq!(
        st["apps"][0]["recorded_release"].as_str(),
        Some(previous.as_str())
    );
    let running: Vec<_> = app_containers(&project)
        .into_iter()
        .filter(|(_, s)| s == "running")
        .collect();
    assert!(running.iter().all(|(r, _)| *r == previous), "{running:?}");
    assert_eq!(served(&lab, &host), previous);
}

#[test]
fn luma_killed_right_after_the_switch_leaves_the_new_release_serving_and_no_lock() {
    let lab = CliLab::new("fault-kill");
    let host = format!("web.{}.test", lab.prefix);
    let (dir, project) = lab.project("p", &app_yaml(&host, ""));
    lab.luma_ok(&dir, &["deploy"]);
    let old = served(&lab, &host);
    let (child, _) = lab.luma_paused_at(&dir, &["deploy"], "settle.record");
    assert!(
        lock_exists(&project),
        "the deploy holds the lock while paused"
    );
    let (code, _) = signal_and_wait(child, "KILL");
    assert_eq!(code, None, "killed by SIGKILL");
    let new = served(&lab, &host);
    assert_ne!(new, old, "the switch happened before the kill");
    // The lock's holder process sees its stdin close and the container removes itself.
    assert!(
        wait_for(Duration::from_secs(30), || (!lock_exists(&project))
            .then_some(()))
        .is_some(),
        "the lock outlived the killed luma"
    );
    // The next run takes the lock and settles what the killed one left.
    lab.luma_ok(&dir, &["prune", "--yes"]);
    let st = status_json(&lab, &dir);
    assert_eq!(
        st["apps"][0]["recorded_release"].as_str(),
        Some(new.as_str())
    );
    assert!(st["lock"].is_null(), "{st:#}");
}

/// In-flight requests through the proxy right now (its own status).
fn proxy_inflight(lab: &CliLab) -> u64 {
    docker(&["exec", &lab.proxy, "luma-proxy", "status", "--json"])
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["inflight"].as_u64())
        .unwrap_or(0)
}

#[test]
fn the_exec_carrying_the_switch_dies_mid_drain_and_luma_settles_from_the_proxys_truth() {
    let lab = CliLab::new("fault-exec");
    let host = format!("web.{}.test", lab.prefix);
    let (dir, _) = lab.project("p", &app_yaml(&host, ""));
    lab.luma_ok(&dir, &["deploy"]);
    let old = served(&lab, &host);
    // luma waits before the switch until a slow request holds the old release's drain open.
    let go = dir.join("go");
    let fp = format!("prepare.realiased=wait:{}", go.display());
    let (child, _) = lab.luma_until(
        &dir,
        &["deploy"],
        &[("LUMA_FAILPOINTS", fp.as_str())],
        "failpoint prepare.realiased: waiting",
    );
    let addr = lab.http_addr();
    let slow_host = host.clone();
    let slow = std::thread::spawn(move || Http::new(&addr).get(&slow_host, "/?delay_ms=8000"));
    assert!(
        wait_for(Duration::from_secs(30), || (proxy_inflight(&lab) > 0)
            .then_some(()))
        .is_some(),
        "the slow request never reached the proxy"
    );
    std::fs::write(&go, "").unwrap();
    // Once the proxy has switched (seen without a `call`), the switch's exec is the only
    // `luma-proxy call` in the proxy container, held open by the drain: kill it there.
    let old_alias = format!("web--{old}:");
    assert!(
        wait_for(Duration::from_secs(60), || {
            let routes = docker(&["exec", &lab.proxy, "luma-proxy", "list", "--json"]).ok()?;
            (routes.contains("\"target\"") && !routes.contains(&old_alias)).then_some(())
        })
        .is_some(),
        "the proxy never switched"
    );
    let pid = wait_for(Duration::from_secs(30), || {
        docker(&["top", &lab.proxy, "-eo", "pid,args"])
            .ok()?
            .lines()
            .find(|l| l.contains("luma-proxy call"))
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
    })
    .expect("the switch's exec never showed up");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let (code, err) = finish(child);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("the switch's outcome is unknown"), "{err}");
    assert!(err.contains("the proxy did switch"), "{err}");
    assert_eq!(
        slow.join().unwrap().unwrap().0,
        200,
        "the drained request completed"
    );
    let new = served(&lab, &host);
    assert_ne!(new, old);
    assert_eq!(status_json(&lab, &dir)["apps"][0]["consistent"], true);
}

#[test]
fn sigint_before_the_switch_undoes_everything_and_after_it_settling_finishes() {
    let lab = CliLab::new("fault-int");
    let host = format!("web.{}.test", lab.prefix);
    // `build:` so the release's own image is part of what must be undone.
    let yaml = app_yaml(&host, "").replace(
        &format!("    image: {}\n", demo_image()),
        "    build:\n      context: .\n",
    );
    let (dir, project) = lab.project("p", &yaml);
    lab.luma_ok(&dir, &["deploy"]);
    let old = served(&lab, &host);
    let images = |project: &str| {
        docker(&[
            "images",
            "-q",
            "--filter",
            &format!("label=luma.project={project}"),
        ])
        .unwrap()
        .lines()
        .count()
    };
    let images_before = images(&project);
    for point in [
        "prepare.image",
        "prepare.started",
        "prepare.checked",
        "prepare.realiased",
        "switch.before",
    ] {
        let (child, _) = lab.luma_paused_at(&dir, &["deploy"], point);
        let (code, err) = signal_and_wait(child, "INT");
        assert_eq!(code, Some(1), "{point}: {err}");
        assert!(
            err.contains("The previous release keeps serving"),
            "{point}: {err}"
        );
        assert_eq!(served(&lab, &host), old, "{point}");
        let left: Vec<_> = app_containers(&project)
            .into_iter()
            .filter(|(r, _)| *r != old)
            .collect();
        assert!(left.is_empty(), "{point}: half-made release left: {left:?}");
        assert_eq!(
            images(&project),
            images_before,
            "{point}: the built image was left"
        );
        assert!(!lock_exists(&project), "{point}: the lock was left");
    }
    // A signal in the middle of a running step (a health check that cannot pass) cuts it short
    // and undoes the release too.
    let yaml_ok = std::fs::read_to_string(dir.join("luma.yml")).unwrap();
    let unhealthy = yaml_ok.replace(
        "    health_check:\n",
        "    environment:\n      plain: [DEMO_UNHEALTHY=1]\n    health_check:\n      deadline: 5m\n",
    );
    std::fs::write(dir.join("luma.yml"), &unhealthy).unwrap();
    let (child, _) = lab.luma_until(&dir, &["deploy"], &[], "… health-check");
    let (code, err) = signal_and_wait(child, "INT");
    std::fs::write(dir.join("luma.yml"), &yaml_ok).unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("keeps serving"),
        "{err}"
    );
    assert_eq!(served(&lab, &host), old);
    assert!(app_containers(&project).iter().all(|(r, _)| *r == old));
    assert_eq!(images(&project), images_before);
    assert!(!lock_exists(&project));

    // After the switch a signal waits for settling, which then completes.
    let (child, _) = lab.luma_paused_at(&dir, &["deploy"], "settle.record");
    let (code, err) = signal_and_wait(child, "INT");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("finishing settling first"), "{err}");
    let new = served(&lab, &host);
    assert_ne!(new, old);
    let st = status_json(&lab, &dir);
    assert_eq!(st["apps"][0]["consistent"], true, "{st:#}");
    assert!(!lock_exists(&project));
}

/// Remounts the proxy's state dir read-only or read-write inside the proxy's own mount
/// namespace (the engine cannot change a live container's mounts, and the FROM-scratch image
/// has no `mount`): a tiny python3 joins the namespace with setns(2) and calls mount(2).
fn remount_state(proxy: &str, mode: &str) {
    let pid = docker(&["inspect", "--format", "{{.State.Pid}}", proxy]).unwrap();
    let flags = if mode == "ro" {
        "MS_REMOUNT | MS_BIND | MS_RDONLY"
    } else {
        "MS_REMOUNT | MS_BIND"
    };
    let script = format!(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         MS_RDONLY, MS_REMOUNT, MS_BIND, CLONE_NEWNS = 1, 32, 4096, 0x00020000\n\
         fd = os.open('/proc/{pid}/ns/mnt', os.O_RDONLY)\n\
         assert libc.setns(fd, CLONE_NEWNS) == 0, os.strerror(ctypes.get_errno())\n\
         r = libc.mount(None, b'/var/lib/luma-proxy', None, {flags}, None)\n\
         assert r == 0, os.strerror(ctypes.get_errno())\n"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 is needed to remount the proxy's state volume");
    assert!(
        out.status.success(),
        "remount {mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_read_only_state_volume_fails_the_deploy_and_the_old_route_keeps_serving() {
    let lab = CliLab::new("fault-ro");
    let host = format!("web.{}.test", lab.prefix);
    let (dir, project) = lab.project("p", &app_yaml(&host, ""));
    lab.luma_ok(&dir, &["deploy"]);
    let old = served(&lab, &host);
    remount_state(&lab.proxy, "ro");
    let run = lab.luma_run(&dir, &["deploy"], &[]);
    remount_state(&lab.proxy, "rw");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("could not be saved") && run.stderr.contains("keeps serving"),
        "{}",
        run.stderr
    );
    assert_eq!(served(&lab, &host), old);
    assert!(app_containers(&project).iter().all(|(r, _)| *r == old));
    // A restart restores the route that is really live.
    docker(&["restart", &lab.proxy]).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || {
            Http::new(&lab.http_addr())
                .get(&host, "/")
                .ok()
                .filter(|(s, _)| *s == 200)
        })
        .is_some(),
        "the route did not come back after a restart"
    );
    assert_eq!(served(&lab, &host), old);
    lab.luma_ok(&dir, &["deploy"]);
    assert_ne!(served(&lab, &host), old);
}

#[test]
fn apps_that_left_luma_yml_are_pruned_and_removed_with_their_routes_images_and_hosts() {
    let lab = CliLab::new("fault-gone");
    let web = format!("web.{}.test", lab.prefix);
    let api = format!("api.{}.test", lab.prefix);
    let two = format!(
        "{}  api:\n    build:\n      context: .\n    health_check:\n      interval: 200ms\n    proxy:\n      hosts: [{api}]\n      app_port: 3000\n",
        app_yaml(&web, "")
    );
    let (dir, project) = lab.project("p", &two);
    lab.luma_ok(&dir, &["deploy"]);
    served(&lab, &api);
    // api leaves luma.yml: deploy warns, status lists it, prune removes it.
    std::fs::write(
        dir.join("luma.yml"),
        format!("name: {project}\n{}", app_yaml(&web, "")),
    )
    .unwrap();
    let run = lab.luma_run(&dir, &["deploy"], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("app api is on the engine but no longer in"),
        "{}",
        run.stderr
    );
    assert_eq!(status_json(&lab, &dir)["departed"][0], "app api");
    lab.luma_ok(&dir, &["prune", "--yes"]);
    let api_left = project_containers(&project, &["luma.app=api"]);
    assert!(api_left.is_empty(), "api containers left: {api_left:?}");
    let api_images = docker(&["images", "-q", &format!("{project}_api")]).unwrap();
    assert!(api_images.is_empty(), "api images left: {api_images}");
    assert_eq!(Http::new(&lab.http_addr()).get(&api, "/").unwrap().0, 404);
    served(&lab, &web);

    // Everything goes with `remove`, found by label.
    lab.luma_ok(&dir, &["remove", "--yes"]);
    let left = project_containers(&project, &[]);
    assert!(left.is_empty(), "containers left: {left:?}");
    let imgs = docker(&[
        "images",
        "-q",
        "--filter",
        &format!("label=luma.project={project}"),
    ])
    .unwrap();
    assert!(imgs.is_empty(), "images left: {imgs}");
    let routes = docker(&["exec", &lab.proxy, "luma-proxy", "list", "--json"]).unwrap();
    assert!(!routes.contains(&project), "routes left: {routes}");
    // Both hosts are free for another project now.
    let (dir2, _) = lab.project(
        "q",
        &format!(
            "{}  api:\n    image: {}\n    health_check:\n      interval: 200ms\n    proxy:\n      hosts: [{api}]\n      app_port: 3000\n",
            app_yaml(&web, ""),
            demo_image()
        ),
    );
    lab.luma_ok(&dir2, &["deploy"]);
    served(&lab, &api);
    served(&lab, &web);
}

#[test]
fn checks_before_anything_changes_and_the_truth_about_the_proxy() {
    let lab = CliLab::new("fault-check");
    // A release alias must fit one DNS label: a 40-byte app name (the longest allowed) with a
    // forced release of a dirty git tree (`<sha>-t<time>`) does not, and is refused before
    // anything is created.
    let long = "a".repeat(40);
    let (dir, project) = lab.project(
        "long",
        &app_yaml(&format!("x.{}.test", lab.prefix), "").replace("  web:", &format!("  {long}:")),
    );
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args([
                "-c",
                "user.name=luma-test",
                "-c",
                "user.email=luma-test@localhost",
            ])
            .args(args)
            .output()
            .expect("git")
            .status
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "init"]);
    let yml = dir.join("luma.yml");
    let mut text = std::fs::read_to_string(&yml).unwrap();
    text.push_str("# dirty\n");
    std::fs::write(&yml, text).unwrap();
    let run = lab.luma_run(&dir, &["deploy", "--force"], &[]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("luma.yml: apps.") && run.stderr.contains("63-byte"),
        "{}",
        run.stderr
    );
    assert!(project_containers(&project, &[]).is_empty());

    // Host ports: the first release runs; a redeploy is refused with the reason, old kept.
    let port = free_port();
    let (dir, project) = lab.project(
        "ports",
        &format!(
            "apps:\n  worker:\n    image: {}\n    ports: [\"127.0.0.1:{port}:3000\"]\n",
            demo_image()
        ),
    );
    lab.luma_ok(&dir, &["deploy"]);
    let first = app_containers(&project);
    let run = lab.luma_run(&dir, &["deploy"], &[]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("two releases cannot do on one host port"),
        "{}",
        run.stderr
    );
    assert_eq!(app_containers(&project), first);

    // A `build:` service is fingerprinted by its image ID: a rebuild recreates it.
    let host = format!("svc.{}.test", lab.prefix);
    let (dir, project) = lab.project(
        "svc",
        &format!(
            "{}services:\n  cache:\n    build:\n      context: .\n",
            app_yaml(&host, "")
        ),
    );
    lab.luma_ok(&dir, &["deploy"]);
    let svc = format!("{project}_cache");
    let id1 = docker(&["inspect", "--format", "{{.Id}}", &svc]).unwrap();
    lab.luma_ok(&dir, &["deploy"]);
    assert_eq!(
        docker(&["inspect", "--format", "{{.Id}}", &svc]).unwrap(),
        id1
    );
    // Appended, so the project's own first step (`CliLab::project`) stays first.
    let dockerfile = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!("{dockerfile}ENV REBUILT=1\n"),
    )
    .unwrap();
    lab.luma_ok(&dir, &["deploy"]);
    assert_ne!(
        docker(&["inspect", "--format", "{{.Id}}", &svc]).unwrap(),
        id1
    );

    // A proxy already running on another port: said so, and only the real URL is printed.
    let other = free_port();
    let run = lab.luma_run(
        &dir,
        &["deploy"],
        &[("LUMA_HTTP_PORT", &format!("127.0.0.1:{other}"))],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("LUMA_HTTP_PORT") && run.stderr.contains("luma proxy update"),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout.contains(&format!("127.0.0.1:{}", lab.http_port))
            && run.stdout.contains("answered 200")
            && !run.stdout.contains(&other.to_string()),
        "{}",
        run.stdout
    );
}

#[test]
fn a_drained_release_that_ignores_sigterm_stops_at_once_under_init() {
    let lab = CliLab::new("fault-term");
    let host = format!("term.{}.test", lab.prefix);
    let extra = "    replicas: 2\n    environment:\n      plain: [DEMO_DEFAULT_SIGNALS=1]\n";
    let (dir, project) = lab.project("p", &app_yaml(&host, extra));
    lab.luma_ok(&dir, &["deploy"]);
    let old = served(&lab, &host);
    lab.luma_ok(&dir, &["deploy"]);
    assert_ne!(served(&lab, &host), old);
    let ids = project_containers(&project, &[&format!("luma.release={old}")]);
    assert_eq!(ids.len(), 2);
    for id in &ids {
        let (init, code) = docker(&[
            "inspect",
            "--format",
            "{{.HostConfig.Init}} {{.State.ExitCode}}",
            id,
        ])
        .unwrap()
        .split_once(' ')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
        assert_eq!(init, "true");
        // 143 = ended by SIGTERM (forwarded by init); 137 would be SIGKILL after the grace.
        assert_eq!(code, "143", "the old replica was not stopped by SIGTERM");
    }
}
