//! `walsync bench sync`: the sync API under load, against a `walsync serve` child process.
//!
//! 1. Commit-to-client latency: C streaming clients spread over P projects; a writer updates one
//!    project row at a time; each client in that project notes when the row arrives. p50/p99 of
//!    (arrival − the writer's COMMIT returning), over gRPC and over the HTTP NDJSON stream (one
//!    HTTP/1.1 socket per client, as PowerSync's SDKs connect).
//! 2. Concurrent idle streams: S more streams, each past its first checkpoint; the server's
//!    resident memory before and after, per stream.
//! 3. Initial download: one client downloads a bucket of R rows; ops/s over HTTP and gRPC.
//!
//! gRPC streams share HTTP/2 connections (as gRPC clients do), so that the idle stream count is
//! not bounded by this machine's open-file limit on the client side.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use super::summary::Summary;
use futures_util::StreamExt;
use tokio::sync::Mutex;
use walsync_protocol::{Line, OpKind, SyncRequest, pb};
use walsync_server::mint_hs256;
use walsync_testkit::{Cluster, ClusterOptions};

#[derive(Debug, Args)]
pub(crate) struct SyncArgs {
    /// Client counts for the latency runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    clients: Vec<usize>,
    /// Transports of the latency runs (`grpc`, `http`).
    #[arg(long, value_delimiter = ',', default_value = "grpc,http")]
    transports: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    projects: usize,
    /// Row updates per latency run.
    #[arg(long, default_value_t = 300)]
    updates: usize,
    /// Idle streams to hold.
    #[arg(long, default_value_t = 50_000)]
    streams: usize,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    per_connection: usize,
    /// Rows of the bucket downloaded whole.
    #[arg(long, default_value_t = 1_000_000)]
    download_rows: usize,
    /// Serve from this many API nodes (`walsync serve --role api`) beside one replicator
    /// (`--role replicator`), the store in PostgreSQL; 0: one `walsync serve` with the embedded
    /// store.
    #[arg(long, default_value_t = 0)]
    api_nodes: usize,
}

const SECRET: &str = "bench-secret";
/// The tables [`RULES`] read (the sync, presence and client benchmarks fill them).
pub(crate) const TABLES: &str = "CREATE TABLE projects (id BIGINT PRIMARY KEY, description TEXT);
     CREATE TABLE members (user_id TEXT, project_id BIGINT, PRIMARY KEY (user_id, project_id));
     CREATE TABLE items (id BIGSERIAL PRIMARY KEY, project_id BIGINT, body TEXT);";
const RULES: &str = "bucket_definitions:
  user_projects:
    parameters: SELECT project_id FROM members WHERE user_id = request.user_id()
    data:
      - SELECT * FROM projects WHERE id = bucket.project_id
      - SELECT * FROM items WHERE project_id = bucket.project_id
";

pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) url: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    pub(crate) fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }
}

pub(crate) fn start_server(dir: &Path, pg_url: &str) -> anyhow::Result<ServerProcess> {
    start_node(dir, pg_url, None, "all")
}

