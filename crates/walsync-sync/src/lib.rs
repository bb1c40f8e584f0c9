//! The sync core, free of any transport: what a connection is sent, and when.
//!
//! For one connection ([`SyncCore::open`]): resolve the token's buckets at the current
//! checkpoint from the parameter index; send `checkpoint` with each bucket's checksum, count
//! and priority; send `data` pages of every bucket after the client's `after` (never an op at or
//! below it); `partial_checkpoint_complete` after each priority level when levels differ;
//! `checkpoint_complete`. Then wait for a checkpoint that concerns the connection and send
//! `checkpoint_diff` with only its changed, added and removed buckets, their data, and
//! `checkpoint_complete` again. `token_expires_in` goes out as keepalive every
//! [`SyncConfig::keepalive`], once [`SyncConfig::token_refresh_lead`] before the token expires (so that the client has new credentials before the stream ends), and at the
//! token's expiry, which ends the stream.
//!
//! **Write checkpoints only where asked.** A checkpoint line carries `write_checkpoint` only
//! for a client (user and `client_id`) that asked for one, and only a value at or below the
//! line's own source position: the client's writes before that position are in the
//! checkpoint. A full checkpoint repeats the last one; a diff carries it only when it grew.
//!
//! **One snapshot per checkpoint.** A checkpoint line, the states it lists and the data sent
//! for it are read from one store snapshot, so checksums always match the data.
//!
//! **Who wakes.** A hub learns of new checkpoints ([`SyncCore::notify_checkpoint`]), reads
//! which buckets and parameter lookups the commits changed (the store's change log, read once
//! per checkpoint, not per connection), and wakes only the connections that hold one of those
//! buckets, depend on one of those lookups, or wait for a write checkpoint replication has now
//! passed. An idle connection costs nothing per checkpoint.
//!
//! **Back-pressure.** Each connection has a buffer bounded in lines
//! ([`SyncConfig::buffer_lines`]) and in bytes ([`SyncConfig::buffer_bytes`]: a line larger than
//! that goes alone). A stalled client pins at most that buffer and the one line its transport is
//! writing, however much changes meanwhile; one that does not read for
//! [`SyncConfig::stall_timeout`] is disconnected (it resumes later with `after`), so a slow
//! client never holds up the others or grows memory.

mod hub;
mod presence;
mod resolve;
mod stream;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use walsync_protocol::{Line, SyncRequest};
use walsync_rules::SyncRules;
use walsync_storage::{BucketStore, StorageError};

pub use hub::HubStats;
pub use presence::{
    PresenceConfig, PresenceError, PresenceEvent, PresenceStats, PresenceWatch, TooFarBehind,
};
pub use resolve::{Placement, Resolved, request_buckets};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the client did not read its stream for {0:?} and was disconnected")]
    TooSlow(Duration),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Tunables of the sync core.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Ops per `data` line, at most.
    pub page_ops: usize,
    /// Bytes of row data per `data` line, at most (one op always fits).
    pub max_line_bytes: usize,
    /// Lines buffered per connection before the stream waits for the client.
    pub buffer_lines: usize,
    /// Bytes of lines (about their encoded size) buffered per connection before the stream
    /// waits for the client; a larger line is buffered alone.
    pub buffer_bytes: usize,
    /// Interval of `token_expires_in` keepalives.
    pub keepalive: Duration,
    /// How long before the token expires a stream says so once more, so that the client fetches
    /// new credentials and reconnects before the stream ends (PowerSync's clients prefetch
    /// credentials when `token_expires_in` reaches 30 seconds).
    pub token_refresh_lead: Duration,
    /// A connection whose buffer stays full this long is closed.
    pub stall_timeout: Duration,
    /// How often the hub looks for a new checkpoint when nobody tells it (and silent presence
    /// members are swept).
    pub poll_interval: Duration,
    pub presence: PresenceConfig,
}

