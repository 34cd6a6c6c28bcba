//! Per-request measurements: every execution is recorded by its worker into per-second windows
//! of mergeable sketches, batched (Cap'n Proto `TelemetryBatch`) to the agent every second over
//! the worker's stdout with a sample of individual spans, and forwarded to the control node.
//!
//! Architecture invariant: telemetry never blocks the request path. Buffers are bounded; when a
//! batch cannot be handed on, its executions are counted as dropped and the count travels with
//! the next batch.
//!
//! Why recording only appends: an execution's record is written as plain numbers to a short
//! staging buffer, and the buffer is folded into the sketches a batch at a time. Updating
//! sketches per request touched a dozen cache lines (tree nodes, three sketches' buckets,
//! reference counts) that the kernel's networking had evicted since the last request; that,
//! not the arithmetic, was most of what spans cost.

use prescient_schemas::agent_capnp::telemetry_batch;
use prescient_schemas::sketch::Sketch;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// Individual spans kept per second as a sample for tracing; every execution is counted in
/// the per-second windows regardless.
const SAMPLE_PER_SECOND: u32 = 32;

/// Staged records folded into the sketches at once: small enough to stay in cache (80 bytes
/// each), large enough that folding runs with the sketches warm.
const FOLD_AT: usize = 128;

/// One execution, as measured on the request path.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Execution {
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

impl Execution {
    fn second(&self) -> u64 {
        self.start_unix_ns / 1_000_000_000
    }
}

/// What a window is kept for besides its second: a task (task "" is a whole graph, measured at
/// the ingress) on one replica, or an input port of a task (`third` is then the port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Series {
    graph_id: Rc<str>,
    task: Rc<str>,
    third: Rc<str>,
}

/// The series recorded since the last batch, each with a small index that staged records and
/// windows carry instead of three reference-counted names.
#[derive(Default)]
struct SeriesTable {
    list: Vec<Series>,
    by_name: HashMap<Series, u32>,
    /// The series found last: a worker records one series (one per input port), and an
    /// ingress mostly runs of one graph, so most lookups stop at one comparison.
    last: Option<u32>,
}

impl SeriesTable {
    fn index(&mut self, graph_id: &Rc<str>, task: &Rc<str>, third: &Rc<str>) -> u32 {
        // Names decoded from a frame are fresh copies: compared by content, short strings.
        let same = |a: &Rc<str>, b: &Rc<str>| Rc::ptr_eq(a, b) || a == b;
        if let Some(i) = self.last {
            let s = &self.list[i as usize];
            if same(&s.third, third) && same(&s.task, task) && same(&s.graph_id, graph_id) {
                return i;
            }
        }
        let key = Series {
            graph_id: graph_id.clone(),
            task: task.clone(),
            third: third.clone(),
        };
        let i = match self.by_name.get(&key) {
            Some(i) => *i,
            None => {
                let i = self.list.len() as u32;
                self.list.push(key.clone());
                self.by_name.insert(key, i);
                i
            }
        };
        self.last = Some(i);
        i
    }

    fn get(&self, i: u32) -> &Series {
        &self.list[i as usize]
    }
}

/// One second of one replica's executions.
#[derive(Default)]
struct Window {
    errors: u64,
    input_bytes: u64,
    output_bytes: u64,
    exec: Sketch,
    queue: Sketch,
    sink: Sketch,
}

/// One second of requests arriving on one input port.
#[derive(Default)]
struct EdgeWin {
    bytes: u64,
    transfer: Sketch,
}

#[derive(Clone, Copy)]
struct StagedArrival {
    edge: u32,
    received_unix_ns: u64,
    transfer_ns: u64,
    bytes: u64,
}

