//! What a whole-cluster run is made of: hosts, services (a graph, its arrivals, its tasks'
//! service times), the lead time of a replica, faults, and the scenario file that sets them.

use prescient_policy::balance::Rng;
use prescient_policy::snapshot::Capacity;
use prescient_schemas::GraphRecord;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A simulated host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSpec {
    pub name: String,
    pub capacity: Capacity,
}

/// One graph under load.
#[derive(Debug, Clone)]
pub struct Service {
    pub record: GraphRecord,
    /// When invocations enter, ns since the origin, sorted.
    pub arrivals: Vec<u64>,
    /// Per task, in the order of `record.graph.tasks`.
    pub service: Vec<Dist>,
    /// An invocation is within objective when it completes within this (s).
    pub objective_s: f64,
}

/// A distribution of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Dist {
    Fixed(f64),
    Exponential { mean: f64 },
    Uniform { min: f64, max: f64 },
    LogNormal { median: f64, sigma: f64 },
}

impl Dist {
    /// A draw, in seconds (never negative).
    pub fn draw(&self, rng: &Rng) -> f64 {
        let x = match *self {
            Dist::Fixed(x) => x,
            Dist::Exponential { mean } => -mean * (1.0 - rng.unit()).max(1e-300).ln(),
            Dist::Uniform { min, max } => min + (max - min) * rng.unit(),
            Dist::LogNormal { median, sigma } => median * (sigma * rng.normal()).exp(),
        };
        x.max(0.0)
    }

    pub fn mean(&self) -> f64 {
        match *self {
            Dist::Fixed(x) => x,
            Dist::Exponential { mean } => mean,
            Dist::Uniform { min, max } => (min + max) / 2.0,
            Dist::LogNormal { median, sigma } => median * (sigma * sigma / 2.0).exp(),
        }
    }

    fn check(&self) -> Result<(), String> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        let fine = match *self {
            Dist::Fixed(x) => ok(x),
            Dist::Exponential { mean } => ok(mean),
            Dist::Uniform { min, max } => ok(min) && ok(max) && min <= max,
            Dist::LogNormal { median, sigma } => ok(median) && ok(sigma),
        };
        if fine {
            Ok(())
        } else {
            Err(format!(
                "{self:?} is not a distribution of non-negative seconds"
            ))
        }
    }
}

/// Something that goes wrong during a run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Executions starting on `host` from `from_s` to `to_s` take `factor` times as long (a
    /// noisy neighbour; the host reports the stolen share, as a VM host's steal).
    Slow {
        host: String,
        factor: f64,
        from_s: f64,
        to_s: f64,
    },
    /// `host` stops at `at_s`: its replicas and what they hold are gone, its heartbeats stop.
    Dies { host: String, at_s: f64 },
}

/// The scenario file (TOML): everything optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub hosts: Option<usize>,
    pub host_cpus: Option<u32>,
    pub host_memory_gib: Option<u64>,
    /// From placement to the replica's worker serving (provision + deploy), seconds.
    pub lead: Option<Dist>,
    /// Warm-up after that, before the replica says it is ready.
    pub warmup_s: Option<f64>,
    /// Each replica's provisioning fails with this probability.
    pub boot_failure: Option<f64>,
    /// The tasks' service time, where the trace does not give one.
    pub service: Option<Dist>,
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
}

#[derive(Debug, Error)]
pub enum ScenarioError {
    #[error("reading scenario {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scenario {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ScenarioFile {
    pub fn read(path: &Path) -> Result<ScenarioFile, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        ScenarioFile::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<ScenarioFile, ScenarioError> {
        let invalid = |message: String| ScenarioError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let f: ScenarioFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for d in [f.lead, f.service].into_iter().flatten() {
            d.check().map_err(invalid)?;
        }
        if let Some(p) = f.boot_failure.filter(|p| !(0.0..1.0).contains(p)) {
            return Err(invalid(format!(
                "boot_failure = {p}: a probability below 1"
            )));
        }
        if let Some(w) = f.warmup_s.filter(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(invalid(format!("warmup_s = {w}: non-negative seconds")));
        }
        if f.hosts == Some(0) {
            return Err(invalid("hosts = 0: at least one host".into()));
        }
        for (i, fault) in f.faults.iter().enumerate() {
            let bad = match fault {
                Fault::Slow {
                    factor,
                    from_s,
                    to_s,
                    ..
                } => !(factor.is_finite() && *factor >= 1.0 && from_s <= to_s),
                Fault::Dies { at_s, .. } => !(at_s.is_finite() && *at_s >= 0.0),
            };
            if bad {
                return Err(invalid(format!(
                    "fault {} ({fault:?}): a slow-down needs factor ≥ 1 and from_s ≤ to_s, a death a time ≥ 0",
                    i + 1
                )));
            }
        }
        Ok(f)
    }
}

/// `n` hosts named `h1`..`hN`, each of `cpus` cores and `memory_gib` GiB.
pub fn hosts(n: usize, cpus: u32, memory_gib: u64) -> Vec<HostSpec> {
    (1..=n)
        .map(|i| HostSpec {
            name: format!("h{i}"),
            capacity: Capacity {
                cpu_millicores: u64::from(cpus) * 1000,
                memory_bytes: memory_gib << 30,
                gpus: 0,
                gpu_memory_bytes: 0,
                network_bits_per_sec: None,
            },
        })
        .collect()
}

