//! `[writes]` in `walsync.toml`: which tables clients may write, who may do what, and limits.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// How uploads are authorized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationMode {
    /// Each table's `insert`, `update` and `delete` predicates decide; an operation without
    /// one is denied.
    #[default]
    Rules,
    /// PostgreSQL's row-level security decides: each client transaction runs as `rls_role`
    /// with the token's claims in `request.jwt.claims` (Supabase-style policies read them
    /// through `auth.uid()`). Predicates given as well are checked as well.
    PostgresRls,
}

/// What one table allows. Each predicate is an SQL boolean expression over `old` (the row
/// before the change, all null for an insert) and `new` (the row as the client wants it:
/// the values it sent over the current row); `auth.user_id()` is the token's subject and
/// `auth.parameter('name')` one of its claims as text. It runs inside the write transaction,
/// before the change, so subqueries see the data as the change finds it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    #[serde(default, deserialize_with = "predicate")]
    pub insert: Option<String>,
    #[serde(default, deserialize_with = "predicate")]
    pub update: Option<String>,
    #[serde(default, deserialize_with = "predicate")]
    pub delete: Option<String>,
    /// How a field changed on the server since the client read it is resolved. Without this
    /// section the client's values are written as they come (client wins).
    pub conflicts: Option<ConflictRule>,
}

/// A predicate's text. `true` or `false` written bare (as an environment variable such as
/// `WALSYNC__WRITES__TABLES__NOTES__UPDATE=true` reads) is that predicate, not a type error.
fn predicate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Text(String),
        Bool(bool),
    }
    Ok(Option::<Given>::deserialize(d)?.map(|g| match g {
        Given::Text(t) => t,
        Given::Bool(b) => b.to_string(),
    }))
}

/// What to do with a field that both the client and the server changed since the values the
/// client edited from (its op's `old`, or its `_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The later edit wins: the client's (its `_last_modified_at`, else the upload's arrival)
    /// against the row's `_last_modified_at`.
    LastWriteWins,
    /// The server's value stays.
    ServerWins,
    /// The client's value is written.
    ClientWins,
    /// As a table's default: only the fields the client changed are written (a `PUT` carries
    /// the whole row), and a field changed on both sides follows its own strategy, else the
    /// later edit wins.
    MergeFields,
    /// The server's value stays and the conflict is stored, both versions, in the conflicts
    /// table, for a person to decide (resolving it is an ordinary upload).
    Manual,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictRule {
    /// The strategy of fields without one of their own.
    pub default: Strategy,
    /// Strategies of single columns.
    #[serde(default)]
    pub columns: BTreeMap<String, Strategy>,
    /// A column whose value (as text) goes into a stored conflict's `scope`, so that sync rules
    /// can give the conflict to whoever sees the row (the seed app: `project_id`).
    pub scope: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriteConfig {
    pub mode: AuthorizationMode,
    /// The role a transaction runs as in `postgres_rls` mode (`SET LOCAL ROLE`).
    pub rls_role: Option<String>,
    /// The schema of walsync's own table `uploads` (one row per client transaction, for
    /// idempotent retries).
    pub schema: String,
    /// The dead letters' table (`table` or `schema.table`), created at start: every rejected
    /// transaction, whole, with who sent it, when and why; sync rules can give its rows to
    /// their author (`WHERE user_id = bucket.user_id`) so the app can show them.
    pub rejected_table: String,
    /// The table manual conflicts are stored in (`table` or `schema.table`), created at start;
    /// sync rules can give its rows to the people concerned, and resolving one is an upload.
    pub conflicts_table: String,
    /// Writable tables by the name clients use (`table` or `schema.table`; a plain name is in
    /// `public`), with their rules.
    pub tables: BTreeMap<String, TableRule>,
    /// Ops in one request, at most.
    pub max_ops: usize,
    /// Connections to PostgreSQL for uploads.
    pub connections: usize,
    /// The statement timeout of each upload connection, and the longest a request waits for
    /// one.
    pub statement_timeout_ms: u64,
    /// What a retryable result tells the client to wait.
    pub retry_after_ms: u64,
}

impl Default for WriteConfig {
    fn default() -> WriteConfig {
        WriteConfig {
            mode: AuthorizationMode::Rules,
            rls_role: None,
            schema: "walsync".into(),
            rejected_table: "rejected_writes".into(),
            conflicts_table: "write_conflicts".into(),
            tables: BTreeMap::new(),
            max_ops: 1_000,
            connections: 8,
            statement_timeout_ms: 5_000,
            retry_after_ms: 1_000,
        }
    }
}

impl WriteConfig {
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms.max(1))
    }
}
