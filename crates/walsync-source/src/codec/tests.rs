use bytes::Bytes;
use proptest::prelude::*;
use walsync_types::{Lsn, PgTimestamp};

use super::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_ é]{0,12}"
}

fn tuple_value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|v| TupleValue::Text(Bytes::from(v))),
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|v| TupleValue::Binary(Bytes::from(v))),
    ]
}

fn tuple() -> impl Strategy<Value = Tuple> {
    proptest::collection::vec(tuple_value(), 0..8)
}

fn relation() -> impl Strategy<Value = Relation> {
    let column = (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| Column {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    );
    let identity = prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ];
    (
        any::<u32>(),
        name(),
        name(),
        identity,
        proptest::collection::vec(column, 0..6),
    )
        .prop_map(
            |(oid, namespace, name, replica_identity, columns)| Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            },
        )
}

/// A message and whether it is to be decoded as part of a streamed transaction.
fn message() -> impl Strategy<Value = (Message, bool)> {
    let lsn = any::<u64>().prop_map(Lsn);
    let ts = any::<i64>().prop_map(PgTimestamp);
    let xid = proptest::option::of(any::<u32>());
    prop_oneof![
        (lsn.clone(), ts.clone(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| (
            Message::Begin {
                final_lsn,
                commit_time,
                xid
            },
            false
        )),
        (any::<u8>(), lsn.clone(), lsn.clone(), ts.clone()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| (
                Message::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time
                },
                false
            )
        ),
        (lsn.clone(), name())
            .prop_map(|(commit_lsn, name)| (Message::Origin { commit_lsn, name }, false)),
        (xid.clone(), relation())
            .prop_map(|(xid, relation)| (Message::Relation { xid, relation }, xid.is_some())),
        (xid.clone(), any::<u32>(), name(), name()).prop_map(|(xid, oid, namespace, name)| (
            Message::Type {
                xid,
                oid,
                namespace,
                name
            },
            xid.is_some()
        )),
        (xid.clone(), any::<u32>(), tuple()).prop_map(|(xid, relation, new)| (
            Message::Insert { xid, relation, new },
            xid.is_some()
        )),
        (xid.clone(), any::<u32>(), 0..3u8, tuple(), tuple()).prop_map(
            |(xid, relation, which, before, new)| {
                let (key, old) = match which {
                    0 => (None, None),
                    1 => (Some(before), None),
                    _ => (None, Some(before)),
                };
                (
                    Message::Update {
                        xid,
                        relation,
                        key,
                        old,
                        new,
                    },
                    xid.is_some(),
                )
            }
        ),
        (xid.clone(), any::<u32>(), any::<bool>(), tuple()).prop_map(
            |(xid, relation, by_key, t)| {
                let (key, old) = if by_key {
                    (Some(t), None)
                } else {
                    (None, Some(t))
                };
                (
                    Message::Delete {
                        xid,
                        relation,
                        key,
                        old,
                    },
                    xid.is_some(),
                )
            }
        ),
        (
            xid.clone(),
            any::<u8>(),
            proptest::collection::vec(any::<u32>(), 0..5)
        )
            .prop_map(|(xid, options, relations)| (
                Message::Truncate {
                    xid,
                    options,
                    relations
                },
                xid.is_some()
            )),
        (
            xid,
            any::<bool>(),
            lsn.clone(),
            name(),
            proptest::collection::vec(any::<u8>(), 0..30)
        )
            .prop_map(|(xid, transactional, lsn, prefix, content)| (
                Message::Message {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content: Bytes::from(content)
                },
                xid.is_some()
            )),
        (any::<u32>(), any::<bool>())
            .prop_map(|(xid, first_segment)| (Message::StreamStart { xid, first_segment }, false)),
        Just((Message::StreamStop, true)),
        (any::<u32>(), any::<u8>(), lsn.clone(), lsn, ts).prop_map(
            |(xid, flags, commit_lsn, end_lsn, commit_time)| (
                Message::StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time
                },
                false
            )
        ),
        (any::<u32>(), any::<u32>())
            .prop_map(|(xid, subxid)| (Message::StreamAbort { xid, subxid }, false)),
    ]
}

proptest! {
    #[test]
    fn every_message_roundtrips((msg, in_stream) in message()) {
        let bytes = msg.encode();
        prop_assert_eq!(decode_message(Lsn(7), bytes, in_stream), Ok(msg));
    }

    #[test]
    fn every_truncation_is_an_error_naming_the_lsn((msg, in_stream) in message(), cut in any::<prop::sample::Index>()) {
        let bytes = msg.encode();
        let n = cut.index(bytes.len());
        if let Err(e) = decode_message(Lsn(99), bytes.slice(..n), in_stream) {
            prop_assert_eq!(e.lsn, Lsn(99));
        } else {
            // A prefix can only decode when the message has a variable-length tail that ended
            // at a field boundary, which pgoutput messages do not: every prefix must fail.
            prop_assert!(false, "prefix of {} bytes decoded", n);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), in_stream: bool) {
        let _ = decode_message(Lsn(1), Bytes::from(data.clone()), in_stream);
        let _ = decode_frame(Bytes::from(data));
    }

    #[test]
    fn trailing_bytes_are_rejected((msg, in_stream) in message(), extra in 1..4usize) {
        let mut v = msg.encode().to_vec();
        v.extend(std::iter::repeat_n(0u8, extra));
        prop_assert!(decode_message(Lsn(1), Bytes::from(v), in_stream).is_err());
    }
}

#[test]
fn decodes_a_real_insert() {
    // An insert as PostgreSQL 15 sends it for `INSERT INTO t VALUES (1, 'a', NULL)`.
    let raw: &[u8] = b"I\0\0@\x01N\0\x03t\0\0\0\x011t\0\0\0\x01an";
    let msg = decode_message(Lsn(1), Bytes::from_static(raw), false).expect("decodes");
    assert_eq!(
        msg,
        Message::Insert {
            xid: None,
            relation: 0x4001,
            new: vec![
                TupleValue::Text(Bytes::from_static(b"1")),
                TupleValue::Text(Bytes::from_static(b"a")),
                TupleValue::Null
            ],
        }
    );
}

#[test]
fn unknown_tags_are_named() {
    let e = decode_message(Lsn(5), Bytes::from_static(b"Z"), false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "malformed replication message at lsn 0/5: unknown pgoutput message tag 'Z'"
    );
    let e = decode_message(Lsn(5), Bytes::from_static(b"I\0\0\0\x01X"), false).unwrap_err();
    assert!(matches!(
        e.kind,
        CodecErrorKind::UnknownTag {
            what: "insert tuple marker",
            ..
        }
    ));
}
