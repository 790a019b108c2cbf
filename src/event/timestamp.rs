//! PostHog's rules for an event's stored timestamp: the client's time, corrected for the
//! client's clock skew by `sent_at`, or derived from `offset`; never far in the future.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::{Map, Value};

/// How far ahead of the server's clock an event may claim to be before it is clamped to now.
const MAX_FUTURE: Duration = Duration::hours(23);

/// Something about the timestamp the operator may want to know; the event is still stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampWarning {
    /// Claimed a time more than 23 hours ahead; stored at `now`.
    InFuture,
    /// The computed time was out of range; stored at the Unix epoch.
    OutOfRange,
    /// A `timestamp` was given that is not a time; the event's time came from the rest.
    Unparseable,
}

impl TimestampWarning {
    /// The ingestion warning PostHog records for it, and why.
    pub fn kind_and_reason(self) -> (&'static str, &'static str) {
        match self {
            TimestampWarning::InFuture => (
                "event_timestamp_in_future",
                "more than 23 hours in the future; stored at the time it was received",
            ),
            TimestampWarning::OutOfRange => (
                "ignored_invalid_timestamp",
                "out of range; stored at 1970-01-01",
            ),
            TimestampWarning::Unparseable => (
                "ignored_invalid_timestamp",
                "not a time; the time it was received (or its offset) was used",
            ),
        }
    }
}

/// Parses a time as SDKs send it: RFC 3339 / ISO 8601 with or without an offset (naive means
/// UTC), space-separated, a date alone, RFC 2822, or a number of seconds or milliseconds since
/// the epoch (as a number or a string).
pub fn parse_client_time(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::String(s) => parse_time_text(s.trim()),
        Value::Number(n) => n.as_f64().and_then(from_epoch_number),
        _ => None,
    }
}

fn parse_time_text(s: &str) -> Option<DateTime<Utc>> {
    if s.is_empty() {
        return None;
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // ISO 8601 variants chrono's RFC 3339 parser refuses: space separator, `+0000` offsets.
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f%z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| Utc.from_utc_datetime(&t));
    }
    if let Ok(t) = DateTime::parse_from_rfc2822(s) {
        return Some(t.with_timezone(&Utc));
    }
    s.parse::<f64>().ok().and_then(from_epoch_number)
}

/// Seconds or milliseconds since the epoch; values past the year 5138 in seconds are
/// milliseconds, which covers every plausible clock.
fn from_epoch_number(n: f64) -> Option<DateTime<Utc>> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let millis = if n > 1e11 { n } else { n * 1000.0 };
    DateTime::from_timestamp_millis(millis as i64)
}

/// The client send time from the query's `_` (epoch milliseconds). Values before 2021 are
/// ignored: they are seconds sent by mistake, or garbage.
pub fn sent_at_from_query_millis(text: &str) -> Option<DateTime<Utc>> {
    const EARLIEST: i64 = 1_609_459_200_000; // 2021-01-01T00:00:00Z
    let millis: i64 = text.trim().parse().ok()?;
    if millis < EARLIEST {
        return None;
    }
    DateTime::from_timestamp_millis(millis)
}

