//! Knative's autoscaler (KPA) as a pure state machine, so the simulator can compare Prescient's
//! policies with what users run today: concurrency (in service + queued) averaged per tick;
//! desired = ⌈stable-window average ÷ target⌉; panic when the panic-window average ÷ target
//! reaches twice the ready replicas; while panicking never scale down and hold the highest
//! panic desire until the stable window has passed since the last trigger; scale down at most
//! by `max_scale_down` per tick; at least `min_replicas`.

use std::collections::VecDeque;
use std::time::Duration;

/// KPA's knobs (Knative's defaults where it has them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KpaConfig {
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// Concurrency per replica aimed for: container concurrency × target utilisation.
    pub target: f64,
    /// Panic when the panic average asks for this many times the ready replicas.
    pub panic_threshold: f64,
    /// The most a tick may divide the replica count by.
    pub max_scale_down: f64,
    pub min_replicas: u32,
}

impl Default for KpaConfig {
    fn default() -> Self {
        KpaConfig {
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            target: 0.7,
            panic_threshold: 2.0,
            max_scale_down: 2.0,
            min_replicas: 1,
        }
    }
}

/// What KPA remembers between ticks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KpaState {
    /// (tick time, the tick's average concurrency), oldest first, one stable window long.
    history: VecDeque<(Duration, f64)>,
    /// Panic mode ends at this time (none: not panicking).
    panic_until: Option<Duration>,
    /// The highest desire seen while panicking.
    panic_desired: u32,
}

impl KpaState {
    fn average(&self, now: Duration, window: Duration) -> Option<f64> {
        let from = now.saturating_sub(window);
        let (sum, n) = self
            .history
            .iter()
            .filter(|(t, _)| *t > from)
            .fold((0.0, 0u32), |(s, n), (_, c)| (s + c, n + 1));
        (n > 0).then(|| sum / f64::from(n))
    }

    /// One tick at `now`: the tick's average concurrency, the replicas ready and the replicas
    /// there are (ready and on their way); returns the replicas wanted.
    pub fn tick(
        &mut self,
        config: &KpaConfig,
        now: Duration,
        concurrency: f64,
        ready: u32,
        current: u32,
    ) -> u32 {
        self.history.push_back((now, concurrency.max(0.0)));
        while self
            .history
            .front()
            .is_some_and(|(t, _)| *t + config.stable_window <= now)
        {
            self.history.pop_front();
        }
        let target = config.target.max(1e-9);
        let stable = self.average(now, config.stable_window).unwrap_or(0.0);
        let panic = self.average(now, config.panic_window).unwrap_or(0.0);
        let stable_desired = (stable / target).ceil() as u32;
        let panic_desired = (panic / target).ceil() as u32;
        if panic / target >= config.panic_threshold * f64::from(ready.max(1)) {
            self.panic_until = Some(now + config.stable_window);
            self.panic_desired = self.panic_desired.max(panic_desired);
        } else if self.panic_until.is_some_and(|until| now >= until) {
            self.panic_until = None;
            self.panic_desired = 0;
        }
        let mut desired = if self.panic_until.is_some() {
            // Never scale down while panicking.
            self.panic_desired.max(panic_desired).max(current)
        } else {
            stable_desired
        };
        let floor = (f64::from(current) / config.max_scale_down).ceil() as u32;
        desired = desired.max(floor).max(config.min_replicas);
        if self.panic_until.is_some() {
            self.panic_desired = self.panic_desired.max(desired);
        }
        desired
    }

    pub fn panicking(&self) -> bool {
        self.panic_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn steady_load_asks_for_its_stable_average_over_the_target() {
        let c = KpaConfig::default();
        let mut k = KpaState::default();
        let mut d = 0;
        for t in (2..=120).step_by(2) {
            d = k.tick(&c, s(t), 7.0, 10, 10);
        }
        assert_eq!(d, 10, "7 / 0.7");
        assert!(!k.panicking());
    }

    #[test]
    fn a_burst_panics_holds_and_then_scales_down_at_most_by_half_per_tick() {
        let c = KpaConfig::default();
        let mut k = KpaState::default();
        for t in (2..=60).step_by(2) {
            k.tick(&c, s(t), 0.7, 1, 1);
        }
        // 14 in flight on 1 ready replica: 20 wanted ≥ 2 × 1 → panic.
        let d = k.tick(&c, s(62), 14.0, 1, 1);
        assert!(k.panicking());
        assert!(d >= 7, "panic average (0.7, 0.7, 14) / 0.7 → {d}");
        // The burst ends: while panicking, never below what it had.
        let held = k.tick(&c, s(64), 0.0, d, d);
        assert!(held >= d, "{held} < {d}");
        // 60 s after the last trigger the panic ends; then down by at most half per tick.
        let mut cur = held;
        let mut t = 66;
        while k.panicking() {
            cur = k.tick(&c, s(t), 0.0, cur, cur);
            t += 2;
            assert!(t < 200);
        }
        assert!(t >= 122, "held for the stable window: ended at {t}");
        let next = k.tick(&c, s(t), 0.0, cur, cur);
        assert!(next * 2 >= cur, "{cur} -> {next}");
        let mut last = next;
        for t in (t + 2..t + 80).step_by(2) {
            last = k.tick(&c, s(t), 0.0, last, last);
        }
        assert_eq!(last, 1, "at least one replica");
    }
}
