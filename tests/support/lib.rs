//! What the whole-system tests share: the seed app in a fresh database with a store
//! ([`seed`]), and the service under test with its tokens and each user's expected rows
//! ([`service`]), `walsync serve` as a child process ([`process`]), and the one convergence
//! checker of the tests under fire ([`converge`]).

pub mod converge;
pub mod process;
pub mod seed;
pub mod service;
