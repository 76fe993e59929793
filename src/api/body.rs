//! Request decoding the way Consul clients expect it: JSON object keys match
//! case-insensitively and snake_case equals CamelCase (`tagged_addresses` =
//! `TaggedAddresses`); query flags count by presence (`?stale`, `?stale=1`).
//!
//! Owns turning request bodies into `registry` specs with clear, typed
//! errors, and query-string parsing. Does not validate limits
//! (`registry::validate_service` does) or talk to Raft. User-data maps
//! (`Meta`, `Header`) keep their keys exactly as sent.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::error::ApiError;

mod register;
use crate::registry::{parse_duration, CheckDef, HealthStatus, Meta, ServiceSpec, Weights};

/// Decoded query parameters, in order; flags count by presence.
#[derive(Debug, Default, Clone)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(raw: Option<&str>) -> Self {
        Params(
            form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// A boolean flag as Consul reads it: present with no value (or any
    /// value but a false one) is true, so `?stale`, `?stale=1` and
    /// `?keys=True` are set and `?recurse=false` (sent by some clients for
    /// "off") is not.
    pub fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, v)| {
            k == key && !matches!(v.as_str(), "false" | "False" | "FALSE" | "f" | "F" | "0")
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn norm(key: &str) -> String {
    if key.is_ascii() {
        // Every key a client sends in practice; skips the Unicode tables.
        return key
            .bytes()
            .filter(|b| *b != b'_' && *b != b'-')
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect();
    }
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// `norm` of a short ASCII name into `buf`, without allocating (looked up
/// for every field of every request).
fn norm_into<'b>(key: &str, buf: &'b mut [u8; 64]) -> Option<&'b str> {
    let mut n = 0;
    for b in key.bytes() {
        if !b.is_ascii() || n == buf.len() {
            return None;
        }
        if b != b'_' && b != b'-' {
            buf[n] = b.to_ascii_lowercase();
            n += 1;
        }
    }
    std::str::from_utf8(&buf[..n]).ok()
}

/// A JSON object viewed with Consul's lenient key matching.
pub struct Fields<'a> {
    what: &'a str,
    map: BTreeMap<String, &'a Value>,
}

impl<'a> Fields<'a> {
    pub fn new(what: &'a str, v: &'a Value) -> Result<Self, ApiError> {
        let obj: &Map<String, Value> = v
            .as_object()
            .ok_or_else(|| ApiError::BadRequest(format!("{what} must be a JSON object")))?;
        let mut map = BTreeMap::new();
        for (k, v) in obj {
            if map.insert(norm(k), v).is_some() {
                return Err(ApiError::BadRequest(format!(
                    "{what} has the field {k:?} more than once (keys match case-insensitively)"
                )));
            }
        }
        Ok(Fields { what, map })
    }

    /// The value of `field` (canonical CamelCase name); JSON null counts as absent.
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        let mut buf = [0u8; 64];
        let found = match norm_into(field, &mut buf) {
            Some(k) => self.map.get(k),
            None => self.map.get(&norm(field)),
        };
        found.copied().filter(|v| !v.is_null())
    }

    fn type_err(&self, field: &str, want: &str) -> ApiError {
        ApiError::BadRequest(format!("{}.{field} must be {want}", self.what))
    }

    pub fn string(&self, field: &str) -> Result<Option<String>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.type_err(field, "a string")),
        }
    }

    pub fn strings(&self, field: &str) -> Result<Vec<String>, ApiError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.type_err(field, "a list of strings")),
                })
                .collect(),
            Some(_) => Err(self.type_err(field, "a list of strings")),
        }
    }

    pub fn string_map(&self, field: &str) -> Result<Meta, ApiError> {
        match self.get(field) {
            None => Ok(Meta::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(self.type_err(field, "an object of string values")),
                })
                .collect(),
            Some(_) => Err(self.type_err(field, "an object of string values")),
        }
    }

    pub fn port(&self, field: &str) -> Result<u16, ApiError> {
        match self.get(field) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| self.type_err(field, "an integer from 0 to 65535")),
            Some(_) => Err(self.type_err(field, "an integer from 0 to 65535")),
        }
    }
}

/// Parses a request body as JSON with a readable error.
pub fn json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
}

fn header_map(f: &Fields<'_>) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
    let Some(v) = f.get("Header") else {
        return Ok(BTreeMap::new());
    };
    let bad = || ApiError::BadRequest("Check.Header must be an object of string lists".into());
    let obj = v.as_object().ok_or_else(bad)?;
    obj.iter()
        .map(|(k, v)| {
            let list = v
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|s| s.as_str().map(str::to_owned).ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((k.clone(), list))
        })
        .collect()
}

