//! The sync API's metrics, through the `metrics` facade (the application installs the
//! Prometheus recorder and gives the server its renderer for `GET /metrics`). Labels come from
//! fixed sets only: a transport, a reason, an outcome — never a user, bucket or row id.

use metrics::{counter, describe_counter, describe_gauge, gauge};

pub const STREAMS: &str = "walsync_sync_streams";
pub const LINES: &str = "walsync_sync_lines_sent_total";
pub const BYTES: &str = "walsync_sync_bytes_sent_total";
pub const AUTH_FAILURES: &str = "walsync_auth_failures_total";
pub const WRITE_CHECKPOINTS: &str = "walsync_write_checkpoints_total";
pub const ADMISSION_REFUSED: &str = "walsync_admission_refused_total";
pub const UPLOADS: &str = "walsync_upload_transactions_total";
pub const CONFLICTS: &str = "walsync_upload_conflicts_total";

/// Conflict outcomes: the label set of [`CONFLICTS`].
const CONFLICT_OUTCOMES: &[&str] = &["client", "server", "manual"];

/// Uploaded transactions and conflicts since the process started, for `walsync status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadTotals {
    pub applied: u64,
    pub rejected: u64,
    pub denied: u64,
    pub retryable: u64,
    pub conflicts: u64,
}

static TOTALS: std::sync::Mutex<UploadTotals> = std::sync::Mutex::new(UploadTotals {
    applied: 0,
    rejected: 0,
    denied: 0,
    retryable: 0,
    conflicts: 0,
});

/// See [`UploadTotals`].
pub fn upload_totals() -> UploadTotals {
    TOTALS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Describes the server's metrics (their help text); call once after installing a recorder.
pub fn describe() {
    describe_gauge!(
        STREAMS,
        "open streams, by transport (http, grpc; presence: presence watchers over either)"
    );
    describe_counter!(LINES, "sync lines sent to clients, by transport");
    describe_counter!(
        BYTES,
        metrics::Unit::Bytes,
        "bytes of sync lines sent to clients (encoded), by transport"
    );
    describe_counter!(
        AUTH_FAILURES,
        "requests refused for their token, by reason (missing, scheme, invalid, algorithm, no_key, lifetime, subject; admin for the admin token)"
    );
    describe_counter!(
        WRITE_CHECKPOINTS,
        "write checkpoint requests, by outcome (created, rate_limited, unavailable)"
    );
    describe_counter!(
        UPLOADS,
        "uploaded client transactions, by status (applied, rejected, retryable) and code (denied, invalid, not_found, constraint_violation, invalid_value, rejected_by_database, database_error, database_unavailable, not_attempted; none when applied)"
    );
    describe_counter!(
        CONFLICTS,
        "fields of applied uploads that the server had changed too, by outcome (client, server, manual)"
    );
    describe_counter!(
        ADMISSION_REFUSED,
        "streams refused by admission, by reason (too_many_connections, too_many_streams)"
    );
    // Series of fixed label sets exist from the start at 0, so that a rate or an alert over
    // them reads 0 rather than nothing before the first event.
    for reason in [
        "missing",
        "scheme",
        "invalid",
        "algorithm",
        "no_key",
        "lifetime",
        "subject",
        "admin",
    ] {
        counter!(AUTH_FAILURES, "reason" => reason).increment(0);
    }
    for outcome in ["created", "rate_limited", "unavailable"] {
        counter!(WRITE_CHECKPOINTS, "outcome" => outcome).increment(0);
    }
    for code in [
        crate::ErrorCode::TooManyConnections,
        crate::ErrorCode::TooManyStreams,
    ] {
        counter!(ADMISSION_REFUSED, "reason" => code.as_str()).increment(0);
    }
    for (status, code) in [
        ("applied", "none"),
        ("rejected", "denied"),
        ("retryable", "database_unavailable"),
    ] {
        counter!(UPLOADS, "status" => status, "code" => code).increment(0);
    }
    for outcome in CONFLICT_OUTCOMES {
        counter!(CONFLICTS, "outcome" => *outcome).increment(0);
    }
    for transport in ["http", "grpc", "presence"] {
        gauge!(STREAMS, "transport" => transport).increment(0.0);
        counter!(LINES, "transport" => transport).increment(0);
        counter!(BYTES, "transport" => transport).increment(0);
    }
}

/// An open stream, counted in [`STREAMS`] while it lives.
#[derive(Debug)]
pub(crate) struct OpenStream(&'static str);

impl OpenStream {
    pub(crate) fn new(transport: &'static str) -> OpenStream {
        gauge!(STREAMS, "transport" => transport).increment(1.0);
        OpenStream(transport)
    }

    /// Counts one line of `bytes` sent.
    pub(crate) fn sent(&self, bytes: usize) {
        counter!(LINES, "transport" => self.0).increment(1);
        counter!(BYTES, "transport" => self.0).increment(bytes as u64);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        gauge!(STREAMS, "transport" => self.0).decrement(1.0);
    }
}

pub(crate) fn auth_failure(reason: &'static str) {
    counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

pub(crate) fn write_checkpoint(outcome: &'static str) {
    counter!(WRITE_CHECKPOINTS, "outcome" => outcome).increment(1);
}

pub(crate) fn refused(code: crate::ErrorCode) {
    counter!(ADMISSION_REFUSED, "reason" => code.as_str()).increment(1);
}

/// Counts an upload's transactions by status and code (a fixed set).
pub(crate) fn upload(reply: &walsync_write::UploadReply) {
    let mut totals = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
    for r in &reply.results {
        let code = r.code.clone().unwrap_or_else(|| "none".into());
        match r.status {
            walsync_write::Status::Applied => totals.applied += 1,
            walsync_write::Status::Rejected => totals.rejected += 1,
            walsync_write::Status::Retryable => totals.retryable += 1,
        }
        totals.denied += u64::from(code == "denied");
        counter!(UPLOADS, "status" => r.status.as_str(), "code" => code).increment(1);
        for c in &r.conflicts {
            let outcome = CONFLICT_OUTCOMES
                .iter()
                .find(|o| **o == c.outcome)
                .copied()
                .unwrap_or("other");
            counter!(CONFLICTS, "outcome" => outcome).increment(1);
            totals.conflicts += 1;
        }
    }
}
