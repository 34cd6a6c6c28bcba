//! What a host offers: CPUs, memory, network interfaces, GPUs. Read from procfs and sysfs.

use prescient_schemas::agent_capnp::host_info;

#[derive(Debug, Clone)]
pub struct Nic {
    pub name: String,
    pub speed_bits_per_sec: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct HostInventory {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub nics: Vec<Nic>,
    pub gpus: Vec<Gpu>,
}

/// Why the GPUs could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML unavailable: {0}")]
    Unavailable(nvml_wrapper::error::NvmlError),
    #[error("NVML device count: {0}")]
    Count(nvml_wrapper::error::NvmlError),
    #[error("NVML device {index}: {source}")]
    Device {
        index: u32,
        source: nvml_wrapper::error::NvmlError,
    },
}

/// The GPUs NVML reports, or why there are none (no driver, no device, no permission).
pub fn read_gpus() -> Result<Vec<Gpu>, GpuError> {
    let nvml = nvml_wrapper::Nvml::init().map_err(GpuError::Unavailable)?;
    let count = nvml.device_count().map_err(GpuError::Count)?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let d = nvml
            .device_by_index(index)
            .map_err(|source| GpuError::Device { index, source })?;
        gpus.push(Gpu {
            index,
            name: d.name().unwrap_or_default(),
            uuid: d.uuid().unwrap_or_default(),
            memory_bytes: d.memory_info().map_or(0, |m| m.total),
        });
    }
    Ok(gpus)
}

impl HostInventory {
    /// Reads this host; `cpus` and `memory_bytes` override what is found (to give an agent a
    /// share of a machine, as tests and the demo do).
    pub fn read(cpus: Option<u32>, memory_bytes: Option<u64>) -> HostInventory {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let found_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let found_memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024);
        let mut nics = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let speed = std::fs::read_to_string(e.path().join("speed"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i64>().ok())
                    .filter(|s| *s > 0)
                    .map_or(0, |mbit| mbit as u64 * 1_000_000);
                nics.push(Nic {
                    name,
                    speed_bits_per_sec: speed,
                });
            }
        }
        nics.sort_by(|a, b| a.name.cmp(&b.name));
        let gpus = match read_gpus() {
            Ok(g) => {
                tracing::info!(gpus = g.len(), "GPUs found through NVML");
                g
            }
            Err(why) => {
                tracing::info!("this host reports no GPUs: {why}");
                Vec::new()
            }
        };
        HostInventory {
            hostname,
            cpus: cpus.unwrap_or(found_cpus),
            memory_bytes: memory_bytes.unwrap_or(found_memory),
            nics,
            gpus,
        }
    }

    pub fn encode(
        &self,
        name: &str,
        provisioner: &str,
        ingress: &str,
        telemetry: &str,
        mut b: host_info::Builder<'_>,
    ) {
        b.set_name(name);
        b.set_telemetry(telemetry);
        b.set_hostname(self.hostname.as_str());
        b.set_cpus(self.cpus);
        b.set_memory_bytes(self.memory_bytes);
        b.set_provisioner(provisioner);
        b.set_ingress_addr(ingress);
        b.set_agent_version(env!("CARGO_PKG_VERSION"));
        let mut gpus = b.reborrow().init_gpus(self.gpus.len() as u32);
        for (i, g) in self.gpus.iter().enumerate() {
            let mut gb = gpus.reborrow().get(i as u32);
            gb.set_index(g.index);
            gb.set_name(g.name.as_str());
            gb.set_uuid(g.uuid.as_str());
            gb.set_memory_bytes(g.memory_bytes);
        }
        let mut nics = b.init_nics(self.nics.len() as u32);
        for (i, n) in self.nics.iter().enumerate() {
            let mut nb = nics.reborrow().get(i as u32);
            nb.set_name(n.name.as_str());
            nb.set_speed_bits_per_sec(n.speed_bits_per_sec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_reads_this_host_and_overrides_win() {
        let h = HostInventory::read(Some(3), Some(1 << 30));
        assert_eq!((h.cpus, h.memory_bytes), (3, 1 << 30));
        assert!(!h.hostname.is_empty());
        assert!(h.nics.iter().any(|n| n.name == "lo"), "{:?}", h.nics);
        // Without a GPU driver this is an explanation, never a panic.
        match read_gpus() {
            Ok(g) => assert_eq!(g, h.gpus),
            Err(why) => assert!(why.to_string().contains("NVML"), "{why}"),
        }
    }
}
