//! PostHog's rules for person properties and distinct ids, as plain functions.
//!
//! Sources (see `../shared/notes/posthog-persons-sinks-sources.md` §3): the illegal distinct ids
//! of `person-merge-service.ts`, the property update of `person-update.ts`
//! (`computeEventPropertyUpdates`), the automatic person properties of
//! `person-property-utils.ts` (in [`auto`]) and the newest `FILTERED_PERSON_UPDATE_PROPERTIES`.
//! An update is judged and written by walking sorted maps side by side (`SortedLookup`).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

pub mod auto;
#[cfg(test)]
pub use auto::add_auto_person_properties;
pub use auto::{
    add_to_object, auto_person_properties, find_listed, owned_auto_properties, AutoProperties,
    EVENT_TO_PERSON_PROPERTIES,
};

/// Ids that never merge, whatever their case.
const ILLEGAL_IDS_ANY_CASE: [&str; 10] = [
    "anonymous",
    "guest",
    "distinctid",
    "distinct_id",
    "id",
    "not_authenticated",
    "email",
    "undefined",
    "true",
    "false",
];
/// Ids that never merge, exactly as written.
const ILLEGAL_IDS_EXACT: [&str; 7] = [
    "[object Object]",
    "NaN",
    "None",
    "none",
    "null",
    "0",
    "undefined",
];

/// PostHog's `isDistinctIdIllegal`: blank, or on one of its two lists (also wrapped in single or
/// double quotes).
pub fn is_illegal_distinct_id(id: &str) -> bool {
    if id.trim().is_empty() {
        return true;
    }
    let unquoted = ['"', '\'']
        .iter()
        .find_map(|q| {
            id.strip_prefix(*q)
                .and_then(|rest| rest.strip_suffix(*q))
                .filter(|inner| !inner.is_empty())
        })
        .unwrap_or(id);
    let lower = unquoted.to_lowercase();
    ILLEGAL_IDS_ANY_CASE.contains(&lower.as_str()) || ILLEGAL_IDS_EXACT.contains(&unquoted)
}

/// Properties that do not, on their own, make a person update (they are written when something
/// else changes).
const FILTERED_PERSON_UPDATE_PROPERTIES: [&str; 31] = [
    "$current_url",
    "$pathname",
    "$referring_domain",
    "$referrer",
    "$screen_height",
    "$screen_width",
    "$viewport_height",
    "$viewport_width",
    "$browser",
    "$browser_version",
    "$device_type",
    "$raw_user_agent",
    "$os",
    "$os_name",
    "$os_version",
    "$geoip_postal_code",
    "$geoip_time_zone",
    "$geoip_latitude",
    "$geoip_longitude",
    "$geoip_accuracy_radius",
    "$geoip_subdivision_1_code",
    "$geoip_subdivision_1_name",
    "$geoip_subdivision_2_code",
    "$geoip_subdivision_2_name",
    "$geoip_subdivision_3_code",
    "$geoip_subdivision_3_name",
    "$geoip_city_confidence",
    "$geoip_country_confidence",
    "$geoip_postal_code_confidence",
    "$geoip_subdivision_1_confidence",
    "$geoip_subdivision_2_confidence",
];

/// Events that never update a person's properties.
pub fn never_updates_person(event: &str) -> bool {
    matches!(event, "$exception" | "$$heatmap")
}

/// Looks keys up in a map by walking it once, for keys asked in ascending order: a person's
/// or an event's properties are compared key by key with another sorted list, and one walk
/// costs far fewer string comparisons than a search per key.
///
/// serde_json's `Map` iterates in key order as long as its `preserve_order` feature is off
/// (`map_iterates_in_key_order` checks it).
struct SortedLookup<'m> {
    rest: std::iter::Peekable<serde_json::map::Iter<'m>>,
}

impl<'m> SortedLookup<'m> {
    fn new(map: &'m Map<String, Value>) -> Self {
        SortedLookup {
            rest: map.iter().peekable(),
        }
    }

