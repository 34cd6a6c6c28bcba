@0x98806fa32237b588;
# The task graph: what a user submits and what the registry stores.
# Evolve by adding fields only; never renumber or change a field's type.

struct PortType {
  # The type carried by a port. An edge is valid when the producer's type is
  # accepted by the consumer's (see prescient_schemas::PortType::accepts).
  union {
    any @0 :Void;        # accepts every type (only meaningful on an input port)
    bytes @1 :Void;      # opaque bytes
    text @2 :Void;       # UTF-8 text
    json @3 :Void;       # a JSON document
    tensor @4 :Tensor;
  }
}

struct Tensor {
  dtype @0 :Text;        # f32, f16, bf16, f64, i8, i16, i32, i64, u8, bool
  shape @1 :List(Int64); # -1 marks a dynamic dimension
}

struct Port {
  name @0 :Text;
  type @1 :PortType;
}

struct Param {
  key @0 :Text;
  value @1 :Text;
}

struct CodeRef {
  # What a task runs.
  union {
    builtin @0 :Builtin;
    exec @1 :Artifact;      # an executable uploaded to control, addressed by digest
    onnx @2 :Artifact;      # an ONNX model, addressed by digest
    gpuKernel @3 :GpuKernel;
  }
  params @4 :List(Param);   # kernel / artifact parameters, as text
}

struct Builtin {
  name @0 :Text;
}

struct Artifact {
  sha256 @0 :Data;          # 32 bytes
  args @1 :List(Text);
}

struct GpuKernel {
  sha256 @0 :Data;          # 32 bytes: the module (PTX or cubin)
  entry @1 :Text;           # the kernel's entry point
}

struct Resources {
  cpuMillicores @0 :UInt32;
  memoryBytes @1 :UInt64;
  gpus @2 :UInt32;
  gpuMemoryBytes @3 :UInt64;
  networkBitsPerSec @4 :UInt64;
}

struct Task {
  id @0 :Text;
  code @1 :CodeRef;
  inputs @2 :List(Port);
  outputs @3 :List(Port);
  estimatedExecutionTimeNs @4 :UInt64;
  resources @5 :Resources;
}

struct Endpoint {
  task @0 :Text;
  port @1 :Text;
}

struct Edge {
  from @0 :Endpoint;        # an output port
  to @1 :Endpoint;          # an input port
}

struct LatencyObjective {
  # End-to-end, per chain: `percentile` of invocation latency stays under `targetNs`.
  percentile @0 :Float64;
  targetNs @1 :UInt64;
}

struct TaskScaling {
  # Per-task overrides of a graph's scaling policy; 0 means "the graph's value".
  task @0 :Text;
  minReplicas @1 :UInt32;
  maxReplicas @2 :UInt32;
  maxConcurrency @3 :UInt32;
  targetUtilisation @4 :Float64;
  warmVms @5 :UInt32;           # booted idle VMs kept for the task (read when hasWarmVms)
  hasWarmVms @6 :Bool;
}

struct ScalingPolicy {
  # How the control node sizes a graph's tasks (see the README's `[scaling]` table).
  minReplicas @0 :UInt32;
  maxReplicas @1 :UInt32;
  maxVms @2 :UInt32;            # replicas of the whole graph at most; 0: no budget beyond maxReplicas
  targetUtilisation @3 :Float64;
  windowNs @4 :UInt64;
  scaleOutCooldownNs @5 :UInt64;
  scaleInCooldownNs @6 :UInt64;
  maxConcurrency @7 :UInt32;
  tasks @8 :List(TaskScaling);
  # Replacing a bad replica (0 on all four: the defaults; a record stored before they existed).
  slowFactor @9 :Float64;       # a replica this many times slower than its reference is slow
  errorRate @10 :Float64;       # a replica failing this share of its executions is failing
  throttledShare @11 :Float64;  # a replica's cgroup throttled this share of an interval is contended
  detectWindowNs @12 :UInt64;   # the replacement triggers' window
  hedge @13 :Bool;              # hedged invocations (opt-in)
  hedgeDelayNs @14 :UInt64;     # 0: the graph's recent p95 at the ingress
  hedgeBudget @15 :Float64;     # extra invocations at most, as a share (0: the default)
  signals @16 :List(ScalingSignal);
  # Predictive provisioning (0 on all: off, the defaults; a record stored before it existed).
  predictiveMode @17 :UInt8;          # 0 off, 1 forecast-only, 2 on
  predictiveAttainment @18 :Float64;  # 0: the default
  predictiveMaxWaitNs @19 :UInt64;    # 0: each task's calibrated execution time
  predictiveLeadNs @20 :UInt64;       # 0: the default
  maxScaleOutStep @21 :UInt32;        # replicas one scale-out adds at most; 0: no limit
  warmVms @22 :UInt32;                # booted idle VMs kept per task on microVM hosts, at least
}

struct ScalingSignal {
  # Size `task` on another signal too: replicas = its total over the task's replicas ÷ target.
  task @0 :Text;
  metric @1 :Text;              # "queue_length", "gpu_memory" or "custom.NAME"
  target @2 :Float64;           # per replica
}

struct Graph {
  name @0 :Text;
  tasks @1 :List(Task);
  edges @2 :List(Edge);
  objective @3 :LatencyObjective;
  hasObjective @4 :Bool;
  scaling @5 :ScalingPolicy;
  hasScaling @6 :Bool;
}

struct GraphRecord {
  # A graph as the registry stores it.
  id @0 :Text;              # stable across versions, e.g. "g7"
  version @1 :UInt32;       # 1 on first submit, +1 on each changed resubmit
  submittedAtMs @2 :UInt64; # unix milliseconds
  digest @3 :Data;          # sha256 of the canonical encoding of `graph`
  graph @4 :Graph;
}
