//! The message PostHog's capture writes to `events_plugin_ingestion`: an envelope (`uuid`,
//! `distinct_id`, `ip`, `data` as a JSON string, `now`, `sent_at`, `token`; older producers
//! `team_id` and `site_url`) around the SDK's event.
//!
//! Owns: reading the envelope and merging it with `data` as current PostHog does (the
//! envelope's fields win). Must never: accept a message without a team (token or team id), a
//! `now`, or an event.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::sources::message_time;

/// One event read from a message, before its team is looked up and it is normalised.
#[derive(Debug, PartialEq)]
pub struct KafkaEvent {
    pub token: Option<String>,
    pub team_id: Option<u64>,
    pub ip: Option<String>,
    pub now: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub event: Map<String, Value>,
}

/// Reads one message's payload.
pub fn parse(payload: &[u8]) -> Result<KafkaEvent, String> {
    let Value::Object(mut envelope) =
        serde_json::from_slice(payload).map_err(|e| format!("not a JSON message: {e}"))?
    else {
        return Err("the message is not a JSON object".into());
    };
    let mut event = match envelope.remove("data") {
        Some(Value::String(text)) => match serde_json::from_str(&text) {
            Ok(Value::Object(data)) => data,
            _ => return Err("data is not a JSON object in a string".into()),
        },
        Some(Value::Object(data)) => data,
        _ => return Err("the message has no data".into()),
    };
    let token = envelope
        .get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    let team_id = match envelope.get("team_id") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    if token.is_none() && team_id.is_none() {
        return Err("the message names no team (token or team_id)".into());
    }
    let now = message_time(envelope.get("now"))?.ok_or("the message has no now")?;
    let sent_at = message_time(envelope.get("sent_at"))?;
    let ip = envelope
        .get("ip")
        .and_then(Value::as_str)
        .filter(|ip| !ip.is_empty())
        .map(str::to_owned);
    // The envelope's fields win (current PostHog: `{...data, ...envelope}`); its transport
    // fields are not the event's.
    for (key, value) in envelope {
        if !matches!(
            key.as_str(),
            "token" | "team_id" | "now" | "sent_at" | "ip" | "site_url" | "data"
        ) {
            event.insert(key, value);
        }
    }
    if !event.contains_key("distinct_id") {
        return Err("the message has no distinct_id".into());
    }
    Ok(KafkaEvent {
        token,
        team_id,
        ip,
        now,
        sent_at,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_rust_capture_message_merges_with_the_envelope_winning() {
        let data = json!({"event": "$pageview", "distinct_id": "from-data",
                          "properties": {"a": 1}, "timestamp": "2026-11-02T10:00:00Z"});
        let message = json!({"uuid": "0190a0b0-0000-7000-8000-000000000001",
            "distinct_id": "d1", "ip": "1.2.3.4", "data": data.to_string(),
            "now": "2026-11-02T10:00:01.5Z", "sent_at": "2026-11-02T10:00:01Z",
            "token": "phc_x", "event": "$pageview", "timestamp": "2026-11-02T10:00:00Z"});
        let event = parse(message.to_string().as_bytes()).unwrap();
        assert_eq!(event.token.as_deref(), Some("phc_x"));
        assert_eq!(event.event["distinct_id"], "d1", "the envelope wins");
        assert_eq!(event.event["uuid"], "0190a0b0-0000-7000-8000-000000000001");
        assert_eq!(event.event["properties"]["a"], 1);
        assert!(!event.event.contains_key("token") && !event.event.contains_key("now"));
        assert_eq!(event.ip.as_deref(), Some("1.2.3.4"));
        assert!(event.sent_at.is_some());
    }

    #[test]
    fn the_older_team_id_form_and_refusals() {
        let message = json!({"uuid": "0190a0b0-0000-7000-8000-000000000002", "distinct_id": "d",
            "ip": "", "site_url": "http://x", "data": "{\"event\": \"e\"}", "team_id": 3,
            "now": "2026-11-02T10:00:00", "sent_at": ""});
        let event = parse(message.to_string().as_bytes()).unwrap();
        assert_eq!(
            (event.team_id, event.ip, event.sent_at),
            (Some(3), None, None)
        );
        assert!(parse(b"{").unwrap_err().contains("JSON"));
        let no_team = json!({"distinct_id": "d", "data": "{}", "now": "2026-11-02T10:00:00Z"});
        assert!(parse(no_team.to_string().as_bytes())
            .unwrap_err()
            .contains("team"));
    }
}
