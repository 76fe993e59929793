//! TTL heartbeat benchmark of a three-node raftmesh cluster.
//!
//! Starts three real `raftmesh agent` processes on 127.0.0.1, .2 and .3 (port 0, addresses read
//! back from each node's `addrs.json`; temporary data dirs), registers `BENCH_INSTANCES`
//! instances of service `hb` with a 30 s TTL check each, and heartbeats them
//! (`PUT /v1/agent/check/pass/service:hb-N`) round-robin through all three nodes:
//!
//! 1. `register`: every instance once, 64 concurrent clients;
//! 2. `warm-up`: one pass per check (64 clients), then a wait until the leader's
//!    `/v1/cluster/stats` counts every instance passing (these critical -> passing flips are
//!    the only heartbeats that should write to the Raft log);
//! 3. `steady`: `BENCH_RATE` heartbeats/s for `BENCH_SECS`, released by a 5 ms ticker to 32
//!    clients; one that finds every client busy and the queue full (32 waiting, or 20 ms
//!    worth at the target rate if more) is skipped and counted;
//! 4. `max`: 64 clients as fast as they can for `BENCH_SECS` (the sustained ceiling).
//!
//! Per phase: sent, 200s, errors by entry node and kind (a sample each in the notes), achieved
//! rate, p50/p99/max latency of the 200s (send to end of body; p99 also by entry node), CPU of
//! each node and of this client (`/proc/PID/stat`, % of one core), the machine's steal, the
//! leader's `VmRSS` at the end, the leader's `commit_index` before and after (steady
//! heartbeats should add ~0 entries; heartbeat phases start once it held still for 1 s) and
//! the instances passing at the end (leader's `/v1/cluster/stats`).
//!
//! Run: `cargo bench --bench health`. Knobs (environment): `BENCH_INSTANCES` (default 10000),
//! `BENCH_SECS` (default 30), `BENCH_RATE` (default instances / 10 s: each check every 10 s
//! against its 30 s TTL), `BENCH_QUICK=1` for 1000 instances and 10 s (explicit knobs win),
//! `BENCH_RAFTMESH_ARGS` extra agent flags, `BENCH_PROFILE` (default `dist`, built here with
//! `cargo build --profile dist`; `release` takes the binary cargo built for this bench),
//! `BENCH_KEEP=1` keeps data dirs and node logs. Progress on stderr, markdown on stdout.
//!
//! Servers listen on loopback only. Every process is started by this program and killed by pid
//! (`Child::kill`) when done, when the program unwinds, or on Ctrl-C.
//!
//! Owns the heartbeat load, its phases and the report; the cluster, the process guards, the
//! `/proc` readings and the formatting helpers are `common`, shared with the `watch` bench.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::Mutex;

use common::{
    cpu_pct, cpu_snap, env_flag, env_num, http_client, machine, mib, ms, pct_ms, poll_until,
    progress, raftmesh_bin, rss_kib, Cluster, WAIT,
};

/// TTL of every check; the default steady rate beats each check every third of it.
const TTL: &str = "30s";
/// Clients of the register, warm-up and max phases, and of the paced steady phase.
const BURST_CLIENTS: usize = 64;
const PACED_CLIENTS: usize = 32;
/// Period of the steady phase's ticker; each tick releases the heartbeats that came due.
const TICK: Duration = Duration::from_millis(5);
/// How long the leader's commit index must hold still before a heartbeat phase.
const QUIET: Duration = Duration::from_secs(1);
/// Timeout of status and stats requests.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of a load request: above the server's 5 s write timeout plus forwarding.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout of every client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections each client keeps per node.
const IDLE_PER_HOST: usize = 4;

// ------------------------------------------------------------------------------------ knobs

#[derive(Debug)]
struct Knobs {
    instances: u64,
    secs: Duration,
    /// Steady-phase target, heartbeats/s over the whole cluster.
    rate: f64,
    quick: bool,
    extra_args: Vec<String>,
    profile: String,
    keep: bool,
}

