//! `luma-proxy`: the server (`serve`) and the client of its own admin API (everything else).

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use luma_api::route::{HealthSettings, RouteSpec, RouteTimeouts};
use luma_api::{
    ApiError, BackendReport, CheckRequest, DeployRequest, Envelope, FlushRequest, Operation,
    RemoveRequest, RoutesReply, RoutesRequest, StatusRequest,
};
use luma_proxy::client::AdminClient;
use luma_proxy::util::{parse_bytes, parse_duration};
use luma_proxy::ProxyConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc rather than glibc's malloc, for memory that goes back: it keeps each size class in
/// its own pages and returns a page to the kernel once its blocks are free, so a burst of
/// connections (8 KiB read buffers next to small long-lived blocks) is given back when it ends;
/// glibc's heap keeps the holes between long-lived blocks. It also costs fewer instructions
/// per request (`docs/profile.md`). Its arenas are committed on demand (`.cargo/config.toml`
/// says why) and each serving thread collects every 2 s (`workers::set_upkeep`). The figures
/// are in `docs/idle-memory.md`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc.h's `mi_option_e` (the Rust bindings lack it).
#[cfg(feature = "mimalloc")]
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Project-scoped reverse proxy for Luma.
///
/// One luma-proxy serves every project on a server. Each project has its own Docker network;
/// the proxy joins them all and resolves each route's alias inside its own project's network
/// only, so two projects that both have an app called `web` never see each other.
///
/// Run `luma-proxy serve` in the container. Every other command talks to the running proxy's
/// admin API on 127.0.0.1 with the token from the state dir, so from the host use
/// `docker exec luma-proxy luma-proxy list`.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Serve(Box<ServeArgs>),
    /// Switch hosts to a new target with zero downtime: check every replica, swap, drain.
    ///
    /// Example: luma-proxy deploy --host app.example.com --project shop --target web-3f2a1c:3000
    Deploy(DeployArgs),
    /// Health-check every replica of a target inside its project's network, changing nothing.
    Check(CheckArgs),
    /// Remove a route; its hosts answer 404 at once and in-flight requests drain.
    Remove(RemoveArgs),
    /// List routes with the health of every backend.
    List(ClientJson),
    /// Re-resolve a project's routes now (after its containers changed).
    Flush {
        #[arg(long)]
        project: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show proxy status.
    Status(ClientJson),
    /// Certificate state per host of every route with HTTPS: issued, pending (with the CA's
    /// reason), http-only (with why) or expired.
    Certs(CertsArgs),
    /// Print Prometheus metrics.
    Metrics(ClientArgs),
    /// Read one admin request as JSON on stdin, print the reply envelope as JSON on stdout.
    ///
    /// This is how `luma` drives the proxy (`docker exec -i <proxy> luma-proxy call`): the
    /// request is a `luma_api::Request`, e.g. {"routes":{}}; the reply is {"ok": REPLY} or
    /// {"err": {"kind": ..., "error": ...}}. Exit status 0 with "ok", 3 with "err".
    Call(ClientArgs),
    /// Hold a deploy lock: wait until stdin closes, then exit (the lock container's process).
    #[command(hide = true)]
    HoldLock,
}

