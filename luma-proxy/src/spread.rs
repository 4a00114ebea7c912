//! Accepted connections spread evenly over the serving workers.
//!
//! Each worker accepts on its own `SO_REUSEPORT` listener (`workers.rs`), and the kernel picks
//! the listener by a hash of the client's address and port. That spreads many short
//! connections well, but a few long-lived ones (keep-alive clients, HTTP/2 from a load
//! balancer) land unevenly: measured here, 64 connections split about 28 against 36 over two
//! workers, unevenly in every round (`docs/profile.md`), and one worker's connections wait
//! while the other's thread has less to do.
//!
//! So a worker that accepts a connection while another worker serves at least
//! [`HAND_OVER_AT`] fewer hands it over: the socket goes, deregistered from the accepting
//! runtime, through the other worker's inbox and is served there, as HAProxy's threads do. A
//! single worker never hands anything over, and workers stay within [`HAND_OVER_AT`]
//! connections of each other. A connection crosses at most once, at accept, never per request.
//! The count a worker is judged by is taken when the connection is assigned to it, before it
//! crosses, so one worker's burst of accepts does not pile onto the same other worker (two
//! workers accepting at the same moment may both pick one: the next accepts even that out).
//! It is given back when the connection closes: the [`Load`] lives in the connection's slot,
//! so an upgraded tunnel keeps counting.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// A worker keeps a connection it accepted unless another serves at least this many fewer.
/// Crossing costs two `epoll_ctl`s and a wake of the other thread, so with a margin of one
/// short-lived connections would cross often for no gain; with two they rarely do.
pub const HAND_OVER_AT: usize = 2;

/// The workers of one listener kind (plain HTTP or HTTPS): each one's count and inbox.
#[derive(Default)]
pub(crate) struct Spread {
    seats: RwLock<Vec<Arc<Seat>>>,
}

struct Seat {
    /// Connections assigned to this worker and not yet closed.
    load: AtomicUsize,
    /// Set once the worker's accept loop has ended: it is handed nothing more.
    left: AtomicBool,
    inbox: mpsc::UnboundedSender<Handed>,
}

/// A connection accepted by one worker and handed to another, with what was taken for it at
/// accept.
pub(crate) struct Handed {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    load: Load,
}

impl Handed {
    /// The socket, registered with the receiving worker's runtime (call it there), its peer,
    /// its slot of the connection limit and its place in the count.
    pub fn take(
        self,
    ) -> (
        std::io::Result<TcpStream>,
        SocketAddr,
        OwnedSemaphorePermit,
        Load,
    ) {
        (
            TcpStream::from_std(self.stream),
            self.peer,
            self.permit,
            self.load,
        )
    }
}

/// One connection's place in its worker's count, given back on drop.
pub(crate) struct Load {
    seat: Arc<Seat>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.seat.load.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A worker's end of the spread: its place, its inbox, and the way to the others.
pub(crate) struct Inbox {
    spread: Arc<Spread>,
    seat: Arc<Seat>,
    rx: mpsc::UnboundedReceiver<Handed>,
}

impl Inbox {
    /// The next connection handed to this worker.
    pub async fn recv(&mut self) -> Option<Handed> {
        self.rx.recv().await
    }

    /// Stops taking connections, when the worker's accept loop ends: from now on none is
    /// handed here (a send that races this fails, and its sender serves the connection), and
    /// those already queued are returned, to be served and drained with the rest.
    pub fn leave(&mut self) -> Vec<Handed> {
        self.seat.left.store(true, Ordering::Release);
        self.rx.close();
        let mut queued = Vec::new();
        while let Ok(handed) = self.rx.try_recv() {
            queued.push(handed);
        }
        queued
    }

    /// Assigns a connection this worker accepted: to the worker with the fewest connections
    /// when it serves at least [`HAND_OVER_AT`] fewer than this one, handed over; else here.
    pub fn assign(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Assigned {
        let target = self.spread.least_loaded(&self.seat);
        target.load.fetch_add(1, Ordering::AcqRel);
        let load = Load { seat: target };
        if Arc::ptr_eq(&load.seat, &self.seat) {
            return Assigned::Here(stream, permit, load);
        }
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            // Deregistering failed: the socket is no longer usable here either.
            Err(e) => {
                lost(&e);
                return Assigned::Handed;
            }
        };
        let target = load.seat.clone();
        let handed = Handed {
            stream: std_stream,
            peer,
            permit,
            load,
        };
        match target.inbox.send(handed) {
            Ok(()) => Assigned::Handed,
            // The target's loop ended between the pick and the send: serve it here.
            Err(mpsc::error::SendError(back)) => {
                self.seat.load.fetch_add(1, Ordering::AcqRel);
                let load = Load {
                    seat: self.seat.clone(),
                };
                match TcpStream::from_std(back.stream) {
                    Ok(s) => Assigned::Here(s, back.permit, load),
                    Err(e) => {
                        lost(&e);
                        Assigned::Handed
                    }
                }
            }
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // A worker that ended without `leave` (its listener failed): connections still queued
        // are dropped with the receiver (closed, their slots and loads given back).
        self.seat.left.store(true, Ordering::Release);
    }
}

/// A connection closed because its socket could not move between runtimes (a failed
/// `epoll_ctl`): rare enough to log each one.
fn lost(e: &std::io::Error) {
    crate::log::warn(
        "connection closed: it could not be handed to another worker",
        serde_json::json!({"error": e.to_string()}),
    );
}

/// Where an accepted connection is served.
pub(crate) enum Assigned {
    /// By the worker that accepted it, with its slot of the limit and its place in the count.
    Here(TcpStream, OwnedSemaphorePermit, Load),
    /// Handed to another worker (or closed, and logged, when its socket could not move).
    Handed,
}

impl Spread {
    /// Adds a worker; its connections arrive through the returned inbox.
    pub fn join(self: &Arc<Self>) -> Inbox {
        let (tx, rx) = mpsc::unbounded_channel();
        let seat = Arc::new(Seat {
            load: AtomicUsize::new(0),
            left: AtomicBool::new(false),
            inbox: tx,
        });
        self.seats
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(seat.clone());
        Inbox {
            spread: self.clone(),
            seat,
            rx,
        }
    }

