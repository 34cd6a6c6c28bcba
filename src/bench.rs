//! `prescient bench`: benchmarks that start their own cluster of real processes on this machine
//! and print JSON, so figures are measured side by side in one run.

use crate::client::{ControlClient, SubmitOutcome};
use crate::local::{wait_deployed, LocalCluster, Telemetry};
use anyhow::{bail, Result};
use clap::Subcommand;
use prescient_schemas::file;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum Which {
    /// A chain of no-op (identity) stages, one stage per agent, closed-loop load.
    Chain {
        #[arg(long, default_value_t = 3)]
        stages: usize,
        /// Invocations in flight; a comma-separated list runs each in turn.
        #[arg(long, default_value = "1,16", value_delimiter = ',')]
        concurrency: Vec<usize>,
        /// Seconds measured per concurrency (after a one-second warm-up).
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 64)]
        payload_bytes: usize,
        /// How the workers drive their sockets: epoll, io_uring or auto.
        #[arg(long, default_value = "epoll")]
        data_plane: String,
        /// Run with telemetry on and off, alternating, `N` rounds each, and report what it
        /// costs (medians and their ratio).
        #[arg(long, value_name = "N")]
        compare_telemetry: Option<usize>,
        /// What "on" means for --compare-telemetry: all (spans and eBPF probes), spans, or
        /// probes. "Off" is always neither (host and VM samples stay on).
        #[arg(long, default_value = "all")]
        telemetry: String,
    },
    /// What the eBPF probes add to each context switch and each TCP send or receive: two
    /// ping-pong loops (a pipe: two switches per round trip; loopback TCP: two sends, two
    /// receives and two switches) timed with the probes attached and detached, alternating in
    /// this one process. Needs root.
    Probes {
        /// Measured pairs (attached, detached).
        #[arg(long, default_value_t = 8)]
        rounds: usize,
        /// Round trips per measurement.
        #[arg(long, default_value_t = 20000)]
        round_trips: usize,
    },
    /// Bytes between two processes over the data plane (epoll and io_uring), beside a plain
    /// loopback TCP copy as the physical reference; runs interleaved, reports medians.
    Transfer {
        #[arg(long, default_value = "1GiB")]
        bytes: String,
        #[arg(long, default_value = "1MiB")]
        payload: String,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}

/// A chain graph of `stages` identity tasks.
pub fn chain_graph(stages: usize) -> String {
    let mut g = format!("name = \"bench-chain-{stages}\"\n");
    for i in 1..=stages {
        g.push_str(&format!(
            "\n[[task]]\nid = \"s{i}\"\ncode = {{ builtin = \"identity\" }}\ninputs = {{ x = \"bytes\" }}\noutputs = {{ y = \"bytes\" }}\nestimate = \"10us\"\nresources = {{ cpu = \"1\", memory = \"64MiB\" }}\n"
        ));
    }
    for i in 1..stages {
        g.push_str(&format!(
            "\n[[edge]]\nfrom = \"s{i}.y\"\nto = \"s{}.x\"\n",
            i + 1
        ));
    }
    g
}

