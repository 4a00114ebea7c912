//! Ctrl-C and SIGTERM, and the fault-injection points the tests use.
//!
//! A signal never kills `luma` mid-release. It is recorded, and each phase decides what it
//! means: before the switch, the running step stops and what this release created is undone
//! (then the lock is released); during the switch call, its answer is awaited (it decides
//! between undoing and settling); after the switch, settling finishes first, because the new
//! release is already live. Only commands that change the engine listen for signals
//! ([`install`]); `logs -f` and `status` keep the default (exit at once).
//!
//! Failpoints (`LUMA_FAILPOINTS=name=action[,name=action]`) let tests fault a named step
//! deterministically: `error` makes it fail as if the engine refused it; `pause` prints
//! `failpoint NAME: paused` on stderr and waits for a signal, so a test can synchronize on that
//! line and then send SIGINT or SIGKILL at exactly that point; `wait:PATH` goes on once PATH
//! exists. `name@server` faults the step on that server only (a deploy to several servers runs
//! each step on every server). Unset, they cost one env lookup.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use tokio::sync::watch;

static SIGNALLED: OnceLock<watch::Receiver<u32>> = OnceLock::new();
/// Which side of the point of no return a release is on, so a signal says what it will do.
static PHASE: AtomicU8 = AtomicU8::new(PREPARE);
const PREPARE: u8 = 0;
const SWITCH: u8 = 1;
const SETTLE: u8 = 2;
const REMOVE: u8 = 3;

/// Marks commands that remove or settle (remove, prune): a signal stops them between steps.
pub fn removing() {
    PHASE.store(REMOVE, Ordering::SeqCst);
}

/// Marks the proxy switch call (its outcome decides between undoing and settling).
pub fn switching(on: bool) {
    PHASE.store(if on { SWITCH } else { PREPARE }, Ordering::SeqCst);
}

/// Marks the span between a switch and the end of its settling.
pub fn settling(on: bool) {
    PHASE.store(if on { SETTLE } else { PREPARE }, Ordering::SeqCst);
}

/// Marks the span where servers of a release are undone or put back after another server
/// could not switch: it runs to its end whatever signal arrives. Kept apart from the phase,
/// which each server's own switch and settle set and reset.
pub fn putting_back(on: bool) {
    PUTTING_BACK.store(on, Ordering::SeqCst);
}
static PUTTING_BACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a switch has happened in this run and its settling has not ended, or servers are
/// being put back: from here a signal waits (on several servers, the remaining servers still
/// switch, or are put back).
pub fn past_no_return() -> bool {
    PUTTING_BACK.load(Ordering::SeqCst) || matches!(PHASE.load(Ordering::SeqCst), SWITCH | SETTLE)
}

/// What an interrupted step returns.
pub const INTERRUPTED: &str = "interrupted by a signal";

/// Starts listening for SIGINT and SIGTERM (once per process). The handlers are registered
/// before this returns, so no signal in between kills the process the default way. A second
/// signal exits at once: the lock frees itself, and `luma prune` settles what is left.
pub fn install() {
    use tokio::signal::unix::{signal, SignalKind};
    if SIGNALLED.get().is_some() {
        return;
    }
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let (tx, rx) = watch::channel(0u32);
    let _ = SIGNALLED.set(rx);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let n = *tx.borrow() + 1;
            if n > 1 {
                eprintln!("\nsecond signal: exiting now; `luma status` shows what is live and `luma prune` settles the rest");
                std::process::exit(130);
            }
            eprintln!(
                "\n{} (a second signal exits at once)",
                match PHASE.load(Ordering::SeqCst) {
                    SETTLE => "signal received: the new release is already live; finishing settling first",
                    SWITCH => "signal received: waiting for the proxy's answer to the switch, then undoing or settling",
                    REMOVE => "signal received: stopping after the current step",
                    _ => "signal received: stopping and undoing what this release created",
                }
            );
            let _ = tx.send(n);
        }
    });
}

/// True once a signal arrived.
pub fn requested() -> bool {
    SIGNALLED.get().is_some_and(|rx| *rx.borrow() > 0)
}

/// Resolves when a signal arrives (never, if signals are not being listened for).
pub async fn wait() {
    match SIGNALLED.get() {
        Some(rx) => {
            let mut rx = rx.clone();
            let _ = rx.wait_for(|n| *n > 0).await;
        }
        None => std::future::pending().await,
    }
}

/// Runs a reversible step unless a signal arrives first (or has already arrived). Past the
/// point of no return (putting a server back after another could not switch) the step always
/// runs to its end.
pub async fn unless_interrupted<T>(
    work: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    if past_no_return() {
        return work.await;
    }
    if requested() {
        return Err(INTERRUPTED.into());
    }
    tokio::select! {
        r = work => r,
        _ = wait() => Err(INTERRUPTED.into()),
    }
}

/// A named fault-injection point (see the module docs).
pub async fn failpoint(name: &str) -> Result<(), String> {
    failpoint_on(name, None).await
}

/// A named fault-injection point of a step on `server` (`name@server` or `name` match).
pub async fn failpoint_on(name: &str, server: Option<&str>) -> Result<(), String> {
    let Ok(spec) = std::env::var("LUMA_FAILPOINTS") else {
        return Ok(());
    };
    let on_server = server.map(|s| format!("{name}@{s}"));
    // The point as it was named (`name@server` or `name`), for the lines a test waits for.
    let Some((name, action)) = spec
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == name || Some(k.trim()) == on_server.as_deref())
        .map(|(k, v)| (k.trim().to_string(), Some(v.trim().to_string())))
    else {
        return Ok(());
    };
    match action.as_deref() {
        Some("error") => Err(format!("failpoint {name}: injected failure")),
        Some("pause") => {
            eprintln!("failpoint {name}: paused (pid {})", std::process::id());
            wait().await;
            Ok(())
        }
        Some(a) if a.starts_with("wait:") => {
            // Lets a test set the scene (e.g. a request in flight) before the next step.
            let path = std::path::Path::new(&a["wait:".len()..]);
            eprintln!("failpoint {name}: waiting for {}", path.display());
            while !path.exists() && !requested() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
