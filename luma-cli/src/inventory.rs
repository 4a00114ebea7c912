//! What a project has on an engine, found by its labels rather than by today's `luma.yml`:
//! status, removal, and the apps and services that have left the file.
//!
//! Everything Luma creates carries `luma.project` (and `luma.app`, `luma.role`), so an app
//! deleted from `luma.yml` is still found, and `remove` leaves no container, image, route or
//! claimed host behind.

use crate::engine;
use crate::lock::{self, LockHolder};
use crate::names;
use crate::project::{self, Ctx};
use crate::proxyctl;
use crate::release;
use bollard::models::ContainerSummary;
use luma_api::{CallError, ErrorKind, RemoveRequest};
use serde::Serialize;
use std::collections::BTreeSet;

/// Every container of the project, by label.
async fn containers(ctx: &Ctx<'_>) -> Result<Vec<ContainerSummary>, String> {
    ctx.engine
        .containers(&[(names::LABEL_PROJECT, ctx.project())])
        .await
}

fn role(c: &ContainerSummary) -> &str {
    engine::label(c, names::LABEL_ROLE).unwrap_or("")
}

/// App names the engine and the proxy know for this project (whether or not in luma.yml).
async fn known_apps(ctx: &Ctx<'_>, proxy_up: bool) -> Result<BTreeSet<String>, String> {
    let mut apps: BTreeSet<String> = containers(ctx)
        .await?
        .iter()
        .filter(|c| matches!(role(c), names::ROLE_APP | names::ROLE_MARKER))
        .filter_map(|c| engine::label(c, names::LABEL_APP).map(str::to_string))
        .collect();
    if proxy_up {
        for r in proxyctl::routes(ctx.engine, &ctx.proxy).await?.routes {
            if r.route.project == ctx.project() {
                apps.insert(r.route.app);
            }
        }
    }
    Ok(apps)
}

async fn proxy_up(ctx: &Ctx<'_>) -> Result<bool, String> {
    Ok(ctx
        .engine
        .inspect(&ctx.proxy.container)
        .await?
        .and_then(|c| c.state?.running)
        .unwrap_or(false))
}

/// The proxy, started if it exists but is stopped: its routes (and the hosts they claim) live
/// in its state volume, so removing an app without it would leave them to come back.
async fn start_proxy_if_stopped(ctx: &Ctx<'_>) -> Result<bool, String> {
    if ctx.engine.inspect(&ctx.proxy.container).await?.is_none() {
        return Ok(false);
    }
    if !proxy_up(ctx).await? {
        let started = ctx
            .ui
            .step(
                format!("start the proxy {} to remove routes", ctx.proxy.container),
                async {
                    ctx.engine.start(&ctx.proxy.container).await?;
                    proxyctl::wait_ready(ctx.engine, &ctx.proxy).await
                },
            )
            .await;
        if let Err(e) = started {
            ctx.ui.info(format!(
                "! the proxy could not start ({e}); its routes stay in its state volume and come back with it: run `luma remove` again once it runs"
            ));
            return Ok(false);
        }
    }
    Ok(true)
}

fn stop_if_interrupted() -> Result<(), String> {
    if crate::interrupt::requested() {
        Err(format!(
            "{}; stopped between steps (run the command again to finish)",
            crate::interrupt::INTERRUPTED
        ))
    } else {
        Ok(())
    }
}

/// Apps and services on the engine (or routed by the proxy) that `luma.yml` no longer lists,
/// as "app NAME" / "service NAME".
pub async fn departed(ctx: &Ctx<'_>) -> Result<Vec<String>, String> {
    let up = proxy_up(ctx).await?;
    let mut out: Vec<String> = known_apps(ctx, up)
        .await?
        .into_iter()
        .filter(|a| {
            ctx.cfg
                .apps
                .iter()
                .all(|e| e.name != *a || !ctx.runs_here(e))
        })
        .map(|a| format!("app {a}"))
        .collect();
    for c in containers(ctx).await? {
        if role(&c) == names::ROLE_SERVICE {
            if let Some(s) = engine::label(&c, names::LABEL_APP) {
                if ctx
                    .cfg
                    .services
                    .iter()
                    .all(|e| e.name != s || !ctx.runs_here(e))
                {
                    out.push(format!("service {s}"));
                }
            }
        }
    }
    Ok(out)
}

