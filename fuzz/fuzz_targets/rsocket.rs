//! Feeds arbitrary bytes to the RSocket frame decoder, as a WebSocket client's messages reach
//! it. None may panic; a frame that decodes encodes to bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walsync_protocol::rsocket::{Frame, decode};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        let again = Frame::decode(&frame.encode()).expect("an encoded frame decodes");
        assert_eq!(again, frame);
        if let Frame::Setup(s) = &frame {
            let _ = decode::<serde_json::Value>(&s.metadata_mime, s.metadata.as_deref().unwrap_or(&[]));
            let _ = decode::<walsync_protocol::SyncRequest>(&s.data_mime, &s.data);
        }
    }
});
