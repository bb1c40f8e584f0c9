//! The whole service in one process: replicator → store → sync core → HTTP + gRPC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, info_span};
use walsync_replicator::{Progress, ReplicatorConfig};
use walsync_rules::SyncRules;
use walsync_source::{PgConfig, PublicationScope, SourceConfig};
use walsync_storage::KvStore;
use walsync_sync::SyncCore;

use walsync_server::{Authenticator, Connect, Server, WriteCheckpoints};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Rules(#[from] walsync_rules::RulesError),
    #[error(
        "the sync rules do not fit the database (walsync rules check --postgres lists the same):\n{0}"
    )]
    RulesCheck(String),
    #[error(transparent)]
    Source(#[from] walsync_source::SourceError),
    #[error(transparent)]
    Storage(#[from] walsync_storage::StorageError),
    #[error(transparent)]
    Keys(#[from] walsync_server::auth::KeyLoadError),
    #[error(transparent)]
    Writes(#[from] walsync_write::WriteError),
    #[error("{0}")]
    Role(&'static str),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running service.
#[derive(Debug)]
pub struct Service {
    pub addr: SocketAddr,
    pub server: Arc<Server<KvStore>>,
    pub progress: watch::Receiver<Progress>,
    stop: watch::Sender<bool>,
    replicator: JoinHandle<Result<(), walsync_replicator::ReplicatorError>>,
    http: JoinHandle<std::io::Result<()>>,
}

impl Service {
    /// Starts everything `config` describes; returns once the port is bound.
    pub async fn start(config: Config) -> Result<Service, StartError> {
        let text = std::fs::read_to_string(&config.rules).map_err(|source| StartError::Read {
            path: config.rules.display().to_string(),
            source,
        })?;
        let rules = Arc::new(SyncRules::from_yaml(&text)?);
        for w in rules.warnings() {
            tracing::warn!(warning = %w, "sync rules");
        }
        let pg: PgConfig = config.postgres.url.parse()?;
        check_rules(&rules, &pg).await?;
        let mut source = SourceConfig::new(
            pg.clone(),
            config.postgres.slot.clone(),
            config.postgres.publication.clone(),
        );
        source.required_tables = rules.qualified_tables();
        source.receive_timeout =
            Duration::from_secs(config.postgres.receive_timeout_seconds.max(1));
        if config.postgres.create_publication {
            source.create_publication = Some(PublicationScope::Tables(rules.qualified_tables()));
        }
        let role = config.role;
        if role != crate::config::Role::All && config.storage.postgres.is_none() {
            return Err(StartError::Role(
                "the replicator and api roles share a store in postgresql: set storage.postgres \
                 (an embedded store is one process's, which runs the role all)",
            ));
        }
        let store = Arc::new(config.storage.open().await?);
        let auth = Arc::new(Authenticator::new(config.auth.clone()).await?);
        let core = SyncCore::new(
            store.clone(),
            rules.clone(),
            config.sync.to_sync_config(config.server.max_line_bytes),
        );
        let (stop, stop_rx) = watch::channel(false);
        let (progress_tx, progress) = watch::channel(Progress::default());
        // Every task is named by its span, so that its log lines say which task wrote them.
        tokio::spawn(
            core.clone()
                .run(stop_rx.clone())
                .instrument(info_span!("walsync-hub")),
        );
        let metrics = crate::telemetry::recorder();
        let status = crate::telemetry::SharedStatus::default();
        crate::telemetry::record_leading(false);
        status.write().unwrap_or_else(|p| p.into_inner()).role = role.as_str().to_owned();
        // Replication's progress, reported by the process that replicates (started when it
        // leads): the hub learns of each commit, the metrics and the status of the rest.
        let report_progress = {
            let core = core.clone();
            let status = status.clone();
            let mut progress = progress.clone();
            async move {
                let mut before = Progress::default();
                crate::telemetry::record_state(before.state);
                while progress.changed().await.is_ok() {
                    core.notify_checkpoint();
                    let now = progress.borrow_and_update().clone();
                    crate::telemetry::record_progress(&status, &before, &now);
                    before = now;
                }
            }
            .instrument(info_span!("walsync-progress"))
        };
        let reachable = Arc::new(std::sync::atomic::AtomicBool::new(true));
        // A store shared in PostgreSQL: every process learns of the replicator's commits from
        // the store itself (the replicator's own progress reaches only its process).
        if let (Some(shared), Some(channel)) = (&config.storage.postgres, store.notify_channel()) {
            tokio::spawn(
                crate::shared::follow(
                    shared.url.parse()?,
                    channel,
                    core.clone(),
                    Duration::from_millis(shared.poll_ms),
                    stop_rx.clone(),
                )
                .instrument(info_span!("walsync-follow")),
            );
        }
        // Set while this process replicates (an embedded store: from the start; a shared one:
        // once it holds the store's write lock), and when its replicator ends (a definite
        // error, or a stop): then the process is no longer ready, since nothing new reaches
        // the store.
        let leading = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let replication_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let replicator = {
            let ended = replication_ended.clone();
            let leading = leading.clone();
            let mut replicator = ReplicatorConfig::new(source);
            replicator.memory_budget = config.storage.memory_budget_mib.max(1) << 20;
            replicator.min_free_bytes = config.storage.min_free_mib << 20;
            replicator.lagging_after = Duration::from_secs(config.metrics.lagging_seconds);
            // What runs beside replication, in the process that replicates: the WAL guard and
            // the slot's metrics, and the store's compaction.
            let monitor = crate::telemetry::monitor(
                config.wal_guard.clone(),
                status.clone(),
                rules.tables().iter().cloned().collect(),
                reachable.clone(),
                pg.clone(),
                config.postgres.slot.clone(),
                store.clone(),
                core.clone(),
                Duration::from_secs(config.metrics.poll_seconds.max(1)),
                stop_rx.clone(),
            )
            .instrument(info_span!("walsync-monitor"));
            let maintenance = crate::maintenance::run(
                store.clone(),
                config.storage.maintenance(),
                stop_rx.clone(),
            )
            .instrument(info_span!("walsync-maintenance"));
            let stop = stop_rx.clone();
            let status_of_lead = status.clone();
            tokio::spawn(
                async move {
                    if !role.replicates() {
                        let _ = stop.clone().wait_for(|s| *s).await;
                        return Ok(());
                    }
                    let result = match crate::shared::lead(store.clone(), stop.clone()).await {
                        Ok(true) => {
                            leading.store(true, std::sync::atomic::Ordering::Relaxed);
                            crate::telemetry::record_leading(true);
                            status_of_lead
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .replicating = true;
                            tokio::spawn(report_progress);
                            tokio::spawn(monitor);
                            tokio::spawn(maintenance);
                            walsync_replicator::run(replicator, rules, store, stop, progress_tx)
                                .await
                        }
                        Ok(false) => Ok(()),
                        Err(e) => Err(walsync_replicator::ReplicatorError::Storage(e)),
                    };
                    ended.store(true, std::sync::atomic::Ordering::Relaxed);
                    result
                }
                .instrument(info_span!("walsync-replicator")),
            )
        };
        let uploads = match &config.writes {
            Some(writes) => Some(start_uploads(writes, &pg).await?),
            None => None,
        };
        // Whether the hub serves a complete checkpoint: what a process that does not replicate
        // is ready on.
        let serving = core.clone();
        let server = Server::new(
            core,
            auth,
            config.server.clone(),
            Arc::new(WriteCheckpoints::new(
                connect_to(pg),
                config.server.write_checkpoint_pool(),
            )),
        );
        if let Some(uploads) = uploads {
            server.set_uploads(uploads);
        }
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.server.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.server.listen,
            source,
        })?;
        let mut stopped = stop_rx;
        let http = tokio::spawn(
            server
                .clone()
                .serve(listener, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .instrument(info_span!("walsync-http")),
        );
        server.set_metrics(Arc::new(move || metrics.render()));
        server.set_status(Arc::new(move || {
            let s = status.read().unwrap_or_else(|p| p.into_inner()).clone();
            serde_json::to_value(s).unwrap_or_default()
        }));
        // While PostgreSQL does not answer, or the source does not stream, the replicator waits
        // for it with backoff and the streams serve what the store holds; the process says it
        // is not ready. (A re-copy while the last checkpoint is served counts as streaming.)
        let state = progress.clone();
        server.set_readiness(Arc::new(move || {
            use std::sync::atomic::Ordering::Relaxed;
            use walsync_replicator::State;
            if replication_ended.load(Relaxed) {
                return Err("replication has stopped; the log says why".into());
            }
            // Serving a store another process replicates into (an API node, a standby).
            if !leading.load(Relaxed) {
                return if serving.serves() {
                    Ok(())
                } else {
                    Err(
                        "the store has no complete checkpoint yet (or cannot be read): \
                         the replicator is copying the tables"
                            .into(),
                    )
                };
            }
            if !reachable.load(Relaxed) {
                return Err("postgres is not reachable; replication resumes when it is".into());
            }
            match state.borrow().state {
                State::Connecting | State::Reconnecting => {
                    Err("replication is connecting to postgres".into())
                }
                State::SlotLost => Err(
                    "the replication slot was lost; it is made again and the tables copied anew"
                        .into(),
                ),
                State::DiskFull => Err(
                    "no space left for the store: replication waits until space is freed".into(),
                ),
                State::Stopped => Err("replication has stopped; the log says why".into()),
                State::Snapshotting | State::Rebuilding | State::Streaming | State::Lagging => {
                    Ok(())
                }
            }
        }));
        tracing::info!(%addr, "walsync is serving http, grpc, grpc-web and /metrics");
        Ok(Service {
            addr,
            server,
            progress,
            stop,
            replicator,
            http,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the replicator fails or the server stops; returns the replicator's error.
    pub async fn wait(&mut self) -> Result<(), walsync_replicator::ReplicatorError> {
        tokio::select! {
            r = &mut self.replicator => match r {
                Ok(r) => r,
                Err(e) => Err(walsync_replicator::ReplicatorError::Storage(
                    walsync_storage::StorageError::Engine(format!("replicator task: {e}")),
                )),
            },
            _ = &mut self.http => Ok(()),
        }
    }

    /// Stops everything and waits for the replicator to finish its commit. Streams end cleanly
    /// (HTTP bodies close, gRPC streams end with `UNAVAILABLE`) and requests in flight finish;
    /// connections still open after `server.shutdown_timeout_seconds` are closed.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = self.replicator.await;
        let grace = Duration::from_secs(self.server.config.shutdown_timeout_seconds);
        if tokio::time::timeout(grace, &mut self.http).await.is_err() {
            tracing::warn!(
                seconds = grace.as_secs(),
                "connections still open after the shutdown timeout are closed"
            );
            self.http.abort();
        }
    }
}

/// The checks of `walsync rules check --postgres`, before anything starts: rules that name a
/// missing column or fill one bucket parameter with values of different types are refused. A
/// database that cannot be reached now is not checked (the replicator waits for it).
async fn check_rules(rules: &SyncRules, pg: &PgConfig) -> Result<(), StartError> {
    let client = match pg.connect().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "could not check the sync rules against the database now");
            return Ok(());
        }
    };
    // The publication is checked (and, when walsync manages it, extended) by the replicator's
    // pre-flight, with the statement to run.
    match crate::rules_check::check_database(rules, &client, None).await {
        Ok(problems) if problems.is_empty() => Ok(()),
        Ok(problems) => Err(StartError::RulesCheck(
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "could not check the sync rules against the database now");
            Ok(())
        }
    }
}

/// The upload path: predicates parsed now; the catalog read and the predicates checked by
/// PostgreSQL now when it answers (a wrong table or column stops the start), else at the first
/// upload.
pub(crate) async fn start_uploads(
    writes: &walsync_write::WriteConfig,
    pg: &PgConfig,
) -> Result<Arc<walsync_write::Uploads>, StartError> {
    let pool = walsync_write::pg_pool(
        connect_to(pg.clone()),
        walsync_write::PoolSettings {
            size: writes.connections.max(1),
            timeout: writes.statement_timeout(),
        },
    );
    let uploads = Arc::new(walsync_write::Uploads::new(writes.clone(), pool)?);
    match uploads.prepare().await {
        Ok(()) => {}
        Err(walsync_write::WriteError::Unreachable(e)) => {
            tracing::warn!(error = %e, "the write rules are checked at the first upload: postgres does not answer now");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(uploads)
}

/// Write checkpoints connect to the source as the replicator does (TLS, session settings).
fn connect_to(pg: PgConfig) -> Connect {
    let pg = Arc::new(pg);
    Arc::new(move || {
        let pg = pg.clone();
        Box::pin(async move { pg.connect().await.map_err(Into::into) })
    })
}
