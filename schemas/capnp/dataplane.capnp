@0x9faf8427041d1f10;
# Frames of the data plane: between clients, ingresses and workers, over TCP.
# Each frame is one Cap'n Proto message in the standard stream framing.

struct Frame {
  union {
    request @0 :Request;
    acks @1 :List(UInt64);      # hop sequence numbers the receiver has finished with
    result @2 :Output;          # a graph output (or an error) on its way back to the ingress
    invoke @3 :Invoke;          # client -> ingress
    reply @4 :Reply;            # ingress -> client
  }
}

struct Request {
  # One input of one task for one invocation, sent to a chosen replica.
  hopSeq @0 :UInt64;            # per connection; acknowledged once handled
  invocation @1 :UInt64;
  graphId @2 :Text;
  epoch @3 :UInt64;             # routing-table epoch the invocation was admitted under
  task @4 :Text;
  port @5 :Text;
  payload @6 :Data;
  deadlineUnixUs @7 :UInt64;
  replyTo @8 :Text;             # the ingress's data-plane address
  sentUnixNs @9 :UInt64;        # when the sender wrote it: transfer time on the edge
  attempt @10 :UInt32;
  admittedUnixNs @11 :UInt64;   # when the ingress admitted the invocation: sinks measure each
                                # chain's end-to-end latency from it
}

struct Output {
  invocation @0 :UInt64;
  task @1 :Text;
  port @2 :Text;
  payload @3 :Data;
  error @4 :Text;               # non-empty: the invocation failed; names task and replica
}

struct NamedValue {
  name @0 :Text;                # "task.port"
  value @1 :Data;
}

struct Invoke {
  id @0 :UInt64;                # the client's own id, echoed in the reply
  graph @1 :Text;               # id or name
  inputs @2 :List(NamedValue);
  deadlineMs @3 :UInt32;        # 0: the ingress default
}

struct Reply {
  id @0 :UInt64;
  outputs @1 :List(NamedValue);
  error @2 :Text;
}
