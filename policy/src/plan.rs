//! `plan`: one reconcile pass as a pure function. Heartbeat loss, registration reports,
//! removed graphs and new versions, bad replicas to replace, replicas missing (placed with
//! backoff), scale-ins, replaced replicas to shed, routing tables due, and drains and
//! retirements, in that order.

use crate::action::{apply, Action};
use crate::placement::{self, Decision, Need};
use crate::replace::{self, Trigger};
use crate::scaling::{self, Sizing};
use crate::snapshot::{Health, ReplicaState, Snapshot, MAX_EPOCH};
use crate::Config;
use prescient_schemas::ValidatedGraph;
use std::time::Duration;

/// Decides what to do now. `now` is time since the driver's origin (the control node's start),
/// the same clock as every [`Duration`] in the snapshot.
pub fn plan(snapshot: &Snapshot, config: &Config, now: Duration) -> Vec<Action> {
    // Copied on the first action only: a pass that decides nothing copies nothing.
    let mut work = std::borrow::Cow::Borrowed(snapshot);
    let mut out = Vec::new();
    let mut emit = |work: &mut std::borrow::Cow<'_, Snapshot>, a: Action| {
        apply(work.to_mut(), &a, now);
        out.push(a);
    };
    for a in lost_hosts(&work, config, now) {
        emit(&mut work, a);
    }
    for a in reports(&work) {
        emit(&mut work, a);
    }
    // After a restart, agents get `startup_grace` to report what they run before anything is
    // placed, so a restart re-provisions nothing that still runs.
    if now < config.startup_grace {
        return out;
    }
    for a in stale(&work) {
        emit(&mut work, a);
    }
    for a in replacements(&work, config, now) {
        emit(&mut work, a);
    }
    for a in placements(&work, config, now) {
        emit(&mut work, a);
    }
    for a in scale_ins(&work, config, now) {
        emit(&mut work, a);
    }
    for a in sheds(&work, config, now) {
        emit(&mut work, a);
    }
    for a in publications(&work) {
        emit(&mut work, a);
    }
    for a in drains(&work, config, now) {
        emit(&mut work, a);
    }
    for (host, t) in crate::warm::changes(&work, now) {
        let a = Action::WarmPool {
            host,
            shapes: t.shapes,
            reason: t.reasons.join("; "),
        };
        emit(&mut work, a);
    }
    out
}

/// When a pass is next due even if nothing changes: a heartbeat deadline, a backoff ending, a
/// drain ending, the end of the startup grace.
pub fn next_deadline(s: &Snapshot, config: &Config, now: Duration) -> Option<Duration> {
    let heartbeats = s
        .hosts
        .values()
        .filter(|h| h.health == Health::Ready)
        .map(|h| h.last_heartbeat + config.heartbeat_timeout);
    let backoffs = s.deployments.values().flat_map(|d| {
        d.failures
            .values()
            .map(|f| f.last_at + config.backoff.delay(f.count))
    });
    let drains = s.deployments.values().flat_map(|d| {
        d.drain_until
            .into_iter()
            .chain(d.draining.iter().map(|(_, t)| *t))
    });
    let grace = (now < config.startup_grace).then_some(config.startup_grace);
    heartbeats
        .chain(backoffs)
        .chain(drains)
        .chain(grace)
        .filter(|t| *t > now)
        .min()
}

fn lost_hosts(s: &Snapshot, config: &Config, now: Duration) -> Vec<Action> {
    s.hosts
        .values()
        .filter(|h| h.health == Health::Ready)
        .filter(|h| now.saturating_sub(h.last_heartbeat) > config.heartbeat_timeout)
        .map(|h| Action::MarkLost {
            host: h.name.clone(),
            silent: now.saturating_sub(h.last_heartbeat),
            limit: config.heartbeat_timeout,
            replicas: s
                .deployments
                .values()
                .flat_map(|d| &d.replicas)
                .filter(|r| r.host == h.name)
                .map(|r| r.id.clone())
                .collect(),
        })
        .collect()
}

