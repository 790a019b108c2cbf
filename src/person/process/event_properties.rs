//! An event's properties as the person step sees them: only the keys PostHog's person and group
//! rules read are parsed ([`EventProperties::read`]); every other value stays the text it came as. What the step
//! changed is brought back into that text by [`Edit::apply`]: new keys are appended, and a key
//! that changed or went is rewritten in place while every other value is copied as it was.
//!
//! Parsing only what the rules read is the point: a posthog-js event has dozens of properties
//! the rules never look at, and building (then writing again) a tree of all of them cost more
//! than the rules themselves.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::person::rules::EVENT_TO_PERSON_PROPERTIES;

/// Whether the person step reads (and may change) `key` of an event's properties.
pub(super) fn is_read_key(key: &str) -> bool {
    matches!(
        key,
        "$process_person_profile"
            | "$set"
            | "$set_once"
            | "$unset"
            | "$anon_distinct_id"
            | "alias"
            | "$is_server"
            | "$groups"
            | "$group_type"
            | "$group_key"
            | "$group_set"
            | "$group_0"
            | "$group_1"
            | "$group_2"
            | "$group_3"
            | "$group_4"
    ) || EVENT_TO_PERSON_PROPERTIES.contains(&key)
}

/// An event's properties text, read once: every entry with its value unparsed, and the keys
/// [`is_read_key`] names parsed.
pub(super) struct EventProperties<'t> {
    /// Every entry in the order it came; `None` if the text is not a JSON object.
    entries: Option<Vec<(Key<'t>, &'t RawValue)>>,
}

impl<'t> EventProperties<'t> {
    /// Reads `text`; the map holds the read keys (of a key given twice, the last value counts,
    /// as in a parsed tree), empty if the text is not a JSON object.
    pub(super) fn read(text: &'t str) -> (EventProperties<'t>, Map<String, Value>) {
        let mut de = serde_json::Deserializer::from_str(text);
        let entries = RawEntries
            .deserialize(&mut de)
            .ok()
            .filter(|_| de.end().is_ok());
        let mut read = Map::new();
        for (Key(key), raw) in entries.iter().flatten() {
            if is_read_key(key) {
                // The text was read as JSON already, so its values parse.
                let value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                read.insert(key.as_ref().to_owned(), value);
            }
        }
        (EventProperties { entries }, read)
    }
}

/// A map key, borrowed from the text unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Every entry of an object's text, in order, values unparsed.
struct RawEntries;

impl<'de> DeserializeSeed<'de> for RawEntries {
    type Value = Vec<(Key<'de>, &'de RawValue)>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RawEntries {
    type Value = Vec<(Key<'de>, &'de RawValue)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a properties object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            entries.push((key, map.next_value::<&'de RawValue>()?));
        }
        Ok(entries)
    }
}

/// Which of an event's properties the step changed, and whether only by adding keys.
pub(super) struct Edit {
    /// A key that was in the text changed or went: the text is copied with those keys
    /// written again; otherwise the changed keys are only appended.
    replaced: bool,
    /// Every key added, changed or removed.
    touched: Vec<String>,
}

impl Edit {
    /// No change yet.
    pub(super) fn new() -> Edit {
        Edit {
            replaced: false,
            touched: Vec::new(),
        }
    }

    /// Removes `key` from `read`, recording it if it was there.
    pub(super) fn remove(&mut self, read: &mut Map<String, Value>, key: &str) {
        if read.remove(key).is_some() {
            self.wrote(key, true);
        }
    }

    /// Records that `key` was written (or removed); `was_there` if the text had it before.
    pub(super) fn wrote(&mut self, key: &str, was_there: bool) {
        self.replaced |= was_there;
        if !self.touched.iter().any(|k| k == key) {
            self.touched.push(key.to_owned());
        }
    }

    /// The text of `properties` (as they came in `text`) in line with `read`, the read keys
    /// as the step left them; `None` if the text stays as it is.
    pub(super) fn apply(
        &self,
        text: &str,
        properties: &EventProperties<'_>,
        read: &Map<String, Value>,
    ) -> Option<String> {
        let Some(entries) = &properties.entries else {
            // Not an object: what is left is the read keys.
            return Some(into_text(
                serde_json::to_vec(read).unwrap_or_else(|_| b"{}".to_vec()),
            ));
        };
        if self.touched.is_empty() {
            return None;
        }
        if !self.replaced {
            if let Some(appended) = append(text, self.touched.iter().map(String::as_str), read) {
                return Some(appended);
            }
        }
        Some(self.rewrite(text.len(), entries, read))
    }

