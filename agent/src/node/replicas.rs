//! The replicas an agent runs: provisioning them (artifact fetched and verified first),
//! their exits, retirement, routing tables, and the `Agent` capability control drives it by.

use super::*;
use crate::provision::{Provisioner, VmSpec};
use crate::request_path::routes::GraphRoutes;
use capnp::capability::Rc as CapRc;
use prescient_schemas::agent_capnp::{agent, worker_command};
use prescient_schemas::codec;
use prescient_schemas::codec::text;
use std::rc::Rc;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Why a replica could not be provisioned here (control records it as the replica's failure).
#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error("malformed request: {0}")]
    Wire(#[from] capnp::Error),
    #[error("malformed graph: {0}")]
    Graph(#[from] codec::DecodeError),
    #[error("graph {graph} has no task {task:?}")]
    NoTask { graph: String, task: String },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("replica {replica} on {host}: {source}")]
    Provision {
        replica: String,
        host: String,
        source: crate::provision::ProvisionError,
    },
    #[error(transparent)]
    Routes(#[from] crate::request_path::routes::RoutesError),
}

/// Why an artifact could not be fetched into the local cache.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("{doing} {path}: {source}")]
    Io {
        doing: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("not connected to the control node, which holds the artifacts")]
    NotConnected,
    #[error("{}", .0.extra)]
    Control(capnp::Error),
    #[error(transparent)]
    Verify(#[from] crate::runtime::exec::ArtifactError),
}

fn io(doing: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io {
        doing,
        path,
        source,
    }
}

impl AgentNode {
    pub(super) async fn provision(
        self: &Rc<Self>,
        spec: prescient_schemas::agent_capnp::replica_spec::Reader<'_>,
    ) -> Result<
        (
            String,
            crate::warmup::Warmup,
            Option<(&'static str, std::time::Duration)>,
            Option<std::time::Duration>,
        ),
        ReplicaError,
    > {
        let replica = text(spec.get_replica())?;
        let task = text(spec.get_task())?;
        if let Some(r) = self.replicas.borrow().get(&replica) {
            return Ok((r.addr.clone(), Default::default(), None, None));
        }
        let record = codec::decode_record(spec.get_graph()?)?;
        let t = record
            .graph
            .task(&task)
            .ok_or_else(|| ReplicaError::NoTask {
                graph: record.id.clone(),
                task: task.clone(),
            })?;
        let local = match &t.code.kind {
            prescient_schemas::CodeKind::Exec { sha256, .. }
            | prescient_schemas::CodeKind::Onnx { sha256, .. } => {
                Some((sha256.hex(), self.fetch_artifact(sha256).await?))
            }
            _ => None,
        };
        // A VM cannot read the agent's copy: it is sent over the channel first, in pieces,
        // and the worker checks its digest at deploy as it does this copy's.
        let mut deploy = Vec::new();
        let artifact_path = match local {
            Some((hex, path)) if self.provisioner.sends_artifacts() => {
                let bytes = std::fs::read(&path).map_err(io("reading", &path))?;
                for piece in bytes.chunks(ARTIFACT_PIECE) {
                    let mut m = capnp::message::Builder::new_default();
                    let mut a = m.init_root::<worker_command::Builder<'_>>().init_artifact();
                    a.set_sha256_hex(hex.as_str());
                    a.set_data(piece);
                    deploy.extend(capnp::serialize::write_message_to_words(&m));
                }
                format!("{}/{hex}", crate::worker::SENT_ARTIFACTS)
            }
            Some((_, path)) => path.display().to_string(),
            None => String::new(),
        };
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut d = msg.init_root::<worker_command::Builder<'_>>().init_deploy();
            d.set_replica(replica.as_str());
            d.set_task(task.as_str());
            d.set_graph(spec.get_graph()?)?;
            d.set_artifact_path(artifact_path.as_str());
            d.set_warmup(spec.get_warmup()?)?;
            d.set_warmup_target_ns(spec.get_warmup_target_ns());
            d.set_warmup_timeout_ns(spec.get_warmup_timeout_ns());
        }
        deploy.extend(capnp::serialize::write_message_to_words(&msg));
        let started = std::time::Instant::now();
        let vm = self
            .provisioner
            .provision(VmSpec {
                replica: replica.clone(),
                resources: t.resources,
                deploy,
            })
            .await
            .map_err(|source| ReplicaError::Provision {
                replica: replica.clone(),
                host: self.config.name.clone(),
                source,
            })?;
        info!(%replica, %task, addr = %vm.data_plane_addr, took = ?started.elapsed(), warmup = ?vm.warmup, "replica ready");
        let (warmup, started, deployed) = (vm.warmup, vm.started, vm.deploy);
        let pid = vm.instance.pid();
        // Counted from its first switch, not from the next per-second sample.
        if let (Some(probes), Some(pid)) = (&self.probes, pid) {
            probes.join(&replica, pid);
        }
        let crate::provision::Vm {
            data_plane_addr,
            warmup: _,
            mut instance,
            commands: mut stdin,
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
                how = instance.wait() => how,
                _ = kill_rx => {
                    // The receiver ends when its sender is dropped too; either way, stop.
                    instance.kill().await;
                    drop(cgroup);
                    return;
                }
            };
            drop(cgroup);
            node.replica_exited(&replica, reason).await;
        });
        Ok((data_plane_addr, warmup, started, deployed))
    }

    /// A verified local copy of an artifact, fetched from the control node when missing.
    pub(super) async fn fetch_artifact(
        &self,
        digest: &prescient_schemas::Digest,
    ) -> Result<std::path::PathBuf, FetchError> {
        let dir = self.config.data_dir.join("artifacts");
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let path = dir.join(digest.hex());
        if path.exists() && crate::runtime::exec::verify(&path, digest).is_ok() {
            return Ok(path);
        }
        let control = self
            .control
            .borrow()
            .clone()
            .ok_or(FetchError::NotConnected)?;
        let tmp = dir.join(format!(".fetch-{}", digest.hex()));
        let mut out = Vec::new();
        loop {
            let mut req = control.read_artifact_request();
            req.get().set_sha256(&digest.0);
            req.get().set_offset(out.len() as u64);
            req.get().set_length(4 << 20);
            let reply = req.send().promise.await.map_err(FetchError::Control)?;
            let r = reply.get().map_err(FetchError::Control)?;
            let chunk = r.get_data().map_err(FetchError::Control)?;
            out.extend_from_slice(chunk);
            if chunk.is_empty() || out.len() as u64 >= r.get_size() {
                break;
            }
        }
        std::fs::write(&tmp, &out).map_err(io("writing", &tmp))?;
        if let Err(e) = crate::runtime::exec::verify(&tmp, digest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))
                .map_err(io("making executable", &tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io("storing", &path))?;
        info!(artifact = %digest, bytes = out.len(), "artifact fetched and verified");
        Ok(path)
    }

    pub(super) async fn replica_exited(&self, replica: &str, reason: String) {
        if !self.replicas.borrow().contains_key(replica) {
            // Retired: it drained and exited, as it was told to.
            info!(%replica, "retired replica drained: {reason}");
            return;
        }
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

    /// Retires a replica gracefully: its worker is told to drain (finish what it has accepted
    /// and see its outputs acknowledged downstream, then exit); one still running after
    /// `RETIRE_TIMEOUT` is killed.
    pub(super) fn retire(&self, replica: &str) {
        let Some(mut r) = self.replicas.borrow_mut().remove(replica) else {
            return;
        };
        info!(%replica, "retiring replica: draining its worker");
        let mut msg = capnp::message::Builder::new_default();
        msg.init_root::<worker_command::Builder<'_>>().set_drain(());
        let drained = r
            .commands
            .send(Rc::new(capnp::serialize::write_message_to_words(&msg)))
            .is_ok();
        let Some(kill) = r.kill.take() else {
            return;
        };
        if !drained {
            let _ = kill.send(());
            return;
        }
        let replica = replica.to_string();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(RETIRE_TIMEOUT).await;
            if kill.send(()).is_ok() {
                warn!(%replica, "the retired worker did not drain within {RETIRE_TIMEOUT:?}: killed");
            }
        });
    }

    pub(super) fn set_routes(
        &self,
        table: prescient_schemas::agent_capnp::routing_table::Reader<'_>,
    ) -> Result<(), ReplicaError> {
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
            .set_routes(table)?;
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

    pub(super) fn remove_graph(&self, graph_id: &str) {
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

/// An artifact goes to a VM in pieces of this size (a capnp message each).
const ARTIFACT_PIECE: usize = 1 << 20;

/// The capability control drives this agent through.
pub(super) struct AgentCap {
    pub(super) node: Rc<AgentNode>,
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
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let (addr, warmup, started, deployed) = addr;
        let mut r = results.get();
        if let Some((how, took)) = started {
            r.set_vm_start(how);
            r.set_vm_start_ns(took.as_nanos() as u64);
        }
        if let Some(d) = deployed {
            r.set_vm_deploy_ns(d.as_nanos() as u64);
        }
        r.set_data_plane_addr(addr.as_str());
        r.set_warmup_ns(warmup.elapsed.as_nanos() as u64);
        r.set_warmup_executions(warmup.executions);
        r.set_warmup_stable(warmup.stable);
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
            .map_err(|e| capnp::Error::failed(e.to_string()))
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

    async fn set_warm_pool(
        self: CapRc<Self>,
        params: agent::SetWarmPoolParams,
        _: agent::SetWarmPoolResults,
    ) -> Result<(), capnp::Error> {
        let mut keep = Vec::new();
        for w in params.get()?.get_shapes()? {
            keep.push(crate::provision::pool::Keep {
                shape: (w.get_cpu_millicores(), w.get_memory_bytes()),
                // At most what any task may have (the control node's bound): a hostile or
                // broken message cannot order unbounded VMs.
                count: w.get_count().min(prescient_schemas::scaling::MAX_REPLICAS),
            });
        }
        self.node.set_warm_pool(keep);
        Ok(())
    }
}
