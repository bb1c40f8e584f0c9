//! Routing and the error vocabulary without PostgreSQL: unknown paths answer 404 and wrong
//! methods 405, each with the JSON error body; gRPC keeps its routes and statuses beside them.

use std::sync::Arc;
use std::time::Duration;

use walsync_protocol::pb;
use walsync_server::{AuthConfig, Authenticator, Connect, Server, ServerConfig, WriteCheckpoints};
use walsync_storage::KvStore;
use walsync_sync::{SyncConfig, SyncCore};

const RULES: &str = "bucket_definitions:\n  me:\n    parameters: SELECT request.user_id() AS user_id\n    data: []\n";

struct Running {
    url: String,
    store: Arc<KvStore>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve() -> anyhow::Result<Running> {
    serve_with(ServerConfig::default()).await
}

async fn serve_with(config: ServerConfig) -> anyhow::Result<Running> {
    // No request here reaches the database.
    let connect: Connect = Arc::new(|| Box::pin(async { Err("no database in this test".into()) }));
    serve_with_database(config, connect).await
}

async fn serve_with_database(config: ServerConfig, connect: Connect) -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(KvStore::open(dir.path())?);
    let rules = Arc::new(walsync_rules::SyncRules::from_yaml(RULES)?);
    let core = SyncCore::new(store.clone(), rules, SyncConfig::default());
    let auth = Arc::new(
        Authenticator::new(AuthConfig {
            secret: Some("routes-secret".into()),
            ..AuthConfig::default()
        })
        .await?,
    );
    let pool = config.write_checkpoint_pool();
    let checkpoints = Arc::new(WriteCheckpoints::new(connect, pool));
    let server = Server::new(core, auth, config, checkpoints);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    Ok(Running {
        url,
        store,
        _dir: dir,
        _stop: stop,
    })
}

