//! The warm pool: booted, idle microVMs kept per shape at the size the control node asks for
//! (`setWarmPool`), so a replica lands on a running VM and skips the boot. An idle VM waits in
//! its init for the agent on the channel; taking one is connecting and deploying. VMs beyond the
//! target stop once idle past the timeout; one that dies idle is dropped and replaced.

use super::qemu::{QemuProvisioner, Started};
use prescient_schemas::Resources;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A shape as the control node names it: a task's CPU and memory.
pub type Shape = (u32, u64);

/// One shape's idle VMs to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub shape: Shape,
    pub count: u32,
}

/// A booted VM waiting for a replica.
pub struct Idle {
    pub shape: Shape,
    pub started: Started,
    pub since: Instant,
}

/// The pool's state (the provisioner's; single-threaded).
pub struct WarmPool {
    targets: RefCell<Vec<Keep>>,
    idle: RefCell<Vec<Idle>>,
    /// A shape whose last pool boot failed, and when: it is not tried again for a while.
    failed: RefCell<Vec<(Shape, Instant)>>,
    next: Cell<u64>,
    /// VMs beyond the target stop once idle this long.
    pub idle_timeout: Duration,
}

/// After a pool VM fails to boot, its shape waits this long before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(10);

impl Default for WarmPool {
    fn default() -> Self {
        WarmPool {
            targets: RefCell::default(),
            idle: RefCell::default(),
            failed: RefCell::default(),
            next: Cell::new(1),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

pub fn shape_of(r: &Resources) -> Shape {
    (r.cpu_millicores, r.memory_bytes)
}

impl WarmPool {
    /// What to keep from now on.
    pub fn set_targets(&self, keep: Vec<Keep>) {
        info!(?keep, "warm pool target");
        *self.targets.borrow_mut() = keep;
    }

    /// An idle VM for a replica needing `r`, if one waits (and is still alive).
    pub fn take(&self, r: &Resources) -> Option<Idle> {
        if r.gpus > 0 {
            return None;
        }
        let shape = shape_of(r);
        let mut idle = self.idle.borrow_mut();
        // The longest idle first (the list is kept oldest first), so none goes stale unused.
        loop {
            let i = idle.iter().position(|v| v.shape == shape)?;
            let mut v = idle.remove(i);
            if matches!(v.started.vm.child.try_wait(), Ok(None)) {
                return Some(v);
            }
            warn!(vm = %v.started.vm.dir.display(), "an idle VM had stopped: dropped");
        }
    }

    /// The idle VMs per shape, for the heartbeat.
    pub fn counts(&self) -> Vec<Keep> {
        let mut out: Vec<Keep> = Vec::new();
        for v in self.idle.borrow().iter() {
            match out.iter_mut().find(|k| k.shape == v.shape) {
                Some(k) => k.count += 1,
                None => out.push(Keep {
                    shape: v.shape,
                    count: 1,
                }),
            }
        }
        out.sort_by_key(|k| k.shape);
        out
    }

    fn target(&self, shape: Shape) -> u32 {
        self.targets
            .borrow()
            .iter()
            .find(|k| k.shape == shape)
            .map_or(0, |k| k.count)
    }

    fn idle_of(&self, shape: Shape) -> u32 {
        self.idle
            .borrow()
            .iter()
            .filter(|v| v.shape == shape)
            .count() as u32
    }

    /// Every idle VM, taken out (to be stopped when the agent ends).
    pub fn drain(&self) -> Vec<Idle> {
        std::mem::take(&mut *self.idle.borrow_mut())
    }

    /// Idle VMs that died, and those beyond their shape's target idle past the timeout (the
    /// oldest first), taken out to be stopped.
    fn surplus(&self, now: Instant) -> Vec<Idle> {
        let mut idle = self.idle.borrow_mut();
        let mut out = Vec::new();
        let mut i = 0;
        while i < idle.len() {
            if matches!(idle[i].started.vm.child.try_wait(), Ok(None)) {
                i += 1;
            } else {
                warn!(vm = %idle[i].started.vm.dir.display(), "an idle VM had stopped: dropped");
                out.push(idle.remove(i));
            }
        }
        idle.sort_by_key(|v| v.since);
        let mut shapes: Vec<Shape> = idle.iter().map(|v| v.shape).collect();
        shapes.sort_unstable();
        shapes.dedup();
        for shape in shapes {
            let count = idle.iter().filter(|v| v.shape == shape).count() as u32;
            let mut beyond = count.saturating_sub(self.target(shape));
            // Oldest first: once one is not stale, none after it is.
            while beyond > 0 {
                let Some(i) = idle.iter().position(|v| v.shape == shape) else {
                    break;
                };
                if now.saturating_duration_since(idle[i].since) < self.idle_timeout {
                    break;
                }
                out.push(idle.remove(i));
                beyond -= 1;
            }
        }
        out
    }

    /// The next shape short of its target, unless it failed lately.
    fn short(&self, now: Instant) -> Option<Shape> {
        self.failed
            .borrow_mut()
            .retain(|(_, at)| now.saturating_duration_since(*at) < RETRY_AFTER);
        let targets = self.targets.borrow().clone();
        targets
            .iter()
            .filter(|k| !self.failed.borrow().iter().any(|(s, _)| *s == k.shape))
            .find(|k| self.idle_of(k.shape) < k.count)
            .map(|k| k.shape)
    }
}

impl QemuProvisioner {
    /// One round of keeping the pool: stops what is surplus or dead, then boots one VM for the
    /// first shape short of its target. Called again and again by the agent.
    pub async fn keep_pool(&self) {
        let now = Instant::now();
        for mut v in self.pool.surplus(now) {
            let idle = now.saturating_duration_since(v.since);
            info!(vm = %v.started.vm.dir.display(), ?idle, "idle VM beyond the warm pool's target: stopped");
            v.started.vm.stop(Duration::from_secs(2)).await;
        }
        let Some(shape) = self.pool.short(now) else {
            return;
        };
        let n = self.pool.next.get();
        self.pool.next.set(n + 1);
        let name = format!("warm-{n}");
        let resources = Resources {
            cpu_millicores: shape.0,
            memory_bytes: shape.1,
            ..Resources::default()
        };
        match self.start_idle(&name, &resources).await {
            Ok(started) => {
                info!(vm = %name, took = ?started.at.elapsed(), restored = started.resumed.is_some(), "warm VM booted and idle");
                self.pool.idle.borrow_mut().push(Idle {
                    shape,
                    started,
                    since: Instant::now(),
                });
            }
            Err(e) => {
                warn!(vm = %name, "a warm-pool VM failed to boot (its shape waits {RETRY_AFTER:?}): {e}");
                self.pool.failed.borrow_mut().push((shape, Instant::now()));
            }
        }
    }

    /// Starts a VM and waits until its init is up and waiting for the agent.
    async fn start_idle(
        &self,
        name: &str,
        r: &Resources,
    ) -> Result<Started, super::ProvisionError> {
        let mut started = self.start(name, r).await?;
        if started.resumed.is_none() {
            let left = self.ready_timeout.saturating_sub(started.at.elapsed());
            let up =
                super::qemu::wait_for_init(&mut started.vm.child, &started.vm.console, left).await;
            if let Err(why) = up {
                let e = match why {
                    super::qemu::GuestNotUp::Exited(s) => super::ProvisionError::Refused(format!(
                        "QEMU exited before the guest was up: {s}"
                    )),
                    super::qemu::GuestNotUp::Timeout => super::ProvisionError::Timeout(left),
                };
                return Err(super::qemu::failed(&mut started.vm, e).await);
            }
            if started.restoring {
                self.snapshot_shape(r);
            }
        }
        Ok(started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::qemu::{Accel, Machine, QemuVm};

    /// An idle "VM" of `shape`, idle since `ago`: a `sleep` standing in for QEMU (`alive`) or
    /// one that has exited.
    async fn idle(shape: Shape, ago: Duration, alive: bool) -> Idle {
        let mut child = tokio::process::Command::new(if alive { "sleep" } else { "true" })
            .arg("60")
            .kill_on_drop(true)
            .spawn()
            .expect("spawning a stand-in");
        if !alive {
            let _ = child.wait().await;
        }
        let dir = std::env::temp_dir().join(format!("pool-test-{}", std::process::id()));
        let machine = Machine {
            accel: Accel::Tcg,
            vcpus: 1,
            memory_mib: 128,
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd"),
            worker_args: vec![],
            channel: dir.join("channel.sock"),
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.log"),
            forward: (std::net::Ipv4Addr::LOCALHOST.into(), 0),
            gpus: vec![],
            tsc_khz: None,
        };
        Idle {
            shape,
            started: Started {
                vm: QemuVm {
                    child,
                    gpus: None,
                    qmp: machine.qmp.clone(),
                    dir: dir.clone(),
                    console: machine.console.clone(),
                },
                machine,
                port: 0,
                cgroup: None,
                restoring: false,
                resumed: None,
                at: Instant::now(),
            },
            since: Instant::now() - ago,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn beyond_the_target_the_oldest_stale_vms_stop_and_dead_ones_go() {
        let (a, b) = ((1000, 128 << 20), (500, 64 << 20));
        let p = WarmPool {
            idle_timeout: Duration::from_secs(10),
            ..WarmPool::default()
        };
        p.set_targets(vec![Keep { shape: a, count: 1 }]);
        for v in [
            idle(a, Duration::from_secs(30), true).await, // beyond, stale: stops
            idle(a, Duration::from_secs(20), true).await, // the one kept
            idle(b, Duration::from_secs(5), true).await,  // no target, not yet stale
            idle(b, Duration::from_secs(1), false).await, // dead: goes
        ] {
            p.idle.borrow_mut().push(v);
        }
        let gone = p.surplus(Instant::now());
        let mut gone: Vec<(Shape, u64)> = gone
            .iter()
            .map(|v| (v.shape, v.since.elapsed().as_secs()))
            .collect();
        gone.sort();
        assert_eq!(gone, vec![(b, 1), (a, 30)]);
        assert_eq!(
            p.counts(),
            vec![Keep { shape: b, count: 1 }, Keep { shape: a, count: 1 }]
        );
        // The kept one is what a replica of its shape takes.
        let r = Resources {
            cpu_millicores: 1000,
            memory_bytes: 128 << 20,
            ..Resources::default()
        };
        assert!(p.take(&r).is_some());
        assert!(p.take(&r).is_none(), "one was kept");
    }

    #[test]
    fn counts_group_by_shape_and_targets_default_to_none() {
        let p = WarmPool::default();
        assert!(p.counts().is_empty());
        p.set_targets(vec![Keep {
            shape: (1000, 256 << 20),
            count: 2,
        }]);
        assert_eq!(p.target((1000, 256 << 20)), 2);
        assert_eq!(p.target((500, 256 << 20)), 0);
        assert_eq!(p.short(Instant::now()), Some((1000, 256 << 20)));
        p.failed
            .borrow_mut()
            .push(((1000, 256 << 20), Instant::now()));
        assert_eq!(p.short(Instant::now()), None, "a failed shape waits");
    }
}
