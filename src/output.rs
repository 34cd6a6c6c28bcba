//! Human output (aligned tables) and JSON output for the CLI.

use crate::client::Summary;
use anyhow::Result;
use prescient_control::Event;
use prescient_schemas::quantity::{format_bytes, format_duration_ns};
use prescient_schemas::{GraphRecord, ValidatedGraph};
use serde::Serialize;
use std::fmt::Write;
use std::io::Write as _;

pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let _ = write!(s, "{cell:<w$}");
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut headers.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

pub fn format_time_ms(ms: u64) -> String {
    // UTC, to the second: enough to tell submissions apart without a time-zone database.
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub fn graphs_table(graphs: &[Summary]) -> String {
    if graphs.is_empty() {
        return "no graphs\n".into();
    }
    let rows: Vec<Vec<String>> = graphs
        .iter()
        .map(|g| {
            vec![
                g.id.clone(),
                g.name.clone(),
                g.version.to_string(),
                g.tasks.to_string(),
                g.edges.to_string(),
                format_time_ms(g.submitted_at_ms),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "VERSION", "TASKS", "EDGES", "SUBMITTED"],
        &rows,
    )
}

pub fn graph_detail(
    rec: &GraphRecord,
    calibrated: &std::collections::BTreeMap<String, u64>,
) -> String {
    let g = &rec.graph;
    let mut out = String::new();
    let _ = writeln!(out, "graph     {} ({})", rec.id, g.name);
    let _ = writeln!(out, "version   {}", rec.version);
    let _ = writeln!(out, "submitted {}", format_time_ms(rec.submitted_at_ms));
    let _ = writeln!(out, "digest    {}", rec.digest);
    if let Some(o) = g.objective {
        let _ = writeln!(
            out,
            "objective p{} <= {}",
            o.percentile,
            format_duration_ns(o.target_ns)
        );
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = g
        .tasks
        .iter()
        .map(|t| {
            let ports = |ps: &[prescient_schemas::Port]| {
                ps.iter()
                    .map(|p| format!("{}:{}", p.name, p.ty))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let r = t.resources;
            let gpu = if r.gpus == 0 {
                "-".into()
            } else {
                format!("{}x {}", r.gpus, format_bytes(r.gpu_memory_bytes))
            };
            vec![
                t.id.clone(),
                t.code.kind.to_string(),
                ports(&t.inputs),
                ports(&t.outputs),
                match calibrated.get(&t.id) {
                    Some(ns) => format!(
                        "{} (measured {})",
                        format_duration_ns(t.estimated_execution_time_ns),
                        format_duration_ns(*ns)
                    ),
                    None => format_duration_ns(t.estimated_execution_time_ns),
                },
                format!("{}m", r.cpu_millicores),
                format_bytes(r.memory_bytes),
                gpu,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "TASK", "CODE", "INPUTS", "OUTPUTS", "ESTIMATE", "CPU", "MEMORY", "GPU",
        ],
        &rows,
    ));
    if !g.edges.is_empty() {
        out.push_str("\nedges\n");
        for e in &g.edges {
            let _ = writeln!(out, "  {e}");
        }
    }
    if let Ok(v) = ValidatedGraph::new(g.clone()) {
        out.push_str("\nchains\n");
        for c in v.chains() {
            let _ = writeln!(out, "  {}", c.join(" -> "));
        }
    }
    out
}

pub fn agents_table(agents: &[crate::client::AgentRow]) -> String {
    if agents.is_empty() {
        return "no agents\n".into();
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.state.clone(),
                format!("{}m/{}m", a.cpu_millicores_free, a.cpus * 1000),
                format!(
                    "{}/{}",
                    format_bytes(a.memory_bytes_free),
                    format_bytes(a.memory_bytes)
                ),
                a.replicas.to_string(),
                a.cpu_util
                    .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
                a.run_queue_p99_us
                    .map_or("-".into(), |us| format!("{us:.0} us")),
                a.provisioner.clone(),
                match (a.warm_vms, a.warm_target) {
                    (Some(have), Some(keep)) => format!("{have}/{keep}"),
                    _ => "-".into(),
                },
                a.telemetry
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                a.ingress.clone(),
                format_time_ms(a.last_heartbeat_ms),
            ]
        })
        .collect();
    table(
        &[
            "AGENT",
            "STATE",
            "CPU FREE",
            "MEMORY FREE",
            "REPLICAS",
            "CPU",
            "RUNQ P99",
            "PROVISIONER",
            "WARM",
            "PROBES",
            "INGRESS",
            "LAST HEARTBEAT",
        ],
        &rows,
    )
}

pub fn replicas_table(replicas: &[crate::client::ReplicaRow]) -> String {
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            vec![
                r.replica.clone(),
                r.task.clone(),
                r.host.clone(),
                r.state.clone(),
                r.cpu_cores
                    .map_or("-".into(), |c| format!("{:.0}m", c * 1000.0)),
                r.memory_bytes.map_or("-".into(), format_bytes),
                r.run_queue_p99_us
                    .map_or("-".into(), |us| format!("{us:.0} us")),
                match (r.tcp_sent_bytes_per_sec, r.tcp_received_bytes_per_sec) {
                    (Some(tx), Some(rx)) => {
                        format!("{}/{}", format_bytes(tx), format_bytes(rx))
                    }
                    _ => "-".into(),
                },
                r.addr.clone(),
            ]
        })
        .collect();
    table(
        &[
            "REPLICA",
            "TASK",
            "HOST",
            "STATE",
            "CPU",
            "MEMORY",
            "RUNQ P99",
            "TCP OUT/IN /s",
            "DATA PLANE",
        ],
        &rows,
    )
}

