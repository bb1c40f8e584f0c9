//! What the whole-system tests share: the seed app in a fresh database with a store
//! ([`seed`]), and the service under test with its tokens and each user's expected rows
//! ([`service`]), and `walsync serve` as a child process ([`process`]).

pub mod process;
pub mod seed;
pub mod service;
