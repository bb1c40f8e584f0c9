//! The WAL reader: one replication session after another, until stopped or a definite error.
//!
//! Progress tracking. Three positions matter, all end-of-commit LSNs:
//! - `durable`: what the consumer said it made durable (see [`crate::SourceStream::ack`]);
//! - `emitted`: the end of the last transaction handed to the consumer;
//! - the flush position reported to PostgreSQL, chosen by [`AckState`] (the ack rule).
//!
//! A session starts streaming at the reported position. PostgreSQL then re-sends every
//! transaction that committed after it, some of which this process may already have emitted
//! (they were waiting to become durable when the connection broke): a transaction whose commit
//! lies before `emitted` is skipped (invariant: replay is idempotent). A transaction cut off by
//! a broken connection is withdrawn with `Rollback` and arrives again whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use walsync_types::{Lsn, PgTimestamp};

use crate::ack::AckState;
use crate::codec::{self, Frame, Message, StandbyStatus};
use crate::config::SourceConfig;
use crate::error::{Result, SourceError};
use crate::event::{Change, OldRow, SourceEvent, Table};
use crate::preflight::{self, SlotState};
use crate::replication::ReplicationConnection;
use crate::snapshot::{self, Emit};

/// Events per batch handed to the consumer: large enough that the channel costs nothing per
/// row, small enough to keep a batch around a megabyte.
const BATCH_EVENTS: usize = 2048;
/// Bytes of WAL messages per batch, at most about: wide rows (a TOASTed value of a megabyte
/// each) fill a batch by bytes long before by count, so the channel's batches stay within some
/// tens of megabytes whatever the rows.
const BATCH_BYTES: usize = 1 << 20;

pub(crate) type Batch = Result<Vec<SourceEvent>>;

pub(crate) struct Reader {
    pub(crate) config: SourceConfig,
    pub(crate) out: mpsc::Sender<Batch>,
    pub(crate) durable: Arc<AtomicU64>,
    pub(crate) stop: watch::Receiver<bool>,
    /// With `stop`: end the session by dropping the connection (see `SourceStream::abandon`).
    pub(crate) abandon: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) needs_snapshot: bool,
    pub(crate) owns_slot: bool,
    pub(crate) ack: AckState,
    tables: HashMap<u32, Arc<Table>>,
    batch: Vec<SourceEvent>,
    /// The WAL bytes the events of `batch` came from.
    batch_bytes: usize,
    /// The open (non-streamed) transaction, and whether it is being skipped as a replay.
    open: Option<(u32, bool)>,
    /// Protocol 2: changes of streamed transactions not yet committed, by top-level xid, each
    /// with the (sub)transaction that made it.
    streamed: HashMap<u32, Vec<(u32, SourceEvent)>>,
    in_stream: Option<u32>,
    skip_before: Lsn,
    last_received: Lsn,
    /// The last `Idle` position handed over.
    idle_sent: Lsn,
    /// A slot this session is making, until the consumer heard of it.
    new_slot: NewSlot,
    /// Replication bytes received since the last commit handed over.
    bytes_since_commit: u64,
}

/// Where the making of a new slot stands.
enum NewSlot {
    /// None under way, or the consumer was told.
    Reported,
    /// `CREATE_REPLICATION_SLOT` runs in this server process.
    Creating(Option<i32>),
    /// Made; the consumer has not been told.
    Unreported,
}

/// How a session ended without error.
enum End {
    Stopped,
    ConsumerGone,
}

impl Emit for Reader {
    async fn emit(&mut self, event: SourceEvent) -> Result<bool> {
        self.batch.push(event);
        self.flush_batch().await
    }
}

impl Reader {
    pub(crate) fn new(
        config: SourceConfig,
        out: mpsc::Sender<Batch>,
        durable: Arc<AtomicU64>,
        stop: watch::Receiver<bool>,
        resume: crate::Resume,
    ) -> Reader {
        let start = resume.durable.unwrap_or(Lsn::ZERO);
        Reader {
            config,
            out,
            durable,
            stop,
            abandon: Arc::default(),
            needs_snapshot: resume.durable.is_none(),
            owns_slot: resume.owns_slot,
            ack: AckState::new(start),
            tables: HashMap::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            open: None,
            streamed: HashMap::new(),
            in_stream: None,
            skip_before: start,
            last_received: start,
            idle_sent: start,
            new_slot: NewSlot::Reported,
            bytes_since_commit: 0,
        }
    }

