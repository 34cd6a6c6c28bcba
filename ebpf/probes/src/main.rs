//! Prescient's eBPF probes (kernel side). Everything is counted per thread group (process) and
//! kept cumulative in maps; the agent reads and diffs them once a second and maps processes to
//! the VM (cgroup) they belong to. Only `tp_btf` programs are used (sched_switch,
//! sock_send_length, sock_recv_length), so the probes load where kprobes and fentry are not
//! available.
//!
//! Architecture invariant: aya-ebpf offers no CO-RE relocations, so every kernel struct field
//! the probes read (`task_struct.sched_info.run_delay`, `sock.skc_family`, `sock.sk_protocol`)
//! is read at an offset the loader found in the running kernel's BTF and wrote into a global,
//! and only through BTF-typed tracepoint arguments (`tp_btf`), which the verifier checks.
//! Processes are named by `bpf_get_current_pid_tgid`: a switched-in task is charged at its
//! switch-out, which runs in its own context.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds are written in BPF assembly: `core`'s atomics have no read-modify-write on BPF.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod probes {
    use aya_ebpf::{
        bindings::BPF_NOEXIST,
        helpers::bpf_get_current_pid_tgid,
        macros::{btf_tracepoint, map},
        maps::{LruPerCpuHashMap, PerCpuArray},
        programs::BtfTracePointContext,
    };
    use prescient_probes_common::{latency_bucket, CpuSlot, ProcessCounters};

    /// Set by the loader from the kernel's BTF (see the common crate's `globals`).
    #[unsafe(no_mangle)]
    static SK_FAMILY_OFFSET: u32 = 16;
    #[unsafe(no_mangle)]
    static SK_PROTOCOL_OFFSET: u32 = u32::MAX;
    #[unsafe(no_mangle)]
    static TASK_RUN_DELAY_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_FLAGS_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_EXEC_RUNTIME_OFFSET: u32 = 0;

    /// `task_struct.flags` bit of kernel threads (stable since Linux 2.6).
    const PF_KTHREAD: u32 = 0x0020_0000;

    static ZERO: ProcessCounters = ProcessCounters::ZERO;

    #[map]
    static CPU_SLOT: PerCpuArray<CpuSlot> = PerCpuArray::with_max_entries(1, 0);
    /// Per CPU, so a process's counters never bounce between CPUs and need no atomic adds
    /// (the switch runs with preemption off); the agent sums the CPUs' copies. The loader
    /// sizes it to the machine's CPU count.
    #[map]
    static PROCESSES: LruPerCpuHashMap<u32, ProcessCounters> =
        LruPerCpuHashMap::with_max_entries(16384, 0);

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

    /// At every context switch, in `prev`'s context. The kernel adds the run-queue wait a
    /// task just ended to its `sched_info.run_delay` right after this tracepoint, so the
    /// value read as a task is switched in and again as it is switched out (on the same CPU,
    /// which it cannot leave while running) differ by exactly that one wait. No map update
    /// per wakeup: a few loads from the two tasks and one per-CPU slot, plus one hash lookup
    /// (of this CPU's copy, no atomic operation) for user processes.
    #[btf_tracepoint(function = "sched_switch")]
    pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
        let prev: *const u8 = ctx.arg(1);
        let next: *const u8 = ctx.arg(2);
        let Some(slot) = CPU_SLOT.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: a per-CPU slot; this program is its only writer on this CPU.
        let slot = unsafe { &mut *slot };
        let off = global(&TASK_RUN_DELAY_OFFSET) as usize;
        let run_off = global(&TASK_EXEC_RUNTIME_OFFSET) as usize;
        let tgid = current_tgid();
        // tgid 0 is the idle task: it never waits and its CPU time is idle time.
        if slot.task == prev as u64 && tgid != 0 {
            // SAFETY: `prev` is the kernel's task pointer (BTF-typed); the offset is from BTF.
            let delay = unsafe { *(prev.add(off) as *const u64) };
            let waited = delay.wrapping_sub(slot.run_delay_ns);
            // A wrap would mean the slot is stale; such a wait is not counted.
            let counted = waited < 1 << 40;
            if counted {
                if let Some(b) = slot.runq_hist.get_mut(latency_bucket(waited)) {
                    *b += 1;
                }
                slot.runq_total_ns += waited;
            }
            // Kernel threads belong to no VM: their switches (a good share of all) skip the
            // per-process hash lookup and its atomic adds.
            let flags = unsafe { *(prev.add(global(&TASK_FLAGS_OFFSET) as usize) as *const u32) };
            let process = if flags & PF_KTHREAD == 0 {
                counters(tgid)
            } else {
                None
            };
            if let Some(c) = process {
                // SAFETY: this CPU's copy of the process's counters; nothing else writes it
                // while this switch runs.
                let c = unsafe { &mut *c };
                let ran = unsafe { *(prev.add(run_off) as *const u64) };
                c.cpu_ns += ran.saturating_sub(slot.exec_runtime_ns);
                c.tcp_sent_bytes += slot.tcp_sent_bytes;
                c.tcp_received_bytes += slot.tcp_received_bytes;
                if counted {
                    c.runq_wait_ns += waited;
                    if let Some(b) = c.runq_hist.get_mut(latency_bucket(waited)) {
                        *b += 1;
                    }
                }
            }
        }
        slot.task = next as u64;
        // SAFETY: as above, for `next`.
        slot.exec_runtime_ns = unsafe { *(next.add(run_off) as *const u64) };
        slot.tcp_sent_bytes = 0;
        slot.tcp_received_bytes = 0;
        // SAFETY: as above, for `next`.
        slot.run_delay_ns = unsafe { *(next.add(off) as *const u64) };
        0
    }

    /// Charges a successful socket send or receive of `ret` bytes on `sk` to the task running
    /// on this CPU (socket calls run in their caller's context), when `sk` is an inet (TCP,
    /// where the protocol offset is known) socket. The bytes wait in the CPU's slot until the
    /// task is switched out: no hash lookup and no atomic operation per call.
    /// `sk` is a BTF pointer (tp_btf): the verifier lets us read its fields directly, at
    /// offsets that are constants once the loader has set them.
    fn count_tcp(ctx: &BtfTracePointContext, sent: bool) {
        let sk: *const u8 = ctx.arg(0);
        let ret: u64 = ctx.arg(1);
        let bytes = ret as i32;
        if bytes <= 0 || sk.is_null() {
            return;
        }
        // SAFETY: the offsets come from this kernel's BTF for `struct sock`.
        let family = unsafe { *(sk.add(global(&SK_FAMILY_OFFSET) as usize) as *const u16) };
        if family != AF_INET && family != AF_INET6 {
            return;
        }
        let proto_off = global(&SK_PROTOCOL_OFFSET);
        if proto_off != u32::MAX {
            let proto = unsafe { *(sk.add(proto_off as usize) as *const u16) };
            if proto != IPPROTO_TCP {
                return;
            }
        }
        let Some(slot) = CPU_SLOT.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: a per-CPU slot. This program can be preempted (the switch then flushes
        // and resets the slot), so the add is one instruction: never a stale read-modify-write.
        let slot = unsafe { &mut *slot };
        if sent {
            add(&mut slot.tcp_sent_bytes, bytes as u64);
        } else {
            add(&mut slot.tcp_received_bytes, bytes as u64);
        }
    }

    #[btf_tracepoint(function = "sock_send_length")]
    pub fn sock_send_length(ctx: BtfTracePointContext) -> u32 {
        count_tcp(&ctx, true);
        0
    }

    #[btf_tracepoint(function = "sock_recv_length")]
    pub fn sock_recv_length(ctx: BtfTracePointContext) -> u32 {
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
