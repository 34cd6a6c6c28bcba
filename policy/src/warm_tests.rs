//! The warm pool on hand-built snapshots: `warm_vms` kept on microVM hosts only, stable from
//! pass to pass, a placement taking the warm VM waiting for it, and the plan's next orders
//! booted ahead.

use crate::observe;
use crate::scaling_tests::{cluster, s, step};
use crate::snapshot::{Capacity, Snapshot, TaskForecast, WarmShape};
use crate::Action;
use prescient_schemas::scaling::{Predictive, PredictiveMode};
use prescient_schemas::ScalingPolicy;

/// `scaling_tests`' cluster (a1..a3, processes) plus two microVM hosts v1 and v2.
fn with_vm_hosts(policy: ScalingPolicy) -> Snapshot {
    let mut snap = cluster(policy);
    for h in ["v1", "v2"] {
        let capacity = Capacity {
            cpu_millicores: 8000,
            memory_bytes: 16 << 30,
            ..Capacity::default()
        };
        observe::registered_with_pool(&mut snap, h, capacity, vec![], s(0.0));
        snap.hosts.get_mut(h).expect("added").reported = None;
    }
    snap
}

fn pools(actions: &[Action]) -> Vec<(String, Vec<WarmShape>, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::WarmPool {
                host,
                shapes,
                reason,
            } => Some((host.clone(), shapes.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

fn policy(warm: u32) -> ScalingPolicy {
    ScalingPolicy {
        max_replicas: 6,
        warm_vms: warm,
        ..ScalingPolicy::default()
    }
}

#[test]
fn warm_vms_are_kept_on_microvm_hosts_only_and_told_once() {
    let mut snap = with_vm_hosts(policy(1));
    let actions = step(&mut snap, s(0.0));
    let told = pools(&actions);
    // Two tasks of one shape (100m, 64 MiB), one spare each, on the two microVM hosts.
    let total: u32 = told
        .iter()
        .flat_map(|(_, w, _)| w.iter().map(|w| w.count))
        .sum();
    assert_eq!(total, 2, "{told:?}");
    assert!(told.iter().all(|(h, ..)| h.starts_with('v')), "{told:?}");
    assert!(
        told.iter()
            .all(|(_, w, r)| w[0].cpu_millicores == 100 && r.contains("(warm_vms = 1)")),
        "{told:?}"
    );
    assert!(pools(&step(&mut snap, s(1.0))).is_empty(), "told once");
    // The agents boot them and say so; the targets do not move.
    for (h, w, _) in &told {
        observe::warm_reported(&mut snap, h, w.clone());
    }
    assert!(pools(&step(&mut snap, s(2.0))).is_empty(), "stable");
}

#[test]
fn a_new_replica_takes_the_warm_vm_waiting_for_it() {
    let mut snap = with_vm_hosts(policy(0));
    step(&mut snap, s(0.0));
    // A warm VM of the tasks' shape waits on v2, which has less CPU free than the others.
    let shape = WarmShape {
        cpu_millicores: 100,
        memory_bytes: 64 << 20,
        count: 1,
    };
    observe::warm_reported(&mut snap, "v2", vec![shape]);
    snap.hosts
        .get_mut("v2")
        .expect("added")
        .capacity
        .cpu_millicores = 1000;
    let d = snap.deployment_mut("g1").expect("deployed");
    let bad = d
        .replicas
        .iter()
        .find(|r| r.task == "infer")
        .expect("placed");
    let (id, host) = (bad.id.clone(), bad.host.clone());
    // Gone (as if retired): the pass places one to make up the minimum.
    d.replicas.retain(|r| r.id != id);
    let actions = step(&mut snap, s(1.0));
    let placed: Vec<(String, String)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Place { host, reason, .. } => Some((host.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(placed.len(), 1, "{actions:?} (lost {id} on {host})");
    assert_eq!(placed[0].0, "v2", "{placed:?}");
    assert!(
        placed[0].1.contains("a warm VM of its shape waits there"),
        "{placed:?}"
    );
    assert_eq!(snap.hosts["v2"].warm[0].count, 0, "taken");
}

#[test]
fn the_plans_next_orders_are_booted_ahead() {
    let mut snap = with_vm_hosts(ScalingPolicy {
        max_replicas: 40,
        predictive: Predictive {
            mode: PredictiveMode::On,
            attainment: 0.99,
            lead_ns: 30_000_000_000,
            ..Predictive::default()
        },
        ..policy(0)
    });
    step(&mut snap, s(0.0));
    // 10/s for the lead time, then 400/s from +60 s: the floor holds few; the pool boots
    // what the plan orders next.
    let upper: Vec<f64> = (0..12).map(|i| if i < 6 { 10.0 } else { 400.0 }).collect();
    snap.deployment_mut("g1")
        .expect("deployed")
        .forecasts
        .insert(
            "infer".into(),
            TaskForecast {
                from: s(1.0),
                step: s(10.0),
                point_per_s: upper.iter().map(|u| u * 0.8).collect(),
                upper_per_s: upper,
                arrival_scv: 1.0,
                method: "holt-winters",
            },
        );
    let told = pools(&step(&mut snap, s(1.0)));
    let total: u32 = told
        .iter()
        .flat_map(|(_, w, _)| w.iter().map(|w| w.count))
        .sum();
    assert!(total > 4, "{told:?}");
    assert!(
        told.iter()
            .all(|(_, _, r)| r.contains("g1.infer (the plan needs") && r.contains("+60 s")),
        "{told:?}"
    );
    // Off, the same forecast keeps nothing warm.
    let mut off = with_vm_hosts(policy(0));
    step(&mut off, s(0.0));
    assert!(pools(&step(&mut off, s(1.0))).is_empty());
}
