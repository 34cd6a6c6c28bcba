//! The control node's load forecasts, for graphs with `[scaling.predictive]` on or
//! forecast-only: per task, a forecast series of its executions in 10 s steps, seeded from the
//! registry's per-minute history when it is created (so a restart keeps what was learned),
//! fed from the monitor's per-second windows, forecast at every step (the ONNX model run once
//! for every series, the baselines beside it, chosen per series) into
//! `Deployment::forecasts`, where the decision crate's plan reads it.

use crate::monitor::{Monitor, RETENTION_S};
use crate::store::HistoryPoint;
use prescient_policy::forecast::{self, Forecast, Model};
use prescient_policy::planner;
use prescient_policy::snapshot::{Snapshot, TaskForecast};
use prescient_schemas::scaling::PredictiveMode;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Seconds per forecast step: per-second counts of a few executions are mostly noise the
/// queueing model already sizes for; the step forecasts the rate.
pub const STEP_S: u64 = 10;
/// Steps a series forecasts ahead, at least and at most (room for twice the lead time).
const MIN_STEPS: usize = 6;
pub const MAX_STEPS: usize = 64;
/// Seconds of per-second counts the arrivals' burstiness is measured over.
const BURST_S: usize = 600;
/// How many seconds behind the clock telemetry windows are complete (as the readings).
const LAG_S: u64 = 2;
/// Per-minute history read to seed a new series: two days (two of the forecast's seasons).
pub const SEED_MINUTES: u64 = 2 * 1440;

/// One task's series.
struct TaskSeries {
    series: forecast::Series,
    /// The first unix second not read yet.
    next_s: u64,
    /// Executions of the step being filled.
    step_count: f64,
    /// Per-second executions, newest last, for the burstiness.
    recent: VecDeque<f64>,
    /// The unix second the latest forecast's first step starts, and its steps.
    latest: Option<(u64, Vec<Forecast>)>,
    /// The decision-clock time `latest` was written for (so it is written once per step).
    written: Option<u64>,
    seeded: bool,
    /// A step completed in this pass: forecast it.
    stepped: bool,
}

/// Loads the model, once, when the first series starts (`None`: the baselines alone).
pub type Loader = fn() -> Option<Box<dyn Model>>;

/// Every forecast series the node keeps, and the model they share.
#[derive(Default)]
pub struct Forecasting {
    series: BTreeMap<(String, String), TaskSeries>,
    model: Option<Box<dyn Model>>,
    /// Not called yet.
    loader: Option<Loader>,
    batch: forecast::Batch,
}

impl Forecasting {
    /// Forecasts with `model` beside the baselines (`None`: the baselines alone).
    pub fn new(model: Option<Box<dyn Model>>) -> Forecasting {
        Forecasting {
            model,
            ..Forecasting::default()
        }
    }

    /// Forecasts with the model `loader` gives when the first series starts: a node or a
    /// simulation with no graph under `[scaling.predictive]` never loads it.
    pub fn loading(loader: Loader) -> Forecasting {
        Forecasting {
            loader: Some(loader),
            ..Forecasting::default()
        }
    }

    /// Keeps a series for every task of every graph with `[scaling.predictive]` not off, and
    /// drops the rest. A new series starts reading at the current minute's start (the monitor
    /// still holds it); [`Forecasting::unseeded`] says which need their history.
    pub fn track(&mut self, state: &Snapshot, now_ms: u64) {
        let mut wanted = BTreeSet::new();
        for (id, r) in &state.wanted {
            let Some(s) = r.graph.scaling.as_ref() else {
                continue;
            };
            if s.predictive.mode == PredictiveMode::Off {
                continue;
            }
            let lead_steps = s.predictive.lead_ns.div_ceil(STEP_S * 1_000_000_000) as usize;
            let steps = (2 * lead_steps + 1).clamp(MIN_STEPS, MAX_STEPS);
            for t in &r.graph.tasks {
                let key = (id.clone(), t.id.clone());
                wanted.insert(key.clone());
                self.series.entry(key).or_insert_with(|| {
                    let horizons: Vec<usize> = (1..=steps).collect();
                    let minute = now_ms / 1000 / 60 * 60;
                    TaskSeries {
                        series: forecast::Series::new((86_400 / STEP_S) as usize, &horizons),
                        next_s: minute,
                        step_count: 0.0,
                        recent: VecDeque::new(),
                        latest: None,
                        written: None,
                        seeded: false,
                        stepped: false,
                    }
                });
            }
        }
        self.series.retain(|k, _| wanted.contains(k));
        if !self.series.is_empty() {
            if let Some(load) = self.loader.take() {
                self.model = load();
            }
        }
    }

