//! The node's stream runtime: one runner per replicated stream definition,
//! one delivery runner per service subscription, and the built-in sources.
//!
//! Owns the reconciliation of running streams with the applied registry
//! (`Kind::Streams` changes), ingestion (`ingest`), fan-out of pipeline
//! output to clients holding a stream open (`subscribe`) and to the
//! subscriptions' buffers, dead letters between streams, the `_registry`
//! and `_traffic` sources, and the stats. Does not process events
//! (`pipeline`), queue them (`buffer`) or POST them (`delivery`).
//!
//! Invariants:
//! - Per stream and node, events leave in the order they were accepted: one
//!   worker task pops the stream's buffer and runs the pipeline.
//! - Nothing is dropped silently: every event lost is counted with its
//!   reason (buffer policy, slow client, source backlog, unknown dead-letter
//!   stream), and SSE clients are told how many they missed.
//! - Everything is bounded: the stream's buffer, each subscription's
//!   buffer, each client's queue, the number of clients per stream, and
//!   every wait of a producer.
//! - A redefined stream keeps its buffered events: the old worker drains
//!   them through the old pipeline while new events go to the new one (per-
//!   node order holds across the switch only for events accepted after it).
//!   A redefined subscription takes over its predecessor's buffered events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::buffer::{Buffer, Pushed};
use super::delivery::SubscriptionRunner;
use super::pipeline::{Counters, DeadLetter, Input, Pipeline};
use crate::proxy::Proxy;
use crate::raft::state_machine::Shared;
use crate::registry::{Kind, Policy, Source, Stream, Subscription};
use crate::watch::Since;

/// A subscription's own buffer of output events.
type SubBuffer = Arc<Buffer<Arc<Value>>>;

/// Events a worker takes from its buffer per pipeline round.
const BATCH: usize = 256;
/// Events queued for one client holding a stream open; beyond, it loses
/// events (counted, and told).
pub const CLIENT_QUEUE: usize = 1024;
/// Clients one stream serves at once on a node.
pub const MAX_CLIENTS: usize = 256;
/// How long the worker waits for room in a `block` subscription's buffer
/// before counting the event as timed out there.
const SUBSCRIPTION_WAIT: Duration = Duration::from_secs(30);
/// How long a source or a dead letter waits for room in a `block` buffer.
const INTERNAL_WAIT: Duration = Duration::from_secs(1);
/// Registry changes a `_registry` source reads from the hub per round.
const REGISTRY_BATCH: usize = 256;
/// How long stopping waits for a worker to drain.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// What a subscription's own buffer does when full, given the stream's
/// policy. `block` and `reject` keep every event for every subscription: a
/// full subscription buffer holds the worker up, the stream's buffer fills,
/// and the producer waits or is refused, as its policy says. The drop
/// policies drop per subscription (counted there), so one slow subscriber
/// never holds up another.
fn subscription_policy(stream: Policy) -> Policy {
    match stream {
        Policy::Block | Policy::Reject => Policy::Block,
        drop => drop,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why events were not (all) taken.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no stream {0:?} on this node")]
    UnknownStream(String),
    /// `reject` policy and the buffer is full.
    #[error("stream {stream:?} is full ({accepted} of the events were accepted)")]
    Full { stream: String, accepted: u64 },
    /// `block` policy and no room came within the wait.
    #[error("stream {stream:?} stayed full ({accepted} of the events were accepted)")]
    TimedOut { stream: String, accepted: u64 },
    #[error("stream {0:?} is stopping")]
    Stopping(String),
}

/// What a successful ingest did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Ingested {
    /// Events now in the stream (`drop_oldest` counts the new one).
    pub accepted: u64,
    /// Events lost to the policy (`drop_oldest`: older ones; `drop_newest`:
    /// these).
    pub dropped: u64,
}

#[derive(Default)]
struct StreamStats {
    received: AtomicU64,
    out: AtomicU64,
    slow_client: AtomicU64,
    source_lost: AtomicU64,
    dead_letter_unknown: AtomicU64,
}

struct Client {
    id: u64,
    tx: mpsc::Sender<Arc<Value>>,
    lost: Arc<AtomicU64>,
}

#[derive(Default)]
struct Outputs {
    clients: Vec<Client>,
    next_client: u64,
    /// The buffers of this stream's service subscriptions (shared, so a
    /// batch takes them with one reference count).
    subs: Arc<[SubBuffer]>,
}

