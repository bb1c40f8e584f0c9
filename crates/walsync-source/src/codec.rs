//! A pure pgoutput codec: bytes in, messages out, no I/O.
//!
//! Covers the replication frames carried in CopyData (`XLogData`, primary keepalive, standby
//! status update) and every logical message of pgoutput protocol versions 1 and 2 (see
//! PostgreSQL's "Logical Replication Message Formats"). Values stay as raw bytes here; turning
//! them into typed values is [`crate::datum`]'s job.
//!
//! Decoding never panics: a truncated or malformed message is a [`CodecError`] that names the LSN
//! of the frame it came in. Such an error is definite: the same bytes will fail the same way.

mod frame;
mod message;
mod reader;

pub use frame::{Frame, StandbyStatus, decode_frame, encode_standby_status};
pub use message::{Column, Message, Relation, ReplicaIdentity, Tuple, TupleValue, decode_message};

use walsync_types::Lsn;

/// Why a replication frame or pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed replication message at lsn {lsn}: {kind}")]
pub struct CodecError {
    /// The WAL position of the frame that carried the message (`0/0` for frames without one).
    pub lsn: Lsn,
    pub kind: CodecErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecErrorKind {
    #[error("message ends inside {0}")]
    Truncated(&'static str),
    #[error("unknown {what} tag {tag:?}")]
    UnknownTag { what: &'static str, tag: char },
    #[error("{0} is not valid utf-8")]
    InvalidUtf8(&'static str),
    #[error("{0} is not null-terminated")]
    Unterminated(&'static str),
    #[error("negative length {len} for {what}")]
    NegativeLength { what: &'static str, len: i32 },
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    #[error("empty message")]
    Empty,
}

#[cfg(test)]
mod tests;
