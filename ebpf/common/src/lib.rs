//! Map names and value layouts shared by the probes and the agent that reads them.
#![no_std]

/// Log2 buckets of a run-queue latency histogram: bucket `i` counts waits in
/// `[2^i, 2^(i+1))` ns (bucket 0 also holds 0 ns); 2^35 ns is about 34 s, enough for a
/// throttled cgroup.
pub const LATENCY_BUCKETS: usize = 36;

/// One group's (a VM's) counters, all cumulative since the probes were loaded: its processes'
/// switches are added here as they happen, so a process that exits or leaves loses nothing
/// that was counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupCounters {
    /// Total time its threads waited runnable on a run queue.
    pub runq_wait_ns: u64,
    /// CPU time its threads ran (between the switch in and the switch out).
    pub cpu_ns: u64,
    /// Run-queue waits by log2 bucket of their length in ns (their sum is the number of
    /// waits: one counter fewer to update at every switch).
    pub runq_hist: [u64; LATENCY_BUCKETS],
}

impl GroupCounters {
    pub const ZERO: Self = Self {
        runq_wait_ns: 0,
        cpu_ns: 0,
        runq_hist: [0; LATENCY_BUCKETS],
    };
}

/// A TCP socket's final byte counts, written by the probe on `inet_sock_set_state` when a
/// socket the agent watches (or one a tracked process closed) reaches `TCP_CLOSE`, and taken
/// by the agent at its next per-second look: what the socket carried since that look would
/// otherwise be lost with it. Live sockets are read from the kernel's own per-socket
/// counters (sock_diag) instead, so no probe runs on a send or a receive.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClosedSocket {
    /// The group it counts in: the one the agent gave it, else that of the process that
    /// closed it.
    pub group: u32,
    pub _pad: u32,
    /// Bytes the application wrote to it: `bytes_acked + (write_seq - snd_una)` (the SYN and
    /// FIN count one each, as the kernel's `bytes_acked` counts them).
    pub written: u64,
    /// Bytes the application read from it: `bytes_received - (rcv_nxt - copied_seq)`.
    pub read: u64,
}

/// Which processes are counted, and in which group: a direct-mapped table, one `u64` entry
/// per slot, process `tgid` at slot `tgid & (SLOTS - 1)`. A context switch finds its process
/// with one array load (the verifier inlines it) and no hashing; a process whose slot another
/// holds goes to the `OVERFLOW` hash, and the slot's `OVERFLOW_BIT` says to look there.
pub mod tracked {
    /// Slots in the table (a power of two): 64 Ki entries of 8 bytes.
    pub const SLOTS: u32 = 1 << 16;
    /// Set in a slot when some process that maps to it is in the `OVERFLOW` hash instead.
    pub const OVERFLOW_BIT: u64 = 1 << 63;
    /// Set by the exit probe when the process's leader exits: its switches no longer count,
    /// but the sockets it still holds (closed after the exit tracepoint, in `exit_files`) are
    /// still its group's. A new process may take the slot at once.
    pub const EXITING_BIT: u64 = 1 << 62;
    /// Groups the counters can hold at most (group indices are 16 bits in an entry).
    pub const MAX_GROUPS: u32 = 1 << 16;

    /// The slot of process `tgid`.
    #[inline(always)]
    pub const fn slot(tgid: u32) -> u32 {
        tgid & (SLOTS - 1)
    }

    /// The entry saying that `tgid` counts in `group` (tgid 0, the idle task, is never one).
    #[inline(always)]
    pub const fn entry(tgid: u32, group: u32) -> u64 {
        tgid as u64 | ((group as u64 & 0xffff) << 32)
    }

    /// The process an entry holds (0: none).
    #[inline(always)]
    pub const fn tgid(entry: u64) -> u32 {
        entry as u32
    }

    /// The group an entry's process counts in.
    #[inline(always)]
    pub const fn group(entry: u64) -> u32 {
        ((entry >> 32) & 0xffff) as u32
    }
}