/// A `walsync serve` child of `role`, its configuration in `dir` (its store there too, or in
/// the PostgreSQL database `storage`).
fn start_node(
    dir: &Path,
    pg_url: &str,
    storage: Option<&str>,
    role: &str,
) -> anyhow::Result<ServerProcess> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::write(dir.join("rules.yaml"), RULES)?;
    let store = match storage {
        None => "[storage]\ndir = \"store\"\n".to_owned(),
        Some(url) => format!("[storage.postgres]\nurl = \"{url}\"\npoll_ms = 1000\n"),
    };
    let config = dir.join(format!("walsync-{port}.toml"));
    std::fs::write(
        &config,
        format!(
            "rules = \"rules.yaml\"\n[postgres]\nurl = \"{pg_url}\"\nslot = \"bench\"\npublication = \"bench\"\ncreate_publication = true\n{store}[server]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = 1000000\nmax_streams_per_user = 1000000\n[auth]\nsecret = \"{SECRET}\"\n"
        ),
    )?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--role", role, "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting walsync serve")?;
    Ok(ServerProcess {
        child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

pub(crate) async fn wait_ready(url: &str) -> anyhow::Result<()> {
    walsync_client::install_crypto();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{url}/health/ready")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("the server never became ready")
}

/// Waits until the slot has confirmed everything written so far (the store committed it).
pub(crate) async fn wait_replicated(sql: &tokio_postgres::Client) -> anyhow::Result<()> {
    let target: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    loop {
        let done: bool = sql
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = 'bench'",
                &[&target],
            )
            .await?
            .get(0);
        if done {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn channels(
    url: &str,
    n: usize,
) -> anyhow::Result<Vec<tonic::transport::Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            tonic::transport::Endpoint::from_shared(url.to_owned())?
                .connect()
                .await?,
        );
    }
    Ok(out)
}

pub(crate) fn token(user: &str) -> anyhow::Result<String> {
    Ok(mint_hs256(SECRET, user, None, Duration::from_secs(7200))?)
}

async fn open(
    channel: tonic::transport::Channel,
    user: &str,
) -> anyhow::Result<tonic::Streaming<pb::SyncLine>> {
    let mut client = pb::sync_client::SyncClient::new(channel).max_decoding_message_size(64 << 20);
    let mut req = tonic::Request::new(pb::SyncRequest::from(SyncRequest::default()));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {}", token(user)?).parse()?);
    Ok(client.sync(req).await?.into_inner())
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub(crate) fn run(args: SyncArgs) -> anyhow::Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: SyncArgs) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    // A durable, synchronously committing server, as in production: with the test clusters'
    // `synchronous_commit = off`, WAL reaches the walsender only at the WAL writer's next flush
    // (up to `wal_writer_delay`, 200 ms), which would dominate commit-to-client latency.
    let cluster = Cluster::start(ClusterOptions {
        settings: vec![
            ("fsync".into(), "on".into()),
            ("synchronous_commit".into(), "on".into()),
        ],
        ..ClusterOptions::default()
    })?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    let max_clients = args.clients.iter().copied().max().unwrap_or(0);
    sql.batch_execute(TABLES).await?;
    sql.batch_execute(&format!(
        "INSERT INTO projects SELECT i, 'start' FROM generate_series(1, {p}) i;
         INSERT INTO members SELECT 'c' || i, 1 + i % {p} FROM generate_series(0, {c} - 1) i;
         INSERT INTO members SELECT 's' || i, 1 + i % {p} FROM generate_series(0, {s} - 1) i;
         INSERT INTO projects VALUES (0, 'download');
         INSERT INTO members VALUES ('big', 0);",
        p = args.projects,
        c = max_clients,
        s = args.streams,
    ))
    .await?;
    let dir = tempfile::Builder::new()
        .prefix("walsync-bench-sync-")
        .tempdir()?;
    let (nodes, _replicator) = if args.api_nodes == 0 {
        let server = start_server(dir.path(), &db.url)?;
        wait_ready(&server.url).await?;
        (vec![server], None)
    } else {
        let storage = cluster.fresh_database().await?;
        let replicator = start_node(dir.path(), &db.url, Some(&storage.url), "replicator")?;
        wait_ready(&replicator.url).await?;
        let mut nodes = Vec::new();
        for _ in 0..args.api_nodes {
            nodes.push(start_node(dir.path(), &db.url, Some(&storage.url), "api")?);
        }
        for node in &nodes {
            wait_ready(&node.url).await?;
        }
        (nodes, Some(replicator))
    };
    let servers = if args.api_nodes == 0 {
        "one `walsync serve` child process, embedded store".to_owned()
    } else {
        format!(
            "{} API nodes and a replicator, `walsync serve --role api|replicator` child processes, the store in PostgreSQL (a database of the source's cluster); clients spread over the API nodes",
            args.api_nodes
        )
    };
    println!(
        "walsync bench sync: {} (servers: {servers}; clients in this process)\n",
        super::machine_facts()
    );

    println!("| transport | clients | projects | updates | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for transport in &args.transports {
        for &clients in &args.clients {
            let (samples, p50, p99, max) = latency(&nodes, &sql, &args, transport, clients).await?;
            summary.add(
                if nodes.len() == 1 {
                    format!("commit to client, {transport}, {clients} clients (p50 / p99 / max)")
                } else {
                    format!(
                        "commit to client across {} API nodes, {transport}, {clients} clients (p50 / p99 / max)",
                        nodes.len()
                    )
                },
                format!("{p50:.1} / {p99:.1} / {max:.1} ms"),
                "",
                None,
            );
            println!(
                "| {transport} | {clients} | {} | {} | {samples} | {p50:.2} | {p99:.2} | {max:.2} |",
                args.projects, args.updates
            );
        }
    }

    println!("\n| idle streams held | connections | server RSS before | after | per stream |");
    println!("|---:|---:|---:|---:|---:|");
    let (held, conns, before, after) = idle_streams(&nodes, &args).await?;
    summary.add(
        if nodes.len() == 1 {
            format!("idle streams held by one process ({conns} connections)")
        } else {
            format!(
                "idle streams held by {} API nodes ({conns} connections)",
                nodes.len()
            )
        },
        format!(
            "{held}, {:.1} KiB each",
            (after.saturating_sub(before)) as f64 / held.max(1) as f64
        ),
        "",
        None,
    );
    println!(
        "| {held} | {conns} | {:.0} MiB | {:.0} MiB | {:.1} KiB |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / held.max(1) as f64
    );

    sql.batch_execute(&format!(
        "INSERT INTO items (project_id, body) SELECT 0, repeat('x', 40) || i FROM generate_series(1, {}) i",
        args.download_rows
    ))
    .await?;
    wait_replicated(&sql).await?;
    println!(
        "\n| initial download | ops | runs | seconds (median) | ops/s (median) | ops/s (range) |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    for transport in ["http", "grpc"] {
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(download(&nodes[0].url, transport).await?);
        }
        runs.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (ops, secs) = runs[1];
        let rate = |r: &(usize, f64)| r.0 as f64 / r.1;
        summary.add(
            format!("initial download of {ops} ops, {transport}"),
            super::summary::rate(rate(&runs[1]), "ops"),
            "",
            None,
        );
        println!(
            "| {transport} | {ops} | {} | {secs:.2} | {:.0} | {:.0}–{:.0} |",
            runs.len(),
            rate(&runs[1]),
            rate(&runs[runs.len() - 1]),
            rate(&runs[0])
        );
    }
    Ok(summary)
}

