//! `GET /v1/watch`: the native Server-Sent Events change stream.
//!
//! Owns the stream's wire format, its filters (`?kind`, `?prefix`,
//! `?service`), where it starts (`Last-Event-ID`, `?index`), its resyncs and
//! the per-node bound on open streams. Does not own the change feed
//! (`crate::watch::Hub`, fed by the state machine's apply) or the state (read
//! under the registry lock, like every read), and it writes nothing.
//!
//! Wire format (`text/event-stream`; a `:` comment every `KEEP_ALIVE` keeps
//! idle streams open through proxies):
//!
//! ```text
//! event: change
//! id: 42
//! data: {"Index":42,"Changes":[{"Kind":"kv","Key":"config/a","Op":"set","Value":{..}},
//!        {"Kind":"services","Key":"web-1","Op":"delete","Value":null}]}
//!
//! event: resync
//! id: 57
//! data: {"Index":57,"State":[{"Kind":"services","Key":"web-2","Value":{..}}, ..]}
//! ```
//!
//! (each `data` is one line on the wire). `Kind` is `nodes`, `services`,
//! `health` (checks), `kv` or `sessions`; `Key` is the storage key without
//! its prefix: the instance, check or session id, the KV key, the node id as
//! a decimal string, and `failed/<node id>` (value `true`) while the leader
//! holds a node failed. `Value` is the stored JSON of the entry. One
//! `change` event stands for one hub event (one apply, at the `id` index)
//! and lists only the changes the filters pass; an event none pass is not
//! sent. An apply may cover several log entries: a key written twice in it
//! appears once, with its final value (the stream carries state, not every
//! write).
//!
//! Query: `?kind=` one of the kinds or a comma-separated list, `?prefix=`
//! (KV keys; implies `kv`), `?service=NAME` (its instances and their checks;
//! implies `services` and `health`); filters AND together, and a combination
//! that leaves no kind is a 400. The start is `Last-Event-ID`, else
//! `?index=`; none, or 0, starts with a resync. The stream serves this node's
//! applied state, as a `?stale` read does (the response's `X-Consul-Index`
//! is the node's applied index at opening). Ids are Raft indexes, the same
//! on every node, so a client may resume on another node.
//!
//! Invariants:
//! - Exactly once, in order: a stream resumed from index `c` (at or above the
//!   hub's floor) sends every passing change of every event after `c` once,
//!   in index order; its cursor is the last index it sent or skipped, and a
//!   client resuming from the last `id` it saw continues exactly there.
//! - Never a silent gap: with no cursor, a cursor below what the hub keeps,
//!   or a stream that falls behind the ring, the stream sends `resync` with
//!   the filtered state and the index it is at (read together under the
//!   registry lock) and continues after that index.
//! - `?service=NAME` never misses a change of NAME: a deletion carries no
//!   value, so the stream keeps the ids of NAME's instances and checks
//!   (seeded from the registry, updated by every event it processes, sent or
//!   not). A deletion it cannot place is sent while it replays events from
//!   before its seed (it may have been NAME's) and dropped after (then it
//!   knows it was not): over-inclusive during replay, never missing.
//! - Bounded: at most `MAX_STREAMS` streams per process (the agent runs one
//!   node per process); each holds at most `BATCH` events pulled from the
//!   ring (no queue per subscriber) plus the ids of one service.
//! - Waiting costs no CPU: a stream sleeps on the hub's `subscribe_all` and
//!   ends as soon as the hub closes (node shutdown).

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::{watch, Semaphore, SemaphorePermit};
use tracing::Instrument;

use super::body::Params;
use super::error::ApiError;
use super::{with_read_headers, Consistency};
use crate::raft::state_machine::Shared;
use crate::raft::{ClusterError, RaftNode};
use crate::registry::{Kind, Registry, StateKey};
use crate::watch::{Change, Event, Since};

/// Most streams open at once on a node.
pub const MAX_STREAMS: usize = 4096;
/// Interval of the keep-alive comments; well under the idle timeouts of
/// common proxies (60 s and up).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Most hub events a stream pulls from the ring at a time.
const BATCH: usize = 64;

/// One permit per open stream; the permit lives inside the stream, so it is
/// returned when the client goes away or the stream ends.
static STREAMS: Semaphore = Semaphore::const_new(MAX_STREAMS);

