//! The monitoring service's store: per-second windows of mergeable sketches per task, rolled up
//! over any window on query. Pure data: fed spans, asked for statistics; no I/O.

pub mod cold;

use prescient_schemas::sketch::Sketch;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;

/// Seconds of per-second windows kept (roll-ups of 1 s, 10 s and 1 min are merges of these).
pub const RETENTION_S: u64 = 600;

/// How far ahead of the control node's clock an agent's second may be (clock skew).
pub const MAX_SKEW_S: u64 = 3600;

/// Whether a second an agent sent can be a real one now: not further ahead than the skew
/// allowed, not older than the windows kept. Others are refused (and counted), so a broken
/// clock or a hostile agent cannot push every real window out.
pub fn plausible_second(second: u64, now_s: u64) -> bool {
    second <= now_s.saturating_add(MAX_SKEW_S) && second.saturating_add(RETENTION_S) >= now_s
}

/// The entries of a per-second series (sorted by second) from `from` to `to`, both included:
/// found by bisection, so a short window over a long retention reads only its own seconds.
pub fn seconds<T>(series: &VecDeque<(u64, T)>, from: u64, to: u64) -> impl Iterator<Item = &T> {
    let lo = series.partition_point(|(t, _)| *t < from);
    let hi = series.partition_point(|(t, _)| *t <= to).max(lo);
    series.range(lo..hi).map(|(_, w)| w)
}

/// The entries of a map keyed by (graph, ...) that belong to `graph_id`, in key order: a
/// range, so a cluster of many graphs costs each graph's query its own series only.
pub fn of_graph<'a, K: GraphKey, V>(
    map: &'a BTreeMap<K, V>,
    graph_id: &'a str,
) -> impl Iterator<Item = (&'a K, &'a V)> + 'a {
    map.range((Bound::Included(K::first_of(graph_id)), Bound::Unbounded))
        .take_while(move |(k, _)| k.graph() == graph_id)
}

/// A key whose first part is a graph id.
pub trait GraphKey: Ord {
    fn graph(&self) -> &str;
    /// The smallest key of `graph_id`.
    fn first_of(graph_id: &str) -> Self;
}

impl GraphKey for (String, String) {
    fn graph(&self) -> &str {
        &self.0
    }
    fn first_of(graph_id: &str) -> Self {
        (graph_id.to_string(), String::new())
    }
}

impl GraphKey for (String, String, String) {
    fn graph(&self) -> &str {
        &self.0
    }
    fn first_of(graph_id: &str) -> Self {
        (graph_id.to_string(), String::new(), String::new())
    }
}

/// One task execution as measured by its worker.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanView {
    pub graph_id: String,
    pub task: String,
    pub replica: String,
    pub start_unix_ns: u64,
    pub queue_ns: u64,
    pub exec_ns: u64,
    pub transfer_ns: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub ok: bool,
}

/// A second of one replica's executions.
#[derive(Debug, Clone, Default)]
pub struct WindowView {
    pub graph_id: String,
    pub task: String,
    /// The replica that ran them (empty from older agents).
    pub replica: String,
    pub second: u64,
    pub errors: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub exec: Sketch,
    pub queue: Sketch,
    pub transfer: Sketch,
    /// Sink tasks: admission at the ingress to the end of the execution.
    pub sink: Sketch,
}

#[derive(Debug, Clone, Default)]
struct Second {
    exec: Sketch,
    queue: Sketch,
    transfer: Sketch,
    sink: Sketch,
    errors: u64,
    input_bytes: u64,
    output_bytes: u64,
}

/// Statistics of one task over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStats {
    pub task: String,
    pub count: u64,
    pub per_second: f64,
    pub errors: u64,
    pub exec_p50_ns: u64,
    pub exec_p90_ns: u64,
    pub exec_p99_ns: u64,
    pub exec_mean_ns: u64,
    pub queue_p50_ns: u64,
    pub queue_p99_ns: u64,
    pub transfer_p50_ns: u64,
    pub transfer_p99_ns: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
}

