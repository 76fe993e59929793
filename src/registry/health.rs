//! Health state inside the registry: checks with their current status and
//! owner, the members the leader declared failed, and how an instance's
//! health follows from both.
//!
//! Owns the check table's rules: how registering a service replaces its
//! checks (keeping the status of a check that is re-registered unchanged,
//! so a re-registration never flaps), who runs an HTTP/TCP check (its
//! owner: the node it came through, until the leader declares that node
//! failed), and the node-level `serfHealth` check. Does not time TTLs, run
//! probes or watch members: `health` does that and proposes the outcomes
//! (`UpdateChecks`, `SetNodeHealth`) as commands.
//!
//! Invariants (on top of the registry's determinism):
//! - `by_service` holds `(service_id, check_id)` for exactly the checks
//!   bound to an instance; a check bound to an instance dies with it.
//! - An active (HTTP/TCP) check's owner is a live member whenever one
//!   exists: every change of membership or liveness, and a check registered
//!   through a node that is not live, reassigns orphans, each to the live
//!   member running the fewest active checks (ties: lowest id). Nothing
//!   else walks the whole table, so a registration costs O(log n).
//! - An instance with checks of its own is as healthy as its worst check;
//!   only an instance without any reports its node's `serfHealth`, because
//!   the node an instance registered through says nothing about the
//!   instance once its checks run elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{parse_duration, CheckDef, NodeId, Registry, Response, ServiceInstance, StateKey};

/// A check's status, ordered from best to worst.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Passing,
    Warning,
    #[default]
    Critical,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Passing => "passing",
            HealthStatus::Warning => "warning",
            HealthStatus::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "passing" => Some(HealthStatus::Passing),
            "warning" => Some(HealthStatus::Warning),
            "critical" => Some(HealthStatus::Critical),
            _ => None,
        }
    }
}

/// What kind of check a definition describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// Kept passing by heartbeats; lapses after the TTL.
    Ttl(Duration),
    /// Probed by the owner node.
    Http,
    Tcp,
    /// Only changed by its registration (no TTL, no probe).
    Static,
}

impl CheckDef {
    pub fn kind(&self) -> CheckKind {
        if let Some(ttl) = self.ttl.as_deref().and_then(|t| parse_duration(t).ok()) {
            CheckKind::Ttl(ttl)
        } else if self.http.is_some() {
            CheckKind::Http
        } else if self.tcp.is_some() {
            CheckKind::Tcp
        } else {
            CheckKind::Static
        }
    }

    /// HTTP and TCP checks are run by a node; the rest are not. (Cheap:
    /// no parsing, for scans over every check.)
    pub fn is_active(&self) -> bool {
        self.ttl.is_none() && (self.http.is_some() || self.tcp.is_some())
    }

    fn same_probe(&self, other: &CheckDef) -> bool {
        (&self.ttl, &self.http, &self.tcp) == (&other.ttl, &other.http, &other.tcp)
    }
}

/// A registered check and its current state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub def: CheckDef,
    /// The instance it belongs to; empty for a node-level check.
    pub service_id: String,
    /// The node it was registered through.
    pub node: NodeId,
    /// The node that runs it (HTTP/TCP); moves off failed nodes.
    pub owner: NodeId,
    pub status: HealthStatus,
    pub output: String,
    pub create_index: u64,
    pub modify_index: u64,
}

/// One status change. `owner`, when set, must still be the check's owner:
/// a probe result from a node that no longer runs the check is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckUpdate {
    pub check_id: String,
    pub status: HealthStatus,
    pub output: String,
    pub owner: Option<NodeId>,
}

/// A node's `serfHealth`, computed from membership and the failed set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCheck {
    pub node: NodeId,
    pub status: HealthStatus,
    pub output: &'static str,
}

pub const NODE_CHECK_ID: &str = "serfHealth";

impl Registry {
    pub(super) fn rebuild_index(&mut self) {
        self.by_service = self
            .checks
            .iter()
            .filter(|(_, c)| !c.service_id.is_empty())
            .map(|(id, c)| (c.service_id.clone(), id.clone()))
            .collect();
    }

    /// Check ids of instance `service_id`, in id order.
    fn check_ids_of<'a>(&'a self, service_id: &'a str) -> impl Iterator<Item = &'a String> {
        self.by_service
            .range((service_id.to_string(), String::new())..)
            .take_while(move |(sid, _)| sid == service_id)
            .map(|(_, id)| id)
    }

    fn is_live(&self, node: NodeId) -> bool {
        self.nodes.contains_key(&node) && !self.failed.contains(&node)
    }

