//! Applying source events to a storage write transaction.

use std::collections::HashMap;
use std::sync::Arc;

use walsync_rules::{RowRef, SyncRules};
use walsync_source::codec::ReplicaIdentity;
use walsync_source::{Change, Datum, Row, SourceEvent, Table};
use walsync_storage::{StoreWriter, StoredRow};
use walsync_types::{Lsn, RowId, Value};

use crate::{ReplicatorError, Result};

/// What the session should do after an event.
pub(crate) enum Next {
    Continue,
    /// Commit what is written now (outside any source transaction).
    CommitNow,
    /// Drop what is not committed and start again from the stored checkpoint.
    Restart,
}

/// Turns source events into storage writes, with the sync rules deciding buckets and lookups.
#[derive(Debug)]
pub struct Applier {
    rules: Arc<SyncRules>,
    tables: HashMap<u32, TableInfo>,
    pub(crate) pending_txns: usize,
    /// Replication bytes of the transactions in the pending storage commit.
    pub(crate) pending_bytes: u64,
    pub(crate) pending_rows: usize,
    pending_ack: Option<Lsn>,
    /// The source commit time of the newest transaction in the pending storage commit.
    pub(crate) pending_commit_time: Option<walsync_types::PgTimestamp>,
    pub(crate) snapshot_rows: u64,
    /// Rows copied per table by the snapshot running (for its progress lines).
    snapshot_table_rows: HashMap<String, u64>,
    /// Inside a source transaction: storage may not commit now.
    pub(crate) in_transaction: bool,
    /// The commit position of the source transaction being applied (it names the transaction
    /// to stage when it outgrows the memory budget).
    pub(crate) transaction: Option<Lsn>,
    /// The store holds ops: a new snapshot is a **re-copy**, applied as one transaction of its
    /// own ([`StoreWriter::copy_row`]) that readers see whole at its end. Else (an empty store)
    /// the copy commits batch by batch.
    pub(crate) recopy: bool,
    /// The position of the change being applied in its source transaction (from 0).
    pub(crate) change_index: usize,
    /// Changes to skip, by their transaction's commit position and their position in it: each
    /// made the replicator panic once (see [`crate::ReplicatorConfig`]).
    pub(crate) skip: std::collections::HashSet<(Lsn, usize)>,
    /// Rows skipped because evaluating the rules on them panicked, and changes skipped.
    pub(crate) skipped: u64,
    /// Test hook (see [`crate::ReplicatorConfig::panic_on_text`]).
    pub(crate) panic_on_text: Option<String>,
    /// Where the replication stands, as the events say.
    pub(crate) state: crate::State,
}

/// How a row reaches the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// Copied by a re-copy.
    Copied,
    /// It joins the table under its id (an insert, an initial snapshot, an update that changed
    /// its id); in a table without a key (`REPLICA IDENTITY FULL`) an identical row may be there
    /// already, and this is one more copy of it.
    Joins,
    /// It replaces the row under its id.
    Replaces,
}

impl Applier {
    pub fn new(rules: Arc<SyncRules>) -> Applier {
        Applier {
            rules,
            tables: HashMap::new(),
            pending_txns: 0,
            pending_bytes: 0,
            pending_rows: 0,
            pending_ack: None,
            pending_commit_time: None,
            snapshot_rows: 0,
            snapshot_table_rows: HashMap::new(),
            in_transaction: false,
            transaction: None,
            recopy: false,
            change_index: 0,
            skip: std::collections::HashSet::new(),
            skipped: 0,
            panic_on_text: None,
            state: crate::State::Connecting,
        }
    }

    /// The place of the next change: its transaction's commit position and its index in it.
    pub(crate) fn place(&self) -> Option<(Lsn, usize)> {
        self.transaction.map(|lsn| (lsn, self.change_index))
    }

    /// The position to acknowledge once what is written is committed.
    pub(crate) fn ack_position(&self) -> Option<Lsn> {
        self.pending_ack
    }

    pub(crate) fn committed(&mut self) {
        self.pending_txns = 0;
        self.pending_bytes = 0;
        self.pending_rows = 0;
        self.pending_ack = None;
        self.pending_commit_time = None;
    }

