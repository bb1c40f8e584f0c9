//! Connection settings shared by the replication connection and the ordinary SQL connections:
//! the URL, TLS (libpq's five `sslmode`s, with rustls) and the session settings that fix how
//! values are printed.

mod tls;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::config::{Host, SslMode as PgSslMode};

use crate::error::{Result, SourceError};

/// Session settings for every connection walsync makes, so that values print the same way in
/// the snapshot and in the stream: ISO dates in UTC, hex `bytea`, shortest-exact floats.
pub const SESSION_OPTIONS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
    ("client_encoding", "UTF8"),
];

/// How to use TLS, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, without checking the certificate.
    #[default]
    Prefer,
    /// TLS always; the certificate is checked against `sslrootcert` when one is given.
    Require,
    /// TLS, certificate signed by a trusted CA, any host name.
    VerifyCa,
    /// TLS, certificate signed by a trusted CA and issued for the host.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(SourceError::Config(format!(
                    "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// Where and how to connect: a `postgres://` URL or a libpq `key=value` string. `sslmode` and
/// `sslrootcert` are understood as libpq understands them. The password never prints.
#[derive(Clone)]
pub struct PgConfig {
    pg: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("host", &self.host_label())
            .field("port", &self.port())
            .field("user", &self.user())
            .field("dbname", &self.dbname())
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

impl FromStr for PgConfig {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<PgConfig> {
        let mut ssl_mode = SslMode::Prefer;
        let mut ssl_root_cert = None;
        let mut take = |key: &str, value: &str| -> Result<bool> {
            match key {
                "sslmode" => ssl_mode = value.parse()?,
                "sslrootcert" => ssl_root_cert = Some(PathBuf::from(value)),
                _ => return Ok(false),
            }
            Ok(true)
        };
        // tokio-postgres knows neither verify-ca/verify-full nor sslrootcert: take them out here.
        let rest = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            match s.split_once('?') {
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if !take(k, &percent_decode(v))? {
                            kept.push(pair);
                        }
                    }
                    if kept.is_empty() {
                        base.to_owned()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
                None => s.to_owned(),
            }
        } else {
            let mut kept = Vec::new();
            for pair in s.split_whitespace() {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if !take(k.trim(), v.trim().trim_matches('\''))? {
                    kept.push(pair);
                }
            }
            kept.join(" ")
        };
        let mut pg = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| SourceError::Config(format!("invalid postgres connection string: {e}")))?;
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        let mut options = pg.get_options().map(str::to_owned).unwrap_or_default();
        for (k, v) in SESSION_OPTIONS {
            options.push_str(&format!(" -c {k}={v}"));
        }
        pg.options(options.trim());
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        Ok(PgConfig {
            pg,
            ssl_mode,
            ssl_root_cert,
        })
    }
}

