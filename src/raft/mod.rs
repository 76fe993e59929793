//! Raft: openraft's types, the sled stores, the peer network and the narrow
//! `RaftNode` handle the rest of raftmesh talks to.
//!
//! Owns everything openraft-shaped. The API layer sees only `RaftNode`:
//! `write` (commit a command, forwarding to the leader when needed),
//! `linearize` (a read barrier), `state` (the applied registry) and status.
//! Does not interpret commands (`registry`) or speak HTTP to clients (`api`).
//!
//! Invariants:
//! - A write is answered `Ok` only after openraft reports it committed and
//!   applied; an unconfirmed commit becomes `OutcomeUnknown`, never `Ok`.
//! - Forwarding is one hop: the leader answers `NotLeader` rather than
//!   forwarding again, and the originating node retries until its deadline.
//! - Every wait is bounded by `Timing`.

pub mod bootstrap;
pub mod detector;
pub mod log_store;
pub mod network;
pub mod proposer;
pub mod server;
pub mod speculate;
pub mod state_machine;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError as OpenRaftError};
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use crate::registry::{Command, Registry, Response};
pub use bootstrap::Discovery;
use network::{PeerCallError, PeerClient};
use proposer::Route;
pub use state_machine::Shared;
pub use types::{NodeId, PeerNode, Raft};

/// Failures of cluster operations, as the API maps them to HTTP statuses.
/// Serializable so a leader's answer can travel back over a forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is known; retry shortly")]
    NoLeader,
    /// Internal: the contacted node is not the leader (anymore).
    #[error("this node is not the leader")]
    NotLeader,
    #[error("the write was proposed but not confirmed committed within {timeout_ms} ms; its outcome is unknown")]
    OutcomeUnknown { timeout_ms: u64 },
    #[error("a quorum could not be reached: {0}")]
    NoQuorum(String),
    #[error("{0}")]
    Invalid(String),
    #[error("node {0} is not a cluster member")]
    NotMember(NodeId),
    #[error("raft is shutting down or stopped: {0}")]
    Stopped(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A committed command's answer and the log index it committed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub response: Response,
    pub index: u64,
}

/// A membership change requested through any node, executed by the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipOp {
    Add { id: NodeId, node: PeerNode },
    Remove { id: NodeId },
}

/// Timeouts of client-facing cluster operations.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a commit may take before the answer is "outcome unknown".
    pub write_timeout: Duration,
    /// How long a request waits for a leader to exist before giving up.
    pub leader_wait: Duration,
    /// Heartbeat and election timings (`detector`).
    pub election: detector::ElectionTiming,
}

/// This node's view of itself, served by `GET /v1/cluster/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub name: String,
    pub role: String,
    pub term: u64,
    pub leader_id: Option<NodeId>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub snapshots_installed: u64,
    pub api_addr: String,
    pub peer_addr: String,
}

/// One cluster member, served by `GET /v1/cluster/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    pub voter: bool,
    pub leader: bool,
    /// Highest index known replicated to the member; only the leader knows.
    pub matched_index: Option<u64>,
}

/// How fresh a local read is: what the Consul headers report.
#[derive(Debug, Clone, Copy)]
pub struct ReadMeta {
    pub index: u64,
    pub known_leader: bool,
    pub last_contact_ms: u64,
}

/// The handle every other module uses to reach Raft.
pub struct RaftNode {
    id: NodeId,
    me: PeerNode,
    raft: Raft,
    shared: Arc<Shared>,
    client: PeerClient,
    /// Last committed index, mirrored by the log store.
    committed: Arc<AtomicU64>,
    /// When a leader was last heard from: LastContact, pre-votes, elections.
    clock: detector::Clock,
    /// While leading: when each member last answered (node liveness).
    heard: detector::Heard,
    timing: Timing,
    discovery: Discovery,
    /// Batches this node's proposals while it leads.
    proposer: proposer::Proposer,
    /// Read barriers waiting for the next read-index fetch.
    reads: ReadBatch,
}

