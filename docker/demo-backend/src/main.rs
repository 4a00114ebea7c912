//! luma-demo-backend: a tiny HTTP/1.1 server that says who it is.
//!
//! It exists for tests, demos and benchmarks, so it has no dependencies and builds as a static
//! binary for a `FROM scratch` image in seconds. One thread per connection, keep-alive.
//!
//! Environment: `PORT` (3000), `LUMA_PROJECT`, `LUMA_APP`, `LUMA_RELEASE`, `DEMO_DEFAULT_SIGNALS=1`
//! (no SIGTERM handler, so as PID 1 it ignores SIGTERM), `DEMO_UNHEALTHY=1`
//! (start failing `/up`), `DEMO_DELAY_MS` (slow every request), `DEMO_BODY_BYTES` (answer `/`
//! with this many bytes instead of JSON; the benchmark backend uses 1024), `DEMO_IDLE_CLOSE_MS`
//! (close a keep-alive connection that waits this long for its next request, like Node's
//! `keepAliveTimeout` or gunicorn's `--keep-alive`; unset or 0 keeps it open).
//!
//! Paths: `/up` health; `/_demo/unhealthy` and `/_demo/healthy` flip `/up` at runtime;
//! `/_demo/headers` answers the request's header lines as the app received them;
//! `/bytes/N` answers N bytes; `?delay_ms=N` on any path sleeps first; anything else answers
//! JSON with project, app, release, hostname, method, path and the request body length.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Identity {
    project: String,
    app: String,
    release: String,
    hostname: String,
    delay: Duration,
    /// Keep-alive idle limit between requests (None: wait forever).
    idle_close: Option<Duration>,
    fixed_body: Option<Vec<u8>>,
    unhealthy: AtomicBool,
}

fn env(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

fn main() {
    // As PID 1 in a container, SIGTERM is ignored unless handled: exit at once so `docker stop`
    // does not wait for its grace period. `DEMO_DEFAULT_SIGNALS=1` leaves the default
    // dispositions instead, like the many real apps (busybox httpd, naive servers) that never
    // handle SIGTERM and so ignore it as PID 1.
    if env("DEMO_DEFAULT_SIGNALS", "") != "1" {
        // SAFETY: installing a handler that only calls an async-signal-safe function.
        unsafe {
            libc::signal(libc::SIGTERM, exit_now as *const () as libc::sighandler_t);
            libc::signal(libc::SIGINT, exit_now as *const () as libc::sighandler_t);
        }
    }
    let port = env("PORT", "3000");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let id = Arc::new(Identity {
        project: env("LUMA_PROJECT", "demo"),
        app: env("LUMA_APP", "web"),
        release: env("LUMA_RELEASE", "dev"),
        hostname,
        delay: Duration::from_millis(env("DEMO_DELAY_MS", "0").parse().unwrap_or(0)),
        idle_close: env("DEMO_IDLE_CLOSE_MS", "")
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis),
        fixed_body: env("DEMO_BODY_BYTES", "")
            .parse::<usize>()
            .ok()
            .map(|n| vec![b'x'; n]),
        unhealthy: AtomicBool::new(env("DEMO_UNHEALTHY", "") == "1"),
    });
    let addr = env("BIND", "0.0.0.0");
    let listener = match TcpListener::bind(format!("{addr}:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("luma-demo-backend: cannot listen on {addr}:{port}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "luma-demo-backend {}/{} release {} listening on {addr}:{port}",
        id.project, id.app, id.release
    );
    for stream in listener.incoming().flatten() {
        let id = id.clone();
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let _ = serve(stream, &id);
        });
    }
}

fn serve(stream: TcpStream, id: &Identity) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if let Some(idle) = id.idle_close {
            // Wait at most `idle` for the next request, then close (with a timer as precise
            // as Node's). Bytes that arrive just too late are answered by the kernel with a
            // reset: the race a proxy must not lose a POST to.
            if reader.buffer().is_empty() && !wait_readable(reader.get_ref(), idle)? {
                return Ok(());
            }
        }
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("/").to_string(),
        );
        let (mut length, mut chunked, mut close) = (0usize, false, false);
        // The request's header lines as received, for `/_demo/headers`.
        let mut received = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            received.push_str(h);
            received.push('\n');
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                match k.as_str() {
                    "content-length" => length = v.parse().unwrap_or(0),
                    "transfer-encoding" => chunked = v.contains("chunked"),
                    "connection" => close = v.contains("close"),
                    _ => {}
                }
            }
        }
        let body_len = if chunked {
            read_chunked(&mut reader)?
        } else {
            discard(&mut reader, length)?
        };
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let delay = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("delay_ms="))
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(id.delay);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let (status, ctype, body): (&str, &str, Vec<u8>) = match path {
            "/up" if id.unhealthy.load(Ordering::Relaxed) => ("503 Service Unavailable", "text/plain", b"unhealthy\n".to_vec()),
            "/up" => ("200 OK", "text/plain", b"ok\n".to_vec()),
            "/_demo/unhealthy" => {
                id.unhealthy.store(true, Ordering::Relaxed);
                ("200 OK", "text/plain", b"now unhealthy\n".to_vec())
            }
            "/_demo/healthy" => {
                id.unhealthy.store(false, Ordering::Relaxed);
                ("200 OK", "text/plain", b"now healthy\n".to_vec())
            }
            "/_demo/headers" => ("200 OK", "text/plain", received.into_bytes()),
            p if p.starts_with("/bytes/") => {
                let n = p["/bytes/".len()..].parse().unwrap_or(0usize).min(64 << 20);
                ("200 OK", "application/octet-stream", vec![b'x'; n])
            }
            _ => match &id.fixed_body {
                Some(b) => ("200 OK", "text/plain", b.clone()),
                None => (
                    "200 OK",
                    "application/json",
                    format!(
                        "{{\"project\":\"{}\",\"app\":\"{}\",\"release\":\"{}\",\"hostname\":\"{}\",\"method\":\"{}\",\"path\":\"{}\",\"body_bytes\":{}}}\n",
                        esc(&id.project), esc(&id.app), esc(&id.release), esc(&id.hostname), esc(&method), esc(path), body_len
                    )
                    .into_bytes(),
                ),
            },
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nx-demo-release: {}\r\n{}\r\n",
            body.len(),
            id.release,
            if close { "connection: close\r\n" } else { "" }
        );
        // One write for head and body: a replica killed mid-response (the tests kill replicas
        // under load) then either sent the whole response or none of it, never a head whose
        // body is cut, which no proxy could retry.
        let mut response = head.into_bytes();
        if method != "HEAD" {
            response.extend_from_slice(&body);
        }
        out.write_all(&response)?;
        if close {
            return Ok(());
        }
    }
}

/// Waits until `stream` has bytes to read (or its peer closed): false after `timeout`.
fn wait_readable(stream: &TcpStream, timeout: Duration) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(libc::c_int::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: one valid pollfd that outlives the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn discard(r: &mut impl Read, n: usize) -> std::io::Result<usize> {
    std::io::copy(&mut r.take(n as u64), &mut std::io::sink()).map(|c| c as usize)
}

fn read_chunked(r: &mut BufReader<TcpStream>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let n =
            usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        if n == 0 {
            // Trailers end with an empty line.
            loop {
                let mut t = String::new();
                if r.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                    return Ok(total);
                }
            }
        }
        total += discard(r, n)?;
        let mut crlf = String::new();
        r.read_line(&mut crlf)?;
    }
}
