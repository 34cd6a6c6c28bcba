//! The eBPF probes, loaded by a real agent as root: TCP bytes counted for a VM's cgroup match
//! what its processes sent, and a CPU hog in the VM raises its run-queue latency. Without root
//! the agent must say that it runs without probes, and how it measures instead.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GRAPH: &str = r#"
name = "probed"

[[task]]
id = "work"
code = { builtin = "sha256" }
inputs = { request = "bytes" }
outputs = { digest = "json" }
estimate = "50us"
resources = { cpu = "1", memory = "256MiB" }
"#;

/// Sends `N` bytes to itself over loopback TCP, over two connections:
/// - a quarter over one opened first, which the agent's per-second read of the VM's sockets
///   finds live (after a 1.5 s wait); another quarter over it after that, then it closes, so
///   its last bytes are settled from the probes' record of its close;
/// - half from a child process it forks, which the agent never sees (it sends at once and
///   exits without closing its socket: the kernel closes it as the child exits): counted
///   because its parent is.
///
/// Then it checks that everything arrived.
const TRAFFIC: &str = r#"
import os, socket, sys, threading, time
n = int(sys.argv[1])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(2)
got = [0]
def drain():
    c, _ = srv.accept()
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        got[0] += len(b)
def send(s, count):
    buf = b"x" * (1 << 20)
    left = count
    while left > 0:
        left -= s.send(buf[: min(left, len(buf))])
readers = [threading.Thread(target=drain) for _ in range(2)]
for t in readers:
    t.start()
