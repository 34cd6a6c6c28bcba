//! `/metrics` on the control node and on agents parses as Prometheus text and says what
//! happened.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills its process when dropped, so a failing assertion leaves nothing running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin` with `args` and returns the child and the addresses of its first two lines.
fn start(bin: &str, args: &[&str]) -> (Killed, String, String) {
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

fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (head, body) = get(addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition")
}

fn value(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

#[test]
fn metrics_parse_and_count_what_ran() {
    let dir = TempDir::new("metrics");
    let data = dir.path().join("control");
    let data = data.to_str().unwrap();
    let (_control, api, control_metrics) = start(
        CONTROL,
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data,
            "--startup-grace-ms",
            "0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let (_agent, _ingress, agent_metrics) = start(
        AGENT,
        &[
            "--control",
            &api,
            "--listen",
            "127.0.0.1:0",
            "--name",
            "a1",
            "--cpus",
            "4",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let out = cli(
        &api,
        &["submit", &repo_path("examples/three-stage-chain.toml")],
    );
    assert!(out.status.success());
    let until = Instant::now() + Duration::from_secs(30);
    while value(
        &scrape(&control_metrics),
        "prescient_replicas",
        &[("task", "infer"), ("state", "ready")],
    ) != Some(1.0)
    {
        assert!(Instant::now() < until, "never deployed");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let load = cli(
        &api,
        &[
            "--json",
            "load",
            "three-stage-chain",
            "--concurrency",
            "2",
            "--duration",
            "1",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&load.stdout).unwrap();
    let sent = report["sent"].as_f64().unwrap();
    assert_eq!(report["errors"], 0, "{report}");

    let until = Instant::now() + Duration::from_secs(15);
    let c = loop {
        let c = scrape(&control_metrics);
        if value(
            &c,
            "prescient_task_executions_total",
            &[("task", "postprocess")],
        ) == Some(sent)
        {
            break c;
        }
        assert!(Instant::now() < until, "executions never reached {sent}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        value(&c, "prescient_agents", &[("state", "ready")]),
        Some(1.0)
    );
    assert_eq!(value(&c, "prescient_graphs_deployed", &[]), Some(1.0));
    assert_eq!(
        value(&c, "prescient_task_errors_total", &[("task", "infer")]),
        Some(0.0)
    );
    assert_eq!(
        value(&c, "prescient_task_execution_seconds", &[("task", "infer")]),
        Some(3.0),
        "a summary with three quantiles"
    );

    let util = value(&c, "prescient_host_cpu_utilization", &[("host", "a1")])
        .expect("host samples arrive");
    assert!((0.0..=1.0).contains(&util), "{util}");
    assert!(value(&c, "prescient_host_memory_used_bytes", &[("host", "a1")]).unwrap() > 0.0);

    // Each replica's VM: its cgroup's memory and its limits (this machine has writable cgroups).
    let mem = value(&c, "prescient_replica_memory_bytes", &[("task", "infer")])
        .expect("VM samples arrive");
    assert!(mem > 0.0, "{mem}");
    assert_eq!(
        value(
            &c,
            "prescient_replica_cpu_limit_cores",
            &[("task", "infer")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &c,
            "prescient_replica_memory_limit_bytes",
            &[("task", "infer")]
        ),
        Some((512u64 << 20) as f64)
    );

    let a = scrape(&agent_metrics);
    assert_eq!(
        value(&a, "prescient_agent_connected", &[("agent", "a1")]),
        Some(1.0)
    );
    assert_eq!(
        value(&a, "prescient_agent_replicas", &[("graph", "g1")]),
        Some(3.0)
    );
    assert!(value(&a, "prescient_ingress_bytes_total", &[("direction", "in")]).unwrap() > 0.0);

    let (head, _) = get(&control_metrics, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
