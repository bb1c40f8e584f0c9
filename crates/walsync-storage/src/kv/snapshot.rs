//! Reads on a consistent snapshot.

use walsync_types::{LookupKey, RowId};

use super::chunk::{OpValue, chunk_ops, get_chunks, op_from};
use super::engine::{Bytes, Read, Snap};
use super::keys::{lookup_key, op_id_of, op_key};
use super::record::{corrupt, decode};
use super::row::{RowRecord, names_in};
use super::{Space, Spaces};
use crate::model::{BucketState, Changes, Op, StoreCheckpoint, StoredRow};
use crate::{Result, StoreRead};

/// Op chunks [`StoreRead::ops`] reads at once, at most.
const CHUNKS_PER_READ: usize = 8;

/// A read snapshot of the store.
pub struct KvSnapshot {
    pub(super) snap: Snap,
    s: Spaces,
}

impl KvSnapshot {
    pub(super) fn new(snap: Snap, s: Spaces) -> KvSnapshot {
        KvSnapshot { snap, s }
    }

    /// [`StoreRead::bucket_states`] by one range scan merged with the sorted names.
    fn bucket_states_scanned(&self, buckets: &[String]) -> Result<Vec<Option<BucketState>>> {
        let mut order: Vec<usize> = (0..buckets.len()).collect();
        order.sort_unstable_by(|a, b| buckets[*a].cmp(&buckets[*b]));
        let mut out = vec![None; buckets.len()];
        let (Some(first), Some(last)) = (order.first(), order.last()) else {
            return Ok(out);
        };
        let mut wanted = order.iter().peekable();
        for g in self.snap.range(
            Space::Buckets,
            buckets[*first].as_bytes()..=buckets[*last].as_bytes(),
        ) {
            let (key, v) = g?;
            while let Some(&&i) = wanted.peek() {
                match buckets[i].as_bytes().cmp(&key[..]) {
                    std::cmp::Ordering::Less => {
                        wanted.next();
                    }
                    std::cmp::Ordering::Equal => {
                        out[i] = Some(decode("bucket state", &v)?);
                        wanted.next();
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            if wanted.peek().is_none() {
                break;
            }
        }
        Ok(out)
    }
}

impl std::fmt::Debug for KvSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSnapshot").finish_non_exhaustive()
    }
}

impl StoreRead for KvSnapshot {
    fn checkpoint(&self) -> Result<StoreCheckpoint> {
        read_checkpoint(&self.snap)
    }

    fn buckets(&self) -> Result<Vec<String>> {
        let snap = &self.snap;
        let mut out = Vec::new();
        for g in snap.iter(Space::Buckets) {
            out.push(String::from_utf8_lossy(&g?.0).into_owned());
        }
        Ok(out)
    }

