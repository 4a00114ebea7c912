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
//! **Several servers.** An app on N servers is released all or nothing, and one server is the
//! N = 1 case of the same path ([`everywhere`]):
//!
//! ```text
//!  deliver the image   prepare on every server at once   every one passed?   switch server by
//!  to every server ──> (each fully reversible)       ──> no: abandon all ──> server, in order
//!                                                        (nothing switched)  then settle all
//! ```
//!
//! - If any server fails to prepare, no server switches and every server's new containers are
//!   removed; the error names each server that failed and why.
//! - If a switch fails after others succeeded, the servers already switched are put back on
//!   the release they served before, through the same phases (that release is still running,
//!   as settling had not started, and passes the health gate again); the report says what
//!   happened on each server. A server that had no earlier release keeps the new one.
//! - The project's lock is held on every server for the whole run, taken in server order
//!   ([`crate::fleet::Locks`]).
//!
//! `rollback` is the same path for the containers of a retained release (retained on every
//! server of the app).
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
use crate::fleet::{self, Fleet, Locks};
use crate::names;
use crate::project::{self, Ctx};
use crate::proxyctl;
use bollard::models::ContainerSummary;
use futures_util::future::join_all;
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
    /// Servers of one app serve different releases: a switch failed after others succeeded
    /// and not every switched server could be put back. The message says which serves what.
    Split(String),
}

