//! Stream pipeline benchmark: `json_parse → filter → transform → window` on one raftmesh node,
//! beside a plain Rust loop doing the same work on the same data in the same run.
//!
//! Data: `BENCH_EVENTS` JSON text lines from a seeded generator (splitmix64, so every run sees
//! the same lines), e.g. `{"service":"svc-7","level":"error","latency_ms":123.4,
//! "path":"/api/orders","ts":1700000000014}`: 20 services, 40% `error`, latency uniform in
//! 0-600 ms with a 2% tail up to 3000 ms, so the filter keeps about a third.
//!
//! The stream (one definition for every cell): `json_parse`; `filter`
//! `event.level == "error" && event.latency_ms > 100`; `transform` setting
//! `slow: event.latency_ms > 500`, renaming `service` → `svc` and dropping `path`; a tumbling
//! count `window` of `WINDOW` events per `svc` with count, avg and p99 of `latency_ms`. Count
//! windows make the outputs a function of the data alone, so the cells can be compared.
//!
//! Cells, in this order:
//!
//! - `plain loop`: in this process, `serde_json::from_str` of each line into a `Value`, the
//!   filter and transform as Rust code on it, and a per-group `Vec` of `WINDOW` latencies
//!   whose count, avg and p99 (by sorting, rank `floor(0.99 * (n - 1))`) become a JSON output
//!   event when it fills.
//! - `library Pipeline`: in this process, `raftmesh::stream::pipeline::Pipeline` compiled
//!   from the stream's definition, fed `Input::Text` lines (a clock read every 256 events, as
//!   the node's worker takes batches of 256). Its outputs are checked against the plain loop's
//!   one by one: group, count and avg equal, p99 within the sketch's 1%.
//! - `raftmesh node`: a three-node cluster of real `raftmesh agent` processes on 127.0.0.1, .2
//!   and .3 (port 0, temporary data dirs; the harness starts three, the stream runs on the
//!   node that receives the events). The stream is put through node 1 with buffer
//!   `{"capacity": 10000, "policy": "block"}`; once node 1 runs it, `BENCH_CONNS` clients
//!   `POST /v1/streams/bench/events` to node 1 as `text/plain` bodies of `BENCH_BATCH` lines
//!   (a 429/503 resends from the `accepted` it reports). The clock stops when node 1's
//!   `GET /v1/streams/bench/stats` shows every event accepted, an empty buffer and the
//!   expected filtered/out counts (or, if they never match, counts that held still for 1 s;
//!   the time is when they were first seen). Its filtered and out counts must equal the plain
//!   loop's; a mismatch is printed in the notes and fails the run.
//!
//! Reported per cell: events, seconds, events/s, RSS (MiB) before/peak/after (node 1 for the
//! node cell, sampled every 100 ms; this process for the others, sampled every 10 ms), CPU
//! (% of one core: node 1, or this process; and CPU µs per event, which other work on the
//! machine disturbs less than events/s), filter-passing events and window outputs.
//!
//! Run: `cargo bench --bench streams`. Knobs (environment): `BENCH_EVENTS` (default 1000000),
//! `BENCH_QUICK=1` for 20000 events (an explicit `BENCH_EVENTS` wins), `BENCH_CONNS` concurrent
//! clients (default 4), `BENCH_BATCH` lines per POST (default 1000), `BENCH_RAFTMESH_ARGS`
//! extra agent flags, `BENCH_PROFILE` (default `dist`, built here with
//! `cargo build --profile dist`; `release` takes the binary cargo built for this bench),
//! `BENCH_KEEP=1` keeps data dirs and node logs. Progress on stderr, markdown on stdout.
//!
//! Servers listen on loopback only. Every process is started by this program and killed by pid
//! (`Child::kill`) when done, when the program unwinds, or on Ctrl-C.
//!
//! Owns the data, the plain loop, the cells and the report; the cluster, the process guards,
//! the `/proc` readings and the formatting helpers are `common`, shared with the other benches.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};

use raftmesh::registry::StreamDef;
use raftmesh::stream::pipeline::{Input, Pipeline};

use common::{
    cpu_pct, cpu_snap, env_flag, env_num, http_client, machine, mib, poll_until, progress,
    raftmesh_bin, rss_kib, Cluster, WAIT,
};

