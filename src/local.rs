//! A cluster on this machine: a control node and agents started as real child processes, for
//! `prescient demo` and `prescient bench`.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name(name);
    if !bin.exists() {
        bail!(
            "{} is missing: build every binary first (`cargo build --release --bins`, or run `cargo xtask demo`)",
            bin.display()
        );
    }
    Ok(bin)
}

pub fn start(mut cmd: Command, log: &Path, prefix: &str, name: &str) -> Result<Proc> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let Some(rest) = line.trim().strip_prefix(prefix) else {
        let _ = child.kill();
        bail!("{name} did not start; see {}", log.display());
    };
    let addr = rest.rsplit(' ').next().unwrap_or(rest).to_string();
    Ok(Proc {
        child,
        addr,
        name: name.to_string(),
    })
}

pub struct LocalCluster {
    pub control: Proc,
    pub agents: Vec<Proc>,
}

impl LocalCluster {
    pub fn start_control(dir: &Path, grace_ms: u64) -> Result<Proc> {
        let mut cmd = Command::new(sibling("prescient-control")?);
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("control"))
            .args(["--startup-grace-ms", &grace_ms.to_string()]);
        start(
            cmd,
            &dir.join("control.log"),
            "prescient-control listening on ",
            "control",
        )
    }

    pub fn start_agent(
        dir: &Path,
        control: &str,
        name: &str,
        cpus: u32,
        data_plane: &str,
        spans: bool,
        probes: bool,
    ) -> Result<Proc> {
        let mut cmd = Command::new(sibling("prescient-agent")?);
        if !probes {
            cmd.arg("--no-probes");
        }
        if !spans {
            cmd.arg("--no-telemetry");
        }
        cmd.args(["--data-plane", data_plane])
            .args([
                "--control",
                control,
                "--listen",
                "127.0.0.1:0",
                "--name",
                name,
            ])
            .args([
                "--cpus",
                &cpus.to_string(),
                "--memory",
                "4GiB",
                "--data-dir",
            ])
            .arg(dir.join(name));
        start(
            cmd,
            &dir.join(format!("{name}.log")),
            "prescient-agent ",
            name,
        )
    }

    /// Starts a control node and `agents` agents named a1, a2, ... each offering `cpus` CPUs,
    /// their workers on `data_plane` (auto, epoll or io_uring). Only the first agent loads the
    /// eBPF probes: they see the whole machine, and a real host has one agent.
    pub fn start(
        dir: &Path,
        agents: usize,
        cpus: u32,
        data_plane: &str,
        telemetry: Telemetry,
    ) -> Result<LocalCluster> {
        std::fs::create_dir_all(dir)?;
        let control = Self::start_control(dir, 300)?;
        let mut procs = Vec::new();
        for i in 1..=agents {
            procs.push(Self::start_agent(
                dir,
                &control.addr,
                &format!("a{i}"),
                cpus,
                data_plane,
                telemetry.spans(),
                telemetry.probes() && i == 1,
            )?);
        }
        Ok(LocalCluster {
            control,
            agents: procs,
        })
    }
}

/// What a local cluster measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Telemetry {
    /// Per-request spans and the eBPF probes.
    All,
    /// Spans without the probes.
    SpansOnly,
    /// The probes without spans.
    ProbesOnly,
    /// Neither (host and VM samples stay on): the reference for what telemetry costs.
    Off,
}

impl Telemetry {
    pub fn spans(self) -> bool {
        matches!(self, Telemetry::All | Telemetry::SpansOnly)
    }

    pub fn probes(self) -> bool {
        matches!(self, Telemetry::All | Telemetry::ProbesOnly)
    }

    pub fn name(self) -> &'static str {
        match self {
            Telemetry::All => "all",
            Telemetry::SpansOnly => "spans",
            Telemetry::ProbesOnly => "probes",
            Telemetry::Off => "off",
        }
    }
}

/// Waits until every task of `graph_id` has a ready replica and every agent holds the table.
pub async fn wait_deployed(
    client: &crate::client::ControlClient,
    graph_id: &str,
    tasks: usize,
    timeout: std::time::Duration,
) -> Result<u64> {
    let until = std::time::Instant::now() + timeout;
    loop {
        let (epoch, replicas) = client.replicas(graph_id).await?;
        let mut ready: Vec<&str> = replicas
            .iter()
            .filter(|r| r.state == "ready")
            .map(|r| r.task.as_str())
            .collect();
        ready.sort();
        ready.dedup();
        if ready.len() >= tasks && epoch > 0 {
            // Tables reach agents right after the epoch is bumped; give them a moment.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            return Ok(epoch);
        }
        if std::time::Instant::now() > until {
            bail!(
                "graph {graph_id} not deployed after {timeout:?}: {} of {tasks} tasks ready",
                ready.len()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
