//! The Prescient host agent: registers its host with the control node, provisions workers for
//! task replicas, keeps their routing tables current, and runs the ingress where invocations
//! enter. Workers (same binary, `worker` subcommand) run the task code and carry requests
//! between themselves over the data plane.
//!
//! - [`node`] — the agent process: its session with control, the `Agent` capability, the
//!   replicas it runs, its telemetry hand-off and `/metrics`.
//! - [`provision`] — provisioners (process slots today; VMs next) and cgroup limits.
//! - [`worker`] and [`runtime`] — one task replica, and what runs its code (builtin, exec, onnx).
//! - [`request_path`] — routing tables, forwarding with retry, the ingress.
//! - [`dataplane`] — frames over TCP: codec, writer, reader, peer pool.
//! - [`telemetry`] — spans, host samples, eBPF probes, socket counters.

pub mod dataplane;
pub mod guest;
pub mod node;
pub mod provision;
pub mod request_path;
pub mod runtime;
pub mod telemetry;
pub mod warmup;
pub mod worker;
