//! End to end with real PostgreSQL: the whole service (replicator, store, sync core, HTTP and
//! gRPC) and the Rust client over each transport. After every change each user's client holds
//! exactly the rows the rules select for that user from PostgreSQL, checksums verified by the
//! client at every checkpoint; a resent op would fail the client's own check.

use support::seed;

use support::service;

use std::time::Duration;

use service::{AUDIENCE, SECRET, WAIT, config, expected_for, token};
use walsync::Service;
use walsync_client::{ClientError, Connector, SyncClient, Transport};
use walsync_server::{ServerConfig, mint_hs256};
use walsync_storage::StoreRead;

async fn catch_up(s: &seed::Setup, client: &mut SyncClient, user: &str) -> anyhow::Result<()> {
    let want = expected_for(s, user).await?;
    let r = client.until(WAIT, |state| state.rows() == want).await;
    if let Err(e) = r {
        let got = client.state().rows();
        let missing = want.keys().filter(|k| got.get(*k) != want.get(*k)).count();
        let extra = got.keys().filter(|k| !want.contains_key(*k)).count();
        anyhow::bail!("{user}: {e}; {missing} rows missing or different, {extra} extra");
    }
    Ok(())
}

fn has_bucket(client: &SyncClient, bucket: &str) -> bool {
    client.state().buckets().contains_key(bucket)
}