    /// The worker a connection accepted by `here` goes to: the one serving the fewest, when
    /// that is at least [`HAND_OVER_AT`] fewer than `here`; else `here`.
    fn least_loaded(&self, here: &Arc<Seat>) -> Arc<Seat> {
        let here_load = here.load.load(Ordering::Acquire);
        if here_load < HAND_OVER_AT {
            return here.clone();
        }
        let seats = self.seats.read().unwrap_or_else(PoisonError::into_inner);
        let mut best = here;
        let mut best_load = here_load;
        for seat in seats.iter() {
            if seat.left.load(Ordering::Acquire) {
                continue;
            }
            let load = seat.load.load(Ordering::Acquire);
            if load < best_load {
                best = seat;
                best_load = load;
            }
        }
        if best_load + HAND_OVER_AT <= here_load {
            best.clone()
        } else {
            here.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    /// A real loopback connection: the client end, and the accepted end with a slot.
    async fn accepted(
        listener: &TcpListener,
        limit: &Arc<Semaphore>,
    ) -> (TcpStream, TcpStream, SocketAddr, OwnedSemaphorePermit) {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        (
            client,
            server,
            peer,
            limit.clone().try_acquire_owned().unwrap(),
        )
    }

    fn loads(inboxes: &[&Inbox]) -> Vec<usize> {
        inboxes
            .iter()
            .map(|i| i.seat.load.load(Ordering::Acquire))
            .collect()
    }

    #[tokio::test]
    async fn a_connection_crosses_only_to_a_worker_serving_two_fewer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limit = Arc::new(Semaphore::new(16));
        let spread = Arc::new(Spread::default());
        let (a, mut b) = (spread.join(), spread.join());
        let mut kept = Vec::new();
        let mut clients = Vec::new();
        // Worker a accepts four while b serves none: a keeps the first two (b is not two
        // fewer yet), hands the third, keeps the fourth (3 against 1).
        for (n, crosses) in [false, false, true, false].into_iter().enumerate() {
            let (client, server, peer, permit) = accepted(&listener, &limit).await;
            clients.push(client);
            match a.assign(server, peer, permit) {
                Assigned::Here(s, p, l) => {
                    assert!(!crosses, "connection {n} stayed");
                    kept.push((s, p, l));
                }
                Assigned::Handed => assert!(crosses, "connection {n} crossed"),
            }
        }
        assert_eq!(loads(&[&a, &b]), [3, 1]);
        assert_eq!(limit.available_permits(), 12);
        // The handed connection arrives whole: the socket works on the other side, with its
        // peer, its slot of the limit and its place in b's count.
        {
            let handed = b.recv().await.expect("a handed connection");
            let (stream, peer, _permit, _load) = handed.take();
            let mut stream = stream.unwrap();
            assert_eq!(peer, clients[2].local_addr().unwrap());
            clients[2].write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }
        // Closed: its slot and its place are given back.
        assert_eq!(loads(&[&a, &b]), [3, 0]);
        assert_eq!(limit.available_permits(), 13);
        let (_c, server, peer, permit) = accepted(&listener, &limit).await;
        assert!(matches!(a.assign(server, peer, permit), Assigned::Handed));
        assert_eq!(loads(&[&a, &b]), [3, 1]);
        // b's accept loop ends: what was queued for it comes back to be served, and from then
        // on it is handed nothing, however idle.
        let queued = b.leave();
        assert_eq!(queued.len(), 1);
        drop(queued);
        assert_eq!(loads(&[&a, &b]), [3, 0]);
        let (_c, server, peer, permit) = accepted(&listener, &limit).await;
        let here = a.assign(server, peer, permit);
        assert!(matches!(here, Assigned::Here(..)));
        assert_eq!(loads(&[&a, &b]), [4, 0]);
        assert_eq!(limit.available_permits(), 16 - 4);
    }

    #[tokio::test]
    async fn a_single_worker_keeps_everything() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limit = Arc::new(Semaphore::new(16));
        let a = Arc::new(Spread::default()).join();
        let mut kept = Vec::new();
        for _ in 0..5 {
            let (client, server, peer, permit) = accepted(&listener, &limit).await;
            match a.assign(server, peer, permit) {
                Assigned::Here(s, p, l) => kept.push((client, s, p, l)),
                Assigned::Handed => panic!("a single worker handed a connection over"),
            }
        }
        assert_eq!(loads(&[&a]), [5]);
    }
}
