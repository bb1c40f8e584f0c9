//! Feeds arbitrary text to the sync rules loader (YAML, then each query through sqlparser and
//! the compiler), as `walsync rules check` and `walsync serve` read a rules file. None may
//! panic; rules that load resolve a request (every stream subscribed) and evaluate a row
//! without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walsync_rules::{RequestContext, RowRef, StreamRequest, Subscription, SyncRules};
use walsync_types::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rules) = SyncRules::from_yaml(text) else {
        return;
    };
    let _ = rules.warnings();
    let request = RequestContext {
        user_id: "u1".into(),
        ..Default::default()
    };
    let _ = rules.resolve_request(&request);
    // Every stream subscribed, with parameters of several shapes.
    let subscriptions = rules
        .streams()
        .iter()
        .flat_map(|s| {
            [
                serde_json::Value::Null,
                serde_json::json!({"project": 1, "id": "x", "tag": [1, null]}),
                serde_json::json!([1]),
            ]
            .map(|parameters| Subscription {
                stream: s.name.clone(),
                parameters,
                override_priority: serde_json::json!(1),
            })
        })
        .collect();
    let _ = rules.select(
        &request,
        &StreamRequest {
            include_defaults: true,
            subscriptions,
        },
    );
    for table in rules.qualified_tables() {
        let (schema, name) = table.split_once('.').unwrap_or(("public", &table));
        let columns = ["id".to_owned(), "project_id".to_owned(), "user_id".to_owned()];
        let values = [
            Value::Text("1".into()),
            Value::Int(7),
            Value::Text("u1".into()),
        ];
        let row = RowRef {
            schema,
            table: name,
            columns: &columns,
            values: &values,
        };
        let _ = rules.evaluate_row(&row);
    }
});
