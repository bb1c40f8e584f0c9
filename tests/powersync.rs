//! The real PowerSync client (`@powersync/node` 1.1.0 with `better-sqlite3` 12.11.1, from npm)
//! against walsync over HTTP: its local SQLite tables must hold exactly the user's rows after
//! the initial sync, after live changes, after a membership removal and after a reconnect.
//! Skipped, with a message, only where `node` is absent.

use support::process::node_available;
use support::seed;

use support::service;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use walsync::Service;
use walsync_server::ServerConfig;

/// table → id → compared column → value as text (or null).
type Tables = BTreeMap<String, BTreeMap<String, BTreeMap<String, Option<String>>>>;

/// The columns the client script compares, per table (as in `powersync/client.mjs`).
const COLUMNS: &[(&str, &[&str])] = &[
    ("projects", &["name", "description"]),
    ("project_members", &["project_id", "user_id", "role"]),
    ("stakeholders", &["user_id", "name", "title"]),
    ("teams", &["project_id", "name"]),
    ("assessments", &["project_id", "phase", "tier"]),
    (
        "assessment_responses",
        &["assessment_id", "project_id", "answer"],
    ),
    ("sow_section_approvals", &["project_id", "section"]),
    (
        "write_conflicts",
        &[
            "table_name",
            "row_id",
            "column_name",
            "client_value",
            "server_value",
            "scope",
            "resolution",
        ],
    ),
    (
        "rejected_writes",
        &["client_id", "tx_key", "code", "message", "op_id"],
    ),
];

/// Installs the pinned client into a scratch folder under the target directory (once per
/// binary: the tests of this file run in parallel and must not run npm into one folder twice).
fn install_client() -> anyhow::Result<PathBuf> {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("powersync");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("powersync-node");
    std::fs::create_dir_all(&dir)?;
    let manifest = std::fs::read(src.join("package.json"))?;
    let lock = std::fs::read(src.join("package-lock.json"))?;
    std::fs::copy(src.join("client.mjs"), dir.join("client.mjs"))?;
    let installed = dir.join("node_modules/better-sqlite3/build/Release/better_sqlite3.node");
    let same = std::fs::read(dir.join("package.json")).ok().as_deref() == Some(&manifest[..])
        && std::fs::read(dir.join("package-lock.json")).ok().as_deref() == Some(&lock[..]);
    if same && installed.exists() && dir.join("node_modules/@powersync/node").exists() {
        return Ok(dir);
    }
    std::fs::write(dir.join("package.json"), &manifest)?;
    std::fs::write(dir.join("package-lock.json"), &lock)?;
    eprintln!("installing @powersync/node 1.1.0 and better-sqlite3 12.11.1 with npm ci (once)");
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .status()
        .context("running npm")?;
    anyhow::ensure!(status.success(), "npm ci failed: {status}");
    anyhow::ensure!(installed.exists(), "better-sqlite3 was not built");
    Ok(dir)
}

/// What the user's client should show: the expected rows, in the client's column form.
async fn expected_tables(s: &seed::Setup, user: &str) -> anyhow::Result<Tables> {
    let rows = service::expected_for(s, user).await?;
    let mut out: Tables = COLUMNS
        .iter()
        .map(|(t, _)| ((*t).to_owned(), BTreeMap::new()))
        .collect();
    for ((table, id), data) in rows {
        let json: serde_json::Value = serde_json::from_str(&data)?;
        let cols = COLUMNS
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, c)| *c)
            .unwrap_or(&[]);
        let values = cols
            .iter()
            .map(|c| {
                let v = match json.get(*c) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                };
                ((*c).to_owned(), v)
            })
            .collect();
        out.entry(table).or_default().insert(id, values);
    }
    Ok(out)
}

struct NodeClient {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    last: Option<Tables>,
}

impl NodeClient {
    async fn start(dir: &Path, url: &str, token: &str, db: &Path) -> anyhow::Result<NodeClient> {
        NodeClient::start_over(dir, url, token, db, "http").await
    }

