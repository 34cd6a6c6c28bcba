//! The agent process: its session with the control node (register, heartbeat, reconnect with
//! backoff), the `Agent` capability control drives it through, and the workers it runs.
//!
//! Architecture invariant: losing the control node changes nothing on the request path. Workers
//! keep their routing tables and keep serving; on reconnect the agent reports the replicas it
//! runs so a restarted control node adopts them instead of provisioning new ones.

pub mod inventory;
mod replicas;
use replicas::AgentCap;
use report::ProbeTotals;
mod report;

use crate::dataplane::{self, PeerPool};
use crate::node::inventory::HostInventory;
use crate::provision::{Backend, ProcessProvisioner};
use crate::request_path::ingress::Ingress;
use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use futures::AsyncReadExt as _;
use prescient_schemas::agent_capnp::agent_session;
use prescient_schemas::api_capnp::control;
use prescient_schemas::codec::text;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Why a session with the control node could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting: {0}")]
    Connect(#[from] std::io::Error),
    #[error("{0}")]
    Rpc(#[from] capnp::Error),
}

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
    /// `None`: process workers; else microVMs booted from this guest image.
    pub qemu: Option<QemuSettings>,
}

/// How the `qemu` provisioner runs.
#[derive(Debug, Clone)]
pub struct QemuSettings {
    /// The directory holding `vmlinuz` and `initramfs.cpio.gz`.
    pub image: std::path::PathBuf,
    /// `None`: detected once at start (a guest booted under KVM, else TCG).
    pub accel: Option<crate::provision::qemu::Accel>,
    /// Start VMs from a per-shape snapshot once saved (else every VM boots).
    pub snapshots: bool,
    /// A VM not serving this long after QEMU started is killed and reported failed.
    pub ready_timeout: Duration,
    /// Idle VMs of the warm pool beyond its target stop once idle this long.
    pub warm_idle_timeout: Duration,
}

/// A routing table's epoch and its encoding as a worker command.
type EncodedTable = (u64, Rc<Vec<u8>>);

struct Replica {
    /// The worker's cgroup (shared with its supervisor, which drops it when the worker ends).
    cgroup: Option<Rc<crate::provision::cgroup::Cgroup>>,
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
    provisioner: Backend,
    replicas: RefCell<HashMap<String, Replica>>,
    /// Latest routing table per graph, encoded as a worker command, with its epoch.
    tables: RefCell<HashMap<String, EncodedTable>>,
    session: RefCell<Option<agent_session::Client>>,
    control: RefCell<Option<control::Client>>,
    /// Workers' telemetry batches waiting to go to the control node (bounded; oldest dropped).
    telemetry: RefCell<std::collections::VecDeque<TelemetryMessage>>,
    telemetry_dropped: std::cell::Cell<u64>,
    /// The eBPF probes, when they loaded; `probe_status` says so, or why not.
    probes: Option<crate::telemetry::probes::Probes>,
    probe_status: String,
    /// What the probes counted per replica and on the host since they loaded (for /metrics).
    probe_totals: RefCell<ProbeTotals>,
    /// Each VM's TCP sockets, read once a second with the probes.
    sockets: RefCell<crate::telemetry::sockets::SocketLedger>,
}

type TelemetryMessage = capnp::message::Reader<capnp::serialize::OwnedSegments>;

/// Worker batches held while the control node is slow or away.
const MAX_QUEUED_BATCHES: usize = 256;

