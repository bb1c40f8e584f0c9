//! PostgreSQL disappears while clients stream: their streams stay open with what they have, a
//! write checkpoint gets a clear 503, and when PostgreSQL is back the changes flow again.

use std::time::Duration;

use walsync::config::{PostgresConfig, StorageConfig, SyncSection};
use walsync::{Config, Service};
use walsync_client::{ClientError, Connector, SyncClient, Transport};
use walsync_server::{AuthConfig, ServerConfig, mint_hs256};
use walsync_testkit::{Cluster, ClusterOptions};

use walsync_testkit::seed::{RULES_PATH as RULES, SCHEMA};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_postgres_outage() -> anyhow::Result<()> {
    if std::env::var("WALSYNC_TEST_PG_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: WALSYNC_TEST_PG_URL is set, and this test stops its own cluster");
        return Ok(());
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = Cluster::start(ClusterOptions::default())?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(SCHEMA).await?;
    sql.batch_execute(
        "CREATE PUBLICATION walsync FOR ALL TABLES;
         INSERT INTO projects (id, name, description) VALUES (1, 'p', 'before');
         INSERT INTO project_members (project_id, user_id, role) VALUES (1, 'u1', 'owner');",
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let service = Service::start(config(&db.url, dir.path())?).await?;
    let token = mint_hs256("s", "u1", None, Duration::from_secs(600))?;
    let wait = Duration::from_secs(60);
    let mut client = SyncClient::new(
        Connector::new(&service.url(), Transport::Http, &token)?,
        "c",
    );
    client
        .until(wait, |s| description_of(s).as_deref() == Some("before"))
        .await?;

    drop(sql);
    cluster.stop()?;
    // The stream stays open on what it has; a write checkpoint is refused clearly.
    match client.connector().write_checkpoint("c").await {
        Err(ClientError::Http {
            status: 503, code, ..
        }) => assert_eq!(code, "database_unavailable"),
        other => panic!("expected 503 database_unavailable, got {other:?}"),
    }
    let live = reqwest::get(format!("{}/health/live", service.url())).await?;
    assert!(live.status().is_success());
    // It says it is not ready while PostgreSQL is down (the monitor looks every second here),
    // and ready again once it is back.
    let ready_is = |want: u16| {
        let url = format!("{}/health/ready", service.url());
        async move {
            for _ in 0..300 {
                let status = reqwest::get(&url).await?.status().as_u16();
                if status == want {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::bail!("/health/ready never answered {want}")
        }
    };
    ready_is(503).await?;

    cluster.start_again()?;
    ready_is(200).await?;
    let sql = db.connect().await?;
    sql.batch_execute("UPDATE projects SET description = 'after' WHERE id = 1")
        .await?;
    client
        .until(wait, |s| description_of(s).as_deref() == Some("after"))
        .await?;
    assert_eq!(client.connects, 1, "the same stream carried on");
    let wcp = client.connector().write_checkpoint("c").await?;
    client
        .until(wait, |s| s.write_checkpoint().is_some_and(|w| w >= wcp))
        .await?;
    service.stop().await;
    Ok(())
}

fn config(url: &str, dir: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config {
        postgres: PostgresConfig {
            slot: "outage".into(),
            ..PostgresConfig::new(url)
        },
        rules: RULES.into(),
        storage: StorageConfig {
            dir: dir.join("store"),
            ..StorageConfig::default()
        },
        server: ServerConfig {
            listen: "127.0.0.1:0".parse()?,
            ..ServerConfig::default()
        },
        auth: AuthConfig {
            secret: Some("s".into()),
            ..AuthConfig::default()
        },
        sync: SyncSection::default(),
        metrics: walsync::telemetry::MetricsSection {
            poll_seconds: 1,
            ..Default::default()
        },
        wal_guard: Default::default(),
        writes: None,
        role: walsync::config::Role::All,
    })
}

/// PostgreSQL is down when walsync starts (or when the replicator starts a new session after a
/// cut-off transaction): the replicator waits it out with backoff instead of stopping the
/// process, and replicates once PostgreSQL is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicator_waits_for_a_postgres_that_is_down() -> anyhow::Result<()> {
    if std::env::var("WALSYNC_TEST_PG_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: stops its own cluster, which WALSYNC_TEST_PG_URL does not allow");
        return Ok(());
    }
    let cluster = Cluster::start(ClusterOptions::default())?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(SCHEMA).await?;
    sql.batch_execute(
        "CREATE PUBLICATION walsync FOR ALL TABLES;
         INSERT INTO projects (id, name, description) VALUES (1, 'p', 'before');
         INSERT INTO project_members (project_id, user_id, role) VALUES (1, 'u1', 'owner');",
    )
    .await?;
    drop(sql);
    cluster.stop()?;
    let dir = tempfile::tempdir()?;
    let mut service = Service::start(config(&db.url, dir.path())?).await?;
    // Several attempts fail meanwhile; the replicator must still be running afterwards.
    let waited = tokio::time::timeout(Duration::from_secs(3), service.wait()).await;
    assert!(waited.is_err(), "the replicator stopped: {waited:?}");
    let ready = reqwest::get(format!("{}/health/ready", service.url())).await?;
    assert_eq!(ready.status(), 503, "not ready while nothing is replicated");

    cluster.start_again()?;
    let token = mint_hs256("s", "u1", None, Duration::from_secs(600))?;
    let mut client = SyncClient::new(
        Connector::new(&service.url(), Transport::Http, &token)?,
        "c",
    );
    client
        .until(Duration::from_secs(60), |s| {
            description_of(s).as_deref() == Some("before")
        })
        .await?;
    service.stop().await;
    Ok(())
}

fn description_of(state: &walsync_client::ClientState) -> Option<String> {
    let rows = state.rows();
    let data = rows.get(&("projects".to_owned(), "1".to_owned()))?;
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    v["description"].as_str().map(str::to_owned)
}