fn duration_field(f: &Fields<'_>, field: &str) -> Result<Option<String>, ApiError> {
    let v = f.string(field)?;
    if let Some(s) = &v {
        crate::registry::parse_duration(s)
            .map_err(|e| ApiError::BadRequest(format!("Check.{field}: {e}")))?;
    }
    Ok(v)
}

/// Decodes one check object; `default_id` applies when it names none.
pub fn check(v: &Value, default_id: String, service_name: &str) -> Result<CheckDef, ApiError> {
    let f = Fields::new("Check", v)?;
    let check_id = match f.string("CheckID")? {
        Some(id) if !id.is_empty() => id,
        _ => match f.string("ID")? {
            Some(id) if !id.is_empty() => id,
            _ => default_id,
        },
    };
    let name = f
        .string("Name")?
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("Service '{service_name}' check"));
    let status = match f.string("Status")?.as_deref() {
        None | Some("") => HealthStatus::Critical,
        Some(s) => status(s, "Check.Status")?,
    };
    let def = CheckDef {
        check_id,
        name,
        notes: f.string("Notes")?.unwrap_or_default(),
        status,
        ttl: duration_field(&f, "TTL")?,
        http: f.string("HTTP")?,
        method: f.string("Method")?,
        header: header_map(&f)?,
        body: f.string("Body")?,
        tcp: f.string("TCP")?,
        interval: duration_field(&f, "Interval")?,
        timeout: duration_field(&f, "Timeout")?,
        deregister_critical_service_after: duration_field(&f, "DeregisterCriticalServiceAfter")?,
    };
    check_kind(&def)?;
    Ok(def)
}

/// A status word as Consul spells it.
pub fn status(s: &str, field: &str) -> Result<HealthStatus, ApiError> {
    HealthStatus::parse(s).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{field} {s:?} must be passing, warning or critical"
        ))
    })
}

fn positive(field: &str, v: &Option<String>, min: std::time::Duration) -> Result<(), ApiError> {
    if let Some(d) = v {
        // Already parsed once by duration_field.
        if parse_duration(d).is_ok_and(|d| d < min) {
            return Err(ApiError::BadRequest(format!(
                "Check.{field} {d:?} must be at least {min:?}"
            )));
        }
    }
    Ok(())
}

/// A check is exactly one of TTL, HTTP or TCP, and probes need an interval.
fn check_kind(def: &CheckDef) -> Result<(), ApiError> {
    let kinds = [def.ttl.is_some(), def.http.is_some(), def.tcp.is_some()];
    match kinds.iter().filter(|k| **k).count() {
        1 => {}
        0 => {
            return Err(ApiError::BadRequest(format!(
                "check {:?} needs one of TTL, HTTP or TCP",
                def.check_id
            )))
        }
        _ => {
            return Err(ApiError::BadRequest(format!(
                "check {:?} may have only one of TTL, HTTP or TCP",
                def.check_id
            )))
        }
    }
    if (def.http.is_some() || def.tcp.is_some()) && def.interval.is_none() {
        return Err(ApiError::BadRequest(format!(
            "check {:?}: Interval is required for HTTP and TCP checks",
            def.check_id
        )));
    }
    if let Some(url) = &def.http {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ApiError::BadRequest(format!(
                "Check.HTTP {url:?} must be an http:// or https:// URL"
            )));
        }
    }
    let ms = std::time::Duration::from_millis;
    positive("TTL", &def.ttl, ms(1))?;
    positive("Timeout", &def.timeout, ms(1))?;
    positive(
        "DeregisterCriticalServiceAfter",
        &def.deregister_critical_service_after,
        std::time::Duration::from_secs(1),
    )?;
    Ok(())
}

/// Decodes `PUT /v1/agent/check/register`'s body: the check and the
/// instance it belongs to, if any.
pub fn standalone_check(body: &[u8]) -> Result<(CheckDef, Option<String>), ApiError> {
    let v = json(body)?;
    let f = Fields::new("Check", &v)?;
    let name = f
        .string("Name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::BadRequest("Check.Name is required".into()))?;
    let service_id = f.string("ServiceID")?.filter(|s| !s.is_empty());
    let def = check(&v, name, "")?;
    Ok((def, service_id))
}

/// `Weights: {Passing, Warning}`: Passing at least 1 (Consul's rule),
/// Warning at least 0; a missing field keeps its default of 1.
fn weights(v: Option<&Value>) -> Result<Weights, ApiError> {
    let Some(v) = v else {
        return Ok(Weights::default());
    };
    let w = Fields::new("service.Weights", v)?;
    let num = |field: &str, min: u64| -> Result<Option<u32>, ApiError> {
        match w.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .filter(|x| *x >= min)
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "service.Weights.{field} must be an integer of at least {min}"
                    ))
                }),
            Some(_) => Err(ApiError::BadRequest(format!(
                "service.Weights.{field} must be an integer"
            ))),
        }
    };
    let d = Weights::default();
    Ok(Weights {
        passing: num("Passing", 1)?.unwrap_or(d.passing),
        warning: num("Warning", 0)?.unwrap_or(d.warning),
    })
}

