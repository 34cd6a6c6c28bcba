//! The durable graph registry and event log, in an embedded `redb` database.
//!
//! Architecture invariant: a write returns only after its transaction is committed with
//! `Durability::Immediate` (fsynced), so an accepted graph survives `kill -9`.

use prescient_policy::Event as PolicyEvent;
use prescient_schemas::api_capnp;
use prescient_schemas::codec::{self, DecodeError};
use prescient_schemas::{GraphRecord, TaskGraph};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use thiserror::Error;

/// Latest version of each live graph: id -> GraphRecord message.
const GRAPHS: TableDefinition<&str, &[u8]> = TableDefinition::new("graphs");
/// Every version ever accepted: (id, version) -> GraphRecord message.
const VERSIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("graph_versions");
/// Live graph name -> id; a resubmitted name becomes a new version of the same id.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("graph_names");
/// Removed graph id -> unix ms of removal.
const REMOVED: TableDefinition<&str, u64> = TableDefinition::new("graphs_removed");
/// seq -> Event message.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (graph, task, unix minute) -> per-minute roll-up; task "" is end-to-end (arrivals).
const HISTORY: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("history");
/// (graph, task, unix second) -> per-second roll-up, the last `SECOND_HISTORY_S` kept.
const HISTORY_SECONDS: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("history_seconds");
/// Seconds of per-second history kept per series (6 h: ~1.9 MB per task).
pub const SECOND_HISTORY_S: u64 = 6 * 3600;
/// Steps one import may hold at most (a year of minutes).
pub const MAX_IMPORT_STEPS: usize = 525_600;
const NEXT_GRAPH_ID: &str = "next_graph_id";

