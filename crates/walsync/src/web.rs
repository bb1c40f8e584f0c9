//! A web app's files beside walsync, for `walsync demo --web` and the browser test: the built app
//! (`examples/assessment-web/dist`) and its `/config.json` (walsync's URL and a token per user;
//! a real app gets its tokens from its own login).

use std::net::SocketAddr;
use std::path::Path;

use axum::Router;
use axum::routing::get;
use tower_http::services::ServeDir;

/// Serves `dir` and `config` (as `/config.json`) on `listen` (another free port when that one is
/// busy); returns where it listens.
pub async fn serve_app(
    dir: &Path,
    listen: &str,
    config: serde_json::Value,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    check_built(dir)?;
    let app = Router::new()
        .route(
            "/config.json",
            get(move || {
                let config = config.clone();
                async move { axum::Json(config) }
            }),
        )
        .fallback_service(ServeDir::new(dir));
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, task))
}

/// The app must have been built (`npm run build` in its folder) before it can be served.
fn check_built(dir: &Path) -> std::io::Result<()> {
    if dir.join("index.html").is_file() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} has no index.html: build the app first (npm ci && npm run build in examples/assessment-web)",
                dir.display()
            ),
        ))
    }
}
