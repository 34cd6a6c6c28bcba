//! Provisioners turn "run a replica of this task with these resources" into a running, warm
//! worker. The `process` backend (the embedded default) starts a worker process in its own cgroup;
//! the `qemu` backend ([`qemu`]) boots a microVM running the same worker.
//!
//! The trait is shaped for VMs: provisioning takes seconds and is awaited; resources are given
//! whole at creation; the worker is told what to run after it boots and answers when warm.

pub mod cgroup;
pub mod pool;
pub mod qemu;
pub mod snapshot;
pub mod vfio;

use crate::provision::cgroup::{Cgroup, Hierarchy};
use prescient_schemas::Resources;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::Child;
use tracing::{info, warn};

/// Why a replica could not be provisioned.
#[derive(Debug, Error)]
pub enum ProvisionError {
    /// The worker could not be started.
    #[error("starting the worker: {0}")]
    Spawn(std::io::Error),
    /// The worker did not report ready in time.
    #[error("the worker did not become ready within {0:?}")]
    Timeout(Duration),
    /// The worker refused the task (e.g. unknown kernel) or exited during start-up.
    #[error("the worker failed to start the task: {0}")]
    Refused(String),
    /// The worker could not be reached after starting.
    #[error("talking to the worker: {0}")]
    Io(std::io::Error),
}

/// What one replica needs.
pub struct VmSpec {
    pub replica: String,
    pub resources: Resources,
    /// An encoded `WorkerCommand` (deploy) for the worker.
    pub deploy: Vec<u8>,
}

