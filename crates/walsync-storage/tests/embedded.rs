//! The embedded store against the conformance suite, plus what only a file-backed store can show.

use walsync_storage::conformance::{self, ClientBucket};
use walsync_storage::{BucketStore, KvStore, StoreRead, StoreWriter, StoredRow};
use walsync_types::{Lsn, RowId};

fn fresh() -> KvStore {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    KvStore::open(&dir).expect("open")
}

#[test]
fn conformance_suite() {
    conformance::run_all(fresh);
}

#[test]
fn survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = KvStore::open(dir.path()).expect("open");
        let mut w = store.writer().expect("writer");
        w.upsert_row(
            "public.t",
            &RowId::from_encoded("1"),
            StoredRow::default(),
            vec![walsync_types::RowOutput {
                bucket: "a".into(),
                object_type: "t".into(),
                object_id: "1".into(),
                data: "{}".into(),
            }],
            vec![],
        )
        .expect("upsert");
        w.set_position(Lsn(42));
        w.set_snapshot_complete();
        w.commit().expect("commit");
    }
    let store = KvStore::open(dir.path()).expect("reopen");
    let cp = store.checkpoint().expect("checkpoint");
    assert_eq!(
        (cp.op_id, cp.lsn, cp.snapshot_complete),
        (1, Some(Lsn(42)), true)
    );
    assert_eq!(ClientBucket::read(&store, "a").rows.len(), 1);
    assert!(store.size_on_disk().expect("size") > 0);
}

mod compaction_property {
    use proptest::prelude::*;
    use walsync_storage::conformance::ClientBucket;
    use walsync_storage::{BucketStore, StoreRead, StoreWriter, StoredRow};
    use walsync_types::{RowId, RowOutput};

    #[derive(Debug, Clone)]
    enum Step {
        Put { id: u8, bucket: u8, data: u8 },
        Delete { id: u8 },
        Commit,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..6u8, 0..3u8, 0..3u8).prop_map(|(id, bucket, data)| Step::Put { id, bucket, data }),
            2 => (0..6u8).prop_map(|id| Step::Delete { id }),
            2 => Just(Step::Commit),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// A client replaying the compacted log, from the start or from anywhere it had reached,
        /// ends with the same rows and checksum as one replaying the original log.
        #[test]
        fn compacted_log_replays_to_the_same_rows_and_checksums(steps in proptest::collection::vec(step(), 1..80), cut in 0..100usize) {
            let store = super::fresh();
            let mut w = store.writer().expect("writer");
            for s in steps {
                match s {
                    Step::Put { id, bucket, data } => w
                        .upsert_row("public.t", &RowId::from_encoded(id.to_string()), StoredRow::default(), vec![RowOutput {
                            bucket: format!("b{bucket}"),
                            object_type: "t".into(),
                            object_id: id.to_string(),
                            data: format!("{{\"d\":{data}}}"),
                        }], vec![])
                        .expect("upsert"),
                    Step::Delete { id } => w.delete_row("public.t", &RowId::from_encoded(id.to_string())).expect("delete"),
                    Step::Commit => {
                        w.commit().expect("commit");
                        w = store.writer().expect("writer");
                    }
                }
            }
            w.commit().expect("commit");
            let buckets = ["b0", "b1", "b2"];
            let before: Vec<ClientBucket> = buckets.iter().map(|b| ClientBucket::read(&store, b)).collect();
            let mut partial: Vec<ClientBucket> = buckets.iter().map(|b| {
                let ops = store.ops(b, 0, u64::MAX, 10_000).expect("ops");
                let mut c = ClientBucket::default();
                c.apply(&ops[..ops.len() * cut / 100]);
                c
            }).collect();
            store.compact().expect("compact");
            for (i, b) in buckets.iter().enumerate() {
                let after = ClientBucket::read(&store, b);
                prop_assert_eq!(&after.rows, &before[i].rows);
                prop_assert_eq!(after.checksum, before[i].checksum);
                let state = store.bucket_states(&[b.to_string()]).expect("state")[0].unwrap_or_default();
                prop_assert_eq!(state.checksum, before[i].checksum);
                partial[i].catch_up(&store, b);
                prop_assert_eq!(&partial[i].rows, &before[i].rows);
                prop_assert_eq!(partial[i].checksum, before[i].checksum);
            }
        }
    }
}

/// The store skips the lookup of a row whose key is above every key its table has; whatever
/// the order of the ids, abandoned commits and reopenings, a row that moves or goes is still
/// removed from the bucket it was in.
mod row_key_bounds_property {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use walsync_storage::conformance::ClientBucket;
    use walsync_storage::{BucketStore, KvStore, StoreWriter, StoredRow};
    use walsync_types::{RowId, RowOutput};

