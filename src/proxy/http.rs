//! The HTTP protocol: serves HTTP/1.1 on the proxy address, matches each
//! request to a route and forwards it to one of the route's upstreams.
//!
//! Owns the client side of the proxy (HTTP/1.1 with keep-alive, a header
//! timeout, graceful close when the listener stops), the forwarded request
//! (hop-by-hop headers removed, `X-Forwarded-*` added, `Host` kept, the
//! path rewritten by `strip_prefix`), the one pooled upstream client every
//! route shares, the cap on requests in flight per upstream address,
//! retries, WebSocket (`Upgrade`) pass-through and the answers the proxy
//! makes itself. Does not match routes (`matcher`), pick upstreams or eject
//! them (`upstream::RouteState::choose`, `Upstream::report`), count
//! (`stats`) or own the listener (`proxy::Listener`).
//!
//! Invariants:
//! - Every answer the proxy makes itself is JSON with
//!   `content-type: application/json` and an `error` field; an upstream's
//!   answer, 5xx included, is passed through as it came.
//! - A request is sent more than once only if it is retryable: an
//!   idempotent method with a body of known length of at most
//!   `MAX_BUFFERED_BODY`, buffered before the first attempt. It is retried
//!   (on another upstream, up to the route's `retries`) after a connect
//!   failure, a timeout or an I/O error before the response head; never
//!   after a response head, and an upgrade never once it was sent.
//! - Bodies are streamed both ways with the connections' backpressure;
//!   the only buffering is that of retryable bodies, bounded as above.
//! - A request is in flight on its route and on the upstream that answers
//!   until the answer's body has been delivered to the client (or the
//!   tunnel of an upgrade has closed), so `least_connections` sees slow
//!   streams; its latency is recorded then.
//! - Each attempt is bounded: the connect (or pooled checkout) by the
//!   route's `connect_timeout`, connect plus response head by its
//!   `request_timeout`. Waits on the client are bounded by
//!   `HEADER_READ_TIMEOUT` and `BODY_READ_TIMEOUT`; streamed bodies and
//!   tunnels run until either side closes or the listener's drain deadline
//!   drops the connection.
//!
//! Concurrency: one future per client connection (hyper's HTTP/1
//! dispatcher); the upstream client's connection tasks run on the tokio
//! executor. An upgraded tunnel runs inside the client connection's future
//! once hyper hands the connection over, so the listener's drain and kill
//! cover it. The per-address caps are tokio semaphores in a std mutex held
//! only to look one up.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::{capture_connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::matcher::{upstream_path, Head};
use super::stats::{ErrorKind, InFlight, Stats};
use super::upstream::{RouteState, Upstream};
use super::{ConnFuture, Protocol, ViewRx};
use crate::registry::{Balancer, Route};

/// How long a client may take to send a request head; also how long an
/// idle keep-alive connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body buffered so that the request can be retried.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;
/// How long a client may take to send a body the proxy buffers.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most requests in flight to one upstream address.
pub const MAX_PER_UPSTREAM: usize = 256;
/// How long a request waits for a full upstream before the proxy answers
/// 503.
pub const QUEUE_WAIT: Duration = Duration::from_millis(500);
/// Idle upstream connections kept per address.
pub const POOL_MAX_IDLE_PER_HOST: usize = 32;
/// How long an idle upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long both sides of an upgrade may take to hand their connections
/// over after the 101.
const UPGRADE_HANDOVER: Duration = Duration::from_secs(10);
/// Upstream addresses whose (idle) cap is remembered; caps in use are
/// always kept, so the map holds at most this many plus the addresses
/// with requests in flight (bounded by the listener's connection cap).
const MAX_GATES: usize = 4096;

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A request body as sent upstream: buffered (retryable) or streamed
/// from the client.
type ReqBody = Either<Full<Bytes>, Incoming>;
/// An answer's body: made by the proxy, or the upstream's, metered.
type RespBody = Either<Full<Bytes>, Metered>;
/// The byte copy of an upgraded exchange, run by the client connection.
type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves HTTP routes.
pub struct HttpProxy {
    view: ViewRx,
    /// One pool for every route and client connection, so upstream
    /// connections are reused across all of them.
    client: Client<HttpConnector, ReqBody>,
    /// Settings of every client connection (timer, header timeout).
    server: http1::Builder,
    /// The cap on requests in flight per upstream address.
    gates: Gates,
    /// Where one event per request goes while a `_traffic` stream listens.
    traffic: super::Traffic,
}

/// What a request met on its way, for its traffic event.
#[derive(Default)]
struct Seen {
    route: Option<String>,
    upstream: Option<String>,
}

