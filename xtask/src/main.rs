//! Project tasks that need more than cargo: code generation, prerequisites, the CI sequence.
//!
//! `cargo xtask codegen [--check]`  regenerate (or verify) the committed Cap'n Proto code
//! `cargo xtask deps`               install what the other tasks need (Debian's `capnproto`)
//! `cargo xtask demo`               build the binaries and run `prescient demo` (the main job)
//! `cargo xtask test`               the whole test suite (the README's test command)
//! `cargo xtask lint`               fmt check, codegen check, clippy with warnings as errors
//! `cargo xtask ci`                 lint, then test: what `.ci/run` runs

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

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
        Some("ci") => lint().and_then(|()| test()),
        Some("lint") => lint(),
        Some("test") => test(),
        Some("demo") => demo(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <codegen [--check] | deps | demo | test | lint | ci>\n\
                 codegen  regenerate schemas/src/generated from schemas/capnp (--check: fail if stale)\n\
                 deps     install prerequisites (capnproto) through apt-get when missing\n\
                 demo     build the binaries (release) and run `prescient demo`\n\
                 test     the whole test suite (what the README's test command runs)\n\
                 lint     fmt check, codegen check, clippy with warnings as errors\n\
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

/// Installs Debian's `capnproto` (the `capnp` compiler) when it is missing.
fn deps() -> Result<()> {
    if have("capnp") {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("the `capnp` compiler is missing and apt-get is not available: install Cap'n Proto 0.9 or newer");
    }
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "capnproto"])
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

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test() -> Result<()> {
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
    ]))
}
