//! End-to-end cluster scenarios for the `raftmesh` binary: formation and reads on every node,
//! leader failover, a leader killed under load and restarted at once, snapshot catch-up after a
//! restart, clean SIGTERM shutdown and restart,
//! write rejection without quorum, input validation, and a frozen follower that wakes up without
//! unseating the leader (pre-vote). Each test runs real processes through
//! the harness in `tests/common/mod.rs` and proves its scenario actually happened.
//!
//! Run with: `cargo test --test cluster -- --test-threads=1`

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use common::{Cluster, Resp, WAIT};

/// Checks the headers every read must carry; returns X-Consul-Index.
fn check_read_headers(r: &Resp, what: &str) -> Result<u64> {
    let index = r.index().with_context(|| what.to_string())?;
    ensure!(index >= 1, "{what}: X-Consul-Index {index} < 1");
    let known = r.header("X-Consul-KnownLeader");
    ensure!(
        matches!(known, Some("true") | Some("false")),
        "{what}: X-Consul-KnownLeader is {known:?}"
    );
    let contact = r.header("X-Consul-LastContact");
    ensure!(
        contact.is_some_and(|c| c.trim().parse::<u64>().is_ok()),
        "{what}: X-Consul-LastContact is {contact:?}"
    );
    let eff = r.header("X-Consul-Effective-Consistency");
    ensure!(
        matches!(eff, Some("leader") | Some("consistent") | Some("stale")),
        "{what}: X-Consul-Effective-Consistency is {eff:?}"
    );
    Ok(index)
}

/// ServiceIDs of a `/v1/health/service/{name}` answer.
fn health_ids(v: &Value) -> Result<BTreeSet<String>> {
    v.as_array()
        .context("health answer is not a list")?
        .iter()
        .map(|e| {
            e["Service"]["ID"]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("health entry without Service.ID: {e}"))
        })
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// The catalog entry of service instance `sid` in a `/v1/catalog/service/{name}` answer.
fn catalog_entry<'a>(v: &'a Value, sid: &str) -> Result<&'a Value> {
    v.as_array()
        .context("catalog answer is not a list")?
        .iter()
        .find(|e| e["ServiceID"] == sid)
        .with_context(|| format!("no catalog entry for {sid} in {v}"))
}

/// Registers through node `via` and requires 200 with an X-Consul-Index >= 1.
async fn register_ok(c: &Cluster, via: u64, body: Value) -> Result<u64> {
    let r = c
        .register(via, &body)
        .await?
        .expect_200(&format!("register {body} via node {via}"))?;
    let idx = r.index().context("write answer")?;
    ensure!(idx >= 1, "write X-Consul-Index {idx} < 1");
    Ok(idx)
}

/// `catalog_ids` on every node in `ids` must be exactly `want`, with a default (non-stale) read.
async fn assert_default_reads(
    c: &Cluster,
    ids: &[u64],
    name: &str,
    want: &BTreeSet<String>,
) -> Result<()> {
    for &id in ids {
        let got = c.catalog_ids(id, name, "").await?;
        ensure!(
            &got == want,
            "default catalog read of {name} on node {id}: got {got:?}, want {want:?}"
        );
    }
    Ok(())
}

