//! Throwaway PostgreSQL clusters for tests, benchmarks and `walsync demo`, and the seed app's
//! PostgreSQL side ([`seed`]: schema, rules, sample data, workload, expected buckets).
//!
//! [`shared`] starts one cluster per process from the installed PostgreSQL binaries (found on
//! `PATH`, through `pg_config`, or under `/usr/lib/postgresql/*/bin`) on a free loopback port with
//! `wal_level=logical`; [`Cluster::fresh_database`] gives each test its own database. When
//! `WALSYNC_TEST_PG_URL` is set, that server is used instead. A watchdog process stops the cluster
//! and removes its directory when the process that started it exits, however it exits.
//!
//! [`FaultProxy`] sits between two parts of a test (walsync and PostgreSQL, clients and walsync)
//! and delays, throttles, partitions, half-opens or cuts their connections on demand.
//!
//! Authentication: the superuser `postgres` logs in without a password over loopback; every other
//! role must give its password (SCRAM-SHA-256 or MD5, as the role's password is stored).

mod binaries;
mod cluster;
mod proxy;
pub mod seed;
mod tls;

pub use cluster::{Cluster, ClusterOptions, TestDatabase, shared};
pub use proxy::{Fault, FaultProxy};
pub use tls::TestCertificates;

/// Why a throwaway cluster could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error(
        "no postgresql binaries found (looked on PATH, via pg_config and under /usr/lib/postgresql); \
         install postgresql or set WALSYNC_TEST_PG_URL"
    )]
    NoBinaries,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("io error while {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("postgres error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("certificate generation failed: {0}")]
    Certificate(String),
}

pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// A directory removed when dropped, for a throwaway store beside a throwaway cluster.
pub fn scratch_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir()
}
