//! What both servers run on besides their own rules: serving gRPC (health, reflection, the
//! per-RPC layer: spans, request ids, deadlines, load shedding, rich framework errors, drain),
//! error statuses with `ErrorInfo`/`BadRequest`, dialling a gRPC server, TLS, telemetry (logs and metrics), the
//! binaries' shared `main`, and token buckets.
//!
//! It knows the wire contract ([`contract`]) but no database and no service's rules.

pub mod client;
pub mod clock;
pub mod launch;
pub mod limits;
pub mod logline;
pub mod logs;
pub mod metrics;
pub mod rpc;
pub mod telemetry;
pub mod tls;