    /// Drops a series; [`Forecasting::track`] starts it again (unseeded) if still wanted.
    pub fn forget(&mut self, graph_id: &str, task: &str) {
        self.series
            .remove(&(graph_id.to_string(), task.to_string()));
    }

    /// The (graph, task) series waiting for their history, with the minutes to read (from,
    /// to exclusive).
    pub fn unseeded(&self) -> Vec<(String, String, u64, u64)> {
        self.series
            .iter()
            .filter(|(_, s)| !s.seeded)
            .map(|((g, t), s)| {
                let to = s.next_s / 60;
                (g.clone(), t.clone(), to.saturating_sub(SEED_MINUTES), to)
            })
            .collect()
    }

    /// Seeds a series with its history before `next_s`: per second where it is stored (the
    /// last [`crate::store::SECOND_HISTORY_S`]), per minute before that (a minute or second missing between
    /// two stored ones had no executions); an empty history seeds nothing.
    pub fn seed(
        &mut self,
        graph_id: &str,
        task: &str,
        points: &[HistoryPoint],
        seconds: &[HistoryPoint],
    ) {
        let Some(s) = self
            .series
            .get_mut(&(graph_id.to_string(), task.to_string()))
        else {
            return;
        };
        if s.seeded {
            return;
        }
        s.seeded = true;
        // Per-second rows (kept for the last hours) from the first whole minute they cover;
        // per-minute rows before that.
        let mut seconds: Vec<&HistoryPoint> = seconds.iter().filter(|p| p.at < s.next_s).collect();
        seconds.sort_by_key(|p| p.at);
        let seconds_from = seconds
            .first()
            .map_or(s.next_s, |p| p.at.div_ceil(60) * 60)
            .min(s.next_s);
        let before = seconds_from / 60;
        let mut points: Vec<&HistoryPoint> = points.iter().filter(|p| p.at < before).collect();
        points.sort_by_key(|p| p.at);
        let Some(first) = points.first().map(|p| p.at) else {
            return;
        };
        let per_step = (60 / STEP_S) as usize;
        let mut at = points.iter().peekable();
        for minute in first..before {
            let count = match at.peek() {
                Some(p) if p.at == minute => at.next().map_or(0, |p| p.count),
                _ => 0,
            };
            for _ in 0..per_step {
                s.series.observe(count as f64 / per_step as f64);
            }
        }
        let mut at = seconds
            .iter()
            .skip_while(|p| p.at < seconds_from)
            .peekable();
        for step in (seconds_from..s.next_s).step_by(STEP_S as usize) {
            let mut count = 0;
            while let Some(p) = at.next_if(|p| p.at < step + STEP_S) {
                count += p.count;
            }
            s.series.observe(count as f64);
        }
    }

