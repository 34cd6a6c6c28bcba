//! Sizing with `[scaling.predictive]` on hand-built snapshots: the plan's floor ahead of a
//! forecast ramp, no scale-in below it, `forecast-only` telling once per change, `off`
//! ignoring the forecast, and the lead time measured on the task's hosts.

use crate::scaling_tests::{cluster, count, load, policy, s, sizing, step};
use crate::snapshot::{LeadTime, Snapshot, TaskForecast};
use crate::{predictive, Action};
use prescient_schemas::scaling::{Predictive, PredictiveMode};
use prescient_schemas::ScalingPolicy;
use std::time::Duration;

fn with(mode: PredictiveMode) -> ScalingPolicy {
    ScalingPolicy {
        max_replicas: 40,
        predictive: Predictive {
            mode,
            attainment: 0.99,
            lead_ns: 30_000_000_000,
            ..Predictive::default()
        },
        ..policy()
    }
}

/// `infer`'s forecast from `from`: 10 s steps, 10/s for three steps, then `then`/s.
fn forecast(snap: &mut Snapshot, from: Duration, then: f64) {
    let upper: Vec<f64> = (0..12).map(|i| if i < 3 { 10.0 } else { then }).collect();
    snap.deployment_mut("g1")
        .expect("deployed")
        .forecasts
        .insert(
            "infer".into(),
            TaskForecast {
                from,
                step: s(10.0),
                point_per_s: upper.iter().map(|u| u * 0.8).collect(),
                upper_per_s: upper,
                arrival_scv: 1.0,
                method: "holt-winters",
            },
        );
}

#[test]
fn the_plan_orders_ahead_of_a_forecast_ramp_and_says_why() {
    let mut snap = cluster(with(PredictiveMode::On));
    step(&mut snap, s(0.0));
    // 10/s × 20 ms now: reactive sizing wants 1 (0.29). The forecast goes to 400/s in 30 s,
    // within the 30 s lead: 8 erlangs, which M/M/c sizes above 8 for 99% within 20 ms.
    load(&mut snap, "infer", 10.0, 20.0);
    forecast(&mut snap, s(1.0), 400.0);
    let actions = sizing(step(&mut snap, s(1.0)));
    let Some(Action::ScaleOut {
        task,
        from,
        to,
        reason,
        ..
    }) = actions.first()
    else {
        panic!("{actions:?}");
    };
    assert_eq!((task.as_str(), *from), ("infer", 1));
    assert!(*to > 8 && *to <= 16, "{to}");
    assert!(
        reason.contains("the plan needs")
            && reason.contains("400.00/s forecast (q90, holt-winters) from +30 s")
            && reason.contains("reactive sizing asks 1"),
        "{reason}"
    );
    let planned = count(&snap, "infer");
    // The ramp not yet here, load still low: nothing the plan needs is retired.
    load(&mut snap, "infer", 1.0, 20.0);
    forecast(&mut snap, s(100.0), 400.0);
    assert!(sizing(step(&mut snap, s(100.0))).is_empty());
    assert_eq!(count(&snap, "infer"), planned);
    // Once the forecast falls, scale-in resumes (one at a time, after the cooldown).
    forecast(&mut snap, s(140.0), 10.0);
    let actions = sizing(step(&mut snap, s(140.0)));
    assert!(
        matches!(actions.first(), Some(Action::ScaleIn { task, .. }) if task == "infer"),
        "{actions:?}"
    );
}

#[test]
fn forecast_only_tells_what_it_would_do_once_and_does_not_do_it() {
    let mut snap = cluster(with(PredictiveMode::ForecastOnly));
    step(&mut snap, s(0.0));
    load(&mut snap, "infer", 10.0, 20.0);
    forecast(&mut snap, s(1.0), 400.0);
    let actions = sizing(step(&mut snap, s(1.0)));
    let [Action::ForecastOnly {
        task,
        have,
        would,
        reason,
        ..
    }] = &actions[..]
    else {
        panic!("{actions:?}");
    };
    assert_eq!((task.as_str(), *have), ("infer", 1));
    assert!(*would > 8, "{would}");
    assert!(reason.contains("reactive sizing sets 1"), "{reason}");
    assert_eq!(count(&snap, "infer"), 1, "nothing placed");
    // The same plan again: not told again.
    assert!(sizing(step(&mut snap, s(3.0))).is_empty());
    // Off: the forecast is not read at all.
    let mut off = cluster(with(PredictiveMode::Off));
    step(&mut off, s(0.0));
    load(&mut off, "infer", 10.0, 20.0);
    forecast(&mut off, s(1.0), 400.0);
    assert!(sizing(step(&mut off, s(1.0))).is_empty());
}

#[test]
fn the_lead_time_is_the_tasks_measured_one_where_there_is_one() {
    let mut snap = cluster(with(PredictiveMode::On));
    step(&mut snap, s(0.0));
    let d = &snap.deployments["g1"];
    assert_eq!(
        predictive::task_lead(d, "infer", s(30.0)),
        s(30.0),
        "assumed"
    );
    let d = snap.deployment_mut("g1").expect("deployed");
    for (host, took) in [("a1", 2.0), ("a2", 3.0), ("a3", 9.0)] {
        d.lead_times.insert(
            ("infer".into(), host.into()),
            LeadTime {
                ready_after: s(took),
                warmup: s(0.5),
            },
        );
    }
    assert_eq!(
        predictive::task_lead(d, "infer", s(30.0)),
        s(9.0),
        "p90 of three"
    );
    assert_eq!(predictive::task_lead(d, "front", s(30.0)), s(30.0));
    // A short measured lead: a ramp 30 s away is not yet within it (the plan sizes the next
    // 19 s of 10/s alone); made at 21 s, its ramp (at 51 s) is within the lead at 33 s.
    load(&mut snap, "infer", 10.0, 20.0);
    forecast(&mut snap, s(1.0), 400.0);
    step(&mut snap, s(1.0));
    assert!(count(&snap, "infer") <= 3, "{}", count(&snap, "infer"));
    forecast(&mut snap, s(21.0), 400.0);
    step(&mut snap, s(31.0));
    assert!(count(&snap, "infer") <= 3, "{}", count(&snap, "infer"));
    step(&mut snap, s(33.0));
    assert!(count(&snap, "infer") > 8, "{}", count(&snap, "infer"));
}