/// Removes one app completely: its route (freeing its hosts), containers, marker and images.
async fn remove_app(ctx: &Ctx<'_>, app: &str, proxy_up: bool) -> Result<(), String> {
    ctx.ui
        .step(format!("remove app {app}"), async {
            if proxy_up {
                let req = RemoveRequest {
                    project: ctx.project().into(),
                    app: app.into(),
                    drain_timeout_ms: None,
                };
                match proxyctl::call(ctx.engine, &ctx.proxy, req).await {
                    Ok(_) => {}
                    Err(CallError::Refused(e)) if e.kind == ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("remove the route of {app}: {e}")),
                }
            }
            for c in containers(ctx).await? {
                if engine::label(&c, names::LABEL_APP) == Some(app)
                    && matches!(role(&c), names::ROLE_APP | names::ROLE_MARKER)
                {
                    ctx.engine.remove(&engine::name_of(&c)).await?;
                }
            }
            remove_images(ctx, Some(app)).await
        })
        .await
}

/// Removes the project's images Luma built (of one app/service, or all).
async fn remove_images(ctx: &Ctx<'_>, entry: Option<&str>) -> Result<(), String> {
    let mut filter = vec![
        (names::LABEL_PROJECT, ctx.project()),
        (names::LABEL_ROLE, names::ROLE_IMAGE),
    ];
    if let Some(e) = entry {
        filter.push((names::LABEL_APP, e));
    }
    for (id, tags) in ctx.engine.images(&filter).await? {
        for t in &tags {
            ctx.engine.remove_image(t).await?;
        }
        if tags.is_empty() {
            ctx.engine.remove_image(&id).await?;
        }
    }
    Ok(())
}

async fn remove_service(ctx: &Ctx<'_>, service: &str) -> Result<(), String> {
    ctx.ui
        .step(format!("remove service {service}"), async {
            ctx.engine
                .remove(&names::service_container(ctx.project(), service))
                .await?;
            remove_images(ctx, Some(service)).await
        })
        .await
}

/// Takes down the named apps, or with `everything` the whole project as the engine knows it:
/// every app and service by label (in luma.yml or not), their routes and images, and the
/// network. Named volumes are kept.
pub async fn remove(ctx: &Ctx<'_>, apps: &[String], everything: bool) -> Result<(), String> {
    crate::interrupt::removing();
    let lock = project::take_lock(ctx, "remove").await?;
    let result = async {
        let up = start_proxy_if_stopped(ctx).await?;
        let targets: Vec<String> = if everything {
            known_apps(ctx, up).await?.into_iter().collect()
        } else {
            apps.to_vec()
        };
        for app in &targets {
            stop_if_interrupted()?;
            remove_app(ctx, app, up).await?;
        }
        if everything {
            for c in containers(ctx).await? {
                stop_if_interrupted()?;
                if role(&c) == names::ROLE_SERVICE {
                    let s = engine::label(&c, names::LABEL_APP)
                        .unwrap_or("")
                        .to_string();
                    remove_service(ctx, &s).await?;
                }
            }
            remove_images(ctx, None).await?;
            let net = ctx.network();
            ctx.ui
                .step(format!("remove network {net}"), async {
                    if up {
                        ctx.engine
                            .disconnect_network(&net, &ctx.proxy.container)
                            .await?;
                    }
                    ctx.engine.remove_network(&net).await
                })
                .await?;
            // Docker may have moved the proxy's published ports to another of its networks.
            if up && ctx.cfg.host_fast_path {
                crate::project::edge_fast_path(ctx).await;
            }
        }
        Ok(())
    }
    .await;
    lock.release(ctx.engine).await;
    result
}

/// `luma prune`: settles every app in luma.yml from the proxy's truth (records the live
/// release, stops the others, removes old releases and failed releases' images), then
/// removes apps and services that left luma.yml when `remove_departed`.
pub async fn prune(ctx: &Ctx<'_>, remove_departed: bool) -> Result<Vec<String>, String> {
    crate::interrupt::removing();
    let lock = project::take_lock(ctx, "prune").await?;
    let result = async {
        start_proxy_if_stopped(ctx).await?;
        for app in ctx.cfg.apps.iter().filter(|a| ctx.runs_here(a)) {
            stop_if_interrupted()?;
            let live = ctx
                .ui
                .step(
                    format!("settle app {}", app.name),
                    release::settle_app(ctx, app),
                )
                .await?;
            if live.is_none() {
                ctx.ui.info(format!("  {} has no live release", app.name));
            }
        }
        let gone = departed(ctx).await?;
        if remove_departed {
            let up = proxy_up(ctx).await?;
            for g in &gone {
                stop_if_interrupted()?;
                match g.split_once(' ') {
                    Some(("app", a)) => remove_app(ctx, a, up).await?,
                    Some(("service", s)) => remove_service(ctx, s).await?,
                    _ => {}
                }
            }
        }
        Ok(gone)
    }
    .await;
    lock.release(ctx.engine).await;
    result
}

