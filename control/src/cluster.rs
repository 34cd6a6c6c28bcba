//! The live cluster: the executor of the decision crate's plans. It keeps the cluster as a
//! [`Snapshot`] (plus each agent's RPC client), feeds what it hears in through
//! [`observe`], and runs the loop: plan, apply every action, do its I/O (provision, push routes,
//! retire), record its event.
//!
//! Architecture invariant: no decision is taken here; every one is `prescient_policy::plan`'s,
//! so the simulator's are the same. This module only chooses when to plan (on a change, at the
//! next deadline the plan has, and every 2 s).

use crate::clock::unix_ms;
use crate::events::EventLog;
use crate::store::{HistoryBaselines, Registry};
use prescient_policy::observe;
use prescient_policy::snapshot::{Capacity, Deployment, Health, Reported, Snapshot};
use prescient_policy::{apply, Action, Event};
use prescient_schemas::agent_capnp::{agent, replica_spec, routing_table};
use prescient_schemas::codec::{self, text};
use prescient_schemas::GraphRecord;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{info, warn};

/// How often the loop plans when nothing asks it to, and re-reads the registry at the latest.
const PERIOD: Duration = Duration::from_secs(2);
const RELIST: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterConfig {
    /// The decisions' knobs (heartbeat timeout, startup grace, replicas, drain, backoff).
    pub policy: prescient_policy::Config,
    /// How often per-minute roll-ups are written to the registry (the forecaster's history).
    pub history_flush: Duration,
    /// A new replica warms up on its task's recent inputs for at most this long before it is
    /// routed (zero: no warm-up).
    pub warmup_timeout: Duration,
}

/// What the control node knows of an agent beyond what decisions read.
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
    pub last_heartbeat_unix_ms: u64,
    /// Registered before (this node's lifetime): its next report reads "reconnected".
    reconnected: bool,
    generation: u64,
    client: agent::Client,
}

impl AgentEntry {
    fn summary(&self) -> String {
        format!(
            "{} CPUs, {}, {} GPUs, {} provisioner, ingress {}, probes {}",
            self.cpus,
            prescient_schemas::quantity::format_bytes(self.memory_bytes),
            self.gpus,
            self.provisioner,
            self.ingress_addr,
            self.telemetry
        )
    }
}

pub struct Cluster {
    config: ClusterConfig,
    registry: Arc<Registry>,
    events: EventLog,
    /// The cluster as decisions see it.
    pub state: RefCell<Snapshot>,
    pub agents: RefCell<BTreeMap<String, AgentEntry>>,
    pub monitor: RefCell<crate::monitor::Monitor>,
    /// Chains, joins and objective per graph version, worked out once (every `stats` call and
    /// `/metrics` scrape reads them).
    chains: RefCell<crate::monitor::ChainsCache>,
    started: Instant,
    generation: Cell<u64>,
    kick: Notify,
    /// The registry's graphs changed: list them before the next pass.
    relist: Cell<bool>,
    /// Arrival forecasts of the tasks of graphs with `[scaling.predictive]`.
    forecasting: RefCell<crate::forecasting::Forecasting>,
}

/// The trained forecaster where ONNX Runtime loads, said once either way.
fn load_forecaster() -> Option<Box<dyn prescient_policy::forecast::Model>> {
    match prescient_onnx::forecaster::Forecaster::load() {
        Ok(m) => {
            info!("forecasting with the ONNX model beside the baselines");
            Some(Box::new(m))
        }
        Err(e) => {
            warn!("forecasting with the baselines alone: {e}");
            None
        }
    }
}

impl Cluster {
    pub fn new(config: ClusterConfig, registry: Arc<Registry>, events: EventLog) -> Rc<Cluster> {
        Rc::new(Cluster {
            config,
            registry,
            events,
            state: RefCell::default(),
            agents: RefCell::default(),
            monitor: RefCell::default(),
            chains: RefCell::default(),
            started: Instant::now(),
            generation: Cell::new(0),
            kick: Notify::new(),
            relist: Cell::new(true),
            forecasting: RefCell::new(crate::forecasting::Forecasting::loading(load_forecaster)),
        })
    }

