//! `prescient`: the command-line interface for pipeline owners.

mod client;
mod demo;
mod output;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use client::{ControlClient, SubmitOutcome};
use prescient_schemas::{file, ValidatedGraph};
use std::path::PathBuf;
use std::process::ExitCode;

/// Prescient runs task graphs across GPU hosts and keeps them fast by itself.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    /// The control node's API address.
    #[arg(
        long,
        global = true,
        env = "PRESCIENT_CONTROL",
        default_value = "127.0.0.1:7400"
    )]
    control: String,
    /// Print JSON instead of tables, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a graph file and submit it; resubmitting a changed graph makes a new version.
    Submit {
        file: PathBuf,
        /// Send the graph without checking it here first (the control node checks it anyway).
        #[arg(long, hide = true)]
        no_local_check: bool,
    },
    /// Check a graph file without submitting it.
    Validate { file: PathBuf },
    /// List the graphs the control node holds.
    Graphs,
    /// Show one graph by id (e.g. g1) or name.
    Graph { id: String },
    /// Remove a graph; its versions and the removal stay in the event log.
    Rm { id: String },
    /// Show the control node's decisions and state changes, with their reasons.
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep printing events as they happen.
        #[arg(long)]
        follow: bool,
    },
    /// Start a control node on this machine as a real process and walk through what it does.
    Demo {
        /// Keep the demo's data directory instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PRESCIENT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, dispatch(cli))
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let json = cli.json;
    match cli.command {
        Command::Validate { file } => validate(&file, json),
        Command::Submit {
            file,
            no_local_check,
        } => submit(&cli.control, &file, no_local_check, json).await,
        Command::Graphs => {
            let c = ControlClient::connect(&cli.control).await?;
            let graphs = c.list().await?;
            if json {
                output::print_json(&graphs)?;
            } else {
                print!("{}", output::graphs_table(&graphs));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph { id } => {
            let c = ControlClient::connect(&cli.control).await?;
            let id = c.resolve(&id).await?;
            let record = c.get(&id).await?;
            if json {
                output::print_json(&record)?;
            } else {
                print!("{}", output::graph_detail(&record));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { id } => {
            let c = ControlClient::connect(&cli.control).await?;
            let id = c.resolve(&id).await?;
            let removed = c.remove(&id).await?;
            if json {
                output::print_json(&removed)?;
            } else {
                println!(
                    "removed {} ({:?}, version {})",
                    removed.id, removed.name, removed.version
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Events { since, follow } => {
            let c = ControlClient::connect(&cli.control).await?;
            if follow {
                c.follow_events(since, json).await?;
                bail!("the control node at {} closed the connection", cli.control);
            }
            for e in c.events(since, 10_000).await? {
                output::print_event(&e, json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { keep } => demo::run(keep).await,
    }
}

/// Reads and checks a graph file, printing every problem with its file position.
fn load(path: &std::path::Path) -> Result<Option<file::GraphFile>> {
    let f = match file::read(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(None);
        }
    };
    if let Err(problems) = ValidatedGraph::new(f.graph.clone()) {
        for p in &problems {
            eprintln!("error: {}", f.source.describe(p));
        }
        eprintln!(
            "error: {} is not a valid graph ({} problem{})",
            path.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        return Ok(None);
    }
    Ok(Some(f))
}

fn validate(path: &std::path::Path, json: bool) -> Result<ExitCode> {
    let Some(f) = load(path)? else {
        return Ok(ExitCode::FAILURE);
    };
    let v = ValidatedGraph::new(f.graph).expect("load validated it");
    if json {
        output::print_json(&serde_json::json!({
            "name": v.graph().name,
            "tasks": v.graph().tasks.len(),
            "edges": v.graph().edges.len(),
            "chains": v.chains(),
            "topological_order": v.topological_order(),
        }))?;
    } else {
        println!(
            "{}: graph {:?} is valid: {} tasks, {} edges, {} chains",
            path.display(),
            v.graph().name,
            v.graph().tasks.len(),
            v.graph().edges.len(),
            v.chains().len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn submit(
    control: &str,
    path: &std::path::Path,
    no_local_check: bool,
    json: bool,
) -> Result<ExitCode> {
    let f = if no_local_check {
        match file::read(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::FAILURE);
            }
        }
    } else {
        match load(path)? {
            Some(f) => f,
            None => return Ok(ExitCode::FAILURE),
        }
    };
    let c = ControlClient::connect(control).await?;
    match c
        .submit(&f.graph)
        .await
        .with_context(|| format!("submitting {}", path.display()))?
    {
        SubmitOutcome::Accepted { record, created } => {
            if json {
                output::print_json(&serde_json::json!({
                    "id": record.id,
                    "name": record.graph.name,
                    "version": record.version,
                    "created": created,
                    "digest": record.digest,
                }))?;
            } else if created {
                println!(
                    "submitted {:?} as {} version {}",
                    record.graph.name, record.id, record.version
                );
            } else {
                println!(
                    "unchanged: {:?} is already {} version {}",
                    record.graph.name, record.id, record.version
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SubmitOutcome::Rejected(problems) => {
            for p in &problems {
                let at = f
                    .source
                    .locate(p.task.as_deref(), p.edge, p.kind == "invalid-objective");
                eprintln!("error: {at}: {}", p.message);
            }
            if json {
                output::print_json(&serde_json::json!({ "rejected": problems }))?;
            }
            bail!(
                "the control node rejected {} ({} problem{})",
                path.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            )
        }
    }
}
