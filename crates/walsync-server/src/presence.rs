//! Presence over both transports (the model is [`walsync_sync::SyncCore::presence_join`] and
//! its neighbours): `POST /presence` takes one action, `GET /presence/stream?room=` watches a
//! room as NDJSON or, for browsers, as Server-Sent Events; over gRPC one bidirectional
//! `Presence` stream carries a client's actions and the events of the rooms it watches, and
//! its end leaves every room at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Status;
use walsync_protocol::pb;
use walsync_storage::BucketStore;
use walsync_sync::{Identity, PresenceError, PresenceEvent, PresenceWatch, SyncCore, TooFarBehind};

use crate::{ApiError, ErrorCode, Server};

/// Bytes of a client id, at most.
const MAX_CLIENT_ID: usize = 200;

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Verb {
    Join,
    Update,
    Leave,
    Message,
    Heartbeat,
    /// gRPC only (over HTTP a room is watched with `GET /presence/stream`).
    Watch,
    Unwatch,
}

/// `POST /presence`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action: Verb,
    client_id: String,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    state: Option<Value>,
    #[serde(default)]
    data: Option<Value>,
}

fn api_error(e: PresenceError) -> ApiError {
    let code = match &e {
        PresenceError::UnknownRoom(_) => ErrorCode::NotFound,
        PresenceError::Forbidden(_) => ErrorCode::Forbidden,
        PresenceError::NotJoined(_) | PresenceError::Invalid(_) => ErrorCode::BadRequest,
        PresenceError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
        PresenceError::TooManyRooms(_) | PresenceError::RateLimited(_) => {
            ErrorCode::TooManyRequests
        }
        PresenceError::NotReady => ErrorCode::NotReady,
        PresenceError::Storage(e) => return ApiError::internal("reading a presence room", e),
    };
    ApiError::new(code, e.to_string())
}

fn room_of(action: &Action) -> Result<&str, PresenceError> {
    action
        .room
        .as_deref()
        .filter(|r| !r.is_empty())
        .ok_or_else(|| PresenceError::Invalid(format!("{:?} needs a room", action.action)))
}

/// Performs one action of a member (not a watch).
fn perform<S: BucketStore + 'static>(
    core: &Arc<SyncCore<S>>,
    identity: &Identity,
    action: Action,
) -> Result<(), PresenceError> {
    if action.client_id.is_empty() || action.client_id.len() > MAX_CLIENT_ID {
        return Err(PresenceError::Invalid(format!(
            "client_id must have 1 to {MAX_CLIENT_ID} bytes"
        )));
    }
    let id = action.client_id.as_str();
    match action.action {
        Verb::Join => core.presence_join(
            identity,
            id,
            room_of(&action)?,
            action.state.clone().unwrap_or(Value::Null),
        ),
        Verb::Update => core.presence_update(
            identity,
            id,
            room_of(&action)?,
            action.state.clone().unwrap_or(Value::Null),
        ),
        Verb::Leave => core.presence_leave(identity, id, room_of(&action)?),
        Verb::Message => core.presence_message(
            identity,
            id,
            room_of(&action)?,
            action.data.as_ref().unwrap_or(&Value::Null),
        ),
        Verb::Heartbeat => core.presence_heartbeat(identity, id),
        Verb::Watch | Verb::Unwatch => Err(PresenceError::Invalid(
            "over HTTP a room is watched with GET /presence/stream?room=".into(),
        )),
    }
}