    /// The decisions' clock: time since this node started.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Decisions and state changes recorded since start, by kind.
    pub fn event_counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.events.counts()
    }

    /// Asks the loop for a pass.
    pub fn reconcile_soon(&self) {
        self.kick.notify_one();
    }

    /// Asks the loop for a pass that first re-reads the registry's graphs.
    pub fn graphs_changed(&self) {
        self.relist.set(true);
        self.kick.notify_one();
    }

    /// A graph's chains (maximal paths, as task ids), joins and latency objective.
    pub fn chains(&self, graph_id: &str) -> Option<Rc<crate::monitor::ChainsOf>> {
        let state = self.state.borrow();
        let d = state.deployments.get(graph_id)?;
        Some(self.chains.borrow_mut().get(&d.record))
    }

    /// Runs the loop and the history flush. Must run in a `LocalSet`.
    pub async fn run(self: Rc<Self>) {
        tokio::task::spawn_local(self.clone().flush_history());
        let mut listed: Option<Instant> = None;
        loop {
            let due = self.relist.replace(false) || listed.is_none_or(|t| t.elapsed() > RELIST);
            match due && self.list_graphs().await {
                true => listed = Some(Instant::now()),
                // Retried on the next pass.
                false if due => self.relist.set(true),
                false => {}
            }
            // Nothing is decided before the graphs wanted are known: an empty list would
            // undeploy everything agents report.
            if listed.is_some() {
                self.reconcile().await;
            }
            let now = self.now();
            let wait =
                prescient_policy::next_deadline(&self.state.borrow(), &self.config.policy, now)
                    // A deadline is strict (`silent > timeout`): wake just past it.
                    .map_or(PERIOD, |t| (t - now + Duration::from_millis(5)).min(PERIOD));
            let _ = tokio::time::timeout(wait, self.kick.notified()).await;
        }
    }

    /// Reads the graphs wanted from the registry; false (and a warning) when it cannot.
    async fn list_graphs(&self) -> bool {
        let reg = self.registry.clone();
        match tokio::task::spawn_blocking(move || reg.list()).await {
            Ok(Ok(graphs)) => {
                self.state.borrow_mut().wanted = graphs
                    .into_iter()
                    .map(|r| (r.id.clone(), r.into()))
                    .collect();
                true
            }
            Ok(Err(e)) => {
                warn!("listing graphs failed: {e}");
                false
            }
            Err(e) => {
                warn!("listing graphs failed: {e}");
                false
            }
        }
    }

    async fn flush_history(self: Rc<Self>) {
        let mut tick = tokio::time::interval(self.config.history_flush);
        let mut baselines = Some(HistoryBaselines::new(unix_ms() / 60_000));
        // Each flush rewrites the minute still filling and the one before it.
        loop {
            tick.tick().await;
            let now_s = unix_ms() / 1000;
            let since = now_s.saturating_sub(self.config.history_flush.as_secs() + 60);
            let (rows, seconds) = {
                let m = self.monitor.borrow();
                (m.minute_rollups(since), m.rollups(since, 1))
            };
            let reg = self.registry.clone();
            let mut b = baselines.take().unwrap_or_default();
            let written = tokio::task::spawn_blocking(move || {
                let r = reg
                    .put_history(&rows, &mut b)
                    .and_then(|()| reg.put_seconds(&seconds));
                (r, b)
            })
            .await;
            match written {
                Ok((r, b)) => {
                    baselines = Some(b);
                    if let Err(e) = r {
                        warn!("writing history failed: {e}");
                    }
                }
                Err(e) => warn!("writing history failed: {e}"),
            }
        }
    }

    /// One pass: plan, apply every action to the state at once (so what the next pass sees
    /// includes them), then do each one's I/O and record its event.
    pub async fn reconcile(self: &Rc<Self>) {
        self.seed_forecasts().await;
        let now = self.now();
        self.read_load();
        let actions = {
            let mut state = self.state.borrow_mut();
            let actions = prescient_policy::plan(&state, &self.config.policy, now);
            for a in &actions {
                apply(&mut state, a, now);
            }
            // After the pass's placements, so a replica ready before the next pass still counts.
            crate::readings::note_provisioning(&mut self.monitor.borrow_mut(), &state, unix_ms());
            actions
        };
        for a in actions {
            self.execute(&a).await;
        }
    }

    /// Puts what monitoring measured into the snapshot (see [`crate::readings`]), and the
    /// forecasts (see [`crate::forecasting`]).
    fn read_load(&self) {
        let monitor = self.monitor.borrow();
        let now_ms = unix_ms();
        let mut state = self.state.borrow_mut();
        crate::readings::read(&monitor, &mut self.chains.borrow_mut(), &mut state, now_ms);
        self.forecasting
            .borrow_mut()
            .read(&monitor, &mut state, now_ms, self.now());
    }

    /// Drops a task's forecast series (its history was imported): the next pass starts it
    /// again, seeded from what is stored now.
    pub fn reseed_forecast(&self, graph_id: &str, task: &str) {
        self.forecasting.borrow_mut().forget(graph_id, task);
        self.reconcile_soon();
    }

    /// Starts a forecast series for each task of a graph newly under `[scaling.predictive]`,
    /// seeded from its stored per-second and per-minute history (read on the blocking pool).
    async fn seed_forecasts(&self) {
        let unseeded = {
            let mut f = self.forecasting.borrow_mut();
            f.track(&self.state.borrow(), unix_ms());
            f.unseeded()
        };
        for (graph, task, from, to) in unseeded {
            let reg = self.registry.clone();
            let (g, t) = (graph.clone(), task.clone());
            let read = tokio::task::spawn_blocking(move || {
                let to_s = to * 60;
                let from_s = to_s.saturating_sub(crate::store::SECOND_HISTORY_S);
                Ok::<_, crate::store::StoreError>((
                    reg.history(&g, &t, from, to)?,
                    reg.history_seconds(&g, &t, from_s, to_s.saturating_sub(1))?,
                ))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            let (minutes, seconds) = read.unwrap_or_else(|e| {
                warn!("reading {graph}.{task}'s history to seed its forecast failed: {e}");
                Default::default()
            });
            info!(
                "forecasting {graph}.{task}: seeded with {} stored minutes and {} seconds",
                minutes.len(),
                seconds.len()
            );
            self.forecasting
                .borrow_mut()
                .seed(&graph, &task, &minutes, &seconds);
        }
    }

    async fn execute(self: &Rc<Self>, action: &Action) {
        let (summary, reconnected) = match action {
            Action::AcceptReport { host, .. } => self
                .agents
                .borrow()
                .get(host)
                .map(|a| (a.summary(), a.reconnected))
                .unwrap_or_default(),
            _ => (String::new(), false),
        };
        match action {
            Action::AcceptReport { host, orphans, .. } => {
                for r in orphans {
                    self.retire(host, &r.replica).await;
                }
                // A (re)registered agent's ingress needs every current routing table.
                self.push_all_tables_to(host).await;
            }
            Action::Undeploy { graph_id, .. } => {
                {
                    let mut monitor = self.monitor.borrow_mut();
                    monitor.samples.remove_graph(graph_id);
                    monitor.cold.remove_graph(graph_id);
                }
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
            }
            Action::Place {
                graph_id,
                task,
                replica,
                host,
                ..
            } => {
                let record = self
                    .state
                    .borrow()
                    .deployments
                    .get(graph_id)
                    .map(|d| d.record.clone());
                if let Some(record) = record {
                    tokio::task::spawn_local(self.clone().provision(
                        replica.clone(),
                        record,
                        task.clone(),
                        host.clone(),
                    ));
                }
            }
            Action::Publish { graph_id, .. } => self.push_table(graph_id).await,
            Action::WarmPool { host, shapes, .. } => {
                let client = self.agents.borrow().get(host).map(|a| a.client.clone());
                if let Some(c) = client {
                    let mut req = c.set_warm_pool_request();
                    let mut list = req.get().init_shapes(shapes.len() as u32);
                    for (i, w) in shapes.iter().enumerate() {
                        let mut b = list.reborrow().get(i as u32);
                        b.set_cpu_millicores(w.cpu_millicores);
                        b.set_memory_bytes(w.memory_bytes);
                        b.set_count(w.count);
                    }
                    if let Err(e) = req.send().promise.await {
                        warn!(agent = %host, "setting its warm pool failed: {e}");
                    }
                }
            }
            Action::Retire { replicas, .. } | Action::RetireDrained { replicas, .. } => {
                for r in replicas {
                    self.retire(&r.host, &r.id).await;
                }
            }
            Action::MarkLost { .. }
            | Action::SwitchVersion { .. }
            | Action::Unplaceable { .. }
            | Action::StartDrain { .. }
            | Action::ScaleOut { .. }
            | Action::ForecastOnly { .. }
            | Action::ScaleIn { .. }
            | Action::Replace { .. }
            | Action::Shed { .. } => {}
        }
        self.events
            .record(&action.event(&summary, reconnected))
            .await;
    }

    async fn retire(&self, host: &str, replica: &str) {
        let client = self.agents.borrow().get(host).map(|a| a.client.clone());
        if let Some(c) = client {
            let mut req = c.retire_request();
            req.get().set_replica(replica);
            if let Err(e) = req.send().promise.await {
                warn!(agent = %host, %replica, "retiring failed: {e}");
            }
        }
    }

    /// Registers (or re-registers) an agent; its reported replicas are adopted by the next
    /// pass, which is asked for now.
    pub(crate) fn register(
        &self,
        host: prescient_schemas::agent_capnp::host_info::Reader<'_>,
        client: agent::Client,
        replicas: capnp::struct_list::Reader<
            '_,
            prescient_schemas::agent_capnp::replica_info::Owned,
        >,
    ) -> Result<(String, u64), capnp::Error> {
        let name = text(host.get_name())?;
        if name.is_empty() {
            return Err(capnp::Error::failed("an agent must have a name".into()));
        }
        let gpus = host.get_gpus()?;
        let nic_speed: u64 = host
            .get_nics()?
            .iter()
            .map(|n| n.get_speed_bits_per_sec())
            .fold(0, u64::saturating_add);
        let capacity = Capacity {
            cpu_millicores: u64::from(host.get_cpus()) * 1000,
            memory_bytes: host.get_memory_bytes(),
            gpus: gpus.len(),
            gpu_memory_bytes: gpus
                .iter()
                .map(|g| g.get_memory_bytes())
                .fold(0, u64::saturating_add),
            network_bits_per_sec: (nic_speed > 0).then_some(nic_speed),
        };
        let mut reported = Vec::new();
        for r in replicas.iter() {
            reported.push(Reported {
                replica: text(r.get_replica())?,
                graph_id: text(r.get_graph_id())?,
                task: text(r.get_task())?,
                version: r.get_version(),
                epoch: r.get_epoch(),
                addr: text(r.get_data_plane_addr())?,
            });
        }
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        let reconnected = self.agents.borrow().contains_key(&name);
        let entry = AgentEntry {
            name: name.clone(),
            hostname: text(host.get_hostname())?,
            cpus: host.get_cpus(),
            memory_bytes: host.get_memory_bytes(),
            gpus: gpus.len(),
            ingress_addr: text(host.get_ingress_addr())?,
            provisioner: text(host.get_provisioner())?,
            telemetry: text(host.get_telemetry())?,
            last_heartbeat_unix_ms: unix_ms(),
            reconnected,
            generation,
            client,
        };
        self.agents.borrow_mut().insert(name.clone(), entry);
        // A microVM agent keeps a warm pool the plan sizes.
        let register = if text(host.get_provisioner())?.starts_with("qemu") {
            observe::registered_with_pool
        } else {
            observe::registered
        };
        register(
            &mut self.state.borrow_mut(),
            &name,
            capacity,
            reported,
            self.now(),
        );
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
        let graphs: Vec<String> = self
            .state
            .borrow()
            .deployments
            .iter()
            .filter(|(_, d)| d.published > 0)
            .map(|(id, _)| id.clone())
            .collect();
        for graph_id in graphs {
            if let Some(req) = self.routes_request(&client, &graph_id) {
                if let Err(e) = req.send().promise.await {
                    warn!(agent = %agent_name, graph = %graph_id, "pushing routes failed: {e}");
                }
            }
        }
    }

    /// Pushes a graph's current table to every ready agent.
    async fn push_table(&self, graph_id: &str) {
        let clients: Vec<(String, agent::Client)> = {
            let state = self.state.borrow();
            self.agents
                .borrow()
                .values()
                .filter(|a| {
                    state
                        .hosts
                        .get(&a.name)
                        .is_some_and(|h| h.health == Health::Ready)
                })
                .map(|a| (a.name.clone(), a.client.clone()))
                .collect()
        };
        for (name, c) in &clients {
            if let Some(req) = self.routes_request(c, graph_id) {
                if let Err(e) = req.send().promise.await {
                    warn!(agent = %name, graph = %graph_id, "pushing routes failed: {e}");
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
        let state = self.state.borrow();
        let d = state.deployments.get(graph_id)?;
        let mut req = client.set_routes_request();
        encode_table(d, req.get().init_table());
        Some(req)
    }

    /// A heartbeat; false when the agent must register again (its session was replaced, or it
    /// was declared lost).
    /// `warm`: the booted, idle VMs it has now (a microVM agent's warm pool).
    pub(crate) fn heartbeat(
        &self,
        name: &str,
        generation: u64,
        warm: Vec<prescient_policy::snapshot::WarmShape>,
    ) -> bool {
        let mut agents = self.agents.borrow_mut();
        match agents.get_mut(name) {
            Some(a) if a.generation == generation => {
                a.last_heartbeat_unix_ms = unix_ms();
                let mut state = self.state.borrow_mut();
                if state
                    .hosts
                    .get(name)
                    .is_some_and(|h| h.pools && h.warm != warm)
                {
                    observe::warm_reported(&mut state, name, warm);
                }
                observe::heartbeat(&mut state, name, self.now())
            }
            _ => false,
        }
    }

    /// A replica's worker exited on `host`.
    pub(crate) async fn replica_down(&self, host: &str, replica: &str, reason: &str) {
        let lost = observe::replica_down(
            &mut self.state.borrow_mut(),
            host,
            replica,
            &self.config.policy.backoff,
            self.now(),
        );
        if let Some((_, failures, wait)) = lost {
            self.events
                .record(&Event::ReplicaLost {
                    replica: replica.to_string(),
                    host: host.to_string(),
                    reason: reason.to_string(),
                    crashes: failures.count,
                    retry_in: wait,
                })
                .await;
            self.reconcile_soon();
        }
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
                    let (samples, target_ns) = {
                        let monitor = self.monitor.borrow();
                        let now_s = unix_ms() / 1000;
                        let target = monitor
                            .task_stats(&record.id, 60, now_s)
                            .into_iter()
                            .find(|t| t.task == task)
                            .map_or(0, |t| t.exec_p50_ns);
                        (monitor.samples.of(&record.id, &task), target)
                    };
                    let mut spec: replica_spec::Builder<'_> = req.get().init_spec();
                    spec.set_replica(id.as_str());
                    spec.set_task(task.as_str());
                    spec.set_warmup_target_ns(target_ns);
                    spec.set_warmup_timeout_ns(self.config.warmup_timeout.as_nanos() as u64);
                    let mut list = spec.reborrow().init_warmup(samples.len() as u32);
                    for (i, inputs) in samples.iter().enumerate() {
                        let mut s = list.reborrow().get(i as u32);
                        s.set_graph_id(record.id.as_str());
                        s.set_task(task.as_str());
                        let mut data = s.init_inputs(inputs.len() as u32);
                        for (j, d) in inputs.iter().enumerate() {
                            data.set(j as u32, d);
                        }
                    }
                    codec::encode_record(&record, spec.init_graph());
                }
                match req.send().promise.await {
                    Ok(reply) => reply
                        .get()
                        .and_then(|r| {
                            let how = text(r.get_vm_start())?;
                            Ok((
                                text(r.get_data_plane_addr())?,
                                Duration::from_nanos(r.get_warmup_ns()),
                                r.get_warmup_executions(),
                                r.get_warmup_stable(),
                                (!how.is_empty())
                                    .then(|| (how, Duration::from_nanos(r.get_vm_start_ns()))),
                                Some(Duration::from_nanos(r.get_vm_deploy_ns()))
                                    .filter(|d| !d.is_zero()),
                            ))
                        })
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.extra),
                }
            }
        };
        let now = self.now();
        match result {
            Ok((addr, warmup, executions, stable, vm_start, vm_deploy)) => {
                // A VM from the warm pool says nothing of the lead time the plan orders
                // ahead by: that is the boot the pool hid.
                let provisioned = if vm_start.as_ref().is_some_and(|(how, _)| how == "warm") {
                    observe::provisioned_warm
                } else {
                    observe::provisioned_after_warmup
                };
                let took = provisioned(
                    &mut self.state.borrow_mut(),
                    &record.id,
                    &id,
                    &addr,
                    warmup,
                    now,
                );
                info!(replica = %id, %host, "replica ready");
                self.events
                    .record(&Event::ReplicaReady {
                        replica: id.clone(),
                        host: host.clone(),
                        took,
                        warmup,
                        executions,
                        stable,
                        vm_start,
                        vm_deploy,
                    })
                    .await;
            }
            Err(error) => {
                let failed = observe::provision_failed(
                    &mut self.state.borrow_mut(),
                    &record.id,
                    &id,
                    &self.config.policy.backoff,
                    now,
                );
                if let Some((_, failures, wait)) = failed {
                    self.events
                        .record(&Event::ReplicaFailed {
                            replica: id.clone(),
                            host: host.clone(),
                            error,
                            attempt: failures.count,
                            retry_in: wait,
                        })
                        .await;
                }
            }
        }
        self.reconcile_soon();
    }
}

fn encode_table(d: &Deployment, mut b: routing_table::Builder<'_>) {
    b.set_epoch(d.epoch);
    codec::encode_record(&d.record, b.reborrow().init_graph());
    let ready: Vec<_> = d.replicas.iter().filter(|r| r.is_ready()).collect();
    let mut entries = b.init_entries(ready.len() as u32);
    for (i, r) in ready.iter().enumerate() {
        let mut e = entries.reborrow().get(i as u32);
        e.set_task(r.task.as_str());
        e.set_replica(r.id.as_str());
        e.set_host(r.host.as_str());
        e.set_data_plane_addr(r.addr.as_str());
    }
}
