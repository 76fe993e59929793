//! Health: TTL leases, member liveness and the deregistration of instances
//! that stay critical, decided by the leader; HTTP/TCP probes run by each
//! check's owner node (`probe`).
//!
//! Owns the leader's soft state (`Leadership`): when each TTL check last
//! heard a heartbeat and with what status, when each check turned critical,
//! when each session's TTL runs out, when each released lock's delay ends,
//! and from when this node leads. None of it is replicated: heartbeats and
//! session renewals write nothing to the Raft log; only a *change* of
//! status, liveness or ownership, or a lapse, is proposed as a command
//! (`UpdateChecks`, `SetNodeHealth`, `DeregisterService`, `SessionDestroy`). Does not store health (`registry` does) or speak
//! HTTP to clients (`api`).
//!
//! Invariants:
//! - Only the leader proposes TTL lapses, node failures and DCSA
//!   deregistrations; a follower forwards heartbeats to the leader.
//! - A new leadership (a new term in which this node leads) starts from
//!   empty soft state and gives every TTL check one full TTL, every member
//!   one node-failure timeout and every critical instance a fresh DCSA
//!   clock, counted from the moment it took over. So a leader change alone
//!   never turns a healthy check critical.
//! - The sweep reconciles: each round it proposes whatever differs between
//!   what the soft state says and what is applied, so a lost proposal (a
//!   leader change, a race with a heartbeat) is retried by the next round.
//!
//! Concurrency: one sweep task and one probe-reconciler task per node; the
//! soft state sits behind a `std::sync::Mutex` held only for map updates,
//! never across an await.

pub mod probe;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::raft::{ClusterError, NodeId, RaftNode};
use crate::registry::{parse_duration, CheckKind, CheckUpdate, Command, HealthStatus, Registry};

/// How often the leader compares soft state with applied state. Bounds how
/// late a lapsed TTL or a silent member is noticed.
const SWEEP: Duration = Duration::from_millis(100);
/// Most check updates in one proposed command.
const MAX_UPDATES: usize = 1024;
/// Peer path on which followers forward heartbeats to the leader.
pub const PATH_BEAT: &str = "/internal/check-beat";
/// Peer path on which any node asks the leader for member contact ages.
pub const PATH_CONTACTS: &str = "/internal/contacts";
/// Peer path on which followers forward session renewals to the leader.
pub const PATH_RENEW: &str = "/internal/session-renew";
/// Peer path on which any node asks the leader whether a key is in its
/// lock delay.
pub const PATH_LOCK_DELAY: &str = "/internal/lock-delay";
/// Most session expiries proposed by one sweep.
const MAX_EXPIRIES: usize = 256;

/// A TTL heartbeat: `pass`, `warn`, `fail` or `update` on a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    pub check_id: String,
    pub status: HealthStatus,
    pub output: String,
}

impl Beat {
    /// A heartbeat whose output is cut to `probe::MAX_OUTPUT` bytes, as
    /// Consul truncates check output.
    pub fn new(check_id: String, status: HealthStatus, mut output: String) -> Self {
        if output.len() > probe::MAX_OUTPUT {
            let mut end = probe::MAX_OUTPUT;
            while !output.is_char_boundary(end) {
                end -= 1;
            }
            output.truncate(end);
        }
        Beat {
            check_id,
            status,
            output,
        }
    }
}

/// Why a heartbeat was refused; business outcomes, computed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BeatError {
    #[error("unknown check ID {0:?}")]
    UnknownCheck(String),
    #[error("check {0:?} has no TTL; only TTL checks take pass, warn, fail and update")]
    NotTtl(String),
}

/// Why a session renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RenewError {
    #[error("unknown session {0:?}")]
    UnknownSession(String),
}

/// The leader's timing of one TTL check.
#[derive(Debug, Clone)]
struct Lease {
    deadline: Instant,
    status: HealthStatus,
    output: String,
}

