//! Telling a proxy that is still starting from one that has exited: the decision
//! [`crate::proxyctl::wait_ready`] makes after each admin call the proxy did not answer.
//!
//! Docker restarts a proxy that exits (restart policy unless-stopped), so an exit may show only
//! as the state `restarting`, or as a restart count that rose between two looks. Kept free of
//! I/O so every case is unit-tested without an engine.

use bollard::models::ContainerInspectResponse;

/// What the container looked like when the wait began.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Baseline {
    /// Its restart count; `None` when it could not be inspected (then the count is not used).
    pub restarts: Option<i64>,
    /// Docker was already restarting it: a crash loop found, or a single crash caught in its
    /// back-off. Only a further restart then counts as an exit; one crash may be all there is.
    pub restarting: bool,
}

impl Baseline {
    /// Nothing known: any sign of an exit in the state counts (not a rise in the count).
    pub const UNKNOWN: Baseline = Baseline {
        restarts: None,
        restarting: false,
    };

    pub fn of(c: Option<&ContainerInspectResponse>) -> Baseline {
        let seen = c.map(Seen::of).unwrap_or_default();
        Baseline {
            restarts: seen.restarts,
            restarting: seen.restarting,
        }
    }
}

/// The parts of `docker inspect` the decision reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Seen {
    /// Docker's `Running`, which stays true while it is `Restarting`.
    pub running: bool,
    pub restarting: bool,
    pub restarts: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
}

impl Seen {
    pub fn of(c: &ContainerInspectResponse) -> Seen {
        let state = c.state.as_ref();
        Seen {
            running: state.and_then(|s| s.running).unwrap_or(false),
            restarting: state.and_then(|s| s.restarting).unwrap_or(false),
            restarts: c.restart_count,
            exit_code: state.and_then(|s| s.exit_code),
            error: state
                .and_then(|s| s.error.clone())
                .filter(|e| !e.is_empty()),
        }
    }
}

/// `Some(how it ended)` when the proxy's process has ended since `base`; `None` while it may
/// still come up (the caller's deadline covers a proxy that runs but never answers).
pub fn exit(base: Baseline, now: &Seen) -> Option<String> {
    let rose = matches!((base.restarts, now.restarts), (Some(b), Some(n)) if n > b);
    let restarting_anew = now.restarting && !base.restarting;
    if now.running && !restarting_anew && !rose {
        return None;
    }
    let mut how = if now.running && !now.restarting {
        // Up again: Docker cleared the exit code when it restarted it.
        "it exited and Docker restarted it".to_string()
    } else {
        match now.exit_code {
            Some(code) => format!("exit code {code}"),
            None => "no exit code".to_string(),
        }
    };
    if let Some(err) = &now.error {
        how.push_str(&format!("; Docker: {err}"));
    }
    if now.restarting {
        how.push_str("; Docker is restarting it");
    }
    Some(how)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(restarts: Option<i64>, restarting: bool) -> Baseline {
        Baseline {
            restarts,
            restarting,
        }
    }

    fn seen(running: bool, restarting: bool, restarts: i64, exit_code: i64) -> Seen {
        Seen {
            running,
            restarting,
            restarts: Some(restarts),
            exit_code: Some(exit_code),
            error: None,
        }
    }

    #[test]
    fn a_proxy_that_runs_is_waited_for() {
        assert_eq!(exit(base(Some(0), false), &seen(true, false, 0, 0)), None);
        // An exit code left from an earlier stop does not count while it runs.
        assert_eq!(exit(base(Some(0), false), &seen(true, false, 0, 137)), None);
    }

    #[test]
    fn an_exit_shows_as_stopped_restarting_or_a_higher_count() {
        let b = base(Some(0), false);
        assert_eq!(
            exit(b, &seen(false, false, 0, 2)).as_deref(),
            Some("exit code 2")
        );
        assert_eq!(
            exit(b, &seen(true, true, 1, 2)).as_deref(),
            Some("exit code 2; Docker is restarting it")
        );
        // Restarted between two looks: the code Docker shows now is the new run's.
        assert_eq!(
            exit(b, &seen(true, false, 1, 0)).as_deref(),
            Some("it exited and Docker restarted it")
        );
        let mut failed = seen(false, false, 0, 128);
        failed.error = Some("exec format error".into());
        assert_eq!(
            exit(b, &failed).as_deref(),
            Some("exit code 128; Docker: exec format error")
        );
    }

    #[test]
    fn a_proxy_found_restarting_gets_its_back_off() {
        let b = base(Some(3), true);
        assert_eq!(exit(b, &seen(true, true, 3, 2)), None);
        assert_eq!(exit(b, &seen(true, false, 3, 0)), None);
        assert_eq!(
            exit(b, &seen(true, true, 4, 2)).as_deref(),
            Some("exit code 2; Docker is restarting it")
        );
    }

    #[test]
    fn with_nothing_known_the_state_alone_decides() {
        // At the deadline: a crash loop in a long back-off still shows how its last run ended.
        assert_eq!(
            exit(Baseline::UNKNOWN, &seen(true, true, 9, 2)).as_deref(),
            Some("exit code 2; Docker is restarting it")
        );
        assert_eq!(exit(Baseline::UNKNOWN, &seen(true, false, 9, 0)), None);
    }

    #[test]
    fn an_unknown_count_is_not_compared() {
        assert_eq!(exit(base(None, false), &seen(true, false, 5, 0)), None);
        assert!(exit(base(None, false), &seen(false, false, 5, 1)).is_some());
    }
}
