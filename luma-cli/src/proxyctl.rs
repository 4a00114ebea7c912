//! The proxy's lifecycle on an engine, and the bridge to its admin API.
//!
//! The proxy container runs `luma-proxy serve` with a state volume, a restart policy and ports
//! 80 and 443 published (`LUMA_HTTP_PORT`/`LUMA_HTTPS_PORT` override them, e.g.
//! `127.0.0.1:18080`). Its settings travel in its environment when it is created: trusted
//! proxies, the ACME settings the project asked for (`proxy.acme` in luma.yml, or
//! `LUMA_ACME_*`), and the public HTTPS port its redirects name. A running proxy that differs
//! from what a run asks for is reported as drift with the command that applies it
//! (`luma proxy update`); nothing replaces it behind the user's back. Luma talks to it through `luma-api` types only: one typed request on the
//! stdin of `docker exec -i <proxy> luma-proxy call`, one typed reply back, so the proxy never
//! needs docker.sock and no argv is built by hand.

use crate::config::{self, AcmeConfig};
use crate::engine::{ContainerSpec, Engine};
use crate::names;
use luma_api::{
    ApiError, CallError, CertificatesReply, CertificatesRequest, Envelope, ErrorKind, Operation,
    RouteQuery, RouteState, RoutesReply, RoutesRequest,
};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub container: String,
    pub image: String,
    pub http: (Option<String>, u16),
    pub https: (Option<String>, u16),
    /// CIDRs whose forwarded headers the proxy believes (`LUMA_TRUSTED_PROXIES`, passed to
    /// the proxy as `LUMA_PROXY_TRUSTED_PROXIES`); empty: edge mode. As set, trimmed:
    /// [`ProxySettings::check`] parses it.
    pub trusted_proxies: String,
    pub acme: AcmeSettings,
}

/// A setting the project asked for explicitly, and where it was asked (for drift reports).
#[derive(Clone, Debug, PartialEq)]
pub struct Asked {
    pub value: String,
    pub from: String,
}

/// The ACME settings passed to the proxy; `None`: the proxy's own default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AcmeSettings {
    /// `LUMA_PROXY_ACME_DIRECTORY`.
    pub directory: Option<Asked>,
    /// `LUMA_PROXY_ACME_EMAIL`.
    pub email: Option<Asked>,
    /// `LUMA_PROXY_ACME_CA_ROOT_PEM`: the PEM text (the file is on this machine, not in the
    /// proxy's container).
    pub ca_root_pem: Option<Asked>,
}

const ACME_DIRECTORY_ENV: &str = "LUMA_PROXY_ACME_DIRECTORY";
const ACME_EMAIL_ENV: &str = "LUMA_PROXY_ACME_EMAIL";
const ACME_CA_ROOT_ENV: &str = "LUMA_PROXY_ACME_CA_ROOT_PEM";
const HTTPS_PUBLIC_PORT_ENV: &str = "LUMA_PROXY_HTTPS_PUBLIC_PORT";
/// The proxy's default directory (Let's Encrypt production), what an unset one means.
const DEFAULT_ACME_DIRECTORY: &str = luma_api::tls::LETS_ENCRYPT_DIRECTORY;

