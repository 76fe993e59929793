//! KV entries, sessions and locks: the coordination half of the registry.
//!
//! Owns `KvEntry`, `Session`, their commands' rules (CAS, acquire/release,
//! session invalidation) and the `Kind` of every stored key. Does not time
//! session TTLs (the leader's `health` subsystem proposes their lapse) and
//! does not render Consul's JSON (the API does).
//!
//! Invariants:
//! - A key's `session`, when set, names a live session in the registry:
//!   destroying or invalidating a session releases (or, for
//!   `Behavior::Delete`, deletes) every key it holds in the same apply.
//! - `lock_index` grows by one exactly when a session takes a free lock;
//!   it is the fencing token a lock holder passes to what it protects.
//! - CAS compares against `modify_index`: 0 means "only if absent".
//! - A session bound to a node is invalidated when that node is marked
//!   failed or leaves the membership.
//! - A key released by an invalidated session carries `lock_delay` (the
//!   release's index and the session's delay) until the next acquisition;
//!   only the leader turns it into time.

use serde::{Deserialize, Serialize};

use super::{NodeId, Registry, Response, StateKey};

/// Largest KV value, as in Consul.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// The kinds of replicated state, each with its own change index: a
/// blocking query wakes only for the kinds its answer depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Nodes = 0,
    Services = 1,
    Checks = 2,
    Kv = 3,
    Sessions = 4,
    Routes = 5,
    /// Stream definitions and their subscriptions.
    Streams = 6,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Nodes,
        Kind::Services,
        Kind::Checks,
        Kind::Kv,
        Kind::Sessions,
        Kind::Routes,
        Kind::Streams,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Nodes => "nodes",
            Kind::Services => "services",
            Kind::Checks => "health",
            Kind::Kv => "kv",
            Kind::Sessions => "sessions",
            Kind::Routes => "routes",
            Kind::Streams => "streams",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s || (s == "checks" && *k == Kind::Checks))
    }

    /// The kind of a storage key (`StateKey::encode`), `None` for keys that
    /// are not registry state.
    pub fn of_storage_key(key: &str) -> Option<Kind> {
        let (prefix, _) = key.split_once('/')?;
        match prefix {
            "node" | "nfail" => Some(Kind::Nodes),
            "svc" => Some(Kind::Services),
            "chk" => Some(Kind::Checks),
            "kv" => Some(Kind::Kv),
            "sess" => Some(Kind::Sessions),
            "route" => Some(Kind::Routes),
            "stream" | "ssub" => Some(Kind::Streams),
            _ => None,
        }
    }
}

impl StateKey {
    pub fn kind(&self) -> Kind {
        match self {
            StateKey::Node(_) | StateKey::NodeFailed(_) => Kind::Nodes,
            StateKey::Service(_) => Kind::Services,
            StateKey::Check(_) => Kind::Checks,
            StateKey::Kv(_) => Kind::Kv,
            StateKey::Session(_) => Kind::Sessions,
            StateKey::Route(_) => Kind::Routes,
            StateKey::Stream(_) | StateKey::Subscription(..) => Kind::Streams,
        }
    }
}

/// Values travel base64 in JSON (log entries, snapshots, stored keys), as
/// Consul shows them.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// One KV entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    pub flags: u64,
    pub create_index: u64,
    pub modify_index: u64,
    pub lock_index: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Set when an invalidated session's lock was released here: the
    /// index of that release and the session's lock delay. The leader
    /// refuses acquisitions for the delay after it saw the release
    /// (`health`); a successful acquisition clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_delay: Option<LockDelay>,
}

/// See `KvEntry::lock_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockDelay {
    pub released_at: u64,
    pub delay_ns: u64,
}

/// What happens to a session's locks when it is invalidated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    #[default]
    Release,
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// A session: what holds locks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub name: String,
    /// The node the session is bound to; its failure invalidates it.
    pub node: NodeId,
    pub behavior: Behavior,
    /// Consul's duration string (`"15s"`), empty for no TTL.
    pub ttl: String,
    /// Nanoseconds, as Consul reports `LockDelay`.
    pub lock_delay_ns: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A lock operation carried by a KV write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvLock {
    Acquire(String),
    Release(String),
}

/// A KV write as proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSet {
    pub key: String,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    pub flags: u64,
    /// `Some(0)`: only if absent; `Some(i)`: only if `modify_index == i`.
    pub cas: Option<u64>,
    pub lock: Option<KvLock>,
}