/// `?stale` catalog reads on every node in `ids` eventually show exactly `want`.
async fn converge_stale(
    c: &Cluster,
    ids: &[u64],
    name: &str,
    want: &BTreeSet<String>,
) -> Result<()> {
    for &id in ids {
        c.eventually(
            WAIT,
            &format!(
                "stale read of {name} on node {id} to show {} instances",
                want.len()
            ),
            async || {
                let got = c.catalog_ids(id, name, "?stale").await?;
                ensure!(&got == want, "got {got:?}");
                Ok(())
            },
        )
        .await?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ 1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_and_read_everywhere() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = form_and_read_everywhere_body(&mut c).await;
    c.finish(r)
}

async fn form_and_read_everywhere_body(c: &mut Cluster) -> Result<()> {
    let leader = c.form().await?;
    let all = c.ids();

    for &id in &all {
        register_ok(
            c,
            id,
            json!({"Name": "web", "ID": format!("web-{id}"), "Port": 8080 + id,
                   "Tags": ["a"], "Meta": {"k": "v"}}),
        )
        .await?;
    }
    let want = set(&["web-1", "web-2", "web-3"]);

    // Default reads: every acknowledged write is visible on every node right away.
    for &id in &all {
        let r = c
            .get(id, "/v1/catalog/service/web")
            .await?
            .expect_200("catalog read")?;
        check_read_headers(&r, &format!("catalog read on node {id}"))?;
        let v = r.json()?;
        let got = c.catalog_ids(id, "web", "").await?;
        ensure!(got == want, "catalog on node {id}: {got:?}");
        let e = catalog_entry(&v, "web-1")?;
        ensure!(e["ServiceName"] == "web", "ServiceName: {e}");
        ensure!(e["ServicePort"] == 8081, "ServicePort: {e}");
        ensure!(e["ServiceTags"] == json!(["a"]), "ServiceTags: {e}");
        ensure!(e["ServiceMeta"] == json!({"k": "v"}), "ServiceMeta: {e}");

        let r = c
            .get(id, "/v1/health/service/web")
            .await?
            .expect_200("health read")?;
        check_read_headers(&r, &format!("health read on node {id}"))?;
        let got = health_ids(&r.json()?)?;
        ensure!(got == want, "health on node {id}: {got:?}");
    }

    // Stale reads on followers converge and carry the headers too.
    let followers: Vec<u64> = all.iter().copied().filter(|&i| i != leader).collect();
    converge_stale(c, &followers, "web", &want).await?;
    for &id in &followers {
        let r = c
            .get(id, "/v1/health/service/web?stale")
            .await?
            .expect_200("stale health read")?;
        check_read_headers(&r, &format!("stale health read on node {id}"))?;
        c.eventually(
            WAIT,
            &format!("stale health read on node {id}"),
            async || {
                let r = c
                    .get(id, "/v1/health/service/web?stale")
                    .await?
                    .expect_200("stale health read")?;
                let got = health_ids(&r.json()?)?;
                ensure!(got == want, "got {got:?}");
                Ok(())
            },
        )
        .await?;
    }

    // Agent view is local to the node the instance was registered through.
    let r = c
        .get(2, "/v1/agent/services")
        .await?
        .expect_200("agent services on node 2")?;
    let v = r.json()?;
    let keys: BTreeSet<String> = v
        .as_object()
        .context("agent services is not an object")?
        .keys()
        .cloned()
        .collect();
    ensure!(keys == set(&["web-2"]), "agent services on node 2: {v}");
    ensure!(v["web-2"]["Service"] == "web", "agent service entry: {v}");
    ensure!(v["web-2"]["Port"] == 8082, "agent service entry: {v}");

    // Re-register web-1 with a new port: ModifyIndex grows, CreateIndex stays.
    let before = c
        .get(1, "/v1/catalog/service/web")
        .await?
        .expect_200("catalog")?
        .json()?;
    let before = catalog_entry(&before, "web-1")?.clone();
    register_ok(
        c,
        1,
        json!({"Name": "web", "ID": "web-1", "Port": 9090, "Tags": ["a"], "Meta": {"k": "v"}}),
    )
    .await?;
    for &id in &all {
        let after = c
            .get(id, "/v1/catalog/service/web")
            .await?
            .expect_200("catalog")?
            .json()?;
        let after = catalog_entry(&after, "web-1")?;
        ensure!(
            after["ServicePort"] == 9090,
            "port not updated on node {id}: {after}"
        );
        let (b_create, a_create) = (
            before["CreateIndex"].as_u64(),
            after["CreateIndex"].as_u64(),
        );
        let (b_mod, a_mod) = (
            before["ModifyIndex"].as_u64(),
            after["ModifyIndex"].as_u64(),
        );
        ensure!(
            b_create.is_some() && b_create == a_create,
            "CreateIndex changed on node {id}: {before} -> {after}"
        );
        ensure!(
            matches!((b_mod, a_mod), (Some(b), Some(a)) if a > b),
            "ModifyIndex did not grow on node {id}: {before} -> {after}"
        );
    }

    // Deregister web-1 (registered through node 1) through node 3.
    c.deregister(3, "web-1")
        .await?
        .expect_200("deregister web-1 via node 3")?;
    let want = set(&["web-2", "web-3"]);
    assert_default_reads(c, &all, "web", &want).await?;
    converge_stale(c, &all, "web", &want).await?;
    Ok(())
}

// ------------------------------------------------------------------------------------ 2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = leader_failover_body(&mut c).await;
    c.finish(r)
}

