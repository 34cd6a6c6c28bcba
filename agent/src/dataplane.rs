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
use prescient_schemas::codec::text;
use prescient_schemas::dataplane_capnp::{frame, request};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How data-plane sockets are driven: readiness (epoll, through tokio) or completion (io_uring,
/// through tokio-uring). Chosen once per process at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Epoll,
    IoUring,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Epoll => "epoll",
            Transport::IoUring => "io_uring",
        }
    }

    /// `auto` takes io_uring when this kernel lets the process create a ring, else epoll;
    /// the reason for the choice is returned for a log line.
    pub fn choose(requested: &str) -> Result<(Transport, String), String> {
        let probe = || {
            io_uring::IoUring::new(8)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        match requested {
            "epoll" => Ok((Transport::Epoll, "requested".into())),
            "io_uring" => probe()
                .map(|()| (Transport::IoUring, "requested".into()))
                .map_err(|e| format!("io_uring was requested but is unavailable: {e}")),
            "auto" => Ok(match probe() {
                Ok(()) => (Transport::IoUring, "the kernel supports io_uring".into()),
                Err(e) => (Transport::Epoll, format!("io_uring unavailable ({e})")),
            }),
            other => Err(format!(
                "unknown data plane {other:?}: expected auto, epoll or io_uring"
            )),
        }
    }
}

static TRANSPORT: std::sync::OnceLock<Transport> = std::sync::OnceLock::new();

/// Sets this process's transport (once, before any connection); epoll when never set.
pub fn set_transport(t: Transport) {
    let _ = TRANSPORT.set(t);
}

pub fn transport() -> Transport {
    TRANSPORT.get().copied().unwrap_or(Transport::Epoll)
}

/// A connected socket, driven by the process's transport.
#[derive(Clone)]
enum Conn {
    Epoll(Rc<TcpStream>),
    Uring(Rc<tokio_uring::net::TcpStream>),
}

async fn connect(addr: &str) -> std::io::Result<Conn> {
    match transport() {
        Transport::Epoll => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Conn::Epoll(Rc::new(s)))
        }
        Transport::IoUring => {
            let sa: std::net::SocketAddr = addr.parse().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
            })?;
            let s = tokio_uring::net::TcpStream::connect(sa).await?;
            s.set_nodelay(true)?;
            Ok(Conn::Uring(Rc::new(s)))
        }
    }
}

/// A data-plane listener.
pub enum Listener {
    Epoll(TcpListener),
    Uring(tokio_uring::net::TcpListener),
}

impl Listener {
    /// Binds with this process's transport.
    pub async fn bind(addr: std::net::SocketAddr) -> std::io::Result<Listener> {
        Ok(match transport() {
            Transport::Epoll => Listener::Epoll(TcpListener::bind(addr).await?),
            Transport::IoUring => Listener::Uring(tokio_uring::net::TcpListener::bind(addr)?),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Listener::Epoll(l) => l.local_addr(),
            Listener::Uring(l) => l.local_addr(),
        }
    }

    async fn accept(&self) -> std::io::Result<(Conn, std::net::SocketAddr)> {
        match self {
            Listener::Epoll(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Epoll(Rc::new(s)), peer))
            }
            Listener::Uring(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Uring(Rc::new(s)), peer))
            }
        }
    }
}

/// A read buffer of whole words, so frames (multiples of 8 bytes) stay aligned and are parsed
/// in place; io_uring may own it while a read is in flight.
struct AlignedBuf {
    words: Vec<capnp::Word>,
}

impl AlignedBuf {
    fn bytes(&self) -> &[u8] {
        capnp::Word::words_to_bytes(&self.words)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        capnp::Word::words_to_bytes_mut(&mut self.words)
    }
}

// SAFETY: the pointer is to the Vec's heap allocation, which does not move while the buffer is
// owned by an in-flight operation (the Vec itself is never resized then); all bytes are
// initialised (zeroed at allocation).
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.words.as_ptr() as *const u8
    }
    fn bytes_init(&self) -> usize {
        self.words.len() * 8
    }
    fn bytes_total(&self) -> usize {
        self.words.len() * 8
    }
}

