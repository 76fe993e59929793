//! Early replication: a leader sends each new batch of entries to its
//! followers while its own log sync is still running.
//!
//! Why: openraft 0.9 appends on the leader inside its core task and waits
//! for the append's sync before it hands the new entries to the replication
//! streams. A batch so paid the leader's disk sync and then a follower's,
//! one after the other (0.4-1.1 ms between the end of the leader's append
//! and the first AppendEntries, measured under 64 writers).
//!
//! How: `LogStore::append` on the leader encodes one AppendEntries request
//! for the entries it just inserted (the leader's vote, the previous log
//! id, the entries) and `send` posts it to every other member at once.
//! When openraft's replication stream later asks `PeerNetwork` to send the
//! same entries to a target (same vote, same previous log id, same last log
//! id), `accepted` tells it whether that target already answered them
//! `Success`; if so the stream takes that answer instead of sending the
//! entries again. openraft allows a network to deliver entries its own way
//! as long as the answer is true (its `PartialSuccess` contract).
//!
//! Owns the per-target record of the latest early request and its outcome.
//! Does not decide what is committed: openraft does, from answers that are
//! real answers of the targets.
//!
//! Invariants (safety):
//! - A `Success` is reused only for a request with the same vote, previous
//!   log id and last log id. Log ids are unique per leader term and logs are
//!   contiguous, so that is the same request with the same entries; a
//!   follower's answer to it is an answer to openraft's request, only
//!   earlier, like any delayed reply.
//! - A follower answers an append only after syncing it (openraft awaits
//!   the sync before it responds), so a reused `Success` means durable.
//! - Requests without entries (heartbeats, commit updates, leadership
//!   checks) always go out: they prove leadership now, and nothing here
//!   answers them.
//! - Anything else (not answered yet within half the RPC budget, refused,
//!   failed, a different range) leaves openraft's request to be sent as
//!   usual. At most one early request per target is in flight, and a
//!   target that refused or failed one gets none for an RPC budget.
//! - A node whose log store posts early never resumes leadership in the
//!   same term after a restart (`LogStore::with_speculator` saves its vote
//!   uncommitted): entries it posted may be missing from its log, and their
//!   log ids must not be given to other entries.
//!
//! Known looseness: openraft credits a reused answer with the time its
//! stream built the request, so `millis_since_quorum_ack` can look up to
//! one batch fresher than it is; raftmesh reads it only to stop pings after
//! two seconds without a quorum.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tracing::Instrument;

use super::network::PeerClient;
use super::types::{AppendResponse, LogId, NodeId, Raft, RaftError, Vote};
use super::PATH_APPEND;

/// What identifies an AppendEntries request's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub vote: Vote,
    pub prev: Option<LogId>,
    pub last: LogId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    Accepted,
    Refused,
}

/// The latest early request to one target.
#[derive(Debug, Clone)]
struct Slot {
    key: Option<Key>,
    outcome: Outcome,
    /// After a refusal or failure, no early request before this: a down or
    /// lagging target is left to openraft (which backs off) for a while.
    quiet_until: Option<Instant>,
}

/// Sends early AppendEntries and remembers their answers, one slot per
/// target.
pub struct Speculator {
    id: NodeId,
    client: PeerClient,
    /// Budget of one request (openraft's AppendEntries timeout).
    timeout: Duration,
    /// Set once openraft runs: the membership says where to send.
    raft: OnceLock<Raft>,
    slots: Mutex<BTreeMap<NodeId, watch::Sender<Slot>>>,
}

impl Speculator {
    pub fn new(id: NodeId, client: PeerClient, timeout: Duration) -> Self {
        Speculator {
            id,
            client,
            timeout,
            raft: OnceLock::new(),
            slots: Mutex::new(BTreeMap::new()),
        }
    }

    /// Gives the speculator the running Raft (for its membership). Until
    /// then nothing is sent early.
    pub fn attach(&self, raft: Raft) {
        let _ = self.raft.set(raft);
    }

    /// This node's id: early requests go out only while it leads.
    pub fn id(&self) -> NodeId {
        self.id
    }

