//! `cargo xtask tidy`: the layout rules no compiler checks. Source files stay under a length
//! budget (an allowlist that may only shrink), every module says what it is for, the decision
//! crate depends on no runtime, RPC, database, kernel or ONNX crate, library crates return
//! typed errors (not `Result<_, String>`; a ratchet that may only shrink), and the README stays
//! short enough to read.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Lines a source file may have (generated code and tests aside).
const MAX_LINES: usize = 800;

/// Files over the budget, at most this long. An entry may only shrink: a file that grows
/// fails, one that shrinks must have its entry lowered (or removed once under the budget).
const LONG_FILES: &[(&str, usize)] = &[];

/// The decision crate's direct dependencies.
const POLICY_DEPENDENCIES: &[&str] = &["prescient-schemas"];
/// Crates the decision crate must not reach, even indirectly.
const POLICY_FORBIDDEN: &[&str] = &["tokio", "capnp-rpc", "redb", "aya", "ort", "nvml-wrapper"];

/// Where library code lives (binaries, xtask and tests may use `String` errors at their edges).
const LIBRARY_DIRS: &[&str] = &[
    "schemas/src/",
    "policy/src/",
    "control/src/",
    "agent/src/",
    "ebpf/common/src/",
    "src/launch.rs",
    "src/lib.rs",
];

/// Library files still returning `Result<_, String>`, with how many times. May only shrink.
const STRING_ERRORS: &[(&str, usize)] = &[];

/// Lines the README may have.
const README_LINES: usize = 275;

pub fn tidy(root: &Path) -> Result<()> {
    let files = source_files(root)?;
    let mut problems = Vec::new();
    for (path, text) in &files {
        problems.extend(check_length(path, text));
        problems.extend(check_module_doc(path, text));
        problems.extend(check_string_errors(path, text));
    }
    for (path, _) in LONG_FILES.iter().chain(STRING_ERRORS) {
        if !files.iter().any(|(p, _)| p == path) {
            problems.push(format!(
                "{path}: listed in xtask/src/tidy.rs but gone: remove its entry"
            ));
        }
    }
    problems.extend(check_policy_dependencies(root)?);
    let readme = std::fs::read_to_string(root.join("README.md")).context("reading README.md")?;
    let lines = readme.lines().count();
    if lines > README_LINES {
        problems.push(format!(
            "README.md: {lines} lines, over its budget of {README_LINES}: method and dated figures go to docs/benchmarks.md, structure to ARCHITECTURE.md"
        ));
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("tidy: {p}");
        }
        bail!("tidy found {} problem(s)", problems.len());
    }
    eprintln!("xtask: tidy: {} source files checked", files.len());
    Ok(())
}

/// Every Rust file git tracks or would track (untracked, not ignored), with its text.
fn source_files(root: &Path) -> Result<Vec<(String, String)>> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "*.rs",
        ])
        .current_dir(root)
        .output()
        .context("running git ls-files")?;
    if !out.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut files = Vec::new();
    for path in String::from_utf8_lossy(&out.stdout).lines() {
        if path.contains("/generated/") || !root.join(path).exists() {
            continue;
        }
        let text = std::fs::read_to_string(root.join(path)).with_context(|| path.to_string())?;
        files.push((path.to_string(), text));
    }
    files.sort();
    Ok(files)
}

fn is_test(path: &str) -> bool {
    path.starts_with("tests/") || path.contains("/tests/") || path.ends_with("/tests.rs")
}

fn check_length(path: &str, text: &str) -> Option<String> {
    length_problem(LONG_FILES, path, text)
}

fn length_problem(allowlist: &[(&str, usize)], path: &str, text: &str) -> Option<String> {
    if is_test(path) {
        return None;
    }
    let lines = text.lines().count();
    let allowed = allowlist.iter().find(|(p, _)| *p == path).map(|(_, n)| *n);
    match allowed {
        None if lines > MAX_LINES => Some(format!(
            "{path}: {lines} lines, over the budget of {MAX_LINES}: split it by job"
        )),
        Some(cap) if lines > cap => Some(format!(
            "{path}: {lines} lines, over its allowlisted {cap} (the allowlist may only shrink)"
        )),
        Some(_) if lines <= MAX_LINES => Some(format!(
            "{path}: {lines} lines, within the budget now: remove its LONG_FILES entry"
        )),
        Some(cap) if lines < cap => Some(format!(
            "{path}: {lines} lines: lower its LONG_FILES entry from {cap} to {lines}"
        )),
        _ => None,
    }
}

