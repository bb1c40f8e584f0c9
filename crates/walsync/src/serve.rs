//! `walsync serve`, `walsync token` and `walsync tail`.

// A command: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use walsync_client::{ClientError, Connector, Event, SyncClient, Transport};
use walsync_protocol::SyncRequest;
use walsync_server::mint_hs256;

use crate::{Config, Service};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (every key can be overridden as WALSYNC__SECTION__KEY).
    #[arg(long, default_value = "walsync.toml")]
    config: PathBuf,
    /// What this process does: everything (`all`), or, with the store in PostgreSQL
    /// (`storage.postgres`), only replication (`replicator`: one at a time, the others stand
    /// by) or only serving clients (`api`). Overrides the configuration's `role`.
    #[arg(long, value_enum)]
    role: Option<crate::config::Role>,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(role) = args.role {
        config.role = role;
    }
    tracing::info!(config = ?config, "starting");
    runtime()?.block_on(async move {
        let mut service = Service::start(config).await?;
        tokio::select! {
            r = service.wait() => {
                // Logged as well as returned, so that a JSON log says why the process ended.
                if let Err(e) = &r {
                    tracing::error!(error = %e, "replication stopped: walsync exits");
                }
                r.context("replication stopped")?
            }
            _ = crate::replicate::shutdown_signal() => tracing::info!("stopping"),
        }
        service.stop().await;
        anyhow::Ok(())
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    user: String,
    /// The configuration file whose `auth.secret` (and first `auth.audience`) sign the token.
    #[arg(long, default_value = "walsync.toml")]
    config: PathBuf,
    /// Lifetime in seconds (at most the configured maximum).
    #[arg(long, default_value_t = 3600)]
    seconds: u64,
}

fn dev_token(config: &Config, user: &str, seconds: u64) -> anyhow::Result<String> {
    let secret = config
        .auth
        .secret
        .as_deref()
        .context("auth.secret is not set: dev tokens are signed with the shared secret")?;
    let lifetime = Duration::from_secs(seconds).min(config.auth.max_lifetime());
    Ok(mint_hs256(
        secret,
        user,
        config.auth.audience.first().map(String::as_str),
        lifetime,
    )?)
}

pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    println!("{}", dev_token(&config, &args.user, args.seconds)?);
    Ok(())
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The user whose stream to watch (a dev token is minted from the config's secret).
    #[arg(long)]
    user: Option<String>,
    /// A token to use instead of minting one.
    #[arg(long, env = "WALSYNC_TOKEN")]
    token: Option<String>,
    /// The server (default: the configured listen address).
    #[arg(long)]
    url: Option<String>,
    #[arg(long, default_value = "walsync.toml")]
    config: PathBuf,
    /// Use gRPC instead of the HTTP stream.
    #[arg(long)]
    grpc: bool,
    /// Print every line in full (data pages included) instead of a summary.
    #[arg(long)]
    raw: bool,
}

pub fn tail(args: TailArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config).ok();
    let token = match (&args.token, &args.user) {
        (Some(t), _) => t.clone(),
        (None, Some(user)) => dev_token(
            config
                .as_ref()
                .context("--user needs a readable config file with auth.secret")?,
            user,
            3600,
        )?,
        (None, None) => anyhow::bail!("give --user (with a config) or --token"),
    };
    let url = match (&args.url, &config) {
        (Some(u), _) => u.clone(),
        (None, Some(c)) => format!("http://{}", c.server.listen),
        (None, None) => anyhow::bail!("give --url or a config file"),
    };
    let transport = if args.grpc {
        Transport::Grpc
    } else {
        Transport::Http
    };
    runtime()?.block_on(async move {
        let connector = Connector::new(&url, transport, &token)?;
        if args.raw {
            use futures_util::StreamExt;
            let mut lines = connector.open(SyncRequest::default()).await?;
            while let Some(line) = lines.next().await {
                println!("{}", String::from_utf8_lossy(&line?.to_ndjson()).trim_end());
            }
            return anyhow::Ok(());
        }
        let mut client = SyncClient::new(connector, "walsync-tail");
        loop {
            match client.next_event().await {
                Ok(Event::Checkpoint { last_op_id }) => println!("checkpoint {last_op_id}"),
                Ok(Event::Data { bucket, ops }) => println!("  data {bucket}: {ops} ops"),
                Ok(Event::PartialComplete { priority, .. }) => {
                    println!("  priority {priority} complete")
                }
                Ok(Event::Complete { last_op_id }) => {
                    let s = client.state();
                    let rows: usize = s.buckets().values().map(|b| b.rows.len()).sum();
                    println!(
                        "checkpoint {last_op_id} complete: {} buckets, {rows} rows, checksums verified",
                        s.buckets().len()
                    );
                }
                Ok(Event::TokenExpiresIn(s)) => println!("  token expires in {s} s"),
                Err(ClientError::Unauthenticated(m)) => anyhow::bail!("unauthenticated: {m}"),
                Err(e) => {
                    println!("stream: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The configuration file whose `storage` says where the store is.
    #[arg(long, default_value = "walsync.toml")]
    config: PathBuf,
}

/// Compacts every bucket and prunes all history up to the store's checkpoint: with walsync
/// stopped no stream waits on it, and clients that connect later start with a full checkpoint.
pub fn compact(args: CompactArgs) -> anyhow::Result<()> {
    use walsync_storage::{BucketStore, StoreRead};
    let config = Config::load(&args.config)?;
    let store = runtime()?
        .block_on(config.storage.open())
        .with_context(|| match &config.storage.postgres {
            None => format!(
                "opening the store in {} (is walsync still running?)",
                config.storage.dir.display()
            ),
            Some(pg) => format!("opening the store in postgresql (schema {})", pg.schema),
        })?;
    let before = store.size_on_disk()?;
    let mark = store.checkpoint()?.op_id;
    let maintenance = crate::maintenance::MaintenanceConfig {
        compact_pause_ms: 0,
        ..config.storage.maintenance()
    };
    let pass = crate::maintenance::pass(&store, mark, &maintenance)?;
    println!(
        "compacted: {} ops moved, {} cleared; pruned {} change-log entries and {} lookup entries; {} steps",
        pass.compacted.moved,
        pass.compacted.cleared,
        pass.pruned_changes,
        pass.pruned_lookups,
        pass.steps
    );
    println!(
        "store size: {before} bytes before, {} bytes now (the engine reclaims space as it compacts its files)",
        store.size_on_disk()?
    );
    Ok(())
}