/// Group commit for read barriers: every `linearize` waiting when a fetch
/// starts is served by that one fetch (a forwarded call on a follower, a
/// quorum round on the leader). Why: a write wakes every blocking query on
/// a node at once, and a thousand of them re-issuing with a read barrier
/// each was a thousand leader round trips. A fetch that started before a
/// caller arrived never serves it: its index might miss a write
/// acknowledged in between.
#[derive(Default)]
struct ReadBatch {
    queue: std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<Result<u64, ClusterError>>>>,
    /// Held by the caller running the current fetch.
    fetching: tokio::sync::Mutex<()>,
}

/// openraft's AppendEntries on the peer listener (also the early appends
/// of `speculate`).
pub(crate) const PATH_APPEND: &str = "/raft/append";
/// Paths of the internal calls on the peer listener.
pub(crate) const PATH_WRITE: &str = "/internal/write";
pub(crate) const PATH_READ_INDEX: &str = "/internal/read-index";
pub(crate) const PATH_MEMBERSHIP: &str = "/internal/membership";
pub(crate) const PATH_MEMBERS: &str = "/internal/members";
pub(crate) const PATH_PRE_VOTE: &str = "/internal/pre-vote";
pub(crate) const PATH_ALIVE: &str = "/internal/alive";

/// Slack added to forwarded calls so the leader's own timeout fires first
/// and its more precise answer comes back.
const FORWARD_SLACK: Duration = Duration::from_secs(2);
/// Longest single wait for a new leader between tries; a try that failed
/// for a reason no election fixes is repeated after this.
const CHANGE_WAIT: Duration = Duration::from_millis(100);

fn stopped(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Stopped(e.to_string())
}

