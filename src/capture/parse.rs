//! From decoded JSON to the events of a request, in three passes that never hold more than one
//! event's parsed tree at a time:
//!
//! 1. [`split_payload`] finds the request's shape (an event, an array of events, or
//!    `{"api_key", "batch": [...]}`) and each event's span in the text, without building any
//!    event, stopping at `CAPTURE_MAX_EVENTS_PER_REQUEST`;
//! 2. [`find_token`] reads only the token fields of each event, so an unknown token is refused
//!    before anything is allocated per event;
//! 3. [`build_rows`] reads, judges ([`super::event`]: name, distinct_id, uuid) and normalises the
//!    events one at a time, keeping the rows and the reasons for the rejected ones.

use std::ops::Range;

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::error::{CaptureError, Rejection};
use super::event::{json_kind, read_event};
use crate::event::normalize::{normalize, RequestContext};
use crate::event::timestamp::parse_client_time;
use crate::event::timestamp::TimestampWarning;
use crate::event::EventRow;

pub use crate::event::MAX_JSON_DEPTH;
/// Most rejected events an answer lists one by one; it counts the rest.
pub const MAX_LISTED_REJECTIONS: usize = 100;
/// What serde's error carries when the event cap is passed.
const TOO_MANY: &str = "appliance: too many events";

/// A decoded payload and where its events are in it.
#[derive(Debug)]
pub struct SplitPayload {
    pub text: String,
    /// Each event's JSON, as a byte range of `text`.
    pub events: Vec<Range<usize>>,
    /// The batch envelope's token (`api_key`, `token` or `$token`), if it is a batch.
    pub envelope_token: Option<String>,
    /// The send time stated in the body (`sent_at`, or `created_at` in the v1 protocol).
    pub sent_at: Option<DateTime<Utc>>,
}

impl SplitPayload {
    fn event(&self, index: usize) -> &str {
        &self.text[self.events[index].clone()]
    }
}

/// The events of a request, judged: the rows to store and why the others were refused.
#[derive(Debug, Default)]
pub struct Judged {
    pub rows: Vec<EventRow>,
    /// Accepted events whose time was not taken as given: (event uuid, timestamp sent, why).
    pub warnings: Vec<(uuid::Uuid, Value, TimestampWarning)>,
    /// The first [`MAX_LISTED_REJECTIONS`] rejections.
    pub rejected: Vec<Rejection>,
    /// All rejections, listed or not.
    pub rejected_count: usize,
}

/// Finds the request's shape and its events' spans; nothing is built per event.
pub fn split_payload(bytes: Vec<u8>, max_events: usize) -> Result<SplitPayload, CaptureError> {
    if bytes.trim_ascii().is_empty() {
        return Err(CaptureError::EmptyPayload);
    }
    let text = String::from_utf8(bytes).map_err(|e| CaptureError::InvalidUtf8 {
        offset: e.utf8_error().valid_up_to(),
    })?;
    check_depth(&text)?;
    let first = text.trim_start().as_bytes()[0];
    let base = text.as_ptr() as usize;
    let span = |raw: &RawValue| {
        let start = raw.get().as_ptr() as usize - base;
        start..start + raw.get().len()
    };
    let (events, envelope_token, sent_at) = match first {
        b'[' => {
            let raws = parse_whole(&text, EventList { max: max_events }, max_events)?;
            (raws.iter().map(|r| span(r)).collect(), None, None)
        }
        b'{' => {
            let top = parse_whole(&text, TopObject { max: max_events }, max_events)?;
            match top.batch {
                Some(raws) => (
                    raws.iter().map(|r| span(r)).collect(),
                    top.token,
                    top.sent_at.as_ref().and_then(parse_client_time),
                ),
                // An object without a batch is one event: all of it.
                None => (vec![span_of_trimmed(&text)], None, None),
            }
        }
        _ => {
            // A scalar: say which, once it is known to be JSON at all.
            parse_whole(&text, IgnoredAnySeed, max_events)?;
            return Err(CaptureError::UnexpectedShape(json_kind(&text)));
        }
    };
    Ok(SplitPayload {
        events,
        envelope_token,
        sent_at,
        text,
    })
}

/// Refuses JSON nested deeper than [`MAX_JSON_DEPTH`] (skipping events as raw spans does not
/// count their depth; parsing them would, one at a time).
fn check_depth(text: &str) -> Result<(), CaptureError> {
    if crate::event::json_depth_within(text, MAX_JSON_DEPTH) {
        Ok(())
    } else {
        Err(CaptureError::InvalidJson(format!(
            "nested deeper than {MAX_JSON_DEPTH} levels"
        )))
    }
}

fn span_of_trimmed(text: &str) -> Range<usize> {
    let start = text.len() - text.trim_start().len();
    start..text.trim_end().len()
}

