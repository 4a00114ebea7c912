//! One deploy per project at a time, across processes and hosts, with Docker's own primitives:
//! no heartbeat, no daemon, nothing left behind when `luma` dies.
//!
//! **Atomic acquire.** The lock is a container named `luma-lock_<project>`
//! ([`names::lock_container`]). Docker refuses a second container with a name in use, so
//! creating it is a test-and-set on the engine: of any number of concurrent takers, exactly one
//! creates it; the others get a name conflict.
//!
//! **The lock dies with its holder.** The container runs `luma-proxy hold-lock` from the proxy
//! image (which is on every engine Luma uses): a process that reads its stdin until EOF, then
//! exits. It is created with `OpenStdin` + `StdinOnce` + `AutoRemove`, and `luma` attaches to its
//! stdin *before* starting it and keeps that connection inside the [`Lock`]. Whenever that `luma`
//! goes away (release, error, panic, Ctrl-C, SIGKILL, crash) the kernel closes the connection;
//! the daemon then closes the container's stdin (`StdinOnce`: after its one attached client
//! left), `hold-lock` exits, and the daemon removes the container (`AutoRemove`). A dead `luma`
//! therefore holds the lock for well under a second, not until a timeout.
//!
//! **Stale locks and why takeover is by ID.** A lock container is stale when its state is
//! `exited`/`dead`/`removing` (holder gone, removal pending), when it is still `created` more than
//! [`CREATED_GRACE_S`] after it was taken (its taker died between create and start), or, as a last
//! resort for an engine that lost the attach connection without closing stdin (a daemon restart
//! with live-restore), when it was taken more than [`STALE_AFTER_S`] ago. A taker removes a stale
//! lock by the container *ID* it inspected, never by name, then creates again. When several
//! takers race on one stale lock they all remove the same ID (the slower ones find nothing to
//! remove), then all create: Docker lets exactly one succeed and the others find a fresh, live
//! lock. Removing by name would let a slower taker delete the winner's new lock, and two deploys
//! would run at once.
//!
//! So a lock never outlives a dead `luma` by more than [`CREATED_GRACE_S`] (died before its
//! holder started) or, if the engine lost the attach connection, [`STALE_AFTER_S`].
//!
//! The labels record who holds it (user, host, pid, command, since) for the error another taker
//! sees and for `luma status` ([`holder`]).

use crate::engine::{ContainerSpec, Engine, StdinHold};
use crate::names;
use bollard::models::ContainerInspectResponse;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A lock taken longer ago than this is taken over even if its holder looks alive: the last
/// resort for an engine that lost the attach connection but kept the holder running (a dead
/// `luma` is otherwise noticed at once). Long enough for a slow build: a `luma` whose deploy
/// runs longer than this can lose its lock.
pub const STALE_AFTER_S: u64 = 60 * 60;
/// A lock still `created` (never started) this long after it was taken is abandoned: its taker
/// died between creating and starting it.
pub const CREATED_GRACE_S: u64 = 30;
/// The proxy image's subcommand that holds a lock: reads stdin until EOF.
pub const HOLD_COMMAND: &str = "hold-lock";

pub const LABEL_PID: &str = "luma.lock.pid";
pub const LABEL_HOST: &str = "luma.lock.host";
pub const LABEL_SINCE: &str = "luma.lock.since";
pub const LABEL_USER: &str = "luma.lock.user";
pub const LABEL_COMMAND: &str = "luma.lock.command";

/// A held deploy lock. Release it with [`Lock::release`]; dropping it also frees it (the attach
/// connection closes, the holder exits and the daemon removes its container), just not
/// synchronously.
pub struct Lock {
    name: String,
    id: String,
    took_over: Option<LockHolder>,
    hold: Option<StdinHold>,
}

/// Who holds a project's lock, as recorded on the lock container.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LockHolder {
    /// The lock container's ID.
    pub id: String,
    pub user: String,
    pub host: String,
    pub pid: Option<u32>,
    /// The `luma` command line that took it, e.g. `deploy web`.
    pub command: String,
    /// Unix seconds when it was taken (0 when unknown).
    pub since_secs: u64,
    pub age_secs: u64,
    /// The container's state: `running` for a live holder.
    pub state: String,
    /// Why the lock is stale (the next taker removes it), or `None` when it is live.
    pub stale: Option<String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `45s`, `3m05s`, `2h07m`.
