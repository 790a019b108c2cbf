//! More than one box: two appliance processes in one Kafka consumer group writing to one shared
//! Postgres, with rebalances in the middle of a load (a box joins, a box is killed and comes
//! back), store every message once and share their persons; a box given another box's name is refused by the shared
//! sink instead of skipping events; and the schedule lease in a real Redis lets one box run the
//! schedules, another taking over the next slot (once) when the holder is killed; with
//! `SHARED_PERSONS`, a merge of two ids whose persons live on two boxes holds on both, two
//! boxes changing one person at the same moment both keep their change, and group types and
//! groups are one set across boxes.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::kafka::{borrowed, capture_message_of, env, producer, send};
use common::pg::PgServer;
use common::redis::RedisServer;
use common::{
    cli, command, create_team, enable_plugin, install_plugin, post_batch, send_batch, storage,
    Appliance, TOKEN,
};
use rdkafka::mocking::MockCluster;
use serde_json::{json, Value};

const MESSAGES: usize = 3_000;

/// Polls `check` every 200 ms until it answers `Some`, or fails naming `what`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The rows of `posthog_event` and how many distinct uuids they have.
async fn counts(db: &tokio_postgres::Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT uuid) FROM posthog_event",
            &[],
        )
        .await
        .expect("count the events");
    (row.get(0), row.get(1))
}

