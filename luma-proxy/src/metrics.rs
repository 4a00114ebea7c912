//! Process-wide metrics in one `prometheus-client` registry, exposed in the OpenMetrics text
//! format by the metrics listener (see `server`) and the admin API's `GET /metrics`.
//!
//! The request path only increments atomics: every counter it touches (including the labelled
//! ones, created once here) is a `Counter` clone whose `inc` is one relaxed `fetch_add`. No
//! lookup, lock or allocation per request. Per-backend series are read from the route table
//! when scraped, by a collector.
//!
//! Label values (route names and the operator's `--metrics-label` values, which may hold
//! anything) are escaped by `prometheus-client` itself (`\` `"` and line feed as `\\` `\"`
//! `\n`), which it does from 0.25.2 on; the tests below hold it to that.

use crate::router::Router;
use arc_swap::ArcSwap;
use hyper::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::Arc;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type OneLabel = [(&'static str, &'static str); 1];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The codes of the proxy's own error answers, by their index in `Metrics::local`.
const LOCAL_CODES: [&str; 8] = ["400", "404", "405", "408", "413", "502", "503", "504"];

/// The index of `status` in [`LOCAL_CODES`] (a jump table, no search).
fn local_index(status: StatusCode) -> Option<usize> {
    Some(match status.as_u16() {
        400 => 0,
        404 => 1,
        405 => 2,
        408 => 3,
        413 => 4,
        502 => 5,
        503 => 6,
        504 => 7,
        _ => return None,
    })
}

pub struct Metrics {
    registry: Registry,
    by_class: [Counter; 5],
    local: [Counter; 8],
    connect_errors: Counter,
    retries: Counter,
    connections_open: Gauge,
    connections_parked: Gauge,
    connections_total: Counter,
    connections_refused: Counter,
    acme_issued: Counter,
    acme_failed: Counter,
    tls_handshake_failures: Counter,
    access_log_dropped: Counter,
    /// (project, host, not_after) of every certificate served, written by `tls`.
    certificate_expiry: Arc<ArcSwap<Vec<(String, String, u64)>>>,
}

impl Default for Metrics {
    /// Global counters only: no route table, no constant labels.
    fn default() -> Self {
        Metrics::build(None, Vec::new())
    }
}

impl Metrics {
    /// The registry with the per-backend collector over `router` and the operator's constant
    /// labels (`--metrics-label`), checked by [`check_label_name`].
    pub fn new(router: Arc<Router>, labels: &[(String, String)]) -> Result<Metrics, String> {
        let mut constant = Vec::with_capacity(labels.len());
        for (k, v) in labels {
            check_label_name(k)?;
            if labels.iter().filter(|(other, _)| other == k).count() > 1 {
                return Err(format!("--metrics-label {k:?} is given twice"));
            }
            constant.push((Cow::Owned(k.clone()), Cow::Owned(v.clone())));
        }
        Ok(Metrics::build(Some(router), constant))
    }

