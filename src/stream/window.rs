//! The `window` processor: per-group aggregates over processing-time or
//! event-count windows.
//!
//! Owns the window state (panes of partial aggregates per group) and the
//! shape of a window's output event. Does not read clocks (the pipeline
//! passes processing time in) and does not route its output onwards (the
//! pipeline sends it through the later processors).
//!
//! A window is cut into panes of `slide` (ms or events). Each pane holds,
//! per group, one `Cell`: count, sum, min, max, first/last event time and,
//! only when p50 or p99 is asked for, a DDSketch. Emitting merges the
//! `size / slide` panes of the window; that is why the sketch must be
//! mergeable.
//!
//! Time windows cover `[end - size, end)`, `end` a multiple of `slide` since
//! the epoch. One closes (is emitted) once the pipeline's time reaches its
//! end, and only if it holds data; every window that holds data is emitted
//! exactly once. A pane is dropped once the last window covering it closed.
//!
//! Count windows count per group: at every `slide`-th aggregated event of a
//! group the window emits that group's last `size` aggregated events (fewer
//! while the group has seen fewer; `count` says how many).
//!
//! Invariants and bounds:
//! - Only events whose `field` is a JSON number are aggregated (all events
//!   when the window has no `field`, i.e. `count` only); the others are
//!   `window_skipped` and do not count, in `count` nor towards a count
//!   window's slide, so `avg == sum / count` always.
//! - A time window keeps at most `MAX_GROUPS` groups per pane and
//!   `MAX_CELLS` cells over all its live panes; an event of a new group
//!   beyond either is dropped and counted in `window_overflow`.
//! - A count window's groups live until evicted: it keeps at most
//!   `min(MAX_GROUPS, MAX_CELLS / (size / slide))` groups, and a new group
//!   beyond that evicts the least recently updated one (its not yet emitted
//!   events count in `window_overflow`).
//! - Groups are emitted in the order of their value's compact JSON text.
//!
//! Output (one event per window and group, only the asked aggregates):
//! `{"window_start", "window_end", "group", "count", "sum", "avg", "min",
//! "max", "p50", "p99"}`. A time window's start/end are its bounds (end
//! exclusive); a count window's are the processing times of its first and
//! last event (both inclusive). `group` is the `group_by` value, `null` when
//! the window has no `group_by` or the event lacks it. A number that has no
//! JSON form (a sum overflowing to infinity) is `null`.
//!
//! Quantiles: DDSketch with 1% relative accuracy; `pq` is within 1% of the
//! value at 0-based rank `floor(q * (n - 1))` of the sorted values (values
//! within 1e-9 of zero count as zero). A sketch grows to at most 1024 bins
//! per sign (about 8 KiB), which spans nine decades before its smallest
//! values lose accuracy.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;
use sketches_ddsketch::{Config, DDSketch};

use super::pipeline::{lookup, Counters};
use crate::registry::{Aggregate, WindowSpan};

/// Most groups one pane of a time window holds.
pub const MAX_GROUPS: usize = 10_000;
/// Most cells (pane × group) one window holds.
pub const MAX_CELLS: usize = 20_000;
const SKETCH_ALPHA: f64 = 0.01;
const SKETCH_BINS: u32 = 1024;
const SKETCH_MIN: f64 = 1e-9;

pub struct Window {
    group_by: Option<String>,
    field: Option<String>,
    /// Sorted and without repeats, so output fields have a fixed order.
    aggregates: Vec<Aggregate>,
    /// Set when p50 or p99 is asked for: cells carry sketches only then.
    sketch: Option<Config>,
    state: State,
}

enum State {
    Time(TimeState),
    Count(CountState),
}

struct TimeState {
    size: u64,
    slide: u64,
    /// Pane start → group key → (group value, cell).
    panes: BTreeMap<u64, BTreeMap<String, (Value, Cell)>>,
    /// Every window ending at or before this has been emitted.
    closed: u64,
    /// Cells over all panes, for `MAX_CELLS`.
    cells: usize,
}

struct CountState {
    slide: u64,
    /// `size / slide`.
    panes: usize,
    max_groups: usize,
    groups: BTreeMap<String, CountGroup>,
    /// Last update → group key: the eviction order.
    lru: BTreeMap<u64, String>,
    seq: u64,
}

