//! Actions: what a pass of [`crate::plan`] decides, and [`apply`], the change each makes to the
//! snapshot. The control node applies an action to its state, does the I/O it needs (RPCs to
//! agents) and records [`Action::event`]; `plan` applies its own actions to a working copy as it
//! goes, so later steps of one pass see earlier ones. One function, so the two never disagree.

use crate::event::Event;
use crate::snapshot::{
    replica_number, Deployment, Health, Replica, ReplicaState, Reported, Snapshot, MAX_EPOCH,
};
use prescient_schemas::Resources;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A host missed its heartbeats: it is lost and its replicas are gone.
    MarkLost {
        host: String,
        silent: Duration,
        limit: Duration,
        replicas: Vec<String>,
    },
    /// Reconcile what a (re-)registered agent reported: adopt its replicas of live versions,
    /// forget those it no longer runs, retire those of graphs or versions that are gone.
    AcceptReport {
        host: String,
        /// Of the current version, into `replicas`.
        adopt: Vec<Reported>,
        /// Of a replaced version still live, into `retiring` (they drain with the rest).
        adopt_retiring: Vec<Reported>,
        forget: Vec<String>,
        orphans: Vec<Reported>,
    },
    /// A new version was submitted: its replicas start beside the old ones.
    SwitchVersion {
        graph_id: String,
        from: u32,
        to: u32,
        moved: usize,
    },
    /// The graph was removed: every agent drops it.
    Undeploy { graph_id: String, replicas: usize },
    /// Start a replica (the executor provisions it).
    Place {
        graph_id: String,
        task: String,
        replica: String,
        host: String,
        resources: Resources,
        reason: String,
    },
    Unplaceable {
        graph_id: String,
        task: String,
        reason: String,
    },
    /// Push a new routing table (the ready replicas) to every agent.
    Publish {
        graph_id: String,
        epoch: u64,
        ready: Vec<String>,
    },
    /// The new version is routed; the replaced version's replicas serve what is on its way.
    StartDrain {
        graph_id: String,
        version: u32,
        drain: Duration,
        until: Duration,
        replicas: Vec<String>,
    },
    /// Sizing wants more replicas of a task (the `Place`s follow).
    ScaleOut {
        graph_id: String,
        task: String,
        from: u32,
        to: u32,
        reason: String,
    },
    /// `forecast-only`: what the plan would set, told and not done.
    ForecastOnly {
        graph_id: String,
        task: String,
        have: u32,
        would: u32,
        reason: String,
    },
    /// Sizing wants one fewer: `replica` leaves the routing table and drains until `until`.
    ScaleIn {
        graph_id: String,
        task: String,
        replica: String,
        from: u32,
        drain: Duration,
        until: Duration,
        reason: String,
    },
    /// A replica is bad (slow, failing, or on a contended host): a replacement is placed
    /// elsewhere, and it serves until that is routed. `avoid_until`: its host is avoided by
    /// placement until then (contention).
    Replace {
        graph_id: String,
        task: String,
        replica: String,
        host: String,
        trigger: crate::replace::Trigger,
        avoid_until: Option<Duration>,
        reason: String,
    },
    /// A replaced replica leaves the routing table and drains until `until`: `by` (its
    /// replacements, none when there was no room for one and its peers carry the load) serve.
    Shed {
        graph_id: String,
        task: String,
        replica: String,
        by: Vec<String>,
        drain: Duration,
        until: Duration,
        reason: String,
    },
    /// Stop scaled-in replicas whose drain is over.
    RetireDrained {
        graph_id: String,
        drain: Duration,
        replicas: Vec<Replica>,
    },
    /// A host that keeps a warm pool is told what to keep (booted, idle VMs per shape).
    WarmPool {
        host: String,
        shapes: Vec<crate::snapshot::WarmShape>,
        reason: String,
    },
    /// Stop the drained replicas.
    Retire {
        graph_id: String,
        version: u32,
        drain: Duration,
        replicas: Vec<Replica>,
    },
}

