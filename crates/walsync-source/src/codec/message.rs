//! pgoutput logical messages (protocol versions 1 and 2).

use bytes::{BufMut, Bytes, BytesMut};
use walsync_types::{Lsn, PgTimestamp};

use super::reader::Reader;
use super::{CodecError, CodecErrorKind};

/// A table's shape as pgoutput describes it. Sent before the first change to a table in a session
/// and again whenever it may have changed: a later one replaces the earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key sent with deletes and key-changing updates).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: none; updates and deletes cannot be replicated.
    Nothing,
    /// `f`: every column.
    Full,
    /// `i`: a unique index.
    Index,
}

impl ReplicaIdentity {
    fn from_byte(b: u8) -> Result<ReplicaIdentity, CodecErrorKind> {
        Ok(match b {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            tag => {
                return Err(CodecErrorKind::UnknownTag {
                    what: "replica identity",
                    tag: tag as char,
                });
            }
        })
    }

    fn to_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

/// One column of a tuple, still in wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value the change did not touch: its value is whatever the row held before.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

pub type Tuple = Vec<TupleValue>;

/// A pgoutput message. `xid` fields are present only inside a streamed transaction (protocol 2,
/// between `StreamStart` and `StreamStop`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_time: PgTimestamp,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation {
        xid: Option<u32>,
        relation: Relation,
    },
    Type {
        xid: Option<u32>,
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        xid: Option<u32>,
        relation: u32,
        new: Tuple,
    },
    /// `key` is sent when the replica identity changed, `old` when the identity is FULL.
    Update {
        xid: Option<u32>,
        relation: u32,
        key: Option<Tuple>,
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        xid: Option<u32>,
        relation: u32,
        key: Option<Tuple>,
        old: Option<Tuple>,
    },
    /// `options`: bit 1 CASCADE, bit 2 RESTART IDENTITY.
    Truncate {
        xid: Option<u32>,
        options: u8,
        relations: Vec<u32>,
    },
    /// A `pg_logical_emit_message`.
    Message {
        xid: Option<u32>,
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    /// Aborts `subxid` of streamed transaction `xid`; the whole transaction when they are equal.
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

/// Decodes one pgoutput message. `in_stream` says whether it arrived between `StreamStart` and
/// `StreamStop`, where change messages carry their transaction id. `lsn` only labels errors.
pub fn decode_message(lsn: Lsn, data: Bytes, in_stream: bool) -> Result<Message, CodecError> {
    decode(data, in_stream).map_err(|kind| CodecError { lsn, kind })
}

fn decode(data: Bytes, in_stream: bool) -> Result<Message, CodecErrorKind> {
    let mut r = Reader::new(data);
    let tag = r.u8("message tag").map_err(|_| CodecErrorKind::Empty)?;
    let xid = |r: &mut Reader| -> Result<Option<u32>, CodecErrorKind> {
        if in_stream {
            r.u32("transaction id").map(Some)
        } else {
            Ok(None)
        }
    };
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64("begin final lsn")?),
            commit_time: PgTimestamp(r.i64("begin commit time")?),
            xid: r.u32("begin xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: Lsn(r.u64("commit lsn")?),
            end_lsn: Lsn(r.u64("commit end lsn")?),
            commit_time: PgTimestamp(r.i64("commit time")?),
        },
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64("origin lsn")?),
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let xid = xid(&mut r)?;
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("relation namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = ReplicaIdentity::from_byte(r.u8("replica identity")?)?;
            let n = r.i16("relation column count")?;
            let mut columns = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(1600));
            for _ in 0..n {
                columns.push(Column {
                    is_key: r.u8("column flags")? & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation {
                xid,
                relation: Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            }
        }
        b'Y' => Message::Type {
            xid: xid(&mut r)?,
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let xid = xid(&mut r)?;
            let relation = r.u32("insert relation")?;
            expect(&mut r, b'N', "insert tuple marker")?;
            Message::Insert {
                xid,
                relation,
                new: tuple(&mut r)?,
            }
        }
        b'U' => {
            let xid = xid(&mut r)?;
            let relation = r.u32("update relation")?;
            let (mut key, mut old) = (None, None);
            let new = loop {
                match r.u8("update tuple marker")? {
                    b'K' if key.is_none() && old.is_none() => key = Some(tuple(&mut r)?),
                    b'O' if key.is_none() && old.is_none() => old = Some(tuple(&mut r)?),
                    b'N' => break tuple(&mut r)?,
                    t => {
                        return Err(CodecErrorKind::UnknownTag {
                            what: "update tuple marker",
                            tag: t as char,
                        });
                    }
                }
            };
            Message::Update {
                xid,
                relation,
                key,
                old,
                new,
            }
        }
        b'D' => {
            let xid = xid(&mut r)?;
            let relation = r.u32("delete relation")?;
            let (key, old) = match r.u8("delete tuple marker")? {
                b'K' => (Some(tuple(&mut r)?), None),
                b'O' => (None, Some(tuple(&mut r)?)),
                t => {
                    return Err(CodecErrorKind::UnknownTag {
                        what: "delete tuple marker",
                        tag: t as char,
                    });
                }
            };
            Message::Delete {
                xid,
                relation,
                key,
                old,
            }
        }
        b'T' => {
            let xid = xid(&mut r)?;
            let n = r.i32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let count = usize::try_from(n).map_err(|_| CodecErrorKind::NegativeLength {
                what: "truncate relations",
                len: n,
            })?;
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32("truncate relation oid")?);
            }
            Message::Truncate {
                xid,
                options,
                relations,
            }
        }
        b'M' => Message::Message {
            xid: xid(&mut r)?,
            transactional: r.u8("message flags")? & 1 == 1,
            lsn: Lsn(r.u64("message lsn")?),
            prefix: r.cstr("message prefix")?,
            content: r.len_bytes("message content")?,
        },
        b'S' => Message::StreamStart {
            xid: r.u32("stream xid")?,
            first_segment: r.u8("stream first segment")? == 1,
        },
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit {
            xid: r.u32("stream commit xid")?,
            flags: r.u8("stream commit flags")?,
            commit_lsn: Lsn(r.u64("stream commit lsn")?),
            end_lsn: Lsn(r.u64("stream commit end lsn")?),
            commit_time: PgTimestamp(r.i64("stream commit time")?),
        },
        b'A' => Message::StreamAbort {
            xid: r.u32("stream abort xid")?,
            subxid: r.u32("stream abort subxid")?,
        },
        t => {
            return Err(CodecErrorKind::UnknownTag {
                what: "pgoutput message",
                tag: t as char,
            });
        }
    };
    r.finish()?;
    Ok(msg)
}

