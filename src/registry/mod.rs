//! The replicated state machine's pure core: nodes, service instances,
//! checks, the commands that change them and the queries that read them
//! (the health rules are in `health`).
//!
//! Owns: `Registry` (the applied state: nodes, instances, checks and which
//! nodes the leader declared failed), `Command` (what is proposed to Raft),
//! `Response` (what applying a command answered), `StateKey` (the unit of
//! persistence) and the validation of user-supplied service definitions.
//!
//! Does not: touch tokio, sled, axum or openraft, read clocks or draw random
//! numbers. Persistence lives in `raft::state_machine`, which asks this module
//! which keys an apply touched and how each one encodes.
//!
//! Invariants:
//! - `apply` is deterministic: the same sequence of `(index, Command)` gives
//!   byte-identical state and responses on every replica. Every map is a
//!   `BTreeMap`, so iteration order is part of the state, not of the process.
//! - Business outcomes (not found, updated vs created) are `Response`
//!   values, never errors: every replica computes the same one.
//! - `last_index` only grows; it is the index of the last applied entry.
//! - Time never enters: TTLs, failure timeouts and DCSA are timed by the
//!   leader's `health` subsystem, which proposes only their outcomes.

mod duration;
mod health;
mod kv;
mod meta;
mod route;
mod stream;
mod validate;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use duration::{parse_duration, DurationError};
pub use health::{Check, CheckKind, CheckUpdate, HealthStatus, NodeCheck, NODE_CHECK_ID};
pub use kv::{Behavior, Kind, KvEntry, KvLock, KvSet, LockDelay, Session, MAX_VALUE_BYTES};
pub use meta::Meta;
pub use route::{
    validate_name as validate_route_name, Balancer, HttpMatch, Protocol, Route, RouteDef,
    RouteError,
};
pub use stream::{
    validate_name as validate_stream_name, Aggregate, BufferDef, Delivery, Policy, ProcessorDef,
    Source, Stream, StreamDef, StreamError, Subscription, SubscriptionDef, WindowKind, WindowSpan,
};
pub use validate::{validate_check, validate_service, ValidationError};

/// The strings of service instances: ids, names, tags, addresses and
/// metadata are mostly short, and a `CompactString` keeps up to 24 bytes
/// inline, so an instance costs a handful of heap allocations fewer.
pub type Str = compact_str::CompactString;

/// Raft node ids are plain integers chosen by the operator (`--id`).
pub type NodeId = u64;

/// A cluster member as the registry knows it (mirrors Raft membership).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    pub voter: bool,
}

#[cfg(test)]
impl NodeEntry {
    /// A member named `node<id>` without addresses, for tests.
    pub fn test(id: NodeId) -> Self {
        NodeEntry {
            id,
            name: format!("node{id}"),
            api_addr: String::new(),
            peer_addr: String::new(),
            voter: true,
        }
    }
}

/// A check definition as given at registration. The registry keeps it with
/// the check's state; the health subsystem interprets it (runs it, times
/// its TTL).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDef {
    pub check_id: String,
    pub name: String,
    pub notes: String,
    /// Initial status; Consul's rule is critical unless stated.
    pub status: HealthStatus,
    pub ttl: Option<String>,
    pub http: Option<String>,
    pub method: Option<String>,
    pub header: BTreeMap<String, Vec<String>>,
    pub body: Option<String>,
    pub tcp: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub deregister_critical_service_after: Option<String>,
}

/// How much traffic an instance takes relative to others of its service,
/// by its health (Consul's `Weights`; the proxy's `weighted` balancer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl Default for Weights {
    /// Consul's default.
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

impl Weights {
    fn is_default(&self) -> bool {
        *self == Weights::default()
    }
}

/// What a client asks to register. Validated before it becomes a command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub id: Str,
    pub name: Str,
    pub tags: Vec<Str>,
    pub address: Str,
    pub port: u16,
    pub meta: Meta,
    /// Omitted when default, so stored instances stay as small as before.
    #[serde(default, skip_serializing_if = "Weights::is_default")]
    pub weights: Weights,
    /// The service's checks as registered. In a stored instance this is
    /// empty: `apply` moves them into the registry's check table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckDef>,
}

