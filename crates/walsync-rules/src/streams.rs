//! Sync Streams (PowerSync's `streams:`): one query per table, with `auth.*`,
//! `subscription.parameter(...)` and `connection.parameter(...)` values, subqueries, one join
//! and common table expressions, **compiled into bucket definitions** — the parameter queries
//! and data queries [`crate::definition`] already compiles — so a stream's buckets are kept by
//! the same incremental parameter lookups, and nothing runs against the database at connect
//! time.
//!
//! A query's `WHERE` is put in disjunctive normal form over its request-dependent parts; each
//! branch (a *variant*) becomes one bucket definition. Within a branch each conjunct is one of:
//! - a condition on the row alone: stays in the data query;
//! - `column = <request value>`: a bucket parameter answered from the request;
//! - `<request value> = ANY(array_column)`: a bucket parameter the row's array holds;
//! - `column IN (SELECT c FROM t WHERE …)` (or `IN cte`, or a `JOIN`): a bucket parameter
//!   answered by a parameter lookup over `t`; a request value compared with the same column is
//!   folded into the subquery;
//! - a condition on request values alone: a filter of the parameter query.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use serde::Deserialize;
use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, JoinConstraint, JoinOperator, ObjectName, ObjectNamePart,
    Query, Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement, TableFactor,
    visit_expressions,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::compile::{ident, request_function};

/// A stream as the YAML writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamYaml {
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub queries: Vec<String>,
    #[serde(default)]
    pub auto_subscribe: bool,
    #[serde(default)]
    pub priority: Option<u8>,
    #[serde(default)]
    pub with: BTreeMap<String, String>,
    #[serde(default)]
    pub accept_potentially_dangerous_queries: bool,
}

/// A stream as requests see it: its name, whether clients get it without subscribing, and its
/// priority (the bucket definitions it was compiled into name it in `stream`).
#[derive(Debug, Clone)]
pub struct Stream {
    pub name: String,
    pub auto_subscribe: bool,
    pub priority: u8,
}

/// One bucket definition a stream query compiles into: its parameter queries and its data
/// query, as SQL for [`crate::definition`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Variant {
    pub parameters: Vec<String>,
    /// The queries `chain.value(N)` reads (N counts from after `parameters`).
    pub chained: Vec<String>,
    pub data: String,
    /// The variant uses client-supplied values (subscription or connection parameters)
    /// without any value of the token.
    pub unauthorized: bool,
}

/// At most this many variants per query: an `OR` of `OR`s multiplies them.
const MAX_VARIANTS: usize = 16;

