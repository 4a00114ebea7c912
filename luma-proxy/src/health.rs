//! Health checks: every backend is probed on its own, inside its own project's network, with
//! its route's settings.
//!
//! Active checks run on an interval for every backend, including a route's only one, so a
//! route whose single replica recovers comes back by itself. Passive checks happen on the
//! request path: a failed connect marks the backend down at once (see `proxy`). Either way, a
//! backend that goes down asks its route to re-resolve now (`Backend::report_failure`): its
//! container may be gone or have a new address (see `service`).
//! [`gate`] is the deploy-time check: every backend must pass before a route may switch.

use crate::backend::Backend;
use crate::route::HealthSettings;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use luma_api::BackendReport;

/// One backend's health as the admin API reports it.
pub fn report(b: &Backend) -> BackendReport {
    BackendReport {
        addr: b.addr.to_string(),
        healthy: b.is_healthy(),
        error: b.last_error(),
        inflight: b.inflight(),
        requests: b.requests(),
    }
}

/// Probes every backend once, concurrently, and records the results.
pub async fn check_round(backends: &[Arc<Backend>], settings: &HealthSettings, host: &str) {
    let mut set = JoinSet::new();
    for b in backends {
        let (b, s, host) = (b.clone(), settings.clone(), host.to_string());
        set.spawn(async move {
            let result = b.check(&s.path, &host, s.timeout()).await;
            let failed = result.as_ref().err().cloned();
            if b.record_check(result, s.healthy_threshold, s.unhealthy_threshold) {
                let up = b.is_healthy();
                crate::log::info(
                    if up { "backend up" } else { "backend down" },
                    serde_json::json!({"backend": b.addr.to_string(), "error": failed}),
                );
                if !up {
                    b.report_failure();
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// The deploy gate: waits until every backend has passed `healthy_threshold` consecutive
/// probes, or the deadline passes. Returns a report per backend; all healthy means pass.
pub async fn gate(
    backends: &[Arc<Backend>],
    settings: &HealthSettings,
    host: &str,
    timeout: Duration,
) -> Vec<BackendReport> {
    let deadline = Instant::now() + timeout;
    let retry_every = settings.interval().min(Duration::from_millis(250));
    let mut set = JoinSet::new();
    for (i, b) in backends.iter().enumerate() {
        let (b, s, host) = (b.clone(), settings.clone(), host.to_string());
        set.spawn(async move {
            let mut ok = 0;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let result = b
                    .probe(
                        &s.path,
                        &host,
                        s.timeout().min(left.max(Duration::from_millis(10))),
                    )
                    .await;
                match result {
                    Ok(()) => {
                        ok += 1;
                        b.record_check(Ok(()), 1, 1);
                        if ok >= s.healthy_threshold {
                            return (i, report(&b));
                        }
                    }
                    Err(e) => {
                        ok = 0;
                        b.record_check(Err(e), 1, 1);
                    }
                }
                if Instant::now() + retry_every >= deadline {
                    let mut r = report(&b);
                    r.healthy = false;
                    if r.error.is_none() {
                        r.error = Some(format!("not healthy within {timeout:?}"));
                    }
                    return (i, r);
                }
                tokio::time::sleep(retry_every).await;
            }
        });
    }
    let mut reports: Vec<Option<BackendReport>> = vec![None; backends.len()];
    while let Some(joined) = set.join_next().await {
        if let Ok((i, r)) = joined {
            reports[i] = Some(r);
        }
    }
    reports
        .into_iter()
        .zip(backends)
        .map(|(r, b)| {
            r.unwrap_or_else(|| BackendReport {
                error: Some("health check task failed".into()),
                healthy: false,
                ..report(b)
            })
        })
        .collect()
}
