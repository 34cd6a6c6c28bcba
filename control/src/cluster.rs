//! The live cluster: registered agents, their heartbeats, and each graph's deployment (replicas
//! and routing-table epoch). One reconcile loop turns "graphs wanted" plus "agents alive" into
//! provision / retire / route commands; placement itself is the pure [`crate::placement`].
//!
//! Architecture invariant: routing-table epochs only grow. A control node that restarts adopts
//! the replicas agents report (with their epochs) and waits `startup_grace` for every agent to
//! report before it places anything, so a restart re-provisions nothing that still runs.

use crate::events::EventLog;
use crate::placement::{self, Decision, HostView, Need};
use crate::store::Registry;
use capnp::capability::Rc as CapRc;
use prescient_schemas::agent_capnp::{agent, agent_session, registry, replica_spec, routing_table};
use prescient_schemas::sketch::Sketch;
use prescient_schemas::{codec, GraphRecord, ValidatedGraph};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{info, warn};

#[derive(Debug, Clone, Copy)]
pub struct ClusterConfig {
    /// An agent is lost after this long without a heartbeat.
    pub heartbeat_timeout: Duration,
    /// After start, wait this long for agents to report their replicas before placing any.
    pub startup_grace: Duration,
    /// Replicas of every task (the policy minimum).
    pub min_replicas: usize,
    /// How often per-minute roll-ups are written to the registry (the forecaster's history).
    pub history_flush: Duration,
    /// After a new version's routing table is out, how long the old version's replicas keep
    /// serving the invocations already on their way before they are retired.
    pub drain: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat_timeout: Duration::from_secs(3),
            startup_grace: Duration::from_secs(3),
            min_replicas: 1,
            history_flush: Duration::from_secs(10),
            drain: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AgentState {
    Ready,
    Lost,
}

pub struct AgentEntry {
    pub name: String,
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
    pub ingress_addr: String,
    pub provisioner: String,
    /// How the agent measures its host: "ebpf: ..." or "off: <why>".
    pub telemetry: String,
    pub state: AgentState,
    pub last_heartbeat: Instant,
    pub last_heartbeat_unix_ms: u64,
    generation: u64,
    client: agent::Client,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaState {
    Provisioning,
    Ready,
}

#[derive(Debug, Clone)]
pub struct Replica {
    pub id: String,
    pub task: String,
    pub host: String,
    pub addr: String,
    pub state: ReplicaState,
}

pub struct Deployment {
    pub record: GraphRecord,
    pub epoch: u64,
    pub replicas: Vec<Replica>,
    /// Replicas of a replaced version: serving until the new version is ready, then drained.
    pub retiring: Vec<Replica>,
    /// Whether the retiring replicas' drain has started.
    draining: bool,
    next_replica: u64,
    /// The epoch last pushed to agents.
    published: u64,
    /// Last "cannot place" reason per task, so it is recorded once, not every pass.
    unplaceable: HashMap<String, String>,
    /// The ready replicas of the last published table, to tell when a new epoch is due.
    signature: String,
    /// Tasks whose provisioning failed: failures in a row and when to try again (backoff
    /// doubling from 2 s to 2 min, so a bad artifact does not flood the event log).
    backoff: HashMap<String, (u32, Instant)>,
    /// The record's chains, joins and objective, worked out once per version (every `stats`
    /// call and `/metrics` scrape reads them).
    chains: crate::monitor::ChainsOf,
}

impl Deployment {
    /// The graph's chains (maximal paths, as task ids), its join tasks (more than one input
    /// port) and its latency objective (percentile, target ns).
    pub fn chains(&self) -> &crate::monitor::ChainsOf {
        &self.chains
    }

    /// Switches to another version of the graph.
    fn set_record(&mut self, record: GraphRecord) {
        self.chains = Self::chains_of(&record);
        self.record = record;
    }