async fn scenario(transport: Transport) -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = Service::start(config(&s, ServerConfig::default())).await?;
    let url = service.url();
    let mut clients: Vec<(String, SyncClient)> = Vec::new();
    for user in ["u1", "u2", "u3", "u4"] {
        let c = SyncClient::new(Connector::new(&url, transport, &token(user))?, user);
        clients.push((user.to_owned(), c));
    }
    // Initial sync: a member gets exactly their projects.
    for (user, c) in &mut clients {
        catch_up(&s, c, user).await?;
    }
    assert!(has_bucket(&clients[0].1, "user_projects[1]"));
    assert!(!has_bucket(&clients[0].1, "user_projects[3]"));
    assert!(!has_bucket(&clients[3].1, "user_projects[1]"));

    // Adding a member makes the project appear live.
    s.sql
        .batch_execute(
            "INSERT INTO project_members (project_id, user_id, role) VALUES (3, 'u1', 'editor')",
        )
        .await?;
    catch_up(&s, &mut clients[0].1, "u1").await?;
    assert!(has_bucket(&clients[0].1, "user_projects[3]"));

    // Removing one makes the project and its rows disappear.
    s.sql
        .batch_execute("DELETE FROM project_members WHERE project_id = 1 AND user_id = 'u1'")
        .await?;
    catch_up(&s, &mut clients[0].1, "u1").await?;
    assert!(!has_bucket(&clients[0].1, "user_projects[1]"));
    assert!(
        !clients[0]
            .1
            .state()
            .rows()
            .keys()
            .any(|(t, id)| t == "projects" && id == "1"),
        "project 1's row left with the membership"
    );

    // An assessment moved between projects leaves one user's view and enters another's:
    // project 2 has u1 and u2; project 4 has nobody; then u4 joins project 4.
    s.sql
        .batch_execute(
            "INSERT INTO project_members (project_id, user_id, role) VALUES (4, 'u4', 'viewer');
             UPDATE assessments SET project_id = 4 WHERE id = 1;",
        )
        .await?;
    let moved = ("assessments".to_owned(), "1".to_owned());
    for (user, c) in &mut clients {
        catch_up(&s, c, user).await?;
    }
    assert!(
        clients[3].1.state().rows().contains_key(&moved),
        "u4 sees the moved assessment"
    );
    s.sql
        .batch_execute("UPDATE assessments SET project_id = 2 WHERE id = 1")
        .await?;
    for (user, c) in &mut clients {
        catch_up(&s, c, user).await?;
    }
    assert!(
        !clients[3].1.state().rows().contains_key(&moved),
        "it left u4's view"
    );
    assert!(
        clients[1].1.state().rows().contains_key(&moved),
        "and entered u2's"
    );

    // Reconnect with `after`: changes while disconnected arrive once (a resent op would fail
    // the client's state with a protocol error).
    for (_, c) in &mut clients {
        c.disconnect();
    }
    seed::workload(&s.sql, 7, 40).await?;
    for (user, c) in &mut clients {
        catch_up(&s, c, user).await?;
        assert_eq!(c.connects, 2, "{user} resumed on a second stream");
    }

    // Live random changes, including membership changes.
    seed::workload(&s.sql, 11, 120).await?;
    for (user, c) in &mut clients {
        catch_up(&s, c, user).await?;
    }
    // Compaction ran meanwhile (every second here): superseded puts became moves, and the
    // clients above converged through it. A client that connects now reads the compacted log.
    let store = service.server.core.store();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !store.buckets()?.iter().any(|b| {
        store
            .ops(b, 0, u64::MAX, usize::MAX)
            .is_ok_and(|ops| ops.iter().any(|o| o.kind == walsync_types::OpKind::Move))
    }) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "compaction never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut fresh = SyncClient::new(
        Connector::new(&service.url(), transport, &token("u1"))?,
        "fresh",
    );
    catch_up(&s, &mut fresh, "u1").await?;

    // A write checkpoint shows up in the stream once replication passed it.
    let wcp = clients[1].1.write_checkpoint().await?;
    clients[1]
        .1
        .until(WAIT, |st| st.write_checkpoint().is_some_and(|w| w >= wcp))
        .await?;

    service.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_follow_postgres() -> anyhow::Result<()> {
    scenario(Transport::Http).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_follow_postgres() -> anyhow::Result<()> {
    scenario(Transport::Grpc).await
}

/// Bad input: clear errors, nothing else sent, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = Service::start(config(
        &s,
        ServerConfig {
            max_connections: 1,
            max_request_bytes: 1024,
            ..ServerConfig::default()
        },
    ))
    .await?;
    let url = service.url();
    walsync_client::install_crypto();
    let http = reqwest::Client::new();
    let post = |auth: Option<String>, body: String| {
        let mut r = http.post(format!("{url}/sync/stream")).body(body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    let code = |resp: reqwest::Response| async move {
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.expect("json error body");
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_owned(),
        )
    };
    // No token, a bad token, an expired token, a wrong audience.
    assert_eq!(
        code(post(None, "{}".into()).await?).await,
        (401, "unauthenticated".into())
    );
    assert_eq!(
        code(post(Some("Bearer nonsense".into()), "{}".into()).await?).await,
        (401, "unauthenticated".into())
    );
    let expired = {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"sub":"u1","aud":AUDIENCE,"iat":t-600,"exp":t-300}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )?
    };
    assert_eq!(
        code(post(Some(format!("Token {expired}")), "{}".into()).await?)
            .await
            .0,
        401
    );
    let other_aud = mint_hs256(SECRET, "u1", Some("elsewhere"), Duration::from_secs(60))?;
    assert_eq!(
        code(post(Some(format!("Bearer {other_aud}")), "{}".into()).await?)
            .await
            .0,
        401
    );
    let good = format!("Bearer {}", token("u1"));
    // A malformed body, an oversized body.
    assert_eq!(
        code(post(Some(good.clone()), "{\"buckets\": 7}".into()).await?).await,
        (400, "bad_request".into())
    );
    assert_eq!(
        code(post(Some(good.clone()), "x".repeat(4096)).await?).await,
        (413, "payload_too_large".into())
    );
    // Deeply nested JSON, bytes that are not UTF-8, a JSON string holding a lone surrogate.
    for body in [
        format!("{}{}", "[".repeat(500), "]".repeat(500)),
        format!(
            "{{\"parameters\": {}{}}}",
            "{\"a\":".repeat(100),
            "1}".repeat(100)
        ),
        "{\"client_id\": \"\\ud83d\"}".to_owned(),
    ] {
        let (status, code) = code(post(Some(good.clone()), body).await?).await;
        assert_eq!(status, 400, "{code}");
    }
    let binary = http
        .post(format!("{url}/sync/stream"))
        .header("authorization", good.clone())
        .body(vec![0xffu8, 0xfe, b'{', b'}'])
        .send()
        .await?;
    assert_eq!(code(binary).await, (400, "bad_request".into()));
    // A token too large to be real is refused as such; a header larger than the server takes
    // at all ends the request, and the server goes on.
    let fat = format!("Bearer {}", "a".repeat(20 * 1024));
    assert_eq!(
        code(post(Some(fat), "{}".into()).await?).await,
        (401, "unauthenticated".into())
    );
    let huge = format!("Bearer {}", "a".repeat(1 << 20));
    if let Ok(r) = post(Some(huge), "{}".into()).await {
        assert!(
            r.status().is_client_error(),
            "a 1 MiB header got {}",
            r.status()
        );
    }
    let live = http.get(format!("{url}/health/live")).send().await?;
    assert!(live.status().is_success(), "the server stays up");
    // The connection limit: one stream open, the next is told to come back later.
    let first = post(Some(good.clone()), "{}".into()).await?;
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(
        first.headers()["content-type"].to_str()?,
        "application/x-ndjson"
    );
    assert_eq!(first.headers()["x-accel-buffering"].to_str()?, "no");
    let second = post(Some(good.clone()), "{}".into()).await?;
    assert_eq!(second.status().as_u16(), 429);
    assert!(second.headers().contains_key("retry-after"));
    assert_eq!(code(second).await.1, "too_many_connections");
    drop(first);
    // gRPC: a bad token is UNAUTHENTICATED.
    let mut grpc = SyncClient::new(Connector::new(&url, Transport::Grpc, "nonsense")?, "c");
    match grpc.next_event().await {
        Err(ClientError::Unauthenticated(_)) => {}
        other => panic!("expected unauthenticated, got {other:?}"),
    }
    // The write checkpoint needs a token too.
    let resp = http
        .get(format!("{url}/write-checkpoint2.json?client_id=x"))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    service.stop().await;
    Ok(())
}

