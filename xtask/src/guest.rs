//! `cargo xtask guest-image`: what the `qemu` provisioner boots. A Debian cloud kernel
//! (`apt-get download`, unpacked with `dpkg -x`: nothing installed on the host) and an
//! initramfs whose `/init` is `prescient-guest` built static for musl, with the virtio modules
//! it loads (dependencies first). Installs its prerequisites: QEMU 10 (bookworm-backports on
//! Debian 12, whose own 7.2 conflicts with the installed `qemu-utils` 10.0) and the musl target.
//!
//! Leaves `target/guest/vmlinuz` and `target/guest/initramfs.cpio.gz`.

use super::{cargo, have, root, run};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const MUSL: &str = "x86_64-unknown-linux-musl";

/// The modules the guest needs (virtio-mmio for `microvm`, virtio-pci for `q35`, the
/// virtio-serial channel and the network); their dependencies are added.
const MODULES: &[&str] = &["virtio_mmio", "virtio_pci", "virtio_console", "virtio_net"];

/// Where the guest keeps the C runtime (Debian's multiarch directory, in glibc's search path).
const GLIBC_DIR: &str = "lib/x86_64-linux-gnu";

/// The C runtime's files a dynamically linked artifact needs: (path in the guest, on the host).
const GLIBC: &[(&str, &str)] = &[
    ("lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"),
    (
        "lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libc.so.6",
    ),
    (
        "lib/x86_64-linux-gnu/libm.so.6",
        "/lib/x86_64-linux-gnu/libm.so.6",
    ),
    (
        "lib/x86_64-linux-gnu/libgcc_s.so.1",
        "/lib/x86_64-linux-gnu/libgcc_s.so.1",
    ),
    (
        "lib/x86_64-linux-gnu/libpthread.so.0",
        "/lib/x86_64-linux-gnu/libpthread.so.0",
    ),
    (
        "lib/x86_64-linux-gnu/libdl.so.2",
        "/lib/x86_64-linux-gnu/libdl.so.2",
    ),
    (
        "lib/x86_64-linux-gnu/librt.so.1",
        "/lib/x86_64-linux-gnu/librt.so.1",
    ),
];

/// Builds the image (when its inputs changed) and returns its directory.
pub fn guest_image() -> Result<PathBuf> {
    qemu()?;
    let dir = root().join("target/guest");
    std::fs::create_dir_all(&dir)?;
    let (vmlinuz, modules) = kernel(&dir)?;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout).contains(MUSL) {
        run(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    run(cargo()
        .args(["build", "--release", "-p", "prescient-agent", "--bin"])
        .arg("prescient-guest")
        .arg("--no-default-features")
        .args(["--target", MUSL, "--target-dir"])
        .arg(root().join("target/guest-build"))
        // Without debug info: the kernel unpacks the whole initramfs at every boot, which
        // under emulation costs time per megabyte.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env_remove("RUSTFLAGS"))?;
    let init = root().join(format!("target/guest-build/{MUSL}/release/prescient-guest"));
    let order = load_order(&modules)?;
    let mut cpio = Cpio::default();
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "lib64",
        GLIBC_DIR,
    ] {
        cpio.dir(d);
    }
    cpio.file("init", 0o755, &std::fs::read(&init)?);
    // The host's C runtime, so `exec` artifacts built on hosts like this one (glibc, dynamic)
    // run in the guest as they do in process workers.
    for (name, path) in GLIBC {
        match std::fs::read(path) {
            Ok(bytes) => cpio.file(name, 0o755, &bytes),
            Err(e) => eprintln!("xtask: the guest image goes without {path}: {e}"),
        }
    }
    let mut names = String::new();
    for (name, path) in &order {
        cpio.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &std::fs::read(path)?,
        );
        names.push_str(name);
        names.push('\n');
    }
    cpio.file("modules.order", 0o644, names.as_bytes());
    let image = dir.join("initramfs.cpio.gz");
    let tmp = dir.join(".initramfs.tmp");
    let mut gzip = Command::new("gzip")
        .args(["-6", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&tmp)?)
        .spawn()
        .context("starting gzip")?;
    gzip.stdin
        .take()
        .context("gzip's stdin")?
        .write_all(&cpio.finish())?;
    if !gzip.wait()?.success() {
        bail!("gzip failed");
    }
    std::fs::rename(&tmp, &image)?;
    std::fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
    eprintln!(
        "xtask: guest image in {} ({} modules: {})",
        dir.display(),
        order.len(),
        names.trim().replace('\n', " ")
    );
    Ok(dir)
}

