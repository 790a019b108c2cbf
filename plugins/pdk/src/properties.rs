//! An event's properties, parsed only as far as the plugin looks at them.
//!
//! Properties arrive as JSON object text. Most plugins touch one or two keys of a few dozen, so
//! parsing and re-serialising the whole object for every event would be most of their cost.
//! [`Properties`] keeps the text until it must do more: asking for a key the text plainly does
//! not contain, or adding one, works on the text; reading or removing a key that is there splits
//! the object into its top-level fields (their values stay unparsed text); only
//! [`Properties::as_map_mut`] builds the whole tree.

use std::collections::BTreeMap;

use serde::ser::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

#[derive(Clone, Debug)]
enum Field {
    Raw(Box<RawValue>),
    Value(Value),
}

impl Field {
    fn to_value(&self) -> Option<Value> {
        match self {
            Field::Raw(raw) => serde_json::from_str(raw.get()).ok(),
            Field::Value(value) => Some(value.clone()),
        }
    }

    fn into_value(self) -> Option<Value> {
        match self {
            Field::Raw(raw) => serde_json::from_str(raw.get()).ok(),
            Field::Value(value) => Some(value),
        }
    }
}

#[derive(Clone, Debug)]
enum Repr {
    /// The text as it arrived (or with keys spliced in).
    Text(String),
    /// Top-level fields, values as text until looked at.
    Fields(BTreeMap<String, Field>),
    Tree(Map<String, Value>),
}

/// An event's properties: a JSON object, parsed lazily.
#[derive(Clone, Debug)]
pub struct Properties {
    repr: Repr,
}

impl Default for Properties {
    fn default() -> Properties {
        Properties {
            repr: Repr::Tree(Map::new()),
        }
    }
}

impl PartialEq for Properties {
    fn eq(&self, other: &Properties) -> bool {
        self.to_map() == other.to_map()
    }
}

impl From<Map<String, Value>> for Properties {
    fn from(map: Map<String, Value>) -> Properties {
        Properties {
            repr: Repr::Tree(map),
        }
    }
}

/// An object's top-level fields borrowed from its text, in order: keys without escapes are
/// slices of the text, values are its raw JSON, so nothing is allocated per field.
struct Pairs<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Pairs<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Pairs<'de>, M::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<&'de str, &'de RawValue>()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// The text without the top-level field `key`, and that field's value; `None` if the text is
/// not an object of plain (unescaped) keys.
fn without_field(text: &str, key: &str) -> Option<(String, Option<Value>)> {
    let Pairs(pairs) = serde_json::from_str(text).ok()?;
    let mut out = String::with_capacity(text.len());
    out.push('{');
    let mut removed = None;
    for (k, v) in pairs {
        if k == key {
            removed = serde_json::from_str(v.get()).ok();
            continue;
        }
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&quoted(k));
        out.push(':');
        out.push_str(v.get());
    }
    out.push('}');
    Some((out, removed))
}

/// The value of top-level field `key` of an object of plain keys; `None` if the text is not one.
fn field_of(text: &str, key: &str) -> Option<Option<Value>> {
    let Pairs(pairs) = serde_json::from_str(text).ok()?;
    Some(
        pairs
            .into_iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| serde_json::from_str(v.get()).ok()),
    )
}

/// The key as it appears in JSON text written without needless escapes.
fn quoted(key: &str) -> String {
    serde_json::to_string(key).unwrap_or_default()
}

impl Properties {
    /// Properties from JSON object text (anything else reads as an empty object).
    pub fn from_json_text(text: String) -> Properties {
        Properties {
            repr: Repr::Text(text),
        }
    }

    /// True when the text certainly has no key `key` at any depth: the quoted key is nowhere in
    /// it and nothing in it is escaped (an escape could spell the key differently).
    fn plainly_absent(text: &str, key: &str) -> bool {
        !text.contains('\\') && !text.contains(&quoted(key))
    }

    fn fields(&mut self) -> Option<&mut BTreeMap<String, Field>> {
        if let Repr::Text(text) = &self.repr {
            let fields: BTreeMap<String, Box<RawValue>> =
                serde_json::from_str(text).unwrap_or_default();
            self.repr = Repr::Fields(
                fields
                    .into_iter()
                    .map(|(k, v)| (k, Field::Raw(v)))
                    .collect(),
            );
        }
        match &mut self.repr {
            Repr::Fields(fields) => Some(fields),
            _ => None,
        }
    }

    /// The value of top-level key `key`.
    pub fn get(&mut self, key: &str) -> Option<Value> {
        if let Repr::Text(text) = &self.repr {
            if Self::plainly_absent(text, key) {
                return None;
            }
            if !text.contains('\\') {
                if let Some(found) = field_of(text, key) {
                    return found;
                }
            }
        }
        if let Repr::Tree(map) = &self.repr {
            return map.get(key).cloned();
        }
        self.fields()?.get(key).and_then(Field::to_value)
    }

