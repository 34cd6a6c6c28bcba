//! The request path with real processes: a control node, agents, and their workers.

mod common;
use common::*;
use prescient_schemas::Digest;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn invoke_hex(control: &Control, graph: &str, input: &str) -> serde_json::Value {
    control.cli_json(&["invoke", graph, "--input", &format!("={input}")])
}

#[test]
fn chain_and_fan_out_return_correct_outputs() {
    let dir = TempDir::new("request-path");
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let _agents: Vec<Agent> = (1..=3)
        .map(|i| Agent::start(&control.addr, &format!("a{i}"), 2, dir.path()))
        .collect();
    control.wait_agents(3);
    control.cli_ok(&["submit", &repo_path("examples/three-stage-chain.toml")]);
    control.cli_ok(&["submit", &repo_path("examples/fan-out-fan-in.toml")]);
    let chain = wait_deployed(&control, "g1", 3, 1);
    wait_deployed(&control, "g2", 5, 1);
    // The chain spreads one stage per host.
    let mut hosts: Vec<&str> = chain["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap())
        .collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 3, "{chain}");

    // preprocess and infer pass their input through; postprocess hashes it.
    let out = invoke_hex(&control, "three-stage-chain", "hello");
    assert_eq!(
        out["outputs"]["postprocess.label"]["hex"],
        Digest::of(b"hello").hex(),
        "{out}"
    );
    // decode passes through; detect and caption pass through, moderate hashes; merge joins
    // its three inputs in port order.
    let out = invoke_hex(&control, "g2", "img");
    let expected = format!("{}{}{}", hex(b"img"), hex(b"img"), Digest::of(b"img").hex());
    assert_eq!(out["outputs"]["merge.reply"]["hex"], expected, "{out}");

    // Every agent's ingress serves every graph.
    for a in &_agents {
        let o = control.cli_json(&["invoke", "g1", "--input", "=x", "--ingress", &a.ingress]);
        assert_eq!(
            o["outputs"]["postprocess.label"]["hex"],
            Digest::of(b"x").hex()
        );
    }

    // Wrong inputs are refused with the graph's real inputs named.
    let bad = control.cli(&["invoke", "g1", "--input", "nope.x=1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("preprocess.request"));
}

#[test]
fn a_failing_task_names_itself_and_its_replica() {
    let dir = TempDir::new("failing-task");
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let _a = Agent::start(&control.addr, "a1", 2, dir.path());
    let graph = dir.path().join("fails.toml");
    std::fs::write(
        &graph,
        r#"
name = "fails"
[[task]]
id = "ok"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "10us"
[[task]]
id = "broken"
code = { builtin = "fail", params = { p = 1.0 } }
inputs = { y = "bytes" }
outputs = { z = "bytes" }
estimate = "10us"
[[edge]]
from = "ok.y"
to = "broken.y"
"#,
    )
    .unwrap();
    control.cli_ok(&["submit", graph.to_str().unwrap()]);
    wait_deployed(&control, "g1", 2, 1);
    let out = control.cli(&["invoke", "fails", "--input", "=x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("task broken failed on replica g1.broken.r"),
        "{err}"
    );
}

fn write_chain(dir: &std::path::Path) -> String {
    let path = dir.join("slow-chain.toml");
    std::fs::write(
        &path,
        r#"
name = "slow-chain"
[[task]]
id = "s1"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "10us"
[[task]]
id = "s2"
code = { builtin = "sleep", params = { mean = "3ms" } }
inputs = { y = "bytes" }
outputs = { z = "bytes" }
estimate = "3ms"
[[task]]
id = "s3"
code = { builtin = "sha256" }
inputs = { z = "bytes" }
outputs = { h = "bytes" }
estimate = "10us"
[[edge]]
from = "s1.y"
to = "s2.y"
[[edge]]
from = "s2.z"
to = "s3.z"
"#,
    )
    .unwrap();
    path.display().to_string()
}

fn start_load(control: &Control, secs: u32, deadline_ms: u32) -> std::process::Child {
    Command::new(CLI)
        .args(["--control", &control.addr, "--json", "load", "slow-chain"])
        .args(["--concurrency", "8", "--duration", &secs.to_string()])
        .args(["--deadline-ms", &deadline_ms.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn load_report(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "load printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn killing_a_worker_mid_run_neither_hangs_nor_loses_invocations_silently() {
    let dir = TempDir::new("kill-worker");
    let control = Control::start(
        dir.path(),
        &[
            "--startup-grace-ms",
            "0",
            "--min-replicas",
            "2",
            "--heartbeat-timeout-ms",
            "1000",
        ],
    );
    let _agents: Vec<Agent> = (1..=3)
        .map(|i| Agent::start(&control.addr, &format!("a{i}"), 2, dir.path()))
        .collect();
    control.cli_ok(&["submit", &write_chain(dir.path())]);
    let before = wait_deployed(&control, "g1", 3, 2);
    let victim = before["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["task"] == "s2")
        .unwrap()["replica"]
        .as_str()
        .unwrap()
        .to_string();

    let started = Instant::now();
    let load = start_load(&control, 4, 2000);
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Command::new("pkill")
        .args(["-9", "-f", &format!("worker .*replica {victim}( |$)")])
        .status()
        .unwrap();
    assert!(killed.success(), "no worker process for {victim}");
    let report = load_report(load);
    let took = started.elapsed();

    let (sent, ok, errors) = (
        report["sent"].as_u64().unwrap(),
        report["ok"].as_u64().unwrap(),
        report["errors"].as_u64().unwrap(),
    );
    assert_eq!(sent, ok + errors, "every invocation was answered: {report}");
    assert!(ok > 100, "{report}");
    // Lost requests are retried on the other replica; any that fail say why.
    for e in report["error_samples"].as_array().unwrap() {
        let e = e.as_str().unwrap();
        assert!(
            e.contains("s2") || e.contains("deadline"),
            "unclear error: {e}"
        );
    }
    assert!(
        took < Duration::from_secs(4 + 2 + 3),
        "invocations hung past their deadline: the run took {took:?}"
    );
    // Control hears of the loss and replaces the replica.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let ev = events(&control);
        let lost = ev
            .iter()
            .any(|(k, s, _)| k == "replica-lost" && *s == victim);
        let replaced = ev
            .iter()
            .filter(|(k, s, _)| k == "replica-placed" && s.starts_with("g1.s2."))
            .count()
            >= 3;
        if lost && replaced {
            break;
        }
        assert!(
            Instant::now() < until,
            "no replacement for {victim}: {ev:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_deployed(&control, "g1", 3, 2);
}

#[test]
fn restarting_the_control_node_does_not_interrupt_invocations() {
    let dir = TempDir::new("restart-control");
    let data = dir.path().join("control");
    let control = Control::start(&data, &["--startup-grace-ms", "3000"]);
    let addr = control.addr.clone();
    let _agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::start(&addr, &format!("a{i}"), 2, dir.path()))
        .collect();
    control.cli_ok(&["submit", &write_chain(dir.path())]);
    let before = wait_deployed(&control, "g1", 3, 1);

    let load = start_load(&control, 5, 2000);
    std::thread::sleep(Duration::from_millis(1000));
    control.kill9();
    std::thread::sleep(Duration::from_millis(1000));
    let control = Control::start_on(&data, &addr, &["--startup-grace-ms", "3000"]);
    let report = load_report(load);
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() > 500, "{report}");

    // The restarted node adopted the running replicas instead of starting new ones.
    std::thread::sleep(Duration::from_millis(3500));
    let after = control.cli_json(&["replicas", "g1"]);
    let ids = |v: &serde_json::Value| {
        let mut ids: Vec<String> = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["replica"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&after), ids(&before));
    let ev = events(&control);
    assert!(
        ev.iter()
            .any(|(k, _, r)| k == "agent-registered" && r.contains("adopted running replicas")),
        "{ev:#?}"
    );
}

#[test]
fn updating_a_graph_switches_versions_without_failing_invocations() {
    let dir = TempDir::new("update");
    let control = Control::start(
        dir.path(),
        &["--startup-grace-ms", "0", "--drain-ms", "1000"],
    );
    let _agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::start(&control.addr, &format!("a{i}"), 4, dir.path()))
        .collect();
    let path = write_chain(dir.path());
    control.cli_ok(&["submit", &path]);
    let v1 = wait_deployed(&control, "g1", 3, 1);

    let load = start_load(&control, 5, 2000);
    std::thread::sleep(Duration::from_millis(1500));
    // Version 2: the last stage now passes its input through instead of hashing it.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("builtin = \"sha256\"", "builtin = \"identity\""),
    )
    .unwrap();
    let out = control.cli_json(&["submit", &path]);
    assert_eq!(
        (out["id"].as_str(), out["version"].as_u64()),
        (Some("g1"), Some(2))
    );
    let report = load_report(load);
    assert_eq!(report["errors"], 0, "{report}");

    // Only version 2's replicas remain, and they answer as version 2 does.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let ev = events(&control);
        if ev.iter().any(|(k, _, _)| k == "replicas-retired") {
            break;
        }
        assert!(
            Instant::now() < until,
            "old replicas never retired: {ev:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let v2 = control.cli_json(&["replicas", "g1"]);
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["replica"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&v2).len(), 3);
    assert!(
        ids(&v2).iter().all(|id| !ids(&v1).contains(id)),
        "{v1} {v2}"
    );
    let out = control.cli_json(&["invoke", "g1", "--input", "=abc"]);
    assert_eq!(out["outputs"]["s3.h"]["text"], "abc", "{out}");
    // The agents' worker processes: only version 2's are left.
    let parents: Vec<String> = _agents.iter().map(|a| a.pid().to_string()).collect();
    let running = std::process::Command::new("pgrep")
        .args(["-c", "-P", &parents.join(",")])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&running.stdout).trim(),
        "3",
        "old workers still run"
    );
}
