//! Sizing by utilisation: how many replicas each task of a graph with a `[scaling]` policy
//! needs, from its arrival rate × service time ÷ `max_concurrency` against a target
//! utilisation, within the task's minimum and maximum, the graph's VM budget and the cooldowns.
//!
//! Scale-out goes straight to what is needed, or `max_scale_out_step` more at most (then waits
//! its cooldown); scale-in removes one
//! replica at a time, only when even one fewer would stay under `SCALE_IN_MARGIN` of the target
//! (hysteresis), never within the scale-in cooldown of the task's last change, and never a
//! replica placed less than that cooldown ago.
//!
//! Besides utilisation, a chain over the graph's objective (its percentile at the sink above
//! the target over the detection window) asks for one more replica of the task that makes the
//! largest share of it (queueing + execution), each out-cooldown until the chain is back under;
//! meanwhile no task on it scales in.
//!
//! With `[scaling.predictive] mode = "on"` the plan's floor (`predictive::floor_for`) is the
//! least a task holds: it scales out to it ahead of the forecast, and never in below it;
//! `forecast-only` reports what the plan would set instead.

use crate::predictive;
use crate::snapshot::{ChainLoad, Deployment, Replica, TaskLoad};
use prescient_schemas::{ScalingPolicy, TaskPolicy};
use std::fmt::Write as _;
use std::time::Duration;

/// Scale in only when one fewer replica would run at most this share of the target.
pub const SCALE_IN_MARGIN: f64 = 0.8;

/// What sizing decided for one task.
#[derive(Debug, Clone, PartialEq)]
pub enum Sizing {
    /// Grow from `from` to `to` replicas.
    Out {
        task: String,
        from: u32,
        to: u32,
        reason: String,
    },
    /// Retire `replica` (`from` to `from - 1`).
    In {
        task: String,
        replica: String,
        from: u32,
        reason: String,
    },
    /// `forecast-only`: the plan would set `would` replicas (reported once per change).
    Would {
        task: String,
        have: u32,
        would: u32,
        reason: String,
    },
}

/// Replicas a load needs at `p`'s target utilisation (fractional): the requests in the task
/// (Little's law: rate × (wait + service)) over what one replica holds at the target. Without a
/// backlog the wait is nil and this is rate × service; a saturated task's executions are capped
/// at its capacity, and its growing wait is what asks for more.
pub fn replicas_needed(load: &TaskLoad, p: &TaskPolicy) -> f64 {
    let capacity = f64::from(p.max_concurrency.max(1)) * p.target_utilisation.clamp(0.01, 1.0);
    let in_task = load.arrivals_per_s.max(0.0) * (load.service_s.max(0.0) + load.queue_s.max(0.0));
    in_task / capacity
}

fn explain(task: &str, load: &TaskLoad, p: &TaskPolicy, needed: f64) -> String {
    let queued = if load.queue_s > 0.0005 {
        format!(" + {:.1} ms queued", load.queue_s * 1e3)
    } else {
        String::new()
    };
    let mut s = format!(
        "{task}: {:.1} req/s × ({:.2} ms{queued}) ÷ ({} at once × {:.0}% target) = {needed:.2} replicas",
        load.arrivals_per_s,
        load.service_s * 1e3,
        p.max_concurrency,
        p.target_utilisation * 100.0
    );
    let _ = write!(s, " (min {}, max {})", p.min_replicas, p.max_replicas);
    s
}

/// A chain's end-to-end measurements need this many invocations before they count.
pub const MIN_CHAIN_COUNT: u64 = 10;

