//! End-to-end cluster benchmark of raftmesh, with etcd as a yardstick.
//!
//! Starts a three-node raftmesh cluster of real `raftmesh agent` processes (the `dist` build unless `BENCH_PROFILE=release`) on
//! 127.0.0.1, 127.0.0.2 and 127.0.0.3 (port 0, addresses read back from each node's
//! `addrs.json`; temporary data dirs) and measures:
//!
//! 1. durable registrations/s (`PUT /v1/agent/service/register`, a distinct ID per request)
//!    through the leader and through a follower at 1, 16 and 64 concurrent clients, each client
//!    a tokio task with its own keep-alive HTTP/1.1 connection (hyper), for a fixed time per cell; only 200
//!    answers count, everything else is reported as an error; p50/p99 latency of the 200s;
//! 2. the same against a three-node etcd cluster (if `/usr/bin/etcd` or `etcd` on PATH exists;
//!    Debian: `apt-get install -y etcd-server`) through etcd's v3 JSON gateway
//!    (`POST /v3/kv/put`, same payload size), plus etcd's leader failover. Both clusters run
//!    side by side and each raftmesh cell is directly followed by the matching etcd cell, so
//!    load from other work on the machine hits both alike;
//! 3. leader failover: SIGKILL the leader, write through a survivor in a loop (250 ms timeout per
//!    request, 10 ms pause after a failure) and take the time from the kill to the first 200;
//!    restart the killed node on its data dir and ports and wait until it has caught up
//!    (applied index >= the leader's commit index) before the next kill; min/median/max.
//!    While the survivors elect, a 10 ms poll of their `GET /v1/cluster/status` records when
//!    the first higher term appears (election started) and when a survivor leads at a higher
//!    term (won), and by how many terms (1 = one clean election; more = split votes or
//!    repeated candidacies), when the winner first commits, and how many terms passed while
//!    the killed node restarted and caught up (a restarted node that campaigns before the
//!    leader reaches it forces an extra election); the report prints the election window the
//!    timings predict;
//! 4. RSS (`VmRSS`) and data dir size per node: idle right after formation, after registering
//!    `BENCH_INSTANCES` instances (64 clients), and at the end of the run;
//! 5. stability: every node's Raft term (`GET /v1/cluster/status`; etcd: `raftTerm`) before and
//!    after the whole throughput phase (loaded), and across an idle window of
//!    `BENCH_IDLE_SECS` in which nothing is written (both clusters idle side by side), sampled
//!    once a second so a change is timed and paired with that second's steal; optionally a
//!    soak (`BENCH_SOAK_SECS`): that long of steady 64-client load through the raftmesh
//!    leader, then as long idle. The soak re-registers the `BENCH_INSTANCES` instances of the
//!    setup over and over (updates), so the registry stays the same size however long it runs.
//!    Any term increase means an election happened. Runs between the throughput cells and the
//!    failover rounds (which elect on purpose).
//!
//! For every throughput cell it also samples CPU time (`/proc/PID/stat`) of each server
//! process, of the benchmark client itself, of interrupts, of all other processes and the
//! hypervisor's steal time (`/proc/stat`), so a run disturbed by other work on the machine
//! shows it.
//!
//! Run: `cargo bench --bench cluster` (builds and measures the `dist` profile of raftmesh, what
//! `cluster/up` runs; `BENCH_PROFILE=release` measures the release build). Knobs (environment):
//! `BENCH_SECS` seconds per throughput cell (default 5), `BENCH_KILLS` failover rounds
//! (default 10), `BENCH_INSTANCES` instances for the footprint phase (default 10000),
//! `BENCH_QUICK=1` for 1 s cells, 3 kills and 1000 instances (explicit knobs still win),
//! `BENCH_ETCD=0` to skip etcd, `BENCH_RAFTMESH_ARGS="--snapshot-every 20000"` to pass extra
//! flags to every raftmesh node (timing flags `--heartbeat-ms`, `--election-min-ms`,
//! `--election-max-ms` are read back for the report), `BENCH_KEEP=1` to keep data dirs and node
//! logs for a look, `BENCH_IDLE_SECS` idle window (default 30, quick 5; 0 skips it),
//! `BENCH_SOAK_SECS` loaded + idle soak (default 0 = off; `BENCH_SOAK_SECS=600` backs a claim
//! of "no election in 10 minutes idle or loaded"), `BENCH_BIN=path` to measure a given binary, `BENCH_CLIENTS=64` to narrow the
//! throughput cells' client counts, `BENCH_ONLY=failover,stability` to run only
//! some of the phases `throughput`, `stability`, `failover` (setup and footprint always run; the
//! loaded half of the stability table comes from the throughput phase or the soak).
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

/// Client counts of the throughput cells: `BENCH_CLIENTS=64` (comma-separated) narrows them,
/// for quick A/B runs of one change.
fn bench_clients() -> Vec<usize> {
    match std::env::var("BENCH_CLIENTS") {
        Ok(v) if !v.trim().is_empty() => {
            v.split(',').filter_map(|c| c.trim().parse().ok()).collect()
        }
        _ => CLIENTS.to_vec(),
    }
}
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
    /// Idle period of the stability section (`BENCH_IDLE_SECS`; 0 = skip).
    idle: Duration,
    /// Loaded soak, then as long idle (`BENCH_SOAK_SECS`; 0 = off).
    soak: Duration,
    /// Phases to run (`BENCH_ONLY=throughput,stability,failover`; default all).
    only: Phases,
    /// raftmesh timings in effect (defaults, overridden by `extra_args`).
    timings: Timings,
}

#[derive(Debug, Clone, Copy)]
struct Phases {
    throughput: bool,
    stability: bool,
    failover: bool,
}

impl Phases {
    fn from_env() -> Result<Self> {
        let raw = std::env::var("BENCH_ONLY").unwrap_or_default();
        if raw.trim().is_empty() {
            return Ok(Phases {
                throughput: true,
                stability: true,
                failover: true,
            });
        }
        let mut p = Phases {
            throughput: false,
            stability: false,
            failover: false,
        };
        for w in raw
            .split([',', ' '])
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            match w {
                "throughput" => p.throughput = true,
                "stability" => p.stability = true,
                "failover" => p.failover = true,
                other => bail!(
                    "BENCH_ONLY: unknown phase {other:?} (known: throughput, stability, failover)"
                ),
            }
        }
        Ok(p)
    }
}

