//! `luma.yml`: parsing and validation, before anything touches Docker.
//!
//! The schema stays compatible with the original Luma: `name`, `ssh`, `docker`, `proxy`, and
//! `apps`/`services` as a map or a list of entries with `name`. Every error names the file, the
//! key path, the bad value and the fix; unknown keys get a "did you mean".

use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub project: String,
    pub ssh: Option<Ssh>,
    pub proxy_image: Option<String>,
    /// `proxy.acme`: where the proxy orders certificates (each unset key: the proxy's default).
    pub acme: AcmeConfig,
    /// `docker.registry`: images go through it (push once, pull on each server) instead of
    /// being streamed from this machine's engine.
    pub registry: Option<Registry>,
    pub apps: Vec<Entry>,
    pub services: Vec<Entry>,
    /// `network: {pool, subnet_size}`: where new project networks get their subnet (see
    /// [`crate::netpool`]); [`Config::load`] applies `LUMA_NETWORK_POOL` /
    /// `LUMA_NETWORK_SUBNET_SIZE` over it.
    pub network: crate::netpool::Pool,
    /// Whether deploys keep the host's firewall fast path for the pool ([`crate::hostpath`]);
    /// only `LUMA_HOST_FAST_PATH` sets it, [`Config::load`] reads it.
    pub host_fast_path: bool,
}

/// `docker: {registry, username, password}`; `password` names a key in `.luma/secrets`.
#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    pub address: String,
    pub username: Option<String>,
    pub password_secret: Option<String>,
}

/// Top-level `ssh:`, for every server that is not `local`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ssh {
    pub username: Option<String>,
    pub port: Option<u16>,
    pub key_file: Option<String>,
}

/// The server name for this machine's own engine (`DOCKER_HOST` or the default socket).
pub const LOCAL: &str = "local";

/// A server in `server`/`servers`: `local`, or an ssh destination `[user@]host` (a host name,
/// an IPv4 address, or a `Host` alias of the ssh config). Nothing that ssh could read as an
/// option or that needs quoting.
pub fn check_server(s: &str) -> Result<(), String> {
    if s == LOCAL {
        return Ok(());
    }
    let (user, host) = match s.split_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, s),
    };
    if let Some(u) = user {
        check_ssh_word(u).map_err(|e| format!("{s:?} is not an ssh destination: the user {e}"))?;
    }
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with(['-', '.'])
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !ok {
        return Err(format!(
            "{s:?} is not a server: use `local`, or an ssh destination such as `deploy@203.0.113.7` or `app1.example.com` (a host name, IPv4 address or ssh config alias; the port goes in `ssh.port` or the ssh config)"
        ));
    }
    Ok(())
}

/// A user name as ssh takes it: no option-like or shell-special text.
fn check_ssh_word(u: &str) -> Result<(), String> {
    if u.is_empty()
        || u.len() > 64
        || u.starts_with('-')
        || !u
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "{u:?} is not a user name (letters, digits, '.', '-', '_'; not starting with '-')"
        ));
    }
    Ok(())
}

/// `docker.registry`: `HOST[:PORT]`, no scheme or path.
fn check_registry(r: &str) -> Result<(), String> {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok = !host.is_empty()
        && !host.starts_with(['-', '.'])
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if !host_ok || !port_ok {
        return Err(format!(
            "{r:?} is not a registry address: use HOST or HOST:PORT, e.g. `registry.example.com` or `127.0.0.1:5000` (no https:// or path)"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    Image(String),
    Build(Build),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    pub context: PathBuf,
    pub dockerfile: String,
    pub args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub platform: Option<String>,
}

/// An app or a service.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub source: ImageSource,
    pub servers: Vec<String>,
    pub replicas: u32,
    pub ports: Vec<String>,
    pub volumes: Vec<String>,
    pub command: Option<Vec<String>>,
    pub env_plain: Vec<(String, String)>,
    pub env_secret: Vec<String>,
    pub health: Health,
    pub proxy: Option<ProxyRoute>,
    /// How long a stop waits after SIGTERM before SIGKILL (containers run under Docker's
    /// init, so an app that ignores SIGTERM as PID 1 still stops at once).
    pub stop_timeout: Duration,
}

impl Entry {
    /// The servers this entry runs on, sorted; `local` when luma.yml names none.
    pub fn servers(&self) -> Vec<String> {
        if self.servers.is_empty() {
            vec![LOCAL.to_string()]
        } else {
            self.servers.clone()
        }
    }

    /// The stop grace in whole seconds for the engine, rounded up (`500ms` waits 1 s, not 0).
    pub fn stop_grace_s(&self) -> i32 {
        self.stop_timeout
            .as_millis()
            .div_ceil(1000)
            .min(i32::MAX as u128) as i32
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// How long every new replica has to become healthy.
    pub deadline: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            path: "/up".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyRoute {
    pub hosts: Vec<String>,
    pub app_port: u16,
    pub ssl: Ssl,
    /// Plain HTTP answers 308 to https once a host has a certificate.
    pub ssl_redirect: bool,
    /// `Strict-Transport-Security` on HTTPS responses.
    pub hsts: bool,
    pub response_timeout: Duration,
}

/// How an app's hosts get HTTPS (`proxy.ssl`).
#[derive(Debug, Clone, PartialEq)]
pub enum Ssl {
    /// `ssl: false`: plain HTTP only.
    Off,
    /// `ssl: true` (the default): the proxy orders a certificate per host over ACME.
    Acme,
    /// `ssl: {certificate, private_key}`: the user's own PEM certificate chain and key, named by
    /// their keys in `.luma/secrets` (the values are never in luma.yml, output or errors).
    Custom {
        certificate: String,
        private_key: String,
    },
}

/// Top-level `proxy.acme`. Only what the project sets explicitly is passed to the proxy (and
/// compared with the running one); the rest stays the proxy's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AcmeConfig {
    /// The ACME directory URL, or `off`.
    pub directory: Option<String>,
    /// The account's contact address.
    pub email: Option<String>,
    /// Extra roots trusted for the directory's HTTPS (a private or test CA).
    pub ca_root: Option<CaRoot>,
}

/// A CA root certificate file, read and checked when luma.yml is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct CaRoot {
    pub path: PathBuf,
    /// The file's text: one or more PEM certificates.
    pub pem: String,
}

/// `proxy.acme.directory`: an https URL, or `off` to disable ACME.
pub fn check_acme_directory(v: &str) -> Result<(), String> {
    let rest = v.strip_prefix("https://").unwrap_or("");
    if v == "off"
        || (!rest.is_empty() && !rest.starts_with('/') && !v.contains(char::is_whitespace))
    {
        return Ok(());
    }
    Err(format!(
        "{v:?} is not an ACME directory; use its https:// URL (e.g. https://acme-v02.api.letsencrypt.org/directory for Let's Encrypt, or a private CA's), or `off` to turn ACME off"
    ))
}

/// `proxy.acme.email`: a contact address for the CA (expiry notices, account recovery),
/// returned without a `mailto:` prefix (the proxy adds it).
pub fn acme_email(v: &str) -> Result<String, String> {
    let addr = v.trim();
    let addr = addr.strip_prefix("mailto:").unwrap_or(addr);
    match addr.split_once('@') {
        Some((user, domain))
            if !user.is_empty()
                && domain.contains('.')
                && !addr.contains(|c: char| c.is_whitespace() || c == ',' || c == '<') =>
        {
            Ok(addr.to_string())
        }
        _ => Err(format!(
            "{v:?} is not an email address; use one contact address like ops@example.com"
        )),
    }
}

/// Reads a CA root file and checks that it holds at least one PEM certificate that parses.
/// The error says what is wrong and how to fix it; the caller adds where the path came from.
pub fn read_ca_root(path: &Path) -> Result<CaRoot, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| {
        format!("cannot read {shown} ({e}); point it at the PEM file of your CA's root certificate")
    })?;
    let mut certificates = 0;
    for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
        let pem = pem.map_err(|e| {
            format!(
                "{shown} is not valid PEM ({e}); it must hold -----BEGIN CERTIFICATE----- blocks"
            )
        })?;
        if pem.label != "CERTIFICATE" {
            continue;
        }
        pem.parse_x509().map_err(|e| {
            format!("{shown}: a CERTIFICATE block does not parse as X.509 ({e}); export the CA root again as PEM")
        })?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err(format!(
            "{shown} holds no PEM certificate; it must hold the CA's root certificate as -----BEGIN CERTIFICATE----- ... (for pebble: its /roots/0 from the management port)"
        ));
    }
    let pem = String::from_utf8(bytes)
        .map_err(|_| format!("{shown} is not text; it must be a PEM file"))?;
    Ok(CaRoot {
        path: path.to_path_buf(),
        pem,
    })
}

pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {key}: {msg}", self.file))
    }

    fn map<'v>(
        &self,
        key: &str,
        v: &'v Value,
        allowed: &[&str],
    ) -> Result<&'v serde_yaml_ng::Mapping, ConfigError> {
        let m = v
            .as_mapping()
            .ok_or_else(|| self.err(key, format!("expected a map of keys, found {}", kind(v))))?;
        for k in m.keys() {
            let k = k
                .as_str()
                .ok_or_else(|| self.err(key, "keys must be strings"))?;
            if !allowed.contains(&k) {
                let hint = closest(k, allowed)
                    .map(|c| format!("did you mean `{c}`?"))
                    .unwrap_or_else(|| format!("allowed keys: {}", allowed.join(", ")));
                return Err(self.err(&join(key, k), format!("unknown key; {hint}")));
            }
        }
        Ok(m)
    }

    fn string(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(self.err(key, format!("expected a string, found {}", kind(v)))),
        }
    }

    fn strings(&self, key: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
        match v {
            Value::Sequence(s) => s
                .iter()
                .enumerate()
                .map(|(i, x)| self.string(&format!("{key}[{i}]"), x))
                .collect(),
            Value::String(s) => Ok(vec![s.clone()]),
            _ => Err(self.err(
                key,
                format!("expected a list of strings, found {}", kind(v)),
            )),
        }
    }

    fn duration(&self, key: &str, v: &Value) -> Result<Duration, ConfigError> {
        let s = self.string(key, v)?;
        parse_duration(&s).map_err(|e| self.err(key, e))
    }

    fn bool(&self, key: &str, v: &Value) -> Result<bool, ConfigError> {
        v.as_bool()
            .ok_or_else(|| self.err(key, format!("expected true or false, found {}", kind(v))))
    }

    fn uint(&self, key: &str, v: &Value, min: u64, max: u64) -> Result<u64, ConfigError> {
        v.as_u64()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                self.err(
                    key,
                    format!(
                        "expected a whole number from {min} to {max}, found {}",
                        show(v)
                    ),
                )
            })
    }
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}.{b}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a map",
        Value::Tagged(_) => "a tagged value",
    }
}

fn show(v: &Value) -> String {
    serde_yaml_ng::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| kind(v).into())
}

/// Durations are written as in luma-proxy's flags: `500ms`, `2s`, `1m`, or bare seconds.
pub use luma_api::parse_duration;

/// Edit distance, for "did you mean".
fn closest<'a>(k: &str, allowed: &[&'a str]) -> Option<&'a str> {
    fn dist(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                cur.push(
                    (prev[j] + (ca != *cb) as usize)
                        .min(prev[j + 1] + 1)
                        .min(cur[j] + 1),
                );
            }
            prev = cur;
        }
        prev[b.len()]
    }
    allowed
        .iter()
        .map(|a| (dist(k, a), a.len().abs_diff(k.len()), *a))
        .filter(|(d, _, a)| *d <= 2.max(a.len() / 3))
        .min()
        .map(|(_, _, a)| a)
}