/// Soft state of one leadership term (see the module invariants).
#[derive(Debug)]
struct Leadership {
    /// The term this state belongs to; `None` while not leading.
    term: Option<u64>,
    since: Instant,
    leases: HashMap<String, Lease>,
    /// When the leader first saw each check critical (for DCSA).
    critical_since: HashMap<String, Instant>,
    /// Session id → when its TTL runs out: one TTL after this leadership
    /// first saw the session, or after its last renewal.
    sessions: HashMap<String, Instant>,
    /// `(key, index of the release)` → end of the key's lock delay, from
    /// when this leadership saw the release (see `track_releases`).
    lock_delays: HashMap<(String, u64), Instant>,
}

impl Leadership {
    fn new(term: Option<u64>, since: Instant) -> Self {
        Leadership {
            term,
            since,
            leases: HashMap::new(),
            critical_since: HashMap::new(),
            sessions: HashMap::new(),
            lock_delays: HashMap::new(),
        }
    }

    /// Starts over unless this state already belongs to `term`.
    fn enter(&mut self, term: u64) {
        if self.term != Some(term) {
            *self = Leadership::new(Some(term), Instant::now());
        }
    }

    fn leave(&mut self) {
        if self.term.is_some() {
            *self = Leadership::new(None, self.since);
        }
    }

    /// When the leader counts member `id` as last heard from: its last
    /// answer, but never before this leadership began (the takeover grace);
    /// the leader itself always now.
    fn last_heard(&self, id: NodeId, me: NodeId, now: Instant, heard: Option<Instant>) -> Instant {
        if id == me {
            now
        } else {
            heard.map_or(self.since, |t| t.max(self.since))
        }
    }
}

/// What one sweep decided to propose.
#[derive(Debug, Default, PartialEq, Eq)]
struct Decisions {
    updates: Vec<CheckUpdate>,
    nodes: Vec<(NodeId, bool)>,
    deregister: BTreeSet<String>,
    /// Sessions whose TTL ran out unrenewed.
    expire_sessions: Vec<String>,
}

pub const TTL_EXPIRED: &str = "TTL expired";

/// Compares the leader's soft state with the applied registry at `now`.
fn decide(
    reg: &Registry,
    lead: &mut Leadership,
    now: Instant,
    me: NodeId,
    heard: impl Fn(NodeId) -> Option<Instant>,
    fail_after: Duration,
) -> Decisions {
    let mut d = Decisions::default();
    for c in reg.checks() {
        let id = &c.def.check_id;
        if let CheckKind::Ttl(ttl) = c.def.kind() {
            let desired = match lead.leases.get(id) {
                Some(l) if now < l.deadline => Some((l.status, l.output.as_str())),
                Some(_) => Some((HealthStatus::Critical, TTL_EXPIRED)),
                None if now < lead.since + ttl => None,
                None => Some((HealthStatus::Critical, TTL_EXPIRED)),
            };
            if let Some((status, output)) = desired {
                if status != c.status && d.updates.len() < MAX_UPDATES {
                    d.updates.push(CheckUpdate {
                        check_id: id.clone(),
                        status,
                        output: output.to_string(),
                        owner: None,
                    });
                }
            }
        }
        let dcsa = c
            .def
            .deregister_critical_service_after
            .as_deref()
            .and_then(|s| parse_duration(s).ok());
        match dcsa {
            Some(after) if c.status == HealthStatus::Critical && !c.service_id.is_empty() => {
                let first = *lead.critical_since.entry(id.clone()).or_insert(now);
                if now.duration_since(first) >= after {
                    d.deregister.insert(c.service_id.clone());
                }
            }
            _ => {
                lead.critical_since.remove(id);
            }
        }
    }
    for s in reg.sessions() {
        let Some(ttl) = session_ttl(&s.ttl) else {
            continue;
        };
        // First sighting (a new session, or every session after a
        // takeover): one full TTL from now.
        let deadline = *lead.sessions.entry(s.id.clone()).or_insert(now + ttl);
        if now >= deadline && d.expire_sessions.len() < MAX_EXPIRIES {
            d.expire_sessions.push(s.id.clone());
        }
    }
    lead.sessions.retain(|id, _| reg.session(id).is_some());
    lead.lock_delays.retain(|_, until| *until > now);
    for n in reg.nodes() {
        let last = lead.last_heard(n.id, me, now, heard(n.id));
        let silent = now.saturating_duration_since(last) > fail_after;
        if silent != reg.is_failed(n.id) {
            d.nodes.push((n.id, silent));
        }
    }
    d
}

