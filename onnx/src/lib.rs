//! ONNX Runtime, loaded at run time from `libonnxruntime.so` (the library inside the PyPI
//! `onnxruntime` wheel; `cargo xtask onnxruntime` fetches it), so a binary without it still runs
//! everything else; and the load forecaster's model, which runs on it.

pub mod forecaster;

use std::path::PathBuf;
use std::sync::OnceLock;
use thiserror::Error;

/// Where `libonnxruntime.so` is looked for, in order.
pub fn runtime_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("PRESCIENT_ONNXRUNTIME") {
        out.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            // target/{debug,release}/ and target/{debug,release}/deps/ -> target/onnxruntime
            // (where the xtask installs it)
            out.push(dir.join("../onnxruntime/lib/libonnxruntime.so"));
            out.push(dir.join("../../onnxruntime/lib/libonnxruntime.so"));
            out.push(dir.join("onnxruntime/lib/libonnxruntime.so"));
        }
    }
    out.push("/usr/local/lib/libonnxruntime.so".into());
    out.push("/usr/lib/libonnxruntime.so".into());
    out
}

/// Why ONNX Runtime could not be used.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RuntimeError {
    #[error("ONNX Runtime not found (looked for {looked}); set PRESCIENT_ONNXRUNTIME or run `cargo xtask onnxruntime`")]
    Missing { looked: String },
    #[error("{doing} ONNX Runtime from {path}: {reason}")]
    Failed {
        doing: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// The process's ONNX Runtime environment, loaded on first use (once: a failure is remembered).
pub fn runtime() -> Result<&'static ort::environment::Environment, RuntimeError> {
    static ENV: OnceLock<Result<ort::environment::Environment, RuntimeError>> = OnceLock::new();
    ENV.get_or_init(|| {
        let candidates = runtime_candidates();
        let Some(path) = candidates.iter().find(|p| p.exists()) else {
            return Err(RuntimeError::Missing {
                looked: candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let failed = |doing, e: &dyn std::fmt::Display| RuntimeError::Failed {
            doing,
            path: path.clone(),
            reason: e.to_string(),
        };
        ort::init_from(path)
            .map_err(|e| failed("loading", &e))?
            .with_name("prescient")
            .build()
            .map_err(|e| failed("starting", &e))
    })
    .as_ref()
    .map_err(Clone::clone)
}
