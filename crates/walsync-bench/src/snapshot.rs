//! The initial snapshot through the replicator: rows per second and the process's peak memory,
//! to show that memory does not grow with the table (rows are copied in bounded batches, one
//! storage commit each).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use walsync_rules::SyncRules;
use walsync_storage::{BucketStore, KvStore, StoreRead};
use walsync_testkit::{Cluster, ClusterOptions};

use super::source::{Key, insert_rows, schema};
use super::summary::{Summary, rate};

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

/// The baseline: the table's rows read out of PostgreSQL by `COPY ... TO STDOUT` and dropped,
/// as fast as PostgreSQL hands a table over.
async fn copy_out(sql: &tokio_postgres::Client) -> anyhow::Result<Duration> {
    use futures_util::StreamExt;
    let t = Instant::now();
    let stream = sql.copy_out("COPY assessment_responses TO STDOUT").await?;
    let mut stream = std::pin::pin!(stream);
    let mut bytes = 0usize;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len();
    }
    std::hint::black_box(bytes);
    Ok(t.elapsed())
}

pub(crate) fn run(args: SnapshotArgs) -> anyhow::Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = Cluster::start(ClusterOptions::default())?;
    let rules = Arc::new(SyncRules::from_yaml(RULES)?);
    let mut results = Vec::new();
    let baseline = peak_rss();
    for n in args.rows {
        let (elapsed, rss, bytes, copy) = rt.block_on(async {
            let db = cluster.fresh_database().await?;
            let sql = db.connect().await?;
            sql.batch_execute(&schema(args.key, false)).await?;
            eprintln!("writing {n} rows");
            sql.batch_execute(&insert_rows("1", &n.to_string(), args.key, false))
                .await?;
            super::source::settle(&sql).await?;
            let copy = copy_out(&sql).await?;
            let dir = tempfile::Builder::new()
                .prefix("walsync-bench-")
                .tempdir()?;
            let store = Arc::new(KvStore::open(dir.path())?);
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
            anyhow::Ok((elapsed, peak_rss(), store.size_on_disk()?, copy))
        })?;
        results.push((n, elapsed, rss, bytes, copy));
    }
    println!(
        "Initial snapshot through the replicator (peak memory is the process's VmHWM, cumulative)\n"
    );
    println!(
        "machine: {}; process peak before the first run: {} MiB\n",
        super::machine_facts(),
        baseline / 1048576
    );
    println!(
        "| table rows | rows/s | COPY TO STDOUT rows/s | ratio | process peak memory after the run | store on disk |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut summary = Summary::default();
    for (n, t, rss, bytes, copy) in results {
        let (ours, theirs) = (n as f64 / t.as_secs_f64(), n as f64 / copy.as_secs_f64());
        println!(
            "| {n} | {ours:.0} | {theirs:.0} | {:.2}× | {} MiB | {} MiB |",
            ours / theirs,
            rss / 1048576,
            bytes / 1048576
        );
        summary.add(
            format!(
                "initial snapshot of {n} rows ({:?} keys), peak memory",
                args.key
            ),
            format!("{}, {} MiB", rate(ours, "rows"), rss / 1048576),
            format!("{} (COPY TO STDOUT)", rate(theirs, "rows")),
            Some(ours / theirs),
        );
    }
    Ok(summary)
}
