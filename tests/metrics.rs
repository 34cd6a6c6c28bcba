//! `/metrics` on the control node and on agents parses as Prometheus text and says what
//! happened.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn metrics_parse_and_count_what_ran() {
    let dir = TempDir::new("metrics");
    let data = dir.path().join("control");
    let (_control, api, control_metrics) = start_control_with_metrics(&data);
    let (_agent, _ingress, agent_metrics) = start_agent_with_metrics(&api, "a1", 4);
    let out = cli(
        &api,
        &["submit", &repo_path("examples/three-stage-chain.toml")],
    );
    assert!(out.status.success());
    let until = Instant::now() + Duration::from_secs(30);
    while value(
        &scrape(&control_metrics),
        "prescient_replicas",
        &[("task", "infer"), ("state", "ready")],
    ) != Some(1.0)
    {
        assert!(Instant::now() < until, "never deployed");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let load = cli(
        &api,
        &[
            "--json",
            "load",
            "three-stage-chain",
            "--concurrency",
            "2",
            "--duration",
            "1",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&load.stdout).unwrap();
    let sent = report["sent"].as_f64().unwrap();
    assert_eq!(report["errors"], 0, "{report}");

    let until = Instant::now() + Duration::from_secs(15);
    let c = loop {
        let c = scrape(&control_metrics);
        if value(
            &c,
            "prescient_task_executions_total",
            &[("task", "postprocess")],
        ) == Some(sent)
        {
            break c;
        }
        assert!(Instant::now() < until, "executions never reached {sent}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        value(&c, "prescient_agents", &[("state", "ready")]),
        Some(1.0)
    );
    assert_eq!(value(&c, "prescient_graphs_deployed", &[]), Some(1.0));
    // Every decision is counted by kind: this graph's three placements at least.
    assert!(
        value(&c, "prescient_events_total", &[("kind", "replica-placed")]).unwrap_or(0.0) >= 3.0,
        "decisions by kind"
    );
    assert_eq!(
        value(&c, "prescient_task_errors_total", &[("task", "infer")]),
        Some(0.0)
    );
    assert_eq!(
        value(&c, "prescient_task_execution_seconds", &[("task", "infer")]),
        Some(3.0),
        "a summary with three quantiles"
    );

    let util = value(&c, "prescient_host_cpu_utilization", &[("host", "a1")])
        .expect("host samples arrive");
    assert!((0.0..=1.0).contains(&util), "{util}");
    assert!(value(&c, "prescient_host_memory_used_bytes", &[("host", "a1")]).unwrap() > 0.0);

    // Each replica's VM: its cgroup's memory and its limits (this machine has writable cgroups).
    let mem = value(&c, "prescient_replica_memory_bytes", &[("task", "infer")])
        .expect("VM samples arrive");
    assert!(mem > 0.0, "{mem}");
    assert_eq!(
        value(
            &c,
            "prescient_replica_cpu_limit_cores",
            &[("task", "infer")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &c,
            "prescient_replica_memory_limit_bytes",
            &[("task", "infer")]
        ),
        Some((512u64 << 20) as f64)
    );

    let a = scrape(&agent_metrics);
    assert_eq!(
        value(&a, "prescient_agent_connected", &[("agent", "a1")]),
        Some(1.0)
    );
    assert_eq!(
        value(&a, "prescient_agent_replicas", &[("graph", "g1")]),
        Some(3.0)
    );
    assert!(value(&a, "prescient_ingress_bytes_total", &[("direction", "in")]).unwrap() > 0.0);

    let (head, _) = get(&control_metrics, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
