//! The reversible phase: a release that runs and passed every check but carries no proxy
//! traffic yet. See the phase contract in `release/mod.rs`.

use super::settle::Switched;
use super::ReleaseError;
use crate::config::Entry;
use crate::interrupt::unless_interrupted;
use crate::names;
use crate::project::{self, Ctx};
use crate::proxyctl;
use luma_api::route::{HealthSettings, RouteSpec, RouteTimeouts};
use luma_api::{CallError, CheckRequest, DeployRequest};

/// Where a prepared release's containers came from, which decides how it is abandoned.
enum Origin {
    /// Created by this deploy: abandoning removes them, and the image if this deploy built it.
    New { built_image: Option<String> },
    /// A retained release brought back by rollback: abandoning stops it again.
    Retained,
}

/// A release that is up and checked, with no proxy traffic. Its only ways out are
/// [`Prepared::switch`] (the point of no return) and abandoning it (inside this module, on any
/// failure or signal).
#[must_use = "a prepared release must be switched or abandoned"]
pub struct Prepared<'c, 'a> {
    ctx: &'c Ctx<'a>,
    app: Entry,
    release: String,
    alias: String,
    containers: Vec<String>,
    origin: Origin,
}

impl<'c, 'a> Prepared<'c, 'a> {
    /// Builds (or finds) the image, starts new replicas, checks and realiases them. On any
    /// failure or signal, what this created is removed again and the error is returned.
    pub async fn new_release(
        ctx: &'c Ctx<'a>,
        app: &Entry,
        release: &str,
    ) -> Result<Prepared<'c, 'a>, ReleaseError> {
        let alias = names::release_alias(&app.name, release)?;
        let mut p = Prepared {
            ctx,
            app: app.clone(),
            release: release.to_string(),
            alias,
            containers: Vec::new(),
            origin: Origin::New { built_image: None },
        };
        match p.bring_up_new().await {
            Ok(()) => Ok(p),
            Err(e) => Err(p.abandon(e).await),
        }
    }

    /// Starts the stopped containers of a retained release, then checks and realiases them.
    pub async fn retained(
        ctx: &'c Ctx<'a>,
        app: &Entry,
        release: &str,
        containers: Vec<String>,
    ) -> Result<Prepared<'c, 'a>, ReleaseError> {
        let alias = names::release_alias(&app.name, release)?;
        let p = Prepared {
            ctx,
            app: app.clone(),
            release: release.to_string(),
            alias,
            containers,
            origin: Origin::Retained,
        };
        let net = ctx.network();
        let started = ctx
            .ui
            .step(
                format!(
                    "start release {release} ({} replica(s))",
                    p.containers.len()
                ),
                unless_interrupted(async {
                    for n in &p.containers {
                        ctx.engine.disconnect_network(&net, n).await?;
                        ctx.engine
                            .connect_network(&net, n, vec![p.alias.clone()])
                            .await?;
                        ctx.engine.start(n).await?;
                    }
                    Ok(())
                }),
            )
            .await;
        let checked = match started {
            Ok(()) => p.check_and_realias().await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(()) => Ok(p),
            Err(e) => Err(p.abandon(e).await),
        }
    }

    /// The server this release is on.
    pub fn server(&self) -> &str {
        self.ctx.server
    }

