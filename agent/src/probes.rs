//! The eBPF probes, user side: loads the object built from `ebpf/probes` (embedded at build
//! time), adapts it to the running kernel through BTF, attaches it, and turns its cumulative
//! per-process counters into per-VM and per-host deltas.
//!
//! API boundary: the kernel side counts per process (tgid) and per CPU only; which processes
//! form a VM is decided here, from the VM's cgroup membership, so the same probes serve cgroup
//! v1 and v2 hosts.

use std::collections::HashMap;

use aya::maps::{MapData, PerCpuArray};
use prescient_probes_common::{globals, maps, CpuSlot, ProcessCounters, LATENCY_BUCKETS};
use prescient_schemas::sketch::Sketch;
use thiserror::Error;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/prescient-probes.o"));

/// Why the probes are not running (the agent then uses procfs alone).
#[derive(Debug, Error)]
pub enum ProbeError {
    /// this agent was built without the eBPF object (run `cargo xtask build-ebpf`, then rebuild)
    #[error(
        "this agent was built without the eBPF object (run `cargo xtask build-ebpf`, then rebuild)"
    )]
    NotBuilt,
    /// the kernel offers no BTF (/sys/kernel/btf/vmlinux), which tp_btf programs need
    #[error("the kernel offers no BTF (/sys/kernel/btf/vmlinux), which tp_btf programs need: {0}")]
    NoBtf(#[source] std::io::Error),
    /// the kernel's task_struct has no sched_info.run_delay (CONFIG_SCHED_INFO is off)
    #[error("the kernel's task_struct has no sched_info.run_delay (CONFIG_SCHED_INFO is off)")]
    NoSchedInfo,
    /// loading the eBPF object failed (it needs root, or CAP_BPF with CAP_PERFMON)
    #[error("loading the eBPF object failed (it needs root, or CAP_BPF with CAP_PERFMON): {0}")]
    Load(#[source] aya::EbpfError),
    /// the eBPF object or the kernel's BTF lacks something by this name
    #[error("the eBPF object or the kernel's BTF has no {0}")]
    Missing(&'static str),
    /// loading or attaching one program failed
    #[error("attaching {program} failed: {source}")]
    Attach {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// opening one map failed
    #[error("opening map {map} failed: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Processes the per-CPU counters map holds: 16,384, fewer on machines with many CPUs so that
/// its copies (one per CPU) stay within 64 MiB; the least recently switched are dropped first.
fn process_slots() -> u32 {
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u64;
    let per_process = (std::mem::size_of::<ProcessCounters>() as u64) * cpus;
    ((64u64 << 20) / per_process).clamp(1024, 16384) as u32
}

/// The programs, in the order they are loaded and attached.
const PROGRAMS: [&str; 3] = ["sched_switch", "sock_send_length", "sock_recv_length"];

/// One of the object's `tp_btf` programs, by name.
fn program<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::BtfTracePoint, ProbeError> {
    ebpf.program_mut(name)
        .ok_or(ProbeError::Missing(name))?
        .try_into()
        .map_err(|source| ProbeError::Attach {
            program: name,
            source,
        })
}

/// The loaded, attached probes. Dropping this detaches them.
pub struct Probes {
    ebpf: aya::Ebpf,
    /// The programs' attachments while attached (empty while detached).
    links: Vec<(&'static str, aya::programs::tp_btf::BtfTracePointLinkId)>,
    /// In a cell: dropping a process's entry needs the map mutably, reading does not.
    processes: std::cell::RefCell<aya::maps::PerCpuHashMap<MapData, u32, ProcessCounters>>,
    cpu_slots: PerCpuArray<MapData, CpuSlot>,
    /// Whether TCP bytes are told apart from other inet sockets (UDP) on this kernel.
    pub tcp_only: bool,
}

impl Probes {
    /// Loads and attaches every probe; any failure leaves nothing attached.
    pub fn load() -> Result<Probes, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::NotBuilt);
        }
        // One read of the kernel's BTF: our reader finds offsets, aya's loads the programs.
        let data = std::fs::read(crate::btf::VMLINUX).map_err(ProbeError::NoBtf)?;
        let invalid = |e: String| ProbeError::NoBtf(std::io::Error::other(e));
        let raw_btf = crate::btf::Btf::parse(&data).map_err(|e| invalid(e.to_string()))?;
        let aya_btf = aya::Btf::parse(&data, aya::Endianness::default())
            .map_err(|e| invalid(e.to_string()))?;
        let family = raw_btf
            .member("sock_common", "skc_family")
            .filter(|m| m.size == Some(2) && m.bitfield_bits.is_none())
            .map_or(16, |m| m.bit_offset / 8);
        // Kernels before 5.6 keep sk_protocol in a bitfield; then all inet bytes count.
        let protocol = raw_btf
            .member("sock", "sk_protocol")
            .filter(|m| m.size == Some(2) && m.bitfield_bits.is_none())
            .map_or(u32::MAX, |m| m.bit_offset / 8);
        let run_delay = raw_btf
            .member("task_struct", "sched_info")
            .zip(raw_btf.member("sched_info", "run_delay"))
            .filter(|(_, d)| d.size == Some(8) && d.bitfield_bits.is_none())
            .map(|(s, d)| (s.bit_offset + d.bit_offset) / 8)
            .ok_or(ProbeError::NoSchedInfo)?;
        let task_flags = raw_btf
            .member("task_struct", "flags")
            .filter(|m| m.size == Some(4) && m.bitfield_bits.is_none())
            .map(|m| m.bit_offset / 8)
            .ok_or(ProbeError::Missing("task_struct.flags"))?;
        let exec_runtime = raw_btf
            .member("task_struct", "se")
            .zip(raw_btf.member("sched_entity", "sum_exec_runtime"))
            .filter(|(_, r)| r.size == Some(8) && r.bitfield_bits.is_none())
            .map(|(se, r)| (se.bit_offset + r.bit_offset) / 8)
            .ok_or(ProbeError::Missing("task_struct.se.sum_exec_runtime"))?;
        let mut ebpf = aya::EbpfLoader::new()
            .btf(Some(&aya_btf))
            .map_max_entries(maps::PROCESSES, process_slots())
            .override_global(globals::SK_FAMILY_OFFSET, &family, true)
            .override_global(globals::SK_PROTOCOL_OFFSET, &protocol, true)
            .override_global(globals::TASK_RUN_DELAY_OFFSET, &run_delay, true)
            .override_global(globals::TASK_FLAGS_OFFSET, &task_flags, true)
            .override_global(globals::TASK_EXEC_RUNTIME_OFFSET, &exec_runtime, true)
            .load(OBJECT)
            .map_err(ProbeError::Load)?;
        let attach_failed = |program| move |source| ProbeError::Attach { program, source };
        let mut links = Vec::new();
        for name in PROGRAMS {
            let p = program(&mut ebpf, name)?;
            let link = p
                .load(name, &aya_btf)
                .and_then(|()| p.attach())
                .map_err(attach_failed(name))?;
            links.push((name, link));
        }
        fn map<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            ebpf: &mut aya::Ebpf,
            name: &'static str,
        ) -> Result<M, ProbeError> {
            ebpf.take_map(name)
                .ok_or(ProbeError::Missing(name))?
                .try_into()
                .map_err(|source| ProbeError::Map { map: name, source })
        }
        let processes = std::cell::RefCell::new(map(&mut ebpf, maps::PROCESSES)?);
        let cpu_slots = map(&mut ebpf, maps::CPU_SLOT)?;
        Ok(Probes {
            ebpf,
            links,
            processes,
            cpu_slots,
            tcp_only: protocol != u32::MAX,
        })
    }

    /// Detaches the programs, or attaches them again, keeping them loaded (their maps keep
    /// counting from where they were): a switch costs two system calls per program, not a
    /// load and verification, so a benchmark can flip it between short phases.
    pub fn set_attached(&mut self, on: bool) -> Result<(), ProbeError> {
        if on != self.links.is_empty() {
            return Ok(());
        }
        for name in PROGRAMS {
            let p = program(&mut self.ebpf, name)?;
            let failed = |source| ProbeError::Attach {
                program: name,
                source,
            };
            if on {
                self.links.push((name, p.attach().map_err(failed)?));
            } else if let Some(at) = self.links.iter().position(|(n, _)| *n == name) {
                let (_, link) = self.links.swap_remove(at);
                p.detach(link).map_err(failed)?;
            }
        }
        Ok(())
    }

    /// Drops a process's counters (it has left every VM and been charged one last time).
    pub fn forget(&self, tgid: u32) {
        let _ = self.processes.borrow_mut().remove(&tgid);
    }

    /// One process's counters since the probes were loaded, summed over the CPUs' copies
    /// (None: it never ran or sent).
    pub fn process(&self, tgid: u32) -> Option<ProcessCounters> {
        let per_cpu = self.processes.borrow().get(&tgid, 0).ok()?;
        let mut sum = ProcessCounters::ZERO;
        for c in per_cpu.iter() {
            sum.runq_wait_ns += c.runq_wait_ns;
            sum.cpu_ns += c.cpu_ns;
            sum.tcp_sent_bytes += c.tcp_sent_bytes;
            sum.tcp_received_bytes += c.tcp_received_bytes;
            for (s, n) in sum.runq_hist.iter_mut().zip(c.runq_hist) {
                *s += n;
            }
        }
        Some(sum)
    }

    /// Run-queue waits on each CPU since the probes were loaded: by log2 bucket, then their
    /// total in ns.
    pub fn cpu_histograms(&self) -> Vec<CpuHistogram> {
        let Ok(slots) = self.cpu_slots.get(&0, 0) else {
            return Vec::new();
        };
        slots
            .iter()
            .map(|slot| {
                let mut h = [0; LATENCY_BUCKETS + 1];
                h[..LATENCY_BUCKETS].copy_from_slice(&slot.runq_hist);
                h[LATENCY_BUCKETS] = slot.runq_total_ns;
                h
            })
            .collect()
    }
}

/// One CPU's run-queue waits: `LATENCY_BUCKETS` log2 buckets, then the total in ns.
pub type CpuHistogram = [u64; LATENCY_BUCKETS + 1];

/// What the probes saw of a group of processes (a VM) or a host over some interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeUsage {
    pub runq_waits: u64,
    pub runq_wait_ns: u64,
    pub runq_hist: [u64; LATENCY_BUCKETS],
    pub cpu_ns: u64,
    pub tcp_sent_bytes: u64,
    pub tcp_received_bytes: u64,
}

