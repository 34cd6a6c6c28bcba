//! The replacement triggers, the chain-objective trigger and chain-local placement on
//! hand-built snapshots; and a property over random replica health.

use crate::replace::Trigger;
use crate::scaling_tests::{cluster, count, load, policy, s, sizing, step};
use crate::snapshot::{ChainLoad, ReplicaHealth, Snapshot};
use crate::Action;
use prescient_schemas::ScalingPolicy;
use proptest::prelude::{prop, prop_assert, proptest};
use std::time::Duration;

fn health(snap: &mut Snapshot, replica: &str, exec_ms: f64, queue_ms: f64, throttled: f64) {
    let d = snap.deployment_mut("g1").expect("deployed");
    d.health.insert(
        replica.into(),
        ReplicaHealth {
            executions: 200,
            errors: 0,
            exec_p50_s: exec_ms / 1e3,
            queue_p50_s: queue_ms / 1e3,
            exec_p99_s: 2.0 * exec_ms / 1e3,
            queue_p99_s: 2.0 * queue_ms / 1e3,
            throttled_share: throttled,
        },
    );
}

fn calibrate(snap: &mut Snapshot, task: &str, exec_ms: f64) {
    let d = snap.deployment_mut("g1").expect("deployed");
    d.load.entry(task.into()).or_default().calibrated_s = exec_ms / 1e3;
}

fn replicas_of(snap: &Snapshot, task: &str) -> Vec<(String, String)> {
    snap.deployments["g1"]
        .replicas
        .iter()
        .filter(|r| r.task == task)
        .map(|r| (r.id.clone(), r.host.clone()))
        .collect()
}

fn replaces(actions: &[Action]) -> Vec<(String, Trigger, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Replace {
                replica,
                trigger,
                reason,
                ..
            } => Some((replica.clone(), *trigger, reason.clone())),
            _ => None,
        })
        .collect()
}

/// A deployment of `front` and `infer` with `n` ready replicas of `infer`, at 10 s.
fn with_infer(policy: ScalingPolicy, n: usize) -> Snapshot {
    let mut snap = cluster(policy);
    step(&mut snap, s(0.0));
    if n > 1 {
        // 1 replica holds 35/s at 20 ms and 70%; ask for n, then drop the load reading.
        load(&mut snap, "infer", 35.0 * n as f64 - 1.0, 20.0);
        step(&mut snap, s(0.5));
        snap.deployment_mut("g1").expect("deployed").load.clear();
    }
    assert_eq!(count(&snap, "infer"), n);
    step(&mut snap, s(1.0));
    snap
}

#[test]
fn a_throttled_lone_replica_is_replaced_off_its_host_then_shed_once_the_new_one_is_routed() {
    let mut snap = with_infer(policy(), 1);
    let (bad, bad_host) = replicas_of(&snap, "infer")[0].clone();
    calibrate(&mut snap, "infer", 20.0);
    // Throttled but fast enough: nothing.
    health(&mut snap, &bad, 21.0, 0.0, 0.9);
    assert!(replaces(&step(&mut snap, s(10.0))).is_empty());
    // Throttled and queueing 10× its execution: contention.
    health(&mut snap, &bad, 25.0, 200.0, 0.9);
    let actions = step(&mut snap, s(11.0));
    let found = replaces(&actions);
    assert_eq!(found.len(), 1, "{actions:?}");
    assert_eq!(
        (found[0].0.as_str(), found[0].1),
        (bad.as_str(), Trigger::Contention)
    );
    assert!(
        found[0].2.contains("CPU-throttled in 90%") && found[0].2.contains("11.2×"),
        "{}",
        found[0].2
    );
    // The same pass places the replacement on another host, and the host is avoided.
    let now = replicas_of(&snap, "infer");
    assert_eq!(now.len(), 2);
    assert_ne!(now[1].1, bad_host);
    assert!(snap.contended.contains_key(&bad_host));
    // No second replacement while one is under way.
    assert!(replaces(&step(&mut snap, s(12.0))).is_empty());
    // Once the new replica is in a published table, the bad one is shed and drains.
    let actions = step(&mut snap, s(13.0));
    let shed = actions.iter().find_map(|a| match a {
        Action::Shed { replica, by, .. } => Some((replica.clone(), by.clone())),
        _ => None,
    });
    assert_eq!(
        shed,
        Some((bad.clone(), vec![now[1].0.clone()])),
        "{actions:?}"
    );
    assert_eq!(replicas_of(&snap, "infer"), vec![now[1].clone()]);
    assert!(snap.deployments["g1"].replacing.is_empty());
    let retired = sizing(step(&mut snap, s(13.0) + crate::Config::default().drain));
    assert!(
        retired
            .iter()
            .any(|a| matches!(a, Action::RetireDrained { replicas, .. } if replicas[0].id == bad)),
        "{retired:?}"
    );
}

