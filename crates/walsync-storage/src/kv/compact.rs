//! Compaction: superseded ops become MOVE (data dropped, checksum kept); a bucket's leading run
//! of REMOVE/MOVE/CLEAR becomes one CLEAR whose checksum is the run's sum. No bucket's checksum
//! changes, and a client replaying the compacted log ends with the same rows.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;

use walsync_types::add_checksums;

use walsync_types::OpKind;

use super::Space;
use super::chunk::{OpValue, chunk_ops, get_chunks, push_op, put_chunk, remove_chunk};
use super::engine::{Db, Durability, Read};
use super::keys::{op_id_of, op_key};
use super::record::{Writer, decode, encode};
use crate::Result;
use crate::model::{BucketState, CompactBatch, CompactStats};

/// Buckets listed per step before their ops are read: bounds the listing, not the work.
const BUCKETS_PER_LISTING: usize = 1024;
/// Bytes of op chunks a step reads before it takes no further bucket: with `max_ops`, what
/// bounds a step's memory (a bucket is read whole, however large).
const STEP_BYTES: u64 = 16 << 20;

pub(super) fn compact_batch(db: &Db, after: Option<&str>, max_ops: usize) -> Result<CompactBatch> {
    let mut tx = db.write_tx()?;
    let mut stats = CompactStats::default();
    let start = match after {
        Some(a) => Bound::Excluded(a.as_bytes().to_vec()),
        None => Bound::Unbounded,
    };
    let buckets: Vec<String> = tx
        .range(Space::Buckets, (start, Bound::<Vec<u8>>::Unbounded))
        .take(BUCKETS_PER_LISTING)
        .map(|g| g.map(|(k, _)| String::from_utf8_lossy(&k).into_owned()))
        .collect::<Result<_>>()?;
    let listed_all = buckets.len() < BUCKETS_PER_LISTING;
    let mut read = 0u64;
    let mut read_bytes = 0u64;
    let mut last_done: Option<String> = None;
    let total = buckets.len();
    for (n, bucket) in buckets.into_iter().enumerate() {
        // At least one bucket per step, however large.
        if n > 0 && (read >= max_ops as u64 || read_bytes >= STEP_BYTES) {
            break;
        }
        // Each op with the key of the chunk it is kept in (see `CHUNK_TAG`).
        let mut ops: Vec<(u64, OpValue)> = Vec::new();
        let mut home: Vec<u64> = Vec::new();
        // The size of each chunk as read, by its key.
        let mut sizes: HashMap<u64, usize> = HashMap::new();
        let listed: Vec<u64> = tx
            .range(
                Space::OpIndex,
                op_key(&bucket, 0)..=op_key(&bucket, u64::MAX),
            )
            .map(|g| g.map(|(k, _)| op_id_of(&k)))
            .collect::<Result<_>>()?;
        for (last, v) in listed.iter().copied().zip(get_chunks(&tx, &listed)?) {
            read_bytes += v.len() as u64;
            sizes.insert(last, v.len());
            for (id, rec) in chunk_ops(&v)? {
                ops.push((id, OpValue::from_bytes(rec)?));
                home.push(last);
            }
        }
        read += ops.len() as u64;
        let mut last: HashMap<(&str, &str), u64> = HashMap::new();
        for (id, op) in &ops {
            if matches!(op.k, OpKind::Put | OpKind::Remove) {
                last.insert((op.t.as_str(), op.i.as_str()), *id);
            }
        }
        let superseded: HashSet<u64> = ops
            .iter()
            .filter(|(id, op)| {
                matches!(op.k, OpKind::Put | OpKind::Remove)
                    && last.get(&(op.t.as_str(), op.i.as_str())) != Some(id)
            })
            .map(|(id, _)| *id)
            .collect();
        // The chunks whose content changes.
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        for ((id, op), h) in ops.iter_mut().zip(&home) {
            if superseded.contains(id) {
                op.k = OpKind::Move;
                op.d = None;
                touched.insert(*h);
                stats.moved += 1;
            }
        }
        let run = ops
            .iter()
            .take_while(|(_, op)| matches!(op.k, OpKind::Remove | OpKind::Move | OpKind::Clear))
            .count();
        if run > 1 || (run == 1 && ops[0].1.k != OpKind::Clear) {
            let sum = ops[..run]
                .iter()
                .fold(0u32, |acc, (_, op)| add_checksums(acc, op.c));
            touched.extend(&home[..run]);
            // The CLEAR takes the run's last op id, so it stays in that op's chunk, whose key
            // (its last op id) does not change; chunks left empty are removed.
            let clear_id = ops[run - 1].0;
            let clear = OpValue {
                k: OpKind::Clear,
                t: String::new(),
                i: String::new(),
                d: None,
                c: sum,
            };
            stats.cleared += run as u64;
            ops.drain(..run - 1);
            home.drain(..run - 1);
            ops[0] = (clear_id, clear);
        }
        let mut chunks: BTreeMap<u64, Writer> = BTreeMap::new();
        for ((id, op), h) in ops.iter().zip(&home) {
            if touched.contains(h) {
                let chunk = chunks
                    .entry(*h)
                    .or_insert_with(|| Writer::with_capacity(1024));
                push_op(chunk, *id, op.k, &op.t, &op.i, op.d.as_deref(), op.c);
            }
        }
        for h in touched {
            let before = sizes.get(&h).copied().unwrap_or(0);
            match chunks.remove(&h) {
                Some(chunk) => {
                    stats.reclaimed_bytes += before.saturating_sub(chunk.0.len()) as u64;
                    put_chunk(&mut tx, &bucket, h, chunk.0);
                }
                None => {
                    stats.reclaimed_bytes += before as u64;
                    remove_chunk(&mut tx, &bucket, h);
                }
            }
        }
        let mut state: BucketState = match tx.get(Space::Buckets, bucket.as_bytes())? {
            Some(v) => decode("bucket state", &v)?,
            None => BucketState::default(),
        };
        state.count = ops.len() as u64;
        tx.insert(Space::Buckets, bucket.clone().into_bytes(), encode(&state)?);
        // The last bucket of everything: nothing comes after it.
        last_done = if n + 1 == total && listed_all {
            None
        } else {
            Some(bucket)
        };
    }
    tx.commit(Durability::Sync)?;
    Ok(CompactBatch {
        stats,
        ops: read,
        next: last_done,
    })
}