impl Default for ProbeUsage {
    fn default() -> Self {
        ProbeUsage {
            runq_waits: 0,
            runq_wait_ns: 0,
            runq_hist: [0; LATENCY_BUCKETS],
            cpu_ns: 0,
            tcp_sent_bytes: 0,
            tcp_received_bytes: 0,
        }
    }
}

impl ProbeUsage {
    /// Adds what `now` counted beyond `before` (counters only grow; a reused tgid restarts).
    fn add_growth(&mut self, now: &ProcessCounters, before: &ProcessCounters) {
        let grew = |a: u64, b: u64| a.checked_sub(b).unwrap_or(a);
        self.runq_wait_ns += grew(now.runq_wait_ns, before.runq_wait_ns);
        self.cpu_ns += grew(now.cpu_ns, before.cpu_ns);
        self.tcp_sent_bytes += grew(now.tcp_sent_bytes, before.tcp_sent_bytes);
        self.tcp_received_bytes += grew(now.tcp_received_bytes, before.tcp_received_bytes);
        for (i, h) in self.runq_hist.iter_mut().enumerate() {
            let g = grew(now.runq_hist[i], before.runq_hist[i]);
            *h += g;
            self.runq_waits += g;
        }
    }

    pub fn add(&mut self, other: &ProbeUsage) {
        self.runq_waits += other.runq_waits;
        self.runq_wait_ns += other.runq_wait_ns;
        self.cpu_ns += other.cpu_ns;
        self.tcp_sent_bytes += other.tcp_sent_bytes;
        self.tcp_received_bytes += other.tcp_received_bytes;
        for (h, o) in self.runq_hist.iter_mut().zip(other.runq_hist) {
            *h += o;
        }
    }

