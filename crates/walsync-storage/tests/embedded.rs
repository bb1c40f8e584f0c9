//! The embedded store against the conformance suite, plus what only a file-backed store can show.

use walsync_storage::conformance::{self, ClientBucket};
use walsync_storage::{BucketStore, EmbeddedStore, StoreRead, StoreWriter, StoredRow};
use walsync_types::Lsn;

fn fresh() -> EmbeddedStore {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    EmbeddedStore::open(&dir).expect("open")
}

#[test]
fn conformance_suite() {
    conformance::run_all(fresh);
}

#[test]
fn survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let mut w = store.writer().expect("writer");
        w.upsert_row(
            "public.t",
            "1",
            StoredRow::default(),
            vec![walsync_rules::RowOutput {
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
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
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
    use walsync_rules::RowOutput;
    use walsync_storage::conformance::ClientBucket;
    use walsync_storage::{BucketStore, StoreRead, StoreWriter, StoredRow};

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
                        .upsert_row("public.t", &id.to_string(), StoredRow::default(), vec![RowOutput {
                            bucket: format!("b{bucket}"),
                            object_type: "t".into(),
                            object_id: id.to_string(),
                            data: format!("{{\"d\":{data}}}"),
                        }], vec![])
                        .expect("upsert"),
                    Step::Delete { id } => w.delete_row("public.t", &id.to_string()).expect("delete"),
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
