//! The embedded backend: one redb file, ACID, one writer at a time, readers on consistent
//! snapshots. Chosen over fjall by measurement (see `docs/benchmarks.md`).

mod compact;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use walsync_rules::{LookupEntry, LookupKey, RowOutput};
use walsync_types::{Lsn, add_checksums, put_checksum, remove_checksum};

use crate::model::{BucketState, Changes, Checkpoint, CompactStats, Op, OpKind, StoredRow};
use crate::{BucketStore, Result, StorageError, StoreWriter};

/// (bucket, op id) → op.
const OPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("ops");
/// (table, row id) → the row's copy, its bucket placements and lookups.
const ROWS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("rows");
/// bucket → state.
const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("buckets");
/// (lookup key, op id, table/row id) → parameters, or null when the row stopped matching.
const LOOKUPS: TableDefinition<(&str, u64, &str), &[u8]> = TableDefinition::new("lookups");
/// commit op id → what the commit touched.
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// "checkpoint" → Checkpoint.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpValue {
    k: OpKind,
    t: String,
    i: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    d: Option<String>,
    c: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Placement {
    bucket: String,
    object_type: String,
    object_id: String,
    checksum: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RowRecord {
    row: StoredRow,
    placements: Vec<Placement>,
    lookups: Vec<LookupEntry>,
}

fn engine(e: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StorageError::Corrupt {
        what: "encoding",
        detail: e.to_string(),
    })
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StorageError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

fn op_from(bucket_op: (u64, OpValue)) -> Op {
    let (op_id, v) = bucket_op;
    Op {
        op_id,
        kind: v.k,
        subkey: format!("{}/{}", v.t, v.i),
        object_type: v.t,
        object_id: v.i,
        data: v.d,
        checksum: v.c,
    }
}

/// The embedded store in one directory.
#[derive(Debug)]
pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<EmbeddedStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("walsync.redb");
        let db = Database::create(&path).map_err(engine)?;
        let tx = db.begin_write().map_err(engine)?;
        tx.open_table(OPS).map_err(engine)?;
        tx.open_table(ROWS).map_err(engine)?;
        tx.open_table(BUCKETS).map_err(engine)?;
        tx.open_table(LOOKUPS).map_err(engine)?;
        tx.open_table(CHANGES).map_err(engine)?;
        tx.open_table(META).map_err(engine)?;
        tx.commit().map_err(engine)?;
        Ok(EmbeddedStore { db, path })
    }
}

