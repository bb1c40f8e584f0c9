//! The store's disk fills up under a workload: walsync stops taking changes with a clear error
//! (not ready, the reason in the log and in `walsync status`' problems), acknowledges nothing it
//! did not make durable, keeps serving what it has, and carries on by itself once space returns,
//! with every client converging on what PostgreSQL holds.
//!
//! The store lives on a small tmpfs mounted for the test (root only: elsewhere the test says it
//! was skipped and why).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::process::{free_port, serve, token, wait_ready};
use support::{converge, seed, service};
use walsync::Service;
use walsync_client::{Connector, SyncClient, Transport};
use walsync_server::ServerConfig;

const BIN: &str = env!("CARGO_BIN_EXE_walsync-cli");

/// A tmpfs of `size`, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> anyhow::Result<Option<Tmpfs>> {
        let dir = tempfile::tempdir()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status();
        Ok(match status {
            Ok(s) if s.success() => Some(Tmpfs {
                path: dir.path().to_owned(),
                _dir: dir,
            }),
            _ => None,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Bytes free on the filesystem of `dir`.
fn free(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let avail = text.lines().nth(1).unwrap_or_default().trim().parse()?;
    Ok(avail)
}

/// Fills the filesystem of `dir` with one file until at most `leave` bytes are free (0: until
/// it refuses more).
fn fill(dir: &Path, leave: u64) -> anyhow::Result<PathBuf> {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0xa5u8; 256 * 1024];
    while free(dir)? > leave {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e.into()),
        }
    }
    f.sync_all()?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_replication_clearly_and_loses_nothing() -> anyhow::Result<()> {
    let Some(disk) = Tmpfs::mount("96m")? else {
        eprintln!("skipped: mounting a tmpfs needs root, and this test fills one");
        return Ok(());
    };
    walsync_client::install_crypto();
    let s = seed::setup().await?;
    let mut config = service::config(&s, ServerConfig::default());
    config.storage.dir = disk.path.join("store");
    config.storage.min_free_mib = 32;
    let service = Service::start(config).await?;
    let url = service.url();
    let mut clients: Vec<(String, SyncClient)> = Vec::new();
    for (i, user) in walsync_testkit::seed::USERS.iter().enumerate() {
        let transport = if i % 2 == 0 {
            Transport::Http
        } else {
            Transport::Grpc
        };
        let connector = Connector::new(&url, transport, &service::token(user))?;
        clients.push((
            (*user).to_owned(),
            SyncClient::new(connector, &format!("c{i}")),
        ));
    }
    converge::converged(&s, &mut clients, service::WAIT).await?;
    service::until_ready_is(&url, 200, service::WAIT).await?;

    // Something else fills the disk to below walsync's reserve; the application goes on
    // writing, rows large enough that the store must write them out.
    let filler = fill(&disk.path, 16 << 20)?;
    for round in 0..20 {
        s.sql
            .batch_execute(&format!(
                "UPDATE assessment_responses SET answer = repeat(md5('{round}' || id::text), 200)"
            ))
            .await?;
        seed::workload(&s.sql, 500 + round, 20).await?;
    }
    let refused = service::until_ready_is(&url, 503, Duration::from_secs(60)).await?;
    eprintln!("not ready while the disk is full: {refused}");
    assert!(
        refused.contains("space"),
        "the reason names the full disk: {refused}"
    );
    // Live, and the clients' streams still answer from what the store holds.
    let live = reqwest::get(format!("{url}/health/live")).await?;
    assert!(live.status().is_success(), "the process stays up");

    // Space returns: walsync carries on by itself.
    std::fs::remove_file(&filler)?;
    service::until_ready_is(&url, 200, Duration::from_secs(120)).await?;
    seed::workload(&s.sql, 999, 30).await?;
    converge::converged(&s, &mut clients, Duration::from_secs(60)).await?;
    service.stop().await;
    service::ack_rule_held(&s, &disk.path.join("store")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_meets_a_full_disk_stops_the_process_and_a_restart_loses_nothing()
-> anyhow::Result<()> {
    let Some(disk) = Tmpfs::mount("96m")? else {
        eprintln!("skipped: mounting a tmpfs needs root, and this test fills one");
        return Ok(());
    };
    walsync_client::install_crypto();
    let s = seed::setup().await?;
    let data = disk.path.join("store");
    let logs = tempfile::tempdir()?;
    let log_path = logs.path().join("serve.log");
    let log = std::fs::File::create(&log_path)?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let no_reserve = [("WALSYNC__STORAGE__MIN_FREE_MIB", "0")];
    let mut server = serve(BIN, &s, &data, port, &log, &no_reserve)?;
    wait_ready(port).await?;
    let mut clients: Vec<(String, SyncClient)> = Vec::new();
    for (i, user) in walsync_testkit::seed::USERS.iter().enumerate() {
        let connector = Connector::new(&url, Transport::Http, &token(user)?)?;
        clients.push((
            (*user).to_owned(),
            SyncClient::new(connector, &format!("c{i}")),
        ));
    }
    converge::converged(&s, &mut clients, service::WAIT).await?;

    let filler = fill(&disk.path, 0)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    let status = loop {
        if let Some(status) = server.0.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "walsync kept running on a full disk with no reserve"
        );
        round += 1;
        s.sql
            .batch_execute(&format!(
                "UPDATE assessment_responses SET answer = repeat(md5('{round}' || id::text), 200)"
            ))
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(&log_path)?;
    assert!(!status.success(), "exited with an error");
    assert!(
        text.contains("restart walsync once the cause is fixed"),
        "the log says what happened and what to do:\n{text}"
    );

    std::fs::remove_file(&filler)?;
    service::ack_rule_held(&s, &data).await?;
    let _server = serve(BIN, &s, &data, port, &log, &no_reserve)?;
    wait_ready(port).await?;
    seed::workload(&s.sql, 4242, 30).await?;
    converge::converged(&s, &mut clients, Duration::from_secs(60)).await?;
    Ok(())
}