struct CountGroup {
    value: Value,
    /// The group's last full panes, at most `panes - 1`, oldest first.
    done: VecDeque<Cell>,
    current: Cell,
    seq: u64,
}

#[derive(Clone)]
struct Cell {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first_ms: u64,
    last_ms: u64,
    sketch: Option<DDSketch>,
}

impl Cell {
    fn new(sketch: Option<Config>) -> Cell {
        Cell {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            first_ms: u64::MAX,
            last_ms: 0,
            sketch: sketch.map(DDSketch::new),
        }
    }

    fn add(&mut self, v: f64, now_ms: u64) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.first_ms = self.first_ms.min(now_ms);
        self.last_ms = self.last_ms.max(now_ms);
        if let Some(s) = &mut self.sketch {
            s.add(v);
        }
    }

    fn merge(&mut self, o: &Cell) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.first_ms = self.first_ms.min(o.first_ms);
        self.last_ms = self.last_ms.max(o.last_ms);
        if let (Some(s), Some(os)) = (&mut self.sketch, &o.sketch) {
            s.merge(os)
                .expect("every sketch of a window is built from the window's one config");
        }
    }
}

impl Window {
    pub fn new(
        span: WindowSpan,
        group_by: Option<String>,
        field: Option<String>,
        aggregates: &[Aggregate],
    ) -> Window {
        let mut aggregates = aggregates.to_vec();
        aggregates.sort();
        aggregates.dedup();
        let sketch = aggregates
            .iter()
            .any(|a| matches!(a, Aggregate::P50 | Aggregate::P99))
            .then(|| Config::new(SKETCH_ALPHA, SKETCH_BINS, SKETCH_MIN));
        let state = match span {
            WindowSpan::Time { size_ms, slide_ms } => State::Time(TimeState {
                size: size_ms,
                slide: slide_ms,
                panes: BTreeMap::new(),
                closed: 0,
                cells: 0,
            }),
            WindowSpan::Count { size, slide } => {
                // A validated span has 1..=MAX_PANES panes.
                let panes = usize::try_from(size / slide).unwrap_or(usize::MAX).max(1);
                State::Count(CountState {
                    slide,
                    panes,
                    max_groups: MAX_GROUPS.min(MAX_CELLS / panes).max(1),
                    groups: BTreeMap::new(),
                    lru: BTreeMap::new(),
                    seq: 0,
                })
            }
        };
        Window {
            group_by,
            field,
            aggregates,
            sketch,
            state,
        }
    }

    /// Adds one event; a count window may emit into `out` right away.
    pub fn push(&mut self, event: &Value, now_ms: u64, c: &mut Counters, out: &mut Vec<Value>) {
        let v = match &self.field {
            None => 0.0,
            Some(f) => match lookup(event, f).and_then(Value::as_f64) {
                Some(v) => v,
                None => {
                    c.window_skipped += 1;
                    return;
                }
            },
        };
        let group = self
            .group_by
            .as_deref()
            .and_then(|g| lookup(event, g))
            .cloned()
            .unwrap_or(Value::Null);
        let key = group.to_string();
        match &mut self.state {
            State::Time(t) => {
                let start = now_ms - now_ms % t.slide;
                let pane = t.panes.entry(start).or_default();
                if let Some((_, cell)) = pane.get_mut(&key) {
                    cell.add(v, now_ms);
                } else if pane.len() >= MAX_GROUPS || t.cells >= MAX_CELLS {
                    c.window_overflow += 1;
                    if pane.is_empty() {
                        t.panes.remove(&start);
                    }
                } else {
                    let mut cell = Cell::new(self.sketch);
                    cell.add(v, now_ms);
                    pane.insert(key, (group, cell));
                    t.cells += 1;
                }
            }
            State::Count(s) => {
                s.seq += 1;
                let seq = s.seq;
                if let Some(g) = s.groups.get_mut(&key) {
                    s.lru.remove(&g.seq);
                    g.seq = seq;
                } else {
                    while s.groups.len() >= s.max_groups {
                        let Some((_, oldest)) = s.lru.pop_first() else {
                            break;
                        };
                        if let Some(g) = s.groups.remove(&oldest) {
                            c.window_overflow += g.current.count;
                        }
                    }
                    s.groups.insert(
                        key.clone(),
                        CountGroup {
                            value: group,
                            done: VecDeque::new(),
                            current: Cell::new(self.sketch),
                            seq,
                        },
                    );
                }
                s.lru.insert(seq, key.clone());
                let Some(g) = s.groups.get_mut(&key) else {
                    return;
                };
                g.current.add(v, now_ms);
                if g.current.count < s.slide {
                    return;
                }
                let mut total = g.current.clone();
                for pane in &g.done {
                    total.merge(pane);
                }
                let full = std::mem::replace(&mut g.current, Cell::new(self.sketch));
                g.done.push_back(full);
                while g.done.len() >= s.panes {
                    g.done.pop_front();
                }
                out.push(output(
                    &self.aggregates,
                    &g.value,
                    &total,
                    total.first_ms,
                    total.last_ms,
                ));
            }
        }
    }

