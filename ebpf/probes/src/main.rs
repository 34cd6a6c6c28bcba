//! Prescient's eBPF probes (kernel side). Everything is counted per thread group (process) and
//! kept cumulative in maps; the agent reads and diffs them once a second and maps processes to
//! the VM (cgroup) they belong to. Only attach types that need no kprobes are used: `tp_btf`
//! for the scheduler and `raw_tp` for socket lengths, so the probes load where kprobes and
//! fentry are unavailable.
//!
//! Architecture invariant: no `task_struct` field is ever read. Run-queue waits are matched by
//! the task pointer the tracepoints pass, and charged to a process at the *next* context switch
//! on the same CPU, which runs in that process's context (`bpf_get_current_pid_tgid`). That
//! keeps the probes free of CO-RE relocations, which aya-ebpf does not offer.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds are written in BPF assembly: `core`'s atomics have no read-modify-write on BPF.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod probes {
    use aya_ebpf::{
        bindings::BPF_NOEXIST,
        helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
        macros::{btf_tracepoint, map, raw_tracepoint},
        maps::{LruHashMap, PerCpuArray},
        programs::{BtfTracePointContext, RawTracePointContext},
    };
    use prescient_probes_common::{latency_bucket, CpuSlot, ProcessCounters, LATENCY_BUCKETS};

    /// Set by the loader from the kernel's BTF (see the common crate's `globals`).
    #[unsafe(no_mangle)]
    static SK_FAMILY_OFFSET: u32 = 16;
    #[unsafe(no_mangle)]
    static SK_PROTOCOL_OFFSET: u32 = u32::MAX;
    /// 1 when `sched_switch` passes `prev_state` (Linux 5.18 and later).
    #[unsafe(no_mangle)]
    static SWITCH_HAS_PREV_STATE: u32 = 0;

    static ZERO: ProcessCounters = ProcessCounters::ZERO;

    /// When each runnable task became runnable, by `task_struct` address.
    #[map]
    static WAKEUPS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(32768, 0);
    #[map]
    static CPU_SLOT: PerCpuArray<CpuSlot> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    static PROCESSES: LruHashMap<u32, ProcessCounters> = LruHashMap::with_max_entries(16384, 0);
    #[map]
    static CPU_RUNQ_HIST: PerCpuArray<u64> =
        PerCpuArray::with_max_entries(LATENCY_BUCKETS as u32 + 1, 0);

    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    const IPPROTO_TCP: u16 = 6;

    fn global(g: &'static u32) -> u32 {
        // Volatile so the compiler keeps the load the loader patches.
        unsafe { core::ptr::read_volatile(g) }
    }

    fn counters(tgid: u32) -> Option<*mut ProcessCounters> {
        if let Some(p) = PROCESSES.get_ptr_mut(tgid) {
            return Some(p);
        }
        // Another CPU may insert first: then ours fails and the lookup finds theirs.
        let _ = PROCESSES.insert(tgid, &ZERO, u64::from(BPF_NOEXIST));
        PROCESSES.get_ptr_mut(tgid)
    }

    fn add(field: *mut u64, v: u64) {
        // SAFETY: `field` points into a map value, which lives as long as the program runs.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({0} + 0) += {1}",
                in(reg) field,
                in(reg) v,
            )
        };
    }

    fn current_tgid() -> u32 {
        (bpf_get_current_pid_tgid() >> 32) as u32
    }

    #[btf_tracepoint(function = "sched_wakeup")]
    pub fn sched_wakeup(ctx: BtfTracePointContext) -> u32 {
        let task: u64 = ctx.arg(0);
        let _ = WAKEUPS.insert(task, unsafe { bpf_ktime_get_ns() }, 0);
        0
    }

    #[btf_tracepoint(function = "sched_wakeup_new")]
    pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> u32 {
        let task: u64 = ctx.arg(0);
        let _ = WAKEUPS.insert(task, unsafe { bpf_ktime_get_ns() }, 0);
        0
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
        let now = unsafe { bpf_ktime_get_ns() };
        let preempt: u64 = ctx.arg(0);
        let prev: u64 = ctx.arg(1);
        let next: u64 = ctx.arg(2);
        let Some(slot) = CPU_SLOT.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: a per-CPU slot; this program is its only writer on this CPU.
        let slot = unsafe { &mut *slot };
        // We run in `prev`'s context: charge it its CPU time and the wait it had.
        let tgid = current_tgid();
        if slot.task == prev && tgid != 0 {
            if let Some(c) = counters(tgid) {
                let c = unsafe { &mut *c };
                if slot.since_ns != 0 {
                    add(&mut c.cpu_ns, now.saturating_sub(slot.since_ns));
                }
                if slot.waited_ns != u64::MAX {
                    add(&mut c.runq_waits, 1);
                    add(&mut c.runq_wait_ns, slot.waited_ns);
                    if let Some(b) = c.runq_hist.get_mut(latency_bucket(slot.waited_ns)) {
                        add(b, 1);
                    }
                }
            }
        }
        // A task switched out while still runnable waits on the run queue from now.
        let still_runnable = if global(&SWITCH_HAS_PREV_STATE) != 0 {
            let state: u64 = ctx.arg(3);
            state as u32 == 0
        } else {
            preempt as u8 != 0
        };
        if still_runnable {
            let _ = WAKEUPS.insert(prev, now, 0);
        }
        let mut waited = u64::MAX;
        if let Some(ts) = unsafe { WAKEUPS.get(next) } {
            waited = now.saturating_sub(*ts);
            let _ = WAKEUPS.remove(next);
            // Per-CPU slots: this program is their only writer on this CPU.
            if let Some(b) = CPU_RUNQ_HIST.get_ptr_mut(latency_bucket(waited) as u32) {
                unsafe { *b += 1 };
            }
            if let Some(total) = CPU_RUNQ_HIST.get_ptr_mut(LATENCY_BUCKETS as u32) {
                unsafe { *total += waited };
            }
        }
        slot.task = next;
        slot.since_ns = now;
        slot.waited_ns = waited;
        0
    }

    fn count_tcp(ctx: &RawTracePointContext, sent: bool) {
        let sk: u64 = ctx.arg(0);
        let ret: u64 = ctx.arg(1);
        let bytes = ret as i32;
        if bytes <= 0 || sk == 0 {
            return;
        }
        let family_at = (sk + u64::from(global(&SK_FAMILY_OFFSET))) as *const u16;
        let Ok(family) = (unsafe { bpf_probe_read_kernel(family_at) }) else {
            return;
        };
        if family != AF_INET && family != AF_INET6 {
            return;
        }
        let proto_off = global(&SK_PROTOCOL_OFFSET);
        if proto_off != u32::MAX {
            let proto_at = (sk + u64::from(proto_off)) as *const u16;
            match unsafe { bpf_probe_read_kernel(proto_at) } {
                Ok(p) if p == IPPROTO_TCP => {}
                _ => return,
            }
        }
        let Some(c) = counters(current_tgid()) else {
            return;
        };
        let c = unsafe { &mut *c };
        if sent {
            add(&mut c.tcp_sent_bytes, bytes as u64);
        } else {
            add(&mut c.tcp_received_bytes, bytes as u64);
        }
    }

    #[raw_tracepoint(tracepoint = "sock_send_length")]
    pub fn sock_send_length(ctx: RawTracePointContext) -> i32 {
        count_tcp(&ctx, true);
        0
    }

    #[raw_tracepoint(tracepoint = "sock_recv_length")]
    pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
        count_tcp(&ctx, false);
        0
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("prescient-probes is an eBPF object: build it with `cargo xtask build-ebpf`");
}
