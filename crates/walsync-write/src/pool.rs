//! A small pool of SQL connections to the source database ([`deadpool`]), each with a statement
//! timeout; a caller waits for a connection at most as long. Write checkpoints and uploads use
//! it, so a slow or unreachable database answers "try again" and never piles requests up.
//!
//! Their transactions commit synchronously even where the server's default is
//! `synchronous_commit = off`: an upload is acknowledged only once PostgreSQL has it on disk
//! (a client forgets a write it was told is applied), and a write checkpoint is the WAL flush
//! position after the commit.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use deadpool::managed::{self, Metrics, Pool, RecycleError, RecycleResult};
use futures_util::future::BoxFuture;

/// Opens an SQL connection to the source database, with the application's connection settings
/// (TLS, session parameters): the pool itself knows nothing of how the source is reached.
pub type Connect = Arc<
    dyn Fn() -> BoxFuture<
            'static,
            Result<tokio_postgres::Client, Box<dyn std::error::Error + Send + Sync>>,
        > + Send
        + Sync,
>;

/// A pool's settings.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Connections at most.
    pub size: usize,
    /// The statement timeout of each connection, and the longest a caller waits for one.
    pub timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> PoolSettings {
        PoolSettings {
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
pub struct Manager {
    connect: Connect,
    statement_timeout: Duration,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("statement_timeout", &self.statement_timeout)
            .finish_non_exhaustive()
    }
}

/// A pooled connection and the statements prepared on it, by SQL text (a statement is
/// prepared once per connection, not at every use).
pub struct PgConn {
    client: tokio_postgres::Client,
    statements: HashMap<String, tokio_postgres::Statement>,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn")
            .field("statements", &self.statements.len())
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for PgConn {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

impl std::ops::DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Client {
        &mut self.client
    }
}

impl PgConn {
    /// The connection and its statement cache, borrowed apart (a transaction holds the one).
    pub(crate) fn split(
        &mut self,
    ) -> (
        &mut tokio_postgres::Client,
        &mut HashMap<String, tokio_postgres::Statement>,
    ) {
        (&mut self.client, &mut self.statements)
    }
}

impl managed::Manager for Manager {
    type Type = PgConn;
    type Error = PoolConnectError;

    async fn create(&self) -> Result<PgConn, PoolConnectError> {
        let client = (self.connect)()
            .await
            .map_err(|e| PoolConnectError::Connect(e.to_string()))?;
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                self.statement_timeout.as_millis().max(1)
            ))
            .await?;
        // `on`, `remote_write` and `remote_apply` flush locally before a commit returns.
        let commit: String = client
            .query_one("SELECT current_setting('synchronous_commit')", &[])
            .await?
            .get(0);
        if commit == "off" {
            client
                .batch_execute("SET synchronous_commit = local")
                .await?;
        }
        Ok(PgConn {
            client,
            statements: HashMap::new(),
        })
    }

    async fn recycle(&self, client: &mut PgConn, _: &Metrics) -> RecycleResult<PoolConnectError> {
        if client.is_closed() {
            return Err(RecycleError::message("the connection is closed"));
        }
        Ok(())
    }
}

/// A pool of connections made by `connect`.
pub type PgPool = Pool<Manager>;

/// Builds a pool; nothing connects until a connection is asked for.
pub fn pg_pool(connect: Connect, settings: PoolSettings) -> PgPool {
    let manager = Manager {
        connect,
        statement_timeout: settings.timeout,
    };
    // Only a misconfigured runtime or a size of 0 fail to build, and neither can be set.
    Pool::builder(manager)
        .max_size(settings.size.max(1))
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(settings.timeout))
        .create_timeout(Some(settings.timeout))
        .recycle_timeout(Some(settings.timeout))
        .build()
        .unwrap_or_else(|e| unreachable!("a connection pool: {e}"))
}
