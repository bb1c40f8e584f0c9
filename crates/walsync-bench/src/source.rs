//! Replication throughput: rows decoded into typed values and handed to a consumer, per
//! second, beside `pg_recvlogical` writing pgoutput to /dev/null from an identical slot.
//!
//! Both tools read slots created before the workload, so they decode the same WAL. Runs
//! alternate between the two tools and the best run of each is reported, which removes most of
//! the noise of a shared 2-core machine.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use walsync_source::{Change, PgConfig, Resume, Source, SourceConfig, SourceEvent};
use walsync_testkit::{Cluster, ClusterOptions};
use walsync_types::Lsn;

/// The sizes of the two replication workloads, shared by the benchmarks that run them.
#[derive(Debug, Args)]
pub(crate) struct WorkloadArgs {
    /// Rows of the single large transaction (workload a).
    #[arg(long, default_value_t = 1_000_000)]
    pub big_rows: i64,
    /// Transactions of workload b.
    #[arg(long, default_value_t = 10_000)]
    pub txns: i64,
    /// Rows per transaction of workload b.
    #[arg(long, default_value_t = 100)]
    pub rows_per_txn: i64,
    /// The primary key: `bigint` (serial-like, ascending), `uuid4` (text UUID v4, random, as
    /// offline-first clients make them) or `uuid7` (text UUID v7, time-ordered).
    #[arg(long, value_enum, default_value_t = Key::Bigint)]
    pub key: Key,
    /// Workload b's transactions mix operations as an app's do: of each 100 rows, 40 inserts,
    /// 50 updates of workload a's rows and 10 deletes of them (the table gets a `seq` column,
    /// indexed, to find them by).
    #[arg(long)]
    pub mixed: bool,
}

/// The primary key of the workloads' table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Key {
    Bigint,
    Uuid4,
    Uuid7,
}

impl Key {
    pub(super) fn sql_type(self) -> &'static str {
        match self {
            Key::Bigint => "bigint",
            Key::Uuid4 | Key::Uuid7 => "text",
        }
    }

    /// The key of row `i` (with `k.h`, twelve hex digits rising with `i`, and `k.r`, a random
    /// UUID, from the insert's lateral `k`).
    fn value(self) -> &'static str {
        match self {
            Key::Bigint => "i",
            Key::Uuid4 => "k.r",
            Key::Uuid7 => {
                "substr(k.h, 1, 8) || '-' || substr(k.h, 9, 4) || '-7' || substr(k.r, 16, 3) || substr(k.r, 19)"
            }
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct SourceArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Runs of each tool per workload; the best is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// A table shaped like the seed app's `assessment_responses`, about 250 bytes a row as text.
pub(super) fn schema(key: Key, mixed: bool) -> String {
    let seq = if mixed {
        "ALTER TABLE assessment_responses ADD COLUMN seq bigint; CREATE INDEX ON assessment_responses (seq);"
    } else {
        ""
    };
    format!(
        "CREATE TABLE assessment_responses (
    id {} PRIMARY KEY, assessment_id bigint NOT NULL, project_id bigint NOT NULL,
    question_id text NOT NULL, question_text text, answer text, notes text, priority text,
    answered_by bigint, answered_at timestamptz, created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(), _version bigint NOT NULL DEFAULT 1);
    {seq} CREATE PUBLICATION bench FOR TABLE assessment_responses;",
        key.sql_type()
    )
}

pub(super) fn insert_rows(from: &str, to: &str, key: Key, mixed: bool) -> String {
    let (seq_col, seq) = if mixed { (", seq", ", i") } else { ("", "") };
    format!(
        "INSERT INTO assessment_responses (id, assessment_id, project_id, question_id, question_text, answer, notes, \
         priority, answered_by, answered_at{seq_col}) \
         SELECT {}, i / 40, i / 400, 'q-' || lpad((i % 97)::text, 5, '0'), \
                'How does the organisation currently manage change across teams and tools? (' || i || ')', \
                'We run a fortnightly review with the platform team and track outcomes in a shared log.', \
                'follow up in next session', (ARRAY['low','medium','high'])[1 + i % 3], i % 50, now(){seq} \
         FROM generate_series({from}, {to}) i, \
              LATERAL (SELECT lpad(to_hex(1800000000000 + i), 12, '0') AS h, gen_random_uuid()::text AS r) k",
        key.value()
    )
}

pub(super) struct Workload {
    pub name: String,
    pub rows: u64,
    pub sql: String,
}

