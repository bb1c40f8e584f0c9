//! `walsync serve` as a child process: killed when dropped, waited for until ready, its memory
//! read from `/proc`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::seed;

/// The secret of [`serve`]'s tokens.
const SECRET: &str = "serve-secret";

/// A token of [`serve`]'s for `user`.
pub fn token(user: &str) -> anyhow::Result<String> {
    Ok(walsync_server::mint_hs256(
        SECRET,
        user,
        Some("walsync"),
        Duration::from_secs(3600),
    )?)
}

/// A `walsync serve` child (of `bin`: `env!("CARGO_BIN_EXE_walsync-cli")` in a test) with the example configuration (uploads included) on the test's
/// database, its store in `data`, listening on `port`, its log appended to `log`; `env` sets
/// more of the configuration (`WALSYNC__SECTION__KEY`).
pub fn serve(
    bin: &str,
    s: &seed::Setup,
    data: &Path,
    port: u16,
    log: &std::fs::File,
    env: &[(&str, &str)],
) -> anyhow::Result<Killed> {
    serve_with(bin, s, data, port, log, env, &[])
}

/// [`serve`] with more arguments of `walsync serve`.
pub fn serve_with(
    bin: &str,
    s: &seed::Setup,
    data: &Path,
    port: u16,
    log: &std::fs::File,
    env: &[(&str, &str)],
    args: &[&str],
) -> anyhow::Result<Killed> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/walsync.toml");
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&example)
        .args(args)
        .env("WALSYNC__POSTGRES__URL", &s.url)
        .env("WALSYNC__POSTGRES__SLOT", &s.slot)
        .env("WALSYNC__POSTGRES__CREATE_PUBLICATION", "false")
        .env("WALSYNC__STORAGE__DIR", data)
        .env("WALSYNC__STORAGE__COMPACT_INTERVAL_SECONDS", "1")
        .env("WALSYNC__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("WALSYNC__AUTH__SECRET", SECRET)
        .env("RUST_LOG", "walsync=info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log.try_clone()?)
        .spawn()?;
    Ok(Killed(child))
}

/// A child process killed (and reaped) when dropped, so that a failing test leaves none behind.
#[derive(Debug)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the server on `port` answers `/health/ready`, for at most 60 s.
pub async fn wait_ready(port: u16) -> anyhow::Result<()> {
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
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "walsync serve never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

/// A free port on loopback.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether `node` can be run here (the PowerSync client and browser tests need it).
pub fn node_available() -> bool {
    Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
