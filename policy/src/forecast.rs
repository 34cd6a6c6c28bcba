//! Load forecasting, pure: the baselines (naive, seasonal naive, moving average, EWMA, damped
//! Holt-Winters, seasonal once two seasons are seen) and the trained model's forecasts (run
//! outside, batched, from [`Series::model_row`]), each series' forecast taken from whichever has
//! been most accurate lately at that horizon (a rolling backtest on what the series has shown so
//! far), and an upper quantile (the model's own, or a baseline's recent residuals). The control
//! node, the simulator and `prescient forecast backtest` run this same code.

mod features;

pub use features::{features, history_needed, FEATURES, MODEL_HORIZON, WINDOW};
use std::collections::VecDeque;

/// The upper quantile forecast alongside the point.
pub const QUANTILE: f64 = 0.9;
/// Forecasts resolved per (horizon, method) that selection scores on.
const SCORED: usize = 240;
/// Fewer resolved than this: EWMA, the safe default.
const MIN_SCORED: usize = 8;
/// How much lower another forecaster's recent MAE must be to replace the current one.
const SWITCH_MARGIN: f64 = 0.05;
/// Residuals kept per (horizon, method) for the quantile.
const RESIDUALS: usize = 200;
const MA_WINDOW: usize = 10;
const EWMA_ALPHA: f64 = 0.3;
const HW_ALPHA: f64 = 0.3;
const HW_BETA: f64 = 0.05;
const HW_GAMMA: f64 = 0.2;
const HW_PHI: f64 = 0.9;

/// A forecaster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Naive,
    SeasonalNaive,
    MovingAverage,
    Ewma,
    HoltWinters,
    /// The trained global model (`models/forecaster.onnx`).
    Model,
}

/// Forecasters per series.
const METHODS: usize = 6;
const EWMA: usize = 3;
const MODEL: usize = 5;

impl Method {
    pub const ALL: [Method; METHODS] = [
        Method::Naive,
        Method::SeasonalNaive,
        Method::MovingAverage,
        Method::Ewma,
        Method::HoltWinters,
        Method::Model,
    ];

    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Naive => "naive",
            Method::SeasonalNaive => "seasonal-naive",
            Method::MovingAverage => "moving-average",
            Method::Ewma => "ewma",
            Method::HoltWinters => "holt-winters",
            Method::Model => "model",
        }
    }
}

/// One horizon's forecast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    pub horizon: usize,
    pub point: f64,
    /// The `QUANTILE` upper forecast (never below the point).
    pub upper: f64,
    /// Which forecaster it is.
    pub method: Method,
}

/// Damped additive Holt-Winters; seasonal once two seasons have been seen.
#[derive(Debug, Clone, Default)]
struct HoltWinters {
    level: f64,
    trend: f64,
    seasonal: Vec<f64>,
    started: bool,
}

/// The model's output for one series at one origin, in the units of its row's scale.
#[derive(Debug, Clone, Copy)]
pub struct ModelOutput<'a> {
    /// Per step ahead 1..=`MODEL_HORIZON`.
    pub point: &'a [f32],
    pub upper: &'a [f32],
    /// What [`Series::model_row`] returned.
    pub scale: f64,
}

impl ModelOutput<'_> {
    fn at(&self, h: usize) -> Option<(f64, f64)> {
        let i = h.checked_sub(1)?;
        let p = (f64::from(*self.point.get(i)?) * self.scale).max(0.0);
        let u = (f64::from(*self.upper.get(i)?) * self.scale).max(p);
        (p.is_finite() && u.is_finite()).then_some((p, u))
    }
}

/// One series' forecasters, fed one step at a time.
#[derive(Debug, Clone)]
pub struct Series {
    /// The latest values (bounded: what the forecasters and the model's row can use).
    history: Vec<f64>,
    /// Steps observed in all.
    t: usize,
    /// History kept.
    keep: usize,
    /// Steps per season (a day); 0: none.
    season: usize,
    horizons: Vec<usize>,
    ma_sum: f64,
    ewma: Option<f64>,
    hw: HoltWinters,
    /// Per horizon index: forecasts made and not yet resolved (target step, each method's
    /// point, NaN where it had none), in target order.
    pending: Vec<VecDeque<(usize, [f64; METHODS])>>,
    /// Per horizon index, per method: recent absolute errors and residuals, newest last.
    errors: Vec<[VecDeque<f64>; METHODS]>,
    residuals: Vec<[VecDeque<f64>; METHODS]>,
    /// One method always, instead of selection (to score the baselines alone).
    only: Option<Method>,
    /// Per horizon index: the method forecasting last.
    chosen: Vec<Option<usize>>,
}