    fn build(
        router: Option<Arc<Router>>,
        constant: Vec<(Cow<'static, str>, Cow<'static, str>)>,
    ) -> Metrics {
        let mut registry = Registry::with_labels(constant.into_iter());
        let responses = Family::<OneLabel, Counter>::default();
        let by_class = CLASSES.map(|c| responses.get_or_create(&[("class", c)]).clone());
        registry.register(
            "luma_proxy_responses",
            "Responses sent to clients, by status class",
            responses,
        );
        let local_errors = Family::<OneLabel, Counter>::default();
        let local = LOCAL_CODES.map(|c| local_errors.get_or_create(&[("code", c)]).clone());
        registry.register(
            "luma_proxy_local_errors",
            "Error responses the proxy answered itself (refused requests, no route, upstream failures), by code",
            local_errors,
        );
        let orders = Family::<OneLabel, Counter>::default();
        // One statement each: a family's guard lives to the end of its statement.
        let acme_issued = orders.get_or_create(&[("result", "issued")]).clone();
        let acme_failed = orders.get_or_create(&[("result", "failed")]).clone();
        let m = Metrics {
            by_class,
            local,
            connect_errors: Counter::default(),
            retries: Counter::default(),
            connections_open: Gauge::default(),
            connections_parked: Gauge::default(),
            connections_total: Counter::default(),
            connections_refused: Counter::default(),
            acme_issued,
            acme_failed,
            tls_handshake_failures: Counter::default(),
            access_log_dropped: Counter::default(),
            certificate_expiry: Arc::default(),
            registry: Registry::default(),
        };
        registry.register(
            "luma_proxy_acme_orders",
            "ACME orders that ended, by result (issued or failed)",
            orders,
        );
        registry.register(
            "luma_proxy_tls_handshake_failures",
            "TLS handshakes that failed (unknown or missing SNI, protocol errors, timeouts)",
            m.tls_handshake_failures.clone(),
        );
        registry.register_collector(Box::new(ExpiryCollector {
            certs: m.certificate_expiry.clone(),
        }));
        registry.register(
            "luma_proxy_upstream_connect_errors",
            "Failed connects to backends",
            m.connect_errors.clone(),
        );
        registry.register(
            "luma_proxy_upstream_retries",
            "Requests moved to another backend",
            m.retries.clone(),
        );
        // Process-wide, kept by `resolve` (the server has one resolver).
        registry.register(
            "luma_proxy_dns_queries",
            "DNS look-ups sent to Docker's DNS: route aliases, the proxy's own name per network, outside names",
            crate::resolve::DNS_QUERIES.clone(),
        );
        registry.register(
            "luma_proxy_connections_open",
            "Client connections holding a slot of the global limit, upgraded tunnels included",
            m.connections_open.clone(),
        );
        registry.register(
            "luma_proxy_connections_parked",
            "Idle HTTP/1.1 keep-alive connections holding only their socket (hyper's state released)",
            m.connections_parked.clone(),
        );
        registry.register(
            "luma_proxy_connections",
            "Client connections accepted",
            m.connections_total.clone(),
        );
        registry.register(
            "luma_proxy_connections_refused",
            "Client connections closed at accept because the connection limit was reached",
            m.connections_refused.clone(),
        );
        registry.register(
            "luma_proxy_access_log_dropped_lines",
            "Access log lines not written: stdout fell behind past --access-log-buffer, a write failed, or shutdown could not wait (requests never wait for the log)",
            m.access_log_dropped.clone(),
        );
        if let Some(router) = router {
            registry.register_collector(Box::new(BackendCollector { router }));
        }
        Metrics { registry, ..m }
    }

    /// Counts a response by class and, when the proxy answered it itself (`local`, not an
    /// app's own 404 or 502), by code.
    pub fn count_response(&self, status: StatusCode, local: bool) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        if local {
            if let Some(i) = local_index(status) {
                self.local[i].inc();
            }
        }
    }
    pub fn count_connect_error(&self) {
        self.connect_errors.inc();
    }
    pub fn count_retry(&self) {
        self.retries.inc();
    }
    pub fn connection_opened(&self) {
        self.connections_open.inc();
        self.connections_total.inc();
    }
    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }
    pub fn connection_parked(&self) {
        self.connections_parked.inc();
    }
    pub fn connection_unparked(&self) {
        self.connections_parked.dec();
    }
    pub fn connections_parked(&self) -> u64 {
        self.connections_parked.get().max(0) as u64
    }
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Counts an ACME order that ended, by outcome (a failed HTTP-01 order and the TLS-ALPN-01
    /// order after it count as two).
    pub fn count_acme_order(&self, issued: bool) {
        if issued {
            self.acme_issued.inc();
        } else {
            self.acme_failed.inc();
        }
    }
    pub fn count_handshake_failure(&self) {
        self.tls_handshake_failures.inc();
    }
    /// The counter the access log adds its dropped lines to (shared, not a copy).
    pub fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
    }
    pub fn handshake_failures(&self) -> u64 {
        self.tls_handshake_failures.get()
    }
    pub fn set_certificate_expiry(&self, certs: Vec<(String, String, u64)>) {
        self.certificate_expiry.store(Arc::new(certs));
    }

    pub fn connections_open(&self) -> u64 {
        self.connections_open.get().max(0) as u64
    }
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.get()
    }
    pub fn requests_total(&self) -> u64 {
        self.by_class.iter().map(|c| c.get()).sum()
    }

    /// The whole registry in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            crate::log::error(
                "metrics encoding failed",
                serde_json::json!({"error": e.to_string()}),
            );
        }
        out
    }
}

