//! The access log: one JSON line per request on stdout, written by a thread of its own.
//!
//! Why a thread: in a container, stdout is a pipe that the engine drains (containerd's shim,
//! then dockerd's log driver). When the engine falls behind, the pipe's 64 KiB fill in a few
//! hundred lines and every further `write` blocks. Written from the request path, as before,
//! that stalled a serving thread and every connection on it: the request waited on the
//! engine's logging. Now a request only appends its line to a buffer in memory, and this
//! module's thread writes the buffer out in batches, one `write` for many lines.
//!
//! The buffer is bounded ([`AccessLog::new`]'s `limit`): when the reader stays behind past it,
//! whole lines are dropped, never parts of one, and counted in
//! `luma_proxy_access_log_dropped_lines_total`, with a warning on stderr at most every
//! [`WARN_EVERY`]. Requests never wait for the log. On shutdown [`AccessLog::close`] writes
//! what is buffered (and waits for the reader to take it).

use prometheus_client::metrics::counter::Counter;
use serde::ser::{Serialize, SerializeMap, Serializer};
use std::fmt::Display;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default bound of the lines waiting for stdout (about 9,000 lines of 230 bytes).
pub const DEFAULT_LIMIT: usize = 2 << 20;
/// Lines gather this long before a write, unless [`FLUSH_BYTES`] of them come sooner.
const GATHER: Duration = Duration::from_millis(50);
/// A batch this large is written at once (half of a Linux pipe's default capacity).
const FLUSH_BYTES: usize = 32 << 10;
/// The writer's spare buffer is cut back to this after a burst, so an idle proxy holds little.
const KEEP_BYTES: usize = 64 << 10;
/// The shortest time between two warnings about dropped lines.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// One request's line. Every field borrows: building a line allocates nothing.
pub struct AccessLine<'a> {
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration_us: u64,
    /// The route's project and app (`project/app` in the line).
    pub route: Option<(&'a str, &'a str)>,
    pub backend: Option<SocketAddr>,
    pub client: IpAddr,
}

/// A value written through its `Display`, as a JSON string.
struct Shown<T>(T);

impl<T: Display> Serialize for Shown<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

struct RouteName<'a>(&'a str, &'a str);

impl Display for RouteName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// The line with its timestamp, in the field order of the proxy's earlier lines.
struct Stamped<'a> {
    ts: f64,
    line: &'a AccessLine<'a>,
}

impl Serialize for Stamped<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let l = self.line;
        let mut m = s.serialize_map(Some(9))?;
        m.serialize_entry("ts", &self.ts)?;
        m.serialize_entry("host", l.host)?;
        m.serialize_entry("method", l.method)?;
        m.serialize_entry("path", l.path)?;
        m.serialize_entry("status", &l.status)?;
        m.serialize_entry("duration_us", &l.duration_us)?;
        m.serialize_entry("route", &l.route.map(|(p, a)| Shown(RouteName(p, a))))?;
        m.serialize_entry("backend", &l.backend.map(Shown))?;
        m.serialize_entry("client", &Shown(l.client))?;
        m.end()
    }
}

#[derive(Default)]
struct Pending {
    /// Whole lines, each ending in `\n`, not yet handed to the writer.
    lines: Vec<u8>,
    closing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    limit: usize,
    dropped: Counter,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves whole lines or a cut one at the end; the
        // writer still writes them, which beats losing the log.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The access log of one proxy. Dropping it closes it.
pub struct AccessLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AccessLog {
    /// Lines go to the process's stdout (a duplicate of fd 1, written unbuffered).
    pub fn stdout(limit: usize, dropped: Counter) -> std::io::Result<AccessLog> {
        use std::os::fd::AsFd;
        let out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
        AccessLog::new(Box::new(out), limit, dropped)
    }

