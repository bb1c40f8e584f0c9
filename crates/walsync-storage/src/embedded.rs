//! The embedded backend: fjall (an LSM tree) in one directory, one writer at a time with its own
//! reads, readers on consistent snapshots. Chosen over redb by measuring both on the store's
//! write pattern (see `docs/benchmarks.md`).
//!
//! Keys are ordered bytes: `bucket 0x00 op_id(be)`, `table 0x00 row_id`,
//! `lookup 0x00 op_id(be) table/row`, `op_id(be)`. No part before a 0x00 contains one: bucket
//! ids and lookup keys are JSON text, table names are identifiers.

mod compact;
mod record;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use fjall::{
    KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace,
    SingleWriterWriteTx,
};
use serde::{Deserialize, Serialize};
use walsync_rules::{LookupEntry, LookupKey, RowOutput};
use walsync_types::{Lsn, add_checksums, put_checksum, remove_checksum};

use record::{Reader, Writer, corrupt, read_lookups, write_lookups};

use crate::model::{BucketState, Changes, Checkpoint, CompactStats, Op, OpKind, StoredRow};
use crate::{BucketStore, Result, StorageError, StoreRead, StoreWriter};

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
    /// The row's column names, by the hash under which they are stored once in `meta`: names
    /// repeated in every row were a third of the bytes written.
    s: u64,
    v: Vec<walsync_types::Value>,
    placements: Vec<Placement>,
    lookups: Vec<LookupEntry>,
}

/// FNV-1a over the column names: a stable id for a table's column list.
fn schema_id(columns: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for c in columns {
        for b in c.as_bytes().iter().chain([0u8].iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn schema_key(id: u64) -> Vec<u8> {
    format!("schema:{id:016x}").into_bytes()
}

fn names_in(r: &impl Readable, meta: &SingleWriterTxKeyspace, id: u64) -> Result<Vec<String>> {
    match r.get(meta, schema_key(id)).map_err(engine)? {
        Some(v) => decode("schema", &v),
        None => Err(StorageError::Corrupt {
            what: "row",
            detail: format!("unknown schema {id:016x}"),
        }),
    }
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

fn key2(a: &str, b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b);
    k
}

fn op_key(bucket: &str, op_id: u64) -> Vec<u8> {
    key2(bucket, &op_id.to_be_bytes())
}

/// How row ids are written in the keys of `rows`. A row id is the JSON array of the text of its
/// key columns; ordered as text, the keys of a growing integer key (`["999"]`, `["1000"]`)
/// scatter over the whole keyspace, so every compaction of `rows` rewrote all of it. Stores
/// made since keep a single integer key as a tag byte and its 8 bytes in numeric order (a text
/// row id starts with `[`, so the two never meet); stores made before keep text keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKeys {
    Text,
    Ordered,
}

const ROW_KEYS: &[u8] = b"row_keys";
const ORDERED_ROW_KEYS: &[u8] = b"ordered-int-1";
const INT_ROW_ID: u8 = 0x01;

/// The integer of a row id that is exactly `["<i64 as Rust writes it>"]`.
fn int_row_id(row_id: &str) -> Option<i64> {
    let digits = row_id.strip_prefix("[\"")?.strip_suffix("\"]")?;
    let unsigned = digits.strip_prefix('-').unwrap_or(digits);
    let canonical = !unsigned.is_empty()
        && unsigned.bytes().all(|b| b.is_ascii_digit())
        && (unsigned == "0" || !unsigned.starts_with('0'))
        && digits != "-0";
    if canonical { digits.parse().ok() } else { None }
}

impl RowKeys {
    fn key(self, table: &str, row_id: &str) -> Vec<u8> {
        match (self, int_row_id(row_id)) {
            (RowKeys::Ordered, Some(i)) => {
                let mut b = [INT_ROW_ID; 9];
                b[1..].copy_from_slice(&((i as u64) ^ (1 << 63)).to_be_bytes());
                key2(table, &b)
            }
            _ => key2(table, row_id.as_bytes()),
        }
    }

    /// The row id in a key of `rows`, from the part after the table.
    fn row_id(self, part: &[u8]) -> String {
        match part {
            [INT_ROW_ID, n @ ..] if self == RowKeys::Ordered && n.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(n);
                format!("[\"{}\"]", (u64::from_be_bytes(b) ^ (1 << 63)) as i64)
            }
            _ => String::from_utf8_lossy(part).into_owned(),
        }
    }
}

fn lookup_key(lookup: &str, op_id: u64, row: &str) -> Vec<u8> {
    let mut k = key2(lookup, &op_id.to_be_bytes());
    k.extend_from_slice(row.as_bytes());
    k
}

fn op_id_of(key: &[u8]) -> u64 {
    let n = key.len();
    let mut b = [0u8; 8];
    if n >= 8 {
        b.copy_from_slice(&key[n - 8..]);
    }
    u64::from_be_bytes(b)
}

/// Ops are the store's hottest records (every download reads each one), so they are kept in a
/// small binary form rather than JSON: a tag byte (never `{`, so records written as JSON by
/// earlier versions still read), the kind, the checksum, then length-prefixed type, id and data.
const OP_TAG: u8 = 0xB1;

/// Op kinds by their byte in an op record.
const OP_KINDS: [OpKind; 4] = [OpKind::Put, OpKind::Remove, OpKind::Move, OpKind::Clear];

impl OpValue {
    /// The op's record alone (see [`OP_TAG`]), as earlier versions kept it under its own key.
    #[cfg(test)]
    fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        write_op(&mut w, self.k, &self.t, &self.i, self.d.as_deref(), self.c);
        w.0
    }

    fn from_bytes(b: &[u8]) -> Result<OpValue> {
        if b.first() == Some(&b'{') {
            return decode("op", b);
        }
        let mut r = Reader::new("op", b);
        if r.u8()? != OP_TAG {
            return Err(corrupt("op", "unknown op record format"));
        }
        let k = *OP_KINDS
            .get(usize::from(r.u8()?))
            .ok_or_else(|| corrupt("op", "unknown op kind"))?;
        let c = r.u32()?;
        let mut part = || -> Result<Option<String>> {
            match r.u8()? {
                0 => Ok(None),
                _ => r.str().map(Some),
            }
        };
        let t = part()?.unwrap_or_default();
        let i = part()?.unwrap_or_default();
        let d = part()?;
        r.end()?;
        Ok(OpValue { k, t, i, d, c })
    }
}

