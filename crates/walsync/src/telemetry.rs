//! Metrics: the process's Prometheus recorder (`metrics-exporter-prometheus`, rendered at the
//! API's `GET /metrics`), replication progress as counters, and a monitor that reads the slot's
//! health from PostgreSQL and the store's size every `metrics.poll_seconds` (and whether
//! PostgreSQL answers, which `/health/ready` reports).
//!
//! Names are `walsync_<area>_<what>_<unit>`, each described once here or in
//! `walsync_server::metrics`; labels come from fixed sets only.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use walsync_replicator::Progress;
use walsync_source::PgConfig;
use walsync_storage::{BucketStore, KvStore, StoreRead};
use walsync_sync::SyncCore;

pub const ROWS: &str = "walsync_replication_rows_total";
pub const BYTES: &str = "walsync_replication_bytes_total";
pub const STATE: &str = "walsync_replication_state";
pub const LEADING: &str = "walsync_replicator_leading";
pub const CHECKPOINT_LATENCY: &str = "walsync_replication_checkpoint_latency_seconds";
pub const SNAPSHOT_ESTIMATE: &str = "walsync_snapshot_rows_estimated";
pub const STORE_OPS: &str = "walsync_store_ops";
pub const STORE_BUCKETS: &str = "walsync_store_buckets";
pub const STORE_ROWS: &str = "walsync_store_rows";
pub const COMPACTION_RECLAIMED: &str = "walsync_compaction_reclaimed_bytes_total";
pub const TRANSACTIONS: &str = "walsync_replication_transactions_total";
pub const STORAGE_COMMITS: &str = "walsync_replication_storage_commits_total";
pub const SNAPSHOT_ROWS: &str = "walsync_snapshot_rows_total";
pub const LAG_SECONDS: &str = "walsync_replication_lag_seconds";
pub const SLOT_LAG_BYTES: &str = "walsync_slot_lag_bytes";
pub const SLOT_RETAINED_BYTES: &str = "walsync_slot_retained_wal_bytes";
pub const SLOT_SAFE_BYTES: &str = "walsync_slot_safe_wal_size_bytes";
pub const SLOT_WAL_STATUS: &str = "walsync_slot_wal_status";
pub const SLOT_ACTIVE: &str = "walsync_slot_active";
pub const SOURCE_REACHABLE: &str = "walsync_source_reachable";
pub const STORE_SIZE: &str = "walsync_store_size_bytes";
pub const CONNECTIONS: &str = "walsync_sync_connections";
pub const CHECKPOINTS: &str = "walsync_sync_checkpoints_total";
pub const WAKEUPS: &str = "walsync_sync_wakeups_total";
pub const COMPACTION_RUNS: &str = "walsync_compaction_runs_total";
pub const COMPACTION_FAILURES: &str = "walsync_compaction_failures_total";
pub const COMPACTION_OPS: &str = "walsync_compaction_ops_total";
pub const COMPACTION_PRUNED: &str = "walsync_compaction_pruned_total";
pub const COMPACTION_SECONDS: &str = "walsync_compaction_seconds";

/// `wal_status` values of `pg_replication_slots`: the label set of [`SLOT_WAL_STATUS`].
const WAL_STATUSES: &[&str] = &["reserved", "extended", "unreserved", "lost"];

/// What `walsync status` shows: the monitor's and the replicator's last readings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    /// What this process does (`all`, `replicator`, `api`).
    #[serde(default)]
    pub role: String,
    /// Whether this process replicates into the store now (an API node or a standby does not:
    /// the slot, the replication and the snapshot below are then the replicator's business).
    #[serde(default)]
    pub replicating: bool,
    /// Unix seconds of the monitor's last reading (0: none yet).
    pub checked_at: u64,
    pub source_reachable: bool,
    pub slot: Option<SlotStatus>,
    pub replication: ReplicationStatus,
    pub snapshot: SnapshotStatus,
    pub store_size_bytes: u64,
    #[serde(default)]
    pub store: StoreStatus,
    /// Streams the sync core follows.
    pub streams: usize,
    #[serde(default)]
    pub uploads: walsync_server::metrics::UploadTotals,
    /// The last warnings and errors logged, newest last.
    #[serde(default)]
    pub recent_problems: Vec<Problem>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoreStatus {
    pub ops: u64,
    pub buckets: u64,
    /// Approximate.
    pub rows: u64,
}

