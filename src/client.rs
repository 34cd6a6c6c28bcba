//! A Cap'n Proto client of the control node's API, for the CLI.

use anyhow::{anyhow, Context, Result};
use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use futures::AsyncReadExt;
use prescient_control::Event;
use prescient_schemas::api_capnp::{control, event_sink};
use prescient_schemas::codec;
use prescient_schemas::{GraphRecord, TaskGraph};
use serde::Serialize;

/// A connected client. Must be used inside a `LocalSet`.
pub struct ControlClient {
    client: control::Client,
    addr: String,
    connection: tokio::task::JoinHandle<Result<(), capnp::Error>>,
}

/// One problem the control node found in a submitted graph.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteProblem {
    pub kind: String,
    pub message: String,
    pub task: Option<String>,
    pub port: Option<String>,
    pub edge: Option<usize>,
}

pub enum SubmitOutcome {
    Accepted {
        record: Box<GraphRecord>,
        created: bool,
    },
    Rejected(Vec<RemoteProblem>),
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub id: String,
    pub name: String,
    pub version: u32,
    pub submitted_at_ms: u64,
    pub tasks: u32,
    pub edges: u32,
}

use prescient_schemas::codec::text;

fn remote(addr: &str, e: capnp::Error) -> anyhow::Error {
    anyhow!("control node at {addr}: {}", e.extra)
}

