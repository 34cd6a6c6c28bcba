//! The demo's predictive step: a graph under `[scaling.predictive] mode = "on"` fed a real
//! trace slice with a ramp (time-compressed), the control node's forecast and plan sampled as
//! it runs, replicas ordered ahead of the load with the plan's reason, and a PNG of load,
//! forecast and replicas over time.

use crate::client::{ControlClient, SubmitOutcome};
use crate::local::{wait_deployed, LocalCluster};
use crate::{load, output};
use anyhow::{bail, Result};
use prescient_schemas::file;
use std::path::Path;
use std::time::{Duration, Instant};

/// One `sleep` task of `service_ms` serving one execution at a time, under
/// `[scaling.predictive]` in `mode` (99.9% to start within the execution time, 30 s assumed
/// until a lead time is measured): the demo's graph and `bench predictive`'s.
pub(crate) fn graph(name: &str, mode: &str, service_ms: u64, max_replicas: u32) -> String {
    format!(
        r#"name = "{name}"
[[task]]
id = "work"
code = {{ builtin = "sleep", params = {{ mean = "{service_ms}ms" }} }}
inputs = {{ x = "bytes" }}
outputs = {{ y = "bytes" }}
estimate = "{service_ms}ms"

[scaling]
max_replicas = {max_replicas}
window = "4s"
scale_out_cooldown = "2s"
scale_in_cooldown = "30s"
[scaling.predictive]
mode = "{mode}"
attainment = 0.999
lead = "30s"
"#
    )
}

const TRACE: &str = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv";
const REPLAY: Duration = Duration::from_secs(45);

