//! The HTTP side: PowerSync's sync stream as NDJSON, write checkpoints, health.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tower_http::cors::{AllowOrigin, CorsLayer};
use walsync_protocol::{
    ErrorBody, ErrorDetail, Line, SyncRequest, WriteCheckpointData, WriteCheckpointResponse,
};
use walsync_storage::BucketStore;
use walsync_sync::{Identity, SyncError};

use crate::{ApiError, ErrorCode, Server};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.http_status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_owned(),
                message: self.message,
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

/// Whether a request speaks gRPC (or grpc-web), which expects its errors as gRPC statuses.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"))
}

fn refuse(headers: &HeaderMap, e: ApiError) -> Response {
    if is_grpc(headers) {
        let (parts, ()) = e.to_status().into_http::<()>().into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    e.into_response()
}

pub(crate) async fn not_found(uri: http::Uri, headers: HeaderMap) -> Response {
    refuse(
        &headers,
        ApiError::new(ErrorCode::NotFound, format!("no such path: {}", uri.path())),
    )
}

pub(crate) async fn method_not_allowed(
    method: http::Method,
    uri: http::Uri,
    headers: HeaderMap,
) -> Response {
    refuse(
        &headers,
        ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{} does not take {method}", uri.path()),
        ),
    )
}

pub(crate) fn router<S: BucketStore + 'static>(server: Arc<Server<S>>) -> Router {
    Router::new()
        .route(
            "/sync/stream",
            post(sync_stream::<S>).get(crate::websocket::upgrade::<S>),
        )
        .route("/write-checkpoint2.json", get(write_checkpoint::<S>))
        .route("/write", post(upload::<S>))
        .route("/presence", post(crate::presence::post::<S>))
        .route("/presence/stream", get(crate::presence::stream::<S>))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready::<S>))
        .route("/metrics", get(metrics_text::<S>))
        .route("/admin/status", get(admin_status::<S>))
        .with_state(server)
}

pub(crate) fn cors(origins: &[String]) -> CorsLayer {
    use http::Method;
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-grpc-web"),
            header::HeaderName::from_static("x-user-agent"),
            header::HeaderName::from_static("grpc-timeout"),
        ])
        .expose_headers([
            header::HeaderName::from_static("grpc-status"),
            header::HeaderName::from_static("grpc-message"),
            header::RETRY_AFTER,
        ])
}

pub(crate) async fn authenticate<S: BucketStore + 'static>(
    server: &Server<S>,
    headers: &HeaderMap,
) -> Result<Identity, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    authenticate_value(server, value).await
}

/// The identity an `Authorization` value (`Bearer …` or `Token …`) proves, wherever it came
/// from (a header, a WebSocket's SETUP); a refusal is counted and logged here.
pub(crate) async fn authenticate_value<S: BucketStore + 'static>(
    server: &Server<S>,
    value: Option<&str>,
) -> Result<Identity, ApiError> {
    server.auth.authenticate_header(value).await.map_err(|e| {
        tracing::debug!(error = %e, "refused a token");
        crate::metrics::auth_failure(e.reason());
        ApiError::unauthenticated(e)
    })
}

pub(crate) fn refused(r: crate::admission::Refused) -> Response {
    crate::metrics::refused(r.error.code);
    let mut resp = r.error.into_response();
    if let Ok(v) = HeaderValue::from_str(&r.retry_after_seconds.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

async fn sync_stream<S: BucketStore + 'static>(
    State(server): State<Arc<Server<S>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let identity = match authenticate(&server, &headers).await {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let permit = match server.admission.admit(&identity.user_id) {
        Ok(p) => p,
        Err(r) => return refused(r),
    };
    let bytes = match read_body(&server, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let request: SyncRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        SyncRequest::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                return ApiError::new(ErrorCode::BadRequest, format!("invalid sync request: {e}"))
                    .into_response();
            }
        }
    };
    // PowerSync's clients prefer BSON documents to NDJSON lines; others get NDJSON.
    let (encode, content_type): (fn(&Line) -> Vec<u8>, _) = if headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(walsync_protocol::prefers_bson)
    {
        (Line::to_bson, walsync_protocol::BSON_STREAM)
    } else {
        (Line::to_ndjson, walsync_protocol::NDJSON)
    };
    let lines = server.core.open(identity, request);
    // A shutdown ends the body cleanly (the client reconnects elsewhere or later, with `after`),
    // rather than aborting it mid-chunk.
    let lines =
        lines.take_while(|item| std::future::ready(!matches!(item, Err(SyncError::ShuttingDown))));
    let open = crate::metrics::OpenStream::new("http");
    let stream = lines.map(move |item| {
        // The admission lives as long as the stream.
        let _held = &permit;
        match item {
            Ok(line) => {
                let bytes = Bytes::from(encode(&line));
                open.sent(bytes.len());
                Ok(bytes)
            }
            // The body ends; the client reconnects with `after`. Only the server's own faults are
            // errors (a slow client or a shutdown is not).
            Err(SyncError::Storage(e)) => Err(std::io::Error::other(ApiError::internal(
                "sync stream failed",
                &e,
            ))),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    });
    streamed(Body::from_stream(stream), content_type)
}

/// A streamed NDJSON answer: not cached, not buffered by proxies that honour
/// `X-Accel-Buffering`.
pub(crate) fn ndjson(body: Body) -> Response {
    streamed(body, walsync_protocol::NDJSON)
}

/// A streamed answer of `content_type`, not cached, not buffered by proxies.
fn streamed(body: Body, content_type: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Reads a request body of at most `server.max_request_bytes` within
/// `server.request_timeout_seconds` (a client that sends it slowly holds nothing for long).
pub(crate) async fn read_body<S: BucketStore + 'static>(
    server: &Server<S>,
    body: Body,
) -> Result<Bytes, ApiError> {
    let read = axum::body::to_bytes(body, server.config.max_request_bytes);
    let timeout = std::time::Duration::from_secs(server.config.request_timeout_seconds.max(1));
    let Ok(read) = tokio::time::timeout(timeout, read).await else {
        return Err(ApiError::new(
            ErrorCode::RequestTimeout,
            format!("the request body did not arrive within {timeout:?}"),
        ));
    };
    read.map_err(|_| {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body exceeds {} bytes",
                server.config.max_request_bytes
            ),
        )
    })
}

