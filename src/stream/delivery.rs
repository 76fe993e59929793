//! Delivery of a stream's events to a registered service: one task per
//! subscription, draining the subscription's own `Buffer` and POSTing
//! batches to the service's passing instances.
//!
//! Owns `SubscriptionRunner` (the task, its buffer, its stop token) and its
//! `DeliveryStats`. Does not run pipelines or decide which events reach the
//! buffer (`pipeline` pushes them), does not build the HTTP client (the
//! caller passes one with its timeouts) and never writes to Raft: targets
//! are read from the node's applied `Registry`.
//!
//! Invariants:
//! - Targets are the instances of `service` that are passing and carry
//!   every tag the subscription names (as the proxy picks upstreams; an
//!   instance without an address is reached at its node's IP), resolved
//!   from the applied registry at delivery time, for every batch and every
//!   retry, so delivery follows failover.
//! - At least once: while the runner runs, a popped batch is never dropped;
//!   it is retried until some instance (`one`) or every still-passing
//!   target (`all`) answers 2xx. An instance may see a batch twice (it was
//!   processed but the answer was lost or late).
//! - Order: batches leave one at a time, in buffer order; the next batch is
//!   popped only once the previous one is done.
//! - Every network wait is bounded by `ATTEMPT_TIMEOUT`; every retry round
//!   waits `Backoff` (50 ms doubling to 2 s), cut short by a registry
//!   change, but never re-resolves more often than every `MIN_RESOLVE`.
//! - `delivered` counts events acknowledged, once per acknowledging
//!   instance (so under `all` a batch of 3 to 2 instances counts 6);
//!   `batches` counts finished batches, once each.
//!
//! Concurrency: one tokio task per runner; under `all` the attempts of one
//! round run concurrently in a `JoinSet` (aborted when the runner stops).
//! No lock is held across an await: the registry guard lives only inside
//! `targets`. Stopping cancels a child of the caller's token and closes the
//! buffer; the in-flight attempt is abandoned at once (the instance may
//! still process it).
//!
//! Failure behaviour: a failed attempt is counted, remembered as
//! `last_error` and logged: at warn at most once per `WARN_EVERY` (saying
//! how many failures went to debug since), otherwise at debug. An instance that failed is avoided by `one` for `COOL_OFF`
//! while another passing instance is untried, so a dead instance does not
//! cost every other batch a failed attempt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::buffer::Buffer;
use crate::proxy::balance::{self, Candidate};
use crate::proxy::upstream::passing_instances;
use crate::raft::state_machine::Shared;
use crate::registry::{Balancer, Delivery, Policy, Subscription};

/// Bound on one POST: connect, send and the response head.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause after a round in which every target failed (or none existed).
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest pause between rounds.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Least time between two resolutions while waiting, however often the
/// registry changes (a busy cluster applies thousands of entries a second).
pub const MIN_RESOLVE: Duration = Duration::from_millis(20);
/// How long `one` avoids an instance after it failed, while others remain.
pub const COOL_OFF: Duration = Duration::from_secs(5);
/// Most one warn per this long for a run of failures.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Counters of one runner. `delivered` and `batches`: see the module
/// invariants; `retried`: attempts that repeat a batch (to another or the
/// same instance); `failed`: attempts that failed.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub delivered: AtomicU64,
    pub batches: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
    /// The latest failure, "instance: reason".
    pub last_error: Mutex<Option<String>>,
    /// The instance that acknowledged the latest batch.
    pub last_instance: Mutex<Option<String>>,
}

impl DeliveryStats {
    fn set(slot: &Mutex<Option<String>>, v: String) {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }

    fn get(slot: &Mutex<Option<String>>) -> Option<String> {
        slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A running subscription; see the module docs.
pub struct SubscriptionRunner {
    sub: Subscription,
    buffer: Arc<Buffer<Arc<Value>>>,
    stats: Arc<DeliveryStats>,
    /// Events popped and not yet done (the batch in flight), for stats.
    pending: Arc<AtomicUsize>,
    /// A child of the caller's token: `stop` ends this runner only.
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl SubscriptionRunner {
    /// Starts delivering `sub`'s events from its own buffer (capacity
    /// `sub.def.capacity`, the stream's `policy`) to the passing instances
    /// of `sub.def.service`, resolved from `shared` at delivery time. Runs
    /// until `stop` (this runner's or the caller's token), or until the
    /// buffer is closed and drained. Must be called inside a tokio runtime.
    pub fn spawn(
        sub: Subscription,
        policy: Policy,
        shared: Arc<Shared>,
        client: reqwest::Client,
        stop: CancellationToken,
    ) -> Self {
        let buffer = Arc::new(Buffer::new(sub.def.capacity, policy));
        let stats = Arc::new(DeliveryStats::default());
        let pending = Arc::new(AtomicUsize::new(0));
        let stop = stop.child_token();
        let span = tracing::info_span!("subscription", stream = %sub.stream, name = %sub.name);
        let task = Task {
            applied: shared.subscribe_applied(),
            shared,
            client,
            sub: sub.clone(),
            buffer: buffer.clone(),
            stats: stats.clone(),
            pending: pending.clone(),
            stop: stop.clone(),
            rr: AtomicUsize::new(0),
            cooling: HashMap::new(),
            warn: WarnLimiter::default(),
        };
        let task = tokio::spawn(task.run().instrument(span));
        SubscriptionRunner {
            sub,
            buffer,
            stats,
            pending,
            stop,
            task,
        }
    }

    /// Where the pipeline pushes this subscription's events.
    pub fn buffer(&self) -> &Arc<Buffer<Arc<Value>>> {
        &self.buffer
    }

    pub fn def(&self) -> &Subscription {
        &self.sub
    }

    /// `{"delivered", "delivered_counts", "batches", "retried", "failed",
    /// "pending", "last_error", "last_instance", "buffer"}`.
    pub fn stats_json(&self) -> Value {
        let s = &self.stats;
        json!({
            "delivered": s.delivered.load(Ordering::Relaxed),
            "delivered_counts": "events acknowledged, once per acknowledging instance",
            "batches": s.batches.load(Ordering::Relaxed),
            "retried": s.retried.load(Ordering::Relaxed),
            "failed": s.failed.load(Ordering::Relaxed),
            "pending": self.pending.load(Ordering::Relaxed),
            "last_error": DeliveryStats::get(&s.last_error),
            "last_instance": DeliveryStats::get(&s.last_instance),
            "buffer": self.buffer.stats(),
        })
    }

    /// Stops the task: closes the buffer (pushes answer `Closed`) and
    /// abandons the in-flight attempt and whatever is still buffered.
    pub async fn stop(mut self) {
        self.buffer.close();
        self.stop.cancel();
        if let Err(e) = (&mut self.task).await {
            if e.is_panic() {
                tracing::error!(stream = %self.sub.stream, name = %self.sub.name,
                    "delivery task panicked: {e}");
            }
        }
    }
}

impl Drop for SubscriptionRunner {
    /// A runner dropped without `stop` must not deliver on unsupervised.
    fn drop(&mut self) {
        self.buffer.close();
        self.stop.cancel();
    }
}

/// One target of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    id: String,
    addr: String,
}

impl Candidate for &Target {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_flight(&self) -> i64 {
        0
    }
    fn weight(&self) -> u32 {
        1
    }
}

/// The runner was stopped.
struct Stopped;

#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(BACKOFF_MIN)
    }

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (d * 2).min(BACKOFF_MAX);
        d
    }
}

/// At most one warn per `WARN_EVERY`; the failures in between go to debug
/// and are counted in the next warn.
#[derive(Debug, Default)]
struct WarnLimiter {
    last: Option<Instant>,
    quiet: u64,
    /// A failure since the last success.
    failing: bool,
}