/// A warning or error line, as logged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// Unix seconds.
    pub at: u64,
    pub level: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SlotStatus {
    pub name: String,
    pub active: bool,
    pub wal_status: Option<String>,
    pub lag_bytes: u64,
    pub retained_wal_bytes: u64,
    /// `None`: the server sets no `max_slot_wal_keep_size` (the slot may retain any amount).
    pub safe_wal_size_bytes: Option<i64>,
    /// The WAL guard's budget (`wal_guard.budget_bytes`), if one is set.
    #[serde(default)]
    pub wal_budget_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReplicationStatus {
    /// `connecting`, `snapshotting`, `rebuilding`, `streaming`, `lagging`, `reconnecting`,
    /// `slot_lost` or `stopped`.
    #[serde(default)]
    pub state: String,
    pub rows: u64,
    pub transactions: u64,
    #[serde(default)]
    pub bytes: u64,
    pub lag_seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SnapshotStatus {
    pub complete: bool,
    pub rows_copied: u64,
    /// PostgreSQL's estimate of the rows to copy (`pg_class.reltuples` of the rules' tables),
    /// while a snapshot runs.
    pub rows_estimated: Option<u64>,
}

/// The status the monitor and the replicator's progress keep up to date.
pub type SharedStatus = Arc<std::sync::RwLock<Status>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut Status)) {
    let mut s = status.write().unwrap_or_else(|p| p.into_inner());
    f(&mut s);
}

/// The `[metrics]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Seconds between reads of the slot's health and the store's size.
    pub poll_seconds: u64,
    /// Streaming counts as lagging (state `lagging`) while transactions take longer than this
    /// from their source commit to durable in the store.
    pub lagging_seconds: u64,
}

impl Default for MetricsSection {
    fn default() -> MetricsSection {
        MetricsSection {
            poll_seconds: 10,
            lagging_seconds: 30,
        }
    }
}

/// Installs the process's recorder (once; later calls get the same handle) and describes every
/// metric.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = match PrometheusBuilder::new().install_recorder() {
                Ok(h) => h,
                Err(e) => {
                    // Another recorder is installed (an embedding program's): ours still renders
                    // what it is given, which is nothing.
                    tracing::warn!(error = %e, "could not install the metrics recorder");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            describe();
            handle
        })
        .clone()
}

