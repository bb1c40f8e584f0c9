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
    /// Write checkpoints one user may ask for per second (after a burst of
    /// `write_checkpoint_burst`); more get 429 `too_many_requests` with Retry-After.
    pub write_checkpoints_per_second: f64,
    pub write_checkpoint_burst: u32,
    /// Uploads (`POST /write` requests) one user may send per second (after a burst of
    /// `upload_burst`); more get 429 `too_many_requests` with Retry-After.
    pub uploads_per_second: f64,
    pub upload_burst: u32,
    /// Connections to PostgreSQL for write checkpoints, at most.
    pub write_checkpoint_connections: usize,
    /// Milliseconds a write checkpoint may take in PostgreSQL (the connections' statement
    /// timeout) and may wait for a connection; past it the client gets 503 and retries.
    pub write_checkpoint_timeout_ms: u64,
    /// Seconds a refused client is told to wait.
    pub retry_after_seconds: u64,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Seconds a request body may take to arrive once its stream was admitted (a client that
    /// sends it slowly must not hold an admission slot).
    pub request_timeout_seconds: u64,
    /// Bytes of response a connection (an HTTP/2 stream) buffers before it stops taking lines
    /// from the sync core: with `sync.buffer_bytes`, what a client that stops reading pins.
    pub write_buffer_bytes: usize,
    /// Largest data line sent (a page holds fewer ops when rows are large; one op always fits).
    pub max_line_bytes: usize,
    /// Seconds a stopping server waits for its streams to end and requests in flight to finish
    /// before it closes what is left.
    pub shutdown_timeout_seconds: u64,
    /// The bearer token of `GET /admin/status` (`walsync status`); none: the endpoint is off.
    pub admin_token: Option<Secret>,
    /// Origins allowed for browsers (`*` for any). Empty: no CORS headers.
    pub cors_origins: Vec<String>,
}

/// A secret from the configuration: never printed by `Debug`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Secret {
    /// Whether `given` is the secret, in time that does not depend on where they differ.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl ServerConfig {
    /// The write checkpoint pool's settings.
    pub fn write_checkpoint_pool(&self) -> crate::WriteCheckpointPool {
        crate::WriteCheckpointPool {
            size: self.write_checkpoint_connections.max(1),
            timeout: std::time::Duration::from_millis(self.write_checkpoint_timeout_ms.max(1)),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 100_000,
            max_streams_per_user: 10,
            retry_after_seconds: 5,
            write_checkpoints_per_second: 10.0,
            write_checkpoint_burst: 20,
            uploads_per_second: 20.0,
            upload_burst: 50,
            write_checkpoint_connections: 4,
            write_checkpoint_timeout_ms: 5_000,
            max_request_bytes: 1 << 20,
            request_timeout_seconds: 10,
            max_line_bytes: 4 << 20,
            write_buffer_bytes: 64 << 10,
            shutdown_timeout_seconds: 10,
            cors_origins: Vec::new(),
            admin_token: None,
        }
    }
}
