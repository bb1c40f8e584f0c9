//! Helpers shared by the source's integration tests.
#![allow(dead_code)]

use std::time::Duration;

use tokio_postgres::Client;
use walsync_source::{Change, PgConfig, Resume, Source, SourceConfig, SourceEvent, SourceStream};
use walsync_testkit::{Cluster, TestDatabase};
use walsync_types::Lsn;

/// Long enough for a loaded CI machine; tests wait on conditions, never on the clock.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

pub(crate) struct Db {
    pub db: TestDatabase,
    pub sql: Client,
    pub url: String,
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A fresh database on `cluster` with `schema` applied and a publication `walsync` for all
/// tables.
pub(crate) async fn database(cluster: &Cluster, schema: &str) -> anyhow::Result<Db> {
    init_tracing();
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(schema).await?;
    sql.batch_execute("CREATE PUBLICATION walsync FOR ALL TABLES")
        .await?;
    let url = db.url.clone();
    Ok(Db { db, sql, url })
}

impl Db {
    /// Runs each statement as its own transaction (a multi-statement string would be one).
    pub(crate) async fn each(&self, statements: &[&str]) -> anyhow::Result<()> {
        for s in statements {
            self.sql.batch_execute(s).await?;
        }
        Ok(())
    }
}

pub(crate) fn config(url: &str) -> SourceConfig {
    let pg: PgConfig = url.parse().expect("valid url");
    // Slots are cluster-wide: name each test's slot after its database.
    let slot = pg.dbname().to_owned();
    let mut c = SourceConfig::new(pg, slot, "walsync");
    c.reconnect_max = Duration::from_secs(1);
    c
}

pub(crate) async fn start(url: &str, resume: Resume) -> anyhow::Result<SourceStream> {
    Ok(Source::start(config(url), resume).await?)
}

/// A committed transaction as the consumer assembles it.
#[derive(Debug, Clone)]
pub(crate) struct Txn {
    pub xid: u32,
    pub end_lsn: Lsn,
    pub changes: Vec<Change>,
}

/// Assembles events into transactions and the snapshot, the way a consumer must.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    pub snapshot: Vec<(String, walsync_source::Row)>,
    pub snapshot_done: Option<Lsn>,
    pub txns: Vec<Txn>,
    pub relations: Vec<std::sync::Arc<walsync_source::Table>>,
    open: Option<Txn>,
    pub rollbacks: usize,
}

impl Collector {
    pub(crate) fn apply(&mut self, events: Vec<SourceEvent>) {
        for e in events {
            match e {
                SourceEvent::SnapshotBegin { .. } => {
                    self.snapshot.clear();
                    self.snapshot_done = None;
                }
                SourceEvent::SnapshotRows { table, rows } => {
                    self.snapshot
                        .extend(rows.into_iter().map(|r| (table.name.clone(), r)));
                }
                SourceEvent::SnapshotEnd { consistent_point } => {
                    self.snapshot_done = Some(consistent_point)
                }
                SourceEvent::Relation(t) => self.relations.push(t),
                SourceEvent::Begin { xid, .. } => {
                    assert!(self.open.is_none(), "begin inside an open transaction");
                    self.open = Some(Txn {
                        xid,
                        end_lsn: Lsn::ZERO,
                        changes: Vec::new(),
                    });
                }
                SourceEvent::Change(c) => self
                    .open
                    .as_mut()
                    .expect("change outside a transaction")
                    .changes
                    .push(c),
                SourceEvent::Commit { xid, end_lsn, .. } => {
                    let mut t = self.open.take().expect("commit without begin");
                    assert_eq!(t.xid, xid);
                    t.end_lsn = end_lsn;
                    if let Some(last) = self.txns.last() {
                        assert!(end_lsn > last.end_lsn, "commits out of order");
                    }
                    self.txns.push(t);
                }
                SourceEvent::Rollback => {
                    self.open = None;
                    self.rollbacks += 1;
                }
                SourceEvent::SlotCreated { .. }
                | SourceEvent::SnapshotTable(_)
                | SourceEvent::Idle { .. }
                | SourceEvent::Streaming { .. }
                | SourceEvent::Reconnecting => {}
            }
        }
    }

    /// Reads until `done` holds, failing after [`WAIT`].
    pub(crate) async fn until(
        &mut self,
        stream: &mut SourceStream,
        done: impl Fn(&Collector) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            let batch = tokio::time::timeout_at(deadline, stream.next_batch())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("timed out; collected so far: {} txns", self.txns.len())
                })?;
            match batch {
                Some(Ok(events)) => self.apply(events),
                Some(Err(e)) => anyhow::bail!("source failed: {e}"),
                None => anyhow::bail!("source ended"),
            }
        }
        Ok(())
    }

    pub(crate) fn changes(&self) -> impl Iterator<Item = &Change> {
        self.txns.iter().flat_map(|t| t.changes.iter())
    }
}

/// The integer in column `i` of a row.
pub(crate) fn int(row: &walsync_source::Row, i: usize) -> i64 {
    match &row[i] {
        walsync_source::Datum::Value(walsync_types::Value::Int(v)) => *v,
        other => panic!("column {i} is {other:?}, not an int"),
    }
}