/// `qemu-system-x86_64` 10 or newer, installed through apt-get when missing or older.
fn qemu() -> Result<()> {
    let version = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let major: u32 = version
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if major >= 10 {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("QEMU 10 or newer (qemu-system-x86_64) is needed and apt-get is not available");
    }
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let bookworm = release.lines().any(|l| l == "VERSION_CODENAME=bookworm");
    let apt = |args: &[&str]| {
        run(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if bookworm {
        let sources = Path::new("/etc/apt/sources.list.d/prescient-backports.sources");
        if !sources.exists() {
            std::fs::write(
                sources,
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
            )
            .with_context(|| format!("writing {}", sources.display()))?;
        }
        apt(&["update", "-qq"])?;
        apt(&[
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
        ])
    } else {
        apt(&["update", "-qq"])?;
        apt(&[
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "qemu-system-x86",
        ])
    }
}

/// The cloud kernel's vmlinuz and its modules directory, downloaded and unpacked once.
fn kernel(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let unpacked = dir.join("kernel");
    let found = |root: &Path| -> Option<(PathBuf, PathBuf)> {
        let boot = std::fs::read_dir(root.join("boot")).ok()?;
        let vmlinuz = boot.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })?;
        let modules = std::fs::read_dir(root.join("lib/modules"))
            .ok()?
            .flatten()
            .next()?
            .path();
        Some((vmlinuz, modules))
    };
    if let Some(k) = found(&unpacked) {
        return Ok(k);
    }
    let deps = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .context("running apt-cache (Debian's cloud kernel is fetched with apt-get download)")?;
    let deps = String::from_utf8_lossy(&deps.stdout).to_string();
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .context("apt-cache names no linux-image-*-cloud-amd64 (run apt-get update)")?
        .to_string();
    let downloads = dir.join("download");
    std::fs::create_dir_all(&downloads)?;
    eprintln!(
        "xtask: apt-get download {package} (into {})",
        downloads.display()
    );
    let got = Command::new("apt-get")
        .args(["download", &package])
        .current_dir(&downloads)
        .status()
        .context("running apt-get download")?;
    if !got.success() {
        bail!("apt-get download {package} failed with {got}");
    }
    let deb = std::fs::read_dir(&downloads)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    found(&unpacked).context("the kernel package holds no vmlinuz or modules")
}

/// The modules in `MODULES` and their dependencies (from each `.ko`'s `depends=`), each after
/// what it depends on.
fn load_order(modules_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut paths = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = name.strip_suffix(".ko") {
                    paths.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
    }
    let mut order = Vec::new();
    fn visit(
        name: &str,
        paths: &BTreeMap<String, PathBuf>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<()> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 32 {
            bail!("module dependencies of {name} nest too deep");
        }
        let path = paths
            .get(name)
            .with_context(|| format!("the kernel has no module {name} (built in?)"))?;
        let bytes = std::fs::read(path)?;
        let depends = bytes
            .windows(8)
            .position(|w| w == b"depends=")
            .map(|i| {
                let rest = &bytes[i + 8..];
                let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
                String::from_utf8_lossy(&rest[..end]).to_string()
            })
            .unwrap_or_default();
        for d in depends.split(',').filter(|d| !d.is_empty()) {
            visit(&d.replace('-', "_"), paths, order, depth + 1)?;
        }
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
    for m in MODULES {
        visit(m, &paths, &mut order, 0)?;
    }
    Ok(order)
}

/// An initramfs in the `newc` cpio format (what the kernel unpacks).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}
