//! A Rust client for walsync.
//!
//! - [`Connector`] opens a sync stream over either transport (HTTP NDJSON or gRPC) and asks for
//!   write checkpoints;
//! - [`ClientState`] keeps per-bucket rows and checksums, verifies each checkpoint, applies it
//!   only when complete, drops removed buckets;
//! - [`SyncClient`] ties them together and reconnects with its `after` positions when the stream
//!   ends, so a disconnect never costs a re-download or a duplicate op.

mod state;

use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{Stream, StreamExt};
use walsync_protocol::upload::{UploadReply, UploadRequest};
use walsync_protocol::{ErrorBody, Line, StreamsRequest, SyncRequest, WriteCheckpointResponse, pb};

pub use state::{ClientState, Event, LocalBucket};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the server refused the token: {0}")]
    Unauthenticated(String),
    #[error("the server answered {status} {code}: {message}")]
    Http {
        status: u16,
        code: String,
        message: String,
    },
    #[error("grpc status {code:?}: {message}")]
    Grpc { code: tonic::Code, message: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("bucket {bucket}: checksum {actual} does not match the checkpoint's {expected}")]
    ChecksumMismatch {
        bucket: String,
        expected: u32,
        actual: u32,
    },
    #[error("the stream ended")]
    Ended,
}

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `POST /sync/stream`, NDJSON.
    Http,
    /// `walsync.v1.Sync/Sync`.
    Grpc,
}

impl Transport {
    /// `http` or `grpc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Grpc => "grpc",
        }
    }
}

/// A stream of lines from the server.
pub type LineStream = Pin<Box<dyn Stream<Item = Result<Line, ClientError>> + Send>>;

/// Opens sync streams to one server with one token.
#[derive(Debug, Clone)]
pub struct Connector {
    base_url: String,
    transport: Transport,
    token: String,
    http: reqwest::Client,
    /// The longest NDJSON line accepted.
    pub max_line_bytes: usize,
}

