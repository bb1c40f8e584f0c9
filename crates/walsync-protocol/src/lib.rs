//! The sync protocol's vocabulary, shared by the server and the client.
//!
//! One set of types, [`Line`] and [`SyncRequest`], with two encodings:
//! - **JSON** (the HTTP stream, one line per object, PowerSync-compatible): op ids are strings,
//!   row data is the row's JSON text, each line an object with exactly one key;
//! - **protobuf** ([`pb`], the gRPC stream): op ids are `u64`, row data the same JSON text as
//!   bytes, so checksums are the same on both transports.
//!
//! The conversions between them are total in one direction ([`Line`] → [`pb::SyncLine`]) and
//! checked in the other.

use serde::{Deserialize, Serialize};
pub use walsync_types::{BucketReason, OpKind, StreamDescription, StreamError};

/// The generated protobuf messages and gRPC service of `proto/walsync/v1/sync.proto`.
#[allow(missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod pb {
    tonic::include_proto!("walsync.v1");
}

pub mod rsocket;
pub mod upload;

/// The default priority of a bucket (PowerSync's).
pub const DEFAULT_PRIORITY: u32 = 3;

/// A client's request to open a sync stream (`POST /sync/stream` body).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncRequest {
    /// The buckets the client holds, with the last op id of each.
    pub buckets: Vec<BucketRequest>,
    pub client_id: Option<String>,
    /// Client parameters (`request.parameters()`; untrusted).
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Accepted for compatibility; data is always sent as JSON text.
    pub raw_data: Option<bool>,
    /// Accepted for compatibility; checksums are always sent.
    pub include_checksum: Option<bool>,
    /// Accepted for compatibility; NDJSON is always sent.
    pub binary_data: Option<bool>,
    /// Sync Streams: whether the default streams are included, and the streams the client
    /// subscribed to. Absent: the default streams.
    pub streams: Option<StreamsRequest>,
}

/// The `streams` object of a sync request (PowerSync's Sync Streams).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamsRequest {
    /// Absent or null: true.
    #[serde(default)]
    pub include_defaults: Option<bool>,
    #[serde(default)]
    pub subscriptions: Vec<RequestedSubscription>,
}

/// One subscription as the client sends it; its parameters and priority are checked per
/// subscription (a bad one is reported on its stream and fails nothing else).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestedSubscription {
    pub stream: String,
    #[serde(default)]
    pub parameters: serde_json::Value,
    #[serde(default)]
    pub override_priority: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRequest {
    pub name: String,
    #[serde(with = "op_id")]
    pub after: u64,
}

