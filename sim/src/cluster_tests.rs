//! The whole-cluster simulation on small hand-made fleets: determinism, faults, the oracle.

use crate::cluster::{run, Mode, Outcome, Params};
use crate::fleet::{arrivals_from_counts, hosts, one_task_graph, Dist, Fault, Service};
use prescient_policy::balance::Rng;

fn service(id: &str, counts: &[u32], service_s: f64, seed: u64) -> Service {
    Service {
        record: one_task_graph(id, service_s),
        arrivals: arrivals_from_counts(counts, &Rng::new(seed)),
        service: vec![Dist::Fixed(service_s)],
        objective_s: 2.0 * service_s,
    }
}

fn params(len_s: f64, lead_s: f64) -> Params {
    Params {
        tick_s: 2.0,
        lead: Dist::Fixed(lead_s),
        warmup_s: 0.0,
        boot_failure: 0.0,
        faults: Vec::new(),
        mode: Mode::Reactive,
        start_s: 0.0,
        measure_from_s: len_s / 3.0,
        end_s: len_s,
        seed: 1,
        progress: false,
    }
}

/// Steady load, then a step up to `high` per second at `step_s`.
fn step(len: usize, low: u32, high: u32, step_s: usize) -> Vec<u32> {
    (0..len)
        .map(|s| if s < step_s { low } else { high })
        .collect()
}

fn decided(o: &Outcome, kind: &str) -> u64 {
    o.decisions.get(kind).copied().unwrap_or(0)
}

#[test]
fn a_run_is_deterministic_for_a_seed_and_the_controller_scales_a_step() {
    let svcs = [
        service("a", &step(900, 2, 12, 450), 0.5, 1),
        service("b", &step(900, 1, 1, 0), 0.2, 2),
    ];
    let fleet = hosts(4, 4, 16);
    let p = params(900.0, 2.0);
    let one = run(&fleet, &svcs, &p);
    let two = run(&fleet, &svcs, &p);
    assert_eq!(
        (
            one.requests,
            one.within_objective,
            one.cold,
            one.vm_seconds,
            &one.decisions
        ),
        (
            two.requests,
            two.within_objective,
            two.cold,
            two.vm_seconds,
            &two.decisions
        )
    );
    assert_eq!(one.minutes, two.minutes);
    // 2/s then 12/s of 0.5 s requests: ~1 then ~6 busy replicas; the controller follows.
    assert!(decided(&one, "scale-out") >= 1, "{:?}", one.decisions);
    assert!(one.max_replicas >= 7, "{}", one.max_replicas);
    let pct = one.within_objective as f64 / one.requests as f64;
    assert!(pct > 0.9, "{pct} {:?}", one.decisions);
    // The measured part is the last two thirds: (450-300)·2 + 450·12 + 600·1 invocations.
    let expected = 150 * 2 + 450 * 12 + 600;
    assert!(
        (one.requests as i64 - expected).abs() < 60,
        "{}",
        one.requests
    );
    let mut other = p.clone();
    other.seed = 2;
    let three = run(&fleet, &svcs, &other);
    assert_ne!(
        one.latency_us.mean(),
        three.latency_us.mean(),
        "another seed, other draws"
    );
}

#[test]
fn a_host_that_dies_is_marked_lost_and_its_replicas_placed_elsewhere() {
    let svcs = [service("a", &step(600, 6, 6, 0), 0.5, 1)];
    let fleet = hosts(3, 4, 16);
    let mut p = params(600.0, 2.0);
    p.measure_from_s = 100.0;
    // Where the first replica went: the same run without the fault says.
    let base = run(&fleet, &svcs, &p);
    assert_eq!(base.failed, 0);
    p.faults = vec![Fault::Dies {
        host: "h1".into(),
        at_s: 300.0,
    }];
    let o = run(&fleet, &svcs, &p);
    assert_eq!(decided(&o, "host-died"), 1);
    assert_eq!(decided(&o, "lost"), 1, "{:?}", o.decisions);
    // Lost with it: what h1's replicas held (a handful), never the rest.
    assert!(o.failed < 20, "{}", o.failed);
    assert!(
        decided(&o, "place") > decided(&base, "place"),
        "{:?}",
        o.decisions
    );
    // The last minutes are served as before the fault.
    let last = &o.minutes[o.minutes.len() - 3..];
    for m in last {
        assert!(
            m.completed > 300 && m.within_objective * 10 >= m.completed * 9,
            "{m:?}"
        );
    }
}

