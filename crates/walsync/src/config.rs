//! `walsync.toml`: every key can be overridden from the environment as
//! `WALSYNC__<SECTION>__<KEY>` (for example `WALSYNC__AUTH__SECRET`,
//! `WALSYNC__SERVER__LISTEN`). Secrets are never logged: the `Debug` forms redact them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use walsync_server::{AuthConfig, ServerConfig};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub postgres: PostgresConfig,
    /// The sync rules YAML file (relative paths are relative to the config file).
    pub rules: PathBuf,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub server: ServerConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub metrics: crate::telemetry::MetricsSection,
    #[serde(default)]
    pub wal_guard: crate::wal_guard::WalGuardSection,
    /// Uploads (`POST /write`): off without this section.
    #[serde(default)]
    pub writes: Option<walsync_write::WriteConfig>,
    /// What this process does (`walsync serve --role`): everything, or with the store in
    /// PostgreSQL, only replication or only serving clients.
    #[serde(default)]
    pub role: Role,
}

/// What a `walsync serve` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Replication and clients, in one process.
    #[default]
    All,
    /// Replication into a store in PostgreSQL (one process at a time: the others wait as
    /// standbys), with its maintenance; it serves health and metrics.
    Replicator,
    /// Clients, from a store in PostgreSQL that a replicator elsewhere fills; never reads the
    /// source's WAL.
    Api,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Replicator => "replicator",
            Role::Api => "api",
        }
    }

    /// Whether this role replicates (when it holds the store's write lock).
    pub fn replicates(self) -> bool {
        matches!(self, Role::All | Role::Replicator)
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db?sslmode=...`
    pub url: String,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_slot")]
    pub publication: String,
    /// Create the publication (for the rules' tables) when it is missing.
    #[serde(default)]
    pub create_publication: bool,
    /// The replication connection is taken for dead after this long without a message from
    /// PostgreSQL (walsync asks for a keepalive at half of it), and made anew. Shorter notices a
    /// vanished server or network sooner.
    #[serde(default = "default_receive_timeout_seconds")]
    pub receive_timeout_seconds: u64,
}

fn default_slot() -> String {
    "walsync".into()
}

fn default_receive_timeout_seconds() -> u64 {
    walsync_source::DEFAULT_RECEIVE_TIMEOUT.as_secs()
}

impl PostgresConfig {
    /// The configuration with defaults for everything but where PostgreSQL is.
    pub fn new(url: impl Into<String>) -> PostgresConfig {
        PostgresConfig {
            url: url.into(),
            slot: default_slot(),
            publication: default_slot(),
            create_publication: false,
            receive_timeout_seconds: default_receive_timeout_seconds(),
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("create_publication", &self.create_publication)
            .field("receive_timeout_seconds", &self.receive_timeout_seconds)
            .finish()
    }
}

/// The connection string with any password replaced, for logs and `Debug`: in a URL's user info
/// or `password` parameter; a key-value string with a password is shown as its parsed parts.
pub fn redact_url(conn: &str) -> String {
    // Characters that need no percent-encoding in user info or a query.
    const REDACTED: &str = "***";
    if let Ok(mut url) = url::Url::parse(conn) {
        if url.password().is_some() {
            // Only fails for URLs without a host, which have no user info either.
            let _ = url.set_password(Some(REDACTED));
        }
        if url.query_pairs().any(|(k, _)| k == "password") {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" {
                        REDACTED.into()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        return url.to_string();
    }
    match conn.parse::<tokio_postgres::Config>() {
        Ok(c) if c.get_password().is_some() => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            let mut parts = vec![format!("host={}", hosts.join(","))];
            if let Some(user) = c.get_user() {
                parts.push(format!("user={user}"));
            }
            if let Some(db) = c.get_dbname() {
                parts.push(format!("dbname={db}"));
            }
            parts.push(format!("password={REDACTED}"));
            parts.join(" ")
        }
        Ok(_) => conn.to_owned(),
        // Unparseable: it may hold a password anywhere.
        Err(_) => REDACTED.to_owned(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub dir: PathBuf,
    /// Seconds between compaction passes (0: never; `walsync compact` still works).
    pub compact_interval_seconds: u64,
    /// Ops read per compaction step (one write transaction).
    pub compact_batch_ops: usize,
    /// Milliseconds between compaction steps.
    pub compact_pause_ms: u64,
    /// MiB one storage write transaction holds in memory; a source transaction larger than
    /// that is staged in the store in steps of about this size (see ARCHITECTURE.md).
    pub memory_budget_mib: usize,
    /// MiB the store's filesystem keeps free: below it, replication and compaction pause with
    /// a clear error (the engine stops for good when a write meets a full disk) and resume
    /// once space is freed.
    pub min_free_mib: u64,
    /// Keep the store in PostgreSQL instead of `dir`: what several walsync processes share
    /// (one replicator, any number of API nodes).
    pub postgres: Option<StoragePostgres>,
}

/// A bucket store in PostgreSQL.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoragePostgres {
    /// The storage database, as `postgres.url` (it may be the source database or another).
    pub url: String,
    /// The schema of the store's tables, made at the first start.
    #[serde(default = "default_storage_schema")]
    pub schema: String,
    /// Connections for reads at most (the writer has one more).
    #[serde(default = "default_storage_pool")]
    pub pool_size: usize,
    /// Milliseconds between reads of the store's checkpoint by a process that does not write
    /// it, beside the notification of each commit (`LISTEN`): what bounds the delay when a
    /// notification is lost.
    #[serde(default = "default_storage_poll_ms")]
    pub poll_ms: u64,
}

fn default_storage_schema() -> String {
    "walsync_store".into()
}

fn default_storage_pool() -> usize {
    16
}

fn default_storage_poll_ms() -> u64 {
    1_000
}

impl std::fmt::Debug for StoragePostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoragePostgres")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("poll_ms", &self.poll_ms)
            .finish()
    }
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        let m = crate::maintenance::MaintenanceConfig::default();
        StorageConfig {
            dir: PathBuf::from("walsync-data"),
            compact_interval_seconds: m.compact_interval_seconds,
            compact_batch_ops: m.compact_batch_ops,
            compact_pause_ms: m.compact_pause_ms,
            memory_budget_mib: walsync_replicator::DEFAULT_MEMORY_BUDGET >> 20,
            min_free_mib: walsync_replicator::DEFAULT_MIN_FREE_BYTES >> 20,
            postgres: None,
        }
    }
}

impl StorageConfig {
    /// Opens the store: in `dir`, or in PostgreSQL (its tables made or migrated first).
    pub async fn open(&self) -> Result<walsync_storage::KvStore, crate::service::StartError> {
        let Some(pg) = &self.postgres else {
            let dir = self.dir.clone();
            return Ok(
                tokio::task::spawn_blocking(move || walsync_storage::KvStore::open(&dir))
                    .await
                    .map_err(|e| walsync_storage::StorageError::Engine(e.to_string()))??,
            );
        };
        let config: walsync_source::PgConfig = pg.url.parse()?;
        let config = std::sync::Arc::new(config);
        let connect: walsync_storage::Connect = std::sync::Arc::new(move || {
            let config = config.clone();
            Box::pin(async move { config.connect().await.map_err(Into::into) })
        });
        let (schema, pool) = (pg.schema.clone(), pg.pool_size.max(1));
        Ok(tokio::task::spawn_blocking(move || {
            walsync_storage::KvStore::open_postgres(connect, &schema, pool)
        })
        .await
        .map_err(|e| walsync_storage::StorageError::Engine(e.to_string()))??)
    }

    pub fn maintenance(&self) -> crate::maintenance::MaintenanceConfig {
        crate::maintenance::MaintenanceConfig {
            compact_interval_seconds: self.compact_interval_seconds,
            compact_batch_ops: self.compact_batch_ops,
            compact_pause_ms: self.compact_pause_ms,
            min_free_bytes: self.min_free_mib << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncSection {
    pub page_ops: usize,
    pub buffer_lines: usize,
    pub buffer_bytes: usize,
    pub keepalive_seconds: u64,
    pub token_refresh_lead_seconds: u64,
    pub stall_timeout_seconds: u64,
    pub presence: PresenceSection,
}

/// `[sync.presence]`: the limits of presence rooms.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceSection {
    /// A member silent this long (no update, message or heartbeat) leaves.
    pub timeout_seconds: u64,
    pub max_state_bytes: usize,
    pub max_message_bytes: usize,
    /// Rooms one client may be in at once.
    pub max_rooms: usize,
    /// Joins, updates and messages per client and second (bursts of twice that).
    pub rate_per_second: u32,
}

impl Default for PresenceSection {
    fn default() -> PresenceSection {
        let d = walsync_sync::PresenceConfig::default();
        PresenceSection {
            timeout_seconds: d.timeout.as_secs(),
            max_state_bytes: d.max_state_bytes,
            max_message_bytes: d.max_message_bytes,
            max_rooms: d.max_rooms,
            rate_per_second: d.rate_per_second,
        }
    }
}

impl Default for SyncSection {
    fn default() -> SyncSection {
        let d = walsync_sync::SyncConfig::default();
        SyncSection {
            page_ops: d.page_ops,
            buffer_lines: d.buffer_lines,
            buffer_bytes: d.buffer_bytes,
            keepalive_seconds: d.keepalive.as_secs(),
            token_refresh_lead_seconds: d.token_refresh_lead.as_secs(),
            stall_timeout_seconds: d.stall_timeout.as_secs(),
            presence: PresenceSection::default(),
        }
    }
}

impl SyncSection {
    pub fn to_sync_config(&self, max_line_bytes: usize) -> walsync_sync::SyncConfig {
        walsync_sync::SyncConfig {
            page_ops: self.page_ops,
            buffer_lines: self.buffer_lines,
            buffer_bytes: self.buffer_bytes,
            keepalive: Duration::from_secs(self.keepalive_seconds.max(1)),
            token_refresh_lead: Duration::from_secs(self.token_refresh_lead_seconds),
            stall_timeout: Duration::from_secs(self.stall_timeout_seconds.max(1)),
            max_line_bytes,
            presence: walsync_sync::PresenceConfig {
                timeout: Duration::from_secs(self.presence.timeout_seconds.max(1)),
                max_state_bytes: self.presence.max_state_bytes,
                max_message_bytes: self.presence.max_message_bytes,
                max_rooms: self.presence.max_rooms,
                rate_per_second: self.presence.rate_per_second.max(1),
                ..walsync_sync::PresenceConfig::default()
            },
            ..walsync_sync::SyncConfig::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Reads `path` (if it exists) and the `WALSYNC__…` environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let figment = Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed("WALSYNC__").split("__"));
        let mut config: Config = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.rules.is_relative() {
            config.rules = base.join(&config.rules);
        }
        if config.storage.dir.is_relative() {
            config.storage.dir = base.join(&config.storage.dir);
        }
        if let Some(f) = &config.auth.jwks_file
            && f.is_relative()
        {
            config.auth.jwks_file = Some(base.join(f));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=secret"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("host=h port=5 user=u password='se cret' dbname=db"),
            "host=h user=u dbname=db password=***"
        );
        assert_eq!(
            redact_url("host=h user=u dbname=db"),
            "host=h user=u dbname=db"
        );
        assert_eq!(redact_url("host='unterminated password=x"), "***");
    }

    /// `walsync.toml` holding `text`, in a folder of its own (kept while the first is).
    fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("walsync.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn file_then_environment() {
        let (_dir, path) = config_file(
            "rules = \"rules.yaml\"\n[postgres]\nurl = \"postgres://u:pw@h/db\"\n[auth]\nsecret = \"s3cret\"\naudience = [\"a\"]\n",
        );
        figment::Jail::expect_with(|jail| {
            jail.set_env("WALSYNC__SERVER__MAX_CONNECTIONS", "7");
            jail.set_env("WALSYNC__AUTH__SECRET", "from-env");
            let c = Config::load(&path).expect("load");
            assert_eq!(c.server.max_connections, 7);
            assert_eq!(c.auth.secret.as_deref(), Some("from-env"));
            assert!(c.rules.ends_with("rules.yaml"));
            let printed = format!("{c:?}");
            assert!(
                !printed.contains("from-env") && !printed.contains("pw@"),
                "{printed}"
            );
            Ok(())
        });
    }

    /// A predicate given through the environment as a bare `true` is that predicate.
    #[test]
    #[allow(clippy::result_large_err)]
    fn predicates_from_the_environment_may_be_bare_booleans() {
        let (_dir, path) = config_file(
            "rules = \"r\"\n[postgres]\nurl = \"x\"\n[auth]\nsecret = \"s\"\n[writes]\n",
        );
        figment::Jail::expect_with(|jail| {
            jail.set_env("WALSYNC__WRITES__TABLES__NOTES__UPDATE", "true");
            jail.set_env("WALSYNC__WRITES__TABLES__NOTES__DELETE", "false");
            jail.set_env(
                "WALSYNC__WRITES__TABLES__NOTES__INSERT",
                "new.owner = auth.user_id()",
            );
            let c = Config::load(&path).expect("load");
            let notes = &c.writes.expect("writes").tables["notes"];
            assert_eq!(notes.update.as_deref(), Some("true"));
            assert_eq!(notes.delete.as_deref(), Some("false"));
            assert_eq!(notes.insert.as_deref(), Some("new.owner = auth.user_id()"));
            Ok(())
        });
    }

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/walsync.toml");
        let c = Config::load(&path).expect("examples/walsync.toml");
        assert!(c.rules.ends_with("seed/sync_rules.yaml"));
        assert_eq!(c.auth.audience, vec!["walsync".to_owned()]);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("walsync.toml");
        std::fs::write(
            &path,
            "rules = \"r\"\n[postgres]\nurl = \"x\"\n[auth]\nsecret = \"s\"\n[server]\nlisten_port = 1\n",
        )
        .expect("write");
        let err = Config::load(&path).expect_err("unknown key");
        assert!(err.to_string().contains("listen_port"), "{err}");
    }
}
