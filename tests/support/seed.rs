//! The seed app in a test: a fresh database with its schema and sample data, a store, and the
//! check that a store holds exactly what the rules select from PostgreSQL. The PostgreSQL side
//! (schema, rules, sample data, workload) is `walsync_testkit::seed`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::{Client, SimpleQueryMessage};
use walsync_replicator::{Progress, ReplicatorConfig, ReplicatorError};
use walsync_rules::{RequestContext, RowRef, SyncRules};
use walsync_source::{PgConfig, SourceConfig};
use walsync_storage::conformance::ClientBucket;
use walsync_storage::{BucketStore, KvStore, StoreRead};
use walsync_testkit::shared;
use walsync_types::Value;

use walsync_testkit::seed::{RULES, SAMPLE_DATA, SCHEMA, TABLES, USERS};
pub use walsync_testkit::seed::{RULES_PATH, workload};

#[allow(missing_debug_implementations)]
pub struct Setup {
    pub sql: Client,
    pub url: String,
    pub slot: String,
    pub rules: Arc<SyncRules>,
    pub store: Arc<KvStore>,
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// A new connection for [`Setup::sql`] (after PostgreSQL restarted).
    pub async fn reconnect(&mut self) -> anyhow::Result<()> {
        let (sql, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        self.sql = sql;
        Ok(())
    }

    /// The one value `query` selects from the test database.
    pub async fn scalar<T: tokio_postgres::types::FromSqlOwned>(
        &self,
        query: &str,
    ) -> anyhow::Result<T> {
        Ok(self.sql.query_one(query, &[]).await?.get(0))
    }
}

pub async fn setup() -> anyhow::Result<Setup> {
    setup_in(&shared().fresh_database().await?).await
}

/// [`setup`] in `db` (of a cluster of the test's own).
pub async fn setup_in(db: &walsync_testkit::TestDatabase) -> anyhow::Result<Setup> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let sql = db.connect().await?;
    sql.batch_execute(SCHEMA).await?;
    sql.batch_execute("CREATE PUBLICATION walsync FOR ALL TABLES")
        .await?;
    // Some data before the slot exists, so the snapshot has work.
    sql.batch_execute(SAMPLE_DATA).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(KvStore::open(dir.path())?);
    Ok(Setup {
        sql,
        url: db.url.clone(),
        slot: db.name.clone(),
        rules: Arc::new(SyncRules::from_yaml(RULES)?),
        store,
        dir,
    })
}

pub fn config(s: &Setup) -> ReplicatorConfig {
    let pg: PgConfig = s.url.parse().expect("url");
    let mut source = SourceConfig::new(pg, s.slot.clone(), "walsync");
    source.required_tables = s.rules.qualified_tables();
    source.reconnect_max = Duration::from_millis(500);
    let mut c = ReplicatorConfig::new(source);
    c.max_commit_txns = 7;
    c
}

/// What the rules select from PostgreSQL, read directly: bucket → (type, id) → data.
pub async fn expected(
    s: &Setup,
) -> anyhow::Result<BTreeMap<String, BTreeMap<(String, String), String>>> {
    expected_in(&s.sql, &s.rules).await
}

/// [`expected`], read through `sql` (in whatever transaction it has open).
pub async fn expected_in(
    sql: &Client,
    rules: &SyncRules,
) -> anyhow::Result<BTreeMap<String, BTreeMap<(String, String), String>>> {
    let mut out: BTreeMap<String, BTreeMap<(String, String), String>> = BTreeMap::new();
    for table in TABLES {
        let cols = sql
            .query("SELECT attname::text, atttypid FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum", &[&table.to_string()])
            .await?;
        let names: Vec<String> = cols.iter().map(|r| r.get(0)).collect();
        let types: Vec<u32> = cols.iter().map(|r| r.get(1)).collect();
        for msg in sql
            .simple_query(&format!("SET TIME ZONE 'UTC'; SELECT * FROM {table}"))
            .await?
        {
            if let SimpleQueryMessage::Row(r) = msg {
                let values: Vec<Value> = (0..names.len())
                    .map(|i| match r.get(i) {
                        None => Value::Null,
                        Some(t) => walsync_source::datum::decode_text(types[i], t.as_bytes())
                            .expect("decodes"),
                    })
                    .collect();
                let row = RowRef {
                    schema: "public",
                    table,
                    columns: &names,
                    values: &values,
                };
                for o in rules.evaluate_row(&row) {
                    out.entry(o.bucket)
                        .or_default()
                        .insert((o.object_type, o.object_id), o.data);
                }
            }
        }
    }
    Ok(out)
}