/// Compiles one stream query, with the CTEs in scope (by lower-case name), into its variants.
pub(crate) fn compile_query(
    sql: &str,
    ctes: &BTreeMap<String, String>,
) -> Result<Vec<Variant>, String> {
    let sql = expand_in_cte(sql, ctes)?;
    let select = parse_select(&sql)?;
    let [from] = select.from.as_slice() else {
        return Err(if select.from.is_empty() {
            "a stream query must read a table".into()
        } else {
            "several tables in FROM are not supported: use JOIN … ON or IN (SELECT …)".into()
        });
    };
    let (table, alias) = table_factor(&from.relation)?;
    if ctes.contains_key(&object_name_key(&table)) {
        return Err(format!(
            "`{table}` is a CTE: a stream's main table must be a table"
        ));
    }
    let main = Scope {
        names: vec![alias.clone().unwrap_or_else(|| last_part(&table))],
    };
    let (levels, joined_names) = join_chain(&from.joins, &main, ctes)?;
    let joined = !levels.is_empty();
    let mut items = Vec::new();
    for item in &select.projection {
        items.push(match item {
            SelectItem::Wildcard(_) if !joined => "*".to_owned(),
            SelectItem::Wildcard(_) => {
                return Err(format!(
                    "`*` with a JOIN: name the synced table's columns, e.g. `{}.*`",
                    main.names[0]
                ));
            }
            SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), _)
                if main.owns(&last_part(n)) =>
            {
                "*".to_owned()
            }
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                if let Some(q) = qualifiers(e).into_iter().find(|q| joined_names.contains(q)) {
                    return Err(format!(
                        "`{item}` reads the joined table `{q}`: a stream syncs the columns of its own table only"
                    ));
                }
                item.to_string()
            }
            other => return Err(format!("unsupported select item `{other}`")),
        });
    }
    let branches = match &select.selection {
        Some(w) => dnf(w)?,
        None => vec![Vec::new()],
    };
    let mut variants = Vec::new();
    for conjuncts in branches {
        let mut rows = Vec::new();
        let mut levels = levels.clone();
        for c in conjuncts {
            let q = qualifiers(&c);
            let joined: Vec<usize> = joined_names
                .iter()
                .enumerate()
                .filter(|(_, n)| q.contains(n))
                .map(|(i, _)| i)
                .collect();
            let on_main = q.iter().any(|n| main.owns(n)) || has_bare_column(&c);
            match (joined.as_slice(), on_main) {
                ([], _) => rows.push(c),
                ([level], false) => levels[*level].conditions.push(c),
                _ => {
                    return Err(format!(
                        "`{c}` compares columns of two tables: put that in a JOIN's ON"
                    ));
                }
            }
        }
        // The joins, innermost first, as subqueries inside each other.
        let mut sub: Option<Sub> = None;
        for mut level in levels.into_iter().rev() {
            level.inner = sub.map(Box::new);
            sub = Some(level);
        }
        let mut row_conditions = Vec::new();
        let mut statics: Vec<(String, String, Param)> = Vec::new();
        let mut request_only = Vec::new();
        for c in rows {
            match classify(&c, ctes)? {
                Conjunct::Row => row_conditions.push(c.to_string()),
                Conjunct::Equals(column, value) => {
                    statics.push((column, value.to_string(), Param::Equals))
                }
                Conjunct::InArray(column, value) => {
                    statics.push((column, value.to_string(), Param::InArray))
                }
                Conjunct::Request => request_only.push(c.to_string()),
                Conjunct::Sub(s) => {
                    if sub.is_some() {
                        return Err(format!(
                            "`{c}`: one subquery or JOIN per branch is supported; combine the others inside it"
                        ));
                    }
                    sub = Some(s);
                }
            }
        }
        let mut chained = Vec::new();
        let (parameters, data_bindings) = match sub {
            Some(mut s) => {
                // A request value on the subquery's column is a condition of the subquery; one
                // on another column is a bucket parameter the request fills in beside the
                // subquery's (the lookup's entries hold the subquery's values).
                let mut extra = Vec::new();
                let mut bindings = vec![format!("{} = bucket.p0", s.column)];
                for (column, value, kind) in statics {
                    if column == s.column && kind == Param::Equals {
                        s.conditions_text.push(format!("{} = {value}", s.selected));
                    } else {
                        let p = extra.len() + 1;
                        extra.push(format!("{value} AS p{p}"));
                        bindings.push(match kind {
                            Param::Equals => format!("{column} = bucket.p{p}"),
                            Param::InArray => format!("bucket.p{p} = ANY({column})"),
                        });
                    }
                }
                s.conditions_text.extend(request_only);
                let parameter = sub_sql(&s, "p0", &extra, &mut chained);
                (vec![parameter], bindings)
            }
            None => {
                let mut outputs = Vec::new();
                let mut bindings = Vec::new();
                for (i, (column, value, kind)) in statics.iter().enumerate() {
                    outputs.push(format!("{value} AS p{i}"));
                    bindings.push(match kind {
                        Param::Equals => format!("{column} = bucket.p{i}"),
                        Param::InArray => format!("bucket.p{i} = ANY({column})"),
                    });
                }
                let filter = request_only
                    .iter()
                    .map(|c| format!("({c})"))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let parameters = match (outputs.is_empty(), filter.is_empty()) {
                    (true, true) => Vec::new(),
                    // A condition on the request alone, no parameter: the bucket is one for
                    // everybody it admits.
                    (true, false) => vec![format!("SELECT 1 AS p0 WHERE {filter}")],
                    (false, true) => vec![format!("SELECT {}", outputs.join(", "))],
                    (false, false) => {
                        vec![format!("SELECT {} WHERE {filter}", outputs.join(", "))]
                    }
                };
                if outputs.is_empty() && !filter.is_empty() {
                    bindings.push("bucket.p0 = 1".into());
                }
                (parameters, bindings)
            }
        };
        let mut conditions: Vec<String> = row_conditions.iter().map(|c| format!("({c})")).collect();
        conditions.extend(data_bindings);
        // Without the alias: a stream's rows keep their table's name on clients (an alias
        // only names the table in the query; qualified columns are read by their names).
        let data = format!(
            "SELECT {} FROM {table}{}",
            items.join(", "),
            if conditions.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conditions.join(" AND "))
            }
        );
        // What the parameter queries read of the request: client values with nothing of the
        // token let anyone ask for anything.
        let request_text = parameters
            .iter()
            .chain(&chained)
            .map(|q| q.to_lowercase())
            .collect::<Vec<_>>()
            .join(" ");
        let client_values = request_text.contains("subscription.")
            || request_text.contains("connection.")
            || request_text.contains("request.parameters");
        let token_values = request_text.contains("auth.")
            || request_text.contains("request.user_id")
            || request_text.contains("request.jwt");
        variants.push(Variant {
            parameters,
            chained,
            data,
            unauthorized: client_values && !token_values,
        });
        if variants.len() > MAX_VARIANTS {
            return Err(format!(
                "the WHERE clause has more than {MAX_VARIANTS} OR branches over request values"
            ));
        }
    }
    Ok(variants)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    Equals,
    InArray,
}

