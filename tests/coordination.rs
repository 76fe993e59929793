//! End-to-end coordination tests, driven by a third-party Consul client (`rs-consul`) wherever
//! it has a call: blocking KV and health queries across nodes, `X-Consul-Index` across a
//! leader failover, CAS under contention through every node, and locks released by a session
//! TTL lapse and by the holder's node dying. Plain HTTP only where rs-consul has no call
//! (agent service registration, check heartbeats, session renewal) and for bad input.
//! Real processes on port 0, one temp data dir per node.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::{Cluster, WAIT};
use rs_consul::{
    ConsistencyMode, Consul, ConsulError, CreateOrUpdateKeyRequest, DeleteKeyRequest,
    GetServiceNodesRequest, LockRequest, QueryOptions, ReadKeyRequest,
};
use serde_json::{json, Value};

/// Node-failure timeout for the test that kills a lock holder's node.
const FAIL_FLAGS: [&str; 2] = ["--node-fail-timeout-ms", "1000"];

fn consul(c: &Cluster, id: u64) -> Result<Consul> {
    Ok(Consul::new(rs_consul::Config {
        address: format!("http://{}", c.api_addr(id)?),
        ..Default::default()
    }))
}

async fn put(consul: &Consul, key: &str, value: &str, cas: Option<i64>) -> Result<(bool, u64)> {
    let req = CreateOrUpdateKeyRequest {
        key,
        check_and_set: cas,
        ..Default::default()
    };
    consul
        .create_or_update_key(req, value.as_bytes().to_vec())
        .await
        .with_context(|| format!("put {key}"))
}

/// One key with its value decoded (rs-consul decodes base64 to UTF-8), plus the index.
async fn get(
    consul: &Consul,
    key: &str,
    consistency: ConsistencyMode,
    index: Option<u64>,
    wait: Duration,
) -> Result<(rs_consul::ReadKeyResponse, u64)> {
    let req = ReadKeyRequest {
        key,
        consistency,
        index,
        wait,
        ..Default::default()
    };
    let meta = consul
        .read_key(req)
        .await
        .with_context(|| format!("read {key}"))?;
    let one = meta
        .response
        .into_iter()
        .next()
        .with_context(|| format!("no entry for {key}"))?;
    Ok((one, meta.index))
}