fn reports(s: &Snapshot) -> Vec<Action> {
    let mut out = Vec::new();
    for h in s.hosts.values().filter(|h| h.health == Health::Ready) {
        let Some(reported) = &h.reported else {
            continue;
        };
        // Replicas believed to be on this host that it no longer runs (provisioning ones are
        // on their way and answer for themselves).
        let forget = s
            .deployments
            .values()
            .flat_map(|d| &d.replicas)
            .filter(|r| r.host == h.name && matches!(r.state, ReplicaState::Ready { .. }))
            .filter(|r| !reported.iter().any(|x| x.replica == r.id))
            .map(|r| r.id.clone())
            .collect();
        let (mut adopt, mut adopt_retiring, mut orphans) = (Vec::new(), Vec::new(), Vec::new());
        for r in reported {
            let Some(record) = s.wanted.get(&r.graph_id) else {
                orphans.push(r.clone());
                continue;
            };
            let d = s.deployments.get(&r.graph_id);
            let known = d.is_some_and(|d| {
                d.replicas
                    .iter()
                    .chain(&d.retiring)
                    .any(|x| x.id == r.replica)
            });
            if known {
                continue;
            }
            // A replica of the live version is adopted; one of an older version serves until
            // the live version is ready, like any replaced version's.
            if r.version == record.version {
                adopt.push(r.clone());
            } else if r.version < record.version {
                adopt_retiring.push(r.clone());
            } else {
                orphans.push(r.clone());
            }
        }
        out.push(Action::AcceptReport {
            host: h.name.clone(),
            adopt,
            adopt_retiring,
            forget,
            orphans,
        });
    }
    out
}

fn stale(s: &Snapshot) -> Vec<Action> {
    s.deployments
        .iter()
        .filter_map(|(id, d)| match s.wanted.get(id) {
            None => Some(Action::Undeploy {
                graph_id: id.clone(),
                replicas: d.replicas.len() + d.retiring.len(),
            }),
            Some(r) if r.version != d.record.version => Some(Action::SwitchVersion {
                graph_id: id.clone(),
                from: d.record.version,
                to: r.version,
                moved: d.replicas.len(),
            }),
            Some(_) => None,
        })
        .collect()
}