/// One host over a window of its per-second samples.
#[derive(Debug, Clone, PartialEq)]
pub struct HostWindow {
    pub samples: usize,
    pub cpu_util: f32,
    pub cpu_steal: f32,
    /// The latest sample's.
    pub memory_used_bytes: u64,
    pub run_delay_ns_per_s: u64,
    /// Every run-queue wait in the window, where the host runs the eBPF probes.
    pub run_queue: Option<Sketch>,
    /// The busiest GPU's utilisation, averaged (`None` without GPUs).
    pub gpu_util_max: Option<f32>,
}

/// What [`Monitor::chain_stats`] needs to know of a graph.
#[derive(Debug, Clone, Default)]
pub struct ChainsOf {
    /// Maximal paths, as task ids.
    pub chains: Vec<Vec<String>>,
    /// Tasks with several input ports: their queueing is the wait for the other branches,
    /// not a cost of the path, and stays out of path sums.
    pub joins: std::collections::HashSet<String>,
    /// Percentile and target in ns.
    pub objective: Option<(f64, u64)>,
}

impl ChainsOf {
    /// A graph version's chains, joins and objective.
    pub fn of(record: &prescient_schemas::GraphRecord) -> ChainsOf {
        let chains = prescient_schemas::ValidatedGraph::new(record.graph.clone())
            .map(|v| {
                v.chains()
                    .iter()
                    .map(|c| c.iter().map(|t| t.to_string()).collect())
                    .collect()
            })
            .unwrap_or_default();
        ChainsOf {
            chains,
            joins: record
                .graph
                .tasks
                .iter()
                .filter(|t| t.inputs.len() > 1)
                .map(|t| t.id.clone())
                .collect(),
            objective: record
                .graph
                .objective
                .as_ref()
                .map(|o| (o.percentile, o.target_ns)),
        }
    }
}

/// Each graph's [`ChainsOf`] for its latest version, worked out once per version (it
/// validates the graph), not on every pass.
#[derive(Debug, Default)]
pub struct ChainsCache(HashMap<String, (u32, std::rc::Rc<ChainsOf>)>);

impl ChainsCache {
    pub fn get(&mut self, record: &prescient_schemas::GraphRecord) -> std::rc::Rc<ChainsOf> {
        if let Some((v, c)) = self.0.get(&record.id) {
            if *v == record.version {
                return c.clone();
            }
        }
        let c = std::rc::Rc::new(ChainsOf::of(record));
        self.0
            .insert(record.id.clone(), (record.version, c.clone()));
        c
    }
}

/// One chain (maximal path) over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainStats {
    pub tasks: Vec<String>,
    /// End to end at the chain's sink: admission at the ingress to the sink's completion.
    pub count: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    /// Transfer + queue + execution p50 of every task on the path: which of the chains that
    /// share a sink is the slow one.
    pub path_p50_sum_ns: u64,
    /// The graph's objective (percentile, target) and the latency measured at that percentile.
    pub objective: Option<(f64, u64, u64)>,
}

/// Totals since the control node started (Prometheus counters).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub executions: u64,
    pub errors: u64,
    pub exec_ns_sum: f64,
}

/// One host's sample for one interval (the wire mapping is `prescient_schemas::host_sample`).
pub type HostPoint = prescient_schemas::host_sample::HostSample;

/// One replica's VM in the last interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmPoint {
    pub host: String,
    pub graph_id: String,
    pub task: String,
    pub cpu_cores: f32,
    pub memory_bytes: u64,
    pub cpu_limit_cores: f32,
    pub memory_limit_bytes: u64,
    /// GPU memory its processes hold (NVML).
    pub gpu_memory_bytes: u64,
    /// Share of its cgroup's CPU-bandwidth periods it was throttled in.
    pub throttled_share: f32,
    /// What the eBPF probes saw of the VM, where its host runs them.
    pub probes: Option<VmProbePoint>,
}

