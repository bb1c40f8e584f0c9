//! The gRPC side (and grpc-web on the same routes): the same core, lines as protobuf.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
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
    let service: Svc<S> =
        pb::sync_server::SyncServer::new(GrpcSync { server }).max_decoding_message_size(1 << 20);
    axum::Router::new()
        .route_service(
            &format!("/{}/{{*rest}}", <Svc<S> as NamedService>::NAME),
            service.map_request(|req: http::Request<axum::body::Body>| {
                req.map(tonic::body::Body::new)
            }),
        )
        .layer(tonic_web::GrpcWebLayer::new())
}

struct GrpcSync<S: BucketStore> {
    server: Arc<Server<S>>,
}

impl<S: BucketStore + 'static> GrpcSync<S> {
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<Identity, Status> {
        let value = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or(""));
        self.server
            .auth
            .authenticate_header(value)
            .await
            .map_err(|e| ApiError::unauthenticated(e).to_status())
    }
}

type LineStream = Pin<Box<dyn Stream<Item = Result<pb::SyncLine, Status>> + Send>>;

#[tonic::async_trait]
impl<S: BucketStore + 'static> pb::sync_server::Sync for GrpcSync<S> {
    type SyncStream = LineStream;

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let identity = self.authenticate(&req).await?;
        let permit = match self.server.admission.admit(&identity.user_id) {
            Ok(p) => p,
            Err(r) => {
                let mut s = r.error.to_status();
                if let Ok(v) = r.retry_after_seconds.to_string().parse() {
                    s.metadata_mut().insert("retry-after", v);
                }
                return Err(s);
            }
        };
        let request = SyncRequest::try_from(req.into_inner()).map_err(|e| {
            ApiError::new(ErrorCode::BadRequest, format!("invalid sync request: {e}")).to_status()
        })?;
        let lines = self.server.core.open(identity, request);
        let stream = ReceiverStream::new(lines).map(move |item| {
            let _held = &permit;
            match item {
                Ok(line) => Ok(pb::SyncLine::from(line)),
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

    async fn write_checkpoint(
        &self,
        req: Request<pb::WriteCheckpointRequest>,
    ) -> Result<Response<pb::WriteCheckpointResponse>, Status> {
        let identity = self.authenticate(&req).await?;
        let lsn = self.server.checkpoints.create().await?;
        let n = self
            .server
            .core
            .register_write_checkpoint(&identity.user_id, lsn);
        Ok(Response::new(pb::WriteCheckpointResponse {
            write_checkpoint: n,
        }))
    }
}
