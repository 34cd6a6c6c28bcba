//! `bench replication`: a 3-stage CPU-bound chain with a latency objective, one stage per
//! host, under steady open-loop load; after a healthy phase the middle stage's host is slowed
//! for real (its workers' cgroup CPU quota cut to a fifth), the controller replaces the slowed
//! replica on another host and sheds it; later the load stops and extras are retired.
//! Reports the chain's p99 healthy, just after the slowdown and once recovered, how long from
//! the slowdown to the routing table with the new replica, and every decision made.

use super::*;
use crate::load;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

/// What a run measures (seconds; CPU per stage per invocation, load).
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub healthy_s: f64,
    pub degraded_s: f64,
    pub recovered_s: f64,
    pub rate: f64,
    pub burn_us: u64,
    /// The slowed host's workers keep this share of their CPU quota.
    pub quota_share: f64,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            healthy_s: 10.0,
            degraded_s: 4.0,
            recovered_s: 10.0,
            rate: 80.0,
            burn_us: 3000,
            quota_share: 0.2,
        }
    }
}

/// The chain: three `cpu_burn` stages of `burn_us` each, `cpu` each, a p99 objective of
/// 60 ms, at most 3 replicas of each.
pub(crate) fn graph(burn_us: u64, cpu: &str) -> String {
    let mut g = String::from(
        "name = \"bench-replication\"\nobjective = { percentile = 99, target = \"60ms\" }\n",
    );
    for i in 1..=3 {
        g.push_str(&format!(
            "\n[[task]]\nid = \"s{i}\"\ncode = {{ builtin = \"cpu_burn\", params = {{ us = {burn_us} }} }}\ninputs = {{ x = \"bytes\" }}\noutputs = {{ y = \"bytes\" }}\nestimate = \"{burn_us}us\"\nresources = {{ cpu = \"{cpu}\", memory = \"64MiB\" }}\n"
        ));
    }
    g.push_str(
        "\n[[edge]]\nfrom = \"s1.y\"\nto = \"s2.x\"\n\n[[edge]]\nfrom = \"s2.y\"\nto = \"s3.x\"\n",
    );
    g.push_str(
        r#"
[scaling]
max_replicas = 3
window = "6s"
detect_window = "3s"
scale_out_cooldown = "4s"
scale_in_cooldown = "10s"
"#,
    );
    g
}

/// Where a replica's CPU quota is written, v2 or v1 (as the agent's process provisioner
/// creates its groups).
fn quota_file(replica: &str) -> Option<(PathBuf, bool)> {
    let name = replica.replace(['/', ' '], "_");
    let v2 = PathBuf::from("/sys/fs/cgroup/prescient")
        .join(&name)
        .join("cpu.max");
    if v2.exists() {
        return Some((v2, true));
    }
    let v1 = PathBuf::from("/sys/fs/cgroup/cpu/prescient")
        .join(&name)
        .join("cpu.cfs_quota_us");
    v1.exists().then_some((v1, false))
}

/// Cuts one replica's CPU quota to `share` of what it is.
fn cut_quota(replica: &str, share: f64) -> Result<()> {
    let Some((path, v2)) = quota_file(replica) else {
        bail!("replica {replica} has no cgroup CPU quota to cut (cgroups need root)");
    };
    let text = std::fs::read_to_string(&path)?;
    let (quota, rest) = if v2 {
        let mut it = text.split_whitespace();
        let q = it.next().unwrap_or("max");
        let period = it.next().unwrap_or("100000").to_string();
        let q: f64 = q.parse().unwrap_or(100_000.0);
        (q, format!(" {period}"))
    } else {
        (
            text.trim().parse::<f64>().unwrap_or(100_000.0),
            String::new(),
        )
    };
    let cut = ((quota * share) as u64).max(1000);
    std::fs::write(&path, format!("{cut}{rest}"))?;
    Ok(())
}

