//! Per-request measurements: every execution is recorded by its worker into per-second windows
//! of mergeable sketches, batched (Cap'n Proto `TelemetryBatch`) to the agent every second over
//! the worker's stdout with a sample of individual spans, and forwarded to the control node.
//!
//! Architecture invariant: telemetry never blocks the request path. Buffers are bounded; when a
//! batch cannot be handed on, its executions are counted as dropped and the count travels with
//! the next batch.

use prescient_schemas::agent_capnp::telemetry_batch;
use prescient_schemas::sketch::Sketch;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

/// Individual spans kept per second as a sample for tracing; every execution is counted in
/// the per-second windows regardless.
const SAMPLE_PER_SECOND: u32 = 32;

#[derive(Debug, Clone)]
pub struct SpanRec {
    pub graph_id: Rc<str>,
    pub task: Rc<str>,
    pub replica: Rc<str>,
    pub invocation: u64,
    pub queue_ns: u64,
    pub exec_ns: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub transfer_ns: u64,
    pub start_unix_ns: u64,
    pub ok: bool,
    /// Sink tasks: from the invocation's admission at the ingress to this execution's end
    /// (0: not a sink, or the admission time is unknown).
    pub sink_ns: u64,
}

/// One second of one replica's executions.
struct Window {
    graph_id: Rc<str>,
    task: Rc<str>,
    replica: Rc<str>,
    errors: u64,
    input_bytes: u64,
    output_bytes: u64,
    exec: Sketch,
    queue: Sketch,
    sink: Sketch,
}

/// What a worker measured since its last flush: every execution, aggregated per second into
/// mergeable sketches (so shipping it costs the same at 10 or 100,000 executions a second),
/// plus a small sample of individual spans.
/// One second of requests arriving on one input port.
struct EdgeWin {
    graph_id: Rc<str>,
    task: Rc<str>,
    bytes: u64,
    transfer: Sketch,
}

#[derive(Default)]
pub struct SpanBuffer {
    windows: RefCell<BTreeMap<u64, Window>>,
    edges: RefCell<BTreeMap<(u64, Rc<str>), EdgeWin>>,
    sample: RefCell<Vec<SpanRec>>,
    sampled: Cell<(u64, u32)>,
    dropped: Cell<u64>,
    off: Cell<bool>,
}

impl SpanBuffer {
    /// Turns recording off (for measuring telemetry's own cost).
    pub fn disable(&self) {
        self.off.set(true);
    }

    /// Whether executions are recorded: not turned off here, nor for the whole process by
    /// signal. One relaxed load of a flag: cheap enough to ask on every request, so a switch
    /// takes effect at once.
    pub fn enabled(&self) -> bool {
        !self.off.get() && !switched_off()
    }

    /// Records a request's arrival on an input port (its edge): bytes and transfer time.
    pub fn record_arrival(
        &self,
        graph_id: &Rc<str>,
        task: &Rc<str>,
        port: &Rc<str>,
        received_unix_ns: u64,
        transfer_ns: u64,
        bytes: u64,
    ) {
        if !self.enabled() {
            return;
        }
        let mut edges = self.edges.borrow_mut();
        let e = edges
            .entry((received_unix_ns / 1_000_000_000, port.clone()))
            .or_insert_with(|| EdgeWin {
                graph_id: graph_id.clone(),
                task: task.clone(),
                bytes: 0,
                transfer: Sketch::default(),
            });
        e.bytes += bytes;
        e.transfer.record(transfer_ns as f64);
    }

    pub fn record(&self, s: SpanRec) {
        if !self.enabled() {
            return;
        }
        let second = s.start_unix_ns / 1_000_000_000;
        {
            let mut windows = self.windows.borrow_mut();
            let w = windows.entry(second).or_insert_with(|| Window {
                graph_id: s.graph_id.clone(),
                task: s.task.clone(),
                replica: s.replica.clone(),
                errors: 0,
                input_bytes: 0,
                output_bytes: 0,
                exec: Sketch::default(),
                queue: Sketch::default(),
                sink: Sketch::default(),
            });
            w.exec.record(s.exec_ns as f64);
            if s.sink_ns > 0 {
                w.sink.record(s.sink_ns as f64);
            }
            w.queue.record(s.queue_ns as f64);
            // Transfer time is recorded once per arrival, on its edge (`record_arrival`); the
            // control node derives the task's from its edges.
            w.input_bytes += s.input_bytes;
            w.output_bytes += s.output_bytes;
            if !s.ok {
                w.errors += 1;
            }
        }
        let (at, n) = self.sampled.get();
        let n = if at == second { n } else { 0 };
        if n < SAMPLE_PER_SECOND {
            self.sampled.set((second, n + 1));
            self.sample.borrow_mut().push(s);
        }
    }

