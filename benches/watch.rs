//! Notification-latency benchmark of the two ways to wait for a change: Consul-style blocking
//! queries and the native SSE watch stream, on a three-node raftmesh cluster.
//!
//! Each round starts three real `raftmesh agent` processes on 127.0.0.1, .2 and .3 (port 0,
//! addresses read back from each node's `addrs.json`; temporary data dirs), then on node 3
//! holds `BENCH_WAITERS` blocking queries (`GET /v1/catalog/service/bench?index=N&wait=5m`,
//! re-issued with the answer's `X-Consul-Index` as a Consul client does), `BENCH_WAITERS` SSE
//! streams (`GET /v1/watch?service=bench`), or both. Then it makes `BENCH_WRITES`
//! registrations through node 1, one at a time (`PUT /v1/agent/service/register`, instance
//! `bench-(i % BENCH_INSTANCES)` with a new port each time, so the catalog answer stays small):
//! after each write is acknowledged it waits until every waiter has seen it (deadline `WAIT`),
//! then `BENCH_GAP_MS` for the blocking queries to park again, and writes the next. One
//! unmeasured write comes first. Rounds (`BENCH_ROUNDS`, default
//! `mixed-stale,sse,blocking-stale,mixed-default`): `mixed-*` holds both kinds at once, `sse`
//! and `blocking-*` one kind alone (a fair comparison on two cores: woken together, one kind
//! queues behind the other); `-stale` blocking queries add `&stale` (the node's applied
//! state), `-default` ones use the API's default consistency (a read barrier through the
//! leader on every request, so on every re-issue after a change).
//!
//! Reported per round and kind of waiter: the notification latency (write acknowledged at this
//! client → the waiter has the answer or event with an index at or past the write's commit
//! index) p50, p99 and max over every (waiter, write) pair, how many were seen before the
//! write's own acknowledgement arrived (counted as 0 ms), missed, errors, SSE resyncs; per
//! round the write latency and retries, node 3's `VmRSS` before the waiters, with them and
//! after the writes, and the CPU of each node and of this client during the writes
//! (`/proc/PID/stat`, % of one core).
//!
//! Run: `cargo bench --bench watch`. Knobs (environment): `BENCH_WAITERS` (each kind, default
//! 1000), `BENCH_WRITES` (default 200), `BENCH_INSTANCES` (default 10), `BENCH_GAP_MS` (default
//! 50), `BENCH_PER_CLIENT` (waiters per HTTP client, default 50), `BENCH_ROUNDS` (above),
//! `BENCH_RAFTMESH_ARGS` extra agent flags, `BENCH_PROFILE` (default
//! `release`: the binary cargo built for this bench; another profile is built here with
//! `cargo build --profile <p>`), `BENCH_KEEP=1` keeps data dirs and node logs. Progress on
//! stderr, markdown on stdout.
//!
//! Servers listen on loopback only. Every process is started by this program and killed by pid
//! (`Child::kill`) when done, when the program unwinds, or on Ctrl-C.
//!
//! Owns the waiters, the writes, the rounds and the report; the cluster, the process guards,
//! the `/proc` readings and the formatting helpers are `common`, shared with the `health` bench.

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use common::{
    cpu_pct, cpu_snap, env_flag, env_num, http_client, machine, mib, ms, pct_ms, progress,
    raftmesh_bin, rss_kib, Cluster, WAIT,
};

/// The node the waiters sit on (index into the cluster) and the one writes go through.
const WATCHED: usize = 2;
const WRITER: usize = 0;
/// Timeout of control requests and writes.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of a blocking query: its 5 min wait plus jitter and slack.
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(6 * 60);
/// Connect timeout of every client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections the control client keeps per node.
const CONTROL_IDLE: usize = 4;
/// Waiters connecting at once while the waiters are set up (keeps the accept backlog short).
const CONNECTING: usize = 100;
/// A failed blocking query is retried after this, doubling up to `BACKOFF_MAX` (a client that
/// retried at once would turn an overloaded node into a collapsed one).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------ knobs

#[derive(Debug)]
struct Knobs {
    waiters: usize,
    writes: u64,
    instances: u64,
    gap: Duration,
    per_client: usize,
    rounds: Vec<Plan>,
    extra_args: Vec<String>,
    profile: String,
    keep: bool,
}