impl HttpProxy {
    pub fn new(view: ViewRx, traffic: super::Traffic) -> Self {
        let mut connector = HttpConnector::new();
        // Each route has its own connect timeout; `send` applies it.
        connector.set_connect_timeout(None);
        connector.set_nodelay(true);
        connector.set_keepalive(Some(POOL_IDLE_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let mut server = http1::Builder::new();
        server
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true);
        HttpProxy {
            view,
            client,
            server,
            gates: Gates::default(),
            traffic,
        }
    }

    async fn run(self: Arc<Self>, conn: TcpStream, peer: SocketAddr, stop: CancellationToken) {
        // HTTP/1 hands a connection over at most once, so one slot is enough.
        let (tunnel_tx, mut tunnel_rx) = mpsc::channel::<Tunnel>(1);
        let this = self.clone();
        let service = service_fn(move |req| {
            let this = this.clone();
            let tunnels = tunnel_tx.clone();
            async move { Ok::<_, Infallible>(this.handle(req, peer, tunnels).await) }
        });
        let conn = self
            .server
            .serve_connection(TokioIo::new(conn), service)
            .with_upgrades();
        tokio::pin!(conn);
        let mut stopping = false;
        let served = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(e) = served {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
        // The 101 was sent before the connection future ended, so a tunnel
        // for it is already queued.
        if let Ok(tunnel) = tunnel_rx.try_recv() {
            tunnel.await;
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        tunnels: mpsc::Sender<Tunnel>,
    ) -> Response<RespBody> {
        let span = tracing::info_span!(
            "http",
            route = tracing::field::Empty,
            method = %req.method(),
            path = %req.uri().path(),
        );
        // Only built while some `_traffic` stream listens on this node.
        let tap = (self.traffic.receiver_count() > 0)
            .then(|| (req.method().to_string(), req.uri().path().to_string()));
        let started = Instant::now();
        let mut seen = Seen::default();
        let resp = self
            .proxy(req, peer, tunnels, &mut seen)
            .instrument(span)
            .await;
        if let Some((method, path)) = tap {
            let event = json!({
                "route": seen.route,
                "upstream": seen.upstream,
                "method": method,
                "path": path,
                "status": resp.status().as_u16(),
                "latency_ms": started.elapsed().as_secs_f64() * 1000.0,
            });
            // No receiver left is fine: the stream went away meanwhile.
            let _ = self.traffic.send(Arc::new(event));
        }
        resp
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        tunnels: mpsc::Sender<Tunnel>,
        seen: &mut Seen,
    ) -> Response<RespBody> {
        let started = Instant::now();
        let state = {
            let view = self.view.borrow().clone();
            view.http
                .find(&ReqHead(&req))
                .and_then(|r| view.routes.get(&r.name))
                .cloned()
        };
        let Some(state) = state else {
            return answer(
                StatusCode::NOT_FOUND,
                json!({
                    "error": "no route matches",
                    "method": req.method().as_str(),
                    "path": req.uri().path(),
                }),
            );
        };
        tracing::Span::current().record("route", state.name());
        seen.route = Some(state.name().to_string());
        let route_mark = InFlight::begin(state.stats.clone());
        let route = &state.route;
        let Some(path) = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .filter(|pq| pq.starts_with('/'))
            .map(|pq| upstream_path(route, pq))
        else {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({
                    "error": "request target must be a path",
                    "route": route.name,
                    "target": req.uri().to_string(),
                }),
            );
        };
        let upgrade = wants_upgrade(req.headers());
        // Taken before the request is split: the client's connection is
        // handed over through this, after the 101 is sent.
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let key: Option<Vec<u8>> = match (route.def.lb, &route.def.hash_header) {
            (Balancer::ConsistentHash, Some(h)) => {
                req.headers().get(h.as_str()).map(|v| v.as_bytes().to_vec())
            }
            _ => None,
        };
        let (parts, body) = req.into_parts();
        let mut headers = forward_headers(parts.headers, peer, upgrade, &parts.uri);
        let (mut outgoing, bytes_in) = match read_body(route, &parts.method, body).await {
            Ok(read) => read,
            Err(refused) => return refused,
        };
        state.stats.bytes_in(bytes_in);
        let attempts = match outgoing {
            Outgoing::Buffered(_) => route.def.retries + 1,
            Outgoing::Streamed(_) => 1,
        };
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<Failure> = None;
        for attempt in 0..attempts {
            let Some(up) = state.choose(key.as_deref(), &tried) else {
                break;
            };
            if attempt > 0 {
                state.stats.retry();
                up.stats.retry();
            }
            tried.push(up.id.clone());
            let Some(permit) = self.gates.enter(&up.addr).await else {
                state.stats.error(ErrorKind::Busy);
                return answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({
                        "error": "upstream busy",
                        "route": route.name,
                        "service": route.def.service,
                        "upstream": up.id,
                    }),
                );
            };
            let up_mark = InFlight::begin(up.clone());
            let attempt_started = Instant::now();
            up.stats.bytes_in(bytes_in);
            let body = match &mut outgoing {
                Outgoing::Buffered(b) => Either::Left(Full::new(b.clone())),
                Outgoing::Streamed(b) => Either::Right(
                    b.take()
                        .expect("a streamed body has exactly one attempt, this one"),
                ),
            };
            let these = if attempt + 1 == attempts {
                std::mem::take(&mut headers)
            } else {
                headers.clone()
            };
            let outcome = match upstream_request(&parts.method, &up.addr, &path, these, body) {
                Ok(req) => self.send(&state, &up.addr, req).await,
                Err(f) => Err(f),
            };
            let resp = match outcome {
                Ok(resp) => resp,
                Err(f) => {
                    state.failed(&up, f.kind);
                    tracing::debug!(upstream = %up.id, addr = %up.addr, kind = f.kind.as_str(),
                        detail = %f.detail, "attempt failed");
                    // Sent once, an upgrade may have reached the upstream.
                    let give_up = upgrade && f.sent;
                    last = Some(f);
                    if give_up {
                        break;
                    }
                    continue;
                }
            };
            seen.upstream = Some(up.id.clone());
            if resp.status().is_server_error() {
                state.failed(&up, ErrorKind::Status5xx);
            } else {
                up.report(true);
            }
            let exchange = Exchange {
                route: state.stats.clone(),
                up: up.clone(),
                started,
                attempt_started,
                _marks: [route_mark, up_mark],
                _permit: permit,
            };
            return relay(route, resp, exchange, client_upgrade, &tunnels);
        }
        match last {
            None => {
                state.stats.error(ErrorKind::NoUpstream);
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({
                        "error": "no healthy upstream",
                        "route": route.name,
                        "service": route.def.service,
                    }),
                )
            }
            Some(f) => {
                let (status, error) = if f.kind == ErrorKind::Timeout {
                    (StatusCode::GATEWAY_TIMEOUT, "upstream timed out")
                } else {
                    (StatusCode::BAD_GATEWAY, "upstream failed")
                };
                answer(
                    status,
                    json!({
                        "error": error,
                        "route": route.name,
                        "service": route.def.service,
                        "detail": f.detail,
                    }),
                )
            }
        }
    }

