//! The whole-cluster simulation, another driver of the decision crate: hosts that heartbeat,
//! replicas with their own queues and `max_concurrency`, invocations routed by the decision
//! crate's replica choice, the control node's own monitor fed the per-second windows workers
//! send and read by its own `readings`, and `plan` ticking as the control node ticks it, its
//! actions applied with `apply` and executed in virtual time (placement → provisioning after a
//! lead time and warm-up, or a boot failure; tables; drains; retirements). Deterministic for a
//! seed: one event queue ordered by (time, sequence), integer nanoseconds.

use crate::fleet::{Dist, Fault, HostSpec, Service};
use prescient_control::monitor::{HostPoint, Monitor, WindowView};
use prescient_policy::balance::{self, Candidate, Load, Request, Rng};
use prescient_policy::{apply, observe, plan, Config, Snapshot};
use prescient_schemas::sketch::Sketch;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

const NS: u64 = 1_000_000_000;

/// How replicas are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The replication controller on what monitoring measured.
    Reactive,
    /// The same controller, told each task's arrival rate one lead time (and warm-up) ahead:
    /// what perfect foresight buys the same policy.
    Oracle,
}

/// A run's fixed parameters.
#[derive(Debug, Clone)]
pub struct Params {
    pub tick_s: f64,
    /// Placement to serving (provision + deploy).
    pub lead: Dist,
    pub warmup_s: f64,
    pub boot_failure: f64,
    pub faults: Vec<Fault>,
    pub mode: Mode,
    /// Simulate from here (arrivals before it are left out)...
    pub start_s: f64,
    /// ...measure invocations arriving from here on (billing too)...
    pub measure_from_s: f64,
    /// ...and stop here.
    pub end_s: f64,
    pub seed: u64,
    /// Say how far the run is on stderr.
    pub progress: bool,
}

/// One minute of a run, for plots.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Minute {
    pub minute: u64,
    pub arrivals: u64,
    /// Replicas billed and ready at the minute's end.
    pub replicas: u32,
    pub ready: u32,
    pub completed: u64,
    pub within_objective: u64,
    /// The slowest completion in the minute (s).
    pub max_latency_s: f64,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub requests: u64,
    pub within_objective: u64,
    /// Invocations that waited for a task with no routable replica.
    pub cold: u64,
    /// Invocations lost with a host that died.
    pub failed: u64,
    pub latency_us: hdrhistogram::Histogram<u64>,
    pub vm_seconds: f64,
    /// Decisions by kind (place, scale-out, scale-in, replace, shed, lost, unplaceable, ...).
    pub decisions: BTreeMap<&'static str, u64>,
    pub max_replicas: u32,
    pub passes: u64,
    pub minutes: Vec<Minute>,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    inv: u64,
    task: u16,
    /// When it reached its task (its queueing starts).
    at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Tick,
    Pass,
    Ready(usize),
    BootFailed(usize),
    Done(usize, u64, u16, u64, u64),
    Dies(usize),
    /// A service's next invocation enters.
    Arrive(u32),
}

#[derive(Debug, PartialEq, Eq)]
struct Timed(u64, u64, Ev);

impl Ord for Timed {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.0, o.1).cmp(&(self.0, self.1))
    }
}

impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// One task of a service, as the engine needs it.
struct TaskMeta {
    id: String,
    downstream: Vec<u16>,
    incoming: u16,
    sink: bool,
    max_concurrency: u32,
}

struct Svc {
    graph_id: String,
    tasks: Vec<TaskMeta>,
    entries: Vec<u16>,
    sinks: u16,
    /// Per task: the routed replicas.
    routes: Vec<Vec<Routed>>,
    /// Per task: jobs that found no routable replica.
    parked: Vec<VecDeque<Job>>,
}

struct Routed {
    slot: usize,
    id: String,
    host: String,
}

impl Candidate for Routed {
    fn replica(&self) -> &str {
        &self.id
    }
    fn host(&self) -> &str {
        &self.host
    }
}

struct Outstanding<'a>(&'a [Rep]);

impl Load<Routed> for Outstanding<'_> {
    type Metric = usize;
    fn load(&self, r: &Routed) -> usize {
        let rep = &self.0[r.slot];
        rep.queue.len() + rep.busy as usize
    }
}

