//! `prescient forecast backtest`: the decision crate's forecasting (the ONNX model, the
//! baselines and per-series selection, as the control node runs them) on a CSV of per-step
//! counts, every test-split origin's forecast as CSV on stdout.

use anyhow::{bail, Context, Result};
use prescient_policy::forecast;
use std::io::Write;
use std::path::Path;

/// What `forecast` does.
#[derive(Debug, clap::Subcommand)]
pub enum Which {
    /// For every series (column) and every origin o from floor(2T/3) - 1 to T - 1 - h, the
    /// forecast of y[o+h] made from y[0..=o] only: `series,origin,h,point,q90` on stdout.
    Backtest {
        /// A CSV: the first column the time step, every other a series of counts per step; a
        /// first row that is not numbers names the series.
        #[arg(long)]
        csv: std::path::PathBuf,
        /// Seconds per step (default: the first column's spacing where it is numeric, else
        /// 60); a day of steps is the season.
        #[arg(long)]
        step: Option<u64>,
        /// Steps ahead, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,5,15")]
        horizons: Vec<usize>,
        /// One forecaster alone instead of the per-series selection: naive, seasonal-naive,
        /// moving-average, ewma, holt-winters or model (to score each the same way).
        #[arg(long)]
        method: Option<String>,
        /// Selection among the baselines only, without the ONNX model.
        #[arg(long)]
        no_model: bool,
    },
}

pub fn run(which: Which) -> Result<std::process::ExitCode> {
    match which {
        Which::Backtest {
            csv,
            step,
            horizons,
            method,
            no_model,
        } => {
            let only = match method.as_deref() {
                None => None,
                Some(m) => Some(forecast::Method::parse(m).with_context(|| {
                    let all: Vec<&str> = forecast::Method::ALL.iter().map(|m| m.name()).collect();
                    format!("--method {m:?}: one of {}", all.join(", "))
                })?),
            };
            backtest(&csv, step, &horizons, only, no_model)?
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The series of a CSV: names, and the columns as numbers; the steps' spacing when numeric.
pub(crate) struct Table {
    pub names: Vec<String>,
    pub columns: Vec<Vec<f64>>,
    pub spacing: Option<u64>,
}

pub(crate) fn read(path: &Path) -> Result<Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();
    let Some((_, first)) = lines.peek().copied() else {
        bail!("{}: empty", path.display());
    };
    let cells: Vec<&str> = first.split(',').map(str::trim).collect();
    if cells.len() < 2 {
        bail!(
            "{}:1: a time-step column and at least one series expected",
            path.display()
        );
    }
    let header = cells[1..].iter().any(|c| c.parse::<f64>().is_err());
    let names: Vec<String> = if header {
        lines.next();
        cells[1..].iter().map(|c| c.to_string()).collect()
    } else {
        (1..cells.len()).map(|i| format!("s{i}")).collect()
    };
    let mut columns = vec![Vec::new(); names.len()];
    let mut steps = Vec::new();
    for (i, line) in lines {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != names.len() + 1 {
            bail!(
                "{}:{}: {} fields, expected {} (the step and {} series)",
                path.display(),
                i + 1,
                cells.len(),
                names.len() + 1,
                names.len()
            );
        }
        steps.push(cells[0].parse::<f64>().ok());
        for (c, cell) in cells[1..].iter().enumerate() {
            let v: f64 = cell
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .with_context(|| {
                    format!(
                        "{}:{}: series {:?}: {cell:?} is not a non-negative count",
                        path.display(),
                        i + 1,
                        names[c]
                    )
                })?;
            columns[c].push(v);
        }
    }
    let spacing = match (steps.first(), steps.get(1)) {
        (Some(Some(a)), Some(Some(b))) if b > a => Some((b - a).round() as u64).filter(|s| *s > 0),
        _ => None,
    };
    Ok(Table {
        names,
        columns,
        spacing,
    })
}

fn backtest(
    path: &Path,
    step: Option<u64>,
    horizons: &[usize],
    only: Option<forecast::Method>,
    no_model: bool,
) -> Result<()> {
    if horizons.is_empty() || horizons.contains(&0) {
        bail!("--horizons {horizons:?}: steps ahead are at least 1");
    }
    let t = read(path)?;
    let step = step.or(t.spacing).unwrap_or(60).max(1);
    let season = if 86_400 % step == 0 {
        (86_400 / step) as usize
    } else {
        0
    };
    let mut model = if no_model {
        None
    } else {
        match prescient_onnx::forecaster::Forecaster::load() {
            Ok(m) => Some(m),
            Err(e) if only == Some(forecast::Method::Model) => bail!("--method model: {e}"),
            Err(e) => {
                eprintln!("forecasting with the baselines alone: {e}");
                None
            }
        }
    };
    let columns: Vec<&[f64]> = t.columns.iter().map(Vec::as_slice).collect();
    let rows = forecast::backtest(
        &columns,
        season,
        horizons,
        only,
        model.as_mut().map(|m| m as &mut dyn forecast::Model),
    );
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    writeln!(out, "series,origin,h,point,q90")?;
    for (name, rows) in t.names.iter().zip(rows) {
        for r in rows {
            writeln!(
                out,
                "{name},{},{},{:.4},{:.4}",
                r.origin, r.forecast.horizon, r.forecast.point, r.forecast.upper
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
