//! One service's queue in virtual time: arrivals (uniform within each second of a per-second
//! trace), one FIFO queue, replicas serving one request at a time for a fixed service time,
//! replicas ordered at a tick and ready a lead time later, and a scaler consulted every tick.
//! Billing runs from order to retirement; scale-down cancels still-provisioning replicas first
//! (newest first), then retires idle ones, never a busy one.

use prescient_policy::balance::Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// What a scaler sees at a tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Seconds since the trace began.
    pub now: f64,
    /// Requests in service + queued, averaged over the tick.
    pub concurrency: f64,
    /// Requests that arrived during the tick, per second.
    pub arrivals_per_s: f64,
    /// Median wait of the requests that started service during the tick (s).
    pub wait_p50: f64,
    pub ready: u32,
    /// Ready and provisioning.
    pub current: u32,
    /// The longest order-to-ready time of a replica that became ready during the tick.
    pub readied_lead_s: Option<f64>,
}

/// Decides how many replicas there should be.
pub trait Scaler {
    fn desired(&mut self, o: &Observation) -> u32;
}

/// The run's fixed parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub service_s: f64,
    pub tick_s: f64,
    pub lead_s: f64,
    /// Simulate from this second of the trace...
    pub start_s: usize,
    /// ...and measure requests arriving from this second on (billing too).
    pub measure_from_s: usize,
    pub seed: u64,
    /// Replicas at the start (ready).
    pub initial: u32,
}

/// What a run measured, over the measured part.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Requests that arrived in the measured part (those still waiting at the end included).
    pub requests: u64,
    pub within_objective: u64,
    pub cold: u64,
    /// Latency (wait + service) histogram in microseconds.
    pub latency_us: hdrhistogram::Histogram<u64>,
    pub vm_seconds: f64,
    /// Ticks whose decision changed the replica count.
    pub actions: u64,
    pub max_replicas: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Provisioning { ready_at: f64, ordered_at: f64 },
    Idle { ordered_at: f64 },
    Busy { ordered_at: f64 },
    Gone,
}

/// Virtual times as ordered integers (nanoseconds), so the heap is exact and deterministic.
fn key(t: f64) -> u64 {
    (t * 1e9).round() as u64
}

struct Engine<'a> {
    p: Params,
    slots: Vec<Slot>,
    idle: Vec<usize>,
    /// (time, replica): completions and readiness, earliest first.
    events: BinaryHeap<Reverse<(u64, usize)>>,
    /// Waiting requests: arrival, service time.
    queue: VecDeque<(f64, f64)>,
    in_service: u64,
    provisioning: u32,
    // Tick accounting.
    area: f64,
    last_t: f64,
    tick_arrivals: u64,
    tick_waits: Vec<f64>,
    /// Order-to-ready times of the replicas that became ready during the tick.
    tick_leads: Vec<f64>,
    out: &'a mut Outcome,
}

