//! Invalid graph files are refused, naming the culprit, and nothing is stored.

mod common;
use common::*;

/// (file, what the error must name)
const CASES: &[(&str, &[&str])] = &[
    ("cycle.toml", &["cycle.toml:3:1", "cycle: a -> b -> a"]),
    (
        "type-mismatch.toml",
        &[
            "type-mismatch.toml:15:1",
            "embed.vector -> index.vector",
            "tensor<f32>[?,768]",
        ],
    ),
    (
        "dangling-edge.toml",
        &["dangling-edge.toml:9:1", "unknown task \"ghost\""],
    ),
    (
        "syntax-error.toml",
        &["syntax-error.toml:6:1", "expected `,`"],
    ),
];

fn check(control: &Control, extra: &[&str]) {
    for (file, needles) in CASES {
        let path = repo_path(&format!("tests/data/invalid/{file}"));
        let mut args = vec!["submit", path.as_str()];
        args.extend_from_slice(extra);
        let out = control.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        for n in *needles {
            assert!(stderr.contains(n), "{file}: {n:?} missing from:\n{stderr}");
        }
    }
    assert_eq!(control.cli_json(&["graphs"]), serde_json::json!([]));
    assert_eq!(
        control.cli_ok(&["events"]),
        "",
        "a rejected graph must leave no event"
    );
}

#[test]
fn the_cli_refuses_invalid_files() {
    let dir = TempDir::new("invalid");
    let control = Control::start(dir.path(), &[]);
    check(&control, &[]);
}

#[test]
fn the_control_node_refuses_them_too() {
    // Skip the client-side check: the server must validate on its own and name the culprit.
    let dir = TempDir::new("invalid-server");
    let control = Control::start(dir.path(), &[]);
    check(&control, &["--no-local-check"]);
    assert!(control.log_text().contains("graph rejected"));
}

#[test]
fn validate_reports_every_problem() {
    let out = cli(
        "127.0.0.1:1",
        &[
            "validate",
            &repo_path("tests/data/invalid/type-mismatch.toml"),
        ],
    );
    assert!(!out.status.success());
    let ok = cli(
        "127.0.0.1:1",
        &[
            "validate",
            "--json",
            &repo_path("examples/fan-out-fan-in.toml"),
        ],
    );
    assert!(ok.status.success());
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["chains"].as_array().unwrap().len(), 3);
}
