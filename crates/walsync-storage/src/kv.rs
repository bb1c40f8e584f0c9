//! The bucket store over an ordered key-value engine ([`engine`]): **embedded** (fjall, an LSM
//! tree in one directory; chosen over redb by measuring both on the store's write pattern, see
//! `docs/benchmarks.md`) or **PostgreSQL** (a table per keyspace in a storage database that
//! several walsync processes share). One writer at a time with its own reads, readers on
//! consistent snapshots; the store's logic is the same over either.
//!
//! Its rooms: `engine` (the two engines), `keys` (the byte keys of each keyspace), `record` (the binary record codec),
//! `chunk` (op records and the chunks that hold them), `row` (row copies), `snapshot` (reads),
//! `writer` (one write transaction; `writer::emit`, its ops and lookup entries), `stage` (a
//! write transaction larger than memory, in steps), `compact`, `prune` (history no reader
//! needs), and `migrate` (stores of earlier versions).

mod chunk;
mod compact;
mod engine;
mod filter;
mod keys;
mod migrate;
mod prune;
mod record;
mod row;
mod snapshot;
mod stage;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use fjall::{KeyspaceCreateOptions, SingleWriterTxDatabase};
use walsync_types::{LookupKey, RowId};

use engine::{Db, FjallDb, Read};
use keys::RowKeys;
use record::{decode, engine};
use snapshot::read_checkpoint;

pub use engine::postgres::{Connect, connect_without_tls};

pub use snapshot::KvSnapshot;
pub use writer::KvWriter;

use crate::model::{
    BucketState, Changes, CompactBatch, Op, PruneStats, StoreCheckpoint, StoreCounts, StoredRow,
};
use crate::{BucketStore, Result, StorageError, StoreRead, StoreWriter};

/// The largest memtable of a keyspace, in bytes. Measured (`walsync-bench memory`,
/// `replicator`): 8 MiB cost replication 10–20 % in flushes and compactions, 32 MiB took a
/// million-row transaction's peak past 512 MiB.
const MEMTABLE_BYTES: u64 = 16 << 20;

/// The keyspaces of the store, each named by a tag in `stage`'s records (see [`stage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub(super) enum Space {
    OpLog = 1,
    OpIndex = 2,
    Rows = 3,
    Buckets = 4,
    Lookups = 5,
    Changes = 6,
    Meta = 7,
    /// What a staged write transaction keeps to be undone (see [`stage`]).
    Stage = 8,
}

impl Space {
    pub(super) const ALL: [Space; 8] = [
        Space::OpLog,
        Space::OpIndex,
        Space::Rows,
        Space::Buckets,
        Space::Lookups,
        Space::Changes,
        Space::Meta,
        Space::Stage,
    ];

    /// A keyspace a writer changes, by its tag in `stage`'s records.
    fn from_tag(tag: u8) -> Option<Space> {
        Some(match tag {
            1 => Space::OpLog,
            2 => Space::OpIndex,
            3 => Space::Rows,
            4 => Space::Buckets,
            5 => Space::Lookups,
            6 => Space::Changes,
            7 => Space::Meta,
            _ => return None,
        })
    }

    pub(super) fn index(self) -> usize {
        self as usize - 1
    }

    /// Its name in the engine.
    pub(super) fn name(self) -> &'static str {
        match self {
            Space::OpLog => "op_log",
            Space::OpIndex => "op_index",
            Space::Rows => "rows",
            Space::Buckets => "buckets",
            Space::Lookups => "lookups",
            Space::Changes => "changes",
            Space::Meta => "meta",
            Space::Stage => "stage",
        }
    }
}

/// What every part of the store shares of its layout.
#[derive(Debug, Clone)]
struct Spaces {
    row_keys: RowKeys,
}

/// The bucket store, embedded in one directory ([`KvStore::open`]) or in a PostgreSQL
/// database ([`KvStore::open_postgres`]).
pub struct KvStore {
    db: Db,
    s: Spaces,
    known: Mutex<KnownKeys>,
    /// Held by a staged writer for its life, and by compaction and pruning for each step.
    alone: Mutex<()>,
    /// `stage` may hold records: a staged transaction to undo, or the garbage of one that
    /// committed. The next writer recovers first.
    stage_dirty: AtomicBool,
    /// The store's directory, whose filesystem's free space the writers watch (`None`: the
    /// store keeps no files of its own).
    dir: Option<std::path::PathBuf>,
    /// The [`Db::lead`] number this process last wrote under.
    led: Mutex<Option<u64>>,
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

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore").finish_non_exhaustive()
    }
}

