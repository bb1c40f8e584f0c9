//! Reads PostgreSQL's WAL through a pgoutput logical replication slot: pre-flight checks, the
//! initial copy inside the slot's exported snapshot, then every committed transaction once, in
//! commit order, with the ack rule of [`ack`] deciding what PostgreSQL may discard.
//!
//! ```text
//! Source::start ──▶ reader thread (current-thread runtime)
//!                     preflight → [create slot → snapshot] → START_REPLICATION → frames
//!                     └─ codec (pure) → datum (typed values) → SourceEvent batches ──▶ consumer
//! consumer ── ack(lsn) ──▶ AckState ──▶ standby status updates ──▶ PostgreSQL
//! ```

pub mod ack;
pub mod codec;
mod config;
pub mod connect;
pub mod datum;
mod error;
mod event;
pub mod preflight;
mod reader;
pub mod replication;
mod snapshot;
mod source;

pub use config::{
    DEFAULT_RECEIVE_TIMEOUT, DEFAULT_RECONNECT_MAX, DEFAULT_RECONNECT_MIN,
    DEFAULT_SNAPSHOT_BATCH_BYTES, DEFAULT_SNAPSHOT_BATCH_ROWS, DEFAULT_STATUS_INTERVAL,
    PublicationScope, SourceConfig,
};
pub use connect::{PgConfig, SslMode};
pub use datum::Datum;
pub use error::{Result, SourceError};
pub use event::{Change, OldRow, Row, SourceEvent, Table, TableColumn};
pub use source::{Acker, Resume, Source, SourceStream};
