//! `plan` on hand-built snapshots: one test per decision the control node takes.

use crate::observe;
use crate::snapshot::{Capacity, Deployment, Health, Reported, Snapshot};
use crate::{apply, plan, Action, Config};
use prescient_schemas::{codec, file, GraphRecord};
use std::time::Duration;

fn s(secs: f64) -> Duration {
    Duration::from_secs_f64(secs)
}

fn chain(id: &str, version: u32, last: &str) -> GraphRecord {
    let text = format!(
        r#"
name = "chain-{id}"
[[task]]
id = "s1"
code = {{ builtin = "identity" }}
inputs = {{ x = "bytes" }}
outputs = {{ y = "bytes" }}
estimate = "1ms"
resources = {{ cpu = "500m", memory = "256MiB" }}
[[task]]
id = "s2"
code = {{ builtin = "{last}" }}
inputs = {{ x = "bytes" }}
outputs = {{ y = "bytes" }}
estimate = "1ms"
resources = {{ cpu = "500m", memory = "256MiB" }}
[[edge]]
from = "s1.y"
to = "s2.x"
"#
    );
    let graph = file::parse("chain.toml", &text).expect("test graph").graph;
    GraphRecord {
        id: id.into(),
        version,
        submitted_at_ms: 0,
        digest: codec::graph_digest(&graph),
        graph,
    }
}

fn capacity(cpus: u64) -> Capacity {
    Capacity {
        cpu_millicores: cpus * 1000,
        memory_bytes: 8 << 30,
        ..Capacity::default()
    }
}

fn config() -> Config {
    Config {
        startup_grace: Duration::ZERO,
        ..Config::default()
    }
}

/// A cluster of `hosts` two-CPU hosts, all heard from at `at`, with no reports pending.
fn cluster(hosts: &[&str], at: Duration) -> Snapshot {
    let mut snap = Snapshot::default();
    for h in hosts {
        observe::registered(&mut snap, h, capacity(2), vec![], at);
        snap.hosts.get_mut(*h).expect("just added").reported = None;
    }
    snap
}

/// Runs `plan` and applies its actions, as the executor does.
fn step(snap: &mut Snapshot, config: &Config, now: Duration) -> Vec<Action> {
    let actions = plan(snap, config, now);
    for a in &actions {
        apply(snap, a, now);
    }
    actions
}

fn placed(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Place { replica, host, .. } => Some((replica.clone(), host.clone())),
            _ => None,
        })
        .collect()
}

/// Every provisioning replica comes up, at `addr` = its id.
fn all_ready(snap: &mut Snapshot, now: Duration) {
    let ids: Vec<(String, String)> = snap
        .deployments
        .iter()
        .flat_map(|(g, d)| d.replicas.iter().map(move |r| (g.clone(), r.id.clone())))
        .collect();
    for (g, r) in ids {
        observe::provisioned(snap, &g, &r, &r, now);
    }
}

#[test]
fn a_fresh_graph_is_placed_in_order_spread_and_published_once_ready() {
    let mut snap = cluster(&["a1", "a2"], s(0.0));
    snap.wanted
        .insert("g1".into(), chain("g1", 1, "sha256").into());
    let c = config();
    let actions = step(&mut snap, &c, s(0.1));
    assert_eq!(
        placed(&actions),
        [
            ("g1.s1.r1".to_string(), "a1".to_string()),
            ("g1.s2.r2".to_string(), "a2".to_string())
        ]
    );
    // Nothing ready yet: no table. Placing again would double the replicas: nothing happens.
    assert!(step(&mut snap, &c, s(0.2)).is_empty());
    all_ready(&mut snap, s(0.3));
    let actions = step(&mut snap, &c, s(0.4));
    assert_eq!(
        actions,
        [Action::Publish {
            graph_id: "g1".into(),
            epoch: 1,
            ready: vec!["g1.s1.r1@a1".into(), "g1.s2.r2@a2".into()],
        }]
    );
    assert!(step(&mut snap, &c, s(0.5)).is_empty(), "a table goes once");
}