/// fjall makes a new database in steps (its lock file, the journal `0.jnl`, then its `version`
/// marker, written and synced last) and takes a directory without the marker for a new one, so
/// it fails at once on the journal an interrupted attempt left ("File exists"): a process killed
/// while its store was first made could never open it again. Such a directory never held data
/// (the database is usable only once the marker is written), so it is removed and made anew.
fn discard_unfinished_creation(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let complete = std::fs::metadata(path.join("version")).is_ok_and(|m| m.len() > 0);
    if !complete {
        tracing::warn!(
            path = %path.display(),
            "the store was left half made by an interrupted first start: making it anew"
        );
        std::fs::remove_dir_all(path)?;
    }
    Ok(())
}

impl KvStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<KvStore> {
        std::fs::create_dir_all(dir)?;
        // Four background workers whatever the core count. fjall's first worker hands every
        // compaction request back to the queue so that it stays free for flushes; while the
        // other workers are all busy compacting it takes the request again at once, spinning a
        // core. With two workers (the default on two cores) that was half of the store's CPU
        // time during a long write; with three others to take the request it rarely happens.
        let engine_dir = dir.join("walsync.fjall");
        discard_unfinished_creation(&engine_dir)?;
        let db = SingleWriterTxDatabase::builder(engine_dir)
            .worker_threads(4)
            .open()
            .map_err(engine)?;
        // Memtables of at most MEMTABLE_BYTES each, set when a keyspace is made (stores made
        // before keep the engine's default, 64 MiB for each of eight keyspaces).
        //
        //
        // Index blocks partitioned from level 2 and filter blocks from level 1 (the engine's
        // default: from level 3; it pins level 0's filters and levels 0-1's indexes whole): a
        // point read into a large level then loads one small partition of each through the
        // block cache, its top-level index pinned. Unpartitioned and unpinned, each table's
        // whole index and filter (megabytes once a store holds millions of rows) went through
        // the 32 MiB cache at every lookup, evicting each other: a re-copy of three million
        // rows read at 3,700 rows/s, 52 % of its time copying file pages and 32 % checksumming
        // them. Partitioning the small levels too cost ordinary replication about 10 %.
        let ks = |name: &str| {
            use fjall::config::PartitioningPolicy;
            db.keyspace(name, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(MEMTABLE_BYTES)
                    .index_block_partitioning_policy(PartitioningPolicy::new([false, false, true]))
                    .filter_block_partitioning_policy(PartitioningPolicy::new([false, true]))
            })
            .map_err(engine)
        };
        let spaces = Space::ALL
            .iter()
            .map(|space| ks(space.name()))
            .collect::<Result<Vec<_>>>()?;
        let fjall = FjallDb::new(db.clone(), spaces);
        // Stores of earlier versions keep ops in `ops`: moved over, then the keyspace goes.
        if db.keyspace_exists("ops") {
            let old = ks("ops")?;
            migrate::migrate_ops(&fjall, &old)?;
            db.inner()
                .delete_keyspace(old.inner().clone())
                .map_err(engine)?;
        }
        KvStore::on(Db::Fjall(fjall), Some(dir.to_owned()))
    }

    /// Opens (or creates) the store in the schema `schema` of a PostgreSQL database, reached
    /// through `connect`, with at most `pool_size` connections for reads (and one for the
    /// writer). Its tables are made, or brought up to date, first.
    pub fn open_postgres(connect: Connect, schema: &str, pool_size: usize) -> Result<KvStore> {
        let db = engine::postgres::PgDb::open(connect, schema, pool_size)?;
        KvStore::on(Db::Postgres(db), None)
    }

    /// Takes the store's write lock unless another process holds it (`false` then). Only
    /// the holder writes; it keeps the lock while its connection lives. An embedded store is
    /// its process's alone (its directory is locked when opened): always `true`.
    pub fn try_lead(&self) -> Result<bool> {
        match self.lead() {
            Ok(()) => Ok(true),
            Err(StorageError::NotWriter) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes this process the store's writer ([`StorageError::NotWriter`] while another is).
    /// Each time it becomes so anew, what it knew of the keys is forgotten and a staged
    /// transaction left by the writer before is undone: another process may have written.
    fn lead(&self) -> Result<()> {
        let taken = self.db.lead()?;
        let mut led = self.led.lock().unwrap_or_else(|e| e.into_inner());
        if *led != Some(taken) {
            let _alone = self.alone();
            stage::recover(self)?;
            *self.known.lock().unwrap_or_else(|e| e.into_inner()) = KnownKeys::default();
            *led = Some(taken);
        }
        Ok(())
    }

    /// The PostgreSQL channel every commit notifies, for processes that read a shared store
    /// to `LISTEN` on (`None`: an embedded store, which no other process reads).
    pub fn notify_channel(&self) -> Option<String> {
        match &self.db {
            Db::Fjall(_) => None,
            Db::Postgres(p) => Some(p.channel()),
        }
    }

    fn on(db: Db, dir: Option<std::path::PathBuf>) -> Result<KvStore> {
        let row_keys = migrate::row_keys(&db)?;
        let store = KvStore {
            db,
            s: Spaces { row_keys },
            known: Mutex::new(KnownKeys::default()),
            alone: Mutex::new(()),
            stage_dirty: AtomicBool::new(false),
            led: Mutex::new(None),
            dir,
        };
        // An embedded store is its process's: a staged transaction a crash interrupted is
        // undone before anyone reads. A shared one is recovered by its next writer, when it
        // takes the lock (readers never read what a staged transaction wrote).
        if let Db::Fjall(_) = store.db {
            store.lead()?;
        }
        Ok(store)
    }

    /// Undoes what a staged writer left (if it did), before another writer starts; the caller
    /// holds `alone`, so that compaction never reads a half-undone store.
    fn recover_if_dirty(&self, _alone: &std::sync::MutexGuard<'_, ()>) -> Result<()> {
        if self.stage_dirty.swap(false, Ordering::AcqRel) {
            stage::recover(self)?;
        }
        Ok(())
    }

    fn open_writer(&self) -> Result<KvWriter<'_>> {
        let tx = self.db.write_tx()?;
        let checkpoint = read_checkpoint(&tx)?;
        // Taken after the write transaction, which admits one writer at a time. A writer that
        // panicked left only raised bounds behind, which are still bounds.
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.filter.as_ref().is_none_or(|f| f.full()) {
            known.filter = Some(filter::RowFilter::start(&self.db));
        }
        let home = writer::Home {
            db: &self.db,
            alone: &self.alone,
            dirty: &self.stage_dirty,
        };
        Ok(KvWriter::new(home, tx, self.s.clone(), known, checkpoint))
    }

    fn alone(&self) -> std::sync::MutexGuard<'_, ()> {
        self.alone.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BucketStore for KvStore {
    type Writer<'a> = KvWriter<'a>;
    type Snapshot = KvSnapshot;

    fn writer(&self) -> Result<KvWriter<'_>> {
        self.lead()?;
        if self.stage_dirty.load(Ordering::Acquire) {
            self.recover_if_dirty(&self.alone())?;
        }
        self.open_writer()
    }

    fn free_bytes(&self) -> Option<u64> {
        let fs = rustix::fs::statvfs(self.dir.as_deref()?).ok()?;
        Some(fs.f_bavail.saturating_mul(fs.f_frsize))
    }

    fn staged_writer(&self, budget: usize) -> Result<KvWriter<'_>> {
        self.lead()?;
        let alone = self.alone();
        self.recover_if_dirty(&alone)?;
        let mut w = self.open_writer()?;
        // From here on, whatever happens, the next writer recovers (undoes or tidies) first.
        self.stage_dirty.store(true, Ordering::Release);
        w.stage(writer::Staging {
            _alone: alone,
            steps: 0,
        });
        w.set_budget(Some(budget));
        Ok(w)
    }

    fn snapshot(&self) -> Result<KvSnapshot> {
        Ok(KvSnapshot::new(self.db.read_tx()?, self.s.clone()))
    }

    fn compact_batch(&self, after: Option<&str>, max_ops: usize) -> Result<CompactBatch> {
        self.lead()?;
        let _alone = self.alone();
        compact::compact_batch(&self.db, after, max_ops)
    }

    fn prune_history(&self, before: u64, max_keys: usize) -> Result<PruneStats> {
        self.lead()?;
        let _alone = self.alone();
        prune::prune_history(&self.db, before, max_keys)
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.db.disk_space()
    }

    fn counts(&self) -> Result<StoreCounts> {
        let snap = self.db.read_tx()?;
        let mut counts = StoreCounts {
            rows: self.db.approximate_len(Space::Rows) as u64,
            ..StoreCounts::default()
        };
        for g in snap.iter(Space::Buckets) {
            let (_, v) = g?;
            let state: BucketState = decode("bucket state", &v)?;
            counts.ops += state.count;
            counts.buckets += 1;
        }
        Ok(counts)
    }

    fn sync(&self) -> Result<()> {
        self.db.persist()
    }
}

impl StoreRead for KvStore {
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

    fn lookup_texts(&self, key: &LookupKey, at: u64) -> Result<Vec<String>> {
        self.snapshot()?.lookup_texts(key, at)
    }

    fn changes(&self, after: u64, up_to: u64) -> Result<Changes> {
        self.snapshot()?.changes(after, up_to)
    }

    fn row(&self, table: &str, row_id: &RowId) -> Result<Option<StoredRow>> {
        self.snapshot()?.row(table, row_id)
    }
}
