//! Outbound connections by address with their outstanding requests (the load replica choice
//! reads), requests lost with a connection handed back for retry, and the ingress client.

use super::*;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

/// A request that was lost with its connection, to be retried or failed by the owner.
#[derive(Debug)]
pub struct Lost {
    pub hop: Hop,
    pub addr: Rc<str>,
    pub reason: String,
}

pub(super) enum PeerSender {
    Connecting(mpsc::UnboundedSender<Vec<u8>>),
    Connected(Sender),
}

impl PeerSender {
    pub(super) fn send(&self, frame: Vec<u8>) -> bool {
        match self {
            PeerSender::Connecting(tx) => tx.send(frame).is_ok(),
            PeerSender::Connected(s) => s.send(frame),
        }
    }
}

/// An outbound connection to one replica's data-plane address.
pub(super) struct Peer {
    sender: RefCell<PeerSender>,
    next_seq: Cell<u64>,
    unacked: RefCell<HashMap<u64, Hop>>,
    /// Send-to-ack time: how long this replica takes to take a request off our hands.
    latency: Cell<prescient_policy::balance::PeakEwma>,
    dead: Cell<bool>,
}

/// Outbound connections by address, with the outstanding (unacknowledged) request count of
/// each: the load signal replica choice uses.
pub struct PeerPool {
    peers: RefCell<HashMap<Rc<str>, Rc<Peer>>>,
    lost: mpsc::UnboundedSender<Lost>,
    acked: Rc<tokio::sync::Notify>,
}

impl PeerPool {
    /// A pool and the stream of requests lost with broken connections.
    pub fn new() -> (Rc<PeerPool>, mpsc::UnboundedReceiver<Lost>) {
        let (lost, rx) = mpsc::unbounded_channel();
        (
            Rc::new(PeerPool {
                peers: RefCell::new(HashMap::new()),
                lost,
                acked: Rc::new(tokio::sync::Notify::new()),
            }),
            rx,
        )
    }

    /// Requests sent to `addr` and not yet acknowledged.
    /// Replica choice's load for `addr`: its peak-EWMA latency × (outstanding + 1).
    pub fn load(&self, addr: &str) -> f64 {
        self.peers
            .borrow()
            .get(addr)
            .map_or(0.0, |p| p.latency.get().load(p.unacked.borrow().len()))
    }

    pub fn outstanding(&self, addr: &str) -> usize {
        self.peers
            .borrow()
            .get(addr)
            .map_or(0, |p| p.unacked.borrow().len())
    }

    /// Requests sent to any peer and not yet acknowledged.
    pub fn outstanding_total(&self) -> usize {
        self.peers
            .borrow()
            .values()
            .map(|p| p.unacked.borrow().len())
            .sum()
    }

    pub(super) fn peer(self: &Rc<Self>, addr: &Rc<str>) -> Rc<Peer> {
        if let Some(p) = self.peers.borrow().get(addr) {
            if !p.dead.get() {
                return p.clone();
            }
        }
        // Frames queue here until the connection is up, then go straight to the socket.
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let peer = Rc::new(Peer {
            sender: RefCell::new(PeerSender::Connecting(tx)),
            next_seq: Cell::new(1),
            unacked: RefCell::new(HashMap::new()),
            latency: Cell::default(),
            dead: Cell::new(false),
        });
        self.peers.borrow_mut().insert(addr.clone(), peer.clone());
        let (pool, addr, p) = (self.clone(), addr.clone(), peer.clone());
        tokio::task::spawn_local(async move {
            let reason = match connect(&addr).await {
                Err(e) => format!("connect failed: {e}"),
                Ok(stream) => {
                    let sender = Sender::new(stream.clone());
                    rx.close();
                    while let Ok(f) = rx.try_recv() {
                        sender.send(f);
                    }
                    *p.sender.borrow_mut() = PeerSender::Connected(sender.clone());
                    let p2 = p.clone();
                    let acked = pool.acked.clone();
                    let result = read_frames(stream, |f| {
                        if let Inbound::Acks(seqs) = f {
                            let mut unacked = p2.unacked.borrow_mut();
                            let now = now_unix_ns();
                            let mut latency = p2.latency.get();
                            for s in seqs {
                                if let Some(hop) = unacked.remove(&s) {
                                    latency.observe(now.saturating_sub(hop.sent_unix_ns), now);
                                }
                            }
                            p2.latency.set(latency);
                            acked.notify_waiters();
                        }
                    })
                    .await;
                    sender.close();
                    match result {
                        Ok(()) => "connection closed by the replica".to_string(),
                        Err(e) => e.to_string(),
                    }
                }
            };
            pool.fail(&addr, &p, reason);
        });
        peer
    }

