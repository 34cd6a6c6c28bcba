//! Project tasks that need more than cargo: code generation, prerequisites, the CI sequence.
//!
//! `cargo xtask codegen [--check]`  regenerate (or verify) the committed Cap'n Proto code
//! `cargo xtask deps`               install what the other tasks need (Debian's `capnproto`)
//! `cargo xtask build-ebpf`         build the eBPF probes (installs rust-src and bpf-linker)
//! `cargo xtask guest-image`        the microVM guest: cloud kernel and initramfs (installs QEMU)
//! `cargo xtask demo`               build the binaries and run `prescient demo` (the main job)
//! `cargo xtask test`               the whole test suite (the README's test command)
//! `cargo xtask lint`               fmt check, codegen check, clippy with warnings as errors, tidy
//! `cargo xtask tidy`               layout rules: file length, module docs, the decision crate's
//!                                  dependencies, typed errors in libraries, README length
//! `cargo xtask ci`                 lint, then test: what `.ci/run` runs

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

mod guest;
mod tidy;

const SCHEMAS: &[&str] = &[
    "graph.capnp",
    "api.capnp",
    "agent.capnp",
    "dataplane.capnp",
    "exec.capnp",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match args.first().map(String::as_str) {
        Some("codegen") => codegen(rest.contains(&"--check")),
        Some("deps") => deps(),
        Some("build-ebpf") => build_ebpf(),
        Some("onnxruntime") => {
            onnxruntime().map(|p| eprintln!("xtask: ONNX Runtime at {}", p.display()))
        }
        Some("train-forecaster") => train_forecaster(),
        Some("guest-image") => guest::guest_image().map(|_| ()),
        Some("ci") => lint().and_then(|()| test()),
        Some("lint") => lint(),
        Some("tidy") => tidy::tidy(&root()),
        Some("test") => test(),
        Some("demo") => demo(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <codegen [--check] | deps | build-ebpf | demo | test | lint | tidy | ci>\n\
                 codegen  regenerate schemas/src/generated from schemas/capnp (--check: fail if stale)\n\
                 deps     install prerequisites (capnproto, fonts-dejavu-core) through apt-get when missing\n\
                 build-ebpf  build the eBPF probes into target/ebpf (the agent embeds them)\n\
                 onnxruntime  fetch libonnxruntime.so from the PyPI wheel into target/onnxruntime/lib\n\
                 train-forecaster  train models/forecaster.onnx on ../shared/traces and rewrite models/ACCURACY.md\n\
                 guest-image  the microVM guest (cloud kernel, initramfs with a static worker) in target/guest\n\
                 demo     build the binaries (release) and run `prescient demo`\n\
                 test     the whole test suite (what the README's test command runs)\n\
                 lint     fmt check, codegen check, clippy with warnings as errors, tidy\n\
                 tidy     file length, module docs, decision-crate dependencies, typed errors, README length\n\
                 ci       lint, then test"
            );
            bail!("no task given")
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A TrueType font for `--plot`'s PNGs (what `src/plot.rs` looks for first).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Installs Debian's `capnproto` (the `capnp` compiler) and `fonts-dejavu-core` (the plots'
/// font) when they are missing.
fn deps() -> Result<()> {
    let mut missing = Vec::new();
    if !have("capnp") {
        missing.push("capnproto");
    }
    if !Path::new(FONT).exists() {
        missing.push("fonts-dejavu-core");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("{missing:?} missing and apt-get is not available: install Cap'n Proto 0.9 or newer and a TrueType font (DejaVu Sans)");
    }
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

/// Generates Rust from `schemas/capnp/*.capnp` into `schemas/src/generated/`.
///
/// The generated code is committed so that a plain `cargo build` never needs `capnp`;
/// `--check` generates into a scratch directory and fails when the committed code differs.
fn codegen(check: bool) -> Result<()> {
    deps()?;
    let root = root();
    let schema_dir = root.join("schemas/capnp");
    let committed = root.join("schemas/src/generated");
    let out = if check {
        let scratch = root.join("target/xtask-codegen");
        let _ = std::fs::remove_dir_all(&scratch);
        scratch
    } else {
        committed.clone()
    };
    std::fs::create_dir_all(&out)?;
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(&schema_dir)
        .output_path(&out)
        .default_parent_module(vec!["generated".into()]);
    for schema in SCHEMAS {
        cmd.file(schema_dir.join(schema));
    }
    cmd.run().context("capnp compile")?;
    // rustfmt keeps the committed files stable under `cargo fmt`.
    let generated: Vec<PathBuf> = SCHEMAS
        .iter()
        .map(|s| out.join(s.replace(".capnp", "_capnp.rs")))
        .collect();
    run(Command::new("rustfmt")
        .args(["--edition", "2021"])
        .args(&generated))?;
    if check {
        let mut stale = Vec::new();
        for file in &generated {
            let name = file.file_name().expect("generated file has a name");
            let fresh = std::fs::read(file)?;
            let old = std::fs::read(committed.join(name)).unwrap_or_default();
            if fresh != old {
                stale.push(name.to_string_lossy().into_owned());
            }
        }
        if !stale.is_empty() {
            bail!(
                "committed generated code is stale: {} (run `cargo xtask codegen` and commit)",
                stale.join(", ")
            );
        }
        eprintln!("xtask: generated code is current");
    }
    Ok(())
}

/// The ONNX Runtime version fetched; agents load any 1.19 or newer.
const ONNXRUNTIME_VERSION: &str = "1.22.1";

/// Fetches `libonnxruntime.so` from the `onnxruntime` wheel on PyPI (the Python package is not
/// installed; only its shared library is used) into `target/onnxruntime/lib/`.
fn onnxruntime() -> Result<PathBuf> {
    let dir = root().join("target/onnxruntime");
    let lib = dir.join("lib/libonnxruntime.so");
    if lib.exists() {
        return Ok(lib);
    }
    let wheels = dir.join("wheel");
    std::fs::create_dir_all(&wheels)?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
        ])
        .args([
            "--platform",
            "manylinux_2_28_x86_64",
            "--python-version",
            "3.11",
        ])
        .arg(format!("onnxruntime=={ONNXRUNTIME_VERSION}"))
        .arg("-d")
        .arg(&wheels))?;
    let wheel = std::fs::read_dir(&wheels)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let script = format!(
        "import zipfile,shutil,os\n\
         z=zipfile.ZipFile({wheel:?})\n\
         os.makedirs({lib_dir:?},exist_ok=True)\n\
         name=[n for n in z.namelist() if n.startswith('onnxruntime/capi/libonnxruntime.so')][0]\n\
         shutil.copyfileobj(z.open(name),open({lib:?}+'.tmp','wb'))\n\
         os.replace({lib:?}+'.tmp',{lib:?})\n",
        wheel = wheel.display().to_string(),
        lib_dir = dir.join("lib").display().to_string(),
        lib = lib.display().to_string(),
    );
    run(Command::new("python3").args(["-c", &script]))?;
    Ok(lib)
}

/// Trains the load forecaster: installs `models/requirements.txt` into a venv under target/,
/// builds the datasets from `../shared/traces` (or `PRESCIENT_TRACES`), trains and exports
/// `models/forecaster.onnx` with its fixture and card, then scores it with the release binary's
/// backtest into `models/ACCURACY.md`.
fn train_forecaster() -> Result<()> {
    let root = root();
    let venv = root.join("target/forecaster-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "-r"])
        .arg(root.join("models/requirements.txt")))?;
    let traces = std::env::var_os("PRESCIENT_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/traces"));
    let data = root.join("target/forecast-data");
    run(Command::new(&python)
        .arg(root.join("models/datasets.py"))
        .arg("--traces")
        .arg(&traces)
        .arg("--out")
        .arg(&data))?;
    run(Command::new(&python)
        .arg(root.join("models/train_forecaster.py"))
        .arg("--data")
        .arg(&data))?;
    onnxruntime()?;
    run(cargo().args(["build", "--release", "--bin", "prescient"]))?;
    run(Command::new(&python)
        .arg(root.join("models/evaluate.py"))
        .arg("--data")
        .arg(&data))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The bpf-linker release that links with the LLVM of the pinned toolchain (see the brief).
const BPF_LINKER_VERSION: &str = "0.10.0";

/// Builds `ebpf/probes` for `bpfel-unknown-none` and leaves the object in
/// `target/ebpf/prescient-probes.o`, where the agent's build script embeds it. Installs its
/// prerequisites first: the `rust-src` component (for `-Z build-std=core`) and `bpf-linker`.
fn build_ebpf() -> Result<()> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    let current = linker
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !current {
        run(cargo().args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ]))?;
    }
    let root = root();
    // `-Z build-std` is nightly-only; RUSTC_BOOTSTRAP lets the stable toolchain use it for
    // this one no_std crate, as aya documents.
    run(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "prescient-probes-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(root.join("target/ebpf-build"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("RUSTFLAGS"))?;
    let built = root.join("target/ebpf-build/bpfel-unknown-none/release/prescient-probes");
    let dir = root.join("target/ebpf");
    std::fs::create_dir_all(&dir)?;
    let object = dir.join("prescient-probes.o");
    let bytes = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // Only a changed object is moved in: the agent rebuilds when it changes.
    if std::fs::read(&object).ok().as_deref() != Some(&bytes[..]) {
        let tmp = dir.join(".prescient-probes.o.tmp");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &object)?;
    }
    eprintln!("xtask: eBPF probes at {}", object.display());
    Ok(())
}

fn test() -> Result<()> {
    deps()?;
    onnxruntime()?;
    build_ebpf()?;
    guest::guest_image()?;
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    run(cargo().args([
        "test",
        "--workspace",
        "--no-fail-fast",
        "--",
        "--test-threads=2",
    ]))
}

fn demo(args: &[&str]) -> Result<()> {
    deps()?;
    onnxruntime()?;
    build_ebpf()?;
    guest::guest_image()?;
    run(cargo().args(["build", "--release", "--bins"]))?;
    run(Command::new(root().join("target/release/prescient"))
        .arg("demo")
        .args(args))
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    codegen(true)?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    tidy::tidy(&root())
}
