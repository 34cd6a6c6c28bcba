//! Builtin kernels shipped with the agent: what `code = { builtin = "NAME" }` runs.
//!
//! Every kernel takes its inputs in port order and produces one value, sent on every output
//! port. With several inputs, pass-through kernels concatenate them in port order.

use super::TaskError;
use crate::request_path::routes::Rng;
use bytes::Bytes;
use prescient_schemas::quantity::parse_duration_ns;
use prescient_schemas::{CodeKind, CodeRef};
use sha2::Digest as _;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A task's code that this agent cannot run.
#[derive(Debug, Error, PartialEq)]
pub enum KernelError {
    #[error("unknown builtin kernel {0:?} (known: identity, sleep, cpu_burn, sha256, fail, tokenize, embed)")]
    Unknown(String),
    #[error("builtin {kernel:?}: parameter {param:?}: {message}")]
    Param {
        kernel: String,
        param: String,
        message: String,
    },
    #[error("{0} code is not supported by this agent yet")]
    Unsupported(&'static str),
}

/// How long a `sleep` kernel sleeps.
#[derive(Debug, Clone, PartialEq)]
pub enum Delay {
    Fixed(Duration),
    Uniform { lo: Duration, hi: Duration },
    Exponential { mean: Duration },
    LogNormal { mean: Duration, sigma: f64 },
}

impl Delay {
    pub fn sample(&self, rng: &Rng) -> Duration {
        match self {
            Delay::Fixed(d) => *d,
            Delay::Uniform { lo, hi } => *lo + (*hi - *lo).mul_f64(rng.unit()),
            Delay::Exponential { mean } => mean.mul_f64(-rng.unit().ln()),
            Delay::LogNormal { mean, sigma } => {
                // Parameterised by its mean: mu = ln(mean) - sigma^2 / 2.
                let factor = (sigma * rng.normal() - sigma * sigma / 2.0).exp();
                mean.mul_f64(factor.min(100.0))
            }
        }
    }
}

/// A `sleep` kernel's stragglers: with probability `p`, an execution is `factor` times slower
/// (a GC pause, a noisy neighbour, a throttled clock).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Straggler {
    pub p: f64,
    pub factor: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    /// Passes its input through.
    Identity,
    /// Sleeps (without using CPU), then passes its input through; a straggler (probability
    /// `p`) sleeps `factor` times as long.
    Sleep(Delay, Option<Straggler>),
    /// Spins the CPU for `us` microseconds, then passes its input through.
    CpuBurn { us: u64 },
    /// The sha256 of its input.
    Sha256,
    /// Fails with probability `p`, else passes its input through: for testing error paths.
    Fail { p: f64 },
    /// Splits UTF-8 text on whitespace; outputs the tokens as a JSON array.
    Tokenize,
    /// A deterministic `dim`-float (f32, little-endian) embedding of its input.
    Embed { dim: usize },
}

/// This thread's CPU time (ns).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID needs no setup.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        // No thread clock: wall time, so the loop still ends.
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        return ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

