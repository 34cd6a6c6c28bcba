//! The TOML graph file format, read with source positions so every error names file:line:column.
//!
//! ```toml
//! name = "three-stage"
//! objective = { percentile = 99, target = "20ms" }
//!
//! [[task]]
//! id = "decode"
//! code = { builtin = "identity" }
//! inputs = { raw = "bytes" }
//! outputs = { image = "tensor<u8>[?,?,3]" }
//! estimate = "2ms"
//! resources = { cpu = "500m", memory = "256MiB" }
//!
//! [[edge]]
//! from = "decode.image"
//! to = "resize.image"
//! ```
//! README.md documents every key.

use crate::model::*;
use crate::quantity;
use crate::scaling::{Predictive, PredictiveMode, ScalingPolicy, Signal, TaskScaling};
use crate::validate::Problem;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use thiserror::Error;
use toml::Spanned;

/// A graph file that could not be read.
#[derive(Debug, Error)]
pub enum FileError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value in it is not what the key needs.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// A graph read from a file, with where each task and edge was written.
#[derive(Debug, Clone)]
pub struct GraphFile {
    pub graph: TaskGraph,
    pub source: SourceMap,
}

/// Maps tasks and edges back to file positions for error messages.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    path: String,
    line_starts: Vec<usize>,
    tasks: HashMap<String, usize>,
    edges: Vec<usize>,
    objective: Option<usize>,
    scaling: Option<usize>,
    scaling_tasks: HashMap<String, usize>,
}

impl SourceMap {
    fn new(path: &str, text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        SourceMap {
            path: path.into(),
            line_starts,
            ..Default::default()
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line.saturating_sub(1)];
        (line.max(1), offset - start + 1)
    }

    /// `file:line:column` of what a validation problem (of `kind`) is about, or just the file.
    pub fn locate(&self, task: Option<&str>, edge: Option<usize>, kind: &str) -> String {
        let offset = if kind == "invalid-scaling" {
            // A task's override, else the table.
            task.and_then(|t| self.scaling_tasks.get(t).copied())
                .or(self.scaling)
        } else {
            edge.and_then(|e| self.edges.get(e).copied())
                .or_else(|| task.and_then(|t| self.tasks.get(t).copied()))
                .or(if kind == "invalid-objective" {
                    self.objective
                } else {
                    None
                })
        };
        match offset {
            Some(o) => {
                let (l, c) = self.line_col(o);
                format!("{}:{l}:{c}", self.path)
            }
            None => self.path.clone(),
        }
    }

    /// A validation problem prefixed with its position in the file.
    pub fn describe(&self, p: &Problem) -> String {
        format!("{}: {p}", self.locate(p.task(), p.edge(), p.kind()))
    }

    fn error(&self, span: Option<Range<usize>>, message: String) -> FileError {
        let (line, column) = span.map(|s| self.line_col(s.start)).unwrap_or((1, 1));
        FileError::Syntax {
            path: self.path.clone(),
            line,
            column,
            message,
        }
    }
}