    /// Inserts `def` as a check of `service_id` ("" for a node check). A
    /// check re-registered with the same probe keeps its status, output and
    /// owner; otherwise it starts at its initial status, run by `via`.
    /// Returns whether it is new, and the keys of checks moved to give it a
    /// live owner (rare: only when `via` is not a live member).
    fn put_check(
        &mut self,
        index: u64,
        via: NodeId,
        service_id: &str,
        def: CheckDef,
    ) -> (bool, Vec<StateKey>) {
        let id = def.check_id.clone();
        let previous = self.checks.remove(&id).map(|b| *b);
        if let Some(p) = &previous {
            self.by_service.remove(&(p.service_id.clone(), id.clone()));
        }
        let kept = previous
            .as_ref()
            .filter(|p| p.service_id == service_id && p.def.same_probe(&def));
        let check = Check {
            service_id: service_id.to_string(),
            node: via,
            owner: kept.map_or(via, |p| p.owner),
            status: kept.map_or(def.status, |p| p.status),
            output: kept.map(|p| p.output.clone()).unwrap_or_default(),
            create_index: previous.as_ref().map_or(index, |p| p.create_index),
            modify_index: index,
            def,
        };
        let orphan = check.def.is_active() && !self.is_live(check.owner);
        if !service_id.is_empty() {
            self.by_service.insert((service_id.to_string(), id.clone()));
        }
        self.checks.insert(id, Box::new(check));
        let moved = if orphan {
            self.reassign_orphans(index)
        } else {
            Vec::new()
        };
        (previous.is_none(), moved)
    }

    pub(super) fn remove_check(&mut self, id: &str) -> bool {
        match self.checks.remove(id) {
            Some(c) => {
                self.by_service.remove(&(c.service_id, id.to_string()));
                true
            }
            None => false,
        }
    }

    /// Makes `defs` the checks of instance `service_id`; returns every
    /// check key added, changed or removed.
    pub(super) fn replace_service_checks(
        &mut self,
        index: u64,
        via: NodeId,
        service_id: &str,
        defs: Vec<CheckDef>,
    ) -> Vec<StateKey> {
        let new: BTreeSet<&str> = defs.iter().map(|d| d.check_id.as_str()).collect();
        let gone: Vec<String> = self
            .check_ids_of(service_id)
            .filter(|id| !new.contains(id.as_str()))
            .cloned()
            .collect();
        let mut touched = Vec::new();
        for id in gone {
            self.remove_check(&id);
            touched.push(StateKey::Check(id));
        }
        for def in defs {
            touched.push(StateKey::Check(def.check_id.clone()));
            touched.extend(self.put_check(index, via, service_id, def).1);
        }
        touched
    }

    pub(super) fn register_check(
        &mut self,
        index: u64,
        via: NodeId,
        service_id: Option<&str>,
        def: CheckDef,
    ) -> (Response, Vec<StateKey>) {
        let sid = service_id.unwrap_or("");
        if !sid.is_empty() && !self.services.contains_key(sid) {
            return (
                Response::UnknownService {
                    id: sid.to_string(),
                },
                Vec::new(),
            );
        }
        let id = def.check_id.clone();
        let (created, moved) = self.put_check(index, via, sid, def);
        let mut touched = vec![StateKey::Check(id.clone())];
        touched.extend(moved);
        (Response::CheckRegistered { id, created }, touched)
    }

    pub(super) fn update_checks(
        &mut self,
        index: u64,
        updates: &[CheckUpdate],
    ) -> (Response, Vec<StateKey>) {
        let mut touched = Vec::new();
        for u in updates {
            let Some(c) = self.checks.get_mut(&u.check_id) else {
                continue;
            };
            if u.owner.is_some_and(|o| o != c.owner) {
                continue;
            }
            if c.status == u.status && c.output == u.output {
                continue;
            }
            c.status = u.status;
            c.output.clone_from(&u.output);
            c.modify_index = index;
            touched.push(StateKey::Check(u.check_id.clone()));
        }
        (
            Response::Updated {
                changed: touched.len(),
            },
            touched,
        )
    }

    pub(super) fn set_node_health(
        &mut self,
        index: u64,
        node: NodeId,
        failed: bool,
    ) -> (Response, Vec<StateKey>) {
        let mut touched = Vec::new();
        if self.nodes.contains_key(&node) {
            let changed = if failed {
                self.failed.insert(node)
            } else {
                self.failed.remove(&node)
            };
            if changed {
                touched.push(StateKey::NodeFailed(node));
            }
            touched.extend(self.reassign_orphans(index));
        }
        (
            Response::Updated {
                changed: touched.len(),
            },
            touched,
        )
    }