/// The chains over their objective, and for each the task with the largest share of it with
/// the reason. A task's share is its worst replica's queueing + execution p99 over the
/// detection window (the chain's latency is a tail percentile over that window), or its
/// load's (queueing p50 + mean execution) where no replica has a reading. A chain whose worst task is being replaced waits for that.
pub fn chains_over<'a>(
    d: &'a Deployment,
    policy: &ScalingPolicy,
) -> Vec<(&'a ChainLoad, String, String)> {
    let window = Duration::from_nanos(policy.detect_window_ns);
    let mut out = Vec::new();
    let cost = |t: &String| -> (f64, f64) {
        let worst = d
            .replicas
            .iter()
            .filter(|r| r.task == *t)
            .filter_map(|r| d.health.get(&r.id))
            .map(|h| (h.queue_p99_s, h.exec_p99_s))
            .max_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)));
        worst.unwrap_or_else(|| {
            d.load
                .get(t)
                .map_or((0.0, 0.0), |l| (l.queue_s, l.service_s))
        })
    };
    for c in &d.chains {
        if c.count < MIN_CHAIN_COUNT || c.measured_s <= c.objective_s {
            continue;
        }
        let total: f64 = c.tasks.iter().map(|t| cost(t).0 + cost(t).1).sum();
        let Some(worst) = c.tasks.iter().max_by(|a, b| {
            let (ca, cb) = (cost(a), cost(b));
            (ca.0 + ca.1)
                .total_cmp(&(cb.0 + cb.1))
                .then_with(|| b.cmp(a))
        }) else {
            continue;
        };
        let replacing = d
            .replicas
            .iter()
            .any(|r| r.task == *worst && d.replacing.contains_key(&r.id));
        // Tasks that add up to less than the objective do not make the excess now: it is the
        // window's memory of a backlog already gone (a shed replica's queue) or the network.
        if replacing || total <= c.objective_s {
            continue;
        }
        let (queue, exec) = cost(worst);
        let share = if total > 0.0 {
            (queue + exec) / total
        } else {
            0.0
        };
        let reason = format!(
            "chain {} p{} {:.1} ms > objective {:.1} ms over {window:?}; {worst} is {:.0}% of it (queueing {:.1} ms + execution {:.1} ms at p99)",
            c.tasks.join("->"),
            c.percentile,
            c.measured_s * 1e3,
            c.objective_s * 1e3,
            share * 100.0,
            queue * 1e3,
            exec * 1e3
        );
        out.push((c, worst.clone(), reason));
    }
    out
}

