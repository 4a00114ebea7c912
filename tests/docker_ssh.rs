//! Deploying to two servers over real SSH: two extra Docker engines on this machine, each
//! behind its own sshd (`tests/servers/up.sh`, started by tests/run.sh), reached as `luma-s1`
//! and `luma-s2` through an ssh_config (`LUMA_SSH_CONFIG`), with images streamed from this
//! machine's engine or moved through a real docker-registry.
//!
//! Every test uses its own proxy name on both servers (published on any free loopback port)
//! and its own projects, and removes them on both servers and here when it ends, also when it
//! fails.

use luma_integration_tests::servers::{Servers, UNKNOWN_HOST};
use luma_integration_tests::{finish, CliLab, Http, Run};
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const S1: &str = "luma-s1";
const S2: &str = "luma-s2";

/// A CLI lab whose projects deploy to both servers, cleaned up on both.
struct Lab {
    cli: CliLab,
    servers: Servers,
    projects: std::sync::Mutex<Vec<String>>,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        Lab {
            cli: CliLab::new(tag),
            servers: Servers::from_env(),
            projects: Default::default(),
        }
    }

    /// A project (Dockerfile FROM the demo image) whose `web` runs on `servers` under `host`,
    /// HTTP only.
    fn project(
        &self,
        name: &str,
        servers: &[&str],
        host: &str,
        extra: &str,
    ) -> (std::path::PathBuf, String) {
        self.project_ssl(name, servers, host, "false", extra)
    }

    /// [`Lab::project`] with `ssl: SSL`.
    fn project_ssl(
        &self,
        name: &str,
        servers: &[&str],
        host: &str,
        ssl: &str,
        extra: &str,
    ) -> (std::path::PathBuf, String) {
        let yaml = format!(
            "apps:\n  web:\n    build: {{context: .}}\n    servers: [{}]\n    health_check: {{path: /up, interval: 200ms, deadline: 20s}}\n    proxy: {{hosts: [{host}], app_port: 3000, ssl: {ssl}}}\n{extra}",
            servers.join(", ")
        );
        let (dir, project) = self.cli.project(name, &yaml);
        self.projects.lock().unwrap().push(project.clone());
        (dir, project)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "LUMA_SSH_CONFIG",
                self.servers.ssh_config.display().to_string(),
            ),
            // Two proxies share this machine's ports: each takes any free one.
            ("LUMA_HTTP_PORT", "127.0.0.1:0".into()),
            ("LUMA_HTTPS_PORT", "127.0.0.1:0".into()),
            ("LUMA_NETWORK_POOL", self.servers.network_pool.clone()),
        ]
    }

    fn run(&self, dir: &Path, args: &[&str], extra: &[(&str, &str)]) -> Run {
        let env = self.env();
        let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(extra);
        self.cli.luma_run(dir, args, &all)
    }

    fn ok(&self, dir: &Path, args: &[&str]) -> Run {
        let r = self.run(dir, args, &[]);
        assert_eq!(
            r.code,
            Some(0),
            "luma {} failed:\n{}\n{}",
            args.join(" "),
            r.stdout,
            r.stderr
        );
        r
    }

    /// Where a server's proxy answers HTTP on this machine.
    fn proxy_addr(&self, server: &str) -> String {
        let out = self
            .servers
            .docker_on(server, &["port", &self.cli.proxy, "8080/tcp"])
            .unwrap_or_else(|e| panic!("{server}: no published proxy port: {e}"));
        out.lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("{server}: proxy not on loopback: {out}"))
            .to_string()
    }

    /// (status, project, release) of `host` through a server's proxy.
    fn ask(&self, server: &str, host: &str) -> (u16, String, String) {
        let (s, body) = Http::new(&self.proxy_addr(server))
            .get(host, "/")
            .unwrap_or_else(|e| panic!("{server} {host}: {e}"));
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let field = |k: &str| v[k].as_str().unwrap_or("").to_string();
        (s, field("project"), field("release"))
    }

    /// Container names of `project` on `server` with `label=value`.
    fn containers(&self, server: &str, project: &str, label: &str) -> Vec<String> {
        self.servers
            .docker_on(
                server,
                &[
                    "ps",
                    "-a",
                    "--format",
                    "{{.Names}}",
                    "--filter",
                    &format!("label=luma.project={project}"),
                    "--filter",
                    &format!("label={label}"),
                ],
            )
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn status(&self, dir: &Path) -> Value {
        let r = self.ok(dir, &["status", "--json"]);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    }
}

