//! Evaluating compiled rules: rows to bucket outputs and lookup entries, requests to buckets.

use walsync_types::{
    BucketReason, LookupEntry, LookupKey, RowOutput, StreamDescription, StreamError, Value,
    bucket_id,
};

use crate::compile::Item;
use crate::definition::{BucketDefinition, SyncRules, TableQuery};
use crate::expr::{Binding, Cast, canonical, cast_value};
use crate::row::RowRef;

/// What a client asks for beside the bucket definitions: PowerSync's `streams` object of a
/// sync request.
#[derive(Debug, Clone)]
pub struct StreamRequest {
    /// Whether the streams marked `auto_subscribe` are included.
    pub include_defaults: bool,
    pub subscriptions: Vec<Subscription>,
}

impl Default for StreamRequest {
    fn default() -> StreamRequest {
        StreamRequest {
            include_defaults: true,
            subscriptions: Vec::new(),
        }
    }
}

/// One explicit subscription, as the client sent it (checked by [`SyncRules::select`]).
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    pub stream: String,
    /// An object of the subscription's parameters, or null.
    pub parameters: serde_json::Value,
    /// A priority from 0 to 3 replacing the stream's, or null.
    pub override_priority: serde_json::Value,
}

/// A request's selection: the streams it involves and, per reason, the buckets that follow
/// from the request alone and the lookup keys whose stored entries name the rest.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub streams: Vec<StreamDescription>,
    pub parts: Vec<SelectionPart>,
}

#[derive(Debug, Clone)]
pub struct SelectionPart {
    /// `None` for the bucket definitions of `bucket_definitions`.
    pub reason: Option<BucketReason>,
    /// The subscription's priority override, if any.
    pub priority: Option<u8>,
    pub buckets: Vec<String>,
    pub lookups: Vec<LookupKey>,
    /// Lookups whose keys wait for values other lookups find (a stream's nested subquery or
    /// join); the store resolves them ([`ChainedLookup`]).
    pub chains: Vec<ChainedLookup>,
    /// Request values that complete the bucket parameters the entries of a query hold.
    pub completions: Vec<Completion>,
}

/// The bucket parameters a request adds to what the entries found under the keys of one
/// parameter query hold: `(position, value)` pairs, inserted in order into each entry's array
/// (a stream's `column = subscription.parameter('x')` beside a subquery on another column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub definition: String,
    pub query: u32,
    pub values: Vec<(usize, serde_json::Value)>,
}

impl Completion {
    /// The JSON text of an entry's parameters with the request's values put in.
    pub fn complete(&self, stored: &str) -> Option<String> {
        let serde_json::Value::Array(mut params) = serde_json::from_str(stored).ok()? else {
            return None;
        };
        for (i, v) in &self.values {
            if *i > params.len() {
                return None;
            }
            params.insert(*i, v.clone());
        }
        serde_json::to_string(&params).ok()
    }
}

impl Selection {
    /// The index of stream `name`'s description, added when the selection has none yet.
    fn status(&mut self, name: &str, is_default: bool) -> usize {
        if let Some(i) = self.streams.iter().position(|s| s.name == name) {
            return i;
        }
        self.streams.push(StreamDescription {
            name: name.to_owned(),
            is_default,
            errors: Vec::new(),
        });
        self.streams.len() - 1
    }
}

/// One part's resolution, before it is given its reason.
struct Resolution {
    buckets: Vec<String>,
    lookups: Vec<LookupKey>,
    chains: Vec<ChainedLookup>,
    completions: Vec<Completion>,
}

impl Resolution {
    fn part(self, reason: Option<BucketReason>, priority: Option<u8>) -> SelectionPart {
        SelectionPart {
            reason,
            priority,
            buckets: self.buckets,
            lookups: self.lookups,
            chains: self.chains,
            completions: self.completions,
        }
    }
}

/// A lookup whose key waits for values another lookup finds: `key` with `values[hole]` filled
/// by each value `source` yields. The entries found under a filled key name buckets of
/// `key.definition`; the entries found under `source` are one value each (the JSON array of a
/// chained query's one output), made canonical ([`canonical`]) to fill the hole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedLookup {
    pub key: LookupKey,
    pub hole: usize,
    pub source: Box<Lookup>,
}

/// Where values come from: a key the request fills alone, or another chained lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Key(LookupKey),
    Chained(ChainedLookup),
}