async fn error_of(resp: reqwest::Response) -> anyhow::Result<(u16, String, String)> {
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await?;
    Ok((
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

/// Ready only while a checkpoint can be served: not during the initial copy, nor while the
/// buckets follow other sync rules than the server's (the tables are being copied anew for
/// these); ready again once they follow them.
#[tokio::test]
async fn readiness_follows_what_can_be_served() -> anyhow::Result<()> {
    use walsync_storage::{BucketStore, StoreWriter};
    let s = serve().await?;
    let ready = || async {
        let resp = reqwest::get(format!("{}/health/ready", s.url)).await?;
        if resp.status() == 200 {
            return anyhow::Ok((200, String::new(), String::new()));
        }
        error_of(resp).await
    };
    let (status, code, message) = ready().await?;
    assert_eq!((status, code.as_str()), (503, "not_ready"));
    assert!(message.contains("initial snapshot"), "{message}");
    let commit = |rules: &str| -> anyhow::Result<()> {
        let mut w = s.store.writer()?;
        w.set_snapshot_complete();
        w.set_rules(rules);
        w.commit()?;
        Ok(())
    };
    commit("the fingerprint of other rules")?;
    let (status, _, message) = ready().await?;
    assert_eq!(status, 503);
    assert!(message.contains("other sync rules"), "{message}");
    commit(walsync_rules::SyncRules::from_yaml(RULES)?.fingerprint())?;
    assert_eq!(ready().await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn unknown_paths_get_404_and_wrong_methods_405_as_json() -> anyhow::Result<()> {
    let s = serve().await?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    for path in ["/", "/nope", "/sync/streamx", "/walsync.v1.Other/Sync"] {
        let (status, code, message) =
            error_of(http.get(format!("{}{path}", s.url)).send().await?).await?;
        assert_eq!((status, code.as_str()), (404, "not_found"), "GET {path}");
        assert!(message.contains(path), "{message}");
    }
    let (status, code, _) =
        error_of(http.get(format!("{}/sync/stream", s.url)).send().await?).await?;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    let (status, code, _) =
        error_of(http.post(format!("{}/health/live", s.url)).send().await?).await?;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    // The known routes still answer.
    assert_eq!(
        http.get(format!("{}/health/live", s.url))
            .send()
            .await?
            .status(),
        200
    );
    let (status, code, _) =
        error_of(http.post(format!("{}/sync/stream", s.url)).send().await?).await?;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    // A database that cannot be reached is a clear 503, not a fault of the server.
    let token = walsync_server::mint_hs256("routes-secret", "u1", None, Duration::from_secs(60))?;
    let (status, code, _) = error_of(
        http.get(format!("{}/write-checkpoint2.json?client_id=c", s.url))
            .bearer_auth(&token)
            .send()
            .await?,
    )
    .await?;
    assert_eq!((status, code.as_str()), (503, "database_unavailable"));
    Ok(())
}

#[tokio::test]
async fn grpc_keeps_its_routes_and_statuses_beside_the_http_errors() -> anyhow::Result<()> {
    let s = serve().await?;
    let channel = tonic::transport::Endpoint::from_shared(s.url.clone())?
        .connect()
        .await?;
    let mut client = pb::sync_client::SyncClient::new(channel).max_encoding_message_size(8 << 20);
    let err = client
        .sync(pb::SyncRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    // Authentication comes before the body is decoded: a body over the decoding limit without a
    // token is refused for the token, not read.
    let huge = pb::SyncRequest {
        parameters_json: "x".repeat(2 << 20),
        ..pb::SyncRequest::default()
    };
    let err = client.sync(huge.clone()).await.expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let mut req = tonic::Request::new(huge);
    let bad = walsync_server::mint_hs256("another-secret", "u1", None, Duration::from_secs(60))?;
    req.metadata_mut()
        .insert("authorization", format!("Bearer {bad}").parse()?);
    let err = client.sync(req).await.expect_err("bad token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let mut req = tonic::Request::new(pb::WriteCheckpointRequest::default());
    let token = walsync_server::mint_hs256("routes-secret", "u1", None, Duration::from_secs(60))?;
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let err = client.write_checkpoint(req).await.expect_err("no database");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    Ok(())
}

/// One user holds at most `max_streams_per_user` streams over both transports together; more
/// are refused with 429 / RESOURCE_EXHAUSTED naming the limit and when to retry, other users
/// are not held up, and a stream that ends gives its place back.
#[tokio::test]
async fn a_user_holds_at_most_its_share_of_streams() -> anyhow::Result<()> {
    let s = serve_with(ServerConfig {
        max_streams_per_user: 3,
        retry_after_seconds: 9,
        ..ServerConfig::default()
    })
    .await?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let token = |user: &str| {
        walsync_server::mint_hs256("routes-secret", user, None, Duration::from_secs(60))
            .expect("token")
    };
    let open = |user: &str| {
        http.post(format!("{}/sync/stream", s.url))
            .bearer_auth(token(user))
            .body("{}")
            .send()
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = open("u1").await?;
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    // The third over gRPC.
    let channel = tonic::transport::Endpoint::from_shared(s.url.clone())?
        .connect()
        .await?;
    let mut grpc = pb::sync_client::SyncClient::new(channel);
    let mut req = tonic::Request::new(pb::SyncRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {}", token("u1")).parse()?);
    let grpc_stream = grpc.sync(req).await?;
    let refused = open("u1").await?;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("9")
    );
    let (_, code, message) = error_of(refused).await?;
    assert_eq!(code, "too_many_streams");
    assert!(message.contains("3 open streams"), "{message}");
    let mut req = tonic::Request::new(pb::SyncRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {}", token("u1")).parse()?);
    let err = grpc.sync(req).await.expect_err("over the limit");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        open("u2").await?.status(),
        200,
        "another user is not held up"
    );
    // A stream that ends gives its place back.
    drop(grpc_stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = open("u1").await?;
        if r.status() == 200 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    Ok(())
}

/// A client that sends its body slowly (here: never finishes it) gets 408 after the request
/// timeout, and its admission slot comes back.
#[tokio::test]
async fn a_body_that_never_arrives_times_out_and_gives_its_place_back() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = serve_with(ServerConfig {
        request_timeout_seconds: 1,
        max_connections: 1,
        ..ServerConfig::default()
    })
    .await?;
    let token = walsync_server::mint_hs256("routes-secret", "u1", None, Duration::from_secs(60))?;
    let addr = s.url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(
        format!(
            "POST /sync/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"buck"
        )
        .as_bytes(),
    )
    .await?;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // The only admission slot is free again.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = reqwest::Client::new()
        .post(format!("{}/sync/stream", s.url))
        .bearer_auth(&token)
        .body("{}")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    Ok(())
}

/// Bad input to every endpoint that reads a body or a query: a clear JSON error with a stable
/// code, never a panic, a 500 or a stream.
#[tokio::test]
async fn bad_input_gets_a_clear_json_error() -> anyhow::Result<()> {
    let s = serve().await?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let token = walsync_server::mint_hs256("routes-secret", "u1", None, Duration::from_secs(60))?;
    let deep = format!(
        "{{\"parameters\": {}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let bodies: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed", b"{\"buckets\": [".to_vec(), 400, "bad_request"),
        (
            "wrong type",
            b"{\"buckets\": 7}".to_vec(),
            400,
            "bad_request",
        ),
        (
            "wrong element type",
            b"{\"buckets\": [{\"name\": 1, \"after\": \"x\"}]}".to_vec(),
            400,
            "bad_request",
        ),
        ("not an object", b"[1, 2, 3]".to_vec(), 400, "bad_request"),
        ("deeply nested", deep.into_bytes(), 400, "bad_request"),
        (
            "invalid utf-8",
            vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
            400,
            "bad_request",
        ),
        ("oversized", vec![b' '; 2 << 20], 413, "payload_too_large"),
    ];
    for (what, body, status, code) in bodies {
        let resp = http
            .post(format!("{}/sync/stream", s.url))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let (got, got_code, message) = error_of(resp).await?;
        assert_eq!(
            (got, got_code.as_str()),
            (status, code),
            "{what}: {message}"
        );
        assert!(!message.is_empty(), "{what}");
    }
    // The write checkpoint's query and the header parser.
    let headers: [&[u8]; 6] = [
        b"Bearer",
        b"Basic dXNlcjpwYXNz",
        b"Bearer a.b",
        b"Bearer \xff\xfe not utf-8",
        b"Token .....",
        b"Bearer eyJhbGciOiJub25lIn0.e30.",
    ];
    for header in headers {
        let resp = http
            .get(format!("{}/write-checkpoint2.json", s.url))
            .header(
                "authorization",
                reqwest::header::HeaderValue::from_bytes(header)?,
            )
            .send()
            .await?;
        let (status, code, _) = error_of(resp).await?;
        assert_eq!(
            (status, code.as_str()),
            (401, "unauthenticated"),
            "{header:?}"
        );
    }
    // A write checkpoint query that does not parse is refused before the database is asked.
    for query in ["client_id=a&client_id=b"] {
        let resp = http
            .get(format!("{}/write-checkpoint2.json?{query}", s.url))
            .bearer_auth(&token)
            .send()
            .await?;
        let (status, code, message) = error_of(resp).await?;
        assert_eq!(
            (status, code.as_str()),
            (400, "bad_request"),
            "{query}: {message}"
        );
    }
    Ok(())
}

/// A database that never answers a connection holds no write checkpoint longer than
/// `server.write_checkpoint_timeout_ms`: the client gets 503 `database_unavailable` and retries.
#[tokio::test]
async fn a_database_that_never_answers_holds_no_write_checkpoint() -> anyhow::Result<()> {
    let hangs: Connect = Arc::new(|| Box::pin(std::future::pending()));
    let s = serve_with_database(
        ServerConfig {
            write_checkpoint_timeout_ms: 300,
            ..ServerConfig::default()
        },
        hangs,
    )
    .await?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let token = walsync_server::mint_hs256("routes-secret", "u1", None, Duration::from_secs(60))?;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(
            http.get(format!("{}/write-checkpoint2.json?client_id=c", s.url))
                .header("authorization", format!("Bearer {token}"))
                .send(),
        );
    }
    for resp in futures_util::future::join_all(waiting).await {
        let (status, code, _) = error_of(resp?).await?;
        assert_eq!((status, code.as_str()), (503, "database_unavailable"));
    }
    Ok(())
}
