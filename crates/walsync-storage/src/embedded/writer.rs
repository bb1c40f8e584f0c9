//! The writer: one write transaction, its ops, row copies, lookups and bucket states. How it
//! emits ops and lookup entries is `emit`.

mod emit;

use std::collections::HashMap;
use std::sync::MutexGuard;

use fjall::{PersistMode, Readable, SingleWriterTxKeyspace, SingleWriterWriteTx};
use walsync_types::{LookupEntry, Lsn, OpKind, RowId, RowOutput, put_digest};

use super::chunk::put_chunk;
use super::keys::{RowKeys, key2, schema_id, schema_key};
use super::record::{encode, engine};
use super::row::{Placement, RowRecord, names_in};
use super::{KnownKeys, Spaces};
use crate::model::{Changes, StoreCheckpoint, StoredRow};
use crate::{Result, StoreWriter};
use emit::{Pending, key_hash, object_hash};

/// A write transaction on the embedded store.
pub struct EmbeddedWriter<'a> {
    tx: SingleWriterWriteTx<'a>,
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
}

impl std::fmt::Debug for EmbeddedWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedWriter")
            .field("next_op_id", &self.next_op_id)
            .finish_non_exhaustive()
    }
}

impl<'a> EmbeddedWriter<'a> {
    pub(super) fn new(
        tx: SingleWriterWriteTx<'a>,
        s: Spaces,
        known: MutexGuard<'a, KnownKeys>,
        checkpoint: StoreCheckpoint,
    ) -> EmbeddedWriter<'a> {
        EmbeddedWriter {
            next_op_id: checkpoint.op_id + 1,
            checkpoint,
            tx,
            s,
            known,
            states: HashMap::new(),
            changes: Changes::default(),
            schemas: HashMap::new(),
            last_schema: None,
            owners: HashMap::new(),
        }
    }
}

impl EmbeddedWriter<'_> {
    /// The row copy of `table` under `key` (a key of `rows`, from [`RowKeys::key`]).
    pub(super) fn record(&mut self, table: &str, key: &[u8]) -> Result<Option<RowRecord>> {
        if self.above_bound(table, key)
            || self
                .known
                .filter
                .as_ref()
                .is_some_and(|f| f.surely_absent(key))
        {
            return Ok(None);
        }
        self.tx
            .get(&self.s.rows, key)
            .map_err(engine)?
            .map(|v| RowRecord::from_bytes(&v))
            .transpose()
    }

    /// Whether `key` is above every key `table` has in `rows` (so it has no record).
    fn above_bound(&mut self, table: &str, key: &[u8]) -> bool {
        let bound = match self.known.bounds.get(table) {
            Some(b) => b,
            None => {
                let last = self
                    .tx
                    .prefix(&self.s.rows, key2(table, b""))
                    .next_back()
                    .map(|g| g.key().map(|k| k.to_vec()))
                    .transpose();
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

    fn remove_all(&mut self, space: &SingleWriterTxKeyspace) -> Result<()> {
        let keys: Vec<_> = self
            .tx
            .iter(space)
            .map(|g| g.key().map_err(engine))
            .collect::<Result<_>>()?;
        for k in keys {
            self.tx.remove(space, k);
        }
        Ok(())
    }
}

impl StoreWriter for EmbeddedWriter<'_> {
    fn row(&mut self, table: &str, row_id: &RowId) -> Result<Option<StoredRow>> {
        let key = self.s.row_keys.key(table, row_id);
        let Some(rec) = self.record(table, &key)? else {
            return Ok(None);
        };
        let columns = match self.schemas.get(&rec.s) {
            Some(c) => c.clone(),
            None => names_in(&self.tx, &self.s.meta, rec.s)?.into(),
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
        let key = self.s.row_keys.key(table, row_id);
        let old = self.record(table, &key)?;
        let new_key = old.is_none();
        let (old_placements, old_lookups, copies) = match old {
            Some(r) => (r.placements, r.lookups, r.copies),
            None => (Vec::new(), Vec::new(), 1),
        };
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
            if self
                .tx
                .get(&self.s.meta, schema_key(s))
                .map_err(engine)?
                .is_none()
            {
                self.tx
                    .insert(&self.s.meta, schema_key(s), encode(&&*row.columns)?);
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
        if new_key {
            self.note_key(table, &key);
        }
        self.tx.insert(&self.s.rows, key, record);
        Ok(())
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
                self.tx.insert(&self.s.rows, key, rec.to_bytes()?);
                Ok(())
            }
            None => self.upsert_row(table, row_id, row, outputs, lookups),
        }
    }

    fn delete_row(&mut self, table: &str, row_id: &RowId) -> Result<()> {
        let key = self.s.row_keys.key(table, row_id);
        self.delete_at(table, key, &RowKeys::label(row_id), false)
    }

    fn truncate(&mut self, table: &str) -> Result<()> {
        let prefix = key2(table, b"");
        let rows: Vec<(Vec<u8>, String)> = self
            .tx
            .prefix(&self.s.rows, &prefix)
            .map(|g| {
                g.key()
                    .map(|k| (k.to_vec(), self.s.row_keys.label_of(&k[prefix.len()..])))
                    .map_err(engine)
            })
            .collect::<Result<_>>()?;
        for (key, label) in rows {
            self.delete_at(table, key, &label, true)?;
        }
        Ok(())
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
        self.checkpoint.snapshot_complete = false;
    }

    fn clear_all(&mut self) -> Result<()> {
        for space in [
            self.s.op_log.clone(),
            self.s.op_index.clone(),
            self.s.rows.clone(),
            self.s.buckets.clone(),
            self.s.lookups.clone(),
            self.s.changes.clone(),
        ] {
            self.remove_all(&space)?;
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

    fn commit(self) -> Result<StoreCheckpoint> {
        self.finish(PersistMode::SyncAll)
    }

    fn commit_deferred(self) -> Result<StoreCheckpoint> {
        // Written through to the operating system, so that only a machine crash (not a process
        // crash) can lose it before the sync.
        self.finish(PersistMode::Buffer)
    }
}

impl EmbeddedWriter<'_> {
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
            self.tx.insert(&self.s.rows, key, old.to_bytes()?);
            return Ok(());
        }
        for p in &old.placements {
            self.remove_from(p, &key)?;
        }
        self.set_lookups(table, label, &old.lookups, &[])?;
        self.tx.remove(&self.s.rows, key);
        Ok(())
    }

    fn finish(mut self, mode: PersistMode) -> Result<StoreCheckpoint> {
        for (b, p) in std::mem::take(&mut self.states) {
            self.changes.buckets.insert(b.clone());
            if !p.chunk.0.is_empty() {
                put_chunk(&mut self.tx, &self.s, &b, p.state.last_op_id, p.chunk.0);
            }
            self.tx
                .insert(&self.s.buckets, b.into_bytes(), encode(&p.state)?);
        }
        self.checkpoint.op_id = self.next_op_id - 1;
        if !self.changes.buckets.is_empty() || !self.changes.lookups.is_empty() {
            self.tx.insert(
                &self.s.changes,
                self.checkpoint.op_id.to_be_bytes().to_vec(),
                encode(&self.changes)?,
            );
        }
        self.tx.insert(
            &self.s.meta,
            b"checkpoint".to_vec(),
            encode(&self.checkpoint)?,
        );
        self.tx.durability(Some(mode)).commit().map_err(engine)?;
        Ok(self.checkpoint)
    }
}
