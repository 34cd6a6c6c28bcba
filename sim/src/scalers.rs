//! The scalers a simulated service runs under: Knative's KPA (the decision crate's `kpa`),
//! Prescient's own sizing (the decision crate's `scaling::size`, on a real `Deployment`), and
//! predictive provisioning (forecast, planner and their combination with reactive sizing), and
//! an oracle that knows the future arrivals.

use crate::queue::{Observation, Scaler};
use prescient_policy::forecast;
use prescient_policy::kpa::{KpaConfig, KpaState};
use prescient_policy::scaling::{self, Sizing};
use prescient_policy::snapshot::{Deployment, Replica, ReplicaState, TaskLoad};
use prescient_policy::{planner, predictive};
use prescient_schemas::{ScalingPolicy, TaskGraph};
use std::collections::VecDeque;
use std::time::Duration;

/// Knative's autoscaler, ticking on the simulated concurrency.
#[derive(Debug, Default)]
pub struct Kpa {
    pub config: KpaConfig,
    pub state: KpaState,
}

impl Scaler for Kpa {
    fn desired(&mut self, o: &Observation) -> u32 {
        let now = Duration::from_secs_f64(o.now.max(0.0));
        self.state
            .tick(&self.config, now, o.concurrency, o.ready, o.current)
    }
}

/// Knows every future second's need (the replicas its requests would hold if none waited) and
/// keeps the most the next `lead + tick` seconds need, ordering one lead time ahead. A lower
/// bound on cost at full attainment.
pub struct Oracle {
    pub need: Vec<u32>,
    pub lead_s: f64,
    pub tick_s: f64,
}

impl Oracle {
    /// Per-second counts of requests that each take `service_s`: a second needs the requests
    /// of the `service_s` seconds ending there (for a 2 s service, the last 2 s's arrivals).
    pub fn from_counts(counts: &[u32], service_s: f64, lead_s: f64, tick_s: f64) -> Oracle {
        let span = service_s.ceil().max(1.0) as usize;
        let per = service_s / span as f64;
        let mut window: u64 = 0;
        let need = (0..counts.len())
            .map(|s| {
                window += u64::from(counts[s]);
                if s >= span {
                    window -= u64::from(counts[s - span]);
                }
                (window as f64 * per).ceil() as u32
            })
            .collect();
        Oracle {
            need,
            lead_s,
            tick_s,
        }
    }

    /// Explicit requests (arrival, service): every second a request would be in service in.
    pub fn from_requests(
        requests: &[(f64, f64)],
        len_s: usize,
        lead_s: f64,
        tick_s: f64,
    ) -> Oracle {
        let mut diff = vec![0i64; len_s + 2];
        for (a, service) in requests {
            let from = (a.floor() as usize).min(len_s);
            let to = ((a + service).floor() as usize + 1).min(len_s + 1);
            diff[from] += 1;
            diff[to] -= 1;
        }
        let mut run = 0i64;
        let need = diff[..len_s]
            .iter()
            .map(|d| {
                run += d;
                run.max(0) as u32
            })
            .collect();
        Oracle {
            need,
            lead_s,
            tick_s,
        }
    }
}

impl Scaler for Oracle {
    fn desired(&mut self, o: &Observation) -> u32 {
        let from = (o.now.floor() as usize).min(self.need.len());
        let to = ((o.now + self.lead_s + self.tick_s).ceil() as usize).min(self.need.len());
        self.need[from..to]
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
            .max(1)
    }
}

/// Prescient's replication controller sizing one service: `scaling::size` on a one-task
/// `Deployment` whose load is what the simulated ticks measured over the policy's window.
pub struct Prescient {
    policy: ScalingPolicy,
    deployment: Deployment,
    /// (arrivals per second, wait p50) of recent ticks, newest last, one window long.
    recent: VecDeque<(f64, f64)>,
    window_ticks: usize,
    service_s: f64,
    next_id: u64,
}

impl Prescient {
    /// `policy` with one task `svc` of service time `service_s`, ticking every `tick_s`.
    pub fn new(policy: ScalingPolicy, service_s: f64, tick_s: f64) -> Prescient {
        let graph = TaskGraph {
            name: "svc".into(),
            tasks: vec![crate::fleet::one_task(service_s)],
            edges: Vec::new(),
            objective: None,
            scaling: Some(policy.clone()),
        };
        let record = crate::fleet::record("g1", graph);
        let window_ticks = ((policy.window_ns as f64 / 1e9) / tick_s).ceil().max(1.0) as usize;
        Prescient {
            policy,
            deployment: Deployment::new(record),
            recent: VecDeque::new(),
            window_ticks,
            service_s,
            next_id: 1,
        }
    }

