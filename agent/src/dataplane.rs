//! The data plane: Cap'n Proto frames over TCP between clients, ingresses and workers.
//!
//! Each connection has one writer task that drains its queue into one buffer per wake-up, so
//! frames produced together leave in one `write` (batched writes). Requests are tracked per
//! connection until the receiver acknowledges them; a broken connection hands every unacked
//! request back to its owner (through `lost`) to be retried on another replica.
//!
//! Architecture invariant: nothing here blocks; all of it runs on one `LocalSet` thread.

use bytes::Bytes;
use capnp::message::ReaderOptions;
use prescient_schemas::dataplane_capnp::{frame, request};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Largest frame accepted (a payload plus its envelope).
pub const MAX_FRAME_BYTES: usize = 256 << 20;
/// Frames are coalesced into writes of up to this many bytes.
const WRITE_BATCH_BYTES: usize = 64 << 10;

pub fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn reader_options() -> ReaderOptions {
    let mut o = ReaderOptions::new();
    o.traversal_limit_in_words(Some(MAX_FRAME_BYTES / 8));
    o
}

/// One input of one task for one invocation, as carried between replicas.
#[derive(Clone, Debug)]
pub struct Hop {
    pub invocation: u64,
    pub graph_id: Rc<str>,
    pub epoch: u64,
    pub task: Rc<str>,
    pub port: Rc<str>,
    pub payload: Bytes,
    pub deadline_unix_us: u64,
    /// The ingress that waits for the outputs.
    pub reply_to: Rc<str>,
    pub attempt: u32,
    /// When the sender wrote it (set on receipt from the frame).
    pub sent_unix_ns: u64,
}

/// A graph output (or an error) travelling back to the ingress.
#[derive(Clone, Debug)]
pub struct OutputMsg {
    pub invocation: u64,
    pub task: String,
    pub port: String,
    pub payload: Bytes,
    pub error: String,
}

#[derive(Clone, Debug)]
pub struct InvokeMsg {
    pub id: u64,
    pub graph: String,
    pub inputs: Vec<(String, Bytes)>,
    pub deadline_ms: u32,
}

#[derive(Clone, Debug)]
pub struct ReplyMsg {
    pub id: u64,
    pub outputs: Vec<(String, Bytes)>,
    pub error: String,
}

/// A decoded frame.
#[derive(Debug)]
pub enum Inbound {
    Request { seq: u64, hop: Hop },
    Acks(Vec<u64>),
    Output(OutputMsg),
    Invoke(InvokeMsg),
    Reply(ReplyMsg),
}

fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    r?.to_string()
        .map_err(|e| capnp::Error::failed(e.to_string()))
}

fn decode(msg: &capnp::message::Reader<capnp::serialize::OwnedSegments>) -> capnp::Result<Inbound> {
    let f: frame::Reader<'_> = msg.get_root()?;
    Ok(match f.which()? {
        frame::Request(r) => {
            let r = r?;
            let hop = Hop {
                invocation: r.get_invocation(),
                graph_id: text(r.get_graph_id())?.into(),
                epoch: r.get_epoch(),
                task: text(r.get_task())?.into(),
                port: text(r.get_port())?.into(),
                payload: Bytes::copy_from_slice(r.get_payload()?),
                deadline_unix_us: r.get_deadline_unix_us(),
                reply_to: text(r.get_reply_to())?.into(),
                attempt: r.get_attempt(),
                sent_unix_ns: r.get_sent_unix_ns(),
            };
            Inbound::Request {
                seq: r.get_hop_seq(),
                hop,
            }
        }
        frame::Acks(a) => Inbound::Acks(a?.iter().collect()),
        frame::Result(o) => {
            let o = o?;
            Inbound::Output(OutputMsg {
                invocation: o.get_invocation(),
                task: text(o.get_task())?,
                port: text(o.get_port())?,
                payload: Bytes::copy_from_slice(o.get_payload()?),
                error: text(o.get_error())?,
            })
        }
        frame::Invoke(i) => {
            let i = i?;
            let mut inputs = Vec::new();
            for v in i.get_inputs()? {
                inputs.push((text(v.get_name())?, Bytes::copy_from_slice(v.get_value()?)));
            }
            Inbound::Invoke(InvokeMsg {
                id: i.get_id(),
                graph: text(i.get_graph())?,
                inputs,
                deadline_ms: i.get_deadline_ms(),
            })
        }
        frame::Reply(r) => {
            let r = r?;
            let mut outputs = Vec::new();
            for v in r.get_outputs()? {
                outputs.push((text(v.get_name())?, Bytes::copy_from_slice(v.get_value()?)));
            }
            Inbound::Reply(ReplyMsg {
                id: r.get_id(),
                outputs,
                error: text(r.get_error())?,
            })
        }
    })
}

