//! Event sequences the person tests (and the sinks' fidelity tests) send, and sending them in
//! order through restarts.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use super::{Appliance, TOKEN};

/// A deterministic, merge-heavy sequence: per user, two anonymous devices with properties, a
/// login merging each, set_once/unset, an alias and a personless event.
pub fn merge_heavy_events(users: usize) -> Vec<Value> {
    let start = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").unwrap();
    let mut events = Vec::new();
    let mut n = 0u128;
    let mut push = |events: &mut Vec<Value>, name: &str, id: String, props: Value| {
        n += 1;
        let at = start + chrono::TimeDelta::seconds(n as i64);
        events.push(
            json!({"event": name, "distinct_id": id, "uuid": Uuid::from_u128(n).to_string(),
            "timestamp": at.to_rfc3339(), "properties": props}),
        );
    };
    for u in 0..users {
        let (a, b, user) = (format!("a{u}"), format!("b{u}"), format!("user{u}"));
        push(
            &mut events,
            "$pageview",
            a.clone(),
            json!({"$browser": "Firefox", "$set": {"device": "a", "n": u}}),
        );
        push(
            &mut events,
            "$pageview",
            b.clone(),
            json!({"$browser": "Safari", "$set": {"device": "b", "b_only": u}}),
        );
        push(
            &mut events,
            "$identify",
            user.clone(),
            json!({"$anon_distinct_id": a, "$set": {"email": format!("{u}@x")}}),
        );
        push(
            &mut events,
            "$set",
            user.clone(),
            json!({"$set_once": {"first": u}, "$unset": ["n"]}),
        );
        push(
            &mut events,
            "$identify",
            user.clone(),
            json!({"$anon_distinct_id": b}),
        );
        push(
            &mut events,
            "$create_alias",
            user.clone(),
            json!({"alias": format!("alias{u}")}),
        );
        push(
            &mut events,
            "$pageview",
            format!("p{u}"),
            json!({"$process_person_profile": false}),
        );
        push(
            &mut events,
            "$identify",
            format!("alias{u}"),
            json!({"$anon_distinct_id": format!("p{u}"), "$set": {"late": true}}),
        );
    }
    events
}

/// Sends `events` in order, 16 per request, one request at a time; when the server goes away,
/// `restart` brings up the next one and the unacknowledged request is sent again.
pub async fn send_in_order(
    mut app: Appliance,
    events: &[Value],
    mut restart: impl FnMut(usize) -> Option<Appliance>,
    kill_at: Option<usize>,
) -> (Appliance, usize) {
    let client = reqwest::Client::new();
    let chunks: Vec<&[Value]> = events.chunks(16).collect();
    let mut i = 0;
    let mut restarts = 0;
    while i < chunks.len() {
        if Some(i) == kill_at && restarts == 1 {
            app.kill9();
            restarts += 1;
            app = restart(restarts).expect("a restart");
        }
        let sent = client
            .post(app.url("/batch/"))
            .json(&json!({"api_key": TOKEN, "batch": chunks[i]}))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => i += 1,
            Ok(r) if r.status() == 503 => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => {
                // The server aborted (the failpoint): start the next one, send the request again.
                restarts += 1;
                app = restart(restarts).expect("a restart");
            }
        }
    }
    app.wait_drained().await;
    (app, restarts)
}