impl AcmeSettings {
    /// `proxy.acme` from luma.yml (`file`), each key overridden by its `LUMA_ACME_*` variable
    /// (`LUMA_ACME_CA_ROOT` is a path relative to the working directory). An empty variable
    /// counts as unset.
    pub fn resolve(cfg: &AcmeConfig, file: &str) -> Result<AcmeSettings, String> {
        let env = |var: &str| {
            std::env::var(var)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let from_env = |var: &str, value: String| Asked {
            value,
            from: var.to_string(),
        };
        let from_file = |key: &str, value: String| Asked {
            value,
            from: format!("proxy.acme.{key} in {file}"),
        };
        let directory = match env("LUMA_ACME_DIRECTORY") {
            Some(v) => {
                config::check_acme_directory(&v)
                    .map_err(|e| format!("LUMA_ACME_DIRECTORY: {e}"))?;
                Some(from_env("LUMA_ACME_DIRECTORY", v))
            }
            None => cfg.directory.clone().map(|v| from_file("directory", v)),
        };
        let email = match env("LUMA_ACME_EMAIL") {
            Some(v) => {
                let v = config::acme_email(&v).map_err(|e| format!("LUMA_ACME_EMAIL: {e}"))?;
                Some(from_env("LUMA_ACME_EMAIL", v))
            }
            None => cfg.email.clone().map(|v| from_file("email", v)),
        };
        let ca_root_pem = match env("LUMA_ACME_CA_ROOT") {
            Some(v) => {
                let root = config::read_ca_root(std::path::Path::new(&v))
                    .map_err(|e| format!("LUMA_ACME_CA_ROOT={v:?}: {e}"))?;
                Some(from_env("LUMA_ACME_CA_ROOT", root.pem))
            }
            None => cfg.ca_root.clone().map(|r| Asked {
                value: r.pem,
                from: format!("proxy.acme.ca_root ({}) in {file}", r.path.display()),
            }),
        };
        Ok(AcmeSettings {
            directory,
            email,
            ca_root_pem,
        })
    }

    fn env(&self) -> Vec<String> {
        [
            (ACME_DIRECTORY_ENV, &self.directory),
            (ACME_EMAIL_ENV, &self.email),
            (ACME_CA_ROOT_ENV, &self.ca_root_pem),
        ]
        .into_iter()
        .filter_map(|(var, asked)| Some(format!("{var}={}", asked.as_ref()?.value)))
        .collect()
    }
}

fn port_env(var: &str, default: u16) -> Result<(Option<String>, u16), String> {
    let Ok(v) = std::env::var(var) else {
        return Ok((None, default));
    };
    let (ip, port) = match v.rsplit_once(':') {
        Some((ip, p)) => (Some(ip.to_string()), p),
        None => (None, v.as_str()),
    };
    let port: u16 = port.parse().map_err(|_| {
        format!("{var}={v:?}: expected PORT or IP:PORT, e.g. 8080 or 127.0.0.1:8080")
    })?;
    Ok((ip, port))
}

impl ProxySettings {
    /// From the config's `proxy.image` and `proxy.acme`, and the environment.
    pub fn resolve(cfg: &crate::config::Config) -> Result<ProxySettings, String> {
        let config_image = cfg.proxy_image.as_deref();
        let file = cfg.path.display().to_string();
        Ok(ProxySettings {
            container: std::env::var("LUMA_PROXY_NAME").unwrap_or_else(|_| "luma-proxy".into()),
            image: std::env::var("LUMA_PROXY_IMAGE")
                .ok()
                .or_else(|| config_image.map(str::to_string))
                .unwrap_or_else(|| "luma-proxy:dev".into()),
            http: port_env("LUMA_HTTP_PORT", 80)?,
            https: port_env("LUMA_HTTPS_PORT", 443)?,
            trusted_proxies: std::env::var(TRUSTED_PROXIES_VAR)
                .unwrap_or_default()
                .trim()
                .to_string(),
            acme: AcmeSettings::resolve(&cfg.acme, &file)?,
        })
    }

    /// The settings only a proxy that luma creates uses, checked. Commands that start or
    /// replace the proxy call this before they change anything; the others (status, logs,
    /// rollback) work whatever these say, so a bad one does not lock the user out of looking.
    pub fn check(&self) -> Result<(), String> {
        check_trusted_proxies(&self.trusted_proxies)
    }

    /// The proxy's container. `rotate_logs`: the daemon logs to json-file, which keeps every
    /// line forever unless told otherwise, and the proxy writes one access-log line per request.
    fn spec(&self, rotate_logs: bool) -> ContainerSpec {
        let json_log_opts = if rotate_logs {
            HashMap::from([
                ("max-size".to_string(), PROXY_LOG_MAX_SIZE.to_string()),
                ("max-file".to_string(), PROXY_LOG_MAX_FILES.to_string()),
            ])
        } else {
            HashMap::new()
        };
        ContainerSpec {
            name: self.container.clone(),
            image: self.image.clone(),
            cmd: Some(vec!["serve".into()]),
            env: self.env(),
            labels: HashMap::from([(names::LABEL_ROLE.to_string(), names::ROLE_PROXY.to_string())]),
            ports: vec![
                (self.http.0.clone(), self.http.1, "8080/tcp".into()),
                (self.https.0.clone(), self.https.1, "8443/tcp".into()),
            ],
            binds: vec![format!(
                "{}:/var/lib/luma-proxy",
                names::proxy_volume(&self.container)
            )],
            restart_unless_stopped: true,
            json_log_opts,
            ..Default::default()
        }
    }

    /// The proxy container's environment: every setting this run asks for.
    fn env(&self) -> Vec<String> {
        let mut env = Vec::new();
        if !self.trusted_proxies.is_empty() {
            env.push(format!("{TRUSTED_ENV}={}", self.trusted_proxies));
        }
        env.extend(self.acme.env());
        if let Some(port) = self.https_public_port() {
            env.push(format!("{HTTPS_PUBLIC_PORT_ENV}={port}"));
        }
        env
    }

