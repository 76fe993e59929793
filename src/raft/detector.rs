//! Heartbeats, leader failure detection and elections, with a pre-vote.
//!
//! Owns the timer loop that decides when this node sends heartbeats (while
//! it leads) and when it campaigns (while it follows), and the `Clock` that
//! records when a leader was last heard from. openraft's own tick-driven
//! heartbeat and election timers are switched off; this loop drives them
//! through `raft.trigger()`. Does not decide who wins: openraft's vote
//! handling does.
//!
//! Why not openraft's timers: openraft 0.9 sends heartbeats only on its
//! tick (every 1.5 heartbeat intervals), makes a follower wait the leader
//! lease *plus* its own election timeout before it campaigns, and campaigns
//! without asking anyone first, so a restarted or briefly cut-off node
//! raises the term and unseats a healthy leader. Here:
//! - the leader sends a heartbeat every `heartbeat`, plus a disk-free
//!   "alive" ping (`Alive`, sent from a thread of its own: `spawn_pinger`)
//!   that keeps followers from campaigning while a
//!   slow disk delays AppendEntries;
//! - a voter that has heard from no leader for a random time in
//!   `[election_min, election_max)` first asks the other voters (pre-vote)
//!   whether they miss the leader too and whether its log is at least as
//!   up to date as theirs; it campaigns only with a majority, itself
//!   included;
//! - granting a pre-vote or a vote restarts this node's own wait, so the
//!   first node to ask usually wins without a split vote;
//! - a node whose own timer loop ran late (starved or frozen: its silence
//!   is its own, not the leader's) restarts its wait and refuses pre-votes
//!   for a lease.
//!
//! Invariants:
//! - The leader lease openraft enforces on voters (`lease`) is shorter
//!   than `election_min`, so a campaign that passed pre-vote is not refused
//!   for a lease that the pre-vote answerers already saw expire.
//! - A leader never campaigns, a non-voter never campaigns, and a voter
//!   campaigns at most once per random wait.
//! - A node alone in its voter set passes its own pre-vote, so it
//!   campaigns after one random wait (`--dev`, restarts).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::types::{LogId, NodeId, Raft};
use super::RaftNode;

/// How often the loop looks at the clock. Bounds how late a heartbeat or a
/// campaign starts.
const POLL: Duration = Duration::from_millis(5);

/// The timings the loop works with (from the agent flags).
#[derive(Debug, Clone, Copy)]
pub struct ElectionTiming {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
}

impl ElectionTiming {
    /// The leader lease handed to openraft: a voter refuses to vote for
    /// another candidate until this long after it last heard its leader.
    /// Half a heartbeat below `election_min` leaves room for the two
    /// followers hearing the last heartbeat at slightly different times.
    pub fn lease(&self) -> Duration {
        self.election_min
            .saturating_sub(self.heartbeat / 2)
            .max(self.heartbeat)
    }

    /// openraft's `(heartbeat_interval, election_timeout_min,
    /// election_timeout_max)` in ms. Its timers are off (this module drives
    /// them), so what remains of them: `heartbeat_interval` is openraft's
    /// AppendEntries timeout, kept at two heartbeats so a follower slowed by
    /// its disk is not cut off; `election_timeout_max` is the lease.
    /// `AgentArgs::validate` keeps `election_min >= 2 * heartbeat >= 20`,
    /// which makes these satisfy openraft's `interval < min < max`.
    pub fn openraft_timeouts(&self) -> (u64, u64, u64) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let lease = ms(self.lease());
        let rpc = (2 * ms(self.heartbeat)).min(lease.saturating_sub(2)).max(1);
        (rpc, rpc + 1, lease.max(rpc + 2))
    }

    fn random_wait(&self) -> Duration {
        let (lo, hi) = (self.election_min, self.election_max);
        if hi <= lo {
            return lo;
        }
        rand::thread_rng().gen_range(lo..hi)
    }
}

/// When this node last heard from a leader, and since when it has been
/// told to hold off campaigning.
#[derive(Debug)]
pub struct Clock {
    started: Instant,
    inner: Mutex<ClockState>,
}