/// `column IN (SELECT selected FROM table AS alias WHERE conditions)`; `inner` is a subquery
/// (or the next join) inside it, on a column of `table`.
#[derive(Debug, Clone)]
struct Sub {
    column: String,
    selected: String,
    table: String,
    alias: Option<String>,
    conditions: Vec<Expr>,
    conditions_text: Vec<String>,
    inner: Option<Box<Sub>>,
}

/// The parameter query of `s` selecting its value as `output`; each subquery inside it becomes
/// one of `chained` (numbered after the definition's one parameter query), which it reads with
/// `chain.value(N)`.
fn sub_sql(s: &Sub, output: &str, extra: &[String], chained: &mut Vec<String>) -> String {
    let mut conditions: Vec<String> = s.conditions.iter().map(|c| format!("({c})")).collect();
    conditions.extend(s.conditions_text.iter().map(|c| format!("({c})")));
    if let Some(inner) = &s.inner {
        let slot = chained.len();
        chained.push(String::new());
        chained[slot] = sub_sql(inner, "v", &[], chained);
        conditions.push(format!("{} = chain.value({})", inner.column, slot + 1));
    }
    format!(
        "SELECT {} AS {output}{} FROM {}{}{}",
        s.selected,
        extra.iter().map(|e| format!(", {e}")).collect::<String>(),
        s.table,
        s.alias
            .as_ref()
            .map(|a| format!(" AS {a}"))
            .unwrap_or_default(),
        if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        }
    )
}

enum Conjunct {
    Row,
    Equals(String, Expr),
    InArray(String, Expr),
    Request,
    Sub(Sub),
}

/// The names a query's own table answers to (its alias, or its name).
struct Scope {
    names: Vec<String>,
}

impl Scope {
    fn owns(&self, qualifier: &str) -> bool {
        self.names.iter().any(|n| n == qualifier)
    }
}

fn parse_select(sql: &str) -> Result<Box<Select>, String> {
    let statements =
        Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| format!("cannot parse: {e}"))?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err("expected exactly one SELECT".into());
    };
    select_of(query)
}

fn select_of(query: &Query) -> Result<Box<Select>, String> {
    crate::compile::plain_select(query)?;
    match query.body.as_ref() {
        SetExpr::Select(s) => Ok(s.clone()),
        other => Err(format!(
            "unsupported query `{other}`: expected a plain SELECT"
        )),
    }
}

fn table_factor(t: &TableFactor) -> Result<(ObjectName, Option<String>), String> {
    match t {
        TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } => Ok((name.clone(), alias.as_ref().map(|a| ident(&a.name)))),
        other => Err(format!(
            "unsupported FROM item `{other}`: only a table is allowed"
        )),
    }
}

