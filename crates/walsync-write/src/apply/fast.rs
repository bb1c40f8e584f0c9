//! One statement per op, where nothing needs deciding in between: the change carries the
//! predicate for what the op turns out to be (insert or update) in its own condition, so it is
//! made only if the predicate holds on the row it changes — one round trip, and the ops of a
//! transaction can go out together (pipelined). See [`statement`].
//!
//! The new row is the client's values over the current row (`jsonb_populate_record(old,
//! data)`), as on the step-by-step path. Row-level security and conflicts (an op with `old`
//! values or a `_version`, on a table with conflict rules) take the step-by-step path.

use std::collections::HashMap;

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row, Statement};
use walsync_types::{Lsn, quote_ident};

use super::{Claim, Failure, Intent, Uploads, Writer, assignments, classify, reject};
use crate::CrudOp;
use crate::pool::PgConn;
use crate::predicate::Predicate;
use crate::session;

/// The predicate's SQL, or `false` when the rules give none (the operation is denied).
fn predicate(p: &Option<Predicate>) -> &str {
    p.as_ref().map_or("false", |p| p.sql.as_str())
}

/// The op's statement, when it can be one. Parameters: `$1` the row as JSON (the client's values
/// and the key), `$3` the user id, `$4` the claims (`$2` unused, as in the check statement).
/// It returns one row: (the row existed, rows changed).
///
/// The predicate is part of the change's own `WHERE`, over the target row as `old` and the
/// client's values over it as `new`: PostgreSQL evaluates it on the row it is about to change,
/// and evaluates it again on the newest version when a concurrent transaction changed the row
/// first (as `UPDATE` does for any condition under read committed). Whether the row exists is
/// asked only when nothing was changed, under a key-share lock, so a row deleted meanwhile
/// counts as missing (a `PUT` inserts it) rather than as denied.
///
/// With `claim` (walsync's uploads table, for the transaction's last op) the statement also
/// claims the transaction, if the op succeeded: it records the result (`$5` client id, `$6`
/// transaction key, `$7` result). A transaction received before makes the claim fail on the
/// table's key, which rolls back everything sent with it.
pub(super) fn statement(intent: &Intent<'_>, claim: Option<&str>) -> Option<String> {
    let table = intent.table;
    let q = &table.qualified;
    let k = quote_ident(&table.key);
    let rules = intent.rules;
    // The client's row as JSON is made once (a JSON column's text parsed), then read by each
    // step.
    let client = format!("jsonb_populate_record(NULL::{q}, input.j)");
    // The key is a value of its own (`(SELECT k FROM key)`, a parameter of the plan), so each
    // step finds the row by its index whatever the planner estimates of the table: joined
    // with the client's record instead, a generic plan can hash the whole table.
    let head = format!(
        "WITH input AS MATERIALIZED (SELECT {} AS j), \
         key AS (SELECT ({client}).{k} AS k FROM input)",
        table.row_json(1)
    );
    let empty = format!("jsonb_populate_record(NULL::{q}, NULL)");
    let changed = |step: &str| {
        format!(
            "found AS (SELECT EXISTS (SELECT 1 FROM {step}) \
               OR EXISTS (SELECT 1 FROM {q} t WHERE t.{k} = (SELECT k FROM key) FOR KEY SHARE OF t) AS yes)"
        )
    };
    match intent.op.op {
        CrudOp::Delete => Some(format!(
            "{head}, \
             done AS (DELETE FROM {q} AS old WHERE old.{k} = (SELECT k FROM key) \
               AND (SELECT ({}) IS TRUE FROM {empty} AS new) RETURNING 1), \
             {found} {claim} \
             SELECT (SELECT yes FROM found), (SELECT count(*) FROM done)",
            predicate(&rules.delete),
            found = changed("done"),
            claim = claimed(
                claim,
                "NOT (SELECT yes FROM found) OR EXISTS (SELECT 1 FROM done)"
            ),
        )),
        op => {
            let (ucols, uvals) = assignments(table, intent.data.keys(), Some("old"));
            if ucols.is_empty() {
                return None;
            }
            let update = format!(
                "upd AS (UPDATE {q} AS old SET ({ucols}) = ROW({uvals}) FROM input, {client} r \
                   WHERE old.{k} = (SELECT k FROM key) \
                   AND (SELECT ({}) IS TRUE FROM jsonb_populate_record(old, input.j) AS new) RETURNING 1), \
                 {found}",
                predicate(&rules.update),
                found = changed("upd"),
            );
            if op == CrudOp::Patch {
                return Some(format!(
                    "{head}, {update} {claim} \
                     SELECT (SELECT yes FROM found), (SELECT count(*) FROM upd)",
                    claim = claimed(claim, "EXISTS (SELECT 1 FROM upd)"),
                ));
            }
            let mut keys: Vec<&String> = intent.data.keys().collect();
            keys.push(&table.key);
            let (icols, ivals) = assignments(table, keys.into_iter(), None);
            Some(format!(
                "{head}, {update}, \
                 ins AS (INSERT INTO {q} ({icols}) SELECT {ivals} FROM input, {client} r \
                   WHERE NOT (SELECT yes FROM found) \
                   AND (SELECT ({}) IS TRUE FROM {empty} AS old, {client} AS new) RETURNING 1) {claim} \
                 SELECT (SELECT yes FROM found), (SELECT count(*) FROM upd) + (SELECT count(*) FROM ins)",
                predicate(&rules.insert),
                claim = claimed(
                    claim,
                    "EXISTS (SELECT 1 FROM upd) OR EXISTS (SELECT 1 FROM ins)"
                ),
            ))
        }
    }
}