    fn chains_of(record: &GraphRecord) -> crate::monitor::ChainsOf {
        let chains = prescient_schemas::ValidatedGraph::new(record.graph.clone())
            .map(|v| {
                v.chains()
                    .iter()
                    .map(|c| c.iter().map(|t| t.to_string()).collect())
                    .collect()
            })
            .unwrap_or_default();
        let objective = record
            .graph
            .objective
            .as_ref()
            .map(|o| (o.percentile, o.target_ns));
        let joins = record
            .graph
            .tasks
            .iter()
            .filter(|t| t.inputs.len() > 1)
            .map(|t| t.id.clone())
            .collect();
        crate::monitor::ChainsOf {
            chains,
            joins,
            objective,
        }
    }

    fn new(record: GraphRecord) -> Deployment {
        Deployment {
            chains: Self::chains_of(&record),
            record,
            epoch: 0,
            replicas: Vec::new(),
            retiring: Vec::new(),
            draining: false,
            next_replica: 1,
            published: 0,
            unplaceable: HashMap::new(),
            signature: String::new(),
            backoff: HashMap::new(),
        }
    }
}

pub struct Cluster {
    config: ClusterConfig,
    registry: Arc<Registry>,
    events: EventLog,
    pub agents: RefCell<BTreeMap<String, AgentEntry>>,
    pub deployments: RefCell<BTreeMap<String, Deployment>>,
    pub monitor: RefCell<crate::monitor::Monitor>,
    started: Instant,
    generation: Cell<u64>,
    kick: Notify,
}

fn unix_ms() -> u64 {
    crate::server::now_ms()
}

impl Cluster {
    pub fn new(config: ClusterConfig, registry: Arc<Registry>, events: EventLog) -> Rc<Cluster> {
        Rc::new(Cluster {
            config,
            registry,
            events,
            agents: RefCell::default(),
            deployments: RefCell::default(),
            monitor: RefCell::default(),
            started: Instant::now(),
            generation: Cell::new(0),
            kick: Notify::new(),
        })
    }

    /// Asks the reconcile loop for a pass.
    pub fn reconcile_soon(&self) {
        self.kick.notify_one();
    }