    /// One attempt: connect (or check out a pooled connection) within the
    /// route's connect timeout, and have the response head within its
    /// request timeout.
    async fn send(
        &self,
        state: &RouteState,
        addr: &str,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, Failure> {
        // The pooled client does not say when its connect phase ends; the
        // captured connection does, so the connect timeout can bound that
        // phase alone.
        let mut connected = capture_connection(&mut req);
        let response = self.client.request(req);
        let connect_timeout = state.connect_timeout;
        let exchange = async {
            tokio::pin!(response);
            tokio::select! {
                biased;
                r = &mut response => return r.map_err(Failure::from_client),
                _ = async { drop(connected.wait_for_connection_metadata().await) } => {}
                _ = tokio::time::sleep(connect_timeout) => {
                    return Err(Failure {
                        kind: ErrorKind::Timeout,
                        sent: false,
                        detail: format!("connect to {addr} took longer than {connect_timeout:?}"),
                    });
                }
            }
            response.await.map_err(Failure::from_client)
        };
        match tokio::time::timeout(state.request_timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Failure {
                kind: ErrorKind::Timeout,
                sent: connected.connection_metadata().is_some(),
                detail: format!(
                    "no response head from {addr} within {:?}",
                    state.request_timeout
                ),
            }),
        }
    }
}

impl Protocol for HttpProxy {
    fn serve(
        self: Arc<Self>,
        conn: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) -> ConnFuture {
        Box::pin(self.run(conn, peer, stop))
    }
}

/// What goes upstream as the request body.
enum Outgoing {
    Buffered(Bytes),
    /// Taken by the one attempt.
    Streamed(Option<Incoming>),
}

/// Why an attempt failed.
struct Failure {
    kind: ErrorKind,
    /// Whether the request may have reached the upstream (the connect
    /// phase was over).
    sent: bool,
    detail: String,
}

impl Failure {
    fn from_client(e: hyper_util::client::legacy::Error) -> Failure {
        let detail = crate::health::probe::error_chain(&e);
        let connect = e.is_connect();
        Failure {
            kind: if connect {
                ErrorKind::Connect
            } else {
                ErrorKind::Io
            },
            sent: !connect,
            detail,
        }
    }
}