fn finish(msg: capnp::message::Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(&msg)
}

fn builder(size_hint_bytes: usize) -> capnp::message::Builder<capnp::message::HeapAllocator> {
    // One segment big enough for the payload avoids a multi-segment message and a copy.
    let words = (size_hint_bytes / 8 + 64) as u32;
    capnp::message::Builder::new(capnp::message::HeapAllocator::new().first_segment_words(words))
}

pub fn encode_request(seq: u64, hop: &Hop) -> Vec<u8> {
    let mut msg = builder(hop.payload.len());
    {
        let mut r: request::Builder<'_> = msg.init_root::<frame::Builder<'_>>().init_request();
        r.set_hop_seq(seq);
        r.set_invocation(hop.invocation);
        r.set_graph_id(&*hop.graph_id);
        r.set_epoch(hop.epoch);
        r.set_task(&*hop.task);
        r.set_port(&*hop.port);
        r.set_payload(&hop.payload);
        r.set_deadline_unix_us(hop.deadline_unix_us);
        r.set_reply_to(&*hop.reply_to);
        r.set_sent_unix_ns(now_unix_ns());
        r.set_attempt(hop.attempt);
    }
    finish(msg)
}

pub fn encode_acks(seqs: &[u64]) -> Vec<u8> {
    let mut msg = builder(seqs.len() * 8);
    let mut l = msg
        .init_root::<frame::Builder<'_>>()
        .init_acks(seqs.len() as u32);
    for (i, s) in seqs.iter().enumerate() {
        l.set(i as u32, *s);
    }
    finish(msg)
}

pub fn encode_output(o: &OutputMsg) -> Vec<u8> {
    let mut msg = builder(o.payload.len());
    {
        let mut b = msg.init_root::<frame::Builder<'_>>().init_result();
        b.set_invocation(o.invocation);
        b.set_task(o.task.as_str());
        b.set_port(o.port.as_str());
        b.set_payload(&o.payload);
        b.set_error(o.error.as_str());
    }
    finish(msg)
}

pub fn encode_invoke(i: &InvokeMsg) -> Vec<u8> {
    let size: usize = i.inputs.iter().map(|(_, v)| v.len()).sum();
    let mut msg = builder(size);
    {
        let mut b = msg.init_root::<frame::Builder<'_>>().init_invoke();
        b.set_id(i.id);
        b.set_graph(i.graph.as_str());
        b.set_deadline_ms(i.deadline_ms);
        let mut l = b.init_inputs(i.inputs.len() as u32);
        for (k, (name, value)) in i.inputs.iter().enumerate() {
            let mut v = l.reborrow().get(k as u32);
            v.set_name(name.as_str());
            v.set_value(value);
        }
    }
    finish(msg)
}

pub fn encode_reply(r: &ReplyMsg) -> Vec<u8> {
    let size: usize = r.outputs.iter().map(|(_, v)| v.len()).sum();
    let mut msg = builder(size);
    {
        let mut b = msg.init_root::<frame::Builder<'_>>().init_reply();
        b.set_id(r.id);
        b.set_error(r.error.as_str());
        let mut l = b.init_outputs(r.outputs.len() as u32);
        for (k, (name, value)) in r.outputs.iter().enumerate() {
            let mut v = l.reborrow().get(k as u32);
            v.set_name(name.as_str());
            v.set_value(value);
        }
    }
    finish(msg)
}