    /// Runs sessions until stopped. Transient errors reconnect with backoff; a definite error
    /// goes to the consumer and ends the reader.
    pub(crate) async fn run(mut self) {
        let mut delay = self.config.reconnect_min;
        loop {
            let started = Instant::now();
            match self.session().await {
                Ok(End::Stopped | End::ConsumerGone) => return,
                Err(e) if e.is_transient() => {
                    tracing::warn!(slot = %self.config.slot, error = %e, retry_in = ?delay, "replication interrupted, reconnecting");
                    if self.withdraw_open_transaction().await.is_err() {
                        return;
                    }
                    if started.elapsed() > Duration::from_secs(30) {
                        delay = self.config.reconnect_min;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.changed() => return,
                    }
                    delay = (delay * 2).min(self.config.reconnect_max);
                }
                Err(e) => {
                    tracing::error!(slot = %self.config.slot, error = %e, "replication stopped");
                    let _ = self.out.send(Err(e)).await;
                    return;
                }
            }
        }
    }

    /// After a broken connection: withdraws the cut-off transaction and says the reader
    /// reconnects.
    async fn withdraw_open_transaction(&mut self) -> Result<()> {
        let had_open = matches!(self.open.take(), Some((_, false)));
        // Committed transactions still waiting for room in the channel count as emitted: they
        // are handed over. What follows the last commit belongs to the cut-off transaction.
        let committed = self
            .batch
            .iter()
            .rposition(|e| matches!(e, SourceEvent::Commit { .. }))
            .map_or(0, |i| i + 1);
        self.batch.truncate(committed);
        self.streamed.clear();
        self.in_stream = None;
        // The consumer starts over from what it made durable: tell it again where idle is.
        self.idle_sent = Lsn::ZERO;
        if had_open {
            self.batch.push(SourceEvent::Rollback);
        }
        self.batch.push(SourceEvent::Reconnecting);
        if !self.flush_batch().await? {
            return Err(SourceError::Closed);
        }
        Ok(())
    }

    /// Hands the batch to the consumer; `false` when the consumer is gone or asked to stop
    /// (checked here so that a long snapshot ends promptly too).
    async fn flush_batch(&mut self) -> Result<bool> {
        if *self.stop.borrow() {
            return Ok(false);
        }
        if self.batch.is_empty() {
            return Ok(true);
        }
        let batch = self.take_batch();
        Ok(self.out.send(Ok(batch)).await.is_ok())
    }