    /// Emits every time window that ended at or before `now_ms`.
    pub fn close(&mut self, now_ms: u64, out: &mut Vec<Value>) {
        let State::Time(t) = &mut self.state else {
            return;
        };
        while let Some(end) = t.next_end() {
            if end > now_ms {
                break;
            }
            let start = end.saturating_sub(t.size);
            let mut merged: BTreeMap<&str, (&Value, Cell)> = BTreeMap::new();
            for pane in t.panes.range(start..end).map(|(_, p)| p) {
                for (key, (group, cell)) in pane {
                    match merged.get_mut(key.as_str()) {
                        Some((_, m)) => m.merge(cell),
                        None => {
                            merged.insert(key, (group, cell.clone()));
                        }
                    }
                }
            }
            for (group, cell) in merged.values() {
                out.push(output(&self.aggregates, group, cell, start, end));
            }
            t.closed = end;
            while let Some(entry) = t.panes.first_entry() {
                if entry.key().saturating_add(t.size) > end {
                    break;
                }
                t.cells -= entry.remove().len();
            }
        }
    }

    /// When `close` next has something to emit; `None` for a count window
    /// or a time window without data.
    pub fn deadline(&self) -> Option<u64> {
        match &self.state {
            State::Time(t) => t.next_end(),
            State::Count(_) => None,
        }
    }
}

impl TimeState {
    /// The end of the first window not yet emitted that holds data. Panes
    /// that no open window covers are gone, so the oldest pane is in it.
    fn next_end(&self) -> Option<u64> {
        let (&first, _) = self.panes.first_key_value()?;
        Some(
            self.closed
                .saturating_add(self.slide)
                .max(first.saturating_add(self.slide)),
        )
    }
}

