//! The scalers a simulated service runs under: Knative's KPA (the decision crate's `kpa`),
//! Prescient's own sizing (the decision crate's `scaling::size`, on a real `Deployment`), and
//! an oracle that knows the future arrivals.

use crate::queue::{Observation, Scaler};
use prescient_policy::kpa::{KpaConfig, KpaState};
use prescient_policy::scaling::{self, Sizing};
use prescient_policy::snapshot::{Deployment, Replica, ReplicaState, TaskLoad};
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
            }
        }
        while (self.deployment.replicas.len() as u32) < desired {
            self.add(now);
        }
        desired
    }
}