/// Browsers: CORS for the configured origins only, and the gRPC service over grpc-web (HTTP/1.1)
/// on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_cors_and_grpc_web() -> anyhow::Result<()> {
    use prost::Message;
    use walsync_protocol::pb;

    let s = seed::setup().await?;
    let service = Service::start(config(
        &s,
        ServerConfig {
            cors_origins: vec!["http://app.example".into()],
            ..ServerConfig::default()
        },
    ))
    .await?;
    let url = service.url();
    walsync_client::install_crypto();
    let http = reqwest::Client::builder().http1_only().build()?;

    // CORS preflight: the configured origin is allowed, another is not.
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, format!("{url}/sync/stream"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let ok = preflight("http://app.example").await?;
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap_or("")),
        Some("http://app.example")
    );
    let allowed_headers = ok
        .headers()
        .get("access-control-allow-headers")
        .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase())
        .unwrap_or_default();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    let other = preflight("http://evil.example").await?;
    assert!(other.headers().get("access-control-allow-origin").is_none());

    // grpc-web: one framed SyncRequest in, framed SyncLines out, the first a checkpoint.
    let request = pb::SyncRequest::default().encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(request.len() as u32).to_be_bytes());
    body.extend_from_slice(&request);
    let mut resp = http
        .post(format!("{url}/walsync.v1.Sync/Sync"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", "http://app.example")
        .header("authorization", format!("Bearer {}", token("u1")))
        .body(body)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str()?,
        "application/grpc-web+proto"
    );
    assert_eq!(
        resp.headers()["access-control-allow-origin"].to_str()?,
        "http://app.example"
    );
    // Frames until the checkpoint (the token's lifetime comes before it).
    let mut buf = Vec::new();
    let first = loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() >= 5 + len {
                let line = pb::SyncLine::decode(&buf[5..5 + len])?;
                buf.drain(..5 + len);
                if matches!(line.line, Some(pb::sync_line::Line::TokenExpiresIn(_))) {
                    continue;
                }
                break line;
            }
        }
        let chunk = tokio::time::timeout(WAIT, resp.chunk())
            .await??
            .ok_or_else(|| anyhow::anyhow!("grpc-web stream ended"))?;
        buf.extend_from_slice(&chunk);
    };
    assert!(
        matches!(first.line, Some(pb::sync_line::Line::Checkpoint(_))),
        "{first:?}"
    );
    drop(resp);
    service.stop().await;
    Ok(())
}

