//! The graph registry end to end: CLI -> Cap'n Proto -> control node -> disk, across kill -9.

mod common;
use common::*;

const EXAMPLES: &[&str] = &[
    "examples/three-stage-chain.toml",
    "examples/fan-out-fan-in.toml",
];

#[test]
fn graphs_survive_kill_9_and_restart_unchanged() {
    let dir = TempDir::new("kill9");
    let control = Control::start(dir.path(), &[]);
    let mut ids = Vec::new();
    for ex in EXAMPLES {
        let out = control.cli_json(&["submit", &repo_path(ex)]);
        assert_eq!(out["created"], true);
        assert_eq!(out["version"], 1);
        ids.push(out["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids, ["g1", "g2"]);
    // A changed resubmit is a new version of the same id; an identical one is not.
    let again = control.cli_json(&["submit", &repo_path(EXAMPLES[0])]);
    assert_eq!(
        (again["id"].as_str(), again["created"].as_bool()),
        (Some("g1"), Some(false))
    );

    let list_before = control.cli_json(&["graphs"]);
    let graphs_before: Vec<_> = ids
        .iter()
        .map(|id| control.cli_json(&["graph", id]))
        .collect();
    assert_eq!(list_before.as_array().unwrap().len(), 2);
    assert_eq!(
        graphs_before[0]["graph"]["tasks"].as_array().unwrap().len(),
        3
    );
    assert_eq!(
        graphs_before[1]["graph"]["edges"].as_array().unwrap().len(),
        6
    );

    control.kill9();
    let control = Control::start(dir.path(), &[]);
    assert_eq!(control.cli_json(&["graphs"]), list_before);
    for (id, before) in ids.iter().zip(&graphs_before) {
        assert_eq!(
            &control.cli_json(&["graph", id]),
            before,
            "graph {id} changed"
        );
    }
    // Lookup by name resolves to the same record.
    assert_eq!(
        control.cli_json(&["graph", "image-understanding"]),
        graphs_before[1]
    );
}

#[test]
fn removal_is_durable_and_recorded() {
    let dir = TempDir::new("rm");
    let control = Control::start(dir.path(), &[]);
    control.cli_json(&["submit", &repo_path(EXAMPLES[0])]);
    let removed = control.cli_json(&["rm", "g1"]);
    assert_eq!(removed["name"], "three-stage-chain");
    control.kill9();

    let control = Control::start(dir.path(), &[]);
    assert_eq!(control.cli_json(&["graphs"]), serde_json::json!([]));
    let out = control.cli(&["graph", "g1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("g1\" was removed"));
    let events = control.cli_ok(&["events", "--json"]);
    let kinds: Vec<String> = events
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["graph-submitted", "graph-removed"]);
    // The same name submitted again is a new graph with a fresh id.
    let again = control.cli_json(&["submit", &repo_path(EXAMPLES[0])]);
    assert_eq!(again["id"], "g2");
}

#[test]
fn human_output_is_a_table() {
    let dir = TempDir::new("table");
    let control = Control::start(dir.path(), &[]);
    let out = control.cli_ok(&["submit", &repo_path(EXAMPLES[1])]);
    assert_eq!(
        out.trim(),
        "submitted \"image-understanding\" as g1 version 1"
    );
    let table = control.cli_ok(&["graphs"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID  NAME"));
    assert!(lines
        .next()
        .unwrap()
        .starts_with("g1  image-understanding  1        5      6"));
    let detail = control.cli_ok(&["graph", "g1"]);
    assert!(detail.contains("decode -> caption -> merge"), "{detail}");
}
