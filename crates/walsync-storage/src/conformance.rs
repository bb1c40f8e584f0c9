//! The conformance suite every [`BucketStore`] backend must pass. A backend's tests call
//! [`run_all`] with a function that makes a fresh, empty store.

use std::collections::BTreeMap;

use walsync_types::{LookupEntry, LookupKey, OpKind, RowId, RowOutput};
use walsync_types::{Lsn, Value, add_checksums};

use crate::{BucketStore, Op, StoreRead, StoreWriter, StoredRow};

/// A client's copy of one bucket, built by replaying ops the way PowerSync clients do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientBucket {
    pub rows: BTreeMap<(String, String), String>,
    pub checksum: u32,
    pub last_op_id: u64,
}

impl ClientBucket {
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            assert!(
                op.op_id > self.last_op_id,
                "op {} after {}",
                op.op_id,
                self.last_op_id
            );
            self.last_op_id = op.op_id;
            match op.kind {
                OpKind::Put => {
                    self.rows.insert(
                        (op.object_type.clone(), op.object_id.clone()),
                        op.data.clone().unwrap_or_default(),
                    );
                    self.checksum = add_checksums(self.checksum, op.checksum);
                }
                OpKind::Remove => {
                    self.rows
                        .remove(&(op.object_type.clone(), op.object_id.clone()));
                    self.checksum = add_checksums(self.checksum, op.checksum);
                }
                OpKind::Move => self.checksum = add_checksums(self.checksum, op.checksum),
                OpKind::Clear => {
                    self.rows.clear();
                    self.checksum = op.checksum;
                }
            }
        }
    }

    /// Replays all of `bucket` from the start.
    pub fn read<S: BucketStore>(store: &S, bucket: &str) -> ClientBucket {
        let mut c = ClientBucket::default();
        c.catch_up(store, bucket);
        c
    }

    /// Applies the ops after this copy's position, in pages.
    pub fn catch_up<S: BucketStore>(&mut self, store: &S, bucket: &str) {
        let up_to = store.checkpoint().expect("checkpoint").op_id;
        self.catch_up_to(store, bucket, up_to);
    }

    /// Applies the ops after this copy's position up to `up_to`, in pages.
    pub fn catch_up_to<S: StoreRead + ?Sized>(&mut self, store: &S, bucket: &str, up_to: u64) {
        loop {
            let ops = store.ops(bucket, self.last_op_id, up_to, 7).expect("ops");
            if ops.is_empty() {
                break;
            }
            self.apply(&ops);
        }
    }
}

/// A row id in its encoded form (the tests also use ids the replicator never writes).
fn row_id(encoded: impl AsRef<str>) -> RowId {
    RowId::from_encoded(encoded)
}

fn out(bucket: &str, id: &str, data: &str) -> RowOutput {
    RowOutput {
        bucket: bucket.into(),
        object_type: "t".into(),
        object_id: id.into(),
        data: data.into(),
    }
}

/// Rows `0..n` of `public.t`, each in bucket `a` as object `t/<i>` with data `{}`.
fn put_rows<W: StoreWriter>(w: &mut W, n: i64) {
    for i in 0..n {
        let id = i.to_string();
        w.upsert_row(
            "public.t",
            &row_id(&id),
            row(i),
            vec![out("a", &id, "{}")],
            vec![],
        )
        .expect("upsert");
    }
}

fn row(v: i64) -> StoredRow {
    StoredRow {
        columns: vec!["v".to_owned()].into(),
        values: vec![Value::Int(v)],
    }
}

fn member(user: &str, project: i64) -> LookupEntry {
    LookupEntry {
        key: key(user),
        parameters: vec![serde_json::json!(project)],
    }
}

fn key(user: &str) -> LookupKey {
    LookupKey {
        definition: "p".into(),
        query: 0,
        values: vec![user.into()],
    }
}

fn state_matches_replay<S: BucketStore>(store: &S, bucket: &str) {
    let replay = ClientBucket::read(store, bucket);
    let state = store.bucket_states(&[bucket.to_owned()]).expect("states")[0].unwrap_or_default();
    assert_eq!(
        state.checksum, replay.checksum,
        "bucket {bucket}: state checksum is the sum of its ops"
    );
    assert_eq!(state.last_op_id, replay.last_op_id.max(state.last_op_id));
}

/// Runs every check against stores made by `fresh`.
pub fn run_all<S: BucketStore>(fresh: impl Fn() -> S) {
    puts_removes_and_moves(&fresh());
    unchanged_data_writes_no_op(&fresh());
    truncate_removes_only_that_table(&fresh());
    lookups_have_history(&fresh());
    writes_are_atomic(&fresh());
    changes_follow_commits(&fresh());
    compaction_keeps_checksums_and_rows(&fresh());
    clear_all_starts_over_with_growing_op_ids(&fresh());
    snapshots_see_one_checkpoint(&fresh());
    deferred_commits_are_visible_at_once(&fresh());
    one_writer_sees_its_own_writes(&fresh());
    ops_read_alike_at_any_bounds(&fresh());
    row_ids_of_every_form_are_found_again(&fresh());
    a_put_whose_checksum_collides_is_still_written(&fresh());
    long_row_ids_keep_their_lookups(&fresh());
    compaction_in_bounded_steps_covers_every_bucket(&fresh());
    pruned_history_reads_alike_at_later_checkpoints(&fresh());
    identical_rows_are_copies_of_one(&fresh());
    many_bucket_states_read_alike(&fresh());
    staged_writes_equal_unstaged_ones(&fresh(), &fresh(), &fresh());
    a_recopy_emits_only_what_differs(&fresh(), &fresh(), &fresh());
    a_recopy_of_identical_rows_stays_within_its_budget(&fresh());
}

/// Bucket states asked for many at once (a user in thousands of projects; a backend may read
/// them differently then) equal those asked for one by one, in the order asked, with names
/// asked twice and names no bucket has.
pub fn many_bucket_states_read_alike<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    for i in 0..1_500i64 {
        let id = i.to_string();
        w.upsert_row(
            "public.t",
            &row_id(&id),
            row(i),
            vec![out(&format!("b{}", i * 7 % 1_500), &id, "{}")],
            vec![],
        )
        .expect("upsert");
    }
    w.commit().expect("commit");
    let mut asked: Vec<String> = (0..1_500).rev().map(|i| format!("b{i}")).collect();
    asked.extend(["b7", "none", "b0", "a", "zzz"].map(String::from));
    let many = store.bucket_states(&asked).expect("states");
    assert_eq!(many.len(), asked.len());
    for (name, state) in asked.iter().zip(&many) {
        let one = store
            .bucket_states(std::slice::from_ref(name))
            .expect("state")[0];
        assert_eq!(*state, one, "bucket {name}");
        assert_eq!(state.is_some(), name.starts_with('b'), "bucket {name}");
    }
}

