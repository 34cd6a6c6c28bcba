//! `prescient demo`: a control node and three agents on this machine as real processes; the
//! example pipelines deployed on them; a slice of a real trace replayed through them, with the
//! control node killed and restarted mid-replay; a summary of what happened and why.

use crate::client::{ControlClient, SubmitOutcome};
use crate::local::{wait_deployed, LocalCluster};
use crate::{load, output};
use anyhow::{bail, Context, Result};
use prescient_schemas::{file, ValidatedGraph};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const EXAMPLES: &[(&str, &str)] = &[
    (
        "three-stage-chain.toml",
        include_str!("../examples/three-stage-chain.toml"),
    ),
    (
        "fan-out-fan-in.toml",
        include_str!("../examples/fan-out-fan-in.toml"),
    ),
];
const INVALID: (&str, &str) = (
    "type-mismatch.toml",
    include_str!("../tests/data/invalid/type-mismatch.toml"),
);
/// The Azure Functions sample, relative to a `shared/traces` directory.
const AZURE_SAMPLE: &str = "azure_functions_2019_invitro_sample/1350_inv.csv";
/// The trace replayed, relative to a `shared/traces` directory.
const TRACE: &str = "azure_llm_2023/AzureLLMInferenceTrace_code.csv";

fn step(n: u32, title: &str) {
    println!("\n== {n}. {title}");
}

/// Finds `shared/traces` beside the checkout (`../shared/traces`) or inside it.
fn traces_dir() -> Option<PathBuf> {
    traces_dir_holding(TRACE)
}

/// `PRESCIENT_TRACES`, or the nearest `shared/traces` (from here up) holding `file`.
pub(crate) fn traces_dir_holding(file: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PRESCIENT_TRACES") {
        return Some(PathBuf::from(p));
    }
    let mut dir = std::env::current_dir().ok()?;
    loop {
        for candidate in [dir.join("shared/traces"), dir.join("../shared/traces")] {
            if candidate.join(file).exists() {
                return Some(candidate);
            }
        }
        if !dir.pop() {
            return None;
        }
    }
}

