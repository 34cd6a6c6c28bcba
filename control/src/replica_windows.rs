//! Per-replica windows (executions, queueing, errors) and each task's calibrated execution
//! time: what the replacement triggers judge a replica on. Pure data, like the monitor.

use crate::monitor::RETENTION_S;
use crate::monitor::{of_graph, seconds};
use prescient_schemas::sketch::Sketch;
use std::collections::{BTreeMap, HashMap, VecDeque};

#[derive(Debug, Clone, Default)]
struct ReplicaSecond {
    exec: Sketch,
    queue: Sketch,
    errors: u64,
}

#[derive(Debug, Default)]
struct Series {
    task: String,
    seconds: VecDeque<(u64, ReplicaSecond)>,
}

/// One replica over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStats {
    pub replica: String,
    pub task: String,
    pub executions: u64,
    pub errors: u64,
    pub exec_p50_ns: u64,
    pub queue_p50_ns: u64,
    pub exec_p99_ns: u64,
    pub queue_p99_ns: u64,
}

/// Per-second windows per (graph, replica), newest last, bounded by `RETENTION_S`.
#[derive(Debug, Default)]
pub struct ReplicaWindows {
    series: BTreeMap<(String, String), Series>,
    /// New seconds since the last sweep of replicas that are gone.
    since_sweep: u64,
}

impl ReplicaWindows {
    /// Adds a second of one replica's executions.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        graph_id: &str,
        task: &str,
        replica: &str,
        second: u64,
        exec: &Sketch,
        queue: &Sketch,
        errors: u64,
    ) {
        if replica.is_empty() {
            return;
        }
        let s = self
            .series
            .entry((graph_id.to_string(), replica.to_string()))
            .or_insert_with(|| Series {
                task: task.to_string(),
                seconds: VecDeque::new(),
            });
        while s
            .seconds
            .front()
            .is_some_and(|(t, _)| t.saturating_add(RETENTION_S) < second)
        {
            s.seconds.pop_front();
        }
        let at = match s.seconds.iter().rposition(|(t, _)| *t == second) {
            Some(i) => i,
            None => {
                let at = s.seconds.partition_point(|(t, _)| *t < second);
                s.seconds.insert(at, (second, ReplicaSecond::default()));
                self.since_sweep += 1;
                at
            }
        };
        let slot = &mut s.seconds[at].1;
        slot.exec.merge(exec);
        slot.queue.merge(queue);
        slot.errors += errors;
        // Replicas that are gone stop sending; their series go once they are past retention.
        if self.since_sweep >= RETENTION_S {
            self.since_sweep = 0;
            self.series.retain(|_, s| {
                s.seconds
                    .back()
                    .is_some_and(|(t, _)| t.saturating_add(RETENTION_S) >= second)
            });
        }
    }

    /// Every replica of `graph_id` with executions in the `window_s` seconds up to `now_s`.
    pub fn stats(&self, graph_id: &str, window_s: u64, now_s: u64) -> Vec<ReplicaStats> {
        let from = (now_s + 1).saturating_sub(window_s.max(1));
        let mut out: Vec<ReplicaStats> = of_graph(&self.series, graph_id)
            .filter_map(|((_, replica), s)| {
                let mut m = ReplicaSecond::default();
                for w in seconds(&s.seconds, from, now_s) {
                    m.exec.merge(&w.exec);
                    m.queue.merge(&w.queue);
                    m.errors += w.errors;
                }
                (m.exec.count() > 0).then(|| ReplicaStats {
                    replica: replica.clone(),
                    task: s.task.clone(),
                    executions: m.exec.count(),
                    errors: m.errors,
                    exec_p50_ns: m.exec.quantile(0.5).round() as u64,
                    queue_p50_ns: m.queue.quantile(0.5).round() as u64,
                    exec_p99_ns: m.exec.quantile(0.99).round() as u64,
                    queue_p99_ns: m.queue.quantile(0.99).round() as u64,
                })
            })
            .collect();
        out.sort_by(|a, b| a.replica.cmp(&b.replica));
        out
    }

    /// Each task's calibrated execution p50 (ns): the lowest p50 of any of its replicas over
    /// any `bucket_s`-second bucket (with at least `min_count` executions) in the `span_s`
    /// seconds up to `now_s`. The best the task has recently done, so a replica running slow
    /// now is measured against how fast the task runs, not against itself.
    pub fn calibrated(
        &self,
        graph_id: &str,
        bucket_s: u64,
        span_s: u64,
        min_count: u64,
        now_s: u64,
    ) -> HashMap<String, u64> {
        let bucket_s = bucket_s.max(1);
        let from = (now_s + 1).saturating_sub(span_s);
        let mut out: HashMap<String, u64> = HashMap::new();
        for (_, s) in of_graph(&self.series, graph_id) {
            let mut buckets: std::collections::BTreeMap<u64, Sketch> = Default::default();
            for (t, w) in s.seconds.iter().filter(|(t, _)| *t >= from && *t <= now_s) {
                buckets.entry(t / bucket_s).or_default().merge(&w.exec);
            }
            for b in buckets.values().filter(|b| b.count() >= min_count) {
                let p50 = b.quantile(0.5).round() as u64;
                let e = out.entry(s.task.clone()).or_insert(p50);
                *e = (*e).min(p50);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch(values: &[f64]) -> Sketch {
        let mut s = Sketch::default();
        for v in values {
            s.record(*v);
        }
        s
    }

    #[test]
    fn replicas_are_told_apart_and_calibration_is_the_best_bucket() {
        let mut w = ReplicaWindows::default();
        let fast = sketch(&[10e6; 20]);
        let slow = sketch(&[40e6; 20]);
        let none = Sketch::default();
        for sec in 100..120 {
            w.record("g1", "t", "g1.t.r1", sec, &fast, &none, 0);
            let e = if sec >= 110 { &slow } else { &fast };
            w.record("g1", "t", "g1.t.r2", sec, e, &none, u64::from(sec >= 115));
        }
        let s = w.stats("g1", 5, 119);
        assert_eq!(s.len(), 2);
        let ratio = s[1].exec_p50_ns as f64 / s[0].exec_p50_ns as f64;
        assert!((ratio - 4.0).abs() < 0.1, "{s:?}");
        assert_eq!((s[1].executions, s[1].errors), (100, 5));
        let c = w.calibrated("g1", 10, 300, 10, 119);
        let t = c["t"] as f64;
        assert!((t / 10e6 - 1.0).abs() < 0.02, "{c:?}");
        assert!(w.stats("g2", 5, 119).is_empty());
        // Past retention, a replica that stopped sending is swept.
        for sec in 0..RETENTION_S + 10 {
            w.record(
                "g1",
                "t",
                "g1.t.r3",
                200 + RETENTION_S + sec,
                &fast,
                &none,
                0,
            );
        }
        assert_eq!(w.series.len(), 1);
    }
}