    /// Runs the reconcile loop and the heartbeat monitor. Must run in a `LocalSet`.
    pub async fn run(self: Rc<Self>) {
        let monitor = self.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                monitor.check_heartbeats().await;
            }
        });
        let history = self.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(history.config.history_flush);
            // Each flush rewrites the minute still filling and the one before it.
            loop {
                tick.tick().await;
                let now_s = crate::server::now_ms() / 1000;
                let since = now_s.saturating_sub(history.config.history_flush.as_secs() + 60);
                let rows = history.monitor.borrow().minute_rollups(since);
                let reg = history.registry.clone();
                match tokio::task::spawn_blocking(move || reg.put_history(&rows)).await {
                    Ok(Err(e)) => warn!("writing history failed: {e}"),
                    Err(e) => warn!("writing history failed: {e}"),
                    Ok(Ok(())) => {}
                }
            }
        });
        let remaining = self
            .config
            .startup_grace
            .saturating_sub(self.started.elapsed());
        tokio::time::sleep(remaining).await;
        loop {
            if let Err(e) = self.reconcile().await {
                warn!("reconcile pass failed: {e}");
            }
            // Periodic passes retry failed provisioning; kicks make changes prompt.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.kick.notified()).await;
        }
    }

    async fn check_heartbeats(&self) {
        let now = Instant::now();
        let lost: Vec<(String, f64)> = self
            .agents
            .borrow_mut()
            .values_mut()
            .filter(|a| a.state == AgentState::Ready)
            .filter(|a| now.duration_since(a.last_heartbeat) > self.config.heartbeat_timeout)
            .map(|a| {
                a.state = AgentState::Lost;
                (
                    a.name.clone(),
                    now.duration_since(a.last_heartbeat).as_secs_f64(),
                )
            })
            .collect();
        for (name, silent) in lost {
            let gone = self.drop_replicas_on(&name);
            self.events
                .record(
                    "agent-lost",
                    &name,
                    format!(
                        "no heartbeat for {silent:.1}s (limit {:?}); its replicas are gone: {}",
                        self.config.heartbeat_timeout,
                        if gone.is_empty() {
                            "none".into()
                        } else {
                            gone.join(", ")
                        }
                    ),
                )
                .await;
            self.reconcile_soon();
        }
    }

    fn drop_replicas_on(&self, host: &str) -> Vec<String> {
        let mut gone = Vec::new();
        for d in self.deployments.borrow_mut().values_mut() {
            d.replicas.retain(|r| {
                let keep = r.host != host;
                if !keep {
                    gone.push(r.id.clone());
                }
                keep
            });
        }
        gone
    }

    /// Registers (or re-registers) an agent and adopts the replicas it reports.
    #[allow(clippy::too_many_arguments)]
    async fn register(
        self: &Rc<Self>,
        host: prescient_schemas::agent_capnp::host_info::Reader<'_>,
        client: agent::Client,
        replicas: capnp::struct_list::Reader<
            '_,
            prescient_schemas::agent_capnp::replica_info::Owned,
        >,
    ) -> Result<(String, u64), capnp::Error> {
        let text = |t: capnp::Result<capnp::text::Reader<'_>>| -> Result<String, capnp::Error> {
            Ok(t?.to_str()?.to_string())
        };
        let name = text(host.get_name())?;
        if name.is_empty() {
            return Err(capnp::Error::failed("an agent must have a name".into()));
        }
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        let entry = AgentEntry {
            name: name.clone(),
            hostname: text(host.get_hostname())?,
            cpus: host.get_cpus(),
            memory_bytes: host.get_memory_bytes(),
            gpus: host.get_gpus().map_or(0, |g| g.len()),
            ingress_addr: text(host.get_ingress_addr())?,
            provisioner: text(host.get_provisioner())?,
            telemetry: text(host.get_telemetry())?,
            state: AgentState::Ready,
            last_heartbeat: Instant::now(),
            last_heartbeat_unix_ms: unix_ms(),
            generation,
            client,
        };
        let summary = format!(
            "{} CPUs, {}, {} GPUs, {} provisioner, ingress {}, probes {}",
            entry.cpus,
            prescient_schemas::quantity::format_bytes(entry.memory_bytes),
            entry.gpus,
            entry.provisioner,
            entry.ingress_addr,
            entry.telemetry
        );
        let previous = self.agents.borrow_mut().insert(name.clone(), entry);
        // Replicas this control node believed were there but the agent no longer runs.
        if previous.is_some() {
            let reported: Vec<String> = replicas
                .iter()
                .filter_map(|r| r.get_replica().ok()?.to_string().ok())
                .collect();
            for d in self.deployments.borrow_mut().values_mut() {
                d.replicas.retain(|r| {
                    r.host != name
                        || reported.contains(&r.id)
                        || r.state == ReplicaState::Provisioning
                });
            }
        }
        let mut adopted = Vec::new();
        for r in replicas.iter() {
            let graph_id = text(r.get_graph_id())?;
            let record = {
                let reg = self.registry.clone();
                let id = graph_id.clone();
                tokio::task::spawn_blocking(move || reg.get(&id))
                    .await
                    .map_err(|e| capnp::Error::failed(e.to_string()))?
            };
            let Ok(record) = record else {
                continue; // the graph was removed while control was away; reconcile retires it
            };
            let replica = Replica {
                id: text(r.get_replica())?,
                task: text(r.get_task())?,
                host: name.clone(),
                addr: text(r.get_data_plane_addr())?,
                state: ReplicaState::Ready,
            };
            let mut deployments = self.deployments.borrow_mut();
            let d = deployments
                .entry(graph_id.clone())
                .or_insert_with(|| Deployment::new(record.clone()));
            d.epoch = d.epoch.max(r.get_epoch());
            d.published = d.published.max(r.get_epoch());
            if let Some(n) = replica
                .id
                .rsplit_once(".r")
                .and_then(|(_, n)| n.parse::<u64>().ok())
            {
                d.next_replica = d.next_replica.max(n + 1);
            }
            if r.get_version() == d.record.version && !d.replicas.iter().any(|x| x.id == replica.id)
            {
                adopted.push(replica.id.clone());
                d.replicas.push(replica);
            }
        }
        let reason = if previous.is_some() {
            format!("reconnected: {summary}")
        } else {
            format!("new host: {summary}")
        };
        let reason = if adopted.is_empty() {
            reason
        } else {
            format!("{reason}; adopted running replicas {}", adopted.join(", "))
        };
        self.events.record("agent-registered", &name, reason).await;
        // A new agent's ingress needs every current routing table.
        self.push_all_tables_to(&name).await;
        self.reconcile_soon();
        Ok((name, generation))
    }

    async fn push_all_tables_to(&self, agent_name: &str) {
        let Some(client) = self
            .agents
            .borrow()
            .get(agent_name)
            .map(|a| a.client.clone())
        else {
            return;
        };
        let tables: Vec<(String, u64)> = self
            .deployments
            .borrow()
            .iter()
            .filter(|(_, d)| d.published > 0)
            .map(|(id, d)| (id.clone(), d.published))
            .collect();
        for (graph_id, _) in tables {
            if let Some(req) = self.routes_request(&client, &graph_id) {
                if let Err(e) = req.send().promise.await {
                    warn!(agent = %agent_name, graph = %graph_id, "pushing routes failed: {e}");
                }
            }
        }
    }

    fn routes_request(
        &self,
        client: &agent::Client,
        graph_id: &str,
    ) -> Option<
        capnp::capability::Request<
            agent::set_routes_params::Owned,
            agent::set_routes_results::Owned,
        >,
    > {
        let deployments = self.deployments.borrow();
        let d = deployments.get(graph_id)?;
        let mut req = client.set_routes_request();
        encode_table(d, req.get().init_table());
        Some(req)
    }

    fn heartbeat(&self, name: &str, generation: u64) -> bool {
        let mut agents = self.agents.borrow_mut();
        match agents.get_mut(name) {
            Some(a) if a.generation == generation => {
                a.last_heartbeat = Instant::now();
                a.last_heartbeat_unix_ms = unix_ms();
                if a.state == AgentState::Lost {
                    // It came back before reconnecting: it must re-register to be used again.
                    return false;
                }
                true
            }
            _ => false,
        }
    }

    async fn replica_down(&self, host: &str, replica: &str, reason: &str) {
        let mut found = false;
        for d in self.deployments.borrow_mut().values_mut() {
            let before = d.replicas.len();
            d.replicas.retain(|r| !(r.id == replica && r.host == host));
            found |= d.replicas.len() != before;
        }
        if found {
            self.events
                .record("replica-lost", replica, format!("on {host}: {reason}"))
                .await;
            self.reconcile_soon();
        }
    }

    fn host_views(&self) -> Vec<HostView> {
        let agents = self.agents.borrow();
        let deployments = self.deployments.borrow();
        agents
            .values()
            .filter(|a| a.state == AgentState::Ready)
            .map(|a| {
                let mut cpu = u64::from(a.cpus) * 1000;
                let mut mem = a.memory_bytes;
                let mut gpus = a.gpus;
                let mut n = 0;
                for d in deployments.values() {
                    // Retiring replicas hold their resources until they are gone. (They may be of
                    // an older version whose task is gone from the record; those count as the
                    // defaults.)
                    for r in d
                        .replicas
                        .iter()
                        .chain(&d.retiring)
                        .filter(|r| r.host == a.name)
                    {
                        if let Some(t) = d.record.graph.task(&r.task) {
                            cpu = cpu.saturating_sub(u64::from(t.resources.cpu_millicores));
                            mem = mem.saturating_sub(t.resources.memory_bytes);
                            gpus = gpus.saturating_sub(t.resources.gpus);
                        }
                        n += 1;
                    }
                }
                HostView {
                    name: a.name.clone(),
                    cpu_free_millicores: cpu,
                    memory_free_bytes: mem,
                    gpus_free: gpus,
                    replicas: n,
                }
            })
            .collect()
    }

    /// One pass: retire what is no longer wanted, place and provision what is missing, and
    /// publish a new routing-table epoch where the set of ready replicas changed.
    pub async fn reconcile(self: &Rc<Self>) -> Result<(), String> {
        let reg = self.registry.clone();
        let graphs = tokio::task::spawn_blocking(move || reg.list())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let wanted: HashMap<String, GraphRecord> =
            graphs.into_iter().map(|r| (r.id.clone(), r)).collect();

        // Removed graphs and replaced versions.
        let stale: Vec<(String, bool)> = self
            .deployments
            .borrow()
            .iter()
            .filter_map(|(id, d)| match wanted.get(id) {
                None => Some((id.clone(), true)),
                Some(r) if r.version != d.record.version => Some((id.clone(), false)),
                Some(_) => None,
            })
            .collect();
        for (graph_id, removed) in stale {
            if !removed {
                // A new version: start its replicas beside the old ones, switch the routing
                // table once every task has one, then drain and retire the old ones.
                let (old, new, moved) = {
                    let mut deployments = self.deployments.borrow_mut();
                    let d = deployments.get_mut(&graph_id).expect("listed as stale");
                    let old = d.record.version;
                    let moved = d.replicas.len();
                    d.retiring.append(&mut d.replicas);
                    d.draining = false;
                    d.set_record(wanted[&graph_id].clone());
                    d.unplaceable.clear();
                    d.backoff.clear();
                    (old, d.record.version, moved)
                };
                self.events
                    .record(
                        "graph-updating",
                        &graph_id,
                        format!(
                            "version {new} replaces {old}: starting its replicas; the {moved} of version {old} serve until they are ready"
                        ),
                    )
                    .await;
                continue;
            }
            let Some(d) = self.deployments.borrow_mut().remove(&graph_id) else {
                continue;
            };
            let clients: Vec<agent::Client> = self
                .agents
                .borrow()
                .values()
                .map(|a| a.client.clone())
                .collect();
            for c in clients {
                let mut req = c.remove_graph_request();
                req.get().set_graph_id(graph_id.as_str());
                let _ = req.send().promise.await;
            }
            self.events
                .record(
                    "graph-undeployed",
                    &graph_id,
                    format!(
                        "graph removed: retired {} replicas",
                        d.replicas.len() + d.retiring.len()
                    ),
                )
                .await;
        }

        // What is missing, in topological order per graph.
        let mut needs = Vec::new();
        for (id, record) in &wanted {
            let mut deployments = self.deployments.borrow_mut();
            let d = deployments
                .entry(id.clone())
                .or_insert_with(|| Deployment::new(record.clone()));
            let Ok(v) = ValidatedGraph::new(record.graph.clone()) else {
                continue;
            };
            for task in v.topological_order() {
                if d.backoff
                    .get(task)
                    .is_some_and(|(_, at)| *at > Instant::now())
                {
                    continue;
                }
                let have: Vec<&Replica> = d.replicas.iter().filter(|r| r.task == task).collect();
                if have.len() < self.config.min_replicas {
                    let t = record
                        .graph
                        .task(task)
                        .expect("topological order names tasks");
                    needs.push(Need {
                        graph_id: id.clone(),
                        task: task.to_string(),
                        resources: t.resources,
                        count: self.config.min_replicas - have.len(),
                        occupied: have.iter().map(|r| r.host.clone()).collect(),
                    });
                }
            }
        }
        let decisions = placement::place(&needs, &self.host_views());
        let mut provisions = Vec::new();
        for decision in decisions {
            match decision {
                Decision::Place {
                    graph_id,
                    task,
                    host,
                    reason,
                } => {
                    let (id, record) = {
                        let mut deployments = self.deployments.borrow_mut();
                        let d = deployments.get_mut(&graph_id).expect("created above");
                        d.unplaceable.remove(&task);
                        let id = format!("{graph_id}.{task}.r{}", d.next_replica);
                        d.next_replica += 1;
                        d.replicas.push(Replica {
                            id: id.clone(),
                            task: task.clone(),
                            host: host.clone(),
                            addr: String::new(),
                            state: ReplicaState::Provisioning,
                        });
                        (id, d.record.clone())
                    };
                    self.events
                        .record("replica-placed", &id, format!("on {host}: {reason}"))
                        .await;
                    provisions.push(self.clone().provision(id, record, task, host));
                }
                Decision::Unplaceable {
                    graph_id,
                    task,
                    reason,
                } => {
                    let first = {
                        let mut deployments = self.deployments.borrow_mut();
                        let d = deployments.get_mut(&graph_id).expect("created above");
                        d.unplaceable.insert(task.clone(), reason.clone()).as_ref() != Some(&reason)
                    };
                    if first {
                        self.events
                            .record("replica-unplaceable", &format!("{graph_id}.{task}"), reason)
                            .await;
                    }
                }
            }
        }
        futures::future::join_all(provisions).await;
        self.publish_changed().await;
        Ok(())
    }

    async fn provision(
        self: Rc<Self>,
        id: String,
        record: GraphRecord,
        task: String,
        host: String,
    ) {
        let client = self.agents.borrow().get(&host).map(|a| a.client.clone());
        let result = match client {
            None => Err(format!("agent {host} is gone")),
            Some(c) => {
                let mut req = c.provision_request();
                {
                    let mut spec: replica_spec::Builder<'_> = req.get().init_spec();
                    spec.set_replica(id.as_str());
                    spec.set_task(task.as_str());
                    codec::encode_record(&record, spec.init_graph());
                }
                match req.send().promise.await {
                    Ok(reply) => reply
                        .get()
                        .and_then(|r| Ok(r.get_data_plane_addr()?.to_str()?.to_string()))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.extra),
                }
            }
        };
        let failed = {
            let mut deployments = self.deployments.borrow_mut();
            let Some(d) = deployments.get_mut(&record.id) else {
                return;
            };
            match result {
                Ok(addr) => {
                    d.backoff.remove(&task);
                    if let Some(r) = d.replicas.iter_mut().find(|r| r.id == id) {
                        r.addr = addr;
                        r.state = ReplicaState::Ready;
                    }
                    None
                }
                Err(e) => {
                    d.replicas.retain(|r| r.id != id);
                    let failures = d.backoff.get(&task).map_or(0, |(n, _)| *n) + 1;
                    let wait = Duration::from_secs(2u64.saturating_pow(failures).min(120));
                    d.backoff
                        .insert(task.clone(), (failures, Instant::now() + wait));
                    Some(format!(
                        "provisioning on {host} failed: {e} (attempt {failures}; next in {wait:?})"
                    ))
                }
            }
        };
        match failed {
            None => info!(replica = %id, %host, "replica ready"),
            Some(reason) => self.events.record("replica-failed", &id, reason).await,
        }
    }

    /// Retires, after the drain period, the replaced version's replicas of a graph whose new
    /// table is out.
    fn retire_replaced(self: &Rc<Self>, graph_id: &str) {
        let (replicas, version) = {
            let mut deployments = self.deployments.borrow_mut();
            let Some(d) = deployments.get_mut(graph_id) else {
                return;
            };
            if d.retiring.is_empty() || d.draining {
                return;
            }
            d.draining = true;
            (d.retiring.clone(), d.record.version)
        };
        let this = self.clone();
        let graph_id = graph_id.to_string();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(this.config.drain).await;
            for r in &replicas {
                let client = this.agents.borrow().get(&r.host).map(|a| a.client.clone());
                if let Some(c) = client {
                    let mut req = c.retire_request();
                    req.get().set_replica(r.id.as_str());
                    let _ = req.send().promise.await;
                }
            }
            if let Some(d) = this.deployments.borrow_mut().get_mut(&graph_id) {
                d.retiring
                    .retain(|x| !replicas.iter().any(|r| r.id == x.id));
                d.draining = false;
            }
            this.events
                .record(
                    "replicas-retired",
                    &graph_id,
                    format!(
                        "replaced by version {version}; drained for {:?}: {}",
                        this.config.drain,
                        replicas
                            .iter()
                            .map(|r| r.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
                .await;
        });
    }

    /// Bumps the epoch of every graph whose ready replicas changed and pushes its table.
    async fn publish_changed(self: &Rc<Self>) {
        let mut changed = Vec::new();
        for (id, d) in self.deployments.borrow_mut().iter_mut() {
            let mut ready: Vec<String> = d
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Ready)
                .map(|r| format!("{}@{}", r.id, r.host))
                .collect();
            ready.sort();
            if !d.retiring.is_empty() {
                let complete = d.record.graph.tasks.iter().all(|t| {
                    d.replicas
                        .iter()
                        .any(|r| r.task == t.id && r.state == ReplicaState::Ready)
                });
                if !complete {
                    continue; // the old version keeps serving meanwhile
                }
            }
            let signature = ready.join(",");
            if d.published > 0 && d.epoch == d.published && d.signature == signature {
                continue;
            }
            if ready.is_empty() && d.published == 0 {
                continue;
            }
            d.epoch += 1;
            d.published = d.epoch;
            d.signature = signature;
            changed.push((id.clone(), d.epoch, ready));
        }
        let clients: Vec<(String, agent::Client)> = self
            .agents
            .borrow()
            .values()
            .filter(|a| a.state == AgentState::Ready)
            .map(|a| (a.name.clone(), a.client.clone()))
            .collect();
        for (graph_id, epoch, ready) in changed {
            for (name, c) in &clients {
                if let Some(req) = self.routes_request(c, &graph_id) {
                    if let Err(e) = req.send().promise.await {
                        warn!(agent = %name, graph = %graph_id, "pushing routes failed: {e}");
                    }
                }
            }
            self.events
                .record(
                    "routes-published",
                    &graph_id,
                    format!(
                        "epoch {epoch}: {}",
                        if ready.is_empty() {
                            "no ready replicas".into()
                        } else {
                            ready.join(", ")
                        }
                    ),
                )
                .await;
            self.retire_replaced(&graph_id);
        }
    }
}

