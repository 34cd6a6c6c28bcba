//! `bench boot`: how long a replica takes from placement to serving, on real clusters of this
//! machine. With `--provisioner qemu`, two agents side by side: one boots every microVM
//! (`--no-snapshots`), the other restores from the snapshot it saved of its first; a third keeps
//! a warm pool of one VM (a keeper graph's `warm_vms = 1`), which each start takes. Rounds
//! alternate between them. Per start: placement to ready (the control node's `replica-ready`),
//! QEMU started to the guest running, the deploy in the guest, and the QEMU process's RSS once
//! idle. Then a 2-stage
//! chain's p50 at concurrency 1 through VMs against the same chain on process workers.

use super::*;
use crate::local::Proc;
use anyhow::Context;
use prescient::launch::{self, Binaries, AGENT_READY};
use std::path::Path;

/// The benchmark's knobs.
pub(super) struct Plan {
    pub provisioner: String,
    pub runs: usize,
    pub chain_seconds: f64,
}

const ONE: &str = r#"
name = "NAME"
[[task]]
id = "t"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "100us"
resources = { cpu = "1", memory = "128MiB" }
"#;

fn agent(dir: &Path, control: &str, name: &str, extra: &[&str]) -> Result<Proc> {
    let mut cmd = Binaries::siblings()?.agent(control, name, 4);
    cmd.args(["--no-probes", "--memory", "8GiB", "--data-dir"])
        .arg(dir.join(name))
        .args(extra);
    Ok(launch::start(
        cmd,
        &dir.join(format!("{name}.log")),
        AGENT_READY,
        name,
    )?)
}

/// The RSS of the QEMU process whose command line names `needle`, in bytes.
fn qemu_rss(needle: &str) -> Option<u64> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("qemu-system") && cmd.contains(needle) {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            return Some(kb * 1024);
        }
    }
    None
}