    /// Takes what was recorded as an encoded batch, or None when there is nothing to send.
    pub fn take_batch(&self, host: &str) -> Option<(Vec<u8>, usize)> {
        let windows = std::mem::take(&mut *self.windows.borrow_mut());
        let edges = std::mem::take(&mut *self.edges.borrow_mut());
        let spans = std::mem::take(&mut *self.sample.borrow_mut());
        let dropped = self.dropped.replace(0);
        if windows.is_empty() && edges.is_empty() && dropped == 0 {
            return None;
        }
        let executions: u64 = windows.values().map(|w| w.exec.count()).sum();
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut b = msg.init_root::<telemetry_batch::Builder<'_>>();
            b.set_host_id(host);
            b.set_dropped_spans(dropped);
            let mut list = b.reborrow().init_windows(windows.len() as u32);
            for (i, (second, w)) in windows.iter().enumerate() {
                let mut x = list.reborrow().get(i as u32);
                x.set_graph_id(&*w.graph_id);
                x.set_task(&*w.task);
                x.set_replica(&*w.replica);
                x.set_second(*second);
                x.set_errors(w.errors);
                x.set_input_bytes(w.input_bytes);
                x.set_output_bytes(w.output_bytes);
                w.exec.encode(x.reborrow().init_exec_ns());
                w.queue.encode(x.reborrow().init_queue_ns());
                w.sink.encode(x.init_sink_ns());
            }
            let mut list = b.reborrow().init_edges(edges.len() as u32);
            for (i, ((second, port), e)) in edges.iter().enumerate() {
                let mut x = list.reborrow().get(i as u32);
                x.set_graph_id(&*e.graph_id);
                x.set_task(&*e.task);
                x.set_port(&**port);
                x.set_second(*second);
                x.set_bytes(e.bytes);
                e.transfer.encode(x.init_transfer_ns());
            }
            let mut list = b.init_spans(spans.len() as u32);
            for (i, s) in spans.iter().enumerate() {
                let mut x = list.reborrow().get(i as u32);
                x.set_graph_id(&*s.graph_id);
                x.set_task(&*s.task);
                x.set_replica(&*s.replica);
                x.set_vm(&*s.replica);
                x.set_invocation_id(s.invocation);
                x.set_queue_ns(s.queue_ns);
                x.set_exec_ns(s.exec_ns);
                x.set_input_bytes(s.input_bytes);
                x.set_output_bytes(s.output_bytes);
                x.set_transfer_ns(s.transfer_ns);
                x.set_start_unix_ns(s.start_unix_ns);
                x.set_ok(s.ok);
            }
        }
        Some((
            capnp::serialize::write_message_to_words(&msg),
            executions as usize,
        ))
    }

    /// Counts executions lost after they were batched (the writer was full).
    pub fn lost(&self, n: usize) {
        self.dropped.set(self.dropped.get() + n as u64);
    }
}

/// Set by SIGUSR1, cleared by SIGUSR2: per-request telemetry off for the whole process.
static SWITCHED_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_switch_signal(signal: libc::c_int) {
    SWITCHED_OFF.store(
        signal == libc::SIGUSR1,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Lets SIGUSR1 turn per-request telemetry off and SIGUSR2 on again, in a running process
/// (`prescient bench chain --compare-telemetry` measures one cluster both ways). The switch
/// takes effect at the next request.
pub fn install_switch_signals() {
    let handler = on_switch_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGUSR1, handler);
        libc::signal(libc::SIGUSR2, handler);
    }
}

/// Whether this process's per-request telemetry was switched off by signal.
pub fn switched_off() -> bool {
    SWITCHED_OFF.load(std::sync::atomic::Ordering::Relaxed)
}

/// A writer thread for batches, so a slow reader never stalls the worker's event loop.
pub struct BatchWriter {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl BatchWriter {
    pub fn new(mut out: impl std::io::Write + Send + 'static) -> BatchWriter {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        std::thread::spawn(move || {
            for batch in rx {
                if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                    return;
                }
            }
        });
        BatchWriter { tx }
    }

    /// Queues a batch; false when it had to be dropped.
    pub fn send(&self, batch: Vec<u8>) -> bool {
        self.tx.try_send(batch).is_ok()
    }
}
