@0xab934ec3a6b82cb0;
# The protocol between a worker and an `exec` artifact it runs: Cap'n Proto messages in the
# standard stream framing, requests on the artifact's stdin, responses on its stdout. The
# artifact may answer out of order; `id` pairs them.

struct ExecRequest {
  id @0 :UInt64;
  inputs @1 :List(Data);        # in the task's input-port order
}

struct ExecResponse {
  id @0 :UInt64;
  output @1 :Data;              # sent on every output port
  error @2 :Text;               # non-empty: the execution failed
  metrics @3 :List(Metric);     # gauges the task reports (a scaling signal may name them)
}

struct Metric {
  # The latest value of a gauge the task keeps (its batch queue, KV-cache use, ...); the
  # control node reads it as "custom.NAME" summed over the task's replicas.
  name @0 :Text;
  value @1 :Float64;
}
