@0x98b468e0597d1a4a;
# The user API served by prescient-control.

using Graph = import "graph.capnp";
using Agent = import "agent.capnp";

struct Problem {
  # One thing wrong with a submitted graph.
  kind @0 :Text;            # stable machine-readable kind, e.g. "cycle", "type-mismatch"
  message @1 :Text;         # human-readable, names the task, port or edge
  task @2 :Text;            # the culprit task, when there is one
  port @3 :Text;            # the culprit port, when there is one
  edge @4 :Int32 = -1;      # index of the culprit edge in `Graph.edges`, or -1
}

struct SubmitResult {
  union {
    accepted @0 :Graph.GraphRecord;
    rejected @1 :List(Problem);
  }
  created @2 :Bool;         # false when the submit was identical to the current version
}

struct GraphSummary {
  id @0 :Text;
  name @1 :Text;
  version @2 :UInt32;
  submittedAtMs @3 :UInt64;
  tasks @4 :UInt32;
  edges @5 :UInt32;
}

struct NamedValue {
  name @0 :Text;            # "task.port"
  value @1 :Data;
}

struct Event {
  # One decision or state change of the control node, with its reason.
  seq @0 :UInt64;
  atMs @1 :UInt64;
  kind @2 :Text;            # e.g. "graph-submitted", "graph-removed", "replicate"
  subject @3 :Text;         # what it concerns, e.g. a graph id
  reason @4 :Text;          # why, in words
}

interface EventSink {
  event @0 (event :Event) -> ();
}

interface Subscription {
  # Dropping this capability ends the subscription.
}

interface Control {
  submitGraph @0 (graph :Graph.Graph) -> (result :SubmitResult);
  getGraph @1 (id :Text) -> (record :Graph.GraphRecord);
  listGraphs @2 () -> (graphs :List(GraphSummary));
  removeGraph @3 (id :Text) -> (removed :GraphSummary);
  invoke @4 (graphId :Text, inputs :List(NamedValue), deadlineMs :UInt32) -> (outputs :List(NamedValue));
  watchEvents @5 (sinceSeq :UInt64, sink :EventSink) -> (subscription :Subscription);
  listEvents @6 (sinceSeq :UInt64, limit :UInt32) -> (events :List(Event));
  agents @7 () -> (registry :Agent.Registry);   # for host agents
  listAgents @8 () -> (agents :List(AgentSummary));
  listReplicas @9 (graphId :Text) -> (replicas :List(ReplicaSummary), epoch :UInt64);
  uploadArtifact @10 () -> (upload :ArtifactUpload);
  readArtifact @11 (sha256 :Data, offset :UInt64, length :UInt32) -> (data :Data, size :UInt64);
  stats @12 (graphId :Text, windowSec :UInt32) -> (tasks :List(TaskStats), droppedSpans :UInt64, endToEnd :TaskStats, hasEndToEnd :Bool, edges :List(EdgeStats), chains :List(ChainStats), cold :ColdStats);
  history @13 (graphId :Text, task :Text, fromMinute :UInt64, toMinute :UInt64, perSecond :Bool) -> (points :List(HistoryPoint));
  # perSecond: the per-second history (the last 6 h), from and to in unix seconds.
  forecast @14 (graphId :Text) -> (mode :Text, tasks :List(TaskForecast));
  importHistory @15 (graphId :Text, task :Text, stepSec :UInt32, counts :List(UInt64), endSecond :UInt64) -> (minutes :UInt32, seconds :UInt32);
  # A task's executions per step from a trace, the last step ending at endSecond, stored as its
  # history (replacing what is stored) and re-seeding its forecast.
}

struct ColdStats {
  # Executions that queued past their task's wait budget while it had a replica on its way.
  executions @0 :UInt64;        # over the window asked for
  waitSumNs @1 :Float64;        # their queue waits, added up
  waitMaxNs @2 :Float64;        # the longest
  totalExecutions @3 :UInt64;   # since the control node started
  totalWaitSumNs @4 :Float64;
}

struct TaskForecast {
  # One task's latest arrival forecast under `[scaling.predictive]` and the plan on it.
  task @0 :Text;
  stepMs @1 :UInt64;
  firstStepAgoMs @2 :UInt64;    # the first step began this long before the answer
  point @3 :List(Float64);      # arrivals per second in each step
  upper @4 :List(Float64);      # its upper quantile (q = 0.9)
  method @5 :Text;              # the forecaster the first step's selection chose
  burstiness @6 :Float64;       # the arrivals' variance over mean per second
  planned @7 :List(UInt32);     # the replicas each step needs for the objective
  floor @8 :UInt32;             # what the plan holds now (0: no plan yet)
  floorReason @9 :Text;
  leadMs @10 :UInt64;           # the lead time planned with
  ready @11 :UInt32;
  provisioning @12 :UInt32;
}