fn describe() {
    walsync_server::metrics::describe();
    crate::wal_guard::describe();
    describe_counter!(ROWS, "row changes replicated and durable in the store");
    describe_counter!(
        BYTES,
        metrics::Unit::Bytes,
        "replication bytes (pgoutput messages as received) of the transactions replicated"
    );
    describe_gauge!(
        STATE,
        "1 for the replication's state (connecting, snapshotting, rebuilding, streaming, lagging, reconnecting, slot_lost, stopped), 0 for the others"
    );
    metrics::describe_histogram!(
        CHECKPOINT_LATENCY,
        metrics::Unit::Seconds,
        "source commit to the checkpoint that holds it (durable in the store, served to clients), per storage sync"
    );
    describe_gauge!(
        SNAPSHOT_ESTIMATE,
        "PostgreSQL's estimate of the rows a running snapshot copies (0 when none runs)"
    );
    describe_gauge!(STORE_OPS, "ops kept in all buckets");
    describe_gauge!(STORE_BUCKETS, "buckets in the store");
    describe_gauge!(
        STORE_ROWS,
        "source rows in the store (approximate: deleted rows count until the engine compacts)"
    );
    describe_counter!(
        COMPACTION_RECLAIMED,
        metrics::Unit::Bytes,
        "bytes by which compaction shrank the op log (freed on disk as the engine compacts its files)"
    );
    describe_counter!(
        TRANSACTIONS,
        "source transactions replicated and durable in the store"
    );
    describe_counter!(
        STORAGE_COMMITS,
        "storage commits (each a group of transactions)"
    );
    describe_counter!(
        SNAPSHOT_ROWS,
        "rows copied by initial snapshots and rebuilds"
    );
    describe_gauge!(
        LAG_SECONDS,
        metrics::Unit::Seconds,
        "source commit to durable in the store, of the newest transaction replicated"
    );
    describe_gauge!(
        SLOT_LAG_BYTES,
        metrics::Unit::Bytes,
        "the server's WAL position minus the slot's confirmed flush position"
    );
    describe_gauge!(
        SLOT_RETAINED_BYTES,
        metrics::Unit::Bytes,
        "WAL the slot keeps on the server (its position minus restart_lsn)"
    );
    describe_gauge!(
        SLOT_SAFE_BYTES,
        metrics::Unit::Bytes,
        "WAL that can still be written before the slot is in danger of being lost (max_slot_wal_keep_size set)"
    );
    describe_gauge!(
        SLOT_WAL_STATUS,
        "1 for the slot's wal_status (reserved, extended, unreserved, lost), 0 for the others"
    );
    describe_gauge!(SLOT_ACTIVE, "1 while a walsender streams the slot");
    describe_gauge!(
        LEADING,
        "1 while this process replicates into the store (holds its write lock), 0 for an API node or a standby"
    );
    describe_gauge!(
        SOURCE_REACHABLE,
        "1 when the last health read reached PostgreSQL"
    );
    describe_gauge!(STORE_SIZE, metrics::Unit::Bytes, "the store's size on disk");
    describe_gauge!(CONNECTIONS, "sync streams registered with the hub");
    describe_counter!(CHECKPOINTS, "checkpoints the hub published");
    describe_counter!(WAKEUPS, "stream wake-ups by the hub");
    describe_counter!(COMPACTION_RUNS, "compaction passes completed");
    describe_counter!(COMPACTION_FAILURES, "compaction passes that failed");
    describe_counter!(
        COMPACTION_OPS,
        "ops compaction rewrote, by kind (moved: superseded PUTs become MOVE; cleared: leading runs become one CLEAR)"
    );
    describe_counter!(
        COMPACTION_PRUNED,
        "history entries pruned, by what (changes: the change log; lookups: superseded parameter lookups)"
    );
    metrics::describe_histogram!(
        COMPACTION_SECONDS,
        metrics::Unit::Seconds,
        "the duration of a compaction pass, pauses included"
    );
    // Counters exist from the start at 0 (a rate or an alert over them reads 0, not nothing).
    for name in [
        ROWS,
        BYTES,
        TRANSACTIONS,
        STORAGE_COMMITS,
        COMPACTION_RUNS,
        COMPACTION_FAILURES,
        COMPACTION_RECLAIMED,
    ] {
        counter!(name).increment(0);
    }
    for kind in ["moved", "cleared"] {
        counter!(COMPACTION_OPS, "kind" => kind).increment(0);
    }
    for what in ["changes", "lookups"] {
        counter!(COMPACTION_PRUNED, "what" => what).increment(0);
    }
}

/// Counts replication progress as the replicator reports it.
pub(crate) fn record_progress(status: &SharedStatus, before: &Progress, now: &Progress) {
    update(status, |s| {
        s.replication = ReplicationStatus {
            state: now.state.as_str().to_owned(),
            rows: now.rows,
            transactions: now.transactions,
            bytes: now.bytes,
            lag_seconds: now.lag_micros as f64 / 1e6,
        };
        s.snapshot.rows_copied = now.snapshot_rows;
    });
    if before.state != now.state {
        record_state(now.state);
    }
    if now.storage_commits > before.storage_commits && now.transactions > before.transactions {
        metrics::histogram!(CHECKPOINT_LATENCY).record(now.lag_micros as f64 / 1e6);
    }
    counter!(BYTES).increment(now.bytes.saturating_sub(before.bytes));
    counter!(ROWS).increment(now.rows.saturating_sub(before.rows));
    counter!(TRANSACTIONS).increment(now.transactions.saturating_sub(before.transactions));
    counter!(STORAGE_COMMITS).increment(now.storage_commits.saturating_sub(before.storage_commits));
    counter!(SNAPSHOT_ROWS).absolute(now.snapshot_rows);
    gauge!(LAG_SECONDS).set(now.lag_micros as f64 / 1e6);
}

