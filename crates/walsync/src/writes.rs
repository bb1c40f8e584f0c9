//! `walsync writes rejected|replay`: the dead letters of uploads, for the operator.

// A command whose output is for the operator.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::Config;

#[derive(Debug, Args)]
pub struct WritesArgs {
    /// The configuration file (its `[postgres]` and `[writes]`).
    #[arg(long, global = true, default_value = "walsync.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: WritesCommand,
}

#[derive(Debug, Subcommand)]
enum WritesCommand {
    /// List rejected client transactions (not yet replayed), oldest first.
    Rejected {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        /// Those already replayed as well.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Every dead letter as JSON, with its ops.
        #[arg(long)]
        json: bool,
    },
    /// Apply a rejected transaction again, as its user, once the cause is put right. Exits
    /// non-zero when it is refused again (it then stays in the dead letters).
    Replay {
        /// The dead letter's id (the first column of `rejected`).
        id: i64,
    },
}

pub fn run(args: WritesArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let writes = config
        .writes
        .clone()
        .with_context(|| format!("{} has no [writes] section", args.config.display()))?;
    let pg: walsync_source::PgConfig = config.postgres.url.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let uploads = crate::service::start_uploads(&writes, &pg).await?;
        match args.command {
            WritesCommand::Rejected {
                user,
                all,
                limit,
                json,
            } => {
                let letters = uploads.rejected(user.as_deref(), all, limit).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&letters)?);
                    return Ok(());
                }
                if letters.is_empty() {
                    println!("no rejected writes");
                }
                for l in letters {
                    let tables: std::collections::BTreeSet<&str> =
                        l.ops.iter().map(|o| o.table.as_str()).collect();
                    println!(
                        "{}\t{}\tuser {}\tclient {}\t{}\t{}: {}\t{} ops on {}{}",
                        l.id,
                        l.rejected_at,
                        l.user_id,
                        l.client_id,
                        l.tx_key,
                        l.code,
                        l.message,
                        l.ops.len(),
                        tables.into_iter().collect::<Vec<_>>().join(", "),
                        l.replayed_at
                            .map(|at| format!("\treplayed {at}"))
                            .unwrap_or_default(),
                    );
                }
                Ok(())
            }
            WritesCommand::Replay { id } => {
                let result = uploads.replay(id).await?;
                println!("{}", serde_json::to_string(&result)?);
                anyhow::ensure!(
                    result.status == walsync_write::Status::Applied,
                    "dead letter {id} was refused again: {}",
                    result.message.unwrap_or_default()
                );
                Ok(())
            }
        }
    })
}
