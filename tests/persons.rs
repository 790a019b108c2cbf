//! Persons, distinct ids and groups, as PostHog's ingestion keeps them: the real posthog-python
//! SDK through identify, alias and merge scenarios; a person's deletion; ingestion warnings;
//! and a kill -9 in the middle of a merge-heavy load, after which every person and version is
//! what the same events give without the kill.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::load::{merge_heavy_events, send_in_order};
use common::{
    cli, create_team, drive, read_events, read_persons, send_batch, Api, Appliance, Row, TOKEN,
};
use serde_json::{json, Value};
use uuid::Uuid;

/// PostHog's person uuid for a distinct id of team `team`.
fn person_uuid(team: u64, distinct_id: &str) -> String {
    let namespace = Uuid::parse_str("932979b4-65c3-4424-8467-0b66ec27bc22").unwrap();
    Uuid::new_v5(&namespace, format!("{team}:{distinct_id}").as_bytes()).to_string()
}

fn show(dir: &std::path::Path, team: u64, id: &str) -> Value {
    let out = cli(
        dir,
        &["persons", "show", "--team", &team.to_string(), id, "--json"],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn warnings(dir: &std::path::Path, team: u64) -> Vec<Value> {
    cli(
        dir,
        &["persons", "warnings", "--team", &team.to_string(), "--json"],
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}

fn rows_of<'a>(rows: &'a [Row], distinct_id: &str) -> Vec<&'a Row> {
    rows.iter()
        .filter(|r| r.distinct_id == distinct_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_python_identify_alias_and_merge_scenarios_give_posthogs_persons() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "persons", TOKEN);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    let sent = tokio::task::block_in_place(|| drive("python3", "persons_sdk.py", &app, &[]));
    app.wait_drained().await;
    let rows = read_events(&app.sqlite_path());
    let persons = read_persons(&app.sqlite_path());
    let uuid = |id: &str| person_uuid(team, id);

    // 1. Anonymous browsing then login: one person, the anonymous id's, for every event.
    for row in rows_of(&rows, "anon-1")
        .into_iter()
        .chain(rows_of(&rows, "user-1"))
    {
        assert_eq!(
            row.person_id.as_deref(),
            Some(uuid("anon-1").as_str()),
            "{row:?}"
        );
        assert_eq!(row.person_mode, "full");
    }
    let one = show(dir.path(), team, "user-1");
    assert_eq!(one["person"]["uuid"], uuid("anon-1"));
    assert_eq!(one["person"]["is_identified"], true);
    let props = &one["person"]["properties"];
    assert_eq!(props["plan"], "free");
    assert_eq!(props["email"], "one@example.com");
    assert_eq!(props["$initial_browser"], "Firefox");
    assert_eq!(props["$browser"], "Firefox");
    assert_eq!(props["$creator_event_uuid"], sent[0]["uuid"]);
    // Created (0), $set plan (1), identified with an email (2); the last pageview changes nothing.
    assert_eq!(one["person"]["version"], 2);
    assert_eq!(one["distinct_ids"], json!([["anon-1", 0], ["user-1", 0]]));
    let identify = rows_of(&rows, "user-1")[0];
    assert_eq!(identify.person_properties["email"], "one@example.com");
    assert_eq!(identify.person_properties["plan"], "free");
    // The sink's tables hold the same person.
    let stored = &persons[&uuid("anon-1")];
    assert_eq!(stored.version, 2);
    assert_eq!(stored.properties, *props);
    assert_eq!(
        stored.distinct_ids,
        vec![("anon-1".to_owned(), 0), ("user-1".to_owned(), 0)]
    );

    // 2. Two devices then login: the laptop's person merges into the user's (the phone's).
    let two = show(dir.path(), team, "laptop-2");
    assert_eq!(two["person"]["uuid"], uuid("phone-2"));
    assert_eq!(
        two["person"]["properties"]["device"], "phone",
        "the target's properties win"
    );
    assert_eq!(two["person"]["properties"]["laptop_only"], true);
    // phone: created 0, identified 1; laptop: 0; merged: max(1, 0) + 1.
    assert_eq!(two["person"]["version"], 2);
    assert_eq!(
        two["distinct_ids"],
        json!([["laptop-2", 1], ["phone-2", 0], ["user-2", 0]])
    );
    assert!(
        !persons.contains_key(&uuid("laptop-2")),
        "the merged-away person is deleted in the sink"
    );
    assert_eq!(persons[&uuid("phone-2")].distinct_ids.len(), 3);

    // 3. An alias onto an identified person is refused with a warning; 4. merging dangerously
    // is not, and the event's own distinct id's person survives.
    let warned = warnings(dir.path(), team);
    let kinds: Vec<&str> = warned.iter().filter_map(|w| w["kind"].as_str()).collect();
    assert!(
        kinds.contains(&"cannot_merge_already_identified"),
        "{warned:?}"
    );
    // Both ids of user-3's $identify were new: the person's uuid is the event's own id's.
    let three = show(dir.path(), team, "user-4");
    assert_eq!(three["person"]["uuid"], uuid("user-3"));
    assert_eq!(three["person"]["properties"]["four"], true);
    assert!(!persons.contains_key(&uuid("user-4")));
    assert_eq!(
        rows_of(&rows, "user-3").len(),
        3,
        "the refused alias is still stored"
    );

    // 5. Illegal ids never merge, and their events are stored.
    assert!(kinds.contains(&"cannot_merge_with_illegal_distinct_id"));
    assert_eq!(
        show(dir.path(), team, "user-5")["distinct_ids"],
        json!([["user-5", 0]])
    );
    assert_eq!(rows_of(&rows, "null").len(), 1);
    assert_eq!(
        rows_of(&rows, "null")[0].person_id.as_deref(),
        Some(uuid("null").as_str())
    );

    // 6. Personless: the event gets the placeholder person; a personless $identify is dropped;
    // the later login's person takes the anonymous id's uuid, so earlier events point at it.
    let personless = rows_of(&rows, "anon-6");
    assert_eq!(personless.len(), 1, "the personless $identify is dropped");
    let p = personless[0];
    assert_eq!(p.person_mode, "propertyless");
    assert_eq!(p.person_properties, json!({}));
    assert_eq!(
        p.person_created_at.as_deref(),
        Some("1970-01-01T00:00:05.000000Z")
    );
    assert_eq!(p.person_id.as_deref(), Some(uuid("anon-6").as_str()));
    assert!(p.properties.get("$set").is_none());
    assert!(kinds.contains(&"invalid_event_when_process_person_profile_is_false"));
    let six = show(dir.path(), team, "user-6");
    assert_eq!(six["person"]["uuid"], uuid("anon-6"));
    assert!(six["person"]["properties"].get("ignored").is_none());

    // 7. set_once keeps the first value, set the last, unset removes.
    let seven = &show(dir.path(), team, "user-7")["person"]["properties"];
    assert_eq!(seven["first"], 1);
    assert_eq!(seven["second"], 2);
    assert_eq!(seven["s"], 2);
    assert!(seven.get("gone").is_none());

    // 8. Groups: the type gets index 0, events carry $group_0, the group is stored.
    let purchase = rows.iter().find(|r| r.event == "purchase").unwrap();
    assert_eq!(purchase.properties["$group_0"], "acme");
    let conn = rusqlite::Connection::open(app.sqlite_path()).unwrap();
    let group: (String, i64) = conn
        .query_row(
            "SELECT group_properties, version FROM posthog_group WHERE team_id = ?1 AND group_key = 'acme' AND group_type_index = 0",
            [team as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&group.0).unwrap(),
        json!({"size": 10})
    );
    assert_eq!(group.1, 1);
    let mapping: String = conn
        .query_row(
            "SELECT group_type FROM posthog_grouptypemapping WHERE team_id = ?1 AND group_type_index = 0",
            [team as i64],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(mapping, "company");

    // The API answers the same person and warnings.
    let api = Api::new(&app);
    let (status, person) = api
        .call(
            reqwest::Method::GET,
            &format!("/api/teams/{team}/persons/user-1"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(person["person"]["uuid"], uuid("anon-1"));
    let (status, _) = api
        .call(
            reqwest::Method::GET,
            &format!("/api/teams/{team}/persons/nobody"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (_, listed) = api
        .call(
            reqwest::Method::GET,
            &format!("/api/teams/{team}/ingestion_warnings"),
            None,
        )
        .await;
    assert_eq!(listed["warnings"].as_array().unwrap().len(), warned.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_person_frees_its_distinct_ids_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "delete", TOKEN);
    let app = Appliance::start(dir.path(), &[("SINK_LINGER_MS", "0")]);
    send_batch(
        &app,
        TOKEN,
        vec![
            json!({"event": "$pageview", "distinct_id": "anon", "properties": {"$set": {"a": 1}}}),
            json!({"event": "$identify", "distinct_id": "user", "properties": {"$anon_distinct_id": "anon"}}),
        ],
    )
    .await;
    let before = show(dir.path(), team, "user");
    let uuid = before["person"]["uuid"].as_str().unwrap().to_owned();
    let out = cli(
        dir.path(),
        &["persons", "delete", "--team", &team.to_string(), "user"],
    );
    assert!(out.contains(&uuid), "{out}");
    // The running server carries it out within a second or two.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read_persons(&app.sqlite_path()).contains_key(&uuid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the person is still in the sink"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = rusqlite::Connection::open(app.sqlite_path()).unwrap();
    let ids: i64 = conn
        .query_row("SELECT count(*) FROM posthog_persondistinctid", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(ids, 0, "the distinct ids are freed");
    let missing = common::cli_error(
        dir.path(),
        &["persons", "show", "--team", &team.to_string(), "anon"],
    );
    assert!(missing.contains("no person"), "{missing}");
    // A later event of a freed id starts a new person, with nothing of the old one.
    send_batch(
        &app,
        TOKEN,
        vec![json!({"event": "e", "distinct_id": "anon"})],
    )
    .await;
    let again = show(dir.path(), team, "anon");
    assert!(again["person"]["properties"].get("a").is_none());
    assert_eq!(again["distinct_ids"], json!([["anon", 0]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_a_merge_heavy_load_leaves_the_persons_of_the_same_events_without_it() {
    let events = merge_heavy_events(150);

    // The reference: the same events, no kill.
    let calm = tempfile::tempdir().unwrap();
    let team = create_team(calm.path(), "t", TOKEN);
    let app = Appliance::start(calm.path(), &[]);
    let (app, _) = send_in_order(app, &events, |_| None, None).await;
    let want = read_persons(&app.sqlite_path());
    let want_rows = read_events(&app.sqlite_path());
    let want_state: Vec<Value> = (0..150)
        .map(|u| show(calm.path(), team, &format!("user{u}")))
        .collect();
    drop(app);

    // Crashed right after a sink write, before the persons' commit; then killed at an
    // arbitrary moment later in the load.
    let rough = tempfile::tempdir().unwrap();
    create_team(rough.path(), "t", TOKEN);
    let path = rough.path().to_owned();
    let first = Appliance::start(
        &path,
        &[("APPLIANCE_FAILPOINTS", "pipeline.after_sink_write")],
    );
    let (app, restarts) = send_in_order(
        first,
        &events,
        |_| Some(Appliance::start(&path, &[])),
        Some(events.len() / 16 / 2),
    )
    .await;
    assert_eq!(
        restarts, 2,
        "the failpoint's abort and the kill -9 both happened"
    );
    let got = read_persons(&app.sqlite_path());
    let got_rows = read_events(&app.sqlite_path());
    assert_eq!(got.len(), want.len());
    for (uuid, person) in &want {
        assert_eq!(got.get(uuid), Some(person), "person {uuid}");
    }
    let by_uuid = |rows: &[Row]| -> BTreeMap<String, (Option<String>, Value, String)> {
        rows.iter()
            .map(|r| {
                (
                    r.uuid.clone(),
                    (
                        r.person_id.clone(),
                        r.person_properties.clone(),
                        r.person_mode.clone(),
                    ),
                )
            })
            .collect()
    };
    assert_eq!(
        by_uuid(&got_rows),
        by_uuid(&want_rows),
        "every event's person columns"
    );
    for (u, want) in want_state.iter().enumerate() {
        assert_eq!(
            &show(rough.path(), team, &format!("user{u}")),
            want,
            "user{u}'s state"
        );
    }
}
