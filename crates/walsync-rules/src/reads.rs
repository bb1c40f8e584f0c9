//! What the rules read from the database, query by query: the tables and columns they name and
//! the columns that fill bucket parameters. `walsync rules check --postgres` holds these against
//! a database's catalog (every table and column exists, is published, and the columns that fill
//! one bucket parameter have types that make one bucket id of one value).

use std::collections::BTreeSet;

use crate::compile::TableMatch;
use crate::expr::{Filter, Operand};

/// One query's reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRead {
    /// The bucket definition the query compiled into (a stream's have names of their own).
    pub definition: String,
    /// Where the query is written, as errors name it: `bucket definition "x"` or `stream "s"`.
    pub origin: String,
    /// `parameter query N` or `data query N` (a stream's: `query N`).
    pub query: String,
    pub sql: String,
    pub schema: String,
    pub table: String,
    /// Every column the query names (`*` names none).
    pub columns: BTreeSet<String>,
    /// The bucket parameters the query fills straight from a column, as (parameter, column).
    pub parameter_columns: Vec<(String, String)>,
}

impl QueryRead {
    /// The reads of a query over `table` whose items are `operands` and filter `filter`; the
    /// parameter columns are the caller's to fill.
    pub(crate) fn of<'o>(
        definition: &str,
        query: String,
        sql: &str,
        table: &TableMatch,
        operands: impl Iterator<Item = &'o Operand>,
        filter: &Filter,
    ) -> QueryRead {
        let mut columns = BTreeSet::new();
        operands.for_each(|o| operand_columns(o, &mut columns));
        filter_columns(filter, &mut columns);
        QueryRead {
            definition: definition.to_owned(),
            origin: format!("bucket definition {definition:?}"),
            query,
            sql: sql.to_owned(),
            schema: table.schema.clone(),
            table: table.name.clone(),
            columns,
            parameter_columns: Vec::new(),
        }
    }
}

/// The columns `o` reads.
fn operand_columns(o: &Operand, out: &mut BTreeSet<String>) {
    match o {
        Operand::Column(c) => {
            out.insert(c.clone());
        }
        Operand::Cast(inner, _) | Operand::Json { base: inner, .. } => {
            operand_columns(inner, out);
        }
        Operand::Literal(_) | Operand::Unknown(_) => {}
    }
}

/// The columns `f` reads.
fn filter_columns(f: &Filter, out: &mut BTreeSet<String>) {
    match f {
        Filter::True => {}
        Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|f| filter_columns(f, out)),
        Filter::Eq(a, b) | Filter::NotEq(a, b) | Filter::InArray(a, b) => {
            operand_columns(a, out);
            operand_columns(b, out);
        }
        Filter::IsNull { operand, .. } => operand_columns(operand, out),
        Filter::InList { operand, list, .. } => {
            operand_columns(operand, out);
            list.iter().for_each(|o| operand_columns(o, out));
        }
    }
}

/// The bucket parameters a data query's filter binds straight to a column (`bucket.p = col`),
/// as (parameter, column).
pub(crate) fn bound_columns(f: &Filter, out: &mut Vec<(String, String)>) {
    match f {
        Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|f| bound_columns(f, out)),
        Filter::Eq(Operand::Unknown(u), Operand::Column(c))
        | Filter::Eq(Operand::Column(c), Operand::Unknown(u)) => {
            if let Some(p) = u.strip_prefix("bucket.") {
                let pair = (p.to_owned(), c.clone());
                if !out.contains(&pair) {
                    out.push(pair);
                }
            }
        }
        _ => {}
    }
}