/// Writes an op record from borrowed parts (see [`OP_TAG`]).
fn write_op(w: &mut Writer, k: OpKind, t: &str, i: &str, d: Option<&str>, c: u32) {
    w.u8(OP_TAG);
    w.u8(OP_KINDS.iter().position(|x| *x == k).unwrap_or(0) as u8);
    w.u32(c);
    for part in [Some(t), Some(i), d] {
        match part {
            Some(p) => {
                w.u8(1);
                w.str(p);
            }
            None => w.u8(0),
        }
    }
}

/// The ops one commit adds to one bucket are kept together, as one chunk: a tag, the number of
/// ops, then for each op its id and its op record. Every key costs the engine about as much as a
/// whole op record (memtable insert, flush, compaction), so one key per op was half of the
/// store's work. A chunk is kept in `op_log` under the id of its last op, and listed in
/// `op_index` under `(bucket, that id)` with no value: op ids only grow, so `op_log` is written
/// in key order and its compactions move files instead of merging them (keyed by bucket, a
/// bucket's new chunks landed among all older ones), while the index stays small. Chunks of a
/// bucket never overlap (op ids grow across commits), and a chunk is closed at [`CHUNK_BYTES`]
/// so that no value grows large. Stores of earlier versions kept ops by `(bucket, op id)` in
/// `ops`, one op record per key (later a chunk): [`migrate_ops`] moves them on open.
const CHUNK_TAG: u8 = 0xB3;

/// The size at which a bucket's open chunk is closed and a new one begun.
const CHUNK_BYTES: usize = 16 * 1024;

/// Appends an op to a chunk (see [`CHUNK_TAG`]).
fn push_op(chunk: &mut Writer, op_id: u64, k: OpKind, t: &str, i: &str, d: Option<&str>, c: u32) {
    if chunk.0.is_empty() {
        chunk.u8(CHUNK_TAG);
        chunk.u32(0);
    }
    let count = u32::from_le_bytes([chunk.0[1], chunk.0[2], chunk.0[3], chunk.0[4]]) + 1;
    chunk.0[1..5].copy_from_slice(&count.to_le_bytes());
    chunk.u64(op_id);
    let at = chunk.0.len();
    chunk.u32(0);
    write_op(chunk, k, t, i, d, c);
    let n = (chunk.0.len() - at - 4) as u32;
    chunk.0[at..at + 4].copy_from_slice(&n.to_le_bytes());
}

/// Stores `chunk`, whose last op is `last_id`, as `bucket`'s (see [`CHUNK_TAG`]).
fn put_chunk(
    tx: &mut SingleWriterWriteTx<'_>,
    s: &Spaces,
    bucket: &str,
    last_id: u64,
    chunk: Vec<u8>,
) {
    tx.insert(&s.op_log, last_id.to_be_bytes(), chunk);
    tx.insert(&s.op_index, op_key(bucket, last_id), []);
}