#[derive(Debug, Clone, Copy)]
struct ClockState {
    contact: Option<Instant>,
    /// Last grant of a (pre-)vote or own campaign: the wait restarts here.
    deferred: Option<Instant>,
    /// When this node last found itself frozen (see `Clock::stalled`).
    stall: Option<Instant>,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            started: Instant::now(),
            inner: Mutex::new(ClockState {
                contact: None,
                deferred: None,
                stall: None,
            }),
        }
    }

    fn state(&self) -> ClockState {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut ClockState)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A leader's AppendEntries or snapshot chunk arrived.
    pub fn contact(&self) {
        self.update(|s| s.contact = Some(Instant::now()));
    }

    /// This node granted a vote or pre-vote, or campaigned: restart its wait.
    pub fn defer(&self) {
        self.update(|s| s.deferred = Some(Instant::now()));
    }

    /// This node's own timer loop ran late (the process was starved or
    /// frozen): its silence says nothing about the leader, whose messages may
    /// still sit unread in the sockets. Restart the wait and, for a lease,
    /// refuse pre-votes.
    pub fn stalled(&self) {
        let now = Instant::now();
        self.update(|s| {
            s.deferred = Some(now);
            s.stall = Some(now);
        });
    }

    /// Time since this node last stalled (None: never).
    fn since_stall(&self) -> Option<Duration> {
        self.state().stall.map(|t| t.elapsed())
    }

    /// Time since a leader was last heard from (since start if never).
    pub fn since_contact(&self) -> Duration {
        self.state().contact.unwrap_or(self.started).elapsed()
    }

    /// The later of start, the last contact and the last deferral: the
    /// election wait runs from here.
    fn quiet_since(&self) -> Instant {
        let s = self.state();
        [s.contact, s.deferred]
            .into_iter()
            .flatten()
            .fold(self.started, Instant::max)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// When this node, leading, last got an answer to its alive ping from each
/// member: the leader's view of member liveness (`health` declares members
/// failed from it). Shared with the ping tasks, hence the `Arc`.
#[derive(Debug, Clone, Default)]
pub struct Heard(Arc<Mutex<BTreeMap<NodeId, Instant>>>);

impl Heard {
    fn record(&self, id: NodeId) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Instant::now());
    }

    /// The last answer from `id`, if any since this process started.
    pub fn last(&self, id: NodeId) -> Option<Instant> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
    }
}

/// A pre-vote question: would you vote for `candidate` if it campaigned now?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVote {
    pub candidate: NodeId,
    pub last_log: Option<LogId>,
}

/// The answer to a pre-vote on this node: yes only if this node does not
/// lead, has not heard from a leader for a lease, and the candidate's log
/// is at least as up to date as its own (Raft's election restriction, so
/// the real campaign can succeed).
pub fn answer_pre_vote(raft: &Raft, clock: &Clock, timing: &ElectionTiming, req: &PreVote) -> bool {
    let leads = raft.metrics().borrow().state == ServerState::Leader;
    let own_last = raft.data_metrics().borrow().last_log;
    let stalled_lately = clock.since_stall().is_some_and(|d| d < timing.lease());
    let granted = !leads
        && !stalled_lately
        && clock.since_contact() >= timing.lease()
        && req.last_log >= own_last;
    if granted {
        clock.defer();
    }
    tracing::debug!(candidate = req.candidate, granted, "pre-vote");
    granted
}

/// What the loop should do at one poll.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Nothing,
    Heartbeat,
    Campaign,
}

struct Loop {
    next_heartbeat: Instant,
    wait: Duration,
}

impl Loop {
    fn step(&mut self, node: &RaftNode, timing: &ElectionTiming) -> Step {
        let now = Instant::now();
        let m = node.raft().metrics();
        let m = m.borrow();
        if m.state == ServerState::Leader {
            if now >= self.next_heartbeat {
                self.next_heartbeat = now + timing.heartbeat;
                return Step::Heartbeat;
            }
            return Step::Nothing;
        }
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == node.id()) {
            return Step::Nothing;
        }
        if node.clock().quiet_since().elapsed() < self.wait {
            return Step::Nothing;
        }
        self.wait = timing.random_wait();
        Step::Campaign
    }
}

/// The peer addresses of the other voters, and how many voters there are.
fn other_voters(node: &RaftNode) -> (Vec<String>, usize) {
    let m = node.raft().metrics();
    let m = m.borrow();
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let peers: Vec<String> = voters
        .iter()
        .filter(|v| **v != node.id())
        .filter_map(|v| membership.get_node(v).map(|n| n.peer_addr.clone()))
        .collect();
    (peers, voters.len())
}

/// Sends `body` to every other voter's `path`, each call in its own task
/// bounded by `timeout`.
fn call_other_voters<Req>(
    node: &RaftNode,
    path: &'static str,
    body: &Req,
    timeout: Duration,
) -> tokio::task::JoinSet<Result<bool, super::network::PeerCallError>>
where
    Req: Serialize + Clone + Send + Sync + 'static,
{
    let mut calls = tokio::task::JoinSet::new();
    for addr in other_voters(node).0 {
        let client = node.client().clone();
        let body = body.clone();
        calls.spawn(async move { client.call::<_, bool>(&addr, path, &body, timeout).await });
    }
    calls
}