/// The Azure LLM conversation trace's arrivals, `speedup` times faster, for `replay`, thinned
/// by a ramp from 10% to all of them over it, so the load grows as a real one does; a
/// synthetic 60/s, ramped the same way, without the traces.
pub(crate) fn ramped(replay: Duration, speedup: f64) -> Result<(String, Vec<Duration>)> {
    let (what, all) = match crate::demo::traces_dir_holding(TRACE) {
        Some(d) => {
            let path = d.join(TRACE);
            let arrivals = load::read_trace(&path, speedup, replay)?;
            (format!("{}, {speedup}x faster", path.display()), arrivals)
        }
        None => {
            let n = (60.0 * replay.as_secs_f64()) as u32;
            let all = (0..n)
                .map(|i| Duration::from_secs_f64(f64::from(i) / 60.0))
                .collect();
            (
                "a synthetic 60/s (shared/traces not found: set PRESCIENT_TRACES)".to_string(),
                all,
            )
        }
    };
    let span = replay.as_secs_f64();
    // A deterministic thinning: the i-th arrival kept while its hash is under the ramp.
    let kept = all
        .into_iter()
        .enumerate()
        .filter(|(i, at)| {
            let share = 0.1 + 0.9 * (at.as_secs_f64() / span).min(1.0);
            let h = (*i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
            (h as f64 / (1u64 << 53) as f64) < share
        })
        .map(|(_, at)| at)
        .collect();
    Ok((what, kept))
}

/// One sample of the graph's task: seconds into the replay, the invocations/s the replay sent
/// over the last 10 s, the forecast of the step now filling (point, q90), the plan's floor,
/// replicas.
struct Sample {
    at: f64,
    offered: f64,
    point: f64,
    upper: f64,
    floor: f64,
    replicas: f64,
}

pub async fn ramp(client: &ControlClient, cluster: &LocalCluster, dir: &Path) -> Result<()> {
    let path = dir.join("planned-sleep.toml");
    std::fs::write(&path, graph("planned-sleep", "on", 20, 12))?;
    let f = file::read(&path)?;
    let SubmitOutcome::Accepted { record, .. } = client.submit(&f.graph).await? else {
        bail!("the predictive example was rejected");
    };
    let id = record.id.clone();
    wait_deployed(client, &id, 1, Duration::from_secs(30)).await?;
    let (what, arrivals) = ramped(REPLAY, 10.0)?;
    println!(
        "{id}: a 20 ms task under [scaling.predictive] (99.9% to start within 20 ms); replaying {what} ramped from 10% to 100% over {} s: {} invocations",
        REPLAY.as_secs(),
        arrivals.len()
    );
    let mut seen = client.events(0, 100_000).await?.last().map_or(0, |e| e.seq);
    let schedule = arrivals.clone();
    let spec = load::Spec {
        graph: id.clone(),
        mode: load::Mode::Trace { arrivals },
        duration: REPLAY,
        payload: bytes::Bytes::from_static(b"x"),
        deadline_ms: 10_000,
        ingresses: cluster.agents.iter().map(|a| a.addr.clone()).collect(),
        objective_us: Some(40_000),
    };
    let replay = tokio::task::spawn_local(load::run(spec, false));
    let started = Instant::now();
    let mut samples = Vec::new();
    while !replay.is_finished() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for e in client.events(seen, 1000).await? {
            seen = e.seq;
            if e.kind.starts_with("scale") && e.subject.starts_with(&id) {
                print!("  +{:>4.1}s ", started.elapsed().as_secs_f64());
                output::print_event(&e, false)?;
            }
        }
        let now = started.elapsed();
        let from = now.saturating_sub(Duration::from_secs(10));
        let offered = schedule.iter().filter(|a| **a > from && **a <= now).count() as f64
            / now.min(Duration::from_secs(10)).as_secs_f64().max(1.0);
        let (_, tasks) = client.forecast(&id).await?;
        let Some(t) = tasks.first() else {
            continue;
        };
        let n = |k: &str| t[k].as_f64().unwrap_or(0.0);
        // The step now filling: the first one not over.
        let i = ((n("first_step_ago_s") / n("step_s").max(1.0)).floor() as usize).min(1);
        let at = |k: &str| t[k][i].as_f64().unwrap_or(0.0);
        samples.push(Sample {
            at: started.elapsed().as_secs_f64(),
            offered,
            point: at("point"),
            upper: at("upper"),
            floor: n("floor"),
            replicas: n("ready") + n("provisioning"),
        });
    }
    let report = replay.await??;
    println!(
        "{id}: {} invocations, {} failed, p50 {} us, p99 {} us, {:.1}% within 40 ms; the plan's lead time is the measured one ({} of process workers here, not the 30 s assumed)",
        report.sent,
        report.errors,
        report.p50_us,
        report.p99_us,
        report.within_objective.unwrap_or(0.0) * 100.0,
        client
            .forecast(&id)
            .await?
            .1
            .first()
            .map_or("none".into(), |t| format!("{:.2} s", t["lead_s"].as_f64().unwrap_or(0.0)))
    );
    println!(
        "(a series seen for under a minute, with no stored history: the forecast trails this ramp; the stored per-minute history seeds it once there is some)"
    );
    let png = dir.join("predictive.png");
    match plot(&png, &id, &samples) {
        Ok(()) => println!("load, forecast and replicas over time: {}", png.display()),
        Err(e) => println!("(no plot: {e})"),
    }
    Ok(())
}

fn plot(path: &Path, id: &str, samples: &[Sample]) -> Result<()> {
    use crate::plot::{Panel, Series};
    let line = |label: &str, f: fn(&Sample) -> f64| Series {
        label: label.into(),
        points: samples.iter().map(|s| (s.at, f(s))).collect(),
    };
    crate::plot::write(
        path,
        "seconds into the replay",
        &[
            Panel {
                title: format!("{id}: invocations per second, sent and forecast"),
                y: "per second".into(),
                series: vec![
                    line("sent by the replay (last 10 s)", |s| s.offered),
                    line("forecast of the step now", |s| s.point),
                    line("its q90", |s| s.upper),
                ],
            },
            Panel {
                title: format!("{id}: replicas the plan holds, and held"),
                y: "replicas".into(),
                series: vec![
                    line("the plan's floor", |s| s.floor),
                    line("held (ready + provisioning)", |s| s.replicas),
                ],
            },
        ],
    )
}