/// A row inserted again while stored (a keyless table's duplicates) is another copy: deletes
/// remove one copy each, and the row leaves its bucket with the last; a truncate removes all.
pub fn identical_rows_are_copies_of_one<S: BucketStore>(store: &S) {
    let insert = |n: usize| {
        let mut w = store.writer().expect("writer");
        for _ in 0..n {
            w.insert_row(
                "public.k",
                &row_id("[\"1\",\"a\"]"),
                row(1),
                vec![out("a", "1", "{}")],
                vec![],
            )
            .expect("insert");
        }
        w.commit().expect("commit");
    };
    let delete = || {
        let mut w = store.writer().expect("writer");
        w.delete_row("public.k", &row_id("[\"1\",\"a\"]"))
            .expect("delete");
        w.commit().expect("commit");
    };
    let rows = || ClientBucket::read(store, "a").rows.len();
    insert(3);
    assert_eq!(
        store.ops("a", 0, u64::MAX, 10).expect("ops").len(),
        1,
        "one put"
    );
    delete();
    delete();
    assert_eq!(rows(), 1, "one copy is left");
    delete();
    assert_eq!(rows(), 0, "the last copy went");
    insert(2);
    let mut w = store.writer().expect("writer");
    w.truncate("public.k").expect("truncate");
    w.commit().expect("commit");
    assert_eq!(rows(), 0, "a truncate removes every copy");
    state_matches_replay(store, "a");
}

