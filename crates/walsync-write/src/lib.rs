//! Uploads: clients write straight to walsync, which applies their CRUD transactions to
//! PostgreSQL — authorized, all or nothing, idempotent across retries and restarts, and with
//! nothing a user typed lost silently.
//!
//! - **The request is the PowerSync client's own**: `{client_id, batch: [{tx_id, ops:
//!   [CrudEntry.toJSON(), …]}]}` ([`UploadRequest`]), so an app's `uploadData` posts its
//!   CRUD transactions unchanged.
//! - **One PostgreSQL transaction per client transaction**, through a pool with a statement
//!   timeout. Values reach PostgreSQL only as JSON parameters converted by
//!   `jsonb_populate_record` to the column types; table and column names only from the catalog,
//!   quoted.
//! - **Authorization before each change** ([`AuthorizationMode`]): a table's predicate for the
//!   operation runs in the transaction, before the change; or PostgreSQL's row-level security
//!   under a configured role with the token's claims.
//! - **Idempotent**: `(user, client_id, transaction)` is claimed in `<schema>.uploads` first
//!   in the same transaction; a retry finds the result recorded there and writes nothing again.
//! - **Results a client can act on** ([`Status`]): applied, rejected (final; the transaction
//!   is kept whole in `<schema>.rejected_writes`) or retryable (nothing written).
//! - A write checkpoint (a transactional logical message in the same transaction) tells the
//!   client when its own stream holds its writes.

mod apply;
mod catalog;
mod config;
mod conflict;
mod deadletter;
mod pool;
mod predicate;
mod session;

pub use apply::{Uploads, Writer};
pub use catalog::{ColumnInfo, TableInfo};
pub use config::{AuthorizationMode, ConflictRule, Strategy, TableRule, WriteConfig};
pub use deadletter::DeadLetter;
pub use pool::{Connect, Manager, PgConn, PgPool, PoolConnectError, PoolSettings, pg_pool};
pub use predicate::Predicate;
pub use walsync_protocol::upload::{
    ClientTransaction, ConflictNote, CrudEntry, CrudOp, Status, TxResult, UploadReply,
    UploadRequest,
};

/// A configuration or schema that cannot serve uploads: found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writes: table {table}: the {operation} predicate: {problem}")]
    Predicate {
        table: String,
        operation: &'static str,
        problem: String,
    },
    #[error("writes: {0}")]
    Config(String),
    #[error("writes: {0}")]
    Catalog(String),
    #[error("writes: postgres is not reachable: {0}")]
    Unreachable(String),
}

/// A request refused whole, before any transaction.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
}
