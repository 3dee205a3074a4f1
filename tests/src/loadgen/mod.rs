//! The load generator and fixture loader behind the `loadgen` binary (`src/bin/loadgen.rs`).

pub mod fixtures;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod watch;
