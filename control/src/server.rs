//! The Cap'n Proto API server: one RPC system per connection, all on one `LocalSet`
//! (capnp-rpc is `!Send`); registry I/O runs on the blocking pool so a slow fsync never stalls
//! other clients.
//!
//! API boundary: `api.capnp`'s `Control` interface. Every graph is validated here again,
//! whatever the client checked, since clients are not trusted.

use crate::artifacts::{ArtifactStore, Upload};
use crate::clock::unix_ms as now_ms;
use crate::cluster::Cluster;
use crate::events::EventLog;
use crate::session::RegistryCap;
use crate::store::{Event, Registry, StoreError};
use capnp::capability::Rc as CapRc;
use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use futures::AsyncReadExt;
use prescient_policy::snapshot::Health;
use prescient_schemas::api_capnp::artifact_upload;
use prescient_schemas::api_capnp::{control, event_sink, subscription};
use prescient_schemas::codec::{self, text};
use prescient_schemas::ValidatedGraph;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

/// Bounds on what one client may send, so a broken or hostile client gets an error and a closed
/// connection instead of exhausting the node.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message accepted; larger ones are refused from their header, before allocation.
    pub max_message_bytes: usize,
    /// Deepest pointer nesting accepted in a message.
    pub max_nesting: i32,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 16 << 20,
            max_nesting: 64,
            max_connections: 1024,
        }
    }
}

impl Limits {
    pub fn reader_options(&self) -> capnp::message::ReaderOptions {
        let mut o = capnp::message::ReaderOptions::new();
        o.traversal_limit_in_words(Some(self.max_message_bytes / 8))
            .nesting_limit(self.max_nesting);
        o
    }
}

/// Shared state of the API: the registry, the event log and the live cluster.
#[derive(Clone)]
pub struct Control {
    registry: Arc<Registry>,
    events: EventLog,
    cluster: Rc<Cluster>,
    artifacts: ArtifactStore,
}

impl Control {
    pub fn new(
        registry: Arc<Registry>,
        events: EventLog,
        cluster: Rc<Cluster>,
        artifacts: ArtifactStore,
    ) -> Self {
        Control {
            registry,
            events,
            cluster,
            artifacts,
        }
    }

    /// Runs a registry call on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, capnp::Error>
    where
        T: Send + 'static,
        F: FnOnce(&Registry) -> Result<T, StoreError> + Send + 'static,
    {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || f(&registry))
            .await
            .map_err(|e| capnp::Error::failed(format!("registry task failed: {e}")))?
            .map_err(|e| capnp::Error::failed(e.to_string()))
    }

    fn publish(&self, event: Option<Event>) {
        self.events.publish(event);
        self.cluster.graphs_changed();
    }
}

impl control::Server for Control {
    async fn submit_graph(
        self: CapRc<Self>,
        params: control::SubmitGraphParams,
        mut results: control::SubmitGraphResults,
    ) -> Result<(), capnp::Error> {
        let graph = codec::decode_graph(params.get()?.get_graph()?)
            .map_err(|e| capnp::Error::failed(format!("graph does not decode: {e}")))?;
        let validated = match ValidatedGraph::new(graph) {
            Ok(v) => v,
            Err(problems) => {
                info!(problems = problems.len(), "graph rejected");
                let mut list = results
                    .get()
                    .init_result()
                    .init_rejected(problems.len() as u32);
                for (i, p) in problems.iter().enumerate() {
                    let mut b = list.reborrow().get(i as u32);
                    b.set_kind(p.kind());
                    b.set_message(p.to_string().as_str());
                    b.set_task(p.task().unwrap_or(""));
                    b.set_port(p.port().unwrap_or(""));
                    b.set_edge(p.edge().map_or(-1, |e| e as i32));
                }
                return Ok(());
            }
        };
        let graph = validated.into_graph();
        let submitted = self.blocking(move |r| r.submit(graph, now_ms())).await?;
        self.publish(submitted.event);
        let mut res = results.get().init_result();
        res.set_created(submitted.created);
        codec::encode_record(&submitted.record, res.init_accepted());
        Ok(())
    }