    /// The published HTTPS port when it is not 443, which the proxy's redirects must name.
    /// (Port 0, any free port, is unknown until the proxy runs: redirects then name none.)
    pub fn https_public_port(&self) -> Option<u16> {
        (self.https.1 != 443 && self.https.1 != 0).then_some(self.https.1)
    }
}

/// The proxy's log files under the json-file driver: at most 5 x 20 MB, the oldest dropped
/// first. `docker logs` reads across them.
const PROXY_LOG_MAX_SIZE: &str = "20m";
const PROXY_LOG_MAX_FILES: &str = "5";

/// Where luma reads the proxy's trusted proxies from.
const TRUSTED_PROXIES_VAR: &str = "LUMA_TRUSTED_PROXIES";

/// `LUMA_TRUSTED_PROXIES`, checked with the proxy's own parser: a bad list would otherwise
/// reach the proxy only as a container that exits at start.
fn check_trusted_proxies(v: &str) -> Result<(), String> {
    luma_api::net::TrustedProxies::parse(v).map(|_| ()).map_err(|e| {
        format!("{TRUSTED_PROXIES_VAR}: {e}; set it to the CIDRs of the load balancers in front of the proxy, comma-separated (e.g. 10.0.0.0/8,192.0.2.7), or leave it empty")
    })
}

/// The proxy's setting for `--trusted-proxies`.
const TRUSTED_ENV: &str = "LUMA_PROXY_TRUSTED_PROXIES";

/// The proxy's Dockerfile, shared with `docker/build-images.sh`.
const PROXY_DOCKERFILE: &str = include_str!("../../docker/luma-proxy.Dockerfile");

/// Makes sure the proxy image is on the engine without a registry: it is there already, or it
/// is built on the engine from a statically linked `luma-proxy` binary (`LUMA_PROXY_BINARY`, or
/// the one installed beside `luma`).
pub async fn ensure_image(engine: &Engine, s: &ProxySettings) -> Result<(), String> {
    if engine.image_exists(&s.image).await? {
        return Ok(());
    }
    let binary = std::env::var_os("LUMA_PROXY_BINARY")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()?
                .parent()
                .map(|d| d.join("luma-proxy"))
        })
        .filter(|p| p.is_file());
    let Some(binary) = binary else {
        return Err(format!(
            "the proxy image {} is not on this engine and no registry is used; build it with `docker/build-images.sh`, put a static `luma-proxy` beside `luma` (or set LUMA_PROXY_BINARY), or set proxy.image / LUMA_PROXY_IMAGE",
            s.image
        ));
    };
    let bytes = std::fs::read(&binary).map_err(|e| format!("read {}: {e}", binary.display()))?;
    if !is_static_elf(&bytes) {
        return Err(format!(
            "{} is not a statically linked Linux binary, so it cannot run in the FROM-scratch proxy image; build one with docker/build-images.sh",
            binary.display()
        ));
    }
    let context = proxy_context(&bytes).map_err(|e| format!("proxy build context: {e}"))?;
    let spec = crate::engine::BuildSpec {
        tag: s.image.clone(),
        dockerfile: "Dockerfile".into(),
        args: HashMap::new(),
        target: None,
        platform: None,
        labels: HashMap::from([(names::LABEL_ROLE.to_string(), names::ROLE_PROXY.to_string())]),
    };
    engine.build(context, &spec, |_| {}).await
}

/// A tar with the Dockerfile, the binary and the empty state directory.
fn proxy_context(binary: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, data: &[u8], kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, path, data)
    };
    add(
        "Dockerfile",
        0o644,
        PROXY_DOCKERFILE.as_bytes(),
        tar::EntryType::Regular,
    )?;
    add("luma-proxy", 0o755, binary, tar::EntryType::Regular)?;
    add("state/", 0o755, &[], tar::EntryType::Directory)?;
    tar.into_inner()
}

/// An x86-64/aarch64 ELF executable with no program interpreter (`PT_INTERP`) is static.
pub fn is_static_elf(b: &[u8]) -> bool {
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| u32_at(phoff as usize + i * phentsize) != Some(3))
}