/// Parses all of `text` with `seed`, turning serde_json's errors into precise ones.
fn parse_whole<'de, S: DeserializeSeed<'de>>(
    text: &'de str,
    seed: S,
    max_events: usize,
) -> Result<S::Value, CaptureError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = seed
        .deserialize(&mut de)
        .map_err(|e| json_error(e, max_events))?;
    de.end().map_err(|e| json_error(e, max_events))?;
    Ok(value)
}

fn json_error(e: serde_json::Error, max_events: usize) -> CaptureError {
    let text = e.to_string();
    if text.starts_with(TOO_MANY) {
        CaptureError::TooManyEvents { limit: max_events }
    } else if text.starts_with("recursion limit exceeded") {
        CaptureError::InvalidJson(format!(
            "nested deeper than {MAX_JSON_DEPTH} levels ({text})"
        ))
    } else {
        CaptureError::InvalidJson(text)
    }
}

struct IgnoredAnySeed;

impl<'de> DeserializeSeed<'de> for IgnoredAnySeed {
    type Value = IgnoredAny;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<IgnoredAny, D::Error> {
        IgnoredAny::deserialize(d)
    }
}

/// An array of events, as spans (`&RawValue`), at most `max` of them.
struct EventList {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for EventList {
    type Value = Vec<&'de RawValue>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EventList {
    type Value = Vec<&'de RawValue>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of events")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            if out.len() >= self.max {
                return Err(de::Error::custom(TOO_MANY));
            }
            out.push(raw);
        }
        Ok(out)
    }
}

/// `batch` when it is an array of events; anything else there means "not a batch".
struct MaybeEventList {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for MaybeEventList {
    type Value = Option<Vec<&'de RawValue>>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        if !raw.get().starts_with('[') {
            return Ok(None);
        }
        let mut inner = serde_json::Deserializer::from_str(raw.get());
        EventList { max: self.max }
            .deserialize(&mut inner)
            .map(Some)
            .map_err(de::Error::custom)
    }
}

/// The top-level object: a batch envelope's fields, without building anything else.
struct TopObject {
    max: usize,
}

#[derive(Default)]
struct Top<'de> {
    batch: Option<Vec<&'de RawValue>>,
    token: Option<String>,
    sent_at: Option<Value>,
    created_at: Option<Value>,
}

impl<'de> DeserializeSeed<'de> for TopObject {
    type Value = Top<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopObject {
    type Value = Top<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an event or a batch")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut top = Top::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "batch" => top.batch = map.next_value_seed(MaybeEventList { max: self.max })?,
                "api_key" | "token" | "$token" => {
                    let value: &RawValue = map.next_value()?;
                    if top.token.is_none() {
                        top.token = token_text(value);
                    }
                }
                "sent_at" => top.sent_at = Some(map.next_value()?),
                "created_at" => top.created_at = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        top.sent_at = top.sent_at.or(top.created_at.take());
        Ok(top)
    }
}

/// A token value as text: a non-empty string, trimmed.
fn token_text(raw: &RawValue) -> Option<String> {
    let text: String = serde_json::from_str(raw.get()).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// The fields of an event that may carry the token; everything else is skipped unread.
#[derive(Deserialize)]
struct TokenFields<'a> {
    #[serde(borrow)]
    api_key: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow, rename = "$token")]
    dollar_token: Option<&'a RawValue>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct PropertiesToken<'a> {
    #[serde(borrow)]
    token: Option<&'a RawValue>,
}

/// The token one event names, if any.
fn event_token(json: &str) -> Option<String> {
    let fields: TokenFields<'_> = serde_json::from_str(json).ok()?;
    [fields.api_key, fields.token, fields.dollar_token]
        .into_iter()
        .flatten()
        .find_map(token_text)
        .or_else(|| {
            let properties = fields.properties?;
            let inner: PropertiesToken<'_> = serde_json::from_str(properties.get()).ok()?;
            inner.token.and_then(token_text)
        })
}

/// The request's project token: the batch envelope's, else the one its events name (they must
/// agree), else `extra` (given outside the payload: `?token=`, or `Authorization: Bearer` in the
/// v1 protocol). Events larger than `max_event_bytes` are not read (they are refused later).
pub fn find_token(
    split: &SplitPayload,
    extra: Option<&str>,
    max_event_bytes: usize,
) -> Result<String, CaptureError> {
    let token = match &split.envelope_token {
        Some(token) => token.clone(),
        None => {
            let mut found: Option<String> = None;
            for index in 0..split.events.len() {
                let json = split.event(index);
                if json.len() > max_event_bytes {
                    continue;
                }
                if let Some(token) = event_token(json) {
                    match &found {
                        Some(f) if *f != token => return Err(CaptureError::TokenMismatch),
                        Some(_) => {}
                        None => found = Some(token),
                    }
                }
            }
            let extra = extra
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            found.or(extra).ok_or(CaptureError::MissingToken)?
        }
    };
    if token.starts_with("phx_") {
        return Err(CaptureError::PersonalApiKey);
    }
    Ok(token)
}