/// Compaction in steps of a few ops visits every bucket once, ends, and leaves every bucket as
/// one pass would: the same rows and checksums, nothing left for a second pass.
pub fn compaction_in_bounded_steps_covers_every_bucket<S: BucketStore>(store: &S) {
    let buckets: Vec<String> = (0..7).map(|b| format!("b{b}")).collect();
    for version in 0..4 {
        let mut w = store.writer().expect("writer");
        for (n, b) in buckets.iter().enumerate() {
            for r in 0..3 {
                let id = format!("{n}-{r}");
                w.upsert_row(
                    "public.t",
                    &row_id(&id),
                    row(version),
                    vec![out(b, &id, &format!("{{\"v\":{version}}}"))],
                    vec![],
                )
                .expect("upsert");
            }
        }
        w.commit().expect("commit");
    }
    let before: Vec<ClientBucket> = buckets
        .iter()
        .map(|b| ClientBucket::read(store, b))
        .collect();
    let (mut after, mut steps, mut moved) = (None::<String>, 0, 0);
    loop {
        let step = store
            .compact_batch(after.as_deref(), 5)
            .expect("compact step");
        steps += 1;
        moved += step.stats.moved;
        assert!(
            steps <= buckets.len(),
            "each step compacts at least one bucket"
        );
        match step.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert!(steps > 1, "steps were bounded");
    assert_eq!(moved, 7 * 3 * 3, "every superseded put became a move");
    assert_eq!(
        store.compact().expect("compact"),
        crate::CompactStats::default()
    );
    for (b, was) in buckets.iter().zip(before) {
        let now = ClientBucket::read(store, b);
        assert_eq!(
            (now.rows, now.checksum),
            (was.rows, was.checksum),
            "bucket {b}"
        );
        state_matches_replay(store, b);
    }
}

/// After pruning history before checkpoint `p`, every read at `p` or later answers as before:
/// changes from `p` on, lookups as of `p` and later. The checkpoint says where history begins.
pub fn pruned_history_reads_alike_at_later_checkpoints<S: BucketStore>(store: &S) {
    let mut marks = Vec::new();
    let steps: [&[(&str, &str)]; 6] = [
        &[("1", "u1"), ("2", "u2")],
        &[("1", "u2")],
        &[("3", "u1"), ("2", "")],
        &[("1", ""), ("4", "u3")],
        &[("3", "u2")],
        &[("5", "u1"), ("4", "u1")],
    ];
    for step in steps {
        let mut w = store.writer().expect("writer");
        for (id, user) in step {
            if user.is_empty() {
                w.delete_row("public.m", &row_id(id)).expect("delete");
            } else {
                w.upsert_row(
                    "public.m",
                    &row_id(id),
                    row(1),
                    vec![out("a", id, &format!("{{\"u\":\"{user}\"}}"))],
                    vec![member(user, 7)],
                )
                .expect("upsert");
            }
        }
        marks.push(w.commit().expect("commit").op_id);
    }
    let p = marks[3];
    let now = *marks.last().expect("marks");
    let reads = |store: &S| {
        let mut out = Vec::new();
        for at in marks.iter().copied().filter(|m| *m >= p) {
            out.push(format!(
                "changes {at}: {:?}",
                store.changes(at, now).expect("changes")
            ));
            for u in ["u1", "u2", "u3"] {
                out.push(format!(
                    "{u} at {at}: {:?}",
                    store.lookup(&key(u), at).expect("lookup")
                ));
            }
        }
        out
    };
    let before = reads(store);
    let mut removed = (0, 0);
    loop {
        let step = store.prune_history(p, 2).expect("prune");
        removed = (removed.0 + step.changes, removed.1 + step.lookups);
        if step.done {
            break;
        }
    }
    assert!(
        removed.0 >= 3 && removed.1 >= 3,
        "history was removed: {removed:?}"
    );
    assert_eq!(
        reads(store),
        before,
        "reads at or after the mark are unchanged"
    );
    assert_eq!(store.checkpoint().expect("checkpoint").changes_from, p);
    assert!(store.changes(0, p).expect("changes").buckets.is_empty());
    // Writers after the pruning keep the mark.
    let mut w = store.writer().expect("writer");
    w.delete_row("public.m", &row_id("5")).expect("delete");
    assert_eq!(w.commit().expect("commit").changes_from, p);
}

/// A row whose id is longer than any engine key (a `REPLICA IDENTITY FULL` row of 70 KB) has
/// lookups like any row: they end when it is deleted, or when its table is truncated.
pub fn long_row_ids_keep_their_lookups<S: BucketStore>(store: &S) {
    let long = |n: u32| row_id(format!("[\"{n}{}\"]", "y".repeat(70_000)));
    let mut w = store.writer().expect("writer");
    for n in 0..2 {
        w.upsert_row(
            "public.m",
            &long(n),
            row(1),
            vec![],
            vec![member(&format!("u{n}"), 7)],
        )
        .expect("upsert");
    }
    let c1 = w.commit().expect("commit").op_id;
    for n in 0..2 {
        assert_eq!(
            store.lookup(&key(&format!("u{n}")), c1).expect("lookup"),
            vec![vec![serde_json::json!(7)]]
        );
    }
    let mut w = store.writer().expect("writer");
    w.delete_row("public.m", &long(0)).expect("delete");
    let c2 = w.commit().expect("commit").op_id;
    assert!(store.lookup(&key("u0"), c2).expect("lookup").is_empty());
    let mut w = store.writer().expect("writer");
    w.truncate("public.m").expect("truncate");
    let c3 = w.commit().expect("commit").op_id;
    assert!(store.lookup(&key("u1"), c3).expect("lookup").is_empty());
    assert_eq!(store.row("public.m", &long(1)).expect("row"), None);
}

/// Two data texts with the same 32-bit op checksum (found by trying, about 2^16 tries): an
/// update from one to the other changes the row, so it must be written as a PUT.
pub fn a_put_whose_checksum_collides_is_still_written<S: BucketStore>(store: &S) {
    let mut seen = std::collections::HashMap::new();
    let (first, second) = (0u32..)
        .find_map(|i| {
            let data = format!("{{\"v\":{i}}}");
            let c = walsync_types::put_checksum("t", "1", &data);
            seen.insert(c, data.clone()).map(|earlier| (earlier, data))
        })
        .expect("a collision");
    for data in [&first, &second] {
        let mut w = store.writer().expect("writer");
        w.upsert_row(
            "public.t",
            &row_id("[\"1\"]"),
            row(1),
            vec![out("a", "1", data)],
            vec![],
        )
        .expect("upsert");
        w.commit().expect("commit");
    }
    let client = ClientBucket::read(store, "a");
    assert_eq!(
        client.rows.get(&("t".to_owned(), "1".to_owned())),
        Some(&second),
        "the second data is what the bucket holds"
    );
    state_matches_replay(store, "a");
}

/// Row ids as the replicator writes them (the JSON array of the key columns' text), integers
/// among them (a backend may key those by number), are found by reads, updates, deletes and a
/// truncate, which must recover every row id from what it stored.
pub fn row_ids_of_every_form_are_found_again<S: BucketStore>(store: &S) {
    // A `REPLICA IDENTITY FULL` row's id is the whole row: longer than any engine key.
    let long = format!("[\"{}\",\"\\\"q\"]", "x".repeat(70_000));
    let ids = [
        long.as_str(),
        "[\"5\"]",
        "[\"-5\"]",
        "[\"0\"]",
        "[\"-0\"]",
        "[\"007\"]",
        "[\"9223372036854775807\"]",
        "[\"-9223372036854775808\"]",
        "[\"99999999999999999999\"]",
        "[\"1\",\"2\"]",
        "[null]",
        "[\"abc\"]",
        "5",
    ];
    let write = |v: i64| {
        let mut w = store.writer().expect("writer");
        for (n, id) in ids.iter().enumerate() {
            let data = format!("{{\"v\":{v}}}");
            let outs = vec![out("a", &n.to_string(), &data)];
            w.upsert_row("public.t", &row_id(id), row(v), outs, vec![])
                .expect("upsert");
        }
        w.commit().expect("commit");
    };
    write(1);
    write(2);
    for id in ids {
        let stored = store.row("public.t", &row_id(id)).expect("row");
        assert_eq!(
            stored.map(|r| r.values),
            Some(vec![Value::Int(2)]),
            "row {id}"
        );
    }
    assert_eq!(ClientBucket::read(store, "a").rows.len(), ids.len());
    let mut w = store.writer().expect("writer");
    w.delete_row("public.t", &row_id(ids[0])).expect("delete");
    w.commit().expect("commit");
    assert_eq!(store.row("public.t", &row_id(ids[0])).expect("row"), None);
    let mut w = store.writer().expect("writer");
    w.truncate("public.t").expect("truncate");
    w.commit().expect("commit");
    assert!(
        ClientBucket::read(store, "a").rows.is_empty(),
        "every row removed"
    );
    for id in ids {
        assert_eq!(
            store.row("public.t", &row_id(id)).expect("row"),
            None,
            "row {id}"
        );
    }
    state_matches_replay(store, "a");
}

/// Pages of a bucket's ops are cut at any `after`, `up_to` and `limit`, also in long commits
/// (a backend may keep a commit's ops together) and after compaction.
pub fn ops_read_alike_at_any_bounds<S: BucketStore>(store: &S) {
    let pad = "x".repeat(300);
    let write = |ids: std::ops::Range<u32>, v: u32, delete: bool| {
        let mut w = store.writer().expect("writer");
        for i in ids {
            let id = i.to_string();
            if delete {
                w.delete_row("public.t", &row_id(&id)).expect("delete");
                continue;
            }
            let bucket = if i % 4 == 0 { "b" } else { "a" };
            let data = format!("{{\"v\":{v},\"pad\":\"{pad}\"}}");
            w.upsert_row(
                "public.t",
                &row_id(&id),
                row(i.into()),
                vec![out(bucket, &id, &data)],
                vec![],
            )
            .expect("upsert");
        }
        w.commit().expect("commit");
    };
    write(0..200, 1, false);
    write(50..150, 2, false);
    write(0..40, 0, true);
    write(200..203, 1, false);
    let check = |what: &str| {
        let up = store.checkpoint().expect("checkpoint").op_id;
        let all = store.ops("a", 0, up, usize::MAX).expect("ops");
        assert!(
            all.windows(2).all(|w| w[0].op_id < w[1].op_id),
            "{what}: in order"
        );
        let ids: Vec<u64> = all.iter().map(|o| o.op_id).collect();
        let mut bounds = vec![0, 1, up / 3, up / 2, up - 1, up, up + 5];
        bounds.extend(ids.iter().step_by(17).flat_map(|&i| [i - 1, i, i + 1]));
        for &after in &bounds {
            for &up_to in &bounds {
                for limit in [1, 7, 64, usize::MAX] {
                    let got = store.ops("a", after, up_to, limit).expect("ops");
                    let want: Vec<Op> = all
                        .iter()
                        .filter(|o| o.op_id > after && o.op_id <= up_to)
                        .take(limit)
                        .cloned()
                        .collect();
                    assert_eq!(
                        got, want,
                        "{what}: after {after}, up to {up_to}, limit {limit}"
                    );
                }
            }
        }
        state_matches_replay(store, "a");
        state_matches_replay(store, "b");
        (
            ClientBucket::read(store, "a"),
            ClientBucket::read(store, "b"),
        )
    };
    let before = check("written");
    assert_eq!(before.0.rows.len(), 122, "rows 40..203 not divisible by 4");
    store.compact().expect("compact");
    assert_eq!(check("compacted"), before);
}

/// Within one transaction: a row written many times, a truncate over committed and new rows,
/// and a clear followed by the same rows and buckets again all end as the last write says.
pub fn one_writer_sees_its_own_writes<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    put_rows(&mut w, 3);
    w.commit().expect("commit");
    let mut w = store.writer().expect("writer");
    for v in 0..5 {
        w.upsert_row(
            "public.t",
            &row_id("9"),
            row(v),
            vec![out("a", "9", &format!("{{\"v\":{v}}}"))],
            vec![],
        )
        .expect("upsert");
    }
    assert_eq!(w.row("public.t", &row_id("9")).expect("row"), Some(row(4)));
    w.truncate("public.t").expect("truncate");
    assert_eq!(w.row("public.t", &row_id("9")).expect("row"), None);
    assert_eq!(w.row("public.t", &row_id("1")).expect("row"), None);
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(7),
        vec![out("a", "1", "{\"v\":7}")],
        vec![],
    )
    .expect("upsert");
    w.commit().expect("commit");
    let a = ClientBucket::read(store, "a");
    assert_eq!(a.rows.len(), 1, "{a:?}");
    assert_eq!(
        a.rows.get(&("t".into(), "1".into())).map(String::as_str),
        Some("{\"v\":7}")
    );
    state_matches_replay(store, "a");

    let mut w = store.writer().expect("writer");
    w.clear_all().expect("clear");
    assert_eq!(w.row("public.t", &row_id("1")).expect("row"), None);
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(8),
        vec![out("a", "1", "{\"v\":8}")],
        vec![],
    )
    .expect("upsert");
    w.commit().expect("commit");
    assert_eq!(
        store.row("public.t", &row_id("1")).expect("row"),
        Some(row(8))
    );
    let a = ClientBucket::read(store, "a");
    assert_eq!(a.rows.len(), 1, "{a:?}");
    assert_eq!(store.buckets().expect("buckets"), ["a"]);
    state_matches_replay(store, "a");
}

