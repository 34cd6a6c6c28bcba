//! What the engine's pass knows of what is coming: the control node's forecasting as it runs
//! there (series for the tasks of graphs under `[scaling.predictive]`, fed from the engine's
//! monitor; no stored history: nothing before the simulation is seen), or the oracle's
//! reading of the arrivals themselves.

use super::{Engine, NS};
use std::time::Duration;

impl Engine<'_> {
    pub(super) fn forecast(&mut self) {
        let now_ms = self.now / 1_000_000;
        self.forecasting.track(&self.snap, now_ms);
        for (g, t, ..) in self.forecasting.unseeded() {
            self.forecasting.seed(&g, &t, &[], &[]);
        }
        self.forecasting.read(
            &self.monitor,
            &mut self.snap,
            now_ms,
            Duration::from_nanos(self.now),
        );
    }

    /// The oracle's reading: each task's arrival rate is the highest policy-window average
    /// of the coming lead time, warm-up and tick, with no backlog.
    pub(super) fn foresee(&mut self) {
        let ahead = self.p.lead.mean() + self.p.warmup_s + self.p.tick_s;
        let from = (self.now / NS) as usize;
        for (i, svc) in self.services.iter().enumerate() {
            let Some(d) = self.snap.deployment_mut(&svc.record.id) else {
                continue;
            };
            let window = svc
                .record
                .graph
                .scaling
                .as_ref()
                .map_or(10, |s| (s.window_ns / NS).max(1)) as usize;
            let counts = &self.counts[i];
            let to = (from + ahead.ceil() as usize).min(counts.len());
            let mut sum: u64 = counts[from.min(to)..(from + window).min(counts.len())]
                .iter()
                .map(|c| u64::from(*c))
                .sum();
            let mut best = sum;
            for s in from..to {
                // Slide the window one second on.
                sum -= u64::from(counts[s]);
                sum += counts.get(s + window).map_or(0, |c| u64::from(*c));
                best = best.max(sum);
            }
            let rate = best as f64 / window as f64;
            for (t, task) in svc.record.graph.tasks.iter().enumerate() {
                let l = d.load.entry(task.id.clone()).or_default();
                l.arrivals_per_s = rate;
                l.service_s = svc.service[t].mean();
                l.queue_s = 0.0;
            }
        }
    }
}
