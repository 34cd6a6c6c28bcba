//! `prescient simulate`: policies in virtual time on a real trace, as JSON or a table.

use anyhow::{bail, Context, Result};
use prescient_sim::kpa_nasa::{self, Policy};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The NASA per-second trace, relative to a `shared/traces` directory.
const NASA: &str = "nasa_http_1995/workload_per_second.tbz2";
/// The Azure Functions sample.
const AZURE: &str = "azure_functions_2019_invitro_sample/1350_inv.csv";

/// Peak resident memory of this process (MiB), from `/proc/self/status`.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

/// `prescient simulate`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A reference scenario by name, or a scenario file (TOML: hosts, lead, warmup_s,
    /// boot_failure, service, [[fault]]s) for the whole-cluster simulation.
    #[arg(long)]
    pub scenario: Option<String>,
    /// Policies, comma-separated: reactive (KPA in the reference scenarios, Prescient's
    /// controller on the cluster), prescient (its sizing alone, reference scenarios),
    /// oracle; all (the default).
    #[arg(long = "policy", value_delimiter = ',')]
    pub policies: Vec<String>,
    /// Lead times from placement to ready, seconds, comma-separated (default 2,30,120;
    /// on the cluster, the scenario file's lead or 30).
    #[arg(long = "lead", value_delimiter = ',')]
    pub leads: Vec<f64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Reference scenarios: replicas predictive provisioning keeps warm at least, per service
    /// (a minimum pool, for on/off services).
    #[arg(long, default_value_t = 0)]
    pub warm_pool: u32,
    /// The trace: azure-functions, nasa, twitter, or a file (reference scenarios: its file).
    #[arg(long)]
    pub trace: Option<String>,
    /// A graph file the trace's invocations enter (whole cluster; default one 2 s task).
    #[arg(long)]
    pub graph: Option<PathBuf>,
    /// Simulated hosts (whole cluster; default the scenario file's, or 100).
    #[arg(long)]
    pub hosts: Option<usize>,
    /// Only the N busiest Azure functions (whole cluster).
    #[arg(long)]
    pub top: Option<usize>,
    /// Simulate the whole trace, not just the measured last third and the 600 s before.
    #[arg(long)]
    pub whole: bool,
    /// Draw load, replicas and attainment per minute into this PNG (whole cluster).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

const REFERENCE: [&str; 5] = [
    "kpa-nasa",
    "azure-top20",
    "azure-functions",
    "azure-llm-code",
    "azure-llm-conv",
];

pub fn run(a: &Args, json: bool) -> Result<ExitCode> {
    let reference = a.scenario.as_deref().filter(|s| REFERENCE.contains(s));
    let Some(scenario) = reference.filter(|_| a.hosts.is_none() && a.graph.is_none()) else {
        if a.warm_pool > 0 {
            bail!("--warm-pool is for the reference scenarios' predictive policy; on the whole cluster set min_replicas in the graph's [scaling]");
        }
        return cluster(a, json);
    };
    if a.plot.is_some() {
        bail!("--plot draws the whole-cluster simulation's minutes (--trace with --hosts or --graph), not the reference scenarios");
    }
    let policies: Vec<String> = if a.policies.is_empty() || a.policies == ["all"] {
        ["reactive", "prescient", "predictive", "oracle"]
            .map(String::from)
            .to_vec()
    } else {
        a.policies.clone()
    };
    let leads: Vec<f64> = if a.leads.is_empty() {
        vec![2.0, 30.0, 120.0]
    } else {
        a.leads.clone()
    };
    let (leads, seed, trace) = (&leads, a.seed, a.trace.as_ref().map(PathBuf::from));
    let llm = match scenario {
        "azure-llm-code" => Some("azure_llm_2023/AzureLLMInferenceTrace_code.csv"),
        "azure-llm-conv" => Some("azure_llm_2023/AzureLLMInferenceTrace_conv.csv"),
        _ => None,
    };
    let policies: Vec<Policy> = policies
        .iter()
        .map(|p| {
            Policy::parse(p)
                .map(|p| match p {
                    Policy::Predictive(_) => Policy::Predictive(a.warm_pool),
                    other => other,
                })
                .with_context(|| {
                    format!("--policy {p:?}: expected reactive, prescient, predictive or oracle")
                })
        })
        .collect::<Result<_>>()?;
    if let Some(l) = leads.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
        bail!("--lead {l}: lead times are non-negative seconds");
    }
    let started = std::time::Instant::now();
    let mut runs = Vec::new();
    let show = |r: &prescient_sim::kpa_nasa::Run| {
        eprintln!(
            "  {} L={}s: {:.2}% within objective, {} cold, p99 {:.2} s, {:.0} VM-s",
            r.policy, r.lead_s, r.within_objective_pct, r.cold, r.p99_s, r.vm_seconds
        );
    };
    if let Some(file) = llm {
        let path = match trace {
            Some(p) => p,
            None => crate::demo::traces_dir_holding(file)
                .map(|d| d.join(file))
                .with_context(|| {
                    format!(
                        "no ../shared/traces/{file} found (set PRESCIENT_TRACES or pass --trace)"
                    )
                })?,
        };
        let requests = prescient_sim::trace::azure_llm(&path)?;
        eprintln!(
            "{scenario}: {} requests over {:.0} s of {}; service modelled from tokens; measuring the last third",
            requests.len(),
            requests.last().map_or(0.0, |r| r.at_s),
            path.display()
        );
        for p in &policies {
            for l in leads {
                let r = prescient_sim::llm::run(&requests, *p, *l, seed);
                show(&r);
                runs.push(r);
            }
        }
    } else if scenario.starts_with("azure-") {
        let path = match trace {
            Some(p) => p,
            None => crate::demo::traces_dir_holding(AZURE)
                .map(|d| d.join(AZURE))
                .context("no ../shared/traces/azure_functions_2019_invitro_sample found (set PRESCIENT_TRACES or pass --trace DIR)")?,
        };
        let dir = if path.is_dir() {
            path
        } else {
            path.parent().map(PathBuf::from).unwrap_or_default()
        };
        let functions = prescient_sim::trace::azure_functions(&dir)?;
        let n = if scenario == "azure-top20" {
            20
        } else {
            functions.len()
        };
        let top = prescient_sim::azure::busiest(&functions, n);
        eprintln!(
            "{scenario}: the {n} busiest of {} functions ({} invocations in the day); measuring the last third",
            functions.len(),
            top.iter().flat_map(|f| &f.per_minute).map(|c| u64::from(*c)).sum::<u64>()
        );
        for p in &policies {
            for l in leads {
                let r = prescient_sim::azure::run(&top, *p, *l, seed);
                show(&r);
                runs.push(r);
            }
        }
    } else {
        let path = match trace {
            Some(p) => p,
            None => crate::demo::traces_dir_holding(NASA)
                .map(|d| d.join(NASA))
                .context("no ../shared/traces/nasa_http_1995 found (set PRESCIENT_TRACES or pass --trace)")?,
        };
        let counts = prescient_sim::trace::per_second_counts(&path)?;
        eprintln!(
            "kpa-nasa: {} seconds of {}, × {} ({} requests); measuring the last third",
            counts.len(),
            path.display(),
            kpa_nasa::SCALE,
            counts.iter().map(|c| u64::from(*c)).sum::<u64>() * u64::from(kpa_nasa::SCALE)
        );
        for p in &policies {
            for l in leads {
                let r = kpa_nasa::run(&counts, *p, *l, seed);
                show(&r);
                runs.push(r);
            }
        }
    }
    report(
        scenario,
        seed,
        runs.iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?,
        started,
        json,
    )
}