fn check_module_doc(path: &str, text: &str) -> Option<String> {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("#!["))?;
    (!first.starts_with("//!")).then(|| {
        format!("{path}: no module doc comment: start it with a `//!` line saying what it is for")
    })
}

/// `Result<_, String>` written in `text`, counted.
fn string_results(text: &str) -> usize {
    let mut n = 0;
    for (at, _) in text.match_indices("Result<") {
        let rest = &text[at + "Result<".len()..];
        let (mut depth, mut last_comma) = (1usize, None);
        for (i, c) in rest.char_indices() {
            match c {
                '<' | '(' | '[' => depth += 1,
                ')' | ']' => depth = depth.saturating_sub(1),
                '>' => {
                    depth -= 1;
                    if depth == 0 {
                        if let Some(comma) = last_comma {
                            if rest[comma + 1..i].trim() == "String" {
                                n += 1;
                            }
                        }
                        break;
                    }
                }
                ',' if depth == 1 => last_comma = Some(i),
                ';' | '{' => break,
                _ => {}
            }
        }
    }
    n
}

fn check_string_errors(path: &str, text: &str) -> Option<String> {
    if !LIBRARY_DIRS.iter().any(|d| path.starts_with(d)) {
        return None;
    }
    let found = string_results(text);
    let allowed = STRING_ERRORS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(0, |(_, n)| *n);
    if found > allowed {
        Some(format!(
            "{path}: {found} `Result<_, String>` in a library crate (allowed {allowed}): return a `thiserror` enum that names what failed"
        ))
    } else if found < allowed {
        Some(format!(
            "{path}: {found} `Result<_, String>`: lower its STRING_ERRORS entry from {allowed} to {found}"
        ))
    } else {
        None
    }
}

fn check_policy_dependencies(root: &Path) -> Result<Vec<String>> {
    let tree = |depth: &str| -> Result<Vec<String>> {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "tree",
                "-p",
                "prescient-policy",
                "-e",
                "normal",
                "--prefix",
                "none",
            ])
            .args(["--format", "{p}", "--depth", depth])
            .current_dir(root)
            .output()
            .context("running cargo tree")?;
        if !out.status.success() {
            bail!(
                "cargo tree failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    };
    let mut problems = Vec::new();
    for dep in tree("1")?.iter().skip(1) {
        if !POLICY_DEPENDENCIES.contains(&dep.as_str()) {
            problems.push(format!(
                "policy/Cargo.toml: depends on {dep}, not in the decision crate's allowlist {POLICY_DEPENDENCIES:?}"
            ));
        }
    }
    for dep in tree("100")? {
        if POLICY_FORBIDDEN.contains(&dep.as_str()) {
            problems.push(format!(
                "prescient-policy reaches {dep}: decisions must not depend on a runtime, RPC, database, kernel or ONNX crate"
            ));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_results_are_found_through_nesting() {
        assert_eq!(string_results("fn f() -> Result<(), String> {"), 1);
        assert_eq!(
            string_results("fn f() -> Result<Vec<(String, u8)>, String> {"),
            1
        );
        assert_eq!(string_results("fn f() -> Result<String, Error> {"), 0);
        assert_eq!(
            string_results("type P = HashMap<u64, Sender<Result<Bytes, String>>>;"),
            1
        );
        assert_eq!(string_results("fn f() -> io::Result<String> {"), 0);
    }

    #[test]
    fn long_files_must_be_listed_and_entries_only_shrink() {
        let long = "x\n".repeat(MAX_LINES + 1);
        assert!(check_length("agent/src/new.rs", &long).is_some());
        assert!(check_length("tests/big.rs", &long).is_none());
        assert!(check_length("agent/src/short.rs", "x\n").is_none());
        let list = [("agent/src/long.rs", 900)];
        let lines = |n: usize| "x\n".repeat(n);
        assert!(length_problem(&list, "agent/src/long.rs", &lines(900)).is_none());
        assert!(length_problem(&list, "agent/src/long.rs", &lines(901)).is_some());
        assert!(length_problem(&list, "agent/src/long.rs", &lines(899)).is_some());
        assert!(length_problem(&list, "agent/src/long.rs", &lines(800)).is_some());
    }

    #[test]
    fn a_module_needs_its_doc_comment() {
        assert!(check_module_doc("a.rs", "//! What it is.\nfn f() {}").is_none());
        assert!(check_module_doc("a.rs", "#![allow(x)]\n//! Doc.\n").is_none());
        assert!(check_module_doc("a.rs", "use x;\n").is_some());
    }
}
