//! Replacement triggers: a replica that is slow, failing, or on a contended host is replaced
//! by one placed elsewhere, and shed once the replacement is routed.
//!
//! A replica is judged only on its own executions over the detection window (at least
//! [`MIN_EXECUTIONS`] of them, and not before it has served a whole window), against a
//! reference: the median of its task's other ready replicas, or, for a lone replica, its task's
//! calibrated execution time. The triggers, in the order they are tried:
//!
//! - *errors*: it fails at least `error_rate` of its executions and more than twice its peers'
//!   rate (a lone replica is not replaced for errors: its task fails wherever it runs);
//! - *host contention*: its cgroup was CPU-throttled in at least `throttled_share` of the
//!   periods, or its host shows CPU steal ≥ [`STEAL_SHARE`], run-queue p99 ≥
//!   [`RUN_QUEUE_P99_S`] or a GPU ≥ [`GPU_SATURATED`] busy, and its latency at the replica is
//!   `slow_factor` × the reference (queueing + execution p99 against its peers': contention
//!   shows in the tail; alone, p50 against the calibration), on as few as
//!   [`CONTENTION_MIN_EXECUTIONS`] (replica choice already sends it little); the host is then
//!   avoided by placement for the scale-in cooldown;
//! - *slow*: its execution p50 is `slow_factor` × its peers' (or, alone, the task's calibrated
//!   one). Queueing alone does not count: a backlog is load (sizing answers it) or imbalance
//!   (replica choice answers it) — a replica that kept a backlog from before a scale-out is
//!   not slow.
//!
//! One replacement per task at a time; a replacement that would exceed the task's maximum or
//! the graph's budget becomes a shed when peers can carry the load, and nothing otherwise.

use crate::snapshot::{Deployment, HostPressure, Replica, ReplicaHealth};
use prescient_schemas::ScalingPolicy;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Executions a replica needs in the window before it is judged slow or failing.
pub const MIN_EXECUTIONS: u64 = 10;
/// Executions a throttled replica on a contended host needs: replica choice sends such a
/// replica little, and what it does get still lands in the chain's tail.
pub const CONTENTION_MIN_EXECUTIONS: u64 = 3;
/// A host whose hypervisor steals this share of CPU time is contended.
pub const STEAL_SHARE: f64 = 0.2;
/// A host whose run-queue waits reach this at p99 is contended.
pub const RUN_QUEUE_P99_S: f64 = 0.02;
/// A host with a GPU this busy is contended (for the replicas that run slow there).
pub const GPU_SATURATED: f64 = 0.95;

/// What makes `host` contended by its own samples, if anything.
fn host_evidence(host: &str, p: &HostPressure) -> Option<String> {
    if p.cpu_steal >= STEAL_SHARE {
        return Some(format!(
            "{host} loses {:.0}% of its CPU to steal",
            p.cpu_steal * 100.0
        ));
    }
    if let Some(rq) = p.run_queue_p99_s.filter(|rq| *rq >= RUN_QUEUE_P99_S) {
        return Some(format!(
            "{host}'s run-queue waits reach {:.1} ms at p99",
            rq * 1e3
        ));
    }
    if let Some(g) = p.gpu_util_max.filter(|g| *g >= GPU_SATURATED) {
        return Some(format!("{host}'s busiest GPU is {:.0}% busy", g * 100.0));
    }
    None
}

/// What made a replica bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Errors,
    Contention,
    Slow,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Errors => "errors",
            Trigger::Contention => "host contention",
            Trigger::Slow => "slow replica",
        })
    }
}

/// What a trigger decided for one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub task: String,
    pub replica: String,
    pub host: String,
    pub trigger: Trigger,
    /// Whether a replacement fits the task's maximum and the graph's budget; if not, the
    /// replica is shed at once (it has peers).
    pub surge: bool,
    pub reason: String,
}

