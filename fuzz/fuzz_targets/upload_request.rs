//! Feeds arbitrary bytes to the upload request parsers of both transports: the JSON body of
//! `POST /write` and the protobuf `UploadRequest` of gRPC with its conversion (which parses
//! `data_json` and `old_json`). None may panic; what parses survives the trip to the other
//! encoding and back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use walsync_protocol::pb;
use walsync_protocol::upload::UploadRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<UploadRequest>(data) {
        let text = serde_json::to_vec(&request).expect("a parsed request serialises");
        let again: UploadRequest = serde_json::from_slice(&text).expect("and parses again");
        assert_eq!(again, request);
        let back = UploadRequest::try_from(pb::UploadRequest::from(request.clone()))
            .expect("protobuf of a parsed request converts back");
        assert_eq!(back, request);
    }
    if let Ok(message) = pb::UploadRequest::decode(data) {
        let _ = UploadRequest::try_from(message);
    }
});