#[test]
fn a_graph_that_does_not_fit_is_reported_once() {
    let mut snap = Snapshot::default();
    observe::registered(&mut snap, "tiny", capacity(0), vec![], s(0.0));
    snap.wanted
        .insert("g1".into(), chain("g1", 1, "identity").into());
    let c = config();
    let first = step(&mut snap, &c, s(0.1));
    assert!(first
        .iter()
        .any(|a| matches!(a, Action::AcceptReport { host, .. } if host == "tiny")));
    let unplaceable = |a: &[Action]| {
        a.iter()
            .filter(|a| matches!(a, Action::Unplaceable { .. }))
            .count()
    };
    assert_eq!(unplaceable(&first), 2, "{first:?}");
    assert_eq!(unplaceable(&step(&mut snap, &c, s(2.0))), 0);
}

#[test]
fn a_lost_agent_loses_its_replicas_and_they_are_placed_elsewhere() {
    let mut snap = cluster(&["a1", "a2", "a3"], s(0.0));
    snap.wanted
        .insert("g1".into(), chain("g1", 1, "identity").into());
    let c = config();
    step(&mut snap, &c, s(0.1));
    all_ready(&mut snap, s(0.2));
    step(&mut snap, &c, s(0.3));
    for h in ["a1", "a3"] {
        assert!(observe::heartbeat(&mut snap, h, s(3.0)));
    }
    // a2 (running s2) was last heard at 0 s; the limit is 3 s.
    assert!(step(&mut snap, &c, s(3.0))
        .iter()
        .all(|a| !matches!(a, Action::MarkLost { .. })));
    let actions = step(&mut snap, &c, s(3.2));
    assert_eq!(
        actions[0],
        Action::MarkLost {
            host: "a2".into(),
            silent: s(3.2),
            limit: c.heartbeat_timeout,
            replicas: vec!["g1.s2.r2".into()],
        }
    );
    assert_eq!(snap.hosts["a2"].health, Health::Lost);
    assert_eq!(placed(&actions), [("g1.s2.r3".into(), "a3".into())]);
    // The table without the lost replica goes at once.
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Publish { epoch: 2, ready, .. } if ready == &["g1.s1.r1@a1".to_string()]
    )));
    // A lost host's late heartbeat does not bring it back: it must register again.
    assert!(!observe::heartbeat(&mut snap, "a2", s(3.3)));
}

/// The id and host of g1's replica of `task`.
fn running(snap: &Snapshot, task: &str) -> (String, String) {
    let r = snap.deployments["g1"]
        .replicas
        .iter()
        .find(|r| r.task == task)
        .expect("the task runs");
    (r.id.clone(), r.host.clone())
}

#[test]
fn a_crash_looping_replica_is_replaced_with_doubling_backoff() {
    let mut snap = cluster(&["a1", "a2"], s(0.0));
    snap.wanted
        .insert("g1".into(), chain("g1", 1, "identity").into());
    let c = Config {
        heartbeat_timeout: Duration::from_secs(3600),
        ..config()
    };
    step(&mut snap, &c, s(0.0));
    all_ready(&mut snap, s(0.1));
    step(&mut snap, &c, s(0.1));
    let mut now = 1.0;
    let mut waits = Vec::new();
    for _ in 0..4 {
        let (id, host) = running(&snap, "s2");
        let (_, failures, wait) =
            observe::replica_down(&mut snap, &host, &id, &c.backoff, s(now)).expect("known");
        waits.push((failures.count, wait));
        // Not replaced before the wait is over...
        let early = step(&mut snap, &c, s(now) + wait - s(0.01));
        assert!(placed(&early).is_empty(), "{early:?}");
        // ...and replaced once it is.
        now = (s(now) + wait).as_secs_f64();
        assert_eq!(placed(&step(&mut snap, &c, s(now))).len(), 1);
        all_ready(&mut snap, s(now));
        now += 1.0;
    }
    assert_eq!(waits, [(1, s(2.0)), (2, s(4.0)), (3, s(8.0)), (4, s(16.0))]);
    // A replica that ran past `stable_after` before crashing starts the count again.
    let (id, host) = running(&snap, "s2");
    let later = s(now) + c.backoff.stable_after;
    let (_, failures, wait) =
        observe::replica_down(&mut snap, &host, &id, &c.backoff, later).expect("known");
    assert_eq!((failures.count, wait), (1, s(2.0)));
}

