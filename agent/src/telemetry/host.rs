//! Host samples from procfs (and NVML for GPUs): CPU utilisation and steal, memory, network
//! bytes, run-queue delay. The fallback that always works; eBPF probes add finer signals where
//! the kernel allows them.

use prescient_schemas::agent_capnp::host_sample;
use prescient_schemas::host_sample::HostSample;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CpuTimes {
    busy: u64,
    steal: u64,
    total: u64,
}

/// One second of this host, with what the agent reads before it goes on the wire.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSampleRec {
    /// What goes to the control node (its run-queue sketch is filled from `runq_hist`).
    pub sample: HostSample,
    /// GPU memory held per process (pid), summed over GPUs: the agent adds up each VM's.
    pub gpu_memory_by_pid: std::collections::HashMap<u32, u64>,
    /// Run-queue waits on all CPUs in the interval (log2 ns buckets), from the eBPF probes.
    pub runq_hist: Option<crate::telemetry::probes::CpuHistogram>,
}

impl HostSampleRec {
    pub fn encode(&self, b: host_sample::Builder<'_>) {
        let mut sample = self.sample.clone();
        sample.run_queue = self
            .runq_hist
            .as_ref()
            .map(|h| crate::telemetry::probes::histogram_sketch(h));
        sample.encode(b);
    }
}

/// CPU time the whole host has spent busy (user, nice, system, irq, softirq), in clock ticks.
pub fn busy_ticks() -> Option<u64> {
    cpu_times(&std::fs::read_to_string("/proc/stat").ok()?).map(|t| t.busy)
}

fn cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let idle = get(3) + get(4);
    let steal = get(7);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    Some(CpuTimes {
        busy,
        steal,
        total: busy + idle + steal,
    })
}

fn net_bytes(dev: &str) -> (u64, u64) {
    let mut rx = 0;
    let mut tx = 0;
    for line in dev.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        rx += f.first().copied().unwrap_or(0);
        tx += f.get(8).copied().unwrap_or(0);
    }
    (rx, tx)
}

fn run_delay(schedstat: &str) -> u64 {
    // "cpuN ... <running ns> <waiting ns> <slices>": the second to last field is run delay.
    schedstat
        .lines()
        .filter(|l| l.starts_with("cpu"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(f.len().checked_sub(2)?)?.parse::<u64>().ok()
        })
        .sum()
}

fn meminfo(m: &str, key: &str) -> u64 {
    m.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Adds each process's GPU memory (a process on several GPUs, or listed as both compute and
/// graphics, counts once per listing the driver reports memory for).
fn add_gpu_memory(
    by_pid: &mut std::collections::HashMap<u32, u64>,
    procs: impl Iterator<Item = (u32, nvml_wrapper::enums::device::UsedGpuMemory)>,
) {
    for (pid, used) in procs {
        if let nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) = used {
            *by_pid.entry(pid).or_default() += bytes;
        }
    }
}

/// GPU memory held by a VM: the sum over its processes.
pub fn vm_gpu_memory(by_pid: &std::collections::HashMap<u32, u64>, processes: &[u32]) -> u64 {
    processes.iter().filter_map(|p| by_pid.get(p)).sum()
}

/// Turns cumulative counters into per-interval samples.
#[derive(Default)]
pub struct HostSampler {
    prev: Option<(CpuTimes, (u64, u64), u64)>,
    nvml: Option<nvml_wrapper::Nvml>,
    nvml_tried: bool,
}

