//! Trace loading: the NASA per-second counts (`workload.txt` inside a `.tbz2`, or a plain text
//! file of whitespace-separated counts).

use std::io::Read;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TraceError {
    #[error("reading trace {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trace {path}: no {member} inside the archive")]
    Missing { path: PathBuf, member: String },
    #[error("trace {path}: count {index} ({text:?}) is not a non-negative integer")]
    BadCount {
        path: PathBuf,
        index: usize,
        text: String,
    },
}

/// Per-second request counts from `path`: a `.tbz2` holding `workload.txt`, or the text itself.
pub fn per_second_counts(path: &Path) -> Result<Vec<u32>, TraceError> {
    let io = |source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = if path.extension().is_some_and(|e| e == "tbz2") {
        let file = std::fs::File::open(path).map_err(io)?;
        let mut archive = tar::Archive::new(bzip2::read::BzDecoder::new(file));
        let mut found = None;
        for entry in archive.entries().map_err(io)? {
            let mut entry = entry.map_err(io)?;
            let name = entry.path().map_err(io)?.to_path_buf();
            if name.file_name().is_some_and(|n| n == "workload.txt") {
                let mut s = String::new();
                entry.read_to_string(&mut s).map_err(io)?;
                found = Some(s);
                break;
            }
        }
        found.ok_or_else(|| TraceError::Missing {
            path: path.to_path_buf(),
            member: "workload.txt".into(),
        })?
    } else {
        std::fs::read_to_string(path).map_err(io)?
    };
    text.split_whitespace()
        .enumerate()
        .map(|(index, t)| {
            t.parse::<u32>().map_err(|_| TraceError::BadCount {
                path: path.to_path_buf(),
                index,
                text: t.chars().take(40).collect(),
            })
        })
        .collect()
}

/// One Azure function: invocations per minute for the day, and its mean duration.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub id: String,
    pub per_minute: Vec<u32>,
    pub mean_s: f64,
}

/// The Azure Functions sample (`1350_inv.csv`, `1350_run.csv`, same row order) in `dir`.
pub fn azure_functions(dir: &Path) -> Result<Vec<Function>, TraceError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map(|t| (path.clone(), t))
            .map_err(|source| TraceError::Io { path, source })
    };
    let (inv_path, inv) = read("1350_inv.csv")?;
    let (run_path, run) = read("1350_run.csv")?;
    let bad = |path: &Path, index: usize, text: &str| TraceError::BadCount {
        path: path.to_path_buf(),
        index,
        text: text.chars().take(40).collect(),
    };
    let mut out = Vec::new();
    for (i, (a, b)) in inv.lines().skip(1).zip(run.lines().skip(1)).enumerate() {
        let cols: Vec<&str> = a.split(',').collect();
        let per_minute = cols
            .iter()
            .skip(3)
            .map(|c| {
                c.trim()
                    .parse::<u32>()
                    .map_err(|_| bad(&inv_path, i + 1, c))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let avg = b.split(',').nth(3).unwrap_or_default();
        let mean_ms: f64 = avg.trim().parse().map_err(|_| bad(&run_path, i + 1, avg))?;
        out.push(Function {
            id: cols.first().unwrap_or(&"").chars().take(12).collect(),
            per_minute,
            mean_s: (mean_ms / 1000.0).max(0.001),
        });
    }
    Ok(out)
}

/// Per-second counts from per-minute ones: each minute's arrivals at uniform (seeded)
/// instants within it, so arrivals are Poisson within each minute given its count.
pub fn spread_minutes(per_minute: &[u32], rng: &prescient_policy::balance::Rng) -> Vec<u32> {
    let mut out = vec![0u32; per_minute.len() * 60];
    for (m, n) in per_minute.iter().enumerate() {
        for _ in 0..*n {
            out[m * 60 + rng.below(60)] += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_counts_parse_and_bad_ones_are_named() {
        let dir = std::env::temp_dir().join(format!("prescient-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("ok.txt");
        std::fs::write(&ok, "1 2\n3\n").unwrap();
        assert_eq!(per_second_counts(&ok).unwrap(), vec![1, 2, 3]);
        let bad = dir.join("bad.txt");
        std::fs::write(&bad, "1 x2 3").unwrap();
        let e = per_second_counts(&bad).unwrap_err().to_string();
        assert!(e.contains("count 1 (\"x2\")"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
