//! The microVM guest binary, built static (musl) into the guest image as `/init`: as PID 1 it
//! prepares the VM (`prescient_agent::guest::init`), which runs it again as `worker` on the
//! virtio-serial channel.

use prescient_agent::dataplane::Transport;
use std::process::ExitCode;

/// `worker --host H --listen ADDR [--replica R] [--data-plane epoll|io_uring]
/// [--no-telemetry] [--loopback-via IP]`.
struct WorkerArgs {
    host: String,
    listen: std::net::SocketAddr,
    data_plane: String,
    telemetry: bool,
    loopback_via: Option<std::net::IpAddr>,
}

fn parse(args: &[String]) -> Result<WorkerArgs, Box<dyn std::error::Error>> {
    let mut host = None;
    let mut listen = None;
    let mut data_plane = "epoll".to_string();
    let mut telemetry = true;
    let mut loopback_via = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--host" => host = Some(value()?),
            "--replica" => {
                value()?;
            }
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--data-plane" => data_plane = value()?,
            "--no-telemetry" => telemetry = false,
            "--loopback-via" => {
                loopback_via = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--loopback-via: {e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(WorkerArgs {
        host: host.ok_or("--host is required")?,
        listen: listen.ok_or("--listen is required")?,
        data_plane,
        telemetry,
        loopback_via,
    })
}

fn worker(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let a = parse(args)?;
    // To the VM's console (its stderr), which the agent shows when the VM fails.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PRESCIENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let (transport, _) = Transport::choose(&a.data_plane)?;
    prescient_agent::dataplane::set_transport(transport);
    if let Some(ip) = a.loopback_via {
        prescient_agent::dataplane::set_loopback_via(ip);
    }
    let run = async move { prescient_agent::worker::run(&a.host, a.listen, a.telemetry).await };
    // The guest is built without io_uring (`Transport::choose` refuses it there).
    let _ = transport;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = tokio::task::LocalSet::new().block_on(&runtime, run);
    Ok(done?)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let exe = args.first().cloned().unwrap_or_else(|| "/init".into());
    if std::process::id() == 1 {
        prescient_agent::guest::init(&exe, &args[1..]);
    }
    match args.get(1).map(String::as_str) {
        Some("worker") => match worker(&args[2..]) {
            Ok(()) => {
                tracing::info!("worker done");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("prescient-guest worker: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!(
                "prescient-guest: the microVM guest's init (PID 1) and worker; not for direct use"
            );
            ExitCode::FAILURE
        }
    }
}
