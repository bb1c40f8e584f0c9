//! The `walsync` command line: parsing, logging, and the subcommands.

use clap::{Parser, Subcommand};

use crate::{demo, replicate, rules_check, serve, status, writes};

#[derive(Debug, Parser)]
#[command(
    name = "walsync",
    version,
    about = "Streams PostgreSQL changes into per-user sync buckets"
)]
struct Cli {
    /// How log lines are written to stderr: `text` (colour only on a terminal) or `json` (one
    /// object a line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "WALSYNC_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The form of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole service on a throwaway PostgreSQL: seed schema and rules, the sync API, a token
    /// with curl/grpcurl lines, simulated interviewers and a client per user.
    Demo(demo::DemoArgs),
    /// Replicate PostgreSQL into the bucket store (without the sync API) until interrupted.
    Replicate(replicate::ReplicateArgs),
    /// Run the service: replication and the sync API (HTTP, gRPC, grpc-web) on one port.
    Serve(serve::ServeArgs),
    /// Mint a development token for a user from the configured shared secret.
    Token(serve::TokenArgs),
    /// Watch a user's sync stream in the terminal.
    Tail(serve::TailArgs),
    /// A running instance at a glance: PostgreSQL, the slot and its WAL, replication lag, the
    /// snapshot's progress, the store, the streams (from its `/admin/status`).
    Status(status::StatusArgs),
    /// Sync rules: `walsync rules check FILE [--postgres URL]`.
    Rules(rules_check::RulesArgs),
    /// Uploads' dead letters: `walsync writes rejected` lists them, `walsync writes replay ID`
    /// applies one again.
    Writes(writes::WritesArgs),
    /// Compact the store and prune its history, while walsync is stopped (a running `walsync
    /// serve` does the same in the background).
    Compact(serve::CompactArgs),
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings, and walsync's own info lines),
/// as text (with colour only when stderr is a terminal) or as JSON lines.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,walsync=info".into());
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => lines.json().with_current_span(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(
            crate::telemetry::ProblemLayer
                .with_filter(tracing_subscriber::filter::LevelFilter::WARN),
        )
        .init();
}

/// Runs the command line of the `walsync` binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Replicate(args) => replicate::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::Token(args) => serve::token(args),
        Command::Tail(args) => serve::tail(args),
        Command::Compact(args) => serve::compact(args),
        Command::Rules(args) => rules_check::run(args),
        Command::Status(args) => status::run(args),
        Command::Writes(args) => writes::run(args),
    }
}
