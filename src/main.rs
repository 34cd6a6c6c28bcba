//! `prescient`: the command-line interface for pipeline owners.

mod bench;
mod client;
mod demo;
mod demo_predictive;
mod demo_replication;
mod demo_vms;
mod forecast;
mod forecast_show;
mod history;
mod load;
mod local;
mod output;
mod plot;
mod simulate;
mod simulate_fleet;

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
    /// Upload an executable or model; prints the digest to name it by in a graph file.
    Upload { file: PathBuf },
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
    /// List the host agents: state, capacity, free resources, replicas, ingress address.
    Agents,
    /// List a graph's replicas and its routing-table epoch.
    Replicas { graph: String },
    /// Per-task statistics from the workers' spans: rate, errors, execution, queueing and
    /// transfer time percentiles.
    Stats {
        graph: String,
        /// Window in seconds (1 to 600).
        #[arg(long, default_value_t = 10)]
        window: u32,
    },
    /// Stored history (kept across restarts): per minute, or per second for the last 6 h, of
    /// a graph's invocations, one task's executions, or every chain's end-to-end latency;
    /// `history import` stores a trace's counts as a task's history (and re-seeds its forecast).
    #[command(args_conflicts_with_subcommands = true)]
    History {
        #[command(subcommand)]
        which: Option<history::Which>,
        #[command(flatten)]
        show: history::Show,
    },
    /// A live view of agents, graphs and tasks, refreshed every second.
    Top {
        /// Print one frame and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Statistics window in seconds.
        #[arg(long, default_value_t = 10)]
        window: u32,
    },
    /// Invoke a graph once and print its outputs.
    Invoke {
        graph: String,
        /// An input, `task.port=TEXT` or `task.port=@FILE`; a lone `=TEXT` feeds a graph's only input.
        #[arg(long = "input", short = 'i')]
        inputs: Vec<String>,
        /// Fail the invocation after this many milliseconds.
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u32,
        /// An agent ingress to send to (default: the first ready agent's).
        #[arg(long)]
        ingress: Option<String>,
    },
    /// Send load to a graph and report throughput and latency percentiles.
    Load {
        graph: String,
        /// Open loop: Poisson arrivals at this many invocations per second.
        #[arg(long, conflicts_with_all = ["concurrency", "trace"])]
        rate: Option<f64>,
        /// Closed loop: keep this many invocations in flight.
        #[arg(long, conflicts_with = "trace")]
        concurrency: Option<usize>,
        /// Replay a trace (see `../shared/traces/`): per-request timestamps or per-minute counts.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Compress the trace's time by this factor.
        #[arg(long, default_value_t = 1.0)]
        speedup: f64,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Bytes of payload per invocation.
        #[arg(long, default_value_t = 64)]
        payload_bytes: usize,
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u32,
        /// Agent ingresses to spread the load over (default: every ready agent's).
        #[arg(long)]
        ingress: Vec<String>,
    },
    /// Benchmarks that start their own cluster on this machine and print JSON.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Load forecasting: `forecast GRAPH` shows each task's history, the control node's
    /// forecast with its q90 band and the plan on it (`--plot F.png`); `backtest` runs the
    /// forecasters on a CSV of counts and writes every test-split forecast.
    #[command(args_conflicts_with_subcommands = true)]
    Forecast {
        #[command(subcommand)]
        which: Option<forecast::Which>,
        #[command(flatten)]
        show: forecast_show::Show,
    },
    /// Simulate policies in virtual time on a real trace (JSON with --json): the one-service
    /// reference scenarios by name (Knative's KPA as `reactive`), or the whole cluster (the
    /// control node's plan, monitor and replica choice) with --hosts, --graph or a file.
    Simulate(simulate::Args),
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
            // Estimates calibrated from the last five minutes of measurements (median execution
            // time, once a task has run at least 20 times).
            let stats = c.stats(&id, 300).await.unwrap_or_default();
            let calibrated: std::collections::BTreeMap<String, u64> = stats
                .tasks
                .iter()
                .filter(|t| t.count >= 20)
                .map(|t| (t.task.clone(), (t.exec_p50_us * 1000.0).round() as u64))
                .collect();
            if json {
                let mut v = serde_json::to_value(&record)?;
                if !calibrated.is_empty() {
                    v["calibrated_execution_time_ns"] = serde_json::to_value(&calibrated)?;
                }
                output::print_json(&v)?;
            } else {
                print!("{}", output::graph_detail(&record, &calibrated));
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
                c.follow_events(since, move |e| output::print_event(e, json))
                    .await?;
                bail!("the control node at {} closed the connection", cli.control);
            }
            for e in c.events(since, 10_000).await? {
                output::print_event(&e, json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { keep } => demo::run(keep).await,
        Command::Upload { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let c = ControlClient::connect(&cli.control).await?;
            let (digest, size, created) = c.upload(&bytes).await?;
            if json {
                output::print_json(&serde_json::json!({
                    "sha256": digest.to_string(), "size": size, "created": created,
                }))?;
            } else {
                println!(
                    "{digest}  ({size} bytes{})",
                    if created { "" } else { ", already stored" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { which } => bench::run(which).await,
        Command::Forecast {
            which: Some(which), ..
        } => forecast::run(which),
        Command::Forecast { which: None, show } => {
            forecast_show::show(&cli.control, &show, json).await
        }
        Command::Simulate(args) => simulate::run(&args, json),
        Command::Stats { graph, window } => {
            let c = ControlClient::connect(&cli.control).await?;
            let id = c.resolve(&graph).await?;
            let stats = c.stats(&id, window).await?;
            if json {
                output::print_json(&serde_json::json!({
                    "graph": id, "window_seconds": window, "tasks": stats.tasks,
                    "end_to_end": stats.end_to_end, "edges": stats.edges,
                    "chains": stats.chains, "dropped_spans": stats.dropped_spans,
                    "cold": stats.cold,
                }))?;
            } else {
                println!(
                    "graph {id}, last {window} s (executions not reported: {})",
                    stats.dropped_spans
                );
                if let Some(e) = &stats.end_to_end {
                    println!(
                        "end to end: {} invocations ({:.1}/s), {} failed, p50 {:.0} us, p90 {:.0} us, p99 {:.0} us",
                        e.count, e.per_second, e.errors, e.exec_p50_us, e.exec_p90_us, e.exec_p99_us
                    );
                }
                println!("{}", output::cold_line(&stats.cold));
                print!("{}", output::stats_table(&stats.tasks));
                if !stats.edges.is_empty() {
                    print!("\n{}", output::edges_table(&stats.edges));
                }
                if !stats.chains.is_empty() {
                    print!("\n{}", output::chains_table(&stats.chains));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::History {
            which: Some(which), ..
        } => history::import(&cli.control, which, json).await,
        Command::History { which: None, show } => history::show(&cli.control, &show, json).await,
        Command::Top { once, window } => {
            let c = ControlClient::connect(&cli.control).await?;
            // The controller's latest decisions, newest last.
            let mut decisions: std::collections::VecDeque<String> = Default::default();
            let mut seen = 0;
            loop {
                for e in c.events(seen, 10_000).await? {
                    seen = e.seq;
                    if output::DECISIONS.contains(&e.kind.as_str()) {
                        if decisions.len() == 8 {
                            decisions.pop_front();
                        }
                        decisions.push_back(output::event_line(&e));
                    }
                }
                let mut frame = String::new();
                if !once {
                    frame.push_str("\x1b[2J\x1b[H");
                }
                frame.push_str(&format!(
                    "prescient top: control {}, last {window} s\n\n",
                    cli.control
                ));
                frame.push_str(&output::agents_table(&c.agents().await?));
                for g in c.list().await? {
                    let (epoch, replicas) = c.replicas(&g.id).await?;
                    let stats = c.stats(&g.id, window).await?;
                    let (tasks, e2e, chains) = (stats.tasks, stats.end_to_end, stats.chains);
                    frame.push_str(&format!(
                        "\n{} {} v{}: {} replicas, routing epoch {epoch}\n",
                        g.id,
                        g.name,
                        g.version,
                        replicas.iter().filter(|r| r.state == "ready").count()
                    ));
                    if let Some(e) = e2e {
                        frame.push_str(&format!(
                            "end to end: {:.1}/s, {} failed, p50 {:.0} us, p99 {:.0} us\n",
                            e.per_second, e.errors, e.exec_p50_us, e.exec_p99_us
                        ));
                    }
                    frame.push_str(&output::cold_line(&stats.cold));
                    frame.push('\n');
                    frame.push_str(&output::stats_table(&tasks));
                    frame.push('\n');
                    frame.push_str(&output::chains_table(&chains));
                    frame.push('\n');
                    frame.push_str(&output::replicas_table(&replicas));
                }
                if !decisions.is_empty() {
                    frame.push_str("\nlatest decisions:\n");
                    for d in &decisions {
                        frame.push_str(d);
                        frame.push('\n');
                    }
                }
                print!("{frame}");
                if once {
                    return Ok(ExitCode::SUCCESS);
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        Command::Agents => {
            let c = ControlClient::connect(&cli.control).await?;
            let agents = c.agents().await?;
            if json {
                output::print_json(&agents)?;
            } else {
                print!("{}", output::agents_table(&agents));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replicas { graph } => {
            let c = ControlClient::connect(&cli.control).await?;
            let id = c.resolve(&graph).await?;
            let (epoch, replicas) = c.replicas(&id).await?;
            if json {
                output::print_json(
                    &serde_json::json!({ "graph": id, "epoch": epoch, "replicas": replicas }),
                )?;
            } else {
                println!("graph {id}, routing-table epoch {epoch}");
                print!("{}", output::replicas_table(&replicas));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Invoke {
            graph,
            inputs,
            deadline_ms,
            ingress,
        } => invoke(&cli.control, &graph, &inputs, deadline_ms, ingress, json).await,
        Command::Load {
            graph,
            rate,
            concurrency,
            trace,
            speedup,
            duration,
            payload_bytes,
            deadline_ms,
            ingress,
        } => {
            let ingresses = if ingress.is_empty() {
                ready_ingresses(&cli.control).await?
            } else {
                ingress
            };
            let duration = std::time::Duration::from_secs_f64(duration);
            let mode = match (rate, concurrency, trace) {
                (Some(rate), _, _) => load::Mode::Open { rate },
                (_, Some(c), _) => load::Mode::Closed {
                    concurrency: c.max(1),
                },
                (_, _, Some(path)) => load::Mode::Trace {
                    arrivals: load::read_trace(&path, speedup, duration)?,
                },
                _ => load::Mode::Closed { concurrency: 1 },
            };
            let report = load::run(
                load::Spec {
                    graph,
                    mode,
                    duration,
                    payload: bytes::Bytes::from(vec![b'x'; payload_bytes]),
                    deadline_ms,
                    ingresses,
                    objective_us: None,
                },
                !json,
            )
            .await?;
            if json {
                output::print_json(&report)?;
            } else {
                print!("{}", output::load_report(&report));
            }
            Ok(if report.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
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
                let at = f.source.locate(p.task.as_deref(), p.edge, &p.kind);
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

async fn ready_ingresses(control: &str) -> Result<Vec<String>> {
    let c = ControlClient::connect(control).await?;
    let list: Vec<String> = c
        .agents()
        .await?
        .into_iter()
        .filter(|a| a.state == "ready")
        .map(|a| a.ingress)
        .collect();
    if list.is_empty() {
        bail!("no ready agent is registered with the control node at {control}");
    }
    Ok(list)
}

async fn invoke(
    control: &str,
    graph: &str,
    inputs: &[String],
    deadline_ms: u32,
    ingress: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let mut values = Vec::new();
    for i in inputs {
        let (name, value) = i
            .split_once('=')
            .with_context(|| format!("input {i:?}: expected task.port=VALUE or task.port=@FILE"))?;
        let bytes = match value.strip_prefix('@') {
            Some(path) => std::fs::read(path).with_context(|| format!("reading {path}"))?,
            None => value.as_bytes().to_vec(),
        };
        values.push((name.to_string(), bytes::Bytes::from(bytes)));
    }
    let addr = match ingress {
        Some(a) => a,
        None => ready_ingresses(control).await?.remove(0),
    };
    let conn = prescient_agent::dataplane::IngressConn::connect(&addr)
        .await
        .with_context(|| format!("connecting to the ingress at {addr}"))?;
    let started = std::time::Instant::now();
    let outputs = conn
        .invoke(graph, values, deadline_ms)
        .await
        .map_err(|e| anyhow::anyhow!("invocation failed: {e}"))?;
    let took = started.elapsed();
    if json {
        let map: serde_json::Map<String, serde_json::Value> = outputs
            .iter()
            .map(|(k, v)| (k.clone(), output::bytes_json(v)))
            .collect();
        output::print_json(
            &serde_json::json!({ "outputs": map, "micros": took.as_micros() as u64 }),
        )?;
    } else {
        for (k, v) in &outputs {
            println!("{k} = {}", output::bytes_text(v));
        }
        eprintln!("({} us)", took.as_micros());
    }
    Ok(ExitCode::SUCCESS)
}