/// Label names as Prometheus accepts them: `[a-zA-Z_][a-zA-Z0-9_]*`, not `__`-prefixed (those
/// are Prometheus's own), and none of the names the proxy's own series use.
pub fn check_label_name(k: &str) -> Result<(), String> {
    let mut bytes = k.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') || k.starts_with("__") {
        return Err(format!(
            "metrics label name {k:?} is not valid: use letters, digits and '_', not starting with a digit or '__'"
        ));
    }
    if [
        "class", "code", "project", "app", "backend", "host", "result",
    ]
    .contains(&k)
    {
        return Err(format!(
            "metrics label name {k:?} is used by the proxy's own series; pick another"
        ));
    }
    Ok(())
}

/// `luma_proxy_certificate_expiry_timestamp_seconds{project,host}`, read at scrape time.
struct ExpiryCollector {
    certs: Arc<ArcSwap<Vec<(String, String, u64)>>>,
}

impl std::fmt::Debug for ExpiryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpiryCollector")
    }
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let certs = self.certs.load();
        if certs.is_empty() {
            return Ok(());
        }
        let mut m = encoder.encode_descriptor(
            "luma_proxy_certificate_expiry_timestamp_seconds",
            "When the certificate served for a host expires (Unix seconds)",
            None,
            MetricType::Gauge,
        )?;
        for (project, host, not_after) in certs.iter() {
            let labels = [("project", project.as_str()), ("host", host.as_str())];
            ConstGauge::new(i64::try_from(*not_after).unwrap_or(i64::MAX))
                .encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Per-backend series, read from the route table at scrape time.
struct BackendCollector {
    router: Arc<Router>,
}

impl std::fmt::Debug for BackendCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendCollector")
    }
}

struct Row {
    project: String,
    app: String,
    backend: String,
    healthy: bool,
    inflight: i64,
    requests: u64,
}

