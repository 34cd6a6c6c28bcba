//! `prescient bench`: benchmarks that start their own cluster of real processes on this machine
//! and print JSON, so figures are measured side by side in one run.

use crate::client::{ControlClient, SubmitOutcome};
use crate::local::{wait_deployed, LocalCluster, Telemetry};
use anyhow::{bail, Context, Result};
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
        /// Run with telemetry on and off under one unbroken load, switched between phases of
        /// `--duration` seconds, `N` pairs (ABBA), and report what it costs: per-pair ratios,
        /// their median and its 95% confidence interval.
        #[arg(long, value_name = "N")]
        compare_telemetry: Option<usize>,
        /// The telemetry the cluster runs with: all (spans and eBPF probes), spans, probes, or
        /// none (host and VM samples stay on). With --compare-telemetry, what "on" means; "off"
        /// is always none, so none there is an A/A run: the method's own noise.
        #[arg(long, default_value = "all")]
        telemetry: String,
        /// Invocations/s of the open-loop run that measures CPU per invocation (below
        /// saturation, where telemetry's cost shows as CPU time); 0 skips it.
        #[arg(long, default_value_t = 8000.0)]
        cpu_rate: f64,
        /// Another build of the probes' object for --compare-telemetry to attach instead of the
        /// embedded one (e.g. one with an empty program, to tell a program's cost from its
        /// attachment's).
        #[arg(long, value_name = "OBJECT")]
        probes_object: Option<std::path::PathBuf>,
        /// An A/A run of the switching itself for --compare-telemetry: telemetry (as
        /// --telemetry) on in both phases of a pair, the probes detached and attached again
        /// before each phase, so what switching costs shows apart from what telemetry costs.
        #[arg(long)]
        reattach_aa: bool,
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
        /// Another build of the probes' object (repeatable): each is measured in the same
        /// rounds as the embedded one, attached in turn, so builds compare side by side.
        #[arg(long, value_name = "OBJECT")]
        variant: Vec<std::path::PathBuf>,
        /// Count this benchmark's process in a group, as a VM's processes are (their switches
        /// take the longer path); by default it is untracked, like the host's other processes.
        #[arg(long)]
        tracked: bool,
    },
    /// What an idle cluster costs: a control node, 3 agents and a deployed 3-stage chain with
    /// no load, CPU time of every process (from /proc) over `--seconds`, with telemetry on
    /// (spans, 1 Hz host and VM samples, eBPF probes where they load) and off, alternating.
    Idle {
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Measured pairs (on, off).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
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

/// The middle value (the upper one of an even count); 0 for none.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
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

/// Every process now: (pid, parent pid, user + system CPU time in clock ticks).
fn process_table() -> Vec<(u32, u32, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command (which may hold spaces) start after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // rest[0] is the state, [1] ppid, [11] utime, [12] stime.
        out.push((pid, field(1) as u32, field(11) + field(12)));
    }
    out
}

/// CPU time of a process and its descendants that are alive now, in clock ticks.
fn cpu_ticks(root: u32) -> u64 {
    let table = process_table();
    let mut total = 0;
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, ticks) in &table {
            if *pid == p {
                total += ticks;
            }
            if *ppid == p {
                frontier.push(*pid);
            }
        }
    }
    total
}

/// Nanoseconds a process's threads have run, from the scheduler's own accounting
/// (`/proc/PID/task/*/schedstat`): exact, where `/proc/PID/stat` counts 10 ms ticks, too coarse
/// for the short phases of a comparison. 0 for a process that is gone.
fn on_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Context switches on this machine since boot (`ctxt` in /proc/stat; 0 if unreadable).
fn context_switches() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("ctxt "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Inter-processor interrupts that wake another CPU since boot: rescheduling and function-call
/// IPIs (`RES` and `CAL` in /proc/interrupts; the kernel queues a remote wake-up through the
/// latter). In a VM each one is an exit; 0 if unreadable.
fn wakeup_ipis() -> u64 {
    std::fs::read_to_string("/proc/interrupts")
        .map(|s| {
            s.lines()
                .filter_map(|l| {
                    let l = l.trim_start();
                    l.strip_prefix("RES:").or_else(|| l.strip_prefix("CAL:"))
                })
                .flat_map(|counts| {
                    counts
                        .split_whitespace()
                        .map_while(|c| c.parse::<u64>().ok())
                })
                .sum()
        })
        .unwrap_or(0)
}

/// CPUs online: what [`machine_busy_ns`] counts wall time on.
fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64
}

