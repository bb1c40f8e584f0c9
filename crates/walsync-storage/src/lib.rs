//! The durable bucket store.
//!
//! It keeps, per the design brief (section 5):
//! - the **op log** by `(bucket, op_id)`: PUT, REMOVE, MOVE and CLEAR ops with their checksums;
//! - the **copy of each source row** by `(table, row id)`: its values (to fill unchanged TOAST
//!   columns and to answer key-only deletes), the buckets it is in with the checksum of its data
//!   there (to emit REMOVEs when it leaves one, and to skip a PUT that changes nothing), and its
//!   parameter lookups;
//! - the **parameter index** by `(lookup, op_id, row id)`, with history, so membership can be read
//!   as of any checkpoint;
//! - **per-bucket state** (checksum, op count, last op id), so a checkpoint never rescans a bucket;
//! - a **change log** by commit op id: the buckets and lookups each commit touched, so that the
//!   cost of a new checkpoint follows what changed, not how many buckets a user has;
//! - the **checkpoint**: last op id, the source position it covers, and whether the initial
//!   snapshot is complete.
//!
//! Storage generates the ops: the caller says what a row now is (or that it is gone) and which
//! buckets its rules put it in; the store compares with its copy.

mod kv;
mod model;

pub mod conformance;

pub use kv::{Connect, KvSnapshot, KvStore, KvWriter, connect_without_tls};
pub use model::{
    BucketState, Changes, CompactBatch, CompactStats, Op, PruneStats, StoreCheckpoint, StoreCounts,
    StoredRow, TableName,
};

use walsync_types::{LookupEntry, LookupKey, Lsn, RowId, RowOutput};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("corrupt record in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A writer given a budget ([`StoreWriter::set_budget`]) holds more than it: the caller
    /// drops it and writes the same again through [`BucketStore::staged_writer`].
    #[error("the write transaction holds more than its budget of {budget} bytes")]
    OverBudget { budget: usize },
    /// The store's filesystem has less free space than the writers' reserve: nothing more is
    /// written until there is (what was acknowledged stays, the rest waits in the slot).
    #[error(
        "no space left for the store: {free} bytes free, below the reserve of {reserve} bytes; \
         replication waits until space is freed"
    )]
    NoSpace { free: u64, reserve: u64 },
    /// A write failed in the engine (a full disk, an I/O error), which then refuses every later
    /// write: walsync must be restarted, and loses nothing acknowledged when it is.
    #[error(
        "the store stopped writing after a failed write (is its disk full?); restart walsync once \
         the cause is fixed: nothing acknowledged is lost"
    )]
    Halted,
    /// The storage database cannot be reached now (down, restarting, the connection lost):
    /// nothing was written, and the same call may succeed later.
    #[error("the storage database is unavailable: {0}")]
    Unavailable(String),
    /// Another process holds the store's write lock (a store shared by several walsync
    /// processes has one writer: the active replicator). Nothing was written.
    #[error("another walsync process writes to this store (it holds the store's write lock)")]
    NotWriter,
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// [`StorageError::NoSpace`] when `store`'s filesystem has less than `reserve` bytes free: the
/// writers (the replicator, compaction) look before they write, so that the engine never meets
/// a full disk, after which it would refuse every write ([`StorageError::Halted`]).
pub fn check_space<S: BucketStore + ?Sized>(store: &S, reserve: u64) -> Result<()> {
    match store.free_bytes() {
        Some(free) if free < reserve => Err(StorageError::NoSpace { free, reserve }),
        _ => Ok(()),
    }
}

/// Reads of a bucket store. On a [`BucketStore`] each call sees the last committed checkpoint
/// by itself; on a [`StoreRead`] snapshot every call sees the same one, so a checkpoint, its
/// bucket states and their ops agree.
pub trait StoreRead {
    /// The last committed checkpoint.
    fn checkpoint(&self) -> Result<StoreCheckpoint>;

    /// Every bucket that has ops.
    fn buckets(&self) -> Result<Vec<String>>;

    /// State of each bucket (`None` for a bucket with no ops).
    fn bucket_states(&self, buckets: &[String]) -> Result<Vec<Option<BucketState>>>;