    /// A client over `transport`: `http`, or `websocket` (RSocket, as React Native connects).
    async fn start_over(
        dir: &Path,
        url: &str,
        token: &str,
        db: &Path,
        transport: &str,
    ) -> anyhow::Result<NodeClient> {
        let mut child = Command::new("node")
            .env("WALSYNC_PS_TRANSPORT", transport)
            .arg("client.mjs")
            .arg(url)
            .arg(token)
            .arg(db)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting node")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        Ok(NodeClient {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            last: None,
        })
    }

    async fn send(&mut self, command: &str) -> anyhow::Result<()> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Prints the SDK's bookkeeping tables (what it received and applied), to tell a fault of
    /// the stream from one of the client.
    async fn print_internals(&mut self) {
        if self.send("internals").await.is_err() {
            return;
        }
        let read = async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if line.starts_with("{\"internals\"") {
                    eprintln!("powersync client internals: {line}");
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    }

    /// Reads the client's state lines until its tables equal `want`.
    async fn until(&mut self, want: &Tables, what: &str) -> anyhow::Result<()> {
        if self.last.as_ref() == Some(want) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Ok(line) => line?.context("the node client exited")?,
                Err(_) => {
                    self.print_internals().await;
                    let diff = describe(self.last.as_ref(), want);
                    anyhow::bail!("{what}: the powersync client never matched postgres: {diff}");
                }
            };
            let v: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("node printed {line}"))?;
            if let Some(e) = v.get("error") {
                eprintln!("powersync client reported: {e}");
                continue;
            }
            if let Some(state) = v.get("state") {
                let tables: Tables = serde_json::from_value(state.clone())?;
                let done = &tables == want;
                self.last = Some(tables);
                if done {
                    return Ok(());
                }
            }
        }
    }
}

fn describe(got: Option<&Tables>, want: &Tables) -> String {
    let Some(got) = got else {
        return "it never finished a first sync".into();
    };
    let mut out = Vec::new();
    for (table, rows) in want {
        let have = got.get(table).cloned().unwrap_or_default();
        let missing = rows.keys().filter(|id| !have.contains_key(*id)).count();
        let extra = have.keys().filter(|id| !rows.contains_key(*id)).count();
        let differ = rows
            .iter()
            .filter(|(id, r)| have.get(*id).is_some_and(|h| h != *r))
            .count();
        for (id, r) in rows
            .iter()
            .filter(|(id, r)| have.get(*id) != Some(*r))
            .take(3)
        {
            eprintln!(
                "{table} {id}: postgres has {r:?}, the client {:?}",
                have.get(id)
            );
        }
        if missing + extra + differ > 0 {
            out.push(format!(
                "{table}: {missing} missing, {extra} extra, {differ} differ"
            ));
        }
    }
    out.join("; ")
}

/// The service with the seed app's write rules and conflict strategies.
async fn start(s: &seed::Setup) -> anyhow::Result<Service> {
    let mut config = service::config(s, ServerConfig::default());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/walsync.toml");
    config.writes = walsync::Config::load(&example)?.writes;
    Ok(Service::start(config).await?)
}

/// The client installed, the seed app and the service; none (with a message) where `node` is
/// absent.
async fn prepare() -> anyhow::Result<Option<(PathBuf, seed::Setup, Service)>> {
    if !node_available() {
        eprintln!("skipped: `node` is not installed, so the PowerSync client test cannot run");
        return Ok(None);
    }
    let dir = install_client()?;
    let s = seed::setup().await?;
    let service = start(&s).await?;
    Ok(Some((dir, s, service)))
}

/// Sends a local write to the client (`exec`), as the app makes it.
async fn exec(client: &mut NodeClient, sql: &str, params: &[&str]) -> anyhow::Result<()> {
    client
        .send(&format!(
            "exec {}",
            serde_json::json!({ "sql": sql, "params": params })
        ))
        .await
}

