//! Compiled expressions and filters, and their evaluation against a row.
//!
//! An *unknown* is a value the filter binds rather than tests: `bucket.<param>` in a data query,
//! a request value (`request.user_id()`, a JWT claim, a client parameter) in a parameter query.
//! Evaluating a filter against a row yields every consistent binding of its unknowns.

use std::collections::{BTreeMap, BTreeSet};

use walsync_types::Value;

use crate::row::RowRef;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Operand {
    Column(String),
    Literal(Value),
    /// Bound by the filter; the string is the unknown's canonical name.
    Unknown(String),
    Cast(Box<Operand>, Cast),
    Json {
        base: Box<Operand>,
        key: JsonKey,
        as_text: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cast {
    Text,
    Integer,
    Real,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JsonKey {
    Field(String),
    Index(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Filter {
    True,
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Eq(Operand, Operand),
    NotEq(Operand, Operand),
    IsNull {
        operand: Operand,
        negated: bool,
    },
    InList {
        operand: Operand,
        list: Vec<Operand>,
        negated: bool,
    },
    /// `x IN <array-valued expression>` (a JSON or PostgreSQL array).
    InArray(Operand, Operand),
}

/// Values of unknowns, by canonical name.
pub(crate) type Binding = BTreeMap<String, Value>;

impl Cast {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cast::Text => "text",
            Cast::Integer => "integer",
            Cast::Real => "real",
        }
    }
}

impl Operand {
    /// The type the operand's value has whatever the data: a request's user id is text, a
    /// cast says its type, a literal has its own. `None` when it depends on a column or on
    /// JSON the request brings.
    pub(crate) fn declared_type(&self) -> Option<Cast> {
        match self {
            Operand::Unknown(u) if u == "request.user_id()" => Some(Cast::Text),
            Operand::Cast(_, c) => Some(*c),
            Operand::Literal(Value::Text(_)) => Some(Cast::Text),
            Operand::Literal(Value::Int(_) | Value::Bool(_)) => Some(Cast::Integer),
            Operand::Literal(Value::Float(_)) => Some(Cast::Real),
            _ => None,
        }
    }

    pub(crate) fn is_known(&self) -> bool {
        match self {
            Operand::Column(_) | Operand::Literal(_) => true,
            Operand::Unknown(_) => false,
            Operand::Cast(o, _) | Operand::Json { base: o, .. } => o.is_known(),
        }
    }

    /// The operand's value for `row`, with `unknowns` supplying bound values (if any).
    pub(crate) fn eval(&self, row: Option<&RowRef<'_>>, unknowns: &Binding) -> Value {
        match self {
            Operand::Column(c) => row.and_then(|r| r.get(c)).cloned().unwrap_or(Value::Null),
            Operand::Literal(v) => v.clone(),
            Operand::Unknown(k) => unknowns.get(k).cloned().unwrap_or(Value::Null),
            Operand::Cast(o, cast) => cast_value(o.eval(row, unknowns), *cast),
            Operand::Json { base, key, as_text } => {
                json_extract(&o_json(base.eval(row, unknowns)), key, *as_text)
            }
        }
    }
}

fn o_json(v: Value) -> serde_json::Value {
    match v {
        Value::Json(_) => v.json().unwrap_or(serde_json::Value::Null),
        Value::Text(s) => serde_json::from_str(&s).unwrap_or(serde_json::Value::Null),
        other => other.to_json(),
    }
}

fn json_extract(j: &serde_json::Value, key: &JsonKey, as_text: bool) -> Value {
    let found = match key {
        JsonKey::Field(f) => j.get(f),
        JsonKey::Index(i) => usize::try_from(*i).ok().and_then(|i| j.get(i)),
    };
    match found {
        None | Some(serde_json::Value::Null) => Value::Null,
        Some(serde_json::Value::String(s)) if as_text => Value::Text(s.clone()),
        // `->>` gives an SQL value: a JSON boolean is one (SQLite's 1 or 0).
        Some(serde_json::Value::Bool(b)) if as_text => Value::Bool(*b),
        Some(v) if as_text => Value::Text(v.to_string()),
        Some(v) => Value::from_json(v),
    }
}

pub(crate) fn cast_value(v: Value, cast: Cast) -> Value {
    if v == Value::Null {
        return v;
    }
    match cast {
        Cast::Text => canonical(&v).map_or(Value::Null, Value::Text),
        Cast::Integer => match &v {
            Value::Int(_) => v,
            Value::Float(f) => Value::Int(*f as i64),
            Value::Bool(b) => Value::Int(i64::from(*b)),
            other => canonical(other)
                .and_then(|s| s.trim().parse().ok())
                .map_or(Value::Null, Value::Int),
        },
        Cast::Real => match &v {
            Value::Float(_) => v,
            Value::Int(i) => Value::Float(*i as f64),
            other => canonical(other)
                .and_then(|s| s.trim().parse().ok())
                .map_or(Value::Null, Value::Float),
        },
    }
}

/// The text by which values compare and lookup keys are built: `42` and `'42'` are equal, as
/// a user id from a JWT (text) must match an integer column, and a boolean is the integer 1
/// or 0 (SQLite's semantics, which PowerSync's rules follow: `archived = 0` matches `false`).
/// `None` for null.
pub fn canonical(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => i64::from(*b).to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Text(s) => s.clone(),
        // A JSON string compares by its content; other JSON by its compact text (JSON that
        // serde_json cannot hold, by the text PostgreSQL printed).
        Value::Json(text) => match v.json() {
            Some(serde_json::Value::String(s)) => s,
            Some(j) => j.to_string(),
            None => text.clone(),
        },
        Value::Bytes(_) | Value::Array(_) => v.to_json().to_string(),
    })
}

fn same(a: &Value, b: &Value) -> bool {
    match (canonical(a), canonical(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn elements(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        Value::Json(_) => match v.json() {
            Some(serde_json::Value::Array(items)) => items.iter().map(Value::from_json).collect(),
            _ => Vec::new(),
        },
        Value::Text(s) => match serde_json::from_str::<serde_json::Value>(&s) {
            Ok(serde_json::Value::Array(items)) => items.iter().map(Value::from_json).collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// A JSON scalar from an array element as the plain value it stands for.
fn plain(v: Value) -> Value {
    match v.json() {
        Some(serde_json::Value::String(s)) => Value::Text(s),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .map(Value::Int)
            .unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or_default())),
        Some(serde_json::Value::Bool(b)) => Value::Bool(b),
        Some(serde_json::Value::Null) => Value::Null,
        _ => v,
    }
}

impl Filter {
    /// Every consistent binding of the filter's unknowns under which `row` passes. Unknowns
    /// already in `given` are tested rather than bound.
    pub(crate) fn bindings(&self, row: Option<&RowRef<'_>>, given: &Binding) -> Vec<Binding> {
        let one = |b: Binding| vec![b];
        let test = |pass: bool| {
            if pass {
                vec![Binding::new()]
            } else {
                Vec::new()
            }
        };
        let bind = |k: &str, v: Value| -> Vec<Binding> {
            if v == Value::Null {
                return Vec::new();
            }
            if let Some(g) = given.get(k) {
                return test(same(g, &v));
            }
            one(Binding::from([(k.to_owned(), v)]))
        };
        match self {
            Filter::True => test(true),
            Filter::Eq(Operand::Unknown(k), other) | Filter::Eq(other, Operand::Unknown(k))
                if other.is_known() =>
            {
                bind(k, other.eval(row, given))
            }
            Filter::Eq(a, b) => test(same(&a.eval(row, given), &b.eval(row, given))),
            Filter::NotEq(a, b) => {
                let (a, b) = (a.eval(row, given), b.eval(row, given));
                test(a != Value::Null && b != Value::Null && !same(&a, &b))
            }
            Filter::IsNull { operand, negated } => {
                test((operand.eval(row, given) == Value::Null) != *negated)
            }
            Filter::InList {
                operand: Operand::Unknown(k),
                list,
                negated: false,
            } => list
                .iter()
                .flat_map(|item| bind(k, item.eval(row, given)))
                .collect(),
            Filter::InList {
                operand,
                list,
                negated,
            } => {
                // SQL's three values: `x IN (…)` is true on a match; otherwise it is null (never
                // true, negated or not) when `x` or an item is null, and false only when every
                // comparison was false.
                let v = operand.eval(row, given);
                let items: Vec<Value> = list.iter().map(|i| i.eval(row, given)).collect();
                let matched = items.iter().any(|i| same(&v, i));
                let unknown = v == Value::Null || items.contains(&Value::Null);
                test(if matched {
                    !*negated
                } else {
                    !unknown && *negated
                })
            }
            Filter::InArray(Operand::Unknown(k), array) => elements(array.eval(row, given))
                .into_iter()
                .flat_map(|e| bind(k, plain(e)))
                .collect(),
            Filter::InArray(operand, array) => {
                let v = operand.eval(row, given);
                test(
                    elements(array.eval(row, given))
                        .into_iter()
                        .any(|e| same(&v, &plain(e))),
                )
            }
            Filter::Or(fs) => fs.iter().flat_map(|f| f.bindings(row, given)).collect(),
            Filter::And(fs) => {
                let mut acc = vec![Binding::new()];
                for f in fs {
                    let mut next = Vec::new();
                    for b in &acc {
                        let mut merged_given = given.clone();
                        merged_given.extend(b.clone());
                        for extra in f.bindings(row, &merged_given) {
                            let mut m = b.clone();
                            m.extend(extra);
                            next.push(m);
                        }
                    }
                    acc = next;
                    if acc.is_empty() {
                        break;
                    }
                }
                acc
            }
        }
    }

    /// For each way the filter can pass, the set of unknowns it binds (statically).
    pub(crate) fn bound_sets(&self) -> Vec<BTreeSet<String>> {
        match self {
            Filter::Eq(Operand::Unknown(k), o) | Filter::Eq(o, Operand::Unknown(k))
                if o.is_known() =>
            {
                vec![BTreeSet::from([k.clone()])]
            }
            Filter::InList {
                operand: Operand::Unknown(k),
                negated: false,
                ..
            }
            | Filter::InArray(Operand::Unknown(k), _) => {
                vec![BTreeSet::from([k.clone()])]
            }
            Filter::Or(fs) => fs.iter().flat_map(Filter::bound_sets).collect(),
            Filter::And(fs) => {
                let mut acc = vec![BTreeSet::new()];
                for f in fs {
                    let sets = f.bound_sets();
                    acc = acc
                        .iter()
                        .flat_map(|a| sets.iter().map(move |s| a.union(s).cloned().collect()))
                        .collect();
                }
                acc
            }
            _ => vec![BTreeSet::new()],
        }
    }
}