impl ControlClient {
    pub async fn connect(addr: &str) -> Result<ControlClient> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the control node at {addr}"))?;
        stream.set_nodelay(true)?;
        let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
        let mut options = capnp::message::ReaderOptions::new();
        options.traversal_limit_in_words(Some(64 << 20));
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(reader),
            futures::io::BufWriter::new(writer),
            rpc_twoparty_capnp::Side::Client,
            options,
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let client: control::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
        let connection = tokio::task::spawn_local(rpc);
        Ok(ControlClient {
            client,
            addr: addr.to_string(),
            connection,
        })
    }

    pub async fn submit(&self, graph: &TaskGraph) -> Result<SubmitOutcome> {
        let mut req = self.client.submit_graph_request();
        codec::encode_graph(graph, req.get().init_graph());
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let result = reply.get()?.get_result()?;
        use prescient_schemas::api_capnp::submit_result::Which;
        Ok(match result.which()? {
            Which::Accepted(r) => SubmitOutcome::Accepted {
                record: Box::new(codec::decode_record(r?)?),
                created: result.get_created(),
            },
            Which::Rejected(list) => {
                let mut out = Vec::new();
                for p in list? {
                    let nonempty = |s: String| (!s.is_empty()).then_some(s);
                    out.push(RemoteProblem {
                        kind: text(p.get_kind())?,
                        message: text(p.get_message())?,
                        task: nonempty(text(p.get_task())?),
                        port: nonempty(text(p.get_port())?),
                        edge: usize::try_from(p.get_edge()).ok(),
                    });
                }
                SubmitOutcome::Rejected(out)
            }
        })
    }

    pub async fn get(&self, id: &str) -> Result<GraphRecord> {
        let mut req = self.client.get_graph_request();
        req.get().set_id(id);
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        Ok(codec::decode_record(reply.get()?.get_record()?)?)
    }

    pub async fn list(&self) -> Result<Vec<Summary>> {
        let req = self.client.list_graphs_request();
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let mut out = Vec::new();
        for s in reply.get()?.get_graphs()? {
            out.push(summary(s)?);
        }
        Ok(out)
    }

    pub async fn remove(&self, id: &str) -> Result<Summary> {
        let mut req = self.client.remove_graph_request();
        req.get().set_id(id);
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        summary(reply.get()?.get_removed()?)
    }

    pub async fn events(&self, since: u64, limit: u32) -> Result<Vec<Event>> {
        let mut req = self.client.list_events_request();
        req.get().set_since_seq(since);
        req.get().set_limit(limit);
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let mut out = Vec::new();
        for e in reply.get()?.get_events()? {
            out.push(Event::decode(e)?);
        }
        Ok(out)
    }

    pub async fn agents(&self) -> Result<Vec<AgentRow>> {
        let req = self.client.list_agents_request();
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let mut out = Vec::new();
        for a in reply.get()?.get_agents()? {
            let h = a.get_host()?;
            out.push(AgentRow {
                name: text(a.get_name())?,
                state: text(a.get_state())?,
                cpus: h.get_cpus(),
                memory_bytes: h.get_memory_bytes(),
                cpu_millicores_free: a.get_cpu_millicores_free(),
                memory_bytes_free: a.get_memory_bytes_free(),
                replicas: a.get_replicas(),
                ingress: text(h.get_ingress_addr())?,
                provisioner: text(h.get_provisioner())?,
                telemetry: text(h.get_telemetry())?,
                cpu_util: a.get_has_load().then(|| a.get_cpu_util()),
                memory_used_bytes: a.get_has_load().then(|| a.get_memory_used_bytes()),
                run_delay_ms_per_sec: a
                    .get_has_load()
                    .then(|| a.get_run_delay_ns_per_sec() as f64 / 1e6),
                run_queue_p99_us: a
                    .get_probes()
                    .then(|| a.get_run_queue_p99_ns() as f64 / 1000.0),
                last_heartbeat_ms: a.get_last_heartbeat_ms(),
                warm_vms: a.get_pools().then(|| a.get_warm_vms()),
                warm_target: a.get_pools().then(|| a.get_warm_target()),
            });
        }
        Ok(out)
    }

    /// The replicas of a graph and its routing-table epoch.
    pub async fn replicas(&self, graph_id: &str) -> Result<(u64, Vec<ReplicaRow>)> {
        let mut req = self.client.list_replicas_request();
        req.get().set_graph_id(graph_id);
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let r = reply.get()?;
        let mut out = Vec::new();
        for x in r.get_replicas()? {
            out.push(ReplicaRow {
                replica: text(x.get_replica())?,
                task: text(x.get_task())?,
                host: text(x.get_host())?,
                addr: text(x.get_data_plane_addr())?,
                state: text(x.get_state())?,
                cpu_cores: x.get_has_load().then(|| x.get_cpu_cores()),
                memory_bytes: x.get_has_load().then(|| x.get_memory_bytes()),
                run_queue_p99_us: x
                    .get_probed()
                    .then(|| x.get_run_queue_p99_ns() as f64 / 1000.0),
                tcp_sent_bytes_per_sec: x.get_probed().then(|| x.get_tcp_sent_bytes()),
                tcp_received_bytes_per_sec: x.get_probed().then(|| x.get_tcp_received_bytes()),
            });
        }
        Ok((r.get_epoch(), out))
    }

    /// A graph's statistics over the last `window` seconds: per task, per edge, end to end.
    pub async fn stats(&self, graph_id: &str, window: u32) -> Result<Stats> {
        let mut req = self.client.stats_request();
        req.get().set_graph_id(graph_id);
        req.get().set_window_sec(window);
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let r = reply.get()?;
        let mut tasks = Vec::new();
        for t in r.get_tasks()? {
            tasks.push(task_stats_row(t)?);
        }
        let end_to_end = if r.get_has_end_to_end() {
            Some(task_stats_row(r.get_end_to_end()?)?)
        } else {
            None
        };
        let c = r.get_cold()?;
        let cold = ColdRow {
            executions: c.get_executions(),
            wait_mean_ms: if c.get_executions() > 0 {
                c.get_wait_sum_ns() / c.get_executions() as f64 / 1e6
            } else {
                0.0
            },
            wait_max_ms: c.get_wait_max_ns() / 1e6,
            total_executions: c.get_total_executions(),
            total_wait_s: c.get_total_wait_sum_ns() / 1e9,
        };
        let mut edges = Vec::new();
        for e in r.get_edges()? {
            edges.push(EdgeStatsRow {
                from: text(e.get_from())?,
                to: text(e.get_to())?,
                count: e.get_count(),
                bytes: e.get_bytes(),
                transfer_p50_us: e.get_transfer_p50_ns() as f64 / 1e3,
                transfer_p99_us: e.get_transfer_p99_ns() as f64 / 1e3,
            });
        }
        let mut chains = Vec::new();
        for c in r.get_chains()? {
            let has_objective = c.get_objective_percentile() > 0.0;
            chains.push(ChainStatsRow {
                tasks: c
                    .get_tasks()?
                    .iter()
                    .map(text)
                    .collect::<capnp::Result<Vec<String>>>()?,
                count: c.get_count(),
                p50_us: c.get_p50_ns() as f64 / 1e3,
                p90_us: c.get_p90_ns() as f64 / 1e3,
                p99_us: c.get_p99_ns() as f64 / 1e3,
                path_p50_sum_us: c.get_path_p50_sum_ns() as f64 / 1e3,
                objective_percentile: has_objective.then(|| c.get_objective_percentile()),
                objective_us: has_objective.then(|| c.get_objective_ns() as f64 / 1e3),
                measured_at_objective_us: has_objective
                    .then(|| c.get_measured_at_objective_ns() as f64 / 1e3),
            });
        }
        Ok(Stats {
            cold,
            tasks,
            end_to_end,
            edges,
            chains,
            dropped_spans: r.get_dropped_spans(),
        })
    }

    /// Per-minute history of a task ("" for the graph's invocations) over the last `minutes`.
    pub async fn history(
        &self,
        graph_id: &str,
        task: &str,
        minutes: u64,
    ) -> Result<Vec<serde_json::Value>> {
        self.history_at(graph_id, task, minutes, false).await
    }

    /// [`ControlClient::history`], or with `per_second` the per-second history (each point's
    /// `minute` then a unix second).
    pub async fn history_at(
        &self,
        graph_id: &str,
        task: &str,
        minutes: u64,
        per_second: bool,
    ) -> Result<Vec<serde_json::Value>> {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (now, back) = if per_second {
            (now_s, minutes.saturating_mul(60))
        } else {
            (now_s / 60, minutes)
        };
        let mut req = self.client.history_request();
        req.get().set_graph_id(graph_id);
        req.get().set_task(task);
        req.get().set_from_minute(now.saturating_sub(back));
        req.get().set_to_minute(now);
        req.get().set_per_second(per_second);
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let mut out = Vec::new();
        for p in reply.get()?.get_points()? {
            out.push(serde_json::json!({
                "minute": p.get_minute(),
                "count": p.get_count(),
                "errors": p.get_errors(),
                "exec_p50_us": p.get_exec_p50_ns() as f64 / 1e3,
                "exec_p99_us": p.get_exec_p99_ns() as f64 / 1e3,
                "exec_mean_us": p.get_exec_mean_ns() as f64 / 1e3,
                "queue_p50_us": p.get_queue_p50_ns() as f64 / 1e3,
                "queue_p99_us": p.get_queue_p99_ns() as f64 / 1e3,
                "sink_count": p.get_sink_count(),
                "sink_p50_us": p.get_sink_p50_ns() as f64 / 1e3,
                "sink_p99_us": p.get_sink_p99_ns() as f64 / 1e3,
            }));
        }
        Ok(out)
    }

    /// Stores `counts` (executions per `step_s`, the last step ending at `end_s`; 0: now) as a
    /// task's history; returns the minutes and seconds written.
    pub async fn import_history(
        &self,
        graph_id: &str,
        task: &str,
        step_s: u32,
        counts: &[u64],
        end_s: u64,
    ) -> Result<(u32, u32)> {
        let mut req = self.client.import_history_request();
        req.get().set_graph_id(graph_id);
        req.get().set_task(task);
        req.get().set_step_sec(step_s);
        req.get().set_end_second(end_s);
        let n = u32::try_from(counts.len()).context("too many steps")?;
        let mut list = req.get().init_counts(n);
        for (i, c) in counts.iter().enumerate() {
            list.set(i as u32, *c);
        }
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let r = reply.get()?;
        Ok((r.get_minutes(), r.get_seconds()))
    }

    /// A graph's `[scaling.predictive]` mode and each task's latest forecast with the plan on it
    /// (JSON objects: task, step_s, first_step_ago_s, point, upper, method, burstiness,
    /// planned, floor, floor_reason, lead_s, ready, provisioning).
    pub async fn forecast(&self, graph_id: &str) -> Result<(String, Vec<serde_json::Value>)> {
        let mut req = self.client.forecast_request();
        req.get().set_graph_id(graph_id);
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        let r = reply.get()?;
        let mut out = Vec::new();
        for t in r.get_tasks()? {
            let floats =
                |l: capnp::primitive_list::Reader<'_, f64>| -> Vec<f64> { l.iter().collect() };
            out.push(serde_json::json!({
                "task": text(t.get_task())?,
                "step_s": t.get_step_ms() as f64 / 1e3,
                "first_step_ago_s": t.get_first_step_ago_ms() as f64 / 1e3,
                "point": floats(t.get_point()?),
                "upper": floats(t.get_upper()?),
                "method": text(t.get_method())?,
                "burstiness": t.get_burstiness(),
                "planned": t.get_planned()?.iter().collect::<Vec<u32>>(),
                "floor": t.get_floor(),
                "floor_reason": text(t.get_floor_reason())?,
                "lead_s": t.get_lead_ms() as f64 / 1e3,
                "ready": t.get_ready(),
                "provisioning": t.get_provisioning(),
            }));
        }
        Ok((text(r.get_mode())?, out))
    }

    /// Uploads an artifact in 1 MiB chunks; returns its digest, size, and whether it was new.
    pub async fn upload(&self, bytes: &[u8]) -> Result<(prescient_schemas::Digest, u64, bool)> {
        let e = |e: capnp::Error| remote(&self.addr, e);
        let reply = self
            .client
            .upload_artifact_request()
            .send()
            .promise
            .await
            .map_err(e)?;
        let upload = reply.get()?.get_upload()?;
        for chunk in bytes.chunks(1 << 20) {
            let mut w = upload.write_request();
            w.get().set_chunk(chunk);
            w.send().promise.await.map_err(e)?;
        }
        let done = upload.commit_request().send().promise.await.map_err(e)?;
        let r = done.get()?;
        let digest = <[u8; 32]>::try_from(r.get_sha256()?)
            .map(prescient_schemas::Digest)
            .map_err(|_| anyhow!("the control node returned a malformed digest"))?;
        Ok((digest, r.get_size(), r.get_created()))
    }

    /// Hands every event after `since`, then each new one as it happens, to `on_event`, until
    /// the connection ends.
    pub async fn follow_events(
        self,
        since: u64,
        on_event: impl Fn(&Event) -> Result<()> + 'static,
    ) -> Result<()> {
        let mut req = self.client.watch_events_request();
        req.get().set_since_seq(since);
        req.get().set_sink(capnp_rpc::new_client(EventSink {
            on_event: Box::new(on_event),
        }));
        let reply = req
            .send()
            .promise
            .await
            .map_err(|e| remote(&self.addr, e))?;
        // Holding the subscription keeps the feed open.
        let _subscription = reply.get()?.get_subscription()?;
        let _ = self.connection.await;
        Ok(())
    }

    /// Resolves a graph name to its id; ids pass through.
    pub async fn resolve(&self, id_or_name: &str) -> Result<String> {
        let is_id = id_or_name
            .strip_prefix('g')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_id {
            return Ok(id_or_name.to_string());
        }
        self.list()
            .await?
            .into_iter()
            .find(|s| s.name == id_or_name)
            .map(|s| s.id)
            .ok_or_else(|| anyhow!("no graph with id or name {id_or_name:?}"))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    pub name: String,
    pub state: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub cpu_millicores_free: u32,
    pub memory_bytes_free: u64,
    pub replicas: u32,
    pub ingress: String,
    pub provisioner: String,
    /// "ebpf: <probes>" or "off: <why>".
    pub telemetry: String,
    /// The host's latest sample (absent before the first).
    pub cpu_util: Option<f32>,
    pub memory_used_bytes: Option<u64>,
    pub run_delay_ms_per_sec: Option<f64>,
    /// From the eBPF probes, where the host runs them.
    pub run_queue_p99_us: Option<f64>,
    pub last_heartbeat_ms: u64,
    /// A microVM agent's warm pool: the idle VMs it has, and those it was told to keep.
    pub warm_vms: Option<u32>,
    pub warm_target: Option<u32>,
}