/// One generation of a running stream.
struct StreamRunner {
    def: Stream,
    input: Arc<Buffer<Input>>,
    stats: Arc<StreamStats>,
    counters: Arc<Mutex<Counters>>,
    outputs: Arc<Mutex<Outputs>>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A client's end of a stream (`GET /v1/streams/{name}/subscribe`).
pub struct ClientStream {
    pub rx: mpsc::Receiver<Arc<Value>>,
    /// Events this client missed because its queue was full.
    pub lost: Arc<AtomicU64>,
    id: u64,
    outputs: Weak<Mutex<Outputs>>,
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if let Some(o) = self.outputs.upgrade() {
            lock(&o).clients.retain(|c| c.id != self.id);
        }
    }
}

/// The node's streams; see the module doc.
pub struct Streams {
    shared: Arc<Shared>,
    proxy: Option<Arc<Proxy>>,
    client: reqwest::Client,
    stop: CancellationToken,
    running: Mutex<Running>,
    sync: Mutex<Option<JoinHandle<()>>>,
    /// Held across a reconcile so two never interleave.
    reconciling: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Running {
    streams: BTreeMap<String, Arc<StreamRunner>>,
    /// Stats carried across generations of a stream.
    stats: BTreeMap<String, (Arc<StreamStats>, Arc<Mutex<Counters>>)>,
    subs: BTreeMap<(String, String), SubscriptionRunner>,
}

impl Streams {
    /// Starts running the applied stream definitions and following their
    /// changes. Must be called inside tokio.
    pub fn start(shared: Arc<Shared>, proxy: Option<Arc<Proxy>>) -> anyhow::Result<Arc<Self>> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            // Instance traffic goes straight to the instance, never through
            // an HTTP_PROXY from the environment.
            .no_proxy()
            .build()?;
        let streams = Arc::new(Streams {
            shared,
            proxy,
            client,
            stop: CancellationToken::new(),
            running: Mutex::new(Running::default()),
            sync: Mutex::new(None),
            reconciling: tokio::sync::Mutex::new(()),
        });
        let task = tokio::spawn(sync_loop(Arc::downgrade(&streams), streams.stop.clone()));
        *lock(&streams.sync) = Some(task);
        Ok(streams)
    }

    /// Brings the running streams and subscriptions in line with the
    /// applied registry.
    async fn reconcile(self: &Arc<Self>) {
        let _one = self.reconciling.lock().await;
        let (defs, subs): (Vec<Stream>, Vec<Subscription>) = {
            let reg = self.shared.read();
            let defs: Vec<Stream> = reg.streams().cloned().collect();
            let subs = defs
                .iter()
                .flat_map(|s| reg.subscriptions_of(&s.name).cloned().collect::<Vec<_>>())
                .collect();
            (defs, subs)
        };
        let mut retired: Vec<Arc<StreamRunner>> = Vec::new();
        // Stopped runners, each with its successor's buffer if it has one.
        let mut stopped_subs: Vec<(Option<SubBuffer>, SubscriptionRunner)> = Vec::new();
        {
            let mut run = lock(&self.running);
            let wanted: BTreeMap<&str, &Stream> =
                defs.iter().map(|d| (d.name.as_str(), d)).collect();
            let gone: Vec<String> = run
                .streams
                .keys()
                .filter(|n| !wanted.contains_key(n.as_str()))
                .cloned()
                .collect();
            for name in gone {
                if let Some(r) = run.streams.remove(&name) {
                    retired.push(r);
                }
                run.stats.remove(&name);
            }
            for def in &defs {
                let current = run.streams.get(&def.name);
                if current.is_some_and(|r| r.def.modify_index == def.modify_index) {
                    continue;
                }
                let pipeline = match Pipeline::compile(&def.def) {
                    Ok(p) => p,
                    Err(e) => {
                        // The API compiles before proposing, so this is a
                        // definition from a newer version; run nothing.
                        tracing::error!(stream = %def.name, error = %e, "stream does not compile");
                        continue;
                    }
                };
                let (stats, counters) = run
                    .stats
                    .entry(def.name.clone())
                    .or_insert_with(|| (Arc::default(), Arc::default()))
                    .clone();
                let runner = self.spawn_stream(def.clone(), pipeline, stats, counters);
                if let Some(old) = run.streams.insert(def.name.clone(), runner) {
                    retired.push(old);
                }
            }
            // Subscriptions: new ones start, changed ones (or ones whose
            // stream changed policy) restart, removed ones stop.
            let wanted_subs: BTreeMap<(String, String), &Subscription> = subs
                .iter()
                .map(|s| ((s.stream.clone(), s.name.clone()), s))
                .collect();
            let keys: Vec<(String, String)> = run.subs.keys().cloned().collect();
            for key in keys {
                let policy = run
                    .streams
                    .get(&key.0)
                    .map(|r| subscription_policy(r.def.def.buffer.policy));
                let keep = wanted_subs.get(&key).is_some_and(|s| {
                    run.subs.get(&key).is_some_and(|r| {
                        r.def().modify_index == s.modify_index
                            && Some(r.buffer().policy()) == policy
                    })
                });
                if !keep {
                    if let Some(r) = run.subs.remove(&key) {
                        stopped_subs.push((None, r));
                    }
                }
            }
            for (key, sub) in &wanted_subs {
                if run.subs.contains_key(key) {
                    continue;
                }
                let Some(stream) = run.streams.get(&key.0) else {
                    continue;
                };
                let runner = SubscriptionRunner::spawn(
                    (*sub).clone(),
                    subscription_policy(stream.def.def.buffer.policy),
                    self.shared.clone(),
                    self.client.clone(),
                    self.stop.child_token(),
                );
                // A predecessor's queued events move to its successor.
                if let Some(old) = stopped_subs.iter_mut().find(|(to, r)| {
                    to.is_none() && r.def().stream == key.0 && r.def().name == key.1
                }) {
                    old.0 = Some(runner.buffer().clone());
                }
                run.subs.insert(key.clone(), runner);
            }
            for stream in run.streams.values() {
                let mine: Vec<SubBuffer> = run
                    .subs
                    .iter()
                    .filter(|((s, _), _)| *s == stream.def.name)
                    .map(|(_, r)| r.buffer().clone())
                    .collect();
                lock(&stream.outputs).subs = mine.into();
            }
        }
        for (successor, old) in stopped_subs {
            let buf = old.buffer().clone();
            old.stop().await;
            if let Some(to) = successor {
                let mut moved = Vec::new();
                while buf.pop_batch(BATCH, &mut moved).await > 0 {
                    for e in moved.drain(..) {
                        to.push(e, INTERNAL_WAIT).await;
                    }
                }
            }
        }
        for old in retired {
            old.retire().await;
        }
    }

