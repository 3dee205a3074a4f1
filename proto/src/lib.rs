//! The wire contract of the service pair, and nothing else.
//!
//! - [`directory::v1`] and [`billing::v1`]: Rust types and tonic stubs generated from the
//!   `.proto` files in this folder; [`FILE_DESCRIPTOR_SET`] for server reflection.
//! - [`cursor`]: change-feed cursors (a position and its time), bound to the service.
//! - [`fields`]: the field rules the contract states once for both services (display names,
//!   ids, page sizes), as pure functions returning [`fields::Violation`]s.
//! - [`paging`]: opaque, tamper-evident page tokens bound to a list, a scope and a filter.
//! - [`mac`]: the domain-bound, truncated HMAC-SHA256 tags page and access tokens carry.
//! - [`refusal`]: the refusals every call can get (bad fields, page token or bearer token).
//! - [`time`]: times as the contract carries them (`google.protobuf.Timestamp`).
//!
//! It holds no business rule of either service, and no machinery: serving, telemetry and TLS
//! live in `platform`, databases and caches in `storage`. Its dependencies are tonic, prost
//! and small pure crates; the architecture test (`tests/tests/architecture.rs`) keeps it so.

pub mod cursor;
pub mod fields;
pub mod mac;
pub mod paging;
pub mod refusal;
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