pub use luma_api::names::check_name;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "{file}: cannot read it ({e}); run `luma init` to create one, or pass -c PATH"
            ))
        })?;
        let mut cfg = Config::parse(&text, path)?;
        // The environment wins: the pool is a property of the servers, not of the project.
        cfg.network = cfg
            .network
            .with_env(|var| std::env::var(var).ok())
            .map_err(ConfigError)?;
        cfg.host_fast_path =
            crate::hostpath::enabled(|var| std::env::var(var).ok()).map_err(ConfigError)?;
        Ok(cfg)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let cx = Ctx { file: &file };
        let doc: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| ConfigError(format!("{file}: not valid YAML: {e}")))?;
        let top = cx.map(
            "",
            &doc,
            &[
                "name", "ssh", "docker", "proxy", "network", "apps", "services",
            ],
        )?;
        let project = match top.get("name") {
            Some(v) => cx.string("name", v)?,
            None => {
                return Err(cx.err(
                    "name",
                    "missing; add `name: my-project` (the project name, a DNS label)",
                ))
            }
        };
        check_name("project", &project).map_err(|e| cx.err("name", e))?;
        let ssh = match top.get("ssh") {
            Some(v) => {
                let m = cx.map("ssh", v, &["user", "username", "port", "key", "key_file"])?;
                // The original schema says `username`/`key_file`; `user`/`key` read as ssh's own.
                let one_of = |a: &str, b: &str| -> Result<Option<String>, ConfigError> {
                    match (m.get(a), m.get(b)) {
                        (Some(_), Some(_)) => Err(cx.err(
                            &format!("ssh.{a}"),
                            format!("`{a}` and `{b}` mean the same; keep one"),
                        )),
                        (Some(v), None) => cx.string(&format!("ssh.{a}"), v).map(Some),
                        (None, Some(v)) => cx.string(&format!("ssh.{b}"), v).map(Some),
                        (None, None) => Ok(None),
                    }
                };
                let username = one_of("user", "username")?;
                if let Some(u) = &username {
                    check_ssh_word(u).map_err(|e| cx.err("ssh.user", e))?;
                }
                Some(Ssh {
                    username,
                    port: m
                        .get("port")
                        .map(|v| cx.uint("ssh.port", v, 1, 65535).map(|p| p as u16))
                        .transpose()?,
                    key_file: one_of("key", "key_file")?,
                })
            }
            None => None,
        };
        let registry = match top.get("docker") {
            Some(v) => {
                let m = cx.map("docker", v, &["registry", "username", "password"])?;
                let get = |k: &str| {
                    m.get(k)
                        .map(|v| cx.string(&format!("docker.{k}"), v))
                        .transpose()
                };
                match get("registry")? {
                    Some(address) => {
                        check_registry(&address).map_err(|e| cx.err("docker.registry", e))?;
                        Some(Registry {
                            address,
                            username: get("username")?,
                            password_secret: get("password")?,
                        })
                    }
                    None => {
                        if m.contains_key("username") || m.contains_key("password") {
                            return Err(cx.err(
                                "docker.registry",
                                "missing; `username` and `password` need `registry: HOST[:PORT]`",
                            ));
                        }
                        None
                    }
                }
            }
            None => None,
        };
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let (proxy_image, acme) = match top.get("proxy") {
            Some(v) => {
                let m = cx.map("proxy", v, &["image", "acme", "ssl", "hosts", "host"])?;
                for app_key in ["ssl", "hosts", "host"] {
                    if m.contains_key(app_key) {
                        return Err(cx.err(
                            &format!("proxy.{app_key}"),
                            format!("the top-level `proxy` configures the shared proxy (image, acme); `{app_key}` is set per app, under apps.<name>.proxy"),
                        ));
                    }
                }
                let image = m
                    .get("image")
                    .map(|v| cx.string("proxy.image", v))
                    .transpose()?;
                let acme = match m.get("acme") {
                    Some(a) => acme(&cx, a, &base)?,
                    None => AcmeConfig::default(),
                };
                (image, acme)
            }
            None => (None, AcmeConfig::default()),
        };
        let network = match top.get("network") {
            Some(v) => network(&cx, v)?,
            None => crate::netpool::Pool::default_pool(),
        };
        let apps = entries(&cx, "apps", top.get("apps"), &base, true)?;
        let services = entries(&cx, "services", top.get("services"), &base, false)?;
        let mut seen = std::collections::BTreeSet::new();
        for e in apps.iter().chain(services.iter()) {
            if !seen.insert(e.name.clone()) {
                return Err(cx.err(
                    &e.name,
                    "an app and a service share this name; names must be unique within a project",
                ));
            }
        }
        let mut hosts = BTreeMap::new();
        for a in &apps {
            for h in a.proxy.iter().flat_map(|p| p.hosts.iter()) {
                if let Some(other) = hosts.insert(h.clone(), a.name.clone()) {
                    return Err(cx.err(
                        &format!("apps.{}.proxy.hosts", a.name),
                        format!(
                            "host {h:?} is also used by app {other:?}; a host routes to one app"
                        ),
                    ));
                }
            }
        }
        if apps.is_empty() && services.is_empty() {
            return Err(cx.err(
                "apps",
                "no apps or services defined; add at least one under `apps:`",
            ));
        }
        Ok(Config {
            path: path.to_path_buf(),
            project,
            ssh,
            proxy_image,
            acme,
            registry,
            apps,
            services,
            network,
            host_fast_path: true,
        })
    }

    pub fn app(&self, name: &str) -> Result<&Entry, String> {
        self.apps.iter().find(|a| a.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.apps.iter().map(|a| a.name.as_str()).collect();
            format!(
                "{}: no app named {name:?}; apps: {}",
                self.path.display(),
                names.join(", ")
            )
        })
    }
}

/// Top-level `proxy.acme: {directory, email, ca_root}`.
fn acme(cx: &Ctx, v: &Value, base: &Path) -> Result<AcmeConfig, ConfigError> {
    let m = cx.map("proxy.acme", v, &["directory", "email", "ca_root"])?;
    let directory = m
        .get("directory")
        .map(|v| cx.string("proxy.acme.directory", v))
        .transpose()?;
    if let Some(d) = &directory {
        check_acme_directory(d).map_err(|e| cx.err("proxy.acme.directory", e))?;
    }
    let email = m
        .get("email")
        .map(|v| {
            acme_email(&cx.string("proxy.acme.email", v)?)
                .map_err(|e| cx.err("proxy.acme.email", e))
        })
        .transpose()?;
    let ca_root = match m.get("ca_root") {
        Some(v) => {
            let rel = cx.string("proxy.acme.ca_root", v)?;
            let path = base.join(&rel);
            Some(read_ca_root(&path).map_err(|e| {
                cx.err(
                    "proxy.acme.ca_root",
                    format!("{rel:?} (relative to luma.yml): {e}"),
                )
            })?)
        }
        None => None,
    };
    Ok(AcmeConfig {
        directory,
        email,
        ca_root,
    })
}

/// Top-level `network: {pool, subnet_size}`, each unset key at its default. The file's own
/// values must fit together (the environment is checked over them in [`Config::load`]).
fn network(cx: &Ctx, v: &Value) -> Result<crate::netpool::Pool, ConfigError> {
    use crate::netpool::{Cidr, Pool};
    let m = cx.map("network", v, &["pool", "subnet_size"])?;
    let mut pool = Pool::default_pool();
    if let Some(v) = m.get("pool") {
        let range = match v {
            Value::String(s) => Cidr::parse(s.trim())
                .and_then(|r| Pool::check_range(&r).map(|()| r))
                .map_err(|e| cx.err("network.pool", e))?,
            _ => {
                return Err(cx.err(
                    "network.pool",
                    format!(
                        "expected an IPv4 network such as {}, found {}",
                        crate::netpool::DEFAULT_POOL,
                        show(v)
                    ),
                ))
            }
        };
        pool.range = range;
        pool.range_from = format!("network.pool in {}", cx.file);
    }
    if let Some(v) = m.get("subnet_size") {
        pool.subnet_size = v
            .as_u64()
            .filter(|n| *n <= 32)
            .map(|n| n as u8)
            .ok_or_else(|| {
                cx.err(
                    "network.subnet_size",
                    format!(
                        "expected the prefix length of each project's subnet as a whole number, e.g. `subnet_size: 24` for /24 subnets, found {}",
                        show(v)
                    ),
                )
            })?;
        pool.size_from = format!("network.subnet_size in {}", cx.file);
    }
    let key = if m.contains_key("subnet_size") {
        "network.subnet_size"
    } else {
        "network.pool"
    };
    Pool::check_size(&pool.range, pool.subnet_size).map_err(|e| cx.err(key, e))?;
    Ok(pool)
}

