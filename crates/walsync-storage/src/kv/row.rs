//! Row copies: a source row's values, its placements in buckets and its lookups.

use serde::{Deserialize, Serialize};
use walsync_types::LookupEntry;

use super::Space;
use super::engine::Read;
use super::keys::schema_key;
use super::record::{Reader, Writer, corrupt, decode, read_lookups, write_lookups};
use crate::{Result, StorageError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Placement {
    pub(super) bucket: String,
    pub(super) object_type: String,
    pub(super) object_id: String,
    pub(super) checksum: u32,
    /// The 128-bit fingerprint of the data put there ([`walsync_types::PutDigest`]), which
    /// decides whether a new PUT changes anything; `None` in records of earlier versions, whose
    /// checksum decides instead until the row is written again.
    #[serde(default)]
    pub(super) fingerprint: Option<u128>,
}

impl Placement {
    /// Whether the row already holds `digest`'s data at `bucket` as `object_type/object_id`.
    pub(super) fn holds(
        &self,
        bucket: &str,
        object_type: &str,
        object_id: &str,
        digest: walsync_types::PutDigest,
    ) -> bool {
        self.bucket == bucket
            && self.object_type == object_type
            && self.object_id == object_id
            && match self.fingerprint {
                Some(f) => f == digest.fingerprint,
                None => self.checksum == digest.checksum,
            }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RowRecord {
    /// The row's column names, by the hash under which they are stored once in `meta`: names
    /// repeated in every row were a third of the bytes written.
    pub(super) s: u64,
    pub(super) v: Vec<walsync_types::Value>,
    pub(super) placements: Vec<Placement>,
    pub(super) lookups: Vec<LookupEntry>,
    /// How many identical rows this record stands for (more than one only for a table without
    /// a key, `REPLICA IDENTITY FULL`, holding duplicates). Records of earlier versions: one.
    #[serde(default = "one")]
    pub(super) copies: u32,
}

fn one() -> u32 {
    1
}

/// Row copies are written for every replicated row: binary, like ops (see [`OP_TAG`]). Records
/// tagged [`ROW_TAG_V1`] (earlier versions) have no fingerprints.
pub(super) const ROW_TAG: u8 = 0xB4;
pub(super) const ROW_TAG_V1: u8 = 0xB2;

impl RowRecord {
    pub(super) fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = Writer::with_capacity(64 + self.v.len() * 16);
        w.u8(ROW_TAG);
        w.u64(self.s);
        w.u32(self.v.len() as u32);
        for v in &self.v {
            w.value(v);
        }
        w.u32(self.placements.len() as u32);
        for p in &self.placements {
            w.str(&p.bucket);
            w.str(&p.object_type);
            w.str(&p.object_id);
            w.u32(p.checksum);
            let f = p.fingerprint.unwrap_or(0);
            w.u64(f as u64);
            w.u64((f >> 64) as u64);
        }
        write_lookups(&mut w, &self.lookups)?;
        w.u32(self.copies);
        Ok(w.0)
    }

    pub(super) fn from_bytes(b: &[u8]) -> Result<RowRecord> {
        if b.first() == Some(&b'{') {
            return decode("row", b);
        }
        let mut r = Reader::new("row", b);
        let fingerprints = match r.u8()? {
            ROW_TAG => true,
            ROW_TAG_V1 => false,
            _ => return Err(corrupt("row", "unknown row record format")),
        };
        let s = r.u64()?;
        let n = r.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(r.value()?);
        }
        let n = r.count()?;
        let mut placements = Vec::with_capacity(n);
        for _ in 0..n {
            let (bucket, object_type, object_id, checksum) =
                (r.str()?, r.str()?, r.str()?, r.u32()?);
            let fingerprint = if fingerprints {
                let low = u128::from(r.u64()?);
                Some(low | (u128::from(r.u64()?) << 64))
            } else {
                None
            };
            placements.push(Placement {
                bucket,
                object_type,
                object_id,
                checksum,
                fingerprint,
            });
        }
        let lookups = read_lookups(&mut r)?;
        let copies = if fingerprints { r.u32()? } else { 1 };
        r.end()?;
        Ok(RowRecord {
            copies,
            s,
            v,
            placements,
            lookups,
        })
    }
}

pub(super) fn names_in(r: &impl Read, id: u64) -> Result<Vec<String>> {
    match r.get(Space::Meta, &schema_key(id))? {
        Some(v) => decode("schema", &v),
        None => Err(StorageError::Corrupt {
            what: "row",
            detail: format!("unknown schema {id:016x}"),
        }),
    }
}
