//! Thread-per-core serving: each worker thread runs its own single-threaded runtime with its own
//! `SO_REUSEPORT` listener, and keeps its own upstream connection pools, so a request is read,
//! proxied and answered on one thread with no cross-thread handoff. The kernel spreads incoming
//! connections over the listeners by a hash, and `spread.rs` evens out what the hash leaves
//! uneven: a connection may cross once, at accept, never per request.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// How many serving threads the process runs (pools are sized by it).
static WORKERS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

pub fn set_count(n: usize) {
    WORKERS.store(n.max(1), Ordering::Relaxed);
}

pub fn count() -> usize {
    WORKERS.load(Ordering::Relaxed)
}

/// Marks the current thread as serving worker `i`.
pub fn set_index(i: usize) {
    INDEX.with(|c| c.set(i));
}

/// The serving worker of the current thread (0 for any other thread).
pub fn index() -> usize {
    INDEX.with(|c| c.get())
}

/// A listener that several threads can bind to the same address.
pub fn reuseport_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(reuseport_std_listener(addr)?)
}

/// The same, bound and listening but not yet registered with a runtime: a worker thread
/// turns it into a tokio listener on its own runtime. The kernel queues connections for it from
/// the moment it exists.
pub fn reuseport_std_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// What each serving thread runs every [`UPKEEP_EVERY`]: the binary's allocator hands back the
/// pages its thread has freed (`main.rs`). An allocator returns memory only when the thread
/// calls into it, and a thread whose burst of connections has just ended may call it rarely.
static UPKEEP: OnceLock<fn()> = OnceLock::new();

/// Often enough that a burst's memory is back within seconds, rarely enough to cost nothing.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(2);

/// Installs the per-thread upkeep (once; later calls are ignored).
pub fn set_upkeep(f: fn()) {
    let _ = UPKEEP.set(f);
}

/// Runs the upkeep on the current worker's thread until `shutdown` says so.
pub(crate) async fn upkeep(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(f) = UPKEEP.get().copied() else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(UPKEEP_EVERY) => f(),
        }
    }
}
