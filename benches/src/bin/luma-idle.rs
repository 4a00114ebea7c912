//! luma-idle: holds many idle client connections open through a proxy, for `benches/idle.py`
//! (memory per idle connection, issue 12).
//!
//! `luma-idle open --addr 127.0.0.1:PORT --mode h1|h2|ws --count N` opens N connections,
//! `--concurrency` at a time (so the proxy needs only a small upstream pool, as under a real
//! trickle of clients), and on each one makes ONE exchange and then leaves it idle:
//! - `h1`: one keep-alive HTTP/1.1 GET, the whole response read (Content-Length or chunked);
//! - `h2`: HTTP/2 with prior knowledge (h2c, hyper's client), one GET, the whole body read;
//! - `ws`: a WebSocket handshake (`Upgrade: websocket`, `Sec-WebSocket-Key`), a `101` whose
//!   `Sec-WebSocket-Accept` must match, and then the tunnel stays open.
//!
//! The harness then drives it line by line on stdin, and it answers one JSON line per command
//! on stdout, so that the harness can sample the proxy's memory between the steps:
//! - `check`: without sending a byte, is every connection still open? A raw socket is read
//!   without blocking (would-block: open; end of file, reset or unexpected bytes: closed by the
//!   proxy); an h2 connection is closed once hyper's connection task has ended.
//! - `verify`: one more exchange on every connection (a second GET, or a masked WebSocket text
//!   frame that must come back), proving each one still reaches the backend.
//! - `close`: closes them all. End of input does the same and exits.
//!
//! `luma-idle ws-backend --listen 127.0.0.1:PORT` is the backend for the `ws` rows, since
//! `luma-demo-backend` has no upgrades: it answers the WebSocket handshake (RFC 6455 accept key)
//! and then echoes every frame it gets back unmasked; any other request gets `200 ok`, kept
//! alive (the proxies' health checks).
//!
//! Only 127.0.0.0/8 addresses are accepted: load never leaves this machine.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Bound on one connection's open (connect and first exchange) or verify step: a proxy that
/// stalls shows up as a counted failure, never as a hung harness.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest response head or WebSocket frame accepted: far above anything these peers send.
const MAX_HEAD: usize = 64 * 1024;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    H1,
    H2,
    Ws,
}

struct Args {
    addr: String,
    host: String,
    path: String,
    mode: Mode,
    count: usize,
    concurrency: usize,
}

const USAGE: &str = "usage: luma-idle open --addr 127.0.0.1:PORT --mode h1|h2|ws --count N [--host H] [--path /] [--concurrency 32]\n       luma-idle ws-backend --listen 127.0.0.1:PORT";

fn parse_open(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        addr: String::new(),
        host: String::new(),
        path: "/".into(),
        mode: Mode::H1,
        count: 0,
        concurrency: 32,
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{k} needs a value"))
        };
        match k.as_str() {
            "--addr" => a.addr = v()?,
            "--host" => a.host = v()?,
            "--path" => a.path = v()?,
            "--mode" => {
                a.mode = match v()?.as_str() {
                    "h1" => Mode::H1,
                    "h2" => Mode::H2,
                    "ws" => Mode::Ws,
                    m => return Err(format!("--mode {m}: h1, h2 or ws")),
                }
            }
            "--count" => a.count = v()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--concurrency" => {
                a.concurrency = v()?.parse().map_err(|e| format!("--concurrency: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !a.addr.starts_with("127.") {
        return Err("--addr must be a 127.0.0.0/8 address: load stays on this machine".into());
    }
    if a.count == 0 || a.count > 1_000_000 || a.concurrency == 0 || a.concurrency > 1024 {
        return Err("--count must be 1..=1000000 and --concurrency 1..=1024".into());
    }
    if a.host.is_empty() {
        a.host = a.addr.clone();
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        // One thread of the two cores: the proxy under test gets the other.
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("luma-idle: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match args.first().map(String::as_str) {
        Some("open") => parse_open(&args[1..]).and_then(|a| open_main(&rt, Arc::new(a))),
        Some("ws-backend") => match args.get(1..) {
            Some([flag, listen]) if flag == "--listen" && listen.starts_with("127.") => {
                rt.block_on(ws_backend(listen))
            }
            _ => Err(USAGE.into()),
        },
        _ => Err(USAGE.into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luma-idle: {e}");
            ExitCode::from(2)
        }
    }
}

/// One held connection.
enum Conn {
    /// h1 and ws: the socket itself, so `check` can read it without blocking.
    Raw(TcpStream),
    H2 {
        sender: http2::SendRequest<Empty<Bytes>>,
        /// Set when hyper's connection task ends (the proxy closed it, or sent GOAWAY and
        /// finished).
        ended: Arc<AtomicBool>,
    },
}

/// Failures by kind, so thousands of the same error stay one line.
#[derive(Default)]
struct Tally {
    ok: usize,
    errors: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => self.ok += 1,
            Err(e) => *self.errors.entry(e).or_default() += 1,
        }
    }
    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
    fn failed(&self) -> usize {
        self.errors.values().sum()
    }
}