/// Nanoseconds the machine's CPUs have been busy since some fixed point: wall time on every
/// CPU less the idle residency the cpuidle driver reports (in µs), else 10 ms ticks from
/// `/proc/stat`.
fn machine_busy_ns() -> u64 {
    let idle_us = (|| -> Option<u64> {
        let mut total = 0;
        let mut cpus = 0;
        for cpu in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
            let name = cpu.file_name();
            let name = name.to_str()?;
            if !name.starts_with("cpu") || !name[3..].chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            cpus += 1;
            for state in std::fs::read_dir(cpu.path().join("cpuidle"))
                .ok()?
                .flatten()
            {
                total += std::fs::read_to_string(state.path().join("time"))
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        }
        (cpus > 0).then_some(total)
    })();
    let cpus = online_cpus();
    match idle_us {
        Some(idle_us) => {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid timespec to write to.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            let wall_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
            (wall_ns * cpus).saturating_sub(idle_us * 1000)
        }
        None => {
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            prescient_agent::hostmon::busy_ticks().unwrap_or(0) * (1_000_000_000 / hz)
        }
    }
}

/// The direct children of a process.
fn children(parent: u32) -> Vec<u32> {
    process_table()
        .into_iter()
        .filter(|(_, ppid, _)| *ppid == parent)
        .map(|(pid, _, _)| pid)
        .collect()
}

/// Submits the bench chain of `stages` no-op stages to `cluster` and waits until it serves.
async fn deploy_chain(
    cluster: &LocalCluster,
    stages: usize,
) -> Result<(ControlClient, prescient_schemas::GraphRecord)> {
    let client = ControlClient::connect(&cluster.control.addr).await?;
    let f = file::parse("bench-chain.toml", &chain_graph(stages))?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the bench graph was rejected");
    };
    wait_deployed(&client, &record.id, stages, Duration::from_secs(30)).await?;
    Ok((client, record))
}

async fn idle_once(seconds: f64, telemetry: Telemetry) -> Result<(f64, f64, f64)> {
    let dir = std::env::temp_dir().join(format!("prescient-idle-{}", std::process::id()));
    let cluster = LocalCluster::start(&dir, 3, 2, "epoll", telemetry)?;
    let result = async {
        deploy_chain(&cluster, 3).await?;
        // Let start-up work (provisioning, first samples) finish before measuring.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let control = cluster.control.child.id();
        let agents: Vec<u32> = cluster.agents.iter().map(|a| a.child.id()).collect();
        let sample = || {
            (
                cpu_ticks(control),
                agents.iter().map(|&a| cpu_ticks(a)).sum::<u64>(),
            )
        };
        let before = sample();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let after = sample();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cores = |ticks: u64| ticks as f64 / hz / seconds;
        let control_cores = cores(after.0.saturating_sub(before.0));
        let agents_cores = cores(after.1.saturating_sub(before.1));
        Ok((control_cores, agents_cores, control_cores + agents_cores))
    }
    .await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn idle(seconds: f64, rounds: usize) -> Result<serde_json::Value> {
    let mut runs: [Vec<(f64, f64, f64)>; 2] = Default::default();
    for round in 0..rounds.max(1) {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on in order {
            let t = if on { Telemetry::All } else { Telemetry::Off };
            runs[usize::from(on)].push(idle_once(seconds, t).await?);
        }
    }
    let report = |v: &[(f64, f64, f64)]| {
        let pct = |k: fn(&(f64, f64, f64)) -> f64| {
            (median(&v.iter().map(k).collect::<Vec<_>>()) * 1e4).round() / 100.0
        };
        serde_json::json!({
            "control_percent_of_a_core": pct(|r| r.0),
            "agents_and_workers_percent_of_a_core": pct(|r| r.1),
            "total_percent_of_a_core": pct(|r| r.2),
        })
    };
    Ok(serde_json::json!({
        "bench": "idle",
        "what": "a control node, 3 agents (the first with the eBPF probes when telemetry is on) and 3 workers of a deployed 3-stage chain, no load; CPU time from /proc over the window",
        "seconds": seconds,
        "rounds": rounds,
        "telemetry_on": report(&runs[1]),
        "telemetry_off": report(&runs[0]),
    }))
}

/// Median ns per round trip of `ping` (which runs `n` round trips).
fn time_round_trips(n: usize, ping: &mut dyn FnMut(usize) -> Result<()>) -> Result<f64> {
    let started = std::time::Instant::now();
    ping(n)?;
    Ok(started.elapsed().as_nanos() as f64 / n as f64)
}

/// A thread echoing `len`-byte messages from `echo_rx` to `echo_tx`, and the loop that sends
/// `n` messages on `tx` and waits for each to come back on `rx`.
fn ping_pong(
    len: usize,
    mut echo_rx: impl std::io::Read + Send + 'static,
    mut echo_tx: impl std::io::Write + Send + 'static,
    mut rx: impl std::io::Read,
    mut tx: impl std::io::Write,
) -> impl FnMut(usize) -> Result<()> {
    std::thread::spawn(move || {
        let mut msg = vec![0u8; len];
        while echo_rx.read_exact(&mut msg).is_ok() {
            if echo_tx.write_all(&msg).is_err() {
                return;
            }
        }
    });
    let mut msg = vec![7u8; len];
    move |n: usize| -> Result<()> {
        for _ in 0..n {
            tx.write_all(&msg)?;
            rx.read_exact(&mut msg)?;
        }
        Ok(())
    }
}

/// One byte over two pipes: every round trip wakes each side once.
fn pipe_ping_pong() -> Result<impl FnMut(usize) -> Result<()>> {
    let (a_rx, b_tx) = std::io::pipe()?;
    let (b_rx, a_tx) = std::io::pipe()?;
    Ok(ping_pong(1, a_rx, a_tx, b_rx, b_tx))
}

/// 64-byte messages over loopback TCP (Nagle off).
fn tcp_ping_pong() -> Result<impl FnMut(usize) -> Result<()>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok(ping_pong(
        64,
        server.try_clone()?,
        server,
        client.try_clone()?,
        client,
    ))
}

