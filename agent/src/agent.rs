//! The agent process: its session with the control node (register, heartbeat, reconnect with
//! backoff), the `Agent` capability control drives it through, and the workers it runs.
//!
//! Architecture invariant: losing the control node changes nothing on the request path. Workers
//! keep their routing tables and keep serving; on reconnect the agent reports the replicas it
//! runs so a restarted control node adopts them instead of provisioning new ones.

use crate::dataplane::{self, PeerPool};
use crate::host::HostInventory;
use crate::ingress::Ingress;
use crate::provisioner::{ProcessProvisioner, Provisioner, VmSpec};
use crate::routes::GraphRoutes;
use capnp::capability::Rc as CapRc;
use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use futures::AsyncReadExt as _;
use prescient_schemas::agent_capnp::{agent, agent_session, worker_command};
use prescient_schemas::api_capnp::control;
use prescient_schemas::codec;
use prescient_schemas::codec::text;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Longest wait between attempts to reach the control node. A restarted control node waits
/// its start-up grace (longer than this plus a heartbeat) for agents before placing anything.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Stable name of this agent (defaults to the hostname).
    pub name: String,
    /// The control node's API address.
    pub control: String,
    /// The ingress (data plane) address clients send invocations to.
    pub listen: SocketAddr,
    pub cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub heartbeat: Duration,
    /// The binary that runs workers (`<exe> worker ...`).
    pub worker_exe: std::path::PathBuf,
    /// Where the agent keeps its state (the artifact cache).
    pub data_dir: std::path::PathBuf,
    /// How workers drive their data-plane sockets.
    pub data_plane: crate::dataplane::Transport,
    /// Whether workers record per-request spans.
    pub telemetry: bool,
    /// Whether to load the eBPF probes (without them, or without the rights, procfs alone).
    pub probes: bool,
}

/// A routing table's epoch and its encoding as a worker command.
type EncodedTable = (u64, Rc<Vec<u8>>);

struct Replica {
    /// The worker's cgroup (shared with its supervisor, which drops it when the worker ends).
    cgroup: Option<Rc<crate::cgroup::Cgroup>>,
    /// The worker process, which is the VM when there is no cgroup.
    pid: Option<u32>,
    limits: prescient_schemas::Resources,
    graph_id: String,
    version: u32,
    task: String,
    addr: String,
    commands: mpsc::UnboundedSender<Rc<Vec<u8>>>,
    kill: Option<oneshot::Sender<()>>,
}

pub struct AgentNode {
    config: AgentConfig,
    inventory: HostInventory,
    ingress: Rc<Ingress>,
    ingress_addr: String,
    provisioner: ProcessProvisioner,
    replicas: RefCell<HashMap<String, Replica>>,
    /// Latest routing table per graph, encoded as a worker command, with its epoch.
    tables: RefCell<HashMap<String, EncodedTable>>,
    session: RefCell<Option<agent_session::Client>>,
    control: RefCell<Option<control::Client>>,
    /// Workers' telemetry batches waiting to go to the control node (bounded; oldest dropped).
    telemetry: RefCell<std::collections::VecDeque<TelemetryMessage>>,
    telemetry_dropped: std::cell::Cell<u64>,
    /// The eBPF probes, when they loaded; `probe_status` says so, or why not.
    probes: Option<crate::probes::Probes>,
    probe_status: String,
    /// What the probes counted per replica and on the host since they loaded (for /metrics).
    probe_totals: RefCell<ProbeTotals>,
    /// Each VM's TCP sockets, read once a second with the probes.
    sockets: RefCell<crate::sockets::SocketLedger>,
}

struct ProbeTotals {
    /// Per replica: graph, task and the sums.
    vms: std::collections::BTreeMap<String, (String, String, crate::probes::ProbeUsage)>,
    host_runq_hist: crate::probes::CpuHistogram,
}

