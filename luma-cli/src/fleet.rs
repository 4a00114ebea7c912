//! The servers of a project, one [`Engine`] each, and what only makes sense across them: the
//! deploy lock taken on every server in one fixed order, and images put on remote servers from
//! this machine's engine.
//!
//! Servers are data. Every command runs its steps once per server, and one server (`local`, the
//! default) is the N = 1 case of the same loops, not a separate path.
//!
//! - **Order.** Servers are sorted by name, and locks are taken in that order and released in
//!   reverse, so two runs whose server sets overlap never each hold a lock the other wants.
//! - **Images.** A remote server gets its images from this machine: built (or found) on the
//!   local engine, then streamed into the server's engine over SSH ([`crate::transfer`]), or,
//!   with `docker.registry`, pushed once and pulled by every server. The release then uses them
//!   by tag ([`Ctx::delivered`]). The local server, when it is one, uses the local build as is.

use crate::config::{Config, Entry, ImageSource, LOCAL};
use crate::engine::{Engine, Transport};
use crate::lock::Lock;
use crate::names;
use crate::project::{self, Ctx};
use crate::proxyctl::{self, ProxySettings};
use crate::secrets::Secrets;
use crate::transfer::{self, RegistryAuth};
use crate::ui::Ui;
use futures_util::future::join_all;

/// One server and its engine, with the output marked with its name when there are several.
pub struct Server {
    pub name: String,
    pub engine: Engine,
    pub ui: Ui,
}

/// The servers a command works on, in lock order.
pub struct Fleet {
    pub servers: Vec<Server>,
    /// This machine's engine, where images for remote servers are built (the `local` server's
    /// engine when it is one), connected when first needed.
    builder: tokio::sync::OnceCell<Engine>,
    verbose: bool,
    /// For lines about the whole project (a server's own lines carry its name).
    pub ui: Ui,
}

/// The servers of `entries`, sorted, `local` for entries that name none.
pub fn server_names<'e>(entries: impl IntoIterator<Item = &'e Entry>) -> Vec<String> {
    let mut names: Vec<String> = entries.into_iter().flat_map(Entry::servers).collect();
    names.sort();
    names.dedup();
    names
}

/// Every server of the project (apps and services).
pub fn all_servers(cfg: &Config) -> Vec<String> {
    server_names(cfg.apps.iter().chain(cfg.services.iter()))
}

impl Fleet {
    /// Connects to every server at once (one SSH connection each). Every server that cannot be
    /// reached is named in the error; nothing has changed anywhere then.
    pub async fn connect(
        cfg: &Config,
        names: &[String],
        ui: &Ui,
        verbose: bool,
    ) -> Result<Fleet, String> {
        let (fleet, errors) = Self::connect_reachable(cfg, names, ui, verbose).await;
        if errors.is_empty() {
            Ok(fleet)
        } else {
            Err(format!("{}\nNothing was changed.", errors.join("\n")))
        }
    }

    /// Connects to every server that answers; the others are returned as errors, each named
    /// by server (for commands that only look, like `status`).
    pub async fn connect_reachable(
        cfg: &Config,
        names: &[String],
        ui: &Ui,
        verbose: bool,
    ) -> (Fleet, Vec<String>) {
        let several = names.len() > 1;
        let connected = join_all(names.iter().map(|name| async move {
            let transport = if name == LOCAL {
                Transport::Local
            } else {
                Transport::Ssh(crate::ssh::SshTarget::new(name, cfg.ssh.as_ref()))
            };
            let engine = Engine::connect(transport, verbose)
                .await
                .map_err(|e| format!("server {name}: {e}"))?;
            // The engine answers, at an API version both sides speak.
            engine
                .server_version()
                .await
                .map_err(|e| format!("server {name}: the Docker engine does not answer: {e}"))?;
            Ok::<_, String>(Server {
                name: name.clone(),
                engine,
                ui: if several {
                    ui.for_server(name)
                } else {
                    ui.clone()
                },
            })
        }))
        .await;
        let mut servers = Vec::new();
        let mut errors = Vec::new();
        for c in connected {
            match c {
                Ok(s) => servers.push(s),
                Err(e) => errors.push(e),
            }
        }
        let fleet = Fleet {
            servers,
            builder: tokio::sync::OnceCell::new(),
            verbose,
            ui: ui.clone(),
        };
        (fleet, errors)
    }