#[test]
fn a_contended_host_is_avoided_by_later_placements_until_the_hold_ends() {
    let mut snap = with_infer(policy(), 1);
    let (bad, bad_host) = replicas_of(&snap, "infer")[0].clone();
    calibrate(&mut snap, "infer", 20.0);
    health(&mut snap, &bad, 25.0, 200.0, 0.9);
    step(&mut snap, s(11.0));
    step(&mut snap, s(12.0));
    step(&mut snap, s(13.0));
    // Load for 4 replicas on 3 hosts: the two healthy hosts take them first.
    load(&mut snap, "infer", 90.0, 20.0);
    step(&mut snap, s(30.0));
    let hosts: Vec<String> = replicas_of(&snap, "infer")
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    assert_eq!(hosts.len(), 3);
    assert!(!hosts.contains(&bad_host), "{hosts:?}");
}

#[test]
fn an_outlier_among_its_peers_is_replaced_but_a_balanced_overload_is_not() {
    let mut snap = with_infer(policy(), 3);
    let ids: Vec<String> = replicas_of(&snap, "infer")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Everyone queues the same: load, not a bad replica.
    for id in &ids {
        health(&mut snap, id, 20.0, 300.0, 0.0);
    }
    assert!(replaces(&step(&mut snap, s(10.0))).is_empty());
    // One kept a backlog (a scale-out's old replica): not slow.
    health(&mut snap, &ids[0], 20.0, 0.0, 0.0);
    health(&mut snap, &ids[1], 20.0, 0.0, 0.0);
    health(&mut snap, &ids[2], 21.0, 400.0, 0.0);
    assert!(replaces(&step(&mut snap, s(10.5))).is_empty());
    // One executes 3× slower than its peers (no throttling: slow, not contention).
    health(&mut snap, &ids[2], 60.0, 15.0, 0.0);
    let found = replaces(&step(&mut snap, s(11.0)));
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].0.as_str(), found[0].1),
        (ids[2].as_str(), Trigger::Slow)
    );
    assert!(
        found[0].2.contains("3.0× its task's other replicas'"),
        "{}",
        found[0].2
    );
    assert!(snap.contended.is_empty(), "slowness alone marks no host");
}

#[test]
fn a_lone_replica_is_judged_on_execution_against_its_calibration_not_on_queueing() {
    let mut snap = with_infer(policy(), 1);
    let (id, _) = replicas_of(&snap, "infer")[0].clone();
    calibrate(&mut snap, "infer", 20.0);
    health(&mut snap, &id, 22.0, 500.0, 0.0);
    assert!(
        replaces(&step(&mut snap, s(10.0))).is_empty(),
        "queueing is sizing's"
    );
    health(&mut snap, &id, 45.0, 0.0, 0.0);
    let found = replaces(&step(&mut snap, s(11.0)));
    assert_eq!(found.len(), 1);
    assert!(
        found[0].2.contains("execution p50 45.0 ms is 2.2×"),
        "{}",
        found[0].2
    );
}

