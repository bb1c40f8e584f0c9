//! The embedded backend: fjall (an LSM tree) in one directory, one writer at a time with its own
//! reads, readers on consistent snapshots. Chosen over redb by measuring both on the store's
//! write pattern (see `docs/benchmarks.md`).
//!
//! Its rooms: `keys` (the byte keys of each keyspace), `record` (the binary record codec),
//! `chunk` (op records and the chunks that hold them), `row` (row copies), `snapshot` (reads),
//! `writer` (one write transaction; `writer::emit`, its ops and lookup entries), `compact`,
//! `prune` (history no reader needs), and `migrate` (stores of earlier versions).

mod chunk;
mod compact;
mod filter;
mod keys;
mod migrate;
mod prune;
mod record;
mod row;
mod snapshot;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use fjall::{KeyspaceCreateOptions, PersistMode, SingleWriterTxDatabase, SingleWriterTxKeyspace};
use walsync_types::{LookupKey, RowId};

use keys::RowKeys;
use record::engine;
use snapshot::read_checkpoint;

pub use snapshot::EmbeddedSnapshot;
pub use writer::EmbeddedWriter;

use crate::model::{
    BucketState, Changes, CompactBatch, Op, PruneStats, StoreCheckpoint, StoredRow,
};
use crate::{BucketStore, Result, StoreRead};

/// The keyspaces of the store.
#[derive(Clone)]
struct Spaces {
    op_log: SingleWriterTxKeyspace,
    op_index: SingleWriterTxKeyspace,
    rows: SingleWriterTxKeyspace,
    buckets: SingleWriterTxKeyspace,
    lookups: SingleWriterTxKeyspace,
    changes: SingleWriterTxKeyspace,
    meta: SingleWriterTxKeyspace,
    row_keys: RowKeys,
}

/// The embedded store in one directory.
pub struct EmbeddedStore {
    db: SingleWriterTxDatabase,
    s: Spaces,
    known: Mutex<KnownKeys>,
}

/// What the writers know of the keys `rows` holds, beyond the engine: a bound per table and a
/// filter of every key. Each spares a lookup of a row the store has never seen.
#[derive(Debug, Default)]
pub(super) struct KnownKeys {
    bounds: RowKeyBounds,
    /// Made by the first writer (and again when full); see [`filter`].
    filter: Option<std::sync::Arc<filter::RowFilter>>,
}

/// For each table read or written since the store was opened, a key of `rows` at or above
/// every key the table has there (`None`: the table had no rows). A row whose key is above it
/// has no record, so inserting a growing key (a serial primary key, with ordered row keys)
/// needs no lookup. A bound is only ever raised, so it stays an upper bound when rows are
/// deleted or a commit is abandoned.
type RowKeyBounds = HashMap<String, Option<Vec<u8>>>;

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<EmbeddedStore> {
        std::fs::create_dir_all(dir)?;
        // Four background workers whatever the core count. fjall's first worker hands every
        // compaction request back to the queue so that it stays free for flushes; while the
        // other workers are all busy compacting it takes the request again at once, spinning a
        // core. With two workers (the default on two cores) that was half of the store's CPU
        // time during a long write; with three others to take the request it rarely happens.
        let db = SingleWriterTxDatabase::builder(dir.join("walsync.fjall"))
            .worker_threads(4)
            .open()
            .map_err(engine)?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(engine)
        };
        let s = Spaces {
            op_log: ks("op_log")?,
            op_index: ks("op_index")?,
            rows: ks("rows")?,
            buckets: ks("buckets")?,
            lookups: ks("lookups")?,
            changes: ks("changes")?,
            meta: ks("meta")?,
            row_keys: RowKeys::Text,
        };
        let row_keys = migrate::row_keys(&db, &s)?;
        // Stores of earlier versions keep ops in `ops`: moved over, then the keyspace goes.
        if db.keyspace_exists("ops") {
            let old = ks("ops")?;
            migrate::migrate_ops(&db, &s, &old)?;
            db.inner()
                .delete_keyspace(old.inner().clone())
                .map_err(engine)?;
        }
        Ok(EmbeddedStore {
            db,
            s: Spaces { row_keys, ..s },
            known: Mutex::new(KnownKeys::default()),
        })
    }
}

impl BucketStore for EmbeddedStore {
    type Writer<'a> = EmbeddedWriter<'a>;
    type Snapshot = EmbeddedSnapshot;

    fn writer(&self) -> Result<EmbeddedWriter<'_>> {
        let tx = self.db.write_tx();
        let checkpoint = read_checkpoint(&tx, &self.s.meta)?;
        // Taken after the write transaction, which admits one writer at a time. A writer that
        // panicked left only raised bounds behind, which are still bounds.
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.filter.as_ref().is_none_or(|f| f.full()) {
            known.filter = Some(filter::RowFilter::start(&self.db, &self.s.rows));
        }
        Ok(EmbeddedWriter::new(tx, self.s.clone(), known, checkpoint))
    }

    fn snapshot(&self) -> Result<EmbeddedSnapshot> {
        Ok(EmbeddedSnapshot::new(self.db.read_tx(), self.s.clone()))
    }

    fn compact_batch(&self, after: Option<&str>, max_ops: usize) -> Result<CompactBatch> {
        compact::compact_batch(&self.db, &self.s, after, max_ops)
    }

    fn prune_history(&self, before: u64, max_keys: usize) -> Result<PruneStats> {
        prune::prune_history(&self.db, &self.s, before, max_keys)
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.db.disk_space().map_err(engine)
    }

    fn sync(&self) -> Result<()> {
        self.db.persist(PersistMode::SyncAll).map_err(engine)
    }
}

impl StoreRead for EmbeddedStore {
    fn checkpoint(&self) -> Result<StoreCheckpoint> {
        self.snapshot()?.checkpoint()
    }

    fn buckets(&self) -> Result<Vec<String>> {
        self.snapshot()?.buckets()
    }

    fn bucket_states(&self, buckets: &[String]) -> Result<Vec<Option<BucketState>>> {
        self.snapshot()?.bucket_states(buckets)
    }

    fn ops(&self, bucket: &str, after: u64, up_to: u64, limit: usize) -> Result<Vec<Op>> {
        self.snapshot()?.ops(bucket, after, up_to, limit)
    }

    fn lookup(&self, key: &LookupKey, at: u64) -> Result<Vec<Vec<serde_json::Value>>> {
        self.snapshot()?.lookup(key, at)
    }

    fn changes(&self, after: u64, up_to: u64) -> Result<Changes> {
        self.snapshot()?.changes(after, up_to)
    }

    fn row(&self, table: &str, row_id: &RowId) -> Result<Option<StoredRow>> {
        self.snapshot()?.row(table, row_id)
    }
}
