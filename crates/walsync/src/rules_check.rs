//! `walsync rules check`: the sync rules against themselves and, given a database, against its
//! catalog — every table and column the rules name exists, every table is in the publication,
//! and the columns that fill one bucket parameter have types that give one value one bucket id
//! (an integer 42 is `[42]`, a text '42' is `["42"]`). `walsync serve` runs the same checks at
//! start and refuses rules that fail them.

// A command: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tokio_postgres::Client;
use walsync_rules::{QueryRead, SyncRules};

/// One thing wrong, pointing at the definition, the query and the offending part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the query is written: `bucket definition "x"` or `stream "s"`.
    pub origin: String,
    pub query: String,
    pub sql: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, {} `{}`: {}",
            self.origin, self.query, self.sql, self.message
        )
    }
}

/// The family a column's type gives its values in a bucket id: values of different families
/// never make the same id.
fn family(type_name: &str) -> &str {
    match type_name {
        "smallint" | "integer" | "bigint" | "boolean" => "integer",
        "real" | "double precision" => "real",
        "text" | "character varying" | "character" | "name" | "uuid" | "citext" => "text",
        t if t.starts_with("character varying(") || t.starts_with("character(") => "text",
        t if t.starts_with("numeric") => "numeric",
        other => other,
    }
}

/// A table's columns and their types (`format_type`), or `None` when it does not exist.
async fn columns_of(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<BTreeMap<String, String>>, tokio_postgres::Error> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            &[&schema, &table],
        )
        .await?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &table],
        )
        .await?;
    Ok(Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

/// Checks `rules` against the database `client` is connected to; `publication`, when given,
/// must include every table the rules read. Returns every problem found (none: the rules fit).
pub async fn check_database(
    rules: &SyncRules,
    client: &Client,
    publication: Option<&str>,
) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    let problem = |r: &QueryRead, message: String| Problem {
        origin: r.origin.clone(),
        query: r.query.clone(),
        sql: r.sql.clone(),
        message,
    };
    let published: Option<BTreeSet<(String, String)>> = match publication {
        Some(name) => Some(
            client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&name],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        ),
        None => None,
    };
    let mut tables: BTreeMap<(String, String), Option<BTreeMap<String, String>>> = BTreeMap::new();
    // Per definition and parameter: (query, table.column, type) of each column that fills it.
    type Source<'r> = (&'r QueryRead, String, String);
    let mut fills: BTreeMap<(String, String), Vec<Source<'_>>> = BTreeMap::new();
    for r in rules.reads() {
        let key = (r.schema.clone(), r.table.clone());
        if !tables.contains_key(&key) {
            let columns = columns_of(client, &r.schema, &r.table).await?;
            tables.insert(key.clone(), columns);
        }
        let Some(columns) = tables.get(&key).and_then(Option::as_ref) else {
            problems.push(problem(
                r,
                format!("table {}.{} does not exist", r.schema, r.table),
            ));
            continue;
        };
        if let (Some(published), Some(name)) = (&published, publication)
            && !published.contains(&key)
        {
            problems.push(problem(
                r,
                format!(
                    "table {}.{} is not in publication {name:?}: run ALTER PUBLICATION \"{name}\" ADD TABLE \"{}\".\"{}\"",
                    r.schema, r.table, r.schema, r.table
                ),
            ));
        }
        for c in &r.columns {
            if !columns.contains_key(c) {
                let hint = columns
                    .keys()
                    .find(|have| have.eq_ignore_ascii_case(c))
                    .map(|have| format!(" (there is {have:?}: quote it as \"{have}\")"))
                    .unwrap_or_default();
                problems.push(problem(
                    r,
                    format!(
                        "column {c:?} does not exist in {}.{}{hint}",
                        r.schema, r.table
                    ),
                ));
            }
        }
        for (parameter, column) in &r.parameter_columns {
            if let Some(ty) = columns.get(column) {
                fills
                    .entry((r.definition.clone(), parameter.clone()))
                    .or_default()
                    .push((r, format!("{}.{column}", r.table), ty.clone()));
            }
        }
    }
    for ((definition, parameter), sources) in &fills {
        // A declared type converts every value: the columns' own types do not matter.
        let declared = rules
            .definitions()
            .iter()
            .find(|d| &d.name == definition)
            .and_then(|d| d.parameter_type(parameter));
        if declared.is_some() {
            continue;
        }
        let Some((first, first_column, first_type)) = sources.first() else {
            continue;
        };
        for (r, column, ty) in &sources[1..] {
            if family(ty) != family(first_type) {
                problems.push(problem(
                    r,
                    format!(
                        "bucket parameter `{parameter}` comes from {column} ({ty}) here but from \
                         {first_column} ({first_type}) in {}: one value would make two different \
                         buckets; cast one side, e.g. `CAST({} AS {})` in the parameter query",
                        first.query,
                        first_column.rsplit('.').next().unwrap_or(first_column),
                        if family(ty) == "text" {
                            "text"
                        } else {
                            ty.as_str()
                        },
                    ),
                ));
            }
        }
    }
    Ok(problems)
}

