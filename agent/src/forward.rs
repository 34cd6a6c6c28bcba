//! Sending requests to a task's replicas, and retrying those lost with a connection.
//!
//! Shared by the ingress (entry tasks) and workers (downstream tasks): both hold routing
//! tables and a peer pool, and both must turn a lost request into a retry on another replica or,
//! after [`MAX_ATTEMPTS`], into an error output that names the task and the replica.

use crate::dataplane::{encode_output, now_unix_us, Hop, Lost, OutputMsg, PeerPool};
use crate::routes::{GraphRoutes, Rng};
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
    /// Addresses each in-flight (invocation, task) has already failed on, until its deadline.
    failed: RefCell<HashMap<(u64, Rc<str>), FailedOn>>,
}

impl Forwarder {
    pub fn new(host: &str, pool: Rc<PeerPool>) -> Forwarder {
        Forwarder {
            host: host.into(),
            pool,
            routes: RefCell::default(),
            rng: Rng::from_entropy(),
            failed: RefCell::default(),
        }
    }

    pub fn routes(&self, graph_id: &str) -> Option<Rc<GraphRoutes>> {
        self.routes.borrow().get(graph_id).cloned()
    }

    /// Installs a table unless an equal or newer epoch is already installed.
    pub fn install(&self, table: GraphRoutes) -> bool {
        let mut routes = self.routes.borrow_mut();
        if routes
            .get(&table.graph_id)
            .is_some_and(|t| t.epoch >= table.epoch)
        {
            return false;
        }
        routes.insert(table.graph_id.clone(), Rc::new(table));
        true
    }

    pub fn remove_graph(&self, graph_id: &str) {
        self.routes.borrow_mut().remove(graph_id);
    }

    /// Sends `hop` to a replica of `hop.task`; on no replica, reports an error output.
    pub fn send(&self, hop: Hop) {
        let Some(routes) = self.routes(&hop.graph_id) else {
            let msg = format!(
                "no routing table for graph {} at host {}",
                hop.graph_id, self.host
            );
            return self.fail(&hop, msg);
        };
        let key = (hop.invocation, hop.task.clone());
        let exclude = self
            .failed
            .borrow()
            .get(&key)
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
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
            }
            None => {
                self.failed.borrow_mut().remove(&key);
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
                self.fail(&hop, msg)
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

    /// Forgets retry state of invocations past their deadline.
    pub fn sweep(&self, now_unix_us: u64) {
        self.failed
            .borrow_mut()
            .retain(|_, (deadline, _)| *deadline >= now_unix_us);
    }
}
