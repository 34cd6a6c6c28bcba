//! `onnx` task code: a model run with ONNX Runtime on CPU (loaded at run time by
//! `prescient-onnx`, so an agent without it still runs every other kind of task).
//!
//! Tensors travel as raw little-endian bytes. Each input port must be a tensor type; its shape
//! comes from the port type, with at most one dynamic dimension, inferred from the byte length.
//! The task's output is the model's first output.

use bytes::Bytes;
use prescient_schemas::{DType, PortType, Task};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why an ONNX model could not be loaded or run.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum OnnxError {
    #[error(transparent)]
    Runtime(#[from] prescient_onnx::RuntimeError),
    #[error("loading model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("task {task} has {ports} input ports but the model takes {inputs} inputs ({names})")]
    InputCount {
        task: String,
        ports: usize,
        inputs: usize,
        names: String,
    },
    #[error("task {task}: input port {port} {problem}")]
    Port {
        task: String,
        port: String,
        problem: &'static str,
    },
    #[error("task {task}: dtype {dtype} is not supported for ONNX inputs yet")]
    DType { task: String, dtype: &'static str },
    #[error("the model has no outputs")]
    NoOutputs,
    #[error("input {input}: {bytes} bytes is not a whole number of {dtype}")]
    Ragged {
        input: String,
        bytes: usize,
        dtype: &'static str,
    },
    #[error("input {input}: {elems} elements do not fit shape {shape:?}")]
    Shape {
        input: String,
        elems: usize,
        shape: Vec<i64>,
    },
    #[error("building a tensor: {0}")]
    Tensor(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("output {0} has a type this agent cannot return yet")]
    OutputType(String),
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
    pub fn load(path: &Path, task: &Task) -> Result<OnnxModel, OnnxError> {
        let env = prescient_onnx::runtime()?;
        let session = ort::session::Session::builder(env)
            .and_then(|mut b| b.commit_from_file(path))
            .map_err(|e| OnnxError::Model {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let model_inputs: Vec<String> = session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        if model_inputs.len() != task.inputs.len() {
            return Err(OnnxError::InputCount {
                task: task.id.clone(),
                ports: task.inputs.len(),
                inputs: model_inputs.len(),
                names: model_inputs.join(", "),
            });
        }
        let mut inputs = Vec::new();
        for (port, name) in task.inputs.iter().zip(model_inputs) {
            let PortType::Tensor { dtype, shape } = &port.ty else {
                return Err(OnnxError::Port {
                    task: task.id.clone(),
                    port: port.name.clone(),
                    problem: "must be a tensor type for an ONNX model",
                });
            };
            if elem_size(*dtype).is_none() {
                return Err(OnnxError::DType {
                    task: task.id.clone(),
                    dtype: dtype.as_str(),
                });
            }
            let shape = shape.clone().unwrap_or_else(|| vec![-1]);
            if shape.iter().filter(|d| **d < 0).count() > 1 {
                return Err(OnnxError::Port {
                    task: task.id.clone(),
                    port: port.name.clone(),
                    problem: "may have at most one dynamic dimension",
                });
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
            .ok_or(OnnxError::NoOutputs)?;
        Ok(OnnxModel {
            session: RefCell::new(session),
            inputs,
            output,
        })
    }

    pub fn run(&self, inputs: &[Bytes]) -> Result<Bytes, OnnxError> {
        let mut values: Vec<(
            std::borrow::Cow<'static, str>,
            ort::session::SessionInputValue<'static>,
        )> = Vec::new();
        for (spec, bytes) in self.inputs.iter().zip(inputs) {
            let size = elem_size(spec.dtype).expect("checked at load");
            if bytes.len() % size != 0 {
                return Err(OnnxError::Ragged {
                    input: spec.name.clone(),
                    bytes: bytes.len(),
                    dtype: spec.dtype.as_str(),
                });
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
                return Err(OnnxError::Shape {
                    input: spec.name.clone(),
                    elems,
                    shape: spec.shape.clone(),
                });
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
            .map_err(|e| OnnxError::Inference(e.to_string()))?;
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
        Err(OnnxError::OutputType(self.output.clone()))
    }
}

fn tensor<T, const N: usize>(
    shape: Vec<usize>,
    bytes: &[u8],
    from: fn([u8; N]) -> T,
) -> Result<ort::session::SessionInputValue<'static>, OnnxError>
where
    T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    let data: Vec<T> = bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().expect("chunks are N bytes")))
        .collect();
    let t = ort::value::Tensor::from_array((shape, data))
        .map_err(|e| OnnxError::Tensor(e.to_string()))?;
    Ok(t.into())
}
