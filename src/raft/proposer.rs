//! Group commit of client writes: concurrent commands on the leader are
//! proposed together as one Raft entry.
//!
//! Why: openraft 0.9 waits for each appended entry's log flush before it
//! appends the next, so one entry per write would cost one fsync per write.
//! Batching here makes one fsync (and one replication round) serve every
//! write that arrived while the previous batch was being committed.
//!
//! Owns the proposal queue and the task that drains it. Does not decide
//! leadership or retry: a batch proposed on a node that lost leadership
//! answers `NotLeader` to every member, and `RaftNode::write` retries.
//!
//! Invariants: one batch is in flight at a time, so batches commit in queue
//! order; every caller gets exactly one answer (or sees its channel closed
//! when the node shuts down); the queue is bounded, so callers wait for
//! room instead of growing memory without limit.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::types::Raft;
use super::{ClusterError, Written};
use crate::registry::{Command, Response};

/// Most commands in one Raft entry.
pub const MAX_BATCH: usize = 256;
/// Most queued proposals.
const QUEUE: usize = 4096;

struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Result<Written, ClusterError>>,
}

/// The sending side, held by `RaftNode`.
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Starts the batching task for `raft`. Must be called inside tokio.
    pub fn spawn(raft: Raft, write_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx, write_timeout));
        Proposer { tx }
    }

    /// Proposes `cmd` with the next batch and waits for its answer.
    pub async fn propose(&self, cmd: Command) -> Result<Written, ClusterError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal { cmd, reply })
            .await
            .map_err(|_| ClusterError::Stopped("proposer stopped".into()))?;
        rx.await
            .map_err(|_| ClusterError::Stopped("proposer stopped".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Proposal>, write_timeout: Duration) {
    let mut batch: Vec<Proposal> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let proposals = std::mem::take(&mut batch);
        let cmd = if proposals.len() == 1 {
            proposals[0].cmd.clone()
        } else {
            Command::Batch(proposals.iter().map(|p| p.cmd.clone()).collect())
        };
        let span = tracing::debug_span!("propose", commands = proposals.len());
        let result =
            tracing::Instrument::instrument(super::client_write(&raft, cmd, write_timeout), span)
                .await;
        match result {
            Ok(Written {
                response: Response::Batch(responses),
                index,
            }) if responses.len() == proposals.len() && proposals.len() > 1 => {
                for (p, response) in proposals.into_iter().zip(responses) {
                    let _ = p.reply.send(Ok(Written { response, index }));
                }
            }
            Ok(written) if proposals.len() == 1 => {
                for p in proposals {
                    let _ = p.reply.send(Ok(written.clone()));
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
}