/// A registered service instance: the spec as last registered plus the
/// registry's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInstance {
    #[serde(flatten)]
    pub spec: ServiceSpec,
    /// The node the registration came through (Consul's "agent").
    pub node: NodeId,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A state change proposed to Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create or replace the instance `service.id`, owned by `via_node`.
    RegisterService {
        via_node: NodeId,
        service: ServiceSpec,
    },
    /// Remove an instance and its checks; a missing id is a no-op.
    DeregisterService {
        id: String,
    },
    /// Create or replace a check, owned (run) by `via_node`; bound to the
    /// instance `service_id` if given (which must exist), else a node check.
    RegisterCheck {
        via_node: NodeId,
        service_id: Option<String>,
        check: CheckDef,
    },
    /// Remove a check; a missing id is a no-op.
    DeregisterCheck {
        id: String,
    },
    /// Status changes decided by the leader (TTL) or a check's owner
    /// (HTTP/TCP); see `CheckUpdate`.
    UpdateChecks {
        updates: Vec<CheckUpdate>,
    },
    /// The leader's verdict on a member's liveness. Marking a node failed
    /// moves the HTTP/TCP checks it ran to live members.
    SetNodeHealth {
        node: NodeId,
        failed: bool,
    },
    /// Write a KV entry, optionally under CAS or as a lock operation.
    KvSet(KvSet),
    /// Delete a key (or, with `recurse`, every key under the prefix).
    KvDelete {
        key: String,
        recurse: bool,
        cas: Option<u64>,
    },
    /// Create a session (its id is chosen by the node that took the
    /// request; indexes are set at apply).
    SessionCreate(Session),
    /// Destroy (or, from the leader, expire) a session.
    SessionDestroy {
        id: String,
    },
    /// Create or replace a (validated) route.
    PutRoute {
        name: String,
        def: RouteDef,
    },
    /// Remove a route; a missing name is a no-op.
    DeleteRoute {
        name: String,
    },
    /// Create or replace a (validated, compiled) stream definition.
    PutStream {
        name: String,
        def: StreamDef,
    },
    /// Remove a stream and its subscriptions; a missing name is a no-op.
    DeleteStream {
        name: String,
    },
    /// Create or replace a service subscription of an existing stream.
    PutSubscription {
        stream: String,
        name: String,
        def: SubscriptionDef,
    },
    DeleteSubscription {
        stream: String,
        name: String,
    },
    /// Several commands committed as one entry (group commit), applied in
    /// order. Only the proposer builds batches, from single commands.
    Batch(Vec<Command>),
}

/// What applying an entry answered; identical on every replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Blank and membership entries.
    #[default]
    None,
    Registered {
        id: String,
        created: bool,
    },
    Deregistered {
        id: String,
        existed: bool,
    },
    CheckRegistered {
        id: String,
        created: bool,
    },
    CheckDeregistered {
        id: String,
        existed: bool,
    },
    /// `RegisterCheck` named an instance that does not exist.
    UnknownService {
        id: String,
    },
    /// How many checks or nodes an update actually changed.
    Updated {
        changed: usize,
    },
    /// A KV write's or delete's outcome (Consul's `true`/`false`).
    Kv(bool),
    SessionCreated {
        id: String,
    },
    SessionDestroyed {
        existed: bool,
    },
    /// `PutRoute` stored the route.
    RouteSet,
    /// `DeleteRoute`'s outcome.
    RouteDeleted {
        existed: bool,
    },
    StreamSet,
    StreamDeleted {
        existed: bool,
    },
    SubscriptionSet,
    SubscriptionDeleted {
        existed: bool,
    },
    /// The command names something that does not exist (a subscription's
    /// stream).
    NotFound(String),
    /// The command cannot apply (unknown session, node not live).
    Invalid(String),
    /// One response per command of a `Command::Batch`, in order.
    Batch(Vec<Response>),
}