/// Replays every bucket in the store; checks each bucket's state checksum against its ops.
/// Everything is read from one snapshot, so that a commit meanwhile (a rebuild's clear above all)
/// cannot pair one checkpoint's states with another's ops.
pub fn actual(store: &KvStore) -> BTreeMap<String, BTreeMap<(String, String), String>> {
    let mut out = BTreeMap::new();
    let snap = store.snapshot().expect("snapshot");
    let buckets = snap.buckets().expect("buckets");
    let states = snap.bucket_states(&buckets).expect("states");
    for (b, state) in buckets.iter().zip(states) {
        let state = state.expect("state of a listed bucket");
        let mut replay = ClientBucket::default();
        replay.catch_up_to(&snap, b, state.last_op_id);
        assert_eq!(
            state.checksum, replay.checksum,
            "bucket {b}: checksum is the sum of its ops"
        );
        if !replay.rows.is_empty() {
            out.insert(b.clone(), replay.rows);
        }
    }
    out
}

/// Users' buckets from the parameter index equal those from project_members directly.
async fn check_memberships(s: &Setup) -> anyhow::Result<()> {
    let at = s.store.checkpoint()?.op_id;
    for user in USERS {
        let (mut buckets, lookups) = s.rules.resolve_request(&RequestContext {
            user_id: user.to_string(),
            ..Default::default()
        });
        for key in lookups {
            for params in s.store.lookup(&key, at)? {
                buckets.push(walsync_types::bucket_id(&key.definition, &params));
            }
        }
        let got: BTreeSet<String> = buckets.into_iter().collect();
        let want = walsync_testkit::seed::user_buckets(&s.sql, user).await?;
        assert_eq!(got, want, "buckets of {user}");
    }
    Ok(())
}

/// Bucket → the (type, id) of each row in it.
type Placements = BTreeMap<String, BTreeSet<(String, String)>>;

fn placements(buckets: &BTreeMap<String, BTreeMap<(String, String), String>>) -> Placements {
    buckets
        .iter()
        .map(|(b, rows)| (b.clone(), rows.keys().cloned().collect()))
        .collect()
}

