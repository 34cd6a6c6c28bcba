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
        #[arg(long, value_name = "OBJECT", hide = true)]
        probes_object: Option<std::path::PathBuf>,
        /// An A/A run of the switching itself for --compare-telemetry: telemetry (as
        /// --telemetry) on in both phases of a pair, the probes detached and attached again
        /// before each phase, so what switching costs shows apart from what telemetry costs.
        #[arg(long, hide = true)]
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
    /// The load forecaster's cost per series per step: the model's rows, one batched ONNX run
    /// and the per-series selection, at each batch size, against the baselines alone.
    Forecast {
        /// Series per batch; a comma-separated list runs each in turn.
        #[arg(long, default_value = "1,100,1000", value_delimiter = ',')]
        series: Vec<usize>,
        /// Steps forecast per batch size (after as many of warm-up).
        #[arg(long, default_value_t = 300)]
        steps: usize,
    },
    /// Replica start times: placement to ready, VM boot against snapshot restore (`--provisioner
    /// qemu`: two agents side by side, rounds alternating), idle VM RSS, and a 2-stage chain's
    /// p50 through VMs against process workers.
    Boot {
        /// `qemu` (microVMs; needs `cargo xtask guest-image`) or `process`.
        #[arg(long, default_value = "qemu")]
        provisioner: String,
        /// Starts measured per mode.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds of chain load per configuration.
        #[arg(long, default_value_t = 5.0)]
        chain_seconds: f64,
    },
    /// Predictive provisioning live: a real trace slice with a ramp (the Azure LLM
    /// conversation trace, time-compressed, thinned from 10% to all of it) against one task
    /// serving one execution at a time, once reactive (forecast-only) and once with the plan
    /// acting, each on a fresh cluster with the process provisioner's real lead time; within
    /// objective, latency, replica-seconds, lead time, the plan's scale-outs.
    Predictive {
        /// Seconds of replay per run.
        #[arg(long, default_value_t = 45.0)]
        seconds: f64,
        /// How much faster than the trace's own time.
        #[arg(long, default_value_t = 10.0)]
        speedup: f64,
        /// The task's service time in milliseconds (the objective is twice it).
        #[arg(long, default_value_t = 20)]
        service_ms: u64,
        /// Pairs of runs (reactive and predictive, alternating which goes first).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
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
    /// Sizing by utilisation: a task serving one execution at a time (a `sleep` kernel) under
    /// open-loop load ramping 0.5x, 1x, 2x, 4x, 8x one replica's capacity and back; replicas
    /// needed against those serving, reaction time, latency, the share within the objective
    /// (5x the service time), and how long the extras take to retire.
    Scale {
        /// Seconds per load step.
        #[arg(long, default_value_t = 8.0)]
        phase: f64,
        /// The task's service time in milliseconds.
        #[arg(long, default_value_t = 20)]
        service_ms: u64,
    },
    /// Replication of a slowed host's replica: a 3-stage CPU-bound chain (one stage per host)
    /// under steady open-loop load with a p99 objective; after a healthy phase the middle
    /// stage's host is slowed for real (its workers' cgroup CPU quota cut to a fifth), the
    /// controller replaces and sheds the slowed replica; then the load stops. Chain p99
    /// healthy, degraded and recovered, slowdown-to-serving time, decisions. Needs root.
    Replication {
        /// Seconds of the healthy phase (after 2 s of warm-up).
        #[arg(long, default_value_t = 10.0)]
        healthy: f64,
        /// Seconds measured just after the slowdown.
        #[arg(long, default_value_t = 4.0)]
        degraded: f64,
        /// Seconds measured once the slowed replica is shed.
        #[arg(long, default_value_t = 10.0)]
        recovered: f64,
        /// Invocations per second.
        #[arg(long, default_value_t = 80.0)]
        rate: f64,
    },
    /// Hedged invocations against stragglers: one task, three replicas, each execution 10x
    /// slower 5% of the time (`sleep` with `straggler_p`); p99 healthy (no stragglers), with
    /// stragglers, and with stragglers and `hedge = true`, and the extra executions hedging
    /// sent.
    Hedging {
        /// Seconds measured per phase (after 3 s of warm-up).
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// The task's mean service time.
        #[arg(long, default_value_t = 10)]
        mean_ms: u64,
        /// Its distribution: fixed, uniform, exponential or lognormal.
        #[arg(long, default_value = "exponential")]
        dist: String,
        #[arg(long, default_value_t = 0.05)]
        straggler_p: f64,
        #[arg(long, default_value_t = 10.0)]
        straggler_x: f64,
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

/// The middle value (the upper one of an even count); 0 for none.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(which: Which) -> Result<ExitCode> {
    let report = match which {
        Which::Transfer {
            bytes,
            payload,
            repeat,
        } => transfer::transfer(&bytes, &payload, repeat)?,
        Which::Idle { seconds, rounds } => idle::idle(seconds, rounds).await?,
        Which::Forecast { series, steps } => forecast::forecast(&series, steps)?,
        Which::Scale { phase, service_ms } => scale::scale(phase, service_ms).await?,
        Which::Boot {
            provisioner,
            runs,
            chain_seconds,
        } => {
            boot::boot(boot::Plan {
                provisioner,
                runs,
                chain_seconds,
            })
            .await?
        }
        Which::Predictive {
            seconds,
            speedup,
            service_ms,
            rounds,
        } => {
            predictive::predictive(predictive::Plan {
                seconds,
                speedup,
                service_ms,
                rounds,
            })
            .await?
        }
        Which::Hedging {
            seconds,
            rate,
            mean_ms,
            dist,
            straggler_p,
            straggler_x,
        } => {
            hedging::hedging(hedging::Plan {
                seconds,
                rate,
                mean_ms,
                dist,
                straggler_p,
                straggler_x,
            })
            .await?
        }
        Which::Replication {
            healthy,
            degraded,
            recovered,
            rate,
        } => {
            replication::replication(replication::Plan {
                healthy_s: healthy,
                degraded_s: degraded,
                recovered_s: recovered,
                rate,
                ..replication::Plan::default()
            })
            .await?
        }
        Which::Probes {
            rounds,
            round_trips,
            variant,
            tracked,
        } => probes::probes(rounds, round_trips, &variant, tracked)?,
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
            let loading = chain::Loading {
                duration,
                payload_bytes,
                cpu_rate,
                probes_object,
                reattach_aa,
            };
            chain::chain(
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

/// A client of `cluster`'s control node once every agent has registered.
async fn connect_registered(cluster: &LocalCluster) -> Result<ControlClient> {
    let client = ControlClient::connect(&cluster.control.addr).await?;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while client.agents().await?.len() < cluster.agents.len() {
        if std::time::Instant::now() > until {
            bail!("the agents did not register");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(client)
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
    Ok((client, *record))
}

mod boot;
mod chain;
mod forecast;
mod hedging;
mod idle;
mod predictive;
mod probes;
mod procfs;
pub mod replication;
mod scale;
mod transfer;

use procfs::*;
