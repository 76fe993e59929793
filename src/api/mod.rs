//! The client-facing HTTP API: Consul-compatible routes, native routes,
//! read consistency and the `X-Consul-*` headers.
//!
//! Owns routing, the per-request tracing span, the request bounds (body
//! size, in-flight count, duration; blocking queries have their own budget)
//! and the read path (`settle`, `read`): default and `?consistent` reads
//! pass `RaftNode::linearize` first; `?stale` answers from the local applied
//! state; `?index=N` then waits on the watch hub until a kind of state the
//! answer reads changes past N. Does not own state or decide anything:
//! writes go to `RaftNode::write`.
//!
//! Invariant: every answer that carries registry data carries
//! `X-Consul-Index` (the index of the last change to the kinds it reads,
//! taken before the data, at least 1, never decreasing on a node),
//! `X-Consul-KnownLeader` and `X-Consul-LastContact`.

pub mod body;
mod consul;
pub mod error;
mod health;
mod kv;
mod native;
mod route;
mod session;
mod stream;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::health::Health;
use crate::raft::bootstrap::PATH_JOIN;
use crate::raft::RaftNode;
use crate::registry::{Kind, Registry};
use body::Params;
use error::ApiError;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How a read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Linearizable, Consul's default mode.
    Leader,
    /// Linearizable, explicitly requested.
    Consistent,
    /// Local applied state.
    Stale,
}

impl Consistency {
    pub fn from_params(p: &Params) -> Result<Self, ApiError> {
        match (p.has("stale"), p.has("consistent")) {
            (true, true) => Err(ApiError::BadRequest(
                "?stale and ?consistent cannot be combined".into(),
            )),
            (true, false) => Ok(Consistency::Stale),
            (false, true) => Ok(Consistency::Consistent),
            (false, false) => Ok(Consistency::Leader),
        }
    }

    fn header(self) -> &'static str {
        match self {
            Consistency::Leader => "leader",
            Consistency::Consistent => "consistent",
            Consistency::Stale => "stale",
        }
    }
}

/// Set on every answer, so built once; values come from integers or static
/// text, without formatting a `String` per header.
const X_INDEX: HeaderName = HeaderName::from_static("x-consul-index");
const X_KNOWN_LEADER: HeaderName = HeaderName::from_static("x-consul-knownleader");
const X_LAST_CONTACT: HeaderName = HeaderName::from_static("x-consul-lastcontact");
const X_ACL: HeaderName = HeaderName::from_static("x-consul-default-acl-policy");
const X_CONSISTENCY: HeaderName = HeaderName::from_static("x-consul-effective-consistency");

fn consul_headers(res: &mut Response, node: &RaftNode, index: u64, mode: Option<Consistency>) {
    let meta = node.read_meta();
    let h = res.headers_mut();
    h.insert(X_INDEX, HeaderValue::from(index.max(1)));
    let known = if meta.known_leader { "true" } else { "false" };
    h.insert(X_KNOWN_LEADER, HeaderValue::from_static(known));
    h.insert(X_LAST_CONTACT, HeaderValue::from(meta.last_contact_ms));
    h.insert(X_ACL, HeaderValue::from_static("allow"));
    if let Some(m) = mode {
        h.insert(X_CONSISTENCY, HeaderValue::from_static(m.header()));
    }
}

/// Default blocking wait, as in Consul.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// Longest blocking wait (before jitter), as in Consul.
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// A blocking query's `?index=N&wait=D`, if the request makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    pub index: u64,
    /// Capped, with jitter added.
    pub wait: Duration,
}

impl Blocking {
    /// `None` without `?index` (or with `index=0`, which Consul answers at
    /// once too).
    pub fn from_params(p: &Params) -> Result<Option<Self>, ApiError> {
        let Some(raw) = p.get("index") else {
            return Ok(None);
        };
        let index: u64 = raw.trim().parse().map_err(|_| {
            ApiError::BadRequest(format!("?index must be an unsigned integer, got {raw:?}"))
        })?;
        let wait = match p.get("wait").filter(|w| !w.is_empty()) {
            None => DEFAULT_WAIT,
            Some(w) => crate::registry::parse_duration(w)
                .map_err(|e| ApiError::BadRequest(format!("?wait: {e}")))?
                .min(MAX_WAIT),
        };
        if index == 0 {
            return Ok(None);
        }
        // Consul's jitter (up to wait/16) spreads the wake-ups of clients
        // that started together.
        let jitter_ms = u64::try_from(wait.as_millis() / 16).unwrap_or(0);
        let jitter =
            Duration::from_millis(rand::Rng::gen_range(&mut rand::thread_rng(), 0..=jitter_ms));
        Ok(Some(Blocking {
            index,
            wait: wait + jitter,
        }))
    }
}

