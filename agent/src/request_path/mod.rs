//! The request path through an agent and its workers: routing tables (and the replica choice
//! they delegate to `prescient_policy::balance`), forwarding with retry, the ingress where
//! invocations enter, and its hedging.

pub mod forward;
pub mod hedge;
pub mod ingress;
pub mod routes;
