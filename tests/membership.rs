//! Membership and bootstrap scenarios for the `raftmesh` binary: a fresh node
//! pointed at a running cluster never initializes a cluster of its own; it
//! joins through `POST /v1/cluster/members` (sent to a follower, so the
//! change is forwarded to the leader), catches up and becomes a voter, and
//! leaves again through `DELETE`. Also `agent --dev`: one bootstrapped node in
//! a temporary data dir that is gone after a clean SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use common::{eventually, Cluster, WAIT};

async fn members(c: &Cluster, via: u64) -> Result<Vec<Value>> {
    let v = c
        .get(via, "/v1/cluster/members")
        .await?
        .expect_200("members")?
        .json()?;
    Ok(v.as_array().context("members is not a list")?.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_node_never_bootstraps_and_joins_through_a_follower() -> Result<()> {
    let mut c = Cluster::with_size(4, &[])?;
    let r = run_join(&mut c).await;
    c.finish(r)
}

async fn run_join(c: &mut Cluster) -> Result<()> {
    let leader = c.form_ids(&[1, 2, 3]).await?;
    let follower = [1, 2, 3]
        .into_iter()
        .find(|id| *id != leader)
        .context("a follower")?;
    c.register(1, &json!({"Name": "web", "ID": "web-1", "Port": 80}))
        .await?
        .expect_200("register web-1")?;

    // Node 4 has an empty data dir and would be satisfied alone
    // (--bootstrap-expect 1), but the node it contacts is initialized.
    let api1 = c.api_addr(1)?;
    c.add_flags(4, &["--bootstrap-expect", "1", "--join", &api1])?;
    c.start(4).await?;
    let observe_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < observe_until {
        let s = c.status(4).await?;
        ensure!(
            s["term"] == 0 && s["leader_id"].is_null(),
            "node 4 formed or joined a cluster on its own: {s}"
        );
        tokio::time::sleep(common::POLL).await;
    }
    ensure!(
        members(c, leader).await?.len() == 3,
        "the cluster changed before node 4 was added"
    );

    // Bad requests are refused and change nothing.
    for bad in [
        json!({"id": 4}),
        json!({"id": 0, "api_addr": "127.0.0.1:1", "peer_addr": "127.0.0.1:2"}),
        json!({"id": 4, "api_addr": "nope", "peer_addr": "127.0.0.1:2"}),
    ] {
        let url = c.url(follower, "/v1/cluster/members")?;
        let r = c.send("bad add", c.client().post(&url).json(&bad)).await?;
        ensure!(r.status == 400, "{bad} answered {} {}", r.status, r.body);
        ensure!(r.json()?["error"] == "bad_request", "{}", r.body);
    }

    let a4 = c.node(4)?.addrs.clone().context("node 4 addrs")?;
    let url = c.url(follower, "/v1/cluster/members")?;
    let body =
        json!({"id": 4, "name": "node4", "api_addr": a4.api_addr, "peer_addr": a4.peer_addr});
    let r = c
        .send("add node 4", c.client().post(&url).json(&body))
        .await?;
    ensure!(r.status == 200, "add node 4: {} {}", r.status, r.body);

    c.eventually(
        WAIT,
        "node 4 to be a voter that sees the leader and the data",
        async || {
            let s = c.status(4).await?;
            ensure!(s["leader_id"] == leader, "node 4 status {s}");
            let m = members(c, follower).await?;
            let n4 = m
                .iter()
                .find(|m| m["id"] == 4)
                .context("node 4 not a member yet")?;
            ensure!(n4["voter"] == true, "node 4 not a voter: {n4}");
            let ids = c.catalog_ids(4, "web", "?stale").await?;
            ensure!(ids.contains("web-1"), "node 4 catalog {ids:?}");
            Ok(())
        },
    )
    .await?;
    // Members answered by any node in default mode come from the leader,
    // which alone knows how far each member has replicated.
    let m = members(c, follower).await?;
    ensure!(m.len() == 4, "members {m:?}");
    ensure!(
        m.iter().all(|m| m["matched_index"].as_u64().is_some()),
        "matched indexes missing: {m:?}"
    );

    // Removal through another follower.
    let other = [1, 2, 3]
        .into_iter()
        .find(|id| *id != leader && *id != follower)
        .context("second follower")?;
    let url = c.url(other, "/v1/cluster/members/4")?;
    let r = c.send("remove node 4", c.client().delete(&url)).await?;
    ensure!(r.status == 200, "remove node 4: {} {}", r.status, r.body);
    c.eventually(WAIT, "node 4 to leave the membership", async || {
        let m = members(c, leader).await?;
        ensure!(m.iter().all(|m| m["id"] != 4), "members {m:?}");
        Ok(())
    })
    .await?;
    let url = c.url(other, "/v1/cluster/members/9")?;
    let r = c.send("remove unknown", c.client().delete(&url)).await?;
    ensure!(
        r.status == 404,
        "remove unknown node: {} {}",
        r.status,
        r.body
    );
    Ok(())
}

/// Kills the dev node if the test fails before it exits.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_is_one_bootstrapped_node_with_a_temporary_dir() -> Result<()> {
    let logdir = tempfile::tempdir()?;
    let log = logdir.path().join("dev.log");
    let file = std::fs::File::create(&log)?;
    let child = Command::new(env!("CARGO_BIN_EXE_raftmesh"))
        .args([
            "agent",
            "--dev",
            "--api-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()?;
    let mut guard = Guard(child);
    let pid = guard.0.id();
    let ready: Value = eventually(WAIT, "the dev node's ready line", async || {
        let text = std::fs::read_to_string(&log)?;
        let line = text
            .lines()
            .find_map(|l| l.split_once("RAFTMESH_READY ").map(|(_, j)| j.to_string()))
            .context("no ready line yet")?;
        Ok(serde_json::from_str(&line)?)
    })
    .await?;
    ensure!(
        ready["pid"] == pid,
        "ready line of another process: {ready}"
    );
    let api = ready["api_addr"].as_str().context("api_addr")?.to_string();
    let dir = std::path::PathBuf::from(ready["data_dir"].as_str().context("data_dir")?);
    ensure!(
        dir.join("sled").exists(),
        "no sled database in {}",
        dir.display()
    );

    let http = common::client(Duration::from_secs(10))?;
    let r = eventually(WAIT, "a write to the dev node", async || {
        let r = http
            .put(format!("http://{api}/v1/agent/service/register"))
            .body(r#"{"Name":"dev-svc","Port":1}"#)
            .send()
            .await?;
        ensure!(r.status() == 200, "status {}", r.status());
        Ok(r)
    })
    .await?;
    ensure!(r.headers().contains_key("x-consul-index"));
    let v: Value = http
        .get(format!("http://{api}/v1/catalog/service/dev-svc"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(v[0]["ServiceID"] == "dev-svc", "catalog {v}");

    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(st.success(), "kill -TERM failed");
    let status = eventually(WAIT, "the dev node to exit", async || {
        guard.0.try_wait()?.context("still running")
    })
    .await?;
    if !status.success() {
        bail!(
            "dev node exited with {status}: {}",
            std::fs::read_to_string(&log)?
        );
    }
    ensure!(!dir.exists(), "dev data dir {} left behind", dir.display());
    Ok(())
}
