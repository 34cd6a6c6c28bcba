//! Observations: what the control node hears (a registration, a heartbeat, a provisioning
//! result, a replica's exit) applied to the snapshot. Facts, not decisions: the decisions they
//! lead to (adopt, re-place, back off) are [`crate::plan`]'s. Backoff bookkeeping lives here so
//! that the control node and the simulator count failures the same way.

use crate::snapshot::{
    Capacity, Failures, Health, Host, Replica, ReplicaState, Reported, Snapshot, WarmShape,
};
use crate::Backoff;
use std::time::Duration;

/// An agent registered (first time, or again after a reconnect or being lost).
pub fn registered(
    s: &mut Snapshot,
    name: &str,
    capacity: Capacity,
    reported: Vec<Reported>,
    now: Duration,
) {
    s.hosts.insert(
        name.to_string(),
        Host {
            name: name.to_string(),
            health: Health::Ready,
            last_heartbeat: now,
            capacity,
            reported: Some(reported),
            pools: false,
            warm: Vec::new(),
            warm_target: Vec::new(),
        },
    );
}

/// As [`registered`], for an agent that keeps a warm pool of microVMs.
pub fn registered_with_pool(
    s: &mut Snapshot,
    name: &str,
    capacity: Capacity,
    reported: Vec<Reported>,
    now: Duration,
) {
    registered(s, name, capacity, reported, now);
    if let Some(h) = s.hosts.get_mut(name) {
        h.pools = true;
    }
}

/// What a heartbeat said of the host's warm pool: the idle VMs it has now.
pub fn warm_reported(s: &mut Snapshot, name: &str, warm: Vec<WarmShape>) {
    if let Some(h) = s.hosts.get_mut(name) {
        h.warm = warm;
    }
}

/// A heartbeat; false when the host must register again (it was declared lost).
pub fn heartbeat(s: &mut Snapshot, name: &str, now: Duration) -> bool {
    match s.hosts.get_mut(name) {
        Some(h) => {
            h.last_heartbeat = now;
            h.health == Health::Ready
        }
        None => false,
    }
}

/// As [`provisioned`], and returns the placement-to-ready time, not kept as the task's lead
/// time: for a replica that took a VM from the warm pool (the lead time the plan orders ahead
/// by is the boot the pool hid). [`provisioned_after_warmup`] keeps it.
pub fn provisioned_warm(
    s: &mut Snapshot,
    graph_id: &str,
    replica: &str,
    addr: &str,
    _warmup: Duration,
    now: Duration,
) -> Duration {
    provisioned(s, graph_id, replica, addr, now);
    let Some(d) = s.deployment_mut(graph_id) else {
        return Duration::ZERO;
    };
    let Some(r) = d.replicas.iter().find(|r| r.id == replica) else {
        return Duration::ZERO;
    };
    let took = now.saturating_sub(r.placed_at);
    let task = r.task.clone();
    d.failed_on.remove(&task);
    took
}

/// A replica finished provisioning and serves at `addr`.
pub fn provisioned(s: &mut Snapshot, graph_id: &str, replica: &str, addr: &str, now: Duration) {
    if let Some(r) = s
        .deployment_mut(graph_id)
        .and_then(|d| d.replicas.iter_mut().find(|r| r.id == replica))
    {
        r.addr = addr.to_string();
        r.state = ReplicaState::Ready { since: now };
    }
}

/// As [`provisioned`], for a replica that warmed up for `warmup` before it said it was ready:
/// records the task's lead time on its host (placement to ready, and the warm-up within it)
/// for the planner, and returns the placement-to-ready time.
pub fn provisioned_after_warmup(
    s: &mut Snapshot,
    graph_id: &str,
    replica: &str,
    addr: &str,
    warmup: Duration,
    now: Duration,
) -> Duration {
    let took = provisioned_warm(s, graph_id, replica, addr, warmup, now);
    if let Some(d) = s.deployment_mut(graph_id) {
        if let Some(r) = d.replicas.iter().find(|r| r.id == replica) {
            let key = (r.task.clone(), r.host.clone());
            d.lead_times.insert(
                key,
                crate::snapshot::LeadTime {
                    ready_after: took,
                    warmup,
                },
            );
        }
    }
    took
}

/// Counts one more failure of a task's replicas. The count starts again when the replica that
/// failed had run for `stable_after`, or the previous failure is older than twice the longest
/// wait (it was not part of the same run of failures).
pub fn count_failure(
    prev: Option<Failures>,
    ran_for: Option<Duration>,
    backoff: &Backoff,
    now: Duration,
) -> Failures {
    let fresh = ran_for.is_some_and(|r| r >= backoff.stable_after)
        || prev.is_none_or(|p| now.saturating_sub(p.last_at) >= backoff.max * 2);
    Failures {
        count: if fresh {
            1
        } else {
            prev.map_or(1, |p| p.count.saturating_add(1))
        },
        last_at: now,
    }
}

/// Provisioning failed: the replica is gone and its task backs off. Returns the failures in a
/// row and the wait before the next try, or `None` when the replica was no longer known.
pub fn provision_failed(
    s: &mut Snapshot,
    graph_id: &str,
    replica: &str,
    backoff: &Backoff,
    now: Duration,
) -> Option<(Replica, Failures, Duration)> {
    let d = s.deployment_mut(graph_id)?;
    let i = d.replicas.iter().position(|r| r.id == replica)?;
    let r = d.replicas.remove(i);
    let f = count_failure(d.failures.get(&r.task).copied(), None, backoff, now);
    d.failures.insert(r.task.clone(), f);
    d.failed_on.insert(r.task.clone(), r.host.clone());
    Some((r, f, backoff.delay(f.count)))
}

/// A replica's worker exited (crashed or was killed). A replica that was ready counts as a
/// crash of its task, so a crash-looping task is re-placed with backoff, not at once.
pub fn replica_down(
    s: &mut Snapshot,
    host: &str,
    replica: &str,
    backoff: &Backoff,
    now: Duration,
) -> Option<(Replica, Failures, Duration)> {
    let holds = |d: &crate::snapshot::Deployment| {
        d.replicas.iter().any(|r| r.id == replica && r.host == host)
    };
    for d in s.deployments_where(holds) {
        let Some(i) = d
            .replicas
            .iter()
            .position(|r| r.id == replica && r.host == host)
        else {
            continue;
        };
        let r = d.replicas.remove(i);
        let ran_for = match r.state {
            ReplicaState::Ready { since } => Some(now.saturating_sub(since)),
            ReplicaState::Provisioning { .. } => None,
        };
        let f = count_failure(d.failures.get(&r.task).copied(), ran_for, backoff, now);
        d.failures.insert(r.task.clone(), f);
        if ran_for.is_none_or(|t| t < backoff.stable_after) {
            d.failed_on.insert(r.task.clone(), r.host.clone());
        }
        return Some((r, f, backoff.delay(f.count)));
    }
    None
}
