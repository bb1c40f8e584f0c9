//! `walsync demo`: the whole pipeline on a throwaway PostgreSQL, in one command.
//!
//! It starts PostgreSQL (`wal_level=logical`), loads the seed app's schema, sample data and sync
//! rules, starts the whole service (replicator and the HTTP/gRPC sync API), prints a token and
//! ready-to-use `curl` and `grpcurl` lines, and lets simulated interviewers edit responses
//! through walsync's own upload (`POST /write`, and gRPC `Upload` for one of them, under the
//! seed app's write rules and conflict strategies: among them a denied write and a conflict left
//! for a person), while an administrator moves assessments and changes project memberships in
//! SQL. A `walsync-client` per user (over HTTP, and one over gRPC) follows its stream and prints
//! each checkpoint it applied, checksums verified, and each upload's result.

// A command: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::config::{PostgresConfig, StorageConfig, SyncSection};
use crate::{Config, Service};
use clap::Args;
use walsync_client::{Connector, SyncClient, Transport};
use walsync_protocol::upload::UploadRequest;
use walsync_server::{AuthConfig, ServerConfig, mint_hs256};
use walsync_testkit::seed::{RULES, SCHEMA};
use walsync_testkit::{Cluster, ClusterOptions};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Where the sync API listens (another free port is taken when this one is busy).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Also serve the web app built in this folder (`examples/assessment-web/dist`, after `npm
    /// ci && npm run build` there) with a token for each interviewer, and print its URLs.
    #[arg(long)]
    web: Option<std::path::PathBuf>,
    /// Where the web app is served (another free port when this one is busy).
    #[arg(long, default_value = "127.0.0.1:5173")]
    web_listen: String,
}

const USERS: &[&str] = &["ada", "grace", "linus"];
const SAMPLE: &str = "
INSERT INTO projects (id, name, organization_name) VALUES
  (1, 'Platform migration', 'Acme'), (2, 'Data strategy', 'Globex'), (3, 'Security review', 'Initech');
INSERT INTO project_members (project_id, user_id, role) VALUES
  (1, 'ada', 'owner'), (1, 'grace', 'editor'), (2, 'grace', 'owner'), (3, 'linus', 'owner');
INSERT INTO stakeholders (id, user_id, name, title) VALUES
  (1, 'ada', 'Ada L.', 'CTO'), (2, 'grace', 'Grace H.', 'Architect'), (3, 'linus', 'Linus T.', 'Lead');
INSERT INTO assessments (id, project_id, phase, tier) SELECT i, 1 + i % 3, 'discovery', 'tier-1' FROM generate_series(1, 6) i;
INSERT INTO assessment_responses (assessment_id, project_id, question_id, question_text, answer)
  SELECT 1 + i % 6, 1 + (1 + i % 6) % 3, 'q' || i, 'Question ' || i, 'first answer' FROM generate_series(1, 60) i;
";

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo(args))
}

