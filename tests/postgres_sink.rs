//! The Postgres sink against a real PostgreSQL server: the rows, persons, distinct ids and
//! groups it holds are those the embedded SQLite sink holds for the same events, through a
//! crash and a kill -9; an outage of the database loses nothing and stores nothing twice;
//! configuration mistakes stop start-up with one line; `--migrate` applies its schema.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::fidelity::{columns, reference, rough_run};
use common::pg::PgServer;
use common::{
    cli, command, create_team, delivered_events, post_batch, read_events, read_persons,
    run_real_sdks, webhook_exporter, Api, Appliance, PersonRow, Row, TOKEN,
};
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

/// The first column of each row `sql` selects, as text.
async fn texts(db: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let rows = db.query(sql, &[]).await.expect(sql);
    rows.iter().map(|r| r.get(0)).collect()
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
/// Asserts that Postgres holds `want_rows` and `want_persons`, and the fidelity events' groups.
async fn assert_holds(
    db: &tokio_postgres::Client,
    want_rows: &[Row],
    want_persons: &BTreeMap<String, PersonRow>,
) {
    let got_rows = pg_events(db).await;
    assert_eq!(got_rows.len(), want_rows.len(), "every event once");
    assert_eq!(
        columns(&got_rows),
        columns(want_rows),
        "every event's columns"
    );
    assert_eq!(
        &pg_persons(db).await,
        want_persons,
        "persons and distinct ids"
    );
    let groups = db
        .query(
            "SELECT g.group_key, m.group_type, g.group_properties::text
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
    let types = texts(
        db,
        "SELECT group_type FROM posthog_grouptypemapping ORDER BY group_type_index",
    )
    .await;
    assert_eq!(types, ["company", "project"]);
}

/// Postgres as the only sink (with `extra` settings), across a crash and a kill -9, holds what
/// the embedded SQLite sink holds undisturbed.
async fn only_sink_across_a_kill(extra: &[(&str, &str)]) {
    let (want_rows, want_persons) = reference().await;
    let pg = PgServer::start();
    let url = pg.create_database("events").await;
    let mut env = vec![("SINKS", "postgres"), ("DATABASE_URL", url.as_str())];
    env.extend_from_slice(extra);
    let (app, _dir, _) = rough_run(&env).await;
    assert!(
        !app.sqlite_path().exists(),
        "SINKS=postgres: no SQLite file is made"
    );
    assert_holds(&pg.client("events").await, &want_rows, &want_persons).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_as_the_only_sink_holds_what_sqlite_holds_even_across_a_kill() {
    only_sink_across_a_kill(&[]).await;
}

/// With `SHARED_PERSONS` one box reads back, before every step, the persons it wrote itself
/// (also those of a step that crashed before its commit): across the crash and the kill -9 the
/// rows and persons are still exactly those of the undisturbed run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_persons_on_one_box_hold_what_sqlite_holds_even_across_a_kill() {
    only_sink_across_a_kill(&[("SHARED_PERSONS", "true")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_follower_holds_what_the_sqlite_lead_holds_even_across_a_kill() {
    let (want_rows, want_persons) = reference().await;
    let pg = PgServer::start();
    let url = pg.create_database("events").await;
    // DATABASE_URL alone adds Postgres behind the embedded SQLite sink.
    let (app, _dir, _) = rough_run(&[("DATABASE_URL", url.as_str())]).await;
    let ready = app.wait_drained().await;
    let names: Vec<&str> = ready["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sqlite", "postgres"], "{ready}");
    let lead_rows = read_events(&app.sqlite_path());
    assert_eq!(
        columns(&lead_rows),
        columns(&want_rows),
        "the lead's events"
    );
    assert_eq!(
        read_persons(&app.sqlite_path()),
        want_persons,
        "the lead's persons"
    );
    assert_holds(&pg.client("events").await, &want_rows, &want_persons).await;
}

/// A client of `app` sending batch `n` of 25 events (uuids fixed by `n`, so a resend is the same
/// events); returns the status code.
async fn send_numbered(app: &Appliance, n: usize) -> u16 {
    let batch: Vec<Value> = (0..25)
        .map(|i| {
            json!({"event": "e", "distinct_id": format!("u{}", i % 5),
                   "uuid": uuid::Uuid::from_u128((n * 100 + i) as u128 + 1).to_string(),
                   // Postgres refuses \u0000 in jsonb and NUL in text; stored as U+FFFD.
                   "properties": {"n": n, "i": i, "nul": "a\u{0}b"}})
        })
        .collect();
    post_batch(app, TOKEN, batch).await
}

/// Sends batches 1..=10 and batch 10 again (an SDK that lost an answer) while Postgres is down.
async fn send_during_outage(app: &Appliance) {
    for n in 1..=10 {
        assert_eq!(
            send_numbered(app, n).await,
            200,
            "capture does not depend on the sink"
        );
    }
    assert_eq!(send_numbered(app, 10).await, 200);
}

/// Asserts that `rows` are batches 0..=10, each event once.
fn assert_each_once(rows: &[Row]) {
    assert_eq!(
        rows.len(),
        11 * 25,
        "each event once, the resent batch included"
    );
    let unique: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.uuid.as_str()).collect();
    assert_eq!(unique.len(), rows.len());
    assert_eq!(rows.iter().filter(|r| r.properties["n"] == 10).count(), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_postgres_lead_loses_nothing_and_stores_nothing_twice() {
    let mut pg = PgServer::start();
    let url = pg.create_database("events").await;
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(
        dir.path(),
        &[("SINKS", "postgres,sqlite"), ("DATABASE_URL", url.as_str())],
    );
    assert_eq!(send_numbered(&app, 0).await, 200);
    app.wait_drained().await;

    pg.stop();
    send_during_outage(&app).await;
    let ready = app
        .ready_when("the sink's error is shown", |r| {
            !r["sink"]["last_error"].is_null()
        })
        .await;
    assert_eq!(ready["sink"]["sink"], "postgres", "{ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["sinks"][0]["lag"].as_u64() > Some(0),
        "the events wait in the queue: {ready}"
    );

    pg.resume();
    app.wait_drained().await;
    let rows = pg_events(&pg.client("events").await).await;
    assert_each_once(&rows);
    // SQLite, following the Postgres lead, holds the same events once each.
    assert_each_once(&read_events(&app.sqlite_path()));
    assert!(rows.iter().all(|r| r.properties["nul"] == "a\u{FFFD}b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_follower_that_is_down_holds_back_nothing_and_catches_up() {
    let mut pg = PgServer::start();
    let url = pg.create_database("events").await;
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(dir.path(), &[("DATABASE_URL", url.as_str())]);
    assert_eq!(send_numbered(&app, 0).await, 200);
    app.wait_drained().await;

    pg.stop();
    send_during_outage(&app).await;
    // The lead goes on storing; the follower's lag and error show.
    let ready = app
        .ready_when(
            "the lead stores everything while the follower is down",
            |r| {
                r["sink"]["position"] == r["queue"]["last_seq"]
                    && !r["sinks"][1]["last_error"].is_null()
            },
        )
        .await;
    assert_eq!(ready["sinks"][1]["name"], "postgres", "{ready}");
    assert!(ready["sinks"][1]["lag"].as_u64() > Some(0), "{ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_each_once(&read_events(&app.sqlite_path()));

    pg.resume();
    let ready = app.wait_drained().await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let rows = pg_events(&pg.client("events").await).await;
    assert_each_once(&rows);
    let lead = read_events(&app.sqlite_path());
    // The same rows, but for the NUL Postgres cannot hold.
    let without_nul = |rows: &[Row]| {
        let mut rows = rows.to_vec();
        for r in &mut rows {
            r.properties["nul"] = json!("");
        }
        columns(&rows)
    };
    assert_eq!(without_nul(&rows), without_nul(&lead));

    // A follower that is down does not hold a SIGTERM up: the lead drains, the appliance exits
    // at once, and the follower's share waits in the log for the next start.
    pg.stop();
    assert_eq!(send_numbered(&app, 11).await, 200);
    app.wait_drained_lead().await;
    let stopping = std::time::Instant::now();
    assert!(app.terminate().success());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopped after {:?}",
        stopping.elapsed()
    );
}

#[test]
fn configuration_mistakes_stop_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (env, says) in [
        (vec![("SINKS", "clickhouse,sqlite")], "can only follow"),
        (vec![("SINKS", "postgres")], "DATABASE_URL"),
        (vec![("SINKS", "clickhouse")], "can only follow"),
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
    let migrate = |url: &str| {
        let out = command(dir.path())
            .arg("--migrate")
            .env("DATABASE_URL", url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(migrate(&url).contains("2 Postgres migration(s) applied"));
    assert!(migrate(&url).contains("0 Postgres migration(s) applied"));
    // The same database through the server's Unix-domain socket, with libpq's default
    // `sslmode=prefer`: no TLS is tried there, as libpq tries none.
    assert!(migrate(&pg.socket_url("events")).contains("0 Postgres migration(s) applied"));
    // libpq's form of the same: no host in the URL, the socket directory as a parameter.
    let libpq_form = format!(
        "postgresql:///events?user=appliance&host={}&port={}",
        pg.path().display(),
        pg.port
    );
    assert!(migrate(&libpq_form).contains("0 Postgres migration(s) applied"));
    let db = pg.client("events").await;
    let tables = texts(
        &db,
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name LIKE 'posthog_%' ORDER BY 1",
    )
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_follows_libpq_sslmode() {
    let pg = PgServer::start_tls();
    let url = pg.create_database("events").await;
    let ca = pg.ca_path().display().to_string();
    // verify-full against roots that do not hold the server's CA: refused, and said why.
    let dir = tempfile::tempdir().unwrap();
    let refused = command(dir.path())
        .arg("--migrate")
        .env("DATABASE_URL", format!("{url}?sslmode=verify-full"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");

    // require (encrypted, certificate unchecked, as libpq) and verify-full with the CA.
    for (n, query) in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-full&sslrootcert={ca}"),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
    ]
    .iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        create_team(dir.path(), "t", TOKEN);
        let name = format!("appliance{n}");
        let with_tls = format!("{url}?{query}&application_name={name}");
        // Three boxes on one database: each keeps its position under its own name.
        let app = Appliance::start(
            dir.path(),
            &[
                ("SINKS", "postgres"),
                ("DATABASE_URL", &with_tls),
                ("NODE_ID", &name),
            ],
        );
        assert_eq!(send_numbered(&app, n).await, 200);
        app.wait_drained().await;
        let db = pg.client("events").await;
        let row = db
            .query_one(
                "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s
                 JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
                &[&name],
            )
            .await
            .unwrap();
        assert!(
            row.get::<_, i64>(0) >= 1,
            "{query}: the appliance is connected"
        );
        assert_eq!(
            row.get::<_, Option<bool>>(1),
            Some(true),
            "{query}: over TLS"
        );
    }
    let db = pg.client("events").await;
    assert_eq!(pg_events(&db).await.len(), 3 * 25);
}

/// Sends 25 events of which those with `i` in `poison` are named `poison`.
async fn send_with_poison(app: &Appliance, poison: &[usize]) {
    let batch: Vec<Value> = (0..25)
        .map(|i| {
            let name = if poison.contains(&i) { "poison" } else { "fine" };
            json!({"event": name, "distinct_id": "u", "uuid": uuid::Uuid::from_u128(i as u128 + 7000).to_string()})
        })
        .collect();
    assert_eq!(post_batch(app, TOKEN, batch).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_postgres_refuses_become_dead_letters_and_the_rest_flows() {
    let pg = PgServer::start();
    let url = pg.create_database("events").await;
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    // The operator's own rule, which the appliance cannot know: no event named "poison".
    let env = [("SINKS", "sqlite,postgres"), ("DATABASE_URL", url.as_str())];
    let migrated = command(dir.path())
        .arg("--migrate")
        .envs(env)
        .output()
        .unwrap();
    assert!(migrated.status.success());
    let db = pg.client("events").await;
    db.batch_execute(
        "ALTER TABLE posthog_event ADD CONSTRAINT no_poison CHECK (event <> 'poison')",
    )
    .await
    .unwrap();

    for lead in [false, true] {
        let env = if lead {
            [("SINKS", "postgres"), ("DATABASE_URL", url.as_str())]
        } else {
            env
        };
        let data = tempfile::tempdir().unwrap();
        let team = create_team(data.path(), "t", TOKEN).to_string();
        // Exports follow the lead: every event it stored is delivered, once.
        let seen = webhook_exporter(data.path(), &team).await;
        let mut env = env.to_vec();
        env.push(("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8"));
        db.batch_execute("TRUNCATE posthog_event").await.unwrap();
        let app = Appliance::start(data.path(), &env);
        send_with_poison(&app, &[3, 17]).await;
        app.wait_drained().await;
        let stored = texts(&db, "SELECT event FROM posthog_event").await;
        assert_eq!(stored.len(), 23, "lead: {lead}: the rest flows");
        let want = if lead { 23 } else { 25 };
        delivered_events(&seen, want).await;
        let delivered = delivered_events(&seen, 0).await.len();
        assert_eq!(
            delivered, want,
            "lead: {lead}: what the lead stored is delivered"
        );
        if !lead {
            assert_eq!(
                read_events(&app.sqlite_path()).len(),
                25,
                "the SQLite lead has them all"
            );
        }

        let listed = cli(data.path(), &["sink", "dead-letters", "--json"]);
        let letters: Vec<Value> = listed
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(letters.len(), 2, "{listed}");
        for letter in &letters {
            assert_eq!(letter["sink"], "postgres");
            assert_eq!(letter["event"]["event"], "poison");
            assert!(
                letter["error"].as_str().unwrap().contains("no_poison"),
                "{letter}"
            );
        }
        let (status, body) = Api::new(&app)
            .call(
                reqwest::Method::GET,
                "/api/sink/dead-letters?sink=postgres",
                None,
            )
            .await;
        assert_eq!(
            (status, body["dead_letters"].as_array().map(Vec::len)),
            (200, Some(2))
        );

        // Still refused when resent: they stay, with the sink's words.
        cli(data.path(), &["sink", "resend"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cli(data.path(), &["sink", "dead-letters", "--json"]).contains("\"resend\":true") {
            assert!(
                std::time::Instant::now() < deadline,
                "the resend was not tried"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            cli(data.path(), &["sink", "dead-letters"]).lines().count(),
            2,
            "one line per dead letter"
        );

        // Once the rule is lifted, a resend stores them and they leave the dead letters.
        db.batch_execute("ALTER TABLE posthog_event DROP CONSTRAINT no_poison")
            .await
            .unwrap();
        let (status, body) = Api::new(&app)
            .call(
                reqwest::Method::POST,
                "/api/sink/dead-letters/resend",
                Some(json!({"all": true})),
            )
            .await;
        assert_eq!((status, &body["resend"]), (200, &json!(2)), "{body}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cli(data.path(), &["sink", "dead-letters"]).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the resend did not store them"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            texts(&db, "SELECT event FROM posthog_event").await.len(),
            25
        );
        db.batch_execute(
            "DELETE FROM posthog_event WHERE event = 'poison';
             ALTER TABLE posthog_event ADD CONSTRAINT no_poison CHECK (event <> 'poison')",
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_inserted_before_a_crash_that_kept_the_position_back_are_still_delivered() {
    let pg = PgServer::start();
    let url = pg.create_database("events").await;
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "t", TOKEN).to_string();
    let seen = webhook_exporter(dir.path(), &team).await;
    let mut env = vec![
        ("SINKS", "postgres"),
        ("DATABASE_URL", url.as_str()),
        ("SINK_LINGER_MS", "0"),
        ("PLUGIN_ALLOWED_NETWORKS", "127.0.0.0/8"),
    ];

    // A write large enough for two connections: their rows commit, then the process aborts
    // before the transaction that moves the position.
    env.push(("APPLIANCE_FAILPOINTS", "postgres.before_position"));
    let mut crashing = Appliance::start(dir.path(), &env);
    let events: Vec<Value> = (0..250)
        .map(|i| json!({"event": "e", "distinct_id": "u", "uuid": uuid::Uuid::from_u128(i + 1).to_string()}))
        .collect();
    assert_eq!(post_batch(&crashing, TOKEN, events).await, 200);
    assert!(!crashing.wait_exit(Duration::from_secs(30)).success());
    let db = pg.client("events").await;
    assert_eq!(
        pg_events(&db).await.len(),
        250,
        "the rows committed before the abort"
    );
    env.pop();

    // The batch is written again; its rows count as this batch's, so each event is delivered.
    let app = Appliance::start(dir.path(), &env);
    app.wait_drained().await;
    delivered_events(&seen, 250).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        delivered_events(&seen, 0).await.len(),
        250,
        "each event once"
    );
    assert_eq!(pg_events(&db).await.len(), 250, "each row once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sdk_events_reach_postgres_as_they_reach_sqlite() {
    let pg = PgServer::start();
    let url = pg.create_database("events").await;
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "sdk", TOKEN);
    let app = Appliance::start(dir.path(), &[("DATABASE_URL", url.as_str())]);
    let sent = tokio::task::block_in_place(|| run_real_sdks(&app));
    app.wait_drained().await;
    let lead = read_events(&app.sqlite_path());
    // Every event but the personless `$identify` of the persons scenario, which PostHog drops.
    assert_eq!(lead.len(), sent - 1);
    let db = pg.client("events").await;
    assert_eq!(
        columns(&pg_events(&db).await),
        columns(&lead),
        "every event's columns"
    );
    assert_eq!(
        pg_persons(&db).await,
        read_persons(&app.sqlite_path()),
        "persons"
    );
}
