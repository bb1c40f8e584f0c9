//! The sync stream over RSocket on a WebSocket, frame by frame (the real PowerSync client over
//! it is in tests/powersync.rs): the token in SETUP before anything else, the same admission
//! as HTTP, request-N flow control (never more lines in flight than granted), keepalives, and
//! every kind of bad input refused with an ERROR frame while the server stays up.

use support::seed;
use support::service;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use service::{config, token};
use tokio_tungstenite::tungstenite::Message;
use walsync::Service;
use walsync_protocol::Line;
use walsync_protocol::rsocket::{Frame, Setup, code};
use walsync_server::ServerConfig;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> anyhow::Result<Socket> {
    let ws = url.replacen("http://", "ws://", 1) + "/sync/stream";
    Ok(tokio_tungstenite::connect_async(ws).await?.0)
}

fn setup(token: Option<&str>, mime: &str) -> Frame {
    let metadata = match (token, mime) {
        (Some(t), "application/json") => Some(
            json!({"token": format!("Token {t}")})
                .to_string()
                .into_bytes(),
        ),
        (Some(t), _) => Some(walsync_protocol_bson(
            &json!({"token": format!("Token {t}")}),
        )),
        (None, _) => None,
    };
    Frame::Setup(Setup {
        major: 1,
        minor: 0,
        keepalive_ms: 20_000,
        lifetime_ms: 90_000,
        resume: false,
        lease: false,
        metadata_mime: mime.into(),
        data_mime: mime.into(),
        metadata,
        data: Vec::new(),
    })
}

/// A BSON document of a JSON object (as the SDKs' earlier versions sent metadata).
fn walsync_protocol_bson(v: &serde_json::Value) -> Vec<u8> {
    // A checkpoint line's BSON is made by the protocol crate; for a plain object, build the
    // document by hand: int32 length, one string element per key, a terminating zero.
    let mut body = Vec::new();
    for (k, v) in v.as_object().expect("an object") {
        let s = v.as_str().expect("string values");
        body.push(0x02);
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(&((s.len() + 1) as i32).to_le_bytes());
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut doc = ((body.len() + 5) as i32).to_le_bytes().to_vec();
    doc.extend(body);
    doc.push(0);
    doc
}

fn request_stream(initial_n: u32, body: serde_json::Value) -> Frame {
    Frame::RequestStream {
        stream: 1,
        initial_n,
        follows: false,
        metadata: Some(json!({"path": "/sync/stream"}).to_string().into_bytes()),
        data: body.to_string().into_bytes(),
    }
}

async fn send(ws: &mut Socket, f: &Frame) -> anyhow::Result<()> {
    ws.send(Message::Binary(f.encode().into())).await?;
    Ok(())
}

/// The next frame, or `None` when the socket closed or nothing came within `wait`.
async fn next(ws: &mut Socket, wait: Duration) -> anyhow::Result<Option<Frame>> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) | Ok(None) => return Ok(None),
            Ok(Some(Err(_))) => return Ok(None),
            Ok(Some(Ok(Message::Binary(b)))) => return Ok(Some(Frame::decode(&b)?)),
            Ok(Some(Ok(Message::Close(_)))) => return Ok(None),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// The ERROR frame the server answers with (the socket then closes).
async fn error_of(ws: &mut Socket) -> anyhow::Result<(u32, u32, String)> {
    match next(ws, Duration::from_secs(15)).await? {
        Some(Frame::Error {
            stream,
            code,
            message,
        }) => Ok((stream, code, message)),
        other => anyhow::bail!("expected an ERROR frame, got {other:?}"),
    }
}

