//! The simulator and the control node make the same decision from the same measurements: the
//! control node's own path (monitor windows → `readings::read` → `plan`) and the simulator's
//! (ticks → its `Prescient` scaler) both end in the decision crate's `scaling::size`, and must
//! agree on how many replicas a load needs.

use prescient_control::monitor::{Monitor, WindowView};
use prescient_policy::snapshot::{Capacity, Snapshot};
use prescient_policy::{apply, observe, plan, Action, Config};
use prescient_schemas::file;
use prescient_schemas::sketch::Sketch;
use prescient_sim::queue::{Observation, Scaler};
use prescient_sim::scalers::Prescient;
use std::time::Duration;

const GRAPH: &str = r#"
name = "svc"
[[task]]
id = "work"
code = { builtin = "sleep", params = { mean = "20ms" } }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "20ms"

[scaling]
max_replicas = 50
window = "10s"
scale_out_cooldown = "0s"
"#;

/// The control node's decision for `per_s` executions a second of `exec_ms`, each queued
/// `queue_ms`, over the graph's window.
fn control_node_decides(per_s: u64, exec_ms: f64, queue_ms: f64) -> u32 {
    let graph = file::parse("svc.toml", GRAPH).expect("parses").graph;
    let record = prescient_sim::fleet::record("g1", graph);
    let config = Config {
        startup_grace: Duration::ZERO,
        heartbeat_timeout: Duration::from_secs(1 << 30),
        ..Config::default()
    };
    let mut snap = Snapshot::default();
    let capacity = Capacity {
        cpu_millicores: 64_000,
        memory_bytes: 64 << 30,
        ..Capacity::default()
    };
    observe::registered(&mut snap, "a1", capacity, vec![], Duration::ZERO);
    snap.hosts.get_mut("a1").expect("added").reported = None;
    snap.wanted.insert("g1".into(), record.into());
    let t0 = Duration::from_secs(1);
    for a in plan(&snap, &config, t0) {
        apply(&mut snap, &a, t0);
    }
    let ids: Vec<String> = snap.deployments["g1"]
        .replicas
        .iter()
        .map(|r| r.id.clone())
        .collect();
    for id in &ids {
        observe::provisioned(&mut snap, "g1", id, "addr", t0);
    }
    // Ten seconds of windows, ending two seconds back (as telemetry arrives).
    let now_ms: u64 = 1_700_000_000_000;
    let mut monitor = Monitor::default();
    for back in 0..12 {
        let second = now_ms / 1000 - back;
        let mut exec = Sketch::default();
        let mut queue = Sketch::default();
        exec.record_n(exec_ms * 1e6, per_s);
        queue.record_n(queue_ms * 1e6, per_s);
        monitor.record_window(&WindowView {
            graph_id: "g1".into(),
            task: "work".into(),
            replica: ids[0].clone(),
            second,
            exec,
            queue,
            ..Default::default()
        });
    }
    prescient_control::readings::read(&monitor, &mut Default::default(), &mut snap, now_ms);
    let now = Duration::from_secs(20);
    plan(&snap, &config, now)
        .into_iter()
        .find_map(|a| match a {
            Action::ScaleOut { to, .. } => Some(to),
            _ => None,
        })
        .unwrap_or(1)
}

/// The simulator's decision for the same load, seen tick by tick.
fn simulator_decides(per_s: u64, exec_ms: f64, queue_ms: f64) -> u32 {
    let graph = file::parse("svc.toml", GRAPH).expect("parses").graph;
    let policy = graph.scaling.expect("scaled");
    let mut scaler = Prescient::new(policy, exec_ms / 1e3, 2.0);
    let mut desired = 1;
    for tick in 1..=5 {
        desired = scaler.desired(&Observation {
            now: 20.0 + 2.0 * f64::from(tick),
            concurrency: 0.0,
            arrivals_per_s: per_s as f64,
            wait_p50: queue_ms / 1e3,
            ready: 1,
            current: 1,
            readied_lead_s: None,
        });
        if desired > 1 {
            break;
        }
    }
    desired
}

#[test]
fn the_simulator_and_the_control_node_size_a_load_alike() {
    for (per_s, exec_ms, queue_ms) in [
        (30, 20.0, 100.0),
        (100, 20.0, 0.0),
        (200, 5.0, 40.0),
        (10, 300.0, 0.0),
    ] {
        let live = control_node_decides(per_s, exec_ms, queue_ms);
        let sim = simulator_decides(per_s, exec_ms, queue_ms);
        // 30/s × (20 + 100 ms) ÷ 0.7 = 5.1 → 6, and so on.
        let expected = ((per_s as f64 * (exec_ms + queue_ms) / 1e3) / 0.7)
            .ceil()
            .max(1.0) as u32;
        assert_eq!(
            (live, sim),
            (expected, expected),
            "{per_s}/s × ({exec_ms} + {queue_ms} ms)"
        );
    }
}