/// `apps.<name>.proxy.ssl`: `true`, `false`, or `{certificate: SECRET, private_key: SECRET}`.
fn ssl(cx: &Ctx, key: &str, v: &Value) -> Result<Ssl, ConfigError> {
    match v {
        Value::Bool(true) => Ok(Ssl::Acme),
        Value::Bool(false) => Ok(Ssl::Off),
        Value::Mapping(_) => {
            let m = cx.map(key, v, &["certificate", "private_key"])?;
            let secret = |name: &str| -> Result<String, ConfigError> {
                let k = format!("{key}.{name}");
                let s = match m.get(name) {
                    Some(v) => cx.string(&k, v)?,
                    None => return Err(cx.err(&k, "missing; name the .luma/secrets key that holds the PEM, e.g. `certificate: TLS_CERT, private_key: TLS_KEY`")),
                };
                // A name, never the PEM itself: luma.yml is committed, the key must not be.
                if s.is_empty()
                    || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    let what = if s.contains("-----BEGIN") {
                        "a PEM value".to_string()
                    } else {
                        format!("{s:?}")
                    };
                    return Err(cx.err(&k, format!("{what} is not a secret name; put the PEM in .luma/secrets as NAME=... and write only NAME here (letters, digits, _)")));
                }
                Ok(s)
            };
            Ok(Ssl::Custom {
                certificate: secret("certificate")?,
                private_key: secret("private_key")?,
            })
        }
        _ => Err(cx.err(
            key,
            format!(
                "expected true, false or {{certificate: SECRET_NAME, private_key: SECRET_NAME}}, found {}",
                show(v)
            ),
        )),
    }
}

const ENTRY_KEYS: [&str; 13] = [
    "name",
    "stop_timeout",
    "image",
    "build",
    "server",
    "servers",
    "replicas",
    "ports",
    "volumes",
    "command",
    "environment",
    "health_check",
    "proxy",
];

fn entries(
    cx: &Ctx,
    key: &str,
    v: Option<&Value>,
    base: &Path,
    is_app: bool,
) -> Result<Vec<Entry>, ConfigError> {
    let mut out = Vec::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(m)) => {
            for (name, body) in m {
                let name = cx.string(key, name)?;
                out.push(entry(
                    cx,
                    &format!("{key}.{name}"),
                    Some(name),
                    body,
                    base,
                    is_app,
                )?);
            }
        }
        Some(Value::Sequence(list)) => {
            for (i, body) in list.iter().enumerate() {
                out.push(entry(cx, &format!("{key}[{i}]"), None, body, base, is_app)?);
            }
        }
        Some(other) => {
            return Err(cx.err(
                key,
                format!(
                    "expected a map of name: settings (or a list of entries with `name`), found {}",
                    kind(other)
                ),
            ))
        }
    }
    Ok(out)
}