impl Action {
    /// The event that records this action once executed. `AcceptReport`'s needs the host's
    /// description, which only the executor has.
    pub fn event(&self, host_summary: &str, reconnected: bool) -> Event {
        match self {
            Action::MarkLost {
                host,
                silent,
                limit,
                replicas,
            } => Event::AgentLost {
                host: host.clone(),
                silent: *silent,
                limit: *limit,
                replicas: replicas.clone(),
            },
            Action::AcceptReport {
                host,
                adopt,
                adopt_retiring,
                forget,
                orphans,
            } => Event::AgentRegistered {
                host: host.clone(),
                summary: host_summary.to_string(),
                reconnected,
                adopted: adopt
                    .iter()
                    .chain(adopt_retiring)
                    .map(|r| r.replica.clone())
                    .collect(),
                forgotten: forget.clone(),
                orphans: orphans.iter().map(|r| r.replica.clone()).collect(),
            },
            Action::SwitchVersion {
                graph_id,
                from,
                to,
                moved,
            } => Event::GraphUpdating {
                graph_id: graph_id.clone(),
                from: *from,
                to: *to,
                moved: *moved,
            },
            Action::Undeploy { graph_id, replicas } => Event::GraphUndeployed {
                graph_id: graph_id.clone(),
                replicas: *replicas,
            },
            Action::Place {
                replica,
                host,
                reason,
                ..
            } => Event::ReplicaPlaced {
                replica: replica.clone(),
                host: host.clone(),
                reason: reason.clone(),
            },
            Action::Unplaceable {
                graph_id,
                task,
                reason,
            } => Event::ReplicaUnplaceable {
                graph_id: graph_id.clone(),
                task: task.clone(),
                reason: reason.clone(),
            },
            Action::Publish {
                graph_id,
                epoch,
                ready,
            } => Event::RoutesPublished {
                graph_id: graph_id.clone(),
                epoch: *epoch,
                ready: ready.clone(),
            },
            Action::StartDrain {
                graph_id,
                version,
                drain,
                replicas,
                ..
            } => Event::ReplicasDraining {
                graph_id: graph_id.clone(),
                version: *version,
                drain: *drain,
                replicas: replicas.clone(),
            },
            Action::ScaleOut {
                graph_id,
                task,
                from,
                to,
                reason,
            } => Event::ScaledOut {
                graph_id: graph_id.clone(),
                task: task.clone(),
                from: *from,
                to: *to,
                reason: reason.clone(),
            },
            Action::WarmPool {
                host,
                shapes,
                reason,
            } => Event::WarmPool {
                host: host.clone(),
                shapes: shapes.clone(),
                reason: reason.clone(),
            },
            Action::ForecastOnly {
                graph_id,
                task,
                have,
                would,
                reason,
            } => Event::ForecastOnly {
                graph_id: graph_id.clone(),
                task: task.clone(),
                have: *have,
                would: *would,
                reason: reason.clone(),
            },
            Action::ScaleIn {
                graph_id,
                task,
                replica,
                from,
                drain,
                reason,
                ..
            } => Event::ScaledIn {
                graph_id: graph_id.clone(),
                task: task.clone(),
                replica: replica.clone(),
                from: *from,
                drain: *drain,
                reason: reason.clone(),
            },
            Action::Replace {
                graph_id,
                task,
                replica,
                host,
                trigger,
                reason,
                ..
            } => Event::ReplicaReplacing {
                graph_id: graph_id.clone(),
                task: task.clone(),
                replica: replica.clone(),
                host: host.clone(),
                trigger: trigger.to_string(),
                reason: reason.clone(),
            },
            Action::Shed {
                replica,
                by,
                drain,
                reason,
                ..
            } => Event::ReplicaShed {
                replica: replica.clone(),
                by: by.clone(),
                drain: *drain,
                reason: reason.clone(),
            },
            Action::RetireDrained {
                graph_id,
                drain,
                replicas,
            } => Event::DrainedRetired {
                graph_id: graph_id.clone(),
                drain: *drain,
                replicas: replicas.iter().map(|r| r.id.clone()).collect(),
            },
            Action::Retire {
                graph_id,
                version,
                drain,
                replicas,
            } => Event::ReplicasRetired {
                graph_id: graph_id.clone(),
                version: *version,
                drain: *drain,
                replicas: replicas.iter().map(|r| r.id.clone()).collect(),
            },
        }
    }
}

