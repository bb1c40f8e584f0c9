//! Op records and the chunks that hold them.

use serde::{Deserialize, Serialize};
use walsync_types::OpKind;

use super::Space;
use super::engine::{Bytes, Read, Tx};
use super::keys::op_key;
use super::record::{Reader, Writer, corrupt, decode};
use crate::Result;
use crate::model::Op;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct OpValue {
    pub(super) k: OpKind,
    pub(super) t: String,
    pub(super) i: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(super) d: Option<String>,
    pub(super) c: u32,
}

/// Ops are the store's hottest records (every download reads each one), so they are kept in a
/// small binary form rather than JSON: a tag byte (never `{`, so records written as JSON by
/// earlier versions still read), the kind, the checksum, then length-prefixed type, id and data.
pub(super) const OP_TAG: u8 = 0xB1;

/// Op kinds by their byte in an op record.
pub(super) const OP_KINDS: [OpKind; 4] = [OpKind::Put, OpKind::Remove, OpKind::Move, OpKind::Clear];

impl OpValue {
    /// The op's record alone (see [`OP_TAG`]), as earlier versions kept it under its own key.
    #[cfg(test)]
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        write_op(&mut w, self.k, &self.t, &self.i, self.d.as_deref(), self.c);
        w.0
    }

    pub(super) fn from_bytes(b: &[u8]) -> Result<OpValue> {
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
pub(super) fn write_op(w: &mut Writer, k: OpKind, t: &str, i: &str, d: Option<&str>, c: u32) {
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
pub(super) const CHUNK_TAG: u8 = 0xB3;

/// The size at which a bucket's open chunk is closed and a new one begun.
pub(super) const CHUNK_BYTES: usize = 16 * 1024;

/// Appends an op to a chunk (see [`CHUNK_TAG`]).
pub(super) fn push_op(
    chunk: &mut Writer,
    op_id: u64,
    k: OpKind,
    t: &str,
    i: &str,
    d: Option<&str>,
    c: u32,
) {
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
pub(super) fn put_chunk(tx: &mut Tx<'_>, bucket: &str, last_id: u64, chunk: Vec<u8>) {
    tx.insert(Space::OpLog, last_id.to_be_bytes(), chunk);
    tx.insert(Space::OpIndex, op_key(bucket, last_id), []);
}

/// The chunks `op_index` lists under `last_ids`, in their order, read a batch at a time (one
/// query per batch in PostgreSQL).
pub(super) fn get_chunks(r: &impl Read, last_ids: &[u64]) -> Result<Vec<Bytes>> {
    let mut out = Vec::with_capacity(last_ids.len());
    for batch in last_ids.chunks(64) {
        let keys: Vec<[u8; 8]> = batch.iter().map(|id| id.to_be_bytes()).collect();
        let keys: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        for v in r.get_many(Space::OpLog, &keys)? {
            out.push(v.ok_or_else(|| corrupt("op chunk", "listed but missing"))?);
        }
    }
    Ok(out)
}

/// Removes the chunk of `bucket` whose last op is `last_id`, and its listing.
pub(super) fn remove_chunk(tx: &mut Tx<'_>, bucket: &str, last_id: u64) {
    tx.remove(Space::OpLog, last_id.to_be_bytes());
    tx.remove(Space::OpIndex, op_key(bucket, last_id));
}

/// The ops of one chunk, as (op id, op record), in op id order.
pub(super) fn chunk_ops(v: &[u8]) -> Result<Vec<(u64, &[u8])>> {
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

pub(super) fn op_from(op_id: u64, v: OpValue) -> Op {
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