// The nodes run on mimalloc; so do the in-process cells, for a like-for-like comparison.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STREAM: &str = "bench";
/// Events per count window and group.
const WINDOW: usize = 100;
const SERVICES: u64 = 20;
const PATHS: [&str; 4] = ["/api/orders", "/api/users", "/api/search", "/healthz"];
/// `ts` of the first event; the rest follow 7 ms apart.
const T0: u64 = 1_700_000_000_000;
const SEED: u64 = 0x5eed_5747_ea45;
/// Events the library cell pushes per clock read (the node's worker batch).
const CLOCK_EVERY: usize = 256;
/// Timeout of stats and control requests, and of one POST (above the server's 10 s ingest wait).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
const POST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the node cell reads node 1's stats while it drains.
const STATS_POLL: Duration = Duration::from_millis(10);
/// How long counts that do not match the plain loop's must hold still to end the node cell.
const SETTLE: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------------------------ knobs

#[derive(Debug)]
struct Knobs {
    events: usize,
    conns: usize,
    batch: usize,
    quick: bool,
    extra_args: Vec<String>,
    profile: String,
    keep: bool,
}

impl Knobs {
    fn from_env() -> Result<Self> {
        let quick = env_flag("BENCH_QUICK");
        let events: usize =
            env_num("BENCH_EVENTS")?.unwrap_or(if quick { 20_000 } else { 1_000_000 });
        let conns: usize = env_num("BENCH_CONNS")?.unwrap_or(4);
        let batch: usize = env_num("BENCH_BATCH")?.unwrap_or(1000);
        ensure!(events > 0, "BENCH_EVENTS must be positive");
        ensure!((1..=256).contains(&conns), "BENCH_CONNS: 1 to 256");
        // A line is under 120 bytes: 8000 of them stay under the 1 MiB body limit.
        ensure!((1..=8000).contains(&batch), "BENCH_BATCH: 1 to 8000");
        let extra = std::env::var("BENCH_RAFTMESH_ARGS").unwrap_or_default();
        Ok(Knobs {
            events,
            conns,
            batch,
            quick,
            extra_args: extra.split_whitespace().map(String::from).collect(),
            profile: std::env::var("BENCH_PROFILE").unwrap_or_else(|_| "dist".into()),
            keep: env_flag("BENCH_KEEP"),
        })
    }
}

// ------------------------------------------------------------------------------------ data

/// splitmix64: tiny, seeded, good enough to mix levels and latencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn generate(n: usize) -> Vec<String> {
    let mut rng = Rng(SEED);
    (0..n as u64)
        .map(|i| {
            let svc = rng.next() % SERVICES;
            let level = match rng.next() % 100 {
                0..40 => "error",
                40..70 => "warn",
                _ => "info",
            };
            let tenths = match rng.next() % 50 {
                0 => 6000 + rng.next() % 24_000,
                _ => rng.next() % 6000,
            };
            let lat = tenths as f64 / 10.0;
            let path = PATHS[(rng.next() % PATHS.len() as u64) as usize];
            let ts = T0 + i * 7;
            format!(
                r#"{{"service":"svc-{svc}","level":"{level}","latency_ms":{lat:.1},"path":"{path}","ts":{ts}}}"#
            )
        })
        .collect()
}

fn stream_def() -> Value {
    json!({
        "processors": [
            {"type": "json_parse"},
            {"type": "filter", "expr": "event.level == \"error\" && event.latency_ms > 100"},
            {"type": "transform",
             "set": {"slow": "event.latency_ms > 500"},
             "rename": {"service": "svc"},
             "drop": ["path"]},
            {"type": "window", "kind": "tumbling", "size_count": WINDOW, "group_by": "svc",
             "field": "latency_ms", "aggregates": ["count", "avg", "p99"]}
        ],
        "buffer": {"capacity": 10000, "policy": "block"}
    })
}

// ---------------------------------------------------------------------------- measurements

/// Samples a process's RSS on a thread of its own until finished; the peak seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Option<u64>>,
}

impl RssSampler {
    fn start(pid: u32, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = rss_kib(pid);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(every);
                peak = peak.max(rss_kib(pid));
            }
            peak
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> Result<Option<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow!("RSS sampler panicked"))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------------- cells

/// What one cell did and measured.
struct Row {
    cell: &'static str,
    events: usize,
    secs: f64,
    rss: [Option<u64>; 3],
    cpu: Option<f64>,
    /// Events past the filter, and window outputs.
    passed: Option<u64>,
    outputs: Option<u64>,
    notes: String,
}

