//! The PostgreSQL engine: each keyspace is a table `(key bytea PRIMARY KEY, value bytea)` in
//! the store's own schema, so every read the store makes (a key, the keys of a range in order)
//! is a primary-key lookup or an index range scan, and a snapshot is a `REPEATABLE READ`
//! transaction. Several processes can open one: any number read, and one writes at a time
//! (see `super::super` for who may).
//!
//! The store's interface is synchronous (fjall's reads and writes block the caller); this
//! engine drives tokio-postgres on a small runtime of its own and blocks the caller on each
//! round trip. A write transaction keeps its writes in memory ([`PgTx`]: read back from there,
//! bounded as fjall's transaction is, by the writer's budget and steps) and sends them in
//! batches (`unnest` arrays) before any range read and at its commit.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::future::BoxFuture;
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

use super::{Bytes, Durability, Entries};
use walsync_types::quote_ident;

use crate::kv::Space;
use crate::{Result, StorageError};

/// Opens a connection to the storage database (the application's settings: TLS, session).
pub type Connect = Arc<
    dyn Fn() -> BoxFuture<
            'static,
            std::result::Result<Client, Box<dyn std::error::Error + Send + Sync>>,
        > + Send
        + Sync,
>;

/// A [`Connect`] to `url` without TLS: for a storage database on loopback or a network that
/// needs none (tests, benchmarks). walsync itself connects with the source's settings (TLS
/// included, `walsync_source::PgConfig`).
pub fn connect_without_tls(url: &str) -> Connect {
    let url = url.to_owned();
    Arc::new(move || {
        let url = url.clone();
        Box::pin(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        })
    })
}

/// Rows read per round trip of a range.
const PAGE: i64 = 1_000;
/// The store's schema versions, applied in order at open (each once, recorded in
/// `migrations`).
const MIGRATIONS: &[&str] = &[
    // 1: the keyspaces.
    "CREATE TABLE {s}.op_log (key bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE {s}.op_index (key bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE {s}.rows (key bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE {s}.buckets (key bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE {s}.lookups (key bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE {s}.changes (key bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE {s}.meta (key bytea PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE {s}.stage (key bytea PRIMARY KEY, value bytea NOT NULL);
     INSERT INTO {s}.meta VALUES (convert_to('row_keys', 'UTF8'), convert_to('ordered-int-1', 'UTF8'));",
];

/// An error of the storage database: [`StorageError::Unavailable`] when the connection failed
/// or closed (the server is down, restarting, or ended the session), else the server's error,
/// with its message and SQLSTATE.
fn pg_error(e: tokio_postgres::Error) -> StorageError {
    let Some(db) = e.as_db_error() else {
        return StorageError::Unavailable(e.to_string());
    };
    let text = format!("{} (sqlstate {})", db.message(), db.code().code());
    // Connection exceptions, too many connections, and an operator's intervention (the
    // session terminated, the server shutting down or starting).
    let code = db.code().code();
    if e.is_closed() || code.starts_with("08") || code.starts_with("57") || code == "53300" {
        StorageError::Unavailable(text)
    } else {
        StorageError::Engine(format!("postgres: {text}"))
    }
}

/// Makes the read connections of the pool.
struct Manager {
    connect: Connect,
}

impl deadpool::managed::Manager for Manager {
    type Type = Arc<Client>;
    type Error = StorageError;

    async fn create(&self) -> Result<Arc<Client>> {
        (self.connect)()
            .await
            .map(Arc::new)
            .map_err(|e| StorageError::Unavailable(format!("cannot connect: {e}")))
    }

