//! The local routing proxy: every node with `--proxy-addr` serves the
//! replicated routes to the healthy instances of the node's applied
//! registry.
//!
//! Owns the `Protocol` seam, listeners (accepting, connection caps,
//! draining) and the task that rebuilds the `View` and opens or closes TCP
//! route listeners whenever the applied state changes. `http` and `tcp` are
//! the two protocols; `upstream` builds the view and ejects failing
//! upstreams; `balance` picks; `matcher` matches HTTP routes; `stats`
//! counts.
//!
//! Invariants:
//! - The request path reads only the current `View` (a `watch` of an
//!   `Arc`): it never writes to Raft and never waits for the leader, so it
//!   keeps working on a node cut off from the quorum.
//! - The view is rebuilt after every applied change of routes, services,
//!   checks or nodes (coalesced: a rebuild takes whatever is applied when it
//!   starts, at most one per `MIN_REBUILD_GAP`), so upstream sets follow
//!   the registry within tens of milliseconds of the apply; listeners are
//!   not restarted.
//! - A listener being stopped (route removed, port changed, shutdown) first
//!   stops accepting, then lets connections in flight finish for the drain
//!   deadline, then drops the rest.
//! - Every listener holds at most `MAX_CONNECTIONS` connections; beyond that
//!   new ones are closed at once.

pub mod balance;
pub mod http;
pub mod matcher;
pub mod stats;
pub mod tcp;
pub mod upstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::raft::state_machine::Shared;
use crate::registry::{Kind, Protocol as RouteProtocol};
pub use upstream::{RouteState, Upstream, View};

/// Most connections one listener holds at once.
pub const MAX_CONNECTIONS: usize = 10_000;
/// How long connections in flight may finish when a listener stops.
pub const DRAIN: Duration = Duration::from_secs(5);
/// Shortest time between two view rebuilds.
const MIN_REBUILD_GAP: Duration = Duration::from_millis(20);

/// One JSON event per HTTP request through this node's proxy (route,
/// upstream, method, path, status, latency to the response head), for the
/// `_traffic` stream source. A broadcast: a slow reader loses the oldest
/// events and is told how many.
pub type Traffic = tokio::sync::broadcast::Sender<Arc<serde_json::Value>>;
/// Traffic events held for the slowest reader.
const TRAFFIC_BACKLOG: usize = 4096;

/// The current view, as the request path reads it.
pub type ViewRx = watch::Receiver<Arc<View>>;

/// A future a protocol serves a connection with.
pub type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// One way of proxying connections: HTTP and TCP are the two; another
/// protocol is another implementation.
pub trait Protocol: Send + Sync + 'static {
    /// Serves one accepted connection until it ends. When `stop` fires the
    /// implementation finishes what is in flight and closes (the listener
    /// drops the future after the drain deadline anyway).
    fn serve(
        self: Arc<Self>,
        conn: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) -> ConnFuture;
}

