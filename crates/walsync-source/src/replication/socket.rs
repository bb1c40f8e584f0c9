//! The byte stream under a replication connection: TCP, TCP with TLS, or a Unix socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::connect::{PgConfig, SslMode};
use crate::error::{Result, SourceError};

pub(super) enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// Opens the socket and negotiates TLS as `sslmode` says (PostgreSQL does not use TLS on Unix
/// sockets, and neither does libpq).
pub(super) async fn open(config: &PgConfig) -> Result<Stream> {
    let port = config.port();
    let host = match config.host() {
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            return Ok(Stream::Unix(UnixStream::connect(path).await?));
        }
        Host::Tcp(host) => host.clone(),
    };
    let mut tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let Some(tls) = config.tls_config()? else {
        return Ok(Stream::Tcp(tcp));
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    match tcp.read_u8().await? {
        b'S' => {
            let name = ServerName::try_from(host.clone()).map_err(|_| {
                SourceError::Config(format!("{host:?} is not a valid tls server name"))
            })?;
            let stream = TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| SourceError::Tls(format!("handshake with {host} failed: {e}")))?;
            Ok(Stream::Tls(Box::new(stream)))
        }
        b'N' if config.ssl_mode == SslMode::Prefer => {
            // The server said no to TLS on this socket; it can still be used as it is.
            Ok(Stream::Tcp(tcp))
        }
        b'N' => Err(SourceError::Tls(format!(
            "sslmode {:?} needs tls but the server at {host} does not offer it",
            config.ssl_mode
        ))),
        other => Err(SourceError::Protocol(format!(
            "unexpected answer {other:#x} to the ssl request"
        ))),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
