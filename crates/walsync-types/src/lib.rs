//! The shared vocabulary of walsync: log positions, row values, row ids and the bucket terms
//! (lookups, row outputs, op kinds) that rules, storage and sync exchange.
//!
//! Nothing here does I/O; every other crate depends on this one and on nothing else in common.

mod bucket;
mod checksum;
mod lsn;
mod row_id;
mod value;

pub use bucket::{
    BucketReason, LookupEntry, LookupKey, OpKind, RowOutput, StreamDescription, StreamError,
    bucket_id, bucket_id_of_text,
};
pub use checksum::{PutDigest, add_checksums, put_checksum, put_digest, remove_checksum};
pub use lsn::{Lsn, ParseLsnError};
pub use row_id::RowId;
pub use value::{PgTimestamp, Value};

/// Quotes an SQL identifier (a table, column, slot or role name) for PostgreSQL: in double
/// quotes, inner quotes doubled, so that any name is taken literally and nothing in it is SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