impl Engine<'_> {
    fn measured(&self, arrival: f64) -> bool {
        arrival >= self.p.measure_from_s as f64
    }

    fn advance(&mut self, t: f64) {
        if t > self.last_t {
            let n = self.in_service as f64 + self.queue.len() as f64;
            self.area += n * (t - self.last_t);
            self.last_t = t;
        }
    }

    fn bill(&mut self, ordered_at: f64, until: f64) {
        let from = ordered_at.max(self.p.measure_from_s as f64);
        if until > from {
            self.out.vm_seconds += until - from;
        }
    }

    fn start(&mut self, replica: usize, now: f64, arrival: f64, cold: bool, service: f64) {
        let wait = now - arrival;
        self.tick_waits.push(wait);
        if self.measured(arrival) {
            self.out.requests += 1;
            if wait <= self.p.service_s + 1e-9 {
                self.out.within_objective += 1;
            }
            if cold {
                self.out.cold += 1;
            }
            let us = ((wait + service) * 1e6).round() as u64;
            let _ = self.out.latency_us.record(us.max(1));
        }
        let ordered_at = match self.slots[replica] {
            Slot::Idle { ordered_at } | Slot::Busy { ordered_at } => ordered_at,
            Slot::Provisioning { ordered_at, .. } => ordered_at,
            Slot::Gone => now,
        };
        self.slots[replica] = Slot::Busy { ordered_at };
        self.in_service += 1;
        self.events.push(Reverse((key(now + service), replica)));
    }

    fn arrive(&mut self, t: f64, service: f64) {
        self.advance(t);
        self.tick_arrivals += 1;
        if let Some(r) = self.idle.pop() {
            self.start(r, t, t, false, service);
        } else {
            self.queue.push_back((t, service));
        }
    }

    fn free(&mut self, replica: usize, t: f64) {
        self.advance(t);
        // A request a replica takes as it becomes ready waited for capacity still
        // provisioning: a cold request (one a busy replica frees up for merely queued).
        let cold = match self.slots[replica] {
            Slot::Busy { ordered_at } => {
                self.in_service -= 1;
                self.slots[replica] = Slot::Idle { ordered_at };
                false
            }
            Slot::Provisioning {
                ready_at,
                ordered_at,
            } if key(ready_at) == key(t) => {
                self.provisioning -= 1;
                self.tick_leads.push(t - ordered_at);
                self.slots[replica] = Slot::Idle { ordered_at };
                // An order ready at once (no lead) was never on its way.
                t > ordered_at
            }
            // A cancelled order, or a stale event.
            _ => return,
        };
        match self.queue.pop_front() {
            Some((arrival, service)) => self.start(replica, t, arrival, cold, service),
            None => self.idle.push(replica),
        }
    }

    fn ready(&self) -> u32 {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Idle { .. } | Slot::Busy { .. }))
            .count() as u32
    }

    fn tick(&mut self, t: f64, scaler: &mut dyn Scaler) {
        self.advance(t);
        let ready = self.ready();
        let current = ready + self.provisioning;
        let wait_p50 = if self.tick_waits.is_empty() {
            0.0
        } else {
            let k = self.tick_waits.len() / 2;
            let (_, m, _) = self.tick_waits.select_nth_unstable_by(k, f64::total_cmp);
            *m
        };
        let o = Observation {
            now: t,
            concurrency: self.area / self.p.tick_s,
            arrivals_per_s: self.tick_arrivals as f64 / self.p.tick_s,
            wait_p50,
            ready,
            current,
            readied_lead_s: self.tick_leads.iter().copied().reduce(f64::max),
        };
        self.tick_leads.clear();
        self.area = 0.0;
        self.tick_arrivals = 0;
        self.tick_waits.clear();
        let desired = scaler.desired(&o).max(1);
        if desired != current {
            self.out.actions += 1;
        }
        if desired > current {
            for _ in current..desired {
                let id = self.slots.len();
                let ready_at = t + self.p.lead_s;
                self.slots.push(Slot::Provisioning {
                    ready_at,
                    ordered_at: t,
                });
                self.provisioning += 1;
                self.events.push(Reverse((key(ready_at), id)));
            }
        } else if desired < current {
            let mut excess = current - desired;
            // Cancel orders still on their way, newest first.
            for i in (0..self.slots.len()).rev() {
                if excess == 0 {
                    break;
                }
                if let Slot::Provisioning { ordered_at, .. } = self.slots[i] {
                    self.slots[i] = Slot::Gone;
                    self.provisioning -= 1;
                    self.bill(ordered_at, t);
                    excess -= 1;
                }
            }
            // Then idle replicas; never a busy one.
            while excess > 0 {
                let Some(r) = self.idle.pop() else {
                    break;
                };
                if let Slot::Idle { ordered_at } = self.slots[r] {
                    self.bill(ordered_at, t);
                }
                self.slots[r] = Slot::Gone;
                excess -= 1;
            }
        }
        let now_ready = self.ready() + self.provisioning;
        self.out.max_replicas = self.out.max_replicas.max(now_ready);
        // Compact the slots now and then: gone ones are never looked at again.
        if self.slots.len() > 4 * (now_ready as usize + 64) {
            self.compact();
        }
    }

    /// Handles every completion, readiness and tick due up to `t`, in time order (a tick after
    /// the events at its own time).
    fn until(&mut self, t: f64, next_tick: &mut f64, scaler: &mut dyn Scaler) {
        loop {
            let ev_t = self.events.peek().map(|Reverse((k, _))| *k as f64 / 1e9);
            let due_tick = *next_tick <= t;
            match ev_t {
                Some(at) if at <= t && (!due_tick || at <= *next_tick) => {
                    let Some(Reverse((_, r))) = self.events.pop() else {
                        break;
                    };
                    self.free(r, at);
                }
                _ if due_tick => {
                    self.tick(*next_tick, scaler);
                    *next_tick += self.p.tick_s;
                }
                _ => break,
            }
        }
    }

    /// Drops gone slots, renumbering the live ones (and their pending events).
    fn compact(&mut self) {
        let mut map = vec![usize::MAX; self.slots.len()];
        let mut kept = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if !matches!(s, Slot::Gone) {
                map[i] = kept.len();
                kept.push(*s);
            }
        }
        self.slots = kept;
        self.idle = self
            .idle
            .iter()
            .map(|i| map[*i])
            .filter(|i| *i != usize::MAX)
            .collect();
        let events: Vec<_> = std::mem::take(&mut self.events)
            .into_iter()
            .filter_map(|Reverse((t, r))| (map[r] != usize::MAX).then_some(Reverse((t, map[r]))))
            .collect();
        self.events = events.into_iter().collect();
    }
}

