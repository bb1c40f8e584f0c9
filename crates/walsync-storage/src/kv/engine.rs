//! The engines a [`super::KvStore`] keeps its keyspaces in: **fjall** (embedded: an LSM tree in
//! one directory) or **PostgreSQL** (a table per keyspace, [`postgres`]). Both give what the
//! store is built on and nothing more: ordered byte keys in named keyspaces, one write
//! transaction at a time that reads its own writes and commits whole, and read snapshots.
//! Everything else (ops, chunks, row copies, lookups, staging, compaction) is the store's, the
//! same over either engine.

pub(super) mod postgres;

use std::ops::{Bound, RangeBounds};

use fjall::{PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace};

use super::Space;
use super::record::engine;
use crate::Result;

/// A value or key read from an engine.
#[derive(Clone)]
pub(super) enum Bytes {
    Slice(fjall::Slice),
    Vec(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Slice(s) => s,
            Bytes::Vec(v) => v,
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.len())
    }
}

/// Entries of a keyspace in key order.
pub(super) type Entries<'a> = Box<dyn Iterator<Item = Result<(Bytes, Bytes)>> + 'a>;

/// How durable a commit is when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// On disk.
    Sync,
    /// Visible, and durable after the next [`Db::persist`] (or sooner).
    Buffer,
}

/// Reads, on a snapshot or in the write transaction (which sees its own writes).
pub(super) trait Read {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>>;

    /// The entries between the bounds, in key order.
    fn range_between(&self, space: Space, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>) -> Entries<'_>;

    /// The last key between the bounds.
    fn last_key(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Option<Bytes>>;

    /// The values of `keys`, in their order: one round trip where the engine is remote.
    fn get_many(&self, space: Space, keys: &[&[u8]]) -> Result<Vec<Option<Bytes>>> {
        keys.iter().map(|k| self.get(space, k)).collect()
    }

    fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, space: Space, r: R) -> Entries<'_> {
        self.range_between(space, owned(r.start_bound()), owned(r.end_bound()))
    }

    fn iter(&self, space: Space) -> Entries<'_> {
        self.range_between(space, Bound::Unbounded, Bound::Unbounded)
    }

    fn prefix(&self, space: Space, prefix: &[u8]) -> Entries<'_> {
        let (lo, hi) = prefix_bounds(prefix);
        self.range_between(space, lo, hi)
    }
}

fn owned<K: AsRef<[u8]>>(b: Bound<&K>) -> Bound<Vec<u8>> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_ref().to_vec()),
        Bound::Excluded(k) => Bound::Excluded(k.as_ref().to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The bounds of the keys that start with `prefix`.
pub(super) fn prefix_bounds(prefix: &[u8]) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let lo = Bound::Included(prefix.to_vec());
    // The first key after every key with the prefix: the prefix with its last byte below 0xff
    // raised and what follows dropped (none: no upper bound).
    let mut hi = prefix.to_vec();
    while let Some(last) = hi.pop() {
        if last < 0xff {
            hi.push(last + 1);
            return (lo, Bound::Excluded(hi));
        }
    }
    (lo, Bound::Unbounded)
}

/// The fjall database and its keyspaces, by [`Space`].
#[derive(Clone)]
pub(super) struct FjallDb {
    pub(super) db: SingleWriterTxDatabase,
    spaces: std::sync::Arc<[SingleWriterTxKeyspace]>,
}

impl FjallDb {
    /// `spaces` in the order of [`Space::ALL`].
    pub(super) fn new(db: SingleWriterTxDatabase, spaces: Vec<SingleWriterTxKeyspace>) -> FjallDb {
        debug_assert_eq!(spaces.len(), Space::ALL.len());
        FjallDb {
            db,
            spaces: spaces.into(),
        }
    }

    pub(super) fn keyspace(&self, space: Space) -> &SingleWriterTxKeyspace {
        &self.spaces[space.index()]
    }
}