    async fn recycle(
        &self,
        client: &mut Arc<Client>,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<StorageError> {
        if client.is_closed() {
            return Err(deadpool::managed::RecycleError::message(
                "connection closed",
            ));
        }
        Ok(())
    }
}

type Pool = deadpool::managed::Pool<Manager>;

/// The SQL of each keyspace, made once.
struct Sql {
    schema: String,
    get: Vec<String>,
    get_many: Vec<String>,
    upsert: Vec<String>,
    delete: Vec<String>,
}

impl Sql {
    fn new(schema: &str) -> Sql {
        let schema = quote_ident(schema);
        let t = |space: Space| format!("{schema}.{}", space.name());
        let each = |f: &dyn Fn(String) -> String| Space::ALL.iter().map(|s| f(t(*s))).collect();
        Sql {
            get: each(&|t| format!("SELECT value FROM {t} WHERE key = $1")),
            get_many: each(&|t| format!("SELECT key, value FROM {t} WHERE key = ANY($1)")),
            upsert: each(&|t| {
                format!(
                    "INSERT INTO {t} (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                )
            }),
            delete: each(&|t| format!("DELETE FROM {t} WHERE key = ANY($1)")),
            schema,
        }
    }

    fn table(&self, space: Space) -> String {
        format!("{}.{}", self.schema, space.name())
    }

    /// The keys (and values) between the bounds, in order (or the last first), at most `limit`.
    fn range(&self, space: Space, lo: &Bound<Vec<u8>>, hi: &Bound<Vec<u8>>, last: bool) -> String {
        let mut sql = format!("SELECT key, value FROM {} WHERE true", self.table(space));
        match lo {
            Bound::Included(_) => sql.push_str(" AND key >= $1"),
            Bound::Excluded(_) => sql.push_str(" AND key > $1"),
            Bound::Unbounded => sql.push_str(" AND $1::bytea IS NULL"),
        }
        match hi {
            Bound::Included(_) => sql.push_str(" AND key <= $2"),
            Bound::Excluded(_) => sql.push_str(" AND key < $2"),
            Bound::Unbounded => sql.push_str(" AND $2::bytea IS NULL"),
        }
        sql.push_str(if last {
            " ORDER BY key DESC LIMIT $3"
        } else {
            " ORDER BY key LIMIT $3"
        });
        sql
    }
}

fn bound_value(b: &Bound<Vec<u8>>) -> Option<Vec<u8>> {
    match b {
        Bound::Included(k) | Bound::Excluded(k) => Some(k.clone()),
        Bound::Unbounded => None,
    }
}

struct Inner {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    connect: Connect,
    sql: Sql,
    schema: String,
    /// `NOTIFY` of the store's channel: sent with every commit of the writer.
    notify: String,
    /// The write transaction's connection, held by it for its life (one at a time).
    writer: Mutex<Option<Arc<Client>>>,
    /// How many times this process took the write lock.
    taken: std::sync::atomic::AtomicU64,
    pool: Pool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Not dropped in place: that would block, which an async caller must not.
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }
}

/// A storage database.
#[derive(Clone)]
pub(crate) struct PgDb {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDb")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

impl PgDb {
    /// Connects, and brings the schema `schema` to the current version.
    pub(crate) fn open(connect: Connect, schema: &str, pool_size: usize) -> Result<PgDb> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("walsync-store-pg")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let pool = {
            let _guard = handle.enter();
            Pool::builder(Manager {
                connect: connect.clone(),
            })
            .max_size(pool_size.max(1))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| StorageError::Engine(format!("cannot make the storage pool: {e}")))?
        };
        let db = PgDb {
            inner: Arc::new(Inner {
                runtime: Mutex::new(Some(runtime)),
                handle,
                connect,
                sql: Sql::new(schema),
                schema: schema.to_owned(),
                notify: format!("NOTIFY {}", quote_ident(&format!("walsync_{schema}"))),
                writer: Mutex::new(None),
                taken: std::sync::atomic::AtomicU64::new(0),
                pool,
            }),
        };
        db.migrate()?;
        Ok(db)
    }