/// Limits requests in flight per upstream address.
#[derive(Default)]
struct Gates {
    by_addr: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Gates {
    /// A place among `addr`'s requests in flight, waiting up to
    /// `QUEUE_WAIT` for one; `None` if it stayed full.
    async fn enter(&self, addr: &str) -> Option<OwnedSemaphorePermit> {
        let gate = {
            let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(addr) {
                Some(g) => g.clone(),
                None => {
                    if map.len() >= MAX_GATES {
                        // A gate nobody holds a permit of is only a number.
                        map.retain(|_, g| Arc::strong_count(g) > 1);
                    }
                    let g = Arc::new(Semaphore::new(MAX_PER_UPSTREAM));
                    map.insert(addr.to_string(), g.clone());
                    g
                }
            }
        };
        if let Ok(p) = gate.clone().try_acquire_owned() {
            return Some(p);
        }
        tokio::time::timeout(QUEUE_WAIT, gate.acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

/// The attempt that answered, held until its answer has been delivered:
/// the request stays in flight on the route and the upstream, and keeps
/// its place under the upstream's cap. Dropping it records the latency.
struct Exchange {
    route: Arc<Stats>,
    up: Arc<Upstream>,
    started: Instant,
    attempt_started: Instant,
    _marks: [InFlight; 2],
    _permit: OwnedSemaphorePermit,
}

impl Exchange {
    fn bytes_out(&self, n: u64) {
        self.route.bytes_out(n);
        self.up.stats.bytes_out(n);
    }

    /// Counts a failure of the exchange on the route and the upstream, which
    /// also counts towards the upstream's ejection.
    fn failed(&self, kind: ErrorKind) {
        self.up.report(false);
        self.route.error(kind);
        self.up.stats.error(kind);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.route.latency(self.started.elapsed());
        self.up.stats.latency(self.attempt_started.elapsed());
    }
}

/// An upstream's response body on its way to the client: counts the bytes
/// and holds the `Exchange` until the last frame (or the client leaving).
struct Metered {
    inner: Incoming,
    exchange: Option<Exchange>,
}

impl Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(x)) = (frame.data_ref(), &this.exchange) {
                    x.bytes_out(data.len() as u64);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(x) = this.exchange.take() {
                    tracing::debug!(upstream = %x.up.id, error = %e, "response body broke");
                    x.failed(ErrorKind::Io);
                }
            }
            Poll::Ready(None) => this.exchange = None,
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body as it will be sent, and its size: buffered when the
/// request may be retried, else left to stream. Refusals are answers.
async fn read_body(
    route: &Route,
    method: &Method,
    body: Incoming,
) -> Result<(Outgoing, u64), Response<RespBody>> {
    let size = body.size_hint().exact();
    let buffer = is_idempotent(method) && size.is_some_and(|n| n <= MAX_BUFFERED_BODY as u64);
    if !buffer {
        return Ok((Outgoing::Streamed(Some(body)), size.unwrap_or(0)));
    }
    let read = Limited::new(body, MAX_BUFFERED_BODY).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(collected)) => {
            let bytes = collected.to_bytes();
            let n = bytes.len() as u64;
            Ok((Outgoing::Buffered(bytes), n))
        }
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({
                "error": "request body too large",
                "route": route.name,
                "limit": MAX_BUFFERED_BODY,
            }),
        )),
        Ok(Err(e)) => Err(answer(
            StatusCode::BAD_REQUEST,
            json!({
                "error": "request body could not be read",
                "route": route.name,
                "detail": e.to_string(),
            }),
        )),
        Err(_) => Err(answer(
            StatusCode::REQUEST_TIMEOUT,
            json!({
                "error": "request body not received in time",
                "route": route.name,
            }),
        )),
    }
}

/// The answer of the attempt that got a response head: the upstream's
/// response with a metered body, or for a 101 the switch, with the tunnel
/// queued for the client connection to run.
fn relay(
    route: &Route,
    mut resp: Response<Incoming>,
    exchange: Exchange,
    client_upgrade: Option<OnUpgrade>,
    tunnels: &mpsc::Sender<Tunnel>,
) -> Response<RespBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            exchange.failed(ErrorKind::Io);
            return answer(
                StatusCode::BAD_GATEWAY,
                json!({
                    "error": "upstream switched protocols unasked",
                    "route": route.name,
                    "service": route.def.service,
                }),
            );
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let tunnel =
            tunnel(client_upgrade, upstream_upgrade, exchange).instrument(tracing::Span::current());
        if tunnels.try_send(Box::pin(tunnel)).is_err() {
            // Only a second upgrade on one connection gets here, and
            // hyper ends a connection at its first.
            return answer(
                StatusCode::BAD_GATEWAY,
                json!({
                    "error": "connection already upgraded",
                    "route": route.name,
                }),
            );
        }
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Either::Left(Full::new(Bytes::new())));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let body = Metered {
        inner: body,
        exchange: Some(exchange),
    };
    Response::from_parts(parts, Either::Right(body))
}

