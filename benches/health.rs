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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::Mutex;

/// One loopback address per node, so nodes look like distinct hosts.
const IPS: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
/// TTL of every check; the default steady rate beats each check every third of it.
const TTL: &str = "30s";
/// Clients of the register, warm-up and max phases, and of the paced steady phase.
const BURST_CLIENTS: usize = 64;
const PACED_CLIENTS: usize = 32;
/// Period of the steady phase's ticker; each tick releases the heartbeats that came due.
const TICK: Duration = Duration::from_millis(5);
/// Deadline of the condition waits (addrs.json, leader, all passing, quiet index).
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// How long the leader's commit index must hold still before a heartbeat phase.
const QUIET: Duration = Duration::from_secs(1);
/// Timeout of status and stats requests.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of a load request (above the server's 5 s write timeout plus forwarding) and of
/// one poll probe.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Linux USER_HZ; /proc CPU times are in these ticks.
const CLK_TCK: f64 = 100.0;

static START: LazyLock<Instant> = LazyLock::new(Instant::now);

macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[health {:>7.1}s] {}", START.elapsed().as_secs_f64(), format!($($arg)*))
    };
}

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

fn env_num<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            (v.trim().parse().map(Some)).map_err(|_| anyhow!("{name}={v:?} is not a valid number"))
        }
        _ => Ok(None),
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim() == "1")
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

// ---------------------------------------------------------------------------------- processes

/// A child process that is killed (by pid, SIGKILL) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // Fails only if already reaped; wait() then reports the stored status.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Last `n` lines of a log file, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `probe` until it yields `Some`, failing after `deadline` with the last message.
async fn poll_until<T>(
    deadline: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match tokio::time::timeout(LOAD_TIMEOUT, probe()).await {
            Ok(Ok(Some(v))) => return Ok(v),
            Ok(Ok(None)) => "condition not met yet".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "probe timed out".to_string(),
        };
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4)
        .no_proxy()
        .build()
        .context("build HTTP client")
}