/// Write checkpoints go through a bounded pool of connections (however many arrive at once)
/// and are admitted by a rate per user over both transports: past the burst a user gets 429
/// `too_many_requests` / `RESOURCE_EXHAUSTED` with when to retry, and other users do not
/// notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_checkpoints_share_a_bounded_pool_and_a_rate_per_user() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = Service::start(config(
        &s,
        ServerConfig {
            write_checkpoint_connections: 2,
            write_checkpoints_per_second: 0.01,
            write_checkpoint_burst: 40,
            ..ServerConfig::default()
        },
    ))
    .await?;
    let url = service.url();
    let http = Connector::new(&url, Transport::Http, &token("u1"))?;
    let grpc = Connector::new(&url, Transport::Grpc, &token("u1"))?;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let c = if i % 2 == 0 {
            http.clone()
        } else {
            grpc.clone()
        };
        tasks.push(tokio::spawn(async move {
            c.write_checkpoint(&format!("device-{i}")).await
        }));
    }
    let mut positions = Vec::new();
    for t in tasks {
        positions.push(t.await??);
    }
    assert!(positions.iter().all(|p| *p > 0), "{positions:?}");
    let (open, _) = service.server.checkpoints.pool_status();
    assert!(
        (1..=2).contains(&open),
        "40 requests at once used {open} connections"
    );

    // The burst is spent: the 41st is refused with when to retry, over both transports.
    match http.write_checkpoint("device-0").await {
        Err(ClientError::Http { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (429, "too_many_requests"));
        }
        other => panic!("expected 429 too_many_requests, got {other:?}"),
    }
    let raw = reqwest::Client::new()
        .get(format!("{url}/write-checkpoint2.json?client_id=x"))
        .header("authorization", format!("Bearer {}", token("u1")))
        .send()
        .await?;
    assert_eq!(raw.status().as_u16(), 429);
    let retry: u64 = raw.headers()["retry-after"].to_str()?.parse()?;
    assert!(retry >= 1, "retry after {retry}");
    match grpc.write_checkpoint("device-1").await {
        Err(ClientError::Grpc { code, .. }) => assert_eq!(format!("{code:?}"), "ResourceExhausted"),
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    // Another user has a bucket of its own.
    let other = Connector::new(&url, Transport::Http, &token("u2"))?;
    assert!(other.write_checkpoint("laptop").await? > 0);
    service.stop().await;
    Ok(())
}

/// A replicator that stops for good (here: its publication does not exist) makes the process
/// not ready, saying so, and `Service::wait` returns why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replicator_makes_the_service_not_ready() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let mut config = config(&s, ServerConfig::default());
    config.postgres.publication = "absent".into();
    let mut service = Service::start(config).await?;
    let err = tokio::time::timeout(WAIT, service.wait())
        .await?
        .expect_err("the replicator stops");
    assert!(err.to_string().contains("absent"), "{err}");
    walsync_client::install_crypto();
    let resp = reqwest::get(format!("{}/health/ready", service.url())).await?;
    assert_eq!(resp.status().as_u16(), 503);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "not_ready");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("replication has stopped")),
        "{body}"
    );
    Ok(())
}

/// PostgreSQL makes a new slot wait for every transaction open when it was asked for, and a
/// client's transaction may stay open for as long as it likes: a stop meanwhile ends the wait
/// at once, leaves no half-made slot behind (which the next start would refuse as not
/// walsync's), and the next start copies and serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_a_slot_creation_that_waits_for_open_transactions() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let (other, conn) = tokio_postgres::connect(&s.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    other.batch_execute("BEGIN; SELECT txid_current()").await?;
    let service = Service::start(config(&s, ServerConfig::default())).await?;
    let deadline = std::time::Instant::now() + WAIT;
    while s
        .scalar::<i64>(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE NOT l.granted AND a.backend_type = 'walsender' AND a.datname = current_database()",
        )
        .await?
        == 0
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the slot creation never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(Duration::from_secs(15), service.stop())
        .await
        .map_err(|_| anyhow::anyhow!("the stop waited for the open transaction"))?;
    other.batch_execute("COMMIT").await?;
    let slots: i64 = s
        .sql
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&s.slot],
        )
        .await?
        .get(0);
    assert_eq!(slots, 0, "a slot the stop interrupted was left behind");

    let service = Service::start(config(&s, ServerConfig::default())).await?;
    let mut client = SyncClient::new(
        Connector::new(&service.url(), Transport::Http, &token("u1"))?,
        "after-stop",
    );
    catch_up(&s, &mut client, "u1").await?;
    service.stop().await;
    Ok(())
}

