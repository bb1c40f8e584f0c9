//! The gRPC side (and grpc-web on the same routes): the same core, lines as protobuf.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use walsync_protocol::{SyncRequest, pb};
use walsync_storage::BucketStore;
use walsync_sync::{Identity, SyncError};

use crate::{ApiError, ErrorCode, Server};

/// The gRPC service's routes, grpc-web included. Only its own paths: every other path falls to
/// the server's 404.
pub(crate) fn router<S: BucketStore + 'static>(server: Arc<Server<S>>) -> axum::Router {
    use tonic::server::NamedService;
    use tower::ServiceExt;
    type Svc<S> = pb::sync_server::SyncServer<GrpcSync<S>>;
    let server_for_auth = server.clone();
    let service: Svc<S> =
        pb::sync_server::SyncServer::new(GrpcSync { server }).max_decoding_message_size(1 << 20);
    axum::Router::new()
        .route_service(
            &format!("/{}/{{*rest}}", <Svc<S> as NamedService>::NAME),
            service.map_request(|req: http::Request<axum::body::Body>| {
                req.map(tonic::body::Body::new)
            }),
        )
        // Authentication before tonic decodes anything of the body (as over HTTP).
        .layer(axum::middleware::from_fn_with_state(
            server_for_auth,
            authenticate_first,
        ))
        .layer(tonic_web::GrpcWebLayer::new())
}

/// Authenticates a gRPC (or grpc-web) request from its headers alone; a refused one is answered
/// with its status and its body is never read. The identity travels to the handler in the
/// request's extensions.
async fn authenticate_first<S: BucketStore + 'static>(
    axum::extract::State(server): axum::extract::State<Arc<Server<S>>>,
    mut req: http::Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let value = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    match server.auth.authenticate_header(value).await {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        Err(e) => {
            tracing::debug!(error = %e, "refused a token");
            crate::metrics::auth_failure(e.reason());
            let (parts, ()) = ApiError::unauthenticated(e)
                .to_status()
                .into_http::<()>()
                .into_parts();
            axum::response::Response::from_parts(parts, axum::body::Body::empty())
        }
    }
}

/// A refusal of admission as a gRPC status, with `retry-after` in its metadata.
fn refused_status(r: crate::admission::Refused) -> Status {
    crate::metrics::refused(r.error.code);
    let mut s = r.error.to_status();
    if let Ok(v) = r.retry_after_seconds.to_string().parse() {
        s.metadata_mut().insert("retry-after", v);
    }
    s
}

struct GrpcSync<S: BucketStore> {
    server: Arc<Server<S>>,
}

/// The identity [`authenticate_first`] found for the request.
fn identity_of<T>(req: &Request<T>) -> Result<Identity, Status> {
    req.extensions().get::<Identity>().cloned().ok_or_else(|| {
        ApiError::internal(
            "grpc request without an identity",
            &"the auth layer did not run",
        )
        .to_status()
    })
}

type LineStream = Pin<Box<dyn Stream<Item = Result<pb::SyncLine, Status>> + Send>>;

#[tonic::async_trait]
impl<S: BucketStore + 'static> pb::sync_server::Sync for GrpcSync<S> {
    type SyncStream = LineStream;
    type PresenceStream = crate::presence::EventStream;

    async fn presence(
        &self,
        req: Request<tonic::Streaming<pb::PresenceAction>>,
    ) -> Result<Response<Self::PresenceStream>, Status> {
        let identity = identity_of(&req)?;
        let permit = match self.server.admission.admit(&identity.user_id) {
            Ok(p) => p,
            Err(r) => return Err(refused_status(r)),
        };
        Ok(Response::new(crate::presence::grpc(
            self.server.core.clone(),
            identity,
            req.into_inner(),
            permit,
        )))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let identity = identity_of(&req)?;
        let permit = match self.server.admission.admit(&identity.user_id) {
            Ok(p) => p,
            Err(r) => return Err(refused_status(r)),
        };
        let request = SyncRequest::try_from(req.into_inner()).map_err(|e| {
            ApiError::new(ErrorCode::BadRequest, format!("invalid sync request: {e}")).to_status()
        })?;
        let lines = self.server.core.open(identity, request);
        let open = crate::metrics::OpenStream::new("grpc");
        let stream = lines.map(move |item| {
            let _held = &permit;
            match item {
                Ok(line) => {
                    let line = pb::SyncLine::from(line);
                    open.sent(prost::Message::encoded_len(&line));
                    Ok(line)
                }
                Err(SyncError::TooSlow(d)) => Err(ApiError::new(
                    ErrorCode::TooSlow,
                    format!("the client did not read for {d:?}"),
                )
                .to_status()),
                Err(SyncError::ShuttingDown) => Err(ApiError::new(
                    ErrorCode::ShuttingDown,
                    "the server is shutting down",
                )
                .to_status()),
                Err(e) => Err(ApiError::internal("sync stream failed", &e).to_status()),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload(
        &self,
        req: Request<pb::UploadRequest>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        let identity = identity_of(&req)?;
        if let Err(r) = self.server.upload_rate.admit(&identity.user_id, "uploads") {
            return Err(refused_status(r));
        }
        let request = walsync_write::UploadRequest::try_from(req.into_inner()).map_err(|e| {
            ApiError::new(ErrorCode::BadRequest, format!("invalid upload: {e}")).to_status()
        })?;
        match self.server.apply_upload(&identity, &request).await {
            Ok(reply) => Ok(Response::new(reply.into())),
            Err(e) => Err(e.to_status()),
        }
    }

    async fn write_checkpoint(
        &self,
        req: Request<pb::WriteCheckpointRequest>,
    ) -> Result<Response<pb::WriteCheckpointResponse>, Status> {
        let identity = identity_of(&req)?;
        if let Err(r) = self
            .server
            .write_checkpoint_rate
            .admit(&identity.user_id, "write checkpoints")
        {
            crate::metrics::write_checkpoint("rate_limited");
            return Err(refused_status(r));
        }
        let client_id = req.into_inner().client_id;
        let lsn = match self.server.checkpoints.create().await {
            Ok(lsn) => {
                crate::metrics::write_checkpoint("created");
                lsn
            }
            Err(e) => {
                crate::metrics::write_checkpoint("unavailable");
                return Err(e.to_status());
            }
        };
        let n = self
            .server
            .core
            .register_write_checkpoint(&identity.user_id, &client_id, lsn);
        Ok(Response::new(pb::WriteCheckpointResponse {
            write_checkpoint: n,
        }))
    }
}