/// The raftmesh binary: built with `cargo build --profile <BENCH_PROFILE>`, or for `release`
/// the one cargo built for this bench.
fn raftmesh_bin(profile: &str) -> Result<PathBuf> {
    if profile == "release" {
        // Cargo sets CARGO_BIN_EXE_<name> for benches, built with the bench (release) profile.
        let p = option_env!("CARGO_BIN_EXE_raftmesh").context("run through `cargo bench`")?;
        return Ok(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    progress!("building raftmesh with `cargo build --profile {profile}`");
    let st = Command::new(cargo)
        .args(["build", "--profile", profile, "--bin", "raftmesh"])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    ensure!(st.success(), "cargo build --profile {profile} failed: {st}");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let p = target.join(profile).join("raftmesh");
    ensure!(p.exists(), "{} missing after the build", p.display());
    Ok(p)
}

// ------------------------------------------------------------------------------- measurements

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// utime + stime of a process (`"self"` or a pid), in ticks.
fn proc_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Machine-wide steal ticks (the hypervisor ran someone else) from `/proc/stat`.
fn steal_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines().next()?.split_whitespace().nth(8)?.parse().ok()
}

/// CPU ticks now: each node in order, then this benchmark, then the machine's steal.
fn cpu_snap(pids: &[u32]) -> (Instant, Vec<Option<u64>>) {
    let mut v: Vec<Option<u64>> = pids.iter().map(|p| proc_ticks(&p.to_string())).collect();
    v.extend([proc_ticks("self"), steal_ticks()]);
    (Instant::now(), v)
}

/// % of one core between two snapshots, element by element.
fn cpu_pct(a: &(Instant, Vec<Option<u64>>), b: &(Instant, Vec<Option<u64>>)) -> Vec<Option<f64>> {
    let secs = b.0.duration_since(a.0).as_secs_f64().max(1e-3);
    let pct = |x: Option<u64>, y: Option<u64>| {
        Some(y?.saturating_sub(x?) as f64 / CLK_TCK / secs * 100.0)
    };
    a.1.iter().zip(&b.1).map(|(x, y)| pct(*x, *y)).collect()
}

/// The `q` quantile of sorted microseconds, in ms.
fn pct_ms(sorted_us: &[u64], q: f64) -> Option<f64> {
    let n = sorted_us.len();
    let i = ((q * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1;
    Some(*sorted_us.get(i)? as f64 / 1000.0)
}

// ---------------------------------------------------------------------------------- cluster

struct Node {
    /// Holds the data dir and `node.log`; removed on drop unless `BENCH_KEEP=1`.
    _dir: TempDir,
    log: PathBuf,
    api: String,
    proc: Proc,
}

struct Cluster {
    nodes: Vec<Node>,
    /// Control-plane client (status, stats); load clients are separate, one per worker.
    http: reqwest::Client,
}

impl Cluster {
    /// Node 1 expects 3, node 2 joins 1, node 3 joins 1 and 2; each on port 0 of its own IP.
    async fn start(bin: &Path, knobs: &Knobs) -> Result<Self> {
        let mut nodes: Vec<Node> = Vec::new();
        for (i, ip) in IPS.iter().enumerate() {
            let id = i + 1;
            let dir = (tempfile::Builder::new().prefix(&format!("raftmesh-health-n{id}-")))
                .disable_cleanup(knobs.keep)
                .tempdir()
                .context("create temp dir")?;
            if knobs.keep {
                progress!("keeping {}", dir.path().display());
            }
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data)?;
            let flags = format!(
                "agent --id {id} --name node{id} --api-addr {ip}:0 --peer-addr {ip}:0 \
                 --bootstrap-expect 3"
            );
            let mut args: Vec<String> = flags.split_whitespace().map(String::from).collect();
            args.extend(["--data-dir".into(), data.display().to_string()]);
            if !nodes.is_empty() {
                let join: Vec<&str> = nodes.iter().map(|n| n.api.as_str()).collect();
                args.extend(["--join".into(), join.join(",")]);
            }
            args.extend(knobs.extra_args.iter().cloned());
            let log = dir.path().join("node.log");
            let out =
                std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
            let child = Command::new(bin)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out.try_clone()?))
                .stderr(Stdio::from(out))
                .spawn()
                .with_context(|| format!("spawn {}", bin.display()))?;
            let mut proc = Proc(child);
            let pid = proc.0.id();
            let addrs_path = data.join("addrs.json");
            let addrs: Value = poll_until(WAIT, &format!("node{id} addrs.json"), async || {
                if let Some(st) = proc.0.try_wait()? {
                    bail!("node{id} exited ({st}); log tail:\n{}", tail(&log, 30));
                }
                let Ok(raw) = std::fs::read_to_string(&addrs_path) else {
                    return Ok(None);
                };
                let v: Value = serde_json::from_str(&raw).context("parse addrs.json")?;
                Ok((v["pid"].as_u64() == Some(u64::from(pid))).then_some(v))
            })
            .await?;
            let api = addrs["api_addr"].as_str().context("no api_addr")?;
            progress!("node{id} pid {pid} api {api}");
            let (_dir, api) = (dir, api.to_string());
            nodes.push(Node {
                _dir,
                log,
                api,
                proc,
            });
        }
        let http = http_client(CONTROL_TIMEOUT)?;
        Ok(Cluster { nodes, http })
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.proc.0.id()).collect()
    }

    async fn get_json(&self, node: usize, path: &str, client: &reqwest::Client) -> Result<Value> {
        let url = format!("http://{}{path}", self.nodes[node].api);
        let r = client.get(&url).send().await;
        let r = r.with_context(|| format!("GET {url}"))?;
        ensure!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().await.with_context(|| format!("GET {url}: body"))
    }

    async fn status(&self, node: usize) -> Result<Value> {
        self.get_json(node, "/v1/cluster/status", &self.http).await
    }

    /// Waits until every node names the same leader, which reports role leader; its index.
    async fn wait_leader(&self) -> Result<usize> {
        poll_until(WAIT, "an agreed leader", async || {
            let mut named = Vec::new();
            for i in 0..self.nodes.len() {
                named.push(self.status(i).await?["leader_id"].as_u64());
            }
            let Some(Some(l)) = named.first().copied() else {
                return Ok(None);
            };
            if named.iter().any(|n| *n != Some(l)) || !(1..=named.len() as u64).contains(&l) {
                return Ok(None);
            }
            let i = l as usize - 1;
            Ok((self.status(i).await?["role"] == "leader").then_some(i))
        })
        .await
    }

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

    fn logs_tail(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = writeln!(s, "--- node{} log tail ---\n{}", i + 1, tail(&n.log, 20));
        }
        s
    }

    /// WARN and ERROR lines in each node's log so far.
    fn log_warnings(&self) -> Vec<usize> {
        let count = |n: &Node| {
            let text = std::fs::read(&n.log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            text.lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .count()
        };
        self.nodes.iter().map(count).collect()
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
        let client = http_client(LOAD_TIMEOUT)?;
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
    let snap = cpu_snap(&pids);
    let apis: Vec<String> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let out = drive(&apis, knobs.instances, op, clients, pace).await?;
    let cpu = cpu_pct(&snap, &cpu_snap(&pids));
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

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.1}"),
    }
}

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
        opt(r
            .leader_rss_kib
            .map(|k| format!("{:.1}", k as f64 / 1024.0))),
        r.before.0,
        r.after.0,
        r.after.0 as i64 - r.before.0 as i64,
        opt(r.passing),
    )
}

fn render(rows: &[Row], knobs: &Knobs, notes: &[String]) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
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
        load.join(" "),
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
    LazyLock::force(&START);
    let knobs = Knobs::from_env()?;
    progress!("knobs: {knobs:?}");
    let bin = raftmesh_bin(&knobs.profile)?;
    let c = Cluster::start(&bin, &knobs).await?;
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