/// Decodes `PUT /v1/agent/service/register`'s body (typed, see `register`).
pub fn service(body: &[u8]) -> Result<ServiceSpec, ApiError> {
    let raw: register::Raw = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(match e.classify() {
            serde_json::error::Category::Data => format!("invalid service: {e}"),
            _ => format!("malformed JSON body: {e}"),
        })
    })?;
    let name = raw
        .name
        .ok_or_else(|| ApiError::BadRequest("service.Name is required".into()))?;
    let id = raw
        .id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| name.clone());
    let mut check_values: Vec<&Value> = Vec::new();
    if let Some(c) = &raw.check {
        check_values.push(c);
    }
    match &raw.checks {
        None => {}
        Some(Value::Array(list)) => check_values.extend(list.iter()),
        Some(_) => return Err(ApiError::BadRequest("service.Checks must be a list".into())),
    }
    let several = check_values.len() > 1;
    let checks = check_values
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let default_id = if several {
                format!("service:{id}:{}", i + 1)
            } else {
                format!("service:{id}")
            };
            check(c, default_id, &name)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceSpec {
        weights: weights(raw.weights.as_ref())?,
        id,
        name,
        tags: raw.tags.unwrap_or_default(),
        address: raw.address.unwrap_or_default(),
        port: raw.port.unwrap_or(0),
        meta: raw.meta.unwrap_or_default(),
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocation_free_lookup_normalises_like_norm() {
        let mut buf = [0u8; 64];
        for k in ["Name", "TaggedAddresses", "tagged_addresses", "X-Y_z", ""] {
            assert_eq!(norm_into(k, &mut buf).map(str::to_owned), Some(norm(k)));
        }
        // Not ASCII, or too long for the buffer: the caller falls back to norm.
        assert_eq!(norm_into("Ñame", &mut buf), None);
        assert_eq!(norm_into(&"a".repeat(65), &mut buf), None);
        assert_eq!(norm("ÑAME_x"), "ñamex");
    }

    #[test]
    fn keys_match_case_insensitively_and_snake_case() {
        let s = service(br#"{"name":"db","PORT":5432,"tags":["a"],"meta":{"Ver":"1"}}"#)
            .expect("decodes");
        assert_eq!((s.name.as_str(), s.id.as_str(), s.port), ("db", "db", 5432));
        assert_eq!(s.meta.get("Ver"), Some("1"));
        let s = service(
            br#"{"Name":"w","check":{"ttl":"10s","deregister_critical_service_after":"1m"}}"#,
        )
        .expect("decodes");
        assert_eq!(s.checks[0].check_id, "service:w");
        assert_eq!(s.checks[0].status, HealthStatus::Critical);
        assert_eq!(
            s.checks[0].deregister_critical_service_after.as_deref(),
            Some("1m")
        );
    }

    #[test]
    fn several_checks_are_numbered() {
        let s = service(br#"{"Name":"w","ID":"w1","Checks":[{"TTL":"5s"},{"TTL":"6s"}]}"#)
            .expect("decodes");
        let ids: Vec<_> = s.checks.iter().map(|c| c.check_id.as_str()).collect();
        assert_eq!(ids, ["service:w1:1", "service:w1:2"]);
    }

    #[test]
    fn wrong_types_and_ranges_are_refused() {
        for bad in [
            &br#"{"Name":"w","Port":"x"}"#[..],
            br#"{"Name":"w","Port":70000}"#,
            br#"{"Name":"w","Port":-1}"#,
            br#"{"Name":5}"#,
            br#"{"Port":1}"#,
            br#"[1]"#,
            br#"{"Name":"w","Tags":"a"}"#,
            br#"{"Name":"w","Check":{"TTL":"ten"}}"#,
            br#"{"Name":"w","Check":{}}"#,
            br#"{"Name":"w","Check":{"TTL":"5s","TCP":"127.0.0.1:1"}}"#,
            br#"{"Name":"w","Check":{"HTTP":"http://127.0.0.1:1/"}}"#,
            br#"{"Name":"w","Check":{"HTTP":"ftp://x","Interval":"1s"}}"#,
            br#"{"Name":"w","Check":{"TTL":"5s","Status":"fine"}}"#,
            br#"{"Name":"w","Check":{"TTL":"5s","DeregisterCriticalServiceAfter":"500ms"}}"#,
            br#"{"Name":"w","name":"v"}"#,
            b"{",
        ] {
            assert!(
                service(bad).is_err(),
                "{} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn flags_count_by_presence() {
        let p = Params::parse(Some("stale&consistent=1&note=a%20b"));
        assert!(p.has("stale") && p.has("consistent") && !p.has("passing"));
        assert_eq!(p.get("note"), Some("a b"));
    }
}
