//! Operations nobody here designed, through the whole replicator (snapshot and stream) into the
//! store, each checked against PostgreSQL itself: key swaps under a deferred key, a wide
//! `REPLICA IDENTITY FULL` row, unchanged TOAST after a column rename.

use support::seed::{self, setup_with, wait_until_bucket_is};

/// `UPDATE t SET id = 3 - id` under a deferrable key swaps two ids in one statement (and a
/// rotation moves three). A deferrable key cannot be a replica identity, so the table has
/// `REPLICA IDENTITY FULL`: every update moves the row to another store key while clients know
/// it by its id, and for a moment two rows put the same object. Every row keeps its copy,
/// TOASTed values included, and clients get every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_swapped_in_one_transaction_keep_every_row() -> anyhow::Result<()> {
    let s = setup_with(
        "CREATE TABLE t (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, label text, big text);
         ALTER TABLE t REPLICA IDENTITY FULL;
         CREATE PUBLICATION walsync FOR ALL TABLES;
         INSERT INTO t SELECT i, 'row ' || i,
             (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 400) j)
           FROM generate_series(1, 5) i;",
        "bucket_definitions:\n  everything:\n    data:\n      - SELECT * FROM t\n",
    )
    .await?;
    let (stop, task) = seed::spawn(&s, seed::config(&s));
    let query = "SELECT 't', id::text, json_build_object('id', id, 'label', label, 'big', big)::text FROM t";
    wait_until_bucket_is(&s, "everything[]", query).await?;
    // A swap that leaves the TOASTed column untouched, a rotation, then an update of the big
    // column's neighbour (its unchanged TOAST must come from the right copy).
    // Each step is checked on its own: a later update of every row would put them all again.
    for step in [
        "UPDATE t SET id = 3 - id WHERE id IN (1, 2)",
        "BEGIN; UPDATE t SET id = 4 WHERE id = 3; UPDATE t SET id = 5 WHERE id = 4 AND label = 'row 4';
         UPDATE t SET id = 3 WHERE id = 5 AND label = 'row 5'; COMMIT",
        "UPDATE t SET label = label || ' again' WHERE id = 1",
    ] {
        s.sql.batch_execute(step).await?;
        wait_until_bucket_is(&s, "everything[]", query).await?;
    }
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// A `REPLICA IDENTITY FULL` table without a key: a row's id is the whole row, here over 64 KiB
/// (longer than any key the store's engine takes). Inserted, updated and deleted, in the
/// snapshot and the stream, it replicates like any row, and replication goes on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_replica_identity_full_row_replicates_like_any_row() -> anyhow::Result<()> {
    // md5 text does not compress, so the row stays wider than 64 KiB.
    let wide = "(SELECT string_agg(md5(i::text || 'x'), '') FROM generate_series(1, 2500) i)";
    let s = setup_with(
        &format!(
            "CREATE TABLE wide (id text, body text, n int);
             ALTER TABLE wide REPLICA IDENTITY FULL;
             CREATE PUBLICATION walsync FOR ALL TABLES;
             INSERT INTO wide VALUES ('a', {wide}, 0), ('b', 'small', 0);"
        ),
        "bucket_definitions:\n  everything:\n    data:\n      - SELECT * FROM wide\n",
    )
    .await?;
    let (stop, task) = seed::spawn(&s, seed::config(&s));
    s.sql
        .batch_execute(&format!(
            "INSERT INTO wide VALUES ('c', {wide} || 'c', 0);
             UPDATE wide SET n = 1 WHERE id = 'c';
             UPDATE wide SET n = 2 WHERE id = 'a';
             DELETE FROM wide WHERE id = 'b';
             INSERT INTO wide VALUES ('d', 'after', 0);"
        ))
        .await?;
    let longest: i32 = s
        .sql
        .query_one("SELECT max(length(body)) FROM wide", &[])
        .await?
        .get(0);
    assert!(longest > 65_536);
    wait_until_bucket_is(
        &s,
        "everything[]",
        "SELECT 'wide', id, json_build_object('id', id, 'body', body, 'n', n)::text FROM wide",
    )
    .await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// Unchanged TOAST after the table changed shape: an update that leaves a TOASTed column alone