impl Row {
    fn labels(&self) -> [(&'static str, &str); 3] {
        [
            ("project", &self.project),
            ("app", &self.app),
            ("backend", &self.backend),
        ]
    }
}

impl Collector for BackendCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut rows = Vec::new();
        for s in self.router.services() {
            for b in s.balancer.backends().iter() {
                rows.push(Row {
                    project: s.spec.project.clone(),
                    app: s.spec.app.clone(),
                    backend: b.addr.to_string(),
                    healthy: b.is_healthy(),
                    inflight: i64::try_from(b.inflight()).unwrap_or(i64::MAX),
                    requests: b.requests(),
                });
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let mut m = encoder.encode_descriptor(
            "luma_proxy_backend_healthy",
            "1 if the backend passes its health checks",
            None,
            MetricType::Gauge,
        )?;
        for r in &rows {
            ConstGauge::new(i64::from(r.healthy)).encode(m.encode_family(&r.labels())?)?;
        }
        let mut m = encoder.encode_descriptor(
            "luma_proxy_backend_inflight",
            "Requests and tunnels in flight on the backend",
            None,
            MetricType::Gauge,
        )?;
        for r in &rows {
            ConstGauge::new(r.inflight).encode(m.encode_family(&r.labels())?)?;
        }
        let mut m = encoder.encode_descriptor(
            "luma_proxy_backend_requests",
            "Requests sent to the backend",
            None,
            MetricType::Counter,
        )?;
        for r in &rows {
            ConstCounter::new(r.requests).encode(m.encode_family(&r.labels())?)?;
        }
        Ok(())
    }
}

/// The metrics listener: `GET /metrics` over plain HTTP/1.1, read-only, no token.
///
/// Where it listens decides who can read it (see `MetricsListen` and the README): by default
/// only on the proxy's interface in the `luma-metrics` network, pinned with `SO_BINDTODEVICE`,
/// so containers of a project network (which the proxy shares with every project) cannot reach
/// it, and a Prometheus attached to `luma-metrics` can, with no token and no `docker exec`.
/// The proxy may be attached to that network at any time: the listener binds once the
/// interface appears (checked every [`listener::RECHECK`], DNS asked only when the set of
/// interfaces changed) and re-binds if it changes.
pub mod listener {
    use super::Metrics;
    use crate::idle::ConnIo;
    use crate::resolve::{local_interfaces, Interface, Resolver};
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::{Method, Request, Response, StatusCode};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio::sync::{watch, Semaphore};
    use tokio::time::Instant;

    /// Connections the metrics listener serves at once; more are closed at accept.
    pub const MAX_CONNECTIONS: usize = 32;
    /// How often the network mode looks at the local interfaces.
    pub const RECHECK: Duration = Duration::from_secs(2);
    /// After an interface change, a failed look-up is retried with this backoff (doubling up to
    /// `RETRY_MAX`), in case Docker's DNS lags the attach. Unattached, the proxy asks no more:
    /// each look-up for a network it is not on is forwarded to the host's resolvers.
    const RETRY_MIN: Duration = Duration::from_secs(2);
    const RETRY_MAX: Duration = Duration::from_secs(600);
    /// Bound on one look-up of the proxy's own address on the metrics network.
    const DNS_LIMIT: Duration = Duration::from_secs(5);
    const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

    pub enum Source {
        /// Listening already (`IP:PORT`).
        Bound(TcpListener),
        /// The proxy's own interface on `network`, once it is attached.
        Network {
            network: String,
            port: u16,
            resolver: Arc<Resolver>,
        },
    }

    pub async fn serve(source: Source, metrics: Arc<Metrics>, shutdown: watch::Receiver<bool>) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        match source {
            Source::Bound(l) => {
                if let Ok(a) = l.local_addr() {
                    crate::log::info(
                        "metrics listening",
                        serde_json::json!({"addr": a.to_string()}),
                    );
                }
                accept_loop(l, metrics, limit, shutdown).await
            }
            Source::Network {
                network,
                port,
                resolver,
            } => network_loop(&network, port, &resolver, metrics, limit, shutdown).await,
        }
    }

