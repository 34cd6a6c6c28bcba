//! The Prescient host agent: registers its host with the control node, provisions workers for
//! task replicas, keeps their routing tables current, and runs the ingress where invocations
//! enter. Workers (same binary, `worker` subcommand) run the task code and carry requests
//! between themselves over the data plane.

pub mod agent;
pub mod btf;
pub mod cgroup;
pub mod clock;
pub mod dataplane;
pub mod exec;
pub mod forward;
pub mod host;
pub mod hostmon;
pub mod ingress;
pub mod kernels;
pub mod onnx;
pub mod probes;
pub mod provisioner;
pub mod routes;
pub mod sockets;
pub mod telemetry;
pub mod transfer;
pub mod worker;
