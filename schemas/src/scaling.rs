//! A graph's scaling policy (the `[scaling]` table and its per-task overrides) and its checks.
//! The control node's sizing reads it through `prescient-policy`.

use crate::model::TaskGraph;
use crate::validate::Problem;
use serde::Serialize;

/// A graph's scaling policy (the `[scaling]` table).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScalingPolicy {
    /// Replicas of each task at least and at most.
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Replicas (VMs) of the whole graph at most; `None`: no budget beyond `max_replicas`.
    pub max_vms: Option<u32>,
    /// The share of a replica's capacity sizing aims for, in (0, 1].
    pub target_utilisation: f64,
    /// Arrival rate and service time are measured over this window.
    pub window_ns: u64,
    /// After a scale-out of a task, no further scale-out of it for this long.
    pub scale_out_cooldown_ns: u64,
    /// Replicas one scale-out adds to a task at most (a step limit, as HPA's `behavior`);
    /// `None`: straight to what is needed.
    pub max_scale_out_step: Option<u32>,
    /// Booted, idle VMs kept per task on microVM hosts at least (a warm pool a new replica
    /// lands on at once); the plan may ask for more. 0: none beyond the plan's.
    pub warm_vms: u32,
    /// No scale-in of a task within this long of its last change, and no replica retired
    /// within this long of being added.
    pub scale_in_cooldown_ns: u64,
    /// Executions at once in one replica (the rest queue at the replica).
    pub max_concurrency: u32,
    pub tasks: Vec<TaskScaling>,
    /// A replica whose execution p50 is this many times its reference (its task's other
    /// replicas, or the task's calibrated p50) is slow, and is replaced.
    pub slow_factor: f64,
    /// A replica failing at least this share of its executions (and more than its task's other
    /// replicas) is replaced.
    pub error_rate: f64,
    /// A replica whose cgroup was CPU-throttled for at least this share of an interval, while it
    /// runs slow, is on a contended host: it is replaced elsewhere and the host avoided.
    pub throttled_share: f64,
    /// The replacement triggers look at this window.
    pub detect_window_ns: u64,
    /// Hedged invocations: an invocation not answered after the hedge delay is sent again
    /// (to other replicas of its entry tasks), within the budget; the first answer wins.
    pub hedge: bool,
    /// `None`: the graph's recent end-to-end p95 at the ingress.
    pub hedge_delay_ns: Option<u64>,
    /// Hedges at most, as a share of invocations (a token bucket).
    pub hedge_budget: f64,
    /// Other signals tasks are sized on (`[[scaling.signal]]`).
    pub signals: Vec<Signal>,
    /// Predictive provisioning (`[scaling.predictive]`).
    pub predictive: Predictive,
}

/// `[scaling.predictive]`: each task's arrivals forecast, the replicas the forecast needs
/// sized by a queueing model, and ordered one measured lead time ahead.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Predictive {
    pub mode: PredictiveMode,
    /// The share of executions the plan sizes to start within `max_wait` of arriving.
    pub attainment: f64,
    /// The wait the plan sizes for; `None`: each task's calibrated execution time.
    pub max_wait_ns: Option<u64>,
    /// The lead time (placement to ready) assumed until one is measured.
    pub lead_ns: u64,
}

impl Default for Predictive {
    fn default() -> Self {
        Predictive {
            mode: PredictiveMode::Off,
            attainment: 0.999,
            max_wait_ns: None,
            lead_ns: 30_000_000_000,
        }
    }
}

/// A `[scaling.predictive] mode` that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mode {0:?}: expected off, forecast-only or on")]
pub struct UnknownMode(pub String);

impl std::str::FromStr for PredictiveMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        PredictiveMode::parse(s).ok_or_else(|| UnknownMode(s.to_string()))
    }
}

/// Whether the plan acts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PredictiveMode {
    /// Reactive sizing alone.
    #[default]
    Off,
    /// Reactive sizing acts; the plan's floor is computed and reported (what it would set).
    ForecastOnly,
    /// The plan sets the floor; reactive sizing rises above it.
    On,
}

