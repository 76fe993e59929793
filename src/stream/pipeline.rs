//! A stream's event-processing pipeline: its processors compiled once, run
//! on one event at a time. Pure: no I/O, no clock, no tasks.
//!
//! Owns compiling a `StreamDef`'s processors (`Pipeline::compile`, the
//! check the API runs before proposing a definition), running events
//! through them, and the pipeline's counters. Does not buffer, deliver or
//! read time (`stream::buffer`, `stream::delivery` and the runtime do):
//! processing time comes in as `now_ms`. Expressions live in `expr`,
//! window state in `window`.
//!
//! Semantics, processor by processor:
//! - `json_parse` without `field`: a `Text` event is parsed as JSON, a
//!   `Json` event passes unchanged. With `field`: the string at `field` is
//!   parsed and replaces it; a field that already holds non-string JSON
//!   passes unchanged; a missing field or a non-object event is a failure.
//!   A `Text` event in field mode is parsed as JSON first, then its field
//!   (raw text that is a JSON document with embedded JSON in a field).
//!   A failure counts in `parse_errors`, and with `dead_letter` becomes
//!   `{"error": message, "raw": text or original event}` for that stream
//!   (`dead_lettered`). A `Text` event reaching any other processor, or the
//!   end, becomes a JSON string.
//! - `filter`: CEL with the event bound as `event` (see `expr` for numbers:
//!   int, uint and double compare with each other). `true` keeps the event,
//!   `false` drops it (`filtered`); any other result or an evaluation error
//!   (e.g. a missing field: guard with `has(event.x)`) drops it
//!   (`expr_errors`).
//! - `transform`: every `set` expression sees the event as it entered the
//!   transform; results are then written in field-name order, then
//!   `rename` (old → new, in old-name order; a missing old name is no
//!   error), then `drop` (missing fields are no error). A non-object event,
//!   an expression error, a result without JSON form, or a write through a
//!   non-object drops the event (`expr_errors`).
//! - `window`: see `window`. Its output events (one per window and group)
//!   continue through the processors after it, like any event.
//!
//! Field names: a name that is a top-level key means that key; otherwise a
//! `.` in it walks nested objects (`a.b`). Writes (`set`, rename targets)
//! always walk, creating missing objects.
//!
//! Time: the pipeline's clock is the largest `now_ms` it was given, so a
//! clock that steps back never reopens a closed window. `push` first closes
//! the windows that ended by its `now_ms` (as `tick` would), so results do
//! not wait for the timer while events keep coming.
//!
//! Invariants: a compiled pipeline's definition passed
//! `StreamDef::validate` and all its expressions parsed; output order is
//! a function of the inputs and their `now_ms` alone.

use serde_json::Value;

use super::expr::{to_cel, to_json, Cel, Expr};
use super::window::Window;
use crate::registry::{ProcessorDef, StreamDef, StreamError};

/// One event as it arrives: raw text, or JSON already parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Json(Value),
}

impl Input {
    fn into_json(self) -> Value {
        match self {
            Input::Text(s) => Value::String(s),
            Input::Json(v) => v,
        }
    }
}

/// What a pipeline dropped or diverted, since it was compiled.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// `json_parse` failures.
    pub parse_errors: u64,
    /// Of those, sent to a dead-letter stream.
    pub dead_lettered: u64,
    /// A filter said false.
    pub filtered: u64,
    /// A filter or transform failed on an event (the event is dropped).
    pub expr_errors: u64,
    /// Events a window could not aggregate (its `field` missing or not a
    /// number); they do not count in `count` either.
    pub window_skipped: u64,
    /// Events a window dropped to stay within its group and cell bounds.
    pub window_overflow: u64,
}

/// An event for another stream (json_parse's `dead_letter`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub stream: String,
    pub event: Value,
}

enum Stage {
    JsonParse {
        field: Option<String>,
        dead_letter: Option<String>,
    },
    Filter(Expr),
    Transform {
        set: Vec<(String, Expr)>,
        rename: Vec<(String, String)>,
        drop: Vec<String>,
    },
    Window(Box<Window>),
}

/// A compiled stream pipeline.
pub struct Pipeline {
    cel: Cel,
    stages: Vec<Stage>,
    counters: Counters,
    /// The largest `now_ms` seen: processing time never goes back.
    clock: u64,
}