/// The two workloads every replication benchmark runs: (a) one transaction of `big_rows` rows,
/// (b) `txns` transactions of `rows_per_txn` rows, with ids that do not collide.
pub(super) fn workloads(w: &WorkloadArgs) -> [Workload; 2] {
    let (big_rows, txns) = (w.big_rows, w.txns);
    // Mixed, per transaction: 40 inserts, 50 updates walking over the first half of workload
    // a's rows, 10 deletes walking over its second half (each row deleted once).
    let (inserts, updates, deletes) = if w.mixed {
        (40, 50, 10)
    } else {
        (w.rows_per_txn, 0, 0)
    };
    let half = big_rows / 2;
    let (b_name, changes) = if w.mixed {
        assert!(
            half >= txns * deletes && half > updates,
            "--mixed needs --big-rows of at least twice 10 x --txns"
        );
        (
            format!("{inserts} inserts, {updates} updates, {deletes} deletes"),
            format!(
                "u := 1 + (t * {updates}) % ({half} - {updates}); \
                 UPDATE assessment_responses SET answer = 'changed in ' || t, _version = _version + 1 \
                   WHERE seq BETWEEN u AND u + {updates} - 1; \
                 DELETE FROM assessment_responses WHERE seq BETWEEN {half} + 1 + t * {deletes} AND {half} + (t + 1) * {deletes};"
            ),
        )
    } else {
        (format!("{inserts} rows"), String::new())
    };
    [
        Workload {
            name: format!("a: 1 transaction of {big_rows} rows ({:?} keys)", w.key),
            rows: big_rows as u64,
            sql: insert_rows("1", &big_rows.to_string(), w.key, w.mixed),
        },
        Workload {
            name: format!("b: {txns} transactions of {b_name} ({:?} keys)", w.key),
            rows: (txns * (inserts + updates + deletes)) as u64,
            sql: format!(
                "DO $$ DECLARE u bigint; BEGIN FOR t IN 0..{} LOOP {}; {changes} COMMIT; END LOOP; END $$",
                txns - 1,
                insert_rows(
                    &format!("{} + t * {inserts} + 1", 10 * big_rows),
                    &format!("{} + (t + 1) * {inserts}", 10 * big_rows),
                    w.key,
                    w.mixed
                )
            ),
        },
    ]
}

pub(crate) fn run(args: SourceArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster =
        Cluster::start(ClusterOptions::default()).context("starting a throwaway postgres")?;
    let pg_recvlogical = Cluster::program("pg_recvlogical")?;
    let version = Command::new(&pg_recvlogical).arg("--version").output()?;
    let db = rt.block_on(cluster.fresh_database())?;
    let sql = rt.block_on(db.connect())?;
    rt.block_on(sql.batch_execute(&schema(args.workload.key, args.workload.mixed)))?;

    let workloads = workloads(&args.workload);

    let mut results = Vec::new();
    for (w, workload) in workloads.iter().enumerate() {
        // Slots first, so that every run decodes exactly this workload's WAL.
        let mut slots = Vec::new();
        for run in 0..args.runs {
            for tool in ["pgrl", "walsync"] {
                let name = format!("bench_{w}_{tool}_{run}");
                rt.block_on(sql.execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&name],
                ))?;
                slots.push(name);
            }
        }
        let start: String = rt
            .block_on(sql.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]))?
            .get(0);
        let start: Lsn = start.parse()?;
        eprintln!("workload {}: writing {} rows", workload.name, workload.rows);
        rt.block_on(sql.batch_execute(&workload.sql))?;
        let end: String = rt
            .block_on(sql.query_one(
                "SELECT pg_logical_emit_message(false, 'walsync-bench', 'end')::text",
                &[],
            ))?
            .get(0);
        rt.block_on(settle(&sql))?;
        let wal_bytes: i64 = rt
            .block_on(sql.query_one(
                "SELECT ($1::text::pg_lsn - $2::text::pg_lsn)::int8",
                &[&end, &start.to_string()],
            ))?
            .get(0);

        let mut best_pgrl = Duration::MAX;
        let mut best_walsync = Duration::MAX;
        for run in 0..args.runs {
            // Alternate which tool goes first, so neither always meets a warmer cache.
            let (pgrl, walsync) = if run % 2 == 0 {
                let p = pg_recvlogical_run(
                    &pg_recvlogical,
                    &db.url,
                    &format!("bench_{w}_pgrl_{run}"),
                    &end,
                )?;
                (
                    p,
                    rt.block_on(walsync_run(
                        &db.url,
                        &format!("bench_{w}_walsync_{run}"),
                        start,
                        workload.rows,
                    ))?,
                )
            } else {
                let s = rt.block_on(walsync_run(
                    &db.url,
                    &format!("bench_{w}_walsync_{run}"),
                    start,
                    workload.rows,
                ))?;
                (
                    pg_recvlogical_run(
                        &pg_recvlogical,
                        &db.url,
                        &format!("bench_{w}_pgrl_{run}"),
                        &end,
                    )?,
                    s,
                )
            };
            eprintln!(
                "  run {run}: pg_recvlogical {:.2}s, walsync {:.2}s",
                pgrl.as_secs_f64(),
                walsync.as_secs_f64()
            );
            best_pgrl = best_pgrl.min(pgrl);
            best_walsync = best_walsync.min(walsync);
        }
        for slot in &slots {
            rt.block_on(sql.execute("SELECT pg_drop_replication_slot($1)", &[slot]))?;
        }
        results.push((
            workload.name.clone(),
            workload.rows,
            wal_bytes,
            best_pgrl,
            best_walsync,
        ));
    }

    println!(
        "Replication source: decode-and-emit throughput (best of {} runs each)\n",
        args.runs
    );
    println!(
        "machine: {}; {}",
        super::machine_facts(),
        String::from_utf8_lossy(&version.stdout).trim()
    );
    println!(
        "postgres: throwaway cluster from walsync-testkit (fsync off), client and server on the same cores\n"
    );
    println!("| workload | rows | WAL | pg_recvlogical rows/s | walsync rows/s | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, rows, wal, pgrl, ws) in results {
        let pgrl_rate = rows as f64 / pgrl.as_secs_f64();
        let ws_rate = rows as f64 / ws.as_secs_f64();
        println!(
            "| {name} | {rows} | {:.0} MiB | {:.0} | {:.0} | {:.2}× |",
            wal as f64 / 1048576.0,
            pgrl_rate,
            ws_rate,
            ws_rate / pgrl_rate
        );
    }
    Ok(())
}