impl WarnLimiter {
    fn failed(&mut self, instance: &str, addr: &str, events: usize, err: &str) {
        self.failing = true;
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            tracing::warn!(
                instance,
                addr,
                events,
                quiet_failures = self.quiet,
                "delivery failed: {err}"
            );
            self.last = Some(now);
            self.quiet = 0;
        } else {
            tracing::debug!(instance, addr, events, "delivery failed: {err}");
            self.quiet += 1;
        }
    }

    fn succeeded(&mut self, instance: &str) {
        if std::mem::take(&mut self.failing) {
            tracing::debug!(instance, "delivered after earlier failures");
        }
    }
}

struct Task {
    shared: Arc<Shared>,
    /// Wakes waits when the applied registry changes.
    applied: watch::Receiver<u64>,
    client: reqwest::Client,
    sub: Subscription,
    buffer: Arc<Buffer<Arc<Value>>>,
    stats: Arc<DeliveryStats>,
    pending: Arc<AtomicUsize>,
    stop: CancellationToken,
    /// Round-robin turn for `one`.
    rr: AtomicUsize,
    /// `one`: instance ID → until when to avoid it. Bounded by the number
    /// of instances that failed within `COOL_OFF`.
    cooling: HashMap<String, Instant>,
    warn: WarnLimiter,
}

