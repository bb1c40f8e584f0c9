//! The replicator's own work without PostgreSQL: decoded row changes (shaped like workload b of
//! the replicator benchmark) applied through the rules into the embedded store, with the
//! replicator's commit policy. It isolates what walsync spends per row from the walsender's
//! decoding, and reports CPU time per row, the figure that decides how close the whole
//! replicator can come to `pg_recvlogical` on a machine where the walsender holds one core.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use walsync_replicator::{Applier, DEFAULT_MAX_COMMIT_ROWS, DEFAULT_MAX_COMMIT_TXNS};
use walsync_rules::SyncRules;
use walsync_source::codec::ReplicaIdentity;
use walsync_source::{Change, Datum, Row, SourceEvent, Table, TableColumn};
use walsync_storage::{BucketStore, KvStore, StoreWriter};
use walsync_types::{Lsn, Value};

#[derive(Debug, Args)]
pub(crate) struct ApplyArgs {
    /// Rows in the store before the measured run (the replicator benchmark's workload b starts
    /// on a store holding workload a's rows).
    #[arg(long, default_value_t = 1_000_000)]
    prefill: u64,
    /// Transactions of the measured run.
    #[arg(long, default_value_t = 10_000)]
    txns: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 100)]
    rows_per_txn: u64,
}

fn table() -> Arc<Table> {
    let col = |name: &str, type_oid: u32, is_key: bool| TableColumn {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        is_key,
    };
    Arc::new(Table {
        oid: 16_400,
        schema: "public".into(),
        name: "assessment_responses".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", 20, true),
            col("assessment_id", 20, false),
            col("project_id", 20, false),
            col("question_id", 25, false),
            col("question_text", 25, false),
            col("answer", 25, false),
            col("notes", 25, false),
            col("priority", 25, false),
            col("answered_by", 20, false),
            col("answered_at", 1184, false),
            col("created_at", 1184, false),
            col("updated_at", 1184, false),
            col("_version", 20, false),
        ],
    })
}

/// The row the benchmark's `insert_rows` writes for `i`.
fn row(i: i64) -> Row {
    let text = |s: String| Datum::Value(Value::Text(s));
    let ts = || text("2026-11-26 10:00:00.123456+00".into());
    vec![
        Datum::Value(Value::Int(i)),
        Datum::Value(Value::Int(i / 40)),
        Datum::Value(Value::Int(i / 400)),
        text(format!("q-{:05}", i % 97)),
        text(format!(
            "How does the organisation currently manage change across teams and tools? ({i})"
        )),
        text(
            "We run a fortnightly review with the platform team and track outcomes in a shared log."
                .into(),
        ),
        text("follow up in next session".into()),
        text(["low", "medium", "high"][(i % 3) as usize].into()),
        Datum::Value(Value::Int(i % 50)),
        ts(),
        ts(),
        ts(),
        Datum::Value(Value::Int(1)),
    ]
}

/// utime + stime from a /proc stat file (clock ticks of 10 ms).
fn cpu_time_of(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time of the whole process and of this thread (the one applying).
/// Bytes written to the machine's block devices so far (sectors written, /proc/diskstats).
fn written() -> u64 {
    std::fs::read_to_string("/proc/diskstats")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Whole disks only (vda, sda, nvme0n1), not partitions.
            let name = *f.get(2)?;
            let disk = (name.starts_with("vd") || name.starts_with("sd")) && name.len() == 3
                || name.starts_with("nvme") && !name.contains('p');
            disk.then(|| f.get(9)?.parse::<u64>().ok())?
        })
        .sum::<u64>()
        * 512
}

/// Time the applying thread spent in storage commits (waiting for the journal included).
static COMMIT_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn cpu_time() -> (Duration, Duration) {
    (
        cpu_time_of("/proc/self/stat"),
        cpu_time_of("/proc/thread-self/stat"),
    )
}

