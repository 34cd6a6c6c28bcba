//! Predictive provisioning's planner, pure: the replicas a forecast arrival rate needs to meet
//! a wait objective (Erlang C for M/M/c, with the Allen–Cunneen correction for a service
//! time's variability, M/G/c), the plan over the forecast's steps, and the floor it sets now —
//! the most any step within the next lead time needs, so capacity is ordered one lead time
//! ahead and a replica the plan needs before a new one could be ready is never retired.

use std::time::Duration;

/// A task's queue as the planner models it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Queue {
    /// Mean service (execution) time, seconds.
    pub service_s: f64,
    /// The service time's squared coefficient of variation (variance ÷ mean²): 1 for
    /// exponential (M/M/c), 0 for deterministic.
    pub service_scv: f64,
    /// Executions at once per replica (servers per replica).
    pub per_replica: u32,
    /// The arrivals' burstiness: their counts' variance ÷ mean over a service-length interval
    /// (1 for Poisson; [`dispersion`] measures it).
    pub arrival_scv: f64,
}

/// A wait objective: at least `attainment` of requests start within `wait_s` of arriving.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    pub wait_s: f64,
    pub attainment: f64,
}

/// Above zero (NaN is not).
fn positive(x: f64) -> bool {
    x > 0.0
}

/// Servers at most the search tries (a replica maximum is far below it).
const MAX_SERVERS: u32 = 1_000_000;

/// Erlang C: the probability that an arrival waits, with `servers` servers and `offered`
/// erlangs (arrival rate × mean service time). 1 when the queue is unstable.
pub fn erlang_c(servers: u32, offered: f64) -> f64 {
    if !positive(offered) {
        return 0.0;
    }
    let c = f64::from(servers);
    if servers == 0 || offered >= c {
        return 1.0;
    }
    // Erlang B by its recurrence (stable for thousands of servers), then C from B.
    let mut b = 1.0;
    for k in 1..=servers {
        b = offered * b / (f64::from(k) + offered * b);
    }
    let rho = offered / c;
    (b / (1.0 - rho * (1.0 - b))).clamp(0.0, 1.0)
}

/// The probability that a request waits at most `t` seconds, with `servers` servers,
/// `arrivals_per_s` arrivals and `q`'s service: M/M/c's `1 − C·exp(−(cμ − λ)t)`, the decay
/// rate scaled by `2 / (ca² + cs²)` (Allen–Cunneen: a G/G/c queue waits about
/// `(ca² + cs²) / 2` as long as M/M/c).
pub fn wait_within(servers: u32, arrivals_per_s: f64, q: &Queue, t: f64) -> f64 {
    if !positive(arrivals_per_s) {
        return 1.0;
    }
    let s = q.service_s.max(1e-9);
    let offered = arrivals_per_s * s;
    let c = erlang_c(servers, offered);
    if c >= 1.0 {
        return 0.0;
    }
    let variability = (q.arrival_scv.max(0.0) + q.service_scv.max(0.0)).max(1e-3);
    let decay = (f64::from(servers) / s - arrivals_per_s) * 2.0 / variability;
    (1.0 - c * (-decay * t.max(0.0)).exp()).clamp(0.0, 1.0)
}

/// The fewest replicas (at least one where anything arrives) whose servers meet `objective`
/// at `arrivals_per_s`, at most `max`.
pub fn replicas_for(arrivals_per_s: f64, q: &Queue, objective: &Objective, max: u32) -> u32 {
    if !positive(arrivals_per_s) {
        return 0;
    }
    let per = q.per_replica.max(1);
    let offered = arrivals_per_s * q.service_s.max(1e-9);
    let target = objective.attainment.clamp(0.0, 1.0 - 1e-9);
    let met = |replicas: u32| {
        let servers = replicas.saturating_mul(per).min(MAX_SERVERS);
        wait_within(servers, arrivals_per_s, q, objective.wait_s) >= target
    };
    // Stability first, then up one at a time: the answer is within a few √offered of it.
    let mut r = ((offered / f64::from(per)).floor() as u32)
        .saturating_add(1)
        .max(1);
    while r < max && !met(r) {
        r += 1;
    }
    r.min(max.max(1))
}

/// The index of dispersion (variance ÷ mean) of arrival counts per interval, `counts` in
/// time order: the variance from successive differences (half their mean square), so a
/// trend or a daily cycle does not read as burstiness; 1 (Poisson) until there are enough.
pub fn dispersion(counts: &[f64]) -> f64 {
    if counts.len() < 8 {
        return 1.0;
    }
    let mean = counts.iter().sum::<f64>() / counts.len() as f64;
    if !positive(mean) {
        return 1.0;
    }
    let sq: f64 = counts.windows(2).map(|w| (w[1] - w[0]).powi(2)).sum();
    let var = sq / (2.0 * (counts.len() - 1) as f64);
    (var / mean).clamp(0.0, MAX_DISPERSION)
}

/// Burstiness at most (a handful of huge bursts would otherwise ask for the maximum forever).
pub const MAX_DISPERSION: f64 = 50.0;

