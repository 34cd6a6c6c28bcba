//! `prescient-agent`: the host agent (one per host), and, as `prescient-agent worker`, the
//! worker process it starts for each task replica.

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[path = "../config_args.rs"]
mod config_args;
#[path = "../metrics_http.rs"]
mod metrics_http;
use prescient_agent::dataplane::Transport;
use prescient_agent::node::{AgentConfig, AgentNode};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Runs the Prescient host agent: registers this host, runs task replicas, serves invocations.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// A TOML file whose keys are these flags' names (`max_message_bytes = 1048576`); flags win.
    #[arg(long, env = "PRESCIENT_CONFIG")]
    config: Option<PathBuf>,
    /// The control node's API address.
    #[arg(long, env = "PRESCIENT_CONTROL", default_value = "127.0.0.1:7400")]
    control: Option<String>,
    /// Address of this agent's ingress, where clients send invocations (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:7500")]
    listen: Option<SocketAddr>,
    /// Directory for the agent's state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// This agent's name (defaults to the hostname).
    #[arg(long)]
    name: Option<String>,
    /// CPUs offered to replicas (defaults to all of this host's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory offered to replicas, e.g. 4GiB (defaults to all of this host's).
    #[arg(long)]
    memory: Option<String>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// How workers drive data-plane sockets: epoll (best latency and small-frame throughput
    /// here), io_uring (best bulk transfer here), or auto (io_uring where the kernel allows).
    #[arg(long, default_value = "epoll")]
    data_plane: String,
    /// Turn off per-request spans (to measure what telemetry costs).
    #[arg(long)]
    no_telemetry: bool,
    /// Do not load the eBPF probes (run-queue latency, TCP bytes per VM); procfs and cgroups
    /// still report CPU, memory and network.
    #[arg(long)]
    no_probes: bool,
    /// Serve Prometheus metrics on `GET /metrics` at this address (port 0 picks one).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// How replicas run: `process` (a worker process in a cgroup) or `qemu` (a microVM each,
    /// booted from the guest image `cargo xtask guest-image` builds).
    #[arg(long, default_value = "process")]
    provisioner: String,
    /// The guest image's directory (vmlinuz, initramfs.cpio.gz); default: `target/guest` near
    /// this binary, `$PRESCIENT_GUEST_DIR`, or /usr/lib/prescient/guest.
    #[arg(long)]
    guest_image: Option<PathBuf>,
    /// The microVMs' accelerator: auto (KVM where a guest boots under it, else TCG), kvm, tcg.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Boot every microVM instead of restoring from a snapshot saved per VM shape.
    #[arg(long)]
    no_snapshots: bool,
    /// A microVM not serving this long after QEMU started is killed and reported failed.
    #[arg(long, default_value_t = 60_000)]
    vm_ready_timeout_ms: u64,
    /// Booted, idle microVMs beyond the warm pool the control node asks for stop once idle
    /// this long.
    #[arg(long, default_value_t = 300_000)]
    warm_idle_timeout_ms: u64,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// A worker process (started by the agent, one per replica; not for direct use).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        host: String,
        /// The replica this worker runs (for `ps`; the task itself arrives on stdin).
        #[arg(long)]
        replica: Option<String>,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "epoll")]
        data_plane: String,
        #[arg(long)]
        no_telemetry: bool,
    },
    /// One end of the transfer benchmark: acknowledges and drops what it receives.
    #[command(hide = true)]
    BenchSink {
        #[arg(long)]
        listen: SocketAddr,
        /// epoll, io_uring, or raw (plain TCP, no framing).
        #[arg(long)]
        data_plane: String,
    },
    /// The other end: streams `--bytes` to a sink in `--payload`-byte requests; prints seconds.
    #[command(hide = true)]
    BenchSource {
        #[arg(long)]
        to: String,
        #[arg(long)]
        data_plane: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        payload: usize,
        /// Unacknowledged bytes allowed in flight.
        #[arg(long, default_value_t = 64 << 20)]
        window: usize,
    },
}

