//! Backends that close idle keep-alive connections, against the real engine: two replicas of
//! the demo backend with `DEMO_IDLE_CLOSE_MS=1000` (the shape of Node's 5 s `keepAliveTimeout`
//! and gunicorn's 2 s `--keep-alive`), deployed with the `luma` CLI, and POSTs spaced so the
//! proxy's pooled upstream connections come up for reuse right as the backends close them.
//! None may fail.

use luma_integration_tests::*;
use std::time::{Duration, Instant};

/// The demo backends' keep-alive idle limit.
const BACKEND_IDLE: Duration = Duration::from_millis(1000);
/// Concurrent keep-alive clients; each sends one POST per wave.
const CLIENTS: usize = 10;
/// Waves of POSTs. The first opens the upstream connections; every later one finds them idle
/// for about the backends' limit.
const WAVES: usize = 22;
/// Offsets of the wave spacing from the backends' limit, in microseconds.
const SWEEP_US: [i64; 8] = [-500, 0, 250, 500, 750, 1000, 1500, 2000];

#[test]
fn posts_spaced_past_the_backend_idle_limit_never_fail() {
    let lab = CliLab::new("idle-close");
    let host = format!("idle.{}.test", lab.prefix);
    let yaml = format!(
        "apps:\n  web:\n    image: {}\n    replicas: 2\n    environment:\n      plain: [DEMO_IDLE_CLOSE_MS={}]\n    health_check:\n      path: /up\n      interval: 200ms\n    proxy:\n      hosts: [{host}]\n      app_port: 3000\n",
        demo_image(),
        BACKEND_IDLE.as_millis()
    );
    let (dir, project) = lab.project("idle", &yaml);
    lab.luma_ok(&dir, &["deploy"]);
    let addr = lab.http_addr();

    // Every client sends at the start of each wave, so each pooled upstream connection comes
    // up for reuse about one wave spacing after its last response. Wave k starts
    // `BACKEND_IDLE + SWEEP_US[k % len]` after wave k-1: the spacings sweep over the instant
    // the backend closes a connection.
    let start = Instant::now() + Duration::from_millis(100);
    let mut waves = Vec::with_capacity(WAVES);
    let mut t = start;
    for k in 0..WAVES {
        if k > 0 {
            let us = SWEEP_US[k % SWEEP_US.len()];
            t += Duration::from_micros((BACKEND_IDLE.as_micros() as i64 + us) as u64);
        }
        waves.push(t);
    }
    let clients: Vec<_> = (0..CLIENTS)
        .map(|j| {
            let (addr, host, project, waves) =
                (addr.clone(), host.clone(), project.clone(), waves.clone());
            std::thread::spawn(move || {
                let mut http = Http::new(&addr);
                let mut ok = 0usize;
                let mut failed = Vec::new();
                for (k, wave) in waves.iter().enumerate() {
                    let at = *wave;
                    // Spacing requests in time is what this test is about.
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    let body = format!("order {j}/{k}");
                    match http.request("POST", &host, "/order", &body, false) {
                        Ok((200, text)) => {
                            let v: serde_json::Value =
                                serde_json::from_str(&text).unwrap_or_default();
                            if v["method"] == "POST"
                                && v["body_bytes"] == body.len()
                                && v["project"] == project.as_str()
                            {
                                ok += 1;
                            } else {
                                failed.push(format!("client {j} wave {k}: 200 {text}"));
                            }
                        }
                        Ok((status, text)) => {
                            failed.push(format!("client {j} wave {k}: {status} {}", text.trim()))
                        }
                        Err(e) => failed.push(format!("client {j} wave {k}: {e}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let mut ok = 0;
    let mut failed = Vec::new();
    for c in clients {
        let (o, f) = c.join().expect("client thread");
        ok += o;
        failed.extend(f);
    }
    let total = CLIENTS * WAVES;
    eprintln!(
        "POSTs against backends closing idle connections after {BACKEND_IDLE:?}: {ok} ok, {} failed of {total}",
        failed.len()
    );
    assert!(total >= 200);
    assert!(
        failed.is_empty(),
        "{} of {total} POSTs failed: {failed:#?}",
        failed.len()
    );
    assert_eq!(ok, total);
}
