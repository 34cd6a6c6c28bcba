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