async fn positions(db: &tokio_postgres::Client) -> HashMap<String, i64> {
    db.query("SELECT sink, position FROM appliance_sink_position", &[])
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_boxes_in_one_group_store_every_message_once_through_rebalances() {
    let cluster = MockCluster::new(1).expect("a mock cluster");
    cluster
        .create_topic(common::kafka::TOPIC, 4, 1)
        .expect("the topic");
    let bootstrap = cluster.bootstrap_servers();
    let pg = PgServer::start();
    let url = pg.create_database("events").await;
    let db = pg.client("events").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&dir_a, &dir_b] {
        create_team(dir.path(), "t", TOKEN);
    }
    let box_env = |node: &str| {
        let mut env = env(&bootstrap);
        env.extend([
            ("SINKS", "postgres".to_owned()),
            ("DATABASE_URL", url.clone()),
            ("NODE_ID", node.to_owned()),
            ("SHARED_PERSONS", "true".to_owned()),
        ]);
        env
    };
    let (env_a, env_b) = (box_env("a"), box_env("b"));
    let box_a = Appliance::start(dir_a.path(), &borrowed(&env_a));

    // PostHog's capture writes a steady stream, keyed by token and distinct id.
    let load = tokio::spawn({
        let producer = producer(&bootstrap);
        async move {
            for chunk in 0..MESSAGES / 50 {
                let messages = (chunk * 50..(chunk + 1) * 50)
                    .map(|i| capture_message_of(i, &format!("user{}", i % 101)));
                send(&producer, messages).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A second box joins the group: the partitions are split between the two.
    let box_b = Appliance::start(dir_b.path(), &borrowed(&env_b));
    eventually(
        "the second box to store events",
        Duration::from_secs(60),
        || {
            let db = &db;
            async move {
                positions(db)
                    .await
                    .get("postgres@b")
                    .filter(|p| **p > 0)
                    .map(|_| ())
            }
        },
    )
    .await;
    // The first box dies mid-stream: its partitions go to the second, which re-reads what was
    // not committed (uuids make that idempotent); what it had made durable waits in its queue.
    box_a.kill9();
    load.await.expect("the load");
    let box_a = Appliance::start(dir_a.path(), &borrowed(&env_a));
    let (rows, unique) = eventually(
        "every message in Postgres",
        Duration::from_secs(120),
        || {
            let db = &db;
            async move {
                let (rows, unique) = counts(db).await;
                (unique >= MESSAGES as i64).then_some((rows, unique))
            }
        },
    )
    .await;
    box_a.wait_drained().await;
    box_b.wait_drained().await;
    let (rows_after, _) = counts(&db).await;
    assert_eq!(unique, MESSAGES as i64, "every message stored");
    assert_eq!(
        (rows, rows_after),
        (MESSAGES as i64, MESSAGES as i64),
        "no message stored twice"
    );
    let positions = positions(&db).await;
    assert!(
        positions.get("postgres@a") > Some(&0) && positions.get("postgres@b") > Some(&0),
        "each box keeps its own position: {positions:?}"
    );
    // One person per user, the same on both boxes: a box that took a user's partition over read
    // the person from the shared store instead of making its own, so every event of the user
    // shows the person made by its first box (its `$creator_event_uuid`).
    let users = db
        .query(
            "SELECT d.distinct_id, p.properties->>'$creator_event_uuid',
                (SELECT array_agg(DISTINCT e.person_properties->>'$creator_event_uuid')
                 FROM posthog_event e WHERE e.distinct_id = d.distinct_id)
             FROM posthog_persondistinctid d JOIN posthog_person p ON p.id = d.person_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(users.len(), 101, "one person per user");
    for row in &users {
        let (user, creator): (String, Option<String>) = (row.get(0), row.get(1));
        let seen: Vec<Option<String>> = row.get(2);
        assert_eq!(
            seen,
            vec![creator],
            "{user}'s events all show its one person"
        );
    }

    // A third box given the second's name would move its position (and skip the second's
    // events): it stops at start with one line naming NODE_ID, and stores nothing.
    let dir_c = tempfile::tempdir().unwrap();
    create_team(dir_c.path(), "t", TOKEN);
    let out = command(dir_c.path())
        .arg("run")
        .envs([
            ("SINKS", "postgres"),
            ("DATABASE_URL", url.as_str()),
            ("NODE_ID", "b"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("NODE_ID") && stderr.contains("postgres@b"),
        "{stderr}"
    );
    assert!(box_b.terminate().success());
    assert!(box_a.terminate().success());
}

/// A box with the scheduled digest enabled, holding the lease under `node`.
fn scheduled_box(dir: &Path, redis: &RedisServer, node: &str) -> (Appliance, String) {
    let team = create_team(dir, "t", TOKEN).to_string();
    install_plugin(dir, "examples/scheduled-digest", "scheduled_digest.wasm");
    enable_plugin(dir, &team, "Scheduled Digest", &[]);
    let app = Appliance::start(
        dir,
        &[
            ("REDIS_URL", redis.url().as_str()),
            ("CELERY_SOURCE", "false"),
            ("SCHEDULE_LEASE", "redis"),
            ("SCHEDULE_LOCK_TTL", "2"),
            ("NODE_ID", node),
        ],
    );
    (app, team)
}

fn runs(dir: &Path, team: &str) -> i64 {
    storage(dir, team, "Scheduled Digest")
        .get("scheduled_runs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The schedule's last claimed slot and the box that claimed it, as kept in Redis.
fn claimed(redis: &RedisServer, team: &str) -> Option<(i64, String)> {
    let mut con = redis.connection();
    let value: Option<String> = ::redis::cmd("HGET")
        .arg("appliance:schedule:slots")
        .arg(format!("{team}/Scheduled Digest/minute"))
        .query(&mut con)
        .expect("read the slots");
    let (slot, node) = value?
        .split_once(' ')
        .map(|(s, n)| (s.to_owned(), n.to_owned()))?;
    Some((slot.parse().ok()?, node))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_lease_runs_each_slot_on_one_box_and_passes_on_when_its_holder_dies() {
    let redis = RedisServer::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (box_a, team_a) = scheduled_box(dir_a.path(), &redis, "a");
    eventually("the first box's run", Duration::from_secs(60), || async {
        (runs(dir_a.path(), &team_a) >= 1).then_some(())
    })
    .await;

    // The second box starts while the first holds the lease: it runs nothing.
    let (box_b, team_b) = scheduled_box(dir_b.path(), &redis, "b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        runs(dir_b.path(), &team_b),
        0,
        "only the holder runs schedules"
    );

    // The holder dies without giving the lease up (it renewed it under a second ago, so what
    // Redis holds now is the first box's last claim). After SCHEDULE_LOCK_TTL the second box
    // takes the lease, does not run a slot the first ran, and runs each slot after it once.
    box_a.kill9();
    let (slot_a, by) = claimed(&redis, &team_a).expect("the slot claimed");
    assert!(
        by.starts_with("a/"),
        "{by}: the holder is NODE_ID and its state file"
    );
    eventually("the second box's run", Duration::from_secs(90), || async {
        (runs(dir_b.path(), &team_b) >= 1).then_some(())
    })
    .await;
    let (slot_b, by) = claimed(&redis, &team_b).expect("the slot claimed");
    assert!(by.starts_with("b/"), "{by}");
    // Usually the next minute's slot; two when a minute ended just as it took over.
    let after = (slot_b - slot_a) / 60;
    assert!(
        slot_b > slot_a && (slot_b - slot_a) % 60 == 0 && after <= 2,
        "{slot_a} then {slot_b}: the slots after the first box's"
    );
    assert_eq!(runs(dir_b.path(), &team_b), after, "each slot once");
    let metrics = reqwest::get(box_b.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("appliance_schedule_lease_held ") && l.ends_with(" 1")),
        "{metrics}"
    );
    // A third box given the holder's name is still another box: it runs nothing.
    let dir_c = tempfile::tempdir().unwrap();
    let (box_c, team_c) = scheduled_box(dir_c.path(), &redis, "b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        runs(dir_c.path(), &team_c),
        0,
        "one name, two state files: one holder"
    );
    assert!(box_c.terminate().success());
    assert!(box_b.terminate().success());
    // Given up at shutdown: the next box need not wait for it to lapse.
    let mut con = redis.connection();
    let holder: Option<String> = ::redis::cmd("GET")
        .arg("appliance:schedule:lease")
        .query(&mut con)
        .unwrap();
    assert_eq!(holder, None);
}

/// PostHog's person uuid for a distinct id of team `team`.
fn person_uuid(team: u64, distinct_id: &str) -> uuid::Uuid {
    let namespace = uuid::Uuid::parse_str("932979b4-65c3-4424-8467-0b66ec27bc22").unwrap();
    uuid::Uuid::new_v5(&namespace, format!("{team}:{distinct_id}").as_bytes())
}

fn event(name: &str, distinct_id: &str, properties: Value) -> Value {
    json!({"event": name, "distinct_id": distinct_id, "properties": properties,
           "uuid": uuid::Uuid::now_v7().to_string()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_persons_a_merge_made_on_one_box_holds_on_the_other() {
    let pg = PgServer::start();
    let url = pg.create_database("persons").await;
    let db = pg.client("persons").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let team = create_team(dir_a.path(), "t", TOKEN);
    assert_eq!(create_team(dir_b.path(), "t", TOKEN), team);
    let box_env = |node: &'static str| {
        [
            ("SINKS", "postgres"),
            ("DATABASE_URL", url.as_str()),
            ("NODE_ID", node),
            ("SHARED_PERSONS", "true"),
            ("SINK_LINGER_MS", "0"),
        ]
    };
    let (env_a, env_b) = (box_env("a"), box_env("b"));
    let box_a = Appliance::start(dir_a.path(), &env_a);
    let box_b = Appliance::start(dir_b.path(), &env_b);

    // Each id's person is made on a box of its own (Kafka would put the two ids on partitions
    // of different boxes).
    let on_b = event("$pageview", "anon-1", json!({"$set": {"device": "phone"}}));
    send_batch(&box_b, TOKEN, vec![on_b]).await;
    let on_a = event("$pageview", "user-1", json!({"$set": {"plan": "pro"}}));
    send_batch(&box_a, TOKEN, vec![on_a]).await;
    // Box A merges them: it takes anon-1's person from the shared store, so the merged person
    // has both boxes' properties and anon-1's person is gone.
    let identify = event(
        "$identify",
        "user-1",
        json!({"$anon_distinct_id": "anon-1", "$set": {"email": "one@example.com"}}),
    );
    send_batch(&box_a, TOKEN, vec![identify]).await;
    // Box B sees anon-1 again: it must follow the merge made on A, not its own old person.
    let again = event("$pageview", "anon-1", json!({"$set": {"seen_again": true}}));
    let again_uuid = again["uuid"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    send_batch(&box_b, TOKEN, vec![again]).await;

    let survivor = person_uuid(team, "user-1");
    let row = db
        .query_one(
            "SELECT person_id, person_properties::text FROM posthog_event WHERE uuid = $1",
            &[&again_uuid],
        )
        .await
        .expect("box B's event stored");
    let (person_id, person_properties): (Option<uuid::Uuid>, String) = (row.get(0), row.get(1));
    let person_properties: Value = serde_json::from_str(&person_properties).unwrap();
    assert_eq!(
        person_id,
        Some(survivor),
        "box B's event is the merged person's"
    );
    for key in ["device", "plan", "email", "seen_again"] {
        assert!(
            person_properties.get(key).is_some(),
            "{key} in {person_properties}"
        );
    }
    let persons = db
        .query(
            "SELECT uuid, properties::text, version FROM posthog_person WHERE team_id = $1",
            &[&(team as i64)],
        )
        .await
        .unwrap();
    assert_eq!(
        persons.len(),
        1,
        "one person for the two ids, on both boxes"
    );
    assert_eq!(persons[0].get::<_, uuid::Uuid>(0), survivor);
    let properties: Value = serde_json::from_str(persons[0].get(1)).unwrap();
    assert_eq!(
        (
            &properties["device"],
            &properties["plan"],
            &properties["email"],
            &properties["seen_again"]
        ),
        (
            &json!("phone"),
            &json!("pro"),
            &json!("one@example.com"),
            &json!(true)
        )
    );
    let ids = db
        .query(
            "SELECT d.distinct_id, p.uuid FROM posthog_persondistinctid d
             JOIN posthog_person p ON p.id = d.person_id WHERE d.team_id = $1
             ORDER BY d.distinct_id",
            &[&(team as i64)],
        )
        .await
        .unwrap();
    let ids: Vec<(String, uuid::Uuid)> = ids.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        ids,
        vec![
            ("anon-1".to_owned(), survivor),
            ("user-1".to_owned(), survivor)
        ]
    );
    // Box B's own state follows too: its old person of anon-1 is gone, as on A.
    let shown = cli(
        dir_b.path(),
        &[
            "persons",
            "show",
            "--team",
            &team.to_string(),
            "anon-1",
            "--json",
        ],
    );
    let shown: Value = serde_json::from_str(&shown).unwrap_or_else(|e| panic!("{e}: {shown}"));
    assert_eq!(shown["person"]["uuid"], survivor.to_string());
    let metrics = reqwest::get(box_b.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("appliance_persons_imported_total") && !l.ends_with(" 0")),
        "box B counts its import"
    );
    assert!(box_b.terminate().success());
    assert!(box_a.terminate().success());
}

/// The value of counter `name` on `app`'s `/metrics` (0 if it is not there yet).
async fn counter(app: &Appliance, name: &str) -> f64 {
    let text = reqwest::get(app.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_persons_two_boxes_changing_one_person_at_once_both_keep_their_change() {
    let pg = PgServer::start();
    let url = pg.create_database("race").await;
    let db = pg.client("race").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let team = create_team(dir_a.path(), "t", TOKEN);
    create_team(dir_b.path(), "t", TOKEN);
    let shared = |node: &'static str| {
        vec![
            ("SINKS", "postgres"),
            ("DATABASE_URL", url.as_str()),
            ("NODE_ID", node),
            ("SHARED_PERSONS", "true"),
            ("SINK_LINGER_MS", "0"),
        ]
    };
    // Box A holds each of its writes for 4 s after its person step: box B writes in between.
    let mut env_a = shared("a");
    env_a.push((
        "APPLIANCE_FAILPOINTS",
        "pipeline.before_sink_write=pause:4000",
    ));
    let box_a = Appliance::start(dir_a.path(), &env_a);
    let box_b = Appliance::start(dir_b.path(), &shared("b"));

    let first = event("$pageview", "u", json!({"$set": {"first": true}}));
    send_batch(&box_b, TOKEN, vec![first]).await;
    // A reads the person (version 0) and makes version 1 with its change, then holds the write.
    let on_a = event("$pageview", "u", json!({"$set": {"from_a": true}}));
    let on_a_uuid = on_a["uuid"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    assert_eq!(post_batch(&box_a, TOKEN, vec![on_a]).await, 200);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Meanwhile B makes its own version 1 of the same person, and writes it first.
    let on_b = event("$pageview", "u", json!({"$set": {"from_b": true}}));
    send_batch(&box_b, TOKEN, vec![on_b]).await;
    // A's write over version 1 is turned down; A makes its step again over B's version.
    box_a.wait_drained().await;

    let person = db
        .query_one(
            "SELECT properties::text, version FROM posthog_person WHERE team_id = $1 AND uuid = $2",
            &[&(team as i64), &person_uuid(team, "u")],
        )
        .await
        .expect("u's person");
    let properties: Value = serde_json::from_str(person.get(0)).unwrap();
    assert_eq!(
        (
            &properties["first"],
            &properties["from_a"],
            &properties["from_b"]
        ),
        (&json!(true), &json!(true), &json!(true)),
        "both boxes' changes kept: {properties}"
    );
    assert_eq!(person.get::<_, i64>(1), 2, "one version per change");
    let row = db
        .query_one(
            "SELECT person_properties::text FROM posthog_event WHERE uuid = $1",
            &[&on_a_uuid],
        )
        .await
        .expect("A's event stored once");
    let on_row: Value = serde_json::from_str(row.get(0)).unwrap();
    assert_eq!(
        on_row["from_b"], true,
        "A's event was made again over B's change"
    );
    assert!(
        counter(&box_a, "appliance_person_conflicts_total").await >= 1.0,
        "box A's write was turned down"
    );
    assert!(box_b.terminate().success());
    assert!(box_a.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_persons_group_types_and_groups_are_one_set_across_boxes() {
    let pg = PgServer::start();
    let url = pg.create_database("groups").await;
    let db = pg.client("groups").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let team = create_team(dir_a.path(), "t", TOKEN);
    create_team(dir_b.path(), "t", TOKEN);
    let shared = |node: &'static str| {
        vec![
            ("SINKS", "postgres"),
            ("DATABASE_URL", url.as_str()),
            ("NODE_ID", node),
            ("SHARED_PERSONS", "true"),
            ("SINK_LINGER_MS", "0"),
        ]
    };
    let box_a = Appliance::start(dir_a.path(), &shared("a"));
    let box_b = Appliance::start(dir_b.path(), &shared("b"));

    // A gives index 0 to "company" and sets the group's plan.
    let on_a = vec![event(
        "$groupidentify",
        "admin-a",
        json!({"$group_type": "company", "$group_key": "acme", "$group_set": {"plan": "pro"}}),
    )];
    send_batch(&box_a, TOKEN, on_a).await;
    // B's first group type is "project": index 1, since A took 0; and B's change to acme keeps
    // A's plan.
    let in_project = event("$pageview", "user-b", json!({"$groups": {"project": "p1"}}));
    let in_project_uuid = in_project["uuid"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    let seats = event(
        "$groupidentify",
        "admin-b",
        json!({"$group_type": "company", "$group_key": "acme", "$group_set": {"seats": 10}}),
    );
    send_batch(&box_b, TOKEN, vec![in_project, seats]).await;

    let types = db
        .query(
            "SELECT group_type, group_type_index FROM posthog_grouptypemapping
             WHERE team_id = $1 ORDER BY group_type_index",
            &[&(team as i64)],
        )
        .await
        .unwrap();
    let types: Vec<(String, i32)> = types.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(types, vec![("company".into(), 0), ("project".into(), 1)]);
    let row = db
        .query_one(
            "SELECT properties::text FROM posthog_event WHERE uuid = $1",
            &[&in_project_uuid],
        )
        .await
        .unwrap();
    let properties: Value = serde_json::from_str(row.get(0)).unwrap();
    assert_eq!(properties["$group_1"], "p1", "{properties}");
    assert!(properties.get("$group_0").is_none(), "{properties}");
    let acme = db
        .query_one(
            "SELECT group_properties::text, version FROM posthog_group
             WHERE team_id = $1 AND group_key = 'acme' AND group_type_index = 0",
            &[&(team as i64)],
        )
        .await
        .unwrap();
    let acme_properties: Value = serde_json::from_str(acme.get(0)).unwrap();
    assert_eq!(acme_properties, json!({"plan": "pro", "seats": 10}));
    assert_eq!(acme.get::<_, i64>(1), 2);
    assert!(box_b.terminate().success());
    assert!(box_a.terminate().success());
}
