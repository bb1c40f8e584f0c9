//! Write checkpoints: a position in the WAL after the client's writes.
//!
//! A write checkpoint is the LSN of a transactional logical message
//! (`pg_logical_emit_message(true, 'walsync', ...)`) written at the time of the request. The
//! message travels through the replication stream like any transaction, so the store's
//! position passes it even when nothing else is written; a checkpoint line of the client's
//! streams then carries it as `write_checkpoint`. Every transaction committed before the
//! request has its commit record before the message, so the store passes the message only
//! after them (another transaction committing between the message and its own commit moves
//! the store past the message, but only after everything before it).
//!
//! Uploads answer the WAL flush position read after their own synchronous commit instead
//! (`walsync-write`), which writes nothing. That does not do here: the client's earlier writes
//! were committed by other sessions, perhaps asynchronously, so the flush position can still
//! be before them; and the insert position of a server with nothing more to write can sit
//! after the header of a WAL page no record fills yet, which the stream would not pass until
//! something else is written.
//!
//! The messages are written over a small pool of connections ([`deadpool`]), each with a
//! statement timeout, and a request waits for a connection at most as long: a slow or
//! unreachable database answers `database_unavailable` (retryable), it never piles requests up.

use std::str::FromStr;

use deadpool::managed::{self, PoolError};
use walsync_types::Lsn;
use walsync_write::{Connect, PgPool, PoolSettings, pg_pool};

use crate::{ApiError, ErrorCode};

/// The pool's settings.
pub type WriteCheckpointPool = PoolSettings;

/// Creates write checkpoints in the source database.
pub struct WriteCheckpoints {
    pool: PgPool,
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
        WriteCheckpoints {
            pool: pg_pool(connect, settings),
        }
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