#[derive(Debug, Args)]
pub struct RulesArgs {
    #[command(subcommand)]
    command: RulesCommand,
}

#[derive(Debug, clap::Subcommand)]
enum RulesCommand {
    /// Parse and compile sync rules, and with --postgres check them against a database: tables
    /// and columns exist, tables are published, and the columns that fill a bucket parameter
    /// agree in type. Prints every problem and exits non-zero when there is one.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The sync rules file.
    file: PathBuf,
    /// A PostgreSQL URL to check the rules against.
    #[arg(long)]
    postgres: Option<String>,
    /// The publication that must include every table the rules read (with --postgres).
    #[arg(long, default_value = "walsync")]
    publication: String,
}

pub fn run(args: RulesArgs) -> anyhow::Result<()> {
    let RulesCommand::Check(args) = args.command;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let rules = match SyncRules::from_yaml(&text) {
        Ok(r) => r,
        Err(e) => {
            println!("{}: {e}", args.file.display());
            anyhow::bail!("the sync rules are not valid");
        }
    };
    for w in rules.warnings() {
        println!("warning: {w}");
    }
    let Some(url) = &args.postgres else {
        println!(
            "{}: {} (give --postgres to check them against a database)",
            args.file.display(),
            counted(&rules)
        );
        return Ok(());
    };
    let pg: walsync_source::PgConfig = url.parse()?;
    let problems = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = pg.connect().await?;
            let exists = client
                .query_opt(
                    "SELECT 1 FROM pg_publication WHERE pubname = $1",
                    &[&args.publication],
                )
                .await?
                .is_some();
            if !exists {
                println!(
                    "publication {:?} does not exist: run CREATE PUBLICATION \"{}\" FOR TABLE {} \
                     (or give --publication; walsync serve creates it with postgres.create_publication)",
                    args.publication,
                    args.publication,
                    rules.qualified_tables().join(", ")
                );
                anyhow::bail!("no publication {:?}", args.publication);
            }
            anyhow::Ok(check_database(&rules, &client, Some(&args.publication)).await?)
        })?;
    for p in &problems {
        println!("{p}");
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "{} problem{} with the sync rules against the database",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
    }
    println!(
        "{}: {} and fit the database",
        args.file.display(),
        counted(&rules)
    );
    Ok(())
}

/// "2 bucket definitions compile", "1 stream compiles", or both.
fn counted(rules: &SyncRules) -> String {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let streams = rules.streams().len();
    let definitions = rules
        .definitions()
        .iter()
        .filter(|d| d.stream().is_none())
        .count();
    let what = match (definitions, streams) {
        (d, 0) => plural(d, "bucket definition"),
        (0, s) => plural(s, "stream"),
        (d, s) => format!(
            "{} and {}",
            plural(d, "bucket definition"),
            plural(s, "stream")
        ),
    };
    let one = definitions + streams == 1;
    format!("{what} {}", if one { "compiles" } else { "compile" })
}
