//! The store in PostgreSQL against the conformance suite, plus what only a shared database can
//! show: several stores (processes) on one schema, its reads as index scans, its migrations.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use walsync_storage::conformance::{self, ClientBucket};
use walsync_storage::{BucketStore, Connect, KvStore, StoreRead, StoreWriter, StoredRow};
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

fn connect(url: &str) -> Connect {
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

/// A fresh, empty store: a schema of its own.
fn fresh_schema() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("store_{}", N.fetch_add(1, Ordering::Relaxed))
}

fn open(schema: &str) -> KvStore {
    KvStore::open_postgres(connect(database()), schema, 4).expect("open")
}

fn fresh() -> KvStore {
    open(&fresh_schema())
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
        w.upsert_row(
            "public.t",
            &RowId::from_encoded(i.to_string()),
            StoredRow::default(),
            vec![out("a", &i.to_string(), "{}")],
            vec![],
        )
        .expect("upsert");
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
        w.upsert_row(
            "public.t",
            &RowId::from_encoded(id),
            StoredRow::default(),
            vec![out("a", id, "{}")],
            vec![],
        )
        .expect("upsert");
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
    w.upsert_row(
        "public.t",
        &RowId::from_encoded("1"),
        StoredRow::default(),
        vec![out("a", "1", "{}")],
        vec![],
    )
    .expect("upsert");
    w.commit().expect("commit");
    drop(first);
    // The lock goes with the first store's connection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !second.try_lead().expect("lead") {
        assert!(
            std::time::Instant::now() < deadline,
            "the lock never passed on"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut w = second.writer().expect("writer");
    w.delete_row("public.t", &RowId::from_encoded("1"))
        .expect("delete");
    let cp = w.commit().expect("commit");
    assert_eq!(cp.op_id, 2, "op ids go on from the shared store");
    assert!(ClientBucket::read(&second, "a").rows.is_empty());
}