fn param<'a>(code: &'a CodeRef, key: &str) -> Option<&'a str> {
    code.params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Kernel {
    pub fn from_code(code: &CodeRef) -> Result<Kernel, KernelError> {
        let name = match &code.kind {
            CodeKind::Builtin { name } => name.as_str(),
            CodeKind::Exec { .. } => return Err(KernelError::Unsupported("exec")),
            CodeKind::Onnx { .. } => return Err(KernelError::Unsupported("onnx")),
            CodeKind::GpuKernel { .. } => return Err(KernelError::Unsupported("gpu_kernel")),
        };
        let err = |param: &str, message: String| KernelError::Param {
            kernel: name.into(),
            param: param.into(),
            message,
        };
        let duration = |key: &str, default: &str| -> Result<Duration, KernelError> {
            let v = param(code, key).unwrap_or(default);
            parse_duration_ns(v)
                .map(Duration::from_nanos)
                .map_err(|e| err(key, e.to_string()))
        };
        let number = |key: &str, default: f64| -> Result<f64, KernelError> {
            match param(code, key) {
                None => Ok(default),
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| err(key, format!("{v:?} is not a non-negative number"))),
            }
        };
        Ok(match name {
            "identity" => Kernel::Identity,
            "sha256" => Kernel::Sha256,
            "tokenize" => Kernel::Tokenize,
            "cpu_burn" => Kernel::CpuBurn {
                us: number("us", 100.0)? as u64,
            },
            "fail" => {
                let p = number("p", 1.0)?;
                if p > 1.0 {
                    return Err(err("p", "must be between 0 and 1".into()));
                }
                Kernel::Fail { p }
            }
            "embed" => Kernel::Embed {
                dim: (number("dim", 16.0)? as usize).clamp(1, 1 << 20),
            },
            "sleep" => {
                let mean = duration("mean", "1ms")?;
                let p = number("straggler_p", 0.0)?;
                if p > 1.0 {
                    return Err(err("straggler_p", "must be between 0 and 1".into()));
                }
                let straggler = (p > 0.0)
                    .then(|| number("straggler_x", 10.0).map(|factor| Straggler { p, factor }))
                    .transpose()?;
                let delay = match param(code, "dist").unwrap_or("fixed") {
                    "fixed" => Delay::Fixed(mean),
                    "uniform" => Delay::Uniform {
                        lo: duration("min", "0s")?,
                        hi: duration("max", &format!("{}ns", mean.as_nanos() * 2))?,
                    },
                    "exponential" => Delay::Exponential { mean },
                    "lognormal" => Delay::LogNormal {
                        mean,
                        sigma: number("sigma", 0.5)?,
                    },
                    other => {
                        return Err(err(
                            "dist",
                            format!("{other:?}: expected fixed, uniform, exponential or lognormal"),
                        ))
                    }
                };
                Kernel::Sleep(delay, straggler)
            }
            other => return Err(KernelError::Unknown(other.into())),
        })
    }

    /// Runs the kernel on `inputs` (in port order).
    pub async fn run(&self, inputs: &[Bytes], rng: &Rng) -> Result<Bytes, TaskError> {
        let joined = || -> Bytes {
            match inputs {
                [one] => one.clone(),
                many => Bytes::from(many.concat()),
            }
        };
        match self {
            Kernel::Identity => Ok(joined()),
            Kernel::Sleep(d, straggler) => {
                let mut t = d.sample(rng);
                if let Some(s) = straggler.filter(|s| rng.unit() < s.p) {
                    t = t.mul_f64(s.factor.clamp(0.0, 1000.0));
                }
                tokio::time::sleep(t).await;
                Ok(joined())
            }
            Kernel::CpuBurn { us } => {
                // CPU time, not wall time: on a contended or throttled host the same work
                // takes longer, as real compute does.
                let until = thread_cpu_ns() + us.saturating_mul(1000);
                let mut x = 0u64;
                while thread_cpu_ns() < until {
                    for _ in 0..64 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
                Ok(joined())
            }
            Kernel::Sha256 => {
                let mut h = sha2::Sha256::new();
                for i in inputs {
                    h.update(i);
                }
                Ok(Bytes::copy_from_slice(&h.finalize()))
            }
            Kernel::Fail { p } => {
                if rng.unit() <= *p {
                    Err(TaskError::Injected)
                } else {
                    Ok(joined())
                }
            }
            Kernel::Tokenize => {
                let input = joined();
                let text = std::str::from_utf8(&input).map_err(TaskError::NotUtf8)?;
                let tokens: Vec<String> = text
                    .split_whitespace()
                    .map(|t| format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")))
                    .collect();
                Ok(Bytes::from(format!("[{}]", tokens.join(","))))
            }
            Kernel::Embed { dim } => {
                let seed = sha2::Sha256::digest(joined());
                let rng = Rng::new(u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")));
                let mut out = Vec::with_capacity(dim * 4);
                for _ in 0..*dim {
                    out.extend_from_slice(&((rng.unit() * 2.0 - 1.0) as f32).to_le_bytes());
                }
                Ok(Bytes::from(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(name: &str, params: &[(&str, &str)]) -> CodeRef {
        CodeRef {
            kind: CodeKind::Builtin { name: name.into() },
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[tokio::test]
    async fn kernels_compute() {
        let rng = Rng::new(3);
        let k = Kernel::from_code(&code("sha256", &[])).unwrap();
        let out = k.run(&[Bytes::from_static(b"abc")], &rng).await.unwrap();
        assert_eq!(
            out.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let id = Kernel::from_code(&code("identity", &[])).unwrap();
        let out = id
            .run(&[Bytes::from_static(b"a"), Bytes::from_static(b"b")], &rng)
            .await
            .unwrap();
        assert_eq!(&out[..], b"ab");
        let tok = Kernel::from_code(&code("tokenize", &[])).unwrap();
        let out = tok
            .run(&[Bytes::from_static(b"hi \"you\"")], &rng)
            .await
            .unwrap();
        assert_eq!(&out[..], br#"["hi","\"you\""]"#);
        let e = Kernel::from_code(&code("embed", &[("dim", "4")])).unwrap();
        let a = e.run(&[Bytes::from_static(b"x")], &rng).await.unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(a, e.run(&[Bytes::from_static(b"x")], &rng).await.unwrap());
    }

    #[test]
    fn bad_params_are_named() {
        assert_eq!(
            Kernel::from_code(&code("nope", &[])),
            Err(KernelError::Unknown("nope".into()))
        );
        let e = Kernel::from_code(&code("sleep", &[("dist", "zipf")])).unwrap_err();
        assert!(e.to_string().contains("\"dist\""), "{e}");
        let e = Kernel::from_code(&code("sleep", &[("mean", "soon")])).unwrap_err();
        assert!(e.to_string().contains("\"mean\""), "{e}");
    }

    #[test]
    fn lognormal_mean_is_its_mean() {
        let rng = Rng::new(11);
        let d = Delay::LogNormal {
            mean: Duration::from_millis(2),
            sigma: 0.5,
        };
        let n = 20_000;
        let total: f64 = (0..n).map(|_| d.sample(&rng).as_secs_f64()).sum();
        let mean = total / n as f64;
        assert!((mean - 0.002).abs() < 0.0001, "mean {mean}");
    }
}
