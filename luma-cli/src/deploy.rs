//! Blue-green releases of a project's apps, and its services.
//!
//! For each app, in this order (every step is what makes the next one safe):
//! 1. build or find the image, tagged `<project>_<app>:<release>`;
//! 2. start the new replicas in the project network with only their release alias
//!    `<app>--<release>`: no proxy route and no intra-project `<app>` traffic can reach them;
//! 3. the proxy health-checks every replica on its own inside the project network; a failure
//!    removes the new containers (after printing their logs) and leaves the old release serving;
//! 4. the new replicas, which carry no traffic yet, are reconnected with the aliases
//!    `[<app>, <app>--<release>]` (Docker cannot add an alias to a live endpoint);
//! 5. the proxy deploy: re-resolve, re-check, switch the route atomically, drain the old release;
//! 6. only then is the old release stopped (SIGTERM, grace period) and disconnected, and kept
//!    stopped for `luma rollback` (the newest `retain` releases; older ones are removed).
//!
//! `rollback` runs steps 2-6 with the containers of a retained release.

use crate::config::{Config, Entry, ImageSource};
use crate::engine::{self, ContainerSpec, Engine};
use crate::lock::Lock;
use crate::names;
use crate::proxyctl::{self, ProxySettings};
use crate::secrets::Secrets;
use crate::ui::Ui;
use std::collections::{BTreeMap, HashMap};

pub struct Ctx<'a> {
    pub engine: &'a Engine,
    pub cfg: &'a Config,
    pub secrets: &'a Secrets,
    pub proxy: ProxySettings,
    pub ui: &'a Ui,
    /// Previous releases kept stopped for rollback.
    pub retain: usize,
}

impl Ctx<'_> {
    fn project(&self) -> &str {
        &self.cfg.project
    }
    fn network(&self) -> String {
        names::network(&self.cfg.project)
    }
    fn dir(&self) -> std::path::PathBuf {
        self.cfg
            .path
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| ".".into())
    }
}

