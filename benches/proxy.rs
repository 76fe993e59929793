//! Throughput and latency benchmark of raftmesh's routing proxy: one HTTP backend driven
//! directly and through node 1's proxy in the same run, with nginx as a yardstick where it is
//! installed.
//!
//! The backend is a hyper HTTP/1.1 server inside this process, on a thread of its own (a
//! single-threaded tokio runtime, so its CPU is read apart from the load generator's):
//! `BENCH_BACKENDS` instances on 127.0.0.1 port 0, each answering every request with `200` and
//! a `BENCH_BODY`-byte body, all served by that one thread (so direct cells, which can only
//! hit one instance, and proxied cells, which spread over all of them, meet the same backend
//! capacity). The cluster is three real `raftmesh agent` processes on 127.0.0.1, .2 and .3
//! (port 0, proxies on port 0 of each node's IP, addresses read back from `addrs.json`;
//! temporary data dirs). Through node 1 the bench registers the instances
//! (`PUT /v1/agent/service/register`, service `bench`, no checks, so they pass while node 1
//! lives), waits until `GET /v1/health/service/bench?passing` lists them all, puts the route
//! `bench` (`{"protocol":"http","match":{"path_prefix":"/"},"service":"bench",
//! "lb":"round_robin"}`) and waits until node 1's proxy answers `GET /` with the backend's
//! body. If nginx is installed (`nginx` on PATH or `/usr/sbin/nginx`) it runs in the
//! foreground from a temporary dir (one worker, an upstream block with every instance and
//! `keepalive`, HTTP/1.1 and `Connection ""` to the upstreams, no access log) on a free
//! 127.0.0.1 port.
//!
//! Load: `wrk -t1 -c<C> -d<S>s --latency` when wrk is installed (`/usr/bin/wrk`, or on PATH),
//! else a load generator here (C keep-alive hyper HTTP/1.1 connections, each sending one
//! request after the other for S seconds, every latency recorded). Each target first gets an
//! unmeasured warm-up at the largest connection count; then for each connection count the
//! targets run one after the other (direct, raftmesh proxy, nginx), so load from other work
//! on the machine hits them alike.
//!
//! Reported per cell: requests/s, p50 and p99 latency, the ratio of requests/s to the direct
//! cell with as many connections and the p50 added to it, errors (socket errors, timeouts and
//! non-2xx answers), and the CPU (`/proc/PID/stat`, % of one core) of the proxy process (node
//! 1, whose figure includes its idle Raft work, or nginx's master and worker; also per
//! request, which is less disturbed by other work on the machine), of the backend thread, of
//! the load generator (wrk, or this process less the backend thread) and the machine's idle
//! time. After the cells, node 1's `GET /v1/routes/bench/stats` (requests,
//! errors, p50/p99, requests per upstream) against what the load generator sent through the
//! proxy, as a cross-check that the traffic went through it, and node 1's Raft term before
//! and after the cells (the load should not cost an election).
//!
//! Run: `cargo bench --bench proxy`. Knobs (environment): `BENCH_SECS` seconds per cell
//! (default 5), `BENCH_QUICK=1` for 2 s cells (an explicit `BENCH_SECS` still wins),
//! `BENCH_CONNS` connection counts (default `1,16,64`), `BENCH_BACKENDS` instances (default
//! 2), `BENCH_BODY` response bytes (default 100), `BENCH_TARGETS` (default
//! `direct,proxy,nginx`), `BENCH_LOADGEN=rust` to use the load generator here even when wrk is
//! installed, `BENCH_RAFTMESH_ARGS` extra agent flags, `BENCH_PROFILE` (default `release`:
//! the binary cargo built for this bench; `dist`, what `cluster/up` runs, is built here with
//! `cargo build --profile dist`), `BENCH_KEEP=1` keeps data dirs, node logs and the nginx
//! dir. Progress on stderr, markdown on stdout.
//!
//! Servers listen on loopback only. Every process is started by this program and killed by pid
//! when done, when the program unwinds, or on Ctrl-C: the nodes and wrk by their `Proc`
//! guards (SIGKILL), nginx by its guard (SIGTERM to the master, which stops its worker, then
//! SIGKILL to both).
//!
//! Owns the backend, nginx, the load, the cells and the report; the cluster, the process
//! guards and the formatting helpers are `common`, shared with the other benches.

mod common;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tempfile::TempDir;

use common::{
    env_flag, env_num, http_client, machine, ms, pct_ms, poll_until, progress, raftmesh_bin,
    Cluster, Proc, WAIT,
};

/// Timeout of control requests (registrations, the route, stats) and readiness probes.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections the control client keeps per node.
const CONTROL_IDLE: usize = 4;
/// The Rust load generator's bound on one request (wrk's own default is 2 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long wrk may run past its duration before it counts as hung.
const WRK_SLACK: Duration = Duration::from_secs(30);
/// How long nginx may take to stop after SIGTERM before it is killed.
const NGINX_STOP: Duration = Duration::from_secs(5);
/// Linux USER_HZ; /proc CPU times are in these ticks.
const CLK_TCK: f64 = 100.0;
/// The route under test, as the issue gives it.
const ROUTE: &str =
    r#"{"protocol":"http","match":{"path_prefix":"/"},"service":"bench","lb":"round_robin"}"#;
