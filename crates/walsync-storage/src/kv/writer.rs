//! The writer: one write transaction, its ops, row copies, lookups and bucket states. How it
//! emits ops and lookup entries is `emit`.

mod emit;

use std::collections::HashMap;
use std::sync::MutexGuard;

use walsync_types::{LookupEntry, Lsn, OpKind, RowId, RowOutput, put_digest};

use super::engine::{Bytes, Db, Durability, Read, Tx, prefix_bounds};
use super::keys::{RowKeys, key2, op_key, schema_id, schema_key};
use super::record::{decode, encode};
use super::row::{Placement, RowRecord, names_in};
use super::stage::{STAGING, copied_key, owner_key, state_key, undo_key, undo_value};
use super::{KnownKeys, Space, Spaces};
use crate::model::{Changes, StoreCheckpoint, StoredRow};
use crate::{Result, StorageError, StoreWriter};
use emit::{Pending, key_hash, object_hash};

/// Rows of a table deleted per read of its keys by a TRUNCATE.
const TRUNCATE_BATCH: usize = 1_000;

/// What each key written costs in memory beyond its bytes (the engine's skip-list entry and
/// its shared slices, our maps): measured against the process's memory, about 160.
const ENTRY_OVERHEAD: usize = 160;
/// Bytes of undo records per commit when a writer becomes staged where it stands.
const UNDO_BATCH_BYTES: usize = 1 << 20;

/// The engine's write transaction, out of its place only while a staged writer commits a
/// step and opens the next.
struct Open<'a>(Option<Tx<'a>>);

impl<'a> std::ops::Deref for Open<'a> {
    type Target = Tx<'a>;
    fn deref(&self) -> &Self::Target {
        match &self.0 {
            Some(t) => t,
            None => unreachable!("a writer's transaction is out only within a step"),
        }
    }
}

impl<'a> Open<'a> {
    /// The transaction, to commit.
    fn take(&mut self) -> Tx<'a> {
        match self.0.take() {
            Some(t) => t,
            None => unreachable!("the transaction is in its place between steps"),
        }
    }
}

impl std::ops::DerefMut for Open<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match &mut self.0 {
            Some(t) => t,
            None => unreachable!("a writer's transaction is out only within a step"),
        }
    }
}

/// Where a writer belongs: what it needs to become staged (see [`super::stage`]).
#[derive(Clone, Copy)]
pub(super) struct Home<'a> {
    pub(super) db: &'a Db,
    pub(super) alone: &'a std::sync::Mutex<()>,
    /// Set once a writer is staged: the next writer recovers first.
    pub(super) dirty: &'a std::sync::atomic::AtomicBool,
}

/// A staged writer's means (see [`super::stage`]).
pub(super) struct Staging<'a> {
    pub(super) _alone: MutexGuard<'a, ()>,
    /// Steps committed so far.
    pub(super) steps: u64,
}

/// A write transaction on the embedded store.
pub struct KvWriter<'a> {
    tx: Open<'a>,
    s: Spaces,
    known: MutexGuard<'a, KnownKeys>,
    checkpoint: StoreCheckpoint,
    next_op_id: u64,
    /// The buckets this commit adds ops to: their new state and their open chunk.
    states: HashMap<String, Pending>,
    /// What this commit changes: the lookups as they change, the buckets (the keys of
    /// `states`) at the commit.
    changes: Changes,
    schemas: HashMap<u64, std::sync::Arc<[String]>>,
    /// The last column list seen, by pointer, with its schema id: every row of a table shares
    /// one list, so its names are hashed once per table, not once per row.
    last_schema: Option<(std::sync::Arc<[String]>, u64)>,
    /// The objects this commit PUT, by a hash of (bucket, type, id), with a hash of the key of
    /// the row that put them. Clients know an object by (type, id), a row may change its key and
    /// so its place in `rows` (a key swap under a deferred key, any update of a `REPLICA
    /// IDENTITY FULL` row), and within one transaction two rows can put the same object: the
    /// one leaving it must not remove what the other just put.
    owners: HashMap<u64, u64>,
    /// About how many bytes the engine's transaction and our maps hold.
    held: usize,
    budget: Option<usize>,
    home: Home<'a>,
    staging: Option<Staging<'a>>,
    /// Every key written since the writer was first given a budget (before any write): what
    /// it needs to become staged where it stands, when it outgrows the budget.
    touched: Option<Vec<(Space, Vec<u8>)>>,
}