    /// While streaming: hands the batch over if the channel has room now, else keeps it for the
    /// stream loop, which sends it as soon as there is room and meanwhile keeps talking to
    /// PostgreSQL (a walsender that hears nothing for `wal_sender_timeout` drops the
    /// connection, and a consumer can be busy far longer: a huge TRUNCATE, a rebuild).
    /// `false` when the consumer is gone or asked to stop.
    fn queue(&mut self) -> bool {
        if *self.stop.borrow() {
            return false;
        }
        if self.batch.is_empty() {
            return true;
        }
        match self.out.try_reserve() {
            Ok(permit) => {
                // Field by field: the permit borrows `out`.
                self.batch_bytes = 0;
                let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_EVENTS));
                permit.send(Ok(batch));
                true
            }
            Err(mpsc::error::TrySendError::Full(())) => true,
            Err(mpsc::error::TrySendError::Closed(())) => false,
        }
    }

    /// The batch to hand over, and an empty one in its place.
    fn take_batch(&mut self) -> Vec<SourceEvent> {
        self.batch_bytes = 0;
        std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_EVENTS))
    }

    /// Whether the batch waits to be handed over before more is read.
    fn batch_full(&self) -> bool {
        self.batch.len() >= BATCH_EVENTS || self.batch_bytes >= BATCH_BYTES
    }

    async fn push(&mut self, event: SourceEvent) -> Result<bool> {
        self.batch.push(event);
        if self.batch_full() {
            return Ok(self.queue());
        }
        Ok(true)
    }

    async fn session(&mut self) -> Result<End> {
        // Until streaming starts, PostgreSQL may keep the session waiting for as long as others
        // like: a new slot waits for every transaction open when it was asked for, the snapshot
        // for a table's lock. A stop ends the wait (a slot not yet consistent is dropped by
        // PostgreSQL with its connection); once streaming, `stream` ends in order.
        let mut stop = self.stop.clone();
        let opened = tokio::select! {
            opened = self.open() => Some(opened),
            _ = stop.wait_for(|s| *s) => None,
        };
        self.give_up_unreported_slot().await;
        let Some(opened) = opened else {
            return Ok(End::Stopped);
        };
        let Some(mut repl) = opened? else {
            return Ok(End::ConsumerGone);
        };
        self.tables.clear();
        let end = self.stream(&mut repl).await?;
        let _ = repl.close().await;
        Ok(end)
    }

    /// A slot this session began to make and the consumer never heard of (a stop, or the
    /// consumer gone): its store would not know the slot as walsync's and the next start would
    /// refuse it, so it is dropped. The server does not notice a closed connection while it
    /// waits for open transactions, and would keep the slot once made: a creation under way is
    /// ended by ending its server process. Best effort, logged.
    async fn give_up_unreported_slot(&mut self) {
        let undo = match std::mem::replace(&mut self.new_slot, NewSlot::Reported) {
            NewSlot::Reported => return,
            other => other,
        };
        let slot = self.config.slot.clone();
        let undone = async {
            let client = self.config.pg.connect().await?;
            if let NewSlot::Creating(Some(pid)) = undo {
                client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await?;
            }
            // A creation that was ended leaves nothing; one that had finished is dropped.
            preflight::drop_slot(&client, &slot).await
        };
        match tokio::time::timeout(Duration::from_secs(10), undone).await {
            Ok(Ok(())) => tracing::info!(slot, "gave up the slot a stop interrupted"),
            Ok(Err(e)) => {
                tracing::warn!(slot, error = %e, "could not give up the slot a stop interrupted");
            }
            Err(_) => tracing::warn!(
                slot,
                "could not give up the slot a stop interrupted in time"
            ),
        }
    }

    /// Checks the database, makes the slot and copies the tables when a snapshot is needed, and
    /// starts streaming; `None` when the consumer went away meanwhile.
    async fn open(&mut self) -> Result<Option<ReplicationConnection>> {
        let mut client = self.config.pg.connect().await?;
        preflight::check_database(&client, &self.config).await?;
        let slot = self.config.slot.clone();
        let state = preflight::slot_state(&client, &slot).await?;
        let mut repl = ReplicationConnection::connect(&self.config.pg).await?;
        let system = repl.identify_system().await?;
        tracing::debug!(system_id = %system.system_id, timeline = system.timeline, "connected for replication");

        if self.needs_snapshot {
            if let SlotState::Present { .. } = state {
                if !self.owns_slot {
                    return Err(SourceError::Preflight(format!(
                        "slot {slot:?} exists but walsync has no data from it and did not create it; \
                         drop it (SELECT pg_drop_replication_slot('{slot}')) or configure another slot name"
                    )));
                }
                preflight::drop_slot(&client, &slot).await?;
            }
            self.new_slot = NewSlot::Creating(repl.backend_pid());
            let created = repl.create_slot(&slot).await;
            self.new_slot = if created.is_ok() {
                NewSlot::Unreported
            } else {
                NewSlot::Reported
            };
            let created = created?;
            self.owns_slot = true;
            tracing::info!(slot, consistent_point = %created.consistent_point, "created replication slot");
            if !self
                .emit(SourceEvent::SlotCreated {
                    slot: slot.clone(),
                    consistent_point: created.consistent_point,
                })
                .await?
            {
                return Ok(None);
            }
            self.new_slot = NewSlot::Reported;
            let publication = self.config.publication.clone();
            let (batch_rows, batch_bytes) = (
                self.config.snapshot_batch_rows,
                self.config.snapshot_batch_bytes,
            );
            if !snapshot::copy(
                &mut client,
                &created.snapshot_name,
                created.consistent_point,
                &publication,
                batch_rows,
                batch_bytes,
                self,
            )
            .await?
            {
                return Ok(None);
            }
            self.needs_snapshot = false;
            self.ack = AckState {
                durable: Lsn::ZERO,
                ..AckState::new(created.consistent_point)
            };
            self.ack.on_emitted(created.consistent_point);
            self.skip_before = created.consistent_point;
        } else {
            match state {
                SlotState::Missing => {
                    return Err(SourceError::SlotLost {
                        slot,
                        reason: "it no longer exists".into(),
                    });
                }
                SlotState::Present {
                    wal_status: Some(s),
                    ..
                } if s == "lost" => {
                    return Err(SourceError::SlotLost {
                        slot,
                        reason: "PostgreSQL removed WAL it still needed (wal_status = lost)".into(),
                    });
                }
                SlotState::Present { .. } => {}
            }
            self.skip_before = self.ack.emitted;
        }
        drop(client);

        self.refresh_durable();
        let start = self.ack.flush_position();
        let options = self.config.plugin_options();
        repl.start_replication(&slot, start, &options).await?;
        tracing::debug!(slot, start = %start, "streaming");
        // Handed over with the first batch the stream loop sends.
        self.batch.push(SourceEvent::Streaming { start });
        Ok(Some(repl))
    }

    fn refresh_durable(&mut self) {
        self.ack
            .on_durable(Lsn(self.durable.load(Ordering::Acquire)));
    }

    async fn stream(&mut self, repl: &mut ReplicationConnection) -> Result<End> {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        let mut last_message = Instant::now();
        // When a status update asked for a reply that has not come yet.
        let mut probed: Option<Instant> = None;
        let mut reported_durable = self.ack.durable;
        // The stream loop's own handle on the channel, so that waiting for room borrows nothing
        // of the reader.
        let out = self.out.clone();
        loop {
            // A full batch waits for the consumer; until it is taken no more frames are read
            // (PostgreSQL waits on the socket), but status updates still go out.
            let backlogged = self.batch_full();
            tokio::select! {
                biased;
                _ = self.stop.changed() => return self.finish(repl).await,
                permit = out.reserve(), if !self.batch.is_empty() => {
                    let Ok(permit) = permit else { return Ok(End::ConsumerGone) };
                    let batch = self.take_batch();
                    permit.send(Ok(batch));
                }
                _ = ticker.tick() => {
                    if backlogged {
                        // Not listening: silence is ours, not the server's.
                        last_message = Instant::now();
                    }
                    // Our status updates reset the walsender's timer, so an idle walsender
                    // never sends a keepalive of its own: ask for one before giving up on a
                    // quiet connection.
                    let half = self.config.receive_timeout / 2;
                    if probed.is_none() && last_message.elapsed() > half {
                        self.send_status(repl, true).await?;
                        probed = Some(Instant::now());
                        last_status = Instant::now();
                    }
                    // Dead: silent for the whole timeout, and the request for a reply unanswered
                    // for half of it (the ticker's granularity must not shorten that).
                    if last_message.elapsed() > self.config.receive_timeout
                        && probed.is_some_and(|at| at.elapsed() >= half)
                    {
                        return Err(SourceError::Timeout(self.config.receive_timeout));
                    }
                    self.refresh_durable();
                    // Tell PostgreSQL promptly when the consumer made progress, so WAL is
                    // released; otherwise at the status interval.
                    if self.ack.durable != reported_durable || last_status.elapsed() >= self.config.status_interval {
                        self.send_status(repl, false).await?;
                        reported_durable = self.ack.durable;
                        last_status = Instant::now();
                    }
                }
                data = repl.next_copy_data(), if !backlogged => {
                    let Some(mut payload) = data? else { return Err(SourceError::Closed) };
                    last_message = Instant::now();
                    probed = None;
                    loop {
                        if !self.on_frame(repl, payload).await? {
                            if *self.stop.borrow() {
                                return self.finish(repl).await;
                            }
                            return Ok(End::ConsumerGone);
                        }
                        if self.batch_full() {
                            break;
                        }
                        match repl.next_buffered_copy_data()? {
                            Some(p) => payload = p,
                            None => break,
                        }
                    }
                }
            }
        }
    }

    /// The orderly end of a session: report the last durable position, then end the copy.
    async fn finish(&mut self, repl: &mut ReplicationConnection) -> Result<End> {
        if self.abandon.load(Ordering::Acquire) {
            return Ok(End::Stopped);
        }
        self.send_status(repl, false).await?;
        repl.stop_streaming().await?;
        Ok(End::Stopped)
    }

    async fn send_status(&mut self, repl: &mut ReplicationConnection, reply: bool) -> Result<()> {
        self.refresh_durable();
        let flushed = self.ack.flush_position();
        self.ack.reported = flushed;
        let status = StandbyStatus {
            written: self.last_received.max(flushed),
            flushed,
            applied: flushed,
            sent_at: PgTimestamp::now(),
            reply_requested: reply,
        };
        repl.send_copy_data(codec::encode_standby_status(&status))
            .await
    }

    /// Handles one frame; `false` when the consumer is gone.
    async fn on_frame(&mut self, repl: &mut ReplicationConnection, payload: Bytes) -> Result<bool> {
        self.batch_bytes += payload.len();
        self.bytes_since_commit += payload.len() as u64;
        match codec::decode_frame(payload)? {
            Frame::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                let in_transaction = self.open.is_some() || self.in_stream.is_some();
                self.ack.on_keepalive(wal_end, in_transaction);
                self.last_received = self.last_received.max(wal_end);
                // The position passes WAL that holds nothing published (a write checkpoint
                // there is passed without waiting for the next published change).
                // (The ack rule needs no report of it: see `AckState::on_keepalive`.)
                if !in_transaction && wal_end > self.ack.emitted.max(self.idle_sent) {
                    self.batch.push(SourceEvent::Idle { wal_end });
                    self.idle_sent = wal_end;
                    if !self.queue() {
                        return Ok(false);
                    }
                }
                if reply_requested {
                    self.send_status(repl, false).await?;
                }
                Ok(true)
            }
            Frame::XLogData { start, data, .. } => {
                self.last_received = self.last_received.max(start);
                let msg = codec::decode_message(start, data, self.in_stream.is_some())?;
                self.on_message(start, msg).await
            }
        }
    }

    fn table(&self, oid: u32, lsn: Lsn) -> Result<Arc<Table>> {
        self.tables.get(&oid).cloned().ok_or_else(|| {
            SourceError::Protocol(format!(
                "change to relation {oid} before its description at lsn {lsn}"
            ))
        })
    }

    fn change(&self, lsn: Lsn, msg: Message) -> Result<Option<Change>> {
        Ok(Some(match msg {
            Message::Insert { relation, new, .. } => {
                let table = self.table(relation, lsn)?;
                let new = table.decode_row(&new, lsn)?;
                Change::Insert { table, new }
            }
            Message::Update {
                relation,
                key,
                old,
                new,
                ..
            } => {
                let table = self.table(relation, lsn)?;
                let old = match (key, old) {
                    (Some(k), _) => Some(OldRow::Key(table.decode_row(&k, lsn)?)),
                    (None, Some(o)) => Some(OldRow::Full(table.decode_row(&o, lsn)?)),
                    (None, None) => None,
                };
                let new = table.decode_row(&new, lsn)?;
                Change::Update { table, old, new }
            }
            Message::Delete {
                relation, key, old, ..
            } => {
                let table = self.table(relation, lsn)?;
                let old = match (key, old) {
                    (Some(k), _) => OldRow::Key(table.decode_row(&k, lsn)?),
                    (None, Some(o)) => OldRow::Full(table.decode_row(&o, lsn)?),
                    (None, None) => {
                        return Err(SourceError::Protocol(format!(
                            "delete without old row at lsn {lsn}"
                        )));
                    }
                };
                Change::Delete { table, old }
            }
            Message::Truncate {
                options, relations, ..
            } => Change::Truncate {
                tables: relations
                    .iter()
                    .map(|&r| self.table(r, lsn))
                    .collect::<Result<_>>()?,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            },
            Message::Message {
                transactional: true,
                prefix,
                content,
                ..
            } => Change::Message { prefix, content },
            _ => return Ok(None),
        }))
    }

    async fn on_message(&mut self, lsn: Lsn, msg: Message) -> Result<bool> {
        match msg {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                let skip = final_lsn < self.skip_before;
                self.open = Some((xid, skip));
                if skip {
                    tracing::debug!(xid, commit_lsn = %final_lsn, "skipping transaction already emitted");
                    return Ok(true);
                }
                self.push(SourceEvent::Begin {
                    xid,
                    commit_lsn: final_lsn,
                    commit_time,
                })
                .await
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let Some((xid, skip)) = self.open.take() else {
                    return Err(SourceError::Protocol(format!(
                        "commit without begin at lsn {lsn}"
                    )));
                };
                if skip {
                    return Ok(true);
                }
                self.emit_commit(xid, commit_lsn, end_lsn, commit_time)
                    .await
            }
            Message::Relation { relation, .. } => {
                let table = Arc::new(Table::from_relation(relation));
                self.tables.insert(table.oid, table.clone());
                self.route(None, SourceEvent::Relation(table)).await
            }
            Message::StreamStart { xid, .. } => {
                self.in_stream = Some(xid);
                Ok(true)
            }
            Message::StreamStop => {
                self.in_stream = None;
                Ok(true)
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let events = self.streamed.remove(&xid).unwrap_or_default();
                if commit_lsn < self.skip_before {
                    return Ok(true);
                }
                let begin = SourceEvent::Begin {
                    xid,
                    commit_lsn,
                    commit_time,
                };
                for event in std::iter::once(begin).chain(events.into_iter().map(|(_, e)| e)) {
                    if !self.push(event).await? {
                        return Ok(false);
                    }
                }
                self.emit_commit(xid, commit_lsn, end_lsn, commit_time)
                    .await
            }
            Message::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    self.streamed.remove(&xid);
                } else if let Some(events) = self.streamed.get_mut(&xid) {
                    events.retain(|(sub, _)| *sub != subxid);
                }
                Ok(true)
            }
            Message::Origin { .. } | Message::Type { .. } => Ok(true),
            Message::Message {
                transactional: false,
                ..
            } => Ok(true),
            change @ (Message::Insert { .. }
            | Message::Update { .. }
            | Message::Delete { .. }
            | Message::Truncate { .. }
            | Message::Message { .. }) => {
                let sub = change_xid(&change);
                if matches!(self.open, Some((_, true))) {
                    return Ok(true);
                }
                match self.change(lsn, change)? {
                    Some(c) => self.route(sub, SourceEvent::Change(c)).await,
                    None => Ok(true),
                }
            }
        }
    }

    /// Hands over the end of a committed transaction: from here its `end_lsn` counts as emitted
    /// for the ack rule and the replay check.
    async fn emit_commit(
        &mut self,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<bool> {
        self.batch.push(SourceEvent::Commit {
            xid,
            commit_lsn,
            end_lsn,
            commit_time,
            bytes: std::mem::take(&mut self.bytes_since_commit),
        });
        self.ack.on_emitted(end_lsn);
        Ok(self.queue())
    }

    /// Sends an event on, or keeps it with its streamed transaction until that commits.
    async fn route(&mut self, sub: Option<u32>, event: SourceEvent) -> Result<bool> {
        match self.in_stream {
            Some(top) => {
                self.streamed
                    .entry(top)
                    .or_default()
                    .push((sub.unwrap_or(top), event));
                Ok(true)
            }
            None if matches!(self.open, Some((_, true))) => Ok(true),
            None => self.push(event).await,
        }
    }
}

fn change_xid(msg: &Message) -> Option<u32> {
    match msg {
        Message::Insert { xid, .. }
        | Message::Update { xid, .. }
        | Message::Delete { xid, .. }
        | Message::Truncate { xid, .. }
        | Message::Message { xid, .. } => *xid,
        _ => None,
    }
}
