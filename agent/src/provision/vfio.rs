//! GPU passthrough: which GPUs a VM gets and the host checks before QEMU is asked for
//! `vfio-pci` devices: the IOMMU is on, the GPU's IOMMU group is bound to `vfio-pci` as a
//! whole, and its `/dev/vfio` node exists. Each failure names its fix. GPUs bound to `vfio-pci`
//! are invisible to NVML (its driver does not hold them), so they are found in sysfs: NVIDIA
//! (vendor 0x10de) display or 3D controllers.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;
use std::rc::Rc;

/// A PCI address as sysfs names it (`0000:65:00.0`) from NVML's (`00000000:65:00.0`).
pub fn sysfs_address(nvml_bus_id: &str) -> String {
    match nvml_bus_id.split_once(':') {
        Some((domain, rest)) => match u32::from_str_radix(domain, 16) {
            Ok(d) => format!("{d:04x}:{}", rest.to_lowercase()),
            Err(_) => nvml_bus_id.to_lowercase(),
        },
        None => nvml_bus_id.to_lowercase(),
    }
}

/// This host's NVIDIA GPUs bound to `vfio-pci`, by PCI address.
pub fn vfio_gpus(sysfs: &Path) -> Vec<PassedGpu> {
    let mut out: Vec<PassedGpu> = std::fs::read_dir(sysfs.join("bus/pci/devices"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
            let driver = std::fs::read_link(e.path().join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()));
            // Class 0x03xxxx: display controllers (VGA 0x0300, 3D 0x0302).
            read("vendor").trim() == "0x10de"
                && read("class").trim().starts_with("0x03")
                && driver.as_deref() == Some("vfio-pci")
        })
        .map(|e| PassedGpu {
            pci_bus_id: e.file_name().to_string_lossy().to_string(),
        })
        .collect();
    out.sort_by(|a, b| a.pci_bus_id.cmp(&b.pci_bus_id));
    out
}

/// The GPUs VMs hold on this host; a lease gives its GPUs back when dropped (its VM ended).
#[derive(Clone, Default)]
pub struct GpuLeases {
    held: Rc<RefCell<BTreeSet<String>>>,
}

/// GPUs held by one VM.
#[derive(Debug)]
pub struct GpuLease {
    pub gpus: Vec<PassedGpu>,
    held: Rc<RefCell<BTreeSet<String>>>,
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        let mut held = self.held.borrow_mut();
        for g in &self.gpus {
            held.remove(&g.pci_bus_id);
        }
    }
}

/// Why a VM cannot have the GPUs it needs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("the task needs {wanted} GPUs passed through; this host has {usable} free that pass the checks ({})", .why.join("; "))]
    NotEnough {
        wanted: u32,
        usable: usize,
        why: Vec<String>,
    },
}

impl GpuLeases {
    /// `wanted` of `candidates` not held by another VM and passing [`check_passthrough`].
    pub fn lease(
        &self,
        candidates: &[PassedGpu],
        wanted: u32,
        sysfs: &Path,
        dev: &Path,
    ) -> Result<GpuLease, LeaseError> {
        let mut chosen = Vec::new();
        let mut why = Vec::new();
        {
            let held = self.held.borrow();
            for g in candidates {
                if chosen.len() as u32 == wanted {
                    break;
                }
                if held.contains(&g.pci_bus_id) {
                    continue;
                }
                match check_passthrough(sysfs, dev, &g.pci_bus_id) {
                    Ok(()) => chosen.push(g.clone()),
                    Err(e) => why.push(e.to_string()),
                }
            }
        }
        if (chosen.len() as u32) < wanted {
            if candidates.is_empty() {
                why.push("no NVIDIA GPU is bound to vfio-pci".into());
            }
            return Err(LeaseError::NotEnough {
                wanted,
                usable: chosen.len(),
                why,
            });
        }
        let mut held = self.held.borrow_mut();
        for g in &chosen {
            held.insert(g.pci_bus_id.clone());
        }
        Ok(GpuLease {
            gpus: chosen,
            held: self.held.clone(),
        })
    }
}

