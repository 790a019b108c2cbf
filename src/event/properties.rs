//! An event's properties as a step that reads only a few of them sees them: the keys the step
//! names are parsed ([`EventProperties::read`]); every other value stays the text it came as.
//! What the step changed is brought back into that text by [`Edit::apply`]: new keys are
//! appended, and a key that changed or went is rewritten in place while every other value is
//! copied as it was.
//!
//! Parsing only what is read is the point: a posthog-js event has dozens of properties that
//! capture's normalisation and the person rules never look at, and building (then writing
//! again) a tree of all of them cost more than the rules themselves. Both steps use it, each
//! with its own list of keys.
//!
//! Of a key given twice, the last value counts (as in a parsed tree, and as PostHog's capture
//! keeps it). Text from outside (an object met in a client's event, or given to
//! [`with_each_key_once`]) is checked for repeated keys and, if it has one, written again with
//! each key once, where it first stood, with its last value; text the appliance wrote has none,
//! and is not checked again.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

use foldhash::fast::RandomState;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// An event's properties text, read once: every entry with its value unparsed, and the keys the
/// reader names parsed.
pub struct EventProperties<'t> {
    /// The text they were read from, if they were read on their own (not met inside an event).
    text: Option<&'t str>,
    /// Every entry in the order it came; `None` if the text is not a JSON object.
    entries: Option<Vec<(Key<'t>, &'t RawValue)>>,
    /// Some key is given more than once.
    repeated: bool,
}

impl<'t> EventProperties<'t> {
    /// Reads `text`, properties the appliance wrote (no key in them is repeated); the map holds
    /// the keys `is_read` names, empty if the text is not a JSON object.
    pub fn read(
        text: &'t str,
        is_read: impl Fn(&str) -> bool,
    ) -> (EventProperties<'t>, Map<String, Value>) {
        EventProperties::of_entries(Some(text), entries_of(text), is_read, false)
    }

    /// The properties of entries met while parsing a larger text (an event from a client); of a
    /// key given twice, the last value counts, here and when they are written again.
    pub fn of_object(
        object: RawObject<'t>,
        is_read: impl Fn(&str) -> bool,
    ) -> (EventProperties<'t>, Map<String, Value>) {
        EventProperties::of_entries(None, Some(object.0), is_read, true)
    }

    /// `check_repeats`: look for a repeated key (text from a client may have one; text the
    /// appliance wrote never does).
    fn of_entries(
        text: Option<&'t str>,
        entries: Option<Vec<(Key<'t>, &'t RawValue)>>,
        is_read: impl Fn(&str) -> bool,
        check_repeats: bool,
    ) -> (EventProperties<'t>, Map<String, Value>) {
        let mut read = Map::new();
        for (Key(key), raw) in entries.iter().flatten() {
            if is_read(key) {
                // The text was read as JSON already, so its values parse.
                let value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                read.insert(key.as_ref().to_owned(), value);
            }
        }
        let repeated = check_repeats && entries.as_deref().is_some_and(has_repeated_key);
        let properties = EventProperties {
            text,
            entries,
            repeated,
        };
        (properties, read)
    }

    /// The text they were read from, if they were read on their own.
    pub fn text(&self) -> Option<&'t str> {
        self.text
    }

    /// The keys `wanted` names, in key order, each with the text of its value as it came (so
    /// it can be copied into other JSON instead of being written again). Empty if some key is
    /// repeated; a key written with escapes is left out.
    pub fn raw_values(&self, wanted: impl Fn(&str) -> bool) -> Vec<(&'t str, &'t RawValue)> {
        if self.repeated {
            return Vec::new();
        }
        let mut raw: Vec<(&'t str, &'t RawValue)> = self
            .entries
            .iter()
            .flatten()
            .filter_map(|(key, value)| match key.0 {
                Cow::Borrowed(name) if wanted(name) => Some((name, *value)),
                _ => None,
            })
            .collect();
        raw.sort_unstable_by_key(|(name, _)| *name);
        raw
    }
}

/// Text from outside that is not a JSON object.
#[derive(Debug, PartialEq)]
pub struct NotAnObject;

/// Checks that `text` is a JSON object; if some key in it is repeated, the text with each key
/// once, with its last value, where it first stood (`None`: the text is fine as it is).
pub fn with_each_key_once(text: &str) -> Result<Option<String>, NotAnObject> {
    let entries = entries_of(text).ok_or(NotAnObject)?;
    let (properties, read) =
        EventProperties::of_entries(Some(text), Some(entries), |_| false, true);
    Ok(if properties.repeated {
        Edit::new().apply(&properties, &read)
    } else {
        None
    })
}