early = socket.create_connection(srv.getsockname())
send(early, n // 4)
time.sleep(1.5)
child = os.fork()
if child == 0:
    s = socket.create_connection(srv.getsockname())
    send(s, n // 2)
    os._exit(0)
send(early, n - n // 2 - n // 4)
early.close()
_, status = os.waitpid(child, 0)
for t in readers:
    t.join()
assert status == 0, status
assert got[0] == n, got[0]
"#;

/// Wakes every millisecond: its run-queue waits show how contended the VM's CPU is.
const SLEEPER: &str = "import time\nwhile True: time.sleep(0.001)\n";
const HOG: &str = "while True: pass\n";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Every hierarchy's directory of the replica's cgroup (v1: cpu, memory, ...; v2: one).
fn cgroup_procs(replica: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let v2 = PathBuf::from("/sys/fs/cgroup/prescient").join(replica);
    if v2.join("cgroup.procs").exists() {
        out.push(v2.join("cgroup.procs"));
    }
    for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let p = entry
            .path()
            .join("prescient")
            .join(replica)
            .join("cgroup.procs");
        if p.exists() {
            out.push(p);
        }
    }
    out
}

/// Runs python3 `script` with `args` inside the replica's cgroup (joined before exec).
fn spawn_in(procs: &[PathBuf], dir: &TempDir, name: &str, script: &str, args: &[&str]) -> Killed {
    let path = dir.path().join(format!("{name}.py"));
    std::fs::write(&path, script).unwrap();
    let join: String = procs
        .iter()
        .map(|p| format!("echo $$ > {} && ", p.display()))
        .collect();
    let cmd = format!("{join}exec python3 {} {}", path.display(), args.join(" "));
    Killed(
        Command::new("sh")
            .args(["-c", &cmd])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn raw_value(body: &str, metric: &str, replica: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(metric) && l.contains(&format!("replica=\"{replica}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// (count, sum in seconds) of the replica's run-queue latency histogram on the agent.
fn runq(agent_metrics: &str, replica: &str) -> (f64, f64) {
    let (_, body) = get(agent_metrics, "/metrics");
    (
        raw_value(
            &body,
            "prescient_vm_runqueue_latency_seconds_count",
            replica,
        ),
        raw_value(&body, "prescient_vm_runqueue_latency_seconds_sum", replica),
    )
}

#[test]
fn probes_count_vm_tcp_bytes_and_run_queue_latency() {
    let dir = TempDir::new("probes");
    let data = dir.path().join("control");
    let (_control, api, _) = start_control_with_metrics(&data);
    let (_agent, _, agent_metrics) = start_agent_with_metrics(&api, "p1", 2);
    let until = Instant::now() + Duration::from_secs(20);
    let agents = loop {
        let out = cli(&api, &["--json", "agents"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        assert!(Instant::now() < until, "the agent never registered");
        std::thread::sleep(Duration::from_millis(100));
    };
    let telemetry = agents[0]["telemetry"].as_str().unwrap().to_string();
    let loaded = value(
        &scrape(&agent_metrics),
        "prescient_agent_probes_loaded",
        &[],
    );
    if !is_root() {
        // The fallback: said once, with the reason, and visible to users.
        assert!(telemetry.starts_with("off: "), "{telemetry}");
        assert_eq!(loaded, Some(0.0));
        eprintln!("not root: checked the fallback only ({telemetry})");
        return;
    }
    assert!(telemetry.starts_with("ebpf: "), "{telemetry}");
    assert_eq!(loaded, Some(1.0));

    let graph = dir.path().join("probed.toml");
    std::fs::write(&graph, GRAPH).unwrap();
    let out = cli(&api, &["submit", graph.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let until = Instant::now() + Duration::from_secs(30);
    let replica = loop {
        let out = cli(&api, &["--json", "replicas", "probed"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(r) = v["replicas"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["state"] == "ready"))
        {
            break r["replica"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < until, "never deployed: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let procs = cgroup_procs(&replica);
    assert!(!procs.is_empty(), "no cgroup for {replica}");

    // TCP bytes: 48 MiB sent and received inside the VM, counted within 5%.
    let n: u64 = 48 << 20;
    let body = get(&agent_metrics, "/metrics").1;
    let sent0 = raw_value(&body, "prescient_vm_tcp_sent_bytes_total", &replica);
    let recv0 = raw_value(&body, "prescient_vm_tcp_received_bytes_total", &replica);
    let mut traffic = spawn_in(&procs, &dir, "traffic", TRAFFIC, &[&n.to_string()]);
    let status = traffic.0.wait().unwrap();
    assert!(status.success(), "the traffic script failed: {status}");
    let until = Instant::now() + Duration::from_secs(10);
    let (sent, received) = loop {
        let body = get(&agent_metrics, "/metrics").1;
        let sent = raw_value(&body, "prescient_vm_tcp_sent_bytes_total", &replica) - sent0;
        let received = raw_value(&body, "prescient_vm_tcp_received_bytes_total", &replica) - recv0;
        if (sent >= n as f64 && received >= n as f64) || Instant::now() > until {
            break (sent, received);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for (what, counted) in [("sent", sent), ("received", received)] {
        let error = (counted - n as f64).abs() / n as f64;
        assert!(
            error <= 0.05,
            "{what}: counted {counted} bytes for {n} ({:.2}% off)",
            error * 100.0
        );
        eprintln!("{what}: counted {counted} of {n} bytes");
    }

    // Run-queue latency: a sleeper alone in the VM, then with three CPU hogs beside it in a
    // VM limited to one CPU.
    let _sleeper = spawn_in(&procs, &dir, "sleeper", SLEEPER, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let (c0, s0) = runq(&agent_metrics, &replica);
    std::thread::sleep(Duration::from_secs(3));
    let (c1, s1) = runq(&agent_metrics, &replica);
    let hogs: Vec<Killed> = (0..3)
        .map(|i| spawn_in(&procs, &dir, &format!("hog{i}"), HOG, &[]))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let cpu = || {
        raw_value(
            &get(&agent_metrics, "/metrics").1,
            "prescient_vm_probe_cpu_seconds_total",
            &replica,
        )
    };
    let (c2, s2) = runq(&agent_metrics, &replica);
    let (cpu2, t2) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (c3, s3) = runq(&agent_metrics, &replica);
    let (cpu3, t3) = (cpu(), Instant::now());
    // The VM is limited to one CPU and its hogs use all of it: the probes' CPU time (from
    // context switches) says so, within the agent's 1 s sampling.
    let cores = (cpu3 - cpu2) / (t3 - t2).as_secs_f64();
    eprintln!("CPU of the VM under the hogs: {cores:.2} cores");
    assert!((0.6..1.4).contains(&cores), "{cores} cores");
    let quiet = (s1 - s0) / (c1 - c0).max(1.0);
    let hogged = (s3 - s2) / (c3 - c2).max(1.0);
    eprintln!(
        "mean run-queue wait: {:.1} us alone ({} waits), {:.1} us under the hogs ({} waits)",
        quiet * 1e6,
        c1 - c0,
        hogged * 1e6,
        c3 - c2
    );
    assert!(c1 - c0 > 100.0, "the sleeper's wake-ups were not seen");
    assert!(c3 - c2 > 10.0, "no waits seen under the hogs");
    assert!(
        hogged > 5.0 * quiet,
        "run-queue latency did not rise: {quiet} s alone, {hogged} s under the hogs"
    );
    // The control node got the VM's probe samples too.
    let out = cli(&api, &["--json", "replicas", "probed"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p99 = v["replicas"][0]["run_queue_p99_us"].as_f64();
    assert!(p99.is_some_and(|p| p > 0.0), "{v}");
    let out = cli(&api, &["--json", "agents"]);
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        agents[0]["run_queue_p99_us"]
            .as_f64()
            .is_some_and(|p| p > 0.0),
        "the host's run-queue p99 over its last 10 s: {agents}"
    );
    drop(hogs);
}