fn entry(
    cx: &Ctx,
    key: &str,
    name: Option<String>,
    v: &Value,
    base: &Path,
    is_app: bool,
) -> Result<Entry, ConfigError> {
    let m = cx.map(key, v, &ENTRY_KEYS)?;
    let name = match (name, m.get("name")) {
        (Some(n), _) => n,
        (None, Some(v)) => cx.string(&format!("{key}.name"), v)?,
        (None, None) => return Err(cx.err(key, "list entries need a `name`")),
    };
    check_name(if is_app { "app" } else { "service" }, &name).map_err(|e| cx.err(key, e))?;
    let k = |s: &str| format!("{key}.{s}");
    let source = match (m.get("image"), m.get("build")) {
        (Some(_), Some(_)) => return Err(cx.err(key, "has both `image` and `build`; keep one")),
        (Some(i), None) => ImageSource::Image(cx.string(&k("image"), i)?),
        (None, Some(b)) => {
            let bm = cx.map(
                &k("build"),
                b,
                &["context", "dockerfile", "args", "target", "platform"],
            )?;
            let context = bm
                .get("context")
                .map(|v| cx.string(&k("build.context"), v))
                .transpose()?
                .unwrap_or_else(|| ".".into());
            let ctx_path = base.join(&context);
            if !ctx_path.is_dir() {
                return Err(cx.err(
                    &k("build.context"),
                    format!(
                        "{context:?} is not a directory (relative to {})",
                        base.display()
                    ),
                ));
            }
            let mut args = BTreeMap::new();
            if let Some(a) = bm.get("args") {
                let am = a
                    .as_mapping()
                    .ok_or_else(|| cx.err(&k("build.args"), "expected a map of NAME: value"))?;
                for (ak, av) in am {
                    args.insert(
                        cx.string(&k("build.args"), ak)?,
                        cx.string(&k("build.args"), av)?,
                    );
                }
            }
            ImageSource::Build(Build {
                context: ctx_path,
                dockerfile: bm
                    .get("dockerfile")
                    .map(|v| cx.string(&k("build.dockerfile"), v))
                    .transpose()?
                    .unwrap_or_else(|| "Dockerfile".into()),
                args,
                target: bm
                    .get("target")
                    .map(|v| cx.string(&k("build.target"), v))
                    .transpose()?,
                platform: bm
                    .get("platform")
                    .map(|v| cx.string(&k("build.platform"), v))
                    .transpose()?,
            })
        }
        (None, None) => return Err(cx.err(key, "needs `image: NAME` or `build: {context: .}`")),
    };
    let mut servers = Vec::new();
    if let Some(s) = m.get("server") {
        servers.push(cx.string(&k("server"), s)?);
    }
    if let Some(s) = m.get("servers") {
        servers.extend(cx.strings(&k("servers"), s)?);
    }
    for s in &servers {
        check_server(s).map_err(|e| cx.err(&k("servers"), e))?;
    }
    servers.sort();
    servers.dedup();
    let replicas = m
        .get("replicas")
        .map(|v| cx.uint(&k("replicas"), v, 1, 64))
        .transpose()?
        .unwrap_or(1) as u32;
    if !is_app && replicas != 1 {
        return Err(cx.err(
            &k("replicas"),
            "services run one container; remove `replicas`",
        ));
    }
    let ports = m
        .get("ports")
        .map(|v| cx.strings(&k("ports"), v))
        .transpose()?
        .unwrap_or_default();
    for (i, p) in ports.iter().enumerate() {
        parse_port(p).map_err(|e| cx.err(&format!("{}[{i}]", k("ports")), e))?;
    }
    if is_app && replicas > 1 && !ports.is_empty() {
        return Err(cx.err(&k("ports"), "an app with several replicas cannot publish host ports (they would clash); route it through `proxy` instead"));
    }
    let volumes = m
        .get("volumes")
        .map(|v| cx.strings(&k("volumes"), v))
        .transpose()?
        .unwrap_or_default();
    let command = match m.get("command") {
        None => None,
        Some(Value::String(s)) => Some(s.split_whitespace().map(str::to_string).collect()),
        Some(v) => Some(cx.strings(&k("command"), v)?),
    };
    let (mut env_plain, mut env_secret) = (Vec::new(), Vec::new());
    if let Some(e) = m.get("environment") {
        let em = cx.map(&k("environment"), e, &["plain", "secret"])?;
        if let Some(p) = em.get("plain") {
            for (i, kv) in cx
                .strings(&k("environment.plain"), p)?
                .into_iter()
                .enumerate()
            {
                let (a, b) = kv.split_once('=').ok_or_else(|| {
                    cx.err(
                        &format!("{}[{i}]", k("environment.plain")),
                        format!("{kv:?} is not KEY=VALUE"),
                    )
                })?;
                env_plain.push((a.to_string(), b.to_string()));
            }
        }
        if let Some(s) = em.get("secret") {
            env_secret = cx.strings(&k("environment.secret"), s)?;
            for (i, name) in env_secret.iter().enumerate() {
                if name.contains('=') {
                    return Err(cx.err(
                        &format!("{}[{i}]", k("environment.secret")),
                        "list secret names only; put the values in .luma/secrets as KEY=VALUE",
                    ));
                }
            }
        }
    }
    let mut health = Health::default();
    if let Some(h) = m.get("health_check") {
        let hm = cx.map(
            &k("health_check"),
            h,
            &["path", "interval", "timeout", "deadline"],
        )?;
        if let Some(p) = hm.get("path") {
            health.path = cx.string(&k("health_check.path"), p)?;
            if !health.path.starts_with('/') {
                return Err(cx.err(
                    &k("health_check.path"),
                    format!("{:?} must start with '/', e.g. /up", health.path),
                ));
            }
        }
        if let Some(v) = hm.get("interval") {
            health.interval = cx.duration(&k("health_check.interval"), v)?;
        }
        if let Some(v) = hm.get("timeout") {
            health.timeout = cx.duration(&k("health_check.timeout"), v)?;
        }
        if let Some(v) = hm.get("deadline") {
            health.deadline = cx.duration(&k("health_check.deadline"), v)?;
            // Bounded so a caller that lost the switch's reply can always wait it out.
            if health.deadline > Duration::from_secs(300) {
                return Err(cx.err(
                    &k("health_check.deadline"),
                    "must be at most 5m: it is how long new replicas have to become healthy",
                ));
            }
        }
    }
    let stop_timeout = m
        .get("stop_timeout")
        .map(|v| cx.duration(&k("stop_timeout"), v))
        .transpose()?
        .unwrap_or(Duration::from_secs(10));
    if stop_timeout > Duration::from_secs(600) {
        return Err(cx.err(
            &k("stop_timeout"),
            "must be at most 10m; it bounds how long a stop waits for the app to exit",
        ));
    }
    let proxy = match m.get("proxy") {
        None => None,
        Some(_) if !is_app => {
            return Err(cx.err(
                &k("proxy"),
                "services are not routed by the proxy; move this entry under `apps`",
            ))
        }
        Some(p) => {
            let pk = |s: &str| format!("{key}.proxy.{s}");
            let pm = cx.map(
                &k("proxy"),
                p,
                &[
                    "hosts",
                    "host",
                    "app_port",
                    "ssl",
                    "ssl_redirect",
                    "hsts",
                    "response_timeout",
                ],
            )?;
            let mut hosts = pm
                .get("hosts")
                .map(|v| cx.strings(&pk("hosts"), v))
                .transpose()?
                .unwrap_or_default();
            if let Some(h) = pm.get("host") {
                hosts.push(cx.string(&pk("host"), h)?);
            }
            if hosts.is_empty() {
                return Err(cx.err(
                    &pk("hosts"),
                    "missing; list the hostnames that route to this app, e.g. [app.example.com]",
                ));
            }
            for (i, h) in hosts.iter().enumerate() {
                luma_api::names::normalize_host_pattern(h)
                    .map_err(|e| cx.err(&format!("{}[{i}]", pk("hosts")), e))?;
            }
            Some(ProxyRoute {
                hosts,
                app_port: pm
                    .get("app_port")
                    .map(|v| cx.uint(&pk("app_port"), v, 1, 65535))
                    .transpose()?
                    .unwrap_or(80) as u16,
                ssl: pm
                    .get("ssl")
                    .map(|v| ssl(cx, &pk("ssl"), v))
                    .transpose()?
                    .unwrap_or(Ssl::Acme),
                ssl_redirect: pm
                    .get("ssl_redirect")
                    .map(|v| cx.bool(&pk("ssl_redirect"), v))
                    .transpose()?
                    .unwrap_or(true),
                hsts: pm
                    .get("hsts")
                    .map(|v| cx.bool(&pk("hsts"), v))
                    .transpose()?
                    .unwrap_or(false),
                response_timeout: pm
                    .get("response_timeout")
                    .map(|v| cx.duration(&pk("response_timeout"), v))
                    .transpose()?
                    .unwrap_or(Duration::from_secs(30)),
            })
        }
    };
    if let Some(p) = &proxy {
        if p.hsts && p.ssl == Ssl::Off {
            return Err(cx.err(
                &k("proxy.hsts"),
                "needs HTTPS, but `ssl: false` turns it off; remove `hsts` or set `ssl: true`",
            ));
        }
    }
    Ok(Entry {
        name,
        source,
        servers,
        replicas,
        ports,
        volumes,
        command,
        env_plain,
        env_secret,
        health,
        proxy,
        stop_timeout,
    })
}

