//! Support for the Docker integration tests: a guard that names every object it creates
//! uniquely and removes them all when dropped (also when a test panics), and a tiny HTTP client
//! for 127.0.0.1.
//!
//! The tests use the `docker` CLI against the real engine. Docker missing is a failure, never a
//! silent skip. [`pebble`] runs a real ACME server for the HTTPS tests; [`tls`] has their test
//! CA and HTTPS client.

pub mod pebble;
pub mod servers;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub fn proxy_image() -> String {
    std::env::var("LUMA_PROXY_IMAGE").unwrap_or_else(|_| "luma-proxy:dev".into())
}

pub fn demo_image() -> String {
    std::env::var("LUMA_DEMO_IMAGE").unwrap_or_else(|_| "luma-demo:dev".into())
}

/// Runs `docker ARGS`, returning trimmed stdout or an error with stderr.
pub fn docker(args: &[&str]) -> Result<String, String> {
    docker_at(None, args)
}

/// `docker [-H HOST] exec -i <proxy> luma-proxy call` with one request on stdin: the reply
/// envelope (`{"ok": ...}` or `{"error": ...}`).
pub fn proxy_call(
    host: Option<&str>,
    proxy: &str,
    request: &serde_json::Value,
) -> serde_json::Value {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.arg("-H").arg(h);
    }
    let mut child = cmd
        .args(["exec", "-i", proxy, "luma-proxy", "call"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("docker exec");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write the request");
    let out = child.wait_with_output().expect("docker exec");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "unreadable reply to {request}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs `docker [-H HOST] ARGS` against the main engine or another one (`unix://...`),
/// returning trimmed stdout or an error with stderr.
pub fn docker_at(host: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.arg("-H").arg(h);
    }
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}{}: {}",
            host.map(|h| format!("-H {h} ")).unwrap_or_default(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// IDs of a project's containers (any state) that also carry every `key=value` label given.
pub fn project_containers(project: &str, labels: &[&str]) -> Vec<String> {
    let mut args = vec![
        "ps".to_string(),
        "-aq".into(),
        "--filter".into(),
        format!("label=luma.project={project}"),
    ];
    for l in labels {
        args.extend(["--filter".into(), format!("label={l}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args).unwrap().lines().map(str::to_string).collect()
}

/// Owns the Docker objects of one test.
pub struct Lab {
    pub prefix: String,
    containers: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
}

impl Lab {
    /// Fails loudly when the engine or the images are missing.
    pub fn new(tag: &str) -> Lab {
        if let Err(e) = docker(&["version", "--format", "{{.Server.Version}}"]) {
            panic!("Docker is required for the integration tests and is not available: {e}");
        }
        for image in [proxy_image(), demo_image()] {
            if docker(&["image", "inspect", "--format", "{{.Id}}", &image]).is_err() {
                panic!("image {image} is missing: build it with docker/build-images.sh");
            }
        }
        let prefix = format!("lumait-{tag}-{}-{:04x}", std::process::id(), fastrand_u16());
        Lab {
            prefix,
            containers: Mutex::new(Vec::new()),
            networks: Mutex::new(Vec::new()),
        }
    }

    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    pub fn network(&self, name: &str) -> String {
        docker(&["network", "create", "--label", "luma.test=1", name]).expect("network create");
        self.networks.lock().unwrap().push(name.to_string());
        name.to_string()
    }

    /// `docker run -d --name NAME ARGS...`; the container is removed at drop.
    pub fn run(&self, name: &str, args: &[&str]) -> String {
        self.containers.lock().unwrap().push(name.to_string());
        let mut full = vec!["run", "-d", "--name", name, "--label", "luma.test=1"];
        full.extend_from_slice(args);
        docker(&full).unwrap_or_else(|e| panic!("{e}"));
        name.to_string()
    }

    /// A demo backend in `network` with `alias`, reporting `project`.
    pub fn demo(&self, name: &str, network: &str, alias: &str, project: &str) -> String {
        self.demo_with(name, network, alias, project, &[])
    }

    /// A demo backend with extra `KEY=VALUE` environment (e.g. `DEMO_UNHEALTHY=1`).
    pub fn demo_with(
        &self,
        name: &str,
        network: &str,
        alias: &str,
        project: &str,
        env: &[&str],
    ) -> String {
        let project_env = format!("LUMA_PROJECT={project}");
        let mut args = vec![
            "--network",
            network,
            "--network-alias",
            alias,
            "-e",
            &project_env,
        ];
        for e in env {
            args.extend(["-e", e]);
        }
        let image = demo_image();
        args.push(&image);
        self.run(name, &args)
    }

    /// The proxy image on `network`, port 8080 published on 127.0.0.1; returns once its admin
    /// API answers. The container is named `<prefix>-proxy`.
    pub fn proxy(&self, network: &str) -> String {
        let image = proxy_image();
        let proxy = self.run(
            &self.name("proxy"),
            &[
                "--network",
                network,
                "-p",
                "127.0.0.1::8080",
                &image,
                "serve",
                "--no-access-log",
            ],
        );
        wait_for(Duration::from_secs(10), || {
            self.proxy_cli(&proxy, &["status"]).ok()
        })
        .expect("the proxy's admin API never came up");
        proxy
    }

    /// `docker exec CONTAINER luma-proxy ARGS...`
    pub fn proxy_cli(&self, proxy: &str, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["exec", proxy, "luma-proxy"];
        full.extend_from_slice(args);
        docker(&full)
    }

    /// The 127.0.0.1 address a container port is published on.
    pub fn published(&self, container: &str, port: &str) -> String {
        let out = docker(&["port", container, port]).expect("docker port");
        out.lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("{container}:{port} not published on 127.0.0.1: {out}"))
            .to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.containers.lock().unwrap().iter() {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for n in self.networks.lock().unwrap().iter() {
            let _ = docker(&["network", "rm", n]);
        }
    }
}

pub(crate) fn fastrand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ (t >> 16)) as u16
}

/// A keep-alive HTTP/1.1 client for one 127.0.0.1 address.
pub struct Http {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    pub fn new(addr: &str) -> Http {
        assert!(
            addr.starts_with("127.0.0.1:"),
            "tests only talk to loopback"
        );
        Http {
            addr: addr.to_string(),
            conn: None,
        }
    }

    /// GET `path` with `Host: host`; returns (status, body). Reconnects once if the pooled
    /// connection was closed.
    pub fn get(&mut self, host: &str, path: &str) -> Result<(u16, String), String> {
        match self.request("GET", host, path, "", false) {
            Ok(r) => Ok(r),
            Err(_) => self.request("GET", host, path, "", false),
        }
    }
}

/// Polls `f` until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The `luma` binary built beside this test binary (tests/run.sh builds the workspace first).
pub fn luma_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("luma");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// Objects the `luma` CLI creates for a project, removed when dropped.
pub struct CliLab {
    pub prefix: String,
    pub proxy: String,
    pub http_port: u16,
    pub https_port: u16,
    projects: Mutex<Vec<String>>,
}

impl CliLab {
    pub fn new(tag: &str) -> CliLab {
        let lab = Lab::new(tag);
        let prefix = lab.prefix.clone();
        drop(lab);
        CliLab {
            proxy: format!("{prefix}-proxy"),
            prefix,
            http_port: free_port(),
            https_port: free_port(),
            projects: Mutex::new(Vec::new()),
        }
    }

    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// Writes `<dir>/luma.yml` (plus a Dockerfile FROM the demo image) for a project named
    /// `<prefix>-<name>` and registers it for cleanup. Returns (dir, project).
    ///
    /// The Dockerfile's first step names the project, so no two projects share a cached build
    /// step. Tests build at the same time, and the engine's classic builder reuses the newest
    /// of several matching cached steps: two projects building the same `ENV` at once would
    /// leave two candidates, and a rebuild could start from the other project's one and make
    /// a new image, which the tests that assert "the same build sends nothing" would read as a
    /// transfer.
    pub fn project(&self, name: &str, yaml_body: &str) -> (std::path::PathBuf, String) {
        let project = format!("{}-{name}", self.prefix);
        let dir = std::env::temp_dir().join(&project);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("Dockerfile"),
            format!(
                "FROM {}\nLABEL luma.test.project={project}\nENV PORT=3000\n",
                demo_image()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("luma.yml"),
            format!("name: {project}\n{yaml_body}"),
        )
        .unwrap();
        self.projects.lock().unwrap().push(project.clone());
        (dir, project)
    }

    /// Runs `luma -c <dir>/luma.yml ARGS`; returns (success, stdout, stderr).
    pub fn luma(&self, dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
        self.luma_env(dir, args, &[])
    }

    /// Like [`CliLab::luma`], with extra environment variables (they win over the defaults).
    pub fn luma_env(
        &self,
        dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (bool, String, String) {
        let run = self.luma_run(dir, args, env);
        (run.code == Some(0), run.stdout, run.stderr)
    }

    /// Like [`CliLab::luma`] but panics with the output on failure.
    pub fn luma_ok(&self, dir: &std::path::Path, args: &[&str]) -> String {
        let (ok, out, err) = self.luma(dir, args);
        assert!(ok, "luma {} failed:\n{out}\n{err}", args.join(" "));
        out
    }
}

impl Drop for CliLab {
    fn drop(&mut self) {
        // The proxy first: a network cannot be removed while the proxy is attached to it.
        let _ = docker(&["rm", "-f", "-v", &self.proxy]);
        for p in self.projects.lock().unwrap().iter() {
            if let Ok(ids) = docker(&["ps", "-aq", "--filter", &format!("label=luma.project={p}")])
            {
                for id in ids.lines() {
                    let _ = docker(&["rm", "-f", "-v", id]);
                }
            }
            let _ = docker(&["network", "rm", &format!("{p}-network")]);
            if let Ok(imgs) = docker(&[
                "images",
                "--format",
                "{{.Repository}}:{{.Tag}}",
                "--filter",
                &format!("reference={p}_*"),
            ]) {
                for i in imgs.lines() {
                    let _ = docker(&["rmi", "-f", i]);
                }
            }
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(p));
        }
        let _ = docker(&["rm", "-f", "-v", &self.proxy]);
        let _ = docker(&["rm", "-f", "-v", &format!("{}-replaced", self.proxy)]);
        let _ = docker(&["volume", "rm", &format!("{}-state", self.proxy)]);
    }
}

impl Http {
    /// Any method, optionally with `Connection: close`; returns (status, body).
    pub fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        body: &str,
        close: bool,
    ) -> Result<(u16, String), String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.addr)
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            s.set_nodelay(true).ok();
            self.conn = Some(BufReader::new(s));
        }
        let r = self.conn.as_mut().unwrap();
        let head = request_head(method, host, path, body, close);
        let res = exchange(r, &head);
        let res = res.map(|(status, body, server_closes)| {
            if server_closes {
                self.conn = None;
            }
            (status, body)
        });
        if close || res.is_err() {
            self.conn = None;
        }
        res
    }
}

