//! Sync Streams: each supported form routes rows and resolves subscriptions as the stream's SQL
//! means, through the same lookups as bucket definitions; errors name the stream, the query and
//! the part. (Checked against PostgreSQL itself in the whole-system test `tests/streams.rs`.)

use std::collections::BTreeSet;

use serde_json::{Value as Json, json};
use walsync_rules::{RequestContext, RowRef, RulesError, StreamRequest, Subscription, SyncRules};
use walsync_types::{BucketReason, StreamError, Value};

const RULES: &str = r#"
config:
  edition: 3
with:
  my_projects: SELECT project_id FROM project_members WHERE user_id = auth.user_id()
streams:
  projects:
    auto_subscribe: true
    priority: 1
    query: SELECT * FROM projects WHERE id IN my_projects
  own_notes:
    auto_subscribe: true
    query: SELECT id, body AS text FROM notes WHERE owner = auth.user_id()
  responses:
    query: |
      SELECT * FROM responses
      WHERE project_id = subscription.parameter('project_id')
        AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())
        AND NOT deleted
  by_join:
    query: |
      SELECT r.* FROM responses r JOIN project_members m ON r.project_id = m.project_id
      WHERE m.user_id = auth.user_id() AND m.role = 'owner'
  tagged:
    query: SELECT * FROM notes WHERE subscription.parameter('tag') = ANY(tags) OR owner = auth.parameter('team')
  admin_all:
    query: SELECT * FROM notes WHERE auth.parameter('role') = 'admin'
  by_phase:
    query: SELECT * FROM responses WHERE phase = subscription.parameter('phase') AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())
  by_deleted:
    query: SELECT * FROM responses WHERE deleted = subscription.parameter('deleted') AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id())
  comments_nested:
    query: SELECT * FROM comments WHERE issue_id IN (SELECT id FROM issues WHERE open AND project_id IN (SELECT project_id FROM project_members WHERE user_id = auth.user_id()))
  comments_joined:
    query: |
      SELECT c.* FROM comments c
        JOIN issues i ON c.issue_id = i.id
        JOIN project_members m ON i.project_id = m.project_id
      WHERE m.user_id = auth.user_id() AND m.role = 'owner'
  org_data:
    with:
      orgs: SELECT org_id FROM org_members WHERE user_id = auth.user_id()
    queries:
      - SELECT * FROM repos WHERE org_id IN orgs
      - SELECT * FROM settings WHERE org_id IN (SELECT org_id FROM orgs)
"#;

struct Row {
    table: &'static str,
    columns: Vec<String>,
    values: Vec<Value>,
}

fn row(table: &'static str, pairs: &[(&str, Value)]) -> Row {
    Row {
        table,
        columns: pairs.iter().map(|(c, _)| c.to_string()).collect(),
        values: pairs.iter().map(|(_, v)| v.clone()).collect(),
    }
}

impl Row {
    fn r(&self) -> RowRef<'_> {
        RowRef {
            schema: "public",
            table: self.table,
            columns: &self.columns,
            values: &self.values,
        }
    }
}

fn t(s: &str) -> Value {
    Value::Text(s.into())
}

