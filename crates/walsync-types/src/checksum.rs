//! Op and bucket checksums, computed exactly as PowerSync clients expect, so that a client can
//! prove it holds what the server holds.
//!
//! - A PUT's checksum is the first four bytes, read little-endian, of SHA-256 over
//!   `put.<object_type>.<object_id>.<data>`.
//! - A REMOVE's is the same reduction of SHA-256 over `delete.<subkey>`.
//! - MOVE keeps the checksum of the op it replaced; CLEAR carries the wrapping sum of all it
//!   replaced.
//! - A bucket's checksum at a checkpoint is the wrapping `u32` sum of its ops' checksums up to it.

use sha2::{Digest, Sha256};

fn reduce(digest: &[u8]) -> u32 {
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The checksum of a PUT of `data` (the row's JSON text) for `object_type`/`object_id`.
pub fn put_checksum(object_type: &str, object_id: &str, data: &str) -> u32 {
    put_digest(object_type, object_id, data).checksum
}

/// A PUT's checksum and a 128-bit fingerprint of what it puts, from one SHA-256: the 32-bit
/// checksum is what clients verify, but two different rows share one after about 2^16 tries, so
/// "this PUT changes nothing" is decided by the fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutDigest {
    pub checksum: u32,
    pub fingerprint: u128,
}

/// [`put_checksum`] with the fingerprint of the same hash.
pub fn put_digest(object_type: &str, object_id: &str, data: &str) -> PutDigest {
    let mut h = Sha256::new();
    h.update(b"put.");
    h.update(object_type.as_bytes());
    h.update(b".");
    h.update(object_id.as_bytes());
    h.update(b".");
    h.update(data.as_bytes());
    let digest = h.finalize();
    let mut tail = [0u8; 16];
    tail.copy_from_slice(&digest[16..32]);
    PutDigest {
        checksum: reduce(&digest),
        fingerprint: u128::from_le_bytes(tail),
    }
}

/// The checksum of a REMOVE whose subkey is `subkey`.
pub fn remove_checksum(subkey: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(b"delete.");
    h.update(subkey.as_bytes());
    reduce(&h.finalize())
}

/// The wrapping sum of checksums, as buckets add them up.
pub fn add_checksums(a: u32, b: u32) -> u32 {
    a.wrapping_add(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powersync_test_vector() {
        assert_eq!(
            put_checksum("test", "test1", r#"{"id":"test1","description":"test1"}"#),
            2871785649
        );
    }

    #[test]
    fn the_fingerprint_tells_apart_what_the_checksum_cannot() {
        // Find two data texts with one checksum (about 2^16 tries by the birthday bound).
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (0u32..)
            .find_map(|i| {
                let data = format!("{{\"v\":{i}}}");
                let c = put_checksum("t", "1", &data);
                seen.insert(c, data.clone()).map(|other| (other, data))
            })
            .unwrap();
        let (da, db) = (put_digest("t", "1", &a), put_digest("t", "1", &b));
        assert_eq!(da.checksum, db.checksum, "{a} and {b} collide");
        assert_ne!(da.fingerprint, db.fingerprint);
    }

    #[test]
    fn sums_wrap() {
        assert_eq!(add_checksums(u32::MAX, 2), 1);
    }
}
