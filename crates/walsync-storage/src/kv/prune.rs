//! Pruning history no reader needs: change-log entries of old commits, and lookup entries that
//! later ones superseded. Readers at a checkpoint of `before` or later see the same changes and
//! lookups as before the pruning; `changes_from` tells older readers to start over.

use std::collections::HashMap;

use super::Space;
use super::engine::{Bytes, Db, Durability, Read};
use super::record::encode;
use super::snapshot::read_checkpoint;
use crate::Result;
use crate::model::PruneStats;

pub(super) fn prune_history(db: &Db, before: u64, max_keys: usize) -> Result<PruneStats> {
    let mut tx = db.write_tx()?;
    let mut stats = PruneStats::default();
    // First the mark, in the same commit as any removal: no reader sees history gone without
    // being told.
    let mut cp = read_checkpoint(&tx)?;
    let before = before.min(cp.op_id);
    if cp.changes_from < before {
        cp.changes_from = before;
        tx.insert(Space::Meta, b"checkpoint".to_vec(), encode(&cp)?);
    }
    let budget = max_keys.max(1);
    let old: Vec<Bytes> = tx
        .range(Space::Changes, ..=before.to_be_bytes())
        .take(budget)
        .map(|g| g.map(|(k, _)| k))
        .collect::<Result<_>>()?;
    stats.changes = old.len() as u64;
    for k in old {
        tx.remove(Space::Changes, &*k);
    }
    // Lookup keys are `lookup 0x00 op_id(be) row`: per (lookup, row), every entry at or before
    // `before` except the last is superseded, and that last one too when it is a tombstone.
    let mut latest: HashMap<(Vec<u8>, Vec<u8>), (Bytes, bool)> = HashMap::new();
    let mut doomed: Vec<Bytes> = Vec::new();
    for g in tx.iter(Space::Lookups) {
        if doomed.len() >= budget {
            break;
        }
        let (key, value) = g?;
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
        tx.remove(Space::Lookups, &*k);
    }
    stats.done = stats.changes < budget as u64 && complete;
    tx.commit(Durability::Sync)?;
    Ok(stats)
}