impl Default for ProbeTotals {
    fn default() -> Self {
        ProbeTotals {
            vms: Default::default(),
            host_runq_hist: [0; prescient_probes_common::LATENCY_BUCKETS + 1],
        }
    }
}

type TelemetryMessage = capnp::message::Reader<capnp::serialize::OwnedSegments>;

/// Worker batches held while the control node is slow or away.
const MAX_QUEUED_BATCHES: usize = 256;

impl AgentNode {
    /// Binds the ingress and prepares the provisioner. Must run in a `LocalSet`.
    pub async fn start(config: AgentConfig) -> std::io::Result<Rc<AgentNode>> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let ingress_addr = listener.local_addr()?.to_string();
        let (pool, lost) = PeerPool::new();
        let ingress = Ingress::new(&config.name, &ingress_addr, pool);
        // The ingress always uses epoll: it also serves plain clients, and it is one hop of many.
        tokio::task::spawn_local(dataplane::serve(
            dataplane::Listener::Epoll(listener),
            ingress.clone(),
        ));
        tokio::task::spawn_local(ingress.clone().handle_lost(lost));
        let inventory = HostInventory::read(config.cpus, config.memory_bytes);
        let mut provisioner = ProcessProvisioner::new(
            config.worker_exe.clone(),
            config.name.clone(),
            config.listen.ip(),
        );
        provisioner.data_plane = config.data_plane;
        provisioner.telemetry = config.telemetry;
        let (probes, probe_status) = if config.probes {
            match crate::probes::Probes::load() {
                Ok(p) => {
                    let status = format!(
                        "ebpf: run-queue latency and CPU time (tp_btf sched_switch), TCP bytes (per-socket counters by sock_diag, closes by tp_btf inet_sock_set_state{})",
                        // sock_diag reads TCP sockets only; the close probe tells TCP apart
                        // where the kernel's BTF gives sk_protocol's offset.
                        if p.tcp_only { "" } else { "; any inet socket's close taken for TCP" }
                    );
                    info!("probes: {status}");
                    (Some(p), status)
                }
                Err(e) => {
                    // Said once; the host and VM samples carry on from procfs and cgroups.
                    warn!("eBPF probes off, using procfs and cgroups only: {e}");
                    (None, format!("off: {e}"))
                }
            }
        } else {
            (None, "off: --no-probes".to_string())
        };
        Ok(Rc::new(AgentNode {
            config,
            inventory,
            ingress,
            ingress_addr,
            provisioner,
            replicas: RefCell::default(),
            tables: RefCell::default(),
            session: RefCell::default(),
            control: RefCell::default(),
            telemetry: RefCell::default(),
            telemetry_dropped: Default::default(),
            probes,
            probe_status,
            probe_totals: RefCell::default(),
            sockets: RefCell::default(),
        }))
    }

    /// Forwards workers' telemetry batches to the control node once a second.
    pub async fn forward_telemetry(self: Rc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sampler = crate::hostmon::HostSampler::default();
        let mut vm_cpu: HashMap<String, (u64, std::time::Instant)> = HashMap::new();
        let mut cpus = crate::probes::CpuTracker::default();
        crate::telemetry::install_switch_signals();
        crate::clock::init();
        loop {
            tick.tick().await;
            if let Some(mut sample) = sampler.sample(crate::dataplane::now_unix_us() / 1000) {
                let vms = self.sample_vms(&mut vm_cpu);
                // Who is in each VM matters only to the probes and to per-process GPU memory.
                let members = if self.probes.is_some() || !sample.gpu_memory_by_pid.is_empty() {
                    self.vm_processes()
                } else {
                    Vec::new()
                };
                let probed = self.sample_probes(&mut cpus, &members, &mut sample);
                let members: HashMap<String, Vec<u32>> = members.into_iter().collect();
                let mut msg = capnp::message::Builder::new_default();
                {
                    let mut b = msg
                        .init_root::<prescient_schemas::agent_capnp::telemetry_batch::Builder<'_>>(
                        );
                    b.set_host_id(self.config.name.as_str());
                    sample.encode(b.reborrow().init_hosts(1).get(0));
                    let mut list = b.init_vms(vms.len() as u32);
                    for (i, (replica, graph, task, cores, mem, limits)) in vms.iter().enumerate() {
                        let mut v = list.reborrow().get(i as u32);
                        v.set_replica(replica.as_str());
                        v.set_graph_id(graph.as_str());
                        v.set_task(task.as_str());
                        v.set_cpu_cores(*cores);
                        v.set_memory_bytes(*mem);
                        v.set_cpu_limit_cores(limits.cpu_millicores as f32 / 1000.0);
                        v.set_memory_limit_bytes(limits.memory_bytes);
                        if let Some(procs) = members.get(replica) {
                            v.set_gpu_memory_bytes(crate::hostmon::vm_gpu_memory(
                                &sample.gpu_memory_by_pid,
                                procs,
                            ));
                        }
                        if let Some(u) = probed.get(replica) {
                            v.set_probed(true);
                            v.set_tcp_sent_bytes(u.tcp_sent_bytes);
                            v.set_tcp_received_bytes(u.tcp_received_bytes);
                            u.runq_sketch().encode(v.init_run_queue_latency_ns());
                        }
                    }
                }
                let bytes = capnp::serialize::write_message_to_words(&msg);
                if let Ok(m) = capnp::serialize::read_message(&mut &bytes[..], Default::default()) {
                    self.queue_telemetry(m);
                }
            }
            let Some(session) = self.session.borrow().clone() else {
                continue;
            };
            if let Some(bytes) = self.ingress.take_latency_batch() {
                if let Ok(msg) = capnp::serialize::read_message(&mut &bytes[..], Default::default())
                {
                    self.queue_telemetry(msg);
                }
            }
            let batches: Vec<TelemetryMessage> = self.telemetry.borrow_mut().drain(..).collect();
            for msg in batches {
                let mut req = session.telemetry_request();
                let Ok(root) =
                    msg.get_root::<prescient_schemas::agent_capnp::telemetry_batch::Reader<'_>>()
                else {
                    continue;
                };
                if req.get().set_batch(root).is_err() {
                    continue;
                }
                if req.send().promise.await.is_err() {
                    break;
                }
            }
        }
    }

    /// What the probes counted since the last call, per replica (its cgroup's processes, or
    /// its worker without one) and on the host (into `host`). Empty without probes.
    fn sample_probes(
        &self,
        cpus: &mut crate::probes::CpuTracker,
        members: &[(String, Vec<u32>)],
        host: &mut crate::hostmon::HostSampleRec,
    ) -> HashMap<String, crate::probes::ProbeUsage> {
        let Some(probes) = &self.probes else {
            return HashMap::new();
        };
        let mut grown = probes.sample(members);
        let tcp = self.sockets.borrow_mut().sample(members, probes);
        for (name, usage) in grown.iter_mut() {
            if let Some(&(written, read)) = tcp.get(name) {
                usage.tcp_sent_bytes += written;
                usage.tcp_received_bytes += read;
            }
        }
        let host_hist = cpus.update(probes.cpu_histograms());
        host.runq_hist = Some(host_hist);
        let mut totals = self.probe_totals.borrow_mut();
        for (i, h) in totals.host_runq_hist.iter_mut().enumerate() {
            *h += host_hist[i];
        }
        let replicas = self.replicas.borrow();
        totals.vms.retain(|k, _| replicas.contains_key(k));
        for (name, usage) in &grown {
            if let Some(r) = replicas.get(name) {
                totals
                    .vms
                    .entry(name.clone())
                    .or_insert_with(|| (r.graph_id.clone(), r.task.clone(), Default::default()))
                    .2
                    .add(usage);
            }
        }
        grown.into_iter().collect()
    }

    /// Each replica's processes: its cgroup's members, or its worker without a cgroup.
    fn vm_processes(&self) -> Vec<(String, Vec<u32>)> {
        self.replicas
            .borrow()
            .iter()
            .map(|(name, r)| {
                let procs = match &r.cgroup {
                    Some(cg) => cg.processes(),
                    None => r.pid.into_iter().collect(),
                };
                (name.clone(), procs)
            })
            .collect()
    }

    /// CPU (cores, over the last interval) and memory of each replica's cgroup.
    #[allow(clippy::type_complexity)]
    fn sample_vms(
        &self,
        prev: &mut HashMap<String, (u64, std::time::Instant)>,
    ) -> Vec<(
        String,
        String,
        String,
        f32,
        u64,
        prescient_schemas::Resources,
    )> {
        let now = std::time::Instant::now();
        let mut out = Vec::new();
        let replicas = self.replicas.borrow();
        prev.retain(|k, _| replicas.contains_key(k));
        for (name, r) in replicas.iter() {
            let Some((cpu_ns, mem)) = r.cgroup.as_ref().and_then(|c| c.usage()) else {
                continue;
            };
            let cores = match prev.insert(name.clone(), (cpu_ns, now)) {
                Some((p, at)) => {
                    cpu_ns.saturating_sub(p) as f32
                        / now.duration_since(at).as_nanos().max(1) as f32
                }
                None => 0.0,
            };
            out.push((
                name.clone(),
                r.graph_id.clone(),
                r.task.clone(),
                cores,
                mem,
                r.limits,
            ));
        }
        out
    }

    fn queue_telemetry(&self, msg: TelemetryMessage) {
        let mut q = self.telemetry.borrow_mut();
        if q.len() >= MAX_QUEUED_BATCHES {
            q.pop_front();
            self.telemetry_dropped.set(self.telemetry_dropped.get() + 1);
        }
        q.push_back(msg);
    }

    /// What this agent exposes on `/metrics` (Prometheus text format).
    pub fn render_metrics(&self) -> String {
        use prescient_schemas::prom::Exposition;
        let mut e = Exposition::default();
        let agent = self.config.name.as_str();
        e.family(
            "prescient_agent_connected",
            "gauge",
            "1 while the agent has a session with the control node.",
        );
        e.sample(
            "prescient_agent_connected",
            &[("agent", agent)],
            if self.session.borrow().is_some() {
                1.0
            } else {
                0.0
            },
        );
        e.family(
            "prescient_agent_replicas",
            "gauge",
            "Replicas (worker processes) this agent runs, per graph.",
        );
        let mut per_graph: std::collections::BTreeMap<String, usize> = Default::default();
        for r in self.replicas.borrow().values() {
            *per_graph.entry(r.graph_id.clone()).or_default() += 1;
        }
        for (g, n) in &per_graph {
            e.sample(
                "prescient_agent_replicas",
                &[("agent", agent), ("graph", g)],
                *n as f64,
            );
        }
        let (read, written) = crate::dataplane::io_bytes();
        e.family(
            "prescient_ingress_bytes_total",
            "counter",
            "Data-plane bytes through this agent's ingress.",
        );
        e.sample(
            "prescient_ingress_bytes_total",
            &[("agent", agent), ("direction", "in")],
            read as f64,
        );
        e.sample(
            "prescient_ingress_bytes_total",
            &[("agent", agent), ("direction", "out")],
            written as f64,
        );
        e.family(
            "prescient_agent_telemetry_batches_dropped_total",
            "counter",
            "Worker telemetry batches dropped because the control node was slow or away.",
        );
        e.sample(
            "prescient_agent_telemetry_batches_dropped_total",
            &[("agent", agent)],
            self.telemetry_dropped.get() as f64,
        );
        self.render_probe_metrics(&mut e);
        e.family("prescient_agent_cpus", "gauge", "CPUs this agent offers.");
        e.sample(
            "prescient_agent_cpus",
            &[("agent", agent)],
            f64::from(self.inventory.cpus),
        );
        e.family(
            "prescient_agent_gpus",
            "gauge",
            "GPUs NVML reports on this host.",
        );
        e.sample(
            "prescient_agent_gpus",
            &[("agent", agent)],
            self.inventory.gpus.len() as f64,
        );
        e.finish()
    }

    /// The eBPF probes' counters, cumulative since they loaded.
    fn render_probe_metrics(&self, e: &mut prescient_schemas::prom::Exposition) {
        use prescient_probes_common::LATENCY_BUCKETS;
        let agent = self.config.name.as_str();
        e.family(
            "prescient_agent_probes_loaded",
            "gauge",
            "1 when the eBPF probes run (run-queue latency, TCP bytes per VM); 0: procfs only.",
        );
        e.sample(
            "prescient_agent_probes_loaded",
            &[("agent", agent)],
            if self.probes.is_some() { 1.0 } else { 0.0 },
        );
        if self.probes.is_none() {
            return;
        }
        // Bucket i holds waits in [2^i, 2^(i+1)) ns; its upper bound, in seconds, is `le`.
        let buckets = |hist: &[u64]| -> Vec<(f64, u64)> {
            hist.iter()
                .take(LATENCY_BUCKETS)
                .enumerate()
                .map(|(i, &n)| ((1u64 << (i + 1)) as f64 / 1e9, n))
                .collect()
        };
        let totals = self.probe_totals.borrow();
        e.family(
            "prescient_host_runqueue_latency_seconds",
            "histogram",
            "How long runnable tasks waited for a CPU on this host (eBPF, at sched_switch).",
        );
        e.histogram(
            "prescient_host_runqueue_latency_seconds",
            &[("agent", agent)],
            &buckets(&totals.host_runq_hist),
            totals.host_runq_hist[LATENCY_BUCKETS] as f64 / 1e9,
        );
        e.family(
            "prescient_vm_runqueue_latency_seconds",
            "histogram",
            "How long a VM's runnable threads waited for a CPU (eBPF), per replica.",
        );
        for (replica, (graph, task, u)) in &totals.vms {
            let labels = [
                ("agent", agent),
                ("graph", graph.as_str()),
                ("task", task.as_str()),
                ("replica", replica.as_str()),
            ];
            e.histogram(
                "prescient_vm_runqueue_latency_seconds",
                &labels,
                &buckets(&u.runq_hist),
                u.runq_wait_ns as f64 / 1e9,
            );
        }
        type Get = fn(&crate::probes::ProbeUsage) -> f64;
        let counters: [(&str, &str, Get); 3] = [
            (
                "prescient_vm_tcp_sent_bytes_total",
                "TCP bytes a VM's processes wrote to their sockets (kernel per-socket counters), per replica.",
                |u| u.tcp_sent_bytes as f64,
            ),
            (
                "prescient_vm_tcp_received_bytes_total",
                "TCP bytes a VM's processes read from their sockets (kernel per-socket counters), per replica.",
                |u| u.tcp_received_bytes as f64,
            ),
            (
                "prescient_vm_probe_cpu_seconds_total",
                "CPU time a VM's threads ran, from context switches (eBPF), per replica.",
                |u| u.cpu_ns as f64 / 1e9,
            ),
        ];
        for (name, help, get) in counters {
            e.family(name, "counter", help);
            for (replica, (graph, task, u)) in &totals.vms {
                e.sample(
                    name,
                    &[
                        ("agent", agent),
                        ("graph", graph.as_str()),
                        ("task", task.as_str()),
                        ("replica", replica.as_str()),
                    ],
                    get(u),
                );
            }
        }
    }

    pub fn ingress_addr(&self) -> &str {
        &self.ingress_addr
    }

    /// Keeps a session with the control node for as long as the agent runs.
    pub async fn run(self: Rc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.clone().session_once().await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    warn!(control = %self.config.control, "lost the control node; reconnecting");
                }
                Err(e) => warn!(
                    control = %self.config.control,
                    "cannot register with the control node: {e}; retrying in {backoff:?}"
                ),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn session_once(self: Rc<Self>) -> Result<(), String> {
        let stream = tokio::net::TcpStream::connect(&self.config.control)
            .await
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (r, w) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(r),
            futures::io::BufWriter::new(w),
            rpc_twoparty_capnp::Side::Client,
            Default::default(),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let control: control::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
        let mut connection = tokio::task::spawn_local(rpc);
        let e = |e: capnp::Error| e.to_string();
        let registry = control
            .agents_request()
            .send()
            .promise
            .await
            .map_err(e)?
            .get()
            .map_err(e)?
            .get_registry()
            .map_err(e)?;
        let mut req = registry.register_request();
        {
            let mut p = req.get();
            self.inventory.encode(
                &self.config.name,
                self.provisioner.kind(),
                &self.ingress_addr,
                &self.probe_status,
                p.reborrow().init_host(),
            );
            p.set_agent(capnp_rpc::new_client(AgentCap { node: self.clone() }));
            let replicas = self.replicas.borrow();
            let tables = self.tables.borrow();
            let mut list = p.init_replicas(replicas.len() as u32);
            for (i, (name, r)) in replicas.iter().enumerate() {
                let mut b = list.reborrow().get(i as u32);
                b.set_replica(name.as_str());
                b.set_graph_id(r.graph_id.as_str());
                b.set_version(r.version);
                b.set_task(r.task.as_str());
                b.set_data_plane_addr(r.addr.as_str());
                b.set_epoch(tables.get(&r.graph_id).map_or(0, |(e, _)| *e));
            }
        }
        let reply = req.send().promise.await.map_err(e)?;
        let reply = reply.get().map_err(e)?;
        let session = reply.get_session().map_err(e)?;
        let host_id = reply
            .get_host_id()
            .map_err(e)?
            .to_string()
            .map_err(|x| x.to_string())?;
        info!(%host_id, ingress = %self.ingress_addr, "registered with the control node");
        *self.session.borrow_mut() = Some(session.clone());
        *self.control.borrow_mut() = Some(control.clone());
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(self.config.heartbeat);
        let result = loop {
            tokio::select! {
                _ = &mut connection => break Ok(()),
                _ = tick.tick() => {
                    seq += 1;
                    let mut hb = session.heartbeat_request();
                    hb.get().set_seq(seq);
                    match tokio::time::timeout(self.config.heartbeat * 3, hb.send().promise).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => break if seq == 1 { Err(err.to_string()) } else { Ok(()) },
                        Err(_) => break Ok(()),
                    }
                }
            }
        };
        *self.session.borrow_mut() = None;
        *self.control.borrow_mut() = None;
        connection.abort();
        result
    }

    async fn provision(
        self: &Rc<Self>,
        spec: prescient_schemas::agent_capnp::replica_spec::Reader<'_>,
    ) -> Result<String, String> {
        let s = |e: capnp::Error| e.to_string();
        let replica = spec
            .get_replica()
            .map_err(s)?
            .to_string()
            .map_err(|e| e.to_string())?;
        let task = spec
            .get_task()
            .map_err(s)?
            .to_string()
            .map_err(|e| e.to_string())?;
        if let Some(r) = self.replicas.borrow().get(&replica) {
            return Ok(r.addr.clone());
        }
        let record =
            codec::decode_record(spec.get_graph().map_err(s)?).map_err(|e| e.to_string())?;
        let t = record
            .graph
            .task(&task)
            .ok_or_else(|| format!("graph {} has no task {task:?}", record.id))?;
        let artifact_path = match &t.code.kind {
            prescient_schemas::CodeKind::Exec { sha256, .. }
            | prescient_schemas::CodeKind::Onnx { sha256, .. } => {
                self.fetch_artifact(sha256).await?.display().to_string()
            }
            _ => String::new(),
        };
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut d = msg.init_root::<worker_command::Builder<'_>>().init_deploy();
            d.set_replica(replica.as_str());
            d.set_task(task.as_str());
            d.set_graph(spec.get_graph().map_err(s)?).map_err(s)?;
            d.set_artifact_path(artifact_path.as_str());
        }
        let deploy = capnp::serialize::write_message_to_words(&msg);
        let started = std::time::Instant::now();
        let vm = self
            .provisioner
            .provision(VmSpec {
                replica: replica.clone(),
                resources: t.resources,
                deploy,
            })
            .await
            .map_err(|e| format!("replica {replica} on {}: {e}", self.config.name))?;
        info!(%replica, %task, addr = %vm.data_plane_addr, took = ?started.elapsed(), "replica ready");
        let pid = vm.child.id();
        // Counted from its first switch, not from the next per-second sample.
        if let (Some(probes), Some(pid)) = (&self.probes, pid) {
            probes.join(&replica, pid);
        }
        let crate::provisioner::Vm {
            data_plane_addr,
            mut child,
            mut stdin,
            cgroup,
            telemetry,
            ..
        } = vm;
        let cgroup = cgroup.map(Rc::new);
        let node = self.clone();
        tokio::task::spawn_local(async move {
            let mut r = tokio_util::compat::TokioAsyncReadCompatExt::compat(telemetry);
            let mut options = capnp::message::ReaderOptions::new();
            options.traversal_limit_in_words(Some(64 << 20));
            while let Ok(Some(msg)) =
                capnp_futures::serialize::try_read_message(&mut r, options).await
            {
                node.queue_telemetry(msg);
            }
        });
        let (commands, mut command_rx) = mpsc::unbounded_channel::<Rc<Vec<u8>>>();
        tokio::task::spawn_local(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(bytes) = command_rx.recv().await {
                if stdin.write_all(&bytes).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
        });
        if let Some((_, table)) = self.tables.borrow().get(&record.id) {
            let _ = commands.send(table.clone());
        }
        let (kill, kill_rx) = oneshot::channel();
        self.replicas.borrow_mut().insert(
            replica.clone(),
            Replica {
                cgroup: cgroup.clone(),
                pid,
                limits: t.resources,
                graph_id: record.id.clone(),
                version: record.version,
                task,
                addr: data_plane_addr.clone(),
                commands,
                kill: Some(kill),
            },
        );
        let node = self.clone();
        tokio::task::spawn_local(async move {
            let reason = tokio::select! {
                status = child.wait() => match status {
                    Ok(s) => format!("worker exited: {s}"),
                    Err(e) => format!("worker lost: {e}"),
                },
                _ = kill_rx => {
                    let _ = child.kill().await;
                    drop(cgroup);
                    return;
                }
            };
            drop(cgroup);
            node.replica_exited(&replica, reason).await;
        });
        Ok(data_plane_addr)
    }

    /// A verified local copy of an artifact, fetched from the control node when missing.
    async fn fetch_artifact(
        &self,
        digest: &prescient_schemas::Digest,
    ) -> Result<std::path::PathBuf, String> {
        let dir = self.config.data_dir.join("artifacts");
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join(digest.hex());
        if path.exists() && crate::exec::verify(&path, digest).is_ok() {
            return Ok(path);
        }
        let control = self
            .control
            .borrow()
            .clone()
            .ok_or("not connected to the control node, which holds the artifacts")?;
        let tmp = dir.join(format!(".fetch-{}", digest.hex()));
        let mut out = Vec::new();
        loop {
            let mut req = control.read_artifact_request();
            req.get().set_sha256(&digest.0);
            req.get().set_offset(out.len() as u64);
            req.get().set_length(4 << 20);
            let reply = req.send().promise.await.map_err(|e| e.extra)?;
            let r = reply.get().map_err(|e| e.to_string())?;
            let chunk = r.get_data().map_err(|e| e.to_string())?;
            out.extend_from_slice(chunk);
            if chunk.is_empty() || out.len() as u64 >= r.get_size() {
                break;
            }
        }
        std::fs::write(&tmp, &out).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        if let Err(e) = crate::exec::verify(&tmp, digest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))
                .map_err(|e| format!("making {} executable: {e}", tmp.display()))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| format!("storing {}: {e}", path.display()))?;
        info!(artifact = %digest, bytes = out.len(), "artifact fetched and verified");
        Ok(path)
    }

    async fn replica_exited(&self, replica: &str, reason: String) {
        warn!(%replica, "{reason}");
        self.replicas.borrow_mut().remove(replica);
        let session = self.session.borrow().clone();
        if let Some(session) = session {
            let mut req = session.replica_down_request();
            req.get().set_replica(replica);
            req.get().set_reason(reason.as_str());
            if let Err(e) = req.send().promise.await {
                warn!(%replica, "could not report the lost replica: {e}");
            }
        }
    }

    fn retire(&self, replica: &str) {
        if let Some(mut r) = self.replicas.borrow_mut().remove(replica) {
            info!(%replica, "retiring replica");
            if let Some(k) = r.kill.take() {
                let _ = k.send(());
            }
        }
    }

    fn set_routes(
        &self,
        table: prescient_schemas::agent_capnp::routing_table::Reader<'_>,
    ) -> Result<(), String> {
        let routes = GraphRoutes::decode(table)?;
        let graph_id = routes.graph_id.to_string();
        let epoch = routes.epoch;
        if self
            .tables
            .borrow()
            .get(&graph_id)
            .is_some_and(|(e, _)| *e >= epoch)
        {
            return Ok(()); // never step back to an older table
        }
        self.ingress.install(routes);
        let mut msg = capnp::message::Builder::new_default();
        msg.init_root::<worker_command::Builder<'_>>()
            .set_routes(table)
            .map_err(|e| e.to_string())?;
        let bytes = Rc::new(capnp::serialize::write_message_to_words(&msg));
        for r in self.replicas.borrow().values() {
            if r.graph_id == graph_id {
                let _ = r.commands.send(bytes.clone());
            }
        }
        info!(graph = %graph_id, epoch, "routing table installed");
        self.tables.borrow_mut().insert(graph_id, (epoch, bytes));
        Ok(())
    }

    fn remove_graph(&self, graph_id: &str) {
        let names: Vec<String> = self
            .replicas
            .borrow()
            .iter()
            .filter(|(_, r)| r.graph_id == graph_id)
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            self.retire(&n);
        }
        self.tables.borrow_mut().remove(graph_id);
        self.ingress.remove_graph(graph_id);
    }
}

