//! End-to-end test of the client subcommands: one real single-node cluster
//! (`raftmesh agent` on port 0 in a temp dir) driven by the same binary as a
//! client subprocess, exactly as a user would run it.
//!
//! Owns only this flow; the cluster behaviour itself is tested in
//! `tests/cluster.rs`. Every wait polls with a deadline; the node is killed
//! by pid at the end and, if the test fails half-way, by the drop guard.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Generous: CI is a noisy 2-core machine and the node elects itself first.
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const BIN: &str = env!("CARGO_BIN_EXE_raftmesh");

/// Kills the node when the test ends, however it ends.
struct NodeGuard {
    child: Child,
    log: PathBuf,
}

impl NodeGuard {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Fails at once if the node already exited (no point polling on).
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("node exited early ({status}); log:\n{}", self.log_tail());
        }
        Ok(())
    }
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        // Child::kill signals exactly this pid; errors mean it is already gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Output of one CLI run.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self, what: &str) -> Result<Self> {
        ensure!(
            self.status.success(),
            "`{what}` failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

/// Runs the client with a deadline. Output goes to files rather than pipes
/// so a chatty child can never block on a full pipe while we poll.
fn cli(dir: &Path, addr: &str, args: &[&str]) -> Result<Run> {
    let out_path = dir.join("cli.out");
    let err_path = dir.join("cli.err");
    let mut child = Command::new(BIN)
        .arg("--addr")
        .arg(addr)
        .args(args)
        // A RAFTMESH_ADDR from the developer's shell must not matter.
        .env_remove("RAFTMESH_ADDR")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .context("spawning the client")?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("client {args:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Run {
        status,
        stdout: std::fs::read_to_string(&out_path)?,
        stderr: std::fs::read_to_string(&err_path)?,
    })
}

/// Polls until `addrs.json` exists and parses, then returns its api_addr.
fn wait_for_api_addr(node: &mut NodeGuard, data_dir: &Path) -> Result<String> {
    let path = data_dir.join("addrs.json");
    let start = Instant::now();
    loop {
        node.check_alive()?;
        // The node writes it via tmp + rename, so a readable file is complete.
        if let Ok(text) = std::fs::read_to_string(&path) {
            let v: Value = serde_json::from_str(&text).context("addrs.json is not JSON")?;
            if let Some(api) = v.get("api_addr").and_then(Value::as_str) {
                return Ok(api.to_string());
            }
            bail!("addrs.json has no api_addr: {text}");
        }
        ensure!(
            start.elapsed() < WAIT,
            "no addrs.json within {WAIT:?}; log:\n{}",
            node.log_tail()
        );
        std::thread::sleep(POLL);
    }
}

/// Polls `GET /v1/cluster/status` until it names a leader.
async fn wait_for_leader(node: &mut NodeGuard, api: &str) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()?;
    let url = format!("http://{api}/v1/cluster/status");
    let start = Instant::now();
    loop {
        node.check_alive()?;
        let last = match http.get(&url).send().await {
            Ok(resp) => match resp.json::<Value>().await {
                Ok(v) if v.get("leader_id").is_some_and(|l| !l.is_null()) => return Ok(()),
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        ensure!(
            start.elapsed() < WAIT,
            "no leader within {WAIT:?} (last: {last}); log:\n{}",
            node.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn client_commands_against_a_single_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let log = dir.path().join("node.log");
    let child = Command::new(BIN)
        .args([
            "agent",
            "--id",
            "1",
            "--bootstrap-expect",
            "1",
            "--data-dir",
        ])
        .arg(&data_dir)
        .args(["--api-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log)?)
        .spawn()
        .context("spawning the node")?;
    let mut node = NodeGuard { child, log };

    let api = wait_for_api_addr(&mut node, &data_dir)?;
    wait_for_leader(&mut node, &api).await?;
    let d = dir.path();

    let run = cli(
        d,
        &api,
        &[
            "register", "--name", "web", "--id", "web-1", "--port", "8080", "--tag", "a",
        ],
    )?
    .ok("register")?;
    ensure!(
        run.stdout.starts_with("registered web-1 (index "),
        "register printed {:?}",
        run.stdout
    );

    let run = cli(d, &api, &["service", "web", "--json"])?.ok("service --json")?;
    let v: Value = serde_json::from_str(&run.stdout).context("service --json is not JSON")?;
    ensure!(
        run.stdout.contains("web-1"),
        "service --json: {}",
        run.stdout
    );
    ensure!(
        v.as_array().is_some_and(|a| a.len() == 1),
        "one instance: {v}"
    );

    let run = cli(d, &api, &["service", "web"])?.ok("service")?;
    let lines: Vec<&str> = run.stdout.lines().collect();
    ensure!(
        lines.first().is_some_and(|h| h.starts_with("ID")) && lines.len() == 2,
        "service table: {:?}",
        run.stdout
    );
    ensure!(
        lines[1].starts_with("web-1") && lines[1].contains("8080") && lines[1].ends_with('a'),
        "service row: {:?}",
        lines[1]
    );

    let run = cli(d, &api, &["services"])?.ok("services")?;
    ensure!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("web ") && l.ends_with('a')),
        "services: {:?}",
        run.stdout
    );

    let run = cli(d, &api, &["members"])?.ok("members")?;
    let row = run.stdout.lines().nth(1).unwrap_or_default();
    ensure!(
        row.starts_with("1 ")
            && row.contains("node1")
            && row.contains("voter")
            && row.contains('*'),
        "members: {:?}",
        run.stdout
    );

    let run = cli(d, &api, &["status"])?.ok("status")?;
    for want in ["node_id: 1", "role: leader", "leader_id: 1"] {
        ensure!(
            run.stdout.lines().any(|l| l == want),
            "status lacks {want:?}: {:?}",
            run.stdout
        );
    }

    let run = cli(d, &api, &["deregister", "web-1"])?.ok("deregister")?;
    ensure!(
        run.stdout.starts_with("deregistered web-1"),
        "deregister printed {:?}",
        run.stdout
    );
    let run = cli(d, &api, &["service", "web", "--json"])?.ok("service after deregister")?;
    let v: Value = serde_json::from_str(&run.stdout)?;
    ensure!(v == Value::Array(vec![]), "still listed: {v}");

    // A server-side validation error: non-zero exit, the status and message.
    let run = cli(d, &api, &["register", "--name", "bad name"])?;
    ensure!(!run.status.success(), "bad name was accepted");
    ensure!(
        run.stderr.contains("400"),
        "no status in error: {:?}",
        run.stderr
    );

    // Nothing listens on port 1: a readable error naming the address.
    let run = cli(d, "127.0.0.1:1", &["members"])?;
    ensure!(!run.status.success(), "closed port reported success");
    ensure!(
        run.stderr.contains("cannot reach raftmesh at 127.0.0.1:1"),
        "unhelpful error: {:?}",
        run.stderr
    );

    node.check_alive()?;
    drop(node);
    Ok(())
}