/// The entries of `text` if all of it is one JSON object.
fn entries_of(text: &str) -> Option<Vec<(Key<'_>, &RawValue)>> {
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = RawEntries.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(entries)
}

/// A JSON object's entries, values unparsed: deserialize it where an object is expected inside
/// a larger text, then read it with [`EventProperties::of_object`].
pub struct RawObject<'t>(Vec<(Key<'t>, &'t RawValue)>);

impl RawObject<'_> {
    /// An object without entries.
    pub fn empty() -> Self {
        RawObject(Vec::new())
    }
}

impl<'de> de::Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawEntries.deserialize(d).map(RawObject)
    }
}

fn has_repeated_key(entries: &[(Key<'_>, &RawValue)]) -> bool {
    if entries.len() < 2 {
        return false;
    }
    let mut keys: HashSet<&str, RandomState> =
        HashSet::with_capacity_and_hasher(entries.len(), RandomState::default());
    !entries.iter().all(|(Key(key), _)| keys.insert(key))
}

/// A map key, borrowed from the text unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl Key<'_> {
    /// Whether the key can be written between quotes as it is: serde_json lends a key only
    /// when it has no escape, and refuses control characters in text.
    fn as_is(&self) -> bool {
        matches!(self.0, Cow::Borrowed(_))
    }
}

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

/// Which of an event's properties a step changed, and whether only by adding keys.
pub struct Edit {
    /// A key that was in the text changed or went: the text is copied with those keys
    /// written again; otherwise the changed keys are only appended.
    replaced: bool,
    /// Every key added, changed or removed.
    touched: Vec<String>,
    /// Touched keys whose new value's text the step wrote itself ([`Edit::wrote_text`]).
    texts: Vec<(String, String)>,
}

impl Default for Edit {
    fn default() -> Edit {
        Edit::new()
    }
}

impl Edit {
    /// No change yet.
    pub fn new() -> Edit {
        Edit {
            replaced: false,
            touched: Vec::new(),
            texts: Vec::new(),
        }
    }

    /// Sets `key` in `read` to `value`, recording it. `key` must be one the reader parses, so
    /// that `read` knows whether the text had it.
    pub fn set(&mut self, read: &mut Map<String, Value>, key: &str, value: Value) {
        let was_there = read.insert(key.to_owned(), value).is_some();
        self.wrote(key, was_there);
    }

    /// Removes `key` from `read`, recording it if it was there.
    pub fn remove(&mut self, read: &mut Map<String, Value>, key: &str) {
        if read.remove(key).is_some() {
            self.wrote(key, true);
        }
    }

    /// Records that `key` was written (or removed); `was_there` if the text had it before.
    pub fn wrote(&mut self, key: &str, was_there: bool) {
        self.replaced |= was_there;
        self.texts.retain(|(k, _)| k != key);
        if !self.touched.iter().any(|k| k == key) {
            self.touched.push(key.to_owned());
        }
    }

    /// Records that `key` was written, with `text` the JSON text of the value it now has in
    /// the read keys (written as it is, instead of writing that value again).
    pub fn wrote_text(&mut self, key: &str, was_there: bool, text: String) {
        self.wrote(key, was_there);
        self.texts.push((key.to_owned(), text));
    }

    /// Writes the entry of touched `key`, from its text if the step wrote one, else from
    /// `read` (nothing if `read` lacks it: the key went).
    fn push_touched(
        &self,
        out: &mut Vec<u8>,
        first: &mut bool,
        key: &str,
        read: &Map<String, Value>,
    ) {
        if let Some((_, text)) = self.texts.iter().find(|(k, _)| k == key) {
            push_key(out, first, key, false);
            out.extend_from_slice(text.as_bytes());
        } else if let Some(value) = read.get(key) {
            push_entry(out, first, key, value);
        }
    }

    /// Room for the touched entries, ahead of writing them.
    fn room(&self) -> usize {
        self.texts
            .iter()
            .map(|(k, t)| k.len() + t.len() + 4)
            .sum::<usize>()
            + 64 * self.touched.len()
    }

    /// The text of `properties` in line with `read`, the read keys as the step left them;
    /// `None` if the text they were read from stays as it is.
    pub fn apply(
        &self,
        properties: &EventProperties<'_>,
        read: &Map<String, Value>,
    ) -> Option<String> {
        let Some(entries) = &properties.entries else {
            // Not an object: what is left is the read keys.
            return Some(into_text(
                serde_json::to_vec(read).unwrap_or_else(|_| b"{}".to_vec()),
            ));
        };
        let size = entries.iter().map(|(_, raw)| raw.get().len() + 16).sum();
        if properties.repeated {
            return Some(self.rewrite(size, entries, read, Some(last_values(entries))));
        }
        match properties.text {
            Some(_) if self.touched.is_empty() => return None,
            Some(text) if !self.replaced => {
                if let Some(appended) = self.append(text, read) {
                    return Some(appended);
                }
            }
            _ => {}
        }
        Some(self.rewrite(size, entries, read, None))
    }

    /// The entries with each touched key as `read` has it (gone if `read` lacks it) where it
    /// first was, every other key copied as it came (with its last value, if `last` is given
    /// because some key is repeated), in the order it came; touched keys that are new at the
    /// end. Each key is written once.
    fn rewrite(
        &self,
        size: usize,
        entries: &[(Key<'_>, &RawValue)],
        read: &Map<String, Value>,
        last: Option<HashMap<&str, &RawValue, RandomState>>,
    ) -> String {
        let mut written: HashSet<&str, RandomState> = HashSet::default();
        let mut out = Vec::with_capacity(size + self.room());
        out.push(b'{');
        let mut first = true;
        for (entry_key, raw) in entries {
            let key = entry_key.0.as_ref();
            let touched = self.touched.iter().find(|t| t.as_str() == key);
            let repeats = last.is_some() || touched.is_some();
            if repeats && !written.insert(key) {
                continue;
            }
            match touched {
                None => {
                    let raw = last.as_ref().and_then(|l| l.get(key)).unwrap_or(raw);
                    push_key(&mut out, &mut first, key, entry_key.as_is());
                    out.extend_from_slice(raw.get().as_bytes());
                }
                Some(touched) => self.push_touched(&mut out, &mut first, touched, read),
            }
        }
        for key in &self.touched {
            if !written.contains(key.as_str()) {
                self.push_touched(&mut out, &mut first, key, read);
            }
        }
        out.push(b'}');
        into_text(out)
    }

    /// `text` with the touched keys (all new to it) appended, or `None` if `text` does not end
    /// as an object does.
    fn append(&self, text: &str, read: &Map<String, Value>) -> Option<String> {
        let open = text.trim_end().strip_suffix('}')?.trim_end();
        let mut out = Vec::with_capacity(open.len() + self.room() + 1);
        out.extend_from_slice(open.as_bytes());
        let mut first = out.ends_with(b"{");
        for key in &self.touched {
            self.push_touched(&mut out, &mut first, key, read);
        }
        out.push(b'}');
        Some(into_text(out))
    }
}

/// Each key's last value, for text in which some key is repeated.
fn last_values<'e>(
    entries: &'e [(Key<'_>, &'e RawValue)],
) -> HashMap<&'e str, &'e RawValue, RandomState> {
    entries
        .iter()
        .map(|(Key(key), raw)| (key.as_ref(), *raw))
        .collect()
}

/// Writes `key` and its colon, after a comma unless it is the `first` entry; `as_is` if the key
/// needs no escaping.
fn push_key(out: &mut Vec<u8>, first: &mut bool, key: &str, as_is: bool) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    if as_is {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.push(b'"');
    } else {
        // Writing JSON into memory cannot fail.
        let _ = serde_json::to_writer(&mut *out, key);
    }
    out.push(b':');
}

fn push_entry(out: &mut Vec<u8>, first: &mut bool, key: &str, value: &Value) {
    push_key(out, first, key, false);
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

    fn is_read(key: &str) -> bool {
        matches!(
            key,
            "$set" | "$set_once" | "$os" | "$browser" | "$group_0" | "$pp"
        )
    }

    fn read(text: &str) -> Option<Map<String, Value>> {
        let (properties, read) = EventProperties::read(text, is_read);
        properties.entries.is_some().then_some(read)
    }

    #[test]
    fn only_the_named_keys_are_parsed() {
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
    }

    #[test]
    fn a_rewrite_changes_the_touched_keys_and_copies_the_rest() {
        let text = r#"{"n": 1.50, "$pp": true, "$set": {"a": 1}, "$os": 1.50, "u": "\u00e9", "k\u00e9": 0, "$set": {"a": 3}}"#;
        let (properties, mut read) = EventProperties::read(text, is_read);
        let mut edit = Edit::new();
        edit.remove(&mut read, "$pp");
        edit.set(&mut read, "$set", json!({"a": 3, "$os": 1.5}));
        edit.set(&mut read, "$set_once", json!({"$initial_os": 1.5}));
        let out = edit.apply(&properties, &read).unwrap();
        // Values the step did not change are copied byte for byte (`1.50`, `\u00e9`); a
        // touched key given twice is written once, where it first stood.
        assert_eq!(
            out,
            r#"{"n":1.50,"$set":{"$os":1.5,"a":3},"$os":1.50,"u":"\u00e9","ké":0,"$set_once":{"$initial_os":1.5}}"#
        );
        let unchanged = r#"{"n": 1.50, "$set": {"a": 1}}"#;
        let (properties, read) = EventProperties::read(unchanged, is_read);
        assert_eq!(Edit::new().apply(&properties, &read), None);
    }

    #[test]
    fn a_repeated_key_is_written_once_with_its_last_value() {
        let text =
            r#"{"n": 1, "m": [1], "$os": "a", "n": {"x": 2}, "$os": "b", "k\u00e9": 1, "ké": 2}"#;
        let expected = r#"{"n":{"x": 2},"m":[1],"$os":"b","ké":2}"#;
        assert_eq!(with_each_key_once(text).unwrap().unwrap(), expected);
        let parsed: Map<String, Value> = serde_json::from_str(text).unwrap();
        assert_eq!(
            serde_json::from_str::<Map<String, Value>>(expected).unwrap(),
            parsed
        );
        assert_eq!(with_each_key_once(r#"{"n": 1, "m": 2}"#), Ok(None));
        assert_eq!(with_each_key_once("[1, 1]"), Err(NotAnObject));
        assert_eq!(with_each_key_once(r#"{"n": 1} {}"#), Err(NotAnObject));
        // Met as an object in a client's event, the same.
        let object: RawObject<'_> = serde_json::from_str(text).unwrap();
        let (properties, read) = EventProperties::of_object(object, is_read);
        assert_eq!(read.get("$os"), Some(&json!("b")));
        assert_eq!(Edit::new().apply(&properties, &read).unwrap(), expected);
    }

    #[test]
    fn a_value_text_the_step_wrote_is_used_until_the_key_is_written_again() {
        let text = r#"{"$os": "Linux", "$pp": 1.50, "$set": {"a": 1}}"#;
        let (properties, mut read) = EventProperties::read(text, is_read);
        let raw: Vec<(&str, &str)> = properties
            .raw_values(is_read)
            .into_iter()
            .map(|(k, v)| (k, v.get()))
            .collect();
        assert_eq!(
            raw,
            [
                ("$os", r#""Linux""#),
                ("$pp", "1.50"),
                ("$set", r#"{"a": 1}"#)
            ]
        );
        read.insert("$set_once".into(), json!({"$initial_os": 1.5}));
        let mut edit = Edit::new();
        edit.wrote_text("$set_once", false, r#"{"$initial_os":1.50}"#.into());
        assert_eq!(
            edit.apply(&properties, &read).unwrap(),
            r#"{"$os": "Linux", "$pp": 1.50, "$set": {"a": 1},"$set_once":{"$initial_os":1.50}}"#
        );
        edit.wrote("$set_once", false);
        edit.set(&mut read, "$os", json!("Mac"));
        assert_eq!(
            edit.apply(&properties, &read).unwrap(),
            r#"{"$os":"Mac","$pp":1.50,"$set":{"a": 1},"$set_once":{"$initial_os":1.5}}"#
        );
        // Repeated keys: no value text is lent.
        let object: RawObject<'_> = serde_json::from_str(r#"{"$os": 1, "$os": 2}"#).unwrap();
        let (properties, _) = EventProperties::of_object(object, is_read);
        assert!(properties.raw_values(is_read).is_empty());
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
            let (properties, _) = EventProperties::read(text, is_read);
            assert_eq!(edit.apply(&properties, &read).unwrap(), expected);
        }
        let (unreadable, _) = EventProperties::read("[1, 2]", is_read);
        assert_eq!(
            Edit::new().apply(&unreadable, &read).unwrap(),
            r#"{"$group_0":"acme"}"#
        );
    }
}