impl Series {
    /// A series with `season` steps per season (0: none) forecast at `horizons` steps ahead.
    pub fn new(season: usize, horizons: &[usize]) -> Series {
        let empty = || std::array::from_fn(|_| VecDeque::new());
        Series {
            history: Vec::new(),
            t: 0,
            keep: history_needed(season).max(2 * season + 1) + MA_WINDOW,
            season,
            horizons: horizons.iter().map(|h| (*h).max(1)).collect(),
            ma_sum: 0.0,
            ewma: None,
            hw: HoltWinters::default(),
            pending: horizons.iter().map(|_| VecDeque::new()).collect(),
            errors: horizons.iter().map(|_| empty()).collect(),
            residuals: horizons.iter().map(|_| empty()).collect(),
            only: None,
            chosen: horizons.iter().map(|_| None).collect(),
        }
    }

    /// As [`Series::new`], always forecasting with `method`.
    pub fn only(season: usize, horizons: &[usize], method: Method) -> Series {
        Series {
            only: Some(method),
            ..Series::new(season, horizons)
        }
    }

    /// Steps observed.
    pub fn len(&self) -> usize {
        self.t
    }

    pub fn is_empty(&self) -> bool {
        self.t == 0
    }

    /// The model's input row for the latest origin; returns its scale (`None` before the first
    /// observation).
    pub fn model_row(&self, row: &mut [f32]) -> Option<f64> {
        (!self.history.is_empty()).then(|| features(&self.history, self.season, row))
    }

    /// The next step's value: resolves the forecasts made for it and updates every forecaster.
    pub fn observe(&mut self, y: f64) {
        let y = if y.is_finite() { y.max(0.0) } else { 0.0 };
        let t = self.t;
        for (hi, pending) in self.pending.iter_mut().enumerate() {
            while let Some((target, points)) = pending.front().copied() {
                if target > t {
                    break;
                }
                pending.pop_front();
                for (m, point) in points.iter().enumerate().filter(|(_, p)| p.is_finite()) {
                    push(&mut self.errors[hi][m], (y - point).abs(), SCORED);
                    push(&mut self.residuals[hi][m], y - point, RESIDUALS);
                }
            }
        }
        self.update_hw(y, t);
        self.history.push(y);
        self.t += 1;
        self.ma_sum += y;
        if self.history.len() > MA_WINDOW {
            self.ma_sum -= self.history[self.history.len() - 1 - MA_WINDOW];
        }
        // Drained in halves: amortised O(1) per step, the memory bounded.
        if self.history.len() >= 2 * self.keep {
            self.history.drain(..self.history.len() - self.keep);
        }
        self.ewma = Some(match self.ewma {
            Some(e) => EWMA_ALPHA * y + (1.0 - EWMA_ALPHA) * e,
            None => y,
        });
    }

    fn update_hw(&mut self, y: f64, t: usize) {
        let m = self.season;
        let hw = &mut self.hw;
        if !hw.started {
            hw.level = y;
            hw.started = true;
            return;
        }
        // Two seasons seen: seasonal indices from them, level and trend from their means
        // (history is kept whole until then).
        if m > 0 && hw.seasonal.is_empty() && t == 2 * m {
            let first = self.history[..m].iter().sum::<f64>() / m as f64;
            let second = self.history[m..2 * m].iter().sum::<f64>() / m as f64;
            hw.seasonal = (0..m)
                .map(|i| ((self.history[i] - first) + (self.history[m + i] - second)) / 2.0)
                .collect();
            hw.level = second;
            hw.trend = (second - first) / m as f64;
        }
        let s = if hw.seasonal.is_empty() {
            0.0
        } else {
            hw.seasonal[t % m]
        };
        let level = HW_ALPHA * (y - s) + (1.0 - HW_ALPHA) * (hw.level + HW_PHI * hw.trend);
        hw.trend = HW_BETA * (level - hw.level) + (1.0 - HW_BETA) * HW_PHI * hw.trend;
        if !hw.seasonal.is_empty() {
            hw.seasonal[t % m] = HW_GAMMA * (y - level) + (1.0 - HW_GAMMA) * s;
        }
        hw.level = level;
    }

