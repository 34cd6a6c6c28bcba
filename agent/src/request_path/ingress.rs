//! The ingress: where invocations enter the data plane. It sends the inputs to the entry tasks'
//! replicas, collects the graph's outputs as the sinks send them back, and enforces deadlines.

use crate::dataplane::{self, now_unix_us, Hop, InvokeMsg, OutputMsg, ReplyMsg, Sender};
use crate::request_path::forward::Forwarder;
use crate::request_path::routes::GraphRoutes;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Why an invocation got no outputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvocationError {
    #[error("graph {graph:?} is not deployed (no routing table at host {host})")]
    NotDeployed { graph: String, host: String },
    #[error("graph {graph} has no input {input:?} (its inputs: {inputs})")]
    NoSuchInput {
        graph: String,
        input: String,
        inputs: String,
    },
    #[error("graph {graph}: missing input(s) {missing}")]
    MissingInputs { graph: String, missing: String },
    #[error("the ingress dropped the invocation")]
    Dropped,
    #[error("deadline of {deadline_ms} ms exceeded in graph {graph}; still waiting for {waiting}")]
    Deadline {
        deadline_ms: u32,
        graph: String,
        waiting: String,
    },
    /// A task failed (its replica's error, naming task and replica).
    #[error("{0}")]
    Failed(String),
}

/// Deadline when an invocation names none.
pub const DEFAULT_DEADLINE_MS: u32 = 10_000;

struct Pending {
    outputs: Vec<Option<Bytes>>,
    names: Rc<[String]>,
    tx: oneshot::Sender<Result<Vec<(String, Bytes)>, InvocationError>>,
    /// Its hedge's invocation id, once sent.
    hedge: Option<u64>,
    /// Copies in flight (2 once hedged) and errors heard: an error fails the invocation only
    /// once every copy has failed.
    copies: u8,
    errors: u8,
}

pub struct Ingress {
    fwd: Forwarder,
    /// End-to-end latency of every invocation admitted here, per graph and second.
    latency: crate::telemetry::spans::SpanBuffer,
    /// The task name of end-to-end records (empty: the whole graph), allocated once.
    whole_graph: Rc<str>,
    /// Where sinks send outputs: this ingress's own data-plane address.
    reply_to: Rc<str>,
    pending: RefCell<HashMap<u64, Pending>>,
    /// Hedge invocation id → the invocation it copies.
    aliases: RefCell<HashMap<u64, u64>>,
    next: Cell<u64>,
    pub hedging: crate::request_path::hedge::Hedging,
}

impl Ingress {
    pub fn new(host: &str, reply_to: &str, pool: Rc<dataplane::PeerPool>) -> Rc<Ingress> {
        Rc::new(Ingress {
            fwd: Forwarder::new(host, pool),
            latency: Default::default(),
            whole_graph: "".into(),
            reply_to: reply_to.into(),
            pending: RefCell::default(),
            aliases: RefCell::default(),
            next: Cell::new(1),
            hedging: Default::default(),
        })
    }

    pub fn install(&self, table: GraphRoutes) -> bool {
        self.fwd.install(table)
    }

    pub fn remove_graph(&self, graph_id: &str) {
        self.fwd.remove_graph(graph_id)
    }

    /// The newest epoch held for each graph.
    pub fn epochs(&self) -> Vec<(String, u64)> {
        self.fwd
            .routes
            .borrow()
            .values()
            .map(|r| (r.graph_id.to_string(), r.epoch))
            .collect()
    }

