//! The `prescient` package's library: what its binaries and its integration tests share.

pub mod launch;