/// Keeps every replica on `host` slowed, new ones included, until aborted.
pub(crate) fn slow_host(
    cluster_addr: String,
    graph_id: String,
    host: String,
    share: f64,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let Ok(client) = ControlClient::connect(&cluster_addr).await else {
            return;
        };
        let mut slowed = BTreeSet::new();
        loop {
            if let Ok((_, replicas)) = client.replicas(&graph_id).await {
                for r in replicas.iter().filter(|r| r.host == host) {
                    if !slowed.contains(&r.replica) && cut_quota(&r.replica, share).is_ok() {
                        slowed.insert(r.replica.clone());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

pub async fn replication(plan: Plan) -> Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!(
        "prescient-bench-replication-{}",
        std::process::id()
    ));
    let cluster = LocalCluster::start(&dir, 3, 2, "epoll", Telemetry::SpansOnly)?;
    let result = run(&cluster, plan).await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn ms(us: u64) -> f64 {
    (us as f64 / 100.0).round() / 10.0
}

async fn run(cluster: &LocalCluster, plan: Plan) -> Result<serde_json::Value> {
    let client = connect_registered(cluster).await?;
    let f = file::parse("bench-replication.toml", &graph(plan.burn_us, "1"))?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the bench graph was rejected");
    };
    let id = record.id.clone();
    wait_deployed(&client, &id, 3, Duration::from_secs(30)).await?;
    let (_, replicas) = client.replicas(&id).await?;
    let Some(victim) = replicas.iter().find(|r| r.task == "s2") else {
        bail!("no replica of s2");
    };
    let slowed_host = victim.host.clone();
    let before: BTreeSet<String> = replicas.iter().map(|r| r.replica.clone()).collect();
    let ingresses: Vec<String> = cluster.agents.iter().map(|a| a.addr.clone()).collect();
    let segment = |secs: f64| load::Spec {
        graph: id.clone(),
        mode: load::Mode::Open { rate: plan.rate },
        duration: Duration::from_secs_f64(secs),
        payload: bytes::Bytes::from_static(b"x"),
        deadline_ms: 30_000,
        ingresses: ingresses.clone(),
        objective_us: Some(60_000),
    };
    // The most replicas the graph had at once, sampled every 250 ms.
    let most = std::rc::Rc::new(std::cell::Cell::new(replicas.len()));
    let sampler = {
        let (most, id) = (most.clone(), id.clone());
        let watcher = ControlClient::connect(&cluster.control.addr).await?;
        tokio::task::spawn_local(async move {
            loop {
                if let Ok((_, r)) = watcher.replicas(&id).await {
                    most.set(most.get().max(r.len()));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut failed = 0;
    // Two seconds to warm up, then the healthy phase.
    failed += load::run(segment(2.0), false).await?.errors;
    let healthy = load::run(segment(plan.healthy_s), false).await?;
    failed += healthy.errors;

    let events_from = client.events(0, 100_000).await?.len() as u64;
    let slowed_at = Instant::now();
    let slowed_at_ms = prescient_control::clock::unix_ms();
    let slow = slow_host(
        cluster.control.addr.clone(),
        id.clone(),
        slowed_host.clone(),
        plan.quota_share,
    );
    let degraded = load::run(segment(plan.degraded_s), false).await?;
    failed += degraded.errors;
    // Load goes on until the slowed replica is shed (at most a minute).
    let mut reacting = Vec::new();
    let shed = loop {
        let events = client.events(events_from, 10_000).await?;
        if let Some(e) = events.iter().find(|e| e.kind == "shed") {
            break Some(e.clone());
        }
        if slowed_at.elapsed() > Duration::from_secs(60) {
            break None;
        }
        let r = load::run(segment(2.0), false).await?;
        failed += r.errors;
        reacting.push(r.p99_us);
    };
    let recovered = load::run(segment(plan.recovered_s), false).await?;
    failed += recovered.errors;
    let load_stopped = Instant::now();
    let replicas_when_load_stopped = client.replicas(&id).await?.1.len();

    // The routing table that first held a replica placed after the slowdown.
    let events = client.events(events_from, 10_000).await?;
    let placed_after: Vec<String> = events
        .iter()
        .filter(|e| e.kind == "replica-placed" && !before.contains(&e.subject))
        .map(|e| e.subject.clone())
        .collect();
    let serving_at_ms = events
        .iter()
        .find(|e| e.kind == "routes-published" && placed_after.iter().any(|p| e.reason.contains(p)))
        .map(|e| e.at_ms);
    let replicas_max = most.get();
    // The load is gone: how long until the graph is back to one replica per task.
    let until = Instant::now() + Duration::from_secs(90);
    let retired_after_load_s = loop {
        let (_, r) = client.replicas(&id).await?;
        if r.len() <= 3 {
            break Some((load_stopped.elapsed().as_secs_f64() * 10.0).round() / 10.0);
        }
        if Instant::now() > until {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    slow.abort();
    sampler.abort();
    let (_, end) = client.replicas(&id).await?;
    let decisions: Vec<serde_json::Value> = client
        .events(events_from, 10_000)
        .await?
        .into_iter()
        .filter(|e| crate::output::DECISIONS.contains(&e.kind.as_str()))
        .map(|e| {
            serde_json::json!({
                "after_slowdown_s": ((e.at_ms as f64 - slowed_at_ms as f64) / 100.0).round() / 10.0,
                "kind": e.kind,
                "subject": e.subject,
                "reason": e.reason,
            })
        })
        .collect();
    let detect_to_serving_s =
        serving_at_ms.map(|t| ((t as f64 - slowed_at_ms as f64) / 100.0).round() / 10.0);
    let ratio = recovered.p99_us as f64 / healthy.p99_us.max(1) as f64;
    Ok(serde_json::json!({
        "bench": "replication",
        "rate_per_s": plan.rate,
        "stage_cpu_us": plan.burn_us,
        "objective_p99_ms": 60,
        "slowed_host": slowed_host,
        "slowed_quota_share": plan.quota_share,
        "healthy_p99_us": healthy.p99_us,
        "degraded_p99_us": degraded.p99_us,
        "reacting_p99_us": reacting,
        "recovered_p99_us": recovered.p99_us,
        "recovered_over_healthy": (ratio * 100.0).round() / 100.0,
        "healthy_p50_ms": ms(healthy.p50_us),
        "recovered_p50_ms": ms(recovered.p50_us),
        "detect_to_serving_s": detect_to_serving_s,
        "shed": shed.is_some(),
        "replicas_max": replicas_max,
        "replicas_when_load_stopped": replicas_when_load_stopped,
        "retired_after_load_s": retired_after_load_s,
        "replicas_at_end": end.iter().map(|r| format!("{}@{}", r.replica, r.host)).collect::<Vec<_>>(),
        "failed": failed,
        "decisions": decisions,
        "targets": {
            "detect_to_serving_s_max": 10.0,
            "recovered_over_healthy_max": 1.5,
            "failed": 0,
        },
    }))
}
