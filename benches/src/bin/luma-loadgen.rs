//! luma-loadgen: an HTTP/1.1 load generator for the benchmark harnesses.
//!
//! Open loop at a fixed rate (`--rate`), so latency is measured from when a request was due,
//! not from when a stalled connection got round to it (no coordinated omission), or closed
//! loop as fast as possible (`--rate 0`). At a fixed rate, each request is released at its due
//! time by a high-resolution timer ([`pace`]), and the summary says how long the requests waited
//! on the load generator (`pace_late_*`, `send_late_*`): with tokio's 1 ms timer, each
//! millisecond's requests went together, as a burst, at the tick or later.
//!
//! Only targets on this machine are accepted: a 127.0.0.0/8 address, or with `--local-link` an address reached directly (no gateway) over a local link
//! that leaves no machine: a Linux bridge whose ports are all virtual (a container here), or a
//! link in 198.18.0.0/15, the benchmarking range, which the scale harness's client namespace
//! uses to reach this host (see [`local_link`]). With `--warmup S` it first sends the same load
//! for S seconds without counting it (only its failures), so a run measures the steady state:
//! a proxy whose idle upstream connections expired between runs would otherwise open them all
//! in the run's first milliseconds, and a 10 s run's p99 takes in that burst. It stops by
//! itself after `--duration`, or, with `--requests N`, once N requests have been sent (spread
//! evenly over the connections): an exact count, for per-request instruction profiles.
//!
//! Prints one JSON summary. With `--records FILE` it also writes one line per measured request:
//! `due_unix_ms latency_us outcome release` (`due_unix_us` with `--records-us`), where outcome
//! is the status code, `err` or `timeout` and release is the `x-demo-release` response header
//! (for deploy analysis).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    host: String,
    path: String,
    connections: usize,
    rate: f64,
    duration: Duration,
    method: String,
    close: bool,
    records: Option<String>,
    /// `--records-us`: due times in the records in Unix µs instead of ms.
    records_us: bool,
    /// `--addr` may be on a local link (see [`local_link`]), not only loopback.
    local_link: bool,
    /// Stop after this many requests in all (None: only the duration bounds the run).
    requests: Option<u64>,
    /// Load sent before the measured `duration`, at the same rate, and not counted (only its
    /// failures are): pools filled, caches hot, so a run measures the steady state.
    warmup: Duration,
    /// `--pace-us`: the pacer's quantum (0: each request at its own due time).
    pace: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        addr: String::new(),
        host: "localhost".into(),
        path: "/".into(),
        connections: 64,
        rate: 0.0,
        duration: Duration::from_secs(10),
        method: "GET".into(),
        close: false,
        records: None,
        records_us: false,
        local_link: false,
        requests: None,
        warmup: Duration::ZERO,
        pace: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--addr" => a.addr = v()?,
            "--host" => a.host = v()?,
            "--path" => a.path = v()?,
            "--connections" => a.connections = v()?.parse().map_err(|e| format!("--connections: {e}"))?,
            "--rate" => a.rate = v()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--duration" => a.duration = seconds(&k, &v()?)?,
            "--method" => a.method = v()?,
            "--close" => a.close = true,
            "--local-link" => a.local_link = true,
            "--records" => a.records = Some(v()?),
            "--records-us" => a.records_us = true,
            "--requests" => a.requests = Some(v()?.parse().map_err(|e| format!("--requests: {e}"))?),
            "--warmup" => a.warmup = seconds(&k, &v()?)?,
            "--pace-us" => {
                let q: u64 = v()?.parse().map_err(|_| "--pace-us takes whole µs")?;
                if q > 1_000_000 {
                    return Err("--pace-us: at most 1000000 (1 s)".into());
                }
                a.pace = Duration::from_micros(q)
            }
            "-h" | "--help" => {
                return Err("usage: luma-loadgen --addr 127.0.0.1:PORT [--host H] [--path /] [--connections 64] [--rate R|0] [--duration SECS] [--method GET|POST] [--close] [--records FILE [--records-us]] [--requests N] [--warmup SECS] [--pace-us Q] [--local-link]\n--warmup: load at the same rate for SECS before the measured --duration, not counted (its failures are, as warmup_failed)\n--records-us: due times in the records in Unix µs, not ms\n--pace-us: send the requests due within each Q µs together, at its end (default 0: each at its due time)\n--addr is 127.x.y.z:PORT, or with --local-link an IP:PORT reached directly over a bridge of virtual ports (a container on this machine) or a link in 198.18.0.0/15".into())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    // 0 is the closed loop; a fixed rate's period must be a Duration a run can reach.
    if !(a.rate == 0.0 || (0.001..=100_000_000.0).contains(&a.rate)) {
        return Err(format!(
            "--rate {}: 0 (as fast as possible) or 0.001 to 100000000 requests/s",
            a.rate
        ));
    }
    let ip = a
        .addr
        .parse::<std::net::SocketAddrV4>()
        .map_err(|e| format!("--addr {:?}: expected IPv4:PORT ({e})", a.addr))?;
    if !ip.ip().is_loopback() {
        if !a.local_link {
            return Err(format!(
                "--addr {}: must be a 127.0.0.0/8 address (load is only ever sent to this machine); a container's address on a local bridge needs --local-link",
                a.addr
            ));
        }
        let route = std::fs::read_to_string("/proc/net/route")
            .map_err(|e| format!("--local-link: cannot read /proc/net/route: {e}"))?;
        if !local_link(*ip.ip(), &route, virtual_bridge) {
            return Err(format!(
                "--addr {} --local-link: this machine reaches that address through no bridge of virtual ports and no 198.18.0.0/15 link, directly (see /proc/net/route): load is only ever sent to this machine and its containers",
                a.addr
            ));
        }
    }
    if a.duration > Duration::from_secs(600)
        || a.warmup > Duration::from_secs(60)
        || a.connections == 0
        || a.connections > 4096
    {
        return Err(
            "--duration is capped at 600 s, --warmup at 60 s and --connections at 4096".into(),
        );
    }
    if a.requests.is_some() && !a.warmup.is_zero() {
        return Err("--requests counts every request sent: it takes no --warmup".into());
    }
    Ok(a)
}

