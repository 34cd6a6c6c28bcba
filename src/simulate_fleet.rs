//! `prescient simulate --hosts N` (or `--graph`, or a scenario file): the whole-cluster
//! simulation, the control node's own plan, monitor and replica choice in virtual time.

use anyhow::{bail, Context, Result};
use prescient_sim::cluster::{self, Mode};
use prescient_sim::fleet::{self, Dist, ScenarioFile, Service};
use std::path::{Path, PathBuf};

/// What the command line asked of a whole-cluster run.
pub struct FleetArgs<'a> {
    pub trace: Option<&'a str>,
    pub graph: Option<&'a Path>,
    pub scenario: Option<&'a Path>,
    pub hosts: Option<usize>,
    pub top: Option<usize>,
    pub policies: &'a [String],
    pub leads: &'a [f64],
    pub seed: u64,
    /// Simulate the whole trace, not only the measured third and the 600 s before it.
    pub whole: bool,
}

const AZURE: &str = "azure_functions_2019_invitro_sample/1350_inv.csv";
const NASA: &str = "nasa_http_1995/workload_per_second.tbz2";
const TWITTER: &str = "twitter_stream_2021_08/workload_per_second.tbz2";
const WARMUP_S: f64 = 600.0;

fn shared(file: &str) -> Result<PathBuf> {
    crate::demo::traces_dir_holding(file)
        .map(|d| d.join(file))
        .with_context(|| {
            format!("no ../shared/traces/{file} found (set PRESCIENT_TRACES or pass a file)")
        })
}

/// The services of the run and the trace's length in seconds.
fn services(a: &FleetArgs<'_>, file: &ScenarioFile) -> Result<(Vec<Service>, f64, String)> {
    let trace = a.trace.unwrap_or("azure-functions");
    let path = Path::new(trace);
    let azure = trace == "azure-functions"
        || path.join("1350_inv.csv").exists()
        || trace.ends_with("_inv.csv");
    if azure {
        if a.graph.is_some() {
            bail!("--graph with the Azure Functions trace: every function is its own one-task graph there");
        }
        let csv = if trace == "azure-functions" {
            shared(AZURE)?
        } else {
            path.to_path_buf()
        };
        let dir = if csv.is_dir() {
            csv
        } else {
            csv.parent().map(PathBuf::from).unwrap_or_default()
        };
        let functions = prescient_sim::trace::azure_functions(&dir)?;
        let n = a.top.unwrap_or(functions.len());
        let top = prescient_sim::azure::busiest(&functions, n);
        let len = top.iter().map(|f| f.per_minute.len()).max().unwrap_or(0) as f64 * 60.0;
        let what = format!(
            "the {} busiest of {} Azure functions, one graph each",
            top.len(),
            functions.len()
        );
        return Ok((
            prescient_sim::azure::fleet_services(&top, a.seed),
            len,
            what,
        ));
    }
    let counts_path = match trace {
        "nasa" => shared(NASA)?,
        "twitter" => shared(TWITTER)?,
        "alibaba" | "azure-llm-code" | "azure-llm-conv" => bail!(
            "--trace {trace}: the whole-cluster simulation reads azure-functions, nasa, twitter or a per-second counts file so far (the LLM traces run as `--scenario azure-llm-code`)"
        ),
        _ => path.to_path_buf(),
    };
    let counts = prescient_sim::trace::per_second_counts(&counts_path)?;
    let rng = prescient_policy::balance::Rng::new(a.seed);
    let arrivals = fleet::arrivals_from_counts(&counts, &rng);
    let (record, what) = match a.graph {
        Some(g) => {
            // Every problem is printed with its file position, as `prescient validate` does.
            let Some(f) = crate::load(g)? else {
                bail!("{} is not a valid graph", g.display());
            };
            let mut graph = f.graph;
            graph.scaling.get_or_insert_with(Default::default);
            let record = fleet::record("g1", graph);
            (
                record,
                format!("graph {} on {}", g.display(), counts_path.display()),
            )
        }
        None => (
            fleet::one_task_graph("g1", 2.0),
            format!("one 2 s service on {}", counts_path.display()),
        ),
    };
    let service: Vec<Dist> = record
        .graph
        .tasks
        .iter()
        .map(|t| {
            let mean = t.estimated_execution_time_ns as f64 / 1e9;
            match file.service {
                Some(Dist::Exponential { .. }) => Dist::Exponential { mean },
                Some(Dist::LogNormal { sigma, .. }) => Dist::LogNormal {
                    median: mean,
                    sigma,
                },
                _ => Dist::Fixed(mean),
            }
        })
        .collect();
    let objective_s = record
        .graph
        .objective
        .map(|o| o.target_ns as f64 / 1e9)
        .unwrap_or_else(|| 2.0 * service.iter().map(Dist::mean).sum::<f64>());
    let len = counts.len() as f64;
    Ok((
        vec![Service {
            record,
            arrivals,
            service,
            objective_s,
        }],
        len,
        what,
    ))
}