/// Replicas needed per task — a graph's `[scaling]` sizing (see [`crate::scaling`]), or else
/// the control node's minimum for every task — placed in topological order per graph; a task
/// whose replicas keep failing waits out its backoff.
fn placements(s: &Snapshot, config: &Config, now: Duration) -> Vec<Action> {
    let mut needs = Vec::new();
    let mut out = Vec::new();
    for (id, record) in &s.wanted {
        let d = s.deployments.get(id);
        let backing_off = |task: &str| {
            d.and_then(|d| d.failures.get(task))
                .is_some_and(|f| f.last_at + config.backoff.delay(f.count) > now)
        };
        // Sizing applies to the version deployed; a new version waits for its switch.
        let sized = match (&record.graph.scaling, d) {
            (Some(policy), Some(d)) if d.record.version == record.version => Some(
                scaling::size(d, policy, now)
                    .into_iter()
                    .filter_map(|z| match z {
                        Sizing::Out {
                            task,
                            from,
                            to,
                            reason,
                        } if !backing_off(&task) => Some((task, from, to, reason)),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            (Some(policy), None) => Some(
                record
                    .graph
                    .tasks
                    .iter()
                    .map(|t| {
                        let min = policy.for_task(&t.id).min_replicas;
                        let why = format!("{}: a new graph starts at its minimum of {min}", t.id);
                        (t.id.clone(), 0, min, why)
                    })
                    .collect(),
            ),
            _ => None,
        };
        // Replicas wanted and healthy ones (a replica being replaced and its placed
        // replacement count once for sizing; what is placed is what the healthy lack).
        let wanted_healthy = |task: &str| {
            let have = d.map_or(0, |d| d.replicas.iter().filter(|r| r.task == task).count());
            let sized_have = d.map_or(have, |d| d.sized_count(task));
            let wanted = match &sized {
                Some(sized) => sized
                    .iter()
                    .find(|(t, ..)| t == task)
                    .map_or(sized_have, |(_, _, to, _)| *to as usize),
                None => config.min_replicas,
            };
            let bad = d.map_or(0, |d| {
                d.replicas
                    .iter()
                    .filter(|r| r.task == task && d.replacing.contains_key(&r.id))
                    .count()
            });
            (wanted, have - bad)
        };
        // Most graphs need nothing in most passes: they are not validated again. (A scale-out
        // always leaves a task short, so none is lost.)
        let short = |task: &str| {
            let (wanted, healthy) = wanted_healthy(task);
            healthy < wanted
        };
        if !record
            .graph
            .tasks
            .iter()
            .any(|t| !backing_off(&t.id) && short(&t.id))
        {
            continue;
        }
        let Ok(v) = ValidatedGraph::new(record.graph.clone()) else {
            continue;
        };
        for (task, from, to, reason) in sized.iter().flatten() {
            if d.is_some() {
                out.push(Action::ScaleOut {
                    graph_id: id.clone(),
                    task: task.clone(),
                    from: *from,
                    to: *to,
                    reason: reason.clone(),
                });
            }
        }
        for task in v.topological_order() {
            if backing_off(task) {
                continue;
            }
            let have: Vec<&str> = d
                .map(|d| {
                    d.replicas
                        .iter()
                        .filter(|r| r.task == task)
                        .map(|r| r.host.as_str())
                        .collect()
                })
                .unwrap_or_default();
            let Some(t) = record.graph.task(task) else {
                continue;
            };
            let (wanted, healthy) = wanted_healthy(task);
            let bad = have.len() - healthy;
            if healthy < wanted {
                // A running graph's new replicas join the upstream task's new one where the
                // same pass places both (the chain grows as a local copy).
                let near = d
                    .filter(|_| !have.is_empty())
                    .and_then(|_| v.upstream(task).first().map(|u| u.to_string()));
                // Replacing: never where the bad replicas run, nor on a contended host.
                let (exclude, exclude_why) = match d {
                    Some(d) if bad > 0 => {
                        let mut hosts: Vec<String> = d
                            .replicas
                            .iter()
                            .filter(|r| r.task == task && d.replacing.contains_key(&r.id))
                            .map(|r| r.host.clone())
                            .chain(
                                s.contended
                                    .iter()
                                    .filter(|(_, c)| c.until > now)
                                    .map(|(h, _)| h.clone()),
                            )
                            .collect();
                        hosts.sort();
                        hosts.dedup();
                        (
                            hosts,
                            "where the replicas being replaced run, or contended".to_string(),
                        )
                    }
                    _ => (Vec::new(), String::new()),
                };
                needs.push(Need {
                    graph_id: id.clone(),
                    task: task.to_string(),
                    resources: t.resources,
                    count: wanted - healthy,
                    occupied: have.iter().map(|h| h.to_string()).collect(),
                    near,
                    exclude,
                    exclude_why,
                    avoid: d.and_then(|d| d.failed_on.get(task)).cloned(),
                });
            }
        }
    }
    let mut next: std::collections::BTreeMap<String, u64> = s
        .deployments
        .iter()
        .map(|(id, d)| (id.clone(), d.next_replica))
        .collect();
    if needs.is_empty() {
        return out;
    }
    for decision in placement::place(&needs, &placement::host_views(s, now)) {
        match decision {
            Decision::Place {
                graph_id,
                task,
                host,
                reason,
            } => {
                let Some(t) = s.wanted.get(&graph_id).and_then(|r| r.graph.task(&task)) else {
                    continue;
                };
                let n = next.entry(graph_id.clone()).or_insert(1);
                let replica = format!("{graph_id}.{task}.r{n}");
                *n += 1;
                out.push(Action::Place {
                    resources: t.resources,
                    graph_id: graph_id.clone(),
                    task,
                    replica,
                    host,
                    reason,
                });
            }
            Decision::Unplaceable {
                graph_id,
                task,
                reason,
            } => {
                let said = s
                    .deployments
                    .get(&graph_id)
                    .and_then(|d| d.unplaceable.get(&task));
                if said != Some(&reason) {
                    out.push(Action::Unplaceable {
                        graph_id,
                        task,
                        reason,
                    });
                }
            }
        }
    }
    out
}

/// A new epoch where the ready replicas changed. While a replaced version still serves, the
/// table switches only once every task of the new version has a ready replica.
fn publications(s: &Snapshot) -> Vec<Action> {
    let mut out = Vec::new();
    for (id, d) in &s.deployments {
        if !d.retiring.is_empty() && !d.complete() {
            continue;
        }
        let ready = d.ready();
        if d.published > 0 && d.epoch == d.published && d.published_ready == ready {
            continue;
        }
        if ready.is_empty() && d.published == 0 {
            continue;
        }
        // Adoption refuses epochs above MAX_EPOCH, so this never overflows in practice; if it
        // would, the table stays as it is rather than going back.
        let Some(epoch) = d.epoch.checked_add(1).filter(|e| *e <= MAX_EPOCH + 1) else {
            continue;
        };
        out.push(Action::Publish {
            graph_id: id.clone(),
            epoch,
            ready,
        });
    }
    out
}

/// One fewer replica where sizing says so (not while a version switch is under way).
fn scale_ins(s: &Snapshot, config: &Config, now: Duration) -> Vec<Action> {
    let mut out = Vec::new();
    for (id, d) in &s.deployments {
        let Some(policy) = s.wanted.get(id).and_then(|r| r.graph.scaling.as_ref()) else {
            continue;
        };
        if !d.retiring.is_empty() || s.wanted[id].version != d.record.version {
            continue;
        }
        for z in scaling::size(d, policy, now) {
            match z {
                Sizing::In {
                    task,
                    replica,
                    from,
                    reason,
                } => out.push(Action::ScaleIn {
                    graph_id: id.clone(),
                    task,
                    replica,
                    from,
                    drain: config.drain,
                    until: now + config.drain,
                    reason,
                }),
                Sizing::Would {
                    task,
                    have,
                    would,
                    reason,
                } => out.push(Action::ForecastOnly {
                    graph_id: id.clone(),
                    task,
                    have,
                    would,
                    reason,
                }),
                Sizing::Out { .. } => {}
            }
        }
    }
    out
}

/// Replicas the replacement triggers find bad (see [`crate::replace`]), in graphs with a
/// `[scaling]` policy whose version is settled.
fn replacements(s: &Snapshot, config: &Config, now: Duration) -> Vec<Action> {
    let mut out = Vec::new();
    for (id, d) in &s.deployments {
        let Some(record) = s.wanted.get(id) else {
            continue;
        };
        let Some(policy) = record.graph.scaling.as_ref() else {
            continue;
        };
        if !d.retiring.is_empty() || record.version != d.record.version {
            continue;
        }
        for v in replace::verdicts(d, policy, &s.pressure, now) {
            if v.surge {
                let hold = Duration::from_nanos(policy.scale_in_cooldown_ns);
                out.push(Action::Replace {
                    graph_id: id.clone(),
                    task: v.task,
                    replica: v.replica,
                    host: v.host,
                    trigger: v.trigger,
                    avoid_until: (v.trigger == Trigger::Contention).then_some(now + hold),
                    reason: v.reason,
                });
            } else {
                out.push(Action::Shed {
                    graph_id: id.clone(),
                    task: v.task,
                    replica: v.replica,
                    by: Vec::new(),
                    drain: config.drain,
                    until: now + config.drain,
                    reason: format!(
                        "{}: {}; no room for a replacement (its task's maximum or the graph's budget)",
                        v.trigger, v.reason
                    ),
                });
            }
        }
    }
    out
}

/// A replica being replaced leaves the table once a replacement placed after it went bad is
/// ready and routed.
fn sheds(s: &Snapshot, config: &Config, now: Duration) -> Vec<Action> {
    let mut out = Vec::new();
    for (id, d) in &s.deployments {
        for (rid, rep) in &d.replacing {
            let Some(bad) = d.replica(rid) else {
                continue;
            };
            let by: Vec<String> = d
                .replacement(rid)
                .into_iter()
                .filter(|o| o.is_ready())
                .filter(|o| d.published_ready.contains(&format!("{}@{}", o.id, o.host)))
                .map(|o| o.id.clone())
                .collect();
            if by.is_empty() {
                continue;
            }
            out.push(Action::Shed {
                graph_id: id.clone(),
                task: bad.task.clone(),
                replica: rid.clone(),
                by,
                drain: config.drain,
                until: now + config.drain,
                reason: format!(
                    "{} ({} for {:?})",
                    rep.trigger,
                    bad.host,
                    now.saturating_sub(rep.since)
                ),
            });
        }
    }
    out
}

fn drains(s: &Snapshot, config: &Config, now: Duration) -> Vec<Action> {
    let mut out = Vec::new();
    for (id, d) in &s.deployments {
        let done: Vec<_> = d
            .draining
            .iter()
            .filter(|(_, until)| *until <= now)
            .map(|(r, _)| r.clone())
            .collect();
        if !done.is_empty() {
            out.push(Action::RetireDrained {
                graph_id: id.clone(),
                drain: config.drain,
                replicas: done,
            });
        }
        if d.retiring.is_empty() {
            continue;
        }
        match d.drain_until {
            None if d.published > 0 && d.complete() && d.published_ready == d.ready() => {
                out.push(Action::StartDrain {
                    graph_id: id.clone(),
                    version: d.record.version,
                    drain: config.drain,
                    until: now + config.drain,
                    replicas: d.retiring.iter().map(|r| r.id.clone()).collect(),
                })
            }
            Some(until) if until <= now => out.push(Action::Retire {
                graph_id: id.clone(),
                version: d.record.version,
                drain: config.drain,
                replicas: d.retiring.clone(),
            }),
            _ => {}
        }
    }
    out
}
