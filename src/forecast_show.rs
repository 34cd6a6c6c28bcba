//! `prescient forecast GRAPH`: each task's stored per-minute history, the control node's latest
//! forecast of it with its q90 band, and the plan on it (replicas each step needs, the floor
//! held now and why, beside the replicas there are), as a table, JSON, or a PNG.

use crate::client::ControlClient;
use crate::output;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::ExitCode;

/// What `prescient forecast GRAPH` shows.
#[derive(Debug, clap::Args)]
pub struct Show {
    /// The graph (id or name) whose forecasts to show.
    pub graph: Option<String>,
    /// One task only.
    #[arg(long)]
    pub task: Option<String>,
    /// Minutes of stored history to show before the forecast.
    #[arg(long, default_value_t = 60)]
    pub minutes: u64,
    /// Draw history, forecast with its band, planned and actual replicas into this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub async fn show(control: &str, a: &Show, json: bool) -> Result<ExitCode> {
    let Some(graph) = &a.graph else {
        bail!("forecast: name a graph (`prescient forecast GRAPH`), or run `prescient forecast backtest`");
    };
    let c = ControlClient::connect(control).await?;
    let id = c.resolve(graph).await?;
    let (mode, mut tasks) = c.forecast(&id).await?;
    if let Some(t) = &a.task {
        tasks.retain(|x| x["task"] == t.as_str());
        if tasks.is_empty() {
            bail!("{graph}: no forecast of a task {t:?} (mode {mode}; a task is forecast once its graph's [scaling.predictive] mode is on or forecast-only and a 10 s step has passed)");
        }
    }
    if tasks.is_empty() {
        bail!("{graph}: nothing forecast yet (its [scaling.predictive] mode is {mode}; set it to forecast-only or on, and forecasts start after one 10 s step)");
    }
    for t in &mut tasks {
        let task = t["task"].as_str().unwrap_or_default().to_string();
        let history: Vec<serde_json::Value> = c
            .history(&id, &task, a.minutes)
            .await?
            .into_iter()
            .map(|p| serde_json::json!({"minute": p["minute"], "per_s": p["count"].as_f64().unwrap_or(0.0) / 60.0}))
            .collect();
        t["history"] = serde_json::Value::Array(history);
    }
    if let Some(path) = &a.plot {
        plot(path, &id, &tasks)?;
        eprintln!("plot: {}", path.display());
    }
    if json {
        output::print_json(&serde_json::json!({"graph": id, "mode": mode, "tasks": tasks}))?;
        return Ok(ExitCode::SUCCESS);
    }
    for t in &tasks {
        let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
        println!(
            "{}.{}: mode {mode}, forecast by {}, burstiness {:.1}, lead {:.1} s; {} ready, {} provisioning; the plan holds {}",
            id,
            t["task"].as_str().unwrap_or_default(),
            t["method"].as_str().unwrap_or_default(),
            f("burstiness"),
            f("lead_s"),
            t["ready"],
            t["provisioning"],
            t["floor"]
        );
        if let Some(why) = t["floor_reason"].as_str().filter(|s| !s.is_empty()) {
            println!("  {why}");
        }
        let nums = |k: &str| -> Vec<f64> {
            t[k].as_array()
                .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default()
        };
        let (point, upper, planned) = (nums("point"), nums("upper"), nums("planned"));
        let rows: Vec<Vec<String>> = point
            .iter()
            .enumerate()
            .map(|(i, p)| (i as f64 * f("step_s") - f("first_step_ago_s"), i, p))
            // Steps already over are left out.
            .filter(|(from, ..)| from + f("step_s") > 0.0)
            .map(|(from, i, p)| {
                vec![
                    format!("{:+} s", from.round() as i64),
                    format!("{p:.2}"),
                    format!("{:.2}", upper.get(i).copied().unwrap_or(*p)),
                    planned.get(i).map_or("-".into(), |n| format!("{n:.0}")),
                ]
            })
            .collect();
        println!(
            "{}",
            output::table(&["STEP FROM NOW", "POINT/S", "Q90/S", "PLANNED"], &rows)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Two panels over minutes from now: arrivals (history, forecast, q90) and replicas (planned
/// per step, ready now), one line per task.
fn plot(path: &std::path::Path, graph: &str, tasks: &[serde_json::Value]) -> Result<()> {
    use crate::plot::{Panel, Series};
    let now_min = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() / 60.0);
    let mut load = Vec::new();
    let mut replicas = Vec::new();
    for t in tasks {
        let name = t["task"].as_str().unwrap_or_default();
        let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
        let steps = |k: &str| -> Vec<(f64, f64)> {
            t[k].as_array()
                .map(|v| {
                    v.iter()
                        .enumerate()
                        .filter_map(|(i, x)| {
                            let at = (i as f64 * f("step_s") - f("first_step_ago_s")) / 60.0;
                            Some((at, x.as_f64()?))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let history: Vec<(f64, f64)> = t["history"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|p| Some((p["minute"].as_f64()? - now_min, p["per_s"].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        load.push(Series {
            label: format!("{name}: history (per-minute)"),
            points: history,
        });
        load.push(Series {
            label: format!("{name}: forecast"),
            points: steps("point"),
        });
        load.push(Series {
            label: format!("{name}: q90"),
            points: steps("upper"),
        });
        let planned = steps("planned");
        let ready = f("ready") + f("provisioning");
        let span =
            planned.first().map(|p| p.0).unwrap_or(0.0)..=planned.last().map_or(0.0, |p| p.0);
        replicas.push(Series {
            label: format!("{name}: planned"),
            points: planned,
        });
        replicas.push(Series {
            label: format!("{name}: held now"),
            points: vec![(*span.start(), ready), (*span.end(), ready)],
        });
    }
    crate::plot::write(
        path,
        "minutes from now",
        &[
            Panel {
                title: format!("{graph}: arrivals per second, history and forecast"),
                y: "per second".into(),
                series: load,
            },
            Panel {
                title: format!("{graph}: replicas the plan needs, and held now"),
                y: "replicas".into(),
                series: replicas,
            },
        ],
    )
}
