//! `Meta`: a service's string key/value metadata, stored compactly.
//!
//! Owns the in-memory shape and the serde form of `Meta` fields. Does not
//! validate keys or values (`validate.rs`).
//!
//! Why not a `BTreeMap`: a map with even one entry allocates a whole B-tree
//! leaf (about half a KiB for `String` pairs), which made metadata the
//! largest part of an instance in memory. A sorted `Vec` of pairs holds the
//! same data in what it needs. Invariant: keys are unique and sorted, so
//! lookups are binary searches and the JSON form (an object) is the same
//! as a `BTreeMap`'s.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Str;

/// Sorted, unique string pairs; serialized as a JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta(Vec<(Str, Str)>);

impl Meta {
    pub fn new() -> Self {
        Meta(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    /// Sets `key` to `value`, replacing an earlier value.
    pub fn insert(&mut self, key: impl Into<Str>, value: impl Into<Str>) {
        let (key, value) = (key.into(), value.into());
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    /// Pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<K: Into<Str>, V: Into<Str>> FromIterator<(K, V)> for Meta {
    /// Later pairs win over earlier ones with the same key, as in a map.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut pairs: Vec<(Str, Str)> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // Stable sort keeps input order among equal keys; keep the last.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Str, Str)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = v,
                _ => out.push((k, v)),
            }
        }
        out.shrink_to_fit();
        Meta(out)
    }
}

impl Serialize for Meta {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = Meta;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Meta, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = map.next_entry::<Str, Str>()? {
                    pairs.push(pair);
                }
                Ok(pairs.into_iter().collect())
            }
        }
        d.deserialize_map(PairsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_unique_last_wins_and_json_is_an_object() {
        let m: Meta = [("b", "1"), ("a", "2"), ("b", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("b"), Some("3"));
        assert_eq!(m.get("a"), Some("2"));
        assert_eq!(m.get("c"), None);
        let json = serde_json::to_string(&m).expect("encodes");
        assert_eq!(json, r#"{"a":"2","b":"3"}"#);
        let back: Meta = serde_json::from_str(r#"{"b":"3","a":"2"}"#).expect("decodes");
        assert_eq!(back, m);
        assert!(serde_json::from_str::<Meta>(r#"{"a":1}"#).is_err());
    }

    #[test]
    fn insert_keeps_order_and_replaces() {
        let mut m = Meta::new();
        m.insert("z", "1");
        m.insert("a", "2");
        m.insert("z", "3");
        let keys: Vec<&str> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "z"]);
        assert_eq!(m.get("z"), Some("3"));
    }
}
