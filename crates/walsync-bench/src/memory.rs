//! Memory of the replicator on one huge transaction, on a re-copy of the table it filled after
//! a lost slot (1 % of its rows changed meanwhile) and on a TRUNCATE of it: the process's peak
//! resident memory over each (VmHWM, reset before each step), beside its rate (and for the
//! re-copy, the ops it emitted: about one per changed row). A storage write transaction larger than `storage.memory_budget_mib` is staged in the
//! store in bounded steps, so the peak should not grow with the transaction.
//! `WALSYNC_BENCH_RSS=1` prints the resident memory every half second, to see where it grows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use walsync_rules::SyncRules;
use walsync_storage::{KvStore, StoreRead};
use walsync_testkit::{Cluster, ClusterOptions};

use super::snapshot::{RULES, process_memory as status};
use super::source::{Key, insert_rows, schema};
use super::summary::Summary;

#[derive(Debug, Args)]
pub(crate) struct MemoryArgs {
    /// Rows of the one transaction.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// The primary key (`bigint`, `uuid4`, `uuid7`), as for the replication workloads.
    #[arg(long, value_enum, default_value_t = Key::Uuid4)]
    key: Key,
    /// Bytes of one storage write transaction before it is staged, in MiB.
    #[arg(long, default_value_t = walsync_replicator::DEFAULT_MEMORY_BUDGET >> 20)]
    budget_mib: usize,
}

/// One step, its statement run by `sql` until the replicator made it durable: its name, time,
/// the resident memory before and the peak during it.
async fn measure(
    name: &str,
    sql: &tokio_postgres::Client,
    r: &mut super::replicator::Running,
    statement: &str,
) -> anyhow::Result<(String, Duration, u64, u64, Option<u64>)> {
    let txns = r.progress.borrow().transactions;
    eprintln!("{name}");
    reset_peak();
    let before = status("VmRSS:");
    let t = Instant::now();
    sql.batch_execute(statement).await?;
    while r.progress.borrow().transactions <= txns {
        tokio::time::timeout(Duration::from_secs(3600), r.progress.changed()).await??;
    }
    Ok((name.to_owned(), t.elapsed(), before, status("VmHWM:"), None))
}

/// Resets the peak resident memory to the current (Linux: `clear_refs` 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(crate) fn run(args: MemoryArgs) -> anyhow::Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = Cluster::start(ClusterOptions::default())?;
    let rules = Arc::new(SyncRules::from_yaml(RULES)?);
    let budget = args.budget_mib << 20;
    if std::env::var_os("WALSYNC_BENCH_RSS").is_some() {
        std::thread::spawn(|| {
            loop {
                eprintln!("rss {} MiB", status("VmRSS:") >> 20);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
    }
    let steps = rt.block_on(async {
        let db = cluster.fresh_database().await?;
        let sql = db.connect().await?;
        sql.batch_execute(&schema(args.key, false)).await?;
        let dir = tempfile::Builder::new()
            .prefix("walsync-bench-")
            .tempdir()?;
        let store = Arc::new(KvStore::open(dir.path())?);
        let start = || {
            super::replicator::start_with(&db.url, "bench_memory", &rules, &store, |c| {
                c.memory_budget = budget;
            })
        };
        let mut r = start()?;
        while !store.checkpoint()?.snapshot_complete {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut steps = Vec::new();
        let insert = format!("one transaction of {} rows", args.rows);
        let statement = insert_rows("1", &args.rows.to_string(), args.key, false);
        steps.push(measure(&insert, &sql, &mut r, &statement).await?);
        // The slot is lost while walsync is stopped and 1 % of the rows change meanwhile: the
        // tables are copied anew and compared with the store.
        super::replicator::finish(r).await?;
        sql.execute("SELECT pg_drop_replication_slot('bench_memory')", &[])
            .await?;
        let changed = sql
            .execute(
                "UPDATE assessment_responses SET answer = 'changed while the slot was gone' \
                 WHERE answered_by = 7 AND (assessment_id % 2) = 0",
                &[],
            )
            .await?;
        let at = store.checkpoint()?.op_id;
        let name = format!(
            "re-copy of the {} rows after a lost slot, {changed} changed",
            args.rows
        );
        eprintln!("{name}");
        reset_peak();
        let before = status("VmRSS:");
        let t = Instant::now();
        r = start()?;
        while r.progress.borrow().snapshot_rows < args.rows {
            tokio::time::timeout(Duration::from_secs(3600), r.progress.changed()).await??;
        }
        let elapsed = t.elapsed();
        let ops = store.checkpoint()?.op_id - at;
        steps.push((name, elapsed, before, status("VmHWM:"), Some(ops)));
        let truncate = format!("TRUNCATE of the {} rows", args.rows);
        steps.push(measure(&truncate, &sql, &mut r, "TRUNCATE assessment_responses").await?);
        super::replicator::finish(r).await?;
        anyhow::Ok(steps)
    })?;
    println!(
        "Memory of one huge transaction and of a TRUNCATE (process VmRSS before, VmHWM during)\n"
    );
    println!(
        "machine: {}; budget per storage write transaction: {} MiB\n",
        super::machine_facts(),
        args.budget_mib
    );
    println!(
        "| step | rows/s (from the statement or the start to durable) | rss before | peak during | peak − before | ops emitted |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut summary = Summary::default();
    for (name, t, before, peak, ops) in steps {
        summary.add(
            format!("memory: {name} ({:?} keys), peak", args.key),
            format!("{} MiB", peak >> 20),
            "",
            None,
        );
        println!(
            "| {name} | {:.0} | {} MiB | {} MiB | {} MiB | {} |",
            args.rows as f64 / t.as_secs_f64(),
            before >> 20,
            peak >> 20,
            peak.saturating_sub(before) >> 20,
            ops.map_or("".to_owned(), |o| o.to_string())
        );
    }
    Ok(summary)
}
