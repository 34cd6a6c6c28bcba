//! Map names and value layouts shared by the probes and the agent that reads them.
#![no_std]

/// Log2 buckets of a run-queue latency histogram: bucket `i` counts waits in
/// `[2^i, 2^(i+1))` ns (bucket 0 also holds 0 ns); 2^35 ns is about 34 s, enough for a
/// throttled cgroup.
pub const LATENCY_BUCKETS: usize = 36;

/// Per-process (thread group) counters, all cumulative since the probes were loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessCounters {
    /// Total time its threads waited runnable on a run queue.
    pub runq_wait_ns: u64,
    /// CPU time its threads ran (between the switch in and the switch out).
    pub cpu_ns: u64,
    /// TCP bytes its sockets sent (successful `sendmsg`, all paths through `sock_sendmsg`),
    /// as of its threads' last switch-out.
    pub tcp_sent_bytes: u64,
    /// TCP bytes its sockets received.
    pub tcp_received_bytes: u64,
    /// Run-queue waits by log2 bucket of their length in ns (their sum is the number of
    /// waits: one counter fewer to update at every switch).
    pub runq_hist: [u64; LATENCY_BUCKETS],
}

impl ProcessCounters {
    pub const ZERO: Self = Self {
        runq_wait_ns: 0,
        cpu_ns: 0,
        tcp_sent_bytes: 0,
        tcp_received_bytes: 0,
        runq_hist: [0; LATENCY_BUCKETS],
    };
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
    /// TCP bytes it sent and received since it was switched in: kept here, where no other CPU
    /// writes, and added to its process's counters when it is switched out.
    pub tcp_sent_bytes: u64,
    pub tcp_received_bytes: u64,
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
    /// `LruPerCpuHashMap<u32 tgid, ProcessCounters>: one copy per CPU, summed by the reader`.
    pub const PROCESSES: &str = "PROCESSES";
    /// `PerCpuArray<CpuSlot>` of one entry: what runs on each CPU, and its run-queue histogram.
    pub const CPU_SLOT: &str = "CPU_SLOT";
}

/// Globals the loader sets from the running kernel's BTF before loading.
pub mod globals {
    /// Byte offset of `sock_common.skc_family` in `struct sock` (16 on every kernel so far).
    pub const SK_FAMILY_OFFSET: &str = "SK_FAMILY_OFFSET";
    /// Byte offset of `sock.sk_protocol`, or `u32::MAX` when unknown (then every inet socket
    /// counts, not only TCP).
    pub const SK_PROTOCOL_OFFSET: &str = "SK_PROTOCOL_OFFSET";
    /// Byte offset of `task_struct.sched_info.run_delay` (needs `CONFIG_SCHED_INFO`).
    pub const TASK_RUN_DELAY_OFFSET: &str = "TASK_RUN_DELAY_OFFSET";
    /// Byte offset of `task_struct.se.sum_exec_runtime`.
    pub const TASK_EXEC_RUNTIME_OFFSET: &str = "TASK_EXEC_RUNTIME_OFFSET";
    /// Byte offset of `task_struct.flags` (to leave kernel threads out of per-process counts).
    pub const TASK_FLAGS_OFFSET: &str = "TASK_FLAGS_OFFSET";
}

#[cfg(feature = "user")]
// SAFETY: both are plain `repr(C)` structs of integers with no padding.
unsafe impl aya::Pod for ProcessCounters {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for CpuSlot {}
