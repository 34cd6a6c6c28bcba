//! The eBPF probes, user side: loads the object built from `ebpf/probes` (embedded at build
//! time), adapts it to the running kernel through BTF, attaches it, tells it which processes
//! form each VM, and turns its cumulative per-group counters into per-VM and per-host deltas.
//! It also hands over the final byte counts of watched TCP sockets that closed (see
//! [`super::sockets`], which reads live sockets' counters).
//!
//! API boundary: the kernel side counts per group and per CPU, for the processes in its
//! `TRACKED` table (and the processes they fork). Which processes form a VM is decided here,
//! from the VM's cgroup membership (or its worker's pid), so the same probes serve cgroup v1
//! and v2 hosts; [`super::groups::Groups`] keeps the table in step with that membership.

use super::groups::{Groups, TrackedTable};
use aya::maps::{MapData, PerCpuArray};
use prescient_probes_common::{
    globals, maps, ClosedSocket, CpuSlot, GroupCounters, LATENCY_BUCKETS,
};
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

/// Groups (VMs) the per-CPU counters map holds: 4,096, fewer on machines with many CPUs so that
/// its copies (one per CPU) stay within 64 MiB.
fn group_capacity() -> u32 {
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u64;
    let per_group = (std::mem::size_of::<GroupCounters>() as u64) * cpus;
    ((64u64 << 20) / per_group).clamp(64, 4096) as u32
}

/// The programs, in the order they are loaded and attached.
const PROGRAMS: [&str; 4] = [
    "sched_switch",
    "sched_process_fork",
    "sched_process_exit",
    "inet_sock_set_state",
];

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
    /// The kernel's table of tracked processes and the agent's bookkeeping of it (in a cell:
    /// editing needs the maps mutably, the agent holds the probes shared).
    table: std::cell::RefCell<(KernelTable, Groups)>,
    groups: PerCpuArray<MapData, GroupCounters>,
    cpu_slots: PerCpuArray<MapData, CpuSlot>,
    watched: std::cell::RefCell<aya::maps::HashMap<MapData, u64, u32>>,
    closed: std::cell::RefCell<aya::maps::HashMap<MapData, u64, ClosedSocket>>,
    /// Whether the close probe tells TCP sockets apart from other inet sockets on this kernel.
    pub tcp_only: bool,
}

impl Probes {
    /// Loads and attaches every probe; any failure leaves nothing attached.
    pub fn load() -> Result<Probes, ProbeError> {
        Self::load_object(OBJECT)
    }