fn human(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Why a lock in `state`, taken at `since` (unix seconds), is stale at `now`; `None` if live.
fn stale_reason(state: &str, since: Option<u64>, now: u64) -> Option<String> {
    let age = since.map(|s| now.saturating_sub(s));
    match state {
        "exited" | "dead" | "removing" => Some(format!("its holder is gone (container {state})")),
        "created" if age.is_none_or(|a| a > CREATED_GRACE_S) => Some(format!(
            "its holder was never started (taken {} ago, {CREATED_GRACE_S}s allowed)",
            age.map(human).unwrap_or_else(|| "unknown time".into())
        )),
        _ if age.is_none_or(|a| a > STALE_AFTER_S) => Some(format!(
            "it was taken {} ago, more than the {} limit",
            age.map(human).unwrap_or_else(|| "an unknown time".into()),
            human(STALE_AFTER_S)
        )),
        _ => None,
    }
}

fn labels_of(c: &ContainerInspectResponse) -> HashMap<String, String> {
    c.config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default()
}

fn state_of(c: &ContainerInspectResponse) -> String {
    c.state
        .as_ref()
        .and_then(|s| s.status)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

impl LockHolder {
    fn from_inspect(c: &ContainerInspectResponse, now: u64) -> LockHolder {
        let labels = labels_of(c);
        let get = |k: &str| labels.get(k).cloned().unwrap_or_else(|| "?".into());
        let since = labels.get(LABEL_SINCE).and_then(|s| s.parse::<u64>().ok());
        let state = state_of(c);
        LockHolder {
            id: c.id.clone().unwrap_or_default(),
            user: get(LABEL_USER),
            host: get(LABEL_HOST),
            pid: labels.get(LABEL_PID).and_then(|p| p.parse().ok()),
            command: get(LABEL_COMMAND),
            since_secs: since.unwrap_or(0),
            age_secs: since.map(|s| now.saturating_sub(s)).unwrap_or(0),
            stale: stale_reason(&state, since, now),
            state,
        }
    }

    /// `` `luma deploy web` of alice on build-1 (pid 4242), for 3m05s ``
    pub fn describe(&self) -> String {
        format!(
            "`luma {}` of {} on {} (pid {}), for {}",
            self.command,
            self.user,
            self.host,
            self.pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into()),
            human(self.age_secs)
        )
    }
}

/// Who holds `project`'s lock, if anyone (for `luma status`). A stale holder is reported too,
/// with [`LockHolder::stale`] saying why.
pub async fn holder(engine: &Engine, project: &str) -> Result<Option<LockHolder>, String> {
    let name = names::lock_container(project);
    Ok(engine
        .inspect(&name)
        .await?
        .map(|c| LockHolder::from_inspect(&c, now())))
}

/// This process's command line without the program name, for the lock's label.
fn invocation() -> String {
    let mut s = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "?".into())
}

fn user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "?".into())
}

impl Lock {
    /// Takes `project`'s lock, recording this process's command line as the holder's command.
    /// Prefer [`Lock::acquire_for`], which names the command.
    pub async fn acquire(engine: &Engine, project: &str, image: &str) -> Result<Lock, String> {
        Self::acquire_for(engine, project, image, &invocation()).await
    }

    /// Takes `project`'s lock for `command` (e.g. `deploy web`, shown to whoever else tries),
    /// taking over a stale lock; fails at once, naming the holder, when it is held.
    pub async fn acquire_for(
        engine: &Engine,
        project: &str,
        image: &str,
        command: &str,
    ) -> Result<Lock, String> {
        Self::acquire_labelled(engine, project, image, command, &[]).await
    }