/// Runs every policy at every lead time; the JSON rows and a line each on stderr.
pub fn run(a: &FleetArgs<'_>) -> Result<Vec<serde_json::Value>> {
    let file = match a.scenario {
        Some(p) => ScenarioFile::read(p)?,
        None => ScenarioFile::default(),
    };
    let n_hosts = a.hosts.or(file.hosts).unwrap_or(100);
    let hosts = fleet::hosts(
        n_hosts,
        file.host_cpus.unwrap_or(16),
        file.host_memory_gib.unwrap_or(64),
    );
    for f in &file.faults {
        let (prescient_sim::fleet::Fault::Slow { host, .. }
        | prescient_sim::fleet::Fault::Dies { host, .. }) = f;
        if !hosts.iter().any(|h| h.name == *host) {
            bail!("scenario fault on {host:?}: the hosts are h1..h{n_hosts}");
        }
    }
    let (services, len_s, what) = services(a, &file)?;
    let modes: Vec<(Mode, &str)> = a
        .policies
        .iter()
        .map(|p| match p.as_str() {
            "reactive" | "prescient" => Ok((Mode::Reactive, "reactive")),
            "oracle" => Ok((Mode::Oracle, "oracle")),
            "kpa" => bail!("--policy kpa: Knative's KPA runs in the one-service scenarios (--scenario kpa-nasa, azure-top20, ...); the cluster runs Prescient's controller"),
            _ => bail!("--policy {p:?}: expected reactive or oracle"),
        })
        .collect::<Result<_>>()?;
    let leads: Vec<Dist> = if a.leads.is_empty() {
        vec![file.lead.unwrap_or(Dist::Fixed(30.0))]
    } else {
        a.leads.iter().map(|l| Dist::Fixed(*l)).collect()
    };
    let measure_from_s = (len_s * 2.0 / 3.0).floor();
    let start_s = if a.whole {
        0.0
    } else {
        (measure_from_s - WARMUP_S).max(0.0)
    };
    let invocations: usize = services.iter().map(|s| s.arrivals.len()).sum();
    eprintln!(
        "cluster: {what}, {invocations} invocations over {len_s:.0} s on {n_hosts} hosts; simulating from {start_s:.0} s, measuring from {measure_from_s:.0} s"
    );
    let mut rows = Vec::new();
    for (mode, name) in &modes {
        for lead in &leads {
            let p = cluster::Params {
                tick_s: 2.0,
                lead: *lead,
                warmup_s: file.warmup_s.unwrap_or(0.0),
                boot_failure: file.boot_failure.unwrap_or(0.0),
                faults: file.faults.clone(),
                mode: *mode,
                start_s,
                measure_from_s,
                end_s: len_s,
                seed: a.seed,
                progress: true,
            };
            let started = std::time::Instant::now();
            let o = cluster::run(&hosts, &services, &p);
            let wall = started.elapsed().as_secs_f64();
            let q = |x: f64| (o.latency_us.value_at_quantile(x) as f64 / 1e3).round() / 1e3;
            let pct = 100.0 * o.within_objective as f64 / o.requests.max(1) as f64;
            let actions: u64 = ["place", "scale-in", "shed"]
                .iter()
                .filter_map(|k| o.decisions.get(k))
                .sum();
            eprintln!(
                "  {name} L={:.0}s: {pct:.2}% within objective, {} cold, {} failed, p99 {:.2} s, {:.0} VM-s, {} passes in {wall:.1} s",
                lead.mean(),
                o.cold,
                o.failed,
                q(0.99),
                o.vm_seconds,
                o.passes
            );
            rows.push(serde_json::json!({
                "policy": name,
                "lead_s": lead.mean(),
                "lead": format!("{lead:?}"),
                "requests": o.requests,
                "within_objective_pct": (pct * 1000.0).round() / 1000.0,
                "cold": o.cold,
                "failed": o.failed,
                "p50_s": q(0.5),
                "p99_s": q(0.99),
                "vm_seconds": o.vm_seconds.round(),
                "actions": actions,
                "decisions": o.decisions,
                "max_replicas": o.max_replicas,
                "passes": o.passes,
                "hosts": n_hosts,
                "graphs": services.len(),
                "run_wall_s": (wall * 100.0).round() / 100.0,
                "minutes": o.minutes,
            }));
        }
    }
    Ok(rows)
}
