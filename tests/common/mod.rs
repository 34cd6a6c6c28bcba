//! Helpers for integration tests: real `prescient-control` processes and CLI runs.
#![allow(dead_code)]

use prescient::launch::{self, Binaries, Proc, AGENT_READY, CONTROL_READY};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub const CONTROL: &str = env!("CARGO_BIN_EXE_prescient-control");
pub const CLI: &str = env!("CARGO_BIN_EXE_prescient");
pub const AGENT: &str = env!("CARGO_BIN_EXE_prescient-agent");

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "prescient-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemons built for this test run.
pub fn binaries() -> Binaries {
    Binaries {
        control: CONTROL.into(),
        agent: AGENT.into(),
    }
}

/// Starts `cmd` through the shared launcher, failing the test with the daemon's log.
fn launch(mut cmd: Command, log: &Path, ready: &str, name: &str) -> Proc {
    cmd.env("PRESCIENT_LOG", "info");
    launch::start(cmd, log, ready, name)
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(log).unwrap_or_default()))
}

/// A control node running as a child process on an ephemeral loopback port.
pub struct Control {
    proc: Proc,
    pub addr: String,
    pub log: PathBuf,
}

impl Control {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Control {
        Self::start_on(data_dir, "127.0.0.1:0", extra)
    }

    /// Starts on a given address: a restarted node must come back where agents look for it.
    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Control {
        static N: AtomicU32 = AtomicU32::new(0);
        let log =
            data_dir.with_extension(format!("control-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = binaries().control(listen, data_dir);
        cmd.args(extra);
        let proc = launch(cmd, &log, CONTROL_READY, "control");
        Control {
            addr: proc.addr.clone(),
            proc,
            log,
        }
    }

    /// SIGKILL: no chance to flush or shut down cleanly.
    pub fn kill9(mut self) {
        self.proc.kill9().unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.child.try_wait().unwrap().is_none()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.addr, args)
    }

    /// Runs the CLI and returns stdout, failing the test if it exits non-zero.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "prescient {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.cli_ok(&all)).unwrap()
    }

    /// Waits until `n` agents have registered: an agent's ready line comes before it has
    /// registered (loading the probes, then the first heartbeat), and a graph submitted before
    /// then is placed on the hosts already known.
    pub fn wait_agents(&self, n: usize) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let v = self.cli_json(&["agents"]);
            let have = v.as_array().map_or(0, |a| a.len());
            if have >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < until,
                "{have} of {n} agents registered\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

pub fn cli(addr: &str, args: &[&str]) -> Output {
    Command::new(CLI)
        .arg("--control")
        .arg(addr)
        .args(args)
        .output()
        .expect("running prescient")
}

pub fn repo_path(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

/// A host agent running as a child process.
pub struct Agent {
    proc: Proc,
    pub name: String,
    pub ingress: String,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(control: &str, name: &str, cpus: u32, log_dir: &Path) -> Agent {
        Agent::start_with(control, name, cpus, log_dir, &[])
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// An agent started with `extra` flags (e.g. `--provisioner qemu`).
    pub fn start_with(
        control: &str,
        name: &str,
        cpus: u32,
        log_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        let log = log_dir.join(format!("agent-{name}.log"));
        let mut cmd = binaries().agent(control, name, cpus);
        cmd.args(["--heartbeat-ms", "200"]).args(extra);
        let proc = launch(cmd, &log, AGENT_READY, name);
        Agent {
            ingress: proc.addr.clone(),
            proc,
            name: name.to_string(),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits until every task of `graph` has `per_task` ready replicas; returns the replicas JSON.
pub fn wait_deployed(
    control: &Control,
    graph: &str,
    tasks: usize,
    per_task: usize,
) -> serde_json::Value {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = control.cli_json(&["replicas", graph]);
        let ready = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "ready")
            .count();
        if ready >= tasks * per_task && v["epoch"].as_u64().unwrap_or(0) > 0 {
            // Give the newest routing table a moment to reach every agent.
            std::thread::sleep(std::time::Duration::from_millis(300));
            return control.cli_json(&["replicas", graph]);
        }
        assert!(
            std::time::Instant::now() < until,
            "graph {graph} not deployed: {v}\n{}",
            control.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Event kinds and subjects, in order.
pub fn events(control: &Control) -> Vec<(String, String, String)> {
    control
        .cli_ok(&["events", "--json"])
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["kind"].as_str().unwrap().to_string(),
                v["subject"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Kills its process when dropped, so a failing assertion leaves nothing running.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin` with `args` and returns the child and the addresses of its first two lines.
pub fn start(bin: &str, args: &[&str]) -> (Killed, String, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(child.stdout.take().unwrap());
    let mut last = || {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l.trim().rsplit(' ').next().unwrap().to_string()
    };
    let (a, b) = (last(), last());
    (Killed(child), a, b)
}

pub fn get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

pub fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (head, body) = get(addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition")
}

pub fn value(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Summary(q) => q.len() as f64,
            prometheus_parse::Value::Histogram(b) => b.len() as f64,
        })
}

/// A control node with `/metrics`: (process, API address, metrics address).
pub fn start_control_with_metrics(data_dir: &Path) -> (Killed, String, String) {
    start(
        CONTROL,
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--startup-grace-ms",
            "0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
}

/// An agent with `/metrics`: (process, ingress address, metrics address).
pub fn start_agent_with_metrics(control: &str, name: &str, cpus: u32) -> (Killed, String, String) {
    start(
        AGENT,
        &[
            "--control",
            control,
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--cpus",
            &cpus.to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
}