fn probes(
    rounds: usize,
    round_trips: usize,
    variants: &[std::path::PathBuf],
    tracked: bool,
) -> Result<serde_json::Value> {
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
    // Each build loaded once: the sides then differ only by which one is attached.
    let not_loaded =
        |e| anyhow::anyhow!("the probes did not load (this benchmark needs root): {e}");
    let mut builds = vec![(
        "embedded".to_string(),
        prescient_agent::probes::Probes::load().map_err(not_loaded)?,
    )];
    for path in variants {
        let object = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let p = prescient_agent::probes::Probes::load_object(&object)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        builds.push((path.display().to_string(), p));
    }
    for (_, p) in builds.iter_mut() {
        p.set_attached(false)?;
        if tracked {
            p.join("bench", std::process::id());
        }
    }
    // samples[loop][side]: side 0 is detached, side 1 + b is build b attached.
    let sides = builds.len() + 1;
    let mut samples: [Vec<Vec<f64>>; 2] = [vec![Vec::new(); sides], vec![Vec::new(); sides]];
    for round in 0..rounds.max(1) {
        // Each round visits every side, in an order that rotates (and reverses every other
        // round), so no side always follows another.
        let mut order: Vec<usize> = (0..sides).map(|i| (i + round) % sides).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for side in order {
            for (b, (_, p)) in builds.iter_mut().enumerate() {
                if b + 1 != side {
                    p.set_attached(false)?;
                }
            }
            if side > 0 {
                builds[side - 1].1.set_attached(true)?;
            }
            // Attaching and detaching wait for RCU grace periods; let the machine settle.
            std::thread::sleep(Duration::from_millis(100));
            samples[0][side].push(time_round_trips(round_trips, &mut pipe)?);
            samples[1][side].push(time_round_trips(round_trips, &mut tcp)?);
        }
    }
    let names: Vec<String> = builds.iter().map(|(n, _)| n.clone()).collect();
    drop(builds);
    let report = |name: &str, what: &str, s: &[Vec<f64>], events: f64| {
        let off = median(&s[0]);
        let attached: Vec<serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(b, build)| {
                let on = median(&s[b + 1]);
                serde_json::json!({
                    "build": build,
                    "ns_per_round_trip_attached": on.round(),
                    "added_ns_per_round_trip": (on - off).round(),
                    "added_ns_per_event": ((on - off) / events).round(),
                })
            })
            .collect();
        let embedded = median(&s[1]);
        serde_json::json!({
            "loop": name,
            "round_trip": what,
            "ns_per_round_trip_detached": off.round(),
            "ns_per_round_trip_attached": embedded.round(),
            "added_ns_per_round_trip": (embedded - off).round(),
            "added_ns_per_event": ((embedded - off) / events).round(),
            "events_per_round_trip": events,
            "builds": attached,
        })
    };
    Ok(serde_json::json!({
        "bench": "probes",
        "rounds": rounds,
        "round_trips": round_trips,
        "tracked": tracked,
        "results": [
            report("pipe", "2 context switches", &samples[0], 2.0),
            // Sends and receives are not probed (TCP bytes come from the kernel's per-socket
            // counters): what a TCP round trip adds is its switches'.
            report(
                "tcp",
                "2 sends, 2 receives, 2 context switches (only the switches probed)",
                &samples[1],
                2.0,
            ),
        ],
    }))
}

