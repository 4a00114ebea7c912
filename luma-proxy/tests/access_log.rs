//! The access log of the real binary when nothing reads its stdout: a pipe left full, as when
//! the engine's log driver falls behind. Requests must not wait for it; the lines that do not
//! fit are dropped whole and counted, and the ones kept come out when the reader returns.

mod common;

use common::{KeepAliveClient, TempStateDir, TestBackend};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const REQUESTS: u64 = 3000;

/// `luma-proxy serve` on loopback with its stdout a pipe this test holds and does not read.
/// Dropping it kills the process, also when the test fails.
struct Proxy {
    child: Child,
    http: SocketAddr,
    admin: SocketAddr,
    /// Its stderr, one event per line, until it exits.
    events: mpsc::Receiver<String>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bound on waits that only a hung proxy exceeds (not a measure of speed).
const HUNG: Duration = Duration::from_secs(60);

fn start(state: &TempStateDir) -> Proxy {
    let mut child = Command::new(env!("CARGO_BIN_EXE_luma-proxy"))
        .args(["serve", "--http", "127.0.0.1:0", "--https", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--acme-directory", "off"])
        .args([
            "--metrics",
            "off",
            "--workers",
            "1",
            "--allow-literal-targets",
        ])
        // Small, so that a few thousand requests overflow it and the pipe.
        .args(["--access-log-buffer", "16KiB", "--state-dir"])
        .arg(state.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Every event is read as it comes, so the proxy never blocks on stderr.
    let (tx, events) = mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut p = Proxy {
        child,
        http: "0.0.0.0:0".parse().unwrap(),
        admin: "0.0.0.0:0".parse().unwrap(),
        events,
    };
    // Its first event names the addresses it bound.
    let first = p
        .events
        .recv_timeout(HUNG)
        .expect("no event from luma-proxy");
    let ev: serde_json::Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("first event {first:?} is not JSON: {e}"));
    assert_eq!(ev["msg"], "luma-proxy listening", "{first}");
    let addr = |k: &str| ev[k].as_str().unwrap().parse().unwrap();
    (p.http, p.admin) = (addr("http"), addr("admin"));
    p
}

/// Runs a client command of the binary against `p` and returns its stdout.
fn client(p: &Proxy, state: &TempStateDir, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_luma-proxy"))
        .args(args)
        .args(["--admin", &p.admin.to_string(), "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "luma-proxy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_never_wait_for_a_stdout_nobody_reads_and_every_line_is_kept_or_counted() {
    let backend = TestBackend::start("127.0.0.1", "b").await;
    let state = TempStateDir::new("access-log");
    let mut proxy = start(&state);
    let target = backend.addr.to_string();
    tokio::task::block_in_place(|| {
        client(
            &proxy,
            &state,
            &[
                "deploy",
                "--host",
                "log.test",
                "--project",
                "logs",
                "--target",
                &target,
            ],
        )
    });

    // The pipe holds 64 KiB and the buffer 16 (32 with the batch being written): a few
    // hundred lines, far fewer than this. Were a request to wait for the log, it would wait
    // for ever; the bound turns that into a failure.
    let mut c = KeepAliveClient::connect(proxy.http, "log.test").await;
    for i in 0..REQUESTS {
        let (status, _) = tokio::time::timeout(HUNG, c.request("GET", &format!("/{i}"), ""))
            .await
            .unwrap_or_else(|_| {
                panic!("request {i} waited 60 s: is it waiting for the access log?")
            });
        assert_eq!(status, 200, "request {i}");
    }
    let dropped = tokio::task::block_in_place(|| {
        metric(
            &client(&proxy, &state, &["metrics"]),
            "luma_proxy_access_log_dropped_lines_total",
        )
    });
    assert!(dropped > 0, "nothing dropped with stdout unread");

    // SIGTERM, then read: the lines kept in memory come out before the process ends.
    let mut stdout = proxy.child.stdout.take().unwrap();
    let killed = Command::new("kill")
        .args(["-TERM", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let read = stdout.read_to_string(&mut out);
        let _ = tx.send(read.map(|_| out));
    });
    let out = tokio::task::block_in_place(|| rx.recv_timeout(HUNG))
        .expect("stdout did not end after SIGTERM")
        .unwrap();
    let status = tokio::task::block_in_place(|| proxy.child.wait()).unwrap();
    assert!(status.success(), "luma-proxy exited with {status}");
    // The process has exited: its stderr ends, and so does this.
    let events: Vec<String> = proxy.events.iter().collect();
    assert!(
        events
            .iter()
            .any(|e| e.contains("access log lines dropped")),
        "no warning about the dropped lines in {events:#?}"
    );
    assert!(
        out.is_empty() || out.ends_with('\n'),
        "a cut line at the end"
    );
    let mut paths = Vec::new();
    for l in out.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not one JSON object: {e}"));
        assert_eq!(v["host"], "log.test", "{l}");
        assert_eq!(v["status"], 200, "{l}");
        assert_eq!(v["backend"], target.as_str(), "{l}");
        assert!(v["route"].as_str().unwrap().starts_with("logs/"), "{l}");
        paths.push(v["path"].as_str().unwrap()[1..].parse::<u64>().unwrap());
    }
    assert!(!paths.is_empty(), "no line was kept");
    assert_eq!(
        paths.len() as u64 + dropped,
        REQUESTS,
        "{} lines written and {dropped} dropped",
        paths.len()
    );
    assert_eq!(paths[0], 0, "the first lines are kept");
    assert!(paths.windows(2).all(|w| w[0] < w[1]), "lines out of order");
}