    /// Reads the seconds completed since the last pass from the monitor; forecasts every
    /// series whose step completed, all in one batch; writes each new forecast into its
    /// deployment, its times on the decision clock (`now` is `now_ms` there).
    pub fn read(&mut self, monitor: &Monitor, state: &mut Snapshot, now_ms: u64, now: Duration) {
        let to_s = (now_ms / 1000).saturating_sub(LAG_S);
        for ((graph_id, task), s) in self.series.iter_mut().filter(|(_, s)| s.seeded) {
            // Seconds older than the monitor keeps are lost; the step they were in restarts.
            let from = s.next_s.max(to_s.saturating_sub(RETENTION_S));
            if from > s.next_s {
                s.step_count = 0.0;
            }
            if to_s <= from {
                continue;
            }
            let counts = monitor.executions_per_second(graph_id, task, from, to_s - 1);
            for (i, c) in counts.into_iter().enumerate() {
                let second = from + i as u64;
                s.recent.push_back(c as f64);
                if s.recent.len() > BURST_S {
                    s.recent.pop_front();
                }
                s.step_count += c as f64;
                if (second + 1).is_multiple_of(STEP_S) {
                    s.series.observe(s.step_count);
                    s.step_count = 0.0;
                    s.stepped = true;
                }
            }
            s.next_s = to_s;
        }
        let mut chosen: Vec<&mut TaskSeries> =
            self.series.values_mut().filter(|s| s.stepped).collect();
        if !chosen.is_empty() {
            let out = forecast::forecast_batch(
                chosen.iter_mut().map(|s| &mut s.series),
                self.model.as_deref_mut(),
                &mut self.batch,
            );
            // Horizon 1 is the step now filling.
            let first_step = to_s / STEP_S * STEP_S;
            for (s, f) in chosen.into_iter().zip(out) {
                s.latest = Some((first_step, f));
                s.stepped = false;
            }
        }
        let now_f = now_ms as f64 / 1000.0;
        for ((graph_id, task), s) in &mut self.series {
            let Some((start, f)) = &s.latest else {
                continue;
            };
            let missing = state
                .deployments
                .get(graph_id)
                .is_some_and(|d| !d.forecasts.contains_key(task));
            if s.written == Some(*start) && !missing {
                continue;
            }
            let Some(d) = state.deployment_mut(graph_id) else {
                continue;
            };
            let ago = Duration::from_secs_f64((now_f - *start as f64).max(0.0));
            let per_s = |x: f64| x / STEP_S as f64;
            d.forecasts.insert(
                task.clone(),
                TaskForecast {
                    from: now.saturating_sub(ago),
                    step: Duration::from_secs(STEP_S),
                    point_per_s: f.iter().map(|x| per_s(x.point)).collect(),
                    upper_per_s: f.iter().map(|x| per_s(x.upper)).collect(),
                    arrival_scv: planner::dispersion(s.recent.make_contiguous()),
                    method: f.first().map_or("none", |x| x.method.name()),
                },
            );
            s.written = Some(*start);
        }
    }

    /// How many series are kept (for tests and metrics).
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::WindowView;
    use prescient_policy::snapshot::Deployment;
    use prescient_schemas::{codec, file, GraphRecord};
    use std::sync::Arc;

    const GRAPH: &str = r#"
name = "svc"
[[task]]
id = "t"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "20ms"
[scaling]
[scaling.predictive]
mode = "on"
lead = "30s"
"#;

    fn state() -> Snapshot {
        let graph = file::parse("svc.toml", GRAPH).expect("parses").graph;
        let record = GraphRecord {
            id: "g1".into(),
            version: 1,
            submitted_at_ms: 0,
            digest: codec::graph_digest(&graph),
            graph,
        };
        let mut s = Snapshot::default();
        s.wanted.insert("g1".into(), Arc::new(record.clone()));
        s.deployments
            .insert("g1".into(), Arc::new(Deployment::new(record)));
        s
    }

    /// `per_s(second)` executions of `t` in each second of `from..to`.
    fn windows(m: &mut Monitor, from: u64, to: u64, per_s: impl Fn(u64) -> u64) {
        for second in from..to {
            let mut w = WindowView {
                graph_id: "g1".into(),
                task: "t".into(),
                second,
                ..WindowView::default()
            };
            for _ in 0..per_s(second) {
                w.exec.record(20e6);
            }
            m.record_window(&w);
        }
    }