/// Keeps freed memory in the process instead of returning it to the kernel after every large
/// frame: glibc's defaults map and unmap each frame over 128 KiB, so every 1 MiB payload paid
/// for 256 fresh page faults (encoding ran at 1 GiB/s; the transfer benchmark shows the gain).
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> Result<()> {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PRESCIENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = parse_args()?;
    match args.command {
        Some(Sub::Worker {
            host,
            listen,
            data_plane,
            no_telemetry,
            ..
        }) => {
            let (transport, _) = Transport::choose(&data_plane).map_err(anyhow::Error::msg)?;
            return on_transport(transport, async move {
                prescient_agent::worker::run(&host, listen, !no_telemetry).await
            })?
            .map_err(anyhow::Error::msg);
        }
        Some(Sub::BenchSink { listen, data_plane }) => {
            if data_plane == "raw" {
                return Ok(prescient_agent::dataplane::transfer::raw_sink(listen)?);
            }
            let (transport, _) = Transport::choose(&data_plane).map_err(anyhow::Error::msg)?;
            return Ok(on_transport(
                transport,
                prescient_agent::dataplane::transfer::sink(listen),
            )??);
        }
        Some(Sub::BenchSource {
            to,
            data_plane,
            bytes,
            payload,
            window,
        }) => {
            let seconds = if data_plane == "raw" {
                prescient_agent::dataplane::transfer::raw_source(&to, bytes, payload)?
            } else {
                let (transport, _) = Transport::choose(&data_plane).map_err(anyhow::Error::msg)?;
                on_transport(transport, async move {
                    prescient_agent::dataplane::transfer::source(&to, bytes, payload, window).await
                })?
                .map_err(anyhow::Error::msg)?
            };
            println!("{seconds}");
            return Ok(());
        }
        None => {}
    }
    let (transport, why) = Transport::choose(&args.data_plane).map_err(anyhow::Error::msg)?;
    tracing::info!(
        data_plane = transport.name(),
        "workers use {}: {why}",
        transport.name()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let memory_bytes = args
        .memory
        .as_deref()
        .map(prescient_schemas::quantity::parse_bytes)
        .transpose()
        .context("--memory")?;
    if let Some(dir) = &args.data_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let metrics_listen = args.metrics_listen;
    let exe = std::env::current_exe()?;
    let qemu = match args.provisioner.as_str() {
        "process" => None,
        "qemu" => {
            use prescient_agent::provision::qemu::{find_image, Accel};
            let image = match &args.guest_image {
                Some(d) => d.clone(),
                None => find_image(&exe).context(
                    "--provisioner qemu: no guest image found (run `cargo xtask guest-image`, or pass --guest-image DIR)",
                )?,
            };
            for f in ["vmlinuz", "initramfs.cpio.gz"] {
                if !image.join(f).exists() {
                    anyhow::bail!("--guest-image {}: no {f} there", image.display());
                }
            }
            let accel = match args.accel.as_str() {
                "auto" => None,
                "kvm" => Some(Accel::Kvm),
                "tcg" => Some(Accel::Tcg),
                other => anyhow::bail!("--accel {other:?}: auto, kvm or tcg"),
            };
            Some(prescient_agent::node::QemuSettings {
                image,
                accel,
                snapshots: !args.no_snapshots,
                ready_timeout: Duration::from_millis(args.vm_ready_timeout_ms.max(100)),
                warm_idle_timeout: Duration::from_millis(args.warm_idle_timeout_ms),
            })
        }
        other => anyhow::bail!("--provisioner {other:?}: process or qemu"),
    };
    let config = AgentConfig {
        name: args.name.clone().unwrap_or(hostname),
        control: args.control.unwrap_or_else(|| "127.0.0.1:7400".into()),
        listen: args
            .listen
            .unwrap_or_else(|| "127.0.0.1:7500".parse().expect("a valid default")),
        cpus: args.cpus,
        memory_bytes,
        heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)),
        worker_exe: exe,
        qemu,
        data_plane: transport,
        telemetry: !args.no_telemetry,
        probes: !args.no_probes,
        data_dir: args.data_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("prescient-agent-{}", std::process::id()))
        }),
    };
    local.block_on(&runtime, async move {
        let node = AgentNode::start(config.clone())
            .await
            .with_context(|| format!("binding the ingress on {}", config.listen))?;
        println!(
            "prescient-agent {} ingress on {}",
            config.name,
            node.ingress_addr()
        );
        if let Some(addr) = metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            println!(
                "prescient-agent {} metrics on {}",
                config.name,
                listener.local_addr()?
            );
            let n = node.clone();
            let render: std::rc::Rc<dyn Fn() -> String> =
                std::rc::Rc::new(move || n.render_metrics());
            tokio::task::spawn_local(metrics_http::serve(listener, render));
        }
        std::io::stdout().flush()?;
        tokio::task::spawn_local(node.clone().forward_telemetry());
        tokio::select! {
            _ = node.run() => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
        }
        Ok(())
    })
}

/// Runs a `!Send` future on a single-threaded runtime driven by `transport`.
fn on_transport<F: std::future::Future + 'static>(
    transport: Transport,
    fut: F,
) -> Result<F::Output> {
    prescient_agent::dataplane::set_transport(transport);
    match transport {
        Transport::IoUring => Ok(tokio_uring::start(fut)),
        Transport::Epoll => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(tokio::task::LocalSet::new().block_on(&runtime, fut))
        }
    }
}

/// Parses the command line with the `--config` file's settings underneath it.
fn parse_args() -> Result<Args> {
    let cmd = Args::command();
    let argv = config_args::with_config_file(&cmd, std::env::args_os().collect())?;
    let matches = cmd.get_matches_from(argv);
    Ok(Args::from_arg_matches(&matches)?)
}