#[test]
fn provisioning_failures_back_off_and_cap() {
    let mut snap = cluster(&["a1"], s(0.0));
    snap.wanted
        .insert("g1".into(), chain("g1", 1, "identity").into());
    let c = Config {
        heartbeat_timeout: Duration::from_secs(100_000),
        ..config()
    };
    let mut now = s(0.0);
    let mut waits = Vec::new();
    for _ in 0..9 {
        observe::heartbeat(&mut snap, "a1", now);
        let actions = step(&mut snap, &c, now);
        let Some((replica, _)) = placed(&actions)
            .into_iter()
            .find(|(r, _)| r.contains(".s1."))
        else {
            panic!("s1 not placed at {now:?}: {actions:?}");
        };
        let (_, _, wait) =
            observe::provision_failed(&mut snap, "g1", &replica, &c.backoff, now).expect("known");
        waits.push(wait.as_secs());
        now += wait;
    }
    assert_eq!(waits, [2, 4, 8, 16, 32, 64, 120, 120, 120]);
}

#[test]
fn a_new_version_starts_beside_the_old_switches_when_ready_then_drains() {
    let mut snap = cluster(&["a1", "a2"], s(0.0));
    snap.wanted
        .insert("g1".into(), chain("g1", 1, "sha256").into());
    let c = Config {
        heartbeat_timeout: Duration::from_secs(3600),
        ..config()
    };
    step(&mut snap, &c, s(0.0));
    all_ready(&mut snap, s(0.1));
    step(&mut snap, &c, s(0.1));
    snap.wanted
        .insert("g1".into(), chain("g1", 2, "identity").into());
    let actions = step(&mut snap, &c, s(1.0));
    assert_eq!(
        actions[0],
        Action::SwitchVersion {
            graph_id: "g1".into(),
            from: 1,
            to: 2,
            moved: 2
        }
    );
    assert_eq!(
        placed(&actions).len(),
        2,
        "v2's replicas start: {actions:?}"
    );
    let d = &snap.deployments["g1"];
    assert_eq!((d.record.version, d.retiring.len()), (2, 2));
    // One of v2's replicas is ready: the table keeps v1's.
    let first = d.replicas[0].id.clone();
    observe::provisioned(&mut snap, "g1", &first, "x", s(1.5));
    assert!(step(&mut snap, &c, s(1.5)).is_empty());
    all_ready(&mut snap, s(2.0));
    let actions = step(&mut snap, &c, s(2.0));
    assert!(matches!(&actions[0], Action::Publish { epoch: 2, .. }));
    assert_eq!(
        actions[1],
        Action::StartDrain {
            graph_id: "g1".into(),
            version: 2,
            drain: c.drain,
            until: s(2.0) + c.drain,
            replicas: vec!["g1.s1.r1".into(), "g1.s2.r2".into()],
        }
    );
    assert!(step(&mut snap, &c, s(2.0) + c.drain - s(0.01)).is_empty());
    let actions = step(&mut snap, &c, s(2.0) + c.drain);
    assert!(
        matches!(&actions[..], [Action::Retire { version: 2, replicas, .. }] if replicas.len() == 2)
    );
    assert!(snap.deployments["g1"].retiring.is_empty());
    // Retired replicas free their hosts.
    let free: u64 = crate::placement::host_views(&snap, Duration::ZERO)
        .iter()
        .map(|h| h.cpu_free_millicores)
        .sum();
    assert_eq!(free, 4000 - 1000);
}