/// A graph's statistics over a window, as `stats` returns them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub cold: ColdRow,
    pub tasks: Vec<TaskStatsRow>,
    pub end_to_end: Option<TaskStatsRow>,
    pub edges: Vec<EdgeStatsRow>,
    pub chains: Vec<ChainStatsRow>,
    pub dropped_spans: u64,
}

/// A graph's cold executions: queued past their task's wait budget while it had a replica on
/// its way; over the window, and since the control node started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ColdRow {
    pub executions: u64,
    pub wait_mean_ms: f64,
    pub wait_max_ms: f64,
    pub total_executions: u64,
    pub total_wait_s: f64,
}

/// One chain over a window: end to end at its sink.
#[derive(Debug, Clone, Serialize)]
pub struct ChainStatsRow {
    pub tasks: Vec<String>,
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Transfer + queue + execution p50 of each task on the path (joins' queueing left out:
    /// it is the wait for the other branches).
    pub path_p50_sum_us: f64,
    /// The graph's objective: percentile, target, and what was measured at that percentile.
    pub objective_percentile: Option<f64>,
    pub objective_us: Option<f64>,
    pub measured_at_objective_us: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EdgeStatsRow {
    pub from: String,
    pub to: String,
    pub count: u64,
    pub bytes: u64,
    pub transfer_p50_us: f64,
    pub transfer_p99_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskStatsRow {
    pub task: String,
    pub count: u64,
    pub per_second: f64,
    pub errors: u64,
    pub exec_p50_us: f64,
    pub exec_p90_us: f64,
    pub exec_p99_us: f64,
    pub exec_mean_us: f64,
    pub queue_p50_us: f64,
    pub queue_p99_us: f64,
    pub transfer_p50_us: f64,
    pub transfer_p99_us: f64,
    pub input_bytes: u64,
    pub output_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRow {
    pub replica: String,
    pub task: String,
    pub host: String,
    pub addr: String,
    pub state: String,
    /// Its VM's latest sample: CPU in cores, memory in bytes (absent before the first).
    pub cpu_cores: Option<f32>,
    pub memory_bytes: Option<u64>,
    /// From the eBPF probes, where its host runs them.
    pub run_queue_p99_us: Option<f64>,
    pub tcp_sent_bytes_per_sec: Option<u64>,
    pub tcp_received_bytes_per_sec: Option<u64>,
}

fn task_stats_row(t: prescient_schemas::api_capnp::task_stats::Reader<'_>) -> Result<TaskStatsRow> {
    Ok(TaskStatsRow {
        task: text(t.get_task())?,
        count: t.get_count(),
        per_second: t.get_per_second(),
        errors: t.get_errors(),
        exec_p50_us: t.get_exec_p50_ns() as f64 / 1e3,
        exec_p90_us: t.get_exec_p90_ns() as f64 / 1e3,
        exec_p99_us: t.get_exec_p99_ns() as f64 / 1e3,
        exec_mean_us: t.get_exec_mean_ns() as f64 / 1e3,
        queue_p50_us: t.get_queue_p50_ns() as f64 / 1e3,
        queue_p99_us: t.get_queue_p99_ns() as f64 / 1e3,
        transfer_p50_us: t.get_transfer_p50_ns() as f64 / 1e3,
        transfer_p99_us: t.get_transfer_p99_ns() as f64 / 1e3,
        input_bytes: t.get_input_bytes(),
        output_bytes: t.get_output_bytes(),
    })
}

fn summary(s: prescient_schemas::api_capnp::graph_summary::Reader<'_>) -> Result<Summary> {
    Ok(Summary {
        id: text(s.get_id())?,
        name: text(s.get_name())?,
        version: s.get_version(),
        submitted_at_ms: s.get_submitted_at_ms(),
        tasks: s.get_tasks(),
        edges: s.get_edges(),
    })
}

/// What `follow_events` does with each event.
type OnEvent = Box<dyn Fn(&Event) -> Result<()>>;

struct EventSink {
    on_event: OnEvent,
}

impl event_sink::Server for EventSink {
    async fn event(
        self: capnp::capability::Rc<Self>,
        params: event_sink::EventParams,
        _: event_sink::EventResults,
    ) -> Result<(), capnp::Error> {
        let e = Event::decode(params.get()?.get_event()?)
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        (self.on_event)(&e).map_err(|e| capnp::Error::failed(e.to_string()))
    }
}