/// The sending side of a connection: frames queued here leave in batched writes.
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl Sender {
    /// Queues a frame; false when the connection is gone.
    pub fn send(&self, frame: Vec<u8>) -> bool {
        self.tx.send(frame).is_ok()
    }
}

fn spawn_writer(mut w: OwnedWriteHalf) -> (Sender, tokio::task::JoinHandle<std::io::Result<()>>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let task = tokio::task::spawn_local(async move {
        let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES);
        while let Some(first) = rx.recv().await {
            if first.len() >= WRITE_BATCH_BYTES {
                w.write_all(&first).await?;
                continue;
            }
            batch.extend_from_slice(&first);
            while batch.len() < WRITE_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(f) if f.len() >= WRITE_BATCH_BYTES => {
                        w.write_all(&batch).await?;
                        batch.clear();
                        w.write_all(&f).await?;
                    }
                    Ok(f) => batch.extend_from_slice(&f),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                w.write_all(&batch).await?;
                batch.clear();
            }
        }
        w.shutdown().await
    });
    (Sender { tx }, task)
}

/// Reads frames from a connection until it ends; returns the reason it ended.
async fn read_frames(
    r: tokio::net::tcp::OwnedReadHalf,
    mut on_frame: impl FnMut(Inbound),
) -> Result<(), String> {
    let mut r = futures::io::BufReader::with_capacity(
        64 << 10,
        tokio_util::compat::TokioAsyncReadCompatExt::compat(r),
    );
    loop {
        match capnp_futures::serialize::try_read_message(&mut r, reader_options()).await {
            Ok(Some(msg)) => match decode(&msg) {
                Ok(f) => on_frame(f),
                Err(e) => return Err(format!("malformed frame: {e}")),
            },
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Frames an endpoint receives on connections others opened to it.
pub trait Handler: 'static {
    fn request(self: Rc<Self>, seq: u64, hop: Hop, from: &Sender);
    fn output(self: Rc<Self>, out: OutputMsg);
    fn invoke(self: Rc<Self>, inv: InvokeMsg, from: &Sender);
}

/// Accepts data-plane connections on `listener` and hands their frames to `handler`.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Rc<H>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("data plane accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::task::spawn_local(async move {
            let (r, w) = stream.into_split();
            let (sender, _writer) = spawn_writer(w);
            let result = read_frames(r, |f| match f {
                Inbound::Request { seq, hop } => handler.clone().request(seq, hop, &sender),
                Inbound::Output(o) => handler.clone().output(o),
                Inbound::Invoke(i) => handler.clone().invoke(i, &sender),
                Inbound::Acks(_) | Inbound::Reply(_) => {
                    debug!(%peer, "unexpected frame on an inbound connection")
                }
            })
            .await;
            if let Err(e) = result {
                debug!(%peer, "data plane connection ended: {e}");
            }
        });
    }
}

/// A request that was lost with its connection, to be retried or failed by the owner.
#[derive(Debug)]
pub struct Lost {
    pub hop: Hop,
    pub addr: Rc<str>,
    pub reason: String,
}

/// An outbound connection to one replica's data-plane address.
struct Peer {
    sender: Sender,
    next_seq: Cell<u64>,
    unacked: RefCell<HashMap<u64, Hop>>,
    dead: Cell<bool>,
}

/// Outbound connections by address, with the outstanding (unacknowledged) request count of
/// each: the load signal replica choice uses.
pub struct PeerPool {
    peers: RefCell<HashMap<Rc<str>, Rc<Peer>>>,
    lost: mpsc::UnboundedSender<Lost>,
}