impl std::fmt::Debug for KvWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWriter")
            .field("next_op_id", &self.next_op_id)
            .finish_non_exhaustive()
    }
}

impl<'a> KvWriter<'a> {
    pub(super) fn new(
        home: Home<'a>,
        tx: Tx<'a>,
        s: Spaces,
        known: MutexGuard<'a, KnownKeys>,
        checkpoint: StoreCheckpoint,
    ) -> KvWriter<'a> {
        KvWriter {
            next_op_id: checkpoint.op_id + 1,
            checkpoint,
            tx: Open(Some(tx)),
            s,
            known,
            states: HashMap::new(),
            changes: Changes::default(),
            schemas: HashMap::new(),
            last_schema: None,
            owners: HashMap::new(),
            held: 0,
            budget: None,
            home,
            staging: None,
            touched: None,
        }
    }

    /// Makes this writer staged (see [`super::stage`]).
    pub(super) fn stage(&mut self, staging: Staging<'a>) {
        self.staging = Some(staging);
    }
}

impl KvWriter<'_> {
    /// Writes `value` under `key` of `space`; a staged writer first records the key's value
    /// before the transaction.
    pub(super) fn put(&mut self, space: Space, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.before_write(space, &key, value.len())?;
        self.tx.insert(space, key, value);
        Ok(())
    }

    /// What every write does first: the undo record (or the key noted, for one to make if the
    /// writer becomes staged), and the bytes held.
    fn before_write(&mut self, space: Space, key: &[u8], value_len: usize) -> Result<()> {
        if let Some(touched) = &mut self.touched {
            touched.push((space, key.to_vec()));
            self.held += key.len() + 48;
        }
        self.undo(space, key)?;
        self.held += key.len() + value_len + ENTRY_OVERHEAD;
        Ok(())
    }

    /// Removes `key` of `space`, as [`KvWriter::put`].
    pub(super) fn del(&mut self, space: Space, key: Vec<u8>) -> Result<()> {
        self.before_write(space, &key, 0)?;
        self.tx.remove(space, key);
        Ok(())
    }

    /// A staged writer's undo record of `key` of `space`: its value before the transaction.
    fn undo(&mut self, space: Space, key: &[u8]) -> Result<()> {
        if self.staging.is_none() {
            return Ok(());
        }
        let k = undo_key(space, key);
        let before = match space {
            // Keys under op ids of this transaction (and schemas, written once, when missing)
            // were not there before it.
            Space::OpLog | Space::OpIndex | Space::Lookups | Space::Changes | Space::Meta => None,
            // Written only by the commit, with the checkpoint; `stage` holds the undo records
            // themselves, which go with the transaction.
            Space::Buckets | Space::Stage => return Ok(()),
            // A row copy as it was before its first change in this transaction.
            Space::Rows => {
                // A key the filter never saw was never in `rows`, nor touched since.
                if self.never_held(key) {
                    None
                } else if self.tx.get(Space::Stage, &k)?.is_some() {
                    return Ok(());
                } else {
                    self.tx.get(Space::Rows, key)?
                }
            }
        };
        let record = undo_value(before.as_deref());
        self.held += k.len() + record.len() + ENTRY_OVERHEAD;
        self.tx.insert(Space::Stage, k, record);
        Ok(())
    }

    /// Stores `chunk`, whose last op is `last_id`, as `bucket`'s.
    pub(super) fn put_chunk(&mut self, bucket: &str, last_id: u64, chunk: Vec<u8>) -> Result<()> {
        self.put(Space::OpLog, last_id.to_be_bytes().to_vec(), chunk)?;
        self.put(Space::OpIndex, op_key(bucket, last_id), Vec::new())
    }

    /// Called where a transaction may be cut (between rows): beyond the budget, a staged
    /// writer takes a step; one that noted every key it wrote becomes staged where it stands;
    /// any other fails.
    fn within_budget(&mut self) -> Result<()> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        if self.held_bytes() < budget {
            return Ok(());
        }
        if self.staging.is_none() && !self.become_staged()? {
            return Err(StorageError::OverBudget { budget });
        }
        self.step()
    }

    /// Makes this writer staged where it stands: the undo records of every key it wrote, from
    /// the store as committed (which is the store before this writer: it holds the only write
    /// lock). `false` when it cannot: it did not note its keys, or compaction holds the store
    /// now (taking its lock while holding the write lock must not wait).
    ///
    /// The records (and the mark) go to the store beside the transaction, in batches of about
    /// a megabyte committed before it: the transaction holds none of them, and a crash between
    /// them and its first step only restores values nothing changed.
    fn become_staged(&mut self) -> Result<bool> {
        let Some(touched) = self.touched.take() else {
            return Ok(false);
        };
        let Ok(alone) = self.home.alone.try_lock() else {
            return Ok(false);
        };
        self.home
            .dirty
            .store(true, std::sync::atomic::Ordering::Release);
        self.staging = Some(Staging {
            _alone: alone,
            steps: 0,
        });
        let db = self.home.db;
        let mut batch = vec![(Space::Meta, STAGING.to_vec(), Some(b"1".to_vec()))];
        let mut bytes = 0usize;
        let before = db.read_tx()?;
        for (space, key) in touched {
            let value = match space {
                Space::Rows | Space::Meta => before.get(space, &key)?,
                _ => None,
            };
            let record = undo_value(value.as_deref());
            bytes += key.len() + record.len();
            batch.push((Space::Stage, undo_key(space, &key), Some(record)));
            if bytes >= UNDO_BATCH_BYTES {
                db.commit_batch(std::mem::take(&mut batch))?;
                bytes = 0;
            }
        }
        db.commit_batch(batch)?;
        Ok(true)
    }

    /// Commits what this staged writer holds as a step nobody reads, and opens the next.
    fn step(&mut self) -> Result<()> {
        for (b, state) in self.close_chunks()? {
            self.tx.insert(Space::Stage, state_key(&b), encode(&state)?);
        }
        self.write_changes()?;
        for (object, owner) in std::mem::take(&mut self.owners) {
            self.tx
                .insert(Space::Stage, owner_key(object), owner.to_be_bytes());
        }
        self.tx.insert(Space::Meta, STAGING, b"1");
        self.tx.take().commit(Durability::Buffer)?;
        if let Some(staging) = &mut self.staging {
            staging.steps += 1;
        }
        self.tx.0 = Some(self.home.db.write_tx()?);
        self.held = 0;
        Ok(())
    }

    /// The owner of an object this transaction PUT: in memory, or for a staged writer also
    /// among those its steps wrote.
    pub(super) fn owner(&self, object: u64) -> Result<Option<u64>> {
        if let Some(o) = self.owners.get(&object) {
            return Ok(Some(*o));
        }
        if self.staging.as_ref().is_none_or(|s| s.steps == 0) {
            return Ok(None);
        }
        Ok(self
            .tx
            .get(Space::Stage, &owner_key(object))?
            .and_then(|v| <[u8; 8]>::try_from(&*v).ok())
            .map(u64::from_be_bytes))
    }

    /// Writes each bucket's open chunk and new state; a staged writer also the states its steps
    /// kept.
    fn write_states(&mut self) -> Result<()> {
        if self.staging.as_ref().is_some_and(|s| s.steps > 0) {
            let kept: Vec<(Bytes, Bytes)> =
                self.tx.prefix(Space::Stage, b"s").collect::<Result<_>>()?;
            for (k, v) in kept {
                let bucket = String::from_utf8_lossy(&k[1..]).into_owned();
                if !self.states.contains_key(&bucket) {
                    self.put(Space::Buckets, bucket.into_bytes(), v.to_vec())?;
                }
            }
        }
        for (b, state) in self.close_chunks()? {
            self.put(Space::Buckets, b.into_bytes(), encode(&state)?)?;
        }
        Ok(())
    }

    /// Writes each bucket's open chunk and notes the bucket as changed: the buckets' new
    /// states, for the caller to keep.
    fn close_chunks(&mut self) -> Result<Vec<(String, crate::model::BucketState)>> {
        let mut states = Vec::with_capacity(self.states.len());
        for (b, p) in std::mem::take(&mut self.states) {
            if !p.chunk.0.is_empty() {
                self.put_chunk(&b, p.state.last_op_id, p.chunk.0)?;
            }
            self.changes.buckets.insert(b.clone());
            states.push((b, p.state));
        }
        Ok(states)
    }

    /// Writes what this transaction changed under its last op id so far, with what an earlier
    /// step wrote there.
    fn write_changes(&mut self) -> Result<()> {
        if self.changes.buckets.is_empty() && self.changes.lookups.is_empty() {
            return Ok(());
        }
        let mut changes = std::mem::take(&mut self.changes);
        let key = (self.next_op_id - 1).to_be_bytes().to_vec();
        if self.staging.as_ref().is_some_and(|s| s.steps > 0)
            && let Some(v) = self.tx.get(Space::Changes, &key)?
        {
            let earlier: Changes = decode("changes", &v)?;
            changes.buckets.extend(earlier.buckets);
            changes.lookups.extend(earlier.lookups);
        }
        self.put(Space::Changes, key, encode(&changes)?)
    }

    /// Whether `rows` never held `key`, by the filter of its keys (no engine read).
    fn never_held(&self, key: &[u8]) -> bool {
        self.known
            .filter
            .as_ref()
            .is_some_and(|f| f.surely_absent(key))
    }

    /// The row copy of `table` under `key` (a key of `rows`, from [`RowKeys::key`]).
    pub(super) fn record(&mut self, table: &str, key: &[u8]) -> Result<Option<RowRecord>> {
        self.record_bytes(table, key)?
            .map(|v| RowRecord::from_bytes(&v))
            .transpose()
    }

    /// [`KvWriter::record`], as stored.
    fn record_bytes(&mut self, table: &str, key: &[u8]) -> Result<Option<Bytes>> {
        if self.above_bound(table, key) || self.never_held(key) {
            return Ok(None);
        }
        self.tx.get(Space::Rows, key)
    }

    /// Whether `key` is above every key `table` has in `rows` (so it has no record).
    fn above_bound(&mut self, table: &str, key: &[u8]) -> bool {
        let bound = match self.known.bounds.get(table) {
            Some(b) => b,
            None => {
                let (lo, hi) = prefix_bounds(&key2(table, b""));
                let last = self
                    .tx
                    .last_key(Space::Rows, lo, hi)
                    .map(|k| k.map(|k| k.to_vec()));
                // Without a bound the lookup decides.
                let Ok(last) = last else { return false };
                self.known.bounds.entry(table.to_owned()).or_insert(last)
            }
        };
        bound.as_deref().is_none_or(|b| key > b)
    }

    /// Notes `key`, a key of `table` this commit adds to `rows`: in the filter, and as the
    /// table's bound when above it.
    fn note_key(&mut self, table: &str, key: &[u8]) {
        if let Some(f) = &self.known.filter {
            f.add(key);
        }
        match self.known.bounds.get_mut(table) {
            Some(Some(b)) if key <= b.as_slice() => {}
            Some(b) => *b = Some(key.to_vec()),
            // Not read yet: the first lookup reads it, this key included.
            None => {}
        }
    }

    fn remove_all(&mut self, space: Space) -> Result<()> {
        let keys: Vec<_> = self
            .tx
            .iter(space)
            .map(|g| g.map(|(k, _)| k.to_vec()))
            .collect::<Result<_>>()?;
        for k in keys {
            self.del(space, k)?;
        }
        Ok(())
    }
}