const LAST_EVENT_ID: &str = "last-event-id";

// ------------------------------------------------------------------ filters

/// What a stream passes: changes of `kinds`, and (ANDed) KV keys under
/// `prefix` and the instances and checks of `service`.
#[derive(Debug)]
struct Filter {
    kinds: [bool; Kind::ALL.len()],
    prefix: Option<String>,
    service: Option<Service>,
}

/// What a `?service=` stream knows about its service; see the module
/// invariants.
#[derive(Debug)]
struct Service {
    name: String,
    /// Ids of the instances named `name`.
    instances: HashSet<String>,
    /// Ids of the checks bound to those instances.
    checks: HashSet<String>,
    /// The registry index the sets were seeded at: a deletion in an event at
    /// or before it may be of an id the seed never saw.
    seeded_at: u64,
}

/// The fields a `?service` stream reads from stored values; serde skips the
/// rest.
#[derive(Deserialize)]
struct InstanceName {
    name: String,
}

#[derive(Deserialize)]
struct CheckOwner {
    service_id: String,
}

fn kind_names() -> String {
    Kind::ALL.map(Kind::as_str).join(", ")
}

/// Clears every kind not in `only`.
fn restrict(kinds: &mut [bool; Kind::ALL.len()], only: &[Kind]) {
    for k in Kind::ALL {
        if !only.contains(&k) {
            kinds[k as usize] = false;
        }
    }
}

impl Filter {
    fn from_params(p: &Params) -> Result<Self, ApiError> {
        let mut kinds = [true; Kind::ALL.len()];
        if let Some(raw) = p.get("kind") {
            kinds = [false; Kind::ALL.len()];
            for item in raw.split(',').map(str::trim) {
                let kind = Kind::parse(item).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "?kind must be one of {} (or a comma-separated list), got {item:?}",
                        kind_names()
                    ))
                })?;
                kinds[kind as usize] = true;
            }
        }
        let prefix = p.get("prefix").map(str::to_string);
        if prefix.is_some() {
            restrict(&mut kinds, &[Kind::Kv]);
        }
        let service = match p.get("service") {
            None => None,
            Some("") => return Err(ApiError::BadRequest("?service needs a service name".into())),
            Some(name) => {
                restrict(&mut kinds, &[Kind::Services, Kind::Checks]);
                Some(Service {
                    name: name.to_string(),
                    instances: HashSet::new(),
                    checks: HashSet::new(),
                    seeded_at: 0,
                })
            }
        };
        // Filters AND together, so a combination that leaves no kind could
        // only ever send an empty stream: that is a client mistake.
        if kinds.iter().all(|k| !k) {
            return Err(ApiError::BadRequest(
                "these filters exclude every kind: ?prefix selects kv only, ?service selects \
                 services and health only, and ?kind must include one of those"
                    .into(),
            ));
        }
        Ok(Filter {
            kinds,
            prefix,
            service,
        })
    }

    fn passes(&self, kind: Kind) -> bool {
        self.kinds[kind as usize]
    }

    /// The changes of `ev` the stream sends, in event order. Updates what a
    /// `?service` stream knows, so it must see every event the stream
    /// processes, sent or not.
    fn select<'e>(&mut self, ev: &'e Event) -> Vec<&'e Change> {
        let by_service = self.service.as_mut().map(|s| s.attribute(ev));
        ev.changes
            .iter()
            .enumerate()
            .filter(|(i, c)| {
                self.passes(c.kind)
                    && match (&self.prefix, c.kind) {
                        (Some(p), Kind::Kv) => id_of(&c.key).starts_with(p.as_str()),
                        _ => true,
                    }
                    && by_service.as_ref().is_none_or(|keep| keep[*i])
            })
            .map(|(_, c)| c)
            .collect()
    }

    /// The keys of the filtered state of `reg`, in kind then key order;
    /// (re)seeds what a `?service` stream knows.
    fn state(&mut self, reg: &Registry) -> Vec<StateKey> {
        if let Some(s) = &mut self.service {
            s.seed(reg);
        }
        let mut keys = Vec::new();
        if self.passes(Kind::Nodes) {
            for n in reg.nodes() {
                keys.push(StateKey::Node(n.id));
                if reg.is_failed(n.id) {
                    keys.push(StateKey::NodeFailed(n.id));
                }
            }
        }
        let name = self.service.as_ref().map(|s| s.name.as_str());
        if self.passes(Kind::Services) {
            let ids = match name {
                Some(n) => reg.instances_of(n).map(|s| s.spec.id.to_string()).collect(),
                None => reg
                    .services()
                    .map(|s| s.spec.id.to_string())
                    .collect::<Vec<_>>(),
            };
            keys.extend(ids.into_iter().map(StateKey::Service));
        }
        if self.passes(Kind::Checks) {
            match name {
                Some(n) => {
                    for s in reg.instances_of(n) {
                        let checks = reg.checks_of(&s.spec.id);
                        keys.extend(checks.map(|c| StateKey::Check(c.def.check_id.clone())));
                    }
                }
                None => {
                    keys.extend(
                        reg.checks()
                            .map(|c| StateKey::Check(c.def.check_id.clone())),
                    );
                }
            }
        }
        if self.passes(Kind::Kv) {
            let prefix = self.prefix.as_deref().unwrap_or("");
            keys.extend(reg.kv_prefix(prefix).map(|e| StateKey::Kv(e.key.clone())));
        }
        if self.passes(Kind::Sessions) {
            keys.extend(reg.sessions().map(|s| StateKey::Session(s.id.clone())));
        }
        if self.passes(Kind::Routes) {
            keys.extend(reg.routes().map(|r| StateKey::Route(r.name.clone())));
        }
        keys
    }
}

