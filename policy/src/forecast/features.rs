//! The forecasting model's input row, computed from a series' history exactly as
//! `models/train_forecaster.py` computes it for training (the fixture it writes proves they
//! agree): values normalised by the window's mean, so one model serves every series.

/// Values in the window.
pub const WINDOW: usize = 48;
/// Steps ahead the model forecasts.
pub const MODEL_HORIZON: usize = 15;
/// Inputs per row.
pub const FEATURES: usize = WINDOW + 4 + SEASON_LAGS + 1;
/// Steps of the previous season before the origin's own step that the row carries.
const BEFORE: usize = 4;
const SEASON_LAGS: usize = BEFORE + MODEL_HORIZON + 1;
const LONG: [usize; 2] = [192, 768];
/// History the row can depend on, at most: a longer history gives the same row.
pub fn history_needed(season: usize) -> usize {
    LONG[1].max(season + BEFORE + 1)
}

/// Writes the row for the origin at the end of `history` (never empty) into `row`
/// (`FEATURES` long) and returns the scale the model's outputs are multiplied by.
pub fn features(history: &[f64], season: usize, row: &mut [f32]) -> f64 {
    debug_assert_eq!(row.len(), FEATURES);
    let n = history.len();
    let first = history.first().copied().unwrap_or(0.0);
    let at = |i: isize| if i < 0 { first } else { history[i as usize] };
    let origin = n as isize - 1;
    let mut sum = 0.0;
    let mut zeros = 0usize;
    for k in 0..WINDOW {
        let v = at(origin - (WINDOW - 1 - k) as isize);
        sum += v;
        zeros += usize::from(v == 0.0);
    }
    let mean = sum / WINDOW as f64;
    let s = mean.max(1.0);
    for (k, slot) in row[..WINDOW].iter_mut().enumerate() {
        *slot = (at(origin - (WINDOW - 1 - k) as isize) / s) as f32;
    }
    for (j, span) in LONG.iter().enumerate() {
        let lo = n.saturating_sub(*span);
        let tail = &history[lo..];
        row[WINDOW + j] = (tail.iter().sum::<f64>() / tail.len().max(1) as f64 / s) as f32;
    }
    row[WINDOW + 2] = (mean.ln_1p() / 5.0) as f32;
    row[WINDOW + 3] = (zeros as f64 / WINDOW as f64) as f32;
    let lags = &mut row[WINDOW + 4..WINDOW + 4 + SEASON_LAGS];
    // A season shorter than the horizon would reach past the origin.
    let filled = season > MODEL_HORIZON && n > season + BEFORE;
    for (k, slot) in lags.iter_mut().enumerate() {
        *slot = if filled {
            // k = 0 is BEFORE steps before the origin's step one season ago.
            (history[n - 1 - season - BEFORE + k] / s) as f32
        } else {
            0.0
        };
    }
    row[FEATURES - 1] = if filled { 1.0 } else { 0.0 };
    s
}
