//! The replicator against real PostgreSQL with the seed app's schema and rules: after catch-up
//! every bucket, replayed from storage, holds exactly what the rules select from PostgreSQL, and
//! every bucket's checksum is the sum of its ops; also across injected crashes.

#[path = "support/seed.rs"]
mod seed;

use seed::{config, setup, spawn, wait_until_equal, workload};
use walsync_replicator::ReplicatorError;
use walsync_storage::BucketStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_match_postgres_after_random_changes() -> anyhow::Result<()> {
    let s = setup().await?;
    let (stop, task) = spawn(&s, config(&s));
    workload(&s.sql, 7, 300).await?;
    wait_until_equal(&s).await?;
    // Stop and start again: resumes from the store without a second snapshot.
    stop.send(true)?;
    task.await??;
    let before = s.store.checkpoint()?;
    let (stop, task) = spawn(&s, config(&s));
    workload(&s.sql, 11, 100).await?;
    wait_until_equal(&s).await?;
    assert!(s.store.checkpoint()?.op_id > before.op_id);
    stop.send(true)?;
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_between_storage_commit_and_ack_lose_nothing_and_repeat_nothing()
-> anyhow::Result<()> {
    let s = setup().await?;
    let mut crashes = 0;
    // Crash after the 2nd, 5th, 9th … storage commit of each run, while the workload runs.
    let work = {
        let url = s.url.clone();
        tokio::spawn(async move {
            let (sql, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            workload(&sql, 23, 400).await
        })
    };
    for after in [2u64, 5, 9, 3, 6] {
        let mut c = config(&s);
        c.fail_after_commits = Some(after);
        let (_stop, task) = spawn(&s, c);
        match task.await? {
            Err(ReplicatorError::Injected(_)) => crashes += 1,
            Ok(()) => {}
            Err(e) => return Err(e.into()),
        }
    }
    work.await??;
    assert!(crashes >= 3, "the faults fired ({crashes})");
    let (stop, task) = spawn(&s, config(&s));
    wait_until_equal(&s).await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}