/// The node whose proxy carries the load (and through which everything is written).
const NODE: usize = 0;

// ------------------------------------------------------------------------------------ knobs

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    Raftmesh,
    Nginx,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Raftmesh => "raftmesh proxy",
            Target::Nginx => "nginx",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "direct" => Target::Direct,
            "proxy" | "raftmesh" => Target::Raftmesh,
            "nginx" => Target::Nginx,
            other => bail!("BENCH_TARGETS: {other:?} is none of direct, proxy, nginx"),
        })
    }
}

#[derive(Debug)]
struct Knobs {
    secs: u64,
    warmup_secs: u64,
    conns: Vec<usize>,
    backends: usize,
    body: usize,
    targets: Vec<Target>,
    /// wrk's path; `None` runs the load generator here.
    wrk: Option<PathBuf>,
    nginx: Option<PathBuf>,
    extra_args: Vec<String>,
    profile: String,
    keep: bool,
}

impl Knobs {
    fn from_env() -> Result<Self> {
        let quick = env_flag("BENCH_QUICK");
        let secs: u64 = env_num("BENCH_SECS")?.unwrap_or(if quick { 2 } else { 5 });
        ensure!(secs > 0, "BENCH_SECS must be positive");
        let conns = std::env::var("BENCH_CONNS").unwrap_or_else(|_| "1,16,64".into());
        let conns = conns
            .split(',')
            .map(|c| c.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| anyhow!("BENCH_CONNS={conns:?} is not a list of numbers"))?;
        ensure!(
            !conns.is_empty() && conns.iter().all(|c| (1..=4000).contains(c)),
            "BENCH_CONNS: 1 to 4000 connections per cell"
        );
        let backends: usize = env_num("BENCH_BACKENDS")?.unwrap_or(2);
        ensure!(
            (1..=64).contains(&backends),
            "BENCH_BACKENDS: 1 to 64 instances"
        );
        let body: usize = env_num("BENCH_BODY")?.unwrap_or(100);
        ensure!(body <= 1 << 20, "BENCH_BODY: at most 1 MiB");
        let targets =
            std::env::var("BENCH_TARGETS").unwrap_or_else(|_| "direct,proxy,nginx".into());
        let mut targets = targets
            .split(',')
            .map(|t| Target::parse(t.trim()))
            .collect::<Result<Vec<_>>>()?;
        // The report's ratios need the direct cells; the order is the cells' order.
        if !targets.contains(&Target::Direct) {
            targets.push(Target::Direct);
        }
        targets.sort_by_key(|t| *t as u8);
        targets.dedup();
        let wrk = match std::env::var("BENCH_LOADGEN").as_deref() {
            Ok("rust") => None,
            Ok("wrk") | Ok("") | Err(_) => find_bin("wrk", &["/usr/bin/wrk"]),
            Ok(other) => bail!("BENCH_LOADGEN={other:?} is neither wrk nor rust"),
        };
        let extra = std::env::var("BENCH_RAFTMESH_ARGS").unwrap_or_default();
        Ok(Knobs {
            secs,
            warmup_secs: 1,
            conns,
            backends,
            body,
            targets,
            wrk,
            nginx: find_bin("nginx", &["/usr/sbin/nginx"]),
            extra_args: extra.split_whitespace().map(String::from).collect(),
            profile: std::env::var("BENCH_PROFILE").unwrap_or_else(|_| "release".into()),
            keep: env_flag("BENCH_KEEP"),
        })
    }

    fn wants(&self, t: Target) -> bool {
        self.targets.contains(&t)
    }
}

/// `name` on PATH, else the first of `also` that exists.
fn find_bin(name: &str, also: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(also.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

// -------------------------------------------------------------------------------- /proc

/// The fields of `/proc/<what>/stat` after the command name (the first is the state).
fn stat_fields(what: &str) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{what}/stat")).ok()?;
    Some(
        s[s.rfind(')')? + 2..]
            .split_whitespace()
            .map(String::from)
            .collect(),
    )
}

fn field(f: &[String], i: usize) -> Option<u64> {
    f.get(i)?.parse().ok()
}

/// utime + stime of a process or thread (`"self"`, a pid, `self/task/<tid>`), in ticks.
fn ticks(what: &str) -> Option<u64> {
    let f = stat_fields(what)?;
    Some(field(&f, 11)? + field(&f, 12)?)
}

/// cutime + cstime of this process: the CPU of its children that have been reaped (wrk; the
/// nodes are reaped only at the end).
fn reaped_children_ticks() -> Option<u64> {
    let f = stat_fields("self")?;
    Some(field(&f, 13)? + field(&f, 14)?)
}

/// Idle + iowait ticks of every core together, from `/proc/stat`.
fn machine_idle_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = (s.lines().next()?.split_whitespace().skip(1))
        .filter_map(|v| v.parse().ok())
        .collect();
    Some(f.get(3)? + f.get(4)?)
}