#[test]
fn errors_replace_a_replica_failing_more_than_its_peers_but_not_a_lone_one() {
    let mut snap = with_infer(policy(), 2);
    let ids: Vec<String> = replicas_of(&snap, "infer")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for id in &ids {
        health(&mut snap, id, 20.0, 0.0, 0.0);
    }
    let d = snap.deployment_mut("g1").expect("deployed");
    d.health.get_mut(&ids[0]).expect("set").errors = 40;
    d.health.get_mut(&ids[1]).expect("set").errors = 2;
    let found = replaces(&step(&mut snap, s(10.0)));
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].0.as_str(), found[0].1),
        (ids[0].as_str(), Trigger::Errors)
    );
    assert!(
        found[0].2.contains("failed 20% of its 200"),
        "{}",
        found[0].2
    );

    let mut snap = with_infer(policy(), 1);
    let (id, _) = replicas_of(&snap, "infer")[0].clone();
    health(&mut snap, &id, 20.0, 0.0, 0.0);
    let d = snap.deployment_mut("g1").expect("deployed");
    d.health.get_mut(&id).expect("set").errors = 100;
    assert!(replaces(&step(&mut snap, s(10.0))).is_empty());
}

#[test]
fn a_replica_is_not_judged_before_a_window_of_serving_or_on_few_executions() {
    let mut snap = with_infer(policy(), 1);
    let (id, _) = replicas_of(&snap, "infer")[0].clone();
    calibrate(&mut snap, "infer", 20.0);
    health(&mut snap, &id, 80.0, 0.0, 0.0);
    // Ready at 0 s; the 4 s window is not all its own before 4 s.
    assert!(replaces(&step(&mut snap, s(3.9))).is_empty());
    snap.deployment_mut("g1")
        .expect("deployed")
        .health
        .get_mut(&id)
        .expect("set")
        .executions = 9;
    assert!(replaces(&step(&mut snap, s(10.0))).is_empty());
}

#[test]
fn at_the_maximum_a_bad_replica_with_peers_is_shed_and_a_lone_one_kept() {
    let mut snap = with_infer(
        ScalingPolicy {
            max_replicas: 2,
            ..policy()
        },
        2,
    );
    let ids: Vec<String> = replicas_of(&snap, "infer")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    health(&mut snap, &ids[0], 20.0, 0.0, 0.0);
    health(&mut snap, &ids[1], 90.0, 0.0, 0.0);
    let actions = step(&mut snap, s(10.0));
    assert!(replaces(&actions).is_empty());
    let shed = actions.iter().find_map(|a| match a {
        Action::Shed {
            replica,
            by,
            reason,
            ..
        } => Some((replica.clone(), by.len(), reason.clone())),
        _ => None,
    });
    let (replica, by, reason) = shed.expect("shed");
    assert_eq!((replica.as_str(), by), (ids[1].as_str(), 0));
    assert!(reason.contains("no room for a replacement"), "{reason}");

    let mut snap = with_infer(
        ScalingPolicy {
            max_replicas: 1,
            ..policy()
        },
        1,
    );
    let (id, _) = replicas_of(&snap, "infer")[0].clone();
    calibrate(&mut snap, "infer", 20.0);
    health(&mut snap, &id, 90.0, 0.0, 0.0);
    let actions = step(&mut snap, s(10.0));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::Replace { .. } | Action::Shed { .. })));
}

fn chain(snap: &mut Snapshot, measured_ms: f64) {
    let d = snap.deployment_mut("g1").expect("deployed");
    d.chains = vec![ChainLoad {
        tasks: vec!["front".into(), "infer".into()],
        count: 500,
        percentile: 99.0,
        objective_s: 0.025,
        measured_s: measured_ms / 1e3,
    }];
}