impl StoreWriter for KvWriter<'_> {
    fn row(&mut self, table: &str, row_id: &RowId) -> Result<Option<StoredRow>> {
        let key = self.s.row_keys.key(table, row_id);
        let Some(rec) = self.record(table, &key)? else {
            return Ok(None);
        };
        let columns = match self.schemas.get(&rec.s) {
            Some(c) => c.clone(),
            None => names_in(&*self.tx, rec.s)?.into(),
        };
        Ok(Some(StoredRow {
            columns,
            values: rec.v,
        }))
    }

    fn upsert_row(
        &mut self,
        table: &str,
        row_id: &RowId,
        row: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
    ) -> Result<()> {
        self.place(table, row_id, row, outputs, lookups, Some(1))
    }
    fn insert_row(
        &mut self,
        table: &str,
        row_id: &RowId,
        row: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
    ) -> Result<()> {
        let key = self.s.row_keys.key(table, row_id);
        match self.record(table, &key)? {
            // The same row again: its buckets, data and lookups are the ones stored.
            Some(mut rec) => {
                rec.copies += 1;
                self.put(Space::Rows, key, rec.to_bytes()?)?;
                self.within_budget()
            }
            None => self.upsert_row(table, row_id, row, outputs, lookups),
        }
    }

    fn copy_row(
        &mut self,
        table: &str,
        row_id: &RowId,
        row: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
    ) -> Result<()> {
        let key = self.s.row_keys.key(table, row_id);
        let mark = copied_key(&key);
        if self.tx.get(Space::Stage, &mark)?.is_some() {
            return self.insert_row(table, row_id, row, outputs, lookups);
        }
        // The marks are garbage after the commit (or a drop): the next writer deletes them.
        self.home
            .dirty
            .store(true, std::sync::atomic::Ordering::Release);
        self.held += mark.len() + ENTRY_OVERHEAD;
        self.tx.insert(Space::Stage, mark, []);
        self.place(table, row_id, row, outputs, lookups, Some(1))?;
        // The mark alone counts too: a re-copy of identical rows writes nothing else, and its
        // marks held in the transaction grew the process by ~300 bytes a row (1.2 GiB for
        // three million) when only a write checked the budget.
        self.within_budget()
    }

    fn drop_uncopied(&mut self) -> Result<()> {
        use std::ops::Bound;
        // In batches of `rows` (each read after the last key seen), merged with the marks of
        // the same range.
        let mut from = Bound::Unbounded;
        loop {
            let keys: Vec<Vec<u8>> = self
                .tx
                .range::<Vec<u8>, _>(Space::Rows, (from.clone(), Bound::Unbounded))
                .take(TRUNCATE_BATCH)
                .map(|g| g.map(|(k, _)| k.to_vec()))
                .collect::<Result<_>>()?;
            let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
                return Ok(());
            };
            let copied: std::collections::HashSet<Vec<u8>> = self
                .tx
                .range(Space::Stage, copied_key(first)..=copied_key(last))
                .map(|g| g.map(|(k, _)| k[1..].to_vec()))
                .collect::<Result<_>>()?;
            from = Bound::Excluded(last.clone());
            for key in keys {
                if copied.contains(&key) {
                    continue;
                }
                let Some(at) = key.iter().position(|b| *b == 0) else {
                    return Err(StorageError::Corrupt {
                        what: "row key",
                        detail: "no table name".into(),
                    });
                };
                let table = String::from_utf8_lossy(&key[..at]).into_owned();
                let label = self.s.row_keys.label_of(&key[at + 1..]);
                self.delete_at(&table, key, &label, true)?;
                self.within_budget()?;
            }
        }
    }

    fn delete_row(&mut self, table: &str, row_id: &RowId) -> Result<()> {
        let key = self.s.row_keys.key(table, row_id);
        self.delete_at(table, key, &RowKeys::label(row_id), false)?;
        self.within_budget()
    }

    fn truncate(&mut self, table: &str) -> Result<()> {
        use std::ops::Bound;
        let prefix = key2(table, b"");
        // In batches, each read after the last key deleted (not over its tombstones again).
        let mut from = Bound::Included(prefix.clone());
        loop {
            let rows: Vec<(Vec<u8>, String)> = self
                .tx
                .range(Space::Rows, (from.clone(), Bound::Unbounded))
                .take(TRUNCATE_BATCH)
                .map(|g| g.map(|(k, _)| k.to_vec()))
                .take_while(|k| k.as_ref().map_or(true, |k| k.starts_with(&prefix)))
                .map(|k| {
                    k.map(|k| {
                        let label = self.s.row_keys.label_of(&k[prefix.len()..]);
                        (k, label)
                    })
                })
                .collect::<Result<_>>()?;
            let Some((last, _)) = rows.last() else {
                return Ok(());
            };
            from = Bound::Excluded(last.clone());
            for (key, label) in rows {
                self.delete_at(table, key, &label, true)?;
                self.within_budget()?;
            }
        }
    }

    fn set_position(&mut self, lsn: Lsn) {
        self.checkpoint.lsn = Some(lsn);
    }

    fn set_snapshot_complete(&mut self) {
        self.checkpoint.snapshot_complete = true;
    }

    fn set_rules(&mut self, fingerprint: &str) {
        self.checkpoint.rules = Some(fingerprint.to_owned());
    }

    fn set_slot_owned(&mut self, slot: &str) {
        self.checkpoint.slot_owned = Some(slot.to_owned());
        self.checkpoint.lsn = None;
    }

    fn clear_all(&mut self) -> Result<()> {
        // All but the checkpoint (`meta`) and the staging records.
        for space in Space::ALL
            .into_iter()
            .filter(|s| !matches!(s, Space::Meta | Space::Stage))
        {
            self.remove_all(space)?;
        }
        self.states.clear();
        self.changes = Changes::default();
        // Op ids keep growing across a rebuild, so that no client's `after` can name an op of
        // the new data by accident.
        self.checkpoint.lsn = None;
        self.checkpoint.snapshot_complete = false;
        self.checkpoint.rebuilt_at = self.next_op_id;
        Ok(())
    }

    fn set_budget(&mut self, budget: Option<usize>) {
        // Keys are noted from the first write on, or not at all.
        if budget.is_some() && self.held == 0 && self.staging.is_none() && self.touched.is_none() {
            self.touched = Some(Vec::new());
        }
        self.budget = budget;
    }

    fn is_staged(&self) -> bool {
        self.staging.is_some()
    }

    fn held_bytes(&self) -> usize {
        self.held + self.owners.len() * 24
    }

    fn commit(self) -> Result<StoreCheckpoint> {
        self.finish(Durability::Sync)
    }

    fn commit_deferred(self) -> Result<StoreCheckpoint> {
        // Written through to the operating system, so that only a machine crash (not a process
        // crash) can lose it before the sync.
        self.finish(Durability::Buffer)
    }
}

