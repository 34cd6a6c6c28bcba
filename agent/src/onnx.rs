//! `onnx` task code: a model run with ONNX Runtime on CPU, loaded at run time from
//! `libonnxruntime.so` (the library inside the PyPI `onnxruntime` wheel; `cargo xtask
//! onnxruntime` fetches it), so an agent without it still runs every other kind of task.
//!
//! Tensors travel as raw little-endian bytes. Each input port must be a tensor type; its shape
//! comes from the port type, with at most one dynamic dimension, inferred from the byte length.
//! The task's output is the model's first output.

use bytes::Bytes;
use prescient_schemas::{DType, PortType, Task};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where `libonnxruntime.so` is looked for, in order.
pub fn runtime_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("PRESCIENT_ONNXRUNTIME") {
        out.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            // target/{debug,release}/ -> target/onnxruntime/lib (what the xtask installs)
            out.push(dir.join("../onnxruntime/lib/libonnxruntime.so"));
            out.push(dir.join("onnxruntime/lib/libonnxruntime.so"));
        }
    }
    out.push("/usr/local/lib/libonnxruntime.so".into());
    out.push("/usr/lib/libonnxruntime.so".into());
    out
}

fn runtime() -> Result<&'static ort::environment::Environment, String> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let candidates = runtime_candidates();
        let Some(path) = candidates.iter().find(|p| p.exists()) else {
            return Err(format!(
                "ONNX Runtime not found (looked for {}); set PRESCIENT_ONNXRUNTIME or run `cargo xtask onnxruntime`",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        ort::init_from(path)
            .map_err(|e| format!("loading ONNX Runtime from {}: {e}", path.display()))?
            .with_name("prescient")
            .build()
            .map_err(|e| format!("starting ONNX Runtime from {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(Clone::clone)
}

struct Input {
    name: String,
    dtype: DType,
    shape: Vec<i64>,
}

pub struct OnnxModel {
    session: RefCell<ort::session::Session>,
    inputs: Vec<Input>,
    output: String,
}

fn elem_size(d: DType) -> Option<usize> {
    match d {
        DType::F32 | DType::I32 => Some(4),
        DType::F64 | DType::I64 => Some(8),
        DType::U8 | DType::I8 | DType::Bool => Some(1),
        _ => None,
    }
}

impl OnnxModel {
    /// Loads the model at `path` for `task`, matching the task's input ports to the model's
    /// inputs in order.
    pub fn load(path: &Path, task: &Task) -> Result<OnnxModel, String> {
        let env = runtime()?;
        let session = ort::session::Session::builder(env)
            .and_then(|mut b| b.commit_from_file(path))
            .map_err(|e| format!("loading model {}: {e}", path.display()))?;
        let model_inputs: Vec<String> = session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        if model_inputs.len() != task.inputs.len() {
            return Err(format!(
                "task {} has {} input ports but the model takes {} inputs ({})",
                task.id,
                task.inputs.len(),
                model_inputs.len(),
                model_inputs.join(", ")
            ));
        }
        let mut inputs = Vec::new();
        for (port, name) in task.inputs.iter().zip(model_inputs) {
            let PortType::Tensor { dtype, shape } = &port.ty else {
                return Err(format!(
                    "task {}: input port {} must be a tensor type for an ONNX model",
                    task.id, port.name
                ));
            };
            if elem_size(*dtype).is_none() {
                return Err(format!(
                    "task {}: dtype {} is not supported for ONNX inputs yet",
                    task.id,
                    dtype.as_str()
                ));
            }
            let shape = shape.clone().unwrap_or_else(|| vec![-1]);
            if shape.iter().filter(|d| **d < 0).count() > 1 {
                return Err(format!(
                    "task {}: input port {} may have at most one dynamic dimension",
                    task.id, port.name
                ));
            }
            inputs.push(Input {
                name,
                dtype: *dtype,
                shape,
            });
        }
        let output = session
            .outputs()
            .first()
            .map(|o| o.name().to_string())
            .ok_or("the model has no outputs")?;
        Ok(OnnxModel {
            session: RefCell::new(session),
            inputs,
            output,
        })
    }

    pub fn run(&self, inputs: &[Bytes]) -> Result<Bytes, String> {
        let mut values: Vec<(
            std::borrow::Cow<'static, str>,
            ort::session::SessionInputValue<'static>,
        )> = Vec::new();
        for (spec, bytes) in self.inputs.iter().zip(inputs) {
            let size = elem_size(spec.dtype).expect("checked at load");
            if bytes.len() % size != 0 {
                return Err(format!(
                    "input {}: {} bytes is not a whole number of {}",
                    spec.name,
                    bytes.len(),
                    spec.dtype.as_str()
                ));
            }
            let elems = bytes.len() / size;
            let known: i64 = spec.shape.iter().filter(|d| **d >= 0).product();
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .map(|d| {
                    if *d < 0 {
                        elems / known.max(1) as usize
                    } else {
                        *d as usize
                    }
                })
                .collect();
            if shape.iter().product::<usize>() != elems {
                return Err(format!(
                    "input {}: {elems} elements do not fit shape {:?}",
                    spec.name, spec.shape
                ));
            }
            let value: ort::session::SessionInputValue<'static> = match spec.dtype {
                DType::F32 => tensor(shape, bytes, f32::from_le_bytes)?,
                DType::F64 => tensor(shape, bytes, f64::from_le_bytes)?,
                DType::I32 => tensor(shape, bytes, i32::from_le_bytes)?,
                DType::I64 => tensor(shape, bytes, i64::from_le_bytes)?,
                DType::U8 | DType::Bool => tensor(shape, bytes, u8::from_le_bytes)?,
                DType::I8 => tensor(shape, bytes, i8::from_le_bytes)?,
                _ => unreachable!("checked at load"),
            };
            values.push((spec.name.clone().into(), value));
        }
        let mut session = self.session.borrow_mut();
        let outputs = session
            .run(values)
            .map_err(|e| format!("inference failed: {e}"))?;
        let out = &outputs[self.output.as_str()];
        if let Ok((_, data)) = out.try_extract_tensor::<f32>() {
            return Ok(Bytes::from(
                data.iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ));
        }
        if let Ok((_, data)) = out.try_extract_tensor::<i64>() {
            return Ok(Bytes::from(
                data.iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ));
        }
        Err(format!(
            "output {} has a type this agent cannot return yet",
            self.output
        ))
    }
}

fn tensor<T, const N: usize>(
    shape: Vec<usize>,
    bytes: &[u8],
    from: fn([u8; N]) -> T,
) -> Result<ort::session::SessionInputValue<'static>, String>
where
    T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    let data: Vec<T> = bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().expect("chunks are N bytes")))
        .collect();
    let t = ort::value::Tensor::from_array((shape, data)).map_err(|e| e.to_string())?;
    Ok(t.into())
}