    async fn bring_up_new(&mut self) -> Result<(), String> {
        let ctx = self.ctx;
        let tag = format!(
            "{}:{}",
            names::image_repo(ctx.project(), &self.app.name),
            self.release
        );
        let (image, built) = unless_interrupted(project::image_for(ctx, &self.app, &tag)).await?;
        if built {
            self.origin = Origin::New {
                built_image: Some(image.clone()),
            };
        }
        ctx.failpoint("prepare.image").await?;
        let env = project::env_of(ctx, &self.app, &self.release)?;
        let app = &self.app;
        let (containers, release, alias) = (&mut self.containers, &self.release, &self.alias);
        ctx.ui
            .step(
                format!("start {} new replica(s)", app.replicas),
                unless_interrupted(async {
                    for i in 1..=app.replicas {
                        let name = names::app_container(ctx.project(), &app.name, release, i);
                        if ctx.engine.inspect(&name).await?.is_some() {
                            return Err(format!("container {name} already exists (left by an earlier run?); `luma prune` settles the app, or remove it with `docker rm -f {name}`"));
                        }
                        // Recorded before it exists, so an interrupted create is cleaned up.
                        containers.push(name.clone());
                        let replica = i.to_string();
                        let labels = project::labels(
                            ctx.project(),
                            names::ROLE_APP,
                            &[
                                (names::LABEL_APP, &app.name),
                                (names::LABEL_RELEASE, release),
                                (names::LABEL_REPLICA, &replica),
                            ],
                        );
                        project::run_entry(
                            ctx,
                            app,
                            &name,
                            &image,
                            &env,
                            labels,
                            vec![alias.clone()],
                        )
                        .await?;
                    }
                    Ok(())
                }),
            )
            .await?;
        ctx.failpoint("prepare.started").await?;
        self.check_and_realias().await
    }

