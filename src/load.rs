//! The load generator: open loop (Poisson arrivals at a rate), closed loop (a fixed number of
//! invocations in flight), or a replayed trace; latencies in an HDR histogram.
//!
//! Open-loop and trace latencies are measured from each invocation's scheduled start, so a
//! slow system cannot hide its queueing (no coordinated omission).

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use prescient_agent::dataplane::IngressConn;
use prescient_agent::request_path::routes::Rng;
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub enum Mode {
    Open {
        rate: f64,
    },
    Closed {
        concurrency: usize,
    },
    /// Arrival offsets from the trace's start, already divided by the speed-up.
    Trace {
        arrivals: Vec<Duration>,
    },
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub graph: String,
    pub mode: Mode,
    pub duration: Duration,
    pub payload: Bytes,
    pub deadline_ms: u32,
    pub ingresses: Vec<String>,
    /// Report the share of invocations answered within this latency.
    pub objective_us: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// Up to five distinct error messages.
    pub error_samples: Vec<String>,
    /// The share of invocations answered without error within `Spec::objective_us`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub within_objective: Option<f64>,
}

struct Stats {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    samples: Vec<String>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            ok: 0,
            errors: 0,
            samples: Vec::new(),
        }
    }

    fn record(
        &mut self,
        started: Instant,
        result: Result<Vec<(String, Bytes)>, prescient_agent::dataplane::InvokeError>,
    ) {
        let us = started.elapsed().as_micros() as u64;
        match result {
            Ok(_) => {
                self.ok += 1;
                let _ = self.hist.record(us.max(1));
            }
            Err(e) => {
                self.errors += 1;
                let e = e.to_string();
                if self.samples.len() < 5 && !self.samples.contains(&e) {
                    self.samples.push(e);
                }
            }
        }
    }
}

async fn connect(spec: &Spec) -> Result<Vec<Rc<IngressConn>>> {
    if spec.ingresses.is_empty() {
        bail!("no ingress to send to: no agent is registered");
    }
    let mut conns = Vec::new();
    for addr in &spec.ingresses {
        conns.push(Rc::new(
            IngressConn::connect(addr)
                .await
                .with_context(|| format!("connecting to the ingress at {addr}"))?,
        ));
    }
    Ok(conns)
}

/// What a continuous load completed over one phase.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub ok: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: u64,
}

/// Closed- or open-loop load that runs until stopped and is read in phases (what completed
/// since the last read): for comparisons that change the system under one unbroken load, with
/// no connection set-up or warm-up between the sides. Must run in a `LocalSet`.
pub struct Continuous {
    stats: Rc<RefCell<Stats>>,
    stop: Rc<Cell<bool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    since: Instant,
}

