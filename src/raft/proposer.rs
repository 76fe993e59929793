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
//! - One batch is in flight at a time, so batches commit in queue order.
//! - A batch waits at most `LINGER` for more writers, and only when fewer
//!   have arrived than were active around the last batch (`gather`).
//! - Every caller gets exactly one answer (or sees its channel closed when
//!   the node shuts down).
//! - `Route::LocalOnly` proposals (writes a follower forwarded to us) are
//!   never forwarded again: forwarding is one hop.
//! - A forwarded batch arrives as one `Command::Batch`; the leader may nest
//!   it in its own batch, and `registry::apply` answers nested batches with
//!   nested responses, so every caller still gets its own response.
//! - The queue is bounded; callers wait for room instead of growing memory.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::network::PeerClient;
use super::types::{NodeId, Raft};
use super::{client_write, forward_call, leader_of, ClusterError, Written, PATH_WRITE};
use crate::registry::{Command, Response};

/// Most commands in one Raft entry or forwarded call.
pub const MAX_BATCH: usize = 256;
/// Most queued proposals.
const QUEUE: usize = 4096;

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

/// The commands of `proposals` as one, moved out of them (each is left an
/// empty batch): only their reply channels are used afterwards.
fn combine(proposals: &mut [Proposal]) -> Command {
    let take = |p: &mut Proposal| std::mem::replace(&mut p.cmd, Command::Batch(Vec::new()));
    match proposals {
        [one] => take(one),
        many => Command::Batch(many.iter_mut().map(take).collect()),
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
    let mut batch: Vec<Proposal> = Vec::with_capacity(MAX_BATCH);
    // One batch at a time: whatever arrives while it commits travels in the
    // next one. (Measured under 64 concurrent writers: two batches in flight
    // halved the batches and cost more CPU per write than the overlap saved,
    // because each batch pays a log sync and a replication round on every
    // node.)
    let mut target = 1;
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        gather(&mut rx, &mut batch, target).await;
        let mut proposals = std::mem::take(&mut batch);
        let sent = proposals.len();
        tracing::debug!(commands = proposals.len(), "proposing batch");
        match leader_of(&ctx.raft) {
            Some((leader, _)) if leader == ctx.id => {
                let cmd = combine(&mut proposals);
                let result = client_write(&ctx.raft, cmd, ctx.write_timeout).await;
                distribute(proposals, result);
            }
            leader => {
                // Forwarded writes must not hop again.
                let (local, mut forwardable): (Vec<_>, Vec<_>) = proposals
                    .drain(..)
                    .partition(|p| p.route == Route::LocalOnly);
                distribute(local, Err(ClusterError::NotLeader));
                if forwardable.is_empty() {
                    continue;
                }
                let result = match leader {
                    Some((_, Some(node))) => {
                        let cmd = combine(&mut forwardable);
                        forward_call(
                            &ctx.client,
                            &node.peer_addr,
                            PATH_WRITE,
                            &cmd,
                            ctx.write_timeout,
                        )
                        .await
                    }
                    _ => Err(ClusterError::NoLeader),
                };
                distribute(forwardable, result);
            }
        }
        // The writers just answered come straight back (closed-loop
        // clients) while the ones still queued wait: both belong in the
        // next batch.
        target = (sent + rx.len()).min(MAX_BATCH);
    }
}

/// Longest wait for the writers of the last batch to come back.
const LINGER: Duration = Duration::from_micros(500);

/// Tops `batch` up towards `target` proposals for at most [`LINGER`].
///
/// Why: with one batch in flight, concurrent writers otherwise split into
/// two cohorts that alternate (one commits while the other queues), so each
/// batch carries half of them and every write waits two commit rounds. A
/// short wait for the cohort just answered merges them into one batch per
/// round. Only waits when more writers were active than have arrived, so a
/// lone writer never waits.
async fn gather(rx: &mut mpsc::Receiver<Proposal>, batch: &mut Vec<Proposal>, target: usize) {
    let deadline = tokio::time::Instant::now() + LINGER;
    while batch.len() < target {
        let room = MAX_BATCH - batch.len();
        match tokio::time::timeout_at(deadline, rx.recv_many(batch, room)).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}
