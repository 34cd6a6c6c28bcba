//! The microVM guest's init (PID 1 of the initramfs `cargo xtask guest-image` builds): mounts
//! the kernel's filesystems, loads the virtio modules listed in `/modules.order`, brings up
//! `eth0` on QEMU's user network, then runs the worker with its stdin and stdout on the
//! virtio-serial port `prescient.worker` (the same framed protocol as a process worker's pipes),
//! and powers the VM off when the worker exits.
//!
//! Nothing here runs on a host: the agent starts QEMU, QEMU starts this.

use std::ffi::CString;
use std::io::Write;
use std::time::{Duration, Instant};
use thiserror::Error;

/// The guest's address on QEMU's user network, its gateway, and the host's loopback as the
/// guest reaches it (QEMU's user network forwards 10.0.2.2 to the host's 127.0.0.1).
pub const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
pub const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
/// The port the guest worker's data plane listens on (forwarded from the host).
pub const DATA_PLANE_PORT: u16 = 7600;
/// The virtio-serial port carrying the worker's commands and telemetry.
pub const CHANNEL_NAME: &str = "prescient.worker";
/// Printed on the console once init has the channel, before the worker starts.
pub const UP_LINE: &str = "prescient-guest up";

/// Why the guest could not start its worker.
#[derive(Debug, Error)]
pub enum GuestError {
    #[error("mounting {what}: {source}")]
    Mount {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("loading module {module}: {source}")]
    Module {
        module: String,
        source: std::io::Error,
    },
    #[error("configuring {iface}: {source}")]
    Network {
        iface: &'static str,
        source: std::io::Error,
    },
    #[error("the virtio-serial port {CHANNEL_NAME:?} did not appear within {0:?}")]
    NoChannel(Duration),
    #[error("starting the worker: {0}")]
    Spawn(std::io::Error),
}

fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mount(src: &str, target: &str, fstype: &str, what: &'static str) -> Result<(), GuestError> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(src), cstr(target), cstr(fstype));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(GuestError::Mount { what, source: e });
        }
    }
    Ok(())
}

/// Loads each module named in `/modules.order` (dependencies first, as the image lists them).
fn load_modules() -> Result<usize, GuestError> {
    let order = std::fs::read_to_string("/modules.order").unwrap_or_default();
    let mut loaded = 0;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}.ko");
        let file = std::fs::File::open(&path).map_err(|source| GuestError::Module {
            module: name.to_string(),
            source,
        })?;
        let params = cstr("");
        // SAFETY: a valid open fd and an empty NUL-terminated parameter string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                params.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            let e = last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(GuestError::Module {
                    module: name.to_string(),
                    source: e,
                });
            }
        }
        loaded += 1;
    }
    Ok(loaded)
}

fn sockaddr(ip: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; reinterpreting is what the ioctls
    // expect.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

/// The kernel's `struct rtentry` (x86_64), for `SIOCADDRT`.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// `lo` up; `eth0` up as 10.0.2.15/24 with the default route through QEMU's gateway.
fn bring_up_network() -> Result<(), GuestError> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(GuestError::Network {
            iface: "socket",
            source: last_os_error(),
        });
    }
    let ioctl = |req: libc::c_ulong, arg: *mut libc::c_void, iface: &'static str| {
        // SAFETY: `arg` points to the structure `req` expects, alive for the call.
        if unsafe { libc::ioctl(fd, req as _, arg) } < 0 {
            Err(GuestError::Network {
                iface,
                source: last_os_error(),
            })
        } else {
            Ok(())
        }
    };
    let up = |name: &'static str| -> Result<(), GuestError> {
        let mut r = ifreq(name);
        ioctl(libc::SIOCGIFFLAGS, (&raw mut r).cast(), name)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        ioctl(libc::SIOCSIFFLAGS, (&raw mut r).cast(), name)
    };
    up("lo")?;
    let mut r = ifreq("eth0");
    r.ifr_ifru.ifru_addr = sockaddr(GUEST_IP);
    ioctl(libc::SIOCSIFADDR, (&raw mut r).cast(), "eth0")?;
    let mut r = ifreq("eth0");
    r.ifr_ifru.ifru_netmask = sockaddr([255, 255, 255, 0]);
    ioctl(libc::SIOCSIFNETMASK, (&raw mut r).cast(), "eth0")?;
    up("eth0")?;
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr([0, 0, 0, 0]),
        rt_gateway: sockaddr(GATEWAY_IP),
        rt_genmask: sockaddr([0, 0, 0, 0]),
        rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    ioctl(
        libc::SIOCADDRT,
        (&raw mut route).cast(),
        "the default route",
    )?;
    // SAFETY: closing the socket made above.
    unsafe { libc::close(fd) };
    Ok(())
}