/// Installs ring as the process's rustls provider (reqwest is built without one); harmless when
/// one is installed already.
pub fn install_crypto() {
    // reqwest is built without a default rustls provider; walsync uses ring throughout.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Connector {
    /// `base_url` like `http://127.0.0.1:8080`; both transports listen on the same port.
    pub fn new(
        base_url: &str,
        transport: Transport,
        token: &str,
    ) -> Result<Connector, ClientError> {
        install_crypto();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Connector {
            base_url: base_url.trim_end_matches('/').to_owned(),
            transport,
            token: token.to_owned(),
            http,
            max_line_bytes: 64 << 20,
        })
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Replaces the token (after a refresh).
    pub fn set_token(&mut self, token: &str) {
        self.token = token.to_owned();
    }

    /// Opens a stream.
    pub async fn open(&self, request: SyncRequest) -> Result<LineStream, ClientError> {
        match self.transport {
            Transport::Http => self.open_http(request).await,
            Transport::Grpc => self.open_grpc(request).await,
        }
    }

    /// Asks for a write checkpoint for `client_id`.
    pub async fn write_checkpoint(&self, client_id: &str) -> Result<u64, ClientError> {
        match self.transport {
            Transport::Http => {
                let resp = self
                    .http
                    .get(format!("{}/write-checkpoint2.json", self.base_url))
                    .query(&[("client_id", client_id)])
                    .bearer_auth(&self.token)
                    .send()
                    .await
                    .map_err(|e| ClientError::Transport(e.to_string()))?;
                let resp = check_http(resp).await?;
                let body: WriteCheckpointResponse = resp
                    .json()
                    .await
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                Ok(body.data.write_checkpoint)
            }
            Transport::Grpc => {
                let mut client = self.grpc().await?;
                let resp = client
                    .write_checkpoint(self.grpc_request(pb::WriteCheckpointRequest {
                        client_id: client_id.to_owned(),
                    })?)
                    .await
                    .map_err(grpc_error)?;
                Ok(resp.into_inner().write_checkpoint)
            }
        }
    }

    /// Uploads CRUD transactions (`POST /write` or gRPC `Upload`): a result per transaction.
    pub async fn upload(&self, request: &UploadRequest) -> Result<UploadReply, ClientError> {
        match self.transport {
            Transport::Http => {
                let resp = self
                    .http
                    .post(format!("{}/write", self.base_url))
                    .bearer_auth(&self.token)
                    .json(request)
                    .send()
                    .await
                    .map_err(|e| ClientError::Transport(e.to_string()))?;
                let resp = check_http(resp).await?;
                resp.json()
                    .await
                    .map_err(|e| ClientError::Protocol(e.to_string()))
            }
            Transport::Grpc => {
                let mut client = self.grpc().await?;
                let resp = client
                    .upload(self.grpc_request(pb::UploadRequest::from(request.clone()))?)
                    .await
                    .map_err(grpc_error)?;
                UploadReply::try_from(resp.into_inner()).map_err(ClientError::Protocol)
            }
        }
    }

    async fn open_http(&self, request: SyncRequest) -> Result<LineStream, ClientError> {
        let resp = self
            .http
            .post(format!("{}/sync/stream", self.base_url))
            .bearer_auth(&self.token)
            .json(&request)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let resp = check_http(resp).await?;
        Ok(ndjson(resp, self.max_line_bytes, |_: &Line| true))
    }

    async fn grpc(
        &self,
    ) -> Result<pb::sync_client::SyncClient<tonic::transport::Channel>, ClientError> {
        let channel = tonic::transport::Endpoint::from_shared(self.base_url.clone())
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(
            pb::sync_client::SyncClient::new(channel)
                .max_decoding_message_size(self.max_line_bytes),
        )
    }

    fn grpc_request<T>(&self, msg: T) -> Result<tonic::Request<T>, ClientError> {
        let mut req = tonic::Request::new(msg);
        let value = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| ClientError::Transport("token is not a valid header value".into()))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }

    /// Presence over gRPC: one bidirectional stream for this client's actions and the events
    /// of the rooms it watches.
    pub async fn presence(&self) -> Result<PresenceSession, ClientError> {
        let mut client = self.grpc().await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PresenceAction>(64);
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|a| (a, rx)) },
            );
        let resp = client
            .presence(self.grpc_request(outbound)?)
            .await
            .map_err(grpc_error)?;
        Ok(PresenceSession {
            tx,
            events: resp.into_inner(),
        })
    }

    /// One presence action over HTTP (`POST /presence`), e.g.
    /// `{"action": "join", "client_id": "tab", "room": "user_projects[1]", "state": {...}}`.
    pub async fn presence_post(&self, action: &serde_json::Value) -> Result<(), ClientError> {
        let resp = self
            .http
            .post(format!("{}/presence", self.base_url))
            .bearer_auth(&self.token)
            .json(action)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        check_http(resp).await.map(|_| ())
    }

    /// Watches a presence room over HTTP (`GET /presence/stream?room=`, NDJSON): its events as
    /// JSON, keepalives left out.
    pub async fn presence_watch(&self, room: &str) -> Result<PresenceEvents, ClientError> {
        let resp = self
            .http
            .get(format!("{}/presence/stream", self.base_url))
            .query(&[("room", room)])
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let resp = check_http(resp).await?;
        Ok(PresenceEvents(ndjson(
            resp,
            self.max_line_bytes,
            |event: &serde_json::Value| event["type"] != "keepalive",
        )))
    }

    async fn open_grpc(&self, request: SyncRequest) -> Result<LineStream, ClientError> {
        let mut client = self.grpc().await?;
        let resp = client
            .sync(self.grpc_request(pb::SyncRequest::from(request))?)
            .await
            .map_err(grpc_error)?;
        let stream = resp.into_inner().map(|item| match item {
            Ok(line) => Line::try_from(line).map_err(|e| ClientError::Protocol(e.to_string())),
            Err(status) => Err(grpc_error(status)),
        });
        Ok(Box::pin(stream))
    }
}

