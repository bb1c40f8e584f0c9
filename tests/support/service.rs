//! The service under test: configuration, tokens, and what each user should hold.

use std::collections::BTreeMap;
use std::time::Duration;

use walsync::Config;
use walsync::config::{PostgresConfig, StorageConfig, SyncSection};
use walsync_server::{AuthConfig, ServerConfig, mint_hs256};

use crate::seed;

pub const SECRET: &str = "e2e-secret";
pub const AUDIENCE: &str = "walsync-e2e";
pub const WAIT: Duration = Duration::from_secs(30);

pub type Rows = BTreeMap<(String, String), String>;

pub fn config(s: &seed::Setup, server: ServerConfig) -> Config {
    Config {
        postgres: PostgresConfig {
            slot: s.slot.clone(),
            ..PostgresConfig::new(s.url.clone())
        },
        rules: seed::RULES_PATH.into(),
        storage: StorageConfig {
            dir: s.dir.path().join("service"),
            // Compaction and history pruning run all the time under the tests' clients.
            compact_interval_seconds: 1,
            compact_batch_ops: 50,
            ..StorageConfig::default()
        },
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..server
        },
        auth: AuthConfig {
            secret: Some(SECRET.into()),
            audience: vec![AUDIENCE.into()],
            ..AuthConfig::default()
        },
        sync: SyncSection {
            page_ops: 50,
            ..SyncSection::default()
        },
        metrics: walsync::telemetry::MetricsSection {
            poll_seconds: 1,
            ..Default::default()
        },
        wal_guard: Default::default(),
        writes: None,
        role: walsync::config::Role::All,
    }
}

pub fn token(user: &str) -> String {
    mint_hs256(SECRET, user, Some(AUDIENCE), Duration::from_secs(600)).expect("token")
}

/// What `user` should hold: the rows of `me["user"]` and of each project they are a member of.
pub async fn expected_for(s: &seed::Setup, user: &str) -> anyhow::Result<Rows> {
    let all = seed::expected(s).await?;
    let buckets = walsync_testkit::seed::user_buckets(&s.sql, user).await?;
    let mut out = Rows::new();
    for b in buckets {
        if let Some(rows) = all.get(&b) {
            out.extend(rows.clone());
        }
    }
    Ok(out)
}

/// Waits until `/health/ready` of the server at `url` answers `want`, for at most `wait`;
/// returns its body.
pub async fn until_ready_is(url: &str, want: u16, wait: Duration) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + wait;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    loop {
        let (status, body) = match http.get(format!("{url}/health/ready")).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        };
        if status == want {
            return Ok(body);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "/health/ready never answered {want} (last {status}: {body})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of metric `name`'s samples (over all its labels) at the server at `url`.
pub async fn metric(url: &str, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The ack rule on a store another process may be writing (one in PostgreSQL): the slot is read
/// first, so a replicator running meanwhile can only move the store past it.
pub async fn ack_rule_held_in(
    s: &seed::Setup,
    store: &walsync_storage::KvStore,
) -> anyhow::Result<()> {
    use walsync_storage::StoreRead;
    let confirmed: Option<String> = s
        .sql
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&s.slot],
        )
        .await?
        .and_then(|r| r.get(0));
    let durable = store.checkpoint()?.lsn;
    if let (Some(confirmed), Some(durable)) = (confirmed, durable) {
        let confirmed: walsync_types::Lsn = confirmed.parse()?;
        anyhow::ensure!(
            confirmed <= durable,
            "the slot confirmed {confirmed} past the store's {durable}"
        );
    }
    Ok(())
}

/// The ack rule, read after the fact: the slot never confirmed more than the store in `data`
/// made durable. (Nothing to compare while the slot is gone or the store holds no position of
/// it yet, as during a rebuild.)
pub async fn ack_rule_held(s: &seed::Setup, data: &std::path::Path) -> anyhow::Result<()> {
    use walsync_storage::StoreRead;
    let store = walsync_storage::KvStore::open(data)?;
    let slot = s
        .sql
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&s.slot],
        )
        .await?;
    if let (Some(durable), Some(slot)) = (store.checkpoint()?.lsn, slot) {
        let confirmed: walsync_types::Lsn = slot
            .get::<_, Option<String>>(0)
            .unwrap_or_default()
            .parse()?;
        anyhow::ensure!(
            confirmed <= durable,
            "the slot confirmed {confirmed} past the store's durable {durable}"
        );
    }
    Ok(())
}
