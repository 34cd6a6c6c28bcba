//! Predictive provisioning with real processes: a graph under `[scaling.predictive]` has its
//! tasks' arrivals forecast by the control node, and the plan's floor either orders replicas
//! (mode on: a `scale-out` whose reason is the plan's) or is only told (`forecast-only`:
//! an event saying what it would hold, nothing placed for it).

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn graph(name: &str, mode: &str) -> String {
    format!(
        r#"
name = "{name}"
[[task]]
id = "work"
code = {{ builtin = "sleep", params = {{ mean = "20ms" }} }}
inputs = {{ x = "bytes" }}
outputs = {{ y = "bytes" }}
estimate = "20ms"

[scaling]
max_replicas = 8
window = "2s"
scale_out_cooldown = "2s"
scale_in_cooldown = "60s"
[scaling.predictive]
mode = "{mode}"
attainment = 0.999
lead = "30s"
"#
    )
}

fn ready(control: &Control, graph: &str) -> usize {
    control.cli_json(&["replicas", graph])["replicas"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["state"] == "ready").count())
}

#[test]
fn the_plan_orders_replicas_ahead_and_forecast_only_just_says_so() {
    let dir = TempDir::new("predictive");
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let _agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::start(&control.addr, &format!("a{i}"), 4, dir.path()))
        .collect();
    control.wait_agents(2);
    for (name, mode) in [("planned", "on"), ("told", "forecast-only")] {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, graph(name, mode)).unwrap();
        control.cli_ok(&["submit", path.to_str().unwrap()]);
        wait_deployed(&control, name, 1, 1);
    }
    // 30/s × 20 ms into each: reactive sizing asks ⌈0.6 × (1 + queueing) ÷ 70%⌉ = 1 or 2; the
    // plan, for 99.9% to start within 20 ms (M/M/c), 4, once the forecast has seen the load.
    let loads: Vec<_> = ["planned", "told"]
        .iter()
        .map(|g| {
            Command::new(CLI)
                .args(["--control", &control.addr, "--json", "load", g])
                .args(["--rate", "30", "--duration", "40"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(45);
    let (planned, told) = loop {
        let ev = events(&control);
        let planned = ev
            .iter()
            .find(|(k, s, r)| k == "scale-out" && s == "g1.work" && r.contains("the plan needs"))
            .cloned();
        let told = ev
            .iter()
            .find(|(k, s, _)| k == "forecast-only" && s == "g2.work")
            .cloned();
        if let (Some(p), Some(t)) = (&planned, &told) {
            break (p.clone(), t.clone());
        }
        assert!(Instant::now() < until, "no plan within 45 s: {ev:#?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        planned.2.contains("lead time") && planned.2.contains("reactive sizing asks"),
        "{planned:?}"
    );
    assert!(
        told.2.starts_with("would hold") && told.2.contains("reactive sizing sets"),
        "{told:?}"
    );
    // The planned graph holds what the plan asked ("1 -> N replicas: ..."); the told one never
    // scaled for the plan.
    let asked: usize = planned
        .2
        .split(" -> ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{planned:?}"));
    let until = Instant::now() + Duration::from_secs(10);
    while ready(&control, "planned") < asked {
        assert!(Instant::now() < until, "{asked}: {:#?}", events(&control));
        std::thread::sleep(Duration::from_millis(200));
    }
    let ev = events(&control);
    assert!(
        !ev.iter()
            .any(|(k, s, r)| k == "scale-out" && s == "g2.work" && r.contains("the plan")),
        "{ev:#?}"
    );
    // `prescient forecast` shows the forecast and the plan on it; --plot draws it.
    let shown = control.cli_json(&["forecast", "planned"]);
    assert_eq!(shown["mode"], "on", "{shown}");
    let work = &shown["tasks"][0];
    assert_eq!(work["task"], "work", "{shown}");
    let steps = work["point"].as_array().map_or(0, |v| v.len());
    assert!(
        steps >= 6 && work["planned"].as_array().map(|v| v.len()) == Some(steps),
        "{shown}"
    );
    assert!(
        work["floor"].as_u64().unwrap_or(0) >= 1 && work["ready"].as_u64().unwrap_or(0) >= 1,
        "{shown}"
    );
    let png = dir.path().join("told.png");
    control.cli_ok(&["forecast", "told", "--plot", png.to_str().unwrap()]);
    let bytes = std::fs::read(&png).unwrap();
    assert!(
        bytes.len() > 10_000 && bytes.starts_with(b"\x89PNG"),
        "{}",
        bytes.len()
    );
    let out = Command::new(CLI)
        .args([
            "--control",
            &control.addr,
            "forecast",
            "planned",
            "--task",
            "nope",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("no forecast of a task \"nope\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mut l in loads {
        let _ = l.kill();
        let _ = l.wait();
    }
}

#[test]
fn an_imported_trace_seeds_the_forecast_and_the_per_second_history() {
    let dir = TempDir::new("predictive-import");
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let _agent = Agent::start(&control.addr, "a1", 4, dir.path());
    control.wait_agents(1);
    let path = dir.path().join("told.toml");
    std::fs::write(&path, graph("told", "forecast-only")).unwrap();
    control.cli_ok(&["submit", path.to_str().unwrap()]);
    wait_deployed(&control, "told", 1, 1);
    // An hour in 10 s steps at 60 per step (6/s), and a column not imported.
    let mut csv = String::from("t,other,rps6\n");
    for i in 0..360 {
        csv.push_str(&format!("{},{},60\n", i * 10, i % 7));
    }
    let file = dir.path().join("trace.csv");
    std::fs::write(&file, csv).unwrap();
    let args = ["history", "import", "told", "--task", "work"];
    let f = file.to_str().unwrap();
    let out = control.cli_json(&[&args[..], &["--csv", f, "--column", "rps6"]].concat());
    assert_eq!(
        (&out["steps"], &out["step_s"], &out["seconds"]),
        (&360.into(), &10.into(), &3600.into()),
        "{out}"
    );
    assert!(
        (60..=61).contains(&out["minutes"].as_u64().unwrap_or(0)),
        "{out}"
    );
    let seconds = control.cli_json(&["history", "told", "--task", "work", "--per-second"]);
    let counts: Vec<u64> = seconds
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_u64().unwrap())
        .collect();
    assert!(
        counts.len() >= 3000 && counts.iter().all(|c| *c == 6),
        "{} points",
        counts.len()
    );
    // A missing column is named.
    let bad = Command::new(CLI)
        .args(["--control", &control.addr])
        .args(args)
        .args(["--csv", f, "--column", "nope"])
        .output()
        .unwrap();
    assert!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad.stderr).contains("no series \"nope\""),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // The graph has had no load: only the import can make its re-seeded forecast non-zero
    // (the live seconds since the minute began are zeros, so it reads below the trace's 6/s).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        // Until its first 10 s step, there is nothing to show (and the command says so).
        let out = Command::new(CLI)
            .args(["--control", &control.addr, "--json", "forecast", "told"])
            .output()
            .unwrap();
        let shown: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let p = shown["tasks"][0]["point"][0].as_f64().unwrap_or(0.0);
        if p > 1.0 {
            assert!(p < 7.0, "{shown}");
            break;
        }
        assert!(
            Instant::now() < until,
            "no forecast from the import: {shown}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
