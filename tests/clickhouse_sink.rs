//! The ClickHouse sink. Its schema and writes run on the current ClickHouse engine (chdb-core
//! behind the test's HTTP front, `common::ch::Chdb`); the network path (HTTP, LZ4 both ways,
//! RowBinary of the sink's own rows) and the refusal of an old server run on Debian's real
//! `clickhouse-server` 18.16. What each test proves is in the README ("Which tests prove what").

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::ch::{Chdb, ClickHouse18};
use common::fidelity::{columns, reference, rough_run};
use common::{
    cli, command, create_team, post_batch, read_events, read_persons, run_real_sdks, Appliance,
    PersonRow, Row, TOKEN,
};
use serde_json::{json, Value};

const DB: &str = "posthog";

/// `2026-11-02 00:00:00.123456` (ClickHouse's text) as the SQLite sink's RFC 3339 text.
fn rfc3339(text: &str) -> String {
    format!("{}Z", text.replace(' ', "T"))
}

/// The events ClickHouse holds (one row per sort key: `FINAL`), in the SQLite reader's shape.
/// `person_created_at` is whole seconds there, as PostHog writes it.
async fn ch_events(ch: &Chdb) -> Vec<Row> {
    ch.rows(
        DB,
        "SELECT toString(uuid) AS uuid, event, properties, elements_chain,
                toString(timestamp) AS ts, toInt32(team_id) AS team, distinct_id,
                toString(created_at) AS created, toString(person_id) AS person,
                person_properties, toString(person_created_at) AS pca,
                toString(person_mode) AS mode
         FROM events FINAL ORDER BY timestamp, uuid",
    )
    .await
    .into_iter()
    .map(|r| Row {
        uuid: r["uuid"].as_str().unwrap().to_owned(),
        event: r["event"].as_str().unwrap().to_owned(),
        properties: serde_json::from_str(r["properties"].as_str().unwrap()).unwrap(),
        elements_chain: r["elements_chain"].as_str().unwrap().to_owned(),
        timestamp: rfc3339(r["ts"].as_str().unwrap()),
        team_id: r["team"].as_i64().unwrap(),
        distinct_id: r["distinct_id"].as_str().unwrap().to_owned(),
        created_at: rfc3339(r["created"].as_str().unwrap()),
        person_id: Some(r["person"].as_str().unwrap().to_owned()),
        person_properties: serde_json::from_str(r["person_properties"].as_str().unwrap()).unwrap(),
        person_created_at: Some(r["pca"].as_str().unwrap()[..19].to_owned()),
        person_mode: r["mode"].as_str().unwrap().to_owned(),
    })
    .collect()
}

/// The SQLite rows with `person_created_at` cut to whole seconds, as ClickHouse keeps it.
fn in_whole_seconds(rows: &[Row]) -> Vec<Row> {
    let mut rows = rows.to_vec();
    for r in &mut rows {
        r.person_created_at = r
            .person_created_at
            .as_ref()
            .map(|t| t[..19].replace('T', " "));
    }
    rows
}

/// The living persons ClickHouse holds (latest version of each, PostHog's reading), with their
/// distinct ids, by uuid.
async fn ch_persons(ch: &Chdb) -> BTreeMap<String, PersonRow> {
    let mut persons: BTreeMap<String, PersonRow> = ch
        .rows(
            DB,
            "SELECT toString(id) AS id, properties, toString(created_at) AS created,
                    is_identified, toInt32(version) AS version
             FROM person FINAL WHERE is_deleted = 0",
        )
        .await
        .into_iter()
        .map(|r| {
            let id = r["id"].as_str().unwrap().to_owned();
            let row = PersonRow {
                uuid: id.clone(),
                properties: serde_json::from_str(r["properties"].as_str().unwrap()).unwrap(),
                created_at: rfc3339(r["created"].as_str().unwrap()),
                is_identified: r["is_identified"].as_i64() == Some(1),
                version: r["version"].as_i64().unwrap(),
                distinct_ids: Vec::new(),
            };
            (id, row)
        })
        .collect();
    for r in ch
        .rows(
            DB,
            "SELECT toString(person_id) AS person, distinct_id, toInt32(version) AS version
             FROM person_distinct_id2 FINAL WHERE is_deleted = 0 ORDER BY distinct_id",
        )
        .await
    {
        if let Some(person) = persons.get_mut(r["person"].as_str().unwrap()) {
            person.distinct_ids.push((
                r["distinct_id"].as_str().unwrap().to_owned(),
                r["version"].as_i64().unwrap(),
            ));
        }
    }
    persons
}