struct Rep {
    id: String,
    svc: u32,
    task: u16,
    host: usize,
    alive: bool,
    ready: bool,
    queue: VecDeque<Job>,
    busy: u32,
    running: Vec<u64>,
    placed: u64,
    /// Billing ends (retired once drained, boot failed, or its host died).
    ended: Option<u64>,
    /// Retired by the control node: ends once nothing is in flight.
    retiring: bool,
    window: Option<(u64, Sketch, Sketch, Sketch)>,
}

struct Inv {
    svc: u32,
    arrived: u64,
    sinks_left: u16,
    cold: bool,
}

struct HostState {
    name: String,
    alive: bool,
    /// (from, to, factor) slow-downs, ns.
    slow: Vec<(u64, u64, f64)>,
}

/// Runs `services` on `hosts` under `p`.
pub fn run(hosts: &[HostSpec], services: &[Service], p: &Params) -> Outcome {
    Engine::new(hosts, services, p).run()
}

struct Engine<'a> {
    p: &'a Params,
    services: &'a [Service],
    snap: Snapshot,
    monitor: Monitor,
    chains: prescient_control::monitor::ChainsCache,
    /// The control node's forecasts (`forecasts.rs`), the model loaded with the first series.
    forecasting: prescient_control::forecasting::Forecasting,
    config: Config,
    rng: Rng,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Timed>,
    pass_due: bool,
    reps: Vec<Rep>,
    by_id: HashMap<String, usize>,
    svcs: Vec<Svc>,
    by_graph: HashMap<String, u32>,
    hosts: Vec<HostState>,
    host_index: HashMap<String, usize>,
    invs: HashMap<u64, Inv>,
    joins: HashMap<(u64, u16), u16>,
    dirty: Vec<usize>,
    /// Replicas billed now, and those of them ready (kept as they change, not counted).
    billed: u32,
    billed_ready: u32,
    /// Per service, the next arrival not yet admitted.
    next_arrival: Vec<usize>,
    /// Per service, the oracle's view: per-second counts.
    counts: Vec<Vec<u32>>,
    out: Outcome,
    measure_from: u64,
    end: u64,
    next_inv: u64,
}