    /// One [`Ctx`] per server, in lock order.
    pub fn ctxs<'a>(
        &'a self,
        cfg: &'a Config,
        secrets: &'a Secrets,
        proxy: &ProxySettings,
        retain: usize,
    ) -> Vec<Ctx<'a>> {
        self.servers
            .iter()
            .map(|s| Ctx {
                server: &s.name,
                engine: &s.engine,
                cfg,
                secrets,
                proxy: proxy.clone(),
                ui: &s.ui,
                retain,
                delivered: s.name != LOCAL,
                acme_account: Default::default(),
            })
            .collect()
    }

    /// Whether any server is reached over SSH (images then come from this machine).
    pub fn has_remote(&self) -> bool {
        self.servers.iter().any(|s| s.name != LOCAL)
    }

    /// This machine's engine, where images for remote servers are built or found.
    pub async fn builder(&self) -> Result<&Engine, String> {
        if let Some(s) = self.servers.iter().find(|s| s.name == LOCAL) {
            return Ok(&s.engine);
        }
        self.builder
            .get_or_try_init(|| async {
                Engine::connect(Transport::Local, self.verbose)
                    .await
                    .map_err(|e| format!("this machine's Docker engine, where images for the servers are built: {e}"))
            })
            .await
    }
}

/// The project's deploy lock, held on every server of a command.
pub struct Locks<'c, 'a> {
    held: Vec<(&'c Ctx<'a>, Lock)>,
}

impl<'c, 'a> Locks<'c, 'a> {
    /// Takes the lock on every server in lock order; if one is held elsewhere, the ones taken
    /// are released again and the error names the holder.
    pub async fn take(ctxs: &'c [Ctx<'a>], command: &str) -> Result<Locks<'c, 'a>, String> {
        let mut held = Vec::new();
        for ctx in ctxs {
            match project::take_lock(ctx, command).await {
                Ok(l) => held.push((ctx, l)),
                Err(e) => {
                    let locks = Locks { held };
                    locks.release().await;
                    return Err(if ctxs.len() > 1 {
                        format!("server {}: {e}", ctx.server)
                    } else {
                        e
                    });
                }
            }
        }
        Ok(Locks { held })
    }

    /// Checks that every lock is still ours.
    pub async fn verify(&self) -> Result<(), String> {
        for (ctx, l) in &self.held {
            l.verify(ctx.engine)
                .await
                .map_err(|e| format!("server {}: {e}", ctx.server))?;
        }
        Ok(())
    }

    /// Releases every lock, in reverse order.
    pub async fn release(self) {
        for (ctx, l) in self.held.into_iter().rev() {
            l.release(ctx.engine).await;
        }
    }
}

/// The registry settings with the password from `.luma/secrets`.
pub fn registry_auth(cfg: &Config, secrets: &Secrets) -> Result<Option<RegistryAuth>, String> {
    let Some(r) = &cfg.registry else {
        return Ok(None);
    };
    let password = match &r.password_secret {
        Some(key) => Some(secrets.get(key).map(str::to_string).ok_or_else(|| {
            format!(
                "{}: docker.password: the secret {key:?} is not in .luma/secrets; add `{key}=...` there",
                cfg.path.display()
            )
        })?),
        None => None,
    };
    Ok(Some(RegistryAuth {
        address: r.address.clone(),
        username: r.username.clone(),
        password,
    }))
}