    /// Each baseline's point `h` steps past the last observation (the model's slot NaN).
    fn points(&self, h: usize) -> [f64; METHODS] {
        let n = self.history.len();
        let last = self.history.last().copied().unwrap_or(0.0);
        let m = self.season;
        let seasonal = if m > 0 && n >= m {
            // The same step of the latest season that has it.
            let back = m * h.div_ceil(m);
            self.history[n + h - back - 1]
        } else {
            last
        };
        let ma = self.ma_sum / n.clamp(1, MA_WINDOW) as f64;
        let hw = &self.hw;
        let damped: f64 = (1..=h).map(|k| HW_PHI.powi(k as i32)).sum();
        let s = if hw.seasonal.is_empty() {
            0.0
        } else {
            hw.seasonal[(self.t - 1 + h) % m]
        };
        let holt = hw.level + damped * hw.trend + s;
        let [a, b, c, d, e] =
            [last, seasonal, ma, self.ewma.unwrap_or(0.0), holt].map(|x| x.max(0.0));
        [a, b, c, d, e, f64::NAN]
    }

    /// Forecasts every horizon from the baselines alone (see [`Series::forecast_with`]).
    pub fn forecast(&mut self) -> Vec<Forecast> {
        self.forecast_with(None)
    }

    /// Forecasts every horizon from what has been observed, by the method with the lowest
    /// recent error at that horizon among the baselines and `model` (this origin's model
    /// output, where the model ran), and remembers them to score when their targets arrive.
    /// Until a horizon has been scored the model is taken where it ran, else EWMA.
    pub fn forecast_with(&mut self, model: Option<ModelOutput<'_>>) -> Vec<Forecast> {
        let n = self.t;
        if n == 0 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.horizons.len());
        for (hi, &h) in self.horizons.iter().enumerate() {
            let mut points = self.points(h);
            let from_model = model.and_then(|m| m.at(h));
            if let Some((p, _)) = from_model {
                points[MODEL] = p;
            }
            let available = |m: usize| points[m].is_finite();
            let scored = &self.errors[hi];
            let fixed = self
                .only
                .and_then(|o| Method::ALL.iter().position(|m| *m == o))
                .filter(|m| available(*m));
            let fallback = if available(MODEL) { MODEL } else { EWMA };
            let method = if let Some(m) = fixed {
                m
            } else if self.only.is_some() || scored[0].len() < MIN_SCORED {
                fallback
            } else {
                let mae = |m: usize| scored[m].iter().sum::<f64>() / scored[m].len() as f64;
                let eligible = |m: &usize| available(*m) && scored[*m].len() >= MIN_SCORED;
                let best = (0..METHODS)
                    .filter(eligible)
                    .min_by(|a, b| mae(*a).total_cmp(&mae(*b)))
                    .unwrap_or(fallback);
                // Another forecaster takes over only when clearly better: on near-constant
                // series they all tie but for a blip, and following each blip loses.
                match self.chosen[hi].filter(eligible) {
                    Some(c) if mae(best) >= mae(c) * (1.0 - SWITCH_MARGIN) => c,
                    _ => best,
                }
            };
            self.chosen[hi] = Some(method);
            let point = points[method];
            let r = &self.residuals[hi][method];
            let upper = if method == MODEL {
                from_model.map_or(point, |(_, u)| u)
            } else if r.is_empty() {
                point
            } else {
                let mut v: Vec<f64> = r.iter().copied().collect();
                // The quantile's rank alone: no full sort on every step.
                let i = ((v.len() as f64 * QUANTILE).ceil() as usize).clamp(1, v.len()) - 1;
                let (_, q, _) = v.select_nth_unstable_by(i, f64::total_cmp);
                (point + *q).max(point)
            };
            out.push(Forecast {
                horizon: h,
                point,
                upper,
                method: Method::ALL[method],
            });
            self.pending[hi].push_back((n - 1 + h, points));
        }
        out
    }
}