/// The chunk `op_index` lists under `last_id`.
fn get_chunk(r: &impl Readable, s: &Spaces, last_id: u64) -> Result<fjall::Slice> {
    r.get(&s.op_log, last_id.to_be_bytes())
        .map_err(engine)?
        .ok_or_else(|| corrupt("op chunk", "listed but missing"))
}

/// Removes the chunk of `bucket` whose last op is `last_id`, and its listing.
fn remove_chunk(tx: &mut SingleWriterWriteTx<'_>, s: &Spaces, bucket: &str, last_id: u64) {
    tx.remove(&s.op_log, last_id.to_be_bytes());
    tx.remove(&s.op_index, op_key(bucket, last_id));
}

/// The ops of one chunk, as (op id, op record), in op id order.
fn chunk_ops(v: &[u8]) -> Result<Vec<(u64, &[u8])>> {
    if v.first() != Some(&CHUNK_TAG) {
        return Err(corrupt("op chunk", "not a chunk"));
    }
    let mut r = Reader::new("op chunk", &v[1..]);
    let n = r.count()?;
    if n == 0 {
        return Err(corrupt("op chunk", "empty"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.u64()?;
        out.push((id, r.bytes()?));
    }
    r.end()?;
    Ok(out)
}

/// Row copies are written for every replicated row: binary, like ops (see [`OP_TAG`]).
const ROW_TAG: u8 = 0xB2;

impl RowRecord {
    fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = Writer::with_capacity(64 + self.v.len() * 16);
        w.u8(ROW_TAG);
        w.u64(self.s);
        w.u32(self.v.len() as u32);
        for v in &self.v {
            w.value(v);
        }
        w.u32(self.placements.len() as u32);
        for p in &self.placements {
            w.str(&p.bucket);
            w.str(&p.object_type);
            w.str(&p.object_id);
            w.u32(p.checksum);
        }
        write_lookups(&mut w, &self.lookups)?;
        Ok(w.0)
    }

    fn from_bytes(b: &[u8]) -> Result<RowRecord> {
        if b.first() == Some(&b'{') {
            return decode("row", b);
        }
        let mut r = Reader::new("row", b);
        if r.u8()? != ROW_TAG {
            return Err(corrupt("row", "unknown row record format"));
        }
        let s = r.u64()?;
        let n = r.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(r.value()?);
        }
        let n = r.count()?;
        let mut placements = Vec::with_capacity(n);
        for _ in 0..n {
            placements.push(Placement {
                bucket: r.str()?,
                object_type: r.str()?,
                object_id: r.str()?,
                checksum: r.u32()?,
            });
        }
        let lookups = read_lookups(&mut r)?;
        r.end()?;
        Ok(RowRecord {
            s,
            v,
            placements,
            lookups,
        })
    }
}

fn op_from(op_id: u64, v: OpValue) -> Op {
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

/// The keyspaces of the store.
#[derive(Clone)]
pub(crate) struct Spaces {
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
    bounds: Mutex<RowKeyBounds>,
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
        let row_keys = row_keys(&db, &s)?;
        // Stores of earlier versions keep ops in `ops`: moved over, then the keyspace goes.
        if db.keyspace_exists("ops") {
            let old = ks("ops")?;
            migrate_ops(&db, &s, &old)?;
            db.inner()
                .delete_keyspace(old.inner().clone())
                .map_err(engine)?;
        }
        Ok(EmbeddedStore {
            db,
            s: Spaces { row_keys, ..s },
            bounds: Mutex::new(HashMap::new()),
        })
    }
}

/// The store's row key format (see [`RowKeys`]); a new store takes the ordered one.
fn row_keys(db: &SingleWriterTxDatabase, s: &Spaces) -> Result<RowKeys> {
    let mut tx = db.write_tx();
    Ok(match tx.get(&s.meta, ROW_KEYS).map_err(engine)? {
        Some(v) if &*v == ORDERED_ROW_KEYS => RowKeys::Ordered,
        Some(v) => {
            let v = String::from_utf8_lossy(&v).into_owned();
            return Err(corrupt("row keys", &format!("unknown row key format {v}")));
        }
        None if tx.first_key_value(&s.rows).is_none() => {
            tx.insert(&s.meta, ROW_KEYS, ORDERED_ROW_KEYS);
            tx.durability(Some(PersistMode::SyncAll))
                .commit()
                .map_err(engine)?;
            RowKeys::Ordered
        }
        None => RowKeys::Text,
    })
}

