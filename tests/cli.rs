//! The commands as a user runs them: `walsync serve --config`, `walsync token`, `walsync tail`
//! (summary and raw), and a graceful stop on SIGTERM.

use support::seed;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_walsync-cli");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `child`'s stdout until a line satisfies `want`, for at most 60 s.
fn read_until(child: &mut Child, want: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if want(&line) {
            return Ok(line);
        }
        seen.push(line);
    }
    anyhow::bail!("no such line; saw: {seen:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_token_and_tail_work_from_a_config_file() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = s.dir.path().join("walsync.toml");
    std::fs::write(
        &config,
        format!(
            "rules = \"{rules}\"\n[postgres]\nurl = \"{url}\"\nslot = \"{slot}\"\n[storage]\ndir = \"served\"\n[server]\nlisten = \"127.0.0.1:{port}\"\n[auth]\naudience = [\"cli\"]\n",
            rules = seed::RULES_PATH,
            url = s.url,
            slot = s.slot,
        ),
    )?;
    // The secret comes from the environment, as it should in production.
    let secret = "from-the-environment";
    let mut serve = Killed(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("WALSYNC__AUTH__SECRET", secret)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    walsync_client::install_crypto();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http
            .get(format!("http://127.0.0.1:{port}/health/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "walsync serve never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let token = Command::new(BIN)
        .args(["token", "--user", "u1", "--config"])
        .arg(&config)
        .env("WALSYNC__AUTH__SECRET", secret)
        .output()?;
    anyhow::ensure!(token.status.success(), "walsync token failed");
    let token = String::from_utf8(token.stdout)?.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a jwt: {token}");

    // tail --user: a summary per checkpoint, checksums verified.
    let mut tail = Killed(
        Command::new(BIN)
            .args(["tail", "--user", "u1", "--config"])
            .arg(&config)
            .env("WALSYNC__AUTH__SECRET", secret)
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let line = read_until(&mut tail.0, |l| l.contains("complete:"))?;
    assert!(line.contains("checksums verified"), "{line}");
    drop(tail);

    // tail --raw over gRPC with a given token: the protocol's own lines.
    let mut raw = Killed(
        Command::new(BIN)
            .args(["tail", "--raw", "--grpc", "--url"])
            .arg(format!("http://127.0.0.1:{port}"))
            .args(["--token", &token])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let first = read_until(&mut raw.0, |l| !l.is_empty())?;
    assert!(first.starts_with("{\"checkpoint\":"), "{first}");
    drop(raw);

    // The secret never reaches the log.
    let pid = serve.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let status = serve.0.wait()?;
    let mut log = String::new();
    std::io::Read::read_to_string(
        serve
            .0
            .stderr
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("stderr"))?,
        &mut log,
    )?;
    assert!(
        status.success(),
        "graceful stop on SIGTERM: {status}\n{log}"
    );
    assert!(log.contains("starting"), "{log}");
    assert!(!log.contains(secret), "the secret was logged:\n{log}");

    // With walsync stopped, `walsync compact` compacts the store it served from, which then
    // still holds what PostgreSQL holds.
    seed::workload(&s.sql, 5, 200).await?;
    let out = Command::new(BIN)
        .args(["compact", "--config"])
        .arg(&config)
        .env("WALSYNC__AUTH__SECRET", secret)
        .output()?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "walsync compact: {printed}");
    assert!(
        printed.contains("compacted:") && printed.contains("store size:"),
        "{printed}"
    );
    let served = walsync_storage::EmbeddedStore::open(&s.dir.path().join("served"))?;
    let replay = seed::actual(&served);
    assert!(
        !replay.is_empty(),
        "the compacted store still holds the buckets"
    );
    Ok(())
}
