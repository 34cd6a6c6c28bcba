//! Hedged invocations: when an ingress sends an invocation again (after a fixed delay, or the
//! graph's recent end-to-end p95 here) and the token bucket that keeps hedges within their
//! budget ("The Tail at Scale": defer the second request until the first has been outstanding
//! longer than the 95th percentile, for a few percent more requests).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// Latencies kept per graph for its p95.
const RECENT: usize = 512;
/// A p95 needs this many invocations before it is trusted (no hedging before).
const MIN_SAMPLES: usize = 50;
/// The p95 is recomputed every this many invocations.
const RECOMPUTE_EVERY: u32 = 32;
/// Hedges that may be saved up (a burst after a quiet spell).
const BURST: f64 = 10.0;

#[derive(Debug, Default)]
struct Graph {
    recent: VecDeque<u32>,
    p95_us: Option<u32>,
    since: u32,
    tokens: f64,
}

/// Hedging state of one ingress, per graph, with its counters.
#[derive(Debug, Default)]
pub struct Hedging {
    graphs: RefCell<HashMap<Rc<str>, Graph>>,
    /// Hedges sent.
    pub sent: Cell<u64>,
    /// Invocations answered first by their hedge.
    pub won: Cell<u64>,
    /// Hedges wanted but not sent: the budget was spent (or no other replica to send to).
    pub denied: Cell<u64>,
}

impl Hedging {
    /// One invocation admitted: it earns `budget` of a hedge. Returns the delay after which
    /// it is hedged: `fixed`, or the graph's recent p95 (`None` until there are enough).
    pub fn admit(&self, graph: &Rc<str>, budget: f64, fixed: Option<Duration>) -> Option<Duration> {
        let mut graphs = self.graphs.borrow_mut();
        let g = graphs.entry(graph.clone()).or_default();
        g.tokens = (g.tokens + budget.clamp(0.0, 1.0)).min(BURST);
        fixed.or_else(|| g.p95_us.map(|us| Duration::from_micros(u64::from(us))))
    }

    /// Spends a hedge of `graph`'s budget, if there is one.
    pub fn take(&self, graph: &str) -> bool {
        let mut graphs = self.graphs.borrow_mut();
        match graphs.get_mut(graph) {
            Some(g) if g.tokens >= 1.0 => {
                g.tokens -= 1.0;
                true
            }
            _ => {
                self.denied.set(self.denied.get() + 1);
                false
            }
        }
    }

    /// An invocation of `graph` answered after `latency`.
    pub fn record(&self, graph: &str, latency: Duration) {
        let mut graphs = self.graphs.borrow_mut();
        let Some(g) = graphs.get_mut(graph) else {
            return;
        };
        if g.recent.len() == RECENT {
            g.recent.pop_front();
        }
        g.recent
            .push_back(latency.as_micros().min(u128::from(u32::MAX)) as u32);
        g.since += 1;
        if g.recent.len() >= MIN_SAMPLES && (g.p95_us.is_none() || g.since >= RECOMPUTE_EVERY) {
            g.since = 0;
            let mut v: Vec<u32> = g.recent.iter().copied().collect();
            let k = (v.len() * 95 / 100).min(v.len() - 1);
            let (_, p95, _) = v.select_nth_unstable(k);
            g.p95_us = Some(*p95);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_is_the_recent_p95_and_the_budget_is_a_token_bucket() {
        let h = Hedging::default();
        let g: Rc<str> = "g1".into();
        assert_eq!(h.admit(&g, 0.05, None), None, "no p95 yet");
        for i in 0..100u64 {
            h.record(
                "g1",
                Duration::from_millis(if i % 20 == 0 { 100 } else { 10 + i % 5 }),
            );
        }
        let d = h.admit(&g, 0.05, None).expect("a p95");
        assert!(
            d >= Duration::from_millis(13) && d <= Duration::from_millis(100),
            "{d:?}"
        );
        let fixed = Some(Duration::from_millis(7));
        assert_eq!(h.admit(&g, 0.05, fixed), fixed);
        // 102 admissions at 5% earned 5.1 hedges: five are sent, the sixth is denied.
        for _ in 0..99 {
            h.admit(&g, 0.05, None);
        }
        let sent = (0..6).filter(|_| h.take("g1")).count();
        assert_eq!((sent, h.denied.get()), (5, 1));
        // Savings are capped.
        for _ in 0..10_000 {
            h.admit(&g, 0.05, None);
        }
        assert_eq!((0..20).filter(|_| h.take("g1")).count(), BURST as usize);
    }
}