async fn leader_failover_body(c: &mut Cluster) -> Result<()> {
    let old_leader = c.form().await?;
    let all = c.ids();
    let mut acked = BTreeSet::new();
    for n in 0..6u64 {
        let via = all[(n as usize) % all.len()];
        let sid = format!("api-{n}");
        register_ok(c, via, json!({"Name": "api", "ID": sid, "Port": 7000 + n})).await?;
        acked.insert(sid);
    }

    let old_pid = c.pid(old_leader)?;
    let st = c.kill(old_leader)?;
    ensure!(
        st.signal() == Some(9),
        "leader {old_leader} (pid {old_pid}) did not die of SIGKILL: {st}"
    );
    let survivors: Vec<u64> = all.iter().copied().filter(|&i| i != old_leader).collect();

    let new_leader = c
        .wait_for_leader_where(&survivors, "a new leader", |l| l != old_leader)
        .await?;
    ensure!(new_leader != old_leader, "leader did not change");

    for (k, &via) in survivors.iter().enumerate() {
        let sid = format!("api-after-{via}");
        register_ok(
            c,
            via,
            json!({"Name": "api", "ID": sid, "Port": 7100 + k as u64}),
        )
        .await
        .with_context(|| format!("write through survivor {via} after failover"))?;
        acked.insert(sid);
    }

    assert_default_reads(c, &survivors, "api", &acked).await?;
    converge_stale(c, &survivors, "api", &acked).await?;
    Ok(())
}

/// The leader SIGKILLed in the middle of a stream of writes and restarted at once on its data:
/// afterwards every acknowledged write is on every node, and the three agree on every instance,
/// including writes whose answer was lost with the leader. (A leader posts each batch to its
/// followers before its own sync; one that came back in its old term could give those entries'
/// log ids to other entries, and the nodes would disagree.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_and_restarted_at_once() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = killed_under_load_body(&mut c).await;
    c.finish(r)
}

async fn commit_index(c: &Cluster, id: u64) -> Result<u64> {
    c.status(id).await?["commit_index"]
        .as_u64()
        .context("commit_index")
}

/// Waits until node `id`'s commit index is 20 past what it is now.
async fn commits_grow(c: &Cluster, id: u64, when: &str) -> Result<()> {
    let start = commit_index(c, id).await?;
    c.eventually(WAIT, &format!("writes committing {when}"), async || {
        let now = commit_index(c, id).await?;
        ensure!(now >= start + 20, "commit index {now}");
        Ok(())
    })
    .await
}

async fn killed_under_load_body(c: &mut Cluster) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let first = c.form().await?;
    let all = c.ids();
    // Twice: the bootstrap leader (the lowest id) and then whoever followed it, so a restarted
    // leader meets a new leader of a lower id at least once, where vote order matters.
    let mut leader = first;
    let mut acked = BTreeSet::new();
    for round in 0..2 {
        let others: Vec<u64> = all.iter().copied().filter(|&i| i != leader).collect();
        // Through the others, whose addresses outlive the leader's process; they forward to
        // whoever leads.
        let urls = others
            .iter()
            .map(|&id| c.url(id, "/v1/agent/service/register"))
            .collect::<Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..8u32 {
            let (http, url, stop) = (
                c.client().clone(),
                urls[w as usize % urls.len()].clone(),
                stop.clone(),
            );
            writers.spawn(async move {
                let mut acked = Vec::new();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("load-{round}-{w}-{n}");
                    n += 1;
                    let body = json!({"Name": "load", "ID": id, "Port": 1000 + n % 5000});
                    match http.put(&url).json(&body).send().await {
                        Ok(r) if r.status() == 200 => acked.push(id),
                        // No leader for a moment: pace the retries rather than spin.
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                acked
            });
        }
        commits_grow(c, others[0], "before the kill").await?;

        let term_before = c.status(leader).await?["term"].as_u64().context("term")?;
        c.kill(leader)?;
        c.spawn(leader)?;
        c.wait_ready(leader).await?;
        // openraft would have it lead again in that term at once; it must not.
        let s = c.status(leader).await?;
        ensure!(
            !(s["role"] == "leader" && s["term"].as_u64() == Some(term_before)),
            "round {round}: node {leader} resumed leading term {term_before} after its \
             restart; entries it posted before its own sync could be given other contents: {s}"
        );
        let next = c.wait_for_leader(&all).await?;
        commits_grow(c, others[0], "after the restart").await?;
        stop.store(true, Ordering::Relaxed);
        let before = acked.len();
        while let Some(done) = writers.join_next().await {
            acked.extend(done?);
        }
        ensure!(
            acked.len() >= before + 20,
            "round {round}: only {} writes acknowledged",
            acked.len() - before
        );
        leader = next;
    }

    let now_leader = c.wait_for_leader(&all).await?;
    let there = c.catalog_ids(now_leader, "load", "").await?;
    let missing: Vec<_> = acked.difference(&there).collect();
    ensure!(missing.is_empty(), "acknowledged but gone: {missing:?}");
    converge_stale(c, &all, "load", &there).await?;
    Ok(())
}

