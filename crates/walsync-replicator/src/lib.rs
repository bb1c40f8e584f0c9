//! The replicator: source → rules → storage, and acknowledgements back.
//!
//! **Ack rule, end to end.** Source transactions are applied to one open storage write
//! transaction; it is committed when no further source batch is waiting or a size limit is
//! reached. The commit is made visible at once and durable by a separate syncing thread, so that
//! applying the next transactions overlaps the disk's work; only after that sync is the `end_lsn`
//! of the last source transaction it covers acknowledged to the source, which reports no more
//! than that to PostgreSQL. A crash anywhere loses nothing: what was not durable was not
//! acknowledged, and is sent again. (Replaying the same transactions onto the same stored state
//! yields the same ops with the same ids, so readers that saw a commit a machine crash then lost
//! see it again, unchanged.)
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
    /// A fault a test injected while a snapshot was being applied.
    #[error("injected fault after {0} snapshot rows")]
    InjectedInSnapshot(u64),
    /// The replicator panicked outside any change of a source transaction (a change that
    /// panics is skipped instead).
    #[error("the replicator panicked: {0}")]
    Panicked(String),
    /// The buckets were built with other sync rules, and the slot is not walsync's own, so the
    /// tables cannot be copied anew without a gap.
    #[error(
        "the sync rules changed since the buckets were built, and replication slot {slot:?} was not created by walsync, \
         so the tables cannot be copied anew without a gap: drop the slot (walsync then makes its own) or put the \
         earlier rules back"
    )]
    RulesChanged { slot: String },
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
    /// Bytes one storage write transaction may hold in memory. A source transaction larger
    /// than that is staged in the store in steps of about this size and made visible whole at
    /// its commit.
    pub memory_budget: usize,
    /// Test hook: fail right after this many storage commits, before acknowledging.
    pub fail_after_commits: Option<u64>,
    /// Test hook: fail once a snapshot has applied this many rows (before a re-copy commits).
    pub fail_after_snapshot_rows: Option<u64>,
    /// Test hook: applying a row that holds this text panics in the rules' part (the row is
    /// skipped), and one holding it followed by `!` panics after it was written (the change is
    /// skipped when its transaction is applied again).
    pub panic_on_text: Option<String>,
    /// Streaming counts as lagging while the newest durable transaction took longer than this
    /// from its source commit.
    pub lagging_after: Duration,
    /// Bytes the store's filesystem keeps free: below it the replicator writes nothing (state
    /// [`State::DiskFull`]) until space is freed.
    pub min_free_bytes: u64,
}

/// 1,000 small transactions or 50,000 rows keep a storage commit to some tens of milliseconds
/// while amortising its fsync.
pub const DEFAULT_MAX_COMMIT_TXNS: usize = 1_000;
pub const DEFAULT_MAX_COMMIT_ROWS: usize = 50_000;
/// 64 MiB per storage write transaction: with the engine's own buffers the replicator stays
/// well within 512 MiB whatever the size of a source transaction.
pub const DEFAULT_MEMORY_BUDGET: usize = 64 << 20;
/// See [`ReplicatorConfig::lagging_after`].
pub const DEFAULT_LAGGING_AFTER: Duration = Duration::from_secs(30);
/// 512 MiB free at least: room for the engine's own work past the replicator's last look (a
/// commit of at most the memory budget, memtable flushes, a compaction's new tables written
/// before the old ones go), so that the engine never meets a full disk itself.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 512 << 20;
/// How often a replicator paused for space looks whether it was freed.
const SPACE_POLL: Duration = Duration::from_secs(1);

impl ReplicatorConfig {
    pub fn new(source: SourceConfig) -> ReplicatorConfig {
        ReplicatorConfig {
            source,
            max_commit_txns: DEFAULT_MAX_COMMIT_TXNS,
            max_commit_rows: DEFAULT_MAX_COMMIT_ROWS,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            fail_after_commits: None,
            fail_after_snapshot_rows: None,
            panic_on_text: None,
            lagging_after: DEFAULT_LAGGING_AFTER,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
        }
    }
}

/// Progress, for tests and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub storage_commits: u64,
    pub transactions: u64,
    /// Replication bytes (pgoutput messages as received) of the transactions replicated.
    pub bytes: u64,
    pub rows: u64,
    pub snapshot_rows: u64,
    /// Microseconds from the source commit of the newest durable transaction to the moment it
    /// was durable in the store: the replication lag as of the last storage sync.
    pub lag_micros: u64,
    /// Source transactions that outgrew the memory budget and were staged in the store.
    pub staged_transactions: u64,
    /// Rows and changes left out of the buckets because applying them panicked.
    pub skipped_rows: u64,
    /// Where the replication stands.
    pub state: State,
}