/// A session's TTL; `None` for sessions without one.
fn session_ttl(ttl: &str) -> Option<Duration> {
    if ttl.is_empty() {
        return None;
    }
    parse_duration(ttl).ok().filter(|d| !d.is_zero())
}

/// A node's health subsystem.
pub struct Health {
    node: Arc<RaftNode>,
    fail_after: Duration,
    leadership: Mutex<Leadership>,
    probes: probe::Prober,
}

impl Health {
    pub fn new(node: Arc<RaftNode>, fail_after: Duration) -> Result<Arc<Self>, reqwest::Error> {
        Ok(Arc::new(Health {
            node,
            fail_after,
            leadership: Mutex::new(Leadership::new(None, Instant::now())),
            probes: probe::Prober::new()?,
        }))
    }

    pub fn node(&self) -> &Arc<RaftNode> {
        &self.node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Leadership> {
        self.leadership.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat through any node: forwarded to the leader, which
    /// renews the lease and proposes only a change of status.
    pub async fn beat(&self, beat: Beat) -> Result<Result<(), BeatError>, ClusterError> {
        let timeout = self.node.timing().write_timeout;
        self.node
            .on_leader(PATH_BEAT, &beat, timeout, || self.beat_local(beat.clone()))
            .await
    }

    async fn beat_local(&self, beat: Beat) -> Result<Result<(), BeatError>, ClusterError> {
        let (term, leading) = self.node.leadership();
        if !leading {
            return Err(ClusterError::NotLeader);
        }
        let (ttl, applied) = {
            let reg = self.node.state();
            let Some(c) = reg.check(&beat.check_id) else {
                return Ok(Err(BeatError::UnknownCheck(beat.check_id)));
            };
            let CheckKind::Ttl(ttl) = c.def.kind() else {
                return Ok(Err(BeatError::NotTtl(beat.check_id)));
            };
            (ttl, c.status)
        };
        {
            let mut lead = self.lock();
            lead.enter(term);
            lead.leases.insert(
                beat.check_id.clone(),
                Lease {
                    deadline: Instant::now() + ttl,
                    status: beat.status,
                    output: beat.output.clone(),
                },
            );
        }
        if applied != beat.status {
            // Wait for the commit, so a read after the answer sees it.
            let cmd = Command::UpdateChecks {
                updates: vec![CheckUpdate {
                    check_id: beat.check_id,
                    status: beat.status,
                    output: beat.output,
                    owner: None,
                }],
            };
            self.node.write(cmd).await?;
        }
        Ok(Ok(()))
    }

    /// Renews a session's TTL through any node: forwarded to the leader,
    /// which only moves the deadline in its soft state (nothing is written).
    pub async fn renew(&self, id: String) -> Result<Result<(), RenewError>, ClusterError> {
        let timeout = self.node.timing().write_timeout;
        self.node
            .on_leader(PATH_RENEW, &id, timeout, || async { self.renew_local(&id) })
            .await
    }

    fn renew_local(&self, id: &str) -> Result<Result<(), RenewError>, ClusterError> {
        let (term, leading) = self.node.leadership();
        if !leading {
            return Err(ClusterError::NotLeader);
        }
        let ttl = match self.node.state().session(id) {
            None => return Ok(Err(RenewError::UnknownSession(id.to_string()))),
            Some(s) => session_ttl(&s.ttl),
        };
        if let Some(ttl) = ttl {
            let mut lead = self.lock();
            lead.enter(term);
            lead.sessions.insert(id.to_string(), Instant::now() + ttl);
        }
        Ok(Ok(()))
    }

    /// How long a session must still wait before acquiring `key`: the lock
    /// delay left after an invalidated session released it (zero if none).
    /// Asked of the leader, whose clock times every delay.
    pub async fn lock_delay_left(&self, key: String) -> Result<Duration, ClusterError> {
        let timeout = self.node.timing().write_timeout;
        self.node
            .on_leader(PATH_LOCK_DELAY, &key, timeout, || async {
                self.lock_delay_local(&key)
            })
            .await
    }

    fn lock_delay_local(&self, key: &str) -> Result<Duration, ClusterError> {
        let (term, leading) = self.node.leadership();
        if !leading {
            return Err(ClusterError::NotLeader);
        }
        let delay = match self.node.state().kv(key) {
            Some(e) if e.session.is_none() => e.lock_delay,
            _ => None,
        };
        let Some(d) = delay else {
            return Ok(Duration::ZERO);
        };
        let now = Instant::now();
        let mut lead = self.lock();
        lead.enter(term);
        // Not seen released by this leadership (a takeover, or a lost
        // event): the delay counts from now, which errs on the safe side.
        let until = *lead
            .lock_delays
            .entry((key.to_string(), d.released_at))
            .or_insert(now + Duration::from_nanos(d.delay_ns));
        Ok(until.saturating_duration_since(now))
    }

    /// Starts the lock delay of every key an invalidated session released,
    /// as this node applies the release (it matters only on the leader).
    async fn track_releases(self: Arc<Self>, stop: CancellationToken) {
        let hub = self.node.shared().hub();
        let mut rx = hub.subscribe_all();
        let mut cursor = hub.latest();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let events = match hub.since(cursor) {
                crate::watch::Since::Events(events) => events,
                crate::watch::Since::Gap { .. } => {
                    cursor = hub.latest();
                    continue;
                }
            };
            let (term, leading) = self.node.leadership();
            for ev in events {
                cursor = ev.index;
                if !leading {
                    continue;
                }
                for c in &ev.changes {
                    let Some(v) = c.value.as_deref().filter(|v| v.contains("lock_delay")) else {
                        continue;
                    };
                    let Ok(e) = serde_json::from_str::<crate::registry::KvEntry>(v) else {
                        continue;
                    };
                    if let (None, Some(d)) = (&e.session, e.lock_delay) {
                        let mut lead = self.lock();
                        lead.enter(term);
                        let now = Instant::now();
                        lead.lock_delays
                            .entry((e.key, d.released_at))
                            .or_insert(now + Duration::from_nanos(d.delay_ns));
                    }
                }
            }
        }
    }

    /// How long ago the leader last heard from each member (ms), from any
    /// node: the leader's view, as `GET /v1/cluster/stats` reports it.
    pub async fn contacts(&self) -> Result<BTreeMap<NodeId, u64>, ClusterError> {
        let timeout = self.node.timing().leader_wait;
        self.node
            .on_leader(PATH_CONTACTS, &(), timeout, || async {
                self.contacts_local()
            })
            .await
    }

    fn contacts_local(&self) -> Result<BTreeMap<NodeId, u64>, ClusterError> {
        let (term, leading) = self.node.leadership();
        if !leading {
            return Err(ClusterError::NotLeader);
        }
        let ids: Vec<NodeId> = self.node.state().nodes().map(|n| n.id).collect();
        let mut lead = self.lock();
        lead.enter(term);
        let now = Instant::now();
        Ok(ids
            .into_iter()
            .map(|id| {
                let heard = self.node.heard().last(id);
                let last = lead.last_heard(id, self.node.id(), now, heard);
                let ms = now.saturating_duration_since(last).as_millis();
                (id, u64::try_from(ms).unwrap_or(u64::MAX))
            })
            .collect())
    }

    /// One leader round; see `decide`. Proposals run in line: the next round
    /// starts after they are answered, so rounds never pile up.
    async fn sweep(&self) {
        let (term, leading) = self.node.leadership();
        if !leading {
            self.lock().leave();
            return;
        }
        let decisions = {
            let reg = self.node.state();
            let mut lead = self.lock();
            lead.enter(term);
            let heard = self.node.heard();
            decide(
                &reg,
                &mut lead,
                Instant::now(),
                self.node.id(),
                |id| heard.last(id),
                self.fail_after,
            )
        };
        for (node, failed) in decisions.nodes {
            if failed {
                tracing::warn!(
                    node,
                    "member silent past the node failure timeout; marking it failed"
                );
            } else {
                tracing::info!(node, "member heard from again; marking it alive");
            }
            self.propose(Command::SetNodeHealth { node, failed }).await;
        }
        if !decisions.updates.is_empty() {
            tracing::debug!(
                checks = decisions.updates.len(),
                "proposing check status changes"
            );
            self.propose(Command::UpdateChecks {
                updates: decisions.updates,
            })
            .await;
        }
        for id in decisions.expire_sessions {
            tracing::info!(session = %id, "session TTL expired; invalidating it");
            self.propose(Command::SessionDestroy { id }).await;
        }
        for id in decisions.deregister {
            tracing::info!(service = %id, "critical past DeregisterCriticalServiceAfter; deregistering");
            self.propose(Command::DeregisterService { id }).await;
        }
    }

    async fn propose(&self, cmd: Command) {
        if let Err(e) = self.node.write(cmd).await {
            // The next sweep proposes again if it still applies.
            tracing::debug!(error = %e, "health proposal failed");
        }
    }

    /// Runs the leader sweep and the probe reconciler until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let probes = tokio::spawn(probe::run(self.clone(), stop.clone()));
        let releases = tokio::spawn(self.clone().track_releases(stop.clone()));
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.sweep()
                .instrument(tracing::debug_span!("health_sweep"))
                .await;
        }
        let _ = probes.await;
        let _ = releases.await;
    }
}

