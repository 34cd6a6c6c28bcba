//! Embeds the eBPF probes object that `cargo xtask build-ebpf` leaves in
//! `target/ebpf/prescient-probes.o`, or an empty one (the agent then runs on its procfs fallback
//! and says why) when it has not been built: plain `cargo build` needs no BPF toolchain.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    let dir = target.join("ebpf");
    // Watching the folder (which therefore must exist) reruns this script when the xtask
    // renames a fresh object into it, without rerunning on every build while there is none.
    let _ = std::fs::create_dir_all(&dir);
    let object = dir.join("prescient-probes.o");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let bytes = std::fs::read(&object).unwrap_or_default();
    std::fs::write(out.join("prescient-probes.o"), bytes).expect("OUT_DIR is writable");
}