/// The part of every read before it looks at data: consistency (a read
/// barrier unless `?stale`), then, for a blocking query, the wait until one
/// of `kinds` changes past the client's index. Returns the index to report
/// (read *before* the data, so the data is at least that new).
pub(crate) async fn settle(
    node: &RaftNode,
    p: &Params,
    kinds: &[Kind],
) -> Result<(u64, Consistency), ApiError> {
    let mode = Consistency::from_params(p)?;
    let blocking = Blocking::from_params(p)?;
    if mode != Consistency::Stale {
        node.linearize().await?;
    }
    let hub = node.shared().hub();
    let index = match blocking {
        Some(b) => {
            hub.wait(kinds, b.index, tokio::time::Instant::now() + b.wait)
                .await
        }
        None => hub.index(kinds),
    };
    Ok((index, mode))
}

/// Serves `f` over the registry with the consistency `p` asks for, as a
/// blocking query on `kinds` when `p` has `?index`.
pub(crate) async fn read<T: Serialize>(
    node: &RaftNode,
    p: &Params,
    kinds: &[Kind],
    f: impl FnOnce(&Registry) -> T,
) -> Result<Response, ApiError> {
    let (index, mode) = settle(node, p, kinds).await?;
    let body = f(&node.state());
    let mut res = Json(body).into_response();
    consul_headers(&mut res, node, index, Some(mode));
    Ok(res)
}

/// Like `read`, for one stored object: `f` finds it, and a miss is a 404
/// saying `missing()` (with the read headers, as Consul's 404s carry them).
pub(crate) async fn read_one<T: Serialize>(
    node: &RaftNode,
    p: &Params,
    kinds: &[Kind],
    f: impl FnOnce(&Registry) -> Option<T>,
    missing: impl FnOnce() -> String,
) -> Result<Response, ApiError> {
    let (index, mode) = settle(node, p, kinds).await?;
    let found = f(&node.state());
    let res = match found {
        Some(v) => Json(v).into_response(),
        None => ApiError::NotFound(missing()).into_response(),
    };
    Ok(with_read_headers(res, node, index, mode))
}

/// Adds the read headers to a response built by the handler (404s, raw
/// values).
pub(crate) fn with_read_headers(
    mut res: Response,
    node: &RaftNode,
    index: u64,
    mode: Consistency,
) -> Response {
    consul_headers(&mut res, node, index, Some(mode));
    res
}

/// A local (non-registry) JSON answer that still carries the headers.
pub(crate) fn local_json(node: &RaftNode, body: serde_json::Value) -> Response {
    let mut res = Json(body).into_response();
    let index = node.shared().applied_index();
    consul_headers(&mut res, node, index, Some(Consistency::Stale));
    res
}

/// A write's answer: Consul's empty 200 (or `body`) plus the commit index.
pub(crate) fn write_response(
    node: &RaftNode,
    index: u64,
    body: Option<serde_json::Value>,
) -> Response {
    let mut res = match body {
        Some(b) => Json(b).into_response(),
        None => ().into_response(),
    };
    consul_headers(&mut res, node, index, None);
    res
}

/// Bounds on client requests: how many run at once and for how long.
struct Limits {
    /// One permit per in-flight request; taken before any work, so an
    /// overloaded node sheds load with a 503 instead of queueing without end.
    permits: Semaphore,
    timeout: Duration,
    /// Blocking queries wait for minutes, mostly asleep: they have their own,
    /// larger budget and a deadline past the longest wait.
    blocking: Semaphore,
}

/// Most blocking queries waiting at once on a node.
pub const MAX_BLOCKING: usize = 8 * 1024;
/// Longest a blocking query may run: the longest wait plus its jitter plus
/// the read barrier's worst case.
pub const BLOCKING_TIMEOUT: Duration = Duration::from_secs(10 * 60 + 40 + 60);

/// True when the request is a blocking query (`?index=` non-zero).
fn is_blocking(req: &Request) -> bool {
    req.method() == axum::http::Method::GET
        && req.uri().query().is_some_and(|q| {
            form_urlencoded::parse(q.as_bytes())
                .any(|(k, v)| k == "index" && v.trim().parse::<u64>().is_ok_and(|i| i > 0))
        })
}

/// Longest any client request may run. Writes need at most leader wait +
/// commit wait + forwarding slack, well below this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Most client requests in flight at once.
pub const MAX_IN_FLIGHT: usize = 1024;

async fn guard(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    let span = tracing::info_span!("http", method = %req.method(), path = %req.uri().path());
    async move {
        let (permits, timeout) = if is_blocking(&req) {
            (&limits.blocking, BLOCKING_TIMEOUT)
        } else {
            (&limits.permits, limits.timeout)
        };
        let Ok(_permit) = permits.try_acquire() else {
            return ApiError::Overloaded.into_response();
        };
        let res = match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(res) => res,
            Err(_) => ApiError::RequestTimeout.into_response(),
        };
        tracing::debug!(status = res.status().as_u16(), "answered");
        res
    }
    .instrument(span)
    .await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// What handlers extract: most need only the Raft handle. One `Arc`, because