/// Sizes every task of `d` under `policy` at `now`. Tasks without a load reading keep what
/// they have (raised to the minimum).
pub fn size(d: &Deployment, policy: &ScalingPolicy, now: Duration) -> Vec<Sizing> {
    let out_cooldown = Duration::from_nanos(policy.scale_out_cooldown_ns);
    let in_cooldown = Duration::from_nanos(policy.scale_in_cooldown_ns);
    let mut total: u32 = d.replicas.len() as u32;
    let budget = policy.max_vms.unwrap_or(u32::MAX);
    let over = chains_over(d, policy);
    let mut out = Vec::new();
    for t in &d.record.graph.tasks {
        let p = policy.for_task(&t.id);
        let mine: Vec<&Replica> = d.replicas.iter().filter(|r| r.task == t.id).collect();
        let have = d.sized_count(&t.id) as u32;
        let scaled = d.scaled.get(&t.id).copied().unwrap_or_default();
        let load = d.load.get(&t.id);
        let by_util = load.map(|l| replicas_needed(l, &p));
        // Other signals: the one asking for the most replicas, if more than utilisation.
        let by_signal = policy
            .signals
            .iter()
            .filter(|sig| sig.task == t.id)
            .filter_map(|sig| {
                let r = d.signals.get(&(sig.task.clone(), sig.metric.clone()))?;
                (r.reporting > 0).then(|| (r.total / sig.target, sig, *r))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let signal_n = by_signal.map(|(n, ..)| n);
        let signal_rules = signal_n.is_some_and(|n| by_util.is_none_or(|u| n > u));
        let needed = if signal_rules { signal_n } else { by_util };
        let explain_signal = |n: f64| {
            by_signal.map(|(_, sig, r)| {
                format!(
                    "{}: {} {:.1} over {} replicas ÷ target {} per replica = {n:.2} replicas (min {}, max {})",
                    t.id, sig.metric, r.total, r.reporting, sig.target, p.min_replicas, p.max_replicas
                )
            })
        };
        let by_load = needed.map_or(have, |n| n.ceil() as u32);
        let chain = over.iter().find(|(_, worst, _)| *worst == t.id);
        let reactive = if chain.is_some() {
            by_load.max(have + 1)
        } else {
            by_load
        };
        let bounded = |n: u32| n.clamp(p.min_replicas, p.max_replicas.max(p.min_replicas));
        // The plan's floor: it sets the least (mode on), or is only reported (forecast-only).
        let planned = predictive::floor_for(d, policy, t, now);
        let acting = planned
            .as_ref()
            .filter(|_| policy.predictive.mode == predictive::Mode::On);
        let floor = acting.map_or(0, |f| f.replicas);
        let want = bounded(reactive.max(floor));
        if let Some(f) = planned
            .as_ref()
            .filter(|_| policy.predictive.mode == predictive::Mode::ForecastOnly)
        {
            let would = bounded(reactive.max(f.replicas)).max(want);
            let told = scaled.would.unwrap_or(want.max(have));
            if would != told {
                out.push(Sizing::Would {
                    task: t.id.clone(),
                    have,
                    would,
                    reason: format!("{}; reactive sizing sets {want}", f.reason),
                });
            }
        }
        if want > have {
            let cooling = scaled.out_at.is_some_and(|at| now < at + out_cooldown);
            // The minimum is restored at once; growth beyond it waits out the cooldown.
            let to = if cooling {
                p.min_replicas.max(have)
            } else {
                want
            };
            let room = budget.saturating_sub(total);
            let to = to.min(have + room);
            // A step limit applies to growth beyond the minimum, which is restored at once.
            let step = policy.max_scale_out_step.unwrap_or(u32::MAX);
            let stepped = to.min(p.min_replicas.max(have.saturating_add(step)));
            let limited = stepped < to;
            let to = stepped;
            if to > have {
                let mut reason = match (load, needed, chain) {
                    _ if floor > reactive => {
                        let f = acting.map(|f| f.reason.as_str()).unwrap_or_default();
                        format!("{f}; reactive sizing asks {reactive}")
                    }
                    (_, _, Some((_, _, why))) if by_load <= have => why.clone(),
                    (_, Some(n), _) if signal_rules => explain_signal(n).unwrap_or_default(),
                    (Some(l), Some(n), _) => explain(&t.id, l, &p, n),
                    _ => format!("{}: below its minimum of {}", t.id, p.min_replicas),
                };
                if limited {
                    let _ = write!(
                        reason,
                        "; {to} of the {want} wanted: at most {step} more per scale-out"
                    );
                } else if to < want {
                    let _ = write!(
                        reason,
                        "; {to} of the {want} wanted: the graph's budget is {budget} replicas"
                    );
                }
                total += to - have;
                out.push(Sizing::Out {
                    task: t.id.clone(),
                    from: have,
                    to,
                    reason,
                });
            }
            continue;
        }
        // Over the maximum (the policy was lowered): shed regardless of load.
        let over_max = have > p.max_replicas.max(p.min_replicas);
        // A replica the plan needs within the next lead time is not retired.
        if !over_max && have <= floor {
            continue;
        }
        if !over_max && over.iter().any(|(c, ..)| c.tasks.contains(&t.id)) {
            continue;
        }
        let reason = match (load, needed) {
            _ if over_max => format!(
                "{}: {have} replicas, over its maximum of {}",
                t.id, p.max_replicas
            ),
            (_, Some(n))
                if signal_rules
                    && have > p.min_replicas
                    && n <= f64::from(have - 1) * SCALE_IN_MARGIN =>
            {
                format!(
                    "{}; {} would do, with {:.0}% to spare",
                    explain_signal(n).unwrap_or_default(),
                    have - 1,
                    (1.0 - n / f64::from(have - 1)) * 100.0
                )
            }
            (Some(l), Some(n))
                if have > p.min_replicas && n <= f64::from(have - 1) * SCALE_IN_MARGIN =>
            {
                format!(
                    "{}; {} would be {:.0}% busy, under {:.0}% of the {:.0}% target",
                    explain(&t.id, l, &p, n),
                    have - 1,
                    n / f64::from(have - 1) * p.target_utilisation * 100.0,
                    SCALE_IN_MARGIN * 100.0,
                    p.target_utilisation * 100.0
                )
            }
            _ => continue,
        };
        let last_change = scaled.out_at.max(scaled.in_at);
        if !over_max && last_change.is_some_and(|at| now < at + in_cooldown) {
            continue;
        }
        // Spare replicas placed within the cooldown; of the rest, one being replaced goes
        // first, then the newest.
        let Some(victim) = mine
            .iter()
            .filter(|r| now >= r.placed_at + in_cooldown)
            .max_by_key(|r| (d.replacing.contains_key(&r.id), r.placed_at, r.id.clone()))
        else {
            continue;
        };
        out.push(Sizing::In {
            task: t.id.clone(),
            replica: victim.id.clone(),
            from: have,
            reason,
        });
    }
    out
}