/// How long to wait for a connection before calling the attempt failed; a reachable server
/// answers in milliseconds, and the caller retries with backoff anyway.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok()),
        ) {
            (b'%', Some(hex)) if u8::from_str_radix(hex, 16).is_ok() => {
                out.push(u8::from_str_radix(hex, 16).unwrap_or_default());
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl PgConfig {
    pub fn host(&self) -> &Host {
        &self.pg.get_hosts()[0]
    }

    fn host_label(&self) -> String {
        match self.host() {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        }
    }

    pub fn port(&self) -> u16 {
        self.pg.get_ports().first().copied().unwrap_or(5432)
    }

    pub fn user(&self) -> &str {
        self.pg.get_user().unwrap_or("postgres")
    }

    pub fn password(&self) -> Option<&[u8]> {
        self.pg.get_password()
    }

    pub fn dbname(&self) -> &str {
        self.pg.get_dbname().unwrap_or_else(|| self.user())
    }

    pub fn options(&self) -> Option<&str> {
        self.pg.get_options()
    }

    pub fn application_name(&self) -> &str {
        self.pg.get_application_name().unwrap_or("walsync")
    }

    pub fn connect_timeout(&self) -> Duration {
        self.pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }

    /// The rustls configuration for this `sslmode`, or `None` for `disable`.
    pub(crate) fn tls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>> {
        tls::client_config(self.ssl_mode, self.ssl_root_cert.as_deref())
    }

    /// An ordinary SQL connection (for the snapshot, pre-flight checks and slot management).
    /// The connection task runs until the returned client is dropped. The whole login, not only
    /// the socket's connection (all that `connect_timeout` bounds in tokio-postgres), must finish
    /// within the connect timeout: a server that takes the connection and never answers (a
    /// half-open connection, a hung host behind a proxy) would otherwise hold the caller, and
    /// replication with it, forever.
    pub async fn connect(&self) -> Result<Client> {
        let timeout = self.connect_timeout();
        tokio::time::timeout(timeout, self.connect_inner(None))
            .await
            .map_err(|_| SourceError::Timeout(timeout))?
    }

    /// [`PgConfig::connect`], with the notifications the connection receives (after `LISTEN`)
    /// sent to `notes`.
    pub async fn connect_listening(
        &self,
        notes: tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>,
    ) -> Result<Client> {
        let timeout = self.connect_timeout();
        tokio::time::timeout(timeout, self.connect_inner(Some(notes)))
            .await
            .map_err(|_| SourceError::Timeout(timeout))?
    }

    async fn connect_inner(
        &self,
        notes: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> Result<Client> {
        let mut pg = self.pg.clone();
        if pg.get_application_name().is_none() {
            pg.application_name("walsync");
        }
        let tls = self.tls_config()?;
        pg.ssl_mode(match self.ssl_mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        let client = match tls {
            None => {
                let (client, conn) = pg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(login_error)?;
                tokio::spawn(tracing::Instrument::instrument(
                    drive(conn, notes),
                    tracing::info_span!("walsync-sql-connection"),
                ));
                client
            }
            Some(config) => {
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*config).clone());
                let (client, conn) = pg
                    .connect(connector)
                    .await
                    .map_err(|e| login_error(tls::explain(e)))?;
                tokio::spawn(tracing::Instrument::instrument(
                    drive(conn, notes),
                    tracing::info_span!("walsync-sql-connection"),
                ));
                client
            }
        };
        Ok(client)
    }
}

/// Authentication failures (SQLSTATE class 28) are told as such, whichever connection met them.
fn login_error(e: impl Into<SourceError>) -> SourceError {
    match e.into() {
        SourceError::Server { code, message } if code.starts_with("28") => {
            SourceError::Auth(message)
        }
        other => other,
    }
}

/// Runs the connection until it closes, passing on its notifications.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notes: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if let Some(notes) = &notes {
                    let _ = notes.send(n);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "sql connection closed");
                return;
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libpq_ssl_settings_out_of_urls() {
        let c: PgConfig = "postgres://u:secret@db.example:6543/app?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x"
            .parse()
            .unwrap();
        assert_eq!(c.ssl_mode, SslMode::VerifyFull);
        assert_eq!(
            c.ssl_root_cert.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert_eq!((c.user(), c.dbname(), c.port()), ("u", "app", 6543));
        assert_eq!(c.application_name(), "x");
        assert!(c.options().unwrap_or_default().contains("TimeZone=UTC"));
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn parses_key_value_strings() {
        let c: PgConfig = "host=localhost user=me dbname=d sslmode=verify-ca"
            .parse()
            .unwrap();
        assert_eq!(c.ssl_mode, SslMode::VerifyCa);
        assert_eq!(c.dbname(), "d");
    }

    #[test]
    fn rejects_unknown_sslmode() {
        let e = "postgres://u@h/d?sslmode=sometimes"
            .parse::<PgConfig>()
            .unwrap_err();
        assert!(e.to_string().contains("sslmode \"sometimes\""), "{e}");
    }
}