fn emit(v: serde_json::Value) {
    // Rust's stdout is line-buffered: each event reaches the harness at once.
    println!("{v}");
}

fn open_main(rt: &tokio::runtime::Runtime, a: Arc<Args>) -> Result<(), String> {
    let t0 = Instant::now();
    let (mut conns, opened) = rt.block_on(open_all(a.clone()));
    emit(serde_json::json!({
        "event": "opened", "ok": opened.ok, "failed": opened.failed(), "errors": opened.errors,
        "secs": t0.elapsed().as_secs_f64(),
    }));
    // The runtime's worker thread keeps driving the connections (h2 frames, EOF detection)
    // while this thread waits for the harness.
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let t0 = Instant::now();
        match line.trim() {
            "check" => {
                let (open, closed) = rt.block_on(async { check_all(&conns) });
                emit(serde_json::json!({
                    "event": "checked", "open": open, "closed": closed.failed(), "errors": closed.errors,
                }));
            }
            "verify" => {
                let (back, t) = rt.block_on(verify_all(a.clone(), std::mem::take(&mut conns)));
                conns = back;
                emit(serde_json::json!({
                    "event": "verified", "ok": t.ok, "failed": t.failed(), "errors": t.errors,
                    "secs": t0.elapsed().as_secs_f64(),
                }));
            }
            "close" => {
                // Dropping a socket closes it; hyper's h2 task ends once its sender is gone.
                rt.block_on(async { drop(std::mem::take(&mut conns)) });
                emit(serde_json::json!({"event": "closed"}));
            }
            "" => {}
            other => emit(
                serde_json::json!({"event": "error", "error": format!("unknown command {other}")}),
            ),
        }
    }
    Ok(())
}

async fn open_all(a: Arc<Args>) -> (Vec<Conn>, Tally) {
    let mut set = JoinSet::new();
    for w in 0..a.concurrency.min(a.count) {
        let a = a.clone();
        set.spawn(async move {
            let (mut conns, mut t) = (Vec::new(), Tally::default());
            let mut i = w;
            while i < a.count {
                match tokio::time::timeout(STEP_TIMEOUT, open_one(&a, i)).await {
                    Ok(Ok(c)) => {
                        conns.push(c);
                        t.add(Ok(()));
                    }
                    Ok(Err(e)) => t.add(Err(e)),
                    Err(_) => t.add(Err("open: timed out".into())),
                }
                i += a.concurrency;
            }
            (conns, t)
        });
    }
    gather(set, a.count, "open").await
}

async fn open_one(a: &Args, i: usize) -> Result<Conn, String> {
    let mut s = TcpStream::connect(&a.addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = s.set_nodelay(true);
    match a.mode {
        Mode::H1 => {
            h1_get(&mut s, a).await?;
            Ok(Conn::Raw(s))
        }
        Mode::Ws => {
            let key = base64(&key_bytes(i));
            let req = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
                a.path, a.host
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("ws handshake write: {}", e.kind()))?;
            let mut buf = Vec::new();
            let r = read_response(&mut s, &mut buf).await?;
            if r.status != 101 {
                return Err(format!("ws handshake: status {}", r.status));
            }
            if r.header("sec-websocket-accept") != Some(accept_key(&key).as_str()) {
                return Err("ws handshake: wrong or missing Sec-WebSocket-Accept".into());
            }
            Ok(Conn::Raw(s))
        }
        Mode::H2 => {
            let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            let ended = Arc::new(AtomicBool::new(false));
            let flag = ended.clone();
            tokio::spawn(async move {
                let _ = conn.await;
                flag.store(true, Ordering::SeqCst);
            });
            h2_get(&mut sender, a).await?;
            Ok(Conn::H2 { sender, ended })
        }
    }
}

async fn h1_get(s: &mut TcpStream, a: &Args) -> Result<(), String> {
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: luma-idle\r\n\r\n",
        a.path, a.host
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("h1 write: {}", e.kind()))?;
    let mut buf = Vec::new();
    let r = read_response(s, &mut buf).await?;
    if r.status != 200 {
        return Err(format!("h1: status {}", r.status));
    }
    if r.header("connection")
        .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    {
        return Err("h1: the proxy answered Connection: close".into());
    }
    Ok(())
}

