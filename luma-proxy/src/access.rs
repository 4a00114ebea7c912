//! The access log: one JSON line per request on stdout, written by a thread of its own.
//!
//! Why a thread: in a container, stdout is a pipe that the engine drains (containerd's shim,
//! then dockerd's log driver). When the engine falls behind, the pipe's 64 KiB fill in a few
//! hundred lines and every further `write` blocks. Written from the request path, as before,
//! that stalled a serving thread and every connection on it: the request waited on the
//! engine's logging. Now a request only appends its line to a buffer in memory, and this
//! module's thread writes the buffer out in batches, one `write` for many lines.
//!
//! The buffer is bounded ([`AccessLog::new`]'s `limit`, `--access-log-buffer`): when the
//! reader stays behind past it, whole lines are dropped, never parts of one, and counted in
//! `luma_proxy_access_log_dropped_lines_total` at once. At most about twice the limit is held:
//! the lines waiting and the batch being written. A warning goes to stderr at most every
//! [`WARN_EVERY`], from the writer thread once a write returns; in a container stderr is
//! drained by the same engine, so while it is stuck the counter is what shows it.
//!
//! On shutdown [`AccessLog::close`] writes what is buffered, waiting for the reader for a
//! bounded time; the lines it does not take by then are counted as dropped. A panic (the
//! release build aborts) loses the lines in memory: at most [`GATHER`]'s worth while the reader
//! keeps up.

use prometheus_client::metrics::counter::Counter;
use serde::ser::{Serialize, SerializeMap, Serializer};
use std::cell::RefCell;
use std::fmt::Display;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Default bound of the lines waiting for stdout (about 9,000 lines of 230 bytes).
pub const DEFAULT_LIMIT: usize = 2 << 20;
/// The smallest bound taken: below it, batches would be too small to keep up.
pub const MIN_LIMIT: usize = 4 << 10;
/// Lines gather this long before a write, unless [`FLUSH_BYTES`] of them come sooner.
const GATHER: Duration = Duration::from_millis(50);
/// A batch this large is written at once (half of a Linux pipe's default capacity), or half
/// the limit if that is smaller.
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
    /// How many lines `lines` holds.
    count: u64,
    /// No more lines are taken; the writer writes what is here and ends.
    closing: bool,
    /// The writer has ended.
    done: bool,
    /// Lines of the batch the writer is writing now.
    in_flight: u64,
    /// [`AccessLog::close`] gave up waiting and counted every line not written yet: the
    /// writer counts none of them again.
    abandoned: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// The writer waits on it for lines (and for `closing`).
    ready: Condvar,
    /// [`AccessLog::close`] waits on it for `done`.
    finished: Condvar,
    limit: usize,
    /// A batch this large is written without waiting out [`GATHER`].
    flush_at: usize,
    dropped: Counter,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing that can panic runs under this lock (an append into reserved room, a swap),
        // so a poisoned lock still holds whole lines.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

