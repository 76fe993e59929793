//! Harness shared by the `health`, `watch` and `proxy` benchmarks (`mod common;` in each).
//!
//! Owns: starting a three-node cluster of real `raftmesh agent` processes on 127.0.0.1, .2 and
//! .3 (port 0, optionally each node's proxy too, addresses read back from each node's
//! `addrs.json`, one temporary dir per node holding its data dir and `node.log`), waiting for
//! an agreed leader, the nodes' log tails and WARN/ERROR counts, locating or building the
//! raftmesh binary, environment knobs, RSS and CPU ticks from `/proc`, the progress line on
//! stderr and the latency and size formatting of the reports. Does not own any load, phase,
//! knob set or report layout: each bench adds the requests it needs in its own `impl Cluster`
//! block and renders its own tables.
//!
//! Invariants: every process started here is a [`Proc`], killed (SIGKILL, by pid) and reaped
//! when dropped, so also when the program unwinds or Ctrl-C drops the running future; servers
//! listen on loopback only; the temporary dirs go with the [`Cluster`] unless `BENCH_KEEP=1`.

// Each bench binary compiles its own copy of this module and not every bench uses every
// helper (`watch` prints no log tails), so the rest would warn as dead code there.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

/// One loopback address per node, so nodes look like distinct hosts.
const IPS: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
/// Deadline of every condition wait: the cluster's (addrs.json, leader) and the benches' own.
pub const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// Bounds one [`poll_until`] probe (it may make several requests), so a stuck probe cannot
/// hold the wait far past its deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Linux USER_HZ; /proc CPU times are in these ticks.
const CLK_TCK: f64 = 100.0;

/// Zero of the progress clock; `run` forces it first so times count from the start.
pub static START: LazyLock<Instant> = LazyLock::new(Instant::now);

/// A progress line on stderr, `[<bench> <seconds since START>s] ...`; the bench's name is its
/// crate's, so each binary labels its own lines.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[{} {:>7.1}s] {}",
            env!("CARGO_CRATE_NAME"),
            $crate::common::START.elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}
pub(crate) use progress;

// ------------------------------------------------------------------------------------ knobs

/// A numeric knob; `None` when unset or blank, an error when it does not parse.
pub fn env_num<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            (v.trim().parse().map(Some)).map_err(|_| anyhow!("{name}={v:?} is not a valid number"))
        }
        _ => Ok(None),
    }
}

/// A boolean knob: on only for `1`.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim() == "1")
}

// ---------------------------------------------------------------------------------- processes

/// A child process that is killed (by pid, SIGKILL) and reaped when dropped.
pub struct Proc(Child);

impl Proc {
    /// Guards a process a bench spawned itself (a load generator, another server).
    pub fn new(child: Child) -> Self {
        Proc(child)
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.0
    }
}

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
pub async fn poll_until<T>(
    deadline: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
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

/// An HTTP client keeping up to `idle` connections per host; `None` timeout for streams,
/// which stay open.
pub fn http_client(
    timeout: Option<Duration>,
    connect: Duration,
    idle: usize,
) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(connect)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(idle)
        .no_proxy();
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    b.build().context("build HTTP client")
}

