//! End-to-end cluster benchmark of raftmesh, with etcd as a yardstick.
//!
//! Starts a three-node raftmesh cluster of real `raftmesh agent` processes (release build) on
//! 127.0.0.1, 127.0.0.2 and 127.0.0.3 (port 0, addresses read back from each node's
//! `addrs.json`; temporary data dirs) and measures:
//!
//! 1. durable registrations/s (`PUT /v1/agent/service/register`, a distinct ID per request)
//!    through the leader and through a follower at 1, 16 and 64 concurrent clients, each client
//!    a tokio task with its own keep-alive connection pool, for a fixed time per cell; only 200
//!    answers count, everything else is reported as an error; p50/p99 latency of the 200s;
//! 2. the same against a three-node etcd cluster (if `/usr/bin/etcd` or `etcd` on PATH exists;
//!    Debian: `apt-get install -y etcd-server`) through etcd's v3 JSON gateway
//!    (`POST /v3/kv/put`, same payload size), plus etcd's leader failover. Both clusters run
//!    side by side and each raftmesh cell is directly followed by the matching etcd cell, so
//!    load from other work on the machine hits both alike;
//! 3. leader failover: SIGKILL the leader, write through a survivor in a loop (250 ms timeout per
//!    request, 10 ms pause after a failure) and take the time from the kill to the first 200;
//!    restart the killed node on its data dir and ports and wait until it has caught up
//!    (applied index >= the leader's commit index) before the next kill; min/median/max;
//! 4. RSS (`VmRSS`) and data dir size per node: idle right after formation, after registering
//!    `BENCH_INSTANCES` instances (64 clients), and at the end of the run.
//!
//! For every throughput cell it also samples CPU time (`/proc/PID/stat`) of each server
//! process, of the benchmark client itself, of interrupts, of all other processes and the
//! hypervisor's steal time (`/proc/stat`), so a run disturbed by other work on the machine
//! shows it.
//!
//! Run: `cargo bench --bench cluster` (builds raftmesh in release). Knobs (environment):
//! `BENCH_SECS` seconds per throughput cell (default 5), `BENCH_KILLS` failover rounds
//! (default 10), `BENCH_INSTANCES` instances for the footprint phase (default 10000),
//! `BENCH_QUICK=1` for 1 s cells, 3 kills and 1000 instances (explicit knobs still win),
//! `BENCH_ETCD=0` to skip etcd, `BENCH_RAFTMESH_ARGS="--snapshot-every 20000"` to pass extra
//! flags to every raftmesh node, `BENCH_KEEP=1` to keep data dirs and node logs for a look.
//! Progress goes to stderr, the markdown tables to stdout.
//!
//! Servers listen on loopback only. Every process is started by this program and killed by
//! pid (`Child::kill`) when done or when the program unwinds or is interrupted with Ctrl-C.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tempfile::TempDir;

/// One loopback address per node, so nodes look like distinct hosts.
const IPS: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
const CLIENTS: [usize; 3] = [1, 16, 64];
/// Clients used to load the footprint instances.
const LOAD_CLIENTS: usize = 64;
/// Deadline of the condition waits (formation, leader, catch-up).
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// Timeout of control requests (status probes).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of a load request: above raftmesh's default write timeout (5 s) plus forwarding.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-request timeout while probing for the new leader after a kill; it bounds the resolution
/// for servers that hold a request whose proposal got lost with the old leader (etcd does).
const FAILOVER_TIMEOUT: Duration = Duration::from_millis(250);
const FAILOVER_PAUSE: Duration = Duration::from_millis(10);
/// Give up on one failover round after this long without a 200.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// Linux USER_HZ; /proc CPU times are in these ticks.
const CLK_TCK: f64 = 100.0;

static START: LazyLock<Instant> = LazyLock::new(Instant::now);
/// `BENCH_KEEP=1`: leave the temporary data dirs and logs behind (paths go to stderr).
static KEEP: LazyLock<bool> = LazyLock::new(|| env_flag("BENCH_KEEP"));

macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[bench {:>7.1}s] {}", START.elapsed().as_secs_f64(), format!($($arg)*))
    };
}

// ------------------------------------------------------------------------------------ knobs

#[derive(Debug, Clone)]
struct Knobs {
    secs: Duration,
    kills: usize,
    instances: u64,
    quick: bool,
    etcd: bool,
    /// Extra `raftmesh agent` flags for every node (`BENCH_RAFTMESH_ARGS`, whitespace-separated).
    extra_args: Vec<String>,
}

fn env_num<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| anyhow!("{name}={v:?} is not a valid number")),
        _ => Ok(None),
    }
}

fn env_flag(name: &str) -> bool {
    matches!(
        std::env::var(name).as_deref().map(str::trim),
        Ok("1" | "true" | "yes" | "on")
    )
}

impl Knobs {
    fn from_env() -> Result<Self> {
        let quick = env_flag("BENCH_QUICK");
        let secs: f64 = env_num("BENCH_SECS")?.unwrap_or(if quick { 1.0 } else { 5.0 });
        ensure!(
            secs > 0.0 && secs <= 600.0,
            "BENCH_SECS must be in (0, 600]"
        );
        let kills = env_num("BENCH_KILLS")?.unwrap_or(if quick { 3 } else { 10 });
        let instances = env_num("BENCH_INSTANCES")?.unwrap_or(if quick { 1000 } else { 10_000 });
        let etcd = !matches!(
            std::env::var("BENCH_ETCD").as_deref().map(str::trim),
            Ok("0" | "false" | "no" | "off")
        );
        let extra_args = std::env::var("BENCH_RAFTMESH_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Ok(Knobs {
            secs: Duration::from_secs_f64(secs),
            kills,
            instances,
            quick,
            etcd,
            extra_args,
        })
    }
}

// ---------------------------------------------------------------------------------- processes

