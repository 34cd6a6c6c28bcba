//! The demo's replication step: a 3-stage CPU-bound chain with a p99 objective under steady
//! load; midway its middle stage's host is slowed (its workers' cgroup CPU quota cut to a
//! fifth); the controller's events print as they happen, and the chain's p99 before, during
//! and after.

use crate::bench::replication::{graph, slow_host};
use crate::client::{ControlClient, SubmitOutcome};
use crate::local::{wait_deployed, LocalCluster};
use crate::{load, output};
use anyhow::{bail, Result};
use prescient_schemas::file;
use std::time::{Duration, Instant};

/// Seconds of load per printed p99.
const SEGMENT_S: f64 = 2.0;
/// Invocations per second: each stage is then 12% of a core busy, half its 250m quota; slowed,
/// it gets 50m.
const RATE: f64 = 40.0;

pub async fn slowed_host(client: &ControlClient, cluster: &LocalCluster) -> Result<()> {
    // The earlier steps' graphs go first, so the hosts have room to replicate onto.
    let earlier = client.list().await?;
    for g in &earlier {
        client.remove(&g.id).await?;
    }
    let until = Instant::now() + Duration::from_secs(15);
    for g in &earlier {
        while client
            .replicas(&g.id)
            .await
            .is_ok_and(|(_, r)| !r.is_empty())
            && Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "removed the earlier graphs ({}) to make room",
        earlier
            .iter()
            .map(|g| g.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let f = file::parse("replicated-chain.toml", &graph(3000, "250m"))?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the replication example was rejected");
    };
    let id = record.id.clone();
    wait_deployed(client, &id, 3, Duration::from_secs(30)).await?;
    let (_, replicas) = client.replicas(&id).await?;
    let Some(victim) = replicas.iter().find(|r| r.task == "s2") else {
        bail!("no replica of s2");
    };
    let host = victim.host.clone();
    println!(
        "{id}: s1 -> s2 -> s3, 3 ms of CPU each, p99 objective 60 ms, {RATE} invocations/s; \
         s2 runs on {host}, which is slowed after 6 s"
    );
    let spec = || load::Spec {
        graph: id.clone(),
        mode: load::Mode::Open { rate: RATE },
        duration: Duration::from_secs_f64(SEGMENT_S),
        payload: bytes::Bytes::from_static(b"x"),
        deadline_ms: 30_000,
        ingresses: cluster.agents.iter().map(|a| a.addr.clone()).collect(),
        objective_us: Some(60_000),
    };
    let mut seen = client.events(0, 100_000).await?.last().map_or(0, |e| e.seq);
    let started = Instant::now();
    let (mut before, mut during, mut after) = (Vec::new(), Vec::new(), Vec::new());
    let (mut slow, mut shed_at, mut failed) = (None, None, 0);
    for i in 0..40 {
        if i == 3 {
            println!(
                "  +{:>4.1}s {host} slowed: its workers' CPU quota cut to 20%",
                started.elapsed().as_secs_f64()
            );
            slow = Some(slow_host(
                cluster.control.addr.clone(),
                id.clone(),
                host.clone(),
                0.2,
            ));
        }
        let r = load::run(spec(), false).await?;
        failed += r.errors;
        println!(
            "  +{:>4.1}s chain p99 {:>6.1} ms over the last {SEGMENT_S} s",
            started.elapsed().as_secs_f64(),
            r.p99_us as f64 / 1000.0
        );
        for e in client.events(seen, 1000).await? {
            seen = e.seq;
            if output::DECISIONS.contains(&e.kind.as_str()) {
                print!("  +{:>4.1}s ", started.elapsed().as_secs_f64());
                output::print_event(&e, false)?;
                if e.kind == "shed" && shed_at.is_none() {
                    shed_at = Some(i);
                }
            }
        }
        match (slow.is_some(), shed_at) {
            (false, _) => before.push(r.p99_us),
            (true, None) => during.push(r.p99_us),
            (true, Some(at)) if i > at => after.push(r.p99_us),
            _ => during.push(r.p99_us),
        }
        if after.len() >= 4 {
            break;
        }
    }
    if let Some(s) = slow {
        s.abort();
    }
    let worst = |v: &[u64]| v.iter().max().map_or(0.0, |u| *u as f64 / 1000.0);
    let median = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.get(v.len() / 2).map_or(0.0, |u| *u as f64 / 1000.0)
    };
    println!(
        "{id}: chain p99 before {:.1} ms (median of {SEGMENT_S} s segments), during {:.1} ms \
         (the worst), after the shed {:.1} ms (median); {failed} failed",
        median(&before),
        worst(&during),
        median(&after)
    );
    client.remove(&id).await?;
    Ok(())
}