impl<'a> Engine<'a> {
    fn new(hosts: &[HostSpec], services: &'a [Service], p: &'a Params) -> Engine<'a> {
        let s = |x: f64| (x.max(0.0) * 1e9) as u64;
        let (start, measure_from, end) = (s(p.start_s), s(p.measure_from_s), s(p.end_s));
        let mut snap = Snapshot::default();
        for h in hosts {
            observe::registered(
                &mut snap,
                &h.name,
                h.capacity,
                Vec::new(),
                Duration::from_nanos(start),
            );
        }
        let host_index = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.clone(), i))
            .collect();
        let mut states: Vec<HostState> = hosts
            .iter()
            .map(|h| HostState {
                name: h.name.clone(),
                alive: true,
                slow: Vec::new(),
            })
            .collect();
        let mut heap = BinaryHeap::new();
        let mut seq = 0;
        for f in &p.faults {
            match f {
                Fault::Slow {
                    host,
                    factor,
                    from_s,
                    to_s,
                } => {
                    if let Some(h) = hosts.iter().position(|x| x.name == *host) {
                        states[h].slow.push((s(*from_s), s(*to_s), *factor));
                    }
                }
                Fault::Dies { host, at_s } => {
                    if let Some(h) = hosts.iter().position(|x| x.name == *host) {
                        seq += 1;
                        heap.push(Timed(s(*at_s).max(start), seq, Ev::Dies(h)));
                    }
                }
            }
        }
        let mut svcs = Vec::new();
        let mut by_graph = HashMap::new();
        for (i, svc) in services.iter().enumerate() {
            let g = &svc.record.graph;
            snap.wanted
                .insert(svc.record.id.clone(), svc.record.clone().into());
            by_graph.insert(svc.record.id.clone(), i as u32);
            let index = |id: &str| g.tasks.iter().position(|t| t.id == id).unwrap_or(0) as u16;
            let tasks: Vec<TaskMeta> = g
                .tasks
                .iter()
                .map(|t| {
                    let mut downstream: Vec<u16> = g
                        .edges
                        .iter()
                        .filter(|e| e.from.task == t.id)
                        .map(|e| index(&e.to.task))
                        .collect();
                    downstream.sort_unstable();
                    downstream.dedup();
                    let incoming = g.edges.iter().filter(|e| e.to.task == t.id).count() as u16;
                    TaskMeta {
                        id: t.id.clone(),
                        sink: downstream.is_empty(),
                        downstream,
                        incoming,
                        max_concurrency: g
                            .scaling
                            .as_ref()
                            .map_or(1, |s| s.for_task(&t.id).max_concurrency.max(1)),
                    }
                })
                .collect();
            let entries = (0..tasks.len() as u16)
                .filter(|t| tasks[*t as usize].incoming == 0)
                .collect();
            let sinks = tasks.iter().filter(|t| t.sink).count() as u16;
            let n = tasks.len();
            svcs.push(Svc {
                graph_id: svc.record.id.clone(),
                tasks,
                entries,
                sinks,
                routes: (0..n).map(|_| Vec::new()).collect(),
                parked: (0..n).map(|_| VecDeque::new()).collect(),
            });
        }
        let counts = match p.mode {
            Mode::Oracle => services
                .iter()
                .map(|svc| {
                    let mut c = vec![0u32; (end / NS + 1) as usize];
                    for a in &svc.arrivals {
                        if let Some(x) = c.get_mut((a / NS) as usize) {
                            *x += 1;
                        }
                    }
                    c
                })
                .collect(),
            Mode::Reactive => Vec::new(),
        };
        let next_arrival = services
            .iter()
            .map(|svc| svc.arrivals.partition_point(|a| *a < start))
            .collect();
        seq += 1;
        heap.push(Timed(start, seq, Ev::Tick));
        let histogram = hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .unwrap_or_else(|_| hdrhistogram::Histogram::new(3).expect("3 significant digits"));
        let mut engine = Engine {
            p,
            services,
            snap,
            monitor: Monitor::default(),
            chains: Default::default(),
            forecasting: prescient_control::forecasting::Forecasting::loading(crate::model),
            config: Config::default(),
            rng: Rng::new(p.seed),
            now: start,
            seq,
            heap,
            pass_due: false,
            reps: Vec::new(),
            by_id: HashMap::new(),
            svcs,
            by_graph,
            hosts: states,
            host_index,
            invs: HashMap::new(),
            joins: HashMap::new(),
            dirty: Vec::new(),
            billed: 0,
            billed_ready: 0,
            next_arrival,
            counts,
            out: Outcome {
                requests: 0,
                within_objective: 0,
                cold: 0,
                failed: 0,
                latency_us: histogram,
                vm_seconds: 0.0,
                decisions: BTreeMap::new(),
                max_replicas: 0,
                passes: 0,
                minutes: Vec::new(),
            },
            measure_from,
            end,
            next_inv: 1,
        };
        for svc in 0..services.len() as u32 {
            engine.schedule_arrival(svc);
        }
        engine
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Timed(t, self.seq, ev));
    }

    fn run(mut self) -> Outcome {
        let span = self.end.saturating_sub(self.now).max(1);
        let started = self.now;
        let mut said = 0;
        while let Some(Timed(t, _, ev)) = self.heap.pop() {
            if t >= self.end {
                break;
            }
            self.now = t;
            match ev {
                Ev::Tick => {
                    self.tick();
                    let next = self.now + (self.p.tick_s * 1e9) as u64;
                    self.at(next, Ev::Tick);
                    if self.p.progress {
                        let tenth = (self.now - started) * 10 / span;
                        if tenth > said {
                            said = tenth;
                            eprintln!("  … {}% of the simulated time", tenth * 10);
                        }
                    }
                }
                Ev::Pass => {
                    self.pass_due = false;
                    self.pass();
                }
                Ev::Ready(slot) => self.ready(slot),
                Ev::BootFailed(slot) => self.boot_failed(slot),
                Ev::Done(slot, inv, task, at, start) => {
                    self.done(slot, Job { inv, task, at }, start)
                }
                Ev::Dies(h) => self.dies(h),
                Ev::Arrive(svc) => {
                    self.next_arrival[svc as usize] += 1;
                    self.schedule_arrival(svc);
                    self.admit(svc);
                }
            }
        }
        self.finish()
    }

    /// Puts `svc`'s next invocation on the event queue (one per service at a time keeps the
    /// queue as small as the fleet, not the trace).
    fn schedule_arrival(&mut self, svc: u32) {
        if let Some(&t) = self.services[svc as usize]
            .arrivals
            .get(self.next_arrival[svc as usize])
        {
            self.at(t, Ev::Arrive(svc));
        }
    }

    fn measured(&self, t: u64) -> bool {
        t >= self.measure_from
    }

    fn minute(&mut self, t: u64) -> &mut Minute {
        let m = t / (60 * NS);
        let from = self.measure_from / (60 * NS);
        let i = m.saturating_sub(from) as usize;
        while self.out.minutes.len() <= i {
            let minute = from + self.out.minutes.len() as u64;
            self.out.minutes.push(Minute {
                minute,
                ..Minute::default()
            });
        }
        &mut self.out.minutes[i]
    }

    /// An invocation enters: one job per entry task.
    fn admit(&mut self, svc: u32) {
        let inv = self.next_inv;
        self.next_inv += 1;
        let sinks = self.svcs[svc as usize].sinks;
        self.invs.insert(
            inv,
            Inv {
                svc,
                arrived: self.now,
                sinks_left: sinks,
                cold: false,
            },
        );
        if self.measured(self.now) {
            self.out.requests += 1;
            let now = self.now;
            self.minute(now).arrivals += 1;
        }
        for k in 0..self.svcs[svc as usize].entries.len() {
            let task = self.svcs[svc as usize].entries[k];
            self.route(
                svc,
                Job {
                    inv,
                    task,
                    at: self.now,
                },
                None,
            );
        }
    }

    /// Sends `job` to a routable replica of its task (replica choice as the data plane makes
    /// it), or parks it until one is routed.
    fn route(&mut self, svc: u32, job: Job, from_host: Option<usize>) {
        let s = &self.svcs[svc as usize];
        let t = &s.tasks[job.task as usize];
        let local = from_host.map_or("", |h| self.hosts[h].name.as_str());
        let req = Request {
            invocation: job.inv,
            join: t.incoming > 1,
            local_host: local,
        };
        let reps = &self.reps;
        let chosen = balance::choose(
            &s.routes[job.task as usize],
            &req,
            |r| reps[r.slot].alive,
            &Outstanding(reps),
            &self.rng,
        )
        .map(|r| r.slot);
        match chosen {
            Some(slot) => self.enqueue(slot, job),
            None => {
                if let Some(i) = self.invs.get_mut(&job.inv) {
                    i.cold = true;
                }
                self.svcs[svc as usize].parked[job.task as usize].push_back(job);
            }
        }
    }

    fn enqueue(&mut self, slot: usize, job: Job) {
        let rep = &mut self.reps[slot];
        let max = self.svcs[rep.svc as usize].tasks[rep.task as usize].max_concurrency;
        if rep.busy < max {
            self.start(slot, job);
        } else {
            rep.queue.push_back(job);
        }
    }

    fn start(&mut self, slot: usize, job: Job) {
        let rep = &mut self.reps[slot];
        rep.busy += 1;
        rep.running.push(job.inv);
        let svc = &self.services[rep.svc as usize];
        let mut exec = svc.service[job.task as usize].draw(&self.rng);
        for (from, to, factor) in &self.hosts[rep.host].slow {
            if (*from..*to).contains(&self.now) {
                exec *= factor;
            }
        }
        let done = self.now + (exec * 1e9) as u64;
        let now = self.now;
        self.at(done, Ev::Done(slot, job.inv, job.task, job.at, now));
    }

    fn done(&mut self, slot: usize, job: Job, started: u64) {
        if !self.reps[slot].alive {
            return;
        }
        let now = self.now;
        let rep = &mut self.reps[slot];
        rep.busy -= 1;
        if let Some(i) = rep.running.iter().position(|x| *x == job.inv) {
            rep.running.swap_remove(i);
        }
        let svc = rep.svc;
        let sink_latency = self.svcs[svc as usize].tasks[job.task as usize]
            .sink
            .then(|| self.invs.get(&job.inv).map(|i| now - i.arrived))
            .flatten();
        self.record(slot, now - started, started - job.at, sink_latency);
        let host = self.reps[slot].host;
        for k in 0..self.svcs[svc as usize].tasks[job.task as usize]
            .downstream
            .len()
        {
            let d = self.svcs[svc as usize].tasks[job.task as usize].downstream[k];
            let incoming = self.svcs[svc as usize].tasks[d as usize].incoming;
            if incoming > 1 {
                let n = self.joins.entry((job.inv, d)).or_insert(0);
                *n += 1;
                if *n < incoming {
                    continue;
                }
                self.joins.remove(&(job.inv, d));
            }
            self.route(
                svc,
                Job {
                    inv: job.inv,
                    task: d,
                    at: now,
                },
                Some(host),
            );
        }
        if sink_latency.is_some() {
            self.sink_done(job.inv);
        }
        if let Some(next) = self.reps[slot].queue.pop_front() {
            self.start(slot, next);
        } else if self.reps[slot].retiring && self.reps[slot].busy == 0 {
            self.end_billing(slot);
        }
    }

    fn sink_done(&mut self, inv: u64) {
        let Some(i) = self.invs.get_mut(&inv) else {
            return;
        };
        i.sinks_left = i.sinks_left.saturating_sub(1);
        if i.sinks_left > 0 {
            return;
        }
        let Some(i) = self.invs.remove(&inv) else {
            return;
        };
        if !self.measured(i.arrived) {
            return;
        }
        let latency = self.now - i.arrived;
        let within = latency as f64 / 1e9 <= self.services[i.svc as usize].objective_s;
        let _ = self.out.latency_us.record((latency / 1000).max(1));
        self.out.within_objective += u64::from(within);
        self.out.cold += u64::from(i.cold);
        let now = self.now;
        let m = self.minute(now);
        m.completed += 1;
        m.within_objective += u64::from(within);
        m.max_latency_s = m.max_latency_s.max(latency as f64 / 1e9);
    }

    /// One execution into its replica's window of this second (what its worker sends).
    fn record(&mut self, slot: usize, exec_ns: u64, queue_ns: u64, sink_ns: Option<u64>) {
        let second = self.now / NS;
        if self.reps[slot]
            .window
            .as_ref()
            .is_some_and(|w| w.0 != second)
        {
            self.flush(slot);
        }
        let rep = &mut self.reps[slot];
        if rep.window.is_none() {
            self.dirty.push(slot);
        }
        let w = rep.window.get_or_insert_with(|| {
            (
                second,
                Sketch::default(),
                Sketch::default(),
                Sketch::default(),
            )
        });
        w.1.record(exec_ns as f64);
        w.2.record(queue_ns as f64);
        if let Some(s) = sink_ns {
            w.3.record(s as f64);
        }
    }

    fn flush(&mut self, slot: usize) {
        let rep = &mut self.reps[slot];
        let Some((second, exec, queue, sink)) = rep.window.take() else {
            return;
        };
        let svc = &self.svcs[rep.svc as usize];
        self.monitor.record_window(&WindowView {
            graph_id: svc.graph_id.clone(),
            task: svc.tasks[rep.task as usize].id.clone(),
            replica: rep.id.clone(),
            second,
            exec,
            queue,
            sink,
            ..WindowView::default()
        });
    }

    fn tick(&mut self) {
        let now = Duration::from_nanos(self.now);
        for h in self.hosts.iter().filter(|h| h.alive) {
            observe::heartbeat(&mut self.snap, &h.name, now);
        }
        // Hosts that are ever slowed report their steal each tick (the others report none,
        // which reads the same to the triggers).
        for h in self.hosts.iter().filter(|h| h.alive && !h.slow.is_empty()) {
            let factor: f64 = h
                .slow
                .iter()
                .filter(|(from, to, _)| (*from..*to).contains(&self.now))
                .map(|(_, _, f)| *f)
                .product();
            self.monitor.record_host(
                &h.name,
                HostPoint {
                    at_unix_ms: self.now / 1_000_000,
                    cpu_steal: (1.0 - 1.0 / factor) as f32,
                    ..HostPoint::default()
                },
            );
        }
        self.pass();
        let (billed, ready) = (self.billed, self.billed_ready);
        self.out.max_replicas = self.out.max_replicas.max(billed);
        if self.measured(self.now) {
            let now = self.now;
            let m = self.minute(now);
            m.replicas = billed;
            m.ready = ready;
        }
    }

    /// One control-node pass: telemetry into the snapshot, `plan`, each action applied and
    /// executed.
    fn pass(&mut self) {
        let second = self.now / NS;
        let dirty = std::mem::take(&mut self.dirty);
        for slot in dirty {
            match self.reps[slot].window.as_ref() {
                Some(w) if w.0 < second => self.flush(slot),
                Some(_) => self.dirty.push(slot),
                None => {}
            }
        }
        prescient_control::readings::read(
            &self.monitor,
            &mut self.chains,
            &mut self.snap,
            self.now / 1_000_000,
        );
        self.forecast();
        if self.p.mode == Mode::Oracle {
            self.foresee();
        }
        let now = Duration::from_nanos(self.now);
        let actions = plan(&self.snap, &self.config, now);
        self.out.passes += 1;
        for a in &actions {
            apply(&mut self.snap, a, now);
        }
        for a in actions {
            self.execute(a);
        }
    }
}

mod actions;
mod forecasts;

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
