//! Write checkpoints: a position in the WAL after the client's writes.
//!
//! A write checkpoint is the LSN of a transactional logical message
//! (`pg_logical_emit_message(true, 'walsync', ...)`) written at the time of the request. The
//! message travels through the replication stream like any transaction, so the store's
//! position passes it even when nothing else is written; a checkpoint line of the client's
//! streams then carries it as `write_checkpoint`.
//!
//! The messages are written over a small pool of connections ([`deadpool`]), each with a
//! statement timeout, and a request waits for a connection at most as long: a slow or
//! unreachable database answers `database_unavailable` (retryable), it never piles requests up.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{self, Metrics, Pool, PoolError, RecycleError, RecycleResult};
use futures_util::future::BoxFuture;
use walsync_types::Lsn;

use crate::{ApiError, ErrorCode};

/// Opens an SQL connection to the source database, with the application's connection settings
/// (TLS, session parameters): the server itself knows nothing of how the source is reached.
pub type Connect = Arc<
    dyn Fn() -> BoxFuture<
            'static,
            Result<tokio_postgres::Client, Box<dyn std::error::Error + Send + Sync>>,
        > + Send
        + Sync,
>;

/// The pool's settings.
#[derive(Debug, Clone, Copy)]
pub struct WriteCheckpointPool {
    /// Connections at most.
    pub size: usize,
    /// The statement timeout of each connection, and the longest a request waits for one.
    pub timeout: Duration,
}

impl Default for WriteCheckpointPool {
    fn default() -> WriteCheckpointPool {
        WriteCheckpointPool {
            size: 4,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Why a pooled connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PoolConnectError {
    #[error("cannot connect to postgres: {0}")]
    Connect(String),
    #[error("cannot set the statement timeout: {0}")]
    Setup(#[from] tokio_postgres::Error),
}

/// Makes the pool's connections: the application's [`Connect`], then the statement timeout.
struct Manager {
    connect: Connect,
    statement_timeout: Duration,
}

impl managed::Manager for Manager {
    type Type = tokio_postgres::Client;
    type Error = PoolConnectError;

    async fn create(&self) -> Result<tokio_postgres::Client, PoolConnectError> {
        let client = (self.connect)()
            .await
            .map_err(|e| PoolConnectError::Connect(e.to_string()))?;
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                self.statement_timeout.as_millis().max(1)
            ))
            .await?;
        Ok(client)
    }

    async fn recycle(
        &self,
        client: &mut tokio_postgres::Client,
        _: &Metrics,
    ) -> RecycleResult<PoolConnectError> {
        if client.is_closed() {
            return Err(RecycleError::message("the connection is closed"));
        }
        Ok(())
    }
}

/// Creates write checkpoints in the source database.
pub struct WriteCheckpoints {
    pool: Pool<Manager>,
}

impl std::fmt::Debug for WriteCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteCheckpoints")
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

fn unavailable(message: &str) -> ApiError {
    ApiError::new(ErrorCode::DatabaseUnavailable, message)
}

impl WriteCheckpoints {
    pub fn new(connect: Connect, settings: WriteCheckpointPool) -> WriteCheckpoints {
        let manager = Manager {
            connect,
            statement_timeout: settings.timeout,
        };
        // Only a misconfigured runtime or a size of 0 fail to build, and neither can be set.
        let pool = Pool::builder(manager)
            .max_size(settings.size.max(1))
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .build()
            .unwrap_or_else(|e| unreachable!("the write checkpoint pool: {e}"));
        WriteCheckpoints { pool }
    }

    /// Connections open and idle, for tests and metrics.
    pub fn pool_status(&self) -> (usize, usize) {
        let s = self.pool.status();
        (s.size, s.available)
    }

    /// A new write checkpoint (an LSN as a number). A connection that fails is dropped and the
    /// request tried once more on another.
    pub async fn create(&self) -> Result<u64, ApiError> {
        for attempt in 0..2 {
            let client = match self.pool.get().await {
                Ok(c) => c,
                Err(PoolError::Timeout(_)) => {
                    tracing::warn!("write checkpoint: no database connection in time");
                    return Err(unavailable("the database is busy; try again"));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "write checkpoint: cannot connect to postgres");
                    return Err(unavailable("the database is not reachable; try again"));
                }
            };
            match client
                .query_one(
                    "SELECT pg_logical_emit_message(true, 'walsync', 'write-checkpoint')::text",
                    &[],
                )
                .await
            {
                Ok(row) => {
                    let text: String = row.get(0);
                    let lsn = Lsn::from_str(&text).map_err(|e| {
                        ApiError::internal("write checkpoint: postgres returned no lsn", &e)
                    })?;
                    return Ok(lsn.0);
                }
                Err(e) if e.as_db_error().is_some() => {
                    // The database answered (a statement timeout, a recovery conflict): the
                    // connection is sound, the request may be retried later.
                    tracing::warn!(error = %e, "write checkpoint query failed");
                    return Err(unavailable(
                        "the database did not answer in time; try again",
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "write checkpoint query failed");
                    // The connection is gone: not returned to the pool.
                    let _ = managed::Object::take(client);
                }
            }
        }
        Err(unavailable("the database did not answer; try again"))
    }
}
