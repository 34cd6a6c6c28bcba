//! `bench predictive`: a real trace slice with a ramp (the Azure LLM conversation trace,
//! time-compressed, thinned from 10% to all of it), replayed against one task that serves one
//! execution at a time, once under reactive sizing (`[scaling.predictive] mode =
//! "forecast-only"`: the forecast runs and is told, sizing is reactive) and once with the plan
//! acting (`mode = "on"`), each on a fresh cluster of real processes with the process
//! provisioner's real lead time; rounds alternate which goes first. Per run: the share within
//! the objective, latency, failures, replica-seconds (the VM-seconds a VM per replica would
//! bill) and the most replicas, the lead time the plan used, the plan's scale-outs, and the
//! cold executions (queued past the wait budget while a replica was on its way).

use super::*;
use crate::load;
use std::time::Instant;

/// The benchmark's knobs.
pub(super) struct Plan {
    pub seconds: f64,
    pub speedup: f64,
    pub service_ms: u64,
    pub rounds: usize,
}

pub(super) async fn predictive(plan: Plan) -> Result<serde_json::Value> {
    let replay = Duration::from_secs_f64(plan.seconds.max(10.0));
    let (trace, arrivals) = crate::demo_predictive::ramped(replay, plan.speedup)?;
    let mut runs = Vec::new();
    for round in 0..plan.rounds.max(1) {
        let order = if round % 2 == 0 {
            ["forecast-only", "on"]
        } else {
            ["on", "forecast-only"]
        };
        for mode in order {
            let dir = std::env::temp_dir().join(format!(
                "prescient-bench-predictive-{}-{round}-{mode}",
                std::process::id()
            ));
            let cluster = LocalCluster::start(&dir, 3, 2, "epoll", Telemetry::SpansOnly)?;
            let r = one(&cluster, mode, plan.service_ms.max(1), &arrivals, replay).await;
            drop(cluster);
            let _ = std::fs::remove_dir_all(&dir);
            let mut r = r?;
            r["round"] = round.into();
            runs.push(r);
        }
    }
    let median = |policy: &str, key: &str| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r["policy"] == policy)
            .filter_map(|r| r[key].as_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            n => v[n / 2],
        }
    };
    let ratio = |key: &str| median("predictive", key) / median("reactive", key);
    Ok(serde_json::json!({
        "bench": "predictive",
        "trace": trace,
        "invocations": arrivals.len(),
        "seconds": replay.as_secs_f64(),
        "service_ms": plan.service_ms,
        "objective_ms": 2 * plan.service_ms,
        "runs": runs,
        "median": {
            "reactive_within_objective_pct": median("reactive", "within_objective_pct"),
            "predictive_within_objective_pct": median("predictive", "within_objective_pct"),
            "replica_seconds_predictive_over_reactive": ratio("replica_seconds"),
            "p99_predictive_over_reactive": ratio("p99_us"),
            "reactive_cold_executions": median("reactive", "cold_executions"),
            "predictive_cold_executions": median("predictive", "cold_executions"),
        },
    }))
}

async fn one(
    cluster: &LocalCluster,
    mode: &str,
    service_ms: u64,
    arrivals: &[Duration],
    replay: Duration,
) -> Result<serde_json::Value> {
    let client = connect_registered(cluster).await?;
    let text = crate::demo_predictive::graph("bench-predictive", mode, service_ms, 16);
    let f = file::parse("bench-predictive.toml", &text)?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the bench graph was rejected");
    };
    let id = record.id.clone();
    wait_deployed(&client, &id, 1, Duration::from_secs(30)).await?;
    let spec = load::Spec {
        graph: id.clone(),
        mode: load::Mode::Trace {
            arrivals: arrivals.to_vec(),
        },
        duration: replay,
        payload: bytes::Bytes::from_static(b"x"),
        deadline_ms: 10_000,
        ingresses: cluster.agents.iter().map(|a| a.addr.clone()).collect(),
        objective_us: Some(2 * service_ms * 1000),
    };
    let load = tokio::task::spawn_local(load::run(spec, false));
    // Replicas held, sampled every 250 ms: their integral is the replica-seconds.
    let started = Instant::now();
    let (mut replica_s, mut max_replicas, mut last) = (0.0, 0usize, Duration::ZERO);
    let mut held = 1usize;
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = started.elapsed();
        replica_s += held as f64 * (now - last).as_secs_f64();
        last = now;
        if let Ok((_, r)) = client.replicas(&id).await {
            held = r.len();
            max_replicas = max_replicas.max(held);
        }
    }
    let report = load.await??;
    let lead_s = client
        .forecast(&id)
        .await?
        .1
        .first()
        .and_then(|t| t["lead_s"].as_f64());
    let cold = client.stats(&id, 600).await?.cold;
    let events = client.events(0, 100_000).await?;
    let planned = events
        .iter()
        .filter(|e| e.kind == "scale-out" && e.reason.contains("the plan needs"))
        .count();
    let scale_outs = events.iter().filter(|e| e.kind == "scale-out").count();
    let told = events.iter().filter(|e| e.kind == "forecast-only").count();
    Ok(serde_json::json!({
        "policy": if mode == "on" { "predictive" } else { "reactive" },
        "mode": mode,
        "sent": report.sent,
        "failed": report.errors,
        "within_objective_pct": report.within_objective.unwrap_or(0.0) * 100.0,
        "p50_us": report.p50_us,
        "p99_us": report.p99_us,
        "replica_seconds": replica_s,
        "max_replicas": max_replicas,
        "lead_time_s": lead_s,
        "cold_executions": cold.total_executions,
        "cold_wait_s": cold.total_wait_s,
        "scale_outs": scale_outs,
        "scale_outs_by_the_plan": planned,
        "forecast_only_events": told,
    }))
}
