//! Native stream endpoints: the replicated definitions
//! (`PUT`/`GET`/`DELETE /v1/streams/{name}`, `GET /v1/streams`, and the
//! service subscriptions under `/v1/streams/{name}/subscriptions/{sub}`),
//! and this node's event traffic: `POST /v1/streams/{name}/events` (and
//! WebSocket ingest on `GET` of the same path), `GET .../subscribe` (SSE,
//! or WebSocket when asked to upgrade) and `GET .../stats`.
//!
//! Owns request decoding (snake_case JSON, unknown fields refused; events
//! as JSON, JSON arrays, NDJSON or text lines) and the answers. Does not
//! own the rules (`registry::stream`), the processing (`stream::pipeline`)
//! or the running streams (`stream::Streams`). A definition is compiled
//! here before it is proposed, so a bad expression is a 400 and never
//! reaches Raft. A body is decoded whole before any event is offered, so a
//! malformed body adds nothing.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::body::Params;
use super::error::ApiError;
use super::{read, read_one, write_response, MAX_BODY_BYTES};
use crate::raft::RaftNode;
use crate::registry::{
    validate_stream_name, Command, Kind, Response as Outcome, StreamDef, SubscriptionDef,
};
use crate::stream::pipeline::{Input, Pipeline};
use crate::stream::{ClientStream, Streams};

/// How long a POST to a `block` stream waits for room in all.
pub const INGEST_WAIT: Duration = Duration::from_secs(10);
/// SSE comment interval, so proxies and clients see a live stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

type Node = State<Arc<RaftNode>>;
type Local = State<Arc<Streams>>;

fn bad(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("{what}: {e}"))
}

fn name_ok(what: &str, name: &str) -> Result<(), ApiError> {
    validate_stream_name(what, name).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// `PUT /v1/streams/{name}`: creates or replaces the stream; answers it.
pub async fn put(
    State(node): Node,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    name_ok("stream", &name)?;
    let def: StreamDef = serde_json::from_slice(&body?).map_err(|e| bad("stream", e))?;
    // Validates the definition too; this node compiles it now so a bad
    // expression is a 400 here, not a worker that never starts.
    Pipeline::compile(&def).map_err(|e| ApiError::BadRequest(format!("stream {name:?}: {e}")))?;
    let written = node
        .write(Command::PutStream {
            name: name.clone(),
            def,
        })
        .await?;
    match written.response {
        Outcome::StreamSet => {
            node.wait_applied(written.index).await?;
            let stored = node.state().stream(&name).map(|s| json!(s));
            Ok(write_response(&node, written.index, stored))
        }
        Outcome::Invalid(msg) => Err(ApiError::BadRequest(format!("stream {name:?}: {msg}"))),
        other => Err(ApiError::unexpected("stream", &other)),
    }
}

/// `GET /v1/streams`: every stream definition.
pub async fn list(State(node): Node, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Streams],
        |reg| reg.streams().cloned().collect::<Vec<_>>(),
    )
    .await
}

/// `GET /v1/streams/{name}`: the definition, 404 if there is none.
pub async fn get(
    State(node): Node,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read_one(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Streams],
        |reg| reg.stream(&name).cloned(),
        || format!("no stream {name:?}"),
    )
    .await
}

/// `DELETE /v1/streams/{name}`: `true`, with its subscriptions; 404 if none.
pub async fn delete(State(node): Node, Path(name): Path<String>) -> Result<Response, ApiError> {
    let written = node
        .write(Command::DeleteStream { name: name.clone() })
        .await?;
    match written.response {
        Outcome::StreamDeleted { existed: true } => {
            Ok(write_response(&node, written.index, Some(json!(true))))
        }
        _ => Err(ApiError::NotFound(format!("no stream {name:?}"))),
    }
}

