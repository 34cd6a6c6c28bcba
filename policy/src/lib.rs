//! Prescient's decisions, as pure functions of `(snapshot, config, now)`: the control node and
//! the simulator drive the same code, and differ only in their clock and their executor.
//!
//! - [`snapshot`] — the cluster as decisions see it (hosts, graphs wanted, deployments).
//! - [`plan()`] — one reconcile pass: snapshot in, [`Action`]s out; [`apply`] is each action's
//!   change to the snapshot, used by `plan` itself and by the executor.
//! - [`observe`] — facts the executor hears (registrations, heartbeats, provisioning results,
//!   exits), with the failure counting that backoff reads.
//! - [`scaling`] — sizing by utilisation and by the chains' objective.
//! - [`replace`] — the triggers that replace a slow, failing or contended replica.
//! - [`placement`] — which host gets a replica (fit, contention, chain locality,
//!   anti-affinity, spread).
//! - [`forecast`] — load forecasting baselines with per-series selection and an upper quantile.
//! - [`planner`] — replicas a forecast needs (Erlang C, M/G/c), ordered a lead time ahead;
//!   lead times learned per backend and host.
//! - [`predictive`] — the planner's floor and reactive sizing combined, within the policy's
//!   bounds; `forecast-only` mode.
//! - [`kpa`] — Knative's autoscaler, for the simulator to compare against.
//! - [`balance`] — which replica gets a request (rendezvous for joins, P2C with chain affinity).
//! - [`event`] — the typed events every action and observation is recorded as.
//!
//! Invariant: no I/O, no clock (clippy's `disallowed_methods` refuses `Instant::now` and
//! `SystemTime::now` here), no runtime, RPC, database, kernel or ONNX crate (`cargo xtask tidy`
//! checks the dependency allowlist).

pub mod action;
pub mod balance;
pub mod event;
pub mod forecast;
pub mod kpa;
pub mod observe;
pub mod placement;
pub mod plan;
pub mod planner;
pub mod predictive;
pub mod replace;
pub mod scaling;
pub mod snapshot;
pub mod warm;

pub use action::{apply, Action};
pub use event::Event;
pub use plan::{next_deadline, plan};
pub use snapshot::Snapshot;

use std::time::Duration;

/// The knobs of [`plan()`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// A host is lost after this long without a heartbeat.
    pub heartbeat_timeout: Duration,
    /// From the origin of `now`, how long agents get to report their replicas before anything
    /// is placed.
    pub startup_grace: Duration,
    /// Replicas of every task (the policy minimum).
    pub min_replicas: usize,
    /// After a new version's table is out, how long the old version's replicas keep serving
    /// the invocations already on their way before they are retired.
    pub drain: Duration,
    pub backoff: Backoff,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_timeout: Duration::from_secs(3),
            startup_grace: Duration::from_secs(3),
            min_replicas: 1,
            drain: Duration::from_secs(2),
            backoff: Backoff::default(),
        }
    }
}

/// Waits before re-placing a task whose replicas fail in a row (provisioning failed, or a ready
/// replica crashed): `initial`, doubling, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A replica that crashes after running this long starts the count again.
    pub stable_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(120),
            stable_after: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The wait after `failures` in a row (1: `initial`).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }
}

#[cfg(test)]
mod planner_tests;
#[cfg(test)]
mod predictive_tests;
#[cfg(test)]
mod replace_tests;
#[cfg(test)]
mod scaling_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod warm_tests;