// SAFETY: as above; every byte is always initialised, so `set_init` has nothing to record.
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr() as *mut u8
    }
    unsafe fn set_init(&mut self, _pos: usize) {}
}

thread_local! {
    static IO_BYTES: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Data-plane bytes (read, written) by this thread's connections.
pub fn io_bytes() -> (u64, u64) {
    IO_BYTES.with(Cell::get)
}

fn count_io(read: usize, written: usize) {
    IO_BYTES.with(|c| {
        let (r, w) = c.get();
        c.set((r + read as u64, w + written as u64));
    });
}

/// Decodes one whole frame (for tools and benchmarks; connections decode in place).
pub fn decode_frame(bytes: &[u8]) -> Result<Inbound, String> {
    let mut words = capnp::Word::allocate_zeroed_vec(bytes.len().div_ceil(8));
    capnp::Word::words_to_bytes_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
    let mut slice = &capnp::Word::words_to_bytes(&words)[..bytes.len()];
    let msg = capnp::serialize::read_message_from_flat_slice(&mut slice, reader_options())
        .map_err(|e| e.to_string())?;
    decode(&msg).map_err(|e| e.to_string())
}

/// Largest frame accepted (a payload plus its envelope).
pub const MAX_FRAME_BYTES: usize = 256 << 20;

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
    /// When the ingress admitted the invocation (0: unknown).
    pub admitted_unix_ns: u64,
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

fn decode<S: capnp::message::ReaderSegments>(
    msg: &capnp::message::Reader<S>,
) -> capnp::Result<Inbound> {
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
                admitted_unix_ns: r.get_admitted_unix_ns(),
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
        r.set_admitted_unix_ns(hop.admitted_unix_ns);
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

/// The sending side of a connection. When the connection has been quiet for a while, a frame is
/// written straight to the socket (no task switch on the request path: what latency at low load
/// needs); when frames come close together, they join a buffer that a writer task flushes in one
/// write after the current task yields (batched writes: what throughput under load needs).
#[derive(Clone)]
pub struct Sender(Rc<Out>);

/// Frames closer together than this are batched instead of written one by one.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_micros(50);

/// How long acknowledgements wait to be sent together.
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

struct Out {
    stream: Conn,
    pending: RefCell<OutQueue>,
    /// An io_uring write owns queued bytes: nothing may be written around it.
    writing: Cell<bool>,
    last_write: Cell<std::time::Instant>,
    acks: RefCell<Vec<u64>>,
    closed: Cell<bool>,
    wake: tokio::sync::Notify,
}

impl Sender {
    fn new(stream: Conn) -> Sender {
        let out = Rc::new(Out {
            stream,
            pending: RefCell::new(OutQueue::default()),
            writing: Cell::new(false),
            last_write: Cell::new(std::time::Instant::now() - BATCH_WINDOW),
            acks: RefCell::new(Vec::new()),
            closed: Cell::new(false),
            wake: tokio::sync::Notify::new(),
        });
        let o = out.clone();
        tokio::task::spawn_local(async move {
            // Ends when the connection closes or every Sender is gone (this task holds the other
            // reference).
            while Rc::strong_count(&o) > 1 && !o.closed.get() {
                if o.pending.borrow().is_empty() {
                    o.wake.notified().await;
                    continue;
                }
                match &o.stream {
                    Conn::Epoll(stream) => {
                        if stream.writable().await.is_err() {
                            o.closed.set(true);
                            break;
                        }
                        let mut pending = o.pending.borrow_mut();
                        let result = {
                            let slices = pending.io_slices();
                            stream.try_write_vectored(&slices)
                        };
                        match result {
                            Ok(n) => {
                                count_io(0, n);
                                pending.advance(n)
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => o.closed.set(true),
                        }
                    }
                    Conn::Uring(stream) => {
                        // The ring owns each buffer while writing it; new frames gather meanwhile.
                        let chunks = o.pending.borrow_mut().take_all();
                        o.writing.set(true);
                        for chunk in chunks {
                            count_io(0, chunk.len());
                            let (result, _) = stream.write_all(chunk).await;
                            if result.is_err() {
                                o.closed.set(true);
                                break;
                            }
                        }
                        o.writing.set(false);
                    }
                }
            }
        });
        Sender(out)
    }

    /// Queues a frame; false when the connection is gone.
    pub fn send(&self, frame: Vec<u8>) -> bool {
        let o = &self.0;
        if o.closed.get() {
            return false;
        }
        let mut pending = o.pending.borrow_mut();
        let now = std::time::Instant::now();
        let quiet = now.duration_since(o.last_write.replace(now)) >= BATCH_WINDOW;
        // Large frames always go through the writer: with io_uring the kernel copies them on
        // its own worker threads while this thread goes on (3x the bulk throughput here).
        let idle = pending.is_empty() && quiet && !o.writing.get() && frame.len() < COALESCE_BELOW;
        let direct = match &o.stream {
            Conn::Epoll(stream) if idle => Some(stream.try_write(&frame)),
            Conn::Uring(stream) if idle => Some(try_send_now(stream, &frame)),
            _ => None,
        };
        if let Some(result) = direct {
            if let Ok(n) = &result {
                count_io(0, *n);
            }
            match result {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => pending.push_partly_written(frame, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => pending.push(frame),
                Err(_) => {
                    o.closed.set(true);
                    return false;
                }
            }
        } else {
            pending.push(frame);
        }
        drop(pending);
        o.wake.notify_one();
        true
    }

    /// Acknowledges a request. Acks are gathered for up to a millisecond and sent as one frame:
    /// they feed load estimates and retries, neither of which needs them sooner, and sending
    /// each alone would cost the sender a wake-up per request.
    pub fn ack(&self, seq: u64) {
        let mut acks = self.0.acks.borrow_mut();
        acks.push(seq);
        if acks.len() == 1 {
            let this = self.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(ACK_DELAY).await;
                let seqs = std::mem::take(&mut *this.0.acks.borrow_mut());
                this.send(encode_acks(&seqs));
            });
        }
    }

    /// Stops writing; the writer task ends.
    pub fn close(&self) {
        self.0.closed.set(true);
        self.0.wake.notify_one();
    }
}

/// A non-blocking `send` on an io_uring socket: when the connection is idle, a small frame
/// leaves at once instead of waiting for the writer task and a ring submission.
fn try_send_now(stream: &tokio_uring::net::TcpStream, frame: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for as long as `stream` lives; the buffer is valid for its length.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Frames waiting to be written: small ones coalesced into one buffer (one write for many), large
/// ones kept as they are (written from where they were encoded, never copied again).
#[derive(Default)]
struct OutQueue {
    chunks: std::collections::VecDeque<Vec<u8>>,
    /// Bytes of the first chunk already written.
    head: usize,
    /// Whether the last chunk is a batch of small frames that more may join.
    small_tail: bool,
}

/// Frames under this size are copied into a shared batch; larger ones are queued whole.
const COALESCE_BELOW: usize = 16 << 10;

impl OutQueue {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    fn push(&mut self, frame: Vec<u8>) {
        if frame.len() < COALESCE_BELOW {
            if self.small_tail {
                if let Some(last) = self.chunks.back_mut() {
                    if last.len() + frame.len() <= 256 << 10 {
                        last.extend_from_slice(&frame);
                        return;
                    }
                }
            }
            self.small_tail = true;
        } else {
            self.small_tail = false;
        }
        self.chunks.push_back(frame);
    }

    fn push_partly_written(&mut self, frame: Vec<u8>, written: usize) {
        debug_assert!(self.chunks.is_empty());
        self.chunks.push_back(frame);
        self.head = written;
        self.small_tail = false;
    }

    fn io_slices(&self) -> Vec<std::io::IoSlice<'_>> {
        self.chunks
            .iter()
            .take(64)
            .enumerate()
            .map(|(i, c)| std::io::IoSlice::new(if i == 0 { &c[self.head..] } else { c }))
            .collect()
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(first) = self.chunks.front() else {
                return;
            };
            let left = first.len() - self.head;
            if n < left {
                self.head += n;
                return;
            }
            n -= left;
            self.head = 0;
            self.chunks.pop_front();
        }
        if self.chunks.is_empty() {
            self.small_tail = false;
        }
    }

    fn take_all(&mut self) -> Vec<Vec<u8>> {
        let mut chunks: Vec<Vec<u8>> = self.chunks.drain(..).collect();
        if self.head > 0 {
            chunks[0].drain(..self.head);
            self.head = 0;
        }
        self.small_tail = false;
        chunks
    }
}

/// Bytes a frame occupies, once its segment table is readable; `Err` for a frame over limits.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let segments = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize + 1;
    if segments > 512 {
        return Err(format!("frame has {segments} segments"));
    }
    let header = (4 + 4 * segments).div_ceil(8) * 8;
    if buf.len() < 4 + 4 * segments {
        return Ok(None);
    }
    let mut words = 0usize;
    for i in 0..segments {
        let at = 4 + 4 * i;
        words += u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
    }
    let total = header + words * 8;
    if total > MAX_FRAME_BYTES {
        return Err(format!(
            "frame of {total} bytes is over the {MAX_FRAME_BYTES}-byte limit"
        ));
    }
    Ok(Some(total))
}