/// Computes the stored timestamp of `event` (its fields other than `properties`) received at
/// `now`; `ignore_sent_at` is its `$ignore_sent_at` property.
pub fn event_timestamp(
    now: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    ignore_sent_at: bool,
    event: &Map<String, Value>,
) -> (DateTime<Utc>, Option<TimestampWarning>) {
    let sent_at = if ignore_sent_at { None } else { sent_at };

    let mut result = Some(now);
    let mut unparseable = false;
    if let Some(given) = event.get("timestamp").filter(|t| !t.is_null()) {
        match parse_client_time(given) {
            Some(client) => {
                result = match sent_at {
                    Some(sent) => now.checked_add_signed(client.signed_duration_since(sent)),
                    None => Some(client),
                };
            }
            None => unparseable = true,
        }
    }
    if let Some(offset) = event.get("offset").and_then(Value::as_i64) {
        result = Duration::try_milliseconds(offset).and_then(|d| now.checked_sub_signed(d));
    }
    match result {
        Some(t) if t.signed_duration_since(now) > MAX_FUTURE => {
            (now, Some(TimestampWarning::InFuture))
        }
        Some(t) if (0..=9999).contains(&chrono::Datelike::year(&t)) => {
            (t, unparseable.then_some(TimestampWarning::Unparseable))
        }
        _ => (DateTime::UNIX_EPOCH, Some(TimestampWarning::OutOfRange)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// The timestamp of a whole event, `$ignore_sent_at` read from its properties.
    fn stamp(
        now: DateTime<Utc>,
        sent_at: Option<DateTime<Utc>>,
        e: &Map<String, Value>,
    ) -> (DateTime<Utc>, Option<TimestampWarning>) {
        let ignore = e
            .get("properties")
            .and_then(|p| p.get("$ignore_sent_at"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        event_timestamp(now, sent_at, ignore, e)
    }

    fn event(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn client_clock_skew_is_cancelled_by_sent_at() {
        // The example from PostHog's docs: client clock 5 s ahead.
        let now = at("2026-01-01T12:00:00Z");
        let e = event(json!({"timestamp": "2026-01-01T11:59:55Z"}));
        let (t, w) = stamp(now, Some(at("2026-01-01T12:00:05Z")), &e);
        assert_eq!(t, at("2026-01-01T11:59:50Z"));
        assert_eq!(w, None);
    }

    #[test]
    fn without_sent_at_the_client_timestamp_is_kept() {
        let now = at("2026-01-01T12:00:00Z");
        let e = event(json!({"timestamp": "2024-01-02T03:04:05+00:00"}));
        assert_eq!(stamp(now, None, &e).0, at("2024-01-02T03:04:05Z"));
    }

    #[test]
    fn ignore_sent_at_keeps_historical_timestamps() {
        let now = at("2026-01-01T12:00:00Z");
        let e = event(
            json!({"timestamp": "2020-05-05T00:00:00Z", "properties": {"$ignore_sent_at": true}}),
        );
        assert_eq!(
            stamp(now, Some(at("2026-01-01T12:00:05Z")), &e).0,
            at("2020-05-05T00:00:00Z")
        );
    }

    #[test]
    fn offset_counts_back_from_now_and_wins() {
        let now = at("2026-01-01T12:00:00Z");
        let e = event(json!({"offset": 1500, "timestamp": "2000-01-01T00:00:00Z"}));
        assert_eq!(stamp(now, None, &e).0, at("2026-01-01T11:59:58.500Z"));
    }

    #[test]
    fn the_far_future_is_clamped_and_nonsense_becomes_now() {
        let now = at("2026-01-01T12:00:00Z");
        let e = event(json!({"timestamp": "2026-01-02T12:00:00Z"}));
        assert_eq!(
            stamp(now, None, &e),
            (now, Some(TimestampWarning::InFuture))
        );
        let e = event(json!({"timestamp": "2026-01-02T10:00:00Z"}));
        assert_eq!(stamp(now, None, &e).0, at("2026-01-02T10:00:00Z"));
        let e = event(json!({"timestamp": "not a time"}));
        assert_eq!(
            stamp(now, None, &e),
            (now, Some(TimestampWarning::Unparseable))
        );
        let e = event(json!({"offset": i64::MAX}));
        assert_eq!(stamp(now, None, &e).1, Some(TimestampWarning::OutOfRange));
    }

    #[test]
    fn many_time_spellings_parse() {
        let want = at("2024-01-02T03:04:05Z");
        for text in [
            "2024-01-02T03:04:05Z",
            "2024-01-02T03:04:05.000+00:00",
            "2024-01-02T04:04:05+01:00",
            "2024-01-02 03:04:05",
            "2024-01-02T03:04:05",
            "2024-01-02T03:04:05+0000",
            "Tue, 02 Jan 2024 03:04:05 +0000",
            "1704164645",
            "1704164645000",
        ] {
            assert_eq!(parse_client_time(&json!(text)), Some(want), "{text}");
        }
        assert_eq!(parse_client_time(&json!(1704164645)), Some(want));
        assert_eq!(
            parse_client_time(&json!("2024-01-02")),
            Some(at("2024-01-02T00:00:00Z"))
        );
        assert_eq!(sent_at_from_query_millis("1704164645000"), Some(want));
        assert_eq!(
            sent_at_from_query_millis("1704164645"),
            None,
            "seconds are ignored"
        );
    }
}