/// One unit of registry state, as the watch hub names changes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateKey {
    Node(NodeId),
    Service(String),
    Check(String),
    /// Present while the leader holds the node failed.
    NodeFailed(NodeId),
    Kv(String),
    Session(String),
    Route(String),
    Stream(String),
    /// (stream, subscription)
    Subscription(String, String),
}

const NODE_PREFIX: &str = "node/";
const SERVICE_PREFIX: &str = "svc/";
const CHECK_PREFIX: &str = "chk/";
const FAILED_PREFIX: &str = "nfail/";
const KV_PREFIX: &str = "kv/";
const SESSION_PREFIX: &str = "sess/";
const ROUTE_PREFIX: &str = "route/";
const STREAM_PREFIX: &str = "stream/";
const SUBSCRIPTION_PREFIX: &str = "ssub/";

impl StateKey {
    /// The change key: a readable prefix plus the id.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            StateKey::Node(id) => format!("{NODE_PREFIX}{id:020}").into_bytes(),
            StateKey::Service(id) => format!("{SERVICE_PREFIX}{id}").into_bytes(),
            StateKey::Check(id) => format!("{CHECK_PREFIX}{id}").into_bytes(),
            StateKey::NodeFailed(id) => format!("{FAILED_PREFIX}{id:020}").into_bytes(),
            StateKey::Kv(k) => format!("{KV_PREFIX}{k}").into_bytes(),
            StateKey::Session(id) => format!("{SESSION_PREFIX}{id}").into_bytes(),
            StateKey::Route(name) => format!("{ROUTE_PREFIX}{name}").into_bytes(),
            StateKey::Stream(name) => format!("{STREAM_PREFIX}{name}").into_bytes(),
            StateKey::Subscription(stream, name) => {
                format!("{SUBSCRIPTION_PREFIX}{stream}/{name}").into_bytes()
            }
        }
    }
}

/// The applied registry state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RegistryData")]
pub struct Registry {
    nodes: BTreeMap<NodeId, NodeEntry>,
    /// Boxed values: a B-tree leaf holds eleven slots, often half empty,
    /// and an empty slot of a boxed map costs a pointer, not a whole value.
    services: BTreeMap<Str, Box<ServiceInstance>>,
    checks: BTreeMap<String, Box<Check>>,
    /// Members the leader declared failed (and not yet alive again).
    failed: BTreeSet<NodeId>,
    kv: BTreeMap<String, Box<KvEntry>>,
    sessions: BTreeMap<String, Box<Session>>,
    routes: BTreeMap<String, Box<Route>>,
    streams: BTreeMap<String, Box<Stream>>,
    /// stream → subscription name → subscription.
    subscriptions: BTreeMap<String, BTreeMap<String, Box<Subscription>>>,
    last_index: u64,
    /// Derived from `checks`: `(instance id, check id)` pairs. A set of
    /// pairs, not a map of sets: a one-element B-tree costs a whole node.
    /// Rebuilt on snapshot restore, never persisted.
    #[serde(skip_serializing)]
    by_service: BTreeSet<(String, String)>,
}

/// `Registry` as persisted in snapshots, without derived indexes.
#[derive(Deserialize)]
struct RegistryData {
    nodes: BTreeMap<NodeId, NodeEntry>,
    services: BTreeMap<Str, Box<ServiceInstance>>,
    #[serde(default)]
    checks: BTreeMap<String, Box<Check>>,
    #[serde(default)]
    failed: BTreeSet<NodeId>,
    #[serde(default)]
    kv: BTreeMap<String, Box<KvEntry>>,
    #[serde(default)]
    sessions: BTreeMap<String, Box<Session>>,
    #[serde(default)]
    routes: BTreeMap<String, Box<Route>>,
    #[serde(default)]
    streams: BTreeMap<String, Box<Stream>>,
    #[serde(default)]
    subscriptions: BTreeMap<String, BTreeMap<String, Box<Subscription>>>,
    last_index: u64,
}

