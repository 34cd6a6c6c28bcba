//! Placement: which host gets each new replica. Pure: a function of the hosts' free resources and
//! the replicas wanted, so the live node and the simulator make the same choices.
//!
//! Policy: a host must fit the replica's CPU, memory, GPUs, GPU memory and network bandwidth
//! (where the host knows its NICs' speed); among those, hosts without a replica of the same task
//! come first (anti-affinity: losing one host never loses a task),
//! then the host with the most free CPU (spread), then the fewest replicas, then by name. Two
//! things come before all of those: a host that is contended (a replica was moved off it for
//! contention) is used only when no other fits, and a replica that grows a running chain goes
//! where the same pass just put its upstream task's new replica (chain-local: the new copy of
//! the chain keeps its hops on one host). Between those, a host where a warm VM of the replica's
//! shape waits (its warm pool) comes first: the replica starts there at once, in capacity
//! already held for it.

use crate::snapshot::{Health, Host, Snapshot, WarmShape};
use prescient_schemas::quantity::format_bytes;
use prescient_schemas::Resources;

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub name: String,
    pub cpu_free_millicores: u64,
    pub memory_free_bytes: u64,
    pub gpus_free: u32,
    pub gpu_memory_free_bytes: u64,
    /// `None`: the host does not know its NICs' speed, so bandwidth is not checked.
    pub network_free_bits_per_sec: Option<u64>,
    pub replicas: usize,
    /// Why the host is avoided, while it is.
    pub contended: Option<String>,
    /// Its booted, idle VMs (their resources are not free; a replica of their shape takes one).
    pub warm: Vec<WarmShape>,
}

/// The ready hosts with what they have free: capacity less every replica they hold, retiring
/// ones included (those hold their resources until they are gone); contended ones marked.
pub fn host_views(s: &Snapshot, now: std::time::Duration) -> Vec<HostView> {
    let mut views: Vec<HostView> = s
        .hosts
        .values()
        .filter(|h| h.health == Health::Ready)
        .map(|h| {
            let mut v = empty_view(h);
            v.contended = s
                .contended
                .get(&h.name)
                .filter(|c| c.until > now)
                .map(|c| c.reason.clone());
            v
        })
        .collect();
    // One pass over every replica, each charged to its host by name: a thousand hosts and
    // thousands of replicas cost their sum, not their product.
    let at: std::collections::HashMap<&str, usize> = views
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let mut charges = Vec::new();
    for r in held(s) {
        if let Some(&i) = at.get(r.host.as_str()) {
            charges.push((i, r.resources));
        }
    }
    for (i, r) in charges {
        views[i].take(&r);
    }
    views
}

/// Every replica holding resources on its host: current, retiring and draining ones (those
/// hold theirs until they are gone).
fn held(s: &Snapshot) -> impl Iterator<Item = &crate::snapshot::Replica> {
    s.deployments.values().flat_map(|d| {
        d.replicas
            .iter()
            .chain(&d.retiring)
            .chain(d.draining.iter().map(|(r, _)| r))
    })
}

/// A host's capacity less its warm VMs, before any replica is charged.
fn empty_view(h: &Host) -> HostView {
    let c = h.capacity;
    let mut v = HostView {
        name: h.name.clone(),
        cpu_free_millicores: c.cpu_millicores,
        memory_free_bytes: c.memory_bytes,
        gpus_free: c.gpus,
        gpu_memory_free_bytes: c.gpu_memory_bytes,
        network_free_bits_per_sec: c.network_bits_per_sec,
        replicas: 0,
        contended: None,
        warm: Vec::new(),
    };
    for w in &h.warm {
        let r = Resources {
            cpu_millicores: w.cpu_millicores,
            memory_bytes: w.memory_bytes,
            ..Resources::default()
        };
        for _ in 0..w.count {
            v.take(&r);
        }
    }
    v.replicas = 0;
    v.warm = h.warm.iter().filter(|w| w.count > 0).copied().collect();
    v
}

/// One host with what it has free.
pub fn host_view(s: &Snapshot, h: &Host) -> HostView {
    let mut v = empty_view(h);
    for r in held(s).filter(|r| r.host == h.name) {
        v.take(&r.resources);
    }
    v
}

impl HostView {
    /// Whether a warm VM for `r` waits here.
    pub fn warm_for(&self, r: &Resources) -> bool {
        self.warm.iter().any(|w| w.count > 0 && w.holds(r))
    }

    fn fits(&self, r: &Resources) -> bool {
        self.warm_for(r) || self.fits_free(r)
    }