    /// Lines go to `sink` from a new thread. At most about `limit` bytes of lines wait for it;
    /// the lines past that are dropped and counted in `dropped`.
    pub fn new(
        sink: Box<dyn Write + Send>,
        limit: usize,
        dropped: Counter,
    ) -> std::io::Result<AccessLog> {
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            ready: Condvar::new(),
            limit,
            dropped,
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_out(&shared, sink))?
        };
        Ok(AccessLog {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues one line; never blocks on the sink.
    pub fn write(&self, line: &AccessLine<'_>) {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut p = self.shared.lock();
        if p.closing || p.lines.len() >= self.shared.limit {
            drop(p);
            self.shared.dropped.inc();
            return;
        }
        let was_empty = p.lines.is_empty();
        let start = p.lines.len();
        // Serializing borrowed strings and numbers into a Vec cannot fail; if it ever did,
        // the part written is cut off so that only whole lines are kept.
        if serde_json::to_writer(&mut p.lines, &Stamped { ts, line }).is_err() {
            p.lines.truncate(start);
            return;
        }
        p.lines.push(b'\n');
        // Wake the writer for the first line of a batch and when a batch is full; in
        // between it is gathering and needs no wake-up per line.
        let full = start < FLUSH_BYTES && p.lines.len() >= FLUSH_BYTES;
        drop(p);
        if was_empty || full {
            self.shared.ready.notify_one();
        }
    }

    /// Lines dropped so far because the sink did not keep up (or failed).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.get()
    }

    /// Stops taking lines, writes the ones waiting, and ends the writer thread. Blocks until
    /// the sink has taken them (call it from a thread that may block).
    pub fn close(&self) {
        self.shared.lock().closing = true;
        self.shared.ready.notify_one();
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: takes the waiting lines as one batch and writes them, until closed.
fn write_out(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut batch = Vec::new();
    let mut reported = 0u64;
    let mut last_warning: Option<Instant> = None;
    loop {
        let closing = {
            let mut p = shared.lock();
            while p.lines.is_empty() && !p.closing {
                p = shared.ready.wait(p).unwrap_or_else(PoisonError::into_inner);
            }
            if !p.closing && p.lines.len() < FLUSH_BYTES {
                p = shared
                    .ready
                    .wait_timeout(p, GATHER)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut p.lines, &mut batch);
            p.closing
        };
        if !batch.is_empty() {
            if let Err(e) = sink.write_all(&batch).and_then(|()| sink.flush()) {
                // The lines of a failed write are lost (some may have gone out): count them.
                let lines = batch.iter().filter(|&&b| b == b'\n').count();
                shared.dropped.inc_by(lines as u64);
                crate::log::warn(
                    "access log write failed",
                    serde_json::json!({"error": e.to_string(), "lines": lines}),
                );
            }
            batch.clear();
            if batch.capacity() > KEEP_BYTES {
                batch.shrink_to(KEEP_BYTES);
            }
        }
        let dropped = shared.dropped.get();
        if dropped > reported && last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            crate::log::warn(
                "access log lines dropped: stdout is not read fast enough",
                serde_json::json!({"dropped": dropped - reported, "dropped_total": dropped}),
            );
            reported = dropped;
            last_warning = Some(Instant::now());
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn line(path: &str) -> AccessLine<'_> {
        AccessLine {
            host: "a.test",
            method: "GET",
            path,
            status: 200,
            duration_us: 7,
            route: Some(("shop", "web")),
            backend: Some("10.1.0.2:3000".parse().unwrap()),
            client: "198.51.100.7".parse().unwrap(),
        }
    }

    /// A sink that hands each write to the test, and blocks while `gate` holds its lock.
    struct Sink {
        writes: mpsc::Sender<Vec<u8>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            let _ = self.writes.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log(limit: usize) -> (AccessLog, mpsc::Receiver<Vec<u8>>, Arc<Mutex<()>>) {
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new(Mutex::new(()));
        let sink = Sink {
            writes: tx,
            gate: gate.clone(),
        };
        let log = AccessLog::new(Box::new(sink), limit, Counter::default()).unwrap();
        (log, rx, gate)
    }

    fn lines(writes: &[Vec<u8>]) -> Vec<serde_json::Value> {
        let all: Vec<u8> = writes.concat();
        assert_eq!(all.last(), Some(&b'\n'), "every write ends a line");
        all.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("each line is one JSON object"))
            .collect()
    }

    #[test]
    fn a_line_has_the_fields_of_the_earlier_format() {
        let (log, rx, _gate) = log(DEFAULT_LIMIT);
        log.write(&line("/a?b=\"c\""));
        log.close();
        let got = lines(&rx.try_iter().collect::<Vec<_>>());
        assert_eq!(got.len(), 1);
        let l = &got[0];
        let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "backend",
                "client",
                "duration_us",
                "host",
                "method",
                "path",
                "route",
                "status",
                "ts"
            ]
        );
        assert_eq!(l["path"], "/a?b=\"c\"");
        assert_eq!(l["route"], "shop/web");
        assert_eq!(l["backend"], "10.1.0.2:3000");
        assert_eq!(l["client"], "198.51.100.7");
        assert_eq!(l["status"], 200);
        assert!(l["ts"].as_f64().unwrap() > 1.7e9);
        let local = AccessLine {
            route: None,
            backend: None,
            ..line("/")
        };
        let (log, rx, _gate) = self::log(DEFAULT_LIMIT);
        log.write(&local);
        log.close();
        let got = lines(&rx.try_iter().collect::<Vec<_>>());
        assert!(got[0]["route"].is_null() && got[0]["backend"].is_null());
    }

    #[test]
    fn lines_written_close_together_go_out_in_one_write() {
        let (log, rx, gate) = log(DEFAULT_LIMIT);
        // Hold the sink so that every line below waits for the same batch.
        let held = gate.lock().unwrap();
        for i in 0..100 {
            log.write(&line(&format!("/{i}")));
        }
        drop(held);
        log.close();
        let writes: Vec<_> = rx.try_iter().collect();
        let got = lines(&writes);
        assert_eq!(got.len(), 100);
        assert!(
            writes.len() <= 2,
            "{} writes for 100 lines gathered together",
            writes.len()
        );
        let paths: Vec<String> = got.iter().map(|l| l["path"].to_string()).collect();
        let want: Vec<String> = (0..100).map(|i| format!("\"/{i}\"")).collect();
        assert_eq!(paths, want, "in order");
    }

    #[test]
    fn a_stalled_sink_never_blocks_a_writer_and_drops_whole_lines_past_the_limit() {
        let (log, rx, gate) = log(4096);
        let held = gate.lock().unwrap();
        // The first line wakes the writer, which then blocks in the sink with it (or with a
        // few); the rest fill the buffer to its limit and the others are dropped.
        for i in 0..1000 {
            log.write(&line(&format!("/{i}")));
        }
        // At most two buffers' worth are kept: the batch the writer took before it blocked,
        // and the one filled behind it (a line is at least 150 bytes).
        let dropped = log.dropped();
        assert!(dropped >= 1000 - 2 * (4096 / 150 + 1), "{dropped} dropped");
        drop(held);
        log.close();
        let got = lines(&rx.try_iter().collect::<Vec<_>>());
        assert_eq!(
            got.len() as u64 + dropped,
            1000,
            "every line kept or counted"
        );
        // The lines kept are whole, in order, from the first one on.
        let kept: Vec<u64> = got
            .iter()
            .map(|l| l["path"].as_str().unwrap()[1..].parse().unwrap())
            .collect();
        assert_eq!(kept[0], 0);
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");
    }

    #[test]
    fn a_failing_sink_counts_its_lines_as_dropped() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = AccessLog::new(Box::new(Broken), DEFAULT_LIMIT, Counter::default()).unwrap();
        for i in 0..3 {
            log.write(&line(&format!("/{i}")));
        }
        log.close();
        assert_eq!(log.dropped(), 3);
        // Closed: later lines are counted, not kept.
        log.write(&line("/late"));
        assert_eq!(log.dropped(), 4);
    }
}
