//! Per-request spans: recorded by workers, batched (Cap'n Proto `TelemetryBatch`) to their
//! agent every second over the worker's stdout, and forwarded by the agent to the control node.
//!
//! Architecture invariant: telemetry never blocks the request path. Buffers are bounded; when one
//! is full, spans are dropped and counted, and the count travels with the next batch.

use prescient_schemas::agent_capnp::telemetry_batch;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Spans a worker holds between flushes.
const MAX_BUFFERED_SPANS: usize = 100_000;

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
}

#[derive(Default)]
pub struct SpanBuffer {
    spans: RefCell<Vec<SpanRec>>,
    dropped: Cell<u64>,
    off: Cell<bool>,
}

impl SpanBuffer {
    /// Turns span recording off (for measuring telemetry's own cost).
    pub fn disable(&self) {
        self.off.set(true);
    }

    pub fn enabled(&self) -> bool {
        !self.off.get()
    }

    pub fn record(&self, s: SpanRec) {
        if self.off.get() {
            return;
        }
        let mut spans = self.spans.borrow_mut();
        if spans.len() >= MAX_BUFFERED_SPANS {
            self.dropped.set(self.dropped.get() + 1);
        } else {
            spans.push(s);
        }
    }

    /// Takes what was recorded as an encoded batch, or None when there is nothing to send.
    pub fn take_batch(&self, host: &str) -> Option<(Vec<u8>, usize)> {
        let spans = std::mem::take(&mut *self.spans.borrow_mut());
        let dropped = self.dropped.replace(0);
        if spans.is_empty() && dropped == 0 {
            return None;
        }
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut b = msg.init_root::<telemetry_batch::Builder<'_>>();
            b.set_host_id(host);
            b.set_dropped_spans(dropped);
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
        Some((capnp::serialize::write_message_to_words(&msg), spans.len()))
    }

    /// Counts spans lost after they were batched (the writer was full).
    pub fn lost(&self, n: usize) {
        self.dropped.set(self.dropped.get() + n as u64);
    }
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