    #[test]
    fn a_series_seeded_from_history_forecasts_each_step_into_the_deployment() {
        let mut s = state();
        let mut f = Forecasting::new(None);
        let start_ms = 1_000_020_000; // 20 s into a minute
        f.track(&s, start_ms);
        let unseeded = f.unseeded();
        assert_eq!(unseeded.len(), 1);
        let (g, t, from, to) = &unseeded[0];
        assert_eq!((g.as_str(), t.as_str()), ("g1", "t"));
        assert_eq!((to - from, *to), (SEED_MINUTES, 1_000_020 / 60));
        // Two stored hours at 300 a minute (5/s), one minute missing.
        let points: Vec<HistoryPoint> = (to - 120..*to)
            .filter(|m| *m != to - 7)
            .map(|minute| HistoryPoint {
                at: minute,
                count: 300,
                ..HistoryPoint::default()
            })
            .collect();
        f.seed(g, t, &points, &[]);
        assert!(f.unseeded().is_empty());
        // The live seconds since the minute began, and a pass 2 s behind the clock.
        let mut m = Monitor::default();
        let minute_s = 1_000_020 / 60 * 60;
        windows(&mut m, minute_s, 1_000_040, |_| 5);
        let now = Duration::from_secs(500);
        f.read(&m, &mut s, 1_000_042_000, now);
        let fc = s.deployments["g1"].forecasts["t"].clone();
        assert_eq!(fc.step, Duration::from_secs(STEP_S));
        assert_eq!(
            fc.upper_per_s.len(),
            7,
            "twice the 30 s lead in 10 s steps, and one"
        );
        // Horizon 1 is the step from 1,000,040 s, 2 s before the pass.
        assert_eq!(fc.from, now - Duration::from_secs(2));
        assert!(
            fc.point_per_s.iter().all(|p| (p - 5.0).abs() < 1.0),
            "{:?}",
            fc.point_per_s
        );
        assert!(fc
            .upper_per_s
            .iter()
            .zip(&fc.point_per_s)
            .all(|(u, p)| u >= p));
        assert!(fc.arrival_scv < 0.5, "steady counts: {}", fc.arrival_scv);
        // Nothing new completed: nothing rewritten. A burst: the next step reads it.
        s.deployment_mut("g1").expect("deployed").forecasts.clear();
        f.read(&m, &mut s, 1_000_042_500, now);
        assert!(
            s.deployments["g1"].forecasts.contains_key("t"),
            "rewritten when missing"
        );
        windows(&mut m, 1_000_040, 1_000_050, |sec| {
            if sec % 2 == 0 {
                40
            } else {
                0
            }
        });
        f.read(&m, &mut s, 1_000_052_000, now + Duration::from_secs(10));
        let later = &s.deployments["g1"].forecasts["t"];
        assert_eq!(later.from, now + Duration::from_secs(8));
        assert!(later.arrival_scv > 5.0, "bursts: {}", later.arrival_scv);
        // Predictive off: the series goes.
        let mut off = state();
        let g = Arc::make_mut(off.wanted.get_mut("g1").expect("wanted"));
        if let Some(sc) = g.graph.scaling.as_mut() {
            sc.predictive.mode = PredictiveMode::Off;
        }
        f.track(&off, 1_000_060_000);
        assert!(f.is_empty());
    }

    #[test]
    fn stored_seconds_stand_in_for_their_minutes() {
        let mut s = state();
        let mut f = Forecasting::new(None);
        let start_ms = 1_000_020_000;
        f.track(&s, start_ms);
        let (g, t, from, to) = f.unseeded().remove(0);
        // Two hours at 300 a minute, and the last ten minutes also per second at 1/s: those
        // minutes read from the seconds, so the series ends at 1/s, not 5/s.
        let minutes: Vec<HistoryPoint> = (to - 120..to)
            .map(|at| HistoryPoint {
                at,
                count: 300,
                ..HistoryPoint::default()
            })
            .collect();
        let seconds: Vec<HistoryPoint> = ((to - 10) * 60 - 30..to * 60)
            .map(|at| HistoryPoint {
                at,
                count: 1,
                ..HistoryPoint::default()
            })
            .collect();
        assert!(from < to - 120);
        f.seed(&g, &t, &minutes, &seconds);
        let mut m = Monitor::default();
        let minute_s = 1_000_020 / 60 * 60;
        windows(&mut m, minute_s, 1_000_040, |_| 1);
        f.read(&m, &mut s, 1_000_042_000, Duration::from_secs(500));
        let fc = &s.deployments["g1"].forecasts["t"];
        assert!(
            fc.point_per_s.iter().all(|p| (p - 1.0).abs() < 0.5),
            "{:?}",
            fc.point_per_s
        );
    }
}
