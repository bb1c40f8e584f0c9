//! Record formats, chunks, row keys and the migration of earlier layouts.

use fjall::KeyspaceCreateOptions;
use walsync_types::{
    LookupEntry, LookupKey, OpKind, RowId, RowOutput, add_checksums, put_checksum,
};

use super::chunk::{OpValue, chunk_ops, push_op};
use super::engine::{Durability, FjallDb};
use super::keys::{ROW_KEYS, RowKeys, key2, op_key};
use super::record::{Writer, encode};
use super::row::{Placement, RowRecord};
use super::*;
use crate::StoreWriter;

#[test]
fn op_records_round_trip_and_json_records_still_read() {
    for (k, d) in [
        (OpKind::Put, Some("{\"a\":\"x\\ny\"}".to_owned())),
        (OpKind::Remove, None),
        (OpKind::Move, None),
        (OpKind::Clear, None),
    ] {
        let v = OpValue {
            k,
            t: "tä".into(),
            i: "1/2".into(),
            d,
            c: 0xDEAD_BEEF,
        };
        let back = OpValue::from_bytes(&v.to_bytes()).expect("binary");
        assert_eq!(
            (back.k, back.t, back.i, back.d, back.c),
            (v.k, v.t.clone(), v.i.clone(), v.d.clone(), v.c)
        );
        let json = serde_json::to_vec(&v).expect("json");
        let old = OpValue::from_bytes(&json).expect("a record written as json");
        assert_eq!(old.d, v.d);
    }
    let good = OpValue {
        k: OpKind::Put,
        t: "t".into(),
        i: "1".into(),
        d: Some("{}".into()),
        c: 1,
    }
    .to_bytes();
    for cut in 0..good.len() {
        assert!(OpValue::from_bytes(&good[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn row_records_round_trip_and_json_records_still_read() {
    use walsync_types::Value;
    let rec = RowRecord {
        s: 0xFEED_F00D_1234_5678,
        v: vec![
            Value::Null,
            Value::Bool(true),
            Value::Int(-42),
            Value::Float(-0.5),
            Value::Text("tä\n\"x\"".into()),
            // Compact, as earlier versions' JSON records held it, so that both forms round-trip.
            Value::Json(r#"{"a":[1,null,"b"]}"#.into()),
            Value::Bytes(vec![0, 255, 7]),
            Value::Array(vec![Value::Int(1), Value::Array(vec![Value::Null])]),
        ],
        placements: vec![Placement {
            bucket: "b[\"1\"]".into(),
            object_type: "t".into(),
            object_id: "1".into(),
            checksum: 0xDEAD_BEEF,
            fingerprint: Some(u128::MAX - 7),
        }],
        copies: 3,
        lookups: vec![LookupEntry {
            key: LookupKey {
                definition: "d".into(),
                query: 1,
                values: vec!["u1".into()],
            },
            parameters: vec![serde_json::json!(7)],
        }],
    };
    let same = |a: &RowRecord, b: &RowRecord| {
        assert_eq!(
            (a.s, &a.v, &a.placements, &a.lookups),
            (b.s, &b.v, &b.placements, &b.lookups)
        );
    };
    let bytes = rec.to_bytes().expect("encode");
    same(&RowRecord::from_bytes(&bytes).expect("binary"), &rec);
    // The binary form keeps JSON text exactly as PostgreSQL printed it.
    let exact = RowRecord {
        v: vec![Value::Json(
            r#"{"big": 12345678901234567890123, "b": 1, "b": 2, "s": "\ud83d"}"#.into(),
        )],
        ..rec.clone()
    };
    same(
        &RowRecord::from_bytes(&exact.to_bytes().expect("encode")).expect("binary"),
        &exact,
    );
    same(
        &RowRecord::from_bytes(&serde_json::to_vec(&rec).expect("json")).expect("json record"),
        &rec,
    );
    for cut in 0..bytes.len() {
        assert!(
            RowRecord::from_bytes(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(RowRecord::from_bytes(&longer).is_err());
}

#[test]
fn chunks_round_trip_and_fail_cleanly_when_cut() {
    let mut w = Writer::with_capacity(16);
    push_op(&mut w, 7, OpKind::Put, "t", "1", Some("{}"), 1);
    push_op(&mut w, 9, OpKind::Remove, "t", "2", None, 2);
    let ops = chunk_ops(&w.0).expect("chunk");
    assert_eq!(ops.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [7, 9]);
    let second = OpValue::from_bytes(ops[1].1).expect("op");
    assert_eq!(
        (second.k, second.i.as_str(), second.c),
        (OpKind::Remove, "2", 2)
    );
    for cut in 1..w.0.len() {
        let ok = chunk_ops(&w.0[..cut]).and_then(|ops| {
            ops.iter()
                .try_for_each(|(_, r)| OpValue::from_bytes(r).map(drop))
        });
        assert!(ok.is_err(), "cut at {cut}");
    }
}

fn fjall(store: &KvStore) -> &FjallDb {
    match &store.db {
        Db::Fjall(f) => f,
        Db::Postgres(_) => unreachable!("an embedded store"),
    }
}

/// Stores written before ops were kept in chunks hold one op record per key.
#[test]
fn ops_of_earlier_versions_move_on_open_then_read_and_compact() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = KvStore::open(dir.path()).expect("open");
    assert!(
        !fjall(&store).db.keyspace_exists("ops"),
        "a new store has no ops"
    );
    let old = |store: &KvStore| {
        fjall(store)
            .db
            .keyspace("ops", KeyspaceCreateOptions::default)
            .expect("ops")
    };
    let put = |i: &str, d: &str| OpValue {
        k: OpKind::Put,
        t: "t".into(),
        i: i.into(),
        d: Some(d.into()),
        c: put_checksum("t", i, d),
    };
    let legacy = [
        (1, put("1", "{}")),
        (2, put("1", "{\"v\":2}")),
        (3, put("2", "{}")),
    ];
    let f = fjall(&store);
    let mut tx = f.db.write_tx();
    let mut state = BucketState::default();
    // Ops 1 and 2 one per key, op 3 in a chunk, as earlier versions kept them.
    let ops = old(&store);
    for (id, op) in &legacy {
        if *id == 3 {
            let mut chunk = Writer::with_capacity(64);
            push_op(&mut chunk, 3, op.k, &op.t, &op.i, op.d.as_deref(), op.c);
            tx.insert(&ops, op_key("a", 3), chunk.0);
        } else {
            tx.insert(&ops, op_key("a", *id), op.to_bytes());
        }
        state.checksum = add_checksums(state.checksum, op.c);
        state.count += 1;
        state.last_op_id = *id;
    }
    tx.insert(
        f.keyspace(Space::Buckets),
        b"a".to_vec(),
        encode(&state).expect("state"),
    );
    let checkpoint = StoreCheckpoint {
        op_id: 3,
        ..StoreCheckpoint::default()
    };
    tx.insert(
        f.keyspace(Space::Meta),
        b"checkpoint".to_vec(),
        encode(&checkpoint).expect("cp"),
    );
    tx.commit().expect("commit");
    drop((ops, store));
    let store = KvStore::open(dir.path()).expect("reopen");
    assert!(
        !fjall(&store).db.keyspace_exists("ops"),
        "moved, and the old keyspace deleted"
    );
    let mut w = store.writer().expect("writer");
    let row = StoredRow {
        columns: vec!["v".to_owned()].into(),
        values: vec![],
    };
    for i in ["2", "3"] {
        let out = RowOutput {
            bucket: "a".into(),
            object_type: "t".into(),
            object_id: i.into(),
            data: "{\"v\":3}".into(),
        };
        w.upsert_row(
            "public.t",
            &RowId::from_encoded(i),
            row.clone(),
            vec![out],
            vec![],
        )
        .expect("upsert");
    }
    w.commit().expect("commit");

    let ids = |after, up_to| -> Vec<u64> {
        let ops = store.ops("a", after, up_to, usize::MAX).expect("ops");
        ops.iter().map(|o| o.op_id).collect()
    };
    assert_eq!(ids(0, u64::MAX), [1, 2, 3, 4, 5]);
    assert_eq!(ids(2, 4), [3, 4]);
    let replay = |ops: Vec<Op>| {
        let mut rows = BTreeMap::new();
        let mut sum = 0u32;
        for op in ops {
            match op.kind {
                OpKind::Put => drop(rows.insert(op.object_id, op.data)),
                OpKind::Clear => {
                    rows.clear();
                    sum = 0;
                }
                _ => drop(rows.remove(&op.object_id)),
            }
            sum = add_checksums(sum, op.checksum);
        }
        (rows, sum)
    };
    let before = replay(store.ops("a", 0, u64::MAX, usize::MAX).expect("ops"));
    let stats = store.compact().expect("compact");
    assert_eq!(
        (stats.moved, stats.cleared),
        (2, 1),
        "ops 1 and 3 superseded"
    );
    let after = store.ops("a", 0, u64::MAX, usize::MAX).expect("ops");
    assert_eq!(
        after.iter().map(|o| (o.op_id, o.kind)).collect::<Vec<_>>(),
        [
            (1, OpKind::Clear),
            (2, OpKind::Put),
            (3, OpKind::Move),
            (4, OpKind::Put),
            (5, OpKind::Put),
        ]
    );
    assert_eq!(replay(after), before);
}

#[test]
fn integer_row_ids_key_in_numeric_order_and_read_back() {
    let ints = [
        i64::MIN,
        -1_000_000,
        -5,
        -1,
        0,
        1,
        9,
        10,
        999,
        1000,
        1_000_000,
        i64::MAX,
    ];
    let keys: Vec<Vec<u8>> = ints
        .iter()
        .map(|i| RowKeys::Ordered.key("public.t", &RowId::from_int(*i)))
        .collect();
    assert!(keys.windows(2).all(|k| k[0] < k[1]), "numeric order");
    for (i, k) in ints.iter().zip(&keys) {
        let part = &k["public.t".len() + 1..];
        assert_eq!(RowKeys::Ordered.row_id(part), RowId::from_int(*i));
    }
    for text in [
        "[\"007\"]",
        "[\"-0\"]",
        "[\"+1\"]",
        "[\"1\",\"2\"]",
        "[\"\"]",
        "[1]",
    ] {
        let id = RowId::from_encoded(text);
        assert_eq!(id.as_int(), None, "{text}");
        let k = RowKeys::Ordered.key("t", &id);
        assert_eq!(RowKeys::Ordered.row_id(&k[2..]), id);
    }
    assert_eq!(RowKeys::Text.key("t", &RowId::from_int(5)), b"t\0[\"5\"]");
}

/// A store made before integer row ids were keyed by number keeps its text keys.
#[test]
fn stores_with_text_row_keys_keep_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = "[\"12\"]";
    let rec = RowRecord {
        s: 0,
        v: vec![],
        placements: vec![],
        lookups: vec![],
        copies: 1,
    };
    {
        let store = KvStore::open(dir.path()).expect("open");
        assert_eq!(store.s.row_keys, RowKeys::Ordered, "a new store");
        let mut tx = store.db.write_tx().expect("tx");
        tx.remove(Space::Meta, ROW_KEYS);
        tx.insert(
            Space::Rows,
            key2("public.t", id.as_bytes()),
            rec.to_bytes().expect("rec"),
        );
        tx.commit(Durability::Sync).expect("commit");
    }
    let store = KvStore::open(dir.path()).expect("reopen");
    assert_eq!(store.s.row_keys, RowKeys::Text);
    let mut w = store.writer().expect("writer");
    assert!(
        w.record("public.t", &key2("public.t", id.as_bytes()))
            .expect("record")
            .is_some()
    );
    w.truncate("public.t").expect("truncate");
    w.commit().expect("commit");
    assert!(
        store
            .snapshot()
            .expect("snap")
            .snap
            .iter(Space::Rows)
            .next()
            .is_none()
    );
    drop(store);
    let store = KvStore::open(dir.path()).expect("reopen");
    assert_eq!(
        store.s.row_keys,
        RowKeys::Ordered,
        "an empty store changes over"
    );
}

/// The row filter spares lookups of keys the store never held, and never hides one it holds:
/// rows stored under random text keys before a reopen (found by the filter's scan) and in the
/// commits since (noted by their writers) are found again when they change, so each leaves its
/// old bucket; keys deleted meanwhile are new again.
#[test]
fn the_row_filter_never_hides_a_stored_row() {
    use crate::model::StoredRow;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = |i: u64| {
        // Random-looking, not growing: the table's bound does not cover them.
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
        RowId::from_encoded(format!("[\"{h:016x}-{i}\"]"))
    };
    let row = |v: i64| StoredRow {
        columns: vec!["v".to_owned()].into(),
        values: vec![walsync_types::Value::Int(v)],
    };
    let put = |w: &mut KvWriter<'_>, i: u64, bucket: &str| {
        w.upsert_row(
            "public.t",
            &key(i),
            row(i as i64),
            vec![RowOutput {
                bucket: bucket.into(),
                object_type: "t".into(),
                object_id: i.to_string(),
                data: format!("{{\"b\":\"{bucket}\"}}"),
            }],
            vec![],
        )
        .expect("upsert");
    };
    let bucket_rows = |store: &KvStore, bucket: &str| {
        crate::conformance::ClientBucket::read(store, bucket)
            .rows
            .len()
    };
    {
        let store = KvStore::open(dir.path()).expect("open");
        for chunk in 0..4 {
            let mut w = store.writer().expect("writer");
            for i in chunk * 500..(chunk + 1) * 500 {
                put(&mut w, i, "a");
            }
            w.commit().expect("commit");
        }
    }
    let store = KvStore::open(dir.path()).expect("reopen");
    let mut w = store.writer().expect("writer");
    for i in 2_000..2_500 {
        put(&mut w, i, "a");
    }
    w.delete_row("public.t", &key(7)).expect("delete");
    w.commit().expect("commit");
    let filter = store
        .known
        .lock()
        .expect("lock")
        .filter
        .clone()
        .expect("the first writer makes the filter");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !filter.ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "the filter is never ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Every stored row moves from a to b; key 7 comes back as a new row.
    let mut w = store.writer().expect("writer");
    for i in 0..2_500 {
        put(&mut w, i, "b");
    }
    w.commit().expect("commit");
    assert_eq!(
        bucket_rows(&store, "a"),
        0,
        "a stored row was taken for a new one"
    );
    assert_eq!(bucket_rows(&store, "b"), 2_500);
    let removes = store
        .ops("a", 0, u64::MAX, 10_000)
        .expect("ops")
        .iter()
        .filter(|o| o.kind == OpKind::Remove)
        .count();
    // One for each row that moved (2,499) and one for the row deleted.
    assert_eq!(removes, 2_500, "one REMOVE for each row that was in a");
}

/// A store whose first making was cut short (the engine's lock file and first journal written,
/// its version marker not yet, or empty) opens as a new store; one that was made opens with its
/// data, however often it is opened.
#[test]
fn a_store_whose_first_making_was_interrupted_opens_anew() {
    for marker in [None, Some(&b""[..])] {
        let dir = tempfile::tempdir().expect("dir");
        let engine = dir.path().join("walsync.fjall");
        std::fs::create_dir_all(engine.join("keyspaces")).expect("dirs");
        std::fs::write(engine.join("lock"), b"").expect("lock");
        std::fs::write(engine.join("0.jnl"), vec![0u8; 4096]).expect("journal");
        if let Some(m) = marker {
            std::fs::write(engine.join("version"), m).expect("marker");
        }
        let store = KvStore::open(dir.path()).expect("opens anew");
        assert_eq!(store.checkpoint().expect("checkpoint").op_id, 0);
        let mut w = store.writer().expect("writer");
        w.set_rules("r");
        w.commit().expect("commit");
        drop(store);
        let again = KvStore::open(dir.path()).expect("opens again");
        assert_eq!(
            again.checkpoint().expect("checkpoint").rules.as_deref(),
            Some("r"),
            "a made store keeps its data"
        );
    }
}
