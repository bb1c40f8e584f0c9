//! The sync core on an embedded store, without PostgreSQL or a transport: priorities, the
//! stall timeout, who wakes, never an op at or below `after`.

use std::sync::Arc;
use std::time::Duration;

use walsync_protocol::{BucketRequest, Line, SyncRequest};
use walsync_rules::SyncRules;
use walsync_storage::{BucketStore, KvStore, StoreRead, StoreWriter, StoredRow};
use walsync_sync::{Identity, Lines, SyncConfig, SyncCore, SyncError};
use walsync_types::{RowId, RowOutput};

const RULES: &str = r#"
bucket_definitions:
  urgent:
    priority: 1
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM alerts WHERE owner = bucket.user_id
  mine:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM notes WHERE owner = bucket.user_id
"#;

fn store() -> (tempfile::TempDir, Arc<KvStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(KvStore::open(dir.path()).expect("open"));
    (dir, store)
}

/// Writes `n` rows of `table` into `bucket`, one commit, snapshot complete.
fn put(store: &KvStore, table: &str, bucket: &str, from: usize, n: usize) {
    let mut w = store.writer().expect("writer");
    for i in from..from + n {
        let id = i.to_string();
        w.upsert_row(
            &format!("public.{table}"),
            &RowId::from_encoded(&id),
            StoredRow::default(),
            vec![RowOutput {
                bucket: bucket.to_owned(),
                object_type: table.to_owned(),
                object_id: id.clone(),
                data: format!(r#"{{"id":{id}}}"#),
            }],
            vec![],
        )
        .expect("upsert");
    }
    w.set_snapshot_complete();
    w.commit().expect("commit");
}

fn identity(user: &str) -> Identity {
    Identity {
        user_id: user.to_owned(),
        claims: serde_json::json!({"sub": user}),
        expires_at: None,
    }
}

fn core(store: Arc<KvStore>, config: SyncConfig) -> Arc<SyncCore<KvStore>> {
    let rules = Arc::new(SyncRules::from_yaml(RULES).expect("rules"));
    let core = SyncCore::new(store, rules, config);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    // The hub runs until the test ends (the sender is leaked with the task).
    std::mem::forget(_stop);
    tokio::spawn(core.clone().run(stop_rx));
    core
}

async fn next(lines: &mut Lines) -> Line {
    tokio::time::timeout(Duration::from_secs(5), lines.recv())
        .await
        .expect("a line in time")
        .expect("stream open")
        .expect("no error")
}

/// Reads lines up to and including the next `checkpoint_complete`.
/// Lines until (and with) the next `checkpoint_complete`, leaving out `token_expires_in`.
async fn until_complete(lines: &mut Lines) -> Vec<Line> {
    let mut out = Vec::new();
    loop {
        let line = next(lines).await;
        if matches!(line, Line::TokenExpiresIn(_)) {
            continue;
        }
        let done = matches!(line, Line::CheckpointComplete(_));
        out.push(line);
        if done {
            return out;
        }
    }
}

#[tokio::test]
async fn higher_priority_buckets_come_first_with_a_partial_completion() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 3);
    put(&store, "alerts", r#"urgent["u1"]"#, 0, 2);
    let core = core(store, SyncConfig::default());
    let mut lines = core.open(identity("u1"), SyncRequest::default());
    let got = until_complete(&mut lines).await;
    let kinds: Vec<String> = got
        .iter()
        .map(|l| match l {
            Line::Checkpoint(c) => format!("checkpoint {}", c.buckets.len()),
            Line::Data(d) => format!("data {}", d.bucket),
            Line::PartialCheckpointComplete(p) => format!("partial {}", p.priority),
            Line::CheckpointComplete(_) => "complete".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "checkpoint 2",
            r#"data urgent["u1"]"#,
            "partial 1",
            r#"data mine["u1"]"#,
            "complete"
        ]
    );
    let Line::Checkpoint(c) = &got[0] else {
        unreachable!()
    };
    let urgent = c.buckets.iter().find(|b| b.bucket.starts_with("urgent"));
    assert_eq!(urgent.map(|b| b.priority), Some(1));
}