    #[derive(Debug, Clone)]
    enum Step {
        Put { id: i64, bucket: u8 },
        Delete { id: i64 },
        Commit,
        Abandon,
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (-3..8i64, 0..2u8).prop_map(|(id, bucket)| Step::Put { id, bucket }),
            2 => (-3..8i64).prop_map(|id| Step::Delete { id }),
            2 => Just(Step::Commit),
            1 => Just(Step::Abandon),
            1 => Just(Step::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn rows_leave_their_old_bucket_whatever_the_key_order(steps in proptest::collection::vec(step(), 1..60)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = KvStore::open(dir.path()).expect("open");
            // What the store holds once committed, and what the open commit has on top.
            let mut committed: BTreeMap<i64, u8> = BTreeMap::new();
            let mut open = committed.clone();
            let mut w = Some(store.writer().expect("writer"));
            for s in steps {
                match s {
                    Step::Put { id, bucket } => {
                        let out = RowOutput {
                            bucket: format!("b{bucket}"),
                            object_type: "t".into(),
                            object_id: id.to_string(),
                            data: "{}".into(),
                        };
                        let w = w.get_or_insert_with(|| store.writer().expect("writer"));
                        w.upsert_row("public.t", &RowId::from_encoded(format!("[\"{id}\"]")), StoredRow::default(), vec![out], vec![])
                            .expect("upsert");
                        open.insert(id, bucket);
                    }
                    Step::Delete { id } => {
                        let w = w.get_or_insert_with(|| store.writer().expect("writer"));
                        w.delete_row("public.t", &RowId::from_encoded(format!("[\"{id}\"]"))).expect("delete");
                        open.remove(&id);
                    }
                    Step::Commit => {
                        if let Some(w) = w.take() {
                            w.commit().expect("commit");
                        }
                        committed = open.clone();
                    }
                    Step::Abandon => {
                        w = None;
                        open = committed.clone();
                    }
                    Step::Reopen => {
                        w = None;
                        open = committed.clone();
                        drop(store);
                        store = KvStore::open(dir.path()).expect("reopen");
                    }
                }
            }
            if let Some(w) = w.take() {
                w.commit().expect("commit");
            }
            for bucket in 0..2u8 {
                let rows: Vec<String> = ClientBucket::read(&store, &format!("b{bucket}"))
                    .rows
                    .into_keys()
                    .map(|(_, id)| id)
                    .collect();
                let mut expected: Vec<String> = open
                    .iter()
                    .filter(|(_, b)| **b == bucket)
                    .map(|(id, _)| id.to_string())
                    .collect();
                expected.sort();
                prop_assert_eq!(rows, expected, "bucket b{}", bucket);
            }
        }
    }
}

/// A staged transaction that never commits — its writer dropped, or the process gone with
/// its steps in the store — is undone whole: readers never see it, and the store then goes on
/// exactly as one that never had it.
#[test]
fn a_staged_transaction_that_never_commits_is_undone() {
    let plain = fresh();
    let base = conformance::staged_base(&plain);
    let expected = conformance::Seen::read(&plain, base.op_id);
    // Dropped: undone before the next writer.
    let dropped = fresh();
    conformance::staged_base(&dropped);
    let mut w = dropped.staged_writer(4 << 10).expect("staged writer");
    conformance::staged_workload(&mut w, 7);
    drop(w);
    assert_eq!(
        conformance::Seen::read(&dropped, base.op_id).without_rows(),
        expected.without_rows()
    );
    let w = dropped.writer().expect("writer");
    w.commit().expect("commit");
    // An ordinary writer that became staged where it stood, dropped: the same.
    let mut w = dropped.writer().expect("writer");
    w.set_budget(Some(4 << 10));
    conformance::staged_workload(&mut w, 5);
    assert!(w.is_staged());
    drop(w);
    let w = dropped.writer().expect("writer");
    w.commit().expect("commit");
    // Cut off: the steps are in the store's files when it opens again.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let crashed = KvStore::open(dir.path()).expect("open");
        conformance::staged_base(&crashed);
        let mut w = crashed.staged_writer(4 << 10).expect("staged writer");
        conformance::staged_workload(&mut w, 7);
        drop(w);
        crashed.sync().expect("sync");
    }
    let crashed = KvStore::open(dir.path()).expect("open");
    // An empty commit on the plain store too, so that both checkpoints match.
    plain.writer().expect("writer").commit().expect("commit");
    for store in [&dropped, &crashed] {
        assert_eq!(
            conformance::Seen::read(store, base.op_id),
            conformance::Seen::read(&plain, base.op_id)
        );
    }
    for store in [&plain, &dropped, &crashed] {
        let mut w = store.writer().expect("writer");
        conformance::staged_workload(&mut w, 11);
        w.commit().expect("commit");
    }
    for store in [&dropped, &crashed] {
        assert_eq!(
            conformance::Seen::read(store, base.op_id),
            conformance::Seen::read(&plain, base.op_id)
        );
    }
}