/// The lookup parameter query `q` of `def` needs for `request`: a plain key, or a chain when
/// `q` matches a column with another query's values (`chain.value(N)`). `None` when a request
/// value it needs is missing (no buckets).
fn chain_of(def: &BucketDefinition, q: &TableQuery, request: &RequestContext) -> Option<Lookup> {
    let mut values = Vec::with_capacity(q.unknowns.len());
    let mut hole = None;
    for (i, u) in q.unknowns.iter().enumerate() {
        match u.strip_prefix("chain:") {
            Some(n) => {
                hole = Some((i, n.parse::<u32>().ok()?));
                values.push(String::new());
            }
            None => values.push(canonical(&request.resolve(u))?),
        }
    }
    let key = LookupKey {
        definition: def.name.clone(),
        query: q.index,
        values,
    };
    let Some((hole, feeder)) = hole else {
        return Some(Lookup::Key(key));
    };
    let feeder = def.chained_queries.iter().find(|c| c.index == feeder)?;
    Some(Lookup::Chained(ChainedLookup {
        key,
        hole,
        source: Box::new(chain_of(def, feeder, request)?),
    }))
}

/// What a request brings: the authenticated user, the token's claims, and the client's own
/// (untrusted) parameters.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub user_id: String,
    pub claims: serde_json::Value,
    pub parameters: serde_json::Value,
    /// The parameters of the stream subscription being resolved (`subscription.parameter()`;
    /// untrusted); null outside one.
    pub subscription: serde_json::Value,
}

/// A JSON value of the request as the plain value it stands for (`auth.parameter()`,
/// `subscription.parameter()`, `connection.parameter()`): scalars as text, integers, reals and
/// booleans; objects and arrays as JSON.
fn plain(j: Option<&serde_json::Value>) -> Value {
    match j {
        None | Some(serde_json::Value::Null) => Value::Null,
        Some(serde_json::Value::Bool(b)) => Value::Bool(*b),
        Some(serde_json::Value::String(s)) => Value::Text(s.clone()),
        Some(serde_json::Value::Number(n)) => n.as_i64().map_or_else(
            || {
                n.as_f64()
                    .map_or_else(|| Value::Text(n.to_string()), Value::Float)
            },
            Value::Int,
        ),
        Some(other) => Value::from_json(other),
    }
}

impl RequestContext {
    fn resolve(&self, unknown: &str) -> Value {
        let json = |j: Option<&serde_json::Value>, as_text: bool| match j {
            None | Some(serde_json::Value::Null) => Value::Null,
            Some(serde_json::Value::String(s)) if as_text => Value::Text(s.clone()),
            Some(serde_json::Value::Number(n)) if as_text => n
                .as_i64()
                .map_or_else(|| Value::Text(n.to_string()), Value::Int),
            Some(v) if as_text => Value::Text(v.to_string()),
            Some(v) => Value::from_json(v),
        };
        if unknown == "request.user_id()" {
            return Value::Text(self.user_id.clone());
        }
        let (kind, key) = unknown.split_once(':').unwrap_or((unknown, ""));
        match kind {
            "jwt" => json(self.claims.get(key), true),
            "jwt->" => json(self.claims.get(key), false),
            "param" => json(self.parameters.get(key), true),
            "param->" => json(self.parameters.get(key), false),
            "sub" => json(self.subscription.get(key), true),
            "sub->" => json(self.subscription.get(key), false),
            "jwt=" => plain(self.claims.get(key)),
            "param=" => plain(self.parameters.get(key)),
            "sub=" => plain(self.subscription.get(key)),
            "token" => json(self.claims.get("parameters").and_then(|p| p.get(key)), true),
            _ => Value::Null,
        }
    }
}

/// [`bucket_id`] from the bound values (`None`: unbound, written as `null`), without building
/// JSON values on the way.
fn bucket_id_with<'v>(
    definition: &str,
    values: impl Iterator<Item = Option<std::borrow::Cow<'v, Value>>>,
) -> String {
    let mut s = Vec::with_capacity(definition.len() + 16);
    s.extend_from_slice(definition.as_bytes());
    s.push(b'[');
    for (i, v) in values.enumerate() {
        if i > 0 {
            s.push(b',');
        }
        match v.as_deref() {
            Some(v @ Value::Json(_)) => match v.json() {
                Some(serde_json::Value::String(t)) => write_json_str(&mut s, &t),
                _ => write_output_json(&mut s, v),
            },
            Some(v) => write_output_json(&mut s, v),
            None => s.extend_from_slice(b"null"),
        }
    }
    s.push(b']');
    String::from_utf8(s).unwrap_or_default()
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly the quote, the backslash and control characters; most text has
    // none, and is copied whole (one pass the compiler vectorises, instead of one per byte).
    let plain = !s.bytes().fold(false, |esc, b| {
        esc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// [`output_json`]'s text, written into `out`.
fn write_output_json(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.push(if *b { b'1' } else { b'0' }),
        Value::Int(i) => {
            let _ = serde_json::to_writer(&mut *out, i);
        }
        Value::Text(t) => write_json_str(out, t),
        other => {
            let _ = serde_json::to_writer(&mut *out, &output_json(other));
        }
    }
}

/// A value as an object id: its output JSON, a string's own text.
fn output_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Text(t) => Some(t.clone()),
        Value::Int(i) => Some(i.to_string()),
        other => match output_json(other) {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s),
            j => Some(j.to_string()),
        },
    }
}

