//! A client's local state: per-bucket rows and checksums, built from the stream's lines, with a
//! checkpoint applied only when it is complete and every checksum adds up.

use std::collections::BTreeMap;
use std::sync::Arc;

use walsync_protocol::{BucketChecksum, BucketRequest, Line, OpKind};
use walsync_types::add_checksums;

use crate::ClientError;

/// One bucket as the client holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalBucket {
    /// `(object_type, object_id)` → the row's JSON text.
    pub rows: BTreeMap<(String, String), String>,
    /// The last op id received (the `after` to resume from).
    pub last_op_id: u64,
    /// Wrapping sum of the checksums of the ops received.
    pub checksum: u32,
    pub count: u64,
}

impl LocalBucket {
    fn apply(&mut self, bucket: &str, op: walsync_protocol::OpLine) -> Result<(), ClientError> {
        if op.op_id <= self.last_op_id {
            return Err(ClientError::Protocol(format!(
                "bucket {bucket}: op {} at or below {} was sent again",
                op.op_id, self.last_op_id
            )));
        }
        let key = || -> Result<(String, String), ClientError> {
            match (&op.object_type, &op.object_id) {
                (Some(t), Some(i)) => Ok((t.clone(), i.clone())),
                _ => Err(ClientError::Protocol(format!(
                    "bucket {bucket}: op {} has no object type or id",
                    op.op_id
                ))),
            }
        };
        match op.op {
            OpKind::Put => {
                let data = op.data.clone().ok_or_else(|| {
                    ClientError::Protocol(format!("bucket {bucket}: put {} has no data", op.op_id))
                })?;
                self.rows.insert(key()?, data);
            }
            OpKind::Remove => {
                self.rows.remove(&key()?);
            }
            OpKind::Move => {}
            OpKind::Clear => {
                self.rows.clear();
                self.checksum = 0;
                self.count = 0;
            }
        }
        self.checksum = add_checksums(self.checksum, op.checksum);
        self.count += 1;
        self.last_op_id = op.op_id;
        Ok(())
    }
}

/// What a line did to the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new checkpoint (full or diff) is being downloaded.
    Checkpoint { last_op_id: u64 },
    /// Ops were received for a bucket.
    Data { bucket: String, ops: usize },
    /// Buckets of priority `priority` and above (lower numbers) are complete and applied.
    PartialComplete { last_op_id: u64, priority: u32 },
    /// The checkpoint is complete, verified and applied.
    Complete { last_op_id: u64 },
    /// A keepalive: seconds until the token expires.
    TokenExpiresIn(i64),
}

/// The target checkpoint being downloaded.
#[derive(Debug, Clone, Default)]
struct Target {
    last_op_id: u64,
    write_checkpoint: Option<u64>,
    buckets: BTreeMap<String, BucketChecksum>,
}

/// The client's state across connections.
#[derive(Debug, Clone, Default)]
pub struct ClientState {
    /// As of the last complete checkpoint.
    applied: BTreeMap<String, Arc<LocalBucket>>,
    /// As received, possibly part-way through a checkpoint.
    working: BTreeMap<String, Arc<LocalBucket>>,
    target: Option<Target>,
    applied_op_id: u64,
    write_checkpoint: Option<u64>,
}

impl ClientState {
    pub fn new() -> ClientState {
        ClientState::default()
    }

    /// The buckets and `after` positions to send when (re)connecting.
    pub fn bucket_requests(&self) -> Vec<BucketRequest> {
        self.working
            .iter()
            .map(|(name, b)| BucketRequest {
                name: name.clone(),
                after: b.last_op_id,
            })
            .collect()
    }

    /// The last applied checkpoint's op id.
    pub fn applied_op_id(&self) -> u64 {
        self.applied_op_id
    }

    /// The last write checkpoint carried by an applied checkpoint.
    pub fn write_checkpoint(&self) -> Option<u64> {
        self.write_checkpoint
    }

    /// The buckets of the last applied checkpoint.
    pub fn buckets(&self) -> &BTreeMap<String, Arc<LocalBucket>> {
        &self.applied
    }

