//! The Azure LLM inference trace (`azure-llm-code`, `azure-llm-conv`) as one service: requests
//! at their real instants, each holding a replica for a service time modelled from its tokens
//! (prefill at `PREFILL_TOKENS_PER_S`, decode at `DECODE_TOKENS_PER_S`, plus a fixed
//! overhead: an assumed model, not measured), one request at a time per replica, within
//! objective when the wait is at most the mean service time; the last third measured.

use crate::kpa_nasa::{self, Policy, Run};
use crate::queue::{self, Scaler};
use crate::scalers::{Kpa, Oracle};
use crate::trace::LlmRequest;

/// Prompt tokens a replica processes per second.
pub const PREFILL_TOKENS_PER_S: f64 = 10_000.0;
/// Tokens a replica generates per second for one request.
pub const DECODE_TOKENS_PER_S: f64 = 40.0;
/// Per request, besides.
pub const OVERHEAD_S: f64 = 0.05;

/// A request's service time under the model.
pub fn service_s(r: &LlmRequest) -> f64 {
    OVERHEAD_S
        + f64::from(r.context_tokens) / PREFILL_TOKENS_PER_S
        + f64::from(r.generated_tokens) / DECODE_TOKENS_PER_S
}

/// `policy` at `lead_s` on `trace`.
pub fn run(trace: &[LlmRequest], policy: Policy, lead_s: f64, seed: u64) -> Run {
    let requests: Vec<(f64, f64)> = trace.iter().map(|r| (r.at_s, service_s(r))).collect();
    let mean = requests.iter().map(|(_, s)| s).sum::<f64>() / requests.len().max(1) as f64;
    let len_s = trace.last().map_or(0, |r| r.at_s.ceil() as usize + 1);
    let p = kpa_nasa::params(len_s, mean, lead_s, seed);
    let mut scaler: Box<dyn Scaler> = match policy {
        Policy::Reactive => Box::new(Kpa::default()),
        Policy::Prescient => Box::new(kpa_nasa::prescient_scaler(mean)),
        Policy::Predictive(warm) => {
            let scv = requests
                .iter()
                .map(|(_, s)| (s - mean).powi(2))
                .sum::<f64>()
                / requests.len().max(1) as f64
                / (mean * mean).max(1e-12);
            let mut counts = vec![0u32; len_s];
            for (a, _) in &requests {
                if let Some(c) = counts.get_mut(*a as usize) {
                    *c += 1;
                }
            }
            Box::new(kpa_nasa::predictive_scaler(&counts, &p, lead_s, scv, warm))
        }
        Policy::Oracle => Box::new(Oracle::from_requests(&requests, len_s, lead_s, p.tick_s)),
    };
    let out = queue::run_requests(&requests, len_s, p, scaler.as_mut());
    kpa_nasa::summarize(policy, lead_s, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_serves_every_request_at_once_and_the_model_is_its_sum() {
        let r = LlmRequest {
            at_s: 0.0,
            context_tokens: 5000,
            generated_tokens: 20,
        };
        assert!((service_s(&r) - (0.05 + 0.5 + 0.5)).abs() < 1e-9);
        // A request every 0.7 s for an hour.
        let trace: Vec<LlmRequest> = (0..5000)
            .map(|i| LlmRequest {
                at_s: i as f64 * 0.7,
                context_tokens: 2000 + (i % 7) * 500,
                generated_tokens: 5 + i % 11,
            })
            .collect();
        let o = run(&trace, Policy::Oracle, 30.0, 1);
        assert!(o.within_objective_pct > 99.9, "{o:?}");
        let k = run(&trace, Policy::Reactive, 30.0, 1);
        assert_eq!(k.requests, o.requests);
    }
}