    /// Ops of `bucket` with `after < op_id <= up_to`, in order, at most `limit`.
    fn ops(&self, bucket: &str, after: u64, up_to: u64, limit: usize) -> Result<Vec<Op>>;

    /// The parameter sets the lookup names as of checkpoint `at`, each as the JSON text of its
    /// array (the text a bucket id carries after its definition's name), sorted and without
    /// repeats. A user's checkpoint builds tens of thousands of bucket ids from these; the text
    /// spares decoding each set only to encode it again.
    fn lookup_texts(&self, key: &LookupKey, at: u64) -> Result<Vec<String>>;

    /// [`StoreRead::lookup_texts`], decoded.
    fn lookup(&self, key: &LookupKey, at: u64) -> Result<Vec<Vec<serde_json::Value>>> {
        self.lookup_texts(key, at)?
            .iter()
            .map(|t| {
                serde_json::from_str(t).map_err(|e| StorageError::Corrupt {
                    what: "lookup",
                    detail: e.to_string(),
                })
            })
            .collect()
    }

    /// Buckets and lookups changed by commits with `after < op_id <= up_to`.
    fn changes(&self, after: u64, up_to: u64) -> Result<Changes>;

    /// The stored copy of a row, as of the last commit (or the last step of a staged writer:
    /// row copies are the writer's, no reader of buckets needs them).
    fn row(&self, table: &TableName, row_id: &RowId) -> Result<Option<StoredRow>>;
}

/// A bucket store. Reads see the last committed checkpoint; writes go through a
/// [`StoreWriter`], one at a time, and become visible whole at its commit.
pub trait BucketStore: StoreRead + Send + Sync {
    type Writer<'a>: StoreWriter
    where
        Self: 'a;

    /// A consistent read view of the last committed checkpoint.
    type Snapshot: StoreRead + Send + Sync;

    /// Starts a write transaction.
    fn writer(&self) -> Result<Self::Writer<'_>>;

    /// Starts a write transaction that may grow beyond memory: whenever it holds about
    /// `budget` bytes it is written to the store as a step, which readers do not see; it
    /// becomes visible whole at its commit, and a crash or a drop before that undoes every
    /// step. Nothing else writes meanwhile (compaction and pruning wait).
    fn staged_writer(&self, budget: usize) -> Result<Self::Writer<'_>>;

    /// Bytes free (to an unprivileged writer) on the store's filesystem, or `None` when the
    /// store keeps no files of its own.
    fn free_bytes(&self) -> Option<u64> {
        None
    }

    /// Opens a read snapshot: every read through it sees the same checkpoint.
    fn snapshot(&self) -> Result<Self::Snapshot>;

    /// Rewrites superseded ops as MOVE and each bucket's leading run of REMOVE/MOVE as one CLEAR,
    /// without changing any bucket's checksum.
    fn compact(&self) -> Result<CompactStats> {
        let mut total = CompactStats::default();
        let mut after: Option<String> = None;
        loop {
            let step = self.compact_batch(after.as_deref(), usize::MAX)?;
            total.moved += step.stats.moved;
            total.cleared += step.stats.cleared;
            total.reclaimed_bytes += step.stats.reclaimed_bytes;
            match step.next {
                Some(next) => after = Some(next),
                None => return Ok(total),
            }
        }
    }

    /// [`BucketStore::compact`] of the buckets after `after` (in bucket order), in one write
    /// transaction of whole buckets that stops once it has read `max_ops` ops (at least one
    /// bucket): so that compaction never holds the writer for long.
    fn compact_batch(&self, after: Option<&str>, max_ops: usize) -> Result<CompactBatch>;

    /// Removes the history no reader at a checkpoint of `before` or later needs: change-log
    /// entries of commits up to `before`, and lookup entries that a later entry (at or before
    /// `before`) superseded, and tombstones with nothing before them. Sets the checkpoint's
    /// `changes_from`. At most `max_keys` keys per call; call until `done`.
    fn prune_history(&self, before: u64, max_keys: usize) -> Result<PruneStats>;

    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> Result<u64>;

    /// How many ops, buckets and rows the store holds: reads one small entry per bucket.
    fn counts(&self) -> Result<StoreCounts>;