fn number(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn output(aggregates: &[Aggregate], group: &Value, cell: &Cell, start: u64, end: u64) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("window_start".into(), start.into());
    o.insert("window_end".into(), end.into());
    o.insert("group".into(), group.clone());
    let quantile = |q: f64| {
        cell.sketch
            .as_ref()
            .and_then(|s| s.quantile(q).ok().flatten())
            .map_or(Value::Null, number)
    };
    for a in aggregates {
        let (name, v) = match a {
            Aggregate::Count => ("count", cell.count.into()),
            Aggregate::Sum => ("sum", number(cell.sum)),
            // `cell.count` is at least 1: cells exist only once added to.
            Aggregate::Avg => ("avg", number(cell.sum / cell.count as f64)),
            Aggregate::Min => ("min", number(cell.min)),
            Aggregate::Max => ("max", number(cell.max)),
            Aggregate::P50 => ("p50", quantile(0.5)),
            Aggregate::P99 => ("p99", quantile(0.99)),
        };
        o.insert(name.into(), v);
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use crate::registry::StreamDef;
    use crate::stream::pipeline::{Input, Pipeline};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// A multiple of every slide below, so windows align with it.
    const T0: u64 = 1_700_000_000_000;

    fn pipeline(processors: Value) -> Pipeline {
        let def: StreamDef =
            serde_json::from_value(json!({ "processors": processors })).expect("a definition");
        Pipeline::compile(&def).expect("compiles")
    }

    fn push(p: &mut Pipeline, ev: Value, now: u64) -> Vec<Value> {
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        p.push(Input::Json(ev), now, &mut out, &mut dead);
        assert!(dead.is_empty());
        out
    }

    fn tick(p: &mut Pipeline, now: u64) -> Vec<Value> {
        let mut out = Vec::new();
        p.tick(now, &mut out, &mut Vec::new());
        out
    }

    #[test]
    fn tumbling_time_window_per_group() {
        let mut p = pipeline(json!([{"type": "window", "kind": "tumbling", "size": "10s",
            "group_by": "svc", "field": "ms", "aggregates": ["max", "count", "avg", "sum", "min"]}]));
        assert_eq!(p.next_deadline(), None);
        assert!(push(&mut p, json!({"svc": "b", "ms": 10}), T0 + 1_000).is_empty());
        assert!(push(&mut p, json!({"svc": "a", "ms": 1}), T0 + 2_000).is_empty());
        assert!(push(&mut p, json!({"svc": "a", "ms": 2.5}), T0 + 9_999).is_empty());
        assert!(push(&mut p, json!({"ms": 7}), T0 + 5_000).is_empty());
        assert!(push(&mut p, json!({"svc": "a", "ms": "slow"}), T0 + 5_000).is_empty());
        assert!(push(&mut p, json!({"svc": "a"}), T0 + 5_000).is_empty());
        assert_eq!(p.counters().window_skipped, 2);
        assert_eq!(p.next_deadline(), Some(T0 + 10_000));
        assert!(tick(&mut p, T0 + 9_999).is_empty());
        let w = |g: Value, count: u64, sum: f64, min: f64, max: f64| {
            json!({"window_start": T0, "window_end": T0 + 10_000, "group": g, "count": count,
                   "sum": sum, "avg": sum / count as f64, "min": min, "max": max})
        };
        // Groups in the order of their JSON text: "a", "b", null.
        assert_eq!(
            tick(&mut p, T0 + 10_000),
            vec![
                w(json!("a"), 2, 3.5, 1.0, 2.5),
                w(json!("b"), 1, 10.0, 10.0, 10.0),
                w(Value::Null, 1, 7.0, 7.0, 7.0),
            ]
        );
        assert_eq!(p.next_deadline(), None, "the pane is gone");
        assert!(tick(&mut p, T0 + 60_000).is_empty());
        // An event past the next window's end closes that window first.
        push(&mut p, json!({"svc": "a", "ms": 4}), T0 + 60_001);
        let out = push(&mut p, json!({"svc": "a", "ms": 6}), T0 + 70_000);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["window_start"], json!(T0 + 60_000));
        assert_eq!(out[0]["sum"], json!(4.0));
        // A clock stepping back does not reopen the closed window.
        push(&mut p, json!({"svc": "a", "ms": 100}), T0 + 65_000);
        let out = tick(&mut p, T0 + 80_000);
        assert_eq!(
            (out[0]["count"].clone(), out[0]["sum"].clone()),
            (json!(2), json!(106.0))
        );
    }

    #[test]
    fn sliding_time_window_merges_panes() {
        let mut p = pipeline(json!([{"type": "window", "kind": "sliding", "size": "3s",
            "slide": "1s", "field": "v", "aggregates": ["count", "sum"]}]));
        let mut out = push(&mut p, json!({"v": 1}), T0 + 500);
        assert_eq!(p.next_deadline(), Some(T0 + 1_000));
        // Pushes close what ended before them: the first window here.
        out.extend(push(&mut p, json!({"v": 2}), T0 + 1_500));
        assert_eq!(out.len(), 1);
        out.extend(push(&mut p, json!({"v": 4}), T0 + 2_500));
        assert_eq!(p.next_deadline(), Some(T0 + 3_000));
        out.extend(tick(&mut p, T0 + 100_000));
        let got: Vec<(u64, u64, u64, f64)> = out
            .iter()
            .map(|w| {
                (
                    w["window_start"].as_u64().expect("start"),
                    w["window_end"].as_u64().expect("end"),
                    w["count"].as_u64().expect("count"),
                    w["sum"].as_f64().expect("sum"),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (T0 - 2_000, T0 + 1_000, 1, 1.0),
                (T0 - 1_000, T0 + 2_000, 2, 3.0),
                (T0, T0 + 3_000, 3, 7.0),
                (T0 + 1_000, T0 + 4_000, 2, 6.0),
                (T0 + 2_000, T0 + 5_000, 1, 4.0),
            ]
        );
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn tumbling_and_sliding_count_windows() {
        let mut p = pipeline(
            json!([{"type": "window", "kind": "tumbling", "size_count": 3,
            "field": "v", "aggregates": ["sum", "count"]}]),
        );
        let mut got = Vec::new();
        for v in 1..=7 {
            got.extend(push(&mut p, json!({"v": v}), T0 + v));
        }
        assert_eq!(
            got,
            vec![
                json!({"window_start": T0 + 1, "window_end": T0 + 3, "group": null,
                       "count": 3, "sum": 6.0}),
                json!({"window_start": T0 + 4, "window_end": T0 + 6, "group": null,
                       "count": 3, "sum": 15.0}),
            ]
        );
        assert_eq!(p.next_deadline(), None, "count windows need no timer");

        let mut p = pipeline(
            json!([{"type": "window", "kind": "sliding", "size_count": 4,
            "slide_count": 2, "field": "v", "aggregates": ["sum", "min", "max"]}]),
        );
        let mut got = Vec::new();
        for v in 1..=9 {
            for w in push(&mut p, json!({"v": v}), T0 + v) {
                got.push((w["sum"].clone(), w["min"].clone(), w["max"].clone()));
            }
        }
        let want = [
            (3.0, 1.0, 2.0),
            (10.0, 1.0, 4.0),
            (18.0, 3.0, 6.0),
            (26.0, 5.0, 8.0),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(s, a, b)| (json!(s), json!(a), json!(b)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn count_windows_count_per_group() {
        let mut p = pipeline(
            json!([{"type": "window", "kind": "tumbling", "size_count": 2,
            "group_by": "g", "aggregates": ["count"]}]),
        );
        let mut got = Vec::new();
        for (i, g) in [
            json!("x"),
            json!(1),
            json!("x"),
            Value::Null,
            json!(1),
            Value::Null,
        ]
        .into_iter()
        .enumerate()
        {
            let ev = if g.is_null() {
                json!({})
            } else {
                json!({"g": g})
            };
            for w in push(&mut p, ev, T0 + i as u64) {
                got.push((
                    w["group"].clone(),
                    w["window_start"].clone(),
                    w["window_end"].clone(),
                ));
            }
        }
        assert_eq!(
            got,
            vec![
                (json!("x"), json!(T0), json!(T0 + 2)),
                (json!(1), json!(T0 + 1), json!(T0 + 4)),
                (Value::Null, json!(T0 + 3), json!(T0 + 5)),
            ]
        );
    }

    #[test]
    fn quantiles_are_within_the_sketch_accuracy() {
        let mut p = pipeline(json!([{"type": "window", "kind": "tumbling", "size": "1m",
            "field": "ms", "aggregates": ["p50", "p99", "min", "max"]}]));
        // 1..=1000 shuffled by a stride coprime with 1000.
        for i in 0..1000u64 {
            push(&mut p, json!({"ms": (i * 37) % 1000 + 1}), T0 + i);
        }
        let out = tick(&mut p, T0 + 60_000);
        let w = &out[0];
        // Exact: rank floor(q * 999) of 1..=1000.
        let close = |got: &Value, exact: f64| {
            let got = got.as_f64().expect("a number");
            assert!((got - exact).abs() <= 0.01 * exact, "{got} vs {exact}");
        };
        close(&w["p50"], 500.0);
        close(&w["p99"], 990.0);
        assert_eq!(
            (w["min"].clone(), w["max"].clone()),
            (json!(1.0), json!(1000.0))
        );
    }

    #[test]
    fn window_results_flow_into_later_processors() {
        let mut p = pipeline(json!([
            {"type": "json_parse"},
            {"type": "window", "kind": "tumbling", "size": "10s", "group_by": "svc",
             "field": "ms", "aggregates": ["p99", "count"]},
            {"type": "filter", "expr": "event.p99 > 250"},
            {"type": "transform", "set": {"alert": "'slow ' + event.group"}}
        ]));
        for i in 0..100u64 {
            let (mut out, mut dead) = (Vec::new(), Vec::new());
            let fast = format!(r#"{{"svc": "fast", "ms": {}}}"#, i % 50);
            let slow = format!(r#"{{"svc": "slow", "ms": {}}}"#, 200 + i * 3);
            p.push(Input::Text(fast), T0 + i, &mut out, &mut dead);
            p.push(Input::Text(slow), T0 + i, &mut out, &mut dead);
            assert!(out.is_empty() && dead.is_empty());
        }
        let out = tick(&mut p, T0 + 10_000);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["alert"], json!("slow slow"));
        assert_eq!(out[0]["count"], json!(100));
        assert_eq!(p.counters().filtered, 1);
    }

    #[test]
    fn windows_stay_within_their_group_bounds() {
        let mut p = pipeline(json!([{"type": "window", "kind": "tumbling", "size": "1s",
            "group_by": "id", "aggregates": ["count"]}]));
        for i in 0..super::MAX_GROUPS + 5 {
            push(&mut p, json!({"id": i}), T0);
        }
        assert_eq!(p.counters().window_overflow, 5);
        assert_eq!(tick(&mut p, T0 + 1_000).len(), super::MAX_GROUPS);

        // 1000 panes a group: room for MAX_CELLS / 1000 = 20 groups.
        let mut p = pipeline(
            json!([{"type": "window", "kind": "sliding", "size_count": 2000,
            "slide_count": 2, "group_by": "id", "aggregates": ["count"]}]),
        );
        for i in 0..21 {
            push(&mut p, json!({"id": i}), T0);
        }
        assert_eq!(p.counters().window_overflow, 1, "group 0 was evicted");
        push(&mut p, json!({"id": 1}), T0);
        assert_eq!(p.counters().window_overflow, 1, "group 1 is still there");
        push(&mut p, json!({"id": 0}), T0);
        assert_eq!(
            p.counters().window_overflow,
            2,
            "group 0 came back, evicting 2"
        );
        assert_eq!(push(&mut p, json!({"id": 0}), T0).len(), 1);
    }

    /// One event of a property test: time step, group (None: field absent),
    /// value (None: field absent).
    type Ev = (u64, Option<u8>, Option<f64>);

    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            (-100i64..100).prop_map(|i| i as f64),
            1e-3..1e4f64,
            -1e4..-1e-3f64,
        ]
    }

    fn events() -> impl Strategy<Value = Vec<Ev>> {
        prop::collection::vec(
            (
                0u64..15,
                prop::option::weighted(0.9, 0u8..3),
                prop::option::weighted(0.9, value()),
            ),
            0..80,
        )
    }

    fn event_json(g: Option<u8>, v: Option<f64>) -> Value {
        let mut o = serde_json::Map::new();
        if let Some(g) = g {
            o.insert("g".into(), json!(format!("g{g}")));
        }
        if let Some(v) = v {
            // Integral values as JSON integers, to aggregate both kinds.
            let j = if v.fract() == 0.0 && v.abs() < 1e6 {
                json!(v as i64)
            } else {
                json!(v)
            };
            o.insert("v".into(), j);
        }
        Value::Object(o)
    }

    fn group_json(g: Option<u8>) -> Value {
        g.map_or(Value::Null, |g| json!(format!("g{g}")))
    }

    /// Checks one emitted window against the values it should cover.
    fn check_window(w: &Value, mut vals: Vec<f64>) -> Result<(), TestCaseError> {
        prop_assert!(!vals.is_empty(), "an empty window was emitted: {w}");
        let n = vals.len();
        let sum: f64 = vals.iter().sum();
        let scale = vals.iter().map(|v| v.abs()).sum::<f64>().max(1.0);
        let near = |got: &Value, want: f64, tol: f64| {
            got.as_f64().is_some_and(|g| (g - want).abs() <= tol)
        };
        prop_assert_eq!(w["count"].as_u64(), Some(n as u64), "{}", w);
        prop_assert!(near(&w["sum"], sum, 1e-9 * scale), "sum {} vs {}", w, sum);
        prop_assert!(near(&w["avg"], sum / n as f64, 1e-9 * scale), "avg {}", w);
        vals.sort_by(f64::total_cmp);
        prop_assert!(near(&w["min"], vals[0], 0.0), "min {}", w);
        prop_assert!(near(&w["max"], vals[n - 1], 0.0), "max {}", w);
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            // The rank DDSketch reports: 0-based floor(q * (n - 1)).
            let exact = vals[(q * (n as f64 - 1.0)) as usize];
            prop_assert!(
                near(&w[name], exact, 0.01 * exact.abs() * (1.0 + 1e-9) + 1e-12),
                "{} {} vs exact {}",
                name,
                w,
                exact
            );
        }
        Ok(())
    }

    const ALL: [&str; 7] = ["count", "sum", "avg", "min", "max", "p50", "p99"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn time_windows_match_a_naive_recomputation(
            slide in 1u64..20,
            panes in 1u64..5,
            start in 0u64..100,
            evs in events(),
            ticks in prop::collection::vec(any::<bool>(), 80),
        ) {
            let size = slide * panes;
            let mut p = pipeline(json!([{"type": "window", "kind": "sliding",
                "size": format!("{size}ms"), "slide": format!("{slide}ms"),
                "group_by": "g", "field": "v", "aggregates": ALL}]));
            let mut out = Vec::new();
            let mut now = T0 + start;
            let mut timed = Vec::new();
            for (i, (dt, g, v)) in evs.iter().enumerate() {
                now += dt;
                if ticks[i] {
                    p.tick(now, &mut out, &mut Vec::new());
                }
                let mut dead = Vec::new();
                p.push(Input::Json(event_json(*g, *v)), now, &mut out, &mut dead);
                timed.push((now, *g, *v));
            }
            p.tick(now + size + slide, &mut out, &mut Vec::new());
            prop_assert_eq!(p.next_deadline(), None);

            let mut seen = std::collections::BTreeSet::new();
            for w in &out {
                let (ws, we) = (w["window_start"].as_u64(), w["window_end"].as_u64());
                let (Some(ws), Some(we)) = (ws, we) else {
                    return Err(TestCaseError::fail(format!("no bounds: {w}")));
                };
                prop_assert_eq!(we % slide, 0);
                prop_assert_eq!(we - ws, size);
                prop_assert!(seen.insert((we, w["group"].to_string())), "twice: {}", w);
                let vals = timed
                    .iter()
                    .filter(|(t, g, _)| (ws..we).contains(t) && group_json(*g) == w["group"])
                    .filter_map(|(_, _, v)| *v)
                    .collect();
                check_window(w, vals)?;
            }
            // Every window holding data was emitted.
            let mut want = std::collections::BTreeSet::new();
            for (t, g, v) in &timed {
                if v.is_some() {
                    let first_end = t - t % slide + slide;
                    for k in 0..panes {
                        want.insert((first_end + k * slide, group_json(*g).to_string()));
                    }
                }
            }
            prop_assert_eq!(seen, want);
            let skipped = timed.iter().filter(|(_, _, v)| v.is_none()).count() as u64;
            prop_assert_eq!(p.counters().window_skipped, skipped);
        }

        #[test]
        fn count_windows_match_a_naive_recomputation(
            slide in 1u64..5,
            panes in 1u64..4,
            evs in events(),
        ) {
            let size = slide * panes;
            let mut p = pipeline(json!([{"type": "window", "kind": "sliding",
                "size_count": size, "slide_count": slide,
                "group_by": "g", "field": "v", "aggregates": ALL}]));
            let mut now = T0;
            let mut per_group: std::collections::BTreeMap<Option<u8>, Vec<(u64, f64)>> =
                Default::default();
            for (dt, g, v) in &evs {
                now += dt;
                let mut out = Vec::new();
                let mut dead = Vec::new();
                p.push(Input::Json(event_json(*g, *v)), now, &mut out, &mut dead);
                let Some(v) = v else {
                    prop_assert!(out.is_empty());
                    continue;
                };
                let seen = per_group.entry(*g).or_default();
                seen.push((now, *v));
                if !(seen.len() as u64).is_multiple_of(slide) {
                    prop_assert!(out.is_empty());
                    continue;
                }
                prop_assert_eq!(out.len(), 1);
                let w = &out[0];
                let last = &seen[seen.len().saturating_sub(size as usize)..];
                prop_assert_eq!(&w["group"], &group_json(*g));
                prop_assert_eq!(w["window_start"].as_u64(), Some(last[0].0));
                prop_assert_eq!(w["window_end"].as_u64(), Some(now));
                check_window(w, last.iter().map(|(_, v)| *v).collect())?;
            }
        }
    }
}
