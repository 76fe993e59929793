//! A bounded async FIFO between a stream's producers and its consumer,
//! with the definition's full-buffer `Policy`.
//!
//! Owns the queue, its close flag and its counters (`BufferStats`). Does
//! not know what an item is, where it goes or how long a producer may wait
//! (the caller passes `wait`, e.g. what is left of its request's timeout).
//!
//! Invariants:
//! - The queue never holds more than `capacity` items (at least 1): a full
//!   buffer either makes the producer wait (`Block`), refuses (`Reject`),
//!   evicts its oldest item (`DropOldest`) or drops the new one
//!   (`DropNewest`). Every item given to `push` is queued or counted in
//!   exactly one of `dropped_oldest` (later), `dropped_newest`, `rejected`,
//!   `timed_out`, or answered `Closed`.
//! - Items leave in the order they were accepted.
//! - After `close`, pushes answer `Closed`; pops drain what is queued, then
//!   answer 0. A pop answers 0 only then.
//!
//! Concurrency: one `std::sync::Mutex` around the queue and counters, held
//! only for short non-async sections (never across an await). Two `Notify`s
//! carry the wake-ups: consumers sleep on `not_empty`, blocked producers on
//! `not_full`. A waiter registers (`Notified::enable`) before it looks at
//! the queue, and wakers use `notify_waiters`, so no wake-up is lost and
//! every blocked producer retries whenever a pop makes room (fairness is
//! not promised: a producer may lose the race and wait again).
//! `push` and `pop_batch` are cancel safe: an item moves only inside a
//! locked section, never half-way across an await.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

use crate::registry::Policy;

/// What became of a pushed item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Accepted,
    /// Queued; the oldest item was evicted to make room (`DropOldest`).
    DroppedOldest,
    /// Not queued: the buffer was full (`DropNewest`).
    DroppedNewest,
    /// Not queued: the buffer was full (`Reject`).
    Rejected,
    /// Not queued: no room within the producer's wait (`Block`).
    TimedOut,
    /// Not queued: the buffer is closed.
    Closed,
}

impl Pushed {
    /// Whether the item is now in the buffer.
    pub fn queued(self) -> bool {
        matches!(self, Pushed::Accepted | Pushed::DroppedOldest)
    }
}

/// Counters since the buffer was made, plus its current depth.
#[derive(Serialize, Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BufferStats {
    /// Items queued (including those that evicted an older one).
    pub accepted: u64,
    /// Queued items evicted by newer ones (`DropOldest`).
    pub dropped_oldest: u64,
    /// New items dropped because the buffer was full (`DropNewest`).
    pub dropped_newest: u64,
    /// New items refused because the buffer was full (`Reject`).
    pub rejected: u64,
    /// New items dropped after waiting for room in vain (`Block`).
    pub timed_out: u64,
    /// Items queued now.
    pub depth: usize,
    pub capacity: usize,
    /// The most items ever queued at once.
    pub high_water: usize,
}

struct State<T> {
    queue: VecDeque<T>,
    closed: bool,
    /// `depth` is filled in by `stats()`; the rest is kept here.
    stats: BufferStats,
}

/// The outcome of one locked look at the queue by a producer.
enum Try<T> {
    /// Settled; the item to drop (the refused one or the evicted one), if
    /// any, is dropped by the caller outside the lock.
    Done(Pushed, Option<T>),
    /// Full under `Block`: the caller waits for room and tries again.
    Full(T),
}

/// A bounded FIFO; share it as `Arc<Buffer<T>>`.
pub struct Buffer<T> {
    /// The queue, the close flag and the counters; see the module docs.
    state: Mutex<State<T>>,
    /// Consumers sleep here until an item is queued or the buffer closes.
    not_empty: Notify,
    /// `Block` producers sleep here until a pop makes room or the buffer
    /// closes.
    not_full: Notify,
    capacity: usize,
    policy: Policy,
}

