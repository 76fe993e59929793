//! Consul-compatible health endpoints: agent checks (register, deregister,
//! TTL heartbeats), health queries, and the native `GET /v1/cluster/stats`.
//!
//! Owns the JSON shapes of checks (Consul's fields plus raftmesh's `Owner`,
//! the node that runs an HTTP/TCP check). Does not time or run checks:
//! heartbeats go to `health::Health::beat`, registrations through
//! `RaftNode::write`. Reads go through `super::read`, so every consistency
//! mode and header applies.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use serde_json::{json, Value};

use super::body::{self, Fields, Params};
use super::error::ApiError;
use super::{read, write_response};
use crate::health::{Beat, Health};
use crate::raft::RaftNode;
use crate::registry::{
    validate_check, Check, CheckKind, Command, HealthStatus, Kind, NodeCheck, Registry,
    Response as R, ServiceInstance,
};

type Node = State<Arc<RaftNode>>;
type HealthState = State<Arc<Health>>;

pub(super) fn node_name(reg: &Registry, id: u64) -> String {
    reg.node(id)
        .map_or_else(|| format!("node{id}"), |n| n.name.clone())
}

fn kind_name(c: &Check) -> &'static str {
    match c.def.kind() {
        CheckKind::Ttl(_) => "ttl",
        CheckKind::Http => "http",
        CheckKind::Tcp => "tcp",
        CheckKind::Static => "",
    }
}

/// One check in Consul's shape.
pub(super) fn check_json(reg: &Registry, c: &Check) -> Value {
    let svc = reg.service(&c.service_id);
    let d = &c.def;
    json!({
        "Node": node_name(reg, c.node),
        "CheckID": d.check_id,
        "Name": d.name,
        "Status": c.status.as_str(),
        "Notes": d.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": svc.map_or("", |s| s.spec.name.as_str()),
        "ServiceTags": svc.map_or(&[][..], |s| &s.spec.tags[..]),
        "Type": kind_name(c),
        "Interval": d.interval.clone().unwrap_or_default(),
        "Timeout": d.timeout.clone().unwrap_or_default(),
        "Definition": {
            "HTTP": d.http.clone().unwrap_or_default(),
            "Method": d.method.clone().unwrap_or_default(),
            "Header": d.header,
            "Body": d.body.clone().unwrap_or_default(),
            "TCP": d.tcp.clone().unwrap_or_default(),
            "TTL": d.ttl.clone().unwrap_or_default(),
            "Interval": d.interval.clone().unwrap_or_default(),
            "Timeout": d.timeout.clone().unwrap_or_default(),
            "DeregisterCriticalServiceAfter":
                d.deregister_critical_service_after.clone().unwrap_or_default(),
        },
        "Owner": node_name(reg, c.owner),
        "OwnerID": c.owner,
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
        "Namespace": "default",
    })
}

/// A node's `serfHealth` in Consul's shape.
pub(super) fn node_check_json(reg: &Registry, n: &NodeCheck) -> Value {
    json!({
        "Node": node_name(reg, n.node),
        "CheckID": crate::registry::NODE_CHECK_ID,
        "Name": "Serf Health Status",
        "Status": n.status.as_str(),
        "Notes": "",
        "Output": n.output,
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Namespace": "default",
    })
}

/// The checks reported for an instance: its own, or, if it has none, its
/// node's `serfHealth` (see `registry::health`).
pub(super) fn instance_checks(reg: &Registry, s: &ServiceInstance) -> Vec<Value> {
    if reg.uses_node_check(s) {
        return vec![node_check_json(reg, &reg.node_check(s.node))];
    }
    reg.checks_of(&s.spec.id)
        .map(|c| check_json(reg, c))
        .collect()
}

fn status_filter(raw: &str) -> Result<Option<HealthStatus>, ApiError> {
    match raw {
        "any" => Ok(None),
        s => HealthStatus::parse(s).map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "health state {s:?} must be any, passing, warning or critical"
            ))
        }),
    }
}

pub async fn register_check(
    State(node): Node,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (check, service_id) = body::standalone_check(&body?)?;
    validate_check(&check)?;
    let written = node
        .write(Command::RegisterCheck {
            via_node: node.id(),
            service_id,
            check,
        })
        .await?;
    if let R::UnknownService { id } = written.response {
        return Err(ApiError::NotFound(format!(
            "ServiceID {id:?} is not a registered service instance"
        )));
    }
    Ok(write_response(&node, written.index, None))
}

pub async fn deregister_check(
    State(node): Node,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let written = node.write(Command::DeregisterCheck { id }).await?;
    if let R::CheckDeregistered { id, existed: false } = written.response {
        return Err(ApiError::NotFound(format!("unknown check ID {id:?}")));
    }
    Ok(write_response(&node, written.index, None))
}

async fn beat(health: &Health, beat: Beat) -> Result<Response, ApiError> {
    health.beat(beat).await??;
    let node = health.node();
    Ok(write_response(node, node.shared().applied_index(), None))
}