    /// [`Lock::acquire_for`] with extra labels on the lock container (tests mark theirs).
    pub async fn acquire_labelled(
        engine: &Engine,
        project: &str,
        image: &str,
        command: &str,
        extra_labels: &[(&str, &str)],
    ) -> Result<Lock, String> {
        let name = names::lock_container(project);
        let mut labels: HashMap<String, String> = extra_labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.extend([
            (names::LABEL_ROLE.to_string(), names::ROLE_LOCK.to_string()),
            (names::LABEL_PROJECT.to_string(), project.to_string()),
            (LABEL_PID.to_string(), std::process::id().to_string()),
            (LABEL_HOST.to_string(), hostname()),
            (LABEL_USER.to_string(), user()),
            (LABEL_COMMAND.to_string(), command.to_string()),
            (LABEL_SINCE.to_string(), now().to_string()),
        ]);
        let spec = ContainerSpec {
            name: name.clone(),
            image: image.to_string(),
            cmd: Some(vec![HOLD_COMMAND.into()]),
            labels,
            ..Default::default()
        };
        let mut took_over = None;
        let mut removed = 0;
        let mut pause = Duration::from_millis(10);
        let give_up = Instant::now() + Duration::from_secs(15);
        // Each round takes the lock, fails on a live holder, or removes one stale lock; rounds
        // only run out when others keep taking and releasing it meanwhile.
        loop {
            if let Some(id) = engine.create_stdin_bound(&spec).await? {
                return Self::hold(engine, name, id, image, took_over).await;
            }
            let Some(c) = engine.inspect(&name).await? else {
                // The name is taken but no container answers to it: Docker reserves the name
                // before it registers a new container (another taker's create is under way),
                // and frees it just after one is gone. Nothing to wait on by ID yet: retry
                // shortly, then the new holder is visible (or the name is free).
                if Instant::now() > give_up {
                    return Err(format!(
                        "could not take the lock {name}: the engine keeps reporting the name as \
                         taken without a container by that name; try again"
                    ));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
                continue;
            };
            let labels = labels_of(&c);
            if labels.get(names::LABEL_ROLE).map(String::as_str) != Some(names::ROLE_LOCK) {
                return Err(format!(
                    "container {name} exists but is not a Luma lock (no {}={} label); rename or remove it",
                    names::LABEL_ROLE,
                    names::ROLE_LOCK
                ));
            }
            let h = LockHolder::from_inspect(&c, now());
            if h.stale.is_none() {
                return Err(format!(
                    "project {project:?} is locked by {}. Wait for it to finish: the lock ends by \
                     itself as soon as that luma exits or is killed. Only if that host lost its \
                     connection to the engine does the lock stay, until {} after it was taken; \
                     if you are sure that luma is gone, `docker rm -f {name}` frees it now",
                    h.describe(),
                    human(STALE_AFTER_S)
                ));
            }
            if h.id.is_empty() {
                return Err(format!(
                    "inspect {name}: the engine returned no container ID"
                ));
            }
            // By ID: if another taker already replaced it, its new lock has another ID and
            // survives this; our create below then fails on the name, as it must.
            engine.remove_id(&h.id).await?;
            took_over = Some(h);
            removed += 1;
            if removed > 5 {
                return Err(format!(
                    "could not take the lock {name}: it changed hands repeatedly while trying; \
                     try again"
                ));
            }
        }
    }

    /// Attaches to the new lock container's stdin, then starts it.
    async fn hold(
        engine: &Engine,
        name: String,
        id: String,
        image: &str,
        took_over: Option<LockHolder>,
    ) -> Result<Lock, String> {
        let hold = match engine.attach_stdin(&id).await {
            Ok(h) => h,
            Err(e) => {
                let _ = engine.remove_id(&id).await;
                return Err(e);
            }
        };
        let lock = Lock {
            name,
            id,
            took_over,
            hold: Some(hold),
        };
        if let Err(e) = engine.start(&lock.id).await {
            lock.release(engine).await;
            return Err(e);
        }
        match engine.inspect(&lock.id).await {
            Ok(Some(c)) if state_of(&c) == "running" => Ok(lock),
            Ok(c) => {
                let state = c.as_ref().map(state_of);
                lock.release(engine).await;
                Err(format!(
                    "the lock holder stopped at once ({}): the image {image} probably lacks \
                     `luma-proxy {HOLD_COMMAND}` (built from an older luma-proxy); rebuild it from \
                     the current luma-proxy (docker/build-images.sh), or remove it so `luma setup` \
                     builds it",
                    state.unwrap_or_else(|| "already removed".into())
                ))
            }
            Err(e) => {
                lock.release(engine).await;
                Err(e)
            }
        }
    }

    /// Checks the lock is still this process's: its container (by ID) still runs. Called
    /// right before a switch, so a lock lost mid-deploy (its attach connection dropped, or a
    /// last-resort takeover) stops the release while it can still be undone.
    pub async fn verify(&self, engine: &Engine) -> Result<(), String> {
        let running = engine
            .inspect(&self.id)
            .await?
            .and_then(|c| c.state?.running)
            .unwrap_or(false);
        if running {
            Ok(())
        } else {
            Err(format!(
                "the deploy lock {} is no longer held by this luma (its connection to the engine dropped, or it was taken over); stopping before the switch",
                self.name
            ))
        }
    }

    /// The lock container's ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lock container's name, `luma-lock_<project>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stale lock this one replaced, if any (worth telling the user).
    pub fn took_over(&self) -> Option<&LockHolder> {
        self.took_over.as_ref()
    }

    /// Frees the lock: removes its container by ID (the name may be someone else's by now),
    /// then closes the attach connection. Quick, and quiet when the container is already gone;
    /// if the engine cannot be reached, closing the connection still frees it.
    pub async fn release(mut self, engine: &Engine) {
        let _ = engine.remove_id(&self.id).await;
        self.hold.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_lock_is_live_until_the_last_resort_limit() {
        assert_eq!(stale_reason("running", Some(1000), 1000 + 60), None);
        assert_eq!(
            stale_reason("paused", Some(1000), 1000 + STALE_AFTER_S),
            None
        );
        assert!(stale_reason("running", Some(1000), 1001 + STALE_AFTER_S).is_some());
        assert!(stale_reason("running", None, 1000).is_some());
    }

    #[test]
    fn a_gone_holder_is_stale_at_once() {
        for s in ["exited", "dead", "removing"] {
            assert!(stale_reason(s, Some(1000), 1000).is_some(), "{s}");
        }
    }

    #[test]
    fn a_never_started_lock_gets_a_short_grace() {
        assert_eq!(
            stale_reason("created", Some(1000), 1000 + CREATED_GRACE_S),
            None
        );
        assert!(stale_reason("created", Some(1000), 1001 + CREATED_GRACE_S).is_some());
        assert!(stale_reason("created", None, 1000).is_some());
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(human(45), "45s");
        assert_eq!(human(185), "3m05s");
        assert_eq!(human(7620), "2h07m");
    }
}