impl KvWriter<'_> {
    /// Writes the row: PUTs where its data or buckets changed, REMOVEs from buckets it left,
    /// its lookups, its copy. `copies`: how many identical rows the copy stands for (`None`:
    /// as stored, or one for a new row).
    fn place(
        &mut self,
        table: &str,
        row_id: &RowId,
        row: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
        copies: Option<u32>,
    ) -> Result<()> {
        let key = self.s.row_keys.key(table, row_id);
        let stored = self.record_bytes(table, &key)?;
        let old = stored.as_deref().map(RowRecord::from_bytes).transpose()?;
        let new_key = old.is_none();
        let (old_placements, old_lookups, stored_copies) = match old {
            Some(r) => (r.placements, r.lookups, r.copies),
            None => (Vec::new(), Vec::new(), 1),
        };
        let copies = copies.unwrap_or(stored_copies);
        let mut placements = Vec::with_capacity(outputs.len());
        for out in outputs {
            let digest = put_digest(&out.object_type, &out.object_id, &out.data);
            let checksum = digest.checksum;
            let unchanged = old_placements
                .iter()
                .any(|p| p.holds(&out.bucket, &out.object_type, &out.object_id, digest));
            if !unchanged {
                self.emit(
                    &out.bucket,
                    OpKind::Put,
                    &out.object_type,
                    &out.object_id,
                    Some(&out.data),
                    checksum,
                )?;
                self.owners.insert(
                    object_hash(&out.bucket, &out.object_type, &out.object_id),
                    key_hash(&key),
                );
            }
            placements.push(Placement {
                bucket: out.bucket,
                object_type: out.object_type,
                object_id: out.object_id,
                checksum,
                fingerprint: Some(digest.fingerprint),
            });
        }
        for p in &old_placements {
            let kept = placements.iter().any(|n| {
                n.bucket == p.bucket && n.object_type == p.object_type && n.object_id == p.object_id
            });
            if !kept {
                self.remove_from(p, &key)?;
            }
        }
        self.set_lookups(table, &RowKeys::label(row_id), &old_lookups, &lookups)?;
        let s = match &self.last_schema {
            Some((c, id)) if std::sync::Arc::ptr_eq(c, &row.columns) => *id,
            _ => {
                let id = schema_id(&row.columns);
                self.last_schema = Some((row.columns.clone(), id));
                id
            }
        };
        if !self.schemas.contains_key(&s) {
            if self.tx.get(Space::Meta, &schema_key(s))?.is_none() {
                self.put(Space::Meta, schema_key(s), encode(&&*row.columns)?)?;
            }
            self.schemas.insert(s, row.columns);
        }
        let record = RowRecord {
            s,
            v: row.values,
            placements,
            lookups,
            copies,
        }
        .to_bytes()?;
        // The same row again (most rows of a re-copy): nothing to write.
        if stored.as_deref() == Some(record.as_slice()) {
            return Ok(());
        }
        // Noted after the undo record, which asks the filter whether the key is new.
        self.before_write(Space::Rows, &key, record.len())?;
        if new_key {
            self.note_key(table, &key);
        }
        self.tx.insert(Space::Rows, key, record);
        self.within_budget()
    }
}

