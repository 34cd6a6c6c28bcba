//! `exec` task code: an uploaded executable run as a long-lived subprocess of the worker,
//! speaking `exec.capnp` (requests on its stdin, responses on its stdout, paired by id).
//!
//! Architecture invariant: an artifact is only ever run from a local copy whose sha256 was
//! checked against the digest in the graph just before use.

use super::TaskError;
use bytes::Bytes;
use prescient_schemas::codec::text;
use prescient_schemas::exec_capnp::{exec_request, exec_response};
use prescient_schemas::Digest;
use sha2::Digest as _;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::error;

/// Why an artifact could not be started.
#[derive(Debug, Error)]
pub enum ArtifactError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("artifact digest mismatch: the graph names {expected} but the bytes hash to {actual}; refusing to run it")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("starting {path}: {source}")]
    Start {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks that the file at `path` has the sha256 `expected`.
pub fn verify(path: &Path, expected: &Digest) -> Result<(), ArtifactError> {
    let bytes = std::fs::read(path).map_err(|source| ArtifactError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let actual = Digest(sha2::Sha256::digest(&bytes).into());
    if actual != *expected {
        return Err(ArtifactError::DigestMismatch {
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

type Pending = RefCell<HashMap<u64, oneshot::Sender<Result<Bytes, TaskError>>>>;

/// Gauges an artifact may keep (names beyond these are ignored, so a buggy artifact cannot
/// grow the worker's memory or telemetry without bound).
pub const MAX_GAUGES: usize = 16;

/// A running artifact.
pub struct ExecProcess {
    requests: mpsc::UnboundedSender<Vec<u8>>,
    pending: Rc<Pending>,
    /// The latest value of each gauge the artifact reported (at most `MAX_GAUGES`).
    gauges: Rc<RefCell<HashMap<String, f64>>>,
    next: Cell<u64>,
    _child: tokio::process::Child,
}

impl ExecProcess {
    /// Starts the artifact. If it exits, the worker exits too, so the agent reports the
    /// replica lost and the control node replaces it.
    pub fn start(path: &Path, args: &[String]) -> Result<Rc<ExecProcess>, ArtifactError> {
        let mut child = tokio::process::Command::new(path)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ArtifactError::Start {
                path: path.to_path_buf(),
                source,
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (requests, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::task::spawn_local(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(frame) = rx.recv().await {
                if stdin.write_all(&frame).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
        });
        let pending: Rc<Pending> = Rc::default();
        let p = pending.clone();
        let gauges: Rc<RefCell<HashMap<String, f64>>> = Rc::default();
        let g = gauges.clone();
        let shown = path.display().to_string();
        tokio::task::spawn_local(async move {
            let mut reader = futures::io::BufReader::new(
                tokio_util::compat::TokioAsyncReadCompatExt::compat(stdout),
            );
            let why = loop {
                let msg = match capnp_futures::serialize::try_read_message(
                    &mut reader,
                    capnp::message::ReaderOptions::new(),
                )
                .await
                {
                    Ok(Some(m)) => m,
                    Ok(None) => break "it exited".to_string(),
                    Err(e) => break format!("it wrote a malformed response: {e}"),
                };
                let decoded = msg.get_root::<exec_response::Reader<'_>>().and_then(|r| {
                    let error = text(r.get_error())?;
                    if r.has_metrics() {
                        let mut g = g.borrow_mut();
                        for m in r.get_metrics()? {
                            let name = text(m.get_name())?;
                            let v = m.get_value();
                            if !v.is_finite() || name.is_empty() || name.len() > 64 {
                                continue;
                            }
                            if g.len() < MAX_GAUGES || g.contains_key(&name) {
                                g.insert(name, v);
                            }
                        }
                    }
                    Ok((r.get_id(), Bytes::copy_from_slice(r.get_output()?), error))
                });
                match decoded {
                    Ok((id, output, error)) => {
                        if let Some(tx) = p.borrow_mut().remove(&id) {
                            let _ = tx.send(if error.is_empty() {
                                Ok(output)
                            } else {
                                Err(TaskError::Artifact(error))
                            });
                        }
                    }
                    Err(e) => break format!("it wrote a malformed response: {e}"),
                }
            };
            error!(artifact = %shown, "exec artifact stopped serving: {why}; the worker exits");
            for (_, tx) in p.borrow_mut().drain() {
                let _ = tx.send(Err(TaskError::ExecStopped(why.clone())));
            }
            std::process::exit(3);
        });
        Ok(Rc::new(ExecProcess {
            requests,
            pending,
            gauges,
            next: Cell::new(1),
            _child: child,
        }))
    }

    /// The latest value of every gauge the artifact reported.
    pub fn gauges(&self) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self
            .gauges
            .borrow()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub async fn run(&self, inputs: &[Bytes]) -> Result<Bytes, TaskError> {
        let id = self.next.get();
        self.next.set(id + 1);
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut r = msg.init_root::<exec_request::Builder<'_>>();
            r.set_id(id);
            let mut l = r.init_inputs(inputs.len() as u32);
            for (i, input) in inputs.iter().enumerate() {
                l.set(i as u32, input);
            }
        }
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(id, tx);
        if self
            .requests
            .send(capnp::serialize::write_message_to_words(&msg))
            .is_err()
        {
            self.pending.borrow_mut().remove(&id);
            return Err(TaskError::ExecNotRunning);
        }
        rx.await
            .map_err(|_| TaskError::ExecStopped("its reply was lost".into()))?
    }
}
