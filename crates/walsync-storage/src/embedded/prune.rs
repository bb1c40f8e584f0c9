//! Pruning history no reader needs: change-log entries of old commits, and lookup entries that
//! later ones superseded. Readers at a checkpoint of `before` or later see the same changes and
//! lookups as before the pruning; `changes_from` tells older readers to start over.

use std::collections::HashMap;

use fjall::{PersistMode, Readable, SingleWriterTxDatabase};

use super::Spaces;
use super::record::{encode, engine};
use super::snapshot::read_checkpoint;
use crate::Result;
use crate::model::PruneStats;

pub(super) fn prune_history(
    db: &SingleWriterTxDatabase,
    s: &Spaces,
    before: u64,
    max_keys: usize,
) -> Result<PruneStats> {
    let mut tx = db.write_tx().durability(Some(PersistMode::SyncAll));
    let mut stats = PruneStats::default();
    // First the mark, in the same commit as any removal: no reader sees history gone without
    // being told.
    let mut cp = read_checkpoint(&tx, &s.meta)?;
    let before = before.min(cp.op_id);
    if cp.changes_from < before {
        cp.changes_from = before;
        tx.insert(&s.meta, b"checkpoint".to_vec(), encode(&cp)?);
    }
    let budget = max_keys.max(1);
    let old: Vec<fjall::Slice> = tx
        .range(&s.changes, ..=before.to_be_bytes())
        .take(budget)
        .map(|g| g.key().map_err(engine))
        .collect::<Result<_>>()?;
    stats.changes = old.len() as u64;
    for k in old {
        tx.remove(&s.changes, k);
    }
    // Lookup keys are `lookup 0x00 op_id(be) row`: per (lookup, row), every entry at or before
    // `before` except the last is superseded, and that last one too when it is a tombstone.
    let mut latest: HashMap<(Vec<u8>, Vec<u8>), (fjall::Slice, bool)> = HashMap::new();
    let mut doomed: Vec<fjall::Slice> = Vec::new();
    for g in tx.iter(&s.lookups) {
        if doomed.len() >= budget {
            break;
        }
        let (key, value) = g.into_inner().map_err(engine)?;
        let Some(sep) = key.iter().position(|b| *b == 0) else {
            continue;
        };
        if key.len() < sep + 9 {
            continue;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&key[sep + 1..sep + 9]);
        if u64::from_be_bytes(id) > before {
            continue;
        }
        let group = (key[..sep].to_vec(), key[sep + 9..].to_vec());
        let tombstone = &*value == b"null";
        if let Some((earlier, _)) = latest.insert(group, (key.clone(), tombstone)) {
            doomed.push(earlier);
        }
    }
    let complete = doomed.len() < budget;
    if complete {
        doomed.extend(
            latest
                .into_values()
                .filter(|(_, tombstone)| *tombstone)
                .map(|(k, _)| k),
        );
    }
    stats.lookups = doomed.len() as u64;
    for k in doomed {
        tx.remove(&s.lookups, k);
    }
    stats.done = stats.changes < budget as u64 && complete;
    tx.commit().map_err(engine)?;
    Ok(stats)
}
