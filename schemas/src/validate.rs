//! Graph validation: every problem found, each naming its task, port or edge; and the derived
//! structure (topological order, chains) that placement and replication work on.

use crate::model::{Edge, PortType, TaskGraph};
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{HashMap, HashSet};
use thiserror::Error;

/// Bounds that keep one graph from exhausting the control node.
pub const MAX_TASKS: usize = 4096;
pub const MAX_EDGES: usize = 65_536;
pub const MAX_PORTS_PER_TASK: usize = 256;
/// Source-to-sink paths are enumerated for monitoring and replication; past this the graph is
/// refused rather than letting path counts grow exponentially.
pub const MAX_CHAINS: usize = 10_000;
const MAX_CPU_MILLICORES: u32 = 1024 * 1000;
const MAX_MEMORY_BYTES: u64 = 64 << 40;
const MAX_GPUS: u32 = 64;
const MAX_GPU_MEMORY_BYTES: u64 = 16 << 40;
const MAX_NETWORK_BITS: u64 = 10_000_000_000_000;
const MAX_ESTIMATE_NS: u64 = 3600 * 1_000_000_000;

/// One thing wrong with a graph. The message names the culprit.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Problem {
    /// graph has no tasks
    #[error("graph has no tasks")]
    EmptyGraph,
    #[error("graph name {name:?} is invalid: use 1-64 letters, digits, '-', '_' or '.'")]
    InvalidGraphName { name: String },
    #[error("graph has {count} tasks, more than the limit of {limit}")]
    TooManyTasks { count: usize, limit: usize },
    #[error("graph has {count} edges, more than the limit of {limit}")]
    TooManyEdges { count: usize, limit: usize },
    #[error("task id {task:?} is invalid: use 1-64 letters, digits, '-' or '_'")]
    InvalidTaskId { task: String },
    #[error("task {task:?} is defined more than once")]
    DuplicateTask { task: String },
    #[error("task {task:?}: port name {port:?} is invalid: use 1-64 letters, digits, '-' or '_'")]
    InvalidPortName { task: String, port: String },
    #[error("task {task:?}: port {port:?} is defined more than once")]
    DuplicatePort { task: String, port: String },
    #[error("task {task:?} has {count} ports, more than the limit of {limit}")]
    TooManyPorts {
        task: String,
        count: usize,
        limit: usize,
    },
    #[error("edge #{edge} ({text}): unknown task {task:?}")]
    UnknownTask {
        edge: usize,
        text: String,
        task: String,
    },
    #[error("edge #{edge} ({text}): task {task:?} has no {direction} port {port:?}")]
    UnknownPort {
        edge: usize,
        text: String,
        task: String,
        port: String,
        direction: &'static str,
    },
    #[error("edge #{edge} ({text}): type mismatch: {from_type} does not fit {to_type}")]
    TypeMismatch {
        edge: usize,
        text: String,
        task: String,
        port: String,
        from_type: PortType,
        to_type: PortType,
    },
    #[error(
        "task {task:?}: input port {port:?} is fed by more than one edge (#{})",
        join(edges)
    )]
    PortFedTwice {
        task: String,
        port: String,
        edges: Vec<usize>,
    },
    #[error("cycle: {}", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("task {task:?}: estimated execution time must be positive")]
    NonPositiveEstimate { task: String },
    #[error("task {task:?}: estimated execution time {ns}ns is over the limit of one hour")]
    AbsurdEstimate { task: String, ns: u64 },
    #[error("task {task:?}: {what} must not be zero")]
    ZeroResource { task: String, what: &'static str },
    #[error("task {task:?}: {what} of {value} is over the limit of {limit}")]
    AbsurdResource {
        task: String,
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("task {task:?}: asks for GPU memory but no GPUs")]
    GpuMemoryWithoutGpu { task: String },
    #[error("task {task:?}: {message}")]
    InvalidCode { task: String, message: String },
    #[error("latency objective: percentile {percentile} must be in (0, 100) and target positive")]
    InvalidObjective { percentile: f64 },
    #[error("graph has more than {limit} source-to-sink chains")]
    TooManyChains { limit: usize },
    #[error("{}: {message}", scaling_key(task.as_deref(), key))]
    InvalidScaling {
        /// The task whose override is wrong; `None`: the `[scaling]` table itself.
        task: Option<String>,
        key: &'static str,
        message: String,
    },
}

fn scaling_key(task: Option<&str>, key: &str) -> String {
    match task {
        Some(t) => format!("scaling.task.{t}.{key}"),
        None => format!("scaling.{key}"),
    }
}

fn join(items: &[usize]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", #")
}

