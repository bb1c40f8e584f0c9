//! The walsync application: its configuration (`walsync.toml`), the wiring of replicator, store,
//! sync core and server into one process ([`Service`]), and the commands of the `walsync`
//! binary ([`cli`]). Tests start a [`Service`] in-process.

pub mod cli;
pub mod config;
mod demo;
pub mod maintenance;
mod replicate;
pub mod rules_check;
pub mod serve;
mod service;
pub mod shared;
pub mod status;
pub mod telemetry;
pub mod wal_guard;
pub mod web;
pub mod writes;

pub use config::Config;
pub use service::{Service, StartError};
