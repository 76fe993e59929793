//! The watch hub: the node-local change feed that blocking queries and the
//! SSE watch stream sleep on.
//!
//! Owns, per node: the index of the last change of each kind of state
//! (`Kind`), and a bounded ring of recent change events (one per applied
//! Raft index that changed registry state). Fed only by the state machine's
//! apply path (`publish`) and by snapshot installs (`reset`). Does not read
//! the registry or decide what a query returns: readers do that under the
//! registry lock, using the indexes here to know when to look again.
//!
//! Invariants:
//! - Every kind index and `latest` only grow on a node. They start at the
//!   applied index the state machine opened with (at least as new as any
//!   change before a restart), so an index a client saw before a restart is
//!   never ahead of what the node reports after it.
//! - `floor` is the retention boundary: every change at an index above
//!   `floor` is in the ring, in index order. A reader that resumes from an
//!   index at or above `floor` misses nothing; one below it must resync.
//! - The ring holds at most `MAX_EVENTS` events and `MAX_BYTES` of keys and
//!   values; evicting the oldest raises `floor` to its index.
//! - Waiting costs no CPU: waiters hold `watch::Receiver`s and are woken by
//!   `publish`, never by timers (besides their own deadline).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::registry::Kind;

/// Most events kept for resuming streams.
pub const MAX_EVENTS: usize = 4096;
/// Most bytes (keys plus values) kept for resuming streams. Small on
/// purpose: the ring is a copy of recently changed state, and at 8 MiB it
/// held all 10,000 instances of the footprint benchmark (+6 MiB RSS).
pub const MAX_BYTES: usize = 2 * 1024 * 1024;

/// One changed piece of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    /// The storage key (`svc/web-1`, `kv/config/a`, ...).
    pub key: String,
    /// The stored JSON value, or `None` when the key was removed.
    pub value: Option<String>,
}

impl Change {
    fn bytes(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, String::len) + 64
    }
}

/// The key a client sees for a storage key (`svc/web-1` → `web-1`,
/// `node/00…03` → `3`, `nfail/00…12` → `failed/12`): what the watch API's
/// `Key` and the `_registry` stream's `key` carry.
pub fn wire_key(storage_key: &str) -> Cow<'_, str> {
    // Node ids are stored zero-padded (for ordering); clients know them as
    // plain numbers.
    let node = |id: &str| {
        id.parse::<u64>()
            .map_or_else(|_| id.to_string(), |n| n.to_string())
    };
    match storage_key.split_once('/') {
        Some(("node", id)) => Cow::Owned(node(id)),
        Some(("nfail", id)) => Cow::Owned(format!("failed/{}", node(id))),
        Some((_, id)) => Cow::Borrowed(id),
        None => Cow::Borrowed(storage_key),
    }
}

/// Everything one applied index changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub index: u64,
    pub changes: Vec<Change>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    floor: u64,
}

/// What a reader resuming after `since` gets.
#[derive(Debug)]
pub enum Since {
    /// Every event after `since`, oldest first (possibly none yet).
    Events(Vec<Arc<Event>>),
    /// `since` is older than what is retained: the reader must resync.
    Gap { floor: u64 },
}

/// The node's change feed; see the module doc.
pub struct Hub {
    kinds: [watch::Sender<u64>; Kind::ALL.len()],
    latest: watch::Sender<u64>,
    ring: Mutex<Ring>,
    /// Set once when the node shuts down: waits end and streams close, so
    /// the API drains without waiting out minutes-long blocking queries.
    closed: watch::Sender<bool>,
}