/// Applies `txns` transactions of `per_txn` rows starting at id `first`, committing like the
/// replicator does: commits become visible at once and a second thread makes them durable.
fn apply(
    store: &KvStore,
    applier: &mut Applier,
    table: &Arc<Table>,
    first: i64,
    txns: u64,
    per_txn: u64,
    lsn: &mut u64,
) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let syncer = scope.spawn(move || -> anyhow::Result<()> {
            while rx.recv().is_ok() {
                rx.try_iter().for_each(drop);
                store.sync()?;
            }
            Ok(())
        });
        apply_commits(store, applier, table, first, txns, per_txn, lsn, &tx)?;
        drop(tx);
        syncer
            .join()
            .map_err(|_| anyhow::anyhow!("sync thread panicked"))??;
        store.sync()?;
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn apply_commits(
    store: &KvStore,
    applier: &mut Applier,
    table: &Arc<Table>,
    first: i64,
    txns: u64,
    per_txn: u64,
    lsn: &mut u64,
    synced: &std::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let mut writer = None;
    let (mut txns_in, mut rows_in) = (0usize, 0usize);
    let mut id = first;
    for _ in 0..txns {
        let events = std::iter::once(SourceEvent::Begin {
            xid: 1,
            commit_lsn: Lsn(*lsn + 1),
            commit_time: Default::default(),
        })
        .chain((0..per_txn).map(|_| {
            id += 1;
            SourceEvent::Change(Change::Insert {
                table: table.clone(),
                new: row(id),
            })
        }))
        .chain(std::iter::once(SourceEvent::Commit {
            xid: 1,
            commit_lsn: Lsn(*lsn + 1),
            end_lsn: Lsn(*lsn + 2),
            commit_time: Default::default(),
            bytes: 0,
        }));
        for event in events {
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(store.writer()?),
            };
            applier.apply_event(w, event)?;
        }
        *lsn += 2;
        txns_in += 1;
        rows_in += per_txn as usize;
        if txns_in >= DEFAULT_MAX_COMMIT_TXNS || rows_in >= DEFAULT_MAX_COMMIT_ROWS {
            if let Some(w) = writer.take() {
                let t = Instant::now();
                w.commit_deferred()?;
                synced.send(())?;
                COMMIT_NS.fetch_add(
                    t.elapsed().as_nanos() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            (txns_in, rows_in) = (0, 0);
        }
    }
    if let Some(w) = writer.take() {
        let t = Instant::now();
        w.commit_deferred()?;
        synced.send(())?;
        COMMIT_NS.fetch_add(
            t.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    Ok(())
}

pub(crate) fn run(args: ApplyArgs) -> anyhow::Result<()> {
    let rules = Arc::new(SyncRules::from_yaml(super::replicator::RULES)?);
    let table = table();
    let dir = tempfile::Builder::new()
        .prefix("walsync-bench-")
        .tempdir()?;
    let store = KvStore::open(dir.path())?;
    let mut applier = Applier::new(rules);
    let mut lsn = 0x1000;
    eprintln!("prefill: {} rows", args.prefill);
    apply(
        &store,
        &mut applier,
        &table,
        0,
        args.prefill.div_ceil(1_000),
        1_000,
        &mut lsn,
    )?;
    let rows = args.txns * args.rows_per_txn;
    eprintln!("measuring: {rows} rows");
    COMMIT_NS.store(0, std::sync::atomic::Ordering::Relaxed);
    let (t, cpu, w0) = (Instant::now(), cpu_time(), written());
    apply(
        &store,
        &mut applier,
        &table,
        10_000_000,
        args.txns,
        args.rows_per_txn,
        &mut lsn,
    )?;
    let (wall, (cpu_end, own_end)) = (t.elapsed(), cpu_time());
    let (process, own) = (cpu_end - cpu.0, own_end - cpu.1);
    let (written, commits) = (
        written() - w0,
        Duration::from_nanos(COMMIT_NS.load(std::sync::atomic::Ordering::Relaxed)),
    );
    let per_row = |d: Duration| d.as_secs_f64() * 1e6 / rows as f64;
    println!("Machine: {}", super::machine_facts());
    println!(
        "| rows | seconds | rows/s | process CPU µs/row | applying thread CPU µs/row | applying thread in commits µs/row | disk bytes written per row |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {rows} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
        wall.as_secs_f64(),
        rows as f64 / wall.as_secs_f64(),
        per_row(process),
        per_row(own),
        per_row(commits),
        written / rows,
    );
    Ok(())
}
