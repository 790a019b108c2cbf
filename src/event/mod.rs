//! Events: the shapes an event takes between modules (normalised and queued: [`IngestBatch`] of
//! [`EventRow`]s, which is also what a sink stores), and PostHog's pure rules that turn a
//! captured event into that row ([`normalize`], [`timestamp`]).
//!
//! Owns: those types, the versioned binary encoding of an ingest batch in the queue, and the
//! normalisation rules, applied where events enter the queue (capture and the sources).
//! Must never: do I/O; every function here depends only on its arguments.

pub mod cookieless;
pub mod geo;
pub mod normalize;
pub mod properties;
pub mod timestamp;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{self, CodecError};
use crate::ids::TeamId;

/// Format version of an encoded [`IngestBatch`]: the first byte of every queue value.
pub const INGEST_FORMAT: u8 = 1;

/// The normalised events of one capture request (or one source message), exactly as they will
/// be replayed after a crash: everything is decided before the batch is durable, so writing it
/// twice gives the same rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestBatch {
    pub team_id: TeamId,
    /// When the server received the request: the `now` of PostHog's timestamp rules.
    #[serde(with = "micros")]
    pub received_at: DateTime<Utc>,
    /// The client's send time, if it said (kept for plugins, which see PostHog's `sent_at`).
    #[serde(with = "micros_opt")]
    pub sent_at: Option<DateTime<Utc>>,
    /// The client IP of the request, if known.
    pub ip: Option<String>,
    pub events: Vec<EventRow>,
}

/// An event in the columns of PostHog's event tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    pub uuid: Uuid,
    pub event: String,
    pub distinct_id: String,
    /// The properties as JSON object text, ready to store.
    pub properties: String,
    #[serde(with = "micros")]
    pub timestamp: DateTime<Utc>,
    pub elements_chain: String,
}

/// JavaScript's truthiness of a JSON value (PostHog's rules test flags and ids that way).
pub fn truthy(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// Deepest JSON nesting an event may have (serde_json's own limit when it builds values; the
/// same for what plugins return).
pub const MAX_JSON_DEPTH: usize = 128;

/// True if `text` (JSON) nests no deeper than `max` arrays and objects, in one pass over its
/// bytes without building anything.
pub fn json_depth_within(text: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// The text form of a stored time: RFC 3339, UTC, microseconds, fixed width, so that text order
/// is time order.
pub fn timestamp_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl IngestBatch {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(INGEST_FORMAT, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<IngestBatch, CodecError> {
        codec::decode(INGEST_FORMAT, bytes)
    }
}

/// Times as microseconds since the epoch: compact, and exact for what SDKs send.
pub(crate) mod micros {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(t.timestamp_micros())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let n = i64::deserialize(d)?;
        DateTime::from_timestamp_micros(n)
            .ok_or_else(|| serde::de::Error::custom("time out of range"))
    }
}

mod micros_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&t.timestamp_micros()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<i64>::deserialize(d)? {
            Some(n) => DateTime::from_timestamp_micros(n)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("time out of range")),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_skips_strings_and_escapes() {
        assert!(json_depth_within(r#"{"a":"\"}}}}[[[["}"#, 1));
        assert!(!json_depth_within(r#"{"a":[{"b":[]}]}"#, 3));
    }

    #[test]
    fn batches_round_trip_and_unknown_versions_are_refused() {
        let batch = IngestBatch {
            team_id: 3,
            received_at: DateTime::from_timestamp_micros(1_795_659_924_420_123).unwrap(),
            sent_at: None,
            ip: Some("::1".into()),
            events: vec![EventRow {
                uuid: Uuid::now_v7(),
                event: "$pageview".into(),
                distinct_id: "u".into(),
                properties: r#"{"a":"\"quoted\""}"#.into(),
                timestamp: DateTime::from_timestamp_micros(1_700_000_000_000_001).unwrap(),
                elements_chain: String::new(),
            }],
        };
        let bytes = batch.encode();
        assert_eq!(bytes[0], INGEST_FORMAT);
        assert_eq!(IngestBatch::decode(&bytes).unwrap(), batch);
        let mut future = bytes.clone();
        future[0] = 9;
        assert!(matches!(
            IngestBatch::decode(&future),
            Err(CodecError::Version { found: 9, .. })
        ));
        assert!(matches!(IngestBatch::decode(&[]), Err(CodecError::Empty)));
        assert!(IngestBatch::decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