#[tokio::test]
async fn nothing_at_or_below_after_is_sent_and_pages_split() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 10);
    let core = core(
        store,
        SyncConfig {
            page_ops: 3,
            ..SyncConfig::default()
        },
    );
    // The client holds ops up to 4.
    let request = SyncRequest {
        buckets: vec![BucketRequest {
            name: r#"mine["u1"]"#.into(),
            after: 4,
        }],
        ..SyncRequest::default()
    };
    let mut lines = core.open(identity("u1"), request);
    let got = until_complete(&mut lines).await;
    let pages: Vec<(u64, Vec<u64>, bool, u64)> = got
        .iter()
        .filter_map(|l| match l {
            Line::Data(d) => Some((
                d.after,
                d.data.iter().map(|o| o.op_id).collect(),
                d.has_more,
                d.next_after,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        pages,
        vec![(4, vec![5, 6, 7], true, 7), (7, vec![8, 9, 10], false, 10)]
    );
}

#[tokio::test]
async fn only_concerned_streams_wake() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 1);
    put(&store, "notes", r#"mine["u2"]"#, 100, 1);
    let core = core(store.clone(), SyncConfig::default());
    let mut a = core.open(identity("u1"), SyncRequest::default());
    let mut b = core.open(identity("u2"), SyncRequest::default());
    until_complete(&mut a).await;
    until_complete(&mut b).await;
    let before = core.stats();
    put(&store, "notes", r#"mine["u1"]"#, 1, 1);
    core.notify_checkpoint();
    let diff = until_complete(&mut a).await;
    assert!(matches!(&diff[0], Line::CheckpointDiff(d) if d.updated_buckets.len() == 1));
    let after = core.stats();
    assert_eq!(after.wakeups - before.wakeups, 1, "only u1's stream woke");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.recv())
            .await
            .is_err(),
        "u2 got nothing"
    );
    assert_eq!(after.connections, 2);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 50);
    let core = core(
        store,
        SyncConfig {
            page_ops: 1,
            buffer_lines: 2,
            stall_timeout: Duration::from_millis(200),
            ..SyncConfig::default()
        },
    );
    let mut lines = core.open(identity("u1"), SyncRequest::default());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(core.stats().connections, 0, "the stalled stream is gone");
    let mut received = 0;
    while let Some(item) = lines.recv().await {
        match item {
            Ok(_) => received += 1,
            Err(e) => assert!(matches!(e, SyncError::TooSlow(_)), "{e}"),
        }
    }
    assert!(received < 50, "the stream ended early ({received} lines)");
}

#[tokio::test]
async fn an_expired_token_ends_the_stream_after_a_countdown() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 1);
    let core = core(
        store,
        SyncConfig {
            keepalive: Duration::from_millis(300),
            ..SyncConfig::default()
        },
    );
    let mut who = identity("u1");
    who.expires_at = Some(std::time::SystemTime::now() + Duration::from_millis(1500));
    let mut lines = core.open(who, SyncRequest::default());
    until_complete(&mut lines).await;
    let mut countdown = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(5), lines.recv())
        .await
        .expect("ends in time")
    {
        if let Ok(Line::TokenExpiresIn(s)) = item {
            countdown.push(s);
        }
    }
    assert!(countdown.len() >= 3, "keepalives: {countdown:?}");
    assert_eq!(countdown.last(), Some(&0), "ends with 0: {countdown:?}");
    assert!(countdown.windows(2).all(|w| w[0] >= w[1]), "{countdown:?}");
}

#[tokio::test]
async fn data_lines_stay_within_the_byte_limit() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 40);
    let core = core(
        store,
        SyncConfig {
            page_ops: 1_000,
            // About three rows (plus per-op overhead) per line.
            max_line_bytes: 250,
            ..SyncConfig::default()
        },
    );
    let mut lines = core.open(identity("u1"), SyncRequest::default());
    let got = until_complete(&mut lines).await;
    let pages: Vec<usize> = got
        .iter()
        .filter_map(|l| match l {
            Line::Data(d) => Some(d.data.len()),
            _ => None,
        })
        .collect();
    assert!(pages.len() > 5, "{pages:?}");
    assert!(pages.iter().all(|n| (1..=4).contains(n)), "{pages:?}");
    assert_eq!(pages.iter().sum::<usize>(), 40);
}

