//! `prescient demo`: starts a control node on this machine as a real process and walks through
//! what Prescient does today, printing each step.

use crate::client::{ControlClient, SubmitOutcome};
use crate::output;
use anyhow::{bail, Context, Result};
use prescient_schemas::{file, ValidatedGraph};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};

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
const INVALID: &[(&str, &str)] = &[
    (
        "cycle.toml",
        include_str!("../tests/data/invalid/cycle.toml"),
    ),
    (
        "type-mismatch.toml",
        include_str!("../tests/data/invalid/type-mismatch.toml"),
    ),
];

/// A control node started as a child process.
struct ControlProcess {
    child: Child,
    addr: String,
}

impl ControlProcess {
    fn start(bin: &Path, data_dir: &Path) -> Result<ControlProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("control.log"))?;
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir.join("registry"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("control stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("prescient-control listening on ") else {
            let _ = child.kill();
            bail!(
                "control node did not start; see {}",
                data_dir.join("control.log").display()
            );
        };
        Ok(ControlProcess {
            addr: addr.to_string(),
            child,
        })
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn step(n: u32, title: &str) {
    println!("\n== {n}. {title}");
}

pub async fn run(keep: bool) -> Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("prescient-control");
    if !bin.exists() {
        bail!(
            "{} is missing: build every binary first (`cargo build --release --bins`, or run `cargo xtask demo`)",
            bin.display()
        );
    }
    let data_dir: PathBuf =
        std::env::temp_dir().join(format!("prescient-demo-{}", std::process::id()));
    std::fs::create_dir_all(data_dir.join("examples"))?;
    let result = walk_through(&bin, &data_dir).await;
    if keep {
        println!("\ndata kept in {}", data_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result.map(|()| ExitCode::SUCCESS)
}

async fn walk_through(bin: &Path, data_dir: &Path) -> Result<()> {
    step(1, "start a control node (a real process, registry on disk)");
    let control = ControlProcess::start(bin, data_dir)?;
    println!(
        "prescient-control pid {} listening on {}",
        control.child.id(),
        control.addr
    );
    let client = ControlClient::connect(&control.addr).await?;

    step(2, "submit the example graphs over Cap'n Proto");
    for (name, text) in EXAMPLES {
        let path = data_dir.join("examples").join(name);
        std::fs::write(&path, text)?;
        let f = file::read(&path)?;
        let v = ValidatedGraph::new(f.graph.clone())
            .map_err(|p| anyhow::anyhow!("example {name} is invalid: {p:?}"))?;
        match client.submit(&f.graph).await? {
            SubmitOutcome::Accepted { record, .. } => println!(
                "{name}: accepted as {} version {} ({} tasks, {} chains: {})",
                record.id,
                record.version,
                record.graph.tasks.len(),
                v.chains().len(),
                v.chains()
                    .iter()
                    .map(|c| c.join("->"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            SubmitOutcome::Rejected(p) => bail!("example {name} was rejected: {p:?}"),
        }
    }
    print!("\n{}", output::graphs_table(&client.list().await?));
    let first = client.get("g1").await?;
    print!("\n{}", output::graph_detail(&first));

    step(3, "invalid graphs are refused with the culprit named");
    for (name, text) in INVALID {
        let f = file::parse(name, text)?;
        match ValidatedGraph::new(f.graph.clone()) {
            Ok(_) => bail!("{name} should be invalid"),
            Err(problems) => {
                for p in &problems {
                    println!("{}", f.source.describe(p));
                }
            }
        }
        // The control node checks again, whatever the client did.
        if let SubmitOutcome::Rejected(p) = client.submit(&f.graph).await? {
            println!(
                "  control node agrees: {} problem(s), nothing stored",
                p.len()
            );
        } else {
            bail!("the control node accepted {name}");
        }
    }

    step(4, "resubmitting a changed graph makes a new version");
    let mut changed = first.graph.clone();
    changed.tasks[0].estimated_execution_time_ns *= 2;
    if let SubmitOutcome::Accepted { record, created } = client.submit(&changed).await? {
        println!(
            "{:?}: {} version {} (new version: {created})",
            record.graph.name, record.id, record.version
        );
    }

    step(
        5,
        "kill -9 the control node and restart it on the same data",
    );
    let before: Vec<_> = {
        let mut v = Vec::new();
        for s in client.list().await? {
            v.push(client.get(&s.id).await?);
        }
        v
    };
    drop(client);
    let pid = control.child.id();
    drop(control); // SIGKILL, then reap
    println!("killed pid {pid} with SIGKILL");
    let control = ControlProcess::start(bin, data_dir)?;
    println!(
        "restarted: pid {} listening on {}",
        control.child.id(),
        control.addr
    );
    let client = ControlClient::connect(&control.addr).await?;
    let mut same = 0;
    for rec in &before {
        if client.get(&rec.id).await? == *rec {
            same += 1;
        }
    }
    println!(
        "{same} of {} graphs came back unchanged (same id, version, digest and content)",
        before.len()
    );
    if same != before.len() {
        bail!("the registry lost or changed graphs across a restart");
    }

    step(6, "every decision is in the event log, with its reason");
    for e in client.events(0, 100).await? {
        output::print_event(&e, false)?;
    }
    println!(
        "\nNext: host agents, deployment and load replay (see the README's roadmap). \
         Try `prescient --control {} graphs` while a node runs.",
        control.addr
    );
    Ok(())
}
