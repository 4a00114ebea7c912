//! The deploy lock (`luma_cli::lock`) against the real Docker engine: of concurrent takers exactly
//! one wins; a holder killed with SIGKILL frees its lock by itself; a stale lock is taken over by
//! container ID, so racing takers still get exactly one winner whose lock survives the losers.
//!
//! Every lock container here belongs to a project named after its test
//! (`lumait-lock-…-<pid>-…`) and carries `luma.test=1`; the guard removes them even when a test
//! fails.

use luma_cli::engine::{Engine, Transport};
use luma_cli::lock::{self, Lock};
use luma_integration_tests::*;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TEST_LABELS: &[(&str, &str)] = &[("luma.test", "1")];
/// Set for the re-executed test binary that plays the lock holder in the SIGKILL test.
const CHILD_ENV: &str = "LUMA_LOCK_TEST_HOLDER_PROJECT";
const LIMIT: Duration = Duration::from_secs(60);

/// A project unique to one test; its lock containers are removed when dropped.
struct LockLab {
    project: String,
}

impl LockLab {
    fn new(tag: &str) -> LockLab {
        // Lab checks the engine and the images, and makes the unique prefix.
        let project = Lab::new(tag).prefix.clone();
        LockLab { project }
    }

    fn lock_name(&self) -> String {
        luma_cli::names::lock_container(&self.project)
    }
}

impl Drop for LockLab {
    fn drop(&mut self) {
        let project = format!("label=luma.project={}", self.project);
        if let Ok(ids) = docker(&[
            "ps",
            "-aq",
            "--filter",
            "label=luma.test=1",
            "--filter",
            &project,
        ]) {
            for id in ids.lines() {
                let _ = docker(&["rm", "-f", "-v", id]);
            }
        }
    }
}

async fn engine() -> Engine {
    Engine::connect(Transport::Local, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {LIMIT:?}"))
}

async fn take(e: &Engine, project: &str, command: &str) -> Result<Lock, String> {
    within(
        "acquire",
        Lock::acquire_labelled(e, project, &proxy_image(), command, TEST_LABELS),
    )
    .await
}

/// `n` takers, each on its own engine connection, try at the same moment (`race <i>`).
async fn race(project: &str, n: usize) -> (Vec<Lock>, Vec<String>) {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, project) = (barrier.clone(), project.to_string());
            tokio::spawn(async move {
                let e = engine().await;
                barrier.wait().await;
                take(&e, &project, &format!("race {i}")).await
            })
        })
        .collect();
    let (mut won, mut lost) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await.expect("taker task") {
            Ok(l) => won.push(l),
            Err(e) => lost.push(e),
        }
    }
    (won, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takers_get_exactly_one_winner_and_release_frees_the_lock() {
    let lab = LockLab::new("lock-race");
    let e = engine().await;
    let (mut won, lost) = race(&lab.project, 6).await;
    assert_eq!(won.len(), 1, "exactly one taker wins; errors: {lost:#?}");
    let winner = won.pop().unwrap();

    // `luma status` can tell who holds it.
    let h = lock::holder(&e, &lab.project)
        .await
        .unwrap()
        .expect("a holder");
    assert_eq!(h.id, winner.id());
    assert_eq!(h.state, "running");
    assert_eq!(h.pid, Some(std::process::id()));
    assert!(h.command.starts_with("race "), "{h:?}");
    assert_eq!(h.stale, None);
    // Every loser is told who holds it.
    let named = format!("is locked by `luma {}` of {}", h.command, h.user);
    for err in &lost {
        assert!(err.contains(&named), "{err}");
    }

    within("release", winner.release(&e)).await;
    assert_eq!(
        lock::holder(&e, &lab.project).await.unwrap(),
        None,
        "release returns once the lock container is gone"
    );
    let again = take(&e, &lab.project, "after release")
        .await
        .expect("a released lock can be taken");
    assert_eq!(again.took_over(), None, "nothing stale was left behind");

    // Release is quiet and quick when the container is already gone.
    docker(&["rm", "-f", "-v", again.id()]).unwrap();
    within("release of a removed lock", again.release(&e)).await;
    assert_eq!(lock::holder(&e, &lab.project).await.unwrap(), None);
}

/// The holder in [`a_holder_killed_with_sigkill_frees_the_lock_by_itself`]: this test binary run
/// again with [`CHILD_ENV`] set. It takes the lock, prints `LOCKED <id>`, and blocks until killed.
#[test]
#[ignore = "the lock holder process of a_holder_killed_with_sigkill_frees_the_lock_by_itself"]
fn lock_holder_child() {
    let Ok(project) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = engine().await;
        let lock = take(&e, &project, "sigkill test holder")
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let mut out = std::io::stdout();
        writeln!(out, "LOCKED {}", lock.id()).unwrap();
        out.flush().unwrap();
        std::future::pending::<()>().await;
        drop(lock);
    });
}

