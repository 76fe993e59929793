//! Streams: the replicated definitions of every node's event pipelines and
//! their service subscriptions.
//!
//! Owns `StreamDef`/`SubscriptionDef` (what a client puts), `Stream` and
//! `Subscription` (what is stored), their structural validation and the
//! rules of applying them. Does not run pipelines or compile expressions
//! (`crate::stream` does; the API compiles a definition before proposing
//! it, so a stored definition always compiles) and carries no events:
//! events stay on the node that received them.
//!
//! Invariants:
//! - A stored stream passed `StreamDef::validate`; a stored subscription
//!   passed `SubscriptionDef::validate` and names a stored stream
//!   (`apply` re-checks, so every replica refuses the same write).
//! - Deleting a stream deletes its subscriptions in the same apply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{parse_duration, Registry, Response, StateKey};

/// Longest stream or subscription name.
pub const MAX_NAME: usize = 128;
/// Most processors in one stream.
pub const MAX_PROCESSORS: usize = 32;
/// Largest buffer a stream or subscription may ask for, in events.
pub const MAX_CAPACITY: usize = 100_000;
/// Buffer size when a definition gives none.
pub const DEFAULT_CAPACITY: usize = 1024;
/// Most panes a sliding window may keep (`size / slide`).
pub const MAX_PANES: u64 = 1000;
/// Longest expression, in bytes.
pub const MAX_EXPR: usize = 4096;

/// Where a stream's events come from besides `POST .../events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// Every committed registry change this node applies (the watch hub).
    #[serde(rename = "_registry")]
    Registry,
    /// One event per request through this node's proxy.
    #[serde(rename = "_traffic")]
    Traffic,
}

/// What a full buffer does to the next event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The producer waits for room (bounded by its request's timeout).
    #[default]
    Block,
    /// The producer is answered 429 with `Retry-After`.
    Reject,
    /// The oldest buffered event is dropped (counted) to make room.
    DropOldest,
    /// The new event is dropped (counted).
    DropNewest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferDef {
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    #[serde(default)]
    pub policy: Policy,
}

fn default_capacity() -> usize {
    DEFAULT_CAPACITY
}

impl Default for BufferDef {
    fn default() -> Self {
        BufferDef {
            capacity: DEFAULT_CAPACITY,
            policy: Policy::Block,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    Tumbling,
    Sliding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    P50,
    P99,
}

/// One step of a pipeline; the JSON shape is `{"type": "...", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProcessorDef {
    /// Raw text (or the string field `field`) becomes JSON; JSON passes.
    JsonParse {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
        /// A stream that receives events that failed to parse.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dead_letter: Option<String>,
    },
    /// Keeps events for which the CEL expression `expr` is true; `event`
    /// is bound to the event.
    Filter { expr: String },
    /// Sets fields from CEL expressions, then renames, then drops fields.
    Transform {
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        set: BTreeMap<String, String>,
        /// Old name → new name.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        rename: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        drop: Vec<String>,
    },
    /// Aggregates the numeric field `field` over windows, per `group_by`
    /// value. Windows are by processing time (`size`/`slide`, Go-style
    /// durations) or by event count (`size_count`/`slide_count`).
    Window {
        kind: WindowKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slide: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size_count: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slide_count: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_by: Option<String>,
        /// The value aggregated; `count` needs none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
        aggregates: Vec<Aggregate>,
    },
}

/// A stream as a client defines it (`PUT /v1/streams/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default)]
    pub processors: Vec<ProcessorDef>,
    #[serde(default)]
    pub buffer: BufferDef,
}

/// A stored stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    pub name: String,
    #[serde(flatten)]
    pub def: StreamDef,
    pub create_index: u64,
    pub modify_index: u64,
}

/// How a subscription's events reach the service's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Each batch to one passing instance, load-balanced.
    #[default]
    One,
    /// Each batch to every passing instance.
    All,
}

/// A service subscription as a client defines it
/// (`PUT /v1/streams/{stream}/subscriptions/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionDef {
    pub service: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The path events are POSTed to on each instance.
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default)]
    pub delivery: Delivery,
    /// This subscription's own buffer, in events.
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    /// Most events in one POST.
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_path() -> String {
    "/".into()
}

fn default_batch() -> usize {
    100
}

/// A stored subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub stream: String,
    pub name: String,
    #[serde(flatten)]
    pub def: SubscriptionDef,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Why a stream or subscription definition is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StreamError(pub String);

fn bad(msg: impl Into<String>) -> StreamError {
    StreamError(msg.into())
}

