//! A project on an engine: everything a release stands on, and nothing of a release itself.
//!
//! [`setup`] makes sure the engine answers, the proxy runs (and says when it differs from what
//! is asked), the project network exists with the proxy on it, and services are up to date.
//! [`preflight`] is every check that needs no change: images, secrets, custom certificates,
//! host ports, names. The
//! container recipe for app replicas and services ([`run_entry`]) lives here too, so both get
//! the same labels, init and stop timeout.

use crate::config::{Config, Entry, ImageSource};
use crate::engine::{self, ContainerSpec, Engine};
use crate::names;
use crate::proxyctl::{self, ProxySettings};
use crate::secrets::Secrets;
use crate::ui::Ui;
use std::collections::HashMap;

/// One project on one server: everything a step on that server needs.
pub struct Ctx<'a> {
    /// The server as luma.yml names it (`local`, or an ssh destination).
    pub server: &'a str,
    pub engine: &'a Engine,
    pub cfg: &'a Config,
    pub secrets: &'a Secrets,
    pub proxy: ProxySettings,
    pub ui: &'a Ui,
    /// Previous releases kept stopped for rollback.
    pub retain: usize,
    /// Images were put on this server before the release (built on this machine, then
    /// streamed or pulled), so a release uses its tag instead of building here.
    pub delivered: bool,
    /// The project's shared ACME account key, when an app of it is on several servers.
    /// Set once setup ran, before the first switch (see `crate::tls::share_acme_account`).
    pub acme_account: std::sync::OnceLock<luma_api::tls::AcmeAccountKey>,
}

impl Ctx<'_> {
    pub fn project(&self) -> &str {
        &self.cfg.project
    }
    pub fn network(&self) -> String {
        names::network(&self.cfg.project)
    }
    pub fn dir(&self) -> std::path::PathBuf {
        self.cfg
            .path
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| ".".into())
    }
    /// Whether `e` runs on this server.
    pub fn runs_here(&self, e: &Entry) -> bool {
        e.servers().iter().any(|s| s == self.server)
    }
    /// A fault-injection point of a step on this server (see [`crate::interrupt`]).
    pub async fn failpoint(&self, name: &str) -> Result<(), String> {
        crate::interrupt::failpoint_on(name, Some(self.server)).await
    }
    /// `<luma.yml>: <what>: <message>`, for errors about one entry.
    pub fn err(&self, what: &str, msg: impl std::fmt::Display) -> String {
        format!("{}: {what}: {msg}", self.cfg.path.display())
    }
}