/// "The leader of `term` is alive": sent by the leader to every other voter
/// each heartbeat, beside openraft's heartbeat.
///
/// Why: openraft sends one AppendEntries at a time per follower, so when
/// the shared disk stalls and a follower's append outlives the RPC timeout,
/// its next contact comes a timeout plus a heartbeat later; two followers
/// stalled together then saw the leader as silent and elected a new one
/// every minute or so under sustained load. This ping needs no disk. It
/// only feeds the pre-vote (a voter that hears it refuses pre-votes), never
/// Raft's own safety: openraft's lease and votes are untouched.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Alive {
    pub leader: NodeId,
    pub term: u64,
}

/// Records a leader's ping if it is from this node's current term or later.
pub fn answer_alive(raft: &Raft, clock: &Clock, ping: &Alive) {
    if ping.term >= raft.metrics().borrow().current_term {
        clock.contact();
    }
}

/// A leader whose quorum has not acknowledged it for this long stops
/// pinging, so a leader whose Raft core is stuck does not hold off an
/// election for ever.
const PING_QUORUM_BOUND: Duration = Duration::from_secs(2);

/// How long the leader waits for a ping's answer before not counting it.
const PING_ANSWER_WAIT: Duration = Duration::from_millis(500);

/// Pings every other member while this node leads, every heartbeat, from
/// a thread and runtime of its own, until `stop`.
///
/// Why a thread of its own: the log and state-machine stores write to sled
/// on the async workers, and when the shared disk stalls those writes block
/// both workers for a while; pings sent from the same runtime then stopped
/// too, and the followers, which had not stalled, elected a new leader
/// although this one was only waiting for its disk. The pings need no disk
/// and carry on here. They stop once the quorum has not acknowledged this
/// leader for `PING_QUORUM_BOUND`, so a leader stuck for real is replaced.
pub fn spawn_pinger(
    node: std::sync::Arc<RaftNode>,
    source_ip: std::net::IpAddr,
    timing: ElectionTiming,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("raftmesh-pinger".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the pinger runtime; pings come from no thread");
                    return;
                }
            };
            rt.block_on(pinger(node, source_ip, timing, stop));
        })
}

async fn pinger(
    node: std::sync::Arc<RaftNode>,
    source_ip: std::net::IpAddr,
    timing: ElectionTiming,
    stop: CancellationToken,
) {
    // A client of this runtime: pooled connections belong to the runtime
    // that opened them.
    let client = match super::network::PeerClient::new(source_ip) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the pinger's HTTP client");
            return;
        }
    };
    let mut tick = tokio::time::interval(timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        ping_followers(&node, &client, &timing);
    }
}

/// Pings every other member once if this node leads with a fresh quorum
/// (fire and forget, each call bounded).
fn ping_followers(node: &RaftNode, client: &super::network::PeerClient, timing: &ElectionTiming) {
    let (term, members) = {
        let m = node.raft().metrics();
        let m = m.borrow();
        let fresh = m
            .millis_since_quorum_ack
            .is_some_and(|ms| u128::from(ms) < PING_QUORUM_BOUND.as_millis());
        if m.current_leader != Some(node.id()) || m.state != ServerState::Leader || !fresh {
            return;
        }
        // Every member, learners included: the answers feed `Heard`.
        let members: Vec<(NodeId, String)> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != node.id())
            .map(|(id, n)| (*id, n.peer_addr.clone()))
            .collect();
        (m.current_term, members)
    };
    let ping = Alive {
        leader: node.id(),
        term,
    };
    for (id, addr) in members {
        let client = client.clone();
        let heard = node.heard().clone();
        let ping = ping.clone();
        // Longer than a heartbeat: a late answer still proves the member
        // alive (the ping's other effect, on the follower, is on arrival).
        let timeout = timing.heartbeat.max(PING_ANSWER_WAIT);
        tokio::spawn(async move {
            let answer = client
                .call::<_, bool>(&addr, super::PATH_ALIVE, &ping, timeout)
                .await;
            if answer.is_ok() {
                heard.record(id);
            }
        });
    }
}

