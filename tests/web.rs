//! The seed app in a real browser (examples/assessment-web, PowerSync's web SDK) against walsync:
//! two interviewers of one project in headless Chromium (playwright-core), driven by
//! `examples/assessment-web/e2e/two-interviewers.mjs`. Earlier records of the app's Dexie version
//! upload once; an answer typed in one browser shows in the other; presence shows who is where;
//! offline edits of one answer leave a manual conflict, resolved from the UI; a denied edit shows
//! as rejected; a reload opens from local data; a removed member loses the project and leaves
//! presence. Screenshots of each step go to `target/tmp/assessment-web-shots/`.
//!
//! Needs `node` and Chromium (`.ci/run` installs Debian's `chromium`); skipped with a message
//! where either is missing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use support::process::node_available;
use support::{seed, service};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use walsync::Service;
use walsync_server::ServerConfig;

fn chromium() -> Option<PathBuf> {
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn run(dir: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(status.success(), "{program} {args:?} failed: {status}");
    Ok(())
}

/// The app's packages installed (`npm ci`, when the lock file changed) and the app built into
/// the target directory; the app's folder.
fn build_app() -> anyhow::Result<(PathBuf, PathBuf)> {
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/assessment-web");
    let lock = std::fs::read(app.join("package-lock.json"))?;
    let installed = app.join("node_modules/.package-lock.json");
    let stamp = app.join("node_modules/.walsync-lock");
    if std::fs::read(&stamp).ok().as_deref() != Some(&lock[..]) || !installed.exists() {
        eprintln!("installing the web app's packages with npm ci");
        run(
            &app,
            "npm",
            &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
        )?;
        std::fs::write(&stamp, &lock)?;
    }
    let dist = Path::new(env!("CARGO_TARGET_TMPDIR")).join("assessment-web-dist");
    let out = dist.to_string_lossy().into_owned();
    run(
        &app,
        "npx",
        &[
            "vite",
            "build",
            "--logLevel",
            "warn",
            "--emptyOutDir",
            "--outDir",
            &out,
        ],
    )?;
    Ok((app, dist))
}

/// Runs `sql` (one value, as text) until it equals `want` (when given), for at most 30 s; or
/// reads `metric` from walsync's `/metrics` (summed over its labels).
async fn answer(s: &seed::Setup, url: &str, ask: &Value) -> Value {
    if let Some(metric) = ask["metric"].as_str() {
        return match service::metric(url, metric).await {
            Ok(sum) => json!({"ok": true, "value": sum.to_string()}),
            Err(e) => json!({"error": e.to_string()}),
        };
    }
    let sql = ask["sql"].as_str().unwrap_or_default();
    let want = ask["want"].as_str();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = match s.sql.simple_query(sql).await {
            Ok(messages) => messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                _ => None,
            }),
            Err(e) => return json!({"error": e.to_string()}),
        };
        let got = got.flatten();
        match want {
            None => return json!({"ok": true, "value": got}),
            Some(w) if got.as_deref() == Some(w) => return json!({"ok": true, "value": got}),
            Some(w) if tokio::time::Instant::now() > deadline => {
                return json!({"error": format!("postgres has {got:?}, not {w:?}")});
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_interviewers_in_chromium_sync_edit_conflict_and_see_each_other() -> anyhow::Result<()>
{
    let Some(browser) = chromium() else {
        eprintln!(
            "skipped: Chromium is not installed (apt-get install chromium), so the browser test cannot run"
        );
        return Ok(());
    };
    if !node_available() {
        eprintln!("skipped: `node` is not installed, so the browser test cannot run");
        return Ok(());
    }
    walsync_client::install_crypto();
    let (app, dist) = build_app()?;
    let s = seed::setup().await?;
    // u2 owns project 2; u1 may answer there but not edit the project itself.
    s.sql
        .batch_execute(
            "UPDATE project_members SET role = 'viewer' WHERE project_id = 2 AND user_id = 'u1'",
        )
        .await?;
    let mut config = service::config(
        &s,
        ServerConfig {
            cors_origins: vec!["*".into()],
            ..ServerConfig::default()
        },
    );
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/walsync.toml");
    config.writes = walsync::Config::load(&example)?.writes;
    let service = Service::start(config).await?;
    let tokens = json!({"u1": service::token("u1"), "u2": service::token("u2")});
    let (web, _server) = walsync::web::serve_app(
        &dist,
        "127.0.0.1:0",
        json!({"endpoint": service.url(), "tokens": tokens}),
    )
    .await?;
    let assessment: i64 = s
        .scalar("SELECT min(id) FROM assessments WHERE project_id = 2")
        .await?;
    let url = service.url();
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("assessment-web-shots");
    let _ = std::fs::remove_dir_all(&shots);

    let mut script = tokio::process::Command::new("node")
        .arg("e2e/two-interviewers.mjs")
        .current_dir(&app)
        .env("APP", format!("http://{web}"))
        .env("CHROMIUM", &browser)
        .env("SHOTS", &shots)
        .env("OWNER", "u2")
        .env("VIEWER", "u1")
        .env("PROJECT", "2")
        .env("ASSESSMENT", assessment.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running node")?;
    let mut to_script = script.stdin.take().context("stdin")?;
    let mut lines = BufReader::new(script.stdout.take().context("stdout")?).lines();
    let mut steps = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = lines.next_line().await? {
            let message: Value = serde_json::from_str(&line)
                .with_context(|| format!("a line of the script: {line}"))?;
            if let Some(ask) = message.get("ask") {
                let reply = answer(&s, &url, ask).await;
                to_script.write_all(format!("{reply}\n").as_bytes()).await?;
            } else if let Some(step) = message.get("step") {
                eprintln!("passed: {step} ({} ms)", message["ms"]);
                steps.push(step.as_str().unwrap_or_default().to_owned());
            } else if message.get("measured").is_some() {
                eprintln!("{message}");
            } else if message.get("done").is_some() {
                return anyhow::Ok(());
            } else if let Some(failed) = message.get("failed") {
                anyhow::bail!("{}", failed.as_str().unwrap_or_default());
            }
        }
        anyhow::bail!("the script ended without finishing")
    })
    .await;
    eprintln!("screenshots: {}", shots.display());
    outcome.context("the browser test took over 300 s")??;
    assert_eq!(steps.len(), 9, "every step ran: {steps:?}");
    service.stop().await;
    Ok(())
}
