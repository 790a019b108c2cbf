//! Replays every request recorded from the real PostHog SDKs (tests/fixtures/sdk) against the
//! real server, then checks every stored field against what the SDK sent.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use appliance::person::rules::EVENT_TO_PERSON_PROPERTIES;
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use common::{create_team, read_events, Appliance, TOKEN};
use serde_json::{Map, Value};

/// Events that a personless event may not be: PostHog drops them.
const PERSON_EVENTS: [&str; 4] = [
    "$identify",
    "$create_alias",
    "$merge_dangerously",
    "$groupidentify",
];

fn personless(properties: &Value) -> bool {
    properties.get("$process_person_profile") == Some(&Value::Bool(false))
}

/// What PostHog's ingestion does to an event's properties on the way to its row: the automatic
/// person properties (plugin-server `person-property-utils.ts`, whose list the appliance keeps
/// as `EVENT_TO_PERSON_PROPERTIES`: `$set` and `$initial_*` in `$set_once`), `$process_person_profile` handling (`normalizeProcessPerson`), group indexes
/// in the order types are first seen (`groups.ts`), and no person or group keys on personless
/// events (`create-event.ts`).
fn person_step(want: &mut Map<String, Value>, event: &str, group_types: &mut Vec<String>) {
    let personless = personless(&Value::Object(want.clone()));
    if personless {
        for key in ["$set", "$set_once", "$unset"] {
            want.remove(key);
        }
    } else {
        want.remove("$process_person_profile");
        let is_server = want.get("$is_server") == Some(&Value::Bool(true));
        let mut set = Map::new();
        let mut set_once = Map::new();
        if !matches!(event, "$snapshot" | "$performance_event") {
            for key in EVENT_TO_PERSON_PROPERTIES {
                let Some(value) = want.get(key).cloned() else {
                    continue;
                };
                let person_key = if key == "$os_name" { "$os" } else { key };
                if is_server && matches!(person_key, "$os" | "$os_version") {
                    continue;
                }
                set.entry(person_key).or_insert(value.clone());
                if !value.is_null() {
                    set_once
                        .entry(format!("$initial_{}", &person_key[1..]))
                        .or_insert(value);
                }
            }
        }
        for (name, extra) in [("$set", set), ("$set_once", set_once)] {
            if extra.is_empty() {
                continue;
            }
            let target = want
                .entry(name)
                .or_insert_with(|| Value::Object(Map::new()));
            let target = target.as_object_mut().unwrap();
            for (k, v) in extra {
                target.entry(k).or_insert(v);
            }
        }
    }
    let mut index_of = |name: &str| {
        let at = group_types
            .iter()
            .position(|t| t == name)
            .unwrap_or_else(|| {
                group_types.push(name.to_owned());
                group_types.len() - 1
            });
        (at < 5).then_some(at)
    };
    if event == "$groupidentify" {
        if let Some(t) = want.get("$group_type").and_then(Value::as_str) {
            index_of(t);
        }
    }
    if let Some(Value::Object(groups)) = want.get("$groups").cloned() {
        for (t, key) in groups {
            if let Some(i) = index_of(&t) {
                want.insert(format!("$group_{i}"), key);
            }
        }
    }
    if personless {
        for i in 0..5 {
            want.remove(&format!("$group_{i}"));
        }
    }
}

struct Fixture {
    name: String,
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    decoded: Value,
}