const SECRET: &str = "walsync-demo-secret";
const AUDIENCE: &str = "walsync-demo";

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    println!("starting a throwaway PostgreSQL (wal_level=logical) ...");
    // Commits reach the walsender at once (the test default, `synchronous_commit = off`, would
    // hold them until the WAL writer's next flush).
    let cluster = Cluster::start(ClusterOptions {
        settings: vec![("synchronous_commit".into(), "on".into())],
        ..ClusterOptions::default()
    })?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(SCHEMA).await?;
    sql.batch_execute(SAMPLE).await?;
    sql.batch_execute("SELECT setval(pg_get_serial_sequence(t, 'id'), 1000) FROM unnest(ARRAY['projects','project_members','stakeholders','assessments','assessment_responses','teams','sow_section_approvals']) t;").await?;
    println!(
        "PostgreSQL: {}  (seed schema and sample data loaded)",
        db.url
    );

    let dir = walsync_testkit::scratch_dir("walsync-demo-")?;
    let rules_path = dir.path().join("sync_rules.yaml");
    std::fs::write(&rules_path, RULES)?;
    let listen = match std::net::TcpListener::bind(&args.listen) {
        Ok(l) => l.local_addr()?,
        Err(_) => "127.0.0.1:0".parse()?,
    };
    let config = Config {
        postgres: PostgresConfig {
            slot: "walsync_demo".into(),
            create_publication: true,
            ..PostgresConfig::new(db.url.clone())
        },
        rules: rules_path,
        storage: StorageConfig {
            dir: dir.path().join("store"),
            ..StorageConfig::default()
        },
        server: ServerConfig {
            listen,
            cors_origins: vec!["*".into()],
            ..ServerConfig::default()
        },
        auth: AuthConfig {
            secret: Some(SECRET.into()),
            audience: vec![AUDIENCE.into()],
            ..AuthConfig::default()
        },
        sync: SyncSection::default(),
        metrics: Default::default(),
        wal_guard: Default::default(),
        writes: Some(seed_writes()?),
        role: crate::config::Role::All,
    };
    let mut service = Service::start(config).await?;
    let url = service.url();
    let token = mint_hs256(SECRET, USERS[0], Some(AUDIENCE), Duration::from_secs(3600))?;
    println!(
        "walsync: {url}  (HTTP, gRPC and grpc-web on one port; rules: examples/seed/sync_rules.yaml)"
    );
    println!("\na token for {} (valid 1 hour):\n  {token}\n", USERS[0]);
    println!(
        "watch {}'s stream over HTTP (PowerSync protocol):",
        USERS[0]
    );
    println!(
        "  curl -N -X POST {url}/sync/stream -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{}}'"
    );
    println!("or over gRPC:");
    println!(
        "  grpcurl -plaintext -import-path proto -proto walsync/v1/sync.proto -H 'authorization: Bearer {token}' -d '{{}}' {} walsync.v1.Sync/Sync",
        service.addr
    );
    println!(
        "\ninterviewers {USERS:?} start editing through walsync's upload; each checkpoint line is what one user's client (over HTTP or gRPC) applies, each upload line what walsync answered.\n"
    );

    if let Some(web) = &args.web {
        let mut tokens = serde_json::Map::new();
        for user in USERS {
            tokens.insert((*user).into(), token_for(user)?.into());
        }
        let config = serde_json::json!({"endpoint": url, "tokens": tokens});
        let (addr, _task) = crate::web::serve_app(web, &args.web_listen, config).await?;
        println!("the web app, one window per interviewer (ada and grace share project 1):");
        for user in USERS {
            println!("  http://{addr}/?user={user}");
        }
        println!();
    }
    let (events_tx, mut events) = tokio::sync::mpsc::channel::<String>(64);
    let writer = tokio::spawn(interviewers(db.url.clone(), url.clone(), events_tx.clone()));
    let mut clients = Vec::new();
    for (i, user) in USERS.iter().enumerate() {
        let transport = if i == 2 {
            Transport::Grpc
        } else {
            Transport::Http
        };
        let token = mint_hs256(SECRET, user, Some(AUDIENCE), Duration::from_secs(3600))?;
        let client = SyncClient::new(Connector::new(&url, transport, &token)?, user);
        clients.push(tokio::spawn(follow(
            client,
            user,
            transport,
            events_tx.clone(),
        )));
    }
    drop(events_tx);
    let started = Instant::now();
    let deadline = args.seconds.map(|s| started + Duration::from_secs(s));
    loop {
        let until_deadline = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            e = events.recv() => match e {
                Some(line) => println!("{line}"),
                None => break,
            },
            _ = tokio::time::sleep(until_deadline) => break,
            _ = tokio::signal::ctrl_c() => break,
            r = service.wait() => {
                if let Err(e) = r {
                    println!("replicator stopped: {e}");
                }
                break;
            }
        }
    }
    writer.abort();
    for c in clients {
        c.abort();
    }
    service.stop().await;
    println!("\nstopped; the throwaway PostgreSQL and the store are removed.");
    Ok(())
}

