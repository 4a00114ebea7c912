//! The phase after the point of no return: the new release is live, and what remains is
//! bookkeeping that is finished, never undone. See the phase contract in `release/mod.rs`.

use super::ReleaseError;
use crate::config::Entry;
use crate::engine::{self, ContainerSpec};
use crate::names;
use crate::project::{self, Ctx};

const RECORD: &str = "record the live release in labels (the marker container)";
const RETIRE: &str = "stop and disconnect the previous release";
const PRUNE: &str = "remove releases beyond the retained ones, and images of failed releases";

/// A release that is live. Its only way out is [`Switched::settle`].
#[must_use = "a switched release must be settled"]
pub struct Switched<'c, 'a> {
    ctx: &'c Ctx<'a>,
    app: Entry,
    release: String,
}

impl<'c, 'a> Switched<'c, 'a> {
    pub(super) fn new(ctx: &'c Ctx<'a>, app: Entry, release: String) -> Self {
        Switched { ctx, app, release }
    }

    pub fn ctx(&self) -> &'c Ctx<'a> {
        self.ctx
    }
    pub fn server(&self) -> &str {
        self.ctx.server
    }
    pub fn release(&self) -> &str {
        &self.release
    }

    /// Records, retires, prunes. Signals wait for it; a failure names what is left.
    pub async fn settle(self) -> Result<(), ReleaseError> {
        let unsettled = |error: String, left: &[&'static str]| ReleaseError::Unsettled {
            app: self.app.name.clone(),
            release: self.release.clone(),
            error,
            left: left.to_vec(),
        };
        let ctx = self.ctx;
        let step = |name: &'static str| async move { ctx.failpoint(name).await };
        async {
            step("settle.record").await?;
            record_live(self.ctx, &self.app.name, &self.release).await
        }
        .await
        .map_err(|e| unsettled(e, &[RECORD, RETIRE, PRUNE]))?;
        async {
            step("settle.retire").await?;
            retire_others(self.ctx, &self.app, &self.release).await
        }
        .await
        .map_err(|e| unsettled(e, &[RETIRE, PRUNE]))?;
        let pruned = prune_releases(self.ctx, &self.app, &self.release)
            .await
            .map_err(|e| unsettled(e, &[PRUNE]));
        // Settled (or stopped for good): the next app starts before its own point of no return.
        crate::interrupt::settling(false);
        pruned
    }
}

/// Settles an app from the engine's and the proxy's truth (what `luma prune` runs): the
/// proxy's route names the live release, or, for an app without a route, the label record or
/// else the newest running release.
pub async fn settle_app(ctx: &Ctx<'_>, app: &Entry) -> Result<Option<String>, String> {
    let all = super::releases(ctx, &app.name).await?;
    let live = match &app.proxy {
        Some(_) => crate::proxyctl::settled(ctx.engine, &ctx.proxy, ctx.project(), &app.name)
            .await?
            .and_then(|r| r.release()),
        None => match super::recorded_release(ctx, &app.name).await? {
            Some(r) => Some(r),
            None => all
                .iter()
                .rev()
                .find(|(_, cs)| cs.iter().any(engine::is_running))
                .map(|(r, _)| r.clone()),
        },
    };
    let Some(live) = live else {
        return Ok(None);
    };
    if super::recorded_release(ctx, &app.name).await?.as_deref() != Some(live.as_str()) {
        record_live(ctx, &app.name, &live).await?;
    }
    retire_others(ctx, app, &live).await?;
    prune_releases(ctx, app, &live).await?;
    Ok(Some(live))
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
        labels: project::labels(
            ctx.project(),
            names::ROLE_MARKER,
            &[(names::LABEL_APP, app), (names::LABEL_RELEASE, release)],
        ),
        ..Default::default()
    };
    ctx.engine.create(&spec).await.map(|_| ())
}

/// Stops and disconnects every other running release of the app (the proxy has drained it),
/// all replicas at once: they run under Docker's init, so an app that ignores SIGTERM as PID 1
/// still exits at once, and `stop_timeout` bounds the rest.
async fn retire_others(ctx: &Ctx<'_>, app: &Entry, live: &str) -> Result<(), String> {
    let net = ctx.network();
    let all = super::releases(ctx, &app.name).await?;
    let grace = app.stop_grace_s();
    let old: Vec<String> = all
        .iter()
        .filter(|(rel, _)| rel != live)
        .flat_map(|(_, cs)| cs.iter())
        .filter(|c| engine::is_running(c) || has_network(c, &net))
        .map(engine::name_of)
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    ctx.ui
        .step("stop the previous release", async {
            let net = &net;
            let stops = old.iter().map(|name| async move {
                ctx.engine.stop(name, grace).await?;
                ctx.engine.disconnect_network(net, name).await
            });
            for r in futures_util::future::join_all(stops).await {
                r?;
            }
            Ok(())
        })
        .await
}

fn has_network(c: &bollard::models::ContainerSummary, net: &str) -> bool {
    c.network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .is_some_and(|n| n.contains_key(net))
}

/// Removes releases beyond the newest `retain` earlier ones, with their images, and images of
/// releases that have no containers left (failed or interrupted deploys).
async fn prune_releases(ctx: &Ctx<'_>, app: &Entry, live: &str) -> Result<(), String> {
    let all = super::releases(ctx, &app.name).await?;
    let old: Vec<_> = all.iter().filter(|(r, _)| r != live).collect();
    let drop_n = old.len().saturating_sub(ctx.retain);
    let repo = names::image_repo(ctx.project(), &app.name);
    for (rel, cs) in old.iter().take(drop_n) {
        for c in cs {
            ctx.engine.remove(&engine::name_of(c)).await?;
        }
        ctx.engine.remove_image(&format!("{repo}:{rel}")).await?;
    }
    let kept: Vec<&str> = std::iter::once(live)
        .chain(old.iter().skip(drop_n).map(|(r, _)| r.as_str()))
        .collect();
    let built = ctx
        .engine
        .images(&[
            (names::LABEL_PROJECT, ctx.project()),
            (names::LABEL_APP, &app.name),
            (names::LABEL_ROLE, names::ROLE_IMAGE),
        ])
        .await?;
    for tag in built.iter().flat_map(|(_, tags)| tags.iter()) {
        let Some(rel) = tag.strip_prefix(&format!("{repo}:")) else {
            continue;
        };
        if rel != "latest" && !kept.contains(&rel) {
            ctx.engine.remove_image(tag).await?;
        }
    }
    Ok(())
}
