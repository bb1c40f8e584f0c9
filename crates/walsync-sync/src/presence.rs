//! Presence: who else is working in a room, live. A room is a bucket the user's token resolves
//! to (for the seed app, a project's bucket), so presence follows the same membership as the
//! data. Members join with a small JSON state, update it and leave; the room's watchers see
//! the full list when they start, then every join, update and leave, and the room's ephemeral
//! messages. Nothing is stored: presence lives in this process's memory.
//!
//! A member is a client of a user, `(user_id, client_id)`. One silent for
//! [`PresenceConfig::timeout`] (no update, message or heartbeat) leaves, so a client that
//! disappears without a word is gone after the timeout; a transport that knows its client is
//! gone (a closed gRPC stream) says so at once ([`SyncCore::presence_disconnect`]).
//!
//! **Membership.** Joining and watching are authorized against the buckets the token resolves
//! to at the published checkpoint. Each client with rooms and each watcher registers with the
//! hub under the parameter lookups its rooms came from, so a checkpoint that changes one (a
//! `project_members` row deleted) wakes it to check again: a member who lost the room leaves
//! it, and a watcher's stream ends with a `closed` event.
//!
//! **Fan-out.** Each event is encoded once and shared by every watcher of the room through a
//! bounded broadcast channel; a watcher that falls a whole channel behind is ended (it would
//! otherwise pin memory for a client that does not read), like a sync stream that stalls.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, broadcast};
use walsync_rules::RequestContext;
use walsync_storage::{BucketStore, StorageError};
use walsync_types::LookupKey;

use crate::{Identity, PeerMessage, SyncCore, request_buckets};

/// Limits of presence.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// A member silent this long (no update, message or heartbeat) leaves.
    pub timeout: Duration,
    /// Bytes of a member's state (as JSON), at most.
    pub max_state_bytes: usize,
    /// Bytes of a message's data (as JSON), at most.
    pub max_message_bytes: usize,
    /// Rooms a client may be a member of at once.
    pub max_rooms: usize,
    /// Joins, updates and messages per client and second, on average (bursts of twice that).
    pub rate_per_second: u32,
    /// Events a room keeps for a watcher that has not read them yet; one further behind is
    /// ended.
    pub watcher_backlog: usize,
}

impl Default for PresenceConfig {
    fn default() -> PresenceConfig {
        PresenceConfig {
            timeout: Duration::from_secs(30),
            max_state_bytes: 2 << 10,
            max_message_bytes: 8 << 10,
            max_rooms: 16,
            rate_per_second: 20,
            watcher_backlog: 256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("no such room: {0:?} (a room is a bucket of the sync rules, such as user_projects[1])")]
    UnknownRoom(String),
    #[error("the token does not give access to room {0:?}")]
    Forbidden(String),
    #[error("not a member of room {0:?}: join it first")]
    NotJoined(String),
    #[error("{what} is {size} bytes as JSON; at most {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("a client may be in at most {0} rooms at once")]
    TooManyRooms(usize),
    #[error("more than {0} joins, updates and messages a second")]
    RateLimited(u32),
    #[error("{0}")]
    Invalid(String),
    #[error("nothing is replicated yet: rooms cannot be checked")]
    NotReady,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A client of a user.
type ClientKey = (String, String);

/// One event for a room's watchers, encoded once.
#[derive(Debug, Clone)]
pub struct PresenceEvent {
    /// `members`, `join`, `update`, `leave`, `message` or `closed`.
    pub kind: &'static str,
    pub room: Arc<str>,
    /// The whole event as one JSON object (docs/protocol.md).
    pub json: Arc<str>,
}

#[derive(Serialize)]
struct MemberJson<'a> {
    user_id: &'a str,
    client_id: &'a str,
    state: &'a Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum EventJson<'a> {
    Members {
        room: &'a str,
        members: Vec<MemberJson<'a>>,
    },
    Join {
        room: &'a str,
        member: MemberJson<'a>,
    },
    Update {
        room: &'a str,
        member: MemberJson<'a>,
    },
    Leave {
        room: &'a str,
        user_id: &'a str,
        client_id: &'a str,
        reason: &'a str,
    },
    Message {
        room: &'a str,
        user_id: &'a str,
        client_id: &'a str,
        data: &'a Value,
    },
    Closed {
        room: &'a str,
        code: &'a str,
        message: &'a str,
    },
}

impl EventJson<'_> {
    fn encode(&self) -> PresenceEvent {
        let (kind, room) = match self {
            EventJson::Members { room, .. } => ("members", room),
            EventJson::Join { room, .. } => ("join", room),
            EventJson::Update { room, .. } => ("update", room),
            EventJson::Leave { room, .. } => ("leave", room),
            EventJson::Message { room, .. } => ("message", room),
            EventJson::Closed { room, .. } => ("closed", room),
        };
        // Plain strings and JSON values: encoding cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        PresenceEvent {
            kind,
            room: Arc::from(*room),
            json: json.into(),
        }
    }
}

