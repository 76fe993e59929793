//! Test harness for the end-to-end cluster tests: owns spawning real `raftmesh agent`
//! processes (one `TempDir` per node), discovering their bound addresses through
//! `<data-dir>/addrs.json`, killing / signalling / restarting them by pid, a small HTTP client
//! wrapper with timeouts, and the `eventually` polling helper. Every failure that goes through
//! [`Cluster::eventually`] or [`Cluster::finish`] carries the tail of every node's log.

#![allow(dead_code)] // not every test binary uses every helper

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::Value;
use tempfile::TempDir;

/// Default deadline for anything we wait on (CI is a noisy 2-core machine).
pub const WAIT: Duration = Duration::from_secs(30);
/// How often `eventually` probes.
pub const POLL: Duration = Duration::from_millis(100);
/// Client timeout for every ordinary HTTP request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of each node's log put into a failure message.
const LOG_TAIL_LINES: usize = 200;

/// Error that makes [`eventually`] stop polling at once (e.g. the process it waits for exited).
#[derive(Debug)]
pub struct Abort(pub String);

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "aborted: {}", self.0)
    }
}

impl std::error::Error for Abort {}

/// Build an error that stops [`eventually`] immediately instead of being retried.
pub fn abort(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Abort(msg.into()))
}

/// Polls `probe` every [`POLL`] until it returns `Ok`, or fails with the last probe error once
/// `deadline` has passed. `Err` from the probe means "not yet", unless it is an [`Abort`].
/// Accepts both `async || ...` closures and plain closures returning a future.
pub async fn eventually<T>(
    deadline: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        // Bound each attempt too, so a hanging probe cannot stretch the deadline much.
        let left = deadline.saturating_sub(start.elapsed()).max(POLL);
        let err = match tokio::time::timeout(left + Duration::from_secs(1), probe()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                if e.downcast_ref::<Abort>().is_some() {
                    return Err(e.context(format!(
                        "while waiting for: {what} (after {:.1?}, {attempts} attempts)",
                        start.elapsed()
                    )));
                }
                e
            }
            Err(_) => anyhow!("probe attempt timed out"),
        };
        if start.elapsed() >= deadline {
            return Err(err.context(format!(
                "timed out after {:.1?} ({attempts} attempts) waiting for: {what}",
                start.elapsed()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Failure message with the node logs already attached (so they are attached only once).
#[derive(Debug)]
struct WithLogs {
    error: String,
    logs: String,
}

impl fmt::Display for WithLogs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n\n{}", self.error, self.logs)
    }
}

impl std::error::Error for WithLogs {}

/// Contents of `<data-dir>/addrs.json`, written by a node once both listeners are bound.
#[derive(Debug, Clone, Deserialize)]
pub struct Addrs {
    pub id: u64,
    pub name: String,
    pub api_addr: String,
    pub peer_addr: String,
    /// The proxy's bound HTTP address, when the node runs with `--proxy-addr`.
    #[serde(default)]
    pub proxy_addr: Option<String>,
    pub pid: u32,
}

/// A buffered HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("body is not JSON (status {}): {:?}", self.status, self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The numeric `X-Consul-Index` header.
    pub fn index(&self) -> Result<u64> {
        let raw = self
            .header("X-Consul-Index")
            .with_context(|| format!("no X-Consul-Index header (status {})", self.status))?;
        raw.trim()
            .parse()
            .with_context(|| format!("X-Consul-Index is not a number: {raw:?}"))
    }

    /// Fails unless the status is 200.
    pub fn expect_200(self, what: &str) -> Result<Self> {
        ensure!(
            self.status == 200,
            "{what}: expected 200, got {} with body {:?}",
            self.status,
            self.body
        );
        Ok(self)
    }
}

/// One node: its temp dir (data dir + log file), its flags and its current process.
pub struct Node {
    pub id: u64,
    dir: TempDir,
    /// Flags other than --api-addr/--peer-addr; identical for every run of this node.
    flags: Vec<String>,
    child: Option<Child>,
    /// Addresses of the latest run (reused on restart).
    pub addrs: Option<Addrs>,
    runs: u32,
    pub last_exit: Option<ExitStatus>,
}

impl Node {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    fn addrs_path(&self) -> PathBuf {
        self.data_dir().join("addrs.json")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process we spawned has not been reaped.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let skip = all.len().saturating_sub(lines);
            let mut out = String::new();
            if skip > 0 {
                out.push_str(&format!("... ({skip} earlier lines omitted)\n"));
            }
            for l in &all[skip..] {
                out.push_str(l);
                out.push('\n');
            }
            out
        }
        Err(e) => format!("<cannot read {}: {e}>\n", path.display()),
    }
}