async fn beat_rpc(
    State(h): State<Arc<Health>>,
    Json(beat): Json<Beat>,
) -> Json<Result<Result<(), BeatError>, ClusterError>> {
    let span = tracing::debug_span!("check_beat", check = %beat.check_id);
    Json(h.beat_local(beat).instrument(span).await)
}

async fn renew_rpc(
    State(h): State<Arc<Health>>,
    Json(id): Json<String>,
) -> Json<Result<Result<(), RenewError>, ClusterError>> {
    let _span = tracing::debug_span!("session_renew", session = %id).entered();
    Json(h.renew_local(&id))
}

async fn lock_delay_rpc(
    State(h): State<Arc<Health>>,
    Json(key): Json<String>,
) -> Json<Result<Duration, ClusterError>> {
    let _span = tracing::debug_span!("lock_delay", key = %key).entered();
    Json(h.lock_delay_local(&key))
}

async fn contacts_rpc(
    State(h): State<Arc<Health>>,
) -> Json<Result<BTreeMap<NodeId, u64>, ClusterError>> {
    let _span = tracing::debug_span!("contacts").entered();
    Json(h.contacts_local())
}

/// The health calls on the peer listener.
pub fn peer_router(health: Arc<Health>) -> Router {
    Router::new()
        .route(PATH_BEAT, post(beat_rpc))
        .route(PATH_CONTACTS, post(contacts_rpc))
        .route(PATH_RENEW, post(renew_rpc))
        .route(PATH_LOCK_DELAY, post(lock_delay_rpc))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(health)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{CheckDef, NodeEntry, ServiceSpec};

    fn reg_with_ttl(status_passing: bool) -> Registry {
        let mut reg = Registry::new();
        reg.set_members(1, vec![NodeEntry::test(1), NodeEntry::test(2)]);
        let check = CheckDef {
            check_id: "t".into(),
            ttl: Some("10s".into()),
            deregister_critical_service_after: Some("30s".into()),
            ..CheckDef::default()
        };
        reg.apply(
            2,
            &Command::RegisterService {
                via_node: 2,
                service: ServiceSpec {
                    id: "w".into(),
                    name: "web".into(),
                    checks: vec![check],
                    ..ServiceSpec::default()
                },
            },
        );
        if status_passing {
            reg.apply(
                3,
                &Command::UpdateChecks {
                    updates: vec![CheckUpdate {
                        check_id: "t".into(),
                        status: HealthStatus::Passing,
                        output: String::new(),
                        owner: None,
                    }],
                },
            );
        }
        reg
    }

    fn leadership(since: Instant) -> Leadership {
        Leadership::new(Some(1), since)
    }

    const FAIL: Duration = Duration::from_secs(3);

    #[test]
    fn a_new_leader_grants_one_ttl_then_a_silent_check_lapses() {
        let reg = reg_with_ttl(true);
        let t0 = Instant::now();
        let mut lead = leadership(t0);
        let heard = |_| Some(t0);
        let d = decide(&reg, &mut lead, t0 + Duration::from_secs(9), 1, heard, FAIL);
        assert!(d.updates.is_empty(), "within the grace TTL: {d:?}");
        let d = decide(
            &reg,
            &mut lead,
            t0 + Duration::from_secs(11),
            1,
            heard,
            FAIL,
        );
        assert_eq!(d.updates.len(), 1);
        assert_eq!(d.updates[0].status, HealthStatus::Critical);
        assert_eq!(d.updates[0].output, TTL_EXPIRED);
    }

    #[test]
    fn a_fresh_lease_asks_for_its_status_and_nothing_when_it_matches() {
        let reg = reg_with_ttl(false);
        let t0 = Instant::now();
        let mut lead = leadership(t0);
        lead.leases.insert(
            "t".into(),
            Lease {
                deadline: t0 + Duration::from_secs(10),
                status: HealthStatus::Passing,
                output: "ok".into(),
            },
        );
        let d = decide(&reg, &mut lead, t0, 1, |_| Some(t0), FAIL);
        assert_eq!(d.updates[0].status, HealthStatus::Passing);
        let reg = reg_with_ttl(true);
        let d = decide(&reg, &mut lead, t0, 1, |_| Some(t0), FAIL);
        assert!(d.updates.is_empty());
    }

    #[test]
    fn silent_members_fail_after_the_timeout_counted_from_takeover() {
        let reg = reg_with_ttl(true);
        let t0 = Instant::now();
        let mut lead = leadership(t0);
        let never = |_| None;
        let d = decide(&reg, &mut lead, t0 + Duration::from_secs(2), 1, never, FAIL);
        assert!(d.nodes.is_empty());
        let d = decide(&reg, &mut lead, t0 + Duration::from_secs(4), 1, never, FAIL);
        assert_eq!(d.nodes, vec![(2, true)], "the leader itself never fails");
        let mut failed = reg.clone();
        failed.apply(
            4,
            &Command::SetNodeHealth {
                node: 2,
                failed: true,
            },
        );
        let now = t0 + Duration::from_secs(5);
        let d = decide(&failed, &mut lead, now, 1, |_| Some(now), FAIL);
        assert_eq!(d.nodes, vec![(2, false)]);
    }

    #[test]
    fn sessions_get_one_ttl_from_first_sighting_and_renewals_extend_it() {
        let mut reg = reg_with_ttl(true);
        for (i, id) in ["s1", "s2"].iter().enumerate() {
            reg.apply(
                10 + i as u64,
                &Command::SessionCreate(crate::registry::Session {
                    id: id.to_string(),
                    name: String::new(),
                    node: 2,
                    behavior: crate::registry::Behavior::Release,
                    ttl: "10s".into(),
                    lock_delay_ns: 0,
                    create_index: 0,
                    modify_index: 0,
                }),
            );
        }
        let t0 = Instant::now();
        let mut lead = leadership(t0);
        let heard = |_| Some(t0 + Duration::from_secs(60));
        let at = |s| t0 + Duration::from_secs(s);
        // First sighting (a takeover): one full TTL from then.
        assert!(decide(&reg, &mut lead, t0, 1, heard, FAIL)
            .expire_sessions
            .is_empty());
        assert!(decide(&reg, &mut lead, at(9), 1, heard, FAIL)
            .expire_sessions
            .is_empty());
        // s2 renewed at 5 s: its TTL runs from then.
        lead.sessions.insert("s2".into(), at(15));
        let d = decide(&reg, &mut lead, at(11), 1, heard, FAIL);
        assert_eq!(d.expire_sessions, vec!["s1".to_string()]);
        let d = decide(&reg, &mut lead, at(16), 1, heard, FAIL);
        assert_eq!(d.expire_sessions.len(), 2);
    }

    #[test]
    fn dcsa_counts_from_the_first_critical_sighting() {
        let reg = reg_with_ttl(false);
        let t0 = Instant::now();
        let mut lead = leadership(t0);
        let heard = |_| Some(t0 + Duration::from_secs(40));
        let d = decide(&reg, &mut lead, t0 + Duration::from_secs(1), 1, heard, FAIL);
        assert!(d.deregister.is_empty());
        let d = decide(
            &reg,
            &mut lead,
            t0 + Duration::from_secs(32),
            1,
            heard,
            FAIL,
        );
        assert_eq!(d.deregister.into_iter().collect::<Vec<_>>(), ["w"]);
    }
}