#[derive(Debug, Serialize)]
pub struct ProjectStatus {
    /// The server this is about (`local`, or as luma.yml names it).
    pub server: String,
    pub project: String,
    pub network: String,
    /// Who holds the deploy lock, if anyone.
    pub lock: Option<LockHolder>,
    pub apps: Vec<AppStatus>,
    pub services: Vec<ServiceStatus>,
    /// Apps and services on the engine that luma.yml no longer lists.
    pub departed: Vec<String>,
    /// The certificate of every HTTPS host of the shown apps, as the proxy serves it.
    pub certificates: Vec<luma_api::tls::CertificateStatus>,
    /// Why the proxy could not be asked about certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificates_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AppStatus {
    pub app: String,
    /// The release the proxy routes to.
    pub live_release: Option<String>,
    /// The release the labels record.
    pub recorded_release: Option<String>,
    pub consistent: bool,
    pub hosts: Vec<String>,
    pub replicas: Vec<ReplicaStatus>,
    pub retained_releases: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    pub container: String,
    pub release: String,
    pub state: String,
    pub ip: Option<String>,
    pub proxy_health: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    pub container: String,
    pub state: String,
}

/// Per-app status as data (rendered as tables by `luma status`).
pub async fn status(ctx: &Ctx<'_>, selected: &[String]) -> Result<ProjectStatus, String> {
    let routes = proxyctl::routes(ctx.engine, &ctx.proxy)
        .await
        .unwrap_or_default();
    let net = ctx.network();
    let mut apps = Vec::new();
    for app in ctx
        .cfg
        .apps
        .iter()
        .filter(|a| ctx.runs_here(a))
        .filter(|a| selected.is_empty() || selected.contains(&a.name))
    {
        let route = routes.find(ctx.project(), &app.name);
        let live = route.and_then(|r| r.release());
        let mut replicas = Vec::new();
        let mut retained = Vec::new();
        for (rel, cs) in release::releases(ctx, &app.name).await? {
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
                let health = ip.as_ref().and_then(|ip| {
                    route?
                        .backends
                        .iter()
                        .find(|b| b.addr.split(':').next() == Some(ip.as_str()))
                        .map(|b| if b.healthy { "healthy" } else { "down" })
                });
                replicas.push(ReplicaStatus {
                    container: name,
                    release: rel.clone(),
                    state: c
                        .state
                        .as_ref()
                        .map(|s| format!("{s:?}").to_lowercase())
                        .unwrap_or_default(),
                    ip,
                    proxy_health: health,
                });
            }
        }
        let recorded = release::recorded_release(ctx, &app.name).await?;
        apps.push(AppStatus {
            app: app.name.clone(),
            consistent: recorded == live,
            live_release: live,
            recorded_release: recorded,
            hosts: app
                .proxy
                .as_ref()
                .map(|p| p.hosts.clone())
                .unwrap_or_default(),
            replicas,
            retained_releases: retained,
        });
    }
    let mut services = Vec::new();
    for s in ctx.cfg.services.iter().filter(|s| ctx.runs_here(s)) {
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
        services.push(ServiceStatus {
            service: s.name.clone(),
            container: name,
            state: st.unwrap_or_else(|| "missing".into()),
        });
    }
    let (certificates, certificates_error) = certificates(ctx, selected).await;
    Ok(ProjectStatus {
        server: ctx.server.to_string(),
        project: ctx.project().into(),
        network: net,
        lock: lock::holder(ctx.engine, ctx.project()).await?,
        apps,
        services,
        departed: departed(ctx).await?,
        certificates,
        certificates_error,
    })
}

/// The project's certificates (of the selected apps' hosts when apps are named), sorted by
/// host; with no proxy running, none and no error.
async fn certificates(
    ctx: &Ctx<'_>,
    selected: &[String],
) -> (Vec<luma_api::tls::CertificateStatus>, Option<String>) {
    match proxy_up(ctx).await {
        Ok(true) => {}
        Ok(false) => return (Vec::new(), None),
        Err(e) => return (Vec::new(), Some(e)),
    }
    let hosts: Vec<String> = if selected.is_empty() {
        Vec::new()
    } else {
        let hosts: Vec<String> = ctx
            .cfg
            .apps
            .iter()
            .filter(|a| selected.contains(&a.name))
            .filter_map(|a| a.proxy.as_ref())
            .flat_map(|p| p.hosts.iter().map(|h| crate::tls::normalized(h)))
            .collect();
        if hosts.is_empty() {
            return (Vec::new(), None);
        }
        hosts
    };
    let req = luma_api::tls::CertificatesRequest {
        project: Some(ctx.project().to_string()),
        hosts,
    };
    match proxyctl::certificates(ctx.engine, &ctx.proxy, req).await {
        Ok(mut r) => {
            r.certificates.sort_by(|a, b| a.host.cmp(&b.host));
            (r.certificates, None)
        }
        Err(e) => (Vec::new(), Some(e)),
    }
}
