//! The Postgres sink against a real PostgreSQL server: the rows, persons, distinct ids and
//! groups it holds are those the embedded SQLite sink holds for the same events, through a
//! crash and a kill -9; an outage of the database loses nothing and stores nothing twice;
//! configuration mistakes stop start-up with one line; `--migrate` applies its schema.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::load::{merge_heavy_events, send_in_order};
use common::pg::PgServer;
use common::{command, create_team, read_events, read_persons, Appliance, PersonRow, Row, TOKEN};
use serde_json::{json, Value};

fn micros(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The events of the Postgres sink, in the shape the SQLite reader gives.
async fn pg_events(db: &tokio_postgres::Client) -> Vec<Row> {
    db.query(
        "SELECT uuid::text, event, properties::text, elements_chain, timestamp, team_id,
                distinct_id, created_at, person_id::text, person_properties::text,
                person_created_at, person_mode
         FROM posthog_event ORDER BY id",
        &[],
    )
    .await
    .expect("read posthog_event")
    .iter()
    .map(|r| Row {
        uuid: r.get(0),
        event: r.get(1),
        properties: serde_json::from_str(r.get(2)).unwrap(),
        elements_chain: r.get(3),
        timestamp: micros(r.get(4)),
        team_id: r.get(5),
        distinct_id: r.get(6),
        created_at: micros(r.get(7)),
        person_id: r.get(8),
        person_properties: serde_json::from_str(r.get(9)).unwrap(),
        person_created_at: r.get::<_, Option<DateTime<Utc>>>(10).map(micros),
        person_mode: r.get(11),
    })
    .collect()
}

/// The persons of the Postgres sink with their distinct ids, by uuid.
async fn pg_persons(db: &tokio_postgres::Client) -> BTreeMap<String, PersonRow> {
    let mut persons = BTreeMap::new();
    for r in db
        .query(
            "SELECT id, uuid::text, properties::text, created_at, is_identified, version
             FROM posthog_person",
            &[],
        )
        .await
        .expect("read posthog_person")
    {
        let ids = db
            .query(
                "SELECT distinct_id, version FROM posthog_persondistinctid
                 WHERE person_id = $1 ORDER BY distinct_id COLLATE \"C\"",
                &[&r.get::<_, i64>(0)],
            )
            .await
            .expect("read posthog_persondistinctid");
        let person = PersonRow {
            uuid: r.get(1),
            properties: serde_json::from_str(r.get(2)).unwrap(),
            created_at: micros(r.get(3)),
            is_identified: r.get(4),
            version: r.get(5),
            distinct_ids: ids.iter().map(|i| (i.get(0), i.get(1))).collect(),
        };
        persons.insert(person.uuid.clone(), person);
    }
    persons
}

/// Each event's stored columns, by uuid, without the write time.
fn columns(rows: &[Row]) -> BTreeMap<String, Value> {
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
fn fidelity_events() -> Vec<Value> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_holds_what_sqlite_holds_for_the_same_events_even_across_a_kill() {
    let events = fidelity_events();

    // The reference: the embedded SQLite sink, undisturbed.
    let calm = tempfile::tempdir().unwrap();
    create_team(calm.path(), "t", TOKEN);
    let app = Appliance::start(calm.path(), &[]);
    let (app, _) = send_in_order(app, &events, |_| None, None).await;
    let want_rows = read_events(&app.sqlite_path());
    let want_persons = read_persons(&app.sqlite_path());
    drop(app);

    // The Postgres sink, crashed right after a sink write, then killed later in the load.
    let pg = PgServer::start();
    let url = pg.create_database("events").await;
    let rough = tempfile::tempdir().unwrap();
    create_team(rough.path(), "t", TOKEN);
    let path = rough.path().to_owned();
    let env = [("DATABASE_URL", url.as_str())];
    let first = Appliance::start(
        &path,
        &[
            ("DATABASE_URL", url.as_str()),
            ("APPLIANCE_FAILPOINTS", "pipeline.after_sink_write"),
        ],
    );
    let (app, restarts) = send_in_order(
        first,
        &events,
        |_| Some(Appliance::start(&path, &env)),
        Some(events.len() / 16 / 2),
    )
    .await;
    assert_eq!(
        restarts, 2,
        "the failpoint's abort and the kill -9 both happened"
    );
    assert!(
        !app.sqlite_path().exists(),
        "with DATABASE_URL alone, events go to Postgres and no SQLite file is made"
    );
    let db = pg.client("events").await;
    let got_rows = pg_events(&db).await;
    assert_eq!(got_rows.len(), events.len(), "every event once");
    assert_eq!(
        columns(&got_rows),
        columns(&want_rows),
        "every event's columns"
    );
    assert_eq!(
        pg_persons(&db).await,
        want_persons,
        "persons and distinct ids"
    );

    let groups = db
        .query(
            "SELECT g.group_key, m.group_type, g.group_properties::text, g.version
             FROM posthog_group g JOIN posthog_grouptypemapping m
               ON m.team_id = g.team_id AND m.group_type_index = g.group_type_index",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].get::<_, &str>(0), "acme");
    assert_eq!(groups[0].get::<_, &str>(1), "company");
    let props: Value = serde_json::from_str(groups[0].get(2)).unwrap();
    assert_eq!(props, json!({"name": "Acme", "seats": 12}));
    let types: Vec<String> = db
        .query(
            "SELECT group_type FROM posthog_grouptypemapping ORDER BY group_type_index",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["company", "project"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_postgres_loses_nothing_and_stores_nothing_twice() {
    let mut pg = PgServer::start();
    let url = pg.create_database("events").await;
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(dir.path(), &[("DATABASE_URL", url.as_str())]);
    let client = reqwest::Client::new();
    let send = |n: usize| {
        let (client, url) = (client.clone(), app.url("/batch/"));
        async move {
            let batch: Vec<Value> = (0..25)
                .map(|i| {
                    json!({"event": "e", "distinct_id": format!("u{}", i % 5),
                           "uuid": uuid::Uuid::from_u128((n * 100 + i) as u128 + 1).to_string(),
                           // Postgres refuses \u0000 in jsonb and NUL in text; stored as U+FFFD.
                           "properties": {"n": n, "i": i, "nul": "a\u{0}b"}})
                })
                .collect();
            let body = json!({"api_key": TOKEN, "batch": batch});
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(send(0).await, 200);
    app.wait_drained().await;

    pg.stop();
    for n in 1..=10 {
        assert_eq!(send(n).await, 200, "capture does not depend on the sink");
    }
    // An SDK that lost an answer sends the same request again.
    assert_eq!(send(10).await, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let ready: Value = client
            .get(app.url("/_ready"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !ready["sink"]["last_error"].is_null() {
            break ready;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no sink error shown: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready["sink"]["sink"], "postgres", "{ready}");
    assert!(
        ready["queue"]["last_seq"].as_u64() > ready["sink"]["position"].as_u64(),
        "the events wait in the queue: {ready}"
    );

    pg.resume();
    app.wait_drained().await;
    let db = pg.client("events").await;
    let rows = pg_events(&db).await;
    assert_eq!(
        rows.len(),
        11 * 25,
        "each event once, the resent batch included"
    );
    let unique: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.uuid.as_str()).collect();
    assert_eq!(unique.len(), rows.len());
    assert!(rows.iter().all(|r| r.properties["nul"] == "a\u{FFFD}b"));
    let last = rows.iter().filter(|r| r.properties["n"] == 10).count();
    assert_eq!(last, 25);
}

#[test]
fn configuration_mistakes_stop_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (env, says) in [
        (
            vec![
                ("SINKS", "sqlite,postgres"),
                ("DATABASE_URL", "postgres://db/x"),
            ],
            "one sink at a time",
        ),
        (vec![("SINKS", "postgres")], "DATABASE_URL"),
        (vec![("SINKS", "clickhouse")], "not built yet"),
        (
            vec![("DATABASE_URL", "postgres://u:secret@db/x?sslmode=sometimes")],
            "DATABASE_URL",
        ),
    ] {
        let out = command(dir.path())
            .arg("run")
            .envs(env.clone())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{env:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{env:?}: {stderr}");
        assert!(
            !stderr.contains("secret"),
            "the password is not shown: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_postgres_schema_once() {
    let pg = PgServer::start();
    let url = pg.create_database("events").await;
    let dir = tempfile::tempdir().unwrap();
    let migrate = || {
        let out = command(dir.path())
            .arg("--migrate")
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(migrate().contains("1 Postgres migration(s) applied"));
    assert!(migrate().contains("0 Postgres migration(s) applied"));
    let db = pg.client("events").await;
    let tables: Vec<String> = db
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'public' AND table_name LIKE 'posthog_%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "posthog_event",
            "posthog_group",
            "posthog_grouptypemapping",
            "posthog_person",
            "posthog_persondistinctid"
        ]
    );
}