/// Why a member left a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Left,
    Timeout,
    Disconnected,
    Membership,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Left => "left",
            Reason::Timeout => "timeout",
            Reason::Disconnected => "disconnected",
            Reason::Membership => "membership",
        }
    }
}

struct Room {
    /// Members by client, with their state.
    members: BTreeMap<ClientKey, Value>,
    events: broadcast::Sender<PresenceEvent>,
}

struct Client {
    identity: Identity,
    /// Rooms joined, with the lookups each was granted under.
    rooms: BTreeMap<String, Vec<LookupKey>>,
    last_seen: Instant,
    /// Tokens of the rate limit, and when they were last refilled.
    tokens: f64,
    refilled: Instant,
    /// The client's registration with the hub (membership checks).
    hub_id: u64,
    notify: Arc<Notify>,
    checker: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Registry {
    rooms: HashMap<String, Room>,
    clients: HashMap<ClientKey, Client>,
    /// Members of rooms on other processes serving the same store, as they told us: their
    /// rooms here, and when they last spoke (they leave here after the timeout, as they would
    /// there, should their process die).
    remote: HashMap<ClientKey, Remote>,
}

struct Remote {
    rooms: BTreeSet<String>,
    last_seen: Instant,
}

/// The rooms of this process.
#[derive(Default)]
pub(crate) struct Presence {
    registry: Mutex<Registry>,
    /// When silent members were last looked for (the hub's loop turns at every checkpoint).
    swept: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").finish_non_exhaustive()
    }
}

impl Presence {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts of presence, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceStats {
    pub rooms: usize,
    pub members: usize,
}

impl Registry {
    fn publish(&mut self, room: &str, event: &EventJson<'_>) {
        if let Some(r) = self.rooms.get(room) {
            // No watcher is not an error.
            let _ = r.events.send(event.encode());
        }
    }

    /// Removes `key` from `room`, telling the room why; drops the room when nobody is left in
    /// it or watching it.
    fn remove_member(&mut self, room: &str, key: &ClientKey, reason: Reason) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.members.remove(key).is_none() {
            return;
        }
        self.publish(
            room,
            &EventJson::Leave {
                room,
                user_id: &key.0,
                client_id: &key.1,
                reason: reason.as_str(),
            },
        );
        self.drop_if_empty(room);
    }

    fn drop_if_empty(&mut self, room: &str) {
        if self
            .rooms
            .get(room)
            .is_some_and(|r| r.members.is_empty() && r.events.receiver_count() == 0)
        {
            self.rooms.remove(room);
        }
    }

    fn room(&mut self, room: &str, backlog: usize) -> &mut Room {
        self.rooms.entry(room.to_owned()).or_insert_with(|| Room {
            members: BTreeMap::new(),
            events: broadcast::channel(backlog.max(1)).0,
        })
    }
}

/// A watch of one room: the members when it began, then the room's events, until the watcher's
/// membership ends (a last `closed` event) or it falls too far behind (an error).
pub struct PresenceWatch<S: BucketStore + 'static> {
    core: Arc<SyncCore<S>>,
    identity: Identity,
    room: String,
    first: Option<PresenceEvent>,
    events: broadcast::Receiver<PresenceEvent>,
    hub_id: u64,
    notify: Arc<Notify>,
    closed: bool,
}

