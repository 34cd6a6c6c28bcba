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

/// Knows every future second's arrivals: keeps what the next `lead + tick` seconds will need
/// with no request waiting (a request stays `service` seconds, so a second needs the arrivals
/// of the `service` seconds ending there), ordering one lead time ahead. A lower bound on cost
/// at full attainment.
pub struct Oracle<'a> {
    pub counts: &'a [u32],
    pub service_s: f64,
    pub lead_s: f64,
    pub tick_s: f64,
}

impl Scaler for Oracle<'_> {
    fn desired(&mut self, o: &Observation) -> u32 {
        // A second's need: the requests of the `span` seconds ending there, each holding a
        // replica `service` seconds of them (for a 2 s service: the last 2 s's arrivals).
        let span = self.service_s.ceil().max(1.0) as usize;
        let per = self.service_s / span as f64;
        let from = o.now.floor() as usize;
        let to = ((o.now + self.lead_s + self.tick_s).ceil() as usize).min(self.counts.len());
        (from..to)
            .map(|s| {
                let lo = (s + 1).saturating_sub(span);
                let n: u64 = self.counts[lo..=s.min(self.counts.len() - 1)]
                    .iter()
                    .map(|c| u64::from(*c))
                    .sum();
                (n as f64 * per).ceil() as u64
            })
            .max()
            .unwrap_or(1)
            .clamp(1, u64::from(u32::MAX)) as u32
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
            tasks: vec![prescient_schemas::Task {
                id: "svc".into(),
                code: prescient_schemas::CodeRef {
                    kind: prescient_schemas::CodeKind::Builtin {
                        name: "sleep".into(),
                    },
                    params: Vec::new(),
                },
                inputs: Vec::new(),
                outputs: Vec::new(),
                estimated_execution_time_ns: (service_s * 1e9) as u64,
                resources: Default::default(),
            }],
            edges: Vec::new(),
            objective: None,
            scaling: Some(policy.clone()),
        };
        let record = prescient_schemas::GraphRecord {
            id: "g1".into(),
            version: 1,
            submitted_at_ms: 0,
            digest: prescient_schemas::codec::graph_digest(&graph),
            graph,
        };
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