/// Moves ops kept by `(bucket, op id)` in `ops` (earlier versions) into `op_log` and
/// `op_index`, a batch per commit, each removing what it moved: an interrupted move resumes.
fn migrate_ops(
    db: &SingleWriterTxDatabase,
    s: &Spaces,
    old: &SingleWriterTxKeyspace,
) -> Result<()> {
    const BATCH: usize = 10_000;
    loop {
        let mut tx = db.write_tx().durability(Some(PersistMode::SyncAll));
        let batch: Vec<(fjall::Slice, fjall::Slice)> = tx
            .iter(old)
            .take(BATCH)
            .map(|g| g.into_inner().map_err(engine))
            .collect::<Result<_>>()?;
        if batch.is_empty() {
            return Ok(());
        }
        for (k, v) in &batch {
            let bucket = k
                .len()
                .checked_sub(9)
                .and_then(|n| std::str::from_utf8(&k[..n]).ok())
                .ok_or_else(|| corrupt("op", "malformed op key"))?;
            let mut chunk = Writer::with_capacity(v.len() + 16);
            let mut last = 0;
            // One op record per key, or (briefly) a chunk keyed by its last op.
            let ops = match v.first() {
                Some(&CHUNK_TAG) => chunk_ops(v)?,
                _ => vec![(op_id_of(k), &v[..])],
            };
            for (id, rec) in ops {
                let op = OpValue::from_bytes(rec)?;
                push_op(&mut chunk, id, op.k, &op.t, &op.i, op.d.as_deref(), op.c);
                last = id;
            }
            put_chunk(&mut tx, s, bucket, last, chunk.0);
            tx.remove(old, k.clone());
        }
        tx.commit().map_err(engine)?;
    }
}

fn read_checkpoint(r: &impl Readable, meta: &SingleWriterTxKeyspace) -> Result<Checkpoint> {
    match r.get(meta, b"checkpoint").map_err(engine)? {
        Some(v) => decode("checkpoint", &v),
        None => Ok(Checkpoint::default()),
    }
}

impl BucketStore for EmbeddedStore {
    type Writer<'a> = EmbeddedWriter<'a>;
    type Snapshot = EmbeddedSnapshot;

    fn writer(&self) -> Result<EmbeddedWriter<'_>> {
        let tx = self.db.write_tx();
        let checkpoint = read_checkpoint(&tx, &self.s.meta)?;
        Ok(EmbeddedWriter {
            next_op_id: checkpoint.op_id + 1,
            checkpoint,
            tx,
            s: self.s.clone(),
            // Taken after the write transaction, which admits one writer at a time. A writer
            // that panicked left only raised bounds behind, which are still bounds.
            bounds: self.bounds.lock().unwrap_or_else(|e| e.into_inner()),
            states: HashMap::new(),
            changes: Changes::default(),
            schemas: HashMap::new(),
            last_schema: None,
        })
    }

    fn snapshot(&self) -> Result<EmbeddedSnapshot> {
        Ok(EmbeddedSnapshot {
            snap: self.db.read_tx(),
            s: self.s.clone(),
        })
    }

    fn compact(&self) -> Result<CompactStats> {
        compact::compact(&self.db, &self.s)
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.db.disk_space().map_err(engine)
    }

    fn sync(&self) -> Result<()> {
        self.db.persist(PersistMode::SyncAll).map_err(engine)
    }
}

impl StoreRead for EmbeddedStore {
    fn checkpoint(&self) -> Result<Checkpoint> {
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

    fn row(&self, table: &str, row_id: &str) -> Result<Option<StoredRow>> {
        self.snapshot()?.row(table, row_id)
    }
}

/// A read snapshot of the embedded store.
pub struct EmbeddedSnapshot {
    snap: fjall::Snapshot,
    s: Spaces,
}

impl std::fmt::Debug for EmbeddedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedSnapshot").finish_non_exhaustive()
    }
}

impl StoreRead for EmbeddedSnapshot {
    fn checkpoint(&self) -> Result<Checkpoint> {
        read_checkpoint(&self.snap, &self.s.meta)
    }

    fn buckets(&self) -> Result<Vec<String>> {
        let snap = &self.snap;
        let mut out = Vec::new();
        for g in snap.iter(&self.s.buckets) {
            out.push(String::from_utf8_lossy(&g.key().map_err(engine)?).into_owned());
        }
        Ok(out)
    }

    fn bucket_states(&self, buckets: &[String]) -> Result<Vec<Option<BucketState>>> {
        let snap = &self.snap;
        buckets
            .iter()
            .map(
                |b| match snap.get(&self.s.buckets, b.as_bytes()).map_err(engine)? {
                    Some(v) => decode("bucket state", &v).map(Some),
                    None => Ok(None),
                },
            )
            .collect()
    }

