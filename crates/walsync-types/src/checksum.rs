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
    let mut h = Sha256::new();
    h.update(b"put.");
    h.update(object_type.as_bytes());
    h.update(b".");
    h.update(object_id.as_bytes());
    h.update(b".");
    h.update(data.as_bytes());
    reduce(&h.finalize())
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
    fn sums_wrap() {
        assert_eq!(add_checksums(u32::MAX, 2), 1);
    }
}