/// One user's client: prints each applied checkpoint (checksums verified by the client), with
/// the buckets it gained and lost.
async fn follow(
    mut client: SyncClient,
    user: &'static str,
    transport: Transport,
    out: tokio::sync::mpsc::Sender<String>,
) {
    let via = transport.as_str();
    let mut before: BTreeSet<String> = BTreeSet::new();
    let mut first = true;
    loop {
        let at = match client.next_checkpoint().await {
            Ok(at) => at,
            Err(e) => {
                let _ = out
                    .send(format!("{user:<6} [{via}] stream: {e}; reconnecting"))
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let state = client.state();
        let now: BTreeSet<String> = state.buckets().keys().cloned().collect();
        let rows: usize = state.buckets().values().map(|b| b.rows.len()).sum();
        let mut line = format!(
            "checkpoint {at:>5}  {user:<6} [{via}] {} buckets, {rows:>3} rows, checksums ok",
            now.len()
        );
        let added: Vec<&String> = now.difference(&before).collect();
        let removed: Vec<&String> = before.difference(&now).collect();
        if !first && !added.is_empty() {
            line.push_str(&format!("; added {}", join(&added)));
        }
        if !removed.is_empty() {
            line.push_str(&format!("; removed {}", join(&removed)));
        }
        first = false;
        before = now;
        if out.send(line).await.is_err() {
            return;
        }
    }
}

fn join(names: &[&String]) -> String {
    names
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The seed app's write rules and conflict strategies (`examples/walsync.toml`'s `[writes]`).
fn seed_writes() -> anyhow::Result<walsync_write::WriteConfig> {
    use figment::providers::Format;
    const EXAMPLE: &str = include_str!("../../../examples/walsync.toml");
    Ok(
        figment::Figment::from(figment::providers::Toml::string(EXAMPLE))
            .extract_inner("writes")?,
    )
}

fn token_for(user: &str) -> anyhow::Result<String> {
    Ok(mint_hs256(
        SECRET,
        user,
        Some(AUDIENCE),
        Duration::from_secs(3600),
    )?)
}

/// One answer edit as the client uploads it: a PATCH with the value it edited from.
fn answer_edit(tx: i64, id: i64, old: Option<&str>, answer: &str) -> anyhow::Result<UploadRequest> {
    Ok(serde_json::from_value(serde_json::json!({
        "client_id": "demo",
        "batch": [{"tx_id": tx, "ops": [{
            "op_id": tx, "op": "PATCH", "type": "assessment_responses", "id": id.to_string(),
            "data": {"answer": answer}, "old": {"answer": old},
        }]}],
    }))?)
}

/// Simulated interviewers: mostly answers uploaded through walsync (each from the answer they
/// saw), now and then a write the rules deny and two interviewers answering one question from
/// the same answer (the seed's `manual` strategy keeps the first and stores the conflict); an
/// administrator moves assessments and changes memberships in SQL.
async fn interviewers(
    url: String,
    api: String,
    out: tokio::sync::mpsc::Sender<String>,
) -> anyhow::Result<()> {
    let (sql, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut connectors = Vec::new();
    for (i, user) in USERS.iter().enumerate() {
        let transport = if i == 2 {
            Transport::Grpc
        } else {
            Transport::Http
        };
        connectors.push(Connector::new(&api, transport, &token_for(user)?)?);
    }
    let upload = |who: usize, request: UploadRequest| {
        let connector = connectors[who].clone();
        let out = out.clone();
        async move {
            let via = connector.transport().as_str();
            let line = match connector.upload(&request).await {
                Ok(reply) => reply
                    .results
                    .iter()
                    .map(|r| {
                        let mut s = format!(
                            "upload       {:<6} [{via}] {}",
                            USERS[who],
                            r.status.as_str()
                        );
                        if let Some(code) = &r.code {
                            s.push_str(&format!(
                                " {code}: {}",
                                r.message.as_deref().unwrap_or_default()
                            ));
                        }
                        for c in &r.conflicts {
                            s.push_str(&format!("; conflict on {} ({})", c.column, c.outcome));
                        }
                        s
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                Err(e) => format!("upload       {:<6} [{via}] failed: {e}", USERS[who]),
            };
            let _ = out.send(line).await;
        }
    };
    let mut n: i64 = 0;
    loop {
        n += 1;
        let who = (n % 3) as usize;
        match n % 10 {
            3 => {
                sql.batch_execute(&format!(
                    "UPDATE assessments SET project_id = {} WHERE id = {}",
                    1 + n % 3,
                    1 + n % 6
                ))
                .await?
            }
            // User k joins the project after their own, as a viewer (and leaves again at 9).
            6 => {
                sql.batch_execute(&format!(
                    "INSERT INTO project_members (project_id, user_id, role) VALUES ({}, '{}', 'viewer') ON CONFLICT DO NOTHING",
                    1 + (n / 10 + 1) % 3,
                    USERS[(n / 10 % 3) as usize]
                ))
                .await?
            }
            9 => {
                sql.batch_execute("DELETE FROM project_members WHERE role = 'viewer' AND id = (SELECT min(id) FROM project_members WHERE role = 'viewer')")
                    .await?
            }
            // linus edits an answer of a project he is not in: denied, kept in the dead letters.
            7 => {
                let row = sql
                    .query_one("SELECT id, answer FROM assessment_responses WHERE project_id = 1 ORDER BY id LIMIT 1", &[])
                    .await?;
                upload(2, answer_edit(n, row.get(0), row.get(1), "linus was here")?).await;
            }
            // ada and grace answer one question from the same answer: the first is applied, the
            // second is a conflict left for a person (write_conflicts).
            5 => {
                let row = sql
                    .query_one("SELECT id, answer FROM assessment_responses WHERE project_id = 1 ORDER BY random() LIMIT 1", &[])
                    .await?;
                let (id, seen): (i64, Option<String>) = (row.get(0), row.get(1));
                upload(0, answer_edit(n, id, seen.as_deref(), &format!("ada's answer {n}"))?).await;
                upload(1, answer_edit(n, id, seen.as_deref(), &format!("grace's answer {n}"))?).await;
            }
            _ => {
                let row = sql
                    .query_opt(
                        "SELECT id, answer FROM assessment_responses WHERE project_id IN \
                         (SELECT project_id FROM project_members WHERE user_id = $1 AND role <> 'viewer') \
                         ORDER BY random() LIMIT 1",
                        &[&USERS[who]],
                    )
                    .await?;
                if let Some(row) = row {
                    let answer = format!("answer {n} by {}", USERS[who]);
                    upload(who, answer_edit(n, row.get(0), row.get(1), &answer)?).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}