/// Stream and subscription names are path segments: letters, digits, `-`,
/// `_`, `.`; a leading `_` is reserved for built-in sources.
pub fn validate_name(what: &str, name: &str) -> Result<(), StreamError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad(format!(
            "a {what} name must be 1 to {MAX_NAME} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad(format!(
            "{what} name {name:?} may contain only letters, digits, '-', '_' and '.'"
        )));
    }
    if name.starts_with('_') {
        return Err(bad(format!(
            "{what} names starting with '_' are reserved for built-in sources"
        )));
    }
    Ok(())
}

fn positive_duration(field: &str, v: &str) -> Result<u64, StreamError> {
    let d = parse_duration(v).map_err(|e| bad(format!("{field}: {e}")))?;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Err(bad(format!("{field} must be at least 1ms")));
    }
    Ok(ms)
}

fn capacity(field: &str, c: usize) -> Result<(), StreamError> {
    if c == 0 || c > MAX_CAPACITY {
        return Err(bad(format!("{field} must be 1 to {MAX_CAPACITY}")));
    }
    Ok(())
}

fn expr(field: &str, e: &str) -> Result<(), StreamError> {
    if e.trim().is_empty() || e.len() > MAX_EXPR {
        return Err(bad(format!("{field} must be 1 to {MAX_EXPR} bytes")));
    }
    Ok(())
}

/// A window's size and slide, in milliseconds or events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSpan {
    Time { size_ms: u64, slide_ms: u64 },
    Count { size: u64, slide: u64 },
}

impl ProcessorDef {
    /// The window's span; `None` for other processors. Only meaningful on
    /// a validated definition.
    pub fn window_span(&self) -> Result<Option<WindowSpan>, StreamError> {
        let ProcessorDef::Window {
            kind,
            size,
            slide,
            size_count,
            slide_count,
            ..
        } = self
        else {
            return Ok(None);
        };
        let span = match (size, size_count) {
            (Some(s), None) => {
                if slide_count.is_some() {
                    return Err(bad("a time window takes slide, not slide_count"));
                }
                let size_ms = positive_duration("size", s)?;
                let slide_ms = match (kind, slide) {
                    (WindowKind::Tumbling, None) => size_ms,
                    (WindowKind::Tumbling, Some(_)) => {
                        return Err(bad("a tumbling window takes no slide"))
                    }
                    (WindowKind::Sliding, None) => return Err(bad("a sliding window needs slide")),
                    (WindowKind::Sliding, Some(s)) => positive_duration("slide", s)?,
                };
                WindowSpan::Time { size_ms, slide_ms }
            }
            (None, Some(n)) => {
                if slide.is_some() {
                    return Err(bad("a count window takes slide_count, not slide"));
                }
                let slide = match (kind, slide_count) {
                    (WindowKind::Tumbling, None) => *n,
                    (WindowKind::Tumbling, Some(_)) => {
                        return Err(bad("a tumbling window takes no slide_count"))
                    }
                    (WindowKind::Sliding, None) => {
                        return Err(bad("a sliding window needs slide_count"))
                    }
                    (WindowKind::Sliding, Some(s)) => *s,
                };
                WindowSpan::Count { size: *n, slide }
            }
            _ => return Err(bad("a window needs exactly one of size and size_count")),
        };
        let (size, slide) = match span {
            WindowSpan::Time { size_ms, slide_ms } => (size_ms, slide_ms),
            WindowSpan::Count { size, slide } => (size, slide),
        };
        if size == 0 || slide == 0 {
            return Err(bad("window size and slide must be more than 0"));
        }
        if size % slide != 0 || size / slide > MAX_PANES {
            return Err(bad(format!(
                "a window's size must be a multiple of its slide, at most {MAX_PANES} times it"
            )));
        }
        Ok(Some(span))
    }
}