impl Knobs {
    fn from_env() -> Result<Self> {
        let quick = env_flag("BENCH_QUICK");
        let instances: u64 =
            env_num("BENCH_INSTANCES")?.unwrap_or(if quick { 1000 } else { 10_000 });
        let secs: f64 = env_num("BENCH_SECS")?.unwrap_or(if quick { 10.0 } else { 30.0 });
        let rate: f64 = env_num("BENCH_RATE")?.unwrap_or(instances as f64 / 10.0);
        ensure!(instances > 0, "BENCH_INSTANCES must be positive");
        ensure!(secs > 0.0 && secs <= 3600.0, "BENCH_SECS: (0, 3600]");
        ensure!(rate > 0.0, "BENCH_RATE must be positive");
        let extra = std::env::var("BENCH_RAFTMESH_ARGS").unwrap_or_default();
        Ok(Knobs {
            instances,
            secs: Duration::from_secs_f64(secs),
            rate,
            quick,
            extra_args: extra.split_whitespace().map(String::from).collect(),
            profile: std::env::var("BENCH_PROFILE").unwrap_or_else(|_| "dist".into()),
            keep: env_flag("BENCH_KEEP"),
        })
    }
}

// ---------------------------------------------------------------------------------- cluster

/// The health bench's requests to the cluster, on top of the shared harness's.
impl Cluster {
    /// The leader's (commit_index, term).
    async fn index_term(&self, leader: usize) -> Result<(u64, u64)> {
        let s = self.status(leader).await?;
        let field = |k: &str| s[k].as_u64().with_context(|| format!("no {k} in status"));
        Ok((field("commit_index")?, field("term")?))
    }

    /// Instances passing per the leader's `/v1/cluster/stats`.
    async fn passing(&self, leader: usize) -> Result<u64> {
        let v = self
            .get_json(leader, "/v1/cluster/stats", &self.http)
            .await?;
        let p = v["instances"]["by_state"]["passing"].as_u64();
        p.context("no instances.by_state.passing in /v1/cluster/stats")
    }

    /// Waits until the leader's commit index has not moved for `QUIET`; false if it kept
    /// moving until the deadline.
    async fn wait_quiet(&self, leader: usize) -> Result<bool> {
        let mut seen = (self.index_term(leader).await?.0, Instant::now());
        let quiet = poll_until(WAIT, "a quiet commit index", async || {
            let idx = self.index_term(leader).await?.0;
            if idx != seen.0 {
                seen = (idx, Instant::now());
            }
            Ok((seen.1.elapsed() >= QUIET).then_some(()))
        })
        .await;
        Ok(quiet.is_ok())
    }
}

// ---------------------------------------------------------------------------------- load

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Register,
    Pass,
}

/// How a phase hands out request numbers; `seq` picks the instance (`seq % instances`) and the
/// entry node (`seq % 3`).
#[derive(Clone, Copy)]
enum Pace {
    /// Each number in 0..n once, as fast as the clients take them.
    Count(u64),
    /// As fast as the clients take them, for this long.
    For(Duration),
    /// This many per second for this long, released by a ticker; a number that finds the
    /// queue full (every client busy and the queue's room taken) is skipped and counted.
    Paced(f64, Duration),
}

/// Feeds request numbers to the workers' queue according to `pace`; returns how many it skipped.
async fn produce(tx: mpsc::Sender<u64>, pace: Pace) -> u64 {
    let start = Instant::now();
    let (total, deadline) = match pace {
        Pace::Count(n) => (n, None),
        Pace::For(d) => (u64::MAX, Some(start + d)),
        Pace::Paced(rate, dur) => {
            let total = (rate * dur.as_secs_f64()).round() as u64;
            let mut iv = tokio::time::interval(TICK);
            // How many are due comes from the elapsed time, so a late tick loses nothing.
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut issued, mut skipped) = (0u64, 0u64);
            while issued < total {
                iv.tick().await;
                let due = ((rate * start.elapsed().as_secs_f64()) as u64).min(total);
                for seq in issued..due {
                    match tx.try_send(seq) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => skipped += 1,
                        Err(TrySendError::Closed(_)) => return skipped,
                    }
                }
                issued = issued.max(due);
            }
            return skipped;
        }
    };
    let feed = async {
        for seq in 0..total {
            if tx.send(seq).await.is_err() {
                break;
            }
        }
    };
    match deadline {
        Some(d) => drop(tokio::time::timeout_at(d.into(), feed).await),
        None => feed.await,
    }
    0
}

