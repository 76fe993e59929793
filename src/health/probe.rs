//! HTTP and TCP checks, run by the node that owns each check.
//!
//! Owns the probe tasks of this node and the reconciler that starts and
//! stops them as the applied registry changes (a check registered, moved
//! here from a failed node, moved away, removed). Does not decide ownership
//! (`registry` reassigns checks when the leader declares a node failed) and
//! proposes nothing but status changes of checks this node owns.
//!
//! Consul's semantics: HTTP 2xx is passing, 429 warning, anything else, an
//! error or a timeout critical; a TCP connect that succeeds is passing.
//! Intervals below `MIN_INTERVAL` are raised to it (as Consul does).
//!
//! Invariants:
//! - A result is proposed only when it differs from the applied status, and
//!   carries this node as the expected owner, so a result from a node that
//!   lost the check is ignored by `apply`.
//! - At most one task per owned check; every probe is bounded by the
//!   check's `Timeout` (default 10 s) and reads at most `MAX_OUTPUT` bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Health;
use crate::registry::{parse_duration, CheckDef, CheckKind, CheckUpdate, Command, HealthStatus};

/// Shortest interval between two probes of one check.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Consul's default check timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an HTTP answer kept as the check's output.
pub const MAX_OUTPUT: usize = 4096;
/// Shortest gap between two reconciliations: the applied index moves with
/// every write, and one pass over the checks is enough per gap.
const RECONCILE_GAP: Duration = Duration::from_millis(100);
/// Longest gap, in case no write happens at all.
const RECONCILE_MAX: Duration = Duration::from_secs(1);

/// The HTTP client shared by this node's checks.
pub struct Prober {
    http: reqwest::Client,
}

impl Prober {
    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(10))
            .pool_max_idle_per_host(2)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Prober { http })
    }

    /// Runs `def` once.
    pub async fn probe(&self, def: &CheckDef) -> (HealthStatus, String) {
        let timeout = def
            .timeout
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or(DEFAULT_TIMEOUT);
        match def.kind() {
            CheckKind::Http => self.http(def, timeout).await,
            CheckKind::Tcp => tcp(def.tcp.as_deref().unwrap_or(""), timeout).await,
            CheckKind::Ttl(_) | CheckKind::Static => (HealthStatus::Critical, String::new()),
        }
    }

    async fn http(&self, def: &CheckDef, timeout: Duration) -> (HealthStatus, String) {
        let url = def.http.as_deref().unwrap_or("");
        let method_name = def.method.as_deref().unwrap_or("GET");
        let method = match reqwest::Method::from_bytes(method_name.as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                return (
                    HealthStatus::Critical,
                    format!("invalid HTTP method {method_name:?}"),
                )
            }
        };
        let mut req = self.http.request(method.clone(), url).timeout(timeout);
        for (name, values) in &def.header {
            for v in values {
                req = req.header(name.as_str(), v.as_str());
            }
        }
        if let Some(body) = &def.body {
            req = req.body(body.clone());
        }
        let res = match req.send().await {
            Ok(res) => res,
            Err(e) => {
                return (
                    HealthStatus::Critical,
                    format!("HTTP {method} {url}: {}", error_chain(&e)),
                )
            }
        };
        let code = res.status();
        let status = if code.is_success() {
            HealthStatus::Passing
        } else if code.as_u16() == 429 {
            HealthStatus::Warning
        } else {
            HealthStatus::Critical
        };
        let body = read_some(res, MAX_OUTPUT).await;
        (
            status,
            format!("HTTP {method} {url}: {code} Output: {body}"),
        )
    }
}

/// `e` and every error under it, `outer: inner: …` (reqwest and hyper
/// keep the useful part, such as "connection refused", in the sources).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The first `limit` bytes of a body (lossy UTF-8); the rest is not read.
async fn read_some(mut res: reqwest::Response, limit: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < limit {
        match res.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c[..c.len().min(limit - buf.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

async fn tcp(addr: &str, timeout: Duration) -> (HealthStatus, String) {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (
            HealthStatus::Passing,
            format!("TCP connect {addr}: Success"),
        ),
        Ok(Err(e)) => (HealthStatus::Critical, format!("TCP connect {addr}: {e}")),
        Err(_) => (
            HealthStatus::Critical,
            format!("TCP connect {addr}: timed out after {timeout:?}"),
        ),
    }
}

fn interval_of(def: &CheckDef) -> Duration {
    def.interval
        .as_deref()
        .and_then(|i| parse_duration(i).ok())
        .unwrap_or(MIN_INTERVAL)
        .max(MIN_INTERVAL)
}

/// Probes one check every interval until `stop`, proposing changes.
async fn run_check(health: Arc<Health>, def: CheckDef, stop: CancellationToken) {
    let me = health.node().id();
    let mut tick = tokio::time::interval(interval_of(&def));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (status, output) = tokio::select! {
            _ = stop.cancelled() => return,
            r = health.probes.probe(&def) => r,
        };
        let applied = health
            .node()
            .state()
            .check(&def.check_id)
            .map(|c| (c.status, c.owner));
        match applied {
            Some((current, owner)) if owner == me && current != status => {
                tracing::info!(from = current.as_str(), to = status.as_str(), %output, "check changed");
                let cmd = Command::UpdateChecks {
                    updates: vec![CheckUpdate {
                        check_id: def.check_id.clone(),
                        status,
                        output,
                        owner: Some(me),
                    }],
                };
                if let Err(e) = health.node().write(cmd).await {
                    // The next probe proposes again if it still differs.
                    tracing::warn!(error = %e, "could not record the check result");
                }
            }
            Some(_) => {}
            None => return,
        }
    }
}

/// Keeps one task per active check this node owns, until `stop`.
pub async fn run(health: Arc<Health>, stop: CancellationToken) {
    let me = health.node().id();
    let mut applied = health.node().shared().subscribe_applied();
    let mut running: HashMap<String, (CheckDef, CancellationToken)> = HashMap::new();
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let wanted: HashMap<String, CheckDef> = health
            .node()
            .state()
            .checks()
            .filter(|c| c.owner == me && c.def.is_active())
            .map(|c| (c.def.check_id.clone(), c.def.clone()))
            .collect();
        running.retain(|id, (def, token)| {
            let keep = wanted.get(id) == Some(def);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (id, def) in wanted {
            if running.contains_key(&id) {
                continue;
            }
            tracing::info!(check = %id, "running check on this node");
            let token = stop.child_token();
            let span = tracing::info_span!("check", id = %id);
            tasks.spawn(run_check(health.clone(), def.clone(), token.clone()).instrument(span));
            running.insert(id, (def, token));
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(RECONCILE_GAP) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = applied.changed() => {}
            _ = tokio::time::sleep(RECONCILE_MAX) => {}
        }
    }
    tasks.close();
    tasks.wait().await;
}