/// Where the replication stands, as an operator would ask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum State {
    /// Connecting to PostgreSQL and checking it (at start, and after a restart).
    #[default]
    Connecting,
    /// The initial copy of the tables into an empty store.
    Snapshotting,
    /// A copy of the tables into a store that holds data (a lost slot, changed rules, an
    /// interrupted copy): clients are served the last checkpoint meanwhile.
    Rebuilding,
    /// PostgreSQL streams the slot's changes.
    Streaming,
    /// Streaming, but the newest durable transaction committed on the source longer ago than
    /// [`ReplicatorConfig::lagging_after`] before it was durable here.
    Lagging,
    /// The connection broke or PostgreSQL cannot be reached: trying again with backoff.
    Reconnecting,
    /// The slot walsync made is gone or invalidated: it is made again and the tables copied anew.
    SlotLost,
    /// The store's disk has less free space than its reserve: nothing is written (or
    /// acknowledged) until space is freed, then the slot is read again from the stored position.
    DiskFull,
    /// The replicator stopped (asked to, or by a definite error).
    Stopped,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Connecting,
        State::Snapshotting,
        State::Rebuilding,
        State::Streaming,
        State::Lagging,
        State::Reconnecting,
        State::SlotLost,
        State::DiskFull,
        State::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Snapshotting => "snapshotting",
            State::Rebuilding => "rebuilding",
            State::Streaming => "streaming",
            State::Lagging => "lagging",
            State::Reconnecting => "reconnecting",
            State::SlotLost => "slot_lost",
            State::DiskFull => "disk_full",
            State::Stopped => "stopped",
        }
    }
}

/// Publishes a new state, with one log line for each change.
fn set_state(progress: &watch::Sender<Progress>, state: State) {
    progress.send_if_modified(|p| transition(p, state));
}