    fn slot(&self, target: NodeId) -> watch::Sender<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(target)
            .or_insert_with(|| {
                watch::Sender::new(Slot {
                    key: None,
                    outcome: Outcome::Refused,
                    quiet_until: None,
                })
            })
            .clone()
    }

    /// Posts `body` (an encoded AppendEntries request whose content `key`
    /// names) to every other member. Must be called inside tokio.
    pub fn send(&self, key: Key, body: Vec<u8>) {
        let Some(raft) = self.raft.get() else {
            return;
        };
        let targets: Vec<(NodeId, String)> = {
            let m = raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, n)| (*id, n.peer_addr.clone()))
                .collect()
        };
        let body = Bytes::from(body);
        let now = Instant::now();
        for (target, addr) in targets {
            let slot = self.slot(target);
            let taken = slot.send_if_modified(|s| claim(s, &key, now));
            if !taken {
                continue;
            }
            let (client, body, key, timeout) =
                (self.client.clone(), body.clone(), key.clone(), self.timeout);
            let span = tracing::debug_span!("early_append", target, last = key.last.index);
            let task = async move {
                let reply: Result<Result<AppendResponse, RaftError>, _> =
                    client.call_raw(&addr, PATH_APPEND, body, timeout).await;
                let outcome = match reply {
                    Ok(Ok(AppendResponse::Success)) => Outcome::Accepted,
                    Ok(other) => {
                        tracing::debug!(target, ?other, "early append not taken");
                        Outcome::Refused
                    }
                    Err(e) => {
                        tracing::debug!(target, error = %e, "early append failed");
                        Outcome::Refused
                    }
                };
                slot.send_if_modified(|s| settle(s, &key, outcome, Instant::now() + timeout));
            };
            tokio::spawn(task.instrument(span));
        }
    }

    /// True when `target` answered `Success` to an early request with the
    /// content `key` names; waits for one still in flight, at most half of
    /// `budget`, so openraft's own request still has time.
    pub async fn accepted(&self, target: NodeId, key: &Key, budget: Duration) -> bool {
        let mut rx = self.slot(target).subscribe();
        let settled = rx.wait_for(|s| s.key.as_ref() != Some(key) || s.outcome != Outcome::Pending);
        let accepted = match tokio::time::timeout(budget / 2, settled).await {
            Ok(Ok(s)) => s.key.as_ref() == Some(key) && s.outcome == Outcome::Accepted,
            _ => false,
        };
        accepted
    }
}

/// Takes `s` for a new early request with `key`, unless one is in flight
/// (a slow target gets openraft's requests only) or the target refused one
/// lately. True when taken.
fn claim(s: &mut Slot, key: &Key, now: Instant) -> bool {
    if s.outcome == Outcome::Pending || s.quiet_until.is_some_and(|t| now < t) {
        return false;
    }
    *s = Slot {
        key: Some(key.clone()),
        outcome: Outcome::Pending,
        quiet_until: None,
    };
    true
}

/// Records the answer to the early request `key`, if `s` still holds it;
/// a refusal keeps the target quiet until `quiet_until`. True when
/// recorded.
fn settle(s: &mut Slot, key: &Key, outcome: Outcome, quiet_until: Instant) -> bool {
    if s.key.as_ref() != Some(key) {
        return false;
    }
    s.outcome = outcome;
    if outcome == Outcome::Refused {
        s.quiet_until = Some(quiet_until);
    }
    true
}