/// A deferred commit is visible as soon as it returns, before the sync, and later writers build
/// on it.
pub fn deferred_commits_are_visible_at_once<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(1),
        vec![out("a", "1", "{}")],
        vec![],
    )
    .expect("upsert");
    let cp = w.commit_deferred().expect("deferred commit");
    assert_eq!(store.checkpoint().expect("checkpoint"), cp);
    assert_eq!(
        store.row("public.t", &row_id("1")).expect("row"),
        Some(row(1))
    );
    let mut w = store.writer().expect("writer");
    w.delete_row("public.t", &row_id("1")).expect("delete");
    let cp2 = w.commit_deferred().expect("deferred commit");
    assert!(cp2.op_id > cp.op_id);
    store.sync().expect("sync");
    let a = ClientBucket::read(store, "a");
    assert!(a.rows.is_empty(), "{a:?}");
    assert_eq!(store.checkpoint().expect("checkpoint"), cp2);
}

pub fn puts_removes_and_moves<S: BucketStore>(store: &S) {
    assert_eq!(store.checkpoint().expect("checkpoint").op_id, 0);
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(1),
        vec![out("a", "1", "{\"v\":1}")],
        vec![],
    )
    .expect("upsert");
    assert_eq!(
        w.row("public.t", &row_id("1")).expect("row"),
        Some(row(1)),
        "a writer reads its own writes"
    );
    w.set_position(Lsn(100));
    let cp = w.commit().expect("commit");
    assert_eq!((cp.op_id, cp.lsn), (1, Some(Lsn(100))));
    assert_eq!(
        store.row("public.t", &row_id("1")).expect("row"),
        Some(row(1))
    );

    // The row moves from bucket a to bucket b: REMOVE in a, PUT in b, one commit.
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(2),
        vec![out("b", "1", "{\"v\":2}")],
        vec![],
    )
    .expect("upsert");
    w.commit().expect("commit");
    let a = ClientBucket::read(store, "a");
    let b = ClientBucket::read(store, "b");
    assert!(a.rows.is_empty());
    assert_eq!(
        b.rows.get(&("t".into(), "1".into())).map(String::as_str),
        Some("{\"v\":2}")
    );
    let a_ops = store.ops("a", 0, u64::MAX, 100).expect("ops");
    assert_eq!(
        a_ops.iter().map(|o| o.kind).collect::<Vec<_>>(),
        [OpKind::Put, OpKind::Remove]
    );
    assert_eq!(a_ops[1].subkey, "t/1");

    let mut w = store.writer().expect("writer");
    w.delete_row("public.t", &row_id("1")).expect("delete");
    w.delete_row("public.t", &row_id("missing"))
        .expect("deleting a row never seen is nothing");
    w.commit().expect("commit");
    assert!(ClientBucket::read(store, "b").rows.is_empty());
    assert_eq!(store.row("public.t", &row_id("1")).expect("row"), None);
    for bucket in ["a", "b"] {
        state_matches_replay(store, bucket);
    }
    // `after` is exclusive and `up_to` inclusive.
    let all = store.ops("b", 0, u64::MAX, 100).expect("ops");
    let tail = store
        .ops("b", all[0].op_id, all[1].op_id, 100)
        .expect("ops");
    assert_eq!(tail, all[1..2].to_vec());
}

pub fn unchanged_data_writes_no_op<S: BucketStore>(store: &S) {
    for data in ["{\"v\":1}", "{\"v\":1}", "{\"v\":2}"] {
        let mut w = store.writer().expect("writer");
        w.upsert_row(
            "public.t",
            &row_id("1"),
            row(1),
            vec![out("a", "1", data)],
            vec![],
        )
        .expect("upsert");
        w.commit().expect("commit");
    }
    assert_eq!(store.ops("a", 0, u64::MAX, 100).expect("ops").len(), 2);
    state_matches_replay(store, "a");
}

