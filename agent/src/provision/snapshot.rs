//! Snapshot restore: per VM shape (vCPUs, memory), a booted, idle guest (its init waiting for
//! the agent on the channel) is saved once per agent with QEMU's migration to a file; later VMs
//! of that shape start from it with `-incoming` instead of booting, the way Firecracker's
//! snapshots and REAP cut cold starts. Also the QMP calls the provisioner makes.

use super::qemu::{console_tail, GuestNotUp, Machine};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A VM shape: vCPUs and memory (MiB). Only a snapshot of the same shape restores.
pub type Shape = (u32, u64);

enum State {
    Making,
    Ready(PathBuf),
    Failed,
}

/// The snapshots of one agent, by shape.
#[derive(Clone)]
pub struct Snapshots {
    dir: PathBuf,
    states: Rc<RefCell<HashMap<Shape, State>>>,
}

/// Runs one QMP command on a fresh connection to `socket`.
pub async fn qmp<C>(socket: &Path, command: C) -> std::io::Result<C::Ok>
where
    C: qapi::qmp::QmpCommand,
{
    let mut stream = qapi::futures::QmpStreamTokio::open_uds(socket)
        .await?
        .negotiate()
        .await?;
    stream.execute(command).await.map_err(std::io::Error::other)
}

/// The VM's run state as QMP names it (`running`, `paused`, `inmigrate`, `shutdown`, ...).
pub async fn status(socket: &Path) -> std::io::Result<String> {
    let s = qmp(socket, qapi::qmp::query_status {}).await?;
    Ok(format!("{:?}", s.status).to_lowercase())
}

/// Waits until a VM started with `-incoming` has loaded its snapshot, then resumes it. QMP
/// only answers once QEMU listens; during the load the monitor is busy.
pub async fn resume_restored(socket: &Path, limit: Duration) -> std::io::Result<()> {
    let until = Instant::now() + limit;
    loop {
        if let Ok(s) = status(socket).await {
            match s.as_str() {
                "paused" | "postmigrate" => {
                    qmp(socket, qapi::qmp::cont {}).await?;
                    return Ok(());
                }
                "running" => return Ok(()),
                _ => {}
            }
        }
        if Instant::now() > until {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the snapshot was not loaded within {limit:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Snapshots {
    /// Snapshots kept in `dir` (emptied: one from an earlier agent may not match this image).
    pub fn new(dir: PathBuf) -> Snapshots {
        let _ = std::fs::remove_dir_all(&dir);
        Snapshots {
            dir,
            states: Rc::default(),
        }
    }

    /// The snapshot of `shape`, once made.
    pub fn ready(&self, shape: Shape) -> Option<PathBuf> {
        match self.states.borrow().get(&shape) {
            Some(State::Ready(p)) => Some(p.clone()),
            _ => None,
        }
    }

    /// Starts making the snapshot of `machine`'s shape in the background, unless one is made,
    /// being made, or failed before (said once in the log).
    pub fn make(&self, qemu: PathBuf, machine: Machine) {
        let shape = (machine.vcpus, machine.memory_mib);
        if self.states.borrow().contains_key(&shape) {
            return;
        }
        self.states.borrow_mut().insert(shape, State::Making);
        let (states, dir) = (self.states.clone(), self.dir.clone());
        tokio::task::spawn_local(async move {
            let path = dir.join(format!("{}cpu-{}mib.bin", shape.0, shape.1));
            let started = Instant::now();
            let made = save(&qemu, &machine, &path).await;
            let state = match made {
                Ok(bytes) => {
                    info!(vcpus = shape.0, memory_mib = shape.1, bytes, took = ?started.elapsed(), "VM snapshot saved: later VMs of this shape restore from it");
                    State::Ready(path)
                }
                Err(e) => {
                    warn!(
                        vcpus = shape.0,
                        memory_mib = shape.1,
                        "no VM snapshot, VMs of this shape boot: {e}"
                    );
                    State::Failed
                }
            };
            states.borrow_mut().insert(shape, state);
        });
    }
}

/// Why a snapshot could not be saved (its VMs then boot).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the template guest stopped ({0}): {1}")]
    TemplateStopped(String, String),
    #[error("the template guest did not start within 60 s")]
    TemplateTimeout,
    #[error("QMP {0}: {1}")]
    Qmp(&'static str, std::io::Error),
    #[error("the migration to a file ended {0}")]
    Migration(String),
}

/// Boots `machine`, waits for its init to wait on the channel, stops it and migrates it to
/// `path`. Returns the file's size.
async fn save(qemu: &Path, machine: &Machine, path: &Path) -> Result<u64, SnapshotError> {
    let dir = machine.qmp.with_file_name("");
    std::fs::create_dir_all(&dir)?;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args(machine.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    super::qemu::die_with_parent(&mut cmd);
    let mut child = cmd.spawn()?;
    let result = async {
        match super::qemu::wait_for_init(&mut child, &machine.console, Duration::from_secs(60))
            .await
        {
            Ok(_) => {}
            Err(GuestNotUp::Exited(s)) => {
                return Err(SnapshotError::TemplateStopped(
                    s.to_string(),
                    console_tail(&machine.console),
                ))
            }
            Err(GuestNotUp::Timeout) => return Err(SnapshotError::TemplateTimeout),
        }
        // A stopped guest saves consistently; restored VMs are resumed (`cont`).
        let tmp = path.with_extension("tmp");
        qmp(&machine.qmp, qapi::qmp::stop {})
            .await
            .map_err(|e| SnapshotError::Qmp("stop", e))?;
        qmp(
            &machine.qmp,
            qapi::qmp::migrate {
                uri: Some(format!("file:{}", tmp.display())),
                channels: None,
                detach: None,
                resume: None,
            },
        )
        .await
        .map_err(|e| SnapshotError::Qmp("migrate", e))?;
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let m = qmp(&machine.qmp, qapi::qmp::query_migrate {})
                .await
                .map_err(|e| SnapshotError::Qmp("query-migrate", e))?;
            let status = format!("{:?}", m.status).to_lowercase();
            if status.contains("completed") {
                break;
            }
            if status.contains("failed") || status.contains("cancel") || Instant::now() > until {
                return Err(SnapshotError::Migration(status));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::rename(&tmp, path)?;
        Ok(std::fs::metadata(path)?.len())
    }
    .await;
    let _ = qmp(&machine.qmp, qapi::qmp::quit {}).await;
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}
