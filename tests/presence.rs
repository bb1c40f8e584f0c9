//! Presence against the whole service: members of a project's room see each other join,
//! update, send messages and leave, over HTTP (POST and an NDJSON or SSE watch) and gRPC (one
//! bidirectional stream); a non-member is refused; losing membership ends presence at the next
//! checkpoint; a client that disappears leaves after the timeout; bad actions get clear errors.
//! The seed data: u1 and u2 are members of project 2 (room `user_projects[2]`), u3 is not.

use std::time::Duration;

use serde_json::{Value, json};
use support::{seed, service};
use walsync::Service;
use walsync_client::{ClientError, Connector, PresenceEvents, PresenceSession, Transport};
use walsync_server::ServerConfig;

const ROOM: &str = "user_projects[2]";
const WAIT: Duration = Duration::from_secs(20);

async fn start(
    s: &seed::Setup,
    tweak: impl FnOnce(&mut walsync::Config),
) -> anyhow::Result<Service> {
    walsync_client::install_crypto();
    let mut config = service::config(s, ServerConfig::default());
    tweak(&mut config);
    let service = Service::start(config).await?;
    // Rooms are checked against a servable checkpoint.
    let ready = format!("{}/health/ready", service.url());
    let deadline = std::time::Instant::now() + WAIT;
    while !reqwest::get(&ready).await?.status().is_success() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(service)
}

fn http(service: &Service, user: &str) -> anyhow::Result<Connector> {
    Ok(Connector::new(
        &service.url(),
        Transport::Http,
        &service::token(user),
    )?)
}

fn grpc(service: &Service, user: &str) -> anyhow::Result<Connector> {
    Ok(Connector::new(
        &service.url(),
        Transport::Grpc,
        &service::token(user),
    )?)
}

/// The next event of a watch, within [`WAIT`].
async fn next(events: &mut PresenceEvents) -> anyhow::Result<Value> {
    match tokio::time::timeout(WAIT, events.next()).await {
        Ok(Some(e)) => Ok(e?),
        Ok(None) => anyhow::bail!("the watch ended"),
        Err(_) => anyhow::bail!("no presence event within {WAIT:?}"),
    }
}

async fn next_grpc(session: &mut PresenceSession) -> anyhow::Result<Value> {
    match tokio::time::timeout(WAIT, session.next()).await {
        Ok(Some(e)) => Ok(e?),
        Ok(None) => anyhow::bail!("the presence stream ended"),
        Err(_) => anyhow::bail!("no presence event within {WAIT:?}"),
    }
}