/// The SQLite persons with `created_at` in ClickHouse's milliseconds.
fn in_millis(persons: &BTreeMap<String, PersonRow>) -> BTreeMap<String, PersonRow> {
    let mut persons = persons.clone();
    for p in persons.values_mut() {
        p.created_at = format!("{}Z", &p.created_at[..23]);
    }
    persons
}

fn env_of(ch: &Chdb) -> Vec<(String, String)> {
    ch.env(DB)
}

fn borrowed(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_follower_holds_what_the_sqlite_lead_holds_even_across_a_kill() {
    let (want_rows, want_persons) = reference().await;
    let ch = Chdb::start();
    let env = env_of(&ch);
    let (app, _dir, _) = rough_run(&borrowed(&env)).await;
    let ready = app.wait_drained().await;
    assert_eq!(ready["sinks"][1]["name"], "clickhouse", "{ready}");
    assert_eq!(
        columns(&read_events(&app.sqlite_path())),
        columns(&want_rows)
    );
    let got = ch_events(&ch).await;
    assert_eq!(got.len(), want_rows.len(), "every event once");
    let (got, want) = (columns(&got), columns(&in_whole_seconds(&want_rows)));
    for (uuid, row) in &want {
        assert_eq!(got.get(uuid), Some(row), "event {uuid}");
    }
    assert_eq!(
        ch_persons(&ch).await,
        in_millis(&want_persons),
        "persons and distinct ids"
    );
    let groups = ch
        .rows(
            DB,
            "SELECT group_type_index, group_key, group_properties FROM groups FINAL",
        )
        .await;
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["group_key"], "acme");
    let props: Value =
        serde_json::from_str(groups[0]["group_properties"].as_str().unwrap()).unwrap();
    assert_eq!(props, json!({"name": "Acme", "seats": 12}));
    // PostHog's materialized group column, filled by ClickHouse from the properties.
    let tagged = ch
        .rows(
            DB,
            "SELECT `$group_0` AS g FROM events WHERE event = 'signed'",
        )
        .await;
    assert_eq!(tagged[0]["g"], "acme");
}

/// Batch `n` of 25 events, uuids fixed by `n`.
fn numbered(n: usize) -> Vec<Value> {
    (0..25)
        .map(|i| {
            json!({"event": "e", "distinct_id": format!("u{}", i % 5),
                   "uuid": uuid::Uuid::from_u128((n * 100 + i) as u128 + 1).to_string(),
                   "properties": {"n": n, "i": i}})
        })
        .collect()
}

