//! Every openraft type raftmesh uses, declared once.
//!
//! Owns the `TypeConfig` and the aliases that keep openraft's generics out of
//! the rest of the crate. Nothing outside `raft/` names an openraft generic;
//! other modules see `registry` types and the narrow `RaftNode` handle.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::registry::{Command, Response};

pub use crate::registry::NodeId;

/// What Raft membership stores about each node: enough to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
}

openraft::declare_raft_types!(
    /// raftmesh's Raft configuration: registry commands in, responses out.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = PeerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, PeerNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, PeerNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StorageIOError = openraft::StorageIOError<NodeId>;
pub type LogState = openraft::storage::LogState<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, PeerNode>;
pub type AppendRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type SnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type SnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type RpcError<E = openraft::error::Infallible> =
    openraft::error::RPCError<NodeId, PeerNode, RaftError<E>>;
pub type InstallSnapshotError = openraft::error::InstallSnapshotError;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, PeerNode>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, PeerNode>;

/// Wraps any error as the `AnyError` openraft's storage errors carry.
pub fn any_err<E: std::error::Error + 'static>(e: &E) -> openraft::AnyError {
    openraft::AnyError::new(e)
}
