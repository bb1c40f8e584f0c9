//! `walsync replicate`: runs the replicator alone (WAL → durable buckets) until interrupted.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;
use tracing::{Instrument, info_span};
use walsync_replicator::{Progress, ReplicatorConfig};
use walsync_rules::SyncRules;
use walsync_source::{PgConfig, PublicationScope, SourceConfig};
use walsync_storage::KvStore;

#[derive(Debug, Args)]
pub(crate) struct ReplicateArgs {
    /// PostgreSQL URL (libpq form; sslmode and sslrootcert understood).
    #[arg(long, env = "WALSYNC__SOURCE__URL")]
    url: String,
    /// Sync rules (PowerSync bucket_definitions YAML).
    #[arg(long)]
    rules: PathBuf,
    /// Directory of the embedded bucket store.
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value = "walsync")]
    slot: String,
    #[arg(long, default_value = "walsync")]
    publication: String,
    /// Create the publication for the tables the rules read, when it is missing.
    #[arg(long)]
    create_publication: bool,
}

pub(crate) fn run(args: ReplicateArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.rules)
        .with_context(|| format!("reading {}", args.rules.display()))?;
    let rules = Arc::new(SyncRules::from_yaml(&text)?);
    for w in rules.warnings() {
        tracing::warn!(warning = %w, "sync rules");
    }
    let pg: PgConfig = args.url.parse()?;
    let mut source = SourceConfig::new(pg, args.slot, args.publication);
    source.required_tables = rules.qualified_tables();
    if args.create_publication {
        source.create_publication = Some(PublicationScope::Tables(rules.qualified_tables()));
    }
    let store = Arc::new(KvStore::open(&args.data_dir)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (progress, _) = watch::channel(Progress::default());
        let task = tokio::spawn(
            walsync_replicator::run(
                ReplicatorConfig::new(source),
                rules,
                store,
                stop_rx,
                progress,
            )
            .instrument(info_span!("walsync-replicator")),
        );
        tokio::spawn(
            async move {
                shutdown_signal().await;
                tracing::info!("stopping");
                let _ = stop_tx.send(true);
            }
            .instrument(info_span!("walsync-signals")),
        );
        task.await??;
        anyhow::Ok(())
    })
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
