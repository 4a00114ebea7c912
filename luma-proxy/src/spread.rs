//! Accepted connections spread evenly over the serving workers.
//!
//! Each worker accepts on its own `SO_REUSEPORT` listener (`workers.rs`), and the kernel picks
//! the listener by a hash of the client's address and port. That spreads many short
//! connections well, but a few long-lived ones (keep-alive clients, HTTP/2 from a load
//! balancer) land unevenly: measured here, 64 connections split 28 against 36 over two workers
//! in every round (`docs/profile.md`), and one worker's connections wait while the other's
//! thread has less to do.
//!
//! So a worker that accepts a connection while another worker serves fewer hands it over: the
//! socket goes, deregistered from the accepting runtime, through the other worker's inbox and
//! is served there, as HAProxy's threads do. Ties stay where they were accepted, so a single
//! worker, or balanced workers, never hand anything over. The count a worker is judged by is
//! taken when the connection is assigned to it, before it crosses, so a burst of accepts
//! cannot all pick the same worker; it is given back when the connection closes (the [`Load`]
//! lives in the connection's slot, so an upgraded tunnel keeps counting).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

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

    /// Assigns a connection this worker accepted to the worker with the fewest connections
    /// (this one on a tie), and hands it over when that is another one.
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
            Err(_) => return Assigned::Handed,
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
                    Err(_) => Assigned::Handed,
                }
            }
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // Connections still queued are dropped with the receiver (closed, their load given
        // back); a worker picking this one from now on sees it gone, and a send that raced
        // this fails and is served by the sender.
        self.seat.left.store(true, Ordering::Release);
    }
}

/// Where an accepted connection is served.
pub(crate) enum Assigned {
    /// By the worker that accepted it, with its slot of the limit and its place in the count.
    Here(TcpStream, OwnedSemaphorePermit, Load),
    /// Handed to another worker.
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

    fn least_loaded(&self, here: &Arc<Seat>) -> Arc<Seat> {
        let seats = self.seats.read().unwrap_or_else(PoisonError::into_inner);
        let mut best = here;
        let mut best_load = here.load.load(Ordering::Acquire);
        for seat in seats.iter() {
            if best_load == 0 {
                break;
            }
            if seat.left.load(Ordering::Acquire) {
                continue;
            }
            let load = seat.load.load(Ordering::Acquire);
            if load < best_load {
                best = seat;
                best_load = load;
            }
        }
        best.clone()
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
    async fn connections_go_to_the_worker_with_fewest_and_ties_stay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limit = Arc::new(Semaphore::new(16));
        let spread = Arc::new(Spread::default());
        let (a, mut b) = (spread.join(), spread.join());
        let mut kept = Vec::new();
        let mut clients = Vec::new();
        // Worker a accepts all four: it keeps the 1st and 3rd (ties), hands the 2nd and 4th.
        for n in 0..4 {
            let (client, server, peer, permit) = accepted(&listener, &limit).await;
            clients.push(client);
            match a.assign(server, peer, permit) {
                Assigned::Here(s, p, l) => {
                    assert!(n % 2 == 0, "connection {n} stayed on the busier worker");
                    kept.push((s, p, l));
                }
                Assigned::Handed => assert!(n % 2 == 1, "connection {n} left a tie"),
            }
        }
        assert_eq!(loads(&[&a, &b]), [2, 2]);
        assert_eq!(limit.available_permits(), 12);
        // Both handed connections arrive whole: the socket works on the other side, with its
        // peer, its slot (4 of 16 taken) and its place in b's count.
        for client in clients.iter_mut().skip(1).step_by(2) {
            let handed = b.recv().await.expect("a handed connection");
            let (stream, peer, _permit, _load) = handed.take();
            let mut stream = stream.unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }
        // The handed ones are closed (their loads dropped): a is now the busier one.
        assert_eq!(loads(&[&a, &b]), [2, 0]);
        let (_c, server, peer, permit) = accepted(&listener, &limit).await;
        assert!(matches!(a.assign(server, peer, permit), Assigned::Handed));
        assert_eq!(loads(&[&a, &b]), [2, 1]);
        // A worker that left is handed nothing, however idle.
        drop(kept.pop());
        drop(b);
        let (_c, server, peer, permit) = accepted(&listener, &limit).await;
        let here = a.assign(server, peer, permit);
        assert!(matches!(here, Assigned::Here(..)));
        // The one queued in b's inbox when it left was closed with it, its slot given back.
        assert_eq!(loads(&[&a]), [2]);
        assert_eq!(limit.available_permits(), 16 - 2);
    }
}
