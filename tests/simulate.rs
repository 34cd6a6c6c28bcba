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
    assert_eq!(runs.len(), 8, "4 policies × 2 lead times: {a}");
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
        err.contains("--policy \"magic\": expected reactive, prescient, predictive or oracle"),
        "{err}"
    );
}

/// `prescient simulate` on the whole cluster: a graph file on a per-second trace, four hosts,
/// a scenario file with a host that dies and boots that fail. Runs twice for determinism.
fn cluster(dir: &std::path::Path, scenario: &std::path::Path) -> std::process::Output {
    Command::new(CLI)
        .args([
            "--json",
            "simulate",
            "--hosts",
            "4",
            "--policy",
            "reactive,oracle",
        ])
        .args(["--seed", "5", "--trace"])
        .arg(dir.join("counts.txt"))
        .arg("--graph")
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/three-stage-chain.toml"),
        )
        .arg("--scenario")
        .arg(scenario)
        .output()
        .expect("runs")
}

#[test]
fn the_cluster_simulation_runs_a_graph_through_faults_the_same_way_twice() {
    let dir = TempDir::new("simulate-cluster");
    let counts: Vec<String> = (0..1800)
        .map(|s| {
            let x = (s as f64 / 600.0 * std::f64::consts::TAU).sin();
            ((40.0 + 30.0 * x).round() as u32).to_string()
        })
        .collect();
    std::fs::write(dir.path().join("counts.txt"), counts.join("\n")).unwrap();
    let scenario = dir.path().join("faults.toml");
    std::fs::write(
        &scenario,
        "lead = { uniform = { min = 1.0, max = 3.0 } }\nboot_failure = 0.1\n\
         [[fault]]\nkind = \"dies\"\nhost = \"h1\"\nat_s = 1400.0\n",
    )
    .unwrap();
    let run = |_| {
        let out = cluster(dir.path(), &scenario);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        for r in v["runs"].as_array_mut().expect("runs") {
            r.as_object_mut().expect("row").remove("run_wall_s");
        }
        v
    };
    let (a, b) = (run(1), run(2));
    assert_eq!(
        serde_json::to_string(&a["runs"]).unwrap(),
        serde_json::to_string(&b["runs"]).unwrap(),
        "byte-identical runs for one seed"
    );
    let runs = a["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{a}");
    for r in runs {
        // The measured third (from 1200 s): ~40/s.
        let requests = r["requests"].as_u64().unwrap_or(0);
        assert!((20_000..28_000).contains(&requests), "{r}");
        assert_eq!(r["decisions"]["lost"], 1, "h1 stopped heartbeating: {r}");
        assert_eq!(r["decisions"]["host-died"], 1, "{r}");
        assert!(
            r["within_objective_pct"].as_f64().unwrap_or(0.0) > 95.0,
            "{r}"
        );
        assert!(
            r["minutes"].as_array().is_some_and(|m| m.len() >= 10),
            "{r}"
        );
    }
    // --plot draws the runs' minutes into a PNG.
    let png = dir.path().join("fleet.png");
    let out = Command::new(CLI)
        .args(["simulate", "--hosts", "4", "--lead", "2", "--trace"])
        .arg(dir.path().join("counts.txt"))
        .arg("--plot")
        .arg(&png)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).expect("the PNG");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
    // A scenario file that is wrong says where and what.
    std::fs::write(&scenario, "boot_failure = 2.0\n").unwrap();
    let out = cluster(dir.path(), &scenario);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("faults.toml") && err.contains("boot_failure = 2"),
        "{err}"
    );
    std::fs::write(
        &scenario,
        "[[fault]]\nkind = \"dies\"\nhost = \"h9\"\nat_s = 1.0\n",
    )
    .unwrap();
    let out = cluster(dir.path(), &scenario);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"h9\": the hosts are h1..h4"), "{err}");
}