fn outcome_unknown(timeout: Duration) -> ClusterError {
    ClusterError::OutcomeUnknown {
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The current leader and, if membership knows it, how to reach it.
pub(crate) fn leader_of(raft: &Raft) -> Option<(NodeId, Option<PeerNode>)> {
    let m = raft.metrics();
    let m = m.borrow();
    let leader = m.current_leader?;
    let node = m.membership_config.membership().get_node(&leader).cloned();
    Some((leader, node))
}

/// Sends an internal call to a leader's peer listener. A refused connection
/// means nothing was delivered, so it counts as "no leader" and the caller
/// retries; any later failure leaves the outcome unknown.
pub(crate) async fn forward_call<Req: Serialize, T: serde::de::DeserializeOwned>(
    client: &PeerClient,
    peer_addr: &str,
    path: &str,
    req: &Req,
    timeout: Duration,
) -> Result<T, ClusterError> {
    let reply: Result<T, ClusterError> = client
        .call(peer_addr, path, req, timeout + FORWARD_SLACK)
        .await
        .map_err(|e| match e {
            PeerCallError::Unreachable { .. } => ClusterError::NoLeader,
            other => {
                tracing::warn!(error = %other, path, "forward to leader failed");
                outcome_unknown(timeout)
            }
        })?;
    reply
}

/// One `client_write` with openraft's errors mapped to ours.
pub(crate) async fn client_write(
    raft: &Raft,
    cmd: Command,
    timeout: Duration,
) -> Result<Written, ClusterError> {
    match tokio::time::timeout(timeout, raft.client_write(cmd)).await {
        Err(_) => Err(outcome_unknown(timeout)),
        Ok(Ok(resp)) => Ok(Written {
            response: resp.data,
            index: resp.log_id.index,
        }),
        Ok(Err(OpenRaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
            Err(ClusterError::NotLeader)
        }
        Ok(Err(OpenRaftError::APIError(e))) => Err(ClusterError::Internal(e.to_string())),
        Ok(Err(OpenRaftError::Fatal(e))) => Err(stopped(e)),
    }
}

impl RaftNode {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: NodeId,
        me: PeerNode,
        raft: Raft,
        shared: Arc<Shared>,
        client: PeerClient,
        committed: Arc<AtomicU64>,
        timing: Timing,
    ) -> Self {
        let discovery = Discovery::new(id, me.clone());
        let proposer = proposer::Proposer::spawn(proposer::Context {
            id,
            raft: raft.clone(),
            client: client.clone(),
            write_timeout: timing.write_timeout,
        });
        RaftNode {
            id,
            me,
            raft,
            shared,
            client,
            committed,
            clock: detector::Clock::new(),
            heard: detector::Heard::default(),
            timing,
            discovery,
            proposer,
            reads: ReadBatch::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn me(&self) -> &PeerNode {
        &self.me
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    pub(crate) fn client(&self) -> &PeerClient {
        &self.client
    }

    /// The applied state; hold the guard briefly and never across an await.
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.shared.read()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn clock(&self) -> &detector::Clock {
        &self.clock
    }

    /// When each member last answered this node's alive ping (leader only).
    pub fn heard(&self) -> &detector::Heard {
        &self.heard
    }

    /// The current term and whether this node leads in it.
    pub fn leadership(&self) -> (u64, bool) {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.current_term, m.current_leader == Some(self.id))
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// A leader's "alive" ping.
    pub(crate) fn alive_local(&self, ping: &detector::Alive) {
        detector::answer_alive(&self.raft, &self.clock, ping)
    }

    /// This node's answer to a candidate's pre-vote.
    pub(crate) fn pre_vote_local(&self, req: &detector::PreVote) -> bool {
        detector::answer_pre_vote(&self.raft, &self.clock, &self.timing.election, req)
    }

    fn leader_and_node(&self) -> Option<(NodeId, Option<PeerNode>)> {
        leader_of(&self.raft)
    }

    /// The leader's peer address, if one is known.
    pub fn leader_peer_addr(&self) -> Option<String> {
        self.leader_and_node()
            .and_then(|(_, n)| n.map(|n| n.peer_addr))
    }

    /// Headers for an answer served from the local applied state.
    pub fn read_meta(&self) -> ReadMeta {
        let m = self.raft.metrics();
        let m = m.borrow();
        let known_leader = m.current_leader.is_some();
        let last_contact_ms = if m.state == ServerState::Leader {
            0
        } else {
            u64::try_from(self.clock.since_contact().as_millis()).unwrap_or(u64::MAX)
        };
        ReadMeta {
            index: self.shared.applied_index().max(1),
            known_leader,
            last_contact_ms,
        }
    }

    /// After a try failed for want of a (reachable) leader: waits until the
    /// metrics name a leader other than `failed` (a new election), at most
    /// `CHANGE_WAIT` at a time, or fails once `deadline` passes.
    async fn wait_for_change(
        &self,
        failed: Option<(u64, NodeId)>,
        deadline: Instant,
    ) -> Result<(), ClusterError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ClusterError::NoLeader);
        }
        let wait = (deadline - now).min(CHANGE_WAIT);
        let mut rx = self.raft.metrics();
        let changed = rx.wait_for(|m| match m.current_leader {
            Some(l) => Some((m.current_term, l)) != failed,
            None => false,
        });
        let _ = tokio::time::timeout(wait, changed).await;
        Ok(())
    }

    /// The (term, leader) this node currently believes in.
    fn believed_leader(&self) -> Option<(u64, NodeId)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.current_leader.map(|l| (m.current_term, l))
    }

    /// Commits `cmd` through whichever node leads; see the module invariants.
    pub async fn write(&self, cmd: Command) -> Result<Written, ClusterError> {
        let deadline = Instant::now() + self.timing.leader_wait;
        loop {
            let believed = self.believed_leader();
            match self.propose(cmd.clone(), Route::ViaLeader).await {
                Err(ClusterError::NotLeader | ClusterError::NoLeader) => {
                    self.wait_for_change(believed, deadline).await?
                }
                other => return other,
            }
        }
    }

    /// Queues `cmd` for the next batch, bounded by the commit wait (time in
    /// the queue counts too).
    async fn propose(&self, cmd: Command, route: Route) -> Result<Written, ClusterError> {
        let timeout = self.timing.write_timeout;
        match tokio::time::timeout(timeout, self.proposer.propose(cmd, route)).await {
            Ok(res) => res,
            Err(_) => Err(outcome_unknown(timeout)),
        }
    }

    /// Runs `local` if this node leads, else sends `req` to the leader's
    /// `path`; retries while there is no (reachable) leader, up to the
    /// leader wait.
    pub(crate) async fn on_leader<Req, T, Fut>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
        local: impl Fn() -> Fut,
    ) -> Result<T, ClusterError>
    where
        Req: Serialize,
        T: serde::de::DeserializeOwned,
        Fut: std::future::Future<Output = Result<T, ClusterError>>,
    {
        let deadline = Instant::now() + self.timing.leader_wait;
        loop {
            let believed = self.believed_leader();
            let outcome = match self.leader_and_node() {
                Some((leader, _)) if leader == self.id => local().await,
                Some((_, Some(node))) => {
                    forward_call(&self.client, &node.peer_addr, path, req, timeout).await
                }
                _ => Err(ClusterError::NoLeader),
            };
            match outcome {
                Err(ClusterError::NotLeader | ClusterError::NoLeader) => {
                    self.wait_for_change(believed, deadline).await?
                }
                other => return other,
            }
        }
    }

    /// Proposes `cmd` on this node, which must be the leader (forwarded
    /// writes: one hop only), batched with whatever else is waiting.
    pub(crate) async fn write_local(&self, cmd: Command) -> Result<Written, ClusterError> {
        self.propose(cmd, Route::LocalOnly).await
    }

    /// A linearizable read barrier: when it returns `Ok`, the local applied
    /// state includes every write acknowledged before the call began.
    pub async fn linearize(&self) -> Result<(), ClusterError> {
        let index = self.read_index_batched().await?;
        self.wait_applied(index).await
    }

    /// The read index, from a fetch that started after this call did,
    /// shared with every caller queued when it started (see `ReadBatch`).
    async fn read_index_batched(&self) -> Result<u64, ClusterError> {
        let queue = || self.reads.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            queue().push(tx);
            let answer = loop {
                tokio::select! {
                    biased;
                    r = &mut rx => break r,
                    guard = self.reads.fetching.lock() => {
                        // Whoever takes the lock serves everyone queued now,
                        // itself included unless an earlier fetch took it (then
                        // `rx` is already answered, or dropped if that fetch's
                        // caller went away).
                        let waiters = std::mem::take(&mut *queue());
                        if !waiters.is_empty() {
                            let r = self
                                .on_leader(PATH_READ_INDEX, &(), self.timing.leader_wait, || {
                                    self.read_index_local()
                                })
                                .await;
                            for w in waiters {
                                let _ = w.send(r.clone());
                            }
                        }
                        drop(guard);
                    }
                }
            };
            match answer {
                Ok(r) => return r,
                // The fetch serving us was cancelled: queue again.
                Err(_) => continue,
            }
        }
    }

    /// Members as the leader sees them (with matched indexes), from any node.
    pub async fn members_from_leader(&self) -> Result<Vec<Member>, ClusterError> {
        self.on_leader(PATH_MEMBERS, &(), self.timing.leader_wait, || async {
            Ok(self.members())
        })
        .await
    }

    /// On the leader: confirms leadership with a quorum and returns the index
    /// a linearizable read must wait for.
    pub(crate) async fn read_index_local(&self) -> Result<u64, ClusterError> {
        use openraft::error::CheckIsLeaderError as C;
        let fut = self.raft.get_read_log_id();
        match tokio::time::timeout(self.timing.leader_wait, fut).await {
            Err(_) => Err(ClusterError::NoQuorum(
                "leadership not confirmed in time".into(),
            )),
            Ok(Ok((read, _applied))) => Ok(read.map_or(0, |l| l.index)),
            Ok(Err(OpenRaftError::APIError(C::ForwardToLeader(_)))) => Err(ClusterError::NotLeader),
            Ok(Err(OpenRaftError::APIError(C::QuorumNotEnough(e)))) => {
                Err(ClusterError::NoQuorum(e.to_string()))
            }
            Ok(Err(OpenRaftError::Fatal(e))) => Err(stopped(e)),
        }
    }

    /// Waits until this node has applied `index` (within the leader wait).
    pub(crate) async fn wait_applied(&self, index: u64) -> Result<(), ClusterError> {
        let mut rx = self.shared.subscribe_applied();
        let reached = async { rx.wait_for(|&i| i >= index).await.map(|_| ()) };
        match tokio::time::timeout(self.timing.leader_wait, reached).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(stopped("state machine closed")),
            Err(_) => Err(ClusterError::NoQuorum(format!(
                "local state did not reach index {index} in time"
            ))),
        }
    }

    /// Adds or removes a member through the leader.
    pub async fn change_membership(&self, op: MembershipOp) -> Result<u64, ClusterError> {
        // Catching a learner up may take a while; give it several commit waits.
        let timeout = self.timing.write_timeout * 4;
        self.on_leader(PATH_MEMBERSHIP, &op, timeout, || {
            self.membership_local(op.clone())
        })
        .await
    }

    pub(crate) async fn membership_local(&self, op: MembershipOp) -> Result<u64, ClusterError> {
        let map = |e: OpenRaftError<types::NodeId, ClientWriteError<NodeId, PeerNode>>| match e {
            OpenRaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                ClusterError::NotLeader
            }
            OpenRaftError::APIError(e) => ClusterError::Invalid(e.to_string()),
            OpenRaftError::Fatal(e) => stopped(e),
        };
        let timeout = self.timing.write_timeout * 4;
        let unknown = || ClusterError::OutcomeUnknown {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let voters: BTreeSet<NodeId> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().voter_ids().collect()
        };
        let resp = match op {
            MembershipOp::Add { id, node } => {
                tokio::time::timeout(timeout, self.raft.add_learner(id, node, true))
                    .await
                    .map_err(|_| unknown())?
                    .map_err(map)?;
                let mut next = voters;
                next.insert(id);
                tokio::time::timeout(timeout, self.raft.change_membership(next, false))
                    .await
                    .map_err(|_| unknown())?
                    .map_err(map)?
            }
            MembershipOp::Remove { id } => {
                if !voters.contains(&id) {
                    return Err(ClusterError::NotMember(id));
                }
                let mut next = voters;
                next.remove(&id);
                if next.is_empty() {
                    return Err(ClusterError::Invalid("cannot remove the last voter".into()));
                }
                tokio::time::timeout(timeout, self.raft.change_membership(next, false))
                    .await
                    .map_err(|_| unknown())?
                    .map_err(map)?
            }
        };
        Ok(resp.log_id.index)
    }

    /// This node's status, from local metrics only.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics();
        let m = m.borrow();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id);
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Follower if voter => "follower",
            ServerState::Follower | ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        NodeStatus {
            node_id: self.id,
            name: self.me.name.clone(),
            role: role.to_string(),
            term: m.current_term,
            leader_id: m.current_leader,
            commit_index: self.committed.load(Ordering::Relaxed),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            snapshots_installed: self.shared.snapshots_installed(),
            api_addr: self.me.api_addr.clone(),
            peer_addr: self.me.peer_addr.clone(),
        }
    }

    /// Members from the local membership config; matched indexes only when
    /// this node leads.
    pub fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let matched: BTreeMap<NodeId, Option<u64>> = m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
            .unwrap_or_default();
        membership
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                name: n.name.clone(),
                api_addr: n.api_addr.clone(),
                peer_addr: n.peer_addr.clone(),
                voter: voters.contains(id),
                leader: m.current_leader == Some(*id),
                matched_index: matched.get(id).copied().flatten(),
            })
            .collect()
    }

    /// Voters' peer addresses (Consul's `/v1/status/peers`).
    pub fn voter_peer_addrs(&self) -> Vec<String> {
        self.members()
            .into_iter()
            .filter(|m| m.voter)
            .map(|m| m.peer_addr)
            .collect()
    }
}