/// A value as it leaves the server in a row's JSON: SQLite's types, as PowerSync clients store
/// them. Booleans become 1/0, JSON and arrays become JSON text.
fn output_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => serde_json::Value::from(i64::from(*b)),
        // JSON leaves as the text PostgreSQL printed, arrays with their JSON elements whole.
        Value::Json(text) => serde_json::Value::String(text.clone()),
        Value::Array(_) => {
            let mut text = String::new();
            v.write_json(&mut text);
            serde_json::Value::String(text)
        }
        other => other.to_json(),
    }
}

/// A bucket parameter's value converted to the parameter's declared type (when it has one).
fn typed(v: &Value, ty: Option<Cast>) -> std::borrow::Cow<'_, Value> {
    match ty {
        Some(t) => std::borrow::Cow::Owned(cast_value(v.clone(), t)),
        None => std::borrow::Cow::Borrowed(v),
    }
}

fn parameter_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Json(_) => match v.json() {
            Some(serde_json::Value::String(s)) => serde_json::Value::String(s),
            _ => output_json(v),
        },
        other => output_json(other),
    }
}

impl SyncRules {
    /// Every bucket `row` belongs to, with the data it has there.
    pub fn evaluate_row(&self, row: &RowRef<'_>) -> Vec<RowOutput> {
        let mut out = Vec::new();
        for def in &self.definitions {
            for q in def.data_queries.iter().filter(|q| q.table.matches(row)) {
                let bindings = q.filter.bindings(Some(row), &Binding::new());
                if bindings.is_empty() {
                    continue;
                }
                // The row's JSON text is written directly (no intermediate JSON values): this
                // runs for every replicated row.
                let mut data = Vec::with_capacity(64 + row.values.len() * 24);
                data.push(b'{');
                let mut id: Option<String> = None;
                let mut field = |data: &mut Vec<u8>, name: &str, v: &Value| {
                    if data.len() > 1 {
                        data.push(b',');
                    }
                    write_json_str(data, name);
                    data.push(b':');
                    write_output_json(data, v);
                    if name == "id" {
                        id = output_text(v);
                    }
                };
                for item in &q.items {
                    match item {
                        Item::All => {
                            for (c, v) in row.columns.iter().zip(row.values) {
                                field(&mut data, c, v);
                            }
                        }
                        Item::Expr { name, operand } => {
                            field(&mut data, name, &operand.eval(Some(row), &Binding::new()));
                        }
                    }
                }
                data.push(b'}');
                let Some(id) = id else {
                    continue;
                };
                // Only JSON text was written, so the bytes are UTF-8.
                let mut data = String::from_utf8(data).unwrap_or_default();
                let mut bindings = bindings.into_iter().peekable();
                while let Some(b) = bindings.next() {
                    // The last bucket takes the text itself, the others a copy.
                    let data = if bindings.peek().is_some() {
                        data.clone()
                    } else {
                        std::mem::take(&mut data)
                    };
                    let bucket = bucket_id_with(
                        &def.name,
                        def.parameter_names
                            .iter()
                            .zip(&def.parameter_types)
                            .map(|(p, ty)| {
                                b.iter()
                                    .find(|(k, _)| k.strip_prefix("bucket.") == Some(p.as_str()))
                                    .map(|(_, v)| typed(v, *ty))
                            }),
                    );
                    out.push(RowOutput {
                        bucket,
                        object_type: q.output_type.clone(),
                        object_id: id.clone(),
                        data,
                    });
                }
            }
        }
        out.sort();
        out.dedup_by(|a, b| {
            a.bucket == b.bucket && a.object_type == b.object_type && a.object_id == b.object_id
        });
        out
    }

