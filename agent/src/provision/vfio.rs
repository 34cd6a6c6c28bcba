//! GPU passthrough: which GPUs a VM gets (PCI bus ids, as NVML names them) and the host checks
//! before QEMU is asked for `vfio-pci` devices: the IOMMU is on, the GPU's IOMMU group is bound
//! to `vfio-pci` as a whole, and its `/dev/vfio` node exists. Each failure names its fix.

use std::path::Path;

/// A GPU passed through to a VM: its PCI address (`0000:65:00.0`, as NVML gives it).
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
}
