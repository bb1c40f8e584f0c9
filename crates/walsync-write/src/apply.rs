//! Applying uploads: validation, the transaction, authorization, bookkeeping.

mod bookkeeping;
mod fast;
mod step;
mod tables;

use fast::write_checkpoint;
use tables::Catalog;

use std::collections::BTreeMap;
use std::sync::Arc;

use deadpool::managed::PoolError;
use serde_json::{Map, Value};
use walsync_types::quote_ident;

use crate::catalog::{self, TableInfo};
use crate::config::{AuthorizationMode, ConflictRule, WriteConfig};
use crate::pool::PgConn;
use crate::predicate::Predicate;
use crate::session::Session;
use crate::{ClientTransaction, ConflictNote, CrudEntry, CrudOp, Status, TxResult, UploadReply};
use crate::{PgPool, UploadError, UploadRequest, WriteError};

/// Who is writing: the token's subject and claims.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    pub user_id: &'a str,
    pub claims: &'a Value,
}

/// A table's predicates, parsed.
#[derive(Debug, Clone, Default)]
struct TableRules {
    insert: Option<Predicate>,
    update: Option<Predicate>,
    delete: Option<Predicate>,
    conflicts: Option<ConflictRule>,
}

/// Applies uploads to the source database.
pub struct Uploads {
    pub(crate) config: WriteConfig,
    pool: PgPool,
    rules: BTreeMap<String, TableRules>,
    /// The statements on walsync's own tables, made once from the configuration.
    pub(crate) sql: Bookkeeping,
    /// The catalog of the writable tables, read once PostgreSQL first answers and again when a
    /// write finds it out of date (a column renamed or added since). Every upload reads it;
    /// only loading it waits, for `loading`.
    tables: std::sync::RwLock<Option<Arc<Catalog>>>,
    /// Held while the catalog is read from PostgreSQL: by one request at a time.
    loading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The SQL of walsync's own tables.
#[derive(Debug)]
pub(crate) struct Bookkeeping {
    /// The claim of a client transaction, after its ops (see [`Uploads::claim_sql`]).
    claim: String,
    /// walsync's uploads table, qualified and quoted.
    uploads: String,
    /// The conflicts table, qualified and quoted.
    conflicts: String,
    /// The dead letters' table, qualified and quoted.
    pub(crate) rejected: String,
}

/// Columns walsync fills itself when a table has them (a client's values are ignored).
const LAST_MODIFIED_BY: &str = "_last_modified_by";
const LAST_MODIFIED_AT: &str = "_last_modified_at";
const VERSION: &str = "_version";

/// Why a transaction was not applied.
#[derive(Debug)]
pub(crate) enum Failure {
    Reject {
        code: &'static str,
        message: String,
        op_id: Option<i64>,
        /// The cause may be walsync's catalog being out of date (an unknown column, a statement
        /// PostgreSQL says names what does not exist): worth one more try on a fresh catalog.
        stale: bool,
    },
    Retry(String),
    /// The claim found the transaction received before: everything sent with it is rolled
    /// back, and the earlier result stands.
    ReceivedBefore,
}

impl Failure {
    pub(crate) fn message(self) -> String {
        match self {
            Failure::Reject { message, .. } | Failure::Retry(message) => message,
            Failure::ReceivedBefore => "the transaction was received before".into(),
        }
    }
}

fn reject(code: &'static str, message: impl Into<String>, op_id: Option<i64>) -> Failure {
    Failure::Reject {
        code,
        message: message.into(),
        op_id,
        stale: false,
    }
}

/// A rejected transaction's result.
pub(crate) fn rejected(
    tx_id: Option<i64>,
    code: &str,
    message: String,
    op_id: Option<i64>,
) -> TxResult {
    TxResult {
        tx_id,
        status: Status::Rejected,
        code: Some(code.to_owned()),
        message: Some(message),
        op_id,
        retry_after_ms: None,
        replayed: false,
        conflicts: Vec::new(),
    }
}

/// Sorts a PostgreSQL error into final or passing. Messages are PostgreSQL's own (they name
/// constraints and columns; the values are in the detail, which is not passed on).
fn classify(e: &tokio_postgres::Error, op_id: Option<i64>) -> Failure {
    let Some(db) = e.as_db_error() else {
        return Failure::Retry("the connection to postgres was lost".into());
    };
    let code = db.code().code();
    let message = db.message().to_owned();
    let passing = ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c))
        || matches!(code, "40001" | "40P01" | "55P03" | "55006");
    if passing {
        return Failure::Retry(message);
    }
    // An undefined column or table, a cached plan whose result changed, a changed type.
    let stale = matches!(code, "42703" | "42P01" | "0A000" | "42804");
    let kind = match code {
        "42501" => "denied",
        c if c.starts_with("23") => "constraint_violation",
        c if c.starts_with("22") => "invalid_value",
        "P0001" => "rejected_by_database",
        c if c.starts_with("42") => "invalid",
        _ => "database_error",
    };
    Failure::Reject {
        code: kind,
        message,
        op_id,
        stale,
    }
}