/// Whether this process replicates into the store. Only such a process reports replication's
/// state: an API node or a standby would otherwise say "connecting" forever.
pub(crate) fn record_leading(on: bool) {
    gauge!(LEADING).set(if on { 1.0 } else { 0.0 });
}

/// Sets the state gauges (at start, and at each change).
pub(crate) fn record_state(now: walsync_replicator::State) {
    for state in walsync_replicator::State::ALL {
        let on = state == now;
        gauge!(STATE, "state" => state.as_str()).set(if on { 1.0 } else { 0.0 });
    }
}

/// Counts one compaction pass.
pub(crate) fn record_compaction(pass: &crate::maintenance::Pass, took: Duration) {
    counter!(COMPACTION_RUNS).increment(1);
    counter!(COMPACTION_OPS, "kind" => "moved").increment(pass.compacted.moved);
    counter!(COMPACTION_OPS, "kind" => "cleared").increment(pass.compacted.cleared);
    counter!(COMPACTION_PRUNED, "what" => "changes").increment(pass.pruned_changes);
    counter!(COMPACTION_PRUNED, "what" => "lookups").increment(pass.pruned_lookups);
    counter!(COMPACTION_RECLAIMED).increment(pass.compacted.reclaimed_bytes);
    metrics::histogram!(COMPACTION_SECONDS).record(took.as_secs_f64());
}

/// Reads the slot's health, the store's size and the hub's counters every `every`, until
/// `stop`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn monitor(
    guard: crate::wal_guard::WalGuardSection,
    status: SharedStatus,
    tables: Vec<(String, String)>,
    reachable: Arc<std::sync::atomic::AtomicBool>,
    pg: PgConfig,
    slot: String,
    store: Arc<KvStore>,
    core: Arc<SyncCore<KvStore>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut warned = false;
    loop {
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            client = pg.connect().await.ok();
        }
        // One read of the store's checkpoint per pass serves the snapshot state and the guard.
        let cp = store.checkpoint().ok();
        let complete = cp.as_ref().is_some_and(|cp| cp.snapshot_complete);
        let owned = cp
            .as_ref()
            .is_some_and(|cp| cp.slot_owned.as_deref() == Some(slot.as_str()));
        let reached = match &client {
            Some(c) => match read_slot(c, &slot).await {
                Ok(slot_status) => {
                    if let Some(s) = &slot_status {
                        crate::wal_guard::check(
                            &guard,
                            c,
                            &slot,
                            s.retained_wal_bytes,
                            owned,
                            &mut warned,
                        )
                        .await;
                    }
                    let estimate = if complete {
                        None
                    } else {
                        estimate_rows(c, &tables).await.ok()
                    };
                    gauge!(SNAPSHOT_ESTIMATE).set(estimate.unwrap_or(0) as f64);
                    update(&status, |s| {
                        s.slot = slot_status.map(|slot| SlotStatus {
                            wal_budget_bytes: guard.budget_bytes,
                            ..slot
                        });
                        s.snapshot.rows_estimated = estimate;
                    });
                    true
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not read the slot's health");
                    client = None;
                    false
                }
            },
            None => false,
        };
        gauge!(SOURCE_REACHABLE).set(if reached { 1.0 } else { 0.0 });
        reachable.store(reached, std::sync::atomic::Ordering::Relaxed);
        // The store's size is read once a pass, for the gauge and the status.
        let size = match store.size_on_disk() {
            Ok(bytes) => {
                gauge!(STORE_SIZE).set(bytes as f64);
                Some(bytes)
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not read the store's size");
                None
            }
        };
        let counts = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.counts()).await
        };
        let counts = match counts {
            Ok(Ok(c)) => {
                gauge!(STORE_OPS).set(c.ops as f64);
                gauge!(STORE_BUCKETS).set(c.buckets as f64);
                gauge!(STORE_ROWS).set(c.rows as f64);
                Some(c)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "could not count the store's ops");
                None
            }
            Err(_) => None,
        };
        let stats = core.stats();
        update(&status, |s| {
            if let Some(c) = counts {
                s.store = StoreStatus {
                    ops: c.ops,
                    buckets: c.buckets,
                    rows: c.rows,
                };
            }
            s.uploads = walsync_server::metrics::upload_totals();
            s.recent_problems = recent_problems();
            s.version = env!("CARGO_PKG_VERSION").to_owned();
            s.checked_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            s.source_reachable = reached;
            s.snapshot.complete = complete;
            s.store_size_bytes = size.unwrap_or(s.store_size_bytes);
            s.streams = stats.connections;
        });
        gauge!(CONNECTIONS).set(stats.connections as f64);
        counter!(CHECKPOINTS).absolute(stats.checkpoints);
        counter!(WAKEUPS).absolute(stats.wakeups);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            r = stop.wait_for(|s| *s) => { let _ = r; break; }
        }
    }
}

