//! `bench hedging`: one task with three replicas whose executions are 10× slower 5% of the
//! time (the `sleep` kernel's straggler parameter), under open-loop load: the p99 without
//! stragglers (healthy), with stragglers, and with stragglers and hedged invocations, and
//! the extra executions hedging cost (measured as executions per invocation).

use super::*;
use crate::load;

/// What a run measures.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seconds: f64,
    pub rate: f64,
    pub mean_ms: u64,
    pub dist: String,
    pub straggler_p: f64,
    pub straggler_x: f64,
}

fn graph(name: &str, plan: &Plan, stragglers: bool, hedge: bool) -> String {
    let straggler = if stragglers {
        format!(
            ", straggler_p = {}, straggler_x = {}",
            plan.straggler_p, plan.straggler_x
        )
    } else {
        String::new()
    };
    format!(
        r#"name = "{name}"
[[task]]
id = "work"
code = {{ builtin = "sleep", params = {{ mean = "{}ms", dist = "{}"{straggler} }} }}
inputs = {{ x = "bytes" }}
outputs = {{ y = "bytes" }}
estimate = "{}ms"
resources = {{ cpu = "100m", memory = "64MiB" }}

[scaling]
min_replicas = 3
max_replicas = 3
max_concurrency = 1000
hedge = {hedge}
"#,
        plan.mean_ms, plan.dist, plan.mean_ms
    )
}

pub async fn hedging(plan: Plan) -> Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("prescient-bench-hedging-{}", std::process::id()));
    let cluster = LocalCluster::start(&dir, 3, 2, "epoll", Telemetry::SpansOnly)?;
    let result = run(&cluster, &plan).await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn phase(
    cluster: &LocalCluster,
    client: &ControlClient,
    plan: &Plan,
    name: &str,
    stragglers: bool,
    hedge: bool,
) -> Result<serde_json::Value> {
    let f = file::parse(
        &format!("{name}.toml"),
        &graph(name, plan, stragglers, hedge),
    )?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the bench graph {name} was rejected");
    };
    wait_deployed(client, &record.id, 1, Duration::from_secs(30)).await?;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, r) = client.replicas(&record.id).await?;
        if r.iter().filter(|r| r.state == "ready").count() >= 3 {
            break;
        }
        if std::time::Instant::now() > until {
            bail!("{name}: three replicas not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every ingress has the table with all three.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spec = |secs: f64| load::Spec {
        graph: record.id.clone(),
        mode: load::Mode::Open { rate: plan.rate },
        duration: Duration::from_secs_f64(secs),
        payload: bytes::Bytes::from_static(b"x"),
        deadline_ms: 10_000,
        ingresses: cluster.agents.iter().map(|a| a.addr.clone()).collect(),
        objective_us: None,
    };
    // Warm-up: connections, and the hedge delay's p95 (50 invocations per ingress at least).
    let warm = load::run(spec(3.0), false).await?;
    let r = load::run(spec(plan.seconds), false).await?;
    // Executions per invocation over both runs, once the last windows are in (2 s late).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = client.stats(&record.id, 600).await?;
    let executions: u64 = stats.tasks.iter().map(|t| t.count).sum();
    let invocations = warm.sent + r.sent;
    let extra = executions as f64 / invocations.max(1) as f64 - 1.0;
    client.remove(&record.id).await?;
    Ok(serde_json::json!({
        "stragglers": stragglers,
        "hedged": hedge,
        "invocations": r.sent,
        "errors": r.errors + warm.errors,
        "p50_us": r.p50_us,
        "p99_us": r.p99_us,
        "p999_us": r.p999_us,
        "extra_executions": (extra.max(0.0) * 10_000.0).round() / 10_000.0,
    }))
}

async fn run(cluster: &LocalCluster, plan: &Plan) -> Result<serde_json::Value> {
    let client = connect_registered(cluster).await?;
    let healthy = phase(cluster, &client, plan, "hedge-healthy", false, false).await?;
    let stragglers = phase(cluster, &client, plan, "hedge-stragglers", true, false).await?;
    let hedged = phase(cluster, &client, plan, "hedge-hedged", true, true).await?;
    let p99 = |v: &serde_json::Value| v["p99_us"].as_f64().unwrap_or(0.0);
    let ratio = p99(&hedged) / p99(&healthy).max(1.0);
    Ok(serde_json::json!({
        "bench": "hedging",
        "rate_per_s": plan.rate,
        "service": format!("sleep {} mean {} ms", plan.dist, plan.mean_ms),
        "straggler_p": plan.straggler_p,
        "straggler_x": plan.straggler_x,
        "seconds": plan.seconds,
        "healthy_p99_us": p99(&healthy),
        "stragglers_p99_us": p99(&stragglers),
        "hedged_p99_us": p99(&hedged),
        "hedged_over_healthy": (ratio * 100.0).round() / 100.0,
        "hedge_extra_executions": hedged["extra_executions"],
        "phases": [healthy, stragglers, hedged],
        "targets": { "hedged_over_healthy_max": 1.5, "extra_max": 0.05 },
    }))
}
