//! The cluster as decisions see it: hosts, the graphs wanted, and each graph's deployment.
//!
//! Plain data. The control node keeps its live state in these types (beside its RPC clients) and
//! hands `&Snapshot` to [`crate::plan`]; the simulator builds the same types in virtual time.
//! Times are [`Duration`]s since an origin the driver picks (the control node's start).

use prescient_schemas::{GraphRecord, Resources};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Routing-table epochs above this are refused when an agent reports them: at a thousand
/// publications a second a real cluster takes nine thousand years to get there, and refusing
/// leaves room for `epoch + 1` never to overflow.
pub const MAX_EPOCH: u64 = 1 << 48;

/// Everything a pass of [`crate::plan`] reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Registered agents by name (one per host).
    pub hosts: BTreeMap<String, Host>,
    /// The latest version of every live graph, by id.
    pub wanted: BTreeMap<String, Arc<GraphRecord>>,
    /// What runs for each graph, by id. Shared, so a pass's working copy of the snapshot costs
    /// a reference per graph and copies only the deployments its actions change
    /// (`Arc::make_mut`).
    pub deployments: BTreeMap<String, Arc<Deployment>>,
    /// Hosts a replica was moved off for contention: placement avoids them until then.
    pub contended: BTreeMap<String, Contended>,
    /// What each host's samples say of contention over the detection window (the executor
    /// fills it).
    pub pressure: BTreeMap<String, HostPressure>,
}

impl Snapshot {
    /// `graph_id`'s deployment to change (copied first if a working copy shares it).
    pub fn deployment_mut(&mut self, graph_id: &str) -> Option<&mut Deployment> {
        self.deployments.get_mut(graph_id).map(Arc::make_mut)
    }

    /// The deployments `touched` says an update changes, to change: the others stay shared.
    pub fn deployments_where(
        &mut self,
        touched: impl Fn(&Deployment) -> bool,
    ) -> impl Iterator<Item = &mut Deployment> {
        self.deployments
            .values_mut()
            .filter(move |d| touched(d))
            .map(Arc::make_mut)
    }
}

/// A host's contention signals, averaged over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostPressure {
    /// Share of CPU time the hypervisor took (procfs steal).
    pub cpu_steal: f64,
    /// Run-queue wait p99 on every CPU (eBPF probes; `None` where they are off).
    pub run_queue_p99_s: Option<f64>,
    /// The busiest GPU's utilisation (NVML; `None` without GPUs).
    pub gpu_util_max: Option<f64>,
}

/// Why and until when a host is avoided.
#[derive(Debug, Clone, PartialEq)]
pub struct Contended {
    pub until: Duration,
    pub reason: String,
}

/// One host agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub name: String,
    pub health: Health,
    pub last_heartbeat: Duration,
    pub capacity: Capacity,
    /// The replicas the agent said it runs when it last registered, not yet reconciled with the
    /// deployments (adopted, forgotten or retired by the next pass).
    pub reported: Option<Vec<Reported>>,
    /// Whether it keeps a warm pool (its replicas are microVMs).
    pub pools: bool,
    /// The booted, idle VMs it has, as its last heartbeat said.
    pub warm: Vec<WarmShape>,
    /// The pool it was last told to keep.
    pub warm_target: Vec<WarmShape>,
}

/// Booted, idle VMs of one shape (a task's CPU and memory), and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WarmShape {
    pub cpu_millicores: u32,
    pub memory_bytes: u64,
    pub count: u32,
}

impl WarmShape {
    /// Whether a replica needing `r` fits a VM of this shape (one without GPUs or their
    /// memory: a VM holding passed-through GPUs is never kept idle).
    pub fn holds(&self, r: &Resources) -> bool {
        self.cpu_millicores == r.cpu_millicores
            && self.memory_bytes == r.memory_bytes
            && r.gpus == 0
            && r.gpu_memory_bytes == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// No heartbeat within the timeout; must register again to be used.
    Lost,
}

/// What a host offers in total (free is worked out from the replicas it holds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// Over all its GPUs.
    pub gpu_memory_bytes: u64,
    /// Over all its NICs; `None` when no NIC reports a speed (loopback, some virtual NICs):
    /// bandwidth reservations are then not checked on this host.
    pub network_bits_per_sec: Option<u64>,
}

/// A replica an agent reported at registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    pub replica: String,
    pub graph_id: String,
    pub task: String,
    pub version: u32,
    pub epoch: u64,
    pub addr: String,
}

