//! The proxy's view of the registry: for every route, the upstreams it may
//! send to, rebuilt from the node's applied state whenever it changes.
//!
//! Owns `View` (what the request path reads), per-upstream passive outlier
//! ejection and the choice of an upstream for one attempt (`choose`). Does
//! not open connections or serve requests (`http`, `tcp`) and never writes
//! to Raft: it only reads the applied `Registry`.
//!
//! Invariants:
//! - A route's upstreams are the instances of its `service` whose health is
//!   passing and that carry every tag the route names, sorted by ID; an
//!   instance without an address is reached at its node's IP.
//! - Counters survive rebuilds: a route keeps its `Stats` and turn counter
//!   while its name exists, an upstream its `Stats` and ejection state while
//!   its (ID, address, weight) stays the same.
//! - Ejection is passive: `EJECT_AFTER` consecutive failures take an
//!   upstream out for `COOL_OFF`; one success resets the count. When every
//!   upstream is ejected, all are used again (a guess beats a certain 503).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::balance::{self, Candidate};
use super::matcher::Table;
use super::stats::{ErrorKind, HasStats, Stats};
use crate::registry::{parse_duration, HealthStatus, Protocol, Registry, Route, ServiceInstance};

/// Consecutive failures that eject an upstream.
pub const EJECT_AFTER: u32 = 3;
/// How long an ejected upstream stays out.
pub const COOL_OFF: Duration = Duration::from_secs(5);
/// Connect timeout when a route gives none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP: bound on connect plus the wait for the response head (for a
/// streamed upload, also the time the upstream takes to read the body)
/// when a route gives none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One instance as a route's upstream.
#[derive(Debug)]
pub struct Upstream {
    /// The instance ID.
    pub id: String,
    /// `host:port` to connect to.
    pub addr: String,
    pub weight: u32,
    pub stats: Stats,
    failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Upstream {
    fn new(id: String, addr: String, weight: u32) -> Self {
        Upstream {
            id,
            addr,
            weight,
            stats: Stats::default(),
            failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    /// Reports the outcome of one attempt (connect failures, timeouts, I/O
    /// errors and 5xx answers count as failures).
    pub fn report(&self, ok: bool) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER {
            self.failures.store(0, Ordering::Relaxed);
            let until = Instant::now() + COOL_OFF;
            *self.ejected_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
            tracing::warn!(upstream = %self.id, addr = %self.addr, failures = n,
                "ejecting upstream for {COOL_OFF:?}");
        }
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let g = self.ejected_until.lock().unwrap_or_else(|p| p.into_inner());
        matches!(*g, Some(t) if t > now)
    }
}

impl HasStats for Upstream {
    fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Candidate for Arc<Upstream> {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_flight(&self) -> i64 {
        self.stats.in_flight()
    }
    fn weight(&self) -> u32 {
        self.weight
    }
}

/// One route with its current upstreams.
#[derive(Debug)]
pub struct RouteState {
    pub route: Route,
    pub upstreams: Vec<Arc<Upstream>>,
    pub stats: Arc<Stats>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    rr: Arc<AtomicUsize>,
}

impl RouteState {
    pub fn name(&self) -> &str {
        &self.route.name
    }

    /// The upstream for the next attempt: not among `tried` (instance IDs),
    /// not ejected unless all are, chosen by the route's balancer.
    pub fn choose(&self, key: Option<&[u8]>, tried: &[String]) -> Option<Arc<Upstream>> {
        let now = Instant::now();
        let fresh: Vec<Arc<Upstream>> = self
            .upstreams
            .iter()
            .filter(|u| !tried.contains(&u.id))
            .cloned()
            .collect();
        let usable: Vec<Arc<Upstream>> = fresh
            .iter()
            .filter(|u| !u.is_ejected(now))
            .cloned()
            .collect();
        let from = if usable.is_empty() { fresh } else { usable };
        balance::pick(self.route.def.lb, &from, key, &self.rr).map(|i| from[i].clone())
    }

    /// Counts a failed attempt on `up`: on both stats, and towards `up`'s
    /// ejection.
    pub fn failed(&self, up: &Upstream, kind: ErrorKind) {
        up.report(false);
        up.stats.error(kind);
        self.stats.error(kind);
    }

    /// The stats endpoint's answer for this route.
    pub fn stats_json(&self) -> Value {
        let now = Instant::now();
        let upstreams: BTreeMap<&str, Value> = self
            .upstreams
            .iter()
            .map(|u| {
                (
                    u.id.as_str(),
                    json!({
                        "address": u.addr,
                        "weight": u.weight,
                        "ejected": u.is_ejected(now),
                        "stats": u.stats.view(),
                    }),
                )
            })
            .collect();
        json!({
            "route": self.route.name,
            "service": self.route.def.service,
            "protocol": self.route.def.protocol,
            "lb": self.route.def.lb,
            "stats": self.stats.view(),
            "upstreams": upstreams,
        })
    }
}

/// Everything the request path reads, replaced as a whole on each change.
#[derive(Debug, Default)]
pub struct View {
    /// Applied index this view was built at.
    pub index: u64,
    /// HTTP routes in match order.
    pub http: Table,
    /// Every route (HTTP and TCP) by name.
    pub routes: BTreeMap<String, Arc<RouteState>>,
}

impl View {
    /// The view of `reg`, reusing `prev`'s counters (see the invariants).
    pub fn build(reg: &Registry, prev: &View) -> View {
        let mut routes = BTreeMap::new();
        for route in reg.routes() {
            let old = prev.routes.get(&route.name);
            let reuse = |id: &str, addr: &str, weight: u32| {
                old.and_then(|o| {
                    o.upstreams
                        .iter()
                        .find(|u| u.id == id && u.addr == addr && u.weight == weight)
                        .cloned()
                })
            };
            let mut upstreams: Vec<Arc<Upstream>> =
                passing_instances(reg, &route.def.service, &route.def.tags)
                    .map(|(s, addr)| {
                        let weight = s.spec.weights.passing;
                        reuse(&s.spec.id, &addr, weight).unwrap_or_else(|| {
                            Arc::new(Upstream::new(s.spec.id.to_string(), addr, weight))
                        })
                    })
                    .collect();
            upstreams.sort_by(|a, b| a.id.cmp(&b.id));
            let timeout = |s: &Option<String>, default| {
                s.as_deref()
                    .and_then(|d| parse_duration(d).ok())
                    .unwrap_or(default)
            };
            let state = RouteState {
                connect_timeout: timeout(&route.def.connect_timeout, DEFAULT_CONNECT_TIMEOUT),
                request_timeout: timeout(&route.def.request_timeout, DEFAULT_REQUEST_TIMEOUT),
                stats: old.map(|o| o.stats.clone()).unwrap_or_default(),
                rr: old.map(|o| o.rr.clone()).unwrap_or_default(),
                upstreams,
                route: route.clone(),
            };
            routes.insert(route.name.clone(), Arc::new(state));
        }
        View {
            index: reg.last_index(),
            http: Table::new(reg.routes().filter(|r| r.def.protocol == Protocol::Http)),
            routes,
        }
    }
}

/// The passing instances of `service` that carry every one of `tags`, with
/// their `host:port`: what the proxy and stream deliveries send to.
pub fn passing_instances<'a>(
    reg: &'a Registry,
    service: &'a str,
    tags: &'a [String],
) -> impl Iterator<Item = (&'a ServiceInstance, String)> + 'a {
    reg.instances_of(service)
        .filter(|s| reg.instance_status(s) == HealthStatus::Passing)
        .filter(|s| {
            tags.iter()
                .all(|t| s.spec.tags.iter().any(|have| have.as_str() == t))
        })
        .filter_map(|s| Some((s, address_of(reg, s)?)))
}

/// `host:port` of an instance: its address, else its node's IP.
fn address_of(reg: &Registry, s: &ServiceInstance) -> Option<String> {
    let host = if s.spec.address.is_empty() {
        let node = reg.node(s.node)?;
        let sa: std::net::SocketAddr = node.api_addr.parse().ok()?;
        sa.ip().to_string()
    } else {
        s.spec.address.to_string()
    };
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", s.spec.port)
    } else {
        format!("{host}:{}", s.spec.port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Command, NodeEntry, RouteDef, ServiceSpec};

    fn reg_with(instances: &[(&str, &[&str], u16)]) -> Registry {
        let mut reg = Registry::new();
        let mut node = NodeEntry::test(1);
        node.api_addr = "127.0.0.9:8500".into();
        reg.set_members(1, vec![node]);
        for (i, (id, tags, port)) in instances.iter().enumerate() {
            reg.apply(
                10 + i as u64,
                &Command::RegisterService {
                    via_node: 1,
                    service: ServiceSpec {
                        id: (*id).into(),
                        name: "web".into(),
                        tags: tags.iter().map(|t| (*t).into()).collect(),
                        port: *port,
                        ..Default::default()
                    },
                },
            );
        }
        reg
    }

    fn put_route(reg: &mut Registry, index: u64, def: serde_json::Value) {
        let def: RouteDef = serde_json::from_value(def).expect("route def");
        reg.apply(
            index,
            &Command::PutRoute {
                name: "r".into(),
                def,
            },
        );
    }

    #[test]
    fn upstreams_are_the_passing_tagged_instances_at_their_node_ip() {
        let mut reg = reg_with(&[("a", &["v2"], 1), ("b", &[], 2), ("c", &["v2", "x"], 3)]);
        put_route(
            &mut reg,
            50,
            serde_json::json!({"protocol": "http", "service": "web", "tags": ["v2"]}),
        );
        let view = View::build(&reg, &View::default());
        let r = &view.routes["r"];
        let got: Vec<(&str, &str)> = r
            .upstreams
            .iter()
            .map(|u| (u.id.as_str(), u.addr.as_str()))
            .collect();
        assert_eq!(got, vec![("a", "127.0.0.9:1"), ("c", "127.0.0.9:3")]);
        assert_eq!(view.http.names(), vec!["r"]);
        // A failed node takes its check-less instances out.
        reg.apply(
            51,
            &Command::SetNodeHealth {
                node: 1,
                failed: true,
            },
        );
        let view = View::build(&reg, &view);
        assert!(view.routes["r"].upstreams.is_empty());
        assert!(view.routes["r"].choose(None, &[]).is_none());
    }

    #[test]
    fn counters_and_ejections_survive_rebuilds() {
        let mut reg = reg_with(&[("a", &[], 1), ("b", &[], 2)]);
        put_route(
            &mut reg,
            50,
            serde_json::json!({"protocol": "tcp", "service": "web", "listen_port": 7000,
                "connect_timeout": "250ms"}),
        );
        let v1 = View::build(&reg, &View::default());
        let r1 = &v1.routes["r"];
        assert_eq!(r1.connect_timeout, Duration::from_millis(250));
        assert_eq!(r1.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        r1.stats.request();
        for _ in 0..EJECT_AFTER {
            r1.upstreams[0].report(false);
        }
        let v2 = View::build(&reg, &v1);
        let r2 = &v2.routes["r"];
        assert_eq!(r2.stats.view().requests, 1);
        assert!(r2.upstreams[0].is_ejected(Instant::now()));
        // The ejected upstream is skipped while another is usable ...
        for _ in 0..5 {
            assert_eq!(r2.choose(None, &[]).expect("some").id, "b");
        }
        // ... and used when it is the only one left.
        assert_eq!(r2.choose(None, &["b".into()]).expect("some").id, "a");
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let u = Upstream::new("a".into(), "127.0.0.1:1".into(), 1);
        for _ in 0..EJECT_AFTER - 1 {
            u.report(false);
        }
        u.report(true);
        u.report(false);
        assert!(!u.is_ejected(Instant::now()));
    }
}
