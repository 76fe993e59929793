//! raftmesh's native endpoints: membership, node status, liveness and
//! readiness, and the pre-cluster join exchange.
//!
//! Owns their JSON shapes (snake_case). Membership changes go through
//! `RaftNode::change_membership`, which the leader executes.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::body::{self, Fields};
use super::error::ApiError;
use crate::raft::bootstrap::{self, JoinRequest};
use crate::raft::{MembershipOp, PeerNode, RaftNode};

type Node = State<Arc<RaftNode>>;

/// Default mode asks the leader (which alone knows matched indexes);
/// `?stale` answers from local membership.
pub async fn members(State(node): Node, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let p = super::body::Params::parse(q.as_deref());
    let members = match super::Consistency::from_params(&p)? {
        super::Consistency::Stale => node.members(),
        _ => node.members_from_leader().await?,
    };
    Ok(super::local_json(&node, json!(members)))
}

pub async fn add_member(
    State(node): Node,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = body::json(&body?)?;
    let f = Fields::new("member", &v)?;
    let id = f
        .get("id")
        .and_then(|v| v.as_u64())
        .filter(|id| *id >= 1)
        .ok_or_else(|| ApiError::BadRequest("member.id must be an integer >= 1".into()))?;
    let addr = |field: &str| -> Result<String, ApiError> {
        let a = f
            .string(field)?
            .ok_or_else(|| ApiError::BadRequest(format!("member.{field} is required")))?;
        a.parse::<std::net::SocketAddr>()
            .map_err(|e| ApiError::BadRequest(format!("member.{field} {a:?}: {e}")))?;
        Ok(a)
    };
    let peer = PeerNode {
        api_addr: addr("api_addr")?,
        peer_addr: addr("peer_addr")?,
        name: f.string("name")?.unwrap_or_else(|| format!("node{id}")),
    };
    let index = node
        .change_membership(MembershipOp::Add { id, node: peer })
        .await?;
    Ok(Json(json!({"index": index})).into_response())
}

pub async fn remove_member(
    State(node): Node,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("member id {id:?} is not an integer")))?;
    let index = node.change_membership(MembershipOp::Remove { id }).await?;
    Ok(Json(json!({"index": index})).into_response())
}

pub async fn status(State(node): Node) -> Result<Response, ApiError> {
    Ok(super::local_json(&node, json!(node.status())))
}

pub async fn livez() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready once a leader is known and this node has applied everything it
/// knows to be committed; the body says which check failed.
pub async fn readyz(State(node): Node) -> Response {
    let s = node.status();
    let checks = [
        (
            "leader_known",
            s.leader_id.is_some(),
            match s.leader_id {
                Some(l) => format!("leader is node {l}"),
                None => "no leader known".to_string(),
            },
        ),
        (
            "applied_caught_up",
            s.applied_index >= s.commit_index && s.applied_index > 0,
            format!(
                "applied {} of committed {}",
                s.applied_index, s.commit_index
            ),
        ),
    ];
    let ready = checks.iter().all(|(_, ok, _)| *ok);
    let body = json!({
        "ready": ready,
        "checks": checks.iter().map(|(n, ok, d)| json!({"name": n, "ok": ok, "detail": d})).collect::<Vec<_>>(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub async fn join(
    State(node): Node,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: JoinRequest = serde_json::from_slice(&body?)
        .map_err(|e| ApiError::BadRequest(format!("malformed join request: {e}")))?;
    Ok(Json(bootstrap::handle_join(&node, req).await).into_response())
}
