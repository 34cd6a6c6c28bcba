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

/// One LLM inference request of the Azure LLM trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlmRequest {
    /// Seconds since the trace's first request.
    pub at_s: f64,
    pub context_tokens: u32,
    pub generated_tokens: u32,
}

/// Seconds since the epoch of `YYYY-MM-DD HH:MM:SS[.ffffff][+00:00]` (the time zone is ignored:
/// only differences matter).
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.trim_matches('"');
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.split(['+', 'Z']).next()?;
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next().map_or(Some(0.0), |x| x.parse::<f64>().ok())?;
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + sec)
}

/// The Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`), sorted by time.
pub fn azure_llm(path: &Path) -> Result<Vec<LlmRequest>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || TraceError::BadCount {
            path: path.to_path_buf(),
            index: i,
            text: line.chars().take(40).collect(),
        };
        let mut cols = line.split(',');
        let at = cols.next().and_then(parse_timestamp).ok_or_else(bad)?;
        let ctx = cols
            .next()
            .and_then(|c| c.trim().parse().ok())
            .ok_or_else(bad)?;
        let generated = cols
            .next()
            .and_then(|c| c.trim().parse().ok())
            .ok_or_else(bad)?;
        out.push(LlmRequest {
            at_s: at,
            context_tokens: ctx,
            generated_tokens: generated,
        });
    }
    out.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let first = out.first().map_or(0.0, |r| r.at_s);
    for r in &mut out {
        r.at_s -= first;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_timestamps_are_seconds_from_the_first_across_midnight() {
        let dir = std::env::temp_dir().join(format!("prescient-llm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("llm.csv");
        std::fs::write(
            &p,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 23:59:59.5000000,100,10\n2023-11-17 00:00:01.0000000,200,20\n",
        )
        .unwrap();
        let r = azure_llm(&p).unwrap();
        assert_eq!(r.len(), 2);
        assert!((r[1].at_s - 1.5).abs() < 1e-6, "{r:?}");
        assert_eq!((r[1].context_tokens, r[1].generated_tokens), (200, 20));
        std::fs::write(
            &p,
            "TIMESTAMP,ContextTokens,GeneratedTokens\nnot a time,1,2\n",
        )
        .unwrap();
        assert!(azure_llm(&p)
            .unwrap_err()
            .to_string()
            .contains("not a time"));
        let _ = std::fs::remove_dir_all(&dir);
    }

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
