//! The task-graph model: what a user submits, independent of any encoding.

use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// A directed acyclic graph of tasks whose edges carry data from output ports to input ports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskGraph {
    pub name: String,
    pub tasks: Vec<Task>,
    pub edges: Vec<Edge>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective: Option<LatencyObjective>,
    /// How the control node sizes the tasks; `None`: one replica each (or the control node's
    /// `--min-replicas`), no autoscaling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<crate::scaling::ScalingPolicy>,
}

impl TaskGraph {
    pub fn task(&self, id: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.id == id)
    }
}

/// One node of the graph: code to run, its typed ports, its cost and what it needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    pub id: String,
    pub code: CodeRef,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    /// Nanoseconds one execution is expected to take; calibrated from measurements at run time.
    pub estimated_execution_time_ns: u64,
    pub resources: Resources,
}

impl Task {
    pub fn input(&self, name: &str) -> Option<&Port> {
        self.inputs.iter().find(|p| p.name == name)
    }
    pub fn output(&self, name: &str) -> Option<&Port> {
        self.outputs.iter().find(|p| p.name == name)
    }
}

/// What a task runs, with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CodeRef {
    pub kind: CodeKind,
    /// Parameters passed to the kernel or artifact, in the order written.
    pub params: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeKind {
    /// A kernel shipped with the agent, by name.
    Builtin { name: String },
    /// An executable uploaded to the control node, addressed by digest.
    Exec { sha256: Digest, args: Vec<String> },
    /// An ONNX model, addressed by digest.
    Onnx { sha256: Digest, args: Vec<String> },
    /// A GPU module (PTX or cubin) and the kernel to launch.
    GpuKernel { sha256: Digest, entry: String },
}

impl fmt::Display for CodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodeKind::Builtin { name } => write!(f, "builtin:{name}"),
            CodeKind::Exec { sha256, .. } => write!(f, "exec:{}", sha256.short()),
            CodeKind::Onnx { sha256, .. } => write!(f, "onnx:{}", sha256.short()),
            CodeKind::GpuKernel { sha256, entry } => {
                write!(f, "gpu:{}#{entry}", sha256.short())
            }
        }
    }
}

/// A sha256 digest, written `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(bytes).into())
    }
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// The first 12 hex digits, for tables.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A digest that could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid digest {0:?}: expected \"sha256:\" followed by 64 hex digits")]
pub struct DigestError(String);

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DigestError(s.to_string());
        let hex = s.strip_prefix("sha256:").ok_or_else(err)?;
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A named, typed input or output of a task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Port {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: PortType,
}

/// Element types a tensor port can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    Bf16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::F16,
        DType::Bf16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// The type of data a port carries; see [`PortType::accepts`] for edge compatibility.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortType {
    /// Anything: checked at run time.
    Any,
    Bytes,
    Text,
    Json,
    /// `shape: None` means any rank; a dimension of `-1` is dynamic.
    Tensor {
        dtype: DType,
        shape: Option<Vec<i64>>,
    },
}

impl PortType {
    /// Whether data produced as `self` may flow into an input port of type `consumer`.
    ///
    /// `any` on either side defers the check to run time; a `bytes` input takes anything, as
    /// raw bytes; tensors need the same dtype and, where both shapes are known, the same rank
    /// with each dimension equal or dynamic on one side.
    pub fn accepts_into(&self, consumer: &PortType) -> bool {
        use PortType::*;
        match (self, consumer) {
            (Any, _) | (_, Any) | (_, Bytes) => true,
            (Text, Text) | (Json, Json) => true,
            (
                Tensor {
                    dtype: d1,
                    shape: s1,
                },
                Tensor {
                    dtype: d2,
                    shape: s2,
                },
            ) => {
                d1 == d2
                    && match (s1, s2) {
                        (Some(a), Some(b)) => {
                            a.len() == b.len()
                                && a.iter().zip(b).all(|(x, y)| x == y || *x < 0 || *y < 0)
                        }
                        _ => true,
                    }
            }
            _ => false,
        }
    }
}

impl fmt::Display for PortType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortType::Any => f.write_str("any"),
            PortType::Bytes => f.write_str("bytes"),
            PortType::Text => f.write_str("text"),
            PortType::Json => f.write_str("json"),
            PortType::Tensor { dtype, shape } => {
                write!(f, "tensor<{}>", dtype.as_str())?;
                if let Some(dims) = shape {
                    f.write_str("[")?;
                    for (i, d) in dims.iter().enumerate() {
                        if i > 0 {
                            f.write_str(",")?;
                        }
                        if *d < 0 {
                            f.write_str("?")?;
                        } else {
                            write!(f, "{d}")?;
                        }
                    }
                    f.write_str("]")?;
                }
                Ok(())
            }
        }
    }
}