    /// What the applier needs of a table for each of its rows, worked out once per relation.
    fn info(&mut self, table: &Arc<Table>) -> &TableInfo {
        let fresh = match self.tables.get(&table.oid) {
            Some(i) => !(Arc::ptr_eq(&i.table, table) || *i.table == **table),
            None => true,
        };
        if fresh {
            let info = TableInfo {
                table: table.clone(),
                names: table.columns.iter().map(|c| c.name.clone()).collect(),
                qualified: table.qualified_name(),
                read: self.rules.reads_table(&table.schema, &table.name),
            };
            self.tables.insert(table.oid, info);
        }
        &self.tables[&table.oid]
    }

    /// Applies one event; what the replicator does between events (commits, restarts) is the
    /// caller's. For benchmarks and tests that drive the applier without a source.
    pub fn apply_event<W: StoreWriter>(&mut self, w: &mut W, event: SourceEvent) -> Result<()> {
        self.apply(w, event).map(|_| ())
    }

    pub(crate) fn apply<W: StoreWriter>(&mut self, w: &mut W, event: SourceEvent) -> Result<Next> {
        Ok(match event {
            SourceEvent::SlotCreated { slot, .. } => {
                w.set_slot_owned(&slot);
                Next::CommitNow
            }
            SourceEvent::SnapshotBegin { .. } => {
                self.state = if self.recopy {
                    crate::State::Rebuilding
                } else {
                    crate::State::Snapshotting
                };
                if self.recopy {
                    self.in_transaction = true;
                    tracing::info!(
                        "copying the tables anew while clients are served the last checkpoint"
                    );
                } else {
                    w.clear_all()?;
                }
                self.snapshot_rows = 0;
                self.snapshot_table_rows.clear();
                Next::Continue
            }
            SourceEvent::SnapshotTable(_) | SourceEvent::Relation(_) => Next::Continue,
            SourceEvent::SnapshotRows { table, rows } => {
                let n = rows.len();
                let arrival = if self.recopy {
                    Arrival::Copied
                } else {
                    Arrival::Joins
                };
                for row in rows {
                    self.upsert(w, &table, row, None, arrival)?;
                }
                self.snapshot_rows += n as u64;
                self.pending_rows += n;
                let name = table.qualified_name();
                let copied = self.snapshot_table_rows.entry(name.clone()).or_default();
                *copied += n as u64;
                tracing::info!(
                    table = %name,
                    table_rows = *copied,
                    total_rows = self.snapshot_rows,
                    "snapshot progress: rows copied of this table, and of all tables"
                );
                // A re-copy commits whole, at its end.
                if self.recopy {
                    Next::Continue
                } else {
                    Next::CommitNow
                }
            }
            SourceEvent::SnapshotEnd { consistent_point } => {
                if self.recopy {
                    w.drop_uncopied()?;
                    self.in_transaction = false;
                }
                w.set_position(consistent_point);
                w.set_snapshot_complete();
                w.set_rules(self.rules.fingerprint());
                self.pending_ack = Some(consistent_point);
                tracing::info!(rows = self.snapshot_rows, lsn = %consistent_point, "snapshot complete");
                Next::CommitNow
            }
            SourceEvent::Begin { commit_lsn, .. } => {
                self.in_transaction = true;
                self.transaction = Some(commit_lsn);
                self.change_index = 0;
                Next::Continue
            }
            SourceEvent::Change(change) => {
                if let Some((lsn, index)) = self.place().filter(|p| self.skip.contains(p)) {
                    tracing::error!(
                        commit_lsn = %lsn,
                        index,
                        "skipping a change that made the replicator panic: it stays out of the buckets"
                    );
                    self.skipped += 1;
                } else {
                    self.change(w, change)?;
                }
                self.change_index += 1;
                self.pending_rows += 1;
                Next::Continue
            }
            SourceEvent::Commit {
                end_lsn,
                commit_time,
                bytes,
                ..
            } => {
                w.set_position(end_lsn);
                self.pending_commit_time = Some(commit_time);
                self.pending_ack = Some(end_lsn);
                self.pending_txns += 1;
                self.pending_bytes += bytes;
                self.in_transaction = false;
                self.transaction = None;
                Next::Continue
            }
            SourceEvent::Rollback => {
                self.in_transaction = false;
                self.transaction = None;
                Next::Restart
            }
            SourceEvent::Idle { wal_end } => {
                if !self.in_transaction {
                    w.set_position(wal_end);
                    self.pending_ack = Some(wal_end);
                }
                Next::Continue
            }
            SourceEvent::Streaming { .. } => {
                self.state = crate::State::Streaming;
                Next::Continue
            }
            SourceEvent::Reconnecting => {
                self.state = crate::State::Reconnecting;
                Next::Continue
            }
        })
    }