pub fn truncate_removes_only_that_table<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    put_rows(&mut w, 20);
    w.upsert_row(
        "public.t2",
        &row_id("1"),
        row(1),
        vec![out("a", "x", "{}")],
        vec![],
    )
    .expect("upsert");
    w.upsert_row(
        "public.t_",
        &row_id("1"),
        row(1),
        vec![out("a", "y", "{}")],
        vec![],
    )
    .expect("upsert");
    w.commit().expect("commit");
    let mut w = store.writer().expect("writer");
    w.truncate("public.t").expect("truncate");
    w.commit().expect("commit");
    let a = ClientBucket::read(store, "a");
    assert_eq!(
        a.rows.keys().map(|(_, id)| id.as_str()).collect::<Vec<_>>(),
        ["x", "y"]
    );
    state_matches_replay(store, "a");
}

pub fn lookups_have_history<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.m",
        &row_id("1"),
        row(1),
        vec![],
        vec![member("u1", 7)],
    )
    .expect("upsert");
    w.upsert_row(
        "public.m",
        &row_id("2"),
        row(2),
        vec![],
        vec![member("u1", 7)],
    )
    .expect("upsert");
    let c1 = w.commit().expect("commit").op_id;
    let mut w = store.writer().expect("writer");
    w.delete_row("public.m", &row_id("1")).expect("delete");
    let c2 = w.commit().expect("commit").op_id;
    assert_eq!(
        store.lookup(&key("u1"), c2).expect("lookup"),
        vec![vec![serde_json::json!(7)]],
        "still matched by row 2"
    );
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.m",
        &row_id("2"),
        row(2),
        vec![],
        vec![member("u2", 7)],
    )
    .expect("upsert");
    let c3 = w.commit().expect("commit").op_id;
    assert!(
        store.lookup(&key("u1"), c3).expect("lookup").is_empty(),
        "membership moved to u2"
    );
    assert_eq!(store.lookup(&key("u2"), c3).expect("lookup").len(), 1);
    assert_eq!(
        store.lookup(&key("u1"), c1).expect("lookup").len(),
        1,
        "history: as of the first checkpoint"
    );
    assert!(store.lookup(&key("u2"), c1).expect("lookup").is_empty());
}

pub fn writes_are_atomic<S: BucketStore>(store: &S) {
    {
        let mut w = store.writer().expect("writer");
        w.upsert_row(
            "public.t",
            &row_id("1"),
            row(1),
            vec![out("a", "1", "{}")],
            vec![member("u", 1)],
        )
        .expect("upsert");
        w.set_position(Lsn(5));
        // Dropped without commit: a crash before the storage commit.
    }
    assert_eq!(store.checkpoint().expect("checkpoint").op_id, 0);
    assert_eq!(store.checkpoint().expect("checkpoint").lsn, None);
    assert!(store.ops("a", 0, u64::MAX, 10).expect("ops").is_empty());
    assert!(
        store
            .lookup(&key("u"), u64::MAX)
            .expect("lookup")
            .is_empty()
    );
}

pub fn changes_follow_commits<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(1),
        vec![out("a", "1", "{}")],
        vec![],
    )
    .expect("upsert");
    let c1 = w.commit().expect("commit").op_id;
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("2"),
        row(1),
        vec![out("b", "2", "{}")],
        vec![member("u", 3)],
    )
    .expect("upsert");
    let c2 = w.commit().expect("commit").op_id;
    let since_c1 = store.changes(c1, c2).expect("changes");
    assert_eq!(since_c1.buckets.into_iter().collect::<Vec<_>>(), ["b"]);
    assert_eq!(since_c1.lookups.into_iter().collect::<Vec<_>>(), [key("u")]);
    assert_eq!(store.changes(0, c2).expect("changes").buckets.len(), 2);
    assert!(store.changes(c2, c2).expect("changes").buckets.is_empty());
}

pub fn compaction_keeps_checksums_and_rows<S: BucketStore>(store: &S) {
    // A deterministic jumble of puts, updates, moves and deletes over a few rows and buckets.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let buckets = ["a", "b", "c"];
    for _ in 0..40 {
        let mut w = store.writer().expect("writer");
        for _ in 0..1 + next(4) {
            let id = next(8).to_string();
            if next(5) == 0 {
                w.delete_row("public.t", &row_id(&id)).expect("delete");
            } else {
                let b = buckets[next(3) as usize];
                let data = format!("{{\"v\":{}}}", next(3));
                w.upsert_row(
                    "public.t",
                    &row_id(&id),
                    row(0),
                    vec![out(b, &id, &data)],
                    vec![],
                )
                .expect("upsert");
            }
        }
        w.commit().expect("commit");
    }
    let before: Vec<ClientBucket> = buckets
        .iter()
        .map(|b| ClientBucket::read(store, b))
        .collect();
    // A client that synced half-way before compaction, and catches up after.
    let mut partial: Vec<ClientBucket> = buckets
        .iter()
        .map(|b| {
            let mut c = ClientBucket::default();
            let ops = store.ops(b, 0, u64::MAX, 1000).expect("ops");
            c.apply(&ops[..ops.len() / 2]);
            c
        })
        .collect();
    let states_before = store
        .bucket_states(&buckets.map(String::from))
        .expect("states");
    let ops_kept = |store: &S| -> u64 {
        buckets
            .iter()
            .map(|b| store.ops(b, 0, u64::MAX, 10_000).expect("ops").len() as u64)
            .sum()
    };
    let counts = store.counts().expect("counts");
    assert_eq!(
        (counts.ops, counts.buckets),
        (ops_kept(store), 3),
        "the counts are the ops a client can read"
    );
    let stats = store.compact().expect("compact");
    assert!(
        stats.moved + stats.cleared > 0,
        "the jumble had something to compact"
    );
    assert!(
        stats.reclaimed_bytes > 0,
        "dropping superseded data reclaims bytes"
    );
    assert_eq!(
        store.counts().expect("counts").ops,
        ops_kept(store),
        "the counts follow compaction"
    );
    let states_after = store
        .bucket_states(&buckets.map(String::from))
        .expect("states");
    for (i, b) in buckets.iter().enumerate() {
        let after = ClientBucket::read(store, b);
        assert_eq!(
            after.rows, before[i].rows,
            "bucket {b}: same rows from the compacted log"
        );
        assert_eq!(
            after.checksum, before[i].checksum,
            "bucket {b}: same checksum"
        );
        assert_eq!(
            states_after[i].map(|s| s.checksum),
            states_before[i].map(|s| s.checksum)
        );
        partial[i].catch_up(store, b);
        assert_eq!(
            partial[i].rows, before[i].rows,
            "bucket {b}: a client mid-way catches up correctly"
        );
        assert_eq!(partial[i].checksum, before[i].checksum);
    }
    assert_eq!(
        store.compact().expect("compact again"),
        crate::CompactStats::default(),
        "compaction is idempotent"
    );
}

