//! What runs a task's code in a worker: a builtin kernel, an artifact subprocess speaking
//! `exec.capnp`, or an ONNX model (ONNX Runtime loaded at run time).

pub mod builtin;
pub mod exec;
pub mod onnx;
pub mod sent;

use bytes::Bytes;
use std::rc::Rc;
use thiserror::Error;

/// Why one execution of a task failed. It travels to the caller as text, so each says what
/// failed in words a pipeline owner reads.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum TaskError {
    /// The builtin `fail` kernel failed, as its `p` asks.
    #[error("kernel `fail` failed as configured")]
    Injected,
    #[error("input is not UTF-8: {0}")]
    NotUtf8(std::str::Utf8Error),
    /// An exec artifact answered with an error of its own.
    #[error("{0}")]
    Artifact(String),
    #[error("the exec artifact is not running")]
    ExecNotRunning,
    #[error("the exec artifact stopped: {0}")]
    ExecStopped(String),
    #[error(transparent)]
    Onnx(#[from] onnx::OnnxError),
}

/// What runs a task: a builtin kernel, an artifact subprocess, or an ONNX model.
pub enum Runner {
    Builtin(builtin::Kernel),
    Exec(Rc<exec::ExecProcess>),
    Onnx(Rc<onnx::OnnxModel>),
}

impl Runner {
    pub async fn run(
        &self,
        inputs: &[Bytes],
        rng: &prescient_policy::balance::Rng,
    ) -> Result<Bytes, TaskError> {
        match self {
            Runner::Builtin(k) => k.run(inputs, rng).await,
            Runner::Exec(p) => p.run(inputs).await,
            Runner::Onnx(m) => Ok(m.run(inputs)?),
        }
    }
}