/// The replicas the measured load needs now, sized as the plan sizes a forecast: the queueing
/// model on the window's arrival rate, and, while requests wait, Little's law on the work in
/// the system at full utilisation (a backlog drains only with more servers than its rate).
pub fn reactive(
    arrivals_per_s: f64,
    wait_p50_s: f64,
    q: &Queue,
    objective: &Objective,
    max: u32,
) -> u32 {
    let sized = replicas_for(arrivals_per_s, q, objective, max);
    let backlog = if positive(wait_p50_s) && positive(arrivals_per_s) {
        let busy = arrivals_per_s * (wait_p50_s + q.service_s) / f64::from(q.per_replica.max(1));
        busy.ceil().min(f64::from(max)) as u32
    } else {
        0
    };
    sized.max(backlog)
}

/// One step of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// When the step begins (the forecast's target step).
    pub at: Duration,
    /// The arrival rate planned for (the upper-quantile forecast), per second.
    pub arrivals_per_s: f64,
    pub replicas: u32,
}

/// The replicas each forecast step needs: `upper` holds (step start, upper-quantile arrivals
/// per second) in time order.
pub fn plan(upper: &[(Duration, f64)], q: &Queue, objective: &Objective, max: u32) -> Vec<Step> {
    upper
        .iter()
        .map(|&(at, rate)| Step {
            at,
            arrivals_per_s: rate.max(0.0),
            replicas: replicas_for(rate, q, objective, max),
        })
        .collect()
}

/// The floor at `now`: the most replicas any step beginning before `now + lead + step` needs
/// (the step a replica ordered now is first ready in, and every step before it, which replicas
/// ordered earlier serve and must not be retired from). `None` when the plan has no step then.
pub fn floor(plan: &[Step], now: Duration, lead: Duration, step: Duration) -> Option<u32> {
    plan.iter()
        .filter(|s| within_lead(s.at, now, lead, step))
        .map(|s| s.replicas)
        .max()
}

/// Whether the step beginning `at` is one [`floor`] reads: not over at `now`, and beginning
/// before a replica ordered now could be ready and serve a step.
pub fn within_lead(at: Duration, now: Duration, lead: Duration, step: Duration) -> bool {
    at + step > now && at < now + lead + step
}

/// The floor at `now` from the forecast itself, sizing only the steps [`floor`] reads.
pub fn floor_of(
    upper: &[(Duration, f64)],
    q: &Queue,
    objective: &Objective,
    max: u32,
    now: Duration,
    lead: Duration,
    step: Duration,
) -> Option<u32> {
    let near: Vec<(Duration, f64)> = upper
        .iter()
        .copied()
        .filter(|(at, _)| within_lead(*at, now, lead, step))
        .collect();
    floor(&plan(&near, q, objective, max), now, lead, step)
}

/// The `QUANTILE` of lead times measured (reordered in place), `None` for none: a high one,
/// as late capacity costs more than early.
pub fn lead_quantile(took: &mut [Duration]) -> Option<Duration> {
    if took.is_empty() {
        return None;
    }
    let k = ((took.len() as f64 * LeadTime::QUANTILE).ceil() as usize).clamp(1, took.len()) - 1;
    let (_, x, _) = took.select_nth_unstable(k);
    Some(*x)
}

/// Lead times (order to ready) learned from what provisioning took: the `QUANTILE`
/// (a high one, as late capacity costs more than early) of the last `KEPT` observations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeadTime {
    recent: std::collections::VecDeque<Duration>,
}

impl LeadTime {
    pub const KEPT: usize = 32;
    pub const QUANTILE: f64 = 0.9;

    /// One replica's order-to-ready time (provision + deploy + warm-up).
    pub fn observe(&mut self, took: Duration) {
        if self.recent.len() == Self::KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(took);
    }

    /// The learned lead time, or `default` before any observation.
    pub fn estimate(&self, default: Duration) -> Duration {
        let mut v: Vec<Duration> = self.recent.iter().copied().collect();
        lead_quantile(&mut v).unwrap_or(default)
    }

    pub fn observed(&self) -> usize {
        self.recent.len()
    }
}

/// Lead times per (backend, host): a host's own once it has some, else its backend's over
/// every host, else the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeadTimes {
    by_host: std::collections::BTreeMap<(String, String), LeadTime>,
    by_backend: std::collections::BTreeMap<String, LeadTime>,
}

impl LeadTimes {
    pub fn observe(&mut self, backend: &str, host: &str, took: Duration) {
        self.by_host
            .entry((backend.to_string(), host.to_string()))
            .or_default()
            .observe(took);
        self.by_backend
            .entry(backend.to_string())
            .or_default()
            .observe(took);
    }

    pub fn estimate(&self, backend: &str, host: Option<&str>, default: Duration) -> Duration {
        let own = host.and_then(|h| self.by_host.get(&(backend.to_string(), h.to_string())));
        match own.or_else(|| self.by_backend.get(backend)) {
            Some(l) => l.estimate(default),
            None => default,
        }
    }
}