#[tokio::test]
async fn a_rebuilt_store_sends_live_streams_a_full_checkpoint() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 3);
    put(&store, "alerts", r#"urgent["u1"]"#, 0, 2);
    let core = core(store.clone(), SyncConfig::default());
    let mut lines = core.open(identity("u1"), SyncRequest::default());
    until_complete(&mut lines).await;
    // The slot was lost: the store is emptied and copied anew, in one commit here (so no reader
    // ever sees it incomplete). Meanwhile the alerts went, and their bucket is empty now.
    let mut w = store.writer().expect("writer");
    w.clear_all().expect("clear");
    w.commit().expect("commit");
    put(&store, "notes", r#"mine["u1"]"#, 0, 2);
    core.notify_checkpoint();
    let got = until_complete(&mut lines).await;
    let Line::Checkpoint(c) = &got[0] else {
        panic!("a full checkpoint, not {:?}", got[0]);
    };
    let urgent = c.buckets.iter().find(|b| b.bucket.starts_with("urgent"));
    assert_eq!(
        urgent.map(|b| (b.count, b.checksum)),
        Some((0, 0)),
        "the emptied bucket is listed with nothing in it"
    );
    // The next change is a diff again.
    put(&store, "notes", r#"mine["u1"]"#, 5, 1);
    core.notify_checkpoint();
    let got = until_complete(&mut lines).await;
    assert!(matches!(&got[0], Line::CheckpointDiff(_)), "{:?}", got[0]);
}

/// While the store's buckets follow other sync rules (the replicator is copying the tables
/// anew for these), a client is sent no checkpoint: it keeps what it holds. Once the store
/// follows these rules, it is served.
#[tokio::test]
async fn streams_wait_while_the_buckets_follow_other_rules() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 3);
    let mut w = store.writer().expect("writer");
    w.set_rules("the fingerprint of other rules");
    w.commit().expect("commit");
    let core = core(store.clone(), SyncConfig::default());
    let mut lines = core.open(identity("u1"), SyncRequest::default());
    let waited = tokio::time::timeout(Duration::from_millis(700), async {
        loop {
            if let Line::Checkpoint(_) = next(&mut lines).await {
                break;
            }
        }
    })
    .await;
    assert!(
        waited.is_err(),
        "no checkpoint of buckets built with other rules"
    );
    let mut w = store.writer().expect("writer");
    w.set_rules(SyncRules::from_yaml(RULES).expect("rules").fingerprint());
    w.commit().expect("commit");
    core.notify_checkpoint();
    let got = until_complete(&mut lines).await;
    assert!(matches!(&got[0], Line::Checkpoint(_)), "{:?}", got[0]);
}

