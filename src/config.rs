//! Command-line configuration of `raftmesh agent`, with documented defaults
//! and `validate()`, which turns flags into a checked `AgentConfig`.
//!
//! Owns flag names and defaults; does not bind sockets or open files
//! (`node.rs` does).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Flags of `raftmesh agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Node id, unique in the cluster (>= 1). Required unless --dev.
    #[arg(long)]
    pub id: Option<u64>,
    /// Human-readable node name; defaults to "node<id>".
    #[arg(long)]
    pub name: Option<String>,
    /// Client API listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8500")]
    pub api_addr: SocketAddr,
    /// Peer (Raft RPC) listen address; its IP is also the source address of
    /// outbound peer connections.
    #[arg(long, default_value = "127.0.0.1:8300")]
    pub peer_addr: SocketAddr,
    /// Serve the replicated routes here: HTTP routes on this address, TCP
    /// routes on their `listen_port` at its IP (port 0 picks a free port
    /// for HTTP). No proxy without it.
    #[arg(long)]
    pub proxy_addr: Option<SocketAddr>,
    /// Data directory (sled database, addrs.json). Required unless --dev.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// On first start, wait until this many nodes know each other, then the
    /// lowest id initializes the cluster with all of them as voters.
    #[arg(long)]
    pub bootstrap_expect: Option<usize>,
    /// API addresses of other nodes to contact on first start.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub join: Vec<String>,
    /// One bootstrapped node with data in a temporary directory.
    #[arg(long)]
    pub dev: bool,
    /// How often the leader sends each follower a heartbeat. openraft's
    /// AppendEntries timeout is twice this, so a follower slowed by its disk
    /// is not cut off.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// A voter that hears no leader for a random time in [min, max) asks
    /// the others for a pre-vote and, with a majority, campaigns. Voters
    /// refuse real votes until min minus half a heartbeat (the leader lease)
    /// after their last contact. At least twice the heartbeat.
    #[arg(long, default_value_t = 150)]
    pub election_min_ms: u64,
    /// Upper end of the election wait.
    #[arg(long, default_value_t = 250)]
    pub election_max_ms: u64,
    /// Build a snapshot every N applied entries; the log is purged behind it.
    /// An entry carries up to 256 batched writes, so the log between
    /// snapshots can be large under load: keep N modest.
    #[arg(long, default_value_t = 1000)]
    pub snapshot_every: u64,
    /// Entries kept in the log behind the latest snapshot.
    #[arg(long, default_value_t = 100)]
    pub snapshot_keep_logs: u64,
    /// How long a write waits for its commit before answering 504.
    #[arg(long, default_value_t = 5000)]
    pub write_timeout_ms: u64,
    /// How long a request waits for a leader before answering 503.
    #[arg(long, default_value_t = 3000)]
    pub leader_wait_ms: u64,
    /// Async worker threads; 0 (the default) means half the machine's
    /// cores, at least one. Why half: a node's Raft log flusher and sled's
    /// IO threads need cores too, and few workers mean fewer cross-thread
    /// wake-ups, which dominate CPU on small virtual machines (on 2 cores,
    /// one worker per node took about a tenth less CPU per write than two).
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
    /// sled's page cache in MiB. Too small a cache makes sled read pages
    /// back from disk, and every such read first forces the write buffer
    /// out with its own sync; too large a cache is resident memory.
    #[arg(long, default_value_t = 4)]
    pub cache_mb: u64,
    /// The leader declares a member failed when it has not heard from it
    /// for this long (then its HTTP/TCP checks move to live nodes and its
    /// check-less instances turn critical). Several election timeouts, so a
    /// leader change alone never fails a node.
    #[arg(long, default_value_t = 3000)]
    pub node_fail_timeout_ms: u64,
}

/// Where the node keeps its data.
#[derive(Debug)]
pub enum DataDir {
    Path(PathBuf),
    /// `--dev`: removed when the node exits.
    Temp(tempfile::TempDir),
}

impl DataDir {
    pub fn path(&self) -> &std::path::Path {
        match self {
            DataDir::Path(p) => p,
            DataDir::Temp(t) => t.path(),
        }
    }
}

/// Checked configuration.
#[derive(Debug)]
pub struct AgentConfig {
    pub id: u64,
    pub name: String,
    pub api_addr: SocketAddr,
    pub proxy_addr: Option<SocketAddr>,
    pub peer_addr: SocketAddr,
    pub data_dir: DataDir,
    pub bootstrap_expect: Option<usize>,
    pub join: Vec<String>,
    pub dev: bool,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    pub snapshot_every: u64,
    pub snapshot_keep_logs: u64,
    pub write_timeout: Duration,
    pub leader_wait: Duration,
    pub cache_bytes: u64,
    pub node_fail_timeout: Duration,
}

