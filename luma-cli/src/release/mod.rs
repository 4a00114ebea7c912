//! A release of one app, as three phases with one point of no return.
//!
//! ```text
//!  prepare  (reversible)            switch (the point of no return)       settle (never undone)
//!  image -> start -> check ->  ──>  one proxy deploy call:           ──>  record the live release,
//!  realias                          swap, save, drain the old             retire the old one, prune
//! ```
//!
//! - **Prepare** ([`Prepared`]): build or find the image, start the new replicas with only their
//!   release alias `<app>--<release>` (nothing routes to them), have the proxy health-check
//!   every one inside the project network, then reconnect them with `[<app>, <app>--<release>]`
//!   (Docker cannot change a live endpoint's aliases). Any failure, or a signal, undoes exactly
//!   what this release created (its containers, the image it built) and the old release keeps
//!   serving. A [`Prepared`] can only be switched or abandoned.
//! - **Switch** ([`Prepared::switch`]): one typed `deploy` call to the proxy, which re-checks,
//!   saves its table, swaps the route and drains the old release before it answers. A refusal
//!   means nothing changed, so the release is abandoned. A signal during the call waits for its
//!   answer. If the outcome is unknown (the exec died, no reply in time), the proxy is asked
//!   what is live once no operation runs on the route ([`crate::proxyctl::settled`]), and the
//!   release continues from that truth.
//! - **Settle** ([`Switched::settle`]): record the live release in labels, stop and disconnect
//!   the old release, remove releases beyond the retained ones and images of failed releases.
//!   Nothing here is ever undone: a failure leaves the new release live and says what is left
//!   and that `luma prune` finishes it. A signal waits for settling to end.
//!
//! An app without a route has no proxy switch: its realias makes it reachable as `<app>` while
//! the old release still answers too, so abandoning it stays safe until the old release is
//! retired in settle.
//!
//! `rollback` is the same path for the containers of a retained release.
//!
//! After every app of a deploy is settled and the lock is released, the deploy asks the proxy
//! for the certificates of its HTTPS hosts, waiting a bounded time (`--cert-wait`) for them
//! to be issued. That wait is outside the phases: the releases are live and settled whatever
//! it finds, and a pending certificate is reported, not a failure.

pub mod id;
mod prepare;
mod settle;

pub use prepare::Prepared;
pub use settle::{settle_app, Switched};

use crate::config::Entry;
use crate::engine;
use crate::names;
use crate::project::{self, Ctx};
use crate::proxyctl;
use bollard::models::ContainerSummary;
use luma_api::tls::{CertState, CertificateStatus};
use std::time::Duration;

/// How a release ended when it did not simply succeed: what happened to the world.
#[derive(Debug)]
pub enum ReleaseError {
    /// A release was abandoned: what it made was undone and the previous release keeps
    /// serving.
    NothingChanged(String),
    /// A command failed before or outside a release (a check, setup, remove, prune).
    Failed(String),
    /// The new release is live; settling stopped part way.
    Unsettled {
        app: String,
        release: String,
        error: String,
        left: Vec<&'static str>,
    },
    /// Whether the proxy switched could not be learned; nothing was removed.
    Unknown(String),
}

impl ReleaseError {
    /// Exit status for scripts, about the app the run stopped at (apps released before it in
    /// the same run are live, and the message names them): 1 nothing changed, 2 live but
    /// unsettled, 3 unknown.
    pub fn exit_code(&self) -> u8 {
        match self {
            ReleaseError::NothingChanged(_) | ReleaseError::Failed(_) => 1,
            ReleaseError::Unsettled { .. } => 2,
            ReleaseError::Unknown(_) => 3,
        }
    }
}

impl From<String> for ReleaseError {
    fn from(e: String) -> Self {
        ReleaseError::Failed(e)
    }
}

impl ReleaseError {
    /// The same outcome, noting the apps this run released before it.
    fn after(self, released: &[String]) -> ReleaseError {
        if released.is_empty() {
            return self;
        }
        let note = format!(
            "\nReleased earlier in this run (live): {}.",
            released.join(", ")
        );
        self.map_messages(|m| format!("{m}{note}"))
    }

    /// Applies `f` to every message (e.g. to redact secrets).
    pub fn map_messages(self, f: impl Fn(&str) -> String) -> ReleaseError {
        match self {
            ReleaseError::NothingChanged(m) => ReleaseError::NothingChanged(f(&m)),
            ReleaseError::Failed(m) => ReleaseError::Failed(f(&m)),
            ReleaseError::Unknown(m) => ReleaseError::Unknown(f(&m)),
            ReleaseError::Unsettled {
                app,
                release,
                error,
                left,
            } => ReleaseError::Unsettled {
                app,
                release,
                error: f(&error),
                left,
            },
        }
    }
}