/// raftmesh's Raft timings (ms), as the nodes run with them.
#[derive(Debug, Clone, Copy)]
struct Timings {
    heartbeat: u64,
    election_min: u64,
    election_max: u64,
}

impl Timings {
    /// The server's defaults as `raftmesh agent --help` prints them (`[default: N]`), so the
    /// report can't drift from the binary; `None` if the binary or its help can't be read.
    fn from_help() -> Option<Self> {
        let (bin, _) = raftmesh_bin().ok()?;
        let mut child = Command::new(&bin)
            .args(["agent", "--help"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let t0 = Instant::now();
        while child.try_wait().ok()?.is_none() {
            if t0.elapsed() > CONTROL_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take()?, &mut text).ok()?;
        let default_of = |flag: &str| -> Option<u64> {
            let seg = text.split("--").find(|s| s.starts_with(flag))?;
            seg.split("[default: ")
                .nth(1)?
                .split(']')
                .next()?
                .trim()
                .parse()
                .ok()
        };
        Some(Timings {
            heartbeat: default_of("heartbeat-ms ")?,
            election_min: default_of("election-min-ms ")?,
            election_max: default_of("election-max-ms ")?,
        })
    }

    /// Server defaults (from `--help`; the values below only if that fails), overridden by
    /// flags in `args`.
    fn from_args(args: &[String]) -> Result<Self> {
        let mut t = Timings::from_help().unwrap_or(Timings {
            heartbeat: 75,
            election_min: 150,
            election_max: 300,
        });
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (a.as_str(), None),
            };
            let slot = match flag {
                "--heartbeat-ms" => &mut t.heartbeat,
                "--election-min-ms" => &mut t.election_min,
                "--election-max-ms" => &mut t.election_max,
                _ => continue,
            };
            let v = match inline {
                Some(v) => v,
                None => it.next().cloned().unwrap_or_default(),
            };
            *slot = v
                .parse()
                .map_err(|_| anyhow!("BENCH_RAFTMESH_ARGS: {flag} {v:?} is not a number"))?;
        }
        Ok(t)
    }

    /// When a survivor should start an election after the leader dies, in ms after the kill:
    /// its random wait in [min, max), counted from its last contact (the bench writes just
    /// before the kill), seen on the detector's 5 ms poll, plus a pre-vote round trip.
    fn predicted_election(&self) -> (u64, u64) {
        (self.election_min, self.election_max + 5)
    }

    fn text(&self) -> String {
        format!(
            "heartbeat {} ms, election {}-{} ms",
            self.heartbeat, self.election_min, self.election_max
        )
    }
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
        let extra_args: Vec<String> = std::env::var("BENCH_RAFTMESH_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let idle: f64 = env_num("BENCH_IDLE_SECS")?.unwrap_or(if quick { 5.0 } else { 30.0 });
        let soak: f64 = env_num("BENCH_SOAK_SECS")?.unwrap_or(0.0);
        ensure!(
            (0.0..=86_400.0).contains(&idle) && (0.0..=86_400.0).contains(&soak),
            "BENCH_IDLE_SECS and BENCH_SOAK_SECS must be in [0, 86400]"
        );
        Ok(Knobs {
            secs: Duration::from_secs_f64(secs),
            kills,
            instances,
            quick,
            etcd,
            timings: Timings::from_args(&extra_args)?,
            extra_args,
            idle: Duration::from_secs_f64(idle),
            soak: Duration::from_secs_f64(soak),
            only: Phases::from_env()?,
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

/// The writes one load cell sends: `method path` on `addr` (`host:port`), JSON body number
/// `seq` from `body`.
#[derive(Clone)]
struct MakeReq {
    addr: String,
    method: hyper::Method,
    path: String,
    body: Arc<dyn Fn(u64) -> String + Send + Sync>,
}

impl MakeReq {
    fn request(&self, seq: u64) -> Result<hyper::Request<http_body_util::Full<bytes::Bytes>>> {
        hyper::Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header(hyper::header::HOST, self.addr.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from((self.body)(
                seq,
            ))))
            .context("build request")
    }
}

/// One load client's keep-alive HTTP/1.1 connection.
///
/// Why hyper's connection API and not reqwest: the client shares the 2 cores with the servers
/// it measures, and reqwest's per-request work (URL parsing, pool lookup, redirect and timeout
/// layers) cost about 2.5x what `wrk` spends per request, CPU taken from the servers.
type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// A new connection to `addr`, or `None` if it cannot be had within 2 s.
async fn connect(addr: &str) -> Option<Conn> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    stream.set_nodelay(true).ok()?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}

/// Sends one request on `conn` (connecting first if there is none) and reads the whole
/// answer; `Err` is the error's kind for the report. An answer that is not 200 keeps the
/// connection (it was read whole); any other failure drops it, so the next request
/// reconnects.
async fn send_one(
    conn: &mut Option<Conn>,
    make: &MakeReq,
    seq: u64,
) -> std::result::Result<(), String> {
    use http_body_util::BodyExt as _;
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = Some(connect(&make.addr).await.ok_or("connect")?);
    }
    let c = conn.as_mut().expect("connected just above");
    let req = make.request(seq).map_err(|e| e.to_string())?;
    let answered = tokio::time::timeout(LOAD_TIMEOUT, async {
        // An HTTP/1 sender takes the next request only once the last answer is done.
        c.ready().await.map_err(|_| "transport")?;
        let resp = c.send_request(req).await.map_err(|_| "transport")?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|_| "body transport")?;
        Ok(status)
    })
    .await
    .unwrap_or(Err("timeout"));
    match answered {
        Ok(200) => Ok(()),
        Ok(status) => Err(format!("HTTP {status}")),
        Err(kind) => {
            *conn = None;
            Err(kind.to_string())
        }
    }
}

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

