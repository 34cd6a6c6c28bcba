//! Sizing by utilisation with real processes: a task under load scales out to what its
//! arrival rate × service time needs, and back in once the load stops, with nothing failing.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GRAPH: &str = r#"
name = "scaled"
[[task]]
id = "work"
code = { builtin = "sleep", params = { mean = "20ms" } }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "20ms"

[scaling]
max_replicas = 4
window = "2s"
scale_out_cooldown = "2s"
scale_in_cooldown = "4s"
"#;

fn ready(control: &Control, graph: &str) -> usize {
    control.cli_json(&["replicas", graph])["replicas"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["state"] == "ready").count())
}

fn wait_for(what: &str, control: &Control, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < until,
            "{what} within {limit:?}: {:#?}",
            events(control)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn load_scales_a_task_out_and_its_loss_scales_it_back_in() {
    let dir = TempDir::new("scaling");
    let control = Control::start(
        dir.path(),
        &["--startup-grace-ms", "0", "--drain-ms", "500"],
    );
    let _agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::start(&control.addr, &format!("a{i}"), 4, dir.path()))
        .collect();
    control.wait_agents(2);
    let path = dir.path().join("scaled.toml");
    std::fs::write(&path, GRAPH).unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    wait_deployed(&control, "scaled", 1, 1);
    assert_eq!(
        ready(&control, "scaled"),
        1,
        "a new graph starts at its minimum"
    );

    // 100/s × 20 ms ÷ 70% needs 2.9 replicas.
    let load = Command::new(CLI)
        .args(["--control", &control.addr, "--json", "load", "scaled"])
        .args(["--rate", "100", "--duration", "9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("a scale-out", &control, Duration::from_secs(9), || {
        ready(&control, "scaled") >= 3
    });
    let out = load.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    // One replica serves one execution at a time (`max_concurrency` = 1 by default): until the
    // scale-out, the rest queued at it, and that wait is measured as queueing, not execution.
    let stats = control.cli_json(&["stats", "scaled", "--window", "30"]);
    let work = &stats["tasks"][0];
    let (exec_p50, queue_p99) = (
        work["exec_p50_us"].as_f64().unwrap(),
        work["queue_p99_us"].as_f64().unwrap(),
    );
    assert!(exec_p50 < 40_000.0 && queue_p99 > 5_000.0, "{stats}");
    // Those that queued past a service time while the new replicas were on their way are cold.
    let cold = &stats["cold"];
    assert!(
        cold["total_executions"].as_u64().unwrap_or(0) >= 1
            && cold["wait_mean_ms"].as_f64().unwrap_or(0.0) > 20.0,
        "{stats}"
    );
    let ev = events(&control);
    let (_, _, why) = ev
        .iter()
        .find(|(k, s, _)| k == "scale-out" && s == "g1.work")
        .unwrap_or_else(|| panic!("no scale-out event: {ev:#?}"));
    assert!(why.contains("req/s") && why.contains("replicas"), "{why}");

    // The load is gone: one replica at a time back to the minimum, each drained and retired.
    wait_for(
        "scale-in to the minimum",
        &control,
        Duration::from_secs(30),
        || ready(&control, "scaled") == 1,
    );
    let ev = events(&control);
    assert!(
        ev.iter().filter(|(k, _, _)| k == "scale-in").count() >= 2,
        "{ev:#?}"
    );
    wait_for(
        "the drained replicas retired",
        &control,
        Duration::from_secs(5),
        || {
            events(&control)
                .iter()
                .any(|(k, _, r)| k == "replicas-retired" && r.starts_with("scaled in"))
        },
    );
}

const SIGNALLED: &str = r#"
name = "signalled"
[[task]]
id = "work"
code = { builtin = "sleep", params = { mean = "20ms" } }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "20ms"

[scaling]
max_replicas = 4
max_concurrency = 100
window = "2s"
scale_out_cooldown = "2s"
scale_in_cooldown = "4s"
[[scaling.signal]]
task = "work"
metric = "queue_length"
target = 0.5
"#;

#[test]
fn a_queue_length_signal_scales_what_utilisation_would_not() {
    let dir = TempDir::new("signal");
    let control = Control::start(
        dir.path(),
        &["--startup-grace-ms", "0", "--drain-ms", "500"],
    );
    let _agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::start(&control.addr, &format!("a{i}"), 4, dir.path()))
        .collect();
    control.wait_agents(2);
    let path = dir.path().join("signalled.toml");
    std::fs::write(&path, SIGNALLED).unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    wait_deployed(&control, "signalled", 1, 1);
    // 100/s × 20 ms is 2 in flight: 0.03 of one replica's 100 at once by utilisation, but 4
    // replicas at a target of 0.5 in flight each.
    let load = Command::new(CLI)
        .args(["--control", &control.addr, "--json", "load", "signalled"])
        .args(["--rate", "100", "--duration", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "a scale-out on the signal",
        &control,
        Duration::from_secs(8),
        || ready(&control, "signalled") >= 2,
    );
    let out = load.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    let ev = events(&control);
    let (_, _, why) = ev
        .iter()
        .find(|(k, s, _)| k == "scale-out" && s == "g1.work")
        .unwrap_or_else(|| panic!("no scale-out event: {ev:#?}"));
    assert!(
        why.contains("queue_length") && why.contains("target 0.5"),
        "{why}"
    );
}