/// A child process that is killed (by pid, SIGKILL) and reaped when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(label: &str, program: &Path, args: &[String], log: &Path) -> Result<Self> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        writeln!(
            out,
            "===== bench: {} {} =====",
            program.display(),
            args.join(" ")
        )?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("spawn {label}: {}", program.display()))?;
        Ok(Proc { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited on its own.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Fails only if already reaped; wait() then reports the stored status.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory, removed on drop unless `BENCH_KEEP=1`.
fn temp_dir(prefix: &str) -> Result<TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(*KEEP)
        .tempdir()
        .context("create temp dir")?;
    if *KEEP {
        progress!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// Last `n` lines of a log file, for error messages.
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Polls `probe` until it yields `Some`, failing after `deadline` with the last message.
async fn poll_until<T>(
    deadline: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::from("no attempt finished");
    loop {
        match tokio::time::timeout(CONTROL_TIMEOUT * 2, probe()).await {
            Ok(Ok(Some(v))) => return Ok(v),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = "probe timed out".into(),
        }
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn http_client(timeout: Duration, pooled: bool) -> Result<reqwest::Client> {
    let b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .no_proxy();
    let b = if pooled {
        b.pool_max_idle_per_host(4)
    } else {
        b.pool_max_idle_per_host(0)
    };
    b.build().context("build HTTP client")
}

/// A free TCP port on `ip` (bound and released; good enough on an otherwise quiet loopback).
fn free_ports(ip: &str, n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind((ip, 0)).with_context(|| format!("bind {ip}:0")))
        .collect::<Result<_>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

// ------------------------------------------------------------------------------- measurements

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// utime + stime of a process, in ticks.
fn proc_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Machine-wide ticks (all CPUs) from `/proc/stat`.
#[derive(Clone, Copy)]
struct MachineTicks {
    /// user + nice + system: time of processes (ours included).
    procs: u64,
    /// irq + softirq: not charged to any process (loopback networking lands here).
    irq: u64,
    /// Time the hypervisor gave to someone else (other VMs on the host).
    steal: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is already inside user)
    Some(MachineTicks {
        procs: v.first()? + v.get(1)? + v.get(2)?,
        irq: v.get(5)? + v.get(6)?,
        steal: *v.get(7)?,
    })
}

/// CPU ticks and command name of every process on the machine.
fn all_procs() -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(a), Some(b)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        // Kernel threads change names with their work ("kworker/0:1-events"): group them.
        let name = &stat[a + 1..b];
        let name = match name.split_once('/') {
            Some((base, rest)) if rest.starts_with(|c: char| c.is_ascii_digit() || c == 'u') => {
                base
            }
            _ => name,
        };
        if let Some(t) = proc_ticks(&pid.to_string()) {
            out.insert(pid, (name.to_string(), t));
        }
    }
    out
}

#[derive(Clone)]
struct CpuSnap {
    at: Instant,
    servers: Vec<Option<u64>>,
    me: Option<u64>,
    machine: Option<MachineTicks>,
    all: BTreeMap<u32, (String, u64)>,
    ours: Vec<u32>,
}

fn cpu_snap(pids: &[Option<u32>]) -> CpuSnap {
    CpuSnap {
        at: Instant::now(),
        servers: pids
            .iter()
            .map(|p| p.and_then(|p| proc_ticks(&p.to_string())))
            .collect(),
        me: proc_ticks("self"),
        machine: machine_ticks(),
        all: all_procs(),
        ours: pids
            .iter()
            .flatten()
            .copied()
            .chain([std::process::id()])
            .collect(),
    }
}

/// CPU use over an interval, in percent of one core (2 cores = 200 %).
#[derive(Clone, Debug, Default)]
struct CpuUse {
    servers: Vec<Option<f64>>,
    bench: Option<f64>,
    /// Processes other than the servers and the benchmark client.
    other: Option<f64>,
    irq: Option<f64>,
    steal: Option<f64>,
    /// Other processes by command name, busiest first (% of one core).
    top_other: Vec<(String, f64)>,
    secs: f64,
}

fn cpu_use(a: &CpuSnap, b: &CpuSnap) -> CpuUse {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let pct = |x: Option<u64>, y: Option<u64>| -> Option<f64> {
        Some(y?.saturating_sub(x?) as f64 / CLK_TCK / secs * 100.0)
    };
    let servers: Vec<Option<f64>> = a
        .servers
        .iter()
        .zip(&b.servers)
        .map(|(x, y)| pct(*x, *y))
        .collect();
    let bench = pct(a.me, b.me);
    let field =
        |f: fn(&MachineTicks) -> u64| pct(a.machine.as_ref().map(f), b.machine.as_ref().map(f));
    let machine = field(|m| m.procs);
    let ours: f64 = servers.iter().flatten().sum::<f64>() + bench.unwrap_or(0.0);
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    for (pid, (name, t)) in &b.all {
        if b.ours.contains(pid) {
            continue;
        }
        // A process that started during the interval counts with all its time.
        let before = a.all.get(pid).filter(|(n, _)| n == name).map_or(0, |x| x.1);
        *by_name.entry(name.clone()).or_default() += t.saturating_sub(before);
    }
    let mut top_other: Vec<(String, f64)> = by_name
        .into_iter()
        .map(|(n, t)| (n, t as f64 / CLK_TCK / secs * 100.0))
        .filter(|(_, p)| *p >= 1.0)
        .collect();
    top_other.sort_by(|x, y| y.1.total_cmp(&x.1));
    let other = machine.map(|m| (m - ours).max(0.0));
    // What no live process accounts for: processes that exited during the interval.
    let seen: f64 = top_other.iter().map(|x| x.1).sum();
    if let Some(rest) = other.map(|o| o - seen).filter(|r| *r >= 5.0) {
        top_other.push(("(exited during the cell)".into(), rest));
    }
    CpuUse {
        other,
        irq: field(|m| m.irq),
        steal: field(|m| m.steal),
        servers,
        bench,
        top_other,
        secs,
    }
}

// ---------------------------------------------------------------------------------- load

/// Builds request number `seq` on a client's own connection pool.
type MakeReq = Arc<dyn Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync>;

#[derive(Clone, Copy)]
enum Stop {
    After(Duration),
    Count(u64),
}

#[derive(Default)]
struct LoadResult {
    ok: u64,
    /// Latencies of the 200 answers, microseconds, sorted.
    lat_us: Vec<u64>,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    cpu: CpuUse,
}

impl LoadResult {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn pct_ms(&self, q: f64) -> Option<f64> {
        if self.lat_us.is_empty() {
            return None;
        }
        let n = self.lat_us.len();
        let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        Some(self.lat_us[i] as f64 / 1000.0)
    }

    fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn top_text(top: &[(String, f64)], n: usize) -> String {
    top.iter()
        .take(n)
        .map(|(name, p)| format!("{name} {p:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn log_cell(res: &LoadResult) {
    progress!(
        "  {:.0} ok/s, p50 {} ms, p99 {} ms, errors {}; CPU servers {:?} bench {:.0}% \
         irq {:.0}% steal {:.0}% other {:.0}% ({})",
        res.rate(),
        opt_ms(res.pct_ms(0.5)),
        opt_ms(res.pct_ms(0.99)),
        res.errors_text(),
        res.cpu
            .servers
            .iter()
            .map(|c| c.map_or(-1, |c| c.round() as i64))
            .collect::<Vec<_>>(),
        res.cpu.bench.unwrap_or(-1.0),
        res.cpu.irq.unwrap_or(-1.0),
        res.cpu.steal.unwrap_or(-1.0),
        res.cpu.other.unwrap_or(-1.0),
        top_text(&res.cpu.top_other, 4),
    );
}

fn error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "transport".into()
    }
}

/// Runs `clients` concurrent request loops until `stop`, each on its own client (pool).
async fn run_load(
    clients: usize,
    stop: Stop,
    make: MakeReq,
    pids: &[Option<u32>],
) -> Result<LoadResult> {
    let next = Arc::new(AtomicU64::new(0));
    let before = cpu_snap(pids);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = http_client(LOAD_TIMEOUT, true)?;
        let next = next.clone();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                match stop {
                    Stop::After(d) if start.elapsed() >= d => break,
                    Stop::Count(n) if seq >= n => break,
                    _ => {}
                }
                let t = Instant::now();
                let failed = match make(&client, seq).send().await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let body = resp.bytes().await;
                        match (status, body) {
                            (200, Ok(_)) => {
                                lat.push(t.elapsed().as_micros() as u64);
                                None
                            }
                            (200, Err(e)) => Some(format!("body {}", error_kind(&e))),
                            (s, _) => Some(format!("HTTP {s}")),
                        }
                    }
                    Err(e) => Some(error_kind(&e)),
                };
                if let Some(kind) = failed {
                    *errors.entry(kind).or_default() += 1;
                    // Don't spin on a failing server.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            (lat, errors)
        }));
    }
    let mut out = LoadResult::default();
    for t in tasks {
        let (lat, errors) = t.await.context("load task panicked")?;
        out.lat_us.extend(lat);
        for (k, v) in errors {
            *out.errors.entry(k).or_default() += v;
        }
    }
    out.elapsed = start.elapsed();
    out.cpu = cpu_use(&before, &cpu_snap(pids));
    out.ok = out.lat_us.len() as u64;
    out.lat_us.sort_unstable();
    Ok(out)
}

