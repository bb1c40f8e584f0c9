//! Write checkpoints: a position in the WAL after the client's writes.
//!
//! A write checkpoint is the LSN of a transactional logical message
//! (`pg_logical_emit_message(true, 'walsync', ...)`) written at the time of the request. The
//! message travels through the replication stream like any transaction, so the store's
//! position passes it even when nothing else is written; a checkpoint line then carries the
//! store's position as `write_checkpoint`, which is ≥ the client's number.

use std::str::FromStr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::Mutex;
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

/// Creates write checkpoints in the source database.
pub struct WriteCheckpoints {
    connect: Connect,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for WriteCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteCheckpoints").finish_non_exhaustive()
    }
}

impl WriteCheckpoints {
    pub fn new(connect: Connect) -> WriteCheckpoints {
        WriteCheckpoints {
            connect,
            client: Mutex::new(None),
        }
    }

    /// A new write checkpoint (an LSN as a number).
    pub async fn create(&self) -> Result<u64, ApiError> {
        let mut guard = self.client.lock().await;
        for attempt in 0..2 {
            if guard.is_none() {
                match (self.connect)().await {
                    Ok(c) => *guard = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "write checkpoint: cannot connect to postgres");
                        return Err(ApiError::new(
                            ErrorCode::DatabaseUnavailable,
                            "the database is not reachable; try again",
                        ));
                    }
                }
            }
            let Some(client) = guard.as_ref() else {
                continue;
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
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "write checkpoint query failed");
                    *guard = None;
                }
            }
        }
        Err(ApiError::new(
            ErrorCode::DatabaseUnavailable,
            "the database did not answer; try again",
        ))
    }
}