pub async fn run(which: Which) -> Result<ExitCode> {
    let report = match which {
        Which::Transfer {
            bytes,
            payload,
            repeat,
        } => transfer(&bytes, &payload, repeat)?,
        Which::Idle { seconds, rounds } => idle(seconds, rounds).await?,
        Which::Probes {
            rounds,
            round_trips,
            variant,
            tracked,
        } => probes(rounds, round_trips, &variant, tracked)?,
        Which::Chain {
            stages,
            concurrency,
            duration,
            payload_bytes,
            data_plane,
            compare_telemetry,
            telemetry,
            cpu_rate,
            probes_object,
            reattach_aa,
        } => {
            let measured = match telemetry.as_str() {
                "all" => Telemetry::All,
                "spans" => Telemetry::SpansOnly,
                "probes" => Telemetry::ProbesOnly,
                // Both sides off: the method's own noise (an A/A comparison).
                "none" => Telemetry::Off,
                other => bail!("--telemetry must be all, spans, probes or none, not {other:?}"),
            };
            let loading = Loading {
                duration,
                payload_bytes,
                cpu_rate,
                probes_object,
                reattach_aa,
            };
            chain(
                stages,
                &concurrency,
                loading,
                &data_plane,
                measured,
                compare_telemetry,
            )
            .await?
        }
    };
    crate::output::print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}

/// One measured configuration: closed-loop throughput and latency at each concurrency, then
/// CPU per invocation at a fixed rate.
struct Point<'a> {
    graph: &'a str,
    ingress: &'a str,
    payload_bytes: usize,
    duration: f64,
    /// Invocations/s of the run that measures CPU per invocation (0: none).
    cpu_rate: f64,
}

