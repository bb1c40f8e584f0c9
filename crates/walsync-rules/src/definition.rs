//! Loading `bucket_definitions` YAML and checking each definition as a whole.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::RulesError;
use crate::compile::{Item, Role, TableMatch, compile, compile_with};
use crate::expr::{Cast, Filter, Operand};
use crate::reads::{QueryRead, bound_columns};
use crate::streams::{Stream, StreamYaml, compile_query};

/// Compiled sync rules.
#[derive(Debug, Clone)]
pub struct SyncRules {
    pub(crate) definitions: Vec<BucketDefinition>,
    warnings: Vec<String>,
    /// Every table the rules read, computed once: the replicator asks for each row.
    tables: BTreeSet<(String, String)>,
    /// See [`SyncRules::fingerprint`].
    fingerprint: String,
    /// The Sync Streams, each compiled into definitions (`BucketDefinition::stream`).
    streams: Vec<Stream>,
}

impl BucketDefinition {
    /// The index into [`SyncRules::streams`] of the stream this definition was compiled from;
    /// `None` for one of `bucket_definitions`.
    pub fn stream(&self) -> Option<usize> {
        self.stream
    }

    /// The type bucket parameter `name` has whatever the data (`text`, `integer`, `real`), when
    /// a parameter query declares it.
    pub fn parameter_type(&self, name: &str) -> Option<&'static str> {
        let i = self.parameter_names.iter().position(|p| p == name)?;
        self.parameter_types
            .get(i)
            .copied()
            .flatten()
            .map(Cast::name)
    }
}

/// One bucket definition: its parameter queries (who gets which buckets) and data queries (what
/// goes in them).
#[derive(Debug, Clone)]
pub struct BucketDefinition {
    pub name: String,
    /// 0 (first) to 3 (default), as PowerSync's priorities.
    pub priority: u8,
    /// Names of the bucket parameters, in the order of the bucket id's JSON array.
    pub parameter_names: Vec<String>,
    /// The type each bucket parameter has wherever it comes from, when a parameter query says
    /// it (a request's user id is text, a cast names its type): values bound from rows are
    /// converted to it, so that `by_user["42"]` from a token and `by_user[42]` from an integer
    /// column are one bucket. `None`: the columns' own types (`walsync rules check --postgres`
    /// checks that they agree).
    pub(crate) parameter_types: Vec<Option<Cast>>,
    pub(crate) static_queries: Vec<StaticQuery>,
    pub(crate) table_queries: Vec<TableQuery>,
    /// Queries whose values feed another query's `chain.value(N)` (a stream's nested subquery
    /// or join): each has one output and its own lookup entries, and names no bucket.
    pub(crate) chained_queries: Vec<TableQuery>,
    pub(crate) data_queries: Vec<DataQuery>,
    /// What its queries over tables read, for checks against a database.
    pub(crate) reads: Vec<QueryRead>,
    /// The stream it was compiled from (an index into [`SyncRules::streams`]); `None` for a
    /// bucket definition of `bucket_definitions`.
    pub(crate) stream: Option<usize>,
}

#[derive(Debug, Clone)]
pub(crate) struct StaticQuery {
    pub outputs: Vec<Operand>,
    pub filter: Filter,
}