/// Polls `query` (one boolean) until it holds, for at most a minute.
async fn until_postgres(s: &seed::Setup, query: &str, what: &str) -> anyhow::Result<()> {
    let wait = async {
        loop {
            if s.scalar::<bool>(query).await? {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .with_context(|| format!("{what}: postgres never showed it"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_powersync_node_client_syncs_exactly_the_users_rows() -> anyhow::Result<()> {
    let Some((dir, s, service)) = prepare().await? else {
        return Ok(());
    };
    let db = s.dir.path().join("powersync-u1.db");
    let mut client = NodeClient::start(&dir, &service.url(), &service::token("u1"), &db).await?;

    let want = expected_tables(&s, "u1").await?;
    assert!(
        !want["assessment_responses"].is_empty(),
        "u1 has rows to sync"
    );
    client.until(&want, "initial sync").await?;

    // Live changes, in and out of u1's projects.
    s.sql
        .batch_execute(
            "UPDATE assessment_responses SET answer = 'live edit' WHERE project_id = 2;
             UPDATE projects SET description = 'changed' WHERE id IN (1, 3);
             INSERT INTO teams (project_id, name) VALUES (1, 'red'), (5, 'blue');",
        )
        .await?;
    client
        .until(&expected_tables(&s, "u1").await?, "live changes")
        .await?;

    // A membership removal takes the project and its rows away.
    s.sql
        .batch_execute("DELETE FROM project_members WHERE project_id = 2 AND user_id = 'u1'")
        .await?;
    let want = expected_tables(&s, "u1").await?;
    assert!(!want["projects"].contains_key("2"));
    client.until(&want, "membership removal").await?;

    // A write made in the client's own database: its uploadData (README's) posts it to
    // /write, PostgreSQL has it, and the client keeps it once its write checkpoint is passed.
    let response: i64 = s
        .scalar("SELECT min(id) FROM assessment_responses WHERE project_id = 1")
        .await?;
    exec(
        &mut client,
        "UPDATE assessment_responses SET answer = ? WHERE id = ?",
        &["typed in the client", &response.to_string()],
    )
    .await?;
    until_postgres(
        &s,
        &format!(
            "SELECT answer = 'typed in the client' FROM assessment_responses WHERE id = {response}"
        ),
        "the client's write",
    )
    .await?;
    client
        .until(&expected_tables(&s, "u1").await?, "after an upload")
        .await?;

    // A write the rules deny (nobody changes their own role): rejected, kept in the dead
    // letters, and the client comes back to what PostgreSQL holds, the dead letter included
    // (the seed's rules give it to its author).
    exec(
        &mut client,
        "UPDATE project_members SET role = 'viewer' WHERE project_id = '1' AND user_id = 'u1'",
        &[],
    )
    .await?;
    until_postgres(
        &s,
        "SELECT EXISTS (SELECT 1 FROM rejected_writes WHERE user_id = 'u1' AND code = 'denied')",
        "the denied write in the dead letters",
    )
    .await?;
    let want = expected_tables(&s, "u1").await?;
    client.until(&want, "after a denied upload").await?;

    // A reconnect resumes (with `after`) and catches up with what changed meanwhile.
    client.send("reconnect").await?;
    seed::workload(&s.sql, 5, 60).await?;
    client
        .until(&expected_tables(&s, "u1").await?, "after reconnect")
        .await?;

    client.send("exit").await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), client.child.wait()).await;
    service.stop().await;
    Ok(())
}

/// Two interviewers edit the same answer while one is offline. The first upload is applied;
/// the second, made from the older answer (its `old`, tracked by the client), meets the seed's
/// `manual` strategy: the first answer stays, the conflict is stored with both versions, and
/// both clients end up holding what PostgreSQL holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_editing_one_answer_leave_a_manual_conflict() -> anyhow::Result<()> {
    let Some((dir, s, service)) = prepare().await? else {
        return Ok(());
    };
    // u1 (editor) and u2 (owner) are both members of project 2.
    let mut a = NodeClient::start(
        &dir,
        &service.url(),
        &service::token("u1"),
        &s.dir.path().join("a.db"),
    )
    .await?;
    let mut b = NodeClient::start(
        &dir,
        &service.url(),
        &service::token("u2"),
        &s.dir.path().join("b.db"),
    )
    .await?;
    a.until(&expected_tables(&s, "u1").await?, "a: initial sync")
        .await?;
    b.until(&expected_tables(&s, "u2").await?, "b: initial sync")
        .await?;
    let response: i64 = s
        .scalar("SELECT min(id) FROM assessment_responses WHERE project_id = 2")
        .await?;
    let id = response.to_string();

    b.send("disconnect").await?;
    let update = "UPDATE assessment_responses SET answer = ? WHERE id = ?";
    exec(&mut b, update, &["offline answer from u2", &id]).await?;
    exec(&mut a, update, &["answer from u1", &id]).await?;
    until_postgres(
        &s,
        &format!(
            "SELECT answer = 'answer from u1' FROM assessment_responses WHERE id = {response}"
        ),
        "u1's answer",
    )
    .await?;
    b.send("connect").await?;
    until_postgres(
        &s,
        &format!(
            "SELECT EXISTS (SELECT 1 FROM write_conflicts WHERE table_name = 'assessment_responses' \
             AND row_id = '{response}' AND column_name = 'answer' AND client_value = 'offline answer from u2' \
             AND server_value = 'answer from u1' AND scope = '2' AND user_id = 'u2')"
        ),
        "the manual conflict",
    )
    .await?;
    let answer: String = s
        .scalar(&format!(
            "SELECT answer FROM assessment_responses WHERE id = {response}"
        ))
        .await?;
    anyhow::ensure!(
        answer == "answer from u1",
        "the conflict was not left to a person: {answer}"
    );
    // The conflict is in both clients' write_conflicts (the project's bucket), with the rows.
    let want_a = expected_tables(&s, "u1").await?;
    anyhow::ensure!(
        want_a["write_conflicts"].len() == 1,
        "{:?}",
        want_a["write_conflicts"]
    );
    a.until(&want_a, "a: after the conflict").await?;
    b.until(&expected_tables(&s, "u2").await?, "b: after the conflict")
        .await?;

    // Resolving it is an ordinary upload: u2 keeps u1's answer and says so.
    exec(
        &mut b,
        "UPDATE write_conflicts SET resolution = 'kept the answer from u1' WHERE row_id = ?",
        &[&id],
    )
    .await?;
    until_postgres(
        &s,
        "SELECT EXISTS (SELECT 1 FROM write_conflicts WHERE resolution = 'kept the answer from u1')",
        "the resolution",
    )
    .await?;
    a.until(&expected_tables(&s, "u1").await?, "a: after the resolution")
        .await?;
    b.until(&expected_tables(&s, "u2").await?, "b: after the resolution")
        .await?;
    for mut c in [a, b] {
        c.send("exit").await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), c.child.wait()).await;
    }
    service.stop().await;
    Ok(())
}

/// Sync Streams over the seed's tables: the user's projects by default, and one project's
/// responses per subscription, checked by membership.
const STREAM_PROJECTS: &str = "SELECT * FROM projects WHERE id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())";
const STREAM_RESPONSES: &str = "SELECT * FROM assessment_responses WHERE project_id = subscription.parameter('project') AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())";

/// What PostgreSQL returns for the streams as `user` subscribed to `projects`, in the
/// client's column form: the stream queries themselves, with the request's values put in.
async fn stream_tables(s: &seed::Setup, user: &str, projects: &[i64]) -> anyhow::Result<Tables> {
    let mut out: Tables = COLUMNS
        .iter()
        .map(|(t, _)| ((*t).to_owned(), BTreeMap::new()))
        .collect();
    let as_user = |q: &str| q.replace("auth.user_id()", &format!("'{user}'"));
    let mut queries = vec![("projects", as_user(STREAM_PROJECTS))];
    for p in projects {
        queries.push((
            "assessment_responses",
            as_user(STREAM_RESPONSES).replace("subscription.parameter('project')", &p.to_string()),
        ));
    }
    for (table, query) in queries {
        let cols = COLUMNS
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, c)| *c)
            .unwrap_or(&[]);
        let select: Vec<String> = cols.iter().map(|c| format!("q.{c}::text")).collect();
        let rows = s
            .sql
            .query(
                &format!("SELECT q.id::text, {} FROM ({query}) q", select.join(", ")),
                &[],
            )
            .await?;
        for r in rows {
            let values = cols
                .iter()
                .enumerate()
                .map(|(i, c)| ((*c).to_owned(), r.get::<_, Option<String>>(i + 1)))
                .collect();
            out.entry(table.to_owned())
                .or_default()
                .insert(r.get(0), values);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_powersync_node_client_subscribes_to_streams_with_parameters() -> anyhow::Result<()> {
    if !node_available() {
        eprintln!("skipped: `node` is not installed, so the PowerSync client test cannot run");
        return Ok(());
    }
    let dir = install_client()?;
    let s = seed::setup().await?;
    let rules = s.dir.path().join("streams.yaml");
    std::fs::write(
        &rules,
        format!(
            "config:\n  edition: 3\nstreams:\n  my_projects:\n    auto_subscribe: true\n    query: {STREAM_PROJECTS}\n  project_responses:\n    query: {STREAM_RESPONSES}\n"
        ),
    )?;
    let mut config = service::config(&s, ServerConfig::default());
    config.rules = rules;
    let service = Service::start(config).await?;
    let db = s.dir.path().join("powersync-streams-u1.db");
    let mut client = NodeClient::start(&dir, &service.url(), &service::token("u1"), &db).await?;

    // Only the default stream until the app subscribes.
    client
        .until(&stream_tables(&s, "u1", &[]).await?, "the default stream")
        .await?;
    let members: Vec<i64> = s
        .sql
        .query(
            "SELECT project_id FROM project_members WHERE user_id = 'u1' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stranger: i64 = s
        .scalar("SELECT min(id) FROM projects WHERE id NOT IN (SELECT project_id FROM project_members WHERE user_id = 'u1')")
        .await?;
    let (a, b) = (members[0], members[1]);
    let subscribe = |p: i64| {
        format!(
            "subscribe {}",
            serde_json::json!({"stream": "project_responses", "params": {"project": p}, "ttl": 1})
        )
    };
    client.send(&subscribe(a)).await?;
    let want = stream_tables(&s, "u1", &[a]).await?;
    assert!(!want["assessment_responses"].is_empty());
    client.until(&want, "one subscription").await?;

    // A second subscription with other parameters, and one for a project u1 is not in.
    client.send(&subscribe(b)).await?;
    client.send(&subscribe(stranger)).await?;
    client
        .until(
            &stream_tables(&s, "u1", &[a, b]).await?,
            "two subscriptions",
        )
        .await?;

    // Live: a response of project a changes, u1 leaves project b.
    s.sql
        .batch_execute(&format!(
            "UPDATE assessment_responses SET answer = 'streamed' WHERE project_id = {a};
             DELETE FROM project_members WHERE project_id = {b} AND user_id = 'u1';"
        ))
        .await?;
    client
        .until(&stream_tables(&s, "u1", &[a]).await?, "live changes")
        .await?;

    // Unsubscribed (a ttl of one second): project a's responses leave the client.
    client
        .send(&format!(
            "unsubscribe {}",
            serde_json::json!({"stream": "project_responses", "params": {"project": a}})
        ))
        .await?;
    client
        .until(&stream_tables(&s, "u1", &[]).await?, "after unsubscribing")
        .await?;
    client.send("exit").await?;
    let _ = client.child.wait().await;
    Ok(())
}

/// The same client over `connectionMethod: WebSocket` (RSocket on a WebSocket, React Native's
/// default): the initial sync, live changes, a reconnect with changes made meanwhile, and a
/// server restart on the same port with changes made while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_powersync_node_client_syncs_over_websocket() -> anyhow::Result<()> {
    let Some((dir, s, service)) = prepare().await? else {
        return Ok(());
    };
    walsync_client::install_crypto();
    let url = service.url();
    let db = s.dir.path().join("powersync-ws-u1.db");
    let mut client =
        NodeClient::start_over(&dir, &url, &service::token("u1"), &db, "websocket").await?;
    client
        .until(
            &expected_tables(&s, "u1").await?,
            "initial sync over websocket",
        )
        .await?;
    let sent = |url: String| async move {
        service::metric(
            &url,
            "walsync_sync_lines_sent_total{transport=\"websocket\"}",
        )
        .await
    };
    assert!(
        sent(url.clone()).await? > 0.0,
        "the lines went over the websocket"
    );

    s.sql
        .batch_execute(
            "UPDATE assessment_responses SET answer = 'over rsocket' WHERE project_id = 1;
             INSERT INTO teams (project_id, name) VALUES (1, 'ws');",
        )
        .await?;
    client
        .until(&expected_tables(&s, "u1").await?, "live changes")
        .await?;

    client.send("disconnect").await?;
    seed::workload(&s.sql, 5, 30).await?;
    client.send("connect").await?;
    client
        .until(&expected_tables(&s, "u1").await?, "after a reconnect")
        .await?;

    // The server stops; PostgreSQL changes meanwhile; a new server on the same port.
    let listen: std::net::SocketAddr = url.trim_start_matches("http://").parse()?;
    service.stop().await;
    s.sql
        .batch_execute("UPDATE projects SET description = 'while walsync was down' WHERE id = 1")
        .await?;
    let mut config = service::config(&s, ServerConfig::default());
    config.server.listen = listen;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/walsync.toml");
    config.writes = walsync::Config::load(&example)?.writes;
    let service = Service::start(config).await?;
    client
        .until(&expected_tables(&s, "u1").await?, "after a server restart")
        .await?;
    assert!(
        sent(service.url()).await? > 0.0,
        "it came back over the websocket"
    );
    client.send("exit").await?;
    let _ = client.child.wait().await;
    service.stop().await;
    Ok(())
}