fn encode_table(d: &Deployment, mut b: routing_table::Builder<'_>) {
    b.set_epoch(d.epoch);
    codec::encode_record(&d.record, b.reborrow().init_graph());
    let ready: Vec<&Replica> = d
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Ready)
        .collect();
    let mut entries = b.init_entries(ready.len() as u32);
    for (i, r) in ready.iter().enumerate() {
        let mut e = entries.reborrow().get(i as u32);
        e.set_task(r.task.as_str());
        e.set_replica(r.id.as_str());
        e.set_host(r.host.as_str());
        e.set_data_plane_addr(r.addr.as_str());
    }
}

/// The `Registry` capability agents register through.
pub struct RegistryCap(pub Rc<Cluster>);

impl registry::Server for RegistryCap {
    async fn register(
        self: CapRc<Self>,
        params: registry::RegisterParams,
        mut results: registry::RegisterResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (name, generation) = self
            .0
            .register(p.get_host()?, p.get_agent()?, p.get_replicas()?)
            .await?;
        let mut r = results.get();
        r.set_host_id(name.as_str());
        r.set_session(capnp_rpc::new_client(Session {
            cluster: self.0.clone(),
            name,
            generation,
        }));
        Ok(())
    }
}

struct Session {
    cluster: Rc<Cluster>,
    name: String,
    generation: u64,
}