    fn fits_free(&self, r: &Resources) -> bool {
        self.cpu_free_millicores >= u64::from(r.cpu_millicores)
            && self.memory_free_bytes >= r.memory_bytes
            && self.gpus_free >= r.gpus
            && self.gpu_memory_free_bytes >= r.gpu_memory_bytes
            && self
                .network_free_bits_per_sec
                .is_none_or(|n| n >= r.network_bits_per_sec)
    }

    /// Charges a replica needing `r`: to a warm VM of its shape if one waits (its capacity is
    /// already held), else to what is free.
    fn take(&mut self, r: &Resources) {
        if let Some(w) = self.warm.iter_mut().find(|w| w.count > 0 && w.holds(r)) {
            w.count -= 1;
            self.replicas += 1;
            return;
        }
        self.cpu_free_millicores = self
            .cpu_free_millicores
            .saturating_sub(u64::from(r.cpu_millicores));
        self.memory_free_bytes = self.memory_free_bytes.saturating_sub(r.memory_bytes);
        self.gpus_free = self.gpus_free.saturating_sub(r.gpus);
        self.gpu_memory_free_bytes = self
            .gpu_memory_free_bytes
            .saturating_sub(r.gpu_memory_bytes);
        self.network_free_bits_per_sec = self
            .network_free_bits_per_sec
            .map(|n| n.saturating_sub(r.network_bits_per_sec));
        self.replicas += 1;
    }
}

fn describe(r: &Resources) -> String {
    let mut s = format!(
        "{}m CPU, {} memory, {} GPUs",
        r.cpu_millicores,
        format_bytes(r.memory_bytes),
        r.gpus
    );
    if r.gpu_memory_bytes > 0 {
        s += &format!(", {} GPU memory", format_bytes(r.gpu_memory_bytes));
    }
    if r.network_bits_per_sec > 0 {
        s += &format!(", {} Mbit/s", r.network_bits_per_sec / 1_000_000);
    }
    s
}

fn describe_free(h: &HostView) -> String {
    let mut s = format!(
        "{} with {}m CPU, {} memory, {} GPUs",
        h.name,
        h.cpu_free_millicores,
        format_bytes(h.memory_free_bytes),
        h.gpus_free
    );
    if h.gpu_memory_free_bytes > 0 {
        s += &format!(", {} GPU memory", format_bytes(h.gpu_memory_free_bytes));
    }
    if let Some(n) = h.network_free_bits_per_sec {
        s += &format!(", {} Mbit/s", n / 1_000_000);
    }
    s
}

/// Replicas wanted for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Need {
    pub graph_id: String,
    pub task: String,
    pub resources: Resources,
    pub count: usize,
    /// Hosts already running a replica of this task.
    pub occupied: Vec<String>,
    /// The upstream task whose replica placed in the same pass this one should join (a chain
    /// grown together); `None` for a new graph's first replicas, which spread.
    pub near: Option<String>,
    /// Hosts it must not go to, and why (a replacement never lands where its bad replica
    /// runs, nor on a contended host).
    pub exclude: Vec<String>,
    pub exclude_why: String,
    /// A host it goes to only when no other fits: where its task's last replica failed to
    /// start or crashed young.
    pub avoid: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Place {
        graph_id: String,
        task: String,
        host: String,
        reason: String,
    },
    Unplaceable {
        graph_id: String,
        task: String,
        reason: String,
    },
}