    /// The entries with each touched key as `read` has it (gone if `read` lacks it) where it
    /// first was, every other key copied as it came, in the order it came; touched keys that
    /// are new at the end.
    fn rewrite(
        &self,
        size: usize,
        entries: &[(Key<'_>, &RawValue)],
        read: &Map<String, Value>,
    ) -> String {
        let mut written: Vec<&str> = Vec::with_capacity(self.touched.len());
        let mut out = Vec::with_capacity(size + 256);
        out.push(b'{');
        let mut first = true;
        for (Key(key), raw) in entries {
            match self.touched.iter().find(|t| t.as_str() == key.as_ref()) {
                None => {
                    push_key(&mut out, &mut first, key);
                    out.extend_from_slice(raw.get().as_bytes());
                }
                // A touched key given twice is written once, with the value the step left.
                Some(touched) if written.contains(&touched.as_str()) => {}
                Some(touched) => {
                    written.push(touched);
                    if let Some(value) = read.get(touched) {
                        push_entry(&mut out, &mut first, touched, value);
                    }
                }
            }
        }
        for key in &self.touched {
            if let (false, Some(value)) = (written.contains(&key.as_str()), read.get(key)) {
                push_entry(&mut out, &mut first, key, value);
            }
        }
        out.push(b'}');
        into_text(out)
    }
}

/// `text` with `keys` (their values in `read`) appended, or `None` if `text` does not end as
/// an object does.
fn append<'k>(
    text: &str,
    keys: impl Iterator<Item = &'k str>,
    read: &Map<String, Value>,
) -> Option<String> {
    let open = text.trim_end().strip_suffix('}')?.trim_end();
    let mut out = Vec::with_capacity(text.len() + 256);
    out.extend_from_slice(open.as_bytes());
    let mut first = out.ends_with(b"{");
    for (key, value) in keys.filter_map(|k| read.get_key_value(k)) {
        push_entry(&mut out, &mut first, key, value);
    }
    out.push(b'}');
    Some(into_text(out))
}

/// Writes `key` and its colon, after a comma unless it is the `first` entry.
fn push_key(out: &mut Vec<u8>, first: &mut bool, key: &str) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    // Writing JSON into memory cannot fail.
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
}

fn push_entry(out: &mut Vec<u8>, first: &mut bool, key: &str, value: &Value) {
    push_key(out, first, key);
    let _ = serde_json::to_writer(&mut *out, value);
}

/// The text built: UTF-8, as it is made only of text and of what serde_json writes.
fn into_text(out: Vec<u8>) -> String {
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(text: &str) -> Option<Map<String, Value>> {
        let (properties, read) = EventProperties::read(text);
        properties.entries.is_some().then_some(read)
    }

    #[test]
    fn only_the_keys_the_rules_read_are_parsed() {
        let text =
            r#"{"$browser":"Firefox","n":{"deep":[1,2]},"$set":{"a":1},"x\"y":2,"$set":{"a":2}}"#;
        let read = read(text).unwrap();
        assert_eq!(
            Value::Object(read),
            json!({"$browser": "Firefox", "$set": {"a": 2}})
        );
        assert!(super::tests::read("[1]").is_none());
        assert!(super::tests::read("{\"a\":").is_none());
        assert!(super::tests::read("{} {}").is_none());
        for key in EVENT_TO_PERSON_PROPERTIES {
            assert!(is_read_key(key), "{key}");
        }
    }

    #[test]
    fn a_rewrite_changes_the_touched_keys_and_copies_the_rest() {
        let text = r#"{"n": 1.50, "$process_person_profile": true, "$set": {"a": 1}, "$os": 1.50, "u": "\u00e9", "k\u00e9": 0, "n": 2, "$set": {"a": 3}}"#;
        let (properties, mut read) = EventProperties::read(text);
        let mut edit = Edit::new();
        edit.remove(&mut read, "$process_person_profile");
        read.insert("$set".into(), json!({"a": 3, "$os": 1.5}));
        edit.wrote("$set", true);
        read.insert("$set_once".into(), json!({"$initial_os": 1.5}));
        edit.wrote("$set_once", false);
        let out = edit.apply(text, &properties, &read).unwrap();
        // Values the step did not change are copied byte for byte (`1.50`, `\u00e9`, both
        // `n`s); a touched key given twice is written once.
        assert_eq!(
            out,
            r#"{"n":1.50,"$set":{"$os":1.5,"a":3},"$os":1.50,"u":"\u00e9","ké":0,"n":2,"$set_once":{"$initial_os":1.5}}"#
        );
        let parsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["n"], json!(2));
        assert_eq!(Edit::new().apply(text, &properties, &read), None);
    }

    #[test]
    fn new_keys_are_appended_and_unreadable_text_is_replaced() {
        let mut read = Map::new();
        read.insert("$group_0".into(), json!("acme"));
        for (text, expected) in [
            (r#"{"a": 1} "#, r#"{"a": 1,"$group_0":"acme"}"#),
            ("{}", r#"{"$group_0":"acme"}"#),
        ] {
            let mut edit = Edit::new();
            edit.wrote("$group_0", false);
            let (properties, _) = EventProperties::read(text);
            assert_eq!(edit.apply(text, &properties, &read).unwrap(), expected);
        }
        let (unreadable, _) = EventProperties::read("[1, 2]");
        assert_eq!(
            Edit::new().apply("[1, 2]", &unreadable, &read).unwrap(),
            r#"{"$group_0":"acme"}"#
        );
    }
}