pub fn clear_all_starts_over_with_growing_op_ids<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(1),
        vec![out("a", "1", "{}")],
        vec![member("u", 1)],
    )
    .expect("upsert");
    // As the replicator does: the slot is made first, its snapshot completes after.
    w.set_slot_owned("s");
    w.set_position(Lsn(10));
    w.set_snapshot_complete();
    let first = w.commit().expect("commit");
    assert!(first.snapshot_complete);
    // A new slot (after a lost one) makes the stored position meaningless at once, in the same
    // commit, however long the new snapshot takes and whether or not it ever finishes; what
    // was servable stays servable meanwhile (the new snapshot is a re-copy).
    let mut w = store.writer().expect("writer");
    w.set_slot_owned("s");
    let remade = w.commit().expect("commit");
    assert!(remade.snapshot_complete && remade.lsn.is_none());
    assert_eq!(remade.slot_owned.as_deref(), Some("s"));
    let mut w = store.writer().expect("writer");
    w.set_position(Lsn(10));
    w.set_snapshot_complete();
    w.commit().expect("commit");
    let mut w = store.writer().expect("writer");
    w.clear_all().expect("clear");
    let cleared = w.commit().expect("commit");
    assert!(!cleared.snapshot_complete && cleared.lsn.is_none());
    assert_eq!(cleared.slot_owned.as_deref(), Some("s"));
    assert!(store.ops("a", 0, u64::MAX, 10).expect("ops").is_empty());
    assert!(
        store
            .lookup(&key("u"), u64::MAX)
            .expect("lookup")
            .is_empty()
    );
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(1),
        vec![out("a", "1", "{}")],
        vec![],
    )
    .expect("upsert");
    let again = w.commit().expect("commit");
    assert!(store.ops("a", 0, u64::MAX, 10).expect("ops")[0].op_id > first.op_id);
    assert!(again.op_id > first.op_id);
    // Readers learn that the data started over, and from which op.
    assert!(cleared.rebuilt_at > first.op_id && cleared.rebuilt_at > first.rebuilt_at);
    assert_eq!(again.rebuilt_at, cleared.rebuilt_at);
}

/// A snapshot's checkpoint, bucket states and ops agree, whatever commits after it opened.
pub fn snapshots_see_one_checkpoint<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("1"),
        row(1),
        vec![out("a", "1", "{}")],
        vec![],
    )
    .expect("upsert");
    let first = w.commit().expect("commit");
    let snap = store.snapshot().expect("snapshot");
    let mut w = store.writer().expect("writer");
    w.upsert_row(
        "public.t",
        &row_id("2"),
        row(1),
        vec![out("a", "2", "{}")],
        vec![member("u", 1)],
    )
    .expect("upsert");
    let second = w.commit().expect("commit");
    assert!(second.op_id > first.op_id);
    assert_eq!(snap.checkpoint().expect("checkpoint"), first);
    let state = snap.bucket_states(&["a".to_owned()]).expect("states")[0].expect("state");
    assert_eq!(state.count, 1, "the snapshot does not see the later op");
    assert_eq!(state.last_op_id, first.op_id);
    assert_eq!(snap.ops("a", 0, u64::MAX, 10).expect("ops").len(), 1);
    assert!(snap.lookup(&key("u"), u64::MAX).expect("lookup").is_empty());
    assert_eq!(store.checkpoint().expect("checkpoint"), second);
    assert_eq!(store.ops("a", 0, u64::MAX, 10).expect("ops").len(), 2);
}

/// Everything a reader can see of a store, for comparing two: the checkpoint, every bucket's
/// state and ops, the lookups and rows the staged-write workload names, and the changes since
/// `since`.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    checkpoint: crate::StoreCheckpoint,
    buckets: Vec<(String, Option<crate::BucketState>, Vec<Op>)>,
    lookups: Vec<Vec<Vec<serde_json::Value>>>,
    rows: Vec<Option<(Vec<String>, Vec<Value>)>>,
    changed_buckets: std::collections::BTreeSet<String>,
    changed_lookups: usize,
}

impl Seen {
    /// What readers of buckets see: row copies are the writer's own (the replicator's), and a
    /// staged writer's steps change them before its commit.
    pub fn without_rows(self) -> Seen {
        Seen {
            rows: Vec::new(),
            ..self
        }
    }

    pub fn read<R: StoreRead + ?Sized>(r: &R, since: u64) -> Seen {
        let checkpoint = r.checkpoint().expect("checkpoint");
        let names = r.buckets().expect("buckets");
        let states = r.bucket_states(&names).expect("states");
        let buckets = names
            .into_iter()
            .zip(states)
            .map(|(b, st)| {
                let ops = r.ops(&b, 0, checkpoint.op_id, usize::MAX).expect("ops");
                (b, st, ops)
            })
            .collect();
        let lookups = (0..STAGED_USERS)
            .map(|u| {
                let mut l = r
                    .lookup(&key(&format!("u{u}")), checkpoint.op_id)
                    .expect("lookup");
                l.sort_by_key(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>());
                l
            })
            .collect();
        let rows = (0..STAGED_ROWS * 2)
            .flat_map(|i| ["public.t", "public.u"].map(|t| (t, i)))
            .map(|(t, i)| {
                r.row(t, &row_id(i.to_string()))
                    .expect("row")
                    .map(|sr| (sr.columns.to_vec(), sr.values))
            })
            .collect();
        let changes = r.changes(since, checkpoint.op_id).expect("changes");
        Seen {
            checkpoint,
            buckets,
            lookups,
            rows,
            changed_buckets: changes.buckets.into_iter().collect(),
            changed_lookups: changes.lookups.len(),
        }
    }
}

const STAGED_ROWS: i64 = 300;
const STAGED_USERS: i64 = 13;

/// A pseudo-random sequence (xorshift), so that both stores get the same writes.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The rows the staged-write checks start from: `public.t` in buckets by `i % 7`, with a
/// membership lookup for some, and `public.u` with copies of identical rows.
pub fn staged_base<S: BucketStore>(store: &S) -> crate::StoreCheckpoint {
    let mut w = store.writer().expect("writer");
    base_rows(&mut w, STAGED_ROWS, false);
    w.commit().expect("commit")
}