type Lines = std::pin::Pin<Box<dyn futures_util::Stream<Item = Line> + Send>>;

/// The lines of `s` up to its first error (`None`).
fn until_error(s: impl futures_util::Stream<Item = Option<Line>> + Send + 'static) -> Lines {
    Box::pin(
        s.take_while(|l| std::future::ready(l.is_some()))
            .filter_map(std::future::ready),
    )
}

/// Streams of users `c{i}` for each of `ids` over `transport`, as lines (a stream ends at its
/// first error).
async fn open_many(
    url: &str,
    transport: &str,
    ids: &[usize],
    per_connection: usize,
) -> anyhow::Result<Vec<Lines>> {
    let clients = ids.len();
    let mut out: Vec<Lines> = Vec::with_capacity(clients);
    if transport == "http" {
        let base = walsync_client::Connector::new(url, walsync_client::Transport::Http, "")?;
        for &i in ids {
            // Clones share one HTTP client; each stream holds a socket of its own.
            let mut c = base.clone();
            c.set_token(&token(&format!("c{i}"))?);
            let lines = c.open(SyncRequest::default()).await?;
            out.push(until_error(lines.map(Result::ok)));
        }
        return Ok(out);
    }
    let chans = channels(url, clients.div_ceil(per_connection)).await?;
    for (k, &i) in ids.iter().enumerate() {
        let stream = open(chans[k % chans.len()].clone(), &format!("c{i}")).await?;
        out.push(until_error(
            stream.map(|l| l.ok().and_then(|l| Line::try_from(l).ok())),
        ));
    }
    Ok(out)
}