impl Registry {
    pub fn kv(&self, key: &str) -> Option<&KvEntry> {
        self.kv.get(key).map(|e| &**e)
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn kv_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> {
        self.kv
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| &**e)
    }

    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id).map(|s| &**s)
    }

    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values().map(|s| &**s)
    }

    pub(super) fn kv_set(&mut self, index: u64, op: &KvSet) -> (Response, Vec<StateKey>) {
        let existing = self.kv.get(&op.key);
        let cas_ok = match op.cas {
            None => true,
            Some(0) => existing.is_none(),
            Some(i) => existing.is_some_and(|e| e.modify_index == i),
        };
        if !cas_ok {
            return (Response::Kv(false), Vec::new());
        }
        let holder = existing.and_then(|e| e.session.clone());
        let mut lock_delay = existing.and_then(|e| e.lock_delay);
        let (session, lock_index) = match &op.lock {
            None => (holder, existing.map_or(0, |e| e.lock_index)),
            Some(KvLock::Acquire(s)) => {
                if !self.sessions.contains_key(s) {
                    return (
                        Response::Invalid(format!("invalid session {s:?}")),
                        Vec::new(),
                    );
                }
                let lock_index = existing.map_or(0, |e| e.lock_index);
                match holder {
                    Some(h) if &h == s => (Some(h), lock_index),
                    Some(_) => return (Response::Kv(false), Vec::new()),
                    None => {
                        lock_delay = None;
                        (Some(s.clone()), lock_index + 1)
                    }
                }
            }
            Some(KvLock::Release(s)) => match holder {
                Some(h) if &h == s => (None, existing.map_or(0, |e| e.lock_index)),
                _ => return (Response::Kv(false), Vec::new()),
            },
        };
        let entry = KvEntry {
            key: op.key.clone(),
            value: op.value.clone(),
            flags: op.flags,
            create_index: existing.map_or(index, |e| e.create_index),
            modify_index: index,
            lock_index,
            session,
            lock_delay,
        };
        self.kv.insert(op.key.clone(), Box::new(entry));
        (Response::Kv(true), vec![StateKey::Kv(op.key.clone())])
    }

    pub(super) fn kv_delete(
        &mut self,
        key: &str,
        recurse: bool,
        cas: Option<u64>,
    ) -> (Response, Vec<StateKey>) {
        if let Some(i) = cas {
            if self.kv.get(key).map(|e| e.modify_index) != Some(i) {
                return (Response::Kv(false), Vec::new());
            }
        }
        let keys: Vec<String> = if recurse {
            self.kv_prefix(key).map(|e| e.key.clone()).collect()
        } else {
            self.kv
                .contains_key(key)
                .then(|| key.to_string())
                .into_iter()
                .collect()
        };
        for k in &keys {
            self.kv.remove(k);
        }
        (
            Response::Kv(true),
            keys.into_iter().map(StateKey::Kv).collect(),
        )
    }

    pub(super) fn session_create(
        &mut self,
        index: u64,
        mut s: Session,
    ) -> (Response, Vec<StateKey>) {
        if self.sessions.contains_key(&s.id) {
            return (
                Response::Invalid(format!("session {:?} already exists", s.id)),
                Vec::new(),
            );
        }
        if !self.nodes.contains_key(&s.node) || self.failed.contains(&s.node) {
            return (
                Response::Invalid(format!("node {} is not a live member", s.node)),
                Vec::new(),
            );
        }
        s.create_index = index;
        s.modify_index = index;
        let id = s.id.clone();
        self.sessions.insert(id.clone(), Box::new(s));
        (
            Response::SessionCreated { id: id.clone() },
            vec![StateKey::Session(id)],
        )
    }

    /// Destroys a session, releasing or deleting what it holds.
    pub(super) fn session_destroy(&mut self, index: u64, id: &str) -> (Response, Vec<StateKey>) {
        let Some(s) = self.sessions.remove(id) else {
            return (Response::SessionDestroyed { existed: false }, Vec::new());
        };
        let mut touched = vec![StateKey::Session(id.to_string())];
        let held: Vec<String> = self
            .kv
            .values()
            .filter(|e| e.session.as_deref() == Some(id))
            .map(|e| e.key.clone())
            .collect();
        for k in held {
            match s.behavior {
                Behavior::Delete => {
                    self.kv.remove(&k);
                }
                Behavior::Release => {
                    if let Some(e) = self.kv.get_mut(&k) {
                        e.session = None;
                        e.modify_index = index;
                        e.lock_delay = (s.lock_delay_ns > 0).then_some(LockDelay {
                            released_at: index,
                            delay_ns: s.lock_delay_ns,
                        });
                    }
                }
            }
            touched.push(StateKey::Kv(k));
        }
        (Response::SessionDestroyed { existed: true }, touched)
    }

    /// Invalidates every session bound to `node`.
    pub(super) fn invalidate_node_sessions(&mut self, index: u64, node: NodeId) -> Vec<StateKey> {
        let ids: Vec<String> = self
            .sessions
            .values()
            .filter(|s| s.node == node)
            .map(|s| s.id.clone())
            .collect();
        ids.iter()
            .flat_map(|id| self.session_destroy(index, id).1)
            .collect()
    }

    /// Invalidates sessions bound to nodes that are no longer members.
    pub(super) fn invalidate_orphan_sessions(&mut self, index: u64) -> Vec<StateKey> {
        let gone: Vec<String> = self
            .sessions
            .values()
            .filter(|s| !self.nodes.contains_key(&s.node))
            .map(|s| s.id.clone())
            .collect();
        gone.iter()
            .flat_map(|id| self.session_destroy(index, id).1)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Command, NodeEntry};

    fn set(key: &str, value: &str, cas: Option<u64>, lock: Option<KvLock>) -> Command {
        Command::KvSet(KvSet {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            flags: 0,
            cas,
            lock,
        })
    }

    fn session(id: &str, node: NodeId, behavior: Behavior) -> Command {
        Command::SessionCreate(Session {
            id: id.into(),
            name: String::new(),
            node,
            behavior,
            ttl: String::new(),
            lock_delay_ns: 0,
            create_index: 0,
            modify_index: 0,
        })
    }

    fn reg() -> Registry {
        let mut r = Registry::new();
        r.set_members(1, vec![NodeEntry::test(1), NodeEntry::test(2)]);
        r
    }

    #[test]
    fn cas_zero_creates_only_once_and_cas_index_must_match() {
        let mut r = reg();
        assert_eq!(
            r.apply(2, &set("a", "1", Some(0), None)).0,
            Response::Kv(true)
        );
        assert_eq!(
            r.apply(3, &set("a", "2", Some(0), None)).0,
            Response::Kv(false)
        );
        assert_eq!(
            r.apply(4, &set("a", "2", Some(9), None)).0,
            Response::Kv(false)
        );
        assert_eq!(
            r.apply(5, &set("a", "2", Some(2), None)).0,
            Response::Kv(true)
        );
        let e = r.kv("a").expect("a");
        assert_eq!(
            (e.value.as_slice(), e.create_index, e.modify_index),
            (&b"2"[..], 2, 5)
        );
    }

    #[test]
    fn locks_count_acquisitions_and_release_on_session_destroy() {
        let mut r = reg();
        r.apply(2, &session("s1", 1, Behavior::Release));
        r.apply(3, &session("s2", 2, Behavior::Release));
        let acq = |s: &str| Some(KvLock::Acquire(s.into()));
        assert_eq!(
            r.apply(4, &set("l", "a", None, acq("s1"))).0,
            Response::Kv(true)
        );
        assert_eq!(
            r.apply(5, &set("l", "b", None, acq("s2"))).0,
            Response::Kv(false)
        );
        // Re-acquiring by the holder updates without a new lock index.
        assert_eq!(
            r.apply(6, &set("l", "c", None, acq("s1"))).0,
            Response::Kv(true)
        );
        assert_eq!(r.kv("l").map(|e| e.lock_index), Some(1));
        let (_, touched) = r.apply(7, &Command::SessionDestroy { id: "s1".into() });
        assert!(touched.contains(&StateKey::Kv("l".into())));
        assert_eq!(r.kv("l").and_then(|e| e.session.clone()), None);
        assert_eq!(
            r.apply(8, &set("l", "d", None, acq("s2"))).0,
            Response::Kv(true)
        );
        assert_eq!(r.kv("l").map(|e| e.lock_index), Some(2));
        assert!(matches!(
            r.apply(9, &set("l", "e", None, acq("nope"))).0,
            Response::Invalid(_)
        ));
        let rel = |s: &str| Some(KvLock::Release(s.into()));
        assert_eq!(
            r.apply(10, &set("l", "f", None, rel("s1"))).0,
            Response::Kv(false)
        );
        assert_eq!(
            r.apply(11, &set("l", "f", None, rel("s2"))).0,
            Response::Kv(true)
        );
    }

    #[test]
    fn node_failure_invalidates_its_sessions_and_delete_behavior_deletes() {
        let mut r = reg();
        r.apply(2, &session("s1", 2, Behavior::Delete));
        r.apply(3, &set("x", "v", None, Some(KvLock::Acquire("s1".into()))));
        r.apply(
            4,
            &Command::SetNodeHealth {
                node: 2,
                failed: true,
            },
        );
        assert!(r.session("s1").is_none());
        assert!(r.kv("x").is_none());
        // No new session on a failed node.
        assert!(matches!(
            r.apply(5, &session("s2", 2, Behavior::Release)).0,
            Response::Invalid(_)
        ));
    }

    #[test]
    fn delete_recurse_and_prefix_listing() {
        let mut r = reg();
        for (i, k) in ["a/1", "a/2", "ab", "b"].iter().enumerate() {
            r.apply(i as u64 + 2, &set(k, "v", None, None));
        }
        let keys: Vec<_> = r.kv_prefix("a").map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["a/1", "a/2", "ab"]);
        r.apply(
            10,
            &Command::KvDelete {
                key: "a/".into(),
                recurse: true,
                cas: None,
            },
        );
        let left: Vec<_> = r.kv_prefix("").map(|e| e.key.as_str()).collect();
        assert_eq!(left, vec!["ab", "b"]);
    }
}