    /// The lookup entries a row of a parameter table contributes.
    pub fn evaluate_lookups(&self, row: &RowRef<'_>) -> Vec<LookupEntry> {
        let mut out = Vec::new();
        for def in &self.definitions {
            let queries = def
                .table_queries
                .iter()
                .map(|q| (q, true))
                .chain(def.chained_queries.iter().map(|q| (q, false)));
            for (q, names_buckets) in queries.filter(|(q, _)| q.table.matches(row)) {
                for b in q.filter.bindings(Some(row), &Binding::new()) {
                    let Some(values) = q
                        .unknowns
                        .iter()
                        .map(|u| b.get(u).and_then(canonical))
                        .collect::<Option<Vec<_>>>()
                    else {
                        continue;
                    };
                    // A chained query's one value keeps its own type: it is matched against a
                    // column of the query it feeds, not made a bucket parameter.
                    // Outputs of the request (a stream's) are filled in at request time; the
                    // entry keeps those of the row.
                    let parameters: Vec<serde_json::Value> = q
                        .outputs
                        .iter()
                        .enumerate()
                        .filter(|(_, o)| o.is_known())
                        .map(|(i, o)| {
                            let ty = if names_buckets {
                                def.parameter_types.get(i).copied().flatten()
                            } else {
                                None
                            };
                            parameter_json(&typed(&o.eval(Some(row), &Binding::new()), ty))
                        })
                        .collect();
                    if parameters.iter().any(serde_json::Value::is_null) {
                        continue;
                    }
                    out.push(LookupEntry {
                        key: LookupKey {
                            definition: def.name.clone(),
                            query: q.index,
                            values,
                        },
                        parameters,
                    });
                }
            }
        }
        out
    }

    /// A request's buckets that follow from the request alone, and the lookup keys whose stored
    /// entries name the rest: the bucket definitions and the streams a client gets without
    /// subscribing ([`SyncRules::select`] with no subscriptions). Complete for bucket
    /// definitions; a stream's chained lookups and completions are only in
    /// [`SyncRules::select`], which the sync core uses.
    pub fn resolve_request(&self, request: &RequestContext) -> (Vec<String>, Vec<LookupKey>) {
        let selection = self.select(request, &StreamRequest::default());
        let mut buckets = Vec::new();
        let mut lookups = Vec::new();
        for part in selection.parts {
            buckets.extend(part.buckets);
            lookups.extend(part.lookups);
        }
        buckets.sort();
        buckets.dedup();
        (buckets, lookups)
    }

    /// What a request selects: the bucket definitions, the streams it gets by default (unless
    /// it declines them) and its explicit subscriptions, each part with its static buckets and
    /// lookup keys. A subscription that cannot be resolved (an unknown stream, parameters that
    /// are not an object, a priority out of range) is reported on its stream and selects
    /// nothing; the others are unaffected.
    pub fn select(&self, request: &RequestContext, wanted: &StreamRequest) -> Selection {
        let mut selection = Selection::default();
        let definitions =
            |stream: Option<usize>| self.definitions.iter().filter(move |d| d.stream == stream);
        let base = RequestContext {
            subscription: serde_json::Value::Null,
            ..request.clone()
        };
        selection.parts.push(
            self.resolve_definitions(&base, definitions(None))
                .part(None, None),
        );
        let status_of = |selection: &mut Selection, index: usize| -> usize {
            let stream = &self.streams()[index];
            selection.status(&stream.name, stream.auto_subscribe)
        };
        if wanted.include_defaults {
            for (index, stream) in self.streams().iter().enumerate() {
                if !stream.auto_subscribe {
                    continue;
                }
                let status = status_of(&mut selection, index);
                let reason = BucketReason::Default {
                    default: status as u32,
                };
                selection.parts.push(
                    self.resolve_definitions(&base, definitions(Some(index)))
                        .part(Some(reason), None),
                );
            }
        }
        // One context for every subscription, its parameters swapped in (the token's claims
        // are not copied per subscription).
        let mut context = base.clone();
        for (i, sub) in wanted.subscriptions.iter().enumerate() {
            let Some(index) = self.streams().iter().position(|s| s.name == sub.stream) else {
                let status = selection.status(&sub.stream, false);
                selection.streams[status].errors.push(StreamError {
                    subscription: Some(i as u32),
                    message: format!("there is no stream named {:?}", sub.stream),
                });
                continue;
            };
            let status = status_of(&mut selection, index);
            let fail = |selection: &mut Selection, message: String| {
                selection.streams[status].errors.push(StreamError {
                    subscription: Some(i as u32),
                    message,
                });
            };
            if !matches!(
                sub.parameters,
                serde_json::Value::Null | serde_json::Value::Object(_)
            ) {
                fail(
                    &mut selection,
                    "subscription parameters must be an object".into(),
                );
                continue;
            }
            let priority = match &sub.override_priority {
                serde_json::Value::Null => None,
                serde_json::Value::Number(n) => match n.as_u64() {
                    Some(p @ 0..=3) => Some(p as u8),
                    _ => {
                        fail(
                            &mut selection,
                            format!("override_priority {n} is not 0 to 3"),
                        );
                        continue;
                    }
                },
                other => {
                    fail(
                        &mut selection,
                        format!("override_priority {other} is not a number from 0 to 3"),
                    );
                    continue;
                }
            };
            context.subscription = sub.parameters.clone();
            selection.parts.push(
                self.resolve_definitions(&context, definitions(Some(index)))
                    .part(Some(BucketReason::Subscription { sub: i as u32 }), priority),
            );
        }
        selection
    }

