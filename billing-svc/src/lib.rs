//! billing-svc owns subscriptions. Every purchase is authorised by directory-svc over gRPC
//! (Global or Billing Administrator) and lands in the buyer's directory: Azure subscriptions
//! are owned by the buyer, Office 365 subscriptions by the directory.
//!
//! Layers: [`transport`] (tonic handlers) → [`domain`] (the rules; no tonic types) →
//! [`store`] (a trait; SQL through sqlx on SQLite or PostgreSQL). [`directory`] is the gRPC
//! client of directory-svc behind the domain's `Authorizer` trait. [`app`] wires them into a
//! server; [`config`] reads the flags.
//!
//! This crate never decides who a caller is or which roles they hold: the directory does, on
//! every call. It never writes anything for a call the directory did not authorise.

pub mod app;
pub mod config;
pub mod directory;
pub mod domain;
pub mod store;
pub mod transport;

pub use app::Application;
pub use config::Config;
