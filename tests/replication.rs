//! Replication end to end with real processes: `prescient bench replication` (control node,
//! three agents, a 3-stage chain, a host slowed through its workers' cgroup CPU quota) with
//! looser bounds than the bench's targets: it replaces the slowed replica, the chain recovers,
//! the extras are retired, nothing fails.

mod common;

use common::*;
use std::process::Command;

#[test]
fn a_slowed_host_is_replicated_away_from_and_the_chain_recovers() {
    let out = Command::new(CLI)
        .args([
            "bench",
            "replication",
            "--healthy",
            "6",
            "--degraded",
            "3",
            "--recovered",
            "6",
        ])
        .output()
        .expect("runs the bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let show = serde_json::to_string_pretty(&r).unwrap_or_default();
    assert_eq!(r["failed"], 0, "{show}");
    assert_eq!(r["shed"], true, "the slowed replica was shed: {show}");
    let detect = r["detect_to_serving_s"]
        .as_f64()
        .expect("a replacement served");
    assert!(detect <= 20.0, "{show}");
    let healthy = r["healthy_p99_us"].as_f64().expect("healthy p99");
    let degraded = r["degraded_p99_us"].as_f64().expect("degraded p99");
    let recovered = r["recovered_p99_us"].as_f64().expect("recovered p99");
    assert!(degraded > 2.0 * healthy, "the slowdown was real: {show}");
    assert!(recovered <= 3.0 * healthy, "{show}");
    assert!(
        r["retired_after_load_s"].as_f64().is_some(),
        "back to one replica per task: {show}"
    );
    let slowed = r["slowed_host"].as_str().expect("host");
    let end: Vec<&str> = r["replicas_at_end"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(end.len(), 3, "{show}");
    assert!(
        !end.iter()
            .any(|e| e.contains(".s2.") && e.ends_with(&format!("@{slowed}"))),
        "s2 no longer runs on the slowed host: {show}"
    );
    let kinds: Vec<&str> = r["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"shed"), "{kinds:?}");
    assert!(
        kinds.contains(&"replace") || kinds.contains(&"scale-out"),
        "{kinds:?}"
    );
}
