//! Routes: the replicated configuration of every node's proxy.
//!
//! Owns `RouteDef` (what a client puts), `Route` (what is stored), their
//! validation and the rules of applying them. Does not route traffic (the
//! proxy reads applied routes) and does not render JSON beyond serde.
//!
//! Invariants:
//! - A stored route passed `RouteDef::validate`; only validated
//!   definitions are proposed, and `apply` re-checks what depends on other
//!   routes (a TCP `listen_port` belongs to at most one route), so every
//!   replica refuses the same conflicting write.
//! - Durations are kept as the Go-style strings the client gave, already
//!   known to parse.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{parse_duration, Registry, Response, StateKey};

/// Longest route name.
pub const MAX_NAME: usize = 128;
/// Most retries a route may ask for.
pub const MAX_RETRIES: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    #[default]
    RoundRobin,
    LeastConnections,
    /// Power of two random choices.
    Random,
    /// By the instances' `Weights`.
    Weighted,
    /// Sticky on the value of `hash_header`.
    ConsistentHash,
}

/// Which HTTP requests a route takes. Every given field must match; an
/// empty match takes every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMatch {
    /// Exact host (without port), case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// A path pattern: `*` matches one segment, a trailing `**` any rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header name (case-insensitive) → exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A route as a client defines it (`PUT /v1/routes/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDef {
    pub protocol: Protocol,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<HttpMatch>,
    /// TCP routes: the port every node's proxy binds for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    pub service: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub lb: Balancer,
    /// `consistent_hash`: the request header whose value picks the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// Remove the matched `path_prefix` before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    #[serde(default)]
    pub retries: u32,
    /// Breaks ties between equally specific HTTP matches (higher wins).
    #[serde(default)]
    pub priority: i32,
}

/// A stored route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub name: String,
    #[serde(flatten)]
    pub def: RouteDef,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Why a route definition is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(pub String);

fn bad(msg: impl Into<String>) -> RouteError {
    RouteError(msg.into())
}

