//! The request path through an agent and its workers: routing tables (and the replica choice
//! they delegate to `prescient_policy::balance`), forwarding with retry, and the ingress where
//! invocations enter.

pub mod forward;
pub mod ingress;
pub mod routes;