fn fixtures() -> Vec<Fixture> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdk");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fixtures directory") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let raw: Value = serde_json::from_slice(&std::fs::read(&path).expect("read fixture"))
            .expect("fixture JSON");
        let body = base64::engine::general_purpose::STANDARD
            .decode(raw["body_base64"].as_str().expect("body_base64"))
            .expect("fixture body is base64");
        let decoded = match &raw["body_decoded"] {
            Value::Null => raw["body_text_if_utf8"]
                .as_str()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(Value::Null),
            v => v.clone(),
        };
        out.push(Fixture {
            name: path.file_name().unwrap().to_string_lossy().into_owned(),
            method: raw["method"].as_str().unwrap().to_owned(),
            path: raw["path"].as_str().unwrap().to_owned(),
            query: raw["query"].as_str().unwrap_or("").to_owned(),
            headers: raw["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap().to_owned(),
                        h[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
            body,
            decoded,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The events a fixture carries, with the send time the server should use for them.
fn events_of(f: &Fixture) -> (Vec<Map<String, Value>>, Option<DateTime<Utc>>) {
    let query_sent_at = f
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("_="))
        .and_then(|ms| ms.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis);
    let body_time = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    match &f.decoded {
        Value::Object(o) if o.contains_key("batch") => {
            let sent = body_time(o.get("sent_at")).or_else(|| body_time(o.get("created_at")));
            let events = o["batch"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_object().unwrap().clone())
                .collect();
            (events, sent.or(query_sent_at))
        }
        Value::Array(a) => (
            a.iter().map(|e| e.as_object().unwrap().clone()).collect(),
            query_sent_at,
        ),
        Value::Object(o) => (vec![o.clone()], query_sent_at),
        _ => (vec![], None),
    }
}

/// An event as an SDK sent it, with its request's send time and the window in which the server
/// received it.
struct SentEvent {
    event: Map<String, Value>,
    sent_at: Option<DateTime<Utc>>,
    before: DateTime<Utc>,
    after: DateTime<Utc>,
}

fn is_flags_request(f: &Fixture) -> bool {
    f.path.starts_with("/decide") || f.path.starts_with("/flags")
}

#[tokio::test]
async fn every_recorded_sdk_request_is_accepted_and_stored_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let team_id = create_team(dir.path(), "fixtures", TOKEN);
    let app = Appliance::start(dir.path(), &[]);
    let client = reqwest::Client::new();
    let fixtures = fixtures();
    assert_eq!(fixtures.len(), 43, "all 43 recorded requests are replayed");

    let mut sent: HashMap<String, SentEvent> = HashMap::new();
    for f in &fixtures {
        let url = if f.query.is_empty() {
            app.url(&f.path)
        } else {
            app.url(&format!("{}?{}", f.path, f.query))
        };
        let mut request = client
            .request(f.method.parse().unwrap(), url)
            .body(f.body.clone());
        for (name, value) in &f.headers {
            if !["host", "content-length", "connection"]
                .contains(&name.to_ascii_lowercase().as_str())
            {
                request = request.header(name, value);
            }
        }
        let before = Utc::now();
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let after = Utc::now();
        let status = response.status();
        let origin = f
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("origin"))
            .map(|(_, v)| v.clone());
        if let Some(origin) = origin {
            assert_eq!(
                response.headers()["access-control-allow-origin"],
                origin.as_str(),
                "{}: CORS echoes the origin",
                f.name
            );
            assert_eq!(
                response.headers()["access-control-allow-credentials"],
                "true",
                "{}",
                f.name
            );
        }
        let body: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{}: JSON answer: {e}", f.name));
        assert_eq!(status, 200, "{}: {body}", f.name);
        if is_flags_request(f) {
            assert_eq!(
                body["featureFlags"],
                serde_json::json!({}),
                "{}: no flags",
                f.name
            );
            continue;
        }
        if f.path.starts_with("/i/v1/") {
            let results = body["results"].as_object().expect("v1 answers results");
            assert!(
                results.values().all(|r| r["result"] == "ok"),
                "{}: {body}",
                f.name
            );
        } else {
            assert_eq!(body, serde_json::json!({"status": 1}), "{}", f.name);
        }
        let (events, sent_at) = events_of(f);
        assert!(!events.is_empty(), "{}: the fixture carries events", f.name);
        for e in events {
            let uuid = e["uuid"].as_str().expect("SDKs send a uuid").to_owned();
            sent.insert(
                uuid,
                SentEvent {
                    event: e,
                    sent_at,
                    before,
                    after,
                },
            );
        }
    }
    app.wait_drained().await;

    let rows = read_events(&app.sqlite_path());
    let dropped = sent
        .values()
        .filter(|s| {
            personless(&s.event["properties"])
                && PERSON_EVENTS.contains(&s.event["event"].as_str().unwrap_or_default())
        })
        .count();
    assert_eq!(
        rows.len(),
        sent.len() - dropped,
        "every event is stored exactly once (personless person events are dropped)"
    );
    let mut group_types: Vec<String> = Vec::new();
    for row in rows {
        let SentEvent {
            event: e,
            sent_at,
            before,
            after,
        } = sent
            .get(&row.uuid)
            .unwrap_or_else(|| panic!("unexpected row {row:?}"));
        let ctx = format!("event {} ({})", row.uuid, row.event);
        assert_eq!(row.event, e["event"].as_str().unwrap(), "{ctx}");
        assert_eq!(row.team_id as u64, team_id, "{ctx}");
        let distinct_id = e
            .get("distinct_id")
            .or_else(|| e["properties"].get("distinct_id"))
            .and_then(Value::as_str)
            .unwrap();
        assert_eq!(row.distinct_id, distinct_id, "{ctx}");

        // Properties: as sent, with top-level $set/$set_once merged in and the request IP added.
        let mut want = e["properties"].as_object().cloned().unwrap_or_default();
        for key in ["$set", "$set_once"] {
            if let Some(Value::Object(top)) = e.get(key) {
                let target = want.entry(key).or_insert_with(|| Value::Object(Map::new()));
                target.as_object_mut().unwrap().extend(top.clone());
            }
        }
        want.entry("$ip")
            .or_insert_with(|| Value::String("127.0.0.1".into()));
        person_step(&mut want, &row.event, &mut group_types);
        let chain = want.remove("$elements").map(|_| ()).is_some();
        want.remove("$elements_chain");
        assert_eq!(row.properties, Value::Object(want), "{ctx}");
        assert!(
            !chain || !row.elements_chain.is_empty(),
            "{ctx}: autocapture elements become a chain"
        );

        // Timestamp: PostHog's skew correction, relative to when the server received it.
        let stored = DateTime::parse_from_rfc3339(&row.timestamp)
            .expect("stored timestamp is RFC 3339")
            .with_timezone(&Utc);
        let client_ts = e
            .get("timestamp")
            .and_then(Value::as_str)
            .map(|t| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc));
        let (low, high) = if let Some(offset) = e.get("offset").and_then(Value::as_i64) {
            (
                *before - Duration::milliseconds(offset),
                *after - Duration::milliseconds(offset),
            )
        } else {
            match (client_ts, sent_at) {
                (Some(ts), Some(sent)) => (*before + (ts - *sent), *after + (ts - *sent)),
                (Some(ts), None) => (ts, ts),
                (None, _) => (*before, *after),
            }
        };
        let slack = Duration::milliseconds(1);
        assert!(
            stored >= low - slack && stored <= high + slack,
            "{ctx}: stored {stored}, expected between {low} and {high}"
        );
        let created =
            DateTime::parse_from_rfc3339(&row.created_at).expect("created_at is RFC 3339");
        assert!(
            created.with_timezone(&Utc) >= *before,
            "{ctx}: created_at is the write time"
        );
    }
}
