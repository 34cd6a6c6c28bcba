//! What the control node exposes on `/metrics` (Prometheus text format).

use crate::cluster::Cluster;
use prescient_policy::snapshot::Health;
use prescient_schemas::prom::Exposition;

/// Quantiles are over this many recent seconds; counters are since start.
const SUMMARY_WINDOW_S: u64 = 60;

pub fn render(cluster: &Cluster, now_s: u64) -> String {
    let mut e = Exposition::default();
    let state = cluster.state.borrow();
    e.family(
        "prescient_agents",
        "gauge",
        "Host agents known to the control node, by state.",
    );
    for label in ["ready", "lost"] {
        let n = state
            .hosts
            .values()
            .filter(|h| match h.health {
                Health::Ready => label == "ready",
                Health::Lost => label == "lost",
            })
            .count();
        e.sample("prescient_agents", &[("state", label)], n as f64);
    }
    let deployments = &state.deployments;
    e.family(
        "prescient_events_total",
        "counter",
        "Decisions and state changes the control node recorded since it started, by kind.",
    );
    for (kind, n) in cluster.event_counts() {
        e.sample("prescient_events_total", &[("kind", &kind)], n as f64);
    }
    e.family(
        "prescient_graphs_deployed",
        "gauge",
        "Graphs with a deployment.",
    );
    e.sample("prescient_graphs_deployed", &[], deployments.len() as f64);
    e.family(
        "prescient_routing_epoch",
        "gauge",
        "Routing-table epoch per graph.",
    );
    for (id, d) in deployments.iter() {
        e.sample("prescient_routing_epoch", &[("graph", id)], d.epoch as f64);
    }
    e.family(
        "prescient_replicas",
        "gauge",
        "Replicas per graph, task and state.",
    );
    for (id, d) in deployments.iter() {
        for t in &d.record.graph.tasks {
            for (label, want) in [("ready", true), ("provisioning", false)] {
                let n = d
                    .replicas
                    .iter()
                    .filter(|r| r.task == t.id && r.is_ready() == want)
                    .count();
                e.sample(
                    "prescient_replicas",
                    &[("graph", id), ("task", &t.id), ("state", label)],
                    n as f64,
                );
            }
        }
    }
    let monitor = cluster.monitor.borrow();
    e.family(
        "prescient_task_executions_total",
        "counter",
        "Task executions reported by workers.",
    );
    for ((g, t), tot) in monitor.totals.iter().filter(|((_, t), _)| !t.is_empty()) {
        e.sample(
            "prescient_task_executions_total",
            &[("graph", g), ("task", t)],
            tot.executions as f64,
        );
    }
    e.family(
        "prescient_cold_executions_total",
        "counter",
        "Executions that queued past their task's wait budget while it had a replica on its way.",
    );
    for (g, c) in &monitor.cold.totals {
        e.sample(
            "prescient_cold_executions_total",
            &[("graph", g)],
            c.executions as f64,
        );
    }
    e.family(
        "prescient_cold_wait_seconds_total",
        "counter",
        "The queue waits of the cold executions, added up.",
    );
    for (g, c) in &monitor.cold.totals {
        e.sample(
            "prescient_cold_wait_seconds_total",
            &[("graph", g)],
            c.wait_sum_ns / 1e9,
        );
    }
    e.family(
        "prescient_task_errors_total",
        "counter",
        "Task executions that failed.",
    );
    for ((g, t), tot) in monitor.totals.iter().filter(|((_, t), _)| !t.is_empty()) {
        e.sample(
            "prescient_task_errors_total",
            &[("graph", g), ("task", t)],
            tot.errors as f64,
        );
    }
    e.family(
        "prescient_task_execution_seconds",
        "summary",
        "Task execution time: quantiles over the last 60 s, sum and count since start.",
    );
    let graphs: std::collections::BTreeSet<&String> =
        monitor.totals.keys().map(|(g, _)| g).collect();
    for g in graphs {
        for s in monitor.task_stats(g, SUMMARY_WINDOW_S, now_s) {
            for (q, v) in [
                ("0.5", s.exec_p50_ns),
                ("0.9", s.exec_p90_ns),
                ("0.99", s.exec_p99_ns),
            ] {
                e.sample(
                    "prescient_task_execution_seconds",
                    &[("graph", g), ("task", &s.task), ("quantile", q)],
                    v as f64 / 1e9,
                );
            }
            let tot = monitor
                .totals
                .get(&(g.clone(), s.task.clone()))
                .cloned()
                .unwrap_or_default();
            e.sample(
                "prescient_task_execution_seconds_sum",
                &[("graph", g), ("task", &s.task)],
                tot.exec_ns_sum / 1e9,
            );
            e.sample(
                "prescient_task_execution_seconds_count",
                &[("graph", g), ("task", &s.task)],
                tot.executions as f64,
            );
        }
    }
    e.family(
        "prescient_chain_latency_seconds",
        "summary",
        "End-to-end latency per chain (maximal path), from admission at an ingress to the end of the chain's sink task: quantiles over the last 60 s.",
    );
    for g in deployments.keys() {
        let Some(chains) = cluster.chains(g) else {
            continue;
        };
        for c in monitor.chain_stats(g, &chains, SUMMARY_WINDOW_S, now_s) {
            if c.count == 0 {
                continue;
            }
            let chain = c.tasks.join(">");
            for (q, v) in [("0.5", c.p50_ns), ("0.9", c.p90_ns), ("0.99", c.p99_ns)] {
                e.sample(
                    "prescient_chain_latency_seconds",
                    &[("graph", g), ("chain", &chain), ("quantile", q)],
                    v as f64 / 1e9,
                );
            }
        }
    }
    e.family(
        "prescient_invocation_seconds",
        "summary",
        "End-to-end invocation latency measured at the ingresses: quantiles over the last 60 s.",
    );
    let graphs: std::collections::BTreeSet<&String> =
        monitor.totals.keys().map(|(g, _)| g).collect();
    for g in graphs {
        if let Some(s) = monitor.graph_stats(g, SUMMARY_WINDOW_S, now_s) {
            for (q, v) in [
                ("0.5", s.exec_p50_ns),
                ("0.9", s.exec_p90_ns),
                ("0.99", s.exec_p99_ns),
            ] {
                e.sample(
                    "prescient_invocation_seconds",
                    &[("graph", g), ("quantile", q)],
                    v as f64 / 1e9,
                );
            }
            let tot = monitor
                .totals
                .get(&(g.clone(), String::new()))
                .cloned()
                .unwrap_or_default();
            e.sample(
                "prescient_invocation_seconds_sum",
                &[("graph", g)],
                tot.exec_ns_sum / 1e9,
            );
            e.sample(
                "prescient_invocation_seconds_count",
                &[("graph", g)],
                tot.executions as f64,
            );
        }
    }
    let latest: Vec<(&String, &crate::monitor::HostPoint)> = monitor
        .hosts
        .iter()
        .filter_map(|(h, s)| s.back().map(|p| (h, p)))
        .collect();
    type Get = fn(&crate::monitor::HostPoint) -> f64;
    let gauges: [(&str, &str, Get); 5] = [
        (
            "prescient_host_cpu_utilization",
            "Share of the host's CPU time busy in the last second (0 to 1).",
            |p| f64::from(p.cpu_util),
        ),
        (
            "prescient_host_cpu_steal",
            "Share of CPU time stolen by the hypervisor in the last second (0 to 1).",
            |p| f64::from(p.cpu_steal),
        ),
        (
            "prescient_host_memory_used_bytes",
            "Memory in use on the host.",
            |p| p.memory_used_bytes as f64,
        ),
        (
            "prescient_host_memory_total_bytes",
            "Memory on the host.",
            |p| p.memory_total_bytes as f64,
        ),
        (
            "prescient_host_run_delay_seconds_per_second",
            "Time runnable tasks waited for a CPU, per second (contention).",
            |p| p.run_delay_ns as f64 / 1e9,
        ),
    ];
    for (name, help, get) in gauges {
        e.family(name, "gauge", help);
        for (h, p) in &latest {
            e.sample(name, &[("host", h)], get(p));
        }
    }
    e.family(
        "prescient_host_runqueue_latency_p99_seconds",
        "gauge",
        "99th percentile of run-queue waits on the host in the last second (eBPF probes).",
    );
    for (h, p) in &latest {
        if let Some(rq) = &p.run_queue {
            e.sample(
                "prescient_host_runqueue_latency_p99_seconds",
                &[("host", h)],
                rq.quantile(0.99) / 1e9,
            );
        }
    }
    e.family(
        "prescient_host_network_bytes_total",
        "counter",
        "Host network bytes (all interfaces but loopback) since the control node started.",
    );
    for (h, (rx, tx)) in &monitor.host_net_totals {
        e.sample(
            "prescient_host_network_bytes_total",
            &[("host", h), ("direction", "rx")],
            *rx as f64,
        );
        e.sample(
            "prescient_host_network_bytes_total",
            &[("host", h), ("direction", "tx")],
            *tx as f64,
        );
    }
    type GpuGet = fn(&crate::monitor::HostPoint) -> Vec<f64>;
    let gpu_gauges: [(&str, &str, GpuGet); 4] = [
        (
            "prescient_gpu_utilization",
            "GPU utilisation in the last sample (0 to 1), from NVML.",
            |p| p.gpu_util.iter().map(|&u| f64::from(u)).collect(),
        ),
        (
            "prescient_gpu_memory_used_bytes",
            "GPU memory in use, from NVML.",
            |p| p.gpu_memory_used_bytes.iter().map(|&b| b as f64).collect(),
        ),
        (
            "prescient_gpu_power_watts",
            "GPU power draw, from NVML.",
            |p| p.gpu_power_watts.iter().map(|&w| f64::from(w)).collect(),
        ),
        (
            "prescient_gpu_temperature_celsius",
            "GPU die temperature, from NVML.",
            |p| p.gpu_temperature_c.iter().map(|&c| f64::from(c)).collect(),
        ),
    ];
    for (name, help, get) in gpu_gauges {
        e.family(name, "gauge", help);
        for (h, p) in &latest {
            for (i, v) in get(p).into_iter().enumerate() {
                e.sample(name, &[("host", h), ("gpu", &i.to_string())], v);
            }
        }
    }
    // Replicas that still exist (a retired or lost one's last sample is not shown).
    let live: std::collections::BTreeSet<&str> = deployments
        .values()
        .flat_map(|d| d.replicas.iter().chain(&d.retiring).map(|r| r.id.as_str()))
        .collect();
    // Each gauge reads a VM sample; `None` leaves the replica out (no probes on its host).
    type VmGet = fn(&crate::monitor::VmPoint) -> Option<f64>;
    let vm_gauges: [(&str, &str, VmGet); 8] = [
        (
            "prescient_replica_gpu_memory_bytes",
            "GPU memory a replica's VM holds (NVML, per process), on all GPUs.",
            |v| Some(v.gpu_memory_bytes as f64),
        ),
        (
            "prescient_replica_cpu_cores",
            "CPU a replica's VM used in the last second, in cores.",
            |v| Some(f64::from(v.cpu_cores)),
        ),
        (
            "prescient_replica_cpu_limit_cores",
            "CPU limit of a replica's VM, in cores.",
            |v| Some(f64::from(v.cpu_limit_cores)),
        ),
        (
            "prescient_replica_memory_bytes",
            "Memory a replica's VM uses.",
            |v| Some(v.memory_bytes as f64),
        ),
        (
            "prescient_replica_memory_limit_bytes",
            "Memory limit of a replica's VM.",
            |v| Some(v.memory_limit_bytes as f64),
        ),
        (
            "prescient_replica_runqueue_latency_p99_seconds",
            "99th percentile of a replica's VM's run-queue waits in the last second (eBPF).",
            |v| Some(v.probes.as_ref()?.run_queue.quantile(0.99) / 1e9),
        ),
        (
            "prescient_replica_tcp_sent_bytes_per_second",
            "TCP bytes a replica's VM sent in the last second (eBPF).",
            |v| Some(v.probes.as_ref()?.tcp_sent_bytes as f64),
        ),
        (
            "prescient_replica_tcp_received_bytes_per_second",
            "TCP bytes a replica's VM received in the last second (eBPF).",
            |v| Some(v.probes.as_ref()?.tcp_received_bytes as f64),
        ),
    ];
    for (name, help, get) in vm_gauges {
        e.family(name, "gauge", help);
        for (replica, v) in monitor
            .vms
            .iter()
            .filter(|(r, _)| live.contains(r.as_str()))
        {
            if let Some(x) = get(v) {
                e.sample(
                    name,
                    &[
                        ("replica", replica),
                        ("graph", &v.graph_id),
                        ("task", &v.task),
                        ("host", &v.host),
                    ],
                    x,
                );
            }
        }
    }
    e.family(
        "prescient_telemetry_dropped_total",
        "counter",
        "Executions workers could not report, per host.",
    );
    for (host, n) in &monitor.dropped {
        e.sample(
            "prescient_telemetry_dropped_total",
            &[("host", host)],
            *n as f64,
        );
    }
    e.finish()
}