/// Rows and distinct uuids in `events`, without `FINAL`: a doubled insert shows here until a
/// merge collapses it (the tests that need it stop merges).
async fn counts(ch: &Chdb) -> (u64, u64) {
    let r = &ch
        .rows(
            DB,
            "SELECT toInt32(count()) AS rows, toInt32(uniqExact(uuid)) AS uuids FROM events",
        )
        .await[0];
    (r["rows"].as_u64().unwrap(), r["uuids"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_inserts_and_the_position_costs_one_deduplicated_retry() {
    let ch = Chdb::start();
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let env = env_of(&ch);
    let mut armed = borrowed(&env);
    armed.push(("APPLIANCE_FAILPOINTS", "clickhouse.before_position"));
    let mut crashing = Appliance::start(dir.path(), &armed);
    assert_eq!(post_batch(&crashing, TOKEN, numbered(0)).await, 200);
    assert!(
        !crashing.wait_exit(Duration::from_secs(30)).success(),
        "aborted after the inserts"
    );
    ch.execute(DB, "SYSTEM STOP MERGES").await;
    assert_eq!(counts(&ch).await, (25, 25), "the inserts arrived");

    // Restarted while ClickHouse refuses the table, more events join the log behind the
    // unfinished write; the retry must still be exactly that write, or its token differs.
    ch.execute(DB, "RENAME TABLE events TO events_away").await;
    let app = Appliance::start(dir.path(), &borrowed(&env));
    assert_eq!(post_batch(&app, TOKEN, numbered(1)).await, 200);
    app.ready_when("the follower has tried and failed", |r| {
        r["sink"]["position"] == r["queue"]["last_seq"] && !r["sinks"][1]["last_error"].is_null()
    })
    .await;
    ch.execute(DB, "RENAME TABLE events_away TO events").await;
    app.wait_drained().await;
    assert_eq!(
        counts(&ch).await,
        (50, 50),
        "the retried insert was dropped as a duplicate; the later one arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_outage_holds_back_nothing_and_everything_arrives_once() {
    let mut ch = Chdb::start();
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let env = env_of(&ch);
    let app = Appliance::start(dir.path(), &borrowed(&env));
    assert_eq!(post_batch(&app, TOKEN, numbered(0)).await, 200);
    app.wait_drained().await;

    ch.stop();
    for n in 1..=10 {
        assert_eq!(
            post_batch(&app, TOKEN, numbered(n)).await,
            200,
            "capture goes on"
        );
    }
    let ready = app
        .ready_when("the lead stores everything while ClickHouse is down", |r| {
            r["sink"]["position"] == r["queue"]["last_seq"]
                && !r["sinks"][1]["last_error"].is_null()
        })
        .await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(ready["sinks"][1]["lag"].as_u64() > Some(0), "{ready}");
    assert_eq!(read_events(&app.sqlite_path()).len(), 11 * 25);

    ch.resume();
    let ready = app.wait_drained().await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(counts(&ch).await, (11 * 25, 11 * 25), "every event once");
    let lead = read_events(&app.sqlite_path());
    assert_eq!(
        columns(&ch_events(&ch).await),
        columns(&in_whole_seconds(&lead))
    );

    // A follower that is down does not hold a SIGTERM up.
    ch.stop();
    assert_eq!(post_batch(&app, TOKEN, numbered(11)).await, 200);
    app.wait_drained_lead().await;
    let stopping = std::time::Instant::now();
    assert!(app.terminate().success());
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_clickhouse_refuses_become_dead_letters_and_the_rest_flows() {
    let ch = Chdb::start();
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let env = env_of(&ch);
    let migrated = command(dir.path())
        .arg("--migrate")
        .envs(borrowed(&env))
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    // The operator's own rule, which the appliance cannot know.
    ch.execute(
        DB,
        "ALTER TABLE events ADD CONSTRAINT no_poison CHECK event != 'poison'",
    )
    .await;
    let app = Appliance::start(dir.path(), &borrowed(&env));
    let batch: Vec<Value> = (0..25)
        .map(|i| {
            let name = if i == 3 || i == 17 { "poison" } else { "fine" };
            json!({"event": name, "distinct_id": "u",
                   "uuid": uuid::Uuid::from_u128(i as u128 + 7000).to_string()})
        })
        .collect();
    assert_eq!(post_batch(&app, TOKEN, batch).await, 200);
    app.wait_drained().await;
    assert_eq!(counts(&ch).await, (23, 23), "the rest flows");
    assert_eq!(
        read_events(&app.sqlite_path()).len(),
        25,
        "the lead has all"
    );
    let letters = cli(
        dir.path(),
        &["sink", "dead-letters", "--sink", "clickhouse"],
    );
    let lines: Vec<&str> = letters
        .lines()
        .filter(|l| l.contains("\"poison\""))
        .collect();
    assert_eq!(lines.len(), 2, "{letters}");
    assert!(
        lines.iter().all(|l| l.contains("VIOLATED_CONSTRAINT")),
        "{letters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sdk_events_reach_clickhouse_as_they_reach_sqlite() {
    let ch = Chdb::start();
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "sdk", TOKEN);
    let env = env_of(&ch);
    let app = Appliance::start(dir.path(), &borrowed(&env));
    let sent = tokio::task::block_in_place(|| run_real_sdks(&app));
    app.wait_drained().await;
    let lead = read_events(&app.sqlite_path());
    assert_eq!(lead.len(), sent - 1);
    assert_eq!(
        columns(&ch_events(&ch).await),
        columns(&in_whole_seconds(&lead)),
        "every event's columns"
    );
    assert_eq!(
        ch_persons(&ch).await,
        in_millis(&read_persons(&app.sqlite_path())),
        "persons"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_clickhouse_schema_once_and_choices_are_checked() {
    let ch = Chdb::start();
    let dir = tempfile::tempdir().unwrap();
    let env = env_of(&ch);
    for want in ["1 ClickHouse migration(s)", "0 ClickHouse migration(s)"] {
        let out = command(dir.path())
            .arg("--migrate")
            .envs(borrowed(&env))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains(want), "{stdout}");
    }
    let tables = ch
        .rows(
            DB,
            "SELECT name FROM system.tables WHERE database = 'posthog' ORDER BY name",
        )
        .await;
    let names: Vec<&str> = tables.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "appliance_migrations",
            "events",
            "groups",
            "person",
            "person_distinct_id2"
        ]
    );
    let engine = &ch
        .rows(DB, "SELECT engine, sorting_key FROM system.tables WHERE name = 'events' AND database = 'posthog'")
        .await[0];
    assert_eq!(engine["engine"], "ReplacingMergeTree");
    assert_eq!(
        engine["sorting_key"],
        "team_id, toDate(timestamp), event, cityHash64(distinct_id), cityHash64(uuid)"
    );

    // ClickHouse cannot lead: one line, exit 78.
    let out = command(dir.path())
        .env("SINKS", "clickhouse")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("can only follow"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_but_old_server_is_refused_with_its_version_while_sqlite_goes_on() {
    let old = ClickHouse18::start();
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let port = old.port.to_string();
    let env = [
        ("CLICKHOUSE_HOST", "127.0.0.1"),
        ("CLICKHOUSE_PORT", port.as_str()),
    ];
    let out = command(dir.path())
        .arg("--migrate")
        .envs(env)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("18.16"),
        "{stderr}"
    );
    assert!(stderr.contains("too old"), "{stderr}");

    let app = Appliance::start(dir.path(), &env);
    assert_eq!(post_batch(&app, TOKEN, numbered(0)).await, 200);
    let ready = app
        .ready_when("the lead stores, the old server is refused", |r| {
            r["sink"]["position"] == r["queue"]["last_seq"]
                && r["sinks"][1]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("too old"))
        })
        .await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(read_events(&app.sqlite_path()).len(), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sinks_rows_cross_a_real_server_over_http_with_lz4_both_ways() {
    use appliance::sinks::clickhouse::rows::EventRow;
    let old = ClickHouse18::start();
    // 18.16 has no DateTime64: Int64 columns take the same RowBinary bytes (micro- and
    // milliseconds); everything else is the production column type.
    let client = clickhouse::Client::default()
        .with_url(format!("http://127.0.0.1:{}", old.port))
        .with_compression(clickhouse::Compression::Lz4)
        .with_validation(false);
    client
        .query(
            "CREATE TABLE events (uuid UUID, event String, properties String, timestamp Int64,
                team_id Int64, distinct_id String, elements_chain String, created_at Int64,
                person_id UUID, person_created_at Int64, person_properties String,
                group0_properties String, group1_properties String, group2_properties String,
                group3_properties String, group4_properties String, group0_created_at Int64,
                group1_created_at Int64, group2_created_at Int64, group3_created_at Int64,
                group4_created_at Int64,
                person_mode Enum8('full' = 0, 'propertyless' = 1, 'force_upgrade' = 2),
                _timestamp DateTime, _offset UInt64)
             ENGINE = ReplacingMergeTree(_timestamp) ORDER BY (team_id, uuid)",
        )
        .execute()
        .await
        .unwrap();
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-02T10:11:12.345678Z")
        .unwrap()
        .to_utc();
    let properties: Vec<String> = (0..20_000)
        .map(|i| json!({"i": i, "text": "ünïcode ✓ ".repeat(i % 7)}).to_string())
        .collect();
    let mut insert = client.insert::<EventRow<'static>>("events").await.unwrap();
    for (i, props) in properties.iter().enumerate() {
        insert
            .write(&EventRow {
                uuid: uuid::Uuid::from_u128(i as u128 + 1),
                event: "e",
                properties: props,
                timestamp: at,
                team_id: 7,
                distinct_id: "d",
                elements_chain: "",
                created_at: at,
                person_id: uuid::Uuid::from_u128(9),
                person_created_at: at,
                person_properties: "{}",
                group0_properties: "",
                group1_properties: "",
                group2_properties: "",
                group3_properties: "",
                group4_properties: "",
                group0_created_at: at,
                group1_created_at: at,
                group2_created_at: at,
                group3_created_at: at,
                group4_created_at: at,
                person_mode: 1,
                _timestamp: at,
                _offset: i as u64,
            })
            .await
            .unwrap();
    }
    insert.end().await.unwrap();
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Back {
        n: u64,
        micros: i64,
        mode: String,
        longest: u64,
    }
    let back: Back = client
        .query(
            "SELECT count() AS n, any(timestamp) AS micros, any(toString(person_mode)) AS mode,
                    max(length(properties)) AS longest
             FROM events",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(back.n, 20_000);
    assert_eq!(back.micros, at.timestamp_micros());
    assert_eq!(back.mode, "propertyless");
    let longest = properties.iter().map(String::len).max().unwrap() as u64;
    assert_eq!(back.longest, longest, "the longest text arrived whole");
}
