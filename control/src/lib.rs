//! The Prescient control node: the Cap'n Proto API, the durable graph registry, the event log,
//! the monitoring store, and the executor of the decisions `prescient-policy` takes.

pub mod artifacts;
pub mod clock;
pub mod cluster;
pub mod events;
pub mod forecasting;
pub mod gauges;
pub mod metrics;
pub mod monitor;
pub mod readings;
pub mod replica_windows;
pub mod samples;
pub mod server;
pub mod session;
pub mod store;

pub use cluster::{Cluster, ClusterConfig};
pub use server::{serve, Control, Limits};
pub use store::{Event, Registry, StoreError};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

/// How a control node is started.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub cluster: ClusterConfig,
}

/// Why the control node could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The registry under the data directory could not be opened.
    #[error("opening the registry in {dir}: {source}")]
    Registry { dir: PathBuf, source: StoreError },
    /// The artifact store under the data directory could not be opened.
    #[error("opening the artifact store: {0}")]
    Artifacts(artifacts::ArtifactError),
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound, ready control node.
pub struct ControlNode {
    pub local_addr: SocketAddr,
    listener: tokio::net::TcpListener,
    control: Control,
    cluster: std::rc::Rc<Cluster>,
    limits: Limits,
}

impl ControlNode {
    /// Opens the registry and binds the listener; serving starts with [`ControlNode::run`].
    pub async fn bind(config: Config) -> Result<ControlNode, StartError> {
        let dir = config.data_dir.clone();
        let registry = tokio::task::spawn_blocking(move || Registry::open(&dir))
            .await
            .expect("registry open does not panic")
            .map_err(|source| StartError::Registry {
                dir: config.data_dir.clone(),
                source,
            })?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let artifacts =
            artifacts::ArtifactStore::open(&config.data_dir).map_err(StartError::Artifacts)?;
        let registry = Arc::new(registry);
        let events = events::EventLog::new(registry.clone());
        let cluster = Cluster::new(config.cluster, registry.clone(), events.clone());
        Ok(ControlNode {
            local_addr,
            listener,
            control: Control::new(registry, events, cluster.clone(), artifacts),
            cluster,
            limits: config.limits,
        })
    }

    /// The live cluster state (for `/metrics`).
    pub fn cluster(&self) -> std::rc::Rc<Cluster> {
        self.cluster.clone()
    }

    /// Serves until the future is dropped. Must run inside a `tokio::task::LocalSet`.
    pub async fn run(self) {
        tokio::task::spawn_local(self.cluster.run());
        serve(self.listener, self.control, self.limits).await
    }
}
