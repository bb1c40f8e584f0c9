//! The `walsync` command.

// A command-line program: printing to stdout is its job.
#![allow(clippy::print_stdout)]

mod bench;
mod demo;
mod replicate;
mod serve;

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
    /// The whole service on a throwaway PostgreSQL: seed schema and rules, the sync API, a token
    /// with curl/grpcurl lines, simulated interviewers and a client per user.
    Demo(demo::DemoArgs),
    /// Measure walsync against its baselines on a throwaway PostgreSQL and print a table.
    Bench(bench::BenchArgs),
    /// Replicate PostgreSQL into the bucket store (without the sync API) until interrupted.
    Replicate(replicate::ReplicateArgs),
    /// Run the service: replication and the sync API (HTTP, gRPC, grpc-web) on one port.
    Serve(serve::ServeArgs),
    /// Mint a development token for a user from the configured shared secret.
    Token(serve::TokenArgs),
    /// Watch a user's sync stream in the terminal.
    Tail(serve::TailArgs),
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
        Command::Serve(args) => serve::serve(args),
        Command::Token(args) => serve::token(args),
        Command::Tail(args) => serve::tail(args),
    }
}