#[derive(Args)]
struct ServeArgs {
    /// Public HTTP listen address.
    #[arg(long, env = "LUMA_PROXY_HTTP", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Public HTTPS listen address (certificate by SNI; no SNI or an unknown one fails the
    /// handshake).
    #[arg(long, env = "LUMA_PROXY_HTTPS", default_value = "0.0.0.0:8443")]
    https: SocketAddr,
    /// The HTTPS port clients use (the port published for --https); a redirect names it
    /// when it is not 443.
    #[arg(long, env = "LUMA_PROXY_HTTPS_PUBLIC_PORT", default_value_t = 443)]
    https_public_port: u16,
    /// Time a client has to complete the TLS handshake.
    #[arg(long, env = "LUMA_PROXY_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    tls_handshake_timeout: Duration,
    /// ACME directory URL for routes with automatic certificates, or `off`.
    #[arg(long, env = "LUMA_PROXY_ACME_DIRECTORY", default_value = luma_proxy::config::LETS_ENCRYPT)]
    acme_directory: String,
    /// Contact e-mail given to the ACME CA.
    #[arg(long, env = "LUMA_PROXY_ACME_EMAIL")]
    acme_email: Option<String>,
    /// PEM file of extra roots trusted for the ACME directory's HTTPS (a private or test CA).
    #[arg(long, env = "LUMA_PROXY_ACME_CA_ROOT")]
    acme_ca_root: Option<PathBuf>,
    /// The same roots as PEM text (what `luma` passes).
    #[arg(long, env = "LUMA_PROXY_ACME_CA_ROOT_PEM", hide = true)]
    acme_ca_root_pem: Option<String>,
    /// First wait after a failed order; doubles per failure in a row up to --acme-retry-max.
    #[arg(long, env = "LUMA_PROXY_ACME_RETRY_MIN", default_value = "5m", value_parser = parse_duration)]
    acme_retry_min: Duration,
    /// Longest wait between failed orders (360m = 6 h).
    #[arg(long, env = "LUMA_PROXY_ACME_RETRY_MAX", default_value = "360m", value_parser = parse_duration)]
    acme_retry_max: Duration,
    /// Orders one host may place per hour (HTTP-01 and TLS-ALPN-01 orders both count).
    #[arg(long, env = "LUMA_PROXY_ACME_ORDERS_PER_HOUR", default_value_t = 5)]
    acme_orders_per_hour: u32,
    /// Admin API address; must be loopback.
    #[arg(long, env = "LUMA_PROXY_ADMIN", default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Routes and the admin token are kept here (mount a volume).
    #[arg(
        long,
        env = "LUMA_PROXY_STATE_DIR",
        default_value = "/var/lib/luma-proxy"
    )]
    state_dir: PathBuf,
    /// Admin token file (default: <state-dir>/admin.token, generated on first start).
    #[arg(long, env = "LUMA_PROXY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Docker's embedded DNS server.
    #[arg(long, env = "LUMA_PROXY_DNS", default_value = "127.0.0.11:53")]
    dns: SocketAddr,
    /// Name the proxy resolves to find its own interface on each network (default: hostname).
    #[arg(long, env = "LUMA_PROXY_SELF_NAME")]
    self_name: Option<String>,
    /// Background re-resolve pace of each route (±25% jitter, 1s to 60m). Deploys, flushes,
    /// failed connects and failed health checks re-resolve at once; this only catches
    /// containers changed by hand without `luma-proxy flush`.
    #[arg(long, env = "LUMA_PROXY_REFRESH_EVERY", default_value = "30s", value_parser = luma_proxy::config::parse_refresh_every)]
    refresh_every: Duration,
    /// Turn off the JSON access log on stdout.
    #[arg(long, env = "LUMA_PROXY_NO_ACCESS_LOG", value_parser = BoolishValueParser::new())]
    no_access_log: bool,
    /// Bytes of access lines that may wait for stdout when its reader (the engine's log
    /// driver) falls behind, at least 4KiB. Requests never wait for the log: past this, lines
    /// are dropped and counted in luma_proxy_access_log_dropped_lines_total, with a warning on
    /// stderr.
    #[arg(long, env = "LUMA_PROXY_ACCESS_LOG_BUFFER", default_value = "2MiB", value_parser = parse_bytes)]
    access_log_buffer: usize,
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Time to receive a request head; also the HTTP/1.1 keep-alive idle limit.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// Close connections with no traffic either way for this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Largest request head accepted (431 above).
    #[arg(long, default_value = "64KiB", value_parser = parse_bytes)]
    max_header_size: usize,
    /// On SIGTERM, wait this long for in-flight requests.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Worker threads (default: one per core).
    #[arg(long, env = "LUMA_PROXY_WORKERS")]
    workers: Option<usize>,
    /// Close a new connection that sends no byte for this long (at most the idle timeout).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    first_byte_timeout: Duration,
    /// An HTTP/1.1 keep-alive connection that starts no request for this long releases its
    /// buffers and parser state until its next byte (about 1 KiB held instead of 20; 0 never).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    park_after: Duration,
    /// Metrics listener (GET /metrics, read-only, no token): NETWORK:PORT listens only on the
    /// proxy's interface in that Docker network, once the proxy is attached to it
    /// (`docker network connect luma-metrics <proxy>`); IP:PORT listens there exactly
    /// (0.0.0.0 would let every project's containers read every project's metrics); `off`.
    #[arg(long, env = "LUMA_PROXY_METRICS", default_value = "luma-metrics:9100", value_parser = luma_proxy::config::MetricsListen::parse)]
    metrics: luma_proxy::config::MetricsListen,
    /// A constant label on every metric, NAME=VALUE (repeat for more), e.g. server=eu-1.
    #[arg(long = "metrics-label", value_parser = luma_proxy::config::parse_metrics_label)]
    metrics_labels: Vec<(String, String)>,
    /// CIDRs of a load balancer or CDN in front (comma-separated): from these peers the
    /// proxy appends to X-Forwarded-For and keeps X-Forwarded-Proto/-Host, X-Real-IP and
    /// Forwarded. Every other peer gets edge mode: those headers are the proxy's own.
    #[arg(long, env = "LUMA_PROXY_TRUSTED_PROXIES", default_value = "", value_parser = luma_proxy::headers::TrustedProxies::parse)]
    trusted_proxies: luma_proxy::headers::TrustedProxies,
    /// Accept routes to literal ip:port targets (tests and benchmarks only): such a route
    /// names no project network, so it is off by default.
    #[arg(long, env = "LUMA_PROXY_ALLOW_LITERAL_TARGETS", value_parser = BoolishValueParser::new())]
    allow_literal_targets: bool,
}

