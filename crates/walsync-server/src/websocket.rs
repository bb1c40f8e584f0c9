//! The sync stream as PowerSync's SDKs open it over a WebSocket (their default on React Native):
//! RSocket on `GET /sync/stream` upgraded, one RSocket frame per binary message
//! ([`walsync_protocol::rsocket`]).
//!
//! 1. The client's SETUP carries the token in its metadata (`{"token": "Token …"}`, JSON or BSON
//!    as its metadata mime type says). Nothing else is read before the token is valid and the
//!    stream admitted, exactly as for HTTP (`server.max_connections`,
//!    `server.max_streams_per_user`); a refusal is an ERROR frame (`REJECTED_SETUP`) whose
//!    message starts with the same code the HTTP error has, and the socket closes.
//! 2. One REQUEST_STREAM (metadata `{"path": "/sync/stream"}`, data the sync request as JSON or
//!    BSON) opens the sync core's stream. Its lines go out as PAYLOAD frames, each a BSON
//!    document (the SDKs decode binary lines as BSON), **never more than the client granted**:
//!    the request's initial N plus every REQUEST_N since. While it grants nothing the core's
//!    bounded buffer fills and a client that grants nothing for `sync.stall_timeout_seconds` is
//!    disconnected, as a client that stops reading an HTTP body is.
//! 3. KEEPALIVE frames asking for a reply get one; a client silent for its SETUP's lifetime is
//!    gone and the socket closes. CANCEL, the client's ERROR or a close end the stream. The end
//!    of the core's stream (a server stopping) is a PAYLOAD with COMPLETE; the server's own
//!    fault is an ERROR frame on the stream.
//!
//! Frames and messages are bounded by `server.max_request_bytes`; SETUP and the request must
//! arrive within `server.request_timeout_seconds`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::time::Instant;
use walsync_protocol::rsocket::{Frame, code, decode};
use walsync_protocol::{Line, SyncRequest};
use walsync_storage::BucketStore;
use walsync_sync::SyncError;

use crate::{ApiError, ErrorCode, Server};

/// The path the SDKs name in their request's metadata.
const PATH: &str = "/sync/stream";

pub(crate) async fn upgrade<S: BucketStore + 'static>(
    State(server): State<Arc<Server<S>>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // A plain GET is not a stream: the JSON error every other wrong method gets.
    let Ok(ws) = ws else {
        return ApiError::new(
            ErrorCode::MethodNotAllowed,
            "GET /sync/stream opens a WebSocket (RSocket) and needs the upgrade headers; POST opens the HTTP stream",
        )
        .into_response();
    };
    let limit = server.config.max_request_bytes.max(1024);
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            let mut conn = Conn {
                socket,
                lifetime: Duration::from_secs(90),
                last_heard: Instant::now(),
            };
            if let Err(e) = serve(&server, &mut conn).await {
                tracing::debug!(error = %e, "websocket sync stream ended");
            }
            let _ = conn.socket.send(Message::Close(None)).await;
        })
}

/// Why a socket ended early (for the debug log).
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("the client closed the socket")]
    Closed,
    #[error("websocket: {0}")]
    Socket(#[from] axum::Error),
    #[error("{0}")]
    Refused(String),
}

struct Conn {
    socket: WebSocket,
    /// How long the client may stay silent (its SETUP's lifetime).
    lifetime: Duration,
    last_heard: Instant,
}

impl Conn {
    async fn send(&mut self, frame: &Frame) -> Result<(), End> {
        self.socket
            .send(Message::Binary(frame.encode().into()))
            .await?;
        Ok(())
    }

    /// Sends an ERROR frame and ends with it.
    async fn refuse(&mut self, stream: u32, code: u32, message: String) -> End {
        let _ = self
            .send(&Frame::Error {
                stream,
                code,
                message: message.clone(),
            })
            .await;
        End::Refused(message)
    }

