//! `prescient-control`: the control node binary (one per cluster).

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser};

#[path = "../config_args.rs"]
mod config_args;
#[path = "../metrics_http.rs"]
mod metrics_http;
use prescient_control::{Config, ControlNode, Limits};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Runs the Prescient control node: graph registry, API, and (later) the control loops.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// A TOML file whose keys are these flags' names (`max_message_bytes = 1048576`); flags win.
    #[arg(long, env = "PRESCIENT_CONFIG")]
    config: Option<PathBuf>,
    /// Address to serve the Cap'n Proto API on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7400", env = "PRESCIENT_LISTEN")]
    listen: SocketAddr,
    /// Directory for the registry database and event log.
    #[arg(long, env = "PRESCIENT_DATA_DIR")]
    data_dir: PathBuf,
    /// Largest API message accepted, in bytes; larger ones close the connection.
    #[arg(long, default_value_t = Limits::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Most API connections served at once.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Declare an agent lost after this many milliseconds without a heartbeat.
    #[arg(long, default_value_t = 3000)]
    heartbeat_timeout_ms: u64,
    /// After start, wait this long for agents to report their replicas before placing any.
    #[arg(long, default_value_t = 3000)]
    startup_grace_ms: u64,
    /// Replicas every task gets at least (the policy minimum).
    #[arg(long, default_value_t = 1)]
    min_replicas: usize,
    /// When a graph is updated, how long the old version's replicas keep serving invocations
    /// already on their way after the new version takes over.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
    /// A new replica warms up on its task's recent real inputs for at most this long before it
    /// is routed (0: no warm-up).
    #[arg(long, default_value_t = 5000)]
    warmup_ms: u64,
    /// How often per-minute roll-ups (the forecaster's history) are written to disk.
    #[arg(long, default_value_t = 10_000)]
    history_flush_ms: u64,
    /// Serve Prometheus metrics on `GET /metrics` at this address (port 0 picks one).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PRESCIENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = parse_args()?;
    let metrics_listen = args.metrics_listen;
    let config = Config {
        listen: args.listen,
        data_dir: args.data_dir,
        limits: Limits {
            max_message_bytes: args.max_message_bytes,
            max_connections: args.max_connections,
            ..Limits::default()
        },
        cluster: prescient_control::ClusterConfig {
            policy: prescient_policy::Config {
                heartbeat_timeout: std::time::Duration::from_millis(args.heartbeat_timeout_ms),
                startup_grace: std::time::Duration::from_millis(args.startup_grace_ms),
                min_replicas: args.min_replicas.max(1),
                drain: std::time::Duration::from_millis(args.drain_ms),
                ..prescient_policy::Config::default()
            },
            history_flush: std::time::Duration::from_millis(args.history_flush_ms.max(100)),
            warmup_timeout: std::time::Duration::from_millis(args.warmup_ms),
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let node = ControlNode::bind(config).await?;
        // Scripts and tests read this line to learn the bound port.
        println!("prescient-control listening on {}", node.local_addr);
        if let Some(addr) = metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            println!("prescient-control metrics on {}", listener.local_addr()?);
            let cluster = node.cluster();
            let render: std::rc::Rc<dyn Fn() -> String> = std::rc::Rc::new(move || {
                prescient_control::metrics::render(
                    &cluster,
                    prescient_control::clock::unix_ms() / 1000,
                )
            });
            tokio::task::spawn_local(metrics_http::serve(listener, render));
        }
        std::io::stdout().flush()?;
        tracing::info!(addr = %node.local_addr, "control node ready");
        tokio::select! {
            _ = node.run() => {}
            _ = shutdown_signal() => tracing::info!("shutting down"),
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Parses the command line with the `--config` file's settings underneath it.
fn parse_args() -> Result<Args> {
    let cmd = Args::command();
    let argv = config_args::with_config_file(&cmd, std::env::args_os().collect())?;
    let matches = cmd.get_matches_from(argv);
    Ok(Args::from_arg_matches(&matches)?)
}
