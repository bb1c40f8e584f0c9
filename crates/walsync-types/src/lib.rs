//! The shared vocabulary of walsync: log positions and row values.
//!
//! Nothing here does I/O; every other crate depends on this one and on nothing else in common.

mod checksum;
mod lsn;
mod value;

pub use checksum::{add_checksums, put_checksum, remove_checksum};
pub use lsn::{Lsn, ParseLsnError};
pub use value::{PgTimestamp, Value};
