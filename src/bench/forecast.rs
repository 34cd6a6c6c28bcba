//! `bench forecast`: what forecasting costs per series per step, the ONNX model batched.

use anyhow::{Context, Result};
use prescient_onnx::forecaster::Forecaster;
use prescient_policy::forecast::{self, Batch, Series, FEATURES};
use std::time::Instant;

/// Per-minute counts with a daily cycle and noise, different per series.
fn value(series: usize, t: usize) -> f64 {
    let phase = (t % 1440) as f64 / 1440.0 * std::f64::consts::TAU;
    let x = (series as u64 * 7919 + t as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let noise = (x >> 33) as f64 / (1u64 << 31) as f64;
    (20.0 + 10.0 * series as f64 % 50.0) * (1.5 + phase.sin()) * (0.8 + 0.4 * noise)
}

pub(super) fn forecast(sizes: &[usize], steps: usize) -> Result<serde_json::Value> {
    let mut model = Forecaster::load().context("the forecasting model")?;
    let mut rows = Vec::new();
    for &n in sizes {
        let n = n.max(1);
        let mut timed = |with_model: bool| {
            let mut series: Vec<Series> = (0..n).map(|_| Series::new(1440, &[1, 5, 15])).collect();
            let mut batch = Batch::default();
            let (mut total, mut infer) = (0.0f64, 0.0f64);
            let (mut feats, mut point, mut upper) = (Vec::new(), Vec::new(), Vec::new());
            for t in 0..2 * steps {
                for (i, s) in series.iter_mut().enumerate() {
                    s.observe(value(i, t));
                }
                let start = Instant::now();
                let m = with_model.then_some(&mut model as &mut dyn forecast::Model);
                std::hint::black_box(forecast::forecast_batch(series.iter_mut(), m, &mut batch));
                if t >= steps {
                    total += start.elapsed().as_secs_f64();
                }
                if with_model && t >= steps {
                    // The model alone, on the same rows.
                    feats.resize(n * FEATURES, 0.0);
                    for (s, row) in series.iter().zip(feats.chunks_exact_mut(FEATURES)) {
                        s.model_row(row);
                    }
                    let start = Instant::now();
                    model.infer(&feats, &mut point, &mut upper)?;
                    infer += start.elapsed().as_secs_f64();
                }
            }
            let per = |secs: f64| secs / (steps * n) as f64 * 1e6;
            anyhow::Ok((per(total), per(infer)))
        };
        let (baselines, _) = timed(false)?;
        let (with_model, inference) = timed(true)?;
        rows.push(serde_json::json!({
            "series": n,
            "us_per_series_step": with_model,
            "model_inference_us_per_series_step": inference,
            "baselines_alone_us_per_series_step": baselines,
        }));
    }
    Ok(
        serde_json::json!({ "bench": "forecast", "steps": steps, "horizons": [1, 5, 15], "rows": rows }),
    )
}
