//! What the store keeps.

use serde::{Deserialize, Serialize};
use walsync_types::{LookupKey, Lsn, OpKind, Value};

/// `schema.table`.
pub type TableName = str;

/// One op of a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub op_id: u64,
    pub kind: OpKind,
    pub object_type: String,
    pub object_id: String,
    /// `<object_type>/<object_id>`: what a REMOVE's checksum covers.
    pub subkey: String,
    /// The row's JSON text, for PUT.
    pub data: Option<String>,
    pub checksum: u32,
}

/// A bucket at the last checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BucketState {
    /// Wrapping sum of the checksums of all its ops.
    pub checksum: u32,
    pub count: u64,
    pub last_op_id: u64,
}

/// The store's position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StoreCheckpoint {
    /// The last op id written (0: none).
    pub op_id: u64,
    /// Everything the source sent up to this position is in the store. `None`: no position
    /// of the current slot yet (a new slot's snapshot has not completed).
    pub lsn: Option<Lsn>,
    /// The initial snapshot is complete, so the checkpoint may be served (it stays so while
    /// a re-copy runs: see [`crate::StoreWriter::copy_row`]).
    pub snapshot_complete: bool,
    /// The slot this store's data came from, when walsync created it.
    pub slot_owned: Option<String>,
    /// The first op id after the store was last emptied (for an initial snapshot that starts
    /// over). Readers that saw a checkpoint of an earlier value must start
    /// over: the change log begins again at this op.
    #[serde(default)]
    pub rebuilt_at: u64,
    /// The change log and the lookup history hold what every commit after this op id changed
    /// (older history was pruned, [`crate::BucketStore::prune_history`]): a reader whose last
    /// checkpoint is older cannot diff from it and must start over, as after a rebuild.
    #[serde(default)]
    pub changes_from: u64,
    /// The fingerprint of the sync rules the buckets were built with (`None`: unknown, a store
    /// of an earlier version).
    #[serde(default)]
    pub rules: Option<String>,
}

/// The store's copy of a source row: column names and values (complete, no unchanged-TOAST
/// gaps). The names are shared by every row of a table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredRow {
    pub columns: std::sync::Arc<[String]>,
    pub values: Vec<Value>,
}

/// What commits in a range of op ids touched.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Changes {
    pub buckets: std::collections::BTreeSet<String>,
    pub lookups: std::collections::BTreeSet<LookupKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactStats {
    pub moved: u64,
    pub cleared: u64,
    /// Bytes by which the rewritten op chunks shrank (superseded data dropped, runs merged);
    /// the engine frees them on disk as it compacts its own files.
    pub reclaimed_bytes: u64,
}

/// What the store holds ([`crate::BucketStore::counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreCounts {
    /// Ops kept in all buckets (exact: the buckets' own counts, summed).
    pub ops: u64,
    /// Buckets (exact).
    pub buckets: u64,
    /// Source rows (approximate: from the engine's metadata, deleted rows its own compaction
    /// has not yet dropped still count).
    pub rows: u64,
}

/// One bounded step of compaction ([`crate::BucketStore::compact_batch`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompactBatch {
    pub stats: CompactStats,
    /// Ops read in this step.
    pub ops: u64,
    /// The last bucket compacted: the next step starts after it. `None`: every bucket is done.
    pub next: Option<String>,
}

/// What one step of [`crate::BucketStore::prune_history`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PruneStats {
    /// Change-log entries removed.
    pub changes: u64,
    /// Superseded lookup entries and tombstones removed.
    pub lookups: u64,
    /// Whether history before the op id is now gone (else call again).
    pub done: bool,
}