fn last_part(n: &ObjectName) -> String {
    match n.0.last() {
        Some(ObjectNamePart::Identifier(i)) => ident(i),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// The key a table name has among the CTEs: its only part, folded like an identifier.
fn object_name_key(n: &ObjectName) -> String {
    match n.0.as_slice() {
        [ObjectNamePart::Identifier(i)] => ident(i),
        _ => String::new(),
    }
}

/// `IN cte_name` (PowerSync's short form) becomes `IN (SELECT * FROM cte_name)`.
fn expand_in_cte(sql: &str, ctes: &BTreeMap<String, String>) -> Result<String, String> {
    if ctes.is_empty() {
        return Ok(sql.to_owned());
    }
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize()
        .map_err(|e| format!("cannot parse: {e}"))?;
    let significant = |from: usize| {
        tokens[from..]
            .iter()
            .position(|t| !matches!(t, Token::Whitespace(_)))
            .map(|p| p + from)
    };
    let mut out = String::with_capacity(sql.len() + 32);
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        out.push_str(&t.to_string());
        if let Token::Word(w) = t
            && w.quote_style.is_none()
            && w.value.eq_ignore_ascii_case("in")
            && let Some(n) = significant(i + 1)
            && let Token::Word(name) = &tokens[n]
            && ctes.contains_key(&match name.quote_style {
                Some(_) => name.value.clone(),
                None => name.value.to_lowercase(),
            })
            && !matches!(
                significant(n + 1).map(|k| &tokens[k]),
                Some(Token::LParen | Token::Period)
            )
        {
            for between in &tokens[i + 1..n] {
                out.push_str(&between.to_string());
            }
            out.push_str(&format!("(SELECT * FROM {name})"));
            i = n + 1;
            continue;
        }
        i += 1;
    }
    Ok(out)
}

/// The `JOIN`s as subqueries, outermost first (each joined on a column of the table before
/// it: the synced table, then the previous join), and the names each joined table answers to.
fn join_chain(
    joins: &[sqlparser::ast::Join],
    main: &Scope,
    ctes: &BTreeMap<String, String>,
) -> Result<(Vec<Sub>, Vec<String>), String> {
    let mut levels: Vec<Sub> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for j in joins {
        let (JoinOperator::Join(JoinConstraint::On(on))
        | JoinOperator::Inner(JoinConstraint::On(on))) = &j.join_operator
        else {
            return Err("only an inner JOIN … ON is supported".into());
        };
        let (table, alias) = table_factor(&j.relation)?;
        let joined = alias.clone().unwrap_or_else(|| last_part(&table));
        let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = unnest(on)
        else {
            return Err(format!(
                "JOIN … ON `{on}`: join on one equality of a column of each table"
            ));
        };
        let side = |e: &Expr| match unnest(e) {
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                Some((ident(&parts[0]), ident(&parts[1])))
            }
            _ => None,
        };
        let (Some(l), Some(r)) = (side(left), side(right)) else {
            return Err(format!(
                "JOIN … ON `{on}`: name both columns with their table, e.g. `a.x = b.y`"
            ));
        };
        // The table this one hangs on: the synced table for the first join, the previous join
        // for the others (joins form a chain).
        let previous = |name: &str| match names.last() {
            None => main.owns(name),
            Some(p) => p == name,
        };
        let (before, theirs) = if previous(&l.0) && r.0 == joined {
            (l.1, r.1)
        } else if previous(&r.0) && l.0 == joined {
            (r.1, l.1)
        } else {
            return Err(format!(
                "JOIN … ON `{on}`: compare a column of `{joined}` with one of {}: joins must form a chain from the synced table",
                names
                    .last()
                    .map_or("the synced table".to_owned(), |p| format!("`{p}`"))
            ));
        };
        levels.push(match ctes.get(&object_name_key(&table)) {
            // A joined CTE: its one table and conditions, its column selected. Conditions of
            // the outer query on the CTE's columns join them (a qualified column is read by its
            // name).
            Some(cte) => cte_sub(cte, &before, Some(&theirs), ctes, 0)?,
            None => Sub {
                column: before,
                selected: format!("{joined}.{theirs}"),
                table: table.to_string(),
                alias: Some(joined.clone()),
                conditions: Vec::new(),
                conditions_text: Vec::new(),
                inner: None,
            },
        });
        names.push(joined);
    }
    Ok((levels, names))
}

/// A CTE used as `IN (SELECT [column|*] FROM cte)` or joined on `column`: the CTE's own
/// subquery, its single output selected.
fn cte_sub(
    cte: &str,
    column: &str,
    wanted: Option<&str>,
    ctes: &BTreeMap<String, String>,
    depth: usize,
) -> Result<Sub, String> {
    let select = parse_select(&expand_in_cte(cte, ctes)?).map_err(|e| format!("in a CTE: {e}"))?;
    let [output] = select.projection.as_slice() else {
        return Err(format!(
            "the CTE `{cte}` returns several columns: select one, e.g. IN (SELECT col FROM cte)"
        ));
    };
    let (expr, name) = match output {
        SelectItem::UnnamedExpr(e) => (e.clone(), column_of(e).unwrap_or_default()),
        SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), ident(alias)),
        other => {
            return Err(format!(
                "the CTE `{cte}` must select one column, not `{other}`"
            ));
        }
    };
    if let Some(w) = wanted
        && w != "*"
        && w != name
    {
        return Err(format!("the CTE `{cte}` returns `{name}`, not `{w}`"));
    }
    let [from] = select.from.as_slice() else {
        return Err(format!("the CTE `{cte}` must read one table"));
    };
    if !from.joins.is_empty() {
        return Err(format!(
            "the CTE `{cte}`: JOIN inside a CTE is not supported"
        ));
    }
    let (table, alias) = table_factor(&from.relation)?;
    let (conditions, inner) = subquery_conditions(&select, ctes, depth)?;
    Ok(Sub {
        column: column.to_owned(),
        selected: expr.to_string(),
        table: table.to_string(),
        alias,
        conditions,
        conditions_text: Vec::new(),
        inner,
    })
}

