//! Hedged invocations end to end with real processes: `prescient bench hedging` (control node,
//! three agents, three replicas of a task with 5% stragglers) with short phases and loose
//! bounds: hedging cuts the stragglers' p99, costs a few percent more executions, and nothing
//! fails or answers twice (the load generator counts one reply per invocation).

mod common;

use common::*;
use std::process::Command;

fn bench() -> serde_json::Value {
    let out = Command::new(CLI)
        .args(["bench", "hedging", "--seconds", "5"])
        .output()
        .expect("runs the bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn hedging_cuts_the_stragglers_tail_within_its_budget() {
    // Five seconds hold ~25 stragglers; on a loaded two-core machine a phase can come out
    // without a visible tail (its p99 near the healthy one), which measures nothing, or with
    // a hedged phase whose own scheduling noise hides the cut (seen once: 0.75x): such a run
    // is repeated once, and the second is judged whatever it shows.
    let mut r = bench();
    let p99 = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    let no_tail = p99(&r, "stragglers_p99_us") < 1.5 * p99(&r, "healthy_p99_us");
    let no_cut = p99(&r, "hedged_p99_us") >= 0.7 * p99(&r, "stragglers_p99_us");
    if no_tail || no_cut {
        eprintln!("no straggler tail or no visible cut in this run, repeated once: {r}");
        r = bench();
    }
    let show = serde_json::to_string_pretty(&r).unwrap_or_default();
    let phases = r["phases"].as_array().expect("phases");
    for p in phases {
        assert_eq!(p["errors"], 0, "{show}");
        assert!(p["invocations"].as_u64().unwrap_or(0) >= 300, "{show}");
    }
    let stragglers = r["stragglers_p99_us"].as_f64().expect("p99");
    let hedged = r["hedged_p99_us"].as_f64().expect("p99");
    assert!(hedged < 0.7 * stragglers, "{show}");
    let extra = r["hedge_extra_executions"].as_f64().expect("extra");
    assert!(extra > 0.0 && extra <= 0.12, "{show}");
    assert_eq!(
        phases[1]["extra_executions"], 0.0,
        "no hedges without hedge = true: {show}"
    );
}