fn adopted(r: &Reported, host: &str, d: &Deployment, now: Duration) -> Replica {
    Replica {
        id: r.replica.clone(),
        task: r.task.clone(),
        host: host.to_string(),
        addr: r.addr.clone(),
        state: ReplicaState::Ready { since: now },
        placed_at: now,
        resources: d
            .record
            .graph
            .task(&r.task)
            .map(|t| t.resources)
            .unwrap_or_default(),
    }
}

/// The deployment of a live graph, created empty on first use.
fn deployment<'a>(s: &'a mut Snapshot, graph_id: &str) -> Option<&'a mut Deployment> {
    let record = s.wanted.get(graph_id)?;
    Some(std::sync::Arc::make_mut(
        s.deployments
            .entry(graph_id.to_string())
            .or_insert_with(|| Deployment::new((**record).clone()).into()),
    ))
}

/// Makes the change `action` stands for in `s`, as of `now`.
pub fn apply(s: &mut Snapshot, action: &Action, now: Duration) {
    apply_one(s, action, now);
    // A replica that is gone (lost, crashed, retired) is no longer being replaced.
    let stale = |d: &Deployment| {
        d.replacing
            .keys()
            .any(|id| !d.replicas.iter().any(|r| r.id == *id))
    };
    for d in s.deployments_where(stale) {
        let Deployment {
            replacing,
            replicas,
            ..
        } = d;
        replacing.retain(|id, _| replicas.iter().any(|r| r.id == *id));
    }
}