impl StreamDef {
    /// Checks the structure; expressions are compiled by `crate::stream`.
    pub fn validate(&self) -> Result<(), StreamError> {
        capacity("buffer.capacity", self.buffer.capacity)?;
        if self.processors.len() > MAX_PROCESSORS {
            return Err(bad(format!("at most {MAX_PROCESSORS} processors")));
        }
        for (i, p) in self.processors.iter().enumerate() {
            let at = |e: StreamError| bad(format!("processors[{i}]: {}", e.0));
            match p {
                ProcessorDef::JsonParse { field, dead_letter } => {
                    if field.as_deref().is_some_and(str::is_empty) {
                        return Err(at(bad("field must not be empty")));
                    }
                    if let Some(d) = dead_letter {
                        validate_name("dead_letter stream", d).map_err(at)?;
                    }
                }
                ProcessorDef::Filter { expr: e } => expr("expr", e).map_err(at)?,
                ProcessorDef::Transform { set, rename, drop } => {
                    if set.is_empty() && rename.is_empty() && drop.is_empty() {
                        return Err(at(bad("a transform needs set, rename or drop")));
                    }
                    for (k, e) in set {
                        if k.is_empty() {
                            return Err(at(bad("set: field names must not be empty")));
                        }
                        expr(&format!("set.{k}"), e).map_err(at)?;
                    }
                    if rename.iter().any(|(a, b)| a.is_empty() || b.is_empty())
                        || drop.iter().any(String::is_empty)
                    {
                        return Err(at(bad("field names must not be empty")));
                    }
                }
                ProcessorDef::Window {
                    group_by,
                    field,
                    aggregates,
                    ..
                } => {
                    p.window_span().map_err(at)?;
                    if aggregates.is_empty() {
                        return Err(at(bad("a window needs at least one aggregate")));
                    }
                    let needs_field = aggregates.iter().any(|a| *a != Aggregate::Count);
                    if needs_field && field.as_deref().is_none_or(str::is_empty) {
                        return Err(at(bad("aggregates other than count need field")));
                    }
                    if group_by.as_deref().is_some_and(str::is_empty) {
                        return Err(at(bad("group_by must not be empty")));
                    }
                }
            }
        }
        Ok(())
    }
}

impl SubscriptionDef {
    pub fn validate(&self) -> Result<(), StreamError> {
        if self.service.trim().is_empty() {
            return Err(bad("service is required"));
        }
        if !self.path.starts_with('/') {
            return Err(bad("path must start with '/'"));
        }
        capacity("capacity", self.capacity)?;
        if self.batch == 0 || self.batch > 10_000 {
            return Err(bad("batch must be 1 to 10000"));
        }
        Ok(())
    }
}

impl Registry {
    pub(super) fn put_stream(
        &mut self,
        index: u64,
        name: &str,
        def: &StreamDef,
    ) -> (Response, Vec<StateKey>) {
        if let Err(e) = validate_name("stream", name).and_then(|_| def.validate()) {
            return (Response::Invalid(e.0), Vec::new());
        }
        let create_index = self.streams.get(name).map_or(index, |s| s.create_index);
        let stream = Stream {
            name: name.to_string(),
            def: def.clone(),
            create_index,
            modify_index: index,
        };
        self.streams.insert(name.to_string(), Box::new(stream));
        (
            Response::StreamSet,
            vec![StateKey::Stream(name.to_string())],
        )
    }

    pub(super) fn delete_stream(&mut self, name: &str) -> (Response, Vec<StateKey>) {
        let existed = self.streams.remove(name).is_some();
        let mut touched = Vec::new();
        if existed {
            touched.push(StateKey::Stream(name.to_string()));
            for sub in self
                .subscriptions
                .remove(name)
                .unwrap_or_default()
                .into_keys()
            {
                touched.push(StateKey::Subscription(name.to_string(), sub));
            }
        }
        (Response::StreamDeleted { existed }, touched)
    }

    pub(super) fn put_subscription(
        &mut self,
        index: u64,
        stream: &str,
        name: &str,
        def: &SubscriptionDef,
    ) -> (Response, Vec<StateKey>) {
        if let Err(e) = validate_name("subscription", name).and_then(|_| def.validate()) {
            return (Response::Invalid(e.0), Vec::new());
        }
        if !self.streams.contains_key(stream) {
            return (
                Response::NotFound(format!("no stream {stream:?}")),
                Vec::new(),
            );
        }
        let subs = self.subscriptions.entry(stream.to_string()).or_default();
        let create_index = subs.get(name).map_or(index, |s| s.create_index);
        let sub = Subscription {
            stream: stream.to_string(),
            name: name.to_string(),
            def: def.clone(),
            create_index,
            modify_index: index,
        };
        subs.insert(name.to_string(), Box::new(sub));
        (
            Response::SubscriptionSet,
            vec![StateKey::Subscription(stream.to_string(), name.to_string())],
        )
    }

    pub(super) fn delete_subscription(
        &mut self,
        stream: &str,
        name: &str,
    ) -> (Response, Vec<StateKey>) {
        let existed = match self.subscriptions.get_mut(stream) {
            Some(subs) => {
                let existed = subs.remove(name).is_some();
                if subs.is_empty() {
                    self.subscriptions.remove(stream);
                }
                existed
            }
            None => false,
        };
        let touched = if existed {
            vec![StateKey::Subscription(stream.to_string(), name.to_string())]
        } else {
            Vec::new()
        };
        (Response::SubscriptionDeleted { existed }, touched)
    }