/// Pids whose parent is `parent` and whose command is `comm`.
fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            stat_fields(&pid.to_string()).and_then(|f| field(&f, 1)) == Some(u64::from(parent))
                && command_of(*pid).as_deref() == Some(comm)
        })
        .collect()
}

fn command_of(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim().to_string())
}

/// CPU ticks at one moment, for one cell.
struct Snap {
    at: Instant,
    proxy: Option<u64>,
    backend: Option<u64>,
    me: Option<u64>,
    reaped: Option<u64>,
    idle: Option<u64>,
}

impl Snap {
    fn take(proxy_pids: &[u32], backend_tid: Option<u32>) -> Self {
        let proxy: Option<Vec<u64>> = proxy_pids.iter().map(|p| ticks(&p.to_string())).collect();
        Snap {
            at: Instant::now(),
            proxy: proxy.filter(|v| !v.is_empty()).map(|v| v.iter().sum()),
            backend: backend_tid.and_then(|t| ticks(&format!("self/task/{t}"))),
            me: ticks("self"),
            reaped: reaped_children_ticks(),
            idle: machine_idle_ticks(),
        }
    }
}

/// CPU of one cell, each in % of one core.
#[derive(Default, Clone, Copy)]
struct Cpu {
    proxy: Option<f64>,
    backend: Option<f64>,
    loadgen: Option<f64>,
    idle: Option<f64>,
}

impl Cpu {
    fn between(a: &Snap, b: &Snap) -> Self {
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        let pct = |x: Option<u64>, y: Option<u64>| {
            Some(y?.saturating_sub(x?) as f64 / CLK_TCK / secs * 100.0)
        };
        let backend = pct(a.backend, b.backend);
        // This process less the backend thread (the Rust load generator and the idle control
        // plane), plus wrk once reaped.
        let me = pct(a.me, b.me).map(|m| (m - backend.unwrap_or(0.0)).max(0.0));
        let loadgen = match (me, pct(a.reaped, b.reaped)) {
            (None, None) => None,
            (m, r) => Some(m.unwrap_or(0.0) + r.unwrap_or(0.0)),
        };
        Cpu {
            proxy: pct(a.proxy, b.proxy),
            backend,
            loadgen,
            idle: pct(a.idle, b.idle),
        }
    }
}

// ---------------------------------------------------------------------------------- backend

