//! The multi-server topology of the SSH tests: two extra Docker engines on this machine, reached
//! over real sshd as `luma-s1` and `luma-s2`, and a docker-registry 2.8 with htpasswd auth.
//!
//! `tests/servers/up.sh DIR` starts it and writes `DIR/env`; `tests/run.sh` does that before
//! `cargo test` and exports the variables read here. Missing variables are a failure (panic),
//! never a skip. The servers start empty: a test (or `luma`) sends every image they need.
//!
//! Every object a test makes on a server carries the test's unique prefix; [`Servers`] helps
//! remove them on both engines. It talks to each engine straight through its unix socket, not
//! over ssh, so cleanup works even after a test killed the ssh sessions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// An `ssh_config` host that is server 1 with an empty known_hosts file: its key is unknown.
pub const UNKNOWN_HOST: &str = "luma-s1-unknown";
/// An `ssh_config` host that is server 1 with a different key on record: its key "changed".
pub const CHANGED_HOST: &str = "luma-s1-changed";

/// The running topology, from the `LUMA_TEST_*` environment of `DIR/env`.
#[derive(Clone, Debug)]
pub struct Servers {
    /// DIR given to up.sh.
    pub dir: PathBuf,
    /// `DIR/ssh_config`: give it to luma as `LUMA_SSH_CONFIG` (and to ssh as `-F`).
    pub ssh_config: PathBuf,
    /// The server names as written in luma.yml: `luma-s1`, `luma-s2`.
    pub names: Vec<String>,
    /// `127.0.0.1:PORT` of the registry (plain HTTP; engines allow it on loopback).
    pub registry: String,
    pub registry_user: String,
    pub registry_password: String,
    /// The client's private key (ed25519, no passphrase) and its known_hosts file, for tests
    /// that reach a server without the ssh_config (`ssh: {port, key}` in luma.yml).
    pub ssh_key: PathBuf,
    pub known_hosts: PathBuf,
    /// Luma's pool on these servers (`LUMA_TEST_NETWORK_POOL`): the upper half of the first
    /// engine's address pool, clear of the /24s the engines hand out themselves from the
    /// bottom. Give it to luma as `LUMA_NETWORK_POOL`, since only addresses inside an
    /// engine's pool pass the host's FORWARD chain.
    pub network_pool: String,
    docker_hosts: HashMap<String, String>,
    sshd_pids: HashMap<String, u32>,
    ssh_ports: HashMap<String, u16>,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the multi-server tests need the topology of tests/servers/up.sh. \
             Run tests/servers/up.sh DIR and `. DIR/env` first (tests/run.sh does)"
        )
    })
}

/// The env-var suffix of a server: `luma-s1` -> `luma_s1`.
fn key(server: &str) -> String {
    server.replace('-', "_")
}

impl Servers {
    /// Reads the topology from the environment; panics with what to run when it is missing.
    pub fn from_env() -> Servers {
        let dir = PathBuf::from(var("LUMA_TEST_TOPOLOGY"));
        let ssh_config = PathBuf::from(var("LUMA_TEST_SSH_CONFIG"));
        assert!(
            ssh_config.exists(),
            "{} is missing: the topology in {} is gone (run tests/servers/up.sh; tests/run.sh does)",
            ssh_config.display(),
            dir.display()
        );
        let names: Vec<String> = var("LUMA_TEST_SERVERS")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let mut docker_hosts = HashMap::new();
        let mut sshd_pids = HashMap::new();
        let mut ssh_ports = HashMap::new();
        for n in &names {
            let k = key(n);
            docker_hosts.insert(n.clone(), var(&format!("LUMA_TEST_DOCKER_HOST_{k}")));
            let pid = var(&format!("LUMA_TEST_SSHD_PID_{k}"));
            let pid = pid
                .parse()
                .unwrap_or_else(|_| panic!("bad sshd pid {pid:?}"));
            sshd_pids.insert(n.clone(), pid);
            let port = var(&format!("LUMA_TEST_SSH_PORT_{k}"));
            let port = port
                .parse()
                .unwrap_or_else(|_| panic!("bad ssh port {port:?}"));
            ssh_ports.insert(n.clone(), port);
        }
        Servers {
            dir,
            ssh_config,
            names,
            registry: var("LUMA_TEST_REGISTRY"),
            registry_user: var("LUMA_TEST_REGISTRY_USER"),
            registry_password: var("LUMA_TEST_REGISTRY_PASSWORD"),
            ssh_key: PathBuf::from(var("LUMA_TEST_SSH_KEY")),
            known_hosts: PathBuf::from(var("LUMA_TEST_KNOWN_HOSTS")),
            network_pool: var("LUMA_TEST_NETWORK_POOL"),
            docker_hosts,
            sshd_pids,
            ssh_ports,
        }
    }

