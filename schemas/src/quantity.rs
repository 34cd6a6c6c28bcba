//! Human quantities in graph files: durations, byte sizes, CPU shares, bit rates.

use thiserror::Error;

/// A quantity that could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {what} {input:?}: {hint}")]
pub struct QuantityError {
    what: &'static str,
    input: String,
    hint: &'static str,
}

fn split_number(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let num: String = num.chars().filter(|c| *c != '_').collect();
    let value: f64 = num.parse().ok()?;
    Some((value, unit.trim()))
}

fn scaled(value: f64, scale: f64, max: f64) -> Option<u64> {
    let v = value * scale;
    (v.is_finite() && v >= 0.0 && v <= max).then(|| v.round() as u64)
}

/// Parses a duration such as `250us`, `2ms`, `1.5s` or `800ns` into nanoseconds.
pub fn parse_duration_ns(s: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError {
        what: "duration",
        input: s.into(),
        hint: "expected a number with a unit: ns, us, ms, s, m or h (e.g. \"2.5ms\")",
    };
    let (value, unit) = split_number(s).ok_or_else(err)?;
    let scale = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        _ => return Err(err()),
    };
    scaled(value, scale, u64::MAX as f64).ok_or_else(err)
}

/// Parses a byte size such as `512MiB`, `2GiB`, `1.5GB` or a plain byte count.
pub fn parse_bytes(s: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError {
        what: "size",
        input: s.into(),
        hint: "expected bytes with an optional unit: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB",
    };
    let (value, unit) = split_number(s).ok_or_else(err)?;
    let scale = match unit {
        "" | "B" => 1.0,
        "KiB" | "Ki" => 1024.0,
        "MiB" | "Mi" => 1024.0 * 1024.0,
        "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
        "TiB" | "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "TB" | "T" => 1e12,
        _ => return Err(err()),
    };
    scaled(value, scale, u64::MAX as f64).ok_or_else(err)
}

/// Parses a CPU share: `500m` (millicores) or a number of cores such as `2` or `0.5`.
pub fn parse_cpu_millicores(s: &str) -> Result<u32, QuantityError> {
    let err = || QuantityError {
        what: "cpu",
        input: s.into(),
        hint: "expected cores (\"2\", \"0.5\") or millicores (\"500m\")",
    };
    let (value, unit) = split_number(s).ok_or_else(err)?;
    let scale = match unit {
        "m" => 1.0,
        "" => 1000.0,
        _ => return Err(err()),
    };
    scaled(value, scale, u32::MAX as f64)
        .map(|v| v as u32)
        .ok_or_else(err)
}

/// Parses a bit rate such as `100Mbit`, `10Gbps` or a plain bits-per-second count.
pub fn parse_bits_per_sec(s: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError {
        what: "bandwidth",
        input: s.into(),
        hint:
            "expected bits per second with an optional unit: Kbit, Mbit, Gbit (or Kbps, Mbps, Gbps)",
    };
    let (value, unit) = split_number(s).ok_or_else(err)?;
    let scale = match unit {
        "" | "bps" | "bit" => 1.0,
        "Kbit" | "Kbps" | "kbit" | "kbps" => 1e3,
        "Mbit" | "Mbps" => 1e6,
        "Gbit" | "Gbps" => 1e9,
        "Tbit" | "Tbps" => 1e12,
        _ => return Err(err()),
    };
    scaled(value, scale, u64::MAX as f64).ok_or_else(err)
}

/// Formats nanoseconds the way graph files write durations.
pub fn format_duration_ns(ns: u64) -> String {
    match ns {
        0 => "0s".into(),
        n if n % 1_000_000_000 == 0 => format!("{}s", n / 1_000_000_000),
        n if n >= 1_000_000 => trim(format!("{:.3}", n as f64 / 1e6)) + "ms",
        n if n >= 1_000 => trim(format!("{:.3}", n as f64 / 1e3)) + "us",
        n => format!("{n}ns"),
    }
}

/// Formats a byte count with a binary unit.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        trim(format!("{value:.2}")) + UNITS[unit]
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("2ms"), Ok(2_000_000));
        assert_eq!(parse_duration_ns("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_duration_ns("250us"), Ok(250_000));
        assert!(parse_duration_ns("2 parsecs").is_err());
        assert!(parse_duration_ns("-1ms").is_err());
        assert_eq!(format_duration_ns(2_500_000), "2.5ms");
    }

    #[test]
    fn sizes_and_cpu() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_cpu_millicores("500m"), Ok(500));
        assert_eq!(parse_cpu_millicores("2"), Ok(2000));
        assert_eq!(parse_bits_per_sec("10Gbit"), Ok(10_000_000_000));
        assert!(parse_bytes("12 furlongs").is_err());
        assert_eq!(format_bytes(256 << 20), "256MiB");
    }
}