/// A running, warm worker.
pub struct Vm {
    pub replica: String,
    pub data_plane_addr: String,
    /// What its warm-up did before it said it was ready.
    pub warmup: crate::warmup::Warmup,
    pub instance: Instance,
    /// A VM's start: how (`booted` or `restored` from a snapshot) and how long to running.
    pub started: Option<(&'static str, Duration)>,
    /// A VM's deploy: from its guest up to its task deployed (warm-up apart).
    pub deploy: Option<Duration>,
    /// Encoded `WorkerCommand` messages go here (a pipe, or a VM's channel).
    pub commands: Pin<Box<dyn AsyncWrite>>,
    /// The worker's telemetry batches (`TelemetryBatch` messages) come from here (what was
    /// read past the ready line included).
    pub telemetry: Pin<Box<dyn AsyncRead>>,
    pub cgroup: Option<Cgroup>,
}

/// What runs a worker: its process, or the QEMU whose guest runs it.
pub enum Instance {
    Process(Child),
    Qemu(qemu::QemuVm),
}

impl Instance {
    /// The host process (for probes and `ps`): the worker, or its QEMU.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Instance::Process(c) => c.id(),
            Instance::Qemu(vm) => vm.child.id(),
        }
    }

    /// Waits for it to end; says how.
    pub async fn wait(&mut self) -> String {
        match self {
            Instance::Process(c) => match c.wait().await {
                Ok(s) => format!("worker exited: {s}"),
                Err(e) => format!("worker lost: {e}"),
            },
            Instance::Qemu(vm) => {
                let how = match vm.child.wait().await {
                    Ok(s) => format!("the VM stopped ({s}); console: {}", vm.console_tail()),
                    Err(e) => format!("the VM was lost: {e}"),
                };
                let _ = std::fs::remove_dir_all(&vm.dir);
                how
            }
        }
    }

    /// Ends it now: a process is killed; a VM is stopped over QMP, and killed if it lingers.
    pub async fn kill(&mut self) {
        match self {
            Instance::Process(c) => {
                let _ = c.kill().await;
            }
            Instance::Qemu(vm) => {
                vm.stop(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Reads a worker's ready line: `prescient-worker ready ADDR warmup NS EXECUTIONS STABLE`
/// (older workers: `ADDR` alone), or why it failed.
pub fn parse_ready(line: &str) -> Result<(String, crate::warmup::Warmup), ProvisionError> {
    let line = line.trim();
    let Some(addr) = line.strip_prefix("prescient-worker ready ") else {
        let why = line
            .strip_prefix("prescient-worker failed: ")
            .unwrap_or(if line.is_empty() {
                "exited before it was ready"
            } else {
                line
            });
        return Err(ProvisionError::Refused(why.to_string()));
    };
    let mut words = addr.split_whitespace();
    let addr = words.next().unwrap_or_default().to_string();
    let warmup = match (words.next(), words.next(), words.next(), words.next()) {
        (Some("warmup"), Some(ns), Some(n), Some(stable)) => crate::warmup::Warmup {
            elapsed: Duration::from_nanos(ns.parse().unwrap_or(0)),
            executions: n.parse().unwrap_or(0),
            stable: stable == "true",
        },
        _ => crate::warmup::Warmup::default(),
    };
    Ok((addr, warmup))
}

pub trait Provisioner {
    /// `process` or `qemu`, reported to control.
    fn kind(&self) -> &'static str;
    /// Starts a VM for one replica, deploys the task, and returns once it is warm.
    fn provision(
        &self,
        spec: VmSpec,
    ) -> impl std::future::Future<Output = Result<Vm, ProvisionError>>;
}

/// Worker processes in cgroups on this host.
pub struct ProcessProvisioner {
    /// The binary with the `worker` subcommand (the agent itself).
    pub exe: PathBuf,
    pub host: String,
    /// Address workers bind their data plane on (port 0).
    pub bind_ip: std::net::IpAddr,
    pub cgroups: Option<Hierarchy>,
    pub ready_timeout: Duration,
    pub data_plane: crate::dataplane::Transport,
    /// Whether workers record per-request spans.
    pub telemetry: bool,
}

impl ProcessProvisioner {
    pub fn new(exe: PathBuf, host: String, bind_ip: std::net::IpAddr) -> ProcessProvisioner {
        let cgroups = match Hierarchy::detect(std::path::Path::new("/sys/fs/cgroup"), "prescient") {
            Ok(h) => {
                info!(
                    hierarchy = h.name(),
                    "workers get cgroup CPU and memory limits"
                );
                Some(h)
            }
            Err(why) => {
                warn!("workers run without CPU or memory limits: {why}");
                None
            }
        };
        ProcessProvisioner {
            exe,
            host,
            bind_ip,
            cgroups,
            ready_timeout: Duration::from_secs(20),
            data_plane: crate::dataplane::Transport::Epoll,
            telemetry: true,
        }
    }
}

impl Provisioner for ProcessProvisioner {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn provision(&self, spec: VmSpec) -> Result<Vm, ProvisionError> {
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("worker")
            .args(["--host", &self.host])
            // Named on the command line so operators can find a replica's process.
            .args(["--replica", &spec.replica])
            .args(["--data-plane", self.data_plane.name()])
            .args(if self.telemetry {
                &[][..]
            } else {
                &["--no-telemetry"][..]
            })
            .arg("--listen")
            .arg(format!("{}:0", self.bind_ip))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(ProvisionError::Spawn)?;
        let cgroup = match (&self.cgroups, child.id()) {
            (Some(h), Some(pid)) => {
                let name = spec.replica.replace(['/', ' '], "_");
                match h
                    .create(
                        &name,
                        spec.resources.cpu_millicores,
                        spec.resources.memory_bytes,
                    )
                    .and_then(|cg| cg.add(pid).map(|()| cg))
                {
                    Ok(cg) => Some(cg),
                    Err(e) => {
                        warn!(replica = %spec.replica, "running without limits: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        stdin
            .write_all(&spec.deploy)
            .await
            .map_err(ProvisionError::Io)?;
        stdin.flush().await.map_err(ProvisionError::Io)?;
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        match tokio::time::timeout(self.ready_timeout, reader.read_line(&mut line)).await {
            Err(_) => return Err(ProvisionError::Timeout(self.ready_timeout)),
            Ok(Err(e)) => return Err(ProvisionError::Io(e)),
            Ok(Ok(_)) => {}
        }
        let (addr, warmup) = parse_ready(&line)?;
        Ok(Vm {
            replica: spec.replica,
            data_plane_addr: addr,
            warmup,
            instance: Instance::Process(child),
            started: None,
            deploy: None,
            commands: Box::pin(stdin),
            telemetry: Box::pin(reader),
            cgroup,
        })
    }
}

/// The provisioner an agent runs its replicas with.
pub enum Backend {
    Process(ProcessProvisioner),
    Qemu(Box<qemu::QemuProvisioner>),
}

impl Backend {
    /// Whether workers need the task's artifact sent to them (a VM cannot read the agent's
    /// copy).
    pub fn sends_artifacts(&self) -> bool {
        matches!(self, Backend::Qemu(_))
    }

    /// What `prescient agents` shows: `process`, or `qemu (tcg)` with the accelerator.
    pub fn description(&self) -> String {
        match self {
            Backend::Process(_) => "process".into(),
            Backend::Qemu(q) => format!("qemu ({})", q.accel.name()),
        }
    }
}

impl Provisioner for Backend {
    fn kind(&self) -> &'static str {
        match self {
            Backend::Process(p) => p.kind(),
            Backend::Qemu(q) => q.kind(),
        }
    }

    async fn provision(&self, spec: VmSpec) -> Result<Vm, ProvisionError> {
        match self {
            Backend::Process(p) => p.provision(spec).await,
            Backend::Qemu(q) => q.provision(spec).await,
        }
    }
}
