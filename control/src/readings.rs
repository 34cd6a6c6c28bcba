//! What the executor reads from the monitor into the snapshot each pass, for the graphs with a
//! `[scaling]` policy: every task's load and calibrated execution time, every ready replica's
//! health, every chain against the objective, the scaling signals, and every host's pressure.

use crate::monitor::Monitor;
use prescient_policy::snapshot::{
    ChainLoad, HostPressure, ReplicaHealth, SignalReading, Snapshot, TaskLoad,
};
use prescient_schemas::SignalSource;

/// How many seconds behind the clock telemetry windows are complete.
const TELEMETRY_LAG_S: u64 = 2;

/// A task's calibrated execution time is its best p50 over buckets this long...
const CALIBRATION_BUCKET_S: u64 = 5;
/// ...in this much recent history.
const CALIBRATION_SPAN_S: u64 = 300;

/// Puts what monitoring measured into each scaled graph's deployment: every task's arrival
/// rate, service time, queueing and calibrated execution time over the scaling window;
/// every ready replica's health and every chain's latency against the objective over the
/// detection window.
pub fn read(
    monitor: &Monitor,
    chains_of: &mut crate::monitor::ChainsCache,
    state: &mut Snapshot,
    now_ms: u64,
) {
    // Windows reach the control node up to two seconds late (a worker hands its second to
    // its agent at the next 1 s flush, the agent forwards once a second): seconds that
    // recent are left out, or the rate would read low.
    let now_s = (now_ms / 1000).saturating_sub(TELEMETRY_LAG_S);
    let windows: Vec<(String, u64, u64)> = state
        .wanted
        .iter()
        .filter_map(|(id, r)| {
            let s = r.graph.scaling.as_ref()?;
            let secs = |ns: u64| (ns / 1_000_000_000).clamp(1, 600);
            Some((id.clone(), secs(s.window_ns), secs(s.detect_window_ns)))
        })
        .collect();
    // Host contention over the shortest detection window of any scaled graph.
    if let Some(detect_s) = windows.iter().map(|(_, _, d)| *d).min() {
        let hosts: Vec<String> = state.hosts.keys().cloned().collect();
        state.pressure = hosts
            .into_iter()
            .filter_map(|h| {
                let w = monitor.host_window(&h, detect_s)?;
                let pressure = HostPressure {
                    cpu_steal: f64::from(w.cpu_steal),
                    run_queue_p99_s: w
                        .run_queue
                        .as_ref()
                        .filter(|s| s.count() > 0)
                        .map(|s| s.quantile(0.99) / 1e9),
                    gpu_util_max: w.gpu_util_max.map(f64::from),
                };
                Some((h, pressure))
            })
            .collect();
    }
    for (id, window_s, detect_s) in windows {
        let Some(d) = state.deployment_mut(&id) else {
            continue;
        };
        // A join's wait is for its other inputs, not a backlog: it stays out.
        let joins: Vec<String> = d
            .record
            .graph
            .tasks
            .iter()
            .filter(|t| t.inputs.len() > 1)
            .map(|t| t.id.clone())
            .collect();
        let calibrated = monitor.replicas.calibrated(
            &id,
            CALIBRATION_BUCKET_S,
            CALIBRATION_SPAN_S,
            prescient_policy::replace::MIN_EXECUTIONS,
            now_s,
        );
        d.load = monitor
            .task_stats(&id, window_s, now_s)
            .into_iter()
            .map(|t| {
                let queued = !joins.contains(&t.task);
                let load = TaskLoad {
                    arrivals_per_s: t.per_second,
                    service_s: t.exec_mean_ns as f64 / 1e9,
                    queue_s: if queued {
                        t.queue_p50_ns as f64 / 1e9
                    } else {
                        0.0
                    },
                    calibrated_s: calibrated.get(&t.task).map_or(0.0, |ns| *ns as f64 / 1e9),
                };
                (t.task, load)
            })
            .collect();
        // A task with no executions in the window has no load, not an unknown one.
        for t in &d.record.graph.tasks {
            d.load.entry(t.id.clone()).or_default();
        }
        d.health = monitor
            .replicas
            .stats(&id, detect_s, now_s)
            .into_iter()
            .filter(|r| d.replicas.iter().any(|x| x.id == r.replica))
            .map(|r| {
                let queued = !joins.contains(&r.task);
                let health = ReplicaHealth {
                    executions: r.executions,
                    errors: r.errors,
                    exec_p50_s: r.exec_p50_ns as f64 / 1e9,
                    queue_p50_s: if queued {
                        r.queue_p50_ns as f64 / 1e9
                    } else {
                        0.0
                    },
                    exec_p99_s: r.exec_p99_ns as f64 / 1e9,
                    queue_p99_s: if queued {
                        r.queue_p99_ns as f64 / 1e9
                    } else {
                        0.0
                    },
                    throttled_share: monitor
                        .vms
                        .get(&r.replica)
                        .map_or(0.0, |v| f64::from(v.throttled_share)),
                };
                (r.replica, health)
            })
            .collect();
        // A replica being replaced queues because it is bad, not because the task needs
        // more: sizing reads the queueing of the others (none, for a lone one).
        for t in &d.record.graph.tasks {
            let bad = |id: &str| d.replacing.contains_key(id);
            if !d.replicas.iter().any(|r| r.task == t.id && bad(&r.id)) {
                continue;
            }
            let others = d
                .replicas
                .iter()
                .filter(|r| r.task == t.id && !bad(&r.id))
                .filter_map(|r| d.health.get(&r.id))
                .map(|h| h.queue_p50_s)
                .fold(0.0, f64::max);
            if let Some(l) = d.load.get_mut(&t.id) {
                l.queue_s = others;
            }
        }
        // Other signals, summed over each task's replicas.
        let signals = d
            .record
            .graph
            .scaling
            .as_ref()
            .map(|p| p.signals.clone())
            .unwrap_or_default();
        d.signals.clear();
        let fresh_s = now_ms / 1000;
        for sig in &signals {
            let ids: Vec<&str> = d
                .replicas
                .iter()
                .filter(|r| r.task == sig.task && r.is_ready())
                .map(|r| r.id.as_str())
                .collect();
            let (total, reporting) = match sig.source() {
                Some(SignalSource::InFlight) => {
                    monitor.gauges.total(&id, &ids, "in_flight", fresh_s)
                }
                Some(SignalSource::Custom(name)) => monitor.gauges.total(&id, &ids, name, fresh_s),
                Some(SignalSource::GpuMemory) => ids
                    .iter()
                    .filter_map(|r| monitor.vms.get(*r))
                    .fold((0.0, 0), |(t, n), v| (t + v.gpu_memory_bytes as f64, n + 1)),
                None => continue,
            };
            d.signals.insert(
                (sig.task.clone(), sig.metric.clone()),
                SignalReading { total, reporting },
            );
        }
        let chains = chains_of.get(&d.record);
        d.chains = monitor
            .chain_stats(&id, &chains, detect_s, now_s)
            .into_iter()
            .filter_map(|c| {
                let (percentile, target_ns, measured_ns) = c.objective?;
                Some(ChainLoad {
                    tasks: c.tasks,
                    count: c.count,
                    percentile,
                    objective_s: target_ns as f64 / 1e9,
                    measured_s: measured_ns as f64 / 1e9,
                })
            })
            .collect();
    }
}

/// Tells the monitor which tasks have a replica on its way (placed, not yet routed) and the
/// queue wait over which their executions are cold: `[scaling.predictive] max_wait`, else the
/// task's measured service time, else its estimate.
pub fn note_provisioning(monitor: &mut Monitor, state: &Snapshot, now_ms: u64) {
    let now_s = now_ms / 1000;
    for (id, d) in &state.deployments {
        let max_wait = d
            .record
            .graph
            .scaling
            .as_ref()
            .and_then(|s| s.predictive.max_wait_ns);
        for t in &d.record.graph.tasks {
            let provisioning = d.replicas.iter().any(|r| r.task == t.id && !r.is_ready());
            let measured = d.load.get(&t.id).and_then(|l| {
                [l.service_s, l.calibrated_s]
                    .into_iter()
                    .find(|s| *s > 0.0 && s.is_finite())
            });
            let budget_ns = max_wait.unwrap_or_else(|| {
                measured.map_or(t.estimated_execution_time_ns, |s| (s * 1e9) as u64)
            });
            monitor.cold.note(id, &t.id, now_s, provisioning, budget_ns);
        }
    }
}