fn expect(r: &mut Reader, want: u8, what: &'static str) -> Result<(), CodecErrorKind> {
    match r.u8(what)? {
        b if b == want => Ok(()),
        t => Err(CodecErrorKind::UnknownTag {
            what,
            tag: t as char,
        }),
    }
}

fn tuple(r: &mut Reader) -> Result<Tuple, CodecErrorKind> {
    let n = r.i16("tuple column count")?;
    let mut values = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        values.push(match r.u8("tuple value kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(r.len_bytes("text value")?),
            b'b' => TupleValue::Binary(r.len_bytes("binary value")?),
            t => {
                return Err(CodecErrorKind::UnknownTag {
                    what: "tuple value kind",
                    tag: t as char,
                });
            }
        });
    }
    Ok(values)
}

impl Message {
    /// Encodes the message as pgoutput would. Used by tests, fuzzing and benchmarks; the
    /// server never sends these.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        let put_xid = |b: &mut BytesMut, xid: &Option<u32>| {
            if let Some(x) = xid {
                b.put_u32(*x);
            }
        };
        match self {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                b.put_u8(b'B');
                b.put_u64(final_lsn.0);
                b.put_i64(commit_time.0);
                b.put_u32(*xid);
            }
            Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            } => {
                b.put_u8(b'C');
                b.put_u8(*flags);
                b.put_u64(commit_lsn.0);
                b.put_u64(end_lsn.0);
                b.put_i64(commit_time.0);
            }
            Message::Origin { commit_lsn, name } => {
                b.put_u8(b'O');
                b.put_u64(commit_lsn.0);
                put_cstr(&mut b, name);
            }
            Message::Relation { xid, relation } => {
                b.put_u8(b'R');
                put_xid(&mut b, xid);
                b.put_u32(relation.oid);
                put_cstr(&mut b, &relation.namespace);
                put_cstr(&mut b, &relation.name);
                b.put_u8(relation.replica_identity.to_byte());
                b.put_i16(relation.columns.len() as i16);
                for c in &relation.columns {
                    b.put_u8(u8::from(c.is_key));
                    put_cstr(&mut b, &c.name);
                    b.put_u32(c.type_oid);
                    b.put_i32(c.type_modifier);
                }
            }
            Message::Type {
                xid,
                oid,
                namespace,
                name,
            } => {
                b.put_u8(b'Y');
                put_xid(&mut b, xid);
                b.put_u32(*oid);
                put_cstr(&mut b, namespace);
                put_cstr(&mut b, name);
            }
            Message::Insert { xid, relation, new } => {
                b.put_u8(b'I');
                put_xid(&mut b, xid);
                b.put_u32(*relation);
                b.put_u8(b'N');
                put_tuple(&mut b, new);
            }
            Message::Update {
                xid,
                relation,
                key,
                old,
                new,
            } => {
                b.put_u8(b'U');
                put_xid(&mut b, xid);
                b.put_u32(*relation);
                if let Some(k) = key {
                    b.put_u8(b'K');
                    put_tuple(&mut b, k);
                } else if let Some(o) = old {
                    b.put_u8(b'O');
                    put_tuple(&mut b, o);
                }
                b.put_u8(b'N');
                put_tuple(&mut b, new);
            }
            Message::Delete {
                xid,
                relation,
                key,
                old,
            } => {
                b.put_u8(b'D');
                put_xid(&mut b, xid);
                b.put_u32(*relation);
                if let Some(k) = key {
                    b.put_u8(b'K');
                    put_tuple(&mut b, k);
                } else if let Some(o) = old {
                    b.put_u8(b'O');
                    put_tuple(&mut b, o);
                }
            }
            Message::Truncate {
                xid,
                options,
                relations,
            } => {
                b.put_u8(b'T');
                put_xid(&mut b, xid);
                b.put_i32(relations.len() as i32);
                b.put_u8(*options);
                for r in relations {
                    b.put_u32(*r);
                }
            }
            Message::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            } => {
                b.put_u8(b'M');
                put_xid(&mut b, xid);
                b.put_u8(u8::from(*transactional));
                b.put_u64(lsn.0);
                put_cstr(&mut b, prefix);
                b.put_i32(content.len() as i32);
                b.put_slice(content);
            }
            Message::StreamStart { xid, first_segment } => {
                b.put_u8(b'S');
                b.put_u32(*xid);
                b.put_u8(u8::from(*first_segment));
            }
            Message::StreamStop => b.put_u8(b'E'),
            Message::StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            } => {
                b.put_u8(b'c');
                b.put_u32(*xid);
                b.put_u8(*flags);
                b.put_u64(commit_lsn.0);
                b.put_u64(end_lsn.0);
                b.put_i64(commit_time.0);
            }
            Message::StreamAbort { xid, subxid } => {
                b.put_u8(b'A');
                b.put_u32(*xid);
                b.put_u32(*subxid);
            }
        }
        b.freeze()
    }
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn put_tuple(b: &mut BytesMut, t: &Tuple) {
    b.put_i16(t.len() as i16);
    for v in t {
        match v {
            TupleValue::Null => b.put_u8(b'n'),
            TupleValue::UnchangedToast => b.put_u8(b'u'),
            TupleValue::Text(d) | TupleValue::Binary(d) => {
                b.put_u8(if matches!(v, TupleValue::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                b.put_i32(d.len() as i32);
                b.put_slice(d);
            }
        }
    }
}
