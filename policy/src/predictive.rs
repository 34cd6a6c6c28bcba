//! How predictive and reactive sizing combine for one task, within the graph's scaling
//! policy: the planner's floor (capacity ordered a lead time ahead of the forecast) and the
//! reactive desire (what the load measured now asks for, for surprises) — the larger wins —
//! then the task's minimum and maximum, the graph's VM budget, step limits and cooldowns.
//! In `forecast-only` mode the reactive desire is applied and the predictive one only told.

use std::fmt::Write as _;
use std::time::Duration;

/// Whether the forecast acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Reactive alone; nothing is forecast.
    Off,
    /// Forecast and plan, and say what would change, but apply the reactive desire (as AWS's
    /// predictive scaling offers, to judge a forecast before trusting it).
    ForecastOnly,
    /// The plan sets the floor.
    #[default]
    On,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "off" => Some(Mode::Off),
            "forecast-only" => Some(Mode::ForecastOnly),
            "on" => Some(Mode::On),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::ForecastOnly => "forecast-only",
            Mode::On => "on",
        }
    }
}

/// A task's bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
    /// Replicas this task may hold within the graph's VM budget (its current ones plus the
    /// budget left), `None`: no budget.
    pub budget: Option<u32>,
    /// Replicas added per decision at most (0: no limit).
    pub step_out: u32,
    /// Replicas retired per decision at most (0: no limit).
    pub step_in: u32,
    pub out_cooldown: Duration,
    /// No scale-in within this long of the task's last change.
    pub in_cooldown: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            min: 1,
            max: u32::MAX,
            budget: None,
            step_out: 0,
            step_in: 0,
            out_cooldown: Duration::ZERO,
            in_cooldown: Duration::from_secs(60),
        }
    }
}

/// When the task last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct History {
    pub last_out: Option<Duration>,
    pub last_in: Option<Duration>,
}

impl History {
    /// Records `decision` as taken at `now`.
    pub fn record(&mut self, current: u32, decision: &Decision, now: Duration) {
        if decision.desired > current {
            self.last_out = Some(now);
        } else if decision.desired < current {
            self.last_in = Some(now);
        }
    }
}

/// One decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas to have (equal to current: no change).
    pub desired: u32,
    /// What the plan alone asked for (bounded), where there was a plan.
    pub planned: Option<u32>,
    /// In forecast-only mode, what predictive sizing would have set.
    pub would: Option<u32>,
    pub reason: String,
}

/// Combines `reactive` and the planner's `floor` for a task holding `current` replicas.
pub fn decide(
    current: u32,
    reactive: u32,
    floor: Option<u32>,
    mode: Mode,
    b: &Bounds,
    h: &History,
    now: Duration,
) -> Decision {
    let floor = floor.filter(|_| mode != Mode::Off);
    let predictive = reactive.max(floor.unwrap_or(0));
    let acting = if mode == Mode::On {
        predictive
    } else {
        reactive
    };
    let desired = bounded(current, acting, b, h, now);
    let mut reason = format!("reactive {reactive}");
    if let Some(f) = floor {
        let _ = write!(reason, ", plan {f}");
    }
    let would = (mode == Mode::ForecastOnly)
        .then(|| bounded(current, predictive, b, h, now))
        .filter(|w| *w != desired);
    if let Some(w) = would {
        let _ = write!(reason, " (forecast-only: would set {w})");
    }
    if desired != acting {
        let _ = write!(reason, "; bounded to {desired}");
        let _ = write!(reason, " (min {}, max {}", b.min, b.max);
        if let Some(v) = b.budget {
            let _ = write!(reason, ", budget {v}");
        }
        reason.push(')');
    }
    Decision {
        desired,
        planned: floor.map(|f| clamp(f, b)),
        would,
        reason,
    }
}

fn clamp(n: u32, b: &Bounds) -> u32 {
    let max = b
        .max
        .min(b.budget.unwrap_or(u32::MAX))
        .max(b.min.min(b.max));
    n.clamp(b.min.min(max), max)
}

fn within(since: Option<Duration>, cooldown: Duration, now: Duration) -> bool {
    since.is_some_and(|t| now.saturating_sub(t) < cooldown)
}

fn bounded(current: u32, want: u32, b: &Bounds, h: &History, now: Duration) -> u32 {
    let want = clamp(want, b);
    // Outside the bounds already (a policy changed): straight back within them.
    if current < b.min || current > clamp(current, b) {
        return want;
    }
    if want > current {
        if within(h.last_out, b.out_cooldown, now) {
            return current;
        }
        let step = if b.step_out == 0 {
            u32::MAX
        } else {
            b.step_out
        };
        return want.min(current.saturating_add(step));
    }
    if want < current {
        let last = h.last_out.max(h.last_in);
        if within(last, b.in_cooldown, now) {
            return current;
        }
        let step = if b.step_in == 0 { u32::MAX } else { b.step_in };
        return want.max(current.saturating_sub(step));
    }
    current
}
