//! The demo's microVM step: an agent with the `qemu` provisioner joins the cluster; a task
//! placed on it runs in a QEMU microVM booted from the guest image, serves an invocation, and
//! once that shape's snapshot is saved the next VM of the shape is restored instead of booted.
//! A graph asking for a warm VM (`warm_vms = 1`) has the agent keep one booted and idle, and
//! the next replica of that shape takes it without a boot. The events say how each VM started
//! and how long it took.

use crate::client::{ControlClient, SubmitOutcome};
use crate::local::wait_deployed;
use crate::output;
use anyhow::{bail, Result};
use prescient::launch::{self, Binaries, AGENT_READY};
use prescient_schemas::file;
use std::path::Path;
use std::time::{Duration, Instant};

fn graph(name: &str, scaling: &str) -> String {
    format!(
        r#"
name = "{name}"
[[task]]
id = "digest"
code = {{ builtin = "sha256" }}
inputs = {{ x = "bytes" }}
outputs = {{ d = "bytes" }}
estimate = "100us"
resources = {{ cpu = "1", memory = "128MiB" }}
{scaling}"#
    )
}

/// Waits (90 s at most) until the agent's `log` says `what` `n` times.
pub(crate) async fn wait_log(log: &Path, what: &str, n: usize) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(90);
    while std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(what)
        .count()
        < n
    {
        if Instant::now() > until {
            bail!("the agent never said {what:?} (see {})", log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub async fn microvms(client: &ControlClient, control: &str, dir: &Path) -> Result<()> {
    let exe = std::env::current_exe()?;
    let Some(image) = prescient_agent::provision::qemu::find_image(&exe) else {
        println!(
            "skipped: no guest image (run `cargo xtask guest-image`; `cargo xtask demo` does)"
        );
        return Ok(());
    };
    // The most CPU of any agent, so spread placement puts the step's tasks on it.
    let mut cmd = Binaries::siblings()?.agent(control, "vm1", 16);
    cmd.args(["--provisioner", "qemu", "--no-probes", "--memory", "8GiB"])
        .arg("--guest-image")
        .arg(&image)
        .arg("--data-dir")
        .arg(dir.join("vm1"));
    let agent = launch::start(cmd, &dir.join("vm1.log"), AGENT_READY, "vm1")?;
    let until = Instant::now() + Duration::from_secs(30);
    let provisioner = loop {
        let agents = client.agents().await?;
        if let Some(a) = agents.iter().find(|a| a.name == "vm1") {
            break a.provisioner.clone();
        }
        if Instant::now() > until {
            bail!("the VM agent did not register");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("agent vm1 joined with the {provisioner} provisioner (KVM where a probe guest boots under it, else TCG)");
    let mut seen = client.events(0, 100_000).await?.last().map_or(0, |e| e.seq);
    let mut ids = Vec::new();
    let log = dir.join("vm1.log");
    let steps = [
        ("vm-digest", ""),
        ("vm-digest-2", ""),
        ("vm-warm", "[scaling]\nmax_replicas = 2\nwarm_vms = 1\n"),
        ("vm-digest-3", ""),
    ];
    for (i, (name, scaling)) in steps.iter().enumerate() {
        if i == 1 {
            // The first VM of a shape is saved as a snapshot once up; wait for it.
            wait_log(&log, "VM snapshot saved", 1).await?;
            println!(
                "vm1 saved a snapshot of a booted, idle guest of that shape (1 vCPU, 224 MiB)"
            );
        }
        if i == 3 {
            wait_log(&log, "warm VM booted and idle", 1).await?;
            // Its next heartbeat tells the control node.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            println!("vm1 keeps a booted, idle VM of that shape for vm-warm; the next replica of the shape takes it:");
        }
        let f = file::parse(&format!("{name}.toml"), &graph(name, scaling))?;
        let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
            bail!("the microVM example was rejected");
        };
        wait_deployed(client, &record.id, 1, Duration::from_secs(120)).await?;
        for e in client.events(seen, 100_000).await? {
            seen = e.seq;
            if matches!(
                e.kind.as_str(),
                "replica-ready" | "replica-placed" | "warm-pool"
            ) {
                output::print_event(&e, false)?;
            }
        }
        let conn = prescient_agent::dataplane::IngressConn::connect(&agent.addr).await?;
        let started = Instant::now();
        let out = conn
            .invoke(
                &record.id,
                vec![(
                    String::new(),
                    bytes::Bytes::from(format!("hello from {name}")),
                )],
                10_000,
            )
            .await
            .map_err(anyhow::Error::msg)?;
        for (k, v) in out {
            println!(
                "{name} {k} = {}  ({} us, through vm1's ingress and the VM)",
                output::bytes_text(&v),
                started.elapsed().as_micros()
            );
        }
        ids.push(record.id);
    }
    for id in &ids {
        client.remove(id).await?;
    }
    // The VMs drain, their guests power off; then the agent goes.
    let until = Instant::now() + Duration::from_secs(30);
    for id in &ids {
        while client.replicas(id).await.is_ok_and(|(_, r)| !r.is_empty()) && Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop(agent);
    println!("removed the graphs: each VM drained, powered off and exited; vm1 stopped");
    Ok(())
}