/// One VM's eBPF measurements over one interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmProbePoint {
    pub run_queue: Sketch,
    pub tcp_sent_bytes: u64,
    pub tcp_received_bytes: u64,
}

/// One edge (identified by the input port it feeds) over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeStatsView {
    pub task: String,
    pub port: String,
    pub count: u64,
    pub bytes: u64,
    pub transfer_p50_ns: u64,
    pub transfer_p99_ns: u64,
}

#[derive(Debug, Clone, Default)]
struct EdgeSecond {
    transfer: Sketch,
    bytes: u64,
}

#[derive(Debug, Default)]
pub struct Monitor {
    /// Per-second windows per edge, keyed by (graph, task, input port).
    edges: BTreeMap<(String, String, String), VecDeque<(u64, EdgeSecond)>>,
    /// Latest sample per replica.
    pub vms: BTreeMap<String, VmPoint>,
    /// Recent samples per host, newest last (bounded by `RETENTION_S`).
    pub hosts: BTreeMap<String, VecDeque<HostPoint>>,
    /// Network bytes per host since the control node started (rx, tx).
    pub host_net_totals: BTreeMap<String, (u64, u64)>,
    pub totals: BTreeMap<(String, String), Totals>,
    tasks: BTreeMap<(String, String), VecDeque<(u64, Second)>>,
    /// Spans workers dropped under back-pressure, per host.
    pub dropped: BTreeMap<String, u64>,
    /// Windows refused for an implausible second, per host.
    pub refused: BTreeMap<String, u64>,
    /// The same windows per replica, for the replacement triggers.
    pub replicas: crate::replica_windows::ReplicaWindows,
    /// Recent inputs per task, for new replicas' warm-up.
    pub samples: crate::samples::InputSamples,
    /// The latest gauges per replica, for scaling signals.
    pub gauges: crate::gauges::Gauges,
    /// Executions that waited for capacity still on its way.
    pub cold: cold::Cold,
}

impl Monitor {
    fn slot(&mut self, graph_id: &str, task: &str, second: u64) -> &mut Second {
        let key = (graph_id.to_string(), task.to_string());
        let series = self.tasks.entry(key).or_default();
        while series
            .front()
            .is_some_and(|(t, _)| t.saturating_add(RETENTION_S) < second)
        {
            series.pop_front();
        }
        // Windows arrive nearly in order; look back a few seconds for a late one.
        let found = series
            .iter()
            .rev()
            .take(8)
            .position(|(t, _)| *t == second)
            .map(|back| series.len() - 1 - back);
        let at = match found {
            Some(i) => i,
            None => {
                let at = series.partition_point(|(t, _)| *t < second);
                series.insert(at, (second, Second::default()));
                at
            }
        };
        &mut series[at].1
    }

    fn count(&mut self, graph_id: &str, task: &str, n: u64, errors: u64, exec_ns_sum: f64) {
        let t = self
            .totals
            .entry((graph_id.to_string(), task.to_string()))
            .or_default();
        t.executions += n;
        t.errors += errors;
        t.exec_ns_sum += exec_ns_sum;
    }

    /// Adds a second of requests that arrived on one input port of one replica.
    pub fn record_edge(
        &mut self,
        graph_id: &str,
        task: &str,
        port: &str,
        second: u64,
        bytes: u64,
        transfer: &Sketch,
    ) {
        let series = self
            .edges
            .entry((graph_id.to_string(), task.to_string(), port.to_string()))
            .or_default();
        while series
            .front()
            .is_some_and(|(t, _)| t.saturating_add(RETENTION_S) < second)
        {
            series.pop_front();
        }
        let at = match series.iter().rposition(|(t, _)| *t == second) {
            Some(i) => i,
            None => {
                let at = series.partition_point(|(t, _)| *t < second);
                series.insert(at, (second, EdgeSecond::default()));
                at
            }
        };
        let slot = &mut series[at].1;
        slot.transfer.merge(transfer);
        slot.bytes += bytes;
    }

