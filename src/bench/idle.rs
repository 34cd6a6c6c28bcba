//! `bench idle`: what a deployed cluster costs with no load, telemetry on and off.

use super::*;
use crate::local::{LocalCluster, Telemetry};
use anyhow::Result;
use std::time::Duration;

pub(super) async fn idle_once(seconds: f64, telemetry: Telemetry) -> Result<(f64, f64, f64)> {
    let dir = std::env::temp_dir().join(format!("prescient-idle-{}", std::process::id()));
    let cluster = LocalCluster::start(&dir, 3, 2, "epoll", telemetry)?;
    let result = async {
        deploy_chain(&cluster, 3).await?;
        // Let start-up work (provisioning, first samples) finish before measuring.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let control = cluster.control.child.id();
        let agents: Vec<u32> = cluster.agents.iter().map(|a| a.child.id()).collect();
        let sample = || {
            (
                cpu_ticks(control),
                agents.iter().map(|&a| cpu_ticks(a)).sum::<u64>(),
            )
        };
        let before = sample();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let after = sample();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cores = |ticks: u64| ticks as f64 / hz / seconds;
        let control_cores = cores(after.0.saturating_sub(before.0));
        let agents_cores = cores(after.1.saturating_sub(before.1));
        Ok((control_cores, agents_cores, control_cores + agents_cores))
    }
    .await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub(super) async fn idle(seconds: f64, rounds: usize) -> Result<serde_json::Value> {
    let mut runs: [Vec<(f64, f64, f64)>; 2] = Default::default();
    for round in 0..rounds.max(1) {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on in order {
            let t = if on { Telemetry::All } else { Telemetry::Off };
            runs[usize::from(on)].push(idle_once(seconds, t).await?);
        }
    }
    let report = |v: &[(f64, f64, f64)]| {
        let pct = |k: fn(&(f64, f64, f64)) -> f64| {
            (median(&v.iter().map(k).collect::<Vec<_>>()) * 1e4).round() / 100.0
        };
        serde_json::json!({
            "control_percent_of_a_core": pct(|r| r.0),
            "agents_and_workers_percent_of_a_core": pct(|r| r.1),
            "total_percent_of_a_core": pct(|r| r.2),
        })
    };
    Ok(serde_json::json!({
        "bench": "idle",
        "what": "a control node, 3 agents (the first with the eBPF probes when telemetry is on) and 3 workers of a deployed 3-stage chain, no load; CPU time from /proc over the window",
        "seconds": seconds,
        "rounds": rounds,
        "telemetry_on": report(&runs[1]),
        "telemetry_off": report(&runs[0]),
    }))
}