/// Parses, judges and normalises each event in turn; one event at a time, and of its properties
/// only the few that normalisation reads are parsed.
pub fn build_rows(
    split: &SplitPayload,
    max_event_bytes: usize,
    ctx: &RequestContext<'_>,
) -> Judged {
    let mut judged = Judged {
        rows: Vec::with_capacity(split.events.len()),
        ..Judged::default()
    };
    for index in 0..split.events.len() {
        let json = split.event(index);
        let outcome = if json.len() > max_event_bytes {
            Err((
                None,
                format!(
                    "event is {} bytes of JSON, more than the limit of {max_event_bytes}",
                    json.len()
                ),
            ))
        } else {
            read_event(json, ctx.default_event).map(|event| {
                let sent = event.field("timestamp").cloned().unwrap_or(Value::Null);
                let (row, warning) = normalize(ctx, event);
                if let Some(warning) = warning {
                    if judged.warnings.len() < MAX_LISTED_REJECTIONS {
                        judged.warnings.push((row.uuid, sent, warning));
                    }
                }
                row
            })
        };
        match outcome {
            Ok(row) => judged.rows.push(row),
            Err((uuid, error)) => {
                judged.rejected_count += 1;
                if judged.rejected.len() < MAX_LISTED_REJECTIONS {
                    judged.rejected.push(Rejection { index, uuid, error });
                }
            }
        }
    }
    judged
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn split(payload: Value) -> SplitPayload {
        split_payload(payload.to_string().into_bytes(), 1000).unwrap()
    }

    fn ctx() -> RequestContext<'static> {
        RequestContext {
            received_at: Utc::now(),
            sent_at: None,
            ip: None,
            anonymize_ips: false,
            geoip: None,
            default_event: None,
            cookieless: None,
        }
    }

    #[test]
    fn request_shapes_and_token_places() {
        let p = split(
            json!({"api_key": "phc_a", "batch": [{"event": "e", "distinct_id": 5}], "sent_at": "2026-01-01T00:00:00Z"}),
        );
        assert_eq!(find_token(&p, None, 1 << 20).unwrap(), "phc_a");
        assert!(p.sent_at.is_some());
        let rows = build_rows(&p, 1 << 20, &ctx()).rows;
        assert_eq!(rows[0].distinct_id, "5");
        let p =
            split(json!([{"event": "e", "properties": {"token": "phc_b", "distinct_id": "x"}}]));
        assert_eq!(find_token(&p, None, 1 << 20).unwrap(), "phc_b");
        let p = split(json!({"event": "e", "$token": "phc_c", "distinct_id": "x"}));
        assert_eq!(find_token(&p, None, 1 << 20).unwrap(), "phc_c");
        assert_eq!(p.events.len(), 1, "an object without a batch is one event");
        let p = split(json!({"event": "e", "distinct_id": "x"}));
        assert_eq!(find_token(&p, Some("phc_q"), 1 << 20).unwrap(), "phc_q");
        // A batch key that is not an array: the object is an event.
        let p = split(json!({"event": "e", "batch": 3, "token": "phc_d", "distinct_id": "x"}));
        assert_eq!(p.events.len(), 1);
        assert_eq!(find_token(&p, None, 1 << 20).unwrap(), "phc_d");
    }

    #[test]
    fn token_errors() {
        let missing = split(json!({"event": "e", "distinct_id": "x"}));
        assert!(matches!(
            find_token(&missing, None, 1 << 20),
            Err(CaptureError::MissingToken)
        ));
        let personal = split(json!({"api_key": "phx_secret", "batch": []}));
        assert!(matches!(
            find_token(&personal, None, 1 << 20),
            Err(CaptureError::PersonalApiKey)
        ));
        let mixed =
            split(json!([{"event": "e", "token": "phc_a"}, {"event": "e", "token": "phc_b"}]));
        assert!(matches!(
            find_token(&mixed, None, 1 << 20),
            Err(CaptureError::TokenMismatch)
        ));
    }

    #[test]
    fn each_event_is_judged_on_its_own() {
        let p = split(json!({"api_key": "phc_a", "batch": [
            {"event": "ok", "distinct_id": "a", "uuid": "0190A0B0-0000-7000-8000-000000000001"},
            {"distinct_id": "a"},
            {"event": "e"},
            {"event": "e", "distinct_id": "a", "uuid": "nope"},
            {"event": "e", "distinct_id": "a", "properties": []},
            7
        ]}));
        let judged = build_rows(&p, 1 << 20, &ctx());
        assert_eq!(judged.rows.len(), 1);
        assert_eq!(
            judged.rows[0].uuid.to_string(),
            "0190a0b0-0000-7000-8000-000000000001"
        );
        let errors: Vec<_> = judged
            .rejected
            .iter()
            .map(|r| (r.index, r.error.as_str()))
            .collect();
        assert_eq!(
            errors,
            vec![
                (1, "missing event name (the \"event\" field)"),
                (2, "missing distinct_id (top level or in properties)"),
                (3, "uuid \"nope\" is not a valid UUID"),
                (4, "properties must be a JSON object"),
                (5, "an event must be a JSON object, not a number"),
            ]
        );
        assert_eq!(judged.rejected_count, 5);
    }

    #[test]
    fn oversized_events_deep_nesting_and_too_many_events_are_refused() {
        let big = "x".repeat(2000);
        let p = split(
            json!({"api_key": "phc_a", "batch": [{"event": "e", "distinct_id": "a", "properties": {"big": big}}]}),
        );
        let judged = build_rows(&p, 1000, &ctx());
        assert!(
            judged.rejected[0]
                .error
                .contains("more than the limit of 1000"),
            "{:?}",
            judged.rejected
        );
        let deep = "[".repeat(500) + &"]".repeat(500);
        let err = split_payload(deep.into_bytes(), 10).unwrap_err();
        assert!(err.to_string().contains("nested deeper than 128"), "{err}");
        // Brackets inside strings do not count; escaped quotes do not end a string.
        let quoted = format!(
            r#"[{{"event":"e","distinct_id":"a","properties":{{"s":"\"{}"}}}}]"#,
            "[".repeat(500)
        );
        assert!(split_payload(quoted.into_bytes(), 10).is_ok());
        assert!(matches!(
            split_payload(b"{\"a\": \"\xff\"}".to_vec(), 10),
            Err(CaptureError::InvalidUtf8 { offset: 7 })
        ));
        let many = format!("[{}0]", "0,".repeat(10));
        assert!(matches!(
            split_payload(many.clone().into_bytes(), 10),
            Err(CaptureError::TooManyEvents { limit: 10 })
        ));
        let batch = format!("{{\"api_key\":\"phc_a\",\"batch\":{many}}}");
        assert!(matches!(
            split_payload(batch.into_bytes(), 10),
            Err(CaptureError::TooManyEvents { limit: 10 })
        ));
        assert!(matches!(
            split_payload(b"\"just a string\"".to_vec(), 10),
            Err(CaptureError::UnexpectedShape("a string"))
        ));
        assert!(matches!(
            split_payload(b"nonsense".to_vec(), 10),
            Err(CaptureError::InvalidJson(_))
        ));
    }

    #[test]
    fn properties_normalisation_does_not_read_are_stored_as_sent() {
        let mut ctx = ctx();
        ctx.ip = Some("203.0.113.9");
        let row = |text: &str| {
            let p = split_payload(text.as_bytes().to_vec(), 10).unwrap();
            let mut judged = build_rows(&p, 1 << 20, &ctx);
            assert_eq!(judged.rejected_count, 0, "{:?}", judged.rejected);
            judged.rows.remove(0)
        };
        // Only adding `$ip`: the client's entries, each value as it came, then the new key.
        let added = row(r#"{"event":"e","distinct_id":"x","properties":{"b": 1.50, "a": [2, 3]}}"#);
        assert_eq!(
            added.properties,
            r#"{"b":1.50,"a":[2, 3],"$ip":"203.0.113.9"}"#
        );
        // Removing the chain and a repeated key: written again in the client's order, each key
        // once with its last value, every value it did not read as it came.
        let rewritten = row(
            r#"[{"event":"e","properties":{"distinct_id":"d","price":1.50,"name":"\u00e9","$elements_chain":"a:","z":1,"a":2,"z":3}}]"#,
        );
        assert_eq!(rewritten.distinct_id, "d");
        assert_eq!(rewritten.elements_chain, "a:");
        assert_eq!(
            rewritten.properties,
            r#"{"distinct_id":"d","price":1.50,"name":"\u00e9","z":3,"a":2,"$ip":"203.0.113.9"}"#
        );
        // No properties at all.
        let bare = row(r#"{"event":"e","distinct_id":"x","properties":null}"#);
        assert_eq!(bare.properties, r#"{"$ip":"203.0.113.9"}"#);
    }

    #[test]
    fn only_the_first_rejections_are_listed_but_all_are_counted() {
        let events: Vec<Value> = (0..250).map(|_| json!(0)).collect();
        let p = split_payload(json!(events).to_string().into_bytes(), 1000).unwrap();
        let judged = build_rows(&p, 1 << 20, &ctx());
        assert_eq!(judged.rejected.len(), MAX_LISTED_REJECTIONS);
        assert_eq!(judged.rejected_count, 250);
    }
}