#[derive(Default)]
struct Outcome {
    sent: u64,
    /// Latencies of the 200s in µs, sorted: all, and by entry node.
    lat_us: Vec<u64>,
    by_node: Vec<Vec<u64>>,
    /// "n2 HTTP 503" -> (count, one sample body or transport error).
    errors: BTreeMap<String, (u64, String)>,
    skipped: u64,
    elapsed: Duration,
}

impl Outcome {
    fn ok(&self) -> u64 {
        self.lat_us.len() as u64
    }

    fn rate(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn errors_text(&self) -> String {
        let parts: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{} {k}", v.0))
            .collect();
        let text = parts.join(", ");
        if text.is_empty() {
            "0".into()
        } else {
            text
        }
    }
}

/// One request: `None` for a 200 whose body was read, else (kind, sample).
async fn send(req: reqwest::RequestBuilder) -> Option<(String, String)> {
    let kind = |e: &reqwest::Error| match (e.is_timeout(), e.is_connect()) {
        (true, _) => "timeout",
        (_, true) => "connect",
        _ => "transport",
    };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Some((kind(&e).into(), e.to_string())),
    };
    let status = resp.status().as_u16();
    match (status, resp.bytes().await) {
        (200, Ok(_)) => None,
        (_, Err(e)) => Some((format!("HTTP {status} body {}", kind(&e)), e.to_string())),
        (_, Ok(b)) => Some((format!("HTTP {status}"), String::from_utf8_lossy(&b).into())),
    }
}