/// PostgreSQL's estimate of the rows in `tables` (for a snapshot's progress).
async fn estimate_rows(
    client: &tokio_postgres::Client,
    tables: &[(String, String)],
) -> Result<u64, tokio_postgres::Error> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, t)| (s.as_str(), t.as_str())).unzip();
    let row = client
        .query_one(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::float8 \
             FROM unnest($1::text[], $2::text[]) AS t(s, n) \
             JOIN pg_namespace ns ON ns.nspname = t.s \
             JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t.n",
            &[&schemas, &names],
        )
        .await?;
    Ok(row.get::<_, f64>(0) as u64)
}

async fn read_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotStatus>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8, \
                    (pg_current_wal_lsn() - restart_lsn)::float8, \
                    wal_status::text, safe_wal_size::float8, active \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else {
        // No slot (yet, or lost and dropped): nothing is retained for walsync.
        gauge!(SLOT_ACTIVE).set(0.0);
        return Ok(None);
    };
    let lag: Option<f64> = row.get(0);
    let retained: Option<f64> = row.get(1);
    let status: Option<String> = row.get(2);
    let safe: Option<f64> = row.get(3);
    let active: bool = row.get(4);
    gauge!(SLOT_LAG_BYTES).set(lag.unwrap_or(0.0).max(0.0));
    gauge!(SLOT_RETAINED_BYTES).set(retained.unwrap_or(0.0).max(0.0));
    if let Some(safe) = safe {
        gauge!(SLOT_SAFE_BYTES).set(safe);
    }
    for s in WAL_STATUSES {
        let on = status.as_deref() == Some(*s);
        gauge!(SLOT_WAL_STATUS, "status" => *s).set(if on { 1.0 } else { 0.0 });
    }
    gauge!(SLOT_ACTIVE).set(if active { 1.0 } else { 0.0 });
    Ok(Some(SlotStatus {
        name: slot.to_owned(),
        active,
        wal_status: status,
        lag_bytes: lag.unwrap_or(0.0).max(0.0) as u64,
        retained_wal_bytes: retained.unwrap_or(0.0).max(0.0) as u64,
        safe_wal_size_bytes: safe.map(|s| s as i64),
        wal_budget_bytes: None,
    }))
}

/// Warnings and errors kept for `walsync status`.
const PROBLEMS_KEPT: usize = 10;

fn problems() -> &'static std::sync::Mutex<std::collections::VecDeque<Problem>> {
    static PROBLEMS: OnceLock<std::sync::Mutex<std::collections::VecDeque<Problem>>> =
        OnceLock::new();
    PROBLEMS.get_or_init(Default::default)
}

/// The last warnings and errors logged (by a process that installed [`ProblemLayer`]).
pub fn recent_problems() -> Vec<Problem> {
    let kept = problems().lock().unwrap_or_else(|p| p.into_inner());
    kept.iter().cloned().collect()
}

/// A tracing layer that keeps the last warning and error lines (message and fields: by the
/// house rule they hold no row values) for `walsync status`.
#[derive(Debug, Default)]
pub struct ProblemLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ProblemLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut text = ProblemText::default();
        event.record(&mut text);
        let problem = Problem {
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            level: level.as_str().to_lowercase(),
            message: text.0,
        };
        let mut kept = problems().lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == PROBLEMS_KEPT {
            kept.pop_front();
        }
        kept.push_back(problem);
    }
}

/// An event's message, then its fields as `name=value`.
#[derive(Default)]
struct ProblemText(String);

impl tracing::field::Visit for ProblemText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}{fields}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = format!("{value}{}", self.0);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}