impl Default for SyncConfig {
    fn default() -> SyncConfig {
        SyncConfig {
            page_ops: 1_000,
            max_line_bytes: 4 << 20,
            buffer_lines: 8,
            // Two or three full data pages of typical rows: enough to keep a socket busy, small
            // enough that 10,000 stalled clients pin no more than a few GiB in the worst case.
            buffer_bytes: 256 << 10,
            keepalive: Duration::from_secs(20),
            token_refresh_lead: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            presence: PresenceConfig::default(),
        }
    }
}

/// An authenticated client: who it is, what its token says, when the token expires.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: String,
    /// All claims of the token (for `request.jwt()`).
    pub claims: serde_json::Value,
    pub expires_at: Option<SystemTime>,
}

/// A line in a connection's buffer, holding its share of the buffer's bytes until the transport
/// takes it. The line and an error are boxed: a channel allocates its first block of 32 slots
/// when it is made, so every idle stream pays for 32 slots of this size (24 bytes rather than
/// the 96 of a `Line` beside its permit).
pub(crate) struct Buffered {
    pub(crate) line: Box<Line>,
    pub(crate) _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a connection's channel carries.
pub(crate) type Item = Result<Buffered, Box<SyncError>>;

/// A connection's lines, in order; an error ends the stream. Taking a line gives its bytes back
/// to the connection's buffer.
pub struct Lines {
    rx: mpsc::Receiver<Item>,
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines").finish_non_exhaustive()
    }
}

impl Lines {
    /// The next line; `None` once the stream ended.
    pub async fn recv(&mut self) -> Option<Result<Line, SyncError>> {
        Some(match self.rx.recv().await? {
            Ok(b) => Ok(*b.line),
            Err(e) => Err(*e),
        })
    }
}

impl futures_util::Stream for Lines {
    type Item = Result<Line, SyncError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|item| {
            item.map(|r| match r {
                Ok(b) => Ok(*b.line),
                Err(e) => Err(*e),
            })
        })
    }
}

/// The sync core shared by every transport.
pub struct SyncCore<S: BucketStore> {
    pub(crate) store: Arc<S>,
    pub(crate) rules: Arc<SyncRules>,
    pub(crate) config: SyncConfig,
    pub(crate) hub: hub::Hub,
    pub(crate) presence: presence::Presence,
    /// Where this process tells the others serving the same store what they must know.
    peers: std::sync::OnceLock<PeerSend>,
}

/// What a process tells the others that serve the same store (the API nodes of a store in
/// PostgreSQL): a client may ask one node for a write checkpoint and stream from another,
/// whose checkpoint lines must then carry it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PeerMessage {
    WriteCheckpoint {
        user: String,
        client: String,
        lsn: u64,
    },
    /// A member of a room on the sender joined it or changed its state.
    PresencePut {
        room: String,
        user: String,
        client: String,
        state: serde_json::Value,
    },
    /// A member of a room on the sender left it (`reason` as in its `leave` event).
    PresenceLeave {
        room: String,
        user: String,
        client: String,
        reason: String,
    },
    /// A member's ephemeral message to a room.
    PresenceMessage {
        room: String,
        user: String,
        client: String,
        data: serde_json::Value,
    },
    /// A member on the sender is still there (its heartbeat): it stays in its rooms on the
    /// other processes for another timeout.
    PresenceAlive { user: String, client: String },
    /// The sender (a node that just started, or listens again) asks for every member of the
    /// others' rooms: each answers with a `PresencePut` per member and room.
    PresenceHello,
}

/// Sends a [`PeerMessage`] to the other processes (it must not block).
pub type PeerSend = Arc<dyn Fn(PeerMessage) + Send + Sync>;