    /// The value of `key` if it is a string.
    pub fn get_str(&mut self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn contains_key(&mut self, key: &str) -> bool {
        if let Repr::Text(text) = &self.repr {
            if Self::plainly_absent(text, key) {
                return false;
            }
        }
        if let Repr::Text(text) = &self.repr {
            if !text.contains('\\') {
                if let Ok(Pairs(pairs)) = serde_json::from_str::<Pairs>(text) {
                    return pairs.iter().any(|(k, _)| *k == key);
                }
            }
        }
        match &mut self.repr {
            Repr::Tree(map) => map.contains_key(key),
            _ => self.fields().is_some_and(|f| f.contains_key(key)),
        }
    }

    /// Sets top-level key `key`; returns the value it replaced.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Option<Value> {
        let (key, value) = (key.into(), value.into());
        if let Repr::Text(text) = &mut self.repr {
            let body = text.trim_start();
            if body.starts_with('{') && Self::plainly_absent(body, &key) {
                let rest = body[1..].trim_start();
                let mut spliced = String::with_capacity(text.len() + key.len() + 32);
                spliced.push('{');
                spliced.push_str(&quoted(&key));
                spliced.push(':');
                spliced.push_str(&value.to_string());
                if !rest.starts_with('}') {
                    spliced.push(',');
                }
                spliced.push_str(rest);
                *text = spliced;
                return None;
            }
        }
        if let Repr::Tree(map) = &mut self.repr {
            return map.insert(key, value);
        }
        self.fields()?
            .insert(key, Field::Value(value))
            .and_then(Field::into_value)
    }

    /// Removes top-level key `key`; returns its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        if let Repr::Text(text) = &mut self.repr {
            if Self::plainly_absent(text, key) {
                return None;
            }
            if !text.contains('\\') {
                if let Some((rest, removed)) = without_field(text, key) {
                    *text = rest;
                    return removed;
                }
            }
        }
        if let Repr::Tree(map) = &mut self.repr {
            return map.remove(key);
        }
        self.fields()?.remove(key).and_then(Field::into_value)
    }

    /// The whole object, parsed, to change in any way (nested keys included).
    pub fn as_map_mut(&mut self) -> &mut Map<String, Value> {
        if !matches!(self.repr, Repr::Tree(_)) {
            self.repr = Repr::Tree(self.to_map());
        }
        match &mut self.repr {
            Repr::Tree(map) => map,
            _ => unreachable!("converted to a tree just above"),
        }
    }

    /// A parsed copy of the whole object.
    pub fn to_map(&self) -> Map<String, Value> {
        match &self.repr {
            Repr::Text(text) => match serde_json::from_str(text) {
                Ok(Value::Object(map)) => map,
                _ => Map::new(),
            },
            Repr::Fields(fields) => fields
                .iter()
                .filter_map(|(k, f)| f.to_value().map(|v| (k.clone(), v)))
                .collect(),
            Repr::Tree(map) => map.clone(),
        }
    }

    /// The object as JSON text: the text it arrived as when nothing needed re-writing.
    pub fn into_json_text(self) -> String {
        match self.repr {
            Repr::Text(text) => text,
            Repr::Fields(fields) => {
                let mut out = String::from("{");
                for (n, (key, field)) in fields.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push_str(&quoted(key));
                    out.push(':');
                    match field {
                        Field::Raw(raw) => out.push_str(raw.get()),
                        Field::Value(value) => out.push_str(&value.to_string()),
                    }
                }
                out.push('}');
                out
            }
            Repr::Tree(map) => Value::Object(map).to_string(),
        }
    }
}

impl Serialize for Properties {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self.clone().into_json_text();
        match RawValue::from_string(text) {
            Ok(raw) => raw.serialize(serializer),
            Err(_) => Map::new().serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> Properties {
        Properties::from_json_text(v.to_string())
    }

    #[test]
    fn untouched_properties_keep_their_text() {
        let text = r#"{"b":1,"a":{"x":[1,2]}}"#.to_owned();
        let mut p = Properties::from_json_text(text.clone());
        assert_eq!(p.get("missing"), None);
        assert_eq!(p.remove("missing"), None);
        assert!(!p.contains_key("missing"));
        assert_eq!(p.into_json_text(), text);
    }

    #[test]
    fn every_change_reads_back_as_the_same_object_a_full_parse_gives() {
        let base = json!({"chain": "A", "$set": {"email": "a@b.c"}, "n": 1, "s": "chain"});
        let mut p = props(base.clone());
        assert_eq!(p.insert("new", true), None);
        assert_eq!(p.get("chain"), Some(json!("A")));
        assert_eq!(p.remove("chain"), Some(json!("A")));
        assert_eq!(p.insert("n", 2), Some(json!(1)));
        p.as_map_mut()["$set"]
            .as_object_mut()
            .unwrap()
            .remove("email");
        let mut want = base.as_object().unwrap().clone();
        want.insert("new".into(), json!(true));
        want.remove("chain");
        want.insert("n".into(), json!(2));
        want["$set"] = json!({});
        let text = p.into_json_text();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            Value::Object(want)
        );
    }

    #[test]
    fn a_spliced_key_is_valid_json_even_in_an_empty_object_and_escapes_force_a_parse() {
        let mut p = Properties::from_json_text(" { } ".into());
        p.insert("k", "v\"q");
        let text = p.into_json_text();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"k": "v\"q"})
        );

        // "\u0063hain" is "chain" spelled with an escape: it must be found.
        let mut p = Properties::from_json_text(r#"{"\u0063hain":"A"}"#.into());
        assert_eq!(p.remove("chain"), Some(json!("A")));
        assert_eq!(
            serde_json::from_str::<Value>(&p.into_json_text()).unwrap(),
            json!({})
        );
    }
}