/// One op, checked against the catalog: what to run.
pub(crate) struct Intent<'t> {
    op: &'t CrudEntry,
    table: &'t TableInfo,
    rules: &'t TableRules,
    /// `{key: id}`: finds the row.
    key: String,
    /// The client's values (normalized), with the columns walsync fills.
    data: Map<String, Value>,
    /// The `_version` and `_last_modified_at` the client sent (of the row it edited from, and
    /// of its edit), for conflicts.
    client_version: Option<Value>,
    client_time: Option<Value>,
}

impl Intent<'_> {
    /// The row as the JSON parameter of its statement: `data` (the client's values, or what a
    /// conflict left of them) with the key.
    fn row(&self, data: &Map<String, Value>) -> String {
        let mut row = data.clone();
        row.insert(self.table.key.clone(), Value::from(self.op.id.as_str()));
        Value::Object(row).to_string()
    }
}

impl Uploads {
    /// Parses every predicate: a configuration that cannot work fails here, at start-up.
    pub fn new(config: WriteConfig, pool: PgPool) -> Result<Uploads, WriteError> {
        if config.mode == AuthorizationMode::PostgresRls && config.rls_role.is_none() {
            return Err(WriteError::Config(
                "mode postgres_rls needs rls_role, the role transactions run as".into(),
            ));
        }
        if config.schema.is_empty() {
            return Err(WriteError::Config("schema must not be empty".into()));
        }
        let mut rules = BTreeMap::new();
        for (table, rule) in &config.tables {
            let parse = |operation: &'static str, sql: &Option<String>| {
                sql.as_deref()
                    .map(Predicate::parse)
                    .transpose()
                    .map_err(|problem| WriteError::Predicate {
                        table: table.clone(),
                        operation,
                        problem,
                    })
            };
            rules.insert(
                table.clone(),
                TableRules {
                    insert: parse("insert", &rule.insert)?,
                    update: parse("update", &rule.update)?,
                    delete: parse("delete", &rule.delete)?,
                    conflicts: rule.conflicts.clone(),
                },
            );
        }
        let uploads = format!("{}.uploads", quote_ident(&config.schema));
        let sql = Bookkeeping {
            claim: Uploads::claim_sql(&uploads),
            uploads,
            conflicts: catalog::quoted_name(&config.conflicts_table),
            rejected: catalog::quoted_name(&config.rejected_table),
        };
        Ok(Uploads {
            config,
            pool,
            rules,
            sql,
            tables: std::sync::RwLock::new(None),
            loading: tokio::sync::Mutex::new(()),
        })
    }

    pub fn config(&self) -> &WriteConfig {
        &self.config
    }

    /// Reads the writable tables from the catalog, creates walsync's own tables and has
    /// PostgreSQL check every predicate (a column or table a predicate names that does not
    /// exist fails here). Done at start-up when PostgreSQL answers, else at the first upload.
    pub async fn prepare(&self) -> Result<(), WriteError> {
        self.catalog().await.map(|_| ())
    }

    /// Applies `request`'s transactions in order. A transaction that cannot be tried now
    /// (retryable) stops the batch: the ones after it are not attempted, so that a client's
    /// transactions reach PostgreSQL in its order. Returns the reply and the write checkpoint
    /// (a source position) of the last transaction applied.
    pub async fn upload(
        &self,
        writer: Writer<'_>,
        request: &UploadRequest,
    ) -> Result<(UploadReply, Option<u64>), UploadError> {
        if request.client_id.is_empty() || request.client_id.len() > 256 {
            return Err(UploadError::BadRequest(
                "client_id must be 1 to 256 characters".into(),
            ));
        }
        let ops: usize = request.batch.iter().map(|t| t.ops.len()).sum();
        if ops > self.config.max_ops {
            return Err(UploadError::TooLarge(format!(
                "the batch has {ops} ops; at most {} are taken in one request",
                self.config.max_ops
            )));
        }
        let mut reply = UploadReply::default();
        let mut checkpoint = None;
        let mut tables = match self.catalog().await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "uploads cannot be applied now");
                None
            }
        };
        let mut stopped = false;
        for tx in &request.batch {
            let result = match (&mut tables, stopped) {
                (Some(tables), false) => {
                    let (result, lsn) = self
                        .transaction(writer, &request.client_id, tx, tables)
                        .await;
                    checkpoint = checkpoint.max(lsn);
                    result
                }
                (None, _) => {
                    self.retryable(tx, "database_unavailable", "postgres is not reachable")
                }
                (_, true) => self.retryable(
                    tx,
                    "not_attempted",
                    "an earlier transaction of this batch must be applied first",
                ),
            };
            stopped |= result.status == Status::Retryable;
            reply.results.push(result);
        }
        reply.write_checkpoint = checkpoint.map(|c| c.to_string());
        Ok((reply, checkpoint))
    }

    fn retryable(&self, tx: &ClientTransaction, code: &str, message: &str) -> TxResult {
        TxResult {
            tx_id: tx.tx_id,
            status: Status::Retryable,
            code: Some(code.to_owned()),
            message: Some(message.to_owned()),
            op_id: None,
            retry_after_ms: Some(self.config.retry_after_ms),
            replayed: false,
            conflicts: Vec::new(),
        }
    }

    async fn attempt(
        &self,
        writer: Writer<'_>,
        client_id: &str,
        tx: &ClientTransaction,
        tables: &BTreeMap<String, TableInfo>,
    ) -> Result<Applied, Failure> {
        let intents = self.intents(writer, tx, tables)?;
        self.apply(writer, client_id, &tx.key(), tx.tx_id, &intents)
            .await
    }

    /// One client transaction: its result, and its write checkpoint when it was applied now.
    async fn transaction(
        &self,
        writer: Writer<'_>,
        client_id: &str,
        tx: &ClientTransaction,
        tables: &mut Arc<BTreeMap<String, TableInfo>>,
    ) -> (TxResult, Option<u64>) {
        let mut outcome = self.attempt(writer, client_id, tx, tables).await;
        // What walsync's catalog may have caused (a column renamed or added since it was read)
        // is tried once more on a fresh catalog, which the rest of the batch uses too.
        if let Err(Failure::Reject { stale: true, .. }) = outcome
            && let Some(fresh) = self.reread_catalog(tables).await
        {
            *tables = fresh;
            outcome = self.attempt(writer, client_id, tx, tables).await;
        }
        match outcome {
            Ok(Applied::Now(lsn, conflicts)) => (
                TxResult {
                    conflicts,
                    ..TxResult::applied(tx.tx_id)
                },
                Some(lsn),
            ),
            Ok(Applied::Before(mut result)) => {
                result.replayed = true;
                (result, None)
            }
            Err(f @ (Failure::Retry(_) | Failure::ReceivedBefore)) => {
                let message = f.message();
                tracing::info!(reason = %message, "an upload can be retried");
                (self.retryable(tx, "database_unavailable", &message), None)
            }
            Err(Failure::Reject {
                code,
                message,
                op_id,
                ..
            }) => {
                let result = rejected(tx.tx_id, code, message, op_id);
                // Kept whole before the client is told: a rejection that cannot be recorded is
                // retryable, so nothing is dropped unrecorded.
                match self.record_rejection(writer, client_id, tx, &result).await {
                    Ok(Applied::Before(earlier)) => (
                        TxResult {
                            replayed: true,
                            ..earlier
                        },
                        None,
                    ),
                    Ok(Applied::Now(lsn, _)) => {
                        tracing::info!(code, "an upload was rejected");
                        (result, Some(lsn))
                    }
                    Err(message) => (self.retryable(tx, "database_unavailable", &message), None),
                }
            }
        }
    }

    /// Checks every op against the catalog and the configuration, before PostgreSQL is
    /// touched.
    pub(crate) fn intents<'t>(
        &'t self,
        writer: Writer<'_>,
        tx: &'t ClientTransaction,
        tables: &'t BTreeMap<String, TableInfo>,
    ) -> Result<Vec<Intent<'t>>, Failure> {
        if tx.ops.is_empty() {
            return Err(reject("invalid", "the transaction has no ops", None));
        }
        tx.ops
            .iter()
            .map(|op| {
                let id = Some(op.op_id);
                let (Some(table), Some(rules)) = (tables.get(&op.table), self.rules.get(&op.table))
                else {
                    return Err(reject(
                        "invalid",
                        format!("table {:?} is not writable", op.table),
                        id,
                    ));
                };
                if op.id.is_empty() || op.id.len() > 1024 {
                    return Err(reject("invalid", "an id must be 1 to 1024 characters", id));
                }
                let mut data = Map::new();
                if op.op != CrudOp::Delete {
                    for (column, value) in op.data.iter().flatten() {
                        let Some(info) = table.columns.get(column) else {
                            return Err(Failure::Reject {
                                code: "invalid",
                                message: format!("table {} has no column {column:?}", table.name),
                                op_id: id,
                                stale: true,
                            });
                        };
                        if !info.writable {
                            return Err(reject(
                                "invalid",
                                format!("column {column:?} of {} is generated", table.name),
                                id,
                            ));
                        }
                        if column == &table.key {
                            let same = match value {
                                Value::String(s) => s == &op.id,
                                Value::Number(n) => n.to_string() == op.id,
                                _ => false,
                            };
                            if !same {
                                return Err(reject(
                                    "invalid",
                                    format!("the data's {column} differs from the op's id"),
                                    id,
                                ));
                            }
                            continue;
                        }
                        if [LAST_MODIFIED_BY, LAST_MODIFIED_AT, VERSION].contains(&column.as_str())
                        {
                            continue;
                        }
                        // A JSON column's text is parsed by PostgreSQL (`TableInfo::row_json`).
                        data.insert(column.clone(), value.clone());
                    }
                    if table.has(LAST_MODIFIED_BY) {
                        data.insert(LAST_MODIFIED_BY.into(), Value::from(writer.user_id));
                    }
                }
                let mut key = Map::new();
                key.insert(table.key.clone(), Value::from(op.id.as_str()));
                let sent = |column: &str| {
                    op.data
                        .as_ref()
                        .and_then(|d| d.get(column))
                        .filter(|v| !v.is_null())
                        .cloned()
                };
                Ok(Intent {
                    op,
                    table,
                    rules,
                    key: Value::Object(key).to_string(),
                    data,
                    client_version: sent(VERSION),
                    client_time: sent(LAST_MODIFIED_AT),
                })
            })
            .collect()
    }

    /// The claim of a client transaction, sent after its ops: its result recorded. A
    /// transaction received before (applied, rejected, or being applied by another request
    /// right now, which this waits for) fails it on the table's key, and everything sent with
    /// it is rolled back ([`Uploads::received_before`]).
    fn claim_sql(uploads: &str) -> String {
        format!(
            "INSERT INTO {uploads} (user_id, client_id, tx_key, status, result) \
             VALUES ($1, $2, $3, 'applied', $4::text::jsonb)"
        )
    }

    /// Whether `e` is the claim failing on walsync's uploads table: the transaction was
    /// received before.
    fn received_before(&self, e: &tokio_postgres::Error) -> bool {
        e.as_db_error().is_some_and(|d| {
            d.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                && d.schema() == Some(self.config.schema.as_str())
                && d.table() == Some("uploads")
        })
    }

    /// Applies `intents` as one transaction, claimed under `(user, client_id, tx_key)`.
    pub(crate) async fn apply(
        &self,
        writer: Writer<'_>,
        client_id: &str,
        tx_key: &str,
        tx_id: Option<i64>,
        intents: &[Intent<'_>],
    ) -> Result<Applied, Failure> {
        let mut conn = self.connection().await?;
        let role = match (self.config.mode, &self.config.rls_role) {
            (AuthorizationMode::PostgresRls, Some(role)) => Some(quote_ident(role)),
            _ => None,
        };
        // One statement per op where nothing needs deciding in between, the last one carrying
        // the claim: sent together. Else op by op.
        let last = intents.len().saturating_sub(1);
        let fast: Option<Vec<String>> = match role {
            None => intents
                .iter()
                .enumerate()
                .map(|(n, i)| {
                    let plain = i.rules.conflicts.is_none()
                        || (i.op.old.is_none() && i.client_version.is_none());
                    let claim = (n == last).then_some(self.sql.uploads.as_str());
                    plain.then(|| fast::statement(i, claim)).flatten()
                })
                .collect(),
            Some(_) => None,
        };
        let key = Claim {
            user_id: writer.user_id,
            client_id,
            tx_key,
            result: Claim::result(tx_id, Vec::new()),
        };
        let outcome = match fast {
            Some(statements) => self
                .apply_fast(&mut conn, writer, &key, intents, &statements)
                .await
                .map(|lsn| (lsn, Vec::new())),
            None => {
                self.apply_steps(&mut conn, writer, &key, tx_id, intents, role)
                    .await
            }
        };
        match outcome {
            Ok((lsn, conflicts)) => Ok(Applied::Now(lsn, conflicts)),
            Err(Failure::ReceivedBefore) => {
                drop(conn);
                self.earlier(writer, client_id, tx_key).await
            }
            Err(f) => Err(f),
        }
    }

    /// A PostgreSQL error as a failure, telling a transaction received before apart.
    fn failure(&self, e: &tokio_postgres::Error, op_id: Option<i64>) -> Failure {
        if self.received_before(e) {
            Failure::ReceivedBefore
        } else {
            classify(e, op_id)
        }
    }

    /// Op by op in one transaction, then the claim. Returns the write checkpoint and the
    /// conflicts met.
    async fn apply_steps(
        &self,
        conn: &mut PgConn,
        writer: Writer<'_>,
        claim: &Claim<'_>,
        tx_id: Option<i64>,
        intents: &[Intent<'_>],
        role: Option<String>,
    ) -> Result<(u64, Vec<ConflictNote>), Failure> {
        let mut db = Session::begin(conn).await.map_err(|e| classify(&e, None))?;
        if role.is_some() {
            db.execute(
                "SELECT set_config('request.jwt.claims', $1, true), \
                        set_config('request.jwt.claim.sub', $2, true)",
                &[&writer.claims.to_string(), &writer.user_id],
            )
            .await
            .map_err(|e| classify(&e, None))?;
        }
        let mut conflicts = Vec::new();
        for intent in intents {
            conflicts.extend(
                self.apply_op(&mut db, writer, claim.client_id, intent, role.as_deref())
                    .await?,
            );
        }
        if role.is_some() {
            db.t.batch_execute("RESET ROLE")
                .await
                .map_err(|e| classify(&e, None))?;
        }
        let result = match conflicts.is_empty() {
            true => claim.result.clone(),
            false => Claim::result(tx_id, conflicts.clone()),
        };
        db.execute(
            &self.sql.claim,
            &[&claim.user_id, &claim.client_id, &claim.tx_key, &result],
        )
        .await
        .map_err(|e| self.failure(&e, None))?;
        // A commit whose answer is lost may have happened: the retry finds out from the claim.
        db.commit().await.map_err(|e| self.failure(&e, None))?;
        let (client, cache) = conn.split();
        let lsn = write_checkpoint(&*client, cache).await?;
        Ok((lsn, conflicts))
    }

    pub(crate) async fn connection(
        &self,
    ) -> Result<deadpool::managed::Object<crate::Manager>, Failure> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Timeout(_) => Failure::Retry("the database is busy".into()),
            e => {
                tracing::warn!(error = %e, "uploads: cannot connect to postgres");
                Failure::Retry("postgres is not reachable".into())
            }
        })
    }

    /// The result recorded for a transaction received before.
    async fn earlier(
        &self,
        writer: Writer<'_>,
        client_id: &str,
        tx_key: &str,
    ) -> Result<Applied, Failure> {
        let client = self.connection().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT result::text FROM {}.uploads WHERE user_id = $1 AND client_id = $2 AND tx_key = $3",
                    quote_ident(&self.config.schema)
                ),
                &[&writer.user_id, &client_id, &tx_key],
            )
            .await
            .map_err(|e| classify(&e, None))?;
        let text: String = row
            .map(|r| r.get(0))
            .ok_or_else(|| Failure::Retry("the earlier attempt is still running".into()))?;
        serde_json::from_str(&text)
            .map(Applied::Before)
            .map_err(|_| Failure::Retry("the earlier attempt is still running".into()))
    }
}