impl From<RegistryData> for Registry {
    fn from(d: RegistryData) -> Self {
        let mut reg = Registry {
            nodes: d.nodes,
            services: d.services,
            checks: d.checks,
            failed: d.failed,
            kv: d.kv,
            sessions: d.sessions,
            routes: d.routes,
            streams: d.streams,
            subscriptions: d.subscriptions,
            last_index: d.last_index,
            by_service: BTreeSet::new(),
        };
        reg.rebuild_index();
        reg
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Index of the last applied entry (0 before any).
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// Records that entries up to `index` were applied, including entries
    /// (blank, membership) that carry no command.
    pub fn advance(&mut self, index: u64) {
        self.last_index = self.last_index.max(index);
    }

    /// Applies one command at log index `index`; returns the response and the
    /// keys whose stored value changed.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> (Response, Vec<StateKey>) {
        self.advance(index);
        match cmd {
            Command::RegisterService { via_node, service } => {
                let create_index = self
                    .services
                    .get(&service.id)
                    .map(|s| s.create_index)
                    .unwrap_or(index);
                let created = create_index == index;
                let mut spec = service.clone();
                let defs = std::mem::take(&mut spec.checks);
                let instance = ServiceInstance {
                    spec,
                    node: *via_node,
                    create_index,
                    modify_index: index,
                };
                self.services.insert(service.id.clone(), Box::new(instance));
                let mut touched = vec![StateKey::Service(service.id.to_string())];
                touched.extend(self.replace_service_checks(index, *via_node, &service.id, defs));
                (
                    Response::Registered {
                        id: service.id.to_string(),
                        created,
                    },
                    touched,
                )
            }
            Command::Batch(cmds) => {
                let mut touched = Vec::new();
                let responses = cmds
                    .iter()
                    .map(|c| {
                        let (r, t) = self.apply(index, c);
                        touched.extend(t);
                        r
                    })
                    .collect();
                (Response::Batch(responses), touched)
            }
            Command::DeregisterService { id } => {
                let existed = self.services.remove(id.as_str()).is_some();
                let mut touched = if existed {
                    vec![StateKey::Service(id.clone())]
                } else {
                    Vec::new()
                };
                touched.extend(self.replace_service_checks(index, 0, id, Vec::new()));
                (
                    Response::Deregistered {
                        id: id.clone(),
                        existed,
                    },
                    touched,
                )
            }
            Command::RegisterCheck {
                via_node,
                service_id,
                check,
            } => self.register_check(index, *via_node, service_id.as_deref(), check.clone()),
            Command::DeregisterCheck { id } => {
                let existed = self.remove_check(id);
                let touched = if existed {
                    vec![StateKey::Check(id.clone())]
                } else {
                    Vec::new()
                };
                (
                    Response::CheckDeregistered {
                        id: id.clone(),
                        existed,
                    },
                    touched,
                )
            }
            Command::UpdateChecks { updates } => self.update_checks(index, updates),
            Command::SetNodeHealth { node, failed } => {
                let (r, mut touched) = self.set_node_health(index, *node, *failed);
                if *failed {
                    touched.extend(self.invalidate_node_sessions(index, *node));
                }
                (r, touched)
            }
            Command::KvSet(op) => self.kv_set(index, op),
            Command::KvDelete { key, recurse, cas } => self.kv_delete(key, *recurse, *cas),
            Command::SessionCreate(s) => self.session_create(index, s.clone()),
            Command::SessionDestroy { id } => self.session_destroy(index, id),
            Command::PutRoute { name, def } => self.put_route(index, name, def),
            Command::DeleteRoute { name } => self.delete_route(name),
            Command::PutStream { name, def } => self.put_stream(index, name, def),
            Command::DeleteStream { name } => self.delete_stream(name),
            Command::PutSubscription { stream, name, def } => {
                self.put_subscription(index, stream, name, def)
            }
            Command::DeleteSubscription { stream, name } => self.delete_subscription(stream, name),
        }
    }

