//! `bench transfer`: bytes over the data plane (epoll, io_uring) beside a plain TCP copy.

use super::*;
use anyhow::{bail, Result};

pub(super) fn transfer_once(mode: &str, bytes: u64, payload: u64) -> Result<f64> {
    use std::io::BufRead;
    let agent = std::env::current_exe()?.with_file_name("prescient-agent");
    let mut sink = std::process::Command::new(&agent)
        .args([
            "bench-sink",
            "--listen",
            "127.0.0.1:0",
            "--data-plane",
            mode,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(sink.stdout.take().expect("piped")).read_line(&mut line)?;
    let result = (|| {
        let addr = line
            .trim()
            .strip_prefix("prescient-sink ready ")
            .ok_or_else(|| anyhow::anyhow!("the {mode} sink did not start: {line:?}"))?;
        let out = std::process::Command::new(&agent)
            .args(["bench-source", "--to", addr, "--data-plane", mode])
            .args([
                "--bytes",
                &bytes.to_string(),
                "--payload",
                &payload.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "{mode} source failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()?)
    })();
    let _ = sink.kill();
    let _ = sink.wait();
    result
}

pub(super) fn transfer(bytes: &str, payload: &str, repeat: usize) -> Result<serde_json::Value> {
    use prescient_schemas::quantity::parse_bytes;
    let bytes = parse_bytes(bytes)?;
    let payload = parse_bytes(payload)?;
    let modes = ["raw", "epoll", "io_uring"];
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for _ in 0..repeat.max(1) {
        for (i, m) in modes.iter().enumerate() {
            secs[i].push(transfer_once(m, bytes, payload)?);
        }
    }
    let raw = median(&secs[0]);
    let rows: Vec<serde_json::Value> = modes
        .iter()
        .zip(secs.iter_mut())
        .map(|(m, v)| {
            v.sort_by(f64::total_cmp);
            let s = median(v);
            serde_json::json!({
                "transport": m,
                "median_seconds": (s * 1000.0).round() / 1000.0,
                "gib_per_s": ((bytes as f64 / s / (1u64 << 30) as f64) * 100.0).round() / 100.0,
                "vs_raw_tcp": ((raw / s) * 100.0).round() / 100.0,
                "runs_seconds": v.iter().map(|x| (x * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "bench": "transfer",
        "bytes": bytes,
        "payload_bytes": payload,
        "what": "one process streams request frames to another over loopback through the data plane, acknowledged, 64 MiB window; raw = plain blocking TCP writes, no framing",
        "results": rows,
    }))
}
