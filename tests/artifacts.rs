//! `exec` artifacts: uploaded, fetched by agents, verified against the graph's digest, run.

mod common;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn exec_upper() -> PathBuf {
    let p = PathBuf::from(CLI)
        .with_file_name("examples")
        .join("exec_upper");
    assert!(
        p.exists(),
        "{} is missing: `cargo test` builds the examples (run the whole suite)",
        p.display()
    );
    p
}

fn exec_graph(dir: &std::path::Path, name: &str, digest: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
name = "{name}"
[[task]]
id = "shout"
code = {{ exec = "{digest}", args = ["BOOM"] }}
inputs = {{ text = "text" }}
outputs = {{ loud = "text" }}
estimate = "100us"
"#
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn wait_event(control: &Control, kind: &str, needle: &str) -> String {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((_, _, r)) = events(control)
            .into_iter()
            .find(|(k, _, r)| k == kind && r.contains(needle))
        {
            return r;
        }
        assert!(
            Instant::now() < until,
            "no {kind} event mentioning {needle:?}: {:#?}",
            events(control)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_uploaded_executable_runs_as_a_task() {
    let dir = TempDir::new("exec");
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let _a = Agent::start(&control.addr, "a1", 2, dir.path());
    let up = control.cli_json(&["upload", exec_upper().to_str().unwrap()]);
    let digest = up["sha256"].as_str().unwrap().to_string();
    assert_eq!(up["created"], true);
    control.cli_ok(&["submit", &exec_graph(dir.path(), "shout", &digest)]);
    wait_deployed(&control, "g1", 1, 1);
    let out = control.cli_json(&["invoke", "shout", "--input", "=hello"]);
    assert_eq!(out["outputs"]["shout.loud"]["text"], "HELLO", "{out}");
    // The artifact's own errors come back naming the task and replica.
    let bad = control.cli(&["invoke", "shout", "--input", "=a BOOM b"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("task shout failed on replica g1.shout.r1: input contains \"BOOM\""),
        "{err}"
    );
}

#[test]
fn a_gauge_the_task_reports_is_a_scaling_signal() {
    let dir = TempDir::new("exec-gauge");
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let _a = Agent::start(&control.addr, "a1", 4, dir.path());
    let up = control.cli_json(&["upload", exec_upper().to_str().unwrap()]);
    let digest = up["sha256"].as_str().unwrap().to_string();
    let path = exec_graph(dir.path(), "gauged", &digest);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(
        "\n[scaling]\nmax_replicas = 3\nwindow = \"2s\"\n[[scaling.signal]]\ntask = \"shout\"\nmetric = \"custom.bytes_last\"\ntarget = 2\n",
    );
    std::fs::write(&path, text).unwrap();
    control.cli_ok(&["submit", &path]);
    wait_deployed(&control, "g1", 1, 1);
    // 5 bytes in: the artifact reports bytes_last = 5; 5 ÷ 2 per replica asks for 3.
    let out = control.cli_json(&["invoke", "gauged", "--input", "=hello"]);
    assert_eq!(out["outputs"]["shout.loud"]["text"], "HELLO", "{out}");
    let why = wait_event(&control, "scale-out", "custom.bytes_last");
    assert!(
        why.contains("1 -> 3 replicas") && why.contains("custom.bytes_last 5.0 over 1 replicas"),
        "{why}"
    );
}

#[test]
fn a_digest_that_matches_nothing_is_refused() {
    let dir = TempDir::new("exec-unknown");
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let _a = Agent::start(&control.addr, "a1", 2, dir.path());
    let digest = format!("sha256:{}", "ab".repeat(32));
    control.cli_ok(&["submit", &exec_graph(dir.path(), "ghost", &digest)]);
    let reason = wait_event(&control, "replica-failed", "no artifact");
    assert!(reason.contains(&digest), "{reason}");
}

#[test]
fn an_artifact_whose_bytes_do_not_match_its_digest_is_refused() {
    let dir = TempDir::new("exec-tampered");
    let data = dir.path().join("control");
    let control = Control::start(&data, &["--startup-grace-ms", "0"]);
    let up = control.cli_json(&["upload", exec_upper().to_str().unwrap()]);
    let digest = up["sha256"].as_str().unwrap().to_string();
    // Tamper with the stored copy: what an agent fetches no longer hashes to the digest.
    let stored = data
        .join("artifacts")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes.extend_from_slice(b"#!tampered");
    std::fs::write(&stored, bytes).unwrap();

    let _a = Agent::start(&control.addr, "a1", 2, dir.path());
    control.cli_ok(&["submit", &exec_graph(dir.path(), "tampered", &digest)]);
    let reason = wait_event(&control, "replica-failed", "digest mismatch");
    assert!(reason.contains("refusing to run it"), "{reason}");
    let out = control.cli(&[
        "invoke",
        "tampered",
        "--input",
        "=x",
        "--deadline-ms",
        "1000",
    ]);
    assert!(
        !out.status.success(),
        "a tampered artifact served a request"
    );
}
