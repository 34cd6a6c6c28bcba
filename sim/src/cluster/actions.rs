//! How the engine executes `plan`'s actions and what it hears back: placement starts a
//! provisioning that ends ready or failed, tables route, drains end in retirement, a host's
//! death takes its replicas and what they held.

use super::{Engine, Ev, Outcome, Rep, Routed};
use prescient_policy::{observe, Action};
use std::collections::VecDeque;
use std::time::Duration;

impl Engine<'_> {
    pub(super) fn count(&mut self, kind: &'static str) {
        *self.out.decisions.entry(kind).or_default() += 1;
    }

    pub(super) fn execute(&mut self, a: Action) {
        match a {
            Action::Place {
                graph_id,
                task,
                replica,
                host,
                ..
            } => {
                self.count("place");
                let (Some(&svc), Some(&h)) =
                    (self.by_graph.get(&graph_id), self.host_index.get(&host))
                else {
                    return;
                };
                let t = self.svcs[svc as usize]
                    .tasks
                    .iter()
                    .position(|x| x.id == task)
                    .unwrap_or(0) as u16;
                let slot = self.reps.len();
                self.by_id.insert(replica.clone(), slot);
                self.billed += 1;
                self.reps.push(Rep {
                    id: replica,
                    svc,
                    task: t,
                    host: h,
                    alive: true,
                    ready: false,
                    queue: VecDeque::new(),
                    busy: 0,
                    running: Vec::new(),
                    placed: self.now,
                    ended: None,
                    retiring: false,
                    window: None,
                });
                let lead = self.p.lead.draw(&self.rng);
                let failed = self.rng.unit() < self.p.boot_failure;
                let t_ready =
                    self.now + ((lead + if failed { 0.0 } else { self.p.warmup_s }) * 1e9) as u64;
                self.at(
                    t_ready,
                    if failed {
                        Ev::BootFailed(slot)
                    } else {
                        Ev::Ready(slot)
                    },
                );
            }
            Action::Publish {
                graph_id, ready, ..
            } => {
                let Some(&svc) = self.by_graph.get(&graph_id) else {
                    return;
                };
                let s = &mut self.svcs[svc as usize];
                for r in &mut s.routes {
                    r.clear();
                }
                for entry in &ready {
                    let (id, host) = entry.rsplit_once('@').unwrap_or((entry, ""));
                    if let Some(&slot) = self.by_id.get(id) {
                        let t = self.reps[slot].task as usize;
                        s.routes[t].push(Routed {
                            slot,
                            id: id.to_string(),
                            host: host.to_string(),
                        });
                    }
                }
                for t in 0..self.svcs[svc as usize].tasks.len() {
                    if self.svcs[svc as usize].routes[t].is_empty() {
                        continue;
                    }
                    let parked = std::mem::take(&mut self.svcs[svc as usize].parked[t]);
                    for job in parked {
                        self.route(svc, job, None);
                    }
                }
            }
            Action::RetireDrained { replicas, .. } | Action::Retire { replicas, .. } => {
                for r in replicas {
                    if let Some(&slot) = self.by_id.get(&r.id) {
                        self.retire(slot);
                    }
                }
            }
            Action::Undeploy { .. }
            | Action::SwitchVersion { .. }
            | Action::AcceptReport { .. }
            | Action::StartDrain { .. } => {}
            Action::MarkLost { .. } => self.count("lost"),
            Action::Unplaceable { .. } => self.count("unplaceable"),
            Action::ScaleOut { .. } => self.count("scale-out"),
            Action::ForecastOnly { .. } => self.count("forecast-only"),
            // The simulated hosts run no VMs of their own to keep warm.
            Action::WarmPool { .. } => self.count("warm-pool"),
            Action::ScaleIn { .. } => self.count("scale-in"),
            Action::Replace { .. } => self.count("replace"),
            Action::Shed { .. } => self.count("shed"),
        }
    }

    pub(super) fn retire(&mut self, slot: usize) {
        let rep = &mut self.reps[slot];
        rep.retiring = true;
        // Its worker serves what it holds, then exits.
        if rep.busy == 0 && rep.queue.is_empty() {
            self.end_billing(slot);
        }
    }

    pub(super) fn end_billing(&mut self, slot: usize) {
        let rep = &mut self.reps[slot];
        if rep.ended.is_none() {
            rep.ended = Some(self.now);
            self.billed -= 1;
            self.billed_ready -= u32::from(rep.ready);
        }
    }

    pub(super) fn ready(&mut self, slot: usize) {
        let rep = &self.reps[slot];
        if !rep.alive || rep.ended.is_some() {
            return;
        }
        let graph = self.svcs[rep.svc as usize].graph_id.clone();
        let id = rep.id.clone();
        self.reps[slot].ready = true;
        self.billed_ready += 1;
        let warmup = Duration::from_secs_f64(self.p.warmup_s);
        observe::provisioned_after_warmup(
            &mut self.snap,
            &graph,
            &id,
            "sim",
            warmup,
            Duration::from_nanos(self.now),
        );
        self.kick();
    }

    pub(super) fn boot_failed(&mut self, slot: usize) {
        self.count("boot-failed");
        let rep = &self.reps[slot];
        let graph = self.svcs[rep.svc as usize].graph_id.clone();
        let id = rep.id.clone();
        self.reps[slot].alive = false;
        self.end_billing(slot);
        let backoff = self.config.backoff;
        observe::provision_failed(
            &mut self.snap,
            &graph,
            &id,
            &backoff,
            Duration::from_nanos(self.now),
        );
        self.kick();
    }

    /// A pass soon, as the control node's loop runs one when it hears of a change.
    pub(super) fn kick(&mut self) {
        if !self.pass_due {
            self.pass_due = true;
            let now = self.now;
            self.at(now, Ev::Pass);
        }
    }

    pub(super) fn dies(&mut self, h: usize) {
        self.count("host-died");
        self.hosts[h].alive = false;
        for slot in 0..self.reps.len() {
            if self.reps[slot].host != h || !self.reps[slot].alive {
                continue;
            }
            let rep = &mut self.reps[slot];
            rep.alive = false;
            let lost: Vec<u64> = rep
                .queue
                .drain(..)
                .map(|j| j.inv)
                .chain(rep.running.drain(..))
                .collect();
            rep.busy = 0;
            self.end_billing(slot);
            for inv in lost {
                if let Some(i) = self.invs.remove(&inv) {
                    if self.measured(i.arrived) {
                        self.out.failed += 1;
                        self.out.cold += u64::from(i.cold);
                    }
                }
            }
        }
    }

    pub(super) fn finish(mut self) -> Outcome {
        let (from, end) = (self.measure_from, self.end);
        self.out.vm_seconds = self
            .reps
            .iter()
            .map(|r| {
                let a = r.placed.max(from);
                let b = r.ended.unwrap_or(end).min(end);
                b.saturating_sub(a) as f64 / 1e9
            })
            .sum();
        // Invocations still on their way at the end were not within objective; those that
        // waited for capacity count as cold.
        self.out.cold += self
            .invs
            .values()
            .filter(|i| i.arrived >= from && i.cold)
            .count() as u64;
        self.out
    }
}
