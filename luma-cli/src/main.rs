//! `luma`: zero-downtime blue-green deploys of many projects to one Docker engine.

use clap::{Parser, Subcommand};
use luma_cli::config::Config;
use luma_cli::fleet::{self, Fleet};
use luma_cli::inventory;
use luma_cli::project::{self, Ctx};
use luma_cli::proxyctl::{self, ProxySettings};
use luma_cli::release::{self, ReleaseError};
use luma_cli::secrets::Secrets;
use luma_cli::ui::{table, Ui};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Deploy Docker apps to your own servers with zero downtime.
///
/// Luma reads luma.yml, builds your images on the engine (no registry), starts the new release
/// beside the old one, has luma-proxy health-check every new replica inside your project's own
/// Docker network, switches traffic atomically, drains the old release and keeps it stopped for
/// rollback. Many projects share one server, even when their apps have the same names.
///
/// Every routed app gets HTTPS by default: a certificate per host, ordered over ACME when it is
/// deployed (`proxy.ssl`, `proxy.acme` in luma.yml; see `luma deploy --help`).
///
/// Start with `luma init`, edit luma.yml, then `luma deploy`.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Path to luma.yml.
    #[arg(short, long, global = true, default_value = "luma.yml")]
    config: PathBuf,
    /// Show every engine operation.
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Work on this server only (repeatable; default: every server of the apps concerned).
    /// A server is `local` or an ssh destination, as written in luma.yml.
    #[arg(long = "server", global = true, value_name = "SERVER")]
    server: Vec<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a commented luma.yml and an empty .luma/secrets (never overwrites).
    Init,
    /// Prepare the engine: the proxy, the project network, services. `deploy` does this too.
    Setup,
    /// Build and release apps with zero downtime (all apps when none are named).
    ///
    /// The release id is the git short sha (a time-based id outside git). A dirty tree is
    /// refused unless --force. Each app goes through three phases:
    ///
    /// 1. prepare (undone on any failure or Ctrl-C): build, start new replicas beside the old
    ///    release, the proxy checks every one, give them the app alias;
    /// 2. switch, the point of no return: the proxy swaps the route and drains the old release;
    /// 3. settle (finished, never undone; Ctrl-C waits for it): record the live release, stop
    ///    the old one (kept for `luma rollback`), prune old releases.
    ///
    /// HTTPS: every app with `proxy.ssl: true` (the default) gets a certificate per host. The
    /// proxy orders it over ACME as the route goes live, and luma then waits up to --cert-wait
    /// for it, printing per host one of:
    ///
    /// - `https://HOST  certificate issued by ISSUER, expires DATE`
    ///
    /// - `http://HOST  pending: REASON` (the CA's words; HTTP keeps serving, not a failure)
    ///
    /// - `http://HOST  HTTP only: WHY` (e.g. .test names with a public CA, or ACME off)
    ///
    /// Until a host has its certificate it is served over HTTP and not redirected.
    /// `ssl: {certificate: SECRET, private_key: SECRET}` uses your own PEM certificate from
    /// .luma/secrets instead; it is checked (valid now, covers every host, key matches) before
    /// anything changes.
    ///
    /// Servers: an app with `servers: [a, b]` is released on all of them or on none. The image
    /// is built here and streamed to each server over SSH (or pulled from `docker.registry`),
    /// the new release is started and health-checked on every server at once, and only if every
    /// one passed does any server switch. If a switch fails after others succeeded, those are
    /// put back on their previous release.
    ///
    /// Exit status: 0 done (also with certificates pending); 1 nothing changed (the old release
    /// keeps serving); 2 the new release is live but settling stopped (`luma prune` finishes
    /// it); 3 unknown (see `luma status`); 4 servers were left on different releases (the
    /// message says which; `luma status` shows them).
    ///
    /// Examples: `luma deploy`, `luma deploy web`, `luma -c examples/basic/luma.yml deploy`,
    /// `luma deploy --cert-wait 0`, `LUMA_SSH_CONFIG=./ssh_config luma deploy`.
    Deploy {
        /// Apps to deploy (default: every app in luma.yml).
        apps: Vec<String>,
        /// Deploy even with uncommitted changes.
        #[arg(long)]
        force: bool,
        /// Earlier releases kept stopped for rollback.
        #[arg(long, default_value_t = 2)]
        retain: usize,
        /// How long to wait after the switch for the certificates of the apps' HTTPS hosts
        /// (`500ms`, `90s`, `2m`, or seconds); 0 asks once without waiting. Certificates
        /// still pending then keep being ordered in the background (`luma status`).
        #[arg(long, default_value = "60s", value_parser = cert_wait, value_name = "DURATION")]
        cert_wait: std::time::Duration,
    },
    /// Live release, replicas, container state and proxy health per app; services; the
    /// certificate of every HTTPS host (state, issuer, expiry, last error).
    Status {
        /// Apps to show (default: all).
        apps: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Go back to a retained release (the newest earlier one by default), health-gated.
    Rollback {
        /// The app to roll back.
        app: String,
        /// A retained release id (see `luma status`); default: the newest earlier one.
        release: Option<String>,
    },
    /// Take down apps (all apps, services, routes and the network when none are named).
    ///
    /// Everything is found by its labels on the engine, so apps and services no longer in
    /// luma.yml go too; their routes are removed from the proxy (freeing their hosts) and the
    /// images Luma built for them are deleted. Named volumes are kept.
    Remove {
        /// Apps to remove (default: the whole project).
        apps: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Finish what a deploy left: settle every app from the proxy's truth and clean up.
    ///
    /// For each app in luma.yml: record the release the proxy serves, stop the others, remove
    /// releases beyond --retain and the images of failed releases. Then remove apps and
    /// services that are on the engine but no longer in luma.yml (asks first; --yes to skip).
    ///
    /// Run it when `luma deploy` exits with status 2, or after deleting an app from luma.yml.
    Prune {
        /// Do not ask before removing apps and services that left luma.yml.
        #[arg(long)]
        yes: bool,
        /// Earlier releases kept stopped for rollback.
        #[arg(long, default_value_t = 2)]
        retain: usize,
    },
    /// Print an app's logs (every replica of the live release).
    Logs {
        /// The app whose live replicas to show.
        app: String,
        #[arg(short, long)]
        follow: bool,
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
    /// Manage the shared luma-proxy container.
    Proxy {
        #[command(subcommand)]
        cmd: ProxyCmd,
    },
}

#[derive(Subcommand)]
enum ProxyCmd {
    /// Container state and the proxy's own status.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Proxy logs.
    Logs {
        #[arg(short, long)]
        follow: bool,
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
    /// Restart the proxy; routes come back from its state volume.
    Restart,
    /// Replace the proxy container with the configured image, keeping its state volume and
    /// reconnecting every network it was on.
    Update,
}

fn cert_wait(v: &str) -> Result<std::time::Duration, String> {
    let d = luma_cli::config::parse_duration(v)?;
    if d > std::time::Duration::from_secs(3600) {
        return Err("at most 60m; certificates keep being ordered after luma exits".into());
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("luma: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luma: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The servers a command works on: those of the named apps (every server of the project when
/// none are named), narrowed by `--server`.
fn servers_for(cfg: &Config, apps: &[String], only: &[String]) -> Result<Vec<String>, String> {
    let mut names = if apps.is_empty() {
        fleet::all_servers(cfg)
    } else {
        let entries = apps
            .iter()
            .map(|a| cfg.app(a))
            .collect::<Result<Vec<_>, _>>()?;
        fleet::server_names(entries)
    };
    if !only.is_empty() {
        let all = fleet::all_servers(cfg);
        if let Some(unknown) = only.iter().find(|s| !all.contains(s)) {
            return Err(format!(
                "--server {unknown}: not a server of {} (its servers: {})",
                cfg.path.display(),
                all.join(", ")
            ));
        }
        names.retain(|n| only.contains(n));
    }
    Ok(names)
}

async fn run(cli: Cli) -> Result<(), ReleaseError> {
    let ui = Ui::new(cli.verbose, false);
    if let Cmd::Init = cli.cmd {
        return Ok(init(&cli.config)?);
    }
    let cfg = Config::load(&cli.config).map_err(|e| e.0)?;
    let dir = cfg
        .path
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| ".".into());
    let secrets = Secrets::load(&dir)?;
    let proxy = ProxySettings::resolve(&cfg)?;
    // What only a proxy luma makes uses is checked where one may be made, before anything changes.
    if matches!(
        cli.cmd,
        Cmd::Setup
            | Cmd::Deploy { .. }
            | Cmd::Proxy {
                cmd: ProxyCmd::Update
            }
    ) {
        proxy.check()?;
    }
    let no_apps: Vec<String> = Vec::new();
    // A deploy connects to every server of the project: setup runs on all of them.
    let selected: &[String] = match &cli.cmd {
        Cmd::Rollback { app, .. } | Cmd::Logs { app, .. } => std::slice::from_ref(app),
        _ => &no_apps,
    };
    let names = servers_for(&cfg, selected, &cli.server)?;
    if let Cmd::Deploy { apps, .. } = &cli.cmd {
        refuse_split_release(&cfg, apps, &names)?;
    }
    // Looking needs no server to be reachable: status shows the ones that are not.
    let (fleet, unreachable) = if let Cmd::Status { .. } = &cli.cmd {
        Fleet::connect_reachable(&cfg, &names, &ui, cli.verbose).await
    } else {
        (
            Fleet::connect(&cfg, &names, &ui, cli.verbose).await?,
            Vec::new(),
        )
    };
    let retain = match &cli.cmd {
        Cmd::Deploy { retain, .. } | Cmd::Prune { retain, .. } => *retain,
        _ => 2,
    };
    let ctxs = fleet.ctxs(&cfg, &secrets, &proxy, retain);
    let several = ctxs.len() > 1;
    let out: Result<(), ReleaseError> = match cli.cmd {
        Cmd::Init => unreachable!("handled above"),
        Cmd::Setup => setup(&fleet, &ctxs).await.map_err(Into::into),
        Cmd::Deploy {
            apps,
            force,
            retain: _,
            cert_wait,
        } => {
            let started = std::time::Instant::now();
            release::deploy(&fleet, &ctxs, &apps, force, cert_wait)
                .await
                .map(|done| {
                    ui.info(format!(
                        "✓ deployed {} in {:.1}s{}",
                        cfg.project,
                        started.elapsed().as_secs_f64(),
                        if several {
                            format!(" to {}", names.join(", "))
                        } else {
                            String::new()
                        }
                    ));
                    let on = |server: &str| {
                        if several {
                            format!("[{server}] ")
                        } else {
                            String::new()
                        }
                    };
                    for u in done.urls {
                        let via = u.via.as_deref().unwrap_or("-");
                        match u.answered {
                            Ok(code) => {
                                println!("{}{}  (via {via}, answered {code})", on(&u.server), u.url)
                            }
                            Err(why) => println!(
                                "{}{}  (not answering from here: {why})",
                                on(&u.server),
                                u.url
                            ),
                        }
                    }
                    for (server, c) in &done.certificates {
                        println!("{}{}", on(server), luma_cli::tls::report_line(c));
                    }
                    for e in done.certificates_errors {
                        ui.info(format!(
                            "! could not ask the proxy about certificates ({e}); `luma status` shows them"
                        ));
                    }
                })
        }
        Cmd::Status { apps, json } => status(&ctxs, &apps, json, &unreachable)
            .await
            .map_err(Into::into),
        Cmd::Rollback { app, release } => release::rollback(&ctxs, &app, release.as_deref())
            .await
            .map(|r| ui.info(format!("✓ {app} is back on release {r}"))),
        Cmd::Prune { yes, retain: _ } => on_each(&ctxs, |ctx| prune(ctx, yes))
            .await
            .map_err(Into::into),
        Cmd::Remove { apps, yes } => {
            let everything = apps.is_empty();
            let targets = apps;
            let what = if everything {
                format!(
                    "project {} (apps, services, routes and network; named volumes are kept) on {}",
                    cfg.project,
                    names.join(", ")
                )
            } else {
                format!(
                    "app(s) {} of project {} on {}",
                    targets.join(", "),
                    cfg.project,
                    names.join(", ")
                )
            };
            if !yes && !confirm(&format!("Remove {what}?"))? {
                return Err(ReleaseError::Failed(
                    "cancelled; nothing was removed".into(),
                ));
            }
            on_each(&ctxs, |ctx| inventory::remove(ctx, &targets, everything))
                .await
                .map_err(Into::into)
        }
        Cmd::Logs { app, follow, tail } => {
            logs(&ctxs, &app, follow, tail).await.map_err(Into::into)
        }
        Cmd::Proxy { cmd } => proxy_cmd(&fleet, &ctxs, cmd).await.map_err(Into::into),
    };
    out.map_err(|e| e.map_messages(|m| secrets.redact(m)))
}

/// Runs `f` on every server, one after the other (removing and settling change things that a
/// reader of the output must be able to follow), going on past a failing server; with several
/// servers the error says what happened on each.
async fn on_each<'c, 'a, F, Fut>(ctxs: &'c [Ctx<'a>], f: F) -> Result<(), String>
where
    F: Fn(&'c Ctx<'a>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut report = Vec::new();
    let mut failed = false;
    for ctx in ctxs {
        // A signal stops between servers; the rest are left as they are, and said so.
        if luma_cli::interrupt::requested() {
            failed = true;
            report.push(format!(
                "server {}: not touched ({})",
                ctx.server,
                luma_cli::interrupt::INTERRUPTED
            ));
            continue;
        }
        match f(ctx).await {
            Ok(()) => report.push(format!("server {}: done", ctx.server)),
            Err(e) => {
                failed = true;
                report.push(format!("server {}: failed: {e}", ctx.server));
            }
        }
    }
    match (failed, ctxs.len()) {
        (false, _) => Ok(()),
        (true, 1) => Err(report
            .remove(0)
            .split_once(": ")
            .map(|(_, e)| e.trim_start_matches("failed: ").to_string())
            .unwrap_or_default()),
        (true, _) => Err(report.join("\n")),
    }
}

/// A deploy narrowed by `--server` must not release an app on some of its servers only: that
/// would split it across releases. (`rollback --server` may, to repair one server.)
fn refuse_split_release(cfg: &Config, apps: &[String], names: &[String]) -> Result<(), String> {
    let entries: Vec<&luma_cli::config::Entry> = if apps.is_empty() {
        cfg.apps.iter().collect()
    } else {
        apps.iter().map(|a| cfg.app(a)).collect::<Result<_, _>>()?
    };
    for e in entries {
        let servers = e.servers();
        let here = servers.iter().filter(|s| names.contains(s)).count();
        if here != 0 && here != servers.len() {
            return Err(format!(
                "--server would release {} on some of its servers only (it runs on {}); name all of them, or change `servers` in {}",
                e.name,
                servers.join(", "),
                cfg.path.display()
            ));
        }
    }
    Ok(())
}

/// `luma setup`: the proxy image and the project's services' images on every server, then
/// the proxy, network and services everywhere at once, under the project's lock like a
/// deploy's setup (two setups, or a setup and a deploy, would race on the network and the
/// services).
async fn setup(fleet: &Fleet, ctxs: &[Ctx<'_>]) -> Result<(), String> {
    // The lock container runs the proxy image, so remote servers get it first.
    fleet::deliver_proxy_image(fleet, ctxs).await?;
    let locks = fleet::Locks::take(ctxs, "setup").await?;
    let result = async {
        if let Some(first) = ctxs.first() {
            for svc in &first.cfg.services {
                let tag = format!(
                    "{}:latest",
                    luma_cli::names::image_repo(&first.cfg.project, &svc.name)
                );
                fleet::deliver(fleet, &release::servers_of(ctxs, svc), svc, &tag).await?;
            }
        }
        fleet::on_all(ctxs, project::setup).await.map(|_| ())
    }
    .await;
    locks.release().await;
    result
}

async fn prune(ctx: &Ctx<'_>, yes: bool) -> Result<(), String> {
    let gone = inventory::departed(ctx).await?;
    let remove = !gone.is_empty()
        && (yes
            || confirm(&format!(
                "Remove {} (no longer in {})?",
                gone.join(", "),
                ctx.cfg.path.display()
            ))?);
    let gone = inventory::prune(ctx, remove).await?;
    if !gone.is_empty() && !remove {
        ctx.ui
            .info(format!("kept {} (not removed)", gone.join(", ")));
    }
    ctx.ui.info(format!("✓ {} settled", ctx.cfg.project));
    Ok(())
}

fn confirm(question: &str) -> Result<bool, String> {
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "{question} Refusing without a terminal to ask; pass --yes"
        ));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

async fn status(
    ctxs: &[Ctx<'_>],
    apps: &[String],
    json: bool,
    unreachable: &[String],
) -> Result<(), String> {
    // Every server that answers is shown; the others are named, and the exit status says
    // that the picture is incomplete.
    let results =
        futures_util::future::join_all(ctxs.iter().map(|c| inventory::status(c, apps))).await;
    let mut views = Vec::new();
    let mut missing: Vec<String> = unreachable.to_vec();
    for (c, r) in ctxs.iter().zip(results) {
        match r {
            Ok(v) => views.push(v),
            Err(e) => missing.push(format!("server {}: {e}", c.server)),
        }
    }
    let unreachable = &missing;
    let incomplete = || -> Result<(), String> {
        if unreachable.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the status of {} server(s) could not be read (above)",
                unreachable.len()
            ))
        }
    };
    let Some(first) = views.first() else {
        return Err(unreachable.join("\n"));
    };
    if json {
        let v = serde_json::json!({"project": first.project, "servers": views, "unreachable": unreachable});
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
        return incomplete();
    }
    println!("project {}  (network {})", first.project, first.network);
    for e in unreachable {
        println!("! {e}");
    }
    for v in &views {
        if let Some(l) = &v.lock {
            println!("deploy lock on {}: {}", v.server, l.describe());
        }
    }
    let cfg = ctxs[0].cfg;
    for app in cfg
        .apps
        .iter()
        .filter(|a| apps.is_empty() || apps.contains(&a.name))
    {
        let on: Vec<(&str, &inventory::AppStatus)> = views
            .iter()
            .filter_map(|v| {
                Some((
                    v.server.as_str(),
                    v.apps.iter().find(|a| a.app == app.name)?,
                ))
            })
            .collect();
        let Some((_, any)) = on.first() else {
            continue;
        };
        for (server, a) in &on {
            if !a.consistent {
                println!(
                    "\n! app {} on {server}: the proxy routes to release {} but the labels record {}; run `luma prune` to settle it",
                    a.app,
                    a.live_release.as_deref().unwrap_or("none"),
                    a.recorded_release.as_deref().unwrap_or("none")
                );
            }
        }
        let mut live: Vec<String> = on
            .iter()
            .map(|(_, a)| a.live_release.clone().unwrap_or_else(|| "none".into()))
            .collect();
        live.dedup();
        let live = if live.len() == 1 {
            live.remove(0)
        } else {
            on.iter()
                .map(|(s, a)| format!("{s}: {}", a.live_release.as_deref().unwrap_or("none")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "\napp {}  live release: {live}  hosts: {}",
            any.app,
            any.hosts.join(", ")
        );
        let rows: Vec<Vec<String>> = on
            .iter()
            .flat_map(|(server, a)| {
                a.replicas.iter().map(move |r| {
                    vec![
                        server.to_string(),
                        r.container.clone(),
                        r.release.clone(),
                        r.state.clone(),
                        r.ip.clone().unwrap_or_else(|| "-".into()),
                        r.proxy_health.unwrap_or("-").into(),
                    ]
                })
            })
            .collect();
        println!(
            "{}",
            table(
                &[
                    "SERVER",
                    "CONTAINER",
                    "RELEASE",
                    "STATE",
                    "IP",
                    "PROXY HEALTH"
                ],
                &rows
            )
        );
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .flat_map(|v| {
            v.services.iter().map(|s| {
                vec![
                    v.server.clone(),
                    s.service.clone(),
                    s.container.clone(),
                    s.state.clone(),
                ]
            })
        })
        .collect();
    if !rows.is_empty() {
        println!(
            "\n{}",
            table(&["SERVER", "SERVICE", "CONTAINER", "STATE"], &rows)
        );
    }
    let date = |t: Option<u64>| t.map_or_else(|| "-".into(), luma_api::time::display);
    let rows: Vec<Vec<String>> = views
        .iter()
        .flat_map(|v| {
            v.certificates.iter().map(|c| {
                vec![
                    v.server.clone(),
                    c.host.clone(),
                    c.state.as_str().into(),
                    c.issuer.clone().unwrap_or_else(|| "-".into()),
                    date(c.not_after),
                    c.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
        })
        .collect();
    if !rows.is_empty() {
        println!(
            "\ncertificates\n{}",
            table(
                &["SERVER", "HOST", "STATE", "ISSUER", "EXPIRES", "LAST ERROR"],
                &rows
            )
        );
    }
    for v in &views {
        if let Some(e) = &v.certificates_error {
            println!(
                "\n! certificates on {}: could not ask the proxy ({e})",
                v.server
            );
        }
        for d in &v.departed {
            println!(
                "\n! {d} is on {} but not in luma.yml; `luma prune` removes it",
                v.server
            );
        }
    }
    incomplete()
}

async fn logs(ctxs: &[Ctx<'_>], app: &str, follow: bool, tail: usize) -> Result<(), String> {
    let several = ctxs.len() > 1;
    let tasks = ctxs.iter().map(|ctx| async move {
        ctx.cfg.app(app)?;
        let live = release::live_release(ctx, app).await.ok().flatten();
        let releases = release::releases(ctx, app).await?;
        let (_, cs) = releases
            .iter()
            .rev()
            .find(|(r, _)| live.as_ref().is_none_or(|l| l == r))
            .ok_or_else(|| format!("{app} has no containers on {}; deploy it first", ctx.server))?;
        let streams: Vec<_> = cs
            .iter()
            .map(|c| {
                let name = luma_cli::engine::name_of(c);
                let replica = luma_cli::engine::label(c, "luma.replica").unwrap_or("?");
                let prefix = if several {
                    format!("[{} {replica}]", ctx.server)
                } else {
                    format!("[{replica}]")
                };
                async move { ctx.engine.stream_logs(&name, &prefix, follow, tail).await }
            })
            .collect();
        // With `-f` the streams never end, so the first error ends the command at once.
        futures_util::future::try_join_all(streams)
            .await
            .map(|_| ())
            .map_err(|e| {
                if several {
                    format!("server {}: {e}", ctx.server)
                } else {
                    e
                }
            })
    });
    futures_util::future::try_join_all(tasks).await.map(|_| ())
}

async fn proxy_cmd(fleet: &Fleet, ctxs: &[Ctx<'_>], cmd: ProxyCmd) -> Result<(), String> {
    match cmd {
        ProxyCmd::Status { json } => {
            let views = fleet::on_all(ctxs, proxy_status).await?;
            if json {
                println!("{:#}", serde_json::json!({ "servers": views }));
            } else {
                for v in views {
                    println!(
                        "server {}  container {}  image {}  state {}",
                        v["server"].as_str().unwrap_or("?"),
                        v["container"].as_str().unwrap_or("?"),
                        v["image"].as_str().unwrap_or("?"),
                        v["state"].as_str().unwrap_or("?")
                    );
                    let rows: Vec<Vec<String>> = v["proxy"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| vec![k.clone(), v.to_string()])
                        .collect();
                    println!("{}\n", table(&["KEY", "VALUE"], &rows));
                }
            }
            Ok(())
        }
        ProxyCmd::Logs { follow, tail } => {
            let several = ctxs.len() > 1;
            // With `-f` the streams never end, so the first error ends the command at once.
            futures_util::future::try_join_all(ctxs.iter().map(|c| async move {
                let prefix = if several {
                    format!("[{}]", c.server)
                } else {
                    String::new()
                };
                c.engine
                    .stream_logs(&c.proxy.container, &prefix, follow, tail)
                    .await
                    .map_err(|e| {
                        if several {
                            format!("server {}: {e}", c.server)
                        } else {
                            e
                        }
                    })
            }))
            .await
            .map(|_| ())
        }
        // One server at a time, each ready before the next: an app on several servers keeps
        // serving from the others.
        ProxyCmd::Restart => {
            for c in ctxs {
                c.ui.step(format!("restart {}", c.proxy.container), async {
                    c.engine.restart(&c.proxy.container).await?;
                    proxyctl::wait_ready(c.engine, &c.proxy).await
                })
                .await
                .map_err(|e| format!("server {}: {e}", c.server))?;
            }
            Ok(())
        }
        ProxyCmd::Update => {
            fleet::deliver_proxy_image(fleet, ctxs).await?;
            for c in ctxs {
                update_proxy(c)
                    .await
                    .map_err(|e| format!("server {}: {e}", c.server))?;
            }
            Ok(())
        }
    }
}

/// One server's proxy: its container and the proxy's own status, as JSON.
async fn proxy_status(ctx: &Ctx<'_>) -> Result<serde_json::Value, String> {
    let p = &ctx.proxy;
    let c = ctx
        .engine
        .inspect(&p.container)
        .await?
        .ok_or_else(|| format!("no proxy container {}; run `luma setup`", p.container))?;
    let state = c
        .state
        .as_ref()
        .and_then(|s| s.status)
        .map(|s| format!("{s:?}").to_lowercase())
        .unwrap_or_default();
    let image = c
        .config
        .as_ref()
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let inner = proxyctl::ask(ctx.engine, p, luma_api::StatusRequest {})
        .await
        .and_then(|r| serde_json::to_value(r).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| serde_json::json!({"error": e}));
    Ok(
        serde_json::json!({"server": ctx.server, "container": p.container, "image": image, "state": state, "proxy": inner}),
    )
}

/// Replaces the proxy container, keeping the state volume and every network.
async fn update_proxy(ctx: &Ctx<'_>) -> Result<(), String> {
    let p = &ctx.proxy;
    proxyctl::ensure_image(ctx.engine, p).await?;
    let old = ctx
        .engine
        .inspect(&p.container)
        .await?
        .ok_or_else(|| format!("no proxy container {}; run `luma setup`", p.container))?;
    let networks: Vec<String> = old
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .map(|n| n.keys().filter(|k| *k != "bridge").cloned().collect())
        .unwrap_or_default();
    let routes_before = proxyctl::routes(ctx.engine, p)
        .await
        .map(|r| r.routes.len())
        .unwrap_or(0);
    let parked = format!("{}-replaced", p.container);
    ctx.ui
        .step("stop the old proxy (drains in-flight requests)", async {
            ctx.engine.remove(&parked).await?;
            ctx.engine.stop(&p.container, 30).await?;
            ctx.engine.rename(&p.container, &parked).await
        })
        .await?;
    let started = ctx
        .ui
        .step(format!("start {} from {}", p.container, p.image), async {
            proxyctl::ensure_running(ctx.engine, p, &networks).await?;
            // Routes are restored from the state volume as the proxy starts.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let after = proxyctl::routes(ctx.engine, p).await?.routes.len();
                if after >= routes_before {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!(
                        "the new proxy restored {after} of {routes_before} routes"
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Ok(())
        })
        .await;
    match started {
        Ok(()) => {
            ctx.engine.remove(&parked).await?;
            ctx.ui.info(format!(
                "✓ proxy updated to {}; {routes_before} routes kept",
                p.image
            ));
            // A new container: Docker may have put its published ports on another network.
            if ctx.cfg.host_fast_path {
                project::edge_fast_path(ctx).await;
            }
            Ok(())
        }
        Err(e) => {
            let _ = ctx.engine.remove(&p.container).await;
            ctx.engine.rename(&parked, &p.container).await?;
            ctx.engine.start(&p.container).await?;
            Err(format!("{e}; the old proxy was put back"))
        }
    }
}

const TEMPLATE: &str = r#"# luma.yml: what `luma deploy` puts on your server.
# Docs: `luma --help`. Every key below is optional except `name` and one app or service.

# The project name. It scopes every container, network and image, so two projects can both
# have an app called `web`. Lowercase letters, digits and '-'.
name: my-project

apps:
  web:
    # Either a local image, or `build:` to build it on the engine (no registry needed).
    build:
      context: .
      dockerfile: Dockerfile
    replicas: 1
    environment:
      plain:
        - RUST_LOG=info
      secret: []          # names only; values live in .luma/secrets as KEY=VALUE
    health_check:
      path: /up           # must answer 2xx once the app is ready
    proxy:
      hosts:
        - my-project.example.com
      app_port: 3000      # the port the app listens on inside its container
      # HTTPS. ssl: true (the default) gets each host a certificate over ACME (Let's Encrypt
      # unless proxy.acme says otherwise), ordered at deploy; until it is issued the host is
      # served over HTTP. false: HTTP only. Your own certificate instead, PEM values in
      # .luma/secrets (a quoted value may span lines):
      #   ssl: {certificate: TLS_CERT, private_key: TLS_KEY}
      # ssl: true
      # ssl_redirect: true  # once a host has its certificate, http:// answers 308 to https://
      # hsts: false         # send Strict-Transport-Security on HTTPS responses

# proxy:                  # the shared luma-proxy (one per server)
#   acme:                 # where certificates come from; env LUMA_ACME_DIRECTORY/_EMAIL/_CA_ROOT
#     email: ops@my-project.example.com
#     directory: https://acme-v02.api.letsencrypt.org/directory  # a private CA's URL, or `off`
#     ca_root: ca.pem     # PEM root the directory's HTTPS is signed by (private or test CA)

# network:                # where project networks get their subnets (one per project)
#   pool: 10.210.0.0/16   # default; env LUMA_NETWORK_POOL (and LUMA_NETWORK_SUBNET_SIZE)
#   subnet_size: 24       # a /24 per project: 256 projects per server

# services:               # databases and friends; reachable from apps as <name>:<port>
#   db:
#     image: postgres:16
#     environment:
#       secret: [POSTGRES_PASSWORD]
#     volumes:
#       - my-project-db:/var/lib/postgresql/data
"#;

fn init(config: &std::path::Path) -> Result<(), String> {
    let dir = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let mut wrote = Vec::new();
    if config.exists() {
        eprintln!("  · {} exists; left as it is", config.display());
    } else {
        std::fs::write(config, TEMPLATE).map_err(|e| format!("write {}: {e}", config.display()))?;
        wrote.push(config.display().to_string());
    }
    let secrets = dir.join(".luma").join("secrets");
    if secrets.exists() {
        eprintln!("  · {} exists; left as it is", secrets.display());
    } else {
        std::fs::create_dir_all(dir.join(".luma")).map_err(|e| e.to_string())?;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secrets)
            .and_then(|mut f| f.write_all(b"# KEY=VALUE lines; never commit this file\n"))
            .map_err(|e| format!("write {}: {e}", secrets.display()))?;
        wrote.push(secrets.display().to_string());
    }
    let gitignore = dir.join(".gitignore");
    let current = std::fs::read_to_string(&gitignore).unwrap_or_default();
    if !current.lines().any(|l| l.trim() == ".luma/secrets") {
        let mut text = current;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(".luma/secrets\n");
        std::fs::write(&gitignore, text)
            .map_err(|e| format!("write {}: {e}", gitignore.display()))?;
        wrote.push(format!("{} (+ .luma/secrets)", gitignore.display()));
    }
    for w in wrote {
        eprintln!("  ✓ wrote {w}");
    }
    eprintln!("Next: edit luma.yml, then run `luma deploy`.");
    Ok(())
}
