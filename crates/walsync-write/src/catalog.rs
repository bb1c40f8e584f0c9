//! What PostgreSQL says of the writable tables: their columns, types and key, read once.

use std::collections::BTreeMap;

use tokio_postgres::Client;
use walsync_types::quote_ident;

/// A writable table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// The name clients use.
    pub name: String,
    /// `"schema"."table"`, quoted.
    pub qualified: String,
    /// The primary key's one column (clients' `id`).
    pub key: String,
    pub columns: BTreeMap<String, ColumnInfo>,
}

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    /// Holds JSON (`json`, `jsonb`): a string value from a client is the JSON's text.
    pub json: bool,
    /// Generated columns cannot be written.
    pub writable: bool,
    /// A boolean: compared as 1/0, as the sync stream sends it.
    pub boolean: bool,
}

impl TableInfo {
    pub fn has(&self, column: &str) -> bool {
        self.columns.contains_key(column)
    }

    /// The row that JSON text parameter `$n` holds, as jsonb for `jsonb_populate_record`: a
    /// JSON column's value sent as a string (a client keeps JSON as its text) is that text
    /// parsed by PostgreSQL, exactly (a parse into a `serde_json::Value` here would round its
    /// numbers); any other value stays as sent.
    pub(crate) fn row_json(&self, n: u8) -> String {
        let json: Vec<String> = self
            .columns
            .iter()
            .filter(|(_, c)| c.json)
            .map(|(name, _)| format!("'{}'", name.replace('\'', "''")))
            .collect();
        if json.is_empty() {
            return format!("${n}::text::jsonb");
        }
        format!(
            "(SELECT ${n}::text::jsonb || COALESCE(jsonb_object_agg(e.k, (e.v #>> '{{}}')::jsonb), '{{}}'::jsonb) \
             FROM jsonb_each(${n}::text::jsonb) e(k, v) WHERE jsonb_typeof(e.v) = 'string' AND e.k IN ({}))",
            json.join(", ")
        )
    }

    /// Every column as text, as the sync stream sends it, in the order of `columns`: an SQL
    /// array over the row `t`.
    pub(crate) fn text_array(&self) -> String {
        let items: Vec<String> = self
            .columns
            .iter()
            .map(|(name, c)| {
                let col = format!("t.{}", quote_ident(name));
                if c.boolean {
                    format!("{col}::int::text")
                } else {
                    format!("{col}::text")
                }
            })
            .collect();
        format!("ARRAY[{}]::text[]", items.join(", "))
    }
}

/// Splits a client's table name into schema and table (`public` when unqualified).
pub(crate) fn split_name(name: &str) -> (&str, &str) {
    match name.split_once('.') {
        Some((schema, table)) => (schema, table),
        None => ("public", name),
    }
}

/// `name` (`table` or `schema.table`) qualified and quoted for SQL.
pub(crate) fn quoted_name(name: &str) -> String {
    let (schema, table) = split_name(name);
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Reads `name`'s columns and key; an error names what is wrong with the table.
pub(crate) async fn load(client: &Client, name: &str) -> Result<TableInfo, String> {
    let (schema, table) = split_name(name);
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, a.attgenerated::text, \
                    COALESCE(a.attnum = ANY(i.indkey), false), COALESCE(array_length(i.indkey, 1), 0) \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(|e| format!("cannot read the columns of {name}: {e}"))?;
    if rows.is_empty() {
        return Err(format!("table {name} does not exist"));
    }
    let mut columns = BTreeMap::new();
    let mut keys = Vec::new();
    let mut key_len = 0i32;
    for row in &rows {
        let column: String = row.get(0);
        let typname: String = row.get(1);
        let generated: String = row.get(2);
        if row.get::<_, bool>(3) {
            keys.push(column.clone());
        }
        key_len = row.get(4);
        columns.insert(
            column,
            ColumnInfo {
                json: typname == "json" || typname == "jsonb",
                writable: generated.is_empty(),
                boolean: typname == "bool",
            },
        );
    }
    let key = match (keys.as_slice(), key_len) {
        ([key], 1) => key.clone(),
        (_, 0) => return Err(format!("table {name} has no primary key")),
        _ => {
            return Err(format!(
                "table {name} has a primary key of {key_len} columns; uploads need one column (the client's id)"
            ));
        }
    };
    Ok(TableInfo {
        name: name.to_owned(),
        qualified: format!("{}.{}", quote_ident(schema), quote_ident(table)),
        key,
        columns,
    })
}

/// PostgreSQL's description of the tables' columns (names, types, order), as one text: it
/// differs once a column is renamed, added, dropped or retyped. An error when a table is gone
/// or renamed.
pub(crate) async fn fingerprint(
    client: &Client,
    tables: &BTreeMap<String, TableInfo>,
) -> Result<String, String> {
    let names: Vec<&str> = tables.values().map(|t| t.qualified.as_str()).collect();
    client
        .query_one(
            "SELECT COALESCE(md5(string_agg(format('%s:%s:%s:%s', a.attrelid, a.attname, \
             a.atttypid, a.attgenerated), ',' ORDER BY a.attrelid, a.attnum)), '') \
             FROM pg_attribute a WHERE a.attrelid = ANY($1::text[]::regclass[]) \
             AND a.attnum > 0 AND NOT a.attisdropped",
            &[&names],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| {
            let detail = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned());
            format!("cannot describe the writable tables: {detail}")
        })
}
