//! From decoded JSON to the events of a request: recognises the request shapes SDKs send, finds
//! the project token, and judges each event on its own (name, distinct_id, uuid, size).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::error::{CaptureError, Rejection};
use crate::event::timestamp::parse_client_time;

/// PostHog truncates distinct ids to this many characters.
const MAX_DISTINCT_ID_CHARS: usize = 200;
/// serde_json's own nesting limit; documented here because it is part of the contract.
pub const MAX_JSON_DEPTH: usize = 128;

/// A request's events after validation.
#[derive(Debug)]
pub struct ParsedRequest {
    pub token: String,
    /// The send time stated in the body (`sent_at`, or `created_at` in the v1 protocol).
    pub sent_at: Option<DateTime<Utc>>,
    /// Valid events, each with a normalised `uuid` and a string `distinct_id` at the top level.
    pub accepted: Vec<Map<String, Value>>,
    pub rejected: Vec<Rejection>,
}

/// Parses JSON text, turning serde_json's errors into precise messages.
pub fn parse_json(bytes: &[u8]) -> Result<Value, CaptureError> {
    if bytes.trim_ascii().is_empty() {
        return Err(CaptureError::EmptyPayload);
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(CaptureError::InvalidUtf8 {
            offset: e.valid_up_to(),
        });
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("recursion limit exceeded") {
            CaptureError::InvalidJson(format!(
                "nested deeper than {MAX_JSON_DEPTH} levels ({text})"
            ))
        } else {
            CaptureError::InvalidJson(text)
        }
    })
}

/// Splits a payload into events and finds the token. `extra_token` is one given outside the
/// payload (query `token`, or `Authorization: Bearer` in the v1 protocol).
pub fn parse_request(
    payload: Value,
    extra_token: Option<&str>,
    max_event_bytes: usize,
) -> Result<ParsedRequest, CaptureError> {
    let (events, batch_token, sent_at) = match payload {
        Value::Array(events) => (events, None, None),
        Value::Object(mut envelope) if envelope.get("batch").is_some_and(Value::is_array) => {
            let Some(Value::Array(events)) = envelope.remove("batch") else {
                unreachable!("checked to be an array just above")
            };
            let token = token_of(&envelope);
            let sent_at = envelope
                .get("sent_at")
                .or_else(|| envelope.get("created_at"))
                .and_then(parse_client_time);
            (events, token, sent_at)
        }
        Value::Object(event) => (vec![Value::Object(event)], None, None),
        other => return Err(CaptureError::UnexpectedShape(json_kind(&other))),
    };

    let token = resolve_token(batch_token, &events, extra_token)?;
    let mut accepted = Vec::with_capacity(events.len());
    let mut rejected = Vec::new();
    for (index, event) in events.into_iter().enumerate() {
        match validate_event(event, max_event_bytes) {
            Ok(event) => accepted.push(event),
            Err((uuid, error)) => rejected.push(Rejection { index, uuid, error }),
        }
    }
    Ok(ParsedRequest {
        token,
        sent_at,
        accepted,
        rejected,
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn token_of(object: &Map<String, Value>) -> Option<String> {
    ["api_key", "token", "$token"]
        .iter()
        .filter_map(|key| object.get(*key).and_then(Value::as_str))
        .chain(
            object
                .get("properties")
                .and_then(|p| p.get("token"))
                .and_then(Value::as_str),
        )
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(str::to_owned)
}

fn resolve_token(
    batch_token: Option<String>,
    events: &[Value],
    extra: Option<&str>,
) -> Result<String, CaptureError> {
    let token = match batch_token {
        Some(t) => t,
        None => {
            let mut found: Option<String> = None;
            for event in events.iter().filter_map(Value::as_object) {
                if let Some(t) = token_of(event) {
                    match &found {
                        Some(f) if *f != t => return Err(CaptureError::TokenMismatch),
                        Some(_) => {}
                        None => found = Some(t),
                    }
                }
            }
            match found.or_else(|| {
                extra
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
            }) {
                Some(t) => t,
                None => return Err(CaptureError::MissingToken),
            }
        }
    };
    if token.starts_with("phx_") {
        return Err(CaptureError::PersonalApiKey);
    }
    Ok(token)
}

/// Checks one event; on success it has a string `distinct_id` and a hyphenated `uuid`.
fn validate_event(
    event: Value,
    max_bytes: usize,
) -> Result<Map<String, Value>, (Option<String>, String)> {
    let Value::Object(mut event) = event else {
        return Err((
            None,
            format!("an event must be a JSON object, not {}", json_kind(&event)),
        ));
    };
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
    match event.get("event") {
        Some(Value::String(name)) if !name.trim().is_empty() => {}
        Some(Value::String(_)) => return fail("event name is empty".into()),
        None | Some(Value::Null) => return fail("missing event name (the \"event\" field)".into()),
        Some(_) => return fail("event name must be a string".into()),
    }
    match event.get("properties") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => return fail("properties must be a JSON object".into()),
    }
    let distinct_id = ["distinct_id", "$distinct_id"]
        .iter()
        .find_map(|key| event.get(*key).filter(|v| !v.is_null()))
        .or_else(|| event.get("properties").and_then(|p| p.get("distinct_id")))
        .and_then(distinct_id_text);
    let Some(distinct_id) = distinct_id else {
        return fail("missing distinct_id (top level or in properties)".into());
    };
    event.insert("uuid".into(), Value::String(uuid.hyphenated().to_string()));
    event.insert("distinct_id".into(), Value::String(distinct_id));
    let size = json_size(&event);
    if size > max_bytes {
        return fail(format!(
            "event is {size} bytes of JSON, more than the limit of {max_bytes}"
        ));
    }
    Ok(event)
}

/// distinct ids may arrive as strings, numbers or objects; all are kept as text.
fn distinct_id_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(s) => s.trim().to_owned(),
        Value::Null => return None,
        other => other.to_string(),
    };
    if text.is_empty()
        || text.eq_ignore_ascii_case("undefined")
        || text.eq_ignore_ascii_case("null")
    {
        return None;
    }
    Some(text.chars().take(MAX_DISTINCT_ID_CHARS).collect())
}