#[test]
fn a_chain_over_its_objective_grows_the_task_that_makes_most_of_it() {
    // Tasks that add up to less than the objective are not the excess (a backlog gone).
    let mut snap = cluster(policy());
    step(&mut snap, s(0.0));
    load(&mut snap, "front", 10.0, 1.0);
    load(&mut snap, "infer", 10.0, 20.0);
    chain(&mut snap, 31.0);
    assert!(sizing(step(&mut snap, s(1.0))).is_empty());

    let mut snap = cluster(policy());
    step(&mut snap, s(0.0));
    // 10/s is far under what one replica of each holds: utilisation asks for nothing.
    load(&mut snap, "front", 10.0, 1.0);
    load(&mut snap, "infer", 10.0, 30.0);
    chain(&mut snap, 24.0);
    assert!(sizing(step(&mut snap, s(1.0))).is_empty());
    chain(&mut snap, 31.0);
    let actions = step(&mut snap, s(2.0));
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
    assert_eq!((task.as_str(), *from, *to), ("infer", 1, 2));
    assert!(
        reason.contains("chain front->infer p99 31.0 ms > objective 25.0 ms")
            && reason.contains("infer is 97% of it"),
        "{reason}"
    );
    // Within the cooldown, no more; after it, one more while the chain stays over.
    assert!(sizing(step(&mut snap, s(5.0))).is_empty());
    step(&mut snap, s(13.0));
    assert_eq!(count(&snap, "infer"), 3);
    // While the chain is over, nothing on it scales in, even with almost no load.
    load(&mut snap, "infer", 0.1, 30.0);
    snap.deployment_mut("g1").expect("deployed").scaled.clear();
    let mut p = policy();
    p.max_replicas = 3;
    std::sync::Arc::make_mut(snap.wanted.get_mut("g1").expect("wanted"))
        .graph
        .scaling = Some(p);
    let actions = sizing(step(&mut snap, s(100.0)));
    assert!(actions.is_empty(), "{actions:?}");
    chain(&mut snap, 10.0);
    let actions = sizing(step(&mut snap, s(101.0)));
    assert!(
        actions.iter().any(|a| matches!(a, Action::ScaleIn { .. })),
        "{actions:?}"
    );
}

#[test]
fn consecutive_tasks_scaled_out_together_land_on_one_host() {
    let mut snap = cluster(policy());
    step(&mut snap, s(0.0));
    // front on one host, infer on another; both need one more.
    load(&mut snap, "front", 50.0, 20.0);
    load(&mut snap, "infer", 50.0, 20.0);
    step(&mut snap, s(1.0));
    let front = replicas_of(&snap, "front");
    let infer = replicas_of(&snap, "infer");
    assert_eq!((front.len(), infer.len()), (2, 2));
    assert_eq!(front[1].1, infer[1].1, "the new copy of the chain is local");
}

proptest! {
    #[test]
    fn replacement_stays_within_the_bounds(
        slow in prop::collection::vec((0usize..4, 1.0f64..6.0, 0.0f64..1.0), 1..25),
        min in 1u32..3,
        extra in 0u32..3,
        budget in prop::option::of(3u32..8),
    ) {
        let policy = ScalingPolicy {
            min_replicas: min,
            max_replicas: min + extra,
            max_vms: budget.map(|b| b.max(2 * min)),
            ..policy()
        };
        let mut snap = cluster(policy.clone());
        step(&mut snap, s(0.0));
        calibrate(&mut snap, "infer", 20.0);
        let mut now = s(5.0);
        for (which, factor, throttled) in slow {
            let ids: Vec<String> = replicas_of(&snap, "infer").into_iter().map(|(id, _)| id).collect();
            for (i, id) in ids.iter().enumerate() {
                let f = if i == which { factor } else { 1.0 };
                health(&mut snap, id, 20.0 * f, 5.0 * f, throttled);
            }
            now += Duration::from_secs(3);
            step(&mut snap, now);
            let d = &snap.deployments["g1"];
            for task in ["front", "infer"] {
                let n = count(&snap, task) as u32;
                prop_assert!(n >= policy.min_replicas && n <= policy.max_replicas, "{task}: {n}");
            }
            if let Some(b) = policy.max_vms {
                prop_assert!(d.replicas.len() as u32 <= b, "{} over the budget {b}", d.replicas.len());
            }
        }
    }
}