fn labels(project: &str, role: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut l = HashMap::from([
        (names::LABEL_PROJECT.to_string(), project.to_string()),
        (names::LABEL_ROLE.to_string(), role.to_string()),
        (
            names::LABEL_CREATED_BY.to_string(),
            format!("luma {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    for (k, v) in extra {
        l.insert(k.to_string(), v.to_string());
    }
    l
}

/// Engine reachable, proxy running, project network present and joined by the proxy, services
/// up to date. Idempotent; `deploy` runs it first.
pub async fn setup(ctx: &Ctx<'_>) -> Result<(), String> {
    let ui = ctx.ui;
    ui.step("engine answers", async {
        ctx.engine.server_version().await.map(|_| ())
    })
    .await?;
    preflight_ports(ctx).await?;
    ui.step(
        format!("proxy {} running", ctx.proxy.container),
        proxyctl::ensure_running(ctx.engine, &ctx.proxy, &[]),
    )
    .await?;
    let net = ctx.network();
    ui.step(format!("network {net}"), async {
        if !ctx.engine.network_exists(&net).await? {
            ctx.engine
                .create_network(&net, labels(ctx.project(), "network", &[]))
                .await?;
        }
        proxyctl::attach(ctx.engine, &ctx.proxy, &net).await
    })
    .await?;
    for svc in &ctx.cfg.services {
        ensure_service(ctx, svc).await?;
    }
    Ok(())
}

/// Read-only checks: images that must already exist, secrets, the proxy image, host ports.
pub async fn preflight(ctx: &Ctx<'_>, selected: &[String]) -> Result<(), String> {
    proxyctl::ensure_image(ctx.engine, &ctx.proxy).await?;
    let apps = ctx
        .cfg
        .apps
        .iter()
        .filter(|a| selected.is_empty() || selected.contains(&a.name));
    for e in apps.chain(ctx.cfg.services.iter()) {
        env_of(ctx, e, "preflight")?;
        if let ImageSource::Image(i) = &e.source {
            if !ctx.engine.image_exists(i).await? {
                return Err(format!(
                    "{}: {}: image {i:?} is not on the engine, and Luma deploys without a registry; build it first or use `build:`",
                    ctx.cfg.path.display(),
                    e.name
                ));
            }
        }
    }
    preflight_ports(ctx).await
}

/// Finds host-port clashes before anything changes, naming the container that holds the port.
async fn preflight_ports(ctx: &Ctx<'_>) -> Result<(), String> {
    let mut wanted: Vec<(u16, String)> = Vec::new();
    for e in ctx.cfg.services.iter().chain(ctx.cfg.apps.iter()) {
        for p in &e.ports {
            let (_, host, _) = crate::config::parse_port(p)?;
            wanted.push((host, e.name.clone()));
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    for c in ctx.engine.running_containers().await? {
        let ours = engine::label(&c, names::LABEL_PROJECT) == Some(ctx.project());
        for p in c.ports.iter().flatten() {
            let Some(public) = p.public_port else {
                continue;
            };
            for (port, entry) in &wanted {
                let same_entry = ours
                    && (engine::label(&c, names::LABEL_APP) == Some(entry.as_str())
                        || engine::name_of(&c) == names::service_container(ctx.project(), entry));
                if public == *port && !same_entry {
                    return Err(format!(
                        "{}: {entry} wants host port {port}, which container {} already publishes; stop that container or change `ports`",
                        ctx.cfg.path.display(),
                        engine::name_of(&c)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A stable fingerprint of everything that defines a service container.
fn fingerprint(parts: &[String]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// Creates and starts the container of an app replica or a service: the entry's command,
/// ports, volumes and restart policy, in the project network under `alias` only. A container
/// that fails to start is removed again.
async fn run_entry(
    ctx: &Ctx<'_>,
    e: &Entry,
    name: &str,
    image: &str,
    env: &[String],
    labels: HashMap<String, String>,
    alias: &str,
) -> Result<(), String> {
    let spec = ContainerSpec {
        name: name.to_string(),
        image: image.to_string(),
        env: env.to_vec(),
        labels,
        cmd: e.command.clone(),
        network: Some((ctx.network(), vec![alias.to_string()])),
        ports: e
            .ports
            .iter()
            .map(|p| crate::config::parse_port(p))
            .collect::<Result<_, _>>()?,
        binds: e.volumes.clone(),
        restart_unless_stopped: true,
    };
    if !ctx.engine.create(&spec).await? {
        return Err(format!("container {name} already exists"));
    }
    if let Err(err) = ctx.engine.start(name).await {
        let _ = ctx.engine.remove(name).await;
        return Err(err);
    }
    Ok(())
}

fn env_of(ctx: &Ctx<'_>, e: &Entry, release: &str) -> Result<Vec<String>, String> {
    let mut env: Vec<String> = vec![
        format!("LUMA_PROJECT={}", ctx.project()),
        format!("LUMA_APP={}", e.name),
        format!("LUMA_RELEASE={release}"),
    ];
    env.extend(e.env_plain.iter().map(|(k, v)| format!("{k}={v}")));
    env.extend(ctx.secrets.env_for(
        &e.env_secret,
        &format!("{}: {:?}", ctx.cfg.path.display(), e.name),
    )?);
    Ok(env)
}

async fn image_for(ctx: &Ctx<'_>, e: &Entry, tag: &str) -> Result<String, String> {
    match &e.source {
        ImageSource::Image(i) => {
            if ctx.engine.image_exists(i).await? {
                Ok(i.clone())
            } else {
                Err(format!(
                    "{}: {}: image {i:?} is not on the engine, and Luma deploys without a registry; build it first or use `build:`",
                    ctx.cfg.path.display(),
                    e.name
                ))
            }
        }
        ImageSource::Build(b) => {
            let ui = ctx.ui;
            let ctxtar = crate::buildctx::tar_context(&b.context, &b.dockerfile)?;
            let spec = engine::BuildSpec {
                tag: tag.to_string(),
                dockerfile: b.dockerfile.clone(),
                args: b.args.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                target: b.target.clone(),
                platform: b.platform.clone(),
                labels: labels(ctx.project(), "image", &[(names::LABEL_APP, &e.name)]),
            };
            ui.step(
                format!("build {tag}"),
                ctx.engine.build(ctxtar, &spec, |line| ui.detail(line)),
            )
            .await?;
            Ok(tag.to_string())
        }
    }
}

async fn ensure_service(ctx: &Ctx<'_>, svc: &Entry) -> Result<(), String> {
    let name = names::service_container(ctx.project(), &svc.name);
    let image = image_for(
        ctx,
        svc,
        &format!("{}:latest", names::image_repo(ctx.project(), &svc.name)),
    )
    .await?;
    let env = env_of(ctx, svc, "service")?;
    let mut parts = vec![image.clone()];
    parts.extend(env.iter().cloned());
    parts.extend(svc.ports.iter().cloned());
    parts.extend(svc.volumes.iter().cloned());
    parts.extend(svc.command.iter().flatten().cloned());
    let fp = fingerprint(&parts);
    let existing = ctx.engine.inspect(&name).await?;
    let current_fp = existing.as_ref().and_then(|c| {
        c.config
            .as_ref()?
            .labels
            .as_ref()?
            .get(names::LABEL_FINGERPRINT)
            .cloned()
    });
    let running = existing
        .as_ref()
        .and_then(|c| c.state.as_ref()?.running)
        .unwrap_or(false);
    if current_fp.as_deref() == Some(fp.as_str()) {
        if !running {
            ctx.ui
                .step(
                    format!("start service {}", svc.name),
                    ctx.engine.start(&name),
                )
                .await?;
        }
        return Ok(());
    }
    let verb = if existing.is_some() {
        "recreate"
    } else {
        "start"
    };
    ctx.ui
        .step(format!("{verb} service {}", svc.name), async {
            if existing.is_some() {
                ctx.engine.stop(&name, 30).await?;
                ctx.engine.remove(&name).await?;
            }
            let labels = labels(
                ctx.project(),
                names::ROLE_SERVICE,
                &[
                    (names::LABEL_APP, &svc.name),
                    (names::LABEL_FINGERPRINT, &fp),
                ],
            );
            run_entry(ctx, svc, &name, &image, &env, labels, &svc.name).await
        })
        .await
}

/// A release's containers, as (name, summary), newest release last.
async fn app_containers(
    ctx: &Ctx<'_>,
    app: &str,
) -> Result<Vec<bollard::models::ContainerSummary>, String> {
    let mut v = ctx
        .engine
        .containers(&[
            (names::LABEL_PROJECT, ctx.project()),
            (names::LABEL_APP, app),
            (names::LABEL_ROLE, names::ROLE_APP),
        ])
        .await?;
    v.sort_by_key(|c| (c.created.unwrap_or(0), engine::name_of(c)));
    Ok(v)
}

/// Releases of an app, oldest first, each with its containers.
pub async fn releases(
    ctx: &Ctx<'_>,
    app: &str,
) -> Result<Vec<(String, Vec<bollard::models::ContainerSummary>)>, String> {
    let mut out: Vec<(String, Vec<_>)> = Vec::new();
    for c in app_containers(ctx, app).await? {
        let rel = engine::label(&c, names::LABEL_RELEASE)
            .unwrap_or("")
            .to_string();
        match out.iter_mut().find(|(r, _)| *r == rel) {
            Some((_, v)) => v.push(c),
            None => out.push((rel, vec![c])),
        }
    }
    Ok(out)
}

/// The release the proxy routes to (the record of what is live).
pub async fn live_release(ctx: &Ctx<'_>, app: &str) -> Result<Option<String>, String> {
    let routes = proxyctl::routes(ctx.engine, &ctx.proxy).await?;
    Ok(routes
        .iter()
        .find(|r| r["route"]["project"] == ctx.project() && r["route"]["app"] == app)
        .and_then(|r| r["route"]["target"].as_str())
        .and_then(|t| names::release_of_target(app, t)))
}

/// Deploys the selected apps (all when empty). Returns the live URLs.
pub async fn deploy(
    ctx: &Ctx<'_>,
    selected: &[String],
    force: bool,
) -> Result<Vec<String>, String> {
    for s in selected {
        ctx.cfg.app(s)?;
    }
    let mut release = crate::release::release_id(&ctx.dir(), force)?;
    // Everything that can be checked is checked before anything changes.
    preflight(ctx, selected).await?;
    // The lock comes first: two deploys of one project must not even race on setup.
    let lock = ctx
        .ui
        .step(
            "take the deploy lock",
            Lock::acquire(ctx.engine, ctx.project(), &ctx.proxy.image),
        )
        .await?;
    let result = async {
        setup(ctx).await?;
        let mut urls = Vec::new();
        for app in ctx
            .cfg
            .apps
            .iter()
            .filter(|a| selected.is_empty() || selected.contains(&a.name))
        {
            // The same commit deployed twice gets a distinct release id.
            if releases(ctx, &app.name)
                .await?
                .iter()
                .any(|(r, _)| *r == release)
            {
                release = format!(
                    "{release}-{}",
                    crate::release::release_id(std::path::Path::new("/"), true)?
                );
            }
            ctx.ui.info(format!(
                "{} {}/{} release {release}",
                "▶",
                ctx.project(),
                app.name
            ));
            deploy_app(ctx, app, &release).await?;
            if let Some(p) = &app.proxy {
                urls.extend(
                    p.hosts
                        .iter()
                        .map(|h| format!("http://{h}  (via {})", ctx.proxy.http_base())),
                );
            }
        }
        Ok::<_, String>(urls)
    }
    .await;
    lock.release(ctx.engine).await;
    result
}

async fn deploy_app(ctx: &Ctx<'_>, app: &Entry, release: &str) -> Result<(), String> {
    let image = image_for(
        ctx,
        app,
        &format!("{}:{release}", names::image_repo(ctx.project(), &app.name)),
    )
    .await?;
    let env = env_of(ctx, app, release)?;
    let alias = names::release_alias(&app.name, release);
    let mut created = Vec::new();
    let started = ctx
        .ui
        .step(format!("start {} new replica(s)", app.replicas), async {
            for i in 1..=app.replicas {
                let name = names::app_container(ctx.project(), &app.name, release, i);
                let replica = i.to_string();
                let labels = labels(
                    ctx.project(),
                    names::ROLE_APP,
                    &[
                        (names::LABEL_APP, &app.name),
                        (names::LABEL_RELEASE, release),
                        (names::LABEL_REPLICA, &replica),
                    ],
                );
                run_entry(ctx, app, &name, &image, &env, labels, &alias).await?;
                created.push(name.clone());
            }
            Ok(())
        })
        .await;
    if let Err(e) = started {
        discard(ctx, &created).await;
        return Err(e);
    }
    if let Err(e) = bring_up(ctx, app, release, &created).await {
        print_logs(ctx, &created).await;
        ctx.ui
            .step("remove the failed release", async {
                discard(ctx, &created).await;
                Ok(())
            })
            .await?;
        return Err(format!("{e}\nThe previous release keeps serving."));
    }
    Ok(())
}

async fn discard(ctx: &Ctx<'_>, containers: &[String]) {
    for c in containers {
        let _ = ctx.engine.remove(c).await;
    }
}

async fn print_logs(ctx: &Ctx<'_>, containers: &[String]) {
    for c in containers {
        let logs = ctx.engine.logs_tail(c, 20).await.unwrap_or_else(|e| e);
        ctx.ui.info(format!(
            "--- last log lines of {c} ---\n{}",
            ctx.secrets.redact(logs.trim_end())
        ));
    }
}

/// Steps 3-6 for containers that run with only their release alias.
async fn bring_up(
    ctx: &Ctx<'_>,
    app: &Entry,
    release: &str,
    containers: &[String],
) -> Result<(), String> {
    let net = ctx.network();
    let alias = names::release_alias(&app.name, release);
    let deadline = format!("{}ms", app.health.deadline.as_millis());
    let interval = format!("{}ms", app.health.interval.as_millis().max(50));
    let timeout = format!("{}ms", app.health.timeout.as_millis().max(10));
    // Step 3: nothing reaches the new replicas yet; check them.
    if let Some(route) = &app.proxy {
        let target = format!("{alias}:{}", route.app_port);
        let n = containers.len();
        ctx.ui
            .step(
                format!(
                    "health-check {n} replica(s) through the proxy ({}{})",
                    target, app.health.path
                ),
                async {
                    let args = [
                        "check",
                        "--json",
                        "--project",
                        ctx.project(),
                        "--network",
                        &net,
                        "--target",
                        &target,
                        "--health-path",
                        &app.health.path,
                        "--health-interval",
                        &interval,
                        "--health-timeout",
                        &timeout,
                        "--timeout",
                        &deadline,
                    ];
                    let v = proxyctl::call(ctx.engine, &ctx.proxy, &args).await?;
                    let healthy = v["backends"].as_array().map(|b| b.len()).unwrap_or(0);
                    if healthy < n {
                        return Err(format!("only {healthy} of {n} replicas answer to {target}"));
                    }
                    Ok(())
                },
            )
            .await?;
    } else {
        ctx.ui
            .step("check the new replicas keep running", async {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                for c in containers {
                    let running = ctx
                        .engine
                        .inspect(c)
                        .await?
                        .and_then(|i| i.state?.running)
                        .unwrap_or(false);
                    if !running {
                        return Err(format!("{c} exited right after starting"));
                    }
                }
                Ok(())
            })
            .await?;
    }
    // Step 4: they still carry no traffic, so reconnecting them with the app alias is safe.
    ctx.ui
        .step(
            format!("give the new replicas the alias {}", app.name),
            realias(ctx, containers, &app.name, &alias),
        )
        .await?;
    // Step 5: the proxy re-checks, switches and drains the old release.
    if let Some(route) = &app.proxy {
        let target = format!("{alias}:{}", route.app_port);
        let mut args: Vec<String> = vec![
            "deploy".into(),
            "--json".into(),
            "--project".into(),
            ctx.project().into(),
            "--app".into(),
            app.name.clone(),
        ];
        for h in &route.hosts {
            args.extend(["--host".into(), h.clone()]);
        }
        args.extend([
            "--target".into(),
            target.clone(),
            "--network".into(),
            net.clone(),
            "--health-path".into(),
            app.health.path.clone(),
            "--health-interval".into(),
            interval.clone(),
            "--health-timeout".into(),
            timeout.clone(),
            "--deploy-timeout".into(),
            deadline.clone(),
            "--drain-timeout".into(),
            "30s".into(),
            "--response-timeout".into(),
            format!("{}ms", route.response_timeout.as_millis()),
        ]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        ctx.ui
            .step(
                format!(
                    "switch {} to release {release} and drain the old one",
                    route.hosts.join(", ")
                ),
                async {
                    proxyctl::call(ctx.engine, &ctx.proxy, &argv)
                        .await
                        .map(|_| ())
                },
            )
            .await?;
    }
    record_live(ctx, &app.name, release).await?;
    retire_others(ctx, &app.name, release).await
}

/// Records the live release in labels (beside the proxy's route, which records it too): a
/// created, never started marker container per app, replaced at every switch.
async fn record_live(ctx: &Ctx<'_>, app: &str, release: &str) -> Result<(), String> {
    let name = names::live_marker(ctx.project(), app);
    ctx.engine.remove(&name).await?;
    let spec = ContainerSpec {
        name,
        image: ctx.proxy.image.clone(),
        cmd: Some(vec!["live-marker".into()]),
        labels: labels(
            ctx.project(),
            names::ROLE_MARKER,
            &[(names::LABEL_APP, app), (names::LABEL_RELEASE, release)],
        ),
        ..Default::default()
    };
    ctx.engine.create(&spec).await.map(|_| ())
}

/// The live release as the labels record it.
pub async fn recorded_release(ctx: &Ctx<'_>, app: &str) -> Result<Option<String>, String> {
    let marker = ctx
        .engine
        .inspect(&names::live_marker(ctx.project(), app))
        .await?;
    Ok(marker
        .and_then(|m| m.config)
        .and_then(|c| c.labels)
        .and_then(|l| l.get(names::LABEL_RELEASE).cloned()))
}

/// Reconnects containers that carry no traffic yet with the app alias added.
async fn realias(
    ctx: &Ctx<'_>,
    containers: &[String],
    app: &str,
    release_alias: &str,
) -> Result<(), String> {
    let net = ctx.network();
    for c in containers {
        ctx.engine.disconnect_network(&net, c).await?;
        ctx.engine
            .connect_network(&net, c, vec![app.to_string(), release_alias.to_string()])
            .await?;
    }
    Ok(())
}

/// Stops and disconnects every other running release of the app (the proxy has drained it),
/// then removes releases beyond the retained ones.
async fn retire_others(ctx: &Ctx<'_>, app: &str, live: &str) -> Result<(), String> {
    let net = ctx.network();
    let all = releases(ctx, app).await?;
    ctx.ui
        .step("stop the previous release", async {
            for (rel, cs) in &all {
                if rel == live {
                    continue;
                }
                for c in cs {
                    let name = engine::name_of(c);
                    if engine::is_running(c) {
                        ctx.engine.stop(&name, 10).await?;
                    }
                    ctx.engine.disconnect_network(&net, &name).await?;
                }
            }
            Ok(())
        })
        .await?;
    let old: Vec<_> = all.iter().filter(|(r, _)| r != live).collect();
    let drop_n = old.len().saturating_sub(ctx.retain);
    for (rel, cs) in old.into_iter().take(drop_n) {
        for c in cs {
            ctx.engine.remove(&engine::name_of(c)).await?;
        }
        ctx.engine
            .remove_image(&format!("{}:{rel}", names::image_repo(ctx.project(), app)))
            .await?;
    }
    Ok(())
}

/// Brings a retained release back through the same health-gated path.
pub async fn rollback(ctx: &Ctx<'_>, app_name: &str, to: Option<&str>) -> Result<String, String> {
    let app = ctx.cfg.app(app_name)?.clone();
    let lock = ctx
        .ui
        .step(
            "take the deploy lock",
            Lock::acquire(ctx.engine, ctx.project(), &ctx.proxy.image),
        )
        .await?;
    let result = async {
        let live = live_release(ctx, app_name).await?;
        let all = releases(ctx, app_name).await?;
        let candidates: Vec<&(String, Vec<_>)> = all
            .iter()
            .filter(|(r, _)| Some(r) != live.as_ref())
            .collect();
        let (release, containers) = match to {
            Some(r) => candidates
                .iter()
                .find(|(x, _)| x == r)
                .copied()
                .ok_or_else(|| {
                    format!(
                        "release {r:?} of {app_name} is not retained; retained: {}",
                        candidates
                            .iter()
                            .map(|(r, _)| r.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
            None => candidates
                .last()
                .copied()
                .ok_or_else(|| format!("no earlier release of {app_name} is retained"))?,
        };
        let names: Vec<String> = containers.iter().map(engine::name_of).collect();
        let alias = names::release_alias(app_name, release);
        let net = ctx.network();
        ctx.ui
            .step(
                format!("start release {release} ({} replica(s))", names.len()),
                async {
                    for n in &names {
                        ctx.engine.disconnect_network(&net, n).await?;
                        ctx.engine
                            .connect_network(&net, n, vec![alias.clone()])
                            .await?;
                        ctx.engine.start(n).await?;
                    }
                    Ok(())
                },
            )
            .await?;
        if let Err(e) = bring_up(ctx, &app, release, &names).await {
            print_logs(ctx, &names).await;
            for n in &names {
                let _ = ctx.engine.stop(n, 10).await;
                let _ = ctx.engine.disconnect_network(&net, n).await;
            }
            return Err(format!("{e}\nThe current release keeps serving."));
        }
        Ok(release.clone())
    }
    .await;
    lock.release(ctx.engine).await;
    result
}

/// Takes down apps (and, when `everything`, services, routes and the network).
pub async fn remove(ctx: &Ctx<'_>, apps: &[String], everything: bool) -> Result<(), String> {
    let lock = ctx
        .ui
        .step(
            "take the deploy lock",
            Lock::acquire(ctx.engine, ctx.project(), &ctx.proxy.image),
        )
        .await?;
    let result = async {
        let proxy_up = ctx.engine.inspect(&ctx.proxy.container).await?.is_some();
        for app in apps {
            ctx.ui
                .step(format!("remove app {app}"), async {
                    if proxy_up {
                        let r = proxyctl::call(
                            ctx.engine,
                            &ctx.proxy,
                            &["remove", "--json", "--project", ctx.project(), "--app", app],
                        )
                        .await;
                        if let Err(e) = r {
                            if !e.contains("no route") {
                                return Err(e);
                            }
                        }
                    }
                    ctx.engine
                        .remove(&names::live_marker(ctx.project(), app))
                        .await?;
                    for (rel, cs) in releases(ctx, app).await? {
                        for c in cs {
                            ctx.engine.remove(&engine::name_of(&c)).await?;
                        }
                        ctx.engine
                            .remove_image(&format!(
                                "{}:{rel}",
                                names::image_repo(ctx.project(), app)
                            ))
                            .await?;
                    }
                    Ok(())
                })
                .await?;
        }
        if everything {
            for s in &ctx.cfg.services {
                ctx.ui
                    .step(
                        format!("remove service {}", s.name),
                        ctx.engine
                            .remove(&names::service_container(ctx.project(), &s.name)),
                    )
                    .await?;
            }
            let net = ctx.network();
            ctx.ui
                .step(format!("remove network {net}"), async {
                    if proxy_up {
                        ctx.engine
                            .disconnect_network(&net, &ctx.proxy.container)
                            .await?;
                    }
                    ctx.engine.remove_network(&net).await
                })
                .await?;
        }
        Ok(())
    }
    .await;
    lock.release(ctx.engine).await;
    result
}

/// Per-app status as data (also rendered as tables by `luma status`).
pub async fn status(ctx: &Ctx<'_>, selected: &[String]) -> Result<serde_json::Value, String> {
    let proxy_routes = proxyctl::routes(ctx.engine, &ctx.proxy)
        .await
        .unwrap_or_default();
    let net = ctx.network();
    let mut apps = Vec::new();
    for app in ctx
        .cfg
        .apps
        .iter()
        .filter(|a| selected.is_empty() || selected.contains(&a.name))
    {
        let route = proxy_routes.iter().find(|r| {
            r["route"]["project"] == ctx.project() && r["route"]["app"] == app.name.as_str()
        });
        let live = route
            .and_then(|r| r["route"]["target"].as_str())
            .and_then(|t| names::release_of_target(&app.name, t));
        let health: BTreeMap<String, bool> = route
            .and_then(|r| r["backends"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|b| {
                Some((
                    b["addr"].as_str()?.split(':').next()?.to_string(),
                    b["healthy"].as_bool()?,
                ))
            })
            .collect();
        let mut replicas = Vec::new();
        let mut retained = Vec::new();
        for (rel, cs) in releases(ctx, &app.name).await? {
            if Some(&rel) != live.as_ref() {
                retained.push(rel.clone());
            }
            for c in cs {
                let name = engine::name_of(&c);
                let ip = ctx
                    .engine
                    .inspect(&name)
                    .await?
                    .as_ref()
                    .and_then(|i| engine::ip_on(i, &net));
                replicas.push(serde_json::json!({
                    "container": name,
                    "release": rel,
                    "state": c.state.as_ref().map(|s| format!("{s:?}").to_lowercase()).unwrap_or_default(),
                    "ip": ip,
                    "proxy_health": ip.as_ref().and_then(|ip| health.get(ip)).map(|h| if *h { "healthy" } else { "down" }),
                }));
            }
        }
        let recorded = recorded_release(ctx, &app.name).await?;
        apps.push(serde_json::json!({
            "app": app.name,
            "live_release": live,
            "recorded_release": recorded,
            "consistent": recorded == live,
            "hosts": app.proxy.as_ref().map(|p| p.hosts.clone()).unwrap_or_default(),
            "replicas": replicas,
            "retained_releases": retained,
        }));
    }
    let mut services = Vec::new();
    for s in &ctx.cfg.services {
        let name = names::service_container(ctx.project(), &s.name);
        let st = ctx
            .engine
            .inspect(&name)
            .await?
            .and_then(|i| i.state)
            .map(|s| {
                format!(
                    "{:?}",
                    s.status
                        .unwrap_or(bollard::models::ContainerStateStatusEnum::EMPTY)
                )
                .to_lowercase()
            });
        services.push(serde_json::json!({"service": s.name, "container": name, "state": st.unwrap_or_else(|| "missing".into())}));
    }
    Ok(
        serde_json::json!({"project": ctx.project(), "network": net, "apps": apps, "services": services}),
    )
}