    fn spawn_stream(
        self: &Arc<Self>,
        def: Stream,
        pipeline: Pipeline,
        stats: Arc<StreamStats>,
        counters: Arc<Mutex<Counters>>,
    ) -> Arc<StreamRunner> {
        let buffer = def.def.buffer;
        let runner = Arc::new(StreamRunner {
            def,
            input: Arc::new(Buffer::new(buffer.capacity, buffer.policy)),
            stats,
            counters,
            outputs: Arc::default(),
            stop: self.stop.child_token(),
            tasks: Mutex::new(Vec::new()),
        });
        let worker = tokio::spawn(work(runner.clone(), pipeline, Arc::downgrade(self)));
        let mut tasks = vec![worker];
        match runner.def.def.source {
            Some(Source::Registry) => {
                tasks.push(tokio::spawn(registry_source(
                    runner.clone(),
                    self.shared.clone(),
                )));
            }
            Some(Source::Traffic) => match &self.proxy {
                Some(p) => tasks.push(tokio::spawn(traffic_source(runner.clone(), p.traffic()))),
                None => tracing::warn!(stream = %runner.def.name,
                    "a _traffic stream on a node without a proxy (--proxy-addr) sees no events"),
            },
            None => {}
        }
        *lock(&runner.tasks) = tasks;
        runner
    }

    fn runner(&self, name: &str) -> Option<Arc<StreamRunner>> {
        lock(&self.running).streams.get(name).cloned()
    }

    /// Whether `name` runs on this node.
    pub fn has(&self, name: &str) -> bool {
        self.runner(name).is_some()
    }

    /// Offers `events` to stream `name` in order, applying its buffer
    /// policy; a `block` stream waits at most `wait` in all.
    pub async fn ingest(
        &self,
        name: &str,
        events: Vec<Input>,
        wait: Duration,
    ) -> Result<Ingested, IngestError> {
        let runner = self
            .runner(name)
            .ok_or_else(|| IngestError::UnknownStream(name.to_string()))?;
        runner.offer(events, wait).await
    }

