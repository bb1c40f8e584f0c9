//! Uploads over both transports: `POST /write` (JSON) and `walsync.v1.Sync/Upload` (protobuf)
//! take the same request and give the same reply, through [`Server::apply_upload`].

use walsync_storage::BucketStore;
use walsync_sync::Identity;
use walsync_write::{Status, UploadError, UploadReply, UploadRequest, Writer};

use crate::{ApiError, ErrorCode, Server};

impl<S: BucketStore + 'static> Server<S> {
    /// Applies `request` for `identity` (admitted by the caller): the reply, with a write
    /// checkpoint registered for the client when anything was applied.
    pub(crate) async fn apply_upload(
        &self,
        identity: &Identity,
        request: &UploadRequest,
    ) -> Result<UploadReply, ApiError> {
        let Some(uploads) = self.uploads.get() else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "writes are off: configure [writes] to take uploads",
            ));
        };
        let writer = Writer {
            user_id: &identity.user_id,
            claims: &identity.claims,
        };
        let (mut reply, lsn) = uploads.upload(writer, request).await.map_err(|e| match e {
            UploadError::BadRequest(m) => ApiError::new(ErrorCode::BadRequest, m),
            UploadError::TooLarge(m) => ApiError::new(ErrorCode::PayloadTooLarge, m),
        })?;
        crate::metrics::upload(&reply);
        let lsn = match lsn {
            Some(lsn) => Some(lsn),
            // Only results of earlier attempts: a checkpoint from now covers them as well.
            None if reply.results.iter().any(|r| r.status == Status::Applied) => {
                self.checkpoints.create().await.ok()
            }
            None => None,
        };
        if let Some(lsn) = lsn {
            let n = self
                .core
                .register_write_checkpoint(&identity.user_id, &request.client_id, lsn);
            reply.write_checkpoint = Some(n.to_string());
        }
        Ok(reply)
    }
}
