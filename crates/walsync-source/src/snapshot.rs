//! The initial copy: every published table, read inside the snapshot that the slot exported, so
//! that the copy and the stream from the slot's consistent point meet without a gap or an
//! overlap.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::{Client, SimpleQueryMessage};
use walsync_types::{Lsn, quote_ident};

use crate::codec::ReplicaIdentity;
use crate::datum::{Datum, decode_text_or_keep};
use crate::error::Result;
use crate::event::{Row, SourceEvent, Table, TableColumn};

/// Where the snapshot's events go; `false` means the consumer went away.
pub(crate) trait Emit {
    async fn emit(&mut self, event: SourceEvent) -> Result<bool>;
}

/// Copies every table of `publication` as of `snapshot`, in batches of at most `batch_rows`
/// rows and about `batch_bytes` bytes of PostgreSQL's text: each fetch asks for as many rows as
/// the rows so far say fit the budget, so wide rows (TOASTed text, big JSON) come a few at a
/// time and memory stays bounded by bytes, not by a row count.
pub(crate) async fn copy(
    client: &mut Client,
    snapshot: &str,
    consistent_point: Lsn,
    publication: &str,
    batch_rows: usize,
    batch_bytes: usize,
    out: &mut impl Emit,
) -> Result<bool> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "''")
    ))
    .await?;
    if !out
        .emit(SourceEvent::SnapshotBegin { consistent_point })
        .await?
    {
        return Ok(false);
    }
    let tables = published_tables(&tx, publication).await?;
    for (table, filter, partitioned) in tables {
        let table = Arc::new(table);
        tracing::info!(table = %table.qualified_name(), "copying table");
        if !out.emit(SourceEvent::SnapshotTable(table.clone())).await? {
            return Ok(false);
        }
        let columns: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let select = format!(
            "SELECT {} FROM {}{}.{}{}",
            if columns.is_empty() {
                "NULL".to_owned()
            } else {
                columns.join(", ")
            },
            // A plain table's inheritance children are published (and copied) on their own.
            if partitioned { "" } else { "ONLY " },
            quote_ident(&table.schema),
            quote_ident(&table.name),
            filter.map(|f| format!(" WHERE {f}")).unwrap_or_default()
        );
        tx.batch_execute(&format!(
            "DECLARE walsync_copy NO SCROLL CURSOR FOR {select}"
        ))
        .await?;
        let mut copied = 0u64;
        // One row first: it tells how wide this table's rows are.
        let mut want = 1;
        loop {
            let mut rows = Vec::with_capacity(want);
            let mut bytes = 0usize;
            for msg in tx
                .simple_query(&format!("FETCH {want} FROM walsync_copy"))
                .await?
            {
                if let SimpleQueryMessage::Row(r) = msg {
                    bytes += (0..r.len())
                        .map(|i| r.get(i).map_or(0, str::len))
                        .sum::<usize>();
                    rows.push(decode_row(&table, &r)?);
                }
            }
            if rows.is_empty() {
                break;
            }
            copied += rows.len() as u64;
            let last = rows.len() < want;
            let per_row = (bytes / rows.len()).max(1);
            want = (batch_bytes / per_row).clamp(1, batch_rows.max(1));
            if !out
                .emit(SourceEvent::SnapshotRows {
                    table: table.clone(),
                    rows,
                })
                .await?
            {
                return Ok(false);
            }
            tracing::debug!(table = %table.qualified_name(), rows = copied, "copy progress");
            if last {
                break;
            }
        }
        tx.batch_execute("CLOSE walsync_copy").await?;
        tracing::info!(table = %table.qualified_name(), rows = copied, "table copied");
    }
    tx.commit().await?;
    out.emit(SourceEvent::SnapshotEnd { consistent_point })
        .await
}

fn decode_row(table: &Table, r: &tokio_postgres::SimpleQueryRow) -> Result<Row> {
    let mut row = Vec::with_capacity(table.columns.len());
    for (i, col) in table.columns.iter().enumerate() {
        let v = match r.get(i) {
            None => walsync_types::Value::Null,
            Some(text) => {
                let (v, error) = decode_text_or_keep(col.type_oid, text.as_bytes());
                if let Some(e) = error {
                    tracing::warn!(table = %table.qualified_name(), column = %col.name, error = %e, "a value that does not decode is kept as postgresql's text");
                }
                v
            }
        };
        row.push(Datum::Value(v));
    }
    Ok(row)
}

/// The published tables with the columns pgoutput sends for them (publication column lists
/// and generated columns taken into account) and their row filters (PostgreSQL 15+).
/// A published table, its row filter, and whether it is partitioned (its rows are in its
/// partitions, so its copy reads them too).
type Published = (Table, Option<String>, bool);

async fn published_tables(
    client: &tokio_postgres::Transaction<'_>,
    publication: &str,
) -> Result<Vec<Published>> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let (column_filter, row_filter) = if version >= 150_000 {
        (
            "AND (p.attnames IS NULL OR a.attname = ANY(p.attnames))",
            "p.rowfilter",
        )
    } else {
        ("", "NULL::text")
    };
    let sql = format!(
        "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, a.attname::text, a.atttypid, \
                a.atttypmod, (c.relreplident = 'f' OR a.attnum = ANY(coalesce(ri.indkey::int2[], '{{}}'))) AS is_key, \
                {row_filter}, c.relkind = 'p' \
         FROM pg_publication_tables p \
         JOIN pg_namespace n ON n.nspname = p.schemaname \
         JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
         LEFT JOIN pg_index ri ON ri.indrelid = c.oid AND CASE c.relreplident \
              WHEN 'i' THEN ri.indisreplident WHEN 'd' THEN ri.indisprimary ELSE false END \
         WHERE p.pubname = $1 {column_filter} \
         ORDER BY n.nspname, c.relname, a.attnum"
    );
    let rows = client.query(&sql, &[&publication]).await?;
    let mut tables: BTreeMap<u32, Published> = BTreeMap::new();
    for r in rows {
        let oid: u32 = r.get(0);
        let ident: String = r.get(3);
        let entry = tables.entry(oid).or_insert_with(|| {
            (
                Table {
                    oid,
                    schema: r.get(1),
                    name: r.get(2),
                    replica_identity: match ident.as_str() {
                        "n" => ReplicaIdentity::Nothing,
                        "f" => ReplicaIdentity::Full,
                        "i" => ReplicaIdentity::Index,
                        _ => ReplicaIdentity::Default,
                    },
                    columns: Vec::new(),
                },
                r.get(8),
                r.get(9),
            )
        });
        entry.0.columns.push(TableColumn {
            name: r.get(4),
            type_oid: r.get(5),
            type_modifier: r.get(6),
            is_key: r.get(7),
        });
    }
    Ok(tables.into_values().collect())
}