/// Rows `0..n` of `public.t` in buckets by `i % 7` with a membership lookup for every third,
/// and of `public.u`; with `more`, two identical copies of every fourth row of `public.u` and
/// every tenth row in `public.gone` too.
fn base_rows<W: StoreWriter>(w: &mut W, n: i64, more: bool) {
    for i in 0..n {
        let id = i.to_string();
        let lookups = if i % 3 == 0 {
            vec![member(&format!("u{}", i % STAGED_USERS), i % 5)]
        } else {
            vec![]
        };
        w.upsert_row(
            "public.t",
            &row_id(&id),
            row(i),
            vec![out(&format!("b{}", i % 7), &id, &format!("{{\"v\":{i}}}"))],
            lookups,
        )
        .expect("upsert");
        for _ in 0..1 + u8::from(more && i % 4 == 0) {
            w.insert_row(
                "public.u",
                &row_id(&id),
                row(i),
                vec![out("u", &id, "{}")],
                vec![],
            )
            .expect("insert");
        }
        if more && i % 10 == 0 {
            w.upsert_row(
                "public.gone",
                &row_id(&id),
                row(i),
                vec![out("g", &id, "{}")],
                vec![],
            )
            .expect("upsert");
        }
    }
    w.set_position(Lsn(100));
    w.set_snapshot_complete();
}

/// One large transaction of every kind of write: updates that move rows between buckets
/// and change their data, objects handed from one row to another (a key swap), deletes,
/// new rows, lookups added and removed, copies of identical rows added and removed, and a
/// TRUNCATE; `seed` picks them.
pub fn staged_workload<W: StoreWriter>(w: &mut W, seed: u64) {
    let mut d = Dice(seed | 1);
    for n in 0..STAGED_ROWS * 4 {
        let i = d.roll((STAGED_ROWS * 2) as u64) as i64;
        let id = i.to_string();
        match d.roll(6) {
            0 | 1 => {
                let b = d.roll(9);
                let lookups = if d.roll(2) == 0 {
                    vec![member(&format!("u{}", d.roll(STAGED_USERS as u64)), n % 5)]
                } else {
                    vec![]
                };
                w.upsert_row(
                    "public.t",
                    &row_id(&id),
                    row(n),
                    vec![out(&format!("b{b}"), &id, &format!("{{\"v\":{n}}}"))],
                    lookups,
                )
                .expect("upsert");
            }
            2 => w.delete_row("public.t", &row_id(&id)).expect("delete"),
            3 => {
                // Row i takes over the object of row i + 1 in its bucket (as a key swap does),
                // and that row is deleted after.
                let other = (i + 1).to_string();
                w.upsert_row(
                    "public.t",
                    &row_id(&id),
                    row(n),
                    vec![out(&format!("b{}", (i + 1) % 7), &other, "{\"swapped\":1}")],
                    vec![],
                )
                .expect("upsert");
                w.delete_row("public.t", &row_id(&other)).expect("delete");
            }
            4 => w
                .insert_row(
                    "public.u",
                    &row_id(&id),
                    row(i),
                    vec![out("u", &id, "{}")],
                    vec![],
                )
                .expect("insert"),
            _ => w.delete_row("public.u", &row_id(&id)).expect("delete"),
        }
        if n == STAGED_ROWS * 2 {
            w.truncate("public.u").expect("truncate");
        }
    }
    w.set_position(Lsn(200));
}

/// A staged writer with a tiny budget (so it takes many steps), and an ordinary writer given
/// that budget before its first write (so it becomes staged where it stands), leave readers
/// at the last checkpoint until they commit, and then the store holds exactly what an
/// ordinary writer's same writes leave.
pub fn staged_writes_equal_unstaged_ones<S: BucketStore>(plain: &S, staged: &S, converted: &S) {
    let base = staged_base(plain);
    assert_eq!(staged_base(staged), base);
    assert_eq!(staged_base(converted), base);
    let before = Seen::read(staged, base.op_id);
    let mut w = plain.writer().expect("writer");
    staged_workload(&mut w, 7);
    w.commit().expect("commit");
    for store in [staged, converted] {
        let mut w = if std::ptr::eq(store, staged) {
            store.staged_writer(4 << 10).expect("staged writer")
        } else {
            let mut w = store.writer().expect("writer");
            w.set_budget(Some(4 << 10));
            assert!(!w.is_staged());
            w
        };
        staged_workload(&mut w, 7);
        assert!(w.is_staged(), "a writer beyond its budget is staged");
        assert_eq!(
            Seen::read(store, base.op_id).without_rows(),
            before.clone().without_rows(),
            "readers see the last checkpoint while a staged writer writes"
        );
        let done = w.commit().expect("commit");
        assert!(done.op_id > base.op_id);
        assert_eq!(Seen::read(store, base.op_id), Seen::read(plain, base.op_id));
    }
    // And the stores go on as any other: another transaction of each, compared again.
    for store in [plain, staged, converted] {
        let mut w = store.writer().expect("writer");
        staged_workload(&mut w, 11);
        w.commit().expect("commit");
    }
    for store in [staged, converted] {
        assert_eq!(Seen::read(store, base.op_id), Seen::read(plain, base.op_id));
    }
}

/// Rows of the re-copy checks' base ([`base_rows`] with more).
const RECOPY_ROWS: i64 = 400;

/// The tables as a new snapshot finds them: of `public.t` some rows are gone, some changed
/// their data, their bucket or their lookup, most are unchanged, and there are new ones;
/// `public.u` holds none, one or two copies of each row; `public.gone` is not read. With
/// `copy` they are written as a re-copy, else as new rows into an empty store.
fn recopy_tables<W: StoreWriter>(w: &mut W, copy: bool) {
    let mut d = Dice(99);
    let write = |w: &mut W, table: &str, id: &str, v: i64, outputs, lookups| {
        let r = if copy {
            w.copy_row(table, &row_id(id), row(v), outputs, lookups)
        } else {
            w.insert_row(table, &row_id(id), row(v), outputs, lookups)
        };
        r.expect("write");
    };
    for i in 0..RECOPY_ROWS + RECOPY_ROWS / 4 {
        let id = i.to_string();
        let (mut bucket, mut data) = (i % 7, format!("{{\"v\":{i}}}"));
        let mut lookups = if i % 3 == 0 {
            vec![member(&format!("u{}", i % STAGED_USERS), i % 5)]
        } else {
            vec![]
        };
        match (i < RECOPY_ROWS).then(|| d.roll(8)) {
            Some(0) => continue,
            Some(1) => data = format!("{{\"v\":{i},\"changed\":true}}"),
            Some(2) => bucket = (bucket + 1) % 7,
            Some(3) => lookups = vec![member(&format!("u{}", (i + 1) % STAGED_USERS), 9)],
            _ => {}
        }
        let outputs = vec![out(&format!("b{bucket}"), &id, &data)];
        write(w, "public.t", &id, i, outputs, lookups);
        for _ in 0..d.roll(3) {
            write(w, "public.u", &id, i, vec![out("u", &id, "{}")], vec![]);
        }
    }
    if copy {
        w.drop_uncopied().expect("drop uncopied");
    }
    w.set_position(Lsn(300));
    w.set_snapshot_complete();
}

