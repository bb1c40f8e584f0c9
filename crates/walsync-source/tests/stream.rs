//! The source against a real PostgreSQL: changes, types, TOAST, TRUNCATE, schema changes,
//! snapshot consistency, resuming, and protocol 2 streaming.

mod support;

use std::collections::BTreeMap;

use support::{Collector, int};
use walsync_source::{Change, Datum, OldRow, Resume, SourceEvent};
use walsync_testkit::shared;
use walsync_types::Value;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);";

#[tokio::test]
async fn every_kind_of_change_arrives_in_commit_order() -> anyhow::Result<()> {
    let db = support::database(shared(), ITEMS).await?;
    db.sql
        .batch_execute("INSERT INTO items VALUES (1, 'before', 0)")
        .await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    assert_eq!(
        c.snapshot.len(),
        1,
        "the row written before the slot comes from the snapshot"
    );

    db.each(&[
        "INSERT INTO items VALUES (2, 'a', 1), (3, 'b', 2)",
        "UPDATE items SET qty = 5 WHERE id = 2",
        "UPDATE items SET id = 4 WHERE id = 3",
        "DELETE FROM items WHERE id = 1",
        "BEGIN; INSERT INTO items VALUES (10, 'x', 1); INSERT INTO items VALUES (11, 'y', 1); COMMIT;",
        "TRUNCATE items",
    ])
    .await?;
    c.until(&mut stream, |c| c.txns.len() >= 6).await?;
    let changes: Vec<&Change> = c.changes().collect();
    assert!(matches!(changes[0], Change::Insert { new, .. } if int(new, 0) == 2));
    assert!(matches!(changes[1], Change::Insert { new, .. } if int(new, 0) == 3));
    assert!(matches!(changes[2], Change::Update { old: None, new, .. } if int(new, 2) == 5));
    match changes[3] {
        Change::Update {
            old: Some(OldRow::Key(old)),
            new,
            ..
        } => {
            assert_eq!(
                (int(old, 0), int(new, 0)),
                (3, 4),
                "key change carries the old key"
            );
            assert_eq!(
                old[1],
                Datum::Value(Value::Null),
                "non-key columns of the old key are null"
            );
        }
        other => panic!("expected a key-changing update, got {other:?}"),
    }
    assert!(matches!(changes[4], Change::Delete { old: OldRow::Key(old), .. } if int(old, 0) == 1));
    assert_eq!(
        c.txns[4].changes.len(),
        2,
        "a multi-statement transaction arrives whole"
    );
    match changes.last() {
        Some(Change::Truncate {
            tables,
            cascade: false,
            restart_identity: false,
        }) => assert_eq!(tables[0].name, "items"),
        other => panic!("expected truncate, got {other:?}"),
    }
    stream.stop().await;
    Ok(())
}

