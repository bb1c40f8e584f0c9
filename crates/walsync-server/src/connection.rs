//! The accept loop: one hyper connection per socket (HTTP/1.1 and HTTP/2, so the sync stream,
//! gRPC and grpc-web share the port), each with `TCP_NODELAY` and bounded write buffers.
//!
//! - **`TCP_NODELAY`**: sync lines are small writes that must leave at once. With Nagle's
//!   algorithm a line written while the previous one is unacknowledged waits for the client's
//!   delayed ACK (up to 200 ms on Linux), which was the HTTP stream's latency tail.
//! - **Bounded buffers**: hyper queues up to about 400 KiB of response body per HTTP/1.1
//!   connection, and as much per HTTP/2 stream, before it stops taking lines from the sync core.
//!   For a client that stopped reading that would be pinned memory beside the core's own
//!   bounded buffer; [`ServerConfig::write_buffer_bytes`] caps it (one line larger than the cap
//!   still goes whole).
//!
//! Shutdown is graceful: the listener closes, each connection finishes the responses in flight
//! (the sync core ends its streams), and the loop returns when every connection has closed.
//! The connections are tasks of the loop's own set: when whoever awaits the loop gives up
//! waiting (`server.shutdown_timeout_seconds`) and drops it, every connection still open is
//! aborted with it — a request in flight is dropped, so an upload's transaction rolls back
//! and its client retries it — rather than living on in the runtime.

use std::future::Future;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt;

use crate::ServerConfig;

/// hyper refuses a smaller buffer for HTTP/1.1 (it must hold a request's head).
const MIN_BUFFER: usize = 8 << 10;

/// Serves `router` on every connection `listener` accepts until `shutdown` resolves, then
/// waits for the open connections to finish.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    let buffer = config.write_buffer_bytes.max(MIN_BUFFER);
    builder.http1().max_buf_size(buffer);
    builder
        .http2()
        .max_send_buf_size(buffer)
        .enable_connect_protocol();
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Finished connections leave the set as new ones come.
        while connections.try_join_next().is_some() {}
        let (socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // neither ends the server. A short pause lets descriptors come back.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = socket.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone().map_request(
            |req: http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
        ));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(socket), service)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    connections.join_all().await;
    Ok(())
}