/// sends no value for it, so walsync fills it from its copy of the row, which was written under
/// the old column names. After a rename, an added and a dropped column, every row still holds
/// its TOASTed text, checked against PostgreSQL after each step; also when every transaction
/// outgrows a 1 KiB memory budget and is staged (the copies are then read from the store's
/// steps), and after a re-copy (a lost slot) that rewrites the copies under the new names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_survives_renamed_added_and_dropped_columns() -> anyhow::Result<()> {
    for budget in [None, Some(1 << 10)] {
        let s = setup_with(
            "CREATE TABLE notes (id text PRIMARY KEY DEFAULT gen_random_uuid()::text, body text, n int, extra text);
             CREATE PUBLICATION walsync FOR ALL TABLES;
             INSERT INTO notes (body, n, extra)
               SELECT (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 400) j), i, 'e'
               FROM generate_series(1, 4) i;",
            "bucket_definitions:\n  everything:\n    data:\n      - SELECT * FROM notes\n",
        )
        .await?;
        let config = || {
            let mut c = seed::config(&s);
            if let Some(b) = budget {
                c.memory_budget = b;
            }
            c
        };
        let (mut stop, mut task) = seed::spawn(&s, config());
        let query = |cols: &str| {
            format!(
                "SELECT 'notes', id, (SELECT json_object_agg(key, value) FROM json_each(to_json(x)) WHERE key IN ({cols}))::text FROM notes x"
            )
        };
        wait_until_bucket_is(&s, "everything[]", &query("'id','body','n','extra'")).await?;
        for (step, cols) in [
            (
                "ALTER TABLE notes RENAME COLUMN body TO content; UPDATE notes SET n = n + 10",
                "'id','content','n','extra'",
            ),
            (
                "ALTER TABLE notes ADD COLUMN added int DEFAULT 7; UPDATE notes SET n = n + 10",
                "'id','content','n','extra','added'",
            ),
            (
                "ALTER TABLE notes DROP COLUMN extra; UPDATE notes SET n = n + 10",
                "'id','content','n','added'",
            ),
        ] {
            s.sql.batch_execute(step).await?;
            wait_until_bucket_is(&s, "everything[]", &query(cols)).await?;
        }
        if budget.is_some() {
            // The slot is lost: the re-copy writes every copy under today's names, and the
            // next update's unchanged TOAST comes from those.
            stop.send(true)?;
            task.await??;
            s.sql
                .execute("SELECT pg_drop_replication_slot($1)", &[&s.slot])
                .await?;
            s.sql
                .batch_execute("ALTER TABLE notes RENAME COLUMN content TO text_of_it")
                .await?;
            (stop, task) = seed::spawn(&s, config());
            let cols = "'id','text_of_it','n','added'";
            wait_until_bucket_is(&s, "everything[]", &query(cols)).await?;
            s.sql.batch_execute("UPDATE notes SET n = n + 10").await?;
            wait_until_bucket_is(&s, "everything[]", &query(cols)).await?;
        }
        stop.send(true)?;
        task.await??;
    }
    Ok(())
}

