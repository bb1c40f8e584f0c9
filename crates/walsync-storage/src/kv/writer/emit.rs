//! How a write transaction emits: ops into each bucket's open chunk (and its state), REMOVEs of
//! objects a row left, and lookup entries.

use walsync_types::{LookupEntry, OpKind, add_checksums, remove_checksum};

use super::KvWriter;
use crate::Result;
use crate::kv::Space;
use crate::kv::chunk::{CHUNK_BYTES, push_op};
use crate::kv::engine::Read;
use crate::kv::keys::lookup_key;
use crate::kv::record::{Writer, decode, encode};
use crate::kv::row::Placement;
use crate::kv::stage::state_key;
use crate::model::BucketState;

pub(super) fn object_hash(bucket: &str, object_type: &str, object_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (bucket, object_type, object_id).hash(&mut h);
    h.finish()
}

pub(super) fn key_hash(key: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// A bucket's part of an open commit.
pub(super) struct Pending {
    pub(super) state: BucketState,
    pub(super) chunk: Writer,
}

impl KvWriter<'_> {
    /// The state of a bucket this commit has not written to yet (for a staged writer, as its
    /// last step left it).
    pub(super) fn stored_state(&self, bucket: &str) -> Result<BucketState> {
        if self.staging.as_ref().is_some_and(|s| s.steps > 0)
            && let Some(v) = self.tx.get(Space::Stage, &state_key(bucket))?
        {
            return decode("bucket state", &v);
        }
        Ok(match self.tx.get(Space::Buckets, bucket.as_bytes())? {
            Some(v) => decode("bucket state", &v)?,
            None => BucketState::default(),
        })
    }

    pub(super) fn emit(
        &mut self,
        bucket: &str,
        kind: OpKind,
        object_type: &str,
        object_id: &str,
        data: Option<&str>,
        checksum: u32,
    ) -> Result<()> {
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        if !self.states.contains_key(bucket) {
            let state = self.stored_state(bucket)?;
            let chunk = Writer::with_capacity(1024);
            self.states
                .insert(bucket.to_owned(), Pending { state, chunk });
        }
        let Some(p) = self.states.get_mut(bucket) else {
            unreachable!("inserted above");
        };
        let s = &mut p.state;
        s.checksum = add_checksums(s.checksum, checksum);
        s.count += 1;
        s.last_op_id = op_id;
        push_op(
            &mut p.chunk,
            op_id,
            kind,
            object_type,
            object_id,
            data,
            checksum,
        );
        if p.chunk.0.len() >= CHUNK_BYTES {
            let chunk = std::mem::replace(&mut p.chunk, Writer::with_capacity(1024));
            self.put_chunk(bucket, op_id, chunk.0)?;
        }
        Ok(())
    }

    /// A REMOVE of the row's object from the bucket of `p`, unless another row (not the one
    /// under `row`, a key of `rows`) put that object in this commit.
    pub(super) fn remove_from(&mut self, p: &Placement, row: &[u8]) -> Result<()> {
        if self
            .owner(object_hash(&p.bucket, &p.object_type, &p.object_id))?
            .is_some_and(|owner| owner != key_hash(row))
        {
            return Ok(());
        }
        let subkey = format!("{}/{}", p.object_type, p.object_id);
        self.emit(
            &p.bucket,
            OpKind::Remove,
            &p.object_type,
            &p.object_id,
            None,
            remove_checksum(&subkey),
        )
    }

    /// `label` names the row in its lookups ([`RowKeys::label`]).
    pub(super) fn set_lookups(
        &mut self,
        table: &str,
        label: &str,
        old: &[LookupEntry],
        new: &[LookupEntry],
    ) -> Result<()> {
        if old == new {
            return Ok(());
        }
        let row = format!("{table}/{label}");
        let row = row.as_str();
        // A lookup change takes an op id of its own, so that it is visible exactly from this
        // commit's checkpoint on.
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        for e in old.iter().filter(|e| !new.contains(e)) {
            self.put(
                Space::Lookups,
                lookup_key(&e.key.encode(), op_id, row),
                b"null".to_vec(),
            )?;
            self.changes.lookups.insert(e.key.clone());
        }
        for e in new.iter().filter(|e| !old.contains(e)) {
            self.put(
                Space::Lookups,
                lookup_key(&e.key.encode(), op_id, row),
                encode(&e.parameters)?,
            )?;
            self.changes.lookups.insert(e.key.clone());
        }
        Ok(())
    }
}
