//! Feeds arbitrary bytes to every decoder the replication stream runs on untrusted input: the
//! CopyData frame decoder, the pgoutput message decoder (inside and outside streamed
//! transactions), and the typed decoding of every tuple value under a type chosen by the input.
//! None may panic; each either decodes or returns an error.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walsync_source::codec::{Message, TupleValue, decode_frame, decode_message};
use walsync_source::datum::{decode_text, decode_tuple_value};
use walsync_types::Lsn;

/// Type oids worth steering towards: every type the datum decoder treats specially.
const TYPES: &[u32] = &[16, 17, 20, 21, 23, 25, 26, 114, 700, 701, 1007, 1009, 1016, 1184, 1700, 2950, 3802, 3807, 0];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let bytes = Bytes::copy_from_slice(rest);
    let _ = decode_frame(bytes.clone());
    let type_oid = TYPES[usize::from(selector) % TYPES.len()];
    let _ = decode_text(type_oid, rest);
    for in_stream in [false, true] {
        if let Ok(msg) = decode_message(Lsn(1), bytes.clone(), in_stream) {
            // Whatever decodes must survive encoding and decoding again unchanged. (Bytes may
            // differ: a flags byte of 3 means "key" as 1 does.)
            let again = decode_message(Lsn(1), msg.encode(), in_stream);
            assert_eq!(again.as_ref(), Ok(&msg), "roundtrip of {msg:?}");
            let tuples: Vec<&TupleValue> = match &msg {
                Message::Insert { new, .. } => new.iter().collect(),
                Message::Update { new, key, old, .. } => {
                    new.iter().chain(key.iter().flatten()).chain(old.iter().flatten()).collect()
                }
                Message::Delete { key, old, .. } => key.iter().flatten().chain(old.iter().flatten()).collect(),
                _ => Vec::new(),
            };
            for v in tuples {
                let _ = decode_tuple_value(type_oid, v);
            }
        }
    }
});