thread_local! {
    /// Each serving thread's line is serialized here, outside the shared lock.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The access log of one proxy. Dropping it lets the writer write what is waiting and end,
/// without waiting for it; [`AccessLog::close`] waits.
pub struct AccessLog {
    shared: Arc<Shared>,
}

impl AccessLog {
    /// Lines go to the process's stdout (a duplicate of fd 1, written unbuffered).
    pub fn stdout(limit: usize, dropped: Counter) -> std::io::Result<AccessLog> {
        use std::os::fd::AsFd;
        let out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
        AccessLog::new(Box::new(out), limit, dropped)
    }

    /// Lines go to `sink` from a new thread. At most `limit` bytes of lines (at least
    /// [`MIN_LIMIT`]) wait for it, besides the batch it is writing; the lines past that are
    /// dropped and counted in `dropped`.
    pub fn new(
        sink: Box<dyn Write + Send>,
        limit: usize,
        dropped: Counter,
    ) -> std::io::Result<AccessLog> {
        let limit = limit.max(MIN_LIMIT);
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            ready: Condvar::new(),
            finished: Condvar::new(),
            limit,
            flush_at: FLUSH_BYTES.min(limit / 2),
            dropped,
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_out(&writer, sink))?;
        Ok(AccessLog { shared })
    }

    /// Queues one line; never waits for the sink.
    pub fn write(&self, line: &AccessLine<'_>) {
        let ts = crate::log::ts();
        LINE.with_borrow_mut(|buf| {
            buf.clear();
            // Serializing borrowed strings and numbers into a Vec does not fail; were it to,
            // the line is counted as dropped like any other line not written.
            if serde_json::to_writer(&mut *buf, &Stamped { ts, line }).is_err() {
                self.shared.dropped.inc();
                return;
            }
            buf.push(b'\n');
            self.append(buf);
            // A line with a huge path (a head may hold 64 KiB) leaves no large buffer behind.
            if buf.capacity() > 16 << 10 {
                *buf = Vec::new();
            }
        });
    }

    /// Appends one serialized line, or drops it when the buffer is full or closed.
    fn append(&self, line: &[u8]) {
        let sh = &self.shared;
        let mut p = sh.lock();
        let len = p.lines.len();
        if p.closing || len + line.len() > sh.limit {
            drop(p);
            sh.dropped.inc();
            return;
        }
        // Grow by doubling, but never past the limit: 2 MiB of lines is a 2 MiB buffer.
        if p.lines.capacity() - len < line.len() {
            let want = (p.lines.capacity() * 2).clamp(len + line.len(), sh.limit);
            p.lines.reserve_exact(want - len);
        }
        p.lines.extend_from_slice(line);
        p.count += 1;
        // Wake the writer for the first line of a batch and when a batch is full; in
        // between it is gathering and needs no wake-up per line.
        let wake = len == 0 || (len < sh.flush_at && p.lines.len() >= sh.flush_at);
        drop(p);
        if wake {
            sh.ready.notify_one();
        }
    }

    /// Lines dropped so far because the sink did not take them (or after closing).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.get()
    }

    /// Stops taking lines and waits, for at most `within`, for the writer to write the ones
    /// waiting and end (a reader of stdout that never returns cannot hold a shutdown). Lines
    /// still unwritten then are counted as dropped, with a warning. True when all went out.
    pub fn close(&self, within: Duration) -> bool {
        let sh = &self.shared;
        let deadline = Instant::now() + within;
        let mut p = sh.lock();
        p.closing = true;
        sh.ready.notify_one();
        while !p.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            p = sh
                .finished
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if p.done {
            return true;
        }
        // Everything not known to be written is counted now, once: the lines waiting are
        // let go, and the batch the writer holds (it may still go out) is not counted again.
        let lost = p.count + p.in_flight;
        p.lines = Vec::new();
        p.count = 0;
        p.abandoned = true;
        drop(p);
        if lost == 0 {
            return true;
        }
        sh.dropped.inc_by(lost);
        crate::log::warn(
            "access log lines not written at shutdown: stdout did not take them in time",
            serde_json::json!({"lines": lost, "waited_ms": within.as_millis() as u64}),
        );
        false
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.ready.notify_one();
    }
}