/// axum clones the state for every request.
#[derive(Clone)]
struct AppState(Arc<Shared>);

struct Shared {
    node: Arc<RaftNode>,
    health: Arc<Health>,
    /// This node's routing proxy, when it runs one (`--proxy-addr`).
    proxy: Option<Arc<crate::proxy::Proxy>>,
    streams: Arc<crate::stream::Streams>,
}

impl FromRef<AppState> for Arc<crate::stream::Streams> {
    fn from_ref(s: &AppState) -> Self {
        s.0.streams.clone()
    }
}

impl FromRef<AppState> for Option<Arc<crate::proxy::Proxy>> {
    fn from_ref(s: &AppState) -> Self {
        s.0.proxy.clone()
    }
}

impl FromRef<AppState> for Arc<RaftNode> {
    fn from_ref(s: &AppState) -> Self {
        s.0.node.clone()
    }
}

impl FromRef<AppState> for Arc<Health> {
    fn from_ref(s: &AppState) -> Self {
        s.0.health.clone()
    }
}

/// The client router over `health` (and the node it belongs to).
pub fn router(
    health: Arc<Health>,
    proxy: Option<Arc<crate::proxy::Proxy>>,
    streams: Arc<crate::stream::Streams>,
) -> Router {
    let state = AppState(Arc::new(Shared {
        node: health.node().clone(),
        health,
        proxy,
        streams,
    }));
    Router::new()
        .route("/v1/agent/service/register", put(consul::register))
        .route("/v1/agent/service/deregister/{id}", put(consul::deregister))
        .route("/v1/agent/services", get(consul::agent_services))
        .route("/v1/agent/checks", get(health::agent_checks))
        .route("/v1/agent/check/register", put(health::register_check))
        .route(
            "/v1/agent/check/deregister/{id}",
            put(health::deregister_check),
        )
        .route("/v1/agent/check/update/{id}", put(health::ttl_update))
        .route("/v1/agent/check/{verb}/{id}", put(health::ttl_beat))
        .route("/v1/health/checks/{service}", get(health::service_checks))
        .route("/v1/health/node/{node}", get(health::node_checks))
        .route("/v1/health/state/{state}", get(health::state_checks))
        .route("/v1/cluster/stats", get(health::cluster_stats))
        .route("/v1/catalog/services", get(consul::catalog_services))
        .route("/v1/catalog/service/{name}", get(consul::catalog_service))
        .route("/v1/catalog/nodes", get(consul::catalog_nodes))
        .route("/v1/health/service/{name}", get(consul::health_service))
        .route("/v1/watch", get(watch::stream))
        .route("/v1/kv/", get(kv::get).delete(kv::delete))
        .route(
            "/v1/kv/{*key}",
            get(kv::get).put(kv::put).delete(kv::delete),
        )
        .route("/v1/routes", get(route::list))
        .route(
            "/v1/routes/{name}",
            get(route::get).put(route::put).delete(route::delete),
        )
        .route("/v1/routes/{name}/stats", get(route::stats))
        .route("/v1/streams", get(stream::list))
        .route(
            "/v1/streams/{name}",
            get(stream::get).put(stream::put).delete(stream::delete),
        )
        .route(
            "/v1/streams/{name}/events",
            post(stream::events).get(stream::events),
        )
        .route("/v1/streams/{name}/subscribe", get(stream::subscribe))
        .route("/v1/streams/{name}/stats", get(stream::stats))
        .route(
            "/v1/streams/{name}/subscriptions",
            get(stream::list_subscriptions),
        )
        .route(
            "/v1/streams/{name}/subscriptions/{sub}",
            get(stream::get_subscription)
                .put(stream::put_subscription)
                .delete(stream::delete_subscription),
        )
        .route("/v1/session/create", put(session::create))
        .route("/v1/session/destroy/{id}", put(session::destroy))
        .route("/v1/session/renew/{id}", put(session::renew))
        .route("/v1/session/info/{id}", get(session::info))
        .route("/v1/session/list", get(session::list))
        .route("/v1/session/node/{node}", get(session::of_node))
        .route("/v1/status/leader", get(consul::status_leader))
        .route("/v1/status/peers", get(consul::status_peers))
        .route(
            "/v1/cluster/members",
            get(native::members).post(native::add_member),
        )
        .route(
            "/v1/cluster/members/{id}",
            axum::routing::delete(native::remove_member),
        )
        .route("/v1/cluster/status", get(native::status))
        .route(PATH_JOIN, post(native::join))
        .route("/livez", get(native::livez))
        .route("/readyz", get(native::readyz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(Limits {
                permits: Semaphore::new(MAX_IN_FLIGHT),
                timeout: REQUEST_TIMEOUT,
                blocking: Semaphore::new(MAX_BLOCKING),
            }),
            guard,
        ))
        .with_state(state)
}
