//! The replication connection stays up when nothing happens and when the consumer is busy: an
//! idle walsender is asked for a keepalive instead of being timed out, and status updates go
//! out while a full channel waits for the consumer (a walsender drops a connection it has not
//! heard from for `wal_sender_timeout`). Runs on a cluster of its own with a short
//! `wal_sender_timeout`.

mod support;

use std::time::Duration;

use support::Collector;
use walsync_source::{Change, Resume, Source};
use walsync_testkit::{Cluster, ClusterOptions};

/// The walsender serving `slot` (it changes when the connection is made again), once streaming
/// has started.
async fn walsender(sql: &tokio_postgres::Client, slot: &str) -> anyhow::Result<i32> {
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let pid: Option<i32> = sql
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0);
        if let Some(pid) = pid {
            return Ok(pid);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the slot never became active"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cluster() -> anyhow::Result<Option<Cluster>> {
    if std::env::var("WALSYNC_TEST_PG_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: needs a cluster of its own with a short wal_sender_timeout");
        return Ok(None);
    }
    Ok(Some(Cluster::start(ClusterOptions {
        settings: vec![("wal_sender_timeout".into(), "'2s'".into())],
        ..ClusterOptions::default()
    })?))
}

#[tokio::test]
async fn an_idle_connection_is_not_dropped() -> anyhow::Result<()> {
    let Some(cluster) = cluster()? else {
        return Ok(());
    };
    let db = support::database(&cluster, "CREATE TABLE items (id int PRIMARY KEY)").await?;
    let mut config = support::config(&db.url);
    // Status updates more often than the receive timeout, as by default (10 s and 120 s).
    config.status_interval = Duration::from_millis(300);
    config.receive_timeout = Duration::from_secs(3);
    let slot = config.slot.clone();
    let mut stream = Source::start(config, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    stream.ack(c.snapshot_done.expect("snapshot"));
    let before = walsender(&db.sql, &slot).await?;
    // Idle for three receive timeouts: the scenario is the passing of time itself.
    tokio::time::sleep(Duration::from_secs(9)).await;
    db.sql.batch_execute("INSERT INTO items VALUES (1)").await?;
    c.until(&mut stream, |c| c.changes().count() == 1).await?;
    assert_eq!(
        walsender(&db.sql, &slot).await?,
        before,
        "the same connection"
    );
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_busy_consumer_does_not_get_the_connection_dropped() -> anyhow::Result<()> {
    let Some(cluster) = cluster()? else {
        return Ok(());
    };
    let db = support::database(&cluster, "CREATE TABLE items (id int PRIMARY KEY)").await?;
    let mut config = support::config(&db.url);
    config.status_interval = Duration::from_millis(300);
    let slot = config.slot.clone();
    let mut stream = Source::start(config, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    stream.ack(c.snapshot_done.expect("snapshot"));
    let before = walsender(&db.sql, &slot).await?;
    // More events than the channel holds, then a consumer that takes none for three times
    // wal_sender_timeout (a huge TRUNCATE or a rebuild keeps it that busy).
    db.sql
        .batch_execute("INSERT INTO items SELECT generate_series(1, 100000)")
        .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    c.until(&mut stream, |c| {
        c.changes()
            .filter(|ch| matches!(ch, Change::Insert { .. }))
            .count()
            == 100_000
    })
    .await?;
    assert_eq!(c.rollbacks, 0, "the transaction was never cut off");
    assert_eq!(
        walsender(&db.sql, &slot).await?,
        before,
        "the same connection"
    );
    stream.stop().await;
    Ok(())
}