/// `PUT /v1/agent/check/{pass|warn|fail}/{id}?note=`.
pub async fn ttl_beat(
    State(health): HealthState,
    Path((verb, check_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let status = match verb.as_str() {
        "pass" => HealthStatus::Passing,
        "warn" => HealthStatus::Warning,
        "fail" => HealthStatus::Critical,
        other => {
            return Err(ApiError::NotFound(format!(
                "no route for PUT /v1/agent/check/{other}/..."
            )))
        }
    };
    let p = Params::parse(q.as_deref());
    let output = p.get("note").unwrap_or("").to_string();
    beat(&health, Beat::new(check_id, status, output)).await
}

/// `PUT /v1/agent/check/update/{id}` with `{"Status": .., "Output": ..}`.
pub async fn ttl_update(
    State(health): HealthState,
    Path(check_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = body::json(&body?)?;
    let f = Fields::new("update", &v)?;
    let status = f
        .string("Status")?
        .ok_or_else(|| ApiError::BadRequest("update.Status is required".into()))?;
    let status = body::status(&status, "update.Status")?;
    let output = f.string("Output")?.unwrap_or_default();
    beat(&health, Beat::new(check_id, status, output)).await
}

/// Checks registered through this node (Consul's agent view).
pub async fn agent_checks(State(node): Node, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let me = node.id();
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Checks],
        move |reg| {
            let map: serde_json::Map<String, Value> = reg
                .checks()
                .filter(|c| c.node == me)
                .map(|c| (c.def.check_id.clone(), check_json(reg, c)))
                .collect();
            Value::Object(map)
        },
    )
    .await
}

/// The checks of every instance of a service.
pub async fn service_checks(
    State(node): Node,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Services, Kind::Checks, Kind::Nodes],
        move |reg| {
            reg.instances_of(&name)
                .flat_map(|s| reg.checks_of(&s.spec.id).map(|c| check_json(reg, c)))
                .collect::<Vec<_>>()
        },
    )
    .await
}

/// A node's checks: its `serfHealth`, then every check registered through it.
pub async fn node_checks(
    State(node): Node,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Checks, Kind::Nodes],
        move |reg| {
            let Some(id) = reg.nodes().find(|n| n.name == name).map(|n| n.id) else {
                return Vec::new();
            };
            let mut out = vec![node_check_json(reg, &reg.node_check(id))];
            out.extend(
                reg.checks()
                    .filter(|c| c.node == id)
                    .map(|c| check_json(reg, c)),
            );
            out
        },
    )
    .await
}

/// Every check (members' `serfHealth` included) in one state, or `any`.
pub async fn state_checks(
    State(node): Node,
    Path(state): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let want = status_filter(&state)?;
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Services, Kind::Checks, Kind::Nodes],
        move |reg| {
            let ok = |s: HealthStatus| want.is_none_or(|w| w == s);
            let mut out: Vec<Value> = reg
                .nodes()
                .map(|n| reg.node_check(n.id))
                .filter(|n| ok(n.status))
                .map(|n| node_check_json(reg, &n))
                .collect();
            out.extend(
                reg.checks()
                    .filter(|c| ok(c.status))
                    .map(|c| check_json(reg, c)),
            );
            out
        },
    )
    .await
}

fn count(map: &mut BTreeMap<String, BTreeMap<&'static str, u64>>, key: String, what: &'static str) {
    *map.entry(key).or_default().entry(what).or_default() += 1;
}

/// `GET /v1/cluster/stats`: instances by health and node, checks by owner,
/// and how long ago the leader heard from each member.
pub async fn cluster_stats(
    State(health): HealthState,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let node = health.node().clone();
    let contacts = health.contacts().await.ok();
    read(
        &node,
        &Params::parse(q.as_deref()),
        &[Kind::Nodes],
        move |reg| {
            let mut by_state: BTreeMap<&'static str, u64> = ["passing", "warning", "critical"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
            let mut by_node = BTreeMap::new();
            for s in reg.services() {
                let st = reg.instance_status(s).as_str();
                *by_state.entry(st).or_default() += 1;
                count(&mut by_node, node_name(reg, s.node), st);
            }
            let mut by_owner = BTreeMap::new();
            let mut checks_by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
            for c in reg.checks() {
                *checks_by_state.entry(c.status.as_str()).or_default() += 1;
                let kind = match kind_name(c) {
                    "" => "static",
                    k => k,
                };
                count(&mut by_owner, node_name(reg, c.owner), kind);
            }
            let members: Vec<Value> = reg
                .nodes()
                .map(|n| {
                    json!({
                        "id": n.id,
                        "name": n.name,
                        "failed": reg.is_failed(n.id),
                        "last_contact_ms": contacts.as_ref().and_then(|c| c.get(&n.id)),
                    })
                })
                .collect();
            json!({
                "instances": {
                    "total": reg.services().count(),
                    "by_state": by_state,
                    "by_node": by_node,
                },
                "checks": {
                    "total": reg.checks().count(),
                    "by_state": checks_by_state,
                    "by_owner": by_owner,
                },
                "members": members,
                "leader_view": contacts.is_some(),
            })
        },
    )
    .await
}
