//! Which HTTP route takes a request: matching and the "most specific wins"
//! order, as a pure function of the routes and the request head.
//!
//! Owns the match semantics of `registry::HttpMatch` (host, path prefix,
//! path pattern, method, headers), the specificity order between routes
//! and the `strip_prefix` rewrite. Does not pick an upstream, open
//! connections or read the registry (the proxy builds a `Table` from the
//! applied routes whenever they change).
//!
//! Rules (the README's "Routes" section states them for users):
//! - Every field a match gives must hold. `host` compares case-insensitively
//!   with the request's host without its port. `path_prefix` matches at a
//!   segment boundary: `/api` takes `/api` and `/api/x`, not `/apix`.
//!   `path` is a pattern over `/`-separated segments: `*` is exactly one
//!   segment, a final `**` any rest (also none). `method` compares
//!   case-insensitively; `headers` need exact values, names
//!   case-insensitive.
//! - Most specific wins: a host beats none; then more literal path
//!   characters (wildcards count none); at equal count an exact pattern
//!   beats a prefix or a `**` pattern; then a method beats none; then more
//!   header conditions; then the higher `priority`; then the name
//!   (alphabetical), so the order is total and the same on every node.

use std::cmp::Reverse;

use crate::registry::{HttpMatch, Protocol, Route};

/// The request head a route is matched against.
pub trait Head {
    /// The `Host` (or `:authority`), possibly with a port.
    fn host(&self) -> Option<&str>;
    fn path(&self) -> &str;
    fn method(&self) -> &str;
    /// The first value of header `name` (lowercase).
    fn header(&self, name: &str) -> Option<&str>;
}

/// HTTP routes in match order.
#[derive(Debug, Default, Clone)]
pub struct Table {
    routes: Vec<Route>,
}

/// Sort key: smaller sorts first, so the most specific route comes first.
type Rank = (
    Reverse<bool>,
    Reverse<usize>,
    Reverse<bool>,
    Reverse<bool>,
    Reverse<usize>,
    Reverse<i32>,
);

fn rank(r: &Route) -> Rank {
    let empty = HttpMatch::default();
    let m = r.def.matcher.as_ref().unwrap_or(&empty);
    let (literal, exact) = match (&m.path, &m.path_prefix) {
        (Some(p), _) => (
            p.split('/')
                .filter(|s| *s != "*" && *s != "**")
                .map(str::len)
                .sum::<usize>(),
            !p.ends_with("/**") && p != "**",
        ),
        (None, Some(prefix)) => (prefix.len(), false),
        (None, None) => (0, false),
    };
    (
        Reverse(m.host.is_some()),
        Reverse(literal),
        Reverse(exact),
        Reverse(m.method.is_some()),
        Reverse(m.headers.len()),
        Reverse(r.def.priority),
    )
}

fn host_matches(want: &str, got: Option<&str>) -> bool {
    let Some(got) = got else {
        return false;
    };
    // `[v6]:port`, `name:port` → without the port.
    let bare = match got.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.is_empty() => h,
        _ => got,
    };
    bare.eq_ignore_ascii_case(want)
}

/// `prefix` at a segment boundary of `path`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
    }
}

/// `pattern` (see the module rules) against `path`; the query is not part
/// of either.
pub fn pattern_matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (Some("**"), _) => return true,
            (None, None) => return true,
            (Some("*"), Some(seg)) if !seg.is_empty() => {}
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

fn matches(m: &HttpMatch, head: &impl Head) -> bool {
    let path = head.path().split('?').next().unwrap_or("");
    m.host
        .as_deref()
        .is_none_or(|h| host_matches(h, head.host()))
        && m.path_prefix
            .as_deref()
            .is_none_or(|p| prefix_matches(p, path))
        && m.path.as_deref().is_none_or(|p| pattern_matches(p, path))
        && m.method
            .as_deref()
            .is_none_or(|x| x.eq_ignore_ascii_case(head.method()))
        && m.headers
            .iter()
            .all(|(k, v)| head.header(&k.to_ascii_lowercase()) == Some(v.as_str()))
}

impl Table {
    /// The HTTP routes among `routes`, ordered most specific first.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a Route>) -> Self {
        let mut routes: Vec<Route> = routes
            .into_iter()
            .filter(|r| r.def.protocol == Protocol::Http)
            .cloned()
            .collect();
        routes.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.name.cmp(&b.name)));
        Table { routes }
    }

    /// The route that takes `head`, if any.
    pub fn find(&self, head: &impl Head) -> Option<&Route> {
        self.routes.iter().find(|r| match &r.def.matcher {
            None => true,
            Some(m) => matches(m, head),
        })
    }

    /// Names in match order (for tests and the stats page).
    pub fn names(&self) -> Vec<&str> {
        self.routes.iter().map(|r| r.name.as_str()).collect()
    }
}