fn lock(ring: &Mutex<Ring>) -> std::sync::MutexGuard<'_, Ring> {
    ring.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// A hub whose history starts at `applied` (the state machine's applied
    /// index when it opened).
    pub fn new(applied: u64) -> Self {
        Hub {
            kinds: std::array::from_fn(|_| watch::channel(applied).0),
            latest: watch::channel(applied).0,
            ring: Mutex::new(Ring {
                floor: applied,
                ..Ring::default()
            }),
            closed: watch::channel(false).0,
        }
    }

    /// Records what applying `index` changed (`(storage key, value)` pairs as
    /// the state machine wrote them; keys of no `Kind` are skipped) and wakes
    /// the waiters of every kind it touched.
    pub fn publish(&self, index: u64, changes: Vec<(String, Option<String>)>) {
        // Owned: the hub keeps these as they come (the state machine gives
        // the sled writer a copy of its own).
        let changes: Vec<Change> = changes
            .into_iter()
            .filter_map(|(key, value)| {
                Kind::of_storage_key(&key).map(|kind| Change { kind, key, value })
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        let mut touched = [false; Kind::ALL.len()];
        for c in &changes {
            touched[c.kind as usize] = true;
        }
        {
            let mut ring = lock(&self.ring);
            if index <= ring.floor || ring.events.back().is_some_and(|e| e.index >= index) {
                // Replays after a restart or reset: already covered by floor.
                return;
            }
            let size: usize = changes.iter().map(Change::bytes).sum();
            ring.bytes += size;
            ring.events.push_back(Arc::new(Event { index, changes }));
            while ring.events.len() > MAX_EVENTS
                || (ring.bytes > MAX_BYTES && ring.events.len() > 1)
            {
                if let Some(old) = ring.events.pop_front() {
                    ring.bytes -= old.changes.iter().map(Change::bytes).sum::<usize>();
                    ring.floor = ring.floor.max(old.index);
                }
            }
        }
        for kind in Kind::ALL {
            if touched[kind as usize] {
                self.kinds[kind as usize].send_if_modified(|v| bump(v, index));
            }
        }
        self.latest.send_if_modified(|v| bump(v, index));
    }

    /// A snapshot replaced the whole state at `index`: history before it is
    /// gone, and every waiter must look again.
    pub fn reset(&self, index: u64) {
        {
            let mut ring = lock(&self.ring);
            ring.events.clear();
            ring.bytes = 0;
            ring.floor = ring.floor.max(index);
        }
        for tx in &self.kinds {
            tx.send_if_modified(|v| bump(v, index));
        }
        self.latest.send_if_modified(|v| bump(v, index));
    }

    /// Ends every wait and stream (node shutdown).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once `close` has been called.
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        // The sender lives as long as the hub, which outlives this borrow.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Index of the last change of any of `kinds` (at least 1).
    pub fn index(&self, kinds: &[Kind]) -> u64 {
        kinds
            .iter()
            .map(|k| *self.kinds[*k as usize].borrow())
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// A receiver woken at every change of `kind`.
    pub fn subscribe(&self, kind: Kind) -> watch::Receiver<u64> {
        self.kinds[kind as usize].subscribe()
    }

    /// A receiver woken at every published change or reset.
    pub fn subscribe_all(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// The index of the last published change or reset.
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// The events after `since`, or a gap if some of them are no longer kept.
    pub fn since(&self, since: u64) -> Since {
        self.since_at_most(since, usize::MAX)
    }

    /// Like `since`, but at most the `max` oldest of those events: a stream
    /// that pulls in small batches holds (and keeps alive past eviction) only
    /// a batch, however far behind it is.
    pub fn since_at_most(&self, since: u64, max: usize) -> Since {
        let ring = lock(&self.ring);
        if since < ring.floor {
            return Since::Gap { floor: ring.floor };
        }
        let start = ring.events.partition_point(|e| e.index <= since);
        Since::Events(ring.events.range(start..).take(max).cloned().collect())
    }

    /// Waits until any of `kinds` changes past `index`, `deadline` passes
    /// or the hub closes; returns the kinds' index then.
    pub async fn wait(&self, kinds: &[Kind], index: u64, deadline: tokio::time::Instant) -> u64 {
        let mut rxs: Vec<watch::Receiver<u64>> = kinds.iter().map(|k| self.subscribe(*k)).collect();
        loop {
            let now = self.index(kinds);
            if now > index || self.is_closed() {
                return now;
            }
            tokio::select! {
                _ = futures_any(&mut rxs) => {}
                _ = self.closed() => {}
                _ = tokio::time::sleep_until(deadline) => return self.index(kinds),
            }
        }
    }
}

fn bump(v: &mut u64, index: u64) -> bool {
    if index > *v {
        *v = index;
        true
    } else {
        false
    }
}

/// Resolves when any receiver sees a new value. A receiver whose sender is
/// gone (only at shutdown) never resolves; the caller's deadline ends the
/// wait then.
async fn futures_any(rxs: &mut [watch::Receiver<u64>]) {
    // The futures live across polls so each keeps its waker registered.
    let mut futs: Vec<_> = rxs
        .iter_mut()
        .map(|rx| Some(Box::pin(rx.changed())))
        .collect();
    std::future::poll_fn(|cx| {
        for slot in futs.iter_mut() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(Ok(())) => return std::task::Poll::Ready(()),
                    // A finished future must not be polled again.
                    std::task::Poll::Ready(Err(_)) => *slot = None,
                    std::task::Poll::Pending => {}
                }
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(key: &str) -> (String, Option<String>) {
        (key.to_string(), Some("{}".into()))
    }

    #[test]
    fn kinds_advance_only_for_what_changed() {
        let hub = Hub::new(10);
        hub.publish(11, vec![ch("kv/a")]);
        assert_eq!(hub.index(&[Kind::Kv]), 11);
        assert_eq!(hub.index(&[Kind::Services]), 10);
        hub.publish(12, vec![ch("svc/web-1"), ch("chk/c")]);
        assert_eq!(hub.index(&[Kind::Services, Kind::Kv]), 12);
        assert_eq!(hub.index(&[Kind::Kv]), 11);
        // Keys of no kind (state-machine metadata) change nothing.
        hub.publish(13, vec![ch("meta/membership")]);
        assert_eq!(hub.latest(), 12);
    }

    #[test]
    fn since_returns_later_events_or_a_gap() {
        let hub = Hub::new(5);
        for i in 6..=9 {
            hub.publish(i, vec![ch(&format!("kv/k{i}"))]);
        }
        let Since::Events(ev) = hub.since(7) else {
            panic!("no gap expected");
        };
        assert_eq!(ev.iter().map(|e| e.index).collect::<Vec<_>>(), vec![8, 9]);
        assert!(matches!(hub.since(4), Since::Gap { floor: 5 }));
        let Since::Events(ev) = hub.since_at_most(6, 2) else {
            panic!("no gap expected");
        };
        assert_eq!(ev.iter().map(|e| e.index).collect::<Vec<_>>(), vec![7, 8]);
        hub.reset(20);
        assert!(matches!(hub.since(9), Since::Gap { floor: 20 }));
        assert_eq!(hub.index(&[Kind::Nodes]), 20);
    }

    #[test]
    fn eviction_raises_the_floor() {
        let hub = Hub::new(0);
        for i in 1..=(MAX_EVENTS as u64 + 10) {
            hub.publish(i, vec![ch("kv/x")]);
        }
        assert!(matches!(hub.since(5), Since::Gap { floor: 10 }));
        let Since::Events(ev) = hub.since(10) else {
            panic!("retained");
        };
        assert_eq!(ev.len(), MAX_EVENTS);
    }

    #[tokio::test]
    async fn wait_wakes_on_its_kind_and_times_out_otherwise() {
        let hub = Arc::new(Hub::new(1));
        let h = hub.clone();
        let waiter = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            h.wait(&[Kind::Kv], 1, deadline).await
        });
        hub.publish(2, vec![ch("svc/a")]);
        hub.publish(3, vec![ch("kv/a")]);
        assert_eq!(waiter.await.expect("joins"), 3);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        assert_eq!(hub.wait(&[Kind::Nodes], 1, deadline).await, 1);
    }
}