impl Outcome {
    /// Nothing measured yet.
    pub fn empty() -> Outcome {
        Outcome {
            requests: 0,
            within_objective: 0,
            cold: 0,
            latency_us: hdrhistogram::Histogram::new(3).expect("3 significant figures is valid"),
            vm_seconds: 0.0,
            actions: 0,
            max_replicas: 0,
        }
    }
}

/// Runs `counts` (requests per second, at uniform instants within each second, each taking
/// `p.service_s`) from `p.start_s` to the end under `scaler`.
pub fn run(counts: &[u32], p: Params, scaler: &mut dyn Scaler) -> Outcome {
    let rng = Rng::new(p.seed);
    let mut arrivals: Vec<f64> = Vec::new();
    drive(counts.len(), p, scaler, |s, out| {
        arrivals.clear();
        arrivals.extend((0..counts[s]).map(|_| s as f64 + rng.unit()));
        arrivals.sort_by(f64::total_cmp);
        out.extend(arrivals.iter().map(|a| (*a, p.service_s)));
    })
}

/// Runs explicit requests (arrival second, service seconds; sorted by arrival) over a trace of
/// `len_s` seconds; `p.service_s` is the objective's wait (their mean service).
pub fn run_requests(
    requests: &[(f64, f64)],
    len_s: usize,
    p: Params,
    scaler: &mut dyn Scaler,
) -> Outcome {
    let mut next = requests.partition_point(|(a, _)| *a < p.start_s as f64);
    drive(len_s, p, scaler, |s, out| {
        while next < requests.len() && requests[next].0 < (s + 1) as f64 {
            out.push(requests[next]);
            next += 1;
        }
    })
}