/// A retired worker that has not drained (finished what it accepted) by then is killed.
pub const RETIRE_TIMEOUT: Duration = Duration::from_secs(30);

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
        let mut inventory = HostInventory::read(config.cpus, config.memory_bytes);
        let provisioner = match &config.qemu {
            None => {
                let mut p = ProcessProvisioner::new(
                    config.worker_exe.clone(),
                    config.name.clone(),
                    config.listen.ip(),
                );
                p.data_plane = config.data_plane;
                p.telemetry = config.telemetry;
                Backend::Process(p)
            }
            Some(q) => {
                use crate::provision::qemu;
                let run_dir = config.data_dir.join("vms");
                let accel = match q.accel {
                    Some(a) => a,
                    None => qemu::detect_accel(&q.image, &run_dir).await,
                };
                let mut p = qemu::QemuProvisioner::new(
                    &q.image,
                    config.name.clone(),
                    config.listen.ip(),
                    run_dir,
                    accel,
                );
                p.data_plane = config.data_plane;
                p.telemetry = config.telemetry;
                p.restore = q.snapshots;
                p.ready_timeout = q.ready_timeout;
                p.pool.idle_timeout = q.warm_idle_timeout;
                // GPUs bound to vfio-pci are the VMs' to take; NVML cannot see them.
                let vfio = crate::provision::vfio::vfio_gpus(&p.sysfs);
                if !vfio.is_empty() {
                    info!(gpus = vfio.len(), "GPUs bound to vfio-pci, for VMs to take");
                }
                let first = inventory.gpus.len() as u32;
                for (i, g) in vfio.into_iter().enumerate() {
                    inventory.gpus.push(crate::node::inventory::Gpu {
                        index: first + i as u32,
                        name: format!("vfio-pci {}", g.pci_bus_id),
                        uuid: g.pci_bus_id,
                        // Unknown without the NVIDIA driver: tasks asking GPU memory go elsewhere.
                        memory_bytes: 0,
                    });
                }
                Backend::Qemu(Box::new(p))
            }
        };
        let (probes, probe_status) = if config.probes {
            match crate::telemetry::probes::Probes::load() {
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
        let node = Rc::new(AgentNode {
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
        });
        if matches!(node.provisioner, Backend::Qemu(_)) {
            tokio::task::spawn_local(keep_warm_pool(Rc::downgrade(&node)));
        }
        Ok(node)
    }

    /// The booted, idle VMs this agent has, per shape (none for process workers).
    pub fn warm_vms(&self) -> Vec<crate::provision::pool::Keep> {
        match &self.provisioner {
            Backend::Qemu(q) => q.pool.counts(),
            Backend::Process(_) => Vec::new(),
        }
    }

    /// What the control node asks the warm pool to keep.
    pub fn set_warm_pool(&self, keep: Vec<crate::provision::pool::Keep>) {
        match &self.provisioner {
            Backend::Qemu(q) => q.pool.set_targets(keep),
            Backend::Process(_) => {
                tracing::debug!("a warm pool asked of a process-worker agent: ignored")
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

    async fn session_once(self: Rc<Self>) -> Result<(), SessionError> {
        let stream = tokio::net::TcpStream::connect(&self.config.control).await?;
        stream.set_nodelay(true)?;
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
        let registry = control
            .agents_request()
            .send()
            .promise
            .await?
            .get()?
            .get_registry()?;
        let mut req = registry.register_request();
        {
            let mut p = req.get();
            self.inventory.encode(
                &self.config.name,
                &self.provisioner.description(),
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
        let reply = req.send().promise.await?;
        let reply = reply.get()?;
        let session = reply.get_session()?;
        let host_id = text(reply.get_host_id())?;
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
                    let warm = self.warm_vms();
                    let mut list = hb.get().init_warm(warm.len() as u32);
                    for (i, k) in warm.iter().enumerate() {
                        let mut w = list.reborrow().get(i as u32);
                        w.set_cpu_millicores(k.shape.0);
                        w.set_memory_bytes(k.shape.1);
                        w.set_count(k.count);
                    }
                    match tokio::time::timeout(self.config.heartbeat * 3, hb.send().promise).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => break if seq == 1 { Err(err.into()) } else { Ok(()) },
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
}

/// Keeps a microVM agent's warm pool while the agent lives: a round every 200 ms (each boots
/// at most one VM, so several boot one after another).
async fn keep_warm_pool(node: std::rc::Weak<AgentNode>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else {
            return;
        };
        if let Backend::Qemu(q) = &node.provisioner {
            q.keep_pool().await;
        }
    }
}
