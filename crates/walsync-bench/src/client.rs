//! The real PowerSync Node.js client (`@powersync/node`, as the tests pin it) downloading one
//! user's bucket of R rows from `walsync serve`, over NDJSON, over BSON (the SDK's choice over
//! HTTP) and over RSocket on a WebSocket, timed from `connect()` to its first complete sync
//! (checksums verified, rows in its SQLite) — beside walsync's own Rust client downloading the
//! same bucket over HTTP in the same run, which tells whether walsync or the client bounds it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use walsync_testkit::{Cluster, ClusterOptions};

use super::summary::Summary;
use super::sync::{TABLES, download, start_server, token, wait_ready, wait_replicated};

#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    /// Rows of the bucket downloaded.
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Downloads per client and encoding (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The client installed where the tests install it (`npm ci` once, from the tests' lock file).
fn install() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let src = root.join("tests/powersync");
    let dir = root.join("target/tmp/powersync-node");
    std::fs::create_dir_all(&dir)?;
    let manifest = std::fs::read(src.join("package.json"))?;
    let lock = std::fs::read(src.join("package-lock.json"))?;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("node/download.mjs"),
        dir.join("download.mjs"),
    )?;
    let same = std::fs::read(dir.join("package.json")).ok().as_deref() == Some(&manifest[..])
        && std::fs::read(dir.join("package-lock.json")).ok().as_deref() == Some(&lock[..]);
    if !(same && dir.join("node_modules/@powersync/node").exists()) {
        std::fs::write(dir.join("package.json"), &manifest)?;
        std::fs::write(dir.join("package-lock.json"), &lock)?;
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .context("running npm (node and npm are needed for this benchmark)")?;
        anyhow::ensure!(status.success(), "npm ci failed: {status}");
    }
    Ok(dir)
}

/// One download by the Node client: (rows, seconds).
fn node_download(dir: &Path, url: &str, mode: &str, run: usize) -> anyhow::Result<(usize, f64)> {
    let db = std::env::temp_dir().join(format!("walsync-bench-client-{mode}-{run}.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let out = Command::new("node")
        .arg("download.mjs")
        .arg(url)
        .arg(token("big")?)
        .arg(&db)
        .arg(mode)
        .current_dir(dir)
        .output()
        .context("running node")?;
    anyhow::ensure!(
        out.status.success(),
        "the node client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("the node client printed {line}"))?;
    let wanted = match mode {
        "ndjson" => walsync_protocol::NDJSON,
        "bson" => walsync_protocol::BSON_STREAM,
        _ => "rsocket",
    };
    anyhow::ensure!(
        v["encoding"] == wanted,
        "the {mode} download was served as {}",
        v["encoding"]
    );
    Ok((
        v["rows"].as_u64().unwrap_or(0) as usize,
        v["ms"].as_f64().unwrap_or(0.0) / 1e3,
    ))
}

pub(crate) fn run(args: ClientArgs) -> anyhow::Result<Summary> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

async fn bench(args: ClientArgs) -> anyhow::Result<Summary> {
    let node = install()?;
    let cluster = Cluster::start(ClusterOptions::default())?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(TABLES).await?;
    sql.batch_execute(&format!(
        "INSERT INTO projects VALUES (0, 'download');
         INSERT INTO members VALUES ('big', 0);
         INSERT INTO items (project_id, body) SELECT 0, repeat('x', 40) || i FROM generate_series(1, {}) i",
        args.rows
    ))
    .await?;
    let dir = tempfile::Builder::new()
        .prefix("walsync-bench-client-")
        .tempdir()?;
    let server = start_server(dir.path(), &db.url)?;
    wait_ready(&server.url).await?;
    wait_replicated(&sql).await?;
    println!(
        "Initial download by the real PowerSync Node.js client (@powersync/node, better-sqlite3) beside walsync's Rust client, {} rows\n",
        args.rows
    );
    println!("machine: {}\n", super::machine_facts());
    println!(
        "| client | encoding | rows | runs | seconds (median) | rows/s (median) | rows/s (range) |"
    );
    println!("|---|---|---:|---:|---:|---:|---|");
    let mut summary = Summary::default();
    let cases = [
        ("Rust client", "NDJSON over HTTP"),
        ("@powersync/node", "NDJSON over HTTP"),
        ("@powersync/node", "BSON over HTTP"),
        ("@powersync/node", "BSON over RSocket (WebSocket)"),
    ];
    let mut results: Vec<Vec<(usize, f64)>> = vec![Vec::new(); cases.len()];
    for run in 0..args.runs.max(1) {
        // Each round runs every case once, in a rotating order.
        for k in 0..cases.len() {
            let i = (k + run) % cases.len();
            let r = match i {
                0 => {
                    let (ops, secs) = download(&server.url, "http").await?;
                    // The bucket's ops: its rows plus the project row.
                    (ops.saturating_sub(1), secs)
                }
                1 => tokio::task::block_in_place(|| {
                    node_download(&node, &server.url, "ndjson", run)
                })?,
                2 => {
                    tokio::task::block_in_place(|| node_download(&node, &server.url, "bson", run))?
                }
                _ => tokio::task::block_in_place(|| {
                    node_download(&node, &server.url, "websocket", run)
                })?,
            };
            anyhow::ensure!(
                r.0 == args.rows,
                "{} over {}: {} rows, expected {}",
                cases[i].0,
                cases[i].1,
                r.0,
                args.rows
            );
            results[i].push(r);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for ((client, encoding), mut runs) in cases.into_iter().zip(results) {
        runs.sort_by(|a, b| a.1.total_cmp(&b.1));
        let rate = |r: &(usize, f64)| r.0 as f64 / r.1;
        let mid = runs[runs.len() / 2];
        println!(
            "| {client} | {encoding} | {} | {} | {:.2} | {:.0} | {:.0}–{:.0} |",
            mid.0,
            runs.len(),
            mid.1,
            rate(&mid),
            rate(&runs[runs.len() - 1]),
            rate(&runs[0])
        );
        summary.add(
            format!("initial download of {} rows, {client}, {encoding}", mid.0),
            super::summary::rate(rate(&mid), "rows"),
            "",
            None,
        );
    }
    drop(server);
    Ok(summary)
}
