//! A cluster on this machine: a control node and agents started as real child processes
//! (through [`prescient::launch`]), for `prescient demo` and `prescient bench`.

use anyhow::{bail, Result};
pub use prescient::launch::Proc;
use prescient::launch::{self, Binaries, AGENT_READY, CONTROL_READY};
use std::path::Path;

pub struct LocalCluster {
    pub control: Proc,
    pub agents: Vec<Proc>,
}

impl LocalCluster {
    pub fn start_control(dir: &Path, grace_ms: u64) -> Result<Proc> {
        let mut cmd = Binaries::siblings()?.control("127.0.0.1:0", &dir.join("control"));
        cmd.args(["--startup-grace-ms", &grace_ms.to_string()]);
        Ok(launch::start(
            cmd,
            &dir.join("control.log"),
            CONTROL_READY,
            "control",
        )?)
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
        let mut cmd = Binaries::siblings()?.agent(control, name, cpus);
        if !probes {
            cmd.arg("--no-probes");
        }
        if !spans {
            cmd.arg("--no-telemetry");
        }
        cmd.args(["--data-plane", data_plane, "--data-dir"])
            .arg(dir.join(name));
        Ok(launch::start(
            cmd,
            &dir.join(format!("{name}.log")),
            AGENT_READY,
            name,
        )?)
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