    /// The value of `key`; `key` must not come before the key asked last.
    fn get(&mut self, key: &str) -> Option<&'m Value> {
        while let Some((at, value)) = self.rest.peek() {
            match at.as_str().cmp(key) {
                std::cmp::Ordering::Less => {
                    self.rest.next();
                }
                std::cmp::Ordering::Equal => return Some(value),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }
}

/// What an event asks of its person's properties, borrowed from the event.
#[derive(Debug, PartialEq)]
pub struct PropertyUpdate<'a> {
    pub set_once: &'a Map<String, Value>,
    pub set: &'a Map<String, Value>,
    pub unset: Vec<&'a str>,
}

/// The empty object an absent `$set` or `$set_once` reads as.
pub static NOTHING: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl<'a> PropertyUpdate<'a> {
    /// Reads `$set_once`, `$set` and `$unset` (an array of keys, or an object whose keys count).
    pub fn of(properties: &'a Map<String, Value>) -> PropertyUpdate<'a> {
        let object = |key: &str| match properties.get(key) {
            Some(Value::Object(map)) => map,
            _ => &*NOTHING,
        };
        let unset = match properties.get("$unset") {
            Some(Value::Array(keys)) => keys.iter().filter_map(Value::as_str).collect(),
            Some(Value::Object(map)) => map.keys().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        PropertyUpdate {
            set_once: object("$set_once"),
            set: object("$set"),
            unset,
        }
    }

    /// Only a `$set` (a group's update).
    pub fn set_only(set: &'a Map<String, Value>) -> PropertyUpdate<'a> {
        PropertyUpdate {
            set_once: &NOTHING,
            set,
            unset: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set_once.is_empty() && self.set.is_empty() && self.unset.is_empty()
    }

    /// What applying it to `values` would do: whether it changes anything that warrants a
    /// write (the same judgement as [`apply_update`], without changing anything), and whether
    /// `$set` agrees with `values` already. One walk of each sorted map answers both.
    pub fn effect(&self, values: &Map<String, Value>, event: &str) -> Effect {
        let person_event = is_person_event(event);
        let mut held = SortedLookup::new(values);
        let adds_once = self.set_once.keys().any(|k| held.get(k).is_none());
        let (mut held, mut once) = (SortedLookup::new(values), SortedLookup::new(self.set_once));
        let (mut set_agrees, mut set_changes) = (true, false);
        for (key, value) in self.set {
            let current = held.get(key);
            if current == Some(value) {
                continue;
            }
            set_agrees = false;
            if !set_changes && (person_event || !is_filtered(key)) {
                set_changes = current.or_else(|| once.get(key)) != Some(value);
            }
        }
        let unsets = self.unset.iter().any(|k| {
            values.contains_key(*k) || self.set_once.contains_key(*k) || self.set.contains_key(*k)
        });
        Effect {
            changes: adds_once || unsets || set_changes,
            set_agrees,
        }
    }

    /// Whether `$set` agrees with `values` already (so the properties an event shows are the
    /// person's own).
    pub fn set_agrees(&self, values: &Map<String, Value>) -> bool {
        let mut held = SortedLookup::new(values);
        self.set.iter().all(|(k, v)| held.get(k) == Some(v))
    }
}

/// The JSON text of `under` with the entries of `over` over it, as serde_json writes the
/// merged map (keys in order), without building it: an event shows its person's properties
/// with its own `$set` over them, and its `$set` rarely agrees where pages change.
pub fn overlaid_text(under: &Map<String, Value>, over: &Map<String, Value>) -> String {
    serde_json::to_string(&Overlay { under, over }).unwrap_or_default()
}

struct Overlay<'m> {
    under: &'m Map<String, Value>,
    over: &'m Map<String, Value>,
}

impl serde::Serialize for Overlay<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        use std::cmp::Ordering;
        let mut map = serializer.serialize_map(None)?;
        let (mut under, mut over) = (self.under.iter().peekable(), self.over.iter().peekable());
        loop {
            let order = match (under.peek(), over.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((u, _)), Some((o, _))) => u.cmp(o),
            };
            let (key, value) = match order {
                Ordering::Less => under.next(),
                Ordering::Greater => over.next(),
                Ordering::Equal => {
                    under.next();
                    over.next()
                }
            }
            .ok_or_else(|| serde::ser::Error::custom("overlay walk"))?;
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// What a [`PropertyUpdate`] would do to a person's properties.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effect {
    /// It changes something that warrants a write.
    pub changes: bool,
    /// Its `$set` agrees with the properties as they are.
    pub set_agrees: bool,
}

fn is_person_event(event: &str) -> bool {
    matches!(
        event,
        "$identify" | "$create_alias" | "$merge_dangerously" | "$set"
    )
}

/// The properties a person or group keeps, with per-key bookkeeping.
pub struct Properties<'a> {
    pub values: &'a mut Map<String, Value>,
    pub last_operation: &'a mut Map<String, Value>,
    pub last_updated_at: &'a mut Map<String, Value>,
}

/// Applies `update` in PostHog's order (set_once, set, unset); answers whether anything
/// changed that warrants a write. A change only to properties that do not trigger an update on
/// their own is applied only if `event` is one of the person events, or something else changed.
pub fn apply_update(
    target: Properties<'_>,
    update: &PropertyUpdate,
    event: &str,
    at: DateTime<Utc>,
) -> bool {
    let person_event = is_person_event(event);
    let mut pending: Vec<(&String, &Value, &'static str)> = Vec::new();
    let mut triggers = false;
    for (key, value) in update.set_once {
        if !target.values.contains_key(key) {
            pending.push((key, value, "set_once"));
            triggers = true;
        }
    }
    for (key, value) in update.set {
        // A key set once and set by the same event ends up with the `$set` value.
        let current = pending
            .iter()
            .rev()
            .find(|(k, _, _)| *k == key)
            .map(|(_, v, _)| *v)
            .or_else(|| target.values.get(key));
        if current != Some(value) {
            pending.push((key, value, "set"));
            if person_event || !is_filtered(key) {
                triggers = true;
            }
        }
    }
    let unset: Vec<&str> = update
        .unset
        .iter()
        .copied()
        .filter(|k| {
            target.values.contains_key(*k) || pending.iter().any(|(p, _, _)| p.as_str() == *k)
        })
        .collect();
    if !unset.is_empty() {
        triggers = true;
    }
    if !triggers {
        return false;
    }
    let stamp = Value::String(crate::event::timestamp_text(at));
    for (key, value, operation) in pending {
        target.values.insert(key.clone(), value.clone());
        target
            .last_operation
            .insert(key.clone(), Value::String(operation.into()));
        target.last_updated_at.insert(key.clone(), stamp.clone());
    }
    for key in unset {
        target.values.remove(key);
        target.last_operation.remove(key);
        target.last_updated_at.remove(key);
    }
    true
}

fn is_filtered(key: &str) -> bool {
    FILTERED_PERSON_UPDATE_PROPERTIES.contains(&key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(super) fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn illegal_ids_follow_posthogs_lists() {
        for id in [
            "",
            "  ",
            "anonymous",
            "Anonymous",
            "'guest'",
            "\"null\"",
            "0",
            "NaN",
            "None",
            "undefined",
            "UNDEFINED",
            "[object Object]",
            "'0'",
        ] {
            assert!(is_illegal_distinct_id(id), "{id:?} should be illegal");
        }
        for id in ["NULL", "nan", "user-1", "00", "'", "\"\""] {
            assert!(!is_illegal_distinct_id(id), "{id:?} should be legal");
        }
    }

    #[test]
    fn overlaid_text_is_the_merged_maps_text() {
        let cases = [
            (json!({}), json!({})),
            (json!({"a": 1, "c": {"x": [1]}, "e": "é\n"}), json!({})),
            (json!({}), json!({"b": 2})),
            (
                json!({"a": 1, "c": 3, "e": 5}),
                json!({"b": 2, "c": "over", "f": null}),
            ),
            (
                json!({"$os": "Linux", "$initial_os": "Mac"}),
                json!({"$os": "Mac", "$a": 0}),
            ),
        ];
        for (under, over) in cases {
            let (under, over) = (map(under), map(over));
            let mut merged = under.clone();
            merged.extend(over.clone());
            assert_eq!(
                overlaid_text(&under, &over),
                serde_json::to_string(&merged).unwrap()
            );
        }
    }

    #[test]
    fn map_iterates_in_key_order() {
        // `SortedLookup` relies on it: serde_json's `preserve_order` feature must stay off.
        let m = map(json!({"b": 1, "$z": 2, "a": 3, "$initial_os": 4, "$os": 5}));
        let keys: Vec<&String> = m.keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    /// The judgement of an update, one key at a time (as PostHog writes it).
    fn effect_key_by_key(
        update: &PropertyUpdate,
        values: &Map<String, Value>,
        event: &str,
    ) -> Effect {
        let person_event = is_person_event(event);
        let changes = update.set_once.keys().any(|k| !values.contains_key(k))
            || update.unset.iter().any(|k| {
                values.contains_key(*k)
                    || update.set_once.contains_key(*k)
                    || update.set.contains_key(*k)
            })
            || update.set.iter().any(|(k, v)| {
                let current = values.get(k).or_else(|| update.set_once.get(k));
                current != Some(v) && (person_event || !is_filtered(k))
            });
        let set_agrees = update.set.iter().all(|(k, v)| values.get(k) == Some(v));
        Effect {
            changes,
            set_agrees,
        }
    }

    #[test]
    fn effect_is_the_key_by_key_judgement() {
        let persons = [
            json!({}),
            json!({"$browser": "A", "a": 1, "z": 2}),
            json!({"$initial_os": "Linux", "$os": "Linux", "b": null, "m": [1]}),
        ];
        let updates = [
            json!({}),
            json!({"$set": {"$browser": "A"}}),
            json!({"$set": {"$browser": "B"}}),
            json!({"$set": {"$browser": "B", "a": 1}, "$set_once": {"$browser": "B"}}),
            json!({"$set_once": {"$initial_os": "Mac", "a": 7}}),
            json!({"$set_once": {"zz": 1}, "$set": {"m": [1], "$os": "Linux"}}),
            json!({"$set": {"b": null, "c": 0}, "$set_once": {"c": 0}}),
            json!({"$unset": ["a"]}),
            json!({"$unset": ["nothing"], "$set": {"$os": "Linux"}}),
        ];
        for person in &persons {
            let values = map(person.clone());
            for given in &updates {
                let given = map(given.clone());
                let update = PropertyUpdate::of(&given);
                for event in ["$pageview", "$identify"] {
                    assert_eq!(
                        update.effect(&values, event),
                        effect_key_by_key(&update, &values, event),
                        "{given:?} on {values:?} by {event}"
                    );
                    assert_eq!(
                        update.set_agrees(&values),
                        effect_key_by_key(&update, &values, event).set_agrees
                    );
                }
            }
        }
    }

    #[test]
    fn set_once_then_set_then_unset() {
        let (mut values, mut op, mut at) =
            (map(json!({"a": 1, "gone": true})), Map::new(), Map::new());
        let given = map(json!({
            "$set_once": {"a": 9, "b": 2, "c": 3},
            "$set": {"c": 4},
            "$unset": ["gone", "missing"],
        }));
        let update = PropertyUpdate::of(&given);
        let target = Properties {
            values: &mut values,
            last_operation: &mut op,
            last_updated_at: &mut at,
        };
        assert!(apply_update(target, &update, "e", Utc::now()));
        assert_eq!(values, map(json!({"a": 1, "b": 2, "c": 4})));
        assert_eq!(op["c"], "set");
        assert_eq!(op["b"], "set_once");
    }

    #[test]
    fn filtered_properties_alone_do_not_update() {
        let (mut values, mut op, mut at) = (map(json!({"$browser": "A"})), Map::new(), Map::new());
        let given = map(json!({"$set": {"$browser": "B"}}));
        let update = PropertyUpdate::of(&given);
        let target = Properties {
            values: &mut values,
            last_operation: &mut op,
            last_updated_at: &mut at,
        };
        assert!(!apply_update(target, &update, "$pageview", Utc::now()));
        assert_eq!(values["$browser"], "A");
        let target = Properties {
            values: &mut values,
            last_operation: &mut op,
            last_updated_at: &mut at,
        };
        assert!(apply_update(target, &update, "$identify", Utc::now()));
        assert_eq!(values["$browser"], "B");
    }
}