/// Runs `clients` workers, each with its own connection pool, until `pace` runs out.
async fn drive(
    apis: &[String],
    instances: u64,
    op: Op,
    clients: usize,
    pace: Pace,
) -> Result<Outcome> {
    let start = Instant::now();
    // Room for `clients` waiting numbers, or for four ticks at the paced rate if that is more
    // (a tick releases a burst); a paced number that finds it full is skipped.
    let room = match pace {
        Pace::Paced(rate, _) => clients.max((rate * TICK.as_secs_f64() * 4.0) as usize),
        _ => clients,
    };
    let (tx, rx) = mpsc::channel::<u64>(room);
    // Shared by the workers; the lock is held only while waiting for the next number.
    let rx = Arc::new(Mutex::new(rx));
    let producer = tokio::spawn(produce(tx, pace));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = http_client(Some(LOAD_TIMEOUT), CONNECT_TIMEOUT, IDLE_PER_HOST)?;
        let (rx, apis) = (rx.clone(), apis.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<(usize, u64)> = Vec::new();
            let mut errors: BTreeMap<String, (u64, String)> = BTreeMap::new();
            loop {
                let Some(seq) = rx.lock().await.recv().await else {
                    break;
                };
                let node = (seq % apis.len() as u64) as usize;
                let (api, n) = (&apis[node], seq % instances);
                let req = match op {
                    Op::Register => client
                        .put(format!("http://{api}/v1/agent/service/register"))
                        .header("content-type", "application/json")
                        .body(format!(
                            r#"{{"Name":"hb","ID":"hb-{n}","Port":1,"Check":{{"TTL":"{TTL}"}}}}"#
                        )),
                    Op::Pass => {
                        client.put(format!("http://{api}/v1/agent/check/pass/service:hb-{n}"))
                    }
                };
                let t = Instant::now();
                match send(req).await {
                    None => lat.push((node, t.elapsed().as_micros() as u64)),
                    Some((kind, sample)) => {
                        let e = errors.entry(format!("n{} {kind}", node + 1));
                        e.or_insert((0, sample)).0 += 1;
                        // Don't spin on a failing server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut out = Outcome::default();
    out.by_node.resize(apis.len(), Vec::new());
    for t in tasks {
        let (lat, errors) = t.await.context("load task panicked")?;
        for (node, us) in lat {
            out.lat_us.push(us);
            out.by_node[node].push(us);
        }
        for (k, (count, sample)) in errors {
            out.sent += count;
            out.errors.entry(k).or_insert((0, sample)).0 += count;
        }
    }
    out.skipped = producer.await.context("producer panicked")?;
    out.elapsed = start.elapsed();
    out.sent += out.ok();
    out.lat_us.sort_unstable();
    out.by_node.iter_mut().for_each(|v| v.sort_unstable());
    Ok(out)
}

// ---------------------------------------------------------------------------------- phases

struct Row {
    name: &'static str,
    pace: Pace,
    clients: usize,
    out: Outcome,
    leader: usize,
    /// % of one core: each node, then the benchmark client, then the machine's steal.
    cpu: Vec<Option<f64>>,
    leader_rss_kib: Option<u64>,
    /// The leader's (commit_index, term) before and after.
    before: (u64, u64),
    after: (u64, u64),
    passing: Option<u64>,
}

/// Runs one phase and measures around it. Heartbeat phases first wait for a quiet commit
/// index, except the warm-up (`Pass` + `Count`), which afterwards waits for every instance to
/// pass before the index and the passing counts are read.
async fn phase(
    c: &Cluster,
    knobs: &Knobs,
    (name, op, clients, pace): (&'static str, Op, usize, Pace),
    notes: &mut Vec<String>,
) -> Result<Row> {
    let leader = c.wait_leader().await?;
    let warm_up = op == Op::Pass && matches!(pace, Pace::Count(_));
    if op == Op::Pass && !warm_up && !c.wait_quiet(leader).await? {
        notes.push(format!("{name}: the commit index kept moving before it."));
    }
    progress!("{name}: {clients} clients, leader node{}", leader + 1);
    let before = c.index_term(leader).await?;
    let pids = c.pids();
    let snap = cpu_snap(&pids, true);
    let apis: Vec<String> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let out = drive(&apis, knobs.instances, op, clients, pace).await?;
    let cpu = cpu_pct(&snap, &cpu_snap(&pids, true));
    let leader_rss_kib = rss_kib(pids[leader]);
    if warm_up {
        let t0 = Instant::now();
        let all = poll_until(WAIT, "every instance passing", async || {
            Ok((c.passing(leader).await? >= knobs.instances).then_some(()))
        })
        .await;
        notes.push(match all {
            Ok(()) => format!(
                "{name}: every instance passing {:.2} s after the last heartbeat was answered.",
                t0.elapsed().as_secs_f64()
            ),
            Err(e) => format!("{name}: NOT all passing: {e:#}"),
        });
    }
    let row = Row {
        name,
        pace,
        clients,
        out,
        leader,
        cpu,
        leader_rss_kib,
        before,
        after: c.index_term(leader).await?,
        passing: c.passing(leader).await.ok(),
    };
    progress!("  {}", table_row(&row));
    Ok(row)
}

// ---------------------------------------------------------------------------------- report

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

const TABLE_HEAD: &str = "| phase | target/s | clients | secs | sent | 200 | errors | skipped \
    | achieved/s | p50 ms | p99 ms | max ms | p99 ms via n1/n2/n3 | leader | leader CPU % | CPU n1/n2/n3 % \
    | bench CPU % | steal % | leader RSS MiB | leader commit index before → after (Δ) \
    | passing at end |\n\
    |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

fn table_row(r: &Row) -> String {
    let o = &r.out;
    let target = match r.pace {
        Pace::Paced(rate, _) => format!("{rate:.0}"),
        _ => "max".into(),
    };
    let term = match r.after.1 == r.before.1 {
        true => String::new(),
        false => format!(", term {} → {}", r.before.1, r.after.1),
    };
    let pct: Vec<String> = r.cpu.iter().map(|p| opt(p.map(|p| p.round()))).collect();
    let nodes = r.cpu.len() - 2;
    let by_node: Vec<String> = o.by_node.iter().map(|v| ms(pct_ms(v, 0.99))).collect();
    format!(
        "| {} | {target} | {} | {:.1} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | n{} | {} | {} \
         | {} | {} | {} | {} → {} ({:+}){term} | {} |",
        r.name,
        r.clients,
        o.elapsed.as_secs_f64(),
        o.sent,
        o.ok(),
        o.errors_text(),
        o.skipped,
        o.rate(),
        ms(pct_ms(&o.lat_us, 0.5)),
        ms(pct_ms(&o.lat_us, 0.99)),
        ms(pct_ms(&o.lat_us, 1.0)),
        by_node.join("/"),
        r.leader + 1,
        pct[r.leader],
        pct[..nodes].join("/"),
        pct[nodes],
        pct[nodes + 1],
        mib(r.leader_rss_kib),
        r.before.0,
        r.after.0,
        r.after.0 as i64 - r.before.0 as i64,
        opt(r.passing),
    )
}

fn render(rows: &[Row], knobs: &Knobs, notes: &[String]) -> String {
    let (cores, load) = machine();
    let extra = match knobs.extra_args.is_empty() {
        true => String::new(),
        false => format!(", extra flags `{}`", knobs.extra_args.join(" ")),
    };
    let mut s = format!(
        "## raftmesh TTL heartbeat benchmark\n\n3 nodes on 127.0.0.1-3, `{}` build{extra}; {} \
         instances with {TTL} TTL checks; steady target {:.0} heartbeats/s ({PACED_CLIENTS} \
         clients, each check every {:.1} s), steady and max phases {:.0} s each{}; `nproc` \
         {cores}, load average at the end {}. Requests go round-robin to n1/n2/n3 (followers \
         forward to the leader). CPU is % of one core over the phase.\n\n{TABLE_HEAD}\n",
        knobs.profile,
        knobs.instances,
        knobs.rate,
        knobs.instances as f64 / knobs.rate,
        knobs.secs.as_secs_f64(),
        if knobs.quick { " (quick)" } else { "" },
        load,
    );
    for r in rows {
        let _ = writeln!(s, "{}", table_row(r));
    }
    s.push_str("\nNotes:\n\n");
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    for r in rows {
        for (k, (_, sample)) in &r.out.errors {
            let sample: String = sample.replace('`', "'").chars().take(200).collect();
            let _ = writeln!(s, "- {} error sample, {k}: `{sample}`", r.name);
        }
    }
    s
}

async fn run() -> Result<()> {
    LazyLock::force(&common::START);
    let knobs = Knobs::from_env()?;
    progress!("knobs: {knobs:?}");
    let bin = raftmesh_bin(&knobs.profile)?;
    let http = http_client(Some(CONTROL_TIMEOUT), CONNECT_TIMEOUT, IDLE_PER_HOST)?;
    let c = Cluster::start(&bin, &knobs.extra_args, knobs.keep, http).await?;
    progress!("cluster formed, leader node{}", c.wait_leader().await? + 1);
    let mut notes = vec![format!("Binary: {}.", bin.display())];
    let (n, secs, rate) = (knobs.instances, knobs.secs, knobs.rate);
    let plan = [
        ("register", Op::Register, BURST_CLIENTS, Pace::Count(n)),
        ("warm-up", Op::Pass, BURST_CLIENTS, Pace::Count(n)),
        ("steady", Op::Pass, PACED_CLIENTS, Pace::Paced(rate, secs)),
        ("max", Op::Pass, BURST_CLIENTS, Pace::For(secs)),
    ];
    let mut rows = Vec::new();
    let mut failed = None;
    for spec in plan {
        match phase(&c, &knobs, spec, &mut notes).await {
            Ok(row) => rows.push(row),
            Err(e) => {
                progress!("{} failed: {e:#}\n{}", spec.0, c.logs_tail());
                notes.push(format!("{} FAILED: {e:#}", spec.0));
                failed = Some(anyhow!("phase {} failed", spec.0));
                break;
            }
        }
    }
    let warns: Vec<String> = c.log_warnings().iter().map(usize::to_string).collect();
    notes.push(format!(
        "WARN/ERROR lines in the node logs (n1/n2/n3): {} (`BENCH_KEEP=1` keeps the logs).",
        warns.join("/")
    ));
    drop(c);
    println!("{}", render(&rows, &knobs, &notes));
    progress!("done");
    failed.map_or(Ok(()), Err)
}

#[tokio::main]
async fn main() -> Result<()> {
    // Ctrl-C drops the running phase, whose process guards kill the servers.
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}