    /// The static buckets, lookup keys and chained lookups of `definitions` for one request.
    fn resolve_definitions<'d>(
        &self,
        request: &RequestContext,
        definitions: impl Iterator<Item = &'d BucketDefinition>,
    ) -> Resolution {
        let mut buckets = Vec::new();
        let mut lookups = Vec::new();
        let mut chains = Vec::new();
        let mut completions = Vec::new();
        for def in definitions {
            if def.static_queries.is_empty() && def.table_queries.is_empty() {
                buckets.push(bucket_id(&def.name, &[]));
            }
            for q in &def.static_queries {
                let given = request_binding(
                    request,
                    q.outputs
                        .iter()
                        .flat_map(unknowns_of)
                        .chain(filter_unknowns(&q.filter)),
                );
                if q.filter.bindings(None, &given).is_empty() {
                    continue;
                }
                let params: Vec<serde_json::Value> = q
                    .outputs
                    .iter()
                    .zip(&def.parameter_types)
                    .map(|(o, ty)| parameter_json(&typed(&o.eval(None, &given), *ty)))
                    .collect();
                if !params.iter().any(serde_json::Value::is_null) {
                    buckets.push(bucket_id(&def.name, &params));
                }
            }
            for q in &def.table_queries {
                // Request outputs of the query: values the request puts in the bucket id beside
                // those its lookup entries hold. A missing one: no buckets.
                let mut completion = Vec::new();
                let mut missing = false;
                for (i, (o, ty)) in q.outputs.iter().zip(&def.parameter_types).enumerate() {
                    if o.is_known() {
                        continue;
                    }
                    let given = request_binding(request, unknowns_of(o).into_iter());
                    let v = parameter_json(&typed(&o.eval(None, &given), *ty));
                    missing |= v.is_null();
                    completion.push((i, v));
                }
                if missing {
                    continue;
                }
                if !completion.is_empty() {
                    completions.push(Completion {
                        definition: def.name.clone(),
                        query: q.index,
                        values: completion,
                    });
                }
                match chain_of(def, q, request) {
                    Some(Lookup::Key(key)) => lookups.push(key),
                    Some(Lookup::Chained(chain)) => chains.push(chain),
                    None => {}
                }
            }
        }
        buckets.sort();
        buckets.dedup();
        Resolution {
            buckets,
            lookups,
            chains,
            completions,
        }
    }

    /// The definition a bucket id belongs to.
    pub fn definition_of(&self, bucket: &str) -> Option<&BucketDefinition> {
        let name = bucket.split('[').next()?;
        self.definitions.iter().find(|d| d.name == name)
    }
}

fn request_binding<'a>(
    request: &RequestContext,
    unknowns: impl Iterator<Item = &'a str>,
) -> Binding {
    unknowns
        .map(|u| (u.to_owned(), request.resolve(u)))
        .collect()
}

fn unknowns_of(o: &crate::expr::Operand) -> Vec<&str> {
    use crate::expr::Operand;
    match o {
        Operand::Unknown(u) => vec![u.as_str()],
        Operand::Cast(inner, _) | Operand::Json { base: inner, .. } => unknowns_of(inner),
        Operand::Column(_) | Operand::Literal(_) => Vec::new(),
    }
}

fn filter_unknowns(f: &crate::expr::Filter) -> Vec<&str> {
    use crate::expr::Filter;
    match f {
        Filter::True => Vec::new(),
        Filter::And(fs) | Filter::Or(fs) => fs.iter().flat_map(filter_unknowns).collect(),
        Filter::Eq(a, b) | Filter::NotEq(a, b) | Filter::InArray(a, b) => {
            let mut v = unknowns_of(a);
            v.extend(unknowns_of(b));
            v
        }
        Filter::IsNull { operand, .. } => unknowns_of(operand),
        Filter::InList { operand, list, .. } => {
            let mut v = unknowns_of(operand);
            v.extend(list.iter().flat_map(unknowns_of));
            v
        }
    }
}
