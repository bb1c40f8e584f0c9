//! The `walsync` command.

// A command-line program: printing to stdout is its job.
#![allow(clippy::print_stdout)]

mod bench;
mod demo;
mod replicate;

use clap::{Parser, Subcommand};

/// The replicator allocates per row (decoded values, JSON, keys); mimalloc measured faster than
/// glibc's allocator there, where malloc was the largest single item of the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "walsync",
    version,
    about = "Streams PostgreSQL changes into per-user sync buckets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure walsync against its baselines on a throwaway PostgreSQL and print a table.
    /// The whole pipeline on a throwaway PostgreSQL: seed schema and rules, the replicator,
    /// simulated interviewers and a client per user verifying its buckets.
    Demo(demo::DemoArgs),
    Bench(bench::BenchArgs),
    /// Replicate PostgreSQL into the bucket store (no API yet) until interrupted.
    Replicate(replicate::ReplicateArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,walsync=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Replicate(args) => replicate::run(args),
    }
}