struct ChainStats {
  # One chain (a maximal source-to-sink path) over a window: end to end, from the invocation's
  # admission at an ingress to the end of its sink task's execution. Chains that share a sink
  # share these; `pathP50SumNs` (transfer + queue + execution p50 of each task on the path,
  # without the queueing of joins, which is the wait for the other branches) tells apart which
  # path is the slow one.
  tasks @0 :List(Text);
  count @1 :UInt64;
  p50Ns @2 :UInt64;
  p90Ns @3 :UInt64;
  p99Ns @4 :UInt64;
  pathP50SumNs @5 :UInt64;
  objectivePercentile @6 :Float64;   # 0: the graph sets no objective
  objectiveNs @7 :UInt64;
  measuredAtObjectiveNs @8 :UInt64;  # the latency measured at the objective's percentile
}

struct EdgeStats {
  # One edge over a window, measured where its requests arrived.
  from @0 :Text;                # "task.port" (output)
  to @1 :Text;                  # "task.port" (input)
  count @2 :UInt64;
  bytes @3 :UInt64;
  transferP50Ns @4 :UInt64;
  transferP99Ns @5 :UInt64;
}

struct HistoryPoint {
  # One minute of one task; with task "" the graph's invocations (the arrival rate).
  minute @0 :UInt64;            # unix minutes (per-second history: unix seconds)
  count @1 :UInt64;
  errors @2 :UInt64;
  execP50Ns @3 :UInt64;
  execP99Ns @4 :UInt64;
  execMeanNs @5 :UInt64;
  queueP50Ns @6 :UInt64;
  queueP99Ns @7 :UInt64;
  # Sink tasks: admission at the ingress to the end of this task (the end-to-end latency of
  # every chain ending here); 0 elsewhere.
  sinkCount @8 :UInt64;
  sinkP50Ns @9 :UInt64;
  sinkP99Ns @10 :UInt64;
}

struct TaskStats {
  # One task over a window, from its workers' spans.
  task @0 :Text;
  count @1 :UInt64;
  perSecond @2 :Float64;
  errors @3 :UInt64;
  execP50Ns @4 :UInt64;
  execP90Ns @5 :UInt64;
  execP99Ns @6 :UInt64;
  execMeanNs @7 :UInt64;
  queueP50Ns @8 :UInt64;
  queueP99Ns @9 :UInt64;
  transferP50Ns @10 :UInt64;
  transferP99Ns @11 :UInt64;
  inputBytes @12 :UInt64;
  outputBytes @13 :UInt64;
}

interface ArtifactUpload {
  # Chunks in order; `commit` stores the artifact under its sha256 (durably) and returns it.
  write @0 (chunk :Data) -> ();
  commit @1 () -> (sha256 :Data, size :UInt64, created :Bool);
}

struct AgentSummary {
  name @0 :Text;
  host @1 :Agent.HostInfo;
  state @2 :Text;               # "ready" or "lost"
  lastHeartbeatMs @3 :UInt64;
  replicas @4 :UInt32;
  cpuMillicoresFree @5 :UInt32;
  memoryBytesFree @6 :UInt64;
  hasLoad @7 :Bool;             # the fields below: the agent's host samples of the last 10 s
  cpuUtil @8 :Float32;          # 0..1
  memoryUsedBytes @9 :UInt64;
  runDelayNsPerSec @10 :UInt64; # schedstat: time runnable tasks waited, per second
  runQueueP99Ns @11 :UInt64;    # eBPF (0 without probes)
  probes @12 :Bool;
  pools @13 :Bool;              # a microVM agent keeping a warm pool (the two below)
  warmVms @14 :UInt32;          # booted idle VMs it has (its last heartbeat)
  warmTarget @15 :UInt32;       # booted idle VMs it was told to keep
}

struct ReplicaSummary {
  replica @0 :Text;
  task @1 :Text;
  host @2 :Text;
  dataPlaneAddr @3 :Text;
  state @4 :Text;               # "provisioning", "ready", "lost"
  hasLoad @5 :Bool;             # the fields below come from its VM's latest sample
  cpuCores @6 :Float32;
  memoryBytes @7 :UInt64;
  probed @8 :Bool;              # the eBPF fields below are set
  runQueueP99Ns @9 :UInt64;
  tcpSentBytes @10 :UInt64;     # in the last sample's interval (about a second)
  tcpReceivedBytes @11 :UInt64;
}
