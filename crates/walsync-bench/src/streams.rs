//! A user with many buckets through Sync Streams (no 1,000-bucket cap): N projects, reached by
//! a default stream (`IN (SELECT … FROM project_members …)`: one lookup key, N buckets), by N
//! explicit subscriptions (one per project, each checked against membership: N lookup keys),
//! and by both streams at once (2N buckets). For each, the full checkpoint as a
//! stream computes it — resolving the buckets from the store's lookups and reading their
//! states — and the checkpoint line encoded as NDJSON and as BSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use walsync_protocol::{BucketChecksum, Checkpoint, Line};
use walsync_rules::{RequestContext, StreamRequest, Subscription, SyncRules};
use walsync_storage::{BucketStore, KvStore, StoreRead};
use walsync_sync::request_buckets;
use walsync_testkit::{Cluster, ClusterOptions};

use super::replicator::{finish, median, start, wait_rows};
use super::summary::Summary;

#[derive(Debug, Args)]
pub(crate) struct StreamsArgs {
    /// Projects of the user (its buckets).
    #[arg(long, default_value_t = 50_000)]
    buckets: u64,
    /// Measurements of each case (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

const RULES: &str = "
streams:
  my_projects:
    auto_subscribe: true
    query: SELECT * FROM responses WHERE project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())
  project:
    query: SELECT * FROM responses WHERE project_id = subscription.parameter('p') AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())
";

pub(crate) fn run(args: StreamsArgs) -> anyhow::Result<Summary> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_async(args))
}

async fn run_async(args: StreamsArgs) -> anyhow::Result<Summary> {
    let n = args.buckets;
    let cluster = Cluster::start(ClusterOptions::default())?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(
        "CREATE TABLE project_members (id bigserial PRIMARY KEY, project_id bigint NOT NULL, user_id text NOT NULL);
         CREATE TABLE responses (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), project_id bigint NOT NULL, answer jsonb);
         CREATE PUBLICATION bench FOR TABLE project_members, responses;",
    )
    .await?;
    let rules = Arc::new(SyncRules::from_yaml(RULES)?);
    let dir = tempfile::Builder::new()
        .prefix("walsync-bench-")
        .tempdir()?;
    let store = Arc::new(KvStore::open(dir.path())?);
    let mut r = start(&db.url, "bench_streams", &rules, &store)?;
    sql.batch_execute(&format!(
        "INSERT INTO project_members (project_id, user_id) SELECT i, 'u' FROM generate_series(1, {n}) i;
         INSERT INTO responses (project_id, answer) SELECT i, jsonb_build_object('q', i) FROM generate_series(1, {n}) i;"
    ))
    .await?;
    wait_rows(&mut r, 2 * n).await?;
    finish(r).await?;

    let request = RequestContext {
        user_id: "u".into(),
        ..Default::default()
    };
    let subscriptions: Vec<Subscription> = (1..=n)
        .map(|p| Subscription {
            stream: "project".into(),
            parameters: serde_json::json!({ "p": p }),
            override_priority: serde_json::Value::Null,
        })
        .collect();
    let cases = [
        (
            "a default stream (one IN subquery)",
            StreamRequest::default(),
        ),
        (
            "explicit subscriptions, one per project",
            StreamRequest {
                include_defaults: false,
                subscriptions: subscriptions.clone(),
            },
        ),
        (
            "both streams at once",
            StreamRequest {
                include_defaults: true,
                subscriptions,
            },
        ),
    ];
    let mut summary = Summary::default();
    println!(
        "Sync Streams: one user's full checkpoint with {n} projects (median of {} runs)\n",
        args.runs
    );
    println!("machine: {}\n", super::machine_facts());
    println!(
        "| the user's buckets come from | buckets | full checkpoint (resolve + states) | of which resolving | checkpoint line: NDJSON | BSON |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let at = store.checkpoint()?.op_id;
    for (what, wanted) in cases {
        let mut full = Vec::new();
        let mut resolving = Vec::new();
        let mut ndjson = Vec::new();
        let mut bson = Vec::new();
        let mut buckets = 0;
        let mut bytes = (0, 0);
        for _ in 0..args.runs.max(1) {
            let snap = store.snapshot()?;
            let t = Instant::now();
            let resolved = request_buckets(&snap, &rules, &request, &wanted, at)?;
            resolving.push(t.elapsed());
            let names: Vec<String> = resolved.buckets.keys().cloned().collect();
            let states = snap.bucket_states(&names)?;
            let line = Line::Checkpoint(Checkpoint {
                last_op_id: at,
                write_checkpoint: None,
                buckets: names
                    .iter()
                    .zip(states)
                    .map(|(b, s)| {
                        let s = s.unwrap_or_default();
                        let p = &resolved.buckets[b];
                        BucketChecksum {
                            bucket: b.clone(),
                            checksum: s.checksum,
                            count: s.count,
                            priority: p.priority,
                            subscriptions: p.reasons.clone(),
                        }
                    })
                    .collect(),
                streams: resolved.streams,
            });
            full.push(t.elapsed());
            let t = Instant::now();
            let text = line.to_ndjson();
            ndjson.push(t.elapsed());
            let t = Instant::now();
            let doc = line.to_bson();
            bson.push(t.elapsed());
            buckets = names.len();
            bytes = (text.len(), doc.len());
        }
        let expected = if wanted.include_defaults && !wanted.subscriptions.is_empty() {
            2 * n
        } else {
            n
        };
        anyhow::ensure!(
            buckets as u64 == expected,
            "{what}: {buckets} buckets, expected {expected}"
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (f, r, j, b) = (
            median(full),
            median(resolving),
            median(ndjson),
            median(bson),
        );
        println!(
            "| {what} | {buckets} | {:.1} ms | {:.1} ms | {:.1} ms, {:.1} MiB | {:.1} ms, {:.1} MiB |",
            ms(f),
            ms(r),
            ms(j),
            bytes.0 as f64 / 1048576.0,
            ms(b),
            bytes.1 as f64 / 1048576.0
        );
        summary.add(
            format!("checkpoint for {buckets} stream buckets, {what}"),
            format!("{:.1} ms", ms(f)),
            "",
            None,
        );
    }
    drop(store);
    sql.execute("SELECT pg_drop_replication_slot('bench_streams')", &[])
        .await?;
    Ok(summary)
}
