//! Prescient's eBPF probes (kernel side). Counts are kept per group of processes (a VM) and
//! per CPU, cumulative in maps; the agent says which processes belong to which group and
//! reads the groups' counters once a second. Only `tp_btf` programs are used (sched_switch,
//! sched_process_fork, sched_process_exit, inet_sock_set_state), so the probes load where
//! kprobes and fentry are not available. TCP bytes come from the kernel's own per-socket
//! counters, which the agent reads (sock_diag); the probes only keep the final counts of
//! sockets that close between two reads, so nothing runs per send or receive.
//!
//! Architecture invariant: aya-ebpf offers no CO-RE relocations, so every kernel struct field
//! the probes read (`task_struct.sched_info.run_delay`, `task_struct.tgid`, `sock.sk_protocol`,
//! ...) is read at an offset the loader found in the running kernel's BTF and wrote into a
//! global, and only through BTF-typed tracepoint arguments (`tp_btf`), which the verifier
//! checks. A switched-in task is charged at its switch-out, which runs in its own context.
//!
//! Architecture invariant: a context switch does no hashing and no atomic operation. It finds
//! its process's group in a direct-mapped array (`TRACKED`, which the verifier inlines) and
//! adds to this CPU's copy of the group's counters; only processes whose slot collides look in
//! the `OVERFLOW` hash. Untracked processes (everything outside a VM) cost one array load.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds are written in BPF assembly: `core`'s atomics have no read-modify-write on BPF.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod probes {
    use aya_ebpf::{
        helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_probe_read_kernel},
        macros::{btf_tracepoint, map},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::BtfTracePointContext,
    };
    use prescient_probes_common::{latency_bucket, tracked, ClosedSocket, CpuSlot, GroupCounters};

    /// Set by the loader from the kernel's BTF (see the common crate's `globals`).
    #[unsafe(no_mangle)]
    static SK_PROTOCOL_OFFSET: u32 = u32::MAX;
    #[unsafe(no_mangle)]
    static TASK_RUN_DELAY_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_EXEC_RUNTIME_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_TGID_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_PID_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TCP_BYTES_ACKED_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TCP_BYTES_RECEIVED_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TCP_WRITE_SEQ_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TCP_SND_UNA_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TCP_RCV_NXT_OFFSET: u32 = 0;
    #[unsafe(no_mangle)]
    static TCP_COPIED_SEQ_OFFSET: u32 = 0;

    #[map]
    static CPU_SLOT: PerCpuArray<CpuSlot> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    static TRACKED: Array<u64> = Array::with_max_entries(tracked::SLOTS, 0);
    #[map]
    static OVERFLOW: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);
    /// Per CPU, so a group's counters never bounce between CPUs and need no atomic adds (the
    /// switch runs with preemption off); the agent sums the CPUs' copies. The loader sizes it.
    #[map]
    static GROUPS: PerCpuArray<GroupCounters> = PerCpuArray::with_max_entries(1024, 0);
    /// LRU, so that sockets whose close was never seen (the probes detached meanwhile) cannot
    /// fill it.
    #[map]
    static WATCHED: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);
    #[map]
    static CLOSED: HashMap<u64, ClosedSocket> = HashMap::with_max_entries(65536, 0);

    const IPPROTO_TCP: u16 = 6;
    const TCP_ESTABLISHED: i32 = 1;
    const TCP_FIN_WAIT1: i32 = 4;
    const TCP_CLOSE: i32 = 7;
    const TCP_CLOSE_WAIT: i32 = 8;
    const TCP_LAST_ACK: i32 = 9;

    fn global(g: &'static u32) -> u32 {
        // Volatile so the compiler keeps the load the loader patches.
        unsafe { core::ptr::read_volatile(g) }
    }

    /// A `u32` field of a task, at an offset from BTF.
    fn task_u32(task: *const u8, offset: &'static u32) -> u32 {
        // SAFETY: `task` is a BTF-typed task pointer from the tracepoint; the offset is from
        // this kernel's BTF.
        unsafe { *(task.add(global(offset) as usize) as *const u32) }
    }

    fn task_u64(task: *const u8, offset: &'static u32) -> u64 {
        // SAFETY: as in `task_u32`.
        unsafe { *(task.add(global(offset) as usize) as *const u64) }
    }

    /// The group process `tgid` counts in, if it is tracked (and, unless `exited_too`, its
    /// leader has not exited).
    #[inline(always)]
    fn group_of(tgid: u32, exited_too: bool) -> Option<u32> {
        let entry = *TRACKED.get(tracked::slot(tgid))?;
        if tracked::tgid(entry) == tgid {
            if entry & tracked::EXITING_BIT != 0 && !exited_too {
                return None;
            }
            return Some(tracked::group(entry));
        }
        if entry & tracked::OVERFLOW_BIT == 0 {
            return None;
        }
        // SAFETY: the value is copied out at once.
        unsafe { OVERFLOW.get(&tgid) }.copied()
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

    /// At every context switch, in `prev`'s context. The kernel adds the run-queue wait a
    /// task just ended to its `sched_info.run_delay` right after this tracepoint, so the
    /// value read as a task is switched in and again as it is switched out (on the same CPU,
    /// which it cannot leave while running) differ by exactly that one wait.
    #[btf_tracepoint(function = "sched_switch")]
    pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
        let prev: *const u8 = ctx.arg(1);
        let next: *const u8 = ctx.arg(2);
        let Some(slot) = CPU_SLOT.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: a per-CPU slot; this program is its only writer on this CPU, and it runs
        // with preemption off.
        let slot = unsafe { &mut *slot };
        let tgid = task_u32(prev, &TASK_TGID_OFFSET);
        // tgid 0 is the idle task: it never waits and its CPU time is idle time.
        if slot.task == prev as u64 && tgid != 0 {
            let waited = task_u64(prev, &TASK_RUN_DELAY_OFFSET).wrapping_sub(slot.run_delay_ns);
            // A wrap would mean the slot is stale; such a wait is not counted.
            let counted = waited < 1 << 40;
            let bucket = latency_bucket(waited);
            if counted {
                if let Some(b) = slot.runq_hist.get_mut(bucket) {
                    *b += 1;
                }
                slot.runq_total_ns += waited;
            }
            if let Some(c) = group_of(tgid, false).and_then(|g| GROUPS.get_ptr_mut(g)) {
                // SAFETY: this CPU's copy of the group's counters; nothing else writes it
                // while this switch runs.
                let c = unsafe { &mut *c };
                let ran = task_u64(prev, &TASK_EXEC_RUNTIME_OFFSET);
                c.cpu_ns += ran.saturating_sub(slot.exec_runtime_ns);
                if counted {
                    c.runq_wait_ns += waited;
                    if let Some(b) = c.runq_hist.get_mut(bucket) {
                        *b += 1;
                    }
                }
            }
        }
        slot.task = next as u64;
        slot.exec_runtime_ns = task_u64(next, &TASK_EXEC_RUNTIME_OFFSET);
        slot.run_delay_ns = task_u64(next, &TASK_RUN_DELAY_OFFSET);
        0
    }

    /// A new process (not a thread) forked by a tracked one counts in its parent's group from
    /// its first switch: a worker's helper processes are never missed for the second until the
    /// agent's next look at the VM. When its slot is taken, the agent adds it at that look.
    #[btf_tracepoint(function = "sched_process_fork")]
    pub fn sched_process_fork(ctx: BtfTracePointContext) -> u32 {
        let parent: *const u8 = ctx.arg(0);
        let child: *const u8 = ctx.arg(1);
        let tgid = task_u32(child, &TASK_TGID_OFFSET);
        // A thread shares its process's entry.
        if task_u32(child, &TASK_PID_OFFSET) != tgid || tgid == 0 {
            return 0;
        }
        let Some(group) = group_of(task_u32(parent, &TASK_TGID_OFFSET), false) else {
            return 0;
        };
        if let Some(entry) = TRACKED.get_ptr_mut(tracked::slot(tgid)) {
            // SAFETY: an entry of the table. Two writers of one slot would need two processes
            // 64 Ki pids apart forked at once (or the agent writing it then); the agent
            // rechecks every VM member's entry each second, which repairs such a loss.
            unsafe {
                let old = *entry;
                if tracked::tgid(old) == 0 || old & tracked::EXITING_BIT != 0 {
                    *entry = (old & tracked::OVERFLOW_BIT) | tracked::entry(tgid, group);
                }
            }
        }
        0
    }

    /// A thread exits: what it ran since its last switch-in goes to its group now (its last
    /// switch-out comes after this, when its process may have left the table). When the
    /// process's leader exits, its entry is marked exiting: its switches stop counting (a later
    /// process given the same pid does not count in the group), while the sockets it closes
    /// as it exits still find their group.
    #[btf_tracepoint(function = "sched_process_exit")]
    pub fn sched_process_exit(ctx: BtfTracePointContext) -> u32 {
        let task: *const u8 = ctx.arg(0);
        let tgid = task_u32(task, &TASK_TGID_OFFSET);
        if tgid == 0 {
            return 0;
        }
        if let Some(slot) = CPU_SLOT.get_ptr_mut(0) {
            // SAFETY: this CPU's slot, describing `task` (which runs this probe). A preemption
            // between the read and the reset below would count this slice twice; the window is
            // a few instructions.
            let slot = unsafe { &mut *slot };
            if slot.task == task as u64 {
                let ran = task_u64(task, &TASK_EXEC_RUNTIME_OFFSET);
                if let Some(c) = group_of(tgid, false).and_then(|g| GROUPS.get_ptr_mut(g)) {
                    // SAFETY: this CPU's copy of the group's counters.
                    let c = unsafe { &mut *c };
                    add(&mut c.cpu_ns, ran.saturating_sub(slot.exec_runtime_ns));
                }
                slot.exec_runtime_ns = ran;
            }
        }
        if task_u32(task, &TASK_PID_OFFSET) != tgid {
            return 0;
        }
        if let Some(entry) = TRACKED.get_ptr_mut(tracked::slot(tgid)) {
            // SAFETY: an entry of the table (see the fork probe on racing writers).
            unsafe {
                let old = *entry;
                if tracked::tgid(old) == tgid {
                    *entry = old | tracked::EXITING_BIT;
                } else if old & tracked::OVERFLOW_BIT != 0 {
                    let _ = OVERFLOW.remove(&tgid);
                }
            }
        }
        0
    }

    /// A field of `sk` read through the kernel's copy helper: the fields are `tcp_sock`'s,
    /// past the `struct sock` the tracepoint's BTF type lets the verifier check.
    fn sk_read<T: Copy + Default>(sk: *const u8, offset: &'static u32) -> T {
        // SAFETY: a checked kernel read; a fault gives the default.
        unsafe { bpf_probe_read_kernel(sk.add(global(offset) as usize) as *const T) }
            .unwrap_or_default()
    }

    /// A TCP socket changes state. Two kinds of change matter:
    /// - the application closing it (into FIN_WAIT1 or LAST_ACK, or straight to CLOSE), which
    ///   runs in the closing process's context: a tracked process's socket is watched from
    ///   then on, so one opened and closed between two of the agent's reads is still counted;
    /// - its end (CLOSE, also on entering TIME_WAIT): a watched socket's final counts go to
    ///   `CLOSED` for the agent.
    ///
    /// A few times per connection, never per send or receive.
    #[btf_tracepoint(function = "inet_sock_set_state")]
    pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> u32 {
        let sk: *const u8 = ctx.arg(0);
        let old: i32 = ctx.arg(1);
        let new: i32 = ctx.arg(2);
        let closed_by_owner = new == TCP_FIN_WAIT1
            || new == TCP_LAST_ACK
            || (new == TCP_CLOSE && (old == TCP_ESTABLISHED || old == TCP_CLOSE_WAIT));
        let ended = new == TCP_CLOSE;
        if sk.is_null() || !(closed_by_owner || ended) {
            return 0;
        }
        let proto_off = global(&SK_PROTOCOL_OFFSET);
        if proto_off != u32::MAX {
            // SAFETY: an offset inside `struct sock`, from this kernel's BTF.
            let proto = unsafe { *(sk.add(proto_off as usize) as *const u16) };
            if proto != IPPROTO_TCP {
                return 0;
            }
        }
        // SAFETY: `sk` is the tracepoint's socket; the helper makes its cookie if it has none
        // (the same one sock_diag reports to the agent).
        let cookie = unsafe { bpf_get_socket_cookie(sk as *mut _) };
        // SAFETY: the value is copied out at once.
        let mut group = unsafe { WATCHED.get(&cookie) }.copied();
        if group.is_none() && closed_by_owner {
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            group = group_of(tgid, true);
            if let (Some(g), false) = (group, ended) {
                let _ = WATCHED.insert(&cookie, &g, 0);
            }
        }
        let Some(group) = group else {
            return 0;
        };
        if ended {
            let acked: u64 = sk_read(sk, &TCP_BYTES_ACKED_OFFSET);
            let received: u64 = sk_read(sk, &TCP_BYTES_RECEIVED_OFFSET);
            let write_seq: u32 = sk_read(sk, &TCP_WRITE_SEQ_OFFSET);
            let snd_una: u32 = sk_read(sk, &TCP_SND_UNA_OFFSET);
            let rcv_nxt: u32 = sk_read(sk, &TCP_RCV_NXT_OFFSET);
            let copied_seq: u32 = sk_read(sk, &TCP_COPIED_SEQ_OFFSET);
            let closed = ClosedSocket {
                group,
                _pad: 0,
                written: acked + write_seq.wrapping_sub(snd_una) as u64,
                read: received.saturating_sub(rcv_nxt.wrapping_sub(copied_seq) as u64),
            };
            let _ = CLOSED.insert(&cookie, &closed, 0);
            let _ = WATCHED.remove(&cookie);
        }
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