/// An accepting socket and the connections it accepted.
pub struct Listener {
    addr: SocketAddr,
    stop: CancellationToken,
    kill: CancellationToken,
    tasks: TaskTracker,
    accept: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Starts accepting on `tcp` for `proto`. Must be called inside tokio.
    pub fn start(
        tcp: TcpListener,
        proto: Arc<dyn Protocol>,
        what: String,
    ) -> std::io::Result<Self> {
        let addr = tcp.local_addr()?;
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let tasks = TaskTracker::new();
        let accept = tokio::spawn(accept_loop(
            tcp,
            proto,
            what,
            stop.clone(),
            kill.clone(),
            tasks.clone(),
        ));
        Ok(Listener {
            addr,
            stop,
            kill,
            tasks,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting (the port closes as soon as the accept loop has
    /// ended), lets connections finish for `drain`, then drops the rest.
    pub async fn shutdown(self, drain: Duration) {
        self.stop.cancel();
        let _ = self.accept.await;
        self.tasks.close();
        if tokio::time::timeout(drain, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(addr = %self.addr, left = self.tasks.len(),
                "connections did not drain in time; closing them");
            self.kill.cancel();
            self.tasks.wait().await;
        }
    }
}

async fn accept_loop(
    tcp: TcpListener,
    proto: Arc<dyn Protocol>,
    what: String,
    stop: CancellationToken,
    kill: CancellationToken,
    tasks: TaskTracker,
) {
    tracing::info!(addr = ?tcp.local_addr().ok(), what = %what, "proxy listening");
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = tcp.accept() => r,
        };
        match accepted {
            Ok((conn, peer)) => {
                if tasks.len() >= MAX_CONNECTIONS {
                    tracing::warn!(what = %what, "connection limit reached; closing a new connection");
                    continue;
                }
                let _ = conn.set_nodelay(true);
                let fut = proto.clone().serve(conn, peer, stop.clone());
                let kill = kill.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        _ = fut => {}
                        _ = kill.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, what = %what, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tracing::info!(what = %what, "proxy listener closed");
}

/// A TCP route's listener and the port it was opened for.
struct TcpRoute {
    port: u16,
    listener: Listener,
}

/// The node's proxy: the HTTP listener, the TCP route listeners and the
/// view they share.
pub struct Proxy {
    view: ViewRx,
    http_addr: SocketAddr,
    /// TCP routes whose port could not be bound, with the reason.
    bind_errors: Arc<Mutex<BTreeMap<String, String>>>,
    stop: CancellationToken,
    sync: Mutex<Option<tokio::task::JoinHandle<()>>>,
    http: Mutex<Option<Listener>>,
    traffic: Traffic,
}

impl Proxy {
    /// Starts serving HTTP routes on `http` and keeping the view (and TCP
    /// listeners on `http`'s IP) in step with `shared`.
    pub fn start(shared: Arc<Shared>, http: TcpListener) -> std::io::Result<Arc<Self>> {
        let http_addr = http.local_addr()?;
        let first = View::build(&shared.read(), &View::default());
        let (tx, view) = watch::channel(Arc::new(first));
        let traffic = tokio::sync::broadcast::channel(TRAFFIC_BACKLOG).0;
        let listener = Listener::start(
            http,
            Arc::new(http::HttpProxy::new(view.clone(), traffic.clone())),
            "http routes".into(),
        )?;
        let stop = CancellationToken::new();
        let bind_errors = Arc::new(Mutex::new(BTreeMap::new()));
        let sync = tokio::spawn(sync_loop(
            shared,
            tx,
            http_addr.ip(),
            bind_errors.clone(),
            stop.clone(),
        ));
        Ok(Arc::new(Proxy {
            view,
            http_addr,
            bind_errors,
            stop,
            sync: Mutex::new(Some(sync)),
            http: Mutex::new(Some(listener)),
            traffic,
        }))
    }

    /// A reader of this node's traffic events (see `Traffic`).
    pub fn traffic(&self) -> tokio::sync::broadcast::Receiver<Arc<serde_json::Value>> {
        self.traffic.subscribe()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `GET /v1/routes/{name}/stats` on this node, if the route exists.
    pub fn route_stats(&self, name: &str) -> Option<serde_json::Value> {
        let view = self.view.borrow().clone();
        let route = view.routes.get(name)?;
        let mut v = route.stats_json();
        v["node_view_index"] = serde_json::json!(view.index);
        if route.route.def.protocol == RouteProtocol::Tcp {
            let errs = self.bind_errors.lock().unwrap_or_else(|p| p.into_inner());
            v["listen_error"] = serde_json::json!(errs.get(name));
        }
        Some(v)
    }

    /// Stops every listener (stop accepting, drain for `DRAIN`).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let sync = self.sync.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = sync {
            let _ = t.await;
        }
        let http = self.http.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(l) = http {
            l.shutdown(DRAIN).await;
        }
    }
}

/// Rebuilds the view on every applied change and reconciles TCP listeners;
/// on stop, closes the TCP listeners (draining them).
async fn sync_loop(
    shared: Arc<Shared>,
    tx: watch::Sender<Arc<View>>,
    ip: IpAddr,
    bind_errors: Arc<Mutex<BTreeMap<String, String>>>,
    stop: CancellationToken,
) {
    // Only what a view is made of; KV and session writes do not rebuild it.
    let mut kinds: Vec<watch::Receiver<u64>> =
        [Kind::Routes, Kind::Services, Kind::Checks, Kind::Nodes]
            .into_iter()
            .map(|k| shared.hub().subscribe(k))
            .collect();
    let mut tcp: BTreeMap<String, TcpRoute> = BTreeMap::new();
    loop {
        let view = {
            let prev = tx.borrow().clone();
            Arc::new(View::build(&shared.read(), &prev))
        };
        tx.send_replace(view.clone());
        reconcile_tcp(&view, &tx, ip, &mut tcp, &bind_errors);
        // Under a stream of registrations, rebuild at most every
        // `MIN_REBUILD_GAP` (each rebuild scans the route's instances).
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(MIN_REBUILD_GAP) => {}
        }
        let changed =
            futures_util::future::select_all(kinds.iter_mut().map(|rx| Box::pin(rx.changed())));
        tokio::select! {
            _ = stop.cancelled() => break,
            (r, _, _) = changed => if r.is_err() { break },
        }
    }
    let closing: Vec<_> = std::mem::take(&mut tcp)
        .into_values()
        .map(|r| r.listener.shutdown(DRAIN))
        .collect();
    for c in closing {
        c.await;
    }
}

/// Opens listeners for new TCP routes (or changed ports) and closes those
/// of removed routes, in the background.
fn reconcile_tcp(
    view: &View,
    tx: &watch::Sender<Arc<View>>,
    ip: IpAddr,
    open: &mut BTreeMap<String, TcpRoute>,
    bind_errors: &Mutex<BTreeMap<String, String>>,
) {
    let wanted: BTreeMap<&str, u16> = view
        .routes
        .values()
        .filter(|r| r.route.def.protocol == RouteProtocol::Tcp)
        .filter_map(|r| Some((r.name(), r.route.def.listen_port?)))
        .collect();
    let stale: Vec<String> = open
        .iter()
        .filter(|(name, r)| wanted.get(name.as_str()) != Some(&r.port))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some(r) = open.remove(&name) {
            tracing::info!(route = %name, port = r.port, "closing TCP route listener");
            tokio::spawn(r.listener.shutdown(DRAIN));
        }
    }
    let mut errs = bind_errors.lock().unwrap_or_else(|p| p.into_inner());
    errs.retain(|name, _| wanted.contains_key(name.as_str()));
    for (name, port) in wanted {
        if open.contains_key(name) {
            continue;
        }
        let addr = SocketAddr::new(ip, port);
        match bind(addr) {
            Ok(l) => {
                let proto = Arc::new(tcp::TcpProxy::new(name.to_string(), tx.subscribe()));
                match Listener::start(l, proto, format!("tcp route {name}")) {
                    Ok(listener) => {
                        errs.remove(name);
                        open.insert(name.to_string(), TcpRoute { port, listener });
                    }
                    Err(e) => {
                        errs.insert(name.to_string(), e.to_string());
                    }
                }
            }
            Err(e) => {
                // Retried on the next change; the stats endpoint shows why.
                tracing::warn!(route = %name, %addr, error = %e, "cannot listen for TCP route");
                errs.insert(name.to_string(), format!("cannot listen on {addr}: {e}"));
            }
        }
    }
}

/// Binds with `SO_REUSEADDR`, so a port freed by a removed route (with
/// connections in TIME_WAIT) can be taken again at once.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
