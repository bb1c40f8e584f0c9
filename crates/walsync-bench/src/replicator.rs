//! The whole replicator (WAL → rules → durable buckets) beside `pg_recvlogical`, and the cost
//! of a checkpoint for users with many buckets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::watch;
use walsync_replicator::{Progress, ReplicatorConfig};
use walsync_rules::{RequestContext, SyncRules};
use walsync_source::{PgConfig, SourceConfig};
use walsync_storage::{BucketStore, KvStore, StoreRead};
use walsync_sync::request_buckets;
use walsync_testkit::{Cluster, ClusterOptions};

use super::source::{WorkloadArgs, pg_recvlogical_run, schema, workloads};
use super::summary::Summary;

#[derive(Debug, Args)]
pub(crate) struct ReplicatorArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Runs of each tool per workload (each run has its own slot and store, the two tools one
    /// after the other); the medians are reported, with the ratio of every run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The stores the replicator writes, each timed in every run beside `pg_recvlogical`:
    /// `embedded` (fjall) and `postgres` (a storage database in the same cluster).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "embedded")]
    stores: Vec<StoreKind>,
    /// The users' bucket counts whose checkpoints are timed (on the last store listed).
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    checkpoint_buckets: Vec<i64>,
}

/// Where the replicator's store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreKind {
    Embedded,
    Postgres,
}

impl StoreKind {
    fn label(self) -> &'static str {
        match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// A store of a run: a directory of its own, or a schema of its own in the storage database.
enum StorePlace {
    Dir(tempfile::TempDir),
    Schema(String, String),
}

impl StorePlace {
    fn new(kind: StoreKind, storage_url: &str, name: &str) -> anyhow::Result<StorePlace> {
        Ok(match kind {
            StoreKind::Embedded => StorePlace::Dir(
                tempfile::Builder::new()
                    .prefix("walsync-bench-")
                    .tempdir()?,
            ),
            StoreKind::Postgres => StorePlace::Schema(storage_url.to_owned(), name.to_owned()),
        })
    }

