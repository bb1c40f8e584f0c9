//! Sync Streams end to end on real PostgreSQL: clients subscribe to streams with parameters
//! (over HTTP and gRPC), and each holds exactly the rows PostgreSQL itself returns for the
//! stream queries — the very SQL of the rules file, with `auth.user_id()` and
//! `subscription.parameter(...)` replaced by the request's values — through membership
//! changes, rows moving between projects, and subscriptions that change. Text UUID keys,
//! composite keys, jsonb with big numbers, arrays with NULLs and quotes, numeric and
//! timestamps outside the usual range.

use support::seed;
use support::service;

use std::collections::BTreeSet;

use serde_json::{Value as Json, json};
use service::{WAIT, config, token};
use walsync::Service;
use walsync_client::{Connector, SyncClient, Transport};
use walsync_protocol::{RequestedSubscription, StreamsRequest};
use walsync_server::ServerConfig;

const SCHEMA: &str = r#"
CREATE TABLE projects (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    archived boolean NOT NULL DEFAULT false
);
-- A composite key and no id: a table only parameter queries read.
CREATE TABLE project_members (
    project_id uuid NOT NULL,
    user_id text NOT NULL,
    role text NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE TABLE responses (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    answer jsonb,
    tags text[],
    score numeric,
    deleted boolean NOT NULL DEFAULT false,
    answered_at timestamptz
);
CREATE TABLE issues (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    open boolean NOT NULL
);
CREATE TABLE comments (
    id uuid PRIMARY KEY,
    issue_id uuid NOT NULL,
    body text
);
CREATE PUBLICATION walsync FOR ALL TABLES;
"#;

/// The stream queries; the oracle runs the same text in PostgreSQL.
const MY_PROJECTS: &str = "SELECT * FROM projects WHERE id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id()) AND NOT archived";
const PROJECT_RESPONSES: &str = "SELECT * FROM responses WHERE project_id = subscription.parameter('project') AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id()) AND NOT deleted";
const OWNED: &str = "SELECT r.* FROM responses r JOIN project_members m ON r.project_id = m.project_id WHERE m.user_id = auth.user_id() AND m.role = 'owner'";
/// A subscription value on one column beside a membership subquery on another.
const BY_STATE: &str = "SELECT * FROM responses WHERE deleted = subscription.parameter('deleted') AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())";
/// Two levels: comments of open issues of the user's projects (a chained lookup).
const NESTED: &str = "SELECT * FROM comments WHERE issue_id IN (SELECT id FROM issues WHERE open AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id()))";
/// The same two levels as joins, for owners only.
const JOINED: &str = "SELECT c.* FROM comments c JOIN issues i ON c.issue_id = i.id JOIN project_members m ON i.project_id = m.project_id WHERE m.user_id = auth.user_id() AND m.role = 'owner'";

fn rules() -> String {
    format!(
        "config:\n  edition: 3\nstreams:\n  my_projects:\n    auto_subscribe: true\n    priority: 1\n    query: {MY_PROJECTS}\n  project_responses:\n    query: {PROJECT_RESPONSES}\n  owned:\n    query: {OWNED}\n  nested:\n    query: {NESTED}\n  by_state:\n    query: {BY_STATE}\n  joined:\n    query: {JOINED}\n"
    )
}

const P: [&str; 3] = [
    "0b6f3a0e-1c2d-4e5f-8a9b-000000000001",
    "9e2d7c41-77aa-4b3c-9d8e-000000000002",
    "5a4b3c2d-1e0f-4a9b-8c7d-000000000003",
];

/// The rows (table, id) PostgreSQL returns for `query` as `user` with subscription `params`.
async fn oracle(
    s: &seed::Setup,
    table: &str,
    query: &str,
    user: &str,
    params: &Json,
) -> anyhow::Result<BTreeSet<(String, String)>> {
    let literal = |v: Option<&Json>| match v {
        Some(Json::String(t)) => format!("'{}'", t.replace('\'', "''")),
        Some(Json::Bool(b)) => b.to_string(),
        Some(Json::Number(n)) => n.to_string(),
        _ => "NULL".to_owned(),
    };
    let mut sql = query.replace("auth.user_id()", &literal(Some(&json!(user))));
    if let Some(p) = params.as_object() {
        for (k, v) in p {
            sql = sql.replace(&format!("subscription.parameter('{k}')"), &literal(Some(v)));
        }
    }
    let rows = s
        .sql
        .query(&format!("SELECT DISTINCT q.id::text FROM ({sql}) q"), &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| (table.to_owned(), r.get::<_, String>(0)))
        .collect())
}

