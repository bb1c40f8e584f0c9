//! The replicator against real PostgreSQL with the seed app's schema and rules: after catch-up
//! every bucket, replayed from storage, holds exactly what the rules select from PostgreSQL, and
//! every bucket's checksum is the sum of its ops; also across injected crashes.

use support::seed;

use std::collections::BTreeMap;

use seed::{config, setup, spawn, wait_until_equal, workload};
use walsync_replicator::ReplicatorError;
use walsync_storage::StoreRead;
use walsync_storage::conformance::ClientBucket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_match_postgres_after_random_changes() -> anyhow::Result<()> {
    let s = setup().await?;
    let (stop, task) = spawn(&s, config(&s));
    workload(&s.sql, 7, 300).await?;
    wait_until_equal(&s).await?;
    // Stop and start again: resumes from the store without a second snapshot.
    stop.send(true)?;
    task.await??;
    let before = s.store.checkpoint()?;
    let (stop, task) = spawn(&s, config(&s));
    workload(&s.sql, 11, 100).await?;
    wait_until_equal(&s).await?;
    assert!(s.store.checkpoint()?.op_id > before.op_id);
    stop.send(true)?;
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_between_storage_commit_and_ack_lose_nothing_and_repeat_nothing()
-> anyhow::Result<()> {
    let s = setup().await?;
    let mut crashes = 0;
    // Crash after the 2nd, 5th, 9th … storage commit of each run, while the workload runs.
    let work = {
        let url = s.url.clone();
        tokio::spawn(async move {
            let (sql, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            workload(&sql, 23, 400).await
        })
    };
    for after in [2u64, 5, 9, 3, 6] {
        let mut c = config(&s);
        c.fail_after_commits = Some(after);
        let (stop, mut task) = spawn(&s, c);
        // A run ends at its fault; one that cannot reach it (the workload is over) is stopped
        // once it has been idle for a while, instead of waiting for changes that never come.
        let result = loop {
            tokio::select! {
                r = &mut task => break r?,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {
                    if work.is_finished() {
                        let _ = stop.send(true);
                    }
                }
            }
        };
        match result {
            Err(ReplicatorError::Injected(_)) => crashes += 1,
            Ok(()) => {}
            Err(e) => return Err(e.into()),
        }
    }
    work.await??;
    assert!(crashes >= 3, "the faults fired ({crashes})");
    let (stop, task) = spawn(&s, config(&s));
    wait_until_equal(&s).await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toast_truncate_and_schema_changes_reach_the_buckets() -> anyhow::Result<()> {
    let s = setup().await?;
    s.sql
        .batch_execute("ALTER TABLE assessment_responses ALTER COLUMN notes SET STORAGE EXTERNAL")
        .await?;
    let (stop, task) = spawn(&s, config(&s));
    for stmt in [
        // A value stored out of line, then an update that leaves it untouched: pgoutput sends it
        // as unchanged TOAST, and the bucket must still carry it (filled from the row copy).
        "INSERT INTO assessment_responses (id, assessment_id, project_id, question_id, notes) \
         SELECT 900001, 1, 2, 'big', string_agg(md5(i::text), '') FROM generate_series(1, 600) i",
        "UPDATE assessment_responses SET answer = 'changed' WHERE id = 900001",
        // A column added mid-stream appears in the data of rows written afterwards.
        "ALTER TABLE teams ADD COLUMN colour text DEFAULT 'blue'",
        "INSERT INTO teams (project_id, name) VALUES (1, 'after alter')",
        "UPDATE teams SET colour = 'red' WHERE name = 'after alter'",
        // TRUNCATE empties the table's rows from every bucket.
        "TRUNCATE sow_section_approvals",
    ] {
        s.sql.batch_execute(stmt).await?;
    }
    s.sql
        .batch_execute(
            "INSERT INTO sow_section_approvals (project_id, section) VALUES (1, 'scope')",
        )
        .await?;
    s.sql
        .batch_execute("TRUNCATE sow_section_approvals")
        .await?;
    wait_until_equal(&s).await?;
    let rows = seed::actual(&s.store);
    let project2 = &rows["user_projects[2]"];
    let data = &project2[&("assessment_responses".to_owned(), "900001".to_owned())];
    let row: serde_json::Value = serde_json::from_str(data)?;
    assert_eq!(row["answer"], "changed");
    assert_eq!(
        row["notes"].as_str().map(str::len),
        Some(600 * 32),
        "the unchanged TOAST value is kept"
    );
    let team = rows["user_projects[1]"]
        .iter()
        .find(|((t, _), d)| t == "teams" && d.contains("after alter"))
        .map(|(_, d)| d.clone())
        .expect("team row");
    assert!(team.contains("\"colour\":\"red\""), "{team}");
    assert!(
        rows.values()
            .all(|b| b.keys().all(|(t, _)| t != "sow_section_approvals"))
    );
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// Waits until the store has a position on the current slot, follows `s.rules` and holds what
/// they select from PostgreSQL.
async fn until_the_rules_are_followed(s: &seed::Setup) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let cp = s.store.checkpoint()?;
        if cp.snapshot_complete
            && cp.lsn.is_some()
            && cp.rules.as_deref() == Some(s.rules.fingerprint())
            && seed::actual(&s.store) == seed::expected(s).await?
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the buckets never followed the rules"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Every bucket's client copy, replayed from the store.
fn clients(s: &seed::Setup) -> BTreeMap<String, ClientBucket> {
    s.store
        .buckets()
        .expect("buckets")
        .into_iter()
        .map(|b| {
            let mut c = ClientBucket::default();
            c.catch_up(&*s.store, &b);
            (b, c)
        })
        .collect()
}

/// After a re-copy: each client that held `before` catches up to what the rules select from
/// PostgreSQL now, with checksums that verify, and the ops it downloads (those after `at`)
/// are exactly the objects that differ: a PUT for each new or changed one, a REMOVE for each
/// gone. Returns how many.
async fn only_the_difference_was_sent(
    s: &seed::Setup,
    before: &BTreeMap<String, ClientBucket>,
    at: u64,
) -> anyhow::Result<usize> {
    let want = seed::expected(s).await?;
    let now = s.store.checkpoint()?;
    let empty = BTreeMap::new();
    let mut names: std::collections::BTreeSet<&String> = want.keys().collect();
    names.extend(before.keys());
    let (mut sent, mut differ) = (0, 0);
    for b in names {
        let want = want.get(b).unwrap_or(&empty);
        let mut client = before.get(b).cloned().unwrap_or_default();
        let old = client.rows.clone();
        differ += want.iter().filter(|(k, v)| old.get(*k) != Some(*v)).count();
        differ += old.keys().filter(|k| !want.contains_key(*k)).count();
        sent += s.store.ops(b, at, now.op_id, usize::MAX)?.len();
        client.catch_up(&*s.store, b);
        anyhow::ensure!(
            &client.rows == want,
            "bucket {b}: a client caught up differs from postgresql"
        );
        let state = s.store.bucket_states(std::slice::from_ref(b))?[0].unwrap_or_default();
        anyhow::ensure!(client.checksum == state.checksum, "bucket {b}: checksum");
    }
    anyhow::ensure!(
        sent == differ,
        "{sent} ops sent for {differ} objects that differ"
    );
    Ok(sent)
}

/// The slot is lost while walsync is down and the data changes meanwhile. walsync makes the
/// slot again and copies the tables anew while clients are still served what they hold; the
/// switch emits ops only for what differs, so a client keeps every op that is still true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_copied_anew_and_clients_download_only_the_difference() -> anyhow::Result<()>
{
    let s = setup().await?;
    let (stop, task) = spawn(&s, config(&s));
    workload(&s.sql, 31, 150).await?;
    wait_until_equal(&s).await?;
    stop.send(true)?;
    task.await??;
    let before = s.store.checkpoint()?;
    let held = clients(&s);
    // While walsync is down its slot goes (dropped by hand here; max_slot_wal_keep_size does the
    // same) and the data changes: those changes are in no slot any more.
    let slot = config(&s).source.slot;
    s.sql
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    workload(&s.sql, 37, 40).await?;
    let (stop, task) = spawn(&s, config(&s));
    wait_until_equal(&s).await?;
    let after = s.store.checkpoint()?;
    assert!(after.snapshot_complete);
    assert_eq!(
        after.rebuilt_at, before.rebuilt_at,
        "not rebuilt from nothing"
    );
    let sent = only_the_difference_was_sent(&s, &held, before.op_id).await?;
    let objects: usize = held.values().map(|c| c.rows.len()).sum();
    assert!(
        sent > 0 && sent < objects / 2,
        "{sent} ops for {objects} objects"
    );
    // The new slot streams on.
    workload(&s.sql, 41, 60).await?;
    wait_until_equal(&s).await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// A re-copy after a lost slot, stopped everywhere in turn (right after the new slot's commit,
/// in the middle of the copy with steps of it in the store, right after its commit): whenever
/// the store serves a checkpoint it is the one clients held before or what PostgreSQL holds
/// now, and the run after the last interruption converges. (Before the re-copy, a stop right
/// after the new slot's commit left the store "complete" at the old slot's position, and the
/// next start streamed on from there: the changes made while the slot was gone were lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_interrupted_anywhere_loses_nothing() -> anyhow::Result<()> {
    let s = setup().await?;
    let (stop, task) = spawn(&s, config(&s));
    workload(&s.sql, 43, 100).await?;
    wait_until_equal(&s).await?;
    stop.send(true)?;
    task.await??;
    let old = seed::actual(&s.store);
    let held = clients(&s);
    let at = s.store.checkpoint()?.op_id;
    let slot = config(&s).source.slot;
    s.sql
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    workload(&s.sql, 47, 150).await?;
    let total: i64 = s
        .scalar("SELECT (SELECT count(*) FROM assessment_responses) + (SELECT count(*) FROM project_members)")
        .await?;
    let mut interrupted = 0;
    let faults = [
        (Some(1), None),
        (None, Some(40)),
        (None, Some(total as u64 / 2)),
        (Some(2), None),
    ];
    for (commits, rows) in faults {
        let mut c = config(&s);
        // Small batches and a small budget, so that the copy takes steps.
        c.source.snapshot_batch_rows = 40;
        c.memory_budget = 16 << 10;
        c.fail_after_commits = commits;
        c.fail_after_snapshot_rows = rows;
        let (stop, mut task) = spawn(&s, c);
        // A run that completes the rebuild before its fault is stopped once idle.
        let result = loop {
            tokio::select! {
                r = &mut task => break r?,
                _ = tokio::time::sleep(std::time::Duration::from_secs(3)) => {
                    let _ = stop.send(true);
                }
            }
        };
        match result {
            Err(ReplicatorError::Injected(_) | ReplicatorError::InjectedInSnapshot(_)) => {
                interrupted += 1
            }
            Ok(()) => {}
            Err(e) => return Err(e.into()),
        }
        let cp = s.store.checkpoint()?;
        assert!(cp.snapshot_complete, "what clients held stays servable");
        let got = seed::actual(&s.store);
        assert!(
            got == old || got == seed::expected(&s).await?,
            "an interruption ({commits:?} commits, {rows:?} rows) left a checkpoint that is neither the old one nor postgresql's"
        );
    }
    assert_eq!(interrupted, faults.len(), "every fault fired");
    let (stop, task) = spawn(&s, config(&s));
    wait_until_equal(&s).await?;
    only_the_difference_was_sent(&s, &held, at).await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// An initial copy stopped after some of its batches committed leaves ops nobody was served:
/// the next start re-copies the tables into them (not emptying the store first), and the store
/// becomes servable only then, equal to PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_initial_copy_is_copied_again_into_what_it_left() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut c = config(&s);
    c.source.snapshot_batch_rows = 40;
    c.fail_after_snapshot_rows = Some(150);
    let (_stop, task) = spawn(&s, c);
    assert!(matches!(
        task.await?,
        Err(ReplicatorError::InjectedInSnapshot(_))
    ));
    let left = s.store.checkpoint()?;
    assert!(!left.snapshot_complete && left.op_id > 0, "{left:?}");
    workload(&s.sql, 67, 60).await?;
    let (stop, task) = spawn(&s, config(&s));
    wait_until_equal(&s).await?;
    assert_eq!(
        s.store.checkpoint()?.rebuilt_at,
        left.rebuilt_at,
        "copied again into what was left, not emptied"
    );
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// The sync rules change while walsync is stopped. A change of layout or comments alone is no
/// change: nothing is rebuilt. A tightened filter is: the tables are copied anew, and rows the
/// new rules no longer select leave the buckets (before, they stayed forever) by a REMOVE each,
/// the only ops clients download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_rules_build_the_buckets_anew() -> anyhow::Result<()> {
    let s = setup().await?;
    let (stop, task) = spawn(&s, config(&s));
    workload(&s.sql, 53, 100).await?;
    wait_until_equal(&s).await?;
    stop.send(true)?;
    task.await??;
    let built = s.store.checkpoint()?;
    assert_eq!(built.rules.as_deref(), Some(s.rules.fingerprint()));

    let seed_rules = walsync_testkit::seed::RULES;
    let commented = format!("# the same rules, commented\n{seed_rules}\n# the end\n");
    let s = seed::Setup {
        rules: std::sync::Arc::new(walsync_rules::SyncRules::from_yaml(&commented)?),
        ..s
    };
    let (stop, task) = spawn(&s, config(&s));
    wait_until_equal(&s).await?;
    stop.send(true)?;
    task.await??;
    assert_eq!(
        s.store.checkpoint()?.rebuilt_at,
        built.rebuilt_at,
        "nothing was rebuilt"
    );

    let held = clients(&s);
    let at = s.store.checkpoint()?.op_id;
    let from = "SELECT * FROM assessment_responses WHERE project_id = bucket.project_id";
    assert!(seed_rules.contains(from));
    let tightened = seed_rules.replace(from, &format!("{from} AND answer <> 'x'"));
    s.sql
        .batch_execute("UPDATE assessment_responses SET answer = 'x' WHERE id % 3 = 0")
        .await?;
    let s = seed::Setup {
        rules: std::sync::Arc::new(walsync_rules::SyncRules::from_yaml(&tightened)?),
        ..s
    };
    let (stop, task) = spawn(&s, config(&s));
    until_the_rules_are_followed(&s).await?;
    assert_eq!(
        s.store.checkpoint()?.rebuilt_at,
        built.rebuilt_at,
        "copied anew, not rebuilt from nothing"
    );
    let removed = only_the_difference_was_sent(&s, &held, at).await?;
    assert!(removed > 0, "the responses now filtered out were removed");
    let leaked = seed::actual(&s.store)
        .values()
        .flat_map(|rows| rows.values())
        .filter(|data| data.contains("\"answer\":\"x\""))
        .count();
    assert_eq!(leaked, 0, "no response the new rules filter out is left");
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// The rule changes the re-copy property draws from: a text replaced in the seed rules, and
/// the membership the new rules give, in SQL.
const RULE_CHANGES: &[(&str, &str, &str)] = &[
    // No change: only the slot is lost.
    (
        "",
        "",
        "SELECT DISTINCT project_id FROM project_members WHERE user_id = $1",
    ),
    // A tightened filter.
    (
        "SELECT * FROM assessment_responses WHERE project_id = bucket.project_id",
        "SELECT * FROM assessment_responses WHERE project_id = bucket.project_id AND answer <> 'x'",
        "SELECT DISTINCT project_id FROM project_members WHERE user_id = $1",
    ),
    // A table no longer read.
    (
        "      - SELECT * FROM teams WHERE project_id = bucket.project_id\n",
        "",
        "SELECT DISTINCT project_id FROM project_members WHERE user_id = $1",
    ),
    // Fewer columns of a table.
    (
        "SELECT * FROM projects WHERE id = bucket.project_id",
        "SELECT id, name FROM projects WHERE id = bucket.project_id",
        "SELECT DISTINCT project_id FROM project_members WHERE user_id = $1",
    ),
    // A narrower membership: the buckets' data is the same, the lookups change.
    (
        "WHERE user_id = request.user_id()\n",
        "WHERE user_id = request.user_id() AND role <> 'viewer'\n",
        "SELECT DISTINCT project_id FROM project_members WHERE user_id = $1 AND role <> 'viewer'",
    ),
];

/// Property of the re-copy, over seeds: a store built from a random workload, random changes
/// while walsync is down, the slot lost or not, one of [`RULE_CHANGES`]. After the switch the
/// buckets hold what the new rules select from PostgreSQL, each user's buckets are those SQL
/// gives, and a client of the old checkpoint downloads exactly the objects that differ (so
/// every unchanged row kept its op).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recopy_after_any_loss_or_rule_change_sends_only_the_difference() -> anyhow::Result<()> {
    for case in 0..10u64 {
        let (from, to, members) = RULE_CHANGES[case as usize % RULE_CHANGES.len()];
        let lost = case % 2 == 0 || from.is_empty();
        let s = setup().await?;
        s.sql
            .batch_execute("INSERT INTO teams (project_id, name) SELECT 1 + i % 6, 'team ' || i FROM generate_series(1, 20) i")
            .await?;
        let (stop, task) = spawn(&s, config(&s));
        workload(&s.sql, case * 7 + 1, 80).await?;
        wait_until_equal(&s).await?;
        stop.send(true)?;
        task.await??;
        let held = clients(&s);
        let at = s.store.checkpoint()?.op_id;
        if lost {
            s.sql
                .execute("SELECT pg_drop_replication_slot($1)", &[&s.slot])
                .await?;
        }
        workload(&s.sql, case * 7 + 3, 60).await?;
        s.sql
            .batch_execute(&format!(
                "UPDATE assessment_responses SET answer = 'x' WHERE id % 5 = {}; \
                 UPDATE teams SET name = 'renamed' WHERE id % 4 = {}",
                case % 5,
                case % 4
            ))
            .await?;
        let text = walsync_testkit::seed::RULES.replace(from, to);
        assert!(from.is_empty() || text != walsync_testkit::seed::RULES);
        let s = seed::Setup {
            rules: std::sync::Arc::new(walsync_rules::SyncRules::from_yaml(&text)?),
            ..s
        };
        let (stop, task) = spawn(&s, config(&s));
        until_the_rules_are_followed(&s)
            .await
            .map_err(|e| e.context(format!("case {case}")))?;
        let cp = s.store.checkpoint()?;
        for user in walsync_testkit::seed::USERS {
            let (mut got, lookups) = s.rules.resolve_request(&walsync_rules::RequestContext {
                user_id: user.to_string(),
                ..Default::default()
            });
            for key in lookups {
                for params in s.store.lookup(&key, cp.op_id)? {
                    got.push(walsync_types::bucket_id(&key.definition, &params));
                }
            }
            let got: std::collections::BTreeSet<String> = got.into_iter().collect();
            let mut want: std::collections::BTreeSet<String> = s
                .sql
                .query(members, &[user])
                .await?
                .iter()
                .map(|r| format!("user_projects[{}]", r.get::<_, i64>(0)))
                .collect();
            want.insert(format!("me[\"{user}\"]"));
            assert_eq!(got, want, "case {case}: buckets of {user}");
        }
        only_the_difference_was_sent(&s, &held, at)
            .await
            .map_err(|e| e.context(format!("case {case}")))?;
        stop.send(true)?;
        task.await??;
    }
    Ok(())
}

/// Rows that make the replicator panic (a test hook stands in for a bug meeting a value nobody
/// foresaw): one whose rules panic, in the initial copy and in the stream, is skipped where it
/// stands; one that panics after it was written makes the replicator drop what it wrote and
/// apply its transaction again without that change. Replication goes on for everything else,
/// across a restart too (before, one such row stopped replication for everyone, at every
/// start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_makes_the_replicator_panic_is_skipped() -> anyhow::Result<()> {
    let s = setup().await?;
    let insert = |answer: &str, question: &str| {
        format!(
            "INSERT INTO assessment_responses (assessment_id, project_id, question_id, answer) \
             VALUES (1, 2, '{question}', '{answer}')"
        )
    };
    s.sql.batch_execute(&insert("boom", "copied")).await?;
    let run = || {
        let mut c = config(&s);
        c.panic_on_text = Some("boom".into());
        spawn(&s, c)
    };
    let (stop, task) = run();
    while !s.store.checkpoint()?.snapshot_complete {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s.sql.batch_execute(&insert("boom", "streamed")).await?;
    s.sql
        .batch_execute(&format!(
            "BEGIN; {}; {}; {}; COMMIT",
            insert("before", "same transaction"),
            insert("boom!", "same transaction"),
            insert("after", "same transaction")
        ))
        .await?;
    let poisoned = |data: &String| data.contains("\"answer\":\"boom");
    let wanted = || async {
        let mut want = seed::expected(&s).await?;
        for rows in want.values_mut() {
            rows.retain(|_, data| !poisoned(data));
        }
        anyhow::Ok(want)
    };
    let until_equal = || async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while seed::actual(&s.store) != wanted().await? {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the store never held postgresql's rows but the poisoned ones"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    };
    until_equal().await?;
    let rows: usize = seed::actual(&s.store)
        .values()
        .flat_map(|rows| rows.values())
        .filter(|d| d.contains("\"question_id\":\"same transaction\""))
        .count();
    assert_eq!(
        rows, 2,
        "the rest of the poisoned row's transaction arrived"
    );
    assert!(!task.is_finished(), "the replicator runs on");
    workload(&s.sql, 59, 60).await?;
    until_equal().await?;
    stop.send(true)?;
    task.await??;
    // A new start meets none of it again (the copied row stays skipped: nothing re-copies).
    let (stop, task) = run();
    workload(&s.sql, 61, 40).await?;
    until_equal().await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// Source transactions far beyond the memory budget (a bulk insert, an update of every row, a
/// membership change beside them, a TRUNCATE) are staged in the store and reach the buckets
/// whole, with compaction running meanwhile and also when the replicator is cut off right
/// after the staged commit; the small transactions around them are applied as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_beyond_the_memory_budget_are_staged_whole() -> anyhow::Result<()> {
    let s = setup().await?;
    let run = |fail_after: Option<u64>| {
        let mut c = config(&s);
        c.memory_budget = 64 << 10;
        c.fail_after_commits = fail_after;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let (progress, seen) = tokio::sync::watch::channel(walsync_replicator::Progress::default());
        let task = tokio::spawn(walsync_replicator::run(
            c,
            s.rules.clone(),
            s.store.clone(),
            stop_rx,
            progress,
        ));
        (stop, seen, task)
    };
    // Compaction runs all along: a writer outgrowing its budget while a compaction step holds
    // the store cannot become staged where it stands, and reads its transaction again.
    let compacting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let compactor = {
        let (store, on) = (s.store.clone(), compacting.clone());
        std::thread::spawn(move || {
            let mut steps = 0u64;
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                use walsync_storage::BucketStore;
                store.compact_batch(None, 50).expect("compaction step");
                steps += 1;
                // As `walsync serve` does, with a shorter pause.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            steps
        })
    };
    let (stop, seen, task) = run(None);
    workload(&s.sql, 5, 100).await?;
    s.sql
        .batch_execute(
            "BEGIN;
             INSERT INTO assessment_responses (assessment_id, project_id, question_id, answer, notes)
             SELECT 1 + i % 12, 1 + i % 6, 'bulk-' || i, 'answer ' || i, repeat('n', i % 300)
             FROM generate_series(1, 3000) i;
             INSERT INTO project_members (project_id, user_id, role) VALUES (5, 'u1', 'viewer')
             ON CONFLICT DO NOTHING;
             COMMIT;
             UPDATE assessment_responses SET answer = answer || '+', project_id = 1 + (project_id % 6);",
        )
        .await?;
    workload(&s.sql, 9, 50).await?;
    wait_until_equal(&s).await?;
    anyhow::ensure!(
        seen.borrow().staged_transactions >= 2,
        "the large transactions were staged: {:?}",
        *seen.borrow()
    );
    stop.send(true)?;
    task.await??;
    compacting.store(false, std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(compactor.join().map_err(|_| anyhow::anyhow!("compactor"))? > 0);
    // Cut off right after the staged commit (before its acknowledgement): the transaction is
    // in the store once, and the next run goes on from it.
    let (_stop, _seen, task) = run(Some(2));
    s.sql
        .batch_execute(
            "BEGIN; DELETE FROM assessment_responses WHERE id % 3 = 0;
             TRUNCATE sow_section_approvals; COMMIT;",
        )
        .await?;
    match task.await? {
        Err(ReplicatorError::Injected(_)) => {}
        other => anyhow::bail!("the fault did not fire: {other:?}"),
    }
    let (stop, _seen, task) = run(None);
    workload(&s.sql, 13, 50).await?;
    wait_until_equal(&s).await?;
    stop.send(true)?;
    task.await??;
    Ok(())
}

/// The replication's state follows what happens, one change at a time (each is logged, and
/// gauged in `/metrics`): the initial copy, streaming, a broken connection and its recovery,
/// a lost slot and the re-copy after it, and transactions slower than the lagging threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_state_follows_what_happens() -> anyhow::Result<()> {
    use walsync_replicator::State;
    let s = setup().await?;
    let mut config = config(&s);
    // Every transaction with a source time is slower than this: the first one makes it lag.
    config.lagging_after = std::time::Duration::ZERO;
    let slot = config.source.slot.clone();
    let (stop_tx, task, mut progress) = seed::spawn_watched(&s, config);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![State::Connecting]));
    let watcher = tokio::spawn({
        let seen = seen.clone();
        async move {
            while progress.changed().await.is_ok() {
                let state = progress.borrow_and_update().state;
                let mut seen = seen.lock().expect("seen");
                if seen.last() != Some(&state) {
                    seen.push(state);
                }
            }
        }
    });
    // Waits until `want` is seen after what an earlier wait found (however briefly it held).
    let mut cursor = 0;
    let mut until = async |want: State| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let found = {
                let seen = seen.lock().expect("seen");
                seen[cursor..].iter().position(|s| *s == want)
            };
            if let Some(at) = found {
                cursor += at + 1;
                return anyhow::Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "never {want:?}: {:?}",
                seen.lock().expect("seen")
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    until(State::Snapshotting).await?;
    until(State::Streaming).await?;
    let end_walsender = "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE slot_name = $1 AND active_pid IS NOT NULL";
    s.sql.execute(end_walsender, &[&slot]).await?;
    until(State::Reconnecting).await?;
    until(State::Streaming).await?;
    // The slot goes while the replicator streams (the session that made it: before, that
    // stopped the replicator with an error instead of copying anew), dropped between two of
    // its attempts to reconnect.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        s.sql.execute(end_walsender, &[&slot]).await?;
        if s.sql
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
        {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the slot stayed busy");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    until(State::SlotLost).await?;
    until(State::Rebuilding).await?;
    until(State::Streaming).await?;
    workload(&s.sql, 43, 20).await?;
    until(State::Lagging).await?;
    wait_until_equal(&s).await?;
    stop_tx.send(true)?;
    task.await??;
    until(State::Stopped).await?;
    watcher.abort();
    Ok(())
}