impl Continuous {
    /// Starts `spec`'s load (closed or open loop; its duration is ignored).
    pub async fn start(spec: &Spec) -> Result<Continuous> {
        let conns = connect(spec).await?;
        let stats = Rc::new(RefCell::new(Stats::new()));
        let stop = Rc::new(Cell::new(false));
        let mut tasks = Vec::new();
        let (graph, payload, deadline) =
            (spec.graph.clone(), spec.payload.clone(), spec.deadline_ms);
        let invoke = move |conn: Rc<IngressConn>, started: Instant, stats: Rc<RefCell<Stats>>| {
            let (graph, payload) = (graph.clone(), payload.clone());
            async move {
                let r = conn
                    .invoke(&graph, vec![(String::new(), payload)], deadline)
                    .await;
                stats.borrow_mut().record(started, r);
            }
        };
        match spec.mode {
            Mode::Closed { concurrency } => {
                for i in 0..concurrency {
                    let conn = conns[i % conns.len()].clone();
                    let (stats, stop) = (stats.clone(), stop.clone());
                    let invoke = invoke.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        while !stop.get() && !conn.is_closed() {
                            invoke(conn.clone(), Instant::now(), stats.clone()).await;
                        }
                    }));
                }
            }
            Mode::Open { rate } => {
                let (stats, stop) = (stats.clone(), stop.clone());
                let invoke = invoke.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let rng = prescient_agent::request_path::routes::rng_from_entropy();
                    let start = Instant::now();
                    let mut at = 0.0f64;
                    let mut sent = 0usize;
                    while !stop.get() {
                        at += -rng.unit().ln() / rate;
                        let when = start + Duration::from_secs_f64(at);
                        tokio::time::sleep_until(when.into()).await;
                        let conn = conns[sent % conns.len()].clone();
                        tokio::task::spawn_local(invoke(conn, when, stats.clone()));
                        sent += 1;
                    }
                }));
            }
            Mode::Trace { .. } => bail!("a continuous load is closed or open loop, not a trace"),
        }
        Ok(Continuous {
            stats,
            stop,
            tasks,
            since: Instant::now(),
        })
    }

    /// What completed since the last call (or the start).
    pub fn take(&mut self) -> Phase {
        let s = std::mem::replace(&mut *self.stats.borrow_mut(), Stats::new());
        let seconds = std::mem::replace(&mut self.since, Instant::now())
            .elapsed()
            .as_secs_f64();
        Phase {
            ok: s.ok,
            errors: s.errors,
            rps: s.ok as f64 / seconds.max(1e-9),
            p50_us: if s.hist.is_empty() {
                0
            } else {
                s.hist.value_at_quantile(0.5)
            },
        }
    }

    /// Stops sending and waits for the senders (closed loop: their last invocation) to end.
    pub async fn stop(self) {
        self.stop.set(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Runs the load and reports. Must run in a `LocalSet`.
pub async fn run(spec: Spec, progress: bool) -> Result<Report> {
    let conns = connect(&spec).await?;
    let stats = Rc::new(RefCell::new(Stats::new()));
    let start = Instant::now();
    let end = start + spec.duration;
    let invoke = {
        let spec = spec.clone();
        move |conn: Rc<IngressConn>| {
            let graph = spec.graph.clone();
            let payload = spec.payload.clone();
            let deadline = spec.deadline_ms;
            async move {
                conn.invoke(&graph, vec![(String::new(), payload)], deadline)
                    .await
            }
        }
    };
    let ticker = progress.then(|| {
        let stats = stats.clone();
        tokio::task::spawn_local(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = stats.borrow();
                let done = s.ok + s.errors;
                eprintln!(
                    "  {:>5.1}s  {:>8} req/s  p50 {:>7} us  p99 {:>8} us  errors {}",
                    start.elapsed().as_secs_f64(),
                    done - last,
                    s.hist.value_at_quantile(0.5),
                    s.hist.value_at_quantile(0.99),
                    s.errors
                );
                last = done;
            }
        })
    });
    let mut sent = 0u64;
    let mode_name;
    match &spec.mode {
        Mode::Closed { concurrency } => {
            mode_name = format!("closed, concurrency {concurrency}");
            let mut workers = Vec::new();
            for i in 0..*concurrency {
                let conn = conns[i % conns.len()].clone();
                let stats = stats.clone();
                let invoke = invoke.clone();
                workers.push(tokio::task::spawn_local(async move {
                    let mut n = 0u64;
                    while Instant::now() < end {
                        let t = Instant::now();
                        let r = invoke(conn.clone()).await;
                        stats.borrow_mut().record(t, r);
                        n += 1;
                        if conn.is_closed() {
                            break;
                        }
                    }
                    n
                }));
            }
            for w in workers {
                sent += w.await.unwrap_or(0);
            }
        }
        Mode::Open { .. } | Mode::Trace { .. } => {
            let rng = prescient_agent::request_path::routes::rng_from_entropy();
            let mut schedule: Box<dyn Iterator<Item = Duration>> = match &spec.mode {
                Mode::Open { rate } => {
                    mode_name = format!("open, Poisson at {rate}/s");
                    let rate = *rate;
                    let mut at = 0.0f64;
                    Box::new(std::iter::from_fn(move || {
                        at += -rng.unit().ln() / rate;
                        Some(Duration::from_secs_f64(at))
                    }))
                }
                Mode::Trace { arrivals } => {
                    mode_name = format!("trace replay, {} arrivals", arrivals.len());
                    Box::new(arrivals.clone().into_iter())
                }
                Mode::Closed { .. } => unreachable!(),
            };
            let mut inflight = Vec::new();
            for offset in schedule.by_ref() {
                let at = start + offset;
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                let conn = conns[(sent as usize) % conns.len()].clone();
                let stats = stats.clone();
                let invoke = invoke.clone();
                inflight.push(tokio::task::spawn_local(async move {
                    let r = invoke(conn).await;
                    stats.borrow_mut().record(at, r);
                }));
                sent += 1;
                if inflight.len() > 4096 {
                    inflight.retain(|h| !h.is_finished());
                }
            }
            for h in inflight {
                let _ = h.await;
            }
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    let seconds = start.elapsed().as_secs_f64();
    let s = stats.borrow();
    let q = |p: f64| {
        if s.hist.is_empty() {
            0
        } else {
            s.hist.value_at_quantile(p)
        }
    };
    Ok(Report {
        mode: mode_name,
        sent,
        ok: s.ok,
        errors: s.errors,
        seconds,
        rps: s.ok as f64 / seconds,
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: s.hist.max(),
        mean_us: s.hist.mean(),
        error_samples: s.samples.clone(),
        within_objective: spec.objective_us.map(|us| {
            let within = s.hist.count_between(0, us);
            within as f64 / (s.ok + s.errors).max(1) as f64
        }),
    })
}

/// Reads a trace into arrival offsets, compressed by `speedup`.
///
/// Formats (by header): one row per request with a timestamp in the first column
/// (`TIMESTAMP,...` Azure LLM, `gmt_create,...` Alibaba); per-minute counts in the second
/// column (`minute_start_edt,requests` NASA, `minute_index,events` Twitter), with arrivals
/// inside each minute synthesised as a Poisson process; or whitespace-separated per-second
/// counts (the `workload.txt` files), likewise Poisson inside each second.
pub fn read_trace(path: &Path, speedup: f64, limit: Duration) -> Result<Vec<Duration>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rng = Rng::new(0x5eed);
    let mut arrivals = Vec::new();
    let first = text.lines().next().unwrap_or("");
    let per_bucket = |counts: Vec<f64>, bucket_s: f64, arrivals: &mut Vec<Duration>| {
        for (i, c) in counts.into_iter().enumerate() {
            let begin = i as f64 * bucket_s;
            if begin / speedup > limit.as_secs_f64() {
                break;
            }
            if c <= 0.0 {
                continue;
            }
            let mut t = begin;
            loop {
                t += -rng.unit().ln() * bucket_s / c;
                if t >= begin + bucket_s {
                    break;
                }
                arrivals.push(Duration::from_secs_f64(t / speedup));
            }
        }
    };
    if first.contains(',') {
        let header: Vec<&str> = first.split(',').collect();
        let lower = header[0].to_ascii_lowercase();
        if lower.contains("minute") {
            let counts = text
                .lines()
                .skip(1)
                .map(|l| {
                    l.split(',')
                        .nth(1)
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .unwrap_or(0.0)
                })
                .collect();
            per_bucket(counts, 60.0, &mut arrivals);
        } else if lower.contains("timestamp") || lower.contains("gmt_create") {
            let mut times = Vec::new();
            for (n, l) in text.lines().enumerate().skip(1) {
                let field = l.split(',').next().unwrap_or("").trim();
                let t = prescient_sim::trace::parse_timestamp(field).with_context(|| {
                    format!("{}:{}: bad timestamp {field:?}", path.display(), n + 1)
                })?;
                times.push(t);
            }
            times.sort_by(f64::total_cmp);
            let t0 = times.first().copied().unwrap_or(0.0);
            for t in times {
                let d = (t - t0) / speedup;
                if d > limit.as_secs_f64() {
                    break;
                }
                arrivals.push(Duration::from_secs_f64(d));
            }
        } else {
            bail!(
                "{}: unknown trace format (header {first:?}); expected per-request timestamps or per-minute counts",
                path.display()
            );
        }
    } else {
        let counts: Vec<f64> = text
            .split_whitespace()
            .map(|v| v.parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!(
                    "{}: expected whitespace-separated per-second counts",
                    path.display()
                )
            })?;
        per_bucket(counts, 1.0, &mut arrivals);
    }
    Ok(arrivals)
}

#[cfg(test)]
mod tests {
    use super::*;

    use prescient_sim::trace::parse_timestamp;

    #[test]
    fn timestamps() {
        let a = parse_timestamp("2023-11-16 18:15:46.6805900").unwrap();
        let b = parse_timestamp("2023-11-16 18:16:46.6805900").unwrap();
        assert!((b - a - 60.0).abs() < 1e-6);
        assert_eq!(parse_timestamp("1970-01-02 00:00:00").unwrap(), 86_400.0);
    }

    #[test]
    fn per_minute_counts_become_poisson_arrivals() {
        let dir = std::env::temp_dir().join(format!("prescient-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.csv");
        std::fs::write(&p, "minute_index,events\n0,600\n1,0\n2,1200\n").unwrap();
        let a = read_trace(&p, 60.0, Duration::from_secs(3600)).unwrap();
        // 1800 expected; Poisson noise stays well within 10%.
        assert!((1600..2000).contains(&a.len()), "{}", a.len());
        assert!(a.iter().all(|d| d.as_secs_f64() < 3.0));
        assert!(
            !a.iter().any(|d| (1.0..2.0).contains(&d.as_secs_f64())),
            "minute 1 is empty"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
