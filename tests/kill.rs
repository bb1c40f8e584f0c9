//! The replicator as a real process, killed with SIGKILL at arbitrary points while the
//! application writes: each restart resumes from the store, and at the end the buckets hold
//! exactly what the rules select from PostgreSQL.

use support::seed;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use walsync_storage::{KvStore, StoreRead};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_killed_at_random_points_resumes_without_loss_or_repeat() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    // The child process owns its own store directory (redb admits one process per file).
    let child_dir = tempfile::tempdir()?;
    let log = std::fs::File::create(child_dir.path().join("replicate.log"))?;
    let work = {
        let url = s.url.clone();
        tokio::spawn(async move {
            let (sql, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            seed::workload(&sql, 31, 500).await
        })
    };
    let data = child_dir.path().join("store");
    let mut kills = 0;
    for delay in [900u64, 350, 1200, 600, 250] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_walsync-cli"))
            .args([
                "replicate",
                "--url",
                &s.url,
                "--rules",
                seed::RULES_PATH,
                "--slot",
                &s.slot,
            ])
            .arg("--data-dir")
            .arg(&data)
            .env(
                "RUST_LOG",
                "walsync=debug,walsync_replicator=debug,walsync_source=info",
            )
            .stdout(Stdio::null())
            .stderr(log.try_clone()?)
            .spawn()?;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if child.try_wait()?.is_none() {
            child.kill()?;
            kills += 1;
        }
        child.wait()?;
    }
    work.await??;
    assert!(kills >= 4, "the process was running when killed ({kills})");

    // Catch up in-process on the killed process's store and compare with PostgreSQL.
    let store = Arc::new(KvStore::open(&data)?);
    assert!(
        store.checkpoint()?.op_id > 0,
        "the killed processes made progress"
    );
    let s = seed::Setup { store, ..s };
    let (stop, task) = seed::spawn(&s, seed::config(&s));
    let result = seed::wait_until_equal(&s).await;
    if result.is_err() {
        eprintln!(
            "{}",
            std::fs::read_to_string(child_dir.path().join("replicate.log")).unwrap_or_default()
        );
    }
    result?;
    stop.send(true)?;
    task.await??;
    Ok(())
}