impl Knobs {
    fn from_env() -> Result<Self> {
        let waiters: usize = env_num("BENCH_WAITERS")?.unwrap_or(1000);
        let writes: u64 = env_num("BENCH_WRITES")?.unwrap_or(200);
        let instances: u64 = env_num("BENCH_INSTANCES")?.unwrap_or(10);
        let gap_ms: u64 = env_num("BENCH_GAP_MS")?.unwrap_or(50);
        let per_client: usize = env_num("BENCH_PER_CLIENT")?.unwrap_or(50);
        ensure!(
            waiters <= 8000,
            "BENCH_WAITERS: at most 8000 (file descriptors)"
        );
        ensure!(writes > 0, "BENCH_WRITES must be positive");
        ensure!(instances > 0, "BENCH_INSTANCES must be positive");
        ensure!(per_client > 0, "BENCH_PER_CLIENT must be positive");
        let extra = std::env::var("BENCH_RAFTMESH_ARGS").unwrap_or_default();
        let rounds = std::env::var("BENCH_ROUNDS").unwrap_or_else(|_| DEFAULT_ROUNDS.into());
        let rounds = rounds
            .split(',')
            .map(|m| Plan::parse(m.trim()))
            .collect::<Result<Vec<_>>>()?;
        ensure!(!rounds.is_empty(), "BENCH_ROUNDS names no round");
        Ok(Knobs {
            waiters,
            writes,
            instances,
            gap: Duration::from_millis(gap_ms),
            per_client,
            rounds,
            extra_args: extra.split_whitespace().map(String::from).collect(),
            profile: std::env::var("BENCH_PROFILE").unwrap_or_else(|_| "release".into()),
            keep: env_flag("BENCH_KEEP"),
        })
    }
}

/// How the blocking queries read: `?stale` (the node's applied state) or the API's default
/// (a read barrier through the leader first, per request).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Stale,
    Default,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Stale => "stale",
            Mode::Default => "default",
        }
    }

    fn query(self) -> &'static str {
        match self {
            Mode::Stale => "&stale",
            Mode::Default => "",
        }
    }
}

/// What one round holds on node 3: blocking queries (read as `Mode` says), SSE streams, or
/// both at once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Plan {
    blocking: Option<Mode>,
    sse: bool,
}

const DEFAULT_ROUNDS: &str = "mixed-stale,sse,blocking-stale,mixed-default";

impl Plan {
    fn parse(name: &str) -> Result<Self> {
        let (blocking, sse) = match name {
            "mixed-stale" => (Some(Mode::Stale), true),
            "mixed-default" => (Some(Mode::Default), true),
            "sse" => (None, true),
            "blocking-stale" => (Some(Mode::Stale), false),
            "blocking-default" => (Some(Mode::Default), false),
            other => bail!(
                "BENCH_ROUNDS: {other:?} is none of mixed-stale, mixed-default, sse, \
                 blocking-stale, blocking-default"
            ),
        };
        Ok(Plan { blocking, sse })
    }

    fn name(self) -> String {
        match (self.blocking, self.sse) {
            (Some(m), true) => format!("mixed-{}", m.name()),
            (Some(m), false) => format!("blocking-{}", m.name()),
            (None, _) => "sse".into(),
        }
    }
}

// ---------------------------------------------------------------------------------- cluster

