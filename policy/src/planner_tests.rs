//! The planner's queueing math against Erlang C tables and a simulated queue, its plan and
//! floor, and the combination's bounds.

use crate::balance::Rng;
use crate::planner::{
    self, erlang_c, replicas_for, wait_within, LeadTime, LeadTimes, Objective, Queue, Step,
};
use crate::predictive::{decide, Bounds, History, Mode};
use std::time::Duration;

const MM: Queue = Queue {
    service_s: 0.5,
    service_scv: 1.0,
    per_replica: 1,
    arrival_scv: 1.0,
};

#[test]
fn erlang_c_matches_the_tables() {
    // (servers, erlangs, probability of waiting), from the closed form's sums.
    for (c, a, want) in [
        (2, 1.0, 1.0 / 3.0),
        (5, 4.0, 0.554_112_554),
        (10, 8.0, 0.409_180_151),
        (20, 15.0, 0.160_429_387),
        (100, 90.0, 0.216_940_486),
    ] {
        let got = erlang_c(c, a);
        assert!(
            (got - want).abs() < 1e-6,
            "C({c}, {a}) = {got}, want {want}"
        );
    }
    assert_eq!(erlang_c(4, 4.0), 1.0, "unstable: everyone waits");
    assert_eq!(erlang_c(4, 0.0), 0.0);
    // Thousands of servers stay finite (no factorial overflow).
    let big = erlang_c(5000, 4900.0);
    assert!(big > 0.0 && big < 1.0, "{big}");
}

#[test]
fn the_service_level_is_the_closed_form() {
    // 10 servers, 16 req/s of 0.5 s: 1 − C·e^{−(cμ−λ)t}.
    let got = wait_within(10, 16.0, &MM, 0.1);
    assert!((got - 0.725_718_342).abs() < 1e-6, "{got}");
    assert_eq!(wait_within(8, 16.0, &MM, 10.0), 0.0, "unstable");
    assert_eq!(wait_within(1, 0.0, &MM, 0.0), 1.0, "nothing arrives");
}

/// P(wait ≤ t) of a FIFO c-server queue with Poisson arrivals, simulated.
fn simulated(c: usize, rate: f64, service: impl Fn(&Rng) -> f64, t: f64, n: usize) -> f64 {
    let rng = Rng::new(7);
    let mut free = vec![0.0f64; c];
    let mut now = 0.0;
    let mut within = 0;
    for _ in 0..n {
        now += -(1.0 - rng.unit()).ln() / rate;
        let (i, at) = free
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 0.0));
        let start = at.max(now);
        within += usize::from(start - now <= t);
        free[i] = start + service(&rng);
    }
    within as f64 / n as f64
}

#[test]
fn the_approximation_agrees_with_a_simulated_queue() {
    // M/M/c: exact; M/D/c: Allen–Cunneen's halved wait, within a few points.
    let exp = |r: &Rng| -(1.0 - r.unit()).ln() * 0.5;
    let det = |_: &Rng| 0.5;
    for (c, rate, t) in [(4, 6.0, 0.1), (10, 17.0, 0.05), (30, 55.0, 0.02)] {
        let mm = simulated(c, rate, exp, t, 400_000);
        let formula = wait_within(c as u32, rate, &MM, t);
        assert!(
            (mm - formula).abs() < 0.02,
            "M/M/{c} at {rate}: {mm} vs {formula}"
        );
        let md = simulated(c, rate, det, t, 400_000);
        let d = Queue {
            service_scv: 0.0,
            ..MM
        };
        let approx = wait_within(c as u32, rate, &d, t);
        assert!(
            (md - approx).abs() < 0.05,
            "M/D/{c} at {rate}: {md} vs {approx}"
        );
        assert!(approx > formula, "deterministic service waits less");
    }
}

