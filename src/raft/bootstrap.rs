//! First-start cluster formation: `--bootstrap-expect N --join A,B,C`.
//!
//! Owns the set of nodes this node has heard of before the cluster exists,
//! the `POST /v1/internal/join` exchange and the decision to initialize.
//! Does not add nodes to a running cluster (that is `POST /v1/cluster/members`).
//!
//! Invariant (never two clusters): a node initializes only when (1) its data
//! dir held no Raft state when it started (the caller checks; such a node
//! never runs this loop), (2) it knows at least N nodes, (3) it has the
//! lowest id of all nodes it knows, and (4) none of them reported being
//! initialized. openraft itself refuses `initialize` once a vote or log
//! exists. Discovery is transitive: every node answers with everything it
//! knows, so nodes started with partial join lists still meet.
//!
//! Concurrency: one task runs `run`; the join handler and the task share the
//! known set through a `std::sync::Mutex` held only for map updates.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::types::{NodeId, PeerNode};
use super::RaftNode;

pub const PATH_JOIN: &str = "/v1/internal/join";
const ROUND_PAUSE: Duration = Duration::from_millis(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A node introducing itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub id: NodeId,
    pub node: PeerNode,
}

/// What the contacted node knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    pub initialized: bool,
    pub known: Vec<JoinRequest>,
}

/// Nodes heard of before the cluster was formed.
pub struct Discovery {
    id: NodeId,
    known: Mutex<BTreeMap<NodeId, PeerNode>>,
}

impl Discovery {
    pub fn new(id: NodeId, me: PeerNode) -> Self {
        Discovery {
            id,
            known: Mutex::new(BTreeMap::from([(id, me)])),
        }
    }

    /// Merges `nodes`; a second node claiming a known id with different
    /// addresses is ignored and logged, since ids must be unique.
    pub fn merge(&self, nodes: impl IntoIterator<Item = JoinRequest>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for JoinRequest { id, node } in nodes {
            match known.get(&id) {
                Some(existing) if *existing != node && id != self.id => {
                    tracing::warn!(
                        id,
                        ?existing,
                        ?node,
                        "two nodes claim the same id; keeping the first"
                    );
                }
                Some(_) => {}
                None => {
                    tracing::info!(id, api = %node.api_addr, "discovered node");
                    known.insert(id, node);
                }
            }
        }
    }

    pub fn known(&self) -> BTreeMap<NodeId, PeerNode> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn snapshot(&self) -> Vec<JoinRequest> {
        self.known()
            .into_iter()
            .map(|(id, node)| JoinRequest { id, node })
            .collect()
    }
}

/// The bootstrap decision, kept pure so the invariant is unit-tested: only
/// the lowest known id initializes, only once `expect` nodes are known, and
/// never when any contacted node already belongs to a cluster.
pub fn should_initialize(
    me: NodeId,
    known: &BTreeMap<NodeId, PeerNode>,
    expect: usize,
    someone_initialized: bool,
) -> bool {
    !someone_initialized && known.len() >= expect && known.keys().next() == Some(&me)
}

async fn is_initialized(node: &RaftNode) -> bool {
    node.raft().is_initialized().await.unwrap_or(true)
}

/// Answers a join request (the API handler calls this).
pub async fn handle_join(node: &RaftNode, req: JoinRequest) -> JoinReply {
    node.discovery().merge([req]);
    JoinReply {
        initialized: is_initialized(node).await,
        known: node.discovery().snapshot(),
    }
}

/// Contacts `join` addresses and known nodes until the cluster exists.
pub async fn run(
    node: std::sync::Arc<RaftNode>,
    expect: usize,
    join: Vec<String>,
    cancel: CancellationToken,
) {
    let me = JoinRequest {
        id: node.id(),
        node: node.me().clone(),
    };
    loop {
        if cancel.is_cancelled() || is_initialized(&node).await {
            return;
        }
        let mut targets: Vec<String> = join.clone();
        targets.extend(
            node.discovery()
                .known()
                .values()
                .map(|n| n.api_addr.clone()),
        );
        targets.sort();
        targets.dedup();
        targets.retain(|a| *a != me.node.api_addr);
        let mut someone_initialized = false;
        for addr in &targets {
            let reply: Result<JoinReply, _> =
                node.client().call(addr, PATH_JOIN, &me, CALL_TIMEOUT).await;
            match reply {
                Ok(r) => {
                    someone_initialized |= r.initialized;
                    node.discovery().merge(r.known);
                }
                Err(e) => tracing::debug!(%addr, error = %e, "join attempt failed"),
            }
        }
        let known = node.discovery().known();
        if someone_initialized {
            // An existing cluster will reach us through Raft if we are a
            // member; initializing here would fork it.
            tracing::info!("a contacted node is already initialized; waiting to be contacted");
        } else if should_initialize(node.id(), &known, expect, someone_initialized) {
            tracing::info!(members = ?known.keys().collect::<Vec<_>>(), "initializing cluster");
            match node.raft().initialize(known).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "initialize refused"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ROUND_PAUSE) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(ids: &[NodeId]) -> BTreeMap<NodeId, PeerNode> {
        ids.iter().map(|i| (*i, PeerNode::default())).collect()
    }

    #[test]
    fn exactly_one_node_initializes_once_all_are_known() {
        let all = known(&[1, 2, 3]);
        let deciders: Vec<NodeId> = [1, 2, 3]
            .into_iter()
            .filter(|me| should_initialize(*me, &all, 3, false))
            .collect();
        assert_eq!(deciders, vec![1]);
    }

    #[test]
    fn nobody_initializes_early_or_into_an_existing_cluster() {
        assert!(!should_initialize(1, &known(&[1, 2]), 3, false));
        assert!(!should_initialize(1, &known(&[1, 2, 3]), 3, true));
        // A node that has not heard of the lowest id does not claim it.
        assert!(!should_initialize(2, &known(&[1, 2, 3]), 3, false));
    }
}