fn apply_one(s: &mut Snapshot, action: &Action, now: Duration) {
    match action {
        Action::MarkLost { host, .. } => {
            if let Some(h) = s.hosts.get_mut(host) {
                h.health = Health::Lost;
            }
            for d in s.deployments_where(|d| d.replicas.iter().any(|r| r.host == *host)) {
                d.replicas.retain(|r| r.host != *host);
            }
        }
        Action::AcceptReport {
            host,
            adopt,
            adopt_retiring,
            forget,
            ..
        } => {
            if let Some(h) = s.hosts.get_mut(host) {
                h.reported = None;
            }
            let gone = |r: &Replica| r.host == *host && forget.contains(&r.id);
            for d in s.deployments_where(|d| d.replicas.iter().any(gone)) {
                d.replicas.retain(|r| !gone(r));
            }
            for (r, retiring) in adopt
                .iter()
                .map(|r| (r, false))
                .chain(adopt_retiring.iter().map(|r| (r, true)))
            {
                let Some(d) = deployment(s, &r.graph_id) else {
                    continue;
                };
                if r.epoch <= MAX_EPOCH {
                    d.epoch = d.epoch.max(r.epoch);
                    d.published = d.published.max(r.epoch);
                }
                if let Some(n) = replica_number(&r.replica) {
                    d.next_replica = d.next_replica.max(n.saturating_add(1));
                }
                let replica = adopted(r, host, d, now);
                let list = if retiring {
                    &mut d.retiring
                } else {
                    &mut d.replicas
                };
                if !list.iter().any(|x| x.id == replica.id) {
                    list.push(replica);
                }
            }
        }
        Action::SwitchVersion { graph_id, .. } => {
            let Some(record) = s.wanted.get(graph_id).cloned() else {
                return;
            };
            let Some(d) = s.deployment_mut(graph_id) else {
                return;
            };
            let mut moved = std::mem::take(&mut d.replicas);
            d.retiring.append(&mut moved);
            d.drain_until = None;
            d.record = (*record).clone();
            d.unplaceable.clear();
            d.failures.clear();
        }
        Action::Undeploy { graph_id, .. } => {
            s.deployments.remove(graph_id);
        }
        Action::Place {
            graph_id,
            task,
            replica,
            host,
            resources,
            ..
        } => {
            // A warm VM of its shape there is now its (until the host's next heartbeat says).
            if let Some(w) = s.hosts.get_mut(host).and_then(|h| {
                h.warm
                    .iter_mut()
                    .find(|w| w.count > 0 && w.holds(resources))
            }) {
                w.count -= 1;
            }
            let Some(d) = deployment(s, graph_id) else {
                return;
            };
            d.unplaceable.remove(task);
            if let Some(n) = replica_number(replica) {
                d.next_replica = d.next_replica.max(n.saturating_add(1));
            }
            d.replicas.push(Replica {
                id: replica.clone(),
                task: task.clone(),
                host: host.clone(),
                addr: String::new(),
                state: ReplicaState::Provisioning { since: now },
                resources: *resources,
                placed_at: now,
            });
            // The first replica placed for a task being replaced is its replacement (also when
            // an earlier one failed to provision).
            let bad = d
                .replicas
                .iter()
                .filter(|r| r.task == *task && r.id != *replica)
                .filter(|r| d.replacing.contains_key(&r.id))
                .find(|r| d.replacement(&r.id).is_none())
                .map(|r| r.id.clone());
            if let Some(x) = bad.and_then(|b| d.replacing.get_mut(&b)) {
                x.by = Some(replica.clone());
            }
        }
        Action::Unplaceable {
            graph_id,
            task,
            reason,
        } => {
            if let Some(d) = deployment(s, graph_id) {
                d.unplaceable.insert(task.clone(), reason.clone());
            }
        }
        Action::Publish {
            graph_id,
            epoch,
            ready,
        } => {
            if let Some(d) = s.deployment_mut(graph_id) {
                d.epoch = *epoch;
                d.published = *epoch;
                d.published_ready = ready.clone();
            }
        }
        Action::StartDrain {
            graph_id, until, ..
        } => {
            if let Some(d) = s.deployment_mut(graph_id) {
                d.drain_until = Some(*until);
            }
        }
        Action::ScaleOut { graph_id, task, .. } => {
            if let Some(d) = deployment(s, graph_id) {
                d.scaled.entry(task.clone()).or_default().out_at = Some(now);
            }
        }
        Action::WarmPool { host, shapes, .. } => {
            if let Some(h) = s.hosts.get_mut(host) {
                h.warm_target = shapes.clone();
            }
        }
        Action::ForecastOnly {
            graph_id,
            task,
            would,
            ..
        } => {
            if let Some(d) = s.deployment_mut(graph_id) {
                d.scaled.entry(task.clone()).or_default().would = Some(*would);
            }
        }
        Action::ScaleIn {
            graph_id,
            task,
            replica,
            until,
            ..
        } => {
            if let Some(d) = s.deployment_mut(graph_id) {
                d.start_draining(replica, *until);
                d.scaled.entry(task.clone()).or_default().in_at = Some(now);
            }
        }
        Action::Replace {
            graph_id,
            replica,
            host,
            trigger,
            avoid_until,
            reason,
            ..
        } => {
            if let Some(d) = s.deployment_mut(graph_id) {
                d.replacing.insert(
                    replica.clone(),
                    crate::snapshot::Replacing {
                        since: now,
                        trigger: *trigger,
                        by: None,
                    },
                );
            }
            if let Some(until) = avoid_until {
                s.contended.insert(
                    host.clone(),
                    crate::snapshot::Contended {
                        until: *until,
                        reason: reason.clone(),
                    },
                );
            }
        }
        Action::Shed {
            graph_id,
            replica,
            until,
            ..
        } => {
            if let Some(d) = s.deployment_mut(graph_id) {
                d.start_draining(replica, *until);
                d.replacing.remove(replica);
            }
        }
        Action::RetireDrained {
            graph_id, replicas, ..
        } => {
            if let Some(d) = s.deployment_mut(graph_id) {
                d.draining
                    .retain(|(x, _)| !replicas.iter().any(|r| r.id == x.id));
            }
        }
        Action::Retire {
            graph_id, replicas, ..
        } => {
            if let Some(d) = s.deployment_mut(graph_id) {
                d.retiring
                    .retain(|x| !replicas.iter().any(|r| r.id == x.id));
                d.drain_until = None;
            }
        }
    }
}