    /// Replaces the member list with the one a membership entry at `index`
    /// committed. Nodes are derived from Raft membership, so they change
    /// exactly where membership changes in the log.
    pub fn set_members(&mut self, index: u64, members: Vec<NodeEntry>) -> Vec<StateKey> {
        self.advance(index);
        let mut touched: Vec<StateKey> = self.nodes.keys().map(|id| StateKey::Node(*id)).collect();
        self.nodes = members.into_iter().map(|n| (n.id, n)).collect();
        touched.extend(self.nodes.keys().map(|id| StateKey::Node(*id)));
        let gone: Vec<NodeId> = self
            .failed
            .iter()
            .filter(|id| !self.nodes.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.failed.remove(&id);
            touched.push(StateKey::NodeFailed(id));
        }
        touched.extend(self.reassign_orphans(index));
        touched.extend(self.invalidate_orphan_sessions(index));
        touched.sort();
        touched.dedup();
        touched
    }

    /// The current encoding of `key`, or `None` when it no longer exists.
    pub fn encode_value(&self, key: &StateKey) -> Option<Vec<u8>> {
        // Serializing these plain structs cannot fail: no maps with
        // non-string keys, no custom serializers.
        match key {
            StateKey::Node(id) => self
                .nodes
                .get(id)
                .map(|n| serde_json::to_vec(n).expect("NodeEntry serializes")),
            StateKey::Service(id) => self
                .services
                .get(id.as_str())
                .map(|s| serde_json::to_vec(s).expect("ServiceInstance serializes")),
            StateKey::Check(id) => self
                .checks
                .get(id)
                .map(|c| serde_json::to_vec(c).expect("Check serializes")),
            StateKey::NodeFailed(id) => self.failed.contains(id).then(|| b"true".to_vec()),
            StateKey::Kv(k) => self
                .kv
                .get(k)
                .map(|e| serde_json::to_vec(e).expect("KvEntry serializes")),
            StateKey::Session(id) => self
                .sessions
                .get(id)
                .map(|s| serde_json::to_vec(s).expect("Session serializes")),
            StateKey::Route(name) => self
                .routes
                .get(name)
                .map(|r| serde_json::to_vec(r).expect("Route serializes")),
            StateKey::Stream(name) => self
                .stream(name)
                .map(|r| serde_json::to_vec(r).expect("Stream serializes")),
            StateKey::Subscription(stream, name) => self
                .subscription(stream, name)
                .map(|r| serde_json::to_vec(r).expect("Subscription serializes")),
        }
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeEntry> {
        self.nodes.values()
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeEntry> {
        self.nodes.get(&id)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceInstance> {
        self.services.values().map(|s| &**s)
    }

    pub fn service(&self, id: &str) -> Option<&ServiceInstance> {
        self.services.get(id).map(|s| &**s)
    }

    /// Instances of one service name, ordered by id.
    pub fn instances_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ServiceInstance> {
        self.services().filter(move |s| s.spec.name == name)
    }

    /// Service name → union of its instances' tags (sorted, deduplicated).
    pub fn service_names(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in self.services.values() {
            let tags = out.entry(s.spec.name.to_string()).or_default();
            tags.extend(s.spec.tags.iter().map(|t| t.to_string()));
        }
        for tags in out.values_mut() {
            tags.sort();
            tags.dedup();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, name: &str, port: u16) -> ServiceSpec {
        ServiceSpec {
            id: id.into(),
            name: name.into(),
            port,
            tags: vec!["t".into()],
            ..ServiceSpec::default()
        }
    }

    fn register(reg: &mut Registry, index: u64, s: ServiceSpec) -> Response {
        reg.apply(
            index,
            &Command::RegisterService {
                via_node: 1,
                service: s,
            },
        )
        .0
    }

    #[test]
    fn register_creates_then_updates_keeping_create_index() {
        let mut reg = Registry::new();
        let r = register(&mut reg, 5, spec("web-1", "web", 80));
        assert_eq!(
            r,
            Response::Registered {
                id: "web-1".into(),
                created: true
            }
        );
        let r = register(&mut reg, 9, spec("web-1", "web", 81));
        assert_eq!(
            r,
            Response::Registered {
                id: "web-1".into(),
                created: false
            }
        );
        let s = reg.service("web-1").expect("registered");
        assert_eq!((s.create_index, s.modify_index, s.spec.port), (5, 9, 81));
        assert_eq!(reg.last_index(), 9);
    }

    #[test]
    fn deregister_missing_is_a_noop_with_no_touched_keys() {
        let mut reg = Registry::new();
        let (r, touched) = reg.apply(3, &Command::DeregisterService { id: "x".into() });
        assert_eq!(
            r,
            Response::Deregistered {
                id: "x".into(),
                existed: false
            }
        );
        assert!(touched.is_empty());
        assert_eq!(reg.last_index(), 3);
    }

    #[test]
    fn apply_is_deterministic_across_replicas() {
        let cmds: Vec<Command> = (0..50u16)
            .map(|i| {
                if i % 7 == 3 {
                    Command::DeregisterService {
                        id: format!("s{}", i - 1),
                    }
                } else {
                    Command::RegisterService {
                        via_node: u64::from(i % 3) + 1,
                        service: spec(&format!("s{}", i % 11), &format!("n{}", i % 4), i),
                    }
                }
            })
            .collect();
        let run = || {
            let mut reg = Registry::new();
            let responses: Vec<Response> = cmds
                .iter()
                .enumerate()
                .map(|(i, c)| reg.apply(i as u64 + 1, c).0)
                .collect();
            (serde_json::to_vec(&reg).expect("serializes"), responses)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn snapshot_encoding_round_trips() {
        let mut reg = Registry::new();
        reg.set_members(
            1,
            vec![NodeEntry {
                id: 1,
                name: "node1".into(),
                api_addr: "127.0.0.1:8500".into(),
                peer_addr: "127.0.0.1:8300".into(),
                voter: true,
            }],
        );
        register(&mut reg, 2, spec("a", "web", 1));
        register(&mut reg, 3, spec("b", "db", 2));
        let snap: Registry =
            serde_json::from_slice(&serde_json::to_vec(&reg).expect("encodes")).expect("decodes");
        assert_eq!(snap, reg);
    }

    #[test]
    fn set_members_reports_removed_and_added_nodes() {
        let mut reg = Registry::new();
        let node = NodeEntry::test;
        reg.set_members(1, vec![node(1), node(2)]);
        let touched = reg.set_members(2, vec![node(2), node(3)]);
        assert_eq!(
            touched,
            vec![StateKey::Node(1), StateKey::Node(2), StateKey::Node(3)]
        );
        assert!(reg.encode_value(&StateKey::Node(1)).is_none());
    }

    #[test]
    fn a_batch_applies_in_order_and_answers_each_command() {
        let mut reg = Registry::new();
        let batch = Command::Batch(vec![
            Command::RegisterService {
                via_node: 2,
                service: spec("a", "web", 1),
            },
            Command::RegisterService {
                via_node: 2,
                service: spec("b", "web", 2),
            },
            Command::DeregisterService { id: "a".into() },
        ]);
        let (r, touched) = reg.apply(7, &batch);
        assert_eq!(
            r,
            Response::Batch(vec![
                Response::Registered {
                    id: "a".into(),
                    created: true
                },
                Response::Registered {
                    id: "b".into(),
                    created: true
                },
                Response::Deregistered {
                    id: "a".into(),
                    existed: true
                },
            ])
        );
        assert!(reg.service("a").is_none());
        let b = reg.service("b").expect("b registered");
        assert_eq!((b.create_index, b.modify_index, b.node), (7, 7, 2));
        assert!(touched.contains(&StateKey::Service("a".into())));
        assert_eq!(reg.last_index(), 7);
    }

    #[test]
    fn service_names_merge_tags() {
        let mut reg = Registry::new();
        let mut a = spec("a", "web", 1);
        a.tags = vec!["z".into(), "a".into()];
        let mut b = spec("b", "web", 2);
        b.tags = vec!["a".into(), "m".into()];
        register(&mut reg, 1, a);
        register(&mut reg, 2, b);
        assert_eq!(reg.service_names()["web"], vec!["a", "m", "z"]);
    }
}
