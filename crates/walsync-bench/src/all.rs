//! `walsync-bench all`: every benchmark with a published figure, each beside its in-run
//! baseline, at sizes that fit one sitting, then one summary table (the table that opens
//! docs/benchmarks.md). Each benchmark also prints its own full table as it finishes.

use std::path::PathBuf;

use clap::Args;

use super::summary::Summary;
use super::{memory, replicator, snapshot, streams, sync, upload};

#[derive(Debug, Args)]
pub(crate) struct AllArgs {
    /// Rows of each replication workload (one transaction of them, and as many in transactions
    /// of 100); five times as many for the snapshot and the memory benchmark.
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Single-row transactions, written one after another as fast as one writer can.
    #[arg(long, default_value_t = 20_000)]
    single: u64,
    /// Runs of each tool per replication workload (medians reported, order alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Client counts of the commit-to-client latency benchmark, over HTTP and gRPC each.
    #[arg(long, default_value = "1000,10000")]
    clients: String,
    /// Also write the summary (with the date and the machine) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A benchmark's arguments, parsed from `argv` as its own subcommand would.
fn args<T: Args + clap::FromArgMatches>(argv: &[&str]) -> anyhow::Result<T> {
    let command = T::augment_args(clap::Command::new("walsync-bench"));
    let matches = command
        .try_get_matches_from(std::iter::once("walsync-bench").chain(argv.iter().copied()))?;
    Ok(T::from_arg_matches(&matches)?)
}

/// Keeps the figures whose description contains `wanted`.
fn only(summary: Summary, wanted: &str) -> Summary {
    Summary(
        summary
            .0
            .into_iter()
            .filter(|f| f.what.contains(wanted))
            .collect(),
    )
}

pub(crate) fn run(a: AllArgs) -> anyhow::Result<Summary> {
    let mut out = Summary::default();
    let (rows, txns, runs) = (
        a.rows.to_string(),
        (a.rows / 100).max(1).to_string(),
        a.runs.to_string(),
    );
    // Replication: serial and random text keys (the checkpoint figures once), the seed app's
    // mix of inserts, updates and deletes on text UUID keys, and single-row transactions.
    for (i, key) in ["bigint", "uuid4"].into_iter().enumerate() {
        eprintln!("== replication, {key} keys");
        let s = replicator::run(args(&[
            "--big-rows",
            &rows,
            "--txns",
            &txns,
            "--rows-per-txn",
            "100",
            "--key",
            key,
            "--runs",
            &runs,
        ])?)?;
        out.extend(if i == 0 { s } else { only(s, "replication") });
    }
    eprintln!("== replication, mixed changes on uuid4 keys");
    let s = replicator::run(args(&[
        "--big-rows",
        &rows,
        "--txns",
        &txns,
        "--key",
        "uuid4",
        "--mixed",
        "--runs",
        &runs,
    ])?)?;
    out.extend(only(s, "inserts"));
    eprintln!("== replication, single-row transactions");
    let single = a.single.to_string();
    let s = replicator::run(args(&[
        "--big-rows",
        "1000",
        "--txns",
        &single,
        "--rows-per-txn",
        "1",
        "--key",
        "uuid4",
        "--runs",
        &runs,
    ])?)?;
    out.extend(only(s, "of 1 rows"));
    // The initial snapshot and the memory of huge transactions.
    let big = (a.rows * 5).to_string();
    for key in ["bigint", "uuid4"] {
        eprintln!("== snapshot, {key} keys");
        out.extend(snapshot::run(args(&["--rows", &big, "--key", key])?)?);
    }
    eprintln!("== memory");
    out.extend(memory::run(args(&["--rows", &big, "--key", "uuid4"])?)?);
    // Serving: latency over both transports, streams per process, initial download.
    eprintln!("== sync");
    out.extend(sync::run(args(&[
        "--clients",
        &a.clients,
        "--transports",
        "grpc,http",
    ])?)?);
    // Writes.
    eprintln!("== sync streams");
    out.extend(streams::run(args(&[])?)?);
    eprintln!("== upload");
    out.extend(upload::run(args(&[])?)?);

    let date = std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let text = format!(
        "walsync-bench all, {date}: {}; PostgreSQL from walsync-testkit on the same machine\n\n{}",
        super::machine_facts(),
        out.markdown()
    );
    println!("\n{text}");
    if let Some(path) = a.out {
        std::fs::write(path, &text)?;
    }
    Ok(out)
}
