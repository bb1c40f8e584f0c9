//! walsync's own tables in the source database (uploads, dead letters, conflicts, and
//! `auth.uid()` for row-level security), and recording a rejection.

use walsync_types::quote_ident;

use super::fast::write_checkpoint;
use super::{Applied, Failure, Uploads, Writer};
use crate::{ClientTransaction, TxResult, WriteError};

impl Uploads {
    pub(super) async fn create_bookkeeping(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<(), WriteError> {
        let s = quote_ident(&self.config.schema);
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.uploads (
                   user_id text NOT NULL,
                   client_id text NOT NULL,
                   tx_key text NOT NULL,
                   status text NOT NULL,
                   result jsonb NOT NULL,
                   at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (user_id, client_id, tx_key)
                 );
                 CREATE TABLE IF NOT EXISTS {c} (
                   id bigserial PRIMARY KEY,
                   table_name text NOT NULL,
                   row_id text NOT NULL,
                   column_name text NOT NULL,
                   base_value text,
                   client_value text,
                   server_value text,
                   scope text,
                   user_id text NOT NULL,
                   client_id text NOT NULL,
                   op_id bigint,
                   created_at timestamptz NOT NULL DEFAULT now(),
                   resolution text,
                   resolved_by text,
                   resolved_at timestamptz
                 );
                 CREATE TABLE IF NOT EXISTS {r} (
                   id bigserial PRIMARY KEY,
                   user_id text NOT NULL,
                   client_id text NOT NULL,
                   tx_key text NOT NULL,
                   ops jsonb NOT NULL,
                   code text NOT NULL,
                   message text NOT NULL,
                   op_id bigint,
                   claims jsonb NOT NULL DEFAULT '{{}}',
                   rejected_at timestamptz NOT NULL DEFAULT now(),
                   replayed_at timestamptz
                 );",
                c = self.sql.conflicts,
                r = self.sql.rejected,
            ))
            .await
            .map_err(|e| {
                WriteError::Catalog(format!(
                    "cannot create walsync's tables ({s}.uploads, {}, {}): {e}",
                    self.sql.rejected, self.sql.conflicts
                ))
            })
    }

    /// Records a rejected transaction in the dead letters and as its upload's result:
    /// `Applied::Now` with the write checkpoint of that record (a stream that passes it holds
    /// the dead letter where the rules give it to its author). When an earlier attempt already
    /// has a result, `Applied::Before` with that one.
    pub(super) async fn record_rejection(
        &self,
        writer: Writer<'_>,
        client_id: &str,
        tx: &ClientTransaction,
        result: &TxResult,
    ) -> Result<Applied, String> {
        let s = quote_ident(&self.config.schema);
        let mut client = self.connection().await.map_err(Failure::message)?;
        let lost = |e: tokio_postgres::Error| {
            tracing::warn!(error = %e, "cannot record a rejected upload");
            "the rejection could not be recorded".to_owned()
        };
        let t = client.transaction().await.map_err(lost)?;
        let tx_key = tx.key();
        let result_json = serde_json::to_string(result).unwrap_or_default();
        let inserted = t
            .execute(
                &format!(
                    "INSERT INTO {s}.uploads (user_id, client_id, tx_key, status, result) \
                     VALUES ($1, $2, $3, 'rejected', $4::text::jsonb) ON CONFLICT DO NOTHING"
                ),
                &[&writer.user_id, &client_id, &tx_key, &result_json],
            )
            .await
            .map_err(lost)?;
        if inserted == 0 {
            drop(t);
            return match self.earlier(writer, client_id, &tx_key).await {
                Ok(before @ Applied::Before(_)) => Ok(before),
                _ => Err("the rejection could not be recorded".into()),
            };
        }
        let ops = serde_json::to_string(&tx.ops).unwrap_or_default();
        t.execute(
            &format!(
                "INSERT INTO {} (user_id, client_id, tx_key, ops, code, message, op_id, claims) \
                 VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8::text::jsonb)",
                self.sql.rejected
            ),
            &[
                &writer.user_id,
                &client_id,
                &tx_key,
                &ops,
                &result.code.as_deref().unwrap_or_default(),
                &result.message.as_deref().unwrap_or_default(),
                &result.op_id,
                &writer.claims.to_string(),
            ],
        )
        .await
        .map_err(lost)?;
        t.commit().await.map_err(lost)?;
        let (client, cache) = client.split();
        let lsn = write_checkpoint(&*client, cache)
            .await
            .map_err(Failure::message)?;
        Ok(Applied::Now(lsn, Vec::new()))
    }
}

/// Creates `auth.uid()` (the token's subject, as Supabase-style policies read it) unless the
/// database has one (Supabase's own is kept).
pub(super) async fn create_auth_uid(client: &tokio_postgres::Client) -> Result<(), WriteError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'auth' AND p.proname = 'uid')",
            &[],
        )
        .await
        .map_err(|e| WriteError::Catalog(format!("cannot look for auth.uid(): {e}")))?
        .get(0);
    if exists {
        return Ok(());
    }
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS auth;
             CREATE OR REPLACE FUNCTION auth.uid() RETURNS text LANGUAGE sql STABLE AS $$
               SELECT COALESCE(
                 NULLIF(current_setting('request.jwt.claim.sub', true), ''),
                 NULLIF(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
             $$;
             GRANT USAGE ON SCHEMA auth TO PUBLIC;",
        )
        .await
        .map_err(|e| WriteError::Catalog(format!("cannot create auth.uid(): {e}")))
}
