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
//! deadline drops them; a connection with no bytes either way for
//! `IDLE_TIMEOUT` is closed (so every wait on the network is bounded); a
//! connection with no upstream is closed at once (TCP has no error page)
//! and counted as `no_upstream`. Bytes are counted as they pass, so a
//! connection that breaks or idles out is counted too.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::stats::{ErrorKind, InFlight, Stats};
use super::upstream::Upstream;
use super::{ConnFuture, Protocol, ViewRx};

/// A connection (TCP route or HTTP upgrade tunnel) with no bytes either
/// way for this long is closed (Envoy's TCP proxy default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Proxies the connections of one TCP route.
pub struct TcpProxy {
    route: String,
    view: ViewRx,
    idle: Duration,
}

impl TcpProxy {
    pub fn new(route: String, view: ViewRx) -> Self {
        TcpProxy {
            route,
            view,
            idle: IDLE_TIMEOUT,
        }
    }

    /// The same with another idle timeout (tests).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    async fn run(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let view = self.view.borrow().clone();
        let Some(route) = view.routes.get(&self.route).cloned() else {
            return;
        };
        let started = Instant::now();
        let _flight = InFlight::begin(route.stats.clone());
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
                    route.failed(&up, ErrorKind::Connect);
                }
                Err(_) => route.failed(&up, ErrorKind::Timeout),
            }
        }
        let Some((up, upstream)) = connected else {
            if tried.is_empty() {
                route.stats.error(ErrorKind::NoUpstream);
            }
            return;
        };
        let _up_flight = InFlight::hold(up.clone());
        let r = pipe(client, upstream, route.stats.clone(), up.clone(), self.idle).await;
        if let Err(e) = r {
            tracing::debug!(route = %self.route, error = %e, "TCP stream broke");
            route.stats.error(ErrorKind::Io);
            up.stats.error(ErrorKind::Io);
        }
        route.stats.latency(started.elapsed());
        up.stats.latency(started.elapsed());
    }
}

/// Copies bytes both ways between `client` and `upstream` until either
/// closes or neither sends for `idle` (then `Ok`, the connection is done),
/// counting them on the route's and the upstream's stats as they pass.
/// Serves TCP routes and HTTP upgrade tunnels alike.
pub(super) async fn pipe<C, U>(
    client: C,
    mut upstream: U,
    route: Arc<Stats>,
    up: Arc<Upstream>,
    idle: Duration,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Metered {
        inner: client,
        last: Arc::new(AtomicU64::new(0)),
        epoch: Instant::now(),
        route,
        up,
    };
    let last = client.last.clone();
    let epoch = client.epoch;
    let idled_out = async move {
        loop {
            let quiet = epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r.map(|_| ()),
        _ = idled_out => {
            tracing::debug!(?idle, "closing idle connection");
            Ok(())
        }
    }
}

/// The client side of a proxied connection: counts bytes both ways as
/// they pass and notes when the last one did (for the idle timeout).
struct Metered<S> {
    inner: S,
    /// Milliseconds after `epoch` of the last byte either way.
    last: Arc<AtomicU64>,
    epoch: Instant,
    route: Arc<Stats>,
    up: Arc<Upstream>,
}

impl<S> Metered<S> {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.touch();
            self.route.bytes_in(n);
            self.up.stats.bytes_in(n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.touch();
                self.route.bytes_out(*n as u64);
                self.up.stats.bytes_out(*n as u64);
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{Listener, View};
    use crate::registry::{Command, NodeEntry, Registry, RouteDef, ServiceSpec};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const WAIT: Duration = Duration::from_secs(10);

    /// An echo server on 127.0.0.1:0 and a listener proxying route `echo` to it.
    async fn setup(idle: Duration) -> (Listener, Arc<View>) {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let port = echo.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let mut reg = Registry::new();
        reg.set_members(1, vec![NodeEntry::test(1)]);
        reg.apply(
            2,
            &Command::RegisterService {
                via_node: 1,
                service: ServiceSpec {
                    id: "e1".into(),
                    name: "echo".into(),
                    address: "127.0.0.1".into(),
                    port,
                    ..Default::default()
                },
            },
        );
        let def: RouteDef = serde_json::from_value(serde_json::json!(
            {"protocol": "tcp", "service": "echo", "listen_port": 1}
        ))
        .expect("route");
        reg.apply(
            3,
            &Command::PutRoute {
                name: "echo".into(),
                def,
            },
        );
        let view = Arc::new(View::build(&reg, &View::default()));
        let (_tx, rx) = tokio::sync::watch::channel(view.clone());
        // The sender may go: the proxy keeps the last view.
        let proto = TcpProxy::new("echo".into(), rx).with_idle_timeout(idle);
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let listener = Listener::start(l, Arc::new(proto), "test".into()).expect("listener");
        (listener, view)
    }

    async fn echo_once(s: &mut TcpStream, msg: &[u8]) {
        s.write_all(msg).await.expect("write");
        let mut got = vec![0; msg.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(got, msg);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let idle = Duration::from_millis(1000);
        let (listener, view) = setup(idle).await;
        let addr = listener.local_addr();
        let mut quiet = TcpStream::connect(addr).await.expect("connect");
        let mut busy = TcpStream::connect(addr).await.expect("connect");
        echo_once(&mut quiet, b"hello\n").await;
        // The busy one talks every 100 ms for well past the idle timeout
        // (a pause of a whole second on a loaded machine would be needed to
        // idle it out).
        let started = Instant::now();
        while started.elapsed() < idle * 5 / 2 {
            echo_once(&mut busy, b"ping\n").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(WAIT, quiet.read(&mut buf))
            .await
            .expect("the quiet connection is closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "closed, got {n:?}");
        echo_once(&mut busy, b"still here\n").await;
        let stats = view.routes["echo"].stats.view();
        assert_eq!(stats.requests, 2);
        // "hello\n" plus at least the pings so far, both ways.
        assert!(
            stats.bytes_in >= 6 + 5 * 4 && stats.bytes_in == stats.bytes_out,
            "{stats:?}"
        );
        drop(busy);
        listener.shutdown(WAIT).await;
    }
}
