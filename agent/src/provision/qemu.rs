//! The `qemu` provisioner: each replica a QEMU microVM (`microvm`; `q35` where GPUs pass
//! through) booting the guest image of `cargo xtask guest-image`, whose init runs the worker on
//! a virtio-serial port: the agent connects to that port's socket and speaks the same framed
//! protocol as to a process worker's pipes. The data plane reaches the guest through QEMU's
//! user network, a host port forwarded to the guest worker's. QMP (the `qapi` crate) asks for
//! the VM's status and stops it. Every QEMU is tied to its agent (`PR_SET_PDEATHSIG`) and
//! killed when its handle is dropped.

use super::cgroup::{Cgroup, Hierarchy};
use super::vfio::PassedGpu;
use super::{ProvisionError, Vm, VmSpec};
use crate::guest::{CHANNEL_NAME, DATA_PLANE_PORT, GATEWAY_IP};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{info, warn};

/// The guest's memory beyond the task's: its kernel, init and the worker.
const GUEST_BASE_MIB: u64 = 96;
/// QEMU's own memory beside the guest's, allowed in the VM's cgroup.
const QEMU_OVERHEAD_BYTES: u64 = 256 << 20;

/// How guest code runs on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (TCG): everywhere, ~10× slower.
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How long a guest under KVM gets to reach its init before this host is taken for TCG.
const KVM_PROBE: Duration = Duration::from_secs(15);

/// Whether guests run under KVM on this host: `/dev/kvm` opens, and the guest image booted with
/// `-accel kvm` reaches its init within `KVM_PROBE` (a nested or broken KVM can open and still
/// crash every guest); else TCG. Said once in the log, with why.
pub async fn detect_accel(image: &Path, run_dir: &Path) -> Accel {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        info!("microVMs run under TCG: /dev/kvm: {e}");
        return Accel::Tcg;
    }
    let dir = run_dir.join("kvm-probe");
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        warn!("microVMs run under TCG: creating {}: {e}", dir.display());
        return Accel::Tcg;
    }
    let machine = Machine {
        accel: Accel::Kvm,
        vcpus: 1,
        memory_mib: GUEST_BASE_MIB + 32,
        kernel: image.join("vmlinuz"),
        initrd: image.join("initramfs.cpio.gz"),
        worker_args: Vec::new(),
        channel: dir.join("channel.sock"),
        qmp: dir.join("qmp.sock"),
        console: dir.join("console.log"),
        forward: (IpAddr::from([127, 0, 0, 1]), 0),
        gpus: Vec::new(),
        tsc_khz: None,
    };
    let mut args = machine.args();
    // No data-plane forward for the probe.
    if let Some(i) = args
        .iter()
        .position(|a| a.starts_with("user,id=net0,hostfwd"))
    {
        args[i] = "user,id=net0".into();
    }
    let child = tokio::process::Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            warn!("microVMs run under TCG: starting qemu-system-x86_64: {e}");
            return Accel::Tcg;
        }
    };
    let up = match wait_for_init(&mut child, &machine.console, KVM_PROBE).await {
        Ok(t) => Ok(t),
        Err(GuestNotUp::Exited(status)) => Err(format!(
            "QEMU exited ({status}): {}",
            console_tail(&machine.console)
        )),
        Err(GuestNotUp::Timeout) => Err(format!(
            "the guest did not reach its init within {KVM_PROBE:?}: {}",
            console_tail(&machine.console)
        )),
    };
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    match up {
        Ok(t) => {
            info!("microVMs run under KVM (a probe guest reached its init in {t:?})");
            Accel::Kvm
        }
        Err(why) => {
            warn!("microVMs run under TCG: /dev/kvm opens but a guest under KVM failed: {why}");
            Accel::Tcg
        }
    }
}

/// Why a guest's init never said it was up.
pub enum GuestNotUp {
    /// QEMU exited first, with this status.
    Exited(std::process::ExitStatus),
    Timeout,
}

