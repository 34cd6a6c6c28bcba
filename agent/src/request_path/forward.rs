//! Sending requests to a task's replicas, and retrying those lost with a connection.
//!
//! Shared by the ingress (entry tasks) and workers (downstream tasks): both hold routing
//! tables and a peer pool, and both must turn a lost request into a retry on another replica or,
//! after [`MAX_ATTEMPTS`], into an error output that names the task and the replica.

use crate::dataplane::{encode_output, now_unix_us, Hop, Lost, OutputMsg, PeerPool};
use crate::request_path::routes::{GraphRoutes, Rng};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tracing::debug;

/// Attempts per hop, the first included.
pub const MAX_ATTEMPTS: u32 = 3;

/// An invocation's deadline and the addresses one of its hops already failed on.
type FailedOn = (u64, Vec<Rc<str>>);

pub struct Forwarder {
    pub host: Rc<str>,
    pub pool: Rc<PeerPool>,
    pub routes: RefCell<HashMap<Rc<str>, Rc<GraphRoutes>>>,
    pub rng: Rng,
    /// Requests admitted under a newer routing table than this process holds yet, waiting
    /// for it (an agent never routes on a table older than a request's).
    parked: RefCell<Vec<Hop>>,
    /// Addresses each in-flight (invocation, task) has already failed on, until its deadline.
    failed: RefCell<HashMap<(u64, Rc<str>), FailedOn>>,
}

impl Forwarder {
    pub fn new(host: &str, pool: Rc<PeerPool>) -> Forwarder {
        Forwarder {
            host: host.into(),
            pool,
            routes: RefCell::default(),
            rng: crate::request_path::routes::rng_from_entropy(),
            parked: RefCell::default(),
            failed: RefCell::default(),
        }
    }

    pub fn routes(&self, graph_id: &str) -> Option<Rc<GraphRoutes>> {
        self.routes.borrow().get(graph_id).cloned()
    }

    /// Installs a table unless an equal or newer epoch is already installed, then sends the
    /// requests that were waiting for it.
    pub fn install(&self, table: GraphRoutes) -> bool {
        let (graph, epoch) = (table.graph_id.clone(), table.epoch);
        {
            let mut routes = self.routes.borrow_mut();
            if routes.get(&graph).is_some_and(|t| t.epoch >= epoch) {
                return false;
            }
            routes.insert(graph.clone(), Rc::new(table));
        }
        let ready: Vec<Hop> = {
            let mut parked = self.parked.borrow_mut();
            let (ready, wait) = parked
                .drain(..)
                .partition(|h| h.graph_id == graph && h.epoch <= epoch);
            *parked = wait;
            ready
        };
        for hop in ready {
            self.send(hop);
        }
        true
    }

    pub fn remove_graph(&self, graph_id: &str) {
        self.routes.borrow_mut().remove(graph_id);
    }

    /// Sends `hop` to a replica of `hop.task`; on no replica, reports an error output. Returns
    /// the replica's address (none: parked for a newer table, or failed).
    pub fn send(&self, hop: Hop) -> Option<Rc<str>> {
        self.send_avoiding(hop, &[])
    }

    /// Whether a replica of `task` other than those at `avoid` is in `graph_id`'s table.
    pub fn has_other(&self, graph_id: &str, task: &str, avoid: &[Rc<str>]) -> bool {
        self.routes(graph_id)
            .is_some_and(|r| r.replicas(task).iter().any(|x| !avoid.contains(&x.addr)))
    }

    /// As [`Forwarder::send`], never to a replica at `avoid` (a hedge avoids its original's).
    pub fn send_avoiding(&self, hop: Hop, avoid: &[Rc<str>]) -> Option<Rc<str>> {
        let routes = match self.routes(&hop.graph_id) {
            Some(r) if r.epoch >= hop.epoch => r,
            // The table this request was admitted under has not reached this process yet.
            _ => {
                self.parked.borrow_mut().push(hop);
                return None;
            }
        };
        // Nearly always empty: only a request lost with a replica has addresses to avoid.
        let exclude = {
            let failed = self.failed.borrow();
            let mut exclude = if failed.is_empty() {
                Vec::new()
            } else {
                failed
                    .get(&(hop.invocation, hop.task.clone()))
                    .map(|(_, a)| a.clone())
                    .unwrap_or_default()
            };
            exclude.extend(avoid.iter().cloned());
            exclude
        };
        match routes.choose(
            &hop.task,
            hop.invocation,
            &self.host,
            &self.pool,
            &exclude,
            &self.rng,
        ) {
            Some(route) => {
                let addr = route.addr.clone();
                self.pool.send_request(&addr, hop);
                Some(addr)
            }
            None => {
                self.failed
                    .borrow_mut()
                    .remove(&(hop.invocation, hop.task.clone()));
                let msg = if exclude.is_empty() {
                    format!(
                        "task {}: no replica in routing table epoch {}",
                        hop.task, routes.epoch
                    )
                } else {
                    format!(
                        "task {}: every replica failed ({})",
                        hop.task,
                        exclude.iter().map(|a| &**a).collect::<Vec<_>>().join(", ")
                    )
                };
                self.fail(&hop, msg);
                None
            }
        }
    }