impl Task {
    async fn run(mut self) {
        let mut batch: Vec<Arc<Value>> = Vec::new();
        loop {
            // Events wait in the buffer (where its policy applies) rather
            // than in a batch while there is nobody to deliver to.
            if self.await_targets().await.is_err() {
                return;
            }
            batch.clear();
            let n = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                n = self.buffer.pop_batch(self.sub.def.batch, &mut batch) => n,
            };
            if n == 0 {
                tracing::debug!("buffer closed and drained");
                return;
            }
            self.pending.store(n, Ordering::Relaxed);
            let events: Vec<&Value> = batch.iter().map(|e| &**e).collect();
            let body =
                Bytes::from(serde_json::to_vec(&events).expect("a JSON value always serializes"));
            let done = match self.sub.def.delivery {
                Delivery::One => self.deliver_one(&body, n).await,
                Delivery::All => self.deliver_all(&body, n).await,
            };
            self.pending.store(0, Ordering::Relaxed);
            if done.is_err() {
                return;
            }
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The passing, tagged instances of the service, by ID.
    fn targets(&mut self) -> Vec<Target> {
        // Changes from here on wake the next `pause`.
        self.applied.mark_unchanged();
        let def = &self.sub.def;
        let reg = self.shared.read();
        let mut out: Vec<Target> = passing_instances(&reg, &def.service, &def.tags)
            .map(|(s, addr)| Target {
                id: s.spec.id.to_string(),
                addr,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Returns once some target exists.
    async fn await_targets(&mut self) -> Result<(), Stopped> {
        let mut backoff = Backoff::new();
        while self.targets().is_empty() {
            self.pause(backoff.next()).await?;
        }
        Ok(())
    }

    /// Waits `d`, or less when the applied registry changes (but at least
    /// `MIN_RESOLVE`).
    async fn pause(&mut self, d: Duration) -> Result<(), Stopped> {
        let start = Instant::now();
        let changed = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Err(Stopped),
            _ = tokio::time::sleep(d) => return Ok(()),
            r = self.applied.changed() => r.is_ok(),
        };
        // Sender gone (the state machine is shutting down): plain sleep.
        let until = start + if changed { MIN_RESOLVE.min(d) } else { d };
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => Err(Stopped),
            _ = tokio::time::sleep_until(until) => Ok(()),
        }
    }

    /// `one`: the batch to one passing instance; on failure straight to
    /// another untried one, backing off only once all have failed.
    async fn deliver_one(&mut self, body: &Bytes, n: usize) -> Result<(), Stopped> {
        let mut failed: Vec<String> = Vec::new();
        let mut backoff = Backoff::new();
        let mut attempts = 0u64;
        loop {
            let all = self.targets();
            let fresh: Vec<&Target> = all.iter().filter(|t| !failed.contains(&t.id)).collect();
            if fresh.is_empty() {
                // None passing, or every one failed this batch: start over.
                failed.clear();
                self.pause(backoff.next()).await?;
                continue;
            }
            let now = Instant::now();
            self.cooling.retain(|_, until| *until > now);
            let warm: Vec<&Target> = fresh
                .iter()
                .copied()
                .filter(|t| !self.cooling.contains_key(&t.id))
                .collect();
            let from = if warm.is_empty() { fresh } else { warm };
            let i = balance::pick(Balancer::RoundRobin, &from, None, &self.rr)
                .expect("pick answers an index into a non-empty list");
            let target = from[i].clone();
            if attempts > 0 {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            attempts += 1;
            let attempt = attempt(&self.client, &target, &self.sub.def.path, body.clone(), n);
            let result = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Err(Stopped),
                r = attempt => r,
            };
            match result {
                Ok(()) => {
                    self.acknowledged(&target, n);
                    self.cooling.remove(&target.id);
                    return Ok(());
                }
                Err(e) => {
                    self.failed(&target, n, &e);
                    self.cooling
                        .insert(target.id.clone(), Instant::now() + COOL_OFF);
                    failed.push(target.id);
                }
            }
        }
    }

    /// `all`: the batch to every target passing when it starts; failed
    /// ones are retried (with backoff) while they stay passing.
    async fn deliver_all(&mut self, body: &Bytes, n: usize) -> Result<(), Stopped> {
        let mut backoff = Backoff::new();
        let mut pending = self.targets();
        while pending.is_empty() {
            self.pause(backoff.next()).await?;
            pending = self.targets();
        }
        let mut first = true;
        // Whether any instance has the batch: until one has, targets that
        // stop passing are replaced by whoever passes now, so a batch is
        // never finished undelivered.
        let mut acked = false;
        loop {
            let mut round = JoinSet::new();
            // Task → target, so a task that panicked is retried as failed
            // rather than counted done.
            let mut of_task = HashMap::new();
            for t in &pending {
                if !first {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                }
                let client = self.client.clone();
                let (path, body) = (self.sub.def.path.clone(), body.clone());
                let task_t = t.clone();
                let h = round.spawn(async move { attempt(&client, &task_t, &path, body, n).await });
                of_task.insert(h.id(), t.clone());
            }
            first = false;
            let mut still = Vec::new();
            loop {
                let joined = tokio::select! {
                    biased;
                    // Dropping `round` aborts the attempts.
                    _ = self.stop.cancelled() => return Err(Stopped),
                    j = round.join_next_with_id() => j,
                };
                let (id, result) = match joined {
                    None => break,
                    Some(Ok((id, r))) => (id, r),
                    Some(Err(e)) => (e.id(), Err(format!("delivery task failed: {e}"))),
                };
                let Some(t) = of_task.remove(&id) else {
                    continue;
                };
                match result {
                    Ok(()) => {
                        self.acknowledged(&t, n);
                        acked = true;
                    }
                    Err(e) => {
                        self.failed(&t, n, &e);
                        still.push(t);
                    }
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            self.pause(backoff.next()).await?;
            // Keep only targets still passing, at their current address.
            let now: Vec<Target> = self.targets();
            pending = still
                .into_iter()
                .filter_map(|t| now.iter().find(|c| c.id == t.id).cloned())
                .collect();
            if pending.is_empty() {
                if acked {
                    return Ok(());
                }
                pending = now;
                while pending.is_empty() {
                    self.pause(backoff.next()).await?;
                    pending = self.targets();
                }
            }
        }
    }

    fn acknowledged(&mut self, t: &Target, n: usize) {
        self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
        DeliveryStats::set(&self.stats.last_instance, t.id.clone());
        self.warn.succeeded(&t.id);
    }

    fn failed(&mut self, t: &Target, n: usize, err: &str) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        DeliveryStats::set(&self.stats.last_error, format!("{}: {err}", t.id));
        self.warn.failed(&t.id, &t.addr, n, err);
    }
}

/// POSTs one batch to one instance, bounded by `ATTEMPT_TIMEOUT`. `Ok` on
/// a 2xx answer.
async fn attempt(
    client: &reqwest::Client,
    t: &Target,
    path: &str,
    body: Bytes,
    events: usize,
) -> Result<(), String> {
    let url = format!("http://{}{}", t.addr, path);
    let span = tracing::debug_span!("deliver", instance = %t.id, addr = %t.addr, events);
    let post = async {
        let resp = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| crate::health::probe::error_chain(&e))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, post.instrument(span)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::buffer::Pushed;
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicU16};

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::Json;
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload};

    use crate::raft::log_store::Syncer;
    use crate::raft::state_machine::StateMachineStore;
    use crate::raft::types::{Entry, LogId};
    use crate::registry::HealthStatus;
    use crate::registry::{CheckDef, CheckUpdate, Command, ServiceSpec, SubscriptionDef};

    const DEADLINE: Duration = Duration::from_secs(10);

    /// A real state machine on a temp dir, fed entries directly.
    struct Cluster {
        sm: StateMachineStore,
        index: u64,
        _db: sled::Db,
        _dir: tempfile::TempDir,
    }

    impl Cluster {
        async fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let sled_dir = dir.path().join("sled");
            let db = sled::Config::new().path(&sled_dir).open().expect("sled");
            let syncer = Syncer::new(&db, &sled_dir).expect("syncer");
            let sm = StateMachineStore::open(&db, syncer).await.expect("sm");
            Cluster {
                sm,
                index: 0,
                _db: db,
                _dir: dir,
            }
        }

        fn shared(&self) -> Arc<Shared> {
            self.sm.shared()
        }

        async fn apply(&mut self, cmd: Command) {
            self.index += 1;
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
                payload: EntryPayload::Normal(cmd),
            };
            self.sm.apply([entry]).await.expect("apply");
        }