impl Service {
    /// Learns the service's instances and checks from `reg`; returns the
    /// index they are current at.
    fn seed(&mut self, reg: &Registry) -> u64 {
        let instances: HashSet<String> = reg
            .instances_of(&self.name)
            .map(|s| s.spec.id.to_string())
            .collect();
        self.checks = instances
            .iter()
            .flat_map(|id| reg.checks_of(id).map(|c| c.def.check_id.clone()))
            .collect();
        self.instances = instances;
        self.seeded_at = reg.last_index();
        self.seeded_at
    }

    /// Which of `ev`'s changes are of this service (by position), learning
    /// from the event as it goes.
    fn attribute(&mut self, ev: &Event) -> Vec<bool> {
        let unplaced = ev.index <= self.seeded_at;
        let mut keep = vec![false; ev.changes.len()];
        // Instances first, whatever the event's order: a registration's
        // checks belong to an instance this same event may create.
        for (i, c) in ev.changes.iter().enumerate() {
            if c.kind != Kind::Services {
                continue;
            }
            let id = id_of(&c.key);
            let was = self.instances.contains(id);
            keep[i] = match c.value.as_deref().map(serde_json::from_str::<InstanceName>) {
                None => {
                    self.instances.remove(id);
                    was || unplaced
                }
                Some(Ok(v)) => {
                    let mine = v.name == self.name;
                    if mine {
                        self.instances.insert(id.to_string());
                    } else {
                        // Renamed away: the client still hears of it, once.
                        self.instances.remove(id);
                    }
                    mine || was
                }
                // Stored values are our own encoding; sending one we cannot
                // read errs on the side of never missing.
                Some(Err(_)) => true,
            };
        }
        for (i, c) in ev.changes.iter().enumerate() {
            if c.kind != Kind::Checks {
                continue;
            }
            let id = id_of(&c.key);
            let was = self.checks.contains(id);
            keep[i] = match c.value.as_deref().map(serde_json::from_str::<CheckOwner>) {
                None => {
                    self.checks.remove(id);
                    was || unplaced
                }
                Some(Ok(v)) => {
                    let mine = self.instances.contains(v.service_id.as_str());
                    if mine {
                        self.checks.insert(id.to_string());
                    } else {
                        self.checks.remove(id);
                    }
                    mine || was
                }
                Some(Err(_)) => true,
            };
        }
        keep
    }
}

// ------------------------------------------------------------------ wire format

/// A storage key without its prefix (`svc/web-1` → `web-1`).
fn id_of(storage_key: &str) -> &str {
    storage_key
        .split_once('/')
        .map_or(storage_key, |(_, id)| id)
}

fn push_json_str(out: &mut String, s: &str) {
    // A JSON string value displays as its escaped, quoted form.
    let _ = write!(out, "{}", serde_json::Value::from(s));
}