/// The HTTP backend: its instances' listeners, served by one thread until dropped.
struct Backend {
    addrs: Vec<SocketAddr>,
    /// Requests answered, per instance (shared with the serving tasks).
    served: Arc<Vec<AtomicU64>>,
    /// The serving thread's id, for its CPU in `/proc/self/task`.
    tid: Option<u32>,
    /// Dropping it ends the serving thread's runtime and with it every connection.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start(instances: usize, body: usize) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("backend runtime")?;
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..instances {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a backend")?;
            l.set_nonblocking(true)?;
            addrs.push(l.local_addr()?);
            let _in_rt = rt.enter();
            listeners.push(tokio::net::TcpListener::from_std(l)?);
        }
        let served: Arc<Vec<AtomicU64>> =
            Arc::new((0..instances).map(|_| AtomicU64::new(0)).collect());
        let body = Bytes::from(vec![b'x'; body]);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let counters = served.clone();
        let thread = std::thread::Builder::new()
            .name("backend".into())
            .spawn(move || {
                // "<pid>/task/<tid>"
                let tid = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok());
                let _ = tid_tx.send(tid);
                rt.block_on(async move {
                    for (i, l) in listeners.into_iter().enumerate() {
                        tokio::spawn(serve_instance(l, body.clone(), counters.clone(), i));
                    }
                    let _ = stopped.await;
                });
                // Dropping the runtime here cancels every connection task.
            })
            .context("spawn the backend thread")?;
        let tid = tid_rx.recv_timeout(Duration::from_secs(5)).ok().flatten();
        Ok(Backend {
            addrs,
            served,
            tid,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn served(&self) -> Vec<u64> {
        self.served
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_instance(
    l: tokio::net::TcpListener,
    body: Bytes,
    served: Arc<Vec<AtomicU64>>,
    i: usize,
) {
    loop {
        let conn = match l.accept().await {
            Ok((c, _)) => c,
            Err(_) => {
                // Out of descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let (body, served) = (body.clone(), served.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                served[i].fetch_add(1, Ordering::Relaxed);
                let res = hyper::Response::new(Full::new(body.clone()));
                async move { Ok::<_, Infallible>(res) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), svc)
                .await;
        });
    }
}

// ------------------------------------------------------------------------------------ nginx

/// nginx in the foreground from its own temporary dir, stopped when dropped.
struct Nginx {
    addr: SocketAddr,
    /// The master's pid and its workers', for their CPU.
    pids: Vec<u32>,
    proc: Proc,
    /// Holds the config, the error log and the temp paths.
    dir: TempDir,
}

impl Nginx {
    async fn start(bin: &Path, backends: &[SocketAddr], body: usize, keep: bool) -> Result<Self> {
        let dir = (tempfile::Builder::new().prefix("raftmesh-proxy-nginx-"))
            .disable_cleanup(keep)
            .tempdir()
            .context("create nginx dir")?;
        if keep {
            progress!("keeping {}", dir.path().display());
        }
        let d = dir.path().display().to_string();
        let addr = free_port()?;
        let servers: String = backends
            .iter()
            .map(|a| format!("        server {a};\n"))
            .collect();
        let conf = format!(
            "worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   keepalive_requests 1000000;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   upstream bench {{\n{servers}\
             \x20       keepalive 256;\n\
             \x20       keepalive_requests 1000000;\n\
             \x20   }}\n\
             \x20   server {{\n\
             \x20       listen {addr};\n\
             \x20       location / {{\n\
             \x20           proxy_pass http://bench;\n\
             \x20           proxy_http_version 1.1;\n\
             \x20           proxy_set_header Connection \"\";\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).context("write nginx.conf")?;
        let log = dir.path().join("stderr.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path);
        cmd.args(["-g", "daemon off;"]);
        // nginx opens its built-in error log before reading the config unless told otherwise
        // (1.19.5 and later).
        let help = Command::new(bin).arg("-h").output();
        if help.is_ok_and(|o| String::from_utf8_lossy(&o.stderr).contains("-e filename")) {
            cmd.arg("-e").arg(dir.path().join("error.log"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut n = Nginx {
            addr,
            pids: Vec::new(),
            proc: Proc::new(child),
            dir,
        };
        let master = n.proc.id();
        let probe = http_client(Some(CONTROL_TIMEOUT), CONNECT_TIMEOUT, 1)?;
        let url = format!("http://{addr}/");
        let logs = |n: &Nginx| {
            let read = |f: &str| std::fs::read_to_string(n.dir.path().join(f)).unwrap_or_default();
            format!("{}{}", read("stderr.log"), read("error.log"))
        };
        poll_until(WAIT, "nginx answering 200", async || {
            if let Some(st) = n.proc.child().try_wait()? {
                bail!("nginx exited ({st}): {}", logs(&n));
            }
            get_body(&probe, &url, body).await
        })
        .await?;
        let workers = children_named(master, "nginx");
        ensure!(!workers.is_empty(), "nginx runs no worker: {}", logs(&n));
        n.pids = std::iter::once(master).chain(workers).collect();
        progress!("nginx pids {:?} on {addr}", n.pids);
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker and exits; SIGKILL (the guard, and here for the
        // workers, whose parent no longer waits for them then) if it does not in time.
        let master = self.proc.id();
        let _ = Command::new("kill")
            .args(["-TERM", &master.to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < NGINX_STOP {
            if let Ok(Some(_)) = self.proc.child().try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for &w in self.pids.iter().filter(|p| **p != master) {
            if command_of(w).as_deref() == Some("nginx") {
                let _ = Command::new("kill")
                    .args(["-KILL", &w.to_string()])
                    .status();
            }
        }
    }
}

/// A 127.0.0.1 port free right now.
fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?)
}

/// `Some(())` once `url` answers 200 with a `body`-byte body.
async fn get_body(client: &reqwest::Client, url: &str, body: usize) -> Result<Option<()>> {
    let r = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = r.status();
    let got = r
        .bytes()
        .await
        .with_context(|| format!("GET {url}: body"))?;
    ensure!(
        status == 200,
        "GET {url}: {status} {}",
        String::from_utf8_lossy(&got)
    );
    ensure!(
        got.len() == body,
        "GET {url}: {} bytes, the backend sends {body}",
        got.len()
    );
    Ok(Some(()))
}

// ---------------------------------------------------------------------------------- cluster

/// The proxy bench's setup requests, on top of the shared harness.
impl Cluster {
    async fn send(&self, method: reqwest::Method, path: &str, body: String) -> Result<Value> {
        let url = format!("http://{}{path}", self.nodes[NODE].api);
        let r = (self.http.request(method.clone(), &url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        ensure!(status == 200, "{method} {url}: {status} {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Registers the backend's instances as `bench-<i>` through node 1, waits until all
    /// pass, puts the route and waits until node 1's proxy answers through it; the proxy's
    /// address and the probe requests sent through it.
    async fn prepare(&self, backend: &Backend, body: usize) -> Result<(SocketAddr, u64)> {
        for (i, a) in backend.addrs.iter().enumerate() {
            let reg = json!({"Name": "bench", "ID": format!("bench-{i}"),
                "Address": a.ip().to_string(), "Port": a.port()});
            (self.send(
                reqwest::Method::PUT,
                "/v1/agent/service/register",
                reg.to_string(),
            ))
            .await?;
        }
        let n = backend.addrs.len();
        poll_until(WAIT, &format!("{n} passing bench instances"), async || {
            let v = (self.get_json(NODE, "/v1/health/service/bench?passing", &self.http)).await?;
            Ok((v.as_array().map(Vec::len) == Some(n)).then_some(()))
        })
        .await?;
        self.send(reqwest::Method::PUT, "/v1/routes/bench", ROUTE.into())
            .await?;
        let proxy = self.nodes[NODE]
            .proxy
            .as_deref()
            .context("node 1 has no proxy")?;
        let proxy: SocketAddr = proxy.parse().context("proxy_addr")?;
        let probe = http_client(Some(CONTROL_TIMEOUT), CONNECT_TIMEOUT, 1)?;
        let url = format!("http://{proxy}/");
        let mut probes = 0u64;
        let ready = poll_until(
            WAIT,
            "node 1's proxy answering 200 through the route",
            async || {
                probes += 1;
                get_body(&probe, &url, body).await
            },
        )
        .await;
        ready.map_err(|e| anyhow!("{e:#}\n{}", self.logs_tail()))?;
        Ok((proxy, probes))
    }
}

// ------------------------------------------------------------------------------------ load

/// What one load run measured.
#[derive(Default)]
struct Load {
    requests: u64,
    rps: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    errors: u64,
    error_sample: Option<String>,
}

async fn load(knobs: &Knobs, addr: SocketAddr, conns: usize, secs: u64) -> Result<Load> {
    match &knobs.wrk {
        Some(wrk) => run_wrk(wrk, addr, conns, secs).await,
        None => run_rust(addr, conns, Duration::from_secs(secs)).await,
    }
}

async fn run_wrk(bin: &Path, addr: SocketAddr, conns: usize, secs: u64) -> Result<Load> {
    let url = format!("http://{addr}/");
    let child = Command::new(bin)
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            &url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let mut p = Proc::new(child);
    let t = Instant::now();
    // wrk prints a few hundred bytes at the end; the pipes cannot fill while it runs.
    let st = loop {
        if let Some(st) = p.child().try_wait()? {
            break st;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(secs) + WRK_SLACK,
            "wrk still running after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = p.child().stdout.take() {
        o.read_to_string(&mut out)?;
    }
    if let Some(mut e) = p.child().stderr.take() {
        e.read_to_string(&mut err)?;
    }
    ensure!(st.success(), "wrk failed ({st}): {out}{err}");
    parse_wrk(&out).with_context(|| format!("parse wrk output:\n{out}"))
}

/// A wrk duration (`123.45us`, `1.20ms`, `2.00s`, `1.00m`) in ms.
fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num / 1000.0,
        "ms" => num,
        "s" => num * 1000.0,
        "m" => num * 60_000.0,
        "h" => num * 3_600_000.0,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> Result<Load> {
    let mut l = Load::default();
    let mut rps = None;
    let mut samples = Vec::new();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => l.p50 = wrk_ms(v),
            ["99%", v] => l.p99 = wrk_ms(v),
            ["Requests/sec:", v] => rps = v.parse().ok(),
            [n, "requests", "in", ..] => l.requests = n.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        l.errors += n.trim_end_matches(',').parse::<u64>()?;
                    }
                }
                samples.push(line.to_string());
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                l.errors += n.parse::<u64>()?;
                samples.push(line.to_string());
            }
            _ => {}
        }
    }
    l.rps = rps.context("no Requests/sec line")?;
    ensure!(
        l.p50.is_some() && l.p99.is_some(),
        "no latency distribution"
    );
    if l.errors > 0 {
        l.error_sample = Some(samples.join("; "));
    }
    Ok(l)
}

/// One connection's share of a Rust load run.
#[derive(Default)]
struct ConnLog {
    lat_us: Vec<u64>,
    errors: u64,
    sample: Option<String>,
}

impl ConnLog {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.sample.get_or_insert(e);
    }
}

async fn run_rust(addr: SocketAddr, conns: usize, dur: Duration) -> Result<Load> {
    let deadline = Instant::now() + dur;
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(one_connection(addr, deadline)))
        .collect();
    let mut lat = Vec::new();
    let mut l = Load::default();
    for t in tasks {
        let c = t.await.context("load connection panicked")?;
        lat.extend(c.lat_us);
        l.errors += c.errors;
        if l.error_sample.is_none() {
            l.error_sample = c.sample;
        }
    }
    // Over the cell's duration, as wrk counts: a request still in flight at
    // the deadline may take up to its timeout longer, which is not the
    // cell's time.
    let secs = dur.as_secs_f64().max(f64::EPSILON);
    lat.sort_unstable();
    l.requests = lat.len() as u64;
    l.rps = l.requests as f64 / secs;
    l.p50 = pct_ms(&lat, 0.5);
    l.p99 = pct_ms(&lat, 0.99);
    Ok(l)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Requests one after the other on one keep-alive connection until `deadline`, reconnecting
/// after a broken exchange; only 200s count as latencies.
async fn one_connection(addr: SocketAddr, deadline: Instant) -> ConnLog {
    let mut log = ConnLog::default();
    let host = addr.to_string();
    while Instant::now() < deadline {
        let mut sender = match connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                log.error(format!("connect: {e:#}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        while Instant::now() < deadline {
            let req = hyper::Request::get("/")
                .header(hyper::header::HOST, &host)
                .body(Empty::<Bytes>::new());
            let Ok(req) = req else {
                log.error("cannot build the request".into());
                return log;
            };
            let t = Instant::now();
            let exchange = async {
                sender.ready().await?;
                let res = sender.send_request(req).await?;
                let status = res.status();
                res.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(s)) if s == 200 => log.lat_us.push(t.elapsed().as_micros() as u64),
                Ok(Ok(s)) => log.error(format!("HTTP {s}")),
                Ok(Err(e)) => {
                    log.error(e.to_string());
                    break;
                }
                Err(_) => {
                    log.error(format!("no answer in {REQUEST_TIMEOUT:?}"));
                    break;
                }
            }
        }
    }
    log
}

// ---------------------------------------------------------------------------------- cells

/// A target that is up: where to send load and whose CPU is the proxy's.
struct Up {
    target: Target,
    addr: SocketAddr,
    proxy_pids: Vec<u32>,
}

struct Cell {
    target: Target,
    conns: usize,
    load: Result<Load>,
    cpu: Cpu,
    /// Requests the backend answered during the cell.
    backend: u64,
}

async fn cell(knobs: &Knobs, up: &Up, conns: usize, backend: &Backend) -> Cell {
    let served: u64 = backend.served().iter().sum();
    let a = Snap::take(&up.proxy_pids, backend.tid);
    let load = load(knobs, up.addr, conns, knobs.secs).await;
    let b = Snap::take(&up.proxy_pids, backend.tid);
    let cell = Cell {
        target: up.target,
        conns,
        load,
        cpu: Cpu::between(&a, &b),
        backend: backend.served().iter().sum::<u64>() - served,
    };
    match &cell.load {
        Ok(l) => progress!(
            "{} c={conns}: {:.0} req/s, p50 {} ms, p99 {} ms, {} errors",
            up.target.name(),
            l.rps,
            ms(l.p50),
            ms(l.p99),
            l.errors
        ),
        Err(e) => progress!("{} c={conns} failed: {e:#}", up.target.name()),
    }
    cell
}

// ---------------------------------------------------------------------------------- report

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |p| format!("{p:.0}"))
}

fn render(knobs: &Knobs, cells: &[Cell], cross: &str, notes: &[String]) -> String {
    let (cores, load) = machine();
    let loadgen = match &knobs.wrk {
        Some(w) => format!("`{} -t1 -c<C> -d{}s --latency`", w.display(), knobs.secs),
        None => format!(
            "the bench's own load generator (C keep-alive hyper connections, {} s)",
            knobs.secs
        ),
    };
    let mut s = format!(
        "## raftmesh proxy benchmark: direct vs through the proxy\n\n\
         A hyper HTTP/1.1 backend in the bench process ({} instance(s) on one thread, {}-byte \
         answers), `GET /` directly (one instance), through node 1's raftmesh proxy (3-node \
         cluster on 127.0.0.1-3, `{}` build, route `bench`, round robin over every instance) \
         and through nginx (one worker, keep-alive upstreams) where installed. Load: {loadgen}, \
         after a {} s warm-up per target; `nproc` {cores}, load average at the end {load}; \
         the load generator, the backend, the proxy and the cluster share the cores.\n\n\
         | target | connections | requests/s | ratio to direct | p50 ms | p99 ms | p50 added ms \
         | errors | proxy CPU % | proxy CPU µs/request | backend CPU % | load gen CPU % | \
         machine idle % |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        knobs.backends, knobs.body, knobs.profile, knobs.warmup_secs,
    );
    for c in cells {
        let direct = cells
            .iter()
            .find(|d| d.target == Target::Direct && d.conns == c.conns)
            .and_then(|d| d.load.as_ref().ok());
        let Ok(l) = &c.load else {
            let _ = writeln!(
                s,
                "| {} | {} | FAILED | - | - | - | - | - | - | - | - | - | - |",
                c.target.name(),
                c.conns
            );
            continue;
        };
        let ratio = direct
            .filter(|d| d.rps > 0.0)
            .map_or("-".into(), |d| format!("{:.2}", l.rps / d.rps));
        let added = match (l.p50, direct.and_then(|d| d.p50)) {
            (Some(p), Some(d)) if c.target != Target::Direct => format!("{:+.3}", p - d),
            _ => "-".into(),
        };
        let (proxy_cpu, per_request) = match c.cpu.proxy {
            Some(p) if c.target != Target::Direct => {
                let us = (l.rps > 0.0).then(|| p / 100.0 * 1e6 / l.rps);
                (pct(Some(p)), us.map_or("-".into(), |u| format!("{u:.0}")))
            }
            _ => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {ratio} | {} | {} | {added} | {} | {proxy_cpu} | {per_request} \
             | {} | {} | {} |",
            c.target.name(),
            c.conns,
            l.rps,
            ms(l.p50),
            ms(l.p99),
            l.errors,
            pct(c.cpu.backend),
            pct(c.cpu.loadgen),
            pct(c.cpu.idle),
        );
    }
    s.push_str(cross);
    s.push_str("\nNotes:\n\n");
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    for c in cells {
        match &c.load {
            Err(e) => {
                let e = format!("{e:#}").replace('`', "'");
                let _ = writeln!(s, "- {} c={} FAILED: `{e}`", c.target.name(), c.conns);
            }
            Ok(l) => {
                if let Some(e) = &l.error_sample {
                    let e: String = e.replace('`', "'").chars().take(240).collect();
                    let _ = writeln!(s, "- {} c={} error sample: `{e}`", c.target.name(), c.conns);
                }
                // Each connection may leave one request unanswered (and so uncounted) at the end.
                let slack = c.conns as u64 + l.requests / 100;
                if c.backend.abs_diff(l.requests) > slack {
                    let _ = writeln!(
                        s,
                        "- {} c={}: the backend answered {} requests, the load generator \
                         counted {}",
                        c.target.name(),
                        c.conns,
                        c.backend,
                        l.requests
                    );
                }
            }
        }
    }
    s
}

/// Node 1's view of the route after the run, against what was sent through the proxy.
fn cross_check(stats: &Value, sent: u64, served_split: &[u64]) -> String {
    let st = &stats["stats"];
    let errors: u64 = st["errors"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    let error_kinds: Vec<String> = st["errors"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let upstreams: Vec<String> = stats["upstreams"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(id, u)| {
            let ejected = if u["ejected"] == true {
                ", ejected"
            } else {
                ""
            };
            format!("{id} {}{ejected}", u["stats"]["requests"])
        })
        .collect();
    let lat = &st["latency_ms"];
    let f = |v: &Value| ms(v.as_f64());
    let served: Vec<String> = served_split.iter().map(u64::to_string).collect();
    format!(
        "\nCross-check, node 1's `GET /v1/routes/bench/stats` after the run:\n\n\
         | requests counted by the proxy | answered through the proxy (load generator, warm-up \
         and probes) | errors | retries | p50 ms | p99 ms | max ms | requests per upstream \
         | backend answers per instance (whole run) |\n\
         |---|---|---|---|---|---|---|---|---|\n\
         | {} | {sent} | {errors}{} | {} | {} | {} | {} | {} | {} |\n",
        st["requests"],
        if error_kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", error_kinds.join(", "))
        },
        st["retries"],
        f(&lat["p50"]),
        f(&lat["p99"]),
        f(&lat["max"]),
        upstreams.join(", "),
        served.join(" / "),
    )
}

// ---------------------------------------------------------------------------------- run

async fn run() -> Result<()> {
    LazyLock::force(&common::START);
    let knobs = Knobs::from_env()?;
    progress!("knobs: {knobs:?}");
    let mut notes = Vec::new();
    let mut failed = false;
    match &knobs.wrk {
        Some(w) => notes.push(format!("Load generator: {}.", w.display())),
        None => notes.push(
            "Load generator: the bench's own (wrk not found, or `BENCH_LOADGEN=rust`); its \
             CPU is this process's less the backend thread."
                .into(),
        ),
    }
    let backend = Backend::start(knobs.backends, knobs.body)?;
    progress!("backend on {:?} (thread {:?})", backend.addrs, backend.tid);
    let mut ups = vec![Up {
        target: Target::Direct,
        addr: backend.addrs[0],
        proxy_pids: Vec::new(),
    }];

    // Held to the end, so the nodes and nginx live through every cell (and go before the
    // backend, declared first).
    let mut cluster = None;
    let mut probes = 0;
    if knobs.wants(Target::Raftmesh) {
        let bin = raftmesh_bin(&knobs.profile)?;
        notes.push(format!("raftmesh binary: {}.", bin.display()));
        let http = http_client(Some(CONTROL_TIMEOUT), CONNECT_TIMEOUT, CONTROL_IDLE)?;
        let c = Cluster::start_with_proxy(&bin, &knobs.extra_args, knobs.keep, http).await?;
        let leader = c.wait_leader().await?;
        progress!("cluster formed, leader node{}", leader + 1);
        match c.prepare(&backend, knobs.body).await {
            Ok((addr, n)) => {
                progress!("node 1's proxy {addr} answers through route bench");
                probes = n;
                ups.push(Up {
                    target: Target::Raftmesh,
                    addr,
                    proxy_pids: vec![c.pids()[NODE]],
                });
            }
            Err(e) => {
                progress!("raftmesh proxy not ready: {e:#}");
                let e = format!("{e:#}");
                let first = e.lines().next().unwrap_or_default().replace('`', "'");
                notes.push(format!("raftmesh proxy FAILED before its cells: `{first}`"));
                failed = true;
            }
        }
        cluster = Some(c);
    }
    let mut nginx = None;
    if knobs.wants(Target::Nginx) {
        match &knobs.nginx {
            None => {
                progress!("nginx not installed (apt-get install -y nginx); skipping it");
                notes
                    .push("nginx not installed (apt-get install -y nginx): no nginx cells.".into());
            }
            Some(bin) => match Nginx::start(bin, &backend.addrs, knobs.body, knobs.keep).await {
                Ok(n) => {
                    let v = Command::new(bin).arg("-v").output();
                    let v = v.map_or_else(
                        |_| String::new(),
                        |o| String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    );
                    notes.push(format!("nginx: {} ({v}).", bin.display()));
                    ups.push(Up {
                        target: Target::Nginx,
                        addr: n.addr,
                        proxy_pids: n.pids.clone(),
                    });
                    nginx = Some(n);
                }
                Err(e) => {
                    progress!("nginx failed to start: {e:#}");
                    notes.push(format!("nginx FAILED to start: `{e:#}`"));
                    failed = true;
                }
            },
        }
    }

    let warm_conns = knobs.conns.iter().copied().max().unwrap_or(1);
    let mut through_proxy = probes;
    for up in &ups {
        progress!("warming up {} ({warm_conns} connections)", up.target.name());
        match load(&knobs, up.addr, warm_conns, knobs.warmup_secs).await {
            Ok(l) if up.target == Target::Raftmesh => through_proxy += l.requests,
            Ok(_) => {}
            Err(e) => {
                // Its cells run anyway and show whether it recovered.
                progress!("warm-up of {} failed: {e:#}", up.target.name());
                let e = format!("{e:#}").replace('`', "'");
                notes.push(format!("warm-up of {} FAILED: `{e}`", up.target.name()));
                failed = true;
            }
        }
    }
    // A failed status read must not throw the measured cells away.
    let before = match &cluster {
        Some(c) => c.status(NODE).await.ok(),
        None => None,
    };
    let mut cells = Vec::new();
    for &conns in &knobs.conns {
        for up in &ups {
            let c = cell(&knobs, up, conns, &backend).await;
            match &c.load {
                Ok(l) if up.target == Target::Raftmesh => through_proxy += l.requests,
                Ok(_) => {}
                Err(_) => failed = true,
            }
            cells.push(c);
        }
    }

    let mut cross = String::new();
    if let Some(c) = &cluster {
        if ups.iter().any(|u| u.target == Target::Raftmesh) {
            match c.get_json(NODE, "/v1/routes/bench/stats", &c.http).await {
                Ok(v) => cross = cross_check(&v, through_proxy, &backend.served()),
                Err(e) => notes.push(format!("GET /v1/routes/bench/stats failed: {e:#}")),
            }
            notes.push(
                "The proxy's own count may exceed the load generator's by up to one request \
                 per connection per run (wrk stops without waiting for the last answers); its \
                 latency is measured inside the proxy."
                    .into(),
            );
        }
        let after = c.status(NODE).await;
        if let (Some(before), Err(e)) = (&before, &after) {
            failed = true;
            notes.push(format!(
                "node 1 did not answer its status after the cells ({e:#}); term before: {}.",
                before["term"]
            ));
        }
        if let (Some(before), Ok(after)) = (&before, &after) {
            let (t0, t1) = (&before["term"], &after["term"]);
            let (l0, l1) = (&before["leader_id"], &after["leader_id"]);
            let verdict = if t0 == t1 {
                "no election"
            } else {
                "ELECTIONS happened"
            };
            notes.push(format!(
                "Raft term on node 1 before → after the cells: {t0} → {t1} ({verdict}); leader \
                 n{l0} → n{l1}."
            ));
        }
        let warns: Vec<String> = c.log_warnings().iter().map(usize::to_string).collect();
        notes.push(format!(
            "WARN/ERROR lines in the node logs n1/n2/n3: {}.",
            warns.join("/")
        ));
    }
    notes.push(
        "Proxy CPU is node 1's whole process (its Raft heartbeats included) or nginx's master \
         and worker; machine idle is every core's idle time together, in % of one core."
            .into(),
    );
    println!("{}", render(&knobs, &cells, &cross, &notes));
    drop(nginx);
    drop(cluster);
    progress!("done");
    ensure!(!failed, "a target or a cell failed; see the notes");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    // Ctrl-C drops the run, whose guards kill the servers and wrk.
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}