#[derive(Args)]
struct CertsArgs {
    /// Only this project's hosts.
    #[arg(long)]
    project: Option<String>,
    /// Only these hosts (repeat for more).
    #[arg(long = "host")]
    hosts: Vec<String>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Admin API of the running proxy.
    #[arg(long, env = "LUMA_PROXY_ADMIN", default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Token file of the running proxy (default: <state-dir>/admin.token).
    #[arg(long, env = "LUMA_PROXY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[arg(
        long,
        env = "LUMA_PROXY_STATE_DIR",
        default_value = "/var/lib/luma-proxy"
    )]
    state_dir: PathBuf,
}

#[derive(Args)]
struct ClientJson {
    /// Print the raw JSON reply.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct DeployArgs {
    /// Host to route (repeat for more); `*.example.com` matches one level of subdomain.
    #[arg(long = "host", required = true)]
    hosts: Vec<String>,
    #[arg(long)]
    project: String,
    /// App name (default: the target's alias).
    #[arg(long, default_value = "")]
    app: String,
    /// alias:port inside the project's network (ip:port[,ip:port] only with a proxy started
    /// with --allow-literal-targets).
    #[arg(long)]
    target: String,
    /// Docker network to resolve in: <project>-network, the default and the only one accepted.
    #[arg(long, default_value = "")]
    network: String,
    #[command(flatten)]
    health: HealthArgs,
    /// Per-request time to receive response headers once the request is sent (504 after).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    response_timeout: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// How long an idle upstream connection may be reused; keep it below the app's keep-alive
    /// idle limit (0 opens a fresh connection for every request).
    #[arg(long, default_value = "1500ms", value_parser = parse_duration)]
    pool_idle_timeout: Duration,
    /// Largest request body passed to the app (413 above it).
    #[arg(long, default_value = "100MiB", value_parser = parse_bytes)]
    max_body: usize,
    /// How long every replica has to pass its health check.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    deploy_timeout: Duration,
    /// How long the old release may finish in-flight requests.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct HealthArgs {
    #[arg(long, default_value = "/up")]
    health_path: String,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    health_interval: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    health_timeout: Duration,
}

impl HealthArgs {
    fn settings(&self) -> HealthSettings {
        HealthSettings {
            path: self.health_path.clone(),
            interval_ms: self.health_interval.as_millis() as u64,
            timeout_ms: self.health_timeout.as_millis() as u64,
            ..HealthSettings::default()
        }
    }
}