/// Copies bytes both ways between the client's and the upstream's
/// upgraded connections until either closes.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, exchange: Exchange) {
    let handover = async { tokio::try_join!(client, upstream) };
    let (client, upstream) = match tokio::time::timeout(UPGRADE_HANDOVER, handover).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "upgrade handover failed");
            exchange.failed(ErrorKind::Io);
            return;
        }
        Err(_) => {
            tracing::debug!("upgrade handover timed out");
            exchange.failed(ErrorKind::Timeout);
            return;
        }
    };
    let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let (route, up) = (exchange.route.clone(), exchange.up.clone());
    if let Err(e) = super::tcp::pipe(client, upstream, route, up, super::tcp::IDLE_TIMEOUT).await {
        tracing::debug!(error = %e, "upgraded stream broke");
        exchange.failed(ErrorKind::Io);
    }
}

/// The request head as the matcher reads it.
struct ReqHead<'a, B>(&'a Request<B>);

impl<B> Head for ReqHead<'_, B> {
    fn host(&self) -> Option<&str> {
        self.0
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| self.0.uri().authority().map(|a| a.as_str()))
    }

    fn path(&self) -> &str {
        self.0.uri().path()
    }

    fn method(&self) -> &str {
        self.0.method().as_str()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.0.headers().get(name)?.to_str().ok()
    }
}

/// Methods whose repetition does no more than one request does.
fn is_idempotent(m: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(m)
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// Removes the headers of this hop: the fixed list and whatever
/// `Connection` names. An upgrade keeps `Upgrade` and `Connection: upgrade`,
/// which the next hop needs to switch.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in listed {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    for name in HOP_BY_HOP {
        if !(upgrade && (name == "connection" || name == "upgrade")) {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The client's headers as the upstream gets them.
fn forward_headers(
    mut headers: HeaderMap,
    peer: SocketAddr,
    upgrade: bool,
    uri: &Uri,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers, upgrade);
    let ip = peer.ip().to_canonical().to_string();
    let prior: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let chain = if prior.is_empty() {
        ip.clone()
    } else {
        format!("{}, {ip}", prior.join(", "))
    };
    let chain = HeaderValue::from_str(&chain).or_else(|_| HeaderValue::from_str(&ip));
    if let Ok(v) = chain {
        headers.insert("x-forwarded-for", v);
    }
    if !headers.contains_key(header::HOST) {
        // An absolute-form target names the host; without this the client
        // would send the upstream's address instead.
        if let Some(v) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, v);
        }
    }
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert("x-forwarded-host", host);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    headers
}

fn upstream_request(
    method: &Method,
    addr: &str,
    path: &str,
    headers: HeaderMap,
    body: ReqBody,
) -> Result<Request<ReqBody>, Failure> {
    let uri = Uri::try_from(format!("http://{addr}{path}")).map_err(|e| Failure {
        kind: ErrorKind::Connect,
        sent: false,
        detail: format!("cannot address {addr}{path}: {e}"),
    })?;
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    // Upstreams get HTTP/1.1 (and so keep-alive) whatever the client spoke.
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Ok(req)
}