impl ReleaseError {
    /// Exit status for scripts, about the app the run stopped at (apps released before it in
    /// the same run are live, and the message names them): 1 nothing changed, 2 live but
    /// unsettled, 3 unknown, 4 servers left on different releases.
    pub fn exit_code(&self) -> u8 {
        match self {
            ReleaseError::NothingChanged(_) | ReleaseError::Failed(_) => 1,
            ReleaseError::Unsettled { .. } => 2,
            ReleaseError::Unknown(_) => 3,
            ReleaseError::Split(_) => 4,
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
            ReleaseError::Split(m) => ReleaseError::Split(f(&m)),
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
            ReleaseError::Unknown(e) | ReleaseError::Split(e) => write!(f, "{e}"),
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
    pub server: String,
    pub url: String,
    pub via: Option<String>,
    pub answered: Result<u16, String>,
}

/// What a successful deploy serves: its URLs (https for hosts with a certificate) and the
/// certificate state of its HTTPS hosts, per server.
#[derive(Debug, Default)]
pub struct Deployed {
    pub urls: Vec<AppUrl>,
    pub certificates: Vec<(String, CertificateStatus)>,
    /// Servers whose proxy could not be asked about certificates (the deploy still succeeded).
    pub certificates_errors: Vec<String>,
}

/// The contexts of the servers `e` runs on, in lock order.
pub fn servers_of<'c, 'a>(ctxs: &'c [Ctx<'a>], e: &Entry) -> Vec<&'c Ctx<'a>> {
    ctxs.iter().filter(|c| c.runs_here(e)).collect()
}

/// Deploys the selected apps (all when empty) to their servers, then waits up to `cert_wait`
/// for the certificates of their HTTPS hosts.
pub async fn deploy(
    fleet: &Fleet,
    ctxs: &[Ctx<'_>],
    selected: &[String],
    force: bool,
    cert_wait: Duration,
) -> Result<Deployed, ReleaseError> {
    let Some(first) = ctxs.first() else {
        return Err(ReleaseError::Failed("no server to deploy to".into()));
    };
    let cfg = first.cfg;
    let apps: Vec<&Entry> = if selected.is_empty() {
        // Every app on the servers of this run (`--server` may narrow them).
        cfg.apps
            .iter()
            .filter(|a| ctxs.iter().any(|c| c.runs_here(a)))
            .collect()
    } else {
        selected
            .iter()
            .map(|s| cfg.app(s))
            .collect::<Result<_, _>>()?
    };
    let base = id::release_id(&first.dir(), force)?;
    // Everything that can be checked is checked before anything changes, on every server.
    fleet::on_all(ctxs, |c| {
        let here: Vec<&Entry> = apps.iter().copied().filter(|a| c.runs_here(a)).collect();
        async move { project::preflight(c, &here).await }
    })
    .await?;
    // The lock container runs the proxy image, so remote servers get it first.
    fleet::deliver_proxy_image(fleet, ctxs).await?;
    for app in &apps {
        next_release(&servers_of(ctxs, app), app, &base).await?;
    }
    for c in ctxs {
        for gone in crate::inventory::departed(c).await? {
            c.ui.info(format!(
                "! {gone} is on the engine but no longer in {}; `luma prune` removes it",
                cfg.path.display()
            ));
        }
    }
    // The locks come first: two deploys of one project must not even race on setup.
    let locks = Locks::take(ctxs, "deploy").await?;
    let mut released = Vec::new();
    let result = async {
        // Setup is idempotent infrastructure: it is never cut mid-step (a service between
        // stop and start), a signal is looked at once it is done.
        for svc in &cfg.services {
            let tag = format!(
                "{}:latest",
                names::image_repo(cfg.project.as_str(), &svc.name)
            );
            fleet::deliver(fleet, &servers_of(ctxs, svc), svc, &tag).await?;
        }
        fleet::on_all(ctxs, project::setup).await?;
        crate::tls::share_acme_account(ctxs, &apps).await?;
        for app in &apps {
            if crate::interrupt::requested() {
                return Err(ReleaseError::Failed(crate::interrupt::INTERRUPTED.into()));
            }
            let here = servers_of(ctxs, app);
            let release = next_release(&here, app, &base).await?;
            fleet.ui.info(format!(
                "▶ {}/{} release {release}{}",
                cfg.project,
                app.name,
                on_servers(&here)
            ));
            let tag = fleet::release_tag(&cfg.project, &app.name, &release);
            fleet::deliver(fleet, &here, app, &tag).await.map_err(|e| {
                ReleaseError::NothingChanged(format!(
                    "{e}\nNo server was switched; every server keeps serving its previous release."
                ))
            })?;
            everywhere(&here, app, &release, &locks, |c| {
                Prepared::new_release(c, app, &release)
            })
            .await?;
            released.push(format!("{} {release}", app.name));
        }
        Ok::<_, ReleaseError>(())
    }
    .await;
    locks.release().await;
    crate::interrupt::settling(false);
    result.map_err(|e| e.after(&released))?;
    let mut out = Deployed::default();
    for c in ctxs {
        let https_hosts: Vec<String> = apps
            .iter()
            .filter(|a| c.runs_here(a))
            .filter_map(|a| a.proxy.as_ref())
            .filter(|p| p.ssl != crate::config::Ssl::Off)
            .flat_map(|p| p.hosts.iter().cloned())
            .collect();
        let mut certificates = Vec::new();
        if !https_hosts.is_empty() {
            match crate::tls::wait_for_certificates(c, &https_hosts, cert_wait).await {
                Ok(v) => certificates = v,
                Err(e) => out
                    .certificates_errors
                    .push(format!("server {}: {e}", c.server)),
            }
        }
        let here: Vec<&Entry> = apps.iter().copied().filter(|a| c.runs_here(a)).collect();
        out.urls.extend(urls(c, &here, &certificates).await);
        out.certificates
            .extend(certificates.into_iter().map(|s| (c.server.to_string(), s)));
    }
    Ok(out)
}

/// ` on a, b` for output about several servers; empty for one.
fn on_servers(here: &[&Ctx<'_>]) -> String {
    if here.len() < 2 {
        return String::new();
    }
    let names: Vec<&str> = here.iter().map(|c| c.server).collect();
    format!(" on {}", names.join(", "))
}

/// One release of `app` on every server of `here`, all or nothing (see the module docs):
/// prepare on every server at once; only if every one passed, switch every one in server
/// order; if a switch fails, put the servers already switched back on their previous release
/// through the same health gate; then settle every server.
async fn everywhere<'c, 'a, F, Fut>(
    here: &[&'c Ctx<'a>],
    app: &Entry,
    release: &str,
    locks: &Locks<'_, '_>,
    prepare: F,
) -> Result<(), ReleaseError>
where
    F: Fn(&'c Ctx<'a>) -> Fut,
    Fut: std::future::Future<Output = Result<Prepared<'c, 'a>, ReleaseError>>,
{
    if let [one] = here {
        // One server: the phases as they are, its own errors saying it all.
        let p = prepare(one).await?;
        if let Err(e) = locks.verify().await {
            return Err(p.abandon(e).await);
        }
        return p.switch().await?.settle().await;
    }
    // Phase 1, on every server at once.
    let outcomes = join_all(here.iter().map(|c| prepare(c))).await;
    let mut prepared = Vec::new();
    let mut failed = Vec::new();
    for (c, o) in here.iter().zip(outcomes) {
        match o {
            Ok(p) => prepared.push(p),
            Err(e) => failed.push(format!("server {}: {e}", c.server)),
        }
    }
    let abandon_all = |prepared: Vec<Prepared<'c, 'a>>, why: String| async move {
        let undone = join_all(prepared.into_iter().map(|p| {
            let server = p.server().to_string();
            let why = why.clone();
            async move { (server, p.abandon(why).await.to_string()) }
        }))
        .await;
        // `abandon` says when undoing failed; only those are worth repeating.
        undone
            .into_iter()
            .filter(|(_, m)| m.contains("undoing failed"))
            .map(|(server, m)| format!("server {server}: {}", m.lines().last().unwrap_or("")))
            .collect::<Vec<_>>()
    };
    if !failed.is_empty() {
        let why = format!("release {release} of {} failed on another server", app.name);
        let leftovers = abandon_all(prepared, why).await;
        return Err(ReleaseError::NothingChanged(format!(
            "release {release} of {} did not pass on every server, so no server was switched:\n{}\n{}Every server keeps serving its previous release.",
            app.name,
            failed.join("\n"),
            removed_everywhere(&leftovers),
        )));
    }
    // What each server serves now, to put it back if a later server cannot switch. Without
    // that knowledge no server may switch.
    let mut before = Vec::new();
    for c in here {
        match live_release(c, &app.name).await {
            Ok(r) => before.push(r),
            Err(e) => {
                let e = format!("server {}: cannot learn the live release: {e}", c.server);
                let leftovers = abandon_all(prepared, e.clone()).await;
                return Err(ReleaseError::NothingChanged(format!(
                    "{e}\nNo server was switched. {}Every server keeps serving its previous release.",
                    removed_everywhere(&leftovers)
                )));
            }
        }
    }
    if let Err(e) = locks.verify().await {
        let leftovers = abandon_all(prepared, e.clone()).await;
        return Err(ReleaseError::NothingChanged(format!(
            "{e}\nNo server was switched. {}Every server keeps serving its previous release.",
            removed_everywhere(&leftovers)
        )));
    }
    // Phase 2: the point of no return, server by server. Once the first has switched, a
    // signal no longer undoes the others (see `Prepared::switch`).
    let mut switched = Vec::new();
    let mut rest = prepared.into_iter().zip(before.iter());
    while let Some((p, prev)) = rest.next() {
        let server = p.server().to_string();
        match p.switch().await {
            Ok(s) => switched.push((s, prev.clone())),
            Err(e) => {
                // Past the point of no return for the servers that switched: what follows
                // runs to its end whatever signal arrives.
                crate::interrupt::putting_back(true);
                let why = format!("server {server} could not switch");
                let leftovers = abandon_all(rest.map(|(p, _)| p).collect(), why).await;
                let (report, outcome) = put_back(switched, app).await;
                crate::interrupt::putting_back(false);
                crate::interrupt::settling(false);
                let mut msg = format!(
                    "release {release} of {} could not switch on server {server}: {e}\n{report}",
                    app.name
                );
                if !leftovers.is_empty() {
                    msg.push_str(&format!("\nUndoing failed on: {}", leftovers.join("; ")));
                }
                return Err(match (&e, outcome) {
                    (ReleaseError::Unknown(_), _) => ReleaseError::Unknown(format!(
                        "{msg}\nWhether server {server} switched is unknown: `luma status` shows what each server serves."
                    )),
                    (_, PutBack::Unknown) => ReleaseError::Unknown(format!(
                        "{msg}\n`luma status` shows what each server serves."
                    )),
                    (_, PutBack::All) => ReleaseError::NothingChanged(msg),
                    (_, PutBack::Split) => ReleaseError::Split(format!(
                        "{msg}\nThe servers now serve different releases of {}; `luma status` shows which.",
                        app.name
                    )),
                });
            }
        }
    }
    // Settle every server; each one's failure is named.
    let settled = join_all(switched.into_iter().map(|(s, _)| async move {
        let server = s.server().to_string();
        s.settle().await.map_err(|e| (server, e))
    }))
    .await;
    let failures: Vec<(String, ReleaseError)> =
        settled.into_iter().filter_map(Result::err).collect();
    match failures.len() {
        0 => Ok(()),
        1 => {
            let (server, e) = failures.into_iter().next().expect("one failure");
            Err(e.map_messages(|m| format!("server {server}: {m}")))
        }
        _ => {
            let lines: Vec<String> = failures
                .iter()
                .map(|(server, e)| format!("server {server}: {e}"))
                .collect();
            let code_2 = failures
                .iter()
                .all(|(_, e)| matches!(e, ReleaseError::Unsettled { .. }));
            let msg = lines.join("\n");
            Err(if code_2 {
                ReleaseError::Unsettled {
                    app: app.name.clone(),
                    release: release.to_string(),
                    error: msg,
                    left: vec!["settle every server listed above"],
                }
            } else {
                ReleaseError::Unknown(msg)
            })
        }
    }
}

/// "The new containers were removed everywhere." unless undoing failed somewhere (then the
/// servers and what is left).
fn removed_everywhere(leftovers: &[String]) -> String {
    if leftovers.is_empty() {
        "The new containers were removed everywhere. ".to_string()
    } else {
        format!(
            "Undoing failed on: {}. `luma prune` removes what is left. ",
            leftovers.join("; ")
        )
    }
}

/// How putting one server back ended, when it did not simply end.
enum Back {
    /// The proxy serves the previous release again; settling it stopped.
    Unsettled(String),
    /// Whether the proxy switched back could not be learned.
    Unknown(String),
    /// The server still serves the new release.
    Stayed(String),
}

/// Puts servers that switched back on the release they served before, through the same
/// phases (health gate first), and says what happened on each; true when every one is back.
async fn put_back(
    switched: Vec<(Switched<'_, '_>, Option<String>)>,
    app: &Entry,
) -> (String, PutBack) {
    if switched.is_empty() {
        return (
            "No server had switched; every server keeps serving its previous release.".into(),
            PutBack::All,
        );
    }
    let mut lines = Vec::new();
    let mut all_back = true;
    let mut unknown = false;
    for (s, prev) in switched {
        let ctx = s.ctx();
        let server = ctx.server.to_string();
        let new = s.release().to_string();
        let Some(prev) = prev else {
            // First release on this server: nothing to go back to, so it keeps the new one.
            let settled = s.settle().await;
            all_back = false;
            lines.push(format!(
                "server {server} had no earlier release of {} and keeps serving {new}{}",
                app.name,
                settled
                    .err()
                    .map(|e| format!(" (settling: {e})"))
                    .unwrap_or_default()
            ));
            continue;
        };
        // The new release stays live here until the old one, still running (settling never
        // ran), passes the gate again; settling the way back then retires the new one.
        drop(s);
        // Back through the gate and the switch; settling the way back is bookkeeping, and
        // its failure does not make the server serve the new release again.
        let back = async {
            let containers: Vec<String> = releases(ctx, &app.name)
                .await
                .map_err(Back::Stayed)?
                .into_iter()
                .find(|(r, _)| *r == prev)
                .map(|(_, cs)| cs.iter().map(engine::name_of).collect())
                .ok_or_else(|| Back::Stayed(format!("release {prev} is gone")))?;
            let p = Prepared::retained(ctx, app, &prev, containers)
                .await
                .map_err(|e| Back::Stayed(e.to_string()))?;
            let switched_back = match p.switch().await {
                Ok(s) => s,
                Err(e @ ReleaseError::Unknown(_)) => return Err(Back::Unknown(e.to_string())),
                Err(e) => return Err(Back::Stayed(e.to_string())),
            };
            switched_back
                .settle()
                .await
                .map_err(|e| Back::Unsettled(e.to_string()))
        }
        .await;
        lines.push(match back {
            Ok(()) => format!("server {server} was put back on release {prev}"),
            Err(Back::Unsettled(e)) => format!(
                "server {server} was put back on release {prev}, but settling stopped ({e}); `luma prune` finishes it"
            ),
            Err(Back::Unknown(e)) => {
                all_back = false;
                unknown = true;
                format!(
                    "server {server}: whether it went back to release {prev} is unknown ({e}); `luma status` shows what it serves"
                )
            }
            Err(Back::Stayed(e)) => {
                all_back = false;
                format!(
                    "server {server} could NOT be put back on release {prev} and serves {new}: {e}; run `luma rollback --server {server} {} {prev}`",
                    app.name
                )
            }
        });
    }
    let report = format!(
        "The servers that had switched were put back:\n{}",
        lines.join("\n")
    );
    let outcome = match (all_back, unknown) {
        (true, _) => PutBack::All,
        (false, true) => PutBack::Unknown,
        (false, false) => PutBack::Split,
    };
    (report, outcome)
}

/// Where putting servers back left the app.
enum PutBack {
    /// Every server serves the previous release again.
    All,
    /// Some server serves the new release.
    Split,
    /// What some server serves is unknown.
    Unknown,
}

/// The next release id of an app (unique among its releases on all its servers), checked
/// before anything changes: its alias fits one DNS label, and host ports allow a second
/// release.
async fn next_release(here: &[&Ctx<'_>], app: &Entry, base: &str) -> Result<String, String> {
    let mut taken: Vec<String> = Vec::new();
    for ctx in here {
        let existing = releases(ctx, &app.name).await?;
        refuse_host_port_redeploy(ctx, app, &existing)?;
        taken.extend(existing.into_iter().map(|(r, _)| r));
    }
    let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
    let release = id::unique(base, &taken);
    let Some(ctx) = here.first() else {
        return Err(format!("app {} runs on no server", app.name));
    };
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
                server: ctx.server.to_string(),
                url: format!("{scheme}://{h}"),
                via: base.clone(),
                answered,
            });
        }
    }
    out
}