/// Decides where each wanted replica goes, in the order the needs are given.
pub fn place(needs: &[Need], hosts: &[HostView]) -> Vec<Decision> {
    let mut hosts: Vec<HostView> = hosts.to_vec();
    // Hosts by name, so each need marks its hosts once and a choice reads flags: a thousand
    // hosts and a task of a hundred replicas cost their sum per placement, not their product.
    let index: std::collections::HashMap<String, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.clone(), i))
        .collect();
    let flags = |names: &mut dyn Iterator<Item = &str>| {
        let mut f = vec![false; index.len()];
        for n in names {
            if let Some(&i) = index.get(n) {
                f[i] = true;
            }
        }
        f
    };
    let mut out = Vec::new();
    // Where this pass put each (graph, task)'s new replicas, for chain-local placement.
    let mut placed: Vec<(&str, &str, String)> = Vec::new();
    for need in needs {
        let mut occupied = flags(&mut need.occupied.iter().map(String::as_str));
        let excluded = flags(&mut need.exclude.iter().map(String::as_str));
        let avoided = flags(&mut need.avoid.iter().map(String::as_str));
        let near: Vec<String> = need
            .near
            .as_deref()
            .map(|up| {
                placed
                    .iter()
                    .filter(|(g, t, _)| *g == need.graph_id && *t == up)
                    .map(|(_, _, h)| h.clone())
                    .collect()
            })
            .unwrap_or_default();
        let near = flags(&mut near.iter().map(String::as_str));
        for _ in 0..need.count {
            let r = &need.resources;
            let best = hosts
                .iter()
                .enumerate()
                .filter(|(i, h)| h.fits(r) && !excluded[*i])
                .min_by(|(i, a), (j, b)| {
                    let key = |i: usize, h: &HostView| {
                        let with_upstream = near[i] && !occupied[i];
                        (
                            h.contended.is_some(),
                            avoided[i],
                            !h.warm_for(r),
                            !with_upstream,
                            occupied[i],
                            std::cmp::Reverse(h.cpu_free_millicores),
                            h.replicas,
                        )
                    };
                    key(*i, a)
                        .cmp(&key(*j, b))
                        .then_with(|| a.name.cmp(&b.name))
                })
                .map(|(i, _)| i);
            let Some(i) = best else {
                let largest = hosts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !excluded[*i])
                    .map(|(_, h)| h)
                    .max_by_key(|h| h.cpu_free_millicores)
                    .map_or("no hosts are ready".to_string(), |h| {
                        format!("the most free is {}", describe_free(h))
                    });
                let besides = if need.exclude.is_empty() {
                    String::new()
                } else {
                    format!(
                        " besides {} ({})",
                        need.exclude.join(", "),
                        need.exclude_why
                    )
                };
                out.push(Decision::Unplaceable {
                    graph_id: need.graph_id.clone(),
                    task: need.task.clone(),
                    reason: format!("no host{besides} has {} free: {largest}", describe(r)),
                });
                break;
            };
            let already = occupied[i];
            let h = &mut hosts[i];
            let warm = if h.warm_for(r) {
                "; a warm VM of its shape waits there"
            } else {
                ""
            };
            let why = if near[i] && !already {
                format!(
                    "and just got the new replica of its upstream {}: the chain stays local",
                    need.near.as_deref().unwrap_or_default()
                )
            } else {
                "and is the least loaded".to_string()
            };
            let mut reason = format!(
                "{} needs a replica; {} fits it ({}m of {}m CPU free{}) {why}",
                need.task,
                h.name,
                r.cpu_millicores,
                h.cpu_free_millicores,
                if already {
                    ", though it already runs one"
                } else {
                    ""
                }
            );
            reason += warm;
            if let Some(c) = &h.contended {
                reason += &format!("; every other host is full, though it is contended ({c})");
            }
            match need.avoid.as_deref() {
                Some(a) if a == h.name => {
                    reason += "; every other host is full, though its last replica failed there"
                }
                Some(a) => reason += &format!("; not {a}, where its last replica failed"),
                None => {}
            }
            placed.push((&need.graph_id, &need.task, h.name.clone()));
            h.take(r);
            occupied[i] = true;
            out.push(Decision::Place {
                graph_id: need.graph_id.clone(),
                task: need.task.clone(),
                host: h.name.clone(),
                reason,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cpu: u64) -> HostView {
        HostView {
            name: name.into(),
            cpu_free_millicores: cpu,
            memory_free_bytes: 8 << 30,
            gpus_free: 0,
            gpu_memory_free_bytes: 0,
            network_free_bits_per_sec: None,
            replicas: 0,
            contended: None,
            warm: vec![],
        }
    }

    fn need(task: &str, cpu: u32, count: usize) -> Need {
        Need {
            graph_id: "g1".into(),
            task: task.into(),
            resources: Resources {
                cpu_millicores: cpu,
                ..Resources::default()
            },
            count,
            occupied: vec![],
            near: None,
            exclude: vec![],
            exclude_why: String::new(),
            avoid: None,
        }
    }

    fn hosts_of(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .map(|d| match d {
                Decision::Place { host, .. } => host.as_str(),
                Decision::Unplaceable { .. } => "-",
            })
            .collect()
    }

    #[test]
    fn a_chain_spreads_one_stage_per_host() {
        let hosts = [host("a", 2000), host("b", 2000), host("c", 2000)];
        let d = place(
            &[need("s1", 500, 1), need("s2", 500, 1), need("s3", 500, 1)],
            &hosts,
        );
        assert_eq!(hosts_of(&d), ["a", "b", "c"]);
    }

    #[test]
    fn replicas_of_one_task_avoid_sharing_a_host() {
        let hosts = [host("a", 4000), host("b", 1000)];
        let d = place(&[need("t", 500, 2)], &hosts);
        assert_eq!(hosts_of(&d), ["a", "b"]);
    }

    #[test]
    fn what_does_not_fit_is_unplaceable_with_a_reason() {
        let d = place(&[need("big", 3000, 1)], &[host("a", 2000)]);
        match &d[0] {
            Decision::Unplaceable { reason, .. } => {
                assert!(reason.contains("3000m CPU"), "{reason}");
                assert!(reason.contains("a with 2000m"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gpu_memory_and_bandwidth_must_fit() {
        let mut gpu = host("gpu", 4000);
        gpu.gpus_free = 1;
        gpu.gpu_memory_free_bytes = 16 << 30;
        gpu.network_free_bits_per_sec = Some(1_000_000_000);
        let mut n = need("infer", 500, 1);
        n.resources.gpus = 1;
        n.resources.gpu_memory_bytes = 24 << 30;
        let d = place(std::slice::from_ref(&n), std::slice::from_ref(&gpu));
        match &d[0] {
            Decision::Unplaceable { reason, .. } => {
                let want = format!("{} GPU memory", format_bytes(24 << 30));
                let free = format!("{} GPU memory", format_bytes(16 << 30));
                assert!(reason.contains(&want), "{reason}");
                assert!(reason.contains(&free), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        n.resources.gpu_memory_bytes = 8 << 30;
        n.resources.network_bits_per_sec = 2_000_000_000;
        assert!(matches!(
            place(std::slice::from_ref(&n), std::slice::from_ref(&gpu))[0],
            Decision::Unplaceable { .. }
        ));
        n.resources.network_bits_per_sec = 400_000_000;
        let d = place(&[n.clone(), n.clone(), n], &[gpu]);
        // Two would fit in 16 GiB and 1 Gbit/s, but the host has one GPU.
        assert_eq!(hosts_of(&d), ["gpu", "-", "-"]);
    }

    #[test]
    fn unknown_nic_speed_does_not_block_a_reservation() {
        let mut n = need("t", 100, 1);
        n.resources.network_bits_per_sec = 10_000_000_000;
        assert_eq!(hosts_of(&place(&[n], &[host("a", 1000)])), ["a"]);
    }

    #[test]
    fn a_host_where_the_task_failed_to_start_is_used_only_when_nothing_else_fits() {
        let hosts = vec![host("a1", 8000), host("a2", 2000)];
        let mut n = need("t", 1000, 1);
        n.avoid = Some("a1".into());
        match &place(&[n.clone()], &hosts)[0] {
            Decision::Place { host, reason, .. } => {
                assert_eq!(host, "a2", "the most free CPU is a1, but it failed there");
                assert!(
                    reason.contains("not a1, where its last replica failed"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        n.resources.cpu_millicores = 4000;
        match &place(&[n], &hosts)[0] {
            Decision::Place { host, reason, .. } => {
                assert_eq!(host, "a1");
                assert!(
                    reason.contains("though its last replica failed there"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_grown_chain_stays_on_one_host_and_contended_hosts_are_avoided() {
        let mut hosts = [host("a", 4000), host("b", 3000), host("c", 2000)];
        let mut s2 = need("s2", 500, 1);
        s2.near = Some("s1".into());
        s2.occupied = vec!["a".into()];
        let mut s1 = need("s1", 500, 1);
        s1.occupied = vec!["a".into()];
        // s1 goes to b (a has one; b is the least loaded of the rest); s2 follows it, though
        // c would spread better.
        let d = place(&[s1.clone(), s2.clone()], &hosts);
        assert_eq!(hosts_of(&d), ["b", "b"]);
        match &d[1] {
            Decision::Place { reason, .. } => {
                assert!(reason.contains("chain stays local"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        hosts[1].contended = Some("throttled".into());
        assert_eq!(
            hosts_of(&place(&[s1.clone(), s2.clone()], &hosts)),
            ["c", "c"]
        );
        // Only the contended host fits: it is used, and the reason says so.
        let d = place(&[need("big", 2500, 1)], &hosts);
        assert_eq!(hosts_of(&d), ["a"]);
        hosts[0].cpu_free_millicores = 1000;
        let d = place(&[need("big", 2500, 1)], &hosts);
        assert_eq!(hosts_of(&d), ["b"]);
        match &d[0] {
            Decision::Place { reason, .. } => {
                assert!(reason.contains("contended (throttled)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resources_are_deducted_as_replicas_are_placed() {
        let d = place(&[need("t", 1500, 2)], &[host("a", 2000)]);
        assert_eq!(hosts_of(&d), ["a", "-"]);
    }
}
