//! A replication connection: the walsender side of the protocol that tokio-postgres does not
//! speak. Startup with `replication=database`, authentication (trust, password, MD5,
//! SCRAM-SHA-256), TLS, replication commands in simple-query form, and CopyBoth framing for
//! `START_REPLICATION`. Messages are framed here and parsed with postgres-protocol's codecs,
//! except CopyBothResponse, which postgres-protocol does not know.

mod socket;

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walsync_types::{Lsn, quote_ident};

use crate::connect::PgConfig;
use crate::error::{Result, SourceError};
use socket::Stream;

/// CopyBothResponse: the server enters streaming after `START_REPLICATION`.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Bytes asked of the socket at a time when the read buffer runs low: the walsender writes in
/// blocks of about this size, so one read usually takes a whole block.
const READ_CHUNK: usize = 128 * 1024;
/// Spare room below which the read buffer is grown before the next read.
const READ_MIN_SPARE: usize = 32 * 1024;

/// One row of a simple-query result, every column as text.
pub type TextRow = Vec<Option<String>>;

/// What `IDENTIFY_SYSTEM` says.
#[derive(Debug, Clone)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub dbname: Option<String>,
}

/// A slot just made by `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT`. The snapshot can be
/// imported by another connection until the next command on this one.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub name: String,
    pub consistent_point: Lsn,
    pub snapshot_name: String,
}

pub struct ReplicationConnection {
    stream: Stream,
    read: BytesMut,
    write: BytesMut,
    streaming: bool,
    /// The server process serving this connection (its BackendKeyData).
    pid: Option<i32>,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("streaming", &self.streaming)
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Connects and logs in. Fails with [`SourceError::Auth`] for bad credentials and
    /// [`SourceError::Tls`] when TLS is required and cannot be had or the server is not trusted.
    pub async fn connect(config: &PgConfig) -> Result<ReplicationConnection> {
        let timeout = config.connect_timeout();
        tokio::time::timeout(timeout, Self::connect_inner(config))
            .await
            .map_err(|_| SourceError::Timeout(timeout))?
    }

    async fn connect_inner(config: &PgConfig) -> Result<ReplicationConnection> {
        let stream = socket::open(config).await?;
        let mut conn = ReplicationConnection {
            stream,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::with_capacity(1024),
            streaming: false,
            pid: None,
        };
        conn.startup(config).await?;
        Ok(conn)
    }