fn data() -> Vec<Row> {
    let member = |id: i64, p: i64, u: &str, role: &str| {
        row(
            "project_members",
            &[
                ("id", Value::Int(id)),
                ("project_id", Value::Int(p)),
                ("user_id", t(u)),
                ("role", t(role)),
            ],
        )
    };
    let response = |id: &str, p: i64, deleted: bool| {
        row(
            "responses",
            &[
                ("id", t(id)),
                ("project_id", Value::Int(p)),
                ("deleted", Value::Bool(deleted)),
                ("phase", t(if deleted { "late" } else { "early" })),
            ],
        )
    };
    let note = |id: &str, owner: &str, tags: &[&str]| {
        row(
            "notes",
            &[
                ("id", t(id)),
                ("owner", t(owner)),
                ("body", t("héllo \"quoted\"")),
                ("tags", Value::Array(tags.iter().map(|s| t(s)).collect())),
            ],
        )
    };
    vec![
        row("projects", &[("id", Value::Int(1)), ("name", t("one"))]),
        row("projects", &[("id", Value::Int(2)), ("name", t("two"))]),
        member(10, 1, "u1", "owner"),
        member(11, 2, "u2", "viewer"),
        member(12, 2, "u1", "viewer"),
        response("0f8e-a", 1, false),
        response("0f8e-b", 1, true),
        response("0f8e-c", 2, false),
        note("n1", "u1", &["red", "blue"]),
        note("n2", "u2", &["blue"]),
        note("n3", "blue-team", &[]),
        row("org_members", &[("org_id", t("o1")), ("user_id", t("u1"))]),
        row("repos", &[("id", t("r1")), ("org_id", t("o1"))]),
        row("repos", &[("id", t("r2")), ("org_id", t("o2"))]),
        row("settings", &[("id", t("s1")), ("org_id", t("o1"))]),
        row(
            "issues",
            &[
                ("id", t("i1")),
                ("project_id", Value::Int(1)),
                ("open", Value::Bool(true)),
            ],
        ),
        row(
            "issues",
            &[
                ("id", t("i2")),
                ("project_id", Value::Int(2)),
                ("open", Value::Bool(true)),
            ],
        ),
        row(
            "issues",
            &[
                ("id", t("i3")),
                ("project_id", Value::Int(1)),
                ("open", Value::Bool(false)),
            ],
        ),
        row(
            "issues",
            &[
                ("id", t("i4")),
                ("project_id", Value::Int(9)),
                ("open", Value::Bool(true)),
            ],
        ),
        row("comments", &[("id", t("c1")), ("issue_id", t("i1"))]),
        row("comments", &[("id", t("c2")), ("issue_id", t("i2"))]),
        row("comments", &[("id", t("c3")), ("issue_id", t("i3"))]),
        row("comments", &[("id", t("c4")), ("issue_id", t("i4"))]),
    ]
}

/// The rows (table, id) a selection gives, resolving lookups from the parameter rows as the
/// store would.
fn rows_of(
    rules: &SyncRules,
    request: &RequestContext,
    wanted: &StreamRequest,
) -> Vec<BTreeSet<(String, String)>> {
    let rows = data();
    let entries: Vec<_> = rows
        .iter()
        .flat_map(|r| rules.evaluate_lookups(&r.r()))
        .collect();
    let selection = rules.select(request, wanted);
    selection
        .parts
        .iter()
        .map(|part| {
            let mut buckets: BTreeSet<String> = part.buckets.iter().cloned().collect();
            let found = |key: &walsync_types::LookupKey| {
                entries
                    .iter()
                    .filter(|e| &e.key == key)
                    .map(|e| e.parameters.clone())
                    .collect::<Vec<_>>()
            };
            let mut keys = part.lookups.clone();
            for chain in &part.chains {
                keys.extend(filled(chain, &found));
            }
            for key in &keys {
                let completion = part
                    .completions
                    .iter()
                    .find(|c| c.definition == key.definition && c.query == key.query);
                for parameters in found(key) {
                    let text = serde_json::to_string(&parameters).expect("json");
                    let text = match completion {
                        Some(c) => c.complete(&text).expect("completes"),
                        None => text,
                    };
                    buckets.insert(walsync_types::bucket_id_of_text(&key.definition, &text));
                }
            }
            rows.iter()
                .flat_map(|r| rules.evaluate_row(&r.r()))
                .filter(|o| buckets.contains(&o.bucket))
                .map(|o| (o.object_type, o.object_id))
                .collect()
        })
        .collect()
}