/// One graph's replicas and routing state.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// The version the replicas in `replicas` run.
    pub record: GraphRecord,
    /// The routing-table epoch (only grows).
    pub epoch: u64,
    /// The epoch last pushed to agents (0: none yet).
    pub published: u64,
    /// The ready replicas (`id@host`, sorted) in the last published table.
    pub published_ready: Vec<String>,
    pub replicas: Vec<Replica>,
    /// Replicas of a replaced version: they serve until the new version is ready, then drain.
    pub retiring: Vec<Replica>,
    /// When the retiring replicas' drain ends (set once the new version's table is out).
    pub drain_until: Option<Duration>,
    /// The number the next replica id gets (`<graph>.<task>.r<N>`, never reused).
    pub next_replica: u64,
    /// Provisioning failures and crashes in a row, per task.
    pub failures: BTreeMap<String, Failures>,
    /// The host where each task's last replica failed to start, or crashed before it was
    /// stable: placement avoids it while another host fits (a VM that does not boot there
    /// is placed elsewhere). Cleared when a replica of the task becomes ready.
    pub failed_on: BTreeMap<String, String>,
    /// The last "cannot place" reason per task, so it is recorded once, not every pass.
    pub unplaceable: BTreeMap<String, String>,
    /// Replicas scaled in: out of the routing table, serving what is on its way until then.
    pub draining: Vec<(Replica, Duration)>,
    /// What monitoring measured per task over the scaling window (the executor fills it).
    pub load: BTreeMap<String, TaskLoad>,
    /// When each task was last scaled out and in.
    pub scaled: BTreeMap<String, Scaled>,
    /// What monitoring measured per ready replica over the detection window (the executor
    /// fills it).
    pub health: BTreeMap<String, ReplicaHealth>,
    /// Replicas being replaced (by id): they serve until their task's replacement is routed,
    /// then drain.
    pub replacing: BTreeMap<String, Replacing>,
    /// Each chain's end-to-end latency against the graph's objective over the detection
    /// window (the executor fills it; empty without an objective).
    pub chains: Vec<ChainLoad>,
    /// The last measured lead time of a replica of each (task, host): the planner's.
    pub lead_times: BTreeMap<(String, String), LeadTime>,
    /// Each `[[scaling.signal]]`'s reading, by (task, metric): its total over the task's
    /// replicas (the executor fills it).
    pub signals: BTreeMap<(String, String), SignalReading>,
    /// Each task's latest arrival forecast, for `[scaling.predictive]` (the executor fills it
    /// from its forecast series).
    pub forecasts: BTreeMap<String, TaskForecast>,
}

/// A task's arrival forecast: its coming steps from `from` on, `step` long each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskForecast {
    pub from: Duration,
    pub step: Duration,
    /// Arrivals per second in each coming step: the point forecast and its upper quantile
    /// (q = 0.9).
    pub point_per_s: Vec<f64>,
    pub upper_per_s: Vec<f64>,
    /// The arrivals' burstiness over recent seconds (`planner::dispersion`).
    pub arrival_scv: f64,
    /// The forecaster chosen for the first step (for the reason).
    pub method: &'static str,
}

/// A signal's total over a task's replicas, and how many replicas reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SignalReading {
    pub total: f64,
    pub reporting: usize,
}

/// From placement to ready, and the warm-up within it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeadTime {
    pub ready_after: Duration,
    pub warmup: Duration,
}

/// One replica over the detection window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReplicaHealth {
    pub executions: u64,
    pub errors: u64,
    pub exec_p50_s: f64,
    pub queue_p50_s: f64,
    /// The tail: p99 of execution and of queueing (what a chain's objective percentile is
    /// made of).
    pub exec_p99_s: f64,
    pub queue_p99_s: f64,
    /// The share of CPU-bandwidth periods its cgroup was throttled in (0 when it has no quota
    /// or the host cannot tell).
    pub throttled_share: f64,
}

/// Why a replica is being replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct Replacing {
    pub since: Duration,
    pub trigger: crate::replace::Trigger,
    /// Its replacement, once placed (sizing counts the pair as one replica).
    pub by: Option<String>,
}

/// One chain (source-to-sink path) against the graph's objective.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainLoad {
    pub tasks: Vec<String>,
    /// Invocations that completed at its sink in the window.
    pub count: u64,
    /// The objective's percentile (e.g. 99) and target, and the latency measured there.
    pub percentile: f64,
    pub objective_s: f64,
    pub measured_s: f64,
}