/// The claim, as a last step of the statement, taken when `done` (the op succeeded).
fn claimed(uploads: Option<&str>, done: &str) -> String {
    uploads.map_or_else(String::new, |uploads| {
        format!(
            ", claim AS (INSERT INTO {uploads} (user_id, client_id, tx_key, status, result) \
             SELECT $3, $5, $6, 'applied', $7::text::jsonb WHERE {done} RETURNING 1)"
        )
    })
}

/// What the statement's row says of the op.
pub(super) fn outcome(intent: &Intent<'_>, row: &Row) -> Result<(), Failure> {
    let (found, changed): (bool, i64) = (row.get(0), row.get(1));
    let table = &intent.table.name;
    let op_id = Some(intent.op.op_id);
    let operation = match (intent.op.op, found) {
        (CrudOp::Delete, false) => return Ok(()),
        (CrudOp::Delete, true) => "delete",
        (CrudOp::Patch, false) => {
            return Err(reject(
                "not_found",
                format!("no row {} to update in {table}", intent.op.id),
                op_id,
            ));
        }
        (CrudOp::Put, false) => "insert",
        (_, true) => "update",
    };
    let rules = intent.rules;
    let given = match operation {
        "insert" => rules.insert.is_some(),
        "update" => rules.update.is_some(),
        _ => rules.delete.is_some(),
    };
    if !given {
        return Err(reject(
            "denied",
            format!("the write rules allow no {operation} on {table}"),
            op_id,
        ));
    }
    // The predicate is part of the change's condition: nothing changed means it did not hold.
    if changed == 0 {
        return Err(reject(
            "denied",
            format!("the write rules do not allow this {operation} on {table}"),
            op_id,
        ));
    }
    Ok(())
}

