//! Consul's KV endpoints: `GET`/`PUT`/`DELETE /v1/kv/{key}` with CAS,
//! flags, recursive reads and deletes, key listings, raw values and locks
//! (`?acquire=` / `?release=` with a session).
//!
//! Owns the KV JSON shape (`KvPair`) and the query parameters. Does not own
//! the rules (`registry::kv`: CAS, lock counting, session invalidation).
//! Reads are blocking queries on `Kind::Kv`; a missing key is a 404 that
//! still carries `X-Consul-Index`, so clients can block on a key that does
//! not exist yet.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};

use super::body::Params;
use super::error::ApiError;
use super::{settle, with_read_headers, write_response};
use crate::health::Health;
use crate::raft::RaftNode;
use crate::registry::{
    Command, Kind, KvEntry, KvLock, KvSet, Response as Outcome, MAX_VALUE_BYTES,
};

type Node = State<Arc<RaftNode>>;

fn pair(e: &KvEntry) -> Value {
    json!({
        "Key": e.key,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
        "LockIndex": e.lock_index,
        "Flags": e.flags,
        // Consul shows an empty value as null.
        "Value": if e.value.is_empty() {
            Value::Null
        } else {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        "Session": e.session,
    })
}

fn u64_param(p: &Params, name: &str) -> Result<Option<u64>, ApiError> {
    p.get(name)
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("?{name} must be an unsigned integer, got {v:?}"))
            })
        })
        .transpose()
}

/// The keys under `prefix`, rolled up at the first `separator` after it
/// (Consul's `?keys&separator=/`).
fn list_keys<'a>(
    entries: impl Iterator<Item = &'a KvEntry>,
    prefix: &str,
    sep: &str,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in entries {
        let rest = &e.key[prefix.len()..];
        let key = match (!sep.is_empty()).then(|| rest.find(sep)).flatten() {
            Some(i) => format!("{prefix}{}", &rest[..i + sep.len()]),
            None => e.key.clone(),
        };
        if out.last() != Some(&key) {
            out.push(key);
        }
    }
    out
}

/// `GET /v1/kv/{key}` (and `/v1/kv/` for the whole store).
pub async fn get(
    State(node): Node,
    key: Option<Path<String>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let key = key.map(|Path(k)| k).unwrap_or_default();
    let p = Params::parse(q.as_deref());
    let keys = p.has("keys");
    let recurse = p.has("recurse") || keys;
    let raw = p.has("raw");
    let sep = p.get("separator").unwrap_or("").to_string();
    if key.is_empty() && !recurse {
        return Err(ApiError::BadRequest(
            "missing key (use ?recurse or ?keys to read the whole store)".into(),
        ));
    }
    let (index, mode) = settle(&node, &p, &[Kind::Kv]).await?;
    let found: Option<Response> = {
        let reg = node.state();
        if keys {
            let ks = list_keys(reg.kv_prefix(&key), &key, &sep);
            (!ks.is_empty()).then(|| Json(ks).into_response())
        } else if recurse {
            let all: Vec<Value> = reg.kv_prefix(&key).map(pair).collect();
            (!all.is_empty()).then(|| Json(all).into_response())
        } else {
            reg.kv(&key).map(|e| {
                if raw {
                    let mut res = e.value.clone().into_response();
                    res.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    res
                } else {
                    Json(vec![pair(e)]).into_response()
                }
            })
        }
    };
    let res = match found {
        Some(res) => res,
        None => ApiError::NotFound(format!("no key {key:?}")).into_response(),
    };
    Ok(with_read_headers(res, &node, index, mode))
}

/// `PUT /v1/kv/{key}`: the raw body is the value.
pub async fn put(
    State(node): Node,
    State(health): State<Arc<Health>>,
    Path(key): Path<String>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let p = Params::parse(q.as_deref());
    let value = body?;
    if value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::PayloadTooLarge {
            limit: MAX_VALUE_BYTES,
        });
    }
    let lock = match (p.get("acquire"), p.get("release")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "?acquire and ?release cannot be combined".into(),
            ))
        }
        (Some(s), None) => Some(KvLock::Acquire(session_param("acquire", s)?)),
        (None, Some(s)) => Some(KvLock::Release(session_param("release", s)?)),
        (None, None) => None,
    };
    if matches!(lock, Some(KvLock::Acquire(_)))
        && !health.lock_delay_left(key.clone()).await?.is_zero()
    {
        // Consul answers an acquisition during the lock delay with false.
        let index = node.shared().applied_index();
        return Ok(write_response(&node, index, Some(json!(false))));
    }
    let op = KvSet {
        key,
        value: value.to_vec(),
        flags: u64_param(&p, "flags")?.unwrap_or(0),
        cas: u64_param(&p, "cas")?,
        lock,
    };
    let written = node.write(Command::KvSet(op)).await?;
    outcome(&node, written.index, written.response)
}

fn session_param(name: &str, v: &str) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(ApiError::BadRequest(format!("?{name} needs a session ID")));
    }
    Ok(v.to_string())
}

/// `DELETE /v1/kv/{key}` (`?recurse`, `?cas`).
pub async fn delete(
    State(node): Node,
    key: Option<Path<String>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let key = key.map(|Path(k)| k).unwrap_or_default();
    let p = Params::parse(q.as_deref());
    let recurse = p.has("recurse");
    let cas = u64_param(&p, "cas")?;
    if key.is_empty() && !recurse {
        return Err(ApiError::BadRequest(
            "missing key (use ?recurse to delete the whole store)".into(),
        ));
    }
    if cas == Some(0) {
        return Err(ApiError::BadRequest(
            "?cas on a delete must be the key's ModifyIndex (> 0)".into(),
        ));
    }
    let written = node.write(Command::KvDelete { key, recurse, cas }).await?;
    outcome(&node, written.index, written.response)
}

fn outcome(node: &RaftNode, index: u64, r: Outcome) -> Result<Response, ApiError> {
    match r {
        Outcome::Kv(ok) => Ok(write_response(node, index, Some(json!(ok)))),
        Outcome::Invalid(msg) => Err(ApiError::BadRequest(msg)),
        other => Err(ApiError::unexpected("KV", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: &str) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: Vec::new(),
            flags: 0,
            create_index: 1,
            modify_index: 1,
            lock_index: 0,
            session: None,
            lock_delay: None,
        }
    }

    #[test]
    fn keys_roll_up_at_the_separator() {
        let all = [e("a/1"), e("a/b/2"), e("a/b/3"), e("a/c")];
        assert_eq!(list_keys(all.iter(), "a/", "/"), vec!["a/1", "a/b/", "a/c"]);
        assert_eq!(list_keys(all.iter(), "a/", "").len(), 4);
    }
}
