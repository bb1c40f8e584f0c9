//! The streaming replication frames that travel inside CopyData.

use bytes::{BufMut, Bytes, BytesMut};
use walsync_types::{Lsn, PgTimestamp};

use super::reader::Reader;
use super::{CodecError, CodecErrorKind};

/// A frame sent by the server during `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `w`: a piece of WAL data, here one pgoutput message.
    XLogData {
        /// The WAL position this message was decoded at.
        start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        sent_at: PgTimestamp,
        data: Bytes,
    },
    /// `k`: the primary's keepalive. `wal_end` is how far the server has sent.
    Keepalive {
        wal_end: Lsn,
        sent_at: PgTimestamp,
        reply_requested: bool,
    },
}

/// Decodes one CopyData payload of the replication stream.
pub fn decode_frame(payload: Bytes) -> Result<Frame, CodecError> {
    let mut r = Reader::new(payload);
    let err = |kind| CodecError {
        lsn: Lsn::ZERO,
        kind,
    };
    let tag = r.u8("frame tag").map_err(|_| err(CodecErrorKind::Empty))?;
    match tag {
        b'w' => {
            let start = Lsn(r.u64("xlogdata start").map_err(err)?);
            let with_lsn = |kind| CodecError { lsn: start, kind };
            let wal_end = Lsn(r.u64("xlogdata wal end").map_err(with_lsn)?);
            let sent_at = PgTimestamp(r.i64("xlogdata send time").map_err(with_lsn)?);
            Ok(Frame::XLogData {
                start,
                wal_end,
                sent_at,
                data: r.rest(),
            })
        }
        b'k' => {
            let wal_end = Lsn(r.u64("keepalive wal end").map_err(err)?);
            let with_lsn = |kind| CodecError { lsn: wal_end, kind };
            let sent_at = PgTimestamp(r.i64("keepalive send time").map_err(with_lsn)?);
            let reply_requested = r.u8("keepalive reply flag").map_err(with_lsn)? != 0;
            r.finish().map_err(with_lsn)?;
            Ok(Frame::Keepalive {
                wal_end,
                sent_at,
                reply_requested,
            })
        }
        other => Err(err(CodecErrorKind::UnknownTag {
            what: "replication frame",
            tag: other as char,
        })),
    }
}

/// What the client tells the server in a standby status update (`r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatus {
    pub written: Lsn,
    /// Everything before this position is durable downstream; the slot may release it.
    pub flushed: Lsn,
    pub applied: Lsn,
    pub sent_at: PgTimestamp,
    pub reply_requested: bool,
}

/// Encodes a standby status update as a CopyData payload.
pub fn encode_standby_status(s: &StandbyStatus) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(s.written.0);
    b.put_u64(s.flushed.0);
    b.put_u64(s.applied.0);
    b.put_i64(s.sent_at.0);
    b.put_u8(u8::from(s.reply_requested));
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_roundtrip() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(0x1_0000_0010);
        b.put_i64(42);
        b.put_u8(1);
        let f = decode_frame(b.freeze()).expect("decodes");
        assert_eq!(
            f,
            Frame::Keepalive {
                wal_end: Lsn(0x1_0000_0010),
                sent_at: PgTimestamp(42),
                reply_requested: true
            }
        );
    }

    #[test]
    fn xlogdata_keeps_payload() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(5);
        b.put_u64(9);
        b.put_i64(7);
        b.put_slice(b"Bpayload");
        match decode_frame(b.freeze()).expect("decodes") {
            Frame::XLogData {
                start,
                wal_end,
                data,
                ..
            } => {
                assert_eq!((start, wal_end), (Lsn(5), Lsn(9)));
                assert_eq!(&data[..], b"Bpayload");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn truncated_frames_are_errors() {
        assert_eq!(
            decode_frame(Bytes::new()).unwrap_err().kind,
            CodecErrorKind::Empty
        );
        let e = decode_frame(Bytes::from_static(b"w\0\0")).unwrap_err();
        assert_eq!(e.kind, CodecErrorKind::Truncated("xlogdata start"));
        let e = decode_frame(Bytes::from_static(b"k\0\0\0\0\0\0\0\x01\0")).unwrap_err();
        assert_eq!(e.lsn, Lsn(1));
        assert!(matches!(
            decode_frame(Bytes::from_static(b"?")).unwrap_err().kind,
            CodecErrorKind::UnknownTag { .. }
        ));
    }

    #[test]
    fn standby_status_layout() {
        let b = encode_standby_status(&StandbyStatus {
            written: Lsn(1),
            flushed: Lsn(2),
            applied: Lsn(3),
            sent_at: PgTimestamp(4),
            reply_requested: false,
        });
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(&b[9..17], &2u64.to_be_bytes());
    }
}