impl Pipeline {
    /// Validates `def` and compiles every expression; an error names the
    /// processor (`processors[2]: ...`) and carries CEL's message.
    pub fn compile(def: &StreamDef) -> Result<Pipeline, StreamError> {
        def.validate()?;
        let cel = Cel::new().map_err(StreamError)?;
        let mut stages = Vec::with_capacity(def.processors.len());
        for (i, p) in def.processors.iter().enumerate() {
            let at = |what: &str, e: String| StreamError(format!("processors[{i}]: {what}: {e}"));
            let stage = match p {
                ProcessorDef::JsonParse { field, dead_letter } => Stage::JsonParse {
                    field: field.clone(),
                    dead_letter: dead_letter.clone(),
                },
                ProcessorDef::Filter { expr } => {
                    Stage::Filter(cel.compile(expr).map_err(|e| at("expr", e))?)
                }
                ProcessorDef::Transform { set, rename, drop } => Stage::Transform {
                    set: set
                        .iter()
                        .map(|(k, e)| {
                            let expr =
                                cel.compile(e).map_err(|err| at(&format!("set.{k}"), err))?;
                            Ok((k.clone(), expr))
                        })
                        .collect::<Result<_, StreamError>>()?,
                    rename: rename.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
                    drop: drop.clone(),
                },
                ProcessorDef::Window {
                    group_by,
                    field,
                    aggregates,
                    ..
                } => {
                    let span = p
                        .window_span()
                        .map_err(|e| at("window", e.0))?
                        .ok_or_else(|| at("window", "no span".into()))?;
                    Stage::Window(Box::new(Window::new(
                        span,
                        group_by.clone(),
                        field.clone(),
                        aggregates,
                    )))
                }
            };
            stages.push(stage);
        }
        Ok(Pipeline {
            cel,
            stages,
            counters: Counters::default(),
            clock: 0,
        })
    }

    /// One event through every processor in order; output events are
    /// appended to `out`, dead letters to `dead`. `now_ms` is processing
    /// time (ms since the epoch); windows that ended by it close first.
    pub fn push(
        &mut self,
        input: Input,
        now_ms: u64,
        out: &mut Vec<Value>,
        dead: &mut Vec<DeadLetter>,
    ) {
        self.tick(now_ms, out, dead);
        let now = self.clock;
        run(
            &mut self.stages,
            &self.cel,
            &mut self.counters,
            input,
            now,
            out,
            dead,
        );
    }

    /// Closes every time window that ended at or before `now_ms`; their
    /// results go through the processors after the window, into `out`
    /// (and their dead letters into `dead`).
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Value>, dead: &mut Vec<DeadLetter>) {
        self.clock = self.clock.max(now_ms);
        let now = self.clock;
        close_windows(
            &mut self.stages,
            &self.cel,
            &mut self.counters,
            now,
            out,
            dead,
        );
    }

    /// When `tick` next has something to close (ms), `None` if no time
    /// window holds data.
    pub fn next_deadline(&self) -> Option<u64> {
        self.stages
            .iter()
            .filter_map(|s| match s {
                Stage::Window(w) => w.deadline(),
                _ => None,
            })
            .min()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }
}

fn close_windows(
    stages: &mut [Stage],
    cel: &Cel,
    c: &mut Counters,
    now: u64,
    out: &mut Vec<Value>,
    dead: &mut Vec<DeadLetter>,
) {
    // In processor order, so a window's results reach a later window
    // before that one closes.
    for i in 0..stages.len() {
        let (head, rest) = stages.split_at_mut(i + 1);
        let Some(Stage::Window(w)) = head.last_mut() else {
            continue;
        };
        let mut emitted = Vec::new();
        w.close(now, &mut emitted);
        for e in emitted {
            run(rest, cel, c, Input::Json(e), now, out, dead);
        }
    }
}

/// `ev` through `stages`; a window's output continues through the stages
/// after it.
fn run(
    stages: &mut [Stage],
    cel: &Cel,
    c: &mut Counters,
    mut ev: Input,
    now: u64,
    out: &mut Vec<Value>,
    dead: &mut Vec<DeadLetter>,
) {
    for i in 0..stages.len() {
        let (head, rest) = stages.split_at_mut(i + 1);
        let Some(stage) = head.last_mut() else {
            return;
        };
        ev = match stage {
            Stage::JsonParse { field, dead_letter } => match json_parse(ev, field.as_deref()) {
                Ok(v) => Input::Json(v),
                Err((error, raw)) => {
                    c.parse_errors += 1;
                    if let Some(stream) = dead_letter {
                        dead.push(DeadLetter {
                            stream: stream.clone(),
                            event: serde_json::json!({"error": error, "raw": raw}),
                        });
                        c.dead_lettered += 1;
                    }
                    return;
                }
            },
            Stage::Filter(expr) => {
                let v = ev.into_json();
                match cel.eval(expr, &to_cel(&v)) {
                    Ok(cel::Value::Bool(true)) => Input::Json(v),
                    Ok(cel::Value::Bool(false)) => {
                        c.filtered += 1;
                        return;
                    }
                    _ => {
                        c.expr_errors += 1;
                        return;
                    }
                }
            }
            Stage::Transform { set, rename, drop } => {
                match transform(cel, set, rename, drop, ev.into_json()) {
                    Ok(v) => Input::Json(v),
                    Err(_) => {
                        c.expr_errors += 1;
                        return;
                    }
                }
            }
            Stage::Window(w) => {
                let mut emitted = Vec::new();
                w.push(&ev.into_json(), now, c, &mut emitted);
                for e in emitted {
                    run(rest, cel, c, Input::Json(e), now, out, dead);
                }
                return;
            }
        };
    }
    out.push(ev.into_json());
}

