//! Consul's session endpoints: create, renew, destroy, info, list, node.
//!
//! Owns the session JSON shape and the create body's rules (TTL 10s–24h or
//! none, `Behavior` release|delete, `LockDelay`, `Node` by name). Does not
//! time TTLs: renewals go to the leader's soft state (`health::Health::renew`)
//! and write nothing; expiry is the leader's `SessionDestroy` proposal.
//! Reads are blocking queries on `Kind::Sessions`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use serde_json::{json, Value};

use super::body::{self, Fields, Params};
use super::error::ApiError;
use super::health::node_name;
use super::{read, write_response};
use crate::health::{Health, RenewError};
use crate::raft::RaftNode;
use crate::registry::{
    parse_duration, Behavior, Command, Kind, Registry, Response as Outcome, Session,
};

type Node = State<Arc<RaftNode>>;

/// Consul's bounds on a session TTL.
const MIN_TTL: Duration = Duration::from_secs(10);
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Consul's default lock delay.
const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

fn session_json(reg: &Registry, s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": node_name(reg, s.node),
        "LockDelay": s.lock_delay_ns,
        "Behavior": s.behavior.as_str(),
        "TTL": s.ttl,
        "NodeChecks": ["serfHealth"],
        "ServiceChecks": Value::Null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// A random UUID (version 4 layout): session IDs are chosen by the node
/// that takes the request, so applying the command stays deterministic.
fn new_id() -> String {
    let b: [u8; 16] = rand::random();
    let h =
        |r: std::ops::Range<usize>| -> String { b[r].iter().map(|x| format!("{x:02x}")).collect() };
    let v = (b[6] & 0x0f) | 0x40;
    let var = (b[8] & 0x3f) | 0x80;
    format!(
        "{}-{}-{:02x}{}-{:02x}{}-{}",
        h(0..4),
        h(4..6),
        v,
        h(7..8),
        var,
        h(9..10),
        h(10..16)
    )
}

/// `LockDelay` as Consul takes it: a duration string, or a number that is
/// seconds when small and nanoseconds otherwise.
fn lock_delay(f: &Fields<'_>) -> Result<Duration, ApiError> {
    let d = match f.get("LockDelay") {
        None => DEFAULT_LOCK_DELAY,
        Some(Value::String(s)) => parse_duration(s)
            .map_err(|e| ApiError::BadRequest(format!("session.LockDelay: {e}")))?,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v < 1000 => Duration::from_secs(v),
            Some(v) => Duration::from_nanos(v),
            None => {
                return Err(ApiError::BadRequest(
                    "session.LockDelay must be a duration".into(),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::BadRequest(
                "session.LockDelay must be a duration".into(),
            ))
        }
    };
    if d > MAX_LOCK_DELAY {
        return Err(ApiError::BadRequest(format!(
            "session.LockDelay must be at most {}s",
            MAX_LOCK_DELAY.as_secs()
        )));
    }
    Ok(d)
}

fn ttl(f: &Fields<'_>) -> Result<String, ApiError> {
    let Some(t) = f.string("TTL")?.filter(|t| !t.is_empty()) else {
        return Ok(String::new());
    };
    let d = parse_duration(&t).map_err(|e| ApiError::BadRequest(format!("session.TTL: {e}")))?;
    if d.is_zero() {
        return Ok(String::new());
    }
    if !(MIN_TTL..=MAX_TTL).contains(&d) {
        return Err(ApiError::BadRequest(format!(
            "session.TTL must be between {}s and {}s, got {t:?}",
            MIN_TTL.as_secs(),
            MAX_TTL.as_secs()
        )));
    }
    Ok(t)
}

/// `PUT /v1/session/create`.
pub async fn create(
    State(node): Node,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _ = Params::parse(q.as_deref());
    let body = body?;
    let v = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        body::json(&body)?
    };
    let f = Fields::new("session", &v)?;
    let behavior = match f.string("Behavior")?.as_deref() {
        None | Some("") | Some("release") => Behavior::Release,
        Some("delete") => Behavior::Delete,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "session.Behavior must be \"release\" or \"delete\", got {other:?}"
            )))
        }
    };
    let bound = match f.string("Node")?.filter(|n| !n.is_empty()) {
        None => node.id(),
        Some(name) => node
            .state()
            .nodes()
            .find(|n| n.name == name)
            .map(|n| n.id)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("session.Node: no member named {name:?}"))
            })?,
    };
    let session = Session {
        id: new_id(),
        name: f.string("Name")?.unwrap_or_default(),
        node: bound,
        behavior,
        ttl: ttl(&f)?,
        lock_delay_ns: u64::try_from(lock_delay(&f)?.as_nanos()).unwrap_or(u64::MAX),
        create_index: 0,
        modify_index: 0,
    };
    let written = node.write(Command::SessionCreate(session)).await?;
    match written.response {
        Outcome::SessionCreated { id } => Ok(write_response(
            &node,
            written.index,
            Some(json!({ "ID": id })),
        )),
        Outcome::Invalid(msg) => Err(ApiError::BadRequest(msg)),
        other => Err(ApiError::unexpected("session create", &other)),
    }
}