/// Moves `p` to `state`; whether that is a change (logged).
fn transition(p: &mut Progress, state: State) -> bool {
    let before = std::mem::replace(&mut p.state, state);
    if before != state {
        tracing::info!(
            state = state.as_str(),
            previous = before.as_str(),
            lag_seconds = p.lag_micros as f64 / 1e6,
            snapshot_rows = p.snapshot_rows,
            "replication state"
        );
    }
    before != state
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
    let span = tracing::info_span!("walsync-apply");
    tokio::task::spawn_blocking(move || {
        let _named = span.enter();
        let out = run_blocking(handle, config, rules, store, stop, &progress);
        set_state(&progress, State::Stopped);
        out
    })
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
    progress: &watch::Sender<Progress>,
) -> Result<()> {
    let mut commits = 0u64;
    // A source transaction that outgrew the memory budget: applied again, staged.
    let mut stage: Option<walsync_types::Lsn> = None;
    // Set when the slot was lost: the next session makes it again and copies the data anew.
    let mut rebuild = false;
    // Between attempts to start a session while PostgreSQL cannot be reached.
    let mut backoff = config.source.reconnect_min;
    // Changes that made the replicator panic, skipped when met again, and the rows skipped.
    let mut skip = std::collections::HashSet::new();
    let mut skipped = 0;
    // Buckets built with other rules no longer hold what these rules select (a tightened filter
    // would keep leaking rows, a newly named table would have none): they are built anew.
    let cp = store.checkpoint()?;
    if cp.snapshot_complete {
        match &cp.rules {
            // A store of an earlier version: its rules are not known, these are taken as its.
            None => {
                let mut w = store.writer()?;
                w.set_rules(rules.fingerprint());
                w.commit()?;
            }
            Some(built) if built != rules.fingerprint() => {
                if cp.slot_owned.as_deref() != Some(config.source.slot.as_str()) {
                    return Err(ReplicatorError::RulesChanged {
                        slot: config.source.slot.clone(),
                    });
                }
                tracing::warn!(
                    slot = %config.source.slot,
                    "the sync rules changed since the buckets were built: copying the tables anew"
                );
                rebuild = true;
            }
            Some(_) => {}
        }
    }
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let cp = store.checkpoint()?;
        let owns_slot = cp.slot_owned.as_deref() == Some(config.source.slot.as_str());
        let resume = Resume {
            durable: if cp.snapshot_complete && !rebuild {
                cp.lsn
            } else {
                None
            },
            owns_slot,
        };
        // PostgreSQL unreachable (down, restarting, a network partition) is waited out: the
        // replicator tries again with backoff instead of stopping the process, and the slot
        // keeps what it has not acknowledged. Definite errors (pre-flight, auth) still stop it.
        // The pre-flight waits on PostgreSQL (a connection, the publication): a stop ends it.
        let started = handle.block_on(async {
            tokio::select! {
                started = Source::start(config.source.clone(), resume) => Some(started),
                _ = stop.wait_for(|s| *s) => None,
            }
        });
        let Some(started) = started else {
            return Ok(());
        };
        let stream = match started {
            Ok(stream) => {
                backoff = config.source.reconnect_min;
                stream
            }
            Err(e) if e.is_transient() => {
                set_state(progress, State::Reconnecting);
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot start replication; trying again");
                if wait_or_stop(&handle, &mut stop, backoff) {
                    return Ok(());
                }
                backoff = (backoff * 2).min(config.source.reconnect_max);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        rebuild = false;
        let mut applier = Applier::new(rules.clone());
        // A store that holds ops (it serves a checkpoint, or an interrupted initial copy left
        // some) is re-copied: bounded in memory, and clients keep what is still true.
        applier.recopy = cp.snapshot_complete || cp.op_id > 0;
        applier.skip = std::mem::take(&mut skip);
        applier.skipped = skipped;
        applier.panic_on_text = config.panic_on_text.clone();
        let out = session(
            &handle,
            &config,
            &*store,
            stream,
            &mut applier,
            &mut stop,
            progress,
            &mut commits,
            &mut stage,
        );
        skip = std::mem::take(&mut applier.skip);
        skipped = applier.skipped;
        // Read again: this session may have made the slot (a first start, a rebuild).
        let owns_slot = owns_slot
            || store.checkpoint()?.slot_owned.as_deref() == Some(config.source.slot.as_str());
        match out {
            Ok(Restart::Stop) => return Ok(()),
            Ok(Restart::Again | Restart::Stage) => {
                tracing::info!("restarting replication from the stored checkpoint");
                std::thread::sleep(Duration::from_millis(50));
            }
            // A slot walsync made is gone or can no longer serve the stored position (dropped,
            // or invalidated by max_slot_wal_keep_size): the changes in between are lost, so the
            // buckets are built anew from a fresh slot and snapshot, compared row by row with
            // what the store holds, so clients download only what differs. A slot walsync did
            // not make is left to the operator.
            Err(ReplicatorError::Source(SourceError::SlotLost { slot, reason })) if owns_slot => {
                set_state(progress, State::SlotLost);
                tracing::error!(
                    slot,
                    reason,
                    "replication slot lost: making it again and copying the data anew"
                );
                rebuild = true;
            }
            // A store in PostgreSQL that cannot be reached now is waited for; the next session
            // takes the store's write lock again (or finds that another process took it, and
            // ends with `NotWriter`: this one must not write any more).
            Err(ReplicatorError::Storage(StorageError::Unavailable(e))) => {
                set_state(progress, State::Reconnecting);
                tracing::warn!(error = %e, "the storage database is unavailable: replication waits for it");
                if wait_or_stop(&handle, &mut stop, STORAGE_RETRY) {
                    return Ok(());
                }
            }
            // A nearly full disk is waited out; the next session reads the slot from the
            // stored position (a rebuild under way goes on, an interrupted copy is copied again).
            Err(ReplicatorError::Storage(StorageError::NoSpace { free, reserve })) => {
                set_state(progress, State::DiskFull);
                tracing::error!(
                    free,
                    reserve,
                    "the store's disk is nearly full: replication paused until space is freed"
                );
                loop {
                    if wait_or_stop(&handle, &mut stop, SPACE_POLL) {
                        return Ok(());
                    }
                    if walsync_storage::check_space(&*store, config.min_free_bytes).is_ok() {
                        break;
                    }
                }
                tracing::info!("space freed on the store's disk: replication resumes");
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long replication waits before it tries an unavailable storage database again.
const STORAGE_RETRY: Duration = Duration::from_secs(1);

enum Restart {
    Stop,
    Again,
    /// Again, to apply a transaction that outgrew the memory budget in a staged writer: the
    /// rest of it need not be read first.
    Stage,
}

/// Sleeps for `wait` unless asked to stop first; whether it was.
fn wait_or_stop(
    handle: &tokio::runtime::Handle,
    stop: &mut watch::Receiver<bool>,
    wait: Duration,
) -> bool {
    handle.block_on(async {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    });
    *stop.borrow()
}

#[allow(clippy::too_many_arguments)]
fn session<S: BucketStore>(
    handle: &tokio::runtime::Handle,
    config: &ReplicatorConfig,
    store: &S,
    stream: SourceStream,
    applier: &mut Applier,
    stop: &mut watch::Receiver<bool>,
    progress: &watch::Sender<Progress>,
    commits: &mut u64,
    stage: &mut Option<walsync_types::Lsn>,
) -> Result<Restart> {
    let failed = std::sync::Mutex::new(None);
    let acker = stream.acker();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<Committed>();
        let syncer = std::thread::Builder::new()
            .name("walsync-fsync".into())
            .spawn_scoped(scope, || {
                sync_loop(store, rx, &acker, progress, &failed, config.lagging_after)
            })
            .map_err(StorageError::Io)?;
        let mut committer = Committer {
            tx: Some(tx),
            failed: &failed,
            commits,
            config,
            progress,
        };
        let out = apply_loop(handle, store, stream, applier, stop, &mut committer, stage);
        // Everything committed is made durable and acknowledged before the source stops, so
        // that its last report to PostgreSQL includes it.
        drop(committer.tx.take());
        let _ = syncer.join();
        let (out, stream) = out;
        if matches!(out, Ok(Restart::Stage)) {
            handle.block_on(stream.abandon());
        } else {
            handle.block_on(stream.stop());
        }
        if let Some(e) = failed.lock().ok().and_then(|mut f| f.take()) {
            return Err(ReplicatorError::Storage(e));
        }
        out
    })
}

/// One storage commit, visible and waiting to be made durable and acknowledged.
struct Committed {
    ack: Option<walsync_types::Lsn>,
    commit_time: Option<walsync_types::PgTimestamp>,
    txns: usize,
    bytes: u64,
    rows: usize,
    snapshot_rows: u64,
    staged: bool,
    skipped: u64,
}

/// Syncs the store after commits (one sync for all commits that queued meanwhile), then
/// acknowledges and reports them.
fn sync_loop<S: BucketStore>(
    store: &S,
    rx: std::sync::mpsc::Receiver<Committed>,
    acker: &walsync_source::Acker,
    progress: &watch::Sender<Progress>,
    failed: &std::sync::Mutex<Option<StorageError>>,
    lagging_after: Duration,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        if let Err(e) = store.sync() {
            tracing::error!(error = %e, "storage sync failed; nothing more is acknowledged");
            if let Ok(mut f) = failed.lock() {
                *f = Some(e);
            }
            return;
        }
        if let Some(lsn) = batch.iter().filter_map(|c| c.ack).max() {
            acker.ack(lsn);
        }
        let newest = batch.iter().filter_map(|c| c.commit_time).max();
        progress.send_modify(|p| {
            if let Some(t) = newest {
                p.lag_micros =
                    u64::try_from(walsync_types::PgTimestamp::now().0 - t.0).unwrap_or(0);
            }
            // A commit without a source time moved the position while idle: caught up.
            let lagging = newest.is_some() && p.lag_micros > lagging_after.as_micros() as u64;
            match p.state {
                State::Streaming if lagging => {
                    transition(p, State::Lagging);
                }
                State::Lagging if !lagging => {
                    transition(p, State::Streaming);
                }
                _ => {}
            }
            for c in &batch {
                p.storage_commits += 1;
                p.transactions += c.txns as u64;
                p.bytes += c.bytes;
                p.rows += c.rows as u64;
                p.snapshot_rows = c.snapshot_rows;
                p.staged_transactions += u64::from(c.staged);
                p.skipped_rows = p.skipped_rows.max(c.skipped);
            }
        });
    }
}

struct Committer<'a> {
    tx: Option<std::sync::mpsc::Sender<Committed>>,
    failed: &'a std::sync::Mutex<Option<StorageError>>,
    commits: &'a mut u64,
    config: &'a ReplicatorConfig,
    progress: &'a watch::Sender<Progress>,
}

impl Committer<'_> {
    fn commit<W: StoreWriter>(&mut self, writer: W, applier: &mut Applier) -> Result<()> {
        let staged = writer.is_staged();
        if let Some(e) = self.failed.lock().ok().and_then(|mut f| f.take()) {
            return Err(ReplicatorError::Storage(e));
        }
        let cp = writer.commit_deferred()?;
        *self.commits += 1;
        if self.config.fail_after_commits == Some(*self.commits) {
            return Err(ReplicatorError::Injected(cp.op_id));
        }
        let committed = Committed {
            ack: applier.ack_position(),
            commit_time: applier.pending_commit_time,
            txns: applier.pending_txns,
            bytes: applier.pending_bytes,
            rows: applier.pending_rows,
            snapshot_rows: applier.snapshot_rows,
            staged,
            skipped: applier.skipped,
        };
        if let Some(tx) = &self.tx {
            // The syncing thread only ends when this sender is dropped or a sync failed (seen
            // above, or at the next commit).
            let _ = tx.send(committed);
        }
        applier.committed();
        Ok(())
    }
}

