//! The ack rule with deferred durability: a storage commit is visible at once, but PostgreSQL
//! hears of it (and the replicator reports it) only after the store's sync returned.

use support::seed;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use seed::{config, setup};
use tokio::sync::watch;
use walsync_replicator::Progress;
use walsync_storage::{
    BucketState, BucketStore, Changes, CompactBatch, KvStore, Op, PruneStats, StoreCheckpoint,
    StoreRead, StoredRow,
};
use walsync_types::{LookupKey, RowId};

/// The embedded store with a gate in front of `sync`: while closed, nothing becomes durable.
struct GatedStore {
    inner: Arc<KvStore>,
    open: Mutex<bool>,
    changed: Condvar,
}

impl GatedStore {
    fn set_open(&self, open: bool) {
        *self.open.lock().expect("gate") = open;
        self.changed.notify_all();
    }
}

impl StoreRead for GatedStore {
    fn checkpoint(&self) -> walsync_storage::Result<StoreCheckpoint> {
        self.inner.checkpoint()
    }
    fn buckets(&self) -> walsync_storage::Result<Vec<String>> {
        self.inner.buckets()
    }
    fn bucket_states(&self, b: &[String]) -> walsync_storage::Result<Vec<Option<BucketState>>> {
        self.inner.bucket_states(b)
    }
    fn ops(
        &self,
        b: &str,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> walsync_storage::Result<Vec<Op>> {
        self.inner.ops(b, after, up_to, limit)
    }
    fn lookup_texts(&self, k: &LookupKey, at: u64) -> walsync_storage::Result<Vec<String>> {
        self.inner.lookup_texts(k, at)
    }
    fn changes(&self, after: u64, up_to: u64) -> walsync_storage::Result<Changes> {
        self.inner.changes(after, up_to)
    }
    fn row(&self, t: &str, id: &RowId) -> walsync_storage::Result<Option<StoredRow>> {
        self.inner.row(t, id)
    }
}

impl BucketStore for GatedStore {
    type Writer<'a> = <KvStore as BucketStore>::Writer<'a>;
    type Snapshot = <KvStore as BucketStore>::Snapshot;

    fn writer(&self) -> walsync_storage::Result<Self::Writer<'_>> {
        self.inner.writer()
    }
    fn staged_writer(&self, budget: usize) -> walsync_storage::Result<Self::Writer<'_>> {
        self.inner.staged_writer(budget)
    }
    fn snapshot(&self) -> walsync_storage::Result<Self::Snapshot> {
        self.inner.snapshot()
    }
    fn compact_batch(
        &self,
        after: Option<&str>,
        max_ops: usize,
    ) -> walsync_storage::Result<CompactBatch> {
        self.inner.compact_batch(after, max_ops)
    }
    fn prune_history(&self, before: u64, max_keys: usize) -> walsync_storage::Result<PruneStats> {
        self.inner.prune_history(before, max_keys)
    }
    fn size_on_disk(&self) -> walsync_storage::Result<u64> {
        self.inner.size_on_disk()
    }
    fn counts(&self) -> walsync_storage::Result<walsync_storage::StoreCounts> {
        self.inner.counts()
    }
    fn sync(&self) -> walsync_storage::Result<()> {
        let mut open = self.open.lock().expect("gate");
        while !*open {
            open = self.changed.wait(open).expect("gate");
        }
        drop(open);
        self.inner.sync()
    }
}

async fn wait_for(
    what: &str,
    mut f: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_before_the_store_sync() -> anyhow::Result<()> {
    let s = setup().await?;
    let store = Arc::new(GatedStore {
        inner: s.store.clone(),
        open: Mutex::new(true),
        changed: Condvar::new(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let (progress_tx, progress) = watch::channel(Progress::default());
    let task = tokio::spawn(walsync_replicator::run(
        config(&s),
        s.rules.clone(),
        store.clone(),
        stop_rx,
        progress_tx,
    ));
    wait_for("the snapshot", async || {
        Ok(store.checkpoint()?.snapshot_complete)
    })
    .await?;

    store.set_open(false);
    let rows_before = progress.borrow().rows;
    let op_before = store.checkpoint()?.op_id;
    let lsn_before: String = s
        .sql
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    s.sql
        .batch_execute("INSERT INTO projects (id, name) VALUES (100, 'after the gate closed')")
        .await?;
    let lsn_after: String = s
        .sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    // Visible in the store at once...
    wait_for("the commit to be visible", async || {
        Ok(store.checkpoint()?.op_id > op_before)
    })
    .await?;
    // ...but neither reported nor acknowledged while the sync cannot finish (status updates go
    // out every second when the position moved).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let reported_early = progress.borrow().rows != rows_before;
    let flushed_early: bool = s
        .sql
        .query_one(
            "SELECT confirmed_flush_lsn > $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
            &[&lsn_before, &s.slot],
        )
        .await?
        .get(0);
    // Open before asserting, so that a failure does not leave the replicator blocked.
    store.set_open(true);
    assert!(!reported_early, "reported before durable");
    assert!(
        !flushed_early,
        "postgres was told of a commit before it was durable"
    );

    wait_for("the report", async || {
        Ok(progress.borrow().rows > rows_before)
    })
    .await?;
    wait_for("the acknowledgement", async || {
        Ok(s.sql
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&lsn_after, &s.slot],
            )
            .await?
            .get(0))
    })
    .await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}