#[test]
fn replicas_for_is_the_fewest_that_meet_the_objective() {
    let o = Objective {
        wait_s: 0.05,
        attainment: 0.99,
    };
    for rate in [0.1, 1.0, 7.0, 40.0, 300.0, 2000.0] {
        let r = replicas_for(rate, &MM, &o, 100_000);
        assert!(
            wait_within(r, rate, &MM, o.wait_s) >= o.attainment,
            "{rate}: {r}"
        );
        assert!(
            r == 1 || wait_within(r - 1, rate, &MM, o.wait_s) < o.attainment,
            "{rate}: {r}"
        );
        // More than the offered load, and by less at scale (pooling).
        assert!(f64::from(r) > rate * MM.service_s, "{rate}: {r}");
    }
    let at = |rate| f64::from(replicas_for(rate, &MM, &o, 100_000)) / (rate * MM.service_s);
    assert!(
        at(2000.0) < at(40.0) && at(40.0) < at(1.0),
        "headroom shrinks with scale"
    );
    assert_eq!(replicas_for(0.0, &MM, &o, 10), 0);
    assert_eq!(replicas_for(f64::NAN, &MM, &o, 10), 0);
    assert_eq!(replicas_for(1e9, &MM, &o, 10), 10, "capped at the maximum");
    // Four at once per replica: a quarter of the replicas, about.
    let four = Queue {
        per_replica: 4,
        ..MM
    };
    let r1 = replicas_for(300.0, &MM, &o, 100_000);
    let r4 = replicas_for(300.0, &four, &o, 100_000);
    assert!(r4 * 4 >= r1 && r4 * 4 < r1 + 4, "{r1} {r4}");
}

#[test]
fn the_floor_covers_every_step_until_a_new_replica_could_be_ready() {
    let s = Duration::from_secs;
    let o = Objective {
        wait_s: 0.05,
        attainment: 0.99,
    };
    let upper: Vec<(Duration, f64)> = (0..20)
        .map(|i| (s(i * 2), if i == 9 { 80.0 } else { 4.0 }))
        .collect();
    let plan: Vec<Step> = planner::plan(&upper, &MM, &o, 1000);
    let peak = plan[9].replicas;
    assert!(peak > plan[0].replicas);
    // The spike begins at 18 s: ordered from 18 − lead on, and kept until it has passed.
    let floor = |now, lead| planner::floor(&plan, s(now), s(lead), s(2)).unwrap();
    assert_eq!(floor(0, 10), plan[0].replicas, "not yet within the lead");
    assert_eq!(floor(8, 10), peak, "ordered one lead time ahead");
    assert_eq!(floor(18, 10), peak, "held through the step");
    assert_eq!(floor(20, 10), plan[10].replicas, "released after it");
    assert_eq!(
        planner::floor(&plan, s(100), s(10), s(2)),
        None,
        "past the plan"
    );
}

#[test]
fn lead_times_are_a_high_quantile_per_host_then_backend() {
    let mut l = LeadTime::default();
    let d = Duration::from_millis;
    assert_eq!(l.estimate(d(5000)), d(5000));
    for ms in 1..=100 {
        l.observe(d(ms * 10));
    }
    assert_eq!(l.observed(), LeadTime::KEPT, "bounded");
    // The last 32 are 690..=1000 ms: their 90th percentile is the 29th.
    assert_eq!(l.estimate(d(5000)), d(970));
    let mut all = LeadTimes::default();
    all.observe("qemu", "h1", d(1800));
    all.observe("process", "h1", d(300));
    assert_eq!(all.estimate("qemu", Some("h1"), d(0)), d(1800));
    assert_eq!(
        all.estimate("qemu", Some("h2"), d(0)),
        d(1800),
        "the backend's"
    );
    assert_eq!(
        all.estimate("microvm", Some("h1"), d(9)),
        d(9),
        "the default"
    );
}

