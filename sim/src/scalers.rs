//! The scalers a simulated service runs under: Knative's KPA (the decision crate's `kpa`) and
//! an oracle that knows the future arrivals.

use crate::queue::{Observation, Scaler};
use prescient_policy::kpa::{KpaConfig, KpaState};
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
        let span = self.service_s.ceil().max(1.0) as usize;
        let from = o.now.floor() as usize;
        let to = ((o.now + self.lead_s + self.tick_s).ceil() as usize).min(self.counts.len());
        (from..to)
            .map(|s| {
                let lo = (s + 1).saturating_sub(span);
                self.counts[lo..=s.min(self.counts.len() - 1)]
                    .iter()
                    .map(|c| u64::from(*c))
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(1)
            .clamp(1, u64::from(u32::MAX)) as u32
    }
}