pub fn labels(project: &str, role: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
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

/// Takes the project's deploy lock for `command` (shown to anyone else who tries), after
/// signals start being listened for: from here on a signal is handled, never fatal.
pub async fn take_lock(ctx: &Ctx<'_>, command: &str) -> Result<crate::lock::Lock, String> {
    crate::interrupt::install();
    ctx.ui
        .step(
            "take the deploy lock",
            crate::lock::Lock::acquire_for(ctx.engine, ctx.project(), &ctx.proxy.image, command),
        )
        .await
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
    for d in proxyctl::drift(ctx.engine, &ctx.proxy).await? {
        ui.info(format!("! {d}"));
    }
    let net = ctx.network();
    // A network that exists is used as it is, whatever its subnet (an older luma took it from
    // Docker's default pools): recreating it would cut off every container on it.
    let subnets = match ctx.engine.network_subnets(&net).await? {
        Some(subnets) => subnets,
        None => {
            let (subnets, warning) = ui
                .step(
                    format!("create network {net} in pool {}", ctx.cfg.network.range),
                    create_network(ctx, &net),
                )
                .await?;
            if let Some(w) = warning {
                ui.info(format!("! {w}"));
            }
            subnets
        }
    };
    let shown = if subnets.is_empty() {
        "no IPv4 subnet".to_string()
    } else {
        subnets.join(", ")
    };
    ui.step(
        format!("network {net} ({shown})"),
        proxyctl::attach(ctx.engine, &ctx.proxy, &net),
    )
    .await?;
    if ctx.cfg.host_fast_path {
        host_fast_path(ctx).await;
    }
    for svc in ctx.cfg.services.iter().filter(|s| ctx.runs_here(s)) {
        if crate::interrupt::requested() {
            return Err(crate::interrupt::INTERRUPTED.into());
        }
        ensure_service(ctx, svc).await?;
    }
    Ok(())
}

/// Keeps the host's firewall fast path for the pool ([`crate::hostpath`]) and for the
/// client's leg to the proxy ([`crate::hostpath::edge`]): said when added or changed, and when
/// it cannot be, with why and what to do; silent when it is in place.
async fn host_fast_path(ctx: &Ctx<'_>) {
    use crate::hostpath::{ensure, Outcome, ENV};
    let ui = ctx.ui;
    let pool = &ctx.cfg.network.range;
    match ensure(ctx.engine, pool).await {
        Outcome::Present => {}
        Outcome::Added => ui.info(format!(
            "host fast path for pool {pool}: established traffic inside it now skips Docker's \
             per-network firewall rules (a rule in DOCKER-USER)"
        )),
        Outcome::Unavailable(why) => {
            // The edge rules need the same iptables: one note says why for both.
            return ui.info(format!(
                "! no host fast path for pool {pool} on {}: {why}. Requests between the proxy \
                 and apps, and from clients to the proxy, are slower as the server's Docker \
                 networks grow (docs/scale.md). luma keeps these firewall rules when it runs \
                 as root on the engine's host; {ENV}=off stops this note",
                ctx.server
            ));
        }
    }
    edge_fast_path(ctx).await;
}

/// Keeps the edge rules of the host fast path in step with where the proxy's published ports
/// are now and the host's uplinks ([`crate::hostpath::edge`]). Also after the proxy leaves a
/// network, since Docker may move its ports then.
pub async fn edge_fast_path(ctx: &Ctx<'_>) {
    use crate::hostpath::{edge, ENV};
    match edge::ensure(ctx.engine, &ctx.proxy.container).await {
        Ok(o) if o.added == 0 && o.removed == 0 => {}
        Ok(o) => {
            let pairs: Vec<String> = o
                .edges
                .iter()
                .map(|e| format!("{} <-> {}", e.uplink, e.bridge))
                .collect();
            ctx.ui.info(format!(
                "host fast path for clients: established connections to the proxy's published \
                 ports skip Docker's per-network firewall rules between {} ({} rules added, {} \
                 removed in DOCKER-USER)",
                if pairs.is_empty() {
                    "no interfaces now".to_string()
                } else {
                    pairs.join(", ")
                },
                o.added,
                o.removed
            ))
        }
        Err(why) => ctx.ui.info(format!(
            "! no host fast path for clients on {}: {why}. Requests from clients to the proxy \
             are slower as the server's Docker networks grow (docs/scale.md). luma keeps these \
             firewall rules when it runs as root on the engine's host (it needs `iptables` and \
             `ip` there); {ENV}=off stops this note, and turns off the pool's rule too",
            ctx.server
        )),
    }
}

/// How many subnets in a row a new network may lose to other creators (other luma runs, or
/// other engines on the same host) before luma gives up.
const NETWORK_ATTEMPTS: usize = 8;

/// Creates the project network `net` with the first subnet of the pool that no network of
/// the engine and no route of its host overlaps (see [`crate::netpool`]). Returns its
/// subnets, and a warning when the host's routes could not be read (the subnet is then
/// checked against the engine's networks only).
///
/// Two creators may pick the same subnet at once. The engine refuses the second when both
/// are its own networks ("Pool overlaps"). It does not know another engine on the same
/// host, so after creating, the host's routes are read again: a route to the subnet on
/// another interface than the new bridge means someone else has it too, and the new network
/// is removed. Whoever reads second yields (both yield when both read second), and every
/// retry waits a random moment first, so they pull apart. An engine before API 1.44 also
/// lets two creates of one name both succeed (with different subnets): see
/// [`one_network_of_the_name`].
async fn create_network(ctx: &Ctx<'_>, net: &str) -> Result<(Vec<String>, Option<String>), String> {
    use crate::engine::NetworkCreated;
    use crate::netpool::{Cidr, Holder};
    let pool = &ctx.cfg.network;
    let mut lost: Vec<Cidr> = Vec::new();
    let mut warning = None;
    // Why the last subnet was lost: shown when luma gives up, so a refusal that is not a
    // race (the engine's own message) can be told from one.
    let mut last_loss = String::new();
    for attempt in 0..NETWORK_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(retry_pause()).await;
        }
        let mut taken: Vec<_> = ctx
            .engine
            .network_subnets_in_use()
            .await?
            .into_iter()
            .filter_map(|(name, subnet)| {
                Some(crate::netpool::Taken {
                    net: Cidr::from_engine(&subnet)?,
                    by: Holder::Network(name),
                })
            })
            .collect();
        let routes = host_routes(ctx).await;
        match &routes {
            Ok(r) => taken.extend(r.iter().cloned()),
            Err(e) => {
                warning = Some(format!(
                    "{e}; the subnet of network {net} is checked against the engine's networks \
                     only, not against the host's routes"
                ))
            }
        }
        let Some(subnet) = pool.first_free(&taken, &lost) else {
            return Err(crate::netpool::exhausted(
                ctx.server,
                net,
                pool,
                &taken,
                &ctx.cfg.path.display().to_string(),
            ));
        };
        let labels = labels(ctx.project(), "network", &[]);
        let subnet_text = subnet.to_string();
        match ctx
            .engine
            .create_network(net, labels, Some(&subnet_text))
            .await?
        {
            NetworkCreated::Created { id, bridge } => {
                let ours = Holder::Route(bridge);
                let shared = match (&routes, host_routes(ctx).await) {
                    (Ok(_), Ok(now)) => now
                        .into_iter()
                        .find(|r| r.net.overlaps(&subnet) && r.by != ours),
                    _ => None,
                };
                let Some(other) = shared else {
                    let subnets = one_network_of_the_name(ctx, net, &id, vec![subnet_text]).await?;
                    return Ok((subnets, warning));
                };
                ctx.engine.remove_network(&id).await?;
                last_loss =
                    format!("the host routes {subnet} also through another interface: {other}");
                lost.push(subnet);
            }
            // Another run made this project's network in between: use it.
            NetworkCreated::Exists => {
                let subnets = ctx.engine.network_subnets(net).await?.ok_or_else(|| {
                    format!(
                        "network {net} on {} was there a moment ago and is gone now; run it again",
                        ctx.server
                    )
                })?;
                return Ok((subnets, warning));
            }
            NetworkCreated::Overlaps(message) => {
                last_loss = format!("the engine refused {subnet}: {message}");
                lost.push(subnet);
            }
        }
    }
    Err(format!(
        "server {}: could not create network {net}: {NETWORK_ATTEMPTS} free subnets of the pool \
         {} in a row were taken by others while luma created it (other luma runs, or other \
         engines on the same host, creating networks at the same time); run it again. The \
         last one: {last_loss}",
        ctx.server, pool.range
    ))
}

