//! PostgreSQL restarted under a running source: the stream reconnects with backoff and loses
//! nothing, repeats nothing. Runs on a cluster of its own, since it restarts it.

mod support;

use std::collections::BTreeSet;

use support::{Collector, int};
use walsync_source::{Change, Resume};
use walsync_testkit::{Cluster, ClusterOptions};

#[tokio::test]
async fn postgres_restarted_mid_stream() -> anyhow::Result<()> {
    if std::env::var("WALSYNC_TEST_PG_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: WALSYNC_TEST_PG_URL is set, and this test restarts its own cluster");
        return Ok(());
    }
    // A logical walsender holds up a fast shutdown until the client confirms everything sent,
    // or until it has not heard from the client for wal_sender_timeout; this test's consumer
    // deliberately holds transactions unconfirmed while the reader keeps answering, so
    // PostgreSQL goes down as in a crash.
    let cluster = Cluster::start(ClusterOptions {
        // Commits on disk before they return, so that the crash loses none of them.
        settings: vec![
            ("wal_sender_timeout".into(), "'5s'".into()),
            ("synchronous_commit".into(), "on".into()),
        ],
        ..ClusterOptions::default()
    })?;
    let db = support::database(&cluster, "CREATE TABLE items (id int PRIMARY KEY)").await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    stream.ack(c.snapshot_done.expect("snapshot"));

    for i in 1..=50 {
        db.sql
            .execute("INSERT INTO items VALUES ($1)", &[&i])
            .await?;
    }
    c.until(&mut stream, |c| c.txns.len() >= 20).await?;
    // The consumer made the first 20 durable; the rest are in flight when PostgreSQL goes.
    stream.ack(c.txns[19].end_lsn);
    cluster.crash_restart()?;
    let sql = db.db.connect().await?;
    for i in 51..=100 {
        sql.execute("INSERT INTO items VALUES ($1)", &[&i]).await?;
    }
    c.until(&mut stream, |c| {
        c.changes()
            .any(|ch| matches!(ch, Change::Insert { new, .. } if int(new, 0) == 100))
    })
    .await?;
    let ids: Vec<i64> = c
        .changes()
        .map(|ch| match ch {
            Change::Insert { new, .. } => int(new, 0),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let unique: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "no transaction twice: {ids:?}");
    assert_eq!(unique, (1..=100).collect::<BTreeSet<i64>>(), "nothing lost");
    stream.stop().await;

    // Stopping PostgreSQL for a while: the source keeps retrying, then catches up.
    let mut stream = support::start(
        &db.url,
        Resume {
            durable: Some(c.txns.last().expect("txn").end_lsn),
            owns_slot: true,
        },
    )
    .await?;
    cluster.stop()?;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    cluster.start_again()?;
    let sql = db.db.connect().await?;
    sql.execute("INSERT INTO items VALUES (101)", &[]).await?;
    let mut after = Collector::default();
    after.until(&mut stream, |c| !c.txns.is_empty()).await?;
    let Change::Insert { new, .. } = &after.txns[0].changes[0] else {
        panic!("expected insert")
    };
    assert_eq!(int(new, 0), 101);
    stream.stop().await;
    Ok(())
}
