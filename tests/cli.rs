//! The commands as a user runs them: `walsync serve --config`, `walsync token`, `walsync tail`
//! (summary and raw), and a graceful stop on SIGTERM.

use support::process::{Killed, free_port, wait_ready};
use support::seed;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_walsync-cli");

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

/// Waits for `child` to exit, for at most `limit` (a hang is a failure, not a stuck test).
fn wait_bounded(child: &mut Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("the process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_token_and_tail_work_from_a_config_file() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let port = free_port()?;
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
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env("WALSYNC__AUTH__SECRET", secret)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    wait_ready(port).await?;

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

    // A stream open when walsync is told to stop ends cleanly: `tail --raw` over HTTP reads
    // to the end of the body and exits 0 (an aborted body would be an error).
    let mut open = Command::new(BIN)
        .args(["tail", "--raw", "--url"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["--token", &token])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    read_until(&mut open, |l| l.starts_with("{\"checkpoint_complete\":"))?;

    // The secret never reaches the log.
    let pid = serve.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let status = wait_bounded(&mut serve.0, Duration::from_secs(60))?;
    let ended = wait_bounded(&mut open, Duration::from_secs(60))?;
    let mut said = String::new();
    if let Some(err) = open.stderr.as_mut() {
        std::io::Read::read_to_string(err, &mut said)?;
    }
    assert!(
        ended.success(),
        "the open stream ended cleanly: {ended}\n{said}"
    );
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
    // `--log-format json`: every line is a JSON object with a level and a message.
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("not a json log line ({e}): {line}"))?;
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
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
    let served = walsync_storage::KvStore::open(&s.dir.path().join("served"))?;
    let replay = seed::actual(&served);
    assert!(
        !replay.is_empty(),
        "the compacted store still holds the buckets"
    );
    Ok(())
}

/// `walsync rules check` compiles rules and, with `--postgres`, holds them against the
/// database: every problem is printed with its definition, query and offending part, and the
/// command fails. `walsync serve` refuses the same rules at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_check_names_every_problem_and_serve_refuses_them() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let check = |file: &std::path::Path, extra: &[&str]| -> anyhow::Result<(bool, String)> {
        let out = Command::new(BIN)
            .args(["rules", "check"])
            .arg(file)
            .args(extra)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };

    // The seed's own rules fit its database.
    let seed_rules = std::path::Path::new(seed::RULES_PATH);
    let (ok, printed) = check(seed_rules, &[])?;
    assert!(
        ok && printed.contains("2 bucket definitions compile"),
        "{printed}"
    );
    let (ok, printed) = check(seed_rules, &["--postgres", &s.url])?;
    assert!(ok && printed.contains("fit the database"), "{printed}");

    // The same app as Sync Streams fits too; a stream's problem names the stream and its own
    // query, not what it compiles into.
    let streams = std::path::Path::new(seed::RULES_PATH).with_file_name("sync_streams.yaml");
    let (ok, printed) = check(&streams, &["--postgres", &s.url])?;
    assert!(
        ok && printed.contains("3 streams compile and fit the database"),
        "{printed}"
    );
    let bad_stream = s.dir.path().join("bad_streams.yaml");
    std::fs::write(
        &bad_stream,
        "streams:\n  s:\n    query: SELECT id, Titel FROM projects WHERE id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())\n",
    )?;
    let (ok, printed) = check(&bad_stream, &["--postgres", &s.url])?;
    assert!(!ok, "{printed}");
    assert!(
        printed.starts_with("stream \"s\", query 1 `SELECT id, Titel FROM projects WHERE")
            && printed.contains("titel"),
        "{printed}"
    );

    // A publication without the rules' tables: each query over a missing table says so.
    s.sql
        .batch_execute("CREATE PUBLICATION partial FOR TABLE projects")
        .await?;
    let (ok, printed) = check(
        seed_rules,
        &["--postgres", &s.url, "--publication", "partial"],
    )?;
    assert!(!ok);
    assert!(
        printed.contains("data query 2 `SELECT * FROM assessments WHERE project_id = bucket.project_id`: table public.assessments is not in publication \"partial\"")
            && !printed.contains("public.projects is not"),
        "{printed}"
    );
    let (ok, printed) = check(seed_rules, &["--postgres", &s.url, "--publication", "nope"])?;
    assert!(
        !ok && printed.contains("publication \"nope\" does not exist"),
        "{printed}"
    );

    // Rules that compile but do not fit the schema.
    let bad = s.dir.path().join("bad_rules.yaml");
    std::fs::write(
        &bad,
        r#"bucket_definitions:
  by_project:
    parameters: SELECT project_id FROM project_members WHERE user_id = request.user_id()
    data:
      - SELECT * FROM stakeholders WHERE user_id = bucket.project_id
      - SELECT id, Titel FROM projects WHERE id = bucket.project_id
      - SELECT * FROM "Projects" WHERE id = bucket.project_id
  quoted:
    data:
      - SELECT * FROM teams WHERE "Name" = 'x'
"#,
    )?;
    let (ok, printed) = check(&bad, &["--postgres", &s.url])?;
    assert!(!ok, "{printed}");
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 4, "{printed}");
    assert!(
        lines.iter().any(
            |l| l.starts_with("bucket definition \"by_project\", data query 1")
                && l.contains(
                    "bucket parameter `project_id` comes from stakeholders.user_id (text)"
                )
                && l.contains("project_members.project_id (bigint)")
                && l.contains("CAST(project_id AS text)")
        ),
        "{printed}"
    );
    assert!(
        lines.iter().any(|l| l.contains("data query 2")
            && l.contains("column \"titel\" does not exist in public.projects")),
        "{printed}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("data query 3")
                && l.contains("table public.Projects does not exist")),
        "{printed}"
    );
    assert!(
        lines.iter().any(|l| l.contains("\"quoted\"")
            && l.contains("column \"Name\" does not exist in public.teams (there is \"name\"")),
        "{printed}"
    );
    // A rules file that does not compile fails without a database, naming the query.
    let broken = s.dir.path().join("broken_rules.yaml");
    std::fs::write(
        &broken,
        "bucket_definitions:\n  b:\n    data:\n      - SELECT * FROM t WHERE x LIKE 'a%'\n",
    )?;
    let (ok, printed) = check(&broken, &[])?;
    assert!(
        !ok && printed.contains("data query 1") && printed.contains("LIKE"),
        "{printed}"
    );

    // walsync serve refuses the rules that do not fit: the process exits with them, and its
    // text log has no colour codes when stderr is not a terminal.
    let config = s.dir.path().join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "rules = \"{rules}\"\n[postgres]\nurl = \"{url}\"\nslot = \"{slot}\"\n[storage]\ndir = \"refused\"\n[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nsecret = \"x\"\n",
            rules = bad.display(),
            url = s.url,
            slot = s.slot,
        ),
    )?;
    let refused = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .output()?;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("titel") && said.contains("starting"),
        "{said}"
    );
    assert!(
        !said.contains('\u{1b}'),
        "colour codes in a piped log: {said}"
    );

    // In-process too.
    let mut config = support::service::config(&s, walsync_server::ServerConfig::default());
    config.rules = bad;
    match walsync::Service::start(config).await {
        Err(walsync::StartError::RulesCheck(message)) => {
            assert!(message.contains("titel"), "{message}")
        }
        other => panic!("expected the rules to be refused, got {other:?}"),
    }
    Ok(())
}