    /// The run-queue waits as a mergeable sketch, each log2 bucket at its midpoint: the
    /// quantiles are as coarse as the buckets (within a factor of 1.5).
    pub fn runq_sketch(&self) -> Sketch {
        histogram_sketch(&self.runq_hist)
    }
}

/// A log2 histogram of nanoseconds as a sketch (entries past the buckets are ignored).
pub fn histogram_sketch(hist: &[u64]) -> Sketch {
    let mut s = Sketch::default();
    for (i, &n) in hist.iter().take(LATENCY_BUCKETS).enumerate() {
        if n > 0 {
            let mid = if i == 0 {
                1.0
            } else {
                1.5 * (1u64 << i) as f64
            };
            s.record_n(mid, n);
        }
    }
    s
}

/// Turns cumulative per-process counters into per-group growth, interval by interval.
#[derive(Default)]
pub struct GroupTracker {
    /// Each process seen at the last update: its group and its counters then.
    last: HashMap<u32, (String, ProcessCounters)>,
}

impl GroupTracker {
    /// `groups`: each group's name and its member processes now. Returns each group's growth
    /// since the previous call, and the processes that left. A process seen for the first time
    /// counts from zero. A process that left (exited, or moved out) is charged to its old group
    /// one last time from what `read` still finds for it (the kernel side keeps a process's
    /// counters after it exits; its last switch-out has flushed them), then forgotten: the
    /// caller deletes the returned processes' counters, so a reused process id starts afresh.
    pub fn update(
        &mut self,
        groups: &[(String, Vec<u32>)],
        read: impl Fn(u32) -> Option<ProcessCounters>,
    ) -> (Vec<(String, ProbeUsage)>, Vec<u32>) {
        let mut next = HashMap::new();
        let mut out = Vec::with_capacity(groups.len());
        for (name, members) in groups {
            let mut usage = ProbeUsage::default();
            for &tgid in members {
                let Some(now) = read(tgid) else { continue };
                let before = match self.last.remove(&tgid) {
                    Some((_, before)) => before,
                    None => ProcessCounters::ZERO,
                };
                usage.add_growth(&now, &before);
                next.insert(tgid, (name.clone(), now));
            }
            out.push((name.clone(), usage));
        }
        // What is left in `last` was in a group before and is in none now.
        let mut departed = Vec::with_capacity(self.last.len());
        for (tgid, (group, before)) in self.last.drain() {
            departed.push(tgid);
            let Some(now) = read(tgid) else { continue };
            if let Some((_, usage)) = out.iter_mut().find(|(name, _)| *name == group) {
                usage.add_growth(&now, &before);
            }
        }
        self.last = next;
        (out, departed)
    }
}