    fn ops(&self, bucket: &str, after: u64, up_to: u64, limit: usize) -> Result<Vec<Op>> {
        if after >= up_to {
            return Ok(Vec::new());
        }
        let snap = &self.snap;
        let mut out = Vec::new();
        // A chunk is listed by its last op, so the one holding `up_to` may lie past it.
        for g in snap.range(
            &self.s.op_index,
            op_key(bucket, after + 1)..=op_key(bucket, u64::MAX),
        ) {
            let last = op_id_of(&g.key().map_err(engine)?);
            let v = get_chunk(snap, &self.s, last)?;
            for (id, rec) in chunk_ops(&v)? {
                if id > up_to || out.len() >= limit {
                    return Ok(out);
                }
                if id > after {
                    out.push(op_from(id, OpValue::from_bytes(rec)?));
                }
            }
        }
        Ok(out)
    }

    fn lookup(&self, key: &LookupKey, at: u64) -> Result<Vec<Vec<serde_json::Value>>> {
        let snap = &self.snap;
        let k = key.encode();
        let prefix_len = k.len() + 1 + 8;
        let mut by_row: BTreeMap<Vec<u8>, Option<Vec<serde_json::Value>>> = BTreeMap::new();
        for g in snap.range(
            &self.s.lookups,
            lookup_key(&k, 0, "")..lookup_key(&k, at.saturating_add(1), ""),
        ) {
            let (key, v) = g.into_inner().map_err(engine)?;
            by_row.insert(
                key[prefix_len.min(key.len())..].to_vec(),
                decode("lookup", &v)?,
            );
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
        let snap = &self.snap;
        for g in snap.range(
            &self.s.changes,
            (after + 1).to_be_bytes()..=up_to.to_be_bytes(),
        ) {
            let c: Changes = decode("changes", &g.value().map_err(engine)?)?;
            out.buckets.extend(c.buckets);
            out.lookups.extend(c.lookups);
        }
        Ok(out)
    }

    fn row(&self, table: &str, row_id: &str) -> Result<Option<StoredRow>> {
        let snap = &self.snap;
        match snap
            .get(&self.s.rows, self.s.row_keys.key(table, row_id))
            .map_err(engine)?
        {
            Some(v) => {
                let rec = RowRecord::from_bytes(&v)?;
                let columns = names_in(snap, &self.s.meta, rec.s)?;
                Ok(Some(StoredRow {
                    columns: columns.into(),
                    values: rec.v,
                }))
            }
            None => Ok(None),
        }
    }
}

/// A write transaction on the embedded store.
pub struct EmbeddedWriter<'a> {
    tx: SingleWriterWriteTx<'a>,
    s: Spaces,
    bounds: MutexGuard<'a, RowKeyBounds>,
    checkpoint: Checkpoint,
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
}

/// A bucket's part of an open commit.
struct Pending {
    state: BucketState,
    chunk: Writer,
}

impl std::fmt::Debug for EmbeddedWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedWriter")
            .field("next_op_id", &self.next_op_id)
            .finish_non_exhaustive()
    }
}