/// A presence room's events (JSON objects, docs/protocol.md) over HTTP.
pub struct PresenceEvents(
    Pin<Box<dyn Stream<Item = Result<serde_json::Value, ClientError>> + Send>>,
);

impl std::fmt::Debug for PresenceEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceEvents").finish_non_exhaustive()
    }
}

impl PresenceEvents {
    /// The next event; `None` once the watch ended.
    pub async fn next(&mut self) -> Option<Result<serde_json::Value, ClientError>> {
        self.0.next().await
    }
}

/// A presence stream over gRPC.
#[derive(Debug)]
pub struct PresenceSession {
    tx: tokio::sync::mpsc::Sender<pb::PresenceAction>,
    events: tonic::Streaming<pb::PresenceEvent>,
}

impl PresenceSession {
    /// Sends one action: `join`, `update`, `leave`, `message`, `heartbeat`, `watch` or `unwatch`.
    pub async fn send(
        &self,
        action: &str,
        client_id: &str,
        room: &str,
        state: Option<&serde_json::Value>,
        data: Option<&serde_json::Value>,
    ) -> Result<(), ClientError> {
        let a = pb::PresenceAction {
            action: action.to_owned(),
            client_id: client_id.to_owned(),
            room: room.to_owned(),
            state_json: state.map(ToString::to_string).unwrap_or_default(),
            data_json: data.map(ToString::to_string).unwrap_or_default(),
        };
        self.tx.send(a).await.map_err(|_| ClientError::Ended)
    }

    /// The next event as JSON (an `error` event for a refused action); `None` once the stream
    /// ended.
    pub async fn next(&mut self) -> Option<Result<serde_json::Value, ClientError>> {
        match self.events.message().await {
            Ok(Some(e)) => Some(
                serde_json::from_str(&e.json).map_err(|e| ClientError::Protocol(e.to_string())),
            ),
            Ok(None) => None,
            Err(status) => Some(Err(grpc_error(status))),
        }
    }
}

fn grpc_error(status: tonic::Status) -> ClientError {
    if status.code() == tonic::Code::Unauthenticated {
        ClientError::Unauthenticated(status.message().to_owned())
    } else {
        ClientError::Grpc {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

async fn check_http(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (String::new(), text),
    };
    if status.as_u16() == 401 {
        return Err(ClientError::Unauthenticated(message));
    }
    Err(ClientError::Http {
        status: status.as_u16(),
        code,
        message,
    })
}

/// The NDJSON lines of `resp` as `T`, those `keep` keeps; a line longer than `max` bytes ends
/// the stream with an error.
fn ndjson<T: serde::de::DeserializeOwned + Send + 'static>(
    resp: reqwest::Response,
    max: usize,
    keep: fn(&T) -> bool,
) -> Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send>> {
    let mut body = resp.bytes_stream();
    async_lines(move |tx| async move {
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(ClientError::Transport(e.to_string()))).await;
                    return;
                }
            };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line = buf.split_to(pos + 1);
                let parsed = serde_json::from_slice::<T>(&line[..pos])
                    .map_err(|e| ClientError::Protocol(format!("bad line: {e}")));
                if parsed.as_ref().is_ok_and(|v| !keep(v)) {
                    continue;
                }
                if tx.send(parsed).await.is_err() {
                    return;
                }
            }
            if buf.len() > max {
                let _ = tx
                    .send(Err(ClientError::Protocol(format!(
                        "a line longer than {max} bytes"
                    ))))
                    .await;
                return;
            }
        }
    })
}

/// A stream fed by a task through a small channel.
fn async_lines<T: Send + 'static, F, Fut>(
    f: F,
) -> Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, ClientError>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(tracing::Instrument::instrument(
        f(tx),
        tracing::info_span!("walsync-client-stream"),
    ));
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// A client that keeps its state across reconnects.
pub struct SyncClient {
    connector: Connector,
    client_id: String,
    parameters: serde_json::Map<String, serde_json::Value>,
    /// Sync Streams subscriptions (`None`: the default streams, as a client unaware of streams).
    streams: Option<StreamsRequest>,
    state: ClientState,
    stream: Option<LineStream>,
    /// Streams opened so far (1 after the first connect).
    pub connects: u64,
}

