//! `walsync-bench upload`: uploads through `POST /write` beside the same changes written
//! straight to PostgreSQL by a plain tokio-postgres client, in the same run.
//!
//! The seed app's schema and write rules (`examples/walsync.toml`: every op is authorized by
//! its predicate, the seed's conflict strategies are on). C writers, each the owner of a project
//! of its own, send client transactions of 1 and of 10 `PATCH`es of its project's answers. The
//! baseline sends each transaction as `BEGIN`, the same `UPDATE`s (prepared, with the columns
//! walsync sets), `COMMIT` over C connections. Runs alternate which goes first. Then the time
//! from an upload's reply until the writer's own stream (HTTP, same client id) holds it.
//!
//! The server runs as a `walsync serve` child process, as `sync` runs it.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use super::summary::{Summary, rate};
use serde_json::json;
use walsync_client::{Connector, SyncClient, Transport};
use walsync_protocol::upload::{Status, UploadReply, UploadRequest};
use walsync_testkit::{Cluster, ClusterOptions, seed};

#[derive(Debug, Args)]
pub(crate) struct UploadArgs {
    /// Concurrent writers (each with a project of its own).
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Client transactions per writer per run.
    #[arg(long, default_value_t = 200)]
    transactions: usize,
    /// Ops per client transaction, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    ops: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Uploads timed until the writer's stream holds them.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
}

const SECRET: &str = "bench-secret";
/// Answers per writer's project.
const ANSWERS: usize = 50;

pub(crate) fn run(args: UploadArgs) -> anyhow::Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

fn token(user: &str) -> anyhow::Result<String> {
    Ok(walsync_server::mint_hs256(
        SECRET,
        user,
        None,
        Duration::from_secs(7200),
    )?)
}

