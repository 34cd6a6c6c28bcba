//! CPU and memory limits for worker processes through cgroups, v2 or v1, whichever the host has
//! writable; without either, workers run unlimited (logged once by the caller).

use std::path::{Path, PathBuf};
use thiserror::Error;

/// A cgroup operation that failed.
#[derive(Debug, Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    path: PathBuf,
    source: std::io::Error,
}

/// Why no cgroup hierarchy can limit workers here.
#[derive(Debug, Error)]
pub enum NoCgroups {
    #[error("cgroup {version} at {mount} is not writable: {source}")]
    NotWritable {
        version: &'static str,
        mount: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy with cpu and memory controllers under {0}")]
    NoControllers(PathBuf),
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError {
        path: path.to_path_buf(),
        source,
    })
}

/// Which cgroup hierarchy this host offers for CPU and memory control.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// Unified hierarchy; `root` is Prescient's parent group.
    V2 { root: PathBuf },
    /// Separate `cpu` and `memory` hierarchies, each with a Prescient parent group, and
    /// `cpuacct` (for CPU usage) where it is mounted apart from `cpu`.
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        cpuacct: Option<PathBuf>,
    },
}

impl Hierarchy {
    pub fn name(&self) -> &'static str {
        match self {
            Hierarchy::V2 { .. } => "v2",
            Hierarchy::V1 { .. } => "v1",
        }
    }

    /// Finds a writable hierarchy with CPU and memory controllers under `mount` (normally
    /// `/sys/fs/cgroup`), creating Prescient's parent group `group` in it. `Err` says why none.
    pub fn detect(mount: &Path, group: &str) -> Result<Hierarchy, NoCgroups> {
        let not_writable = |version, source| NoCgroups::NotWritable {
            version,
            mount: mount.to_path_buf(),
            source,
        };
        let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).ok();
        if let Some(c) = controllers {
            let has = |name: &str| c.split_whitespace().any(|x| x == name);
            if has("cpu") && has("memory") {
                let root = mount.join(group);
                let setup = std::fs::create_dir_all(&root).and_then(|()| {
                    // Children of `root` need the controllers delegated to them.
                    let _ = std::fs::write(mount.join("cgroup.subtree_control"), "+cpu +memory");
                    std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory")
                });
                return match setup {
                    Ok(()) => Ok(Hierarchy::V2 { root }),
                    Err(e) => Err(not_writable("v2", e)),
                };
            }
        }
        let (cpu, memory) = (mount.join("cpu"), mount.join("memory"));
        if cpu.join("cpu.cfs_quota_us").exists() && memory.join("memory.limit_in_bytes").exists() {
            let cpuacct = if cpu.join("cpuacct.usage").exists() {
                None // co-mounted: usage is read from the cpu group itself
            } else {
                let acct = mount.join("cpuacct");
                (acct.join("cpuacct.usage").exists()
                    && std::fs::create_dir_all(acct.join(group)).is_ok())
                .then(|| acct.join(group))
            };
            let (cpu, memory) = (cpu.join(group), memory.join(group));
            return match std::fs::create_dir_all(&cpu)
                .and_then(|()| std::fs::create_dir_all(&memory))
            {
                Ok(()) => Ok(Hierarchy::V1 {
                    cpu,
                    memory,
                    cpuacct,
                }),
                Err(e) => Err(not_writable("v1", e)),
            };
        }
        Err(NoCgroups::NoControllers(mount.to_path_buf()))
    }

    /// Creates the group `name` with a CPU quota and a memory limit.
    pub fn create(
        &self,
        name: &str,
        cpu_millicores: u32,
        memory_bytes: u64,
    ) -> Result<Cgroup, CgroupError> {
        const PERIOD_US: u64 = 100_000;
        let quota = (u64::from(cpu_millicores) * PERIOD_US / 1000).max(1000);
        let dirs = match self {
            Hierarchy::V2 { root } => vec![root.join(name)],
            Hierarchy::V1 {
                cpu,
                memory,
                cpuacct,
            } => {
                let mut d = vec![cpu.join(name), memory.join(name)];
                if let Some(a) = cpuacct {
                    d.push(a.join(name));
                }
                d
            }
        };
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(|source| CgroupError {
                path: d.clone(),
                source,
            })?;
        }
        match self {
            Hierarchy::V2 { .. } => {
                write(&dirs[0].join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
                write(&dirs[0].join("memory.max"), &memory_bytes.to_string())?;
            }
            Hierarchy::V1 { .. } => {
                write(&dirs[0].join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&dirs[0].join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(
                    &dirs[1].join("memory.limit_in_bytes"),
                    &memory_bytes.to_string(),
                )?;
            }
        }
        Ok(Cgroup {
            dirs,
            v2: matches!(self, Hierarchy::V2 { .. }),
        })
    }
}

/// One worker's group (one directory per hierarchy it spans).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl Cgroup {
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes (tgids) in the group now.
    pub fn processes(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dirs[0].join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// CPU time used (ns, cumulative) and memory in use (bytes) by the group's processes.
    pub fn usage(&self) -> Option<(u64, u64)> {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok();
        if self.v2 {
            let stat = read(self.dirs[0].join("cpu.stat"))?;
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            let mem: u64 = read(self.dirs[0].join("memory.current"))?
                .trim()
                .parse()
                .ok()?;
            return Some((usec * 1000, mem));
        }
        let acct = self.dirs.get(2).unwrap_or(&self.dirs[0]);
        let cpu: u64 = read(acct.join("cpuacct.usage"))?.trim().parse().ok()?;
        let mem: u64 = read(self.dirs[1].join("memory.usage_in_bytes"))?
            .trim()
            .parse()
            .ok()?;
        Some((cpu, mem))
    }

    /// CPU-bandwidth enforcement periods so far and those in which the group was throttled
    /// (cumulative; `cpu.stat`'s `nr_periods` and `nr_throttled`, the same in v1 and v2).
    pub fn throttling(&self) -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string(self.dirs[0].join("cpu.stat")).ok()?;
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some((field("nr_periods ")?, field("nr_throttled ")?))
    }

    /// The CPU limit as written, in millicores (for tests and `status`).
    pub fn cpu_millicores(&self) -> Option<u64> {
        let d = &self.dirs[0];
        if let Ok(s) = std::fs::read_to_string(d.join("cpu.max")) {
            let mut it = s.split_whitespace();
            let quota: u64 = it.next()?.parse().ok()?;
            let period: u64 = it.next()?.parse().ok()?;
            return Some(quota * 1000 / period);
        }
        let quota: u64 = std::fs::read_to_string(d.join("cpu.cfs_quota_us"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let period: u64 = std::fs::read_to_string(d.join("cpu.cfs_period_us"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(quota * 1000 / period)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Fails while processes remain; the caller drops it after the worker has exited.
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}