impl Problem {
    /// A stable, machine-readable name for the kind of problem.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::EmptyGraph => "empty-graph",
            Problem::InvalidGraphName { .. } => "invalid-graph-name",
            Problem::TooManyTasks { .. } => "too-many-tasks",
            Problem::TooManyEdges { .. } => "too-many-edges",
            Problem::InvalidTaskId { .. } => "invalid-task-id",
            Problem::DuplicateTask { .. } => "duplicate-task",
            Problem::InvalidPortName { .. } => "invalid-port-name",
            Problem::DuplicatePort { .. } => "duplicate-port",
            Problem::TooManyPorts { .. } => "too-many-ports",
            Problem::UnknownTask { .. } => "unknown-task",
            Problem::UnknownPort { .. } => "unknown-port",
            Problem::TypeMismatch { .. } => "type-mismatch",
            Problem::PortFedTwice { .. } => "port-fed-twice",
            Problem::Cycle { .. } => "cycle",
            Problem::NonPositiveEstimate { .. } => "non-positive-estimate",
            Problem::AbsurdEstimate { .. } => "absurd-estimate",
            Problem::ZeroResource { .. } => "zero-resource",
            Problem::AbsurdResource { .. } => "absurd-resource",
            Problem::GpuMemoryWithoutGpu { .. } => "gpu-memory-without-gpu",
            Problem::InvalidCode { .. } => "invalid-code",
            Problem::InvalidObjective { .. } => "invalid-objective",
            Problem::TooManyChains { .. } => "too-many-chains",
            Problem::InvalidScaling { .. } => "invalid-scaling",
        }
    }

    /// The task the problem is about, if one.
    pub fn task(&self) -> Option<&str> {
        match self {
            Problem::InvalidTaskId { task }
            | Problem::DuplicateTask { task }
            | Problem::InvalidPortName { task, .. }
            | Problem::DuplicatePort { task, .. }
            | Problem::TooManyPorts { task, .. }
            | Problem::UnknownTask { task, .. }
            | Problem::UnknownPort { task, .. }
            | Problem::TypeMismatch { task, .. }
            | Problem::PortFedTwice { task, .. }
            | Problem::NonPositiveEstimate { task }
            | Problem::AbsurdEstimate { task, .. }
            | Problem::ZeroResource { task, .. }
            | Problem::AbsurdResource { task, .. }
            | Problem::GpuMemoryWithoutGpu { task }
            | Problem::InvalidCode { task, .. } => Some(task),
            Problem::Cycle { cycle } => cycle.first().map(String::as_str),
            Problem::InvalidScaling { task, .. } => task.as_deref(),
            _ => None,
        }
    }

    /// The port the problem is about, if one.
    pub fn port(&self) -> Option<&str> {
        match self {
            Problem::InvalidPortName { port, .. }
            | Problem::DuplicatePort { port, .. }
            | Problem::UnknownPort { port, .. }
            | Problem::TypeMismatch { port, .. }
            | Problem::PortFedTwice { port, .. } => Some(port),
            _ => None,
        }
    }

    /// The index of the edge the problem is about, if one.
    pub fn edge(&self) -> Option<usize> {
        match self {
            Problem::UnknownTask { edge, .. }
            | Problem::UnknownPort { edge, .. }
            | Problem::TypeMismatch { edge, .. } => Some(*edge),
            Problem::PortFedTwice { edges, .. } => edges.get(1).copied(),
            _ => None,
        }
    }
}

fn valid_name(s: &str, allow_dot: bool) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (allow_dot && c == '.'))
}

/// A graph that passed validation, with the structure the controllers need precomputed.
#[derive(Debug, Clone)]
pub struct ValidatedGraph {
    graph: TaskGraph,
    dag: DiGraph<usize, usize>,
    topo: Vec<usize>,
    chains: Vec<Vec<usize>>,
}

impl ValidatedGraph {
    /// Checks `graph` and returns every problem found, or the validated graph.
    pub fn new(graph: TaskGraph) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        check_shape(&graph, &mut problems);
        let index = task_index(&graph);
        check_tasks(&graph, &mut problems);
        check_edges(&graph, &index, &mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut dag = DiGraph::with_capacity(graph.tasks.len(), graph.edges.len());
        let nodes: Vec<NodeIndex> = (0..graph.tasks.len()).map(|i| dag.add_node(i)).collect();
        for (e, edge) in graph.edges.iter().enumerate() {
            dag.add_edge(
                nodes[index[&edge.from.task]],
                nodes[index[&edge.to.task]],
                e,
            );
        }
        let cycles = find_cycles(&graph, &dag);
        if !cycles.is_empty() {
            return Err(cycles);
        }
        let topo: Vec<usize> = petgraph::algo::toposort(&dag, None)
            .map_err(|_| vec![Problem::Cycle { cycle: vec![] }])?
            .into_iter()
            .map(|n| dag[n])
            .collect();
        let chains = enumerate_chains(&dag, &topo)
            .ok_or_else(|| vec![Problem::TooManyChains { limit: MAX_CHAINS }])?;
        Ok(ValidatedGraph {
            graph,
            dag,
            topo,
            chains,
        })
    }

