//! Typed decoding of `PUT /v1/agent/service/register` bodies, the hottest
//! request there is.
//!
//! Owns reading the body's JSON straight into the fields of a
//! `ServiceSpec`, without building a `serde_json::Value` tree first: the
//! tree allocated a string per key and per value plus map nodes, and was
//! most of what a registration cost its handler. The rules are the ones
//! `Fields` applies elsewhere: keys match case-insensitively and snake_case
//! equals CamelCase, JSON null counts as absent, a field sent twice (under
//! any spelling) is refused, unknown fields are ignored. Does not apply
//! defaults or decode checks and weights (rare, and shared with other
//! bodies): those stay `Value`s for the parent module.
//!
//! Invariant: every type error names the field (`service.Port ...`), so a
//! client learns what to fix.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::norm_into;
use crate::registry::{Meta, Str};

/// The register body's fields as sent, before defaults.
#[derive(Debug, Default)]
pub(super) struct Raw {
    pub name: Option<Str>,
    pub id: Option<Str>,
    pub tags: Option<Vec<Str>>,
    pub address: Option<Str>,
    pub port: Option<u16>,
    pub meta: Option<Meta>,
    pub weights: Option<Value>,
    pub check: Option<Value>,
    pub checks: Option<Value>,
}

/// The fields `Raw` keeps, by their canonical names; anything else is
/// ignored.
#[derive(Clone, Copy)]
enum Field {
    Name,
    Id,
    Tags,
    Address,
    Port,
    Meta,
    Weights,
    Check,
    Checks,
    Other,
}

impl Field {
    fn canonical(self) -> &'static str {
        match self {
            Field::Name => "Name",
            Field::Id => "ID",
            Field::Tags => "Tags",
            Field::Address => "Address",
            Field::Port => "Port",
            Field::Meta => "Meta",
            Field::Weights => "Weights",
            Field::Check => "Check",
            Field::Checks => "Checks",
            Field::Other => "",
        }
    }

    fn of(key: &str) -> Field {
        let mut buf = [0u8; 64];
        // A key too long or not ASCII is none of ours.
        match norm_into(key, &mut buf).unwrap_or("") {
            "name" => Field::Name,
            "id" => Field::Id,
            "tags" => Field::Tags,
            "address" => Field::Address,
            "port" => Field::Port,
            "meta" => Field::Meta,
            "weights" => Field::Weights,
            "check" => Field::Check,
            "checks" => Field::Checks,
            _ => Field::Other,
        }
    }
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(Field::of(v))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> de::Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RawVisitor)
    }
}

struct RawVisitor;

/// Stores `v` in `slot` unless the field was already sent.
fn once<T, E: de::Error>(
    slot: &mut Option<T>,
    seen: &mut bool,
    f: Field,
    v: Option<T>,
) -> Result<(), E> {
    if std::mem::replace(seen, true) {
        return Err(E::custom(format!(
            "service has the field {:?} more than once (keys match case-insensitively)",
            f.canonical()
        )));
    }
    *slot = v;
    Ok(())
}

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("service to be a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut raw = Raw::default();
        // One flag per field: null counts as absent but still as sent.
        let mut seen = [false; Field::Other as usize + 1];
        while let Some(f) = map.next_key::<Field>()? {
            let s = &mut seen[f as usize];
            match f {
                Field::Name => {
                    let v = map.next_value_seed(Text("Name"))?;
                    once(&mut raw.name, s, f, v)?;
                }
                Field::Id => {
                    let v = map.next_value_seed(Text("ID"))?;
                    once(&mut raw.id, s, f, v)?;
                }
                Field::Address => {
                    let v = map.next_value_seed(Text("Address"))?;
                    once(&mut raw.address, s, f, v)?;
                }
                Field::Tags => {
                    let v = map.next_value_seed(Texts("Tags"))?;
                    once(&mut raw.tags, s, f, v)?;
                }
                Field::Port => {
                    let v = map.next_value_seed(Port)?;
                    once(&mut raw.port, s, f, v)?;
                }
                Field::Meta => {
                    let v = map.next_value_seed(TextMap("Meta"))?;
                    once(&mut raw.meta, s, f, v)?;
                }
                Field::Weights | Field::Check | Field::Checks => {
                    let v: Value = map.next_value()?;
                    let slot = match f {
                        Field::Weights => &mut raw.weights,
                        Field::Check => &mut raw.check,
                        _ => &mut raw.checks,
                    };
                    // A null counts as absent, as everywhere else.
                    once(slot, s, f, Some(v).filter(|v| !v.is_null()))?;
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(raw)
    }
}

/// A string field (`Option`: null is absent), named for its errors.
struct Text(&'static str);

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Option<Str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Str>, D::Error> {
        d.deserialize_any(TextVisitor(self.0))
    }
}

struct TextVisitor(&'static str);

impl Visitor<'_> for TextVisitor {
    type Value = Option<Str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "service.{} to be a string", self.0)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Str::from(v)))
    }
}