/// Makes sure one network is called `net` after this run created one (ID `id`, with
/// `subnets`), and returns the subnets of the one that stays.
///
/// An engine before API 1.44 (Docker 20.10 is 1.41) checks the name only before it creates,
/// so two creates of one name at the same moment both succeed, with different subnets from
/// the pool. Each creator lists the networks of the name afterwards: the first made stays
/// ([`crate::netpool::keeper`]), and a creator whose network is not that one removes its own
/// and uses the first. A creator that lists while the other network is still being made does
/// not see it yet; `deploy` and `setup` hold the project's lock around this, so two luma runs
/// of a project do not create its network at once, and this is the repair for what the lock
/// does not cover (an older luma, `docker network create` by hand).
async fn one_network_of_the_name(
    ctx: &Ctx<'_>,
    net: &str,
    id: &str,
    subnets: Vec<String>,
) -> Result<Vec<String>, String> {
    let all = ctx.engine.networks_named(net).await?;
    let order: Vec<(&str, &str)> = all
        .iter()
        .map(|n| (n.id.as_str(), n.created.as_str()))
        .collect();
    match crate::netpool::keeper(&order).map(|i| &all[i]) {
        Some(first) if all.len() > 1 && first.id != id => {
            ctx.engine.remove_network(id).await?;
            Ok(first.subnets.clone())
        }
        _ => Ok(subnets),
    }
}

/// The routes of the engine's host, default routes left out (see [`crate::netpool::parse_routes`]).
async fn host_routes(ctx: &Ctx<'_>) -> Result<Vec<crate::netpool::Taken>, String> {
    let table = ctx.engine.host_routes().await?;
    crate::netpool::parse_routes(&table)
        .map_err(|e| format!("cannot read the routes of server {}: {e}", ctx.server))
}

/// 50 to 250 ms, different in every call and process: creators that collided retry apart.
fn retry_pause() -> std::time::Duration {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is randomly keyed per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    std::time::Duration::from_millis(50 + h.finish() % 200)
}

/// Read-only checks: images that must already exist, secrets, custom certificates (they parse,
/// are valid and cover every host), the proxy image, host ports.
pub async fn preflight(ctx: &Ctx<'_>, selected: &[&Entry]) -> Result<(), String> {
    for e in selected {
        deploy_tls(ctx, e)?;
    }
    // A remote server gets the proxy image from this machine (`fleet::deliver_proxy_image`).
    if !ctx.delivered {
        proxyctl::ensure_image(ctx.engine, &ctx.proxy).await?;
    }
    let services = ctx.cfg.services.iter().filter(|s| ctx.runs_here(s));
    for e in selected.iter().copied().chain(services) {
        env_of(ctx, e, "preflight")?;
        // A delivered image is checked on this machine's engine, where it comes from.
        if let (ImageSource::Image(i), false) = (&e.source, ctx.delivered) {
            if !ctx.engine.image_exists(i).await? {
                return Err(missing_image(ctx, e, i));
            }
        }
    }
    preflight_ports(ctx).await
}