#[test]
fn a_slowed_host_gets_its_replicas_replaced_and_failed_boots_are_retried() {
    let svcs = [service("a", &step(900, 8, 8, 0), 0.3, 1)];
    let fleet = hosts(4, 2, 8);
    let mut p = params(900.0, 2.0);
    p.faults = (1..=4)
        .map(|h| Fault::Slow {
            host: format!("h{h}"),
            factor: if h == 1 { 5.0 } else { 1.0 },
            from_s: 400.0,
            to_s: 900.0,
        })
        .collect();
    let o = run(&fleet, &svcs, &p);
    assert!(decided(&o, "replace") >= 1, "{:?}", o.decisions);
    assert!(decided(&o, "shed") >= 1, "{:?}", o.decisions);
    // The same fault with the triggers off (nothing is ever slow enough): worse.
    let mut off = svcs.clone();
    if let Some(s) = off[0].record.graph.scaling.as_mut() {
        s.slow_factor = 1e6;
    }
    let kept = run(&fleet, &off, &p);
    assert_eq!(decided(&kept, "replace"), 0, "{:?}", kept.decisions);
    let during = |x: &Outcome| {
        let m = x.minutes.iter().filter(|m| m.minute >= 7);
        let (w, c) = m.fold((0, 0), |(w, c), m| {
            (w + m.within_objective, c + m.completed)
        });
        w as f64 / c as f64
    };
    assert!(
        during(&o) > during(&kept),
        "{} {}",
        during(&o),
        during(&kept)
    );

    let mut p = params(600.0, 2.0);
    p.boot_failure = 0.3;
    let o = run(&fleet, &svcs, &p);
    assert!(decided(&o, "boot-failed") >= 1, "{:?}", o.decisions);
    let pct = o.within_objective as f64 / o.requests as f64;
    assert!(pct > 0.8, "{pct} {:?}", o.decisions);
}

#[test]
fn the_oracle_orders_ahead_of_a_step_and_reactive_arrives_late() {
    let svcs = [service("a", &step(3600, 2, 16, 2700), 0.5, 1)];
    let fleet = hosts(4, 8, 32);
    let p = params(3600.0, 30.0);
    let reactive = run(&fleet, &svcs, &p);
    let mut o = p.clone();
    o.mode = Mode::Oracle;
    let oracle = run(&fleet, &svcs, &o);
    assert_eq!(reactive.requests, oracle.requests, "the same arrivals");
    let pct = |x: &Outcome| x.within_objective as f64 / x.requests as f64;
    assert!(
        pct(&oracle) > pct(&reactive),
        "{} {}",
        pct(&oracle),
        pct(&reactive)
    );
    assert!(pct(&oracle) > 0.97, "{}", pct(&oracle));
}

/// `service` with its graph under `[scaling.predictive]` in `mode`.
fn predicted(counts: &[u32], mode: prescient_policy::predictive::Mode) -> Service {
    let mut s = service("a", counts, 0.5, 1);
    if let Some(p) = s.record.graph.scaling.as_mut() {
        p.predictive.mode = mode;
    }
    s
}

#[test]
fn the_control_nodes_forecasting_runs_here_and_forecast_only_is_told_not_done() {
    use prescient_policy::predictive::Mode as Predictive;
    // A slow ramp from 2/s to 20/s of 0.5 s requests over an hour.
    let ramp: Vec<u32> = (0..3600).map(|s| 2 + (18 * s / 3600) as u32).collect();
    let fleet = hosts(4, 8, 32);
    let p = params(3600.0, 30.0);
    let off = run(&fleet, &[predicted(&ramp, Predictive::Off)], &p);
    let told = run(&fleet, &[predicted(&ramp, Predictive::ForecastOnly)], &p);
    let on = run(&fleet, &[predicted(&ramp, Predictive::On)], &p);
    assert_eq!(decided(&off, "forecast-only"), 0, "{:?}", off.decisions);
    assert!(decided(&told, "forecast-only") > 0, "{:?}", told.decisions);
    // Told, not done: the same replicas as without the forecast.
    assert_eq!(told.vm_seconds, off.vm_seconds);
    // On: the plan holds more than reactive sizing for the forecast's upper quantile.
    assert!(
        on.vm_seconds > off.vm_seconds,
        "{} {}",
        on.vm_seconds,
        off.vm_seconds
    );
    let pct = |x: &Outcome| x.within_objective as f64 / x.requests as f64;
    assert!(pct(&on) >= pct(&off), "{} {}", pct(&on), pct(&off));
}