    /// Per-edge statistics of `graph_id` over the `window_s` seconds up to `now_s`.
    pub fn edge_stats(&self, graph_id: &str, window_s: u64, now_s: u64) -> Vec<EdgeStatsView> {
        let from = (now_s + 1).saturating_sub(window_s.max(1));
        let mut out: Vec<EdgeStatsView> = of_graph(&self.edges, graph_id)
            .map(|((_, task, port), series)| {
                let mut m = EdgeSecond::default();
                for w in seconds(series, from, now_s) {
                    m.transfer.merge(&w.transfer);
                    m.bytes += w.bytes;
                }
                EdgeStatsView {
                    task: task.clone(),
                    port: port.clone(),
                    count: m.transfer.count(),
                    bytes: m.bytes,
                    transfer_p50_ns: m.transfer.quantile(0.5).round() as u64,
                    transfer_p99_ns: m.transfer.quantile(0.99).round() as u64,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.task, &a.port).cmp(&(&b.task, &b.port)));
        out
    }

    pub fn record_host(&mut self, host: &str, p: HostPoint) {
        let totals = self.host_net_totals.entry(host.to_string()).or_default();
        totals.0 += p.net_rx_bytes;
        totals.1 += p.net_tx_bytes;
        let series = self.hosts.entry(host.to_string()).or_default();
        series.push_back(p);
        while series.len() > RETENTION_S as usize {
            series.pop_front();
        }
    }

    /// Adds one execution.
    pub fn record(&mut self, s: &SpanView) {
        self.count(&s.graph_id, &s.task, 1, u64::from(!s.ok), s.exec_ns as f64);
        let slot = self.slot(&s.graph_id, &s.task, s.start_unix_ns / 1_000_000_000);
        slot.exec.record(s.exec_ns as f64);
        slot.queue.record(s.queue_ns as f64);
        slot.transfer.record(s.transfer_ns as f64);
        slot.input_bytes += s.input_bytes;
        slot.output_bytes += s.output_bytes;
        if !s.ok {
            slot.errors += 1;
        }
    }

    /// Adds a second of one replica's executions, aggregated where they ran.
    pub fn record_window(&mut self, w: &WindowView) {
        self.count(
            &w.graph_id,
            &w.task,
            w.exec.count(),
            w.errors,
            w.exec.mean() * w.exec.count() as f64,
        );
        let slot = self.slot(&w.graph_id, &w.task, w.second);
        slot.exec.merge(&w.exec);
        slot.queue.merge(&w.queue);
        slot.transfer.merge(&w.transfer);
        slot.sink.merge(&w.sink);
        slot.input_bytes += w.input_bytes;
        slot.output_bytes += w.output_bytes;
        slot.errors += w.errors;
        self.cold.record(&w.graph_id, &w.task, w.second, &w.queue);
        self.replicas.record(
            &w.graph_id,
            &w.task,
            &w.replica,
            w.second,
            &w.exec,
            &w.queue,
            w.errors,
        );
    }

    /// Per-minute roll-ups of every series touched at or after `since_s` (task "" is end to end).
    pub fn minute_rollups(
        &self,
        since_s: u64,
    ) -> Vec<(String, String, crate::store::HistoryPoint)> {
        self.rollups(since_s, 60)
    }

    /// Roll-ups over `step_s` seconds (each point's `at` in steps since the epoch: unix minutes
    /// for 60, seconds for 1) of every series touched at or after `since_s`.
    pub fn rollups(
        &self,
        since_s: u64,
        step_s: u64,
    ) -> Vec<(String, String, crate::store::HistoryPoint)> {
        let step_s = step_s.max(1);
        let mut out = Vec::new();
        for ((g, task), series) in &self.tasks {
            let mut minutes: BTreeMap<u64, Second> = BTreeMap::new();
            let first_minute = since_s / step_s;
            for (t, w) in series.iter().filter(|(t, _)| t / step_s >= first_minute) {
                let m = minutes.entry(t / step_s).or_default();
                m.exec.merge(&w.exec);
                m.queue.merge(&w.queue);
                m.sink.merge(&w.sink);
                m.errors += w.errors;
            }
            let ns = |s: &Sketch, q: f64| {
                if s.count() == 0 {
                    0
                } else {
                    s.quantile(q).round() as u64
                }
            };
            for (minute, m) in minutes {
                out.push((
                    g.clone(),
                    task.clone(),
                    crate::store::HistoryPoint {
                        at: minute,
                        count: m.exec.count(),
                        errors: m.errors,
                        exec_p50_ns: ns(&m.exec, 0.5),
                        exec_p99_ns: ns(&m.exec, 0.99),
                        exec_mean_ns: m.exec.mean().round() as u64,
                        queue_p50_ns: ns(&m.queue, 0.5),
                        queue_p99_ns: ns(&m.queue, 0.99),
                        sink_count: m.sink.count(),
                        sink_p50_ns: ns(&m.sink, 0.5),
                        sink_p99_ns: ns(&m.sink, 0.99),
                    },
                ));
            }
        }
        out
    }

    /// `task`'s executions in each second from `from_s` to `to_s` inclusive (0 where no window
    /// arrived: nothing ran), for its arrival forecast. At most `RETENTION_S` seconds back
    /// from `to_s` are kept: callers start no earlier than that.
    pub fn executions_per_second(
        &self,
        graph_id: &str,
        task: &str,
        from_s: u64,
        to_s: u64,
    ) -> Vec<u64> {
        let from_s = from_s.max(to_s.saturating_sub(RETENTION_S));
        let mut out = vec![0; (to_s + 1).saturating_sub(from_s) as usize];
        if let Some(series) = self.tasks.get(&(graph_id.to_string(), task.to_string())) {
            let start = series.partition_point(|(t, _)| *t < from_s);
            for (t, w) in series.range(start..).take_while(|(t, _)| *t <= to_s) {
                out[(t - from_s) as usize] = w.exec.count();
            }
        }
        out
    }

    /// Per-task statistics of `graph_id` over the `window_s` seconds up to and including `now_s`.
    pub fn task_stats(&self, graph_id: &str, window_s: u64, now_s: u64) -> Vec<TaskStats> {
        let from = (now_s + 1).saturating_sub(window_s.max(1));
        let mut out: Vec<TaskStats> = of_graph(&self.tasks, graph_id)
            .filter(|((_, t), _)| !t.is_empty())
            .map(|((_, task), series)| {
                let mut m = Second::default();
                for w in seconds(series, from, now_s) {
                    m.exec.merge(&w.exec);
                    m.queue.merge(&w.queue);
                    m.transfer.merge(&w.transfer);
                    m.errors += w.errors;
                    m.input_bytes += w.input_bytes;
                    m.output_bytes += w.output_bytes;
                }
                // Workers record transfer times once, per edge (older ones also per task).
                if m.transfer.count() == 0 {
                    for ((_, t, _), series) in of_graph(&self.edges, graph_id) {
                        if t == task {
                            for w in seconds(series, from, now_s) {
                                m.transfer.merge(&w.transfer);
                            }
                        }
                    }
                }
                let q = |s: &Sketch, p: f64| s.quantile(p).round() as u64;
                TaskStats {
                    task: task.clone(),
                    count: m.exec.count(),
                    per_second: m.exec.count() as f64 / window_s.max(1) as f64,
                    errors: m.errors,
                    exec_p50_ns: q(&m.exec, 0.5),
                    exec_p90_ns: q(&m.exec, 0.9),
                    exec_p99_ns: q(&m.exec, 0.99),
                    exec_mean_ns: m.exec.mean().round() as u64,
                    queue_p50_ns: q(&m.queue, 0.5),
                    queue_p99_ns: q(&m.queue, 0.99),
                    transfer_p50_ns: q(&m.transfer, 0.5),
                    transfer_p99_ns: q(&m.transfer, 0.99),
                    input_bytes: m.input_bytes,
                    output_bytes: m.output_bytes,
                }
            })
            .collect();
        out.sort_by(|a, b| a.task.cmp(&b.task));
        out
    }

    /// `host`'s samples of the `window_s` seconds up to its latest, averaged (run-queue waits
    /// merged): the 10 s or 1 min view of a host, steadier than its latest second. The window
    /// is on the host's own clock, so a skewed clock does not empty it.
    pub fn host_window(&self, host: &str, window_s: u64) -> Option<HostWindow> {
        let series = self.hosts.get(host)?;
        let to = series.back()?.at_unix_ms;
        let from = to.saturating_sub(window_s.max(1) * 1000);
        let points: Vec<&HostPoint> = series.iter().filter(|p| p.at_unix_ms > from).collect();
        let last = points.last()?;
        let n = points.len();
        let mean = |f: fn(&HostPoint) -> f64| points.iter().map(|p| f(p)).sum::<f64>() / n as f64;
        let mut run_queue: Option<Sketch> = None;
        for p in &points {
            if let Some(rq) = &p.run_queue {
                run_queue.get_or_insert_with(Sketch::default).merge(rq);
            }
        }
        Some(HostWindow {
            samples: n,
            cpu_util: mean(|p| f64::from(p.cpu_util)) as f32,
            cpu_steal: mean(|p| f64::from(p.cpu_steal)) as f32,
            memory_used_bytes: last.memory_used_bytes,
            run_delay_ns_per_s: mean(|p| p.run_delay_ns as f64) as u64,
            run_queue,
            gpu_util_max: points
                .iter()
                .any(|p| !p.gpu_util.is_empty())
                .then(|| mean(|p| p.gpu_util.iter().copied().fold(0.0f32, f32::max).into()) as f32),
        })
    }

    /// Every chain of `graph_id` over the same window as [`Monitor::task_stats`].
    pub fn chain_stats(
        &self,
        graph_id: &str,
        of: &ChainsOf,
        window_s: u64,
        now_s: u64,
    ) -> Vec<ChainStats> {
        let (chains, objective) = (&of.chains, of.objective);
        let from = (now_s + 1).saturating_sub(window_s.max(1));
        let tasks: HashMap<String, TaskStats> = self
            .task_stats(graph_id, window_s, now_s)
            .into_iter()
            .map(|t| (t.task.clone(), t))
            .collect();
        chains
            .iter()
            .map(|chain| {
                let mut sink = Sketch::default();
                if let Some(series) = chain
                    .last()
                    .and_then(|t| self.tasks.get(&(graph_id.to_string(), t.clone())))
                {
                    for w in seconds(series, from, now_s) {
                        sink.merge(&w.sink);
                    }
                }
                let q = |p: f64| sink.quantile(p).round() as u64;
                ChainStats {
                    tasks: chain.clone(),
                    count: sink.count(),
                    p50_ns: q(0.5),
                    p90_ns: q(0.9),
                    p99_ns: q(0.99),
                    path_p50_sum_ns: chain
                        .iter()
                        .filter_map(|t| tasks.get(t))
                        .map(|t| {
                            let queue = if of.joins.contains(&t.task) {
                                0
                            } else {
                                t.queue_p50_ns
                            };
                            t.transfer_p50_ns + queue + t.exec_p50_ns
                        })
                        .sum(),
                    objective: objective.map(|(p, target)| (p, target, q(p / 100.0))),
                }
            })
            .collect()
    }

    /// End-to-end invocation latency of `graph_id` as its ingresses measured it (the "task" of
    /// the result is empty), over the same window as [`Monitor::task_stats`].
    pub fn graph_stats(&self, graph_id: &str, window_s: u64, now_s: u64) -> Option<TaskStats> {
        let mut one = Monitor::default();
        let series = self.tasks.get(&(graph_id.to_string(), String::new()))?;
        one.tasks
            .insert((graph_id.to_string(), "e2e".into()), series.clone());
        let mut s = one.task_stats(graph_id, window_s, now_s).pop()?;
        s.task = String::new();
        Some(s)
    }
}

#[cfg(test)]
mod tests;