    /// The next frame, answering keepalives on the way; `Ok(None)` when `deadline` passes.
    async fn frame(&mut self, deadline: Instant) -> Result<Option<Frame>, End> {
        loop {
            let message = match tokio::time::timeout_at(deadline, self.socket.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(End::Closed),
                Ok(Some(m)) => m?,
            };
            self.last_heard = Instant::now();
            let bytes = match message {
                Message::Binary(b) => b,
                Message::Close(_) => return Err(End::Closed),
                // tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Text(_) => {
                    return Err(self
                        .refuse(
                            0,
                            code::CONNECTION_ERROR,
                            "rsocket frames travel in binary websocket messages".into(),
                        )
                        .await);
                }
            };
            match Frame::decode(&bytes) {
                Ok(Frame::Keepalive {
                    respond: true,
                    data,
                    ..
                }) => {
                    self.send(&Frame::Keepalive {
                        respond: false,
                        last_position: 0,
                        data,
                    })
                    .await?;
                }
                Ok(Frame::Keepalive { .. }) => {}
                Ok(frame) => return Ok(Some(frame)),
                Err(e) => {
                    return Err(self.refuse(0, code::CONNECTION_ERROR, e.to_string()).await);
                }
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct SetupMetadata {
    token: Option<String>,
}

#[derive(serde::Deserialize)]
struct RequestMetadata {
    path: Option<String>,
}

/// `code: message`, as the HTTP error's code and message.
fn said(e: &ApiError) -> String {
    format!("{}: {}", e.code.as_str(), e.message)
}

async fn serve<S: BucketStore + 'static>(server: &Server<S>, conn: &mut Conn) -> Result<(), End> {
    let wait = Duration::from_secs(server.config.request_timeout_seconds.max(1));
    let deadline = Instant::now() + wait;
    let Some(frame) = conn.frame(deadline).await? else {
        return Err(conn
            .refuse(
                0,
                code::INVALID_SETUP,
                format!("no rsocket SETUP within {wait:?}"),
            )
            .await);
    };
    let Frame::Setup(setup) = frame else {
        return Err(conn
            .refuse(
                0,
                code::INVALID_SETUP,
                "the first frame must be SETUP".into(),
            )
            .await);
    };
    if setup.major != 1 || setup.resume || setup.lease {
        return Err(conn
            .refuse(
                0,
                code::UNSUPPORTED_SETUP,
                "rsocket 1.x without resume or lease is supported".into(),
            )
            .await);
    }
    conn.lifetime = Duration::from_millis(u64::from(setup.lifetime_ms.clamp(1_000, 600_000)));
    // Authentication before anything else of the client's is read.
    let token = setup
        .metadata
        .as_deref()
        .map(|m| decode::<SetupMetadata>(&setup.metadata_mime, m))
        .transpose()
        .ok()
        .flatten()
        .and_then(|m| m.token);
    let identity = match crate::http::authenticate_value(server, token.as_deref()).await {
        Ok(i) => i,
        Err(e) => return Err(conn.refuse(0, code::REJECTED_SETUP, said(&e)).await),
    };
    let permit = match server.admission.admit(&identity.user_id) {
        Ok(p) => p,
        Err(r) => {
            crate::metrics::refused(r.error.code);
            let message = format!(
                "{}; retry after {} s",
                said(&r.error),
                r.retry_after_seconds
            );
            return Err(conn.refuse(0, code::REJECTED_SETUP, message).await);
        }
    };
    let (stream, initial_n, request) = loop {
        let Some(frame) = conn.frame(deadline).await? else {
            let e = ApiError::new(
                ErrorCode::RequestTimeout,
                format!("no sync request within {wait:?}"),
            );
            return Err(conn.refuse(0, code::CONNECTION_ERROR, said(&e)).await);
        };
        match frame {
            Frame::RequestStream {
                stream,
                initial_n,
                follows,
                metadata,
                data,
            } => {
                let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
                let e = if follows {
                    bad("a fragmented sync request is not supported".into())
                } else if stream == 0 || stream % 2 == 0 {
                    bad(format!("stream id {stream} is not a client's"))
                } else if let Some(path) = metadata
                    .as_deref()
                    .and_then(|m| decode::<RequestMetadata>(&setup.metadata_mime, m).ok())
                    .and_then(|m| m.path)
                    .filter(|p| p != PATH)
                {
                    ApiError::new(ErrorCode::NotFound, format!("no such path: {path}"))
                } else {
                    let request = if data.iter().all(u8::is_ascii_whitespace) {
                        Ok(SyncRequest::default())
                    } else {
                        decode::<SyncRequest>(&setup.data_mime, &data)
                    };
                    match request {
                        Ok(r) => break (stream, initial_n, r),
                        Err(m) => bad(format!("invalid sync request: {m}")),
                    }
                };
                return Err(conn.refuse(stream, code::INVALID, said(&e)).await);
            }
            Frame::Error { message, .. } => return Err(End::Refused(message)),
            Frame::Cancel { .. } => return Err(End::Closed),
            _ => {}
        }
    };
    let open = crate::metrics::OpenStream::new("websocket");
    let mut lines = server.core.open(identity, request);
    let mut credit = u64::from(initial_n);
    // A client that grants nothing for the stall timeout is let go, as a client that stops
    // reading an HTTP body is (the core's own timeout cannot tell it while no line is asked).
    let stall = server.core.config().stall_timeout;
    let mut starved_since = Instant::now();
    let result = loop {
        let silent_until = conn.last_heard + conn.lifetime;
        if credit > 0 {
            starved_since = Instant::now();
        }
        tokio::select! {
            () = tokio::time::sleep_until(starved_since + stall), if credit == 0 => {
                let e = ApiError::new(
                    ErrorCode::TooSlow,
                    format!("the client granted no line for {stall:?} (rsocket REQUEST_N)"),
                );
                break Err(conn.refuse(stream, code::APPLICATION_ERROR, said(&e)).await);
            }
            line = lines.next(), if credit > 0 => match line {
                Some(Ok(line)) => {
                    let data = Line::to_bson(&line);
                    open.sent(data.len());
                    credit -= 1;
                    conn.send(&Frame::Payload {
                        stream,
                        next: true,
                        complete: false,
                        follows: false,
                        metadata: None,
                        data,
                    })
                    .await?;
                }
                // The server stops: the stream completes; the client reconnects with `after`.
                None | Some(Err(SyncError::ShuttingDown)) => {
                    break conn
                        .send(&Frame::Payload {
                            stream,
                            next: false,
                            complete: true,
                            follows: false,
                            metadata: None,
                            data: Vec::new(),
                        })
                        .await;
                }
                Some(Err(SyncError::Storage(e))) => {
                    let e = ApiError::internal("sync stream failed", &e);
                    break Err(conn.refuse(stream, code::APPLICATION_ERROR, said(&e)).await);
                }
                Some(Err(e)) => {
                    break Err(conn.refuse(stream, code::APPLICATION_ERROR, e.to_string()).await);
                }
            },
            frame = conn.frame(silent_until) => match frame? {
                None => break Err(End::Refused(format!(
                    "the client was silent for {:?}, its keepalive lifetime", conn.lifetime
                ))),
                Some(Frame::RequestN { stream: s, n }) if s == stream => {
                    credit = credit.saturating_add(u64::from(n));
                }
                Some(Frame::Cancel { stream: s }) if s == stream => break Ok(()),
                Some(Frame::Error { message, .. }) => break Err(End::Refused(message)),
                Some(Frame::RequestStream { stream: other, .. }) => {
                    // One sync stream per socket, as the SDKs open them.
                    conn.send(&Frame::Error {
                        stream: other,
                        code: code::REJECTED,
                        message: "one sync stream per websocket".into(),
                    })
                    .await?;
                }
                Some(_) => {}
            },
        }
    };
    // The admission lives as long as the stream.
    drop(permit);
    result
}