/// Test 1: a blocking KV read on node 3 sleeps until a write through node 1, then wakes with
/// the new value and a higher index; the same for a health `?passing` query on a check
/// turning passing, and a catalog read sees the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries_on_one_node_wake_on_writes_through_another() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        c.form().await?;
        let (n1, n3) = (consul(&c, 1)?, consul(&c, 3)?);
        let (ok, _) = put(&n1, "config/mode", "a", None).await?;
        ensure!(ok, "first put refused");
        let (first, index) = get(
            &n3,
            "config/mode",
            ConsistencyMode::Default,
            None,
            Duration::ZERO,
        )
        .await?;
        ensure!(first.value.as_deref() == Some("a"), "node 3 read {first:?}");
        ensure!(index >= 1, "X-Consul-Index {index}");

        // An unrelated write (another kind) must not wake a KV watcher.
        let watcher = {
            let n3 = consul(&c, 3)?;
            tokio::spawn(async move {
                let t = Instant::now();
                let r = get(
                    &n3,
                    "config/mode",
                    ConsistencyMode::Default,
                    Some(index),
                    Duration::from_secs(30),
                )
                .await;
                (r, t.elapsed())
            })
        };
        c.register(1, &json!({"Name": "other", "ID": "o1"}))
            .await?
            .expect_200("unrelated registration")?;
        let mut watcher = watcher;
        ensure!(
            tokio::time::timeout(Duration::from_millis(700), &mut watcher)
                .await
                .is_err(),
            "the blocking read returned without a KV change"
        );
        let wrote = Instant::now();
        let (ok, write_index) = put(&n1, "config/mode", "b", None).await?;
        ensure!(ok, "second put refused");
        let (r, _) = tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .context("blocking read did not wake within 10 s of the write")??;
        let (entry, woke_index) = r?;
        ensure!(entry.value.as_deref() == Some("b"), "woke with {entry:?}");
        ensure!(
            woke_index > index && woke_index >= write_index,
            "woke at index {woke_index}, asked {index}, write {write_index}"
        );
        eprintln!(
            "KV watcher on node 3 woke {:?} after the write",
            wrote.elapsed()
        );

        // A missing key is a 404 that still carries X-Consul-Index.
        let missing = c.get(2, "/v1/kv/no/such/key").await?;
        ensure!(missing.status == 404, "missing key: {}", missing.status);
        ensure!(missing.index()? >= 1, "404 without a usable X-Consul-Index");

        // Health ?passing with a blocking index, through rs-consul.
        c.register(
            1,
            &json!({"Name": "api", "ID": "api-1", "Port": 7001, "Check": {"TTL": "30s"},
                    "Weights": {"Passing": 10, "Warning": 2}}),
        )
        .await?
        .expect_200("register api-1")?;
        let req = GetServiceNodesRequest {
            service: "api",
            passing: true,
            ..Default::default()
        };
        let before = n3.get_service_nodes(req.clone(), None).await?;
        ensure!(
            before.response.is_empty(),
            "critical instance listed as passing"
        );
        let health_watch = {
            let n3 = consul(&c, 3)?;
            let index = before.index;
            tokio::spawn(async move {
                let opts = QueryOptions {
                    index: Some(index),
                    wait: Some(Duration::from_secs(20)),
                    timeout: Some(Duration::from_secs(30)),
                    ..Default::default()
                };
                n3.get_service_nodes(
                    GetServiceNodesRequest {
                        service: "api",
                        passing: true,
                        ..Default::default()
                    },
                    Some(opts),
                )
                .await
            })
        };
        c.put_raw(2, "/v1/agent/check/pass/service:api-1", String::new())
            .await?
            .expect_200("pass api-1")?;
        let after = tokio::time::timeout(Duration::from_secs(10), health_watch)
            .await
            .context("health blocking query did not wake")???;
        ensure!(
            after.index > before.index,
            "index {} -> {}",
            before.index,
            after.index
        );
        let ids: Vec<&str> = after
            .response
            .iter()
            .map(|n| n.service.id.as_str())
            .collect();
        ensure!(ids == ["api-1"], "passing after the heartbeat: {ids:?}");
        ensure!(after.response[0].service.port == 7001, "port");
        let cat: Value = c
            .get(2, "/v1/catalog/service/api")
            .await?
            .expect_200("catalog api")?
            .json()?;
        ensure!(
            cat[0]["ServiceWeights"] == json!({"Passing": 10, "Warning": 2}),
            "weights: {cat}"
        );
        let bad = c
            .register(2, &json!({"Name": "w", "Weights": {"Passing": 0}}))
            .await?;
        ensure!(
            bad.status == 400,
            "Weights.Passing 0 accepted: {}",
            bad.status
        );

        let names = consul(&c, 2)?
            .get_all_registered_service_names(None)
            .await?;
        ensure!(
            names.response.contains(&"api".to_string())
                && names.response.contains(&"other".to_string()),
            "catalog services: {:?}",
            names.response
        );
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Test 2: `X-Consul-Index` as a follower reports it never goes backwards while the leader is
/// killed and writes continue through a survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_index_never_decreases_on_a_follower_across_failover() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        c.form().await?;
        let leader = c.wait_for_leader(&c.ids()).await?;
        let survivors: Vec<u64> = c.ids().into_iter().filter(|i| *i != leader).collect();
        let (watched, writer) = (survivors[0], survivors[1]);
        let reader = consul(&c, watched)?;
        let w = consul(&c, writer)?;
        let mut seen: Vec<u64> = Vec::new();
        let sample = async |seen: &mut Vec<u64>| {
            for mode in [ConsistencyMode::Stale, ConsistencyMode::Default] {
                // Errors (no leader yet) are expected mid-failover; answers must be monotonic.
                if let Ok((_, idx)) = get(&reader, "ctr", mode, None, Duration::ZERO).await {
                    seen.push(idx);
                }
            }
        };
        for i in 0..5 {
            put(&w, "ctr", &i.to_string(), None).await?;
            sample(&mut seen).await;
        }
        c.kill(leader)?;
        let killed = Instant::now();
        let mut written_after = 0;
        while written_after < 5 {
            ensure!(
                killed.elapsed() < WAIT,
                "no write succeeded after the kill within {WAIT:?}"
            );
            if put(&w, "ctr", &format!("after-{written_after}"), None)
                .await
                .is_ok()
            {
                written_after += 1;
            }
            sample(&mut seen).await;
        }
        for _ in 0..5 {
            sample(&mut seen).await;
        }
        ensure!(seen.len() >= 10, "too few answers: {seen:?}");
        for pair in seen.windows(2) {
            ensure!(
                pair[1] >= pair[0],
                "X-Consul-Index went backwards on node {watched}: {seen:?}"
            );
        }
        ensure!(seen.iter().all(|i| *i >= 1), "an index below 1: {seen:?}");
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Test 4: clients on every node increment one counter by read + `?cas=`; the final value is
/// the number of CAS writes that answered `true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_increments_under_contention_through_every_node() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        c.form().await?;
        let (created, _) = put(&consul(&c, 1)?, "counter", "0", Some(0)).await?;
        ensure!(created, "cas=0 create refused");
        let (again, _) = put(&consul(&c, 2)?, "counter", "0", Some(0)).await?;
        ensure!(!again, "cas=0 on an existing key succeeded");
        const ATTEMPTS: usize = 25;
        let mut tasks = Vec::new();
        for id in c.ids() {
            for _ in 0..2 {
                let client = consul(&c, id)?;
                tasks.push(tokio::spawn(async move {
                    let mut wins = 0u64;
                    for _ in 0..ATTEMPTS {
                        let (e, _) = get(
                            &client,
                            "counter",
                            ConsistencyMode::Default,
                            None,
                            Duration::ZERO,
                        )
                        .await?;
                        let v: u64 = e
                            .value
                            .as_deref()
                            .unwrap_or("")
                            .parse()
                            .context("counter value")?;
                        let cas = e.modify_index;
                        let (ok, _) =
                            put(&client, "counter", &(v + 1).to_string(), Some(cas)).await?;
                        wins += u64::from(ok);
                    }
                    anyhow::Ok(wins)
                }));
            }
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let (e, _) = get(
            &consul(&c, 3)?,
            "counter",
            ConsistencyMode::Default,
            None,
            Duration::ZERO,
        )
        .await?;
        let value: u64 = e.value.as_deref().unwrap_or("").parse()?;
        ensure!(
            value == total,
            "counter is {value}, successful CAS writes {total}"
        );
        ensure!(total > 0, "no CAS increment succeeded");
        eprintln!("{total} of {} CAS increments won", ATTEMPTS * 6);
        // The final value alone would also hold if `?cas` were ignored and the
        // clients never interleaved: a stale index must be refused.
        let stale = e.modify_index - 1;
        let (ok, _) = put(&consul(&c, 2)?, "counter", "stale", Some(stale)).await?;
        ensure!(!ok, "a PUT with a stale ?cas ({stale}) was accepted");
        // Deletes through rs-consul: a stale ?cas refuses, the current one removes the key,
        // and a blocked reader on another node sees it go (404 with a higher index).
        let (e, index) = get(
            &consul(&c, 1)?,
            "counter",
            ConsistencyMode::Default,
            None,
            Duration::ZERO,
        )
        .await?;
        let n2 = consul(&c, 2)?;
        let stale = DeleteKeyRequest {
            key: "counter",
            check_and_set: u32::try_from(e.modify_index - 1)?,
            ..Default::default()
        };
        ensure!(
            !n2.delete_key(stale).await?,
            "delete with a stale cas succeeded"
        );
        let blocked = {
            let url = c.url(3, &format!("/v1/kv/counter?index={index}&wait=20s"))?;
            let http = c.client().clone();
            tokio::spawn(async move { http.get(url).send().await })
        };
        let current = DeleteKeyRequest {
            key: "counter",
            check_and_set: u32::try_from(e.modify_index)?,
            ..Default::default()
        };
        ensure!(
            n2.delete_key(current).await?,
            "delete with the current cas refused"
        );
        let woke = tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .context("the blocked read did not wake on the delete")???;
        ensure!(woke.status() == 404, "after the delete: {}", woke.status());
        let woke_index: u64 = woke
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .context("X-Consul-Index on the 404")?;
        ensure!(
            woke_index > index,
            "404 at index {woke_index}, asked {index}"
        );
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Session + lock state of `key` as node `id` reads it.
async fn holder(c: &Cluster, id: u64, key: &str) -> Result<(Option<String>, u64)> {
    let v: Value = c
        .get(id, &format!("/v1/kv/{key}"))
        .await?
        .expect_200("read lock key")?
        .json()?;
    let e = &v[0];
    Ok((
        e["Session"].as_str().map(str::to_string),
        e["LockIndex"].as_u64().context("LockIndex")?,
    ))
}

/// Test 5: a lock is released when its session's TTL lapses, and when the holder's node is
/// killed; another session then takes it and `LockIndex` (the fencing token) grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_released_by_ttl_lapse_and_by_the_holders_node_dying() -> Result<()> {
    let mut c = Cluster::new(&FAIL_FLAGS)?;
    let r = async {
        c.form().await?;
        let (n2, n3) = (consul(&c, 2)?, consul(&c, 3)?);
        let lock_req = |key| LockRequest {
            key,
            timeout: Duration::from_secs(10),
            lock_delay: Duration::ZERO,
            ..Default::default()
        };
        // --- TTL lapse: rs-consul's lock makes a 10 s session and never renews it.
        let held = n2.get_lock(lock_req("locks/ttl"), b"n2").await?;
        let (sess, idx1) = holder(&c, 1, "locks/ttl").await?;
        ensure!(
            sess.as_deref() == Some(held.session_id.as_str()) && idx1 == 1,
            "after acquire: {sess:?} {idx1}"
        );
        match n3.get_lock(lock_req("locks/ttl"), b"n3").await {
            Err(ConsulError::LockAcquisitionFailure(_)) => {}
            Err(e) => bail!("second acquire failed oddly: {e}"),
            Ok(_) => bail!("a held lock was acquired by another session"),
        }
        let acquired = Instant::now();
        c.eventually(WAIT, "the TTL lapse to release locks/ttl", async || {
            let (s, _) = holder(&c, 3, "locks/ttl").await?;
            ensure!(s.is_none(), "still held by {s:?}");
            Ok(())
        })
        .await?;
        ensure!(
            acquired.elapsed() >= Duration::from_secs(9),
            "released {:?} after acquiring, before the 10 s TTL",
            acquired.elapsed()
        );
        let sessions: Value = c
            .get(1, "/v1/session/list")
            .await?
            .expect_200("list")?
            .json()?;
        ensure!(
            !sessions
                .as_array()
                .context("list")?
                .iter()
                .any(|s| s["ID"] == held.session_id.as_str()),
            "expired session still listed: {sessions}"
        );
        let next = n3.get_lock(lock_req("locks/ttl"), b"n3").await?;
        let (s, idx2) = holder(&c, 2, "locks/ttl").await?;
        ensure!(
            s.as_deref() == Some(next.session_id.as_str()) && idx2 == 2,
            "after re-acquire: {s:?} {idx2}"
        );
        // Dropping rs-consul's locks releases them (blocking calls in Drop).
        drop(held);
        drop(next);

        // --- Holder's node dies: a session made through node 2 is bound to node 2; its TTL
        // (60 s, renewed) is far away, so only the node failure can release the lock.
        let created: Value = c
            .put_raw(
                2,
                "/v1/session/create",
                json!({"Name": "n2-lock", "TTL": "60s", "LockDelay": "0s"}).to_string(),
            )
            .await?
            .expect_200("session create")?
            .json()?;
        let sid = created["ID"].as_str().context("session ID")?.to_string();
        let info: Value = c
            .get(3, &format!("/v1/session/info/{sid}"))
            .await?
            .expect_200("info")?
            .json()?;
        ensure!(
            info[0]["Node"] == "node2",
            "session not bound to node2: {info}"
        );
        let acquire = CreateOrUpdateKeyRequest {
            key: "locks/node",
            acquire: &sid,
            ..Default::default()
        };
        let (ok, _) = n2.create_or_update_key(acquire, b"n2".to_vec()).await?;
        ensure!(ok, "acquire through node 2 refused");
        let (_, idx) = holder(&c, 1, "locks/node").await?;
        ensure!(idx == 1, "LockIndex {idx}");
        c.kill(2)?;
        let killed = Instant::now();
        let n1 = consul(&c, 1)?;
        let session3: Value = c
            .put_raw(
                3,
                "/v1/session/create",
                json!({"TTL": "60s", "LockDelay": "0s"}).to_string(),
            )
            .await?
            .expect_200("session on node 3")?
            .json()?;
        let sid3 = session3["ID"].as_str().context("ID")?.to_string();
        c.eventually(WAIT, "node 2's failure to release locks/node", async || {
            let req = CreateOrUpdateKeyRequest {
                key: "locks/node",
                acquire: &sid3,
                ..Default::default()
            };
            let (ok, _) = n1.create_or_update_key(req, b"n3".to_vec()).await?;
            ensure!(ok, "still held");
            Ok(())
        })
        .await?;
        ensure!(
            killed.elapsed() < Duration::from_secs(50),
            "released only after {:?}",
            killed.elapsed()
        );
        let (s, idx) = holder(&c, 3, "locks/node").await?;
        ensure!(
            s.as_deref() == Some(sid3.as_str()) && idx == 2,
            "after takeover: {s:?} {idx}"
        );
        Ok(())
    }
    .await;
    c.finish(r)
}