/// A number of seconds from the command line: finite and not negative.
fn seconds(flag: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = v.parse().map_err(|e| format!("{flag}: {e}"))?;
    Duration::try_from_secs_f64(s).map_err(|e| format!("{flag} {v}: {e}"))
}

/// Whether load to `ip` stays on this machine: `ip` lies in a subnet reached directly (no
/// gateway) through a bridge whose ports are all virtual (`virtual_bridge`: a container on one
/// of this machine's Docker networks), or through any link when the subnet lies inside
/// 198.18.0.0/15 (RFC 2544's range for benchmarks, never routed; the scale harness's client
/// namespace reaches this host over a veth in it). `route` is `/proc/net/route` (addresses and
/// masks as the kernel prints them: hex of the value in host byte order). The route the kernel
/// would take decides: the matching line with the longest prefix.
fn local_link(ip: std::net::Ipv4Addr, route: &str, virtual_bridge: impl Fn(&str) -> bool) -> bool {
    let bench = |net: u32, mask: u32| {
        let range = u32::from_ne_bytes([198, 18, 0, 0]);
        let range_mask = u32::from_ne_bytes([255, 254, 0, 0]);
        mask & range_mask == range_mask && net & range_mask == range
    };
    let ip = u32::from_ne_bytes(ip.octets());
    let chosen = route
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| f.get(i).and_then(|v| u32::from_str_radix(v, 16).ok());
            Some((*f.first()?, hex(1)?, hex(2)?, hex(7)?))
        })
        .filter(|&(_, dest, _, mask)| ip & mask == dest)
        .max_by_key(|&(_, _, _, mask)| mask.count_ones());
    match chosen {
        Some((iface, dest, 0, mask)) => mask != 0 && (bench(dest, mask) || virtual_bridge(iface)),
        _ => false,
    }
}

/// Whether `iface` is a Linux bridge (`/sys/class/net/<iface>/bridge`) none of whose ports is
/// a device (`/sys/class/net/<port>/device`: a real NIC, which would lead off this machine);
/// Docker's bridges hold only veths. A port stacked on a NIC without being one (a VLAN, a
/// bond, a tap) has no `device` link either and passes: this guards against a mistyped
/// address on a developer's machine, not against a host built to defeat it.
fn virtual_bridge(iface: &str) -> bool {
    let net = std::path::Path::new("/sys/class/net");
    if iface.contains('/') || !net.join(iface).join("bridge").is_dir() {
        return false;
    }
    match std::fs::read_dir(net.join(iface).join("brif")) {
        Ok(ports) => ports
            .flatten()
            .all(|p| !net.join(p.file_name()).join("device").exists()),
        Err(_) => false,
    }
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    ok: u64,
    non2xx: u64,
    errors: u64,
    timeouts: u64,
    records: Vec<(u128, u64, String, String)>,
    /// Failures during `--warmup`: reported apart, as they are in no other count.
    warmup_failed: u64,
    /// Fixed rate: how long each measured request waited on the load generator itself.
    send_late_us: Vec<u64>,
}