/// Appends `{"Kind":..,"Key":..[,"Op":..],"Value":..}`. `value` is a stored
/// value, which is JSON written by serde_json (`Registry::encode_value`), so
/// it is spliced in as is rather than parsed and printed again per stream.
fn push_entry(out: &mut String, kind: Kind, storage_key: &str, op: bool, value: Option<&str>) {
    out.push_str("{\"Kind\":");
    push_json_str(out, kind.as_str());
    out.push_str(",\"Key\":");
    push_json_str(out, &crate::watch::wire_key(storage_key));
    if op {
        out.push_str(match value {
            Some(_) => ",\"Op\":\"set\"",
            None => ",\"Op\":\"delete\"",
        });
    }
    out.push_str(",\"Value\":");
    out.push_str(value.unwrap_or("null"));
    out.push('}');
}

/// One event of the stream, before it is put on the wire.
#[derive(Debug)]
struct Out {
    /// `change` or `resync`.
    event: &'static str,
    index: u64,
    data: String,
}

impl Out {
    fn into_sse(self) -> SseEvent {
        SseEvent::default()
            .event(self.event)
            .id(self.index.to_string())
            .data(self.data)
    }
}

fn change_event(index: u64, changes: &[&Change]) -> Out {
    let size: usize = changes
        .iter()
        .map(|c| c.key.len() + c.value.as_ref().map_or(4, String::len) + 48)
        .sum();
    let mut data = String::with_capacity(size + 32);
    let _ = write!(data, "{{\"Index\":{index},\"Changes\":[");
    for (i, c) in changes.iter().enumerate() {
        if i > 0 {
            data.push(',');
        }
        push_entry(&mut data, c.kind, &c.key, true, c.value.as_deref());
    }
    data.push_str("]}");
    Out {
        event: "change",
        index,
        data,
    }
}

// ------------------------------------------------------------------ the stream

/// One open stream: where it is in the hub's history and what it passes.
struct Watcher {
    shared: Arc<Shared>,
    filter: Filter,
    /// The last index sent or skipped.
    cursor: u64,
    /// Events up to this index are processed (a `?service` stream learns
    /// from them) but not sent: the client has seen them already.
    silent_through: u64,
    /// The next step sends a resync.
    resync: bool,
    /// Events pulled from the ring, not yet processed (at most `BATCH`).
    pending: VecDeque<Arc<Event>>,
    /// Woken at every publish; marked seen before each look at the ring.
    wake: watch::Receiver<u64>,
    span: tracing::Span,
    _permit: SemaphorePermit<'static>,
}

impl Watcher {
    /// A stream over `shared` from `cursor` (`None`: resync first), holding
    /// one of `MAX_STREAMS` permits.
    fn new(
        shared: Arc<Shared>,
        mut filter: Filter,
        cursor: Option<u64>,
        permit: SemaphorePermit<'static>,
    ) -> Self {
        let (mut from, mut silent_through) = (cursor.unwrap_or(0), 0);
        if let (Some(c), Some(s)) = (cursor, &mut filter.service) {
            let seeded = s.seed(&shared.read());
            // A client resuming past this node's state (it read a node that
            // is ahead): the events in between are not sent again, but the
            // stream must learn from them to place later deletions.
            if seeded < c {
                from = seeded;
                silent_through = c;
            }
        }
        Watcher {
            wake: shared.hub().subscribe_all(),
            shared,
            filter,
            cursor: from,
            silent_through,
            resync: cursor.is_none(),
            pending: VecDeque::new(),
            // The request's span (opened by the guard middleware): the body
            // is polled after the handler returns, outside of it.
            span: tracing::Span::current(),
            _permit: permit,
        }
    }

    /// The next event, or `None` once the node shuts down.
    async fn next(&mut self) -> Option<Out> {
        let shared = self.shared.clone();
        let hub = shared.hub();
        loop {
            if hub.is_closed() {
                tracing::debug!(
                    cursor = self.cursor,
                    "watch stream ends: node shutting down"
                );
                return None;
            }
            if self.resync {
                return Some(self.resync());
            }
            while let Some(ev) = self.pending.pop_front() {
                self.cursor = ev.index;
                let picked = self.filter.select(&ev);
                if ev.index > self.silent_through && !picked.is_empty() {
                    return Some(change_event(ev.index, &picked));
                }
            }
            // Seen before looking: a publish after the look below then
            // wakes the wait, so none is slept through.
            self.wake.borrow_and_update();
            match hub.since_at_most(self.cursor, BATCH) {
                Since::Gap { floor } => {
                    tracing::debug!(
                        cursor = self.cursor,
                        floor,
                        "watch stream is behind the retained history; resyncing"
                    );
                    self.resync = true;
                }
                Since::Events(evs) if !evs.is_empty() => self.pending = evs.into(),
                Since::Events(_) => {
                    tokio::select! {
                        changed = self.wake.changed() => {
                            // The sender lives as long as the hub: gone only at shutdown.
                            if changed.is_err() {
                                return None;
                            }
                        }
                        _ = hub.closed() => {}
                    }
                }
            }
        }
    }