/// History pruned while a stream has not yet seen it (here: pruned before the hub heard of the
/// commit): the stream cannot diff from its last checkpoint, so it is sent a full checkpoint
/// with the data it lacks, not nothing.
#[tokio::test]
async fn a_stream_whose_history_was_pruned_gets_a_full_checkpoint() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 3);
    let core = core(store.clone(), SyncConfig::default());
    let mut lines = core.open(identity("u1"), SyncRequest::default());
    until_complete(&mut lines).await;
    put(&store, "notes", r#"mine["u1"]"#, 3, 2);
    let now = store.checkpoint().expect("checkpoint").op_id;
    while !store.prune_history(now, 100).expect("prune").done {}
    core.notify_checkpoint();
    let got = until_complete(&mut lines).await;
    let Line::Checkpoint(c) = &got[0] else {
        panic!("a full checkpoint, not {:?}", got[0]);
    };
    assert_eq!(c.last_op_id, now);
    let sent: usize = got
        .iter()
        .map(|l| match l {
            Line::Data(d) => d.data.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(sent, 2, "only the two new rows");
}

#[tokio::test]
async fn the_token_lifetime_is_said_again_before_it_ends() {
    let (_dir, store) = store();
    put(&store, "notes", r#"mine["u1"]"#, 0, 1);
    let core = core(
        store,
        SyncConfig {
            // No keepalive within the test: only the opening line and the reminder.
            keepalive: Duration::from_secs(3600),
            token_refresh_lead: Duration::from_secs(1),
            ..SyncConfig::default()
        },
    );
    let mut who = identity("u1");
    who.expires_at = Some(std::time::SystemTime::now() + Duration::from_millis(2500));
    let mut lines = core.open(who, SyncRequest::default());
    until_complete(&mut lines).await;
    let mut countdown = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(5), lines.recv())
        .await
        .expect("ends in time")
    {
        if let Ok(Line::TokenExpiresIn(s)) = item {
            countdown.push(s);
        }
    }
    // A second before expiry the client is told to refresh (never `0` before the end), then the
    // stream ends at expiry.
    assert_eq!(countdown, [1, 0]);
}

/// Writes one row of `notes` into `mine["u1"]` at source position `lsn`.
fn put_at(store: &KvStore, id: usize, lsn: u64) {
    let mut w = store.writer().expect("writer");
    let row = id.to_string();
    w.upsert_row(
        "public.notes",
        &RowId::from_encoded(&row),
        StoredRow::default(),
        vec![RowOutput {
            bucket: r#"mine["u1"]"#.into(),
            object_type: "notes".into(),
            object_id: row.clone(),
            data: format!(r#"{{"id":{row}}}"#),
        }],
        vec![],
    )
    .expect("upsert");
    w.set_position(walsync_types::Lsn(lsn));
    w.set_snapshot_complete();
    w.commit().expect("commit");
}

fn write_checkpoint_of(line: &Line) -> Option<u64> {
    match line {
        Line::Checkpoint(c) => c.write_checkpoint,
        Line::CheckpointDiff(d) => d.write_checkpoint,
        _ => None,
    }
}

fn client(id: &str) -> SyncRequest {
    SyncRequest {
        client_id: Some(id.into()),
        ..SyncRequest::default()
    }
}

/// Only the client that asked for a write checkpoint is told of it, with its own number, never
/// above the checkpoint's position; another client of the same user, and a client that never
/// asked, get none.
#[tokio::test]
async fn write_checkpoints_go_only_to_the_client_that_asked() {
    let (_dir, store) = store();
    put_at(&store, 0, 100);
    let core = core(store.clone(), SyncConfig::default());
    let mut asker = core.open(identity("u1"), client("phone"));
    let mut other = core.open(identity("u1"), client("laptop"));
    for lines in [&mut asker, &mut other] {
        let full = until_complete(lines).await;
        assert_eq!(write_checkpoint_of(&full[0]), None, "nobody asked yet");
    }

    // The phone asks at position 150; replication passes it at 200 with a change of the
    // user's bucket, which both streams get.
    assert_eq!(core.register_write_checkpoint("u1", "phone", 150), 150);
    put_at(&store, 1, 200);
    core.notify_checkpoint();
    let diff = until_complete(&mut asker).await;
    assert_eq!(write_checkpoint_of(&diff[0]), Some(150));
    let diff = until_complete(&mut other).await;
    assert_eq!(
        write_checkpoint_of(&diff[0]),
        None,
        "the laptop never asked"
    );

    // Another request, already passed: the phone gets an empty diff saying so; the laptop
    // nothing at all.
    core.register_write_checkpoint("u1", "phone", 180);
    let diff = until_complete(&mut asker).await;
    assert!(
        matches!(&diff[0], Line::CheckpointDiff(d) if d.updated_buckets.is_empty()),
        "{diff:?}"
    );
    assert_eq!(write_checkpoint_of(&diff[0]), Some(180));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other.recv())
            .await
            .is_err(),
        "the laptop's stream stays quiet"
    );

    // A later change: the phone's diff does not repeat its write checkpoint.
    put_at(&store, 2, 300);
    core.notify_checkpoint();
    let diff = until_complete(&mut asker).await;
    assert_eq!(write_checkpoint_of(&diff[0]), None, "said once");
    // A new stream of the phone hears it again in its full checkpoint.
    let mut again = core.open(identity("u1"), client("phone"));
    let full = until_complete(&mut again).await;
    assert_eq!(write_checkpoint_of(&full[0]), Some(180));
    // A request beyond the store's position is not vouched for.
    core.register_write_checkpoint("u1", "phone", 1_000);
    put_at(&store, 3, 400);
    core.notify_checkpoint();
    let diff = until_complete(&mut again).await;
    assert_eq!(write_checkpoint_of(&diff[0]), None, "not passed yet");
}

/// A bucket that two parameter queries of a definition reach (one static, one from the
/// request) is in the checkpoint once and its ops are sent once.
#[tokio::test]
async fn a_bucket_reached_twice_is_sent_once() {
    const TWICE: &str = r#"
bucket_definitions:
  both:
    parameters:
      - SELECT 'u1' AS user_id
      - SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM notes WHERE owner = bucket.user_id
"#;
    let (_dir, store) = store();
    put(&store, "notes", r#"both["u1"]"#, 0, 3);
    let rules = Arc::new(SyncRules::from_yaml(TWICE).expect("rules"));
    let core = SyncCore::new(store, rules, SyncConfig::default());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(core.clone().run(stop_rx));
    let mut lines = core.open(identity("u1"), SyncRequest::default());
    let got = until_complete(&mut lines).await;
    let Line::Checkpoint(c) = &got[0] else {
        panic!("a checkpoint first: {got:?}")
    };
    let names: Vec<&str> = c.buckets.iter().map(|b| b.bucket.as_str()).collect();
    assert_eq!(names, [r#"both["u1"]"#]);
    let ops: usize = got
        .iter()
        .map(|l| match l {
            Line::Data(d) => d.data.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(ops, 3, "each op once");
    let _ = stop.send(true);
}