/// One task's load over the scaling window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TaskLoad {
    /// Executions started per second.
    pub arrivals_per_s: f64,
    /// Mean execution time, seconds.
    pub service_s: f64,
    /// Median wait at the replica before executing, seconds. When a task is saturated its
    /// executions per second are capped at what it can serve, so the wait is what shows the
    /// backlog.
    pub queue_s: f64,
    /// The task's calibrated execution p50, seconds: the best its p50 has been over recent
    /// history (0: unknown). A lone replica slower than this by the slow factor is slow.
    pub calibrated_s: f64,
}

/// When a task's replica count last changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scaled {
    pub out_at: Option<Duration>,
    pub in_at: Option<Duration>,
    /// In `forecast-only` mode, the floor last reported (so it is said once per change).
    pub would: Option<u32>,
}

impl Deployment {
    pub fn new(record: GraphRecord) -> Deployment {
        Deployment {
            record,
            epoch: 0,
            published: 0,
            published_ready: Vec::new(),
            replicas: Vec::new(),
            retiring: Vec::new(),
            drain_until: None,
            next_replica: 1,
            failures: BTreeMap::new(),
            failed_on: BTreeMap::new(),
            unplaceable: BTreeMap::new(),
            draining: Vec::new(),
            load: BTreeMap::new(),
            scaled: BTreeMap::new(),
            health: BTreeMap::new(),
            replacing: BTreeMap::new(),
            chains: Vec::new(),
            lead_times: BTreeMap::new(),
            signals: BTreeMap::new(),
            forecasts: BTreeMap::new(),
        }
    }

    /// The ready replicas as `id@host`, sorted: what a routing table holds.
    pub fn ready(&self) -> Vec<String> {
        let mut ready: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| r.is_ready())
            .map(|r| format!("{}@{}", r.id, r.host))
            .collect();
        ready.sort();
        ready
    }

    /// Whether every task of the current version has a ready replica.
    pub fn complete(&self) -> bool {
        self.record
            .graph
            .tasks
            .iter()
            .all(|t| self.replicas.iter().any(|r| r.task == t.id && r.is_ready()))
    }

    pub fn replica(&self, id: &str) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.id == id)
    }

    /// Takes `id` out of the routing table's replicas: it serves what is on its way until
    /// `until`, then is retired.
    pub fn start_draining(&mut self, id: &str, until: Duration) {
        if let Some(i) = self.replicas.iter().position(|r| r.id == id) {
            let r = self.replicas.remove(i);
            self.draining.push((r, until));
        }
    }

    /// `task`'s replicas as sizing counts them: a replica being replaced and its placed
    /// replacement are one.
    pub fn sized_count(&self, task: &str) -> usize {
        let all = self.replicas.iter().filter(|r| r.task == task).count();
        let pairs = self
            .replicas
            .iter()
            .filter(|r| r.task == task && self.replacement(&r.id).is_some())
            .count();
        all - pairs
    }

    /// The replacement placed for `bad`, if it still exists (one that failed to provision is
    /// gone, and `bad` waits for another).
    pub fn replacement(&self, bad: &str) -> Option<&Replica> {
        self.replacing
            .get(bad)
            .and_then(|x| x.by.as_deref())
            .and_then(|by| self.replica(by))
    }
}

/// One replica of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub id: String,
    pub task: String,
    pub host: String,
    /// Its data-plane address (empty while provisioning).
    pub addr: String,
    pub state: ReplicaState,
    /// What it holds on its host (its task's resources when it was placed).
    pub resources: Resources,
    /// When it was placed (or adopted): scale-in spares it for a cooldown after.
    pub placed_at: Duration,
}

impl Replica {
    pub fn is_ready(&self) -> bool {
        matches!(self.state, ReplicaState::Ready { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    Provisioning { since: Duration },
    Ready { since: Duration },
}

/// Failures in a row of one task's replicas (provisioning failed, or a ready replica crashed
/// before it had run for `Backoff::stable_after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    pub count: u32,
    pub last_at: Duration,
}

/// Parses the number of a replica id (`<graph>.<task>.r<N>`).
pub fn replica_number(id: &str) -> Option<u64> {
    id.rsplit_once(".r").and_then(|(_, n)| n.parse().ok())
}
