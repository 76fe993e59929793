//! End-to-end health tests: TTL heartbeats through any node, heartbeats that write nothing to
//! the Raft log, leader failover without flapping, HTTP checks that move off a dead owner,
//! node failure for check-less instances, and DeregisterCriticalServiceAfter. Real processes,
//! and real check targets (small HTTP and TCP servers run by the test on port 0).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::{Cluster, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Node-failure timeout for the tests that kill nodes (the smallest the flags allow with the
/// default election timings).
const FAIL_FLAGS: [&str; 2] = ["--node-fail-timeout-ms", "1000"];

// ------------------------------------------------------------------ check targets

/// A tiny HTTP server answering 200 to everything; `stop` closes its listener (connections
/// are then refused), `start` binds the same port again.
struct Target {
    addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn serve_ok(listener: TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            // Read the request head (bounded), then answer and close.
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 64 * 1024 {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        });
    }
}

impl Target {
    async fn new() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        Ok(Target {
            addr,
            task: Some(tokio::spawn(serve_ok(listener))),
        })
    }

    fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn start(&mut self) -> Result<()> {
        let addr = self.addr;
        let listener = common::eventually(WAIT, "rebinding the check target", async || {
            Ok(TcpListener::bind(addr).await?)
        })
        .await?;
        self.task = Some(tokio::spawn(serve_ok(listener)));
        Ok(())
    }
}

// ------------------------------------------------------------------ heartbeats

/// Background TTL heartbeats: one task per check, each sending `pass` every `every`,
/// rotating over `nodes`' API addresses. Stops on drop.
struct Beater {
    stop: CancellationToken,
    ok: Arc<AtomicU64>,
}