#[derive(Debug, Clone)]
pub(crate) struct TableQuery {
    pub index: u32,
    pub table: TableMatch,
    pub outputs: Vec<Operand>,
    pub filter: Filter,
    /// The request values the lookup key is made of, in key order.
    pub unknowns: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct DataQuery {
    pub table: TableMatch,
    pub output_type: String,
    pub items: Vec<Item>,
    pub filter: Filter,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    bucket_definitions: BTreeMap<String, DefinitionYaml>,
    #[serde(default)]
    streams: BTreeMap<String, StreamYaml>,
    /// CTEs every stream can use (a stream's own `with` takes precedence).
    #[serde(default)]
    with: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    config: Option<ConfigYaml>,
}

/// PowerSync's `config:` block; the edition is accepted (walsync reads every edition's syntax).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigYaml {
    #[serde(default)]
    #[allow(dead_code)]
    edition: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionYaml {
    #[serde(default)]
    parameters: Option<OneOrMany>,
    data: Vec<String>,
    #[serde(default)]
    priority: Option<u8>,
    #[serde(default)]
    accept_potentially_dangerous_queries: bool,
    /// Compiled from a stream: `chain.value(N)` is allowed, and these queries (numbered after
    /// the parameter queries) feed it.
    #[serde(skip)]
    chained: Vec<String>,
    /// Compiled from a stream: a parameter query over a table may also output request values
    /// (a stream's `column = subscription.parameter('x')` beside a subquery on another column),
    /// which the request fills in after the lookup.
    #[serde(skip)]
    from_stream: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// PowerSync's default priority.
const DEFAULT_PRIORITY: u8 = 3;

impl SyncRules {
    /// Parses and checks rules. Every error names the definition, the query and the part.
    pub fn from_yaml(text: &str) -> Result<SyncRules, RulesError> {
        let file: RulesFile =
            serde_yaml_ng::from_str(text).map_err(|e| RulesError::Yaml(e.to_string()))?;
        if file.bucket_definitions.is_empty() && file.streams.is_empty() {
            return Err(RulesError::Yaml(
                "the rules define neither bucket_definitions nor streams".into(),
            ));
        }
        let mut definitions = Vec::new();
        let mut warnings = Vec::new();
        for (name, def) in file.bucket_definitions {
            definitions.push(definition(&name, def, &mut warnings)?);
        }
        let global: BTreeMap<String, String> = file
            .with
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        let mut streams = Vec::new();
        for (name, yaml) in file.streams {
            let index = streams.len();
            let (stream, defs) = stream(&name, yaml, &global, index, &definitions, &mut warnings)?;
            streams.push(stream);
            definitions.extend(defs);
        }
        let mut tables = BTreeSet::new();
        for d in &definitions {
            for q in d.table_queries.iter().chain(&d.chained_queries) {
                tables.insert((q.table.schema.clone(), q.table.name.clone()));
            }
            for q in &d.data_queries {
                tables.insert((q.table.schema.clone(), q.table.name.clone()));
            }
        }
        Ok(SyncRules {
            definitions,
            warnings,
            tables,
            fingerprint: fingerprint(text)?,
            streams,
        })
    }

    /// The Sync Streams, in name order.
    pub fn streams(&self) -> &[Stream] {
        &self.streams
    }

    /// Names what the rules say, not how the file says it: the same for rules that differ only
    /// in comments, layout or key order, different for any change of meaning. The store keeps the
    /// fingerprint of the rules its buckets were built with, so a change is noticed at start.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn definitions(&self) -> &[BucketDefinition] {
        &self.definitions
    }

    /// What every query over a table reads: tables, columns, and the columns that fill bucket
    /// parameters.
    pub fn reads(&self) -> impl Iterator<Item = &QueryRead> {
        self.definitions.iter().flat_map(|d| d.reads.iter())
    }

    /// Things that work but deserve a look, such as use of client-supplied parameters.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Every table the rules read, as `(schema, name)`: what the publication must include.
    pub fn tables(&self) -> &BTreeSet<(String, String)> {
        &self.tables
    }

    /// Whether any rule reads this table.
    /// The tables the rules read, as `schema.table` (for a publication naming them).
    pub fn qualified_tables(&self) -> Vec<String> {
        self.tables()
            .iter()
            .map(|(s, t)| format!("{s}.{t}"))
            .collect()
    }

    pub fn reads_table(&self, schema: &str, table: &str) -> bool {
        self.tables.iter().any(|(s, t)| s == schema && t == table)
    }
}

fn definition(
    name: &str,
    def: DefinitionYaml,
    warnings: &mut Vec<String>,
) -> Result<BucketDefinition, RulesError> {
    let priority = def.priority.unwrap_or(DEFAULT_PRIORITY);
    if priority > 3 {
        return Err(RulesError::Definition {
            definition: name.into(),
            message: format!("priority {priority} is not 0 to 3"),
        });
    }
    let parameter_sql = match def.parameters {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    let mut out = BucketDefinition {
        name: name.to_owned(),
        priority,
        parameter_names: Vec::new(),
        parameter_types: Vec::new(),
        static_queries: Vec::new(),
        table_queries: Vec::new(),
        chained_queries: Vec::new(),
        data_queries: Vec::new(),
        reads: Vec::new(),
        stream: None,
    };
    let first_chained = parameter_sql.len();
    for (k, sql) in def.chained.iter().enumerate() {
        let index = first_chained + k;
        let err = |message: String| RulesError::Query {
            definition: name.into(),
            query: format!("parameter query {}", index + 1),
            sql: sql.clone(),
            message,
        };
        let c = compile_with(sql, Role::Parameter, true).map_err(err)?;
        let Some((table, _)) = c.table else {
            return Err(err("a subquery must read a table".into()));
        };
        let outputs: Vec<Operand> = c
            .items
            .into_iter()
            .filter_map(|i| match i {
                Item::Expr { operand, .. } => Some(operand),
                Item::All => None,
            })
            .collect();
        if outputs.len() != 1 || !outputs[0].is_known() {
            return Err(err("a subquery must select one column of its table".into()));
        }
        let sets = c.filter.bound_sets();
        let all: BTreeSet<String> = sets.iter().flatten().cloned().collect();
        if all.is_empty() || sets.iter().any(|s| *s != all) {
            return Err(err(
                "a subquery must match its rows to the request (or to the subquery inside it) in every OR branch"
                    .into(),
            ));
        }
        if all.iter().filter(|u| u.starts_with("chain:")).count() > 1 {
            return Err(err("one subquery inside a subquery at most".into()));
        }
        out.reads.push(QueryRead::of(
            name,
            format!("parameter query {}", index + 1),
            sql,
            &table,
            outputs.iter(),
            &c.filter,
        ));
        out.chained_queries.push(TableQuery {
            index: index as u32,
            table,
            outputs,
            filter: c.filter,
            unknowns: all.into_iter().collect(),
        });
    }
    for (i, sql) in parameter_sql.iter().enumerate() {
        let err = |message: String| RulesError::Query {
            definition: name.into(),
            query: format!("parameter query {}", i + 1),
            sql: sql.clone(),
            message,
        };
        let c = compile_with(sql, Role::Parameter, !def.chained.is_empty()).map_err(err)?;
        if c.untrusted && !def.accept_potentially_dangerous_queries {
            warnings.push(format!(
                "bucket definition {name:?}, parameter query {}: uses request.parameters(), which the client controls; \
                 a user can ask for any value. Set accept_potentially_dangerous_queries: true once that is intended",
                i + 1
            ));
        }
        let mut names = Vec::new();
        let mut outputs = Vec::new();
        for item in c.items {
            match item {
                Item::All => {
                    return Err(err(
                        "`*` is not allowed in a parameter query: name the parameters".into(),
                    ));
                }
                Item::Expr { name, operand } => {
                    names.push(name);
                    outputs.push(operand);
                }
            }
        }
        if i == 0 {
            out.parameter_names = names;
            out.parameter_types = vec![None; out.parameter_names.len()];
        } else if names != out.parameter_names {
            return Err(err(format!(
                "returns {names:?}, but the first parameter query returns {:?}",
                out.parameter_names
            )));
        }
        for (j, o) in outputs.iter().enumerate() {
            let (Some(want), Some(slot)) = (o.declared_type(), out.parameter_types.get_mut(j))
            else {
                continue;
            };
            match *slot {
                Some(had) if had != want => {
                    return Err(err(format!(
                        "bucket parameter `{}` is {} here but {} in an earlier parameter query: one \
                         value would make two different buckets; cast it the same way in both, e.g. \
                         `CAST(... AS {})`",
                        out.parameter_names[j],
                        want.name(),
                        had.name(),
                        had.name()
                    )));
                }
                _ => *slot = Some(want),
            }
        }
        match c.table {
            None => out.static_queries.push(StaticQuery {
                outputs,
                filter: c.filter,
            }),
            Some((table, _)) => {
                let sets = c.filter.bound_sets();
                let all: BTreeSet<String> = sets.iter().flatten().cloned().collect();
                if all.is_empty() {
                    return Err(err(
                        "a parameter query over a table must match rows to the request, e.g. `WHERE user_id = request.user_id()`"
                            .into(),
                    ));
                }
                if sets.iter().any(|s| *s != all) {
                    return Err(err(
                        "every OR branch must use the same request values".into()
                    ));
                }
                if outputs.iter().any(|o| !o.is_known() && !def.from_stream) {
                    return Err(err(
                        "outputs of a parameter query over a table must come from the row".into(),
                    ));
                }
                if outputs.iter().all(|o| !o.is_known()) {
                    return Err(err(
                        "a parameter query over a table must output a column of its rows".into(),
                    ));
                }
                let mut read = QueryRead::of(
                    name,
                    format!("parameter query {}", i + 1),
                    sql,
                    &table,
                    outputs.iter(),
                    &c.filter,
                );
                read.parameter_columns = out
                    .parameter_names
                    .iter()
                    .zip(&outputs)
                    .filter_map(|(p, o)| match o {
                        Operand::Column(c) => Some((p.clone(), c.clone())),
                        _ => None,
                    })
                    .collect();
                out.reads.push(read);
                out.table_queries.push(TableQuery {
                    index: i as u32,
                    table,
                    outputs,
                    filter: c.filter,
                    unknowns: all.into_iter().collect(),
                });
            }
        }
    }
    let required: BTreeSet<String> = out
        .parameter_names
        .iter()
        .map(|p| format!("bucket.{p}"))
        .collect();
    for (i, sql) in def.data.iter().enumerate() {
        let err = |message: String| RulesError::Query {
            definition: name.into(),
            query: format!("data query {}", i + 1),
            sql: sql.clone(),
            message,
        };
        let c = compile(sql, Role::Data).map_err(err)?;
        let Some((table, alias)) = c.table else {
            return Err(err("a data query must read a table".into()));
        };
        let sets = c.filter.bound_sets();
        for s in &sets {
            if let Some(unknown) = s.difference(&required).next() {
                return Err(err(format!(
                    "`{unknown}` is not a parameter of this bucket (parameters: {:?})",
                    out.parameter_names
                )));
            }
            if let Some(missing) = required.difference(s).next() {
                return Err(err(format!(
                    "does not use bucket parameter `{missing}`{}: every data query must match every bucket parameter to a column",
                    if sets.len() > 1 {
                        " in one of its OR branches"
                    } else {
                        ""
                    }
                )));
            }
        }
        let has_id = c.items.iter().any(|i| {
            matches!(i, Item::All) || matches!(i, Item::Expr { name, .. } if name == "id")
        });
        if !has_id {
            return Err(err(
                "a data query must return an `id` column (select it, or alias one AS id)".into(),
            ));
        }
        let mut read = QueryRead::of(
            name,
            format!("data query {}", i + 1),
            sql,
            &table,
            c.items.iter().filter_map(|item| match item {
                Item::Expr { operand, .. } => Some(operand),
                Item::All => None,
            }),
            &c.filter,
        );
        bound_columns(&c.filter, &mut read.parameter_columns);
        out.reads.push(read);
        out.data_queries.push(DataQuery {
            output_type: alias.unwrap_or_else(|| table.name.clone()),
            table,
            items: c.items,
            filter: c.filter,
        });
    }
    Ok(out)
}

/// One stream: its queries compiled into bucket definitions (named after the stream, with
/// `|k` when it has several), each checked as a definition is.
fn stream(
    name: &str,
    yaml: StreamYaml,
    global: &BTreeMap<String, String>,
    index: usize,
    existing: &[BucketDefinition],
    warnings: &mut Vec<String>,
) -> Result<(Stream, Vec<BucketDefinition>), RulesError> {
    let whole = |message: String| RulesError::Stream {
        stream: name.into(),
        query: "definition".into(),
        sql: String::new(),
        message,
    };
    if existing.iter().any(|d| d.name == name) {
        return Err(whole("has the name of a bucket definition".into()));
    }
    if name.contains(['[', '|']) {
        return Err(whole("a stream's name cannot contain `[` or `|`".into()));
    }
    let priority = yaml.priority.unwrap_or(DEFAULT_PRIORITY);
    if priority > 3 {
        return Err(whole(format!("priority {priority} is not 0 to 3")));
    }
    let queries: Vec<String> = match (yaml.query, yaml.queries.is_empty()) {
        (Some(q), true) => vec![q],
        (None, false) => yaml.queries,
        (Some(_), false) => return Err(whole("has both `query` and `queries`: use one".into())),
        (None, true) => return Err(whole("has no `query`".into())),
    };
    let mut ctes = global.clone();
    ctes.extend(yaml.with.into_iter().map(|(k, v)| (k.to_lowercase(), v)));
    let mut compiled = Vec::new();
    for (i, sql) in queries.iter().enumerate() {
        let label = format!("query {}", i + 1);
        let variants = compile_query(sql, &ctes).map_err(|message| RulesError::Stream {
            stream: name.into(),
            query: label.clone(),
            sql: sql.clone(),
            message,
        })?;
        for v in variants {
            compiled.push((label.clone(), sql.clone(), v));
        }
    }
    let several = compiled.len() > 1;
    let mut defs = Vec::new();
    for (k, (label, sql, v)) in compiled.into_iter().enumerate() {
        if v.unauthorized && !yaml.accept_potentially_dangerous_queries {
            warnings.push(format!(
                "stream {name:?}, {label}: uses subscription or connection parameters and no value of the token: \
                 any user can ask for any value. Check access in the query (e.g. `AND project_id IN (SELECT \
                 project_id FROM members WHERE user_id = auth.user_id())`), or set \
                 accept_potentially_dangerous_queries: true once that is intended"
            ));
        }
        let def_name = if several {
            format!("{name}|{k}")
        } else {
            name.to_owned()
        };
        let generated = DefinitionYaml {
            parameters: Some(OneOrMany::Many(v.parameters)),
            data: vec![v.data],
            priority: Some(priority),
            accept_potentially_dangerous_queries: true,
            chained: v.chained,
            from_stream: true,
        };
        let mut def = definition(&def_name, generated, &mut Vec::new()).map_err(|e| match e {
            RulesError::Query {
                sql: compiled,
                message,
                ..
            } => RulesError::Stream {
                stream: name.into(),
                query: label.clone(),
                sql: sql.clone(),
                message: format!("{message} (in its compiled form `{compiled}`)"),
            },
            RulesError::Definition { message, .. } | RulesError::Yaml(message) => {
                RulesError::Stream {
                    stream: name.into(),
                    query: label.clone(),
                    sql: sql.clone(),
                    message,
                }
            }
            other => other,
        })?;
        def.stream = Some(index);
        // Checks against a database name the stream's own query.
        for read in &mut def.reads {
            read.origin = format!("stream {name:?}");
            read.query = label.clone();
            read.sql = sql.clone();
        }
        defs.push(def);
    }
    Ok((
        Stream {
            name: name.to_owned(),
            auto_subscribe: yaml.auto_subscribe,
            priority,
        },
        defs,
    ))
}

/// The version of what rules mean, beyond their text: raised whenever the same rules start to
/// put rows in other buckets (2: booleans compare as 1/0, identifiers fold to lower case, `NOT
/// IN` with a null, bucket parameters of one type), so that a store built under the old meaning
/// is rebuilt like one built with other rules.
const SEMANTICS: &str = "walsync-rules-semantics-2";

/// FNV-1a (64 bits) over [`SEMANTICS`] and the rules as canonical JSON (keys sorted): stable
/// across processes and versions, and enough to notice a change (nobody is trying to collide
/// it).
fn fingerprint(text: &str) -> Result<String, RulesError> {
    let value: serde_json::Value =
        serde_yaml_ng::from_str(text).map_err(|e| RulesError::Yaml(e.to_string()))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in SEMANTICS.bytes().chain(value.to_string().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}