#[test]
fn a_restart_adopts_what_agents_run_and_places_nothing_during_the_grace() {
    // The node restarted at 0: it knows the graphs, not the deployments.
    let mut snap = Snapshot::default();
    snap.wanted
        .insert("g1".into(), chain("g1", 2, "identity").into());
    snap.wanted
        .insert("g2".into(), chain("g2", 1, "identity").into());
    let c = Config {
        startup_grace: Duration::from_secs(3),
        ..Config::default()
    };
    let rep = |id: &str, graph: &str, task: &str, version: u32, epoch: u64| Reported {
        replica: id.into(),
        graph_id: graph.into(),
        task: task.into(),
        version,
        epoch,
        addr: format!("127.0.0.1:{}", id.len()),
    };
    observe::registered(
        &mut snap,
        "a1",
        capacity(4),
        vec![
            rep("g1.s1.r7", "g1", "s1", 2, 9),
            rep("g1.s2.r8", "g1", "s2", 2, 9),
            rep("g1.s2.r3", "g1", "s2", 1, 9),
            rep("g9.s1.r1", "g9", "s1", 1, 2),
            rep("g2.s1.r1", "g2", "s1", 1, u64::MAX),
        ],
        s(0.5),
    );
    let actions = step(&mut snap, &c, s(0.5));
    let [Action::AcceptReport {
        adopt,
        adopt_retiring,
        orphans,
        ..
    }] = &actions[..]
    else {
        panic!("only the report is handled in the grace: {actions:?}");
    };
    let ids = |v: &[Reported]| v.iter().map(|r| r.replica.clone()).collect::<Vec<_>>();
    assert_eq!(ids(adopt), ["g1.s1.r7", "g1.s2.r8", "g2.s1.r1"]);
    assert_eq!(ids(adopt_retiring), ["g1.s2.r3"]);
    assert_eq!(ids(orphans), ["g9.s1.r1"], "its graph is gone");
    let g1 = &snap.deployments["g1"];
    assert_eq!((g1.epoch, g1.next_replica), (9, 9));
    assert!(g1.replicas.iter().all(|r| r.is_ready()));
    // An absurd epoch is not taken: the next table's epoch must still fit.
    assert_eq!(snap.deployments["g2"].epoch, 0);
    assert!(step(&mut snap, &c, s(1.0)).is_empty());

    // After the grace, only what is missing is placed, numbered after the adopted ones.
    observe::heartbeat(&mut snap, "a1", s(3.0));
    let actions = step(&mut snap, &c, s(3.0));
    assert_eq!(placed(&actions), [("g2.s2.r2".into(), "a1".into())]);
    let published: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect();
    // g1's table goes with a newer epoch than any agent has; g2's first, with what is ready.
    assert_eq!(published, [10, 1]);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::StartDrain { replicas, .. } if replicas == &["g1.s2.r3".to_string()])));
}

#[test]
fn a_reconnecting_agent_forgets_what_it_no_longer_runs() {
    let mut snap = cluster(&["a1", "a2"], s(0.0));
    snap.wanted
        .insert("g1".into(), chain("g1", 1, "identity").into());
    let c = config();
    step(&mut snap, &c, s(0.0));
    all_ready(&mut snap, s(0.1));
    step(&mut snap, &c, s(0.1));
    // a2 restarted: it runs nothing now.
    observe::heartbeat(&mut snap, "a1", s(1.0));
    observe::registered(&mut snap, "a2", capacity(2), vec![], s(1.0));
    let actions = step(&mut snap, &c, s(1.0));
    assert!(matches!(
        &actions[0],
        Action::AcceptReport { host, forget, .. } if host == "a2" && forget == &["g1.s2.r2".to_string()]
    ));
    assert_eq!(placed(&actions).len(), 1, "s2 is placed again: {actions:?}");
}

#[test]
fn a_removed_graph_is_undeployed() {
    let mut snap = cluster(&["a1"], s(0.0));
    snap.wanted
        .insert("g1".into(), chain("g1", 1, "identity").into());
    let c = config();
    step(&mut snap, &c, s(0.0));
    snap.wanted.clear();
    observe::heartbeat(&mut snap, "a1", s(1.0));
    assert_eq!(
        step(&mut snap, &c, s(1.0)),
        [Action::Undeploy {
            graph_id: "g1".into(),
            replicas: 2
        }]
    );
    assert!(snap.deployments.is_empty());
}

#[test]
fn deadlines_cover_heartbeats_backoff_and_drains() {
    let mut snap = cluster(&["a1"], s(0.0));
    let c = config();
    assert_eq!(crate::next_deadline(&snap, &c, s(1.0)), Some(s(3.0)));
    let mut d = Deployment::new(chain("g1", 1, "identity"));
    d.drain_until = Some(s(2.0));
    snap.deployments.insert("g1".into(), d.into());
    assert_eq!(crate::next_deadline(&snap, &c, s(1.0)), Some(s(2.0)));
}