/// Applies source batches until a stop, a restart or an error; hands the stream back so the
/// caller can stop it once everything committed is acknowledged.
fn apply_loop<S: BucketStore>(
    handle: &tokio::runtime::Handle,
    store: &S,
    mut stream: SourceStream,
    applier: &mut Applier,
    stop: &mut watch::Receiver<bool>,
    committer: &mut Committer<'_>,
    stage: &mut Option<walsync_types::Lsn>,
) -> (Result<Restart>, SourceStream) {
    let mut writer: Option<S::Writer<'_>> = None;
    let mut published = None;
    let out = loop {
        // Wait for the next batch (or a stop), unless a commit is pending and nothing is ready.
        let batch = match stream.try_next_batch() {
            Some(b) => Some(b),
            None => {
                // Nothing waiting: commit what is written (at a transaction boundary only).
                if !applier.in_transaction
                    && let Some(w) = writer.take()
                {
                    if let Err(e) = committer.commit(w, applier) {
                        break Err(e);
                    }
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
                // A stop request, or the stop handle dropped (nobody can ask any more).
                // Uncommitted writes are dropped: they were not acknowledged.
                if *stop.borrow() || stop.has_changed().is_err() {
                    break Ok(Restart::Stop);
                }
                // The source ended without being asked to and without an error: a bug in it,
                // not something a retry would fix.
                tracing::error!("the wal source ended unexpectedly");
                break Err(ReplicatorError::SourceEnded);
            }
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(events)) => events,
        };
        // Nothing is written on a nearly full disk: the session ends with what it committed
        // (uncommitted writes were not acknowledged, the slot sends them again).
        if let Err(e) = walsync_storage::check_space(store, committer.config.min_free_bytes) {
            break Err(e.into());
        }
        let out = apply_events(store, &mut writer, events, applier, committer, stage);
        // Published when the events change it (the syncer moves streaming to lagging and back).
        if published != Some(applier.state) {
            set_state(committer.progress, applier.state);
            published = Some(applier.state);
        }
        match out {
            Ok(None) => {}
            Ok(Some(restart)) => break Ok(restart),
            Err(e) => break Err(e),
        }
        let full = applier.pending_txns >= committer.config.max_commit_txns
            || applier.pending_rows >= committer.config.max_commit_rows;
        if full
            && !applier.in_transaction
            && let Some(w) = writer.take()
            && let Err(e) = committer.commit(w, applier)
        {
            break Err(e);
        }
    };
    drop(writer);
    (out, stream)
}