/// One line of a sync stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    Checkpoint(Checkpoint),
    CheckpointDiff(CheckpointDiff),
    Data(DataPage),
    CheckpointComplete(CheckpointComplete),
    PartialCheckpointComplete(PartialCheckpointComplete),
    /// Seconds until the client's token expires.
    TokenExpiresIn(i64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    #[serde(with = "op_id")]
    pub last_op_id: u64,
    #[serde(with = "opt_op_id", default, skip_serializing_if = "Option::is_none")]
    pub write_checkpoint: Option<u64>,
    pub buckets: Vec<BucketChecksum>,
    /// The streams the request involves, with the subscriptions that could not be resolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StreamDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDiff {
    #[serde(with = "op_id")]
    pub last_op_id: u64,
    #[serde(with = "opt_op_id", default, skip_serializing_if = "Option::is_none")]
    pub write_checkpoint: Option<u64>,
    pub updated_buckets: Vec<BucketChecksum>,
    pub removed_buckets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketChecksum {
    pub bucket: String,
    /// Wrapping sum of the bucket's op checksums up to the checkpoint.
    pub checksum: u32,
    pub count: u64,
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Why the client holds the bucket (streams only; empty for bucket definitions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<BucketReason>,
}

fn default_priority() -> u32 {
    DEFAULT_PRIORITY
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPage {
    pub bucket: String,
    pub data: Vec<OpLine>,
    pub has_more: bool,
    #[serde(with = "op_id")]
    pub after: u64,
    #[serde(with = "op_id")]
    pub next_after: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpLine {
    #[serde(with = "op_id")]
    pub op_id: u64,
    pub op: OpKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subkey: Option<String>,
    /// The row's JSON text, for PUT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    pub checksum: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointComplete {
    #[serde(with = "op_id")]
    pub last_op_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialCheckpointComplete {
    #[serde(with = "op_id")]
    pub last_op_id: u64,
    pub priority: u32,
}

/// `GET /write-checkpoint2.json` answer: `{"data":{"write_checkpoint":"N"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCheckpointResponse {
    pub data: WriteCheckpointData,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCheckpointData {
    #[serde(with = "op_id")]
    pub write_checkpoint: u64,
}

/// An error answer of the HTTP API: `{"error":{"code":"...","message":"..."}}`; the code is
/// stable, the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// A protobuf line the JSON side cannot express.
#[derive(Debug, thiserror::Error)]
#[error("invalid sync line: {0}")]
pub struct InvalidLine(&'static str);

impl Line {
    /// The line as one NDJSON line, newline included.
    pub fn to_ndjson(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(match self {
            Line::Data(d) => d
                .data
                .iter()
                .map(|o| 96 + o.data.as_ref().map_or(0, |d| d.len() + d.len() / 4))
                .sum(),
            _ => 256,
        });
        if serde_json::to_writer(&mut out, self).is_err() {
            out.clear();
        }
        out.push(b'\n');
        out
    }

    /// The line as one BSON document (for `application/vnd.powersync.bson-stream`): the same
    /// fields and values as its NDJSON line (op ids stay decimal strings, a row's data stays its
    /// JSON text), each document prefixed by its length as BSON is, so the stream needs no
    /// separator.
    pub fn to_bson(&self) -> Vec<u8> {
        bson::serialize_to_vec(self).unwrap_or_default()
    }

    /// A line from one BSON document of a BSON stream.
    pub fn from_bson(document: &[u8]) -> Result<Line, InvalidLine> {
        bson::deserialize_from_slice(document).map_err(|_| InvalidLine("not a sync line in BSON"))
    }
}

/// The response encodings of the sync stream.
pub const NDJSON: &str = "application/x-ndjson";
pub const BSON_STREAM: &str = "application/vnd.powersync.bson-stream";

/// Whether an `Accept` header prefers the BSON stream to NDJSON (PowerSync's clients send
/// `application/vnd.powersync.bson-stream;q=0.9,application/x-ndjson;q=0.8`). Without the BSON
/// type, or with NDJSON weighted at least as high, the answer is NDJSON.
pub fn prefers_bson(accept: &str) -> bool {
    let weight = |wanted: &str| {
        accept
            .split(',')
            .filter_map(|range| {
                let mut parts = range.split(';');
                let media = parts.next()?.trim();
                if !media.eq_ignore_ascii_case(wanted) {
                    return None;
                }
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .find_map(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0);
                Some(q)
            })
            .reduce(f32::max)
    };
    match (weight(BSON_STREAM), weight(NDJSON)) {
        (Some(b), Some(n)) => b > 0.0 && b > n,
        (Some(b), None) => b > 0.0,
        _ => false,
    }
}

/// Op ids travel as decimal strings in JSON (they may exceed 2^53); numbers are accepted too.
mod op_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        S(String),
        N(u64),
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Either::deserialize(d)? {
            Either::N(n) => Ok(n),
            Either::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

mod opt_op_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::op_id")] u64);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

fn checksums_to_pb(v: Vec<BucketChecksum>) -> Vec<pb::BucketChecksum> {
    v.into_iter()
        .map(|b| pb::BucketChecksum {
            bucket: b.bucket,
            checksum: b.checksum,
            count: b.count,
            priority: b.priority,
            subscriptions: b
                .subscriptions
                .into_iter()
                .map(|r| pb::BucketReason {
                    reason: Some(match r {
                        BucketReason::Default { default } => {
                            pb::bucket_reason::Reason::DefaultStream(default)
                        }
                        BucketReason::Subscription { sub } => {
                            pb::bucket_reason::Reason::Subscription(sub)
                        }
                    }),
                })
                .collect(),
        })
        .collect()
}

fn checksums_from_pb(v: Vec<pb::BucketChecksum>) -> Vec<BucketChecksum> {
    v.into_iter()
        .map(|b| BucketChecksum {
            bucket: b.bucket,
            checksum: b.checksum,
            count: b.count,
            priority: b.priority,
            subscriptions: b
                .subscriptions
                .into_iter()
                .filter_map(|r| match r.reason? {
                    pb::bucket_reason::Reason::DefaultStream(default) => {
                        Some(BucketReason::Default { default })
                    }
                    pb::bucket_reason::Reason::Subscription(sub) => {
                        Some(BucketReason::Subscription { sub })
                    }
                })
                .collect(),
        })
        .collect()
}

impl From<OpKind> for pb::OpKind {
    fn from(k: OpKind) -> pb::OpKind {
        match k {
            OpKind::Put => pb::OpKind::Put,
            OpKind::Remove => pb::OpKind::Remove,
            OpKind::Move => pb::OpKind::Move,
            OpKind::Clear => pb::OpKind::Clear,
        }
    }
}

impl From<Line> for pb::SyncLine {
    fn from(line: Line) -> pb::SyncLine {
        use pb::sync_line::Line as L;
        let l = match line {
            Line::Checkpoint(c) => L::Checkpoint(pb::Checkpoint {
                last_op_id: c.last_op_id,
                write_checkpoint: c.write_checkpoint,
                buckets: checksums_to_pb(c.buckets),
                streams: c
                    .streams
                    .into_iter()
                    .map(|s| pb::StreamDescription {
                        name: s.name,
                        is_default: s.is_default,
                        errors: s
                            .errors
                            .into_iter()
                            .map(|e| pb::StreamError {
                                subscription: e.subscription,
                                message: e.message,
                            })
                            .collect(),
                    })
                    .collect(),
            }),
            Line::CheckpointDiff(c) => L::CheckpointDiff(pb::CheckpointDiff {
                last_op_id: c.last_op_id,
                write_checkpoint: c.write_checkpoint,
                updated_buckets: checksums_to_pb(c.updated_buckets),
                removed_buckets: c.removed_buckets,
            }),
            Line::Data(d) => L::Data(pb::Data {
                bucket: d.bucket,
                data: d
                    .data
                    .into_iter()
                    .map(|o| pb::Op {
                        op_id: o.op_id,
                        op: pb::OpKind::from(o.op) as i32,
                        object_type: o.object_type.unwrap_or_default(),
                        object_id: o.object_id.unwrap_or_default(),
                        subkey: o.subkey.unwrap_or_default(),
                        data: o.data.map(String::into_bytes),
                        checksum: o.checksum,
                    })
                    .collect(),
                has_more: d.has_more,
                after: d.after,
                next_after: d.next_after,
            }),
            Line::CheckpointComplete(c) => L::CheckpointComplete(pb::CheckpointComplete {
                last_op_id: c.last_op_id,
            }),
            Line::PartialCheckpointComplete(c) => {
                L::PartialCheckpointComplete(pb::PartialCheckpointComplete {
                    last_op_id: c.last_op_id,
                    priority: c.priority,
                })
            }
            Line::TokenExpiresIn(s) => L::TokenExpiresIn(s),
        };
        pb::SyncLine { line: Some(l) }
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl TryFrom<pb::SyncLine> for Line {
    type Error = InvalidLine;

    fn try_from(line: pb::SyncLine) -> Result<Line, InvalidLine> {
        use pb::sync_line::Line as L;
        Ok(match line.line.ok_or(InvalidLine("empty line"))? {
            L::Checkpoint(c) => Line::Checkpoint(Checkpoint {
                last_op_id: c.last_op_id,
                write_checkpoint: c.write_checkpoint,
                buckets: checksums_from_pb(c.buckets),
                streams: c
                    .streams
                    .into_iter()
                    .map(|s| StreamDescription {
                        name: s.name,
                        is_default: s.is_default,
                        errors: s
                            .errors
                            .into_iter()
                            .map(|e| StreamError {
                                subscription: e.subscription,
                                message: e.message,
                            })
                            .collect(),
                    })
                    .collect(),
            }),
            L::CheckpointDiff(c) => Line::CheckpointDiff(CheckpointDiff {
                last_op_id: c.last_op_id,
                write_checkpoint: c.write_checkpoint,
                updated_buckets: checksums_from_pb(c.updated_buckets),
                removed_buckets: c.removed_buckets,
            }),
            L::Data(d) => {
                let mut data = Vec::with_capacity(d.data.len());
                for o in d.data {
                    let op = match pb::OpKind::try_from(o.op) {
                        Ok(pb::OpKind::Put) => OpKind::Put,
                        Ok(pb::OpKind::Remove) => OpKind::Remove,
                        Ok(pb::OpKind::Move) => OpKind::Move,
                        Ok(pb::OpKind::Clear) => OpKind::Clear,
                        _ => return Err(InvalidLine("unknown op kind")),
                    };
                    let data_text = match o.data {
                        Some(b) => Some(
                            String::from_utf8(b).map_err(|_| InvalidLine("row data not utf-8"))?,
                        ),
                        None => None,
                    };
                    data.push(OpLine {
                        op_id: o.op_id,
                        op,
                        object_type: non_empty(o.object_type),
                        object_id: non_empty(o.object_id),
                        subkey: non_empty(o.subkey),
                        data: data_text,
                        checksum: o.checksum,
                    });
                }
                Line::Data(DataPage {
                    bucket: d.bucket,
                    data,
                    has_more: d.has_more,
                    after: d.after,
                    next_after: d.next_after,
                })
            }
            L::CheckpointComplete(c) => Line::CheckpointComplete(CheckpointComplete {
                last_op_id: c.last_op_id,
            }),
            L::PartialCheckpointComplete(c) => {
                Line::PartialCheckpointComplete(PartialCheckpointComplete {
                    last_op_id: c.last_op_id,
                    priority: c.priority,
                })
            }
            L::TokenExpiresIn(s) => Line::TokenExpiresIn(s),
        })
    }
}

impl From<SyncRequest> for pb::SyncRequest {
    fn from(r: SyncRequest) -> pb::SyncRequest {
        pb::SyncRequest {
            buckets: r
                .buckets
                .into_iter()
                .map(|b| pb::BucketRequest {
                    name: b.name,
                    after: b.after,
                })
                .collect(),
            client_id: r.client_id.unwrap_or_default(),
            parameters_json: if r.parameters.is_empty() {
                String::new()
            } else {
                serde_json::Value::Object(r.parameters).to_string()
            },
            streams: r.streams.map(|s| pb::StreamsRequest {
                include_defaults: s.include_defaults,
                subscriptions: s
                    .subscriptions
                    .into_iter()
                    .map(|sub| pb::StreamSubscription {
                        stream: sub.stream,
                        parameters_json: if sub.parameters.is_null() {
                            String::new()
                        } else {
                            sub.parameters.to_string()
                        },
                        override_priority: sub
                            .override_priority
                            .as_u64()
                            .and_then(|p| u32::try_from(p).ok()),
                    })
                    .collect(),
            }),
        }
    }
}

impl TryFrom<pb::SyncRequest> for SyncRequest {
    type Error = InvalidLine;

    fn try_from(r: pb::SyncRequest) -> Result<SyncRequest, InvalidLine> {
        let parameters = if r.parameters_json.is_empty() {
            serde_json::Map::new()
        } else {
            match serde_json::from_str(&r.parameters_json) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => return Err(InvalidLine("parameters_json is not a json object")),
            }
        };
        Ok(SyncRequest {
            buckets: r
                .buckets
                .into_iter()
                .map(|b| BucketRequest {
                    name: b.name,
                    after: b.after,
                })
                .collect(),
            client_id: non_empty(r.client_id),
            parameters,
            streams: match r.streams {
                None => None,
                Some(s) => Some(StreamsRequest {
                    include_defaults: s.include_defaults,
                    subscriptions: s
                        .subscriptions
                        .into_iter()
                        .map(|sub| {
                            Ok(RequestedSubscription {
                                stream: sub.stream,
                                parameters: if sub.parameters_json.is_empty() {
                                    serde_json::Value::Null
                                } else {
                                    serde_json::from_str(&sub.parameters_json).map_err(|_| {
                                        InvalidLine("a subscription's parameters_json is not json")
                                    })?
                                },
                                override_priority: sub
                                    .override_priority
                                    .map_or(serde_json::Value::Null, serde_json::Value::from),
                            })
                        })
                        .collect::<Result<_, InvalidLine>>()?,
                }),
            },
            ..SyncRequest::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_lines() -> Vec<Line> {
        vec![
            Line::Checkpoint(Checkpoint {
                streams: Vec::new(),
                last_op_id: 12,
                write_checkpoint: Some(u64::MAX),
                buckets: vec![BucketChecksum {
                    subscriptions: Vec::new(),
                    bucket: "p[1]".into(),
                    checksum: 2871785649,
                    count: 3,
                    priority: 1,
                }],
            }),
            Line::CheckpointDiff(CheckpointDiff {
                last_op_id: 13,
                write_checkpoint: None,
                updated_buckets: vec![],
                removed_buckets: vec!["p[2]".into()],
            }),
            Line::Data(DataPage {
                bucket: "p[1]".into(),
                data: vec![
                    OpLine {
                        op_id: 5,
                        op: OpKind::Put,
                        object_type: Some("t".into()),
                        object_id: Some("1".into()),
                        subkey: None,
                        data: Some(r#"{"id":"1"}"#.into()),
                        checksum: 7,
                    },
                    OpLine {
                        op_id: 6,
                        op: OpKind::Clear,
                        object_type: None,
                        object_id: None,
                        subkey: None,
                        data: None,
                        checksum: 9,
                    },
                ],
                has_more: true,
                after: 4,
                next_after: 6,
            }),
            Line::CheckpointComplete(CheckpointComplete { last_op_id: 13 }),
            Line::PartialCheckpointComplete(PartialCheckpointComplete {
                last_op_id: 13,
                priority: 1,
            }),
            Line::TokenExpiresIn(30),
        ]
    }

    #[test]
    fn json_lines_have_one_key_and_string_op_ids() {
        for line in sample_lines() {
            let text = line.to_ndjson();
            assert_eq!(text.last(), Some(&b'\n'));
            let v: serde_json::Value = serde_json::from_slice(&text).expect("json");
            assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
            let back: Line = serde_json::from_slice(&text).expect("parse back");
            assert_eq!(back, line);
        }
        let text = String::from_utf8(sample_lines()[0].to_ndjson()).expect("utf-8");
        assert!(text.contains(r#""last_op_id":"12""#), "{text}");
        assert!(text.contains(r#""write_checkpoint":"18446744073709551615""#));
    }

    #[test]
    fn protobuf_round_trip_is_lossless() {
        for line in sample_lines() {
            let pb_line = pb::SyncLine::from(line.clone());
            assert_eq!(Line::try_from(pb_line).expect("convert"), line);
        }
    }

    #[test]
    fn powersync_request_bodies_parse() {
        let body = r#"{"buckets":[{"name":"p[1]","after":"42"}],"include_checksum":true,
            "raw_data":true,"binary_data":false,"client_id":"c1","parameters":{"x":1},
            "streams":{"include_defaults":true},"app_metadata":{}}"#;
        let r: SyncRequest = serde_json::from_str(body).expect("parse");
        assert_eq!(r.buckets[0].after, 42);
        assert_eq!(r.client_id.as_deref(), Some("c1"));
        let back = SyncRequest::try_from(pb::SyncRequest::from(r.clone())).expect("pb");
        assert_eq!(back.buckets, r.buckets);
        assert_eq!(back.parameters, r.parameters);
    }

    #[test]
    fn bad_protobuf_lines_are_rejected() {
        assert!(Line::try_from(pb::SyncLine { line: None }).is_err());
        let bad = pb::SyncRequest {
            parameters_json: "[1]".into(),
            ..Default::default()
        };
        assert!(SyncRequest::try_from(bad).is_err());
    }
}

#[cfg(test)]
mod bson_tests {
    use super::*;

    #[test]
    fn the_accept_header_picks_bson_only_when_preferred() {
        assert!(prefers_bson(
            "application/vnd.powersync.bson-stream;q=0.9,application/x-ndjson;q=0.8"
        ));
        assert!(prefers_bson("application/vnd.powersync.bson-stream"));
        assert!(!prefers_bson("application/x-ndjson"));
        assert!(!prefers_bson(""));
        assert!(!prefers_bson("*/*"));
        assert!(!prefers_bson(
            "application/vnd.powersync.bson-stream;q=0.5, application/x-ndjson"
        ));
        assert!(!prefers_bson("application/vnd.powersync.bson-stream;q=0"));
    }

    /// Every kind of line means the same in BSON as in JSON: decoded back it is the same line,
    /// and as JSON the same document (op ids as strings, data as text, big counts and checksums).
    #[test]
    fn lines_in_bson_equal_their_json() {
        let lines = [
            Line::Checkpoint(Checkpoint {
                streams: Vec::new(),
                last_op_id: u64::MAX >> 1,
                write_checkpoint: Some(7),
                buckets: vec![BucketChecksum {
                    subscriptions: Vec::new(),
                    bucket: "user_projects[\"ü\"]".into(),
                    checksum: u32::MAX,
                    count: 1 << 40,
                    priority: 3,
                }],
            }),
            Line::CheckpointDiff(CheckpointDiff {
                last_op_id: 9,
                write_checkpoint: None,
                updated_buckets: vec![],
                removed_buckets: vec!["gone".into()],
            }),
            Line::Data(DataPage {
                bucket: "b".into(),
                data: vec![
                    OpLine {
                        op_id: 12,
                        op: OpKind::Put,
                        object_type: Some("t".into()),
                        object_id: Some("1".into()),
                        subkey: None,
                        data: Some(r#"{"n": 12345678901234567890123, "s": "\ud83d\ude00"}"#.into()),
                        checksum: 4_000_000_000,
                    },
                    OpLine {
                        op_id: 13,
                        op: OpKind::Remove,
                        object_type: Some("t".into()),
                        object_id: Some("2".into()),
                        subkey: None,
                        data: None,
                        checksum: 1,
                    },
                ],
                has_more: true,
                after: 11,
                next_after: 13,
            }),
            Line::CheckpointComplete(CheckpointComplete { last_op_id: 9 }),
            Line::PartialCheckpointComplete(PartialCheckpointComplete {
                last_op_id: 9,
                priority: 1,
            }),
            Line::TokenExpiresIn(-5),
        ];
        for line in lines {
            let bson = line.to_bson();
            assert_eq!(
                u32::from_le_bytes(bson[..4].try_into().expect("length")) as usize,
                bson.len(),
                "a document carries its length"
            );
            assert_eq!(Line::from_bson(&bson).expect("decodes"), line);
            let as_json: serde_json::Value =
                serde_json::from_slice(&line.to_ndjson()).expect("json");
            let document: serde_json::Value =
                bson::deserialize_from_slice(&bson).expect("a document");
            assert_eq!(document, as_json, "{line:?}");
        }
    }
}