/// The path to send upstream: with `strip_prefix`, the matched prefix is
/// removed (an empty rest becomes `/`); the query is kept.
pub fn upstream_path(route: &Route, path_and_query: &str) -> String {
    let prefix = match (&route.def.matcher, route.def.strip_prefix) {
        (Some(m), true) => m.path_prefix.as_deref(),
        _ => None,
    };
    let Some(prefix) = prefix else {
        return path_and_query.to_string();
    };
    match path_and_query.strip_prefix(prefix.trim_end_matches('/')) {
        Some(rest) if rest.is_empty() || rest.starts_with('?') => format!("/{rest}"),
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        _ => path_and_query.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RouteDef;

    struct Req {
        host: Option<&'static str>,
        path: &'static str,
        method: &'static str,
        headers: Vec<(&'static str, &'static str)>,
    }

    impl Head for Req {
        fn host(&self) -> Option<&str> {
            self.host
        }
        fn path(&self) -> &str {
            self.path
        }
        fn method(&self) -> &str {
            self.method
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
        }
    }

    fn get(path: &'static str) -> Req {
        Req {
            host: Some("api.local:8080"),
            path,
            method: "GET",
            headers: vec![],
        }
    }

    fn route(name: &str, m: serde_json::Value, priority: i32) -> Route {
        let def: RouteDef = serde_json::from_value(serde_json::json!({
            "protocol": "http", "service": name, "match": m, "priority": priority,
        }))
        .expect("route");
        Route {
            name: name.into(),
            def,
            create_index: 1,
            modify_index: 1,
        }
    }

    #[test]
    fn paths_match_at_segment_boundaries_and_patterns_by_segment() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(prefix_matches("/", "/anything"));
        assert!(pattern_matches("/users/*/orders", "/users/7/orders"));
        assert!(!pattern_matches("/users/*/orders", "/users//orders"));
        assert!(!pattern_matches("/users/*/orders", "/users/7/orders/1"));
        assert!(pattern_matches("/static/**", "/static"));
        assert!(pattern_matches("/static/**", "/static/a/b.css"));
        assert!(!pattern_matches("/static/**", "/staticx"));
    }

    #[test]
    fn the_most_specific_route_wins_then_priority_then_name() {
        let routes = [
            route("catch-all", serde_json::json!({}), 0),
            route("api", serde_json::json!({"path_prefix": "/api"}), 0),
            route("api-v1", serde_json::json!({"path_prefix": "/api/v1"}), 0),
            route(
                "orders",
                serde_json::json!({"path": "/api/v1/users/*/orders"}),
                0,
            ),
            route(
                "api-post",
                serde_json::json!({"path_prefix": "/api", "method": "POST"}),
                0,
            ),
            route("host", serde_json::json!({"host": "api.local"}), 0),
            route(
                "canary",
                serde_json::json!({"path_prefix": "/api", "headers": {"X-Canary": "1"}}),
                0,
            ),
            route("api-b", serde_json::json!({"path_prefix": "/api"}), 5),
        ];
        let t = Table::new(routes.iter());
        let pick = |r: Req| t.find(&r).map(|r| r.name.clone()).unwrap_or_default();
        // A host condition beats any path.
        assert_eq!(pick(get("/api/v1/users/7/orders")), "host");
        let other_host = |path, method, headers| Req {
            host: Some("other"),
            path,
            method,
            headers,
        };
        assert_eq!(
            pick(other_host("/api/v1/users/7/orders", "GET", vec![])),
            "orders"
        );
        assert_eq!(pick(other_host("/api/v1/users", "GET", vec![])), "api-v1");
        assert_eq!(pick(other_host("/api/x", "POST", vec![])), "api-post");
        assert_eq!(
            pick(other_host("/api/x", "GET", vec![("x-canary", "1")])),
            "canary"
        );
        // Equal specificity: priority, then name.
        assert_eq!(pick(other_host("/api/x", "GET", vec![])), "api-b");
        assert_eq!(pick(other_host("/elsewhere", "GET", vec![])), "catch-all");
        let order = t.names();
        assert_eq!(order.first(), Some(&"host"));
        assert_eq!(order.last(), Some(&"catch-all"));
    }

    #[test]
    fn strip_prefix_keeps_a_rooted_path_and_the_query() {
        let mut r = route("a", serde_json::json!({"path_prefix": "/billing"}), 0);
        r.def.strip_prefix = true;
        assert_eq!(upstream_path(&r, "/billing/invoices?x=1"), "/invoices?x=1");
        assert_eq!(upstream_path(&r, "/billing"), "/");
        assert_eq!(upstream_path(&r, "/billing?x=1"), "/?x=1");
        r.def.strip_prefix = false;
        assert_eq!(upstream_path(&r, "/billing/invoices"), "/billing/invoices");
    }
}