/// `PUT /v1/streams/{name}/subscriptions/{sub}`.
pub async fn put_subscription(
    State(node): Node,
    Path((stream, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    name_ok("subscription", &name)?;
    let def: SubscriptionDef =
        serde_json::from_slice(&body?).map_err(|e| bad("subscription", e))?;
    def.validate()
        .map_err(|e| ApiError::BadRequest(format!("subscription {name:?}: {e}")))?;
    let written = node
        .write(Command::PutSubscription {
            stream: stream.clone(),
            name: name.clone(),
            def,
        })
        .await?;
    match written.response {
        Outcome::SubscriptionSet => {
            node.wait_applied(written.index).await?;
            let stored = node.state().subscription(&stream, &name).map(|s| json!(s));
            Ok(write_response(&node, written.index, stored))
        }
        Outcome::NotFound(msg) => Err(ApiError::NotFound(msg)),
        Outcome::Invalid(msg) => Err(ApiError::BadRequest(format!(
            "subscription {name:?}: {msg}"
        ))),
        other => Err(ApiError::unexpected("subscription", &other)),
    }
}

/// `GET /v1/streams/{name}/subscriptions`.
pub async fn list_subscriptions(
    State(node): Node,
    Path(stream): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Streams],
        |reg| reg.subscriptions_of(&stream).cloned().collect::<Vec<_>>(),
    )
    .await
}

/// `GET /v1/streams/{name}/subscriptions/{sub}`.
pub async fn get_subscription(
    State(node): Node,
    Path((stream, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read_one(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Streams],
        |reg| reg.subscription(&stream, &name).cloned(),
        || format!("no subscription {name:?} of stream {stream:?}"),
    )
    .await
}

/// `DELETE /v1/streams/{name}/subscriptions/{sub}`.
pub async fn delete_subscription(
    State(node): Node,
    Path((stream, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let written = node
        .write(Command::DeleteSubscription {
            stream: stream.clone(),
            name: name.clone(),
        })
        .await?;
    match written.response {
        Outcome::SubscriptionDeleted { existed: true } => {
            Ok(write_response(&node, written.index, Some(json!(true))))
        }
        _ => Err(ApiError::NotFound(format!(
            "no subscription {name:?} of stream {stream:?}"
        ))),
    }
}

/// The events of a body: `text/plain` → one text event per non-empty
/// line; `application/x-ndjson` → one JSON value per non-empty line;
/// otherwise one JSON value, an array being one event per element.
pub fn decode_events(content_type: Option<&str>, body: &[u8]) -> Result<Vec<Input>, ApiError> {
    let mime = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let text = || std::str::from_utf8(body).map_err(|e| bad("events must be UTF-8", e));
    match mime.as_str() {
        "text/plain" => Ok(text()?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Input::Text(l.to_string()))
            .collect()),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => text()?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map(Input::Json)
                    .map_err(|e| bad(&format!("line {}", i + 1), e))
            })
            .collect(),
        _ => Ok(events_of(
            serde_json::from_slice(body).map_err(|e| bad("events", e))?,
        )),
    }
}

/// The events of one WebSocket message: a JSON value (an array being one
/// event per element), else NDJSON when it has several lines.
fn decode_message(text: &str) -> Result<Vec<Input>, ApiError> {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => Ok(events_of(v)),
        Err(_) if text.trim_end().contains('\n') => {
            decode_events(Some("application/x-ndjson"), text.as_bytes())
        }
        Err(e) => Err(bad("events", e)),
    }
}

fn events_of(v: Value) -> Vec<Input> {
    match v {
        Value::Array(items) => items.into_iter().map(Input::Json).collect(),
        one => vec![Input::Json(one)],
    }
}

/// `POST /v1/streams/{name}/events` on this node; `GET` with a WebSocket
/// upgrade opens a long-lived ingest (one message = one body).
pub async fn events(
    State(streams): Local,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    if !streams.has(&name) {
        return Err(crate::stream::IngestError::UnknownStream(name).into());
    }
    let (mut parts, body) = req.into_parts();
    if parts.method == axum::http::Method::GET {
        let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
            .await
            .map_err(|e| ApiError::BadRequest(format!("GET here is a WebSocket ingest: {e}")))?;
        return Ok(ws
            .max_message_size(MAX_BODY_BYTES)
            .on_upgrade(move |socket| ingest_socket(socket, streams, name)));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        })?;
    let events = decode_events(content_type.as_deref(), &bytes)?;
    let done = streams.ingest(&name, events, INGEST_WAIT).await?;
    Ok(Json(done).into_response())
}