impl agent_session::Server for Session {
    async fn heartbeat(
        self: CapRc<Self>,
        _: agent_session::HeartbeatParams,
        mut results: agent_session::HeartbeatResults,
    ) -> Result<(), capnp::Error> {
        if !self.cluster.heartbeat(&self.name, self.generation) {
            return Err(capnp::Error::disconnected(format!(
                "agent {} must register again (its session was replaced or it was declared lost)",
                self.name
            )));
        }
        results.get().set_ok(true);
        Ok(())
    }

    async fn telemetry(
        self: CapRc<Self>,
        params: agent_session::TelemetryParams,
        _: agent_session::TelemetryResults,
    ) -> Result<(), capnp::Error> {
        let batch = params.get()?.get_batch()?;
        let mut monitor = self.cluster.monitor.borrow_mut();
        let dropped = batch.get_dropped_spans();
        if dropped > 0 {
            *monitor.dropped.entry(self.name.clone()).or_insert(0) += dropped;
        }
        for h in batch.get_hosts()? {
            monitor.record_host(
                &self.name,
                crate::monitor::HostPoint {
                    at_unix_ms: h.get_at_unix_ms(),
                    cpu_util: h.get_cpu_util(),
                    cpu_steal: h.get_cpu_steal(),
                    memory_used_bytes: h.get_memory_used_bytes(),
                    memory_total_bytes: h.get_memory_total_bytes(),
                    net_rx_bytes: h.get_net_rx_bytes(),
                    net_tx_bytes: h.get_net_tx_bytes(),
                    run_delay_ns: h.get_run_delay_ns(),
                    gpu_util: h.get_gpu_util()?.iter().collect(),
                    gpu_memory_used_bytes: h.get_gpu_memory_used_bytes()?.iter().collect(),
                    gpu_power_watts: h.get_gpu_power_watts()?.iter().collect(),
                    gpu_temperature_c: h.get_gpu_temperature_c()?.iter().collect(),
                    run_queue: if h.get_probes() {
                        Some(Sketch::decode(h.get_run_queue_latency_ns()?)?)
                    } else {
                        None
                    },
                },
            );
        }
        for v in batch.get_vms()? {
            monitor.vms.insert(
                v.get_replica()?.to_str()?.to_string(),
                crate::monitor::VmPoint {
                    host: self.name.clone(),
                    graph_id: v.get_graph_id()?.to_str()?.to_string(),
                    task: v.get_task()?.to_str()?.to_string(),
                    cpu_cores: v.get_cpu_cores(),
                    memory_bytes: v.get_memory_bytes(),
                    cpu_limit_cores: v.get_cpu_limit_cores(),
                    memory_limit_bytes: v.get_memory_limit_bytes(),
                    gpu_memory_bytes: v.get_gpu_memory_bytes(),
                    probes: if v.get_probed() {
                        Some(crate::monitor::VmProbePoint {
                            run_queue: Sketch::decode(v.get_run_queue_latency_ns()?)?,
                            tcp_sent_bytes: v.get_tcp_sent_bytes(),
                            tcp_received_bytes: v.get_tcp_received_bytes(),
                        })
                    } else {
                        None
                    },
                },
            );
        }
        for e in batch.get_edges()? {
            monitor.record_edge(
                e.get_graph_id()?.to_str()?,
                e.get_task()?.to_str()?,
                e.get_port()?.to_str()?,
                e.get_second(),
                e.get_bytes(),
                &Sketch::decode(e.get_transfer_ns()?)?,
            );
        }
        // Every execution arrives aggregated in windows; the span sample is for tracing.
        for w in batch.get_windows()? {
            monitor.record_window(&crate::monitor::WindowView {
                graph_id: w.get_graph_id()?.to_str()?.to_string(),
                task: w.get_task()?.to_str()?.to_string(),
                second: w.get_second(),
                errors: w.get_errors(),
                input_bytes: w.get_input_bytes(),
                output_bytes: w.get_output_bytes(),
                exec: Sketch::decode(w.get_exec_ns()?)?,
                queue: Sketch::decode(w.get_queue_ns()?)?,
                transfer: Sketch::decode(w.get_transfer_ns()?)?,
                sink: if w.has_sink_ns() {
                    Sketch::decode(w.get_sink_ns()?)?
                } else {
                    Sketch::default()
                },
            });
        }
        Ok(())
    }

    async fn replica_down(
        self: CapRc<Self>,
        params: agent_session::ReplicaDownParams,
        _: agent_session::ReplicaDownResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let replica = p.get_replica()?.to_str()?.to_string();
        let reason = p.get_reason()?.to_str()?.to_string();
        self.cluster
            .replica_down(&self.name, &replica, &reason)
            .await;
        Ok(())
    }
}