impl PeerPool {
    /// A pool and the stream of requests lost with broken connections.
    pub fn new() -> (Rc<PeerPool>, mpsc::UnboundedReceiver<Lost>) {
        let (lost, rx) = mpsc::unbounded_channel();
        (
            Rc::new(PeerPool {
                peers: RefCell::new(HashMap::new()),
                lost,
            }),
            rx,
        )
    }

    /// Requests sent to `addr` and not yet acknowledged.
    pub fn outstanding(&self, addr: &str) -> usize {
        self.peers
            .borrow()
            .get(addr)
            .map_or(0, |p| p.unacked.borrow().len())
    }

    fn peer(self: &Rc<Self>, addr: &Rc<str>) -> Rc<Peer> {
        if let Some(p) = self.peers.borrow().get(addr) {
            if !p.dead.get() {
                return p.clone();
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let peer = Rc::new(Peer {
            sender: Sender { tx },
            next_seq: Cell::new(1),
            unacked: RefCell::new(HashMap::new()),
            dead: Cell::new(false),
        });
        self.peers.borrow_mut().insert(addr.clone(), peer.clone());
        let (pool, addr, p) = (self.clone(), addr.clone(), peer.clone());
        tokio::task::spawn_local(async move {
            let reason = match TcpStream::connect(&*addr).await {
                Err(e) => format!("connect failed: {e}"),
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    let (sender, writer) = spawn_writer(w);
                    // Forward what was queued while connecting, then keep forwarding.
                    let forward = tokio::task::spawn_local(async move {
                        while let Some(f) = rx.recv().await {
                            if !sender.send(f) {
                                break;
                            }
                        }
                    });
                    let p2 = p.clone();
                    let result = read_frames(r, |f| {
                        if let Inbound::Acks(seqs) = f {
                            let mut unacked = p2.unacked.borrow_mut();
                            for s in seqs {
                                unacked.remove(&s);
                            }
                        }
                    })
                    .await;
                    forward.abort();
                    writer.abort();
                    match result {
                        Ok(()) => "connection closed by the replica".to_string(),
                        Err(e) => e,
                    }
                }
            };
            pool.fail(&addr, &p, reason);
        });
        peer
    }

    fn fail(&self, addr: &Rc<str>, peer: &Rc<Peer>, reason: String) {
        peer.dead.set(true);
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
    pub fn send_request(self: &Rc<Self>, addr: &Rc<str>, hop: Hop) {
        let peer = self.peer(addr);
        let seq = peer.next_seq.get();
        peer.next_seq.set(seq + 1);
        let frame = encode_request(seq, &hop);
        peer.unacked.borrow_mut().insert(seq, hop);
        if !peer.sender.send(frame) {
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

    /// Sends a frame that needs no acknowledgement (outputs on their way to an ingress).
    pub fn send_frame(self: &Rc<Self>, addr: &Rc<str>, frame: Vec<u8>) {
        let peer = self.peer(addr);
        let _ = peer.sender.send(frame);
    }
}

/// A client connection to an ingress: sends invocations, receives replies.
pub struct IngressConn {
    sender: Sender,
    pending: Rc<RefCell<HashMap<u64, tokio::sync::oneshot::Sender<ReplyMsg>>>>,
    next_id: Cell<u64>,
    closed: Rc<Cell<bool>>,
}

impl IngressConn {
    pub async fn connect(addr: &str) -> std::io::Result<IngressConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let (sender, _writer) = spawn_writer(w);
        let pending: Rc<RefCell<HashMap<u64, tokio::sync::oneshot::Sender<ReplyMsg>>>> =
            Rc::default();
        let closed = Rc::new(Cell::new(false));
        let (p, c) = (pending.clone(), closed.clone());
        tokio::task::spawn_local(async move {
            let _ = read_frames(r, |f| {
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
    ) -> Result<Vec<(String, Bytes)>, String> {
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
            return Err("connection to the ingress is closed".into());
        }
        match rx.await {
            Ok(r) if r.error.is_empty() => Ok(r.outputs),
            Ok(r) => Err(r.error),
            Err(_) => Err("connection to the ingress closed before the reply".into()),
        }
    }
}
