//! How the source is set up.

use std::time::Duration;

use crate::connect::PgConfig;

/// Settings of the replication source. Defaults are the constants below.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub pg: PgConfig,
    /// The logical replication slot walsync reads (and creates when missing).
    pub slot: String,
    /// The publication that names the tables to replicate.
    pub publication: String,
    /// When the publication is missing: create it for these tables, or fail with advice.
    pub create_publication: Option<PublicationScope>,
    /// The tables the consumer reads (`schema.table`, as the sync rules name them): pre-flight
    /// checks that the publication includes each and publishes inserts, updates, deletes and
    /// truncates; with `create_publication` set it adds those missing.
    pub required_tables: Vec<String>,
    /// Ask pgoutput to stream large transactions before they commit (protocol 2). walsync still
    /// emits a transaction only once it committed; this moves the wait from PostgreSQL's disk to
    /// walsync's memory and lets an aborted transaction cost nothing downstream.
    pub stream_in_progress: bool,
    /// How often to tell PostgreSQL our position even when it did not ask.
    pub status_interval: Duration,
    /// Consider the connection dead after this long without a message. PostgreSQL sends a
    /// keepalive after half its `wal_sender_timeout` (60 s by default) of silence.
    pub receive_timeout: Duration,
    /// Rows per batch of the initial copy, at most.
    pub snapshot_batch_rows: usize,
    /// Bytes (of PostgreSQL's text) per batch of the initial copy, about.
    pub snapshot_batch_bytes: usize,
    /// First and longest wait between reconnection attempts.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationScope {
    AllTables,
    /// Qualified or unqualified table names.
    Tables(Vec<String>),
}

/// pg_recvlogical's default status interval.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Twice PostgreSQL's default `wal_sender_timeout`: a healthy server pings at half of that.
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// 10,000 rows of a few hundred bytes keep a batch around a few MB.
pub const DEFAULT_SNAPSHOT_BATCH_ROWS: usize = 10_000;
/// 1 MiB of text per batch, as a streaming batch holds about 1 MiB of WAL: the channel holds up
/// to 16 batches, and a decoded row takes about three times its text, so the copy in flight
/// stays around 50 MiB whatever the table (8 MiB batches held ~150 MiB of rows while a
/// re-copy applied them; 10,000 rows of 1 MiB each were 10 GiB in one batch).
pub const DEFAULT_SNAPSHOT_BATCH_BYTES: usize = 1 << 20;
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);

impl SourceConfig {
    pub fn new(
        pg: PgConfig,
        slot: impl Into<String>,
        publication: impl Into<String>,
    ) -> SourceConfig {
        SourceConfig {
            pg,
            slot: slot.into(),
            publication: publication.into(),
            create_publication: None,
            required_tables: Vec::new(),
            stream_in_progress: false,
            status_interval: DEFAULT_STATUS_INTERVAL,
            receive_timeout: DEFAULT_RECEIVE_TIMEOUT,
            snapshot_batch_rows: DEFAULT_SNAPSHOT_BATCH_ROWS,
            snapshot_batch_bytes: DEFAULT_SNAPSHOT_BATCH_BYTES,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
        }
    }

    /// pgoutput's options for `START_REPLICATION`.
    pub(crate) fn plugin_options(&self) -> Vec<(&'static str, String)> {
        let mut o = vec![
            (
                "proto_version",
                if self.stream_in_progress { "2" } else { "1" }.to_owned(),
            ),
            (
                "publication_names",
                format!("\"{}\"", self.publication.replace('"', "\"\"")),
            ),
            ("messages", "true".to_owned()),
        ];
        if self.stream_in_progress {
            o.push(("streaming", "on".to_owned()));
        }
        o
    }
}