impl EmbeddedWriter<'_> {
    /// The row copy of `table` under `key` (a key of `rows`, from [`RowKeys::key`]).
    fn record(&mut self, table: &str, key: &[u8]) -> Result<Option<RowRecord>> {
        if self.above_bound(table, key) {
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
        let bound = match self.bounds.get(table) {
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
                self.bounds.entry(table.to_owned()).or_insert(last)
            }
        };
        bound.as_deref().is_none_or(|b| key > b)
    }

    /// Raises the bound of `table` to `key`, a key this commit writes.
    fn raise_bound(&mut self, table: &str, key: &[u8]) {
        match self.bounds.get_mut(table) {
            Some(Some(b)) if key <= b.as_slice() => {}
            Some(b) => *b = Some(key.to_vec()),
            // Not read yet: the first lookup reads it, this key included.
            None => {}
        }
    }

    /// The state of a bucket this commit has not written to yet.
    fn stored_state(&self, bucket: &str) -> Result<BucketState> {
        Ok(
            match self
                .tx
                .get(&self.s.buckets, bucket.as_bytes())
                .map_err(engine)?
            {
                Some(v) => decode("bucket state", &v)?,
                None => BucketState::default(),
            },
        )
    }

    fn emit(
        &mut self,
        bucket: &str,
        kind: OpKind,
        object_type: &str,
        object_id: &str,
        data: Option<&str>,
        checksum: u32,
    ) -> Result<()> {
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        if !self.states.contains_key(bucket) {
            let state = self.stored_state(bucket)?;
            let chunk = Writer::with_capacity(1024);
            self.states
                .insert(bucket.to_owned(), Pending { state, chunk });
        }
        let Some(p) = self.states.get_mut(bucket) else {
            unreachable!("inserted above");
        };
        let s = &mut p.state;
        s.checksum = add_checksums(s.checksum, checksum);
        s.count += 1;
        s.last_op_id = op_id;
        push_op(
            &mut p.chunk,
            op_id,
            kind,
            object_type,
            object_id,
            data,
            checksum,
        );
        if p.chunk.0.len() >= CHUNK_BYTES {
            let chunk = std::mem::replace(&mut p.chunk, Writer::with_capacity(1024));
            put_chunk(&mut self.tx, &self.s, bucket, op_id, chunk.0);
        }
        Ok(())
    }

    /// A REMOVE of the row's object from the bucket of `p`.
    fn remove_from(&mut self, p: &Placement) -> Result<()> {
        let subkey = format!("{}/{}", p.object_type, p.object_id);
        self.emit(
            &p.bucket,
            OpKind::Remove,
            &p.object_type,
            &p.object_id,
            None,
            remove_checksum(&subkey),
        )
    }

    fn set_lookups(
        &mut self,
        table: &str,
        row_id: &str,
        old: &[LookupEntry],
        new: &[LookupEntry],
    ) -> Result<()> {
        if old == new {
            return Ok(());
        }
        let row = format!("{table}/{row_id}");
        let row = row.as_str();
        // A lookup change takes an op id of its own, so that it is visible exactly from this
        // commit's checkpoint on.
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        for e in old.iter().filter(|e| !new.contains(e)) {
            self.tx.insert(
                &self.s.lookups,
                lookup_key(&e.key.encode(), op_id, row),
                b"null".to_vec(),
            );
            self.changes.lookups.insert(e.key.clone());
        }
        for e in new.iter().filter(|e| !old.contains(e)) {
            self.tx.insert(
                &self.s.lookups,
                lookup_key(&e.key.encode(), op_id, row),
                encode(&e.parameters)?,
            );
            self.changes.lookups.insert(e.key.clone());
        }
        Ok(())
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
    fn row(&mut self, table: &str, row_id: &str) -> Result<Option<StoredRow>> {
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
        row_id: &str,
        row: StoredRow,
        outputs: Vec<RowOutput>,
        lookups: Vec<LookupEntry>,
    ) -> Result<()> {
        let key = self.s.row_keys.key(table, row_id);
        let old = self.record(table, &key)?;
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
                    Some(&out.data),
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
                self.remove_from(p)?;
            }
        }
        self.set_lookups(table, row_id, &old_lookups, &lookups)?;
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
        }
        .to_bytes()?;
        self.raise_bound(table, &key);
        self.tx.insert(&self.s.rows, key, record);
        Ok(())
    }

    fn delete_row(&mut self, table: &str, row_id: &str) -> Result<()> {
        let key = self.s.row_keys.key(table, row_id);
        let Some(old) = self.record(table, &key)? else {
            return Ok(());
        };
        for p in &old.placements {
            self.remove_from(p)?;
        }
        self.set_lookups(table, row_id, &old.lookups, &[])?;
        self.tx.remove(&self.s.rows, key);
        Ok(())
    }

    fn truncate(&mut self, table: &str) -> Result<()> {
        let prefix = key2(table, b"");
        let ids: Vec<String> = self
            .tx
            .prefix(&self.s.rows, &prefix)
            .map(|g| {
                g.key()
                    .map(|k| self.s.row_keys.row_id(&k[prefix.len()..]))
                    .map_err(engine)
            })
            .collect::<Result<_>>()?;
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

    fn commit(self) -> Result<Checkpoint> {
        self.finish(PersistMode::SyncAll)
    }

    fn commit_deferred(self) -> Result<Checkpoint> {
        // Written through to the operating system, so that only a machine crash (not a process
        // crash) can lose it before the sync.
        self.finish(PersistMode::Buffer)
    }
}