    /// Health-checks every replica on its own (it carries no traffic), then reconnects it
    /// with the app alias.
    async fn check_and_realias(&self) -> Result<(), String> {
        let ctx = self.ctx;
        let n = self.containers.len();
        match &self.app.proxy {
            Some(route) => {
                let target = format!("{}:{}", self.alias, route.app_port);
                let req = CheckRequest {
                    project: ctx.project().into(),
                    target: target.clone(),
                    network: ctx.network(),
                    health: self.health(),
                    timeout_ms: Some(self.app.health.deadline.as_millis() as u64),
                };
                ctx.ui
                    .step(
                        format!(
                            "health-check {n} replica(s) through the proxy ({target}{})",
                            self.app.health.path
                        ),
                        unless_interrupted(async {
                            let v = proxyctl::ask(ctx.engine, &ctx.proxy, req).await?;
                            let healthy = v.backends.iter().filter(|b| b.healthy).count();
                            if healthy < n {
                                return Err(format!(
                                    "only {healthy} of {n} replicas answer to {target}"
                                ));
                            }
                            Ok(())
                        }),
                    )
                    .await?;
            }
            None => {
                ctx.ui
                    .step(
                        "check the new replicas keep running",
                        unless_interrupted(async {
                            // No route means no health endpoint to ask: a replica that is
                            // still running after a short while has at least started.
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                            for c in &self.containers {
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
                        }),
                    )
                    .await?;
            }
        }
        ctx.failpoint("prepare.checked").await?;
        let net = ctx.network();
        ctx.ui
            .step(
                format!("give the new replicas the alias {}", self.app.name),
                unless_interrupted(async {
                    for c in &self.containers {
                        ctx.engine.disconnect_network(&net, c).await?;
                        ctx.engine
                            .connect_network(
                                &net,
                                c,
                                vec![self.app.name.clone(), self.alias.clone()],
                            )
                            .await?;
                    }
                    Ok(())
                }),
            )
            .await?;
        ctx.failpoint("prepare.realiased").await
    }

    fn health(&self) -> HealthSettings {
        HealthSettings {
            path: self.app.health.path.clone(),
            interval_ms: self.app.health.interval.as_millis().max(50) as u64,
            timeout_ms: self.app.health.timeout.as_millis().max(10) as u64,
            ..HealthSettings::default()
        }
    }

    /// The point of no return: one proxy call switches the route. A refusal abandons the
    /// release (nothing changed); an unknown outcome (the exec died, no reply in time) is
    /// settled by asking the proxy what is live. A signal during the call waits for its answer.
    pub async fn switch(self) -> Result<Switched<'c, 'a>, ReleaseError> {
        let ctx = self.ctx;
        if let Err(e) = ctx.failpoint("switch.before").await {
            return Err(self.abandon(e).await);
        }
        // The last moment a signal can still undo everything (on several servers: until the
        // first one switched; the others then follow).
        if crate::interrupt::requested() && !crate::interrupt::past_no_return() {
            return Err(self.abandon(crate::interrupt::INTERRUPTED.into()).await);
        }
        if let Some(route) = &self.app.proxy {
            let target = format!("{}:{}", self.alias, route.app_port);
            // Checked in preflight; checked again, as a certificate may expire in between.
            let tls = match project::deploy_tls(ctx, &self.app) {
                Ok(t) => t,
                Err(e) => return Err(self.abandon(e).await),
            };
            let req = DeployRequest {
                route: RouteSpec {
                    project: ctx.project().into(),
                    app: self.app.name.clone(),
                    hosts: route.hosts.clone(),
                    target: target.clone(),
                    network: ctx.network(),
                    health: self.health(),
                    timeouts: RouteTimeouts {
                        response_ms: route.response_timeout.as_millis() as u64,
                        ..RouteTimeouts::default()
                    },
                    limits: Default::default(),
                    tls: tls.tls,
                },
                deploy_timeout_ms: Some(self.app.health.deadline.as_millis() as u64),
                drain_timeout_ms: Some(30_000),
                certificate: tls.certificate,
                acme_account: ctx.acme_account.get().cloned(),
            };
            crate::interrupt::switching(true);
            let outcome = ctx
                .ui
                .step(
                    format!(
                        "switch {} to release {} and drain the old one",
                        route.hosts.join(", "),
                        self.release
                    ),
                    // Not interruptible: a signal here waits for the proxy's own answer, which
                    // is the truth. Abandoning the call instead would leave its request in
                    // flight, and a late switch could race the undo.
                    async { Ok(proxyctl::call(ctx.engine, &ctx.proxy, req).await) },
                )
                .await
                .unwrap_or_else(|e: String| Err(CallError::Unknown(e)));
            match outcome {
                Ok(_) => {}
                Err(CallError::Refused(e)) => {
                    crate::interrupt::switching(false);
                    return Err(self
                        .abandon(format!("the proxy refused the switch: {e}"))
                        .await);
                }
                Err(CallError::Unknown(why)) => {
                    ctx.ui.info(format!(
                        "the switch's outcome is unknown ({why}); asking the proxy what is live"
                    ));
                    match proxyctl::settled(ctx.engine, &ctx.proxy, ctx.project(), &self.app.name)
                        .await
                    {
                        Ok(Some(live)) if live.route.target == target => {
                            ctx.ui.info(format!(
                                "the proxy did switch to release {}; settling",
                                self.release
                            ));
                        }
                        Ok(_) => {
                            crate::interrupt::switching(false);
                            return Err(self
                                .abandon(format!("the proxy did not switch ({why})"))
                                .await);
                        }
                        Err(e) => {
                            return Err(ReleaseError::Unknown(format!(
                                "could not learn whether {} switched to release {} ({why}; asking the proxy failed: {e}). Nothing was removed. Run `luma status` to see what is live, then `luma prune` to settle it",
                                self.app.name, self.release
                            )))
                        }
                    }
                }
            }
        }
        crate::interrupt::settling(true);
        Ok(Switched::new(ctx, self.app, self.release))
    }

    /// Undoes what this release created and says the old release keeps serving.
    pub async fn abandon(self, error: String) -> ReleaseError {
        let ctx = self.ctx;
        if error != crate::interrupt::INTERRUPTED {
            print_logs(ctx, &self.containers).await;
        }
        let net = ctx.network();
        let undone = ctx
            .ui
            .step("undo this release", async {
                match &self.origin {
                    Origin::New { built_image } => {
                        for c in &self.containers {
                            ctx.engine.remove(c).await?;
                        }
                        if let Some(image) = built_image {
                            ctx.engine.remove_image(image).await?;
                        }
                    }
                    Origin::Retained => {
                        for c in &self.containers {
                            ctx.engine.stop(c, self.app.stop_grace_s()).await?;
                            ctx.engine.disconnect_network(&net, c).await?;
                        }
                    }
                }
                Ok(())
            })
            .await;
        let tail = match undone {
            Ok(()) => "The previous release keeps serving.".to_string(),
            Err(e) => format!(
                "The previous release keeps serving, but undoing failed ({e}); `luma prune` removes what is left."
            ),
        };
        ReleaseError::NothingChanged(format!("{error}\n{tail}"))
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
