//! The latest gauges per replica (`in_flight`, and what tasks report through the `exec`
//! protocol), for scaling signals. Bounded: a replica keeps at most `MAX_PER_REPLICA` names,
//! and replicas not heard from for `STALE_S` are forgotten.

use std::collections::HashMap;

/// Names kept per replica.
pub const MAX_PER_REPLICA: usize = 32;
/// A replica's gauges older than this are gone (it is).
pub const STALE_S: u64 = 60;

#[derive(Debug, Default)]
struct Replica {
    task: String,
    at_s: u64,
    values: HashMap<String, f64>,
}

#[derive(Debug, Default)]
pub struct Gauges {
    by_replica: HashMap<(String, String), Replica>,
}

impl Gauges {
    pub fn record(
        &mut self,
        graph_id: &str,
        task: &str,
        replica: &str,
        name: &str,
        value: f64,
        now_s: u64,
    ) {
        if !value.is_finite() {
            return;
        }
        let r = self
            .by_replica
            .entry((graph_id.to_string(), replica.to_string()))
            .or_default();
        r.task = task.to_string();
        r.at_s = now_s;
        if r.values.len() < MAX_PER_REPLICA || r.values.contains_key(name) {
            r.values.insert(name.to_string(), value);
        }
        if self.by_replica.len() > 1024 {
            self.by_replica
                .retain(|_, r| r.at_s.saturating_add(STALE_S) >= now_s);
        }
    }

    /// `name` summed over `replicas` of `graph_id` that report it, and how many do.
    pub fn total(&self, graph_id: &str, replicas: &[&str], name: &str, now_s: u64) -> (f64, usize) {
        let mut sum = 0.0;
        let mut n = 0;
        for id in replicas {
            let Some(r) = self.by_replica.get(&(graph_id.to_string(), id.to_string())) else {
                continue;
            };
            if r.at_s.saturating_add(STALE_S) < now_s {
                continue;
            }
            if let Some(v) = r.values.get(name) {
                sum += v;
                n += 1;
            }
        }
        (sum, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_over_the_replicas_that_report_and_are_fresh() {
        let mut g = Gauges::default();
        g.record("g1", "t", "g1.t.r1", "in_flight", 3.0, 100);
        g.record("g1", "t", "g1.t.r2", "in_flight", 5.0, 100);
        g.record("g1", "t", "g1.t.r2", "kv", 0.5, 100);
        g.record("g1", "t", "g1.t.r3", "in_flight", 9.0, 10);
        let ids = ["g1.t.r1", "g1.t.r2", "g1.t.r3"];
        assert_eq!(
            g.total("g1", &ids, "in_flight", 100),
            (8.0, 2),
            "r3 is stale"
        );
        assert_eq!(g.total("g1", &ids, "kv", 100), (0.5, 1));
        assert_eq!(g.total("g2", &ids, "in_flight", 100), (0.0, 0));
        g.record("g1", "t", "g1.t.r1", "bad", f64::NAN, 100);
        assert_eq!(g.total("g1", &ids, "bad", 100), (0.0, 0));
    }
}