impl EmbeddedWriter<'_> {
    fn finish(mut self, mode: PersistMode) -> Result<Checkpoint> {
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

#[cfg(test)]
mod op_record_tests {
    use super::*;

    #[test]
    fn op_records_round_trip_and_json_records_still_read() {
        for (k, d) in [
            (OpKind::Put, Some("{\"a\":\"x\\ny\"}".to_owned())),
            (OpKind::Remove, None),
            (OpKind::Move, None),
            (OpKind::Clear, None),
        ] {
            let v = OpValue {
                k,
                t: "tä".into(),
                i: "1/2".into(),
                d,
                c: 0xDEAD_BEEF,
            };
            let back = OpValue::from_bytes(&v.to_bytes()).expect("binary");
            assert_eq!(
                (back.k, back.t, back.i, back.d, back.c),
                (v.k, v.t.clone(), v.i.clone(), v.d.clone(), v.c)
            );
            let json = serde_json::to_vec(&v).expect("json");
            let old = OpValue::from_bytes(&json).expect("a record written as json");
            assert_eq!(old.d, v.d);
        }
        let good = OpValue {
            k: OpKind::Put,
            t: "t".into(),
            i: "1".into(),
            d: Some("{}".into()),
            c: 1,
        }
        .to_bytes();
        for cut in 0..good.len() {
            assert!(OpValue::from_bytes(&good[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn row_records_round_trip_and_json_records_still_read() {
        use walsync_types::Value;
        let rec = RowRecord {
            s: 0xFEED_F00D_1234_5678,
            v: vec![
                Value::Null,
                Value::Bool(true),
                Value::Int(-42),
                Value::Float(-0.5),
                Value::Text("tä\n\"x\"".into()),
                Value::Json(serde_json::json!({"a": [1, null, "b"]})),
                Value::Bytes(vec![0, 255, 7]),
                Value::Array(vec![Value::Int(1), Value::Array(vec![Value::Null])]),
            ],
            placements: vec![Placement {
                bucket: "b[\"1\"]".into(),
                object_type: "t".into(),
                object_id: "1".into(),
                checksum: 0xDEAD_BEEF,
            }],
            lookups: vec![LookupEntry {
                key: LookupKey {
                    definition: "d".into(),
                    query: 1,
                    values: vec!["u1".into()],
                },
                parameters: vec![serde_json::json!(7)],
            }],
        };
        let same = |a: &RowRecord, b: &RowRecord| {
            assert_eq!(
                (a.s, &a.v, &a.placements, &a.lookups),
                (b.s, &b.v, &b.placements, &b.lookups)
            );
        };
        let bytes = rec.to_bytes().expect("encode");
        same(&RowRecord::from_bytes(&bytes).expect("binary"), &rec);
        same(
            &RowRecord::from_bytes(&serde_json::to_vec(&rec).expect("json")).expect("json record"),
            &rec,
        );
        for cut in 0..bytes.len() {
            assert!(
                RowRecord::from_bytes(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(RowRecord::from_bytes(&longer).is_err());
    }

    #[test]
    fn chunks_round_trip_and_fail_cleanly_when_cut() {
        let mut w = Writer::with_capacity(16);
        push_op(&mut w, 7, OpKind::Put, "t", "1", Some("{}"), 1);
        push_op(&mut w, 9, OpKind::Remove, "t", "2", None, 2);
        let ops = chunk_ops(&w.0).expect("chunk");
        assert_eq!(ops.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [7, 9]);
        let second = OpValue::from_bytes(ops[1].1).expect("op");
        assert_eq!(
            (second.k, second.i.as_str(), second.c),
            (OpKind::Remove, "2", 2)
        );
        for cut in 1..w.0.len() {
            let ok = chunk_ops(&w.0[..cut]).and_then(|ops| {
                ops.iter()
                    .try_for_each(|(_, r)| OpValue::from_bytes(r).map(drop))
            });
            assert!(ok.is_err(), "cut at {cut}");
        }
    }

    /// Stores written before ops were kept in chunks hold one op record per key.
    #[test]
    fn ops_of_earlier_versions_move_on_open_then_read_and_compact() {
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        assert!(!store.db.keyspace_exists("ops"), "a new store has no ops");
        let old = |store: &EmbeddedStore| {
            store
                .db
                .keyspace("ops", KeyspaceCreateOptions::default)
                .expect("ops")
        };
        let put = |i: &str, d: &str| OpValue {
            k: OpKind::Put,
            t: "t".into(),
            i: i.into(),
            d: Some(d.into()),
            c: put_checksum("t", i, d),
        };
        let legacy = [
            (1, put("1", "{}")),
            (2, put("1", "{\"v\":2}")),
            (3, put("2", "{}")),
        ];
        let mut tx = store.db.write_tx();
        let mut state = BucketState::default();
        // Ops 1 and 2 one per key, op 3 in a chunk, as earlier versions kept them.
        let ops = old(&store);
        for (id, op) in &legacy {
            if *id == 3 {
                let mut chunk = Writer::with_capacity(64);
                push_op(&mut chunk, 3, op.k, &op.t, &op.i, op.d.as_deref(), op.c);
                tx.insert(&ops, op_key("a", 3), chunk.0);
            } else {
                tx.insert(&ops, op_key("a", *id), op.to_bytes());
            }
            state.checksum = add_checksums(state.checksum, op.c);
            state.count += 1;
            state.last_op_id = *id;
        }
        tx.insert(
            &store.s.buckets,
            b"a".to_vec(),
            encode(&state).expect("state"),
        );
        let checkpoint = Checkpoint {
            op_id: 3,
            ..Checkpoint::default()
        };
        tx.insert(
            &store.s.meta,
            b"checkpoint".to_vec(),
            encode(&checkpoint).expect("cp"),
        );
        tx.commit().expect("commit");
        drop((ops, store));
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        assert!(
            !store.db.keyspace_exists("ops"),
            "moved, and the old keyspace deleted"
        );
        let mut w = store.writer().expect("writer");
        let row = StoredRow {
            columns: vec!["v".to_owned()].into(),
            values: vec![],
        };
        for i in ["2", "3"] {
            let out = RowOutput {
                bucket: "a".into(),
                object_type: "t".into(),
                object_id: i.into(),
                data: "{\"v\":3}".into(),
            };
            w.upsert_row("public.t", i, row.clone(), vec![out], vec![])
                .expect("upsert");
        }
        w.commit().expect("commit");

        let ids = |after, up_to| -> Vec<u64> {
            let ops = store.ops("a", after, up_to, usize::MAX).expect("ops");
            ops.iter().map(|o| o.op_id).collect()
        };
        assert_eq!(ids(0, u64::MAX), [1, 2, 3, 4, 5]);
        assert_eq!(ids(2, 4), [3, 4]);
        let replay = |ops: Vec<Op>| {
            let mut rows = BTreeMap::new();
            let mut sum = 0u32;
            for op in ops {
                match op.kind {
                    OpKind::Put => drop(rows.insert(op.object_id, op.data)),
                    OpKind::Clear => {
                        rows.clear();
                        sum = 0;
                    }
                    _ => drop(rows.remove(&op.object_id)),
                }
                sum = add_checksums(sum, op.checksum);
            }
            (rows, sum)
        };
        let before = replay(store.ops("a", 0, u64::MAX, usize::MAX).expect("ops"));
        let stats = store.compact().expect("compact");
        assert_eq!(
            (stats.moved, stats.cleared),
            (2, 1),
            "ops 1 and 3 superseded"
        );
        let after = store.ops("a", 0, u64::MAX, usize::MAX).expect("ops");
        assert_eq!(
            after.iter().map(|o| (o.op_id, o.kind)).collect::<Vec<_>>(),
            [
                (1, OpKind::Clear),
                (2, OpKind::Put),
                (3, OpKind::Move),
                (4, OpKind::Put),
                (5, OpKind::Put),
            ]
        );
        assert_eq!(replay(after), before);
    }

    #[test]
    fn integer_row_ids_key_in_numeric_order_and_read_back() {
        let ints = [
            i64::MIN,
            -1_000_000,
            -5,
            -1,
            0,
            1,
            9,
            10,
            999,
            1000,
            1_000_000,
            i64::MAX,
        ];
        let keys: Vec<Vec<u8>> = ints
            .iter()
            .map(|i| RowKeys::Ordered.key("public.t", &format!("[\"{i}\"]")))
            .collect();
        assert!(keys.windows(2).all(|k| k[0] < k[1]), "numeric order");
        for (i, k) in ints.iter().zip(&keys) {
            let part = &k["public.t".len() + 1..];
            assert_eq!(RowKeys::Ordered.row_id(part), format!("[\"{i}\"]"));
        }
        for text in [
            "[\"007\"]",
            "[\"-0\"]",
            "[\"+1\"]",
            "[\"1\",\"2\"]",
            "[\"\"]",
            "[1]",
        ] {
            assert_eq!(int_row_id(text), None, "{text}");
            let k = RowKeys::Ordered.key("t", text);
            assert_eq!(RowKeys::Ordered.row_id(&k[2..]), text);
        }
        assert_eq!(RowKeys::Text.key("t", "[\"5\"]"), b"t\0[\"5\"]");
    }

    /// A store made before integer row ids were keyed by number keeps its text keys.
    #[test]
    fn stores_with_text_row_keys_keep_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = "[\"12\"]";
        let rec = RowRecord {
            s: 0,
            v: vec![],
            placements: vec![],
            lookups: vec![],
        };
        {
            let store = EmbeddedStore::open(dir.path()).expect("open");
            assert_eq!(store.s.row_keys, RowKeys::Ordered, "a new store");
            let mut tx = store.db.write_tx();
            tx.remove(&store.s.meta, ROW_KEYS);
            tx.insert(
                &store.s.rows,
                key2("public.t", id.as_bytes()),
                rec.to_bytes().expect("rec"),
            );
            tx.commit().expect("commit");
        }
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        assert_eq!(store.s.row_keys, RowKeys::Text);
        let mut w = store.writer().expect("writer");
        assert!(
            w.record("public.t", &key2("public.t", id.as_bytes()))
                .expect("record")
                .is_some()
        );
        w.truncate("public.t").expect("truncate");
        w.commit().expect("commit");
        assert!(
            store
                .snapshot()
                .expect("snap")
                .snap
                .first_key_value(&store.s.rows)
                .is_none()
        );
        drop(store);
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.s.row_keys,
            RowKeys::Ordered,
            "an empty store changes over"
        );
    }
}