    fn add(&mut self, now: Duration) {
        let id = format!("g1.svc.r{}", self.next_id);
        self.next_id += 1;
        self.deployment.replicas.push(Replica {
            id,
            task: "svc".into(),
            host: "h".into(),
            addr: String::new(),
            state: ReplicaState::Ready { since: now },
            resources: Default::default(),
            placed_at: now,
        });
    }
}

impl Scaler for Prescient {
    fn desired(&mut self, o: &Observation) -> u32 {
        let now = Duration::from_secs_f64(o.now.max(0.0));
        // The deployment holds what the service has (the engine chose which ones went).
        while (self.deployment.replicas.len() as u32) < o.current {
            self.add(now);
        }
        while (self.deployment.replicas.len() as u32) > o.current {
            self.deployment.replicas.pop();
        }
        self.recent.push_back((o.arrivals_per_s, o.wait_p50));
        while self.recent.len() > self.window_ticks {
            self.recent.pop_front();
        }
        let n = self.recent.len().max(1) as f64;
        let arrivals = self.recent.iter().map(|(a, _)| a).sum::<f64>() / n;
        let mut waits: Vec<f64> = self.recent.iter().map(|(_, w)| *w).collect();
        waits.sort_by(f64::total_cmp);
        let wait = waits.get(waits.len() / 2).copied().unwrap_or(0.0);
        self.deployment.load.insert(
            "svc".into(),
            TaskLoad {
                arrivals_per_s: arrivals,
                service_s: self.service_s,
                queue_s: wait,
                calibrated_s: self.service_s,
            },
        );
        let mut desired = o.current;
        for z in scaling::size(&self.deployment, &self.policy, now) {
            match z {
                Sizing::Out { to, .. } => {
                    desired = to;
                    let out = self.deployment.scaled.entry("svc".into()).or_default();
                    out.out_at = Some(now);
                }
                Sizing::In { replica, .. } => {
                    desired = o.current.saturating_sub(1).max(1);
                    self.deployment.replicas.retain(|r| r.id != replica);
                    let scaled = self.deployment.scaled.entry("svc".into()).or_default();
                    scaled.in_at = Some(now);
                }
                // The reference scenarios' Prescient policy has no predictive table.
                Sizing::Would { .. } => {}
            }
        }
        while (self.deployment.replicas.len() as u32) < desired {
            self.add(now);
        }
        desired
    }
}

/// Predictive provisioning (the decision crate's `forecast`, `planner` and `predictive`): each
/// forecast step's arrivals feed a forecast series; the upper-quantile forecast of the coming
/// steps is sized by the queueing model for the objective; the floor is the most any step
/// needs before a replica ordered now could be ready (the lead time learned from the replicas
/// that became ready); reactive sizing (the same queueing model on the measured rate,
/// Little's law on a backlog) handles surprises above it.
pub struct Predictive {
    series: forecast::Series,
    model: Option<Box<dyn forecast::Model>>,
    batch: forecast::Batch,
    queue: planner::Queue,
    objective: planner::Objective,
    lead: planner::LeadTime,
    default_lead: Duration,
    tick_s: f64,
    /// Ticks per forecast step, the arrivals of a step so far and the ticks they cover.
    step_ticks: usize,
    step_count: f64,
    step_seen: usize,
    /// The floor the latest step's plan set.
    planned: Option<u32>,
    pub mode: predictive::Mode,
    pub bounds: predictive::Bounds,
    history: predictive::History,
    /// Arrivals per second of recent ticks, one window long.
    recent: VecDeque<f64>,
    /// Arrivals of recent ticks, for their burstiness.
    bursts: VecDeque<f64>,
    window_ticks: usize,
}

/// Seconds per forecast step: per-tick counts of a few requests are mostly Poisson noise,
/// which the queueing model already sizes for; a longer step forecasts the rate itself.
pub const FORECAST_STEP_S: f64 = 10.0;

/// Ticks whose arrivals the burstiness is measured over (10 minutes at 2 s).
pub const DISPERSION_TICKS: usize = 300;

/// Steps ahead the plan looks at most (a lead time longer than the plan is planned to its end).
pub const MAX_PLAN_TICKS: usize = 64;