/// Route names are path segments: letters, digits, `-`, `_`, `.`.
pub fn validate_name(name: &str) -> Result<(), RouteError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad(format!(
            "a route name must be 1 to {MAX_NAME} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad(format!(
            "route name {name:?} may contain only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

fn duration(field: &str, v: &Option<String>) -> Result<(), RouteError> {
    if let Some(s) = v {
        let d = parse_duration(s).map_err(|e| bad(format!("{field}: {e}")))?;
        if d.is_zero() {
            return Err(bad(format!("{field} must be more than 0")));
        }
    }
    Ok(())
}

impl RouteDef {
    /// Checks everything that depends on this definition alone.
    pub fn validate(&self) -> Result<(), RouteError> {
        if self.service.trim().is_empty() {
            return Err(bad("service is required"));
        }
        match self.protocol {
            Protocol::Tcp => {
                if self.matcher.is_some() {
                    return Err(bad("a tcp route takes no match (it owns listen_port)"));
                }
                match self.listen_port {
                    None | Some(0) => return Err(bad("a tcp route needs listen_port (1-65535)")),
                    Some(_) => {}
                }
                if self.strip_prefix || self.hash_header.is_some() {
                    return Err(bad(
                        "strip_prefix and hash_header apply to http routes only",
                    ));
                }
                if self.lb == Balancer::ConsistentHash {
                    return Err(bad(
                        "consistent_hash needs an http route (it hashes a header)",
                    ));
                }
            }
            Protocol::Http => {
                if self.listen_port.is_some() {
                    return Err(bad(
                        "listen_port is for tcp routes; http routes share the proxy address",
                    ));
                }
                if let Some(m) = &self.matcher {
                    for (field, p) in [("path_prefix", &m.path_prefix), ("path", &m.path)] {
                        if p.as_deref().is_some_and(|p| !p.starts_with('/')) {
                            return Err(bad(format!("match.{field} must start with '/'")));
                        }
                    }
                    if let Some(p) = &m.path {
                        if p.split('/').rev().skip(1).any(|seg| seg == "**") {
                            return Err(bad("match.path: '**' may only be the last segment"));
                        }
                    }
                    if m.method.as_deref().is_some_and(|x| {
                        x.is_empty() || !x.chars().all(|c| c.is_ascii_alphabetic())
                    }) {
                        return Err(bad("match.method must be an HTTP method name"));
                    }
                    if m.host.as_deref().is_some_and(str::is_empty) {
                        return Err(bad("match.host must not be empty"));
                    }
                }
                if self.strip_prefix
                    && self
                        .matcher
                        .as_ref()
                        .and_then(|m| m.path_prefix.as_ref())
                        .is_none()
                {
                    return Err(bad("strip_prefix needs match.path_prefix"));
                }
                match (&self.lb, &self.hash_header) {
                    (Balancer::ConsistentHash, None) => {
                        return Err(bad("lb consistent_hash needs hash_header"))
                    }
                    (Balancer::ConsistentHash, Some(h)) if h.trim().is_empty() => {
                        return Err(bad("hash_header must not be empty"))
                    }
                    (lb, Some(_)) if *lb != Balancer::ConsistentHash => {
                        return Err(bad("hash_header is only used with lb consistent_hash"))
                    }
                    _ => {}
                }
            }
        }
        duration("connect_timeout", &self.connect_timeout)?;
        duration("request_timeout", &self.request_timeout)?;
        if self.retries > MAX_RETRIES {
            return Err(bad(format!("retries must be at most {MAX_RETRIES}")));
        }
        Ok(())
    }
}

impl Registry {
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.get(name).map(|r| &**r)
    }

    /// Every route, by name.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values().map(|r| &**r)
    }

    pub(super) fn put_route(
        &mut self,
        index: u64,
        name: &str,
        def: &RouteDef,
    ) -> (Response, Vec<StateKey>) {
        if let (Protocol::Tcp, Some(port)) = (def.protocol, def.listen_port) {
            if let Some(other) = self.routes.values().find(|r| {
                r.name != name && r.def.protocol == Protocol::Tcp && r.def.listen_port == Some(port)
            }) {
                return (
                    Response::Invalid(format!(
                        "listen_port {port} is already used by route {:?}",
                        other.name
                    )),
                    Vec::new(),
                );
            }
        }
        let create_index = self.routes.get(name).map_or(index, |r| r.create_index);
        let route = Route {
            name: name.to_string(),
            def: def.clone(),
            create_index,
            modify_index: index,
        };
        self.routes.insert(name.to_string(), Box::new(route));
        (Response::RouteSet, vec![StateKey::Route(name.to_string())])
    }

    pub(super) fn delete_route(&mut self, name: &str) -> (Response, Vec<StateKey>) {
        let existed = self.routes.remove(name).is_some();
        let touched = if existed {
            vec![StateKey::Route(name.to_string())]
        } else {
            Vec::new()
        };
        (Response::RouteDeleted { existed }, touched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Command;

    fn def(json: serde_json::Value) -> RouteDef {
        serde_json::from_value(json).expect("parses")
    }

    #[test]
    fn validation_explains_what_is_wrong() {
        let ok = def(serde_json::json!({"protocol": "http", "service": "billing",
            "match": {"path_prefix": "/api", "method": "GET"}, "strip_prefix": true, "retries": 2}));
        assert!(ok.validate().is_ok());
        let cases = [
            (
                serde_json::json!({"protocol": "tcp", "service": "db"}),
                "listen_port",
            ),
            (
                serde_json::json!({"protocol": "http", "service": ""}),
                "service",
            ),
            (
                serde_json::json!({"protocol": "http", "service": "a", "lb": "consistent_hash"}),
                "hash_header",
            ),
            (
                serde_json::json!({"protocol": "http", "service": "a", "strip_prefix": true}),
                "path_prefix",
            ),
            (
                serde_json::json!({"protocol": "http", "service": "a", "match": {"path": "api"}}),
                "start with",
            ),
            (
                serde_json::json!({"protocol": "http", "service": "a", "match": {"path": "/**/x"}}),
                "last segment",
            ),
            (
                serde_json::json!({"protocol": "http", "service": "a", "retries": 11}),
                "retries",
            ),
            (
                serde_json::json!({"protocol": "http", "service": "a", "connect_timeout": "soon"}),
                "connect_timeout",
            ),
            (
                serde_json::json!({"protocol": "http", "service": "a", "listen_port": 80}),
                "listen_port",
            ),
        ];
        for (j, want) in cases {
            let e = def(j.clone()).validate().expect_err("invalid");
            assert!(e.0.contains(want), "{j}: {e}");
        }
        assert!(serde_json::from_value::<RouteDef>(
            serde_json::json!({"protocol": "http", "service": "a", "lbb": "random"})
        )
        .is_err());
        assert!(validate_name("billing-v2.api").is_ok());
        assert!(validate_name("a/b").is_err());
    }

    #[test]
    fn tcp_ports_belong_to_one_route_and_indexes_track_changes() {
        let mut reg = Registry::new();
        let tcp = |port| {
            def(serde_json::json!({"protocol": "tcp", "service": "db", "listen_port": port}))
        };
        let put = |name: &str, d: RouteDef| Command::PutRoute {
            name: name.into(),
            def: d,
        };
        assert_eq!(reg.apply(2, &put("db", tcp(9000))).0, Response::RouteSet);
        assert!(matches!(
            reg.apply(3, &put("db2", tcp(9000))).0,
            Response::Invalid(_)
        ));
        // The same route may keep (or change) its own port.
        assert_eq!(reg.apply(4, &put("db", tcp(9000))).0, Response::RouteSet);
        let r = reg.route("db").expect("stored");
        assert_eq!((r.create_index, r.modify_index), (2, 4));
        let (resp, touched) = reg.apply(5, &Command::DeleteRoute { name: "db".into() });
        assert_eq!(resp, Response::RouteDeleted { existed: true });
        assert_eq!(touched, vec![StateKey::Route("db".into())]);
        assert_eq!(reg.apply(6, &put("db2", tcp(9000))).0, Response::RouteSet);
    }
}