#[test]
fn a_chain_is_attributed_by_replica_health_and_waits_while_its_worst_task_is_replaced() {
    // The task-level load says nothing yet (its window is longer); the replicas' health does.
    let setup = |throttled: f64| {
        let mut snap = with_infer(policy(), 1);
        let (bad, _) = replicas_of(&snap, "infer")[0].clone();
        let (front, _) = replicas_of(&snap, "front")[0].clone();
        load(&mut snap, "front", 10.0, 1.0);
        load(&mut snap, "infer", 10.0, 1.0);
        calibrate(&mut snap, "infer", 20.0);
        health(&mut snap, &front, 1.0, 0.0, 0.0);
        health(&mut snap, &bad, 21.0, 200.0, throttled);
        chain(&mut snap, 300.0);
        snap
    };
    let mut snap = setup(0.0);
    let actions = step(&mut snap, s(11.0));
    let out = actions.iter().find_map(|a| match a {
        Action::ScaleOut { task, reason, .. } => Some((task.clone(), reason.clone())),
        _ => None,
    });
    let (task, reason) = out.expect("the chain scales out");
    assert_eq!(task, "infer");
    assert!(
        reason.contains("infer is 100% of it (queueing 400.0 ms + execution 42.0 ms at p99)"),
        "{reason}"
    );
    // Throttled: contention replaces the replica, and the chain waits for that instead of
    // growing the task, then and after its cooldown.
    let mut snap = setup(0.9);
    let actions = step(&mut snap, s(11.0));
    assert_eq!(replaces(&actions).len(), 1, "{actions:?}");
    assert!(
        !actions.iter().any(|a| matches!(a, Action::ScaleOut { .. })),
        "{actions:?}"
    );
    let later = sizing(step(&mut snap, s(25.0)));
    assert!(
        !later.iter().any(|a| matches!(a, Action::ScaleOut { .. })),
        "{later:?}"
    );
}