#[derive(Args)]
struct CheckArgs {
    #[arg(long)]
    project: String,
    #[arg(long)]
    target: String,
    #[arg(long, default_value = "")]
    network: String,
    #[command(flatten)]
    health: HealthArgs,
    /// Keep probing until every replica passes or this time ends.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct RemoveArgs {
    #[arg(long)]
    project: String,
    #[arg(long)]
    app: String,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// The environment variable a refused value came from, when it came from one: clap's error
/// names only the flag (`--workers`), and a proxy in a container is set up by its environment,
/// where no `--workers` appears. `args`: the command line; `var`: the environment.
fn refused_env_value(
    e: &clap::Error,
    args: &[String],
    var: impl Fn(&str) -> bool,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use clap::CommandFactory;
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let cmd = Cli::command();
    let arg = std::iter::once(&cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| {
            a.get_long().is_some_and(|l| {
                shown.starts_with(&format!("--{l} ")) || *shown == format!("--{l}")
            })
        })?;
    let long = format!("--{}", arg.get_long()?);
    let env = arg.get_env()?.to_str()?;
    let on_command_line = args
        .iter()
        .any(|a| *a == long || a.starts_with(&format!("{long}=")));
    (!on_command_line && var(env)).then(|| env.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Lossy: a non-UTF-8 argument must not turn clap's error into a panic.
            let args: Vec<String> = std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let from = refused_env_value(&e, &args, |v| std::env::var_os(v).is_some());
            let _ = e.print();
            if let Some(var) = from {
                eprintln!("note: the value is {var}'s, from the environment");
            }
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    // Serving is thread-per-core (see workers.rs): this thread runs worker 0 plus the admin
    // API and background checks; `serve` adds the others. Client commands need one thread.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("luma-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luma-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Serve(a) => serve(*a).await,
        Cmd::Deploy(a) => {
            let req = DeployRequest {
                route: RouteSpec {
                    project: a.project,
                    app: a.app,
                    hosts: a.hosts,
                    target: a.target,
                    network: a.network,
                    health: a.health.settings(),
                    timeouts: RouteTimeouts {
                        connect_ms: a.connect_timeout.as_millis() as u64,
                        response_ms: a.response_timeout.as_millis() as u64,
                        pool_idle_ms: a.pool_idle_timeout.as_millis() as u64,
                    },
                    limits: luma_api::route::RouteLimits {
                        max_body_bytes: a.max_body as u64,
                    },
                    tls: None,
                },
                certificate: None,
                acme_account: None,
                deploy_timeout_ms: Some(a.deploy_timeout.as_millis() as u64),
                drain_timeout_ms: Some(a.drain_timeout.as_millis() as u64),
            };
            let v = op(&a.client, &req).await?;
            print(a.json, &v, || {
                let r = &v.route;
                let drained = v
                    .drain
                    .as_ref()
                    .map(|d| format!(", drained old release in {} ms", d.waited_ms))
                    .unwrap_or_default();
                let already = if v.already_live {
                    " (already live)"
                } else {
                    ""
                };
                format!(
                    "deployed {}/{} -> {} ({} backends healthy){drained}{already}\n  hosts: {}",
                    r.project,
                    r.app,
                    r.target,
                    v.backends.len(),
                    r.hosts.join(", ")
                )
            })
        }
        Cmd::Check(a) => {
            let req = CheckRequest {
                project: a.project,
                target: a.target,
                network: a.network,
                health: a.health.settings(),
                timeout_ms: Some(a.timeout.as_millis() as u64),
            };
            let v = op(&a.client, &req).await?;
            print(a.json, &v, || {
                format!("healthy: {}", backends_table(&v.backends))
            })
        }
        Cmd::Remove(a) => {
            let req = RemoveRequest {
                project: a.project,
                app: a.app,
                drain_timeout_ms: Some(a.drain_timeout.as_millis() as u64),
            };
            let v = op(&a.client, &req).await?;
            print(a.json, &v, || {
                format!("removed; drained in {} ms", v.waited_ms)
            })
        }
        Cmd::List(a) => {
            let v = op(&a.client, &RoutesRequest {}).await?;
            print(a.json, &v, || routes_table(&v))
        }
        Cmd::Flush {
            project,
            json,
            client: c,
        } => {
            let v = op(&c, &FlushRequest { project }).await?;
            print(json, &v, || {
                format!("refreshing {} routes of {}", v.routes_refreshed, v.project)
            })
        }
        Cmd::Status(a) => {
            let v = op(&a.client, &StatusRequest {}).await?;
            print(a.json, &v, || {
                let mut s = String::new();
                if let Ok(serde_json::Value::Object(o)) = serde_json::to_value(&v) {
                    for (k, val) in o {
                        s.push_str(&format!("{k:<18} {val}\n"));
                    }
                }
                s.trim_end().to_string()
            })
        }
        Cmd::Certs(a) => {
            let req = luma_api::CertificatesRequest {
                project: a.project,
                hosts: a.hosts,
            };
            let v = op(&a.client, &req).await?;
            print(a.json, &v, || certs_table(&v))
        }
        Cmd::Metrics(c) => {
            let reply = client(&c, Duration::from_secs(10))?
                .call(Method::GET, "/metrics", None)
                .await
                .map_err(|e| e.to_string())?;
            if !reply.ok() {
                return Err(reply.body);
            }
            print!("{}", reply.body);
            Ok(())
        }
        Cmd::Call(c) => call(&c).await,
        Cmd::HoldLock => {
            // The lock container lives as long as its holder's attached stdin (StdinOnce).
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            Ok(())
        }
    }
}

/// `luma-proxy call`: one `luma_api::Request` on stdin, one envelope on stdout.
async fn call(c: &ClientArgs) -> Result<(), String> {
    let mut input = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)
        .map_err(|e| format!("read the request from stdin: {e}"))?;
    let envelope: Envelope<serde_json::Value> =
        match serde_json::from_str::<luma_api::Request>(&input) {
            Err(e) => Envelope::Err(ApiError::new(
                luma_api::ErrorKind::Invalid,
                format!("stdin is not a luma-proxy request ({e})"),
            )),
            Ok(req) => {
                let (method, path) = req.method_and_path();
                let method = Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
                let result = match client(c, req.reply_within()) {
                    Ok(cl) => cl.call(method, path, req.body()).await,
                    Err(e) => Err(ApiError::new(luma_api::ErrorKind::Unreachable, e)),
                };
                match result.and_then(|r| r.decode::<serde_json::Value>()) {
                    Ok(v) => Envelope::Ok(v),
                    Err(e) => Envelope::Err(e),
                }
            }
        };
    let failed = matches!(envelope, Envelope::Err(_));
    println!(
        "{}",
        serde_json::to_string(&envelope).map_err(|e| e.to_string())?
    );
    if failed {
        std::process::exit(3);
    }
    Ok(())
}

