//! Starting Prescient's daemons as real child processes on this machine: the one launcher that
//! `prescient demo`, `prescient bench` and the integration tests use.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use thiserror::Error;

/// Why a daemon did not start.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("{name} is missing at {path}: build every binary first (`cargo build --release --bins`, or run `cargo xtask demo`)")]
    Missing { name: String, path: PathBuf },
    #[error("starting {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} did not start (its first line was {line:?}); see {log}")]
    NotStarted {
        name: String,
        line: String,
        log: PathBuf,
    },
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test or an
/// interrupted benchmark leaves nothing running.
pub struct Proc {
    pub child: Child,
    /// The address its ready line names.
    pub addr: String,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    /// SIGKILL: no chance to flush or shut down cleanly.
    pub fn kill9(&mut self) -> std::io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(|_| ())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the daemons' binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub control: PathBuf,
    pub agent: PathBuf,
}

impl Binaries {
    /// Beside the running executable (how the CLI finds them).
    pub fn siblings() -> Result<Binaries, LaunchError> {
        let exe = std::env::current_exe().map_err(|source| LaunchError::Spawn {
            name: "prescient".into(),
            source,
        })?;
        let find = |name: &str| {
            let path = exe.with_file_name(name);
            if path.exists() {
                Ok(path)
            } else {
                Err(LaunchError::Missing {
                    name: name.into(),
                    path,
                })
            }
        };
        Ok(Binaries {
            control: find("prescient-control")?,
            agent: find("prescient-agent")?,
        })
    }

    /// A control node on `listen` keeping its state in `data_dir`.
    pub fn control(&self, listen: &str, data_dir: &Path) -> Command {
        let mut cmd = Command::new(&self.control);
        cmd.args(["--listen", listen, "--data-dir"]).arg(data_dir);
        cmd
    }

    /// An agent named `name` offering `cpus` CPUs and 4 GiB, its ingress on an ephemeral port.
    pub fn agent(&self, control: &str, name: &str, cpus: u32) -> Command {
        let mut cmd = Command::new(&self.agent);
        cmd.args(["--control", control, "--listen", "127.0.0.1:0"])
            .args([
                "--name",
                name,
                "--cpus",
                &cpus.to_string(),
                "--memory",
                "4GiB",
            ]);
        cmd
    }
}

/// The ready line each daemon prints first; the address is its last word.
pub const CONTROL_READY: &str = "prescient-control listening on ";
pub const AGENT_READY: &str = "prescient-agent ";

/// Starts `cmd` with its stderr appended to `log` and waits for its ready line (`prefix`).
pub fn start(mut cmd: Command, log: &Path, prefix: &str, name: &str) -> Result<Proc, LaunchError> {
    let spawn = |source| LaunchError::Spawn {
        name: name.to_string(),
        source,
    };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(spawn)?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(spawn)?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line).map_err(spawn)?;
    }
    let Some(rest) = line.trim().strip_prefix(prefix) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(LaunchError::NotStarted {
            name: name.to_string(),
            line,
            log: log.to_path_buf(),
        });
    };
    let addr = rest.rsplit(' ').next().unwrap_or(rest).to_string();
    Ok(Proc {
        child,
        addr,
        name: name.to_string(),
        log: log.to_path_buf(),
    })
}