// ------------------------------------------------------------------------------------ 3

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_catches_up_via_snapshot() -> Result<()> {
    let mut c = Cluster::new(&["--snapshot-every", "20", "--snapshot-keep-logs", "0"])?;
    let r = restart_catches_up_via_snapshot_body(&mut c).await;
    c.finish(r)
}

async fn restart_catches_up_via_snapshot_body(c: &mut Cluster) -> Result<()> {
    let leader = c.form().await?;
    let all = c.ids();
    let follower = *all.iter().find(|&&i| i != leader).context("no follower")?;

    let mut want = BTreeSet::new();
    register_ok(
        c,
        leader,
        json!({"Name": "bulk", "ID": "bulk-early", "Port": 1}),
    )
    .await?;
    want.insert("bulk-early".to_string());
    converge_stale(c, &[follower], "bulk", &want).await?;

    let f_status = c.status(follower).await?;
    let f_last = f_status["last_log_index"]
        .as_u64()
        .with_context(|| format!("follower status without last_log_index: {f_status}"))?;
    let f_installed_before = f_status["snapshots_installed"].as_u64();
    c.kill(follower)?;
    // The follower cannot hold entries the leader did not have when it died.
    let l_status = c.status(leader).await?;
    let l_last = l_status["last_log_index"]
        .as_u64()
        .with_context(|| format!("leader status without last_log_index: {l_status}"))?;
    let threshold = f_last.max(l_last);

    for n in 0..100u64 {
        let sid = format!("bulk-{n}");
        register_ok(
            c,
            leader,
            json!({"Name": "bulk", "ID": sid, "Port": 2000 + n}),
        )
        .await
        .with_context(|| format!("bulk registration {n}"))?;
        want.insert(sid);
    }

    let survivors: Vec<u64> = all.iter().copied().filter(|&i| i != follower).collect();
    ensure!(
        c.wait_for_leader(&survivors).await? == leader,
        "leader changed during the bulk load"
    );
    let purged = c
        .eventually(
            WAIT,
            &format!("leader {leader} to purge its log beyond index {threshold}"),
            async || {
                let s = c.status(leader).await?;
                let p = s["purged_index"]
                    .as_u64()
                    .with_context(|| format!("no purged_index: {s}"))?;
                ensure!(p > threshold, "purged_index {p} <= {threshold}: {s}");
                Ok(p)
            },
        )
        .await?;

    c.start(follower).await?;
    c.eventually(
        WAIT,
        &format!("restarted node {follower} to follow {leader} after installing a snapshot"),
        async || {
            let s = c.status(follower).await?;
            ensure!(s["role"] == "follower", "role: {s}");
            ensure!(s["leader_id"] == leader, "leader_id: {s}");
            let installed = s["snapshots_installed"].as_u64().unwrap_or(0);
            ensure!(installed >= 1, "snapshots_installed {installed}: {s}");
            Ok(())
        },
    )
    .await?;
    converge_stale(c, &[follower], "bulk", &want).await?;
    ensure!(
        c.wait_for_leader(&all).await? == leader,
        "leader changed when the follower came back"
    );
    let s = c.status(follower).await?;
    eprintln!(
        "snapshot catch-up: follower {follower} last_log_index before kill {f_last}, leader purged \
         {purged} (> {threshold}), snapshots_installed {} (was {f_installed_before:?} before)",
        s["snapshots_installed"]
    );
    Ok(())
}

// ------------------------------------------------------------------------------------ 4

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_all_and_restart() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = stop_all_and_restart_body(&mut c, "TERM").await;
    c.finish(r)
}