/// `[ip:]host:container[/proto]` -> (host ip, host port, container port/proto).
pub fn parse_port(s: &str) -> Result<(Option<String>, u16, String), String> {
    let (spec, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    if proto != "tcp" && proto != "udp" {
        return Err(format!("{s:?}: protocol must be tcp or udp"));
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let (ip, host, cont) = match parts.as_slice() {
        [h, c] => (None, *h, *c),
        [ip, h, c] => (Some(ip.to_string()), *h, *c),
        _ => {
            return Err(format!(
                "{s:?} is not HOST:CONTAINER (e.g. \"5432:5432\" or \"127.0.0.1:5432:5432\")"
            ))
        }
    };
    let hp: u16 = host
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s:?}: host port {host:?} must be 1-65535"))?;
    let cp: u16 = cont
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s:?}: container port {cont:?} must be 1-65535"))?;
    Ok((ip, hp, format!("{cp}/{proto}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<Config, String> {
        Config::parse(y, Path::new("/tmp/luma.yml")).map_err(|e| e.0)
    }

    #[test]
    fn servers_are_local_or_ssh_destinations() {
        let c = parse(
            "name: p\nssh: {user: deploy, port: 2222, key: ~/.ssh/id}\napps:\n  web:\n    image: x\n    servers: [app2.example.com, root@10.0.0.7, app2.example.com]\n  api:\n    image: x\n",
        )
        .unwrap();
        assert_eq!(
            c.apps[0].servers(),
            vec!["app2.example.com", "root@10.0.0.7"]
        );
        assert_eq!(c.apps[1].servers(), vec![LOCAL]);
        let ssh = c.ssh.unwrap();
        assert_eq!(ssh.username.as_deref(), Some("deploy"));
        assert_eq!(ssh.port, Some(2222));
        assert_eq!(ssh.key_file.as_deref(), Some("~/.ssh/id"));
        // The original schema's spellings too.
        let c =
            parse("name: p\nssh: {username: u, key_file: k}\napps:\n  web: {image: x}\n").unwrap();
        assert_eq!(c.ssh.unwrap().username.as_deref(), Some("u"));
        for bad in ["-oProxyCommand=x", "a b", "host:22", "u@", "@h", "h;rm"] {
            let e = parse(&format!(
                "name: p\napps:\n  web:\n    image: x\n    server: \"{bad}\"\n"
            ))
            .unwrap_err();
            assert!(
                e.contains("apps.web.servers") && e.contains("ssh destination"),
                "{bad}: {e}"
            );
        }
        let e =
            parse("name: p\nssh: {user: a, username: b}\napps:\n  web: {image: x}\n").unwrap_err();
        assert!(e.contains("keep one"), "{e}");
    }

    #[test]
    fn registry_address_and_password_secret() {
        let c = parse("name: p\ndocker: {registry: 127.0.0.1:5000, username: u, password: REG_PASS}\napps:\n  web: {image: x}\n").unwrap();
        let r = c.registry.unwrap();
        assert_eq!(r.address, "127.0.0.1:5000");
        assert_eq!(r.password_secret.as_deref(), Some("REG_PASS"));
        let e = parse(
            "name: p\ndocker: {registry: https://r.example.com/x}\napps:\n  web: {image: x}\n",
        )
        .unwrap_err();
        assert!(
            e.contains("docker.registry") && e.contains("HOST:PORT"),
            "{e}"
        );
        let e = parse("name: p\ndocker: {username: u}\napps:\n  web: {image: x}\n").unwrap_err();
        assert!(e.contains("docker.registry"), "{e}");
    }

    #[test]
    fn map_and_list_forms_both_parse() {
        let a = parse("name: gmail\napps:\n  web:\n    image: demo\n    proxy: {hosts: [a.test], app_port: 3000}\n").unwrap();
        let b = parse("name: gmail\napps:\n  - name: web\n    image: demo\n    proxy: {hosts: [a.test], app_port: 3000}\n").unwrap();
        assert_eq!(a.apps, b.apps);
        assert_eq!(a.apps[0].proxy.as_ref().unwrap().app_port, 3000);
    }

    #[test]
    fn unknown_keys_get_did_you_mean_with_the_path() {
        let e = parse("name: gmail\napps:\n  web:\n    image: demo\n    replica: 2\n").unwrap_err();
        assert_eq!(
            e,
            "/tmp/luma.yml: apps.web.replica: unknown key; did you mean `replicas`?"
        );
        let e =
            parse("name: gmail\napps:\n  web:\n    image: demo\n    proxy: {hostz: [a.test]}\n")
                .unwrap_err();
        assert!(
            e.contains("apps.web.proxy.hostz") && e.contains("`hosts`"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        let e = parse("name: Gmail\napps: {web: {image: x}}\n").unwrap_err();
        assert!(
            e.contains(": name: project \"Gmail\" is not a valid name"),
            "{e}"
        );
        let e = parse("name: gmail\napps: {web: {image: x, replicas: 0}}\n").unwrap_err();
        assert!(
            e.contains("apps.web.replicas") && e.contains("from 1 to 64"),
            "{e}"
        );
        let e = parse("name: gmail\napps: {web: {image: x, environment: {secret: [A=1]}}}\n")
            .unwrap_err();
        assert!(
            e.contains("apps.web.environment.secret[0]") && e.contains(".luma/secrets"),
            "{e}"
        );
        let e = parse("name: gmail\napps: {web: {image: x, proxy: {hosts: [\"a.test:80\"]}}}\n")
            .unwrap_err();
        assert!(e.contains("apps.web.proxy.hosts[0]"), "{e}");
        let e = parse("name: gmail\nservices: {db: {image: x, ports: [\"abc\"]}}\n").unwrap_err();
        assert!(e.contains("services.db.ports[0]"), "{e}");
    }

    #[test]
    fn reserved_and_ambiguous_names_are_refused() {
        assert!(parse("name: proxy\napps: {web: {image: x}}\n")
            .unwrap_err()
            .contains("reserved"));
        assert!(parse("name: a--b\napps: {web: {image: x}}\n").is_err());
        assert!(
            parse("name: a\napps: {web: {image: x}}\nservices: {web: {image: y}}\n")
                .unwrap_err()
                .contains("unique")
        );
    }

    fn web(proxy: &str) -> String {
        format!("name: gmail\napps:\n  web:\n    image: demo\n    proxy: {proxy}\n")
    }

    #[test]
    fn https_is_on_by_default_with_redirect_and_without_hsts() {
        let c = parse(&web("{hosts: [a.test]}")).unwrap();
        let p = c.apps[0].proxy.clone().unwrap();
        assert_eq!((p.ssl, p.ssl_redirect, p.hsts), (Ssl::Acme, true, false));
        assert_eq!(c.acme, AcmeConfig::default());
        let p = parse(&web("{hosts: [a.test], ssl: false}")).unwrap().apps[0]
            .proxy
            .clone()
            .unwrap();
        assert_eq!(p.ssl, Ssl::Off);
        let p = parse(&web(
            "{hosts: [a.test], ssl: true, ssl_redirect: false, hsts: true}",
        ))
        .unwrap()
        .apps[0]
            .proxy
            .clone()
            .unwrap();
        assert_eq!((p.ssl, p.ssl_redirect, p.hsts), (Ssl::Acme, false, true));
        let p = parse(&web(
            "{hosts: [a.test], ssl: {certificate: TLS_CERT, private_key: TLS_KEY}}",
        ))
        .unwrap()
        .apps[0]
            .proxy
            .clone()
            .unwrap();
        assert_eq!(
            p.ssl,
            Ssl::Custom {
                certificate: "TLS_CERT".into(),
                private_key: "TLS_KEY".into()
            }
        );
    }

    #[test]
    fn bad_ssl_settings_name_the_key_and_the_fix() {
        let e = parse(&web("{hosts: [a.test], ssl: yes-please}")).unwrap_err();
        assert!(
            e.starts_with("/tmp/luma.yml: apps.web.proxy.ssl: expected true, false or {certificate: SECRET_NAME, private_key: SECRET_NAME}, found yes-please"),
            "{e}"
        );
        let e = parse(&web("{hosts: [a.test], ssl: {certificate: TLS_CERT}}")).unwrap_err();
        assert!(
            e.contains("apps.web.proxy.ssl.private_key: missing") && e.contains(".luma/secrets"),
            "{e}"
        );
        let e = parse(&web(
            "{hosts: [a.test], ssl: {certificate: TLS_CERT, privatekey: K}}",
        ))
        .unwrap_err();
        assert!(
            e.contains("apps.web.proxy.ssl.privatekey: unknown key; did you mean `private_key`?"),
            "{e}"
        );
        // A PEM pasted into luma.yml is refused without being echoed.
        let e = parse(&web(
            "{hosts: [a.test], ssl: {certificate: \"-----BEGIN CERTIFICATE-----MIIB\", private_key: K}}",
        ))
        .unwrap_err();
        assert!(
            e.contains("apps.web.proxy.ssl.certificate: a PEM value is not a secret name")
                && !e.contains("MIIB"),
            "{e}"
        );
        let e = parse(&web("{hosts: [a.test], ssl_redirect: sometimes}")).unwrap_err();
        assert!(
            e.contains("apps.web.proxy.ssl_redirect: expected true or false"),
            "{e}"
        );
        let e = parse(&web("{hosts: [a.test], hstss: true}")).unwrap_err();
        assert!(e.contains("did you mean `hsts`?"), "{e}");
        let e = parse(&web("{hosts: [a.test], ssl: false, hsts: true}")).unwrap_err();
        assert!(e.contains("apps.web.proxy.hsts: needs HTTPS"), "{e}");
        let e = parse("name: gmail\nproxy: {ssl: true}\napps: {web: {image: x}}\n").unwrap_err();
        assert!(
            e.contains("proxy.ssl: ") && e.contains("apps.<name>.proxy"),
            "{e}"
        );
    }

    #[test]
    fn acme_settings_are_checked_and_the_ca_root_is_read() {
        let dir = std::env::temp_dir().join(format!("luma-acme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("luma.yml");
        let parse_in = |y: &str| Config::parse(y, &file).map_err(|e| e.0);
        let yml = |acme: &str| {
            format!("name: gmail\nproxy:\n  acme: {acme}\napps: {{web: {{image: x}}}}\n")
        };
        let root = crate::tls::test_root_pem();
        std::fs::write(dir.join("ca.pem"), &root).unwrap();
        let c = parse_in(&yml(
            "{directory: \"https://pebble:14000/dir\", email: ops@shop.test, ca_root: ca.pem}",
        ))
        .unwrap();
        assert_eq!(
            c.acme.directory.as_deref(),
            Some("https://pebble:14000/dir")
        );
        assert_eq!(c.acme.email.as_deref(), Some("ops@shop.test"));
        let ca = c.acme.ca_root.unwrap();
        assert_eq!((ca.path, ca.pem), (dir.join("ca.pem"), root));
        assert_eq!(
            parse_in(&yml("{directory: \"off\"}"))
                .unwrap()
                .acme
                .directory
                .as_deref(),
            Some("off")
        );

        let e = parse_in(&yml("{directory: \"http://pebble/dir\"}")).unwrap_err();
        assert!(
            e.contains(
                "luma.yml: proxy.acme.directory: \"http://pebble/dir\" is not an ACME directory"
            ) && e.contains("`off`"),
            "{e}"
        );
        let e = parse_in(&yml("{email: nobody}")).unwrap_err();
        assert!(
            e.contains("proxy.acme.email: \"nobody\" is not an email address"),
            "{e}"
        );
        let e = parse_in(&yml("{diretory: x}")).unwrap_err();
        assert!(
            e.contains("proxy.acme.diretory: unknown key; did you mean `directory`?"),
            "{e}"
        );
        let e = parse_in(&yml("{ca_root: missing.pem}")).unwrap_err();
        assert!(
            e.contains("proxy.acme.ca_root: \"missing.pem\" (relative to luma.yml): cannot read")
                && e.contains("missing.pem")
                && e.contains("PEM file"),
            "{e}"
        );
        // A private key is PEM but no certificate.
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let e = parse_in(&yml("{ca_root: key.pem}")).unwrap_err();
        assert!(
            e.contains("proxy.acme.ca_root") && e.contains("holds no PEM certificate"),
            "{e}"
        );
        std::fs::write(
            dir.join("junk.pem"),
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(parse_in(&yml("{ca_root: junk.pem}"))
            .unwrap_err()
            .contains("proxy.acme.ca_root"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn with_network(network: &str) -> Result<Config, String> {
        parse(&format!("name: p\n{network}apps: {{web: {{image: x}}}}\n"))
    }

    #[test]
    fn the_network_pool_has_a_default_and_can_be_set() {
        let p = with_network("").unwrap().network;
        assert_eq!(
            (p.range.to_string(), p.subnet_size),
            ("10.210.0.0/16".to_string(), 24)
        );
        assert_eq!(
            (p.range_from.as_str(), p.size_from.as_str()),
            ("the default", "the default")
        );
        assert_eq!(p.subnets(), 256);
        let p = with_network("network:\n  pool: 10.240.0.0/12\n  subnet_size: 26\n")
            .unwrap()
            .network;
        assert_eq!(
            (p.range.to_string(), p.subnet_size),
            ("10.240.0.0/12".into(), 26)
        );
        assert_eq!(p.range_from, "network.pool in /tmp/luma.yml");
        assert_eq!(p.size_from, "network.subnet_size in /tmp/luma.yml");
        assert_eq!(p.subnets(), 1 << 14);
        // One key alone: the other stays at its default.
        let p = with_network("network: {subnet_size: 28}\n")
            .unwrap()
            .network;
        assert_eq!(
            (p.range.to_string(), p.subnet_size),
            ("10.210.0.0/16".into(), 28)
        );
    }

    #[test]
    fn bad_network_settings_name_the_key_and_the_fix() {
        for (network, says) in [
            (
                "network: {pool: 10.210.0.0}\n",
                "/tmp/luma.yml: network.pool: \"10.210.0.0\" is not an IPv4 network: no /PREFIX; write an IPv4 network as ADDRESS/PREFIX, e.g. 10.210.0.0/16",
            ),
            (
                "network: {pool: 10.210.3.0/16}\n",
                "/tmp/luma.yml: network.pool: \"10.210.3.0/16\": 10.210.3.0/16 has host bits set; the network of that range is 10.210.0.0/16",
            ),
            ("network: {pool: \"fd00::/8\"}\n", "network.pool: \"fd00::/8\" is IPv6"),
            ("network: {pool: 10.0.0.0/7}\n", "network.pool: 10.0.0.0/7 is larger than a /8"),
            ("network: {pool: 127.1.0.0/16}\n", "network.pool: 127.1.0.0/16 overlaps 127.0.0.0/8 (loopback addresses)"),
            ("network: {pool: 8.8.0.0/16}\n", "network.pool: 8.8.0.0/16 is not a private range: project networks would hide the public addresses in it from the containers; use a range inside 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, such as 10.210.0.0/16"),
            ("network: {pool: [10.210.0.0/16]}\n", "network.pool: expected an IPv4 network such as 10.210.0.0/16, found"),
            ("network: {subnet_size: /24}\n", "network.subnet_size: expected the prefix length of each project's subnet as a whole number, e.g. `subnet_size: 24`"),
            ("network: {subnet_size: 29}\n", "network.subnet_size: /29 is too small for a project network (at most /28"),
            ("network: {pool: 10.210.0.0/16, subnet_size: 16}\n", "network.subnet_size: a /16 subnet is not smaller than the pool 10.210.0.0/16"),
            // The file's pool against the default subnet size: the pool is what to change.
            ("network: {pool: 10.210.0.0/24}\n", "network.pool: a /24 subnet is not smaller than the pool 10.210.0.0/24"),
            ("network: {pools: 10.210.0.0/16}\n", "/tmp/luma.yml: network.pools: unknown key; did you mean `pool`?"),
            ("network: {subnetsize: 24}\n", "network.subnetsize: unknown key; did you mean `subnet_size`?"),
            ("network: 10.210.0.0/16\n", "network: expected a map of keys, found a string"),
        ] {
            let e = with_network(network).unwrap_err();
            assert!(e.contains(says), "{network}: {e}");
            assert!(e.starts_with("/tmp/luma.yml: network"), "{network}: {e}");
        }
    }

    #[test]
    fn the_environment_wins_over_the_file_and_is_checked_too() {
        let file = with_network("network: {pool: 10.240.0.0/16, subnet_size: 26}\n")
            .unwrap()
            .network;
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        // Nothing set (or set empty): the file's.
        assert_eq!(file.clone().with_env(env(&[])).unwrap(), file);
        assert_eq!(
            file.clone()
                .with_env(env(&[
                    ("LUMA_NETWORK_POOL", " "),
                    ("LUMA_NETWORK_SUBNET_SIZE", "")
                ]))
                .unwrap(),
            file
        );
        let p = file
            .clone()
            .with_env(env(&[("LUMA_NETWORK_POOL", "10.250.0.0/20")]))
            .unwrap();
        assert_eq!(
            (p.range.to_string(), p.subnet_size),
            ("10.250.0.0/20".into(), 26)
        );
        assert_eq!(
            (p.range_from.as_str(), p.size_from.as_str()),
            ("LUMA_NETWORK_POOL", "network.subnet_size in /tmp/luma.yml")
        );
        let p = file
            .clone()
            .with_env(env(&[
                ("LUMA_NETWORK_POOL", "10.250.0.0/20"),
                ("LUMA_NETWORK_SUBNET_SIZE", "24"),
            ]))
            .unwrap();
        assert_eq!(
            (p.subnet_size, p.size_from.as_str()),
            (24, "LUMA_NETWORK_SUBNET_SIZE")
        );
        let e = file
            .clone()
            .with_env(env(&[("LUMA_NETWORK_POOL", "10.250.0.1/20")]))
            .unwrap_err();
        assert!(
            e.starts_with("LUMA_NETWORK_POOL: \"10.250.0.1/20\": ") && e.contains("10.250.0.0/20"),
            "{e}"
        );
        let e = file
            .clone()
            .with_env(env(&[("LUMA_NETWORK_SUBNET_SIZE", "/24")]))
            .unwrap_err();
        assert!(
            e.contains("LUMA_NETWORK_SUBNET_SIZE=\"/24\": expected")
                && e.contains("LUMA_NETWORK_SUBNET_SIZE=24"),
            "{e}"
        );
        // Together with the file they must fit, and the message says where each came from.
        let e = file
            .clone()
            .with_env(env(&[("LUMA_NETWORK_POOL", "10.250.0.0/27")]))
            .unwrap_err();
        assert!(
            e.starts_with("LUMA_NETWORK_POOL: a /26 subnet is not smaller than the pool 10.250.0.0/27")
                && e.ends_with("(the pool 10.250.0.0/27 is from LUMA_NETWORK_POOL, the subnet size /26 from network.subnet_size in /tmp/luma.yml)"),
            "{e}"
        );
        let e = file
            .with_env(env(&[("LUMA_NETWORK_SUBNET_SIZE", "12")]))
            .unwrap_err();
        assert!(
            e.starts_with("LUMA_NETWORK_SUBNET_SIZE: a /12 subnet is not smaller"),
            "{e}"
        );
    }

    #[test]
    fn durations_and_ports() {
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_port("127.0.0.1:5432:5432").unwrap(),
            (Some("127.0.0.1".into()), 5432, "5432/tcp".into())
        );
        assert!(parse_port("99999:1").is_err());
    }
}
