//! The drain handshake under real parallelism: a request that looked up the old route on any
//! serving thread is either counted by the drain or moved to the new route, so the old backend
//! can die the moment a deploy returns.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Serving threads of the proxy: the test runtime's listener plus `EXTRA_WORKERS` threads.
const EXTRA_WORKERS: usize = 2;
/// Few enough that the old route is often idle when its drain starts: a drain that waits for
/// a straggler also waits out the lookup-to-count window this test is about.
const CLIENTS: usize = 4;
/// Without the handshake every run of this test failed (1 to 17 failed requests per run).
const DEPLOYS: usize = 500;

/// Keep-alive GETs until `stop`; every answer must be a 200 from one of the test backends
/// (their bodies start with `gen-`). Reports once on `started` after its first good answer.
async fn client(
    proxy: SocketAddr,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    started: mpsc::Sender<()>,
) {
    let mut started = Some(started);
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = match TcpStream::connect(proxy).await {
                Ok(s) => s,
                Err(e) => {
                    tally.fail(format!("connect: {e}"));
                    continue;
                }
            };
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok((tx, conn)) => {
                    tokio::spawn(conn);
                    sender = Some(tx);
                }
                Err(e) => {
                    tally.fail(format!("handshake: {e}"));
                    continue;
                }
            }
        }
        let tx = sender.as_mut().unwrap();
        if tx.ready().await.is_err() {
            sender = None;
            continue;
        }
        let req = Request::get("/")
            .header("host", "shop.test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        match tx.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                    Ok(body) if status == StatusCode::OK && body.starts_with(b"gen-") => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        if let Some(s) = started.take() {
                            let _ = s.send(()).await;
                        }
                    }
                    Ok(body) => tally.fail(format!(
                        "status {status}: {:?}",
                        String::from_utf8_lossy(&body)
                    )),
                    Err(e) => tally.fail(format!("body: {e}")),
                }
            }
            Err(e) => {
                tally.fail(format!("send: {e}"));
                sender = None;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_old_backend_when_deploy_returns_loses_no_request() {
    // Pools are sized by the worker count, so it is set before any backend exists.
    luma_proxy::workers::set_count(1 + EXTRA_WORKERS);
    let mut proxy = start_proxy("drain-kill").await;
    proxy.add_workers(EXTRA_WORKERS).unwrap();

    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    let mut current = TestBackend::start(ips[0], "gen-0").await;
    deploy_route(&proxy, "shop", "shop.test", &[current.addr]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let (started_tx, mut started_rx) = mpsc::channel(CLIENTS);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(client(
                proxy.http_addr,
                stop.clone(),
                tally.clone(),
                started_tx.clone(),
            ))
        })
        .collect();
    drop(started_tx);
    // Every client has had a good answer: the load runs before the first switch.
    for _ in 0..CLIENTS {
        started_rx
            .recv()
            .await
            .expect("a client ended before its first answer");
    }

    let began = Instant::now();
    let mut hits = vec![(current.name.clone(), current.hits.clone())];
    let mut drained_with_waiting = 0;
    for i in 1..=DEPLOYS {
        let next = TestBackend::start(ips[i % ips.len()], &format!("gen-{i}")).await;
        let out = deploy_route(&proxy, "shop", "shop.test", &[next.addr]).await;
        // Like a stopped container: the old release dies the moment the deploy replies.
        current.kill();
        let drain = out.drain.as_ref().expect("a switch drains the old release");
        assert_eq!(drain.cut, 0, "deploy {i}: the drain cut requests");
        if drain.waited_ms > 0 {
            drained_with_waiting += 1;
        }
        hits.push((next.name.clone(), next.hits.clone()));
        current = next;
    }
    let switching = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    proxy.shutdown().await;
    current.kill();

    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let served = hits
        .iter()
        .filter(|(_, h)| h.load(Ordering::Relaxed) > 0)
        .count();
    eprintln!(
        "{DEPLOYS} deploys in {switching:?} on {} serving threads: {ok} ok, {failed} failed; \
         {served} of {} backends served; {drained_with_waiting} drains waited",
        1 + EXTRA_WORKERS,
        hits.len()
    );
    assert_eq!(
        failed,
        0,
        "first failure: {:?}",
        tally.first_failure.lock().unwrap()
    );
    assert!(ok > 2_000, "the load barely ran: {ok} requests");
    assert!(
        served > DEPLOYS / 2,
        "the load did not follow the switches: only {served} of {} backends served",
        hits.len()
    );
}
