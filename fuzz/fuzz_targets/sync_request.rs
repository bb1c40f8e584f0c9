//! Feeds arbitrary bytes to the sync request parsers of both transports: the JSON body of
//! `POST /sync/stream` and the protobuf `SyncRequest` of gRPC with its conversion (which parses
//! `parameters_json`). None may panic; each either parses or returns an error, and what parses
//! from JSON survives writing and reading again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use walsync_protocol::{SyncRequest, pb};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<SyncRequest>(data) {
        let text = serde_json::to_vec(&request).expect("a parsed request serialises");
        let again: SyncRequest = serde_json::from_slice(&text).expect("and parses again");
        assert_eq!(again, request);
    }
    if let Ok(message) = pb::SyncRequest::decode(data) {
        let _ = SyncRequest::try_from(message);
    }
});
