//! One connection's state machine: full checkpoint, then diffs, keepalives and expiry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use walsync_protocol::{
    BucketChecksum, BucketReason, Checkpoint, CheckpointComplete, CheckpointDiff, DataPage, Line,
    OpKind, OpLine, PartialCheckpointComplete, SyncRequest,
};
use walsync_rules::{RequestContext, StreamRequest, Subscription};
use walsync_storage::{BucketStore, Op, StoreCheckpoint, StoreRead};
use walsync_types::LookupKey;

use crate::{Buffered, Identity, Item, Resolved, SyncCore, SyncError, request_buckets};

/// Why a connection ends.
enum Stop {
    /// The client went away.
    Closed,
    /// The token expired (the client was told with `token_expires_in: 0`).
    Expired,
    Error(SyncError),
}

impl From<SyncError> for Stop {
    fn from(e: SyncError) -> Stop {
        Stop::Error(e)
    }
}

impl From<walsync_storage::StorageError> for Stop {
    fn from(e: walsync_storage::StorageError) -> Stop {
        Stop::Error(e.into())
    }
}

type Flow<T = ()> = Result<T, Stop>;

/// A bucket the client holds, as of the last checkpoint sent.
#[derive(Debug, Clone)]
struct Held {
    /// The last op id sent (or the client's own `after`).
    after: u64,
    priority: u32,
    /// Why the client holds it (empty for a bucket definition's bucket: no allocation).
    reasons: Vec<BucketReason>,
}

pub(crate) struct Connection<S: BucketStore> {
    core: Arc<SyncCore<S>>,
    identity: Identity,
    /// The client's own id (empty when it named none): write checkpoints are per client.
    client_id: String,
    context: RequestContext,
    /// The streams the client asked for (by default, the default ones).
    wanted: StreamRequest,
    requested: HashMap<String, u64>,
    tx: mpsc::Sender<Item>,
    /// The bytes of the connection's buffer not taken by lines waiting in it.
    room: Arc<Semaphore>,
    /// The buffer's size in bytes (what `room` starts with).
    room_bytes: u32,
    id: u64,
    notify: Arc<Notify>,
    held: BTreeMap<String, Held>,
    lookups: Vec<LookupKey>,
    last_cp: u64,
    /// The store's `rebuilt_at` at this stream's last full checkpoint.
    rebuilt_at: u64,
    sent_write_checkpoint: u64,
    next_keepalive: Instant,
    expires: Option<Instant>,
    /// When to tell the client once more that its token is about to expire (cleared once
    /// told).
    refresh_at: Option<Instant>,
}

/// The largest byte budget a connection's buffer can have (the semaphore counts in `u32`).
const MAX_ROOM: usize = u32::MAX as usize >> 4;

/// About the bytes `line` takes encoded: row data and names, plus a fixed cost per op and per
/// bucket for the numbers and punctuation around them.
fn approx_bytes(line: &Line) -> usize {
    let buckets = |list: &[BucketChecksum]| list.iter().map(|b| b.bucket.len() + 64).sum::<usize>();
    64 + match line {
        Line::Data(page) => {
            page.bucket.len()
                + page
                    .data
                    .iter()
                    .map(|op| {
                        96 + op.data.as_ref().map_or(0, String::len)
                            + op.object_type.as_ref().map_or(0, String::len)
                            + op.object_id.as_ref().map_or(0, String::len)
                    })
                    .sum::<usize>()
        }
        Line::Checkpoint(c) => buckets(&c.buckets),
        Line::CheckpointDiff(d) => {
            buckets(&d.updated_buckets)
                + d.removed_buckets.iter().map(|b| b.len() + 8).sum::<usize>()
        }
        _ => 0,
    }
}