/// The event loop: each second's arrivals (from `second`, in time order) and everything due.
fn drive(
    len_s: usize,
    p: Params,
    scaler: &mut dyn Scaler,
    mut second: impl FnMut(usize, &mut Vec<(f64, f64)>),
) -> Outcome {
    let mut out = Outcome {
        max_replicas: p.initial,
        ..Outcome::empty()
    };
    let start = p.start_s as f64;
    let mut e = Engine {
        p,
        slots: (0..p.initial.max(1))
            .map(|_| Slot::Idle { ordered_at: start })
            .collect(),
        idle: (0..p.initial.max(1) as usize).collect(),
        events: BinaryHeap::new(),
        queue: VecDeque::new(),
        in_service: 0,
        provisioning: 0,
        area: 0.0,
        last_t: start,
        tick_arrivals: 0,
        tick_waits: Vec::new(),
        tick_leads: Vec::new(),
        out: &mut out,
    };
    let end = len_s as f64;
    let mut next_tick = start + p.tick_s;
    let mut arrivals: Vec<(f64, f64)> = Vec::new();
    for s in p.start_s..len_s {
        arrivals.clear();
        second(s, &mut arrivals);
        for &(a, service) in &arrivals {
            // Everything due before this arrival happens first.
            e.until(a, &mut next_tick, scaler);
            e.arrive(a, service);
        }
        // The rest of this second's events and ticks.
        e.until(s as f64 + 1.0, &mut next_tick, scaler);
    }
    // Requests still waiting at the end count, and missed their objective.
    let cold = e.provisioning > 0;
    let waiting: Vec<f64> = e.queue.iter().map(|(a, _)| *a).collect();
    for arrival in waiting {
        if e.measured(arrival) {
            e.out.requests += 1;
            e.out.cold += u64::from(cold);
        }
    }
    // Bill what is still there at the end.
    let live: Vec<f64> = e
        .slots
        .iter()
        .filter_map(|s| match s {
            Slot::Idle { ordered_at }
            | Slot::Busy { ordered_at }
            | Slot::Provisioning { ordered_at, .. } => Some(*ordered_at),
            Slot::Gone => None,
        })
        .collect();
    for o in live {
        e.bill(o, end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(u32);
    impl Scaler for Fixed {
        fn desired(&mut self, _: &Observation) -> u32 {
            self.0
        }
    }

    fn params(lead_s: f64) -> Params {
        Params {
            service_s: 2.0,
            tick_s: 2.0,
            lead_s,
            start_s: 0,
            measure_from_s: 0,
            seed: 7,
            initial: 1,
        }
    }

    #[test]
    fn enough_fixed_replicas_serve_everything_within_the_objective_and_bill_their_time() {
        // 1 request a second, 2 s each: 2 in flight on average; 4 replicas never queue much.
        let counts = vec![1u32; 600];
        let out = run(&counts, params(0.0), &mut Fixed(4));
        assert_eq!(out.requests, 600);
        assert_eq!(out.within_objective, 600);
        assert_eq!(out.cold, 0);
        // 1 replica from 0 s, 3 more ordered at the first tick (2 s), all to the end (600 s).
        assert!(
            (out.vm_seconds - (600.0 + 3.0 * 598.0)).abs() < 1e-6,
            "{}",
            out.vm_seconds
        );
        let p50 = out.latency_us.value_at_quantile(0.5) as f64 / 1e6;
        assert!((p50 - 2.0).abs() < 0.01, "{p50}");
    }

    #[test]
    fn too_few_replicas_queue_and_capacity_on_its_way_makes_requests_cold() {
        let counts = vec![3u32; 300];
        // One replica serves 0.5/s of the 3/s: most wait far past the objective.
        let out = run(&counts, params(0.0), &mut Fixed(1));
        assert!(out.within_objective * 10 < out.requests, "{out:?}");
        // Growing to 8 with a 30 s lead: requests wait while the 7 are on their way.
        let out = run(&counts, params(30.0), &mut Fixed(8));
        assert!(out.cold > 0 && out.cold < out.requests, "{out:?}");
        assert_eq!(out.max_replicas, 8);
    }

    #[test]
    fn the_same_seed_gives_the_same_outcome() {
        let counts: Vec<u32> = (0..500).map(|i| (i % 7) as u32).collect();
        let a = run(&counts, params(2.0), &mut Fixed(5));
        let b = run(&counts, params(2.0), &mut Fixed(5));
        assert_eq!(
            (a.requests, a.within_objective, a.cold),
            (b.requests, b.within_objective, b.cold)
        );
        assert_eq!(a.latency_us, b.latency_us);
    }
}