/// A graph's cold executions, in one line for `stats` and `top`.
pub fn cold_line(c: &crate::client::ColdRow) -> String {
    let recent = if c.executions == 0 {
        "cold: none in the window".to_string()
    } else {
        format!(
            "cold: {} executions waited for capacity on its way (mean {:.1} ms, longest {:.1} ms)",
            c.executions, c.wait_mean_ms, c.wait_max_ms
        )
    };
    format!(
        "{recent}; {} since the control node started ({:.1} s waited)",
        c.total_executions, c.total_wait_s
    )
}

pub fn stats_table(tasks: &[crate::client::TaskStatsRow]) -> String {
    if tasks.is_empty() {
        return "no spans in this window\n".into();
    }
    let us = |v: f64| format!("{v:.0}");
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.task.clone(),
                t.count.to_string(),
                format!("{:.1}", t.per_second),
                t.errors.to_string(),
                format!(
                    "{}/{}/{}",
                    us(t.exec_p50_us),
                    us(t.exec_p90_us),
                    us(t.exec_p99_us)
                ),
                format!("{}/{}", us(t.queue_p50_us), us(t.queue_p99_us)),
                format!("{}/{}", us(t.transfer_p50_us), us(t.transfer_p99_us)),
            ]
        })
        .collect();
    table(
        &[
            "TASK",
            "COUNT",
            "PER S",
            "ERRORS",
            "EXEC p50/p90/p99 us",
            "QUEUE p50/p99 us",
            "TRANSFER p50/p99 us",
        ],
        &rows,
    )
}

pub fn edges_table(edges: &[crate::client::EdgeStatsRow]) -> String {
    let rows: Vec<Vec<String>> = edges
        .iter()
        .map(|e| {
            vec![
                format!("{} -> {}", e.from, e.to),
                e.count.to_string(),
                e.bytes.to_string(),
                format!("{:.0}/{:.0}", e.transfer_p50_us, e.transfer_p99_us),
            ]
        })
        .collect();
    table(&["EDGE", "REQUESTS", "BYTES", "TRANSFER p50/p99 us"], &rows)
}

pub fn chains_table(chains: &[crate::client::ChainStatsRow]) -> String {
    let rows: Vec<Vec<String>> = chains
        .iter()
        .map(|c| {
            vec![
                c.tasks.join(" -> "),
                c.count.to_string(),
                format!("{:.0}/{:.0}/{:.0}", c.p50_us, c.p90_us, c.p99_us),
                format!("{:.0}", c.path_p50_sum_us),
                match (
                    c.objective_percentile,
                    c.objective_us,
                    c.measured_at_objective_us,
                ) {
                    (Some(p), Some(target), Some(measured)) => format!(
                        "p{p} {measured:.0} us of {target:.0} us{}",
                        if c.count > 0 && measured > target {
                            " MISSED"
                        } else {
                            ""
                        }
                    ),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "CHAIN",
            "INVOCATIONS",
            "END TO END p50/p90/p99 us",
            "PATH p50 SUM us",
            "OBJECTIVE",
        ],
        &rows,
    )
}

pub fn load_report(r: &crate::load::Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "mode        {}", r.mode);
    let _ = writeln!(
        out,
        "invocations {} sent, {} ok, {} failed in {:.2}s",
        r.sent, r.ok, r.errors, r.seconds
    );
    let _ = writeln!(out, "throughput  {:.0} invocations/s", r.rps);
    let _ = writeln!(
        out,
        "latency     p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us, mean {:.0} us",
        r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us, r.mean_us
    );
    for e in &r.error_samples {
        let _ = writeln!(out, "error       {e}");
    }
    out
}

/// Text if the bytes are UTF-8, else their length and first bytes in hex.
pub fn bytes_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => format!(
            "<{} bytes: {}{}>",
            b.len(),
            b.iter()
                .take(32)
                .map(|x| format!("{x:02x}"))
                .collect::<String>(),
            if b.len() > 32 { "..." } else { "" }
        ),
    }
}

pub fn bytes_json(b: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(b) {
        Ok(s) => serde_json::json!({ "text": s }),
        Err(_) => {
            serde_json::json!({ "hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>() })
        }
    }
}

/// Event kinds that are the controller's sizing and replacement decisions.
pub const DECISIONS: &[&str] = &[
    "scale-out",
    "scale-in",
    "replace",
    "shed",
    "replica-placed",
    "replica-ready",
    "replica-unplaceable",
    "replicas-retired",
];

/// One event as a line of text.
pub fn event_line(e: &Event) -> String {
    format!(
        "#{:<5} {}  {:<16} {:<6} {}",
        e.seq,
        format_time_ms(e.at_ms),
        e.kind,
        e.subject,
        e.reason
    )
}

pub fn print_event(e: &Event, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({
                "seq": e.seq, "at_ms": e.at_ms, "kind": e.kind,
                "subject": e.subject, "reason": e.reason,
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", event_line(e))?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_time_ms(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time_ms(1_795_737_600_000), "2026-11-27 00:00:00Z");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