/// What a client selecting `streams` as `user` should hold.
async fn expected(
    s: &seed::Setup,
    user: &str,
    streams: &StreamsRequest,
) -> anyhow::Result<BTreeSet<(String, String)>> {
    let mut want = BTreeSet::new();
    if streams.include_defaults.unwrap_or(true) {
        want.extend(oracle(s, "projects", MY_PROJECTS, user, &Json::Null).await?);
    }
    for sub in &streams.subscriptions {
        match sub.stream.as_str() {
            "project_responses" => {
                want.extend(oracle(s, "responses", PROJECT_RESPONSES, user, &sub.parameters).await?)
            }
            "owned" => want.extend(oracle(s, "responses", OWNED, user, &sub.parameters).await?),
            "nested" => want.extend(oracle(s, "comments", NESTED, user, &sub.parameters).await?),
            "by_state" => {
                want.extend(oracle(s, "responses", BY_STATE, user, &sub.parameters).await?)
            }
            "joined" => want.extend(oracle(s, "comments", JOINED, user, &sub.parameters).await?),
            "my_projects" => {
                want.extend(oracle(s, "projects", MY_PROJECTS, user, &sub.parameters).await?)
            }
            _ => {}
        }
    }
    Ok(want)
}

async fn converge(
    s: &seed::Setup,
    client: &mut SyncClient,
    user: &str,
    streams: &StreamsRequest,
) -> anyhow::Result<()> {
    let want = expected(s, user, streams).await?;
    let r = client
        .until(WAIT, |state| {
            state.rows().keys().cloned().collect::<BTreeSet<_>>() == want
        })
        .await;
    if let Err(e) = r {
        let got: BTreeSet<_> = client.state().rows().keys().cloned().collect();
        anyhow::bail!(
            "{user}: {e}; missing {:?}, extra {:?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        );
    }
    Ok(())
}

fn subscribe(stream: &str, parameters: Json) -> RequestedSubscription {
    RequestedSubscription {
        stream: stream.into(),
        parameters,
        override_priority: Json::Null,
    }
}

async fn data(s: &seed::Setup) -> anyhow::Result<()> {
    let [p1, p2, p3] = P;
    s.sql
        .batch_execute(&format!(
            "INSERT INTO projects (id, name) VALUES ('{p1}', 'ünï ''one'''), ('{p2}', 'two'), ('{p3}', 'three');
             INSERT INTO project_members VALUES
               ('{p1}', 'u1', 'owner'), ('{p2}', 'u1', 'viewer'), ('{p2}', 'u2', 'owner'), ('{p3}', 'u2', 'viewer');
             SELECT setseed(0.42);
             INSERT INTO responses
             SELECT md5(i::text)::uuid,
                    (ARRAY['{p1}', '{p2}', '{p3}']::uuid[])[1 + i % 3],
                    jsonb_build_object('n', 123456789012345678901234567890 + i, 'text', 'é \"q\" ' || i, 'nested', jsonb_build_array(i, NULL, 0.1000000000000000055511151231257827)),
                    ARRAY['t' || (i % 4), NULL, 'a \"quoted\", comma'],
                    (i * 1.000000000000000000001)::numeric,
                    i % 7 = 0,
                    CASE WHEN i % 2 = 0 THEN '1901-01-01 00:00:00+00'::timestamptz ELSE '9999-12-31 23:59:59+00'::timestamptz END
             FROM generate_series(1, 240) i;
             INSERT INTO issues
             SELECT md5('issue' || i)::uuid, (ARRAY['{p1}', '{p2}', '{p3}']::uuid[])[1 + i % 3], i % 4 <> 0
             FROM generate_series(1, 30) i;
             INSERT INTO comments
             SELECT md5('comment' || i)::uuid, md5('issue' || (1 + i % 30))::uuid, 'c' || i
             FROM generate_series(1, 150) i;"
        ))
        .await?;
    Ok(())
}

#[tokio::test]
async fn subscribed_streams_hold_what_postgres_returns_for_their_queries() -> anyhow::Result<()> {
    let s = seed::setup_with(SCHEMA, &rules()).await?;
    data(&s).await?;
    let rules_path = s.dir.path().join("streams.yaml");
    std::fs::write(&rules_path, rules())?;
    let mut cfg = config(&s, ServerConfig::default());
    cfg.rules = rules_path;
    let service = Service::start(cfg).await?;
    let url = service.url();
    let [p1, p2, p3] = P;

    // u1 over HTTP: the default stream, project 1's responses and the responses of projects
    // u1 owns; u2 over gRPC: no defaults, a project it is not in, one it is in, and a stream
    // that does not exist.
    let mut u1_streams = StreamsRequest {
        include_defaults: Some(true),
        subscriptions: vec![
            subscribe("project_responses", json!({"project": p1})),
            subscribe("owned", Json::Null),
            subscribe("nested", Json::Null),
        ],
    };
    let u2_streams = StreamsRequest {
        include_defaults: Some(false),
        subscriptions: vec![
            subscribe("project_responses", json!({"project": p1})),
            subscribe("project_responses", json!({"project": p3})),
            subscribe("nope", Json::Null),
            subscribe("joined", Json::Null),
            subscribe("by_state", json!({"deleted": true})),
        ],
    };
    let mut u1 = SyncClient::new(Connector::new(&url, Transport::Http, &token("u1"))?, "u1");
    u1.set_streams(u1_streams.clone());
    let mut u2 = SyncClient::new(Connector::new(&url, Transport::Grpc, &token("u2"))?, "u2");
    u2.set_streams(u2_streams.clone());
    converge(&s, &mut u1, "u1", &u1_streams).await?;
    converge(&s, &mut u2, "u2", &u2_streams).await?;
    assert!(!u1.state().rows().is_empty() && !u2.state().rows().is_empty());

    // Live: u2 loses project 3 and joins project 1; a response moves from project 1 to 2;
    // some are deleted and undeleted; a project is archived; u1 becomes owner of project 2.
    s.sql
        .batch_execute(&format!(
            "DELETE FROM project_members WHERE project_id = '{p3}' AND user_id = 'u2';
             INSERT INTO project_members VALUES ('{p1}', 'u2', 'viewer');
             UPDATE responses SET project_id = '{p2}' WHERE id IN (SELECT id FROM responses WHERE project_id = '{p1}' ORDER BY id LIMIT 5);
             UPDATE responses SET deleted = NOT deleted WHERE score::int % 5 = 0;
             UPDATE projects SET archived = true WHERE id = '{p2}';
             UPDATE project_members SET role = 'owner' WHERE project_id = '{p2}' AND user_id = 'u1';
             UPDATE issues SET project_id = '{p3}' WHERE id IN (SELECT id FROM issues WHERE project_id = '{p1}' ORDER BY id LIMIT 3);
             UPDATE issues SET open = NOT open WHERE id IN (SELECT id FROM issues ORDER BY id DESC LIMIT 4);
             UPDATE comments SET issue_id = md5('issue1')::uuid WHERE id IN (SELECT id FROM comments ORDER BY id LIMIT 10);
             INSERT INTO project_members VALUES ('{p3}', 'u1', 'owner');"
        ))
        .await?;
    converge(&s, &mut u1, "u1", &u1_streams).await?;
    converge(&s, &mut u2, "u2", &u2_streams).await?;

    // u1 changes its subscriptions: project 1's responses go, project 2's come.
    u1_streams.subscriptions = vec![subscribe("project_responses", json!({"project": p2}))];
    u1.set_streams(u1_streams.clone());
    converge(&s, &mut u1, "u1", &u1_streams).await?;
    assert!(
        !u1.state()
            .buckets()
            .keys()
            .any(|b| b.starts_with("project_responses") && b.contains(p1)),
        "project 1's bucket left with the subscription"
    );

    // The raw checkpoint line says why each bucket is there and what failed, per subscription.
    walsync_client::install_crypto();
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{url}/sync/stream"))
        .bearer_auth(token("u2"))
        .json(&json!({
            "buckets": [],
            "streams": {"include_defaults": true, "subscriptions": [
                {"stream": "project_responses", "parameters": {"project": p1}, "override_priority": 0},
                {"stream": "nope", "parameters": null, "override_priority": null},
                {"stream": "owned", "parameters": [1], "override_priority": null},
                {"stream": "owned", "parameters": null, "override_priority": 9}
            ]}
        }))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    use futures_util::StreamExt;
    let mut text = Vec::new();
    while !text.contains(&b'\n') {
        text.extend_from_slice(&body.next().await.expect("a line")?);
    }
    let end = text.iter().position(|b| *b == b'\n').expect("a line");
    let line: Json = serde_json::from_slice(&text[..end])?;
    let cp = &line["checkpoint"];
    let streams = cp["streams"].as_array().expect("streams");
    let named = |n: &str| {
        streams
            .iter()
            .find(|s| s["name"] == n)
            .unwrap_or_else(|| panic!("stream {n} in {streams:?}"))
    };
    assert_eq!(named("my_projects")["is_default"], true);
    assert_eq!(named("nope")["errors"][0]["subscription"], 1);
    let owned_errors: Vec<i64> = named("owned")["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["subscription"].as_i64().expect("index"))
        .collect();
    assert_eq!(owned_errors, [2, 3]);
    let buckets = cp["buckets"].as_array().expect("buckets");
    let p1_bucket = buckets
        .iter()
        .find(|b| {
            b["bucket"].as_str().is_some_and(|n| n.contains(p1))
                && b["bucket"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("project_responses"))
        })
        .expect("project 1's responses");
    assert_eq!(p1_bucket["subscriptions"], json!([{"sub": 0}]));
    assert_eq!(p1_bucket["priority"], 0, "the override priority");
    let defaults: Vec<&Json> = buckets
        .iter()
        .filter(|b| {
            b["bucket"]
                .as_str()
                .is_some_and(|n| n.starts_with("my_projects"))
        })
        .collect();
    assert!(!defaults.is_empty());
    for b in defaults {
        assert_eq!(b["subscriptions"], json!([{"default": 0}]));
        assert_eq!(b["priority"], 1, "the stream's priority");
    }
    drop(body);
    service.stop().await;
    Ok(())
}