impl Predictive {
    /// A service of mean `service_s` (squared coefficient of variation `service_scv`), ticking every `tick_s`, whose objective is
    /// `objective`, with `policy`'s bounds and the lead time assumed until one is observed.
    pub fn new(
        policy: &ScalingPolicy,
        service_s: f64,
        tick_s: f64,
        objective: planner::Objective,
        default_lead: Duration,
        service_scv: f64,
        model: Option<Box<dyn forecast::Model>>,
    ) -> Predictive {
        let step_ticks = ((FORECAST_STEP_S / tick_s).round() as usize).max(1);
        let step_s = tick_s * step_ticks as f64;
        let season = if (86_400.0 / step_s).fract() == 0.0 {
            (86_400.0 / step_s) as usize
        } else {
            0
        };
        // Room for a learned lead up to twice the assumed one.
        let ticks = (2.0 * default_lead.as_secs_f64() / step_s).ceil() as usize + 1;
        let horizons: Vec<usize> = (1..=ticks.clamp(1, MAX_PLAN_TICKS)).collect();
        let p = policy.for_task("svc");
        Predictive {
            series: forecast::Series::new(season, &horizons),
            model,
            batch: forecast::Batch::default(),
            queue: planner::Queue {
                service_s,
                service_scv,
                per_replica: p.max_concurrency.max(1),
                arrival_scv: 1.0,
            },
            objective,
            lead: planner::LeadTime::default(),
            default_lead,
            tick_s,
            step_ticks,
            step_count: 0.0,
            step_seen: 0,
            planned: None,
            mode: predictive::Mode::On,
            bounds: predictive::Bounds {
                min: p.min_replicas,
                max: p.max_replicas,
                budget: policy.max_vms,
                step_out: 0,
                step_in: 0,
                out_cooldown: Duration::from_nanos(policy.scale_out_cooldown_ns),
                in_cooldown: Duration::from_nanos(policy.scale_in_cooldown_ns),
            },
            history: predictive::History::default(),
            recent: VecDeque::new(),
            bursts: VecDeque::new(),
            window_ticks: ((policy.window_ns as f64 / 1e9) / tick_s).ceil().max(1.0) as usize,
        }
    }

    /// Seeds the series with per-tick arrival counts seen before the simulation starts (the
    /// history a control node keeps across restarts).
    pub fn seed(&mut self, counts: impl IntoIterator<Item = f64>) {
        for c in counts {
            self.observe_tick(c);
        }
    }

    /// Adds a tick's arrivals; `true` when they complete a forecast step.
    fn observe_tick(&mut self, count: f64) -> bool {
        self.step_count += count;
        self.step_seen += 1;
        if self.step_seen < self.step_ticks {
            return false;
        }
        self.series.observe(self.step_count);
        self.step_count = 0.0;
        self.step_seen = 0;
        true
    }

    /// The floor the plan sets at `now` (seconds), from this tick's forecast.
    fn floor(&mut self, now: f64) -> Option<u32> {
        let lead = self.lead.estimate(self.default_lead);
        let step_s = self.tick_s * self.step_ticks as f64;
        let tick = Duration::from_secs_f64(step_s);
        let model = self.model.as_deref_mut();
        let forecasts =
            forecast::forecast_batch(std::iter::once(&mut self.series), model, &mut self.batch);
        let at = Duration::from_secs_f64(now);
        let upper: Vec<(Duration, f64)> = forecasts
            .first()?
            .iter()
            .map(|f| (at + tick * (f.horizon as u32 - 1), f.upper / step_s))
            .collect();
        planner::floor_of(
            &upper,
            &self.queue,
            &self.objective,
            self.bounds.max,
            at,
            lead,
            tick,
        )
    }
}

impl Scaler for Predictive {
    fn desired(&mut self, o: &Observation) -> u32 {
        let now = Duration::from_secs_f64(o.now.max(0.0));
        if let Some(l) = o.readied_lead_s {
            self.lead.observe(Duration::from_secs_f64(l.max(0.0)));
        }
        let stepped = self.observe_tick(o.arrivals_per_s * self.tick_s);
        self.bursts.push_back(o.arrivals_per_s * self.tick_s);
        while self.bursts.len() > DISPERSION_TICKS {
            self.bursts.pop_front();
        }
        if stepped {
            self.queue.arrival_scv = planner::dispersion(self.bursts.make_contiguous());
        }
        self.recent.push_back(o.arrivals_per_s);
        while self.recent.len() > self.window_ticks {
            self.recent.pop_front();
        }
        let arrivals = self.recent.iter().sum::<f64>() / self.recent.len().max(1) as f64;
        let reactive = planner::reactive(
            arrivals,
            o.wait_p50,
            &self.queue,
            &self.objective,
            self.bounds.max,
        );
        if self.mode == predictive::Mode::Off {
            self.planned = None;
        } else if stepped || self.planned.is_none() {
            self.planned = self.floor(o.now);
        }
        let floor = self.planned;
        let d = predictive::decide(
            o.current,
            reactive,
            floor,
            self.mode,
            &self.bounds,
            &self.history,
            now,
        );
        self.history.record(o.current, &d, now);
        d.desired
    }
}
