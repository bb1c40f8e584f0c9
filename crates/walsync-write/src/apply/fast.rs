//! One statement per op, where nothing needs deciding in between: the row is locked, the
//! predicate for what the op turns out to be (insert or update) is evaluated over the row as it
//! was and as it will be, and the change is made only if it holds — all in one statement, so
//! one round trip, and the ops of a transaction can go out together (pipelined).
//!
//! The semantics are the step-by-step path's: every part of one statement sees the data as the
//! statement found it, so the predicate sees the data as the change finds it; the new row is
//! the client's values over the current row (`jsonb_populate_record(current, data)`).
//! Row-level security and conflicts (an op with `old` values or a `_version`, on a table with
//! conflict rules) take the step-by-step path.

use tokio_postgres::Row;
use walsync_types::quote_ident;

use super::{Failure, Intent, assignments, reject, row_lock};
use crate::CrudOp;
use crate::predicate::Predicate;

/// The predicate's SQL, or `false` when the rules give none (the operation is denied).
fn predicate(p: &Option<Predicate>) -> &str {
    p.as_ref().map_or("false", |p| p.sql.as_str())
}

/// The op's statement, when it can be one. Parameters: `$1` the row as JSON (the client's values
/// and the key), `$3` the user id, `$4` the claims (`$2` unused, as in the check statement).
/// It returns one row: (the row existed, the insert predicate held, the update or delete
/// predicate held, rows changed).
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
    let head = format!(
        "WITH input AS MATERIALIZED (SELECT {} AS j), \
         key AS (SELECT r.{k} AS k FROM input, jsonb_populate_record(NULL::{q}, input.j) r), \
         cur AS (SELECT t AS row FROM {q} t, key WHERE t.{k} = key.k {lock} OF t)",
        table.row_json(1),
        lock = row_lock(intent.op.op)
    );
    let empty = format!("jsonb_populate_record(NULL::{q}, NULL)");
    let row = "(SELECT j FROM input)";
    let as_was = "LATERAL (SELECT (cur.row).*) AS old";
    match intent.op.op {
        CrudOp::Delete => Some(format!(
            "{head}, \
             del_ok AS (SELECT ({}) IS TRUE AS ok FROM cur, {as_was}, {empty} AS new), \
             done AS (DELETE FROM {q} t USING key WHERE t.{k} = key.k AND (SELECT ok FROM del_ok) RETURNING 1) \
             {claim} \
             SELECT EXISTS (SELECT 1 FROM cur), false, COALESCE((SELECT ok FROM del_ok), false), (SELECT count(*) FROM done)",
            predicate(&rules.delete),
            claim = claimed(
                claim,
                "NOT EXISTS (SELECT 1 FROM cur) OR EXISTS (SELECT 1 FROM done)"
            ),
        )),
        op => {
            let (ucols, uvals) = assignments(table, intent.data.keys(), true);
            if ucols.is_empty() {
                return None;
            }
            let update = format!(
                "upd_ok AS (SELECT ({}) IS TRUE AS ok FROM cur, {as_was}, jsonb_populate_record(cur.row, {row}) AS new), \
                 upd AS (UPDATE {q} t SET ({ucols}) = (SELECT {uvals} FROM jsonb_populate_record(NULL::{q}, {row}) r) \
                 FROM key WHERE t.{k} = key.k AND (SELECT ok FROM upd_ok) RETURNING 1)",
                predicate(&rules.update)
            );
            if op == CrudOp::Patch {
                return Some(format!(
                    "{head}, {update} {claim} \
                     SELECT EXISTS (SELECT 1 FROM cur), false, COALESCE((SELECT ok FROM upd_ok), false), (SELECT count(*) FROM upd)",
                    claim = claimed(claim, "EXISTS (SELECT 1 FROM upd)"),
                ));
            }
            let mut keys: Vec<&String> = intent.data.keys().collect();
            keys.push(&table.key);
            let (icols, ivals) = assignments(table, keys.into_iter(), false);
            Some(format!(
                "{head}, {update}, \
                 ins_ok AS (SELECT ({}) IS TRUE AS ok FROM {empty} AS old, jsonb_populate_record(NULL::{q}, {row}) AS new), \
                 ins AS (INSERT INTO {q} ({icols}) SELECT {ivals} FROM jsonb_populate_record(NULL::{q}, {row}) r \
                 WHERE NOT EXISTS (SELECT 1 FROM cur) AND (SELECT ok FROM ins_ok) RETURNING 1) {claim} \
                 SELECT EXISTS (SELECT 1 FROM cur), (SELECT ok FROM ins_ok), COALESCE((SELECT ok FROM upd_ok), false), \
                 (SELECT count(*) FROM upd) + (SELECT count(*) FROM ins)",
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
    let (found, insert_ok, change_ok, changed): (bool, bool, bool, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
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
    let allowed = if operation == "insert" {
        insert_ok
    } else {
        change_ok
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
    if !allowed || changed == 0 {
        return Err(reject(
            "denied",
            format!("the write rules do not allow this {operation} on {table}"),
            op_id,
        ));
    }
    Ok(())
}
