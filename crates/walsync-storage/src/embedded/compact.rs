//! Compaction: superseded ops become MOVE (data dropped, checksum kept); a bucket's leading run
//! of REMOVE/MOVE/CLEAR becomes one CLEAR whose checksum is the run's sum. No bucket's checksum
//! changes, and a client replaying the compacted log ends with the same rows.

use std::collections::{HashMap, HashSet};

use redb::{Database, ReadableTable};
use walsync_types::add_checksums;

use super::{BUCKETS, OPS, OpValue, decode, encode, engine};
use crate::Result;
use crate::model::{BucketState, CompactStats, OpKind};

pub(super) fn compact(db: &Database) -> Result<CompactStats> {
    let tx = db.begin_write().map_err(engine)?;
    let mut stats = CompactStats::default();
    let buckets: Vec<String> = {
        let t = tx.open_table(BUCKETS).map_err(engine)?;
        let mut v = Vec::new();
        for e in t.iter().map_err(engine)? {
            v.push(e.map_err(engine)?.0.value().to_owned());
        }
        v
    };
    for bucket in buckets {
        let mut ops: Vec<(u64, OpValue)> = Vec::new();
        {
            let t = tx.open_table(OPS).map_err(engine)?;
            for e in t
                .range((bucket.as_str(), 0u64)..=(bucket.as_str(), u64::MAX))
                .map_err(engine)?
            {
                let (k, v) = e.map_err(engine)?;
                ops.push((k.value().1, decode("op", v.value())?));
            }
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
        let mut t = tx.open_table(OPS).map_err(engine)?;
        if run > 1 || (run == 1 && ops[0].1.k != OpKind::Clear) {
            let sum = ops[..run]
                .iter()
                .fold(0u32, |s, (_, op)| add_checksums(s, op.c));
            let clear_id = ops[run - 1].0;
            for (id, _) in &ops[..run] {
                t.remove((bucket.as_str(), *id)).map_err(engine)?;
            }
            let clear = OpValue {
                k: OpKind::Clear,
                t: String::new(),
                i: String::new(),
                d: None,
                c: sum,
            };
            t.insert((bucket.as_str(), clear_id), encode(&clear)?.as_slice())
                .map_err(engine)?;
            stats.cleared += run as u64;
            ops.drain(..run - 1);
            ops[0] = (clear_id, clear);
            changed.retain(|id| *id > clear_id);
        }
        for (id, op) in &ops {
            if changed.contains(id) {
                t.insert((bucket.as_str(), *id), encode(op)?.as_slice())
                    .map_err(engine)?;
            }
        }
        drop(t);
        let mut bt = tx.open_table(BUCKETS).map_err(engine)?;
        let mut state: BucketState = match bt.get(bucket.as_str()).map_err(engine)? {
            Some(v) => decode("bucket state", v.value())?,
            None => BucketState::default(),
        };
        state.count = ops.len() as u64;
        bt.insert(bucket.as_str(), encode(&state)?.as_slice())
            .map_err(engine)?;
    }
    tx.commit().map_err(engine)?;
    Ok(stats)
}
