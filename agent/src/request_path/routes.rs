//! Routing tables: which replicas serve each task, indexed for the request path. The choice of
//! one per request is `prescient_policy::balance` (rendezvous for joins, power of two choices
//! on outstanding requests with chain affinity), over this table and the peer pool's load.

use crate::dataplane::PeerPool;
pub use prescient_policy::balance::Rng;
use prescient_policy::balance::{self, Candidate, Load};
use prescient_schemas::agent_capnp::routing_table;
use prescient_schemas::{codec, Endpoint, GraphRecord};
use std::collections::HashMap;
use std::rc::Rc;

/// Why a routing table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("{0}")]
    Wire(#[from] capnp::Error),
    #[error("its graph: {0}")]
    Graph(#[from] codec::DecodeError),
}

/// A (task, input port) an output feeds.
pub type InputPort = (Rc<str>, Rc<str>);

#[derive(Debug, Clone)]
pub struct Route {
    pub replica: Rc<str>,
    pub host: Rc<str>,
    pub addr: Rc<str>,
}

/// One graph's routing table, indexed for the request path.
#[derive(Debug)]
pub struct GraphRoutes {
    pub graph_id: Rc<str>,
    pub epoch: u64,
    pub record: GraphRecord,
    replicas: HashMap<String, Vec<Route>>,
    /// (task, output port) -> the input ports it feeds.
    targets: HashMap<(String, String), Vec<InputPort>>,
    /// task -> its input port names, in declaration order.
    pub inputs: HashMap<String, Vec<String>>,
    pub graph_inputs: Vec<Endpoint>,
    pub graph_outputs: Vec<Endpoint>,
}

impl GraphRoutes {
    pub fn decode(r: routing_table::Reader<'_>) -> Result<GraphRoutes, RoutesError> {
        let record = codec::decode_record(r.get_graph()?)?;
        let mut replicas: HashMap<String, Vec<Route>> = HashMap::new();
        for e in r.get_entries()? {
            replicas
                .entry(codec::text(e.get_task())?)
                .or_default()
                .push(Route {
                    replica: codec::text(e.get_replica())?.into(),
                    host: codec::text(e.get_host())?.into(),
                    addr: codec::text(e.get_data_plane_addr())?.into(),
                });
        }
        Ok(GraphRoutes::new(record, r.get_epoch(), replicas))
    }

    pub fn new(record: GraphRecord, epoch: u64, replicas: HashMap<String, Vec<Route>>) -> Self {
        let g = &record.graph;
        let mut targets: HashMap<(String, String), Vec<InputPort>> = HashMap::new();
        for e in &g.edges {
            targets
                .entry((e.from.task.clone(), e.from.port.clone()))
                .or_default()
                .push((e.to.task.as_str().into(), e.to.port.as_str().into()));
        }
        let inputs = g
            .tasks
            .iter()
            .map(|t| {
                (
                    t.id.clone(),
                    t.inputs.iter().map(|p| p.name.clone()).collect(),
                )
            })
            .collect();
        let fed: std::collections::HashSet<_> = g.edges.iter().map(|e| e.to.clone()).collect();
        let used: std::collections::HashSet<_> = g.edges.iter().map(|e| e.from.clone()).collect();
        let mut graph_inputs = Vec::new();
        let mut graph_outputs = Vec::new();
        for t in &g.tasks {
            for p in &t.inputs {
                let ep = Endpoint {
                    task: t.id.clone(),
                    port: p.name.clone(),
                };
                if !fed.contains(&ep) {
                    graph_inputs.push(ep);
                }
            }
            for p in &t.outputs {
                let ep = Endpoint {
                    task: t.id.clone(),
                    port: p.name.clone(),
                };
                if !used.contains(&ep) {
                    graph_outputs.push(ep);
                }
            }
        }
        GraphRoutes {
            graph_id: record.id.as_str().into(),
            epoch,
            record,
            replicas,
            targets,
            inputs,
            graph_inputs,
            graph_outputs,
        }
    }

    /// The input ports an output port feeds; empty for a graph output.
    pub fn targets(&self, task: &str, port: &str) -> &[InputPort] {
        self.targets
            .get(&(task.to_string(), port.to_string()))
            .map_or(&[], Vec::as_slice)
    }

    pub fn replicas(&self, task: &str) -> &[Route] {
        self.replicas.get(task).map_or(&[], Vec::as_slice)
    }

    /// Picks the replica of `task` for this request, skipping `exclude`d addresses.
    pub fn choose(
        &self,
        task: &str,
        invocation: u64,
        local_host: &str,
        pool: &PeerPool,
        exclude: &[Rc<str>],
        rng: &Rng,
    ) -> Option<&Route> {
        let req = balance::Request {
            invocation,
            join: self.inputs.get(task).is_some_and(|i| i.len() > 1),
            local_host,
        };
        balance::choose(
            self.replicas(task),
            &req,
            |r| !exclude.iter().any(|x| **x == *r.addr),
            pool,
            rng,
        )
    }
}

impl Candidate for Route {
    fn replica(&self) -> &str {
        &self.replica
    }
    fn host(&self) -> &str {
        &self.host
    }
}

/// The data plane's load: a peak-EWMA of each replica's send-to-ack time weighted by the
/// requests outstanding to it, so a slow replica gets less traffic before any controller acts.
impl Load<Route> for PeerPool {
    type Metric = f64;
    fn load(&self, r: &Route) -> f64 {
        PeerPool::load(self, &r.addr)
    }
}

/// A generator seeded from the clock and the process id.
pub fn rng_from_entropy() -> Rng {
    let t = crate::dataplane::now_unix_ns();
    Rng::new(t ^ (u64::from(std::process::id()) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prescient_schemas::file;

    fn routes(replicas: &[(&str, &str, &str, &str)]) -> GraphRoutes {
        let g = file::parse(
            "t.toml",
            r#"
name = "t"
[[task]]
id = "a"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "1ms"
[[task]]
id = "j"
code = { builtin = "identity" }
inputs = { l = "bytes", r = "bytes" }
outputs = { z = "bytes" }
estimate = "1ms"
[[edge]]
from = "a.y"
to = "j.l"
"#,
        )
        .unwrap()
        .graph;
        let record = GraphRecord {
            id: "g1".into(),
            version: 1,
            submitted_at_ms: 0,
            digest: codec::graph_digest(&g),
            graph: g,
        };
        let mut map: HashMap<String, Vec<Route>> = HashMap::new();
        for (task, replica, host, addr) in replicas {
            map.entry(task.to_string()).or_default().push(Route {
                replica: (*replica).into(),
                host: (*host).into(),
                addr: (*addr).into(),
            });
        }
        GraphRoutes::new(record, 1, map)
    }

    #[test]
    fn ports_and_targets() {
        let r = routes(&[]);
        assert_eq!(r.targets("a", "y").len(), 1);
        assert!(r.targets("j", "z").is_empty());
        assert_eq!(r.graph_inputs.len(), 2, "a.x and j.r are unfed");
        assert_eq!(r.graph_outputs[0].to_string(), "j.z");
    }

    #[test]
    fn affinity_prefers_the_local_host() {
        let r = routes(&[("a", "r1", "h1", "1:1"), ("a", "r2", "h2", "2:2")]);
        let (pool, _lost) = PeerPool::new();
        let rng = Rng::new(7);
        for i in 0..50 {
            assert_eq!(
                &*r.choose("a", i, "h2", &pool, &[], &rng).unwrap().replica,
                "r2"
            );
        }
        // Excluding the local replica falls back to the remote one.
        let ex: Rc<str> = "2:2".into();
        assert_eq!(
            &*r.choose("a", 1, "h2", &pool, &[ex], &rng).unwrap().replica,
            "r1"
        );
    }

    #[test]
    fn joins_are_sticky_per_invocation_and_spread_across_invocations() {
        let r = routes(&[
            ("j", "r1", "h1", "1:1"),
            ("j", "r2", "h1", "2:2"),
            ("j", "r3", "h1", "3:3"),
        ]);
        let (pool, _lost) = PeerPool::new();
        let rng = Rng::new(7);
        let mut seen = std::collections::HashSet::new();
        for inv in 0..100 {
            let first = r
                .choose("j", inv, "h1", &pool, &[], &rng)
                .unwrap()
                .replica
                .clone();
            for _ in 0..3 {
                assert_eq!(
                    r.choose("j", inv, "h1", &pool, &[], &rng).unwrap().replica,
                    first
                );
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3);
    }
}
