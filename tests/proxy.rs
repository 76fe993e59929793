//! End-to-end tests of the routing proxy (`--proxy-addr`): real `raftmesh` processes on port
//! 0, routes written through the API, and backends that are small real HTTP and TCP servers
//! run by the test on 127.0.0.1:0, registered with real health checks (HTTP checks against
//! their `/health`, TCP checks, or TTL checks the test heartbeats).
//!
//! Covered: round robin spreads evenly and the stats endpoint counts every request (route and
//! per upstream); least connections avoids a backend held busy; consistent hashing keeps a
//! header value on one backend (the same on every node) and spreads different values; a
//! route whose service has no passing instance answers a 503 JSON naming route and service; a
//! backend whose check fails stops getting requests, and one that is stopped under load costs
//! no GET (retries take connect failures elsewhere); proxies on the surviving nodes keep
//! serving, without a failed request, across a SIGKILL of a follower and of the leader, and a
//! restarted node's proxy serves again; a route change written through node 1 reaches node
//! 3's proxy within a few seconds; a TCP route carries an echo conversation through every
//! node's proxy and closes its listener when the route is deleted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use common::{Cluster, Resp, TestServer, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a route change may take to reach another node's proxy.
const PROPAGATION: Duration = Duration::from_secs(5);
/// Client timeout for requests through a proxy.
const PROXY_TIMEOUT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ HTTP backends

/// What a backend's handlers share with the test.
struct BackendState {
    name: String,
    /// What `/health` answers: 200 while true, 503 while false.
    healthy: AtomicBool,
    /// Requests answered other than `/health`.
    served: AtomicU64,
    /// `.../hold` requests currently held open.
    held: AtomicU64,
    /// `.../hold` requests wait for this token; `release` cancels it and puts a fresh one.
    gate: Mutex<CancellationToken>,
}

/// A small HTTP server that answers every path but `/health` with its own name (body and
/// `x-backend` header); a path ending in `/hold` is answered only when the test releases it.
struct Backend {
    name: String,
    addr: SocketAddr,
    state: Arc<BackendState>,
    server: TestServer,
}

/// Counts a held request until it is answered or dropped.
struct HeldGuard(Arc<BackendState>);

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn health(State(s): State<Arc<BackendState>>) -> StatusCode {
    if s.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn answer(State(s): State<Arc<BackendState>>, uri: Uri) -> impl IntoResponse {
    if uri.path().ends_with("/hold") {
        let gate = s
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        s.held.fetch_add(1, Ordering::SeqCst);
        let _held = HeldGuard(s.clone());
        gate.cancelled().await;
    }
    s.served.fetch_add(1, Ordering::SeqCst);
    ([("x-backend", s.name.clone())], s.name.clone())
}

impl Backend {
    async fn start(name: &str) -> Result<Self> {
        let state = Arc::new(BackendState {
            name: name.to_string(),
            healthy: AtomicBool::new(true),
            served: AtomicU64::new(0),
            held: AtomicU64::new(0),
            gate: Mutex::new(CancellationToken::new()),
        });
        let app = Router::new()
            .route("/health", get(health))
            .fallback(answer)
            .with_state(state.clone());
        let server = TestServer::start(app).await?;
        Ok(Backend {
            name: name.to_string(),
            addr: server.addr,
            state,
            server,
        })
    }

    async fn start_all(names: &[&str]) -> Result<Vec<Backend>> {
        let mut out = Vec::new();
        for n in names {
            out.push(Backend::start(n).await?);
        }
        Ok(out)
    }

    /// The registration of this backend as an instance of `service`, with an HTTP check.
    fn instance(&self, service: &str) -> Value {
        json!({
            "Name": service, "ID": self.name, "Address": "127.0.0.1", "Port": self.addr.port(),
            "Check": {"HTTP": format!("http://{}/health", self.addr), "Interval": "1s", "Timeout": "1s"},
        })
    }

    fn served(&self) -> u64 {
        self.state.served.load(Ordering::SeqCst)
    }

    fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }

    fn set_healthy(&self, ok: bool) {
        self.state.healthy.store(ok, Ordering::SeqCst);
    }

    /// Answers every held request.
    fn release(&self) {
        let mut g = self
            .state
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.cancel();
        *g = CancellationToken::new();
    }

    /// Stops gracefully; its port then refuses connections.
    async fn stop(&mut self) -> Result<()> {
        self.server
            .stop()
            .await
            .with_context(|| format!("backend {}", self.name))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Held requests end before the server (dropped next) stops.
        self.release();
    }
}

async fn register_all(c: &Cluster, via: u64, service: &str, backends: &[Backend]) -> Result<()> {
    for b in backends {
        c.register(via, &b.instance(service))
            .await?
            .expect_200(&format!("register {}", b.name))?;
    }
    Ok(())
}

fn names(backends: &[Backend]) -> Vec<&str> {
    backends.iter().map(|b| b.name.as_str()).collect()
}

// ------------------------------------------------------------------ TCP backends