/// A registry operation that failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("registry database: {0}")]
    Db(#[from] redb::Error),
    /// A stored record could not be decoded (the database is damaged or from a newer version).
    #[error("stored record is unreadable: {0}")]
    Corrupt(#[from] DecodeError),
    #[error("no graph with id {0:?}")]
    UnknownGraph(String),
    #[error("graph {graph:?} has no task {task:?}")]
    UnknownTask { graph: String, task: String },
    #[error("graph {id:?} was removed at {at_ms} (unix ms)")]
    Removed { id: String, at_ms: u64 },
    /// An imported history longer than a year, or of more steps than `MAX_IMPORT_STEPS`.
    #[error("an imported history of {steps} steps of {step_s} s is over the limit (a year, {MAX_IMPORT_STEPS} steps)")]
    ImportTooLong { steps: usize, step_s: u64 },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// One decision or state change of the control node, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: String,
    pub subject: String,
    pub reason: String,
}

impl Event {
    pub fn encode(&self, mut b: api_capnp::event::Builder<'_>) {
        b.set_seq(self.seq);
        b.set_at_ms(self.at_ms);
        b.set_kind(self.kind.as_str());
        b.set_subject(self.subject.as_str());
        b.set_reason(self.reason.as_str());
    }

    pub fn decode(r: api_capnp::event::Reader<'_>) -> Result<Event, DecodeError> {
        let text = codec::text;
        Ok(Event {
            seq: r.get_seq(),
            at_ms: r.get_at_ms(),
            kind: text(r.get_kind())?,
            subject: text(r.get_subject())?,
            reason: text(r.get_reason())?,
        })
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut msg = capnp::message::Builder::new_default();
        self.encode(msg.init_root());
        capnp::serialize::write_message_to_words(&msg)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Event, DecodeError> {
        let reader = capnp::serialize::read_message(
            // Copies into aligned segments: stored bytes (e.g. from redb) need not be aligned.
            &mut &bytes[..],
            capnp::message::ReaderOptions::new(),
        )?;
        Event::decode(reader.get_root()?)
    }
}

/// What `submit` did.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub record: GraphRecord,
    /// False when the graph was identical to the current version, which is returned as is.
    pub created: bool,
    pub event: Option<Event>,
}

/// The durable registry. Cheap to share: every method takes `&self`.
pub struct Registry {
    db: Database,
}

impl Registry {
    /// Opens (or creates) the registry under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Registry, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Db(e.into()))?;
        let db = Database::create(data_dir.join("registry.redb"))?;
        let tx = db.begin_write()?;
        tx.open_table(GRAPHS)?;
        tx.open_table(EVENTS)?;
        tx.open_table(VERSIONS)?;
        tx.open_table(NAMES)?;
        tx.open_table(REMOVED)?;
        tx.open_table(META)?;
        tx.open_table(HISTORY)?;
        tx.open_table(HISTORY_SECONDS)?;
        tx.commit()?;
        Ok(Registry { db })
    }

    /// Stores a validated graph: a new id for a new name, a new version for a changed graph
    /// under a known name, nothing for an identical resubmit.
    pub fn submit(&self, graph: TaskGraph, now_ms: u64) -> Result<Submitted, StoreError> {
        let digest = codec::graph_digest(&graph);
        let tx = self.db.begin_write()?;
        let submitted = {
            let mut names = tx.open_table(NAMES)?;
            let mut graphs = tx.open_table(GRAPHS)?;
            let existing_id = names
                .get(graph.name.as_str())?
                .map(|v| v.value().to_string());
            let previous = match &existing_id {
                Some(id) => match graphs.get(id.as_str())? {
                    Some(bytes) => Some(codec::record_from_bytes(bytes.value())?),
                    None => None,
                },
                None => None,
            };
            if let Some(prev) = previous
                .as_ref() // Compared as graphs too: a digest changes when the wire schema grows a field.
                .filter(|p| p.digest == digest || p.graph == graph)
            {
                return Ok(Submitted {
                    record: prev.clone(),
                    created: false,
                    event: None,
                });
            }
            let (id, version) = match (existing_id, &previous) {
                (Some(id), Some(prev)) => (id, prev.version + 1),
                _ => {
                    let mut meta = tx.open_table(META)?;
                    let n = meta.get(NEXT_GRAPH_ID)?.map_or(1, |v| v.value());
                    meta.insert(NEXT_GRAPH_ID, n + 1)?;
                    (format!("g{n}"), 1)
                }
            };
            let record = GraphRecord {
                id: id.clone(),
                version,
                submitted_at_ms: now_ms,
                digest,
                graph,
            };
            let bytes = codec::record_to_bytes(&record);
            graphs.insert(id.as_str(), bytes.as_slice())?;
            tx.open_table(VERSIONS)?
                .insert((id.as_str(), version), bytes.as_slice())?;
            names.insert(record.graph.name.as_str(), id.as_str())?;
            let submitted = PolicyEvent::GraphSubmitted {
                graph_id: id.clone(),
                name: record.graph.name.clone(),
                version,
                tasks: record.graph.tasks.len(),
                edges: record.graph.edges.len(),
            };
            let event = append_event(&tx, now_ms, &submitted)?;
            Submitted {
                record,
                created: true,
                event: Some(event),
            }
        };
        tx.commit()?;
        Ok(submitted)
    }

    /// The latest version of a live graph.
    pub fn get(&self, id: &str) -> Result<GraphRecord, StoreError> {
        let tx = self.db.begin_read()?;
        if let Some(bytes) = tx.open_table(GRAPHS)?.get(id)? {
            return Ok(codec::record_from_bytes(bytes.value())?);
        }
        match tx.open_table(REMOVED)?.get(id)? {
            Some(at) => Err(StoreError::Removed {
                id: id.into(),
                at_ms: at.value(),
            }),
            None => Err(StoreError::UnknownGraph(id.into())),
        }
    }

    /// One specific version, live or removed.
    pub fn get_version(&self, id: &str, version: u32) -> Result<GraphRecord, StoreError> {
        let tx = self.db.begin_read()?;
        match tx.open_table(VERSIONS)?.get((id, version))? {
            Some(bytes) => Ok(codec::record_from_bytes(bytes.value())?),
            None => Err(StoreError::UnknownGraph(format!("{id}@{version}"))),
        }
    }

    /// Every live graph, latest versions, in id order of creation.
    pub fn list(&self) -> Result<Vec<GraphRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(GRAPHS)?.iter()? {
            let (_, bytes) = entry?;
            out.push(codec::record_from_bytes(bytes.value())?);
        }
        out.sort_by_key(|r| r.id[1..].parse::<u64>().unwrap_or(u64::MAX));
        Ok(out)
    }

    /// Removes a live graph, keeping its versions and recording the removal.
    pub fn remove(&self, id: &str, now_ms: u64) -> Result<(GraphRecord, Event), StoreError> {
        let tx = self.db.begin_write()?;
        let (record, event) = {
            let mut graphs = tx.open_table(GRAPHS)?;
            let record = match graphs.remove(id)? {
                Some(bytes) => codec::record_from_bytes(bytes.value())?,
                None => {
                    return match tx.open_table(REMOVED)?.get(id)? {
                        Some(at) => Err(StoreError::Removed {
                            id: id.into(),
                            at_ms: at.value(),
                        }),
                        None => Err(StoreError::UnknownGraph(id.into())),
                    }
                }
            };
            tx.open_table(NAMES)?.remove(record.graph.name.as_str())?;
            tx.open_table(REMOVED)?.insert(id, now_ms)?;
            let removed = PolicyEvent::GraphRemoved {
                graph_id: id.to_string(),
                name: record.graph.name.clone(),
                version: record.version,
            };
            let event = append_event(&tx, now_ms, &removed)?;
            (record, event)
        };
        tx.commit()?;
        Ok((record, event))
    }

    /// Records an event (a decision or state change) durably.
    pub fn record_event(&self, now_ms: u64, event: &PolicyEvent) -> Result<Event, StoreError> {
        let tx = self.db.begin_write()?;
        let event = append_event(&tx, now_ms, event)?;
        tx.commit()?;
        Ok(event)
    }

    /// Events with `seq > since`, oldest first, at most `limit`.
    pub fn events(&self, since: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for entry in table.range(since.saturating_add(1)..)?.take(limit) {
            let (_, bytes) = entry?;
            out.push(Event::from_bytes(bytes.value())?);
        }
        Ok(out)
    }
}