/// Starts the proxy if it is missing or stopped, then waits for its admin API. A newly created
/// proxy joins `networks` before it starts, so restored routes resolve from the first second.
pub async fn ensure_running(
    engine: &Engine,
    s: &ProxySettings,
    networks: &[String],
) -> Result<(), String> {
    s.check()?;
    ensure_image(engine, s).await?;
    match engine.inspect(&s.container).await? {
        Some(c)
            if c.state
                .as_ref()
                .and_then(|st| st.restarting)
                .unwrap_or(false) =>
        {
            // A proxy in a crash loop: waiting says why it exits (its last words).
        }
        Some(c) if c.state.as_ref().and_then(|st| st.running).unwrap_or(false) => return Ok(()),
        Some(_) => engine.start(&s.container).await?,
        None => {
            engine
                .create_volume(
                    &names::proxy_volume(&s.container),
                    HashMap::from([(names::LABEL_ROLE.to_string(), names::ROLE_PROXY.to_string())]),
                )
                .await?;
            check_ports_free(engine, &[s.http.1, s.https.1], &s.container).await?;
            // Another project's deploy may create it at the same moment: either way one proxy
            // exists afterwards, and starting a running container is a no-op.
            // Not knowing the driver (an engine that hides /info) only costs the rotation.
            let rotate_logs = engine
                .default_log_driver()
                .await
                .is_ok_and(|d| d == "json-file");
            if engine.create(&s.spec(rotate_logs)).await? {
                for n in networks {
                    engine.connect_network(n, &s.container, Vec::new()).await?;
                }
                engine.start(&s.container).await?;
            } else {
                // The other creator may still be between reserving the name and finishing.
                let started = tokio::time::Instant::now();
                while let Err(e) = engine.start(&s.container).await {
                    if started.elapsed() > Duration::from_secs(10) {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    wait_ready(engine, s).await
}

pub async fn wait_ready(engine: &Engine, s: &ProxySettings) -> Result<(), String> {
    use crate::proxystart::{exit, Baseline, Seen};
    let started = tokio::time::Instant::now();
    let base = Baseline::of(engine.inspect(&s.container).await.ok().flatten().as_ref());
    loop {
        let e = match ask(engine, s, luma_api::StatusRequest {}).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let late = started.elapsed() > READY_WITHIN;
        // At the deadline the state alone decides: a crash loop found in a long back-off (it
        // doubles up to 60 s) restarts no more within the wait, but still shows how it ended.
        let against = if late { Baseline::UNKNOWN } else { base };
        // Not inspectable: the admin call's error says what is wrong, at the deadline.
        let seen = engine.inspect(&s.container).await.ok().flatten();
        if let Some(how) = seen.and_then(|c| exit(against, &Seen::of(&c))) {
            // Docker restarts it with the settings it was created with: fixing the cause
            // takes a new container, which is what `proxy update` makes.
            return Err(format!(
                "the proxy {} exited at start ({how}){}\nonce the cause is fixed, `luma proxy update` replaces it",
                s.container,
                last_words(engine, s).await
            ));
        }
        if late {
            return Err(format!(
                "the proxy {} did not become ready in {} s: {e}{}",
                s.container,
                READY_WITHIN.as_secs(),
                last_words(engine, s).await
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A proxy from before luma rotated its logs: json-file with no size limit. (Docker merges the
/// engine's default log options into a container's log config when it creates it, so an
/// engine-wide `max-size` shows here too.)
fn unbounded_logs(log: Option<&bollard::models::HostConfigLogConfig>) -> bool {
    log.is_some_and(|l| {
        l.typ.as_deref() == Some("json-file")
            && !l
                .config
                .as_ref()
                .is_some_and(|o| o.contains_key("max-size"))
    })
}

/// How long a started proxy has to answer its admin API.
const READY_WITHIN: Duration = Duration::from_secs(15);

/// The proxy's last lines on stderr, to put its own reason beside ours: its diagnostics and the
/// errors of its argument parser. Never its stdout, the access log, whose lines carry users'
/// URLs and addresses.
async fn last_words(engine: &Engine, s: &ProxySettings) -> String {
    match engine.stderr_tail(&s.container, 20).await {
        Ok(t) if !t.trim().is_empty() => format!(
            "; its last lines on stderr:\n{}\n(more: docker logs {})",
            t.trim_end(),
            s.container
        ),
        _ => format!("; see docker logs {}", s.container),
    }
}

/// Connects the proxy to a project network (no-op if already attached).
pub async fn attach(engine: &Engine, s: &ProxySettings, network: &str) -> Result<(), String> {
    let c = engine
        .inspect(&s.container)
        .await?
        .ok_or_else(|| format!("proxy {} is not running", s.container))?;
    if crate::engine::ip_on(&c, network).is_some() {
        return Ok(());
    }
    engine
        .connect_network(network, &s.container, Vec::new())
        .await
}

/// One typed admin operation, through `docker exec -i <proxy> luma-proxy call` with the
/// request as JSON on stdin. A reply the proxy gave is `Ok` or `Refused` (nothing changed);
/// anything else (the exec failed or died, the output cannot be read, the proxy timed out
/// waiting for itself) is `Unknown`, and the caller must ask the proxy what is live.
pub async fn call<O: Operation>(
    engine: &Engine,
    s: &ProxySettings,
    op: O,
) -> Result<O::Reply, CallError> {
    let request: luma_api::Request = op.into();
    let input = serde_json::to_vec(&request)
        .map_err(|e| CallError::Refused(ApiError::new(ErrorKind::Invalid, e.to_string())))?;
    let ran = tokio::time::timeout(
        request.reply_within() + Duration::from_secs(15),
        engine.exec_with_stdin(&s.container, &["luma-proxy", "call"], Some(&input)),
    )
    .await;
    let (code, out, err) = match ran {
        Err(_) => {
            return Err(CallError::Unknown(format!(
                "no reply from {} in time",
                s.container
            )))
        }
        Ok(Err(e)) => return Err(CallError::Unknown(e)),
        Ok(Ok(r)) => r,
    };
    match serde_json::from_str::<Envelope<O::Reply>>(out.trim()) {
        Ok(envelope) => Result::from(envelope).map_err(CallError::from),
        Err(_) => Err(CallError::Unknown(format!(
            "unreadable reply from {} (exit {code}): {}{}",
            s.container,
            out.trim(),
            err.trim()
        ))),
    }
}

/// Like [`call`], for reads and for callers to whom "unknown" and "refused" are both a plain
/// failure.
pub async fn ask<O: Operation>(
    engine: &Engine,
    s: &ProxySettings,
    op: O,
) -> Result<O::Reply, String> {
    call(engine, s, op).await.map_err(|e| e.to_string())
}

/// The proxy's routes (with per-backend health).
pub async fn routes(engine: &Engine, s: &ProxySettings) -> Result<RoutesReply, String> {
    ask(engine, s, RoutesRequest {}).await
}

/// The certificate state of hosts (see [`CertificatesRequest`]).
pub async fn certificates(
    engine: &Engine,
    s: &ProxySettings,
    req: CertificatesRequest,
) -> Result<CertificatesReply, String> {
    ask(engine, s, req).await
}

/// What is live for one route, once no operation on it is running in the proxy: the truth a
/// deploy continues from when a switch's outcome is unknown.
pub async fn settled(
    engine: &Engine,
    s: &ProxySettings,
    project: &str,
    app: &str,
) -> Result<Option<RouteState>, String> {
    let q = RouteQuery {
        project: project.into(),
        app: app.into(),
    };
    Ok(ask(engine, s, q).await?.route)
}

/// How the running proxy differs from what this run asks for (image, published ports), each
/// with the command that applies it. Empty when they match or no proxy runs.
pub async fn drift(engine: &Engine, s: &ProxySettings) -> Result<Vec<String>, String> {
    let Some(c) = engine.inspect(&s.container).await? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let apply = "run `luma proxy update` to apply it (routes and certificates are kept)";
    let running_image = c.image.clone().unwrap_or_default();
    if let Some(wanted) = engine.image_id(&s.image).await? {
        if wanted != running_image {
            out.push(format!(
                "the running proxy {} was started from another image than {} ({}); {apply}",
                s.container,
                s.image,
                short_id(&wanted)
            ));
        }
    }
    let running_env = |var: &str| {
        c.config
            .as_ref()
            .and_then(|c| c.env.as_ref())
            .and_then(|env| {
                env.iter()
                    .find_map(|e| e.strip_prefix(var)?.strip_prefix('=').map(str::to_string))
            })
    };
    let running_trust = running_env(TRUSTED_ENV).unwrap_or_default();
    if running_trust != s.trusted_proxies {
        let shown = |v: &str| {
            if v.is_empty() {
                "no proxies (edge mode)".to_string()
            } else {
                v.to_string()
            }
        };
        out.push(format!(
            "the running proxy {} trusts {}, not {} as asked (LUMA_TRUSTED_PROXIES); {apply}",
            s.container,
            shown(&running_trust),
            shown(&s.trusted_proxies)
        ));
    }
    out.extend(acme_drift(&s.container, &s.acme, running_env, apply));
    let running_public = running_env(HTTPS_PUBLIC_PORT_ENV);
    let wanted_public = s.https_public_port().map(|p| p.to_string());
    if running_public != wanted_public {
        out.push(format!(
            "the running proxy {} redirects to https on port {}, not {} as asked (LUMA_HTTPS_PORT); {apply}",
            s.container,
            running_public.as_deref().unwrap_or("443"),
            wanted_public.as_deref().unwrap_or("443")
        ));
    }
    let bindings = c
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.clone())
        .unwrap_or_default();
    for (cport, (ip, port), var) in [
        ("8080/tcp", &s.http, "LUMA_HTTP_PORT"),
        ("8443/tcp", &s.https, "LUMA_HTTPS_PORT"),
    ] {
        let have: Vec<(String, String)> = bindings
            .get(cport)
            .cloned()
            .flatten()
            .unwrap_or_default()
            .into_iter()
            .map(|b| {
                (
                    b.host_ip.unwrap_or_default(),
                    b.host_port.unwrap_or_default(),
                )
            })
            .collect();
        let want_ip = ip.clone().unwrap_or_default();
        // Port 0 asks for any free port, so any port the engine picked matches.
        let same = have.iter().any(|(hip, hport)| {
            (*port == 0 || *hport == port.to_string())
                && (hip == &want_ip || (want_ip.is_empty() && hip == "0.0.0.0"))
        });
        if !same {
            let shown = have
                .iter()
                .map(|(i, p)| {
                    if i.is_empty() {
                        p.clone()
                    } else {
                        format!("{i}:{p}")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            let want = if want_ip.is_empty() {
                port.to_string()
            } else {
                format!("{want_ip}:{port}")
            };
            out.push(format!(
                "the running proxy {} publishes container port {cport} on {}, not on {want} as asked ({var}); {apply}",
                s.container,
                if shown.is_empty() { "nothing".into() } else { shown }
            ));
        }
    }
    // Only where luma would rotate them (an engine that hides /info gets no rotation, so no
    // promise that `luma proxy update` brings it).
    if unbounded_logs(c.host_config.as_ref().and_then(|h| h.log_config.as_ref()))
        && engine
            .default_log_driver()
            .await
            .is_ok_and(|d| d == "json-file")
    {
        out.push(format!(
            "the running proxy {} keeps its logs without a size limit (json-file, no max-size): it writes a line per request; `luma proxy update` recreates it with rotated logs (routes and certificates are kept)",
            s.container
        ));
    }
    Ok(out)
}

/// ACME settings the project asked for explicitly that the running proxy does not have
/// (`running_env` reads its environment). Unasked settings are never drift.
fn acme_drift(
    container: &str,
    want: &AcmeSettings,
    running_env: impl Fn(&str) -> Option<String>,
    apply: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(d) = &want.directory {
        let have = running_env(ACME_DIRECTORY_ENV);
        if have.as_deref().unwrap_or(DEFAULT_ACME_DIRECTORY) != d.value {
            out.push(format!(
                "the running proxy {container} orders certificates from {}, not from {} as asked ({}); {apply}",
                have.unwrap_or_else(|| format!("its default directory {DEFAULT_ACME_DIRECTORY}")),
                d.value,
                d.from
            ));
        }
    }
    if let Some(e) = &want.email {
        let have = running_env(ACME_EMAIL_ENV);
        if have.as_deref() != Some(e.value.as_str()) {
            out.push(format!(
                "the running proxy {container} registers ACME contact {}, not {} as asked ({}); {apply}",
                have.as_deref().unwrap_or("none"),
                e.value,
                e.from
            ));
        }
    }
    if let Some(r) = &want.ca_root_pem {
        let have = running_env(ACME_CA_ROOT_ENV);
        if have.as_deref().map(str::trim) != Some(r.value.trim()) {
            out.push(format!(
                "the running proxy {container} trusts {} for the ACME directory, not the CA root of {}; {apply}",
                if have.is_some() {
                    "another extra CA root"
                } else {
                    "no extra CA root"
                },
                r.from
            ));
        }
    }
    out
}

fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

/// The proxy's two listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
    fn container_port(self) -> &'static str {
        match self {
            Scheme::Http => "8080/tcp",
            Scheme::Https => "8443/tcp",
        }
    }
    fn default_port(self) -> &'static str {
        match self {
            Scheme::Http => "80",
            Scheme::Https => "443",
        }
    }
}

/// Where the running proxy really answers `scheme` (from its live port bindings), e.g.
/// `http://127.0.0.1:8080`; on a remote server bound to every address, the server's host.
pub async fn published(
    engine: &Engine,
    s: &ProxySettings,
    scheme: Scheme,
) -> Result<Option<String>, String> {
    let Some(c) = engine.inspect(&s.container).await? else {
        return Ok(None);
    };
    let ports = c
        .network_settings
        .and_then(|n| n.ports)
        .and_then(|p| p.get(scheme.container_port()).cloned().flatten())
        .unwrap_or_default();
    Ok(ports.into_iter().find_map(|b| {
        let port = b.host_port?;
        let ip = match b.host_ip.as_deref() {
            // Every address of the server: this machine's, or the server's ssh host.
            None | Some("") | Some("0.0.0.0") => match engine.server() {
                crate::config::LOCAL => "localhost".to_string(),
                server => server.rsplit('@').next().unwrap_or(server).to_string(),
            },
            Some(ip) if ip.contains(':') => return None,
            Some(ip) => ip.to_string(),
        };
        let name = scheme.name();
        Some(if port == scheme.default_port() {
            format!("{name}://{ip}")
        } else {
            format!("{name}://{ip}:{port}")
        })
    }))
}

/// Asks `base` (the proxy's published address, `http://` or `https://`) for `/` with
/// `Host: host` (and, over TLS, SNI `host`); the HTTP status when the app answered, or why
/// not. Over TLS the certificate is not verified here: the proxy reported it issued, and this
/// only shows that the app answers through the HTTPS listener.
pub async fn probe(base: &str, host: &str) -> Result<u16, String> {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    let (tls, authority) = match base.strip_prefix("https://") {
        Some(a) => (true, a),
        None => (false, base.trim_start_matches("http://")),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    async fn ask<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        host: &str,
        addr: &str,
    ) -> Result<u16, String> {
        stream
            .write_all(
                format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: luma\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 512];
        let mut got = 0;
        while got < buf.len() {
            let n = match stream.read(&mut buf[got..]).await {
                Ok(n) => n,
                // A TLS peer that closes without close_notify after a complete answer.
                Err(_) if got > 0 => 0,
                Err(e) => return Err(e.to_string()),
            };
            if n == 0 {
                break;
            }
            got += n;
        }
        let text = String::from_utf8_lossy(&buf[..got]);
        let code: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no HTTP answer from {addr}"))?;
        if text.contains("no route for this host") {
            return Err(format!("the proxy at {addr} has no route for {host}"));
        }
        Ok(code)
    }
    let work = async {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        if !tls {
            return ask(stream, host, &addr).await;
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| format!("{host} is not a name to send as TLS SNI"))?;
        let stream = tokio_rustls::TlsConnector::from(probe_tls_config()?)
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake with {addr} for {host} failed: {e}"))?;
        ask(stream, host, &addr).await
    };
    tokio::time::timeout(Duration::from_secs(3), work)
        .await
        .map_err(|_| format!("{addr} did not answer within 3 s"))?
}

/// A TLS client for [`probe`]: HTTP/1.1, any server certificate (the handshake signatures are
/// still checked).
fn probe_tls_config() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Fails with the name of the container holding any of these host ports.
pub async fn check_ports_free(engine: &Engine, ports: &[u16], except: &str) -> Result<(), String> {
    for c in engine.running_containers().await? {
        let name = crate::engine::name_of(&c);
        if name == except {
            continue;
        }
        for p in c.ports.iter().flatten() {
            if let Some(public) = p.public_port {
                if public != 0 && ports.contains(&public) {
                    return Err(format!(
                        "host port {public} is already published by container {name}; stop it, or pick another port"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_are_checked_with_the_proxys_parser() {
        assert!(check_trusted_proxies("").is_ok());
        assert!(check_trusted_proxies("10.0.0.0/8, 192.0.2.7").is_ok());
        let e = check_trusted_proxies("10.0.0.1/8").unwrap_err();
        assert!(
            e.contains("LUMA_TRUSTED_PROXIES") && e.contains("10.0.0.0/8"),
            "{e}"
        );
    }

    #[test]
    fn a_proxy_without_a_log_size_limit_is_noticed() {
        use bollard::models::HostConfigLogConfig;
        let log = |typ: &str, opts: &[(&str, &str)]| HostConfigLogConfig {
            typ: Some(typ.into()),
            config: Some(
                opts.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        };
        assert!(unbounded_logs(Some(&log("json-file", &[]))));
        assert!(unbounded_logs(Some(&log(
            "json-file",
            &[("max-file", "3")]
        ))));
        assert!(!unbounded_logs(Some(&log(
            "json-file",
            &[("max-size", "20m")]
        ))));
        assert!(!unbounded_logs(Some(&log("journald", &[]))));
        assert!(!unbounded_logs(Some(&log("local", &[]))));
        assert!(!unbounded_logs(None));
    }

    fn asked(v: &str) -> Option<Asked> {
        Some(Asked {
            value: v.into(),
            from: "proxy.acme in luma.yml".into(),
        })
    }

    #[test]
    fn acme_drift_is_only_about_what_was_asked() {
        let running = |env: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                env.iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| v.to_string())
            }
        };
        let apply = "run `luma proxy update`";
        assert!(acme_drift("p", &AcmeSettings::default(), running(&[]), apply).is_empty());
        // The default directory, asked explicitly, is what a proxy without the variable uses.
        let le = AcmeSettings {
            directory: asked(DEFAULT_ACME_DIRECTORY),
            ..Default::default()
        };
        assert!(acme_drift("p", &le, running(&[]), apply).is_empty());
        let want = AcmeSettings {
            directory: asked("https://pebble:14000/dir"),
            email: asked("ops@shop.test"),
            ca_root_pem: asked("-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n"),
        };
        let d = acme_drift("p", &want, running(&[]), apply);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d[0].contains("its default directory")
                && d[0].contains("https://pebble:14000/dir")
                && d[0].contains("luma proxy update")
        );
        assert!(d[1].contains("contact none, not ops@shop.test"));
        assert!(d[2].contains("no extra CA root"));
        let same = acme_drift(
            "p",
            &want,
            running(&[
                (ACME_DIRECTORY_ENV, "https://pebble:14000/dir"),
                (ACME_EMAIL_ENV, "ops@shop.test"),
                (
                    ACME_CA_ROOT_ENV,
                    "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----",
                ),
            ]),
            apply,
        );
        assert!(same.is_empty(), "{same:?}");
        let other_root = acme_drift(
            "p",
            &want,
            running(&[
                (ACME_DIRECTORY_ENV, "https://pebble:14000/dir"),
                (ACME_EMAIL_ENV, "ops@shop.test"),
                (
                    ACME_CA_ROOT_ENV,
                    "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----",
                ),
            ]),
            apply,
        );
        assert_eq!(other_root.len(), 1);
        assert!(other_root[0].contains("another extra CA root"));
    }

    #[test]
    fn the_proxy_gets_acme_settings_and_the_public_https_port_in_its_env() {
        let dir = std::env::temp_dir().join(format!("luma-proxyenv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = crate::tls::test_root_pem();
        std::fs::write(dir.join("root.pem"), &root).unwrap();
        let cfg = crate::config::Config::parse(
            "name: shop\nproxy: {acme: {directory: \"https://ca.test/dir\", email: a@shop.test}}\napps: {web: {image: x}}\n",
            &dir.join("luma.yml"),
        )
        .map_err(|e| e.0)
        .unwrap();
        // The only test that sets these variables.
        std::env::set_var("LUMA_ACME_EMAIL", "mailto:env@shop.test");
        std::env::set_var("LUMA_ACME_CA_ROOT", dir.join("root.pem"));
        std::env::set_var("LUMA_HTTPS_PORT", "127.0.0.1:18443");
        let s = ProxySettings::resolve(&cfg);
        std::env::set_var("LUMA_ACME_CA_ROOT", dir.join("missing.pem"));
        let missing = ProxySettings::resolve(&cfg).unwrap_err();
        std::env::set_var("LUMA_ACME_EMAIL", "not-an-address");
        let bad_email = AcmeSettings::resolve(&cfg.acme, "luma.yml").unwrap_err();
        for v in ["LUMA_ACME_EMAIL", "LUMA_ACME_CA_ROOT", "LUMA_HTTPS_PORT"] {
            std::env::remove_var(v);
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let s = s.unwrap();
        let env = s.env();
        assert!(env.contains(&"LUMA_PROXY_ACME_DIRECTORY=https://ca.test/dir".to_string()));
        assert!(env.contains(&"LUMA_PROXY_ACME_EMAIL=env@shop.test".to_string()));
        assert!(env.contains(&format!("LUMA_PROXY_ACME_CA_ROOT_PEM={root}")));
        assert!(env.contains(&"LUMA_PROXY_HTTPS_PUBLIC_PORT=18443".to_string()));
        assert_eq!(s.acme.email.unwrap().from, "LUMA_ACME_EMAIL");
        assert!(s
            .acme
            .directory
            .unwrap()
            .from
            .contains("proxy.acme.directory"));
        assert!(
            missing.starts_with("LUMA_ACME_CA_ROOT=") && missing.contains("cannot read"),
            "{missing}"
        );
        assert!(bad_email.starts_with("LUMA_ACME_EMAIL: "), "{bad_email}");
    }

    #[test]
    fn tells_static_from_dynamic_binaries() {
        // The test binary itself is dynamically linked; /bin/sh too. Garbage is neither.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me));
        assert!(!is_static_elf(b"#!/bin/sh\necho hi\n"));
        let ctx = proxy_context(b"\x7fELF-not-really").unwrap();
        let mut names: Vec<String> = tar::Archive::new(&ctx[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(names, vec!["Dockerfile", "luma-proxy", "state/"]);
    }
}
