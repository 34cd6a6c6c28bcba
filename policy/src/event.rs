//! Events: every decision the control node takes and every change it observes, typed, with the
//! reason a user reads. The stored and wire form stays `(kind, subject, reason)` text, so
//! `prescient events --json` keeps its shape.

use std::fmt::Write as _;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    GraphSubmitted {
        graph_id: String,
        name: String,
        version: u32,
        tasks: usize,
        edges: usize,
    },
    GraphRemoved {
        graph_id: String,
        name: String,
        version: u32,
    },
    AgentRegistered {
        host: String,
        /// CPUs, memory, GPUs, provisioner, ingress, probes.
        summary: String,
        reconnected: bool,
        adopted: Vec<String>,
        /// Replicas control believed were there that the agent no longer runs.
        forgotten: Vec<String>,
        /// Replicas it runs of graphs or versions that are gone, retired now.
        orphans: Vec<String>,
    },
    AgentLost {
        host: String,
        silent: Duration,
        limit: Duration,
        replicas: Vec<String>,
    },
    ReplicaPlaced {
        replica: String,
        host: String,
        reason: String,
    },
    ReplicaUnplaceable {
        graph_id: String,
        task: String,
        reason: String,
    },
    ReplicaFailed {
        replica: String,
        host: String,
        error: String,
        attempt: u32,
        retry_in: Duration,
    },
    ReplicaLost {
        replica: String,
        host: String,
        reason: String,
        /// Crashes in a row of its task and the wait before it is replaced.
        crashes: u32,
        retry_in: Duration,
    },
    RoutesPublished {
        graph_id: String,
        epoch: u64,
        ready: Vec<String>,
    },
    GraphUpdating {
        graph_id: String,
        from: u32,
        to: u32,
        moved: usize,
    },
    ReplicasDraining {
        graph_id: String,
        version: u32,
        drain: Duration,
        replicas: Vec<String>,
    },
    ReplicasRetired {
        graph_id: String,
        version: u32,
        drain: Duration,
        replicas: Vec<String>,
    },
    GraphUndeployed {
        graph_id: String,
        replicas: usize,
    },
    ArtifactUploaded {
        digest: String,
        bytes: u64,
    },
    /// `forecast-only`: the plan would hold `would` replicas where there are `have`.
    ForecastOnly {
        graph_id: String,
        task: String,
        have: u32,
        would: u32,
        reason: String,
    },
    ScaledOut {
        graph_id: String,
        task: String,
        from: u32,
        to: u32,
        reason: String,
    },
    ScaledIn {
        graph_id: String,
        task: String,
        replica: String,
        from: u32,
        drain: Duration,
        reason: String,
    },
    DrainedRetired {
        graph_id: String,
        drain: Duration,
        replicas: Vec<String>,
    },
    ReplicaReplacing {
        graph_id: String,
        task: String,
        replica: String,
        host: String,
        trigger: String,
        reason: String,
    },
    ReplicaShed {
        replica: String,
        by: Vec<String>,
        drain: Duration,
        reason: String,
    },
    /// A microVM host is told what warm pool to keep.
    WarmPool {
        host: String,
        shapes: Vec<crate::snapshot::WarmShape>,
        reason: String,
    },
    /// A replica is provisioned and warm: it joins the next routing table.
    ReplicaReady {
        replica: String,
        host: String,
        /// From placement to ready.
        took: Duration,
        warmup: Duration,
        executions: u32,
        stable: bool,
        /// A microVM's start: `booted` or `restored`, and how long to its guest running; or
        /// `warm` (taken from the warm pool), and how long it had waited there.
        vm_start: Option<(String, Duration)>,
        /// A microVM's deploy: from its guest running to its task deployed (warm-up apart).
        vm_deploy: Option<Duration>,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

impl Event {
    /// The stable kind string (`graph-submitted`, `replica-placed`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::GraphSubmitted { .. } => "graph-submitted",
            Event::GraphRemoved { .. } => "graph-removed",
            Event::AgentRegistered { .. } => "agent-registered",
            Event::AgentLost { .. } => "agent-lost",
            Event::ReplicaPlaced { .. } => "replica-placed",
            Event::ReplicaUnplaceable { .. } => "replica-unplaceable",
            Event::ReplicaFailed { .. } => "replica-failed",
            Event::ReplicaLost { .. } => "replica-lost",
            Event::RoutesPublished { .. } => "routes-published",
            Event::GraphUpdating { .. } => "graph-updating",
            Event::ReplicasDraining { .. } => "replicas-draining",
            Event::ReplicasRetired { .. } => "replicas-retired",
            Event::GraphUndeployed { .. } => "graph-undeployed",
            Event::ArtifactUploaded { .. } => "artifact-uploaded",
            Event::ScaledOut { .. } => "scale-out",
            Event::ForecastOnly { .. } => "forecast-only",
            Event::WarmPool { .. } => "warm-pool",
            Event::ScaledIn { .. } => "scale-in",
            Event::DrainedRetired { .. } => "replicas-retired",
            Event::ReplicaReplacing { .. } => "replace",
            Event::ReplicaShed { .. } => "shed",
            Event::ReplicaReady { .. } => "replica-ready",
        }
    }

    /// What the event is about: a graph, task, replica or host.
    pub fn subject(&self) -> String {
        match self {
            Event::GraphSubmitted { graph_id, .. }
            | Event::GraphRemoved { graph_id, .. }
            | Event::RoutesPublished { graph_id, .. }
            | Event::GraphUpdating { graph_id, .. }
            | Event::ReplicasDraining { graph_id, .. }
            | Event::ReplicasRetired { graph_id, .. }
            | Event::GraphUndeployed { graph_id, .. } => graph_id.clone(),
            Event::AgentRegistered { host, .. }
            | Event::AgentLost { host, .. }
            | Event::WarmPool { host, .. } => host.clone(),
            Event::ReplicaPlaced { replica, .. }
            | Event::ReplicaFailed { replica, .. }
            | Event::ReplicaLost { replica, .. } => replica.clone(),
            Event::ReplicaUnplaceable { graph_id, task, .. } => format!("{graph_id}.{task}"),
            Event::ArtifactUploaded { digest, .. } => digest.clone(),
            Event::ScaledOut { graph_id, task, .. }
            | Event::ForecastOnly { graph_id, task, .. } => format!("{graph_id}.{task}"),
            Event::ScaledIn { replica, .. } => replica.clone(),
            Event::DrainedRetired { graph_id, .. } => graph_id.clone(),
            Event::ReplicaReplacing { replica, .. }
            | Event::ReplicaShed { replica, .. }
            | Event::ReplicaReady { replica, .. } => replica.clone(),
        }
    }

    /// Why, in a sentence a user reads.
    pub fn reason(&self) -> String {
        match self {
            Event::GraphSubmitted {
                name,
                version,
                tasks,
                edges,
                ..
            } => {
                if *version == 1 {
                    format!("new graph {name:?}: {tasks} tasks, {edges} edges")
                } else {
                    format!(
                        "graph {name:?} changed: version {version} replaces {}",
                        version - 1
                    )
                }
            }
            Event::GraphRemoved { name, version, .. } => {
                format!("graph {name:?} version {version} removed by request")
            }
            Event::AgentRegistered {
                summary,
                reconnected,
                adopted,
                forgotten,
                orphans,
                ..
            } => {
                let mut s = if *reconnected {
                    format!("reconnected: {summary}")
                } else {
                    format!("new host: {summary}")
                };
                if !adopted.is_empty() {
                    let _ = write!(s, "; adopted running replicas {}", adopted.join(", "));
                }
                if !forgotten.is_empty() {
                    let _ = write!(s, "; no longer runs {}", forgotten.join(", "));
                }
                if !orphans.is_empty() {
                    let _ = write!(
                        s,
                        "; retiring {} (their graph or version is gone)",
                        orphans.join(", ")
                    );
                }
                s
            }
            Event::AgentLost {
                silent,
                limit,
                replicas,
                ..
            } => format!(
                "no heartbeat for {:.1}s (limit {limit:?}); its replicas are gone: {}",
                silent.as_secs_f64(),
                list(replicas)
            ),
            Event::ReplicaPlaced { host, reason, .. } => format!("on {host}: {reason}"),
            Event::ReplicaUnplaceable { reason, .. } => reason.clone(),
            Event::ReplicaFailed {
                host,
                error,
                attempt,
                retry_in,
                ..
            } => format!(
                "provisioning on {host} failed: {error} (attempt {attempt}; next in {retry_in:?})"
            ),
            Event::ReplicaLost {
                host,
                reason,
                crashes,
                retry_in,
                ..
            } => {
                if *crashes > 1 {
                    format!(
                        "on {host}: {reason} (crash {crashes} in a row: replaced in {retry_in:?})"
                    )
                } else {
                    format!("on {host}: {reason} (replaced in {retry_in:?})")
                }
            }
            Event::RoutesPublished { epoch, ready, .. } => format!(
                "epoch {epoch}: {}",
                if ready.is_empty() {
                    "no ready replicas".into()
                } else {
                    ready.join(", ")
                }
            ),
            Event::GraphUpdating { from, to, moved, .. } => format!(
                "version {to} replaces {from}: starting its replicas; the {moved} of version {from} serve until they are ready"
            ),
            Event::ReplicasDraining {
                version,
                drain,
                replicas,
                ..
            } => format!(
                "version {version} is routed; {} drain for {drain:?}",
                list(replicas)
            ),
            Event::ReplicasRetired {
                version,
                drain,
                replicas,
                ..
            } => format!(
                "replaced by version {version}; drained for {drain:?}: {}",
                list(replicas)
            ),
            Event::GraphUndeployed { replicas, .. } => {
                format!("graph removed: retired {replicas} replicas")
            }
            Event::ArtifactUploaded { bytes, .. } => format!("{bytes} bytes stored"),
            Event::ScaledOut {
                from, to, reason, ..
            } => format!("{from} -> {to} replicas: {reason}"),
            Event::ForecastOnly {
                have, would, reason, ..
            } => format!("would hold {would} replicas (has {have}): {reason}"),
            Event::WarmPool { shapes, reason, .. } => {
                if shapes.is_empty() {
                    "keep no idle VMs (those idle past the timeout stop)".to_string()
                } else {
                    let size = |w: &crate::snapshot::WarmShape| {
                        format!(
                            "{}m CPU, {}",
                            w.cpu_millicores,
                            prescient_schemas::quantity::format_bytes(w.memory_bytes)
                        )
                    };
                    let total: u32 = shapes.iter().map(|w| w.count).sum();
                    let kinds = match shapes.as_slice() {
                        [one] => size(one),
                        many => many
                            .iter()
                            .map(|w| format!("{} of {}", w.count, size(w)))
                            .collect::<Vec<_>>()
                            .join("; "),
                    };
                    let vms = if total == 1 { "VM" } else { "VMs" };
                    format!("keep {total} booted idle {vms} ({kinds}): {reason}")
                }
            }
            Event::ScaledIn {
                from,
                drain,
                reason,
                ..
            } => format!(
                "{from} -> {} replicas: {reason}; out of the routing table, draining for {drain:?}",
                from.saturating_sub(1)
            ),
            Event::DrainedRetired {
                drain, replicas, ..
            } => format!("scaled in; drained for {drain:?}: {}", list(replicas)),
            Event::ReplicaReplacing {
                task,
                host,
                trigger,
                reason,
                ..
            } => format!("{trigger}: {reason}; placing another replica of {task} off {host}"),
            Event::ReplicaShed {
                by, drain, reason, ..
            } => {
                let by = if by.is_empty() {
                    "its task's other replicas carry its load".to_string()
                } else {
                    format!("replaced by {}, which is routed", list(by))
                };
                format!("{reason}; {by}; out of the routing table, draining for {drain:?}")
            }
            Event::ReplicaReady {
                host,
                took,
                warmup,
                executions,
                stable,
                vm_start,
                vm_deploy,
                ..
            } => {
                let ms = |d: &Duration| d.as_secs_f64() * 1e3;
                let mut vm = vm_start.as_ref().map_or(String::new(), |(how, t)| match how.as_str() {
                    "warm" => format!(
                        "; it took a warm VM from the pool (idle for {:.1} s)",
                        t.as_secs_f64()
                    ),
                    how => format!(
                        "; its VM {how} in {:.0} ms{}",
                        ms(t),
                        if how == "restored" {
                            " (from this host's snapshot)"
                        } else {
                            ""
                        }
                    ),
                });
                if let Some(d) = vm_deploy {
                    vm += &format!(", deployed in it in {:.0} ms", ms(d));
                }
                let warm = if *executions == 0 {
                    "no recent inputs of its task to warm up on".to_string()
                } else if *stable {
                    format!(
                        "warmed up on {executions} recent inputs in {:.1} ms, latency stable",
                        ms(warmup)
                    )
                } else {
                    format!(
                        "warmed up on {executions} recent inputs for {:.1} ms, latency not yet stable",
                        ms(warmup)
                    )
                };
                format!(
                    "on {host}, ready {:.0} ms after placement{vm}; {warm}",
                    ms(took)
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_subjects_and_reasons_keep_their_text() {
        let e = Event::ReplicaUnplaceable {
            graph_id: "g1".into(),
            task: "t".into(),
            reason: "no host".into(),
        };
        assert_eq!(
            (e.kind(), e.subject().as_str(), e.reason().as_str()),
            ("replica-unplaceable", "g1.t", "no host")
        );
        let e = Event::AgentRegistered {
            host: "a1".into(),
            summary: "2 CPUs".into(),
            reconnected: true,
            adopted: vec!["g1.s1.r1".into()],
            forgotten: vec![],
            orphans: vec![],
        };
        assert_eq!(
            e.reason(),
            "reconnected: 2 CPUs; adopted running replicas g1.s1.r1"
        );
        let e = Event::RoutesPublished {
            graph_id: "g1".into(),
            epoch: 3,
            ready: vec![],
        };
        assert_eq!(e.reason(), "epoch 3: no ready replicas");
    }
}
