//! The services' storage plumbing, shared by both: opening the service's own database
//! (embedded SQLite or PostgreSQL, one code path), SQLite file ownership and its write gate,
//! persisted secrets, coalesced point reads, the exactly invalidated caches, and the peer
//! leases that keep caches exact across replicas on PostgreSQL.
//!
//! It knows no wire type and no service's rules.

pub mod batch;
pub mod cache;
pub mod database;
pub mod db;
pub mod feed;
pub mod peers;
pub mod service_token;