/// One minute (or second) of one task (or, with `task` empty, of a graph's invocations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistoryPoint {
    /// The unix minute, or in the per-second history the unix second.
    pub at: u64,
    pub count: u64,
    pub errors: u64,
    pub exec_p50_ns: u64,
    pub exec_p99_ns: u64,
    pub exec_mean_ns: u64,
    pub queue_p50_ns: u64,
    pub queue_p99_ns: u64,
    /// Sink tasks: invocations that ended here and their admission-to-end latency (the
    /// end-to-end latency of every chain ending at this task).
    pub sink_count: u64,
    pub sink_p50_ns: u64,
    pub sink_p99_ns: u64,
}

/// Stored fields, in order, 8 bytes each. Fields are only ever appended: a shorter record
/// (written by an older version) reads its missing fields as 0.
const HISTORY_FIELDS: usize = 10;

/// The minute a control node started in was partly seen by the node before it: its first
/// flushes of that minute merge with what was already stored (read once, kept here) instead of
/// replacing it with partial counts.
#[derive(Debug, Clone, Default)]
pub struct HistoryBaselines {
    /// Unix minute this node started in; rows of earlier minutes merge too.
    pub started_minute: u64,
    stored: std::collections::HashMap<(String, String, u64), Option<HistoryPoint>>,
}

impl HistoryBaselines {
    pub fn new(started_minute: u64) -> HistoryBaselines {
        HistoryBaselines {
            started_minute,
            stored: Default::default(),
        }
    }
}

impl HistoryPoint {
    /// Two roll-ups of one minute as one: counts add and the mean is weighted by count.
    /// Quantiles cannot be merged from quantiles: p50s are weighted by count, p99s take the
    /// larger (an upper bound).
    pub fn merge(self, o: HistoryPoint) -> HistoryPoint {
        let weighted = |a: u64, na: u64, b: u64, nb: u64| {
            let n = na.saturating_add(nb);
            if n == 0 {
                0
            } else {
                ((u128::from(a) * u128::from(na) + u128::from(b) * u128::from(nb)) / u128::from(n))
                    as u64
            }
        };
        HistoryPoint {
            at: self.at,
            count: self.count.saturating_add(o.count),
            errors: self.errors.saturating_add(o.errors),
            exec_p50_ns: weighted(self.exec_p50_ns, self.count, o.exec_p50_ns, o.count),
            exec_p99_ns: self.exec_p99_ns.max(o.exec_p99_ns),
            exec_mean_ns: weighted(self.exec_mean_ns, self.count, o.exec_mean_ns, o.count),
            queue_p50_ns: weighted(self.queue_p50_ns, self.count, o.queue_p50_ns, o.count),
            queue_p99_ns: self.queue_p99_ns.max(o.queue_p99_ns),
            sink_count: self.sink_count.saturating_add(o.sink_count),
            sink_p50_ns: weighted(
                self.sink_p50_ns,
                self.sink_count,
                o.sink_p50_ns,
                o.sink_count,
            ),
            sink_p99_ns: self.sink_p99_ns.max(o.sink_p99_ns),
        }
    }

