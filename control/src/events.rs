//! The event log as the running node uses it: durable first, then fanned out to watchers.

use crate::store::{Event, Registry};
use std::sync::Arc;
use tokio::sync::broadcast;
use tracing::{info, warn};

#[derive(Clone)]
pub struct EventLog {
    registry: Arc<Registry>,
    tx: broadcast::Sender<Event>,
    /// Events announced since start, by kind (for `/metrics`).
    counts: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl EventLog {
    pub fn new(registry: Arc<Registry>) -> EventLog {
        let (tx, _) = broadcast::channel(1024);
        EventLog {
            registry,
            tx,
            counts: Arc::default(),
        }
    }

    /// How many events of each kind were announced since this node started.
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Announces an event already stored (in the same transaction as the change it records).
    pub fn publish(&self, event: Option<Event>) {
        if let Some(e) = event {
            if let Ok(mut counts) = self.counts.lock() {
                *counts.entry(e.kind.clone()).or_insert(0) += 1;
            }
            info!(seq = e.seq, kind = %e.kind, subject = %e.subject, reason = %e.reason, "event");
            // No receivers is fine: watchers catch up from the store.
            let _ = self.tx.send(e);
        }
    }

    /// Stores a decision with its reason, then announces it.
    pub async fn record(&self, event: &prescient_policy::Event) {
        let (kind, subject) = (event.kind(), event.subject());
        let (registry, e) = (self.registry.clone(), event.clone());
        let stored =
            tokio::task::spawn_blocking(move || registry.record_event(crate::clock::unix_ms(), &e))
                .await;
        match stored {
            Ok(Ok(e)) => self.publish(Some(e)),
            Ok(Err(e)) => warn!(%kind, %subject, "event not stored: {e}"),
            Err(e) => warn!(%kind, %subject, "event not stored: {e}"),
        }
    }
}
