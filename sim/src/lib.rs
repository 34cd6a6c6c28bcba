//! The fleet simulator: the decision crate's policies driven in virtual time on real traces,
//! deterministic for a seed. This first part runs the `kpa-nasa` reference scenario (one service
//! on the NASA trace, checked against Knative's autoscaler); the whole-cluster simulation that
//! drives `plan` comes next.
//!
//! - [`trace`] — trace files (NASA per-second counts).
//! - [`queue`] — one service's FIFO queue, replicas with a lead time, billing, measurement
//!   (per-second counts, or explicit requests with their own service times).
//! - [`scalers`] — KPA and the oracle.
//! - [`kpa_nasa`] — the reference scenario and its report; [`azure`] — the Azure Functions
//!   sample's busiest functions as services, each on its own; [`llm`] — the Azure LLM trace
//!   as one service with a token-based service time.

pub mod azure;
pub mod cluster;
pub mod fleet;
pub mod kpa_nasa;
pub mod llm;
pub mod queue;
pub mod scalers;
pub mod trace;

/// The trained forecasting model on ONNX Runtime, or `None` (the baselines alone) where the
/// runtime cannot be loaded, said once.
pub fn model() -> Option<Box<dyn prescient_policy::forecast::Model>> {
    static SAID: std::sync::Once = std::sync::Once::new();
    match prescient_onnx::forecaster::Forecaster::load() {
        Ok(m) => Some(Box::new(m)),
        Err(e) => {
            SAID.call_once(|| eprintln!("forecasting with the baselines alone: {e}"));
            None
        }
    }
}