impl<S: BucketStore + 'static> std::fmt::Debug for PresenceWatch<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceWatch")
            .field("room", &self.room)
            .finish_non_exhaustive()
    }
}

/// A watcher that fell a whole backlog behind.
#[derive(Debug, thiserror::Error)]
#[error("the watcher fell {0} events behind its room and was ended")]
pub struct TooFarBehind(pub u64);

impl<S: BucketStore + 'static> PresenceWatch<S> {
    pub fn room(&self) -> &str {
        &self.room
    }

    /// The next event; `None` once the watch ended (after its `closed` event).
    pub async fn next(&mut self) -> Option<Result<PresenceEvent, TooFarBehind>> {
        if let Some(first) = self.first.take() {
            return Some(Ok(first));
        }
        if self.closed {
            return None;
        }
        loop {
            tokio::select! {
                biased;
                event = self.events.recv() => {
                    return match event {
                        Ok(e) => Some(Ok(e)),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            self.closed = true;
                            Some(Err(TooFarBehind(n)))
                        }
                        // The room is never dropped while watched; a shutdown ends it.
                        Err(broadcast::error::RecvError::Closed) => None,
                    };
                }
                () = self.notify.notified() => {
                    if self.core.hub.is_shutdown() {
                        self.closed = true;
                        return None;
                    }
                    match self.core.room_lookups(&self.identity, &self.room) {
                        Ok((lookups, at)) => {
                            self.core.listen(self.hub_id, &self.notify, lookups, at);
                        }
                        Err(PresenceError::Forbidden(_)) => {
                            self.closed = true;
                            return Some(Ok(EventJson::Closed {
                                room: &self.room,
                                code: "forbidden",
                                message: "the token no longer gives access to this room",
                            }
                            .encode()));
                        }
                        // Checked again at the next checkpoint.
                        Err(e) => tracing::warn!(error = %e, "could not check a presence watcher's room"),
                    }
                }
            }
        }
    }
}

impl<S: BucketStore + 'static> Drop for PresenceWatch<S> {
    fn drop(&mut self) {
        self.core.hub.unregister(self.hub_id);
        let room = std::mem::take(&mut self.room);
        // The receiver goes first, so that an empty room sees no watcher left.
        let (_, replacement) = broadcast::channel(1);
        drop(std::mem::replace(&mut self.events, replacement));
        self.core.presence.lock().drop_if_empty(&room);
    }
}

/// `v` as JSON within `limit` bytes, or why not.
fn within(what: &'static str, v: &Value, limit: usize) -> Result<(), PresenceError> {
    let size = serde_json::to_string(v).map_or(usize::MAX, |s| s.len());
    if size > limit {
        return Err(PresenceError::TooLarge { what, size, limit });
    }
    Ok(())
}

impl Client {
    /// The lookups of every room the client is in: what its membership hangs on.
    fn lookups(&self) -> Vec<LookupKey> {
        self.rooms.values().flatten().cloned().collect()
    }
}

impl Registry {
    /// Sets `key`'s state in `room` and tells the room (a join or an update).
    fn put_member(&mut self, room: &str, key: &ClientKey, state: Value, backlog: usize) {
        let r = self.room(room, backlog);
        let joined = r.members.insert(key.clone(), state).is_none();
        let member = MemberJson {
            user_id: &key.0,
            client_id: &key.1,
            state: &r.members[key],
        };
        let event = if joined {
            EventJson::Join { room, member }
        } else {
            EventJson::Update { room, member }
        };
        let _ = r.events.send(event.encode());
    }
}

