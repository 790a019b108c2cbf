//! The fidelity run shared by the sink tests: a merge-heavy sequence of person events and
//! groups, sent with a crash and a kill -9 in the middle, and the rows the embedded SQLite sink
//! holds for the same events undisturbed.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::load::{merge_heavy_events, send_in_order};
use super::{create_team, read_events, read_persons, Appliance, PersonRow, Row, TOKEN};

/// Each event's columns by uuid, as a sink test compares them.
pub fn columns(rows: &[Row]) -> BTreeMap<String, Value> {
    rows.iter()
        .map(|r| {
            let value = json!([
                r.event,
                r.distinct_id,
                r.properties,
                r.elements_chain,
                r.timestamp,
                r.team_id,
                r.person_id,
                r.person_properties,
                r.person_created_at,
                r.person_mode
            ]);
            (r.uuid.clone(), value)
        })
        .collect()
}

/// The merge-heavy sequence of the person tests, then groups.
pub fn fidelity_events() -> Vec<Value> {
    let mut events = merge_heavy_events(60);
    let at = "2026-11-02T00:00:00Z";
    events.push(
        json!({"event": "$groupidentify", "distinct_id": "user1", "timestamp": at,
        "uuid": "00000000-0000-0000-0000-00000000a001",
        "properties": {"$group_type": "company", "$group_key": "acme",
                       "$group_set": {"name": "Acme", "seats": 12}}}),
    );
    events.push(
        json!({"event": "signed", "distinct_id": "user1", "timestamp": at,
        "uuid": "00000000-0000-0000-0000-00000000a002",
        "properties": {"$groups": {"company": "acme", "project": "p-1"}}}),
    );
    events
}

/// Sends the fidelity events with the failpoint armed (an abort right after a lead write, before
/// its deliveries and person changes commit) and a kill -9 later in the load; `env` picks the
/// sinks. Returns the last server, its data directory and the events sent.
pub async fn rough_run(env: &[(&str, &str)]) -> (Appliance, tempfile::TempDir, Vec<Value>) {
    let events = fidelity_events();
    let rough = tempfile::tempdir().unwrap();
    create_team(rough.path(), "t", TOKEN);
    let path = rough.path().to_owned();
    let mut armed = env.to_vec();
    armed.push(("APPLIANCE_FAILPOINTS", "pipeline.after_sink_write"));
    let first = Appliance::start(&path, &armed);
    let (app, restarts) = send_in_order(
        first,
        &events,
        |_| Some(Appliance::start(&path, env)),
        Some(events.len() / 16 / 2),
    )
    .await;
    assert_eq!(
        restarts, 2,
        "the failpoint's abort and the kill -9 both happened"
    );
    (app, rough, events)
}

/// The events and persons the embedded SQLite sink holds for the fidelity events, undisturbed.
pub async fn reference() -> (Vec<Row>, BTreeMap<String, PersonRow>) {
    let calm = tempfile::tempdir().unwrap();
    create_team(calm.path(), "t", TOKEN);
    let app = Appliance::start(calm.path(), &[]);
    let (app, _) = send_in_order(app, &fidelity_events(), |_| None, None).await;
    (
        read_events(&app.sqlite_path()),
        read_persons(&app.sqlite_path()),
    )
}