/// Submits a one-task graph (to a cluster of one agent) and returns its time to ready, its
/// VM's start time and how it started, and the idle VM's RSS; then removes it and waits for
/// its VM to stop.
async fn one_start(
    client: &ControlClient,
    name: &str,
    run_dir: &Path,
) -> Result<(f64, Option<f64>, Option<String>, Option<u64>, Option<f64>)> {
    let text = ONE.replace("NAME", name);
    let f = file::parse(&format!("{name}.toml"), &text)?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the bench graph was rejected");
    };
    let seen = client
        .events(0, 1_000_000)
        .await?
        .last()
        .map_or(0, |e| e.seq);
    wait_deployed(client, &record.id, 1, Duration::from_secs(120)).await?;
    let ready = client
        .events(seen, 100_000)
        .await?
        .into_iter()
        .find(|e| e.kind == "replica-ready" && e.subject.starts_with(&record.id))
        .context("no replica-ready event")?;
    // "on a1, ready 4321 ms after placement; its VM booted in 4100 ms; ..."
    let number_after = |text: &str, key: &str| -> Option<f64> {
        let rest = &text[text.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let took = number_after(&ready.reason, "ready ").context("no time to ready")?;
    let vm = ["booted in ", "restored in "]
        .iter()
        .find_map(|k| number_after(&ready.reason, k));
    let how = ["booted", "restored"]
        .iter()
        .find(|k| ready.reason.contains(&format!("its VM {k}")))
        .map(|k| k.to_string())
        .or_else(|| {
            ready
                .reason
                .contains("took a warm VM from the pool")
                .then(|| "warm".to_string())
        });
    let deploy = number_after(&ready.reason, "deployed in it in ");
    // Idle for a moment first: what a VM holds at rest.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let needle = run_dir
        .join(format!("{}.t.r", record.id))
        .display()
        .to_string();
    let rss = qemu_rss(&needle);
    client.remove(&record.id).await?;
    // Its VM drains and stops before the next one starts.
    let until = std::time::Instant::now() + Duration::from_secs(40);
    while qemu_rss(&needle).is_some() && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((took, vm, how, rss, deploy))
}

/// Waits until `log` says a warm VM is idle `n` times, then for the heartbeat that tells the
/// control node.
async fn wait_idle(log: &Path, n: usize) -> Result<()> {
    crate::demo_vms::wait_log(log, "warm VM booted and idle", n).await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    Ok(())
}

pub(super) async fn boot(plan: Plan) -> Result<serde_json::Value> {
    if plan.provisioner != "qemu" && plan.provisioner != "process" {
        bail!("--provisioner {:?}: qemu or process", plan.provisioner);
    }
    let qemu = plan.provisioner == "qemu";
    let dir = std::env::temp_dir().join(format!("prescient-bench-boot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = measure(&plan, qemu, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(plan: &Plan, qemu: bool, dir: &Path) -> Result<serde_json::Value> {
    // Two clusters: in one every replica starts cold (process workers, or VMs booted), in the
    // other VMs restore from a snapshot.
    let mut modes: Vec<(&str, Vec<&str>)> = vec![(
        "boot",
        if qemu {
            vec!["--provisioner", "qemu", "--no-snapshots"]
        } else {
            vec![]
        },
    )];
    if qemu {
        modes.push(("restore", vec!["--provisioner", "qemu"]));
        modes.push(("warm", vec!["--provisioner", "qemu"]));
    }
    let mut clusters = Vec::new();
    for (mode, extra) in &modes {
        let d = dir.join(mode);
        std::fs::create_dir_all(&d)?;
        let control = LocalCluster::start_control(&d, 300)?;
        let a = agent(&d, &control.addr, "a1", extra)?;
        let cluster = LocalCluster {
            control,
            agents: vec![a],
        };
        let client = connect_registered(&cluster).await?;
        clusters.push((*mode, cluster, client, d.join("a1/vms")));
    }
    // The restoring agent's first VM boots and saves the snapshot; not measured.
    if qemu {
        let (_, _, client, run_dir) = &clusters[1];
        one_start(client, "warm", run_dir).await?;
        crate::demo_vms::wait_log(&dir.join("restore/a1.log"), "VM snapshot saved", 1).await?;
        // The warm cluster keeps one idle VM of the bench's shape for a keeper graph.
        let (_, _, client, _) = &clusters[2];
        let text = ONE.replace("NAME", "keeper") + "[scaling]\nmax_replicas = 2\nwarm_vms = 1\n";
        let f = file::parse("keeper.toml", &text)?;
        let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
            bail!("the keeper graph was rejected");
        };
        wait_deployed(client, &record.id, 1, Duration::from_secs(120)).await?;
    }
    let mut starts: Vec<serde_json::Value> = Vec::new();
    // The warm start first, then its pool refilled before the others start: no round's boot
    // shares the CPUs with another VM's.
    let order: Vec<usize> = if qemu { vec![2, 0, 1] } else { vec![0] };
    for round in 0..plan.runs.max(1) {
        for &i in &order {
            let (mode, _, client, run_dir) = &clusters[i];
            if *mode == "warm" {
                wait_idle(&dir.join("warm/a1.log"), round + 1).await?;
            }
            let (took, vm, how, rss, deploy) =
                one_start(client, &format!("s{round}"), run_dir).await?;
            if *mode == "warm" {
                wait_idle(&dir.join("warm/a1.log"), round + 2).await?;
            }
            starts.push(serde_json::json!({
                "mode": mode, "round": round, "placement_to_ready_ms": took,
                "vm_start_ms": vm, "started": how, "rss_bytes": rss, "deploy_ms": deploy,
            }));
        }
    }
    let of = |mode: &str, key: &str| {
        let v: Vec<f64> = starts
            .iter()
            .filter(|s| s["mode"] == mode)
            .filter_map(|s| s[key].as_f64())
            .collect();
        // None measured (a process cluster restores nothing): null in the JSON.
        if v.is_empty() {
            f64::NAN
        } else {
            median(&v)
        }
    };
    // The chain through VMs (the restoring cluster, the others' VMs stopped) against process
    // workers (a fresh one).
    let mut clusters = clusters;
    clusters.truncate(2);
    if qemu {
        clusters.remove(0);
    }
    let mut chains = serde_json::Map::new();
    if qemu {
        let (_, cluster, client, _) = &clusters[0];
        chains.insert(
            "through_vms".into(),
            chain(client, &cluster.agents[0].addr, "vm", plan.chain_seconds).await?,
        );
    }
    let pd = dir.join("process");
    std::fs::create_dir_all(&pd)?;
    let pc = LocalCluster::start(&pd, 1, 4, "epoll", Telemetry::SpansOnly)?;
    let pclient = connect_registered(&pc).await?;
    chains.insert(
        "process_workers".into(),
        chain(&pclient, &pc.agents[0].addr, "proc", plan.chain_seconds).await?,
    );
    let ratio = |a: &str, b: &str| {
        let p = |k: &str| chains.get(k).and_then(|c| c["p50_us"].as_f64());
        p(a).zip(p(b)).map(|(x, y)| x / y)
    };
    let accel = std::fs::read_to_string(dir.join("boot/a1.log"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("microVMs run under"))
        .map(|l| l.to_string());
    Ok(serde_json::json!({
        "bench": "boot",
        "provisioner": plan.provisioner,
        "accel": accel,
        "runs": plan.runs,
        "boot_to_ready_ms": of("boot", "placement_to_ready_ms"),
        "restore_to_ready_ms": if qemu { of("restore", "placement_to_ready_ms").into() } else { serde_json::Value::Null },
        "warm_to_ready_ms": if qemu { of("warm", "placement_to_ready_ms").into() } else { serde_json::Value::Null },
        "boot_deploy_ms": of("boot", "deploy_ms"),
        "warm_deploy_ms": of("warm", "deploy_ms"),
        "boot_vm_start_ms": of("boot", "vm_start_ms"),
        "restore_vm_start_ms": of("restore", "vm_start_ms"),
        "idle_vm_rss_bytes_booted": of("boot", "rss_bytes"),
        "idle_vm_rss_bytes_restored": of("restore", "rss_bytes"),
        "chain_p50": chains,
        "chain_p50_vm_over_process": ratio("through_vms", "process_workers"),
        "starts": starts,
    }))
}

/// A 2-stage no-op chain's latency at concurrency 1 through `ingress`.
async fn chain(
    client: &ControlClient,
    ingress: &str,
    name: &str,
    seconds: f64,
) -> Result<serde_json::Value> {
    let text = chain_graph(2).replacen("name = \"", &format!("name = \"{name}-"), 1);
    let f = file::parse("chain.toml", &text)?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the chain was rejected");
    };
    wait_deployed(client, &record.id, 2, Duration::from_secs(120)).await?;
    let spec = |secs: f64| crate::load::Spec {
        graph: record.id.clone(),
        mode: crate::load::Mode::Closed { concurrency: 1 },
        duration: Duration::from_secs_f64(secs),
        payload: bytes::Bytes::from_static(b"x"),
        deadline_ms: 10_000,
        ingresses: vec![ingress.to_string()],
        objective_us: None,
    };
    crate::load::run(spec(1.0), false).await?;
    let r = crate::load::run(spec(seconds.max(1.0)), false).await?;
    Ok(serde_json::json!({
        "p50_us": r.p50_us, "p99_us": r.p99_us, "rps": r.rps.round(), "errors": r.errors,
    }))
}