    /// Runs `fut` on the engine's runtime and waits for it.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(StorageError::Engine("the storage runtime stopped".into())))
    }

    fn connect(&self) -> Result<Arc<Client>> {
        let connect = self.inner.connect.clone();
        self.run(async move {
            connect()
                .await
                .map(Arc::new)
                .map_err(|e| StorageError::Unavailable(format!("cannot connect: {e}")))
        })
    }

    fn pooled(&self) -> Result<deadpool::managed::Object<Manager>> {
        let pool = self.inner.pool.clone();
        self.run(async move {
            pool.get().await.map_err(|e| match e {
                deadpool::managed::PoolError::Backend(e) => e,
                e => StorageError::Engine(format!("storage pool: {e}")),
            })
        })
    }

    /// Makes the schema (unless it exists: a role without `CREATE` on the database can use
    /// one made for it) and applies the migrations not applied yet, in one transaction;
    /// processes opening the store at once wait for each other on an advisory lock. (The
    /// connection is dropped on an error, which ends the transaction.)
    fn migrate(&self) -> Result<()> {
        let client = self.connect()?;
        let (schema, name) = (self.inner.sql.schema.clone(), self.inner.schema.clone());
        self.run(async move {
            client
                .batch_execute(
                    "BEGIN; SELECT pg_advisory_xact_lock(hashtext('walsync storage migrations'))",
                )
                .await
                .map_err(pg_error)?;
            let exists = client
                .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&name])
                .await
                .map_err(pg_error)?
                .is_some();
            if !exists {
                client
                    .batch_execute(&format!("CREATE SCHEMA {schema}"))
                    .await
                    .map_err(pg_error)?;
            }
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {schema}.migrations (
                         version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                ))
                .await
                .map_err(pg_error)?;
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i as i32 + 1;
                let done = client
                    .query_opt(
                        &format!("SELECT 1 FROM {schema}.migrations WHERE version = $1"),
                        &[&version],
                    )
                    .await
                    .map_err(pg_error)?
                    .is_some();
                if !done {
                    client
                        .batch_execute(&sql.replace("{s}", &schema))
                        .await
                        .map_err(pg_error)?;
                    client
                        .execute(
                            &format!("INSERT INTO {schema}.migrations (version) VALUES ($1)"),
                            &[&version],
                        )
                        .await
                        .map_err(pg_error)?;
                    tracing::info!(version, "storage database migrated");
                }
            }
            client.batch_execute("COMMIT").await.map_err(pg_error)
        })
    }

    /// The writer's connection, which holds the store's write lock: an advisory lock of the
    /// session, so that it is gone the moment the connection is (a writer that lost its
    /// connection can commit nothing more, and finds the lock taken when another process took
    /// over). [`StorageError::NotWriter`] while another process holds it.
    fn writer_connection(&self, conn: &mut Option<Arc<Client>>) -> Result<Arc<Client>> {
        if let Some(c) = conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        *conn = None;
        let c = self.connect()?;
        let (client, schema) = (c.clone(), self.inner.schema.clone());
        let locked = self.run(async move {
            let row = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext('walsync store ' || $1))",
                    &[&schema],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.get::<_, bool>(0))
        })?;
        if !locked {
            return Err(StorageError::NotWriter);
        }
        self.inner
            .taken
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        *conn = Some(c.clone());
        Ok(c)
    }

    /// Takes the store's write lock unless this process holds it already: how many times it
    /// took it so far (a new number means that another process may have written meanwhile).
    /// [`StorageError::NotWriter`] while another process holds it.
    pub(crate) fn lead(&self) -> Result<u64> {
        let mut conn = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.writer_connection(&mut conn)?;
        Ok(self.inner.taken.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The channel each commit notifies (`LISTEN` to it to learn of new checkpoints).
    pub(crate) fn channel(&self) -> String {
        format!("walsync_{}", self.inner.schema)
    }

    /// The write transaction, once the one before it has ended, on the connection that holds
    /// the write lock ([`PgDb::lead`]): with none (never taken, or lost with its connection),
    /// [`StorageError::NotWriter`], and only `lead` takes it again.
    pub(crate) fn write_tx(&self) -> Result<PgTx<'_>> {
        let mut conn = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(client) = conn.as_ref().filter(|c| !c.is_closed()).cloned() else {
            *conn = None;
            return Err(StorageError::NotWriter);
        };
        let c = client.clone();
        if let Err(e) = self.run(async move { c.batch_execute("BEGIN").await.map_err(pg_error) }) {
            *conn = None;
            return Err(e);
        }
        Ok(PgTx {
            session: Session {
                db: self.clone(),
                client,
            },
            conn,
            pending: RefCell::new(Pending::default()),
            done: false,
        })
    }

    /// A snapshot of what is committed now.
    pub(crate) fn snapshot(&self) -> Result<PgSnap> {
        let conn = self.pooled()?;
        let client: Arc<Client> = (*conn).clone();
        self.run(async move {
            client
                // The transaction's snapshot is taken by its first statement, here and now.
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
                .await
                .map_err(pg_error)
        })?;
        Ok(PgSnap {
            session: Session {
                db: self.clone(),
                client: (*conn).clone(),
            },
            conn: Some(conn),
        })
    }

    pub(crate) fn approximate_len(&self, space: Space) -> usize {
        let client = match self.pooled() {
            Ok(c) => (*c).clone(),
            Err(_) => return 0,
        };
        let table = self.inner.sql.table(space);
        self.run(async move {
            let row = client
                .query_one(
                    "SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = $1::regclass",
                    &[&table],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.get::<_, f64>(0) as usize)
        })
        .unwrap_or(0)
    }

    pub(crate) fn disk_space(&self) -> Result<u64> {
        let client = (*self.pooled()?).clone();
        let schema = self.inner.schema.clone();
        self.run(async move {
            let row = client
                .query_one(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relkind = 'r'",
                    &[&schema],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    /// A commit with `synchronous_commit = on` flushes the WAL up to it, and so every commit
    /// before it.
    pub(crate) fn persist(&self) -> Result<()> {
        let client = (*self.pooled()?).clone();
        self.run(async move {
            client
                .batch_execute(
                    "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT",
                )
                .await
                .map_err(pg_error)
        })
    }

    pub(crate) fn clear(&self, space: Space) -> Result<()> {
        let client = (*self.pooled()?).clone();
        let sql = format!("TRUNCATE {}", self.inner.sql.table(space));
        self.run(async move { client.batch_execute(&sql).await.map_err(pg_error) })
    }

    pub(crate) fn commit_batch(
        &self,
        entries: Vec<(Space, Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<()> {
        let client = (*self.pooled()?).clone();
        let mut pending = Pending::default();
        for (space, key, value) in entries {
            pending.set(space, key, value);
        }
        let sql = self.statements();
        self.run(async move {
            client
                .batch_execute("BEGIN; SET LOCAL synchronous_commit = off")
                .await
                .map_err(pg_error)?;
            let sent = send(&client, &sql, pending.take()).await;
            let end = if sent.is_ok() { "COMMIT" } else { "ROLLBACK" };
            client.batch_execute(end).await.map_err(pg_error)?;
            sent
        })
    }

    fn statements(&self) -> Statements {
        Statements(self.inner.clone())
    }
}

/// What a future needs of the SQL: the engine's, shared.
#[derive(Clone)]
struct Statements(Arc<Inner>);

/// Writes by keyspace and key: the last value of each (`None`: removed).
type Writes = BTreeMap<(Space, Vec<u8>), Option<Vec<u8>>>;

/// Writes not yet sent.
#[derive(Default)]
struct Pending {
    writes: Writes,
    bytes: usize,
}

impl Pending {
    fn set(&mut self, space: Space, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.bytes += key.len() + value.as_ref().map_or(0, Vec::len) + 32;
        self.writes.insert((space, key), value);
    }

    fn take(&mut self) -> Writes {
        self.bytes = 0;
        std::mem::take(&mut self.writes)
    }
}

/// Sends `writes` on `client` (in its open transaction): per keyspace one upsert of every
/// value and one delete of every removed key.
async fn send(client: &Client, sql: &Statements, writes: Writes) -> Result<()> {
    /// One keyspace's writes, as the statements' arrays.
    #[derive(Default)]
    struct Batch {
        keys: Vec<Vec<u8>>,
        values: Vec<Vec<u8>>,
        removed: Vec<Vec<u8>>,
    }
    let mut by_space: BTreeMap<Space, Batch> = BTreeMap::new();
    for ((space, key), value) in writes {
        let e = by_space.entry(space).or_default();
        match value {
            Some(v) => {
                e.keys.push(key);
                e.values.push(v);
            }
            None => e.removed.push(key),
        }
    }
    let sql = &sql.0.sql;
    for (
        space,
        Batch {
            keys,
            values,
            removed,
        },
    ) in by_space
    {
        if !removed.is_empty() {
            client
                .query_typed(
                    &sql.delete[space.index()],
                    &[(&removed as &(dyn ToSql + Sync), Type::BYTEA_ARRAY)],
                )
                .await
                .map_err(pg_error)?;
        }
        if !keys.is_empty() {
            client
                .query_typed(
                    &sql.upsert[space.index()],
                    &[
                        (&keys as &(dyn ToSql + Sync), Type::BYTEA_ARRAY),
                        (&values, Type::BYTEA_ARRAY),
                    ],
                )
                .await
                .map_err(pg_error)?;
        }
    }
    Ok(())
}

/// Reads on a connection, in its open transaction.
async fn get(
    client: &Client,
    sql: &Statements,
    space: Space,
    key: Vec<u8>,
) -> Result<Option<Bytes>> {
    let row = client
        .query_typed(
            &sql.0.sql.get[space.index()],
            &[(&key as &(dyn ToSql + Sync), Type::BYTEA)],
        )
        .await
        .map_err(pg_error)?;
    Ok(row.first().map(|r| Bytes::Vec(r.get(0))))
}

async fn get_many(
    client: &Client,
    sql: &Statements,
    space: Space,
    keys: Vec<Vec<u8>>,
) -> Result<Vec<Option<Bytes>>> {
    let rows = client
        .query_typed(
            &sql.0.sql.get_many[space.index()],
            &[(&keys as &(dyn ToSql + Sync), Type::BYTEA_ARRAY)],
        )
        .await
        .map_err(pg_error)?;
    // A key asked twice is answered twice.
    let found: std::collections::HashMap<Vec<u8>, Vec<u8>> =
        rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(keys
        .iter()
        .map(|k| found.get(k).cloned().map(Bytes::Vec))
        .collect())
}

async fn page(
    client: &Client,
    sql: &Statements,
    space: Space,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
    limit: i64,
    last: bool,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let text = sql.0.sql.range(space, &lo, &hi, last);
    let (lo, hi) = (bound_value(&lo), bound_value(&hi));
    let rows = client
        .query_typed(
            &text,
            &[
                (&lo as &(dyn ToSql + Sync), Type::BYTEA),
                (&hi, Type::BYTEA),
                (&limit, Type::INT8),
            ],
        )
        .await
        .map_err(pg_error)?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Where a range's pages come from.
trait Pages {
    fn page(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
        limit: i64,
        last: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
}

/// A range read a page at a time.
struct Paged<'a, P: Pages> {
    source: &'a P,
    space: Space,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
    buffer: VecDeque<(Vec<u8>, Vec<u8>)>,
    done: bool,
}

impl<P: Pages> Iterator for Paged<'_, P> {
    type Item = Result<(Bytes, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buffer.is_empty() && !self.done {
            match self
                .source
                .page(self.space, self.lo.clone(), self.hi.clone(), PAGE, false)
            {
                Ok(rows) => {
                    self.done = (rows.len() as i64) < PAGE;
                    if let Some((last, _)) = rows.last() {
                        self.lo = Bound::Excluded(last.clone());
                    }
                    self.buffer = rows.into();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        self.buffer
            .pop_front()
            .map(|(k, v)| Ok((Bytes::Vec(k), Bytes::Vec(v))))
    }
}

fn paged<'a, P: Pages>(
    source: &'a P,
    space: Space,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
) -> Entries<'a> {
    Box::new(Paged {
        source,
        space,
        lo,
        hi,
        buffer: VecDeque::new(),
        done: false,
    })
}

/// A connection in an open transaction, and its reads.
struct Session {
    db: PgDb,
    client: Arc<Client>,
}

impl Session {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
        let (client, sql, key) = (self.client.clone(), self.db.statements(), key.to_vec());
        self.db
            .run(async move { get(&client, &sql, space, key).await })
    }

    fn get_many(&self, space: Space, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Bytes>>> {
        let (client, sql) = (self.client.clone(), self.db.statements());
        self.db
            .run(async move { get_many(&client, &sql, space, keys).await })
    }

    /// Ends the transaction, and with `commit` sends `writes` before, in one round trip of
    /// the caller's.
    fn end(&self, writes: Writes, commit: Option<Durability>) -> Result<()> {
        let (client, sql) = (self.client.clone(), self.db.statements());
        self.db.run(async move {
            let notify = &sql.0.notify;
            let end = match commit {
                None => "ROLLBACK".to_owned(),
                Some(Durability::Sync) => format!("{notify}; COMMIT"),
                Some(Durability::Buffer) => {
                    format!("SET LOCAL synchronous_commit = off; {notify}; COMMIT")
                }
            };
            let sent = send(&client, &sql, writes).await;
            if sent.is_err() {
                let _ = client.batch_execute("ROLLBACK").await;
                return sent;
            }
            client.batch_execute(&end).await.map_err(pg_error)
        })
    }

    fn last_key(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Option<Bytes>> {
        Ok(self
            .page(space, lo, hi, 1, true)?
            .into_iter()
            .next()
            .map(|(k, _)| Bytes::Vec(k)))
    }
}

impl Pages for Session {
    fn page(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
        limit: i64,
        last: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (client, sql) = (self.client.clone(), self.db.statements());
        self.db
            .run(async move { page(&client, &sql, space, lo, hi, limit, last).await })
    }
}

/// The write transaction: a transaction on the writer's connection, with the writes it has not
/// sent yet.
pub(crate) struct PgTx<'a> {
    session: Session,
    conn: MutexGuard<'a, Option<Arc<Client>>>,
    pending: RefCell<Pending>,
    done: bool,
}

impl PgTx<'_> {
    pub(crate) fn insert(&mut self, space: Space, key: Vec<u8>, value: Vec<u8>) {
        self.pending.get_mut().set(space, key, Some(value));
    }

    pub(crate) fn remove(&mut self, space: Space, key: Vec<u8>) {
        self.pending.get_mut().set(space, key, None);
    }

    /// Sends the pending writes (before a range read, which PostgreSQL answers).
    fn flush(&self) -> Result<()> {
        let writes = self.pending.borrow_mut().take();
        if writes.is_empty() {
            return Ok(());
        }
        let (client, sql) = (self.session.client.clone(), self.session.db.statements());
        self.session
            .db
            .run(async move { send(&client, &sql, writes).await })
    }

    pub(crate) fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
        if let Some(v) = self.pending.borrow().writes.get(&(space, key.to_vec())) {
            return Ok(v.clone().map(Bytes::Vec));
        }
        self.session.get(space, key)
    }

    pub(crate) fn get_many(&self, space: Space, keys: &[&[u8]]) -> Result<Vec<Option<Bytes>>> {
        let mut out: Vec<Option<Option<Bytes>>> = {
            let pending = self.pending.borrow();
            keys.iter()
                .map(|k| {
                    pending
                        .writes
                        .get(&(space, k.to_vec()))
                        .map(|v| v.clone().map(Bytes::Vec))
                })
                .collect()
        };
        let missing: Vec<Vec<u8>> = keys
            .iter()
            .zip(&out)
            .filter(|(_, o)| o.is_none())
            .map(|(k, _)| k.to_vec())
            .collect();
        if !missing.is_empty() {
            let mut found = self.session.get_many(space, missing)?.into_iter();
            for o in out.iter_mut().filter(|o| o.is_none()) {
                *o = Some(found.next().flatten());
            }
        }
        Ok(out.into_iter().map(Option::flatten).collect())
    }

    pub(crate) fn range(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Entries<'_> {
        paged(self, space, lo, hi)
    }

    pub(crate) fn last_key(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Option<Bytes>> {
        self.flush()?;
        self.session.last_key(space, lo, hi)
    }

    pub(crate) fn commit(mut self, durability: Durability) -> Result<()> {
        let writes = self.pending.get_mut().take();
        self.done = true;
        let result = self.session.end(writes, Some(durability));
        if result.is_err() {
            // A connection that failed mid-transaction is not used again.
            *self.conn = None;
        }
        result
    }
}

impl Pages for PgTx<'_> {
    fn page(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
        limit: i64,
        last: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.flush()?;
        self.session.page(space, lo, hi, limit, last)
    }
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        if !self.done && self.session.end(Writes::new(), None).is_err() {
            *self.conn = None;
        }
    }
}

/// A read snapshot: a `REPEATABLE READ` transaction on a pooled connection, which goes back
/// to the pool once the transaction has ended.
pub(crate) struct PgSnap {
    session: Session,
    conn: Option<deadpool::managed::Object<Manager>>,
}

impl PgSnap {
    pub(crate) fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
        self.session.get(space, key)
    }

    pub(crate) fn get_many(&self, space: Space, keys: &[&[u8]]) -> Result<Vec<Option<Bytes>>> {
        self.session
            .get_many(space, keys.iter().map(|k| k.to_vec()).collect())
    }

    pub(crate) fn range(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Entries<'_> {
        paged(&self.session, space, lo, hi)
    }

    pub(crate) fn last_key(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Option<Bytes>> {
        self.session.last_key(space, lo, hi)
    }
}

impl Drop for PgSnap {
    fn drop(&mut self) {
        // Ended on the engine's runtime, without waiting: the connection goes back to the
        // pool only after, so the next snapshot on it starts a transaction of its own.
        if let Some(conn) = self.conn.take() {
            let client = self.session.client.clone();
            self.session.db.inner.handle.spawn(async move {
                if client.batch_execute("ROLLBACK").await.is_err() {
                    let _ = deadpool::managed::Object::take(conn);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;

    use super::Sql;
    use crate::kv::Space;
    use crate::{BucketStore, KvStore, StoreWriter, StoredRow};
    use walsync_types::{LookupEntry, LookupKey, RowId, RowOutput};

    /// The reads a sync stream makes, in the SQL the engine sends, are primary-key lookups and
    /// index range scans, never a scan of a table (the planner knows the tables' sizes: 20,000
    /// rows written in 200 commits, then `ANALYZE`).
    #[test]
    fn reads_are_index_scans() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let url = rt.block_on(async {
            walsync_testkit::shared()
                .fresh_database()
                .await
                .expect("database")
                .url
        });
        let connect = super::connect_without_tls(&url);
        let store = KvStore::open_postgres(connect, "plans", 2).expect("open");
        let mut w = store.writer().expect("writer");
        for i in 0..20_000 {
            // A commit every 100 rows: a chunk per bucket each.
            if i % 100 == 99 {
                w.commit().expect("commit");
                w = store.writer().expect("writer");
            }
            let id = i.to_string();
            w.upsert_row(
                "public.t",
                &RowId::from_encoded(&id),
                StoredRow::default(),
                vec![RowOutput {
                    bucket: format!("b{}", i % 100),
                    object_type: "t".into(),
                    object_id: id.clone(),
                    data: "{}".into(),
                }],
                vec![LookupEntry {
                    key: LookupKey {
                        definition: "d".into(),
                        query: 0,
                        values: vec![(i % 50).to_string()],
                    },
                    parameters: vec![serde_json::json!(i)],
                }],
            )
            .expect("upsert");
        }
        w.commit().expect("commit");
        let sql = Sql::new("plans");
        let range = |space: Space| {
            sql.range(
                space,
                &Bound::Excluded(Vec::new()),
                &Bound::Included(Vec::new()),
                false,
            )
        };
        let cases = [
            // Bucket "b7", its ops after op id 0x100.
            (
                "ops of a bucket after an op id",
                range(Space::OpIndex),
                "'\\x6237000000000000000100', '\\x6237ffffffffffffffffff', 1000",
            ),
            (
                "lookups at a checkpoint",
                range(Space::Lookups),
                "'\\x64', '\\x6401', 1000",
            ),
            (
                "the change log",
                range(Space::Changes),
                "'\\x0000000000000010', '\\x0000000000000020', 1000",
            ),
            (
                "a bucket's state",
                sql.get[Space::Buckets.index()].clone(),
                "'\\x62'",
            ),
            (
                "bucket states",
                sql.get_many[Space::Buckets.index()].clone(),
                "ARRAY['\\x62'::bytea]",
            ),
            ("a chunk", sql.get[Space::OpLog.index()].clone(), "'\\x01'"),
            (
                "a row copy",
                sql.get[Space::Rows.index()].clone(),
                "'\\x01'",
            ),
        ];
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            client
                .batch_execute("ANALYZE plans.op_index, plans.lookups, plans.buckets, plans.op_log, plans.rows, plans.changes")
                .await
                .expect("analyze");
            for (n, (what, text, args)) in cases.iter().enumerate() {
                let types = match args.matches(", ").count() {
                    0 if args.starts_with("ARRAY") => "(bytea[])",
                    0 => "(bytea)",
                    _ => "(bytea, bytea, int8)",
                };
                client
                    .batch_execute(&format!("PREPARE q{n} {types} AS {text}"))
                    .await
                    .expect("prepare");
                let plan: Vec<String> = client
                    .query(&format!("EXPLAIN EXECUTE q{n} ({args})"), &[])
                    .await
                    .expect("explain")
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let plan = plan.join("\n");
                assert!(plan.contains("Index"), "{what}: {plan}");
                assert!(!plan.contains("Seq Scan"), "{what}: {plan}");
            }
        });
    }
}