/// Subqueries inside subqueries (and CTEs using CTEs) at most this deep.
const MAX_DEPTH: usize = 8;

/// The conjuncts of a subquery's (or CTE's) `WHERE`, and the one subquery among them
/// (`column IN (SELECT …)`), which becomes a chained lookup.
fn subquery_conditions(
    select: &Select,
    ctes: &BTreeMap<String, String>,
    depth: usize,
) -> Result<(Vec<Expr>, Option<Box<Sub>>), String> {
    let mut conditions = Vec::new();
    let mut inner = None;
    for c in select.selection.as_ref().map(conjuncts).unwrap_or_default() {
        if !has_subquery(&c) {
            conditions.push(c);
            continue;
        }
        let Expr::In {
            expr,
            target: InTarget::Subquery(q),
            negated: false,
            ..
        } = unnest(&c)
        else {
            return Err(format!(
                "`{c}`: inside a subquery, only `column IN (SELECT …)` may hold another subquery"
            ));
        };
        let Some(column) = column_of(expr) else {
            return Err(format!(
                "`{c}`: the left side of IN (SELECT …) must be a column"
            ));
        };
        if inner.is_some() {
            return Err(format!(
                "`{c}`: one subquery inside a subquery is supported; combine the others in it"
            ));
        }
        if depth >= MAX_DEPTH {
            return Err(format!(
                "`{c}`: subqueries nest deeper than {MAX_DEPTH} (a CTE that uses itself?)"
            ));
        }
        inner = Some(Box::new(sub_of(&column, q, ctes, depth + 1)?));
    }
    Ok((conditions, inner))
}

fn classify(c: &Expr, ctes: &BTreeMap<String, String>) -> Result<Conjunct, String> {
    let request = has_request(c);
    let subquery = has_subquery(c);
    if !request && !subquery {
        return Ok(Conjunct::Row);
    }
    match unnest(c) {
        Expr::In {
            expr,
            target: InTarget::Subquery(subquery),
            negated: false,
            ..
        } => {
            let Some(column) = column_of(expr) else {
                return Err(format!(
                    "`{c}`: the left side of IN (SELECT …) must be a column"
                ));
            };
            return sub_of(&column, subquery, ctes, 0).map(Conjunct::Sub);
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } if !subquery => {
            for (a, b) in [(left, right), (right, left)] {
                if let Some(column) = column_of(a)
                    && is_request_value(b)
                {
                    return Ok(Conjunct::Equals(column, (**b).clone()));
                }
            }
        }
        Expr::AnyOp {
            left,
            compare_op: BinaryOperator::Eq,
            right,
            ..
        } if !subquery => {
            if let Some(column) = column_of(right)
                && is_request_value(left)
            {
                return Ok(Conjunct::InArray(column, (**left).clone()));
            }
        }
        _ => {}
    }
    if !subquery && !has_column(c) {
        return Ok(Conjunct::Request);
    }
    Err(format!(
        "unsupported condition `{c}`: compare a column with a request value (`=`), test a request value against an array column (`= ANY(…)`), use `column IN (SELECT …)`, or test request values alone"
    ))
}