/// Brings a retained release back through the same phases, on every server of the app at
/// once and all or nothing, like a deploy. The release must be retained on every server.
pub async fn rollback(
    ctxs: &[Ctx<'_>],
    app_name: &str,
    to: Option<&str>,
) -> Result<String, ReleaseError> {
    let Some(first) = ctxs.first() else {
        return Err(ReleaseError::Failed("no server".into()));
    };
    let app = first.cfg.app(app_name)?.clone();
    let here = servers_of(ctxs, &app);
    let locks = Locks::take(ctxs, "rollback").await?;
    let result = async {
        // Per server: the releases that could come back, oldest first, with their containers.
        let mut per_server = Vec::new();
        for ctx in &here {
            let live = live_release(ctx, app_name).await?;
            let candidates: Vec<(String, Vec<String>)> = releases(ctx, app_name)
                .await?
                .into_iter()
                // An app without a route has no proxy record, and every running release of
                // it gets `<app>` traffic: only stopped releases are candidates.
                .filter(|(r, cs)| match app.proxy {
                    Some(_) => Some(r) != live.as_ref(),
                    None => !cs.iter().any(engine::is_running),
                })
                .map(|(r, cs)| (r, cs.iter().map(engine::name_of).collect()))
                .collect();
            per_server.push((ctx.server, candidates));
        }
        let everywhere_retained = |r: &str| {
            per_server
                .iter()
                .all(|(_, cs)| cs.iter().any(|(x, _)| x == r))
        };
        let retained = per_server
            .first()
            .map(|(_, cs)| {
                cs.iter()
                    .map(|(r, _)| r.as_str())
                    .filter(|r| everywhere_retained(r))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let release: String =
            match to {
                Some(r) if everywhere_retained(r) => r.to_string(),
                Some(r) => {
                    let missing: Vec<&str> = per_server
                        .iter()
                        .filter(|(_, cs)| cs.iter().all(|(x, _)| x != r))
                        .map(|(s, _)| *s)
                        .collect();
                    return Err(ReleaseError::Failed(format!(
                    "release {r:?} of {app_name} is not retained on {}; retained everywhere: {}",
                    missing.join(", "),
                    if retained.is_empty() { "none" } else { &retained }
                )));
                }
                None => per_server
                    .first()
                    .and_then(|(_, cs)| {
                        cs.iter()
                            .rev()
                            .map(|(r, _)| r.clone())
                            .find(|r| everywhere_retained(r))
                    })
                    .ok_or_else(|| {
                        format!("no earlier release of {app_name} is retained on every server")
                    })?,
            };
        let containers_on = |server: &str| -> Vec<String> {
            per_server
                .iter()
                .find(|(s, _)| *s == server)
                .and_then(|(_, cs)| cs.iter().find(|(r, _)| *r == release))
                .map(|(_, names)| names.clone())
                .unwrap_or_default()
        };
        everywhere(&here, &app, &release, &locks, |c| {
            Prepared::retained(c, &app, &release, containers_on(c.server))
        })
        .await?;
        Ok::<_, ReleaseError>(release)
    }
    .await;
    locks.release().await;
    crate::interrupt::settling(false);
    result
}