/// The HTTPS part of an app's deploy request (none for an app without a route), its custom
/// certificate checked now.
pub fn deploy_tls(ctx: &Ctx<'_>, e: &Entry) -> Result<crate::tls::DeployTls, String> {
    match &e.proxy {
        Some(route) => crate::tls::for_route(
            &ctx.cfg.path.display().to_string(),
            &e.name,
            route,
            ctx.secrets,
            luma_api::time::unix_now(),
        ),
        None => Ok(Default::default()),
    }
}

fn missing_image(ctx: &Ctx<'_>, e: &Entry, image: &str) -> String {
    ctx.err(
        &e.name,
        format!("image {image:?} is not on the engine, and Luma deploys without a registry; build it first or use `build:`"),
    )
}

/// Finds host-port clashes before anything changes, naming the container that holds the port.
async fn preflight_ports(ctx: &Ctx<'_>) -> Result<(), String> {
    let mut wanted: Vec<(u16, String)> = Vec::new();
    let entries = ctx.cfg.services.iter().chain(ctx.cfg.apps.iter());
    for e in entries.filter(|e| ctx.runs_here(e)) {
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
                    return Err(ctx.err(
                        entry,
                        format!(
                            "wants host port {port}, which container {} already publishes; stop that container or change `ports`",
                            engine::name_of(&c)
                        ),
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
/// ports, volumes, restart policy and stop timeout, under Docker's init, in the project network
/// under `aliases`. A container that fails to start is removed again.
pub async fn run_entry(
    ctx: &Ctx<'_>,
    e: &Entry,
    name: &str,
    image: &str,
    env: &[String],
    labels: HashMap<String, String>,
    aliases: Vec<String>,
) -> Result<(), String> {
    let spec = ContainerSpec {
        name: name.to_string(),
        image: image.to_string(),
        env: env.to_vec(),
        labels,
        cmd: e.command.clone(),
        network: Some((ctx.network(), aliases)),
        ports: e
            .ports
            .iter()
            .map(|p| crate::config::parse_port(p))
            .collect::<Result<_, _>>()?,
        binds: e.volumes.clone(),
        restart_unless_stopped: true,
        init: true,
        stop_timeout: Some(e.stop_grace_s() as i64),
        // An app's logs are its owner's: the daemon's log settings apply, as to any container.
        json_log_opts: HashMap::new(),
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

pub fn env_of(ctx: &Ctx<'_>, e: &Entry, release: &str) -> Result<Vec<String>, String> {
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

/// The image an entry runs: the given one (which must be on the engine), or one built on the
/// engine and tagged `tag`. Returns the image and whether this call built it.
pub async fn image_for(ctx: &Ctx<'_>, e: &Entry, tag: &str) -> Result<(String, bool), String> {
    if ctx.delivered {
        // Built on this machine and put here before the release (see `crate::fleet`).
        let (image, ours) = match &e.source {
            ImageSource::Image(i) => (i.clone(), false),
            ImageSource::Build(_) => (tag.to_string(), true),
        };
        if !ctx.engine.image_exists(&image).await? {
            return Err(format!(
                "image {image} was not delivered to server {}",
                ctx.server
            ));
        }
        return Ok((image, ours));
    }
    match &e.source {
        ImageSource::Image(i) => {
            if ctx.engine.image_exists(i).await? {
                Ok((i.clone(), false))
            } else {
                Err(missing_image(ctx, e, i))
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
                labels: labels(
                    ctx.project(),
                    names::ROLE_IMAGE,
                    &[(names::LABEL_APP, &e.name)],
                ),
            };
            ui.step(
                format!("build {tag}"),
                ctx.engine.build(ctxtar, &spec, |line| ui.detail(line)),
            )
            .await?;
            Ok((tag.to_string(), true))
        }
    }
}

async fn ensure_service(ctx: &Ctx<'_>, svc: &Entry) -> Result<(), String> {
    let name = names::service_container(ctx.project(), &svc.name);
    let (image, _) = image_for(
        ctx,
        svc,
        &format!("{}:latest", names::image_repo(ctx.project(), &svc.name)),
    )
    .await?;
    let env = env_of(ctx, svc, "service")?;
    // The image ID, not its tag: a rebuilt `build:` service keeps its tag but must be
    // recreated.
    let image_id = ctx.engine.image_id(&image).await?.unwrap_or(image.clone());
    let mut parts = vec![image_id];
    parts.extend(env.iter().cloned());
    parts.extend(svc.ports.iter().cloned());
    parts.extend(svc.volumes.iter().cloned());
    parts.extend(svc.command.iter().flatten().cloned());
    parts.push(format!("stop_timeout={}", svc.stop_timeout.as_secs()));
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
                ctx.engine.stop(&name, svc.stop_grace_s()).await?;
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
            run_entry(
                ctx,
                svc,
                &name,
                &image,
                &env,
                labels,
                vec![svc.name.clone()],
            )
            .await
        })
        .await
}