/// `/health/ready` follows the replication: while the source's connection keeps breaking (its
/// walsender ended again and again) the process says it is not ready, and why; once it streams
/// again it is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_replication_state() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = Service::start(config(&s, ServerConfig::default())).await?;
    walsync_client::install_crypto();
    let ready = format!("{}/health/ready", service.url());
    let until_ready = || async {
        let deadline = std::time::Instant::now() + WAIT;
        while !reqwest::get(&ready).await?.status().is_success() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    };
    until_ready().await?;
    let deadline = std::time::Instant::now() + WAIT;
    let why = loop {
        s.sql
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&s.slot],
            )
            .await?;
        let resp = reqwest::get(&ready).await?;
        if resp.status().as_u16() == 503 {
            let body: serde_json::Value = resp.json().await?;
            break body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "ready throughout a replication that kept breaking"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(why.contains("connecting"), "{why}");
    until_ready().await?;
    service.stop().await;
    Ok(())
}

/// Reads a sync response as `content_type` says until its first complete checkpoint: its lines.
async fn lines_until_complete(
    mut response: reqwest::Response,
) -> anyhow::Result<Vec<walsync_protocol::Line>> {
    use walsync_protocol::Line;
    let bson = response.headers()["content-type"] == walsync_protocol::BSON_STREAM;
    let mut buffer: Vec<u8> = Vec::new();
    let mut lines = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        buffer.extend_from_slice(&chunk);
        loop {
            let taken = if bson {
                if buffer.len() < 4 {
                    break;
                }
                let length = u32::from_le_bytes(buffer[..4].try_into()?) as usize;
                if buffer.len() < length {
                    break;
                }
                let document: Vec<u8> = buffer.drain(..length).collect();
                Line::from_bson(&document)?
            } else {
                let Some(end) = buffer.iter().position(|b| *b == b'\n') else {
                    break;
                };
                let line: Vec<u8> = buffer.drain(..=end).collect();
                serde_json::from_slice(&line)?
            };
            let complete = matches!(taken, Line::CheckpointComplete(_));
            lines.push(taken);
            if complete {
                return Ok(lines);
            }
        }
    }
    anyhow::bail!("the stream ended before a checkpoint completed")
}

/// PowerSync's clients ask for BSON (`application/vnd.powersync.bson-stream;q=0.9,
/// application/x-ndjson;q=0.8`): they get BSON documents carrying the same lines, value for value,
/// as the NDJSON lines others get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bson_streams_carry_the_same_lines_as_ndjson() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = Service::start(config(&s, ServerConfig::default())).await?;
    let url = service.url();
    walsync_client::install_crypto();
    let mut client = SyncClient::new(Connector::new(&url, Transport::Http, &token("u1"))?, "c");
    catch_up(&s, &mut client, "u1").await?;
    let http = reqwest::Client::new();
    let ask = |accept: &'static str| {
        http.post(format!("{url}/sync/stream"))
            .bearer_auth(token("u1"))
            .header("accept", accept)
            .json(&serde_json::json!({"client_id": "c", "raw_data": true}))
            .send()
    };
    let ndjson = ask("application/x-ndjson").await?;
    assert_eq!(ndjson.headers()["content-type"], walsync_protocol::NDJSON);
    let bson =
        ask("application/vnd.powersync.bson-stream;q=0.9,application/x-ndjson;q=0.8").await?;
    assert_eq!(
        bson.headers()["content-type"],
        walsync_protocol::BSON_STREAM
    );
    let (from_json, from_bson) = (
        lines_until_complete(ndjson).await?,
        lines_until_complete(bson).await?,
    );
    assert!(
        from_json
            .iter()
            .any(|l| matches!(l, walsync_protocol::Line::Data(_))),
        "the first checkpoint carries data"
    );
    assert_eq!(from_bson, from_json);
    service.stop().await;
    Ok(())
}