/// `POST /write`: the client's CRUD transactions, each applied whole or not at all, with a
/// result per transaction and a write checkpoint.
async fn upload<S: BucketStore + 'static>(
    State(server): State<Arc<Server<S>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let identity = match authenticate(&server, &headers).await {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    if let Err(r) = server.upload_rate.admit(&identity.user_id, "uploads") {
        return refused(r);
    }
    let bytes = match read_body(&server, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let request: walsync_write::UploadRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(ErrorCode::BadRequest, format!("invalid upload: {e}"))
                .into_response();
        }
    };
    match server.apply_upload(&identity, &request).await {
        Ok(reply) => axum::Json(reply).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The query of `GET /write-checkpoint2.json`.
#[derive(Debug, serde::Deserialize)]
struct WriteCheckpointQuery {
    client_id: Option<String>,
}

async fn write_checkpoint<S: BucketStore + 'static>(
    State(server): State<Arc<Server<S>>>,
    headers: HeaderMap,
    uri: http::Uri,
) -> Response {
    let identity = match authenticate(&server, &headers).await {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    // The query is read after authentication (an anonymous caller learns nothing of it).
    let query = match axum::extract::Query::<WriteCheckpointQuery>::try_from_uri(&uri) {
        Ok(q) => q.0,
        Err(e) => {
            return ApiError::new(ErrorCode::BadRequest, format!("invalid query: {e}"))
                .into_response();
        }
    };
    if let Err(r) = server
        .write_checkpoint_rate
        .admit(&identity.user_id, "write checkpoints")
    {
        crate::metrics::write_checkpoint("rate_limited");
        return refused(r);
    }
    // Only this client's streams are told when replication has passed it.
    let client_id = query.client_id.unwrap_or_default();
    match server.checkpoints.create().await {
        Ok(lsn) => {
            crate::metrics::write_checkpoint("created");
            let n = server
                .core
                .register_write_checkpoint(&identity.user_id, &client_id, lsn);
            axum::Json(WriteCheckpointResponse {
                data: WriteCheckpointData {
                    write_checkpoint: n,
                },
            })
            .into_response()
        }
        Err(e) => {
            crate::metrics::write_checkpoint("unavailable");
            e.into_response()
        }
    }
}

async fn admin_status<S: BucketStore + 'static>(
    State(server): State<Arc<Server<S>>>,
    headers: HeaderMap,
) -> Response {
    let Some(token) = &server.config.admin_token else {
        return ApiError::new(
            ErrorCode::NotFound,
            "the admin endpoint is off: set server.admin_token",
        )
        .into_response();
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !token.matches(given.trim()) {
        crate::metrics::auth_failure("admin");
        return ApiError::new(ErrorCode::Unauthenticated, "the admin token does not match")
            .into_response();
    }
    match server.status.get() {
        Some(render) => axum::Json(render()).into_response(),
        None => {
            ApiError::new(ErrorCode::NotFound, "no status is kept by this server").into_response()
        }
    }
}

async fn metrics_text<S: BucketStore + 'static>(State(server): State<Arc<Server<S>>>) -> Response {
    match server.metrics_render.get() {
        Some(render) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            render(),
        )
            .into_response(),
        None => {
            ApiError::new(ErrorCode::NotFound, "no metrics recorder is installed").into_response()
        }
    }
}

async fn ready<S: BucketStore + 'static>(State(server): State<Arc<Server<S>>>) -> Response {
    if let Some(Err(why)) = server.readiness.get().map(|check| check()) {
        return ApiError::new(ErrorCode::NotReady, why).into_response();
    }
    match server.core.store().checkpoint() {
        Ok(cp) if server.core.servable(&cp) => (StatusCode::OK, "ready").into_response(),
        Ok(cp) if cp.snapshot_complete => ApiError::new(
            ErrorCode::NotReady,
            "the buckets follow other sync rules: the tables are being copied anew for these",
        )
        .into_response(),
        Ok(_) => ApiError::new(ErrorCode::NotReady, "the initial snapshot is still running")
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "readiness check could not read the store");
            ApiError::new(ErrorCode::NotReady, "the store cannot be read").into_response()
        }
    }
}
