//! Stores of earlier versions: their row key format is kept, their ops are moved.

use fjall::{PersistMode, Readable, SingleWriterTxKeyspace};

use super::Space;
use super::chunk::{CHUNK_TAG, OpValue, chunk_ops, push_op};
use super::engine::{Db, Durability, FjallDb, Read};
use super::keys::{ORDERED_ROW_KEYS, ROW_KEYS, RowKeys, op_id_of, op_key};
use super::record::{Writer, corrupt, engine};
use crate::Result;

/// The store's row key format (see [`RowKeys`]); a new store takes the ordered one.
pub(super) fn row_keys(db: &Db) -> Result<RowKeys> {
    // Read first: a store shared with a writer elsewhere says (its first migration wrote it).
    if let Some(v) = db.read_tx()?.get(Space::Meta, ROW_KEYS)?
        && &*v == ORDERED_ROW_KEYS
    {
        return Ok(RowKeys::Ordered);
    }
    let mut tx = db.write_tx()?;
    Ok(match tx.get(Space::Meta, ROW_KEYS)? {
        Some(v) if &*v == ORDERED_ROW_KEYS => RowKeys::Ordered,
        Some(v) => {
            let v = String::from_utf8_lossy(&v).into_owned();
            return Err(corrupt("row keys", &format!("unknown row key format {v}")));
        }
        None if tx.iter(Space::Rows).next().transpose()?.is_none() => {
            tx.insert(Space::Meta, ROW_KEYS, ORDERED_ROW_KEYS);
            tx.commit(Durability::Sync)?;
            RowKeys::Ordered
        }
        None => RowKeys::Text,
    })
}

/// Moves ops kept by `(bucket, op id)` in `ops` (earlier versions) into `op_log` and
/// `op_index`, a batch per commit, each removing what it moved: an interrupted move resumes.
pub(super) fn migrate_ops(f: &FjallDb, old: &SingleWriterTxKeyspace) -> Result<()> {
    const BATCH: usize = 10_000;
    loop {
        let mut tx = f.db.write_tx().durability(Some(PersistMode::SyncAll));
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
            tx.insert(f.keyspace(Space::OpLog), last.to_be_bytes(), chunk.0);
            tx.insert(f.keyspace(Space::OpIndex), op_key(bucket, last), []);
            tx.remove(old, k.clone());
        }
        tx.commit().map_err(engine)?;
    }
}
