//! Config files: every flag is a key, flags win, and mistakes name the file and line.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn big_graph(dir: &std::path::Path) -> String {
    let p = dir.join("big.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"big\"\n[[task]]\nid = \"a\"\ncode = {{ builtin = \"identity\", params = {{ blob = \"{}\" }} }}\nestimate = \"1ms\"\n",
            "x".repeat(2 << 20)
        ),
    )
    .unwrap();
    p.display().to_string()
}

fn start_with(config: &std::path::Path, extra: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(CONTROL)
        .arg("--config")
        .arg(config)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(
        line.starts_with("prescient-control listening on "),
        "{line:?}"
    );
    (child, addr)
}

#[test]
fn settings_come_from_the_file_and_flags_win() {
    let dir = TempDir::new("config");
    let config = dir.path().join("control.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nmax_message_bytes = 1048576\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let graph = big_graph(dir.path());

    // The file's 1 MiB limit applies: a 2 MiB submit is refused.
    let (mut child, addr) = start_with(&config, &[]);
    let out = cli(&addr, &["submit", &graph]);
    assert!(!out.status.success(), "the config file's limit was ignored");
    assert!(String::from_utf8_lossy(&out.stderr).contains("too large"));
    child.kill().unwrap();
    child.wait().unwrap();

    // A flag overrides the file; the data dir still comes from the file.
    let (mut child, addr) = start_with(&config, &["--max-message-bytes", "8388608"]);
    let out = cli(&addr, &["submit", &graph]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(dir.path().join("data/registry.redb").exists());
}

#[test]
fn an_unknown_key_names_the_file_and_line() {
    let dir = TempDir::new("config-bad");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "control = \"127.0.0.1:1\"\n\nheartbeat = 5\n").unwrap();
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:3: unknown key \"heartbeat\"",
            config.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("heartbeat_ms"),
        "the known keys are listed: {err}"
    );
}

#[test]
fn the_shipped_configs_parse() {
    for (bin, file) in [
        (CONTROL, "deploy/control.toml"),
        (AGENT, "deploy/agent.toml"),
    ] {
        // --help after the config: parsing succeeds (clap prints help and exits 0).
        let out = Command::new(bin)
            .args(["--config", &repo_path(file), "--help"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
