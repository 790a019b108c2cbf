//! More than one box: two appliance processes in one Kafka consumer group writing to one shared
//! Postgres, with rebalances in the middle of a load (a box joins, a box is killed and comes
//! back), store every message once and share their persons; a box given another box's name is refused by the shared
//! sink instead of skipping events; and the schedule lease in a real Redis lets one box run the
//! schedules, another taking over the next slot (once) when the holder is killed. (Persons
//! shared between two boxes at the HTTP front: `tests/shared_persons.rs`.)

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::kafka::{borrowed, capture_message_of, env, producer, send};
use common::pg::PgServer;
use common::redis::RedisServer;
use common::{command, create_team, enable_plugin, install_plugin, storage, Appliance, TOKEN};
use rdkafka::mocking::MockCluster;

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
    assert_eq!(
        box_b.metric("appliance_schedule_lease_held").await,
        1.0,
        "the second box holds the lease"
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