#[test]
fn a_replacement_never_lands_on_its_bad_replicas_host() {
    let mut snap = with_infer(policy(), 1);
    let (bad, bad_host) = replicas_of(&snap, "infer")[0].clone();
    // Every other host is full.
    for (name, h) in snap.hosts.iter_mut() {
        if *name != bad_host {
            h.capacity.cpu_millicores = 50;
        }
    }
    calibrate(&mut snap, "infer", 20.0);
    health(&mut snap, &bad, 25.0, 200.0, 0.9);
    let actions = step(&mut snap, s(11.0));
    assert_eq!(replaces(&actions).len(), 1, "{actions:?}");
    let why = actions.iter().find_map(|a| match a {
        Action::Unplaceable { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    let why = why.expect("unplaceable");
    assert!(why.contains(&format!("besides {bad_host}")), "{why}");
    assert_eq!(
        replicas_of(&snap, "infer"),
        vec![(bad, bad_host)],
        "it keeps serving"
    );
}

#[test]
fn a_warmed_replica_records_its_lead_time_per_task_and_host() {
    let mut snap = cluster(policy());
    let actions = crate::plan(&snap, &crate::scaling_tests::config(), s(1.0));
    for a in &actions {
        crate::apply(&mut snap, a, s(1.0));
    }
    let r = snap.deployments["g1"].replicas[0].clone();
    let took = crate::observe::provisioned_after_warmup(
        &mut snap,
        "g1",
        &r.id,
        "addr",
        Duration::from_millis(40),
        s(1.25),
    );
    assert_eq!(took, Duration::from_millis(250));
    let lead = snap.deployments["g1"].lead_times[&(r.task.clone(), r.host.clone())];
    assert_eq!(
        (lead.ready_after, lead.warmup),
        (Duration::from_millis(250), Duration::from_millis(40))
    );
    assert!(snap.deployments["g1"].replicas[0].is_ready());
}

#[test]
fn host_steal_or_run_queue_waits_count_as_contention_for_a_slow_replica() {
    let mut snap = with_infer(policy(), 1);
    let (id, host) = replicas_of(&snap, "infer")[0].clone();
    calibrate(&mut snap, "infer", 20.0);
    // Contended, but the replica is not slow: nothing.
    snap.pressure.insert(
        host.clone(),
        crate::snapshot::HostPressure {
            cpu_steal: 0.3,
            ..Default::default()
        },
    );
    health(&mut snap, &id, 21.0, 0.0, 0.0);
    assert!(replaces(&step(&mut snap, s(10.0))).is_empty());
    // Slow (queueing) on a host losing 30% to steal.
    health(&mut snap, &id, 21.0, 100.0, 0.0);
    let found = replaces(&step(&mut snap, s(11.0)));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1, Trigger::Contention);
    assert!(
        found[0].2.contains("loses 30% of its CPU to steal"),
        "{}",
        found[0].2
    );
    assert!(snap.contended.contains_key(&host));

    let mut snap = with_infer(policy(), 1);
    let (id, host) = replicas_of(&snap, "infer")[0].clone();
    calibrate(&mut snap, "infer", 20.0);
    snap.pressure.insert(
        host,
        crate::snapshot::HostPressure {
            run_queue_p99_s: Some(0.035),
            ..Default::default()
        },
    );
    health(&mut snap, &id, 21.0, 100.0, 0.0);
    let found = replaces(&step(&mut snap, s(11.0)));
    assert!(
        found[0].2.contains("run-queue waits reach 35.0 ms at p99"),
        "{}",
        found[0].2
    );
}

#[test]
fn a_throttled_replica_among_peers_is_judged_on_its_tail_and_on_few_executions() {
    let mut snap = with_infer(policy(), 2);
    let ids: Vec<String> = replicas_of(&snap, "infer")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    calibrate(&mut snap, "infer", 20.0);
    health(&mut snap, &ids[0], 20.0, 0.0, 0.0);
    // Replica choice sends it little: 4 executions, median fine, tail 5× its peer's.
    health(&mut snap, &ids[1], 20.0, 10.0, 0.6);
    {
        let d = snap.deployment_mut("g1").expect("deployed");
        let h = d.health.get_mut(&ids[1]).expect("set");
        h.executions = 4;
        h.exec_p99_s = 0.150;
        h.queue_p99_s = 0.050;
    }
    let found = replaces(&step(&mut snap, s(10.0)));
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].0.as_str(), found[0].1),
        (ids[1].as_str(), Trigger::Contention)
    );
    assert!(
        found[0].2.contains(
            "queueing + execution p99 200.0 ms is 5.0× its task's other replicas' 40.0 ms"
        ),
        "{}",
        found[0].2
    );
}

#[test]
fn a_replacement_that_fails_to_provision_is_placed_again_without_a_scale_out() {
    let mut snap = with_infer(policy(), 1);
    let (bad, _) = replicas_of(&snap, "infer")[0].clone();
    calibrate(&mut snap, "infer", 20.0);
    health(&mut snap, &bad, 25.0, 200.0, 0.9);
    // Plan without the helper's provisioning: the replacement stays provisioning, then fails.
    let now = s(11.0);
    for a in crate::plan(&snap, &crate::scaling_tests::config(), now) {
        crate::apply(&mut snap, &a, now);
    }
    let new = replicas_of(&snap, "infer")[1].0.clone();
    let backoff = crate::Config::default().backoff;
    crate::observe::provision_failed(&mut snap, "g1", &new, &backoff, s(11.5));
    // After the backoff, one more replacement and no growth of the task.
    let actions = crate::plan(&snap, &crate::scaling_tests::config(), s(20.0));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::ScaleOut { .. })),
        "{actions:?}"
    );
    let placed = actions
        .iter()
        .filter(|a| matches!(a, Action::Place { task, .. } if task == "infer"))
        .count();
    assert_eq!(placed, 1, "{actions:?}");
}
