//! Group commit of writes: concurrent commands on a node travel together as
//! one Raft entry (on the leader) or one forwarded call (on a follower).
//!
//! Why: every Raft entry costs a log sync and a replication round on every
//! node, whatever it carries. Batching makes one of each serve every write
//! that arrived while the previous batch was being committed; on a follower
//! it also makes one peer call carry many writes.
//!
//! Owns the proposal queue and the task that drains it. Does not retry: a
//! batch that finds no (reachable) leader answers `NoLeader`/`NotLeader` to
//! each member and `RaftNode::write` retries within its deadline.
//!
//! Invariants:
//! - At most `IN_FLIGHT` batches are unanswered at a time. On the leader
//!   they enter the log in queue order; forwarded batches may overtake each
//!   other, which only reorders writes that were concurrent anyway (a
//!   caller's next write starts after its previous answer).
//! - Every caller gets exactly one answer (or sees its channel closed when
//!   the node shuts down).
//! - `Route::LocalOnly` proposals (writes a follower forwarded to us) are
//!   never forwarded again: forwarding is one hop.
//! - A forwarded batch arrives as one `Command::Batch`; the leader may nest
//!   it in its own batch, and `registry::apply` answers nested batches with
//!   nested responses, so every caller still gets its own response.
//! - The queue is bounded; callers wait for room instead of growing memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::network::PeerClient;
use super::types::{NodeId, Raft};
use super::{forward_call, leader_of, submit_write, ClusterError, Written, PATH_WRITE};
use crate::registry::{Command, Response};

/// Most commands in one Raft entry or forwarded call.
pub const MAX_BATCH: usize = 256;
/// Most queued proposals.
const QUEUE: usize = 4096;
/// Batches submitted (leader) or forwarded (follower) and not yet answered.
/// Measured under 64 concurrent writers: two in flight halve the batches and
/// cost more CPU per write than the overlap saves, because each batch pays
/// a log sync and a replication round on every node. One it is; the slot
/// machinery stays so the trade-off can be re-measured.
const IN_FLIGHT: usize = 1;

/// Where a proposal may be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Here if this node leads, else forwarded to the leader.
    ViaLeader,
    /// Only here; answered `NotLeader` if this node does not lead.
    LocalOnly,
}

struct Proposal {
    cmd: Command,
    route: Route,
    reply: oneshot::Sender<Result<Written, ClusterError>>,
}

/// What the batching task needs.
pub struct Context {
    pub id: NodeId,
    pub raft: Raft,
    pub client: PeerClient,
    pub write_timeout: Duration,
}

/// The sending side, held by `RaftNode`.
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Starts the batching task. Must be called inside tokio.
    pub fn spawn(ctx: Context) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(ctx, rx));
        Proposer { tx }
    }

    /// Proposes `cmd` with the next batch and waits for its answer.
    pub async fn propose(&self, cmd: Command, route: Route) -> Result<Written, ClusterError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || ClusterError::Stopped("proposer stopped".into());
        self.tx
            .send(Proposal { cmd, route, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn combine(proposals: &[Proposal]) -> Command {
    match proposals {
        [one] => one.cmd.clone(),
        many => Command::Batch(many.iter().map(|p| p.cmd.clone()).collect()),
    }
}

/// Sends each proposal its share of `result`.
fn distribute(proposals: Vec<Proposal>, result: Result<Written, ClusterError>) {
    match result {
        Ok(written) if proposals.len() == 1 => {
            for p in proposals {
                let _ = p.reply.send(Ok(written.clone()));
            }
        }
        Ok(Written {
            response: Response::Batch(responses),
            index,
        }) if responses.len() == proposals.len() => {
            for (p, response) in proposals.into_iter().zip(responses) {
                let _ = p.reply.send(Ok(Written { response, index }));
            }
        }
        Ok(other) => {
            // apply() answers a batch with one response per command; any
            // other shape is a bug, reported rather than mis-delivered.
            let e = ClusterError::Internal(format!(
                "batch of {} answered {:?}",
                proposals.len(),
                other.response
            ));
            for p in proposals {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for p in proposals {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

async fn run(ctx: Context, mut rx: mpsc::Receiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut batch: Vec<Proposal> = Vec::with_capacity(MAX_BATCH);
    loop {
        // Take a slot before draining the queue: whatever arrives while all
        // slots are busy travels in the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let mut proposals = std::mem::take(&mut batch);
        tracing::debug!(commands = proposals.len(), "proposing batch");
        match leader_of(&ctx.raft) {
            Some((leader, _)) if leader == ctx.id => {
                // Submitted here, in queue order; the commit is awaited off
                // this loop so the next batch can follow it into the log.
                match submit_write(&ctx.raft, combine(&proposals), ctx.write_timeout).await {
                    Err(e) => distribute(proposals, Err(e)),
                    Ok(commit) => {
                        tokio::spawn(async move {
                            distribute(proposals, commit.await);
                            drop(slot);
                        });
                    }
                }
            }
            leader => {
                // Forwarded writes must not hop again.
                let (local, forwardable): (Vec<_>, Vec<_>) = proposals
                    .drain(..)
                    .partition(|p| p.route == Route::LocalOnly);
                distribute(local, Err(ClusterError::NotLeader));
                if forwardable.is_empty() {
                    continue;
                }
                let Some((_, Some(node))) = leader else {
                    distribute(forwardable, Err(ClusterError::NoLeader));
                    continue;
                };
                let client = ctx.client.clone();
                let timeout = ctx.write_timeout;
                tokio::spawn(async move {
                    let cmd = combine(&forwardable);
                    let result =
                        forward_call(&client, &node.peer_addr, PATH_WRITE, &cmd, timeout).await;
                    distribute(forwardable, result);
                    drop(slot);
                });
            }
        }
    }
}