fn push(q: &mut VecDeque<f64>, x: f64, cap: usize) {
    q.push_back(x);
    while q.len() > cap {
        q.pop_front();
    }
}

/// One backtest row: the forecast of `y[origin + horizon]` made from `y[0..=origin]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacktestRow {
    pub origin: usize,
    pub forecast: Forecast,
}

/// The trained model, run outside the decision crate (ONNX Runtime in `prescient-onnx`).
pub trait Model {
    /// Runs the model on `rows` (`FEATURES` per row), writing `MODEL_HORIZON` points and
    /// uppers per row into `point` and `upper`; `false` when it could not run (the baselines
    /// are used alone then).
    fn run(&mut self, rows: &[f32], point: &mut Vec<f32>, upper: &mut Vec<f32>) -> bool;
}

/// Buffers for [`forecast_batch`], reused between calls.
#[derive(Debug, Default)]
pub struct Batch {
    rows: Vec<f32>,
    scales: Vec<f64>,
    point: Vec<f32>,
    upper: Vec<f32>,
}

/// Every series' forecasts at its latest origin, the model run once for all of them.
pub fn forecast_batch<'s>(
    series: impl IntoIterator<Item = &'s mut Series>,
    model: Option<&mut (dyn Model + '_)>,
    batch: &mut Batch,
) -> Vec<Vec<Forecast>> {
    let mut series: Vec<&mut Series> = series.into_iter().collect();
    let ran = match model {
        Some(m) => {
            batch.rows.clear();
            batch.rows.resize(series.len() * FEATURES, 0.0);
            batch.scales.clear();
            for (s, row) in series.iter().zip(batch.rows.chunks_exact_mut(FEATURES)) {
                batch.scales.push(s.model_row(row).unwrap_or(1.0));
            }
            m.run(&batch.rows, &mut batch.point, &mut batch.upper)
                && batch.point.len() == series.len() * MODEL_HORIZON
                && batch.upper.len() == series.len() * MODEL_HORIZON
        }
        None => false,
    };
    series
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            let out = ran.then(|| ModelOutput {
                point: &batch.point[i * MODEL_HORIZON..(i + 1) * MODEL_HORIZON],
                upper: &batch.upper[i * MODEL_HORIZON..(i + 1) * MODEL_HORIZON],
                scale: batch.scales[i],
            });
            s.forecast_with(out)
        })
        .collect()
}