/// The writer thread: takes the waiting lines as one batch and writes them, until closed.
fn write_out(sh: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut batch = Vec::new();
    let mut report = Report::default();
    // The last write stopped inside a line: the next batch starts on a new line.
    let mut cut = false;
    loop {
        let closing = {
            let mut p = sh.lock();
            if p.lines.is_empty() && !p.closing {
                // Wait for lines, or until a warning held back by its pace is due.
                p = match report.due_in(sh.dropped.get()) {
                    Some(t) => {
                        sh.ready
                            .wait_timeout(p, t)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                    None => sh.ready.wait(p).unwrap_or_else(PoisonError::into_inner),
                };
            }
            if !p.lines.is_empty() && !p.closing && p.lines.len() < sh.flush_at {
                p = sh
                    .ready
                    .wait_timeout(p, GATHER)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut p.lines, &mut batch);
            p.in_flight = std::mem::take(&mut p.count);
            p.closing
        };
        let failed = if batch.is_empty() {
            None
        } else {
            write_batch(&mut *sink, &batch, &mut cut).err()
        };
        {
            let mut p = sh.lock();
            p.in_flight = 0;
            if let Some((lost, e)) = failed {
                if !p.abandoned {
                    sh.dropped.inc_by(lost);
                }
                report.failed(e);
            }
            if closing {
                // Before the last warning: stderr may be as stuck as stdout was.
                p.done = true;
                sh.finished.notify_all();
            }
        }
        batch.clear();
        if batch.capacity() > KEEP_BYTES {
            batch.shrink_to(KEEP_BYTES);
        }
        report.warn_if_due(sh.dropped.get(), closing);
        if closing {
            return;
        }
    }
}

/// Writes a batch of whole lines. On an error, the lines not wholly written are returned as
/// lost. `cut` says the last write stopped inside a line: this batch then starts with the
/// newline that ends it, and if even that fails, the whole batch is lost.
fn write_batch(
    sink: &mut dyn Write,
    batch: &[u8],
    cut: &mut bool,
) -> Result<(), (u64, std::io::Error)> {
    let lines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count() as u64;
    if *cut {
        write_all(sink, b"\n").map_err(|(_, e)| (lines(batch), e))?;
        *cut = false;
    }
    write_all(sink, batch).map_err(|(written, e)| {
        if written > 0 {
            *cut = batch[written - 1] != b'\n';
        }
        (lines(&batch[written..]), e)
    })?;
    let _ = sink.flush();
    Ok(())
}

/// `write_all`, waiting out a non-blocking stdout as a blocking one would be waited for; on
/// an error, how much was written.
fn write_all(sink: &mut dyn Write, buf: &[u8]) -> Result<(), (usize, std::io::Error)> {
    use std::io::ErrorKind;
    let mut written = 0;
    while written < buf.len() {
        match sink.write(&buf[written..]) {
            Ok(0) => return Err((written, ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

/// The pace of the warnings about dropped lines: at most one per [`WARN_EVERY`], and one at
/// close for any not reported yet.
#[derive(Default)]
struct Report {
    /// The dropped count the last warning covered.
    reported: u64,
    last: Option<Instant>,
    write_errors: u64,
    last_error: Option<String>,
}

impl Report {
    fn failed(&mut self, e: std::io::Error) {
        self.write_errors += 1;
        self.last_error = Some(e.to_string());
    }

    /// With drops not reported yet, how long until a warning may be given.
    fn due_in(&self, dropped: u64) -> Option<Duration> {
        (dropped > self.reported).then(|| match self.last {
            Some(t) => WARN_EVERY.saturating_sub(t.elapsed()),
            None => Duration::ZERO,
        })
    }

    fn warn_if_due(&mut self, dropped: u64, closing: bool) {
        match self.due_in(dropped) {
            Some(t) if t.is_zero() || closing => {}
            _ => return,
        }
        crate::log::warn(
            "access log lines dropped: stdout did not take them (its reader fell behind, or writing failed)",
            serde_json::json!({
                "dropped": dropped - self.reported,
                "dropped_total": dropped,
                "write_errors": self.write_errors,
                "last_write_error": self.last_error,
            }),
        );
        self.reported = dropped;
        self.last = Some(Instant::now());
        self.write_errors = 0;
        self.last_error = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Long enough for any sink here that is not held.
    const WAIT: Duration = Duration::from_secs(30);

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
        assert!(log.close(WAIT));
        let writes: Vec<_> = rx.try_iter().collect();
        let raw = String::from_utf8(writes.concat()).unwrap();
        // The fields in the order the proxy always wrote them (a `Value` would sort them).
        let tail = raw.split_once(',').unwrap().1;
        assert!(
            tail.starts_with(r#""host":"a.test","method":"GET","path":"/a?b=\"c\"","status":200,"duration_us":7,"route":"shop/web","backend":"10.1.0.2:3000","client":"198.51.100.7"}"#),
            "{raw}"
        );
        assert!(raw.starts_with(r#"{"ts":"#), "{raw}");
        let got = lines(&writes);
        assert_eq!(got.len(), 1);
        let l = &got[0];
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
        assert!(log.close(WAIT));
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
        assert!(log.close(WAIT));
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
        assert!(log.close(WAIT));
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
        assert!(log.close(WAIT));
        assert_eq!(log.dropped(), 3);
        // Closed: later lines are counted, not kept.
        log.write(&line("/late"));
        assert_eq!(log.dropped(), 4);
    }

    #[test]
    fn a_write_that_fails_inside_a_line_counts_that_line_and_the_next_batch_starts_afresh() {
        /// Takes `room` bytes, then fails one write, then takes everything.
        struct Short {
            room: usize,
            failed: bool,
            out: Vec<u8>,
        }
        impl Write for Short {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if !self.failed && self.room == 0 {
                    self.failed = true;
                    return Err(std::io::ErrorKind::StorageFull.into());
                }
                let n = if self.failed {
                    b.len()
                } else {
                    b.len().min(self.room)
                };
                self.room -= n.min(self.room);
                self.out.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let json = |path: &str| {
            let mut l = serde_json::to_vec(&Stamped {
                ts: 1.5,
                line: &line(path),
            })
            .unwrap();
            l.push(b'\n');
            l
        };
        let first = [json("/0"), json("/1"), json("/2")].concat();
        let one = json("/0").len();
        let mut sink = Short {
            room: one + one / 2,
            failed: false,
            out: Vec::new(),
        };
        let mut cut = false;
        let (lost, _) = write_batch(&mut sink, &first, &mut cut).unwrap_err();
        assert_eq!(lost, 2, "the cut line and the one never written");
        assert!(cut);
        write_batch(&mut sink, &json("/3"), &mut cut).unwrap();
        assert!(!cut);
        let out = String::from_utf8(sink.out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[0].as_bytes(), &json("/0")[..one - 1]);
        assert!(serde_json::from_str::<serde_json::Value>(lines[1]).is_err());
        assert_eq!(lines[2].as_bytes(), &json("/3")[..one - 1]);
        assert!(out.ends_with('\n'));
    }

    #[test]
    fn close_gives_up_on_a_sink_that_never_takes_its_lines_and_counts_them_once() {
        let (log, rx, gate) = log(DEFAULT_LIMIT);
        let held = gate.lock().unwrap();
        for i in 0..10 {
            log.write(&line(&format!("/{i}")));
        }
        assert!(!log.close(Duration::from_millis(200)));
        assert_eq!(log.dropped(), 10);
        // The sink comes back: the writer ends, and counts none of them again.
        drop(held);
        while !log.shared.lock().done {
            std::thread::yield_now();
        }
        let written = lines(&rx.try_iter().collect::<Vec<_>>()).len();
        assert!(written <= 10, "{written}");
        assert_eq!(log.dropped(), 10);
    }
}