async fn bench(args: UploadArgs) -> anyhow::Result<Summary> {
    // Durable, synchronous commits, as in production, for both sides.
    let cluster = Cluster::start(ClusterOptions {
        settings: vec![
            ("fsync".into(), "on".into()),
            ("synchronous_commit".into(), "on".into()),
            ("max_connections".into(), "200".into()),
        ],
        ..ClusterOptions::default()
    })?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(seed::SCHEMA).await?;
    sql.batch_execute(&format!(
        "CREATE PUBLICATION bench FOR TABLE {};
         INSERT INTO projects (id, name) SELECT i, 'p' || i FROM generate_series(1, {w}) i;
         INSERT INTO project_members (project_id, user_id, role) SELECT i, 'w' || i, 'owner' FROM generate_series(1, {w}) i;
         INSERT INTO assessment_responses (id, project_id, answer)
           SELECT p * 1000 + a, p, 'start' FROM generate_series(1, {w}) p, generate_series(1, {ANSWERS}) a;",
        seed::TABLES.join(", "),
        w = args.writers,
    ))
    .await?;
    let dir = tempfile::Builder::new()
        .prefix("walsync-bench-upload-")
        .tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let example = include_str!("../../../examples/walsync.toml");
    let writes = &example[example
        .find("[writes]")
        .context("no [writes] in the example")?..];
    std::fs::write(
        dir.path().join("walsync.toml"),
        format!(
            "rules = \"{rules}\"\n[postgres]\nurl = \"{url}\"\nslot = \"bench\"\npublication = \"bench\"\n[storage]\ndir = \"store\"\n[server]\nlisten = \"127.0.0.1:{port}\"\nuploads_per_second = 1000000.0\nupload_burst = 1000000\n[auth]\nsecret = \"{SECRET}\"\n\n{writes}",
            rules = seed::RULES_PATH,
            url = db.url,
            writes = writes.replacen(
                "[writes]\n",
                &format!("[writes]\nconnections = {}\n", args.writers),
                1
            ),
        ),
    )?;
    let mut server = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(dir.path().join("walsync.toml"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting walsync serve")?;
    let url = format!("http://127.0.0.1:{port}");
    let result = measure(&args, &url, &db.url).await;
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// One writer's transactions: `count` transactions of `ops` PATCHes each, cycling over its
/// project's answers; the text of each answer is unique to the run.
fn transactions(writer: usize, ops: usize, count: usize, run: usize) -> Vec<Vec<(i64, String)>> {
    (0..count)
        .map(|t| {
            (0..ops)
                .map(|o| {
                    let answer = (t * ops + o) % ANSWERS + 1;
                    let id = (writer * 1000 + answer) as i64;
                    (id, format!("r{run} t{t} o{o}"))
                })
                .collect()
        })
        .collect()
}

async fn through_walsync(
    args: &UploadArgs,
    url: &str,
    ops: usize,
    run: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 1..=args.writers {
        let connector = Connector::new(url, Transport::Http, &token(&format!("w{w}"))?)?;
        let txs = transactions(w, ops, args.transactions, run);
        tasks.push(tokio::spawn(async move {
            for (n, tx) in txs.into_iter().enumerate() {
                let request: UploadRequest = serde_json::from_value(json!({
                    "client_id": format!("bench-{w}"),
                    "batch": [{
                        "tx_id": (run * 1_000_000 + ops * 10_000 + n) as i64,
                        "ops": tx.iter().enumerate().map(|(i, (id, answer))| json!({
                            "op_id": i, "op": "PATCH", "type": "assessment_responses",
                            "id": id.to_string(), "data": {"answer": answer},
                        })).collect::<Vec<_>>(),
                    }],
                }))?;
                let reply = connector.upload(&request).await?;
                anyhow::ensure!(
                    reply.results.iter().all(|r| r.status == Status::Applied),
                    "an upload was not applied: {reply:?}"
                );
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

async fn direct(
    args: &UploadArgs,
    pg_url: &str,
    ops: usize,
    run: usize,
) -> anyhow::Result<Duration> {
    let mut clients = Vec::new();
    for _ in 0..args.writers {
        let (client, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        clients.push(client);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let w = i + 1;
        let txs = transactions(w, ops, args.transactions, run + 1000);
        tasks.push(tokio::spawn(async move {
            let update = client
                .prepare(
                    "UPDATE assessment_responses SET answer = $1, _last_modified_by = $2, \
                     _last_modified_at = now(), _version = _version + 1 WHERE id = $3",
                )
                .await?;
            let user = format!("w{w}");
            for tx in txs {
                let t = client.transaction().await?;
                for (id, answer) in &tx {
                    t.execute(&update, &[answer, &user, id]).await?;
                }
                t.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn measure(args: &UploadArgs, url: &str, pg_url: &str) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    crate::sync::wait_ready(url).await?;
    println!(
        "walsync-bench upload: {} ({} writers, {} transactions each per run, {} runs; server: `walsync serve` child process; synchronous_commit on)\n",
        super::machine_facts(),
        args.writers,
        args.transactions,
        args.runs
    );
    println!(
        "| ops per transaction | walsync tx/s | direct tx/s | ratio (median) | ratio per run |"
    );
    println!("|---:|---:|---:|---:|---|");
    for &ops in &args.ops {
        let total = (args.writers * args.transactions) as f64;
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut ratios = Vec::new();
        for run in 0..args.runs {
            let (w, d) = if run % 2 == 0 {
                let w = through_walsync(args, url, ops, run).await?;
                (w, direct(args, pg_url, ops, run).await?)
            } else {
                let d = direct(args, pg_url, ops, run).await?;
                (through_walsync(args, url, ops, run).await?, d)
            };
            let (w, d) = (total / w.as_secs_f64(), total / d.as_secs_f64());
            ours.push(w);
            theirs.push(d);
            ratios.push(w / d);
        }
        let per_run: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        summary.add(
            format!("uploads, {} writers, {ops} ops a transaction", args.writers),
            rate(median(ours.clone()), "tx"),
            format!(
                "{} (direct to PostgreSQL)",
                rate(median(theirs.clone()), "tx")
            ),
            Some(median(ratios.clone())),
        );
        println!(
            "| {ops} | {:.0} | {:.0} | {:.2} | {} |",
            median(ours),
            median(theirs),
            median(ratios.clone()),
            per_run.join(", ")
        );
    }

    // Reply to own stream: the writer's stream (same client id) holds the write once a
    // checkpoint carries the reply's write checkpoint.
    let connector = Connector::new(url, Transport::Http, &token("w1")?)?;
    let mut stream = SyncClient::new(connector.clone(), "latency");
    stream.next_checkpoint().await?;
    let mut samples = Vec::new();
    for n in 0..args.round_trips {
        let request: UploadRequest = serde_json::from_value(json!({
            "client_id": "latency",
            "batch": [{"tx_id": n, "ops": [{
                "op_id": 1, "op": "PATCH", "type": "assessment_responses", "id": "1001",
                "data": {"answer": format!("latency {n}")},
            }]}],
        }))?;
        let reply: UploadReply = connector.upload(&request).await?;
        let replied = Instant::now();
        let wanted: u64 = reply
            .write_checkpoint
            .as_deref()
            .context("no write checkpoint")?
            .parse()?;
        stream
            .until(Duration::from_secs(30), |s| {
                s.write_checkpoint().is_some_and(|w| w >= wanted)
            })
            .await?;
        samples.push(replied.elapsed().as_micros() as u64);
    }
    samples.sort_unstable();
    let at = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    summary.add(
        "upload reply to the writer's own stream (p50 / p99)",
        format!("{:.1} / {:.1} ms", at(0.5), at(0.99)),
        "",
        None,
    );
    println!("\n| reply to own stream | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| HTTP upload, HTTP stream | {} | {:.2} | {:.2} | {:.2} |",
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(summary)
}