async fn h2_get(sender: &mut http2::SendRequest<Empty<Bytes>>, a: &Args) -> Result<(), String> {
    sender.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
    let req = hyper::Request::get(format!("http://{}{}", a.host, a.path))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("h2 request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("h2 send: {e}"))?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("h2 body: {e}"))?;
    if status != 200 {
        return Err(format!("h2: status {status}"));
    }
    Ok(())
}

/// Is every connection still open? Sends nothing. Returns (open, closed by kind).
fn check_all(conns: &[Conn]) -> (usize, Tally) {
    let (mut open, mut closed) = (0, Tally::default());
    let mut buf = [0u8; 256];
    for c in conns {
        let r = match c {
            Conn::Raw(s) => match s.try_read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                Ok(0) => Err("closed by the proxy (end of file)".to_string()),
                Ok(_) => Err("unexpected bytes from the proxy while idle".to_string()),
                Err(e) => Err(format!("socket error: {}", e.kind())),
            },
            Conn::H2 { sender, ended } => {
                if ended.load(Ordering::SeqCst) || sender.is_closed() {
                    Err("h2 connection ended".to_string())
                } else {
                    Ok(())
                }
            }
        };
        match r {
            Ok(()) => open += 1,
            Err(e) => closed.add(Err(e)),
        }
    }
    (open, closed)
}

async fn verify_all(a: Arc<Args>, conns: Vec<Conn>) -> (Vec<Conn>, Tally) {
    let n = conns.len();
    let per = n.div_ceil(a.concurrency).max(1);
    let mut chunks: Vec<Vec<Conn>> = Vec::new();
    let mut it = conns.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(it.by_ref().take(per).collect());
    }
    let mut set = JoinSet::new();
    for (k, mut chunk) in chunks.into_iter().enumerate() {
        let a = a.clone();
        set.spawn(async move {
            let mut t = Tally::default();
            for (j, c) in chunk.iter_mut().enumerate() {
                let r = tokio::time::timeout(STEP_TIMEOUT, verify_one(&a, c, k * per + j)).await;
                t.add(r.unwrap_or_else(|_| Err("verify: timed out".into())));
            }
            (chunk, t)
        });
    }
    gather(set, n, "verify").await
}

/// The connections and tallies of the tasks in `set`, joined; a task that failed (`what` names
/// the step) counts as a failure.
async fn gather(
    mut set: JoinSet<(Vec<Conn>, Tally)>,
    capacity: usize,
    what: &str,
) -> (Vec<Conn>, Tally) {
    let (mut all, mut tally) = (Vec::with_capacity(capacity), Tally::default());
    while let Some(r) = set.join_next().await {
        match r {
            Ok((c, t)) => {
                all.extend(c);
                tally.merge(t);
            }
            Err(e) => tally.add(Err(format!("{what} task failed: {e}"))),
        }
    }
    (all, tally)
}

async fn verify_one(a: &Args, c: &mut Conn, i: usize) -> Result<(), String> {
    match (c, a.mode) {
        (Conn::Raw(s), Mode::H1) => h1_get(s, a).await,
        (Conn::Raw(s), _) => {
            let payload = format!("idle {i}");
            let mask = key_bytes(i);
            let mut frame = vec![0x81, 0x80 | payload.len() as u8];
            frame.extend_from_slice(&mask[..4]);
            frame.extend(payload.bytes().enumerate().map(|(j, b)| b ^ mask[j % 4]));
            s.write_all(&frame)
                .await
                .map_err(|e| format!("ws write: {}", e.kind()))?;
            let mut echo = vec![0u8; 2 + payload.len()];
            s.read_exact(&mut echo)
                .await
                .map_err(|e| format!("ws echo: {}", e.kind()))?;
            if echo[..2] != [0x81, payload.len() as u8] || &echo[2..] != payload.as_bytes() {
                return Err("ws echo: wrong frame back".into());
            }
            Ok(())
        }
        (Conn::H2 { sender, .. }, _) => h2_get(sender, a).await,
    }
}

struct Response {
    status: u16,
    /// Lower-case names, trimmed values.
    headers: Vec<(String, String)>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut tmp = [0u8; 8192];
    match s.read(&mut tmp).await {
        Ok(0) => Err("closed by the proxy before the response ended".into()),
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            Ok(())
        }
        Err(e) => Err(format!("read: {}", e.kind())),
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Reads one whole HTTP/1.1 response (head, then a Content-Length or chunked body; none for
/// 101, 204 and 304). Bytes beyond it are an error: nothing may follow on an idle connection.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Response, String> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n", 0) {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err("response head over 64 KiB".into());
        }
        fill(s, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "response head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let r = Response { status, headers };
    let end = if matches!(status, 101 | 204 | 304) {
        head_end
    } else if r
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        let mut pos = head_end;
        loop {
            let eol = loop {
                if let Some(i) = find(buf, b"\r\n", pos) {
                    break i;
                }
                fill(s, buf).await?;
            };
            let size_text = std::str::from_utf8(&buf[pos..eol]).map_err(|_| "bad chunk size")?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            pos = eol + 2;
            if size == 0 {
                // Trailer lines, then an empty line.
                loop {
                    let eol = loop {
                        if let Some(i) = find(buf, b"\r\n", pos) {
                            break i;
                        }
                        fill(s, buf).await?;
                    };
                    let empty = eol == pos;
                    pos = eol + 2;
                    if empty {
                        break;
                    }
                }
                break pos;
            }
            while buf.len() < pos + size + 2 {
                fill(s, buf).await?;
            }
            pos += size + 2;
        }
    } else if let Some(len) = r.header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad Content-Length")?;
        while buf.len() < head_end + len {
            fill(s, buf).await?;
        }
        head_end + len
    } else {
        return Err("response without length: the connection cannot stay open".into());
    };
    if buf.len() > end {
        return Err("bytes after the response".into());
    }
    Ok(r)
}