async fn ingest_socket(mut socket: WebSocket, streams: Arc<Streams>, name: String) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => match decode_message(t.as_str()) {
                Ok(events) => match streams.ingest(&name, events, INGEST_WAIT).await {
                    Ok(done) => json!(done),
                    Err(e) => {
                        let stop = matches!(
                            e,
                            crate::stream::IngestError::UnknownStream(_)
                                | crate::stream::IngestError::Stopping(_)
                        );
                        let v = error_json(e.into());
                        if stop {
                            let _ = socket.send(Message::Text(v.to_string().into())).await;
                            break;
                        }
                        v
                    }
                },
                Err(e) => error_json(e),
            },
            Message::Binary(_) => {
                json!({"error": "bad_request", "message": "send events as text messages"})
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket
            .send(Message::Text(reply.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
}

/// An error as the JSON a WebSocket peer gets: the HTTP body plus
/// `status`.
fn error_json(e: ApiError) -> Value {
    let mut v = e.to_json();
    v["status"] = json!(e.status().as_u16());
    v
}

/// `GET /v1/streams/{name}/subscribe`: this node's output events, as SSE
/// (`data:` = one event as JSON; `event: dropped` says how many this
/// client has missed so far), or as WebSocket text messages when the
/// request asks to upgrade.
pub async fn subscribe(
    State(streams): Local,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (mut parts, _) = req.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let client = match streams.subscribe(&name) {
        Some(Ok(c)) => c,
        Some(Err(_)) => return Err(ApiError::Overloaded),
        None => return Err(crate::stream::IngestError::UnknownStream(name).into()),
    };
    if upgrade {
        let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
            .await
            .map_err(|e| ApiError::BadRequest(format!("WebSocket upgrade: {e}")))?;
        return Ok(ws.on_upgrade(move |socket| subscribe_socket(socket, client)));
    }
    let events = futures_util::stream::unfold((client, 0u64), |(mut c, told)| async move {
        let lost = c.lost.load(Ordering::Relaxed);
        if lost > told {
            let ev = SseEvent::default()
                .event("dropped")
                .data(json!({"dropped": lost}).to_string());
            return Some((Ok::<_, Infallible>(ev), (c, lost)));
        }
        let e = c.rx.recv().await?;
        let ev = SseEvent::default().data(e.to_string());
        Some((Ok(ev), (c, told)))
    });
    let mut res = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    no_buffering(res.headers_mut());
    Ok(res)
}

fn no_buffering(h: &mut HeaderMap) {
    // nginx buffers responses unless told not to; a buffered stream is a
    // stalled one.
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
}

async fn subscribe_socket(mut socket: WebSocket, mut client: ClientStream) {
    let mut told = 0;
    loop {
        let lost = client.lost.load(Ordering::Relaxed);
        let text = if lost > told {
            told = lost;
            json!({"_raftmesh": {"dropped": lost}}).to_string()
        } else {
            tokio::select! {
                e = client.rx.recv() => match e {
                    Some(e) => e.to_string(),
                    None => break,
                },
                m = socket.recv() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                },
            }
        };
        if socket.send(Message::Text(text.into())).await.is_err() {
            break;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// `GET /v1/streams/{name}/stats`: this node's counters for the stream.
pub async fn stats(State(streams): Local, Path(name): Path<String>) -> Result<Response, ApiError> {
    streams
        .stats(&name)
        .map(|v| Json(v).into_response())
        .ok_or_else(|| ApiError::NotFound(format!("no stream {name:?} on this node")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(v: &[Input]) -> Vec<String> {
        v.iter()
            .map(|i| match i {
                Input::Text(t) => format!("text:{t}"),
                Input::Json(j) => format!("json:{j}"),
            })
            .collect()
    }

    #[test]
    fn bodies_decode_by_content_type() {
        let arr = decode_events(Some("application/json"), br#"[{"a":1},{"a":2}]"#).expect("ok");
        assert_eq!(kinds(&arr), ["json:{\"a\":1}", "json:{\"a\":2}"]);
        let one = decode_events(None, br#"{"a":1}"#).expect("ok");
        assert_eq!(kinds(&one), ["json:{\"a\":1}"]);
        let nd =
            decode_events(Some("application/x-ndjson"), b"{\"a\":1}\n\n{\"a\":2}\n").expect("ok");
        assert_eq!(nd.len(), 2);
        let text = decode_events(Some("text/plain; charset=utf-8"), b"x=1\n\ny=2").expect("ok");
        assert_eq!(kinds(&text), ["text:x=1", "text:y=2"]);
        let err = decode_events(Some("application/x-ndjson"), b"{\"a\":1}\n{oops").err();
        assert!(
            matches!(&err, Some(ApiError::BadRequest(m)) if m.contains("line 2")),
            "{err:?}"
        );
        assert!(decode_events(None, b"{oops").is_err());
    }
}