/// Cluster tests run one at a time even under plain `cargo test` (default test threads): nine
/// or more Raft processes on a 2-core CI machine would only produce election-timeout noise.
static SERIAL: Mutex<()> = Mutex::new(());

/// A three-node cluster of real processes.
pub struct Cluster {
    nodes: Vec<Node>,
    client: reqwest::Client,
    /// Held for the cluster's whole life; dropped last, after the processes are killed.
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Prepares nodes 1..=3 (not started). `extra_flags` are added to every node's command line.
    pub fn new(extra_flags: &[&str]) -> Result<Self> {
        Self::with_size(3, extra_flags)
    }

    pub fn with_size(n: u64, extra_flags: &[&str]) -> Result<Self> {
        // A test that failed (panicked) while holding the lock poisons it; that is fine here.
        let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let mut nodes = Vec::new();
        for id in 1..=n {
            let dir = tempfile::Builder::new()
                .prefix(&format!("raftmesh-node{id}-"))
                .tempdir()
                .context("create temp dir")?;
            std::fs::create_dir_all(dir.path().join("data")).context("create data dir")?;
            let data_dir = dir.path().join("data");
            let mut flags: Vec<String> = vec![
                "agent".into(),
                "--id".into(),
                id.to_string(),
                "--name".into(),
                format!("node{id}"),
                "--data-dir".into(),
                data_dir.display().to_string(),
            ];
            flags.extend(extra_flags.iter().map(|s| s.to_string()));
            nodes.push(Node {
                id,
                dir,
                flags,
                child: None,
                addrs: None,
                runs: 0,
                last_exit: None,
            });
        }
        Ok(Self {
            nodes,
            client: client(HTTP_TIMEOUT)?,
            _serial: serial,
        })
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn node(&self, id: u64) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    pub fn pid(&self, id: u64) -> Result<u32> {
        self.node(id)?
            .pid()
            .with_context(|| format!("node {id} has no process"))
    }

    pub fn api_addr(&self, id: u64) -> Result<String> {
        Ok(self
            .node(id)?
            .addrs
            .as_ref()
            .with_context(|| format!("node {id} has no known addresses yet"))?
            .api_addr
            .clone())
    }

    /// The bound HTTP proxy address of node `id` (it must run with `--proxy-addr`).
    pub fn proxy_addr(&self, id: u64) -> Result<String> {
        self.node(id)?
            .addrs
            .as_ref()
            .with_context(|| format!("node {id} has no known addresses yet"))?
            .proxy_addr
            .clone()
            .with_context(|| format!("node {id} runs no proxy (no proxy_addr in addrs.json)"))
    }

    /// Forms the cluster as the house rules say: node 1 `--bootstrap-expect 3`, node 2 joins 1,
    /// node 3 joins 1 and 2. Waits until all nodes agree on one leader and returns its id.
    pub async fn form(&mut self) -> Result<u64> {
        let ids = self.ids();
        self.form_ids(&ids).await
    }

    /// [`Cluster::form`] over a subset of the prepared nodes; the others stay unstarted.
    pub async fn form_ids(&mut self, ids: &[u64]) -> Result<u64> {
        let ids = ids.to_vec();
        let expect = ids.len().to_string();
        let mut apis: Vec<String> = Vec::new();
        for &id in &ids {
            let node = self.node_mut(id)?;
            node.flags.push("--bootstrap-expect".into());
            node.flags.push(expect.clone());
            if !apis.is_empty() {
                node.flags.push("--join".into());
                node.flags.push(apis.join(","));
            }
            self.start(id).await?;
            apis.push(self.api_addr(id)?);
        }
        self.wait_for_leader(&ids).await
    }

    /// Adds flags to node `id`'s command line, for this and every later run.
    pub fn add_flags(&mut self, id: u64, flags: &[&str]) -> Result<()> {
        let node = self.node_mut(id)?;
        node.flags.extend(flags.iter().map(|f| f.to_string()));
        Ok(())
    }

    /// Spawns node `id` without waiting for it. The first run binds port 0; later runs reuse
    /// the ports of the previous run (from its addrs.json) and the same flags.
    pub fn spawn(&mut self, id: u64) -> Result<()> {
        let node = self.node_mut(id)?;
        ensure!(
            !node.is_running(),
            "node {id} is still running (pid {:?})",
            node.pid()
        );
        let (api, peer) = match &node.addrs {
            Some(a) => (a.api_addr.clone(), a.peer_addr.clone()),
            None => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
        };
        let mut args = node.flags.clone();
        args.extend(["--api-addr".into(), api, "--peer-addr".into(), peer]);
        node.runs += 1;

        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_path())
            .context("open node log")?;
        writeln!(
            log,
            "===== harness: run #{} of node {id}: raftmesh {} =====",
            node.runs,
            args.join(" ")
        )?;
        let log_err: File = log.try_clone()?;
        let child = Command::new(env!("CARGO_BIN_EXE_raftmesh"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .with_context(|| format!("spawn node {id}"))?;
        node.child = Some(child);
        node.last_exit = None;
        Ok(())
    }

    /// Waits until the current process of node `id` has written its addrs.json.
    pub async fn wait_ready(&mut self, id: u64) -> Result<Addrs> {
        let node = self.node_mut(id)?;
        let path = node.addrs_path();
        let child = node
            .child
            .as_mut()
            .with_context(|| format!("node {id} was not spawned"))?;
        let pid = child.id();
        let res = eventually(
            WAIT,
            &format!("node {id} (pid {pid}) to write addrs.json"),
            {
                let path = &path;
                async move || {
                    if let Some(st) = child.try_wait()? {
                        return Err(abort(format!("node {id} exited before it was ready: {st}")));
                    }
                    let raw = std::fs::read_to_string(path)
                        .with_context(|| format!("read {}", path.display()))?;
                    let addrs: Addrs = serde_json::from_str(&raw)
                        .with_context(|| format!("parse addrs.json {raw:?}"))?;
                    // A file left over from an earlier run carries the old pid.
                    ensure!(
                        addrs.pid == pid,
                        "addrs.json is from pid {}, not {pid}",
                        addrs.pid
                    );
                    ensure!(addrs.id == id, "addrs.json says id {}", addrs.id);
                    Ok(addrs)
                }
            },
        )
        .await;
        let addrs = res.map_err(|e| self.with_logs(e))?;
        if let Some(prev) = &self.node(id)?.addrs {
            if (prev.api_addr.as_str(), prev.peer_addr.as_str())
                != (addrs.api_addr.as_str(), addrs.peer_addr.as_str())
            {
                let e = anyhow!("node {id} restarted on other addresses: {prev:?} -> {addrs:?}");
                return Err(self.with_logs(e));
            }
        }
        self.node_mut(id)?.addrs = Some(addrs.clone());
        Ok(addrs)
    }

    /// Spawns node `id` (first start or restart) and waits for its addrs.json.
    pub async fn start(&mut self, id: u64) -> Result<Addrs> {
        self.spawn(id)?;
        self.wait_ready(id).await
    }

    /// SIGKILL via `Child::kill`, then reaps; returns the exit status (proof the pid is gone).
    pub fn kill(&mut self, id: u64) -> Result<ExitStatus> {
        let node = self.node_mut(id)?;
        let mut child = node
            .child
            .take()
            .with_context(|| format!("node {id} is not running"))?;
        // kill() fails only if the process was already reaped; wait() still reports it.
        let _ = child.kill();
        let st = child.wait().with_context(|| format!("reap node {id}"))?;
        node.last_exit = Some(st);
        Ok(st)
    }

    /// Sends a signal by pid with the `kill` command (`sig` like "TERM", "STOP", "CONT").
    pub fn signal(&self, id: u64, sig: &str) -> Result<()> {
        let pid = self.pid(id)?;
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .context("run kill")?;
        ensure!(st.success(), "kill -{sig} {pid} failed: {st}");
        Ok(())
    }

    /// Polls `try_wait` until node `id` exits (within `deadline`) and reaps it.
    pub async fn wait_exit(&mut self, id: u64, deadline: Duration) -> Result<ExitStatus> {
        let node = self.node_mut(id)?;
        let child = node
            .child
            .as_mut()
            .with_context(|| format!("node {id} is not running"))?;
        let pid = child.id();
        let res = eventually(
            deadline,
            &format!("node {id} (pid {pid}) to exit"),
            async || child.try_wait()?.context("still running"),
        )
        .await;
        let st = res.map_err(|e| self.with_logs(e))?;
        let node = self.node_mut(id)?;
        node.child = None;
        node.last_exit = Some(st);
        Ok(st)
    }

    // ---------------------------------------------------------------- HTTP

    pub fn url(&self, id: u64, path: &str) -> Result<String> {
        Ok(format!("http://{}{}", self.api_addr(id)?, path))
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<Resp> {
        let resp = req.send().await.with_context(|| format!("{what}: send"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .text()
            .await
            .with_context(|| format!("{what}: read body"))?;
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, id: u64, path: &str) -> Result<Resp> {
        let url = self.url(id, path)?;
        self.send(&format!("GET {url}"), self.client.get(&url))
            .await
    }

    pub async fn put_raw(&self, id: u64, path: &str, body: String) -> Result<Resp> {
        let url = self.url(id, path)?;
        let req = self
            .client
            .put(&url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        self.send(&format!("PUT {url}"), req).await
    }

    pub async fn put_json(&self, id: u64, path: &str, body: &Value) -> Result<Resp> {
        self.put_raw(id, path, serde_json::to_string(body)?).await
    }

    /// PUT /v1/agent/service/register through node `id`; the status is not checked.
    pub async fn register(&self, id: u64, body: &Value) -> Result<Resp> {
        self.put_json(id, "/v1/agent/service/register", body).await
    }

    /// PUT /v1/agent/service/deregister/{sid} through node `id`; the status is not checked.
    pub async fn deregister(&self, id: u64, sid: &str) -> Result<Resp> {
        self.put_raw(
            id,
            &format!("/v1/agent/service/deregister/{sid}"),
            String::new(),
        )
        .await
    }

    /// GET /v1/cluster/status of node `id`.
    pub async fn status(&self, id: u64) -> Result<Value> {
        self.get(id, "/v1/cluster/status")
            .await?
            .expect_200(&format!("status of node {id}"))?
            .json()
    }

    /// ServiceIDs of `GET /v1/catalog/service/{name}{query}` on node `id` (must answer 200).
    pub async fn catalog_ids(&self, id: u64, name: &str, query: &str) -> Result<BTreeSet<String>> {
        let r = self
            .get(id, &format!("/v1/catalog/service/{name}{query}"))
            .await?
            .expect_200(&format!("catalog read of {name} on node {id}"))?;
        let v = r.json()?;
        let list = v.as_array().context("catalog answer is not a list")?;
        list.iter()
            .map(|e| {
                e["ServiceID"]
                    .as_str()
                    .map(str::to_string)
                    .with_context(|| format!("entry without ServiceID: {e}"))
            })
            .collect()
    }

    /// Waits until every node in `ids` reports the same `leader_id`, which is one of `ids`
    /// and itself reports role "leader". Returns the leader id.
    pub async fn wait_for_leader(&self, ids: &[u64]) -> Result<u64> {
        self.wait_for_leader_where(ids, "an agreed leader", |_| true)
            .await
    }

    /// Like [`Cluster::wait_for_leader`], with an extra condition on the leader id.
    pub async fn wait_for_leader_where(
        &self,
        ids: &[u64],
        what: &str,
        accept: impl Fn(u64) -> bool,
    ) -> Result<u64> {
        let what = format!("nodes {ids:?} to agree on {what}");
        self.eventually(WAIT, &what, async || {
            let mut agreed: Option<u64> = None;
            for &id in ids {
                let s = self.status(id).await?;
                let l = s["leader_id"]
                    .as_u64()
                    .with_context(|| format!("node {id} knows no leader: {s}"))?;
                match agreed {
                    None => agreed = Some(l),
                    Some(a) if a == l => {}
                    Some(a) => bail!("node {id} says leader {l}, an earlier node says {a}"),
                }
            }
            let l = agreed.context("no nodes given")?;
            ensure!(ids.contains(&l), "agreed leader {l} is not one of {ids:?}");
            ensure!(accept(l), "leader {l} not accepted yet");
            let s = self.status(l).await?;
            ensure!(s["role"] == "leader", "node {l} is not in role leader: {s}");
            Ok(l)
        })
        .await
    }

    // ---------------------------------------------------------------- failure reporting

    /// `eventually` that attaches every node's log tail when it fails.
    pub async fn eventually<T>(
        &self,
        deadline: Duration,
        what: &str,
        probe: impl AsyncFnMut() -> Result<T>,
    ) -> Result<T> {
        eventually(deadline, what, probe)
            .await
            .map_err(|e| self.with_logs(e))
    }

    /// Tail of every node's log plus each node's process state.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let state = match &n.child {
                Some(c) => format!("pid {}", c.id()),
                None => format!("no process (last exit {:?})", n.last_exit),
            };
            out.push_str(&format!(
                "===== node {} ({state}, runs {}, addrs {:?}) log {}: last {LOG_TAIL_LINES} lines =====\n",
                n.id,
                n.runs,
                n.addrs,
                n.log_path().display()
            ));
            out.push_str(&tail(&n.log_path(), LOG_TAIL_LINES));
        }
        out
    }

    /// Adds the node logs to `e`, unless they are already there.
    pub fn with_logs(&self, e: anyhow::Error) -> anyhow::Error {
        if e.downcast_ref::<WithLogs>().is_some() {
            return e;
        }
        anyhow::Error::new(WithLogs {
            error: format!("{e:#}"),
            logs: self.logs(),
        })
    }

    /// Ends a test: passes `r` through, with node logs attached to an error.
    pub fn finish(&mut self, r: Result<()>) -> Result<()> {
        let Err(e) = r else { return Ok(()) };
        // Reap processes that died on their own so the report shows how they exited.
        for n in &mut self.nodes {
            if let Some(Ok(Some(st))) = n.child.as_mut().map(Child::try_wait) {
                n.child = None;
                n.last_exit = Some(st);
            }
        }
        Err(self.with_logs(e))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test panicked; node logs:\n{}", self.logs());
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SIGKILL also ends a SIGSTOPped process.
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// An HTTP client with the given overall request timeout and no connection pooling (nodes are
/// killed and restarted on the same ports; stale pooled connections would only add noise).
pub fn client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .context("build HTTP client")
}

/// An HTTP server of the test's own (a backend, a service instance) on 127.0.0.1, port 0.
/// Dropping it stops it at once.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(app: axum::Router) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { signal.cancelled().await })
                .await;
        });
        Ok(TestServer {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// Stops gracefully (stop accepting, finish requests in flight, close idle
    /// connections); its port then refuses connections.
    pub async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(HTTP_TIMEOUT, t)
                .await
                .with_context(|| format!("server on {} did not shut down", self.addr))??;
        }
        Ok(())
    }

    /// Stops at once, requests in flight included.
    pub async fn kill(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
