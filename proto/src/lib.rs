//! The contract of the service pair, and the conventions both servers share.
//!
//! - [`directory::v1`] and [`billing::v1`]: Rust types and tonic stubs generated from the
//!   `.proto` files in this folder; [`FILE_DESCRIPTOR_SET`] for server reflection.
//! - [`fields`]: the field rules the contract states once for both services (display names,
//!   ids, page sizes), as pure functions returning [`fields::Violation`]s.
//! - [`paging`]: opaque, tamper-evident page tokens bound to a list, a scope and a filter.
//! - [`mac`]: the domain-bound, truncated HMAC-SHA256 tags page and access tokens carry.
//! - [`rpc`]: turning a service's error into a `tonic::Status` with `ErrorInfo` and
//!   `BadRequest`, and the server plumbing (health, reflection, per-RPC spans, shutdown).
//! - [`logs`]: the log writer thread, which writes log lines in batches, so a call never waits
//!   on the log sink.
//! - [`logline`]: the text log line, written without tracing-subscriber's colour-code layers.
//! - [`db`]: opening the service's own database (embedded SQLite or PostgreSQL) with the same
//!   code path, and persisted secrets.
//! - [`batch`]: point reads by key that wait at the same time share one query.
//! - [`cache`]: the exactly invalidated read cache a process may keep of an SQLite file it
//!   owns, or of a PostgreSQL database while it holds a lease.
//! - [`peers`]: the leases and invalidations that keep caches exact across replicas sharing
//!   one PostgreSQL database.
//!
//! This crate holds no business rule of either service: those live in each service's domain.

pub mod batch;
pub mod cache;
pub mod db;
pub mod fields;
pub mod launch;
pub mod limits;
pub mod logline;
pub mod logs;
pub mod mac;
pub mod metrics;
pub mod paging;
pub mod peers;
pub mod rpc;
pub mod time;

/// `directory.v1`: directories, users, roles, sign-in, Authorize.
#[allow(clippy::all, missing_docs)]
pub mod directory {
    pub mod v1 {
        tonic::include_proto!("directory.v1");
    }
}

/// `billing.v1`: offers and subscriptions.
#[allow(clippy::all, missing_docs)]
pub mod billing {
    pub mod v1 {
        tonic::include_proto!("billing.v1");
    }
}

/// Encoded `FileDescriptorSet` of both packages and their imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// [`FILE_DESCRIPTOR_SET`] decoded, once: the API's services, methods and messages, for the
/// code that checks names against them (metric labels, fields of undecodable requests).
pub fn descriptors() -> &'static prost_types::FileDescriptorSet {
    static DECODED: std::sync::OnceLock<prost_types::FileDescriptorSet> =
        std::sync::OnceLock::new();
    DECODED.get_or_init(|| {
        use prost::Message as _;
        // Written by build.rs from the protos at compile time; empty only if that broke.
        prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap_or_default()
    })
}
