//! The initial snapshot through the replicator: rows per second and the process's peak memory,
//! to show that memory does not grow with the table (rows are copied in bounded batches, one
//! storage commit each).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use walsync_rules::SyncRules;
use walsync_storage::{BucketStore, EmbeddedStore, StoreRead};
use walsync_testkit::{Cluster, ClusterOptions};

use super::source::{Key, insert_rows, schema};

#[derive(Debug, Args)]
pub(crate) struct SnapshotArgs {
    /// Table sizes to copy, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000u64, 3_000_000])]
    rows: Vec<u64>,
    /// The primary key (`bigint`, `uuid4`, `uuid7`), as for the replication workloads.
    #[arg(long, value_enum, default_value_t = Key::Bigint)]
    key: Key,
}

/// One bucket per project of the benchmark's `assessment_responses`.
pub(super) const RULES: &str = "
bucket_definitions:
  projects:
    parameters: SELECT request.jwt() ->> 'project' AS project_id
    data:
      - SELECT * FROM assessment_responses WHERE project_id = bucket.project_id
";

/// A memory figure of this process from `/proc/self/status` (`VmHWM:`, `VmRSS:`), in bytes.
pub(super) fn process_memory(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Peak resident memory of this process so far (VmHWM), in bytes.
fn peak_rss() -> u64 {
    process_memory("VmHWM:")
}

pub(crate) fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = Cluster::start(ClusterOptions::default())?;
    let rules = Arc::new(SyncRules::from_yaml(RULES)?);
    let mut results = Vec::new();
    let baseline = peak_rss();
    for n in args.rows {
        let (elapsed, rss, bytes) = rt.block_on(async {
            let db = cluster.fresh_database().await?;
            let sql = db.connect().await?;
            sql.batch_execute(&schema(args.key, false)).await?;
            eprintln!("writing {n} rows");
            sql.batch_execute(&insert_rows("1", &n.to_string(), args.key, false))
                .await?;
            let dir = tempfile::Builder::new()
                .prefix("walsync-bench-")
                .tempdir()?;
            let store = Arc::new(EmbeddedStore::open(dir.path())?);
            let t = Instant::now();
            let r = super::replicator::start(&db.url, "bench_snapshot", &rules, &store)?;
            while !store.checkpoint()?.snapshot_complete {
                tokio::time::sleep(Duration::from_millis(200)).await;
                eprintln!(
                    "  {} rows copied, peak rss {} MiB",
                    r.progress.borrow().snapshot_rows,
                    peak_rss() / 1048576
                );
            }
            let elapsed = t.elapsed();
            super::replicator::finish(r).await?;
            sql.execute("SELECT pg_drop_replication_slot('bench_snapshot')", &[])
                .await?;
            anyhow::Ok((elapsed, peak_rss(), store.size_on_disk()?))
        })?;
        results.push((n, elapsed, rss, bytes));
    }
    println!(
        "Initial snapshot through the replicator (peak memory is the process's VmHWM, cumulative)\n"
    );
    println!(
        "machine: {}; process peak before the first run: {} MiB\n",
        super::machine_facts(),
        baseline / 1048576
    );
    println!("| table rows | rows/s | process peak memory after the run | store on disk |");
    println!("|---:|---:|---:|---:|");
    for (n, t, rss, bytes) in results {
        println!(
            "| {n} | {:.0} | {} MiB | {} MiB |",
            n as f64 / t.as_secs_f64(),
            rss / 1048576,
            bytes / 1048576
        );
    }
    Ok(())
}