    pub fn graph(&self) -> &TaskGraph {
        &self.graph
    }

    pub fn into_graph(self) -> TaskGraph {
        self.graph
    }

    /// Task ids in an order where every task comes after all tasks that feed it.
    pub fn topological_order(&self) -> Vec<&str> {
        self.topo
            .iter()
            .map(|&i| self.graph.tasks[i].id.as_str())
            .collect()
    }

    /// Every maximal path (from a task nothing feeds to a task that feeds nothing), as task ids.
    /// Chains are what latency objectives and chain replication apply to.
    pub fn chains(&self) -> Vec<Vec<&str>> {
        self.chains
            .iter()
            .map(|c| c.iter().map(|&i| self.graph.tasks[i].id.as_str()).collect())
            .collect()
    }

    /// Ids of the tasks that feed `task`, once each.
    pub fn upstream(&self, task: &str) -> Vec<&str> {
        self.neighbours(task, petgraph::Direction::Incoming)
    }

    /// Ids of the tasks `task` feeds, once each.
    pub fn downstream(&self, task: &str) -> Vec<&str> {
        self.neighbours(task, petgraph::Direction::Outgoing)
    }

    fn neighbours(&self, task: &str, dir: petgraph::Direction) -> Vec<&str> {
        let Some(i) = self.graph.tasks.iter().position(|t| t.id == task) else {
            return Vec::new();
        };
        let mut seen = HashSet::new();
        let mut out: Vec<&str> = self
            .dag
            .neighbors_directed(NodeIndex::new(i), dir)
            .filter(|n| seen.insert(*n))
            .map(|n| self.graph.tasks[self.dag[n]].id.as_str())
            .collect();
        out.reverse();
        out
    }

    /// Input ports no edge feeds: where invocations put their inputs.
    pub fn graph_inputs(&self) -> Vec<crate::Endpoint> {
        let fed: HashSet<(&str, &str)> = self
            .graph
            .edges
            .iter()
            .map(|e| (e.to.task.as_str(), e.to.port.as_str()))
            .collect();
        let mut out = Vec::new();
        for t in &self.graph.tasks {
            for p in &t.inputs {
                if !fed.contains(&(t.id.as_str(), p.name.as_str())) {
                    out.push(crate::Endpoint {
                        task: t.id.clone(),
                        port: p.name.clone(),
                    });
                }
            }
        }
        out
    }

    /// Output ports no edge consumes: what an invocation returns.
    pub fn graph_outputs(&self) -> Vec<crate::Endpoint> {
        let used: HashSet<(&str, &str)> = self
            .graph
            .edges
            .iter()
            .map(|e| (e.from.task.as_str(), e.from.port.as_str()))
            .collect();
        let mut out = Vec::new();
        for t in &self.graph.tasks {
            for p in &t.outputs {
                if !used.contains(&(t.id.as_str(), p.name.as_str())) {
                    out.push(crate::Endpoint {
                        task: t.id.clone(),
                        port: p.name.clone(),
                    });
                }
            }
        }
        out
    }
}

fn task_index(graph: &TaskGraph) -> HashMap<String, usize> {
    let mut index = HashMap::new();
    for (i, t) in graph.tasks.iter().enumerate() {
        index.entry(t.id.clone()).or_insert(i);
    }
    index
}

fn check_shape(graph: &TaskGraph, problems: &mut Vec<Problem>) {
    if !valid_name(&graph.name, true) {
        problems.push(Problem::InvalidGraphName {
            name: graph.name.clone(),
        });
    }
    if graph.tasks.is_empty() {
        problems.push(Problem::EmptyGraph);
    }
    if graph.tasks.len() > MAX_TASKS {
        problems.push(Problem::TooManyTasks {
            count: graph.tasks.len(),
            limit: MAX_TASKS,
        });
    }
    if graph.edges.len() > MAX_EDGES {
        problems.push(Problem::TooManyEdges {
            count: graph.edges.len(),
            limit: MAX_EDGES,
        });
    }
    if let Some(o) = &graph.objective {
        if !(o.percentile > 0.0 && o.percentile < 100.0) || o.target_ns == 0 {
            problems.push(Problem::InvalidObjective {
                percentile: o.percentile,
            });
        }
    }
    if let Some(s) = &graph.scaling {
        crate::scaling::check(graph, s, problems);
    }
}