/// The capability control drives this agent through.
struct AgentCap {
    node: Rc<AgentNode>,
}

impl agent::Server for AgentCap {
    async fn provision(
        self: CapRc<Self>,
        params: agent::ProvisionParams,
        mut results: agent::ProvisionResults,
    ) -> Result<(), capnp::Error> {
        let spec = params.get()?.get_spec()?;
        let addr = self
            .node
            .provision(spec)
            .await
            .map_err(capnp::Error::failed)?;
        results.get().set_data_plane_addr(addr.as_str());
        Ok(())
    }

    async fn retire(
        self: CapRc<Self>,
        params: agent::RetireParams,
        _: agent::RetireResults,
    ) -> Result<(), capnp::Error> {
        let replica = text(params.get()?.get_replica())?;
        self.node.retire(&replica);
        Ok(())
    }

    async fn set_routes(
        self: CapRc<Self>,
        params: agent::SetRoutesParams,
        _: agent::SetRoutesResults,
    ) -> Result<(), capnp::Error> {
        self.node
            .set_routes(params.get()?.get_table()?)
            .map_err(capnp::Error::failed)
    }

    async fn remove_graph(
        self: CapRc<Self>,
        params: agent::RemoveGraphParams,
        _: agent::RemoveGraphResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_graph_id())?;
        self.node.remove_graph(&id);
        Ok(())
    }
}