    /// A queue of the stream's output events for one client, or `None` if
    /// the stream does not run here; `Err` when the stream has its most
    /// clients.
    pub fn subscribe(&self, name: &str) -> Option<Result<ClientStream, IngestError>> {
        let runner = self.runner(name)?;
        let mut out = lock(&runner.outputs);
        if out.clients.len() >= MAX_CLIENTS {
            return Some(Err(IngestError::Full {
                stream: name.to_string(),
                accepted: 0,
            }));
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        out.next_client += 1;
        let id = out.next_client;
        let lost = Arc::new(AtomicU64::new(0));
        out.clients.push(Client {
            id,
            tx,
            lost: lost.clone(),
        });
        Some(Ok(ClientStream {
            rx,
            lost,
            id,
            outputs: Arc::downgrade(&runner.outputs),
        }))
    }

    /// `GET /v1/streams/{name}/stats` on this node.
    pub fn stats(&self, name: &str) -> Option<Value> {
        let run = lock(&self.running);
        let r = run.streams.get(name)?;
        let c = *lock(&r.counters);
        let b = r.input.stats();
        let s = &r.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let clients = lock(&r.outputs).clients.len();
        let subs: serde_json::Map<String, Value> = run
            .subs
            .iter()
            .filter(|((st, _), _)| *st == r.def.name)
            .map(|((_, n), sub)| (n.clone(), sub.stats_json()))
            .collect();
        Some(json!({
            "stream": r.def.name,
            "modify_index": r.def.modify_index,
            "source": r.def.def.source,
            "received": load(&s.received),
            "accepted": b.accepted,
            "out": load(&s.out),
            "filtered": c.filtered,
            "parse_errors": c.parse_errors,
            "expr_errors": c.expr_errors,
            "dead_lettered": c.dead_lettered,
            "window_skipped": c.window_skipped,
            "window_overflow": c.window_overflow,
            "dropped": {
                "buffer_oldest": b.dropped_oldest,
                "buffer_newest": b.dropped_newest,
                "rejected": b.rejected,
                "timed_out": b.timed_out,
                "slow_client": load(&s.slow_client),
                "source_lost": load(&s.source_lost),
                "dead_letter_unknown": load(&s.dead_letter_unknown),
            },
            "buffer": {
                "policy": r.def.def.buffer.policy,
                "depth": b.depth,
                "capacity": b.capacity,
                "high_water": b.high_water,
            },
            "clients": clients,
            "subscriptions": subs,
            "node_view_index": self.shared.hub().index(&[Kind::Streams]),
        }))
    }

    /// Stops every stream and subscription: producers are refused, workers
    /// drain what is buffered (bounded by `STOP_WAIT`), clients' streams
    /// end.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = lock(&self.sync).take();
        if let Some(t) = task {
            let _ = t.await;
        }
        let (streams, subs) = {
            let mut run = lock(&self.running);
            (
                std::mem::take(&mut run.streams),
                std::mem::take(&mut run.subs),
            )
        };
        for r in streams.into_values() {
            r.retire().await;
        }
        for s in subs.into_values() {
            s.stop().await;
        }
    }
}

