//! The agents' side of the control node's RPC: `Registry` (register) and the `AgentSession`
//! each registration gets (heartbeats, telemetry batches, replica exits).

use crate::cluster::Cluster;
use capnp::capability::Rc as CapRc;
use prescient_schemas::agent_capnp::{agent_session, registry};
use prescient_schemas::codec::text;
use prescient_schemas::sketch::Sketch;
use std::rc::Rc;
use tracing::warn;

/// Per one-second VM sample, what is left of a replica's last throttled share.
const THROTTLE_DECAY: f32 = 0.8;

/// The `Registry` capability agents register through.
pub struct RegistryCap(pub Rc<Cluster>);

impl registry::Server for RegistryCap {
    async fn register(
        self: CapRc<Self>,
        params: registry::RegisterParams,
        mut results: registry::RegisterResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (name, generation) =
            self.0
                .register(p.get_host()?, p.get_agent()?, p.get_replicas()?)?;
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
        params: agent_session::HeartbeatParams,
        mut results: agent_session::HeartbeatResults,
    ) -> Result<(), capnp::Error> {
        let mut warm = Vec::new();
        let list = params.get()?.get_warm()?;
        // A pool holds at most what placement could use: a longer list is a broken agent.
        if list.len() > 1024 {
            return Err(capnp::Error::failed(format!(
                "agent {}: a heartbeat with {} warm-pool shapes (at most 1024)",
                self.name,
                list.len()
            )));
        }
        for w in list {
            warm.push(prescient_policy::snapshot::WarmShape {
                cpu_millicores: w.get_cpu_millicores(),
                memory_bytes: w.get_memory_bytes(),
                count: w.get_count().min(prescient_schemas::scaling::MAX_REPLICAS),
            });
        }
        warm.sort();
        if !self.cluster.heartbeat(&self.name, self.generation, warm) {
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
        let now_s = crate::clock::unix_ms() / 1000;
        for g in batch.get_gauges()? {
            monitor.gauges.record(
                &text(g.get_graph_id())?,
                &text(g.get_task())?,
                &text(g.get_replica())?,
                &text(g.get_name())?,
                g.get_value(),
                now_s,
            );
        }
        for s in batch.get_samples()? {
            let mut inputs = Vec::new();
            for d in s.get_inputs()? {
                inputs.push(d?.to_vec());
            }
            monitor
                .samples
                .record(&text(s.get_graph_id())?, &text(s.get_task())?, inputs);
        }
        for h in batch.get_hosts()? {
            monitor.record_host(&self.name, crate::monitor::HostPoint::decode(h)?);
        }
        for v in batch.get_vms()? {
            // Throttling comes in bursts (replica choice moves load off a throttled replica,
            // then back): what the triggers read decays over a few seconds instead of
            // vanishing with the next quiet second.
            let replica = text(v.get_replica())?;
            let throttled = monitor.vms.get(&replica).map_or(0.0, |p| p.throttled_share);
            let throttled = v.get_throttled_share().max(throttled * THROTTLE_DECAY);
            monitor.vms.insert(
                replica,
                crate::monitor::VmPoint {
                    host: self.name.clone(),
                    graph_id: text(v.get_graph_id())?,
                    task: text(v.get_task())?,
                    cpu_cores: v.get_cpu_cores(),
                    memory_bytes: v.get_memory_bytes(),
                    cpu_limit_cores: v.get_cpu_limit_cores(),
                    memory_limit_bytes: v.get_memory_limit_bytes(),
                    gpu_memory_bytes: v.get_gpu_memory_bytes(),
                    throttled_share: throttled,
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
        let mut refused = 0u64;
        for e in batch.get_edges()? {
            if !crate::monitor::plausible_second(e.get_second(), now_s) {
                refused += 1;
                continue;
            }
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
            if !crate::monitor::plausible_second(w.get_second(), now_s) {
                refused += 1;
                continue;
            }
            monitor.record_window(&crate::monitor::WindowView {
                graph_id: text(w.get_graph_id())?,
                task: text(w.get_task())?,
                replica: text(w.get_replica())?,
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
        if refused > 0 {
            warn!(agent = %self.name, refused, now_s, "telemetry windows refused: their second is not plausible (clock skew over {}s, or older than the {}s kept)", crate::monitor::MAX_SKEW_S, crate::monitor::RETENTION_S);
            *monitor.refused.entry(self.name.clone()).or_insert(0) += refused;
        }
        Ok(())
    }

    async fn replica_down(
        self: CapRc<Self>,
        params: agent_session::ReplicaDownParams,
        _: agent_session::ReplicaDownResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let replica = text(p.get_replica())?;
        let reason = text(p.get_reason())?;
        self.cluster
            .replica_down(&self.name, &replica, &reason)
            .await;
        Ok(())
    }
}
