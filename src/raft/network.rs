//! Outbound peer traffic: openraft's RPCs and raftmesh's internal forwarding
//! calls, as JSON over HTTP/1.1 to other nodes' peer listeners.
//!
//! Owns the `PeerClient` (one pooled HTTP client bound to this node's peer
//! IP, so nodes on distinct loopback addresses look like distinct hosts) and
//! the `RaftNetworkFactory` openraft uses. Does not serve anything: the
//! receiving side is `server.rs`.
//!
//! Failure behaviour: every call has a timeout (openraft's per-RPC TTL for
//! Raft RPCs, the caller's for forwarding). A refused connection is reported
//! as `Unreachable` so openraft backs off instead of spinning.
//!
//! An AppendEntries with entries whose very content the target already
//! answered `Success` to as an early append (`speculate.rs`) takes that
//! answer instead of going out again; every other request is sent.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::speculate::{Key, Speculator};
use super::types::{
    AppendRequest, AppendResponse, NodeId, PeerNode, RaftError, RpcError, SnapshotRequest,
    SnapshotResponse, TypeConfig, VoteRequest, VoteResponse,
};
use super::PATH_APPEND;

/// Errors of a peer HTTP call, before openraft's error types get involved.
#[derive(Debug, thiserror::Error)]
pub enum PeerCallError {
    /// Nothing was sent: the peer refused or could not be reached.
    #[error("peer {addr} unreachable: {source}")]
    Unreachable {
        addr: String,
        source: reqwest::Error,
    },
    /// The request may have been delivered; its outcome is unknown.
    #[error("peer {addr} call failed: {source}")]
    Failed {
        addr: String,
        source: reqwest::Error,
    },
    #[error("peer {addr} answered HTTP {status}")]
    Status { addr: String, status: u16 },
}

/// A pooled HTTP client for peer calls.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
}

impl PeerClient {
    /// `source_ip` is this node's peer IP, used as the source address of
    /// every outbound connection.
    pub fn new(source_ip: IpAddr) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .local_address(source_ip)
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .tcp_nodelay(true)
            .build()?;
        Ok(PeerClient { http })
    }

    /// POSTs `body` as JSON to `http://{addr}{path}` and decodes the JSON reply.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerCallError> {
        self.send(
            addr,
            self.http.post(format!("http://{addr}{path}")).json(body),
            timeout,
        )
        .await
    }

    /// Like `call`, with a body that is already JSON.
    pub async fn call_raw<Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: bytes::Bytes,
        timeout: Duration,
    ) -> Result<Resp, PeerCallError> {
        let req = self
            .http
            .post(format!("http://{addr}{path}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.send(addr, req, timeout).await
    }

    async fn send<Resp: DeserializeOwned>(
        &self,
        addr: &str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Resp, PeerCallError> {
        let res = req.timeout(timeout).send().await.map_err(|source| {
            if source.is_connect() {
                PeerCallError::Unreachable {
                    addr: addr.to_string(),
                    source,
                }
            } else {
                PeerCallError::Failed {
                    addr: addr.to_string(),
                    source,
                }
            }
        })?;
        let status = res.status();
        if !status.is_success() {
            return Err(PeerCallError::Status {
                addr: addr.to_string(),
                status: status.as_u16(),
            });
        }
        res.json().await.map_err(|source| PeerCallError::Failed {
            addr: addr.to_string(),
            source,
        })
    }
}

/// Creates one `PeerNetwork` per replication target.
pub struct NetworkFactory {
    pub client: PeerClient,
    /// Early appends whose answers the replication streams may reuse.
    pub speculator: Option<Arc<Speculator>>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> PeerNetwork {
        PeerNetwork {
            client: self.client.clone(),
            target,
            addr: node.peer_addr.clone(),
            speculator: self.speculator.clone(),
        }
    }
}

/// The connection to one peer, as openraft sees it.
pub struct PeerNetwork {
    client: PeerClient,
    target: NodeId,
    addr: String,
    speculator: Option<Arc<Speculator>>,
}

impl PeerNetwork {
    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcError<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply: Result<Resp, RaftError<E>> = self
            .client
            .call(&self.addr, path, req, option.hard_ttl())
            .await
            .map_err(|e| match e {
                PeerCallError::Unreachable { .. } => RpcError::Unreachable(Unreachable::new(&e)),
                _ => RpcError::Network(NetworkError::new(&e)),
            })?;
        reply.map_err(|e| RpcError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn append_entries(
        &mut self,
        rpc: AppendRequest,
        option: RPCOption,
    ) -> Result<AppendResponse, RpcError> {
        if let (Some(spec), Some(last)) = (&self.speculator, rpc.entries.last()) {
            let key = Key {
                vote: rpc.vote,
                prev: rpc.prev_log_id,
                last: last.log_id,
            };
            if spec.accepted(self.target, &key, option.hard_ttl()).await {
                // The target already answered these very entries (see
                // `speculate`): its answer stands for this request.
                return Ok(AppendResponse::Success);
            }
        }
        self.rpc(PATH_APPEND, &rpc, &option).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn install_snapshot(
        &mut self,
        rpc: SnapshotRequest,
        option: RPCOption,
    ) -> Result<SnapshotResponse, RpcError<InstallSnapshotError>> {
        self.rpc("/raft/snapshot", &rpc, &option).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RpcError> {
        self.rpc("/raft/vote", &rpc, &option).await
    }
}