pub async fn run(keep: bool) -> Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("prescient-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = walk_through(&dir).await;
    if keep {
        println!("\nlogs and data kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result.map(|()| ExitCode::SUCCESS)
}

async fn walk_through(dir: &Path) -> Result<()> {
    step(
        1,
        "start a control node and three host agents (real processes)",
    );
    let mut cluster = LocalCluster::start(dir, 3, 2, "epoll", crate::local::Telemetry::All)?;
    println!(
        "prescient-control pid {} on {}",
        cluster.control.child.id(),
        cluster.control.addr
    );
    for a in &cluster.agents {
        println!(
            "prescient-agent {} pid {} ingress {} (offers 2 CPUs, 4GiB)",
            a.name,
            a.child.id(),
            a.addr
        );
    }
    let client = ControlClient::connect(&cluster.control.addr).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    step(
        2,
        "submit the example pipelines; control places and provisions them",
    );
    let mut ids = Vec::new();
    for (name, text) in EXAMPLES {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        let f = file::read(&path)?;
        let tasks = f.graph.tasks.len();
        match client.submit(&f.graph).await? {
            SubmitOutcome::Accepted { record, .. } => {
                println!("{name}: accepted as {} ({tasks} tasks)", record.id);
                ids.push((record.id, tasks));
            }
            SubmitOutcome::Rejected(p) => bail!("example {name} was rejected: {p:?}"),
        }
    }
    for (id, tasks) in &ids {
        let epoch = wait_deployed(&client, id, *tasks, Duration::from_secs(60)).await?;
        let (_, replicas) = client.replicas(id).await?;
        println!("\n{id}: routing-table epoch {epoch}");
        print!("{}", output::replicas_table(&replicas));
    }
    print!("\n{}", output::agents_table(&client.agents().await?));

    step(3, "invoke each pipeline once");
    let conn = prescient_agent::dataplane::IngressConn::connect(&cluster.agents[0].addr).await?;
    for (id, _) in &ids {
        let started = std::time::Instant::now();
        let out = conn
            .invoke(
                id,
                vec![(String::new(), bytes::Bytes::from_static(b"hello"))],
                5000,
            )
            .await
            .map_err(anyhow::Error::msg)?;
        for (k, v) in out {
            println!(
                "{id} {k} = {}  ({} us)",
                output::bytes_text(&v),
                started.elapsed().as_micros()
            );
        }
    }

    step(4, "an invalid graph is refused, naming the culprit");
    let f = file::parse(INVALID.0, INVALID.1)?;
    if let Err(problems) = ValidatedGraph::new(f.graph.clone()) {
        for p in &problems {
            println!("{}", f.source.describe(p));
        }
    }

    step(
        5,
        "replay a real trace slice; kill -9 the control node midway and restart it",
    );
    let (graph, _) = &ids[1];
    let duration = Duration::from_secs(12);
    let mode = match traces_dir() {
        Some(d) => {
            let path = d.join(TRACE);
            let arrivals = load::read_trace(&path, 30.0, duration)
                .with_context(|| format!("reading {}", path.display()))?;
            println!(
                "{}: Azure LLM coding requests, 30x faster, first {} minutes: {} invocations",
                path.display(),
                duration.as_secs() * 30 / 60,
                arrivals.len()
            );
            load::Mode::Trace { arrivals }
        }
        None => {
            println!(
                "shared/traces not found (set PRESCIENT_TRACES): Poisson arrivals at 200/s instead"
            );
            load::Mode::Open { rate: 200.0 }
        }
    };
    let spec = load::Spec {
        graph: graph.clone(),
        mode,
        duration,
        payload: bytes::Bytes::from(vec![b'x'; 256]),
        deadline_ms: 5000,
        ingresses: cluster.agents.iter().map(|a| a.addr.clone()).collect(),
        objective_us: None,
    };
    let control_addr = cluster.control.addr.clone();
    let replay = tokio::task::spawn_local(load::run(spec, true));
    // In the trace's first burst, so the restart happens under load.
    tokio::time::sleep(Duration::from_millis(6300)).await;
    let pid = cluster.control.child.id();
    let _ = cluster.control.child.kill();
    let _ = cluster.control.child.wait();
    eprintln!("  -- killed the control node (pid {pid}) with SIGKILL");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.control = restart_control(dir, &control_addr)?;
    eprintln!(
        "  -- restarted it (pid {}) on the same data directory and address",
        cluster.control.child.id()
    );
    let report = replay.await??;
    print!("\n{}", output::load_report(&report));

    step(
        6,
        "what the monitoring service measured (since the restart)",
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = ControlClient::connect(&cluster.control.addr).await?;
    let stats = client.stats(graph, 60).await?;
    let (tasks, dropped) = (stats.tasks, stats.dropped_spans);
    if let Some(e) = stats.end_to_end {
        println!(
            "{graph} end to end (at the ingresses): {} invocations, p50 {:.0} us, p99 {:.0} us",
            e.count, e.exec_p50_us, e.exec_p99_us
        );
    }
    print!("{}", output::stats_table(&tasks));
    println!("executions not reported (back-pressure): {dropped}");
    println!("\nper chain (end to end at its sink; chains sharing a sink differ by their path):");
    print!("{}", output::chains_table(&stats.chains));
    // One agent per machine loads the eBPF probes (they see the whole machine): its replicas
    // show run-queue latency and TCP bytes from them.
    println!("\nhosts and replicas (CPU, run-queue p99 from the eBPF probes where they run):");
    print!("{}", output::agents_table(&client.agents().await?));
    let (_, replicas) = client.replicas(graph).await?;
    print!("{}", output::replicas_table(&replicas));

    step(
        7,
        "a replica that keeps crashing is replaced after a doubling wait, not at once",
    );
    crash_loop(&client, &ids[0].0, "infer").await?;

    step(
        8,
        "a graph with a [scaling] policy: load grows it, load loss shrinks it back",
    );
    scaling(&client, &cluster, dir).await?;

    step(
        9,
        "predictive provisioning: replicas for the forecast's q90, ahead of what reactive sizing asks",
    );
    crate::demo_predictive::ramp(&client, &cluster, dir).await?;

    step(
        10,
        "a slowed host: the controller replaces its replica elsewhere, and says why",
    );
    crate::demo_replication::slowed_host(&client, &cluster).await?;

    step(
        11,
        "microVMs: a task in a QEMU microVM, booted; the next of its shape restored from a snapshot; one started on a warm VM from the pool",
    );
    crate::demo_vms::microvms(&client, &cluster.control.addr, dir).await?;

    step(12, "what the control node decided, and why");
    for e in client.events(0, 1000).await? {
        output::print_event(&e, false)?;
    }
    println!(
        "\nsummary: {} invocations replayed, {} failed, p50 {} us, p99 {} us; \
         the control node restart interrupted {} of them",
        report.sent, report.errors, report.p50_us, report.p99_us, report.errors
    );

    step(
        13,
        "the same decision code on a simulated fleet: 20 Azure functions, 100 hosts, a host dies",
    );
    simulated_fleet(dir)?;
    Ok(())
}

/// `prescient simulate` on the whole cluster, the demo's size: the Azure Functions sample's 20
/// busiest functions on 100 hosts for the last third of the day (or a synthetic cycle without
/// the traces), a host dying in it and 5% of boots failing, reactive against the oracle at a
/// 30 s lead time.
fn simulated_fleet(dir: &Path) -> Result<()> {
    let scenario = dir.join("fleet-faults.toml");
    std::fs::write(
        &scenario,
        "boot_failure = 0.05\n[[fault]]\nkind = \"dies\"\nhost = \"h1\"\nat_s = 70000.0\n\
         [[fault]]\nkind = \"dies\"\nhost = \"h2\"\nat_s = 18000.0\n",
    )?;
    // Without the shared traces: a synthetic 6-hour cycle with a burst, into one 2 s service.
    let trace = if traces_dir_holding(AZURE_SAMPLE).is_some() {
        "azure-functions".to_string()
    } else {
        let counts: Vec<String> = (0..6 * 3600)
            .map(|s| {
                let cycle = (s as f64 / 7200.0 * std::f64::consts::TAU).sin();
                let burst = if (15_000..15_300).contains(&s) {
                    20.0
                } else {
                    0.0
                };
                ((8.0 + 6.0 * cycle + burst).round() as u32).to_string()
            })
            .collect();
        let synthetic = dir.join("cycle.txt");
        std::fs::write(&synthetic, counts.join("\n"))?;
        println!(
            "shared/traces not found (set PRESCIENT_TRACES): a synthetic 6-hour cycle instead"
        );
        synthetic.display().to_string()
    };
    println!(
        "$ prescient simulate --trace {trace} --top 20 --hosts 100 --lead 30 --scenario {}",
        scenario.display()
    );
    let rows = crate::simulate_fleet::run(&crate::simulate_fleet::FleetArgs {
        trace: Some(&trace),
        graph: None,
        scenario: Some(&scenario),
        hosts: Some(100),
        top: Some(20),
        policies: &["reactive".to_string(), "oracle".to_string()],
        leads: &[30.0],
        seed: 1,
        whole: false,
    })?;
    for r in &rows {
        println!(
            "{:<9} {} invocations, {}% within objective, {} lost with the host, p99 {} s, {} VM-s, decisions {}",
            r["policy"].as_str().unwrap_or(""),
            r["requests"],
            r["within_objective_pct"],
            r["failed"],
            r["p99_s"],
            r["vm_seconds"],
            r["decisions"]
        );
    }
    Ok(())
}

const SCALED: &str = r#"name = "scaled-sleep"
[[task]]
id = "work"
code = { builtin = "sleep", params = { mean = "20ms" } }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "20ms"

[scaling]
max_replicas = 4
window = "2s"
scale_out_cooldown = "2s"
scale_in_cooldown = "4s"
"#;

/// Submits a task that serves one execution at a time, sends it twice what one replica can
/// take, and prints the controller's sizing decisions as they happen, until it is back to one.
async fn scaling(client: &ControlClient, cluster: &LocalCluster, dir: &Path) -> Result<()> {
    let path = dir.join("scaled-sleep.toml");
    std::fs::write(&path, SCALED)?;
    let f = file::read(&path)?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the scaled example was rejected");
    };
    let id = record.id.clone();
    wait_deployed(client, &id, 1, Duration::from_secs(30)).await?;
    println!("{id}: one replica of a 20 ms task serving one request at a time (50/s); sending 100/s for 8 s");
    let mut seen = client.events(0, 100_000).await?.last().map_or(0, |e| e.seq);
    let spec = load::Spec {
        graph: id.clone(),
        mode: load::Mode::Open { rate: 100.0 },
        duration: Duration::from_secs(8),
        payload: bytes::Bytes::from_static(b"x"),
        deadline_ms: 10_000,
        ingresses: cluster.agents.iter().map(|a| a.addr.clone()).collect(),
        objective_us: Some(100_000),
    };
    let mut replay = Some(tokio::task::spawn_local(load::run(spec, false)));
    let started = std::time::Instant::now();
    let mut report = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for e in client.events(seen, 1000).await? {
            seen = e.seq;
            if e.kind.starts_with("scale") || e.kind == "replicas-retired" {
                print!("  +{:>4.1}s ", started.elapsed().as_secs_f64());
                output::print_event(&e, false)?;
            }
        }
        if replay.as_ref().is_some_and(|h| h.is_finished()) {
            if let Some(h) = replay.take() {
                report = Some(h.await??);
            }
        }
        if report.is_some() && client.replicas(&id).await?.1.len() <= 1 {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            println!("  (still scaling in after 60 s)");
            break;
        }
    }
    if let Some(r) = report {
        println!(
            "{id}: {} invocations, {} failed, p50 {} us, p99 {} us, {:.0}% within 100 ms (they queued until the scale-out)",
            r.sent,
            r.errors,
            r.p50_us,
            r.p99_us,
            r.within_objective.unwrap_or(0.0) * 100.0
        );
    }
    Ok(())
}

/// Kills the worker of `task`'s replica twice in a row and shows how the control node reacts:
/// each crash is an event saying how long it waits before placing a replacement.
async fn crash_loop(client: &ControlClient, graph: &str, task: &str) -> Result<()> {
    let since = client.events(0, 100_000).await?.last().map_or(0, |e| e.seq);
    for round in 1..=2 {
        let (_, replicas) = client.replicas(graph).await?;
        let Some(victim) = replicas
            .iter()
            .find(|r| r.task == task && r.state == "ready")
            .map(|r| r.replica.clone())
        else {
            bail!("{graph} has no ready replica of {task} to crash");
        };
        let killed = std::process::Command::new("pkill")
            .args(["-9", "-f", &format!("worker .*replica {victim}( |$)")])
            .status()
            .context("running pkill")?;
        if !killed.success() {
            bail!("no worker process found for {victim}");
        }
        println!("crash {round}: killed the worker of {victim} (SIGKILL)");
        // Wait for its replacement to be ready before the next crash.
        let until = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (_, now) = client.replicas(graph).await?;
            if now
                .iter()
                .any(|r| r.task == task && r.state == "ready" && r.replica != victim)
            {
                break;
            }
            if std::time::Instant::now() > until {
                bail!("{victim} was not replaced within 30 s");
            }
        }
    }
    for e in client.events(since, 1000).await? {
        if matches!(e.kind.as_str(), "replica-lost" | "replica-placed") {
            output::print_event(&e, false)?;
        }
    }
    Ok(())
}

fn restart_control(dir: &Path, addr: &str) -> Result<crate::local::Proc> {
    use prescient::launch::{self, Binaries, CONTROL_READY};
    let mut cmd = Binaries::siblings()?.control(addr, &dir.join("control"));
    cmd.args(["--startup-grace-ms", "3000"]);
    Ok(launch::start(
        cmd,
        &dir.join("control.log"),
        CONTROL_READY,
        "control",
    )?)
}