    /// The filtered state and its index, read together under the registry
    /// lock; the stream continues after that index.
    fn resync(&mut self) -> Out {
        let (index, data) = {
            let reg = self.shared.read();
            let index = reg.last_index();
            let keys = self.filter.state(&reg);
            let mut data = format!("{{\"Index\":{index},\"State\":[");
            let mut first = true;
            for k in &keys {
                let Some(value) = reg.encode_value(k) else {
                    continue;
                };
                if !first {
                    data.push(',');
                }
                first = false;
                let storage_key = String::from_utf8_lossy(&k.encode()).into_owned();
                let value = String::from_utf8_lossy(&value);
                push_entry(&mut data, k.kind(), &storage_key, false, Some(&value));
            }
            data.push_str("]}");
            (index, data)
        };
        self.cursor = index;
        self.silent_through = 0;
        self.resync = false;
        self.pending.clear();
        tracing::debug!(index, bytes = data.len(), "watch stream resync sent");
        Out {
            event: "resync",
            index,
            data,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _span = self.span.enter();
        tracing::debug!(cursor = self.cursor, "watch stream closed");
    }
}

/// Where the client resumes: `Last-Event-ID` (what `EventSource` sends on
/// reconnect), else `?index=`. `None` (or 0, or an empty header, which is how
/// `EventSource` forgets an id) starts with a resync.
fn start_cursor(headers: &HeaderMap, p: &Params) -> Result<Option<u64>, ApiError> {
    let (raw, what) = match headers.get(LAST_EVENT_ID) {
        Some(h) => {
            let raw = h.to_str().map_err(|_| {
                ApiError::BadRequest("the Last-Event-ID header is not a decimal index".into())
            })?;
            (raw, "the Last-Event-ID header")
        }
        None => match p.get("index") {
            Some(raw) => (raw, "?index"),
            None => return Ok(None),
        },
    };
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    let index: u64 = raw.parse().map_err(|_| {
        ApiError::BadRequest(format!("{what} must be an unsigned integer, got {raw:?}"))
    })?;
    Ok((index > 0).then_some(index))
}

/// `GET /v1/watch`; see the module doc.
pub async fn stream(
    State(node): State<Arc<RaftNode>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let p = Params::parse(query.as_deref());
    let filter = Filter::from_params(&p)?;
    let cursor = start_cursor(&headers, &p)?;
    let shared = node.shared().clone();
    let applied = shared.applied_index();
    if shared.hub().is_closed() {
        return Err(ClusterError::Stopped("the node is shutting down".into()).into());
    }
    let permit = STREAMS.try_acquire().map_err(|_| ApiError::Overloaded)?;
    let w = Watcher::new(shared, filter, cursor, permit);
    tracing::debug!(?cursor, "watch stream opened");
    let events = futures_util::stream::unfold(w, |mut w| async move {
        let span = w.span.clone();
        let out = w.next().instrument(span).await?;
        Some((Ok::<_, Infallible>(out.into_sse()), w))
    });
    let res = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // The stream serves this node's applied state, as a `?stale` read does;
    // each event carries its own index, the header the one at opening.
    let mut res = with_read_headers(res, &node, applied, Consistency::Stale);
    // nginx buffers responses unless told not to; a buffered stream is a
    // stalled one.
    res.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{CheckDef, Command, ServiceSpec};

    fn register(reg: &mut Registry, index: u64, id: &str, name: &str, check: bool) -> Event {
        let checks = if check {
            vec![CheckDef {
                check_id: format!("service:{id}"),
                ttl: Some("30s".into()),
                ..CheckDef::default()
            }]
        } else {
            Vec::new()
        };
        let cmd = Command::RegisterService {
            via_node: 1,
            service: ServiceSpec {
                id: id.into(),
                name: name.into(),
                checks,
                ..ServiceSpec::default()
            },
        };
        event(reg, index, &cmd)
    }

    /// The hub event applying `cmd` publishes: each touched key with its
    /// stored value, in storage-key order (as the state machine builds it).
    fn event(reg: &mut Registry, index: u64, cmd: &Command) -> Event {
        let (_, mut keys) = reg.apply(index, cmd);
        keys.sort();
        keys.dedup();
        let mut changes: Vec<Change> = keys
            .iter()
            .map(|k| Change {
                kind: k.kind(),
                key: String::from_utf8(k.encode()).expect("keys are UTF-8"),
                value: reg
                    .encode_value(k)
                    .map(|v| String::from_utf8(v).expect("values are UTF-8")),
            })
            .collect();
        changes.sort_by(|a, b| a.key.cmp(&b.key));
        Event { index, changes }
    }

    fn filter(query: &str) -> Filter {
        Filter::from_params(&Params::parse(Some(query))).expect("valid filter")
    }

    fn keys(picked: &[&Change]) -> Vec<String> {
        picked.iter().map(|c| c.key.clone()).collect()
    }

    #[test]
    fn service_filter_places_checks_and_deletions() {
        let mut reg = Registry::new();
        let mut f = filter("service=web");
        f.state(&reg);
        let ev = register(&mut reg, 1, "web-1", "web", true);
        assert_eq!(keys(&f.select(&ev)), ["chk/service:web-1", "svc/web-1"]);
        let ev = register(&mut reg, 2, "db-1", "db", true);
        assert!(f.select(&ev).is_empty());
        let ev = event(
            &mut reg,
            3,
            &Command::DeregisterService { id: "db-1".into() },
        );
        assert!(f.select(&ev).is_empty(), "a known other service's deletion");
        let ev = event(
            &mut reg,
            4,
            &Command::DeregisterService { id: "web-1".into() },
        );
        assert_eq!(keys(&f.select(&ev)), ["chk/service:web-1", "svc/web-1"]);
    }

    #[test]
    fn service_filter_over_includes_unplaced_deletions_only_while_replaying() {
        let mut reg = Registry::new();
        let before = register(&mut reg, 1, "web-1", "web", false);
        let gone = event(
            &mut reg,
            2,
            &Command::DeregisterService { id: "web-1".into() },
        );
        register(&mut reg, 3, "db-1", "db", false);
        // Seeded at 3: web-1 is gone by then, so the seed does not know it.
        let seed = |reg: &Registry| {
            let mut f = filter("service=web");
            if let Some(s) = &mut f.service {
                assert_eq!(s.seed(reg), 3);
            }
            f
        };
        let mut f = seed(&reg);
        assert_eq!(keys(&f.select(&gone)), ["svc/web-1"], "resumed from 1");
        let mut f = seed(&reg);
        assert_eq!(keys(&f.select(&before)), ["svc/web-1"], "resumed from 0");
        assert_eq!(keys(&f.select(&gone)), ["svc/web-1"]);
        let later = event(
            &mut reg,
            4,
            &Command::DeregisterService { id: "db-1".into() },
        );
        assert!(f.select(&later).is_empty(), "after the seed, db-1 is known");
    }

    #[test]
    fn renaming_an_instance_away_is_sent_once() {
        let mut reg = Registry::new();
        let mut f = filter("service=web&kind=services");
        f.state(&reg);
        assert_eq!(
            keys(&f.select(&register(&mut reg, 1, "x", "web", true))),
            ["svc/x"]
        );
        assert_eq!(
            keys(&f.select(&register(&mut reg, 2, "x", "db", false))),
            ["svc/x"]
        );
        assert!(f
            .select(&register(&mut reg, 3, "x", "db", false))
            .is_empty());
    }

    #[test]
    fn filters_parse_and_reject() {
        let f = filter("prefix=config/");
        assert!(f.passes(Kind::Kv) && !f.passes(Kind::Services));
        let f = filter("kind=health,nodes");
        assert!(f.passes(Kind::Checks) && f.passes(Kind::Nodes) && !f.passes(Kind::Kv));
        for bad in [
            "kind=bogus",
            "kind=",
            "service=",
            "kind=kv&service=web",
            "prefix=a&service=b",
        ] {
            assert!(
                Filter::from_params(&Params::parse(Some(bad))).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn wire_keys_drop_storage_prefixes() {
        use crate::watch::wire_key;
        assert_eq!(wire_key("node/00000000000000000003"), "3");
        assert_eq!(wire_key("nfail/00000000000000000012"), "failed/12");
        assert_eq!(wire_key("kv/config/a/b"), "config/a/b");
        assert_eq!(wire_key("svc/web-1"), "web-1");
        let c = Change {
            kind: Kind::Services,
            key: "svc/web \"1\"".into(),
            value: None,
        };
        let mut out = String::new();
        push_entry(&mut out, c.kind, &c.key, true, None);
        let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(v["Key"], "web \"1\"");
        assert_eq!(v["Op"], "delete");
        assert!(v["Value"].is_null());
    }

    mod stream {
        use super::*;
        use crate::raft::log_store::Syncer;
        use crate::raft::state_machine::StateMachineStore;
        use crate::raft::types::{Entry, LogId};
        use crate::registry::{KvSet, MAX_VALUE_BYTES};
        use openraft::storage::RaftStateMachine;
        use openraft::{CommittedLeaderId, EntryPayload};

        async fn kv_set(sm: &mut StateMachineStore, index: u64, key: &str, bytes: usize) {
            let cmd = Command::KvSet(KvSet {
                key: key.into(),
                value: vec![b'x'; bytes],
                flags: 0,
                cas: None,
                lock: None,
            });
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Normal(cmd),
            };
            sm.apply([entry]).await.expect("apply");
        }

        fn json(out: &Out) -> serde_json::Value {
            serde_json::from_str(&out.data).expect("data is JSON")
        }

        #[tokio::test]
        async fn a_stream_behind_the_ring_resyncs_then_goes_on_live() {
            let dir = tempfile::tempdir().expect("temp dir");
            let sled_dir = dir.path().join("sled");
            let db = sled::Config::new()
                .path(&sled_dir)
                .open()
                .expect("open sled");
            let syncer = Syncer::new(&db, &sled_dir).expect("syncer");
            let mut sm = StateMachineStore::open(&db, syncer)
                .await
                .expect("open the state machine");
            let shared = sm.shared();
            kv_set(&mut sm, 1, "a", 1).await;
            let permit = STREAMS.try_acquire().expect("a stream permit");
            let mut w = Watcher::new(shared.clone(), filter("kind=kv"), None, permit);
            let out = w.next().await.expect("an event");
            assert_eq!((out.event, out.index), ("resync", 1));
            assert_eq!(json(&out)["State"][0]["Key"], "a");

            // More bytes than the ring keeps: the events after the stream's
            // cursor are evicted before it pulls them.
            let n = crate::watch::MAX_BYTES / MAX_VALUE_BYTES + 2;
            for i in 0..n {
                kv_set(&mut sm, 2 + i as u64, &format!("big{i}"), MAX_VALUE_BYTES).await;
            }
            let last = 1 + n as u64;
            assert!(matches!(shared.hub().since(1), Since::Gap { .. }));
            let out = w.next().await.expect("an event");
            assert_eq!((out.event, out.index), ("resync", last));
            assert_eq!(json(&out)["State"].as_array().map(Vec::len), Some(n + 1));

            // Then live, woken by the publish.
            let waiting = tokio::spawn(async move {
                let out = w.next().await;
                (out, w)
            });
            kv_set(&mut sm, last + 1, "b", 1).await;
            let (out, mut w) = tokio::time::timeout(Duration::from_secs(30), waiting)
                .await
                .expect("woken by the publish")
                .expect("joins");
            let out = out.expect("an event");
            assert_eq!((out.event, out.index), ("change", last + 1));
            let v = json(&out);
            assert_eq!(v["Changes"][0]["Key"], "b");
            assert_eq!(v["Changes"][0]["Op"], "set");
            assert_eq!(v["Changes"][0]["Value"]["key"], "b");

            // Shutdown ends a waiting stream.
            let waiting = tokio::spawn(async move { w.next().await });
            shared.hub().close();
            let end = tokio::time::timeout(Duration::from_secs(30), waiting)
                .await
                .expect("ended by the close")
                .expect("joins");
            assert!(end.is_none());
        }
    }
}