fn line_of(f: &Frame) -> anyhow::Result<Line> {
    match f {
        Frame::Payload {
            next: true, data, ..
        } => Ok(Line::from_bson(data)?),
        other => anyhow::bail!("expected a PAYLOAD, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsocket_grants_lines_only_as_the_client_asks() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = Service::start(config(&s, ServerConfig::default())).await?;
    let url = service.url();

    // Granted one line: exactly one comes, however many are ready.
    let mut ws = open(&url).await?;
    send(&mut ws, &setup(Some(&token("u1")), "application/json")).await?;
    send(
        &mut ws,
        &request_stream(1, json!({"buckets": [], "client_id": "ws"})),
    )
    .await?;
    let first = next(&mut ws, Duration::from_secs(15))
        .await?
        .expect("a line");
    assert!(matches!(line_of(&first)?, Line::Checkpoint(_)), "{first:?}");
    assert_eq!(
        next(&mut ws, Duration::from_millis(700)).await?,
        None,
        "no line beyond the one granted"
    );
    // A keepalive asking for a reply gets one, with its data, even with no credit.
    send(
        &mut ws,
        &Frame::Keepalive {
            respond: true,
            last_position: 0,
            data: b"are you there".to_vec(),
        },
    )
    .await?;
    assert_eq!(
        next(&mut ws, Duration::from_secs(5)).await?,
        Some(Frame::Keepalive {
            respond: false,
            last_position: 0,
            data: b"are you there".to_vec()
        })
    );
    // Three more granted: three more lines, then silence again.
    send(&mut ws, &Frame::RequestN { stream: 1, n: 3 }).await?;
    for _ in 0..3 {
        let f = next(&mut ws, Duration::from_secs(5))
            .await?
            .expect("a granted line");
        line_of(&f)?;
    }
    assert_eq!(next(&mut ws, Duration::from_millis(700)).await?, None);
    // Plenty granted: the checkpoint completes, and the lines are the HTTP stream's.
    send(
        &mut ws,
        &Frame::RequestN {
            stream: 1,
            n: 100_000,
        },
    )
    .await?;
    let mut complete = false;
    while let Some(f) = next(&mut ws, Duration::from_secs(5)).await? {
        if matches!(line_of(&f)?, Line::CheckpointComplete(_)) {
            complete = true;
            break;
        }
    }
    assert!(complete, "the first checkpoint completed");
    // CANCEL ends the stream; the server lets the socket go.
    send(&mut ws, &Frame::Cancel { stream: 1 }).await?;
    assert_eq!(next(&mut ws, Duration::from_secs(5)).await?, None);

    // BSON metadata and request, as earlier SDKs send them.
    let mut ws = open(&url).await?;
    send(&mut ws, &setup(Some(&token("u2")), "application/bson")).await?;
    send(
        &mut ws,
        &Frame::RequestStream {
            stream: 1,
            initial_n: 5,
            follows: false,
            metadata: None,
            data: walsync_protocol_bson(&json!({"client_id": "bson"})),
        },
    )
    .await?;
    let f = next(&mut ws, Duration::from_secs(15))
        .await?
        .expect("a line");
    assert!(matches!(line_of(&f)?, Line::Checkpoint(_)));
    drop(ws);
    service.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsocket_refuses_bad_input_with_errors_and_admits_like_http() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let service = Service::start(config(
        &s,
        ServerConfig {
            max_streams_per_user: 1,
            request_timeout_seconds: 1,
            max_request_bytes: 64 << 10,
            ..ServerConfig::default()
        },
    ))
    .await?;
    let url = service.url();

    // No token, a bad token, an expired scheme: refused at SETUP, nothing else read.
    for t in [None, Some("not.a.jwt")] {
        let mut ws = open(&url).await?;
        send(&mut ws, &setup(t, "application/json")).await?;
        let (stream, c, message) = error_of(&mut ws).await?;
        assert_eq!((stream, c), (0, code::REJECTED_SETUP), "{message}");
        assert!(message.starts_with("unauthenticated: "), "{message}");
    }
    // A first frame that is not SETUP; garbage; a text message; silence.
    let mut ws = open(&url).await?;
    send(&mut ws, &request_stream(1, json!({}))).await?;
    assert_eq!(error_of(&mut ws).await?.1, code::INVALID_SETUP);
    let mut ws = open(&url).await?;
    ws.send(Message::Binary(vec![0xff, 1].into())).await?;
    assert_eq!(error_of(&mut ws).await?.1, code::CONNECTION_ERROR);
    let mut ws = open(&url).await?;
    ws.send(Message::Text("{\"buckets\":[]}".into())).await?;
    assert_eq!(error_of(&mut ws).await?.1, code::CONNECTION_ERROR);
    let mut ws = open(&url).await?;
    let (_, c, message) = error_of(&mut ws).await?;
    assert_eq!(c, code::INVALID_SETUP, "{message}");
    // Resume is not offered.
    let mut ws = open(&url).await?;
    let Frame::Setup(mut resume) = setup(Some(&token("u1")), "application/json") else {
        unreachable!()
    };
    resume.major = 2;
    send(&mut ws, &Frame::Setup(resume)).await?;
    assert_eq!(error_of(&mut ws).await?.1, code::UNSUPPORTED_SETUP);

    // After a valid SETUP: a bad request, an unknown path, a fragmented request.
    let bad_requests = [
        Frame::RequestStream {
            stream: 1,
            initial_n: 1,
            follows: false,
            metadata: None,
            data: b"{\"buckets\": 7}".to_vec(),
        },
        Frame::RequestStream {
            stream: 1,
            initial_n: 1,
            follows: false,
            metadata: Some(b"{\"path\":\"/admin/status\"}".to_vec()),
            data: Vec::new(),
        },
        Frame::RequestStream {
            stream: 1,
            initial_n: 1,
            follows: true,
            metadata: None,
            data: b"{".to_vec(),
        },
    ];
    for (f, wanted) in bad_requests
        .iter()
        .zip(["bad_request:", "not_found:", "bad_request:"])
    {
        let mut ws = open(&url).await?;
        send(&mut ws, &setup(Some(&token("u1")), "application/json")).await?;
        send(&mut ws, f).await?;
        let (stream, c, message) = error_of(&mut ws).await?;
        assert_eq!((stream, c), (1, code::INVALID), "{message}");
        assert!(message.starts_with(wanted), "{message}");
    }
    // A message over server.max_request_bytes closes the socket.
    let mut ws = open(&url).await?;
    send(&mut ws, &setup(Some(&token("u1")), "application/json")).await?;
    let _ = send(
        &mut ws,
        &request_stream(1, json!({"parameters": {"x": "y".repeat(100 << 10)}})),
    )
    .await;
    assert!(
        !matches!(
            next(&mut ws, Duration::from_secs(5)).await?,
            Some(Frame::Payload { .. })
        ),
        "an oversized message is not served"
    );

    // Admission: one stream per user, whichever transport holds it.
    let mut first = open(&url).await?;
    send(&mut first, &setup(Some(&token("u3")), "application/json")).await?;
    send(&mut first, &request_stream(10, json!({}))).await?;
    assert!(next(&mut first, Duration::from_secs(15)).await?.is_some());
    let mut second = open(&url).await?;
    send(&mut second, &setup(Some(&token("u3")), "application/json")).await?;
    let (_, c, message) = error_of(&mut second).await?;
    assert_eq!(c, code::REJECTED_SETUP);
    assert!(
        message.starts_with("too_many_streams:") && message.contains("retry after"),
        "{message}"
    );
    walsync_client::install_crypto();
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{url}/sync/stream"))
        .bearer_auth(token("u3"))
        .body("{}")
        .send()
        .await?;
    assert_eq!(
        resp.status(),
        429,
        "the websocket holds the user's one place"
    );
    drop(first);
    // Its place comes back once the socket is gone.
    let freed = async {
        loop {
            let mut ws = open(&url).await?;
            send(&mut ws, &setup(Some(&token("u3")), "application/json")).await?;
            send(&mut ws, &request_stream(1, json!({}))).await?;
            if let Some(f) = next(&mut ws, Duration::from_secs(5)).await?
                && line_of(&f).is_ok()
            {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), freed).await??;

    // The server is still up and serving HTTP.
    let ready = http.get(format!("{url}/health/ready")).send().await?;
    assert_eq!(ready.status(), 200);
    service.stop().await;
    Ok(())
}

/// A client that grants no line for `sync.stall_timeout_seconds` is let go with `too_slow`, and
/// its place is free again (it must not hold an admission slot by granting nothing while
/// answering keepalives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsocket_lets_go_of_a_client_that_grants_nothing() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let mut cfg = config(
        &s,
        ServerConfig {
            max_streams_per_user: 1,
            ..ServerConfig::default()
        },
    );
    cfg.sync.stall_timeout_seconds = 1;
    let service = Service::start(cfg).await?;
    let url = service.url();
    let mut ws = open(&url).await?;
    send(&mut ws, &setup(Some(&token("u1")), "application/json")).await?;
    send(&mut ws, &request_stream(1, json!({}))).await?;
    line_of(
        &next(&mut ws, Duration::from_secs(15))
            .await?
            .expect("the granted line"),
    )?;
    // Keepalives keep coming, lines are not asked for.
    let started = std::time::Instant::now();
    let ended = loop {
        send(
            &mut ws,
            &Frame::Keepalive {
                respond: true,
                last_position: 0,
                data: Vec::new(),
            },
        )
        .await?;
        match next(&mut ws, Duration::from_millis(500)).await? {
            Some(Frame::Keepalive { .. }) => {}
            other => break other,
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the starved stream was never let go"
        );
    };
    let Some(Frame::Error {
        stream: 1,
        code: c,
        message,
    }) = ended
    else {
        anyhow::bail!("expected an ERROR frame, got {ended:?}");
    };
    assert_eq!(c, code::APPLICATION_ERROR);
    assert!(message.starts_with("too_slow:"), "{message}");
    // The user's one place is free again.
    let mut again = open(&url).await?;
    send(&mut again, &setup(Some(&token("u1")), "application/json")).await?;
    send(&mut again, &request_stream(1, json!({}))).await?;
    line_of(
        &next(&mut again, Duration::from_secs(15))
            .await?
            .expect("a line"),
    )?;
    service.stop().await;
    Ok(())
}