/// Puts the image of `e` (tagged `tag` when it is built) on every server of `ctxs` that is
/// not this machine: built or found on this machine's engine, then streamed to each server at
/// once, or pushed once and pulled by each when a registry is set. Every failure is named by
/// server; a server that did not get the image has nothing tagged that a release would use.
pub async fn deliver(fleet: &Fleet, ctxs: &[&Ctx<'_>], e: &Entry, tag: &str) -> Result<(), String> {
    let Some(first) = ctxs.first() else {
        return Ok(());
    };
    if ctxs.iter().all(|c| !c.delivered) {
        return Ok(());
    }
    let builder = fleet.builder().await?;
    let here = Ctx {
        server: LOCAL,
        engine: builder,
        cfg: first.cfg,
        secrets: first.secrets,
        proxy: first.proxy.clone(),
        ui: &fleet.ui,
        retain: first.retain,
        delivered: false,
        acme_account: Default::default(),
    };
    let image = match &e.source {
        // Built once, here, whatever the number of servers.
        ImageSource::Build(_) => project::image_for(&here, e, tag).await?.0,
        ImageSource::Image(i) => {
            if !builder.image_exists(i).await? {
                return Err(here.err(
                    &e.name,
                    format!("image {i:?} is not on this machine's engine, where images for the servers come from; build or load it here first"),
                ));
            }
            i.clone()
        }
    };
    let remote: Vec<&&Ctx> = ctxs.iter().filter(|c| c.server != LOCAL).collect();
    let registry = registry_auth(first.cfg, first.secrets)?;
    let results = match &registry {
        Some(reg) => {
            let pushed = transfer::push(builder, &image, reg, &fleet.ui).await?;
            let image = &image;
            join_all(remote.iter().map(|c| {
                let pushed = pushed.clone();
                async move { transfer::pull(c.engine, &pushed, image, reg, c.ui).await }
            }))
            .await
        }
        None => {
            join_all(
                remote
                    .iter()
                    .map(|c| transfer::send(builder, c.engine, &image, c.ui)),
            )
            .await
        }
    };
    let mut failed = Vec::new();
    let mut reached = Vec::new();
    for (c, r) in remote.iter().zip(results) {
        match r {
            Ok(_) => reached.push(c),
            Err(e) => failed.push(format!("server {}: {e}", c.server)),
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    // A release's own image is not left on the servers it did reach (a user's `image:` is
    // theirs, and a service's `:latest` may be what its running container was made from).
    let is_app = first.cfg.apps.iter().any(|a| a.name == e.name);
    if let (ImageSource::Build(_), true) = (&e.source, is_app) {
        for c in reached {
            if let Err(err) = c.engine.remove_image(&image).await {
                failed.push(format!(
                    "server {}: removing {image} again failed: {err}",
                    c.server
                ));
            }
        }
    }
    Err(format!(
        "image {image} did not reach every server:\n{}",
        failed.join("\n")
    ))
}

/// Puts the proxy image on every remote server that lacks it: from this machine's engine when
/// it has the image, otherwise built there from the static binary ([`proxyctl::ensure_image`]).
pub async fn deliver_proxy_image(fleet: &Fleet, ctxs: &[Ctx<'_>]) -> Result<(), String> {
    let results = join_all(ctxs.iter().map(|c| async move {
        if c.server == LOCAL || c.engine.image_exists(&c.proxy.image).await? {
            return proxyctl::ensure_image(c.engine, &c.proxy).await;
        }
        let builder = fleet.builder().await?;
        if builder.image_exists(&c.proxy.image).await? {
            transfer::send(builder, c.engine, &c.proxy.image, c.ui)
                .await
                .map(|_| ())
        } else {
            proxyctl::ensure_image(c.engine, &c.proxy).await
        }
    }))
    .await;
    let failed: Vec<String> = ctxs
        .iter()
        .zip(results)
        .filter_map(|(c, r)| r.err().map(|e| format!("server {}: {e}", c.server)))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

/// Runs `f` on every server at once; all errors, each named by server.
pub async fn on_all<'c, 'a, T, F, Fut>(ctxs: &'c [Ctx<'a>], f: F) -> Result<Vec<T>, String>
where
    F: Fn(&'c Ctx<'a>) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let several = ctxs.len() > 1;
    let results = join_all(ctxs.iter().map(&f)).await;
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for (c, r) in ctxs.iter().zip(results) {
        match r {
            Ok(v) => out.push(v),
            Err(e) if several => failed.push(format!("server {}: {e}", c.server)),
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(failed.join("\n"))
    }
}

/// The image tag a release of `app` is built under.
pub fn release_tag(project: &str, app: &str, release: &str) -> String {
    format!("{}:{release}", names::image_repo(project, app))
}