    fn bucket_states(&self, buckets: &[String]) -> Result<Vec<Option<BucketState>>> {
        let snap = &self.snap;
        // Asked for a large part of all buckets (a user in thousands of projects): one pass
        // over the keyspace between the first and the last asked for costs less than a point
        // read each, in the embedded engine (PostgreSQL reads them all in one query anyway).
        if buckets.len() >= 1_000
            && self
                .snap
                .local_len(Space::Buckets)
                .is_some_and(|n| buckets.len() * 4 >= n)
        {
            return self.bucket_states_scanned(buckets);
        }
        let keys: Vec<&[u8]> = buckets.iter().map(|b| b.as_bytes()).collect();
        snap.get_many(Space::Buckets, &keys)?
            .into_iter()
            .map(|v| match v {
                Some(v) => decode("bucket state", &v).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    fn ops(&self, bucket: &str, after: u64, up_to: u64, limit: usize) -> Result<Vec<Op>> {
        if after >= up_to {
            return Ok(Vec::new());
        }
        let snap = &self.snap;
        let mut out = Vec::new();
        // A chunk is listed by its last op, so the one holding `up_to` may lie past it. The
        // chunks are read a few at a time (one query each time in PostgreSQL): as many as the
        // ops still wanted fill at the size of the last chunk read, so that no more are read
        // than a page needs.
        let mut listed: Vec<u64> = Vec::with_capacity(CHUNKS_PER_READ);
        let mut per_chunk: Option<usize> = None;
        let mut entries = snap.range(
            Space::OpIndex,
            op_key(bucket, after + 1)..=op_key(bucket, u64::MAX),
        );
        loop {
            listed.clear();
            let want = match per_chunk {
                None => 1,
                Some(n) => (limit - out.len())
                    .div_ceil(n.max(1))
                    .clamp(1, CHUNKS_PER_READ),
            };
            for g in entries.by_ref().take(want) {
                listed.push(op_id_of(&g?.0));
            }
            if listed.is_empty() {
                return Ok(out);
            }
            for v in get_chunks(snap, &listed)? {
                let ops = chunk_ops(&v)?;
                per_chunk = Some(ops.len());
                for (id, rec) in ops {
                    if id > up_to || out.len() >= limit {
                        return Ok(out);
                    }
                    if id > after {
                        out.push(op_from(id, OpValue::from_bytes(rec)?));
                    }
                }
            }
        }
    }

    fn lookup_texts(&self, key: &LookupKey, at: u64) -> Result<Vec<String>> {
        let snap = &self.snap;
        let k = key.encode();
        let prefix_len = k.len() + 1 + 8;
        // Each row's latest entry as stored (JSON text, `null` once the row left): entries come
        // in op id order, so of a row's entries the last one counts. A stable sort by row keeps
        // that order within a row, with no key copied.
        let mut entries: Vec<(Bytes, Bytes)> = Vec::new();
        for g in snap.range(
            Space::Lookups,
            lookup_key(&k, 0, "")..lookup_key(&k, at.saturating_add(1), ""),
        ) {
            entries.push(g?);
        }
        fn row_of(key: &[u8], prefix_len: usize) -> &[u8] {
            &key[prefix_len.min(key.len())..]
        }
        entries.sort_by(|a, b| row_of(&a.0, prefix_len).cmp(row_of(&b.0, prefix_len)));
        let mut texts: Vec<&[u8]> = Vec::with_capacity(entries.len());
        for (i, (key, value)) in entries.iter().enumerate() {
            let last_of_row = entries
                .get(i + 1)
                .is_none_or(|(next, _)| row_of(next, prefix_len) != row_of(key, prefix_len));
            if last_of_row && &value[..] != b"null" {
                texts.push(&value[..]);
            }
        }
        // Sorted and deduplicated by their text, which is the parameter set's JSON.
        texts.sort_unstable();
        texts.dedup();
        texts
            .into_iter()
            .map(|v| String::from_utf8(v.to_vec()).map_err(|_| corrupt("lookup", "not utf-8 text")))
            .collect()
    }

    fn changes(&self, after: u64, up_to: u64) -> Result<Changes> {
        let mut out = Changes::default();
        if after >= up_to {
            return Ok(out);
        }
        let snap = &self.snap;
        for g in snap.range(
            Space::Changes,
            (after + 1).to_be_bytes()..=up_to.to_be_bytes(),
        ) {
            let c: Changes = decode("changes", &g?.1)?;
            out.buckets.extend(c.buckets);
            out.lookups.extend(c.lookups);
        }
        Ok(out)
    }

    fn row(&self, table: &str, row_id: &RowId) -> Result<Option<StoredRow>> {
        let snap = &self.snap;
        match snap.get(Space::Rows, &self.s.row_keys.key(table, row_id))? {
            Some(v) => {
                let rec = RowRecord::from_bytes(&v)?;
                let columns = names_in(snap, rec.s)?;
                Ok(Some(StoredRow {
                    columns: columns.into(),
                    values: rec.v,
                }))
            }
            None => Ok(None),
        }
    }
}

pub(super) fn read_checkpoint(r: &impl Read) -> Result<StoreCheckpoint> {
    match r.get(Space::Meta, b"checkpoint")? {
        Some(v) => decode("checkpoint", &v),
        None => Ok(StoreCheckpoint::default()),
    }
}