fn check_tasks(graph: &TaskGraph, problems: &mut Vec<Problem>) {
    let mut seen = HashSet::new();
    for t in &graph.tasks {
        let task = || t.id.clone();
        if !valid_name(&t.id, false) {
            problems.push(Problem::InvalidTaskId { task: task() });
        }
        if !seen.insert(t.id.as_str()) {
            problems.push(Problem::DuplicateTask { task: task() });
        }
        let ports = t.inputs.len() + t.outputs.len();
        if ports > MAX_PORTS_PER_TASK {
            problems.push(Problem::TooManyPorts {
                task: task(),
                count: ports,
                limit: MAX_PORTS_PER_TASK,
            });
        }
        for side in [&t.inputs, &t.outputs] {
            let mut names = HashSet::new();
            for p in side {
                if !valid_name(&p.name, false) {
                    problems.push(Problem::InvalidPortName {
                        task: task(),
                        port: p.name.clone(),
                    });
                }
                if !names.insert(p.name.as_str()) {
                    problems.push(Problem::DuplicatePort {
                        task: task(),
                        port: p.name.clone(),
                    });
                }
            }
        }
        match &t.code.kind {
            crate::CodeKind::Builtin { name } if name.is_empty() => {
                problems.push(Problem::InvalidCode {
                    task: task(),
                    message: "builtin kernel name is empty".into(),
                })
            }
            crate::CodeKind::GpuKernel { entry, .. } if entry.is_empty() => {
                problems.push(Problem::InvalidCode {
                    task: task(),
                    message: "GPU kernel entry point is empty".into(),
                })
            }
            _ => {}
        }
        if t.estimated_execution_time_ns == 0 {
            problems.push(Problem::NonPositiveEstimate { task: task() });
        } else if t.estimated_execution_time_ns > MAX_ESTIMATE_NS {
            problems.push(Problem::AbsurdEstimate {
                task: task(),
                ns: t.estimated_execution_time_ns,
            });
        }
        let r = &t.resources;
        if r.cpu_millicores == 0 {
            problems.push(Problem::ZeroResource {
                task: task(),
                what: "cpu",
            });
        }
        if r.memory_bytes == 0 {
            problems.push(Problem::ZeroResource {
                task: task(),
                what: "memory",
            });
        }
        let limits: [(&'static str, u64, u64); 5] = [
            (
                "cpu (millicores)",
                r.cpu_millicores.into(),
                MAX_CPU_MILLICORES.into(),
            ),
            ("memory (bytes)", r.memory_bytes, MAX_MEMORY_BYTES),
            ("gpus", r.gpus.into(), MAX_GPUS.into()),
            (
                "gpu memory (bytes)",
                r.gpu_memory_bytes,
                MAX_GPU_MEMORY_BYTES,
            ),
            ("network (bit/s)", r.network_bits_per_sec, MAX_NETWORK_BITS),
        ];
        for (what, value, limit) in limits {
            if value > limit {
                problems.push(Problem::AbsurdResource {
                    task: task(),
                    what,
                    value,
                    limit,
                });
            }
        }
        if r.gpus == 0 && r.gpu_memory_bytes > 0 {
            problems.push(Problem::GpuMemoryWithoutGpu { task: task() });
        }
    }
}

fn check_edges(graph: &TaskGraph, index: &HashMap<String, usize>, problems: &mut Vec<Problem>) {
    let mut fed: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    for (e, edge) in graph.edges.iter().enumerate() {
        let Edge { from, to } = edge;
        let text = || edge.to_string();
        let mut ok = true;
        for end in [from, to] {
            if !index.contains_key(&end.task) {
                problems.push(Problem::UnknownTask {
                    edge: e,
                    text: text(),
                    task: end.task.clone(),
                });
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        let producer = graph.tasks[index[&from.task]].output(&from.port);
        let consumer = graph.tasks[index[&to.task]].input(&to.port);
        if producer.is_none() {
            problems.push(Problem::UnknownPort {
                edge: e,
                text: text(),
                task: from.task.clone(),
                port: from.port.clone(),
                direction: "output",
            });
        }
        if consumer.is_none() {
            problems.push(Problem::UnknownPort {
                edge: e,
                text: text(),
                task: to.task.clone(),
                port: to.port.clone(),
                direction: "input",
            });
        }
        let (Some(producer), Some(consumer)) = (producer, consumer) else {
            continue;
        };
        if !producer.ty.accepts_into(&consumer.ty) {
            problems.push(Problem::TypeMismatch {
                edge: e,
                text: text(),
                task: to.task.clone(),
                port: to.port.clone(),
                from_type: producer.ty.clone(),
                to_type: consumer.ty.clone(),
            });
        }
        fed.entry((to.task.as_str(), to.port.as_str()))
            .or_default()
            .push(e);
    }
    let mut twice: Vec<_> = fed.into_iter().filter(|(_, e)| e.len() > 1).collect();
    twice.sort_by_key(|(_, edges)| edges[0]);
    for ((task, port), edges) in twice {
        problems.push(Problem::PortFedTwice {
            task: task.into(),
            port: port.into(),
            edges,
        });
    }
}

/// Reports one concrete cycle per strongly connected component that has one.
fn find_cycles(graph: &TaskGraph, dag: &DiGraph<usize, usize>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut sccs = petgraph::algo::tarjan_scc(dag);
    sccs.sort_by_key(|c| c.iter().map(|n| n.index()).min());
    for scc in sccs {
        let start = *scc.iter().min().expect("an SCC is never empty");
        let members: HashSet<NodeIndex> = scc.iter().copied().collect();
        let self_loop = dag.find_edge(start, start).is_some();
        if scc.len() == 1 && !self_loop {
            continue;
        }
        let path = if self_loop {
            vec![start]
        } else {
            cycle_through(dag, start, &members)
        };
        let mut cycle: Vec<String> = path
            .iter()
            .map(|n| graph.tasks[dag[*n]].id.clone())
            .collect();
        cycle.push(graph.tasks[dag[start]].id.clone());
        problems.push(Problem::Cycle { cycle });
    }
    problems
}

/// A path from `start` back to `start` inside one strongly connected component.
fn cycle_through(
    dag: &DiGraph<usize, usize>,
    start: NodeIndex,
    members: &HashSet<NodeIndex>,
) -> Vec<NodeIndex> {
    // Breadth-first from start's successors back to start gives a shortest cycle.
    let mut parent: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for m in dag.neighbors(n) {
            if !members.contains(&m) {
                continue;
            }
            if m == start {
                let mut path = vec![n];
                let mut cur = n;
                while cur != start {
                    cur = parent[&cur];
                    path.push(cur);
                }
                path.reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(v) = parent.entry(m) {
                v.insert(n);
                queue.push_back(m);
            }
        }
    }
    vec![start]
}

/// All source-to-sink paths, or None when there are more than [`MAX_CHAINS`].
fn enumerate_chains(dag: &DiGraph<usize, usize>, topo: &[usize]) -> Option<Vec<Vec<usize>>> {
    // Count paths first (dynamic programming over the topological order) so that a graph
    // with exponentially many paths is refused before any is materialised.
    let mut paths_to_sink: HashMap<NodeIndex, u64> = HashMap::new();
    for &t in topo.iter().rev() {
        let n = NodeIndex::new(t);
        let mut succ: Vec<NodeIndex> = dag.neighbors(n).collect();
        succ.sort();
        succ.dedup();
        let count = if succ.is_empty() {
            1
        } else {
            succ.iter()
                .map(|s| paths_to_sink[s])
                .fold(0u64, |a, b| a.saturating_add(b))
        };
        paths_to_sink.insert(n, count);
    }
    let sources: Vec<NodeIndex> = topo
        .iter()
        .map(|&t| NodeIndex::new(t))
        .filter(|n| {
            dag.neighbors_directed(*n, petgraph::Direction::Incoming)
                .next()
                .is_none()
        })
        .collect();
    let total = sources
        .iter()
        .map(|s| paths_to_sink[s])
        .fold(0u64, |a, b| a.saturating_add(b));
    if total > MAX_CHAINS as u64 {
        return None;
    }
    let mut chains = Vec::with_capacity(total as usize);
    let mut stack = Vec::new();
    for s in sources {
        walk(dag, s, &mut stack, &mut chains);
    }
    Some(chains)
}

fn walk(
    dag: &DiGraph<usize, usize>,
    n: NodeIndex,
    stack: &mut Vec<usize>,
    out: &mut Vec<Vec<usize>>,
) {
    stack.push(dag[n]);
    let mut succ: Vec<NodeIndex> = dag.neighbors(n).collect();
    succ.sort();
    succ.dedup();
    if succ.is_empty() {
        out.push(stack.clone());
    }
    for s in succ {
        walk(dag, s, stack, out);
    }
    stack.pop();
}

#[cfg(test)]
mod tests;