impl<S: BucketStore> std::fmt::Debug for SyncCore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncCore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: BucketStore + 'static> SyncCore<S> {
    /// A core over `store`; call [`SyncCore::run`] to follow new checkpoints.
    pub fn new(store: Arc<S>, rules: Arc<SyncRules>, config: SyncConfig) -> Arc<SyncCore<S>> {
        Arc::new(SyncCore {
            store,
            rules,
            config,
            hub: hub::Hub::default(),
            presence: presence::Presence::default(),
            peers: std::sync::OnceLock::new(),
        })
    }

    /// Tells the other processes serving the store what they must know, through `send`
    /// (set once; a process alone needs none).
    pub fn set_peers(&self, send: PeerSend) {
        let _ = self.peers.set(send);
    }

    /// A message from another process serving the store.
    pub fn from_peer(&self, message: PeerMessage) {
        match message {
            PeerMessage::WriteCheckpoint { user, client, lsn } => {
                self.hub.register_write_checkpoint(&user, &client, lsn);
                self.hub.poke();
            }
            presence => self.presence_from_peer(presence),
        }
    }

    /// Asks the other processes for the members of their rooms (call when this process begins
    /// to hear them: it missed what they said before).
    pub fn presence_hello(&self) {
        self.tell_peers(PeerMessage::PresenceHello);
    }

    /// Tells the other processes serving the store (none: nothing to do).
    pub(crate) fn tell_peers(&self, message: PeerMessage) {
        if let Some(peers) = self.peers.get() {
            peers(message);
        }
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn config(&self) -> &SyncConfig {
        &self.config
    }

    /// Whether clients may be served `cp`: the initial snapshot is complete, and the buckets
    /// follow these rules (while the replicator re-copies the tables for changed rules,
    /// clients keep what they hold, and hear of the difference when it commits). A store that
    /// names no rules (an earlier version's) is taken as following these.
    pub fn servable(&self, cp: &walsync_storage::StoreCheckpoint) -> bool {
        cp.snapshot_complete
            && cp
                .rules
                .as_deref()
                .is_none_or(|r| r == self.rules.fingerprint())
    }

    /// Opens a stream for `identity`. The lines arrive on the returned receiver; dropping it
    /// ends the connection.
    pub fn open(self: &Arc<Self>, identity: Identity, request: SyncRequest) -> Lines {
        let (tx, rx) = mpsc::channel(self.config.buffer_lines.max(1));
        let core = self.clone();
        let span = tracing::info_span!("walsync-stream", user = %identity.user_id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut conn = stream::Connection::new(core, identity, request, tx);
                conn.run().await;
            },
            span,
        ));
        Lines { rx }
    }

    /// Whether the hub serves a complete checkpoint of the store (the initial snapshot is done).
    pub fn serves(&self) -> bool {
        self.hub.published().complete
    }

    /// Tells the hub that the store may have a new checkpoint (the replicator calls this after
    /// each commit). Cheap; wakes the hub task only.
    pub fn notify_checkpoint(&self) {
        self.hub.poke();
    }

    /// Records that `user_id`'s client `client_id` (empty when it named none) asked for a write
    /// checkpoint at source position `lsn` (a position the database reached after the client's
    /// writes). Returns the write checkpoint to give the client: a later checkpoint line of that
    /// client's streams carries `write_checkpoint` ≥ it once the store's position has passed it.
    pub fn register_write_checkpoint(&self, user_id: &str, client_id: &str, lsn: u64) -> u64 {
        self.hub.register_write_checkpoint(user_id, client_id, lsn);
        self.hub.poke();
        if let Some(peers) = self.peers.get() {
            peers(PeerMessage::WriteCheckpoint {
                user: user_id.to_owned(),
                client: client_id.to_owned(),
                lsn,
            });
        }
        lsn
    }

    /// Connection counts and hub work, for metrics.
    pub fn stats(&self) -> HubStats {
        self.hub.stats()
    }

    /// Follows the store's checkpoints until `stop` is dropped or set, waking the connections
    /// each one concerns. Returns on a storage error (logged) or stop.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                break;
            }
            if let Err(e) = self.hub.publish(&*self.store, |cp| self.servable(cp)) {
                tracing::error!(error = %e, "sync hub could not read the store");
            }
            self.presence_sweep();
            tokio::select! {
                _ = self.hub.poked() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                r = stop.changed() => if r.is_err() { break },
            }
        }
        self.hub.shutdown();
        self.presence_shutdown();
    }
}