impl std::fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReleaseError::NothingChanged(e) | ReleaseError::Failed(e) => write!(f, "{e}"),
            ReleaseError::Unsettled {
                app,
                release,
                error,
                left,
            } => write!(
                f,
                "release {release} of {app} is live and serving, but settling stopped: {error}\nLeft to do: {}.\nFinish it with `luma prune`.",
                left.join("; ")
            ),
            ReleaseError::Unknown(e) => write!(f, "{e}"),
        }
    }
}

/// Releases of an app, oldest first, each with its containers.
pub async fn releases(
    ctx: &Ctx<'_>,
    app: &str,
) -> Result<Vec<(String, Vec<ContainerSummary>)>, String> {
    let mut cs = ctx
        .engine
        .containers(&[
            (names::LABEL_PROJECT, ctx.project()),
            (names::LABEL_APP, app),
            (names::LABEL_ROLE, names::ROLE_APP),
        ])
        .await?;
    cs.sort_by_key(|c| (c.created.unwrap_or(0), engine::name_of(c)));
    let mut out: Vec<(String, Vec<ContainerSummary>)> = Vec::new();
    for c in cs {
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
    Ok(proxyctl::routes(ctx.engine, &ctx.proxy)
        .await?
        .find(ctx.project(), app)
        .and_then(|r| r.release()))
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

/// A URL the proxy serves for an app, and whether it answered from here.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppUrl {
    pub url: String,
    pub via: Option<String>,
    pub answered: Result<u16, String>,
}

/// What a successful deploy serves: its URLs (https for hosts with a certificate) and the
/// certificate state of its HTTPS hosts.
#[derive(Debug, Default)]
pub struct Deployed {
    pub urls: Vec<AppUrl>,
    pub certificates: Vec<CertificateStatus>,
    /// Why the proxy could not be asked about certificates (the deploy still succeeded).
    pub certificates_error: Option<String>,
}

/// Deploys the selected apps (all when empty), then waits up to `cert_wait` for the
/// certificates of their HTTPS hosts.
pub async fn deploy(
    ctx: &Ctx<'_>,
    selected: &[String],
    force: bool,
    cert_wait: Duration,
) -> Result<Deployed, ReleaseError> {
    let apps: Vec<&Entry> = if selected.is_empty() {
        ctx.cfg.apps.iter().collect()
    } else {
        selected
            .iter()
            .map(|s| ctx.cfg.app(s))
            .collect::<Result<_, _>>()?
    };
    let base = id::release_id(&ctx.dir(), force)?;
    // Everything that can be checked is checked before anything changes.
    project::preflight(ctx, &apps).await?;
    for app in &apps {
        next_release(ctx, app, &base).await?;
    }
    for gone in crate::inventory::departed(ctx).await? {
        ctx.ui.info(format!(
            "! {gone} is on the engine but no longer in {}; `luma prune` removes it",
            ctx.cfg.path.display()
        ));
    }
    // The lock comes first: two deploys of one project must not even race on setup.
    let lock = project::take_lock(ctx, "deploy").await?;
    let mut released = Vec::new();
    let result = async {
        // Setup is idempotent infrastructure: it is never cut mid-step (a service between
        // stop and start), a signal is looked at once it is done.
        project::setup(ctx).await?;
        for app in &apps {
            if crate::interrupt::requested() {
                return Err(ReleaseError::Failed(crate::interrupt::INTERRUPTED.into()));
            }
            let release = next_release(ctx, app, &base).await?;
            ctx.ui.info(format!(
                "▶ {}/{} release {release}",
                ctx.project(),
                app.name
            ));
            let prepared = Prepared::new_release(ctx, app, &release).await?;
            if let Err(e) = lock.verify(ctx.engine).await {
                return Err(prepared.abandon(e).await);
            }
            prepared.switch().await?.settle().await?;
            released.push(format!("{} {release}", app.name));
        }
        Ok::<_, ReleaseError>(())
    }
    .await;
    lock.release(ctx.engine).await;
    crate::interrupt::settling(false);
    result.map_err(|e| e.after(&released))?;
    let https_hosts: Vec<String> = apps
        .iter()
        .filter_map(|a| a.proxy.as_ref())
        .filter(|p| p.ssl != crate::config::Ssl::Off)
        .flat_map(|p| p.hosts.iter().cloned())
        .collect();
    let mut out = Deployed::default();
    if !https_hosts.is_empty() {
        match crate::tls::wait_for_certificates(ctx, &https_hosts, cert_wait).await {
            Ok(c) => out.certificates = c,
            Err(e) => out.certificates_error = Some(e),
        }
    }
    out.urls = urls(ctx, &apps, &out.certificates).await;
    Ok(out)
}

/// The next release id of an app (unique among its releases), checked before anything
/// changes: its alias fits one DNS label, and host ports allow a second release.
async fn next_release(ctx: &Ctx<'_>, app: &Entry, base: &str) -> Result<String, String> {
    let existing = releases(ctx, &app.name).await?;
    refuse_host_port_redeploy(ctx, app, &existing)?;
    let taken: Vec<&str> = existing.iter().map(|(r, _)| r.as_str()).collect();
    let release = id::unique(base, &taken);
    names::release_alias(&app.name, &release)
        .map_err(|e| ctx.err(&format!("apps.{}", app.name), e))?;
    Ok(release)
}

/// Blue-green needs two releases side by side, which cannot share a host port.
fn refuse_host_port_redeploy(
    ctx: &Ctx<'_>,
    app: &Entry,
    existing: &[(String, Vec<ContainerSummary>)],
) -> Result<(), String> {
    let Some(port) = app.ports.first() else {
        return Ok(());
    };
    let running = existing
        .iter()
        .find(|(_, cs)| cs.iter().any(engine::is_running));
    match running {
        None => Ok(()),
        Some((rel, _)) => Err(ctx.err(
            &format!("apps.{}.ports", app.name),
            format!(
                "release {rel} publishes host port {port:?}, and a zero-downtime release must run beside the old one, which two releases cannot do on one host port. Nothing was changed. Route the app through the proxy (`proxy: {{hosts, app_port}}`) instead of `ports:`, make it a service, or `luma remove {}` first (downtime)",
                app.name
            ),
        )),
    }
}

/// The URLs of the deployed apps, each probed through the proxy's real published port: https
/// (through the HTTPS port) for hosts with a certificate, http for the others.
async fn urls(ctx: &Ctx<'_>, apps: &[&Entry], certificates: &[CertificateStatus]) -> Vec<AppUrl> {
    let http = proxyctl::published(ctx.engine, &ctx.proxy, proxyctl::Scheme::Http)
        .await
        .ok()
        .flatten();
    let https = proxyctl::published(ctx.engine, &ctx.proxy, proxyctl::Scheme::Https)
        .await
        .ok()
        .flatten();
    let mut out = Vec::new();
    for app in apps {
        for h in app.proxy.iter().flat_map(|p| p.hosts.iter()) {
            let issued = certificates
                .iter()
                .any(|c| crate::tls::same_host(&c.host, h) && c.state == CertState::Issued);
            let (scheme, base) = if issued {
                ("https", &https)
            } else {
                ("http", &http)
            };
            let answered = match base {
                Some(b) => proxyctl::probe(b, h).await,
                None => Err(format!(
                    "the proxy publishes no {} port on this host",
                    scheme.to_uppercase()
                )),
            };
            out.push(AppUrl {
                url: format!("{scheme}://{h}"),
                via: base.clone(),
                answered,
            });
        }
    }
    out
}

/// Brings a retained release back through the same phases.
pub async fn rollback(
    ctx: &Ctx<'_>,
    app_name: &str,
    to: Option<&str>,
) -> Result<String, ReleaseError> {
    let app = ctx.cfg.app(app_name)?.clone();
    let lock = project::take_lock(ctx, "rollback").await?;
    let result = async {
        let live = live_release(ctx, app_name).await?;
        let all = releases(ctx, app_name).await?;
        // An app without a route has no proxy record, and every running release of it gets
        // `<app>` traffic: only stopped releases are candidates.
        let candidates: Vec<&(String, Vec<_>)> = all
            .iter()
            .filter(|(r, cs)| match app.proxy {
                Some(_) => Some(r) != live.as_ref(),
                None => !cs.iter().any(engine::is_running),
            })
            .collect();
        let retained = || {
            candidates
                .iter()
                .map(|(r, _)| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (release, containers) = match to {
            Some(r) => candidates
                .iter()
                .find(|(x, _)| x == r)
                .copied()
                .ok_or_else(|| {
                    format!(
                        "release {r:?} of {app_name} is not retained; retained: {}",
                        retained()
                    )
                })?,
            None => candidates
                .last()
                .copied()
                .ok_or_else(|| format!("no earlier release of {app_name} is retained"))?,
        };
        let names: Vec<String> = containers.iter().map(engine::name_of).collect();
        let prepared = Prepared::retained(ctx, &app, release, names).await?;
        if let Err(e) = lock.verify(ctx.engine).await {
            return Err(prepared.abandon(e).await);
        }
        prepared.switch().await?.settle().await?;
        Ok::<_, ReleaseError>(release.clone())
    }
    .await;
    lock.release(ctx.engine).await;
    crate::interrupt::settling(false);
    result
}