/// The parsed event, or the failure and what to dead-letter as `raw`.
fn json_parse(ev: Input, field: Option<&str>) -> Result<Value, (String, Value)> {
    let (mut v, raw) = match ev {
        Input::Json(v) => (v, None),
        Input::Text(s) => match serde_json::from_str::<Value>(&s) {
            Ok(v) => (v, Some(s)),
            Err(e) => return Err((format!("invalid JSON: {e}"), Value::String(s))),
        },
    };
    let Some(field) = field else {
        return Ok(v);
    };
    let failed =
        |msg: String, v: Value, raw: Option<String>| Err((msg, raw.map_or(v, Value::String)));
    let parsed = match lookup(&v, field) {
        None if v.is_object() => return failed(format!("no field {field:?}"), v, raw),
        None => return failed(format!("not an object, no field {field:?}"), v, raw),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(parsed) => parsed,
            Err(e) => return failed(format!("field {field:?}: invalid JSON: {e}"), v, raw),
        },
        Some(_) => return Ok(v),
    };
    if let Some(slot) = lookup_mut(&mut v, field) {
        *slot = parsed;
    }
    Ok(v)
}

fn transform(
    cel: &Cel,
    set: &[(String, Expr)],
    rename: &[(String, String)],
    drop: &[String],
    mut v: Value,
) -> Result<Value, String> {
    if !v.is_object() {
        return Err("a transform needs an object event".into());
    }
    if !set.is_empty() {
        let event = to_cel(&v);
        let mut results = Vec::with_capacity(set.len());
        for (field, expr) in set {
            let r = cel.eval(expr, &event)?;
            results.push((field, to_json(&r)?));
        }
        for (field, r) in results {
            set_path(&mut v, field, r)?;
        }
    }
    for (old, new) in rename {
        if let Some(x) = remove_path(&mut v, old) {
            set_path(&mut v, new, x)?;
        }
    }
    for field in drop {
        remove_path(&mut v, field);
    }
    Ok(v)
}

/// The value at `path`: the top-level key `path` if there is one, else
/// the nested objects its `.`-separated parts name.
pub(super) fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    if let Some(x) = obj.get(path) {
        return Some(x);
    }
    if !path.contains('.') {
        return None;
    }
    path.split('.')
        .try_fold(v, |cur, part| cur.as_object()?.get(part))
}

fn lookup_mut<'a>(v: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    if v.as_object()?.contains_key(path) {
        return v.as_object_mut()?.get_mut(path);
    }
    path.split('.')
        .try_fold(v, |cur, part| cur.as_object_mut()?.get_mut(part))
}