fn op_line(op: Op) -> OpLine {
    let kind = op.kind;
    let with_row = matches!(op.kind, OpKind::Put | OpKind::Remove);
    OpLine {
        op_id: op.op_id,
        op: kind,
        object_type: with_row.then_some(op.object_type),
        object_id: with_row.then_some(op.object_id),
        // The subkey only tells apart copies of one row in one bucket, which walsync never
        // makes (a row is in a bucket once); leaving it out saves a sixth of each line.
        subkey: None,
        data: if kind == OpKind::Put { op.data } else { None },
        checksum: op.checksum,
    }
}

impl<S: BucketStore + 'static> Connection<S> {
    pub(crate) fn new(
        core: Arc<SyncCore<S>>,
        identity: Identity,
        request: SyncRequest,
        tx: mpsc::Sender<Item>,
    ) -> Connection<S> {
        let (id, notify) = core.hub.register(&identity.user_id);
        let context = RequestContext {
            user_id: identity.user_id.clone(),
            claims: identity.claims.clone(),
            parameters: serde_json::Value::Object(request.parameters),
            ..Default::default()
        };
        let expires = identity.expires_at.map(|at| {
            Instant::now()
                + at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
        });
        let refresh_at = expires.map(|at| {
            at.checked_sub(core.config.token_refresh_lead)
                .unwrap_or_else(Instant::now)
        });
        let room_bytes = core.config.buffer_bytes.clamp(1, MAX_ROOM) as u32;
        Connection {
            room: Arc::new(Semaphore::new(room_bytes as usize)),
            room_bytes,
            next_keepalive: Instant::now() + core.config.keepalive,
            core,
            identity,
            client_id: request.client_id.unwrap_or_default(),
            context,
            wanted: match request.streams {
                None => StreamRequest::default(),
                Some(s) => StreamRequest {
                    include_defaults: s.include_defaults.unwrap_or(true),
                    subscriptions: s
                        .subscriptions
                        .into_iter()
                        .map(|sub| Subscription {
                            stream: sub.stream,
                            parameters: sub.parameters,
                            override_priority: sub.override_priority,
                        })
                        .collect(),
                },
            },
            requested: request
                .buckets
                .into_iter()
                .map(|b| (b.name, b.after))
                .collect(),
            tx,
            id,
            notify,
            held: BTreeMap::new(),
            lookups: Vec::new(),
            last_cp: 0,
            rebuilt_at: 0,
            sent_write_checkpoint: 0,
            expires,
            refresh_at,
        }
    }

    pub(crate) async fn run(&mut self) {
        let outcome = self.serve().await;
        self.core.hub.unregister(self.id);
        match outcome {
            Ok(()) | Err(Stop::Closed) | Err(Stop::Expired) => {}
            Err(Stop::Error(e)) => {
                match &e {
                    SyncError::TooSlow(_) => tracing::info!(error = %e, "sync stream closed"),
                    SyncError::ShuttingDown => {}
                    SyncError::Storage(_) => tracing::error!(error = %e, "sync stream failed"),
                }
                let _ = self.tx.try_send(Err(Box::new(e)));
            }
        }
    }

    /// The checkpoints' work is boxed (`Box::pin`): a stream's task is as large as its largest
    /// state, and an idle stream waits in the small one.
    async fn serve(&mut self) -> Flow {
        // Wait for a complete checkpoint (the initial snapshot may still be running).
        loop {
            let snap = self.core.store.snapshot()?;
            let cp = snap.checkpoint()?;
            if self.core.servable(&cp) {
                Box::pin(self.full_checkpoint(&snap, &cp)).await?;
                break;
            }
            drop(snap);
            self.wait().await?;
        }
        loop {
            self.wait().await?;
            let snap = self.core.store.snapshot()?;
            let cp = snap.checkpoint()?;
            if !self.core.servable(&cp) {
                // The buckets are being built for these rules: the client keeps what it has
                // until they are.
                continue;
            }
            if cp.rebuilt_at != self.rebuilt_at {
                // Rebuilt since the last full checkpoint (a lost slot): the change log started
                // over, so the client is sent every bucket's checksum again. Its copies of
                // buckets that changed fail their checksum and are downloaded anew.
                Box::pin(self.full_checkpoint(&snap, &cp)).await?;
                continue;
            }
            if self.last_cp < cp.changes_from {
                // The history since this stream's last checkpoint was pruned (it slept through
                // a compaction): a full checkpoint, whose data starts where each bucket left off.
                Box::pin(self.full_checkpoint(&snap, &cp)).await?;
                continue;
            }
            Box::pin(self.diff(&snap, cp.op_id, cp.lsn.map(|l| l.0))).await?;
        }
    }

    /// Sleeps until the hub wakes this connection, sending keepalives meanwhile; ends the
    /// stream at token expiry or shutdown.
    async fn wait(&mut self) -> Flow {
        loop {
            if self.core.hub.is_shutdown() {
                return Err(Stop::Error(SyncError::ShuttingDown));
            }
            let never = Instant::now() + Duration::from_secs(86_400 * 365);
            let expiry = self.expires.unwrap_or(never);
            let refresh = self.refresh_at.unwrap_or(never);
            tokio::select! {
                _ = self.notify.notified() => return Ok(()),
                _ = tokio::time::sleep_until(self.next_keepalive) => self.token_expires_in().await?,
                _ = tokio::time::sleep_until(refresh) => self.token_expires_in().await?,
                _ = tokio::time::sleep_until(expiry) => {
                    self.send(Line::TokenExpiresIn(0)).await?;
                    return Err(Stop::Expired);
                }
                _ = self.tx.closed() => return Err(Stop::Closed),
            }
        }
    }

    /// Sends `token_expires_in` and schedules the next one (the refresh reminder goes out once:
    /// any line sent after it is due counts).
    async fn token_expires_in(&mut self) -> Flow {
        let now = Instant::now();
        self.next_keepalive = now + self.core.config.keepalive;
        if self.refresh_at.is_some_and(|at| at <= now) {
            self.refresh_at = None;
        }
        let left = self.seconds_left();
        self.send(Line::TokenExpiresIn(left)).await
    }

    /// Whole seconds the token has left, rounded up: `0` is said only at expiry.
    fn seconds_left(&self) -> i64 {
        match self.expires {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                left.as_millis().div_ceil(1000) as i64
            }
            None => i64::MAX,
        }
    }

    /// Puts `line` in the connection's buffer once it has room, in lines and in bytes; a client
    /// that leaves no room for the stall timeout is disconnected.
    async fn send(&self, line: Line) -> Flow {
        let stall = self.core.config.stall_timeout;
        // A line larger than the whole buffer takes all of it: it goes alone.
        let want = approx_bytes(&line).clamp(1, self.room_bytes as usize) as u32;
        let bytes = match self.room.clone().try_acquire_many_owned(want) {
            Ok(p) => p,
            Err(_) => {
                let acquire = self.room.clone().acquire_many_owned(want);
                tokio::select! {
                    r = tokio::time::timeout(stall, acquire) => match r {
                        Ok(Ok(p)) => p,
                        Ok(Err(_)) => return Err(Stop::Closed),
                        Err(_) => return Err(Stop::Error(SyncError::TooSlow(stall))),
                    },
                    _ = self.tx.closed() => return Err(Stop::Closed),
                }
            }
        };
        let item = Ok(Buffered {
            line: Box::new(line),
            _bytes: Some(bytes),
        });
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Stop::Closed),
            Err(mpsc::error::TrySendError::Full(item)) => {
                match tokio::time::timeout(stall, self.tx.send(item)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(Stop::Closed),
                    Err(_) => Err(Stop::Error(SyncError::TooSlow(stall))),
                }
            }
        }
    }

    /// The buckets of this connection at checkpoint `at`, and the lookups they came from.
    fn resolve(&self, snap: &S::Snapshot, at: u64) -> Flow<Resolved> {
        Ok(request_buckets(
            snap,
            &self.core.rules,
            &self.context,
            &self.wanted,
            at,
        )?)
    }

    /// The checksums of held `buckets` (sorted), with their priorities and reasons.
    fn checksums(&self, snap: &S::Snapshot, buckets: &[String]) -> Flow<Vec<BucketChecksum>> {
        let states = snap.bucket_states(buckets)?;
        Ok(buckets
            .iter()
            .zip(states)
            .map(|(b, s)| {
                let s = s.unwrap_or_default();
                let held = self.held.get(b);
                BucketChecksum {
                    bucket: b.clone(),
                    checksum: s.checksum,
                    count: s.count,
                    priority: held.map_or(walsync_protocol::DEFAULT_PRIORITY, |h| h.priority),
                    subscriptions: held.map(|h| h.reasons.clone()).unwrap_or_default(),
                }
            })
            .collect())
    }

    /// The write checkpoint to put on a checkpoint line at source position `lsn`, if any: this
    /// client's largest passed write checkpoint, never above `lsn` (a checkpoint read before
    /// the hub saw a later position must not vouch for writes it does not hold). A full
    /// checkpoint repeats the last one sent; a diff carries it only when it grew.
    fn write_checkpoint(&mut self, lsn: Option<u64>, full: bool) -> Option<u64> {
        let lsn = lsn.filter(|l| *l > 0)?;
        let passed = self
            .core
            .hub
            .satisfied(&self.identity.user_id, &self.client_id)?
            .min(lsn);
        if passed > self.sent_write_checkpoint || (full && passed > 0) {
            self.sent_write_checkpoint = self.sent_write_checkpoint.max(passed);
            return Some(passed);
        }
        None
    }

    fn listen(&self, buckets: Vec<String>, lookups: Vec<LookupKey>, at: u64) {
        let published = self.core.hub.subscribe(self.id, buckets, lookups);
        if published.complete && published.op_id > at {
            self.notify.notify_one();
        }
    }

    async fn full_checkpoint(&mut self, snap: &S::Snapshot, cp: &StoreCheckpoint) -> Flow {
        let (at, lsn) = (cp.op_id, cp.lsn.map(|l| l.0));
        self.rebuilt_at = cp.rebuilt_at;
        let resolved = self.resolve(snap, at)?;
        self.held = resolved
            .buckets
            .iter()
            .map(|(b, p)| {
                // What the client holds: what this stream sent it, else what it asked for.
                let after = match self.held.get(b) {
                    Some(h) => h.after,
                    None => self.requested.get(b).copied().unwrap_or(0),
                };
                (
                    b.clone(),
                    Held {
                        after,
                        priority: p.priority,
                        reasons: p.reasons.clone(),
                    },
                )
            })
            .collect();
        let names: Vec<String> = self.held.keys().cloned().collect();
        let checksums = self.checksums(snap, &names)?;
        let lookups = resolved.lookups;
        self.lookups = lookups.clone();
        // Listen before sending data: changes during a long download are not missed.
        self.listen(names.clone(), lookups, at);
        let write_checkpoint = self.write_checkpoint(lsn, true);
        self.send(Line::Checkpoint(Checkpoint {
            last_op_id: at,
            write_checkpoint,
            buckets: checksums,
            streams: resolved.streams,
        }))
        .await?;
        self.send_data(snap, names, at).await?;
        self.last_cp = at;
        Ok(())
    }

    async fn diff(&mut self, snap: &S::Snapshot, at: u64, lsn: Option<u64>) -> Flow {
        let changes = if at > self.last_cp {
            snap.changes(self.last_cp, at)?
        } else {
            Default::default()
        };
        let mut updated: BTreeSet<String> = changes
            .buckets
            .iter()
            .filter(|b| self.held.contains_key(*b))
            .cloned()
            .collect();
        let mut removed: Vec<String> = Vec::new();
        let mut relisten = false;
        if self.lookups.iter().any(|l| changes.lookups.contains(l)) {
            let now = self.resolve(snap, at)?;
            for (b, p) in &now.buckets {
                match self.held.get_mut(b) {
                    Some(h) => {
                        // Still held; it may be held for other reasons now.
                        if h.reasons != p.reasons || h.priority != p.priority {
                            h.reasons = p.reasons.clone();
                            h.priority = p.priority;
                            updated.insert(b.clone());
                        }
                    }
                    None => {
                        updated.insert(b.clone());
                        self.held.insert(
                            b.clone(),
                            Held {
                                after: 0,
                                priority: p.priority,
                                reasons: p.reasons.clone(),
                            },
                        );
                    }
                }
            }
            removed = self
                .held
                .keys()
                .filter(|b| !now.buckets.contains_key(*b))
                .cloned()
                .collect();
            for b in &removed {
                self.held.remove(b);
                updated.remove(b);
            }
            self.lookups = now.lookups;
            relisten = true;
        }
        let write_checkpoint = self.write_checkpoint(lsn, false);
        if relisten {
            self.listen(
                self.held.keys().cloned().collect(),
                self.lookups.clone(),
                at,
            );
        }
        if updated.is_empty() && removed.is_empty() && write_checkpoint.is_none() {
            self.last_cp = self.last_cp.max(at);
            return Ok(());
        }
        let names: Vec<String> = updated.into_iter().collect();
        let checksums = self.checksums(snap, &names)?;
        self.send(Line::CheckpointDiff(CheckpointDiff {
            last_op_id: at,
            write_checkpoint,
            updated_buckets: checksums,
            removed_buckets: removed,
        }))
        .await?;
        self.send_data(snap, names, at).await?;
        self.last_cp = self.last_cp.max(at);
        Ok(())
    }

    /// Data of `buckets` up to `at`, by priority, then the completion lines.
    async fn send_data(&mut self, snap: &S::Snapshot, buckets: Vec<String>, at: u64) -> Flow {
        let mut by_priority: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for b in buckets {
            let p = self
                .held
                .get(&b)
                .map_or(walsync_protocol::DEFAULT_PRIORITY, |h| h.priority);
            by_priority.entry(p).or_default().push(b);
        }
        let levels = by_priority.len();
        for (i, (priority, names)) in by_priority.into_iter().enumerate() {
            for bucket in names {
                self.send_bucket(snap, &bucket, at).await?;
            }
            if i + 1 < levels {
                self.send(Line::PartialCheckpointComplete(PartialCheckpointComplete {
                    last_op_id: at,
                    priority,
                }))
                .await?;
            }
        }
        self.send(Line::CheckpointComplete(CheckpointComplete {
            last_op_id: at,
        }))
        .await
    }

    async fn send_bucket(&mut self, snap: &S::Snapshot, bucket: &str, at: u64) -> Flow {
        let page = self.core.config.page_ops.max(1);
        let mut after = self.held.get(bucket).map_or(0, |h| h.after);
        loop {
            let mut ops = snap.ops(bucket, after, at, page + 1)?;
            let mut has_more = ops.len() > page;
            ops.truncate(page);
            // Cut the page where its row data passes the line limit (one op always fits).
            let mut bytes = 0usize;
            if let Some(cut) = ops.iter().position(|op| {
                bytes += op.data.as_ref().map_or(0, String::len) + 64;
                bytes > self.core.config.max_line_bytes
            }) {
                let cut = cut.max(1);
                if cut < ops.len() {
                    ops.truncate(cut);
                    has_more = true;
                }
            }
            let Some(last) = ops.last() else {
                break;
            };
            let next_after = last.op_id;
            self.send(Line::Data(DataPage {
                bucket: bucket.to_owned(),
                data: ops.into_iter().map(op_line).collect(),
                has_more,
                after,
                next_after,
            }))
            .await?;
            after = next_after;
            if let Some(h) = self.held.get_mut(bucket) {
                h.after = after;
            }
            if !has_more {
                break;
            }
        }
        Ok(())
    }
}