impl PredictiveMode {
    pub fn parse(s: &str) -> Option<PredictiveMode> {
        match s {
            "off" => Some(PredictiveMode::Off),
            "forecast-only" => Some(PredictiveMode::ForecastOnly),
            "on" => Some(PredictiveMode::On),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PredictiveMode::Off => "off",
            PredictiveMode::ForecastOnly => "forecast-only",
            PredictiveMode::On => "on",
        }
    }

    /// Its number on the wire (the registry's records too).
    pub fn code(self) -> u8 {
        match self {
            PredictiveMode::Off => 0,
            PredictiveMode::ForecastOnly => 1,
            PredictiveMode::On => 2,
        }
    }

    /// `None` for an unknown number (a record from a newer version).
    pub fn from_code(c: u8) -> Option<PredictiveMode> {
        [
            PredictiveMode::Off,
            PredictiveMode::ForecastOnly,
            PredictiveMode::On,
        ]
        .into_iter()
        .find(|m| m.code() == c)
    }
}

/// Size `task` on `metric` too: replicas = its total over the task's replicas ÷ `target`
/// (as KEDA's and the HPA's average-value targets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Signal {
    pub task: String,
    /// `queue_length` (executions accepted by a replica and not finished), `gpu_memory`
    /// (bytes its processes hold, NVML) or `custom.NAME` (a gauge the task reports through
    /// the `exec` protocol).
    pub metric: String,
    pub target: f64,
}

impl Signal {
    /// The gauge or sample it reads: `in_flight`, `gpu_memory` or the custom name.
    pub fn source(&self) -> Option<SignalSource<'_>> {
        match self.metric.as_str() {
            "queue_length" => Some(SignalSource::InFlight),
            "gpu_memory" => Some(SignalSource::GpuMemory),
            m => m
                .strip_prefix("custom.")
                .filter(|n| !n.is_empty())
                .map(SignalSource::Custom),
        }
    }
}

/// Where a signal's values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalSource<'a> {
    InFlight,
    GpuMemory,
    Custom(&'a str),
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        ScalingPolicy {
            min_replicas: 1,
            max_replicas: 8,
            max_vms: None,
            target_utilisation: 0.7,
            window_ns: 10_000_000_000,
            scale_out_cooldown_ns: 10_000_000_000,
            max_scale_out_step: None,
            warm_vms: 0,
            scale_in_cooldown_ns: 60_000_000_000,
            max_concurrency: 1,
            tasks: Vec::new(),
            slow_factor: 2.0,
            error_rate: 0.05,
            throttled_share: 0.2,
            detect_window_ns: 4_000_000_000,
            hedge: false,
            hedge_delay_ns: None,
            hedge_budget: 0.05,
            signals: Vec::new(),
            predictive: Predictive::default(),
        }
    }
}

/// One task's overrides of its graph's scaling policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TaskScaling {
    pub task: String,
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub target_utilisation: Option<f64>,
    pub warm_vms: Option<u32>,
}

/// A task's scaling policy with its overrides applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskPolicy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub max_concurrency: u32,
    pub target_utilisation: f64,
    pub warm_vms: u32,
}

impl ScalingPolicy {
    /// `task`'s policy: the graph's values with the task's overrides.
    pub fn for_task(&self, task: &str) -> TaskPolicy {
        let o = self.tasks.iter().find(|t| t.task == task);
        TaskPolicy {
            min_replicas: o.and_then(|o| o.min_replicas).unwrap_or(self.min_replicas),
            max_replicas: o.and_then(|o| o.max_replicas).unwrap_or(self.max_replicas),
            max_concurrency: o
                .and_then(|o| o.max_concurrency)
                .unwrap_or(self.max_concurrency),
            target_utilisation: o
                .and_then(|o| o.target_utilisation)
                .unwrap_or(self.target_utilisation),
            warm_vms: o.and_then(|o| o.warm_vms).unwrap_or(self.warm_vms),
        }
    }
}

/// The longest lead time a plan assumes (beyond it a forecast says little).
pub const MAX_LEAD_NS: u64 = 3_600_000_000_000;

/// Replicas of one task at most, and one graph's at most: far beyond any real fleet's need,
/// low enough that a typo cannot order a million VMs.
pub const MAX_REPLICAS: u32 = 10_000;