/// The device node of the virtio-serial port named `CHANNEL_NAME`, once udev-less devtmpfs
/// has created it.
fn find_channel(limit: Duration) -> Result<String, GuestError> {
    let until = Instant::now() + limit;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == CHANNEL_NAME {
                    let dev = format!("/dev/{}", e.file_name().to_string_lossy());
                    if std::path::Path::new(&dev).exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() > until {
            return Err(GuestError::NoChannel(limit));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the port has data from the host. While the host side is not connected the port
/// polls readable (a read would return end of file) and hung up: only readable without the
/// hang-up counts. No limit: a VM of the warm pool waits here until a replica takes it (the
/// agent stops idle ones, and no QEMU outlives its agent).
fn wait_for_host(port: &std::fs::File) -> std::io::Result<()> {
    loop {
        let mut fds = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(port),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut fds, 1, 100) };
        if n > 0 && fds.revents & libc::POLLIN != 0 && fds.revents & libc::POLLHUP == 0 {
            return Ok(());
        }
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n > 0 {
            // Hung up polls at once: sleep, so an idle VM costs its host little (under TCG
            // every guest wake-up is emulated).
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn console(line: &str) {
    let mut out = std::io::stderr().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn power_off() -> ! {
    // SAFETY: flushing and powering off is what PID 1 does last.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Powering off failed: PID 1 may not exit (the kernel would panic); wait for the host.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// PID 1: prepares the VM, runs `exe worker <worker_args>` on the channel until it exits, then
/// powers off. Never returns.
pub fn init(exe: &str, worker_args: &[String]) -> ! {
    let started = Instant::now();
    let prepared = (|| {
        mount("devtmpfs", "/dev", "devtmpfs", "/dev")?;
        mount("proc", "/proc", "proc", "/proc")?;
        mount("sysfs", "/sys", "sysfs", "/sys")?;
        mount("tmpfs", "/tmp", "tmpfs", "/tmp")?;
        let modules = load_modules()?;
        bring_up_network()?;
        let channel = find_channel(Duration::from_secs(10))?;
        Ok::<_, GuestError>((modules, channel))
    })();
    let (modules, channel) = match prepared {
        Ok(p) => p,
        Err(e) => {
            console(&format!("prescient-guest failed: {e}"));
            power_off();
        }
    };
    console(&format!(
        "{UP_LINE} in {:?}: {modules} modules, channel {channel}",
        started.elapsed()
    ));
    // A virtio-serial port opens once: one read-write open, duplicated for stdout.
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&channel);
    // Until the agent has connected and sent the deploy, reads would see end of file.
    let port = port.and_then(|mut p| {
        wait_for_host(&p)?;
        // The agent times the boot (or restore, or its wait in the pool) to this line.
        writeln!(p, "{UP_LINE}")?;
        Ok(p)
    });
    let child = match port.and_then(|rx| Ok((rx.try_clone()?, rx))) {
        Ok((tx, rx)) => std::process::Command::new(exe)
            .arg("worker")
            .args(worker_args)
            .stdin(rx)
            .stdout(tx)
            .spawn()
            .map_err(GuestError::Spawn),
        Err(e) => Err(GuestError::Spawn(e)),
    };
    match child {
        Ok(mut c) => {
            // PID 1 reaps every orphan; the worker's exit ends the VM.
            let pid = c.id() as libc::pid_t;
            loop {
                let mut status = 0;
                // SAFETY: waiting on any child.
                let got = unsafe { libc::waitpid(-1, &mut status, 0) };
                if got == pid || got < 0 {
                    break;
                }
            }
            let _ = c.try_wait();
            console("prescient-guest: the worker exited; powering off");
        }
        Err(e) => console(&format!("prescient-guest failed: {e}")),
    }
    power_off()
}