    fn to_bytes(self) -> [u8; HISTORY_FIELDS * 8] {
        let mut b = [0u8; HISTORY_FIELDS * 8];
        for (i, v) in [
            self.count,
            self.errors,
            self.exec_p50_ns,
            self.exec_p99_ns,
            self.exec_mean_ns,
            self.queue_p50_ns,
            self.queue_p99_ns,
            self.sink_count,
            self.sink_p50_ns,
            self.sink_p99_ns,
        ]
        .iter()
        .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn from_bytes(at: u64, b: &[u8]) -> HistoryPoint {
        let field = |i: usize| {
            b.get(i * 8..i * 8 + 8)
                .and_then(|x| x.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        HistoryPoint {
            at,
            count: field(0),
            errors: field(1),
            exec_p50_ns: field(2),
            exec_p99_ns: field(3),
            exec_mean_ns: field(4),
            queue_p50_ns: field(5),
            queue_p99_ns: field(6),
            sink_count: field(7),
            sink_p50_ns: field(8),
            sink_p99_ns: field(9),
        }
    }
}

impl Registry {
    /// Writes (or rewrites, for a minute still filling) per-minute roll-ups. Rows of the
    /// minute this node started in (or earlier) merge with what an earlier run stored.
    pub fn put_history(
        &self,
        rows: &[(String, String, HistoryPoint)],
        baselines: &mut HistoryBaselines,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(HISTORY)?;
            for (g, task, p) in rows {
                let key = (g.as_str(), task.as_str(), p.at);
                let mut row = *p;
                if p.at <= baselines.started_minute {
                    let stored = match baselines.stored.get(&(g.clone(), task.clone(), p.at)) {
                        Some(s) => *s,
                        None => {
                            let s = t
                                .get(key)?
                                .map(|v| HistoryPoint::from_bytes(p.at, v.value()));
                            baselines.stored.insert((g.clone(), task.clone(), p.at), s);
                            s
                        }
                    };
                    if let Some(s) = stored {
                        row = s.merge(row);
                    }
                }
                t.insert(key, row.to_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Writes (or rewrites) per-second roll-ups, and drops each written series' seconds older
    /// than `SECOND_HISTORY_S` before its newest.
    pub fn put_seconds(&self, rows: &[(String, String, HistoryPoint)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut newest: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(HISTORY_SECONDS)?;
            for (g, task, p) in rows {
                t.insert((g.as_str(), task.as_str(), p.at), p.to_bytes().as_slice())?;
                let n = newest.entry((g.as_str(), task.as_str())).or_default();
                *n = (*n).max(p.at);
            }
            for ((g, task), last) in newest {
                let cut = last.saturating_sub(SECOND_HISTORY_S);
                t.retain_in((g, task, 0)..(g, task, cut), |_, _| false)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Per-second roll-ups of one task in `[from, to]` (unix seconds), oldest first.
    pub fn history_seconds(
        &self,
        graph: &str,
        task: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<HistoryPoint>, StoreError> {
        self.read_history(HISTORY_SECONDS, graph, task, from, to)
    }

    fn read_history(
        &self,
        table: TableDefinition<(&str, &str, u64), &[u8]>,
        graph: &str,
        task: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<HistoryPoint>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.range((graph, task, from)..=(graph, task, to))? {
            let (k, v) = entry?;
            out.push(HistoryPoint::from_bytes(k.value().2, v.value()));
        }
        Ok(out)
    }

    /// Imports a series of counts (executions per `step_s`, the last step ending at `end_s`)
    /// as a task's history: per-minute rows (a step spread evenly over the minutes it covers,
    /// or steps added up into their minute), and per-second rows for steps shorter than a
    /// minute within `SECOND_HISTORY_S` of `end_s`. Imported rows replace stored ones.
    /// Returns the minutes and seconds written.
    pub fn import_history(
        &self,
        graph: &str,
        task: &str,
        step_s: u64,
        counts: &[u64],
        end_s: u64,
    ) -> Result<(usize, usize), StoreError> {
        let step_s = step_s.max(1);
        let span = step_s.saturating_mul(counts.len() as u64);
        if counts.len() > MAX_IMPORT_STEPS || span > 366 * 86_400 {
            return Err(StoreError::ImportTooLong {
                steps: counts.len(),
                step_s,
            });
        }
        let start_s = end_s.saturating_sub(span);
        let mut minutes: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut seconds: Vec<(u64, u64)> = Vec::new();
        for (i, &c) in counts.iter().enumerate() {
            let from = start_s + i as u64 * step_s;
            // Spread evenly over the step's seconds, in whole executions.
            let upto = |k: u64| (u128::from(c) * u128::from(k) / u128::from(step_s)) as u64;
            for k in 0..step_s {
                let n = upto(k + 1) - upto(k);
                *minutes.entry((from + k) / 60).or_default() += n;
                if step_s < 60 && from + k + SECOND_HISTORY_S >= end_s {
                    seconds.push((from + k, n));
                }
            }
        }
        let point = |at: u64, count: u64| HistoryPoint {
            at,
            count,
            ..HistoryPoint::default()
        };
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(HISTORY)?;
            for (&m, &c) in &minutes {
                t.insert((graph, task, m), point(m, c).to_bytes().as_slice())?;
            }
            let mut t = tx.open_table(HISTORY_SECONDS)?;
            for &(s, c) in &seconds {
                t.insert((graph, task, s), point(s, c).to_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok((minutes.len(), seconds.len()))
    }

    /// Roll-ups of one task (or "" for end to end) in `[from, to]` (unix minutes), oldest first.
    pub fn history(
        &self,
        graph: &str,
        task: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<HistoryPoint>, StoreError> {
        self.read_history(HISTORY, graph, task, from, to)
    }
}

fn append_event(
    tx: &redb::WriteTransaction,
    now_ms: u64,
    typed: &PolicyEvent,
) -> Result<Event, StoreError> {
    let mut events = tx.open_table(EVENTS)?;
    let seq = events.last()?.map_or(1, |(k, _)| k.value() + 1);
    let event = Event {
        seq,
        at_ms: now_ms,
        kind: typed.kind().into(),
        subject: typed.subject(),
        reason: typed.reason(),
    };
    events.insert(seq, event.to_bytes().as_slice())?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prescient_schemas::file;

    fn example() -> TaskGraph {
        file::parse(
            "t.toml",
            r#"
name = "t"
[[task]]
id = "a"
code = { builtin = "identity" }
inputs = { x = "bytes" }
outputs = { y = "bytes" }
estimate = "1ms"
"#,
        )
        .unwrap()
        .graph
    }

    #[test]
    fn a_restarted_node_merges_the_minute_it_started_in() {
        let dir = std::env::temp_dir().join(format!("prescient-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let reg = Registry::open(&dir).unwrap();
        let point = |minute, count, p50, p99| HistoryPoint {
            at: minute,
            count,
            exec_p50_ns: p50,
            exec_p99_ns: p99,
            exec_mean_ns: p50,
            ..HistoryPoint::default()
        };
        let row = |p: HistoryPoint| vec![("g1".to_string(), "t".to_string(), p)];
        // The first node saw 30 executions of minute 100 before it was killed.
        let mut first = HistoryBaselines::new(90);
        reg.put_history(&row(point(100, 30, 1000, 5000)), &mut first)
            .unwrap();
        // The restarted node (started in minute 100) saw 10 more, flushed twice as they grew.
        let mut second = HistoryBaselines::new(100);
        reg.put_history(&row(point(100, 6, 2000, 3000)), &mut second)
            .unwrap();
        reg.put_history(&row(point(100, 10, 2000, 3000)), &mut second)
            .unwrap();
        // A later minute is its own.
        reg.put_history(&row(point(101, 7, 500, 900)), &mut second)
            .unwrap();
        let h = reg.history("g1", "t", 100, 101).unwrap();
        assert_eq!(h[0].count, 40, "merged once, not replaced nor added twice");
        assert_eq!(h[0].exec_p50_ns, 1250);
        assert_eq!(h[0].exec_p99_ns, 5000);
        assert_eq!(h[1].count, 7);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn per_second_history_is_kept_for_its_span_and_imports_fill_both() {
        let dir = std::env::temp_dir().join(format!("prescient-seconds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let reg = Registry::open(&dir).unwrap();
        let row = |at, count| {
            (
                "g1".to_string(),
                "t".to_string(),
                HistoryPoint {
                    at,
                    count,
                    ..HistoryPoint::default()
                },
            )
        };
        reg.put_seconds(&[row(1_000, 3), row(1_001, 4)]).unwrap();
        let far = 1_001 + SECOND_HISTORY_S + 1;
        reg.put_seconds(&[row(far, 5)]).unwrap();
        let h = reg.history_seconds("g1", "t", 0, u64::MAX).unwrap();
        assert_eq!(
            h.iter().map(|p| (p.at, p.count)).collect::<Vec<_>>(),
            vec![(far, 5)],
            "older than the span kept: dropped"
        );
        // 12 steps of 10 s ending at minute 102's end: minutes 101 and 102, 120 seconds.
        let counts: Vec<u64> = (0..12).map(|i| 10 * i + 3).collect();
        let end = 103 * 60;
        assert_eq!(
            reg.import_history("g1", "u", 10, &counts, end).unwrap(),
            (2, 120)
        );
        let m = reg.history("g1", "u", 0, 200).unwrap();
        assert_eq!(m.iter().map(|p| p.at).collect::<Vec<_>>(), vec![101, 102]);
        assert_eq!(m[0].count + m[1].count, counts.iter().sum::<u64>());
        let s = reg.history_seconds("g1", "u", end - 10, end).unwrap();
        assert_eq!(s.iter().map(|p| p.count).sum::<u64>(), 113, "the last step");
        // Hourly steps spread over their minutes; a year and more is refused.
        assert_eq!(
            reg.import_history("g1", "v", 3600, &[60, 120], 7200)
                .unwrap(),
            (120, 0)
        );
        assert_eq!(reg.history("g1", "v", 60, 60).unwrap()[0].count, 2);
        assert!(matches!(
            reg.import_history("g1", "v", 86_400, &[1; 400], 1 << 40),
            Err(StoreError::ImportTooLong { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn versions_ids_removal_and_events() {
        let dir = std::env::temp_dir().join(format!("prescient-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let reg = Registry::open(&dir).unwrap();
        let a = reg.submit(example(), 1).unwrap();
        assert!(a.created);
        assert_eq!((a.record.id.as_str(), a.record.version), ("g1", 1));
        let same = reg.submit(example(), 2).unwrap();
        assert!(!same.created);
        assert_eq!(same.record.version, 1);
        let mut changed = example();
        changed.tasks[0].estimated_execution_time_ns = 5;
        let b = reg.submit(changed, 3).unwrap();
        assert_eq!((b.record.id.as_str(), b.record.version), ("g1", 2));
        assert_eq!(reg.get_version("g1", 1).unwrap().graph, example());
        reg.remove("g1", 4).unwrap();
        assert!(matches!(
            reg.get("g1"),
            Err(StoreError::Removed { at_ms: 4, .. })
        ));
        assert!(matches!(reg.get("g9"), Err(StoreError::UnknownGraph(_))));
        let c = reg.submit(example(), 5).unwrap();
        assert_eq!(c.record.id, "g2", "a removed name gets a fresh id");
        let kinds: Vec<String> = reg
            .events(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "graph-submitted",
                "graph-submitted",
                "graph-removed",
                "graph-submitted"
            ]
        );
        assert_eq!(reg.events(2, 1).unwrap()[0].seq, 3);
        drop(reg);
        let reg = Registry::open(&dir).unwrap();
        assert_eq!(reg.list().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