/// The watch bench's writes, on top of the shared harness's requests.
impl Cluster {
    /// Registers `bench-(seq % instances)` through the writer node, retrying failures (the
    /// registration is idempotent) until `WAIT`; (commit index, latency of the attempt that
    /// succeeded, failed attempts).
    async fn write(&self, seq: u64, instances: u64) -> Result<(u64, Duration, u64)> {
        let start = Instant::now();
        let mut failed = 0;
        loop {
            match self.write_once(seq, instances).await {
                Ok((index, took)) => return Ok((index, took, failed)),
                Err(e) if start.elapsed() >= WAIT => {
                    return Err(e.context(format!("write {seq}: {failed} retries")))
                }
                Err(e) => {
                    failed += 1;
                    if failed == 1 {
                        progress!("write {seq} failed, retrying: {e:#}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn write_once(&self, seq: u64, instances: u64) -> Result<(u64, Duration)> {
        let url = format!(
            "http://{}/v1/agent/service/register",
            self.nodes[WRITER].api
        );
        let body = format!(
            r#"{{"Name":"bench","ID":"bench-{}","Port":{}}}"#,
            seq % instances,
            1000 + seq % 60000
        );
        let t = Instant::now();
        let r = self
            .http
            .put(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("PUT {url}"))?;
        let status = r.status();
        let index = r
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let text = r.text().await.unwrap_or_default();
        ensure!(status == 200, "PUT {url}: {status} {text}");
        Ok((index.context("write without X-Consul-Index")?, t.elapsed()))
    }
}

// ---------------------------------------------------------------------------------- waiters

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Blocking,
    Sse,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Blocking => "blocking query",
            Kind::Sse => "SSE stream",
        }
    }
}

/// What one waiter saw: when it had each index (in order), and what went wrong.
#[derive(Default)]
struct Log {
    seen: Vec<(Instant, u64)>,
    errors: u64,
    /// A sample error, for the notes.
    sample: Option<String>,
    /// SSE: resync events after the first (the stream fell behind); a stream the server ended.
    resyncs: u64,
    ended: bool,
}

impl Log {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.sample.get_or_insert(e);
    }
}

/// Shared by the waiters and the writer: each waiter's highest index seen, and a wake-up for
/// the writer, who waits until every waiter has its write.
struct Progress {
    seen: Vec<AtomicU64>,
    changed: Notify,
}

impl Progress {
    fn saw(&self, w: usize, index: u64) {
        self.seen[w].fetch_max(index, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Waiter `w` will see nothing more: stop waiting for it.
    fn retire(&self, w: usize) {
        self.seen[w].store(u64::MAX, Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn min(&self) -> u64 {
        self.seen
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Waits until every waiter saw `index`; false at the deadline.
    async fn all_saw(&self, index: u64, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        while self.min() < index {
            if tokio::time::timeout_at(until, self.changed.notified())
                .await
                .is_err()
            {
                return self.min() >= index;
            }
        }
        true
    }
}

/// A blocking query loop: each answer's index becomes the next request's.
async fn blocking(
    client: reqwest::Client,
    url: String,
    w: usize,
    p: Arc<Progress>,
    connecting: Arc<Semaphore>,
    stop: CancellationToken,
) -> Log {
    let mut log = Log::default();
    let mut index = 1u64;
    let mut permit = connecting.acquire_owned().await.ok();
    let mut backoff = BACKOFF_MIN;
    loop {
        let req = client.get(format!("{url}&index={index}"));
        let res = tokio::select! {
            _ = stop.cancelled() => break,
            r = req.send() => r,
        };
        let ok = match res {
            Ok(r) if r.status() == 200 => {
                let i = r
                    .headers()
                    .get("x-consul-index")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                // A client has the answer once it has the body.
                match (i, r.bytes().await) {
                    (Some(i), Ok(_)) => {
                        log.seen.push((Instant::now(), i));
                        p.saw(w, i);
                        // Consul's rule: an index that went backwards restarts at 0.
                        index = if i < index { 0 } else { i };
                        true
                    }
                    (None, _) => {
                        log.error("answer without X-Consul-Index".into());
                        false
                    }
                    (_, Err(e)) => {
                        log.error(format!("body: {e}"));
                        false
                    }
                }
            }
            Ok(r) => {
                let status = r.status();
                log.error(format!(
                    "HTTP {status}: {}",
                    r.text().await.unwrap_or_default()
                ));
                false
            }
            Err(e) => {
                log.error(e.to_string());
                false
            }
        };
        // Connected and answered once: the next one parks.
        permit.take();
        if ok {
            backoff = BACKOFF_MIN;
        } else {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    log
}

/// An SSE stream: each event's `id` is the index it is at. A stream that
/// ends or fails is retired from `p`, so later writes do not wait for it
/// (its log still counts what it missed and why).
async fn sse(
    client: reqwest::Client,
    url: String,
    w: usize,
    p: Arc<Progress>,
    connecting: Arc<Semaphore>,
    stop: CancellationToken,
) -> Log {
    let log = sse_stream(client, url, w, p.clone(), connecting, stop).await;
    p.retire(w);
    log
}

async fn sse_stream(
    client: reqwest::Client,
    url: String,
    w: usize,
    p: Arc<Progress>,
    connecting: Arc<Semaphore>,
    stop: CancellationToken,
) -> Log {
    let mut log = Log::default();
    let permit = connecting.acquire_owned().await.ok();
    let res = tokio::select! {
        _ = stop.cancelled() => return log,
        r = client.get(&url).send() => r,
    };
    let mut resp = match res {
        Ok(r) if r.status() == 200 => r,
        Ok(r) => {
            let status = r.status();
            log.error(format!(
                "HTTP {status}: {}",
                r.text().await.unwrap_or_default()
            ));
            return log;
        }
        Err(e) => {
            log.error(e.to_string());
            return log;
        }
    };
    drop(permit);
    let mut buf: Vec<u8> = Vec::new();
    let mut events = 0u64;
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => break,
            c = resp.chunk() => c,
        };
        match chunk {
            Ok(Some(bytes)) => buf.extend_from_slice(&bytes),
            Ok(None) => {
                log.ended = true;
                break;
            }
            Err(e) => {
                log.error(e.to_string());
                break;
            }
        }
        let now = Instant::now();
        while let Some(end) = buf.windows(2).position(|x| x == b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let mut id = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.trim().parse::<u64>().ok();
                } else if line == "event: resync" && events > 0 {
                    log.resyncs += 1;
                }
            }
            if let Some(i) = id {
                events += 1;
                log.seen.push((now, i));
                p.saw(w, i);
            }
        }
    }
    log
}

// ---------------------------------------------------------------------------------- report

/// Latencies of one kind of waiter over every (waiter, write) pair.
#[derive(Default)]
struct Stats {
    waiters: usize,
    lat_us: Vec<u64>,
    before_ack: u64,
    missed: u64,
    errors: u64,
    resyncs: u64,
    ended: u64,
    sample: Option<String>,
}

/// `writes` are (acknowledged at, commit index), in write order.
fn stats(logs: &[Log], writes: &[(Instant, u64)]) -> Stats {
    let mut s = Stats {
        waiters: logs.len(),
        ..Stats::default()
    };
    for log in logs {
        s.errors += log.errors;
        s.resyncs += log.resyncs;
        s.ended += u64::from(log.ended);
        if s.sample.is_none() {
            s.sample.clone_from(&log.sample);
        }
        // Indexes only grow along a log, and so do the writes'.
        let mut j = 0;
        for (acked, index) in writes {
            while j < log.seen.len() && log.seen[j].1 < *index {
                j += 1;
            }
            match log.seen.get(j) {
                None => s.missed += 1,
                Some((at, _)) => match at.checked_duration_since(*acked) {
                    Some(d) => s.lat_us.push(d.as_micros() as u64),
                    None => {
                        s.before_ack += 1;
                        s.lat_us.push(0);
                    }
                },
            }
        }
    }
    s.lat_us.sort_unstable();
    s
}

/// One round: a fresh cluster, the waiters, the writes.
struct Round {
    plan: Plan,
    leader: usize,
    rss_before: Option<u64>,
    rss_waiting: Option<u64>,
    rss_after: Option<u64>,
    setup: Duration,
    write_us: Vec<u64>,
    write_retries: u64,
    writes_elapsed: Duration,
    not_seen_in_time: u64,
    cpu: Vec<Option<f64>>,
    kinds: Vec<(Kind, Stats)>,
    warnings: Vec<usize>,
    failure: Option<String>,
}

fn render(rounds: &[Round], knobs: &Knobs, notes: &[String]) -> String {
    let k = knobs;
    let (cores, load) = machine();
    let mut s = format!(
        "## raftmesh watch benchmark: blocking queries vs SSE streams\n\nPer round (a fresh \
         3-node cluster on 127.0.0.1-3, `{}` build), on n3: {} blocking queries \
         (`/v1/catalog/service/bench?index=N&wait=5m`, plus `&stale` in `-stale` rounds), {} \
         SSE streams (`/v1/watch?service=bench`), or both (`mixed-` rounds); {} registrations \
         through n1, one at a time, each waited for until every waiter saw it, then {} ms for \
         the blocking queries to park again ({} instance ids, so the catalog answer stays \
         small); `nproc` {cores}, load average at the end {}.\n\nNotification latency: write acknowledged at the client → \
         the waiter has an answer or event at or past the write's commit index, over every \
         (waiter, write) pair.\n\n\
         | round | waiter | waiters | notifications | p50 ms | p99 ms | max ms | seen before \
         the ack | missed | errors | resyncs | streams ended |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        k.profile,
        k.waiters,
        k.waiters,
        k.writes,
        k.gap.as_millis(),
        k.instances,
        load,
    );
    for r in rounds {
        for (kind, st) in &r.kinds {
            let sse = *kind == Kind::Sse;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.plan.name(),
                kind.name(),
                st.waiters,
                st.lat_us.len(),
                ms(pct_ms(&st.lat_us, 0.5)),
                ms(pct_ms(&st.lat_us, 0.99)),
                ms(pct_ms(&st.lat_us, 1.0)),
                st.before_ack,
                st.missed,
                st.errors,
                if sse {
                    st.resyncs.to_string()
                } else {
                    "-".into()
                },
                if sse {
                    st.ended.to_string()
                } else {
                    "-".into()
                },
            );
        }
    }
    let _ = write!(
        s,
        "\n| round | leader | writes | write p50 ms | write p99 ms | write retries | writes \
         phase s | writes not seen by all in {}s | n3 RSS MiB: before waiters → with waiters → \
         after writes | CPU % n1/n2/n3 | bench CPU % | waiter setup s | WARN/ERROR lines \
         n1/n2/n3 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        WAIT.as_secs(),
    );
    for r in rounds {
        let pct: Vec<String> = r
            .cpu
            .iter()
            .map(|p| p.map_or("-".into(), |p| format!("{p:.0}")))
            .collect();
        let nodes = pct.len().saturating_sub(1);
        let warns: Vec<String> = r.warnings.iter().map(usize::to_string).collect();
        let _ = writeln!(
            s,
            "| {} | n{} | {} | {} | {} | {} | {:.1} | {} | {} → {} → {} | {} | {} | {:.1} | {} |",
            r.plan.name(),
            r.leader + 1,
            r.write_us.len(),
            ms(pct_ms(&r.write_us, 0.5)),
            ms(pct_ms(&r.write_us, 0.99)),
            r.write_retries,
            r.writes_elapsed.as_secs_f64(),
            r.not_seen_in_time,
            mib(r.rss_before),
            mib(r.rss_waiting),
            mib(r.rss_after),
            pct[..nodes].join("/"),
            pct.get(nodes).map_or("-", String::as_str),
            r.setup.as_secs_f64(),
            warns.join("/"),
        );
    }
    s.push_str("\nNotes:\n\n");
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    for r in rounds {
        if let Some(f) = &r.failure {
            let _ = writeln!(s, "- {} round FAILED: {f}", r.plan.name());
        }
        for (kind, st) in &r.kinds {
            if let Some(e) = &st.sample {
                let e: String = e.replace('`', "'").chars().take(240).collect();
                let _ = writeln!(
                    s,
                    "- {} round, {} error sample: `{e}`",
                    r.plan.name(),
                    kind.name()
                );
            }
        }
    }
    s
}

// ---------------------------------------------------------------------------------- run

/// Everything of a round after the cluster is up; a failure ends the writes early but the
/// waiters' logs are still collected and reported.
async fn round(bin: &Path, knobs: &Knobs, plan: Plan) -> Result<Round> {
    let http = http_client(Some(CONTROL_TIMEOUT), CONNECT_TIMEOUT, CONTROL_IDLE)?;
    let c = Cluster::start(bin, &knobs.extra_args, knobs.keep, http).await?;
    let leader = c.wait_leader().await?;
    progress!(
        "{} round: cluster formed, leader node{}",
        plan.name(),
        leader + 1
    );
    // The service exists before anyone waits on it.
    c.write(0, knobs.instances).await?;
    let pids = c.pids();
    let mut r = Round {
        plan,
        leader,
        rss_before: rss_kib(pids[WATCHED]),
        rss_waiting: None,
        rss_after: None,
        setup: Duration::ZERO,
        write_us: Vec::new(),
        write_retries: 0,
        writes_elapsed: Duration::ZERO,
        not_seen_in_time: 0,
        cpu: Vec::new(),
        kinds: Vec::new(),
        warnings: Vec::new(),
        failure: None,
    };

    let setup = Instant::now();
    // Waiters 0..n are blocking queries, n..total SSE streams.
    let n = if plan.blocking.is_some() {
        knobs.waiters
    } else {
        0
    };
    let total = n + if plan.sse { knobs.waiters } else { 0 };
    let progress = Arc::new(Progress {
        seen: (0..total).map(|_| AtomicU64::new(0)).collect(),
        changed: Notify::new(),
    });
    let stop = CancellationToken::new();
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let api = &c.nodes[WATCHED].api;
    let blocking_url = format!(
        "http://{api}/v1/catalog/service/bench?wait=5m{}",
        plan.blocking.map_or("", Mode::query)
    );
    let sse_url = format!("http://{api}/v1/watch?service=bench");
    let mut tasks = Vec::new();
    let mut client = None;
    for w in 0..total {
        if w % knobs.per_client == 0 || w == n {
            client = Some(match w < n {
                true => http_client(Some(BLOCKING_TIMEOUT), CONNECT_TIMEOUT, knobs.per_client)?,
                false => http_client(None, CONNECT_TIMEOUT, knobs.per_client)?,
            });
        }
        let client = client.clone().context("a client per group of waiters")?;
        let (p, conn, stop) = (progress.clone(), connecting.clone(), stop.clone());
        tasks.push(if w < n {
            let url = blocking_url.clone();
            tokio::spawn(blocking(client, url, w, p, conn, stop))
        } else {
            let url = sse_url.clone();
            tokio::spawn(sse(client, url, w, p, conn, stop))
        });
    }

    let mut writes: Vec<(Instant, u64)> = Vec::new();
    let mut snap = None;
    let outcome: Result<()> = async {
        // Armed: every blocking query has had its first answer (its next request parks) and
        // every stream its first event (the resync).
        ensure!(
            progress.all_saw(1, WAIT).await,
            "not every waiter connected within {WAIT:?}"
        );
        r.setup = setup.elapsed();
        progress!("{total} waiters armed in {:.1}s", r.setup.as_secs_f64());
        // One unmeasured write, so every waiter is in its steady state.
        let (warm, _, _) = c.write(1, knobs.instances).await?;
        ensure!(
            progress.all_saw(warm, WAIT).await,
            "not every waiter saw the warm-up write within {WAIT:?}"
        );
        tokio::time::sleep(knobs.gap).await;
        r.rss_waiting = rss_kib(pids[WATCHED]);
        snap = Some(cpu_snap(&pids, false));
        for seq in 2..knobs.writes + 2 {
            let (index, took, retries) = c.write(seq, knobs.instances).await?;
            writes.push((Instant::now(), index));
            r.write_us.push(took.as_micros() as u64);
            r.write_retries += retries;
            if !progress.all_saw(index, WAIT).await {
                r.not_seen_in_time += 1;
            }
            if (seq - 1) % 50 == 0 {
                progress!("{} writes", seq - 1);
            }
            tokio::time::sleep(knobs.gap).await;
        }
        Ok(())
    }
    .await;
    let t0 = snap.as_ref().map_or_else(Instant::now, |s| s.0);
    r.writes_elapsed = t0.elapsed();
    if let Some(snap) = &snap {
        r.cpu = cpu_pct(snap, &cpu_snap(&pids, false));
    }
    r.rss_after = rss_kib(pids[WATCHED]);
    if let Err(e) = outcome {
        progress!("{} round failed: {e:#}", plan.name());
        r.failure = Some(format!("{e:#}"));
    }
    stop.cancel();
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.context("waiter panicked")?);
    }
    let sse_logs = logs.split_off(n);
    r.write_us.sort_unstable();
    if plan.blocking.is_some() {
        r.kinds.push((Kind::Blocking, stats(&logs, &writes)));
    }
    if plan.sse {
        r.kinds.push((Kind::Sse, stats(&sse_logs, &writes)));
    }
    r.warnings = c.log_warnings();
    Ok(r)
}

async fn run() -> Result<()> {
    LazyLock::force(&common::START);
    let knobs = Knobs::from_env()?;
    progress!("knobs: {knobs:?}");
    let bin = raftmesh_bin(&knobs.profile)?;
    let mut notes = vec![
        format!("Binary: {}.", bin.display()),
        "A failed blocking query is retried after 1 s, doubling to 20 s; a failed write after \
         200 ms. The CPU of the writes phase includes the gaps between writes; the bench and \
         the nodes share the cores."
            .into(),
    ];
    let mut rounds = Vec::new();
    let mut failed = false;
    for plan in knobs.rounds.clone() {
        match round(&bin, &knobs, plan).await {
            Ok(r) => {
                failed |= r.failure.is_some();
                rounds.push(r);
            }
            Err(e) => {
                progress!("{} round failed: {e:#}", plan.name());
                notes.push(format!(
                    "{} round FAILED before its waiters: {e:#}",
                    plan.name()
                ));
                failed = true;
            }
        }
    }
    println!("{}", render(&rounds, &knobs, &notes));
    progress!("done");
    ensure!(!failed, "a round failed; see the notes");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    // Ctrl-C drops the run, whose process guards kill the servers.
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}