/// A lock freed by invalidating its session stays unavailable for the session's `LockDelay`;
/// one freed by `?release` is available at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_delay_holds_back_a_lock_freed_by_invalidation() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        c.form().await?;
        let session = async |via: u64, delay: &str| -> Result<String> {
            let v: Value = c
                .put_raw(
                    via,
                    "/v1/session/create",
                    json!({ "LockDelay": delay }).to_string(),
                )
                .await?
                .expect_200("session create")?
                .json()?;
            Ok(v["ID"].as_str().context("ID")?.to_string())
        };
        let acquire = async |via: u64, sid: &str| -> Result<bool> {
            let req = CreateOrUpdateKeyRequest {
                key: "locks/delay",
                acquire: sid,
                ..Default::default()
            };
            Ok(consul(&c, via)?
                .create_or_update_key(req, b"v".to_vec())
                .await?
                .0)
        };
        let a = session(1, "3s").await?;
        ensure!(acquire(1, &a).await?, "first acquire");
        c.put_raw(2, &format!("/v1/session/destroy/{a}"), String::new())
            .await?
            .expect_200("destroy")?;
        let destroyed = Instant::now();
        let b = session(3, "0s").await?;
        ensure!(!acquire(3, &b).await?, "acquired during the lock delay");
        c.eventually(WAIT, "the lock delay to pass", async || {
            ensure!(acquire(3, &b).await?, "not yet");
            Ok(())
        })
        .await?;
        ensure!(
            destroyed.elapsed() >= Duration::from_secs(2),
            "acquired {:?} after the destroy, inside a 3 s lock delay",
            destroyed.elapsed()
        );
        let (_, idx) = holder(&c, 1, "locks/delay").await?;
        ensure!(idx == 2, "LockIndex {idx}");
        // An explicit release starts no delay.
        let release = CreateOrUpdateKeyRequest {
            key: "locks/delay",
            release: &b,
            ..Default::default()
        };
        ensure!(
            consul(&c, 2)?
                .create_or_update_key(release, Vec::new())
                .await?
                .0,
            "release"
        );
        let d = session(2, "15s").await?;
        ensure!(acquire(2, &d).await?, "acquire right after a release");
        Ok(())
    }
    .await;
    c.finish(r)
}

