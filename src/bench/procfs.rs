//! CPU, context switches, wake-up IPIs and busy time, from procfs and sysfs, for the benchmarks
//! that measure what processes cost.

/// Every process now: (pid, parent pid, user + system CPU time in clock ticks).
pub(super) fn process_table() -> Vec<(u32, u32, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command (which may hold spaces) start after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // rest[0] is the state, [1] ppid, [11] utime, [12] stime.
        out.push((pid, field(1) as u32, field(11) + field(12)));
    }
    out
}

/// CPU time of a process and its descendants that are alive now, in clock ticks.
pub(super) fn cpu_ticks(root: u32) -> u64 {
    let table = process_table();
    let mut total = 0;
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, ticks) in &table {
            if *pid == p {
                total += ticks;
            }
            if *ppid == p {
                frontier.push(*pid);
            }
        }
    }
    total
}

/// Nanoseconds a process's threads have run, from the scheduler's own accounting
/// (`/proc/PID/task/*/schedstat`): exact, where `/proc/PID/stat` counts 10 ms ticks, too coarse
/// for the short phases of a comparison. 0 for a process that is gone.
pub(super) fn on_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Context switches on this machine since boot (`ctxt` in /proc/stat; 0 if unreadable).
pub(super) fn context_switches() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("ctxt "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Inter-processor interrupts that wake another CPU since boot: rescheduling and function-call
/// IPIs (`RES` and `CAL` in /proc/interrupts; the kernel queues a remote wake-up through the
/// latter). In a VM each one is an exit; 0 if unreadable.
pub(super) fn wakeup_ipis() -> u64 {
    std::fs::read_to_string("/proc/interrupts")
        .map(|s| {
            s.lines()
                .filter_map(|l| {
                    let l = l.trim_start();
                    l.strip_prefix("RES:").or_else(|| l.strip_prefix("CAL:"))
                })
                .flat_map(|counts| {
                    counts
                        .split_whitespace()
                        .map_while(|c| c.parse::<u64>().ok())
                })
                .sum()
        })
        .unwrap_or(0)
}

/// CPUs online: what [`machine_busy_ns`] counts wall time on.
pub(super) fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64
}

/// Nanoseconds the machine's CPUs have been busy since some fixed point: wall time on every
/// CPU less the idle residency the cpuidle driver reports (in µs), else 10 ms ticks from
/// `/proc/stat`.
pub(super) fn machine_busy_ns() -> u64 {
    let idle_us = (|| -> Option<u64> {
        let mut total = 0;
        let mut cpus = 0;
        for cpu in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
            let name = cpu.file_name();
            let name = name.to_str()?;
            if !name.starts_with("cpu") || !name[3..].chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            cpus += 1;
            for state in std::fs::read_dir(cpu.path().join("cpuidle"))
                .ok()?
                .flatten()
            {
                total += std::fs::read_to_string(state.path().join("time"))
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        }
        (cpus > 0).then_some(total)
    })();
    let cpus = online_cpus();
    match idle_us {
        Some(idle_us) => {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid timespec to write to.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            let wall_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            (wall_ns * cpus).saturating_sub(idle_us * 1000)
        }
        None => {
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            prescient_agent::telemetry::host::busy_ticks().unwrap_or(0) * (1_000_000_000 / hz)
        }
    }
}

/// The direct children of a process.
pub(super) fn children(parent: u32) -> Vec<u32> {
    process_table()
        .into_iter()
        .filter(|(_, ppid, _)| *ppid == parent)
        .map(|(pid, _, _)| pid)
        .collect()
}