/// Lets the server finish the background work a workload leaves behind before anything is
/// timed: statistics and the visibility map (else autovacuum starts in the middle of a run),
/// dirty buffers, and the WAL and heap pages the kernel has not written yet (the benchmark
/// cluster runs with fsync off; a production server has them on disk before the commit returns,
/// and a replicator that fsyncs its own store must not be timed against that writeback).
pub(super) async fn settle(sql: &tokio_postgres::Client) -> anyhow::Result<()> {
    // Separate statements: VACUUM cannot run inside the implicit transaction of a batch.
    sql.batch_execute("VACUUM ANALYZE").await?;
    sql.batch_execute("CHECKPOINT").await?;
    flush_os_cache()
}

/// Writes the kernel's dirty pages to disk (`sync`), so that the next run starts on a quiet disk.
pub(super) fn flush_os_cache() -> anyhow::Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    anyhow::ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

/// pg_recvlogical reading `slot` to /dev/null until the end marker.
pub(super) fn pg_recvlogical_run(
    program: &std::path::Path,
    url: &str,
    slot: &str,
    end: &str,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let status = Command::new(program)
        .args(["-d", url, "--slot", slot, "--start", "--no-loop"])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=bench",
            "-o",
            "messages=true",
        ])
        .args(["-E", end, "-f", "/dev/null", "-s", "10"])
        .status()?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    Ok(t.elapsed())
}

/// Streams `slot` from `start` until `rows` inserted rows have reached the consumer, decoded.
async fn walsync_run(url: &str, slot: &str, start: Lsn, rows: u64) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let pg: PgConfig = url.parse()?;
    let config = SourceConfig::new(pg, slot, "bench");
    let mut stream = Source::start(
        config,
        Resume {
            durable: Some(start),
            owns_slot: false,
        },
    )
    .await?;
    let mut seen = 0u64;
    let mut bytes = 0usize;
    // Done at the commit of the transaction holding the last row, as pg_recvlogical is done at
    // the message after it.
    'outer: loop {
        let batch = stream.next_batch().await.context("source ended early")??;
        for event in batch {
            match event {
                SourceEvent::Change(Change::Insert { new, .. }) => {
                    seen += 1;
                    bytes += new.len();
                }
                SourceEvent::Commit { end_lsn, .. } => {
                    stream.ack(end_lsn);
                    if seen >= rows {
                        break 'outer;
                    }
                }
                _ => {}
            }
        }
    }
    let elapsed = t.elapsed();
    std::hint::black_box(bytes);
    stream.stop().await;
    Ok(elapsed)
}