    /// `unix://...` of a server's engine.
    pub fn docker_host(&self, server: &str) -> &str {
        self.docker_hosts
            .get(server)
            .unwrap_or_else(|| panic!("no test server {server:?} (have {:?})", self.names))
    }

    /// The sshd port of a server on 127.0.0.1.
    pub fn ssh_port(&self, server: &str) -> u16 {
        *self
            .ssh_ports
            .get(server)
            .unwrap_or_else(|| panic!("no test server {server:?} (have {:?})", self.names))
    }

    /// `docker -H <server's engine> ARGS`: trimmed stdout, or an error with stderr.
    pub fn docker_on(&self, server: &str, args: &[&str]) -> Result<String, String> {
        crate::docker_at(Some(self.docker_host(server)), args)
            .map_err(|e| format!("on {server}: {e}"))
    }

    /// Copies `image` from the main engine to a server (`docker save | docker load`), for tests
    /// that need an image there without going through luma.
    pub fn load_image(&self, server: &str, image: &str) -> Result<(), String> {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run docker save: {e}"))?;
        let load = match save.stdout.take() {
            Some(stdout) => Command::new("docker")
                .arg("-H")
                .arg(self.docker_host(server))
                .args(["load", "-q"])
                .stdin(stdout)
                .output()
                .map_err(|e| format!("cannot run docker load: {e}")),
            None => Err("docker save: no stdout".to_string()),
        };
        if load.is_err() {
            let _ = save.kill();
        }
        let saved = save.wait().map_err(|e| format!("docker save: {e}"))?;
        let load = load?;
        if saved.success() && load.status.success() {
            Ok(())
        } else {
            Err(format!(
                "copying {image} to {server} failed: {}",
                String::from_utf8_lossy(&load.stderr).trim()
            ))
        }
    }

    /// Kills a server's ssh sessions (the listening sshd's per-connection children), as a
    /// dropped network would; the server keeps accepting new connections. Returns whether
    /// there was a session to kill.
    pub fn kill_ssh_sessions(&self, server: &str) -> bool {
        let pid = *self
            .sshd_pids
            .get(server)
            .unwrap_or_else(|| panic!("no test server {server:?} (have {:?})", self.names));
        Command::new("pkill")
            .arg("-KILL")
            .arg("-P")
            .arg(pid.to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or_else(|e| panic!("cannot run pkill: {e}"))
    }

    /// Removes on every server what luma made for `project`: its containers (label
    /// `luma.project`), its `<project>-network` and its images `<project>_*` (also tagged under
    /// a registry). Best effort: meant for Drop guards.
    pub fn cleanup_project(&self, project: &str) {
        for s in &self.names {
            if let Ok(ids) = self.docker_on(
                s,
                &[
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=luma.project={project}"),
                ],
            ) {
                for id in ids.lines() {
                    let _ = self.docker_on(s, &["rm", "-f", "-v", id]);
                }
            }
            let _ = self.docker_on(s, &["network", "rm", &format!("{project}-network")]);
            for pattern in [format!("{project}_*"), format!("*/{project}_*")] {
                if let Ok(images) = self.docker_on(
                    s,
                    &[
                        "images",
                        "--format",
                        "{{.Repository}}:{{.Tag}}",
                        "--filter",
                        &format!("reference={pattern}"),
                    ],
                ) {
                    for i in images.lines() {
                        let _ = self.docker_on(s, &["rmi", "-f", i]);
                    }
                }
            }
        }
    }

    /// Removes a proxy container called `name` (and `<name>-replaced`) with its `<name>-state`
    /// volume on every server. Best effort: meant for Drop guards.
    pub fn remove_proxy(&self, name: &str) {
        for s in &self.names {
            let _ = self.docker_on(s, &["rm", "-f", "-v", name]);
            let _ = self.docker_on(s, &["rm", "-f", "-v", &format!("{name}-replaced")]);
            let _ = self.docker_on(s, &["volume", "rm", &format!("{name}-state")]);
        }
    }
}