    pub fn streams(&self) -> impl Iterator<Item = &Stream> {
        self.streams.values().map(|s| &**s)
    }

    pub fn stream(&self, name: &str) -> Option<&Stream> {
        self.streams.get(name).map(|s| &**s)
    }

    /// The subscriptions of `stream`, by name.
    pub fn subscriptions_of(&self, stream: &str) -> impl Iterator<Item = &Subscription> {
        self.subscriptions
            .get(stream)
            .into_iter()
            .flat_map(|subs| subs.values().map(|s| &**s))
    }

    pub fn subscription(&self, stream: &str, name: &str) -> Option<&Subscription> {
        self.subscriptions.get(stream)?.get(name).map(|s| &**s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Command;

    fn def(json: serde_json::Value) -> StreamDef {
        serde_json::from_value(json).expect("parses")
    }

    #[test]
    fn validation_explains_what_is_wrong() {
        let ok = def(serde_json::json!({
            "processors": [
                {"type": "json_parse"},
                {"type": "filter", "expr": "event.level == 'error'"},
                {"type": "transform", "set": {"slow": "event.ms > 100"}, "drop": ["debug"]},
                {"type": "window", "kind": "sliding", "size": "10s", "slide": "1s",
                 "group_by": "service", "field": "ms", "aggregates": ["count", "p99"]}
            ],
            "buffer": {"capacity": 10, "policy": "drop_oldest"}
        }));
        assert!(ok.validate().is_ok(), "{:?}", ok.validate());
        let cases = [
            (serde_json::json!({"buffer": {"capacity": 0}}), "capacity"),
            (
                serde_json::json!({"processors": [{"type": "filter", "expr": " "}]}),
                "processors[0]: expr",
            ),
            (
                serde_json::json!({"processors": [{"type": "window", "kind": "sliding",
                    "size": "10s", "aggregates": ["count"]}]}),
                "needs slide",
            ),
            (
                serde_json::json!({"processors": [{"type": "window", "kind": "sliding",
                    "size": "10s", "slide": "3s", "aggregates": ["count"]}]}),
                "multiple",
            ),
            (
                serde_json::json!({"processors": [{"type": "window", "kind": "tumbling",
                    "size_count": 10, "aggregates": ["avg"]}]}),
                "need field",
            ),
            (
                serde_json::json!({"processors": [{"type": "transform"}]}),
                "set, rename or drop",
            ),
        ];
        for (json, want) in cases {
            let err = def(json.clone()).validate().expect_err("refused");
            assert!(err.0.contains(want), "{json}: {err} lacks {want:?}");
        }
        assert!(serde_json::from_value::<StreamDef>(
            serde_json::json!({"processors": [{"type": "nope"}]})
        )
        .is_err());
        assert!(validate_name("stream", "_traffic").is_err());
        assert!(validate_name("stream", "a/b").is_err());
        assert!(validate_name("stream", "web.errors-1").is_ok());
    }

    #[test]
    fn deleting_a_stream_deletes_its_subscriptions_only() {
        let mut reg = Registry::new();
        let put = |name: &str| Command::PutStream {
            name: name.into(),
            def: StreamDef::default(),
        };
        let sub = |stream: &str, name: &str| Command::PutSubscription {
            stream: stream.into(),
            name: name.into(),
            def: SubscriptionDef {
                service: "pager".into(),
                tags: Vec::new(),
                path: "/events".into(),
                delivery: Delivery::One,
                capacity: 10,
                batch: 10,
            },
        };
        reg.apply(1, &put("a"));
        reg.apply(2, &put("ab"));
        let (resp, _) = reg.apply(3, &sub("nope", "x"));
        assert!(matches!(resp, Response::NotFound(_)), "{resp:?}");
        reg.apply(4, &sub("a", "x"));
        reg.apply(5, &sub("a", "y"));
        reg.apply(6, &sub("ab", "x"));
        assert_eq!(reg.subscriptions_of("a").count(), 2);
        let (resp, touched) = reg.apply(7, &Command::DeleteStream { name: "a".into() });
        assert_eq!(resp, Response::StreamDeleted { existed: true });
        assert_eq!(touched.len(), 3, "{touched:?}");
        assert_eq!(reg.subscriptions_of("a").count(), 0);
        assert_eq!(reg.subscriptions_of("ab").count(), 1);
        assert_eq!(reg.stream("ab").map(|s| s.create_index), Some(2));
    }
}