/// What is running on one CPU now: written at each context switch so that the next switch on
/// the same CPU, which runs in that task's context, can charge it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSlot {
    /// `task_struct` address of the task switched in (compared, never dereferenced).
    pub task: u64,
    /// Its `se.sum_exec_runtime` (CPU time so far) as it was switched in: the kernel keeps it
    /// current at the switch, so no clock is read here.
    pub exec_runtime_ns: u64,
    /// Its `sched_info.run_delay` (total run-queue wait so far) as it was switched in, before
    /// the kernel added the wait that just ended.
    pub run_delay_ns: u64,
    /// Every run-queue wait that ended on this CPU, by log2 bucket, and their total in ns:
    /// kept in the slot the switch already holds, so the histogram costs no extra lookup.
    pub runq_hist: [u64; LATENCY_BUCKETS],
    pub runq_total_ns: u64,
}

/// The bucket a wait of `ns` nanoseconds goes to.
#[inline(always)]
pub fn latency_bucket(ns: u64) -> usize {
    let b = 63 - (ns | 1).leading_zeros() as usize;
    if b >= LATENCY_BUCKETS {
        LATENCY_BUCKETS - 1
    } else {
        b
    }
}

/// Map names, as the agent looks them up.
pub mod maps {
    /// `Array<u64>` of `tracked::SLOTS` entries (see [`tracked`](super::tracked)), written by
    /// the agent and by the fork and exit probes.
    pub const TRACKED: &str = "TRACKED";
    /// `HashMap<u32 tgid, u32 group>`: tracked processes whose slot another process holds.
    pub const OVERFLOW: &str = "OVERFLOW";
    /// `PerCpuArray<GroupCounters>` by group index: one copy per CPU, summed by the reader.
    pub const GROUPS: &str = "GROUPS";
    /// `PerCpuArray<CpuSlot>` of one entry: what runs on each CPU, and its run-queue histogram.
    pub const CPU_SLOT: &str = "CPU_SLOT";
    /// `LruHashMap<u64 socket cookie, u32 group>`: TCP sockets whose close is recorded, put
    /// there by the agent (the sockets it found in a VM) and by the probe (a socket a tracked
    /// process closed, before the agent saw it).
    pub const WATCHED: &str = "WATCHED";
    /// `HashMap<u64 socket cookie, ClosedSocket>`: watched sockets that closed, taken (and
    /// removed) by the agent each second.
    pub const CLOSED: &str = "CLOSED";
}

/// Globals the loader sets from the running kernel's BTF before loading.
pub mod globals {
    /// Byte offset of `sock.sk_protocol`, or `u32::MAX` when unknown (then every socket whose
    /// state changes is taken for TCP).
    pub const SK_PROTOCOL_OFFSET: &str = "SK_PROTOCOL_OFFSET";
    /// Byte offset of `task_struct.sched_info.run_delay` (needs `CONFIG_SCHED_INFO`).
    pub const TASK_RUN_DELAY_OFFSET: &str = "TASK_RUN_DELAY_OFFSET";
    /// Byte offset of `task_struct.se.sum_exec_runtime`.
    pub const TASK_EXEC_RUNTIME_OFFSET: &str = "TASK_EXEC_RUNTIME_OFFSET";
    /// Byte offset of `task_struct.tgid` (the process of a task, read without a helper call).
    pub const TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
    /// Byte offset of `task_struct.pid` (a task whose pid is its tgid leads its process).
    pub const TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
    /// Byte offsets in `struct tcp_sock` of `bytes_acked`, `bytes_received` (u64), and
    /// `write_seq`, `snd_una`, `rcv_nxt`, `copied_seq` (u32): a closing socket's byte counts.
    pub const TCP_BYTES_ACKED_OFFSET: &str = "TCP_BYTES_ACKED_OFFSET";
    pub const TCP_BYTES_RECEIVED_OFFSET: &str = "TCP_BYTES_RECEIVED_OFFSET";
    pub const TCP_WRITE_SEQ_OFFSET: &str = "TCP_WRITE_SEQ_OFFSET";
    pub const TCP_SND_UNA_OFFSET: &str = "TCP_SND_UNA_OFFSET";
    pub const TCP_RCV_NXT_OFFSET: &str = "TCP_RCV_NXT_OFFSET";
    pub const TCP_COPIED_SEQ_OFFSET: &str = "TCP_COPIED_SEQ_OFFSET";
}

#[cfg(feature = "user")]
// SAFETY: both are plain `repr(C)` structs of integers with no padding.
unsafe impl aya::Pod for GroupCounters {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for CpuSlot {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ClosedSocket {}