/// A registration body of realistic size, distinct ID per `seq`.
fn register_body(prefix: &str, seq: u64) -> String {
    format!(
        r#"{{"Name":"bench-svc-{}","ID":"{prefix}-{seq}","Tags":["bench","v1"],"Address":"127.0.0.1","Port":{},"Meta":{{"zone":"a","version":"1.2.3"}}}}"#,
        seq % 32,
        1024 + seq % 50000
    )
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An etcd put of the same payload as a raftmesh registration, distinct key per `seq`.
fn etcd_put_body(prefix: &str, seq: u64) -> String {
    let key = format!("bench/{prefix}/{seq}");
    json!({
        "key": base64(key.as_bytes()),
        "value": base64(register_body(prefix, seq).as_bytes()),
    })
    .to_string()
}

// ---------------------------------------------------------------------------- raftmesh cluster

struct RmNode {
    id: u64,
    ip: &'static str,
    dir: TempDir,
    /// Flags other than the listen addresses; the same for every run.
    flags: Vec<String>,
    api: Option<String>,
    peer: Option<String>,
    proc: Option<Proc>,
}

impl RmNode {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }
}

struct RmCluster {
    bin: PathBuf,
    nodes: Vec<RmNode>,
    http: reqwest::Client,
}

fn raftmesh_bin() -> Result<(PathBuf, &'static str)> {
    // Cargo sets CARGO_BIN_EXE_<name> for integration tests and benches.
    if let Some(p) = option_env!("CARGO_BIN_EXE_raftmesh") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok((p, "CARGO_BIN_EXE_raftmesh"));
        }
    }
    // Fallback: target/release/deps/cluster-<hash> -> target/release/raftmesh.
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("raftmesh"))
        .context("no parent dir of the bench executable")?;
    ensure!(
        p.exists(),
        "raftmesh binary not found at {}; run through `cargo bench --bench cluster`",
        p.display()
    );
    Ok((p, "next to the bench executable"))
}

impl RmCluster {
    fn new(bin: PathBuf, extra_args: &[String]) -> Result<Self> {
        let mut nodes = Vec::new();
        for (i, ip) in IPS.iter().enumerate() {
            let id = i as u64 + 1;
            let dir = temp_dir(&format!("raftmesh-bench-n{id}-"))?;
            std::fs::create_dir_all(dir.path().join("data"))?;
            let mut flags: Vec<String> = vec![
                "agent".into(),
                "--id".into(),
                id.to_string(),
                "--name".into(),
                format!("node{id}"),
                "--data-dir".into(),
                dir.path().join("data").display().to_string(),
                "--bootstrap-expect".into(),
                "3".into(),
            ];
            flags.extend(extra_args.iter().cloned());
            nodes.push(RmNode {
                id,
                ip,
                dir,
                flags,
                api: None,
                peer: None,
                proc: None,
            });
        }
        Ok(RmCluster {
            bin,
            nodes,
            http: http_client(CONTROL_TIMEOUT, false)?,
        })
    }

    fn idx(&self, id: u64) -> usize {
        (id - 1) as usize
    }

    fn api(&self, id: u64) -> &str {
        self.nodes[self.idx(id)].api.as_deref().unwrap_or("")
    }

    fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn pids(&self) -> Vec<Option<u32>> {
        self.nodes
            .iter()
            .map(|n| n.proc.as_ref().map(Proc::pid))
            .collect()
    }

    /// Spawns node `id` (ports from its first run on restarts) and waits for its addrs.json.
    async fn start(&mut self, id: u64, join: &[String]) -> Result<()> {
        let i = self.idx(id);
        let node = &mut self.nodes[i];
        let mut args = node.flags.clone();
        if !join.is_empty() {
            args.extend(["--join".into(), join.join(",")]);
        }
        let api = node.api.clone().unwrap_or(format!("{}:0", node.ip));
        let peer = node.peer.clone().unwrap_or(format!("{}:0", node.ip));
        args.extend(["--api-addr".into(), api, "--peer-addr".into(), peer]);
        let addrs_path = node.data_dir().join("addrs.json");
        node.proc = Some(Proc::spawn(
            &format!("raftmesh node{id}"),
            &self.bin,
            &args,
            &node.log(),
        )?);
        let log = node.log();
        let proc = node.proc.as_mut().expect("just spawned");
        let pid = proc.pid();
        let addrs: Value = poll_until(WAIT, &format!("node{id} addrs.json"), async || {
            if let Some(st) = proc.exited() {
                bail!("node{id} exited ({st}); log tail:\n{}", tail(&log, 30));
            }
            let Ok(raw) = std::fs::read_to_string(&addrs_path) else {
                return Ok(None);
            };
            let v: Value = serde_json::from_str(&raw).context("parse addrs.json")?;
            Ok((v["pid"].as_u64() == Some(u64::from(pid))).then_some(v))
        })
        .await?;
        let api = addrs["api_addr"]
            .as_str()
            .context("no api_addr")?
            .to_string();
        let peer = addrs["peer_addr"]
            .as_str()
            .context("no peer_addr")?
            .to_string();
        if let (Some(a), Some(p)) = (&node.api, &node.peer) {
            ensure!(
                *a == api && *p == peer,
                "node{id} restarted on other addresses"
            );
        }
        node.api = Some(api);
        node.peer = Some(peer);
        Ok(())
    }

    /// Node 1 expects 3, node 2 joins 1, node 3 joins 1 and 2; returns the agreed leader.
    async fn form(&mut self) -> Result<u64> {
        let mut apis: Vec<String> = Vec::new();
        for id in self.ids() {
            self.start(id, &apis).await?;
            apis.push(self.api(id).to_string());
        }
        self.wait_leader().await
    }

    fn kill(&mut self, id: u64) {
        let i = self.idx(id);
        drop(self.nodes[i].proc.take());
    }

    async fn status(&self, id: u64) -> Result<Value> {
        let url = format!("http://{}/v1/cluster/status", self.api(id));
        let r = self.http.get(&url).send().await?;
        ensure!(
            r.status().is_success(),
            "status of node{id}: {}",
            r.status()
        );
        Ok(r.json().await?)
    }