/// Runs `clients` concurrent request loops until `stop`, each on its own connection.
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
        let next = next.clone();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut conn = None;
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                match stop {
                    Stop::After(d) if start.elapsed() >= d => break,
                    Stop::Count(n) if seq >= n => break,
                    _ => {}
                }
                let t = Instant::now();
                let failed = match send_one(&mut conn, &make, seq).await {
                    Ok(()) => {
                        lat.push(t.elapsed().as_micros() as u64);
                        None
                    }
                    Err(kind) => Some(kind),
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

// ------------------------------------------------------------------------------ stability

/// Every node's Raft term (None: not running or not answering) and the leader, at one moment.
#[derive(Clone, Debug, Default)]
struct TermSample {
    terms: Vec<Option<u64>>,
    leader: Option<String>,
}

impl TermSample {
    fn max(&self) -> Option<u64> {
        self.terms.iter().flatten().max().copied()
    }

    fn text(&self, labels: &[String]) -> String {
        labels
            .iter()
            .zip(&self.terms)
            .map(|(l, t)| format!("{l} {}", t.map_or("-".into(), |t| t.to_string())))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a stability window saw: terms at both ends, changes in between, CPU over it.
struct Watch {
    first: TermSample,
    last: TermSample,
    /// Term or leader changes seen by the 1 s samples, with the steal of that second.
    events: Vec<String>,
    /// Highest steal over one sampling interval (% of one core).
    max_steal: Option<f64>,
    cpu: CpuUse,
    elapsed: Duration,
}

/// Steal in % of one core between two `/proc/stat` readings.
fn steal_pct(
    a: (Instant, Option<MachineTicks>),
    b: (Instant, Option<MachineTicks>),
) -> Option<f64> {
    let secs = b.0.duration_since(a.0).as_secs_f64().max(1e-3);
    Some(b.1?.steal.saturating_sub(a.1?.steal) as f64 / CLK_TCK / secs * 100.0)
}

/// One bounded term probe; a probe that hangs counts as "no answer" from every node.
async fn sample_bounded(n: usize, probe: &mut impl AsyncFnMut() -> TermSample) -> TermSample {
    tokio::time::timeout(CONTROL_TIMEOUT * 4, probe())
        .await
        .unwrap_or_else(|_| TermSample {
            terms: vec![None; n],
            leader: None,
        })
}

/// Samples `probe` about once a second for `dur` (reads only: nothing is written).
async fn watch_terms(
    dur: Duration,
    pids: &[Option<u32>],
    labels: &[String],
    mut probe: impl AsyncFnMut() -> TermSample,
) -> Watch {
    let n = labels.len();
    let before = cpu_snap(pids);
    let start = Instant::now();
    let first = sample_bounded(n, &mut probe).await;
    let mut known = first.terms.clone();
    let mut leader = first.leader.clone();
    let mut last = first.clone();
    let mut ticks = (Instant::now(), machine_ticks());
    let mut max_steal: Option<f64> = None;
    let mut events = Vec::new();
    loop {
        let left = dur.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        let s = sample_bounded(n, &mut probe).await;
        let now = (Instant::now(), machine_ticks());
        let steal = steal_pct(ticks, now);
        ticks = now;
        if let Some(st) = steal {
            max_steal = Some(max_steal.map_or(st, |m: f64| m.max(st)));
        }
        let mut changed = Vec::new();
        for (i, t) in s.terms.iter().enumerate() {
            if let Some(t) = *t {
                match known[i] {
                    Some(k) if t > k => changed.push(format!("{} {k}->{t}", labels[i])),
                    _ => {}
                }
                known[i] = Some(t);
            }
        }
        let leader_changed = s.leader.is_some() && s.leader != leader;
        if !changed.is_empty() || leader_changed {
            events.push(format!(
                "+{:.0} s: {}{} (steal {} % over the last sample)",
                start.elapsed().as_secs_f64(),
                if changed.is_empty() {
                    String::new()
                } else {
                    format!("term {} ", changed.join(", "))
                },
                format_args!(
                    "leader {} -> {}",
                    leader.as_deref().unwrap_or("none"),
                    s.leader.as_deref().unwrap_or("none")
                ),
                pct0(steal),
            ));
            progress!("stability: {}", events.last().expect("just pushed"));
        }
        if s.leader.is_some() {
            leader = s.leader.clone();
        }
        last = s;
    }
    Watch {
        first,
        last,
        events,
        max_steal,
        cpu: cpu_use(&before, &cpu_snap(pids)),
        elapsed: start.elapsed(),
    }
}

struct StabilityRow {
    system: &'static str,
    phase: String,
    /// What ran meanwhile ("idle", "64 clients, 1234 ok/s, errors 0").
    load: String,
    labels: Vec<String>,
    watch: Watch,
    /// AppendEntries RPC timeouts logged during the window (raftmesh only).
    append_timeouts: Option<u64>,
}

impl StabilityRow {
    /// Term increase across the window, per node and for the cluster (highest term).
    fn term_change(&self) -> Option<u64> {
        Some(
            self.watch
                .last
                .max()?
                .saturating_sub(self.watch.first.max()?),
        )
    }
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

/// The raftmesh binary to measure. By default the bench builds the `dist` profile (what
/// `cluster/up` runs: fat LTO, one codegen unit) with `cargo build --profile dist` and uses
/// `target/dist/raftmesh`; `BENCH_PROFILE=release` measures the release build cargo made for
/// this bench instead. Built once per run.
fn raftmesh_bin() -> Result<(PathBuf, &'static str)> {
    static BIN: LazyLock<Result<(PathBuf, &'static str), String>> =
        LazyLock::new(|| locate_raftmesh_bin().map_err(|e| format!("{e:#}")));
    BIN.clone().map_err(|e| anyhow!(e))
}

fn locate_raftmesh_bin() -> Result<(PathBuf, &'static str)> {
    if let Some(p) = std::env::var_os("BENCH_BIN") {
        let p = PathBuf::from(p);
        ensure!(p.exists(), "BENCH_BIN {} does not exist", p.display());
        return Ok((p, "BENCH_BIN"));
    }
    let profile = std::env::var("BENCH_PROFILE").unwrap_or_else(|_| "dist".into());
    if profile != "release" {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        progress!("building raftmesh with `cargo build --profile {profile}`");
        let st = Command::new(cargo)
            .args(["build", "--profile", &profile, "--bin", "raftmesh"])
            .current_dir(&root)
            .status()
            .context("running cargo build")?;
        ensure!(st.success(), "cargo build --profile {profile} failed: {st}");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let p = target.join(&profile).join("raftmesh");
        ensure!(p.exists(), "{} missing after the build", p.display());
        return Ok((p, "cargo build --profile dist"));
    }
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

    fn labels(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("n{}", n.id)).collect()
    }

    /// Replication RPCs that hit openraft's AppendEntries timeout (raftmesh sets it to twice
    /// the heartbeat interval), counted from the WARN lines in all node logs so far: openraft's
    /// own timer ("timeout after N ms when AppendEntries") or the peer client's, which gets the
    /// same TTL and races it ("/raft/append ... operation timed out").
    fn append_timeouts(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                std::fs::read(n.log()).map_or(0, |b| {
                    String::from_utf8_lossy(&b)
                        .lines()
                        .filter(|l| {
                            l.contains("error replication to target")
                                && (l.contains("when AppendEntries")
                                    || (l.contains("/raft/append") && l.contains("timed out")))
                        })
                        .count() as u64
                })
            })
            .sum()
    }

    /// Every running node's term (local `GET /v1/cluster/status`) and the highest-term leader.
    async fn term_sample(&self) -> TermSample {
        let mut out = TermSample::default();
        let mut best: Option<(u64, u64)> = None;
        for n in &self.nodes {
            let st = match n.proc {
                Some(_) => self.status(n.id).await.ok(),
                None => None,
            };
            let term = st.as_ref().and_then(|v| v["term"].as_u64());
            if let (Some(v), Some(t)) = (&st, term) {
                if v["role"] == "leader" && best.is_none_or(|(bt, _)| t > bt) {
                    best = Some((t, n.id));
                }
            }
            out.terms.push(term);
        }
        out.leader = best.map(|(_, id)| format!("n{id}"));
        out
    }

    fn register_maker(&self, id: u64, prefix: &str) -> MakeReq {
        self.reregister_maker(id, prefix, u64::MAX)
    }

    /// Like `register_maker`, but cycles through `ids` IDs: past the first round every write
    /// re-registers (updates) an existing instance, so the registry's size stays put.
    fn reregister_maker(&self, id: u64, prefix: &str, ids: u64) -> MakeReq {
        let prefix = prefix.to_string();
        let ids = ids.max(1);
        MakeReq {
            addr: self.api(id).to_string(),
            method: hyper::Method::PUT,
            path: "/v1/agent/service/register".into(),
            body: Arc::new(move |seq| register_body(&prefix, seq % ids)),
        }
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
    raft_term: u64,
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
        let prefix = prefix.to_string();
        MakeReq {
            addr: self.nodes[i]
                .client_url
                .trim_start_matches("http://")
                .to_string(),
            method: hyper::Method::POST,
            path: "/v3/kv/put".into(),
            body: Arc::new(move |seq| etcd_put_body(&prefix, seq)),
        }
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

    fn labels(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Every running member's raft term and the leader most members name.
    async fn term_sample(&self) -> TermSample {
        let mut out = TermSample::default();
        let mut seen = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let st = match n.proc {
                Some(_) => self.status(i).await.ok(),
                None => None,
            };
            out.terms.push(st.map(|s| s.raft_term));
            if let Some(s) = st {
                seen.push((i, s));
            }
        }
        // The leader is named by member id; map it to a name through the members that answered.
        out.leader = seen
            .iter()
            .filter(|(_, s)| s.leader != 0)
            .max_by_key(|(_, s)| s.raft_term)
            .and_then(|(_, s)| seen.iter().find(|(_, m)| m.member_id == s.leader))
            .map(|(i, _)| self.nodes[*i].name.clone());
        out
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
        raft_term: lenient_u64(&v["raftTerm"]).unwrap_or(0),
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
    /// Kill to first 200, per successful round.
    times: Vec<Duration>,
    /// Restart spawn to caught up, per round.
    catch_up: Vec<Duration>,
    failures: Vec<String>,
    /// Every round: first 200 (or failure), what the election watcher saw, steal meanwhile.
    rounds: Vec<(Option<Duration>, ElectionSeen, Option<f64>)>,
    /// CPU over the whole failover phase (restarts and catch-up included).
    cpu: Option<CpuUse>,
    /// AppendEntries RPC timeouts logged during the phase (raftmesh only).
    append_timeouts: Option<u64>,
    /// Per round: terms that passed while the killed node restarted and caught up (elections
    /// nobody asked for, e.g. the restarted node campaigning before the leader reaches it).
    restart_terms: Vec<u64>,
}

impl FailoverRow {
    fn new(system: &'static str) -> Self {
        FailoverRow {
            system,
            times: Vec::new(),
            catch_up: Vec::new(),
            failures: Vec::new(),
            rounds: Vec::new(),
            cpu: None,
            append_timeouts: None,
            restart_terms: Vec::new(),
        }
    }

    /// Records the term changes of a restart: `term` (after catch-up) beyond the failover's
    /// own winner (`old_term` + its `terms`).
    fn restart_terms(&mut self, old_term: u64, seen: ElectionSeen, term: Option<u64>) {
        if let (Some(t), Some(won)) = (term, seen.terms) {
            self.restart_terms.push(t.saturating_sub(old_term + won));
        }
    }

    fn push(&mut self, outcome: Result<Duration, String>, seen: ElectionSeen, steal: Option<f64>) {
        match outcome {
            Ok(d) => {
                self.times.push(d);
                self.rounds.push((Some(d), seen, steal));
            }
            Err(e) => {
                self.failures.push(e);
                self.rounds.push((None, seen, steal));
            }
        }
    }
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
    stability: Vec<StabilityRow>,
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
    let (lo, hi) = knobs.timings.predicted_election();
    let _ = writeln!(
        o,
        "raftmesh timings: {}. Predicted election start after a kill: the survivor's random \
         wait in [min, max) from its last contact (a write just before the kill), then a \
         pre-vote: {lo}-{hi} ms. \
         \"election start\" / \"won\" / \"first commit\" are when a 10 ms poll of the survivors' \
         status first saw a higher term / a leader at a higher term / that leader's commit index \
         past the old leader's (its blank entry committed; etcd: `raftIndex`); a first 200 well \
         after the first commit is time spent in the write path or in tries that timed out; \
         \"+terms\" is the winner's term minus the old leader's (1 = one clean election, more = \
         split votes or repeated candidacies); steal is % of one core from the kill to the first \
         200. AE timeouts: see the stability section. \"elections during restarts\": terms \
         that passed while the killed node restarted and caught up, beyond the failover's own \
         election (a restarted node that campaigns before the leader reaches it forces one).\n",
        knobs.timings.text(),
    );
    let _ = writeln!(
        o,
        "| system | kills | min ms | median ms | max ms | election start median ms | won median ms | first commit median ms | +terms | restart catch-up median ms | steal % mean / max round | AE timeouts | elections during restarts | rounds: first 200 (start/won/commit, +terms, steal %) |"
    );
    let _ = writeln!(
        o,
        "|---|--:|--:|--:|--:|--:|--:|--:|---|--:|---|--:|---|---|"
    );
    for f in &report.failover {
        let min = f.times.iter().min().copied();
        let max = f.times.iter().max().copied();
        let opt = |d: Option<Duration>| d.map_or("-".into(), ms);
        let started: Vec<Duration> = f.rounds.iter().filter_map(|r| r.1.started).collect();
        let won: Vec<Duration> = f.rounds.iter().filter_map(|r| r.1.elected).collect();
        let committed: Vec<Duration> = f.rounds.iter().filter_map(|r| r.1.committed).collect();
        let mut terms: BTreeMap<u64, usize> = BTreeMap::new();
        for r in &f.rounds {
            if let Some(t) = r.1.terms {
                *terms.entry(t).or_default() += 1;
            }
        }
        let terms = terms
            .iter()
            .map(|(t, n)| format!("{n}x +{t}"))
            .collect::<Vec<_>>()
            .join(", ");
        let steals: Vec<f64> = f.rounds.iter().filter_map(|r| r.2).collect();
        let disturbed = f.restart_terms.iter().filter(|&&t| t > 0).count();
        let restarts = match f.restart_terms.iter().sum::<u64>() {
            0 => "0".to_string(),
            n => format!(
                "**+{n} terms** in {disturbed} of {} restarts",
                f.restart_terms.len()
            ),
        };
        let all: Vec<String> = f
            .rounds
            .iter()
            .map(|(d, seen, st)| {
                format!(
                    "{} ({}/{}/{}, +{}, {})",
                    d.map_or("FAIL".into(), ms),
                    opt(seen.started),
                    opt(seen.elected),
                    opt(seen.committed),
                    seen.terms.map_or("-".into(), |t| t.to_string()),
                    pct0(*st),
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            f.system,
            f.times.len(),
            if f.failures.is_empty() {
                String::new()
            } else {
                format!(" ({} failed)", f.failures.len())
            },
            opt(min),
            opt(median(&f.times)),
            opt(max),
            opt(median(&started)),
            opt(median(&won)),
            opt(median(&committed)),
            terms,
            opt(median(&f.catch_up)),
            pct0((!steals.is_empty()).then(|| steals.iter().sum::<f64>() / steals.len() as f64)),
            pct0(steals.iter().copied().reduce(f64::max)),
            f.append_timeouts.map_or("-".into(), |n| n.to_string()),
            restarts,
            all.join(", "),
        );
    }
    if !report.stability.is_empty() {
        let _ = writeln!(
            o,
            "\n### Elections while idle / loaded (Raft term of every node at both ends of each window; any increase = an election)\n"
        );
        let _ = writeln!(
            o,
            "Terms are sampled once a second (reads only); \"changes seen\" times each change and \
             gives that second's steal. AE timeouts: raftmesh replication RPCs that outlived \
             openraft's AppendEntries timeout, which raftmesh sets to twice the heartbeat \
             interval ({} ms here; WARN lines in the node logs). \"CPU % other\": every process but this \
             system's servers and the benchmark (the other system's servers included).\n",
            2 * knobs.timings.heartbeat
        );
        let _ = writeln!(
            o,
            "| system | window | s | load | terms before | terms after | term change | leader | steal % mean / max 1 s | CPU % other | AE timeouts | changes seen (1 s samples) |"
        );
        let _ = writeln!(o, "|---|---|--:|---|---|---|--:|---|---|--:|--:|---|");
        for r in &report.stability {
            let w = &r.watch;
            let change = match r.term_change() {
                Some(0) => "0 (no election)".to_string(),
                Some(n) => format!("**+{n}**"),
                None => "-".into(),
            };
            let leader = if w.first.leader == w.last.leader {
                w.first.leader.clone().unwrap_or("none".into())
            } else {
                format!(
                    "{} -> {}",
                    w.first.leader.as_deref().unwrap_or("none"),
                    w.last.leader.as_deref().unwrap_or("none")
                )
            };
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
                r.system,
                r.phase,
                w.elapsed.as_secs_f64(),
                r.load,
                w.first.text(&r.labels),
                w.last.text(&r.labels),
                change,
                leader,
                pct0(w.cpu.steal),
                pct0(w.max_steal),
                pct0(w.cpu.other),
                r.append_timeouts.map_or("-".into(), |n| n.to_string()),
                if w.events.is_empty() {
                    "-".to_string()
                } else {
                    w.events.join("; ")
                },
            );
        }
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
    // Again after a quiet moment: how much of the figure is the load's
    // transient (freed memory the allocator has not returned yet).
    tokio::time::sleep(FOOTPRINT_SETTLE).await;
    report.footprint.extend(c.footprint(&format!(
        "after {} instances, {} s later",
        res.ok,
        FOOTPRINT_SETTLE.as_secs()
    )));
    Ok(c)
}

/// Quiet time before the second footprint reading after the load.
const FOOTPRINT_SETTLE: Duration = Duration::from_secs(5);

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

/// When the survivors started an election after a kill and when one of them won it.
#[derive(Clone, Copy, Default)]
struct ElectionSeen {
    /// First sample with a survivor's term above the old leader's.
    started: Option<Duration>,
    /// First sample with a survivor leading at a higher term.
    elected: Option<Duration>,
    /// Term increase from the old leader's term to the winner's (1 = one clean election).
    terms: Option<u64>,
    /// First sample with the winner's commit index above the old leader's (its first entry,
    /// the blank one a new leader appends, is committed).
    committed: Option<Duration>,
}

impl ElectionSeen {
    /// The progress line of one failover round: `system` killed `killed` (the leader at
    /// `old_term`) and first got a 200 through `via`.
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        system: &str,
        round: usize,
        kills: usize,
        killed: &str,
        old_term: u64,
        via: &str,
        first_200: Duration,
        tries: u64,
        steal: Option<f64>,
    ) {
        progress!(
            "{system} failover {}/{kills}: killed {killed} (term {old_term}), first 200 via {via} \
             after {} ms ({tries} tries); election seen starting at {} ms, won at {} ms, +{} \
             terms, first commit at {} ms; steal {} %",
            round + 1,
            ms(first_200),
            self.started.map_or("-".into(), ms),
            self.elected.map_or("-".into(), ms),
            self.terms.map_or("-".into(), |t| t.to_string()),
            self.committed.map_or("-".into(), ms),
            pct0(steal),
        );
    }
}

/// A survivor's view during a failover.
struct SurvivorState {
    term: u64,
    leads: bool,
    commit: u64,
}

/// Polls the survivors (`probe` yields the state of every answering survivor) every 10 ms from
/// the kill at `t0` until one leads at a term above `old_term` and has committed past
/// `old_commit`, at most `FAILOVER_DEADLINE`.
async fn watch_election(
    t0: Instant,
    old_term: u64,
    old_commit: u64,
    mut probe: impl AsyncFnMut() -> Vec<SurvivorState>,
) -> ElectionSeen {
    let mut seen = ElectionSeen::default();
    while t0.elapsed() < FAILOVER_DEADLINE {
        let answers = tokio::time::timeout(FAILOVER_TIMEOUT * 2, probe())
            .await
            .unwrap_or_default();
        let at = t0.elapsed();
        if seen.started.is_none() && answers.iter().any(|s| s.term > old_term) {
            seen.started = Some(at);
        }
        if let Some(s) = answers.iter().find(|s| s.leads && s.term > old_term) {
            if seen.elected.is_none() {
                seen.elected = Some(at);
                seen.terms = Some(s.term - old_term);
            }
            if s.commit > old_commit {
                seen.committed = Some(at);
                return seen;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen
}

/// A raftmesh node's term, role and commit index, on the failover watcher's own client.
async fn rm_survivor(http: &reqwest::Client, api: &str) -> Option<SurvivorState> {
    let v: Value = http
        .get(format!("http://{api}/v1/cluster/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(SurvivorState {
        term: v["term"].as_u64()?,
        leads: v["role"] == "leader",
        commit: v["commit_index"].as_u64()?,
    })
}

async fn rm_failover(c: &mut RmCluster, knobs: &Knobs) -> Result<FailoverRow> {
    let ids = c.ids();
    let mut fo = FailoverRow::new("raftmesh");
    let probe = http_client(FAILOVER_TIMEOUT, true)?;
    let watcher = http_client(FAILOVER_TIMEOUT, true)?;
    let before = cpu_snap(&c.pids());
    let ae0 = c.append_timeouts();
    for round in 0..knobs.kills {
        let leader = c.wait_leader().await?;
        c.wait_caught_up(leader, &ids).await?;
        let survivors: Vec<u64> = ids.iter().copied().filter(|&id| id != leader).collect();
        let survivor = survivors[0];
        let url = format!("http://{}/v1/agent/service/register", c.api(survivor));
        // Warm the probe's connection to the survivor so the first post-kill try is cheap.
        let _ = probe
            .put(&url)
            .body(register_body(&format!("fo{round}-warm"), 0))
            .send()
            .await;
        let st = c.status(leader).await?;
        let old_term = st["term"].as_u64().context("no term")?;
        let old_commit = st["commit_index"].as_u64().context("no commit_index")?;
        let apis: Vec<String> = survivors.iter().map(|&id| c.api(id).to_string()).collect();
        for a in &apis {
            let _ = rm_survivor(&watcher, a).await;
        }
        let ticks0 = (Instant::now(), machine_ticks());
        let t0 = Instant::now();
        c.kill(leader);
        let prefix = format!("fo{round}");
        let ((outcome, tries), seen) = tokio::join!(
            first_ok(&probe, true, &url, |n| register_body(&prefix, n), t0),
            watch_election(t0, old_term, old_commit, async || {
                let mut out = Vec::new();
                for a in &apis {
                    out.extend(rm_survivor(&watcher, a).await);
                }
                out
            }),
        );
        let steal = steal_pct(ticks0, (Instant::now(), machine_ticks()));
        match &outcome {
            Ok(d) => seen.report(
                "raftmesh",
                round,
                knobs.kills,
                &format!("node{leader}"),
                old_term,
                &format!("node{survivor}"),
                *d,
                tries,
                steal,
            ),
            Err(e) => progress!("raftmesh failover round {round}: {e}"),
        }
        fo.push(outcome, seen, steal);
        let t1 = Instant::now();
        c.start(leader, &[]).await?;
        let new_leader = c.wait_leader().await?;
        c.wait_caught_up(new_leader, &[leader]).await?;
        fo.catch_up.push(t1.elapsed());
        let term = c.status(new_leader).await?["term"].as_u64();
        fo.restart_terms(old_term, seen, term);
    }
    fo.cpu = Some(cpu_use(&before, &cpu_snap(&c.pids())));
    fo.append_timeouts = Some(c.append_timeouts().saturating_sub(ae0));
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
    // The same second reading as raftmesh's, so the two compare alike.
    tokio::time::sleep(FOOTPRINT_SETTLE).await;
    report.footprint.extend(c.footprint(&format!(
        "after {} keys, {} s later",
        res.ok,
        FOOTPRINT_SETTLE.as_secs()
    )));
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
    let mut fo = FailoverRow::new("etcd");
    let probe = http_client(FAILOVER_TIMEOUT, true)?;
    let watcher = http_client(FAILOVER_TIMEOUT, true)?;
    let before = cpu_snap(&c.pids());
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
        let st = c.status(leader).await?;
        let (old_term, old_commit) = (st.raft_term, st.raft_index);
        let urls: Vec<String> = all
            .iter()
            .filter(|&&i| i != leader)
            .map(|&i| c.nodes[i].client_url.clone())
            .collect();
        let ticks0 = (Instant::now(), machine_ticks());
        let t0 = Instant::now();
        c.kill(leader);
        let prefix = format!("fo{round}");
        let ((outcome, tries), seen) = tokio::join!(
            first_ok(&probe, false, &url, |n| etcd_put_body(&prefix, n), t0),
            watch_election(t0, old_term, old_commit, async || {
                let mut out = Vec::new();
                for u in &urls {
                    if let Ok(s) = etcd_status(&watcher, u).await {
                        out.push(SurvivorState {
                            term: s.raft_term,
                            leads: s.leader == s.member_id,
                            commit: s.raft_index,
                        });
                    }
                }
                out
            }),
        );
        let steal = steal_pct(ticks0, (Instant::now(), machine_ticks()));
        match &outcome {
            Ok(d) => seen.report(
                "etcd",
                round,
                knobs.kills,
                &c.nodes[leader].name,
                old_term,
                &c.nodes[survivor].name,
                *d,
                tries,
                steal,
            ),
            Err(e) => progress!("etcd failover round {round}: {e}"),
        }
        fo.push(outcome, seen, steal);
        let t1 = Instant::now();
        c.spawn(leader)?;
        let new_leader = c.wait_leader().await?;
        c.wait_caught_up(new_leader, &[leader]).await?;
        fo.catch_up.push(t1.elapsed());
        let term = c.status(new_leader).await.ok().map(|s| s.raft_term);
        fo.restart_terms(old_term, seen, term);
    }
    fo.cpu = Some(cpu_use(&before, &cpu_snap(&c.pids())));
    Ok(fo)
}

/// Something whose terms the stability section can sample.
trait Terms {
    const SYSTEM: &'static str;
    fn labels(&self) -> Vec<String>;
    fn pids(&self) -> Vec<Option<u32>>;
    async fn sample(&self) -> TermSample;
    /// AppendEntries RPC timeouts logged so far, where the logs tell.
    fn append_timeouts(&self) -> Option<u64> {
        None
    }
}

impl Terms for RmCluster {
    const SYSTEM: &'static str = "raftmesh";
    fn labels(&self) -> Vec<String> {
        RmCluster::labels(self)
    }
    fn pids(&self) -> Vec<Option<u32>> {
        RmCluster::pids(self)
    }
    fn append_timeouts(&self) -> Option<u64> {
        Some(RmCluster::append_timeouts(self))
    }
    async fn sample(&self) -> TermSample {
        self.term_sample().await
    }
}

impl Terms for EtcdCluster {
    const SYSTEM: &'static str = "etcd";
    fn labels(&self) -> Vec<String> {
        EtcdCluster::labels(self)
    }
    fn pids(&self) -> Vec<Option<u32>> {
        EtcdCluster::pids(self)
    }
    async fn sample(&self) -> TermSample {
        self.term_sample().await
    }
}

/// A stability row from terms taken at the start (`first`, `snap` at `t0`) and now.
async fn span_row<C: Terms>(
    c: &C,
    load: &str,
    (first, snap): (TermSample, CpuSnap),
    t0: Instant,
    append_timeouts: Option<u64>,
) -> StabilityRow {
    let labels = c.labels();
    let last = sample_bounded(labels.len(), &mut async || c.sample().await).await;
    let cpu = cpu_use(&snap, &cpu_snap(&c.pids()));
    StabilityRow {
        system: C::SYSTEM,
        phase: "loaded: throughput phase".into(),
        load: load.to_string(),
        labels,
        append_timeouts: delta(append_timeouts, c.append_timeouts()),
        watch: Watch {
            first,
            last,
            events: Vec::new(),
            max_steal: None,
            cpu,
            elapsed: t0.elapsed(),
        },
    }
}

/// Watches `c` for `dur` with nothing written to it.
async fn idle_row<C: Terms>(c: &C, phase: &str, dur: Duration) -> StabilityRow {
    let labels = c.labels();
    let ae0 = c.append_timeouts();
    let watch = watch_terms(dur, &c.pids(), &labels, async || c.sample().await).await;
    StabilityRow {
        system: C::SYSTEM,
        phase: phase.to_string(),
        load: "idle (status reads only)".into(),
        labels,
        watch,
        append_timeouts: delta(ae0, c.append_timeouts()),
    }
}

fn delta(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?))
}

/// Stability (b): both clusters idle side by side for `BENCH_IDLE_SECS`; then, if
/// `BENCH_SOAK_SECS` is set, raftmesh under steady 64-client load and idle for as long each.
async fn stability(
    rm: &Option<RmCluster>,
    etcd: &Option<EtcdCluster>,
    knobs: &Knobs,
    report: &mut Report,
) -> Result<()> {
    if !knobs.idle.is_zero() {
        if let Some(c) = rm {
            let leader = c.wait_leader().await?;
            c.wait_caught_up(leader, &c.ids()).await?;
        }
        if let Some(c) = etcd {
            let leader = etcd_leader(c).await?;
            let all: Vec<usize> = (0..c.nodes.len()).collect();
            c.wait_caught_up(leader, &all).await?;
        }
        progress!(
            "stability: {:.0} s idle{}",
            knobs.idle.as_secs_f64(),
            if etcd.is_some() {
                " (both clusters)"
            } else {
                ""
            }
        );
        let phase = "idle";
        let (a, b) = tokio::join!(
            async {
                match rm {
                    Some(c) => Some(idle_row(c, phase, knobs.idle).await),
                    None => None,
                }
            },
            async {
                match etcd {
                    Some(c) => Some(idle_row(c, phase, knobs.idle).await),
                    None => None,
                }
            },
        );
        report.stability.extend(a.into_iter().chain(b));
    }
    let Some(c) = rm.as_ref().filter(|_| !knobs.soak.is_zero()) else {
        return Ok(());
    };
    let leader = c.wait_leader().await?;
    c.wait_caught_up(leader, &c.ids()).await?;
    progress!(
        "stability soak: {:.0} s of {LOAD_CLIENTS} clients through node{leader}, then as long idle",
        knobs.soak.as_secs_f64()
    );
    let labels = c.labels();
    let pids = c.pids();
    let ae0 = c.append_timeouts();
    let (res, watch) = tokio::join!(
        run_load(
            LOAD_CLIENTS,
            Stop::After(knobs.soak),
            // Re-register the setup's instances: steady state, not a registry growing by
            // thousands of instances a second (whose ever larger snapshots would be the story).
            c.reregister_maker(leader, "inst", knobs.instances),
            &pids,
        ),
        watch_terms(knobs.soak, &pids, &labels, async || c.term_sample().await),
    );
    let res = res?;
    log_cell(&res);
    report.stability.push(StabilityRow {
        system: "raftmesh",
        phase: "soak: loaded".into(),
        load: format!(
            "{LOAD_CLIENTS} clients via leader n{leader} re-registering {} instances: {:.0} ok/s, \
             p99 {} ms, errors {}",
            knobs.instances,
            res.rate(),
            opt_ms(res.pct_ms(0.99)),
            res.errors_text()
        ),
        labels,
        watch,
        append_timeouts: delta(Some(ae0), Some(c.append_timeouts())),
    });
    let leader = c.wait_leader().await?;
    c.wait_caught_up(leader, &c.ids()).await?;
    report
        .stability
        .push(idle_row(c, "soak: idle", knobs.soak).await);
    Ok(())
}

/// The etcd leader without `&mut` (`EtcdCluster::wait_leader` also watches for exits).
async fn etcd_leader(c: &EtcdCluster) -> Result<usize> {
    poll_until(WAIT, "an etcd leader", async || {
        let s = c.term_sample().await;
        Ok(s.leader
            .and_then(|l| c.nodes.iter().position(|n| n.name == l)))
    })
    .await
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
        "## raftmesh cluster benchmark\n\n3 nodes on 127.0.0.1-3, one process each, {} build, raftmesh timings {}; \
         {cores} cores ({model}), load average at start {load}; cells {} s, {} kills, {} instances, \
         idle window {} s, soak {}{}{}. \
         CPU columns are % of one core over the cell (machine total {} %): per server process, \
         the benchmark client, interrupts (irq+softirq: loopback networking and disk, charged \
         to no process), all other processes, and steal (the hypervisor ran other VMs). \
         Cells with much \"other\" or steal were disturbed by work outside this benchmark.",
        std::env::var("BENCH_PROFILE").unwrap_or_else(|_| "dist".into()),
        knobs.timings.text(),
        knobs.secs.as_secs_f64(),
        knobs.kills,
        knobs.instances,
        knobs.idle.as_secs_f64(),
        if knobs.soak.is_zero() {
            "off".to_string()
        } else {
            format!("{0} s loaded + {0} s idle", knobs.soak.as_secs_f64())
        },
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
                 raftmesh: {}); both fsync before acknowledging. Both clusters run side by \
                 side; each raftmesh cell is directly followed by the matching etcd cell, so \
                 background load hits both alike.",
                knobs.timings.text()
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

    if knobs.only.throughput {
        // Stability under load (a): terms before and after all throughput cells.
        let rm_start = match &rm {
            Some(c) => Some((c.term_sample().await, cpu_snap(&c.pids()))),
            None => None,
        };
        let rm_ae0 = rm.as_ref().map(|c| c.append_timeouts());
        let etcd_start = match &etcd {
            Some(c) => Some((c.term_sample().await, cpu_snap(&c.pids()))),
            None => None,
        };
        let t0 = Instant::now();
        let mut cells = 0usize;
        for role in ["leader", "follower"] {
            for clients in bench_clients() {
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
                cells += 1;
            }
        }
        let load = format!(
            "{cells} throughput cells x {} s (1/16/64 clients via leader and follower){}",
            knobs.secs.as_secs_f64(),
            if etcd.is_some() && rm.is_some() {
                ", interleaved with the other system's cells"
            } else {
                ""
            }
        );
        if let (Some(c), Some(start)) = (&rm, rm_start) {
            let row = span_row(c, &load, start, t0, rm_ae0).await;
            report.stability.push(row);
        }
        if let (Some(c), Some(start)) = (&etcd, etcd_start) {
            let row = span_row(c, &load, start, t0, None).await;
            report.stability.push(row);
        }
    }

    if knobs.only.stability {
        if let Err(e) = stability(&rm, &etcd, &knobs, &mut report).await {
            progress!("stability phase failed: {e:#}");
            report
                .notes
                .push(format!("stability phase FAILED: {}", first_line(&e)));
            ok = false;
        }
    }

    if !knobs.only.failover {
        report
            .notes
            .push("failover skipped (BENCH_ONLY without failover).".into());
    }
    if let Some(c) = rm.as_mut().filter(|_| knobs.only.failover) {
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
    }
    if let Some(c) = &rm {
        report.footprint.extend(c.footprint("end of run"));
    }
    drop(rm);
    if let Some(c) = etcd.as_mut().filter(|_| knobs.only.failover) {
        match etcd_failover(c, &knobs).await {
            Ok(fo) => report.failover.push(fo),
            Err(e) => {
                progress!("etcd failover failed: {e:#}\n{}", c.logs_tail());
                report
                    .notes
                    .push(format!("etcd failover FAILED: {}", first_line(&e)));
            }
        }
    }
    if let Some(c) = &etcd {
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