impl KvWriter<'_> {
    /// Deletes the row of `table` under `key` (a key of `rows`) named `label` in its lookups:
    /// one copy of it, or with `every_copy` all of them.
    fn delete_at(
        &mut self,
        table: &str,
        key: Vec<u8>,
        label: &str,
        every_copy: bool,
    ) -> Result<()> {
        let Some(mut old) = self.record(table, &key)? else {
            return Ok(());
        };
        // One of several identical rows: the others stay, in every bucket.
        if old.copies > 1 && !every_copy {
            old.copies -= 1;
            return self.put(Space::Rows, key, old.to_bytes()?);
        }
        for p in &old.placements {
            self.remove_from(p, &key)?;
        }
        self.set_lookups(table, label, &old.lookups, &[])?;
        self.del(Space::Rows, key)
    }

    fn finish(mut self, mode: Durability) -> Result<StoreCheckpoint> {
        self.write_states()?;
        self.write_changes()?;
        self.checkpoint.op_id = self.next_op_id - 1;
        self.tx.insert(
            Space::Meta,
            b"checkpoint".to_vec(),
            encode(&self.checkpoint)?,
        );
        // A staged transaction is whole from this commit on: its mark goes with it (its
        // records are garbage the next writer deletes).
        if self.staging.is_some() {
            self.tx.remove(Space::Meta, STAGING);
        }
        self.tx.take().commit(mode)?;
        Ok(self.checkpoint)
    }
}