/// The status and error code of a refused HTTP action.
fn refusal(r: Result<(), ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Http { status, code, .. }) => (status, code),
        Err(ClientError::Unauthenticated(_)) => (401, "unauthenticated".into()),
        other => (0, format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_each_other_over_both_transports() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s, |_| {}).await?;
    let u2 = http(&service, "u2")?;
    let mut watch = u2.presence_watch(ROOM).await?;
    assert_eq!(
        next(&mut watch).await?,
        json!({"type": "members", "room": ROOM, "members": []})
    );

    // u1 over gRPC: joins, watches (and sees itself), updates, sends a message.
    let mut u1 = grpc(&service, "u1")?.presence().await?;
    let state = json!({"assessment_id": 7, "question_id": "q3", "status": "typing"});
    u1.send("join", "laptop", ROOM, Some(&state), None).await?;
    let member = json!({"user_id": "u1", "client_id": "laptop", "state": state});
    assert_eq!(
        next(&mut watch).await?,
        json!({"type": "join", "room": ROOM, "member": member})
    );
    u1.send("watch", "", ROOM, None, None).await?;
    assert_eq!(
        next_grpc(&mut u1).await?,
        json!({"type": "members", "room": ROOM, "members": [member]})
    );
    let idle = json!({"assessment_id": 7, "question_id": "q4", "status": "idle"});
    u1.send("update", "", ROOM, Some(&idle), None).await?;
    let updated = json!({"type": "update", "room": ROOM, "member": {"user_id": "u1", "client_id": "laptop", "state": idle}});
    assert_eq!(next(&mut watch).await?, updated);
    assert_eq!(next_grpc(&mut u1).await?, updated);
    let cursor = json!({"cursor": [12, 40], "text": "é ✓ \u{1F600}"});
    u1.send("message", "", ROOM, None, Some(&cursor)).await?;
    let message = json!({"type": "message", "room": ROOM, "user_id": "u1", "client_id": "laptop", "data": cursor});
    assert_eq!(next(&mut watch).await?, message);
    assert_eq!(next_grpc(&mut u1).await?, message);

    // u2 over HTTP: joins and sends a message; u1's gRPC watch sees both.
    u2.presence_post(&json!({"action": "join", "client_id": "phone", "room": ROOM, "state": {"status": "reading"}}))
        .await?;
    let joined = json!({"type": "join", "room": ROOM, "member": {"user_id": "u2", "client_id": "phone", "state": {"status": "reading"}}});
    assert_eq!(next_grpc(&mut u1).await?, joined);
    assert_eq!(next(&mut watch).await?, joined);
    u2.presence_post(
        &json!({"action": "message", "client_id": "phone", "room": ROOM, "data": "hello"}),
    )
    .await?;
    assert_eq!(next_grpc(&mut u1).await?["data"], "hello");
    assert_eq!(next(&mut watch).await?["data"], "hello");
    u2.presence_post(&json!({"action": "heartbeat", "client_id": "phone"}))
        .await?;

    // A browser's watch: Server-Sent Events, the full list first.
    let sse = reqwest::Client::new()
        .get(format!("{}/presence/stream", service.url()))
        .query(&[("room", ROOM)])
        .header("accept", "text/event-stream")
        .bearer_auth(service::token("u2"))
        .send()
        .await?;
    assert_eq!(sse.headers()["content-type"].to_str()?, "text/event-stream");
    let mut body = sse.bytes_stream();
    let first = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut body))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no event"))??;
    let text = String::from_utf8(first.to_vec())?;
    assert!(text.starts_with("event: members\ndata: {"), "{text}");
    assert!(
        text.contains("\"client_id\":\"laptop\"") && text.contains("\"client_id\":\"phone\""),
        "{text}"
    );

    // u2 leaves; u1's stream closes: both gone, each with its reason.
    u2.presence_post(&json!({"action": "leave", "client_id": "phone", "room": ROOM}))
        .await?;
    let left = json!({"type": "leave", "room": ROOM, "user_id": "u2", "client_id": "phone", "reason": "left"});
    assert_eq!(next(&mut watch).await?, left);
    assert_eq!(next_grpc(&mut u1).await?, left);
    drop(u1);
    assert_eq!(
        next(&mut watch).await?,
        json!({"type": "leave", "room": ROOM, "user_id": "u1", "client_id": "laptop", "reason": "disconnected"})
    );
    service.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_and_bad_actions_get_clear_errors() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s, |c| {
        c.sync.presence.max_rooms = 2;
        c.sync.presence.rate_per_second = 5;
        c.sync.presence.max_state_bytes = 100;
    })
    .await?;
    let u1 = http(&service, "u1")?;
    let u3 = http(&service, "u3")?;
    let join = |room: &str| json!({"action": "join", "client_id": "c", "room": room, "state": {}});

    // u3 is in project 3, not 2: refused, and nothing of the room is shown.
    assert_eq!(
        refusal(u3.presence_post(&join(ROOM)).await),
        (403, "forbidden".into())
    );
    assert_eq!(
        refusal(u3.presence_watch(ROOM).await.map(|_| ())),
        (403, "forbidden".into())
    );
    assert_eq!(
        refusal(u1.presence_post(&join("nope[1]")).await),
        (404, "not_found".into())
    );
    let anonymous = reqwest::Client::new()
        .post(format!("{}/presence", service.url()))
        .json(&join(ROOM))
        .send()
        .await?;
    assert_eq!(anonymous.status().as_u16(), 401);
    for bad in [
        json!({"action": "dance", "client_id": "c", "room": ROOM}),
        json!({"action": "join", "room": ROOM}),
        json!({"action": "join", "client_id": "", "room": ROOM}),
        json!({"action": "join", "client_id": "c"}),
        json!({"action": "join", "client_id": "c", "room": ROOM, "state": [1, 2]}),
        json!({"action": "message", "client_id": "c", "room": ROOM, "data": 1}),
        json!({"action": "update", "client_id": "c", "room": ROOM, "state": {}}),
        json!({"action": "heartbeat", "client_id": "nobody"}),
        json!({"action": "watch", "client_id": "c", "room": ROOM}),
        json!({"action": "join", "client_id": "c", "room": ROOM, "extra": true}),
    ] {
        assert_eq!(
            refusal(u1.presence_post(&bad).await),
            (400, "bad_request".into()),
            "{bad}"
        );
    }
    let raw = reqwest::Client::new()
        .post(format!("{}/presence", service.url()))
        .bearer_auth(service::token("u1"))
        .body("{not json")
        .send()
        .await?;
    assert_eq!(raw.status().as_u16(), 400);
    let missing_room = reqwest::Client::new()
        .get(format!("{}/presence/stream", service.url()))
        .bearer_auth(service::token("u1"))
        .send()
        .await?;
    assert_eq!(missing_room.status().as_u16(), 400);
    assert_eq!(
        refusal(
            u1.presence_post(&json!({"action": "join", "client_id": "c", "room": ROOM, "state": {"note": "x".repeat(200)}}))
                .await
        ),
        (413, "payload_too_large".into())
    );

    // Limits: rooms per client, then the rate.
    u1.presence_post(&join(ROOM)).await?;
    u1.presence_post(&join("user_projects[1]")).await?;
    assert_eq!(
        refusal(u1.presence_post(&join("me[\"u1\"]")).await),
        (429, "too_many_requests".into())
    );
    let mut limited = None;
    for i in 0..30 {
        let r = u1
            .presence_post(&json!({"action": "message", "client_id": "c", "room": ROOM, "data": i}))
            .await;
        if r.is_err() {
            limited = Some(refusal(r));
            break;
        }
    }
    assert_eq!(limited, Some((429, "too_many_requests".into())));

    // Over gRPC a refused action is an error event, and the stream goes on.
    let mut g3 = grpc(&service, "u3")?.presence().await?;
    g3.send("join", "g", ROOM, Some(&json!({})), None).await?;
    let e = next_grpc(&mut g3).await?;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{e}"
    );
    g3.send("fly", "g", ROOM, None, None).await?;
    assert_eq!(next_grpc(&mut g3).await?["code"], "bad_request");
    g3.send(
        "join",
        "g",
        "user_projects[3]",
        Some(&json!({"s": 1})),
        None,
    )
    .await?;
    g3.send("watch", "", "user_projects[3]", None, None).await?;
    let members = next_grpc(&mut g3).await?;
    assert_eq!(members["type"], "members", "{members}");
    assert_eq!(members["members"][0]["user_id"], "u3", "{members}");
    service.stop().await;
    Ok(())
}

