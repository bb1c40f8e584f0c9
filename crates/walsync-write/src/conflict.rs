//! Conflicts: a field the client changed that the server changed too since the values the
//! client edited from. Decided field by field ([`resolve`]) by the table's [`ConflictRule`].
//!
//! The client's `old` values are the ones it received from the sync stream, that is
//! PostgreSQL's text output of each column; the server's current row is read the same way
//! (each column cast to text), so a value compares equal to itself whatever its type.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::config::{ConflictRule, Strategy};

/// A value as text, as the sync stream sends it (booleans as 1/0, JSON as its canonical text).
pub(crate) fn text_form(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.into()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Whether a client value and the server's text are the same value.
fn same(client: &Value, server: Option<&str>) -> bool {
    let client = text_form(client);
    match (client.as_deref(), server) {
        (None, None) => true,
        (Some(c), Some(s)) => {
            c == s
                // JSON compared as JSON (key order and spacing differ between the text a
                // client keeps and PostgreSQL's canonical jsonb text).
                || matches!(
                    (serde_json::from_str::<Value>(c), serde_json::from_str::<Value>(s)),
                    (Ok(a), Ok(b)) if a == b && (a.is_object() || a.is_array())
                )
        }
        _ => false,
    }
}

/// A field both sides changed, kept for a person to decide.
#[derive(Debug, Clone)]
pub(crate) struct Manual {
    pub column: String,
    /// What the client edited from (null when it sent only a `_version`).
    pub base: Option<String>,
    pub client: Option<String>,
    pub server: Option<String>,
}

/// How an op's fields are written.
#[derive(Debug, Default)]
pub(crate) struct Resolution {
    /// The fields to write.
    pub write: Map<String, Value>,
    /// Fields both sides changed whose later edit wins: written only if the client's edit is
    /// the later one (decided against the row's `_last_modified_at` in the transaction).
    pub later_wins: Map<String, Value>,
    pub manual: Vec<Manual>,
    /// Each field both sides changed, but those whose later edit wins: `client`, `server` or
    /// `manual`.
    pub decided: Vec<(String, &'static str)>,
}

/// Decides each field of `data` against the server's row (`server`, column → text) given what
/// the client edited from (`old` values, or its `_version`).
pub(crate) fn resolve(
    rule: &ConflictRule,
    data: &Map<String, Value>,
    old: Option<&Map<String, Value>>,
    client_version: Option<&Value>,
    server: &BTreeMap<String, Option<String>>,
) -> Resolution {
    let version_moved = client_version.is_some_and(|v| !same(v, server_value(server, "_version")));
    let mut out = Resolution::default();
    for (column, value) in data {
        let base = old.and_then(|o| o.get(column));
        let client_changed = base.is_none_or(|b| !same(b, text_form(value).as_deref()));
        let now = server_value(server, column);
        let server_changed = match base {
            Some(b) => !same(b, now),
            None => version_moved,
        };
        let own = rule.columns.get(column).copied();
        if !client_changed && rule.default == Strategy::MergeFields && own.is_none() {
            // A PUT carries every field; one the client did not touch is not written over
            // what the server has.
            continue;
        }
        // The client's value equal to the server's is no conflict, whatever happened between.
        if !(client_changed && server_changed) || same(value, now) {
            out.write.insert(column.clone(), value.clone());
            continue;
        }
        let strategy = match own.unwrap_or(rule.default) {
            Strategy::MergeFields => Strategy::LastWriteWins,
            s => s,
        };
        match strategy {
            Strategy::ClientWins => {
                out.write.insert(column.clone(), value.clone());
                out.decided.push((column.clone(), "client"));
            }
            Strategy::ServerWins => out.decided.push((column.clone(), "server")),
            Strategy::LastWriteWins | Strategy::MergeFields => {
                out.later_wins.insert(column.clone(), value.clone());
            }
            Strategy::Manual => {
                out.manual.push(Manual {
                    column: column.clone(),
                    base: base.and_then(text_form),
                    client: text_form(value),
                    server: now.map(str::to_owned),
                });
                out.decided.push((column.clone(), "manual"));
            }
        }
    }
    out
}

fn server_value<'a>(server: &'a BTreeMap<String, Option<String>>, column: &str) -> Option<&'a str> {
    server.get(column).and_then(|v| v.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(default: Strategy, columns: &[(&str, Strategy)]) -> ConflictRule {
        ConflictRule {
            default,
            columns: columns.iter().map(|(c, s)| ((*c).to_owned(), *s)).collect(),
            scope: None,
        }
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn server(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(c, v)| ((*c).to_owned(), v.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn each_strategy_decides_a_field_changed_on_both_sides() {
        // The client edited a from "x" to "mine"; the server has "theirs" now. b: only the
        // client changed it. c: only the server changed it (the client's PUT carries the old
        // value).
        let data = map(json!({"a": "mine", "b": "new b", "c": "c0"}));
        let old = map(json!({"a": "x", "b": "b0", "c": "c0"}));
        let now = server(&[("a", Some("theirs")), ("b", Some("b0")), ("c", Some("c1"))]);
        let with = |r: ConflictRule| resolve(&r, &data, Some(&old), None, &now);

        let r = with(rule(Strategy::ClientWins, &[]));
        assert_eq!(r.write, data);
        let r = with(rule(Strategy::ServerWins, &[]));
        assert_eq!(r.write, map(json!({"b": "new b", "c": "c0"})));
        let r = with(rule(Strategy::LastWriteWins, &[]));
        assert_eq!(r.later_wins, map(json!({"a": "mine"})));
        let r = with(rule(Strategy::Manual, &[]));
        assert_eq!(r.write, map(json!({"b": "new b", "c": "c0"})));
        assert_eq!(r.manual.len(), 1);
        assert_eq!(r.manual[0].server.as_deref(), Some("theirs"));
        assert_eq!(r.manual[0].base.as_deref(), Some("x"));
        // merge_fields: c (untouched by the client) is not written back over the server's c1.
        let r = with(rule(Strategy::MergeFields, &[("a", Strategy::Manual)]));
        assert_eq!(r.write, map(json!({"b": "new b"})));
        assert_eq!(r.manual.len(), 1);
    }

    #[test]
    fn a_version_stands_for_old_values_and_equal_values_are_no_conflict() {
        let data = map(json!({"a": "mine", "flag": 1, "doc": "{\"k\": [1, 2]}"}));
        let now = server(&[
            ("a", Some("theirs")),
            ("flag", Some("1")),
            ("doc", Some("{\"k\":[1,2]}")),
            ("_version", Some("3")),
        ]);
        let r = resolve(
            &rule(Strategy::ServerWins, &[]),
            &data,
            None,
            Some(&json!(2)),
            &now,
        );
        assert_eq!(r.write, map(json!({"flag": 1, "doc": "{\"k\": [1, 2]}"})));
        let r = resolve(
            &rule(Strategy::ServerWins, &[]),
            &data,
            None,
            Some(&json!(3)),
            &now,
        );
        assert_eq!(r.write, data);
    }
}