/// Asks the other voters for a pre-vote; true with a majority (self
/// included).
async fn pre_vote(node: &RaftNode, timing: &ElectionTiming) -> bool {
    let needed = other_voters(node).1 / 2 + 1;
    if needed <= 1 {
        return true;
    }
    let req = PreVote {
        candidate: node.id(),
        last_log: node.raft().data_metrics().borrow().last_log,
    };
    // An answer later than a heartbeat is as good as none: the real
    // campaign would not get it in time either.
    let timeout = timing.heartbeat.max(Duration::from_millis(20));
    let mut asks = call_other_voters(node, super::PATH_PRE_VOTE, &req, timeout);
    let mut granted = 1;
    while let Some(answer) = asks.join_next().await {
        if matches!(answer, Ok(Ok(true))) {
            granted += 1;
        }
    }
    let ok = granted >= needed;
    tracing::debug!(granted, needed, ok, "pre-vote result");
    ok
}

/// Runs until `stop` is cancelled. Switches openraft's own timers off first.
pub async fn run(node: std::sync::Arc<RaftNode>, timing: ElectionTiming, stop: CancellationToken) {
    node.raft().runtime_config().heartbeat(false);
    node.raft().runtime_config().elect(false);
    let mut state = Loop {
        next_heartbeat: Instant::now(),
        wait: timing.random_wait(),
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Only the wait for the next tick counts as lateness, not this
        // loop's own calls (a pre-vote may wait a heartbeat for a dead peer).
        let waiting_since = Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let waited = waiting_since.elapsed();
        if waited > POLL + timing.heartbeat {
            tracing::debug!(late_ms = waited.as_millis() as u64, "timer loop ran late");
            node.clock().stalled();
        }
        match state.step(&node, &timing) {
            Step::Nothing => {}
            Step::Heartbeat => {
                if node.raft().trigger().heartbeat().await.is_err() {
                    return;
                }
            }
            Step::Campaign => {
                node.clock().defer();
                if pre_vote(&node, &timing).await {
                    tracing::info!("no leader heard from; campaigning");
                    if node.raft().trigger().elect().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(hb: u64, min: u64, max: u64) -> ElectionTiming {
        ElectionTiming {
            heartbeat: Duration::from_millis(hb),
            election_min: Duration::from_millis(min),
            election_max: Duration::from_millis(max),
        }
    }

    #[test]
    fn derived_openraft_timeouts_are_valid_for_every_accepted_flag_set() {
        // The ranges `AgentArgs::validate` accepts: 10 <= hb, 2 hb <= min < max.
        for hb in (10..=300).step_by(7) {
            for min in (2 * hb..2 * hb + 400).step_by(13) {
                let t = timing(hb, min, min + 1);
                let (rpc, omin, omax) = t.openraft_timeouts();
                assert!(rpc >= 1 && rpc < omin && omin < omax, "hb {hb} min {min}");
                let lease = t.lease();
                assert_eq!(omax as u128, lease.as_millis(), "hb {hb} min {min}");
                // A pre-vote granted after `lease` must not be refused by openraft's lease,
                // and the campaign only starts after `election_min`.
                assert!(lease < t.election_min, "hb {hb} min {min}");
                assert!(lease >= t.heartbeat, "hb {hb} min {min}");
                openraft::Config {
                    heartbeat_interval: rpc,
                    election_timeout_min: omin,
                    election_timeout_max: omax,
                    ..Default::default()
                }
                .validate()
                .expect("openraft accepts the derived timeouts");
            }
        }
    }

    #[test]
    fn random_wait_stays_in_range() {
        let t = timing(50, 150, 250);
        for _ in 0..1000 {
            let w = t.random_wait();
            assert!(w >= t.election_min && w < t.election_max, "{w:?}");
        }
    }

    #[test]
    fn a_stall_restarts_the_wait_and_is_remembered() {
        let clock = Clock::new();
        assert!(clock.since_stall().is_none());
        clock.contact();
        clock.stalled();
        let s = clock.state();
        let stall = s.stall.expect("stall recorded");
        assert_eq!(s.deferred, Some(stall), "the wait restarts at the stall");
        assert_eq!(clock.quiet_since(), stall);
        assert!(clock.since_stall().is_some());
    }

    #[test]
    fn deferring_restarts_the_wait_but_not_the_contact() {
        let clock = Clock::new();
        assert_eq!(clock.quiet_since(), clock.started);
        clock.contact();
        let contact = clock.state().contact.expect("contact recorded");
        assert_eq!(clock.quiet_since(), contact);
        clock.defer();
        let s = clock.state();
        let deferred = s.deferred.expect("deferral recorded");
        assert!(deferred >= contact);
        assert_eq!(s.contact, Some(contact), "a deferral is not a contact");
        assert_eq!(clock.quiet_since(), deferred);
    }
}