/// An answer the proxy makes itself.
fn answer(status: StatusCode, body: serde_json::Value) -> Response<RespBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{Listener, View};
    use crate::registry::{
        CheckDef, Command, HealthStatus, NodeEntry, Registry, RouteDef, ServiceSpec,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    /// Upper bound of every wait in these tests.
    const WAIT: Duration = Duration::from_secs(10);

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    /// Serves `handle` on a fresh port (with upgrades), until the test ends.
    async fn backend<F, Fut, B>(handle: F) -> SocketAddr
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = l.local_addr().expect("backend addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let handle = handle.clone();
                        async move { Ok::<_, Infallible>(handle(req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        addr
    }

    /// A backend answering with what it received, as JSON.
    async fn echo(name: &'static str) -> SocketAddr {
        backend(move |req: Request<Incoming>| async move {
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let seen = json!({
                "backend": name,
                "method": req.method().as_str(),
                "path": req.uri().path_and_query().map(|p| p.as_str()),
                "host": header("host"),
                "x-forwarded-for": header("x-forwarded-for"),
                "x-forwarded-host": header("x-forwarded-host"),
                "x-forwarded-proto": header("x-forwarded-proto"),
                "connection": header("connection"),
                "x-hop": header("x-hop"),
            });
            let body = req.into_body().collect().await.map(|c| c.to_bytes());
            let mut seen = seen;
            seen["body"] = json!(String::from_utf8_lossy(&body.unwrap_or_default()));
            Response::new(Full::new(Bytes::from(seen.to_string())))
        })
        .await
    }

    /// A port nothing listens on.
    fn dead_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    /// Instance `id` of `service` at 127.0.0.1:`port`; a critical static
    /// check makes it not passing.
    fn instance(id: &str, service: &str, port: u16, passing: bool) -> Command {
        let checks = if passing {
            Vec::new()
        } else {
            vec![CheckDef {
                check_id: format!("{id}-down"),
                ..CheckDef::default()
            }]
        };
        Command::RegisterService {
            via_node: 1,
            service: ServiceSpec {
                id: id.into(),
                name: service.into(),
                address: "127.0.0.1".into(),
                port,
                checks,
                ..ServiceSpec::default()
            },
        }
    }

    fn route(name: &str, def: serde_json::Value) -> Command {
        let def: RouteDef = serde_json::from_value(def).expect("route parses");
        def.validate().expect("route is valid");
        Command::PutRoute {
            name: name.into(),
            def,
        }
    }

    /// A registry of one live member (node 1) with `cmds` applied.
    fn registry(cmds: Vec<Command>) -> Registry {
        let mut reg = Registry::new();
        reg.set_members(1, vec![NodeEntry::test(1)]);
        for (i, c) in cmds.iter().enumerate() {
            let (resp, _) = reg.apply(2 + i as u64, c);
            assert!(
                !matches!(resp, crate::registry::Response::Invalid(_)),
                "{resp:?}"
            );
        }
        reg
    }

    struct Proxy {
        addr: SocketAddr,
        view: watch::Sender<Arc<View>>,
        listener: Listener,
    }

    impl Proxy {
        async fn start(reg: &Registry) -> Proxy {
            let (view, rx) = watch::channel(Arc::new(View::build(reg, &View::default())));
            let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
            let listener = Listener::start(
                tcp,
                Arc::new(HttpProxy::new(rx, tokio::sync::broadcast::channel(16).0)),
                "test".into(),
            )
            .expect("listener starts");
            Proxy {
                addr: listener.local_addr(),
                view,
                listener,
            }
        }

        fn stats(&self, route: &str) -> serde_json::Value {
            self.view.borrow().routes[route].stats_json()
        }

        fn request(&self, method: Method, path: &str, body: &'static str) -> Request<Full<Bytes>> {
            let mut req = Request::new(Full::new(Bytes::from_static(body.as_bytes())));
            *req.method_mut() = method;
            *req.uri_mut() = format!("http://{}{path}", self.addr)
                .parse()
                .expect("uri parses");
            req
        }

        async fn call(
            &self,
            req: Request<Full<Bytes>>,
        ) -> (StatusCode, HeaderMap, serde_json::Value) {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let exchange = async {
                let resp = client.request(req).await.expect("proxy answers");
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.expect("body arrives").to_bytes();
                let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                (parts.status, parts.headers, json)
            };
            tokio::time::timeout(WAIT, exchange)
                .await
                .expect("answer within the deadline")
        }
    }

    /// Polls `probe` until it holds, for at most `WAIT`.
    async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !probe() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn is_json(headers: &HeaderMap) -> bool {
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            == Some("application/json")
    }

    #[tokio::test]
    async fn a_get_is_forwarded_with_the_prefix_stripped_and_forwarded_headers() {
        let up = echo("b1").await;
        let reg = registry(vec![
            instance("b1", "billing", up.port(), true),
            route(
                "billing",
                json!({"protocol": "http", "service": "billing",
                    "match": {"path_prefix": "/billing"}, "strip_prefix": true}),
            ),
        ]);
        let proxy = Proxy::start(&reg).await;
        let mut req = proxy.request(Method::GET, "/billing/invoices?x=1", "");
        let h = req.headers_mut();
        h.insert(header::HOST, HeaderValue::from_static("api.local"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.9"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("secret"));
        let (status, _, seen) = proxy.call(req).await;
        assert_eq!(status, StatusCode::OK, "{seen}");
        assert_eq!(seen["path"], "/invoices?x=1");
        assert_eq!(seen["host"], "api.local");
        assert_eq!(seen["x-forwarded-for"], "10.0.0.9, 127.0.0.1");
        assert_eq!(seen["x-forwarded-host"], "api.local");
        assert_eq!(seen["x-forwarded-proto"], "http");
        // What the client's `Connection` named stays on the client's hop.
        assert_eq!(seen["x-hop"], serde_json::Value::Null);
        eventually("the request to leave flight", || {
            proxy.stats("billing")["stats"]["in_flight"] == 0
        })
        .await;
        let stats = proxy.stats("billing");
        assert_eq!(stats["stats"]["requests"], 1);
        assert_eq!(stats["upstreams"]["b1"]["stats"]["requests"], 1);
        assert!(stats["stats"]["bytes_out"].as_u64() > Some(0), "{stats}");
        assert_eq!(stats["stats"]["latency_ms"]["count"], 1);
    }

    #[tokio::test]
    async fn a_request_no_route_matches_is_a_json_404() {
        let up = echo("b1").await;
        let reg = registry(vec![
            instance("b1", "billing", up.port(), true),
            route(
                "billing",
                json!({"protocol": "http", "service": "billing",
                    "match": {"path_prefix": "/billing"}}),
            ),
        ]);
        let proxy = Proxy::start(&reg).await;
        let (status, headers, body) = proxy
            .call(proxy.request(Method::GET, "/billingx/1", ""))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(is_json(&headers));
        assert_eq!(body["error"], "no route matches");
        assert_eq!(body["method"], "GET");
        assert_eq!(body["path"], "/billingx/1");
    }

    #[tokio::test]
    async fn a_route_without_a_passing_instance_is_a_json_503_naming_route_and_service() {
        let up = echo("b1").await;
        let reg = registry(vec![
            instance("b1", "billing", up.port(), false),
            route("bills", json!({"protocol": "http", "service": "billing"})),
        ]);
        let b1 = reg.service("b1").expect("registered");
        assert_eq!(reg.instance_status(b1), HealthStatus::Critical);
        let proxy = Proxy::start(&reg).await;
        let (status, headers, body) = proxy.call(proxy.request(Method::GET, "/x", "")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(is_json(&headers));
        assert_eq!(body["error"], "no healthy upstream");
        assert_eq!(body["route"], "bills");
        assert_eq!(body["service"], "billing");
        assert_eq!(proxy.stats("bills")["stats"]["errors"]["no_upstream"], 1);
    }

    /// `a-dead` sorts first, so round robin's first turn takes it.
    fn dead_and_live(live: SocketAddr) -> Vec<Command> {
        vec![
            instance("a-dead", "web", dead_port(), true),
            instance("b-live", "web", live.port(), true),
            route(
                "web",
                json!({"protocol": "http", "service": "web", "retries": 1}),
            ),
        ]
    }

    #[tokio::test]
    async fn a_get_to_a_dead_upstream_is_retried_on_a_live_one() {
        let live = echo("b-live").await;
        let proxy = Proxy::start(&registry(dead_and_live(live))).await;
        let (status, _, seen) = proxy.call(proxy.request(Method::GET, "/x", "")).await;
        assert_eq!(status, StatusCode::OK, "{seen}");
        assert_eq!(seen["backend"], "b-live");
        let stats = proxy.stats("web");
        assert_eq!(stats["stats"]["requests"], 1, "{stats}");
        assert_eq!(stats["stats"]["retries"], 1, "{stats}");
        assert_eq!(stats["stats"]["errors"]["connect"], 1, "{stats}");
        assert_eq!(
            stats["upstreams"]["a-dead"]["stats"]["errors"]["connect"],
            1
        );
        assert_eq!(stats["upstreams"]["b-live"]["stats"]["retries"], 1);
        assert_eq!(stats["upstreams"]["b-live"]["stats"]["requests"], 1);
    }

    #[tokio::test]
    async fn a_post_to_a_dead_upstream_is_not_retried() {
        let live = echo("b-live").await;
        let proxy = Proxy::start(&registry(dead_and_live(live))).await;
        let (status, headers, body) = proxy
            .call(proxy.request(Method::POST, "/orders", "{\"n\":1}"))
            .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert!(is_json(&headers));
        assert_eq!(body["error"], "upstream failed");
        assert_eq!(body["route"], "web");
        assert_eq!(body["service"], "web");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
        let stats = proxy.stats("web");
        assert_eq!(stats["stats"]["retries"], 0, "{stats}");
        assert_eq!(stats["stats"]["errors"]["connect"], 1, "{stats}");
        assert_eq!(stats["upstreams"]["b-live"]["stats"]["requests"], 0);
    }

    #[tokio::test]
    async fn an_upstream_without_a_response_head_in_time_is_a_json_504() {
        // Accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = silent.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let reg = registry(vec![
            instance("s1", "slow", port, true),
            route(
                "slow",
                json!({"protocol": "http", "service": "slow", "request_timeout": "200ms"}),
            ),
        ]);
        let proxy = Proxy::start(&reg).await;
        let (status, headers, body) = proxy.call(proxy.request(Method::GET, "/", "")).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        assert!(is_json(&headers));
        assert_eq!(body["error"], "upstream timed out");
        let stats = proxy.stats("slow");
        assert_eq!(stats["stats"]["errors"]["timeout"], 1, "{stats}");
        assert_eq!(stats["upstreams"]["s1"]["stats"]["errors"]["timeout"], 1);
    }

    /// A backend whose response body sends its first chunk at once and
    /// the rest when `release` fires.
    async fn held_stream(release: Arc<tokio::sync::Notify>) -> SocketAddr {
        backend(move |_req: Request<Incoming>| {
            let release = release.clone();
            async move {
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
                tokio::spawn(async move {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from_static(b"first,"))))
                        .await;
                    release.notified().await;
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"last")))).await;
                });
                let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|f| (f, rx))
                });
                Response::new(http_body_util::StreamBody::new(frames))
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_streaming_response_stays_in_flight_until_its_body_ends() {
        let release = Arc::new(tokio::sync::Notify::new());
        let up = held_stream(release.clone()).await;
        let reg = registry(vec![
            instance("st1", "stream", up.port(), true),
            route("stream", json!({"protocol": "http", "service": "stream"})),
        ]);
        let proxy = Proxy::start(&reg).await;
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let resp = tokio::time::timeout(
            WAIT,
            client.request(proxy.request(Method::GET, "/feed", "")),
        )
        .await
        .expect("head within the deadline")
        .expect("proxy answers");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("first chunk within the deadline")
            .expect("a frame")
            .expect("not an error");
        assert_eq!(first.data_ref().map(|d| &d[..]), Some(&b"first,"[..]));
        let stats = proxy.stats("stream");
        assert_eq!(stats["stats"]["in_flight"], 1, "{stats}");
        assert_eq!(
            stats["upstreams"]["st1"]["stats"]["in_flight"], 1,
            "{stats}"
        );
        assert_eq!(stats["stats"]["latency_ms"]["count"], 0, "{stats}");
        release.notify_one();
        let rest = tokio::time::timeout(WAIT, body.collect())
            .await
            .expect("rest within the deadline")
            .expect("rest arrives")
            .to_bytes();
        assert_eq!(&rest[..], b"last");
        eventually("the stream to leave flight", || {
            let s = proxy.stats("stream");
            s["stats"]["in_flight"] == 0 && s["upstreams"]["st1"]["stats"]["in_flight"] == 0
        })
        .await;
        let stats = proxy.stats("stream");
        assert_eq!(stats["stats"]["bytes_out"], 10, "{stats}");
        assert_eq!(stats["stats"]["latency_ms"]["count"], 1, "{stats}");
    }

    #[tokio::test]
    async fn stopping_the_listener_lets_the_request_in_flight_finish() {
        let release = Arc::new(tokio::sync::Notify::new());
        let up = held_stream(release.clone()).await;
        let reg = registry(vec![
            instance("st1", "stream", up.port(), true),
            route("stream", json!({"protocol": "http", "service": "stream"})),
        ]);
        let proxy = Proxy::start(&reg).await;
        let req = proxy.request(Method::GET, "/feed", "");
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let resp = tokio::time::timeout(WAIT, client.request(req))
            .await
            .expect("head within the deadline")
            .expect("proxy answers");
        let Proxy { addr, listener, .. } = proxy;
        let shutdown = tokio::spawn(listener.shutdown(WAIT));
        // The port closes first; the connection in flight stays.
        eventually("the port to close", || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err()
        })
        .await;
        release.notify_one();
        let body = tokio::time::timeout(WAIT, resp.into_body().collect())
            .await
            .expect("body within the deadline")
            .expect("body arrives")
            .to_bytes();
        assert_eq!(&body[..], b"first,last");
        tokio::time::timeout(WAIT, shutdown)
            .await
            .expect("the listener drains")
            .expect("shutdown task");
    }

    #[tokio::test]
    async fn an_upgrade_is_passed_through_and_bytes_flow_both_ways() {
        let up = backend(|mut req: Request<Incoming>| async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("echo"));
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            resp
        })
        .await;
        let reg = registry(vec![
            instance("ws1", "ws", up.port(), true),
            route(
                "ws",
                json!({"protocol": "http", "service": "ws", "match": {"path_prefix": "/ws"}}),
            ),
        ]);
        let proxy = Proxy::start(&reg).await;
        let exchange = async {
            let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
            s.write_all(
                b"GET /ws HTTP/1.1\r\nHost: chat.local\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await
            .expect("send head");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).await.expect("read head");
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 101"), "{head}");
            assert!(head.contains("upgrade: echo"), "{head}");
            for msg in [&b"hello"[..], &b"again, longer"[..]] {
                s.write_all(msg).await.expect("send");
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await.expect("echo");
                assert_eq!(back, msg);
            }
            s
        };
        let s = tokio::time::timeout(WAIT, exchange)
            .await
            .expect("upgrade round trip within the deadline");
        let stats = proxy.stats("ws");
        assert_eq!(stats["stats"]["requests"], 1, "{stats}");
        assert_eq!(
            stats["stats"]["in_flight"], 1,
            "the tunnel is open: {stats}"
        );
        // Closing the client ends the tunnel, which counted the bytes of
        // both messages each way as they passed.
        drop(s);
        eventually("the tunnel to close", || {
            proxy.stats("ws")["stats"]["in_flight"] == 0
        })
        .await;
        let stats = proxy.stats("ws");
        assert_eq!(stats["stats"]["bytes_in"], 18, "{stats}");
        assert_eq!(stats["stats"]["bytes_out"], 18, "{stats}");
    }
}