/// Commit-to-client latency of `clients` streams spread over `nodes`.
async fn latency(
    nodes: &[ServerProcess],
    sql: &tokio_postgres::Client,
    args: &SyncArgs,
    transport: &str,
    clients: usize,
) -> anyhow::Result<(usize, f64, f64, f64)> {
    let start = Instant::now();
    let sent: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.updates).map(|_| AtomicU64::new(0)).collect());
    let samples: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::with_capacity(clients);
    for (k, node) in nodes.iter().enumerate() {
        let ids: Vec<usize> = (0..clients).filter(|i| i % nodes.len() == k).collect();
        streams.extend(open_many(&node.url, transport, &ids, args.per_connection).await?);
    }
    let mut tasks = Vec::new();
    for mut stream in streams {
        let (sent, samples, ready) = (sent.clone(), samples.clone(), ready.clone());
        tasks.push(tokio::spawn(async move {
            let mut complete = false;
            while let Some(line) = stream.next().await {
                match line {
                    Line::CheckpointComplete(_) if !complete => {
                        complete = true;
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                    Line::Data(page) if complete => {
                        let now = start.elapsed().as_micros() as u64;
                        for op in page.data {
                            if op.op != OpKind::Put || op.object_type.as_deref() != Some("projects")
                            {
                                continue;
                            }
                            let seq = op.data.as_deref().and_then(|d| {
                                let v: serde_json::Value = serde_json::from_str(d).ok()?;
                                v["description"]
                                    .as_str()?
                                    .strip_prefix("seq:")?
                                    .split(':')
                                    .next()?
                                    .parse::<usize>()
                                    .ok()
                            });
                            if let Some(seq) = seq
                                && let Some(t0) = sent.get(seq)
                            {
                                let t0 = t0.load(Ordering::Acquire);
                                if t0 > 0 {
                                    samples.lock().await.push(now.saturating_sub(t0));
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready.load(Ordering::Relaxed) < clients && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = ready.load(Ordering::Relaxed);
    if opened < clients {
        eprintln!("only {opened} of {clients} streams completed their first checkpoint");
    }
    let per_project = clients / args.projects.max(1);
    for n in 0..args.updates {
        let project = 1 + n % args.projects;
        sql.execute(
            "UPDATE projects SET description = $1 WHERE id = $2",
            // The run's size in the value: an update to the value a row already holds writes no op.
            &[&format!("seq:{n}:{transport}{clients}"), &(project as i64)],
        )
        .await?;
        sent[n].store(start.elapsed().as_micros() as u64, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected = args.updates * per_project.max(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while samples.lock().await.len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.abort();
    }
    let mut s = samples.lock().await.clone();
    s.sort_unstable();
    Ok((
        s.len(),
        percentile(&s, 0.5),
        percentile(&s, 0.99),
        percentile(&s, 1.0),
    ))
}

/// Idle streams held by `nodes` (spread over them), and the nodes' memory before and after.
async fn idle_streams(
    nodes: &[ServerProcess],
    args: &SyncArgs,
) -> anyhow::Result<(usize, usize, u64, u64)> {
    let rss = || nodes.iter().map(ServerProcess::rss_kib).sum::<u64>();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss();
    let per_node = args.streams.div_ceil(nodes.len());
    let mut chans = Vec::new();
    for node in nodes {
        chans.push(channels(&node.url, per_node.div_ceil(args.per_connection)).await?);
    }
    let conns = chans.iter().map(Vec::len).sum();
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.streams {
        let of_node = &chans[i % nodes.len()];
        let channel = of_node[(i / nodes.len()) % of_node.len()].clone();
        let mut stream = match open(channel, &format!("s{i}")).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("stream {i} refused: {e}");
                break;
            }
        };
        let ready = ready.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(line)) = stream.message().await {
                if let Ok(Line::CheckpointComplete(_)) = Line::try_from(line) {
                    ready.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready.load(Ordering::Relaxed) < tasks.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss();
    let held = ready.load(Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    Ok((held, conns, before, after))
}

pub(crate) async fn download(url: &str, transport: &str) -> anyhow::Result<(usize, f64)> {
    let t = match transport {
        "http" => walsync_client::Transport::Http,
        _ => walsync_client::Transport::Grpc,
    };
    let connector = walsync_client::Connector::new(url, t, &token("big")?)?;
    let started = Instant::now();
    let mut lines = connector.open(SyncRequest::default()).await?;
    let mut ops = 0usize;
    while let Some(line) = lines.next().await {
        match line? {
            Line::Data(page) => ops += page.data.len(),
            Line::CheckpointComplete(_) => break,
            _ => {}
        }
    }
    Ok((ops, started.elapsed().as_secs_f64()))
}