    pub(super) fn fail(&self, addr: &Rc<str>, peer: &Rc<Peer>, reason: String) {
        peer.dead.set(true);
        self.acked.notify_waiters();
        {
            let mut peers = self.peers.borrow_mut();
            if peers.get(addr).is_some_and(|p| Rc::ptr_eq(p, peer)) {
                peers.remove(addr);
            }
        }
        let lost: Vec<Hop> = peer.unacked.borrow_mut().drain().map(|(_, h)| h).collect();
        if !lost.is_empty() {
            debug!(%addr, lost = lost.len(), "connection to replica lost: {reason}");
        }
        for hop in lost {
            let _ = self.lost.send(Lost {
                hop,
                addr: addr.clone(),
                reason: reason.clone(),
            });
        }
    }

    /// Sends a request to the replica at `addr`, tracking it until acknowledged.
    pub fn send_request(self: &Rc<Self>, addr: &Rc<str>, mut hop: Hop) {
        // Stamped here (the frame carries it; a retry gets a fresh one) so the ack times it.
        hop.sent_unix_ns = now_unix_ns();
        let peer = self.peer(addr);
        let seq = peer.next_seq.get();
        peer.next_seq.set(seq + 1);
        let frame = encode_request(seq, &hop);
        peer.unacked.borrow_mut().insert(seq, hop);
        if !peer.sender.borrow().send(frame) {
            let hop = peer.unacked.borrow_mut().remove(&seq);
            if let Some(hop) = hop {
                let _ = self.lost.send(Lost {
                    hop,
                    addr: addr.clone(),
                    reason: "connection closed".into(),
                });
            }
        }
    }

    /// Waits until some outstanding request is acknowledged (or a connection fails).
    pub async fn acked(&self) {
        self.acked.notified().await
    }

    /// Sends a frame that needs no acknowledgement (outputs on their way to an ingress).
    pub fn send_frame(self: &Rc<Self>, addr: &Rc<str>, frame: Vec<u8>) {
        let peer = self.peer(addr);
        let _ = peer.sender.borrow().send(frame);
    }
}

/// A client connection to an ingress: sends invocations, receives replies.
pub struct IngressConn {
    sender: Sender,
    pending: Rc<RefCell<HashMap<u64, tokio::sync::oneshot::Sender<ReplyMsg>>>>,
    next_id: Cell<u64>,
    closed: Rc<Cell<bool>>,
}

impl Drop for IngressConn {
    fn drop(&mut self) {
        self.sender.close();
    }
}

impl IngressConn {
    pub async fn connect(addr: &str) -> std::io::Result<IngressConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let stream = Conn::Epoll(Rc::new(stream));
        let sender = Sender::new(stream.clone());
        let pending: Rc<RefCell<HashMap<u64, tokio::sync::oneshot::Sender<ReplyMsg>>>> =
            Rc::default();
        let closed = Rc::new(Cell::new(false));
        let (p, c) = (pending.clone(), closed.clone());
        tokio::task::spawn_local(async move {
            let _ = read_frames(stream, |f| {
                if let Inbound::Reply(reply) = f {
                    if let Some(tx) = p.borrow_mut().remove(&reply.id) {
                        let _ = tx.send(reply);
                    }
                }
            })
            .await;
            c.set(true);
            // Dropping the senders wakes every waiter with an error.
            p.borrow_mut().clear();
        });
        Ok(IngressConn {
            sender,
            pending,
            next_id: Cell::new(1),
            closed,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Invokes `graph` with `inputs` ("task.port" -> bytes) and waits for its outputs.
    pub async fn invoke(
        &self,
        graph: &str,
        inputs: Vec<(String, Bytes)>,
        deadline_ms: u32,
    ) -> Result<Vec<(String, Bytes)>, InvokeError> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending.borrow_mut().insert(id, tx);
        let frame = encode_invoke(&InvokeMsg {
            id,
            graph: graph.to_string(),
            inputs,
            deadline_ms,
        });
        if !self.sender.send(frame) {
            self.pending.borrow_mut().remove(&id);
            return Err(InvokeError::Closed);
        }
        match rx.await {
            Ok(r) if r.error.is_empty() => Ok(r.outputs),
            Ok(r) => Err(InvokeError::Failed(r.error)),
            Err(_) => Err(InvokeError::ClosedBeforeReply),
        }
    }
}