/// One typed admin call from the command line; the deadline covers the slowest operation.
async fn op<O: Operation + Clone>(c: &ClientArgs, req: &O) -> Result<O::Reply, String> {
    let within: luma_api::Request = req.clone().into();
    let within = within.reply_within();
    client(c, within)?.op(req).await.map_err(|e| e.to_string())
}

fn client(c: &ClientArgs, timeout: Duration) -> Result<AdminClient, String> {
    let path = c
        .token_file
        .clone()
        .unwrap_or_else(|| c.state_dir.join(luma_proxy::token::TOKEN_FILE));
    Ok(AdminClient {
        addr: c.admin,
        token: luma_proxy::token::read(&path)?,
        timeout,
    })
}

/// Prints a reply as JSON or as text.
fn print<T: serde::Serialize>(json: bool, v: &T, text: impl Fn() -> String) -> Result<(), String> {
    if json {
        let s = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
        println!("{s}");
    } else {
        println!("{}", text());
    }
    Ok(())
}

fn backends_table(b: &[BackendReport]) -> String {
    let mut s = format!(
        "\n  {:<24} {:<9} {:>8} {:>10}  {}",
        "BACKEND", "HEALTH", "INFLIGHT", "REQUESTS", "LAST ERROR"
    );
    for r in b {
        s.push_str(&format!(
            "\n  {:<24} {:<9} {:>8} {:>10}  {}",
            r.addr,
            if r.healthy { "healthy" } else { "DOWN" },
            r.inflight,
            r.requests,
            r.error.as_deref().unwrap_or("")
        ));
    }
    s
}