impl StreamRunner {
    async fn offer(&self, events: Vec<Input>, wait: Duration) -> Result<Ingested, IngestError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut done = Ingested::default();
        for ev in events {
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.input.push(ev, left).await {
                Pushed::Accepted => done.accepted += 1,
                Pushed::DroppedOldest => {
                    done.accepted += 1;
                    done.dropped += 1;
                }
                Pushed::DroppedNewest => done.dropped += 1,
                Pushed::Rejected => {
                    return Err(IngestError::Full {
                        stream: self.def.name.clone(),
                        accepted: done.accepted,
                    })
                }
                Pushed::TimedOut => {
                    return Err(IngestError::TimedOut {
                        stream: self.def.name.clone(),
                        accepted: done.accepted,
                    })
                }
                Pushed::Closed => return Err(IngestError::Stopping(self.def.name.clone())),
            }
        }
        Ok(done)
    }

    /// Stops taking events; the worker drains the buffer, then ends.
    async fn retire(&self) {
        self.input.close();
        // Sources stop now; the worker ends once it has drained the buffer.
        self.stop.cancel();
        // Clients of this generation end with it.
        lock(&self.outputs).clients.clear();
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(STOP_WAIT, t).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Hands output events to clients and subscriptions.
    async fn publish(&self, out: &mut Vec<Value>) {
        if out.is_empty() {
            return;
        }
        let events: Vec<Arc<Value>> = out.drain(..).map(Arc::new).collect();
        self.stats
            .out
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let subs = {
            let mut o = lock(&self.outputs);
            o.clients.retain(|c| {
                for e in &events {
                    match c.tx.try_send(e.clone()) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            c.lost.fetch_add(1, Ordering::Relaxed);
                            self.stats.slow_client.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    }
                }
                true
            });
            o.subs.clone()
        };
        for buf in subs.iter() {
            for e in &events {
                // The buffer counts what its policy drops.
                buf.push(e.clone(), SUBSCRIPTION_WAIT).await;
            }
        }
    }

    async fn dead_letters(&self, dead: &mut Vec<DeadLetter>, streams: &Weak<Streams>) {
        if dead.is_empty() {
            return;
        }
        let Some(streams) = streams.upgrade() else {
            dead.clear();
            return;
        };
        for d in dead.drain(..) {
            match streams.runner(&d.stream) {
                Some(to) => {
                    // The receiving stream counts what its policy drops.
                    let _ = to.offer(vec![Input::Json(d.event)], INTERNAL_WAIT).await;
                }
                None => {
                    self.stats
                        .dead_letter_unknown
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The stream's one worker: buffer → pipeline → outputs, plus the timer
/// that closes time windows.
async fn work(runner: Arc<StreamRunner>, mut pipeline: Pipeline, streams: Weak<Streams>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::new();
    let mut dead = Vec::new();
    loop {
        let due = pipeline.next_deadline();
        let wake = async {
            match due {
                Some(ms) => {
                    let wait = ms.saturating_sub(now_ms());
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let popped = tokio::select! {
            n = runner.input.pop_batch(BATCH, &mut batch) => Some(n),
            _ = wake => None,
        };
        let now = now_ms();
        pipeline.tick(now, &mut out, &mut dead);
        // An empty pop means the input closed: what the last tick produced
        // (results and dead letters alike) still goes out before we stop.
        let closed = popped == Some(0);
        for ev in batch.drain(..) {
            pipeline.push(ev, now, &mut out, &mut dead);
        }
        runner.publish(&mut out).await;
        runner.dead_letters(&mut dead, &streams).await;
        *lock(&runner.counters) = pipeline.counters();
        if closed {
            break;
        }
    }
}

/// `_registry`: every committed change this node applies, one event per
/// changed key: `{index, kind, key, op: "set"|"delete", value}`.
async fn registry_source(runner: Arc<StreamRunner>, shared: Arc<Shared>) {
    let hub = shared.hub();
    let mut latest = hub.subscribe_all();
    let mut cursor = *latest.borrow_and_update();
    loop {
        let events = match hub.since_at_most(cursor, REGISTRY_BATCH) {
            Since::Events(ev) => ev,
            Since::Gap { floor } => {
                // Fell behind the hub's history: what was evicted is lost.
                runner
                    .stats
                    .source_lost
                    .fetch_add(floor.saturating_sub(cursor), Ordering::Relaxed);
                cursor = floor;
                continue;
            }
        };
        if events.is_empty() {
            tokio::select! {
                changed = latest.changed() => if changed.is_err() { return },
                _ = runner.stop.cancelled() => return,
            }
            continue;
        }
        for ev in events {
            cursor = ev.index;
            let batch: Vec<Input> = ev
                .changes
                .iter()
                .map(|c| {
                    let key = crate::watch::wire_key(&c.key);
                    let value = c
                        .value
                        .as_deref()
                        .and_then(|v| serde_json::from_str::<Value>(v).ok());
                    Input::Json(json!({
                        "index": ev.index,
                        "kind": c.kind.as_str(),
                        "key": key,
                        "op": if c.value.is_some() { "set" } else { "delete" },
                        "value": value,
                    }))
                })
                .collect();
            if let Err(e) = runner.offer(batch, INTERNAL_WAIT).await {
                if matches!(e, IngestError::Stopping(_)) {
                    return;
                }
            }
        }
    }
}

/// `_traffic`: one event per request through this node's proxy.
async fn traffic_source(runner: Arc<StreamRunner>, mut rx: broadcast::Receiver<Arc<Value>>) {
    loop {
        let got = tokio::select! {
            r = rx.recv() => r,
            _ = runner.stop.cancelled() => return,
        };
        match got {
            Ok(ev) => {
                let ev = Input::Json((*ev).clone());
                if let Err(IngestError::Stopping(_)) = runner.offer(vec![ev], INTERNAL_WAIT).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                runner.stats.source_lost.fetch_add(n, Ordering::Relaxed);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn sync_loop(streams: Weak<Streams>, stop: CancellationToken) {
    let Some(mut changed) = streams
        .upgrade()
        .map(|s| s.shared.hub().subscribe(Kind::Streams))
    else {
        return;
    };
    loop {
        match streams.upgrade() {
            Some(s) => s.reconcile().await,
            None => return,
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}