/// A port type that could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid port type {0:?}: expected any, bytes, text, json or tensor<DTYPE>[DIMS] (e.g. \"tensor<f32>[?,3,224,224]\"; DTYPE one of f16, bf16, f32, f64, i8, i16, i32, i64, u8, bool)")]
pub struct PortTypeError(String);

impl FromStr for PortType {
    type Err = PortTypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PortTypeError(s.to_string());
        let t = s.trim();
        match t {
            "any" => return Ok(PortType::Any),
            "bytes" => return Ok(PortType::Bytes),
            "text" => return Ok(PortType::Text),
            "json" => return Ok(PortType::Json),
            _ => {}
        }
        let rest = t.strip_prefix("tensor<").ok_or_else(err)?;
        let (dtype, rest) = rest.split_once('>').ok_or_else(err)?;
        let dtype = DType::parse(dtype.trim()).ok_or_else(err)?;
        let rest = rest.trim();
        let shape = if rest.is_empty() {
            None
        } else {
            let inner = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .ok_or_else(err)?;
            let mut dims = Vec::new();
            if !inner.trim().is_empty() {
                for d in inner.split(',') {
                    let d = d.trim();
                    dims.push(if d == "?" {
                        -1
                    } else {
                        d.parse::<i64>().ok().filter(|v| *v >= 0).ok_or_else(err)?
                    });
                }
            }
            Some(dims)
        };
        Ok(PortType::Tensor { dtype, shape })
    }
}

impl Serialize for PortType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What one replica of a task needs from its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub cpu_millicores: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
    pub gpu_memory_bytes: u64,
    /// 0: no reservation.
    pub network_bits_per_sec: u64,
}

impl Default for Resources {
    /// What a graph file gets when it names no resources: a tenth of a core and 128 MiB.
    fn default() -> Self {
        Resources {
            cpu_millicores: 100,
            memory_bytes: 128 << 20,
            gpus: 0,
            gpu_memory_bytes: 0,
            network_bits_per_sec: 0,
        }
    }
}

/// A port of a task, written `task.port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub task: String,
    pub port: String,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.task, self.port)
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An endpoint that could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid endpoint {0:?}: expected \"task.port\"")]
pub struct EndpointError(String);

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.rsplit_once('.') {
            Some((task, port)) if !task.is_empty() && !port.is_empty() => Ok(Endpoint {
                task: task.to_string(),
                port: port.to_string(),
            }),
            _ => Err(EndpointError(s.to_string())),
        }
    }
}

/// Data flows from an output port (`from`) to an input port (`to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub from: Endpoint,
    pub to: Endpoint,
}

impl fmt::Display for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)
    }
}

/// Per chain, the `percentile` of end-to-end latency must stay under `target_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyObjective {
    pub percentile: f64,
    pub target_ns: u64,
}

/// A graph as the registry stores it: identity, version and the graph itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GraphRecord {
    pub id: String,
    pub version: u32,
    pub submitted_at_ms: u64,
    pub digest: Digest,
    pub graph: TaskGraph,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_types_parse_and_print() {
        for s in [
            "any",
            "bytes",
            "tensor<f32>[?,3,224,224]",
            "tensor<u8>",
            "tensor<i64>[]",
        ] {
            let t: PortType = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
        }
        assert!("tensor<f33>[1]".parse::<PortType>().is_err());
        assert!("tensor<f32>[-2]".parse::<PortType>().is_err());
        assert!("image".parse::<PortType>().is_err());
    }

    #[test]
    fn compatibility() {
        let t = |s: &str| s.parse::<PortType>().unwrap();
        assert!(t("tensor<f32>[?,3]").accepts_into(&t("tensor<f32>[8,3]")));
        assert!(!t("tensor<f32>[8,3]").accepts_into(&t("tensor<f32>[8,4]")));
        assert!(!t("tensor<f32>[8,3]").accepts_into(&t("tensor<f32>[8,3,1]")));
        assert!(!t("tensor<f16>").accepts_into(&t("tensor<f32>")));
        assert!(t("json").accepts_into(&t("bytes")));
        assert!(!t("bytes").accepts_into(&t("json")));
        assert!(!t("text").accepts_into(&t("json")));
    }

    #[test]
    fn digests() {
        let d = Digest::of(b"hello");
        let back: Digest = d.to_string().parse().unwrap();
        assert_eq!(d, back);
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!("md5:00".parse::<Digest>().is_err());
    }
}