    fn change<W: StoreWriter>(&mut self, w: &mut W, change: Change) -> Result<()> {
        match change {
            Change::Insert { table, new } => self.upsert(w, &table, new, None, Arrival::Joins),
            Change::Update { table, old, new } => {
                let info = self.info(&table);
                if !info.read {
                    return Ok(());
                }
                let name = info.qualified.clone();
                let new_id = row_id(&table, &new)?;
                let old_id = match &old {
                    Some(o) => row_id(&table, o.row())?,
                    None => new_id.clone(),
                };
                let stored = if new.contains(&Datum::UnchangedToast) {
                    w.row(&name, &old_id)?
                } else {
                    None
                };
                let arrival = if old_id != new_id {
                    w.delete_row(&name, &old_id)?;
                    Arrival::Joins
                } else {
                    Arrival::Replaces
                };
                self.upsert(w, &table, new, stored.as_ref(), arrival)
            }
            Change::Delete { table, old } => {
                let info = self.info(&table);
                if !info.read {
                    return Ok(());
                }
                let name = info.qualified.clone();
                let id = row_id(&table, old.row())?;
                w.delete_row(&name, &id)?;
                Ok(())
            }
            Change::Truncate { tables, .. } => {
                for t in tables {
                    if self.rules.reads_table(&t.schema, &t.name) {
                        w.truncate(&t.qualified_name())?;
                    }
                }
                Ok(())
            }
            Change::Message { .. } => Ok(()),
        }
    }

    /// Writes a row: its copy, the buckets the rules put it in, its lookups. Unchanged TOAST
    /// values are taken from `stored`.
    fn upsert<W: StoreWriter>(
        &mut self,
        w: &mut W,
        table: &Arc<Table>,
        row: Row,
        stored: Option<&StoredRow>,
        arrival: Arrival,
    ) -> Result<()> {
        let info = self.info(table);
        if !info.read {
            return Ok(());
        }
        let (names, qualified) = (info.names.clone(), info.qualified.clone());
        // The rules run on values nobody here chose: a panic there skips this row (logged,
        // counted) instead of stopping replication for everyone, at every restart.
        let computed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.computed(table, &names, &qualified, row, stored)
        }));
        let (id, copy, outputs, lookups) = match computed {
            Ok(c) => c?,
            Err(_) => {
                tracing::error!(
                    table = %qualified,
                    "the sync rules panicked on a row: it is skipped and stays out of the buckets"
                );
                self.skipped += 1;
                return Ok(());
            }
        };
        if self.panic_on(&copy.values, "!") {
            panic!("test hook: a panic after a row's rules");
        }
        let full = table.replica_identity == ReplicaIdentity::Full;
        match arrival {
            Arrival::Copied => w.copy_row(&qualified, &id, copy, outputs, lookups)?,
            Arrival::Joins if full => w.insert_row(&qualified, &id, copy, outputs, lookups)?,
            Arrival::Joins | Arrival::Replaces => {
                w.upsert_row(&qualified, &id, copy, outputs, lookups)?
            }
        }
        Ok(())
    }

    /// Whether the test hook asks for a panic on a row holding `values`: one holding the
    /// hook's text followed by `suffix`.
    fn panic_on(&self, values: &[Value], suffix: &str) -> bool {
        self.panic_on_text.as_deref().is_some_and(|p| {
            values
                .iter()
                .any(|v| matches!(v, Value::Text(t) if t.strip_suffix(suffix) == Some(p)))
        })
    }

    /// What the store is told of a row: its id, its copy, the buckets the rules put it in and
    /// its lookups.
    fn computed(
        &self,
        table: &Table,
        names: &Arc<[String]>,
        qualified: &str,
        row: Row,
        stored: Option<&StoredRow>,
    ) -> Result<(
        RowId,
        StoredRow,
        Vec<walsync_types::RowOutput>,
        Vec<walsync_types::LookupEntry>,
    )> {
        let values: Vec<Value> = row
            .into_iter()
            .zip(names.iter())
            .enumerate()
            .map(|(i, (d, name))| match d {
                Datum::Value(v) => v,
                Datum::UnchangedToast => stored
                    .and_then(|s| stored_value(s, names, i, name))
                    .unwrap_or_else(|| {
                        tracing::warn!(table = %qualified, column = %name, "unchanged toast value without a stored copy");
                        Value::Null
                    }),
            })
            .collect();
        if self.panic_on(&values, "") {
            panic!("test hook: a panic in a row's rules");
        }
        let id = key_of(table, &values)?;
        let r = RowRef {
            schema: &table.schema,
            table: &table.name,
            columns: names,
            values: &values,
        };
        let outputs = self.rules.evaluate_row(&r);
        let lookups = self.rules.evaluate_lookups(&r);
        // The copy serves one purpose: filling columns an update leaves as unchanged TOAST.
        // Fixed-width types are never TOASTed, so only variable-length values are kept.
        let kept = values
            .into_iter()
            .zip(&table.columns)
            .map(|(v, c)| {
                if FIXED_WIDTH_TYPES.contains(&c.type_oid) {
                    Value::Null
                } else {
                    v
                }
            })
            .collect();
        let copy = StoredRow {
            columns: names.clone(),
            values: kept,
        };
        Ok((id, copy, outputs, lookups))
    }
}

