//! The agent's reports: workers' telemetry batches and the host's and VMs' samples forwarded
//! to the control node once a second, and what the agent exposes on `/metrics`.

use super::*;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

pub(super) struct ProbeTotals {
    /// Per replica: graph, task and the sums.
    vms: std::collections::BTreeMap<String, (String, String, crate::telemetry::probes::ProbeUsage)>,
    host_runq_hist: crate::telemetry::probes::CpuHistogram,
}

impl Default for ProbeTotals {
    fn default() -> Self {
        ProbeTotals {
            vms: Default::default(),
            host_runq_hist: [0; prescient_probes_common::LATENCY_BUCKETS + 1],
        }
    }
}

/// A replica cgroup's cumulative counters at one sample.
pub(super) struct VmCounters {
    cpu_ns: u64,
    periods: u64,
    throttled: u64,
    at: std::time::Instant,
}

/// One replica's cgroup over the last interval.
pub(super) struct VmUsage {
    replica: String,
    graph_id: String,
    task: String,
    cores: f32,
    memory_bytes: u64,
    limits: prescient_schemas::Resources,
    /// Share of CPU-bandwidth periods it was throttled in.
    throttled_share: f32,
}

impl AgentNode {
    /// Forwards workers' telemetry batches to the control node once a second.
    pub async fn forward_telemetry(self: Rc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sampler = crate::telemetry::host::HostSampler::default();
        let mut vm_cpu: HashMap<String, VmCounters> = HashMap::new();
        let mut cpus = crate::telemetry::probes::CpuTracker::default();
        crate::telemetry::spans::install_switch_signals();
        crate::telemetry::clock::init();
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
                    for (i, u) in vms.iter().enumerate() {
                        let replica = &u.replica;
                        let mut v = list.reborrow().get(i as u32);
                        v.set_replica(replica.as_str());
                        v.set_graph_id(u.graph_id.as_str());
                        v.set_task(u.task.as_str());
                        v.set_cpu_cores(u.cores);
                        v.set_memory_bytes(u.memory_bytes);
                        v.set_cpu_limit_cores(u.limits.cpu_millicores as f32 / 1000.0);
                        v.set_memory_limit_bytes(u.limits.memory_bytes);
                        v.set_throttled_share(u.throttled_share);
                        if let Some(procs) = members.get(replica) {
                            v.set_gpu_memory_bytes(crate::telemetry::host::vm_gpu_memory(
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
    pub(super) fn sample_probes(
        &self,
        cpus: &mut crate::telemetry::probes::CpuTracker,
        members: &[(String, Vec<u32>)],
        host: &mut crate::telemetry::host::HostSampleRec,
    ) -> HashMap<String, crate::telemetry::probes::ProbeUsage> {
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
    pub(super) fn vm_processes(&self) -> Vec<(String, Vec<u32>)> {
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

    /// CPU (cores, over the last interval), memory and CPU throttling of each replica's cgroup.
    pub(super) fn sample_vms(&self, prev: &mut HashMap<String, VmCounters>) -> Vec<VmUsage> {
        let now = std::time::Instant::now();
        let mut out = Vec::new();
        let replicas = self.replicas.borrow();
        prev.retain(|k, _| replicas.contains_key(k));
        for (name, r) in replicas.iter() {
            let Some(cg) = r.cgroup.as_ref() else {
                continue;
            };
            let Some((cpu_ns, mem)) = cg.usage() else {
                continue;
            };
            let throttling = cg.throttling().unwrap_or_default();
            let counters = VmCounters {
                cpu_ns,
                periods: throttling.0,
                throttled: throttling.1,
                at: now,
            };
            let (cores, throttled_share) = match prev.insert(name.clone(), counters) {
                Some(p) => {
                    let cores = cpu_ns.saturating_sub(p.cpu_ns) as f32
                        / now.duration_since(p.at).as_nanos().max(1) as f32;
                    let periods = throttling.0.saturating_sub(p.periods);
                    let throttled = throttling.1.saturating_sub(p.throttled);
                    let share = if periods == 0 {
                        0.0
                    } else {
                        (throttled as f32 / periods as f32).min(1.0)
                    };
                    (cores, share)
                }
                None => (0.0, 0.0),
            };
            out.push(VmUsage {
                replica: name.clone(),
                graph_id: r.graph_id.clone(),
                task: r.task.clone(),
                cores,
                memory_bytes: mem,
                limits: r.limits,
                throttled_share,
            });
        }
        out
    }

    pub(super) fn queue_telemetry(&self, msg: TelemetryMessage) {
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
        let hedging = &self.ingress.hedging;
        for (name, help, v) in [
            (
                "prescient_hedges_sent_total",
                "Invocations sent again by this ingress after their hedge delay.",
                hedging.sent.get(),
            ),
            (
                "prescient_hedges_won_total",
                "Hedged invocations whose hedge answered first (the original's answer was ignored).",
                hedging.won.get(),
            ),
            (
                "prescient_hedges_denied_total",
                "Hedges due but not sent: the budget was spent or no other replica could take it.",
                hedging.denied.get(),
            ),
        ] {
            e.family(name, "counter", help);
            e.sample(name, &[("agent", agent)], v as f64);
        }
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
    pub(super) fn render_probe_metrics(&self, e: &mut prescient_schemas::prom::Exposition) {
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
        type Get = fn(&crate::telemetry::probes::ProbeUsage) -> f64;
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
}
