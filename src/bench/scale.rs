//! `bench scale`: one task that serves one execution at a time (`max_concurrency = 1`, a
//! `sleep` kernel, so capacity grows with replicas even on two cores) under open-loop load that
//! ramps from 0.5× to 8× one replica's capacity and back. Reports, per phase, the replicas the
//! utilisation needs against those that served, how long the controller took to get there,
//! latency and the share of invocations within the objective; then how long scale-in took.

use super::*;
use crate::load;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

/// Load steps, as multiples of one replica's capacity.
const RAMP: [f64; 9] = [0.5, 1.0, 2.0, 4.0, 8.0, 4.0, 2.0, 1.0, 0.5];
const TARGET: f64 = 0.7;
const MAX_REPLICAS: u32 = 12;

fn graph(service_ms: u64) -> String {
    format!(
        r#"name = "bench-scale"
[[task]]
id = "work"
code = {{ builtin = "sleep", params = {{ mean = "{service_ms}ms" }} }}
inputs = {{ x = "bytes" }}
outputs = {{ y = "bytes" }}
estimate = "{service_ms}ms"

[scaling]
max_replicas = {MAX_REPLICAS}
target_utilisation = {TARGET}
max_concurrency = 1
window = "2s"
scale_out_cooldown = "2s"
scale_in_cooldown = "6s"
"#
    )
}

/// (seconds since the ramp began, ready replicas, all replicas).
type Samples = Rc<RefCell<Vec<(f64, u32, u32)>>>;

pub(super) async fn scale(phase_s: f64, service_ms: u64) -> Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("prescient-bench-scale-{}", std::process::id()));
    let cluster = LocalCluster::start(&dir, 3, 2, "epoll", Telemetry::SpansOnly)?;
    let result = run_ramp(&cluster, phase_s, service_ms.max(1)).await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_ramp(
    cluster: &LocalCluster,
    phase_s: f64,
    service_ms: u64,
) -> Result<serde_json::Value> {
    let client = connect_registered(cluster).await?;
    let f = file::parse("bench-scale.toml", &graph(service_ms))?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the bench graph was rejected");
    };
    let id = record.id.clone();
    wait_deployed(&client, &id, 1, Duration::from_secs(30)).await?;

    let started = Instant::now();
    let samples: Samples = Rc::default();
    let sampler = {
        let (samples, id) = (samples.clone(), id.clone());
        let watcher = ControlClient::connect(&cluster.control.addr).await?;
        tokio::task::spawn_local(async move {
            loop {
                if let Ok((_, r)) = watcher.replicas(&id).await {
                    let ready = r.iter().filter(|r| r.state == "ready").count() as u32;
                    samples.borrow_mut().push((
                        started.elapsed().as_secs_f64(),
                        ready,
                        r.len() as u32,
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let capacity = 1000.0 / service_ms as f64;
    let objective_us = service_ms * 5 * 1000;
    let ingresses: Vec<String> = cluster.agents.iter().map(|a| a.addr.clone()).collect();
    let mut phases = Vec::new();
    let mut failed = 0;
    for m in RAMP {
        let rate = m * capacity;
        let from = started.elapsed().as_secs_f64();
        let report = load::run(
            load::Spec {
                graph: id.clone(),
                mode: load::Mode::Open { rate },
                duration: Duration::from_secs_f64(phase_s),
                payload: bytes::Bytes::from_static(b"x"),
                deadline_ms: 10_000,
                ingresses: ingresses.clone(),
                objective_us: Some(objective_us),
            },
            false,
        )
        .await?;
        let to = started.elapsed().as_secs_f64();
        failed += report.errors;
        let needed = ((rate * service_ms as f64 / 1000.0) / TARGET)
            .ceil()
            .clamp(1.0, f64::from(MAX_REPLICAS)) as u32;
        let s = samples.borrow();
        let in_phase: Vec<&(f64, u32, u32)> =
            s.iter().filter(|(t, ..)| *t >= from && *t <= to).collect();
        let reached = in_phase.iter().find(|(_, ready, _)| *ready >= needed);
        phases.push(serde_json::json!({
            "load_x_capacity": m,
            "rate": rate,
            "replicas_needed": needed,
            "replicas_at_end": in_phase.last().map(|(_, r, _)| *r),
            "replicas_max": in_phase.iter().map(|(_, r, _)| *r).max(),
            "reaction_s": reached.map(|(t, ..)| ((t - from) * 10.0).round() / 10.0),
            "p50_us": report.p50_us,
            "p99_us": report.p99_us,
            "within_objective": report.within_objective,
            "errors": report.errors,
        }));
    }
    // The load is gone: how long until the extras are retired.
    let idle_from = started.elapsed().as_secs_f64();
    let until = Instant::now() + Duration::from_secs(90);
    let retired_after_s = loop {
        let (_, r) = client.replicas(&id).await?;
        if r.len() <= 1 {
            break Some(((started.elapsed().as_secs_f64() - idle_from) * 10.0).round() / 10.0);
        }
        if Instant::now() > until {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    sampler.abort();
    let decisions: Vec<serde_json::Value> = client
        .events(0, 10_000)
        .await?
        .into_iter()
        .filter(|e| e.kind.starts_with("scale"))
        .map(|e| serde_json::json!({ "at_ms": e.at_ms, "kind": e.kind, "subject": e.subject, "reason": e.reason }))
        .collect();
    let timeline: Vec<serde_json::Value> = samples
        .borrow()
        .iter()
        .step_by(4)
        .map(|(t, ready, all)| serde_json::json!([(*t * 10.0).round() / 10.0, ready, all]))
        .collect();
    Ok(serde_json::json!({
        "bench": "scale",
        "service_ms": service_ms,
        "one_replica_capacity_per_s": capacity,
        "target_utilisation": TARGET,
        "objective_us": objective_us,
        "phase_seconds": phase_s,
        "phases": phases,
        "failed": failed,
        "retired_after_load_s": retired_after_s,
        "decisions": decisions,
        "timeline_s_ready_all": timeline,
    }))
}