fn ms(s: f64) -> String {
    format!("{:.1} ms", s * 1e3)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The replicas of `d` to replace now under `policy`.
pub fn verdicts(
    d: &Deployment,
    policy: &ScalingPolicy,
    pressure: &BTreeMap<String, HostPressure>,
    now: Duration,
) -> Vec<Verdict> {
    let window = Duration::from_nanos(policy.detect_window_ns);
    let judged = |r: &Replica| -> Option<ReplicaHealth> {
        let ready_since = match r.state {
            crate::snapshot::ReplicaState::Ready { since } => since,
            crate::snapshot::ReplicaState::Provisioning { .. } => return None,
        };
        // Its window must be all its own serving time.
        if now < ready_since + window {
            return None;
        }
        d.health
            .get(&r.id)
            .copied()
            .filter(|h| h.executions >= CONTENTION_MIN_EXECUTIONS)
    };
    let mut total = d.replicas.len() as u32;
    let budget = policy.max_vms.unwrap_or(u32::MAX);
    let mut out = Vec::new();
    for t in &d.record.graph.tasks {
        let mine: Vec<&Replica> = d.replicas.iter().filter(|r| r.task == t.id).collect();
        if mine.iter().any(|r| d.replacing.contains_key(&r.id)) {
            continue;
        }
        let healths: Vec<(&Replica, ReplicaHealth)> = mine
            .iter()
            .filter_map(|r| judged(r).map(|h| (*r, h)))
            .collect();
        let calibrated = d.load.get(&t.id).map_or(0.0, |l| l.calibrated_s);
        let mut found = None;
        for (r, h) in &healths {
            let peers: Vec<&ReplicaHealth> = healths
                .iter()
                .filter(|(o, _)| o.id != r.id)
                .map(|(_, h)| h)
                .collect();
            let latency = h.queue_p50_s + h.exec_p50_s;
            let rate = h.errors as f64 / h.executions as f64;
            let peer_rate = {
                let (e, n) = peers
                    .iter()
                    .fold((0u64, 0u64), |(e, n), p| (e + p.errors, n + p.executions));
                (n > 0).then(|| e as f64 / n as f64)
            };
            let peer_latency = median(peers.iter().map(|p| p.queue_p50_s + p.exec_p50_s).collect());
            let peer_exec = median(peers.iter().map(|p| p.exec_p50_s).collect());
            let tail = h.queue_p99_s + h.exec_p99_s;
            let peer_tail = median(peers.iter().map(|p| p.queue_p99_s + p.exec_p99_s).collect());
            let k = policy.slow_factor;
            let enough = h.executions >= MIN_EXECUTIONS;
            let verdict = if let Some(pr) =
                peer_rate.filter(|pr| enough && rate >= policy.error_rate && rate > 2.0 * pr)
            {
                Some((
                    Trigger::Errors,
                    format!(
                        "{} failed {:.0}% of its {} executions in {window:?}, its task's other replicas {:.1}%",
                        r.id,
                        rate * 100.0,
                        h.executions,
                        pr * 100.0
                    ),
                ))
            } else {
                // The reference: the peers' latency, or alone, the calibrated execution time.
                let (reference, against) = match peer_latency {
                    Some(p) => (p, "its task's other replicas'"),
                    None => (calibrated, "its task's calibrated execution p50"),
                };
                // Contention shows in the tail (a throttled group waits out whole periods), so
                // against peers it compares p99s; alone, the median against the calibration.
                let (contended_slow, measured, what) = match peer_tail {
                    Some(p) => (p > 0.0 && tail >= k * p, (tail, p), "p99"),
                    None => (
                        reference > 0.0 && latency >= k * reference,
                        (latency, reference),
                        "p50",
                    ),
                };
                let evidence = if h.throttled_share >= policy.throttled_share {
                    Some(format!(
                        "{} on {} was CPU-throttled in {:.0}% of its periods",
                        r.id,
                        r.host,
                        h.throttled_share * 100.0
                    ))
                } else {
                    pressure
                        .get(&r.host)
                        .and_then(|p| host_evidence(&r.host, p))
                        .map(|e| format!("{} on {}: {e}", r.id, r.host))
                };
                if let Some(evidence) = evidence.filter(|_| contended_slow) {
                    Some((
                        Trigger::Contention,
                        format!(
                            "{evidence}; queueing + execution {what} {} is {:.1}× {against} {}",
                            ms(measured.0),
                            measured.0 / measured.1,
                            ms(measured.1)
                        ),
                    ))
                } else if !enough {
                    None
                } else if let Some(p) = peer_exec.filter(|p| *p > 0.0 && h.exec_p50_s >= k * p) {
                    Some((
                        Trigger::Slow,
                        format!(
                            "{}: execution p50 {} is {:.1}× its task's other replicas' {} over {window:?}",
                            r.id,
                            ms(h.exec_p50_s),
                            h.exec_p50_s / p,
                            ms(p)
                        ),
                    ))
                } else if peer_latency.is_none()
                    && calibrated > 0.0
                    && h.exec_p50_s >= k * calibrated
                {
                    Some((
                        Trigger::Slow,
                        format!(
                            "{}: execution p50 {} is {:.1}× {against} {} over {window:?}",
                            r.id,
                            ms(h.exec_p50_s),
                            h.exec_p50_s / calibrated,
                            ms(calibrated)
                        ),
                    ))
                } else {
                    None
                }
            };
            if let Some((trigger, reason)) = verdict {
                // The worst first: errors, then the slowest.
                let rank = (trigger == Trigger::Errors, latency);
                if found
                    .as_ref()
                    .is_none_or(|(best, ..): &((bool, f64), _, _, _)| rank > *best)
                {
                    found = Some((rank, *r, trigger, reason));
                }
            }
        }
        let Some((_, r, trigger, reason)) = found else {
            continue;
        };
        let max = policy.for_task(&t.id).max_replicas;
        let surge = (mine.len() as u32) < max && total < budget;
        let has_peers = mine.iter().any(|o| o.id != r.id && o.is_ready());
        if !surge && !has_peers {
            continue;
        }
        if surge {
            total += 1;
        }
        out.push(Verdict {
            task: t.id.clone(),
            replica: r.id.clone(),
            host: r.host.clone(),
            trigger,
            surge,
            reason,
        });
    }
    out
}
