//! The step-by-step path: an op at a time, where something must be decided between the
//! steps (a conflict, from the row as it is now) or the role changes between them (row-level
//! security: the row is found as walsync's user, checked and changed as the writer's role).

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tokio_postgres::types::Type;
use walsync_types::quote_ident;

use super::{
    Failure, Intent, LAST_MODIFIED_AT, LAST_MODIFIED_BY, Uploads, Writer, assignments, check_sql,
    classify, reject,
};
use crate::config::AuthorizationMode;
use crate::session::Session;
use crate::{ConflictNote, CrudOp, conflict};

impl Uploads {
    /// Applies one op: finds and locks its row, decides conflicts, checks authorization, makes
    /// the change. Returns the conflicts it met.
    pub(super) async fn apply_op(
        &self,
        db: &mut Session<'_>,
        writer: Writer<'_>,
        client_id: &str,
        intent: &Intent<'_>,
        role: Option<&str>,
    ) -> Result<Vec<ConflictNote>, Failure> {
        let table = intent.table;
        let op_id = Some(intent.op.op_id);
        let fail = |e: tokio_postgres::Error| classify(&e, op_id);
        let q = &table.qualified;
        let k = quote_ident(&table.key);
        let find =
            format!("(SELECT r.{k} FROM jsonb_populate_record(NULL::{q}, $1::text::jsonb) r)");
        // The row is found (and locked) as walsync's own user, so that a row row-level
        // security hides from the writer is refused as denied, not taken for missing; the check
        // and the change run as the writer's role.
        if role.is_some() {
            db.t.batch_execute("RESET ROLE").await.map_err(fail)?;
        }
        // With conflicts to decide, the row also as the sync stream has it (each column as text).
        let texts = match intent.rules.conflicts {
            Some(_) => table.text_array(),
            None => "NULL::text[]".to_owned(),
        };
        let found = db
            .query_opt(
                &format!(
                    "SELECT to_jsonb(t)::text, {texts} FROM {q} t WHERE t.{k} = {find} {}",
                    row_lock(intent.op.op)
                ),
                &[&intent.key],
            )
            .await
            .map_err(fail)?;
        let old: Option<String> = found.as_ref().map(|r| r.get(0));
        let server: BTreeMap<String, Option<String>> = found
            .as_ref()
            .and_then(|r| r.get::<_, Option<Vec<Option<String>>>>(1))
            .map(|values| table.columns.keys().cloned().zip(values).collect())
            .unwrap_or_default();
        if let Some(role) = role {
            db.t.batch_execute(&format!("SET LOCAL ROLE {role}"))
                .await
                .map_err(fail)?;
        }
        let old_row: Option<Map<String, Value>> =
            old.as_deref().and_then(|o| serde_json::from_str(o).ok());
        let (operation, predicate) = match (intent.op.op, &old_row) {
            (CrudOp::Delete, None) => return Ok(Vec::new()),
            (CrudOp::Delete, Some(_)) => ("delete", &intent.rules.delete),
            (CrudOp::Patch, None) => {
                return Err(reject(
                    "not_found",
                    format!("no row {} to update in {}", intent.op.id, table.name),
                    op_id,
                ));
            }
            (CrudOp::Put, None) => ("insert", &intent.rules.insert),
            (_, Some(_)) => ("update", &intent.rules.update),
        };
        // A field the server changed too since the client read it is decided before anything
        // is checked or written: what is checked is what is written.
        let mut data = intent.data.clone();
        let mut notes = Vec::new();
        let mut manual = Vec::new();
        if let (Some(rule), "update") = (&intent.rules.conflicts, operation) {
            let mut fields = data.clone();
            let by = fields.remove(LAST_MODIFIED_BY);
            let r = conflict::resolve(
                rule,
                &fields,
                intent.op.old.as_ref(),
                intent.client_version.as_ref(),
                &server,
            );
            let note = |column: &str, outcome: &str| ConflictNote {
                op_id: intent.op.op_id,
                column: column.to_owned(),
                outcome: outcome.to_owned(),
            };
            notes.extend(r.decided.iter().map(|(c, o)| note(c, o)));
            let mut write = r.write;
            if !r.later_wins.is_empty() {
                let client_is_later = self
                    .client_is_later(db, intent, &server)
                    .await
                    .map_err(fail)?;
                for (column, value) in r.later_wins {
                    notes.push(note(
                        &column,
                        if client_is_later { "client" } else { "server" },
                    ));
                    if client_is_later {
                        write.insert(column, value);
                    }
                }
            }
            if let (Some(by), false) = (by, write.is_empty()) {
                write.insert(LAST_MODIFIED_BY.into(), by);
            }
            data = write;
            manual = r.manual;
        }
        // The row as the client wants it: its values over the current row.
        let new = match (operation, &old_row) {
            ("delete", _) => None,
            (_, old) => {
                let mut row = old.clone().unwrap_or_default();
                row.extend(data.clone());
                row.insert(table.key.clone(), Value::from(intent.op.id.as_str()));
                Some(Value::Object(row).to_string())
            }
        };
        match predicate {
            Some(p) => {
                let claims = writer.claims.to_string();
                let allowed: bool = db
                    .query_one_typed(
                        &check_sql(table, p),
                        &[Type::TEXT; 4],
                        &[&old, &new, &writer.user_id, &claims],
                    )
                    .await
                    .map_err(fail)?
                    .get(0);
                if !allowed {
                    return Err(reject(
                        "denied",
                        format!(
                            "the write rules do not allow this {operation} on {}",
                            table.name
                        ),
                        op_id,
                    ));
                }
            }
            None if role.is_none() => {
                return Err(reject(
                    "denied",
                    format!("the write rules allow no {operation} on {}", table.name),
                    op_id,
                ));
            }
            None => {}
        }
        let changed = match operation {
            "delete" => db
                .execute(
                    &format!("DELETE FROM {q} t WHERE t.{k} = {find}"),
                    &[&intent.key],
                )
                .await
                .map_err(fail)?,
            "insert" => {
                let (columns, values) = assignments(table, data.keys().chain([&table.key]), None);
                db.execute(
                    &format!(
                        "INSERT INTO {q} ({columns}) SELECT {values} FROM jsonb_populate_record(NULL::{q}, {}) r",
                        table.row_json(1)
                    ),
                    &[&intent.row(&data)],
                )
                .await
                .map_err(fail)?
            }
            // Nothing left to write (the server's values stay): the row is not touched.
            _ if data.is_empty() => 1,
            _ => {
                let (columns, values) = assignments(table, data.keys(), Some("t"));
                if columns.is_empty() {
                    return Ok(notes);
                }
                db.execute(
                    &format!(
                        "UPDATE {q} t SET ({columns}) = (SELECT {values} FROM jsonb_populate_record(NULL::{q}, {}) r) \
                         WHERE t.{k} = {find}",
                        table.row_json(1)
                    ),
                    &[&intent.row(&data)],
                )
                .await
                .map_err(fail)?
            }
        };
        if changed == 0 {
            // Row-level security hid the row from this change (it could be read, not changed).
            return Err(reject(
                "denied",
                format!(
                    "row-level security does not allow this {operation} on {}",
                    table.name
                ),
                op_id,
            ));
        }
        if !manual.is_empty() {
            self.store_conflicts(db, writer, client_id, intent, &server, manual)
                .await
                .map_err(fail)?;
        }
        Ok(notes)
    }

