//! Native route endpoints: `PUT`/`GET`/`DELETE /v1/routes/{name}` and
//! `GET /v1/routes`, the replicated configuration of every node's proxy.
//!
//! Owns the request decoding (snake_case JSON, unknown fields refused) and
//! the answers (the stored route: its definition plus `name`,
//! `create_index`, `modify_index`), and this node's proxy stats for a
//! route (`GET /v1/routes/{name}/stats`, local, never through Raft). Does
//! not own the rules (`registry::route`) or route traffic. Reads are blocking queries on
//! `Kind::Routes`, like every registry read.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::body::Params;
use super::error::ApiError;
use super::{read, read_one, write_response};
use crate::raft::RaftNode;
use crate::registry::{validate_route_name, Command, Kind, Response as Outcome, RouteDef};

type Node = State<Arc<RaftNode>>;

fn decode(body: &[u8]) -> Result<RouteDef, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("route: {e}")))
}

/// `PUT /v1/routes/{name}`: creates or replaces the route; answers it.
pub async fn put(
    State(node): Node,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    validate_route_name(&name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let def = decode(&body?)?;
    def.validate()
        .map_err(|e| ApiError::BadRequest(format!("route {name:?}: {e}")))?;
    let written = node
        .write(Command::PutRoute {
            name: name.clone(),
            def,
        })
        .await?;
    match written.response {
        Outcome::RouteSet => {
            // A forwarded write is committed, not yet applied here.
            node.wait_applied(written.index).await?;
            let stored = node.state().route(&name).map(|r| json!(r));
            Ok(write_response(&node, written.index, stored))
        }
        Outcome::Invalid(msg) => Err(ApiError::BadRequest(format!("route {name:?}: {msg}"))),
        other => Err(ApiError::unexpected("route", &other)),
    }
}

/// `GET /v1/routes`: every route, by name.
pub async fn list(State(node): Node, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Routes],
        |reg| reg.routes().cloned().collect::<Vec<_>>(),
    )
    .await
}

/// `GET /v1/routes/{name}`: 404 (with `X-Consul-Index`) if there is none.
pub async fn get(
    State(node): Node,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read_one(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Routes],
        |reg| reg.route(&name).cloned(),
        || format!("no route {name:?}"),
    )
    .await
}

/// `DELETE /v1/routes/{name}`: `true`; 404 if there was none.
pub async fn delete(State(node): Node, Path(name): Path<String>) -> Result<Response, ApiError> {
    let written = node
        .write(Command::DeleteRoute { name: name.clone() })
        .await?;
    match written.response {
        Outcome::RouteDeleted { existed: true } => {
            Ok(write_response(&node, written.index, Some(json!(true))))
        }
        _ => Err(ApiError::NotFound(format!("no route {name:?}"))),
    }
}

/// `GET /v1/routes/{name}/stats`: this node's traffic counters for the
/// route, per route and per upstream. Local to the node (every node counts
/// only what its own proxy carried).
pub async fn stats(
    State(proxy): State<Option<Arc<crate::proxy::Proxy>>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let proxy = proxy.ok_or_else(|| {
        ApiError::NotFound("this node runs no proxy (start it with --proxy-addr)".into())
    })?;
    match proxy.route_stats(&name) {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no route {name:?} on this node"
        ))),
    }
}
