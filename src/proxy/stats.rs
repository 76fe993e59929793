//! Per-route and per-upstream traffic counters for `GET /v1/routes/{name}/stats`.
//!
//! Owns the counters and the latency histograms. Does not decide what is an
//! error: the protocol implementations report outcomes with an `ErrorKind`.
//!
//! Invariants: counters only grow (except `in_flight`, which an `InFlight`
//! guard raises and lowers exactly once); histograms are bounded (HDR with 2
//! significant figures from 1 µs to 1 h: a few KiB each); values above the
//! range are clamped, never dropped. Recording never blocks on I/O.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// What went wrong with a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No passing (or un-ejected) instance to send to.
    NoUpstream,
    /// The upstream refused or did not answer the connect.
    Connect,
    /// The connect or the response took longer than the route allows.
    Timeout,
    /// The upstream answered 5xx.
    Status5xx,
    /// The exchange broke after it started (reset, bad response, body error).
    Io,
    /// The upstream already had as many requests in flight through this
    /// node as it may (the request was refused with a 503).
    Busy,
}

impl ErrorKind {
    const ALL: [ErrorKind; 6] = [
        ErrorKind::NoUpstream,
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Status5xx,
        ErrorKind::Io,
        ErrorKind::Busy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoUpstream => "no_upstream",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Status5xx => "status_5xx",
            ErrorKind::Io => "io",
            ErrorKind::Busy => "busy",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// Counters for one route or one upstream.
#[derive(Debug)]
pub struct Stats {
    requests: AtomicU64,
    retries: AtomicU64,
    in_flight: AtomicI64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: [AtomicU64; 6],
    latency_us: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            errors: Default::default(),
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("static histogram bounds are valid"),
            ),
        }
    }
}

/// Something that holds a `Stats` (a route's counters, an upstream).
pub trait HasStats: Send + Sync + 'static {
    fn stats(&self) -> &Stats;
}

impl HasStats for Stats {
    fn stats(&self) -> &Stats {
        self
    }
}

/// Marks one request (or connection) in flight on its holder's stats until
/// dropped. Owns the holder, so a response body can keep the request in
/// flight until it has been sent.
pub struct InFlight(Arc<dyn HasStats>);

impl InFlight {
    /// Counts a request (or TCP connection) and marks it in flight.
    pub fn begin(owner: Arc<dyn HasStats>) -> Self {
        owner.stats().request();
        Self::hold(owner)
    }

    /// Marks one more in flight without counting a request (an upstream's
    /// share of a connection whose attempts were counted already).
    pub fn hold(owner: Arc<dyn HasStats>) -> Self {
        owner.stats().in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(owner)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats().in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the stats endpoint shows for one route or upstream.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatsView {
    pub requests: u64,
    pub retries: u64,
    pub in_flight: i64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Error counts by kind (every kind listed, zeros included).
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub latency_ms: Latency,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind.slot()].fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes from the client towards the upstream.
    pub fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes from the upstream towards the client.
    pub fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    pub fn latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut h = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record(us);
    }

    pub fn view(&self) -> StatsView {
        let h = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |us: u64| us as f64 / 1000.0;
        let latency_ms = Latency {
            count: h.len(),
            p50: if h.is_empty() {
                0.0
            } else {
                ms(h.value_at_quantile(0.5))
            },
            p99: if h.is_empty() {
                0.0
            } else {
                ms(h.value_at_quantile(0.99))
            },
            max: if h.is_empty() { 0.0 } else { ms(h.max()) },
        };
        StatsView {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            errors: ErrorKind::ALL
                .iter()
                .map(|k| (k.as_str(), self.errors[k.slot()].load(Ordering::Relaxed)))
                .collect(),
            latency_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_errors_and_latency() {
        let s = Arc::new(Stats::default());
        {
            let _g = InFlight::begin(s.clone());
            assert_eq!(s.in_flight(), 1);
            s.error(ErrorKind::Connect);
            s.retry();
        }
        for ms in 1..=100 {
            s.latency(Duration::from_millis(ms));
        }
        let v = s.view();
        assert_eq!(v.requests, 1);
        assert_eq!(v.in_flight, 0);
        assert_eq!(v.retries, 1);
        assert_eq!(v.errors["connect"], 1);
        assert_eq!(v.errors["timeout"], 0);
        assert_eq!(v.latency_ms.count, 100);
        assert!((v.latency_ms.p50 - 50.0).abs() < 1.0, "{v:?}");
        assert!((v.latency_ms.p99 - 99.0).abs() < 1.5, "{v:?}");
    }
}