    /// A request lost with its connection: retry it elsewhere, or fail the invocation.
    pub fn retry(&self, lost: Lost) {
        let Lost {
            mut hop,
            addr,
            reason,
        } = lost;
        let replica = self
            .routes(&hop.graph_id)
            .and_then(|r| {
                r.replicas(&hop.task)
                    .iter()
                    .find(|x| x.addr == addr)
                    .map(|x| x.replica.to_string())
            })
            .unwrap_or_else(|| addr.to_string());
        if hop.attempt + 1 >= MAX_ATTEMPTS || now_unix_us() > hop.deadline_unix_us {
            let msg = format!(
                "task {}: replica {replica} lost ({reason}) after {} attempts",
                hop.task,
                hop.attempt + 1
            );
            return self.fail(&hop, msg);
        }
        debug!(task = %hop.task, %replica, "retrying a request lost with its replica: {reason}");
        self.failed
            .borrow_mut()
            .entry((hop.invocation, hop.task.clone()))
            .or_insert_with(|| (hop.deadline_unix_us, Vec::new()))
            .1
            .push(addr);
        hop.attempt += 1;
        self.send(hop);
    }

    /// Reports the invocation as failed to its ingress.
    pub fn fail(&self, hop: &Hop, error: String) {
        let out = OutputMsg {
            invocation: hop.invocation,
            task: hop.task.to_string(),
            port: hop.port.to_string(),
            payload: bytes::Bytes::new(),
            error,
        };
        self.pool.send_frame(&hop.reply_to, encode_output(&out));
    }

    /// Forgets retry state of invocations past their deadline, and fails requests that waited
    /// for a routing table until their deadline.
    pub fn sweep(&self, now_unix_us: u64) {
        self.failed
            .borrow_mut()
            .retain(|_, (deadline, _)| *deadline >= now_unix_us);
        let expired: Vec<Hop> = {
            let mut parked = self.parked.borrow_mut();
            let (expired, keep) = parked
                .drain(..)
                .partition(|h| h.deadline_unix_us < now_unix_us);
            *parked = keep;
            expired
        };
        for hop in expired {
            let have = self.routes(&hop.graph_id).map_or(0, |r| r.epoch);
            let msg = format!(
                "task {}: routing table epoch {} for graph {} never reached host {} (it has {have})",
                hop.task, hop.epoch, hop.graph_id, self.host
            );
            self.fail(&hop, msg);
        }
    }

    /// Requests waiting for a newer routing table.
    pub fn parked(&self) -> usize {
        self.parked.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_path::routes::Route;
    use prescient_schemas::{codec, file, GraphRecord};

    fn table(epoch: u64, replicas: &[(&str, &str)]) -> GraphRoutes {
        let graph = file::parse(
            "t.toml",
            "name = \"t\"\n[[task]]\nid = \"a\"\ncode = { builtin = \"identity\" }\ninputs = { x = \"bytes\" }\nestimate = \"1ms\"\n",
        )
        .unwrap()
        .graph;
        let record = GraphRecord {
            id: "g1".into(),
            version: 1,
            submitted_at_ms: 0,
            digest: codec::graph_digest(&graph),
            graph,
        };
        let mut map = std::collections::HashMap::new();
        for (task, addr) in replicas {
            map.entry(task.to_string())
                .or_insert_with(Vec::new)
                .push(Route {
                    replica: format!("g1.{task}.r1").into(),
                    host: "h".into(),
                    addr: (*addr).into(),
                });
        }
        GraphRoutes::new(record, epoch, map)
    }

    fn hop(epoch: u64, deadline: u64) -> Hop {
        Hop {
            invocation: 1,
            graph_id: "g1".into(),
            epoch,
            task: "a".into(),
            port: "x".into(),
            payload: bytes::Bytes::new(),
            deadline_unix_us: deadline,
            reply_to: "127.0.0.1:9".into(),
            attempt: 0,
            sent_unix_ns: 0,
            admitted_unix_ns: 0,
        }
    }

    #[tokio::test]
    async fn requests_wait_for_the_table_they_were_admitted_under() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (pool, _lost) = PeerPool::new();
                let f = Forwarder::new("h", pool.clone());
                assert!(f.install(table(1, &[("a", "127.0.0.1:1")])));
                f.send(hop(2, u64::MAX));
                assert_eq!(f.parked(), 1, "epoch 2 must not be routed on table 1");
                assert_eq!(pool.outstanding("127.0.0.1:1"), 0);
                assert!(
                    !f.install(table(1, &[("a", "127.0.0.1:1")])),
                    "tables never go back"
                );
                assert!(f.install(table(2, &[("a", "127.0.0.1:2")])));
                assert_eq!(f.parked(), 0);
                assert_eq!(pool.outstanding("127.0.0.1:2"), 1, "sent on the new table");

                f.send(hop(5, 0));
                f.sweep(1);
                assert_eq!(
                    f.parked(),
                    0,
                    "past its deadline it fails instead of waiting"
                );
            })
            .await;
    }
}