/// Waits until the store holds what PostgreSQL holds: each bucket's rows and data as the rules
/// select them, and each row in the buckets SQL alone places it in.
pub async fn wait_until_equal(s: &Setup) -> anyhow::Result<()> {
    let want = expected(s).await?;
    let placed = walsync_testkit::seed::expected_placements(&s.sql).await?;
    assert_eq!(
        placements(&want),
        placed,
        "the rules place rows where SQL does"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = actual(&s.store);
        if got == want && placements(&got) == placed && s.store.checkpoint()?.snapshot_complete {
            return check_memberships(s).await;
        }
        if tokio::time::Instant::now() > deadline {
            let missing: Vec<&String> = want
                .keys()
                .filter(|k| got.get(*k) != want.get(*k))
                .collect();
            if let Some(b) = missing.first() {
                let (w, g) = (&want[*b], got.get(*b).cloned().unwrap_or_default());
                let only_want: Vec<_> = w
                    .iter()
                    .filter(|(k, v)| g.get(*k) != Some(*v))
                    .take(3)
                    .collect();
                let only_got: Vec<_> = g
                    .iter()
                    .filter(|(k, v)| w.get(*k) != Some(*v))
                    .take(3)
                    .collect();
                eprintln!(
                    "first differing bucket {b}: postgres {} rows, store {}; only in postgres {only_want:?}; only in the store {only_got:?}",
                    w.len(),
                    g.len()
                );
            }
            anyhow::bail!("store never matched postgres; differing buckets: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn spawn(
    s: &Setup,
    config: ReplicatorConfig,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), ReplicatorError>>,
) {
    let (stop, task, _) = spawn_watched(s, config);
    (stop, task)
}

/// [`spawn`], with the replicator's progress to watch.
#[allow(clippy::type_complexity)]
pub fn spawn_watched(
    s: &Setup,
    config: ReplicatorConfig,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), ReplicatorError>>,
    watch::Receiver<Progress>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (progress, watched) = watch::channel(Progress::default());
    let task = tokio::spawn(walsync_replicator::run(
        config,
        s.rules.clone(),
        s.store.clone(),
        stop_rx,
        progress,
    ));
    (stop_tx, task, watched)
}

/// A fresh database with `schema` (which creates the publication `walsync`) and a store, for
/// `rules`: data and rules of a test's own.
pub async fn setup_with(schema: &str, rules: &str) -> anyhow::Result<Setup> {
    let db = shared().fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(schema).await?;
    let dir = tempfile::tempdir()?;
    Ok(Setup {
        store: Arc::new(KvStore::open(dir.path())?),
        sql,
        url: db.url.clone(),
        slot: db.name.clone(),
        rules: Arc::new(SyncRules::from_yaml(rules)?),
        dir,
    })
}

/// Waits until `bucket` holds exactly the rows `query` reads from PostgreSQL: each row's object
/// type, object id and data (a JSON object, compared as JSON).
pub async fn wait_until_bucket_is(s: &Setup, bucket: &str, query: &str) -> anyhow::Result<()> {
    type Rows = BTreeMap<(String, String), serde_json::Value>;
    let parsed = |rows: &BTreeMap<(String, String), String>| -> Rows {
        rows.iter()
            .map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap_or_default()))
            .collect()
    };
    let want: Rows = s
        .sql
        .query(query, &[])
        .await?
        .iter()
        .map(|r| {
            let data: String = r.get(2);
            (
                (r.get(0), r.get(1)),
                serde_json::from_str(&data).unwrap_or_default(),
            )
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = actual(&s.store);
        let rows = got.get(bucket).map(parsed).unwrap_or_default();
        if rows == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "{bucket} never matched postgresql: has {:?}, postgresql {:?}",
                rows.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows of one source transaction the [`application`] writes: `GROUP` teams of one project.
pub const GROUP: usize = 40;

/// The application under test: the seed workload in rounds and, after each, one transaction of
/// [`GROUP`] teams in one project tagged `tx-<attempt>` in `_last_modified_by` (see
/// `converge::Atomic`), until `done`; returns the rounds written. A round that fails (PostgreSQL
/// restarting) is tried again on a new connection.
pub fn application(
    url: String,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    tokio::spawn(async move {
        let mut round = 0u64;
        // Each attempt tags its group anew: a commit whose answer was lost is not tried again
        // under the same tag.
        let mut attempt = 0u64;
        let mut sql: Option<Client> = None;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let client = match sql.take() {
                Some(c) if !c.is_closed() => c,
                _ => match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        c
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            attempt += 1;
            let step = async {
                workload(&client, 7919 + round, 10).await?;
                client
                    .batch_execute(&format!(
                        "INSERT INTO teams (project_id, name, _last_modified_by)
                         SELECT {}, 'member ' || i, 'tx-{attempt}' FROM generate_series(1, {GROUP}) i",
                        1 + attempt % 6
                    ))
                    .await
            };
            if step.await.is_ok() {
                round += 1;
                sql = Some(client);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(round)
    })
}
