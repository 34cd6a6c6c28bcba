//! `prescient history`: a graph's stored history, per minute or per second (the last 6 h), and
//! `history import`, which stores a trace's counts as a task's history.

use crate::client::ControlClient;
use crate::output;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

/// What `prescient history GRAPH` shows.
#[derive(Debug, clap::Args)]
pub struct Show {
    /// The graph (id or name).
    pub graph: Option<String>,
    /// A task; without it, the graph's invocations (its arrival rate).
    #[arg(long, conflicts_with = "chains")]
    pub task: Option<String>,
    /// Every chain (path from an entry task to a sink) of the graph: invocations that
    /// completed it per minute and their end-to-end latency (admission to the sink's end).
    #[arg(long)]
    pub chains: bool,
    #[arg(long, default_value_t = 60)]
    pub minutes: u64,
    /// Per second instead of per minute (kept for the last 6 h).
    #[arg(long, conflicts_with = "chains")]
    pub per_second: bool,
}

/// `history import`.
#[derive(Debug, clap::Subcommand)]
pub enum Which {
    /// Store a trace's counts as a task's history, so its forecast starts from them (as if the
    /// graph had served that load): the last step ends now (or at --end), minutes are stored,
    /// and seconds too for steps under a minute; it replaces what is stored for those times.
    Import {
        /// The graph (id or name).
        graph: String,
        /// The task (default: the graph's invocations).
        #[arg(long)]
        task: Option<String>,
        /// A CSV as `forecast backtest` reads: the first column the time step, the others
        /// series of counts per step (a first row that is not numbers names them).
        #[arg(long)]
        csv: PathBuf,
        /// The series to import (a header name, or s1, s2, ...; default: the first).
        #[arg(long)]
        column: Option<String>,
        /// Seconds per step (default: the first column's spacing where numeric, else 60).
        #[arg(long)]
        step: Option<u64>,
        /// The unix second the last step ends (default: now).
        #[arg(long)]
        end: Option<u64>,
    },
}

pub async fn import(control: &str, which: Which, json: bool) -> Result<ExitCode> {
    let Which::Import {
        graph,
        task,
        csv,
        column,
        step,
        end,
    } = which;
    let table = crate::forecast::read(&csv)?;
    let at = match &column {
        None => 0,
        Some(c) => table.names.iter().position(|n| n == c).with_context(|| {
            format!(
                "{}: no series {c:?} (it has {:?})",
                csv.display(),
                table.names
            )
        })?,
    };
    let step_s = step.or(table.spacing).unwrap_or(60);
    let step_s = u32::try_from(step_s)
        .ok()
        .filter(|s| *s > 0)
        .with_context(|| format!("--step {step_s}: must be a positive number of seconds"))?;
    let counts: Vec<u64> = table.columns[at].iter().map(|v| v.round() as u64).collect();
    if counts.is_empty() {
        bail!("{}: no steps", csv.display());
    }
    let c = ControlClient::connect(control).await?;
    let id = c.resolve(&graph).await?;
    let task = task.unwrap_or_default();
    let (minutes, seconds) = c
        .import_history(&id, &task, step_s, &counts, end.unwrap_or(0))
        .await?;
    let series = &table.names[at];
    if json {
        output::print_json(&serde_json::json!({
            "graph": id, "task": task, "series": series, "steps": counts.len(),
            "step_s": step_s, "minutes": minutes, "seconds": seconds,
        }))?;
    } else {
        println!(
            "{id}{}: {} steps of {step_s} s from {series:?} stored as {minutes} minutes and {seconds} seconds of history",
            if task.is_empty() { String::new() } else { format!(".{task}") },
            counts.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(control: &str, a: &Show, json: bool) -> Result<ExitCode> {
    let Some(graph) = &a.graph else {
        bail!(
            "history: name a graph (`prescient history GRAPH`), or run `prescient history import`"
        );
    };
    let (task, minutes, per_second) = (&a.task, a.minutes, a.per_second);
    if a.chains {
        let c = ControlClient::connect(control).await?;
        let id = c.resolve(graph).await?;
        let mut all = Vec::new();
        for chain in c.stats(&id, 1).await?.chains {
            let Some(sink) = chain.tasks.last() else {
                continue;
            };
            let points = c.history(&id, sink, minutes).await?;
            all.push((chain.tasks.join(" -> "), points));
        }
        if json {
            let v: Vec<serde_json::Value> = all
                .iter()
                .map(|(chain, points)| {
                    let points: Vec<serde_json::Value> = points
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "minute": p["minute"],
                                "count": p["sink_count"],
                                "p50_us": p["sink_p50_us"],
                                "p99_us": p["sink_p99_us"],
                            })
                        })
                        .collect();
                    serde_json::json!({ "chain": chain, "points": points })
                })
                .collect();
            output::print_json(&v)?;
        } else {
            let rows: Vec<Vec<String>> = all
                .iter()
                .flat_map(|(chain, points)| {
                    points.iter().map(move |p| {
                        vec![
                            chain.clone(),
                            output::format_time_ms(p["minute"].as_u64().unwrap_or(0) * 60_000),
                            p["sink_count"].to_string(),
                            format!("{:.0}", p["sink_p50_us"].as_f64().unwrap_or(0.0)),
                            format!("{:.0}", p["sink_p99_us"].as_f64().unwrap_or(0.0)),
                        ]
                    })
                })
                .collect();
            print!(
                "{}",
                output::table(&["CHAIN", "MINUTE", "COUNT", "P50 us", "P99 us"], &rows)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let unit_ms = if per_second { 1000 } else { 60_000 };
    let c = ControlClient::connect(control).await?;
    let id = c.resolve(graph).await?;
    let points = c
        .history_at(&id, task.as_deref().unwrap_or(""), minutes, per_second)
        .await?;
    if json {
        output::print_json(&points)?;
    } else {
        let rows: Vec<Vec<String>> = points
            .iter()
            .map(|p| {
                vec![
                    output::format_time_ms(p["minute"].as_u64().unwrap_or(0) * unit_ms),
                    p["count"].to_string(),
                    p["errors"].to_string(),
                    format!("{:.0}", p["exec_p50_us"].as_f64().unwrap_or(0.0)),
                    format!("{:.0}", p["exec_p99_us"].as_f64().unwrap_or(0.0)),
                    format!("{:.0}", p["queue_p50_us"].as_f64().unwrap_or(0.0)),
                    format!("{:.0}", p["queue_p99_us"].as_f64().unwrap_or(0.0)),
                ]
            })
            .collect();
        print!(
            "{}",
            output::table(
                &[
                    "MINUTE",
                    "COUNT",
                    "ERRORS",
                    "P50 us",
                    "P99 us",
                    "QUEUE P50 us",
                    "QUEUE P99 us"
                ],
                &rows
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}
