//! The composition root of one raftmesh node: binds the listeners, opens
//! sled, builds Raft, starts the servers and runs startup and shutdown in a
//! deliberate order.
//!
//! Owns lifetimes and ordering only; no business logic.
//!
//! Startup: bind the listeners (so port 0 resolves before anything else) →
//! open sled → note whether the data dir already held Raft state → build the
//! stores and Raft → start the proxy (if `--proxy-addr`), serve peer RPCs
//! and the API → write `addrs.json` and the ready line → bootstrap, only if
//! the data dir was empty.
//!
//! Shutdown (on the `shutdown` future, i.e. SIGTERM/SIGINT): stop accepting
//! proxy connections and API requests and drain in-flight ones → stop
//! bootstrap → stop health
//! (probes, leader sweep) → stop the detector → shut Raft down
//! (no more proposals or replication) → stop the peer listener → flush sled.
//! Each wait is bounded so a stuck connection cannot hold the exit.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AgentConfig;
use crate::raft::detector::{self, ElectionTiming};
use crate::raft::log_store::{LogStore, Syncer};
use crate::raft::network::{NetworkFactory, PeerClient};
use crate::raft::speculate::Speculator;
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{bootstrap, PeerNode, Raft, RaftNode, Timing};

/// Bound on draining each server during shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound addresses, written to `<data-dir>/addrs.json` once listening.
#[derive(Debug, serde::Serialize)]
struct Ready<'a> {
    id: u64,
    name: &'a str,
    api_addr: String,
    peer_addr: String,
    /// The proxy's HTTP address, when the node runs one.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_addr: Option<String>,
    pid: u32,
    data_dir: String,
}

fn write_addrs(dir: &Path, ready: &Ready<'_>) -> anyhow::Result<()> {
    let tmp = dir.join("addrs.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(ready)?).context("writing addrs.json")?;
    std::fs::rename(&tmp, dir.join("addrs.json")).context("renaming addrs.json")?;
    Ok(())
}

fn election_timing(cfg: &AgentConfig) -> ElectionTiming {
    ElectionTiming {
        heartbeat: cfg.heartbeat,
        election_min: cfg.election_min,
        election_max: cfg.election_max,
    }
}

fn raft_config(cfg: &AgentConfig) -> anyhow::Result<openraft::Config> {
    let (heartbeat_interval, election_timeout_min, election_timeout_max) =
        election_timing(cfg).openraft_timeouts();
    let c = openraft::Config {
        cluster_name: "raftmesh".into(),
        heartbeat_interval,
        election_timeout_min,
        election_timeout_max,
        install_snapshot_timeout: 5000,
        snapshot_max_chunk_size: 1024 * 1024,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        // An entry holds up to `proposer::MAX_BATCH` writes; fewer entries
        // per AppendEntries keep each RPC well inside its timeout (the
        // heartbeat interval) while a follower catches up.
        max_payload_entries: 32,
        max_in_snapshot_log_to_keep: cfg.snapshot_keep_logs,
        ..Default::default()
    };
    c.validate().context("invalid raft configuration")
}

async fn drain(tracker: &TaskTracker, what: &str) {
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(what, "did not drain in time; continuing shutdown");
    }
}

/// Serves `app` on `listener` until `stop` is cancelled, tracked by `tasks`.
fn serve(
    tasks: &TaskTracker,
    listener: TcpListener,
    app: axum::Router,
    stop: &CancellationToken,
    what: &'static str,
) {
    let stop = stop.clone();
    tasks.spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, server = what, "server failed");
        }
    });
}

