//! Cold executions: those that queued past their task's wait budget while the task had a
//! replica on its way (placed, not yet routed): load that arrived before the capacity did.
//!
//! The live system routes only to ready replicas, so nothing runs on a replica that is still
//! booting (the simulator's definition of cold); the cost shows as queueing at the replicas
//! already serving. A window's executions count as cold when its second falls in one of the
//! task's provisioning intervals, or within `DRAIN_S` after one (the backlog drains onto the new
//! replica), and their queue wait is over the budget.

use super::RETENTION_S;
use prescient_schemas::sketch::Sketch;
use std::collections::{BTreeMap, VecDeque};

/// Seconds after a task's last replica became ready that its backlog still counts as cold.
pub const DRAIN_S: u64 = 2;

/// Cold executions of one graph: over the window asked for, or since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ColdStats {
    pub executions: u64,
    /// Their queue waits added up, and the longest.
    pub wait_sum_ns: f64,
    pub wait_max_ns: f64,
}

impl ColdStats {
    fn add(&mut self, o: &ColdStats) {
        self.executions += o.executions;
        self.wait_sum_ns += o.wait_sum_ns;
        self.wait_max_ns = self.wait_max_ns.max(o.wait_max_ns);
    }
}

#[derive(Debug, Default)]
struct Due {
    /// Provisioning intervals, oldest first: first and last second (`None`: still going).
    intervals: VecDeque<(u64, Option<u64>)>,
    budget_ns: u64,
}

/// Each task's provisioning intervals and each graph's cold executions.
#[derive(Debug, Default)]
pub struct Cold {
    due: BTreeMap<(String, String), Due>,
    seconds: BTreeMap<String, VecDeque<(u64, ColdStats)>>,
    pub totals: BTreeMap<String, ColdStats>,
}

impl Cold {
    /// Says whether `graph.task` has a replica on its way at `now_s`, and the queue wait over
    /// which its executions are cold (called on every decision pass).
    pub fn note(
        &mut self,
        graph: &str,
        task: &str,
        now_s: u64,
        provisioning: bool,
        budget_ns: u64,
    ) {
        let key = (graph.to_string(), task.to_string());
        if !provisioning && !self.due.contains_key(&key) {
            return;
        }
        let due = self.due.entry(key).or_default();
        due.budget_ns = budget_ns;
        match (due.intervals.back_mut(), provisioning) {
            (Some((_, end @ None)), false) => *end = Some(now_s),
            (Some((_, None)), true) => {}
            (_, true) => due.intervals.push_back((now_s, None)),
            (_, false) => {}
        }
        while due
            .intervals
            .front()
            .is_some_and(|(_, end)| end.is_some_and(|e| e + RETENTION_S < now_s))
        {
            due.intervals.pop_front();
        }
    }

    /// Forgets a graph that is gone.
    pub fn remove_graph(&mut self, graph: &str) {
        self.due.retain(|(g, _), _| g != graph);
        self.seconds.remove(graph);
    }

    /// Counts the cold executions among a window's (`queue`: their queue waits).
    pub fn record(&mut self, graph: &str, task: &str, second: u64, queue: &Sketch) {
        let Some(due) = self.due.get(&(graph.to_string(), task.to_string())) else {
            return;
        };
        let during = due.intervals.iter().any(|(from, to)| {
            second >= *from && to.is_none_or(|t| second <= t.saturating_add(DRAIN_S))
        });
        if !during {
            return;
        }
        let (executions, wait_sum_ns) = queue.above(due.budget_ns as f64);
        if executions == 0 {
            return;
        }
        let s = ColdStats {
            executions,
            wait_sum_ns,
            wait_max_ns: queue.max(),
        };
        self.totals.entry(graph.to_string()).or_default().add(&s);
        let series = self.seconds.entry(graph.to_string()).or_default();
        match series.iter_mut().rev().take(8).find(|(t, _)| *t == second) {
            Some((_, c)) => c.add(&s),
            None => {
                let at = series.partition_point(|(t, _)| *t < second);
                series.insert(at, (second, s));
            }
        }
        while series
            .front()
            .is_some_and(|(t, _)| t.saturating_add(RETENTION_S) < second)
        {
            series.pop_front();
        }
    }

    /// A graph's cold executions in the `window_s` seconds up to `now_s`.
    pub fn window(&self, graph: &str, window_s: u64, now_s: u64) -> ColdStats {
        let mut out = ColdStats::default();
        if let Some(series) = self.seconds.get(graph) {
            for c in super::seconds(series, now_s.saturating_sub(window_s), now_s) {
                out.add(c);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits(ms: &[f64]) -> Sketch {
        let mut s = Sketch::default();
        for w in ms {
            s.record(w * 1e6);
        }
        s
    }

    #[test]
    fn only_long_waits_while_capacity_is_on_its_way_are_cold() {
        let mut c = Cold::default();
        let budget = 10_000_000;
        c.record("g", "t", 100, &waits(&[50.0]));
        assert_eq!(
            c.window("g", 60, 200),
            ColdStats::default(),
            "never provisioning"
        );
        c.note("g", "t", 100, false, budget);
        c.note("g", "t", 105, true, budget);
        c.note("g", "t", 106, true, budget);
        c.note("g", "t", 110, false, budget);
        c.record("g", "t", 104, &waits(&[50.0, 60.0]));
        c.record("g", "t", 106, &waits(&[1.0, 2.0, 30.0, 40.0]));
        c.record("g", "t", 112, &waits(&[20.0]));
        c.record("g", "t", 113, &waits(&[80.0]));
        c.record("g", "u", 106, &waits(&[80.0]));
        let w = c.window("g", 60, 120);
        assert_eq!(
            w.executions, 3,
            "two at 106, one in the drain at 112: {w:?}"
        );
        assert!((w.wait_sum_ns - 90e6).abs() < 2e6, "{w:?}");
        assert!((w.wait_max_ns - 40e6).abs() < 1e6, "{w:?}");
        assert_eq!(c.window("g", 5, 120).executions, 0, "older than the window");
        assert_eq!(c.totals["g"].executions, 3);
        c.note("g", "t", 130, true, budget);
        c.record("g", "t", 131, &waits(&[15.0]));
        assert_eq!(c.totals["g"].executions, 4, "an open interval");
        c.remove_graph("g");
        assert_eq!(c.window("g", 600, 140).executions, 0);
    }
}
