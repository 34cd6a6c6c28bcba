//! `prescient simulate`: the kpa-nasa scenario on a small per-second trace through the CLI —
//! the same seed gives the same runs, another seed other arrivals, bad arguments clear errors.

mod common;

use common::*;
use std::process::Command;

fn simulate(trace: &std::path::Path, seed: &str) -> serde_json::Value {
    let out = Command::new(CLI)
        .args([
            "--json",
            "simulate",
            "--scenario",
            "kpa-nasa",
            "--lead",
            "2,30",
        ])
        .args(["--seed", seed, "--trace"])
        .arg(trace)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn the_same_seed_gives_the_same_runs_and_bad_arguments_are_named() {
    let dir = TempDir::new("simulate");
    let trace = dir.path().join("counts.txt");
    let counts: Vec<String> = (0..7200)
        .map(|s| {
            let x = (s as f64 / 900.0 * std::f64::consts::TAU).sin();
            ((2.0 + 1.5 * x).round() as u32).to_string()
        })
        .collect();
    std::fs::write(&trace, counts.join("\n")).unwrap();
    let a = simulate(&trace, "3");
    let b = simulate(&trace, "3");
    let runs = a["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 6, "3 policies × 2 lead times: {a}");
    assert_eq!(
        serde_json::to_string(&a["runs"]).unwrap(),
        serde_json::to_string(&b["runs"]).unwrap(),
        "byte-identical runs for one seed"
    );
    assert_ne!(a["runs"], simulate(&trace, "4")["runs"]);
    for r in runs {
        for key in [
            "policy",
            "lead_s",
            "requests",
            "within_objective_pct",
            "cold",
            "p50_s",
            "p99_s",
            "vm_seconds",
            "actions",
        ] {
            assert!(!r[key].is_null(), "{key} missing: {r}");
        }
    }
    let oracle = runs
        .iter()
        .find(|r| r["policy"] == "oracle")
        .expect("oracle");
    assert_eq!(oracle["within_objective_pct"], 100.0, "{oracle}");
    assert!(a["wall_s"].as_f64().is_some() && a["peak_rss_mib"].as_f64().is_some());

    let bad = Command::new(CLI)
        .args(["simulate", "--scenario", "nope"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("--scenario \"nope\""),
        "{err}"
    );
    let bad = Command::new(CLI)
        .args([
            "simulate",
            "--scenario",
            "kpa-nasa",
            "--policy",
            "magic",
            "--trace",
        ])
        .arg(&trace)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--policy \"magic\": expected reactive, prescient or oracle"),
        "{err}"
    );
}