/// Writes `new` at the nested path `path`, creating missing objects.
fn set_path(v: &mut Value, path: &str, new: Value) -> Result<(), String> {
    let mut parts = path.split('.').peekable();
    let mut cur = v;
    while let Some(part) = parts.next() {
        let obj = cur
            .as_object_mut()
            .ok_or_else(|| format!("cannot set {path:?}: {part:?} is under a non-object"))?;
        if parts.peek().is_none() {
            obj.insert(part.to_string(), new);
            return Ok(());
        }
        cur = obj
            .entry(part)
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
    Ok(())
}

/// Removes what `lookup(v, path)` finds.
fn remove_path(v: &mut Value, path: &str) -> Option<Value> {
    let obj = v.as_object_mut()?;
    if let Some(x) = obj.remove(path) {
        return Some(x);
    }
    let (parent, last) = path.rsplit_once('.')?;
    parent
        .split('.')
        .try_fold(v, |cur, part| cur.as_object_mut()?.get_mut(part))?
        .as_object_mut()?
        .remove(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn pipeline(processors: Value) -> Pipeline {
        let def: StreamDef =
            serde_json::from_value(json!({ "processors": processors })).expect("a definition");
        Pipeline::compile(&def).expect("compiles")
    }

    fn push(p: &mut Pipeline, input: Input, now: u64) -> (Vec<Value>, Vec<DeadLetter>) {
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        p.push(input, now, &mut out, &mut dead);
        (out, dead)
    }

    fn json_in(p: &mut Pipeline, v: Value) -> Vec<Value> {
        push(p, Input::Json(v), 0).0
    }

    fn text_in(p: &mut Pipeline, s: &str) -> (Vec<Value>, Vec<DeadLetter>) {
        push(p, Input::Text(s.into()), 0)
    }

    #[test]
    fn dead_letters_of_closing_windows_come_out_of_tick() {
        let mut p = pipeline(json!([
            {"type": "window", "kind": "tumbling", "size": "1s", "group_by": "g",
             "aggregates": ["count"]},
            {"type": "json_parse", "field": "group", "dead_letter": "bad"}
        ]));
        let (out, dead) = push(&mut p, Input::Json(json!({"g": "not json"})), 0);
        assert!(out.is_empty() && dead.is_empty());
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        p.tick(1_000, &mut out, &mut dead);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].stream, "bad");
        assert_eq!(dead[0].event["raw"]["group"], json!("not json"));
        assert_eq!(p.counters().dead_lettered, 1);
    }

    #[test]
    fn json_parse_parses_text_passes_json_and_dead_letters_failures() {
        let mut p = pipeline(json!([{"type": "json_parse", "dead_letter": "bad"}]));
        assert_eq!(
            text_in(&mut p, r#"{"a": 1}"#),
            (vec![json!({"a": 1})], vec![])
        );
        assert_eq!(
            json_in(&mut p, json!({"x": "{}"})),
            vec![json!({"x": "{}"})]
        );
        let (out, dead) = text_in(&mut p, "not json");
        assert!(out.is_empty());
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].stream, "bad");
        assert_eq!(dead[0].event["raw"], json!("not json"));
        assert!(
            dead[0].event["error"]
                .as_str()
                .is_some_and(|e| e.contains("invalid JSON")),
            "{:?}",
            dead[0].event
        );
        let c = p.counters();
        assert_eq!((c.parse_errors, c.dead_lettered), (1, 1));

        let mut p = pipeline(json!([{"type": "json_parse"}]));
        assert_eq!(text_in(&mut p, "{"), (vec![], vec![]));
        assert_eq!(
            (p.counters().parse_errors, p.counters().dead_lettered),
            (1, 0)
        );
    }

    #[test]
    fn json_parse_field_mode() {
        let mut p = pipeline(json!([
            {"type": "json_parse", "field": "payload", "dead_letter": "bad"}
        ]));
        assert_eq!(
            json_in(&mut p, json!({"payload": r#"{"b": 2}"#, "k": 1})),
            vec![json!({"payload": {"b": 2}, "k": 1})]
        );
        // Already structured: passes as a JSON event does without `field`.
        assert_eq!(
            json_in(&mut p, json!({"payload": {"b": 2}})),
            vec![json!({"payload": {"b": 2}})]
        );
        // Text: the document first, then its field.
        assert_eq!(
            text_in(&mut p, r#"{"payload": "[1, 2]"}"#).0,
            vec![json!({"payload": [1, 2]})]
        );
        let bad = json!({"payload": "{oops", "k": 1});
        let (out, dead) = push(&mut p, Input::Json(bad.clone()), 0);
        assert!(out.is_empty());
        assert_eq!(dead[0].event["raw"], bad, "raw is the original event");
        let (_, dead) = push(&mut p, Input::Json(json!({"k": 1})), 0);
        assert!(dead[0].event["error"]
            .as_str()
            .is_some_and(|e| e.contains("no field")));
        let (_, dead) = push(&mut p, Input::Json(json!("a string")), 0);
        assert_eq!(dead[0].event["raw"], json!("a string"));
        let (_, dead) = text_in(&mut p, "plain text");
        assert_eq!(dead[0].event["raw"], json!("plain text"));
        assert_eq!(p.counters().parse_errors, 4);
        assert_eq!(p.counters().dead_lettered, 4);

        let mut nested = pipeline(json!([{"type": "json_parse", "field": "m.p"}]));
        assert_eq!(
            json_in(&mut nested, json!({"m": {"p": "3"}})),
            vec![json!({"m": {"p": 3}})]
        );
    }

    #[test]
    fn text_without_json_parse_is_a_json_string() {
        let mut p = pipeline(json!([]));
        assert_eq!(text_in(&mut p, "hello").0, vec![json!("hello")]);
        let mut p = pipeline(json!([{"type": "filter", "expr": "event == 'hi'"}]));
        assert_eq!(text_in(&mut p, "hi").0, vec![json!("hi")]);
        assert_eq!(text_in(&mut p, "ho").0, Vec::<Value>::new());
    }

    #[test]
    fn filter_keeps_true_drops_false_and_counts_errors() {
        let mut p = pipeline(json!([{"type": "filter",
            "expr": "event.level == \"error\" && event.latency_ms > 100"}]));
        let keep = [
            json!({"level": "error", "latency_ms": 150}),
            json!({"level": "error", "latency_ms": 150.5}),
            json!({"level": "error", "latency_ms": 100.25}),
        ];
        for ev in &keep {
            assert_eq!(json_in(&mut p, ev.clone()), vec![ev.clone()], "{ev}");
        }
        for ev in [
            json!({"level": "error", "latency_ms": 100}),
            json!({"level": "error", "latency_ms": 99.9}),
            json!({"level": "info", "latency_ms": 500}),
        ] {
            assert!(json_in(&mut p, ev.clone()).is_empty(), "{ev}");
        }
        assert_eq!(p.counters().filtered, 3);
        // A missing field is an error, not false.
        assert!(json_in(&mut p, json!({"level": "error"})).is_empty());
        assert_eq!(p.counters().expr_errors, 1);

        let mut p = pipeline(json!([{"type": "filter", "expr": "event.n + 1"}]));
        assert!(json_in(&mut p, json!({"n": 1})).is_empty());
        assert_eq!(p.counters().expr_errors, 1, "a non-bool result");
        assert_eq!(p.counters().filtered, 0);
    }

    #[test]
    fn transform_sets_then_renames_then_drops() {
        let mut p = pipeline(json!([{"type": "transform",
            "set": {
                "slow": "event.ms > 100",
                "ms": "event.ms * 2",
                "was": "event.ms",
                "meta.host": "event.host.upperAscii()",
                "tags": "[event.host, 1, 2.5, null]",
            },
            "rename": {"host": "source", "meta.host": "origin.name"},
            "drop": ["debug", "absent", "meta"]
        }]));
        let out = json_in(
            &mut p,
            json!({"ms": 150, "host": "web1", "debug": true, "meta": {"keep": 1}}),
        );
        assert_eq!(
            out,
            vec![json!({
                "slow": true,
                "ms": 300,
                "was": 150,
                "tags": ["web1", 1, 2.5, null],
                "source": "web1",
                "origin": {"name": "WEB1"},
            })]
        );
        assert!(json_in(&mut p, json!({"host": "x"})).is_empty(), "no ms");
        assert!(json_in(&mut p, json!([1])).is_empty(), "not an object");
        assert_eq!(p.counters().expr_errors, 2);

        let mut p = pipeline(json!([{"type": "transform", "set": {"a.b": "1"}}]));
        assert!(
            json_in(&mut p, json!({"a": 5})).is_empty(),
            "a is no object"
        );
        assert_eq!(json_in(&mut p, json!({})), vec![json!({"a": {"b": 1}})]);
        let mut p = pipeline(json!([{"type": "transform", "drop": ["x"]}]));
        assert!(json_in(&mut p, json!("text")).is_empty());
        assert_eq!(p.counters().expr_errors, 1);
    }

    #[test]
    fn compile_names_the_processor_and_the_cel_error() {
        let def = |processors: Value| -> StreamDef {
            serde_json::from_value(json!({ "processors": processors })).expect("def")
        };
        let err = Pipeline::compile(&def(json!([
            {"type": "json_parse"},
            {"type": "filter", "expr": "event.a >"}
        ])))
        .err()
        .expect("refused");
        assert!(err.0.starts_with("processors[1]: expr: "), "{err}");
        let err = Pipeline::compile(&def(json!([
            {"type": "transform", "set": {"ok": "1", "x": "((("}}
        ])))
        .err()
        .expect("refused");
        assert!(err.0.starts_with("processors[0]: set.x: "), "{err}");
        let err = Pipeline::compile(&def(json!([{"type": "window", "kind": "tumbling",
            "size": "1s", "aggregates": ["avg"]}])))
        .err()
        .expect("refused");
        assert!(err.0.contains("need field"), "{err}");
    }

    #[test]
    fn a_pipeline_moves_into_a_task() {
        fn send<T: Send>() {}
        send::<Pipeline>();
    }
}
