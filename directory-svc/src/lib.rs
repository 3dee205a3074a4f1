//! directory-svc owns directories (tenants), their users, organizational roles and sign-in,
//! and answers `Authorize` for other services.
//!
//! Layers: [`transport`] (tonic handlers: decode, validate, call the domain, map the error)
//! → [`domain`] (the rules; no tonic types) → [`store`] (a trait; SQL through sqlx on SQLite or
//! PostgreSQL). [`app`] wires them into a server; [`config`] reads the flags.
//!
//! This crate never keeps state that must survive a restart anywhere but the database, and
//! never decides a permission from anything but the roles stored now.

pub mod app;
pub mod config;
pub mod domain;
pub mod store;
pub mod transport;

pub use app::Application;
pub use config::Config;