/// Releases each connection's requests at their due times, to within microseconds.
///
/// tokio's timer has a resolution of 1 ms and rounds a deadline up to the next tick, so with
/// `sleep_until` every request due within a millisecond was sent at that millisecond's end or
/// later: at 19,000 req/s, a burst of 19 every 1 ms (direct to the backend, the median latency
/// was 1.45 ms with it and 0.16 ms without). Latency is measured from the due time, so that
/// lateness was counted as the proxy's, and the proxy was measured on how it cleared bursts the
/// load generator made, not on an even load. A `timerfd` (a kernel high-resolution timer) on the
/// runtime's own event loop wakes it when the next request is due; every request now due is
/// handed to its connection as a permit (no other thread is woken). Request `j` is due at
/// `start + j / rate` ([`due_at`]). Returns how late each release was, in µs, for the summary:
/// the instrument's own precision.
async fn pace(
    a: Arc<Args>,
    start: Instant,
    permits: Vec<Arc<tokio::sync::Semaphore>>,
) -> std::io::Result<Vec<u64>> {
    // On any way out but the end of the schedule (a failed timer, a panic), the connections
    // waiting for a permit are let go (they stop), so the run ends and reports the failure.
    struct Abandon<'a> {
        permits: &'a [Arc<tokio::sync::Semaphore>],
        finished: bool,
    }
    impl Drop for Abandon<'_> {
        fn drop(&mut self) {
            if !self.finished {
                self.permits.iter().for_each(|p| p.close());
            }
        }
    }
    let mut guard = Abandon {
        permits: &permits,
        finished: false,
    };
    let timer = Timer::new()?;
    let end = start + a.warmup + a.duration;
    let mut late_us = Vec::new();
    let mut next: u64 = 0;
    loop {
        let due = due_at(&a, start, next);
        // The workers stop at the same two bounds, so every permit given is taken.
        if due >= end || a.requests.is_some_and(|n| next >= n) {
            guard.finished = true;
            return Ok(late_us);
        }
        let now = Instant::now();
        if due > now {
            timer.sleep(wake_at(start, due, a.pace) - now).await?;
            continue;
        }
        if due >= start + a.warmup {
            late_us.push((now - due).as_micros() as u64);
        }
        // `next % connections` is below `permits.len()`, which fits a usize.
        permits[(next % permits.len() as u64) as usize].add_permits(1);
        next += 1;
    }
}

/// When the global request `j` is due (fixed rate only).
fn due_at(a: &Args, start: Instant, j: u64) -> Instant {
    // f64 holds every j a run reaches exactly (below 2^53); `--rate` is checked in parse_args.
    start + Duration::from_secs_f64(j as f64 / a.rate)
}

/// When the pacer wakes for a request due at `due`: then, or with a quantum (`--pace-us`), at
/// the end of the quantum it falls in, counted from `start`, so that every request due within
/// one quantum goes out together (fewer wake-ups of the load generator, each request up to a
/// quantum late).
fn wake_at(start: Instant, due: Instant, quantum: Duration) -> Instant {
    let q = quantum.as_nanos();
    if q == 0 {
        return due;
    }
    let since = due.saturating_duration_since(start).as_nanos();
    start + Duration::from_nanos(u64::try_from(since.div_ceil(q) * q).unwrap_or(u64::MAX))
}

