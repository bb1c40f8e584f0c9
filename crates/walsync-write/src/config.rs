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
    pub insert: Option<String>,
    pub update: Option<String>,
    pub delete: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriteConfig {
    pub mode: AuthorizationMode,
    /// The role a transaction runs as in `postgres_rls` mode (`SET LOCAL ROLE`).
    pub rls_role: Option<String>,
    /// The schema of walsync's own tables: `uploads` (one row per client transaction, for
    /// idempotent retries) and `rejected_writes` (the dead letters).
    pub schema: String,
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
