//! Compaction: superseded ops become MOVE (data dropped, checksum kept); a bucket's leading run
//! of REMOVE/MOVE/CLEAR becomes one CLEAR whose checksum is the run's sum. No bucket's checksum
//! changes, and a client replaying the compacted log ends with the same rows.

use std::collections::{HashMap, HashSet};

use fjall::{PersistMode, Readable, SingleWriterTxDatabase};
use walsync_types::add_checksums;

use super::{OpValue, Spaces, decode, encode, engine, op_id_of, op_key};
use crate::Result;
use crate::model::{BucketState, CompactStats, OpKind};

pub(super) fn compact(db: &SingleWriterTxDatabase, s: &Spaces) -> Result<CompactStats> {
    let mut tx = db.write_tx().durability(Some(PersistMode::SyncAll));
    let mut stats = CompactStats::default();
    let buckets: Vec<String> = tx
        .iter(&s.buckets)
        .map(|g| {
            g.key()
                .map(|k| String::from_utf8_lossy(&k).into_owned())
                .map_err(engine)
        })
        .collect::<Result<_>>()?;
    for bucket in buckets {
        let mut ops: Vec<(u64, OpValue)> = Vec::new();
        for g in tx.range(&s.ops, op_key(&bucket, 0)..=op_key(&bucket, u64::MAX)) {
            let (k, v) = g.into_inner().map_err(engine)?;
            ops.push((op_id_of(&k), OpValue::from_bytes(&v)?));
        }
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
        let mut changed: HashSet<u64> = HashSet::new();
        for (id, op) in ops.iter_mut() {
            if superseded.contains(id) {
                op.k = OpKind::Move;
                op.d = None;
                changed.insert(*id);
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
            let clear_id = ops[run - 1].0;
            for (id, _) in &ops[..run] {
                tx.remove(&s.ops, op_key(&bucket, *id));
            }
            let clear = OpValue {
                k: OpKind::Clear,
                t: String::new(),
                i: String::new(),
                d: None,
                c: sum,
            };
            tx.insert(&s.ops, op_key(&bucket, clear_id), clear.to_bytes());
            stats.cleared += run as u64;
            ops.drain(..run - 1);
            ops[0] = (clear_id, clear);
            changed.retain(|id| *id > clear_id);
        }
        for (id, op) in &ops {
            if changed.contains(id) {
                tx.insert(&s.ops, op_key(&bucket, *id), op.to_bytes());
            }
        }
        let mut state: BucketState = match tx.get(&s.buckets, bucket.as_bytes()).map_err(engine)? {
            Some(v) => decode("bucket state", &v)?,
            None => BucketState::default(),
        };
        state.count = ops.len() as u64;
        tx.insert(&s.buckets, bucket.into_bytes(), encode(&state)?);
    }
    tx.commit().map_err(engine)?;
    Ok(stats)
}