/// The whole-cluster simulation (see [`crate::simulate_fleet`]).
fn cluster(a: &Args, json: bool) -> Result<ExitCode> {
    if a.scenario.is_none() && a.hosts.is_none() && a.graph.is_none() && a.trace.is_none() {
        bail!("say what to simulate: --scenario NAME|FILE, or --trace (and --hosts, --graph) for the whole cluster");
    }
    if let Some(l) = a.leads.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
        bail!("--lead {l}: lead times are non-negative seconds");
    }
    if let Some(s) = a.scenario.as_deref() {
        if !Path::new(s).is_file() {
            bail!(
                "--scenario {s:?}: neither a reference scenario ({}) nor a scenario file",
                REFERENCE.join(", ")
            );
        }
    }
    let policies: Vec<String> = if a.policies.is_empty() || a.policies == ["all"] {
        ["reactive", "oracle"].map(String::from).to_vec()
    } else {
        a.policies.clone()
    };
    let started = std::time::Instant::now();
    let rows = crate::simulate_fleet::run(&crate::simulate_fleet::FleetArgs {
        trace: a.trace.as_deref(),
        graph: a.graph.as_deref(),
        scenario: a.scenario.as_deref().map(Path::new),
        hosts: a.hosts,
        top: a.top,
        policies: &policies,
        leads: &a.leads,
        seed: a.seed,
        whole: a.whole,
    })?;
    if let Some(path) = &a.plot {
        crate::plot::simulation(path, a.trace.as_deref().unwrap_or("azure-functions"), &rows)?;
        eprintln!("plot: {}", path.display());
    }
    report(
        a.scenario.as_deref().unwrap_or("cluster"),
        a.seed,
        rows,
        started,
        json,
    )
}

fn report(
    scenario: &str,
    seed: u64,
    runs: Vec<serde_json::Value>,
    started: std::time::Instant,
    json: bool,
) -> Result<ExitCode> {
    let report = serde_json::json!({
        "scenario": scenario,
        "seed": seed,
        "runs": runs,
        "wall_s": (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        "peak_rss_mib": peak_rss_mib(),
    });
    if json {
        crate::output::print_json(&report)?;
    } else {
        println!("POLICY    LEAD   REQUESTS   WITHIN OBJ   COLD       P50     P99     VM-SECONDS  ACTIONS");
        for r in &runs {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            println!(
                "{:<9} {:>4}s  {:>9}  {:>9.2}%  {:>9}  {:>6.2}s {:>6.2}s  {:>10.0}  {:>7}",
                r["policy"].as_str().unwrap_or(""),
                f("lead_s"),
                f("requests"),
                f("within_objective_pct"),
                f("cold"),
                f("p50_s"),
                f("p99_s"),
                f("vm_seconds"),
                f("actions")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
