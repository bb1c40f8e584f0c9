//! The store's size under a steady update workload, with walsync's background compaction
//! (superseded PUTs become MOVEs, history no checkpoint needs is pruned) and without it: with
//! it the size should level off, as the rows' number does not change; without it the op log
//! grows with every update.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use walsync::maintenance::MaintenanceConfig;
use walsync_rules::SyncRules;
use walsync_storage::{BucketStore, KvStore, StoreRead};
use walsync_testkit::{Cluster, ClusterOptions};

use super::snapshot::RULES;
use super::source::{Key, insert_rows, schema};

#[derive(Debug, Args)]
pub(crate) struct CompactionArgs {
    /// Rows of the table (their number stays the same: only updates follow).
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Rows updated per second (in transactions of 100).
    #[arg(long, default_value_t = 2_000)]
    updates_per_second: u64,
    /// Seconds of updates per run.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Seconds between compaction passes in the run with compaction.
    #[arg(long, default_value_t = 10)]
    interval: u64,
}

/// One sample: seconds into the run, rows updated so far, the store's size on disk and its
/// ops in total (what a new client of every bucket would download).
type Sample = (u64, u64, u64, u64);

pub(crate) fn run(args: CompactionArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = Cluster::start(ClusterOptions::default())?;
    let rules = Arc::new(SyncRules::from_yaml(RULES)?);
    let mut runs = Vec::new();
    for interval in [args.interval, 0] {
        eprintln!("updates with compaction every {interval} s (0: never)");
        let samples = rt.block_on(one_run(&cluster, &rules, &args, interval))?;
        runs.push((interval, samples));
    }
    println!(
        "Store size under steady updates of {} rows ({} rows updated per second)\n",
        args.rows, args.updates_per_second
    );
    println!("machine: {}\n", super::machine_facts());
    println!("| compaction | seconds | rows updated | store on disk | ops stored |");
    println!("|---|---:|---:|---:|---:|");
    for (interval, samples) in runs {
        let label = if interval == 0 {
            "never".to_owned()
        } else {
            format!("every {interval} s")
        };
        for (at, updated, bytes, ops) in samples {
            println!(
                "| {label} | {at} | {updated} | {} MiB | {ops} |",
                bytes >> 20
            );
        }
    }
    Ok(())
}

async fn one_run(
    cluster: &Cluster,
    rules: &Arc<SyncRules>,
    args: &CompactionArgs,
    interval: u64,
) -> anyhow::Result<Vec<Sample>> {
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(&schema(Key::Bigint, false)).await?;
    sql.batch_execute(&insert_rows(
        "1",
        &args.rows.to_string(),
        Key::Bigint,
        false,
    ))
    .await?;
    let dir = tempfile::Builder::new()
        .prefix("walsync-bench-")
        .tempdir()?;
    let store = Arc::new(KvStore::open(dir.path())?);
    let slot = format!("bench_compaction_{interval}");
    let r = super::replicator::start(&db.url, &slot, rules, &store)?;
    while !store.checkpoint()?.snapshot_complete {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let upkeep = tokio::spawn(walsync::maintenance::run(
        store.clone(),
        MaintenanceConfig {
            compact_interval_seconds: interval,
            ..MaintenanceConfig::default()
        },
        stop_rx,
    ));
    let started = Instant::now();
    let per_txn = 100u64;
    let period = Duration::from_secs_f64(per_txn as f64 / args.updates_per_second as f64);
    let mut next = tokio::time::Instant::now();
    let mut updated = 0u64;
    let mut samples = Vec::new();
    let mut next_sample = 0u64;
    let mut offset = 0u64;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        // 100 rows spread over the table, a different slice each time.
        offset = (offset + 7_919) % args.rows;
        sql.execute(
            "UPDATE assessment_responses SET answer = md5(random()::text), _version = _version + 1 \
             WHERE id % ($1::bigint / 100) = $2::bigint % ($1::bigint / 100)",
            &[&(args.rows as i64), &(offset as i64)],
        )
        .await?;
        updated += per_txn;
        let at = started.elapsed().as_secs();
        if at >= next_sample {
            samples.push(sample(&store, at, updated)?);
            next_sample += (args.seconds / 12).max(1);
        }
        next += period;
        tokio::time::sleep_until(next).await;
    }
    samples.push(sample(&store, started.elapsed().as_secs(), updated)?);
    // The upkeep of a run without compaction has ended already.
    let _ = stop.send(true);
    upkeep.await?;
    super::replicator::finish(r).await?;
    Ok(samples)
}

fn sample(store: &KvStore, at: u64, updated: u64) -> anyhow::Result<Sample> {
    let snap = store.snapshot()?;
    let buckets = snap.buckets()?;
    let ops = snap
        .bucket_states(&buckets)?
        .into_iter()
        .flatten()
        .map(|s| s.count)
        .sum();
    Ok((at, updated, store.size_on_disk()?, ops))
}
