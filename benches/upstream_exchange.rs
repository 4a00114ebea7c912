//! What one upstream exchange costs the proxy's worker thread: hyper's HTTP/1.1 client, as
//! luma-proxy uses it (`luma_proxy::backend`: a kept-alive connection whose task is spawned
//! on the same single-threaded runtime, `try_send_request`, the response body read frame by
//! frame), against an exchange done inline, in the request's own task, with luma-proxy's own
//! codec (`luma_proxy::h1`: encode the head, parse the answer's head, decode the body).
//!
//! The second is not a client yet: it has no pool, timeouts or retries. It is what a client
//! built on the codec would cost at least, measured so that replacing hyper's client rests on a
//! number (docs/profile.md), not on a guess.
//!
//! The figure is CPU time of the client's thread per exchange (`/proc/thread-self/schedstat`,
//! kernel time included), not wall time: the backend answers from its own thread, and waiting
//! for it is not the proxy's cost. hyper's side runs first, then the codec: compare runs, not
//! one pair.
//!
//! Run: `cargo bench -p luma-benches --bench upstream_exchange`; instruction counts: `main`.

use bytes::{Buf, Bytes, BytesMut};
use criterion::{criterion_group, Criterion};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use luma_proxy::h1;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BODY: usize = 1024;

/// This thread's time on a CPU so far (Linux).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns: u64 = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat field");
    // A kernel without scheduler statistics prints zeros: every sample would read as free.
    assert!(
        ns > 0,
        "/proc/thread-self/schedstat reads 0: no scheduler statistics here"
    );
    Duration::from_nanos(ns)
}

/// A keep-alive backend on its own thread: every request head gets the same 1 KiB answer.
fn backend() -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(l.local_addr().expect("addr")).expect("send addr");
            let mut answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {BODY}\r\n\
                 date: Sun, 29 Nov 2026 01:00:00 GMT\r\nx-app: demo\r\n\r\n"
            )
            .into_bytes();
            answer.resize(answer.len() + BODY, b'x');
            let answer = Bytes::from(answer);
            loop {
                let (mut s, _) = l.accept().await.expect("accept");
                let _ = s.set_nodelay(true);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::with_capacity(8192);
                    loop {
                        match s.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        while let Some(end) = find_head_end(&buf) {
                            buf.advance(end);
                            if s.write_all(&answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
    });
    rx.recv().expect("backend address")
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The request luma-proxy sends upstream for a plain GET (after `prepare_upstream`).
fn request() -> Request<Empty<Bytes>> {
    Request::get("/")
        .header("host", "app.example.com")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .header("x-forwarded-host", "app.example.com")
        .header("x-forwarded-for", "10.0.0.9")
        .header("x-forwarded-proto", "http")
        .header("x-request-id", "0123456789abcdef0123456789abcdef")
        .body(Empty::new())
        .expect("request")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn hyper_exchanges(sender: &mut Sender, n: u64) {
    for _ in 0..n {
        sender.ready().await.expect("ready");
        let resp = sender.try_send_request(request()).await.expect("send");
        let mut body = resp.into_body();
        let mut got = 0;
        while let Some(f) = body.frame().await {
            got += f.expect("frame").data_ref().map_or(0, |d| d.len());
        }
        assert_eq!(got, BODY);
    }
}

async fn inline_exchanges(s: &mut TcpStream, head: &mut Vec<u8>, buf: &mut BytesMut, n: u64) {
    for _ in 0..n {
        assert_eq!(inline_exchange(s, head, buf).await, BODY);
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn socket(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    s
}

/// A hyper client connection as `luma_proxy::backend` opens them, its task on this runtime.
async fn hyper_sender(addr: std::net::SocketAddr) -> Sender {
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(socket(addr).await))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

fn hyper_client(c: &mut Criterion, addr: std::net::SocketAddr) {
    let rt = runtime();
    let mut sender = rt.block_on(hyper_sender(addr));
    c.bench_function("upstream_exchange/hyper_client", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu();
            rt.block_on(hyper_exchanges(&mut sender, iters));
            thread_cpu() - start
        })
    });
}

/// One exchange without a connection task, through luma-proxy's own codec (`luma_proxy::h1`):
/// encode the head, write it, parse the answer's head (values sliced from the read buffer),
/// decode the body. No pool, no timeouts, no retry: the rest of a client is left out.
async fn inline_exchange(s: &mut TcpStream, head: &mut Vec<u8>, buf: &mut BytesMut) -> usize {
    let (parts, _) = request().into_parts();
    h1::encode_request_head(&parts, head);
    s.write_all(head).await.expect("write");
    let answer = loop {
        if let Some(answer) = h1::parse_response_head(buf, &parts.method, 64 * 1024).expect("head")
        {
            break answer;
        }
        read_more(s, buf).await;
    };
    std::hint::black_box(&answer.headers);
    let mut body = h1::Decoder::new(answer.framing);
    let mut got = 0;
    loop {
        match body.decode(buf).expect("body") {
            h1::Decoded::Data(d) => got += d.len(),
            h1::Decoded::NeedMore => read_more(s, buf).await,
            h1::Decoded::Trailers(_) | h1::Decoded::Done => break,
        }
    }
    assert!(answer.keep_alive && buf.is_empty());
    got
}

async fn read_more(s: &mut TcpStream, buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(8192);
    }
    let n = s.read_buf(buf).await.expect("read");
    assert!(n > 0, "backend closed");
}

fn inline_h1(c: &mut Criterion, addr: std::net::SocketAddr) {
    let rt = runtime();
    let mut s = rt.block_on(socket(addr));
    let mut head = Vec::with_capacity(512);
    let mut buf = BytesMut::with_capacity(8192);
    c.bench_function("upstream_exchange/inline_codec", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu();
            rt.block_on(inline_exchanges(&mut s, &mut head, &mut buf, iters));
            thread_cpu() - start
        })
    });
}