/// A one-shot `timerfd` on CLOCK_MONOTONIC (the clock of `Instant`), registered with the
/// runtime's reactor.
struct Timer(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl Timer {
    fn new() -> std::io::Result<Timer> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain system call; the descriptor it returns is owned from here on.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd stays open, the same descriptor, for as long as the AsyncFd
        // owns it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }?;
        Ok(Timer(fd))
    }

    /// Waits `d` (more than zero), relative to now.
    async fn sleep(&self, d: Duration) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                // Never 0 with tv_sec 0, which would disarm the timer instead.
                tv_nsec: d.subsec_nanos().max(1) as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec and the old value is not asked for.
        if unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        loop {
            let mut ready = self.0.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a buffer of 8.
            let n = unsafe { libc::read(self.0.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => ready.clear_ready(),
                std::io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }
}

async fn worker(
    a: Arc<Args>,
    id: usize,
    start: Instant,
    wall0_us: u128,
    paced: Option<Arc<tokio::sync::Semaphore>>,
) -> Tally {
    let mut t = Tally::default();
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    let mut k: u64 = 0;
    // When this connection's last answer was complete: a request due before then waits for
    // the connection, which is the proxy's doing, not the load generator's.
    let mut free_since = start;
    // This connection's share of `--requests`: the first `rem` connections take one more.
    let quota = a.requests.map(|n| {
        let c = a.connections as u64;
        n / c + u64::from((id as u64) < n % c)
    });
    let body: &'static [u8] = if a.method == "POST" {
        b"order=1&qty=2"
    } else {
        b""
    };
    loop {
        // Connection `id`'s k-th request is the global request `k * connections + id`.
        let due = match paced {
            Some(_) => due_at(&a, start, k * a.connections as u64 + id as u64),
            None => Instant::now(),
        };
        if due >= start + a.warmup + a.duration || quota.is_some_and(|q| k >= q) {
            break;
        }
        k += 1;
        if let Some(p) = &paced {
            // Closed only if the pacer failed: then this connection stops.
            match p.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        let counted = due >= start + a.warmup;
        let mut reconnected = false;
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                let s = TcpStream::connect(&a.addr).await.map_err(|_| "err")?;
                let _ = s.set_nodelay(true);
                let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .map_err(|_| "err")?;
                tokio::spawn(conn);
                sender = Some(tx);
                reconnected = true;
            }
            let tx = sender.as_mut().ok_or("err")?;
            tx.ready().await.map_err(|_| "err")?;
            if paced.is_some() && counted && !reconnected {
                // The load generator's own delay: from when the request was due and its
                // connection free, to its hand-off to hyper (on this one thread, hyper's
                // connection task writes it next).
                let since = due.max(free_since);
                t.send_late_us.push(since.elapsed().as_micros() as u64);
            }
            let mut b = Request::builder()
                .method(a.method.as_str())
                .uri(a.path.as_str())
                .header("host", a.host.as_str());
            if a.close {
                b = b.header("connection", "close");
            }
            let resp = tx
                .send_request(
                    b.body(Full::new(Bytes::from_static(body)))
                        .map_err(|_| "err")?,
                )
                .await
                .map_err(|_| "err")?;
            let status = resp.status().as_u16();
            let release = resp
                .headers()
                .get("x-demo-release")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            resp.into_body().collect().await.map_err(|_| "err")?;
            Ok::<_, &'static str>((status, release))
        })
        .await;
        let latency = due.elapsed().as_micros() as u64;
        free_since = Instant::now();
        let (label, release) = match outcome {
            _ if !counted => {
                // A warm-up request is not counted, unless it failed.
                if !matches!(outcome, Ok(Ok((status, _))) if (200..300).contains(&status)) {
                    t.warmup_failed += 1;
                    if !matches!(outcome, Ok(Ok(_))) {
                        sender = None;
                    }
                }
                (String::new(), String::new())
            }
            Ok(Ok((status, release))) => {
                if (200..300).contains(&status) {
                    t.ok += 1;
                } else {
                    t.non2xx += 1;
                }
                (status.to_string(), release)
            }
            Ok(Err(_)) => {
                t.errors += 1;
                sender = None;
                ("err".to_string(), "-".to_string())
            }
            Err(_) => {
                t.timeouts += 1;
                sender = None;
                ("timeout".to_string(), "-".to_string())
            }
        };
        if a.close {
            sender = None;
        }
        if !counted {
            continue;
        }
        t.latencies_us.push(latency);
        if a.records.is_some() {
            // Unix time of the due moment: in ms (the default), or in µs with --records-us.
            let due_us = wall0_us + (due - start).as_micros();
            let due = if a.records_us { due_us } else { due_us / 1000 };
            t.records.push((due, latency, label, release));
        }
    }
    t
}

/// The floor of `v`'s histogram bucket: exact below 128 µs, then 64 buckets per power of two, so
/// a bucket is at most 1/64 (1.6 %) of its values wide. Harnesses merge the buckets of several
/// runs to take one percentile over all their requests (`compare.py`'s pooled p99).
fn bucket(v: u64) -> u64 {
    if v < 128 {
        return v;
    }
    let shift = 63 - v.leading_zeros() - 6;
    (v >> shift) << shift
}

