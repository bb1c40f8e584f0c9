//! The store's upkeep in the background: compaction (superseded ops become MOVE, leading runs a
//! CLEAR) and pruning of history no servable checkpoint needs, in bounded steps with pauses
//! between them, so that the replicator never waits long for the store's single writer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use walsync_storage::{BucketStore, CompactStats, StorageError};

/// The upkeep's settings (the `compact_*` keys of `[storage]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// Seconds between passes (0: never; `walsync compact` still works).
    pub compact_interval_seconds: u64,
    /// Ops read per compaction step: one write transaction. 20,000 ops take a few tens of
    /// milliseconds here, which is what the replicator may wait.
    pub compact_batch_ops: usize,
    /// Pause between steps, in milliseconds, so that the replicator's commits come in between.
    pub compact_pause_ms: u64,
    /// Bytes the store's filesystem keeps free: a step does not start below it.
    pub min_free_bytes: u64,
}

impl Default for MaintenanceConfig {
    fn default() -> MaintenanceConfig {
        MaintenanceConfig {
            compact_interval_seconds: 600,
            compact_batch_ops: 20_000,
            compact_pause_ms: 20,
            min_free_bytes: walsync_replicator::DEFAULT_MIN_FREE_BYTES,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub compacted: CompactStats,
    pub steps: u64,
    pub pruned_changes: u64,
    pub pruned_lookups: u64,
}

/// One pass: every bucket compacted, then the history before `prune_before` pruned, each in
/// steps of the configured size with the configured pause between them.
pub fn pass<S: BucketStore>(
    store: &S,
    prune_before: u64,
    config: &MaintenanceConfig,
) -> Result<Pass, StorageError> {
    let pause = Duration::from_millis(config.compact_pause_ms);
    let mut out = Pass::default();
    let mut after: Option<String> = None;
    loop {
        walsync_storage::check_space(store, config.min_free_bytes)?;
        let step = store.compact_batch(after.as_deref(), config.compact_batch_ops.max(1))?;
        out.steps += 1;
        out.compacted.moved += step.stats.moved;
        out.compacted.cleared += step.stats.cleared;
        out.compacted.reclaimed_bytes += step.stats.reclaimed_bytes;
        match step.next {
            Some(next) => after = Some(next),
            None => break,
        }
        std::thread::sleep(pause);
    }
    if prune_before > 0 {
        loop {
            walsync_storage::check_space(store, config.min_free_bytes)?;
            let step = store.prune_history(prune_before, config.compact_batch_ops.max(1))?;
            out.steps += 1;
            out.pruned_changes += step.changes;
            out.pruned_lookups += step.lookups;
            if step.done {
                break;
            }
            std::thread::sleep(pause);
        }
    }
    Ok(out)
}

/// Passes every interval until `stop`. Each pass prunes the history from before the previous
/// pass's checkpoint, so that history always reaches back at least one interval: a stream that
/// slept longer gets a full checkpoint (with only the data it lacks).
pub async fn run<S: BucketStore + 'static>(
    store: Arc<S>,
    config: MaintenanceConfig,
    mut stop: watch::Receiver<bool>,
) {
    if config.compact_interval_seconds == 0 {
        return;
    }
    let interval = Duration::from_secs(config.compact_interval_seconds);
    let mut mark = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let store = store.clone();
        let prune_before = mark;
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let next = store.checkpoint()?.op_id;
            pass(&*store, prune_before, &config).map(|p| (p, next))
        })
        .await;
        match result {
            Ok(Ok((p, next))) => {
                mark = next;
                crate::telemetry::record_compaction(&p, started.elapsed());
                tracing::info!(
                    moved = p.compacted.moved,
                    cleared = p.compacted.cleared,
                    pruned_changes = p.pruned_changes,
                    pruned_lookups = p.pruned_lookups,
                    steps = p.steps,
                    took = ?started.elapsed(),
                    "store compacted"
                );
            }
            Ok(Err(e)) => {
                metrics::counter!(crate::telemetry::COMPACTION_FAILURES).increment(1);
                tracing::error!(error = %e, "store compaction failed; trying again next interval")
            }
            Err(e) => tracing::error!(error = %e, "store compaction task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walsync_storage::{KvStore, StoreRead, StoreWriter, StoredRow};
    use walsync_types::{RowId, RowOutput};

    #[test]
    fn a_pass_compacts_every_bucket_and_prunes_before_the_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KvStore::open(dir.path()).expect("open");
        let mut marks = Vec::new();
        for v in 0..5 {
            let mut w = store.writer().expect("writer");
            for b in 0..20 {
                let id = RowId::from_int(b);
                w.upsert_row(
                    "public.t",
                    &id,
                    StoredRow::default(),
                    vec![RowOutput {
                        bucket: format!("b{b}"),
                        object_type: "t".into(),
                        object_id: b.to_string(),
                        data: format!("{{\"v\":{v}}}"),
                    }],
                    vec![],
                )
                .expect("upsert");
            }
            w.set_snapshot_complete();
            marks.push(w.commit().expect("commit").op_id);
        }
        let config = MaintenanceConfig {
            compact_batch_ops: 7,
            compact_pause_ms: 0,
            ..MaintenanceConfig::default()
        };
        let p = pass(&store, marks[2], &config).expect("pass");
        assert_eq!(p.compacted.moved, 20 * 4, "every superseded put");
        assert!(p.steps > 2, "in steps: {p:?}");
        assert_eq!(p.pruned_changes, 3, "the first three commits' change log");
        assert_eq!(
            store.checkpoint().expect("checkpoint").changes_from,
            marks[2]
        );
        assert_eq!(
            pass(&store, marks[2], &config).expect("again").compacted,
            CompactStats::default()
        );
    }
}