/// A re-copy (a new snapshot of the tables while the store serves the last checkpoint),
/// by a staged writer with a tiny budget and by an ordinary one: readers see the last
/// checkpoint until it commits; then every bucket holds what a store built from the new
/// snapshot alone holds, with checksums that verify; the ops it added are exactly the
/// objects that differ (a PUT for each new or changed one, a REMOVE for each gone), so a
/// client that held the old checkpoint keeps every unchanged op and downloads only those;
/// lookups follow, and identical rows keep their number of copies.
/// A staged re-copy in which every row is the same as its stored copy writes nothing but its
/// marks of what was copied: those count against its budget too, so that it holds no more than
/// about the budget whatever the number of rows (they once grew without bound).
pub fn a_recopy_of_identical_rows_stays_within_its_budget<S: BucketStore>(store: &S) {
    let mut w = store.writer().expect("writer");
    for i in 0..2_000 {
        let id = format!("{i:040}");
        w.upsert_row(
            "public.t",
            &row_id(&id),
            row(i),
            vec![out("b", &id, "{}")],
            vec![],
        )
        .expect("upsert");
    }
    let base = w.commit().expect("commit");
    let budget = 4 << 10;
    let mut w = store.staged_writer(budget).expect("staged writer");
    let mut most = 0;
    for i in 0..2_000 {
        let id = format!("{i:040}");
        w.copy_row(
            "public.t",
            &row_id(&id),
            row(i),
            vec![out("b", &id, "{}")],
            vec![],
        )
        .expect("copy");
        most = most.max(w.held_bytes());
    }
    w.drop_uncopied().expect("drop uncopied");
    let done = w.commit().expect("commit");
    assert!(
        most <= 2 * budget,
        "a re-copy of identical rows held {most} bytes on a budget of {budget}"
    );
    assert_eq!(done.op_id, base.op_id, "nothing changed, no op");
}

pub fn a_recopy_emits_only_what_differs<S: BucketStore>(staged: &S, plain: &S, fresh: &S) {
    let mut w = fresh.writer().expect("writer");
    recopy_tables(&mut w, false);
    w.commit().expect("commit");
    let names = |s: &S| -> std::collections::BTreeSet<String> {
        s.buckets().expect("buckets").into_iter().collect()
    };
    for store in [staged, plain] {
        let mut w = store.writer().expect("writer");
        base_rows(&mut w, RECOPY_ROWS, true);
        let base = w.commit().expect("commit");
        let before: BTreeMap<String, ClientBucket> = names(store)
            .into_iter()
            .map(|b| {
                let c = ClientBucket::read(store, &b);
                (b, c)
            })
            .collect();
        let seen = Seen::read(store, 0).without_rows();
        let mut w = if std::ptr::eq(store, staged) {
            store.staged_writer(4 << 10).expect("staged writer")
        } else {
            store.writer().expect("writer")
        };
        recopy_tables(&mut w, true);
        assert_eq!(
            Seen::read(store, 0).without_rows(),
            seen,
            "readers see the last checkpoint during a re-copy"
        );
        assert_eq!(w.is_staged(), std::ptr::eq(store, staged));
        let done = w.commit().expect("commit");
        let buckets = names(store)
            .union(&names(fresh))
            .cloned()
            .collect::<Vec<_>>();
        let mut expected_ops = 0;
        let mut added_ops = 0;
        let mut unchanged = 0;
        for b in &buckets {
            let want = ClientBucket::read(fresh, b);
            let got = ClientBucket::read(store, b);
            assert_eq!(
                got.rows, want.rows,
                "bucket {b} holds what the new snapshot holds"
            );
            state_matches_replay(store, b);
            let old = before.get(b).cloned().unwrap_or_default();
            expected_ops += want
                .rows
                .iter()
                .filter(|(k, v)| old.rows.get(*k) != Some(*v))
                .count();
            expected_ops += old
                .rows
                .keys()
                .filter(|k| !want.rows.contains_key(*k))
                .count();
            unchanged += want
                .rows
                .iter()
                .filter(|(k, v)| old.rows.get(*k) == Some(*v))
                .count();
            added_ops += store
                .ops(b, base.op_id, done.op_id, usize::MAX)
                .expect("ops")
                .len();
            let mut client = old;
            client.catch_up(store, b);
            assert_eq!(
                client.rows, want.rows,
                "a client of the old checkpoint, caught up"
            );
            let state = store
                .bucket_states(std::slice::from_ref(b))
                .expect("states")[0]
                .unwrap_or_default();
            assert_eq!(client.checksum, state.checksum, "and its checksum verifies");
        }
        assert!(expected_ops > 0 && unchanged > RECOPY_ROWS as usize / 2);
        assert_eq!(
            added_ops, expected_ops,
            "ops only for the objects that differ"
        );
        for u in 0..STAGED_USERS {
            let sorted = |s: &S, at: u64| {
                let mut l = s.lookup(&key(&format!("u{u}")), at).expect("lookup");
                l.sort_by_key(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>());
                l
            };
            assert_eq!(
                sorted(store, done.op_id),
                sorted(fresh, u64::MAX),
                "lookups of u{u}"
            );
        }
        assert!(
            store
                .row("public.gone", &row_id("10"))
                .expect("row")
                .is_none()
        );
    }
    // Identical rows kept their number of copies: one delete of each leaves those that had two.
    for store in [staged, plain, fresh] {
        let mut w = store.writer().expect("writer");
        for i in 0..RECOPY_ROWS + RECOPY_ROWS / 4 {
            w.delete_row("public.u", &row_id(i.to_string()))
                .expect("delete");
        }
        w.commit().expect("commit");
    }
    let want = ClientBucket::read(fresh, "u").rows;
    assert!(!want.is_empty());
    for store in [staged, plain] {
        assert_eq!(
            ClientBucket::read(store, "u").rows,
            want,
            "copies of identical rows"
        );
    }
}