    /// Loads and attaches the probes from another build of the object (`bench probes
    /// --variant` compares builds side by side); the agent uses the embedded one.
    pub fn load_object(object: &[u8]) -> Result<Probes, ProbeError> {
        if object.is_empty() {
            return Err(ProbeError::NotBuilt);
        }
        // One read of the kernel's BTF: our reader finds offsets, aya's loads the programs.
        let data = std::fs::read(crate::telemetry::btf::VMLINUX).map_err(ProbeError::NoBtf)?;
        let invalid = |e: String| ProbeError::NoBtf(std::io::Error::other(e));
        let raw_btf =
            crate::telemetry::btf::Btf::parse(&data).map_err(|e| invalid(e.to_string()))?;
        let aya_btf = aya::Btf::parse(&data, aya::Endianness::default())
            .map_err(|e| invalid(e.to_string()))?;
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
        let task_u32 = |field: &'static str| {
            raw_btf
                .member("task_struct", field)
                .filter(|m| m.size == Some(4) && m.bitfield_bits.is_none())
                .map(|m| m.bit_offset / 8)
                .ok_or(ProbeError::Missing(field))
        };
        let (task_tgid, task_pid) = (task_u32("tgid")?, task_u32("pid")?);
        let exec_runtime = raw_btf
            .member("task_struct", "se")
            .zip(raw_btf.member("sched_entity", "sum_exec_runtime"))
            .filter(|(_, r)| r.size == Some(8) && r.bitfield_bits.is_none())
            .map(|(se, r)| (se.bit_offset + r.bit_offset) / 8)
            .ok_or(ProbeError::Missing("task_struct.se.sum_exec_runtime"))?;
        let tcp_sock = |field: &'static str, size: u32| {
            raw_btf
                .member("tcp_sock", field)
                .filter(|m| m.size == Some(size) && m.bitfield_bits.is_none())
                .map(|m| m.bit_offset / 8)
                .ok_or(ProbeError::Missing(field))
        };
        let tcp_offsets = [
            (globals::TCP_BYTES_ACKED_OFFSET, tcp_sock("bytes_acked", 8)?),
            (
                globals::TCP_BYTES_RECEIVED_OFFSET,
                tcp_sock("bytes_received", 8)?,
            ),
            (globals::TCP_WRITE_SEQ_OFFSET, tcp_sock("write_seq", 4)?),
            (globals::TCP_SND_UNA_OFFSET, tcp_sock("snd_una", 4)?),
            (globals::TCP_RCV_NXT_OFFSET, tcp_sock("rcv_nxt", 4)?),
            (globals::TCP_COPIED_SEQ_OFFSET, tcp_sock("copied_seq", 4)?),
        ];
        let mut loader = aya::EbpfLoader::new();
        for (name, offset) in &tcp_offsets {
            loader.override_global(name, offset, true);
        }
        let mut ebpf = loader
            .btf(Some(&aya_btf))
            .map_max_entries(maps::GROUPS, group_capacity())
            .override_global(globals::SK_PROTOCOL_OFFSET, &protocol, true)
            .override_global(globals::TASK_RUN_DELAY_OFFSET, &run_delay, true)
            .override_global(globals::TASK_TGID_OFFSET, &task_tgid, true)
            .override_global(globals::TASK_PID_OFFSET, &task_pid, true)
            .override_global(globals::TASK_EXEC_RUNTIME_OFFSET, &exec_runtime, true)
            .load(object)
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
        let table = KernelTable {
            tracked: map(&mut ebpf, maps::TRACKED)?,
            overflow: map(&mut ebpf, maps::OVERFLOW)?,
        };
        let groups = map(&mut ebpf, maps::GROUPS)?;
        let cpu_slots = map(&mut ebpf, maps::CPU_SLOT)?;
        let watched = std::cell::RefCell::new(map(&mut ebpf, maps::WATCHED)?);
        let closed = std::cell::RefCell::new(map(&mut ebpf, maps::CLOSED)?);
        Ok(Probes {
            ebpf,
            links,
            table: std::cell::RefCell::new((table, Groups::new(group_capacity()))),
            groups,
            cpu_slots,
            watched,
            closed,
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

    /// Counts process `tgid` (and the processes it forks from now on) in VM `name` at once,
    /// not at the next [`sample`](Self::sample): for a worker the agent has just started.
    pub fn join(&self, name: &str, tgid: u32) {
        let (table, groups) = &mut *self.table.borrow_mut();
        groups.join(table, name, tgid, |g| self.group(g));
    }

    /// What each VM's processes counted since the previous call; `vms` is each VM's name and
    /// its processes now, which the kernel's table is brought in step with first.
    pub fn sample(&self, vms: &[(String, Vec<u32>)]) -> Vec<(String, ProbeUsage)> {
        let (table, groups) = &mut *self.table.borrow_mut();
        groups.update(table, vms, |g| self.group(g))
    }

    /// Records the close of TCP socket `cookie` (its final counts) for VM `vm`, whose
    /// processes the agent found holding it.
    pub fn watch(&self, cookie: u64, vm: &str) {
        let group = self.table.borrow().1.index(vm);
        if let Some(group) = group {
            let _ = self.watched.borrow_mut().insert(cookie, group, 0);
        }
    }

    /// Stops watching socket `cookie` (gone without a recorded close: the probes were detached
    /// as it closed).
    pub fn unwatch(&self, cookie: u64) {
        let _ = self.watched.borrow_mut().remove(&cookie);
    }

    /// Watched sockets that closed since the previous call, with the VM each counts in.
    /// Taken out of the kernel's table.
    pub fn take_closed(&self) -> Vec<Closed> {
        let mut closed = self.closed.borrow_mut();
        let found: Vec<(u64, ClosedSocket)> = closed.iter().filter_map(Result::ok).collect();
        let table = self.table.borrow();
        found
            .into_iter()
            .map(|(cookie, c)| {
                // Removed one by one: a socket that closes while this runs stays for next time.
                let _ = closed.remove(&cookie);
                Closed {
                    cookie,
                    written: c.written,
                    read: c.read,
                    vm: table.1.name_of(c.group).map(str::to_string),
                }
            })
            .collect()
    }

    /// One group's counters since the probes were loaded, summed over the CPUs' copies.
    fn group(&self, group: u32) -> Option<GroupCounters> {
        let per_cpu = self.groups.get(&group, 0).ok()?;
        let mut sum = GroupCounters::ZERO;
        for c in per_cpu.iter() {
            sum.runq_wait_ns += c.runq_wait_ns;
            sum.cpu_ns += c.cpu_ns;
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

/// What the probes saw of a group of processes (a VM) or a host over some interval, and the
/// TCP bytes its sockets carried (from [`crate::sockets`]).
/// A closed socket's final counts, as the probes recorded them at its close.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub cookie: u64,
    pub written: u64,
    pub read: u64,
    /// The VM the probes charged it to (None: that VM is gone).
    pub vm: Option<String>,
}

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
    /// Adds what `now` counted beyond `before` (counters only grow).
    pub(super) fn add_growth(&mut self, now: &GroupCounters, before: &GroupCounters) {
        let grew = |a: u64, b: u64| a.checked_sub(b).unwrap_or(a);
        self.runq_wait_ns += grew(now.runq_wait_ns, before.runq_wait_ns);
        self.cpu_ns += grew(now.cpu_ns, before.cpu_ns);
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

/// The probes' maps behind [`TrackedTable`].
struct KernelTable {
    tracked: aya::maps::Array<MapData, u64>,
    overflow: aya::maps::HashMap<MapData, u32, u32>,
}

impl TrackedTable for KernelTable {
    fn entry(&self, slot: u32) -> u64 {
        self.tracked.get(&slot, 0).unwrap_or(0)
    }
    fn set_entry(&mut self, slot: u32, entry: u64) {
        let _ = self.tracked.set(slot, entry, 0);
    }
    fn overflow(&self) -> Vec<(u32, u32)> {
        self.overflow.iter().filter_map(Result::ok).collect()
    }
    fn set_overflow(&mut self, tgid: u32, group: u32) {
        let _ = self.overflow.insert(tgid, group, 0);
    }
    fn remove_overflow(&mut self, tgid: u32) {
        let _ = self.overflow.remove(&tgid);
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
