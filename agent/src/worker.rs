//! The worker: runs one task replica inside its "VM" (a process slot or a microVM), receiving
//! requests on its own data-plane address and sending its outputs straight to the next
//! replicas, so neither the agent nor the control node sits on the request path.
//!
//! It is driven by its agent through [`Command`]s (Cap'n Proto `WorkerCommand` messages on
//! stdin); it exits when that stream ends, so a worker never outlives its agent.

use crate::dataplane::{self, encode_output, now_unix_us, Hop, OutputMsg, Sender};
use crate::request_path::forward::Forwarder;
use crate::request_path::routes::GraphRoutes;
use crate::runtime::builtin::Kernel;
use crate::runtime::Runner;
use bytes::Bytes;
use prescient_schemas::agent_capnp::worker_command;
use prescient_schemas::{codec, GraphRecord};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Why a worker could not take a command or start serving.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("malformed command from the agent: {0}")]
    Command(#[from] capnp::Error),
    #[error("a command this worker does not know (from a newer agent?): {0}")]
    Unknown(#[from] capnp::NotInSchema),
    #[error("malformed graph in a deploy command: {0}")]
    Graph(#[from] codec::DecodeError),
    #[error("malformed routing table: {0}")]
    Routes(#[from] crate::request_path::routes::RoutesError),
    #[error("graph {graph} has no task {task:?}")]
    NoTask { graph: String, task: String },
    #[error("task {task}: {source}")]
    Kernel {
        task: String,
        source: crate::runtime::builtin::KernelError,
    },
    #[error(transparent)]
    Artifact(#[from] crate::runtime::exec::ArtifactError),
    #[error(transparent)]
    Onnx(#[from] crate::runtime::onnx::OnnxError),
    #[error("the agent closed stdin before deploying a task")]
    NoDeploy,
    #[error("the first command must deploy a task")]
    NotDeployFirst,
    #[error("ONNX tasks do not run in microVMs yet: the guest worker is static (musl) and cannot load ONNX Runtime; run the task on an agent with process workers")]
    OnnxInVm,
    #[error(transparent)]
    Sent(#[from] crate::runtime::sent::SentError),
    #[error("binding the data plane on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Recent inputs to warm up on, the task's recent execution p50 and how long at most.
#[derive(Debug, Default)]
pub struct WarmupPlan {
    pub samples: Vec<Vec<Bytes>>,
    pub target_ns: u64,
    pub timeout: Duration,
}

/// What an agent tells its worker.
pub enum Command {
    Deploy {
        replica: String,
        record: GraphRecord,
        task: String,
        /// The agent's verified local copy of the task's artifact, if it has one.
        artifact_path: String,
        warmup: WarmupPlan,
    },
    Routes(GraphRoutes),
    Drain,
    /// A piece of the artifact, for a worker that cannot read the agent's copy (in a VM).
    Artifact {
        sha256_hex: String,
        data: Bytes,
    },
}

use crate::runtime::sent::keep_artifact_piece;
pub use crate::runtime::sent::SENT_ARTIFACTS;

impl Command {
    pub fn decode(r: worker_command::Reader<'_>) -> Result<Command, WorkerError> {
        Ok(match r.which()? {
            worker_command::Deploy(spec) => {
                let spec = spec?;
                let mut samples = Vec::new();
                for s in spec.get_warmup()? {
                    let mut inputs = Vec::new();
                    for d in s.get_inputs()? {
                        inputs.push(Bytes::copy_from_slice(d?));
                    }
                    samples.push(inputs);
                }
                Command::Deploy {
                    replica: codec::text(spec.get_replica())?,
                    record: codec::decode_record(spec.get_graph()?)?,
                    task: codec::text(spec.get_task())?,
                    artifact_path: codec::text(spec.get_artifact_path())?,
                    warmup: WarmupPlan {
                        samples,
                        target_ns: spec.get_warmup_target_ns(),
                        timeout: Duration::from_nanos(spec.get_warmup_timeout_ns()),
                    },
                }
            }
            worker_command::Routes(t) => Command::Routes(GraphRoutes::decode(t?)?),
            worker_command::Drain(()) => Command::Drain,
            worker_command::Artifact(a) => {
                let a = a?;
                Command::Artifact {
                    sha256_hex: codec::text(a.get_sha256_hex())?,
                    data: Bytes::copy_from_slice(a.get_data()?),
                }
            }
        })
    }
}

type Message = capnp::message::Reader<capnp::serialize::OwnedSegments>;

/// Reads command messages from a blocking reader (the worker's stdin) on a thread of its own;
/// they are decoded on the worker's thread.
pub fn read_commands(
    mut input: impl std::io::Read + Send + 'static,
) -> mpsc::UnboundedReceiver<Message> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut options = capnp::message::ReaderOptions::new();
        options.traversal_limit_in_words(Some(64 << 20));
        loop {
            let msg = match capnp::serialize::read_message(&mut input, options) {
                Ok(m) => m,
                Err(_) => return, // the agent is gone
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    });
    rx
}

fn decode_command(msg: &Message) -> Result<Command, WorkerError> {
    Command::decode(msg.get_root::<worker_command::Reader<'_>>()?)
}

struct Deployed {
    graph_id: Rc<str>,
    version: u32,
    task: Rc<str>,
    kernel: Runner,
    inputs: Vec<String>,
    /// A single-input task's input port: its arrivals are recorded under this task's own names
    /// (compared by pointer in the span buffer), not the request's freshly decoded copies.
    only_input: Option<Rc<str>>,
    /// Each output port and the input ports it feeds, from this replica's own version of the
    /// graph (none: a graph output).
    outputs: Vec<(Rc<str>, Vec<crate::request_path::routes::InputPort>)>,
    /// Some output is a graph output: the chains through this task end here.
    sink: bool,
    /// At most `max_concurrency` executions at once (graphs with a `[scaling]` policy); the
    /// rest wait here, and the wait counts as their queueing.
    gate: Option<tokio::sync::Semaphore>,
}

/// When a request arrived, for its span (None: spans were off).
#[derive(Clone, Copy)]
struct Arrival {
    unix_ns: u64,
    at: crate::telemetry::clock::Stamp,
    /// Its edge's record (transfer time, bytes) is left to the execution, which makes it after
    /// forwarding the outputs: single-input tasks only (a join's inputs are recorded as they
    /// come).
    edge_pending: bool,
}

/// Inputs of a join task arriving for one invocation.
struct Join {
    hop: Hop,
    /// When the first input arrived: queueing is counted from there.
    arrival: Option<Arrival>,
    parts: Vec<Option<Bytes>>,
    acks: Vec<(Sender, u64)>,
}

pub struct Worker {
    replica: RefCell<Rc<str>>,
    spans: crate::telemetry::spans::SpanBuffer,
    fwd: Forwarder,
    task: RefCell<Option<Rc<Deployed>>>,
    joins: RefCell<HashMap<(Rc<str>, u64), Join>>,
    /// Executions accepted and not finished (queued at the gate or running).
    in_flight: Cell<usize>,
    /// Recent inputs, for new replicas' warm-up.
    samples: crate::warmup::Sampler,
}

/// Counts an execution in flight for as long as it lives.
struct InFlight(Rc<Worker>);

impl InFlight {
    fn new(w: &Rc<Worker>) -> InFlight {
        w.in_flight.set(w.in_flight.get() + 1);
        InFlight(w.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .set(self.0.in_flight.get().saturating_sub(1));
    }
}

fn ack(acks: &[(Sender, u64)]) {
    for (s, seq) in acks {
        s.ack(*seq);
    }
}

impl Worker {
    /// Applies a command; `Ok(false)` means stop serving.
    fn apply(&self, cmd: Command) -> Result<bool, WorkerError> {
        match cmd {
            Command::Deploy {
                replica,
                record,
                task,
                artifact_path,
                warmup: _,
            } => {
                let t = record
                    .graph
                    .task(&task)
                    .ok_or_else(|| WorkerError::NoTask {
                        graph: record.id.clone(),
                        task: task.clone(),
                    })?;
                let kernel = match &t.code.kind {
                    prescient_schemas::CodeKind::Exec { sha256, args } => {
                        let path = std::path::Path::new(&artifact_path);
                        crate::runtime::exec::verify(path, sha256)?;
                        Runner::Exec(crate::runtime::exec::ExecProcess::start(path, args)?)
                    }
                    prescient_schemas::CodeKind::Onnx { .. } if cfg!(target_env = "musl") => {
                        return Err(WorkerError::OnnxInVm);
                    }
                    prescient_schemas::CodeKind::Onnx { sha256, .. } => {
                        let path = std::path::Path::new(&artifact_path);
                        crate::runtime::exec::verify(path, sha256)?;
                        let model = crate::runtime::onnx::OnnxModel::load(path, t)?;
                        Runner::Onnx(Rc::new(model))
                    }
                    _ => Runner::Builtin(Kernel::from_code(&t.code).map_err(|source| {
                        WorkerError::Kernel {
                            task: task.clone(),
                            source,
                        }
                    })?),
                };
                info!(%replica, %task, graph = %record.id, "task deployed");
                *self.replica.borrow_mut() = replica.into();
                let outputs: Vec<(Rc<str>, Vec<crate::request_path::routes::InputPort>)> = t
                    .outputs
                    .iter()
                    .map(|p| {
                        let fed = record
                            .graph
                            .edges
                            .iter()
                            .filter(|e| e.from.task == t.id && e.from.port == p.name)
                            .map(|e| (e.to.task.as_str().into(), e.to.port.as_str().into()))
                            .collect();
                        (p.name.as_str().into(), fed)
                    })
                    .collect();
                let sink = outputs.is_empty() || outputs.iter().any(|(_, fed)| fed.is_empty());
                *self.task.borrow_mut() = Some(Rc::new(Deployed {
                    graph_id: record.id.as_str().into(),
                    version: record.version,
                    task: task.as_str().into(),
                    kernel,
                    inputs: t.inputs.iter().map(|p| p.name.clone()).collect(),
                    only_input: match t.inputs.as_slice() {
                        [only] => Some(only.name.as_str().into()),
                        _ => None,
                    },
                    outputs,
                    sink,
                    gate: record.graph.scaling.as_ref().map(|s| {
                        let n = s.for_task(&task).max_concurrency.max(1);
                        tokio::sync::Semaphore::new(n as usize)
                    }),
                }));
            }
            Command::Routes(table) => {
                // During an update the old version's replicas keep the old version's table,
                // so invocations already on their way finish on the version they started on.
                let same_version = self
                    .task
                    .borrow()
                    .as_ref()
                    .is_none_or(|d| d.version == table.record.version);
                if same_version {
                    self.fwd.install(table);
                }
            }
            Command::Drain => return Ok(false),
            Command::Artifact { sha256_hex, .. } => {
                warn!(artifact = %sha256_hex, "a piece of an artifact after the deploy: ignored")
            }
        }
        Ok(true)
    }

    /// This replica's gauges as a telemetry batch: `in_flight` (executions accepted and not
    /// finished, the queue-length signal) and whatever its `exec` artifact reports.
    fn gauge_batch(&self, host: &str) -> Option<Vec<u8>> {
        let d = self.task.borrow().clone()?;
        let replica = self.replica.borrow().clone();
        let mut values = vec![("in_flight".to_string(), self.in_flight.get() as f64)];
        if let Runner::Exec(p) = &d.kernel {
            values.extend(p.gauges());
        }
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut b =
                msg.init_root::<prescient_schemas::agent_capnp::telemetry_batch::Builder<'_>>();
            b.set_host_id(host);
            let mut list = b.init_gauges(values.len() as u32);
            for (i, (name, value)) in values.iter().enumerate() {
                let mut g = list.reborrow().get(i as u32);
                g.set_graph_id(&*d.graph_id);
                g.set_task(&*d.task);
                g.set_replica(&*replica);
                g.set_name(name.as_str());
                g.set_value(*value);
            }
        }
        Some(capnp::serialize::write_message_to_words(&msg))
    }

    /// Nothing left to finish: no execution in flight, no join waiting for inputs, no request
    /// waiting for a table, and every output acknowledged downstream.
    fn idle(&self) -> bool {
        self.in_flight.get() == 0
            && self.joins.borrow().is_empty()
            && self.fwd.parked() == 0
            && self.fwd.pool.outstanding_total() == 0
    }

    fn execute(
        self: Rc<Self>,
        d: Rc<Deployed>,
        hop: Hop,
        inputs: Vec<Bytes>,
        acks: Vec<(Sender, u64)>,
        arrival: Option<Arrival>,
    ) {
        let counted = InFlight::new(&self);
        if let Some(a) = &arrival {
            self.samples
                .offer(&d.graph_id, &d.task, &inputs, a.unix_ns / 1_000_000_000);
        }
        tokio::task::spawn_local(async move {
            let _counted = counted;
            let arrival = arrival.filter(|_| self.spans.enabled());
            // Never closed, so acquiring only waits.
            let _permit = match &d.gate {
                Some(gate) => gate.acquire().await.ok(),
                None => None,
            };
            let start = arrival.map(|_| crate::telemetry::clock::Stamp::now());
            let result = d.kernel.run(&inputs, &self.fwd.rng).await;
            let end = start.map(|_| crate::telemetry::clock::Stamp::now());
            let (ok, output_bytes) = (result.is_ok(), result.as_ref().map_or(0, |o| o.len()));
            match result {
                Err(e) => {
                    let replica = self.replica.borrow().clone();
                    self.fwd.fail(
                        &hop,
                        format!("task {} failed on replica {replica}: {e}", d.task),
                    );
                }
                Ok(out) => self.forward(&d, &hop, out),
            }
            ack(&acks);
            // Recorded once the outputs are on their way, off the invocation's critical path.
            if let (Some(arrival), Some(start), Some(end)) = (arrival, start, end) {
                if arrival.edge_pending {
                    match &d.only_input {
                        Some(port) => self.spans.record_arrival(
                            &d.graph_id,
                            &d.task,
                            port,
                            arrival.unix_ns,
                            arrival.unix_ns.saturating_sub(hop.sent_unix_ns),
                            hop.payload.len() as u64,
                        ),
                        None => self.record_edge(&hop, arrival.unix_ns),
                    }
                }
                let queue_ns = start.ns_since(arrival.at);
                let exec_ns = end.ns_since(start);
                let start_ns = arrival.unix_ns + queue_ns;
                let end_ns = start_ns + exec_ns;
                let replica = self.replica.borrow();
                self.spans.record(
                    &d.graph_id,
                    &d.task,
                    &replica,
                    crate::telemetry::spans::Execution {
                        invocation: hop.invocation,
                        queue_ns,
                        exec_ns,
                        input_bytes: inputs.iter().map(|i| i.len() as u64).sum(),
                        output_bytes: output_bytes as u64,
                        transfer_ns: arrival.unix_ns.saturating_sub(hop.sent_unix_ns),
                        start_unix_ns: start_ns,
                        ok,
                        sink_ns: if d.sink && hop.admitted_unix_ns > 0 {
                            end_ns.saturating_sub(hop.admitted_unix_ns)
                        } else {
                            0
                        },
                    },
                );
            }
        });
    }

    /// Records `hop`'s arrival at `received_ns` on its edge: transfer time and bytes.
    fn record_edge(&self, hop: &Hop, received_ns: u64) {
        self.spans.record_arrival(
            &hop.graph_id,
            &hop.task,
            &hop.port,
            received_ns,
            received_ns.saturating_sub(hop.sent_unix_ns),
            hop.payload.len() as u64,
        );
    }

    /// Sends `out` along every edge out of this task. The edges come from this replica's own
    /// version of the graph, so a replica whose routing table has not arrived yet (a new
    /// version's, just made ready) still knows where its outputs go; the forwarder holds each
    /// hop until a table of its epoch is installed, or its deadline passes.
    fn forward(&self, d: &Deployed, hop: &Hop, out: Bytes) {
        let epoch = self
            .fwd
            .routes(&d.graph_id)
            .map_or(hop.epoch, |r| hop.epoch.max(r.epoch));
        for (port, targets) in &d.outputs {
            if targets.is_empty() {
                let o = OutputMsg {
                    invocation: hop.invocation,
                    task: d.task.to_string(),
                    port: port.to_string(),
                    payload: out.clone(),
                    error: String::new(),
                };
                self.fwd.pool.send_frame(&hop.reply_to, encode_output(&o));
                continue;
            }
            for (task, in_port) in targets {
                self.fwd.send(Hop {
                    invocation: hop.invocation,
                    graph_id: hop.graph_id.clone(),
                    epoch,
                    task: task.clone(),
                    port: in_port.clone(),
                    payload: out.clone(),
                    deadline_unix_us: hop.deadline_unix_us,
                    reply_to: hop.reply_to.clone(),
                    attempt: 0,
                    sent_unix_ns: 0,
                    admitted_unix_ns: hop.admitted_unix_ns,
                });
            }
        }
    }

    fn sweep(&self) {
        let now = now_unix_us();
        self.fwd.sweep(now);
        let expired: Vec<Join> = {
            let mut joins = self.joins.borrow_mut();
            let keys: Vec<_> = joins
                .iter()
                .filter(|(_, j)| j.hop.deadline_unix_us < now)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter().filter_map(|k| joins.remove(&k)).collect()
        };
        for j in expired {
            self.fwd.fail(
                &j.hop,
                format!(
                    "task {}: deadline passed while waiting for all of its inputs",
                    j.hop.task
                ),
            );
            ack(&j.acks);
        }
    }
}

impl dataplane::Handler for Worker {
    fn request(self: Rc<Self>, seq: u64, hop: Hop, from: &Sender) {
        // One wall-clock read serves the deadline check and, with spans on, the arrival.
        let now_ns = dataplane::now_unix_ns();
        let deployed = self.task.borrow().clone();
        let single_input = deployed
            .as_ref()
            .is_some_and(|d| d.inputs.len() <= 1 && d.task == hop.task);
        let arrival = self.spans.enabled().then(|| Arrival {
            unix_ns: now_ns,
            at: crate::telemetry::clock::Stamp::now(),
            edge_pending: single_input,
        });
        if arrival.is_some_and(|a| !a.edge_pending) {
            self.record_edge(&hop, now_ns);
        }
        let acks = vec![(from.clone(), seq)];
        let replica = self.replica.borrow().clone();
        let Some(d) = deployed else {
            self.fwd
                .fail(&hop, format!("replica {replica} has no task deployed"));
            return ack(&acks);
        };
        if hop.task != d.task {
            self.fwd.fail(
                &hop,
                format!("replica {replica} runs task {}, not {}", d.task, hop.task),
            );
            return ack(&acks);
        }
        if now_ns / 1000 > hop.deadline_unix_us {
            if arrival.is_some_and(|a| a.edge_pending) {
                self.record_edge(&hop, now_ns);
            }
            self.fwd.fail(
                &hop,
                format!(
                    "task {}: deadline passed before it ran on replica {replica}",
                    d.task
                ),
            );
            return ack(&acks);
        }
        if d.inputs.len() <= 1 {
            let payload = hop.payload.clone();
            return self.execute(d, hop, vec![payload], acks, arrival);
        }
        let Some(slot) = d.inputs.iter().position(|p| **p == *hop.port) else {
            self.fwd.fail(
                &hop,
                format!("task {} has no input port {}", d.task, hop.port),
            );
            return ack(&acks);
        };
        let key = (hop.reply_to.clone(), hop.invocation);
        let complete = {
            let mut joins = self.joins.borrow_mut();
            let j = joins.entry(key.clone()).or_insert_with(|| Join {
                hop: hop.clone(),
                arrival,
                parts: vec![None; d.inputs.len()],
                acks: Vec::new(),
            });
            j.parts[slot] = Some(hop.payload.clone());
            j.acks.extend(acks);
            if j.parts.iter().all(Option::is_some) {
                joins.remove(&key)
            } else {
                None
            }
        };
        if let Some(j) = complete {
            let inputs = j
                .parts
                .into_iter()
                .map(|p| p.expect("all present"))
                .collect();
            self.execute(d, j.hop, inputs, j.acks, j.arrival);
        }
    }

    fn output(self: Rc<Self>, out: OutputMsg) {
        warn!(
            invocation = out.invocation,
            "a worker received an output frame; dropped"
        );
    }

    fn invoke(self: Rc<Self>, inv: crate::dataplane::InvokeMsg, from: &Sender) {
        from.send(crate::dataplane::encode_reply(
            &crate::dataplane::ReplyMsg {
                id: inv.id,
                outputs: vec![],
                error:
                    "this is a worker's data-plane address; send invocations to an agent's ingress"
                        .into(),
            },
        ));
    }
}

/// How long a draining worker must have been idle before it exits.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// The worker process: reads its task from stdin, warms it, binds its data plane, says
/// `prescient-worker ready ADDR` on stdout, then serves until stdin ends or it is drained.
/// Must run in a `LocalSet`.
pub async fn run(
    host: &str,
    listen: std::net::SocketAddr,
    telemetry: bool,
) -> Result<(), WorkerError> {
    use std::io::Write;
    let mut commands = read_commands(std::io::stdin());
    let (pool, mut lost) = dataplane::PeerPool::new();
    let worker = Rc::new(Worker {
        replica: RefCell::new("unassigned".into()),
        spans: Default::default(),
        fwd: Forwarder::new(host, pool),
        task: RefCell::default(),
        joins: RefCell::default(),
        in_flight: Cell::new(0),
        samples: Default::default(),
    });
    if !telemetry {
        worker.spans.disable();
    }
    crate::telemetry::spans::install_switch_signals();
    crate::telemetry::clock::init();
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    // A VM's worker gets its task's artifact in pieces first.
    let mut first = loop {
        let msg = commands.recv().await.ok_or(WorkerError::NoDeploy)?;
        match decode_command(&msg) {
            Ok(Command::Artifact { sha256_hex, data }) => {
                if let Err(e) = keep_artifact_piece(&sha256_hex, &data) {
                    say(format!("prescient-worker failed: {e}"));
                    return Err(e.into());
                }
            }
            other => break other?,
        }
    };
    let Command::Deploy { warmup, .. } = &mut first else {
        return Err(WorkerError::NotDeployFirst);
    };
    let plan = std::mem::take(warmup);
    if let Err(e) = worker.apply(first) {
        say(format!("prescient-worker failed: {e}"));
        return Err(e);
    }
    // Warm before it is routed: the agent reports ready only after this line.
    let deployed = worker.task.borrow().clone();
    let warmed = match deployed {
        Some(d) => {
            crate::warmup::warm_up(
                &d.kernel,
                &plan.samples,
                plan.target_ns,
                plan.timeout,
                &worker.fwd.rng,
            )
            .await
        }
        None => Default::default(),
    };
    let bind = |source| WorkerError::Bind {
        addr: listen,
        source,
    };
    let listener = dataplane::Listener::bind(listen).await.map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    say(format!(
        "prescient-worker ready {addr} warmup {} {} {}",
        warmed.elapsed.as_nanos(),
        warmed.executions,
        warmed.stable
    ));
    let server = tokio::task::spawn_local(dataplane::serve(listener, worker.clone()));
    let w = worker.clone();
    let retries = tokio::task::spawn_local(async move {
        while let Some(l) = lost.recv().await {
            w.fwd.retry(l);
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    // After the ready line, stdout carries telemetry batches to the agent.
    let batches = crate::telemetry::spans::BatchWriter::new(std::io::stdout());
    let mut draining: Option<tokio::time::Instant> = None;
    let mut commands_open = true;
    loop {
        // Drained: it keeps serving what still arrives (upstream replicas switch tables a
        // moment later), and stops once it has been idle for a little while.
        if let Some(since) = draining {
            if worker.idle() {
                if since.elapsed() >= DRAIN_QUIET {
                    break;
                }
            } else {
                draining = Some(tokio::time::Instant::now());
            }
        }
        tokio::select! {
            _ = flush.tick() => {
                if let Some((batch, n)) = worker.spans.take_batch(host) {
                    if !batches.send(batch) {
                        worker.spans.lost(n);
                    }
                }
                if let Some(batch) = worker.samples.take_batch(host) {
                    let _ = batches.send(batch);
                }
                if let Some(batch) = worker.gauge_batch(host) {
                    let _ = batches.send(batch);
                }
            }
            cmd = commands.recv(), if commands_open => match cmd {
                Some(c) => match decode_command(&c).and_then(|c| worker.apply(c)) {
                    Ok(true) => {}
                    Ok(false) => {
                        info!("draining: finishing what was accepted");
                        draining = Some(tokio::time::Instant::now());
                    }
                    Err(e) => warn!("command refused: {e}"),
                },
                // The agent is gone (or done with it after a drain).
                None if draining.is_some() => commands_open = false,
                None => break,
            },
            _ = tick.tick() => {
                worker.sweep();
            }
            _ = tokio::time::sleep(Duration::from_millis(20)), if draining.is_some() => {}
        }
    }
    info!(drained = draining.is_some(), "worker stopping");
    // What it measured while draining goes out before it exits.
    if let Some((batch, n)) = worker.spans.take_batch(host) {
        if !batches.send(batch) {
            worker.spans.lost(n);
        }
    }
    batches.finish();
    server.abort();
    retries.abort();
    Ok(())
}