impl Point<'_> {
    async fn measure(&self, concurrency: &[usize]) -> Result<(Vec<serde_json::Value>, f64, u64)> {
        let (payload_bytes, duration) = (self.payload_bytes, self.duration);
        let record_id = self.graph.to_string();
        let ingress = self.ingress.to_string();
        let mut results = Vec::new();
        for c in concurrency {
            let spec = |secs: f64| crate::load::Spec {
                graph: record_id.clone(),
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
        // CPU per invocation at a fixed rate below saturation: at saturation every run uses
        // all the CPU and only throughput moves (by ±10% run to run here); below it, what
        // telemetry adds shows up as CPU time, which varies far less.
        if self.cpu_rate <= 0.0 {
            return Ok((results, 0.0, 0));
        }
        let busy = || prescient_agent::hostmon::busy_ticks().unwrap_or(0);
        let open = crate::load::Spec {
            graph: record_id.clone(),
            mode: crate::load::Mode::Open {
                rate: self.cpu_rate,
            },
            duration: Duration::from_secs_f64(duration),
            payload: bytes::Bytes::from(vec![b'x'; payload_bytes]),
            deadline_ms: 10_000,
            ingresses: vec![ingress.clone()],
        };
        let before = busy();
        let r = crate::load::run(open, false).await?;
        let ticks = busy().saturating_sub(before);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_us = ticks as f64 / hz * 1e6 / r.ok.max(1) as f64;
        Ok((results, cpu_us, r.ok))
    }
}

/// Time from a switch to the start of the phase it is measured in, as a share of the phase
/// (200 ms before a 1 s phase): spans switch at the next request, probes at once; this lets
/// the invocations in flight finish.
fn settle(phase_seconds: f64) -> Duration {
    Duration::from_secs_f64((phase_seconds / 5.0).clamp(0.02, 0.2))
}

/// Up to one more settling time, at random: the processes under test do periodic work (1 s
/// telemetry ticks, 250 ms sweeps), and phases of a fixed length would meet it at the same
/// points of the ABBA cycle, favouring one side. An A/A run showed such a bias (+2.9%).
fn jitter(phase_seconds: f64, state: &mut u64) -> Duration {
    // xorshift64: no dependency for a few random numbers.
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    settle(phase_seconds).mul_f64((*state % 1000) as f64 / 1000.0)
}

/// The processes of a comparison, by role: control, agents, workers, the load generator.
const ROLES: [&str; 4] = ["control", "agents", "workers", "load generator"];

/// One measured phase of a continuous load, with the machine's busy CPU time over it and each
/// role's share.
#[derive(Debug, Clone, Copy)]
struct Measured {
    phase: crate::load::Phase,
    phase_seconds: f64,
    /// Context switches on the whole machine during the phase.
    switches: u64,
    /// Wake-up IPIs on the whole machine during the phase.
    ipis: u64,
    cpu_seconds: f64,
    role_cpu_seconds: [f64; 4],
}

impl Measured {
    fn cpu_us_per_invocation(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.phase.ok.max(1) as f64
    }
}

/// Runs `mode` as one unbroken load and measures `rounds` pairs of phases of `seconds`, one with
/// telemetry on and one off (ABBA order), switching with `switch` before each: (on, off) pairs.
async fn alternate(
    point: &Point<'_>,
    mode: crate::load::Mode,
    rounds: usize,
    switch: &mut dyn FnMut(bool) -> Result<()>,
    roles: &dyn Fn() -> [u64; 4],
) -> Result<Vec<(Measured, Measured)>> {
    let spec = crate::load::Spec {
        graph: point.graph.to_string(),
        mode,
        duration: Duration::ZERO,
        payload: bytes::Bytes::from(vec![b'x'; point.payload_bytes]),
        deadline_ms: 10_000,
        ingresses: vec![point.ingress.to_string()],
    };
    let mut load = crate::load::Continuous::start(&spec).await?;
    let mut pairs = Vec::new();
    let mut random = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        | 1;
    let result = async {
        for round in 0..rounds.max(1) {
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            let mut pair = [None, None];
            for on in order {
                switch(on)?;
                tokio::time::sleep(settle(point.duration) + jitter(point.duration, &mut random))
                    .await;
                load.take();
                let (before, roles_before) = (machine_busy_ns(), roles());
                let switches_before = context_switches();
                let ipis_before = wakeup_ipis();
                let started = std::time::Instant::now();
                tokio::time::sleep(Duration::from_secs_f64(point.duration)).await;
                let phase = load.take();
                let phase_seconds = started.elapsed().as_secs_f64();
                let busy_ns = machine_busy_ns().saturating_sub(before);
                let switches = context_switches().saturating_sub(switches_before);
                let ipis = wakeup_ipis().saturating_sub(ipis_before);
                let roles_after = roles();
                let mut role_cpu_seconds = [0.0; 4];
                for (i, r) in role_cpu_seconds.iter_mut().enumerate() {
                    *r = roles_after[i].saturating_sub(roles_before[i]) as f64 / 1e9;
                }
                pair[usize::from(on)] = Some(Measured {
                    phase,
                    phase_seconds,
                    switches,
                    ipis,
                    cpu_seconds: busy_ns as f64 / 1e9,
                    role_cpu_seconds,
                });
            }
            if let [Some(off), Some(on)] = pair {
                pairs.push((on, off));
            }
        }
        Ok(())
    }
    .await;
    load.stop().await;
    result.map(|()| pairs)
}

/// Where a difference goes: each role's CPU per invocation, median on and off (on-CPU time from
/// the scheduler; the probes and softirq work count in whichever process they ran in).
fn by_role(pairs: &[(Measured, Measured)]) -> serde_json::Map<String, serde_json::Value> {
    ROLES
        .iter()
        .enumerate()
        .map(|(i, role)| {
            let us = |m: &Measured| m.role_cpu_seconds[i] * 1e6 / m.phase.ok.max(1) as f64;
            let v: Vec<(f64, f64)> = pairs.iter().map(|(on, off)| (us(on), us(off))).collect();
            let p = paired(&v);
            (
                role.to_string(),
                serde_json::json!({
                    "on": p["on_median"],
                    "off": p["off_median"],
                    "median_ratio_on_over_off": p["median_ratio_on_over_off"],
                    "ratio_ci95": p["ratio_ci95"],
                }),
            )
        })
        .collect()
}

/// The sign-test 95% interval of the median of `sorted` (ascending): order statistics, so no
/// assumption about the noise; None with too few values.
fn sign_test_ci95(sorted: &[f64]) -> Option<(f64, f64)> {
    let n = sorted.len();
    // The largest k with P(Binomial(n, 1/2) < k) <= 2.5%: [r_k, r_(n+1-k)] (1-based) covers
    // the median with at least 95% probability.
    let mut k = 0;
    let mut below = 0.0;
    let mut term = 0.5f64.powi(n as i32);
    for i in 0..n {
        if below + term > 0.025 {
            break;
        }
        below += term;
        term *= (n - i) as f64 / (i + 1) as f64;
        k = i + 1;
    }
    (k >= 1).then(|| (sorted[k - 1], sorted[n - k]))
}

/// Pairs per block for the block interval.
const BLOCK_PAIRS: usize = 10;

/// Paired on/off values, in the order they were measured: medians of each side and of the
/// per-pair ratios, with the sign-test 95% interval of the median ratio. That interval takes
/// pairs as independent, but neighbouring pairs on a shared machine are not (an A/A run showed
/// −2.0% with an interval that excluded zero), so the same interval is also given over the
/// medians of blocks of consecutive pairs, which are closer to independent: wider, and honest.
fn paired(pairs: &[(f64, f64)]) -> serde_json::Value {
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let interval = |sorted: &[f64]| {
        sign_test_ci95(sorted).map_or(serde_json::Value::Null, |(lo, hi)| {
            serde_json::json!([round3(lo), round3(hi)])
        })
    };
    let in_order: Vec<f64> = pairs.iter().map(|(on, off)| on / off).collect();
    let mut blocks: Vec<f64> = in_order.chunks_exact(BLOCK_PAIRS).map(median).collect();
    blocks.sort_by(f64::total_cmp);
    let mut ratios = in_order;
    ratios.sort_by(f64::total_cmp);
    let ci = interval(&ratios);
    let on: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let off: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    serde_json::json!({
        "on_median": round3(median(&on)),
        "off_median": round3(median(&off)),
        "median_ratio_on_over_off": round3(median(&ratios)),
        "ratio_ci95": ci,
        "block_pairs": BLOCK_PAIRS,
        "block_median_ratio": round3(median(&blocks)),
        "block_ratio_ci95": interval(&blocks),
        "ratios_sorted": ratios.iter().map(|r| round3(*r)).collect::<Vec<_>>(),
    })
}

/// What a comparison switches, and how.
struct Switching<'a> {
    /// What "on" means.
    on: Telemetry,
    /// The probes' object to attach, if not the embedded one.
    probes_object: Option<&'a [u8]>,
    /// Both phases on, the probes re-attached before each (an A/A run of the switching).
    reattach_aa: bool,
}

