@0xbcb545aa398e7841;
# The agent <-> control protocol and telemetry batches.
# Evolve by adding fields only; never renumber or change a field's type.

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
  ingressAddr @6 :Text;         # where clients send invocations to this agent
  agentVersion @7 :Text;
  name @8 :Text;                # the agent's stable name (from config; defaults to hostname)
  telemetry @9 :Text;           # "ebpf: <probes>" or "off: <why>" (then procfs and cgroups only)
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
  runDelayNs @9 :UInt64;        # time runnable tasks waited for a CPU since the last sample (schedstat)
  memoryTotalBytes @10 :UInt64;
  probes @11 :Bool;             # the eBPF probes run on this host (the fields below are set)
  runQueueLatencyNs @12 :Sketch; # eBPF: every run-queue wait on every CPU in the interval
  gpuPowerWatts @13 :List(Float32);      # NVML, one per GPU like gpuUtil
  gpuTemperatureC @14 :List(Float32);
}

struct Sketch {
  # A mergeable quantile sketch (logarithmic buckets, 1% relative accuracy).
  count @0 :UInt64;
  zeros @1 :UInt64;
  sum @2 :Float64;
  min @3 :Float64;
  max @4 :Float64;
  indices @5 :List(Int32);
  counts @6 :List(UInt64);
}

struct TaskWindow {
  # Every execution of one replica in one second, aggregated where it ran. With `task` empty:
  # the end-to-end latency of the graph's invocations admitted at one ingress.
  graphId @0 :Text;
  task @1 :Text;
  replica @2 :Text;
  second @3 :UInt64;            # unix seconds
  errors @4 :UInt64;
  inputBytes @5 :UInt64;
  outputBytes @6 :UInt64;
  execNs @7 :Sketch;            # its count is the number of executions
  queueNs @8 :Sketch;
  transferNs @9 :Sketch;
  sinkNs @10 :Sketch;           # sink tasks only: admission at the ingress to this execution's
                                # end, the end-to-end latency of the chains ending here
}

struct VmSample {
  # One replica's VM (process slot or microVM), from its cgroup.
  replica @0 :Text;
  graphId @1 :Text;
  task @2 :Text;
  cpuCores @3 :Float32;         # CPU used in the last interval, in cores
  memoryBytes @4 :UInt64;
  cpuLimitCores @5 :Float32;
  memoryLimitBytes @6 :UInt64;
  probed @7 :Bool;              # the eBPF probes counted the fields below
  runQueueLatencyNs @8 :Sketch; # run-queue waits of the VM's processes in the interval
  tcpSentBytes @9 :UInt64;      # TCP bytes the VM's processes sent in the interval
  tcpReceivedBytes @10 :UInt64;
  gpuMemoryBytes @11 :UInt64;   # NVML: GPU memory its processes hold, on all GPUs
  throttledShare @12 :Float32;  # share of its cgroup's CPU-bandwidth periods it was throttled in, last interval
}

struct EdgeWindow {
  # Every request that arrived on one input port (one edge: a port is fed by one edge) of one
  # replica in one second.
  graphId @0 :Text;
  task @1 :Text;
  port @2 :Text;
  second @3 :UInt64;
  bytes @4 :UInt64;
  transferNs @5 :Sketch;        # its count is the number of requests
}

struct TelemetryBatch {
  hostId @0 :Text;
  spans @1 :List(Span);         # a sample of individual executions (for tracing)
  hosts @2 :List(HostSample);
  droppedSpans @3 :UInt64;      # spans dropped by back-pressure since the last batch
  windows @4 :List(TaskWindow); # every execution, aggregated per second
  vms @5 :List(VmSample);
  edges @6 :List(EdgeWindow);
  samples @7 :List(InputSample); # a few recent inputs per replica, for new replicas' warm-up
  gauges @8 :List(Gauge);       # per replica, once a second: in_flight and the task's own
}

struct Gauge {
  graphId @0 :Text;
  task @1 :Text;
  replica @2 :Text;
  name @3 :Text;                # "in_flight" (executions accepted, not finished), or a task's
  value @4 :Float64;            # own metric's name
}

