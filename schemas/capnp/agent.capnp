@0xbcb545aa398e7841;
# The agent <-> control protocol and telemetry batches.

using Graph = import "graph.capnp";

struct GpuInfo {
  index @0 :UInt32;
  name @1 :Text;
  uuid @2 :Text;
  memoryBytes @3 :UInt64;
}

struct NicInfo {
  name @0 :Text;
  addresses @1 :List(Text);
  speedBitsPerSec @2 :UInt64;   # 0 when unknown
}

struct HostInfo {
  hostname @0 :Text;
  cpus @1 :UInt32;
  memoryBytes @2 :UInt64;
  gpus @3 :List(GpuInfo);
  nics @4 :List(NicInfo);
  provisioner @5 :Text;         # "process" or "qemu"
  dataPlaneAddr @6 :Text;       # where other agents send request frames
  agentVersion @7 :Text;
}

struct Span {
  # One task execution, as measured by the worker that ran it.
  graphId @0 :Text;
  task @1 :Text;
  replica @2 :Text;
  vm @3 :Text;
  invocationId @4 :UInt64;
  queueNs @5 :UInt64;
  execNs @6 :UInt64;
  inputBytes @7 :UInt64;
  outputBytes @8 :UInt64;
  transferNs @9 :UInt64;        # on the edge the input arrived by
  startUnixNs @10 :UInt64;
  ok @11 :Bool;
}

struct HostSample {
  atUnixMs @0 :UInt64;
  cpuUtil @1 :Float32;          # 0..1 over all CPUs
  cpuSteal @2 :Float32;         # 0..1
  memoryUsedBytes @3 :UInt64;
  netRxBytes @4 :UInt64;
  netTxBytes @5 :UInt64;
  runQueueP99Ns @6 :UInt64;
  gpuUtil @7 :List(Float32);
  gpuMemoryUsedBytes @8 :List(UInt64);
}

struct TelemetryBatch {
  hostId @0 :Text;
  spans @1 :List(Span);
  hosts @2 :List(HostSample);
  droppedSpans @3 :UInt64;      # spans dropped by back-pressure since the last batch
}

struct Placement {
  graphId @0 :Text;
  epoch @1 :UInt64;
  task @2 :Graph.Task;
  replica @3 :Text;
}

struct RouteEntry {
  task @0 :Text;
  replica @1 :Text;
  hostId @2 :Text;
  dataPlaneAddr @3 :Text;
}

struct RoutingTable {
  graphId @0 :Text;
  epoch @1 :UInt64;             # monotonically increasing per graph
  entries @2 :List(RouteEntry);
}

interface Agent {
  # Commands control sends to an agent.
  provision @0 (placement :Placement) -> ();
  retire @1 (graphId :Text, replica :Text) -> ();
  setRoutes @2 (table :RoutingTable) -> ();
}

interface AgentSession {
  heartbeat @0 (seq :UInt64) -> (ok :Bool);
  telemetry @1 (batch :TelemetryBatch) -> ();
}

interface Registry {
  # Bootstrap interface offered to agents.
  register @0 (host :HostInfo, agent :Agent) -> (hostId :Text, session :AgentSession);
}
