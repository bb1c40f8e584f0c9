//! The replicator: source → rules → storage, and acknowledgements back.
//!
//! **Ack rule, end to end.** Source transactions are applied to one open storage write
//! transaction; it is committed (durably) when no further source batch is waiting or a size limit
//! is reached, and only then is the `end_lsn` of its last source transaction acknowledged to the
//! source, which reports no more than that to PostgreSQL. A crash anywhere loses nothing: what
//! was not committed was not acknowledged, and is sent again.
//!
//! **Replay.** On start the replicator resumes from the store's checkpoint (`lsn`), and the source
//! skips transactions at or before it (invariant 2). A `Rollback` from the source, or any error
//! here, drops the uncommitted storage transaction and restarts the source from the checkpoint:
//! transactions emitted but not stored are sent again, whole.
//!
//! **Snapshot.** The initial copy is written in bounded batches, one storage commit each; the
//! checkpoint is marked complete (and may be served) only at the snapshot's end.

mod apply;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use walsync_rules::SyncRules;
use walsync_source::{Resume, Source, SourceConfig, SourceError, SourceStream};
use walsync_storage::{BucketStore, StorageError, StoreWriter};

pub use apply::Applier;

#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("row of {table} has no replica identity columns")]
    NoKey { table: String },
    #[error("the wal source ended unexpectedly")]
    SourceEnded,
    /// A fault a test injected between the storage commit and the acknowledgement.
    #[error("injected fault after storage commit {0}")]
    Injected(u64),
}

pub type Result<T, E = ReplicatorError> = std::result::Result<T, E>;

/// Limits of one storage commit.
#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    pub source: SourceConfig,
    /// Source transactions per storage commit, at most.
    pub max_commit_txns: usize,
    /// Row changes per storage commit, at most (a larger source transaction still commits whole).
    pub max_commit_rows: usize,
    /// Test hook: fail right after this many storage commits, before acknowledging.
    pub fail_after_commits: Option<u64>,
}

/// 1,000 small transactions or 50,000 rows keep a storage commit to some tens of milliseconds
/// while amortising its fsync.
pub const DEFAULT_MAX_COMMIT_TXNS: usize = 1_000;
pub const DEFAULT_MAX_COMMIT_ROWS: usize = 50_000;

impl ReplicatorConfig {
    pub fn new(source: SourceConfig) -> ReplicatorConfig {
        ReplicatorConfig {
            source,
            max_commit_txns: DEFAULT_MAX_COMMIT_TXNS,
            max_commit_rows: DEFAULT_MAX_COMMIT_ROWS,
            fail_after_commits: None,
        }
    }
}

/// Progress, for tests and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub storage_commits: u64,
    pub transactions: u64,
    pub rows: u64,
    pub snapshot_rows: u64,
}

/// Replicates until `stop` turns true or a definite error.
pub async fn run<S: BucketStore + 'static>(
    config: ReplicatorConfig,
    rules: Arc<SyncRules>,
    store: Arc<S>,
    stop: watch::Receiver<bool>,
    progress: watch::Sender<Progress>,
) -> Result<()> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || run_blocking(handle, config, rules, store, stop, progress))
        .await
        .map_err(|e| {
            ReplicatorError::Storage(StorageError::Engine(format!("replicator thread: {e}")))
        })?
}

fn run_blocking<S: BucketStore>(
    handle: tokio::runtime::Handle,
    config: ReplicatorConfig,
    rules: Arc<SyncRules>,
    store: Arc<S>,
    mut stop: watch::Receiver<bool>,
    progress: watch::Sender<Progress>,
) -> Result<()> {
    let mut commits = 0u64;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let cp = store.checkpoint()?;
        let resume = Resume {
            durable: if cp.snapshot_complete { cp.lsn } else { None },
            owns_slot: cp.slot_owned.as_deref() == Some(config.source.slot.as_str()),
        };
        let stream = handle.block_on(Source::start(config.source.clone(), resume))?;
        let mut applier = Applier::new(rules.clone());
        match session(
            &handle,
            &config,
            &*store,
            stream,
            &mut applier,
            &mut stop,
            &progress,
            &mut commits,
        ) {
            Ok(Restart::Stop) => return Ok(()),
            Ok(Restart::Again) => {
                tracing::info!("restarting replication from the stored checkpoint");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

enum Restart {
    Stop,
    Again,
}

#[allow(clippy::too_many_arguments)]
fn session<S: BucketStore>(
    handle: &tokio::runtime::Handle,
    config: &ReplicatorConfig,
    store: &S,
    mut stream: SourceStream,
    applier: &mut Applier,
    stop: &mut watch::Receiver<bool>,
    progress: &watch::Sender<Progress>,
    commits: &mut u64,
) -> Result<Restart> {
    let mut writer: Option<S::Writer<'_>> = None;
    loop {
        // Wait for the next batch (or a stop), unless a commit is pending and nothing is ready.
        let batch = match stream.try_next_batch() {
            Some(b) => Some(b),
            None => {
                // Nothing waiting: commit what is written (at a transaction boundary only).
                if !applier.in_transaction
                    && let Some(w) = writer.take()
                {
                    commit(w, applier, &stream, config, commits, progress)?;
                    continue;
                }
                handle.block_on(async {
                    tokio::select! {
                        b = stream.next_batch() => b,
                        _ = stop.changed() => None,
                    }
                })
            }
        };
        let events = match batch {
            None => {
                // Uncommitted writes are dropped: they were not acknowledged.
                drop(writer);
                handle.block_on(stream.stop());
                // A stop request, or the stop handle dropped (nobody can ask any more).
                if *stop.borrow() || stop.has_changed().is_err() {
                    return Ok(Restart::Stop);
                }
                // The source ended without being asked to and without an error: a bug in it,
                // not something a retry would fix.
                tracing::error!("the wal source ended unexpectedly");
                return Err(ReplicatorError::SourceEnded);
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(events)) => events,
        };
        for event in events {
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(store.writer()?),
            };
            match applier.apply(w, event)? {
                apply::Next::Continue => {}
                apply::Next::CommitNow => {
                    if let Some(w) = writer.take() {
                        commit(w, applier, &stream, config, commits, progress)?;
                    }
                }
                apply::Next::Restart => {
                    // Forget everything not yet committed; the source sends it again.
                    drop(writer.take());
                    handle.block_on(stream.stop());
                    return Ok(Restart::Again);
                }
            }
        }
        let full = applier.pending_txns >= config.max_commit_txns
            || applier.pending_rows >= config.max_commit_rows;
        if full
            && !applier.in_transaction
            && let Some(w) = writer.take()
        {
            commit(w, applier, &stream, config, commits, progress)?;
        }
    }
}

fn commit<W: StoreWriter>(
    writer: W,
    applier: &mut Applier,
    stream: &SourceStream,
    config: &ReplicatorConfig,
    commits: &mut u64,
    progress: &watch::Sender<Progress>,
) -> Result<()> {
    let ack = applier.ack_position();
    let cp = writer.commit()?;
    *commits += 1;
    if config.fail_after_commits == Some(*commits) {
        return Err(ReplicatorError::Injected(cp.op_id));
    }
    if let Some(lsn) = ack {
        stream.ack(lsn);
    }
    progress.send_modify(|p| {
        p.storage_commits = *commits;
        p.transactions += applier.pending_txns as u64;
        p.rows += applier.pending_rows as u64;
        p.snapshot_rows = applier.snapshot_rows;
    });
    applier.committed();
    Ok(())
}
