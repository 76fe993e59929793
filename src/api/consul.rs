//! Consul-compatible endpoints: agent services, catalog, health and status.
//!
//! Owns the Consul JSON shapes (CamelCase fields, `X-Consul-*` headers) for
//! the registry. Does not own state: reads go through `super::read`, writes
//! through `RaftNode::write`. Check shapes and the health endpoints other
//! than `health/service` are in `super::health`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use serde_json::{json, Value};

use super::body::{self, Params};
use super::error::ApiError;
use super::health::{instance_checks, node_name};
use super::{read, write_response};
use crate::raft::RaftNode;
use crate::registry::{
    validate_service, Command, HealthStatus, Kind, NodeEntry, Registry, ServiceInstance,
};

type Node = State<Arc<RaftNode>>;

const DC: &str = "dc1";

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// A stable UUID-shaped node ID derived from the Raft node id.
fn node_uuid(id: u64) -> String {
    format!("00000000-0000-0000-0000-{id:012}")
}

fn node_json(n: &NodeEntry) -> Value {
    let addr = host_of(&n.api_addr);
    json!({
        "ID": node_uuid(n.id),
        "Node": n.name,
        "Address": addr,
        "Datacenter": DC,
        "TaggedAddresses": {"lan": addr, "wan": addr},
        "Meta": {"raftmesh-id": n.id.to_string()},
    })
}

fn weights(s: &ServiceInstance) -> Value {
    json!({"Passing": s.spec.weights.passing, "Warning": s.spec.weights.warning})
}

fn agent_service(s: &ServiceInstance) -> Value {
    json!({
        "ID": s.spec.id,
        "Service": s.spec.name,
        "Tags": s.spec.tags,
        "Meta": s.spec.meta,
        "Port": s.spec.port,
        "Address": s.spec.address,
        "Weights": weights(s),
        "EnableTagOverride": false,
        "Datacenter": DC,
        "Namespace": "default",
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

fn catalog_entry(reg: &Registry, s: &ServiceInstance) -> Value {
    let node = reg.node(s.node);
    let addr = node.map_or("", |n| host_of(&n.api_addr));
    json!({
        "ID": node_uuid(s.node),
        "Node": node_name(reg, s.node),
        "Address": addr,
        "Datacenter": DC,
        "TaggedAddresses": {"lan": addr, "wan": addr},
        "NodeMeta": {},
        "ServiceID": s.spec.id,
        "ServiceName": s.spec.name,
        "ServiceTags": s.spec.tags,
        "ServiceAddress": s.spec.address,
        "ServicePort": s.spec.port,
        "ServiceMeta": s.spec.meta,
        "ServiceEnableTagOverride": false,
        "ServiceWeights": weights(s),
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
        "Namespace": "default",
    })
}

pub async fn register(
    State(node): Node,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _ = Params::parse(q.as_deref());
    let spec = body::service(&body?)?;
    validate_service(&spec)?;
    let cmd = Command::RegisterService {
        via_node: node.id(),
        service: spec,
    };
    let written = node.write(cmd).await?;
    Ok(write_response(&node, written.index, None))
}

pub async fn deregister(State(node): Node, Path(id): Path<String>) -> Result<Response, ApiError> {
    let written = node.write(Command::DeregisterService { id }).await?;
    Ok(write_response(&node, written.index, None))
}

pub async fn agent_services(
    State(node): Node,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let me = node.id();
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Services],
        move |reg| {
            let map: serde_json::Map<String, Value> = reg
                .services()
                .filter(|s| s.node == me)
                .map(|s| (s.spec.id.to_string(), agent_service(s)))
                .collect();
            Value::Object(map)
        },
    )
    .await
}

pub async fn catalog_services(
    State(node): Node,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Services],
        |reg| reg.service_names(),
    )
    .await
}

pub async fn catalog_service(
    State(node): Node,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let p = Params::parse(q.as_deref());
    let tag = p.get("tag").map(str::to_owned);
    read(&node, &p, &[Kind::Services, Kind::Nodes], move |reg| {
        reg.instances_of(&name)
            .filter(|s| {
                tag.as_ref()
                    .is_none_or(|t| s.spec.tags.iter().any(|x| x == t))
            })
            .map(|s| catalog_entry(reg, s))
            .collect::<Vec<_>>()
    })
    .await
}

pub async fn catalog_nodes(State(node): Node, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    read(&node, &Params::parse(q.as_deref()), &[Kind::Nodes], |reg| {
        reg.nodes().map(node_json).collect::<Vec<_>>()
    })
    .await
}

pub async fn health_service(
    State(node): Node,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let p = Params::parse(q.as_deref());
    let passing_only = p.has("passing");
    let tag = p.get("tag").map(str::to_owned);
    read(&node, &p, &[Kind::Services, Kind::Checks, Kind::Nodes], move |reg| {
        reg.instances_of(&name)
            .filter(|s| tag.as_ref().is_none_or(|t| s.spec.tags.iter().any(|x| x == t)))
            .filter_map(|s| {
                if passing_only && reg.instance_status(s) != HealthStatus::Passing {
                    return None;
                }
                let checks = instance_checks(reg, s);
                let node = reg.node(s.node).map_or_else(
                    || json!({"ID": node_uuid(s.node), "Node": node_name(reg, s.node), "Datacenter": DC}),
                    node_json,
                );
                let mut service = agent_service(s);
                service["Address"] = json!(s.spec.address);
                Some(json!({"Node": node, "Service": service, "Checks": checks}))
            })
            .collect::<Vec<_>>()
    })
    .await
}

pub async fn status_leader(State(node): Node) -> Result<Response, ApiError> {
    let leader = node.leader_peer_addr().unwrap_or_default();
    Ok(super::local_json(&node, json!(leader)))
}

/// Strongly consistent in Consul, so it passes the read barrier unless
/// `?stale` is given.
pub async fn status_peers(State(node): Node, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let p = Params::parse(q.as_deref());
    if super::Consistency::from_params(&p)? != super::Consistency::Stale {
        node.linearize().await?;
    }
    Ok(super::local_json(&node, json!(node.voter_peer_addrs())))
}
