//! The `[server]` section of the configuration: the listener and the limits of the API.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// HTTP and gRPC (and grpc-web) on one port.
    pub listen: SocketAddr,
    /// Open sync streams at most; more get 429 / RESOURCE_EXHAUSTED with Retry-After.
    pub max_connections: usize,
    /// Open sync streams of one user at most (all its devices and tabs); more get 429 /
    /// RESOURCE_EXHAUSTED with Retry-After.
    pub max_streams_per_user: usize,
    /// Seconds a refused client is told to wait.
    pub retry_after_seconds: u64,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Seconds a request body may take to arrive once its stream was admitted (a client that
    /// sends it slowly must not hold an admission slot).
    pub request_timeout_seconds: u64,
    /// Largest data line sent (a page holds fewer ops when rows are large; one op always fits).
    pub max_line_bytes: usize,
    /// Origins allowed for browsers (`*` for any). Empty: no CORS headers.
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 100_000,
            max_streams_per_user: 10,
            retry_after_seconds: 5,
            max_request_bytes: 1 << 20,
            request_timeout_seconds: 10,
            max_line_bytes: 4 << 20,
            cors_origins: Vec::new(),
        }
    }
}