/// `[[bucket floor, count], ...]` of sorted latencies, in ascending order.
fn histogram(sorted: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &v in sorted {
        let b = bucket(v);
        match out.last_mut() {
            Some(last) if last[0] == b => last[1] += 1,
            _ => out.push([b, 1]),
        }
    }
    out
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let a = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("luma-loadgen: {e}");
            std::process::exit(2);
        }
    };
    // One worker thread, named so that a system-wide trace can tell it from a proxy's tokio
    // threads (`host_tail.py` leaves the load generator out by this name).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("luma-loadgen")
        .enable_all()
        .build();
    match rt {
        Ok(rt) => rt.block_on(run(a)),
        Err(e) => {
            eprintln!("luma-loadgen: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(a: Arc<Args>) {
    let wall0_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let start = Instant::now();
    let permits: Vec<_> = (0..a.connections)
        .map(|_| Arc::new(tokio::sync::Semaphore::new(0)))
        .collect();
    let paced = a.rate > 0.0;
    let pacer = paced.then(|| tokio::spawn(pace(a.clone(), start, permits.clone())));
    let tasks: Vec<_> = permits
        .into_iter()
        .enumerate()
        .map(|(i, p)| tokio::spawn(worker(a.clone(), i, start, wall0_us, paced.then_some(p))))
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        if let Ok(t) = t.await {
            all.latencies_us.extend(t.latencies_us);
            all.ok += t.ok;
            all.non2xx += t.non2xx;
            all.errors += t.errors;
            all.timeouts += t.timeouts;
            all.records.extend(t.records);
            all.warmup_failed += t.warmup_failed;
            all.send_late_us.extend(t.send_late_us);
        }
    }
    let elapsed = start.elapsed().saturating_sub(a.warmup).as_secs_f64();
    all.latencies_us.sort_unstable();
    let mut late_us = match pacer {
        None => Vec::new(),
        Some(p) => match p.await {
            Ok(Ok(late)) => late,
            Ok(Err(e)) => {
                eprintln!("luma-loadgen: the pacer's timer failed: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("luma-loadgen: the pacer failed: {e}");
                std::process::exit(1);
            }
        },
    };
    late_us.sort_unstable();
    all.send_late_us.sort_unstable();
    // null in the closed loop, where nothing is due.
    let late = |v: &[u64], p: f64| (!v.is_empty()).then(|| pct(v, p));
    if let Some(path) = &a.records {
        all.records.sort();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("records file"));
        for (due, lat, outcome, release) in &all.records {
            let _ = writeln!(f, "{due} {lat} {outcome} {release}");
        }
    }
    let sent = all.latencies_us.len();
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "ok": all.ok,
            "non_2xx": all.non2xx,
            "socket_errors": all.errors,
            "timeouts": all.timeouts,
            "seconds": elapsed,
            "warmup_s": a.warmup.as_secs_f64(),
            "warmup_failed": all.warmup_failed,
            "rps": sent as f64 / elapsed,
            "p50_us": pct(&all.latencies_us, 50.0),
            "p99_us": pct(&all.latencies_us, 99.0),
            "p999_us": pct(&all.latencies_us, 99.9),
            "max_us": all.latencies_us.last().copied().unwrap_or(0),
            "hist": histogram(&all.latencies_us),
            // Fixed rate only. pace_late: how late the pacer released the measured requests
            // after their due times. send_late: how long each waited on the load generator,
            // from when it was due and its connection free to its hand-off to hyper (pace_late
            // included; requests that reconnected first left out): the instrument's own part of
            // the latencies above.
            "pace_late_p50_us": late(&late_us, 50.0),
            "pace_late_p99_us": late(&late_us, 99.0),
            "pace_late_max_us": late_us.last(),
            "send_late_p50_us": late(&all.send_late_us, 50.0),
            "send_late_p99_us": late(&all.send_late_us, 99.0),
            "send_late_max_us": all.send_late_us.last(),
        })
    );
}

#[cfg(test)]
mod tests {
    use super::{bucket, histogram, local_link, wake_at};
    use std::time::{Duration, Instant};

