//! Staged write transactions: a write transaction larger than its memory budget commits to the
//! engine in steps, invisible to readers until its own commit, and undone whole by a crash or
//! an abandonment before that.
//!
//! - **Invisible**: readers see a checkpoint through its position (`meta`), the bucket states
//!   (`buckets`) and what lies at or below its op id. A step writes neither: ops, op index,
//!   lookups and change-log entries all sit under op ids above the checkpoint, which readers
//!   skip, and the buckets' new states wait in `stage` (`s`, the bucket) until the commit
//!   writes them to `buckets` with the checkpoint, in one engine commit. (Readers never read
//!   row copies.) No long-lived engine snapshot is held: one would keep every memtable written
//!   meanwhile in memory.
//! - **Undone**: the first time a step changes a row copy, the copy as it was (or its absence)
//!   goes into `stage` (`u`, the keyspace's tag, the key); keys under the transaction's own op
//!   ids are recorded as absent before. Each step also marks the store as staging (`meta` key
//!   [`STAGING`]). [`recover`] puts every recorded value back in bounded batches (each a commit
//!   of its own, idempotent, so a crash during it only means doing the rest again), then clears
//!   the mark, then the whole `stage` keyspace in one engine operation; it runs when the store
//!   opens and before the next writer, so no writer meets a half-written transaction. The
//!   commit of the transaction clears the mark in the same engine commit as its checkpoint;
//!   the records left behind are garbage that [`recover`] clears later.
//! - **Alone**: compaction and pruning take the store's `alone` lock, which a staged writer
//!   holds for its whole life: nothing else writes between its steps.
//!
//! The objects a staged transaction PUT (`owners`, see the writer) are kept in `stage` too
//! (`o`, the object's hash), so a transaction of any size holds a bounded part of them in
//! memory; so are the row keys a re-copy copied (`c`, the key of `rows`). What its commit
//! holds grows with the buckets it touched, not with its rows.

use super::engine::{Bytes, Durability, Read};
use super::{KvStore, Space};
use crate::Result;

/// The `meta` key that says a staged transaction has steps in the store.
pub(super) const STAGING: &[u8] = b"staging";
/// Records of `stage` put back (or deleted) per commit by [`recover`].
const RECOVER_BATCH: usize = 10_000;

/// The record of `key` of `space` before the staged transaction: its undo key in `stage`.
pub(super) fn undo_key(space: Space, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 2);
    k.push(b'u');
    k.push(space as u8);
    k.extend_from_slice(key);
    k
}

/// The undo value: the key's earlier value, or that it had none.
pub(super) fn undo_value(before: Option<&[u8]>) -> Vec<u8> {
    match before {
        Some(v) => {
            let mut out = Vec::with_capacity(v.len() + 1);
            out.push(1);
            out.extend_from_slice(v);
            out
        }
        None => vec![0],
    }
}

/// The key under which a staged transaction keeps the new state of a bucket.
pub(super) fn state_key(bucket: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(bucket.len() + 1);
    k.push(b's');
    k.extend_from_slice(bucket.as_bytes());
    k
}

/// The mark of a row key of `rows` a re-copy copied ([`crate::StoreWriter::copy_row`]).
pub(super) fn copied_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(b'c');
    k.extend_from_slice(key);
    k
}

/// The key under which a staged transaction keeps the owner of an object.
pub(super) fn owner_key(object: u64) -> [u8; 9] {
    let mut k = [b'o'; 9];
    k[1..].copy_from_slice(&object.to_be_bytes());
    k
}

/// Undoes a staged transaction that did not commit (its mark is set), then clears `stage`
/// (the records of one that did are garbage, as are a re-copy's marks): readers see the store
/// itself again. The undo goes in bounded batches, each a commit of its own and idempotent, so
/// a crash during it only means doing it again; the mark goes only after the last. Clearing
/// the keyspace is one operation of the engine, however many records it holds.
pub(super) fn recover(store: &KvStore) -> Result<()> {
    use std::ops::Bound;
    let staging = store.db.read_tx()?.get(Space::Meta, STAGING)?.is_some();
    if staging {
        let mut undone = 0usize;
        let mut from = Bound::Included(b"u".to_vec());
        loop {
            let mut tx = store.db.write_tx()?;
            let batch: Vec<(Bytes, Bytes)> = tx
                .range(Space::Stage, (from.clone(), Bound::Excluded(b"v".to_vec())))
                .take(RECOVER_BATCH)
                .collect::<Result<_>>()?;
            let Some((last, _)) = batch.last() else {
                break;
            };
            from = Bound::Excluded(last.to_vec());
            for (k, v) in batch {
                if let [b'u', tag, key @ ..] = &*k
                    && let Some(space) = Space::from_tag(*tag)
                {
                    match &*v {
                        [1, before @ ..] => tx.insert(space, key, before),
                        _ => tx.remove(space, key),
                    }
                    undone += 1;
                }
            }
            tx.commit(Durability::Buffer)?;
        }
        let mut tx = store.db.write_tx()?;
        tx.remove(Space::Meta, STAGING);
        tx.commit(Durability::Sync)?;
        tracing::warn!(
            keys = undone,
            "a staged write transaction that never committed was undone"
        );
    }
    if store.db.read_tx()?.iter(Space::Stage).next().is_some() {
        store.db.clear(Space::Stage)?;
    }
    Ok(())
}