/// A flag combination that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--id is required (>= 1) unless --dev is given")]
    MissingId,
    #[error("--data-dir is required unless --dev is given")]
    MissingDataDir,
    #[error("--bootstrap-expect must be at least 1")]
    BadExpect,
    #[error("--join address {0:?} is not HOST:PORT")]
    BadJoin(String),
    #[error("timings: need 10 <= heartbeat ({heartbeat} ms), 2 x heartbeat <= election min ({min} ms) < election max ({max} ms)")]
    BadTimings { heartbeat: u64, min: u64, max: u64 },
    #[error("--snapshot-every must be at least 1")]
    BadSnapshot,
    #[error("--write-timeout-ms and --leader-wait-ms must be at least 100")]
    BadTimeout,
    #[error("--node-fail-timeout-ms ({0}) must be at least 4 x --election-max-ms and 500")]
    BadNodeFailTimeout(u64),
    #[error("could not create a temporary data dir: {0}")]
    TempDir(std::io::Error),
}

/// The default worker count on a machine with `cores` cores.
fn half_of(cores: usize) -> usize {
    (cores / 2).max(1)
}

impl AgentArgs {
    /// The async worker count `--worker-threads` asks for (see the flag).
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => half_of(std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        }
    }

    pub fn validate(self) -> Result<AgentConfig, ConfigError> {
        let id = match (self.id, self.dev) {
            (Some(id), _) if id >= 1 => id,
            (None, true) => 1,
            _ => return Err(ConfigError::MissingId),
        };
        let data_dir = match (self.data_dir, self.dev) {
            (Some(p), _) => DataDir::Path(p),
            (None, true) => DataDir::Temp(
                tempfile::Builder::new()
                    .prefix("raftmesh-dev-")
                    .tempdir()
                    .map_err(ConfigError::TempDir)?,
            ),
            (None, false) => return Err(ConfigError::MissingDataDir),
        };
        if self.bootstrap_expect == Some(0) {
            return Err(ConfigError::BadExpect);
        }
        let join: Vec<String> = self
            .join
            .into_iter()
            .map(|j| j.trim().to_string())
            .filter(|j| !j.is_empty())
            .collect();
        for j in &join {
            if j.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(ConfigError::BadJoin(j.clone()));
            }
        }
        let (hb, min, max) = (
            self.heartbeat_ms,
            self.election_min_ms,
            self.election_max_ms,
        );
        if hb < 10 || min < 2 * hb || min >= max {
            return Err(ConfigError::BadTimings {
                heartbeat: hb,
                min,
                max,
            });
        }
        if self.node_fail_timeout_ms < (4 * max).max(500) {
            return Err(ConfigError::BadNodeFailTimeout(self.node_fail_timeout_ms));
        }
        if self.snapshot_every == 0 {
            return Err(ConfigError::BadSnapshot);
        }
        if self.write_timeout_ms < 100 || self.leader_wait_ms < 100 {
            return Err(ConfigError::BadTimeout);
        }
        Ok(AgentConfig {
            id,
            name: self.name.unwrap_or_else(|| format!("node{id}")),
            api_addr: self.api_addr,
            proxy_addr: self.proxy_addr,
            peer_addr: self.peer_addr,
            data_dir,
            bootstrap_expect: self.bootstrap_expect,
            join,
            dev: self.dev,
            heartbeat: Duration::from_millis(hb),
            election_min: Duration::from_millis(min),
            election_max: Duration::from_millis(max),
            snapshot_every: self.snapshot_every,
            snapshot_keep_logs: self.snapshot_keep_logs,
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            leader_wait: Duration::from_millis(self.leader_wait_ms),
            cache_bytes: self.cache_mb.saturating_mul(1024 * 1024),
            node_fail_timeout: Duration::from_millis(self.node_fail_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn workers(args: &[&str]) -> usize {
        let argv = std::iter::once("agent").chain(args.iter().copied());
        Flags::try_parse_from(argv)
            .expect("flags parse")
            .agent
            .workers()
    }

    #[test]
    fn worker_threads_default_to_half_the_cores_and_a_given_count_wins() {
        assert_eq!(
            [1, 2, 3, 8].map(half_of),
            [1, 1, 1, 4],
            "half the cores, at least one"
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(workers(&["--dev"]), half_of(cores), "0 is the default");
        assert_eq!(workers(&["--dev", "--worker-threads", "3"]), 3);
    }
}