/// An engine.
#[derive(Clone)]
pub(super) enum Db {
    Fjall(FjallDb),
    Postgres(postgres::PgDb),
}

impl Db {
    /// Makes this process the store's writer, unless it is: how many times it became so (a
    /// new number: another process may have written meanwhile). An embedded store is its
    /// process's alone.
    pub(super) fn lead(&self) -> Result<u64> {
        match self {
            Db::Fjall(_) => Ok(0),
            Db::Postgres(p) => p.lead(),
        }
    }

    /// Starts the write transaction: waits while another one is open.
    pub(super) fn write_tx(&self) -> Result<Tx<'_>> {
        Ok(match self {
            Db::Fjall(f) => Tx::Fjall(f.db.write_tx(), f),
            Db::Postgres(p) => Tx::Postgres(p.write_tx()?),
        })
    }

    /// A read snapshot of what is committed now.
    pub(super) fn read_tx(&self) -> Result<Snap> {
        Ok(match self {
            Db::Fjall(f) => Snap::Fjall(f.db.read_tx(), f.clone()),
            Db::Postgres(p) => Snap::Postgres(p.snapshot()?),
        })
    }

    /// About how many keys `space` holds.
    pub(super) fn approximate_len(&self, space: Space) -> usize {
        match self {
            Db::Fjall(f) => f.keyspace(space).approximate_len(),
            Db::Postgres(p) => p.approximate_len(space),
        }
    }

    pub(super) fn disk_space(&self) -> Result<u64> {
        match self {
            Db::Fjall(f) => f.db.disk_space().map_err(engine),
            Db::Postgres(p) => p.disk_space(),
        }
    }

    /// Makes every commit so far durable.
    pub(super) fn persist(&self) -> Result<()> {
        match self {
            Db::Fjall(f) => f.db.persist(PersistMode::SyncAll).map_err(engine),
            Db::Postgres(p) => p.persist(),
        }
    }

    /// Empties `space` in one operation, outside any write transaction.
    pub(super) fn clear(&self, space: Space) -> Result<()> {
        match self {
            Db::Fjall(f) => f.keyspace(space).inner().clear().map_err(engine),
            Db::Postgres(p) => p.clear(space),
        }
    }

    /// Writes `entries` (a value, or `None` to remove the key) in a commit of their own,
    /// beside any open write transaction, buffered.
    pub(super) fn commit_batch(
        &self,
        entries: Vec<(Space, Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<()> {
        match self {
            Db::Fjall(f) => {
                let mut batch = f.db.inner().batch();
                for (space, key, value) in entries {
                    let ks = f.keyspace(space).inner();
                    match value {
                        Some(v) => batch.insert(ks, key, v),
                        None => batch.remove(ks, key),
                    }
                }
                batch.commit().map_err(engine)
            }
            Db::Postgres(p) => p.commit_batch(entries),
        }
    }
}

/// The write transaction.
pub(super) enum Tx<'a> {
    Fjall(fjall::SingleWriterWriteTx<'a>, &'a FjallDb),
    Postgres(postgres::PgTx<'a>),
}

impl Tx<'_> {
    pub(super) fn insert(
        &mut self,
        space: Space,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) {
        match self {
            Tx::Fjall(tx, f) => tx.insert(f.keyspace(space), key.into(), value.into()),
            Tx::Postgres(tx) => tx.insert(space, key.into(), value.into()),
        }
    }

    pub(super) fn remove(&mut self, space: Space, key: impl Into<Vec<u8>>) {
        match self {
            Tx::Fjall(tx, f) => tx.remove(f.keyspace(space), key.into()),
            Tx::Postgres(tx) => tx.remove(space, key.into()),
        }
    }

    /// Commits the transaction whole.
    pub(super) fn commit(self, durability: Durability) -> Result<()> {
        match self {
            Tx::Fjall(tx, _) => tx
                .durability(Some(match durability {
                    Durability::Sync => PersistMode::SyncAll,
                    Durability::Buffer => PersistMode::Buffer,
                }))
                .commit()
                .map_err(engine),
            Tx::Postgres(tx) => tx.commit(durability),
        }
    }
}