/// Measures one cluster under one unbroken load per concurrency, switching its telemetry on
/// and off between short phases: spans by signal (SIGUSR1 off, SIGUSR2 on, to every agent and
/// worker), the probes by attaching and detaching them (loaded once, here). The same
/// processes, placement and connections on both sides: only telemetry differs.
async fn compare_switching(
    cluster: &LocalCluster,
    point: &Point<'_>,
    concurrency: &[usize],
    rounds: usize,
    how: Switching<'_>,
) -> Result<serde_json::Value> {
    let Switching {
        on,
        probes_object,
        reattach_aa,
    } = how;
    let pids: Vec<u32> = cluster
        .agents
        .iter()
        .flat_map(|a| {
            let agent = a.child.id();
            std::iter::once(agent).chain(children(agent))
        })
        .collect();
    let mut probes_note = String::from("not part of this comparison");
    let mut probes = None;
    if on.probes() {
        let loaded = match probes_object {
            Some(object) => prescient_agent::probes::Probes::load_object(object),
            None => prescient_agent::probes::Probes::load(),
        };
        match loaded {
            Ok(mut p) => {
                p.set_attached(false)?;
                // Each worker counted in a group of its own, as its agent would count it: their
                // switches take the probes' longer (tracked) path.
                for a in &cluster.agents {
                    for worker in children(a.child.id()) {
                        p.join(&format!("worker-{worker}"), worker);
                    }
                }
                probes_note =
                    "loaded once, attached only while on; each worker tracked in its own group"
                        .into();
                probes = Some(p);
            }
            Err(e) => probes_note = format!("could not be loaded: {e}"),
        }
    }
    let control = cluster.control.child.id();
    let agents: Vec<u32> = cluster.agents.iter().map(|a| a.child.id()).collect();
    let me = std::process::id();
    let workers: Vec<u32> = agents.iter().flat_map(|a| children(*a)).collect();
    // Each role's processes, found once: the comparison runs on one unchanging cluster.
    let members: [Vec<u32>; 4] = [vec![control], agents.clone(), workers, vec![me]];
    let roles = || -> [u64; 4] {
        members
            .each_ref()
            .map(|m| m.iter().map(|p| on_cpu_ns(*p)).sum())
    };
    let signal_all = |signal| {
        for &pid in &pids {
            // SAFETY: kill has no memory preconditions; these are our own children.
            unsafe { libc::kill(pid as i32, signal) };
        }
    };
    let mut switch = |measuring: bool| -> Result<()> {
        let measuring = measuring || reattach_aa;
        let spans = measuring && on.spans();
        signal_all(if spans { libc::SIGUSR2 } else { libc::SIGUSR1 });
        if let Some(p) = probes.as_mut() {
            if reattach_aa {
                p.set_attached(false)?;
            }
            p.set_attached(measuring)?;
        }
        Ok(())
    };
    let mut rows = Vec::new();
    for &c in concurrency {
        let mode = crate::load::Mode::Closed { concurrency: c };
        let pairs = alternate(point, mode, rounds, &mut switch, &roles).await?;
        let of = |f: fn(&Measured) -> f64| -> Vec<(f64, f64)> {
            pairs.iter().map(|(on, off)| (f(on), f(off))).collect()
        };
        let errors: u64 = pairs
            .iter()
            .map(|(a, b)| a.phase.errors + b.phase.errors)
            .sum();
        rows.push(serde_json::json!({
            "concurrency": c,
            "throughput_rps": paired(&of(|m| m.phase.rps)),
            "p50_us": paired(&of(|m| m.phase.p50_us as f64)),
            "cpu_us_per_invocation": paired(&of(Measured::cpu_us_per_invocation)),
            // Each switch costs a wake-up, a system call and cold caches: telemetry that
            // changes how requests batch per wake-up costs more than its own CPU time.
            "context_switches_per_invocation": paired(&of(|m| m.switches as f64 / m.phase.ok.max(1) as f64)),
            // A wake-up sent to another CPU costs that CPU an interrupt (a VM exit in a VM) and
            // the woken task a cache moved across: cheap work that shifts which CPU wakes
            // whom can cost more than itself.
            "wakeup_ipis_per_invocation": paired(&of(|m| m.ipis as f64 / m.phase.ok.max(1) as f64)),
            // Below 1.0: the machine idles between wake-ups at this concurrency, so time added
            // on the request path costs throughput even where CPU is spare.
            "busy_share_of_machine": paired(&of(|m| m.cpu_seconds / (m.phase_seconds * online_cpus() as f64))),
            "cpu_us_per_invocation_by_role": by_role(&pairs),
            "errors": errors,
        }));
    }
    let mut cpu = serde_json::Value::Null;
    if point.cpu_rate > 0.0 {
        let mode = crate::load::Mode::Open {
            rate: point.cpu_rate,
        };
        let pairs = alternate(point, mode, rounds, &mut switch, &roles).await?;
        let per_invocation: Vec<(f64, f64)> = pairs
            .iter()
            .map(|(on, off)| (on.cpu_us_per_invocation(), off.cpu_us_per_invocation()))
            .collect();
        cpu = serde_json::json!({
            "rate": point.cpu_rate,
            "cpu": paired(&per_invocation),
            "cpu_us_per_invocation_by_role": by_role(&pairs),
        });
    }
    // Leave the cluster as it started: spans on, the probes (ours) dropped.
    signal_all(libc::SIGUSR2);
    drop(probes);
    Ok(serde_json::json!({
        "bench": "chain-telemetry-overhead",
        "method": "one cluster under one unbroken load per point; telemetry switched between \
            phases (ABBA), each measured after a settling time of random length (between the two \
            settle_seconds); ratios are on/off per pair",
        "telemetry_on": on.name(),
        "reattach_aa": reattach_aa,
        "probes": probes_note,
        "rounds": rounds,
        "seconds_per_phase": point.duration,
        "settle_seconds": [settle(point.duration).as_secs_f64(), 2.0 * settle(point.duration).as_secs_f64()],
        "results": rows,
        "cpu_us_per_invocation_at_fixed_rate": cpu,
    }))
}

