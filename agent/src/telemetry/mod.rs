//! What the agent and its workers measure: per-execution spans aggregated into windows in the
//! worker, in-process stamps, host samples (procfs, NVML), the eBPF probes' user side and its
//! BTF reader, and TCP bytes per VM from the kernel's socket counters.

pub mod btf;
pub mod clock;
pub mod groups;
pub mod host;
pub mod probes;
pub mod sockets;
pub mod spans;