    /// Retries requests lost with a connection and expires waiting ones; run once per ingress.
    pub async fn handle_lost(
        self: Rc<Self>,
        mut lost: tokio::sync::mpsc::UnboundedReceiver<dataplane::Lost>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                l = lost.recv() => match l {
                    Some(l) => self.fwd.retry(l),
                    None => return,
                },
                _ = tick.tick() => self.fwd.sweep(now_unix_us()),
            }
        }
    }

    fn lookup(&self, graph: &str) -> Option<Rc<GraphRoutes>> {
        self.fwd.routes(graph).or_else(|| {
            self.fwd
                .routes
                .borrow()
                .values()
                .find(|r| r.record.graph.name == graph)
                .cloned()
        })
    }

    /// Invokes `graph` (id or name) and waits for all of its outputs, or the deadline; with
    /// telemetry on, also returns the invocation's end-to-end latency span, for the caller to
    /// record once the reply is on its way (not before it).
    pub async fn call(
        self: &Rc<Self>,
        graph: &str,
        inputs: Vec<(String, Bytes)>,
        deadline_ms: u32,
    ) -> (
        Result<Vec<(String, Bytes)>, InvocationError>,
        Option<(Rc<str>, crate::telemetry::spans::Execution)>,
    ) {
        let mut latency = None;
        let result = self
            .call_timed(graph, inputs, deadline_ms, &mut latency)
            .await;
        (result, latency)
    }

    async fn call_timed(
        self: &Rc<Self>,
        graph: &str,
        mut inputs: Vec<(String, Bytes)>,
        deadline_ms: u32,
        latency: &mut Option<(Rc<str>, crate::telemetry::spans::Execution)>,
    ) -> Result<Vec<(String, Bytes)>, InvocationError> {
        let Some(routes) = self.lookup(graph) else {
            return Err(InvocationError::NotDeployed {
                graph: graph.to_string(),
                host: self.fwd.host.to_string(),
            });
        };
        let entry_names: Vec<String> = routes.graph_inputs.iter().map(|e| e.to_string()).collect();
        // A single unnamed input feeds a graph with a single input.
        if inputs.len() == 1 && entry_names.len() == 1 && inputs[0].0.is_empty() {
            inputs[0].0 = entry_names[0].clone();
        }
        for (name, _) in &inputs {
            if !entry_names.contains(name) {
                return Err(InvocationError::NoSuchInput {
                    graph: routes.graph_id.to_string(),
                    input: name.clone(),
                    inputs: entry_names.join(", "),
                });
            }
        }
        let mut missing = entry_names
            .iter()
            .filter(|n| !inputs.iter().any(|(k, _)| k == *n))
            .peekable();
        if missing.peek().is_some() {
            return Err(InvocationError::MissingInputs {
                graph: routes.graph_id.to_string(),
                missing: missing.cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let deadline_ms = if deadline_ms == 0 {
            DEFAULT_DEADLINE_MS
        } else {
            deadline_ms
        };
        let invocation = self.next.get();
        self.next.set(invocation + 1);
        let names: Rc<[String]> = routes.graph_outputs.iter().map(|e| e.to_string()).collect();
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(
            invocation,
            Pending {
                outputs: vec![None; names.len()],
                names: names.clone(),
                tx,
                hedge: None,
                copies: 1,
                errors: 0,
            },
        );
        let deadline_unix_us = now_unix_us() + u64::from(deadline_ms) * 1000;
        let admitted_ns = dataplane::now_unix_ns();
        let admitted = self
            .latency
            .enabled()
            .then(crate::telemetry::clock::Stamp::now);
        let hedging = routes.record.graph.scaling.as_ref().filter(|s| s.hedge);
        let delay = hedging.and_then(|s| {
            let fixed = s.hedge_delay_ns.map(Duration::from_nanos);
            self.hedging.admit(&routes.graph_id, s.hedge_budget, fixed)
        });
        let started = std::time::Instant::now();
        let mut sent: Vec<(Hop, Option<Rc<str>>)> = Vec::new();
        for (name, value) in inputs {
            let (task, port) = name
                .rsplit_once('.')
                .expect("checked against the entry names");
            let hop = Hop {
                invocation,
                graph_id: routes.graph_id.clone(),
                epoch: routes.epoch,
                task: task.into(),
                port: port.into(),
                payload: value,
                deadline_unix_us,
                reply_to: self.reply_to.clone(),
                attempt: 0,
                sent_unix_ns: 0,
                admitted_unix_ns: admitted_ns,
            };
            let copy = delay.is_some().then(|| hop.clone());
            let addr = self.fwd.send(hop);
            sent.extend(copy.map(|c| (c, addr)));
        }
        let wait = self.wait(&routes, invocation, deadline_ms, rx);
        let result = match delay {
            None => wait.await,
            Some(delay) => {
                tokio::pin!(wait);
                tokio::select! {
                    r = &mut wait => r,
                    _ = tokio::time::sleep(delay) => {
                        self.hedge(invocation, sent);
                        wait.await
                    }
                }
            }
        };
        if hedging.is_some() && result.is_ok() {
            self.hedging.record(&routes.graph_id, started.elapsed());
        }
        if let Some(admitted) = admitted.filter(|_| self.latency.enabled()) {
            let execution = crate::telemetry::spans::Execution {
                invocation,
                queue_ns: 0,
                exec_ns: crate::telemetry::clock::Stamp::now().ns_since(admitted),
                input_bytes: 0,
                output_bytes: result
                    .as_ref()
                    .map_or(0, |o| o.iter().map(|(_, v)| v.len() as u64).sum()),
                transfer_ns: 0,
                start_unix_ns: admitted_ns,
                sink_ns: 0,
                ok: result.is_ok(),
            };
            *latency = Some((routes.graph_id.clone(), execution));
        }
        result
    }

    /// Sends `invocation` again as a new invocation (so its copies never mix downstream) to
    /// other replicas of its entry tasks, if it is still unanswered, the budget allows and
    /// every entry task has another replica.
    fn hedge(&self, invocation: u64, sent: Vec<(Hop, Option<Rc<str>>)>) {
        let Some(graph_id) = sent.first().map(|(h, _)| h.graph_id.clone()) else {
            return;
        };
        if !self.pending.borrow().contains_key(&invocation) {
            return;
        }
        let alternatives = sent.iter().all(|(h, addr)| {
            let avoid: Vec<Rc<str>> = addr.iter().cloned().collect();
            self.fwd.has_other(&graph_id, &h.task, &avoid)
        });
        if !alternatives || !self.hedging.take(&graph_id) {
            if !alternatives {
                self.hedging.denied.set(self.hedging.denied.get() + 1);
            }
            return;
        }
        let id = self.next.get();
        self.next.set(id + 1);
        if let Some(p) = self.pending.borrow_mut().get_mut(&invocation) {
            p.hedge = Some(id);
            p.copies = 2;
        }
        self.aliases.borrow_mut().insert(id, invocation);
        self.hedging.sent.set(self.hedging.sent.get() + 1);
        for (mut hop, addr) in sent {
            hop.invocation = id;
            let avoid: Vec<Rc<str>> = addr.into_iter().collect();
            self.fwd.send_avoiding(hop, &avoid);
        }
    }

    /// Forgets `p`'s hedge alias (it is answered or timed out).
    fn unalias(&self, p: &Pending) {
        if let Some(h) = p.hedge {
            self.aliases.borrow_mut().remove(&h);
        }
    }

    /// End-to-end latencies measured here, as a telemetry batch (task "" = the whole graph).
    pub fn take_latency_batch(&self) -> Option<Vec<u8>> {
        self.latency.take_batch(&self.fwd.host).map(|(b, _)| b)
    }

    async fn wait(
        &self,
        routes: &GraphRoutes,
        invocation: u64,
        deadline_ms: u32,
        rx: oneshot::Receiver<Result<Vec<(String, Bytes)>, InvocationError>>,
    ) -> Result<Vec<(String, Bytes)>, InvocationError> {
        match tokio::time::timeout(Duration::from_millis(deadline_ms.into()), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InvocationError::Dropped),
            Err(_) => {
                let pending = self.pending.borrow_mut().remove(&invocation);
                if let Some(p) = &pending {
                    self.unalias(p);
                }
                let waiting: Vec<String> = pending
                    .map(|p| {
                        p.names
                            .iter()
                            .zip(&p.outputs)
                            .filter(|(_, o)| o.is_none())
                            .map(|(n, _)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                Err(InvocationError::Deadline {
                    deadline_ms,
                    graph: routes.graph_id.to_string(),
                    waiting: waiting.join(", "),
                })
            }
        }
    }
}

impl dataplane::Handler for Ingress {
    fn request(self: Rc<Self>, seq: u64, hop: Hop, from: &Sender) {
        from.ack(seq);
        self.fwd
            .fail(&hop, "requests are not served at an ingress".into());
    }

    fn output(self: Rc<Self>, out: OutputMsg) {
        let alias = self.aliases.borrow().get(&out.invocation).copied();
        let (id, via_hedge) = alias.map_or((out.invocation, false), |o| (o, true));
        let mut pending = self.pending.borrow_mut();
        let Some(p) = pending.get_mut(&id) else {
            return; // already answered (a retried duplicate, a hedge's loser) or timed out
        };
        if !out.error.is_empty() {
            p.errors += 1;
            if p.errors < p.copies {
                return; // the other copy may still answer
            }
            if let Some(p) = pending.remove(&id) {
                self.unalias(&p);
                let _ = p.tx.send(Err(InvocationError::Failed(out.error)));
            }
            return;
        }
        let name = format!("{}.{}", out.task, out.port);
        if let Some(i) = p.names.iter().position(|n| *n == name) {
            p.outputs[i].get_or_insert(out.payload);
        }
        if p.outputs.iter().all(Option::is_some) {
            if let Some(p) = pending.remove(&id) {
                self.unalias(&p);
                if via_hedge {
                    self.hedging.won.set(self.hedging.won.get() + 1);
                }
                let result = p
                    .names
                    .iter()
                    .cloned()
                    .zip(p.outputs.into_iter().map(|o| o.expect("all present")))
                    .collect();
                let _ = p.tx.send(Ok(result));
            }
        }
    }

    fn invoke(self: Rc<Self>, inv: InvokeMsg, from: &Sender) {
        let from = from.clone();
        tokio::task::spawn_local(async move {
            let (result, latency) = self.call(&inv.graph, inv.inputs, inv.deadline_ms).await;
            let reply = match result {
                Ok(outputs) => ReplyMsg {
                    id: inv.id,
                    outputs,
                    error: String::new(),
                },
                Err(error) => ReplyMsg {
                    id: inv.id,
                    outputs: vec![],
                    error: error.to_string(),
                },
            };
            from.send(dataplane::encode_reply(&reply));
            if let Some((graph_id, execution)) = latency {
                self.latency
                    .record(&graph_id, &self.whole_graph, &self.fwd.host, execution);
            }
        });
    }
}