/// The applied state lives in memory; what brings it back after every node
/// died at once is the last snapshot plus the log after it. Snapshots every 4
/// entries, so every node has one on disk before the kill and the restart
/// starts from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_all_and_restart_keeps_every_acknowledged_write() -> Result<()> {
    let mut c = Cluster::new(&["--snapshot-every", "4"])?;
    let r = stop_all_and_restart_body(&mut c, "KILL").await;
    c.finish(r)
}

async fn stop_all_and_restart_body(c: &mut Cluster, signal: &str) -> Result<()> {
    c.form().await?;
    let all = c.ids();
    let mut want = BTreeSet::new();
    for n in 0..9u64 {
        let via = all[(n as usize) % all.len()];
        let sid = format!("db-{n}");
        register_ok(c, via, json!({"Name": "db", "ID": sid, "Port": 5400 + n})).await?;
        want.insert(sid);
    }

    if signal == "KILL" {
        for &id in &all {
            c.eventually(WAIT, &format!("a snapshot on node {id}"), async || {
                let s = c.status(id).await?;
                let snap = s["snapshot_index"].as_u64().unwrap_or(0);
                ensure!(snap >= 4, "no snapshot yet: {s}");
                Ok(())
            })
            .await?;
        }
    }
    for &id in &all {
        c.signal(id, signal)?;
    }
    let sent = Instant::now();
    for &id in &all {
        let st = c.wait_exit(id, Duration::from_secs(20)).await?;
        ensure!(
            signal == "KILL" || st.success(),
            "node {id} exited with {st} after SIG{signal} (wanted status 0)"
        );
    }
    ensure!(
        sent.elapsed() < Duration::from_secs(25),
        "shutdown took {:?}",
        sent.elapsed()
    );

    for &id in &all {
        c.spawn(id)?;
    }
    for &id in &all {
        c.wait_ready(id).await?;
    }
    c.wait_for_leader(&all).await?;
    assert_default_reads(c, &all, "db", &want).await?;
    converge_stale(c, &all, "db", &want).await?;
    Ok(())
}

// ------------------------------------------------------------------------------------ 5

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_survivor_rejects_writes() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = single_survivor_rejects_writes_body(&mut c).await;
    c.finish(r)
}

async fn single_survivor_rejects_writes_body(c: &mut Cluster) -> Result<()> {
    let leader = c.form().await?;
    let all = c.ids();
    let other = *all.iter().find(|&&i| i != leader).context("no follower")?;
    let survivor = *all
        .iter()
        .find(|&&i| i != leader && i != other)
        .context("no third node")?;
    register_ok(
        c,
        survivor,
        json!({"Name": "solo", "ID": "solo-ok", "Port": 1}),
    )
    .await?;

    c.kill(leader)?;
    c.kill(other)?;

    let slow = common::client(Duration::from_secs(35))?;
    let url = c.url(survivor, "/v1/agent/service/register")?;
    // First attempt right away (survivor may still believe in the dead leader), later ones
    // after at least one leader-wait/write-timeout period has passed.
    for attempt in 0..3 {
        let body = json!({"Name": "solo", "ID": format!("solo-{attempt}"), "Port": 2});
        let started = Instant::now();
        let r = c
            .send(
                &format!("write attempt {attempt} via lone node {survivor}"),
                slow.put(&url).json(&body),
            )
            .await?;
        let took = started.elapsed();
        ensure!(
            took < Duration::from_secs(30),
            "attempt {attempt}: answered only after {took:?}"
        );
        ensure!(
            !(200..300).contains(&r.status),
            "attempt {attempt}: write without quorum was acknowledged ({})",
            r.status
        );
        ensure!(
            r.status == 503 || r.status == 504,
            "attempt {attempt}: expected 503 or 504, got {} {:?}",
            r.status,
            r.body
        );
        let v = r.json()?;
        let code = v["error"]
            .as_str()
            .with_context(|| format!("attempt {attempt}: no \"error\" string in {v}"))?;
        let want_code = if r.status == 503 {
            "no_leader"
        } else {
            "timeout"
        };
        ensure!(
            code == want_code,
            "attempt {attempt}: status {} with error {code:?}",
            r.status
        );
        if r.status == 503 {
            ensure!(
                r.header("Retry-After").is_some(),
                "attempt {attempt}: 503 without Retry-After"
            );
        }
        eprintln!("attempt {attempt}: {} {code} after {took:?}", r.status);
    }
    // The survivor itself is still alive and answering.
    let r = c
        .get(survivor, "/livez")
        .await?
        .expect_200("livez on survivor")?;
    ensure!(r.json()?["status"] == "ok", "livez body {:?}", r.body);
    Ok(())
}

