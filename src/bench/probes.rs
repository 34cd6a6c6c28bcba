//! `bench probes`: what the eBPF probes add to a context switch and a TCP send or receive.

use super::*;
use anyhow::{bail, Context, Result};
use std::time::Duration;

/// Median ns per round trip of `ping` (which runs `n` round trips).
pub(super) fn time_round_trips(n: usize, ping: &mut dyn FnMut(usize) -> Result<()>) -> Result<f64> {
    let started = std::time::Instant::now();
    ping(n)?;
    Ok(started.elapsed().as_nanos() as f64 / n as f64)
}

/// A thread echoing `len`-byte messages from `echo_rx` to `echo_tx`, and the loop that sends
/// `n` messages on `tx` and waits for each to come back on `rx`.
pub(super) fn ping_pong(
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
pub(super) fn pipe_ping_pong() -> Result<impl FnMut(usize) -> Result<()>> {
    let (a_rx, b_tx) = std::io::pipe()?;
    let (b_rx, a_tx) = std::io::pipe()?;
    Ok(ping_pong(1, a_rx, a_tx, b_rx, b_tx))
}

/// 64-byte messages over loopback TCP (Nagle off).
pub(super) fn tcp_ping_pong() -> Result<impl FnMut(usize) -> Result<()>> {
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

pub(super) fn probes(
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
        prescient_agent::telemetry::probes::Probes::load().map_err(not_loaded)?,
    )];
    for path in variants {
        let object = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let p = prescient_agent::telemetry::probes::Probes::load_object(&object)
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