    async fn accept_loop(
        l: TcpListener,
        metrics: Arc<Metrics>,
        limit: Arc<Semaphore>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = crate::admin::Backoff::new(
            crate::admin::ACCEPT_BACKOFF_MIN,
            crate::admin::ACCEPT_BACKOFF_MAX,
        );
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                a = l.accept() => match a {
                    Ok((stream, _)) => {
                        backoff.succeeded();
                        connection(stream, &metrics, &limit);
                    }
                    Err(e) => {
                        let (wait, first) = backoff.failed();
                        if first {
                            crate::log::warn("metrics accept failed; backing off", serde_json::json!({"error": e.to_string()}));
                        }
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                },
            }
        }
    }

    async fn network_loop(
        network: &str,
        port: u16,
        resolver: &Resolver,
        metrics: Arc<Metrics>,
        limit: Arc<Semaphore>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut bound: Option<(Interface, TcpListener)> = None;
        let mut seen: Option<Vec<Interface>> = None;
        // When to ask DNS again after a failure, and the wait after that.
        let mut retry: Option<(Instant, Duration)> = None;
        // An interface found but not bound yet (the bind failed): retried locally, no DNS.
        let mut unbound: Option<Interface> = None;
        let mut told_waiting = false;
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = crate::admin::Backoff::new(
            crate::admin::ACCEPT_BACKOFF_MIN,
            crate::admin::ACCEPT_BACKOFF_MAX,
        );
        loop {
            let event = {
                let accept = async {
                    match &bound {
                        Some((_, l)) => l.accept().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.changed() => return,
                    a = accept => Some(a),
                    _ = tick.tick() => None,
                }
            };
            match event {
                Some(Ok((stream, _))) => {
                    backoff.succeeded();
                    connection(stream, &metrics, &limit);
                }
                Some(Err(e)) => {
                    let (wait, first) = backoff.failed();
                    if first {
                        crate::log::warn(
                            "metrics accept failed; backing off",
                            serde_json::json!({"error": e.to_string()}),
                        );
                    }
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                None => {
                    // Listing every interface takes milliseconds at 200 networks: not on a
                    // serving thread.
                    let Ok(listed) = tokio::task::spawn_blocking(local_interfaces).await else {
                        continue; // the listing panicked or the runtime is ending: next tick
                    };
                    let now = listed.unwrap_or_default();
                    let changed = seen.as_ref() != Some(&now);
                    if changed {
                        seen = Some(now);
                        retry = None;
                    } else if let Some(iface) = unbound.take() {
                        bind_or_keep(&iface, port, network, &mut bound, &mut unbound);
                        continue;
                    } else if retry.is_none_or(|(at, _)| Instant::now() < at) {
                        continue;
                    }
                    let found = tokio::select! {
                        _ = shutdown.changed() => return,
                        r = tokio::time::timeout(DNS_LIMIT, resolver.interface_for(network)) => {
                            r.unwrap_or_else(|_| Err(format!("DNS gave no answer within {DNS_LIMIT:?}")))
                        }
                    };
                    match found {
                        Ok(iface) => {
                            retry = None;
                            if bound.as_ref().map(|(i, _)| i) == Some(&iface) {
                                continue;
                            }
                            bound = None;
                            bind_or_keep(&iface, port, network, &mut bound, &mut unbound);
                        }
                        Err(why) => {
                            let wait = retry.map_or(RETRY_MIN, |(_, w)| (w * 2).min(RETRY_MAX));
                            retry = Some((Instant::now() + wait, wait));
                            if bound.take().is_some() {
                                crate::log::info(
                                    "metrics listener closed: the proxy left its network",
                                    serde_json::json!({"network": network}),
                                );
                            } else if !told_waiting {
                                told_waiting = true;
                                crate::log::info(
                                    "metrics listener waits for its network",
                                    serde_json::json!({"network": network, "port": port, "reason": why}),
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Binds on `iface`, or keeps it in `unbound` to try again on the next tick (no DNS).
    fn bind_or_keep(
        iface: &Interface,
        port: u16,
        network: &str,
        bound: &mut Option<(Interface, TcpListener)>,
        unbound: &mut Option<Interface>,
    ) {
        match bind_on(iface, port) {
            Ok(l) => {
                crate::log::info(
                    "metrics listening",
                    serde_json::json!({
                        "addr": SocketAddr::from((iface.addr, port)).to_string(),
                        "network": network,
                        "interface": iface.name.as_ref(),
                    }),
                );
                *bound = Some((iface.clone(), l));
            }
            Err(e) => {
                if unbound.is_none() {
                    crate::log::warn(
                        "metrics listener cannot bind; retrying",
                        serde_json::json!({"network": network, "error": e.to_string()}),
                    );
                }
                *unbound = Some(iface.clone());
            }
        }
    }

    /// A listener on `iface` only: its address, and `SO_BINDTODEVICE` so that packets for that
    /// address arriving on another interface (another project's network) are not accepted.
    fn bind_on(iface: &Interface, port: u16) -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.bind_device(Some(iface.name.as_bytes()))?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::from((iface.addr, port)).into())?;
        socket.listen(64)?;
        TcpListener::from_std(socket.into())
    }

    fn connection(stream: tokio::net::TcpStream, metrics: &Arc<Metrics>, limit: &Arc<Semaphore>) {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            return;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let m = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&m, &req)) }
            });
            let io = ConnIo::new(stream, HEADER_TIMEOUT, IDLE_TIMEOUT);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(io), svc)
                .await;
            drop(permit);
        });
    }

    fn answer(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: &'static str| {
            let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *r.status_mut() = status;
            r
        };
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => crate::admin::metrics_response(metrics),
            (_, "/metrics") => text(StatusCode::METHOD_NOT_ALLOWED, "405 GET only\n"),
            _ => text(StatusCode::NOT_FOUND, "404 only GET /metrics here\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_escapes_constant_labels_and_counts() {
        let router = Arc::new(Router::new());
        let m = Metrics::new(
            router,
            &[("server".to_string(), "eu \"1\"\\x\nnext".to_string())],
        )
        .unwrap();
        m.count_response(StatusCode::OK, false);
        m.count_response(StatusCode::BAD_GATEWAY, true);
        // An app's own 404 is no local error; the proxy's refusals are.
        m.count_response(StatusCode::NOT_FOUND, false);
        for s in [400, 405, 408, 413] {
            m.count_response(StatusCode::from_u16(s).unwrap(), true);
        }
        m.connection_opened();
        m.connection_refused();
        let out = m.render();
        assert!(
            out.contains(
                "luma_proxy_responses_total{server=\"eu \\\"1\\\"\\\\x\\nnext\",class=\"5xx\"} 1"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "luma_proxy_local_errors_total{server=\"eu \\\"1\\\"\\\\x\\nnext\",code=\"502\"} 1"
            ),
            "{out}"
        );
        assert!(out.contains("luma_proxy_connections_open{"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
        // Every line is a comment or one whole sample: no raw newline inside a label value.
        for line in out.lines() {
            assert!(
                line.starts_with('#') || line.starts_with("luma_"),
                "stray line {line:?} in\n{out}"
            );
        }
        let server = "server=\"eu \\\"1\\\"\\\\x\\nnext\"";
        for code in ["400", "405", "408", "413"] {
            let line = format!("luma_proxy_local_errors_total{{{server},code=\"{code}\"}} 1");
            assert!(out.contains(&line), "no {line} in {out}");
        }
        let app_404 = format!("luma_proxy_local_errors_total{{{server},code=\"404\"}} 0");
        assert!(out.contains(&app_404), "an app's 404 was counted: {out}");
        assert_eq!(m.requests_total(), 7);
        assert_eq!(m.connections_open(), 1);
    }

    #[test]
    fn label_values_in_a_family_are_escaped() {
        let mut registry = Registry::default();
        let f = Family::<[(&'static str, String); 1], Counter>::default();
        f.get_or_create(&[("path", "/q\"\\\n".to_string())]).inc();
        registry.register("t", "test", f);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("t_total{path=\"/q\\\"\\\\\\n\"} 1"), "{out}");
    }

    #[test]
    fn bad_label_names_are_refused() {
        assert!(check_label_name("server").is_ok());
        assert!(check_label_name("_x1").is_ok());
        for bad in ["", "1a", "a-b", "__x", "project", "a b"] {
            assert!(check_label_name(bad).is_err(), "{bad}");
        }
        assert!(Metrics::new(
            Arc::new(Router::new()),
            &[("a".into(), "1".into()), ("a".into(), "2".into())]
        )
        .is_err());
    }
}
