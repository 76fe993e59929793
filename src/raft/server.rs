//! The peer listener: openraft RPCs from other nodes and the internal calls
//! followers forward to the leader (writes, read index, membership), and
//! the pre-vote candidates ask before they campaign (`detector`).
//!
//! Owns the peer axum router. Does not serve clients (`api`). Each request
//! runs in its own tracing span named after the RPC. Bodies are bounded by
//! `MAX_PEER_BODY`; snapshots arrive in openraft's chunks, well under it.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use tracing::Instrument;

use super::detector::{Alive, PreVote};
use super::types::{
    AppendRequest, AppendResponse, InstallSnapshotError, RaftError, SnapshotRequest,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use super::{
    ClusterError, Member, MembershipOp, RaftNode, Written, PATH_ALIVE, PATH_APPEND, PATH_MEMBERS,
    PATH_MEMBERSHIP, PATH_PRE_VOTE, PATH_READ_INDEX, PATH_WRITE,
};
use crate::registry::Command;

/// Largest peer request body: a batch of entries or one snapshot chunk.
pub const MAX_PEER_BODY: usize = 64 * 1024 * 1024;

type Node = State<Arc<RaftNode>>;

async fn append(
    State(n): Node,
    Json(req): Json<AppendRequest>,
) -> Json<Result<AppendResponse, RaftError>> {
    let span = tracing::debug_span!(
        "raft_append",
        from = req.vote.leader_id().voted_for(),
        entries = req.entries.len()
    );
    async move {
        // Heard from a leader at least as new as ours: count the contact on
        // arrival, as openraft's lease does, not after the disk sync.
        if req.vote >= n.raft().metrics().borrow().vote {
            n.clock().contact();
        }
        let started = std::time::Instant::now();
        let res = n.raft().append_entries(req).await;
        tracing::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "append handled"
        );
        Json(res)
    }
    .instrument(span)
    .await
}

async fn vote(
    State(n): Node,
    Json(req): Json<VoteRequest>,
) -> Json<Result<VoteResponse, RaftError>> {
    let span = tracing::debug_span!("raft_vote", candidate = req.vote.leader_id().voted_for());
    let res = n.raft().vote(req).instrument(span).await;
    if matches!(&res, Ok(r) if r.vote_granted) {
        // Raft restarts the election wait of a node that grants a vote.
        n.clock().defer();
    }
    Json(res)
}

async fn alive(State(n): Node, Json(ping): Json<Alive>) -> Json<bool> {
    let span = tracing::trace_span!("raft_alive", leader = ping.leader, term = ping.term);
    span.in_scope(|| n.alive_local(&ping));
    Json(true)
}

async fn pre_vote(State(n): Node, Json(req): Json<PreVote>) -> Json<bool> {
    let span = tracing::debug_span!("raft_pre_vote", candidate = req.candidate);
    Json(span.in_scope(|| n.pre_vote_local(&req)))
}

async fn snapshot(
    State(n): Node,
    Json(req): Json<SnapshotRequest>,
) -> Json<Result<SnapshotResponse, RaftError<InstallSnapshotError>>> {
    let span = tracing::info_span!("raft_snapshot", offset = req.offset, done = req.done);
    let res = n.raft().install_snapshot(req).instrument(span).await;
    if res.is_ok() {
        n.clock().contact();
    }
    Json(res)
}

async fn forwarded_write(
    State(n): Node,
    Json(cmd): Json<Command>,
) -> Json<Result<Written, ClusterError>> {
    let span = tracing::debug_span!("forwarded_write");
    Json(n.write_local(cmd).instrument(span).await)
}

async fn read_index(State(n): Node) -> Json<Result<u64, ClusterError>> {
    let span = tracing::debug_span!("read_index");
    Json(n.read_index_local().instrument(span).await)
}

async fn membership(
    State(n): Node,
    Json(op): Json<MembershipOp>,
) -> Json<Result<u64, ClusterError>> {
    let span = tracing::info_span!("membership", ?op);
    Json(n.membership_local(op).instrument(span).await)
}

async fn members(State(n): Node) -> Json<Result<Vec<Member>, ClusterError>> {
    Json(Ok(n.members()))
}

/// The peer router over `node`.
pub fn router(node: Arc<RaftNode>) -> Router {
    Router::new()
        .route(PATH_APPEND, post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route(PATH_WRITE, post(forwarded_write))
        .route(PATH_READ_INDEX, post(read_index))
        .route(PATH_MEMBERSHIP, post(membership))
        .route(PATH_MEMBERS, post(members))
        .route(PATH_PRE_VOTE, post(pre_vote))
        .route(PATH_ALIVE, post(alive))
        .layer(DefaultBodyLimit::max(MAX_PEER_BODY))
        .with_state(node)
}
