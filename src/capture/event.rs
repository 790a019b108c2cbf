//! One event of a capture request, read and judged: its fields parsed, its properties met as
//! entries whose values stay text (only the keys normalisation reads are parsed, by
//! [`CapturedEvent`]), and the checks PostHog's capture makes (uuid, event name, properties,
//! distinct id) with the reason for a refusal.
//!
//! Must never: parse the whole of an event's properties, or accept an event without a string
//! `distinct_id` and a hyphenated `uuid`.

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::parse::MAX_JSON_DEPTH;
use crate::event::normalize::CapturedEvent;
use crate::event::properties::RawObject;

/// PostHog truncates distinct ids to this many characters.
const MAX_DISTINCT_ID_CHARS: usize = 200;

/// Why an event was refused, with its uuid if it gave one.
pub type Refusal = (Option<String>, String);

/// An event's fields: all but `properties` parsed, `properties` read as entries whose values
/// stay unparsed.
struct EventFields<'de> {
    top: Map<String, Value>,
    properties: PropertiesField<'de>,
}

/// What an event's `properties` field held.
enum PropertiesField<'de> {
    /// No field, or `null`.
    Absent,
    Object(RawObject<'de>),
    /// Anything else (refused).
    Other,
}

impl<'de> Deserialize<'de> for PropertiesField<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = PropertiesField<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("properties")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let object = RawObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(PropertiesField::Object(object))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(PropertiesField::Absent)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(PropertiesField::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(PropertiesField::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(PropertiesField::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(PropertiesField::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(PropertiesField::Other)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(PropertiesField::Other)
            }
        }
        d.deserialize_any(FieldVisitor)
    }
}

impl<'de> Deserialize<'de> for EventFields<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = EventFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = EventFields {
                    top: Map::new(),
                    properties: PropertiesField::Absent,
                };
                while let Some(key) = map.next_key::<String>()? {
                    if key == "properties" {
                        fields.properties = map.next_value()?;
                    } else {
                        fields.top.insert(key, map.next_value()?);
                    }
                }
                Ok(fields)
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// Reads and checks one event (`json`, a value of a payload already read as JSON); on success
/// it has a string `distinct_id` and a hyphenated `uuid`.
pub fn read_event<'t>(
    json: &'t str,
    default_event: Option<&str>,
) -> Result<CapturedEvent<'t>, Refusal> {
    let kind = json_kind(json);
    if kind != "an object" {
        return Err((None, format!("an event must be a JSON object, not {kind}")));
    }
    let fields: EventFields<'t> = serde_json::from_str(json).map_err(|e| (None, parse_error(e)))?;
    let mut event = fields.top;
    let uuid_text = event.get("uuid").and_then(Value::as_str).map(str::to_owned);
    let fail = |error: String| Err((uuid_text.clone(), error));

    let uuid = match event.get("uuid") {
        None | Some(Value::Null) => Uuid::now_v7(),
        Some(Value::String(s)) if s.trim().is_empty() => Uuid::now_v7(),
        Some(Value::String(s)) => match Uuid::parse_str(s.trim()) {
            Ok(u) => u,
            Err(_) => return fail(format!("uuid {s:?} is not a valid UUID")),
        },
        Some(_) => return fail("uuid must be a string".into()),
    };
    if let (Some(name), None | Some(Value::Null)) = (default_event, event.get("event")) {
        event.insert("event".into(), Value::String(name.to_owned()));
    }
    match event.get("event") {
        Some(Value::String(name)) if !name.trim().is_empty() => {}
        Some(Value::String(_)) => return fail("event name is empty".into()),
        None | Some(Value::Null) => return fail("missing event name (the \"event\" field)".into()),
        Some(_) => return fail("event name must be a string".into()),
    }
    let properties = match fields.properties {
        PropertiesField::Absent => RawObject::empty(),
        PropertiesField::Object(object) => object,
        PropertiesField::Other => return fail("properties must be a JSON object".into()),
    };
    let given = ["distinct_id", "$distinct_id"]
        .iter()
        .find_map(|key| event.get(*key).filter(|v| !v.is_null()))
        .and_then(distinct_id_text);
    let mut captured = CapturedEvent::of_object(event, properties);
    let distinct_id = given.or_else(|| captured.distinct_id_property().and_then(distinct_id_text));
    let Some(distinct_id) = distinct_id else {
        return fail("missing distinct_id (top level or in properties)".into());
    };
    captured.set_field("uuid", Value::String(uuid.hyphenated().to_string()));
    captured.set_field("distinct_id", Value::String(distinct_id));
    Ok(captured)
}

/// What is wrong with an event's JSON.
fn parse_error(e: serde_json::Error) -> String {
    if e.to_string().starts_with("recursion limit exceeded") {
        format!("the event is nested deeper than {MAX_JSON_DEPTH} levels")
    } else {
        format!("not valid JSON: {e}")
    }
}

/// What kind of value `json` (text known to be JSON) is, told by its first character.
pub fn json_kind(json: &str) -> &'static str {
    match json.trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// distinct ids may arrive as strings, numbers or objects; all are kept as text, as PostHog's
/// capture keeps them: values such as "undefined" or "0" are stored (only merging refuses
/// them), surrounding spaces stay, NUL becomes U+FFFD, and at most 200 characters are kept. An
/// empty or blank id is missing.
fn distinct_id_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    if text.trim().is_empty() {
        return None;
    }
    Some(
        text.chars()
            .take(MAX_DISTINCT_ID_CHARS)
            .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
            .collect(),
    )
}