/// fjall's reads, on a snapshot or a write transaction.
fn fjall_get(r: &impl Readable, f: &FjallDb, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
    Ok(r.get(f.keyspace(space), key)
        .map_err(engine)?
        .map(Bytes::Slice))
}

fn fjall_range<'a>(
    r: &'a impl Readable,
    f: &'a FjallDb,
    space: Space,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
) -> Entries<'a> {
    Box::new(r.range::<Vec<u8>, _>(f.keyspace(space), (lo, hi)).map(|g| {
        g.into_inner()
            .map(|(k, v)| (Bytes::Slice(k), Bytes::Slice(v)))
            .map_err(engine)
    }))
}

fn fjall_last_key(
    r: &impl Readable,
    f: &FjallDb,
    space: Space,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
) -> Result<Option<Bytes>> {
    r.range::<Vec<u8>, _>(f.keyspace(space), (lo, hi))
        .next_back()
        .map(|g| g.key().map(Bytes::Slice).map_err(engine))
        .transpose()
}

impl Read for Tx<'_> {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
        match self {
            Tx::Fjall(tx, f) => fjall_get(tx, f, space, key),
            Tx::Postgres(tx) => tx.get(space, key),
        }
    }

    fn range_between(&self, space: Space, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>) -> Entries<'_> {
        match self {
            Tx::Fjall(tx, f) => fjall_range(tx, f, space, lo, hi),
            Tx::Postgres(tx) => tx.range(space, lo, hi),
        }
    }

    fn last_key(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Option<Bytes>> {
        match self {
            Tx::Fjall(tx, f) => fjall_last_key(tx, f, space, lo, hi),
            Tx::Postgres(tx) => tx.last_key(space, lo, hi),
        }
    }

    fn get_many(&self, space: Space, keys: &[&[u8]]) -> Result<Vec<Option<Bytes>>> {
        match self {
            Tx::Fjall(tx, f) => keys.iter().map(|k| fjall_get(tx, f, space, k)).collect(),
            Tx::Postgres(tx) => tx.get_many(space, keys),
        }
    }
}

/// A read snapshot.
pub(super) enum Snap {
    Fjall(fjall::Snapshot, FjallDb),
    Postgres(postgres::PgSnap),
}

impl Snap {
    /// About how many keys `space` holds, where the engine knows without a query.
    pub(super) fn local_len(&self, space: Space) -> Option<usize> {
        match self {
            Snap::Fjall(_, f) => Some(f.keyspace(space).approximate_len()),
            Snap::Postgres(_) => None,
        }
    }
}

impl Read for Snap {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Bytes>> {
        match self {
            Snap::Fjall(s, f) => fjall_get(s, f, space, key),
            Snap::Postgres(s) => s.get(space, key),
        }
    }

    fn range_between(&self, space: Space, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>) -> Entries<'_> {
        match self {
            Snap::Fjall(s, f) => fjall_range(s, f, space, lo, hi),
            Snap::Postgres(s) => s.range(space, lo, hi),
        }
    }

    fn last_key(
        &self,
        space: Space,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    ) -> Result<Option<Bytes>> {
        match self {
            Snap::Fjall(s, f) => fjall_last_key(s, f, space, lo, hi),
            Snap::Postgres(s) => s.last_key(space, lo, hi),
        }
    }

    fn get_many(&self, space: Space, keys: &[&[u8]]) -> Result<Vec<Option<Bytes>>> {
        match self {
            Snap::Fjall(s, f) => keys.iter().map(|k| fjall_get(s, f, space, k)).collect(),
            Snap::Postgres(s) => s.get_many(space, keys),
        }
    }
}