/// How each point of the chain benchmark is loaded.
struct Loading {
    /// Seconds measured per point (per phase when comparing).
    duration: f64,
    payload_bytes: usize,
    /// Invocations/s of the run that measures CPU per invocation (0: none).
    cpu_rate: f64,
    /// The probes' object to compare with, if not the embedded one.
    probes_object: Option<std::path::PathBuf>,
    /// Compare telemetry on with itself, re-attaching the probes before every phase.
    reattach_aa: bool,
}

async fn chain(
    stages: usize,
    concurrency: &[usize],
    loading: Loading,
    data_plane: &str,
    telemetry: Telemetry,
    compare: Option<usize>,
) -> Result<serde_json::Value> {
    let Loading {
        duration,
        payload_bytes,
        cpu_rate,
        probes_object,
        reattach_aa,
    } = loading;
    let probes_object = probes_object
        .map(|path| {
            std::fs::read(&path)
                .with_context(|| format!("cannot read the probes' object {}", path.display()))
        })
        .transpose()?;
    if stages == 0 {
        bail!("--stages must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("prescient-bench-{}", std::process::id()));
    // Comparing: spans start on in every process and are switched by signal; the probes are
    // attached by this process when "on" includes them.
    let started_with = if compare.is_some() {
        Telemetry::SpansOnly
    } else {
        telemetry
    };
    let cluster = LocalCluster::start(&dir, stages, 2, data_plane, started_with)?;
    let result = async {
        let (client, record) = deploy_chain(&cluster, stages).await?;
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
        let point = Point {
            graph: &record.id,
            ingress: &ingress,
            payload_bytes,
            duration,
            cpu_rate,
        };
        if let Some(rounds) = compare {
            let probes = probes_object.as_deref();
            let how = Switching {
                on: telemetry,
                probes_object: probes,
                reattach_aa,
            };
            return compare_switching(&cluster, &point, concurrency, rounds, how).await;
        }
        let (results, cpu_us, ok) = point.measure(concurrency).await?;
        Ok(serde_json::json!({
            "bench": "chain",
            "cpu_at_fixed_rate": {
                "rate": cpu_rate,
                "ok": ok,
                "cpu_us_per_invocation": (cpu_us * 100.0).round() / 100.0,
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_test_interval_uses_the_binomial_order_statistics() {
        let sorted: Vec<f64> = (1..=10).map(f64::from).collect();
        // P(Binomial(10, 1/2) <= 1) = 1.07% <= 2.5% < P(<= 2) = 5.5%: the 2nd and 9th values.
        assert_eq!(sign_test_ci95(&sorted), Some((2.0, 9.0)));
        // Five values can never give 95%: P(all on one side) = 3.1% > 2.5%.
        assert_eq!(sign_test_ci95(&sorted[..5]), None);
        let sorted: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(sign_test_ci95(&sorted), Some((10.0, 21.0)));
    }

    #[test]
    fn blocks_take_consecutive_pairs() {
        // A drift: ratios of 1.1 for 20 pairs, then 0.9 for 20. Four blocks are too few for an
        // interval; twelve (the run three times) span both levels.
        let pairs: Vec<(f64, f64)> = (0..40)
            .map(|i| if i < 20 { (1.1, 1.0) } else { (0.9, 1.0) })
            .collect();
        let v = paired(&pairs);
        assert_eq!(v["block_pairs"], 10);
        assert_eq!(v["block_ratio_ci95"], serde_json::Value::Null, "{v}");
        let v = paired(&pairs.repeat(3));
        let ci = v["block_ratio_ci95"].as_array().unwrap();
        assert_eq!(
            (ci[0].as_f64(), ci[1].as_f64()),
            (Some(0.9), Some(1.1)),
            "{v}"
        );
    }
}