impl Lab {
    /// Runs luma with the lab's environment plus `extra` until it prints `marker`.
    fn until(
        &self,
        dir: &Path,
        args: &[&str],
        extra: &[(&str, &str)],
        marker: &str,
    ) -> (luma_integration_tests::LumaChild, String) {
        let env = self.env();
        let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(extra);
        self.cli.luma_until(dir, args, &all, marker)
    }

    /// On both servers: no app container of `project` but those of release `old`, and `host`
    /// answered by release `old`.
    fn assert_only(&self, project: &str, host: &str, old: &str) {
        for s in [S1, S2] {
            let left: Vec<String> = self
                .containers(s, project, "luma.role=app")
                .into_iter()
                .filter(|c| !c.contains(old))
                .collect();
            assert!(left.is_empty(), "{s} kept new containers {left:?}");
            let (code, _, release) = self.ask(s, host);
            assert_eq!(
                (code, release.as_str()),
                (200, old),
                "{s} must serve the old release"
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The proxies first: a network cannot be removed while a proxy is attached to it.
        self.servers.remove_proxy(&self.cli.proxy);
        for p in self.projects.lock().unwrap().iter() {
            self.servers.cleanup_project(p);
        }
    }
}

/// The live release of `web` per server, from `luma status --json`.
fn live(status: &Value) -> Vec<(String, String)> {
    status["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("no servers in {status}"))
        .iter()
        .map(|s| {
            (
                s["server"].as_str().unwrap_or("").to_string(),
                s["apps"][0]["live_release"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}

/// The release a deploy says it made (`▶ project/web release R on ...`).
fn release_of(run: &Run) -> String {
    run.stderr
        .lines()
        .find_map(|l| l.split(" release ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no release line:\n{}", run.stderr))
        .to_string()
}

fn lines_with<'a>(text: &'a str, a: &str, b: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.contains(a) && l.contains(b))
        .collect()
}

/// Two projects, both with an app `web`, each on both servers: every server's proxy routes
/// each host to its own project. The image goes to each server once; a second deploy of the
/// same image sends nothing. Status shows both servers; rollback brings both back.
#[test]
fn two_projects_on_two_servers_route_by_host_transfer_once_and_roll_back() {
    let lab = Lab::new("ssh-two");
    let host_a = format!("a.{}.test", lab.cli.prefix);
    let host_b = format!("b.{}.test", lab.cli.prefix);
    let (dir_a, project_a) = lab.project("a", &[S1, S2], &host_a, "");
    let (dir_b, project_b) = lab.project("b", &[S1, S2], &host_b, "");

    let first = lab.ok(&dir_a, &["deploy", "--force"]);
    let sent = format!("sent {project_a}_web:");
    for s in [S1, S2] {
        assert_eq!(
            lines_with(&first.stderr, &format!("[{s}]"), &sent).len(),
            1,
            "the image must be streamed to {s} exactly once:\n{}",
            first.stderr
        );
    }
    let release_1 = release_of(&first);
    lab.ok(&dir_b, &["deploy", "--force"]);
    for s in [S1, S2] {
        let (code, project, _) = lab.ask(s, &host_a);
        assert_eq!(
            (code, project.as_str()),
            (200, project_a.as_str()),
            "{s} {host_a}"
        );
        let (code, project, _) = lab.ask(s, &host_b);
        assert_eq!(
            (code, project.as_str()),
            (200, project_b.as_str()),
            "{s} {host_b}"
        );
    }

    // Same build, same image ID: nothing is sent again.
    let second = lab.ok(&dir_a, &["deploy", "--force"]);
    assert!(
        lines_with(&second.stderr, "sent ", "MB/s").is_empty(),
        "a second deploy of the same image sent it again:\n{}",
        second.stderr
    );
    for s in [S1, S2] {
        assert_eq!(
            lines_with(&second.stderr, &format!("[{s}]"), "already there").len(),
            1,
            "{s}:\n{}",
            second.stderr
        );
    }
    let release_2 = release_of(&second);
    assert_ne!(release_1, release_2);
    let st = lab.status(&dir_a);
    assert_eq!(
        live(&st),
        vec![
            (S1.into(), release_2.clone()),
            (S2.into(), release_2.clone())
        ],
        "{st:#}"
    );
    let table = lab.ok(&dir_a, &["status"]).stdout;
    assert!(
        table.contains("SERVER") && table.contains(S1) && table.contains(S2),
        "{table}"
    );

    // Rollback: both servers go back to the first release, through the health gate.
    let back = lab.ok(&dir_a, &["rollback", "web"]);
    assert!(
        back.stderr
            .contains(&format!("back on release {release_1}")),
        "{}",
        back.stderr
    );
    let st = lab.status(&dir_a);
    assert_eq!(
        live(&st),
        vec![
            (S1.into(), release_1.clone()),
            (S2.into(), release_1.clone())
        ],
        "{st:#}"
    );
    for s in [S1, S2] {
        let (code, project, release) = lab.ask(s, &host_a);
        assert_eq!(
            (code, project.as_str(), release.as_str()),
            (200, project_a.as_str(), release_1.as_str()),
            "{s}"
        );
    }

    // Logs and the proxy, across both servers.
    let logs = lab.ok(&dir_a, &["logs", "web", "--tail", "5"]).stdout;
    for s in [S1, S2] {
        assert!(
            logs.contains(&format!("[{s} 1]")),
            "no log lines of {s}:\n{logs}"
        );
    }
    let proxies: Value =
        serde_json::from_str(&lab.ok(&dir_a, &["proxy", "status", "--json"]).stdout).unwrap();
    let shown: Vec<&str> = proxies["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["server"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(shown, vec![S1, S2], "{proxies:#}");
    // Removing project B takes it off both servers and leaves A serving.
    lab.ok(&dir_b, &["remove", "--yes"]);
    for s in [S1, S2] {
        assert!(
            lab.containers(s, &project_b, "luma.project").is_empty(),
            "{s}"
        );
        assert_eq!(lab.ask(s, &host_b).0, 404, "{s} still routes {host_b}");
        assert_eq!(lab.ask(s, &host_a).0, 200, "{s}");
    }
}

/// A replica that fails its health check on one server: no server switches, the new release's
/// containers are removed on both, and the output names the server.
#[test]
fn health_failure_on_one_server_switches_none_and_leaves_nothing() {
    let lab = Lab::new("ssh-health");
    let host = format!("h.{}.test", lab.cli.prefix);
    let (dir, project) = lab.project("h", &[S1, S2], &host, "");
    let first = lab.ok(&dir, &["deploy", "--force"]);
    let old = release_of(&first);

    // On s2 only, once the new replica runs, it turns unhealthy before the proxy checks it.
    let gate = std::env::temp_dir().join(format!("{}-gate", lab.cli.prefix));
    let _ = std::fs::remove_file(&gate);
    let spec = format!("prepare.started@{S2}=wait:{}", gate.display());
    let (child, seen) = lab.until(
        &dir,
        &["deploy", "--force"],
        &[("LUMA_FAILPOINTS", &spec)],
        &format!("failpoint prepare.started@{S2}: waiting"),
    );
    let new: Vec<String> = lab
        .containers(S2, &project, "luma.role=app")
        .into_iter()
        .filter(|c| !c.contains(&old))
        .collect();
    assert_eq!(new.len(), 1, "one new replica on {S2}: {new:?}\n{seen}");
    let ip = lab
        .servers
        .docker_on(
            S2,
            &[
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                &new[0],
            ],
        )
        .unwrap();
    let ip = ip
        .split_whitespace()
        .next()
        .expect("an address")
        .to_string();
    // The host reaches the second engine's containers directly (its own bridge).
    let mut direct = std::net::TcpStream::connect((ip.as_str(), 3000)).expect("reach the replica");
    use std::io::{Read, Write};
    direct
        .write_all(b"GET /_demo/unhealthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = direct.read_to_string(&mut answer);
    assert!(answer.contains("now unhealthy"), "{answer}");
    std::fs::write(&gate, b"go").unwrap();
    let (code, stderr) = finish(child);
    let _ = std::fs::remove_file(&gate);

    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("server {S2}")) && stderr.contains("no server was switched"),
        "{stderr}"
    );
    lab.assert_only(&project, &host, &old);
}

/// A switch that fails on the second server after the first switched: the first is put back
/// on the previous release, and the report says so.
#[test]
fn switch_failure_on_one_server_puts_the_others_back() {
    let lab = Lab::new("ssh-switch");
    let host = format!("w.{}.test", lab.cli.prefix);
    let (dir, _) = lab.project("w", &[S1, S2], &host, "");
    let old = release_of(&lab.ok(&dir, &["deploy", "--force"]));
    let spec = format!("switch.before@{S2}=error");
    let r = lab.run(&dir, &["deploy", "--force"], &[("LUMA_FAILPOINTS", &spec)]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("could not switch on server {S2}"))
            && r.stderr
                .contains(&format!("server {S1} was put back on release {old}")),
        "{}",
        r.stderr
    );
    for s in [S1, S2] {
        let (code, _, release) = lab.ask(s, &host);
        assert_eq!((code, release.as_str()), (200, old.as_str()), "{s}");
    }
    let st = lab.status(&dir);
    assert_eq!(
        live(&st),
        vec![(S1.into(), old.clone()), (S2.into(), old)],
        "{st:#}"
    );
}

/// The ssh connection dies in the middle of an image transfer: the deploy fails and says so,
/// the server has no image of the new release (nothing half-loaded is used), the old release
/// keeps serving, and the next deploy works.
#[test]
fn ssh_killed_during_transfer_leaves_old_release_serving() {
    let lab = Lab::new("ssh-kill");
    let host = format!("k.{}.test", lab.cli.prefix);
    let (dir, project) = lab.project("k", &[S1], &host, "");
    let old = release_of(&lab.ok(&dir, &["deploy", "--force"]));
    // A large layer, so the transfer takes long enough to be cut.
    let big = dir.join("big.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big).unwrap();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..384 {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            f.write_all(&buf).unwrap();
        }
    }
    let dockerfile = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!("{dockerfile}COPY big.bin /big.bin\n"),
    )
    .unwrap();
    let (child, seen) = lab.until(&dir, &["deploy", "--force"], &[], &format!("{S1}: sending"));
    // This run's own connection only (other tests use the same server at the same time).
    assert!(
        kill_ssh_master_of(child.id(), S1),
        "no ssh connection of luma to {S1}:\n{seen}"
    );
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(S1) && stderr.contains("No server was switched"),
        "{stderr}"
    );
    let new_tag_present = lab
        .servers
        .docker_on(S1, &["images", "-q", &format!("{project}_web")])
        .unwrap_or_default()
        .lines()
        .count();
    assert_eq!(
        new_tag_present, 1,
        "only the old release's image may be on {S1}"
    );
    let (code, _, release) = lab.ask(S1, &host);
    assert_eq!((code, release.as_str()), (200, old.as_str()));
    // The connection is opened again by the next run, and the transfer completes.
    let again = lab.ok(&dir, &["deploy", "--force"]);
    assert_eq!(
        lines_with(&again.stderr, "sent ", "MB").len(),
        1,
        "{}",
        again.stderr
    );
    let (code, _, release) = lab.ask(S1, &host);
    assert_eq!((code, release), (200, release_of(&again)));
}

/// A server whose host key is not known is refused with the command that trusts it, and
/// nothing is created there.
#[test]
fn unknown_host_key_is_refused_with_the_command_to_trust_it() {
    let lab = Lab::new("ssh-hostkey");
    let host = format!("u.{}.test", lab.cli.prefix);
    let (dir, project) = lab.project("u", &[UNKNOWN_HOST], &host, "");
    let r = lab.run(&dir, &["deploy", "--force"], &[]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(UNKNOWN_HOST) && r.stderr.contains("ssh-keyscan"),
        "{}",
        r.stderr
    );
    assert!(lab.containers(S1, &project, "luma.project").is_empty());
    assert!(lab
        .servers
        .docker_on(
            S1,
            &["ps", "-aq", "--filter", &format!("name={}", lab.cli.proxy)]
        )
        .unwrap_or_default()
        .is_empty());
}

/// Ten deploys to both servers while clients keep requesting through both proxies: no request
/// fails.
#[test]
fn ten_deploys_under_load_on_two_servers_fail_no_request() {
    let lab = Lab::new("ssh-load");
    let host = format!("l.{}.test", lab.cli.prefix);
    let (dir, _) = lab.project("l", &[S1, S2], &host, "");
    lab.ok(&dir, &["deploy", "--force"]);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    // A failure names its client and when it came, to be matched with the deploys' output.
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for s in [S1, S2] {
        let addr = lab.proxy_addr(s);
        for keep_alive in [true, false] {
            let (stop, ok, failed, addr, host) = (
                stop.clone(),
                ok.clone(),
                failed.clone(),
                addr.clone(),
                host.clone(),
            );
            clients.push(std::thread::spawn(move || {
                let mut http = Http::new(&addr);
                while !stop.load(Ordering::Relaxed) {
                    if !keep_alive {
                        http = Http::new(&addr);
                    }
                    match http.request("GET", &host, "/", "", !keep_alive) {
                        Ok((200, _)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((s, b)) => failed.lock().unwrap().push(format!(
                            "{addr} (keep-alive {keep_alive}) at {:?}: {s} {b}",
                            started.elapsed()
                        )),
                        Err(e) => failed.lock().unwrap().push(format!(
                            "{addr} (keep-alive {keep_alive}) at {:?}: {e}",
                            started.elapsed()
                        )),
                    }
                }
            }));
        }
    }
    for i in 0..10 {
        lab.ok(&dir, &["deploy", "--force"]);
        eprintln!("deploy {} done at {:?}", i + 1, started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    let served = ok.load(Ordering::Relaxed);
    eprintln!(
        "10 deploys to two servers under load: {served} requests, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..]
    );
    assert!(served > 1000, "too little load to mean anything: {served}");
}

/// With `docker.registry`, the image is pushed once to a real registry (with a password from
/// .luma/secrets) and pulled by each server; nothing is streamed.
#[test]
fn registry_pushes_once_and_each_server_pulls() {
    let lab = Lab::new("ssh-registry");
    let host = format!("r.{}.test", lab.cli.prefix);
    let extra = format!(
        "docker: {{registry: \"{}\", username: {}, password: REGISTRY_PASSWORD}}\n",
        lab.servers.registry, lab.servers.registry_user
    );
    let (dir, project) = lab.project("r", &[S1, S2], &host, &extra);
    std::fs::create_dir_all(dir.join(".luma")).unwrap();
    std::fs::write(
        dir.join(".luma/secrets"),
        format!("REGISTRY_PASSWORD={}\n", lab.servers.registry_password),
    )
    .unwrap();
    let r = lab.ok(&dir, &["deploy", "--force"]);
    assert!(
        lines_with(&r.stderr, "sent ", "MB").is_empty(),
        "{}",
        r.stderr
    );
    assert_eq!(
        lines_with(&r.stderr, "pushed", &lab.servers.registry).len(),
        1,
        "{}",
        r.stderr
    );
    for s in [S1, S2] {
        assert_eq!(
            lines_with(&r.stderr, &format!("[{s}]"), "pulled").len(),
            1,
            "{s}:\n{}",
            r.stderr
        );
        let (code, p, _) = lab.ask(s, &host);
        assert_eq!((code, p.as_str()), (200, project.as_str()), "{s}");
    }
    assert!(
        !r.stderr.contains(&lab.servers.registry_password)
            && !r.stdout.contains(&lab.servers.registry_password),
        "the registry password was printed"
    );
    // Each server keeps only the release's tag, no reference into the registry (which would
    // keep the image after the release is pruned).
    for s in [S1, S2] {
        let repos = lab
            .servers
            .docker_on(s, &["images", "--format", "{{.Repository}}"])
            .unwrap();
        assert!(
            !repos.contains(&lab.servers.registry),
            "{s} kept a registry reference:\n{repos}"
        );
    }
    // Registry copies tagged on this machine are removed with the project.
    for i in lab.cli_images_under(&lab.servers.registry) {
        let _ = luma_integration_tests::docker(&["rmi", "-f", &i]);
    }
}

impl Lab {
    /// Images on this machine tagged under `registry/` for this lab's projects.
    fn cli_images_under(&self, registry: &str) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.projects.lock().unwrap().iter() {
            if let Ok(imgs) = luma_integration_tests::docker(&[
                "images",
                "--format",
                "{{.Repository}}:{{.Tag}}",
                "--filter",
                &format!("reference={registry}/{p}_*"),
            ]) {
                out.extend(imgs.lines().map(str::to_string));
            }
        }
        out
    }
}

/// The project's ACME account key as a server's proxy holds it (`luma-proxy call`), if any.
fn acme_account_on(lab: &Lab, server: &str, project: &str) -> Value {
    let request = serde_json::json!({"acme_account": {"project": project}});
    luma_integration_tests::proxy_call(
        Some(lab.servers.docker_host(server)),
        &lab.cli.proxy,
        &request,
    )["ok"]["key"]
        .clone()
}

/// An app with ACME hosts on two servers: both proxies get the same project account key (so
/// either answers the other's HTTP-01 challenges, see luma-proxy/tests/acme_pebble.rs); an
/// app on one server sends none.
#[test]
fn acme_app_on_two_servers_shares_one_account_key() {
    let lab = Lab::new("ssh-acme");
    let host = format!("s.{}.test", lab.cli.prefix);
    let (dir, project) = lab.project_ssl("s", &[S1, S2], &host, "true", "");
    let acme_off = [("LUMA_ACME_DIRECTORY", "off")];
    let r = lab.run(&dir, &["deploy", "--force", "--cert-wait", "0"], &acme_off);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let k1 = acme_account_on(&lab, S1, &project);
    let k2 = acme_account_on(&lab, S2, &project);
    assert!(
        k1["pkcs8_pem"]
            .as_str()
            .is_some_and(|k| k.contains("PRIVATE KEY")),
        "{k1}"
    );
    assert_eq!(k1, k2, "the two servers hold different account keys");
    assert!(!r.stderr.contains("PRIVATE KEY") && !r.stdout.contains("PRIVATE KEY"));
    // A redeploy keeps the key the servers have.
    let r = lab.run(&dir, &["deploy", "--force", "--cert-wait", "0"], &acme_off);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(acme_account_on(&lab, S1, &project), k1);
    let host_one = format!("o.{}.test", lab.cli.prefix);
    let (one_dir, one) = lab.project_ssl("o", &[S1], &host_one, "true", "");
    let r = lab.run(
        &one_dir,
        &["deploy", "--force", "--cert-wait", "0"],
        &acme_off,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(acme_account_on(&lab, S1, &one).is_null());
}

/// Kills the ssh ControlMaster that the luma process `pid` holds to `server` (its one
/// multiplexed connection there), as a dropped network would. True if there was one.
fn kill_ssh_master_of(pid: u32, server: &str) -> bool {
    // Children of any thread of luma: tokio spawns from its worker threads.
    let mut pids: Vec<String> = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let more = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            pids.extend(more.split_whitespace().map(str::to_string));
        }
    }
    pids.sort();
    pids.dedup();
    let mut killed = false;
    for child in pids {
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_master = args.first().is_some_and(|a| a.ends_with("ssh"))
            && args.iter().any(|a| a == "ControlMaster=yes")
            && args.iter().any(|a| a == server);
        if is_master {
            killed |= std::process::Command::new("kill")
                .args(["-KILL", &child])
                .status()
                .is_ok_and(|s| s.success());
        }
    }
    killed
}

/// Ctrl-C while the new release is being prepared on two servers (paused on s2): both servers
/// undo it, neither switches, and the old release keeps serving on both.
#[test]
fn ctrl_c_while_preparing_on_two_servers_undoes_both() {
    let lab = Lab::new("ssh-sigint");
    let host = format!("i.{}.test", lab.cli.prefix);
    let (dir, project) = lab.project("i", &[S1, S2], &host, "");
    let old = release_of(&lab.ok(&dir, &["deploy", "--force"]));
    let spec = format!("prepare.started@{S2}=pause");
    let (child, _) = lab.until(
        &dir,
        &["deploy", "--force"],
        &[("LUMA_FAILPOINTS", &spec)],
        &format!("failpoint prepare.started@{S2}: paused"),
    );
    let (code, stderr) = luma_integration_tests::signal_and_wait(child, "INT");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted") && stderr.contains("no server was switched"),
        "{stderr}"
    );
    lab.assert_only(&project, &host, &old);
}