/// 16 bytes that differ per connection (a WebSocket key, or a frame mask). They need to be
/// unpredictable only for browsers' sake, not for a benchmark: splitmix64 of the index.
fn key_bytes(i: usize) -> [u8; 16] {
    let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut out = [0u8; 16];
    for half in out.chunks_mut(8) {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        half.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

fn accept_key(key: &str) -> String {
    base64(&sha1(format!("{key}{WS_GUID}").as_bytes()))
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(T[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// SHA-1, for the WebSocket accept key only (RFC 6455 fixes the hash; no security rests on it).
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (o, x) in out.chunks_mut(4).zip(h) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// The `ws` rows' backend: WebSocket handshake then frame echo; plain `200 ok` otherwise.
async fn ws_backend(listen: &str) -> Result<(), String> {
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listen on {listen}: {e}"))?;
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = backend_conn(s).await;
                });
            }
            // Out of file descriptors, most likely: wait and go on rather than spin or die.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn backend_conn(mut s: TcpStream) -> Result<(), String> {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n", 0) {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err("request head too large".into());
            }
            fill(&mut s, &mut buf).await?;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut key = None;
        let (mut upgrade, mut close, mut body) = (false, false, 0usize);
        for l in head.split("\r\n").skip(1) {
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                match k.as_str() {
                    "upgrade" => upgrade = v.eq_ignore_ascii_case("websocket"),
                    "sec-websocket-key" => key = Some(v.to_string()),
                    "connection" => close = v.to_ascii_lowercase().contains("close"),
                    "content-length" => body = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        while buf.len() < head_end + body {
            fill(&mut s, &mut buf).await?;
        }
        buf.drain(..head_end + body);
        if let (true, Some(key)) = (upgrade, key) {
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(&key)
            );
            s.write_all(resp.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            return echo_frames(s, buf).await;
        }
        let resp: &[u8] = if close {
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
        };
        s.write_all(resp).await.map_err(|e| e.to_string())?;
        if close {
            return Ok(());
        }
    }
}

/// Echoes WebSocket frames (unmasked, as a server sends them) until a close frame or EOF.
async fn echo_frames(mut s: TcpStream, mut buf: Vec<u8>) -> Result<(), String> {
    loop {
        while buf.len() < 2 {
            fill(&mut s, &mut buf).await?;
        }
        let (b0, b1) = (buf[0], buf[1]);
        let (mut pos, mut len) = (2usize, usize::from(b1 & 0x7f));
        let ext = match len {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        while buf.len() < pos + ext {
            fill(&mut s, &mut buf).await?;
        }
        if ext > 0 {
            len = buf[pos..pos + ext]
                .iter()
                .fold(0usize, |n, b| (n << 8) | usize::from(*b));
            pos += ext;
        }
        if len > usize::from(u16::MAX) {
            return Err("frame too large".into());
        }
        let masked = b1 & 0x80 != 0;
        let mask_len = if masked { 4 } else { 0 };
        while buf.len() < pos + mask_len + len {
            fill(&mut s, &mut buf).await?;
        }
        let mask = if masked {
            [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]
        } else {
            [0; 4]
        };
        pos += mask_len;
        let payload: Vec<u8> = buf[pos..pos + len]
            .iter()
            .enumerate()
            .map(|(j, b)| b ^ mask[j % 4])
            .collect();
        buf.drain(..pos + len);
        let mut out = vec![b0];
        if len < 126 {
            out.push(len as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        out.extend_from_slice(&payload);
        s.write_all(&out).await.map_err(|e| e.to_string())?;
        if b0 & 0x0f == 0x8 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455() {
        // RFC 6455, section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn sha1_and_base64_known_answers() {
        assert_eq!(base64(&sha1(b"abc")), "qZk+NkcGgWq6PiVxeFDCbJzQ2J0=");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }
}