fn certs_table(v: &luma_api::CertificatesReply) -> String {
    if v.certificates.is_empty() {
        return "no routes with HTTPS".into();
    }
    let when = |t: Option<u64>| t.map(luma_api::time::display).unwrap_or_default();
    let mut s = format!(
        "{:<32} {:<16} {:<10} {:<7} {:<24} {:<21} {}",
        "HOST", "PROJECT", "STATE", "SOURCE", "ISSUER", "EXPIRES", "NOTE"
    );
    for c in &v.certificates {
        let note = match (&c.last_error, c.next_attempt) {
            (Some(e), Some(n)) => format!("{e} (next try {})", luma_api::time::display(n)),
            (Some(e), None) => e.clone(),
            (None, _) => c
                .renew_at
                .map(|r| format!("renews {}", luma_api::time::display(r)))
                .unwrap_or_default(),
        };
        s.push_str(&format!(
            "\n{:<32} {:<16} {:<10} {:<7} {:<24} {:<21} {}",
            c.host,
            c.project,
            c.state.as_str(),
            c.source,
            c.issuer.as_deref().unwrap_or(""),
            when(c.not_after),
            note
        ));
    }
    s
}

fn routes_table(v: &RoutesReply) -> String {
    if v.routes.is_empty() {
        return "no routes".into();
    }
    let mut s = String::new();
    for r in &v.routes {
        let spec = &r.route;
        s.push_str(&format!(
            "{}/{}  {} -> {} (network {}){}\n",
            spec.project,
            spec.app,
            spec.hosts.join(","),
            spec.target,
            spec.network,
            backends_table(&r.backends)
        ));
    }
    s.trim_end().to_string()
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    let mut ca_roots = a.acme_ca_root_pem.filter(|p| !p.trim().is_empty());
    if let Some(path) = &a.acme_ca_root {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("--acme-ca-root {}: {e}", path.display()))?;
        ca_roots = Some(match ca_roots {
            Some(more) => format!("{pem}\n{more}"),
            None => pem,
        });
    }
    if a.acme_orders_per_hour == 0
        || a.acme_retry_min.is_zero()
        || a.acme_retry_max < a.acme_retry_min
    {
        return Err("--acme-orders-per-hour must be at least 1, and 0 < --acme-retry-min <= --acme-retry-max".into());
    }
    let cfg = ProxyConfig {
        http_addr: a.http,
        https_addr: a.https,
        https_public_port: a.https_public_port,
        tls_handshake_timeout: a.tls_handshake_timeout,
        acme: luma_proxy::config::AcmeSettings {
            directory: luma_proxy::config::AcmeSettings::parse_directory(&a.acme_directory)?,
            email: a.acme_email.filter(|e| !e.trim().is_empty()),
            ca_roots_pem: ca_roots,
            retry_min: a.acme_retry_min,
            retry_max: a.acme_retry_max,
            orders_per_hour: a.acme_orders_per_hour,
        },
        admin_addr: a.admin,
        state_dir: a.state_dir,
        token_file: a.token_file,
        dns: a.dns,
        self_name: a
            .self_name
            .unwrap_or_else(luma_proxy::resolve::default_self_name),
        refresh_every: a.refresh_every,
        access_log: !a.no_access_log,
        access_log_buffer: a.access_log_buffer,
        max_connections: a.max_connections,
        header_read_timeout: a.header_read_timeout,
        idle_timeout: a.idle_timeout,
        max_header_bytes: a.max_header_size,
        shutdown_timeout: a.shutdown_timeout,
        first_byte_timeout: a.first_byte_timeout,
        park_after: a.park_after,
        metrics: a.metrics,
        metrics_labels: a.metrics_labels,
        trusted_proxies: a.trusted_proxies,
        allow_literal_targets: a.allow_literal_targets,
    };
    let workers = a
        .workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    luma_proxy::workers::set_count(workers);
    // Each serving thread's freed pages go back to the kernel within seconds, idle or not.
    #[cfg(feature = "mimalloc")]
    {
        luma_proxy::workers::set_upkeep(|| {
            // SAFETY: mi_collect may be called from any thread at any time: it collects the
            // caller's heap and purges expired arena memory under mimalloc's own locks.
            unsafe { libmimalloc_sys::mi_collect(false) }
        });
        // SAFETY: reading an option is thread-safe.
        if unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT) } != 0 {
            luma_proxy::log::warn(
                "mimalloc commits its arenas eagerly (built without the define in .cargo/config.toml?): memory freed after a burst of connections will not lower RSS",
                serde_json::json!({}),
            );
        }
    }
    let mut running = luma_proxy::Proxy::start(cfg).await?;
    running.add_workers(workers - 1)?;
    wait_for_signal().await;
    running.shutdown().await;
    luma_proxy::log::info("luma-proxy stopped", serde_json::json!({}));
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The switches set by environment take what people write for yes and no, not only
    /// clap's `true`/`false` (a proxy that refuses `1` exits at start).
    #[test]
    fn switches_from_the_environment_take_yes_and_no_words() {
        // This binary's only test, so nothing else reads the environment meanwhile. Every
        // LUMA_PROXY_* variable of the caller's environment is cleared, so none of them can
        // fail the parse.
        struct Restore(Vec<(std::ffi::OsString, std::ffi::OsString)>);
        impl Drop for Restore {
            fn drop(&mut self) {
                for (k, v) in &self.0 {
                    std::env::set_var(k, v);
                }
            }
        }
        let _restore = Restore(
            std::env::vars_os()
                .filter(|(k, _)| k.to_string_lossy().starts_with("LUMA_PROXY_"))
                .inspect(|(k, _)| std::env::remove_var(k))
                .collect(),
        );
        fn serve_with(var: &str, v: &str) -> Result<Box<ServeArgs>, String> {
            std::env::set_var(var, v);
            let parsed = Cli::try_parse_from(["luma-proxy", "serve"]);
            std::env::remove_var(var);
            match parsed.map_err(|e| e.to_string())?.cmd {
                Cmd::Serve(a) => Ok(a),
                _ => Err("not serve".into()),
            }
        }
        type Switch = fn(&ServeArgs) -> bool;
        let switches: [(&str, Switch); 2] = [
            ("LUMA_PROXY_NO_ACCESS_LOG", |a| a.no_access_log),
            ("LUMA_PROXY_ALLOW_LITERAL_TARGETS", |a| {
                a.allow_literal_targets
            }),
        ];
        for (var, get) in switches {
            for (words, want) in [
                (["1", "true", "yes", "on"], true),
                (["0", "false", "no", "off"], false),
            ] {
                for w in words {
                    let a = serve_with(var, w).unwrap_or_else(|e| panic!("{var}={w}: {e}"));
                    assert_eq!(get(&a), want, "{var}={w}");
                }
            }
            assert!(serve_with(var, "maybe").is_err(), "{var}=maybe");
        }

        // A refused value from the environment is said to be the variable's, not the flag's.
        std::env::set_var("LUMA_PROXY_WORKERS", "many");
        let from_env = Cli::try_parse_from(["luma-proxy", "serve"]).err();
        let from_flag = Cli::try_parse_from(["luma-proxy", "serve", "--workers", "lots"]).err();
        std::env::remove_var("LUMA_PROXY_WORKERS");
        let set = |v: &str| v == "LUMA_PROXY_WORKERS";
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = from_env.expect("LUMA_PROXY_WORKERS=many was accepted");
        assert_eq!(
            refused_env_value(&e, &args(&["luma-proxy", "serve"]), set).as_deref(),
            Some("LUMA_PROXY_WORKERS"),
            "{e}"
        );
        let e = from_flag.expect("--workers lots was accepted");
        let flag = args(&["luma-proxy", "serve", "--workers", "lots"]);
        assert_eq!(refused_env_value(&e, &flag, set), None, "{e}");
    }
}