    /// Members that are not failed, in id order.
    pub fn live_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .keys()
            .filter(|id| !self.failed.contains(id))
            .copied()
            .collect()
    }

    /// Moves every active check whose owner is failed or gone to a live
    /// member (see the module invariants).
    pub(super) fn reassign_orphans(&mut self, index: u64) -> Vec<StateKey> {
        let live = self.live_nodes();
        if live.is_empty() {
            return Vec::new();
        }
        let mut load: BTreeMap<NodeId, usize> = live.iter().map(|id| (*id, 0)).collect();
        for c in self.checks.values().filter(|c| c.def.is_active()) {
            if let Some(n) = load.get_mut(&c.owner) {
                *n += 1;
            }
        }
        let mut touched = Vec::new();
        for (id, c) in self.checks.iter_mut() {
            if !c.def.is_active() || load.contains_key(&c.owner) {
                continue;
            }
            let (&to, n) = load
                .iter_mut()
                .min_by_key(|(id, n)| (**n, **id))
                .expect("live is not empty");
            *n += 1;
            c.owner = to;
            c.modify_index = index;
            touched.push(StateKey::Check(id.clone()));
        }
        touched
    }

    pub fn checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.values().map(|c| &**c)
    }

    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.get(id).map(|c| &**c)
    }

    /// The checks of one instance, in id order.
    pub fn checks_of<'a>(&'a self, service_id: &'a str) -> impl Iterator<Item = &'a Check> {
        self.check_ids_of(service_id)
            .filter_map(|id| self.check(id))
    }

    pub fn is_failed(&self, node: NodeId) -> bool {
        self.failed.contains(&node)
    }

    /// The node-level check of `node`.
    pub fn node_check(&self, node: NodeId) -> NodeCheck {
        let (status, output) = if !self.nodes.contains_key(&node) {
            (HealthStatus::Critical, "Node is not a cluster member")
        } else if self.failed.contains(&node) {
            (
                HealthStatus::Critical,
                "Node failed: the leader has not heard from it within the node failure timeout",
            )
        } else {
            (HealthStatus::Passing, "Agent alive and reachable")
        };
        NodeCheck {
            node,
            status,
            output,
        }
    }

    /// Whether the instance's health comes from its node (it has no checks).
    pub fn uses_node_check(&self, s: &ServiceInstance) -> bool {
        self.check_ids_of(&s.spec.id).next().is_none()
    }

    /// The instance's aggregate health (see the module invariants).
    pub fn instance_status(&self, s: &ServiceInstance) -> HealthStatus {
        if self.uses_node_check(s) {
            return self.node_check(s.node).status;
        }
        self.checks_of(&s.spec.id)
            .map(|c| c.status)
            .max()
            .unwrap_or(HealthStatus::Passing)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Command, NodeEntry, ServiceSpec};
    use super::*;

    use NodeEntry as N;

    fn http_check(id: &str) -> CheckDef {
        CheckDef {
            check_id: id.into(),
            http: Some("http://127.0.0.1:1/".into()),
            interval: Some("1s".into()),
            ..CheckDef::default()
        }
    }

    fn ttl_check(id: &str) -> CheckDef {
        CheckDef {
            check_id: id.into(),
            ttl: Some("10s".into()),
            ..CheckDef::default()
        }
    }

    fn cluster() -> Registry {
        let mut reg = Registry::new();
        reg.set_members(1, vec![N::test(1), N::test(2), N::test(3)]);
        reg
    }

    fn register(reg: &mut Registry, index: u64, via: NodeId, id: &str, checks: Vec<CheckDef>) {
        reg.apply(
            index,
            &Command::RegisterService {
                via_node: via,
                service: ServiceSpec {
                    id: id.into(),
                    name: "web".into(),
                    checks,
                    ..ServiceSpec::default()
                },
            },
        );
    }

    fn status(reg: &Registry, check: &str) -> HealthStatus {
        reg.check(check).expect("check exists").status
    }

    fn update(id: &str, status: HealthStatus, owner: Option<NodeId>) -> Command {
        Command::UpdateChecks {
            updates: vec![CheckUpdate {
                check_id: id.into(),
                status,
                output: String::new(),
                owner,
            }],
        }
    }

    #[test]
    fn registration_moves_checks_into_the_table_and_starts_critical() {
        let mut reg = cluster();
        register(&mut reg, 2, 1, "w1", vec![ttl_check("service:w1")]);
        assert!(reg.service("w1").expect("w1").spec.checks.is_empty());
        assert_eq!(status(&reg, "service:w1"), HealthStatus::Critical);
        let w1 = reg.service("w1").expect("w1");
        assert_eq!(reg.instance_status(w1), HealthStatus::Critical);
        reg.apply(3, &update("service:w1", HealthStatus::Passing, None));
        let w1 = reg.service("w1").expect("w1");
        assert_eq!(reg.instance_status(w1), HealthStatus::Passing);
    }

    #[test]
    fn re_registration_keeps_status_and_drops_checks_no_longer_listed() {
        let mut reg = cluster();
        register(&mut reg, 2, 1, "w1", vec![ttl_check("a"), ttl_check("b")]);
        reg.apply(3, &update("a", HealthStatus::Passing, None));
        register(&mut reg, 4, 2, "w1", vec![ttl_check("a")]);
        assert_eq!(status(&reg, "a"), HealthStatus::Passing);
        assert!(reg.check("b").is_none());
        assert_eq!(reg.checks_of("w1").count(), 1);
        // A changed probe is a new check: back to its initial status.
        let mut changed = ttl_check("a");
        changed.ttl = Some("20s".into());
        register(&mut reg, 5, 2, "w1", vec![changed]);
        assert_eq!(status(&reg, "a"), HealthStatus::Critical);
        reg.apply(6, &Command::DeregisterService { id: "w1".into() });
        assert_eq!(reg.checks().count(), 0);
    }

    #[test]
    fn a_failed_nodes_active_checks_move_to_the_least_loaded_live_node_and_stay() {
        let mut reg = cluster();
        register(&mut reg, 2, 1, "w1", vec![http_check("h1")]);
        register(&mut reg, 3, 1, "w2", vec![http_check("h2")]);
        register(&mut reg, 4, 2, "w3", vec![http_check("h3")]);
        register(&mut reg, 5, 1, "w4", vec![ttl_check("t4")]);
        reg.apply(
            6,
            &Command::SetNodeHealth {
                node: 1,
                failed: true,
            },
        );
        // node 2 already ran h3, so node 3 takes h1 and then the tie goes
        // to the lowest id.
        assert_eq!(reg.check("h1").expect("h1").owner, 3);
        assert_eq!(reg.check("h2").expect("h2").owner, 2);
        assert_eq!(
            reg.check("t4").expect("t4").owner,
            1,
            "TTL checks are not run by a node"
        );
        // A stale probe result from the old owner is ignored.
        reg.apply(7, &update("h1", HealthStatus::Passing, Some(1)));
        assert_eq!(status(&reg, "h1"), HealthStatus::Critical);
        reg.apply(8, &update("h1", HealthStatus::Passing, Some(3)));
        assert_eq!(status(&reg, "h1"), HealthStatus::Passing);
        // Nothing flaps back when the node returns.
        reg.apply(
            9,
            &Command::SetNodeHealth {
                node: 1,
                failed: false,
            },
        );
        assert_eq!(reg.check("h1").expect("h1").owner, 3);
        assert!(!reg.is_failed(1));
    }

    #[test]
    fn check_less_instances_follow_their_nodes_health() {
        let mut reg = cluster();
        register(&mut reg, 2, 2, "bare", vec![]);
        register(&mut reg, 3, 2, "ttl", vec![ttl_check("t")]);
        reg.apply(4, &update("t", HealthStatus::Passing, None));
        reg.apply(
            5,
            &Command::SetNodeHealth {
                node: 2,
                failed: true,
            },
        );
        let bare = reg.service("bare").expect("bare");
        let ttl = reg.service("ttl").expect("ttl");
        assert_eq!(reg.instance_status(bare), HealthStatus::Critical);
        assert_eq!(reg.instance_status(ttl), HealthStatus::Passing);
        reg.apply(
            6,
            &Command::SetNodeHealth {
                node: 2,
                failed: false,
            },
        );
        let bare = reg.service("bare").expect("bare");
        assert_eq!(reg.instance_status(bare), HealthStatus::Passing);
    }

    #[test]
    fn a_check_for_an_unknown_instance_is_refused_and_state_round_trips() {
        let mut reg = cluster();
        let (r, touched) = reg.apply(
            2,
            &Command::RegisterCheck {
                via_node: 1,
                service_id: Some("nope".into()),
                check: ttl_check("x"),
            },
        );
        assert_eq!(r, Response::UnknownService { id: "nope".into() });
        assert!(touched.is_empty());
        register(&mut reg, 3, 1, "w1", vec![http_check("h")]);
        reg.apply(
            4,
            &Command::RegisterCheck {
                via_node: 2,
                service_id: None,
                check: ttl_check("node-check"),
            },
        );
        reg.apply(
            5,
            &Command::SetNodeHealth {
                node: 1,
                failed: true,
            },
        );
        let snap: Registry =
            serde_json::from_slice(&serde_json::to_vec(&reg).expect("encodes")).expect("decodes");
        assert_eq!(snap, reg);
        assert_eq!(snap.checks_of("w1").count(), 1);
    }
}
