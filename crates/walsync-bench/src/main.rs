//! `walsync-bench`: measurements against baselines taken in the same run, printed as a
//! Markdown table (the form `docs/benchmarks.md` keeps). Run with
//! `cargo run --release -p walsync-bench -- <name>`.

// A command-line program: printing to stdout is its job.
#![allow(clippy::print_stdout)]

mod all;
mod apply;
mod client;
mod compaction;
mod engines;
mod memory;
mod presence;
mod replicator;
mod snapshot;
mod source;
mod streams;
mod summary;
mod sync;
mod upload;

use clap::{Parser, Subcommand};

/// The replicator allocates per row (decoded values, JSON, keys); mimalloc measured faster than
/// glibc's allocator there, and the benchmarks measure what `walsync` ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure walsync against its baselines on a throwaway PostgreSQL and print a table.
#[derive(Debug, Parser)]
#[command(name = "walsync-bench", version)]
struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Every benchmark with a published figure, beside its in-run baseline, at sizes that fit
    /// one sitting; then one summary table (the one that opens docs/benchmarks.md).
    All(all::AllArgs),
    /// WAL decode-and-emit throughput of walsync-source beside pg_recvlogical.
    Source(source::SourceArgs),
    /// The replicator's own work (rules and store) on decoded changes, without PostgreSQL.
    Apply(apply::ApplyArgs),
    /// redb against fjall on the bucket store's write pattern.
    Engines(engines::EngineArgs),
    /// The whole replicator (WAL to durable buckets) beside pg_recvlogical; checkpoint cost.
    Replicator(replicator::ReplicatorArgs),
    /// The initial snapshot through the replicator: rows/s and peak memory by table size.
    Snapshot(snapshot::SnapshotArgs),
    /// Peak memory of the replicator over one huge transaction, a re-copy and a TRUNCATE.
    Memory(memory::MemoryArgs),
    /// The store's size under steady updates, with background compaction and without.
    Compaction(compaction::CompactionArgs),
    /// The sync API: commit-to-client latency, concurrent streams and memory, initial download.
    Sync(sync::SyncArgs),
    /// Presence fan-out: users in rooms over gRPC, messages delivered per second and their
    /// latency.
    Presence(presence::PresenceArgs),
    /// The real PowerSync Node.js client's initial download over NDJSON, BSON and RSocket,
    /// beside walsync's Rust client on the same bucket.
    Client(client::ClientArgs),
    /// Sync Streams: one user's full checkpoint at 50,000 buckets, from a default stream, from
    /// as many subscriptions, and from both.
    Streams(streams::StreamsArgs),
    /// Uploads through `POST /write` beside the same changes written straight to PostgreSQL;
    /// the time from an upload's reply to the writer's own stream holding it.
    Upload(upload::UploadArgs),
    /// `walsync serve` itself: `sync` runs the server it measures as a child process of this
    /// binary, with the shipping binary's code.
    #[command(hide = true)]
    Serve(walsync::serve::ServeArgs),
}

fn main() -> anyhow::Result<()> {
    walsync::cli::init_logging(walsync::cli::LogFormat::Text);
    let args = BenchArgs::parse();
    match args.which {
        Which::Source(a) => source::run(a),
        Which::Apply(a) => apply::run(a),
        Which::Engines(a) => engines::run(a),
        Which::All(a) => all::run(a).map(drop),
        Which::Replicator(a) => replicator::run(a).map(drop),
        Which::Snapshot(a) => snapshot::run(a).map(drop),
        Which::Memory(a) => memory::run(a).map(drop),
        Which::Compaction(a) => compaction::run(a),
        Which::Sync(a) => sync::run(a).map(drop),
        Which::Presence(a) => presence::run(a),
        Which::Upload(a) => upload::run(a).map(drop),
        Which::Streams(a) => streams::run(a).map(drop),
        Which::Client(a) => client::run(a).map(drop),
        Which::Serve(a) => walsync::serve::serve(a),
    }
}

/// Facts about the machine, printed with every table.
fn machine_facts() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    format!(
        "{cpu}, {cores} cores, {:.0} GiB",
        mem_kib as f64 / 1024.0 / 1024.0
    )
}
