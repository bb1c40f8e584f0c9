//! Which connection a checkpoint concerns.
//!
//! Connections register the buckets they hold and the parameter lookups their bucket set
//! depends on. [`Hub::publish`] reads, once per new checkpoint, what the commits since the last
//! one changed and wakes only the connections that hold one of those buckets or lookups, or whose
//! user waits for a write checkpoint the store's position has passed.
//!
//! **No lost wake-up.** A connection reads its checkpoint `X` first, then registers; the
//! registration returns the published checkpoint `P` under the same lock the hub publishes under.
//! If `P > X` the connection wakes itself; otherwise every later publication sees its
//! registration.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use walsync_storage::{BucketStore, StoreRead};
use walsync_types::LookupKey;

use crate::SyncError;

#[derive(Debug, Default)]
pub(crate) struct Hub {
    state: Mutex<State>,
    poke: Notify,
    wakeups: AtomicU64,
    checkpoints: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    conns: HashMap<u64, Conn>,
    by_bucket: HashMap<String, HashSet<u64>>,
    by_lookup: HashMap<LookupKey, HashSet<u64>>,
    by_user: HashMap<String, HashSet<u64>>,
    /// Requested write checkpoints not yet passed: source position → clients.
    pending: BTreeMap<u64, HashSet<Client>>,
    /// Per client, the largest write checkpoint the store has passed.
    satisfied: HashMap<Client, u64>,
    published: Published,
    shutdown: bool,
}

/// A client of a user: `(user_id, client_id)`, the client id empty when the client named none.
type Client = (String, String);

#[derive(Debug)]
struct Conn {
    notify: Arc<Notify>,
    user: String,
    buckets: Vec<String>,
    lookups: Vec<LookupKey>,
}

/// The last checkpoint the hub published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Published {
    pub op_id: u64,
    pub lsn: u64,
    /// The store has a complete checkpoint (the initial snapshot is done).
    pub complete: bool,
    /// The store's [`walsync_storage::StoreCheckpoint::rebuilt_at`].
    pub rebuilt_at: u64,
}

/// Counters of the hub, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    pub connections: usize,
    pub checkpoints: u64,
    pub wakeups: u64,
}

impl State {
    /// The store passed `client`'s write checkpoint `lsn`: record it, wake the user's streams
    /// (each looks up its own client's).
    fn passed(&mut self, client: Client, lsn: u64, wake: &mut HashSet<u64>) {
        if let Some(ids) = self.by_user.get(&client.0) {
            wake.extend(ids);
        }
        let s = self.satisfied.entry(client).or_default();
        *s = (*s).max(lsn);
    }

    fn notifies(&self, ids: &HashSet<u64>) -> Vec<Arc<Notify>> {
        ids.iter()
            .filter_map(|id| self.conns.get(id).map(|c| c.notify.clone()))
            .collect()
    }
}