    /// Waits until every running node names the same leader, which reports role leader.
    async fn wait_leader(&self) -> Result<u64> {
        let running: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.proc.is_some())
            .map(|n| n.id)
            .collect();
        poll_until(WAIT, "an agreed raftmesh leader", async || {
            let mut agreed = None;
            for &id in &running {
                let Some(l) = self.status(id).await?["leader_id"].as_u64() else {
                    return Ok(None);
                };
                if agreed.is_some_and(|a| a != l) {
                    return Ok(None);
                }
                agreed = Some(l);
            }
            let Some(l) = agreed.filter(|l| running.contains(l)) else {
                return Ok(None);
            };
            Ok((self.status(l).await?["role"] == "leader").then_some(l))
        })
        .await
    }

    /// Waits until every running node's applied index reaches the leader's commit index.
    async fn wait_caught_up(&self, leader: u64, ids: &[u64]) -> Result<()> {
        poll_until(WAIT, "followers to catch up", async || {
            let commit = self.status(leader).await?["commit_index"]
                .as_u64()
                .context("no commit_index")?;
            for &id in ids {
                let applied = self.status(id).await?["applied_index"]
                    .as_u64()
                    .context("no applied_index")?;
                if applied < commit {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await
    }

    fn register_maker(&self, id: u64, prefix: &str) -> MakeReq {
        let url = format!("http://{}/v1/agent/service/register", self.api(id));
        let prefix = prefix.to_string();
        Arc::new(move |c: &reqwest::Client, seq: u64| {
            c.put(&url)
                .header("content-type", "application/json")
                .body(register_body(&prefix, seq))
        })
    }

    fn footprint(&self, phase: &str) -> Vec<FootRow> {
        self.nodes
            .iter()
            .map(|n| FootRow {
                system: "raftmesh",
                phase: phase.to_string(),
                node: format!("node{}", n.id),
                rss_kib: n.proc.as_ref().and_then(|p| rss_kib(p.pid())),
                disk: dir_size(&n.data_dir()),
            })
            .collect()
    }

    fn logs_tail(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let _ = writeln!(s, "--- node{} log tail ---\n{}", n.id, tail(&n.log(), 20));
        }
        s
    }
}

// -------------------------------------------------------------------------------- etcd cluster

struct EtcdNode {
    name: String,
    dir: TempDir,
    args: Vec<String>,
    client_url: String,
    proc: Option<Proc>,
}

impl EtcdNode {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }
}

struct EtcdCluster {
    bin: PathBuf,
    nodes: Vec<EtcdNode>,
    http: reqwest::Client,
}

#[derive(Debug, Clone, Copy)]
struct EtcdStatus {
    member_id: u64,
    leader: u64,
    raft_index: u64,
    applied: u64,
}

/// etcd's gateway encodes 64-bit integers as JSON strings.
fn lenient_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

fn etcd_bin() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/bin/etcd");
    if fixed.exists() {
        return Some(fixed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

impl EtcdCluster {
    fn new(bin: PathBuf) -> Result<Self> {
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for ip in IPS {
            let p = free_ports(ip, 2)?;
            clients.push(format!("http://{ip}:{}", p[0]));
            peers.push(format!("http://{ip}:{}", p[1]));
        }
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{}={p}", i + 1))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..IPS.len() {
            let name = format!("e{}", i + 1);
            let dir = temp_dir(&format!("etcd-bench-{name}-"))?;
            let args: Vec<String> = [
                "--name",
                &name,
                "--data-dir",
                &dir.path().join("data").display().to_string(),
                "--listen-client-urls",
                &clients[i],
                "--advertise-client-urls",
                &clients[i],
                "--listen-peer-urls",
                &peers[i],
                "--initial-advertise-peer-urls",
                &peers[i],
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-token",
                "raftmesh-bench",
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            nodes.push(EtcdNode {
                name,
                dir,
                args,
                client_url: clients[i].clone(),
                proc: None,
            });
        }
        Ok(EtcdCluster {
            bin,
            nodes,
            http: http_client(CONTROL_TIMEOUT, false)?,
        })
    }

    fn pids(&self) -> Vec<Option<u32>> {
        self.nodes
            .iter()
            .map(|n| n.proc.as_ref().map(Proc::pid))
            .collect()
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let n = &mut self.nodes[i];
        n.proc = Some(Proc::spawn(
            &format!("etcd {}", n.name),
            &self.bin,
            &n.args,
            &n.log(),
        )?);
        Ok(())
    }

    async fn start_all(&mut self) -> Result<usize> {
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        self.wait_leader().await
    }

    fn kill(&mut self, i: usize) {
        drop(self.nodes[i].proc.take());
    }

    async fn status(&self, i: usize) -> Result<EtcdStatus> {
        etcd_status(&self.http, &self.nodes[i].client_url).await
    }

    async fn wait_leader(&mut self) -> Result<usize> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].proc.is_some())
            .collect();
        let urls: Vec<String> = self.nodes.iter().map(|n| n.client_url.clone()).collect();
        let mut procs: Vec<(String, &mut Proc, PathBuf)> = Vec::new();
        for n in self.nodes.iter_mut() {
            let log = n.log();
            if let Some(p) = n.proc.as_mut() {
                procs.push((n.name.clone(), p, log));
            }
        }
        let http = &self.http;
        poll_until(WAIT, "an agreed etcd leader", async || {
            for (name, p, log) in procs.iter_mut() {
                if let Some(st) = p.exited() {
                    bail!("etcd {name} exited ({st}); log tail:\n{}", tail(log, 30));
                }
            }
            let mut agreed: Option<u64> = None;
            let mut members = Vec::new();
            for &i in &running {
                let st = etcd_status(http, &urls[i]).await;
                let Ok(st) = st else { return Ok(None) };
                if st.leader == 0 || agreed.is_some_and(|a| a != st.leader) {
                    return Ok(None);
                }
                agreed = Some(st.leader);
                members.push((i, st.member_id));
            }
            Ok(members
                .iter()
                .find(|(_, m)| Some(*m) == agreed)
                .map(|(i, _)| *i))
        })
        .await
    }

    fn put_maker(&self, i: usize, prefix: &str) -> MakeReq {
        let url = format!("{}/v3/kv/put", self.nodes[i].client_url);
        let prefix = prefix.to_string();
        Arc::new(move |c: &reqwest::Client, seq: u64| {
            c.post(&url)
                .header("content-type", "application/json")
                .body(etcd_put_body(&prefix, seq))
        })
    }

    async fn wait_caught_up(&self, leader: usize, ids: &[usize]) -> Result<()> {
        poll_until(WAIT, "etcd members to catch up", async || {
            let commit = self.status(leader).await?.raft_index;
            for &i in ids {
                if self.status(i).await?.applied < commit {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await
    }

    fn footprint(&self, phase: &str) -> Vec<FootRow> {
        self.nodes
            .iter()
            .map(|n| FootRow {
                system: "etcd",
                phase: phase.to_string(),
                node: n.name.clone(),
                rss_kib: n.proc.as_ref().and_then(|p| rss_kib(p.pid())),
                disk: dir_size(&n.data_dir()),
            })
            .collect()
    }

    fn logs_tail(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "--- etcd {} log tail ---\n{}",
                n.name,
                tail(&n.log(), 20)
            );
        }
        s
    }
}

async fn etcd_status(http: &reqwest::Client, base: &str) -> Result<EtcdStatus> {
    let r = http
        .post(format!("{base}/v3/maintenance/status"))
        .body("{}")
        .send()
        .await?;
    ensure!(r.status().is_success(), "etcd status {}", r.status());
    let v: Value = r.json().await?;
    let raft_index = lenient_u64(&v["raftIndex"]).context("no raftIndex")?;
    Ok(EtcdStatus {
        member_id: lenient_u64(&v["header"]["member_id"]).context("no member_id")?,
        leader: lenient_u64(&v["leader"]).unwrap_or(0),
        raft_index,
        applied: lenient_u64(&v["raftAppliedIndex"]).unwrap_or(raft_index),
    })
}

// ------------------------------------------------------------------------------------ report

struct ThroughputRow {
    system: &'static str,
    via: String,
    clients: usize,
    res: LoadResult,
    /// Labels of the server processes, in the order of `res.cpu.servers`.
    server_labels: Vec<String>,
}

struct FailoverRow {
    system: &'static str,
    /// Kill to first 200, per round.
    times: Vec<Duration>,
    /// Restart spawn to caught up, per round.
    catch_up: Vec<Duration>,
    failures: Vec<String>,
}

struct FootRow {
    system: &'static str,
    phase: String,
    node: String,
    rss_kib: Option<u64>,
    disk: u64,
}

#[derive(Default)]
struct Report {
    throughput: Vec<ThroughputRow>,
    failover: Vec<FailoverRow>,
    footprint: Vec<FootRow>,
    notes: Vec<String>,
}

fn pct0(v: Option<f64>) -> String {
    v.map_or("-".into(), |c| format!("{c:.0}"))
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn median(v: &[Duration]) -> Option<Duration> {
    let mut s = v.to_vec();
    s.sort();
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2),
    }
}

fn render(report: &Report, knobs: &Knobs, header: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{header}\n");
    let _ = writeln!(
        o,
        "### Durable writes ({} s per cell; raftmesh: `PUT /v1/agent/service/register`, etcd: `POST /v3/kv/put` via the JSON gateway)\n",
        knobs.secs.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "| system | through | clients | ok/s | p50 ms | p99 ms | ok | errors | CPU % per node | CPU % bench | CPU % irq | CPU % other / steal |"
    );
    let _ = writeln!(o, "|---|---|--:|--:|--:|--:|--:|---|---|--:|--:|--:|");
    // Cells ran interleaved; show each system's rows together, raftmesh first.
    let mut rows: Vec<&ThroughputRow> = report.throughput.iter().collect();
    rows.sort_by_key(|r| r.system != "raftmesh");
    for r in rows {
        let cpu_nodes: Vec<String> = r
            .server_labels
            .iter()
            .zip(&r.res.cpu.servers)
            .map(|(l, c)| format!("{l} {}", c.map_or("-".into(), |c| format!("{c:.0}"))))
            .collect();
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            r.system,
            r.via,
            r.clients,
            r.res.rate(),
            opt_ms(r.res.pct_ms(0.50)),
            opt_ms(r.res.pct_ms(0.99)),
            r.res.ok,
            r.res.errors_text(),
            cpu_nodes.join(" / "),
            pct0(r.res.cpu.bench),
            pct0(r.res.cpu.irq),
            pct0(r.res.cpu.other),
            pct0(r.res.cpu.steal),
        );
    }
    let _ = writeln!(
        o,
        "\n### Leader failover (SIGKILL the leader, then time to the first 200 write through a survivor; tries time out after {} ms)\n",
        FAILOVER_TIMEOUT.as_millis()
    );
    let _ = writeln!(
        o,
        "| system | kills | min ms | median ms | max ms | restart catch-up median ms | all (ms) |"
    );
    let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|---|");
    for f in &report.failover {
        let min = f.times.iter().min().copied();
        let max = f.times.iter().max().copied();
        let all: Vec<String> = f.times.iter().map(|d| ms(*d)).collect();
        let _ = writeln!(
            o,
            "| {} | {}{} | {} | {} | {} | {} | {} |",
            f.system,
            f.times.len(),
            if f.failures.is_empty() {
                String::new()
            } else {
                format!(" ({} failed)", f.failures.len())
            },
            min.map_or("-".into(), ms),
            median(&f.times).map_or("-".into(), ms),
            max.map_or("-".into(), ms),
            median(&f.catch_up).map_or("-".into(), ms),
            all.join(", "),
        );
    }
    let _ = writeln!(o, "\n### Footprint per node\n");
    let _ = writeln!(o, "| system | phase | node | RSS MiB | data dir MiB |");
    let _ = writeln!(o, "|---|---|---|--:|--:|");
    let mut foot: Vec<&FootRow> = report.footprint.iter().collect();
    foot.sort_by_key(|f| f.system != "raftmesh");
    for f in foot {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {:.1} |",
            f.system,
            f.phase,
            f.node,
            f.rss_kib
                .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
            f.disk as f64 / (1024.0 * 1024.0),
        );
    }
    let mut other: BTreeMap<String, f64> = BTreeMap::new();
    let total_secs: f64 = report.throughput.iter().map(|r| r.res.cpu.secs).sum();
    for r in &report.throughput {
        for (name, p) in &r.res.cpu.top_other {
            *other.entry(name.clone()).or_default() += p * r.res.cpu.secs;
        }
    }
    let mut other: Vec<(String, f64)> = other
        .into_iter()
        .map(|(n, t)| (n, t / total_secs.max(1e-9)))
        .filter(|(_, p)| *p >= 1.0)
        .collect();
    other.sort_by(|x, y| y.1.total_cmp(&x.1));
    let mut notes = report.notes.clone();
    if !other.is_empty() {
        notes.push(format!(
            "Busiest other processes during the throughput cells (mean % of one core; kernel \
             threads such as jbd2/kworker partly work for our fsyncs): {}.",
            top_text(&other, 6)
        ));
    }
    if !notes.is_empty() {
        let _ = writeln!(o, "\nNotes:\n");
        for n in &notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

// ------------------------------------------------------------------------------------ phases

/// Forms the raftmesh cluster, records the idle footprint, loads the instances and records the
/// footprint again.
async fn rm_setup(knobs: &Knobs, report: &mut Report) -> Result<RmCluster> {
    let (bin, how) = raftmesh_bin()?;
    progress!("raftmesh binary: {} (found via {how})", bin.display());
    let mut c = RmCluster::new(bin, &knobs.extra_args)?;
    let t = Instant::now();
    let leader = match c.form().await {
        Ok(l) => l,
        Err(e) => bail!("{e:#}\n{}", c.logs_tail()),
    };
    progress!(
        "raftmesh formed in {:.1}s, leader node{leader}",
        t.elapsed().as_secs_f64()
    );
    let ids = c.ids();
    c.wait_caught_up(leader, &ids).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.footprint.extend(c.footprint("idle after formation"));

    progress!(
        "raftmesh: registering {} instances with {LOAD_CLIENTS} clients",
        knobs.instances
    );
    let res = run_load(
        LOAD_CLIENTS,
        Stop::Count(knobs.instances),
        c.register_maker(leader, "inst"),
        &c.pids(),
    )
    .await?;
    let leader = c.wait_leader().await?;
    c.wait_caught_up(leader, &ids).await?;
    report.notes.push(format!(
        "raftmesh: loaded {} instances in {:.1} s ({:.0}/s, {LOAD_CLIENTS} clients, errors: {}, \
         CPU other {:.0} %).",
        res.ok,
        res.elapsed.as_secs_f64(),
        res.rate(),
        res.errors_text(),
        res.cpu.other.unwrap_or(-1.0),
    ));
    report
        .footprint
        .extend(c.footprint(&format!("after {} instances", res.ok)));
    Ok(c)
}

/// One raftmesh throughput cell through the leader or a follower.
async fn rm_cell(
    c: &RmCluster,
    role: &str,
    clients: usize,
    knobs: &Knobs,
) -> Result<ThroughputRow> {
    let ids = c.ids();
    let leader = c.wait_leader().await?;
    c.wait_caught_up(leader, &ids).await?;
    let via = if role == "leader" {
        leader
    } else {
        *ids.iter().find(|&&id| id != leader).expect("3 nodes")
    };
    progress!("raftmesh: {clients} clients through {role} node{via}");
    let res = run_load(
        clients,
        Stop::After(knobs.secs),
        c.register_maker(via, &format!("tp-{role}-{clients}")),
        &c.pids(),
    )
    .await?;
    log_cell(&res);
    Ok(ThroughputRow {
        system: "raftmesh",
        via: format!("{role} (n{via})"),
        clients,
        res,
        server_labels: ids.iter().map(|id| format!("n{id}")).collect(),
    })
}

/// Writes through `url` until a 200 (fresh request body per try from `body`).
async fn first_ok(
    probe: &reqwest::Client,
    put: bool,
    url: &str,
    body: impl Fn(u64) -> String,
    t0: Instant,
) -> (Result<Duration, String>, u64) {
    let mut tries = 0u64;
    loop {
        tries += 1;
        let req = if put { probe.put(url) } else { probe.post(url) };
        let ok = req
            .header("content-type", "application/json")
            .body(body(tries))
            .send()
            .await
            .map(|r| r.status().as_u16() == 200)
            .unwrap_or(false);
        if ok {
            return (Ok(t0.elapsed()), tries);
        }
        if t0.elapsed() > FAILOVER_DEADLINE {
            return (Err(format!("no 200 within {FAILOVER_DEADLINE:?}")), tries);
        }
        tokio::time::sleep(FAILOVER_PAUSE).await;
    }
}

async fn rm_failover(c: &mut RmCluster, knobs: &Knobs) -> Result<FailoverRow> {
    let ids = c.ids();
    let mut fo = FailoverRow {
        system: "raftmesh",
        times: Vec::new(),
        catch_up: Vec::new(),
        failures: Vec::new(),
    };
    let probe = http_client(FAILOVER_TIMEOUT, true)?;
    for round in 0..knobs.kills {
        let leader = c.wait_leader().await?;
        c.wait_caught_up(leader, &ids).await?;
        let survivor = *ids.iter().find(|&&id| id != leader).expect("3 nodes");
        let url = format!("http://{}/v1/agent/service/register", c.api(survivor));
        // Warm the probe's connection to the survivor so the first post-kill try is cheap.
        let _ = probe
            .put(&url)
            .body(register_body(&format!("fo{round}-warm"), 0))
            .send()
            .await;
        let t0 = Instant::now();
        c.kill(leader);
        let prefix = format!("fo{round}");
        let (outcome, tries) =
            first_ok(&probe, true, &url, |n| register_body(&prefix, n), t0).await;
        match outcome {
            Ok(d) => {
                progress!(
                    "raftmesh failover {}/{}: killed node{leader}, first 200 via node{survivor} \
                     after {} ms ({tries} tries)",
                    round + 1,
                    knobs.kills,
                    ms(d)
                );
                fo.times.push(d);
            }
            Err(e) => {
                progress!("raftmesh failover round {round}: {e}");
                fo.failures.push(e);
            }
        }
        let t1 = Instant::now();
        c.start(leader, &[]).await?;
        let new_leader = c.wait_leader().await?;
        c.wait_caught_up(new_leader, &[leader]).await?;
        fo.catch_up.push(t1.elapsed());
    }
    Ok(fo)
}

/// Starts the etcd cluster and does what `rm_setup` does.
async fn etcd_setup(bin: PathBuf, knobs: &Knobs, report: &mut Report) -> Result<EtcdCluster> {
    let mut c = EtcdCluster::new(bin)?;
    let t = Instant::now();
    let leader = match c.start_all().await {
        Ok(l) => l,
        Err(e) => bail!("{e:#}\n{}", c.logs_tail()),
    };
    progress!(
        "etcd formed in {:.1}s, leader {}",
        t.elapsed().as_secs_f64(),
        c.nodes[leader].name
    );
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    c.wait_caught_up(leader, &all).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.footprint.extend(c.footprint("idle after formation"));

    progress!(
        "etcd: putting {} keys with {LOAD_CLIENTS} clients",
        knobs.instances
    );
    let res = run_load(
        LOAD_CLIENTS,
        Stop::Count(knobs.instances),
        c.put_maker(leader, "inst"),
        &c.pids(),
    )
    .await?;
    let leader = c.wait_leader().await?;
    c.wait_caught_up(leader, &all).await?;
    report.notes.push(format!(
        "etcd: loaded {} keys in {:.1} s ({:.0}/s, {LOAD_CLIENTS} clients, errors: {}, \
         CPU other {:.0} %).",
        res.ok,
        res.elapsed.as_secs_f64(),
        res.rate(),
        res.errors_text(),
        res.cpu.other.unwrap_or(-1.0),
    ));
    report
        .footprint
        .extend(c.footprint(&format!("after {} keys", res.ok)));
    Ok(c)
}

async fn etcd_cell(
    c: &mut EtcdCluster,
    role: &str,
    clients: usize,
    knobs: &Knobs,
) -> Result<ThroughputRow> {
    let leader = c.wait_leader().await?;
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    c.wait_caught_up(leader, &all).await?;
    let via = if role == "leader" {
        leader
    } else {
        (leader + 1) % c.nodes.len()
    };
    progress!(
        "etcd: {clients} clients through {role} {}",
        c.nodes[via].name
    );
    let res = run_load(
        clients,
        Stop::After(knobs.secs),
        c.put_maker(via, &format!("tp-{role}-{clients}")),
        &c.pids(),
    )
    .await?;
    log_cell(&res);
    Ok(ThroughputRow {
        system: "etcd",
        via: format!("{role} ({})", c.nodes[via].name),
        clients,
        res,
        server_labels: c.nodes.iter().map(|n| n.name.clone()).collect(),
    })
}

async fn etcd_failover(c: &mut EtcdCluster, knobs: &Knobs) -> Result<FailoverRow> {
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    let mut fo = FailoverRow {
        system: "etcd",
        times: Vec::new(),
        catch_up: Vec::new(),
        failures: Vec::new(),
    };
    let probe = http_client(FAILOVER_TIMEOUT, true)?;
    for round in 0..knobs.kills {
        let leader = c.wait_leader().await?;
        c.wait_caught_up(leader, &all).await?;
        let survivor = (leader + 1) % c.nodes.len();
        let url = format!("{}/v3/kv/put", c.nodes[survivor].client_url);
        let _ = probe
            .post(&url)
            .body(etcd_put_body(&format!("fo{round}-warm"), 0))
            .send()
            .await;
        let t0 = Instant::now();
        c.kill(leader);
        let prefix = format!("fo{round}");
        let (outcome, tries) =
            first_ok(&probe, false, &url, |n| etcd_put_body(&prefix, n), t0).await;
        match outcome {
            Ok(d) => {
                progress!(
                    "etcd failover {}/{}: killed {}, first 200 via {} after {} ms ({tries} tries)",
                    round + 1,
                    knobs.kills,
                    c.nodes[leader].name,
                    c.nodes[survivor].name,
                    ms(d)
                );
                fo.times.push(d);
            }
            Err(e) => {
                progress!("etcd failover round {round}: {e}");
                fo.failures.push(e);
            }
        }
        let t1 = Instant::now();
        c.spawn(leader)?;
        let new_leader = c.wait_leader().await?;
        c.wait_caught_up(new_leader, &[leader]).await?;
        fo.catch_up.push(t1.elapsed());
    }
    Ok(fo)
}

fn machine_header(knobs: &Knobs) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!(
        "## raftmesh cluster benchmark\n\n3 nodes on 127.0.0.1-3, one process each, release build, default timings; \
         {cores} cores ({model}), load average at start {load}; cells {} s, {} kills, {} instances{}{}. \
         CPU columns are % of one core over the cell (machine total {} %): per server process, \
         the benchmark client, interrupts (irq+softirq: loopback networking and disk, charged \
         to no process), all other processes, and steal (the hypervisor ran other VMs). \
         Cells with much \"other\" or steal were disturbed by work outside this benchmark.",
        knobs.secs.as_secs_f64(),
        knobs.kills,
        knobs.instances,
        if knobs.quick { " (quick mode)" } else { "" },
        if knobs.extra_args.is_empty() {
            String::new()
        } else {
            format!("; extra raftmesh flags `{}`", knobs.extra_args.join(" "))
        },
        cores * 100,
    )
}