/// The plain loop's results: what the other cells are checked against.
struct Plain {
    passed: u64,
    filtered: u64,
    errors: u64,
    outputs: Vec<Value>,
}

/// One window's latencies, per group.
struct Group {
    value: Value,
    lat: Vec<f64>,
}

/// The stream's work by hand: parse, filter, transform, then a per-`svc` count window.
fn plain_loop(lines: &[String]) -> Plain {
    let mut groups: HashMap<String, Group> = HashMap::new();
    let mut p = Plain {
        passed: 0,
        filtered: 0,
        errors: 0,
        outputs: Vec::new(),
    };
    for line in lines {
        let Ok(Value::Object(mut ev)) = serde_json::from_str::<Value>(line) else {
            p.errors += 1;
            continue;
        };
        let level = ev.get("level").and_then(Value::as_str);
        let lat = ev.get("latency_ms").and_then(Value::as_f64);
        let (Some(level), Some(lat)) = (level, lat) else {
            p.errors += 1;
            continue;
        };
        if !(level == "error" && lat > 100.0) {
            p.filtered += 1;
            continue;
        }
        ev.insert("slow".into(), Value::Bool(lat > 500.0));
        if let Some(svc) = ev.remove("service") {
            ev.insert("svc".into(), svc);
        }
        ev.remove("path");
        p.passed += 1;
        let Some(lat) = ev.get("latency_ms").and_then(Value::as_f64) else {
            continue;
        };
        let value = ev.get("svc").cloned().unwrap_or(Value::Null);
        let g = groups.entry(value.to_string()).or_insert_with(|| Group {
            value,
            lat: Vec::with_capacity(WINDOW),
        });
        g.lat.push(lat);
        if g.lat.len() == WINDOW {
            let n = g.lat.len();
            let sum: f64 = g.lat.iter().sum();
            g.lat.sort_unstable_by(f64::total_cmp);
            let p99 = g.lat[(0.99 * (n - 1) as f64).floor() as usize];
            p.outputs.push(json!({
                "group": g.value, "count": n, "avg": sum / n as f64, "p99": p99,
            }));
            g.lat.clear();
        }
    }
    p
}

/// Wall time, RSS (before, peak, after) and CPU % of one in-process cell.
struct Measured {
    secs: f64,
    rss: [Option<u64>; 3],
    cpu: Option<f64>,
}

/// Runs `work` on this thread and measures this process around it.
fn in_process<T>(work: impl FnOnce() -> T) -> Result<(T, Measured)> {
    let pid = std::process::id();
    let before = rss_kib(pid);
    let sampler = RssSampler::start(pid, Duration::from_millis(10));
    let snap = cpu_snap(&[], false);
    let t = Instant::now();
    let out = work();
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_pct(&snap, &cpu_snap(&[], false))[0];
    let after = rss_kib(pid);
    let peak = sampler.finish()?.max(after);
    let rss = [before, peak, after];
    Ok((out, Measured { secs, rss, cpu }))
}

fn cell_plain(lines: &[String]) -> Result<(Row, Plain)> {
    progress!("plain loop: {} events", lines.len());
    let (plain, m) = in_process(|| plain_loop(lines))?;
    let row = Row {
        cell: "plain loop",
        events: lines.len(),
        secs: m.secs,
        rss: m.rss,
        cpu: m.cpu,
        passed: Some(plain.passed),
        outputs: Some(plain.outputs.len() as u64),
        notes: format!(
            "serde_json `Value`s, filter and transform in Rust, window by sorting; {} filtered, \
             {} errors",
            plain.filtered, plain.errors
        ),
    };
    Ok((row, plain))
}

/// Where the library's outputs differ from the plain loop's; empty if nowhere.
fn compare(lib: &[Value], plain: &[Value]) -> Vec<String> {
    let mut diffs = Vec::new();
    if lib.len() != plain.len() {
        diffs.push(format!(
            "{} window outputs, the plain loop {}",
            lib.len(),
            plain.len()
        ));
    }
    for (i, (a, b)) in lib.iter().zip(plain).enumerate() {
        let f = |v: &Value, k: &str| v[k].as_f64();
        let same = a["group"] == b["group"]
            && a["count"] == b["count"]
            && f(a, "avg") == f(b, "avg")
            && matches!((f(a, "p99"), f(b, "p99")),
                (Some(x), Some(y)) if (x - y).abs() <= 0.0101 * y.abs() + 1e-9);
        if !same {
            diffs.push(format!("output {i}: {a} vs the plain loop's {b}"));
        }
        if diffs.len() >= 5 {
            break;
        }
    }
    diffs
}