/// Values PostgreSQL stores that no JSON library or array parser of ours may rewrite or choke on:
/// each arrives exactly as PostgreSQL prints it (read back with `::text`), in the snapshot and in
/// the stream alike, and the stream goes on after them.
#[tokio::test]
async fn hostile_values_arrive_as_postgresql_prints_them_and_stop_nothing() -> anyhow::Result<()> {
    let schema = "CREATE TABLE hostile (
        id int PRIMARY KEY, j json, jb jsonb, deep jsonb, i2v int2vector, oidv oidvector,
        boxes box[], lower int4[], jbs jsonb[])";
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let values = format!(
        r#"'{{"big": 12345678901234567890123, "d": 0.1000000000000000055511151231257827, "b": 1, "b": 2, "s": "\ud83d", "x": 1e400}}',
        '{{"big": 12345678901234567890123, "tiny": 1e-400, "d": 0.1000000000000000055511151231257827, "z": 1, "a": 2}}',
        '{deep}', '1 2 3', '23 25', ARRAY['((1,2),(3,4))'::box, '((5,6),(7,8))'::box],
        '[2:3]={{1,2}}', ARRAY['null'::jsonb, NULL, '{{"a": 1e400}}'::jsonb]"#
    );
    let db = support::database(shared(), schema).await?;
    db.sql
        .batch_execute(&format!("INSERT INTO hostile VALUES (1, {values})"))
        .await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    db.sql
        .batch_execute(&format!(
            "INSERT INTO hostile VALUES (2, {values}); INSERT INTO hostile (id) VALUES (3)"
        ))
        .await?;
    c.until(&mut stream, |c| {
        c.txns.iter().map(|t| t.changes.len()).sum::<usize>() >= 2
    })
    .await?;

    let row = db
        .sql
        .query_one(
            "SELECT j::text, jb::text, deep::text, i2v::text, oidv::text, lower::text FROM hostile WHERE id = 1",
            &[],
        )
        .await?;
    let text = |i: usize| row.get::<_, String>(i);
    let expected: Vec<Datum> = vec![
        Value::Json(text(0)),
        Value::Json(text(1)),
        Value::Json(text(2)),
        Value::Text(text(3)),
        Value::Text(text(4)),
        Value::Array(vec![
            Value::Text("(3,4),(1,2)".into()),
            Value::Text("(7,8),(5,6)".into()),
        ]),
        Value::Text(text(5)),
        Value::Array(vec![
            Value::Json("null".into()),
            Value::Null,
            Value::Json(
                db.sql
                    .query_one("SELECT (jbs[3])::text FROM hostile WHERE id = 1", &[])
                    .await?
                    .get(0),
            ),
        ]),
    ]
    .into_iter()
    .map(Datum::Value)
    .collect();
    assert!(text(0).contains("12345678901234567890123") && text(0).contains("\\ud83d"));
    let from_snapshot: Vec<Datum> = c.snapshot[0].1[1..].to_vec();
    let inserted: Vec<&Vec<Datum>> = c
        .txns
        .iter()
        .flat_map(|t| &t.changes)
        .filter_map(|ch| match ch {
            Change::Insert { new, .. } => Some(new),
            _ => None,
        })
        .collect();
    assert_eq!(from_snapshot, expected, "snapshot");
    assert_eq!(inserted[0][1..].to_vec(), expected, "stream");
    // The stream went on past them.
    assert_eq!(inserted[1][0], Datum::Value(Value::Int(3)));
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn every_listed_type_round_trips_through_snapshot_and_stream() -> anyhow::Result<()> {
    let schema = "CREATE TABLE types (
        id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric,
        t text, v varchar(20), u uuid, d date, ts timestamp, tz timestamptz, j json, jb jsonb,
        by bytea, ai int4[], at text[], nul text)";
    let values = "true, -32768, 2147483647, 9007199254740993, 1.5, -2.25e-10, 12345678901234567890.0000000001,
        'héllo \"q\" \\ end', 'short', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29',
        '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05+02', '{\"a\": [1, 2]}', '{\"k\": {\"n\": null}}',
        '\\x00ff10', '{1,NULL,3}', '{\"a b\",\"c,d\",NULL}', NULL";
    let db = support::database(shared(), schema).await?;
    db.sql
        .batch_execute(&format!("INSERT INTO types VALUES (1, {values})"))
        .await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    db.sql
        .batch_execute(&format!("INSERT INTO types VALUES (2, {values})"))
        .await?;
    c.until(&mut stream, |c| !c.txns.is_empty()).await?;

    let expected = vec![
        Value::Bool(true),
        Value::Int(-32768),
        Value::Int(2147483647),
        Value::Int(9007199254740993),
        Value::Float(1.5),
        Value::Float(-2.25e-10),
        Value::Text("12345678901234567890.0000000001".into()),
        Value::Text("héllo \"q\" \\ end".into()),
        Value::Text("short".into()),
        Value::Text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into()),
        Value::Text("2024-02-29".into()),
        Value::Text("2024-01-02 03:04:05.123456".into()),
        Value::Text("2024-01-02 01:04:05+00".into()),
        Value::Json(r#"{"a": [1, 2]}"#.into()),
        Value::Json(r#"{"k": {"n": null}}"#.into()),
        Value::Bytes(vec![0, 0xff, 0x10]),
        Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]),
        Value::Array(vec![
            Value::Text("a b".into()),
            Value::Text("c,d".into()),
            Value::Null,
        ]),
        Value::Null,
    ];
    let from_snapshot: Vec<Datum> = c.snapshot[0].1[1..].to_vec();
    let Change::Insert { new, .. } = &c.txns[0].changes[0] else {
        panic!("expected insert")
    };
    let from_stream: Vec<Datum> = new[1..].to_vec();
    let expected: Vec<Datum> = expected.into_iter().map(Datum::Value).collect();
    assert_eq!(from_stream, expected);
    assert_eq!(from_snapshot, expected, "snapshot and stream decode alike");
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn unchanged_toast_is_marked_not_null() -> anyhow::Result<()> {
    let db = support::database(
        shared(),
        "CREATE TABLE docs (id int PRIMARY KEY, body text, rev int);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    db.each(&[
        "INSERT INTO docs SELECT 1, string_agg(md5(i::text), ''), 1 FROM generate_series(1, 400) i",
        "UPDATE docs SET rev = 2 WHERE id = 1",
    ])
    .await?;
    c.until(&mut stream, |c| c.txns.len() >= 2).await?;
    let Change::Insert { new, .. } = &c.txns[0].changes[0] else {
        panic!("expected insert")
    };
    assert!(matches!(&new[1], Datum::Value(Value::Text(s)) if s.len() == 400 * 32));
    let Change::Update { new, .. } = &c.txns[1].changes[0] else {
        panic!("expected update")
    };
    assert_eq!(new[1], Datum::UnchangedToast);
    assert_eq!(new[2], Datum::Value(Value::Int(2)));
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn schema_changes_mid_stream_are_carried_through() -> anyhow::Result<()> {
    let db = support::database(shared(), ITEMS).await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    db.each(&[
        "INSERT INTO items VALUES (1, 'a', 1)",
        "ALTER TABLE items ADD COLUMN note text DEFAULT 'n'",
        "INSERT INTO items VALUES (2, 'b', 2, 'hello')",
        "ALTER TABLE items DROP COLUMN qty",
        "INSERT INTO items VALUES (3, 'c', 'bye')",
        "CREATE TABLE later (id int PRIMARY KEY)",
        "INSERT INTO later VALUES (7)",
    ])
    .await?;
    c.until(&mut stream, |c| c.txns.len() >= 4).await?;
    let widths: Vec<(String, usize)> = c
        .changes()
        .map(|ch| match ch {
            Change::Insert { table, new } => {
                assert_eq!(table.columns.len(), new.len());
                (table.name.clone(), new.len())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        widths,
        vec![
            ("items".into(), 3),
            ("items".into(), 4),
            ("items".into(), 3),
            ("later".into(), 1)
        ]
    );
    let last_items = c
        .relations
        .iter()
        .rev()
        .find(|t| t.name == "items")
        .expect("relation");
    let names: Vec<&str> = last_items.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "name", "note"]);
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn snapshot_while_writing_has_no_gap_and_no_duplicate() -> anyhow::Result<()> {
    let db = support::database(shared(), "CREATE TABLE seq (id int PRIMARY KEY, v int)").await?;
    db.sql
        .batch_execute("INSERT INTO seq SELECT i, 0 FROM generate_series(1, 20000) i")
        .await?;
    let writer_sql = db.db.connect().await?;
    let writer = tokio::spawn(async move {
        // Single-row transactions and updates of early rows, racing the slot's creation.
        for i in 20_001..=21_500 {
            writer_sql
                .execute("INSERT INTO seq VALUES ($1, 0)", &[&i])
                .await?;
            writer_sql
                .execute("UPDATE seq SET v = v + 1 WHERE id = $1", &[&(i - 20_000)])
                .await?;
        }
        anyhow::Ok(())
    });
    let mut stream = support::start(&db.url, Resume::default()).await?;
    writer.await??;
    let mut c = Collector::default();
    let seen_last = |c: &Collector| {
        c.changes()
            .any(|ch| matches!(ch, Change::Update { new, .. } if int(new, 0) == 1500))
            || c.snapshot
                .iter()
                .any(|(_, r)| int(r, 0) == 1500 && int(r, 1) == 1)
                && c.snapshot.iter().any(|(_, r)| int(r, 0) == 21_500)
    };
    c.until(&mut stream, |c| c.snapshot_done.is_some() && seen_last(c))
        .await?;

    // Replay snapshot then stream: the result must equal the table, and no insert may repeat a
    // row the snapshot already had.
    let mut rows: BTreeMap<i64, i64> = c
        .snapshot
        .iter()
        .map(|(_, r)| (int(r, 0), int(r, 1)))
        .collect();
    assert_eq!(rows.len(), c.snapshot.len(), "snapshot has no duplicate");
    for ch in c.changes() {
        match ch {
            Change::Insert { new, .. } => {
                assert!(
                    rows.insert(int(new, 0), int(new, 1)).is_none(),
                    "insert of {} duplicates the snapshot",
                    int(new, 0)
                );
            }
            Change::Update { new, .. } => {
                rows.insert(int(new, 0), int(new, 1));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let actual: BTreeMap<i64, i64> = db
        .sql
        .query("SELECT id::int8, v::int8 FROM seq", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 21_500);
    assert_eq!(rows, actual);
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_consumer_restarted_before_acking_gets_exactly_the_unacked_transactions()
-> anyhow::Result<()> {
    let db = support::database(shared(), ITEMS).await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    let snapshot_point = c.snapshot_done.expect("snapshot");
    stream.ack(snapshot_point);
    for i in 1..=5 {
        db.sql
            .execute("INSERT INTO items VALUES ($1, 'x', 0)", &[&i])
            .await?;
    }
    c.until(&mut stream, |c| c.txns.len() == 5).await?;
    // Only the first two became durable; then the consumer dies without a word.
    let durable = c.txns[1].end_lsn;
    stream.ack(durable);
    drop(stream);
    db.sql
        .execute("INSERT INTO items VALUES (6, 'x', 0)", &[])
        .await?;

    let mut stream = support::start(
        &db.url,
        Resume {
            durable: Some(durable),
            owns_slot: true,
        },
    )
    .await?;
    let mut again = Collector::default();
    again.until(&mut stream, |c| c.txns.len() >= 4).await?;
    let ids: Vec<i64> = again
        .changes()
        .map(|ch| match ch {
            Change::Insert { new, .. } => int(new, 0),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        ids,
        vec![3, 4, 5, 6],
        "exactly the unacknowledged transactions, once each"
    );
    assert!(again.snapshot_done.is_none(), "no second snapshot");

    // With everything acknowledged and the stream stopped in order, the slot has advanced.
    stream.ack(again.txns.last().expect("txn").end_lsn);
    stream.stop().await;
    let confirmed: String = db
        .sql
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = current_database()", &[])
        .await?
        .get(0);
    assert!(confirmed.parse::<walsync_types::Lsn>()? >= again.txns.last().expect("txn").end_lsn);
    Ok(())
}

#[tokio::test]
async fn an_owned_slot_without_durable_data_is_rebuilt_with_a_fresh_snapshot() -> anyhow::Result<()>
{
    let db = support::database(shared(), ITEMS).await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    drop(stream);
    db.sql
        .execute("INSERT INTO items VALUES (1, 'x', 0)", &[])
        .await?;

    // Not owned: refuse to touch it.
    let mut stream = support::start(&db.url, Resume::default()).await?;
    match stream.next_batch().await {
        Some(Err(e)) => assert!(e.to_string().contains("did not create it"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // Owned: drop and start again from a new snapshot, which has the row.
    let mut stream = support::start(
        &db.url,
        Resume {
            durable: None,
            owns_slot: true,
        },
    )
    .await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    assert_eq!(c.snapshot.len(), 1);
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn idle_slot_advances_over_unpublished_changes() -> anyhow::Result<()> {
    let db = support::database(shared(), ITEMS).await?;
    db.sql.batch_execute("DROP PUBLICATION walsync; CREATE PUBLICATION walsync FOR TABLE items; CREATE TABLE other (id int PRIMARY KEY);").await?;
    let mut cfg = support::config(&db.url);
    cfg.status_interval = std::time::Duration::from_millis(200);
    let mut stream = walsync_source::Source::start(cfg, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    stream.ack(c.snapshot_done.expect("snapshot"));
    db.sql
        .batch_execute("INSERT INTO other SELECT generate_series(1, 1000)")
        .await?;
    let target: String = db
        .sql
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let target: walsync_types::Lsn = target.parse()?;
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        // Keep the stream drained; nothing of `other` may arrive.
        if let Ok(Some(batch)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), stream.next_batch()).await
        {
            c.apply(batch?);
        }
        let confirmed: String = db
            .sql
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = current_database()", &[])
            .await?
            .get(0);
        if confirmed.parse::<walsync_types::Lsn>()? >= target {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "slot stayed at {confirmed}, wanted {target}"
        );
    }
    assert!(c.changes().next().is_none());
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn protocol_2_streams_large_transactions_and_drops_aborted_subtransactions()
-> anyhow::Result<()> {
    let db = support::database(shared(), ITEMS).await?;
    // A tiny decoding memory makes PostgreSQL stream the transaction before it commits.
    let url = format!("{}?options=-c%20logical_decoding_work_mem%3D64kB", db.url);
    let mut cfg = support::config(&url);
    cfg.stream_in_progress = true;
    let mut stream = walsync_source::Source::start(cfg, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    db.sql
        .batch_execute(
            "BEGIN;
             INSERT INTO items SELECT i, repeat('x', 100), 0 FROM generate_series(1, 5000) i;
             SAVEPOINT s;
             INSERT INTO items SELECT i, 'gone', 0 FROM generate_series(5001, 8000) i;
             ROLLBACK TO SAVEPOINT s;
             INSERT INTO items SELECT i, 'kept', 0 FROM generate_series(9001, 9500) i;
             COMMIT;
             BEGIN; INSERT INTO items SELECT i, 'aborted', 0 FROM generate_series(20001, 25000) i; ROLLBACK;
             INSERT INTO items VALUES (30000, 'after', 0);",
        )
        .await?;
    c.until(&mut stream, |c| c.txns.len() >= 2).await?;
    assert_eq!(
        c.txns[0].changes.len(),
        5500,
        "rolled-back savepoint's rows are gone"
    );
    assert!(c.txns[0].changes.iter().all(
        |ch| matches!(ch, Change::Insert { new, .. } if int(new, 0) <= 5000 || int(new, 0) > 9000)
    ));
    assert_eq!(
        c.txns[1].changes.len(),
        1,
        "the aborted transaction never shows"
    );
    stream.stop().await;
    Ok(())
}

#[tokio::test]
async fn logical_messages_arrive_inside_their_transaction() -> anyhow::Result<()> {
    let db = support::database(shared(), ITEMS).await?;
    let mut stream = support::start(&db.url, Resume::default()).await?;
    let mut c = Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    db.sql
        .batch_execute("BEGIN; SELECT pg_logical_emit_message(true, 'walsync', 'hello'); INSERT INTO items VALUES (1, 'a', 1); COMMIT;")
        .await?;
    c.until(&mut stream, |c| !c.txns.is_empty()).await?;
    assert!(
        matches!(&c.txns[0].changes[0], Change::Message { prefix, content } if prefix == "walsync" && &content[..] == b"hello")
    );
    let _ = SourceEvent::Rollback;
    stream.stop().await;
    Ok(())
}

/// The initial copy is batched by bytes as well as rows: rows of 200 KB come a few at a time,
/// narrow rows in full batches, and every row arrives once.
#[tokio::test]
async fn the_initial_copy_is_batched_by_bytes() -> anyhow::Result<()> {
    let db = support::database(
        shared(),
        "CREATE TABLE wide (id int PRIMARY KEY, body text);
         CREATE TABLE narrow (id int PRIMARY KEY);
         ALTER TABLE wide ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await?;
    db.sql
        .batch_execute(
            "INSERT INTO wide SELECT i, (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 6400) j)
               FROM generate_series(1, 40) i;
             INSERT INTO narrow SELECT generate_series(1, 5000);",
        )
        .await?;
    let mut config = support::config(&db.url);
    config.snapshot_batch_rows = 1000;
    config.snapshot_batch_bytes = 1 << 20;
    let mut stream = walsync_source::Source::start(config, Resume::default()).await?;
    let mut sizes: BTreeMap<String, Vec<usize>> = Default::default();
    loop {
        let batch = tokio::time::timeout(support::WAIT, stream.next_batch())
            .await?
            .ok_or_else(|| anyhow::anyhow!("source ended"))??;
        let mut done = false;
        for e in batch {
            match e {
                SourceEvent::SnapshotRows { table, rows } => sizes
                    .entry(table.name.clone())
                    .or_default()
                    .push(rows.len()),
                SourceEvent::SnapshotEnd { .. } => done = true,
                _ => {}
            }
        }
        if done {
            break;
        }
    }
    let wide = &sizes["wide"];
    assert_eq!(wide.iter().sum::<usize>(), 40);
    // 204,800 bytes a row against a 1 MiB budget: five at a time.
    assert!(wide.iter().all(|n| *n <= 6), "wide batches {wide:?}");
    let narrow = &sizes["narrow"];
    assert_eq!(narrow.iter().sum::<usize>(), 5000);
    assert!(
        narrow.iter().skip(1).any(|n| *n == 1000),
        "narrow batches {narrow:?}"
    );
    stream.stop().await;
    Ok(())
}