    async fn startup(&mut self, config: &PgConfig) -> Result<()> {
        let mut params = vec![
            ("user", config.user()),
            ("database", config.dbname()),
            ("replication", "database"),
            ("application_name", config.application_name()),
        ];
        if let Some(options) = config.options() {
            params.push(("options", options));
        }
        frontend::startup_message(params.iter().copied(), &mut self.write)?;
        self.flush().await?;

        let password = config.password();
        let no_password = || {
            SourceError::Auth(format!(
                "the server asks a password for {:?} and none was given",
                config.user()
            ))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_message().await? {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password.ok_or_else(no_password)?, &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        config.user().as_bytes(),
                        password.ok_or_else(no_password)?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(SourceError::Auth(
                            "the server offers no SASL mechanism walsync supports".into(),
                        ));
                    }
                    // Channel binding is optional for SCRAM-SHA-256; the TLS layer already
                    // authenticates the server where sslmode asks for it.
                    let s = ScramSha256::new(
                        password.ok_or_else(no_password)?,
                        ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.write)?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        SourceError::Protocol("sasl continue before sasl start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| SourceError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        SourceError::Protocol("sasl final before sasl start".into())
                    })?;
                    s.finish(body.data())
                        .map_err(|e| SourceError::Auth(format!("server signature: {e}")))?;
                }
                Message::ErrorResponse(body) => {
                    let (code, message) = error_fields(&body)?;
                    // 28P01 invalid_password, 28000 invalid_authorization_specification.
                    return Err(if code.starts_with("28") {
                        SourceError::Auth(message)
                    } else {
                        SourceError::Server { code, message }
                    });
                }
                other => return Err(unexpected("during authentication", &other)),
            }
        }
        loop {
            match self.next_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::BackendKeyData(key) => self.pid = Some(key.process_id()),
                Message::ParameterStatus(_) | Message::NoticeResponse(_) => {}
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                other => return Err(unexpected("after authentication", &other)),
            }
        }
    }

    async fn flush(&mut self) -> Result<()> {
        self.stream.write_all(&self.write).await?;
        self.stream.flush().await?;
        self.write.clear();
        Ok(())
    }

    /// The next backend message. Cancel-safe: bytes already read stay buffered.
    async fn next_message(&mut self) -> Result<Message> {
        match self.next_backend().await? {
            Backend::Message(m) => Ok(m),
            Backend::CopyBoth => Err(SourceError::Protocol(
                "copy-both response outside START_REPLICATION".into(),
            )),
        }
    }

    async fn next_backend(&mut self) -> Result<Backend> {
        loop {
            if self.read.first() == Some(&COPY_BOTH_RESPONSE_TAG) {
                // CopyBothResponse: tag, length, format, column formats. Nothing in it matters
                // to a logical stream.
                if self.read.len() >= 5 {
                    let len = u32::from_be_bytes([
                        self.read[1],
                        self.read[2],
                        self.read[3],
                        self.read[4],
                    ]) as usize;
                    if self.read.len() > len {
                        let _ = self.read.split_to(len + 1);
                        return Ok(Backend::CopyBoth);
                    }
                }
            } else if let Some(msg) = Message::parse(&mut self.read)
                .map_err(|e| SourceError::Protocol(format!("cannot parse backend message: {e}")))?
            {
                return Ok(Backend::Message(msg));
            }
            // Keep room for a large read: a buffer that split_to has shrunk would otherwise be
            // refilled a few bytes per system call.
            if self.read.capacity() - self.read.len() < READ_MIN_SPARE {
                self.read.reserve(READ_CHUNK);
            }
            let n = self.stream.read_buf(&mut self.read).await?;
            if n == 0 {
                return Err(SourceError::Closed);
            }
        }
    }

    /// Runs one command in simple-query form and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>> {
        if self.streaming {
            return Err(SourceError::Protocol("query sent while streaming".into()));
        }
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::DataRow(row) => {
                    let buf = row.buffer();
                    let mut ranges = row.ranges();
                    let mut values = Vec::new();
                    while let Some(range) = ranges.next()? {
                        values.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(values);
                }
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_) => {}
                other => return Err(unexpected("in a query result", &other)),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten();
        Ok(SystemIdentity {
            system_id: col(0).unwrap_or_default(),
            timeline: col(1).and_then(|t| t.parse().ok()).unwrap_or(0),
            xlog_pos: parse_lsn(col(2))?,
            dbname: col(3),
        })
    }

    /// The server process serving this connection, as PostgreSQL announced it.
    pub fn backend_pid(&self) -> Option<i32> {
        self.pid
    }

    /// Creates a logical slot with pgoutput and exports its snapshot. Waits for transactions
    /// that are open at that moment to finish.
    pub async fn create_slot(&mut self, name: &str) -> Result<CreatedSlot> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(name)
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| {
            SourceError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let col = |i: usize| row.get(i).cloned().flatten();
        Ok(CreatedSlot {
            name: col(0).unwrap_or_else(|| name.to_owned()),
            consistent_point: parse_lsn(col(1))?,
            snapshot_name: col(2)
                .ok_or_else(|| SourceError::Protocol("slot created without a snapshot".into()))?,
        })
    }

    /// Starts streaming from `slot` at `start` with pgoutput `options`. On success the
    /// connection is in CopyBoth mode: read with [`Self::next_copy_data`].
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<()> {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("\"{k}\" '{}'", v.replace('\'', "''")))
            .collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({})",
            quote_ident(slot),
            opts.join(", ")
        );
        frontend::query(&sql, &mut self.write)?;
        self.flush().await?;
        loop {
            match self.next_backend().await? {
                Backend::CopyBoth => {
                    self.streaming = true;
                    return Ok(());
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    let e = server_error(&body);
                    // Drain to ReadyForQuery so that the connection stays usable.
                    loop {
                        if let Message::ReadyForQuery(_) = self.next_message().await? {
                            return Err(e);
                        }
                    }
                }
                Backend::Message(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                Backend::Message(other) => {
                    return Err(unexpected("after START_REPLICATION", &other));
                }
            }
        }
    }

    /// The next CopyData payload of the stream, or `None` once the server ended the copy.
    /// Cancel-safe.
    pub async fn next_copy_data(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.next_message().await? {
                Message::CopyData(body) => return Ok(Some(body.into_bytes())),
                // A walsender that is shut down (a smart or fast server stop) ends the stream
                // with CommandComplete, without CopyDone: the same orderly end.
                Message::CopyDone | Message::CommandComplete(_) => {
                    self.streaming = false;
                    return Ok(None);
                }
                Message::ErrorResponse(body) => {
                    self.streaming = false;
                    return Err(server_error(&body));
                }
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                other => return Err(unexpected("while streaming", &other)),
            }
        }
    }

    /// The next CopyData payload if a whole one is already buffered, without waiting. Lets the
    /// reader decode everything one socket read brought before it waits again.
    pub fn next_buffered_copy_data(&mut self) -> Result<Option<Bytes>> {
        if self.read.first() == Some(&b'd')
            && let Some(Message::CopyData(body)) = Message::parse(&mut self.read)
                .map_err(|e| SourceError::Protocol(format!("cannot parse backend message: {e}")))?
        {
            return Ok(Some(body.into_bytes()));
        }
        Ok(None)
    }

    /// Sends one CopyData payload (e.g. a standby status update).
    pub async fn send_copy_data(&mut self, payload: Bytes) -> Result<()> {
        frontend::CopyData::new(payload)?.write(&mut self.write);
        self.flush().await
    }

    /// Ends streaming in an orderly way: CopyDone, then read until ReadyForQuery, discarding
    /// any data the server sent meanwhile.
    pub async fn stop_streaming(&mut self) -> Result<()> {
        if !self.streaming {
            return Ok(());
        }
        frontend::copy_done(&mut self.write);
        self.flush().await?;
        loop {
            match self.next_message().await? {
                Message::ReadyForQuery(_) => {
                    self.streaming = false;
                    return Ok(());
                }
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {}
            }
        }
    }

    /// Says goodbye and closes the socket.
    pub async fn close(mut self) -> Result<()> {
        frontend::terminate(&mut self.write);
        self.flush().await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}

enum Backend {
    Message(Message),
    CopyBoth,
}

fn parse_lsn(s: Option<String>) -> Result<Lsn> {
    let s = s.ok_or_else(|| SourceError::Protocol("missing lsn".into()))?;
    s.parse()
        .map_err(|_| SourceError::Protocol(format!("invalid lsn {s:?}")))
}

fn error_fields(body: &ErrorResponseBody) -> Result<(String, String)> {
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = body.fields();
    while let Some(f) = fields.next()? {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    Ok((code, message))
}

fn server_error(body: &ErrorResponseBody) -> SourceError {
    match error_fields(body) {
        Ok((code, message)) => SourceError::Server { code, message },
        Err(e) => e,
    }
}

fn unexpected(when: &str, msg: &Message) -> SourceError {
    let name = match msg {
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::CommandComplete(_) => "CommandComplete",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        _ => "another message",
    };
    SourceError::Protocol(format!("{name} {when}"))
}

impl From<std::convert::Infallible> for SourceError {
    fn from(e: std::convert::Infallible) -> SourceError {
        match e {}
    }
}

#[cfg(test)]
mod tests {
    use walsync_types::quote_ident;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("walsync"), "\"walsync\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