fn cell_library(lines: &[String], def: &StreamDef, plain: &Plain) -> Result<(Row, Vec<String>)> {
    progress!("library Pipeline: {} events", lines.len());
    let mut pipeline = Pipeline::compile(def).map_err(|e| anyhow!("compile: {e}"))?;
    let ((out, dead), m) = in_process(|| {
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        for chunk in lines.chunks(CLOCK_EVERY) {
            let now = now_ms();
            for line in chunk {
                pipeline.push(Input::Text(line.clone()), now, &mut out, &mut dead);
            }
        }
        (out, dead)
    })?;
    let c = pipeline.counters();
    let passed = lines.len() as u64 - c.filtered - c.parse_errors - c.expr_errors;
    let mut problems = compare(&out, &plain.outputs);
    if c.filtered != plain.filtered || passed != plain.passed || !dead.is_empty() {
        problems.push(format!(
            "filtered {} (plain {}), passed {passed} (plain {}), dead letters {}",
            c.filtered,
            plain.filtered,
            plain.passed,
            dead.len()
        ));
    }
    let row = Row {
        cell: "library Pipeline",
        events: lines.len(),
        secs: m.secs,
        rss: m.rss,
        cpu: m.cpu,
        passed: Some(passed),
        outputs: Some(out.len() as u64),
        notes: format!(
            "`Pipeline::push(Input::Text)` (a `String` copy per line, as the node decodes); \
             outputs {} the plain loop's",
            if problems.is_empty() {
                "match"
            } else {
                "DIFFER from"
            }
        ),
    };
    Ok((row, problems))
}

/// The counters of node 1's stats the node cell watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    received: u64,
    accepted: u64,
    depth: u64,
    filtered: u64,
    out: u64,
    errors: u64,
    timed_out: u64,
}

impl Cluster {
    async fn stream_stats(&self, node: usize) -> Result<Seen> {
        let path = format!("/v1/streams/{STREAM}/stats");
        let v = self.get_json(node, &path, &self.http).await?;
        let n = |p: &str| {
            (v.pointer(p).and_then(Value::as_u64)).with_context(|| format!("no {p} in stats: {v}"))
        };
        Ok(Seen {
            received: n("/received")?,
            accepted: n("/accepted")?,
            depth: n("/buffer/depth")?,
            filtered: n("/filtered")?,
            out: n("/out")?,
            errors: n("/parse_errors")? + n("/expr_errors")? + n("/window_skipped")?,
            timed_out: n("/dropped/timed_out")? + n("/dropped/rejected")?,
        })
    }

    async fn put_stream(&self, node: usize, def: &Value) -> Result<()> {
        let url = format!("http://{}/v1/streams/{STREAM}", self.nodes[node].api);
        let r = self.http.put(&url).json(def).send().await;
        let r = r.with_context(|| format!("PUT {url}"))?;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        ensure!(status.is_success(), "PUT {url}: {status}: {body}");
        Ok(())
    }
}