/// Waits until the guest's init prints `UP_LINE` on the console (it then waits for the agent
/// on the channel); returns how long that took.
pub async fn wait_for_init(
    child: &mut tokio::process::Child,
    console: &Path,
    limit: Duration,
) -> Result<Duration, GuestNotUp> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(crate::guest::UP_LINE) {
            return Ok(started.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(GuestNotUp::Exited(status));
        }
        if started.elapsed() > limit {
            return Err(GuestNotUp::Timeout);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything one QEMU command line is made of.
#[derive(Debug, Clone)]
pub struct Machine {
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line after `--`: the guest worker's arguments.
    pub worker_args: Vec<String>,
    pub channel: PathBuf,
    pub qmp: PathBuf,
    pub console: PathBuf,
    /// The host address and port forwarded to the guest worker's data plane.
    pub forward: (IpAddr, u16),
    pub gpus: Vec<PassedGpu>,
    /// The host's TSC rate, given to TCG guests (see [`tsc_khz`]).
    pub tsc_khz: Option<u64>,
}

/// The host's TSC rate in kHz, measured over 20 ms. A TCG guest's TSC is the host's; told its
/// rate, the guest skips calibrating it against the emulated PIT, which under CPU contention
/// failed and hung the boot (one in six of two guests booting at once here).
pub fn tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let started = Instant::now();
        // SAFETY: rdtsc has no preconditions on x86_64.
        let t0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: as above.
        let t1 = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = started.elapsed().as_nanos() as u64;
        (ns > 0 && t1 > t0).then(|| (t1 - t0) * 1_000_000 / ns)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

impl Machine {
    /// The QEMU arguments: `microvm` (no PCI, no firmware, virtio-mmio) unless GPUs pass
    /// through, which need PCI: `q35` with `vfio-pci` devices. Pure: unit-tested.
    pub fn args(&self) -> Vec<String> {
        let pci = !self.gpus.is_empty();
        let s = |x: &str| x.to_string();
        let mut a = vec![
            s("-nodefaults"),
            s("-no-user-config"),
            s("-nographic"),
            s("-no-reboot"),
        ];
        a.push(s("-machine"));
        a.push(match (pci, self.accel) {
            (true, _) => s("q35"),
            // No PIC, no PCI, no firmware beyond the kernel loader. KVM guests keep time by
            // kvmclock and need no PIT; TCG guests calibrate the TSC against it.
            (false, Accel::Kvm) => s("microvm,pit=off,pic=off,isa-serial=on,rtc=on"),
            (false, Accel::Tcg) => s("microvm,pic=off,isa-serial=on,rtc=on"),
        });
        a.extend([s("-accel"), s(self.accel.name())]);
        a.extend([
            s("-cpu"),
            s(if self.accel == Accel::Kvm {
                "host"
            } else {
                "max"
            }),
        ]);
        a.extend([s("-smp"), self.vcpus.max(1).to_string()]);
        a.extend([s("-m"), format!("{}M", self.memory_mib.max(64))]);
        a.extend([s("-kernel"), self.kernel.display().to_string()]);
        a.extend([s("-initrd"), self.initrd.display().to_string()]);
        // Skips crypto self-tests and entropy waits. (`tsc=reliable no_timer_check` boot faster
        // alone, but hung one of two guests booting at once under TCG here.)
        let mut append =
            s("console=ttyS0 quiet panic=-1 cryptomgr.notests random.trust_cpu=on rdinit=/init");
        if let (Accel::Tcg, Some(khz)) = (self.accel, self.tsc_khz) {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if !self.worker_args.is_empty() {
            append.push_str(" -- ");
            append.push_str(&self.worker_args.join(" "));
        }
        a.extend([s("-append"), append]);
        a.extend([s("-serial"), format!("file:{}", self.console.display())]);
        a.extend([
            s("-qmp"),
            format!("unix:{},server=on,wait=off", self.qmp.display()),
        ]);
        let (dev_serial, dev_net) = if pci {
            ("virtio-serial-pci", "virtio-net-pci")
        } else {
            ("virtio-serial-device", "virtio-net-device")
        };
        a.extend([s("-device"), s(dev_serial)]);
        a.extend([
            s("-chardev"),
            format!(
                "socket,id=channel,path={},server=on,wait=off",
                self.channel.display()
            ),
        ]);
        a.extend([
            s("-device"),
            format!("virtserialport,chardev=channel,name={CHANNEL_NAME}"),
        ]);
        let (ip, port) = self.forward;
        a.extend([
            s("-netdev"),
            format!("user,id=net0,hostfwd=tcp:{ip}:{port}-:{DATA_PLANE_PORT}"),
        ]);
        a.extend([s("-device"), format!("{dev_net},netdev=net0")]);
        for g in &self.gpus {
            a.extend([s("-device"), format!("vfio-pci,host={}", g.pci_bus_id)]);
        }
        a
    }
}

/// A running QEMU: the process, its QMP socket, where it logs.
pub struct QemuVm {
    pub child: tokio::process::Child,
    /// The GPUs passed through to it, given back when it is dropped.
    pub gpus: Option<super::vfio::GpuLease>,
    pub qmp: PathBuf,
    pub dir: PathBuf,
    pub console: PathBuf,
}

impl QemuVm {
    /// The VM's run state as QMP reports it (`running`, `shutdown`, ...).
    pub async fn status(&self) -> Result<String, std::io::Error> {
        super::snapshot::status(&self.qmp).await
    }

    /// Stops the VM: QMP `quit` (QEMU exits cleanly), then a kill if it has not within
    /// `grace`. Returns whether QMP stopped it.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        // `quit` may close the socket before answering: the exit is what counts.
        let asked = async {
            let _ = super::snapshot::qmp(&self.qmp, qapi::qmp::quit {}).await;
            Ok::<_, std::io::Error>(())
        };
        let clean = tokio::time::timeout(grace, async {
            asked.await.ok()?;
            self.child.wait().await.ok()
        })
        .await
        .ok()
        .flatten()
        .is_some();
        if !clean {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        clean
    }

    /// The console's last lines (what the guest printed), for errors.
    pub fn console_tail(&self) -> String {
        console_tail(&self.console)
    }
}

/// Marks `cmd`'s process to be killed when the agent's thread that spawned it ends (the agent
/// is single-threaded: when the agent ends, even by `kill -9`).
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe; it only marks the child to die with its parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(6)..].join(" | ")
}

/// QEMU microVMs on this host.
pub struct QemuProvisioner {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub host: String,
    pub bind_ip: IpAddr,
    pub accel: Accel,
    pub cgroups: Option<Hierarchy>,
    /// Per-VM sockets and console logs go in a directory here.
    pub run_dir: PathBuf,
    pub ready_timeout: Duration,
    pub data_plane: crate::dataplane::Transport,
    pub telemetry: bool,
    pub tsc_khz: Option<u64>,
    /// Start VMs from a per-shape snapshot once one is saved (else always boot).
    pub restore: bool,
    pub snapshots: super::snapshot::Snapshots,
    /// GPUs bound to `vfio-pci` that VMs hold; where sysfs and device nodes are (`/sys`, `/dev`).
    pub gpus: super::vfio::GpuLeases,
    pub sysfs: PathBuf,
    pub dev: PathBuf,
    /// Booted, idle VMs a replica can take.
    pub pool: super::pool::WarmPool,
}

/// Where the guest image is: `$PRESCIENT_GUEST_DIR`, else `target/guest` beside the binary's
/// build directory (where `cargo xtask guest-image` leaves it), else `/usr/lib/prescient/guest`.
pub fn find_image(exe: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PRESCIENT_GUEST_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    for up in exe.ancestors().skip(1).take(4) {
        candidates.push(up.join("guest"));
        candidates.push(up.join("target/guest"));
    }
    candidates.push(PathBuf::from("/usr/lib/prescient/guest"));
    candidates
        .into_iter()
        .find(|d| d.join("vmlinuz").exists() && d.join("initramfs.cpio.gz").exists())
}

impl QemuProvisioner {
    /// A provisioner booting the image in `image` with the accelerator `accel`.
    pub fn new(
        image: &Path,
        host: String,
        bind_ip: IpAddr,
        run_dir: PathBuf,
        accel: Accel,
    ) -> Self {
        let cgroups = Hierarchy::detect(Path::new("/sys/fs/cgroup"), "prescient")
            .map_err(|why| warn!("VMs run without cgroup limits: {why}"))
            .ok();
        QemuProvisioner {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kernel: image.join("vmlinuz"),
            initrd: image.join("initramfs.cpio.gz"),
            host,
            bind_ip,
            accel,
            cgroups,
            ready_timeout: Duration::from_secs(60),
            data_plane: crate::dataplane::Transport::Epoll,
            telemetry: true,
            tsc_khz: tsc_khz(),
            restore: true,
            snapshots: super::snapshot::Snapshots::new(run_dir.join("snapshots")),
            gpus: Default::default(),
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            pool: Default::default(),
            run_dir,
        }
    }

    fn machine_for(
        &self,
        replica: &str,
        resources: &prescient_schemas::Resources,
        dir: &Path,
        port: u16,
    ) -> Machine {
        let cpus = resources.cpu_millicores.div_ceil(1000).max(1);
        let task_mib = resources.memory_bytes.div_ceil(1 << 20);
        let mut worker_args = vec![
            "--host".to_string(),
            self.host.clone(),
            "--replica".into(),
            replica.to_string(),
            "--data-plane".into(),
            self.data_plane.name().into(),
            "--listen".into(),
            format!("0.0.0.0:{DATA_PLANE_PORT}"),
            "--loopback-via".into(),
            IpAddr::from(GATEWAY_IP).to_string(),
        ];
        if !self.telemetry {
            worker_args.push("--no-telemetry".into());
        }
        Machine {
            accel: self.accel,
            vcpus: cpus,
            memory_mib: task_mib + GUEST_BASE_MIB,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            worker_args,
            channel: dir.join("channel.sock"),
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.log"),
            forward: (self.bind_ip, port),
            gpus: Vec::new(),
            tsc_khz: self.tsc_khz,
        }
    }

    /// Boots a VM for `spec` (or restores it from the shape's snapshot), deploys its task
    /// through the channel and returns once the guest worker says it is warm, with how long
    /// each part took.
    pub async fn boot(&self, spec: VmSpec) -> Result<(Vm, BootTimes), ProvisionError> {
        let name = spec.replica.clone();
        let started = self.start(&name, &spec.resources).await?;
        self.finish(started, spec, None).await
    }

    /// Starts QEMU for a VM named `name` with `resources` (restored where the shape has a
    /// snapshot and no GPU passes through), and returns once it runs: restored VMs are resumed;
    /// booted ones are still booting.
    pub(super) async fn start(
        &self,
        name: &str,
        resources: &prescient_schemas::Resources,
    ) -> Result<Started, ProvisionError> {
        let at = Instant::now();
        // A free port on the data-plane address, given to QEMU to forward.
        let port = std::net::TcpListener::bind((self.bind_ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(ProvisionError::Spawn)?
            .port();
        let dir = self.run_dir.join(name.replace(['/', ' '], "_"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(ProvisionError::Spawn)?;
        let mut machine = self.machine_for(name, resources, &dir, port);
        // GPUs: bound to vfio-pci, checked, and held by this VM until it ends.
        let lease = match resources.gpus {
            0 => None,
            n => {
                let candidates = super::vfio::vfio_gpus(&self.sysfs);
                match self.gpus.lease(&candidates, n, &self.sysfs, &self.dev) {
                    Ok(l) => {
                        machine.gpus = l.gpus.clone();
                        Some(l)
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(ProvisionError::Refused(e.to_string()));
                    }
                }
            }
        };
        let shape = (machine.vcpus, machine.memory_mib);
        // A snapshot holds no passed-through devices: VMs with GPUs always boot.
        let restoring = self.restore && machine.gpus.is_empty();
        let snapshot = restoring.then(|| self.snapshots.ready(shape)).flatten();
        let mut args = machine.args();
        if let Some(s) = &snapshot {
            args.extend(["-incoming".to_string(), format!("file:{}", s.display())]);
        }
        let mut cmd = tokio::process::Command::new(&self.qemu);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).map_err(ProvisionError::Spawn)?)
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(ProvisionError::Spawn)?;
        let cgroup = self.limit(name, resources, child.id());
        let mut vm = QemuVm {
            child,
            gpus: lease,
            qmp: machine.qmp.clone(),
            dir,
            console: machine.console.clone(),
        };
        let mut resumed = None;
        if snapshot.is_some() {
            match super::snapshot::resume_restored(&machine.qmp, self.ready_timeout).await {
                Ok(()) => resumed = Some(at.elapsed()),
                Err(e) => {
                    let e = ProvisionError::Refused(format!("restoring the VM: {e}"));
                    return Err(failed(&mut vm, e).await);
                }
            }
        }
        Ok(Started {
            vm,
            machine,
            port,
            cgroup,
            restoring,
            resumed,
            at,
        })
    }

    /// Connects to a started VM's channel, deploys `spec`'s task and waits until its worker is
    /// warm. `warm`: the VM came from the warm pool, idle that long.
    pub(super) async fn finish(
        &self,
        started: Started,
        spec: VmSpec,
        warm: Option<Duration>,
    ) -> Result<(Vm, BootTimes), ProvisionError> {
        let Started {
            mut vm,
            machine,
            port,
            cgroup,
            restoring,
            resumed,
            at,
        } = started;
        // Timed from now for a warm VM: its boot is long over.
        let from = if warm.is_some() { Instant::now() } else { at };
        match self.connect(&mut vm, &machine, spec.deploy, from).await {
            Ok((stream, reader, (ready, mut times))) => {
                times.restored = resumed.is_some();
                let (addr_in_guest, warmup) = super::parse_ready(&ready)?;
                times.deploy = times
                    .ready
                    .saturating_sub(times.boot)
                    .saturating_sub(warmup.elapsed);
                let how = match (warm, times.restored) {
                    (Some(_), _) => "warm",
                    (None, true) => "restored",
                    (None, false) => "booted",
                };
                if restoring && !times.restored {
                    self.snapshot_shape(&spec.resources);
                }
                info!(replica = %spec.replica, accel = self.accel.name(), guest = %addr_in_guest, how, running = ?times.boot, deploy = ?times.deploy, ready = ?times.ready, "microVM ready");
                Ok((
                    Vm {
                        replica: spec.replica,
                        data_plane_addr: format!("{}:{port}", self.bind_ip),
                        warmup,
                        instance: super::Instance::Qemu(vm),
                        started: Some((how, warm.unwrap_or(times.boot))),
                        deploy: Some(times.deploy),
                        commands: Box::pin(stream),
                        telemetry: Box::pin(reader),
                        cgroup,
                    },
                    times,
                ))
            }
            Err(e) => Err(failed(&mut vm, e).await),
        }
    }

    /// A shape that boots is saved once, after its first VM is up; later VMs of the shape
    /// restore from it.
    pub(super) fn snapshot_shape(&self, resources: &prescient_schemas::Resources) {
        let probe = self.machine_for("template", resources, &self.run_dir, 0);
        let template = self
            .run_dir
            .join(format!("template-{}x{}", probe.vcpus, probe.memory_mib));
        let port = std::net::TcpListener::bind((self.bind_ip, 0))
            .and_then(|l| l.local_addr())
            .map_or(0, |a| a.port());
        self.snapshots.make(
            self.qemu.clone(),
            self.machine_for("template", resources, &template, port),
        );
    }

    /// Puts QEMU in a cgroup holding the VM's vCPUs and its memory plus QEMU's own.
    fn limit(
        &self,
        name: &str,
        resources: &prescient_schemas::Resources,
        pid: Option<u32>,
    ) -> Option<Cgroup> {
        let (h, pid) = (self.cgroups.as_ref()?, pid?);
        let name = name.replace(['/', ' '], "_");
        let cpus = resources.cpu_millicores.div_ceil(1000).max(1) * 1000;
        let memory = resources.memory_bytes + (GUEST_BASE_MIB << 20) + QEMU_OVERHEAD_BYTES;
        match h
            .create(&name, cpus, memory)
            .and_then(|cg| cg.add(pid).map(|()| cg))
        {
            Ok(cg) => Some(cg),
            Err(e) => {
                warn!(vm = %name, "the VM runs without limits: {e}");
                None
            }
        }
    }

    /// Connects to the channel once QEMU has made it, sends the deploy, and waits for the
    /// ready line; QEMU exiting first is a boot failure.
    async fn connect(
        &self,
        vm: &mut QemuVm,
        machine: &Machine,
        deploy: Vec<u8>,
        started: Instant,
    ) -> Result<
        (
            tokio::io::WriteHalf<tokio::net::UnixStream>,
            BufReader<tokio::io::ReadHalf<tokio::net::UnixStream>>,
            (String, BootTimes),
        ),
        ProvisionError,
    > {
        let until = started + self.ready_timeout;
        let stream = loop {
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(ProvisionError::Refused(format!(
                    "QEMU exited before the guest started: {status}"
                )));
            }
            match tokio::net::UnixStream::connect(&machine.channel).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => return Err(ProvisionError::Io(e)),
            }
        };
        // Not `into_split`: its write half shuts the socket's writing down when dropped, and
        // QEMU then drops the whole connection, so the guest's last telemetry could not leave.
        // These halves close the socket only when both are gone.
        let (read, mut write) = tokio::io::split(stream);
        write.write_all(&deploy).await.map_err(ProvisionError::Io)?;
        write.flush().await.map_err(ProvisionError::Io)?;
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        // The guest's init says it is up on the channel once the agent is there; then the
        // worker answers the deploy with its ready line.
        let mut up_at = None;
        loop {
            line.clear();
            let read_line = reader.read_line(&mut line);
            let exited = vm.child.wait();
            let left = until.saturating_duration_since(Instant::now());
            let read = tokio::select! {
                r = tokio::time::timeout(left, read_line) => match r {
                    Err(_) => return Err(ProvisionError::Timeout(self.ready_timeout)),
                    Ok(r) => r,
                },
                status = exited => {
                    return Err(ProvisionError::Refused(format!(
                        "QEMU exited while the guest booted: {}",
                        status.map_or_else(|e| e.to_string(), |s| s.to_string())
                    )));
                }
            };
            // The channel closing (or failing) first usually means QEMU is on its way out.
            if matches!(read, Ok(0) | Err(_)) {
                if let Ok(status) =
                    tokio::time::timeout(Duration::from_secs(1), vm.child.wait()).await
                {
                    return Err(ProvisionError::Refused(format!(
                        "QEMU exited while the guest booted: {}",
                        status.map_or_else(|e| e.to_string(), |s| s.to_string())
                    )));
                }
            }
            read.map_err(ProvisionError::Io)?;
            if up_at.is_none() && line.starts_with(crate::guest::UP_LINE) {
                up_at = Some(started.elapsed());
                continue;
            }
            break;
        }
        let ready_at = started.elapsed();
        Ok((
            write,
            reader,
            (
                line,
                BootTimes {
                    boot: up_at.unwrap_or(ready_at),
                    ready: ready_at,
                    deploy: Duration::ZERO,
                    restored: false,
                },
            ),
        ))
    }
}

/// A QEMU started for a VM, its channel not yet connected.
pub struct Started {
    pub vm: QemuVm,
    pub machine: Machine,
    /// The host port forwarded to the guest's data plane.
    pub port: u16,
    pub cgroup: Option<Cgroup>,
    /// Its shape is one that restores from a snapshot (else it always boots).
    pub restoring: bool,
    /// Restored from the snapshot and resumed after this long.
    pub resumed: Option<Duration>,
    pub at: Instant,
}

/// Kills a VM that failed to come up and says why, with its console's and QEMU's last words.
pub(super) async fn failed(vm: &mut QemuVm, e: ProvisionError) -> ProvisionError {
    let tail = vm.console_tail();
    let qemu_log = console_tail(&vm.dir.join("qemu.log"));
    let _ = vm.child.kill().await;
    let _ = std::fs::remove_dir_all(&vm.dir);
    match e {
        ProvisionError::Refused(why) => ProvisionError::Refused(format!(
            "{why} (console: {tail}{}{qemu_log})",
            if qemu_log.is_empty() { "" } else { "; qemu: " }
        )),
        ProvisionError::Timeout(t) => ProvisionError::Refused(format!(
            "the VM was not ready within {t:?} (console: {tail})"
        )),
        other => other,
    }
}

/// How long a VM took: QEMU started to the guest running (booted, or restored and resumed),
/// and to its worker deployed, warm and serving (ready).
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimes {
    pub boot: Duration,
    pub ready: Duration,
    /// From the guest up to the task deployed in it, warm-up apart.
    pub deploy: Duration,
    /// Started from a snapshot.
    pub restored: bool,
}

impl super::Provisioner for QemuProvisioner {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    /// On a VM from the warm pool when one of the shape waits, else on a new one.
    async fn provision(&self, spec: VmSpec) -> Result<Vm, ProvisionError> {
        if let Some(idle) = self.pool.take(&spec.resources) {
            let waited = idle.since.elapsed();
            let vm = idle.started.vm.dir.display().to_string();
            info!(replica = %spec.replica, %vm, ?waited, "a warm VM from the pool takes the replica");
            return self
                .finish(idle.started, spec, Some(waited))
                .await
                .map(|(vm, _)| vm);
        }
        self.boot(spec).await.map(|(vm, _)| vm)
    }
}

#[cfg(test)]
mod tests;