/// Size of the event's JSON encoding, computed without allocating it.
fn json_size(value: &Map<String, Value>) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_shapes_and_token_places() {
        let p = parse_request(json!({"api_key": "phc_a", "batch": [{"event": "e", "distinct_id": 5}], "sent_at": "2026-01-01T00:00:00Z"}), None, 1 << 20).unwrap();
        assert_eq!(p.token, "phc_a");
        assert!(p.sent_at.is_some());
        assert_eq!(p.accepted[0]["distinct_id"], "5");
        let p = parse_request(
            json!([{"event": "e", "properties": {"token": "phc_b", "distinct_id": "x"}}]),
            None,
            1 << 20,
        )
        .unwrap();
        assert_eq!(p.token, "phc_b");
        let p = parse_request(
            json!({"event": "e", "$token": "phc_c", "distinct_id": "x"}),
            None,
            1 << 20,
        )
        .unwrap();
        assert_eq!(p.token, "phc_c");
        let p = parse_request(
            json!({"event": "e", "distinct_id": "x"}),
            Some("phc_q"),
            1 << 20,
        )
        .unwrap();
        assert_eq!(p.token, "phc_q");
    }

    #[test]
    fn token_errors() {
        let missing = parse_request(json!({"event": "e", "distinct_id": "x"}), None, 1 << 20);
        assert!(matches!(missing, Err(CaptureError::MissingToken)));
        let personal = parse_request(json!({"api_key": "phx_secret", "batch": []}), None, 1 << 20);
        assert!(matches!(personal, Err(CaptureError::PersonalApiKey)));
        let mixed = parse_request(
            json!([{"event": "e", "token": "phc_a"}, {"event": "e", "token": "phc_b"}]),
            None,
            1 << 20,
        );
        assert!(matches!(mixed, Err(CaptureError::TokenMismatch)));
    }

    #[test]
    fn each_event_is_judged_on_its_own() {
        let p = parse_request(
            json!({"api_key": "phc_a", "batch": [
                {"event": "ok", "distinct_id": "a", "uuid": "0190A0B0-0000-7000-8000-000000000001"},
                {"distinct_id": "a"},
                {"event": "e"},
                {"event": "e", "distinct_id": "a", "uuid": "nope"},
                {"event": "e", "distinct_id": "a", "properties": []},
                7
            ]}),
            None,
            1 << 20,
        )
        .unwrap();
        assert_eq!(p.accepted.len(), 1);
        assert_eq!(
            p.accepted[0]["uuid"],
            "0190a0b0-0000-7000-8000-000000000001"
        );
        let errors: Vec<_> = p
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
    }

    #[test]
    fn oversized_events_and_deep_nesting_are_refused() {
        let big = "x".repeat(2000);
        let p = parse_request(json!({"api_key": "phc_a", "batch": [{"event": "e", "distinct_id": "a", "properties": {"big": big}}]}), None, 1000).unwrap();
        assert!(
            p.rejected[0].error.contains("more than the limit of 1000"),
            "{:?}",
            p.rejected
        );
        let deep = "[".repeat(500) + &"]".repeat(500);
        let err = parse_json(deep.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("nested deeper than 128"), "{err}");
        assert!(matches!(
            parse_json(b"{\"a\": \"\xff\"}"),
            Err(CaptureError::InvalidUtf8 { offset: 7 })
        ));
    }
}