/// The raftmesh binary: for `release` the one cargo built for this bench, else built here with
/// `cargo build --profile <profile>`.
pub fn raftmesh_bin(profile: &str) -> Result<PathBuf> {
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

pub fn rss_kib(pid: u32) -> Option<u64> {
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

/// When a [`cpu_snap`] was taken and its tick counts.
pub type CpuSnap = (Instant, Vec<Option<u64>>);

/// CPU ticks now: each node in order, then this benchmark, then with `steal` the machine's
/// steal.
pub fn cpu_snap(pids: &[u32], steal: bool) -> CpuSnap {
    let mut v: Vec<Option<u64>> = pids.iter().map(|p| proc_ticks(&p.to_string())).collect();
    v.push(proc_ticks("self"));
    if steal {
        v.push(steal_ticks());
    }
    (Instant::now(), v)
}

/// % of one core between two snapshots, element by element.
pub fn cpu_pct(a: &CpuSnap, b: &CpuSnap) -> Vec<Option<f64>> {
    let secs = b.0.duration_since(a.0).as_secs_f64().max(1e-3);
    let pct = |x: Option<u64>, y: Option<u64>| {
        Some(y?.saturating_sub(x?) as f64 / CLK_TCK / secs * 100.0)
    };
    a.1.iter().zip(&b.1).map(|(x, y)| pct(*x, *y)).collect()
}

/// The `q` quantile of sorted microseconds, in ms.
pub fn pct_ms(sorted_us: &[u64], q: f64) -> Option<f64> {
    let n = sorted_us.len();
    let i = ((q * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1;
    Some(*sorted_us.get(i)? as f64 / 1000.0)
}

// ---------------------------------------------------------------------------------- report

/// Milliseconds for a table cell: two decimals below 10, one above, `-` for none.
pub fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// KiB as MiB with one decimal, `-` for none.
pub fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// `nproc` and the 1, 5 and 15 minute load averages, for the report's header.
pub fn machine() -> (usize, String) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    (cores, load.join(" "))
}

// ---------------------------------------------------------------------------------- cluster

pub struct Node {
    /// Holds the data dir and `node.log`; removed on drop unless `BENCH_KEEP=1`.
    _dir: TempDir,
    log: PathBuf,
    pub api: String,
    /// The node's proxy address (`proxy_addr` in `addrs.json`), when started with one.
    pub proxy: Option<String>,
    proc: Proc,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Control-plane client (status, stats, the benches' own control requests); load and
    /// waiter clients are the benches' own.
    pub http: reqwest::Client,
}

impl Cluster {
    /// Node 1 expects 3, node 2 joins 1, node 3 joins 1 and 2; each on port 0 of its own IP,
    /// with `extra_args` after the harness's flags. `keep` leaves the temporary dirs behind;
    /// `http` becomes the control client.
    pub async fn start(
        bin: &Path,
        extra_args: &[String],
        keep: bool,
        http: reqwest::Client,
    ) -> Result<Self> {
        Self::start_nodes(bin, extra_args, keep, http, false).await
    }

    /// As [`Cluster::start`], and each node also runs its proxy on port 0 of its own IP
    /// (`--proxy-addr <ip>:0`), read back into [`Node::proxy`].
    pub async fn start_with_proxy(
        bin: &Path,
        extra_args: &[String],
        keep: bool,
        http: reqwest::Client,
    ) -> Result<Self> {
        Self::start_nodes(bin, extra_args, keep, http, true).await
    }

    async fn start_nodes(
        bin: &Path,
        extra_args: &[String],
        keep: bool,
        http: reqwest::Client,
        proxy: bool,
    ) -> Result<Self> {
        let mut nodes: Vec<Node> = Vec::new();
        for (i, ip) in IPS.iter().enumerate() {
            let id = i + 1;
            let prefix = format!("raftmesh-{}-n{id}-", env!("CARGO_CRATE_NAME"));
            let dir = (tempfile::Builder::new().prefix(&prefix))
                .disable_cleanup(keep)
                .tempdir()
                .context("create temp dir")?;
            if keep {
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
            if proxy {
                args.extend(["--proxy-addr".into(), format!("{ip}:0")]);
            }
            args.extend(extra_args.iter().cloned());
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
            let proxy_addr = addrs["proxy_addr"].as_str().map(String::from);
            ensure!(
                !proxy || proxy_addr.is_some(),
                "node{id} started with --proxy-addr but addrs.json has no proxy_addr"
            );
            match &proxy_addr {
                Some(p) => progress!("node{id} pid {pid} api {api} proxy {p}"),
                None => progress!("node{id} pid {pid} api {api}"),
            }
            let (_dir, api) = (dir, api.to_string());
            nodes.push(Node {
                _dir,
                log,
                api,
                proxy: proxy_addr,
                proc,
            });
        }
        Ok(Cluster { nodes, http })
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.proc.0.id()).collect()
    }

    pub async fn get_json(
        &self,
        node: usize,
        path: &str,
        client: &reqwest::Client,
    ) -> Result<Value> {
        let url = format!("http://{}{path}", self.nodes[node].api);
        let r = client.get(&url).send().await;
        let r = r.with_context(|| format!("GET {url}"))?;
        ensure!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().await.with_context(|| format!("GET {url}: body"))
    }

    pub async fn status(&self, node: usize) -> Result<Value> {
        self.get_json(node, "/v1/cluster/status", &self.http).await
    }

    /// Waits until every node names the same leader, which reports role leader; its index.
    pub async fn wait_leader(&self) -> Result<usize> {
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

    pub fn logs_tail(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = writeln!(s, "--- node{} log tail ---\n{}", i + 1, tail(&n.log, 20));
        }
        s
    }

    /// WARN and ERROR lines in each node's log so far.
    pub fn log_warnings(&self) -> Vec<usize> {
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
