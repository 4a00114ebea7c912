//! Process-wide counters, rendered in the Prometheus text format by the admin endpoint.

use hyper::StatusCode;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    by_class: [AtomicU64; 5],
    not_found: AtomicU64,
    bad_gateway: AtomicU64,
    unavailable: AtomicU64,
    timeout: AtomicU64,
    connect_errors: AtomicU64,
    retries: AtomicU64,
    pub connections_open: AtomicU64,
    connections_total: AtomicU64,
    connections_refused: AtomicU64,
}

impl Metrics {
    pub fn count_response(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Relaxed);
        match status {
            StatusCode::NOT_FOUND => &self.not_found,
            StatusCode::BAD_GATEWAY => &self.bad_gateway,
            StatusCode::SERVICE_UNAVAILABLE => &self.unavailable,
            StatusCode::GATEWAY_TIMEOUT => &self.timeout,
            _ => return,
        }
        .fetch_add(1, Relaxed);
    }
    pub fn count_connect_error(&self) {
        self.connect_errors.fetch_add(1, Relaxed);
    }
    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }
    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Relaxed);
    }
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Relaxed);
    }

    pub fn requests_total(&self) -> u64 {
        self.by_class.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Prometheus text exposition of the global counters.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# TYPE luma_proxy_responses_total counter");
        for (i, c) in self.by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "luma_proxy_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                c.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE luma_proxy_local_errors_total counter");
        for (code, c) in [
            (404, &self.not_found),
            (502, &self.bad_gateway),
            (503, &self.unavailable),
            (504, &self.timeout),
        ] {
            let _ = writeln!(
                out,
                "luma_proxy_local_errors_total{{code=\"{code}\"}} {}",
                c.load(Relaxed)
            );
        }
        for (name, kind, c) in [
            (
                "luma_proxy_upstream_connect_errors_total",
                "counter",
                &self.connect_errors,
            ),
            (
                "luma_proxy_upstream_retries_total",
                "counter",
                &self.retries,
            ),
            (
                "luma_proxy_connections_open",
                "gauge",
                &self.connections_open,
            ),
            (
                "luma_proxy_connections_total",
                "counter",
                &self.connections_total,
            ),
            (
                "luma_proxy_connections_refused_total",
                "counter",
                &self.connections_refused,
            ),
        ] {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {}", c.load(Relaxed));
        }
    }
}