impl HostSampler {
    /// Reads the host now; the first call only primes the counters and returns None.
    pub fn sample(&mut self, now_unix_ms: u64) -> Option<HostSampleRec> {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = cpu_times(&read("/proc/stat"))?;
        let net = net_bytes(&read("/proc/net/dev"));
        let delay = run_delay(&read("/proc/schedstat"));
        let prev = self.prev.replace((cpu, net, delay));
        let (pc, pn, pd) = prev?;
        let total = cpu.total.saturating_sub(pc.total).max(1) as f32;
        let mem = read("/proc/meminfo");
        let total_mem = meminfo(&mem, "MemTotal:");
        let mut rec = HostSampleRec {
            sample: HostSample {
                at_unix_ms: now_unix_ms,
                cpu_util: cpu.busy.saturating_sub(pc.busy) as f32 / total,
                cpu_steal: cpu.steal.saturating_sub(pc.steal) as f32 / total,
                memory_used_bytes: total_mem.saturating_sub(meminfo(&mem, "MemAvailable:")),
                memory_total_bytes: total_mem,
                net_rx_bytes: net.0.saturating_sub(pn.0),
                net_tx_bytes: net.1.saturating_sub(pn.1),
                run_delay_ns: delay.saturating_sub(pd),
                ..Default::default()
            },
            ..Default::default()
        };
        if !self.nvml_tried {
            self.nvml_tried = true;
            self.nvml = nvml_wrapper::Nvml::init().ok();
        }
        if let Some(nvml) = &self.nvml {
            let count = nvml.device_count().unwrap_or(0);
            for i in 0..count {
                if let Ok(d) = nvml.device_by_index(i) {
                    rec.sample
                        .gpu_util
                        .push(d.utilization_rates().map_or(0.0, |u| u.gpu as f32 / 100.0));
                    rec.sample
                        .gpu_memory_used_bytes
                        .push(d.memory_info().map_or(0, |m| m.used));
                    rec.sample
                        .gpu_power_watts
                        .push(d.power_usage().map_or(0.0, |mw| mw as f32 / 1000.0));
                    rec.sample.gpu_temperature_c.push(
                        d.temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                            .map_or(0.0, |c| c as f32),
                    );
                    let procs = d
                        .running_compute_processes()
                        .unwrap_or_default()
                        .into_iter()
                        .chain(d.running_graphics_processes().unwrap_or_default());
                    add_gpu_memory(
                        &mut rec.gpu_memory_by_pid,
                        procs.map(|p| (p.pid, p.used_gpu_memory)),
                    );
                }
            }
        }
        Some(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_procfs() {
        let stat = "cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3\n";
        assert_eq!(
            cpu_times(stat),
            Some(CpuTimes {
                busy: 155,
                steal: 35,
                total: 1000
            })
        );
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  eth0: 1000 5 0 0 0 0 0 0 2000 7 0 0 0 0 0 0\n";
        assert_eq!(net_bytes(dev), (1000, 2000));
        let sched = "version 15\ntimestamp 1\ncpu0 0 0 0 0 0 0 500 70 9\ncpu1 0 0 0 0 0 0 400 30 9\ndomain0 3 x\n";
        assert_eq!(run_delay(sched), 100);
    }

    #[test]
    fn gpu_memory_is_added_up_per_process_and_per_vm() {
        use nvml_wrapper::enums::device::UsedGpuMemory::{Unavailable, Used};
        let mut by_pid = std::collections::HashMap::new();
        // pid 10 on two GPUs; pid 11 without a figure (WDDM); pid 12 alone.
        add_gpu_memory(
            &mut by_pid,
            [
                (10, Used(1 << 30)),
                (11, Unavailable),
                (12, Used(5)),
                (10, Used(1 << 20)),
            ]
            .into_iter(),
        );
        assert_eq!(by_pid.get(&10), Some(&((1 << 30) + (1 << 20))));
        assert_eq!(by_pid.get(&11), None);
        assert_eq!(vm_gpu_memory(&by_pid, &[10, 11, 99]), (1 << 30) + (1 << 20));
        assert_eq!(vm_gpu_memory(&by_pid, &[12]), 5);
    }

    #[test]
    fn samples_this_host() {
        let mut s = HostSampler::default();
        assert!(s.sample(0).is_none(), "the first call primes the counters");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let r = s.sample(1).expect("a sample");
        assert!((0.0..=1.0).contains(&r.sample.cpu_util), "{r:?}");
        assert!(
            r.sample.memory_used_bytes > 0
                && r.sample.memory_used_bytes < r.sample.memory_total_bytes
        );
    }
}
