//! Criterion micro-benchmarks of luma-proxy's per-request work: route lookup among 10,000
//! hosts (exact and wildcard), header rewriting (request and response), the per-connection
//! peer address, and backend selection.
//!
//! Run: `cargo bench -p luma-benches`. Numbers are reported, never asserted. Instruction counts
//! of the whole request path, which these steps are part of, come from `benches/profile.py`
//! (`docs/profile.md`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use luma_proxy::backend::Backend;
use luma_proxy::balancer::LoadBalancer;
use luma_proxy::headers::{prepare_upstream, strip_hop_by_hop, Peer};
use luma_proxy::route::{RouteSpec, RouteTimeouts};
use luma_proxy::router::Router;
use luma_proxy::service::Service;
use std::hint::black_box;

fn spec(i: usize, host: String) -> RouteSpec {
    RouteSpec {
        project: format!("p{i}"),
        app: "web".into(),
        hosts: vec![host],
        target: "web:3000".into(),
        network: String::new(),
        health: Default::default(),
        timeouts: Default::default(),
        limits: Default::default(),
        tls: None,
    }
    .validate()
    .expect("valid spec")
}

fn router_with(n: usize) -> Router {
    let r = Router::new();
    for i in 0..n {
        let host = if i % 2 == 0 {
            format!("app{i}.example.com")
        } else {
            format!("*.tenant{i}.example.net")
        };
        r.install(Service::with_backends(spec(i, host), Vec::new()))
            .expect("install");
    }
    r
}

fn route_lookup(c: &mut Criterion) {
    let r = router_with(10_000);
    let mut g = c.benchmark_group("route_lookup_10k_hosts");
    g.bench_function("exact", |b| {
        b.iter(|| black_box(r.lookup(black_box("app5000.example.com"))))
    });
    g.bench_function("exact_with_port_and_case", |b| {
        b.iter(|| black_box(r.lookup(black_box("App5000.Example.com:443"))))
    });
    g.bench_function("wildcard", |b| {
        b.iter(|| black_box(r.lookup(black_box("shop.tenant5001.example.net"))))
    });
    g.bench_function("miss", |b| {
        b.iter(|| black_box(r.lookup(black_box("nobody.example.org"))))
    });
    g.finish();
}

fn header_rewrite(c: &mut Criterion) {
    // A browser's head, with `Connection: keep-alive` (the path that reads Connection's
    // tokens), and a load generator's, Host alone (wrk and luma-loadgen send that).
    let browser = hyper::Request::get("/api/items?page=2")
        .header("host", "shop.example.com")
        .header(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
        )
        .header("accept", "text/html,application/xhtml+xml")
        .header("accept-encoding", "gzip, deflate, br")
        .header("cookie", "session=abcdef0123456789; theme=dark")
        .header("connection", "keep-alive")
        .body(())
        .expect("request")
        .into_parts()
        .0;
    let minimal = hyper::Request::get("/")
        .header("host", "127.0.0.1:18101")
        .body(())
        .expect("request")
        .into_parts()
        .0;
    // Made once per connection, at accept (its address is written out then).
    let peer = Peer::new("203.0.113.9:50312".parse().expect("addr"));
    let mut g = c.benchmark_group("prepare_upstream_headers");
    for (name, parts) in [("browser_head", &browser), ("host_only_head", &minimal)] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || parts.clone(),
                |mut p| {
                    prepare_upstream(&mut p, &peer, "http", &Default::default(), false);
                    p
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
    // What the proxy no longer does per request: writing the peer's address out.
    let addr: std::net::SocketAddr = "203.0.113.9:50312".parse().expect("addr");
    c.bench_function("peer_address_per_connection", |b| {
        b.iter(|| Peer::new(black_box(addr)))
    });
    // A backend's response head, as `proxy::respond` strips it.
    let response = hyper::Response::builder()
        .header("content-type", "text/html; charset=utf-8")
        .header("content-length", "1024")
        .header("date", "Fri, 27 Nov 2026 10:00:00 GMT")
        .header("cache-control", "no-store")
        .body(())
        .expect("response")
        .into_parts()
        .0
        .headers;
    c.bench_function("strip_hop_by_hop_response", |b| {
        b.iter_batched(
            || response.clone(),
            |mut h| {
                strip_hop_by_hop(&mut h, false);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn backend_selection(c: &mut Criterion) {
    let mut g = c.benchmark_group("backend_selection");
    for n in [1usize, 3, 50] {
        let backends: Vec<_> = (0..n)
            .map(|i| {
                let b = Backend::new(
                    format!("10.0.{}.{}:3000", i / 250, i % 250 + 1)
                        .parse()
                        .expect("addr"),
                    None,
                    &RouteTimeouts::default(),
                );
                b.mark_up();
                b
            })
            .collect();
        let lb = LoadBalancer::new(backends);
        g.bench_with_input(BenchmarkId::from_parameter(n), &lb, |b, lb| {
            b.iter(|| black_box(lb.pick(None)))
        });
    }
    g.finish();
}

criterion_group!(benches, route_lookup, header_rewrite, backend_selection);
criterion_main!(benches);