/// A `project_members` row deleted: at the next checkpoint the member leaves the project's room
/// (the others see why) and its own watch ends with `closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_membership_ends_presence_at_the_next_checkpoint() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s, |_| {}).await?;
    let u1 = http(&service, "u1")?;
    let u2 = http(&service, "u2")?;
    u1.presence_post(
        &json!({"action": "join", "client_id": "c1", "room": ROOM, "state": {"status": "idle"}}),
    )
    .await?;
    let mut own = u1.presence_watch(ROOM).await?;
    assert_eq!(next(&mut own).await?["members"][0]["user_id"], "u1");
    let mut other = u2.presence_watch(ROOM).await?;
    assert_eq!(next(&mut other).await?["members"][0]["user_id"], "u1");
    s.sql
        .execute(
            "DELETE FROM project_members WHERE project_id = 2 AND user_id = 'u1'",
            &[],
        )
        .await?;
    assert_eq!(
        next(&mut other).await?,
        json!({"type": "leave", "room": ROOM, "user_id": "u1", "client_id": "c1", "reason": "membership"})
    );
    // Its own watch: the leave, then the end.
    let mut closed = next(&mut own).await?;
    if closed["type"] == "leave" {
        closed = next(&mut own).await?;
    }
    assert_eq!(closed["type"], "closed", "{closed}");
    assert_eq!(closed["code"], "forbidden", "{closed}");
    assert!(
        tokio::time::timeout(WAIT, own.next()).await?.is_none(),
        "the watch ended"
    );
    // And it cannot come back.
    assert_eq!(
        refusal(
            u1.presence_post(
                &json!({"action": "join", "client_id": "c1", "room": ROOM, "state": {}})
            )
            .await
        ),
        (403, "forbidden".into())
    );
    service.stop().await;
    Ok(())
}

/// A client that stops talking (killed, a laptop closed) leaves after the timeout; one that
/// sends heartbeats stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_leaves_after_the_timeout() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = start(&s, |c| c.sync.presence.timeout_seconds = 1).await?;
    let u1 = http(&service, "u1")?;
    let u2 = http(&service, "u2")?;
    let mut watch = u2.presence_watch(ROOM).await?;
    next(&mut watch).await?;
    u1.presence_post(&json!({"action": "join", "client_id": "silent", "room": ROOM, "state": {}}))
        .await?;
    u2.presence_post(&json!({"action": "join", "client_id": "alive", "room": ROOM, "state": {}}))
        .await?;
    assert_eq!(next(&mut watch).await?["member"]["client_id"], "silent");
    assert_eq!(next(&mut watch).await?["member"]["client_id"], "alive");
    let heartbeats = tokio::spawn(async move {
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            u2.presence_post(&json!({"action": "heartbeat", "client_id": "alive"}))
                .await?;
        }
        anyhow::Ok(())
    });
    let started = std::time::Instant::now();
    let left = next(&mut watch).await?;
    assert_eq!(
        left,
        json!({"type": "leave", "room": ROOM, "user_id": "u1", "client_id": "silent", "reason": "timeout"})
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    heartbeats.await??;
    // The heartbeating client was never dropped: nothing else happened in the room.
    let quiet = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
    assert!(quiet.is_err(), "unexpected event: {quiet:?}");
    service.stop().await;
    Ok(())
}