/// What a worker (or an ingress) measured since its last flush: every execution, aggregated
/// per second into mergeable sketches (so shipping it costs the same at 10 or 100,000
/// executions a second), plus a small sample of individual spans.
#[derive(Default)]
pub struct SpanBuffer {
    tasks: RefCell<SeriesTable>,
    ports: RefCell<SeriesTable>,
    staged: RefCell<Vec<(u32, Execution)>>,
    staged_arrivals: RefCell<Vec<StagedArrival>>,
    windows: RefCell<BTreeMap<(u64, u32), Window>>,
    edges: RefCell<BTreeMap<(u64, u32), EdgeWin>>,
    sample: RefCell<Vec<(u32, Execution)>>,
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
        let edge = self.ports.borrow_mut().index(graph_id, task, port);
        let mut staged = self.staged_arrivals.borrow_mut();
        staged.push(StagedArrival {
            edge,
            received_unix_ns,
            transfer_ns,
            bytes,
        });
        if staged.len() >= FOLD_AT {
            self.fold_arrivals(&mut staged);
        }
    }

    /// Records an execution of `task` (`""`: a whole invocation, at the ingress) of graph
    /// `graph_id` on `replica`.
    pub fn record(&self, graph_id: &Rc<str>, task: &Rc<str>, replica: &Rc<str>, e: Execution) {
        if !self.enabled() {
            return;
        }
        let series = self.tasks.borrow_mut().index(graph_id, task, replica);
        let second = e.second();
        let (at, n) = self.sampled.get();
        let n = if at == second { n } else { 0 };
        if n < SAMPLE_PER_SECOND {
            self.sampled.set((second, n + 1));
            self.sample.borrow_mut().push((series, e));
        }
        let mut staged = self.staged.borrow_mut();
        staged.push((series, e));
        if staged.len() >= FOLD_AT {
            self.fold(&mut staged);
        }
    }

    /// Adds staged executions to their windows.
    fn fold(&self, staged: &mut Vec<(u32, Execution)>) {
        let key_of = |(series, e): &(u32, Execution)| (e.second(), *series);
        fold_runs(
            staged,
            &mut self.windows.borrow_mut(),
            key_of,
            |w, (_, e)| {
                w.exec.record(e.exec_ns as f64);
                w.queue.record(e.queue_ns as f64);
                if e.sink_ns > 0 {
                    w.sink.record(e.sink_ns as f64);
                }
                // Transfer time is recorded once per arrival, on its edge (`record_arrival`); the
                // control node derives the task's from its edges.
                w.input_bytes += e.input_bytes;
                w.output_bytes += e.output_bytes;
                w.errors += u64::from(!e.ok);
            },
        );
    }

    fn fold_arrivals(&self, staged: &mut Vec<StagedArrival>) {
        let key_of = |a: &StagedArrival| (a.received_unix_ns / 1_000_000_000, a.edge);
        fold_runs(staged, &mut self.edges.borrow_mut(), key_of, |e, a| {
            e.bytes += a.bytes;
            e.transfer.record(a.transfer_ns as f64);
        });
    }

    /// Takes what was recorded as an encoded batch, or None when there is nothing to send.
    pub fn take_batch(&self, host: &str) -> Option<(Vec<u8>, usize)> {
        self.fold(&mut self.staged.borrow_mut());
        self.fold_arrivals(&mut self.staged_arrivals.borrow_mut());
        let windows = std::mem::take(&mut *self.windows.borrow_mut());
        let edges = std::mem::take(&mut *self.edges.borrow_mut());
        let spans = std::mem::take(&mut *self.sample.borrow_mut());
        // Nothing staged or sampled refers to the series any more: start the tables afresh, so
        // graphs that are gone do not keep theirs.
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        let ports = std::mem::take(&mut *self.ports.borrow_mut());
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
            for (i, ((second, series), w)) in windows.iter().enumerate() {
                let s = tasks.get(*series);
                let mut x = list.reborrow().get(i as u32);
                x.set_graph_id(&*s.graph_id);
                x.set_task(&*s.task);
                x.set_replica(&*s.third);
                x.set_second(*second);
                x.set_errors(w.errors);
                x.set_input_bytes(w.input_bytes);
                x.set_output_bytes(w.output_bytes);
                w.exec.encode(x.reborrow().init_exec_ns());
                w.queue.encode(x.reborrow().init_queue_ns());
                w.sink.encode(x.init_sink_ns());
            }
            let mut list = b.reborrow().init_edges(edges.len() as u32);
            for (i, ((second, edge), e)) in edges.iter().enumerate() {
                let s = ports.get(*edge);
                let mut x = list.reborrow().get(i as u32);
                x.set_graph_id(&*s.graph_id);
                x.set_task(&*s.task);
                x.set_port(&*s.third);
                x.set_second(*second);
                x.set_bytes(e.bytes);
                e.transfer.encode(x.init_transfer_ns());
            }
            let mut list = b.init_spans(spans.len() as u32);
            for (i, (series, e)) in spans.iter().enumerate() {
                let s = tasks.get(*series);
                let mut x = list.reborrow().get(i as u32);
                x.set_graph_id(&*s.graph_id);
                x.set_task(&*s.task);
                x.set_replica(&*s.third);
                x.set_vm(&*s.third);
                x.set_invocation_id(e.invocation);
                x.set_queue_ns(e.queue_ns);
                x.set_exec_ns(e.exec_ns);
                x.set_input_bytes(e.input_bytes);
                x.set_output_bytes(e.output_bytes);
                x.set_transfer_ns(e.transfer_ns);
                x.set_start_unix_ns(e.start_unix_ns);
                x.set_ok(e.ok);
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

/// Empties `staged` into the windows of `into`, a run of records with the same key at a time
/// (one map lookup per run: a worker's records mostly share one second and one series).
fn fold_runs<T, K: Ord + Copy, W: Default>(
    staged: &mut Vec<T>,
    into: &mut BTreeMap<K, W>,
    key_of: impl Fn(&T) -> K,
    mut add: impl FnMut(&mut W, &T),
) {
    let mut rest = &staged[..];
    while let Some(first) = rest.first() {
        let key = key_of(first);
        let run = rest
            .iter()
            .position(|t| key_of(t) != key)
            .unwrap_or(rest.len());
        let w = into.entry(key).or_default();
        for t in &rest[..run] {
            add(w, t);
        }
        rest = &rest[run..];
    }
    staged.clear();
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
    thread: std::thread::JoinHandle<()>,
}

impl BatchWriter {
    pub fn new(mut out: impl std::io::Write + Send + 'static) -> BatchWriter {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let thread = std::thread::spawn(move || {
            for batch in rx {
                if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                    return;
                }
            }
        });
        BatchWriter { tx, thread }
    }

    /// Writes what is queued, then returns (a worker's last batch before it exits).
    pub fn finish(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }

    /// Queues a batch; false when it had to be dropped.
    pub fn send(&self, batch: Vec<u8>) -> bool {
        self.tx.try_send(batch).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prescient_schemas::agent_capnp::telemetry_batch;

    fn decode(batch: &[u8]) -> capnp::message::Reader<capnp::serialize::OwnedSegments> {
        capnp::serialize::read_message(&mut &batch[..], capnp::message::ReaderOptions::new())
            .expect("a batch decodes")
    }

    /// Windows per (second, graph, task, replica) with their execution counts and errors.
    fn windows(batch: &[u8]) -> Vec<(u64, String, String, String, u64, u64)> {
        let msg = decode(batch);
        let b = msg.get_root::<telemetry_batch::Reader<'_>>().unwrap();
        let text = |t| prescient_schemas::codec::text(t).unwrap();
        let mut out: Vec<_> = b
            .get_windows()
            .unwrap()
            .iter()
            .map(|w| {
                let exec =
                    prescient_schemas::sketch::Sketch::decode(w.get_exec_ns().unwrap()).unwrap();
                (
                    w.get_second(),
                    text(w.get_graph_id()),
                    text(w.get_task()),
                    text(w.get_replica()),
                    exec.count(),
                    w.get_errors(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn execution(second: u64, ok: bool) -> Execution {
        Execution {
            start_unix_ns: second * 1_000_000_000 + 5,
            exec_ns: 1000,
            queue_ns: 10,
            ok,
            ..Default::default()
        }
    }

    #[test]
    fn every_execution_lands_in_its_own_graphs_window_across_folds() {
        let spans = SpanBuffer::default();
        let (a, b, whole, host): (Rc<str>, Rc<str>, Rc<str>, Rc<str>) =
            ("ga".into(), "gb".into(), "".into(), "h1".into());
        // More than one fold's worth, interleaving two graphs and two seconds, as an ingress
        // serving two graphs sees them.
        for i in 0..(3 * FOLD_AT as u64 + 7) {
            let graph = if i.is_multiple_of(3) { &b } else { &a };
            // A fresh copy of the name (as decoded from a frame) finds the same series.
            let host = if i.is_multiple_of(2) {
                host.clone()
            } else {
                "h1".into()
            };
            spans.record(
                graph,
                &whole,
                &host,
                execution(100 + i % 2, !i.is_multiple_of(5)),
            );
        }
        let (batch, n) = spans.take_batch("h1").expect("something recorded");
        assert_eq!(n, 3 * FOLD_AT + 7);
        let got = windows(&batch);
        let count = |g: &str, s: u64| -> (u64, u64) {
            got.iter()
                .filter(|w| w.1 == g && w.0 == s)
                .map(|w| (w.4, w.5))
                .fold((0, 0), |x, y| (x.0 + y.0, x.1 + y.1))
        };
        let expect = |g: usize, s: u64| -> (u64, u64) {
            let is = |i: &u64| i.is_multiple_of(3) == (g == 1) && 100 + i % 2 == s;
            let all: Vec<u64> = (0..(3 * FOLD_AT as u64 + 7)).filter(is).collect();
            (
                all.len() as u64,
                all.iter().filter(|i| i.is_multiple_of(5)).count() as u64,
            )
        };
        assert_eq!(count("ga", 100), expect(0, 100));
        assert_eq!(count("ga", 101), expect(0, 101));
        assert_eq!(count("gb", 100), expect(1, 100));
        assert_eq!(count("gb", 101), expect(1, 101));
        // One window per graph and second: runs of one window merged, not one per fold.
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(spans.take_batch("h1").is_none(), "a batch is taken once");
    }

    #[test]
    fn an_ingress_with_many_graphs_keeps_one_window_each() {
        let spans = SpanBuffer::default();
        let graphs: Vec<Rc<str>> = (0..300).map(|i| format!("g{i}").into()).collect();
        let (whole, host): (Rc<str>, Rc<str>) = ("".into(), "h1".into());
        for round in 0..3 {
            for g in &graphs {
                spans.record(g, &whole, &host, execution(50, round != 1));
            }
        }
        let (batch, n) = spans.take_batch("h1").expect("recorded");
        assert_eq!(n, 900);
        let got = windows(&batch);
        assert_eq!(got.len(), 300);
        assert!(got.iter().all(|w| w.4 == 3 && w.5 == 1), "{:?}", &got[..3]);
    }

    #[test]
    fn arrivals_are_kept_per_port_and_nothing_is_recorded_when_off() {
        let spans = SpanBuffer::default();
        let (g, t): (Rc<str>, Rc<str>) = ("g".into(), "join".into());
        for i in 0..(FOLD_AT as u64 + 3) {
            let port: Rc<str> = if i.is_multiple_of(2) {
                "left".into()
            } else {
                "right".into()
            };
            spans.record_arrival(&g, &t, &port, 7_000_000_000 + i, 500, 10);
        }
        let (batch, _) = spans.take_batch("h").expect("arrivals recorded");
        let msg = decode(&batch);
        let b = msg.get_root::<telemetry_batch::Reader<'_>>().unwrap();
        let mut ports: Vec<(String, u64)> = b
            .get_edges()
            .unwrap()
            .iter()
            .map(|e| (e.get_port().unwrap().to_string().unwrap(), e.get_bytes()))
            .collect();
        ports.sort();
        let left = (FOLD_AT as u64 + 3).div_ceil(2);
        let right = (FOLD_AT as u64 + 3) / 2;
        assert_eq!(
            ports,
            vec![("left".into(), 10 * left), ("right".into(), 10 * right)]
        );
        spans.disable();
        spans.record(&g, &t, &"r".into(), execution(1, true));
        spans.record_arrival(&g, &t, &"left".into(), 1, 1, 1);
        assert!(spans.take_batch("h").is_none());
    }
}