/// Applies one batch of events; `Some(Restart::Again)` when the source asked to start over (what
/// is not committed is forgotten; the source sends it again).
///
/// **Memory.** A source transaction is applied under the memory budget: a storage write
/// transaction that outgrows it while applying one becomes staged where it stands (see
/// [`StoreWriter::is_staged`]): it writes to the store in steps of about the budget and makes
/// everything visible whole at its commit, right after that transaction. One that cannot (the
/// store's compaction held it up) is dropped, the transaction is named in `stage`, and the
/// session starts over; met again, it gets a staged writer of its own
/// ([`BucketStore::staged_writer`]).
fn apply_events<'s, S: BucketStore>(
    store: &'s S,
    writer: &mut Option<S::Writer<'s>>,
    events: Vec<walsync_source::SourceEvent>,
    applier: &mut Applier,
    committer: &mut Committer<'_>,
    stage: &mut Option<walsync_types::Lsn>,
) -> Result<Option<Restart>> {
    let budget = committer.config.memory_budget;
    for event in events {
        let staged_begin = matches!(
            &event,
            walsync_source::SourceEvent::Begin { commit_lsn, .. } if Some(*commit_lsn) == *stage
        );
        // A re-copy is one transaction, of any size.
        let recopy_begin =
            applier.recopy && matches!(&event, walsync_source::SourceEvent::SnapshotBegin { .. });
        if staged_begin || recopy_begin {
            // Between transactions: what is written so far commits first.
            if let Some(w) = writer.take() {
                committer.commit(w, applier)?;
            }
            if staged_begin {
                tracing::info!(
                    budget_bytes = budget,
                    "a source transaction larger than the memory budget is staged in the store"
                );
            }
            *writer = Some(store.staged_writer(budget)?);
        }
        let w = match writer.as_mut() {
            Some(w) => w,
            None => {
                // Given its budget before any write, so that it notes its keys and can become
                // staged where it stands.
                let w = writer.insert(store.writer()?);
                w.set_budget(Some(budget));
                w
            }
        };
        // Held to the budget only within source transactions: a snapshot's batches are
        // bounded by the source, and cannot be applied again alone.
        w.set_budget(applier.in_transaction.then_some(budget));
        let staged_end = matches!(
            &event,
            walsync_source::SourceEvent::Commit { commit_lsn, .. } if Some(*commit_lsn) == *stage
        );
        let copying = matches!(&event, walsync_source::SourceEvent::SnapshotRows { .. });
        let change = matches!(&event, walsync_source::SourceEvent::Change(_));
        let place = applier.place();
        // A panic while applying a change of a source transaction (the rules' own part is
        // caught per row, see `Applier`): the writer is dropped (it holds no lock the panic
        // could poison: the panic stays inside), and the transaction is applied again without
        // that change, so one bad row cannot stop replication at every restart.
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| applier.apply(w, event)));
        let applied = match applied {
            Ok(applied) => applied,
            Err(panic) => {
                drop(writer.take());
                let what = panic_text(&panic);
                let Some(place) = place.filter(|_| change) else {
                    tracing::error!(panic = %what, "the replicator panicked");
                    return Err(ReplicatorError::Panicked(what));
                };
                tracing::error!(
                    panic = %what,
                    commit_lsn = %place.0,
                    index = place.1,
                    "the replicator panicked applying a change: applying its transaction again without it"
                );
                applier.skip.insert(place);
                return Ok(Some(Restart::Again));
            }
        };
        let next = match applied {
            Ok(next) => next,
            // A writer that could not become staged where it stood (compaction held the store).
            Err(ReplicatorError::Storage(StorageError::OverBudget { .. })) => {
                drop(writer.take());
                if applier.transaction.is_none() {
                    return Ok(Some(Restart::Again));
                }
                tracing::info!(
                    budget_bytes = budget,
                    "a source transaction outgrew the memory budget: applying it again, staged"
                );
                *stage = applier.transaction;
                return Ok(Some(Restart::Stage));
            }
            Err(e) => return Err(e),
        };
        if let Some(n) = committer.config.fail_after_snapshot_rows
            && copying
            && applier.snapshot_rows >= n
        {
            return Err(ReplicatorError::InjectedInSnapshot(applier.snapshot_rows));
        }
        let staged = !applier.in_transaction && writer.as_ref().is_some_and(|w| w.is_staged());
        match next {
            apply::Next::Continue if staged => {
                // The staged transaction is whole: it commits alone.
                if staged_end {
                    *stage = None;
                } else {
                    tracing::info!(
                        budget_bytes = budget,
                        "a source transaction outgrew the memory budget and was staged in the store"
                    );
                }
                if let Some(w) = writer.take() {
                    committer.commit(w, applier)?;
                }
            }
            // Between source transactions, a writer holding half its budget commits (checked
            // per event: one batch of events can hold many transactions).
            apply::Next::Continue
                if !applier.in_transaction
                    && writer
                        .as_ref()
                        .is_some_and(|w| w.held_bytes() >= budget / 2) =>
            {
                if let Some(w) = writer.take() {
                    committer.commit(w, applier)?;
                }
            }
            apply::Next::Continue => {}
            apply::Next::CommitNow => {
                if let Some(w) = writer.take() {
                    committer.commit(w, applier)?;
                }
            }
            apply::Next::Restart => {
                drop(writer.take());
                return Ok(Some(Restart::Again));
            }
        }
    }
    Ok(None)
}

/// The message of a caught panic.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
