//! The Kafka source against librdkafka's mock cluster (the real Kafka protocol on a local
//! port), fed by a real producer with the message shapes PostHog's capture writes: every
//! message becomes one stored event, a message that cannot be read goes to the dead-letter
//! topic with its partition, offset and reason, and a kill between durability and the offset
//! commit re-reads the round without storing anything twice; one distinct id's messages reach
//! its person in the order of their partition.

mod common;

use std::time::Duration;

use common::kafka::{borrowed, capture_message, env, producer, send, TOPIC};
use common::{create_team, read_events, read_persons, wait_stored, Appliance, TOKEN};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use serde_json::json;

fn numbers(rows: &[common::Row]) -> Vec<i64> {
    let mut seen: Vec<i64> = rows
        .iter()
        .map(|r| r.properties["i"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_s_messages_become_events_and_unreadable_ones_go_to_the_dead_letter_topic() {
    let cluster = MockCluster::new(1).expect("a mock cluster");
    cluster.create_topic(TOPIC, 4, 1).expect("the topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let team = create_team(dir.path(), "t", TOKEN);
    let env = env(&bootstrap);
    let app = Appliance::start(dir.path(), &borrowed(&env));
    let producer = producer(&bootstrap);
    send(&producer, (0..40).map(capture_message)).await;
    // The older Python capture's form: team_id instead of token, data without a uuid inside
    // but one in the envelope.
    let older = json!({"uuid": uuid::Uuid::from_u128(41).to_string(), "distinct_id": "old",
        "ip": "5.6.7.8", "site_url": "http://x", "team_id": team,
        "data": json!({"event": "kafka event", "properties": {"i": 40}}).to_string(),
        "now": "2026-12-02T00:00:00", "sent_at": ""});
    send(&producer, [older.to_string(), "not json".to_owned()]).await;
    let rows = wait_stored(&app, 41).await;
    assert_eq!(
        numbers(&rows),
        (0..41).collect::<Vec<_>>(),
        "one event per message"
    );
    let first = rows.iter().find(|r| r.properties["i"] == 0).unwrap();
    assert_eq!(first.distinct_id, "user0");
    assert_eq!(first.properties["$ip"], "1.2.3.4");
    // PostHog's clock-skew rule with the message's `now`, one second before its `sent_at`.
    assert_eq!(first.timestamp, "2026-11-02T09:59:59.000000Z");
    let old = rows.iter().find(|r| r.properties["i"] == 40).unwrap();
    assert_eq!(old.distinct_id, "old");

    let dead: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "dead-letter-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    dead.subscribe(&["events_dead_letter_queue"]).unwrap();
    let letter = tokio::time::timeout(Duration::from_secs(30), dead.recv())
        .await
        .expect("a dead letter within 30 s")
        .unwrap();
    assert_eq!(letter.payload(), Some(&b"not json"[..]));
    let headers = letter.headers().expect("headers");
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("topic").as_deref(), Some(TOPIC));
    assert!(header("partition").is_some() && header("offset").is_some());
    assert!(header("reason").unwrap().contains("not a JSON message"));
    assert!(app.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_before_the_offset_commit_re_reads_the_round_and_stores_each_message_once() {
    let cluster = MockCluster::new(1).expect("a mock cluster");
    cluster.create_topic(TOPIC, 4, 1).expect("the topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let producer = producer(&bootstrap);
    send(&producer, (0..500).map(capture_message)).await;
    let env = env(&bootstrap);
    let mut armed = borrowed(&env);
    armed.push(("APPLIANCE_FAILPOINTS", "kafka.before_commit"));
    let mut crashing = Appliance::start(dir.path(), &armed);
    assert!(
        !crashing.wait_exit(Duration::from_secs(60)).success(),
        "aborted after a round was durable"
    );
    let app = Appliance::start(dir.path(), &borrowed(&env));
    send(&producer, (500..600).map(capture_message)).await;
    let rows = wait_stored(&app, 600).await;
    app.wait_drained().await;
    let rows = if rows.len() < 600 {
        read_events(&app.sqlite_path())
    } else {
        rows
    };
    assert_eq!(
        numbers(&rows),
        (0..600).collect::<Vec<_>>(),
        "each message once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_messages_change_its_person_in_partition_order() {
    let cluster = MockCluster::new(1).expect("a mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("the topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    // The messages wait in the topic before the appliance starts, so one round reads them all.
    const SETS: usize = 300;
    let producer = producer(&bootstrap);
    let messages = (0..SETS).map(|i| {
        let uuid = uuid::Uuid::from_u128(i as u128 + 1).to_string();
        let data = json!({"event": "plan changed", "distinct_id": "u", "uuid": uuid,
                          "properties": {"i": i, "$set": {"plan": i}},
                          "timestamp": "2026-11-02T10:00:00Z"});
        json!({"uuid": uuid, "distinct_id": "u", "ip": "1.2.3.4", "data": data.to_string(),
               "now": "2026-12-02T00:00:00Z", "token": TOKEN})
        .to_string()
    });
    send(&producer, messages).await;
    let env = env(&bootstrap);
    let app = Appliance::start(dir.path(), &borrowed(&env));
    wait_stored(&app, SETS).await;
    app.wait_drained().await;
    let persons = read_persons(&app.sqlite_path());
    assert_eq!(persons.len(), 1);
    let person = persons.values().next().unwrap();
    // PostHog applies a partition's messages in order: the last $set wins, and the person was
    // made by the first.
    assert_eq!(
        person.properties["plan"],
        SETS - 1,
        "{:?}",
        person.properties
    );
    assert_eq!(
        person.properties["$creator_event_uuid"],
        uuid::Uuid::from_u128(1).to_string()
    );
    assert_eq!(person.version, SETS as i64 - 1, "one version per change");
}