impl Uploads {
    /// Applies a transaction whose ops are one statement each (`statements`, the last carrying
    /// the claim) on `conn`: one op alone in its own transaction with the write checkpoint
    /// sent behind it, several in one transaction. Returns the write checkpoint.
    pub(super) async fn apply_fast(
        &self,
        conn: &mut PgConn,
        writer: Writer<'_>,
        claim: &Claim<'_>,
        intents: &[Intent<'_>],
        statements: &[String],
    ) -> Result<u64, Failure> {
        let (client, cache) = conn.split();
        let marker = session::cached(&*client, cache, MARKER, &[])
            .await
            .map_err(|e| classify(&e, None))?;
        let sent = if let [_] = statements {
            let prepared = prepare(&*client, cache, statements).await?;
            // The marker is sent after the op (the join polls in order), so it runs after the
            // op's transaction committed.
            let (applied, lsn) = futures_util::future::join(
                self.send_together(&*client, writer, claim, intents, &prepared),
                client.query_one(&marker, &[]),
            )
            .await;
            applied.and_then(|()| lsn_of(lsn))
        } else {
            let t = client.transaction().await.map_err(|e| classify(&e, None))?;
            let prepared = prepare(&t, cache, statements).await?;
            match self
                .send_together(&t, writer, claim, intents, &prepared)
                .await
            {
                Ok(()) => {
                    t.commit().await.map_err(|e| self.failure(&e, None))?;
                    lsn_of(client.query_one(&marker, &[]).await)
                }
                Err(f) => Err(f),
            }
        };
        // A statement that failed is prepared anew next time (a table altered since can make
        // a prepared statement fail for good).
        if let Err(f) = &sent
            && !matches!(f, Failure::ReceivedBefore)
        {
            for sql in statements {
                cache.remove(sql);
            }
        }
        sent
    }

    /// Sends the ops of one statement each (`prepared`), the last carrying the claim, all
    /// together (pipelined on the connection): one round trip. The first op that fails or is
    /// refused, in order, decides. On the client itself (one statement, its own transaction) or
    /// on an open transaction.
    async fn send_together<C: GenericClient + Sync>(
        &self,
        client: &C,
        writer: Writer<'_>,
        claim: &Claim<'_>,
        intents: &[Intent<'_>],
        prepared: &[Statement],
    ) -> Result<(), Failure> {
        let rows: Vec<String> = intents.iter().map(|i| i.row(&i.data)).collect();
        let claims = writer.claims.to_string();
        let unused: Option<String> = None;
        type Param<'p> = &'p (dyn tokio_postgres::types::ToSql + Sync);
        let params: Vec<Vec<Param<'_>>> = rows
            .iter()
            .enumerate()
            .map(|(n, row)| {
                let mut p: Vec<Param<'_>> = vec![row, &unused, &writer.user_id, &claims];
                if n + 1 == rows.len() {
                    p.extend([&claim.client_id as Param<'_>, &claim.tx_key, &claim.result]);
                }
                p
            })
            .collect();
        // Sent in this order: each future sends its statement when first polled, and the join
        // polls in order.
        let outcomes = futures_util::future::join_all(
            prepared
                .iter()
                .zip(&params)
                .map(|(statement, p)| client.query_one(statement, p)),
        )
        .await;
        for (intent, sent) in intents.iter().zip(outcomes) {
            let row = sent.map_err(|e| self.failure(&e, Some(intent.op.op_id)))?;
            outcome(intent, &row)?;
        }
        Ok(())
    }
}

/// The ops' statements of [`Uploads::send_together`], prepared (once per connection): the last
/// one takes the claim's parameters as well.
async fn prepare<C: GenericClient + Sync>(
    client: &C,
    cache: &mut HashMap<String, Statement>,
    statements: &[String],
) -> Result<Vec<Statement>, Failure> {
    let mut prepared = Vec::with_capacity(statements.len());
    for (n, sql) in statements.iter().enumerate() {
        let types: &[Type] = if n + 1 == statements.len() {
            &[Type::TEXT; 7]
        } else {
            &[Type::TEXT; 4]
        };
        prepared.push(
            session::cached(client, cache, sql, types)
                .await
                .map_err(|e| classify(&e, None))?,
        );
    }
    Ok(prepared)
}

/// The write checkpoint's statement: see [`write_checkpoint`].
const MARKER: &str = "SELECT pg_current_wal_flush_lsn()::text";

fn lsn_of(row: Result<Row, tokio_postgres::Error>) -> Result<u64, Failure> {
    let text: String = row.map_err(|e| classify(&e, None))?.get(0);
    text.parse::<Lsn>()
        .map(|l| l.0)
        .map_err(|_| Failure::Retry("postgres returned no lsn".into()))
}

/// The write checkpoint of a transaction committed on `client`: the server's WAL flush
/// position, read after the commit. The commit was flushed before it returned (write
/// connections commit synchronously, see [`crate::pool`]), so the position is at or after the
/// commit, and the store passes it only once the stream has carried the commit: by a later
/// transaction, or by the keepalive that says the server has decoded that far. (A position
/// taken inside the upload's own transaction would not do: another transaction committing
/// before the upload could move the store past it first.) It writes nothing to the WAL.
pub(super) async fn write_checkpoint<C: GenericClient + Sync>(
    client: &C,
    cache: &mut HashMap<String, Statement>,
) -> Result<u64, Failure> {
    let marker = session::cached(client, cache, MARKER, &[])
        .await
        .map_err(|e| classify(&e, None))?;
    lsn_of(client.query_one(&marker, &[]).await)
}