/// Reads frames from a connection until it ends; returns the reason it ended.
/// Reads what `stream` has, as `try_read` does, but when the read comes back short of `buf`
/// (the socket's queue is empty) it also clears the stream's read readiness, so the next wait
/// sleeps until new data instead of making one more `recv` only to get `EAGAIN`. That `recv`
/// was one in two of all receive calls on the request path (and fired the TCP probe).
///
/// Tokio clears readiness only if no newer readiness event arrived since the one this read
/// used, so data that lands right after the short read still wakes the next wait.
fn read_draining(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut got = None;
    let r = stream.try_io(tokio::io::Interest::READABLE, || {
        // SAFETY: `buf` is valid for writes of its length; the fd is the stream's, open while
        // `stream` is borrowed.
        let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        if n > 0 && n < buf.len() {
            got = Some(n);
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, got) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

async fn read_frames(stream: Conn, mut on_frame: impl FnMut(Inbound)) -> Result<(), String> {
    // Words, not bytes: frames start 8-byte aligned, so they are read in place.
    let mut buf = AlignedBuf {
        words: capnp::Word::allocate_zeroed_vec(8 << 10),
    };
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        loop {
            let bytes = &buf.bytes()[start..end];
            let Some(len) = frame_len(bytes)? else { break };
            if bytes.len() < len {
                break;
            }
            let frame = {
                let mut slice = &bytes[..len];
                let msg =
                    capnp::serialize::read_message_from_flat_slice(&mut slice, reader_options())
                        .map_err(|e| format!("malformed frame: {e}"))?;
                decode(&msg).map_err(|e| format!("malformed frame: {e}"))?
            };
            start += len;
            on_frame(frame);
        }
        if start == end {
            start = 0;
            end = 0;
        }
        let capacity = buf.words.len() * 8;
        let need = frame_len(&buf.bytes()[start..end])?.unwrap_or(64);
        if start > 0 && (end == capacity || start + need > capacity) {
            buf.bytes_mut().copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if need > capacity {
            // Room for several frames of this size, so large frames are not compacted each time.
            let words = (need * 4).min(need + (64 << 20)).div_ceil(8);
            buf.words.resize(words, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
        }
        let n = match &stream {
            Conn::Epoll(s) => {
                s.readable().await.map_err(|e| e.to_string())?;
                match read_draining(s, &mut buf.bytes_mut()[end..]) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            Conn::Uring(s) => {
                use tokio_uring::buf::BoundedBuf;
                let total = buf.words.len() * 8;
                let (result, slice) = s.read(buf.slice(end..total)).await;
                buf = slice.into_inner();
                result.map_err(|e| e.to_string())?
            }
        };
        count_io(n, 0);
        if n == 0 {
            return if start == end {
                Ok(())
            } else {
                Err("connection closed in the middle of a frame".into())
            };
        }
        end += n;
    }
}

/// Frames an endpoint receives on connections others opened to it.
pub trait Handler: 'static {
    fn request(self: Rc<Self>, seq: u64, hop: Hop, from: &Sender);
    fn output(self: Rc<Self>, out: OutputMsg);
    fn invoke(self: Rc<Self>, inv: InvokeMsg, from: &Sender);
}

/// Accepts data-plane connections on `listener` and hands their frames to `handler`.
pub async fn serve<H: Handler>(listener: Listener, handler: Rc<H>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("data plane accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::task::spawn_local(async move {
            let sender = Sender::new(stream.clone());
            let result = read_frames(stream, |f| match f {
                Inbound::Request { seq, hop } => handler.clone().request(seq, hop, &sender),
                Inbound::Output(o) => handler.clone().output(o),
                Inbound::Invoke(i) => handler.clone().invoke(i, &sender),
                Inbound::Acks(_) | Inbound::Reply(_) => {
                    debug!(%peer, "unexpected frame on an inbound connection")
                }
            })
            .await;
            sender.close();
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

enum PeerSender {
    Connecting(mpsc::UnboundedSender<Vec<u8>>),
    Connected(Sender),
}

impl PeerSender {
    fn send(&self, frame: Vec<u8>) -> bool {
        match self {
            PeerSender::Connecting(tx) => tx.send(frame).is_ok(),
            PeerSender::Connected(s) => s.send(frame),
        }
    }
}

/// An outbound connection to one replica's data-plane address.
struct Peer {
    sender: RefCell<PeerSender>,
    next_seq: Cell<u64>,
    unacked: RefCell<HashMap<u64, Hop>>,
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
        // Frames queue here until the connection is up, then go straight to the socket.
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let peer = Rc::new(Peer {
            sender: RefCell::new(PeerSender::Connecting(tx)),
            next_seq: Cell::new(1),
            unacked: RefCell::new(HashMap::new()),
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
                            for s in seqs {
                                unacked.remove(&s);
                            }
                            acked.notify_waiters();
                        }
                    })
                    .await;
                    sender.close();
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
    pub fn send_request(self: &Rc<Self>, addr: &Rc<str>, hop: Hop) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(payload: &'static [u8]) -> Hop {
        Hop {
            invocation: 7,
            graph_id: "g1".into(),
            epoch: 3,
            task: "t".into(),
            port: "in".into(),
            payload: Bytes::from_static(payload),
            deadline_unix_us: 99,
            reply_to: "127.0.0.1:1".into(),
            attempt: 1,
            sent_unix_ns: 0,
            admitted_unix_ns: 0,
        }
    }

    #[test]
    fn request_frames_round_trip() {
        let frame = encode_request(42, &hop(b"payload"));
        assert_eq!(frame_len(&frame), Ok(Some(frame.len())));
        assert_eq!(frame_len(&frame[..3]), Ok(None));
        let Ok(Inbound::Request { seq, hop: back }) = decode_frame(&frame) else {
            panic!("not a request");
        };
        assert_eq!(seq, 42);
        assert_eq!(
            (&*back.task, &back.payload[..], back.epoch, back.attempt),
            ("t", &b"payload"[..], 3, 1)
        );
        assert!(
            back.sent_unix_ns > 0,
            "the send time travels for transfer measurements"
        );
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let mut huge = vec![0u8; 8];
        huge[4..8].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(frame_len(&huge).is_err());
        let garbage = b"GET / HTTP/1.1\r\n";
        assert!(frame_len(garbage).is_err());
    }

    #[test]
    fn the_out_queue_coalesces_small_frames_and_keeps_large_ones_whole() {
        let mut q = OutQueue::default();
        q.push(vec![1; 10]);
        q.push(vec![2; 10]);
        q.push(vec![3; 100 << 10]);
        q.push(vec![4; 10]);
        assert_eq!(q.chunks.len(), 3);
        assert_eq!(q.chunks[0].len(), 20);
        q.advance(25);
        assert_eq!((q.chunks.len(), q.head), (2, 5));
        let all = q.take_all();
        assert_eq!(all[0].len(), (100 << 10) - 5);
        assert!(q.is_empty());
    }
}