fn upstream_exchange(c: &mut Criterion) {
    let addr = backend();
    hyper_client(c, addr);
    inline_h1(c, addr);
}

criterion_group!(benches, upstream_exchange);

/// `LUMA_EXCHANGES=N`: instead of Criterion, N exchanges each way after a warm-up, each way in
/// a function of its own, for an instruction count that does not move with the machine:
/// `valgrind --tool=callgrind --toggle-collect='*counted_hyper*' --toggle-collect='*counted_inline*'`,
/// then `callgrind_annotate --inclusive=yes` divided by N (docs/profile.md).
fn main() {
    let Some(n) = std::env::var("LUMA_EXCHANGES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        benches();
        Criterion::default().configure_from_args().final_summary();
        return;
    };
    let addr = backend();
    let rt = runtime();
    let (mut sender, mut s) = rt.block_on(async { (hyper_sender(addr).await, socket(addr).await) });
    let (mut head, mut buf) = (Vec::with_capacity(512), BytesMut::with_capacity(8192));
    let warm = n.min(1000);
    rt.block_on(hyper_exchanges(&mut sender, warm));
    rt.block_on(inline_exchanges(&mut s, &mut head, &mut buf, warm));
    counted_hyper(&rt, &mut sender, n);
    counted_inline(&rt, &mut s, &mut head, &mut buf, n);
    println!("{n} exchanges each way");
}

#[inline(never)]
fn counted_hyper(rt: &tokio::runtime::Runtime, sender: &mut Sender, n: u64) {
    rt.block_on(hyper_exchanges(sender, n));
}

#[inline(never)]
fn counted_inline(
    rt: &tokio::runtime::Runtime,
    s: &mut TcpStream,
    head: &mut Vec<u8>,
    buf: &mut BytesMut,
    n: u64,
) {
    rt.block_on(inline_exchanges(s, head, buf, n));
}