/// Kills the child when dropped (a failing test leaves no holder behind).
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_holder_killed_with_sigkill_frees_the_lock_by_itself() {
    use std::os::unix::process::ExitStatusExt;
    let lab = LockLab::new("lock-kill");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt.block_on(engine());

    let mut holder = Holder(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "lock_holder_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &lab.project)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the holder"),
    );
    // The event: the holder prints its lock's ID once `acquire` returned, i.e. once the lock
    // container is started. If it fails instead, its stdout closes and the reader reports what
    // it printed. (libtest prints `test lock_holder_child ... ` on the same line first.)
    let stdout = holder.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, id)) = l.split_once("LOCKED ") {
                let _ = tx.send(Ok(id.trim().to_string()));
                return;
            }
            seen.push(l);
        }
        let _ = tx.send(Err(seen));
    });
    let id = match rx.recv_timeout(LIMIT) {
        Ok(Ok(id)) => id,
        Ok(Err(seen)) => panic!("the holder never took the lock; its output: {seen:#?}"),
        Err(e) => panic!("no word from the holder within {LIMIT:?}: {e}"),
    };

    let h = rt
        .block_on(lock::holder(&e, &lab.project))
        .unwrap()
        .expect("a holder");
    assert_eq!((h.id.as_str(), h.state.as_str()), (id.as_str(), "running"));
    assert_eq!(h.pid, Some(holder.0.id()));
    assert_eq!(h.command, "sigkill test holder");
    let err = rt
        .block_on(take(&e, &lab.project, "second"))
        .err()
        .expect("a live holder in another process keeps the lock");
    assert!(
        err.contains(&format!("(pid {})", holder.0.id())),
        "the error names the holder's pid: {err}"
    );

    holder.0.kill().unwrap(); // SIGKILL: no destructor, no release.
    let status = holder.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let killed = Instant::now();
    // The engine's own wait (condition=removed): the daemon closes the holder's stdin, it exits
    // and AutoRemove deletes the container, with nobody calling release.
    rt.block_on(within(
        "the removal of the dead holder's lock",
        e.wait_removed(&id),
    ))
    .unwrap();
    eprintln!(
        "lock container removed {:?} after its holder was killed",
        killed.elapsed()
    );
    assert!(rt.block_on(e.inspect(&lab.lock_name())).unwrap().is_none());

    let next = rt
        .block_on(take(&e, &lab.project, "after the kill"))
        .expect("the lock of a killed holder is free");
    assert_ne!(next.id(), id);
    assert_eq!(
        next.took_over(),
        None,
        "freed by the engine, not taken over"
    );
    rt.block_on(next.release(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_lock_is_taken_over_by_id_by_exactly_one_of_racing_takers() {
    let lab = LockLab::new("lock-stale");
    let e = engine().await;
    // A taker that died between create and start, two hours ago.
    let labels = [
        "luma.test=1".to_string(),
        format!(
            "{}={}",
            luma_cli::names::LABEL_ROLE,
            luma_cli::names::ROLE_LOCK
        ),
        format!("{}={}", luma_cli::names::LABEL_PROJECT, lab.project),
        format!("{}={}", lock::LABEL_SINCE, now() - 7200),
        format!("{}=ghost", lock::LABEL_USER),
        format!("{}=1", lock::LABEL_PID),
        format!("{}=deploy (died before start)", lock::LABEL_COMMAND),
    ];
    let name = lab.lock_name();
    let image = proxy_image();
    let mut args = vec!["create", "--name", name.as_str()];
    for l in &labels {
        args.extend(["--label", l.as_str()]);
    }
    args.extend([image.as_str(), lock::HOLD_COMMAND]);
    let stale_id = docker(&args).unwrap_or_else(|e| panic!("{e}"));
    let h = lock::holder(&e, &lab.project).await.unwrap().unwrap();
    assert_eq!(
        (h.id.as_str(), h.state.as_str()),
        (stale_id.as_str(), "created")
    );
    assert!(h.stale.is_some(), "{h:?}");

    let (mut won, lost) = race(&lab.project, 6).await;
    assert_eq!(won.len(), 1, "exactly one taker wins; errors: {lost:#?}");
    let winner = won.pop().unwrap();
    for err in &lost {
        assert!(err.contains("is locked by `luma race "), "{err}");
    }
    assert_eq!(
        winner.took_over().map(|h| h.id.as_str()),
        Some(stale_id.as_str())
    );
    assert!(e.inspect(&stale_id).await.unwrap().is_none());
    // Every loser has finished: the winner's lock is still the one in place.
    let c = e
        .inspect(&name)
        .await
        .unwrap()
        .expect("the winner's lock survives the losers");
    assert_eq!(c.id.as_deref(), Some(winner.id()));
    let h = lock::holder(&e, &lab.project).await.unwrap().unwrap();
    assert_eq!((h.state.as_str(), h.stale.as_deref()), ("running", None));
    winner.release(&e).await;
}
