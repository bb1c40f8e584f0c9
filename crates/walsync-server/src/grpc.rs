//! The gRPC side (and grpc-web on the same routes): the same core, lines as protobuf.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use walsync_protocol::{SyncRequest, pb};
use walsync_storage::BucketStore;
use walsync_sync::{Identity, SyncError};

use crate::{ApiError, Server};

pub(crate) fn router<S: BucketStore + 'static>(server: Arc<Server<S>>) -> axum::Router {
    let service =
        pb::sync_server::SyncServer::new(GrpcSync { server }).max_decoding_message_size(1 << 20);
    tonic::service::Routes::new(service)
        .prepare()
        .into_axum_router()
        .layer(tonic_web::GrpcWebLayer::new())
}

struct GrpcSync<S: BucketStore> {
    server: Arc<Server<S>>,
}

fn status(e: ApiError) -> Status {
    match e.status {
        401 => Status::unauthenticated(e.message),
        429 => Status::resource_exhausted(e.message),
        400 | 413 => Status::invalid_argument(e.message),
        503 => Status::unavailable(e.message),
        _ => Status::internal(e.message),
    }
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
            .map_err(|e| status(ApiError::unauthenticated(e)))
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
        let Ok(permit) = self.server.admission.clone().try_acquire_owned() else {
            let mut s = Status::resource_exhausted("too many connections; retry later");
            if let Ok(v) = self.server.config.retry_after_seconds.to_string().parse() {
                s.metadata_mut().insert("retry-after", v);
            }
            return Err(s);
        };
        let request = SyncRequest::try_from(req.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let lines = self.server.core.open(identity, request);
        let stream = ReceiverStream::new(lines).map(move |item| {
            let _held = &permit;
            match item {
                Ok(line) => Ok(pb::SyncLine::from(line)),
                Err(SyncError::TooSlow(d)) => Err(Status::resource_exhausted(format!(
                    "the client did not read for {d:?}"
                ))),
                Err(SyncError::ShuttingDown) => Err(Status::unavailable("shutting down")),
                Err(e) => Err(Status::internal(e.to_string())),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write_checkpoint(
        &self,
        req: Request<pb::WriteCheckpointRequest>,
    ) -> Result<Response<pb::WriteCheckpointResponse>, Status> {
        let identity = self.authenticate(&req).await?;
        let lsn = self.server.checkpoints.create().await.map_err(status)?;
        let n = self
            .server
            .core
            .register_write_checkpoint(&identity.user_id, lsn);
        Ok(Response::new(pb::WriteCheckpointResponse {
            write_checkpoint: n,
        }))
    }
}
