//! `luma-proxy`: the server (`serve`) and the client of its own admin API (everything else).

use clap::{Args, Parser, Subcommand};
use hyper::Method;
use luma_proxy::client::AdminClient;
use luma_proxy::deploy::{CheckRequest, DeployRequest, RemoveRequest};
use luma_proxy::route::{HealthSettings, RouteSpec, RouteTimeouts};
use luma_proxy::util::{parse_bytes, parse_duration};
use luma_proxy::ProxyConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    Serve(ServeArgs),
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
    /// Print Prometheus metrics.
    Metrics(ClientArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Public HTTP listen address.
    #[arg(long, env = "LUMA_PROXY_HTTP", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
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
    /// Turn off the JSON access log on stdout.
    #[arg(long, env = "LUMA_PROXY_NO_ACCESS_LOG")]
    no_access_log: bool,
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
    /// alias:port inside the project's network (or ip:port[,ip:port] with no network).
    #[arg(long)]
    target: String,
    /// Docker network to resolve in (default: <project>-network; `host` for system DNS).
    #[arg(long, default_value = "")]
    network: String,
    #[command(flatten)]
    health: HealthArgs,
    /// Per-request time to receive response headers (504 after).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    response_timeout: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    connect_timeout: Duration,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Cmd::Serve(a) => serve(a).await,
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
                    },
                },
                deploy_timeout_ms: Some(a.deploy_timeout.as_millis() as u64),
                drain_timeout_ms: Some(a.drain_timeout.as_millis() as u64),
            };
            let slack = a.deploy_timeout + a.drain_timeout + Duration::from_secs(30);
            let reply = client(&a.client, slack)?
                .call(Method::POST, "/v1/deploy", Some(to_json(&req)))
                .await?;
            report(&reply, a.json, |v| {
                let r = &v["route"];
                let drained = v["drain"]["waited_ms"]
                    .as_u64()
                    .map(|ms| format!(", drained old release in {ms} ms"))
                    .unwrap_or_default();
                format!(
                    "deployed {}/{} -> {} ({} backends healthy){drained}\n  hosts: {}",
                    r["project"].as_str().unwrap_or(""),
                    r["app"].as_str().unwrap_or(""),
                    r["target"].as_str().unwrap_or(""),
                    v["backends"].as_array().map(|b| b.len()).unwrap_or(0),
                    r["hosts"]
                        .as_array()
                        .map(|h| h
                            .iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
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
            let reply = client(&a.client, a.timeout + Duration::from_secs(30))?
                .call(Method::POST, "/v1/check", Some(to_json(&req)))
                .await?;
            report(&reply, a.json, |v| {
                format!("healthy: {}", backends_table(&v["backends"]))
            })
        }
        Cmd::Remove(a) => {
            let req = RemoveRequest {
                project: a.project,
                app: a.app,
                drain_timeout_ms: Some(a.drain_timeout.as_millis() as u64),
            };
            let reply = client(&a.client, a.drain_timeout + Duration::from_secs(30))?
                .call(Method::POST, "/v1/remove", Some(to_json(&req)))
                .await?;
            report(&reply, a.json, |v| {
                format!("removed; drained in {} ms", v["waited_ms"])
            })
        }
        Cmd::List(a) => {
            let reply = client(&a.client, Duration::from_secs(10))?
                .call(Method::GET, "/v1/routes", None)
                .await?;
            report(&reply, a.json, routes_table)
        }
        Cmd::Flush {
            project,
            json,
            client: c,
        } => {
            let reply = client(&c, Duration::from_secs(10))?
                .call(
                    Method::POST,
                    "/v1/flush",
                    Some(serde_json::json!({"project": project})),
                )
                .await?;
            report(&reply, json, |v| {
                format!("refreshing {} routes of {project}", v["routes_refreshed"])
            })
        }
        Cmd::Status(a) => {
            let reply = client(&a.client, Duration::from_secs(10))?
                .call(Method::GET, "/v1/status", None)
                .await?;
            report(&reply, a.json, |v| {
                let mut s = String::new();
                if let Some(o) = v.as_object() {
                    for (k, val) in o {
                        s.push_str(&format!("{k:<18} {val}\n"));
                    }
                }
                s.trim_end().to_string()
            })
        }
        Cmd::Metrics(c) => {
            let reply = client(&c, Duration::from_secs(10))?
                .call(Method::GET, "/metrics", None)
                .await?;
            if !reply.ok() {
                return Err(reply.body);
            }
            print!("{}", reply.body);
            Ok(())
        }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
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

/// Prints a reply as JSON or as text; a non-2xx reply becomes the error (exit code 1).
fn report(
    reply: &luma_proxy::client::Reply,
    json: bool,
    text: impl Fn(&serde_json::Value) -> String,
) -> Result<(), String> {
    let v = reply.json();
    if json {
        println!("{v:#}");
    }
    if !reply.ok() {
        let mut msg = v["error"].as_str().unwrap_or("request failed").to_string();
        if v["backends"].is_array() {
            msg.push('\n');
            msg.push_str(&backends_table(&v["backends"]));
        }
        return Err(msg);
    }
    if !json {
        println!("{}", text(&v));
    }
    Ok(())
}

fn backends_table(b: &serde_json::Value) -> String {
    let mut s = format!(
        "\n  {:<24} {:<9} {:>8} {:>10}  {}",
        "BACKEND", "HEALTH", "INFLIGHT", "REQUESTS", "LAST ERROR"
    );
    for r in b.as_array().into_iter().flatten() {
        s.push_str(&format!(
            "\n  {:<24} {:<9} {:>8} {:>10}  {}",
            r["addr"].as_str().unwrap_or("?"),
            if r["healthy"].as_bool() == Some(true) {
                "healthy"
            } else {
                "DOWN"
            },
            r["inflight"].as_u64().unwrap_or(0),
            r["requests"].as_u64().unwrap_or(0),
            r["error"].as_str().unwrap_or("")
        ));
    }
    s
}

fn routes_table(v: &serde_json::Value) -> String {
    let routes = v["routes"].as_array().cloned().unwrap_or_default();
    if routes.is_empty() {
        return "no routes".into();
    }
    let mut s = String::new();
    for r in routes {
        let spec = &r["route"];
        s.push_str(&format!(
            "{}/{}  {} -> {} (network {}){}\n",
            spec["project"].as_str().unwrap_or(""),
            spec["app"].as_str().unwrap_or(""),
            spec["hosts"]
                .as_array()
                .map(|h| h
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            spec["target"].as_str().unwrap_or(""),
            spec["network"].as_str().unwrap_or(""),
            backends_table(&r["backends"])
        ));
    }
    s.trim_end().to_string()
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    let cfg = ProxyConfig {
        http_addr: a.http,
        admin_addr: a.admin,
        state_dir: a.state_dir,
        token_file: a.token_file,
        dns: a.dns,
        self_name: a
            .self_name
            .unwrap_or_else(luma_proxy::resolve::default_self_name),
        access_log: !a.no_access_log,
        max_connections: a.max_connections,
        header_read_timeout: a.header_read_timeout,
        idle_timeout: a.idle_timeout,
        max_header_bytes: a.max_header_size,
        shutdown_timeout: a.shutdown_timeout,
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