        /// An instance of `svc` at 127.0.0.1:`port` with a passing TTL
        /// check `<id>-check` (so its health does not hang on membership).
        async fn register(&mut self, svc: &str, id: &str, port: u16, tags: &[&str]) {
            self.register_as(svc, id, port, tags, HealthStatus::Passing)
                .await;
        }

        async fn register_as(
            &mut self,
            svc: &str,
            id: &str,
            port: u16,
            tags: &[&str],
            status: HealthStatus,
        ) {
            self.apply(Command::RegisterService {
                via_node: 1,
                service: ServiceSpec {
                    id: id.into(),
                    name: svc.into(),
                    tags: tags.iter().map(|t| (*t).into()).collect(),
                    address: "127.0.0.1".into(),
                    port,
                    checks: vec![CheckDef {
                        check_id: format!("{id}-check"),
                        ttl: Some("1h".into()),
                        status,
                        ..CheckDef::default()
                    }],
                    ..Default::default()
                },
            })
            .await;
        }

        async fn set_health(&mut self, id: &str, status: HealthStatus) {
            self.apply(Command::UpdateChecks {
                updates: vec![CheckUpdate {
                    check_id: format!("{id}-check"),
                    status,
                    output: "test".into(),
                    owner: None,
                }],
            })
            .await;
        }
    }

    /// An HTTP instance that records the batches it acknowledged.
    struct Instance {
        port: u16,
        state: Arc<Recv>,
        server: JoinHandle<()>,
    }

    #[derive(Default)]
    struct Recv {
        /// Batches answered 2xx, in arrival order.
        got: Mutex<Vec<Vec<u64>>>,
        /// Requests seen, whatever the answer.
        attempts: AtomicU64,
        /// The status to answer; 0 means 200.
        status: AtomicU16,
        /// Never answer.
        hang: AtomicBool,
    }

    impl Instance {
        async fn start() -> Self {
            let state = Arc::new(Recv::default());
            let app = axum::Router::new()
                .route("/events", axum::routing::post(receive))
                .with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let server = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Instance {
                port,
                state,
                server,
            }
        }

        fn ids(&self) -> Vec<u64> {
            self.batches().into_iter().flatten().collect()
        }

        fn batches(&self) -> Vec<Vec<u64>> {
            self.state.got.lock().expect("lock").clone()
        }

        fn attempts(&self) -> u64 {
            self.state.attempts.load(Ordering::SeqCst)
        }

        fn answer(&self, status: u16) {
            self.state.status.store(status, Ordering::SeqCst);
        }
    }

    impl Drop for Instance {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    async fn receive(State(s): State<Arc<Recv>>, Json(batch): Json<Vec<Value>>) -> StatusCode {
        s.attempts.fetch_add(1, Ordering::SeqCst);
        if s.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let code = match s.status.load(Ordering::SeqCst) {
            0 => 200,
            c => c,
        };
        let status = StatusCode::from_u16(code).expect("valid status");
        if status.is_success() {
            let ids = batch
                .iter()
                .map(|e| e["id"].as_u64().expect("id"))
                .collect();
            s.got.lock().expect("lock").push(ids);
        }
        status
    }

    /// A port nothing listens on (connection refused), held by a bound but
    /// not listening socket so no other test can take it meanwhile.
    fn dead_port() -> (tokio::net::TcpSocket, u16) {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr: SocketAddr = s.local_addr().expect("addr");
        (s, addr.port())
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(1))
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .expect("client")
    }

    fn sub(delivery: Delivery, batch: usize) -> Subscription {
        Subscription {
            stream: "s".into(),
            name: "sub".into(),
            def: SubscriptionDef {
                service: "pager".into(),
                tags: Vec::new(),
                path: "/events".into(),
                delivery,
                capacity: 1000,
                batch,
            },
            create_index: 1,
            modify_index: 1,
        }
    }

    fn spawn(c: &Cluster, s: Subscription) -> (SubscriptionRunner, CancellationToken) {
        let stop = CancellationToken::new();
        let r = SubscriptionRunner::spawn(s, Policy::Block, c.shared(), client(), stop.clone());
        (r, stop)
    }

    async fn push(r: &SubscriptionRunner, ids: std::ops::Range<u64>) {
        for id in ids {
            let p = r.buffer().push(Arc::new(json!({"id": id})), DEADLINE).await;
            assert_eq!(p, Pushed::Accepted);
        }
    }

    async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
        let until = Instant::now() + DEADLINE;
        while !probe() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stat(r: &SubscriptionRunner, k: &str) -> u64 {
        r.stats_json()[k].as_u64().expect("counter")
    }

    #[tokio::test]
    async fn one_instance_gets_every_event_in_order() {
        let mut c = Cluster::new().await;
        let a = Instance::start().await;
        c.register("pager", "a", a.port, &[]).await;
        let (r, _) = spawn(&c, sub(Delivery::One, 3));
        push(&r, 0..10).await;
        eventually("10 delivered", || a.ids().len() == 10).await;
        assert_eq!(a.ids(), (0..10).collect::<Vec<_>>());
        assert!(
            a.batches().iter().all(|b| b.len() <= 3),
            "{:?}",
            a.batches()
        );
        eventually("stats", || stat(&r, "delivered") == 10).await;
        let s = r.stats_json();
        assert_eq!(s["batches"], a.batches().len() as u64);
        assert_eq!(
            (s["failed"].as_u64(), s["retried"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(s["last_instance"], "a");
        assert_eq!(s["buffer"]["accepted"], 10);
        r.stop().await;
    }

    #[tokio::test]
    async fn one_takes_turns_over_two_instances() {
        let mut c = Cluster::new().await;
        let (a, b) = (Instance::start().await, Instance::start().await);
        c.register("pager", "a", a.port, &["v2", "x"]).await;
        c.register("pager", "b", b.port, &["v2"]).await;
        // An instance without the subscription's tag is never a target.
        let x = Instance::start().await;
        c.register("pager", "x", x.port, &["old"]).await;
        let mut s = sub(Delivery::One, 1);
        s.def.tags = vec!["v2".into()];
        let (r, _) = spawn(&c, s);
        push(&r, 0..10).await;
        eventually("10 delivered", || a.ids().len() + b.ids().len() == 10).await;
        assert_eq!(a.ids(), vec![0, 2, 4, 6, 8]);
        assert_eq!(b.ids(), vec![1, 3, 5, 7, 9]);
        assert_eq!(x.attempts(), 0);
        r.stop().await;
    }

    #[tokio::test]
    async fn a_refusing_instance_loses_no_event() {
        let mut c = Cluster::new().await;
        let (b, e) = (Instance::start().await, Instance::start().await);
        e.answer(500);
        let (_reserved, dead) = dead_port();
        c.register("pager", "a-dead", dead, &[]).await;
        c.register("pager", "b", b.port, &[]).await;
        c.register("pager", "c-500", e.port, &[]).await;
        let (r, _) = spawn(&c, sub(Delivery::One, 2));
        push(&r, 0..20).await;
        eventually("20 at b", || b.ids().len() >= 20).await;
        let mut got = b.ids();
        got.dedup();
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "every event, in order");
        assert!(e.attempts() >= 1, "the 500 instance was tried");
        assert!(e.ids().is_empty());
        let s = r.stats_json();
        assert!(s["failed"].as_u64() >= Some(2), "{s}");
        assert!(s["retried"].as_u64() >= Some(2), "{s}");
        assert!(s["last_error"].as_str().is_some(), "{s}");
        // Later batches are not lost either while the others recover.
        e.answer(200);
        push(&r, 20..40).await;
        eventually("40 delivered", || stat(&r, "delivered") == 40).await;
        let mut all: Vec<u64> = b.ids().into_iter().chain(e.ids()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
        r.stop().await;
    }

    #[tokio::test]
    async fn a_critical_instance_gets_no_more_attempts() {
        let mut c = Cluster::new().await;
        let (a, b) = (Instance::start().await, Instance::start().await);
        c.register("pager", "a", a.port, &[]).await;
        c.register("pager", "b", b.port, &[]).await;
        let (r, _) = spawn(&c, sub(Delivery::One, 1));
        push(&r, 0..4).await;
        eventually("both used", || a.ids().len() == 2 && b.ids().len() == 2).await;
        c.set_health("a", HealthStatus::Critical).await;
        let before = a.attempts();
        push(&r, 4..14).await;
        eventually("the rest at b", || b.ids().len() == 12).await;
        assert_eq!(a.attempts(), before, "no attempt after critical");
        assert_eq!(b.ids()[2..], (4..14).collect::<Vec<_>>());
        // Passing again: back in the rotation.
        c.set_health("a", HealthStatus::Passing).await;
        push(&r, 14..18).await;
        eventually("a again", || a.ids().len() > 2).await;
        r.stop().await;
    }

    #[tokio::test]
    async fn events_wait_until_an_instance_registers() {
        let mut c = Cluster::new().await;
        let a = Instance::start().await;
        let (r, _) = spawn(&c, sub(Delivery::One, 100));
        push(&r, 0..5).await;
        // Nothing to deliver to: the events stay in the buffer.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.buffer().len(), 5);
        assert_eq!(stat(&r, "delivered"), 0);
        // Registered but critical counts as absent.
        c.register_as("pager", "a", a.port, &[], HealthStatus::Critical)
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(a.attempts(), 0);
        c.set_health("a", HealthStatus::Passing).await;
        eventually("delivered once passing", || a.ids().len() == 5).await;
        assert_eq!(a.ids(), (0..5).collect::<Vec<_>>());
        r.stop().await;
    }

    #[tokio::test]
    async fn all_delivers_to_every_passing_instance() {
        let mut c = Cluster::new().await;
        let (a, b) = (Instance::start().await, Instance::start().await);
        c.register("pager", "a", a.port, &[]).await;
        c.register("pager", "b", b.port, &[]).await;
        let (r, _) = spawn(&c, sub(Delivery::All, 4));
        push(&r, 0..10).await;
        eventually("both have all", || {
            a.ids().len() == 10 && b.ids().len() == 10
        })
        .await;
        assert_eq!(a.ids(), (0..10).collect::<Vec<_>>());
        assert_eq!(b.ids(), a.ids());
        eventually("stats", || stat(&r, "delivered") == 20).await;
        assert_eq!(stat(&r, "batches"), a.batches().len() as u64);
        r.stop().await;
    }

    #[tokio::test]
    async fn all_retries_a_failing_instance_until_it_takes_the_batch_or_goes() {
        let mut c = Cluster::new().await;
        let (a, b) = (Instance::start().await, Instance::start().await);
        a.answer(503);
        c.register("pager", "a", a.port, &[]).await;
        c.register("pager", "b", b.port, &[]).await;
        let (r, _) = spawn(&c, sub(Delivery::All, 10));
        push(&r, 0..3).await;
        eventually("b has it, a retried", || {
            b.ids().len() == 3 && a.attempts() >= 3
        })
        .await;
        assert_eq!(stat(&r, "batches"), 0, "not done while a still passes");
        a.answer(200);
        eventually("a has it", || a.ids() == vec![0, 1, 2]).await;
        eventually("done", || stat(&r, "batches") == 1).await;
        assert_eq!(b.attempts(), 1, "b is not sent the batch again");
        assert!(stat(&r, "retried") >= 2);
        // A failing target that turns critical no longer holds the batch up.
        a.answer(500);
        push(&r, 3..4).await;
        eventually("b has the next", || b.ids().len() == 4).await;
        c.set_health("a", HealthStatus::Critical).await;
        eventually("done without a", || stat(&r, "batches") == 2).await;
        assert_eq!(a.ids().len(), 3);
        r.stop().await;
    }

    #[tokio::test]
    async fn all_hands_an_unacknowledged_batch_to_whoever_passes_next() {
        let mut c = Cluster::new().await;
        let (a, b) = (Instance::start().await, Instance::start().await);
        a.answer(503);
        c.register("pager", "a", a.port, &[]).await;
        let (r, _) = spawn(&c, sub(Delivery::All, 10));
        push(&r, 0..3).await;
        eventually("a tried", || a.attempts() >= 1).await;
        // The only target goes before taking the batch; a new one comes.
        c.set_health("a", HealthStatus::Critical).await;
        c.register("pager", "b", b.port, &[]).await;
        eventually("b has the batch nobody took", || b.ids() == vec![0, 1, 2]).await;
        eventually("done", || stat(&r, "batches") == 1).await;
        assert!(a.ids().is_empty());
        r.stop().await;
    }

    #[tokio::test]
    async fn stop_is_prompt_while_an_instance_hangs() {
        let mut c = Cluster::new().await;
        let a = Instance::start().await;
        a.state.hang.store(true, Ordering::SeqCst);
        c.register("pager", "a", a.port, &[]).await;
        let (r, parent) = spawn(&c, sub(Delivery::One, 10));
        push(&r, 0..3).await;
        eventually("attempt in flight", || a.attempts() == 1).await;
        let buffer = r.buffer().clone();
        tokio::time::timeout(Duration::from_secs(1), r.stop())
            .await
            .expect("stop returns promptly");
        assert!(!parent.is_cancelled(), "only this runner stops");
        assert_eq!(
            buffer.push(Arc::new(json!({"id": 9})), DEADLINE).await,
            Pushed::Closed
        );
    }

    #[tokio::test]
    async fn the_callers_token_stops_the_runner() {
        let c = Cluster::new().await;
        let (r, parent) = spawn(&c, sub(Delivery::One, 10));
        parent.cancel();
        // The task ends on the parent's cancel alone (`stop` would end it
        // anyway, with its own token).
        eventually("the runner's task to end", || r.task.is_finished()).await;
        r.stop().await;
    }
}