    /// Stores fields left for a person to decide in the conflicts table, as walsync's own user
    /// (the writer's role need not write there), in the upload's transaction.
    async fn store_conflicts(
        &self,
        db: &mut Session<'_>,
        writer: Writer<'_>,
        client_id: &str,
        intent: &Intent<'_>,
        server: &BTreeMap<String, Option<String>>,
        manual: Vec<conflict::Manual>,
    ) -> Result<(), tokio_postgres::Error> {
        let role = self.config.mode == AuthorizationMode::PostgresRls;
        if role {
            db.t.batch_execute("RESET ROLE").await?;
        }
        // Through `jsonb_populate_record`, as every write: the values take the table's own
        // column types (an app may declare `scope` as its project id's type).
        let scope = intent
            .rules
            .conflicts
            .as_ref()
            .and_then(|r| r.scope.as_deref())
            .and_then(|c| server.get(c))
            .cloned()
            .flatten();
        let c = &self.sql.conflicts;
        let columns = "table_name, row_id, column_name, base_value, client_value, server_value, scope, user_id, client_id, op_id";
        let insert = format!(
            "INSERT INTO {c} ({columns}) SELECT {columns} FROM jsonb_populate_record(NULL::{c}, $1::text::jsonb)"
        );
        for m in manual {
            let row = serde_json::json!({
                "table_name": intent.table.name,
                "row_id": intent.op.id,
                "column_name": m.column,
                "base_value": m.base,
                "client_value": m.client,
                "server_value": m.server,
                "scope": scope,
                "user_id": writer.user_id,
                "client_id": client_id,
                "op_id": intent.op.op_id,
            })
            .to_string();
            db.execute(&insert, &[&row]).await?;
        }
        if let (true, Some(r)) = (role, &self.config.rls_role) {
            db.t.batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(r)))
                .await?;
        }
        Ok(())
    }

    /// Whether the client's edit (its `_last_modified_at`, else now) is not older than the
    /// row's `_last_modified_at` (a row without one: the client's is later).
    async fn client_is_later(
        &self,
        db: &mut Session<'_>,
        intent: &Intent<'_>,
        server: &BTreeMap<String, Option<String>>,
    ) -> Result<bool, tokio_postgres::Error> {
        let Some(Some(row_time)) = server.get(LAST_MODIFIED_AT) else {
            return Ok(true);
        };
        let client_time = intent.client_time.as_ref().and_then(conflict::text_form);
        let row = db
            .query_one(
                "SELECT COALESCE($1::text::timestamptz, now()) >= $2::text::timestamptz",
                &[&client_time, row_time],
            )
            .await?;
        Ok(row.get(0))
    }
}

/// How an op locks the row it finds: an insert or update as PostgreSQL's own `UPDATE` of
/// columns other than keys does (`FOR NO KEY UPDATE`: inserts of rows that reference it carry
/// on), a delete fully.
fn row_lock(op: CrudOp) -> &'static str {
    match op {
        CrudOp::Delete => "FOR UPDATE",
        CrudOp::Put | CrudOp::Patch => "FOR NO KEY UPDATE",
    }
}