fn read_checkpoint(t: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Checkpoint> {
    match t.get("checkpoint").map_err(engine)? {
        Some(v) => decode("checkpoint", v.value()),
        None => Ok(Checkpoint::default()),
    }
}

impl BucketStore for EmbeddedStore {
    type Writer<'a> = EmbeddedWriter;

    fn writer(&self) -> Result<EmbeddedWriter> {
        let tx = self.db.begin_write().map_err(engine)?;
        let checkpoint = read_checkpoint(&tx.open_table(META).map_err(engine)?)?;
        Ok(EmbeddedWriter {
            next_op_id: checkpoint.op_id + 1,
            checkpoint,
            tx,
            states: HashMap::new(),
            changes: Changes::default(),
        })
    }

    fn checkpoint(&self) -> Result<Checkpoint> {
        let tx = self.db.begin_read().map_err(engine)?;
        read_checkpoint(&tx.open_table(META).map_err(engine)?)
    }

    fn buckets(&self) -> Result<Vec<String>> {
        let tx = self.db.begin_read().map_err(engine)?;
        let t = tx.open_table(BUCKETS).map_err(engine)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(engine)? {
            out.push(e.map_err(engine)?.0.value().to_owned());
        }
        Ok(out)
    }

    fn bucket_states(&self, buckets: &[String]) -> Result<Vec<Option<BucketState>>> {
        let tx = self.db.begin_read().map_err(engine)?;
        let t = tx.open_table(BUCKETS).map_err(engine)?;
        buckets
            .iter()
            .map(|b| match t.get(b.as_str()).map_err(engine)? {
                Some(v) => decode("bucket state", v.value()).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    fn ops(&self, bucket: &str, after: u64, up_to: u64, limit: usize) -> Result<Vec<Op>> {
        if after >= up_to {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_read().map_err(engine)?;
        let t = tx.open_table(OPS).map_err(engine)?;
        let mut out = Vec::new();
        for entry in t
            .range((bucket, after + 1)..=(bucket, up_to))
            .map_err(engine)?
        {
            let (k, v) = entry.map_err(engine)?;
            out.push(op_from((k.value().1, decode("op", v.value())?)));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn lookup(&self, key: &LookupKey, at: u64) -> Result<Vec<Vec<serde_json::Value>>> {
        let tx = self.db.begin_read().map_err(engine)?;
        let t = tx.open_table(LOOKUPS).map_err(engine)?;
        let k = key.encode();
        let mut by_row: BTreeMap<String, Option<Vec<serde_json::Value>>> = BTreeMap::new();
        for entry in t
            .range((k.as_str(), 0u64, "")..(k.as_str(), at.saturating_add(1), ""))
            .map_err(engine)?
        {
            let (key, v) = entry.map_err(engine)?;
            by_row.insert(key.value().2.to_owned(), decode("lookup", v.value())?);
        }
        let mut sets: Vec<Vec<serde_json::Value>> = by_row.into_values().flatten().collect();
        sets.sort_by_key(|s| serde_json::Value::Array(s.clone()).to_string());
        sets.dedup();
        Ok(sets)
    }

    fn changes(&self, after: u64, up_to: u64) -> Result<Changes> {
        let mut out = Changes::default();
        if after >= up_to {
            return Ok(out);
        }
        let tx = self.db.begin_read().map_err(engine)?;
        let t = tx.open_table(CHANGES).map_err(engine)?;
        for entry in t.range(after + 1..=up_to).map_err(engine)? {
            let (_, v) = entry.map_err(engine)?;
            let c: Changes = decode("changes", v.value())?;
            out.buckets.extend(c.buckets);
            out.lookups.extend(c.lookups);
        }
        Ok(out)
    }

    fn row(&self, table: &str, row_id: &str) -> Result<Option<StoredRow>> {
        let tx = self.db.begin_read().map_err(engine)?;
        let t = tx.open_table(ROWS).map_err(engine)?;
        match t.get((table, row_id)).map_err(engine)? {
            Some(v) => Ok(Some(decode::<RowRecord>("row", v.value())?.row)),
            None => Ok(None),
        }
    }

    fn compact(&self) -> Result<CompactStats> {
        compact::compact(&self.db)
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.path)?.len())
    }
}

/// A write transaction on the embedded store.
pub struct EmbeddedWriter {
    tx: WriteTransaction,
    checkpoint: Checkpoint,
    next_op_id: u64,
    states: HashMap<String, BucketState>,
    changes: Changes,
}

impl std::fmt::Debug for EmbeddedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedWriter")
            .field("next_op_id", &self.next_op_id)
            .finish_non_exhaustive()
    }
}

impl EmbeddedWriter {
    fn record(&mut self, table: &str, row_id: &str) -> Result<Option<RowRecord>> {
        let t = self.tx.open_table(ROWS).map_err(engine)?;
        let v = t.get((table, row_id)).map_err(engine)?;
        v.map(|v| decode("row", v.value())).transpose()
    }

    fn state(&mut self, bucket: &str) -> Result<BucketState> {
        if let Some(s) = self.states.get(bucket) {
            return Ok(*s);
        }
        let t = self.tx.open_table(BUCKETS).map_err(engine)?;
        let s = match t.get(bucket).map_err(engine)? {
            Some(v) => decode("bucket state", v.value())?,
            None => BucketState::default(),
        };
        Ok(s)
    }

    fn emit(
        &mut self,
        bucket: &str,
        kind: OpKind,
        object_type: &str,
        object_id: &str,
        data: Option<String>,
        checksum: u32,
    ) -> Result<()> {
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        let value = encode(&OpValue {
            k: kind,
            t: object_type.to_owned(),
            i: object_id.to_owned(),
            d: data,
            c: checksum,
        })?;
        self.tx
            .open_table(OPS)
            .map_err(engine)?
            .insert((bucket, op_id), value.as_slice())
            .map_err(engine)?;
        let mut s = self.state(bucket)?;
        s.checksum = add_checksums(s.checksum, checksum);
        s.count += 1;
        s.last_op_id = op_id;
        self.states.insert(bucket.to_owned(), s);
        if !self.changes.buckets.contains(bucket) {
            self.changes.buckets.insert(bucket.to_owned());
        }
        Ok(())
    }

    fn set_lookups(
        &mut self,
        row_key: &str,
        old: &[LookupEntry],
        new: &[LookupEntry],
    ) -> Result<()> {
        if old == new {
            return Ok(());
        }
        // A lookup change takes an op id of its own, so that it is visible exactly from this
        // commit's checkpoint on.
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        let mut t = self.tx.open_table(LOOKUPS).map_err(engine)?;
        for e in old.iter().filter(|e| !new.contains(e)) {
            t.insert(
                (e.key.encode().as_str(), op_id, row_key),
                b"null".as_slice(),
            )
            .map_err(engine)?;
            self.changes.lookups.insert(e.key.clone());
        }
        for e in new.iter().filter(|e| !old.contains(e)) {
            let v = encode(&e.parameters)?;
            t.insert((e.key.encode().as_str(), op_id, row_key), v.as_slice())
                .map_err(engine)?;
            self.changes.lookups.insert(e.key.clone());
        }
        Ok(())
    }
}

impl StoreWriter for EmbeddedWriter {
    fn row(&mut self, table: &str, row_id: &str) -> Result<Option<StoredRow>> {
        Ok(self.record(table, row_id)?.map(|r| r.row))
    }

    fn upsert_row(
        &mut self,
        table: &str,
        row_id: &str,
        row: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
    ) -> Result<()> {
        let old = self.record(table, row_id)?;
        let (old_placements, old_lookups) = match old {
            Some(r) => (r.placements, r.lookups),
            None => (Vec::new(), Vec::new()),
        };
        let mut placements = Vec::with_capacity(outputs.len());
        for out in outputs {
            let checksum = put_checksum(&out.object_type, &out.object_id, &out.data);
            let unchanged = old_placements.iter().any(|p| {
                p.bucket == out.bucket
                    && p.object_type == out.object_type
                    && p.object_id == out.object_id
                    && p.checksum == checksum
            });
            if !unchanged {
                self.emit(
                    &out.bucket,
                    OpKind::Put,
                    &out.object_type,
                    &out.object_id,
                    Some(out.data),
                    checksum,
                )?;
            }
            placements.push(Placement {
                bucket: out.bucket,
                object_type: out.object_type,
                object_id: out.object_id,
                checksum,
            });
        }
        for p in &old_placements {
            let kept = placements.iter().any(|n| {
                n.bucket == p.bucket && n.object_type == p.object_type && n.object_id == p.object_id
            });
            if !kept {
                let subkey = format!("{}/{}", p.object_type, p.object_id);
                self.emit(
                    &p.bucket,
                    OpKind::Remove,
                    &p.object_type,
                    &p.object_id,
                    None,
                    remove_checksum(&subkey),
                )?;
            }
        }
        let row_key = format!("{table}/{row_id}");
        self.set_lookups(&row_key, &old_lookups, &lookups)?;
        let record = encode(&RowRecord {
            row,
            placements,
            lookups,
        })?;
        self.tx
            .open_table(ROWS)
            .map_err(engine)?
            .insert((table, row_id), record.as_slice())
            .map_err(engine)?;
        Ok(())
    }

    fn delete_row(&mut self, table: &str, row_id: &str) -> Result<()> {
        let Some(old) = self.record(table, row_id)? else {
            return Ok(());
        };
        for p in &old.placements {
            let subkey = format!("{}/{}", p.object_type, p.object_id);
            self.emit(
                &p.bucket,
                OpKind::Remove,
                &p.object_type,
                &p.object_id,
                None,
                remove_checksum(&subkey),
            )?;
        }
        self.set_lookups(&format!("{table}/{row_id}"), &old.lookups, &[])?;
        self.tx
            .open_table(ROWS)
            .map_err(engine)?
            .remove((table, row_id))
            .map_err(engine)?;
        Ok(())
    }

    fn truncate(&mut self, table: &str) -> Result<()> {
        let ids: Vec<String> = {
            let t = self.tx.open_table(ROWS).map_err(engine)?;
            let mut ids = Vec::new();
            for entry in t.range((table, "")..).map_err(engine)? {
                let (k, _) = entry.map_err(engine)?;
                let (tbl, id) = k.value();
                if tbl != table {
                    break;
                }
                ids.push(id.to_owned());
            }
            ids
        };
        for id in ids {
            self.delete_row(table, &id)?;
        }
        Ok(())
    }

    fn set_position(&mut self, lsn: Lsn) {
        self.checkpoint.lsn = Some(lsn);
    }

    fn set_snapshot_complete(&mut self) {
        self.checkpoint.snapshot_complete = true;
    }

    fn set_slot_owned(&mut self, slot: &str) {
        self.checkpoint.slot_owned = Some(slot.to_owned());
    }

    fn clear_all(&mut self) -> Result<()> {
        self.tx.delete_table(OPS).map_err(engine)?;
        self.tx.delete_table(ROWS).map_err(engine)?;
        self.tx.delete_table(BUCKETS).map_err(engine)?;
        self.tx.delete_table(LOOKUPS).map_err(engine)?;
        self.tx.delete_table(CHANGES).map_err(engine)?;
        // Recreate them empty, so that readers after this commit find empty tables.
        self.tx.open_table(OPS).map_err(engine)?;
        self.tx.open_table(ROWS).map_err(engine)?;
        self.tx.open_table(BUCKETS).map_err(engine)?;
        self.tx.open_table(LOOKUPS).map_err(engine)?;
        self.tx.open_table(CHANGES).map_err(engine)?;
        self.states.clear();
        self.changes = Changes::default();
        // Op ids keep growing across a rebuild, so that no client's `after` can name an op of
        // the new data by accident.
        self.checkpoint.lsn = None;
        self.checkpoint.snapshot_complete = false;
        Ok(())
    }

    fn commit(mut self) -> Result<Checkpoint> {
        {
            let mut t = self.tx.open_table(BUCKETS).map_err(engine)?;
            for (b, s) in &self.states {
                let v = encode(s)?;
                t.insert(b.as_str(), v.as_slice()).map_err(engine)?;
            }
        }
        self.checkpoint.op_id = self.next_op_id - 1;
        if !self.changes.buckets.is_empty() || !self.changes.lookups.is_empty() {
            let v = encode(&self.changes)?;
            self.tx
                .open_table(CHANGES)
                .map_err(engine)?
                .insert(self.checkpoint.op_id, v.as_slice())
                .map_err(engine)?;
        }
        let v = encode(&self.checkpoint)?;
        self.tx
            .open_table(META)
            .map_err(engine)?
            .insert("checkpoint", v.as_slice())
            .map_err(engine)?;
        self.tx.commit().map_err(engine)?;
        Ok(self.checkpoint)
    }
}
