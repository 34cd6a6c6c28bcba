//! `bench chain`: a chain of no-op stages under closed- and open-loop load; with
//! `--compare-telemetry`, telemetry switched on and off under one unbroken load.

use super::*;
use crate::local::{LocalCluster, Telemetry};
use anyhow::{bail, Context, Result};
use std::time::Duration;

/// One measured configuration: closed-loop throughput and latency at each concurrency, then
/// CPU per invocation at a fixed rate.
pub(super) struct Point<'a> {
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
                objective_us: None,
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
        let busy = || prescient_agent::telemetry::host::busy_ticks().unwrap_or(0);
        let open = crate::load::Spec {
            graph: record_id.clone(),
            mode: crate::load::Mode::Open {
                rate: self.cpu_rate,
            },
            duration: Duration::from_secs_f64(duration),
            payload: bytes::Bytes::from(vec![b'x'; payload_bytes]),
            deadline_ms: 10_000,
            ingresses: vec![ingress.clone()],
            objective_us: None,
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
pub(super) fn settle(phase_seconds: f64) -> Duration {
    Duration::from_secs_f64((phase_seconds / 5.0).clamp(0.02, 0.2))
}

/// Up to one more settling time, at random: the processes under test do periodic work (1 s
/// telemetry ticks, 250 ms sweeps), and phases of a fixed length would meet it at the same
/// points of the ABBA cycle, favouring one side. An A/A run showed such a bias (+2.9%).
pub(super) fn jitter(phase_seconds: f64, state: &mut u64) -> Duration {
    // xorshift64: no dependency for a few random numbers.
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    settle(phase_seconds).mul_f64((*state % 1000) as f64 / 1000.0)
}

/// The processes of a comparison, by role: control, agents, workers, the load generator.
pub(super) const ROLES: [&str; 4] = ["control", "agents", "workers", "load generator"];

/// One measured phase of a continuous load, with the machine's busy CPU time over it and each
/// role's share.
#[derive(Debug, Clone, Copy)]
pub(super) struct Measured {
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
pub(super) async fn alternate(
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
        objective_us: None,
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
pub(super) fn by_role(
    pairs: &[(Measured, Measured)],
) -> serde_json::Map<String, serde_json::Value> {
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
pub(super) fn sign_test_ci95(sorted: &[f64]) -> Option<(f64, f64)> {
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
pub(super) const BLOCK_PAIRS: usize = 10;

/// Paired on/off values, in the order they were measured: medians of each side and of the
/// per-pair ratios, with the sign-test 95% interval of the median ratio. That interval takes
/// pairs as independent, but neighbouring pairs on a shared machine are not (an A/A run showed
/// −2.0% with an interval that excluded zero), so the same interval is also given over the
/// medians of blocks of consecutive pairs, which are closer to independent: wider, and honest.
pub(super) fn paired(pairs: &[(f64, f64)]) -> serde_json::Value {
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
pub(super) struct Switching<'a> {
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
pub(super) async fn compare_switching(
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
            Some(object) => prescient_agent::telemetry::probes::Probes::load_object(object),
            None => prescient_agent::telemetry::probes::Probes::load(),
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
pub(super) struct Loading {
    /// Seconds measured per point (per phase when comparing).
    pub(super) duration: f64,
    pub(super) payload_bytes: usize,
    /// Invocations/s of the run that measures CPU per invocation (0: none).
    pub(super) cpu_rate: f64,
    /// The probes' object to compare with, if not the embedded one.
    pub(super) probes_object: Option<std::path::PathBuf>,
    /// Compare telemetry on with itself, re-attaching the probes before every phase.
    pub(super) reattach_aa: bool,
}

pub(super) async fn chain(
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