/// A chain's keys filled with what its source finds, as the store resolves them.
fn filled(
    chain: &walsync_rules::ChainedLookup,
    found: &dyn Fn(&walsync_types::LookupKey) -> Vec<Vec<Json>>,
) -> Vec<walsync_types::LookupKey> {
    let sources = match chain.source.as_ref() {
        walsync_rules::Lookup::Key(k) => vec![k.clone()],
        walsync_rules::Lookup::Chained(inner) => filled(inner, found),
    };
    sources
        .iter()
        .flat_map(found)
        .filter_map(|p| walsync_rules::canonical(&Value::from_json(p.first()?)))
        .map(|v| {
            let mut key = chain.key.clone();
            key.values[chain.hole] = v;
            key
        })
        .collect()
}

fn user(u: &str, claims: Json) -> RequestContext {
    RequestContext {
        user_id: u.into(),
        claims,
        ..Default::default()
    }
}

fn sub(stream: &str, parameters: Json) -> Subscription {
    Subscription {
        stream: stream.into(),
        parameters,
        override_priority: Json::Null,
    }
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn streams_route_rows_as_their_sql_means() {
    let rules = SyncRules::from_yaml(RULES).expect("rules compile");
    // `tagged` reads a subscription parameter with a token value in the other branch only.
    assert_eq!(rules.warnings().len(), 1, "{:?}", rules.warnings());
    assert!(rules.warnings()[0].contains("\"tagged\""));
    let u1 = user("u1", json!({"team": "blue-team", "role": "admin"}));

    // Defaults: the projects u1 is a member of (through a global CTE) and u1's own notes.
    let parts = rows_of(&rules, &u1, &StreamRequest::default());
    assert_eq!(
        parts.len(),
        3,
        "bucket definitions, then two default streams by name"
    );
    assert_eq!(parts[1], set(&[("notes", "n1")]));
    assert_eq!(parts[2], set(&[("projects", "1"), ("projects", "2")]));

    let wanted = StreamRequest {
        include_defaults: false,
        subscriptions: vec![
            sub("responses", json!({"project_id": 1})),
            sub("responses", json!({"project_id": 3})),
            sub("by_join", Json::Null),
            sub("tagged", json!({"tag": "blue"})),
            sub("admin_all", Json::Null),
            sub("org_data", Json::Null),
            sub("comments_nested", Json::Null),
            sub("comments_joined", Json::Null),
            sub("by_phase", json!({"phase": "early"})),
            sub("by_phase", json!({"phase": "late"})),
            sub("by_phase", json!({})),
            sub("by_deleted", json!({"deleted": true})),
        ],
    };
    let parts = rows_of(&rules, &u1, &wanted);
    assert_eq!(parts.len(), 13);
    assert_eq!(
        parts[12],
        set(&[("responses", "0f8e-b")]),
        "a boolean parameter"
    );
    // A subscription value on one column beside a membership subquery on another.
    assert_eq!(
        parts[9],
        set(&[("responses", "0f8e-a"), ("responses", "0f8e-c")])
    );
    assert_eq!(parts[10], set(&[("responses", "0f8e-b")]));
    assert!(parts[11].is_empty(), "no phase given: nothing");
    // Comments of open issues of u1's projects (1 and 2), through two nested subqueries.
    assert_eq!(parts[7], set(&[("comments", "c1"), ("comments", "c2")]));
    // Comments of issues of projects u1 owns (1), through two joins.
    assert_eq!(parts[8], set(&[("comments", "c1"), ("comments", "c3")]));
    // Project 1's responses that are not deleted; project 3 is not u1's.
    assert_eq!(parts[1], set(&[("responses", "0f8e-a")]));
    assert!(parts[2].is_empty());
    // Responses of projects where u1 is an owner.
    assert_eq!(
        parts[3],
        set(&[("responses", "0f8e-a"), ("responses", "0f8e-b")])
    );
    // Notes tagged blue, or owned by the token's team.
    assert_eq!(
        parts[4],
        set(&[("notes", "n1"), ("notes", "n2"), ("notes", "n3")])
    );
    // The token says admin: every note.
    assert_eq!(parts[5].len(), 3);
    // Both queries of one stream, through a stream-level CTE, short and long form.
    assert_eq!(parts[6], set(&[("repos", "r1"), ("settings", "s1")]));

    // Another user: no admin claim, a member of project 2 only.
    let u2 = user("u2", json!({}));
    let parts = rows_of(&rules, &u2, &wanted);
    assert!(parts[1].is_empty(), "u2 is not in project 1");
    assert!(parts[5].is_empty(), "not an admin");
    assert_eq!(parts[4], set(&[("notes", "n1"), ("notes", "n2")]));

    // A selected column renamed: the data carries the alias.
    let note = data()
        .into_iter()
        .find(|r| r.table == "notes")
        .expect("a note");
    let out = rules.evaluate_row(&note.r());
    let own = out
        .iter()
        .find(|o| o.bucket.starts_with("own_notes"))
        .expect("in own_notes");
    assert_eq!(own.data, r#"{"id":"n1","text":"héllo \"quoted\""}"#);
}

#[test]
fn subscriptions_carry_reasons_priorities_and_their_own_errors() {
    let rules = SyncRules::from_yaml(RULES).expect("rules compile");
    let u1 = user("u1", json!({}));
    let wanted = StreamRequest {
        include_defaults: true,
        subscriptions: vec![
            sub("nope", Json::Null),
            sub("responses", json!([1])),
            Subscription {
                override_priority: json!(7),
                ..sub("responses", json!({"project_id": 1}))
            },
            Subscription {
                override_priority: json!(0),
                ..sub("responses", json!({"project_id": 1}))
            },
            sub("projects", Json::Null),
        ],
    };
    let selection = rules.select(&u1, &wanted);
    let names: Vec<&str> = selection.streams.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["own_notes", "projects", "nope", "responses"]);
    assert!(selection.streams[1].is_default && !selection.streams[3].is_default);
    assert_eq!(
        selection.streams[2].errors,
        [StreamError {
            subscription: Some(0),
            message: "there is no stream named \"nope\"".into()
        }]
    );
    let errors: Vec<Option<u32>> = selection.streams[3]
        .errors
        .iter()
        .map(|e| e.subscription)
        .collect();
    assert_eq!(
        errors,
        [Some(1), Some(2)],
        "{:?}",
        selection.streams[3].errors
    );
    let reasons: Vec<(Option<BucketReason>, Option<u8>)> = selection
        .parts
        .iter()
        .map(|p| (p.reason, p.priority))
        .collect();
    assert_eq!(
        reasons,
        [
            (None, None),
            (Some(BucketReason::Default { default: 0 }), None),
            (Some(BucketReason::Default { default: 1 }), None),
            (Some(BucketReason::Subscription { sub: 3 }), Some(0)),
            (Some(BucketReason::Subscription { sub: 4 }), None),
        ]
    );
    assert_eq!(
        rules
            .streams()
            .iter()
            .find(|s| s.name == "projects")
            .map(|s| s.priority),
        Some(1)
    );
}

fn error(yaml: &str) -> String {
    match SyncRules::from_yaml(yaml) {
        Ok(_) => panic!("accepted: {yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_streams_are_refused_naming_the_stream_the_query_and_the_part() {
    let e = error(
        "streams:\n  s:\n    query: SELECT * FROM a WHERE x IN (SELECT y FROM b WHERE z IN (SELECT w FROM c WHERE u = auth.user_id()) AND q IN (SELECT r FROM d WHERE u = auth.user_id()))\n",
    );
    assert!(e.starts_with("stream \"s\", query 1 `SELECT"), "{e}");
    assert!(e.contains("one subquery inside a subquery"), "{e}");
    let e = error(
        "streams:\n  s:\n    with:\n      loop: SELECT x FROM t WHERE y IN loop\n    query: SELECT * FROM a WHERE x IN loop\n",
    );
    assert!(e.contains("nest deeper"), "{e}");

    let e = error(
        "streams:\n  s:\n    queries:\n      - SELECT * FROM a\n      - SELECT * FROM b WHERE b.x = auth.user_id() + 1\n",
    );
    assert!(e.contains("query 2"), "{e}");

    let e = error(
        "bucket_definitions:\n  s:\n    data: [SELECT * FROM a]\nstreams:\n  s:\n    query: SELECT * FROM a\n",
    );
    assert!(e.contains("has the name of a bucket definition"), "{e}");

    let e = error(
        "streams:\n  s:\n    query: SELECT * FROM a JOIN b ON a.x = b.y JOIN c ON a.z = c.w WHERE b.u = auth.user_id()\n",
    );
    assert!(e.contains("joins must form a chain"), "{e}");

    let e = error(
        "streams:\n  s:\n    query: SELECT a.*, b.secret FROM a JOIN b ON a.x = b.y WHERE b.u = auth.user_id()\n",
    );
    assert!(e.contains("b.secret") && e.contains("joined table"), "{e}");

    let e = error(
        "streams:\n  s:\n    with:\n      two: SELECT a, b FROM t WHERE u = auth.user_id()\n    query: SELECT * FROM x WHERE y IN two\n",
    );
    assert!(e.contains("several columns"), "{e}");

    let e = error("streams:\n  s:\n    priority: 9\n    query: SELECT * FROM a\n");
    assert!(e.contains("priority 9"), "{e}");

    let e =
        error("streams:\n  s:\n    query: SELECT * FROM a WHERE x = subscription.parameter(1)\n");
    assert!(e.contains("string literal"), "{e}");

    assert!(matches!(
        SyncRules::from_yaml("config:\n  edition: 3\n"),
        Err(RulesError::Yaml(_))
    ));
}

#[test]
fn a_global_stream_is_one_bucket_and_changes_of_the_stream_change_the_fingerprint() {
    let a = SyncRules::from_yaml(
        "streams:\n  all:\n    auto_subscribe: true\n    query: SELECT * FROM categories\n",
    )
    .expect("compiles");
    let (buckets, lookups) = a.resolve_request(&user("anyone", json!({})));
    assert_eq!(buckets, ["all[]"]);
    assert!(lookups.is_empty());
    let b = SyncRules::from_yaml(
        "streams:\n  all:\n    auto_subscribe: false\n    query: SELECT * FROM categories\n",
    )
    .expect("compiles");
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert!(b.resolve_request(&user("anyone", json!({}))).0.is_empty());
}

/// PowerSync's role-based example: the token's organisation, and published articles, one's own,
/// or every article for an admin (an `OR` of a row condition, a request value and a condition on
/// the token alone, inside an `AND`).
#[test]
fn an_or_inside_an_and_splits_into_branches_that_each_hold() {
    let rules = SyncRules::from_yaml(
        "streams:\n  articles:\n    auto_subscribe: true\n    query: SELECT * FROM articles WHERE org_id = auth.parameter('org_id') AND (status = 'published' OR author_id = auth.user_id() OR auth.parameter('role') = 'admin')\n",
    )
    .expect("compiles");
    let article = |id: &str, org: &str, status: &str, author: &str| {
        row(
            "articles",
            &[
                ("id", t(id)),
                ("org_id", t(org)),
                ("status", t(status)),
                ("author_id", t(author)),
            ],
        )
    };
    let rows = [
        article("a1", "o1", "published", "u9"),
        article("a2", "o1", "draft", "u1"),
        article("a3", "o1", "draft", "u9"),
        article("a4", "o2", "published", "u9"),
    ];
    let sees = |u: &str, claims: Json| -> BTreeSet<String> {
        let (buckets, _) = rules.resolve_request(&user(u, claims));
        rows.iter()
            .flat_map(|r| rules.evaluate_row(&r.r()))
            .filter(|o| buckets.contains(&o.bucket))
            .map(|o| o.object_id)
            .collect()
    };
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(sees("u1", json!({"org_id": "o1"})), ids(&["a1", "a2"]));
    assert_eq!(
        sees("u1", json!({"org_id": "o1", "role": "admin"})),
        ids(&["a1", "a2", "a3"])
    );
    assert_eq!(sees("u9", json!({"org_id": "o2"})), ids(&["a4"]));
    assert!(sees("u1", json!({})).is_empty(), "no organisation, nothing");
}
