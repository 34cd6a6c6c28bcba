//! How predictive and reactive sizing combine for one task, within the graph's scaling
//! policy: the planner's floor (capacity ordered a lead time ahead of the forecast) and the
//! reactive desire (what the load measured now asks for, for surprises) — the larger wins —
//! then the task's minimum and maximum, the graph's VM budget, step limits and cooldowns.
//! In `forecast-only` mode the reactive desire is applied and the predictive one only told.

use crate::planner;
use crate::snapshot::Deployment;
use prescient_schemas::{ScalingPolicy, Task};
use std::fmt::Write as _;
use std::time::Duration;

/// Whether the forecast acts: the graph's `[scaling.predictive] mode` (off, forecast-only: as
/// AWS's predictive scaling offers, to judge a forecast before trusting it, or on).
pub use prescient_schemas::scaling::PredictiveMode as Mode;

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

/// The plan's floor for one task, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    pub replicas: u32,
    pub reason: String,
}

/// The lead time a new replica of `task` is planned with: the p90 of the lead times measured
/// on its hosts (placement to ready, warm-up included), else `assumed`.
pub fn task_lead(d: &Deployment, task: &str, assumed: Duration) -> Duration {
    let mut took: Vec<Duration> = d
        .lead_times
        .iter()
        .filter(|((t, _), _)| t == task)
        .map(|(_, l)| l.ready_after)
        .collect();
    planner::lead_quantile(&mut took).unwrap_or(assumed)
}

/// The plan on one task's forecast: every step sized, the lead time it is planned with, and
/// the floor it sets now (`None` when no step falls within the lead time).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPlan {
    pub steps: Vec<planner::Step>,
    pub lead: Duration,
    pub floor: Option<Floor>,
}

/// The plan for `task` of `d` at `now` under `policy`'s `[scaling.predictive]`: the task's
/// forecast (upper quantile) sized by the queueing model, for the share `attainment` of
/// executions to start within `max_wait` (default: its mean execution time); the floor is the
/// most any step needs before a replica ordered now could be ready. `None` when the mode is
/// off or nothing has been forecast yet.
pub fn plan_for(
    d: &Deployment,
    policy: &ScalingPolicy,
    task: &Task,
    now: Duration,
) -> Option<TaskPlan> {
    planned(d, policy, task, now, true)
}

/// [`plan_for`], every step sized (`whole`), or only those the floor reads.
fn planned(
    d: &Deployment,
    policy: &ScalingPolicy,
    task: &Task,
    now: Duration,
    whole: bool,
) -> Option<TaskPlan> {
    let pp = &policy.predictive;
    if pp.mode == Mode::Off {
        return None;
    }
    let f = d
        .forecasts
        .get(&task.id)
        .filter(|f| !f.upper_per_s.is_empty() && !f.step.is_zero())?;
    let tp = policy.for_task(&task.id);
    let measured = d.load.get(&task.id).and_then(|l| {
        [l.service_s, l.calibrated_s]
            .into_iter()
            .find(|s| *s > 0.0 && s.is_finite())
    });
    let service_s = measured.unwrap_or(task.estimated_execution_time_ns as f64 / 1e9);
    let queue = planner::Queue {
        service_s,
        // Exponential: the service's spread is not measured per task yet.
        service_scv: 1.0,
        per_replica: tp.max_concurrency.max(1),
        arrival_scv: f.arrival_scv,
    };
    let wait_s = pp.max_wait_ns.map_or(service_s, |w| w as f64 / 1e9);
    let objective = planner::Objective {
        wait_s,
        attainment: pp.attainment,
    };
    let lead = task_lead(d, &task.id, Duration::from_nanos(pp.lead_ns));
    let upper: Vec<(Duration, f64)> = f
        .upper_per_s
        .iter()
        .enumerate()
        .map(|(i, u)| (f.from + f.step * i as u32, *u))
        .filter(|(at, _)| whole || planner::within_lead(*at, now, lead, f.step))
        .collect();
    let steps = planner::plan(&upper, &queue, &objective, tp.max_replicas);
    let floor = planner::floor(&steps, now, lead, f.step).and_then(|replicas| {
        let peak = steps
            .iter()
            .find(|s| s.replicas == replicas && planner::within_lead(s.at, now, lead, f.step))?;
        let reason = format!(
            "{}: the plan needs {replicas} replicas within the {lead:.1?} lead time: {:.2}/s forecast (q90, {}) from +{:.0} s, for {:.1}% to start within {:.0} ms ({:.0} ms each, burstiness {:.1})",
            task.id,
            peak.arrivals_per_s,
            f.method,
            peak.at.saturating_sub(now).as_secs_f64(),
            pp.attainment * 100.0,
            wait_s * 1e3,
            service_s * 1e3,
            f.arrival_scv,
        );
        Some(Floor { replicas, reason })
    });
    Some(TaskPlan { steps, lead, floor })
}

/// The plan's floor for `task` of `d` at `now` (see [`plan_for`]): sizing runs on every pass,
/// so only the steps within the lead time are sized.
pub fn floor_for(
    d: &Deployment,
    policy: &ScalingPolicy,
    task: &Task,
    now: Duration,
) -> Option<Floor> {
    planned(d, policy, task, now, false)?.floor
}
