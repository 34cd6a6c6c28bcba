//! Host samples from procfs (and NVML for GPUs): CPU utilisation and steal, memory, network
//! bytes, run-queue delay. The fallback that always works; eBPF probes add finer signals where
//! the kernel allows them.

use prescient_schemas::agent_capnp::host_sample;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CpuTimes {
    busy: u64,
    steal: u64,
    total: u64,
}

/// One second of this host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSampleRec {
    pub at_unix_ms: u64,
    pub cpu_util: f32,
    pub cpu_steal: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub run_delay_ns: u64,
    pub gpu_util: Vec<f32>,
    pub gpu_memory_used_bytes: Vec<u64>,
    /// Run-queue waits on all CPUs in the interval (log2 ns buckets), from the eBPF probes.
    pub runq_hist: Option<crate::probes::CpuHistogram>,
}

impl HostSampleRec {
    pub fn encode(&self, mut b: host_sample::Builder<'_>) {
        b.set_at_unix_ms(self.at_unix_ms);
        b.set_cpu_util(self.cpu_util);
        b.set_cpu_steal(self.cpu_steal);
        b.set_memory_used_bytes(self.memory_used_bytes);
        b.set_memory_total_bytes(self.memory_total_bytes);
        b.set_net_rx_bytes(self.net_rx_bytes);
        b.set_net_tx_bytes(self.net_tx_bytes);
        b.set_run_delay_ns(self.run_delay_ns);
        let mut g = b.reborrow().init_gpu_util(self.gpu_util.len() as u32);
        for (i, u) in self.gpu_util.iter().enumerate() {
            g.set(i as u32, *u);
        }
        let mut m = b
            .reborrow()
            .init_gpu_memory_used_bytes(self.gpu_memory_used_bytes.len() as u32);
        for (i, u) in self.gpu_memory_used_bytes.iter().enumerate() {
            m.set(i as u32, *u);
        }
        if let Some(hist) = &self.runq_hist {
            let sketch = crate::probes::histogram_sketch(hist);
            b.set_probes(true);
            b.set_run_queue_p99_ns(sketch.quantile(0.99) as u64);
            sketch.encode(b.init_run_queue_latency_ns());
        }
    }
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
            at_unix_ms: now_unix_ms,
            cpu_util: cpu.busy.saturating_sub(pc.busy) as f32 / total,
            cpu_steal: cpu.steal.saturating_sub(pc.steal) as f32 / total,
            memory_used_bytes: total_mem.saturating_sub(meminfo(&mem, "MemAvailable:")),
            memory_total_bytes: total_mem,
            net_rx_bytes: net.0.saturating_sub(pn.0),
            net_tx_bytes: net.1.saturating_sub(pn.1),
            run_delay_ns: delay.saturating_sub(pd),
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
                    rec.gpu_util
                        .push(d.utilization_rates().map_or(0.0, |u| u.gpu as f32 / 100.0));
                    rec.gpu_memory_used_bytes
                        .push(d.memory_info().map_or(0, |m| m.used));
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
    fn samples_this_host() {
        let mut s = HostSampler::default();
        assert!(s.sample(0).is_none(), "the first call primes the counters");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let r = s.sample(1).expect("a sample");
        assert!((0.0..=1.0).contains(&r.cpu_util), "{r:?}");
        assert!(r.memory_used_bytes > 0 && r.memory_used_bytes < r.memory_total_bytes);
    }
}