    async fn get_graph(
        self: CapRc<Self>,
        params: control::GetGraphParams,
        mut results: control::GetGraphResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_id())?;
        let record = self.blocking(move |r| r.get(&id)).await?;
        codec::encode_record(&record, results.get().init_record());
        Ok(())
    }

    async fn list_graphs(
        self: CapRc<Self>,
        _: control::ListGraphsParams,
        mut results: control::ListGraphsResults,
    ) -> Result<(), capnp::Error> {
        let records = self.blocking(|r| r.list()).await?;
        let mut list = results.get().init_graphs(records.len() as u32);
        for (i, rec) in records.iter().enumerate() {
            encode_summary(rec, list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn remove_graph(
        self: CapRc<Self>,
        params: control::RemoveGraphParams,
        mut results: control::RemoveGraphResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_id())?;
        let (rec, event) = self.blocking(move |r| r.remove(&id, now_ms())).await?;
        self.publish(Some(event));
        encode_summary(&rec, results.get().init_removed());
        Ok(())
    }

    async fn invoke(
        self: CapRc<Self>,
        params: control::InvokeParams,
        _: control::InvokeResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_graph_id())?;
        let rec = self.blocking(move |r| r.get(&id)).await?;
        Err(capnp::Error::failed(format!(
            "graph {} ({:?}): invocations go to an agent's ingress, not the control node (see `prescient agents`)",
            rec.id, rec.graph.name
        )))
    }

    async fn list_events(
        self: CapRc<Self>,
        params: control::ListEventsParams,
        mut results: control::ListEventsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (since, limit) = (p.get_since_seq(), p.get_limit().clamp(1, 10_000) as usize);
        let events = self.blocking(move |r| r.events(since, limit)).await?;
        let mut list = results.get().init_events(events.len() as u32);
        for (i, e) in events.iter().enumerate() {
            e.encode(list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn agents(
        self: CapRc<Self>,
        _: control::AgentsParams,
        mut results: control::AgentsResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_registry(capnp_rpc::new_client(RegistryCap(self.cluster.clone())));
        Ok(())
    }

    async fn list_agents(
        self: CapRc<Self>,
        _: control::ListAgentsParams,
        mut results: control::ListAgentsResults,
    ) -> Result<(), capnp::Error> {
        let agents = self.cluster.agents.borrow();
        let state = self.cluster.state.borrow();
        let mut list = results.get().init_agents(agents.len() as u32);
        for (i, a) in agents.values().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_name(a.name.as_str());
            let Some(host) = state.hosts.get(&a.name) else {
                continue;
            };
            b.set_state(match host.health {
                Health::Ready => "ready",
                Health::Lost => "lost",
            });
            b.set_last_heartbeat_ms(a.last_heartbeat_unix_ms);
            let free = prescient_policy::placement::host_view(&state, host);
            b.set_replicas(free.replicas as u32);
            b.set_cpu_millicores_free(free.cpu_free_millicores.min(u64::from(u32::MAX)) as u32);
            b.set_memory_bytes_free(free.memory_free_bytes);
            b.set_pools(host.pools);
            b.set_warm_vms(host.warm.iter().map(|w| w.count).sum());
            b.set_warm_target(host.warm_target.iter().map(|w| w.count).sum());
            let mut h = b.reborrow().init_host();
            h.set_name(a.name.as_str());
            h.set_hostname(a.hostname.as_str());
            h.set_cpus(a.cpus);
            h.set_memory_bytes(a.memory_bytes);
            h.set_ingress_addr(a.ingress_addr.as_str());
            h.set_provisioner(a.provisioner.as_str());
            h.set_telemetry(a.telemetry.as_str());
            let monitor = self.cluster.monitor.borrow();
            if let Some(p) = monitor.host_window(&a.name, HOST_WINDOW_S) {
                b.set_has_load(true);
                b.set_cpu_util(p.cpu_util);
                b.set_memory_used_bytes(p.memory_used_bytes);
                b.set_run_delay_ns_per_sec(p.run_delay_ns_per_s);
                if let Some(rq) = &p.run_queue {
                    b.set_probes(true);
                    b.set_run_queue_p99_ns(rq.quantile(0.99) as u64);
                }
            }
        }
        Ok(())
    }

    async fn list_replicas(
        self: CapRc<Self>,
        params: control::ListReplicasParams,
        mut results: control::ListReplicasResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_graph_id())?;
        let state = self.cluster.state.borrow();
        let Some(d) = state.deployments.get(&id) else {
            results.get().init_replicas(0);
            return Ok(());
        };
        let mut r = results.get();
        r.set_epoch(d.epoch);
        let mut list = r.init_replicas(d.replicas.len() as u32);
        for (i, rep) in d.replicas.iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_replica(rep.id.as_str());
            b.set_task(rep.task.as_str());
            b.set_host(rep.host.as_str());
            b.set_data_plane_addr(rep.addr.as_str());
            b.set_state(if rep.is_ready() {
                "ready"
            } else {
                "provisioning"
            });
            if let Some(v) = self.cluster.monitor.borrow().vms.get(&rep.id) {
                b.set_has_load(true);
                b.set_cpu_cores(v.cpu_cores);
                b.set_memory_bytes(v.memory_bytes);
                if let Some(p) = &v.probes {
                    b.set_probed(true);
                    b.set_run_queue_p99_ns(p.run_queue.quantile(0.99) as u64);
                    b.set_tcp_sent_bytes(p.tcp_sent_bytes);
                    b.set_tcp_received_bytes(p.tcp_received_bytes);
                }
            }
        }
        Ok(())
    }

    async fn stats(
        self: CapRc<Self>,
        params: control::StatsParams,
        mut results: control::StatsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = text(p.get_graph_id())?;
        let window = u64::from(p.get_window_sec().clamp(1, 600));
        let monitor = self.cluster.monitor.borrow();
        let now_s = now_ms() / 1000;
        let stats = monitor.task_stats(&id, window, now_s);
        let mut r = results.get();
        r.set_dropped_spans(monitor.dropped.values().sum());
        if let Some(e2e) = monitor.graph_stats(&id, window, now_s) {
            r.set_has_end_to_end(true);
            encode_task_stats(&e2e, r.reborrow().init_end_to_end());
        }
        let cold = monitor.cold.window(&id, window, now_s);
        let total = monitor.cold.totals.get(&id).copied().unwrap_or_default();
        let mut cb = r.reborrow().init_cold();
        cb.set_executions(cold.executions);
        cb.set_wait_sum_ns(cold.wait_sum_ns);
        cb.set_wait_max_ns(cold.wait_max_ns);
        cb.set_total_executions(total.executions);
        cb.set_total_wait_sum_ns(total.wait_sum_ns);
        let edges = monitor.edge_stats(&id, window, now_s);
        let state = self.cluster.state.borrow();
        let deployment = state.deployments.get(&id);
        let sources: std::collections::HashMap<(String, String), String> = deployment
            .map(|d| {
                d.record
                    .graph
                    .edges
                    .iter()
                    .map(|e| ((e.to.task.clone(), e.to.port.clone()), e.from.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let mut list = r.reborrow().init_edges(edges.len() as u32);
        for (i, e) in edges.iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            let from = sources
                .get(&(e.task.clone(), e.port.clone()))
                .map_or("ingress", String::as_str);
            b.set_from(from);
            b.set_to(format!("{}.{}", e.task, e.port).as_str());
            b.set_count(e.count);
            b.set_bytes(e.bytes);
            b.set_transfer_p50_ns(e.transfer_p50_ns);
            b.set_transfer_p99_ns(e.transfer_p99_ns);
        }
        let chain_stats = self
            .cluster
            .chains(&id)
            .map(|c| monitor.chain_stats(&id, &c, window, now_s))
            .unwrap_or_default();
        let mut list = r.reborrow().init_chains(chain_stats.len() as u32);
        for (i, c) in chain_stats.iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            let mut tasks = b.reborrow().init_tasks(c.tasks.len() as u32);
            for (j, t) in c.tasks.iter().enumerate() {
                tasks.set(j as u32, t.as_str());
            }
            b.set_count(c.count);
            b.set_p50_ns(c.p50_ns);
            b.set_p90_ns(c.p90_ns);
            b.set_p99_ns(c.p99_ns);
            b.set_path_p50_sum_ns(c.path_p50_sum_ns);
            if let Some((p, target, measured)) = c.objective {
                b.set_objective_percentile(p);
                b.set_objective_ns(target);
                b.set_measured_at_objective_ns(measured);
            }
        }
        let mut list = r.init_tasks(stats.len() as u32);
        for (i, t) in stats.iter().enumerate() {
            encode_task_stats(t, list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn history(
        self: CapRc<Self>,
        params: control::HistoryParams,
        mut results: control::HistoryResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (graph, task) = (text(p.get_graph_id())?, text(p.get_task())?);
        let (from, to) = (p.get_from_minute(), p.get_to_minute());
        let per_second = p.get_per_second();
        let points = self
            .blocking(move |r| {
                if per_second {
                    r.history_seconds(&graph, &task, from, to)
                } else {
                    r.history(&graph, &task, from, to)
                }
            })
            .await?;
        let mut list = results.get().init_points(points.len() as u32);
        for (i, h) in points.iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_minute(h.at);
            b.set_count(h.count);
            b.set_errors(h.errors);
            b.set_exec_p50_ns(h.exec_p50_ns);
            b.set_exec_p99_ns(h.exec_p99_ns);
            b.set_exec_mean_ns(h.exec_mean_ns);
            b.set_queue_p50_ns(h.queue_p50_ns);
            b.set_queue_p99_ns(h.queue_p99_ns);
            b.set_sink_count(h.sink_count);
            b.set_sink_p50_ns(h.sink_p50_ns);
            b.set_sink_p99_ns(h.sink_p99_ns);
        }
        Ok(())
    }

    async fn import_history(
        self: CapRc<Self>,
        params: control::ImportHistoryParams,
        mut results: control::ImportHistoryResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (id, task) = (text(p.get_graph_id())?, text(p.get_task())?);
        let step_s = u64::from(p.get_step_sec());
        let counts: Vec<u64> = p.get_counts()?.iter().collect();
        let end_s = match p.get_end_second() {
            0 => now_ms() / 1000,
            s => s,
        };
        if step_s == 0 || counts.is_empty() {
            return Err(capnp::Error::failed(
                "importing history: the step must be positive and the series not empty".into(),
            ));
        }
        let (g, t) = (id.clone(), task.clone());
        let (minutes, seconds) = self
            .blocking(move |r| {
                let record = r.get(&g)?;
                if !t.is_empty() && record.graph.task(&t).is_none() {
                    return Err(StoreError::UnknownTask {
                        graph: g.clone(),
                        task: t.clone(),
                    });
                }
                r.import_history(&g, &t, step_s, &counts, end_s)
            })
            .await?;
        self.cluster.reseed_forecast(&id, &task);
        let mut r = results.get();
        r.set_minutes(minutes as u32);
        r.set_seconds(seconds as u32);
        Ok(())
    }

    async fn forecast(
        self: CapRc<Self>,
        params: control::ForecastParams,
        mut results: control::ForecastResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_graph_id())?;
        let now = self.cluster.now();
        let state = self.cluster.state.borrow();
        let mut r = results.get();
        let (Some(d), Some(policy)) = (
            state.deployments.get(&id),
            state.wanted.get(&id).and_then(|w| w.graph.scaling.as_ref()),
        ) else {
            r.set_mode("off");
            r.init_tasks(0);
            return Ok(());
        };
        r.set_mode(policy.predictive.mode.name());
        let forecast: Vec<_> = d
            .record
            .graph
            .tasks
            .iter()
            .filter_map(|t| Some((t, d.forecasts.get(&t.id)?)))
            .collect();
        let mut list = r.init_tasks(forecast.len() as u32);
        for (i, (t, f)) in forecast.into_iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_task(t.id.as_str());
            b.set_step_ms(f.step.as_millis() as u64);
            b.set_first_step_ago_ms(now.saturating_sub(f.from).as_millis() as u64);
            let mut point = b.reborrow().init_point(f.point_per_s.len() as u32);
            for (j, x) in f.point_per_s.iter().enumerate() {
                point.set(j as u32, *x);
            }
            let mut upper = b.reborrow().init_upper(f.upper_per_s.len() as u32);
            for (j, x) in f.upper_per_s.iter().enumerate() {
                upper.set(j as u32, *x);
            }
            b.set_method(f.method);
            b.set_burstiness(f.arrival_scv);
            let mine = d.replicas.iter().filter(|r| r.task == t.id);
            let ready = mine.clone().filter(|r| r.is_ready()).count();
            b.set_ready(ready as u32);
            b.set_provisioning((mine.count() - ready) as u32);
            if let Some(plan) = prescient_policy::predictive::plan_for(d, policy, t, now) {
                b.set_lead_ms(plan.lead.as_millis() as u64);
                let mut planned = b.reborrow().init_planned(plan.steps.len() as u32);
                for (j, s) in plan.steps.iter().enumerate() {
                    planned.set(j as u32, s.replicas);
                }
                if let Some(fl) = plan.floor {
                    b.set_floor(fl.replicas);
                    b.set_floor_reason(fl.reason.as_str());
                }
            }
        }
        Ok(())
    }

    async fn upload_artifact(
        self: CapRc<Self>,
        _: control::UploadArtifactParams,
        mut results: control::UploadArtifactResults,
    ) -> Result<(), capnp::Error> {
        let store = self.artifacts.clone();
        let upload = tokio::task::spawn_blocking(move || store.begin())
            .await
            .map_err(|e| capnp::Error::failed(e.to_string()))?
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        results.get().set_upload(capnp_rpc::new_client(UploadCap {
            upload: RefCell::new(Some(upload)),
            events: self.events.clone(),
        }));
        Ok(())
    }

    async fn read_artifact(
        self: CapRc<Self>,
        params: control::ReadArtifactParams,
        mut results: control::ReadArtifactResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let digest = <[u8; 32]>::try_from(p.get_sha256()?)
            .map(prescient_schemas::Digest)
            .map_err(|_| capnp::Error::failed("sha256 must be 32 bytes".into()))?;
        let (offset, len) = (p.get_offset(), p.get_length().min(8 << 20) as usize);
        let store = self.artifacts.clone();
        let (data, size) = tokio::task::spawn_blocking(move || store.read(&digest, offset, len))
            .await
            .map_err(|e| capnp::Error::failed(e.to_string()))?
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let mut r = results.get();
        r.set_data(&data);
        r.set_size(size);
        Ok(())
    }

    async fn watch_events(
        self: CapRc<Self>,
        params: control::WatchEventsParams,
        mut results: control::WatchEventsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let since = p.get_since_seq();
        let sink = p.get_sink()?;
        // Subscribe before reading the backlog so nothing falls between the two.
        let rx = self.events.subscribe();
        let this = (*self).clone();
        let task = tokio::task::spawn_local(async move {
            if let Err(e) = this.forward_events(since, sink, rx).await {
                debug!("event watcher ended: {e}");
            }
        });
        results
            .get()
            .set_subscription(capnp_rpc::new_client(Subscription(task)));
        Ok(())
    }
}

impl Control {
    async fn forward_events(
        &self,
        mut last: u64,
        sink: event_sink::Client,
        mut rx: broadcast::Receiver<Event>,
    ) -> Result<(), capnp::Error> {
        let send = |e: &Event| {
            let mut req = sink.event_request();
            e.encode(req.get().init_event());
            req.send().promise
        };
        loop {
            // Catch up from the durable log, then follow the live feed.
            loop {
                let batch = self.blocking(move |r| r.events(last, 256)).await?;
                if batch.is_empty() {
                    break;
                }
                for e in &batch {
                    send(e).await?;
                    last = e.seq;
                }
            }
            loop {
                match rx.recv().await {
                    Ok(e) if e.seq <= last => {}
                    Ok(e) => {
                        send(&e).await?;
                        last = e.seq;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}

fn encode_summary(
    rec: &prescient_schemas::GraphRecord,
    mut b: prescient_schemas::api_capnp::graph_summary::Builder<'_>,
) {
    b.set_id(rec.id.as_str());
    b.set_name(rec.graph.name.as_str());
    b.set_version(rec.version);
    b.set_submitted_at_ms(rec.submitted_at_ms);
    b.set_tasks(rec.graph.tasks.len() as u32);
    b.set_edges(rec.graph.edges.len() as u32);
}

/// `listAgents` shows each host over this many seconds of samples.
const HOST_WINDOW_S: u64 = 10;

fn encode_task_stats(
    t: &crate::monitor::TaskStats,
    mut b: prescient_schemas::api_capnp::task_stats::Builder<'_>,
) {
    b.set_task(t.task.as_str());
    b.set_count(t.count);
    b.set_per_second(t.per_second);
    b.set_errors(t.errors);
    b.set_exec_p50_ns(t.exec_p50_ns);
    b.set_exec_p90_ns(t.exec_p90_ns);
    b.set_exec_p99_ns(t.exec_p99_ns);
    b.set_exec_mean_ns(t.exec_mean_ns);
    b.set_queue_p50_ns(t.queue_p50_ns);
    b.set_queue_p99_ns(t.queue_p99_ns);
    b.set_transfer_p50_ns(t.transfer_p50_ns);
    b.set_transfer_p99_ns(t.transfer_p99_ns);
    b.set_input_bytes(t.input_bytes);
    b.set_output_bytes(t.output_bytes);
}

/// One upload in progress; dropping the capability before `commit` discards it.
struct UploadCap {
    upload: RefCell<Option<Upload>>,
    events: EventLog,
}

impl UploadCap {
    fn take(&self) -> Result<Upload, capnp::Error> {
        self.upload.borrow_mut().take().ok_or_else(|| {
            capnp::Error::failed("this upload was already committed or failed".into())
        })
    }
}

impl artifact_upload::Server for UploadCap {
    async fn write(
        self: CapRc<Self>,
        params: artifact_upload::WriteParams,
        _: artifact_upload::WriteResults,
    ) -> Result<(), capnp::Error> {
        let chunk = params.get()?.get_chunk()?.to_vec();
        let mut upload = self.take()?;
        let (upload, result) = tokio::task::spawn_blocking(move || {
            let r = upload.write(&chunk);
            (upload, r)
        })
        .await
        .map_err(|e| capnp::Error::failed(e.to_string()))?;
        result.map_err(|e| capnp::Error::failed(e.to_string()))?;
        *self.upload.borrow_mut() = Some(upload);
        Ok(())
    }

    async fn commit(
        self: CapRc<Self>,
        _: artifact_upload::CommitParams,
        mut results: artifact_upload::CommitResults,
    ) -> Result<(), capnp::Error> {
        let upload = self.take()?;
        let (digest, size, created) = tokio::task::spawn_blocking(move || upload.commit())
            .await
            .map_err(|e| capnp::Error::failed(e.to_string()))?
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        if created {
            self.events
                .record(&prescient_policy::Event::ArtifactUploaded {
                    digest: digest.to_string(),
                    bytes: size,
                })
                .await;
        }
        let mut r = results.get();
        r.set_sha256(&digest.0);
        r.set_size(size);
        r.set_created(created);
        Ok(())
    }
}

/// Ends the event feed when the client drops its capability.
struct Subscription(tokio::task::JoinHandle<()>);

impl subscription::Server for Subscription {}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the API on `listener` until the future is dropped. Must run inside a `LocalSet`.
pub async fn serve(listener: TcpListener, control: Control, limits: Limits) {
    let client: control::Client = capnp_rpc::new_client(control);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        debug!(%peer, "client connected");
        let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(reader),
            futures::io::BufWriter::new(writer),
            rpc_twoparty_capnp::Side::Server,
            limits.reader_options(),
        );
        let rpc = RpcSystem::new(Box::new(network), Some(client.clone().client));
        tokio::task::spawn_local(async move {
            match rpc.await {
                Ok(()) => debug!(%peer, "client disconnected"),
                Err(e) => warn!(%peer, error = %e, "client disconnected on error"),
            }
            drop(permit);
        });
    }
}
