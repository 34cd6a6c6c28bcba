//! The QEMU command line and the provisioner's refusals, without starting QEMU.
use super::*;

fn machine(gpus: Vec<PassedGpu>) -> Machine {
    Machine {
        accel: Accel::Tcg,
        vcpus: 2,
        memory_mib: 224,
        kernel: "/img/vmlinuz".into(),
        initrd: "/img/initramfs.cpio.gz".into(),
        worker_args: vec!["--host".into(), "h1".into()],
        channel: "/run/r1/channel.sock".into(),
        qmp: "/run/r1/qmp.sock".into(),
        console: "/run/r1/console.log".into(),
        forward: ("127.0.0.1".parse().expect("an address"), 40123),
        gpus,
        tsc_khz: Some(2_445_430),
    }
}

fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

#[test]
fn a_microvm_gets_mmio_devices_the_channel_and_the_forward() {
    let a = machine(vec![]).args();
    assert_eq!(after(&a, "-machine")[0].split(',').next(), Some("microvm"));
    assert_eq!(after(&a, "-accel"), vec!["tcg"]);
    assert_eq!(after(&a, "-smp"), vec!["2"]);
    assert_eq!(after(&a, "-m"), vec!["224M"]);
    let devices = after(&a, "-device");
    assert!(devices.contains(&"virtio-serial-device"), "{devices:?}");
    assert!(devices.contains(&"virtserialport,chardev=channel,name=prescient.worker"));
    assert!(devices.contains(&"virtio-net-device,netdev=net0"));
    assert!(!devices.iter().any(|d| d.starts_with("vfio")));
    assert_eq!(
        after(&a, "-netdev"),
        vec!["user,id=net0,hostfwd=tcp:127.0.0.1:40123-:7600"]
    );
    let append = after(&a, "-append")[0];
    assert!(append.ends_with(" -- --host h1"), "{append}");
    assert!(append.contains(" tsc_early_khz=2445430"), "{append}");
    assert_eq!(
        after(&a, "-qmp"),
        vec!["unix:/run/r1/qmp.sock,server=on,wait=off"]
    );
    assert!(a.iter().any(|x| x == "-no-reboot"));
}

#[test]
fn gpus_pass_through_on_q35_with_pci_devices() {
    let mut m = machine(vec![
        PassedGpu {
            pci_bus_id: "0000:65:00.0".into(),
        },
        PassedGpu {
            pci_bus_id: "0000:b3:00.0".into(),
        },
    ]);
    m.accel = Accel::Kvm;
    let a = m.args();
    assert_eq!(after(&a, "-machine"), vec!["q35"]);
    assert!(
        !after(&a, "-append")[0].contains("tsc_early_khz"),
        "KVM guests use kvmclock"
    );
    assert_eq!(after(&a, "-cpu"), vec!["host"]);
    let devices = after(&a, "-device");
    assert!(devices.contains(&"virtio-serial-pci"));
    assert!(devices.contains(&"virtio-net-pci,netdev=net0"));
    assert_eq!(
        devices
            .iter()
            .filter(|d| d.starts_with("vfio-pci,host="))
            .count(),
        2
    );
    assert!(devices.contains(&"vfio-pci,host=0000:b3:00.0"));
}

#[test]
fn a_task_needing_gpus_on_a_host_without_vfio_gpus_is_refused_saying_why() {
    let root = std::env::temp_dir().join(format!("prescient-qemu-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut p = QemuProvisioner::new(
        &root.join("image"),
        "h1".into(),
        "127.0.0.1".parse().expect("an address"),
        root.join("vms"),
        Accel::Tcg,
    );
    p.sysfs = root.join("sys");
    // Never started: the check comes first.
    p.qemu = root.join("no-qemu-here");
    let spec = VmSpec {
        replica: "g1.t.r1".into(),
        resources: prescient_schemas::Resources {
            gpus: 1,
            ..prescient_schemas::Resources::default()
        },
        deploy: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let got = tokio::task::LocalSet::new().block_on(&rt, p.boot(spec));
    let e = got.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        e.contains("needs 1 GPUs passed through")
            && e.contains("no NVIDIA GPU is bound to vfio-pci"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