impl std::fmt::Debug for SyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncClient")
            .field("client_id", &self.client_id)
            .field("connected", &self.stream.is_some())
            .field("connects", &self.connects)
            .finish_non_exhaustive()
    }
}

impl SyncClient {
    pub fn new(connector: Connector, client_id: &str) -> SyncClient {
        SyncClient {
            connector,
            client_id: client_id.to_owned(),
            parameters: serde_json::Map::new(),
            streams: None,
            state: ClientState::new(),
            stream: None,
            connects: 0,
        }
    }

    /// Client parameters for `request.parameters()`.
    pub fn with_parameters(mut self, p: serde_json::Map<String, serde_json::Value>) -> SyncClient {
        self.parameters = p;
        self
    }

    /// Sync Streams: whether the default streams are included and the subscriptions, sent with
    /// the next (re)connect. Changing them reconnects: the next checkpoint has the new bucket
    /// set, and buckets no longer selected are dropped.
    pub fn set_streams(&mut self, streams: StreamsRequest) {
        self.streams = Some(streams);
        self.stream = None;
    }

    pub fn state(&self) -> &ClientState {
        &self.state
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    pub fn connector_mut(&mut self) -> &mut Connector {
        &mut self.connector
    }

    /// Asks for a write checkpoint for this client: its streams' checkpoints carry it once
    /// replication has passed it (other clients of the user are not told).
    pub async fn write_checkpoint(&self) -> Result<u64, ClientError> {
        self.connector.write_checkpoint(&self.client_id).await
    }

    /// Drops the connection; the next call reconnects with the current `after` positions.
    pub fn disconnect(&mut self) {
        self.stream = None;
    }

    /// The request a (re)connect sends.
    pub fn request(&self) -> SyncRequest {
        SyncRequest {
            buckets: self.state.bucket_requests(),
            client_id: Some(self.client_id.clone()),
            parameters: self.parameters.clone(),
            raw_data: Some(true),
            include_checksum: Some(true),
            binary_data: Some(false),
            streams: self.streams.clone(),
        }
    }

    /// Opens the stream if needed.
    pub async fn connect(&mut self) -> Result<(), ClientError> {
        if self.stream.is_none() {
            self.stream = Some(self.connector.open(self.request()).await?);
            self.connects += 1;
        }
        Ok(())
    }

    /// The next event. A checksum failure resets that bucket and reconnects; the end of the
    /// stream or another error is returned (call again to reconnect with `after`).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        self.connect().await?;
        let Some(stream) = self.stream.as_mut() else {
            return Err(ClientError::Ended);
        };
        let line = match stream.next().await {
            Some(Ok(line)) => line,
            Some(Err(e)) => {
                self.stream = None;
                return Err(e);
            }
            None => {
                self.stream = None;
                return Err(ClientError::Ended);
            }
        };
        match self.state.apply(line) {
            Ok(ev) => Ok(ev),
            Err(e) => {
                if let ClientError::ChecksumMismatch { bucket, .. } = &e {
                    tracing::warn!(bucket, "checksum mismatch: downloading the bucket again");
                    self.state.reset_bucket(bucket);
                }
                self.stream = None;
                Err(e)
            }
        }
    }

    /// Reads until a checkpoint is complete and applied; returns its op id.
    pub async fn next_checkpoint(&mut self) -> Result<u64, ClientError> {
        loop {
            if let Event::Complete { last_op_id } = self.next_event().await? {
                return Ok(last_op_id);
            }
        }
    }

    /// Reads checkpoints until `done` holds for the state, for at most `timeout`.
    pub async fn until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&ClientState) -> bool,
    ) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.state) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.next_checkpoint()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(ClientError::Transport(format!(
                        "condition not reached within {timeout:?}"
                    )));
                }
            }
        }
    }
}