impl Beater {
    fn start(apis: Vec<String>, checks: &[String], every: Duration) -> Result<Self> {
        let stop = CancellationToken::new();
        let ok = Arc::new(AtomicU64::new(0));
        let client = common::client(Duration::from_secs(8))?;
        for (i, check) in checks.iter().enumerate() {
            let (stop, ok, client, apis) = (stop.clone(), ok.clone(), client.clone(), apis.clone());
            let check = check.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                let mut n = i;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let url = format!(
                        "http://{}/v1/agent/check/pass/{check}",
                        apis[n % apis.len()]
                    );
                    n += 1;
                    let res = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = client.put(url).send() => r,
                    };
                    if res.is_ok_and(|r| r.status().is_success()) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        Ok(Beater { stop, ok })
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
}

impl Drop for Beater {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ------------------------------------------------------------------ reads

/// Service IDs `GET /v1/health/service/{name}?passing{extra}` returns on node `id`.
async fn passing(c: &Cluster, id: u64, name: &str, extra: &str) -> Result<BTreeSet<String>> {
    let r = c
        .get(id, &format!("/v1/health/service/{name}?passing{extra}"))
        .await?
        .expect_200(&format!("passing {name} on node {id}"))?;
    let v = r.json()?;
    let list = v.as_array().context("health answer is not a list")?;
    list.iter()
        .map(|e| {
            e["Service"]["ID"]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("entry without Service.ID: {e}"))
        })
        .collect()
}

/// Waits until `?passing{extra}` on node `id` lists exactly `want`.
async fn wait_passing(
    c: &Cluster,
    id: u64,
    name: &str,
    extra: &str,
    want: &[&str],
    what: &str,
) -> Result<()> {
    let want = set(want);
    c.eventually(WAIT, &format!("{what} (node {id})"), async || {
        let p = passing(c, id, name, extra).await?;
        ensure!(p == want, "passing: {p:?}");
        Ok(())
    })
    .await
}

/// The check `check_id` as `GET /v1/health/checks/{service}` reports it on node `id`.
async fn check_of(c: &Cluster, id: u64, service: &str, check_id: &str) -> Result<Value> {
    let r = c
        .get(id, &format!("/v1/health/checks/{service}"))
        .await?
        .expect_200(&format!("checks of {service} on node {id}"))?;
    let v = r.json()?;
    v.as_array()
        .context("checks answer is not a list")?
        .iter()
        .find(|c| c["CheckID"] == check_id)
        .cloned()
        .with_context(|| format!("no check {check_id} in {v}"))
}

async fn check_status(c: &Cluster, id: u64, service: &str, check_id: &str) -> Result<String> {
    let v = check_of(c, id, service, check_id).await?;
    Ok(v["Status"].as_str().unwrap_or_default().to_string())
}

/// Waits until the `api` service's check `service:a1` has status `want` on node `on`.
async fn wait_status(c: &Cluster, on: u64, want: &str) -> Result<()> {
    c.eventually(WAIT, &format!("check {want} on node {on}"), async || {
        let s = check_status(c, on, "api", "service:a1").await?;
        ensure!(s == want, "status {s}");
        Ok(())
    })
    .await
}

async fn commit_index(c: &Cluster, id: u64) -> Result<(u64, u64)> {
    let s = c.status(id).await?;
    let commit = s["commit_index"].as_u64().context("commit_index")?;
    let term = s["term"].as_u64().context("term")?;
    Ok((commit, term))
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn others(ids: &[u64], not: u64) -> Vec<u64> {
    ids.iter().copied().filter(|i| *i != not).collect()
}

fn apis(c: &Cluster, ids: &[u64]) -> Result<Vec<String>> {
    ids.iter().map(|i| c.api_addr(*i)).collect()
}

// ------------------------------------------------------------------ tests

/// Test 1: registered through node 1, heartbeating through node 3: passing on every node
/// while the heartbeats flow, critical within TTL plus slack once they stop, passing again
/// when they resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_heartbeats_through_another_node_keep_an_instance_passing() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        c.form().await?;
        let ttl = Duration::from_secs(2);
        c.register(
            1,
            &json!({"Name": "web", "ID": "w1", "Check": {"TTL": "2s"}}),
        )
        .await?
        .expect_200("register w1")?;
        // Initial status is critical (Consul's rule).
        ensure!(
            passing(&c, 1, "web", "").await?.is_empty(),
            "w1 passing before any heartbeat"
        );
        let beater = Beater::start(
            apis(&c, &[3])?,
            &["service:w1".into()],
            Duration::from_millis(400),
        )?;
        for id in c.ids() {
            wait_passing(&c, id, "web", "", &["w1"], "w1 passing").await?;
        }
        // Stays passing over several TTLs, on every node.
        let until = Instant::now() + ttl * 3;
        while Instant::now() < until {
            for id in c.ids() {
                let p = passing(&c, id, "web", "&stale").await?;
                ensure!(
                    p == set(&["w1"]),
                    "w1 left ?passing on node {id} while heartbeating"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ensure!(
            beater.ok() >= 5,
            "only {} heartbeats succeeded",
            beater.ok()
        );
        drop(beater);
        let stopped = Instant::now();
        for id in c.ids() {
            c.eventually(
                ttl + Duration::from_secs(5),
                &format!("w1 critical on node {id}"),
                async || {
                    ensure!(
                        check_status(&c, id, "web", "service:w1").await? == "critical",
                        "still passing"
                    );
                    Ok(())
                },
            )
            .await?;
        }
        ensure!(
            stopped.elapsed() >= ttl - Duration::from_millis(500),
            "w1 turned critical {:?} after the last heartbeat, before its TTL",
            stopped.elapsed()
        );
        let out = check_of(&c, 2, "web", "service:w1").await?;
        ensure!(out["Output"] == "TTL expired", "unexpected output: {out}");
        let _beater = Beater::start(
            apis(&c, &[3])?,
            &["service:w1".into()],
            Duration::from_millis(400),
        )?;
        for id in c.ids() {
            wait_passing(&c, id, "web", "", &["w1"], "w1 passing again").await?;
        }
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Test 2: many instances heartbeating steadily through all nodes do not advance the Raft
/// commit index over several TTLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_heartbeats_do_not_advance_the_commit_index() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        let leader = c.form().await?;
        let ids = c.ids();
        let n = 60;
        let mut checks = Vec::new();
        for i in 0..n {
            let via = ids[i % ids.len()];
            c.register(
                via,
                &json!({"Name": "many", "ID": format!("m{i}"), "Check": {"TTL": "2s"}}),
            )
            .await?
            .expect_200("register")?;
            checks.push(format!("service:m{i}"));
        }
        let beater = Beater::start(apis(&c, &ids)?, &checks, Duration::from_millis(500))?;
        c.eventually(WAIT, "every instance passing", async || {
            let p = passing(&c, leader, "many", "").await?;
            ensure!(p.len() == n, "{} of {n} passing", p.len());
            Ok(())
        })
        .await?;
        let (before, term) = commit_index(&c, leader).await?;
        let ok_before = beater.ok();
        // Three TTLs of steady heartbeats (about 360 of them).
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            let p = passing(&c, leader, "many", "&stale").await?;
            ensure!(
                p.len() == n,
                "only {} of {n} passing while heartbeating",
                p.len()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (after, term_after) = commit_index(&c, leader).await?;
        let beats = beater.ok() - ok_before;
        ensure!(
            beats >= 200,
            "only {beats} heartbeats succeeded in the window"
        );
        ensure!(
            term == term_after,
            "an election happened during the window (term {term} -> {term_after})"
        );
        ensure!(
            after == before,
            "{beats} heartbeats advanced the commit index from {before} to {after}"
        );
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Test 3: killing the leader while instances heartbeat through the survivors never takes
/// any of them out of `?passing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_never_drops_heartbeating_instances_from_passing() -> Result<()> {
    let mut c = Cluster::new(&FAIL_FLAGS)?;
    let r = async {
        let leader = c.form().await?;
        let ids = c.ids();
        let survivors = others(&ids, leader);
        let mut checks = Vec::new();
        let mut all = BTreeSet::new();
        // Registered through every node, the leader included.
        for i in 0..6 {
            let via = ids[i % ids.len()];
            c.register(
                via,
                &json!({"Name": "ha", "ID": format!("h{i}"), "Check": {"TTL": "3s"}}),
            )
            .await?
            .expect_200("register")?;
            checks.push(format!("service:h{i}"));
            all.insert(format!("h{i}"));
        }
        let beater = Beater::start(apis(&c, &survivors)?, &checks, Duration::from_secs(1))?;
        c.eventually(WAIT, "every instance passing", async || {
            ensure!(passing(&c, leader, "ha", "").await? == all, "not yet");
            Ok(())
        })
        .await?;
        let killed = c.kill(leader)?;
        ensure!(!killed.success(), "the leader was not killed: {killed}");
        let new_leader = c
            .wait_for_leader_where(&survivors, "a new leader", |l| l != leader)
            .await?;
        // Watch for well over two TTLs after the takeover (grace, then heartbeats only).
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            for &id in &survivors {
                let p = passing(&c, id, "ha", "&stale").await?;
                ensure!(
                    p == all,
                    "after the leader died, node {id} had only {p:?} passing"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let p = passing(&c, new_leader, "ha", "").await?;
        ensure!(p == all, "consistent read on the new leader: {p:?}");
        // The dead node itself is noticed.
        c.eventually(WAIT, "the old leader marked failed", async || {
            let v = c
                .get(new_leader, &format!("/v1/health/node/node{leader}"))
                .await?
                .json()?;
            ensure!(
                v[0]["CheckID"] == "serfHealth" && v[0]["Status"] == "critical",
                "{v}"
            );
            Ok(())
        })
        .await?;
        drop(beater);
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Test 4: an HTTP check follows its target down and up; when its owner node dies it moves
/// to a live node, which then tracks the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_tracks_its_target_and_moves_off_a_dead_owner() -> Result<()> {
    let mut c = Cluster::new(&FAIL_FLAGS)?;
    let mut target = Target::new().await?;
    let r = async {
        let leader = c.form().await?;
        let ids = c.ids();
        let owner = others(&ids, leader)[0];
        c.register(
            owner,
            &json!({"Name": "api", "ID": "a1", "Check": {"HTTP": target.url(), "Interval": "1s", "Timeout": "1s"}}),
        )
        .await?
        .expect_200("register a1")?;
        wait_status(&c, leader, "passing").await?;
        let v = check_of(&c, leader, "api", "service:a1").await?;
        ensure!(v["OwnerID"] == owner, "owner should be the registering node {owner}: {v}");
        target.stop().await;
        wait_status(&c, leader, "critical").await?;
        target.start().await?;
        wait_status(&c, leader, "passing").await?;

        c.kill(owner)?;
        let moved = c
            .eventually(WAIT, "the check to move off the dead owner", async || {
                let v = check_of(&c, leader, "api", "service:a1").await?;
                let o = v["OwnerID"].as_u64().context("OwnerID")?;
                ensure!(o != owner, "still owned by {o}");
                Ok(o)
            })
            .await?;
        ensure!(ids.contains(&moved) && moved != owner, "moved to {moved}");
        target.stop().await;
        wait_status(&c, leader, "critical").await?;
        let out = check_of(&c, leader, "api", "service:a1").await?;
        ensure!(out["OwnerID"] == moved, "owner changed again: {out}");
        target.start().await?;
        wait_status(&c, leader, "passing").await?;
        // Nothing flaps back when the old owner returns.
        c.start(owner).await?;
        c.eventually(WAIT, "the old owner alive again", async || {
            let v = c.get(leader, &format!("/v1/health/node/node{owner}")).await?.json()?;
            ensure!(v[0]["Status"] == "passing", "{v}");
            Ok(())
        })
        .await?;
        let v = check_of(&c, leader, "api", "service:a1").await?;
        ensure!(v["OwnerID"] == moved, "check moved back: {v}");
        Ok(())
    }
    .await;
    target.stop().await;
    c.finish(r)
}

/// Test 5: a killed node's check-less instances leave `?passing` within the node-failure
/// timeout (instances with checks of their own stay); restarting the node brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_checkless_instances_leave_passing_and_return() -> Result<()> {
    let mut c = Cluster::new(&FAIL_FLAGS)?;
    let r = async {
        let leader = c.form().await?;
        let ids = c.ids();
        let victim = others(&ids, leader)[0];
        c.register(victim, &json!({"Name": "db", "ID": "bare"}))
            .await?
            .expect_200("bare")?;
        c.register(leader, &json!({"Name": "db", "ID": "other"}))
            .await?
            .expect_200("other")?;
        c.register(
            victim,
            &json!({"Name": "db", "ID": "ttl", "Check": {"TTL": "30s", "Status": "passing"}}),
        )
        .await?
        .expect_200("ttl")?;
        ensure!(
            passing(&c, leader, "db", "").await? == set(&["bare", "other", "ttl"]),
            "all passing at first"
        );
        c.kill(victim)?;
        let killed_at = Instant::now();
        let what = "the dead node's check-less instance to leave ?passing";
        wait_passing(&c, leader, "db", "", &["other", "ttl"], what).await?;
        let took = killed_at.elapsed();
        let v = c
            .get(leader, &format!("/v1/health/node/node{victim}"))
            .await?
            .json()?;
        ensure!(
            v[0]["CheckID"] == "serfHealth" && v[0]["Status"] == "critical",
            "{v}"
        );
        let stats = c
            .get(leader, "/v1/cluster/stats")
            .await?
            .expect_200("stats")?
            .json()?;
        let dead = stats["members"]
            .as_array()
            .context("members")?
            .iter()
            .find(|m| m["id"] == victim)
            .cloned()
            .context("victim in stats")?;
        ensure!(dead["failed"] == true, "stats: {stats}");
        ensure!(
            dead["last_contact_ms"]
                .as_u64()
                .is_some_and(|ms| ms >= 1000),
            "stats: {stats}"
        );
        // The other survivor agrees.
        let survivor = others(&others(&ids, leader), victim)[0];
        let what = "the other survivor agrees";
        wait_passing(&c, survivor, "db", "&stale", &["other", "ttl"], what).await?;
        eprintln!("check-less instance left ?passing {took:?} after the kill");
        c.start(victim).await?;
        let what = "the restarted node's instance to pass again";
        wait_passing(&c, leader, "db", "", &["bare", "other", "ttl"], what).await?;
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Test 6: DeregisterCriticalServiceAfter removes an instance that stays critical, and only
/// that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_critical_service_after_removes_an_instance() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        c.form().await?;
        let check = |status: &str| json!({"TTL": "30s", "Status": status, "DeregisterCriticalServiceAfter": "1s"});
        c.register(2, &json!({"Name": "job", "ID": "doomed", "Check": check("critical")}))
            .await?
            .expect_200("doomed")?;
        c.register(3, &json!({"Name": "job", "ID": "healthy", "Check": check("passing")}))
            .await?
            .expect_200("healthy")?;
        for id in c.ids() {
            c.eventually(WAIT, &format!("the critical instance deregistered on node {id}"), async || {
                let ids = c.catalog_ids(id, "job", "").await?;
                ensure!(ids == set(&["healthy"]), "catalog: {ids:?}");
                Ok(())
            })
            .await?;
        }
        let r = c.get(1, "/v1/health/checks/job").await?.json()?;
        let ids: Vec<&str> = r.as_array().context("list")?.iter().filter_map(|c| c["CheckID"].as_str()).collect();
        ensure!(ids == ["service:healthy"], "the doomed instance's check should be gone: {r}");
        Ok(())
    }
    .await;
    c.finish(r)
}

/// The rest of the check API on one node: standalone checks, TCP checks, health queries,
/// stats, and bad input answered 4xx with a JSON body while the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_api_tcp_checks_queries_and_bad_input() -> Result<()> {
    let mut c = Cluster::with_size(1, &[])?;
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp.local_addr()?;
    let r = async {
        c.form().await?;
        c.register(1, &json!({"Name": "cache", "ID": "c1"})).await?.expect_200("c1")?;
        c.put_json(1, "/v1/agent/check/register", &json!({"Name": "port", "ServiceID": "c1", "TCP": tcp_addr.to_string(), "Interval": "1s"}))
            .await?
            .expect_200("tcp check")?;
        c.put_json(1, "/v1/agent/check/register", &json!({"Name": "mem", "ID": "mem", "TTL": "30s"}))
            .await?
            .expect_200("node-level ttl check")?;
        c.eventually(WAIT, "the TCP check passing", async || {
            ensure!(check_status(&c, 1, "cache", "port").await? == "passing", "not yet");
            Ok(())
        })
        .await?;
        let agent = c.get(1, "/v1/agent/checks").await?.expect_200("agent checks")?.json()?;
        ensure!(agent["port"]["Type"] == "tcp" && agent["mem"]["Status"] == "critical", "{agent}");
        let crit = c.get(1, "/v1/health/state/critical").await?.expect_200("state")?;
        ensure!(crit.index()? >= 1, "X-Consul-Index on health/state");
        let crit = crit.json()?;
        let ids: Vec<&str> = crit.as_array().context("list")?.iter().filter_map(|c| c["CheckID"].as_str()).collect();
        ensure!(ids == ["mem"], "critical checks: {crit}");
        c.put_raw(1, "/v1/agent/check/warn/mem?note=swapping", String::new()).await?.expect_200("warn")?;
        let warn = c.get(1, "/v1/health/state/warning").await?.json()?;
        ensure!(warn[0]["CheckID"] == "mem" && warn[0]["Output"] == "swapping", "{warn}");
        c.put_json(1, "/v1/agent/check/update/mem", &json!({"Status": "passing", "Output": "fine"}))
            .await?
            .expect_200("update")?;
        let node = c.get(1, "/v1/health/node/node1").await?.json()?;
        let n: Vec<(&str, &str)> = node
            .as_array()
            .context("list")?
            .iter()
            .map(|c| (c["CheckID"].as_str().unwrap_or(""), c["Status"].as_str().unwrap_or("")))
            .collect();
        ensure!(n.contains(&("serfHealth", "passing")) && n.contains(&("mem", "passing")), "{node}");
        drop(tcp);
        // Dropping the listener refuses connections: the TCP check turns critical.
        c.eventually(WAIT, "the TCP check critical", async || {
            ensure!(check_status(&c, 1, "cache", "port").await? == "critical", "not yet");
            Ok(())
        })
        .await?;
        ensure!(passing(&c, 1, "cache", "").await?.is_empty(), "c1 passing with a critical check");
        let stats = c.get(1, "/v1/cluster/stats").await?.expect_200("stats")?.json()?;
        ensure!(stats["instances"]["by_state"]["critical"] == 1, "{stats}");
        ensure!(stats["checks"]["by_owner"]["node1"]["tcp"] == 1, "{stats}");

        let bad: [(&str, Value, u16); 7] = [
            ("/v1/agent/check/register", json!({"Name": "x"}), 400),
            ("/v1/agent/check/register", json!({"Name": "x", "TTL": "soon"}), 400),
            ("/v1/agent/check/register", json!({"Name": "x", "HTTP": "http://127.0.0.1:1/"}), 400),
            ("/v1/agent/check/register", json!({"Name": "x", "ServiceID": "nope", "TTL": "5s"}), 404),
            ("/v1/agent/check/update/mem", json!({"Status": "great"}), 400),
            ("/v1/agent/check/pass/port", json!({}), 400),
            ("/v1/agent/check/pass/nope", json!({}), 404),
        ];
        for (path, body, want) in bad {
            let r = c.put_json(1, path, &body).await?;
            ensure!(r.status == want, "{path} {body}: {} {}", r.status, r.body);
            let v = r.json().with_context(|| format!("{path}: error body is not JSON"))?;
            ensure!(v["error"].is_string() && v["message"].is_string(), "{path}: {v}");
        }
        let r = c.get(1, "/v1/health/state/sick").await?;
        ensure!(r.status == 400, "bad state: {}", r.status);
        let r = c.put_raw(1, "/v1/agent/check/deregister/nope", String::new()).await?;
        ensure!(r.status == 404, "deregister unknown: {}", r.status);
        c.put_raw(1, "/v1/agent/check/deregister/mem", String::new()).await?.expect_200("deregister mem")?;
        let agent = c.get(1, "/v1/agent/checks").await?.json()?;
        ensure!(agent.get("mem").is_none() && agent.get("port").is_some(), "{agent}");
        // Deregistering the instance removes its checks too.
        c.deregister(1, "c1").await?.expect_200("deregister c1")?;
        let agent = c.get(1, "/v1/agent/checks").await?.json()?;
        if agent.as_object().is_none_or(|m| !m.is_empty()) {
            bail!("checks left after deregistering their instance: {agent}");
        }
        Ok(())
    }
    .await;
    c.finish(r)
}
