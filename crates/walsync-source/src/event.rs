//! What the source emits: tables, typed rows and the events of committed transactions.

use std::sync::Arc;

use walsync_types::{Lsn, PgTimestamp};

use crate::codec::{self, ReplicaIdentity, Tuple};
use crate::datum::{Datum, decode_tuple_value};
use crate::error::{Result, SourceError};

/// A published table as the stream describes it. A later description of the same `oid`
/// (after `ALTER TABLE`) replaces the earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<TableColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity: present in the old-key tuple of updates and deletes.
    pub is_key: bool,
}

impl Table {
    /// `schema.name`, for messages.
    /// `schema.table`, the name the store keeps the table's rows under. A part holding a `.` or
    /// a `"` is quoted as in SQL, so that no two tables share a name (schema `a.b` with table
    /// `c`, and schema `a` with table `b.c`); plain names stay as they are.
    pub fn qualified_name(&self) -> String {
        fn part(ident: &str) -> std::borrow::Cow<'_, str> {
            if ident.contains(['.', '"']) {
                std::borrow::Cow::Owned(format!("\"{}\"", ident.replace('"', "\"\"")))
            } else {
                std::borrow::Cow::Borrowed(ident)
            }
        }
        format!("{}.{}", part(&self.schema), part(&self.name))
    }

    pub(crate) fn from_relation(r: codec::Relation) -> Table {
        Table {
            oid: r.oid,
            schema: r.namespace,
            name: r.name,
            replica_identity: r.replica_identity,
            columns: r
                .columns
                .into_iter()
                .map(|c| TableColumn {
                    name: c.name,
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    is_key: c.is_key,
                })
                .collect(),
        }
    }

    /// Decodes a wire tuple into a row of this table.
    pub(crate) fn decode_row(&self, tuple: &Tuple, lsn: Lsn) -> Result<Row> {
        if tuple.len() != self.columns.len() {
            return Err(SourceError::Protocol(format!(
                "row of {} has {} columns at lsn {lsn}, its relation message said {}",
                self.qualified_name(),
                tuple.len(),
                self.columns.len()
            )));
        }
        Ok(self
            .columns
            .iter()
            .zip(tuple)
            .map(|(col, v)| {
                let (datum, error) = decode_tuple_value(col.type_oid, v);
                if let Some(e) = error {
                    tracing::warn!(table = %self.qualified_name(), column = %col.name, %lsn, error = %e, "a value that does not decode is kept as postgresql's text");
                }
                datum
            })
            .collect())
    }
}

/// A row: one datum per column of its table, in the table's column order.
pub type Row = Vec<Datum>;

/// The old side of an update or delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldRow {
    /// Replica identity columns only; the others are `Null`.
    Key(Row),
    /// Every column (`REPLICA IDENTITY FULL`).
    Full(Row),
}

impl OldRow {
    pub fn row(&self) -> &Row {
        match self {
            OldRow::Key(r) | OldRow::Full(r) => r,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Insert {
        table: Arc<Table>,
        new: Row,
    },
    /// `old` is sent when the key changed (`Key`) or the identity is FULL (`Full`); otherwise
    /// the key is in `new`. Unchanged TOASTed columns are [`Datum::UnchangedToast`] in `new`.
    Update {
        table: Arc<Table>,
        old: Option<OldRow>,
        new: Row,
    },
    Delete {
        table: Arc<Table>,
        old: OldRow,
    },
    Truncate {
        tables: Vec<Arc<Table>>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A transactional `pg_logical_emit_message`.
    Message {
        prefix: String,
        content: bytes::Bytes,
    },
}

/// One step of the source's output, in WAL order.
///
/// The contract with the consumer:
/// - Changes between `Begin` and `Commit` belong to one committed transaction; apply them all
///   at `Commit` or none. `Rollback` means "forget the open transaction": it was cut off by a
///   lost connection and will be sent again whole.
/// - `SnapshotBegin` starts the initial copy; it also means "forget any earlier unfinished
///   snapshot". The copy is complete at `SnapshotEnd`.
/// - Report durability with [`crate::SourceStream::ack`]: the `end_lsn` of a `Commit`, or the
///   `consistent_point` of `SnapshotEnd` (an `Idle` position may be reported too; the slot
///   moves past it anyway once what came before is durable).
/// - `Idle` comes between transactions: every transaction that commits before `wal_end` has
///   been sent, so the consumer's position may move there though nothing it reads changed.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// walsync created the slot; record that it owns it (see [`crate::Resume::owns_slot`]).
    SlotCreated {
        slot: String,
        consistent_point: Lsn,
    },
    SnapshotBegin {
        consistent_point: Lsn,
    },
    SnapshotTable(Arc<Table>),
    SnapshotRows {
        table: Arc<Table>,
        rows: Vec<Row>,
    },
    SnapshotEnd {
        consistent_point: Lsn,
    },
    /// A table's (new) description, before changes that use it.
    Relation(Arc<Table>),
    Begin {
        xid: u32,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    Change(Change),
    Commit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
        /// Replication bytes received since the previous commit handed over (this transaction's
        /// pgoutput messages, with whatever came between): for counting, not for order.
        bytes: u64,
    },
    Rollback,
    /// The server has decoded the WAL up to `wal_end` and owes nothing before it (a keepalive
    /// between transactions, past the last commit sent).
    Idle {
        wal_end: Lsn,
    },
    /// PostgreSQL streams the slot's changes from `start` (after the snapshot, when one was
    /// needed): the replication is live. Says nothing about data.
    Streaming {
        start: Lsn,
    },
    /// The connection broke (the reason was logged); the reader connects again with backoff and
    /// resumes from what is durable. Says nothing about data.
    Reconnecting,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(schema: &str, name: &str) -> Table {
        Table {
            oid: 1,
            schema: schema.into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: Vec::new(),
        }
    }

    #[test]
    fn qualified_names_never_collide() {
        assert_eq!(named("public", "t").qualified_name(), "public.t");
        let a = named("a.b", "c").qualified_name();
        let b = named("a", "b.c").qualified_name();
        assert_ne!(a, b);
        assert_eq!((a.as_str(), b.as_str()), ("\"a.b\".c", "a.\"b.c\""));
        assert_eq!(named("q\"s", "t").qualified_name(), "\"q\"\"s\".t");
    }
}