/// One string of a list or map, named for its errors.
struct Elem(&'static str, &'static str);

impl<'de> DeserializeSeed<'de> for Elem {
    type Value = Str;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Str, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Elem {
    type Value = Str;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "service.{} to be {}", self.0, self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Str, E> {
        Ok(Str::from(v))
    }
}

/// A list of strings (`Tags`).
struct Texts(&'static str);

const LIST: &str = "a list of strings";
const MAP: &str = "an object of string values";

impl<'de> DeserializeSeed<'de> for Texts {
    type Value = Option<Vec<Str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Texts {
    type Value = Option<Vec<Str>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "service.{} to be {LIST}", self.0)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Bounded by the body limit; the hint is only a starting size.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(s) = seq.next_element_seed(Elem(self.0, LIST))? {
            out.push(s);
        }
        Ok(Some(out))
    }
}

/// An object of string values (`Meta`); keys are kept as sent.
struct TextMap(&'static str);

impl<'de> DeserializeSeed<'de> for TextMap {
    type Value = Option<Meta>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextMap {
    type Value = Option<Meta>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "service.{} to be {MAP}", self.0)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(k) = map.next_key_seed(Elem(self.0, MAP))? {
            let v = map.next_value_seed(Elem(self.0, MAP))?;
            pairs.push((k, v));
        }
        // Later pairs win, as in a JSON object read into a map.
        Ok(Some(pairs.into_iter().collect()))
    }
}

/// `Port`: an integer from 0 to 65535.
struct Port;

impl<'de> DeserializeSeed<'de> for Port {
    type Value = Option<u16>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for Port {
    type Value = Option<u16>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("service.Port to be an integer from 0 to 65535")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        u16::try_from(v)
            .map(Some)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u16::try_from(v)
            .map(Some)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Result<Raw, String> {
        serde_json::from_str::<Raw>(s).map_err(|e| e.to_string())
    }

    #[test]
    fn fields_decode_under_any_spelling_and_null_is_absent() {
        let r = raw(
            r#"{"NAME":"db","id":null,"tags":["a","b"],"Address":"10.0.0.1","port":5432,
               "META":{"b":"2","a":"1"},"weights":null,"Extra":{"x":[1,2]}}"#,
        )
        .expect("decodes");
        assert_eq!(r.name.as_deref(), Some("db"));
        assert_eq!(r.id, None);
        assert_eq!(r.tags, Some(vec![Str::from("a"), Str::from("b")]));
        assert_eq!(r.port, Some(5432));
        let meta = r.meta.expect("meta");
        assert_eq!(meta.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
        assert!(r.weights.is_none());
    }

    #[test]
    fn errors_name_the_field() {
        for (body, want) in [
            (r#"{"Port":"x"}"#, "service.Port"),
            (r#"{"Port":70000}"#, "service.Port"),
            (r#"{"Port":-1}"#, "service.Port"),
            (r#"{"Port":1.5}"#, "service.Port"),
            (r#"{"Name":5}"#, "service.Name"),
            (r#"{"Tags":"a"}"#, "service.Tags"),
            (r#"{"Tags":["a",1]}"#, "service.Tags"),
            (r#"{"Meta":{"k":1}}"#, "service.Meta"),
            (r#"[1]"#, "JSON object"),
            (r#"{"Name":"a","name":"b"}"#, "more than once"),
            (r#"{"Name":null,"name":"b"}"#, "more than once"),
        ] {
            let e = raw(body).expect_err(body);
            assert!(e.contains(want), "{body}: {e}");
        }
    }
}