/// `POST /presence`: one action; `{"ok": true}` or an error.
pub(crate) async fn post<S: BucketStore + 'static>(
    State(server): State<Arc<Server<S>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let identity = match crate::http::authenticate(&server, &headers).await {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let bytes = match crate::http::read_body(&server, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let action: Action = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(e) => {
            return ApiError::new(
                ErrorCode::BadRequest,
                format!("invalid presence action: {e}"),
            )
            .into_response();
        }
    };
    match perform(&server.core, &identity, action) {
        Ok(()) => axum::Json(json!({"ok": true})).into_response(),
        Err(e) => {
            let limited = matches!(e, PresenceError::RateLimited(_));
            let mut resp = api_error(e).into_response();
            if limited {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            resp
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct WatchQuery {
    room: String,
    /// `sse` for Server-Sent Events (also chosen by `Accept: text/event-stream`).
    #[serde(default)]
    format: Option<String>,
}

/// The JSON of the `closed` event that ends a watcher that fell behind.
fn too_far_behind(room: &str, e: &TooFarBehind) -> String {
    json!({"type": "closed", "room": room, "code": "too_slow", "message": e.to_string()})
        .to_string()
}

/// A watch's events as `(kind, json)`, with a keepalive after `keepalive` of silence, until the
/// watch ends.
fn events<S: BucketStore + 'static>(
    watch: PresenceWatch<S>,
    keepalive: std::time::Duration,
) -> impl Stream<Item = (&'static str, String)> + Send {
    futures_util::stream::unfold(Some(watch), move |watch| async move {
        let mut watch = watch?;
        let next = tokio::time::timeout(keepalive, watch.next()).await;
        match next {
            Err(_) => Some((
                ("keepalive", json!({"type": "keepalive"}).to_string()),
                Some(watch),
            )),
            Ok(Some(Ok(PresenceEvent { kind, json, .. }))) => {
                Some(((kind, json.to_string()), Some(watch)))
            }
            Ok(Some(Err(e))) => {
                let closed = too_far_behind(watch.room(), &e);
                Some((("closed", closed), None))
            }
            Ok(None) => None,
        }
    })
}

/// `GET /presence/stream?room=`: the room's members, then its events, as NDJSON lines or
/// Server-Sent Events, until the watcher's membership ends (a `closed` event) or it leaves.
pub(crate) async fn stream<S: BucketStore + 'static>(
    State(server): State<Arc<Server<S>>>,
    headers: HeaderMap,
    query: Result<Query<WatchQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let identity = match crate::http::authenticate(&server, &headers).await {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let Ok(Query(query)) = query else {
        return ApiError::new(
            ErrorCode::BadRequest,
            "GET /presence/stream needs ?room= (a bucket, URL-encoded)",
        )
        .into_response();
    };
    let permit = match server.admission.admit(&identity.user_id) {
        Ok(p) => p,
        Err(r) => return crate::http::refused(r),
    };
    let watch = match server.core.presence_watch(&identity, &query.room) {
        Ok(w) => w,
        Err(e) => return api_error(e).into_response(),
    };
    let sse = query.format.as_deref() == Some("sse")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/event-stream"));
    let keepalive = server.core.config().keepalive;
    let open = crate::metrics::OpenStream::new("presence");
    let events = events(watch, keepalive).map(move |(kind, json)| {
        let _held = &permit;
        open.sent(json.len());
        (kind, json)
    });
    if sse {
        use axum::response::sse::{Event, Sse};
        let events = events.map(|(kind, json)| {
            Ok::<_, std::convert::Infallible>(Event::default().event(kind).data(json))
        });
        return Sse::new(events).into_response();
    }
    let lines = events.map(|(_, json)| {
        let mut line = json.into_bytes();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    crate::http::ndjson(Body::from_stream(lines))
}

pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<pb::PresenceEvent, Status>> + Send>>;

/// An action refused inside a gRPC presence stream: an event, and the stream goes on.
fn refused_event(verb: &str, room: Option<&str>, e: &ApiError) -> pb::PresenceEvent {
    pb::PresenceEvent {
        json: json!({
            "type": "error",
            "action": verb,
            "room": room,
            "code": e.code.as_str(),
            "message": e.message,
        })
        .to_string(),
    }
}

/// The gRPC `Presence` stream of `identity`: actions in, events out.
pub(crate) fn grpc<S: BucketStore + 'static>(
    core: Arc<SyncCore<S>>,
    identity: Identity,
    mut inbound: tonic::Streaming<pb::PresenceAction>,
    permit: crate::admission::Admitted,
) -> EventStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::PresenceEvent, Status>>(256);
    tokio::spawn(async move {
        let _permit = permit;
        let open = crate::metrics::OpenStream::new("presence");
        let mut client_id: Option<String> = None;
        let mut watches: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            let action = tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(a)) => a,
                    Ok(None) | Err(_) => break,
                },
                () = tx.closed() => break,
            };
            let verb = action.action.clone();
            let room = (!action.room.is_empty()).then(|| action.room.clone());
            let out = grpc_action(&core, &identity, &mut client_id, &mut watches, &tx, action);
            if let Err(e) = out {
                let event = refused_event(&verb, room.as_deref(), &e);
                open.sent(event.json.len());
                if tx.send(Ok(event)).await.is_err() {
                    break;
                }
            }
        }
        for (_, w) in watches {
            w.abort();
        }
        if let Some(id) = client_id {
            core.presence_disconnect(&identity.user_id, &id);
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (e, rx))
    }))
}

fn grpc_action<S: BucketStore + 'static>(
    core: &Arc<SyncCore<S>>,
    identity: &Identity,
    client_id: &mut Option<String>,
    watches: &mut HashMap<String, tokio::task::JoinHandle<()>>,
    tx: &tokio::sync::mpsc::Sender<Result<pb::PresenceEvent, Status>>,
    action: pb::PresenceAction,
) -> Result<(), ApiError> {
    let verb: Verb = serde_json::from_value(Value::String(action.action.clone())).map_err(|_| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "unknown presence action {:?} (join, update, leave, message, heartbeat, watch, unwatch)",
                action.action
            ),
        )
    })?;
    let json_field = |field: &str, text: &str| -> Result<Option<Value>, ApiError> {
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(text)
            .map(Some)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("{field} is not JSON: {e}")))
    };
    match verb {
        Verb::Watch => {
            let room = action.room;
            if watches.contains_key(&room) {
                return Ok(());
            }
            let mut watch = core.presence_watch(identity, &room).map_err(api_error)?;
            let tx = tx.clone();
            let task = tokio::spawn(async move {
                while let Some(event) = watch.next().await {
                    let json = match event {
                        Ok(e) => e.json.to_string(),
                        Err(e) => too_far_behind(watch.room(), &e),
                    };
                    if tx.send(Ok(pb::PresenceEvent { json })).await.is_err() {
                        break;
                    }
                }
            });
            watches.insert(room, task);
            Ok(())
        }
        Verb::Unwatch => {
            if let Some(w) = watches.remove(&action.room) {
                w.abort();
            }
            Ok(())
        }
        _ => {
            // The stream's client: named by its first action, kept after.
            let id = match (&*client_id, action.client_id.is_empty()) {
                (Some(id), true) => id.clone(),
                (Some(id), false) if *id != action.client_id => {
                    return Err(ApiError::new(
                        ErrorCode::BadRequest,
                        "one presence stream speaks for one client_id",
                    ));
                }
                _ => action.client_id.clone(),
            };
            let parsed = Action {
                action: verb,
                client_id: id.clone(),
                room: (!action.room.is_empty()).then_some(action.room),
                state: json_field("state_json", &action.state_json)?,
                data: json_field("data_json", &action.data_json)?,
            };
            perform(core, identity, parsed).map_err(api_error)?;
            *client_id = Some(id);
            Ok(())
        }
    }
}