/// A partitioned table, published as itself (`publish_via_partition_root`, as walsync creates
/// publications), named by the rules: its rows, in every partition, reach the buckets in the
/// snapshot (which copies the partitions through the root) and the stream, also when a row moves
/// to another partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_replicate_through_their_root() -> anyhow::Result<()> {
    let s = setup_with(
        "CREATE TABLE events (id text DEFAULT gen_random_uuid()::text, region text, note text,
             PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
         CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
         CREATE TABLE events_other PARTITION OF events DEFAULT;
         CREATE PUBLICATION walsync FOR TABLE events WITH (publish_via_partition_root = true);
         INSERT INTO events (region, note) SELECT (ARRAY['eu','us','ap'])[1 + i % 3], 'n' || i
           FROM generate_series(1, 30) i;",
        "bucket_definitions:\n  by_region:\n    parameters: SELECT request.user_id() AS region\n    data:\n      - SELECT * FROM events WHERE region = bucket.region\n",
    )
    .await?;
    let (stop, task) = seed::spawn(&s, seed::config(&s));
    let query = |region: &str| {
        format!(
            "SELECT 'events', id, json_build_object('id', id, 'region', region, 'note', note)::text FROM events WHERE region = '{region}'"
        )
    };
    for region in ["eu", "us", "ap"] {
        wait_until_bucket_is(&s, &format!("by_region[\"{region}\"]"), &query(region)).await?;
    }
    s.sql
        .batch_execute(
            "INSERT INTO events (region, note) VALUES ('eu', 'new'), ('ap', 'new');
             UPDATE events SET region = 'us' WHERE note IN ('n1', 'n2', 'n3');
             UPDATE events SET note = note || '!' WHERE region = 'eu';
             DELETE FROM events WHERE note = 'n4';",
        )
        .await?;
    for region in ["eu", "us", "ap"] {
        wait_until_bucket_is(&s, &format!("by_region[\"{region}\"]"), &query(region)).await?;
    }
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// Schema `a.b` with table `c`, and schema `a` with table `b.c`: two tables whose dotted names
/// are the same text. Each keeps its own rows (same ids in both), in the snapshot and the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_whose_dotted_names_coincide_stay_apart() -> anyhow::Result<()> {
    let s = setup_with(
        r#"CREATE SCHEMA "a.b"; CREATE SCHEMA a;
           CREATE TABLE "a.b".c (id int PRIMARY KEY, v text);
           CREATE TABLE a."b.c" (id int PRIMARY KEY, v text);
           CREATE PUBLICATION walsync FOR ALL TABLES;
           INSERT INTO "a.b".c VALUES (1, 'first'), (2, 'first');
           INSERT INTO a."b.c" VALUES (1, 'second'), (2, 'second');"#,
        "bucket_definitions:\n  one:\n    data:\n      - SELECT id, v FROM \"a.b\".c\n  two:\n    data:\n      - SELECT id, v FROM a.\"b.c\"\n",
    )
    .await?;
    let (stop, task) = seed::spawn(&s, seed::config(&s));
    let check = async |bucket: &str, object_type: &str, table: &str| {
        wait_until_bucket_is(
            &s,
            bucket,
            &format!("SELECT '{object_type}', id::text, json_build_object('id', id, 'v', v)::text FROM {table}"),
        )
        .await
    };
    check("one[]", "c", r#""a.b".c"#).await?;
    check("two[]", "b.c", r#"a."b.c""#).await?;
    s.sql
        .batch_execute(r#"DELETE FROM "a.b".c WHERE id = 1; UPDATE a."b.c" SET v = 'again' WHERE id = 2; TRUNCATE "a.b".c"#)
        .await?;
    check("one[]", "c", r#""a.b".c"#).await?;
    check("two[]", "b.c", r#"a."b.c""#).await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// A primary key long enough to be TOASTed (PostgreSQL stores it out of line): updates of
/// other columns, and of the key itself, keep every row where it belongs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toasted_primary_key_is_followed_through_updates() -> anyhow::Result<()> {
    let s = setup_with(
        "CREATE TABLE docs (id text PRIMARY KEY, n int, body text);
         ALTER TABLE docs ALTER COLUMN id SET STORAGE EXTERNAL;
         CREATE PUBLICATION walsync FOR ALL TABLES;
         INSERT INTO docs SELECT (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 80) j), i, 'b'
           FROM generate_series(1, 3) i;",
        "bucket_definitions:\n  everything:\n    data:\n      - SELECT * FROM docs\n",
    )
    .await?;
    let (stop, task) = seed::spawn(&s, seed::config(&s));
    let query =
        "SELECT 'docs', id, json_build_object('id', id, 'n', n, 'body', body)::text FROM docs";
    wait_until_bucket_is(&s, "everything[]", query).await?;
    for step in [
        "UPDATE docs SET n = n + 10",
        "UPDATE docs SET body = 'changed' WHERE n = 11",
        "UPDATE docs SET id = id || 'x' WHERE n = 12",
        "DELETE FROM docs WHERE n = 13",
    ] {
        s.sql.batch_execute(step).await?;
        wait_until_bucket_is(&s, "everything[]", query).await?;
    }
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// A table without a key (`REPLICA IDENTITY FULL`) holding identical rows: deleting or moving
/// one of them leaves the others at clients (they shared one copy in the store, so deleting one
/// removed all of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_rows_of_a_keyless_table_are_counted() -> anyhow::Result<()> {
    let s = setup_with(
        "CREATE TABLE tags (id int, label text);
         ALTER TABLE tags REPLICA IDENTITY FULL;
         CREATE PUBLICATION walsync FOR ALL TABLES;
         INSERT INTO tags VALUES (1, 'a'), (1, 'a'), (1, 'a'), (2, 'b');",
        "bucket_definitions:\n  everything:\n    data:\n      - SELECT * FROM tags\n",
    )
    .await?;
    let (stop, task) = seed::spawn(&s, seed::config(&s));
    let query = "SELECT DISTINCT 'tags', id::text, json_build_object('id', id, 'label', label)::text FROM tags";
    wait_until_bucket_is(&s, "everything[]", query).await?;
    let one =
        |what: &str| format!("{what} WHERE ctid = (SELECT ctid FROM tags WHERE id = 1 LIMIT 1)");
    for step in [
        one("DELETE FROM tags"),
        "INSERT INTO tags VALUES (2, 'b')".to_owned(),
        one("UPDATE tags SET id = 3"),
        "DELETE FROM tags WHERE id = 2".to_owned(),
        one("DELETE FROM tags"),
    ] {
        s.sql.batch_execute(&step).await?;
        wait_until_bucket_is(&s, "everything[]", query).await?;
    }
    stop.send(true)?;
    task.await??;
    Ok(())
}