/// Every problem of `graph`'s scaling policy `s`, each naming its key.
pub(crate) fn check(graph: &TaskGraph, s: &ScalingPolicy, problems: &mut Vec<Problem>) {
    let mut bad = |task: Option<&str>, key: &'static str, message: String| {
        problems.push(Problem::InvalidScaling {
            task: task.map(str::to_string),
            key,
            message,
        })
    };
    let utilisation_ok = |u: f64| u > 0.0 && u <= 1.0;
    if !utilisation_ok(s.target_utilisation) {
        bad(
            None,
            "target_utilisation",
            format!("{} must be in (0, 1]", s.target_utilisation),
        );
    }
    if s.window_ns == 0 {
        bad(None, "window", "must be positive".into());
    }
    if s.detect_window_ns == 0 {
        bad(None, "detect_window", "must be positive".into());
    }
    if !(s.slow_factor > 1.0 && s.slow_factor.is_finite()) {
        bad(
            None,
            "slow_factor",
            format!("{} must be above 1", s.slow_factor),
        );
    }
    if s.hedge_delay_ns == Some(0) {
        bad(None, "hedge_delay", "must be positive".into());
    }
    for (key, v) in [
        ("error_rate", s.error_rate),
        ("throttled_share", s.throttled_share),
        ("hedge_budget", s.hedge_budget),
    ] {
        if !utilisation_ok(v) {
            bad(None, key, format!("{v} must be in (0, 1]"));
        }
    }
    let p = &s.predictive;
    if !(p.attainment > 0.0 && p.attainment < 1.0) {
        bad(
            None,
            "predictive.attainment",
            format!("{} must be in (0, 1)", p.attainment),
        );
    }
    if p.max_wait_ns == Some(0) {
        bad(None, "predictive.max_wait", "must be positive".into());
    }
    if p.lead_ns == 0 || p.lead_ns > MAX_LEAD_NS {
        bad(
            None,
            "predictive.lead",
            "must be positive and at most 1h".into(),
        );
    }
    if s.max_scale_out_step == Some(0) {
        bad(None, "max_scale_out_step", "must be at least 1".into());
    }
    if s.max_concurrency == 0 {
        bad(None, "max_concurrency", "must be at least 1".into());
    }
    // Warm VMs hold memory while idle: no more than a task may have replicas.
    if s.warm_vms > s.max_replicas {
        bad(
            None,
            "warm_vms",
            format!(
                "{} is more than max_replicas ({})",
                s.warm_vms, s.max_replicas
            ),
        );
    }
    for t in &s.tasks {
        let most = s.for_task(&t.task).max_replicas;
        if let Some(w) = t.warm_vms.filter(|w| *w > most) {
            bad(
                Some(&t.task),
                "warm_vms",
                format!("{w} is more than the task's max_replicas ({most})"),
            );
        }
    }
    if let Some(v) = s.max_vms {
        let least: u64 = graph
            .tasks
            .iter()
            .map(|t| u64::from(s.for_task(&t.id).min_replicas))
            .sum();
        if v == 0 || v > MAX_REPLICAS || u64::from(v) < least {
            bad(
                None,
                "max_vms",
                format!("{v} must cover every task's min_replicas ({least} in all) and be at most {MAX_REPLICAS}"),
            );
        }
    }
    for sig in &s.signals {
        if graph.task(&sig.task).is_none() {
            bad(
                None,
                "signal.task",
                format!("the graph has no task {:?}", sig.task),
            );
        }
        if sig.source().is_none() {
            bad(
                None,
                "signal.metric",
                format!(
                    "{:?}: expected queue_length, gpu_memory or custom.NAME",
                    sig.metric
                ),
            );
        }
        if !(sig.target > 0.0 && sig.target.is_finite()) {
            bad(
                None,
                "signal.target",
                format!("{} must be positive", sig.target),
            );
        }
    }
    for t in &s.tasks {
        if graph.task(&t.task).is_none() {
            bad(
                Some(&t.task),
                "task",
                format!("the graph has no task {:?}", t.task),
            );
        }
        if t.target_utilisation.is_some_and(|u| !utilisation_ok(u)) {
            bad(
                Some(&t.task),
                "target_utilisation",
                "must be in (0, 1]".into(),
            );
        }
        if t.max_concurrency == Some(0) {
            bad(
                Some(&t.task),
                "max_concurrency",
                "must be at least 1".into(),
            );
        }
    }
    let tasks: Vec<Option<&str>> = std::iter::once(None)
        .chain(s.tasks.iter().map(|t| Some(t.task.as_str())))
        .collect();
    for task in tasks {
        let p = task.map_or(
            TaskPolicy {
                min_replicas: s.min_replicas,
                max_replicas: s.max_replicas,
                max_concurrency: s.max_concurrency,
                target_utilisation: s.target_utilisation,
                warm_vms: s.warm_vms,
            },
            |t| s.for_task(t),
        );
        if p.max_replicas == 0 || p.max_replicas > MAX_REPLICAS {
            bad(
                task,
                "max_replicas",
                format!("{} must be in 1..={MAX_REPLICAS}", p.max_replicas),
            );
        } else if p.min_replicas > p.max_replicas {
            bad(
                task,
                "min_replicas",
                format!(
                    "{} is above max_replicas {}",
                    p.min_replicas, p.max_replicas
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::file;
    use crate::validate::ValidatedGraph;

    const CHAIN: &str = r#"
name = "chain"
[[task]]
id = "a"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "1ms"
[[task]]
id = "b"
code = { builtin = "sleep", params = { mean = "2ms" } }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "2ms"
[[edge]]
from = "a.y"
to = "b.x"
"#;

    fn problems(scaling: &str) -> Vec<String> {
        let text = format!("{CHAIN}{scaling}");
        let f = file::parse("g.toml", &text).expect("parses");
        match ValidatedGraph::new(f.graph.clone()) {
            Ok(_) => vec![],
            Err(ps) => ps.iter().map(|p| f.source.describe(p)).collect(),
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let text = format!(
            "{CHAIN}\n[scaling]\nmax_replicas = 4\nscale_in_cooldown = \"30s\"\nmax_scale_out_step = 2\n[scaling.task.b]\nmax_concurrency = 2\nmin_replicas = 2\n"
        );
        let g = file::parse("g.toml", &text).unwrap().graph;
        let s = g.scaling.as_ref().unwrap();
        assert_eq!(s.scale_in_cooldown_ns, 30_000_000_000);
        assert_eq!(s.window_ns, 10_000_000_000, "defaulted");
        assert_eq!(s.max_scale_out_step, Some(2));
        assert_eq!(s.warm_vms, 0, "no warm pool unless asked");
        let a = s.for_task("a");
        let b = s.for_task("b");
        assert_eq!(
            (a.min_replicas, a.max_replicas, a.max_concurrency),
            (1, 4, 1)
        );
        assert_eq!(
            (b.min_replicas, b.max_replicas, b.max_concurrency),
            (2, 4, 2)
        );
        assert!(ValidatedGraph::new(g).is_ok());
        assert!(file::parse("g.toml", CHAIN)
            .unwrap()
            .graph
            .scaling
            .is_none());
    }

    #[test]
    fn problems_name_file_line_and_key() {
        let ps = problems("\n[scaling]\nmin_replicas = 5\nmax_replicas = 3\n");
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert!(
            ps[0].starts_with("g.toml:19:")
                && ps[0].contains("scaling.min_replicas: 5 is above max_replicas 3"),
            "{ps:?}"
        );
        let ps = problems("\n[scaling]\n[scaling.task.nope]\nmax_concurrency = 0\n");
        assert_eq!(ps.len(), 2, "{ps:?}");
        assert!(ps.iter().all(|p| p.starts_with("g.toml:20:")), "{ps:?}");
        assert!(
            ps[0].contains("scaling.task.nope.task: the graph has no task \"nope\""),
            "{ps:?}"
        );
        assert!(
            ps[1].contains("scaling.task.nope.max_concurrency"),
            "{ps:?}"
        );
        let ps = problems(
            "\n[scaling]\ntarget_utilisation = 1.5\nmax_vms = 1\nmax_scale_out_step = 0\n",
        );
        assert_eq!(ps.len(), 3, "{ps:?}");
        assert!(
            ps.iter()
                .any(|p| p.contains("scaling.max_scale_out_step: must be at least 1")),
            "{ps:?}"
        );
        assert!(
            ps[2].contains("scaling.max_vms: 1 must cover every task's min_replicas (2 in all)"),
            "{ps:?}"
        );
        let ps = problems(
            "\n[scaling]\nmax_replicas = 2\nwarm_vms = 3\n[scaling.task.b]\nmax_replicas = 1\nwarm_vms = 2\n",
        );
        assert!(
            ps.iter()
                .any(|p| p.contains("scaling.warm_vms: 3 is more than max_replicas (2)")),
            "{ps:?}"
        );
        assert!(
            ps.iter()
                .any(|p| p.contains("scaling.task.b.warm_vms: 2 is more")),
            "{ps:?}"
        );
        // Unknown keys are refused at parse time, with their line.
        let text = format!("{CHAIN}\n[scaling]\nmax_replica = 3\n");
        let e = file::parse("g.toml", &text).unwrap_err().to_string();
        assert!(
            e.starts_with("g.toml:20:") && e.contains("max_replica"),
            "{e}"
        );
    }

    #[test]
    fn the_predictive_table_parses_and_bad_values_are_named() {
        let text = format!(
            "{CHAIN}\n[scaling]\n[scaling.predictive]\nmode = \"forecast-only\"\nattainment = 0.995\nlead = \"45s\"\n"
        );
        let g = file::parse("g.toml", &text).unwrap().graph;
        let p = g.scaling.as_ref().unwrap().predictive;
        assert_eq!(p.mode, super::PredictiveMode::ForecastOnly);
        assert_eq!(
            (p.attainment, p.lead_ns, p.max_wait_ns),
            (0.995, 45_000_000_000, None)
        );
        assert!(ValidatedGraph::new(g).is_ok());
        let off = file::parse("g.toml", &format!("{CHAIN}\n[scaling]\n"))
            .unwrap()
            .graph;
        assert_eq!(
            off.scaling.unwrap().predictive.mode,
            super::PredictiveMode::Off,
            "off unless asked"
        );
        let ps =
            problems("\n[scaling]\n[scaling.predictive]\nattainment = 1.0\nmax_wait = \"0s\"\n");
        assert_eq!(ps.len(), 2, "{ps:?}");
        assert!(
            ps[0].contains("scaling.predictive.attainment: 1 must be in (0, 1)"),
            "{ps:?}"
        );
        assert!(
            ps[1].contains("scaling.predictive.max_wait: must be positive"),
            "{ps:?}"
        );
        // An unknown mode is refused at parse time, at its line.
        let text = format!("{CHAIN}\n[scaling]\n[scaling.predictive]\nmode = \"sometimes\"\n");
        let e = file::parse("g.toml", &text).unwrap_err().to_string();
        assert!(
            e.starts_with("g.toml:21:") && e.contains("expected off, forecast-only or on"),
            "{e}"
        );
    }

    #[test]
    fn signals_parse_and_bad_ones_are_named() {
        let text = format!(
            "{CHAIN}\n[scaling]\nhedge = true\nhedge_delay = \"15ms\"\n[[scaling.signal]]\ntask = \"b\"\nmetric = \"custom.kv_cache\"\ntarget = 0.8\n"
        );
        let g = file::parse("g.toml", &text).unwrap().graph;
        let s = g.scaling.as_ref().unwrap();
        assert!(s.hedge && s.hedge_delay_ns == Some(15_000_000));
        assert_eq!(s.signals.len(), 1);
        assert_eq!(
            s.signals[0].source(),
            Some(super::SignalSource::Custom("kv_cache"))
        );
        assert!(ValidatedGraph::new(g).is_ok());
        let ps = problems(
            "\n[scaling]\n[[scaling.signal]]\ntask = \"zz\"\nmetric = \"cpu\"\ntarget = 0\n",
        );
        assert_eq!(ps.len(), 3, "{ps:?}");
        assert!(
            ps[0].contains("scaling.signal.task: the graph has no task \"zz\""),
            "{ps:?}"
        );
        assert!(
            ps[1].contains(
                "scaling.signal.metric: \"cpu\": expected queue_length, gpu_memory or custom.NAME"
            ),
            "{ps:?}"
        );
        assert!(
            ps[2].contains("scaling.signal.target: 0 must be positive"),
            "{ps:?}"
        );
        assert!(ps.iter().all(|p| p.starts_with("g.toml:19:")), "{ps:?}");
    }
}
