//! The store in PostgreSQL against the conformance suite, plus what only a shared database can
//! show: several stores (processes) on one schema, its reads as index scans, its migrations.

use std::sync::atomic::{AtomicU32, Ordering};

use walsync_storage::conformance::{self, ClientBucket};
use walsync_storage::{
    BucketStore, KvStore, StoreRead, StoreWriter, StoredRow, connect_without_tls,
};
use walsync_types::{Lsn, RowId, RowOutput};

/// The storage database of this test binary, made once.
fn database() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            walsync_testkit::shared()
                .fresh_database()
                .await
                .expect("database")
                .url
        })
    })
}

/// A fresh, empty store: a schema of its own.
fn fresh_schema() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("store_{}", N.fetch_add(1, Ordering::Relaxed))
}

fn open(schema: &str) -> KvStore {
    KvStore::open_postgres(connect_without_tls(database()), schema, 4).expect("open")
}

fn fresh() -> KvStore {
    open(&fresh_schema())
}

/// Waits (at most 10 s) until `store` holds the write lock.
fn takes_the_lock(store: &KvStore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !store.try_lead().expect("lead") {
        assert!(
            std::time::Instant::now() < deadline,
            "the lock never passed on"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Writes row `id` of `public.t` into bucket `a`.
fn put_one<W: StoreWriter>(w: &mut W, id: &str) {
    w.upsert_row(
        "public.t",
        &RowId::from_encoded(id),
        StoredRow::default(),
        vec![out("a", id, "{}")],
        vec![],
    )
    .expect("upsert");
}

fn out(bucket: &str, id: &str, data: &str) -> RowOutput {
    RowOutput {
        bucket: bucket.into(),
        object_type: "t".into(),
        object_id: id.into(),
        data: data.into(),
    }
}

#[test]
fn conformance_suite() {
    conformance::run_all(fresh);
}

/// Two stores on one schema are two processes sharing a storage database: what one commits
/// the other reads, and a reopened store finds it all.
#[test]
fn stores_on_one_schema_share_what_they_commit() {
    let schema = fresh_schema();
    let writer = open(&schema);
    let reader = open(&schema);
    let mut w = writer.writer().expect("writer");
    for i in 0..3 {
        put_one(&mut w, &i.to_string());
    }
    w.set_position(Lsn(42));
    w.set_snapshot_complete();
    // Not visible before the commit.
    assert_eq!(reader.checkpoint().expect("checkpoint").op_id, 0);
    w.commit().expect("commit");
    let cp = reader.checkpoint().expect("checkpoint");
    assert_eq!(
        (cp.op_id, cp.lsn, cp.snapshot_complete),
        (3, Some(Lsn(42)), true)
    );
    assert_eq!(ClientBucket::read(&reader, "a").rows.len(), 3);
    drop((writer, reader));
    let again = open(&schema);
    assert_eq!(again.checkpoint().expect("checkpoint").op_id, 3);
    assert!(again.size_on_disk().expect("size") > 0);
}

/// A snapshot keeps reading the checkpoint it began with while another store commits.
#[test]
fn a_snapshot_is_not_moved_by_a_commit_elsewhere() {
    let schema = fresh_schema();
    let a = open(&schema);
    let b = open(&schema);
    let put = |store: &KvStore, id: &str| {
        let mut w = store.writer().expect("writer");
        put_one(&mut w, id);
        w.commit().expect("commit")
    };
    put(&a, "1");
    let snap = b.snapshot().expect("snapshot");
    let before = snap.checkpoint().expect("checkpoint");
    put(&a, "2");
    assert_eq!(snap.checkpoint().expect("checkpoint"), before);
    assert_eq!(
        snap.bucket_states(&["a".into()]).expect("states")[0]
            .expect("state")
            .count,
        1
    );
    assert_eq!(b.checkpoint().expect("checkpoint").op_id, 2);
}

/// One process writes a shared store: a second is refused (and writes nothing) while the first
/// holds the write lock, and takes it over once the first is gone.
#[test]
fn one_store_writes_at_a_time_and_the_lock_passes_on() {
    let schema = fresh_schema();
    let first = open(&schema);
    let second = open(&schema);
    assert!(first.try_lead().expect("lead"));
    assert!(
        !second.try_lead().expect("lead"),
        "the first holds the lock"
    );
    match second.writer() {
        Err(walsync_storage::StorageError::NotWriter) => {}
        other => panic!("expected NotWriter, got {other:?}"),
    }
    let mut w = first.writer().expect("writer");
    put_one(&mut w, "1");
    w.commit().expect("commit");
    drop(first);
    // The lock goes with the first store's connection.
    takes_the_lock(&second);
    let mut w = second.writer().expect("writer");
    w.delete_row("public.t", &RowId::from_encoded("1"))
        .expect("delete");
    let cp = w.commit().expect("commit");
    assert_eq!(cp.op_id, 2, "op ids go on from the shared store");
    assert!(ClientBucket::read(&second, "a").rows.is_empty());
}

/// Fencing: a writer whose connection the server ended (and with it the lock) commits nothing,
/// and once another process took the lock it cannot write again.
#[test]
fn a_writer_that_lost_its_lock_writes_nothing_more() {
    let schema = fresh_schema();
    let first = open(&schema);
    let second = open(&schema);
    let mut w = first.writer().expect("writer");
    put_one(&mut w, "1");
    // The lock holder's session ends (an administrator, a network partition the server saw).
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ended: i64 = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(database(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
                 AND ((classid::bigint << 32) | objid::bigint) \
                     = hashtext('walsync store ' || $1::text)::bigint",
                &[&schema],
            )
            .await
            .expect("terminate")
            .get(0)
    });
    assert_eq!(ended, 1, "one session held the lock");
    // Nothing commits without the lock; the error says the database is out of reach, which a
    // replicator waits out (and then finds the lock taken).
    match w.commit() {
        Err(walsync_storage::StorageError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    takes_the_lock(&second);
    match first.writer() {
        Err(walsync_storage::StorageError::NotWriter) => {}
        other => panic!("expected NotWriter, got {other:?}"),
    }
    assert_eq!(second.checkpoint().expect("checkpoint").op_id, 0);
    assert!(ClientBucket::read(&second, "a").rows.is_empty());
}