/// POSTs `lines` as one `text/plain` body, resending from the `accepted` a 429/503 reports;
/// how many resends it took.
async fn post_lines(client: &reqwest::Client, url: &str, lines: &[String]) -> Result<u64> {
    let (mut from, mut resends) = (0usize, 0u64);
    loop {
        let body = Bytes::from(lines[from..].join("\n"));
        let r = client
            .post(url)
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = r.status().as_u16();
        let v: Value = r
            .json()
            .await
            .with_context(|| format!("POST {url}: body"))?;
        let accepted = v["accepted"].as_u64().map(|a| a as usize);
        match (status, accepted) {
            (200, Some(a)) if a == lines.len() - from => return Ok(resends),
            (200, _) => bail!("POST {url}: {} lines, answered {v}", lines.len() - from),
            (429 | 503, Some(a)) => {
                from += a;
                resends += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ => bail!("POST {url}: {status} {v}"),
        }
    }
}

async fn cell_node(
    knobs: &Knobs,
    lines: Arc<Vec<String>>,
    plain: &Plain,
    notes: &mut Vec<String>,
) -> Result<(Row, Vec<String>)> {
    let bin = raftmesh_bin(&knobs.profile)?;
    notes.push(format!("Binary: {}.", bin.display()));
    let http = http_client(Some(CONTROL_TIMEOUT), CONNECT_TIMEOUT, 2)?;
    let c = Cluster::start(&bin, &knobs.extra_args, knobs.keep, http).await?;
    let r = node_run(&c, knobs, lines, plain).await;
    let warns: Vec<String> = c.log_warnings().iter().map(usize::to_string).collect();
    notes.push(format!(
        "WARN/ERROR lines in the node logs (n1/n2/n3): {} (`BENCH_KEEP=1` keeps the logs).",
        warns.join("/")
    ));
    if let Err(e) = &r {
        progress!("raftmesh node failed: {e:#}\n{}", c.logs_tail());
    }
    r
}

async fn node_run(
    c: &Cluster,
    knobs: &Knobs,
    lines: Arc<Vec<String>>,
    plain: &Plain,
) -> Result<(Row, Vec<String>)> {
    progress!("cluster formed, leader node{}", c.wait_leader().await? + 1);
    c.put_stream(0, &stream_def()).await?;
    poll_until(WAIT, "node1 running the stream", async || {
        Ok(c.stream_stats(0).await.ok().map(|_| ()))
    })
    .await?;
    let n = lines.len() as u64;
    let chunks = lines.len().div_ceil(knobs.batch);
    let url = format!("http://{}/v1/streams/{STREAM}/events", c.nodes[0].api);
    progress!(
        "raftmesh node: {n} events in {chunks} POSTs of {} lines, {} clients",
        knobs.batch,
        knobs.conns
    );
    let pids = c.pids();
    let before = rss_kib(pids[0]);
    let sampler = RssSampler::start(pids[0], Duration::from_millis(100));
    let snap = cpu_snap(&pids, false);
    let t = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..knobs.conns {
        let client = http_client(Some(POST_TIMEOUT), CONNECT_TIMEOUT, 1)?;
        let (next, lines, url, batch) = (next.clone(), lines.clone(), url.clone(), knobs.batch);
        tasks.push(tokio::spawn(async move {
            let mut resends = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= chunks {
                    return Ok::<u64, anyhow::Error>(resends);
                }
                let end = ((i + 1) * batch).min(lines.len());
                resends += post_lines(&client, &url, &lines[i * batch..end]).await?;
            }
        }));
    }
    let mut resends = 0;
    let mut failed = None;
    for task in tasks {
        match task.await.context("client task panicked")? {
            Ok(r) => resends += r,
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        sampler.finish()?;
        return Err(e);
    }
    let posted = t.elapsed().as_secs_f64();
    // Drained: every event in, the buffer empty, and the counts the plain loop's, or still
    // for SETTLE if they never get there. The clock stops when the final counts were first seen.
    let expect = |s: &Seen| s.filtered == plain.filtered && s.out == plain.outputs.len() as u64;
    let mut last: Option<(Seen, Instant)> = None;
    let (seen, end) = loop {
        let s = c.stream_stats(0).await?;
        let at = match last {
            Some((l, at)) if l == s => at,
            _ => Instant::now(),
        };
        last = Some((s, at));
        if s.accepted >= n && s.depth == 0 && (expect(&s) || at.elapsed() >= SETTLE) {
            break (s, at);
        }
        ensure!(
            t.elapsed() < WAIT,
            "node1 did not process every event within {WAIT:?}; last stats {s:?}"
        );
        tokio::time::sleep(STATS_POLL).await;
    };
    let secs = end.duration_since(t).as_secs_f64();
    let cpu = cpu_pct(&snap, &cpu_snap(&pids, false));
    let after = rss_kib(pids[0]);
    let peak = sampler.finish()?.max(after);
    let passed = seen.accepted - seen.filtered - seen.errors;
    let mut problems = Vec::new();
    if !expect(&seen) || seen.errors > 0 {
        problems.push(format!(
            "node1 counted filtered {}, out {}, errors {}; the plain loop filtered {} and made \
             {} window outputs",
            seen.filtered,
            seen.out,
            seen.errors,
            plain.filtered,
            plain.outputs.len()
        ));
    }
    let pct = |p: Option<f64>| p.map_or("-".into(), |p| format!("{p:.0}"));
    let row = Row {
        cell: "raftmesh node",
        events: lines.len(),
        secs,
        rss: [before, peak, after],
        cpu: cpu[0],
        passed: Some(passed),
        outputs: Some(seen.out),
        notes: format!(
            "node1 of 3, {} clients × {}-line `text/plain` POSTs; all answered after {posted:.2} s; \
             received {}, accepted {}, {resends} resends, {} timed out/rejected; CPU n2/n3 {}/{} %, \
             bench client {} %",
            knobs.conns,
            knobs.batch,
            seen.received,
            seen.accepted,
            seen.timed_out,
            pct(cpu[1]),
            pct(cpu[2]),
            pct(cpu[3]),
        ),
    };
    Ok((row, problems))
}

// ---------------------------------------------------------------------------------- report

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn table_row(r: &Row) -> String {
    format!(
        "| {} | {} | {:.2} | {:.0} | {} / {} / {} | {} | {} | {} | {} | {} |",
        r.cell,
        r.events,
        r.secs,
        r.events as f64 / r.secs.max(1e-9),
        mib(r.rss[0]),
        mib(r.rss[1]),
        mib(r.rss[2]),
        opt(r.cpu.map(|c| c.round())),
        r.cpu.map_or("-".into(), |c| format!(
            "{:.2}",
            c / 100.0 * r.secs / r.events as f64 * 1e6
        )),
        opt(r.passed),
        opt(r.outputs),
        r.notes,
    )
}

fn render(rows: &[Row], knobs: &Knobs, data_mib: f64, notes: &[String]) -> String {
    let (cores, load) = machine();
    let extra = match knobs.extra_args.is_empty() {
        true => String::new(),
        false => format!(", extra flags `{}`", knobs.extra_args.join(" ")),
    };
    let mut s = format!(
        "## raftmesh stream pipeline benchmark\n\n\
         `json_parse → filter → transform → window` (tumbling, {WINDOW} events per `svc`, \
         count/avg/p99 of `latency_ms`) over {} generated JSON lines ({data_mib:.1} MiB){}; \
         the node cell on node 1 of a 3-node cluster on 127.0.0.1-3, `{}` build{extra}, \
         {} clients × {} lines per POST. `nproc` {cores}, load average at the end {load}; the \
         bench client and the nodes share the cores. RSS of node 1 for the node cell, of this \
         process (which holds the data) for the others; CPU is % of one core, and per event \
         the CPU time of that process over the cell (less disturbed by other work on the \
         machine than events/s).\n\n\
         | cell | events | seconds | events/s | RSS MiB before / peak / after | CPU % \
         | CPU µs/event | passed filter | window outputs | notes |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        knobs.events,
        if knobs.quick { " (quick)" } else { "" },
        knobs.profile,
        knobs.conns,
        knobs.batch,
    );
    for r in rows {
        let _ = writeln!(s, "{}", table_row(r));
    }
    s.push_str("\nNotes:\n\n");
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}

async fn run() -> Result<()> {
    LazyLock::force(&common::START);
    let knobs = Knobs::from_env()?;
    progress!("knobs: {knobs:?}");
    let lines = Arc::new(generate(knobs.events));
    let data_mib = lines.iter().map(|l| l.len() + 1).sum::<usize>() as f64 / 1048576.0;
    let def: StreamDef = serde_json::from_value(stream_def()).context("the stream definition")?;
    let mut notes = Vec::new();
    let mut problems = Vec::new();

    let (row, plain) = cell_plain(&lines)?;
    progress!("  {}", table_row(&row));
    let mut rows = vec![row];
    let (row, p) = cell_library(&lines, &def, &plain)?;
    progress!("  {}", table_row(&row));
    rows.push(row);
    problems.extend(p.into_iter().map(|p| format!("library Pipeline: {p}")));

    match cell_node(&knobs, lines.clone(), &plain, &mut notes).await {
        Ok((row, p)) => {
            progress!("  {}", table_row(&row));
            rows.push(row);
            problems.extend(p.into_iter().map(|p| format!("raftmesh node: {p}")));
        }
        Err(e) => problems.push(format!("raftmesh node FAILED: {e:#}")),
    }
    for p in &problems {
        progress!("MISMATCH {p}");
        notes.push(format!("**MISMATCH** {p}"));
    }
    if problems.is_empty() {
        notes.push(
            "Every cell passed the same events through the filter and made the same window \
             outputs (the library's also with the plain loop's count and avg, p99 within 1%)."
                .into(),
        );
    }
    println!("{}", render(&rows, &knobs, data_mib, &notes));
    progress!("done");
    match problems.is_empty() {
        true => Ok(()),
        false => Err(anyhow!("{} mismatch(es), see the notes", problems.len())),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // Ctrl-C drops the running cell, whose process guards kill the servers.
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}
