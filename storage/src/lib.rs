//! The services' storage plumbing, shared by both: opening the service's own database
//! (embedded SQLite or PostgreSQL, one code path), SQLite file ownership and its write gate,
//! persisted secrets, coalesced point reads, the exactly invalidated caches, the peer
//! leases that keep caches exact across replicas on PostgreSQL, the change feeds' outbox and
//! streams, and named leases that let one replica at a time do a job.
//!
//! It knows no wire type and no service's rules.

pub mod batch;
pub mod cache;
pub mod database;
pub mod db;
pub mod feed;
pub mod lease;
pub mod peers;
pub mod service_token;