/// A TCP echo server (every byte is sent back) on 127.0.0.1:0.
struct Echo {
    name: String,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Echo {
    async fn start(name: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(Echo {
            name: name.to_string(),
            addr,
            task,
        })
    }

    fn instance(&self, service: &str) -> Value {
        json!({
            "Name": service, "ID": self.name, "Address": "127.0.0.1", "Port": self.addr.port(),
            "Check": {"TCP": self.addr.to_string(), "Interval": "1s", "Timeout": "1s"},
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `lines` one at a time on a new connection to `addr`, each echoed back exactly before
/// the next; then half-closes and expects a clean end. Returns the bytes sent.
async fn converse(addr: &str, lines: &[String]) -> Result<u64> {
    let io = Duration::from_secs(5);
    let conn = tokio::time::timeout(io, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    let mut sent = 0u64;
    for line in lines {
        let out = format!("{line}\n");
        w.write_all(out.as_bytes()).await.context("write")?;
        let mut got = String::new();
        let n = tokio::time::timeout(io, r.read_line(&mut got))
            .await
            .context("echo timed out")?
            .context("read echo")?;
        ensure!(
            n > 0,
            "{addr} closed the connection instead of echoing {line:?}"
        );
        ensure!(got == out, "sent {out:?}, got back {got:?}");
        sent += out.len() as u64;
    }
    w.shutdown().await.context("half-close")?;
    let mut rest = Vec::new();
    tokio::time::timeout(io, r.read_to_end(&mut rest))
        .await
        .context("no end of stream after the half-close")?
        .context("read to end")?;
    ensure!(
        rest.is_empty(),
        "unexpected bytes after the conversation: {rest:?}"
    );
    Ok(sent)
}

/// A port that was free on 127.0.0.1 a moment ago (for a TCP route's `listen_port`).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

// ------------------------------------------------------------------ API helpers

async fn put_route(c: &Cluster, via: u64, name: &str, def: &Value) -> Result<Value> {
    c.put_json(via, &format!("/v1/routes/{name}"), def)
        .await?
        .expect_200(&format!("put route {name} through node {via}"))?
        .json()
}

/// `GET /v1/routes/{name}/stats` on node `id` (must answer 200).
async fn route_stats(c: &Cluster, id: u64, route: &str) -> Result<Value> {
    c.get(id, &format!("/v1/routes/{route}/stats"))
        .await?
        .expect_200(&format!("stats of {route} on node {id}"))?
        .json()
}

fn upstream_ids(stats: &Value) -> Result<BTreeSet<String>> {
    Ok(stats["upstreams"]
        .as_object()
        .with_context(|| format!("stats without upstreams: {stats}"))?
        .keys()
        .cloned()
        .collect())
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn num(v: &Value, what: &str) -> Result<u64> {
    v.as_u64()
        .with_context(|| format!("{what} is not a number: {v}"))
}

/// Waits until node `id`'s proxy sends route `route` to exactly the instances `want`.
async fn wait_upstreams(c: &Cluster, id: u64, route: &str, want: &[&str]) -> Result<Value> {
    let want = set(want);
    let what = format!("route {route} on node {id}'s proxy to have upstreams {want:?}");
    c.eventually(WAIT, &what, async || {
        let s = route_stats(c, id, route).await?;
        let have = upstream_ids(&s)?;
        ensure!(have == want, "upstreams {have:?}");
        Ok(s)
    })
    .await
}

/// Waits until `GET /v1/health/service/{service}?passing` on node `id` lists exactly `want`.
async fn wait_passing(c: &Cluster, id: u64, service: &str, want: &[&str]) -> Result<()> {
    let want = set(want);
    let what = format!("{want:?} passing as {service} on node {id}");
    c.eventually(WAIT, &what, async || {
        let v = c
            .get(id, &format!("/v1/health/service/{service}?passing"))
            .await?
            .expect_200("health service")?
            .json()?;
        let have: BTreeSet<String> = v
            .as_array()
            .context("health answer is not a list")?
            .iter()
            .filter_map(|e| e["Service"]["ID"].as_str().map(str::to_string))
            .collect();
        ensure!(have == want, "passing {have:?}");
        Ok(())
    })
    .await
}

/// Waits until instance `sid`'s own check in `GET /v1/health/service/{service}` on node `id`
/// has status `want`.
async fn wait_check(c: &Cluster, id: u64, service: &str, sid: &str, want: &str) -> Result<()> {
    let what = format!("the check of {sid} to be {want} on node {id}");
    c.eventually(WAIT, &what, async || {
        let v = c
            .get(id, &format!("/v1/health/service/{service}"))
            .await?
            .expect_200("health service")?
            .json()?;
        let entry = v
            .as_array()
            .context("health answer is not a list")?
            .iter()
            .find(|e| e["Service"]["ID"] == sid)
            .with_context(|| format!("no instance {sid} in {v}"))?;
        let check = entry["Checks"]
            .as_array()
            .context("Checks")?
            .iter()
            .find(|k| k["CheckID"] == format!("service:{sid}"))
            .with_context(|| format!("no check service:{sid} in {entry}"))?;
        ensure!(check["Status"] == want, "check: {check}");
        Ok(())
    })
    .await
}

fn others(ids: &[u64], not: u64) -> Vec<u64> {
    ids.iter().copied().filter(|i| *i != not).collect()
}

// ------------------------------------------------------------------ requests through a proxy

fn proxy_client() -> Result<reqwest::Client> {
    common::client(PROXY_TIMEOUT)
}

/// `GET http://{proxy}{path}` with `headers`, buffered.
async fn get_via(
    http: &reqwest::Client,
    proxy: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Resp> {
    let url = format!("http://{proxy}{path}");
    let mut req = http.get(&url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .text()
        .await
        .with_context(|| format!("GET {url}: body"))?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// The backend that answered a request through the proxy (the request must have succeeded).
async fn backend_of(
    http: &reqwest::Client,
    proxy: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<String> {
    let r = get_via(http, proxy, path, headers).await?;
    ensure!(
        r.status == 200,
        "GET {path} via {proxy}: {} {:?}",
        r.status,
        r.body
    );
    let by = r.header("x-backend").unwrap_or_default().to_string();
    ensure!(
        !by.is_empty() && by == r.body,
        "GET {path} via {proxy}: not a backend's answer: {:?} (x-backend {by:?})",
        r.body
    );
    Ok(by)
}

/// What a client loop saw.
#[derive(Debug, Default, Clone)]
struct Tally {
    ok: u64,
    failed: u64,
    by_backend: BTreeMap<String, u64>,
    /// The first few failures, described.
    errors: Vec<String>,
}

/// A client sending GETs to one URL back to back until stopped, counting every outcome.
struct Traffic {
    url: String,
    stop: CancellationToken,
    tally: Arc<Mutex<Tally>>,
    task: Option<JoinHandle<()>>,
}

impl Traffic {
    fn start(proxy: &str, path: &str) -> Result<Self> {
        // Keep-alive, as a real client would (and thousands of requests leave no TIME_WAIT
        // sockets behind); the proxies a loop talks to are never restarted under it.
        let http = reqwest::Client::builder()
            .timeout(PROXY_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .context("build HTTP client")?;
        let url = format!("http://{proxy}{path}");
        let stop = CancellationToken::new();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let task = tokio::spawn({
            let (url, stop, tally) = (url.clone(), stop.clone(), tally.clone());
            async move {
                // A request started is always finished: stopping never fails one.
                while !stop.is_cancelled() {
                    let started = Instant::now();
                    let outcome = match http.get(&url).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let by = r
                                .headers()
                                .get("x-backend")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            match (status, by, r.text().await) {
                                (200, Some(by), Ok(body)) if body == by => Ok(by),
                                (s, by, body) => {
                                    Err(format!("status {s}, x-backend {by:?}, body {body:?}"))
                                }
                            }
                        }
                        Err(e) => Err(format!("{e:#}")),
                    };
                    let failed = {
                        let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
                        match outcome {
                            Ok(by) => {
                                t.ok += 1;
                                *t.by_backend.entry(by).or_default() += 1;
                                false
                            }
                            Err(e) => {
                                t.failed += 1;
                                if t.errors.len() < 10 {
                                    t.errors.push(format!("after {:?}: {e}", started.elapsed()));
                                }
                                true
                            }
                        }
                    };
                    if failed {
                        // Pacing only (a broken proxy would otherwise spin a core).
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        Ok(Traffic {
            url,
            stop,
            tally,
            task: Some(task),
        })
    }

    fn now(&self) -> Tally {
        self.tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until this loop has `more` successful requests beyond `since`.
    async fn wait_ok(&self, c: &Cluster, since: u64, more: u64) -> Result<()> {
        let what = format!("{more} more successful requests to {}", self.url);
        c.eventually(WAIT, &what, async || {
            let t = self.now();
            ensure!(
                t.ok >= since + more,
                "{} ok, {} failed so far",
                t.ok,
                t.failed
            );
            Ok(())
        })
        .await
    }

    /// Stops the loop (the request in flight finishes) and returns what it saw.
    async fn finish(mut self) -> Result<Tally> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PROXY_TIMEOUT + Duration::from_secs(5), task)
                .await
                .context("client loop did not stop")??;
        }
        let t = self
            .tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(t)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Waits until each loop has finished two more requests: every request that had started
/// before (perhaps on an older view of the registry) is then done.
async fn settle(c: &Cluster, loops: &[Traffic]) -> Result<()> {
    for l in loops {
        l.wait_ok(c, l.now().ok, 2).await?;
    }
    Ok(())
}

fn proxy_flags() -> [&'static str; 2] {
    ["--proxy-addr", "127.0.0.1:0"]
}

// ------------------------------------------------------------------ balancing

/// Round robin: 300 requests through node 3's proxy reach each of three backends 100 times
/// (± 5), and node 3's stats for the route count all 300 (per upstream, exactly what each
/// backend served) with no errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_300_requests_evenly_and_stats_count_them() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    c.add_flags(3, &proxy_flags())?;
    let backends = Backend::start_all(&["web-a", "web-b", "web-c"]).await?;
    let r = async {
        c.form().await?;
        register_all(&c, 1, "web", &backends).await?;
        let def = json!({"protocol": "http", "match": {"path_prefix": "/web"},
            "service": "web", "lb": "round_robin"});
        put_route(&c, 1, "web", &def).await?;
        wait_passing(&c, 3, "web", &names(&backends)).await?;
        let before = wait_upstreams(&c, 3, "web", &names(&backends)).await?;
        ensure!(
            before["route"] == "web" && before["service"] == "web" && before["lb"] == "round_robin",
            "stats header: {before}"
        );
        let served_before: Vec<u64> = backends.iter().map(Backend::served).collect();

        let proxy = c.proxy_addr(3)?;
        let http = proxy_client()?;
        let mut hits: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..300 {
            let by = backend_of(&http, &proxy, &format!("/web/items/{i}"), &[]).await?;
            *hits.entry(by).or_default() += 1;
        }
        eprintln!("round robin over 300 requests: {hits:?}");
        ensure!(hits.len() == 3, "not every backend answered: {hits:?}");
        for b in &backends {
            let n = hits.get(&b.name).copied().unwrap_or(0);
            ensure!(
                (95..=105).contains(&n),
                "{} got {n} of 300: {hits:?}",
                b.name
            );
        }

        // The stats endpoint counted them, per route and per upstream.
        let after = c
            .eventually(WAIT, "stats to settle (nothing in flight)", async || {
                let s = route_stats(&c, 3, "web").await?;
                ensure!(s["stats"]["in_flight"] == 0, "in flight: {}", s["stats"]);
                Ok(s)
            })
            .await?;
        let requests = |s: &Value| num(&s["stats"]["requests"], "route requests");
        ensure!(
            requests(&after)? - requests(&before)? == 300,
            "route counted {} requests, not 300: {after}",
            requests(&after)? - requests(&before)?
        );
        ensure!(
            after["stats"]["latency_ms"]["count"].as_u64() >= Some(300),
            "latency samples: {after}"
        );
        for (k, v) in after["stats"]["errors"].as_object().context("errors")? {
            ensure!(v == 0, "route error {k} = {v}: {after}");
        }
        for (b, served0) in backends.iter().zip(served_before) {
            let served = b.served() - served0;
            let up = |s: &Value| {
                num(
                    &s["upstreams"][&b.name]["stats"]["requests"],
                    "upstream requests",
                )
            };
            let counted = up(&after)? - up(&before)?;
            ensure!(
                counted == served && served == hits[&b.name],
                "{}: stats counted {counted}, the backend served {served}, the client saw {}",
                b.name,
                hits[&b.name]
            );
            ensure!(
                after["upstreams"][&b.name]["address"] == b.addr.to_string()
                    && after["upstreams"][&b.name]["ejected"] == false,
                "upstream {}: {}",
                b.name,
                after["upstreams"][&b.name]
            );
        }
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Least connections: while one backend holds a request open, every further request goes to
/// the other two (both of them); with two held, all go to the third; once released, the first
/// one takes requests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_requests_past_a_busy_backend() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    c.add_flags(2, &proxy_flags())?;
    let backends = Backend::start_all(&["lc-a", "lc-b", "lc-c"]).await?;
    let r = async {
        c.form().await?;
        register_all(&c, 1, "lc", &backends).await?;
        let def = json!({"protocol": "http", "match": {"path_prefix": "/lc"},
            "service": "lc", "lb": "least_connections", "request_timeout": "60s"});
        put_route(&c, 1, "lc", &def).await?;
        wait_passing(&c, 2, "lc", &names(&backends)).await?;
        wait_upstreams(&c, 2, "lc", &names(&backends)).await?;
        let proxy = c.proxy_addr(2)?;
        let http = proxy_client()?;
        // Held requests may outlive the ordinary client timeout on a slow machine.
        let slow = common::client(Duration::from_secs(60))?;

        let hold = |http: reqwest::Client| {
            let proxy = proxy.clone();
            tokio::spawn(async move { backend_of(&http, &proxy, "/lc/hold", &[]).await })
        };
        let held_by = async |exclude: &[usize]| -> Result<usize> {
            c.eventually(WAIT, "a held request to reach a backend", async || {
                let held: Vec<usize> = (0..backends.len())
                    .filter(|i| !exclude.contains(i) && backends[*i].held() > 0)
                    .collect();
                ensure!(held.len() == 1, "held at {held:?}");
                Ok(held[0])
            })
            .await
        };

        let first = hold(slow.clone());
        let x = held_by(&[]).await?;
        let mut hits: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..30 {
            let by = backend_of(&http, &proxy, &format!("/lc/ping/{i}"), &[]).await?;
            *hits.entry(by).or_default() += 1;
        }
        eprintln!("with {} busy: {hits:?}", backends[x].name);
        ensure!(
            !hits.contains_key(&backends[x].name),
            "requests went to the busy backend {}: {hits:?}",
            backends[x].name
        );
        ensure!(
            hits.len() == 2,
            "the two idle backends should share: {hits:?}"
        );

        let second = hold(slow.clone());
        let y = held_by(&[x]).await?;
        let z = (0..3).find(|i| *i != x && *i != y).context("third")?;
        for i in 0..20 {
            let by = backend_of(&http, &proxy, &format!("/lc/ping2/{i}"), &[]).await?;
            ensure!(
                by == backends[z].name,
                "with {} and {} busy, request {i} went to {by}",
                backends[x].name,
                backends[y].name
            );
        }

        for b in &backends {
            b.release();
        }
        let a1 = first.await??;
        let a2 = second.await??;
        ensure!(
            a1 == backends[x].name && a2 == backends[y].name,
            "held answers from {a1}, {a2}"
        );
        c.eventually(WAIT, "nothing in flight after the release", async || {
            let s = route_stats(&c, 2, "lc").await?;
            ensure!(s["stats"]["in_flight"] == 0, "{}", s["stats"]);
            Ok(())
        })
        .await?;
        let mut hits: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..30 {
            let by = backend_of(&http, &proxy, &format!("/lc/ping3/{i}"), &[]).await?;
            *hits.entry(by).or_default() += 1;
        }
        ensure!(
            hits.get(&backends[x].name).copied().unwrap_or(0) >= 5,
            "the released backend {} is idle again but got: {hits:?}",
            backends[x].name
        );
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Consistent hash on `x-user`: each of 30 values stays on one backend over repeated
/// requests, node 2's and node 3's proxies agree on it, and the values spread over all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_header_value_on_one_backend() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    c.add_flags(2, &proxy_flags())?;
    c.add_flags(3, &proxy_flags())?;
    let backends = Backend::start_all(&["ch-a", "ch-b", "ch-c"]).await?;
    let r = async {
        c.form().await?;
        register_all(&c, 1, "ch", &backends).await?;
        let def = json!({"protocol": "http", "match": {"path_prefix": "/ch"},
            "service": "ch", "lb": "consistent_hash", "hash_header": "x-user"});
        put_route(&c, 1, "ch", &def).await?;
        wait_passing(&c, 1, "ch", &names(&backends)).await?;
        for id in [2, 3] {
            wait_upstreams(&c, id, "ch", &names(&backends)).await?;
        }
        let proxies = [c.proxy_addr(2)?, c.proxy_addr(3)?];
        let http = proxy_client()?;
        let mut owners: BTreeMap<String, String> = BTreeMap::new();
        for u in 0..30 {
            let user = format!("user-{u}");
            let mut seen = BTreeSet::new();
            for i in 0..4 {
                let proxy = &proxies[i % 2];
                let path = format!("/ch/cart/{i}");
                seen.insert(backend_of(&http, proxy, &path, &[("x-user", &user)]).await?);
            }
            ensure!(
                seen.len() == 1,
                "{user} went to {seen:?} (over both nodes' proxies)"
            );
            owners.insert(user, seen.into_iter().next().context("one")?);
        }
        let spread: BTreeSet<&String> = owners.values().collect();
        let per: BTreeMap<&String, usize> = spread
            .iter()
            .map(|b| (*b, owners.values().filter(|o| o == b).count()))
            .collect();
        eprintln!("30 x-user values per backend: {per:?}");
        ensure!(
            spread.len() == 3,
            "30 values did not spread over 3 backends: {per:?}"
        );
        Ok(())
    }
    .await;
    c.finish(r)
}

/// A route whose service has no passing instance answers 503 with a JSON body naming the
/// route and the service (and counts it as `no_upstream`); once the instance's TTL check
/// passes, the same request reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_passing_instance_answers_503_naming_route_and_service() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    c.add_flags(2, &proxy_flags())?;
    let backend = Backend::start("payments-1").await?;
    let r = async {
        c.form().await?;
        // A TTL check starts critical until its first heartbeat.
        let reg = json!({"Name": "payments", "ID": "payments-1", "Address": "127.0.0.1",
            "Port": backend.addr.port(), "Check": {"TTL": "30s"}});
        c.register(1, &reg)
            .await?
            .expect_200("register payments-1")?;
        let def = json!({"protocol": "http", "match": {"path_prefix": "/buy"},
            "service": "payments"});
        put_route(&c, 1, "checkout", &def).await?;
        wait_upstreams(&c, 2, "checkout", &[]).await?;
        let proxy = c.proxy_addr(2)?;
        let http = proxy_client()?;
        let r = get_via(&http, &proxy, "/buy/now", &[]).await?;
        ensure!(
            r.status == 503,
            "expected 503, got {} {:?}",
            r.status,
            r.body
        );
        let ct = r.header("content-type").unwrap_or_default();
        ensure!(ct.starts_with("application/json"), "content-type {ct:?}");
        let body = r.json()?;
        ensure!(
            body["error"].is_string()
                && body["route"] == "checkout"
                && body["service"] == "payments",
            "the 503 body should name route checkout and service payments: {body}"
        );
        ensure!(backend.served() == 0, "the critical instance was reached");
        let s = route_stats(&c, 2, "checkout").await?;
        ensure!(
            s["stats"]["errors"]["no_upstream"].as_u64() >= Some(1),
            "no_upstream not counted: {s}"
        );

        c.put_raw(1, "/v1/agent/check/pass/service:payments-1", String::new())
            .await?
            .expect_200("heartbeat")?;
        wait_upstreams(&c, 2, "checkout", &["payments-1"]).await?;
        let by = backend_of(&http, &proxy, "/buy/now", &[]).await?;
        ensure!(by == "payments-1", "answered by {by}");
        Ok(())
    }
    .await;
    c.finish(r)
}

// ------------------------------------------------------------------ failures

/// With two client loops running through node 2's proxy: a backend whose health check fails
/// (while it still serves) gets no request once its check is critical, and gets requests again
/// when it passes; a backend stopped under load costs no GET (`retries: 2` takes the connect
/// failures elsewhere), and once its check is critical the proxy no longer even tries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_stopped_backend_stops_getting_requests_and_no_get_fails() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    c.add_flags(2, &proxy_flags())?;
    let mut backends = Backend::start_all(&["shop-a", "shop-b", "shop-c"]).await?;
    let r = async {
        c.form().await?;
        register_all(&c, 1, "shop", &backends).await?;
        let def = json!({"protocol": "http", "match": {"path_prefix": "/shop"},
            "service": "shop", "retries": 2, "connect_timeout": "1s"});
        put_route(&c, 1, "shop", &def).await?;
        wait_passing(&c, 2, "shop", &names(&backends)).await?;
        wait_upstreams(&c, 2, "shop", &names(&backends)).await?;
        let proxy = c.proxy_addr(2)?;
        let loops = [
            Traffic::start(&proxy, "/shop/ping")?,
            Traffic::start(&proxy, "/shop/ping")?,
        ];
        for l in &loops {
            l.wait_ok(&c, 0, 20).await?;
        }

        // shop-b fails its check but keeps serving: once critical, nothing reaches it.
        backends[1].set_healthy(false);
        wait_check(&c, 2, "shop", "shop-b", "critical").await?;
        wait_upstreams(&c, 2, "shop", &["shop-a", "shop-c"]).await?;
        settle(&c, &loops).await?;
        let b_served = backends[1].served();
        for l in &loops {
            l.wait_ok(&c, l.now().ok, 60).await?;
        }
        ensure!(
            backends[1].served() == b_served,
            "shop-b served {} requests after its check turned critical",
            backends[1].served() - b_served
        );
        backends[1].set_healthy(true);
        wait_upstreams(&c, 2, "shop", &names(&backends)).await?;
        c.eventually(WAIT, "shop-b to get requests again", async || {
            ensure!(backends[1].served() > b_served, "none yet");
            Ok(())
        })
        .await?;

        // shop-c stops under load.
        let at_stop: Vec<u64> = loops.iter().map(|l| l.now().ok).collect();
        let stopped = Instant::now();
        backends[2].stop().await?;
        wait_check(&c, 2, "shop", "shop-c", "critical").await?;
        wait_upstreams(&c, 2, "shop", &["shop-a", "shop-b"]).await?;
        let dropped_after = stopped.elapsed();
        let during: Vec<u64> = loops
            .iter()
            .zip(&at_stop)
            .map(|(l, n)| l.now().ok - n)
            .collect();
        settle(&c, &loops).await?;
        let base = route_stats(&c, 2, "shop").await?;
        for l in &loops {
            l.wait_ok(&c, l.now().ok, 60).await?;
        }
        let after = route_stats(&c, 2, "shop").await?;
        // The proxy no longer even tries shop-c: no new retries or connect errors.
        let tries = |s: &Value| (s["stats"]["retries"].clone(), s["stats"]["errors"]["connect"].clone());
        ensure!(
            tries(&after) == tries(&base),
            "shop-c is still tried after it left the view: {} -> {}",
            base["stats"],
            after["stats"]
        );
        ensure!(!upstream_ids(&after)?.contains("shop-c"), "stats: {after}");
        let mut total = Tally::default();
        let [l1, l2] = loops;
        for l in [l1.finish().await?, l2.finish().await?] {
            total.ok += l.ok;
            total.failed += l.failed;
            total.errors.extend(l.errors);
            for (k, v) in l.by_backend {
                *total.by_backend.entry(k).or_default() += v;
            }
        }
        eprintln!(
            "stopped backend left the view {dropped_after:?} after the stop; requests meanwhile {during:?}; \
             route stats {}; loops {total:?}",
            after["stats"]
        );
        ensure!(
            during.iter().sum::<u64>() > 0,
            "no request completed while shop-c was going away"
        );
        ensure!(
            total.failed == 0,
            "{} of {} GETs failed: {:?}",
            total.failed,
            total.ok + total.failed,
            total.errors
        );
        Ok(())
    }
    .await;
    c.finish(r)
}

/// The checks of service `kv` that node `owner` runs, as node `on` reports them.
async fn kv_checks_owned_by(c: &Cluster, on: u64, owner: u64) -> Result<Vec<String>> {
    let v = c
        .get(on, "/v1/health/checks/kv")
        .await?
        .expect_200("checks of kv")?
        .json()?;
    Ok(v.as_array()
        .context("checks answer is not a list")?
        .iter()
        .filter(|k| k["OwnerID"] == owner)
        .filter_map(|k| k["CheckID"].as_str().map(str::to_string))
        .collect())
}

/// One round of the node-kill test: a client loop on every node's proxy; right before the
/// kill, pick the victim by role (`leader`: the current leader, else a follower), SIGKILL it,
/// wait until the survivors agree on a leader (a new one if the victim led) and every one of
/// the service's checks is passing and owned by a survivor (the victim's moved), keep the
/// survivors' loops going a while, and require that none of them failed a request; then
/// restart the victim and require that its proxy serves the route again. Returns a line for
/// the test's output.
async fn kill_under_load(c: &mut Cluster, leader: bool, backends: &[Backend]) -> Result<String> {
    let ids = c.ids();
    let mut loops = Vec::new();
    for &id in &ids {
        loops.push((id, Traffic::start(&c.proxy_addr(id)?, "/kv/ping")?));
    }
    for (_, l) in &loops {
        l.wait_ok(c, 0, 20).await?;
    }
    // Chosen only now, so a leadership change during the set-up cannot swap the roles.
    let current = c.wait_for_leader(&ids).await?;
    let victim = if leader {
        current
    } else {
        others(&ids, current)[0]
    };
    let survivors = others(&ids, victim);
    // The victim's own loop goes with it (dropping it stops it).
    loops.retain(|(id, _)| *id != victim);
    let owned = kv_checks_owned_by(c, survivors[0], victim).await?;
    ensure!(
        !owned.is_empty(),
        "node {victim} owns none of the kv checks"
    );
    let all_checks: BTreeSet<String> = c
        .get(survivors[0], "/v1/health/checks/kv")
        .await?
        .expect_200("checks")?
        .json()?
        .as_array()
        .context("checks")?
        .iter()
        .filter_map(|chk| chk["CheckID"].as_str().map(str::to_string))
        .collect();
    ensure!(
        all_checks.len() == backends.len(),
        "one check per backend: {all_checks:?}"
    );
    let st = c.kill(victim)?;
    ensure!(
        !st.success(),
        "node {victim} exited cleanly instead of being killed: {st}"
    );
    let killed = Instant::now();
    let was_leader = victim == current;
    let leader_now = c
        .wait_for_leader_where(&survivors, "a leader among the survivors", |l| l != victim)
        .await?;
    let elected = killed.elapsed();
    let what = format!("node {victim}'s checks {owned:?} to move to a live node and pass");
    c.eventually(WAIT, &what, async || {
        let v = c
            .get(leader_now, "/v1/health/checks/kv")
            .await?
            .expect_200("checks")?
            .json()?;
        let mut seen = BTreeSet::new();
        for chk in v.as_array().context("checks")? {
            let id = chk["CheckID"].as_str().unwrap_or_default();
            ensure!(
                survivors.iter().any(|s| chk["OwnerID"] == *s),
                "{id} is not owned by a survivor {survivors:?}: {chk}"
            );
            ensure!(chk["Status"] == "passing", "{id}: {chk}");
            seen.insert(id.to_string());
        }
        ensure!(
            seen == all_checks,
            "checks now {seen:?}, before {all_checks:?}"
        );
        Ok(())
    })
    .await?;
    let moved = killed.elapsed();
    // Keep the loops going a while after the cluster settled.
    for (_, l) in &loops {
        l.wait_ok(c, l.now().ok, 50).await?;
    }
    let mut seen = Vec::new();
    for (id, l) in loops {
        seen.push((id, l.finish().await?));
    }
    for (id, t) in &seen {
        ensure!(
            t.failed == 0,
            "node {id}'s proxy failed {} of {} requests across the kill of node {victim}: {:?}",
            t.failed,
            t.ok + t.failed,
            t.errors
        );
        ensure!(
            t.by_backend.len() == backends.len(),
            "node {id}'s loop did not reach every backend: {t:?}"
        );
    }
    let line = format!(
        "killed node {victim} (leader: {was_leader}): leader {leader_now} after {elected:?}, its \
         checks {owned:?} moved after {moved:?}; loops: {seen:?}"
    );

    c.start(victim).await?;
    wait_upstreams(c, victim, "kv", &names(backends)).await?;
    let http = proxy_client()?;
    let proxy = c.proxy_addr(victim)?;
    for i in 0..3 {
        backend_of(&http, &proxy, &format!("/kv/after/{i}"), &[]).await?;
    }
    Ok(line)
}

/// Every node runs a proxy; the backends' checks are owned one per node. SIGKILL a follower,
/// then the leader, each with a client loop running on every surviving node's proxy: the
/// survivors (re)elect a leader among themselves, the dead node's checks move to a live node,
/// and no loop sees a failed request (`retries: 2`; the backends are unaffected). A killed
/// node, restarted, serves the route again from its persisted state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_on_surviving_nodes_keep_serving_when_a_node_or_the_leader_is_killed() -> Result<()>
{
    let mut c = Cluster::new(&[
        "--node-fail-timeout-ms",
        "1000",
        "--proxy-addr",
        "127.0.0.1:0",
    ])?;
    let backends = Backend::start_all(&["kv-1", "kv-2", "kv-3"]).await?;
    let r = async {
        let leader = c.form().await?;
        let ids = c.ids();
        for (b, via) in backends.iter().zip(&ids) {
            c.register(*via, &b.instance("kv"))
                .await?
                .expect_200(&format!("register {}", b.name))?;
        }
        let def = json!({"protocol": "http", "match": {"path_prefix": "/kv"},
            "service": "kv", "retries": 2, "connect_timeout": "1s"});
        put_route(&c, 1, "kv", &def).await?;
        wait_passing(&c, leader, "kv", &names(&backends)).await?;
        for &id in &ids {
            wait_upstreams(&c, id, "kv", &names(&backends)).await?;
        }
        eprintln!("{}", kill_under_load(&mut c, false, &backends).await?);
        eprintln!("{}", kill_under_load(&mut c, true, &backends).await?);
        Ok(())
    }
    .await;
    c.finish(r)
}

// ------------------------------------------------------------------ configuration changes

/// A route written through node 1 takes effect on node 3's proxy within a few seconds: first
/// its service switches from blue to green, then its path prefix moves from /app to /v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_change_through_node_1_reaches_node_3s_proxy_within_seconds() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    c.add_flags(3, &proxy_flags())?;
    let blue = Backend::start_all(&["blue-1", "blue-2"]).await?;
    let green = Backend::start_all(&["green-1", "green-2"]).await?;
    let r = async {
        c.form().await?;
        register_all(&c, 1, "blue", &blue).await?;
        register_all(&c, 2, "green", &green).await?;
        let mut def = json!({"protocol": "http", "match": {"path_prefix": "/app"}, "service": "blue"});
        put_route(&c, 1, "app", &def).await?;
        wait_passing(&c, 3, "green", &names(&green)).await?;
        wait_upstreams(&c, 3, "app", &names(&blue)).await?;
        let proxy = c.proxy_addr(3)?;
        let http = proxy_client()?;
        for i in 0..4 {
            let by = backend_of(&http, &proxy, &format!("/app/{i}"), &[]).await?;
            ensure!(by.starts_with("blue-"), "before the change: answered by {by}");
        }

        def["service"] = json!("green");
        let t0 = Instant::now();
        let put = put_route(&c, 1, "app", &def).await?;
        let written = num(&put["modify_index"], "modify_index")?;
        c.eventually(PROPAGATION, "node 3's proxy to send /app to green", async || {
            let by = backend_of(&http, &proxy, "/app/x", &[]).await?;
            ensure!(by.starts_with("green-"), "answered by {by}");
            Ok(())
        })
        .await?;
        let switched = t0.elapsed();
        for i in 0..10 {
            let by = backend_of(&http, &proxy, &format!("/app/{i}"), &[]).await?;
            ensure!(by.starts_with("green-"), "after the switch: answered by {by}");
        }
        let s = route_stats(&c, 3, "app").await?;
        ensure!(
            s["service"] == "green"
                && upstream_ids(&s)? == set(&names(&green))
                && s["node_view_index"].as_u64() >= Some(written),
            "node 3's stats after the switch (written at {written}): {s}"
        );

        def["match"]["path_prefix"] = json!("/v2");
        let t1 = Instant::now();
        put_route(&c, 1, "app", &def).await?;
        c.eventually(PROPAGATION, "node 3's proxy to route /v2 and no longer /app", async || {
            let by = backend_of(&http, &proxy, "/v2/x", &[]).await?;
            ensure!(by.starts_with("green-"), "/v2 answered by {by}");
            let old = get_via(&http, &proxy, "/app/x", &[]).await?;
            ensure!(old.status == 404, "/app still answers {} {:?}", old.status, old.body);
            Ok(())
        })
        .await?;
        let moved = t1.elapsed();
        eprintln!("route change through node 1 seen on node 3's proxy: service after {switched:?}, path after {moved:?}");
        Ok(())
    }
    .await;
    c.finish(r)
}

/// A TCP route on a free `listen_port`, served by every node's proxy on its own loopback IP
/// (127.0.0.N): an echo conversation through each node comes back exactly, each node's stats
/// count its connection and its bytes both ways; deleting the route closes every node's
/// listener (connects are refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_route_echoes_through_every_node_and_closes_when_deleted() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    for id in c.ids() {
        c.add_flags(id, &["--proxy-addr", &format!("127.0.0.{id}:0")])?;
    }
    let echoes = [Echo::start("echo-1").await?, Echo::start("echo-2").await?];
    let r = async {
        c.form().await?;
        // Picked only now: `Cluster::new` may have waited for other tests,
        // whose nodes and clients bind ports meanwhile.
        let port = free_port()?;
        for e in &echoes {
            c.register(1, &e.instance("echo"))
                .await?
                .expect_200(&format!("register {}", e.name))?;
        }
        let def = json!({"protocol": "tcp", "listen_port": port, "service": "echo",
            "retries": 1, "connect_timeout": "1s"});
        put_route(&c, 2, "echo", &def).await?;
        wait_passing(&c, 1, "echo", &["echo-1", "echo-2"]).await?;
        for id in c.ids() {
            let s = wait_upstreams(&c, id, "echo", &["echo-1", "echo-2"]).await?;
            ensure!(s["protocol"] == "tcp", "stats of node {id}: {s}");
            ensure!(s["listen_error"].is_null(), "node {id} cannot listen: {s}");
        }
        for id in c.ids() {
            let addr = format!("127.0.0.{id}:{port}");
            ensure!(
                c.proxy_addr(id)?.starts_with(&format!("127.0.0.{id}:")),
                "node {id}'s proxy is on {}",
                c.proxy_addr(id)?
            );
            let before = route_stats(&c, id, "echo").await?;
            let lines: Vec<String> = (0..5)
                .map(|i| format!("line {i} through node {id}: {}", "x".repeat(i * 10)))
                .collect();
            let sent = c
                .eventually(
                    WAIT,
                    &format!("an echo conversation through {addr}"),
                    async || converse(&addr, &lines).await,
                )
                .await?;
            let what = format!("node {id}'s stats to count the conversation");
            c.eventually(WAIT, &what, async || {
                let s = route_stats(&c, id, "echo").await?;
                let (b, a) = (&before["stats"], &s["stats"]);
                let delta = |f: &str| Ok::<_, anyhow::Error>(num(&a[f], f)? - num(&b[f], f)?);
                ensure!(delta("requests")? >= 1, "connections: {a}");
                ensure!(
                    delta("bytes_in")? >= sent && delta("bytes_out")? == delta("bytes_in")?,
                    "sent {sent} each way; stats {a}"
                );
                ensure!(a["in_flight"] == 0, "in flight: {a}");
                Ok(())
            })
            .await?;
            let s = route_stats(&c, id, "echo").await?;
            eprintln!("node {id}: echoed {sent} bytes; route stats {}", s["stats"]);
        }

        let del = c
            .send(
                "delete echo",
                c.client().delete(c.url(1, "/v1/routes/echo")?),
            )
            .await?;
        ensure!(del.status == 200, "delete: {} {}", del.status, del.body);
        for id in c.ids() {
            let addr = format!("127.0.0.{id}:{port}");
            c.eventually(WAIT, &format!("{addr} to refuse connections"), async || {
                match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await
                {
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                    Ok(Err(e)) => bail!("connect failed otherwise: {e}"),
                    Ok(Ok(_)) => bail!("still accepting"),
                    Err(_) => bail!("connect timed out"),
                }
            })
            .await?;
            let gone = c.get(id, "/v1/routes/echo/stats").await?;
            ensure!(
                gone.status == 404,
                "stats after delete on node {id}: {}",
                gone.status
            );
        }
        Ok(())
    }
    .await;
    c.finish(r)
}