impl<T> Buffer<T> {
    /// A buffer of `capacity` items (0 is taken as 1, so a push can always
    /// succeed eventually).
    pub fn new(capacity: usize, policy: Policy) -> Self {
        let capacity = capacity.max(1);
        Buffer {
            state: Mutex::new(State {
                // Grows on demand up to `capacity`: most buffers stay far
                // below a large configured capacity.
                queue: VecDeque::new(),
                closed: false,
                stats: BufferStats {
                    capacity,
                    ..BufferStats::default()
                },
            }),
            not_empty: Notify::new(),
            not_full: Notify::new(),
            capacity,
            policy,
        }
    }

    /// The sections under this lock do not panic, so a poisoned lock still
    /// guards a consistent queue.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`, applying the policy when the buffer is full: `Block`
    /// waits for room up to `wait` (then `TimedOut`: the item is dropped
    /// and counted), `Reject` answers `Rejected`, `DropOldest` evicts the
    /// oldest item (counted) and queues this one, `DropNewest` drops this
    /// one (counted).
    pub async fn push(&self, item: T, wait: Duration) -> Pushed {
        let mut item = match self.try_push(item, false) {
            Try::Done(p, dropped) => return self.settled(p, dropped),
            Try::Full(item) => item,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.not_full.notified();
            tokio::pin!(notified);
            // Registered before looking, so a pop between the look and the
            // await still wakes this producer.
            notified.as_mut().enable();
            item = match self.try_push(item, false) {
                Try::Done(p, dropped) => return self.settled(p, dropped),
                Try::Full(item) => item,
            };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // Out of time; a last look, in case room was made just now.
                return match self.try_push(item, true) {
                    Try::Done(p, dropped) => self.settled(p, dropped),
                    Try::Full(_) => unreachable!("try_push gives up when told to"),
                };
            }
        }
    }

    /// One locked attempt; `give_up` turns a `Block` wait into `TimedOut`.
    fn try_push(&self, item: T, give_up: bool) -> Try<T> {
        let mut s = self.lock();
        if s.closed {
            return Try::Done(Pushed::Closed, Some(item));
        }
        let mut outcome = Pushed::Accepted;
        let mut evicted = None;
        if s.queue.len() >= self.capacity {
            match self.policy {
                Policy::Block if give_up => {
                    s.stats.timed_out += 1;
                    return Try::Done(Pushed::TimedOut, Some(item));
                }
                Policy::Block => return Try::Full(item),
                Policy::Reject => {
                    s.stats.rejected += 1;
                    return Try::Done(Pushed::Rejected, Some(item));
                }
                Policy::DropNewest => {
                    s.stats.dropped_newest += 1;
                    return Try::Done(Pushed::DroppedNewest, Some(item));
                }
                Policy::DropOldest => {
                    evicted = s.queue.pop_front();
                    s.stats.dropped_oldest += 1;
                    outcome = Pushed::DroppedOldest;
                }
            }
        }
        s.queue.push_back(item);
        s.stats.accepted += 1;
        s.stats.high_water = s.stats.high_water.max(s.queue.len());
        Try::Done(outcome, evicted)
    }

    /// Finishes a push outside the lock: drops what was not kept (an item
    /// may own a large value) and wakes consumers when something was queued.
    fn settled(&self, p: Pushed, dropped: Option<T>) -> Pushed {
        drop(dropped);
        if p.queued() {
            self.not_empty.notify_waiters();
        }
        p
    }

    /// Waits until at least one item is queued, then moves up to `max`
    /// (at least 1) of them, oldest first, to the end of `out`. Answers how
    /// many moved; 0 only once the buffer is closed and empty.
    pub async fn pop_batch(&self, max: usize, out: &mut Vec<T>) -> usize {
        let max = max.max(1);
        if let Some(n) = self.try_pop(max, out) {
            return n;
        }
        loop {
            let notified = self.not_empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(n) = self.try_pop(max, out) {
                return n;
            }
            notified.await;
        }
    }

    /// `Some(moved)`, or `None` when the consumer has to wait.
    fn try_pop(&self, max: usize, out: &mut Vec<T>) -> Option<usize> {
        let n = {
            let mut s = self.lock();
            if s.queue.is_empty() {
                return s.closed.then_some(0);
            }
            let n = max.min(s.queue.len());
            out.extend(s.queue.drain(..n));
            n
        };
        // Only `Block` producers ever wait for room.
        if self.policy == Policy::Block {
            self.not_full.notify_waiters();
        }
        Some(n)
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Refuses further pushes and wakes every waiter: blocked producers
    /// answer `Closed`, consumers drain what is left and then get 0.
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_full.notify_waiters();
        self.not_empty.notify_waiters();
    }

    pub fn stats(&self) -> BufferStats {
        let s = self.lock();
        BufferStats {
            depth: s.queue.len(),
            ..s.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const NO_WAIT: Duration = Duration::ZERO;
    const LONG: Duration = Duration::from_secs(10);

    async fn filled(policy: Policy) -> Buffer<u32> {
        let b = Buffer::new(3, policy);
        for i in 0..3 {
            assert_eq!(b.push(i, NO_WAIT).await, Pushed::Accepted);
        }
        b
    }

    async fn drain(b: &Buffer<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        while !b.is_empty() {
            b.pop_batch(100, &mut out).await;
        }
        out
    }

    #[tokio::test]
    async fn reject_refuses_and_counts() {
        let b = filled(Policy::Reject).await;
        assert_eq!(b.push(9, LONG).await, Pushed::Rejected);
        assert_eq!(drain(&b).await, vec![0, 1, 2]);
        let s = b.stats();
        assert_eq!((s.accepted, s.rejected, s.depth), (3, 1, 0));
        assert_eq!((s.capacity, s.high_water), (3, 3));
    }

    #[tokio::test]
    async fn drop_oldest_evicts_and_accepts() {
        let b = filled(Policy::DropOldest).await;
        assert_eq!(b.push(3, NO_WAIT).await, Pushed::DroppedOldest);
        assert_eq!(b.push(4, NO_WAIT).await, Pushed::DroppedOldest);
        assert_eq!(b.len(), 3);
        assert_eq!(drain(&b).await, vec![2, 3, 4]);
        let s = b.stats();
        assert_eq!((s.accepted, s.dropped_oldest, s.high_water), (5, 2, 3));
    }

    #[tokio::test]
    async fn drop_newest_drops_the_new_item() {
        let b = filled(Policy::DropNewest).await;
        assert_eq!(b.push(3, NO_WAIT).await, Pushed::DroppedNewest);
        assert_eq!(drain(&b).await, vec![0, 1, 2]);
        let s = b.stats();
        assert_eq!((s.accepted, s.dropped_newest), (3, 1));
    }

    #[tokio::test]
    async fn block_times_out_and_counts() {
        let b = filled(Policy::Block).await;
        assert_eq!(b.push(9, NO_WAIT).await, Pushed::TimedOut);
        let started = tokio::time::Instant::now();
        assert_eq!(b.push(9, Duration::from_millis(30)).await, Pushed::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(drain(&b).await, vec![0, 1, 2]);
        let s = b.stats();
        assert_eq!((s.accepted, s.timed_out), (3, 2));
    }

    #[tokio::test]
    async fn a_pop_releases_a_blocked_producer() {
        let b = Arc::new(filled(Policy::Block).await);
        let producer = tokio::spawn({
            let b = b.clone();
            async move { b.push(3, LONG).await }
        });
        // The producer is parked, not done (it cannot be: the buffer is full).
        tokio::task::yield_now().await;
        assert!(!producer.is_finished());
        let mut out = Vec::new();
        assert_eq!(b.pop_batch(1, &mut out).await, 1);
        let pushed = tokio::time::timeout(LONG, producer)
            .await
            .expect("released in time")
            .expect("producer task");
        assert_eq!(pushed, Pushed::Accepted);
        out.extend(drain(&b).await);
        assert_eq!(out, vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn pop_waits_for_an_item_and_takes_at_most_max() {
        let b = Arc::new(Buffer::new(10, Policy::Block));
        let consumer = tokio::spawn({
            let b = b.clone();
            async move {
                let mut out = Vec::new();
                let n = b.pop_batch(2, &mut out).await;
                (n, out)
            }
        });
        tokio::task::yield_now().await;
        assert!(!consumer.is_finished());
        b.push(7u32, NO_WAIT).await;
        let (n, out) = tokio::time::timeout(LONG, consumer)
            .await
            .expect("woken in time")
            .expect("consumer task");
        assert_eq!((n, out), (1, vec![7]));
        for i in 0..5 {
            b.push(i, NO_WAIT).await;
        }
        let mut out = Vec::new();
        assert_eq!(b.pop_batch(2, &mut out).await, 2);
        assert_eq!(b.pop_batch(0, &mut out).await, 1, "max 0 counts as 1");
        assert_eq!(out, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn close_wakes_everyone_and_drains() {
        let b = Arc::new(filled(Policy::Block).await);
        let blocked = tokio::spawn({
            let b = b.clone();
            async move { b.push(3, LONG).await }
        });
        let empty = Arc::new(Buffer::<u32>::new(1, Policy::Block));
        let waiting = tokio::spawn({
            let empty = empty.clone();
            async move { empty.pop_batch(1, &mut Vec::new()).await }
        });
        tokio::task::yield_now().await;
        b.close();
        empty.close();
        let pushed = tokio::time::timeout(LONG, blocked).await.expect("woken");
        assert_eq!(pushed.expect("task"), Pushed::Closed);
        let popped = tokio::time::timeout(LONG, waiting).await.expect("woken");
        assert_eq!(popped.expect("task"), 0);
        assert_eq!(b.push(4, NO_WAIT).await, Pushed::Closed);
        let mut out = Vec::new();
        assert_eq!(b.pop_batch(2, &mut out).await, 2);
        assert_eq!(b.pop_batch(2, &mut out).await, 1);
        assert_eq!(b.pop_batch(2, &mut out).await, 0);
        assert_eq!(out, vec![0, 1, 2]);
        assert_eq!(b.stats().accepted, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn depth_never_exceeds_capacity_under_concurrent_producers() {
        const PRODUCERS: u32 = 6;
        const EACH: u32 = 500;
        let b = Arc::new(Buffer::new(8, Policy::Block));
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let b = b.clone();
                tokio::spawn(async move {
                    for i in 0..EACH {
                        assert_eq!(b.push((p, i), LONG).await, Pushed::Accepted);
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        let mut batch = Vec::new();
        while got.len() < (PRODUCERS * EACH) as usize {
            assert!(b.len() <= 8);
            batch.clear();
            let n = tokio::time::timeout(LONG, b.pop_batch(3, &mut batch))
                .await
                .expect("producers keep producing");
            assert!(n <= 3);
            got.extend_from_slice(&batch);
        }
        for p in producers {
            p.await.expect("producer task");
        }
        let s = b.stats();
        assert!(s.high_water <= 8, "{s:?}");
        assert_eq!(s.accepted, u64::from(PRODUCERS * EACH));
        // Each producer's items come out in its order.
        for p in 0..PRODUCERS {
            let mine: Vec<u32> = got.iter().filter(|(q, _)| *q == p).map(|x| x.1).collect();
            assert_eq!(mine, (0..EACH).collect::<Vec<_>>());
        }
        // Drop policies keep the bound too.
        let d = Arc::new(Buffer::new(4, Policy::DropOldest));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let d = d.clone();
                tokio::spawn(async move {
                    for i in 0..1000u32 {
                        d.push(i, NO_WAIT).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("producer task");
        }
        let s = d.stats();
        assert_eq!((s.depth, s.high_water), (4, 4));
        assert_eq!(s.accepted - s.dropped_oldest, 4);
    }
}
