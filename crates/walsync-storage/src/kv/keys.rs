//! The keys of the store's keyspaces: ordered bytes, `part 0x00 rest`. No part before a 0x00
//! contains one: bucket ids and lookup keys are JSON text, table names are identifiers.

use std::borrow::Cow;

use sha2::{Digest, Sha256};
use walsync_types::RowId;

pub(super) fn key2(a: &str, b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b);
    k
}

pub(super) fn op_key(bucket: &str, op_id: u64) -> Vec<u8> {
    key2(bucket, &op_id.to_be_bytes())
}

/// How row ids are written in the keys of `rows`. A row id is the JSON array of the text of its
/// key columns; ordered as text, the keys of a growing integer key (`["999"]`, `["1000"]`)
/// scatter over the whole keyspace, so every compaction of `rows` rewrote all of it. Stores
/// made since keep a single integer key as a tag byte and its 8 bytes in numeric order (a text
/// row id starts with `[`, so the two never meet); stores made before keep text keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowKeys {
    Text,
    Ordered,
}

pub(super) const ROW_KEYS: &[u8] = b"row_keys";
pub(super) const ORDERED_ROW_KEYS: &[u8] = b"ordered-int-1";
const INT_ROW_ID: u8 = 0x01;

/// Row ids longer than this are keyed by their SHA-256, in every store: the row id of a
/// `REPLICA IDENTITY FULL` table is the whole row, and the engine refuses keys over 64 KiB (it
/// panicked, at every restart, on the same row). 512 bytes keeps every ordinary key readable.
const LONG_ROW_ID: usize = 512;
/// The tag of a hashed row id in a key (a text row id starts with `[`).
const HASHED_ROW_ID: u8 = 0x02;

fn row_id_hash(row_id: &RowId) -> [u8; 32] {
    Sha256::digest(row_id.as_str().as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RowKeys {
    pub(super) fn key(self, table: &str, row_id: &RowId) -> Vec<u8> {
        if row_id.as_str().len() > LONG_ROW_ID {
            let mut b = [HASHED_ROW_ID; 33];
            b[1..].copy_from_slice(&row_id_hash(row_id));
            return key2(table, &b);
        }
        match (self, row_id.as_int()) {
            (RowKeys::Ordered, Some(i)) => {
                let mut b = [INT_ROW_ID; 9];
                b[1..].copy_from_slice(&((i as u64) ^ (1 << 63)).to_be_bytes());
                key2(table, &b)
            }
            _ => key2(table, row_id.as_str().as_bytes()),
        }
    }

    /// How the lookups of a row name it (after `table/`): its id, or for a long one `#` and the
    /// hex of the hash it is keyed by.
    pub(super) fn label(row_id: &RowId) -> Cow<'_, str> {
        if row_id.as_str().len() > LONG_ROW_ID {
            Cow::Owned(format!("#{}", hex(&row_id_hash(row_id))))
        } else {
            Cow::Borrowed(row_id.as_str())
        }
    }

    /// [`RowKeys::label`] of the row whose key of `rows` ends in `part` (the part after the
    /// table).
    pub(super) fn label_of(self, part: &[u8]) -> String {
        match part {
            [HASHED_ROW_ID, hash @ ..] if hash.len() == 32 => format!("#{}", hex(hash)),
            _ => self.row_id(part).as_str().to_owned(),
        }
    }

    /// The row id in a key of `rows`, from the part after the table.
    pub(super) fn row_id(self, part: &[u8]) -> RowId {
        match part {
            [INT_ROW_ID, n @ ..] if self == RowKeys::Ordered && n.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(n);
                RowId::from_int((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
            }
            _ => RowId::from_encoded(String::from_utf8_lossy(part)),
        }
    }
}

pub(super) fn lookup_key(lookup: &str, op_id: u64, row: &str) -> Vec<u8> {
    let mut k = key2(lookup, &op_id.to_be_bytes());
    k.extend_from_slice(row.as_bytes());
    k
}

pub(super) fn op_id_of(key: &[u8]) -> u64 {
    let n = key.len();
    let mut b = [0u8; 8];
    if n >= 8 {
        b.copy_from_slice(&key[n - 8..]);
    }
    u64::from_be_bytes(b)
}

/// FNV-1a over the column names: a stable id for a table's column list.
pub(super) fn schema_id(columns: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for c in columns {
        for b in c.as_bytes().iter().chain([0u8].iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

pub(super) fn schema_key(id: u64) -> Vec<u8> {
    format!("schema:{id:016x}").into_bytes()
}
