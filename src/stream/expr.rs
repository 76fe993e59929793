//! CEL expressions of stream processors: compiling them once, evaluating
//! them against one event, and converting between JSON and CEL values.
//!
//! Owns the expression environment (the CEL standard library plus the
//! `strings` and `math` extensions) and both value conversions. Does not
//! decide what a result means (keep, drop, set a field): `pipeline` does.
//!
//! Invariants:
//! - The event is bound as the only variable, `event`.
//! - JSON integers become CEL `int` (or `uint` above `i64::MAX`), other JSON
//!   numbers `double`. CEL compares `int`, `uint` and `double` with each
//!   other (`event.latency_ms > 100` holds for `150` and for `150.5`), but
//!   its arithmetic does not mix them: `double(event.ms) * 1.5`.
//! - A result converts back to JSON only if it is null, bool, int, uint, a
//!   finite double, string, list or map (keys int, uint, bool or string,
//!   written as strings); anything else (bytes, NaN, a type, a function) is
//!   an evaluation error, never a silent `null`.
//!
//! Concurrency: none. An `Expr` is immutable and `Send + Sync`; each
//! evaluation builds its own short-lived CEL context.

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::{Key, Map};
use cel::{Context, Env, Program, Value};

/// The CEL environment every expression of a pipeline compiles and runs in.
#[derive(Clone)]
pub struct Cel {
    env: Arc<Env>,
}

impl Cel {
    pub fn new() -> Result<Cel, String> {
        let mut env = Env::stdlib();
        env.add_extension(cel::extensions::strings)
            .and_then(|()| env.add_extension(cel::extensions::math))
            .map_err(|e| format!("cannot build the CEL environment: {e}"))?;
        Ok(Cel { env: Arc::new(env) })
    }

    /// Parses `source`; the error is CEL's, with line, column and a caret.
    pub fn compile(&self, source: &str) -> Result<Expr, String> {
        let program = self.env.compile(source).map_err(|e| e.to_string())?;
        Ok(Expr { program })
    }

    /// Evaluates `expr` with `event` bound; a failure is a readable message.
    pub fn eval(&self, expr: &Expr, event: &Value) -> Result<Value, String> {
        let mut ctx = Context::with_env(Arc::clone(&self.env));
        // A clone of a CEL value is a reference-count bump for maps, lists
        // and strings, so binding it per evaluation copies no event data.
        ctx.add_variable_from_value("event", event.clone());
        expr.program.execute(&ctx).map_err(|e| e.to_string())
    }
}

/// One compiled expression.
pub struct Expr {
    program: Program,
}

/// The CEL view of a JSON value.
pub fn to_cel(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                // serde_json numbers are finite, so this is a real double.
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(a) => Value::List(Arc::new(a.iter().map(to_cel).collect())),
        serde_json::Value::Object(o) => {
            let map: HashMap<Key, Value> = o
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v)))
                .collect();
            Value::Map(Map { map: Arc::new(map) })
        }
    }
}

/// The JSON form of a CEL result, or why it has none.
pub fn to_json(v: &Value) -> Result<serde_json::Value, String> {
    Ok(match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => (*i).into(),
        Value::UInt(u) => (*u).into(),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("{f} is not a JSON number"))?,
        Value::String(s) => serde_json::Value::String(s.to_string()),
        Value::List(l) => {
            serde_json::Value::Array(l.iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Value::Map(m) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in m.map.iter() {
                obj.insert(k.to_string(), to_json(v)?);
            }
            serde_json::Value::Object(obj)
        }
        other => return Err(format!("a {} has no JSON form", other.type_of())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(src: &str, event: serde_json::Value) -> Result<serde_json::Value, String> {
        let cel = Cel::new().expect("env");
        let expr = cel.compile(src).expect("compiles");
        to_json(&cel.eval(&expr, &to_cel(&event))?)
    }

    #[test]
    fn numbers_compare_across_int_uint_and_double() {
        let e = "event.level == 'error' && event.latency_ms > 100";
        assert_eq!(
            eval(e, json!({"level": "error", "latency_ms": 150})),
            Ok(json!(true))
        );
        assert_eq!(
            eval(e, json!({"level": "error", "latency_ms": 150.5})),
            Ok(json!(true))
        );
        assert_eq!(
            eval(e, json!({"level": "error", "latency_ms": 99.5})),
            Ok(json!(false))
        );
        assert_eq!(
            eval(e, json!({"level": "info", "latency_ms": 150})),
            Ok(json!(false))
        );
        assert_eq!(eval("event.n > 1.5", json!({"n": 2})), Ok(json!(true)));
        assert_eq!(eval("event.n == 2.0", json!({"n": 2})), Ok(json!(true)));
        assert_eq!(eval("event.n > 1", json!({"n": u64::MAX})), Ok(json!(true)));
        assert_eq!(eval("event.n < 0", json!({"n": -3})), Ok(json!(true)));
    }

    #[test]
    fn results_convert_back_to_json() {
        let ev = json!({"a": 2, "s": "Hi", "l": [1, 2.5, null, true]});
        assert_eq!(eval("event.a * 3", ev.clone()), Ok(json!(6)));
        assert_eq!(eval("double(event.a) / 4.0", ev.clone()), Ok(json!(0.5)));
        assert_eq!(eval("event.s.lowerAscii()", ev.clone()), Ok(json!("hi")));
        assert_eq!(eval("event.l", ev.clone()), Ok(json!([1, 2.5, null, true])));
        assert_eq!(
            eval("{'k': [event.a, 1u]}", ev.clone()),
            Ok(json!({"k": [2, 1]}))
        );
        assert_eq!(eval("{1: 'x'}", ev.clone()), Ok(json!({"1": "x"})));
        assert_eq!(eval("math.greatest(event.a, 7)", ev.clone()), Ok(json!(7)));
        assert_eq!(eval("event.s.matches('^H')", ev.clone()), Ok(json!(true)));
        assert!(eval("b'x'", ev.clone()).is_err(), "bytes have no JSON form");
        assert!(
            eval("0.0 / 0.0", ev.clone()).is_err(),
            "NaN has no JSON form"
        );
        assert!(eval("event.missing", ev.clone()).is_err());
        assert!(
            eval("event.a + 1.5", ev).is_err(),
            "CEL does not mix int and double"
        );
    }

    #[test]
    fn parse_errors_say_where() {
        let cel = Cel::new().expect("env");
        let err = cel.compile("event.a >").err().expect("refused");
        assert!(err.contains("1:"), "{err}");
    }

    #[test]
    fn compiled_expressions_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Expr>();
        send_sync::<Cel>();
    }
}