    fn open(&self) -> anyhow::Result<KvStore> {
        Ok(match self {
            StorePlace::Dir(dir) => KvStore::open(dir.path())?,
            StorePlace::Schema(url, schema) => {
                let connect = walsync_storage::connect_without_tls(url);
                KvStore::open_postgres(connect, schema, 8)?
            }
        })
    }
}

/// Each row in one project bucket (400 rows a project), as in the apply benchmark.
pub(super) const RULES: &str = "
bucket_definitions:
  user_projects:
    parameters: SELECT project_id FROM project_members WHERE user_id = request.user_id()
    data:
      - SELECT * FROM assessment_responses WHERE project_id = bucket.project_id
";

pub(super) struct Running {
    stop: watch::Sender<bool>,
    pub progress: watch::Receiver<Progress>,
    task: tokio::task::JoinHandle<walsync_replicator::Result<()>>,
}

pub(super) fn start(
    url: &str,
    slot: &str,
    rules: &Arc<SyncRules>,
    store: &Arc<KvStore>,
) -> anyhow::Result<Running> {
    start_with(url, slot, rules, store, |_| {})
}

/// [`start`] with the replicator's configuration changed by `set`.
pub(super) fn start_with(
    url: &str,
    slot: &str,
    rules: &Arc<SyncRules>,
    store: &Arc<KvStore>,
    set: impl FnOnce(&mut ReplicatorConfig),
) -> anyhow::Result<Running> {
    let pg: PgConfig = url.parse()?;
    let mut config = ReplicatorConfig::new(SourceConfig::new(pg, slot, "bench"));
    set(&mut config);
    let (stop, stop_rx) = watch::channel(false);
    let (progress_tx, progress) = watch::channel(Progress::default());
    let task = tokio::spawn(walsync_replicator::run(
        config,
        rules.clone(),
        store.clone(),
        stop_rx,
        progress_tx,
    ));
    Ok(Running {
        stop,
        progress,
        task,
    })
}

pub(super) async fn finish(r: Running) -> anyhow::Result<()> {
    r.stop.send(true)?;
    r.task.await??;
    Ok(())
}

/// Waits until `rows` rows are durable; the storage commits that took.
pub(super) async fn wait_rows(r: &mut Running, rows: u64) -> anyhow::Result<u64> {
    while r.progress.borrow().rows < rows {
        tokio::time::timeout(Duration::from_secs(600), r.progress.changed()).await??;
    }
    Ok(r.progress.borrow().storage_commits)
}

/// One workload's runs; ops, bytes and commits are those of the last run.
struct WorkloadResult {
    name: String,
    rows: u64,
    pgrl: Vec<Duration>,
    /// Per store kind, in the order of `--stores`.
    ours: Vec<StoreResult>,
}

#[derive(Default)]
struct StoreResult {
    times: Vec<Duration>,
    ops: u64,
    bytes: u64,
    commits: u64,
}

pub(super) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn run(args: ReplicatorArgs) -> anyhow::Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: ReplicatorArgs) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let cluster = Cluster::start(ClusterOptions::default())?;
    let pg_recvlogical = Cluster::program("pg_recvlogical")?;
    let db = cluster.fresh_database().await?;
    let storage = cluster.fresh_database().await?;
    let stores = if args.stores.is_empty() {
        vec![StoreKind::Embedded]
    } else {
        args.stores.clone()
    };
    let sql = db.connect().await?;
    sql.batch_execute(&schema(args.workload.key, args.workload.mixed))
        .await?;
    sql.batch_execute(
        "CREATE TABLE project_members (id bigserial PRIMARY KEY, project_id bigint NOT NULL, user_id text NOT NULL);
         ALTER PUBLICATION bench ADD TABLE project_members;",
    )
    .await?;
    let rules = Arc::new(SyncRules::from_yaml(RULES)?);
    let workloads = workloads(&args.workload);
    let runs = args.runs.max(1);
    let mut throughput = Vec::new();
    let mut last_store = None;
    for (
        w,
        super::source::Workload {
            name,
            rows,
            sql: workload,
        },
    ) in workloads.iter().enumerate()
    {
        // Every run's slots exist before the workload, so that all of them decode the same WAL;
        // the replicator's store has its snapshot done, like a running replicator.
        let mut places: Vec<Vec<StorePlace>> = Vec::new();
        for run in 0..runs {
            let mut of_run = Vec::new();
            for (k, kind) in stores.iter().enumerate() {
                let place = StorePlace::new(*kind, &storage.url, &format!("bench_{w}_{run}_{k}"))?;
                let store = Arc::new(place.open()?);
                let r = start(&db.url, &format!("bench_rep_{w}_{run}_{k}"), &rules, &store)?;
                while !store.checkpoint()?.snapshot_complete {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                finish(r).await?;
                of_run.push(place);
            }
            sql.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&format!("bench_pgrl_{w}_{run}")],
            )
            .await?;
            places.push(of_run);
        }
        eprintln!("workload {name}: writing {rows} rows");
        sql.batch_execute(workload).await?;
        let end: String = sql
            .query_one(
                "SELECT pg_logical_emit_message(false, 'walsync-bench', 'end')::text",
                &[],
            )
            .await?
            .get(0);
        super::source::settle(&sql).await?;

        let mut result = WorkloadResult {
            name: name.clone(),
            rows: *rows,
            pgrl: Vec::new(),
            ours: stores.iter().map(|_| StoreResult::default()).collect(),
        };
        for (run, of_run) in places.into_iter().enumerate() {
            let pgrl_slot = format!("bench_pgrl_{w}_{run}");
            let pgrl = || {
                tokio::task::block_in_place(|| {
                    pg_recvlogical_run(&pg_recvlogical, &db.url, &pgrl_slot, &end)
                })
            };
            // Alternate which tool goes first, so neither always meets a warmer cache.
            let first = if run % 2 == 0 { Some(pgrl()?) } else { None };
            let last_run = w + 1 == workloads.len() && run + 1 == runs;
            let mut times = Vec::new();
            for (k, place) in of_run.into_iter().enumerate() {
                let slot = format!("bench_rep_{w}_{run}_{k}");
                let store = Arc::new(place.open()?);
                let ops_before = store.checkpoint()?.op_id;
                let size_before = store.size_on_disk()?;
                let t = Instant::now();
                let mut r = start(&db.url, &slot, &rules, &store)?;
                let commits = wait_rows(&mut r, *rows).await?;
                let ours = t.elapsed();
                finish(r).await?;
                let out = &mut result.ours[k];
                out.ops = store.checkpoint()?.op_id - ops_before;
                out.bytes = store.size_on_disk()?.saturating_sub(size_before);
                out.commits = commits;
                out.times.push(ours);
                times.push(format!("{} {:.2}s", stores[k].label(), ours.as_secs_f64()));
                if last_run && k + 1 == stores.len() {
                    last_store = Some((store, slot, place));
                } else {
                    drop(store);
                    sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                        .await?;
                }
                // The run's store writes nothing more; what it left in the page cache goes to
                // disk before the next one is timed.
                super::source::flush_os_cache()?;
            }
            let pgrl = match first {
                Some(p) => p,
                None => pgrl()?,
            };
            sql.execute("SELECT pg_drop_replication_slot($1)", &[&pgrl_slot])
                .await?;
            eprintln!(
                "  run {run}: pg_recvlogical {:.2}s, {}",
                pgrl.as_secs_f64(),
                times.join(", ")
            );
            result.pgrl.push(pgrl);
        }
        throughput.push(result);
    }

    // Checkpoints for users in thousands of projects, on the last store of workload b.
    let (store, slot, _place) = last_store.ok_or_else(|| anyhow::anyhow!("no store"))?;
    let mut checkpoints = Vec::new();
    let mut r = start(&db.url, &slot, &rules, &store)?;
    let mut expected_rows = r.progress.borrow().rows;
    for (i, n) in args.checkpoint_buckets.iter().copied().enumerate() {
        let base = 100_000_000i64 * (i as i64 + 1);
        let user = format!("user{n}");
        sql.batch_execute(&format!(
            "INSERT INTO project_members (project_id, user_id) SELECT {base} + i, '{user}' FROM generate_series(1, {n}) i;
             INSERT INTO assessment_responses (id, assessment_id, project_id, question_id) SELECT ({base} + i)::{key}, 0, {base} + i, 'q' FROM generate_series(1, {n}) i;",
            key = args.workload.key.sql_type()
        ))
        .await?;
        expected_rows += 2 * n as u64;
        wait_rows(&mut r, expected_rows).await?;
        let request = RequestContext {
            user_id: user.clone(),
            ..Default::default()
        };
        let mut full = Vec::new();
        let mut resolving = Vec::new();
        let mut buckets = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let at = store.checkpoint()?.op_id;
            buckets = request_buckets(
                &*store,
                &rules,
                &request,
                &walsync_rules::StreamRequest::default(),
                at,
            )?
            .buckets
            .into_keys()
            .collect();
            resolving.push(t.elapsed());
            let states = store.bucket_states(&buckets)?;
            std::hint::black_box(states);
            full.push(t.elapsed());
        }
        anyhow::ensure!(
            buckets.len() == n as usize,
            "user {user} has {} buckets, expected {n}",
            buckets.len()
        );
        // One row of one of the user's projects changes: the next checkpoint reads what changed.
        let mut incremental = Vec::new();
        for k in 0..5 {
            let before = store.checkpoint()?.op_id;
            sql.execute(
                &format!(
                    "UPDATE assessment_responses SET answer = 'x{k}' WHERE id = ({base} + 1)::{}",
                    args.workload.key.sql_type()
                ),
                &[],
            )
            .await?;
            expected_rows += 1;
            wait_rows(&mut r, expected_rows).await?;
            let t = Instant::now();
            let now = store.checkpoint()?.op_id;
            let changes = store.changes(before, now)?;
            let mine: Vec<String> = changes
                .buckets
                .into_iter()
                .filter(|b| buckets.binary_search(b).is_ok())
                .collect();
            let relookup = changes
                .lookups
                .iter()
                .any(|l| l.values.first() == Some(&user));
            let states = store.bucket_states(&mine)?;
            std::hint::black_box((states, relookup));
            incremental.push(t.elapsed());
        }
        checkpoints.push((n, median(full), median(resolving), median(incremental)));
    }
    finish(r).await?;

    println!(
        "Replicator: WAL to durable buckets (medians of {runs} runs; each run compares the two tools run one after the other)\n"
    );
    println!(
        "machine: {}; stores: embedded (fjall) and postgres (a storage database in the source's cluster), every commit durable\n",
        super::machine_facts()
    );
    println!(
        "| workload | store | rows | pg_recvlogical rows/s | replicator rows/s | ratio | ratio of each run | ops/s | bytes stored per million rows | storage commits |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---:|---:|---:|");
    for t in throughput {
        let rate = |d: &Duration| t.rows as f64 / d.as_secs_f64();
        let p = rate(&median(t.pgrl.clone()));
        for (kind, ours) in stores.iter().zip(&t.ours) {
            let o = rate(&median(ours.times.clone()));
            let ratios: Vec<f64> = t
                .pgrl
                .iter()
                .zip(&ours.times)
                .map(|(p, o)| rate(o) / rate(p))
                .collect();
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            let mut sorted = ratios;
            sorted.sort_by(f64::total_cmp);
            let ratio = sorted[sorted.len() / 2];
            let label = match kind {
                StoreKind::Embedded => t.name.clone(),
                StoreKind::Postgres => format!("{} (postgres store)", t.name),
            };
            summary.add(
                format!("replication: {label}"),
                super::summary::rate(o, "rows"),
                format!("{} (pg_recvlogical)", super::summary::rate(p, "rows")),
                Some(ratio),
            );
            println!(
                "| {} | {} | {} | {p:.0} | {o:.0} | {ratio:.2}× | {} | {:.0} | {:.0} MiB | {} |",
                t.name,
                kind.label(),
                t.rows,
                each.join(", "),
                ours.ops as f64 * o / t.rows as f64,
                ours.bytes as f64 / 1048576.0 * 1e6 / t.rows as f64,
                ours.commits
            );
        }
    }
    println!(
        "\nCheckpoint for one user (median of 5), on the {} store\n",
        stores.last().map_or("embedded", |k| k.label())
    );
    println!(
        "| buckets of the user | full checkpoint (resolve buckets + read their states) | of which resolving | next checkpoint after one change |"
    );
    println!("|---:|---:|---:|---:|");
    for (n, full, resolve, inc) in checkpoints {
        summary.add(
            format!("checkpoint for a user of {n} buckets: full / after one change"),
            format!(
                "{:.1} ms / {:.2} ms",
                full.as_secs_f64() * 1e3,
                inc.as_secs_f64() * 1e3
            ),
            "",
            None,
        );
        println!(
            "| {n} | {:.1} ms | {:.1} ms | {:.3} ms |",
            full.as_secs_f64() * 1e3,
            resolve.as_secs_f64() * 1e3,
            inc.as_secs_f64() * 1e3
        );
    }
    Ok(summary)
}