struct InputSample {
  # One execution's inputs (in port order), kept so a new replica can warm up on real ones.
  graphId @0 :Text;
  task @1 :Text;
  inputs @2 :List(Data);
}

struct ReplicaSpec {
  # One replica of one task: what control asks an agent to run.
  replica @0 :Text;             # unique in the cluster, e.g. "g1.infer.r2"
  graph @1 :Graph.GraphRecord;  # the whole graph, so the worker knows the edges
  task @2 :Text;
  artifactPath @3 :Text;        # set by the agent for its worker: the verified local copy
  warmup @4 :List(InputSample); # recent real inputs to run before the replica is routed
  warmupTargetNs @5 :UInt64;    # the task's recent execution p50 (0: unknown)
  warmupTimeoutNs @6 :UInt64;   # at most this long warming up (0: no warm-up)
}

struct ReplicaInfo {
  # A replica an agent runs, as it reports it (on register, so a restarted control adopts it).
  replica @0 :Text;
  graphId @1 :Text;
  version @2 :UInt32;
  task @3 :Text;
  dataPlaneAddr @4 :Text;
  epoch @5 :UInt64;             # the newest routing-table epoch the agent holds for the graph
}

struct RouteEntry {
  task @0 :Text;
  replica @1 :Text;
  host @2 :Text;                # agent name: replicas on the same host are preferred
  dataPlaneAddr @3 :Text;
}

struct RoutingTable {
  graph @0 :Graph.GraphRecord;
  epoch @1 :UInt64;             # strictly increasing per graph
  entries @2 :List(RouteEntry);
}

struct WorkerCommand {
  # Agent -> worker process, over the worker's stdin.
  union {
    deploy @0 :ReplicaSpec;
    routes @1 :RoutingTable;
    drain @2 :Void;
    artifact @3 :ArtifactChunk;
  }
}

struct ArtifactChunk {
  # A piece of the task's artifact for a worker that cannot read the agent's copy (a microVM's),
  # sent in order before the deploy; the worker keeps it and checks its digest at deploy.
  sha256Hex @0 :Text;           # the whole artifact's digest (its file name in the worker)
  data @1 :Data;
}

struct WarmShape {
  # Booted, idle VMs of one shape (a task's CPU and memory): kept, or to keep.
  cpuMillicores @0 :UInt32;
  memoryBytes @1 :UInt64;
  count @2 :UInt32;
}

interface Agent {
  # Commands control sends to an agent.
  provision @0 (spec :ReplicaSpec) -> (dataPlaneAddr :Text, warmupNs :UInt64,
                                       warmupExecutions :UInt32, warmupStable :Bool,
                                       vmStart :Text, vmStartNs :UInt64, vmDeployNs :UInt64);
  # vmStart: "booted" or "restored" (from a snapshot) for a microVM, "warm" when it took one
  # from the warm pool, "" for a process worker; vmStartNs: from starting QEMU to the guest
  # running (warm: how long it had been idle); vmDeployNs: from the guest running to the task
  # deployed in it (artifact received and verified, runtime loaded), warm-up apart.
                                       # returns once deployed and warm
  retire @1 (replica :Text) -> ();
  setRoutes @2 (table :RoutingTable) -> ();
  removeGraph @3 (graphId :Text) -> ();
  setWarmPool @4 (shapes :List(WarmShape)) -> ();
  # Keep this many booted, idle VMs per shape (microVM agents); idle ones beyond it stop
  # once idle past the agent's timeout.
}

interface AgentSession {
  heartbeat @0 (seq :UInt64, warm :List(WarmShape)) -> (ok :Bool);
  # warm: the booted, idle VMs the agent has now (microVM agents).
  replicaDown @1 (replica :Text, reason :Text) -> ();
  telemetry @2 (batch :TelemetryBatch) -> ();
}

interface Registry {
  # Offered to agents through Control.agents().
  register @0 (host :HostInfo, agent :Agent, replicas :List(ReplicaInfo)) -> (hostId :Text, session :AgentSession);
}
