//! The warm pool: how many booted, idle VMs of each shape every microVM host keeps, so that a
//! new replica lands on a running VM instead of waiting out a boot.
//!
//! Per task of a graph with a `[scaling]` policy, the spare VMs wanted are the larger of its
//! `warm_vms` and what the plan adds next: the most replicas any forecast step in the lead time
//! after this one needs, beyond what the floor holds now (the replicas the plan will order one
//! lead time from now, so their VMs are booted before they are ordered). Within the task's
//! `max_replicas` and the graph's VM budget. Spare VMs are placed as its next replicas would
//! be ([`crate::placement::place`], on hosts that keep pools), so the replica placed later
//! finds its VM where placement sends it. Tasks with GPUs get none: a VM holding
//! passed-through GPUs is never kept idle.

use crate::placement::{self, Decision, Need};
use crate::predictive;
use crate::snapshot::{Health, Snapshot, WarmShape};
use std::collections::BTreeMap;
use std::time::Duration;

/// What one host is to keep, and why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    /// Sorted by shape; counts above zero.
    pub shapes: Vec<WarmShape>,
    pub reasons: Vec<String>,
}

/// Every pool-keeping host's target (hosts that are to keep nothing are absent).
pub fn targets(s: &Snapshot, now: Duration) -> BTreeMap<String, Target> {
    let mut out: BTreeMap<String, Target> = BTreeMap::new();
    if !s
        .hosts
        .values()
        .any(|h| h.pools && h.health == Health::Ready)
    {
        return out;
    }
    let mut needs = Vec::new();
    // Per (graph, task) with spares: why, and the shape of its VMs.
    let mut why: BTreeMap<(String, String), (String, prescient_schemas::Resources)> =
        BTreeMap::new();
    for (id, d) in &s.deployments {
        let Some(policy) = d.record.graph.scaling.as_ref() else {
            continue;
        };
        let graph_total: usize = d
            .record
            .graph
            .tasks
            .iter()
            .map(|t| d.sized_count(&t.id))
            .sum();
        let mut budget = policy
            .max_vms
            .map_or(usize::MAX, |v| (v as usize).saturating_sub(graph_total));
        for task in &d.record.graph.tasks {
            let r = &task.resources;
            if r.gpus > 0 || r.gpu_memory_bytes > 0 {
                continue;
            }
            let tp = policy.for_task(&task.id);
            let have = d.sized_count(&task.id);
            let (ahead, plan_why) = planned_ahead(d, policy, task, have, now);
            let spare = (tp.warm_vms as usize)
                .max(ahead)
                .min((tp.max_replicas as usize).saturating_sub(have))
                .min(budget);
            if spare == 0 {
                continue;
            }
            budget -= spare;
            let reason = if ahead > tp.warm_vms as usize {
                plan_why
            } else {
                format!("warm_vms = {}", tp.warm_vms)
            };
            why.insert((id.clone(), task.id.clone()), (reason, *r));
            needs.push(Need {
                graph_id: id.clone(),
                task: task.id.clone(),
                resources: *r,
                count: spare,
                occupied: d
                    .replicas
                    .iter()
                    .filter(|x| x.task == task.id)
                    .map(|x| x.host.clone())
                    .collect(),
                near: None,
                exclude: s
                    .hosts
                    .values()
                    .filter(|h| !h.pools)
                    .map(|h| h.name.clone())
                    .collect(),
                exclude_why: "they keep no warm pool".into(),
                avoid: d.failed_on.get(&task.id).cloned(),
            });
        }
    }
    let views = placement::host_views(s, now);
    let mut counted: BTreeMap<(String, String, String), u32> = BTreeMap::new();
    for decision in placement::place(&needs, &views) {
        if let Decision::Place {
            graph_id,
            task,
            host,
            ..
        } = decision
        {
            let Some((_, r)) = why.get(&(graph_id.clone(), task.clone())) else {
                continue;
            };
            let target = out.entry(host.clone()).or_default();
            match target.shapes.iter_mut().find(|w| w.holds(r)) {
                Some(w) => w.count += 1,
                None => target.shapes.push(WarmShape {
                    cpu_millicores: r.cpu_millicores,
                    memory_bytes: r.memory_bytes,
                    count: 1,
                }),
            }
            *counted.entry((host, graph_id, task)).or_default() += 1;
        }
    }
    for ((host, graph_id, task), n) in counted {
        let because = why
            .get(&(graph_id.clone(), task.clone()))
            .map_or("", |(reason, _)| reason.as_str());
        if let Some(t) = out.get_mut(&host) {
            t.reasons
                .push(format!("{n} for {graph_id}.{task} ({because})"));
        }
    }
    for t in out.values_mut() {
        t.shapes.sort();
    }
    out
}

/// The replicas the plan will order within the lead time after the current one, beyond the
/// most of `have` and the floor it holds now, and why.
fn planned_ahead(
    d: &crate::snapshot::Deployment,
    policy: &prescient_schemas::ScalingPolicy,
    task: &prescient_schemas::Task,
    have: usize,
    now: Duration,
) -> (usize, String) {
    if policy.predictive.mode != predictive::Mode::On {
        return (0, String::new());
    }
    let Some(plan) = predictive::plan_for(d, policy, task, now) else {
        return (0, String::new());
    };
    let floor = plan.floor.as_ref().map_or(0, |f| f.replicas as usize);
    let lead = plan.lead;
    let next = plan
        .steps
        .iter()
        .filter(|st| st.at > now + lead && st.at <= now + lead * 2)
        .max_by_key(|st| st.replicas);
    let Some(next) = next else {
        return (0, String::new());
    };
    let held = have.max(floor);
    let ahead = (next.replicas as usize).saturating_sub(held);
    let reason = format!(
        "the plan needs {} replicas from +{:.0} s, {held} held, lead time {:.1?}",
        next.replicas,
        next.at.saturating_sub(now).as_secs_f64(),
        lead
    );
    (ahead, reason)
}

/// The hosts whose pool target differs from what they were last told, with the new one.
pub fn changes(s: &Snapshot, now: Duration) -> Vec<(String, Target)> {
    let mut targets = targets(s, now);
    s.hosts
        .values()
        .filter(|h| h.pools && h.health == Health::Ready)
        .filter_map(|h| {
            let t = targets.remove(&h.name).unwrap_or_default();
            (t.shapes != h.warm_target).then(|| (h.name.clone(), t))
        })
        .collect()
}
