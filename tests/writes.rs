//! Uploads through `POST /write` with the seed app's write rules (`examples/walsync.toml`):
//! an authorization matrix whose verdicts are read from PostgreSQL, not from the reply; whole
//! transactions; idempotent retries; dead letters; hostile names and values; bad requests.

use std::path::Path;

use serde_json::{Value, json};
use support::{seed, service};
use walsync::Service;
use walsync_server::ServerConfig;

/// The service with the seed app's write rules.
async fn start(s: &seed::Setup) -> anyhow::Result<Service> {
    start_with(s, ServerConfig::default()).await
}

/// [`start`] with `server`'s settings.
async fn start_with(s: &seed::Setup, server: ServerConfig) -> anyhow::Result<Service> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/walsync.toml");
    let writes = walsync::Config::load(&example)?
        .writes
        .ok_or_else(|| anyhow::anyhow!("the example configuration has no [writes]"))?;
    let mut config = service::config(s, server);
    config.writes = Some(writes);
    Ok(Service::start(config).await?)
}

/// Posts `body` to `/write` as `user`: the status and the JSON answer.
async fn post(service: &Service, user: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    post_to(&service.url(), user, body).await
}

/// [`post`] to the service at `url` (for a task of its own).
async fn post_to(url: &str, user: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    walsync_client::install_crypto();
    let resp = reqwest::Client::new()
        .post(format!("{url}/write"))
        .bearer_auth(service::token(user))
        .json(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

/// Waits until some session waits for a lock of `locktype` (an upload held by the test), or
/// fails once `finished` says the upload ended without waiting, or after 30 s.
async fn until_a_lock_waits(
    s: &seed::Setup,
    locktype: &str,
    finished: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s
        .sql
        .query_one(
            // A walsender creating its slot waits for open transactions too: not an upload.
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = $1 AND NOT l.granted AND a.backend_type = 'client backend'",
            &[&locktype],
        )
        .await?
        .get::<_, i64>(0)
        == 0
    {
        anyhow::ensure!(!finished(), "the upload ended without waiting for the lock");
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the upload never waited for the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}

fn tx(tx_id: i64, ops: Vec<Value>) -> Value {
    json!({"tx_id": tx_id, "ops": ops})
}

fn upload(client: &str, txs: Vec<Value>) -> Value {
    json!({"client_id": client, "batch": txs})
}

fn put(op_id: i64, table: &str, id: impl ToString, data: Value) -> Value {
    json!({"op_id": op_id, "op": "PUT", "type": table, "id": id.to_string(), "data": data})
}

fn patch(op_id: i64, table: &str, id: impl ToString, data: Value) -> Value {
    json!({"op_id": op_id, "op": "PATCH", "type": table, "id": id.to_string(), "data": data})
}

fn delete(op_id: i64, table: &str, id: impl ToString) -> Value {
    json!({"op_id": op_id, "op": "DELETE", "type": table, "id": id.to_string()})
}

/// One row of a table as JSON text, or none: what PostgreSQL holds.
async fn row(s: &seed::Setup, table: &str, id: i64) -> anyhow::Result<Option<Value>> {
    let r = s
        .sql
        .query_opt(
            &format!("SELECT to_jsonb(t)::text FROM {table} t WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(match r {
        Some(r) => Some(serde_json::from_str(&r.get::<_, String>(0))?),
        None => None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Owner,
    Editor,
    Viewer,
    Stranger,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
}

/// What the seed's rules allow a project member of `role` on a table of that project.
fn allowed(table: &str, role: Role, op: Op) -> bool {
    use Role::*;
    match (table, op) {
        ("assessment_responses", _) => role != Stranger,
        ("projects", Op::Update) => matches!(role, Owner | Editor),
        ("projects", Op::Delete) => role == Owner,
        ("project_members", _) => role == Owner,
        ("assessments" | "teams" | "sow_section_approvals", _) => matches!(role, Owner | Editor),
        _ => unreachable!("{table} {op:?}"),
    }
}

/// Each seed table × role × operation, each case on a project of its own (the actor has the
/// role there, and user `u9` is an editor), against a row made in SQL for it. The verdict is
/// whether PostgreSQL's row changed; it must equal what the rules allow, and the reply must say
/// the same. Returns the cases that did not hold.
async fn matrix(
    s: &seed::Setup,
    service: &Service,
    first_project: i64,
) -> anyhow::Result<Vec<String>> {
    let tables = [
        "projects",
        "project_members",
        "assessments",
        "teams",
        "assessment_responses",
        "sow_section_approvals",
    ];
    let roles = [Role::Owner, Role::Editor, Role::Viewer, Role::Stranger];
    let ops = [Op::Insert, Op::Update, Op::Delete];
    let mut case = 0i64;
    let mut wrong = Vec::new();
    for table in tables {
        for role in roles {
            for op in ops {
                if table == "projects" && op == Op::Insert {
                    continue; // anyone may create a project: below
                }
                case += 1;
                let project = first_project + case;
                let actor = "u4";
                s.sql
                    .batch_execute(&format!(
                        "INSERT INTO projects (id, name) VALUES ({project}, 'p{project}');
                         INSERT INTO project_members (id, project_id, user_id, role) VALUES ({}, {project}, 'u9', 'editor');",
                        project * 10
                    ))
                    .await?;
                let role_name = match role {
                    Role::Owner => Some("owner"),
                    Role::Editor => Some("editor"),
                    Role::Viewer => Some("viewer"),
                    Role::Stranger => None,
                };
                if let Some(r) = role_name {
                    s.sql
                        .execute(
                            "INSERT INTO project_members (id, project_id, user_id, role) VALUES ($1, $2, $3, $4)",
                            &[&(project * 10 + 1), &project, &actor, &r],
                        )
                        .await?;
                }
                // The row each case targets (made in SQL for updates and deletes), and the
                // op that targets it.
                let target = project * 10 + 5;
                let (ddl, insert_data, update_data) = match table {
                    "projects" => (String::new(), json!({}), json!({"description": "changed"})),
                    "project_members" => (
                        format!(
                            "INSERT INTO project_members (id, project_id, user_id, role) VALUES ({target}, {project}, 'u8', 'editor')"
                        ),
                        json!({"project_id": project, "user_id": "u7", "role": "viewer"}),
                        json!({"role": "viewer"}),
                    ),
                    "assessments" => (
                        format!(
                            "INSERT INTO assessments (id, project_id, phase) VALUES ({target}, {project}, 'p')"
                        ),
                        json!({"project_id": project, "phase": "new"}),
                        json!({"phase": "changed"}),
                    ),
                    "teams" => (
                        format!(
                            "INSERT INTO teams (id, project_id, name) VALUES ({target}, {project}, 't')"
                        ),
                        json!({"project_id": project, "name": "new"}),
                        json!({"name": "changed"}),
                    ),
                    "assessment_responses" => (
                        format!(
                            "INSERT INTO assessment_responses (id, project_id, answer) VALUES ({target}, {project}, 'a')"
                        ),
                        json!({"project_id": project, "answer": "new"}),
                        json!({"answer": "changed"}),
                    ),
                    "sow_section_approvals" => (
                        format!(
                            "INSERT INTO sow_section_approvals (id, project_id, section) VALUES ({target}, {project}, 's')"
                        ),
                        json!({"project_id": project, "section": "new"}),
                        json!({"section": "changed"}),
                    ),
                    _ => unreachable!(),
                };
                // A project's own row is the project.
                let target = if table == "projects" { project } else { target };
                if !ddl.is_empty() && op != Op::Insert {
                    s.sql.batch_execute(&ddl).await?;
                }
                let inserted = target + 1;
                let request = match op {
                    Op::Insert => put(case, table, inserted, insert_data),
                    Op::Update => patch(case, table, target, update_data),
                    Op::Delete => delete(case, table, target),
                };
                let subject = if op == Op::Insert { inserted } else { target };
                let before = row(s, table, subject).await?;
                let (status, reply) = post(
                    service,
                    actor,
                    &upload("matrix", vec![tx(case, vec![request])]),
                )
                .await?;
                anyhow::ensure!(status == 200, "{table} {role:?} {op:?}: {status} {reply}");
                let after = row(s, table, subject).await?;
                let changed = before != after;
                let want = allowed(table, role, op);
                let said = reply["results"][0]["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if changed != want || (said == "applied") != want {
                    wrong.push(format!(
                        "{table} {role:?} {op:?}: allowed {want}, postgres changed {changed}, reply {said} ({})",
                        reply["results"][0]
                    ));
                }
                if !want {
                    anyhow::ensure!(
                        reply["results"][0]["code"] == "denied",
                        "{table} {role:?} {op:?}: {reply}"
                    );
                }
            }
        }
    }
    Ok(wrong)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorization_matrix_holds_in_postgres() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s).await?;
    let wrong = matrix(&s, &service, 10_000).await?;
    anyhow::ensure!(
        wrong.is_empty(),
        "{} wrong verdicts:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Anyone creates a project and, in the same transaction, makes themselves its first owner;
    // nobody makes themselves owner of a project that has members.
    let (_, reply) = post(
        &service,
        "u4",
        &upload(
            "bootstrap",
            vec![tx(
                1,
                vec![
                    put(1, "projects", 20_001, json!({"name": "mine"})),
                    put(
                        2,
                        "project_members",
                        20_002,
                        json!({"project_id": 20_001, "user_id": "u4", "role": "owner"}),
                    ),
                ],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["status"] == "applied", "{reply}");
    anyhow::ensure!(row(&s, "project_members", 20_002).await?.is_some());
    let (_, reply) = post(
        &service,
        "u4",
        &upload(
            "bootstrap",
            vec![tx(
                2,
                vec![put(
                    3,
                    "project_members",
                    20_003,
                    json!({"project_id": 2, "user_id": "u4", "role": "owner"}),
                )],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["code"] == "denied", "{reply}");
    anyhow::ensure!(row(&s, "project_members", 20_003).await?.is_none());
    service.stop().await;
    Ok(())
}

/// The same matrix with PostgreSQL's row-level security deciding (`examples/seed/rls.sql`, the
/// seed plan's policies completed): uploads run as role `authenticated` with the token's claims
/// and `auth.uid()`, which walsync creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorization_matrix_holds_under_row_level_security() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let mut config = service::config(&s, ServerConfig::default());
    config.writes = Some(walsync_write::WriteConfig {
        mode: walsync_write::AuthorizationMode::PostgresRls,
        rls_role: Some("authenticated".into()),
        tables: walsync_testkit::seed::TABLES
            .iter()
            .filter(|t| **t != "rejected_writes")
            .map(|t| ((*t).to_owned(), walsync_write::TableRule::default()))
            .collect(),
        ..walsync_write::WriteConfig::default()
    });
    let service = Service::start(config).await?;
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seed/rls.sql");
    s.sql
        .batch_execute(&std::fs::read_to_string(policies)?)
        .await?;
    let wrong = matrix(&s, &service, 10_000).await?;
    anyhow::ensure!(
        wrong.is_empty(),
        "{} wrong verdicts:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Another user's stakeholder record is out of reach; one's own is not.
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "c",
            vec![tx(
                1,
                vec![patch(1, "stakeholders", 2, json!({"title": "boss"}))],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["code"] == "denied", "{reply}");
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "c",
            vec![tx(
                2,
                vec![patch(2, "stakeholders", 1, json!({"title": "lead"}))],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["status"] == "applied", "{reply}");
    service.stop().await;
    Ok(())
}

/// Moving a row into a project the writer is not in, raising one's own role, writing another
/// user's stakeholder record, and a transaction that mixes an allowed and a denied op: each
/// denied, and nothing of the transaction written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_writes_leave_nothing_behind() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s).await?;
    // u1 is an editor of project 2 and not a member of project 3.
    let response: i64 = s
        .scalar("SELECT min(id) FROM assessment_responses WHERE project_id = 2")
        .await?;
    let before = row(&s, "assessment_responses", response).await?;
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "c",
            vec![tx(
                1,
                vec![patch(
                    1,
                    "assessment_responses",
                    response,
                    json!({"project_id": 3}),
                )],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["code"] == "denied", "{reply}");
    anyhow::ensure!(row(&s, "assessment_responses", response).await? == before);

    // u1 (editor of 2) makes itself owner: denied; u1 (owner of 1) changes its own role: denied.
    let membership = |project: i64| {
        let sql = &s.sql;
        async move {
            let id: i64 = sql
                .query_one(
                    "SELECT id FROM project_members WHERE project_id = $1 AND user_id = 'u1'",
                    &[&project],
                )
                .await?
                .get(0);
            anyhow::Ok(id)
        }
    };
    for (project, role) in [(2, "owner"), (1, "editor")] {
        let id = membership(project).await?;
        let (_, reply) = post(
            &service,
            "u1",
            &upload(
                "c",
                vec![tx(
                    10 + project,
                    vec![patch(2, "project_members", id, json!({"role": role}))],
                )],
            ),
        )
        .await?;
        anyhow::ensure!(reply["results"][0]["code"] == "denied", "{reply}");
    }
    let roles: Vec<String> = s
        .sql
        .query(
            "SELECT role FROM project_members WHERE user_id = 'u1' ORDER BY project_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    anyhow::ensure!(roles == ["owner", "editor"], "{roles:?}");

    // Another user's stakeholder record: denied; one's own: applied.
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "c",
            vec![tx(
                20,
                vec![patch(3, "stakeholders", 2, json!({"title": "boss"}))],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["code"] == "denied", "{reply}");
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "c",
            vec![tx(
                21,
                vec![patch(4, "stakeholders", 1, json!({"title": "lead"}))],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["status"] == "applied", "{reply}");
    let mine = row(&s, "stakeholders", 1).await?.unwrap_or_default();
    anyhow::ensure!(
        mine["title"] == "lead" && mine["_last_modified_by"] == "u1",
        "{mine}"
    );

    // An allowed insert and a denied one in one transaction: neither is written.
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "c",
            vec![tx(
                30,
                vec![
                    put(5, "teams", 30_001, json!({"project_id": 1, "name": "mine"})),
                    put(
                        6,
                        "teams",
                        30_002,
                        json!({"project_id": 3, "name": "theirs"}),
                    ),
                ],
            )],
        ),
    )
    .await?;
    let result = &reply["results"][0];
    anyhow::ensure!(
        result["code"] == "denied" && result["op_id"] == 6,
        "{reply}"
    );
    anyhow::ensure!(
        row(&s, "teams", 30_001).await?.is_none() && row(&s, "teams", 30_002).await?.is_none()
    );

    // The rejected transaction is kept whole in the dead letters.
    let dead: Value = serde_json::from_str(
        &s.sql
            .query_one(
                "SELECT ops::text FROM rejected_writes WHERE user_id = 'u1' AND tx_key = 'tx:30'",
                &[],
            )
            .await?
            .get::<_, String>(0),
    )?;
    anyhow::ensure!(dead.as_array().map(Vec::len) == Some(2), "{dead}");
    anyhow::ensure!(dead[1]["data"]["name"] == "theirs", "{dead}");

    // The seed's rules give it to its author, whose stream holds it once it passes the reply's
    // write checkpoint (the uploading client's: "c"), without the token's claims; nobody else
    // sees it.
    use walsync_client::{Connector, SyncClient, Transport};
    let reply: walsync_write::UploadReply = serde_json::from_value(reply)?;
    let connect = |user: &str| {
        Connector::new(&service.url(), Transport::Http, &service::token(user))
            .map(|c| SyncClient::new(c, "c"))
    };
    let mut author = connect("u1")?;
    until_written(&mut author, &reply).await?;
    let id: i64 = s
        .scalar("SELECT id FROM rejected_writes WHERE user_id = 'u1' AND tx_key = 'tx:30'")
        .await?;
    let rows = author.state().rows();
    let shown: Value = serde_json::from_str(
        rows.get(&("rejected_writes".to_owned(), id.to_string()))
            .ok_or_else(|| anyhow::anyhow!("the dead letter is not in its author's stream"))?,
    )?;
    anyhow::ensure!(
        shown["code"] == "denied" && shown["op_id"] == 6 && shown.get("claims").is_none(),
        "{shown}"
    );
    let ops: Value = serde_json::from_str(shown["ops"].as_str().unwrap_or_default())?;
    anyhow::ensure!(ops == dead, "{ops} != {dead}");
    let mut other = connect("u2")?;
    other.next_checkpoint().await?;
    anyhow::ensure!(
        !other
            .state()
            .rows()
            .keys()
            .any(|(t, _)| t == "rejected_writes"),
        "another user sees u1's dead letters"
    );
    service.stop().await;
    Ok(())
}

/// A retried upload returns the first result and writes nothing again (the version moves
/// once), even for a transaction that was rejected; and each transaction of a batch is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_idempotent() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s).await?;
    let body = upload(
        "device-1",
        vec![
            tx(
                1,
                vec![patch(1, "projects", 1, json!({"description": "once"}))],
            ),
            tx(
                2,
                vec![put(
                    2,
                    "teams",
                    40_001,
                    json!({"project_id": 1, "name": "t"}),
                )],
            ),
            tx(
                3,
                vec![put(
                    3,
                    "teams",
                    40_002,
                    json!({"project_id": 3, "name": "denied"}),
                )],
            ),
        ],
    );
    let (status, first) = post(&service, "u1", &body).await?;
    anyhow::ensure!(status == 200, "{first}");
    let statuses = |reply: &Value| -> Vec<String> {
        reply["results"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    anyhow::ensure!(
        statuses(&first) == ["applied", "applied", "rejected"],
        "{first}"
    );
    anyhow::ensure!(first["write_checkpoint"].is_string(), "{first}");
    let version = row(&s, "projects", 1).await?.unwrap_or_default()["_version"].clone();

    let (_, again) = post(&service, "u1", &body).await?;
    anyhow::ensure!(
        statuses(&again) == ["applied", "applied", "rejected"],
        "{again}"
    );
    anyhow::ensure!(
        again["results"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|r| r["replayed"] == true),
        "{again}"
    );
    anyhow::ensure!(row(&s, "projects", 1).await?.unwrap_or_default()["_version"] == version);
    let dead: i64 = s
        .scalar("SELECT count(*) FROM rejected_writes WHERE tx_key = 'tx:3'")
        .await?;
    anyhow::ensure!(dead == 1, "the rejection was recorded {dead} times");

    // Each way a transaction is applied claims it so: several ops sent together, and op by op
    // (an edit with the values it started from, on a table with conflict rules). A retry
    // changes nothing, and so do copies of one upload sent at the same moment.
    let version = |r: Option<Value>| r.unwrap_or_default()["_version"].as_i64();
    let before = version(row(&s, "projects", 1).await?);
    let shapes = upload(
        "device-1",
        vec![
            tx(
                4,
                vec![
                    patch(4, "projects", 1, json!({"description": "pair"})),
                    put(5, "teams", 40_003, json!({"project_id": 1, "name": "p"})),
                ],
            ),
            tx(
                5,
                vec![json!({
                    "op_id": 6, "op": "PATCH", "type": "projects", "id": "1",
                    "data": {"name": "stepped"}, "old": {"name": "project 1"},
                })],
            ),
        ],
    );
    let (_, first) = post(&service, "u1", &shapes).await?;
    anyhow::ensure!(statuses(&first) == ["applied", "applied"], "{first}");
    let after = version(row(&s, "projects", 1).await?);
    anyhow::ensure!(after == before.map(|v| v + 2), "{before:?} -> {after:?}");
    let (_, again) = post(&service, "u1", &shapes).await?;
    anyhow::ensure!(
        statuses(&again) == ["applied", "applied"]
            && again["results"][0]["replayed"] == true
            && again["results"][1]["replayed"] == true,
        "{again}"
    );
    anyhow::ensure!(version(row(&s, "projects", 1).await?) == after);
    for (n, tx_id) in [(6, 6), (7, 7)] {
        let one = if tx_id == 6 {
            tx(
                tx_id,
                vec![patch(n, "projects", 1, json!({"description": "racing"}))],
            )
        } else {
            tx(
                tx_id,
                vec![
                    patch(n, "projects", 1, json!({"description": "racing pair"})),
                    patch(n + 1, "teams", 40_003, json!({"name": "q"})),
                ],
            )
        };
        let body = upload("device-1", vec![one]);
        let before = version(row(&s, "projects", 1).await?);
        let replies =
            futures_util::future::join_all((0..8).map(|_| post(&service, "u1", &body))).await;
        let mut fresh = 0;
        for reply in replies {
            let (_, reply) = reply?;
            anyhow::ensure!(statuses(&reply) == ["applied"], "{reply}");
            fresh += usize::from(reply["results"][0]["replayed"] != true);
        }
        anyhow::ensure!(fresh == 1, "{fresh} of 8 copies of tx {tx_id} were applied");
        anyhow::ensure!(version(row(&s, "projects", 1).await?) == before.map(|v| v + 1));
    }

    // The same transaction id from another device, or another user, is another transaction.
    let (_, other) = post(
        &service,
        "u1",
        &upload(
            "device-2",
            vec![tx(
                1,
                vec![patch(1, "projects", 1, json!({"description": "twice"}))],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(
        statuses(&other) == ["applied"] && other["results"][0]["replayed"].is_null(),
        "{other}"
    );
    service.stop().await;
    Ok(())
}

/// Names and values that try to be SQL are refused or stored as they are; unknown tables and
/// columns, ids and values that do not fit the column, and malformed or oversized requests
/// get clear errors, and PostgreSQL is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_malformed_uploads_are_refused_cleanly() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s).await?;
    let count = || s.scalar::<i64>("SELECT count(*) FROM teams");
    let teams = count().await?;
    let cases = [
        (
            put(
                1,
                "teams; DROP TABLE teams; --",
                50_001,
                json!({"name": "x"}),
            ),
            "invalid",
        ),
        (put(2, "pg_catalog.pg_class", 50_002, json!({})), "invalid"),
        (
            put(
                3,
                "teams",
                50_003,
                json!({"project_id": 1, "name\" = 'x'; --": "y"}),
            ),
            "invalid",
        ),
        (
            put(
                4,
                "teams",
                "1 OR 1=1",
                json!({"project_id": 1, "name": "x"}),
            ),
            "invalid_value",
        ),
        (
            put(
                5,
                "teams",
                50_005,
                json!({"project_id": "one", "name": "x"}),
            ),
            "invalid_value",
        ),
        (
            put(6, "teams", 50_006, json!({"project_id": 1e30, "name": "x"})),
            "invalid_value",
        ),
        (
            put(7, "teams", 50_007, json!({"project_id": 1})),
            "constraint_violation",
        ),
        (patch(8, "teams", 50_008, json!({"name": "x"})), "not_found"),
        (
            put(
                9,
                "teams",
                50_009,
                json!({"id": 7, "project_id": 1, "name": "x"}),
            ),
            "invalid",
        ),
    ];
    for (i, (op, code)) in cases.into_iter().enumerate() {
        let (status, reply) =
            post(&service, "u1", &upload("h", vec![tx(i as i64, vec![op])])).await?;
        anyhow::ensure!(status == 200, "{reply}");
        anyhow::ensure!(
            reply["results"][0]["code"] == code,
            "case {i}: want {code}: {reply}"
        );
    }
    anyhow::ensure!(count().await? == teams, "a refused upload wrote a team");

    // The row's id may be repeated in its data (as a number or as text).
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "h",
            vec![tx(
                99,
                vec![put(
                    1,
                    "teams",
                    50_099,
                    json!({"id": 50_099, "project_id": 1, "name": "x"}),
                )],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["status"] == "applied", "{reply}");

    // A value that looks like SQL is a value.
    let evil = "x'); DROP TABLE teams; --";
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "h",
            vec![tx(
                100,
                vec![put(
                    1,
                    "teams",
                    50_100,
                    json!({"project_id": 1, "name": evil}),
                )],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["status"] == "applied", "{reply}");
    anyhow::ensure!(row(&s, "teams", 50_100).await?.unwrap_or_default()["name"] == evil);

    // Whole requests: malformed, without a client id, too many ops, without a token.
    walsync_client::install_crypto();
    let http = reqwest::Client::new();
    let url = format!("{}/write", service.url());
    let resp = http
        .post(&url)
        .bearer_auth(service::token("u1"))
        .body("{not json")
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 400);
    let (status, _) = post(&service, "u1", &upload("", vec![])).await?;
    anyhow::ensure!(status == 400);
    let many: Vec<Value> = (0..1_001).map(|i| delete(i, "teams", 60_000 + i)).collect();
    let (status, reply) = post(&service, "u1", &upload("h", vec![tx(200, many)])).await?;
    anyhow::ensure!(status == 413, "{reply}");
    let resp = http.post(&url).json(&upload("h", vec![])).send().await?;
    anyhow::ensure!(resp.status() == 401);
    service.stop().await;

    // Without [writes], /write says writes are off.
    let service = Service::start(service::config(&s, ServerConfig::default())).await?;
    let (status, reply) = post(&service, "u1", &upload("h", vec![])).await?;
    anyhow::ensure!(
        status == 404 && reply["error"]["code"] == "not_found",
        "{reply}"
    );
    service.stop().await;
    Ok(())
}

/// Over either transport an upload's reply carries a write checkpoint, and the writer's own
/// stream (same client id) reaches it holding the write; the gRPC reply is the HTTP one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writers_stream_shows_its_upload_over_both_transports() -> anyhow::Result<()> {
    use walsync_client::{Connector, SyncClient, Transport};
    let s = seed::setup().await?;
    let service = start(&s).await?;
    for (i, transport) in [Transport::Http, Transport::Grpc].into_iter().enumerate() {
        let client_id = format!("device-{i}");
        let connector = Connector::new(&service.url(), transport, &service::token("u1"))?;
        let mut client = SyncClient::new(connector.clone(), &client_id);
        client.next_checkpoint().await?;
        let description = format!("uploaded over {transport:?}");
        let request: walsync_write::UploadRequest = serde_json::from_value(upload(
            &client_id,
            vec![tx(
                1,
                vec![patch(1, "projects", 1, json!({"description": description}))],
            )],
        ))?;
        let reply = connector.upload(&request).await?;
        anyhow::ensure!(
            reply.results.len() == 1 && reply.results[0].status == walsync_write::Status::Applied,
            "{reply:?}"
        );
        let project = project_at_write_checkpoint(&mut client, &reply).await?;
        anyhow::ensure!(project["description"] == description.as_str(), "{project}");
        anyhow::ensure!(project["_last_modified_by"] == "u1", "{project}");

        // A refused request is an error on either transport.
        let bad: walsync_write::UploadRequest = serde_json::from_value(upload("", vec![]))?;
        anyhow::ensure!(connector.upload(&bad).await.is_err());
    }
    service.stop().await;
    Ok(())
}

/// Waits until a checkpoint of the client's stream passes the reply's write checkpoint.
async fn until_written(
    client: &mut walsync_client::SyncClient,
    reply: &walsync_write::UploadReply,
) -> anyhow::Result<()> {
    let wanted: u64 = reply
        .write_checkpoint
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("no write checkpoint in {reply:?}"))?
        .parse()?;
    client
        .until(std::time::Duration::from_secs(30), |state| {
            state.write_checkpoint().is_some_and(|w| w >= wanted)
        })
        .await?;
    Ok(())
}

/// Project 1 as the client holds it once a checkpoint passes the reply's write checkpoint.
async fn project_at_write_checkpoint(
    client: &mut walsync_client::SyncClient,
    reply: &walsync_write::UploadReply,
) -> anyhow::Result<Value> {
    until_written(client, reply).await?;
    let rows = client.state().rows();
    let project = rows
        .get(&("projects".to_owned(), "1".to_owned()))
        .ok_or_else(|| anyhow::anyhow!("project 1 is not in the stream"))?;
    Ok(serde_json::from_str(project)?)
}

/// The write checkpoint of an upload is passed only once the stream carries the upload, even
/// when another transaction commits while the upload commits: the upload is held at its commit
/// (a deferred trigger waits on a lock the test holds) while another change reaches the
/// stream, then let go. The first checkpoint that passes the reply's write checkpoint already
/// holds the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_checkpoint_is_not_passed_before_its_upload() -> anyhow::Result<()> {
    use walsync_client::{Connector, SyncClient, Transport};
    let s = seed::setup().await?;
    s.sql
        .batch_execute(
            "CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER hold AFTER UPDATE ON projects
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold();",
        )
        .await?;
    let service = start(&s).await?;
    let (holder, conn) = tokio_postgres::connect(&s.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    for transport in [Transport::Http, Transport::Grpc] {
        let client_id = format!("held-{transport:?}");
        let connector = Connector::new(&service.url(), transport, &service::token("u1"))?;
        let mut client = SyncClient::new(connector.clone(), &client_id);
        client.next_checkpoint().await?;
        holder.execute("SELECT pg_advisory_lock(4242)", &[]).await?;
        let description = format!("held over {transport:?}");
        let request: walsync_write::UploadRequest = serde_json::from_value(upload(
            &client_id,
            vec![tx(
                1,
                vec![patch(1, "projects", 1, json!({"description": description}))],
            )],
        ))?;
        let uploading = tokio::spawn({
            let connector = connector.clone();
            async move { connector.upload(&request).await }
        });
        // The upload waits at its commit; another transaction commits and reaches the stream.
        until_a_lock_waits(&s, "advisory", || uploading.is_finished()).await?;
        let team: i64 = if transport == Transport::Http {
            990_001
        } else {
            990_002
        };
        s.sql
            .execute(
                "INSERT INTO teams (id, project_id, name) VALUES ($1, 1, 'meanwhile')",
                &[&team],
            )
            .await?;
        let team_key = ("teams".to_owned(), team.to_string());
        client
            .until(std::time::Duration::from_secs(30), |state| {
                state.rows().contains_key(&team_key)
            })
            .await?;
        holder
            .execute("SELECT pg_advisory_unlock(4242)", &[])
            .await?;
        let reply = uploading.await??;
        let project = project_at_write_checkpoint(&mut client, &reply).await?;
        anyhow::ensure!(
            project["description"] == description.as_str(),
            "the write checkpoint passed before the upload was in the stream: {project}"
        );
    }
    service.stop().await;
    Ok(())
}

/// Ops that wait for a row another transaction is changing are decided on the row as that
/// transaction leaves it: a `PUT` of a row deleted meanwhile inserts it again, a `PATCH` of
/// one is not found (not "denied"), and an update whose predicate the other transaction made
/// false (the row moved into a project the writer is not in) is denied, though it held on the
/// row as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_racing_another_transaction_see_the_row_it_leaves() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s).await?;
    let (other, conn) = tokio_postgres::connect(&s.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // u1 owns project 1 and is no member of project 4.
    let rows: Vec<i64> = s
        .sql
        .query(
            "SELECT id FROM assessment_responses WHERE project_id = 1 ORDER BY id LIMIT 3",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let cases = [
        (
            rows[0],
            "DELETE FROM assessment_responses WHERE id = $1",
            true,
        ),
        (
            rows[1],
            "DELETE FROM assessment_responses WHERE id = $1",
            false,
        ),
        (
            rows[2],
            "UPDATE assessment_responses SET project_id = 4 WHERE id = $1",
            false,
        ),
    ];
    for (n, (id, change, put)) in cases.into_iter().enumerate() {
        other.batch_execute("BEGIN").await?;
        other.execute(change, &[&id]).await?;
        let data = json!({"project_id": 1, "answer": "from the client"});
        let op = if put {
            self::put(1, "assessment_responses", id, data)
        } else {
            patch(1, "assessment_responses", id, data)
        };
        let body = upload("racing", vec![tx(n as i64 + 1, vec![op])]);
        let uploading = tokio::spawn({
            let url = service.url();
            async move { post_to(&url, "u1", &body).await }
        });
        until_a_lock_waits(&s, "transactionid", || uploading.is_finished()).await?;
        other.batch_execute("COMMIT").await?;
        let (_, reply) = uploading.await??;
        let result = &reply["results"][0];
        let now = row(&s, "assessment_responses", id).await?;
        match n {
            0 => anyhow::ensure!(
                result["status"] == "applied"
                    && now.is_some_and(|r| r["answer"] == "from the client"),
                "a PUT of a row deleted meanwhile: {reply}"
            ),
            1 => anyhow::ensure!(
                result["code"] == "not_found" && now.is_none(),
                "a PATCH of a row deleted meanwhile: {reply}"
            ),
            _ => anyhow::ensure!(
                result["code"] == "denied" && now.is_some_and(|r| r["project_id"] == 4),
                "a PATCH of a row moved out of the writer's projects meanwhile: {reply}"
            ),
        }
    }
    service.stop().await;
    Ok(())
}

/// An upload that changes nothing the publication carries still has its write checkpoint
/// passed: the stream says nothing of it, and the store's position moves past it when the
/// server says it has decoded that far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_checkpoint_passes_though_nothing_published_changed() -> anyhow::Result<()> {
    use walsync_client::{Connector, SyncClient, Transport};
    let s = seed::setup().await?;
    s.sql
        .batch_execute(&format!(
            "DROP PUBLICATION walsync; CREATE PUBLICATION walsync FOR TABLE {};
             CREATE TABLE private_notes (id text PRIMARY KEY, body text NOT NULL);",
            walsync_testkit::seed::TABLES.join(", ")
        ))
        .await?;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/walsync.toml");
    let mut writes = walsync::Config::load(&example)?
        .writes
        .ok_or_else(|| anyhow::anyhow!("the example configuration has no [writes]"))?;
    writes.tables.insert(
        "private_notes".into(),
        walsync_write::TableRule {
            insert: Some("true".into()),
            update: Some("true".into()),
            ..Default::default()
        },
    );
    let mut config = service::config(&s, ServerConfig::default());
    config.writes = Some(writes);
    let service = Service::start(config).await?;
    let connector = Connector::new(&service.url(), Transport::Http, &service::token("u1"))?;
    let mut client = SyncClient::new(connector.clone(), "notes");
    client.next_checkpoint().await?;
    for n in 0..3 {
        let request: walsync_write::UploadRequest = serde_json::from_value(upload(
            "notes",
            vec![tx(
                n,
                vec![put(
                    1,
                    "private_notes",
                    "a3f1c9e2-0000-4000-8000-000000000001",
                    json!({"body": format!("note {n}")}),
                )],
            )],
        ))?;
        let reply = connector.upload(&request).await?;
        anyhow::ensure!(
            reply.results[0].status == walsync_write::Status::Applied,
            "{reply:?}"
        );
        until_written(&mut client, &reply).await?;
    }
    service.stop().await;
    Ok(())
}

/// A column renamed or added while walsync runs: an upload naming the new column is applied
/// (walsync reads its catalog again instead of refusing it), one naming the old column is
/// rejected as invalid, and nothing needs a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_renamed_and_added_while_running_are_written() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s).await?;
    let statuses = |reply: &Value| -> Vec<(String, String)> {
        reply["results"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["status"].as_str().unwrap_or_default().to_owned(),
                    r["code"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let (_, first) = post(
        &service,
        "u1",
        &upload(
            "d",
            vec![tx(
                1,
                vec![put(
                    1,
                    "teams",
                    50_001,
                    json!({"project_id": 1, "name": "before"}),
                )],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(
        statuses(&first) == [("applied".into(), "".into())],
        "{first}"
    );
    s.sql
        .batch_execute(
            "ALTER TABLE teams RENAME COLUMN name TO title; ALTER TABLE teams ADD COLUMN colour text;",
        )
        .await?;
    let (_, renamed) = post(
        &service,
        "u1",
        &upload(
            "d",
            vec![
                tx(
                    2,
                    vec![patch(
                        2,
                        "teams",
                        50_001,
                        json!({"title": "after", "colour": "teal"}),
                    )],
                ),
                tx(
                    3,
                    vec![patch(3, "teams", 50_001, json!({"name": "the old name"}))],
                ),
            ],
        ),
    )
    .await?;
    anyhow::ensure!(
        statuses(&renamed)
            == [
                ("applied".into(), "".into()),
                ("rejected".into(), "invalid".into())
            ],
        "{renamed}"
    );
    let team = row(&s, "teams", 50_001).await?.unwrap_or_default();
    anyhow::ensure!(
        team["title"] == "after" && team["colour"] == "teal",
        "{team}"
    );
    service.stop().await;
    Ok(())
}

/// `walsync writes rejected` lists a rejected transaction with its reason; once its cause is
/// put right, `walsync writes replay ID` applies it as its user, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_from_the_command_line() -> anyhow::Result<()> {
    const BIN: &str = env!("CARGO_BIN_EXE_walsync-cli");
    let s = seed::setup().await?;
    let service = start(&s).await?;
    // u4 is in no project: its team for project 5 is denied.
    let (_, reply) = post(
        &service,
        "u4",
        &upload(
            "tablet",
            vec![tx(
                7,
                vec![put(
                    1,
                    "teams",
                    70_001,
                    json!({"project_id": 5, "name": "later"}),
                )],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["code"] == "denied", "{reply}");
    service.stop().await;

    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/walsync.toml"),
    )?;
    let writes = &example[example.find("[writes]").unwrap_or(example.len())..];
    let config = s.dir.path().join("walsync.toml");
    std::fs::write(
        &config,
        format!(
            "rules = \"{}\"\n[postgres]\nurl = \"{}\"\n[auth]\nsecret = \"s\"\n\n{writes}",
            seed::RULES_PATH,
            s.url
        ),
    )?;
    let walsync = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("writes")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()?;
        anyhow::Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (ok, listed, err) = walsync(&["rejected"])?;
    anyhow::ensure!(ok, "{err}");
    anyhow::ensure!(
        listed.contains("user u4")
            && listed.contains("tx:7")
            && listed.contains("denied")
            && listed.contains("1 ops on teams"),
        "{listed}"
    );
    let (ok, json_list, err) = walsync(&["rejected", "--json", "--user", "u4"])?;
    anyhow::ensure!(ok, "{err}");
    let letters: Value = serde_json::from_str(&json_list)?;
    let id = letters[0]["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("{json_list}"))?;
    anyhow::ensure!(
        letters[0]["ops"][0]["data"]["name"] == "later",
        "{json_list}"
    );

    // Still denied: the replay says so and the dead letter stays.
    let (ok, out, _) = walsync(&["replay", &id.to_string()])?;
    anyhow::ensure!(!ok && out.contains("denied"), "{out}");
    anyhow::ensure!(row(&s, "teams", 70_001).await?.is_none());

    // u4 joins project 5 as an editor: the replay applies it, once.
    s.sql
        .batch_execute(
            "INSERT INTO project_members (project_id, user_id, role) VALUES (5, 'u4', 'editor')",
        )
        .await?;
    for _ in 0..2 {
        let (ok, out, err) = walsync(&["replay", &id.to_string()])?;
        anyhow::ensure!(ok && out.contains("applied"), "{out} {err}");
    }
    let team = row(&s, "teams", 70_001).await?.unwrap_or_default();
    anyhow::ensure!(
        team["name"] == "later" && team["_last_modified_by"] == "u4",
        "{team}"
    );
    let (ok, listed, _) = walsync(&["rejected"])?;
    anyhow::ensure!(ok && listed.contains("no rejected writes"), "{listed}");
    let (_, all, _) = walsync(&["rejected", "--all"])?;
    anyhow::ensure!(all.contains("replayed"), "{all}");
    Ok(())
}

/// A field the server changed since the client read it (the op's `old` values) is decided by
/// the table's strategy, field by field; a manual conflict is stored with both versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_are_decided_field_by_field() -> anyhow::Result<()> {
    use walsync_write::{ConflictRule, Strategy, TableRule};
    let s = seed::setup().await?;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/walsync.toml");
    let mut writes = walsync::Config::load(&example)?
        .writes
        .ok_or_else(|| anyhow::anyhow!("no [writes]"))?;
    let mut on = |table: &str, default: Strategy, columns: &[(&str, Strategy)]| {
        let rule: &mut TableRule = writes.tables.entry(table.to_owned()).or_default();
        rule.conflicts = Some(ConflictRule {
            default,
            columns: columns.iter().map(|(c, s)| ((*c).to_owned(), *s)).collect(),
            scope: Some("project_id".into()),
        });
    };
    on("teams", Strategy::ServerWins, &[]);
    on("assessments", Strategy::ClientWins, &[]);
    on("sow_section_approvals", Strategy::LastWriteWins, &[]);
    on(
        "assessment_responses",
        Strategy::MergeFields,
        &[("answer", Strategy::Manual)],
    );
    let mut config = service::config(&s, ServerConfig::default());
    config.writes = Some(writes);
    let service = Service::start(config).await?;
    s.sql
        .batch_execute(
            "INSERT INTO teams (id, project_id, name) VALUES (80001, 1, 'v0');
             INSERT INTO assessments (id, project_id, phase, tier) VALUES (80002, 1, 'v0', 't0');
             INSERT INTO sow_section_approvals (id, project_id, section) VALUES (80003, 1, 'v0'), (80004, 1, 'v0');
             INSERT INTO assessment_responses (id, project_id, answer, notes, priority) VALUES (80005, 1, 'v0', 'n0', 'p0');
             -- What other writers did since the client read the rows.
             UPDATE teams SET name = 'server' WHERE id = 80001;
             UPDATE assessments SET phase = 'server' WHERE id = 80002;
             UPDATE sow_section_approvals SET section = 'server' WHERE id IN (80003, 80004);
             UPDATE assessment_responses SET answer = 'server', notes = 'server notes' WHERE id = 80005;",
        )
        .await?;
    let edit = |op_id: i64, table: &str, id: i64, data: Value, old: Value| {
        let mut op = patch(op_id, table, id, data);
        op["old"] = old;
        op
    };
    let ops = vec![
        edit(
            1,
            "teams",
            80001,
            json!({"name": "client"}),
            json!({"name": "v0"}),
        ),
        edit(
            2,
            "assessments",
            80002,
            json!({"phase": "client", "tier": "t1"}),
            json!({"phase": "v0", "tier": "t0"}),
        ),
        // The later edit wins: the upload's arrival, and an edit made long ago.
        edit(
            3,
            "sow_section_approvals",
            80003,
            json!({"section": "client"}),
            json!({"section": "v0"}),
        ),
        edit(
            4,
            "sow_section_approvals",
            80004,
            json!({"section": "client", "_last_modified_at": "2000-01-01T00:00:00Z"}),
            json!({"section": "v0"}),
        ),
        // A whole row (as a PUT carries it): the answer both changed is manual, the notes only
        // the server changed stay the server's, the priority only the client changed is written.
        {
            let mut op = put(
                5,
                "assessment_responses",
                80005,
                json!({"project_id": 1, "answer": "client", "notes": "n0", "priority": "p1"}),
            );
            op["old"] = json!({"project_id": 1, "answer": "v0", "notes": "n0", "priority": "p0"});
            op
        },
    ];
    let (_, reply) = post(&service, "u1", &upload("c", vec![tx(1, ops)])).await?;
    let result = &reply["results"][0];
    anyhow::ensure!(result["status"] == "applied", "{reply}");
    let field = |table: &'static str, id: i64, column: &'static str| {
        let s = &s;
        async move {
            let r = row(s, table, id).await?.unwrap_or_default();
            anyhow::Ok(r[column].as_str().unwrap_or_default().to_owned())
        }
    };
    anyhow::ensure!(field("teams", 80001, "name").await? == "server");
    anyhow::ensure!(field("assessments", 80002, "phase").await? == "client");
    anyhow::ensure!(field("assessments", 80002, "tier").await? == "t1");
    anyhow::ensure!(field("sow_section_approvals", 80003, "section").await? == "client");
    anyhow::ensure!(field("sow_section_approvals", 80004, "section").await? == "server");
    anyhow::ensure!(field("assessment_responses", 80005, "answer").await? == "server");
    anyhow::ensure!(field("assessment_responses", 80005, "notes").await? == "server notes");
    anyhow::ensure!(field("assessment_responses", 80005, "priority").await? == "p1");

    let outcomes: Vec<(i64, String, String)> = result["conflicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["op_id"].as_i64().unwrap_or_default(),
                c["column"].as_str().unwrap_or_default().to_owned(),
                c["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want: Vec<(i64, String, String)> = [
        (1, "name", "server"),
        (2, "phase", "client"),
        (3, "section", "client"),
        (4, "section", "server"),
        (5, "answer", "manual"),
    ]
    .iter()
    .map(|(o, c, w)| (*o, (*c).to_owned(), (*w).to_owned()))
    .collect();
    anyhow::ensure!(outcomes == want, "{outcomes:?}");

    // The manual one is stored, both versions and what they came from, scoped to the project.
    let stored = s
        .sql
        .query_one(
            "SELECT table_name, row_id, column_name, base_value, client_value, server_value, scope::text, user_id \
             FROM write_conflicts",
            &[],
        )
        .await?;
    let got: Vec<Option<String>> = (0..8).map(|i| stored.get(i)).collect();
    let want: Vec<Option<String>> = [
        "assessment_responses",
        "80005",
        "answer",
        "v0",
        "client",
        "server",
        "1",
        "u1",
    ]
    .iter()
    .map(|v| Some((*v).to_owned()))
    .collect();
    anyhow::ensure!(got == want, "{got:?}");

    // Without old values nothing is a conflict: the client's value is written.
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "c",
            vec![tx(
                2,
                vec![patch(6, "teams", 80001, json!({"name": "client again"}))],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["conflicts"].is_null(), "{reply}");
    anyhow::ensure!(field("teams", 80001, "name").await? == "client again");

    // Operators see them counted by outcome (a fixed label set, no ids).
    let metrics = reqwest::get(format!("{}/metrics", service.url()))
        .await?
        .text()
        .await?;
    for outcome in ["client", "server", "manual"] {
        let line = format!("walsync_upload_conflicts_total{{outcome=\"{outcome}\"}} ");
        anyhow::ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "no {outcome} conflicts counted:\n{metrics}"
        );
    }
    service.stop().await;
    Ok(())
}

/// A client whose connection drops before it reads the reply sends the transaction again:
/// whether the first attempt was applied or not, it is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_dropped_reply_applies_once() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let s = seed::setup().await?;
    let service = start(&s).await?;
    let version = || s.scalar::<i64>("SELECT _version FROM projects WHERE id = 1");
    let before = version().await?;
    for attempt in 0..5i64 {
        let body = upload(
            "flaky",
            vec![tx(
                attempt,
                vec![patch(
                    attempt,
                    "projects",
                    1,
                    json!({"description": format!("attempt {attempt}")}),
                )],
            )],
        )
        .to_string();
        // The request goes out whole and the socket closes at once: the reply is never read.
        let mut socket = tokio::net::TcpStream::connect(service.addr).await?;
        let head = format!(
            "POST /write HTTP/1.1\r\nhost: walsync\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            service::token("u1"),
            body.len()
        );
        socket.write_all(head.as_bytes()).await?;
        socket.write_all(body.as_bytes()).await?;
        drop(socket);
        // Later attempts give the first a moment (it may be applied, cut short or still running).
        tokio::time::sleep(std::time::Duration::from_millis(attempt as u64 * 20)).await;
        let (status, reply) = post(&service, "u1", &serde_json::from_str(&body)?).await?;
        anyhow::ensure!(status == 200, "{reply}");
        anyhow::ensure!(reply["results"][0]["status"] == "applied", "{reply}");
    }
    let after = version().await?;
    anyhow::ensure!(
        after == before + 5,
        "5 transactions moved the version by {}",
        after - before
    );
    service.stop().await;
    Ok(())
}

/// Values nobody here designed: a text UUID key, jsonb with an integer beyond 64 bits, a long
/// decimal and unicode, an array with a NULL and quotes, a long decimal, timestamps before 1970
/// and far in the future, a boolean sent as 1, a 300 KB (TOASTed) text. They arrive in
/// PostgreSQL exactly (compared with PostgreSQL's own reading of the same text), and an edit
/// whose `old` values are the row as PostgreSQL prints it meets no false conflict; a real one is
/// caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_nobody_designed_arrive_exactly_and_compare_without_false_conflicts()
-> anyhow::Result<()> {
    use walsync_write::{ConflictRule, Strategy, TableRule};
    let s = seed::setup().await?;
    s.sql
        .batch_execute(
            "CREATE TABLE odd (id text PRIMARY KEY, doc jsonb, tags text[], amount numeric,
                               at timestamptz, flag boolean, big text, note text)",
        )
        .await?;
    let mut writes = walsync_write::WriteConfig::default();
    writes.tables.insert(
        "odd".into(),
        TableRule {
            insert: Some("true".into()),
            update: Some("true".into()),
            delete: Some("true".into()),
            conflicts: Some(ConflictRule {
                default: Strategy::Manual,
                columns: Default::default(),
                scope: None,
            }),
        },
    );
    let mut config = service::config(&s, ServerConfig::default());
    config.writes = Some(writes);
    let service = Service::start(config).await?;

    let id = "7f1d3c2a-9b4e-4f6a-8c0d-2e5b7a9c1f30";
    let doc = r#"{"big": 12345678901234567890123, "d": 0.1000000000000000055511151231257827, "u": "ünï ✓", "n": [null, {"x": "a\"b"}]}"#;
    let amount = "3.14159265358979323846264338327950288";
    let big = "é".repeat(150_000);
    let (_, reply) = post(
        &service,
        "u1",
        &upload(
            "odd",
            vec![tx(
                1,
                vec![put(
                    1,
                    "odd",
                    id,
                    json!({"doc": doc, "tags": ["a", null, "b,\"c"], "amount": amount,
                           "at": "1950-01-01 00:00:00+00", "flag": 1, "big": big, "note": "x"}),
                )],
            )],
        ),
    )
    .await?;
    anyhow::ensure!(reply["results"][0]["status"] == "applied", "{reply}");
    let exact: bool = s
        .sql
        .query_one(
            "SELECT doc = $2::text::jsonb AND doc::text = ($2::text::jsonb)::text
                    AND tags IS NOT DISTINCT FROM ARRAY['a', NULL, 'b,\"c']
                    AND amount::text = $3 AND at = '1950-01-01 00:00:00+00' AND flag
                    AND big = $4 AND note = 'x'
             FROM odd WHERE id = $1",
            &[&id, &doc, &amount, &big],
        )
        .await?
        .get(0);
    if !exact {
        let r = s
            .sql
            .query_one(
                "SELECT doc::text, ($2::text::jsonb)::text, tags::text, amount::text, at::text, flag::text, length(big), note FROM odd WHERE id = $1",
                &[&id, &doc],
            )
            .await?;
        anyhow::bail!(
            "a value did not arrive as sent: doc {} (want {}), tags {}, amount {}, at {}, flag {}, big {} chars, note {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4),
            r.get::<_, String>(5),
            r.get::<_, i32>(6),
            r.get::<_, String>(7)
        );
    }

    // The client edits from the row as PostgreSQL prints it: nothing changed meanwhile, so no
    // field is a conflict, whatever its type.
    let printed = || async {
        let r = s
            .sql
            .query_one(
                "SELECT doc::text, tags::text, amount::text, at::text, flag::int::text, big, note
                 FROM odd WHERE id = $1",
                &[&id],
            )
            .await?;
        let names = ["doc", "tags", "amount", "at", "flag", "big", "note"];
        let row: serde_json::Map<String, Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| ((*n).to_owned(), Value::from(r.get::<_, String>(i))))
            .collect();
        anyhow::Ok(row)
    };
    let mut whole = printed().await?;
    let old = Value::Object(whole.clone());
    whole.insert("note".into(), Value::from("edited"));
    whole.insert("at".into(), Value::from("9999-12-31 23:59:59+00"));
    let mut op = put(2, "odd", id, Value::Object(whole));
    op["old"] = old;
    let (_, reply) = post(&service, "u1", &upload("odd", vec![tx(2, vec![op])])).await?;
    anyhow::ensure!(
        reply["results"][0]["status"] == "applied" && reply["results"][0]["conflicts"].is_null(),
        "{reply}"
    );
    let stored: (String, bool) = {
        let r = s
            .sql
            .query_one(
                "SELECT note, at = '9999-12-31 23:59:59+00' FROM odd WHERE id = $1",
                &[&id],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    anyhow::ensure!(stored == ("edited".to_owned(), true), "{stored:?}");

    // Another writer changes the amount; an edit of the amount from the old one is a conflict.
    let old = printed().await?;
    s.sql
        .execute("UPDATE odd SET amount = amount + 1 WHERE id = $1", &[&id])
        .await?;
    let mut op = patch(3, "odd", id, json!({"amount": "0.5"}));
    op["old"] = json!({"amount": old["amount"]});
    let (_, reply) = post(&service, "u1", &upload("odd", vec![tx(3, vec![op])])).await?;
    anyhow::ensure!(
        reply["results"][0]["conflicts"][0]["outcome"] == "manual",
        "{reply}"
    );
    let amount_now: String = s
        .scalar(&format!("SELECT amount::text FROM odd WHERE id = '{id}'"))
        .await?;
    anyhow::ensure!(
        amount_now == "4.14159265358979323846264338327950288",
        "{amount_now}"
    );
    service.stop().await;
    Ok(())
}

/// An upload in flight when walsync is told to stop finishes within the shutdown grace and is
/// answered; one still held when the grace ends is cut off with its connection, and its
/// client's retry (to the next walsync) is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_in_flight_at_a_stop_finish_or_are_retried_once() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let (other, conn) = tokio_postgres::connect(&s.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let version = || s.scalar::<i64>("SELECT _version FROM projects WHERE id = 1");
    let held = |n: i64, description: &str| {
        upload(
            "stopping",
            vec![tx(
                n,
                vec![patch(n, "projects", 1, json!({"description": description}))],
            )],
        )
    };
    for (n, grace) in [(1_i64, 30_u64), (2, 1)] {
        let service = start_with(
            &s,
            ServerConfig {
                shutdown_timeout_seconds: grace,
                ..ServerConfig::default()
            },
        )
        .await?;
        let before = version().await?;
        other.batch_execute("BEGIN").await?;
        other
            .execute("SELECT 1 FROM projects WHERE id = 1 FOR UPDATE", &[])
            .await?;
        let body = held(n, &format!("held {n}"));
        let uploading = tokio::spawn({
            let url = service.url();
            let body = body.clone();
            async move { post_to(&url, "u1", &body).await }
        });
        until_a_lock_waits(&s, "transactionid", || uploading.is_finished()).await?;
        let addr = service.url().trim_start_matches("http://").to_owned();
        let stopping = tokio::spawn(service.stop());
        // The listener closes at once: nothing new is taken while the upload finishes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&addr).await.is_ok() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "a stopping walsync still takes connections"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if n == 1 {
            // Within the grace: the held upload finishes and its client hears the result.
            other.batch_execute("COMMIT").await?;
            let (status, reply) = uploading
                .await?
                .map_err(|e| anyhow::anyhow!("the upload in flight at a stop: {e:?}"))?;
            anyhow::ensure!(
                status == 200 && reply["results"][0]["status"] == "applied",
                "an upload in flight at a stop: {status} {reply}"
            );
            stopping.await?;
        } else {
            // Past the grace: the stop returns though the upload still waits, and its client
            // loses the connection without an answer.
            tokio::time::timeout(std::time::Duration::from_secs(20), stopping)
                .await
                .map_err(|_| anyhow::anyhow!("the stop did not end after its grace"))??;
            let cut = tokio::time::timeout(std::time::Duration::from_secs(20), uploading)
                .await
                .map_err(|_| anyhow::anyhow!("the cut upload's connection stayed open"))??;
            anyhow::ensure!(cut.is_err(), "a cut upload was answered: {cut:?}");
            other.batch_execute("COMMIT").await?;
            // The client retries with the next walsync: applied, and written once.
            let service = start(&s).await?;
            let (status, reply) = post(&service, "u1", &body).await?;
            anyhow::ensure!(
                status == 200 && reply["results"][0]["status"] == "applied",
                "the retry of a cut upload: {status} {reply}"
            );
            service.stop().await;
        }
        anyhow::ensure!(
            version().await? == before + 1,
            "upload {n} was written once"
        );
        let description: String = s
            .scalar("SELECT description FROM projects WHERE id = 1")
            .await?;
        anyhow::ensure!(description == format!("held {n}"), "{description}");
    }
    Ok(())
}