async fn run() -> Result<bool> {
    LazyLock::force(&START);
    let knobs = Knobs::from_env()?;
    progress!("knobs: {knobs:?}");
    let header = machine_header(&knobs);
    let mut report = Report::default();
    let mut ok = true;

    let mut rm = match rm_setup(&knobs, &mut report).await {
        Ok(c) => Some(c),
        Err(e) => {
            progress!("raftmesh setup failed: {e:#}");
            report
                .notes
                .push(format!("raftmesh setup FAILED: {}", first_line(&e)));
            ok = false;
            None
        }
    };

    let mut etcd = match (knobs.etcd, etcd_bin()) {
        (false, _) => {
            report.notes.push("etcd skipped (BENCH_ETCD=0).".into());
            None
        }
        (true, None) => {
            let msg = "etcd comparison skipped: no etcd binary (/usr/bin/etcd or etcd on PATH); \
                       install it with `apt-get install -y etcd-server`.";
            progress!("{msg}");
            report.notes.push(msg.into());
            None
        }
        (true, Some(bin)) => {
            let version = Command::new(&bin)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(str::to_string)
                })
                .unwrap_or_default();
            progress!("etcd: {} ({version})", bin.display());
            report.notes.push(format!(
                "etcd: {version}, default flags (heartbeat 100 ms, election timeout 1000 ms; \
                 raftmesh: heartbeat 100 ms, election 800-1600 ms); both fsync before \
                 acknowledging. Both clusters run side by side; each raftmesh cell is directly \
                 followed by the matching etcd cell, so background load hits both alike."
            ));
            match etcd_setup(bin, &knobs, &mut report).await {
                Ok(c) => Some(c),
                Err(e) => {
                    progress!("etcd setup failed: {e:#}");
                    report
                        .notes
                        .push(format!("etcd setup FAILED: {}", first_line(&e)));
                    None
                }
            }
        }
    };

    for role in ["leader", "follower"] {
        for clients in CLIENTS {
            if let Some(c) = &rm {
                match rm_cell(c, role, clients, &knobs).await {
                    Ok(row) => report.throughput.push(row),
                    Err(e) => {
                        progress!("raftmesh cell failed: {e:#}\n{}", c.logs_tail());
                        report
                            .notes
                            .push(format!("raftmesh cells FAILED: {}", first_line(&e)));
                        ok = false;
                        rm = None;
                    }
                }
            }
            if let Some(c) = &mut etcd {
                match etcd_cell(c, role, clients, &knobs).await {
                    Ok(row) => report.throughput.push(row),
                    Err(e) => {
                        progress!("etcd cell failed: {e:#}\n{}", c.logs_tail());
                        report
                            .notes
                            .push(format!("etcd cells FAILED: {}", first_line(&e)));
                        etcd = None;
                    }
                }
            }
        }
    }

    if let Some(c) = &mut rm {
        match rm_failover(c, &knobs).await {
            Ok(fo) => report.failover.push(fo),
            Err(e) => {
                progress!("raftmesh failover failed: {e:#}\n{}", c.logs_tail());
                report
                    .notes
                    .push(format!("raftmesh failover FAILED: {}", first_line(&e)));
                ok = false;
            }
        }
        report.footprint.extend(c.footprint("end of run"));
    }
    drop(rm);
    if let Some(c) = &mut etcd {
        match etcd_failover(c, &knobs).await {
            Ok(fo) => report.failover.push(fo),
            Err(e) => {
                progress!("etcd failover failed: {e:#}\n{}", c.logs_tail());
                report
                    .notes
                    .push(format!("etcd failover FAILED: {}", first_line(&e)));
            }
        }
        report.footprint.extend(c.footprint("end of run"));
    }
    drop(etcd);

    println!("{}", render(&report, &knobs, &header));
    progress!("done");
    Ok(ok)
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").to_string()
}

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Ctrl-C drops the running phase, whose process guards kill the servers.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run() => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
