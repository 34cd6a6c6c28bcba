//! PNG plots of a run over time (`plotters`, a TrueType font found on the system or named by
//! `PRESCIENT_FONT`): load, replicas and latency per minute, one line per policy and lead time.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// Fonts tried in order when `PRESCIENT_FONT` is not set.
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a font as `sans-serif` once: the PNG's text needs one.
fn font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    let r = DONE.get_or_init(|| {
        let candidates: Vec<String> = match std::env::var("PRESCIENT_FONT") {
            Ok(p) => vec![p],
            Err(_) => FONTS.iter().map(|s| s.to_string()).collect(),
        };
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // Registered fonts live for the process: the bytes are leaked once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a TrueType font"));
            }
        }
        Err(format!(
            "--plot needs a TrueType font: none of {} (install fonts-dejavu-core, or set PRESCIENT_FONT to a .ttf)",
            candidates.join(", ")
        ))
    });
    r.clone().map_err(anyhow::Error::msg)
}

/// One line of a panel: its label and (minute, value) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A panel: a title, its y-axis name, and its lines.
pub struct Panel {
    pub title: String,
    pub y: String,
    pub series: Vec<Series>,
}

/// Draws `panels` stacked, sharing the x axis (`x` names it), into the PNG at `path`.
pub fn write(path: &Path, x: &str, panels: &[Panel]) -> Result<()> {
    font()?;
    if panels.is_empty() {
        bail!("nothing to plot");
    }
    let height = 320 * panels.len() as u32;
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels.len(), 1));
    for (panel, area) in panels.iter().zip(&areas) {
        let all = panel.series.iter().flat_map(|s| &s.points);
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
        for (x, y) in all {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y1 = y1.max(*y);
        }
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), 0.0..(y1 * 1.05).max(1e-9))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x)
            .y_desc(&panel.y)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, s) in panel.series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(err)?
                .label(&s.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The simulation's runs (their `minutes`) as three panels: arrivals, replicas billed, and the
/// share of completions within objective.
pub fn simulation(path: &Path, title: &str, runs: &[serde_json::Value]) -> Result<()> {
    let minutes = |r: &serde_json::Value| r["minutes"].as_array().cloned().unwrap_or_default();
    let label = |r: &serde_json::Value| {
        format!(
            "{} L={}s",
            r["policy"].as_str().unwrap_or(""),
            r["lead_s"].as_f64().unwrap_or(0.0)
        )
    };
    let line = |r: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> Option<f64>| Series {
        label: label(r),
        points: minutes(r)
            .iter()
            .filter_map(|m| Some((m["minute"].as_f64()?, f(m)?)))
            .collect(),
    };
    let load = runs
        .first()
        .map(|r| {
            let mut s = line(r, &|m| m["arrivals"].as_f64());
            s.label = "invocations".into();
            s
        })
        .into_iter()
        .collect();
    let replicas = runs
        .iter()
        .map(|r| line(r, &|m| m["replicas"].as_f64()))
        .collect();
    let within = runs
        .iter()
        .map(|r| {
            line(r, &|m| {
                let c = m["completed"].as_f64()?;
                (c > 0.0).then(|| 100.0 * m["within_objective"].as_f64().unwrap_or(0.0) / c)
            })
        })
        .collect();
    write(
        path,
        "minute of the trace",
        &[
            Panel {
                title: format!("{title}: load"),
                y: "invocations / min".into(),
                series: load,
            },
            Panel {
                title: "replicas (billed)".into(),
                y: "replicas".into(),
                series: replicas,
            },
            Panel {
                title: "within objective".into(),
                y: "% of completions".into(),
                series: within,
            },
        ],
    )
    .context("--plot")
}
