//! Placement: which host gets each new replica. Pure: a function of the hosts' free resources and
//! the replicas wanted, so the live node and the simulator make the same choices.
//!
//! Policy: a host must fit the replica's CPU, memory and GPUs; among those, hosts without a
//! replica of the same task come first (anti-affinity: losing one host never loses a task),
//! then the host with the most free CPU (spread), then the fewest replicas, then by name.

use prescient_schemas::quantity::format_bytes;
use prescient_schemas::Resources;

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub name: String,
    pub cpu_free_millicores: u64,
    pub memory_free_bytes: u64,
    pub gpus_free: u32,
    pub replicas: usize,
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

fn fits(h: &HostView, r: &Resources) -> bool {
    h.cpu_free_millicores >= u64::from(r.cpu_millicores)
        && h.memory_free_bytes >= r.memory_bytes
        && h.gpus_free >= r.gpus
}

/// Decides where each wanted replica goes, in the order the needs are given.
pub fn place(needs: &[Need], hosts: &[HostView]) -> Vec<Decision> {
    let mut hosts: Vec<HostView> = hosts.to_vec();
    let mut out = Vec::new();
    for need in needs {
        let mut occupied = need.occupied.clone();
        for _ in 0..need.count {
            let r = &need.resources;
            let best = hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| fits(h, r))
                .min_by(|(_, a), (_, b)| {
                    let key = |h: &HostView| {
                        (
                            occupied.contains(&h.name),
                            std::cmp::Reverse(h.cpu_free_millicores),
                            h.replicas,
                        )
                    };
                    key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
                })
                .map(|(i, _)| i);
            let Some(i) = best else {
                let largest = hosts.iter().max_by_key(|h| h.cpu_free_millicores).map_or(
                    "no hosts are registered".to_string(),
                    |h| {
                        format!(
                            "the most free is {} with {}m CPU, {} memory, {} GPUs",
                            h.name,
                            h.cpu_free_millicores,
                            format_bytes(h.memory_free_bytes),
                            h.gpus_free
                        )
                    },
                );
                out.push(Decision::Unplaceable {
                    graph_id: need.graph_id.clone(),
                    task: need.task.clone(),
                    reason: format!(
                        "no host has {}m CPU, {} memory and {} GPUs free: {largest}",
                        r.cpu_millicores,
                        format_bytes(r.memory_bytes),
                        r.gpus
                    ),
                });
                break;
            };
            let h = &mut hosts[i];
            let reason = format!(
                "{} needs a replica; {} fits it ({}m of {}m CPU free{}) and is the least loaded",
                need.task,
                h.name,
                r.cpu_millicores,
                h.cpu_free_millicores,
                if occupied.contains(&h.name) {
                    ", though it already runs one"
                } else {
                    ""
                }
            );
            h.cpu_free_millicores -= u64::from(r.cpu_millicores);
            h.memory_free_bytes -= r.memory_bytes;
            h.gpus_free -= r.gpus;
            h.replicas += 1;
            occupied.push(h.name.clone());
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
            replicas: 0,
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
    fn resources_are_deducted_as_replicas_are_placed() {
        let d = place(&[need("t", 1500, 2)], &[host("a", 2000)]);
        assert_eq!(hosts_of(&d), ["a", "-"]);
    }
}