/// A graph of one task `svc` taking `service_s`, sized one request at a time per replica at
/// KPA's cadence (a change every tick, 60 s before a scale-in), p99 objective `2 × service_s`
/// (a wait of at most the service time); a core and 256 MiB a replica.
pub fn one_task_graph(id: &str, service_s: f64) -> GraphRecord {
    let policy = kpa_cadence();
    let mut task = one_task(service_s);
    task.resources = prescient_schemas::Resources {
        cpu_millicores: 1000,
        memory_bytes: 256 << 20,
        ..prescient_schemas::Resources::default()
    };
    let graph = prescient_schemas::TaskGraph {
        name: id.to_string(),
        tasks: vec![task],
        edges: Vec::new(),
        objective: Some(prescient_schemas::LatencyObjective {
            percentile: 99.0,
            target_ns: (2.0 * service_s * 1e9) as u64,
        }),
        scaling: Some(policy),
    };
    record(id, graph)
}

/// Prescient's defaults at KPA's cadence for a one-request-at-a-time service: changes out
/// every tick, 60 s before a scale-in, a 10 s window, up to the schema's replica maximum.
pub fn kpa_cadence() -> prescient_schemas::ScalingPolicy {
    prescient_schemas::ScalingPolicy {
        max_replicas: prescient_schemas::scaling::MAX_REPLICAS,
        window_ns: 10 * 1_000_000_000,
        scale_out_cooldown_ns: 0,
        scale_in_cooldown_ns: 60 * 1_000_000_000,
        max_concurrency: 1,
        ..prescient_schemas::ScalingPolicy::default()
    }
}

/// The task `svc`: a builtin `sleep` expected to take `service_s`, no ports.
pub fn one_task(service_s: f64) -> prescient_schemas::Task {
    prescient_schemas::Task {
        id: "svc".into(),
        code: prescient_schemas::CodeRef {
            kind: prescient_schemas::CodeKind::Builtin {
                name: "sleep".into(),
            },
            params: Vec::new(),
        },
        inputs: Vec::new(),
        outputs: Vec::new(),
        estimated_execution_time_ns: (service_s * 1e9) as u64,
        resources: prescient_schemas::Resources::default(),
    }
}

/// Version 1 of `graph` as graph `id`.
pub fn record(id: &str, graph: prescient_schemas::TaskGraph) -> GraphRecord {
    GraphRecord {
        id: id.to_string(),
        version: 1,
        submitted_at_ms: 0,
        digest: prescient_schemas::codec::graph_digest(&graph),
        graph,
    }
}

/// Arrival times (ns) from per-second counts, uniform within each second, sorted.
pub fn arrivals_from_counts(counts: &[u32], rng: &Rng) -> Vec<u64> {
    let mut out = Vec::with_capacity(counts.iter().map(|c| *c as usize).sum());
    for (s, c) in counts.iter().enumerate() {
        let from = out.len();
        for _ in 0..*c {
            out.push(s as u64 * 1_000_000_000 + (rng.unit() * 1e9) as u64);
        }
        out[from..].sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_file_reads_and_bad_values_are_named() {
        let p = Path::new("s.toml");
        let f = ScenarioFile::parse(
            p,
            r#"
hosts = 10
lead = { log_normal = { median = 30.0, sigma = 0.3 } }
boot_failure = 0.05
[[fault]]
kind = "slow"
host = "h3"
factor = 4.0
from_s = 100.0
to_s = 200.0
[[fault]]
kind = "dies"
host = "h4"
at_s = 300.0
"#,
        )
        .unwrap();
        assert_eq!(f.hosts, Some(10));
        assert_eq!(f.faults.len(), 2);
        assert!(matches!(f.lead, Some(Dist::LogNormal { .. })));
        let e = ScenarioFile::parse(p, "boot_failure = 1.5").unwrap_err();
        assert!(e.to_string().contains("boot_failure = 1.5"), "{e}");
        let e = ScenarioFile::parse(
            p,
            "[[fault]]\nkind = \"slow\"\nhost = \"h1\"\nfactor = 0.5\nfrom_s = 1.0\nto_s = 2.0\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("fault 1"), "{e}");
        let e = ScenarioFile::parse(p, "hostz = 3").unwrap_err();
        assert!(
            e.to_string().contains("s.toml") && e.to_string().contains("hostz"),
            "{e}"
        );
    }

    #[test]
    fn draws_have_their_means() {
        let rng = Rng::new(7);
        for d in [
            Dist::Exponential { mean: 2.0 },
            Dist::Uniform { min: 1.0, max: 3.0 },
            Dist::LogNormal {
                median: 1.5,
                sigma: 0.4,
            },
        ] {
            let n = 20_000;
            let m = (0..n).map(|_| d.draw(&rng)).sum::<f64>() / n as f64;
            assert!((m / d.mean() - 1.0).abs() < 0.05, "{d:?}: {m}");
        }
        let a = arrivals_from_counts(&[3, 0, 2], &rng);
        assert_eq!(a.len(), 5);
        assert!(a.windows(2).all(|w| w[0] <= w[1]) && a[4] < 3_000_000_000);
    }
}