/// The stored copy's value of column `name`, at position `i` of the table's `columns` now. A
/// column renamed since the copy was written (`ALTER TABLE … RENAME COLUMN`) is found at its
/// position when the column list has kept its length (no column added or dropped meanwhile,
/// which would shift positions; then names alone decide).
fn stored_value(stored: &StoredRow, columns: &[String], i: usize, name: &str) -> Option<Value> {
    let at = match stored.columns.iter().position(|c| c == name) {
        Some(at) => at,
        None if stored.columns.len() == columns.len() => i,
        None => return None,
    };
    stored.values.get(at).cloned()
}

/// Types stored inline at a fixed width, which PostgreSQL never TOASTs: bool, "char", int8,
/// int2, int4, oid, float4, float8, money, date, time, timestamp, timestamptz, interval, timetz,
/// uuid, pg_lsn.
const FIXED_WIDTH_TYPES: &[u32] = &[
    16, 18, 20, 21, 23, 26, 700, 701, 790, 1082, 1083, 1114, 1184, 1186, 1266, 2950, 3220,
];

fn row_id(table: &Table, row: &Row) -> Result<RowId> {
    let values: Vec<Value> = row
        .iter()
        .map(|d| match d {
            Datum::Value(v) => v.clone(),
            Datum::UnchangedToast => Value::Null,
        })
        .collect();
    key_of(table, &values)
}

/// The row's identity: its replica identity columns' text forms (`None` for a null), encoded
/// by [`RowId`] directly: this runs for every row.
fn key_of(table: &Table, values: &[Value]) -> Result<RowId> {
    let texts = table
        .columns
        .iter()
        .zip(values)
        .filter(|(c, _)| c.is_key)
        .map(|(_, v)| match v {
            Value::Text(t) => Some(std::borrow::Cow::Borrowed(t.as_str())),
            other => walsync_rules::canonical(other).map(std::borrow::Cow::Owned),
        });
    RowId::from_key_texts(texts).ok_or_else(|| ReplicatorError::NoKey {
        table: table.qualified_name(),
    })
}

/// A table as the applier uses it for each row: its column names (shared by the row copies),
/// its qualified name and whether the rules read it.
#[derive(Debug)]
struct TableInfo {
    table: Arc<Table>,
    names: Arc<[String]>,
    qualified: String,
    read: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use walsync_source::TableColumn;
    use walsync_source::codec::ReplicaIdentity;

    #[test]
    fn keys_are_json_arrays_of_the_identity_columns_text() {
        let col = |name: &str, is_key: bool| TableColumn {
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
            is_key,
        };
        let table = Table {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("a", true), col("b", false), col("c", true)],
        };
        for values in [
            vec![Value::Int(7), Value::Null, Value::Text("x\"y/é".into())],
            vec![Value::Null, Value::Int(1), Value::Float(1.5)],
            vec![
                Value::Bool(true),
                Value::Null,
                Value::Json(r#"{"k": [1]}"#.into()),
            ],
        ] {
            let expected: Vec<serde_json::Value> = [&values[0], &values[2]]
                .into_iter()
                .map(|v| {
                    walsync_rules::canonical(v)
                        .map_or(serde_json::Value::Null, serde_json::Value::String)
                })
                .collect();
            assert_eq!(
                key_of(&table, &values).unwrap().as_str(),
                serde_json::Value::Array(expected).to_string()
            );
        }
        let no_key = Table {
            columns: vec![col("a", false)],
            ..table
        };
        assert!(key_of(&no_key, &[Value::Int(1)]).is_err());
    }
}