    /// Every row of the last applied checkpoint: `(object_type, object_id)` → JSON text.
    pub fn rows(&self) -> BTreeMap<(String, String), String> {
        let mut out = BTreeMap::new();
        for b in self.applied.values() {
            for (k, v) in &b.rows {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }

    /// Forgets a bucket entirely (after a checksum failure, to download it again).
    pub fn reset_bucket(&mut self, bucket: &str) {
        self.working.remove(bucket);
    }

    /// Applies one line.
    pub fn apply(&mut self, line: Line) -> Result<Event, ClientError> {
        match line {
            Line::Checkpoint(c) => {
                let buckets: BTreeMap<String, BucketChecksum> = c
                    .buckets
                    .into_iter()
                    .map(|b| (b.bucket.clone(), b))
                    .collect();
                self.working.retain(|name, _| buckets.contains_key(name));
                self.target = Some(Target {
                    last_op_id: c.last_op_id,
                    write_checkpoint: c.write_checkpoint,
                    buckets,
                });
                Ok(Event::Checkpoint {
                    last_op_id: c.last_op_id,
                })
            }
            Line::CheckpointDiff(d) => {
                let target = self.target.as_mut().ok_or_else(|| {
                    ClientError::Protocol("checkpoint_diff before any checkpoint".into())
                })?;
                for b in d.updated_buckets {
                    target.buckets.insert(b.bucket.clone(), b);
                }
                for name in &d.removed_buckets {
                    target.buckets.remove(name);
                    self.working.remove(name);
                }
                target.last_op_id = d.last_op_id;
                if d.write_checkpoint.is_some() {
                    target.write_checkpoint = d.write_checkpoint;
                }
                Ok(Event::Checkpoint {
                    last_op_id: d.last_op_id,
                })
            }
            Line::Data(page) => {
                let target = self
                    .target
                    .as_ref()
                    .ok_or_else(|| ClientError::Protocol("data before any checkpoint".into()))?;
                if !target.buckets.contains_key(&page.bucket) {
                    return Err(ClientError::Protocol(format!(
                        "data for bucket {} that is not in the checkpoint",
                        page.bucket
                    )));
                }
                let ops = page.data.len();
                let bucket = Arc::make_mut(self.working.entry(page.bucket.clone()).or_default());
                for op in page.data {
                    bucket.apply(&page.bucket, op)?;
                }
                Ok(Event::Data {
                    bucket: page.bucket,
                    ops,
                })
            }
            Line::PartialCheckpointComplete(p) => {
                self.verify(|b| b.priority <= p.priority)?;
                Ok(Event::PartialComplete {
                    last_op_id: p.last_op_id,
                    priority: p.priority,
                })
            }
            Line::CheckpointComplete(c) => {
                self.verify(|_| true)?;
                let target = self.target.as_ref().ok_or_else(|| {
                    ClientError::Protocol("checkpoint_complete before any checkpoint".into())
                })?;
                self.applied = self.working.clone();
                self.applied_op_id = c.last_op_id;
                if target.write_checkpoint.is_some() {
                    self.write_checkpoint = target.write_checkpoint;
                }
                Ok(Event::Complete {
                    last_op_id: c.last_op_id,
                })
            }
            Line::TokenExpiresIn(s) => Ok(Event::TokenExpiresIn(s)),
        }
    }

    /// Checks the buckets `include` selects against the target, and applies them.
    fn verify(&mut self, include: impl Fn(&BucketChecksum) -> bool) -> Result<(), ClientError> {
        let target = self
            .target
            .as_ref()
            .ok_or_else(|| ClientError::Protocol("completion before any checkpoint".into()))?;
        for (name, expected) in target.buckets.iter().filter(|(_, b)| include(b)) {
            let actual = self.working.get(name).map_or(0, |b| b.checksum);
            if actual != expected.checksum {
                return Err(ClientError::ChecksumMismatch {
                    bucket: name.clone(),
                    expected: expected.checksum,
                    actual,
                });
            }
        }
        for (name, _) in target.buckets.iter().filter(|(_, b)| include(b)) {
            match self.working.get(name) {
                Some(b) => {
                    self.applied.insert(name.clone(), b.clone());
                }
                None => {
                    self.applied.insert(name.clone(), Arc::default());
                }
            }
        }
        self.applied
            .retain(|name, _| target.buckets.contains_key(name));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walsync_protocol::{Checkpoint, CheckpointComplete, CheckpointDiff, DataPage, OpLine};
    use walsync_types::put_checksum;

    fn put(op_id: u64, id: &str, data: &str) -> OpLine {
        OpLine {
            op_id,
            op: OpKind::Put,
            object_type: Some("t".into()),
            object_id: Some(id.into()),
            subkey: Some(format!("t/{id}")),
            data: Some(data.into()),
            checksum: put_checksum("t", id, data),
        }
    }

    fn checkpoint(last: u64, checksum: u32) -> Line {
        Line::Checkpoint(Checkpoint {
            streams: Vec::new(),
            last_op_id: last,
            write_checkpoint: Some(7),
            buckets: vec![BucketChecksum {
                subscriptions: Vec::new(),
                bucket: "b".into(),
                checksum,
                count: 1,
                priority: 3,
            }],
        })
    }

    fn data(ops: Vec<OpLine>) -> Line {
        Line::Data(DataPage {
            bucket: "b".into(),
            has_more: false,
            after: 0,
            next_after: ops.last().map_or(0, |o| o.op_id),
            data: ops,
        })
    }

    #[test]
    fn applies_only_complete_verified_checkpoints() {
        let mut s = ClientState::new();
        let op = put(1, "1", "{}");
        s.apply(checkpoint(1, op.checksum)).expect("checkpoint");
        s.apply(data(vec![op])).expect("data");
        assert!(
            s.rows().is_empty(),
            "not applied before checkpoint_complete"
        );
        s.apply(Line::CheckpointComplete(CheckpointComplete {
            last_op_id: 1,
        }))
        .expect("complete");
        assert_eq!(s.rows().len(), 1);
        assert_eq!(s.write_checkpoint(), Some(7));
        assert_eq!(s.bucket_requests()[0].after, 1);
    }

    #[test]
    fn a_wrong_checksum_is_refused_and_nothing_applied() {
        let mut s = ClientState::new();
        let op = put(1, "1", "{}");
        s.apply(checkpoint(1, op.checksum.wrapping_add(1)))
            .expect("checkpoint");
        s.apply(data(vec![op])).expect("data");
        let err = s
            .apply(Line::CheckpointComplete(CheckpointComplete {
                last_op_id: 1,
            }))
            .expect_err("mismatch");
        assert!(matches!(err, ClientError::ChecksumMismatch { .. }), "{err}");
        assert!(s.rows().is_empty());
    }

    #[test]
    fn a_resent_op_is_a_protocol_error() {
        let mut s = ClientState::new();
        let op = put(1, "1", "{}");
        s.apply(checkpoint(1, op.checksum)).expect("checkpoint");
        s.apply(data(vec![op.clone()])).expect("data");
        assert!(s.apply(data(vec![op])).is_err());
    }

    #[test]
    fn removed_buckets_are_dropped() {
        let mut s = ClientState::new();
        let op = put(1, "1", "{}");
        s.apply(checkpoint(1, op.checksum)).expect("checkpoint");
        s.apply(data(vec![op])).expect("data");
        s.apply(Line::CheckpointComplete(CheckpointComplete {
            last_op_id: 1,
        }))
        .expect("complete");
        s.apply(Line::CheckpointDiff(CheckpointDiff {
            last_op_id: 2,
            write_checkpoint: None,
            updated_buckets: vec![],
            removed_buckets: vec!["b".into()],
        }))
        .expect("diff");
        assert_eq!(s.rows().len(), 1, "still applied until complete");
        s.apply(Line::CheckpointComplete(CheckpointComplete {
            last_op_id: 2,
        }))
        .expect("complete");
        assert!(s.rows().is_empty());
        assert!(s.bucket_requests().is_empty());
    }
}