impl<S: BucketStore + 'static> SyncCore<S> {
    fn context(identity: &Identity) -> RequestContext {
        RequestContext {
            user_id: identity.user_id.clone(),
            claims: identity.claims.clone(),
            parameters: Value::Object(serde_json::Map::new()),
            ..Default::default()
        }
    }

    /// The lookups `identity` holds `room` under at the published checkpoint (and that
    /// checkpoint's op id), or why it may not enter it.
    fn room_lookups(
        &self,
        identity: &Identity,
        room: &str,
    ) -> Result<(Vec<LookupKey>, u64), PresenceError> {
        if self.rules.definition_of(room).is_none() {
            return Err(PresenceError::UnknownRoom(room.to_owned()));
        }
        let published = self.hub.published();
        if !published.complete {
            return Err(PresenceError::NotReady);
        }
        let snap = self.store.snapshot()?;
        // Rooms are the buckets a user holds without subscribing.
        let resolved = request_buckets(
            &snap,
            &self.rules,
            &Self::context(identity),
            &walsync_rules::StreamRequest::default(),
            published.op_id,
        )?;
        if !resolved.buckets.contains_key(room) {
            return Err(PresenceError::Forbidden(room.to_owned()));
        }
        Ok((resolved.lookups, published.op_id))
    }

    /// Listens under `lookups` for hub registration `id`; a checkpoint published since `at`
    /// (which the registration may have missed) wakes it at once.
    fn listen(&self, id: u64, notify: &Notify, lookups: Vec<LookupKey>, at: u64) {
        if self.hub.subscribe(id, Vec::new(), lookups).op_id > at {
            notify.notify_one();
        }
    }

    /// Takes one token of `client`'s rate limit.
    fn spend(&self, client: &mut Client) -> Result<(), PresenceError> {
        let rate = f64::from(self.config.presence.rate_per_second.max(1));
        let now = Instant::now();
        let refill = now.duration_since(client.refilled).as_secs_f64() * rate;
        client.tokens = (client.tokens + refill).min(2.0 * rate);
        client.refilled = now;
        if client.tokens < 1.0 {
            return Err(PresenceError::RateLimited(
                self.config.presence.rate_per_second,
            ));
        }
        client.tokens -= 1.0;
        client.last_seen = now;
        Ok(())
    }

    fn check_state(&self, state: &Value) -> Result<(), PresenceError> {
        if !(state.is_object() || state.is_null()) {
            return Err(PresenceError::Invalid(
                "a member's state is a JSON object".into(),
            ));
        }
        within("the state", state, self.config.presence.max_state_bytes)
    }

    /// `client_id` of `identity` joins `room` with `state` (a JSON object), or updates its
    /// state there if it is in already.
    pub fn presence_join(
        self: &Arc<Self>,
        identity: &Identity,
        client_id: &str,
        room: &str,
        state: Value,
    ) -> Result<(), PresenceError> {
        self.check_state(&state)?;
        let (lookups, at) = self.room_lookups(identity, room)?;
        let key: ClientKey = (identity.user_id.clone(), client_id.to_owned());
        let mut reg = self.presence.lock();
        let reg = &mut *reg;
        if !reg.clients.contains_key(&key) {
            let (hub_id, notify) = self.hub.register(&identity.user_id);
            let checker = tokio::spawn(check_membership(
                Arc::downgrade(self),
                key.clone(),
                notify.clone(),
            ));
            reg.clients.insert(
                key.clone(),
                Client {
                    identity: identity.clone(),
                    rooms: BTreeMap::new(),
                    last_seen: Instant::now(),
                    tokens: 2.0 * f64::from(self.config.presence.rate_per_second.max(1)),
                    refilled: Instant::now(),
                    hub_id,
                    notify,
                    checker,
                },
            );
        }
        let Some(client) = reg.clients.get_mut(&key) else {
            return Ok(());
        };
        // The newest token speaks for the client (a refreshed one, new claims).
        client.identity = identity.clone();
        if !client.rooms.contains_key(room) && client.rooms.len() >= self.config.presence.max_rooms
        {
            return Err(PresenceError::TooManyRooms(self.config.presence.max_rooms));
        }
        self.spend(client)?;
        client.rooms.insert(room.to_owned(), lookups);
        self.listen(client.hub_id, &client.notify, client.lookups(), at);
        self.tell_peers(PeerMessage::PresencePut {
            room: room.to_owned(),
            user: key.0.clone(),
            client: key.1.clone(),
            state: state.clone(),
        });
        reg.put_member(room, &key, state, self.config.presence.watcher_backlog);
        Ok(())
    }

    /// A member's new state in `room`. Its access was checked when it joined and is checked
    /// again whenever its membership changes: an update reads nothing of the store.
    pub fn presence_update(
        &self,
        identity: &Identity,
        client_id: &str,
        room: &str,
        state: Value,
    ) -> Result<(), PresenceError> {
        self.check_state(&state)?;
        let key: ClientKey = (identity.user_id.clone(), client_id.to_owned());
        let mut reg = self.presence.lock();
        let Some(client) = reg
            .clients
            .get_mut(&key)
            .filter(|c| c.rooms.contains_key(room))
        else {
            return Err(PresenceError::NotJoined(room.to_owned()));
        };
        self.spend(client)?;
        self.tell_peers(PeerMessage::PresencePut {
            room: room.to_owned(),
            user: key.0.clone(),
            client: key.1.clone(),
            state: state.clone(),
        });
        reg.put_member(room, &key, state, self.config.presence.watcher_backlog);
        Ok(())
    }

    /// A member leaves `room`.
    pub fn presence_leave(
        &self,
        identity: &Identity,
        client_id: &str,
        room: &str,
    ) -> Result<(), PresenceError> {
        let key: ClientKey = (identity.user_id.clone(), client_id.to_owned());
        let mut reg = self.presence.lock();
        let reg = &mut *reg;
        let Some(client) = reg.clients.get_mut(&key) else {
            return Err(PresenceError::NotJoined(room.to_owned()));
        };
        if client.rooms.remove(room).is_none() {
            return Err(PresenceError::NotJoined(room.to_owned()));
        }
        client.last_seen = Instant::now();
        let empty = client.rooms.is_empty();
        self.hub
            .subscribe(client.hub_id, Vec::new(), client.lookups());
        self.remove_local(reg, room, &key, Reason::Left);
        if empty {
            self.forget_client(reg, &key);
        }
        Ok(())
    }

    /// An ephemeral message from a member to everyone watching `room`; stored nowhere.
    pub fn presence_message(
        &self,
        identity: &Identity,
        client_id: &str,
        room: &str,
        data: &Value,
    ) -> Result<(), PresenceError> {
        within("the message", data, self.config.presence.max_message_bytes)?;
        let key: ClientKey = (identity.user_id.clone(), client_id.to_owned());
        let mut reg = self.presence.lock();
        let Some(client) = reg.clients.get_mut(&key) else {
            return Err(PresenceError::NotJoined(room.to_owned()));
        };
        if !client.rooms.contains_key(room) {
            return Err(PresenceError::NotJoined(room.to_owned()));
        }
        self.spend(client)?;
        self.tell_peers(PeerMessage::PresenceMessage {
            room: room.to_owned(),
            user: key.0.clone(),
            client: key.1.clone(),
            data: data.clone(),
        });
        reg.publish(
            room,
            &EventJson::Message {
                room,
                user_id: &key.0,
                client_id: &key.1,
                data,
            },
        );
        Ok(())
    }

    /// The client is still there: it stays a member of its rooms for another timeout.
    pub fn presence_heartbeat(
        &self,
        identity: &Identity,
        client_id: &str,
    ) -> Result<(), PresenceError> {
        let key: ClientKey = (identity.user_id.clone(), client_id.to_owned());
        match self.presence.lock().clients.get_mut(&key) {
            Some(c) => {
                c.last_seen = Instant::now();
                self.tell_peers(PeerMessage::PresenceAlive {
                    user: key.0.clone(),
                    client: key.1.clone(),
                });
                Ok(())
            }
            None => Err(PresenceError::Invalid(
                "this client is in no room: join one first".into(),
            )),
        }
    }

    /// The client's connection is gone: it leaves every room at once.
    pub fn presence_disconnect(&self, user_id: &str, client_id: &str) {
        let key: ClientKey = (user_id.to_owned(), client_id.to_owned());
        let mut reg = self.presence.lock();
        self.leave_all(&mut reg, &key, Reason::Disconnected);
    }

    /// A member of this process leaves `room`, here and on the other processes.
    fn remove_local(&self, reg: &mut Registry, room: &str, key: &ClientKey, reason: Reason) {
        self.tell_peers(PeerMessage::PresenceLeave {
            room: room.to_owned(),
            user: key.0.clone(),
            client: key.1.clone(),
            reason: reason.as_str().to_owned(),
        });
        reg.remove_member(room, key, reason);
    }

    /// What another process's members did: shown to this process's watchers as if here.
    pub(crate) fn presence_from_peer(&self, message: PeerMessage) {
        let mut reg = self.presence.lock();
        let reg = &mut *reg;
        match message {
            PeerMessage::PresencePut {
                room,
                user,
                client,
                state,
            } => {
                let key: ClientKey = (user, client);
                let remote = reg.remote.entry(key.clone()).or_insert_with(|| Remote {
                    rooms: BTreeSet::new(),
                    last_seen: Instant::now(),
                });
                remote.rooms.insert(room.clone());
                remote.last_seen = Instant::now();
                // Told again what we know (an answer to a hello): nothing changed.
                let known = reg
                    .rooms
                    .get(&room)
                    .and_then(|r| r.members.get(&key))
                    .is_some_and(|s| *s == state);
                if !known {
                    reg.put_member(&room, &key, state, self.config.presence.watcher_backlog);
                }
            }
            PeerMessage::PresenceLeave {
                room,
                user,
                client,
                reason,
            } => {
                let key: ClientKey = (user, client);
                if let Some(r) = reg.remote.get_mut(&key) {
                    r.rooms.remove(&room);
                    if r.rooms.is_empty() {
                        reg.remote.remove(&key);
                    }
                }
                let reason = match reason.as_str() {
                    "timeout" => Reason::Timeout,
                    "disconnected" => Reason::Disconnected,
                    "membership" => Reason::Membership,
                    _ => Reason::Left,
                };
                reg.remove_member(&room, &key, reason);
            }
            PeerMessage::PresenceMessage {
                room,
                user,
                client,
                data,
            } => reg.publish(
                &room,
                &EventJson::Message {
                    room: &room,
                    user_id: &user,
                    client_id: &client,
                    data: &data,
                },
            ),
            PeerMessage::PresenceAlive { user, client } => {
                if let Some(r) = reg.remote.get_mut(&(user, client)) {
                    r.last_seen = Instant::now();
                }
            }
            PeerMessage::PresenceHello => {
                for (key, client) in &reg.clients {
                    for room in client.rooms.keys() {
                        if let Some(state) = reg.rooms.get(room).and_then(|r| r.members.get(key)) {
                            self.tell_peers(PeerMessage::PresencePut {
                                room: room.clone(),
                                user: key.0.clone(),
                                client: key.1.clone(),
                                state: state.clone(),
                            });
                        }
                    }
                }
            }
            PeerMessage::WriteCheckpoint { .. } => {}
        }
    }

    fn leave_all(&self, reg: &mut Registry, key: &ClientKey, reason: Reason) {
        let Some(client) = reg.clients.get_mut(key) else {
            return;
        };
        let rooms: Vec<String> = std::mem::take(&mut client.rooms).into_keys().collect();
        for room in rooms {
            self.remove_local(reg, &room, key, reason);
        }
        self.forget_client(reg, key);
    }

    fn forget_client(&self, reg: &mut Registry, key: &ClientKey) {
        if let Some(client) = reg.clients.remove(key) {
            self.hub.unregister(client.hub_id);
            client.checker.abort();
        }
    }

    /// Members silent longer than the timeout leave (called by [`SyncCore::run`], at every
    /// checkpoint; looks at most about once a second).
    pub(crate) fn presence_sweep(&self) {
        {
            let mut swept = self
                .presence
                .swept
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if swept.is_some_and(|at| at.elapsed() < Duration::from_millis(900)) {
                return;
            }
            *swept = Some(Instant::now());
        }
        let timeout = self.config.presence.timeout;
        let mut reg = self.presence.lock();
        let silent: Vec<ClientKey> = reg
            .clients
            .iter()
            .filter(|(_, c)| c.last_seen.elapsed() > timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for key in silent {
            self.leave_all(&mut reg, &key, Reason::Timeout);
        }
        // Members on other processes that went silent (their process died, or lost the store).
        let gone: Vec<ClientKey> = reg
            .remote
            .iter()
            .filter(|(_, r)| r.last_seen.elapsed() > timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(r) = reg.remote.remove(&key) {
                for room in r.rooms {
                    reg.remove_member(&room, &key, Reason::Timeout);
                }
            }
        }
    }

    /// Checks every room of `key` again (its membership lookups changed).
    fn recheck(&self, key: &ClientKey) {
        let (identity, rooms) = {
            let reg = self.presence.lock();
            let Some(c) = reg.clients.get(key) else {
                return;
            };
            (
                c.identity.clone(),
                c.rooms.keys().cloned().collect::<Vec<_>>(),
            )
        };
        let mut lost = Vec::new();
        let mut kept = BTreeMap::new();
        let mut at = u64::MAX;
        for room in rooms {
            match self.room_lookups(&identity, &room) {
                Ok((lookups, op_id)) => {
                    at = at.min(op_id);
                    kept.insert(room, lookups);
                }
                Err(PresenceError::Forbidden(_) | PresenceError::UnknownRoom(_)) => lost.push(room),
                Err(e) => {
                    tracing::warn!(error = %e, "could not check a presence member's rooms");
                    return;
                }
            }
        }
        let mut reg = self.presence.lock();
        let reg = &mut *reg;
        let Some(client) = reg.clients.get_mut(key) else {
            return;
        };
        for room in &lost {
            client.rooms.remove(room);
        }
        for (room, lookups) in kept {
            if let Some(l) = client.rooms.get_mut(&room) {
                *l = lookups;
            }
        }
        let empty = client.rooms.is_empty();
        self.listen(client.hub_id, &client.notify, client.lookups(), at);
        for room in &lost {
            self.remove_local(reg, room, key, Reason::Membership);
        }
        if empty {
            self.forget_client(reg, key);
        }
    }

    /// Watches `room`: the members now, then the room's events. The same authorization as a
    /// join.
    pub fn presence_watch(
        self: &Arc<Self>,
        identity: &Identity,
        room: &str,
    ) -> Result<PresenceWatch<S>, PresenceError> {
        let (lookups, at) = self.room_lookups(identity, room)?;
        let (hub_id, notify) = self.hub.register(&identity.user_id);
        self.listen(hub_id, &notify, lookups, at);
        let mut reg = self.presence.lock();
        let r = reg.room(room, self.config.presence.watcher_backlog);
        let events = r.events.subscribe();
        let first = EventJson::Members {
            room,
            members: r
                .members
                .iter()
                .map(|(k, state)| MemberJson {
                    user_id: &k.0,
                    client_id: &k.1,
                    state,
                })
                .collect(),
        }
        .encode();
        Ok(PresenceWatch {
            core: self.clone(),
            identity: identity.clone(),
            room: room.to_owned(),
            first: Some(first),
            events,
            hub_id,
            notify,
            closed: false,
        })
    }

    /// Rooms and members, for metrics.
    pub fn presence_stats(&self) -> PresenceStats {
        let reg = self.presence.lock();
        PresenceStats {
            rooms: reg.rooms.len(),
            members: reg.rooms.values().map(|r| r.members.len()).sum(),
        }
    }

    /// Ends every watch (at shutdown).
    pub(crate) fn presence_shutdown(&self) {
        let mut reg = self.presence.lock();
        let keys: Vec<ClientKey> = reg.clients.keys().cloned().collect();
        for key in keys {
            self.leave_all(&mut reg, &key, Reason::Disconnected);
        }
        reg.rooms.clear();
    }
}

/// Waits for checkpoints that change the client's membership lookups, and checks its rooms
/// again at each.
async fn check_membership<S: BucketStore + 'static>(
    core: std::sync::Weak<SyncCore<S>>,
    key: ClientKey,
    notify: Arc<Notify>,
) {
    loop {
        notify.notified().await;
        let Some(core) = core.upgrade() else {
            return;
        };
        if core.hub.is_shutdown() {
            return;
        }
        core.recheck(&key);
    }
}