    /// Makes every commit so far durable (see [`StoreWriter::commit_deferred`]).
    fn sync(&self) -> Result<()>;
}

/// One write transaction.
pub trait StoreWriter {
    /// The row as this transaction sees it (its own writes included).
    fn row(&mut self, table: &TableName, row_id: &RowId) -> Result<Option<StoredRow>>;

    /// The row now holds `values`, is in the buckets of `outputs` and yields `lookups`.
    fn upsert_row(
        &mut self,
        table: &TableName,
        row_id: &RowId,
        values: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
    ) -> Result<()>;

    /// A new row that may be identical to one already stored (a table without a key holding
    /// duplicates, `REPLICA IDENTITY FULL`): then it is one more copy of that row (a delete
    /// removes one copy; the row leaves its buckets with the last); else as `upsert_row`.
    fn insert_row(
        &mut self,
        table: &TableName,
        row_id: &RowId,
        values: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
    ) -> Result<()>;

    /// A row as a new snapshot of its table copies it while the store still serves the last
    /// checkpoint (a **re-copy**, after a lost slot or a change of the sync rules): as
    /// `upsert_row`, so a row whose buckets, data and lookups are unchanged emits nothing,
    /// and the row is marked as copied. The first copy under an id replaces what is stored;
    /// each further one (identical rows of a table without a key) is one more copy.
    fn copy_row(
        &mut self,
        table: &TableName,
        row_id: &RowId,
        values: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
    ) -> Result<()>;

    /// The end of a re-copy: deletes every stored row that no `copy_row` of this transaction
    /// named (rows deleted while the slot was gone, tables the rules no longer read), with
    /// their REMOVEs. Clients then hold exactly what the copy holds, and downloaded only what
    /// differs.
    fn drop_uncopied(&mut self) -> Result<()>;

    /// The row is gone: REMOVE from each of its buckets, drop its lookups.
    fn delete_row(&mut self, table: &TableName, row_id: &RowId) -> Result<()>;

    /// Every row of the table is gone.
    fn truncate(&mut self, table: &TableName) -> Result<()>;

    /// Everything written so far covers the source up to `lsn`.
    fn set_position(&mut self, lsn: Lsn);

    /// The initial snapshot is complete: the checkpoint may be served from now on.
    fn set_snapshot_complete(&mut self);

    /// The buckets follow the sync rules with this fingerprint.
    fn set_rules(&mut self, fingerprint: &str);

    /// The consumer created the slot `slot` (so it may drop it to start afresh). A new slot
    /// starts at a new position: what the store holds is no longer complete as of any position
    /// of it, so its position is forgotten until a new snapshot completes (an interruption
    /// before that starts over). A checkpoint that was servable stays servable meanwhile:
    /// it is what clients hold, and the new snapshot is a re-copy ([`StoreWriter::copy_row`]).
    fn set_slot_owned(&mut self, slot: &str);

    /// Discards everything: used before a new initial snapshot.
    fn clear_all(&mut self) -> Result<()>;

    /// Bounds what this transaction holds in memory: beyond `budget` bytes a staged writer
    /// takes a step, a writer given its budget before its first write becomes staged, and any
    /// other write fails with [`StorageError::OverBudget`]. `None`: no bound.
    fn set_budget(&mut self, budget: Option<usize>);

    /// About how many bytes this transaction holds in memory.
    fn held_bytes(&self) -> usize;

    /// Whether this writer is staged: made by [`BucketStore::staged_writer`], or an ordinary
    /// one that outgrew its budget and became staged where it stood (a writer given a budget
    /// before its first write notes its keys for that).
    fn is_staged(&self) -> bool;

    /// Makes the transaction durable and returns the new checkpoint.
    fn commit(self) -> Result<StoreCheckpoint>;

    /// Makes the transaction visible and returns the new checkpoint; it is durable once
    /// [`BucketStore::sync`] returns. A crash before that may lose it, whole, with every later
    /// commit. This lets a caller go on writing while the disk catches up, and acknowledge
    /// what it wrote only after the sync.
    fn commit_deferred(self) -> Result<StoreCheckpoint>;
}
