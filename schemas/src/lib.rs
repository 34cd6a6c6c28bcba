//! Cap'n Proto schemas, their generated code, and the task-graph model with its validation.
//!
//! The model ([`TaskGraph`]) is plain Rust; [`codec`] converts it to and from the wire types
//! losslessly, [`file`] reads the TOML graph format, and [`validate`] checks a graph and exposes
//! what the controllers work on (topological order, chains).

#[allow(clippy::all, clippy::pedantic, unused, missing_docs)]
pub mod generated {
    pub mod agent_capnp;
    pub mod api_capnp;
    pub mod dataplane_capnp;
    pub mod exec_capnp;
    pub mod graph_capnp;
}
pub use generated::{agent_capnp, api_capnp, dataplane_capnp, exec_capnp, graph_capnp};

pub mod codec;
pub mod file;
pub mod host_sample;
pub mod model;
pub mod prom;
pub mod quantity;
pub mod scaling;
pub mod sketch;
pub mod validate;

pub use model::*;
pub use scaling::{ScalingPolicy, Signal, SignalSource, TaskPolicy, TaskScaling};
pub use validate::{Problem, ValidatedGraph};
