//! What can go wrong while reading the WAL, grouped by what happens next: a transient error is
//! retried with backoff by [`crate::Source`]; a definite one stops the stream and goes to the
//! operator.

use crate::codec::CodecError;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot reach postgres: {0}")]
    Io(#[from] std::io::Error),
    #[error("postgres did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("postgres closed the connection")]
    Closed,
    #[error("tls: {0}")]
    Tls(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("postgres error {code}: {message}")]
    Server { code: String, message: String },
    #[error("unexpected message from postgres: {0}")]
    Protocol(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("invalid source configuration: {0}")]
    Config(String),
    /// The database is not set up for walsync; the message says what to change.
    #[error("{0}")]
    Preflight(String),
    #[error("postgres: {}", with_causes(.0))]
    Sql(tokio_postgres::Error),
    /// The slot cannot serve the position walsync holds: the data must be copied anew.
    #[error("replication slot {slot:?} is lost: {reason}")]
    SlotLost { slot: String, reason: String },
}

impl SourceError {
    /// Whether trying again later can succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Io(_) | SourceError::Timeout(_) | SourceError::Closed => true,
            SourceError::Server { code, .. } => is_transient_sqlstate(code),
            SourceError::Sql(_) => true,
            SourceError::Tls(_)
            | SourceError::Auth(_)
            | SourceError::Protocol(_)
            | SourceError::Codec(_)
            | SourceError::Config(_)
            | SourceError::Preflight(_)
            | SourceError::SlotLost { .. } => false,
        }
    }
}

/// SQLSTATEs that describe a passing condition: lost connections, a server starting or shutting
/// down, exhausted resources, and a slot still held by a connection that is going away.
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "55006" | "40001" | "40P01"
        )
}

impl From<tokio_postgres::Error> for SourceError {
    /// Errors the server sent keep their SQLSTATE and message; the rest (I/O, closed
    /// connections) stay as they are.
    fn from(e: tokio_postgres::Error) -> SourceError {
        match e.as_db_error() {
            Some(db) => SourceError::Server {
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
            },
            None => SourceError::Sql(e),
        }
    }
}

/// tokio-postgres says "error connecting to server" and keeps the reason in its source chain.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

pub type Result<T, E = SourceError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> SourceError {
        SourceError::Server {
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }

    #[test]
    fn classifies_errors() {
        assert!(SourceError::Closed.is_transient());
        assert!(
            server(
                "57P01",
                "terminating connection due to administrator command"
            )
            .is_transient()
        );
        assert!(server("55006", "replication slot is active").is_transient());
        assert!(!server("42704", "replication slot does not exist").is_transient());
        assert!(!SourceError::Auth("password authentication failed".into()).is_transient());
        assert!(!SourceError::Preflight("wal_level".into()).is_transient());
    }
}