// ------------------------------------------------------------------------------------ 6

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = bad_input_body(&mut c).await;
    c.finish(r)
}

/// Requires a `status` answer whose JSON body has string "error" == `code` and a "message".
fn expect_error(r: &Resp, status: u16, code: &str, what: &str) -> Result<()> {
    ensure!(
        r.status == status,
        "{what}: expected {status}, got {} with body {:?}",
        r.status,
        r.body
    );
    let v = r.json().with_context(|| what.to_string())?;
    let got = v["error"].as_str();
    ensure!(
        got == Some(code),
        "{what}: \"error\" is {got:?}, want {code:?}: {v}"
    );
    ensure!(
        v["message"].is_string(),
        "{what}: no \"message\" string: {v}"
    );
    Ok(())
}

async fn bad_input_body(c: &mut Cluster) -> Result<()> {
    c.form().await?;
    let node = 1;
    let long_name = "a".repeat(1000);
    let cases: Vec<(&str, String)> = vec![
        ("malformed JSON", r#"{"Name": "web", "Port": "#.to_string()),
        ("not an object", r#"[1,2,3]"#.to_string()),
        (
            "Port is a string",
            r#"{"Name":"web","Port":"x"}"#.to_string(),
        ),
        (
            "Tags is a string",
            r#"{"Name":"web","Tags":"a"}"#.to_string(),
        ),
        ("missing Name", r#"{"ID":"x","Port":80}"#.to_string()),
        ("empty Name", r#"{"Name":"","Port":80}"#.to_string()),
        (
            "Name with spaces",
            r#"{"Name":"my web","Port":80}"#.to_string(),
        ),
        (
            "Name with slashes",
            r#"{"Name":"my/web","Port":80}"#.to_string(),
        ),
        (
            "Name of 1000 chars",
            format!(r#"{{"Name":"{long_name}","Port":80}}"#),
        ),
        ("Port 70000", r#"{"Name":"web","Port":70000}"#.to_string()),
        ("Port -1", r#"{"Name":"web","Port":-1}"#.to_string()),
    ];
    for (what, body) in cases {
        let r = c.put_raw(node, "/v1/agent/service/register", body).await?;
        expect_error(&r, 400, "bad_request", what)?;
    }

    let big = format!(
        r#"{{"Name":"big","Meta":{{"k":"{}"}}}}"#,
        "x".repeat(1024 * 1024 + 1024)
    );
    let r = c.put_raw(node, "/v1/agent/service/register", big).await?;
    expect_error(&r, 413, "payload_too_large", "body over 1 MiB")?;

    let r = c
        .get(node, "/v1/catalog/service/web?stale&consistent")
        .await?;
    expect_error(&r, 400, "bad_request", "?stale&consistent")?;

    // Nothing of the above got in.
    let v = c
        .get(node, "/v1/catalog/services")
        .await?
        .expect_200("catalog services")?
        .json()?;
    let names: Vec<&String> = v
        .as_object()
        .context("catalog services not an object")?
        .keys()
        .collect();
    ensure!(
        !names
            .iter()
            .any(|n| n.as_str() == "big" || n.as_str() == long_name),
        "invalid registrations are in the catalog: {names:?}"
    );

    // Still healthy and accepting valid writes.
    let r = c.get(node, "/livez").await?.expect_200("livez")?;
    ensure!(r.json()?["status"] == "ok", "livez body {:?}", r.body);
    register_ok(
        c,
        node,
        json!({"Name": "web", "ID": "web-good", "Port": 8080}),
    )
    .await?;

    // Lowercase, snake_case and mixed-case keys are accepted and really parsed.
    register_ok(c, node, json!({"name": "db", "port": 5432})).await?;
    register_ok(
        c,
        node,
        json!({"name": "cache", "id": "cache-1", "address": "127.0.0.1", "port": 6379,
               "tags": ["primary"], "meta": {"tier": "hot"}, "enable_tag_override": true}),
    )
    .await?;
    register_ok(
        c,
        node,
        json!({"NAME": "queue", "iD": "queue-1", "pORT": 5672}),
    )
    .await?;

    let checks: [(&str, &str, u64); 4] = [
        ("web", "web-good", 8080),
        ("db", "db", 5432),
        ("cache", "cache-1", 6379),
        ("queue", "queue-1", 5672),
    ];
    for (name, sid, port) in checks {
        let v = c
            .get(node, &format!("/v1/catalog/service/{name}"))
            .await?
            .expect_200("catalog read")?
            .json()?;
        let e = catalog_entry(&v, sid)?;
        ensure!(e["ServicePort"] == port, "{sid}: port not parsed: {e}");
        if sid == "cache-1" {
            ensure!(e["ServiceTags"] == json!(["primary"]), "cache-1 tags: {e}");
            ensure!(
                e["ServiceMeta"] == json!({"tier": "hot"}),
                "cache-1 meta: {e}"
            );
            ensure!(e["ServiceAddress"] == "127.0.0.1", "cache-1 address: {e}");
        }
    }
    Ok(())
}

/// Many registrations in flight at once through every node (the leader
/// commits concurrent writes together): each acknowledged one is on every
/// node, and every acknowledgement carries a commit index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_every_node() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = concurrent_writes_body(&mut c).await;
    c.finish(r)
}

async fn concurrent_writes_body(c: &mut Cluster) -> Result<()> {
    c.form().await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..150u32 {
        let via = u64::from(i % 3) + 1;
        let url = c.url(via, "/v1/agent/service/register")?;
        let http = c.client().clone();
        tasks.spawn(async move {
            let id = format!("burst-{i}");
            let body = json!({"Name": "burst", "ID": id, "Port": 1000 + i});
            let r = http.put(&url).json(&body).send().await?;
            let status = r.status().as_u16();
            let index = r
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            anyhow::Ok((id, status, index))
        });
    }
    let mut acked = BTreeSet::new();
    while let Some(res) = tasks.join_next().await {
        let (id, status, index) = res??;
        ensure!(status == 200, "{id}: status {status}");
        ensure!(index.is_some_and(|i| i >= 1), "{id}: index {index:?}");
        acked.insert(id);
    }
    ensure!(acked.len() == 150, "only {} acknowledged", acked.len());
    for id in c.ids() {
        let seen = c.catalog_ids(id, "burst", "").await?;
        ensure!(
            seen == acked,
            "node {id} is missing {:?}",
            acked.difference(&seen).collect::<Vec<_>>()
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ 8

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_follower_does_not_unseat_leader() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = paused_follower_body(&mut c).await;
    c.finish(r)
}

/// A follower frozen (SIGSTOP) well past its election wait wakes up having heard from no leader
/// for a long time. It must ask the others first (pre-vote) and, since they still hear the
/// leader, not campaign: the term and the leader stay, and it catches up as a follower. Without
/// the pre-vote it would raise the term and the leader would step down.
async fn paused_follower_body(c: &mut Cluster) -> Result<()> {
    let leader = c.form().await?;
    let term_before = c.status(leader).await?["term"].as_u64().context("term")?;
    let follower = c
        .ids()
        .into_iter()
        .find(|&i| i != leader)
        .context("a follower")?;

    c.signal(follower, "STOP")?;
    // Keep the cluster busy while the follower is frozen for several election waits (the
    // default election max is 250 ms); the writes commit on the leader and the other follower.
    let frozen_since = Instant::now();
    let mut n = 0u64;
    while frozen_since.elapsed() < Duration::from_millis(1500) {
        register_ok(
            c,
            leader,
            json!({"Name": "busy", "ID": format!("busy-{n}"), "Port": 9000}),
        )
        .await?;
        n += 1;
    }
    c.signal(follower, "CONT")?;

    let leader_commit = c.status(leader).await?["commit_index"]
        .as_u64()
        .context("commit_index")?;
    c.eventually(WAIT, "the thawed follower to catch up", async || {
        let s = c.status(follower).await?;
        let applied = s["applied_index"].as_u64().context("applied_index")?;
        ensure!(
            applied >= leader_commit,
            "applied {applied} < {leader_commit}"
        );
        Ok(())
    })
    .await?;

    for id in c.ids() {
        let s = c.status(id).await?;
        ensure!(
            s["term"].as_u64() == Some(term_before),
            "node {id} is at term {} (was {term_before}): the thawed follower campaigned",
            s["term"]
        );
        ensure!(
            s["leader_id"].as_u64() == Some(leader),
            "node {id} follows {} instead of {leader}",
            s["leader_id"]
        );
    }
    Ok(())
}