fn transfer_once(mode: &str, bytes: u64, payload: u64) -> Result<f64> {
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

fn transfer(bytes: &str, payload: &str, repeat: usize) -> Result<serde_json::Value> {
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
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let raw = median(&mut secs[0].clone());
    let rows: Vec<serde_json::Value> = modes
        .iter()
        .zip(secs.iter_mut())
        .map(|(m, v)| {
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

/// Median ns per round trip of `ping` (which runs `n` round trips).
fn time_round_trips(n: usize, ping: &mut dyn FnMut(usize) -> Result<()>) -> Result<f64> {
    let started = std::time::Instant::now();
    ping(n)?;
    Ok(started.elapsed().as_nanos() as f64 / n as f64)
}

/// Two threads bouncing one byte over pipes: every round trip wakes each side once.
fn pipe_ping_pong() -> Result<impl FnMut(usize) -> Result<()>> {
    use std::io::{Read, Write};
    let (mut a_rx, mut b_tx) = std::io::pipe()?;
    let (mut b_rx, mut a_tx) = std::io::pipe()?;
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while a_rx.read_exact(&mut byte).is_ok() {
            if a_tx.write_all(&byte).is_err() {
                return;
            }
        }
    });
    Ok(move |n: usize| -> Result<()> {
        let mut byte = [7u8; 1];
        for _ in 0..n {
            b_tx.write_all(&byte)?;
            b_rx.read_exact(&mut byte)?;
        }
        Ok(())
    })
}

/// The same over loopback TCP with 64-byte messages (Nagle off).
fn tcp_ping_pong() -> Result<impl FnMut(usize) -> Result<()>> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    std::thread::spawn(move || {
        let mut msg = [0u8; 64];
        while server.read_exact(&mut msg).is_ok() {
            if server.write_all(&msg).is_err() {
                return;
            }
        }
    });
    Ok(move |n: usize| -> Result<()> {
        let mut msg = [1u8; 64];
        for _ in 0..n {
            client.write_all(&msg)?;
            client.read_exact(&mut msg)?;
        }
        Ok(())
    })
}

fn probes(rounds: usize, round_trips: usize) -> Result<serde_json::Value> {
    // Both ends on one CPU: each round trip is then two plain context switches, without the
    // cross-CPU wake-up interrupts whose cost varies by microseconds on virtual machines.
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU 0: {}", std::io::Error::last_os_error());
        }
    }
    let mut pipe = pipe_ping_pong()?;
    let mut tcp = tcp_ping_pong()?;
    // Warm both loops (thread start, page faults) before measuring.
    pipe(round_trips / 4)?;
    tcp(round_trips / 4)?;
    let mut samples: [[Vec<f64>; 2]; 2] = Default::default();
    for round in 0..rounds.max(1) {
        // ABBA: attached first in even rounds, detached first in odd ones.
        for attached in [round % 2 == 0, round % 2 != 0] {
            let loaded = if attached {
                Some(prescient_agent::probes::Probes::load().map_err(|e| {
                    anyhow::anyhow!("the probes did not load (this benchmark needs root): {e}")
                })?)
            } else {
                None
            };
            // Attaching and detaching wait for RCU grace periods; let the machine settle.
            std::thread::sleep(Duration::from_millis(300));
            let i = usize::from(attached);
            samples[0][i].push(time_round_trips(round_trips, &mut pipe)?);
            samples[1][i].push(time_round_trips(round_trips, &mut tcp)?);
            drop(loaded);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let report = |name: &str, what: &str, s: &[Vec<f64>; 2], events: f64| {
        let (off, on) = (median(&s[0]), median(&s[1]));
        serde_json::json!({
            "loop": name,
            "round_trip": what,
            "ns_per_round_trip_detached": off.round(),
            "ns_per_round_trip_attached": on.round(),
            "added_ns_per_round_trip": (on - off).round(),
            "added_ns_per_event": ((on - off) / events).round(),
            "events_per_round_trip": events,
        })
    };
    Ok(serde_json::json!({
        "bench": "probes",
        "rounds": rounds,
        "round_trips": round_trips,
        "results": [
            report("pipe", "2 context switches", &samples[0], 2.0),
            report("tcp", "2 sends, 2 receives, 2 context switches", &samples[1], 6.0),
        ],
    }))
}

pub async fn run(which: Which) -> Result<ExitCode> {
    let (stages, concurrency, duration, payload_bytes, data_plane, compare, telemetry) = match which
    {
        Which::Transfer {
            bytes,
            payload,
            repeat,
        } => {
            crate::output::print_json(&transfer(&bytes, &payload, repeat)?)?;
            return Ok(ExitCode::SUCCESS);
        }
        Which::Probes {
            rounds,
            round_trips,
        } => {
            crate::output::print_json(&probes(rounds, round_trips)?)?;
            return Ok(ExitCode::SUCCESS);
        }
        Which::Chain {
            stages,
            concurrency,
            duration,
            payload_bytes,
            data_plane,
            compare_telemetry,
            telemetry,
        } => (
            stages,
            concurrency,
            duration,
            payload_bytes,
            data_plane,
            compare_telemetry,
            telemetry,
        ),
    };
    let measured = match telemetry.as_str() {
        "all" => Telemetry::All,
        "spans" => Telemetry::SpansOnly,
        "probes" => Telemetry::ProbesOnly,
        other => bail!("--telemetry must be all, spans or probes, not {other:?}"),
    };
    if let Some(rounds) = compare {
        let mut on = Vec::new();
        let mut off = Vec::new();
        // Alternate which goes first (ABBA): the first cluster of a pair starts on a machine
        // still tearing down the previous one, which skews a fixed order by several percent.
        for round in 0..rounds.max(1) {
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for measuring in order {
                let r = chain(
                    stages,
                    &concurrency,
                    duration,
                    payload_bytes,
                    &data_plane,
                    if measuring { measured } else { Telemetry::Off },
                )
                .await?;
                if measuring {
                    on.push(r)
                } else {
                    off.push(r)
                }
            }
        }
        let median = |runs: &[serde_json::Value], i: usize, key: &str| {
            let mut v: Vec<f64> = runs
                .iter()
                .map(|r| r["results"][i][key].as_f64().unwrap_or(0.0))
                .collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let rows: Vec<serde_json::Value> = concurrency
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (ron, roff) = (median(&on, i, "rps"), median(&off, i, "rps"));
                serde_json::json!({
                    "concurrency": c,
                    "rps_telemetry_on": ron,
                    "rps_telemetry_off": roff,
                    "throughput_loss": ((1.0 - ron / roff) * 1000.0).round() / 1000.0,
                    "p50_us_on": median(&on, i, "p50_us"),
                    "p50_us_off": median(&off, i, "p50_us"),
                })
            })
            .collect();
        crate::output::print_json(&serde_json::json!({
            "bench": "chain-telemetry-overhead",
            "telemetry_on": measured.name(),
            "stages": stages,
            "rounds": rounds,
            "seconds_per_point": duration,
            "results": rows,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = chain(
        stages,
        &concurrency,
        duration,
        payload_bytes,
        &data_plane,
        Telemetry::All,
    )
    .await?;
    crate::output::print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}

async fn chain(
    stages: usize,
    concurrency: &[usize],
    duration: f64,
    payload_bytes: usize,
    data_plane: &str,
    telemetry: Telemetry,
) -> Result<serde_json::Value> {
    if stages == 0 {
        bail!("--stages must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("prescient-bench-{}", std::process::id()));
    let cluster = LocalCluster::start(&dir, stages, 2, data_plane, telemetry)?;
    let result = async {
        let client = ControlClient::connect(&cluster.control.addr).await?;
        let f = file::parse("bench-chain.toml", &chain_graph(stages))?;
        let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
            bail!("the bench graph was rejected");
        };
        wait_deployed(&client, &record.id, stages, Duration::from_secs(30)).await?;
        let (_, replicas) = client.replicas(&record.id).await?;
        let placement: Vec<String> = replicas
            .iter()
            .map(|r| format!("{}@{}", r.task, r.host))
            .collect();
        // Enter where the chain starts, as a client near its first stage would.
        let first_host = replicas
            .iter()
            .find(|r| r.task == "s1")
            .map(|r| r.host.clone());
        let ingress = cluster
            .agents
            .iter()
            .find(|a| Some(&a.name) == first_host.as_ref())
            .map_or(cluster.agents[0].addr.clone(), |a| a.addr.clone());
        let mut results = Vec::new();
        for c in concurrency {
            let spec = |secs: f64| crate::load::Spec {
                graph: record.id.clone(),
                mode: crate::load::Mode::Closed { concurrency: *c },
                duration: Duration::from_secs_f64(secs),
                payload: bytes::Bytes::from(vec![b'x'; payload_bytes]),
                deadline_ms: 10_000,
                ingresses: vec![ingress.clone()],
            };
            crate::load::run(spec(1.0), false).await?;
            let r = crate::load::run(spec(duration), false).await?;
            results.push(serde_json::json!({
                "concurrency": c,
                "rps": r.rps.round(),
                "p50_us": r.p50_us,
                "p99_us": r.p99_us,
                "p999_us": r.p999_us,
                "ok": r.ok,
                "errors": r.errors,
            }));
        }
        Ok(serde_json::json!({
            "bench": "chain",
            "stages": stages,
            "processes": format!("1 control, {stages} agents, {stages} workers, 1 client"),
            "placement": placement,
            "payload_bytes": payload_bytes,
            "data_plane": data_plane,
            "telemetry": telemetry.name(),
            "seconds_per_point": duration,
            "results": results,
        }))
    }
    .await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
