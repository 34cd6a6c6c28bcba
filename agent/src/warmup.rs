//! Warm-up: a new replica runs recent real inputs of its task (sampled by the task's other
//! replicas, handed over by the control node) at a low rate before it says it is ready, so code,
//! caches and models are loaded before it is routed; and the sampling that feeds it.

use crate::runtime::Runner;
use bytes::Bytes;
use prescient_policy::balance::Rng;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// One execution's inputs are sampled only up to this size in all.
pub const MAX_SAMPLE_BYTES: usize = 64 << 10;
/// Samples a worker holds between two telemetry flushes (one per second at most).
const MAX_PENDING: usize = 4;
/// Warm-up executions at most.
const MAX_EXECUTIONS: u32 = 64;
/// Latency is stable when this many executions in a row ...
const STABLE_RUN: usize = 3;
/// ... are each within this share of the reference.
const STABLE_WITHIN: f64 = 0.2;
/// Pause between warm-up executions (a low rate, so warm-up does not crowd its host).
const PACE: Duration = Duration::from_millis(5);

/// What a warm-up did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Warmup {
    pub elapsed: Duration,
    pub executions: u32,
    /// Its last executions were within 20% of the reference (the task's p50, or their own
    /// median where the control node knew none).
    pub stable: bool,
}

/// Runs `samples` through `kernel`, cycling, until the latency is stable, `timeout` passes or
/// `MAX_EXECUTIONS` ran. Failures count as executions (a warm-up input may be one the task
/// rejects); none of the outputs go anywhere.
pub async fn warm_up(
    kernel: &Runner,
    samples: &[Vec<Bytes>],
    target_ns: u64,
    timeout: Duration,
    rng: &Rng,
) -> Warmup {
    let started = Instant::now();
    let mut took: Vec<f64> = Vec::new();
    let mut out = Warmup::default();
    if samples.is_empty() || timeout.is_zero() {
        return out;
    }
    for inputs in samples.iter().cycle() {
        if out.executions >= MAX_EXECUTIONS || started.elapsed() >= timeout {
            break;
        }
        let t = Instant::now();
        let _ = kernel.run(inputs, rng).await;
        took.push(t.elapsed().as_nanos() as f64);
        out.executions += 1;
        if stable(&took, target_ns) {
            out.stable = true;
            break;
        }
        tokio::time::sleep(PACE).await;
    }
    out.elapsed = started.elapsed();
    out
}

/// Whether the last `STABLE_RUN` of `took` are within `STABLE_WITHIN` of the reference.
fn stable(took: &[f64], target_ns: u64) -> bool {
    if took.len() < STABLE_RUN {
        return false;
    }
    let reference = if target_ns > 0 {
        target_ns as f64
    } else {
        let mut v = took.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    took[took.len() - STABLE_RUN..]
        .iter()
        .all(|t| (t - reference).abs() <= STABLE_WITHIN * reference.max(1.0))
}

/// One execution's inputs with its graph and task.
type Sample = (Rc<str>, Rc<str>, Vec<Bytes>);

/// Recent inputs a worker sampled (one execution's per second at most), until its next flush.
#[derive(Debug, Default)]
pub struct Sampler {
    pending: RefCell<Vec<Sample>>,
    last_s: Cell<u64>,
}

impl Sampler {
    /// Keeps `inputs` if this second has no sample yet and they are small enough.
    pub fn offer(&self, graph: &Rc<str>, task: &Rc<str>, inputs: &[Bytes], now_s: u64) {
        if self.last_s.get() == now_s {
            return;
        }
        let size: usize = inputs.iter().map(|b| b.len()).sum();
        let mut pending = self.pending.borrow_mut();
        if size > MAX_SAMPLE_BYTES || pending.len() >= MAX_PENDING {
            return;
        }
        self.last_s.set(now_s);
        pending.push((graph.clone(), task.clone(), inputs.to_vec()));
    }

    /// The samples as a telemetry batch of their own, if there are any.
    pub fn take_batch(&self, host: &str) -> Option<Vec<u8>> {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        if pending.is_empty() {
            return None;
        }
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut b =
                msg.init_root::<prescient_schemas::agent_capnp::telemetry_batch::Builder<'_>>();
            b.set_host_id(host);
            let mut list = b.init_samples(pending.len() as u32);
            for (i, (graph, task, inputs)) in pending.iter().enumerate() {
                let mut s = list.reborrow().get(i as u32);
                s.set_graph_id(&**graph);
                s.set_task(&**task);
                let mut data = s.init_inputs(inputs.len() as u32);
                for (j, input) in inputs.iter().enumerate() {
                    data.set(j as u32, input);
                }
            }
        }
        Some(capnp::serialize::write_message_to_words(&msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stability_is_the_last_runs_within_a_fifth_of_the_reference() {
        assert!(!stable(&[10.0, 10.0], 10));
        assert!(stable(&[50.0, 11.0, 9.0, 10.5], 10));
        assert!(!stable(&[11.0, 9.0, 13.0], 10), "13 is 30% off");
        // No target: against their own median.
        assert!(stable(&[100.0, 20.0, 21.0, 19.0, 20.0], 0));
    }

    #[test]
    fn one_sample_a_second_small_ones_only_and_a_batch_of_them() {
        let s = Sampler::default();
        let (g, t): (Rc<str>, Rc<str>) = ("g1".into(), "t".into());
        s.offer(&g, &t, &[Bytes::from_static(b"a")], 100);
        s.offer(&g, &t, &[Bytes::from_static(b"b")], 100);
        s.offer(&g, &t, &[Bytes::from(vec![0u8; MAX_SAMPLE_BYTES + 1])], 101);
        s.offer(
            &g,
            &t,
            &[Bytes::from_static(b"c"), Bytes::from_static(b"d")],
            101,
        );
        let batch = s.take_batch("h").expect("a batch");
        let msg = capnp::serialize::read_message(&mut &batch[..], Default::default()).unwrap();
        let r = msg
            .get_root::<prescient_schemas::agent_capnp::telemetry_batch::Reader<'_>>()
            .unwrap();
        let samples = r.get_samples().unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples.get(0).get_inputs().unwrap().get(0).unwrap(), b"a");
        assert_eq!(samples.get(1).get_inputs().unwrap().len(), 2);
        assert!(s.take_batch("h").is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn warm_up_stops_once_stable_or_at_its_timeout() {
        use crate::runtime::builtin::Kernel;
        let code = prescient_schemas::CodeRef {
            kind: prescient_schemas::CodeKind::Builtin {
                name: "sleep".into(),
            },
            params: vec![("mean".into(), "20ms".into())],
        };
        let kernel = Runner::Builtin(Kernel::from_code(&code).unwrap());
        let rng = crate::request_path::routes::rng_from_entropy();
        let samples = vec![vec![Bytes::from_static(b"x")]];
        let w = warm_up(&kernel, &samples, 20_000_000, Duration::from_secs(5), &rng).await;
        assert!(w.stable && w.executions >= 3 && w.executions < 10, "{w:?}");
        // A target it can never meet: it runs until the timeout.
        let w = warm_up(&kernel, &samples, 50_000, Duration::from_millis(100), &rng).await;
        assert!(
            !w.stable && w.elapsed >= Duration::from_millis(100),
            "{w:?}"
        );
        let none = warm_up(&kernel, &[], 0, Duration::from_secs(1), &rng).await;
        assert_eq!(none, Warmup::default());
    }
}