/// The rolling backtest on the test split of each series (all as long as the first): for
/// every origin `o` from `floor(2T/3) - 1` to `T - 1 - h`, the forecast of `y[o + h]` from
/// `y[0..=o]` alone (every earlier origin is forecast too, unreported, so selection has its
/// history); by `only` alone where given; the model run once per origin for all series.
pub fn backtest(
    columns: &[&[f64]],
    season: usize,
    horizons: &[usize],
    only: Option<Method>,
    mut model: Option<&mut dyn Model>,
) -> Vec<Vec<BacktestRow>> {
    let t = columns.first().map_or(0, |c| c.len());
    let first = (2 * t / 3).saturating_sub(1);
    let mut series: Vec<Series> = columns
        .iter()
        .map(|_| match only {
            Some(m) => Series::only(season, horizons, m),
            None => Series::new(season, horizons),
        })
        .collect();
    // A baseline alone needs no model run.
    if only.is_some_and(|m| m != Method::Model) {
        model = None;
    }
    let mut batch = Batch::default();
    let mut out = vec![Vec::new(); columns.len()];
    for o in 0..t {
        for (s, c) in series.iter_mut().zip(columns) {
            s.observe(c.get(o).copied().unwrap_or(0.0));
        }
        let forecasts = forecast_batch(series.iter_mut(), model.as_deref_mut(), &mut batch);
        if o < first {
            continue;
        }
        for (rows, fs) in out.iter_mut().zip(forecasts) {
            rows.extend(
                fs.into_iter()
                    .filter(|f| o + f.horizon < t)
                    .map(|forecast| BacktestRow {
                        origin: o,
                        forecast,
                    }),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(y: &[f64], season: usize, horizons: &[usize]) -> Vec<BacktestRow> {
        backtest(&[y], season, horizons, None, None).remove(0)
    }

    fn noise(i: usize) -> f64 {
        // A fixed pseudo-random sequence in [-1, 1).
        let x = (i as u64)
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as f64 / (1u64 << 31) as f64) - 1.0
    }

    fn mae(rows: &[BacktestRow], y: &[f64], h: usize) -> f64 {
        let r: Vec<_> = rows.iter().filter(|r| r.forecast.horizon == h).collect();
        r.iter()
            .map(|r| (y[r.origin + h] - r.forecast.point).abs())
            .sum::<f64>()
            / r.len() as f64
    }

    #[test]
    fn a_daily_cycle_is_forecast_by_a_seasonal_method() {
        let m = 48;
        let y: Vec<f64> = (0..m * 8)
            .map(|i| {
                let phase = (i % m) as f64 / m as f64 * std::f64::consts::TAU;
                100.0 + 60.0 * phase.sin() + 3.0 * noise(i)
            })
            .collect();
        let rows = one(&y, m, &[1, 5, 15]);
        let h15: Vec<_> = rows.iter().filter(|r| r.forecast.horizon == 15).collect();
        let seasonal = h15
            .iter()
            .filter(|r| {
                matches!(
                    r.forecast.method,
                    Method::SeasonalNaive | Method::HoltWinters
                )
            })
            .count();
        assert!(
            seasonal * 10 >= h15.len() * 9,
            "{seasonal} of {}",
            h15.len()
        );
        // Far better than the naive forecast 15 steps out (which misses the cycle's swing).
        let naive: f64 = h15
            .iter()
            .map(|r| (y[r.origin + 15] - y[r.origin]).abs())
            .sum::<f64>()
            / h15.len() as f64;
        assert!(
            mae(&rows, &y, 15) < naive / 3.0,
            "{} vs {naive}",
            mae(&rows, &y, 15)
        );
    }

    #[test]
    fn origins_cover_the_test_split_and_never_see_the_future() {
        let y: Vec<f64> = (0..300).map(|i| 20.0 + 5.0 * noise(i)).collect();
        let rows = one(&y, 0, &[1, 5]);
        let first = 2 * 300 / 3 - 1;
        for h in [1, 5] {
            let o: Vec<usize> = rows
                .iter()
                .filter(|r| r.forecast.horizon == h)
                .map(|r| r.origin)
                .collect();
            assert_eq!(o.first(), Some(&first));
            assert_eq!(o.last(), Some(&(300 - 1 - h)));
            assert_eq!(o.len(), 300 - h - first);
        }
        // Changing the future changes no forecast made before it.
        let mut later = y.clone();
        for v in &mut later[250..] {
            *v *= 10.0;
        }
        let again = one(&later, 0, &[1, 5]);
        for (a, b) in rows.iter().zip(&again) {
            if a.origin < 250 {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn the_upper_quantile_covers_about_nine_in_ten_and_a_shift_is_followed() {
        let y: Vec<f64> = (0..3000)
            .map(|i| if i < 2200 { 50.0 } else { 150.0 } + 10.0 * noise(i))
            .collect();
        let rows = one(&y, 0, &[1]);
        let calm: Vec<_> = rows.iter().filter(|r| r.origin + 1 < 2200).collect();
        let covered = calm
            .iter()
            .filter(|r| y[r.origin + 1] <= r.forecast.upper)
            .count() as f64
            / calm.len() as f64;
        assert!((0.82..0.97).contains(&covered), "{covered}");
        assert!(rows.iter().all(|r| r.forecast.upper >= r.forecast.point));
        // Well after the shift the forecasts are about the new level.
        let after: Vec<_> = rows.iter().filter(|r| r.origin > 2400).collect();
        let mean = after.iter().map(|r| r.forecast.point).sum::<f64>() / after.len() as f64;
        assert!((mean - 150.0).abs() < 10.0, "{mean}");
    }
}