/// An AppendEntries request body built from entries already encoded as
/// JSON (the log stores them that way), so they are not encoded again.
pub fn request_body(
    vote: &Vote,
    prev: &Option<LogId>,
    leader_commit: &Option<LogId>,
    entries: &[Vec<u8>],
) -> Result<Vec<u8>, serde_json::Error> {
    let size: usize = entries.iter().map(|e| e.len() + 1).sum();
    let mut out = Vec::with_capacity(size + 256);
    out.extend_from_slice(b"{\"vote\":");
    serde_json::to_writer(&mut out, vote)?;
    out.extend_from_slice(b",\"prev_log_id\":");
    serde_json::to_writer(&mut out, prev)?;
    out.extend_from_slice(b",\"leader_commit\":");
    serde_json::to_writer(&mut out, leader_commit)?;
    out.extend_from_slice(b",\"entries\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e);
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::{AppendRequest, Entry};
    use crate::registry::Command;

    #[test]
    fn the_assembled_body_decodes_as_openrafts_request() {
        let vote = Vote::new_committed(3, 1);
        let prev = Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 7));
        let commit = Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 6));
        let entries: Vec<Entry> = (8..10)
            .map(|i| Entry {
                log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), i),
                payload: openraft::EntryPayload::Normal(Command::DeregisterService {
                    id: format!("s{i}"),
                }),
            })
            .collect();
        let encoded: Vec<Vec<u8>> = entries
            .iter()
            .map(|e| serde_json::to_vec(e).expect("encodes"))
            .collect();
        let body = request_body(&vote, &prev, &commit, &encoded).expect("encodes");
        let req: AppendRequest = serde_json::from_slice(&body).expect("decodes");
        assert_eq!(req.vote, vote);
        assert_eq!(req.prev_log_id, prev);
        assert_eq!(req.leader_commit, commit);
        let ids: Vec<u64> = req.entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(ids, [8, 9]);
        assert!(matches!(
            &req.entries[1].payload,
            openraft::EntryPayload::Normal(Command::DeregisterService { id }) if id == "s9"
        ));
        let none = request_body(&vote, &None, &None, &[]).expect("encodes");
        let req: AppendRequest = serde_json::from_slice(&none).expect("decodes");
        assert!(req.entries.is_empty() && req.prev_log_id.is_none());
    }

    fn log_id(index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(2, 1), index)
    }

    fn key(last: u64) -> Key {
        Key {
            vote: Vote::new_committed(2, 1),
            prev: Some(log_id(5)),
            last: log_id(last),
        }
    }

    #[test]
    fn one_request_in_flight_and_quiet_after_a_refusal() {
        let now = Instant::now();
        let later = now + Duration::from_millis(100);
        let mut s = Slot {
            key: None,
            outcome: Outcome::Refused,
            quiet_until: None,
        };
        assert!(claim(&mut s, &key(6), now));
        assert!(!claim(&mut s, &key(7), now), "one in flight");
        assert!(
            !settle(&mut s, &key(7), Outcome::Accepted, later),
            "not the one sent"
        );
        assert_eq!(s.outcome, Outcome::Pending);
        assert!(settle(&mut s, &key(6), Outcome::Accepted, later));
        assert!(claim(&mut s, &key(7), now), "answered: the next may go");
        assert!(settle(&mut s, &key(7), Outcome::Refused, later));
        assert!(!claim(&mut s, &key(8), now), "quiet after a refusal");
        assert!(claim(&mut s, &key(8), later), "and not longer");
    }

    #[tokio::test]
    async fn only_a_settled_success_for_the_same_request_counts() {
        let client = PeerClient::new("127.0.0.1".parse().expect("ip")).expect("client");
        let spec = Speculator::new(1, client, Duration::from_millis(50));
        let short = Duration::from_millis(20);
        assert!(!spec.accepted(2, &key(6), short).await, "nothing was sent");

        // In flight: the stream waits for the answer.
        let slot = spec.slot(2);
        slot.send_replace(Slot {
            key: Some(key(6)),
            outcome: Outcome::Pending,
            quiet_until: None,
        });
        let answer = slot.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            answer.send_modify(|s| s.outcome = Outcome::Accepted);
        });
        assert!(spec.accepted(2, &key(6), Duration::from_secs(30)).await);
        assert!(!spec.accepted(3, &key(6), short).await, "another target");
        assert!(!spec.accepted(2, &key(7), short).await, "another range");
        let other_vote = Key {
            vote: Vote::new_committed(3, 1),
            ..key(6)
        };
        assert!(!spec.accepted(2, &other_vote, short).await, "another term");

        slot.send_modify(|s| s.outcome = Outcome::Refused);
        assert!(!spec.accepted(2, &key(6), short).await, "refused");

        // Never answered: given up after half the budget.
        slot.send_replace(Slot {
            key: Some(key(8)),
            outcome: Outcome::Pending,
            quiet_until: None,
        });
        let started = std::time::Instant::now();
        assert!(!spec.accepted(2, &key(8), short).await);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