    /// Exact pacing wakes at the due time; a quantum wakes at the end of the quantum the due
    /// time falls in (a due time on a boundary is that quantum's end, not the next one's).
    #[test]
    fn the_pacer_wakes_at_the_due_time_or_the_end_of_its_quantum() {
        let start = Instant::now();
        let at = |us| start + Duration::from_micros(us);
        let q = Duration::from_micros(250);
        assert_eq!(wake_at(start, at(1_234), Duration::ZERO), at(1_234));
        assert_eq!(wake_at(start, at(1), q), at(250));
        assert_eq!(wake_at(start, at(250), q), at(250));
        assert_eq!(wake_at(start, at(251), q), at(500));
        assert_eq!(wake_at(start, at(1_000_001), q), at(1_000_250));
        assert_eq!(wake_at(start, start, q), start);
    }
    use std::net::Ipv4Addr;

    /// A `/proc/net/route` line: addresses as the kernel prints them (hex of the value in host
    /// byte order).
    fn line(iface: &str, dest: [u8; 4], gateway: [u8; 4], mask: [u8; 4]) -> String {
        let hex = |a: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(a));
        format!(
            "{iface}\t{}\t{}\t0001\t0\t0\t0\t{}\t0\t0\t0\n",
            hex(dest),
            hex(gateway),
            hex(mask)
        )
    }

    /// A host with a default route via eth0, eth0's own /24, one Docker bridge on
    /// 10.210.3.0/24, a veth on 198.18.7.0/30, 198.19.0.0/16 through a gateway, and
    /// 198.0.0.0/8 directly on eth1.
    fn table() -> String {
        let mut t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
                .to_string();
        t += &line("eth0", [0, 0, 0, 0], [192, 168, 0, 1], [0, 0, 0, 0]);
        t += &line("eth0", [192, 168, 0, 0], [0; 4], [255, 255, 255, 0]);
        t += &line("br-1a2b", [10, 210, 3, 0], [0; 4], [255, 255, 255, 0]);
        t += &line("lsc1h", [198, 18, 7, 0], [0; 4], [255, 255, 255, 252]);
        t += &line("eth0", [198, 19, 0, 0], [192, 168, 0, 9], [255, 255, 0, 0]);
        t += &line("eth1", [198, 0, 0, 0], [0; 4], [255, 0, 0, 0]);
        t
    }

    #[test]
    fn buckets_are_exact_low_and_within_a_64th_above() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(127), 127);
        assert_eq!(bucket(128), 128);
        assert_eq!(bucket(255), 254, "128..256 is cut in steps of 2");
        assert_eq!(bucket(4_095), 4_064, "2048..4096 in steps of 32");
        for v in [128u64, 1_000, 4_321, 65_537, 5_000_000, u64::MAX] {
            let b = bucket(v);
            assert!(b <= v && v - b <= v / 64, "{v} -> {b}");
            assert_eq!(bucket(b), b, "a floor is its own bucket");
        }
        assert_eq!(
            histogram(&[3, 3, 200, 201, 5_000]),
            vec![[3, 2], [200, 2], [4_992, 1]]
        );
        assert!(histogram(&[]).is_empty());
    }

    fn bridged(iface: &str) -> bool {
        iface.starts_with("br-")
    }

    #[test]
    fn only_a_virtual_bridge_or_a_benchmark_link_counts() {
        let route = table();
        let ok = |ip: [u8; 4]| local_link(Ipv4Addr::from(ip), &route, bridged);
        assert!(ok([10, 210, 3, 2]), "a container on the bridge");
        assert!(!ok([10, 210, 4, 2]), "the next subnet is on no bridge");
        assert!(
            !ok([192, 168, 0, 7]),
            "eth0's subnet is directly attached but no bridge"
        );
        assert!(!ok([8, 8, 8, 8]), "the default route has a gateway");
        assert!(ok([198, 18, 7, 1]), "the benchmark link, directly attached");
        assert!(
            !ok([198, 19, 0, 5]),
            "benchmark addresses through a gateway"
        );
        assert!(
            !ok([198, 1, 2, 3]),
            "a direct link wider than the benchmark range"
        );
        assert!(!local_link(Ipv4Addr::new(10, 210, 3, 2), "", bridged));
        // A more specific route through a gateway wins over the bridge, as in the kernel.
        let route = route + &line("eth0", [10, 210, 3, 9], [192, 168, 0, 1], [255; 4]);
        assert!(!local_link(Ipv4Addr::new(10, 210, 3, 9), &route, bridged));
        assert!(local_link(Ipv4Addr::new(10, 210, 3, 2), &route, bridged));
    }
}
