//! Recent real inputs per task, sampled by workers (one execution's a second at most each),
//! kept so a new replica of the task can warm up on them. Bounded: `KEEP` per task, each at most
//! what workers sample (64 KiB).

use std::collections::{HashMap, VecDeque};

/// Samples kept per task (the newest).
pub const KEEP: usize = 8;

/// One execution's inputs, in port order.
pub type Sample = Vec<Vec<u8>>;

#[derive(Debug, Default)]
pub struct InputSamples {
    by_task: HashMap<(String, String), VecDeque<Sample>>,
}

impl InputSamples {
    pub fn record(&mut self, graph_id: &str, task: &str, inputs: Sample) {
        let ring = self
            .by_task
            .entry((graph_id.to_string(), task.to_string()))
            .or_default();
        if ring.len() == KEEP {
            ring.pop_front();
        }
        ring.push_back(inputs);
    }

    /// `task`'s recent samples, oldest first.
    pub fn of(&self, graph_id: &str, task: &str) -> Vec<Sample> {
        self.by_task
            .get(&(graph_id.to_string(), task.to_string()))
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a removed graph's samples.
    pub fn remove_graph(&mut self, graph_id: &str) {
        self.by_task.retain(|(g, _), _| g != graph_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_are_kept_per_task() {
        let mut s = InputSamples::default();
        for i in 0..(KEEP as u8 + 3) {
            s.record("g1", "t", vec![vec![i]]);
        }
        s.record("g1", "u", vec![vec![9], vec![10]]);
        let t = s.of("g1", "t");
        assert_eq!(t.len(), KEEP);
        assert_eq!(t[0], vec![vec![3u8]]);
        assert_eq!(s.of("g1", "u"), vec![vec![vec![9u8], vec![10]]]);
        s.remove_graph("g1");
        assert!(s.of("g1", "t").is_empty());
    }
}