#[test]
fn predictive_sets_the_floor_and_reactive_handles_surprises() {
    let b = Bounds::default();
    let h = History::default();
    let now = Duration::from_secs(1000);
    let d = decide(3, 2, Some(6), Mode::On, &b, &h, now);
    assert_eq!((d.desired, d.planned), (6, Some(6)), "{}", d.reason);
    let d = decide(3, 9, Some(6), Mode::On, &b, &h, now);
    assert_eq!(d.desired, 9, "a surprise above the plan");
    let d = decide(3, 2, None, Mode::On, &b, &h, now);
    assert_eq!(d.desired, 2, "no plan: reactive alone");
    // Forecast-only: the reactive desire acts, the plan's is told.
    let d = decide(3, 2, Some(6), Mode::ForecastOnly, &b, &h, now);
    assert_eq!((d.desired, d.would), (2, Some(6)), "{}", d.reason);
    assert!(d.reason.contains("would set 6"), "{}", d.reason);
    let d = decide(3, 2, Some(6), Mode::Off, &b, &h, now);
    assert_eq!((d.desired, d.planned, d.would), (2, None, None));
}

#[test]
fn bounds_limit_every_decision() {
    let now = Duration::from_secs(1000);
    let none = History::default();
    let b = Bounds {
        min: 2,
        max: 10,
        budget: Some(8),
        step_out: 3,
        step_in: 1,
        out_cooldown: Duration::from_secs(20),
        in_cooldown: Duration::from_secs(60),
    };
    let at = |current, reactive, floor, h: &History| {
        decide(current, reactive, floor, Mode::On, &b, h, now).desired
    };
    assert_eq!(at(4, 4, Some(20), &none), 7, "step out of 3");
    assert_eq!(at(7, 4, Some(20), &none), 8, "the budget below the maximum");
    assert_eq!(at(4, 0, Some(0), &none), 3, "step in of 1");
    assert_eq!(at(2, 0, None, &none), 2, "the minimum");
    assert_eq!(at(1, 0, None, &none), 2, "below the minimum: back to it");
    assert_eq!(
        at(12, 12, None, &none),
        8,
        "above the budget: back within it"
    );
    let recent_out = History {
        last_out: Some(now - Duration::from_secs(10)),
        last_in: None,
    };
    assert_eq!(at(4, 9, None, &recent_out), 4, "out cooldown");
    assert_eq!(
        at(4, 1, None, &recent_out),
        4,
        "no scale-in just after a change"
    );
    let long_ago = History {
        last_out: Some(now - Duration::from_secs(61)),
        last_in: Some(now - Duration::from_secs(70)),
    };
    assert_eq!(at(4, 1, None, &long_ago), 3);
    let d = decide(7, 4, Some(20), Mode::On, &b, &none, now);
    assert!(d.reason.contains("budget 8"), "{}", d.reason);
    let mut h = History::default();
    h.record(7, &d, now);
    assert_eq!(h.last_out, Some(now));
}

#[test]
fn dispersion_reads_poisson_as_one_bursts_above_and_ignores_a_trend() {
    let rng = Rng::new(3);
    // Poisson counts of mean 20 (by inversion): about 1.
    let poisson = |mean: f64| {
        let (mut k, mut p, mut cdf) = (0.0, (-mean).exp(), (-mean).exp());
        let u = rng.unit();
        while u > cdf && k < 10.0 * mean {
            k += 1.0;
            p *= mean / k;
            cdf += p;
        }
        k
    };
    let flat: Vec<f64> = (0..2000).map(|_| poisson(20.0)).collect();
    let d = planner::dispersion(&flat);
    assert!((d - 1.0).abs() < 0.15, "{d}");
    // The same arrivals in bunches of 4: four times as bursty.
    let bunched: Vec<f64> = (0..2000).map(|_| 4.0 * poisson(5.0)).collect();
    let d = planner::dispersion(&bunched);
    assert!((d - 4.0).abs() < 0.6, "{d}");
    // A steady ramp alone is not burstiness.
    let ramp: Vec<f64> = (0..2000).map(|i| 10.0 + i as f64 * 0.05).collect();
    assert!(planner::dispersion(&ramp) < 0.01);
    // Burstier arrivals need more replicas for the same objective.
    let o = Objective {
        wait_s: 0.5,
        attainment: 0.99,
    };
    let bursty = Queue {
        arrival_scv: 4.0,
        ..MM
    };
    assert!(replicas_for(100.0, &bursty, &o, 10_000) > replicas_for(100.0, &MM, &o, 10_000));
}