/// `PUT /v1/session/destroy/{id}`.
pub async fn destroy(State(node): Node, Path(id): Path<String>) -> Result<Response, ApiError> {
    let written = node.write(Command::SessionDestroy { id }).await?;
    Ok(write_response(&node, written.index, Some(json!(true))))
}

/// `PUT /v1/session/renew/{id}`: answers the session, as Consul does.
pub async fn renew(
    State(node): Node,
    State(health): State<Arc<Health>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match health.renew(id.clone()).await? {
        Ok(()) => {}
        Err(RenewError::UnknownSession(id)) => {
            return Err(ApiError::NotFound(format!("unknown session {id:?}")))
        }
    }
    let (body, index) = {
        let reg = node.state();
        let list: Vec<Value> = reg
            .session(&id)
            .map(|s| session_json(&reg, s))
            .into_iter()
            .collect();
        (list, reg.last_index())
    };
    Ok(write_response(&node, index, Some(json!(body))))
}

/// `GET /v1/session/info/{id}`: a list of zero or one session.
pub async fn info(
    State(node): Node,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Sessions],
        move |reg| {
            reg.session(&id)
                .map(|s| session_json(reg, s))
                .into_iter()
                .collect::<Vec<_>>()
        },
    )
    .await
}

/// `GET /v1/session/list`.
pub async fn list(State(node): Node, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Sessions],
        |reg| {
            reg.sessions()
                .map(|s| session_json(reg, s))
                .collect::<Vec<_>>()
        },
    )
    .await
}

/// `GET /v1/session/node/{node}`: sessions bound to the member named `node`.
pub async fn of_node(
    State(node): Node,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Sessions, Kind::Nodes],
        move |reg| {
            reg.sessions()
                .filter(|s| node_name(reg, s.node) == name)
                .map(|s| session_json(reg, s))
                .collect::<Vec<_>>()
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_shaped_and_distinct() {
        let a = new_id();
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, new_id());
    }

    #[test]
    fn ttl_and_lock_delay_follow_consul_bounds() {
        let v = json!({"TTL": "5s"});
        assert!(ttl(&Fields::new("s", &v).expect("obj")).is_err());
        let v = json!({"ttl": "15s", "LockDelay": 0});
        let f = Fields::new("s", &v).expect("obj");
        assert_eq!(ttl(&f).expect("ok"), "15s");
        assert_eq!(lock_delay(&f).expect("ok"), Duration::ZERO);
        let v = json!({"LockDelay": "2s"});
        assert_eq!(
            lock_delay(&Fields::new("s", &v).expect("obj")).expect("ok"),
            Duration::from_secs(2)
        );
    }
}
