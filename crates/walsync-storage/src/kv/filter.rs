//! Which keys `rows` may hold: a Bloom filter, so that a row whose key the store has never seen
//! (an insert under a random key, such as a client-made UUID) costs no engine lookup. The
//! lookup it saves is a miss through every memtable and table of the engine; the bound of
//! [`super::RowKeyBounds`] saves it only for growing keys.
//!
//! A filter is made by a writer (under the write transaction, so no other write runs) and
//! filled from then on by every writer with each key it adds, while a thread adds the keys
//! already stored from a snapshot taken after it was made. Every key `rows` holds is in it:
//! stored before it was made, the scan finds it; added since, the writer that added it put it
//! there. It answers only once the scan is done. Deleted keys stay in it, as false positives
//! (a lookup, nothing worse). When more keys went in than it was made for, the next writer
//! makes a larger one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::Space;
use super::engine::{Db, Read};
use fastbloom::AtomicBloomFilter;

/// The false positive rate at the filter's capacity: about 10 bits a key.
const FALSE_POSITIVES: f64 = 0.01;
/// The smallest capacity (keys) a filter is made for: about 1.2 MiB.
const MIN_CAPACITY: usize = 1 << 20;

pub(super) struct RowFilter {
    bloom: AtomicBloomFilter,
    capacity: usize,
    added: AtomicUsize,
    ready: AtomicBool,
}

impl std::fmt::Debug for RowFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowFilter")
            .field("capacity", &self.capacity)
            .field("added", &self.added.load(Ordering::Relaxed))
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .finish()
    }
}

impl RowFilter {
    /// A new filter for `rows`, filled from a snapshot by a thread of its own. Call it only
    /// while holding the write transaction, before writing.
    pub(super) fn start(db: &Db) -> Arc<Self> {
        let capacity = (db.approximate_len(Space::Rows) * 2).max(MIN_CAPACITY);
        let filter = Arc::new(RowFilter {
            bloom: AtomicBloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(capacity),
            capacity,
            added: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
        });
        let (db, fill) = (db.clone(), filter.clone());
        let spawned = std::thread::Builder::new()
            .name("walsync-row-filter".into())
            .spawn(move || {
                let snapshot = match db.read_tx() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the row keys for the row filter");
                        return;
                    }
                };
                for entry in snapshot.iter(Space::Rows) {
                    match entry {
                        Ok((key, _)) => fill.add(&key),
                        Err(e) => {
                            // Never ready: every lookup goes to the engine, as without a filter.
                            tracing::warn!(error = %e, "cannot read the row keys for the row filter");
                            return;
                        }
                    }
                }
                fill.ready.store(true, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the row filter");
        }
        filter
    }

    /// Notes `key` as held by `rows` (from now on, or from the commit being written).
    pub(super) fn add(&self, key: &[u8]) {
        self.bloom.insert(key);
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `rows` surely does not hold `key`.
    pub(super) fn surely_absent(&self, key: &[u8]) -> bool {
        self.ready.load(Ordering::Acquire) && !self.bloom.contains(key)
    }

    /// Whether more keys went in than it was made for (its false positives grow).
    pub(super) fn full(&self) -> bool {
        self.added.load(Ordering::Relaxed) > self.capacity
    }

    #[cfg(test)]
    pub(super) fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