/// `column IN (subquery)`, where the subquery reads one table (or a CTE) and selects one column.
fn sub_of(
    column: &str,
    query: &Query,
    ctes: &BTreeMap<String, String>,
    depth: usize,
) -> Result<Sub, String> {
    let select = select_of(query)?;
    let [from] = select.from.as_slice() else {
        return Err(format!("`{query}`: a subquery must read one table"));
    };
    if !from.joins.is_empty() {
        return Err(format!(
            "`{query}`: JOIN inside a subquery is not supported"
        ));
    }
    let (table, alias) = table_factor(&from.relation)?;
    let [output] = select.projection.as_slice() else {
        return Err(format!(
            "`{query}`: a subquery must select exactly one column"
        ));
    };
    let (conditions, inner) = subquery_conditions(&select, ctes, depth)?;
    if let Some(cte) = ctes.get(&object_name_key(&table)) {
        let wanted = match output {
            SelectItem::Wildcard(_) => "*".to_owned(),
            SelectItem::UnnamedExpr(e) => column_of(e).unwrap_or_default(),
            other => return Err(format!("`{other}`: select the CTE's column by its name")),
        };
        if !conditions.is_empty() || inner.is_some() {
            return Err(format!(
                "`{query}`: conditions on a CTE's rows are not supported; put them in the CTE"
            ));
        }
        if depth >= MAX_DEPTH {
            return Err(format!(
                "`{query}`: subqueries nest deeper than {MAX_DEPTH} (a CTE that uses itself?)"
            ));
        }
        return cte_sub(cte, column, Some(&wanted), ctes, depth + 1);
    }
    let selected = match output {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e.to_string(),
        SelectItem::Wildcard(_) => {
            return Err(format!(
                "`{query}`: a subquery over a table must name its column"
            ));
        }
        other => return Err(format!("unsupported select item `{other}` in a subquery")),
    };
    Ok(Sub {
        column: column.to_owned(),
        selected,
        table: table.to_string(),
        alias,
        conditions,
        conditions_text: Vec::new(),
        inner,
    })
}

fn unnest(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => unnest(inner),
        other => other,
    }
}

/// A plain column reference: `c` or `t.c`.
fn column_of(e: &Expr) -> Option<String> {
    match unnest(e) {
        Expr::Identifier(i) => Some(ident(i)),
        Expr::CompoundIdentifier(parts) if parts.len() == 2 => Some(ident(&parts[1])),
        _ => None,
    }
}

fn conjuncts(e: &Expr) -> Vec<Expr> {
    match unnest(e) {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut v = conjuncts(left);
            v.extend(conjuncts(right));
            v
        }
        other => vec![other.clone()],
    }
}

/// The branches of `e` as lists of conjuncts, splitting only `OR`s over request values or
/// subqueries (an `OR` of row conditions stays one condition of the data query).
fn dnf(e: &Expr) -> Result<Vec<Vec<Expr>>, String> {
    if !has_request(e) && !has_subquery(e) {
        return Ok(vec![vec![e.clone()]]);
    }
    Ok(match unnest(e) {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let (l, r) = (dnf(left)?, dnf(right)?);
            if l.len() * r.len() > MAX_VARIANTS {
                return Err(format!(
                    "the WHERE clause has more than {MAX_VARIANTS} OR branches over request values"
                ));
            }
            let mut out = Vec::new();
            for a in &l {
                for b in &r {
                    let mut both = a.clone();
                    both.extend(b.iter().cloned());
                    out.push(both);
                }
            }
            out
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Or,
            right,
        } => {
            let mut out = dnf(left)?;
            out.extend(dnf(right)?);
            out
        }
        other => vec![vec![other.clone()]],
    })
}

fn any_expr(e: &Expr, mut f: impl FnMut(&Expr) -> bool) -> bool {
    visit_expressions(e, |x| {
        if f(x) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .is_break()
}

fn has_request(e: &Expr) -> bool {
    any_expr(
        e,
        |x| matches!(x, Expr::Function(f) if request_function(f).is_some()),
    )
}

fn has_subquery(e: &Expr) -> bool {
    any_expr(e, |x| {
        matches!(
            x,
            Expr::Subquery(_)
                | Expr::Exists { .. }
                | Expr::In {
                    target: InTarget::Subquery(_) | InTarget::Table { .. },
                    ..
                }
        )
    })
}

fn has_column(e: &Expr) -> bool {
    any_expr(e, |x| {
        matches!(x, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
    })
}

fn has_bare_column(e: &Expr) -> bool {
    any_expr(e, |x| matches!(x, Expr::Identifier(_)))
}

/// The tables `e`'s qualified columns name (`t` of `t.c`).
fn qualifiers(e: &Expr) -> Vec<String> {
    let mut out = Vec::new();
    let _ = visit_expressions(e, |x| {
        if let Expr::CompoundIdentifier(parts) = x
            && parts.len() == 2
        {
            out.push(ident(&parts[0]));
        }
        ControlFlow::<()>::Continue(())
    });
    out
}

/// A value of the request alone: request functions, literals, casts and JSON operators, no
/// column.
fn is_request_value(e: &Expr) -> bool {
    has_request(e) && !has_column(e) && !has_subquery(e)
}