/// Who claims a transaction, and the result recorded when it is applied.
struct Claim<'a> {
    user_id: &'a str,
    client_id: &'a str,
    tx_key: &'a str,
    /// The applied result, as JSON.
    result: String,
}

impl Claim<'_> {
    /// An applied transaction's result, as recorded.
    fn result(tx_id: Option<i64>, conflicts: Vec<ConflictNote>) -> String {
        serde_json::to_string(&TxResult {
            conflicts,
            ..TxResult::applied(tx_id)
        })
        .unwrap_or_default()
    }
}

/// A transaction applied now (at this source position), or before (with this result).
pub(crate) enum Applied {
    Now(u64, Vec<ConflictNote>),
    Before(TxResult),
}

/// The predicate as a query over `old` ($1) and `new` ($2), with the user id ($3) and the
/// claims ($4).
fn check_sql(table: &TableInfo, p: &Predicate) -> String {
    let q = &table.qualified;
    format!(
        "SELECT ({}) IS TRUE FROM jsonb_populate_record(NULL::{q}, $1::text::jsonb) AS old, \
         jsonb_populate_record(NULL::{q}, {}) AS new",
        p.sql,
        table.row_json(2)
    )
}

/// The column list and the values to set: the client's columns from `r` (the populated
/// record), and the columns walsync fills. `updated`: the alias of the row an update changes
/// (none for an insert).
fn assignments<'a>(
    table: &TableInfo,
    columns: impl Iterator<Item = &'a String>,
    updated: Option<&str>,
) -> (String, String) {
    let update = updated.is_some();
    let mut names = Vec::new();
    let mut values = Vec::new();
    for c in columns {
        if update && c == &table.key {
            continue;
        }
        names.push(quote_ident(c));
        values.push(format!("r.{}", quote_ident(c)));
    }
    if names.is_empty() {
        return (String::new(), String::new());
    }
    if table.has(LAST_MODIFIED_AT) {
        names.push(quote_ident(LAST_MODIFIED_AT));
        values.push("now()".into());
    }
    if let Some(row) = updated
        && table.has(VERSION)
    {
        names.push(quote_ident(VERSION));
        values.push(format!("{row}.{} + 1", quote_ident(VERSION)));
    }
    (names.join(", "), values.join(", "))
}