/// Host-wide run-queue latency growth from the per-CPU histograms.
#[derive(Default)]
pub struct CpuTracker {
    last: Vec<CpuHistogram>,
}

impl CpuTracker {
    /// Sums every CPU's histogram growth since the previous call.
    pub fn update(&mut self, now: Vec<CpuHistogram>) -> CpuHistogram {
        let mut sum = [0; LATENCY_BUCKETS + 1];
        for (cpu, hist) in now.iter().enumerate() {
            let before = self
                .last
                .get(cpu)
                .copied()
                .unwrap_or([0; LATENCY_BUCKETS + 1]);
            for (i, s) in sum.iter_mut().enumerate() {
                *s += hist[i].saturating_sub(before[i]);
            }
        }
        self.last = now;
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(sent: u64, waits: u64, bucket: usize) -> ProcessCounters {
        let mut c = ProcessCounters::ZERO;
        c.tcp_sent_bytes = sent;
        c.runq_wait_ns = waits * 1000;
        c.runq_hist[bucket] = waits;
        c
    }

    #[test]
    fn groups_grow_by_their_members_only() {
        let mut t = GroupTracker::default();
        let table = std::cell::RefCell::new(HashMap::from([
            (10, counters(100, 1, 9)),
            (11, counters(50, 0, 0)),
            (20, counters(7, 0, 0)),
        ]));
        let groups = vec![("a".to_string(), vec![10, 11]), ("b".to_string(), vec![20])];
        let (first, _) = t.update(&groups, |p| table.borrow().get(&p).copied());
        assert_eq!(
            first[0].1.tcp_sent_bytes, 150,
            "first sight counts from zero"
        );
        assert_eq!(first[1].1.tcp_sent_bytes, 7);
        table.borrow_mut().insert(10, counters(400, 3, 9));
        let (second, _) = t.update(&groups, |p| table.borrow().get(&p).copied());
        assert_eq!(second[0].1.tcp_sent_bytes, 300);
        assert_eq!(second[0].1.runq_waits, 2);
        assert_eq!(second[0].1.runq_hist[9], 2);
        assert_eq!(second[1].1.tcp_sent_bytes, 0);
        // A reused tgid starts below its predecessor: count it from zero, never negative.
        table.borrow_mut().insert(20, counters(3, 0, 0));
        let (third, departed) = t.update(&groups, |p| table.borrow().get(&p).copied());
        assert_eq!(third[1].1.tcp_sent_bytes, 3);
        assert!(departed.is_empty());
        // 11 exits after sending 20 more bytes: charged to "a" once, then forgotten.
        table.borrow_mut().insert(11, counters(70, 0, 0));
        let groups = vec![("a".to_string(), vec![10]), ("b".to_string(), vec![20])];
        let (fourth, departed) = t.update(&groups, |p| table.borrow().get(&p).copied());
        assert_eq!(fourth[0].1.tcp_sent_bytes, 20);
        assert_eq!(departed, vec![11]);
        let (fifth, departed) = t.update(&groups, |p| table.borrow().get(&p).copied());
        assert_eq!(fifth[0].1.tcp_sent_bytes, 0);
        assert!(departed.is_empty());
    }

    #[test]
    fn histograms_become_sketches_at_bucket_resolution() {
        let mut h = [0; LATENCY_BUCKETS];
        h[10] = 99; // [1024, 2048) ns
        h[20] = 1; // about 1 ms
        let s = histogram_sketch(&h);
        assert_eq!(s.count(), 100);
        let p50 = s.quantile(0.5);
        assert!((1024.0..2048.0).contains(&p50), "{p50}");
        assert!(s.quantile(1.0) > 1e6);
        let mut cpu = CpuTracker::default();
        let mut c = [0; LATENCY_BUCKETS + 1];
        c[10] = 99;
        c[LATENCY_BUCKETS] = 99 * 1500;
        let first = cpu.update(vec![c, c]);
        assert_eq!((first[10], first[LATENCY_BUCKETS]), (198, 2 * 99 * 1500));
        let mut later = c;
        later[10] += 5;
        assert_eq!(cpu.update(vec![later, c])[10], 5);
    }
}