/// A GPU passed through to a VM: its PCI address as sysfs names it (`0000:65:00.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedGpu {
    pub pci_bus_id: String,
}

/// Why a GPU cannot be passed through to a VM on this host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PassthroughError {
    #[error("GPU {0}: no such PCI device (is the bus id NVML's, with its domain?)")]
    NoDevice(String),
    #[error("GPU {0}: no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on, iommu=pt on the kernel command line)")]
    NoIommuGroup(String),
    #[error("GPU {gpu}: bound to driver {driver:?}, not vfio-pci: unbind it and bind it to vfio-pci (driver_override), or load vfio-pci with ids=VENDOR:DEVICE")]
    NotVfio { gpu: String, driver: String },
    #[error("GPU {gpu}: IOMMU group {group} also holds {other}, which is not bound to vfio-pci: the whole group must be")]
    GroupShared {
        gpu: String,
        group: String,
        other: String,
    },
    #[error("GPU {0}: /dev/vfio/{1} is missing (is the vfio module loaded?)")]
    NoVfioDevice(String, String),
}

/// Checks that `gpu` can be passed through: it exists under `sysfs` (`/sys` on a host), is in
/// an IOMMU group whose every device is bound to `vfio-pci`, and its group's `/dev/vfio` node
/// exists under `dev`.
pub fn check_passthrough(sysfs: &Path, dev: &Path, gpu: &str) -> Result<(), PassthroughError> {
    let device = sysfs.join("bus/pci/devices").join(gpu);
    if !device.exists() {
        return Err(PassthroughError::NoDevice(gpu.into()));
    }
    let driver_of = |d: &Path| {
        std::fs::read_link(d.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| "none".into())
    };
    let group = std::fs::read_link(device.join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .ok_or_else(|| PassthroughError::NoIommuGroup(gpu.into()))?;
    let driver = driver_of(&device);
    if driver != "vfio-pci" {
        return Err(PassthroughError::NotVfio {
            gpu: gpu.into(),
            driver,
        });
    }
    let members = sysfs
        .join("kernel/iommu_groups")
        .join(&group)
        .join("devices");
    for m in std::fs::read_dir(&members).into_iter().flatten().flatten() {
        let name = m.file_name().to_string_lossy().to_string();
        // PCI bridges stay with their own driver (pcieport); every endpoint goes to vfio.
        let d = driver_of(&m.path());
        if name != gpu && d != "vfio-pci" && d != "pcieport" {
            return Err(PassthroughError::GroupShared {
                gpu: gpu.into(),
                group,
                other: format!("{name} ({d})"),
            });
        }
    }
    if !dev.join("vfio").join(&group).exists() {
        return Err(PassthroughError::NoVfioDevice(gpu.into(), group));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_checks_name_what_is_wrong() {
        let root = std::env::temp_dir().join(format!("prescient-vfio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        let gpu = "0000:65:00.0";
        let err = check_passthrough(&sys, &dev, gpu).unwrap_err();
        assert_eq!(err, PassthroughError::NoDevice(gpu.into()));
        let device = sys.join("bus/pci/devices").join(gpu);
        std::fs::create_dir_all(&device).unwrap();
        assert!(matches!(
            check_passthrough(&sys, &dev, gpu),
            Err(PassthroughError::NoIommuGroup(_))
        ));
        let group = sys.join("kernel/iommu_groups/42");
        std::fs::create_dir_all(group.join("devices")).unwrap();
        std::os::unix::fs::symlink(&group, device.join("iommu_group")).unwrap();
        let drivers = sys.join("bus/pci/drivers");
        for d in ["nvidia", "vfio-pci", "snd_hda_intel"] {
            std::fs::create_dir_all(drivers.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(drivers.join("nvidia"), device.join("driver")).unwrap();
        let e = check_passthrough(&sys, &dev, gpu).unwrap_err();
        assert!(e.to_string().contains("bound to driver \"nvidia\""), "{e}");
        std::fs::remove_file(device.join("driver")).unwrap();
        std::os::unix::fs::symlink(drivers.join("vfio-pci"), device.join("driver")).unwrap();
        // The GPU's audio function shares its group, still on its own driver.
        let audio = sys.join("bus/pci/devices/0000:65:00.1");
        std::fs::create_dir_all(&audio).unwrap();
        std::os::unix::fs::symlink(drivers.join("snd_hda_intel"), audio.join("driver")).unwrap();
        std::os::unix::fs::symlink(&device, group.join("devices").join(gpu)).unwrap();
        std::os::unix::fs::symlink(&audio, group.join("devices/0000:65:00.1")).unwrap();
        let e = check_passthrough(&sys, &dev, gpu).unwrap_err();
        assert!(
            e.to_string()
                .contains("also holds 0000:65:00.1 (snd_hda_intel)"),
            "{e}"
        );
        std::fs::remove_file(audio.join("driver")).unwrap();
        std::os::unix::fs::symlink(drivers.join("vfio-pci"), audio.join("driver")).unwrap();
        assert!(matches!(
            check_passthrough(&sys, &dev, gpu),
            Err(PassthroughError::NoVfioDevice(_, g)) if g == "42"
        ));
        std::fs::create_dir_all(dev.join("vfio/42")).unwrap();
        assert_eq!(check_passthrough(&sys, &dev, gpu), Ok(()));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn vfio_gpus_are_found_in_sysfs_and_leased_once() {
        let root =
            std::env::temp_dir().join(format!("prescient-vfio-lease-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        let drivers = sys.join("bus/pci/drivers");
        std::fs::create_dir_all(drivers.join("vfio-pci")).unwrap();
        std::fs::create_dir_all(drivers.join("nvidia")).unwrap();
        let gpu = |addr: &str, group: &str, driver: &str, class: &str| {
            let d = sys.join("bus/pci/devices").join(addr);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), "0x10de\n").unwrap();
            std::fs::write(d.join("class"), format!("{class}\n")).unwrap();
            std::os::unix::fs::symlink(drivers.join(driver), d.join("driver")).unwrap();
            let g = sys.join("kernel/iommu_groups").join(group);
            std::fs::create_dir_all(g.join("devices")).unwrap();
            std::os::unix::fs::symlink(&g, d.join("iommu_group")).unwrap();
            std::os::unix::fs::symlink(&d, g.join("devices").join(addr)).unwrap();
            std::fs::create_dir_all(dev.join("vfio").join(group)).unwrap();
        };
        gpu("0000:65:00.0", "10", "vfio-pci", "0x030200");
        gpu("0000:b3:00.0", "11", "vfio-pci", "0x030000");
        gpu("0000:17:00.0", "12", "nvidia", "0x030200");
        gpu("0000:18:00.0", "13", "vfio-pci", "0x040300");
        let found = vfio_gpus(&sys);
        assert_eq!(
            found
                .iter()
                .map(|g| g.pci_bus_id.as_str())
                .collect::<Vec<_>>(),
            vec!["0000:65:00.0", "0000:b3:00.0"],
            "NVIDIA display controllers on vfio-pci only"
        );
        let leases = GpuLeases::default();
        let first = leases.lease(&found, 1, &sys, &dev).unwrap();
        assert_eq!(first.gpus[0].pci_bus_id, "0000:65:00.0");
        let second = leases.lease(&found, 1, &sys, &dev).unwrap();
        assert_eq!(
            second.gpus[0].pci_bus_id, "0000:b3:00.0",
            "the first is held"
        );
        let e = leases.lease(&found, 1, &sys, &dev).unwrap_err();
        assert!(
            e.to_string()
                .contains("needs 1 GPUs passed through; this host has 0 free"),
            "{e}"
        );
        drop(first);
        assert!(
            leases.lease(&found, 1, &sys, &dev).is_ok(),
            "given back with its VM"
        );
        let e = leases.lease(&[], 1, &sys, &dev).unwrap_err();
        assert!(
            e.to_string().contains("no NVIDIA GPU is bound to vfio-pci"),
            "{e}"
        );
        assert_eq!(sysfs_address("00000000:65:00.0"), "0000:65:00.0");
        assert_eq!(sysfs_address("00000001:B3:00.0"), "0001:b3:00.0");
        let _ = std::fs::remove_dir_all(&root);
    }
}