/// Bad input to the KV and session endpoints is a 4xx with a JSON body, and nothing is
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_kv_and_session_input_is_rejected_and_changes_nothing() -> Result<()> {
    let mut c = Cluster::new(&[])?;
    let r = async {
        c.form().await?;
        let big = "x".repeat(512 * 1024 + 1);
        let cases: Vec<(&str, String, String, u16)> = vec![
            ("value over 512 KiB", "/v1/kv/big".into(), big, 413),
            ("bad cas", "/v1/kv/k?cas=abc".into(), "v".into(), 400),
            ("bad flags", "/v1/kv/k?flags=-1".into(), "v".into(), 400),
            (
                "unknown session",
                "/v1/kv/k?acquire=nope".into(),
                "v".into(),
                400,
            ),
            (
                "acquire and release",
                "/v1/kv/k?acquire=a&release=b".into(),
                "v".into(),
                400,
            ),
            (
                "short TTL",
                "/v1/session/create".into(),
                r#"{"TTL":"5s"}"#.into(),
                400,
            ),
            (
                "bad behavior",
                "/v1/session/create".into(),
                r#"{"Behavior":"explode"}"#.into(),
                400,
            ),
            (
                "unknown node",
                "/v1/session/create".into(),
                r#"{"Node":"nosuch"}"#.into(),
                400,
            ),
            (
                "malformed JSON",
                "/v1/session/create".into(),
                "{".into(),
                400,
            ),
        ];
        for (what, path, body, want) in cases {
            let r = c.put_raw(2, &path, body).await?;
            ensure!(
                r.status == want,
                "{what}: status {} body {}",
                r.status,
                r.body
            );
            let v = r
                .json()
                .with_context(|| format!("{what}: body is not JSON"))?;
            ensure!(
                v["error"].is_string() && v["message"].is_string(),
                "{what}: {v}"
            );
        }
        let bad_wait = c.get(1, "/v1/kv/k?index=1&wait=soon").await?;
        ensure!(bad_wait.status == 400, "bad wait: {}", bad_wait.status);
        let missing = c.get(1, "/v1/kv/k").await?;
        ensure!(missing.status == 404, "a rejected write left key k behind");
        let renew = c
            .put_raw(3, "/v1/session/renew/nope", String::new())
            .await?;
        ensure!(
            renew.status == 404,
            "renew unknown session: {}",
            renew.status
        );
        let sessions: Value = c
            .get(1, "/v1/session/list")
            .await?
            .expect_200("list")?
            .json()?;
        ensure!(
            sessions == json!([]),
            "rejected creates made sessions: {sessions}"
        );
        // Still serving.
        let (ok, _) = put(&consul(&c, 2)?, "k", "v", None).await?;
        ensure!(ok, "node 2 stopped taking writes");
        Ok(())
    }
    .await;
    c.finish(r)
}
