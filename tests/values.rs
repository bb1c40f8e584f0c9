//! Values nobody here designed, through the whole replicator (snapshot and stream) into the
//! store: each column reaches clients exactly as PostgreSQL prints it (json byte for byte, jsonb
//! in its canonical text, arrays as PostgreSQL's `to_json` writes them), keyed by text UUIDs, and
//! no value stops replication.

use std::sync::Arc;
use std::time::Duration;

use support::seed::{self, Setup};
use walsync_rules::SyncRules;
use walsync_storage::{KvStore, StoreRead};
use walsync_testkit::shared;

const SCHEMA: &str = "CREATE TABLE docs (
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text, j json, jb jsonb, deep jsonb,
    v int2vector, o oidvector, boxes box[], lower int4[], jbs jsonb[], tags text[], at timestamptz);
    CREATE PUBLICATION walsync FOR ALL TABLES";

const RULES: &str = "bucket_definitions:\n  everything:\n    data:\n      - SELECT * FROM docs\n";

/// Inserts one row of hostile values; `n` makes each row's JSON differ.
fn insert(n: u32) -> String {
    let deep = format!("{}{n}{}", "[".repeat(200), "]".repeat(200));
    format!(
        r#"INSERT INTO docs (j, jb, deep, v, o, boxes, lower, jbs, tags, at) VALUES (
        '{{"big": 12345678901234567890123{n}, "d": 0.1000000000000000055511151231257827, "b": 1, "b": 2, "s": "\ud83d", "x": 1e400}}',
        '{{"big": 12345678901234567890123{n}, "tiny": 1e-400, "z": "é😀", "a": [null, {{"q": "\"\\"}}]}}',
        '{deep}', '1 2 {n}', '23 25', ARRAY['((1,2),(3,4))'::box, '((5,6),(7,{n}))'::box],
        '[2:3]={{1,{n}}}', ARRAY['null'::jsonb, NULL, '{{"a": 1e400}}'::jsonb],
        ARRAY['a,b', NULL, 'NULL', 'q"uote', ''], '1900-01-01 00:00:00+00')"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_reach_clients_as_postgresql_prints_them() -> anyhow::Result<()> {
    hostile_values_arrive(false).await
}

/// The same values in one source transaction far beyond a 16 KiB memory budget: the storage
/// writer becomes staged and they arrive exactly the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_in_a_staged_transaction_arrive_the_same() -> anyhow::Result<()> {
    hostile_values_arrive(true).await
}

async fn hostile_values_arrive(staged: bool) -> anyhow::Result<()> {
    let db = shared().fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(SCHEMA).await?;
    for n in 0..3 {
        sql.batch_execute(&insert(n)).await?;
    }
    let dir = tempfile::tempdir()?;
    let s = Setup {
        store: Arc::new(KvStore::open(dir.path())?),
        sql,
        url: db.url.clone(),
        slot: db.name.clone(),
        rules: Arc::new(SyncRules::from_yaml(RULES)?),
        dir,
    };
    let mut config = seed::config(&s);
    if staged {
        config.memory_budget = 16 << 10;
    }
    let (stop, task) = seed::spawn(&s, config.clone());
    // The rows below come through the stream, not the initial copy.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !s.store.checkpoint()?.snapshot_complete {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no initial copy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let streamed = if staged {
        // Sixty rows in one transaction: several times the budget.
        let rows: Vec<String> = (3..63).map(insert).collect();
        s.sql
            .batch_execute(&format!("BEGIN; {}; COMMIT", rows.join("; ")))
            .await?;
        60
    } else {
        // Rows in the stream too, some of them in one transaction, and a row after them.
        for n in 3..6 {
            s.sql.batch_execute(&insert(n)).await?;
        }
        s.sql
            .batch_execute(&format!("BEGIN; {}; {}; COMMIT", insert(6), insert(7)))
            .await?;
        5
    };
    s.sql
        .batch_execute("INSERT INTO docs (id) VALUES ('after')")
        .await?;

    assert_eq!(matches_postgres(&s).await?, 3 + streamed + 1);
    stop.send(true)?;
    task.await??;
    // The slot is lost and one more row comes meanwhile: the re-copy compares every hostile
    // value with its stored copy and finds them equal (one op only, for the new row).
    let before = s.store.checkpoint()?.op_id;
    s.sql
        .execute("SELECT pg_drop_replication_slot($1)", &[&s.slot])
        .await?;
    s.sql.batch_execute(&insert(100)).await?;
    let (stop, task) = seed::spawn(&s, config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while s.store.checkpoint()?.lsn.is_none() || s.store.checkpoint()?.op_id == before {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no re-copy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    matches_postgres(&s).await?;
    let added = s
        .store
        .ops("everything[]", before, u64::MAX, usize::MAX)?
        .len();
    assert_eq!(added, 1, "only the new row is sent after the re-copy");
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// Waits until the bucket holds every row of `docs`, then compares each with what PostgreSQL
/// itself prints for it (the text of scalars, `to_json` of arrays); the number of rows.
async fn matches_postgres(s: &Setup) -> anyhow::Result<usize> {
    let want: std::collections::BTreeMap<String, serde_json::Value> = s
        .sql
        .query(
            "SELECT id, json_build_object('id', id, 'j', j::text, 'jb', jb::text, 'deep', deep::text,
                 'v', v::text, 'o', o::text, 'boxes', to_json(boxes)::text, 'lower', lower::text,
                 'jbs', to_json(jbs)::text, 'tags', to_json(tags)::text,
                 'at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00')::text
             FROM docs",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            let j: String = r.get(1);
            (id, serde_json::from_str(&j).expect("json"))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = seed::actual(&s.store);
        let rows = got.get("everything[]").map_or(0, |b| b.len());
        if rows == want.len() && s.store.checkpoint()?.snapshot_complete {
            break got;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the store never held every row ({rows} of {})",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for ((ty, id), data) in &got["everything[]"] {
        assert_eq!(ty, "docs");
        let data: serde_json::Value = serde_json::from_str(data)?;
        let expected = &want[id];
        assert_eq!(&data, expected, "row {id}");
    }
    Ok(want.len())
}