/// Reads and parses a graph file.
pub fn read(path: &std::path::Path) -> Result<GraphFile, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Io {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

/// Parses graph-file text; `path` is only used in messages.
pub fn parse(path: &str, text: &str) -> Result<GraphFile, FileError> {
    let mut source = SourceMap::new(path, text);
    let raw: RawGraph = toml::from_str(text)
        .map_err(|e| source.error(e.span(), e.message().trim_end().to_string()))?;
    let mut tasks = Vec::with_capacity(raw.task.len());
    for t in raw.task {
        let span = t.span();
        let t = t.into_inner();
        source.tasks.entry(t.id.clone()).or_insert(span.start);
        let code_span = t.code.span();
        let code = t
            .code
            .into_inner()
            .into_code()
            .map_err(|m| source.error(Some(code_span), format!("task {:?}: {m}", t.id)))?;
        let r = t.resources;
        let d = Resources::default();
        tasks.push(Task {
            id: t.id,
            code,
            inputs: t.inputs.0,
            outputs: t.outputs.0,
            estimated_execution_time_ns: t.estimate.0,
            resources: Resources {
                cpu_millicores: r.cpu.map_or(d.cpu_millicores, |c| c.0),
                memory_bytes: r.memory.map_or(d.memory_bytes, |m| m.0),
                gpus: r.gpus.unwrap_or(d.gpus),
                gpu_memory_bytes: r.gpu_memory.map_or(d.gpu_memory_bytes, |m| m.0),
                network_bits_per_sec: r.network.map_or(d.network_bits_per_sec, |n| n.0),
            },
        });
    }
    let mut edges = Vec::with_capacity(raw.edge.len());
    for e in raw.edge {
        source.edges.push(e.span().start);
        let e = e.into_inner();
        edges.push(Edge {
            from: e.from.0,
            to: e.to.0,
        });
    }
    let objective = raw.objective.map(|o| {
        source.objective = Some(o.span().start);
        let o = o.into_inner();
        LatencyObjective {
            percentile: o.percentile,
            target_ns: o.target.0,
        }
    });
    let scaling = raw.scaling.map(|s| {
        source.scaling = Some(s.span().start);
        let s = s.into_inner();
        let d = ScalingPolicy::default();
        ScalingPolicy {
            min_replicas: s.min_replicas.unwrap_or(d.min_replicas),
            max_replicas: s.max_replicas.unwrap_or(d.max_replicas),
            max_vms: s.max_vms,
            target_utilisation: s.target_utilisation.unwrap_or(d.target_utilisation),
            window_ns: s.window.map_or(d.window_ns, |w| w.0),
            scale_out_cooldown_ns: s
                .scale_out_cooldown
                .map_or(d.scale_out_cooldown_ns, |w| w.0),
            scale_in_cooldown_ns: s.scale_in_cooldown.map_or(d.scale_in_cooldown_ns, |w| w.0),
            max_scale_out_step: s.max_scale_out_step,
            warm_vms: s.warm_vms.unwrap_or(d.warm_vms),
            max_concurrency: s.max_concurrency.unwrap_or(d.max_concurrency),
            slow_factor: s.slow_factor.unwrap_or(d.slow_factor),
            error_rate: s.error_rate.unwrap_or(d.error_rate),
            throttled_share: s.throttled_share.unwrap_or(d.throttled_share),
            detect_window_ns: s.detect_window.map_or(d.detect_window_ns, |w| w.0),
            hedge: s.hedge.unwrap_or(d.hedge),
            hedge_delay_ns: s.hedge_delay.map(|w| w.0),
            hedge_budget: s.hedge_budget.unwrap_or(d.hedge_budget),
            predictive: match s.predictive {
                None => d.predictive,
                Some(p) => {
                    let dp = d.predictive;
                    Predictive {
                        mode: p.mode.map_or(dp.mode, |m| m.0),
                        attainment: p.attainment.unwrap_or(dp.attainment),
                        max_wait_ns: p.max_wait.map(|w| w.0),
                        lead_ns: p.lead.map_or(dp.lead_ns, |w| w.0),
                    }
                }
            },
            signals: s
                .signal
                .into_iter()
                .map(|x| Signal {
                    task: x.task,
                    metric: x.metric,
                    target: x.target,
                })
                .collect(),
            tasks: s
                .task
                .into_iter()
                .map(|(task, t)| {
                    source.scaling_tasks.insert(task.clone(), t.span().start);
                    let t = t.into_inner();
                    TaskScaling {
                        task,
                        min_replicas: t.min_replicas,
                        max_replicas: t.max_replicas,
                        max_concurrency: t.max_concurrency,
                        target_utilisation: t.target_utilisation,
                        warm_vms: t.warm_vms,
                    }
                })
                .collect(),
        }
    });
    Ok(GraphFile {
        graph: TaskGraph {
            name: raw.name,
            tasks,
            edges,
            objective,
            scaling,
        },
        source,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraph {
    name: String,
    objective: Option<Spanned<RawObjective>>,
    scaling: Option<Spanned<RawScaling>>,
    #[serde(default)]
    task: Vec<Spanned<RawTask>>,
    #[serde(default)]
    edge: Vec<Spanned<RawEdge>>,
}

/// The `[scaling]` table; every key optional (defaults in `ScalingPolicy::default`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScaling {
    min_replicas: Option<u32>,
    max_replicas: Option<u32>,
    max_vms: Option<u32>,
    target_utilisation: Option<f64>,
    window: Option<DurationNs>,
    scale_out_cooldown: Option<DurationNs>,
    scale_in_cooldown: Option<DurationNs>,
    max_scale_out_step: Option<u32>,
    warm_vms: Option<u32>,
    max_concurrency: Option<u32>,
    slow_factor: Option<f64>,
    error_rate: Option<f64>,
    throttled_share: Option<f64>,
    detect_window: Option<DurationNs>,
    hedge: Option<bool>,
    hedge_delay: Option<DurationNs>,
    hedge_budget: Option<f64>,
    /// `[scaling.predictive]`.
    predictive: Option<RawPredictive>,
    /// Other signals to size on: `[[scaling.signal]]`.
    #[serde(default)]
    signal: Vec<RawSignal>,
    /// Per-task overrides: `[scaling.task.ID]`.
    #[serde(default)]
    task: std::collections::BTreeMap<String, Spanned<RawTaskScaling>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPredictive {
    mode: Option<Parsed<PredictiveMode>>,
    attainment: Option<f64>,
    max_wait: Option<DurationNs>,
    lead: Option<DurationNs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignal {
    task: String,
    metric: String,
    target: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaskScaling {
    min_replicas: Option<u32>,
    max_replicas: Option<u32>,
    max_concurrency: Option<u32>,
    target_utilisation: Option<f64>,
    warm_vms: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjective {
    percentile: f64,
    target: DurationNs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    id: String,
    code: Spanned<RawCode>,
    #[serde(default)]
    inputs: PortMap,
    #[serde(default)]
    outputs: PortMap,
    estimate: DurationNs,
    #[serde(default)]
    resources: RawResources,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCode {
    builtin: Option<String>,
    exec: Option<Parsed<Digest>>,
    onnx: Option<Parsed<Digest>>,
    gpu_kernel: Option<Parsed<Digest>>,
    entry: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    params: ParamMap,
}

impl RawCode {
    fn into_code(self) -> Result<CodeRef, &'static str> {
        let given = [
            self.builtin.is_some(),
            self.exec.is_some(),
            self.onnx.is_some(),
            self.gpu_kernel.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err("code must name exactly one of builtin, exec, onnx or gpu_kernel");
        }
        if self.entry.is_some() && self.gpu_kernel.is_none() {
            return Err("code.entry only applies to gpu_kernel");
        }
        let kind = if let Some(name) = self.builtin {
            if !self.args.is_empty() {
                return Err("builtin kernels take params, not args");
            }
            CodeKind::Builtin { name }
        } else if let Some(d) = self.exec {
            CodeKind::Exec {
                sha256: d.0,
                args: self.args,
            }
        } else if let Some(d) = self.onnx {
            CodeKind::Onnx {
                sha256: d.0,
                args: self.args,
            }
        } else if let Some(d) = self.gpu_kernel {
            CodeKind::GpuKernel {
                sha256: d.0,
                entry: self
                    .entry
                    .ok_or("gpu_kernel needs an entry (the kernel's name)")?,
            }
        } else {
            unreachable!("exactly one code kind was checked above")
        };
        Ok(CodeRef {
            kind,
            params: self.params.0,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpu: Option<Cpu>,
    memory: Option<Bytes>,
    gpus: Option<u32>,
    gpu_memory: Option<Bytes>,
    network: Option<Bits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    from: Parsed<Endpoint>,
    to: Parsed<Endpoint>,
}

/// A value written as a string and read with `FromStr`; the parse error becomes a TOML error
/// at the value's position.
struct Parsed<T>(T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(de::Error::custom)
    }
}

/// Quantities may be written as strings with units or as bare numbers.
macro_rules! quantity {
    ($name:ident, $ty:ty, $parse:path, $expecting:literal) => {
        struct $name($ty);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$name, E> {
                        $parse(s).map($name).map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$name, E> {
                        self.visit_str(&v.to_string())
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$name, E> {
                        self.visit_str(&v.to_string())
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$name, E> {
                        self.visit_str(&v.to_string())
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

fn duration_requires_unit(s: &str) -> Result<u64, quantity::QuantityError> {
    quantity::parse_duration_ns(s)
}

quantity!(
    DurationNs,
    u64,
    duration_requires_unit,
    "a duration such as \"2ms\""
);
quantity!(
    Bytes,
    u64,
    quantity::parse_bytes,
    "a size such as \"256MiB\""
);
quantity!(
    Cpu,
    u32,
    quantity::parse_cpu_millicores,
    "a CPU share such as \"500m\" or 2"
);
quantity!(
    Bits,
    u64,
    quantity::parse_bits_per_sec,
    "a bandwidth such as \"1Gbit\""
);

/// Ports in the order written: `{ name = "type", ... }`.
#[derive(Default)]
struct PortMap(Vec<Port>);

impl<'de> Deserialize<'de> for PortMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PortMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of port names to types, e.g. { image = \"tensor<u8>\" }")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PortMap, A::Error> {
                let mut ports = Vec::new();
                while let Some((name, ty)) = map.next_entry::<String, Parsed<PortType>>()? {
                    ports.push(Port { name, ty: ty.0 });
                }
                Ok(PortMap(ports))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parameters in the order written; numbers and booleans are kept as their text.
#[derive(Default)]
struct ParamMap(Vec<(String, String)>);

impl<'de> Deserialize<'de> for ParamMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ParamMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of parameter names to strings, numbers or booleans")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParamMap, A::Error> {
                let mut params = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, toml::Value>()? {
                    let v = match v {
                        toml::Value::String(s) => s,
                        toml::Value::Integer(i) => i.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        toml::Value::Boolean(b) => b.to_string(),
                        other => {
                            return Err(de::Error::custom(format!(
                                "parameter {k:?} must be a string, number or boolean, not {}",
                                other.type_str()
                            )))
                        }
                    };
                    params.push((k, v));
                }
                Ok(ParamMap(params))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ValidatedGraph;

    const CHAIN: &str = r#"
name = "chain"
objective = { percentile = 99, target = "20ms" }

[[task]]
id = "a"
code = { builtin = "sleep", params = { mean = "1ms", dist = "lognormal", sigma = 0.5 } }
inputs = { x = "bytes" }
outputs = { y = "tensor<f32>[?,3]" }
estimate = "1ms"
resources = { cpu = "500m", memory = "256MiB" }

[[task]]
id = "b"
code = { exec = "sha256:0000000000000000000000000000000000000000000000000000000000000001", args = ["--fast"] }
inputs = { y = "tensor<f32>[8,3]" }
outputs = { z = "json" }
estimate = "250us"

[[edge]]
from = "a.y"
to = "b.y"
"#;

    #[test]
    fn reads_a_chain() {
        let f = parse("chain.toml", CHAIN).unwrap();
        let g = &f.graph;
        assert_eq!(g.tasks.len(), 2);
        assert_eq!(g.tasks[0].resources.cpu_millicores, 500);
        assert_eq!(g.tasks[0].code.params[2], ("sigma".into(), "0.5".into()));
        assert_eq!(g.tasks[1].estimated_execution_time_ns, 250_000);
        assert_eq!(g.tasks[1].resources, Resources::default());
        assert_eq!(g.objective.unwrap().target_ns, 20_000_000);
        ValidatedGraph::new(f.graph).unwrap();
    }

    #[test]
    fn syntax_errors_have_positions() {
        let broken = CHAIN.replace("estimate = \"250us\"", "estimate = \"250 parsecs\"");
        let e = parse("chain.toml", &broken).unwrap_err().to_string();
        assert!(e.starts_with("chain.toml:18:"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");

        let broken = CHAIN.replace("outputs = { z = \"json\" }", "outputs = { z = \"jsno\" }");
        let e = parse("chain.toml", &broken).unwrap_err().to_string();
        assert!(e.starts_with("chain.toml:17:"), "{e}");

        let e = parse("x.toml", "name = \"x\"\n[[task]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:2:"), "{e}");
    }

    #[test]
    fn validation_problems_point_at_the_edge() {
        let broken = CHAIN.replace("to = \"b.y\"", "to = \"c.y\"");
        let f = parse("chain.toml", &broken).unwrap();
        let problems = ValidatedGraph::new(f.graph.clone()).unwrap_err();
        let msg = f.source.describe(&problems[0]);
        assert!(
            msg.starts_with("chain.toml:20:1: edge #0 (a.y -> c.y): unknown task \"c\""),
            "{msg}"
        );
    }

    #[test]
    fn code_needs_exactly_one_kind() {
        let broken = CHAIN.replace(
            "code = { builtin = \"sleep\",",
            "code = { builtin = \"sleep\", onnx = \"sha256:0000000000000000000000000000000000000000000000000000000000000001\",",
        );
        let e = parse("c.toml", &broken).unwrap_err().to_string();
        assert!(e.contains("exactly one of"), "{e}");
        assert!(e.starts_with("c.toml:7:"), "{e}");
    }
}
