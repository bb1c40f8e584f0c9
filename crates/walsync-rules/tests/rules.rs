//! Sync rules: the seed app's rules, the supported subset, clear rejections, and property tests
//! of routing.

use proptest::prelude::*;
use serde_json::json;
use walsync_rules::{RequestContext, RowRef, RulesError, SyncRules};
use walsync_types::{LookupKey, Value};

const SEED: &str = include_str!("../../../examples/seed/sync_rules.yaml");

fn row<'a>(table: &'a str, columns: &'a [String], values: &'a [Value]) -> RowRef<'a> {
    RowRef {
        schema: "public",
        table,
        columns,
        values,
    }
}

fn cols(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn request(user: &str) -> RequestContext {
    RequestContext {
        user_id: user.into(),
        claims: json!({"sub": user, "role": "admin", "parameters": {"org": "acme"}}),
        parameters: json!({"team": "blue"}),
        ..Default::default()
    }
}

#[test]
fn seed_rules_route_rows_and_requests() {
    let rules = SyncRules::from_yaml(SEED).unwrap();
    assert!(rules.warnings().is_empty());
    assert!(rules.reads_table("public", "assessment_responses"));

    let c = cols(&["id", "project_id", "phase", "done"]);
    let v = vec![
        Value::Int(7),
        Value::Int(42),
        Value::Text("discovery".into()),
        Value::Bool(true),
    ];
    let out = rules.evaluate_row(&row("assessments", &c, &v));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].bucket, "user_projects[42]");
    assert_eq!(
        (out[0].object_type.as_str(), out[0].object_id.as_str()),
        ("assessments", "7")
    );
    assert_eq!(
        out[0].data,
        r#"{"id":7,"project_id":42,"phase":"discovery","done":1}"#
    );

    // A membership row is both data (project_members in the project bucket) and a lookup entry.
    let c = cols(&["id", "project_id", "user_id", "role"]);
    let v = vec![
        Value::Int(1),
        Value::Int(42),
        Value::Text("u1".into()),
        Value::Text("editor".into()),
    ];
    let m = row("project_members", &c, &v);
    assert_eq!(rules.evaluate_row(&m)[0].bucket, "user_projects[42]");
    let lookups = rules.evaluate_lookups(&m);
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        lookups[0].key,
        LookupKey {
            definition: "user_projects".into(),
            query: 0,
            values: vec!["u1".into()]
        }
    );
    assert_eq!(lookups[0].parameters, vec![json!(42)]);

    let (buckets, keys) = rules.resolve_request(&request("u1"));
    assert_eq!(buckets, vec![r#"me["u1"]"#.to_owned()]);
    assert_eq!(
        keys,
        vec![lookups[0].key.clone()],
        "the request's lookup key is the row's"
    );

    // A row with a null bucket key is in no bucket; a row of another schema neither.
    let v = vec![Value::Int(8), Value::Null, Value::Null, Value::Null];
    assert!(
        rules
            .evaluate_row(&row(
                "assessments",
                &cols(&["id", "project_id", "phase", "done"]),
                &v
            ))
            .is_empty()
    );
    let c = cols(&["id", "project_id"]);
    let v = vec![Value::Int(1), Value::Int(1)];
    assert!(
        rules
            .evaluate_row(&RowRef {
                schema: "other",
                table: "assessments",
                columns: &c,
                values: &v
            })
            .is_empty()
    );
}

#[test]
fn supported_subset() {
    let rules = SyncRules::from_yaml(
        r#"
bucket_definitions:
  by_org:
    parameters: SELECT request.jwt() ->> 'org' AS org WHERE request.jwt() ->> 'role' = 'admin'
    data:
      - SELECT id, title AS name, meta ->> 'color' AS color, count::text AS n FROM public.docs AS documents WHERE org = bucket.org AND (archived IS NULL OR archived = false)
  shared:
    parameters:
      - SELECT list_id FROM shares WHERE user_id = token_parameters.user_id AND kind IN ('read', 'write')
      - SELECT list_id FROM lists WHERE owner = request.user_id()
    priority: 1
    data:
      - SELECT * FROM items WHERE list_id = bucket.list_id
      - SELECT * FROM tagged WHERE bucket.list_id = ANY(list_ids)
  everyone:
    data:
      - SELECT * FROM announcements
"#,
    )
    .unwrap();
    let c = cols(&["id", "title", "meta", "count", "org", "archived"]);
    let v = vec![
        Value::Text("d1".into()),
        Value::Text("Plan".into()),
        Value::Json(r#"{"color": "red"}"#.into()),
        Value::Int(3),
        Value::Text("acme".into()),
        Value::Null,
    ];
    let out = SyncRules::evaluate_row(&rules, &row("docs", &c, &v));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].bucket, r#"by_org["acme"]"#);
    assert_eq!(out[0].object_type, "documents");
    assert_eq!(
        out[0].data,
        r#"{"id":"d1","name":"Plan","color":"red","n":"3"}"#
    );
    let archived = vec![
        v[0].clone(),
        v[1].clone(),
        v[2].clone(),
        v[3].clone(),
        v[4].clone(),
        Value::Bool(true),
    ];
    assert!(rules.evaluate_row(&row("docs", &c, &archived)).is_empty());

    let mut req = request("u1");
    req.claims["org"] = json!("acme");
    let (buckets, keys) = rules.resolve_request(&req);
    assert_eq!(
        buckets,
        vec![r#"by_org["acme"]"#.to_owned(), "everyone[]".to_owned()]
    );
    assert_eq!(
        keys,
        vec![
            LookupKey {
                definition: "shared".into(),
                query: 0,
                values: vec!["u1".into()]
            },
            LookupKey {
                definition: "shared".into(),
                query: 1,
                values: vec!["u1".into()]
            },
        ]
    );
    req.claims["role"] = json!("viewer");
    assert_eq!(
        rules.resolve_request(&req).0,
        vec!["everyone[]".to_owned()],
        "the static filter applies"
    );

    // `IN` over a row's array puts the row in one bucket per element.
    let c = cols(&["id", "list_ids"]);
    let v = vec![
        Value::Int(1),
        Value::Array(vec![Value::Int(5), Value::Int(6)]),
    ];
    let buckets: Vec<String> = rules
        .evaluate_row(&row("tagged", &c, &v))
        .into_iter()
        .map(|o| o.bucket)
        .collect();
    assert_eq!(buckets, ["shared[5]", "shared[6]"]);
    // Only share rows of an accepted kind are lookup entries.
    let c = cols(&["list_id", "user_id", "kind"]);
    let ok = vec![
        Value::Int(5),
        Value::Text("u1".into()),
        Value::Text("read".into()),
    ];
    let no = vec![
        Value::Int(5),
        Value::Text("u1".into()),
        Value::Text("none".into()),
    ];
    assert_eq!(rules.evaluate_lookups(&row("shares", &c, &ok)).len(), 1);
    assert!(rules.evaluate_lookups(&row("shares", &c, &no)).is_empty());
    assert_eq!(
        rules.definition_of("shared[5]").map(|d| d.priority),
        Some(1)
    );
}

fn rejected(yaml_data: &str) -> String {
    let yaml = format!(
        "bucket_definitions:\n  b:\n    parameters: SELECT project_id FROM members WHERE user_id = request.user_id()\n    data:\n      - {yaml_data}\n"
    );
    match SyncRules::from_yaml(&yaml) {
        Err(e @ RulesError::Query { .. }) => e.to_string(),
        other => panic!("expected a query error for {yaml_data}, got {other:?}"),
    }
}

#[test]
fn unsupported_and_wrong_queries_are_rejected_with_the_offending_part() {
    let e = rejected("SELECT * FROM items");
    assert!(
        e.contains("data query 1")
            && e.contains("does not use bucket parameter `bucket.project_id`"),
        "{e}"
    );
    let e = rejected("SELECT * FROM items WHERE project_id = bucket.project_id OR public = true");
    assert!(e.contains("in one of its OR branches"), "{e}");
    let e = rejected("SELECT * FROM items WHERE project_id = bucket.nope");
    assert!(e.contains("`bucket.nope` is not a parameter"), "{e}");
    let e = rejected("SELECT name FROM items WHERE project_id = bucket.project_id");
    assert!(e.contains("must return an `id` column"), "{e}");
    let e = rejected("SELECT * FROM items JOIN other ON true WHERE project_id = bucket.project_id");
    assert!(e.contains("joins"), "{e}");
    let e = rejected("SELECT upper(name) AS id FROM items WHERE project_id = bucket.project_id");
    assert!(e.contains("unsupported function `upper(name)`"), "{e}");
    let e = rejected("SELECT * FROM items WHERE project_id = request.user_id()");
    assert!(
        e.contains("data queries may use only bucket parameters"),
        "{e}"
    );
    let e = rejected("SELECT * FROM items WHERE project_id > bucket.project_id");
    assert!(
        e.contains("unsupported condition `project_id > bucket.project_id`"),
        "{e}"
    );
    let e = rejected("SELECT * FROM");
    assert!(e.contains("cannot parse"), "{e}");

    let e = SyncRules::from_yaml(
        "bucket_definitions:\n  b:\n    parameters: SELECT id FROM members\n    data: []\n",
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("parameter query 1")
            && e.to_string().contains("must match rows to the request"),
        "{e}"
    );
    let e = SyncRules::from_yaml("bucket_definitions:\n  b:\n    data: []\n    extra: 1\n")
        .unwrap_err();
    assert!(matches!(e, RulesError::Yaml(_)), "{e}");
    let e = SyncRules::from_yaml(
        "bucket_definitions:\n  b:\n    parameters:\n      - SELECT a FROM m WHERE u = request.user_id()\n      - SELECT b FROM n WHERE u = request.user_id()\n    data: []\n",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("returns [\"b\"], but the first parameter query returns [\"a\"]"),
        "{e}"
    );
}

#[test]
fn client_parameters_are_flagged_as_untrusted() {
    let yaml = "bucket_definitions:\n  b:\n    parameters: SELECT request.parameters() ->> 'team' AS team\n    data:\n      - SELECT * FROM items WHERE team = bucket.team\n";
    let rules = SyncRules::from_yaml(yaml).unwrap();
    assert!(
        rules.warnings()[0].contains("client controls"),
        "{:?}",
        rules.warnings()
    );
    assert_eq!(
        rules.resolve_request(&request("u")).0,
        vec![r#"b["blue"]"#.to_owned()]
    );
    let accepted = yaml.replace(
        "    data:",
        "    accept_potentially_dangerous_queries: true\n    data:",
    );
    assert!(
        SyncRules::from_yaml(&accepted)
            .unwrap()
            .warnings()
            .is_empty()
    );
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (0..6i64).prop_map(Value::Int),
        "[a-c]{1,2}".prop_map(Value::Text),
    ]
}

/// Every kind of value, with text that needs escaping.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (-1e12f64..1e12).prop_map(Value::Float),
        "\\PC{0,6}|[\"\\\\\n\t\u{1}é😀]{1,4}".prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..4).prop_map(Value::Bytes),
        Just(Value::Json(r#"{"a": [1, "x\"y"], "b": null}"#.into())),
        Just(Value::Json(r#""plain""#.into())),
        // Beyond f64, duplicate keys (json), a lone surrogate escape: kept as printed.
        Just(Value::Json(
            r#"{"big": 12345678901234567890123, "b": 1, "b": 2, "s": "\ud83d"}"#.into()
        )),
    ];
    leaf.prop_recursive(1, 4, 3, |inner| {
        prop::collection::vec(inner, 0..3).prop_map(Value::Array)
    })
}

/// A value as a row's JSON carries it: SQLite's types (booleans 1/0, JSON and arrays as text).
fn output_form(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => json!(i64::from(*b)),
        Value::Json(text) => json!(text),
        Value::Array(_) => {
            let mut text = String::new();
            v.write_json(&mut text);
            json!(text)
        }
        other => other.to_json(),
    }
}

proptest! {
    /// The row's data is the JSON object of its columns in order, and its bucket id the JSON
    /// array of its parameters, byte for byte as serde_json writes them (checksums cover them).
    #[test]
    fn data_text_and_bucket_ids_are_exact_json(project in any_value(), a in any_value(), b in any_value()) {
        let rules = SyncRules::from_yaml(SEED).unwrap();
        let c = cols(&["id", "project_id", "a", "b"]);
        let v = vec![Value::Int(5), project.clone(), a.clone(), b.clone()];
        let out = rules.evaluate_row(&row("assessments", &c, &v));
        let param = match &project {
            Value::Json(text) if text.starts_with('"') => serde_json::from_str(text).unwrap(),
            other => output_form(other),
        };
        if matches!(project, Value::Null) {
            prop_assert!(out.is_empty());
        } else if let Some(o) = out.first() {
            let expected = format!(
                "{{\"id\":5,\"project_id\":{},\"a\":{},\"b\":{}}}",
                output_form(&project), output_form(&a), output_form(&b)
            );
            prop_assert_eq!(&o.data, &expected);
            prop_assert_eq!(&o.bucket, &walsync_types::bucket_id("user_projects", &[param]));
        }
    }

    /// A row is in exactly the buckets whose parameter its key column names, with its data.
    #[test]
    fn routing_follows_the_key_column(id in 1..1000i64, project in value(), name in value()) {
        let rules = SyncRules::from_yaml(SEED).unwrap();
        let c = cols(&["id", "project_id", "name"]);
        let v = vec![Value::Int(id), project.clone(), name];
        let out = rules.evaluate_row(&row("assessments", &c, &v));
        match &project {
            Value::Null => prop_assert!(out.is_empty()),
            p => {
                prop_assert_eq!(out.len(), 1);
                prop_assert_eq!(&out[0].bucket, &format!("user_projects[{}]", p.to_json()));
                prop_assert_eq!(&out[0].object_id, &id.to_string());
                let data: serde_json::Value = serde_json::from_str(&out[0].data).unwrap();
                prop_assert_eq!(&data["project_id"], &p.to_json());
            }
        }
    }

    /// A membership row's lookup entry is found by exactly the request of its user.
    #[test]
    fn lookups_meet_requests(user in "[a-z0-9]{1,8}", other in "[a-z0-9]{1,8}", project in 1..100i64) {
        let rules = SyncRules::from_yaml(SEED).unwrap();
        let c = cols(&["id", "project_id", "user_id", "role"]);
        let v = vec![Value::Int(1), Value::Int(project), Value::Text(user.clone()), Value::Text("viewer".into())];
        let entry = rules.evaluate_lookups(&row("project_members", &c, &v)).remove(0);
        let (_, keys) = rules.resolve_request(&request(&user));
        prop_assert!(keys.contains(&entry.key));
        let (_, keys) = rules.resolve_request(&request(&other));
        prop_assert_eq!(keys.contains(&entry.key), user == other);
    }

    /// Integer ids from a JWT (text) match integer columns.
    #[test]
    fn text_and_integer_keys_meet(user in 1..10_000i64) {
        let rules = SyncRules::from_yaml(SEED).unwrap();
        let c = cols(&["id", "project_id", "user_id", "role"]);
        let v = vec![Value::Int(1), Value::Int(3), Value::Int(user), Value::Text("viewer".into())];
        let entry = rules.evaluate_lookups(&row("project_members", &c, &v)).remove(0);
        prop_assert!(rules.resolve_request(&request(&user.to_string())).1.contains(&entry.key));
    }
}

#[test]
fn the_fingerprint_follows_meaning_not_layout() {
    let rules = SyncRules::from_yaml(SEED).unwrap();
    let commented = SyncRules::from_yaml(&format!("# note\n{SEED}\n\n# more\n")).unwrap();
    assert_eq!(rules.fingerprint(), commented.fingerprint());
    let flow = SyncRules::from_yaml(
        "bucket_definitions: {me: {parameters: 'SELECT request.user_id() AS user_id', data: ['SELECT * FROM stakeholders WHERE user_id = bucket.user_id']}}",
    )
    .unwrap();
    let block = SyncRules::from_yaml(
        "bucket_definitions:\n  me:\n    data:\n      - SELECT * FROM stakeholders WHERE user_id = bucket.user_id\n    parameters: SELECT request.user_id() AS user_id\n",
    )
    .unwrap();
    assert_eq!(
        flow.fingerprint(),
        block.fingerprint(),
        "flow and block style, keys reordered"
    );
    let tightened = SyncRules::from_yaml(&SEED.replace(
        "WHERE project_id = bucket.project_id",
        "WHERE project_id = bucket.project_id AND id IS NOT NULL",
    ))
    .unwrap();
    assert_ne!(rules.fingerprint(), tightened.fingerprint());
}

fn one_definition(yaml: &str) -> SyncRules {
    SyncRules::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn buckets_of(rules: &SyncRules, table: &str, columns: &[&str], values: &[Value]) -> Vec<String> {
    let c = cols(columns);
    rules
        .evaluate_row(&row(table, &c, values))
        .into_iter()
        .map(|o| o.bucket)
        .collect()
}

/// PowerSync's SQL semantics, as PostgreSQL and SQLite give them: a boolean is the integer 1 or
/// 0, `IN` and `NOT IN` with a null are never true for a value they do not match, and unquoted
/// identifiers fold to lower case while quoted ones keep theirs.
#[test]
fn booleans_nulls_and_identifiers_follow_sql() {
    let rules = one_definition(
        "bucket_definitions:\n  open:\n    data:\n      - SELECT * FROM Items WHERE Archived = 0\n      - SELECT * FROM tasks WHERE done = 1 AND 1 = done\n",
    );
    let open = |table: &str, column: &str, v: Value| {
        buckets_of(&rules, table, &["id", column], &[Value::Int(1), v])
    };
    assert_eq!(open("items", "archived", Value::Bool(false)), ["open[]"]);
    assert!(open("items", "archived", Value::Bool(true)).is_empty());
    assert!(open("items", "archived", Value::Null).is_empty());
    assert!(
        open("Items", "archived", Value::Bool(false)).is_empty(),
        "unquoted Items is items"
    );
    assert_eq!(open("tasks", "done", Value::Bool(true)), ["open[]"]);

    let rules = one_definition(
        "bucket_definitions:\n  b:\n    data:\n      - SELECT * FROM \"Items\" WHERE \"Status\" NOT IN ('a', NULL)\n      - SELECT * FROM items WHERE status IN ('a', NULL)\n      - SELECT * FROM lists WHERE status NOT IN ('a', 'b')\n",
    );
    let b = |table: &str, column: &str, v: &str| {
        buckets_of(
            &rules,
            table,
            &["id", column],
            &[Value::Int(1), Value::Text(v.into())],
        )
    };
    // `'c' NOT IN ('a', NULL)` is null, not true; `'a' NOT IN (…)` is false.
    assert!(b("Items", "Status", "c").is_empty());
    assert!(b("Items", "Status", "a").is_empty());
    assert!(
        b("Items", "status", "c").is_empty(),
        "quoted \"Status\" keeps its case"
    );
    assert_eq!(b("items", "status", "a"), ["b[]"]);
    assert!(
        b("items", "status", "c").is_empty(),
        "`'c' IN ('a', NULL)` is null"
    );
    assert_eq!(b("lists", "status", "c"), ["b[]"]);
    assert!(b("lists", "status", "a").is_empty());
    assert!(
        buckets_of(
            &rules,
            "lists",
            &["id", "status"],
            &[Value::Int(1), Value::Null]
        )
        .is_empty(),
        "`NULL NOT IN (…)` is null"
    );

    // Output names fold too, unless quoted: the client's schema names what the rules produce.
    let rules = one_definition(
        "bucket_definitions:\n  b:\n    data:\n      - SELECT ID, Title AS Heading, body AS \"Body\" FROM Notes AS TODOs\n",
    );
    let c = cols(&["id", "title", "body"]);
    let v = [
        Value::Int(7),
        Value::Text("t".into()),
        Value::Text("x".into()),
    ];
    let out = rules.evaluate_row(&row("notes", &c, &v));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].object_type, "todos");
    assert_eq!(out[0].data, r#"{"id":7,"heading":"t","Body":"x"}"#);
}

/// A bucket parameter from the token (text) and one bound from an integer column name one
/// bucket: values bound from rows take the type the parameter query gives.
#[test]
fn one_value_of_different_types_makes_one_bucket() {
    let rules = one_definition(
        "bucket_definitions:\n  by_user:\n    parameters: SELECT request.user_id() AS user_id\n    data:\n      - SELECT * FROM notes WHERE owner = bucket.user_id\n  by_org:\n    parameters: SELECT CAST(request.jwt() ->> 'org' AS integer) AS org\n    data:\n      - SELECT * FROM docs WHERE org = bucket.org\n",
    );
    let placed = buckets_of(
        &rules,
        "notes",
        &["id", "owner"],
        &[Value::Int(1), Value::Int(42)],
    );
    assert_eq!(placed, [r#"by_user["42"]"#]);
    let placed = buckets_of(
        &rules,
        "docs",
        &["id", "org"],
        &[Value::Int(1), Value::Text("7".into())],
    );
    assert_eq!(placed, ["by_org[7]"]);
    let request = RequestContext {
        user_id: "42".into(),
        claims: json!({"sub": "42", "org": "7"}),
        parameters: json!({}),
        ..Default::default()
    };
    let (buckets, _) = rules.resolve_request(&request);
    assert_eq!(buckets, ["by_org[7]", r#"by_user["42"]"#]);

    // Two parameter queries that type one parameter differently are refused, with the cast.
    let e = SyncRules::from_yaml(
        "bucket_definitions:\n  b:\n    parameters:\n      - SELECT request.user_id() AS u\n      - SELECT org::integer AS u FROM members WHERE user_id = request.user_id()\n    data:\n      - SELECT * FROM notes WHERE owner = bucket.u\n",
    )
    .expect_err("conflicting types");
    let text = e.to_string();
    assert!(
        text.contains("\"b\"")
            && text.contains("parameter query 2")
            && text.contains("`u` is integer here but text")
            && text.contains("CAST(... AS text)"),
        "{text}"
    );
}
