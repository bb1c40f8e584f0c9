//! The sync API: one port for the PowerSync-compatible HTTP stream, gRPC and grpc-web, all
//! behind one [`walsync_sync::SyncCore`].
//!
//! - `POST /sync/stream`: NDJSON lines (`application/x-ndjson`, `X-Accel-Buffering: no`), or
//!   BSON documents (`application/vnd.powersync.bson-stream`) when the `Accept` header prefers them;
//! - `GET /write-checkpoint2.json?client_id=`: `{"data":{"write_checkpoint":"N"}}`;
//! - `POST /write`: the client's CRUD transactions, applied by [`walsync_write::Uploads`] when
//!   the application gave it (404 `not_found` otherwise); `walsync.v1.Sync/Upload` the same
//!   over gRPC;
//! - `POST /presence` (join, update, leave, message, heartbeat) and `GET /presence/stream?room=`
//!   (NDJSON, or Server-Sent Events): presence in rooms the token's buckets give, and
//!   `walsync.v1.Sync/Presence`, one bidirectional gRPC stream of actions and events;
//! - `walsync.v1.Sync/Sync` and `/WriteCheckpoint` over gRPC (HTTP/2) and grpc-web (HTTP/1.1);
//! - `GET /health/live`, `GET /health/ready`, `GET /metrics` (Prometheus text, when the
//!   application installed a recorder), `GET /admin/status` (JSON, to `server.admin_token`).
//!
//! Every request is authenticated first (401 / `UNAUTHENTICATED` and nothing else otherwise),
//! then admitted: streams against the connection limits, write checkpoints against a rate per
//! user (429 with `Retry-After` / `RESOURCE_EXHAUSTED`). Errors are one vocabulary ([`ErrorCode`]): JSON with a stable `code`
//! over HTTP, the matching status over gRPC.

mod admission;
pub mod auth;
mod config;
mod connection;
mod error;
mod grpc;
mod http;
pub mod metrics;
mod presence;
mod upload;
mod websocket;
mod write_checkpoint;

use std::sync::{Arc, OnceLock};

use walsync_storage::BucketStore;
use walsync_sync::SyncCore;

pub use auth::{AuthConfig, AuthError, Authenticator, mint_hs256};
pub use config::{Secret, ServerConfig};
pub use error::{ApiError, ErrorCode};
pub use walsync_write::{Connect, PoolConnectError};
pub use write_checkpoint::{WriteCheckpointPool, WriteCheckpoints};

/// Everything a request needs.
pub struct Server<S: BucketStore> {
    pub core: Arc<SyncCore<S>>,
    pub auth: Arc<Authenticator>,
    pub config: ServerConfig,
    pub checkpoints: Arc<WriteCheckpoints>,
    admission: admission::Admission,
    write_checkpoint_rate: admission::RateLimit,
    upload_rate: admission::RateLimit,
    /// Applies `POST /write`, once the application gave it.
    uploads: OnceLock<Arc<walsync_write::Uploads>>,
    /// Renders the process's metrics for `GET /metrics`, once the application gave it.
    metrics_render: OnceLock<MetricsRender>,
    /// The application's own condition for `/health/ready` (besides a complete snapshot).
    readiness: OnceLock<Readiness>,
    /// The application's status for `GET /admin/status`.
    status: OnceLock<StatusRender>,
}

/// The application's status as JSON.
pub type StatusRender = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// `Err(why)` while the application is not ready to serve (PostgreSQL unreachable, say).
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Renders metrics in Prometheus' text format.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

impl<S: BucketStore> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: BucketStore + 'static> Server<S> {
    pub fn new(
        core: Arc<SyncCore<S>>,
        auth: Arc<Authenticator>,
        config: ServerConfig,
        checkpoints: Arc<WriteCheckpoints>,
    ) -> Arc<Server<S>> {
        Arc::new(Server {
            admission: admission::Admission::new(
                config.max_connections,
                config.max_streams_per_user,
                config.retry_after_seconds,
            ),
            write_checkpoint_rate: admission::RateLimit::new(
                config.write_checkpoints_per_second,
                config.write_checkpoint_burst,
            ),
            upload_rate: admission::RateLimit::new(config.uploads_per_second, config.upload_burst),
            uploads: OnceLock::new(),
            core,
            auth,
            config,
            checkpoints,
            metrics_render: OnceLock::new(),
            readiness: OnceLock::new(),
            status: OnceLock::new(),
        })
    }

    /// Adds `check` to `/health/ready`: while it fails, the server answers 503 `not_ready` with
    /// its reason (streams keep serving what the store holds).
    pub fn set_readiness(&self, check: Readiness) {
        let _ = self.readiness.set(check);
    }

    /// Serves `POST /write` with `uploads`.
    pub fn set_uploads(&self, uploads: Arc<walsync_write::Uploads>) {
        let _ = self.uploads.set(uploads);
    }

    /// Serves `GET /admin/status` (to `server.admin_token`) with `render`.
    pub fn set_status(&self, render: StatusRender) {
        let _ = self.status.set(render);
    }

    /// Serves `GET /metrics` with `render` (the application's Prometheus recorder).
    pub fn set_metrics(&self, render: MetricsRender) {
        let _ = self.metrics_render.set(render);
    }

    /// The router serving both transports: unknown paths answer 404 and wrong methods 405,
    /// in the error body of every HTTP error (or as gRPC statuses for gRPC requests).
    pub fn router(self: &Arc<Self>) -> axum::Router {
        http::router(self.clone())
            .merge(grpc::router(self.clone()))
            .fallback(http::not_found)
            .method_not_allowed_fallback(http::method_not_allowed)
            .layer(http::cors(&self.config.cors_origins))
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        connection::serve(listener, router, &self.config, shutdown).await
    }
}
