//! The TCP protocol: a route's `listen_port` carries byte streams to one
//! upstream per connection.
//!
//! Owns connecting (with the route's connect timeout, retrying other
//! upstreams on failure up to `retries`) and copying both ways. Does not
//! pick upstreams (`upstream::RouteState::choose`, keyed by the client IP
//! for `consistent_hash`) or own the listener (`proxy::Listener`).
//!
//! Invariants: a connection holds one upstream connection at most; when
//! the listener stops, connections keep flowing until they end or the drain
//! deadline drops them; a connection with no upstream is closed at once
//! (TCP has no error page) and counted as `no_upstream`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::stats::ErrorKind;
use super::{ConnFuture, Protocol, ViewRx};

/// Proxies the connections of one TCP route.
pub struct TcpProxy {
    route: String,
    view: ViewRx,
}

impl TcpProxy {
    pub fn new(route: String, view: ViewRx) -> Self {
        TcpProxy { route, view }
    }

    async fn run(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        let view = self.view.borrow().clone();
        let Some(route) = view.routes.get(&self.route).cloned() else {
            return;
        };
        let started = Instant::now();
        let _flight = route.stats.begin();
        let key = peer.ip().to_string();
        let mut tried = Vec::new();
        let attempts = route.route.def.retries + 1;
        let mut connected = None;
        for attempt in 0..attempts {
            let Some(up) = route.choose(Some(key.as_bytes()), &tried) else {
                break;
            };
            if attempt > 0 {
                route.stats.retry();
                up.stats.retry();
            }
            up.stats.request();
            tried.push(up.id.clone());
            match tokio::time::timeout(route.connect_timeout, TcpStream::connect(&up.addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    up.report(true);
                    connected = Some((up, s));
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(route = %self.route, upstream = %up.id, error = %e, "connect failed");
                    up.report(false);
                    up.stats.error(ErrorKind::Connect);
                    route.stats.error(ErrorKind::Connect);
                }
                Err(_) => {
                    up.report(false);
                    up.stats.error(ErrorKind::Timeout);
                    route.stats.error(ErrorKind::Timeout);
                }
            }
        }
        let Some((up, mut upstream)) = connected else {
            if tried.is_empty() {
                route.stats.error(ErrorKind::NoUpstream);
            }
            return;
        };
        let _up_flight = up.stats.hold();
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((to_up, to_client)) => {
                for s in [&route.stats, &up.stats] {
                    s.bytes_in(to_up);
                    s.bytes_out(to_client);
                }
            }
            Err(e) => {
                tracing::debug!(route = %self.route, error = %e, "TCP stream broke");
                route.stats.error(ErrorKind::Io);
                up.stats.error(ErrorKind::Io);
            }
        }
        route.stats.latency(started.elapsed());
        up.stats.latency(started.elapsed());
    }
}

impl Protocol for TcpProxy {
    fn serve(
        self: Arc<Self>,
        conn: TcpStream,
        peer: SocketAddr,
        _stop: CancellationToken,
    ) -> ConnFuture {
        // A byte stream has no point at which to stop early: it runs until
        // either side closes or the drain deadline drops it.
        Box::pin(self.run(conn, peer))
    }
}