/// An HTTP/1.1 request with `Host` and `Content-Length` (and `Connection: close` if `close`).
pub fn request_head(method: &str, host: &str, path: &str, body: &str, close: bool) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// Writes `head` on a connection and reads one response with a Content-Length body:
/// (status, body, whether the server closes the connection).
pub fn exchange<S: Read + Write>(
    r: &mut BufReader<S>,
    head: &str,
) -> Result<(u16, String, bool), String> {
    r.get_mut()
        .write_all(head.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut len = 0usize;
    let mut server_closes = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(|e| format!("read: {e}"))?;
        let h = h.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if h.starts_with("connection:") && h.contains("close") {
            server_closes = true;
        }
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)
        .map_err(|e| format!("read body: {e}"))?;
    Ok((
        status,
        String::from_utf8_lossy(&b).into_owned(),
        server_closes,
    ))
}

/// A finished `luma` run: exit code and both streams.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliLab {
    fn luma_command(&self, dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(luma_bin());
        c.arg("-c")
            .arg(dir.join("luma.yml"))
            .args(args)
            .env("LUMA_PROXY_NAME", &self.proxy)
            .env("LUMA_PROXY_IMAGE", proxy_image())
            .env("LUMA_HTTP_PORT", format!("127.0.0.1:{}", self.http_port))
            .env("LUMA_HTTPS_PORT", format!("127.0.0.1:{}", self.https_port))
            // The host's firewall is shared by every test and outlives them: only the tests of
            // the fast path (docker_netpool) turn it on, each for a pool and a proxy of its
            // own, and remove what they add.
            .env("LUMA_HOST_FAST_PATH", "off")
            .envs(env.iter().copied());
        c
    }

    /// Runs luma to the end and keeps its exit code.
    pub fn luma_run(&self, dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Run {
        let out = self
            .luma_command(dir, args, env)
            .output()
            .expect("run luma");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts luma with a failpoint paused (`LUMA_FAILPOINTS=<point>=pause`) and returns once
    /// it says it has reached it: the child, and its stderr so far.
    pub fn luma_paused_at(
        &self,
        dir: &std::path::Path,
        args: &[&str],
        point: &str,
    ) -> (LumaChild, String) {
        let spec = format!("{point}=pause");
        let marker = format!("failpoint {point}: paused");
        self.luma_until(dir, args, &[("LUMA_FAILPOINTS", spec.as_str())], &marker)
    }

    /// Starts luma and returns once a line of its stderr contains `marker` (at most 120 s):
    /// the child, and its stderr so far.
    pub fn luma_until(
        &self,
        dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
        marker: &str,
    ) -> (LumaChild, String) {
        let mut child = self
            .luma_command(dir, args, env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn luma");
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Reads all of stderr (so the child never blocks on a full pipe) and reports each line.
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in err.lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        let child = LumaChild {
            child,
            stderr: Some(reader),
        };
        let mut seen = String::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if line.contains(marker) {
                        return (child, seen);
                    }
                }
                // The child is killed when `child` drops.
                Err(e) => panic!("luma never printed {marker:?} ({e}):\n{seen}"),
            }
        }
    }
}

/// A running `luma`, killed if the test fails before it ends.
pub struct LumaChild {
    child: std::process::Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl LumaChild {
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LumaChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for a child started by [`CliLab::luma_until`]; returns its exit code (None when
/// killed by a signal) and its whole stderr.
pub fn finish(mut c: LumaChild) -> (Option<i32>, String) {
    let status = c.child.wait().expect("wait for luma");
    let all = c
        .stderr
        .take()
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    (status.code(), all)
}

/// Sends `signal` (e.g. "INT", "KILL") to a child and waits for it.
pub fn signal_and_wait(c: LumaChild, signal: &str) -> (Option<i32>, String) {
    let pid = c.id();
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} {pid} failed");
    finish(c)
}