fn remove_from<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, HashSet<u64>>,
    key: &K,
    id: u64,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain maps behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn poke(&self) {
        self.poke.notify_one();
    }

    pub(crate) async fn poked(&self) {
        self.poke.notified().await;
    }

    pub(crate) fn register(&self, user: &str) -> (u64, Arc<Notify>) {
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        let notify = Arc::new(Notify::new());
        st.conns.insert(
            id,
            Conn {
                notify: notify.clone(),
                user: user.to_owned(),
                buckets: Vec::new(),
                lookups: Vec::new(),
            },
        );
        st.by_user.entry(user.to_owned()).or_default().insert(id);
        if st.shutdown {
            notify.notify_one();
        }
        (id, notify)
    }

    /// Replaces what connection `id` listens to; returns the published checkpoint.
    pub(crate) fn subscribe(
        &self,
        id: u64,
        buckets: Vec<String>,
        lookups: Vec<LookupKey>,
    ) -> Published {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(conn) = st.conns.get_mut(&id) else {
            return st.published;
        };
        for b in &conn.buckets {
            remove_from(&mut st.by_bucket, b, id);
        }
        for l in &conn.lookups {
            remove_from(&mut st.by_lookup, l, id);
        }
        for b in &buckets {
            st.by_bucket.entry(b.clone()).or_default().insert(id);
        }
        for l in &lookups {
            st.by_lookup.entry(l.clone()).or_default().insert(id);
        }
        conn.buckets = buckets;
        conn.lookups = lookups;
        st.published
    }

    pub(crate) fn unregister(&self, id: u64) {
        let mut st = self.lock();
        let st = &mut *st;
        if let Some(conn) = st.conns.remove(&id) {
            for b in &conn.buckets {
                remove_from(&mut st.by_bucket, b, id);
            }
            for l in &conn.lookups {
                remove_from(&mut st.by_lookup, l, id);
            }
            remove_from(&mut st.by_user, &conn.user, id);
        }
    }

    pub(crate) fn published(&self) -> Published {
        self.lock().published
    }

    pub(crate) fn is_shutdown(&self) -> bool {
        self.lock().shutdown
    }

    /// The largest write checkpoint of `user`'s client `client` the store has passed.
    pub(crate) fn satisfied(&self, user: &str, client: &str) -> Option<u64> {
        self.lock()
            .satisfied
            .get(&(user.to_owned(), client.to_owned()))
            .copied()
    }

    pub(crate) fn register_write_checkpoint(&self, user: &str, client: &str, lsn: u64) {
        let mut st = self.lock();
        let client = (user.to_owned(), client.to_owned());
        if st.published.complete && st.published.lsn >= lsn {
            let mut wake = HashSet::new();
            st.passed(client, lsn, &mut wake);
            let notifies = st.notifies(&wake);
            drop(st);
            notifies.iter().for_each(|n| n.notify_one());
            return;
        }
        st.pending.entry(lsn).or_default().insert(client);
    }

    pub(crate) fn stats(&self) -> HubStats {
        HubStats {
            connections: self.lock().conns.len(),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            wakeups: self.wakeups.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn shutdown(&self) {
        let wake: Vec<Arc<Notify>> = {
            let mut st = self.lock();
            st.shutdown = true;
            st.conns.values().map(|c| c.notify.clone()).collect()
        };
        wake.iter().for_each(|n| n.notify_one());
    }

    /// Publishes the store's checkpoint if it is new, waking the connections it concerns.
    pub(crate) fn publish<S: BucketStore>(
        &self,
        store: &S,
        servable: impl Fn(&walsync_storage::StoreCheckpoint) -> bool,
    ) -> Result<(), SyncError> {
        let snap = store.snapshot()?;
        let cp = snap.checkpoint()?;
        if !servable(&cp) {
            return Ok(());
        }
        let now = Published {
            op_id: cp.op_id,
            lsn: cp.lsn.map_or(0, |l| l.0),
            complete: true,
            rebuilt_at: cp.rebuilt_at,
        };
        let before = self.published();
        if before == now {
            return Ok(());
        }
        // The change log is read outside the lock, once for every connection.
        // After a rebuild the change log starts over: every connection starts over too.
        let everyone = !before.complete
            || before.rebuilt_at != now.rebuilt_at
            || before.op_id < cp.changes_from;
        let changes = if !everyone && now.op_id > before.op_id {
            Some(snap.changes(before.op_id, now.op_id)?)
        } else {
            None
        };
        let mut wake: HashSet<u64> = HashSet::new();
        let notifies: Vec<Arc<Notify>> = {
            let mut st = self.lock();
            let st = &mut *st;
            if everyone {
                // The first checkpoint, or the first after a rebuild: everyone looks for
                // themselves.
                wake.extend(st.conns.keys().copied());
            } else if let Some(changes) = &changes {
                for b in &changes.buckets {
                    if let Some(ids) = st.by_bucket.get(b) {
                        wake.extend(ids);
                    }
                }
                for l in &changes.lookups {
                    if let Some(ids) = st.by_lookup.get(l) {
                        wake.extend(ids);
                    }
                }
            }
            let passed: Vec<u64> = st.pending.range(..=now.lsn).map(|(k, _)| *k).collect();
            for lsn in passed {
                for client in st.pending.remove(&lsn).unwrap_or_default() {
                    st.passed(client, lsn, &mut wake);
                }
            }
            st.published = now;
            st.notifies(&wake)
        };
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.wakeups
            .fetch_add(notifies.len() as u64, Ordering::Relaxed);
        notifies.iter().for_each(|n| n.notify_one());
        Ok(())
    }
}