/// Runs a node until `shutdown` resolves, then shuts it down cleanly.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let api_listener = TcpListener::bind(cfg.api_addr)
        .await
        .with_context(|| format!("binding API address {}", cfg.api_addr))?;
    let peer_listener = TcpListener::bind(cfg.peer_addr)
        .await
        .with_context(|| format!("binding peer address {}", cfg.peer_addr))?;
    let proxy_listener = match cfg.proxy_addr {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding proxy address {a}"))?,
        ),
        None => None,
    };
    let api_addr = api_listener.local_addr()?;
    let peer_addr = peer_listener.local_addr()?;

    let dir = cfg.data_dir.path().to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sled_dir = dir.join("sled");
    let db = sled::Config::new()
        .path(&sled_dir)
        .cache_capacity(cfg.cache_bytes)
        .open()
        .with_context(|| format!("opening sled in {}", dir.display()))?;
    let had_state = LogStore::has_state(&db)?;

    let committed = Arc::new(AtomicU64::new(0));
    // One syncer (one handle on sled's file) serves the log and the state machine.
    let syncer = Syncer::new(&db, &sled_dir)?;
    let log_store = LogStore::open(&db, syncer.clone(), committed.clone())?;
    let sm = StateMachineStore::open(&db, syncer)
        .await
        .context("opening state machine")?;
    let shared = sm.shared();
    let client = PeerClient::new(peer_addr.ip())?;
    let config = raft_config(&cfg)?;
    // Early appends get openraft's AppendEntries budget.
    let speculator = Arc::new(Speculator::new(
        cfg.id,
        client.clone(),
        Duration::from_millis(config.heartbeat_interval),
    ));
    let raft = Raft::new(
        cfg.id,
        Arc::new(config),
        NetworkFactory {
            client: client.clone(),
            speculator: Some(speculator.clone()),
        },
        log_store
            .with_speculator(speculator.clone())
            .await
            .context("preparing the log")?,
        sm,
    )
    .await
    .context("starting raft")?;
    speculator.attach(raft.clone());
    let me = PeerNode {
        name: cfg.name.clone(),
        api_addr: api_addr.to_string(),
        peer_addr: peer_addr.to_string(),
    };
    let election = election_timing(&cfg);
    let timing = Timing {
        write_timeout: cfg.write_timeout,
        leader_wait: cfg.leader_wait,
        election,
    };
    let node = Arc::new(RaftNode::new(
        cfg.id,
        me.clone(),
        raft.clone(),
        shared,
        client,
        committed,
        timing,
    ));

    let health = crate::health::Health::new(node.clone(), cfg.node_fail_timeout)
        .context("building the health checker")?;

    let peer_stop = CancellationToken::new();
    let api_stop = CancellationToken::new();
    let peer_tasks = TaskTracker::new();
    let api_tasks = TaskTracker::new();
    let bootstrap_tasks = TaskTracker::new();
    serve(
        &peer_tasks,
        peer_listener,
        crate::raft::server::router(node.clone()).merge(crate::health::peer_router(health.clone())),
        &peer_stop,
        "peer",
    );
    // Reads the applied registry only; it runs the same with or without a
    // leader.
    let proxy = match proxy_listener {
        Some(l) => Some(
            crate::proxy::Proxy::start(node.shared().clone(), l).context("starting the proxy")?,
        ),
        None => None,
    };
    // Every stream definition runs on every node; events stay local.
    let streams = crate::stream::Streams::start(node.shared().clone(), proxy.clone())
        .context("starting streams")?;
    serve(
        &api_tasks,
        api_listener,
        crate::api::router(health.clone(), proxy.clone(), streams.clone()),
        &api_stop,
        "API",
    );

    // Heartbeats and elections: the detector owns them from here on.
    let detector_stop = CancellationToken::new();
    let detector_task = tokio::spawn(detector::run(node.clone(), election, detector_stop.clone()));
    let pinger = detector::spawn_pinger(
        node.clone(),
        peer_addr.ip(),
        election,
        detector_stop.clone(),
    )
    .context("starting the pinger thread")?;
    // TTL leases, member liveness and this node's HTTP/TCP checks.
    let health_stop = CancellationToken::new();
    let health_task = tokio::spawn(health.clone().run(health_stop.clone()));

    let ready = Ready {
        id: cfg.id,
        name: &cfg.name,
        api_addr: api_addr.to_string(),
        peer_addr: peer_addr.to_string(),
        proxy_addr: proxy.as_ref().map(|p| p.http_addr().to_string()),
        pid: std::process::id(),
        data_dir: dir.display().to_string(),
    };
    write_addrs(&dir, &ready)?;
    tracing::info!(
        "RAFTMESH_READY {}",
        serde_json::to_string(&ready).context("encoding ready line")?
    );

    if had_state {
        tracing::info!(dir = %dir.display(), "resuming from existing state; bootstrap flags ignored");
    } else if cfg.dev {
        raft.initialize(BTreeMap::from([(cfg.id, me)]))
            .await
            .context("initializing dev cluster")?;
    } else if let Some(expect) = cfg.bootstrap_expect {
        bootstrap_tasks.spawn(bootstrap::run(
            node.clone(),
            expect,
            cfg.join.clone(),
            api_stop.clone(),
        ));
    } else {
        tracing::info!("no state and no --bootstrap-expect: waiting to be added to a cluster");
    }

    shutdown.await;
    tracing::info!("shutting down: draining proxy and API");
    // The proxy drains alongside the API: both stop accepting now.
    let proxy_done = tokio::spawn(async move {
        if let Some(p) = proxy {
            p.shutdown().await;
        }
    });
    api_stop.cancel();
    // Blocking queries and watch streams end now instead of at their wait.
    node.shared().hub().close();
    // Producers are refused, buffered events drain, stream clients end.
    streams.shutdown().await;
    drain(&api_tasks, "API server").await;
    let _ = proxy_done.await;
    drain(&bootstrap_tasks, "bootstrap").await;
    health_stop.cancel();
    if tokio::time::timeout(DRAIN_TIMEOUT, health_task)
        .await
        .is_err()
    {
        tracing::warn!("health tasks did not stop in time; continuing shutdown");
    }
    drop(health);
    detector_stop.cancel();
    let _ = detector_task.await;
    // The pinger sees the same token; it finishes its current tick at most.
    let _ = tokio::task::spawn_blocking(move || pinger.join()).await;
    tracing::info!("shutting down: stopping raft");
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown reported an error");
    }
    peer_stop.cancel();
    drain(&peer_tasks, "peer server").await;
    db.flush_async().await.context("flushing sled")?;
    drop(node);
    tracing::info!("shutdown complete");
    Ok(())
}
