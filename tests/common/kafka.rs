//! A real Kafka producer and the messages PostHog's capture writes, for tests against
//! librdkafka's mock cluster.

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;

use super::TOKEN;

pub const TOPIC: &str = "events_plugin_ingestion";

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("a producer")
}

/// The message PostHog's Rust capture writes for event `i` (the envelope around `data`), from
/// one of seven users.
pub fn capture_message(i: usize) -> String {
    capture_message_of(i, &format!("user{}", i % 7))
}

/// [`capture_message`] from `distinct_id`.
pub fn capture_message_of(i: usize, distinct_id: &str) -> String {
    let uuid = uuid::Uuid::from_u128(i as u128 + 1).to_string();
    let data = json!({"event": "kafka event", "distinct_id": distinct_id,
                      "uuid": uuid, "properties": {"i": i},
                      "timestamp": "2026-11-02T10:00:00Z"});
    json!({"uuid": uuid, "distinct_id": distinct_id, "ip": "1.2.3.4",
           "data": data.to_string(), "now": "2026-12-02T00:00:00Z",
           "sent_at": "2026-12-02T00:00:01Z", "token": TOKEN,
           "event": "kafka event", "timestamp": "2026-11-02T10:00:00Z"})
    .to_string()
}

/// Sends `payloads`, each keyed as PostHog's capture keys it (`token:distinct_id`), so one
/// distinct id stays on one partition; a payload without one is keyed by its place.
pub async fn send(producer: &FutureProducer, payloads: impl IntoIterator<Item = String>) {
    let mut pending = Vec::new();
    for (n, payload) in payloads.into_iter().enumerate() {
        let distinct_id = serde_json::from_str::<serde_json::Value>(&payload)
            .ok()
            .and_then(|m| m["distinct_id"].as_str().map(str::to_owned))
            .unwrap_or_else(|| n.to_string());
        let key = format!("{TOKEN}:{distinct_id}");
        let record = FutureRecord::to(TOPIC).payload(&payload).key(&key);
        pending.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queued"),
        );
    }
    for delivery in pending {
        delivery.await.expect("delivered").expect("acknowledged");
    }
}

pub fn env(bootstrap: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_ENABLED", "true".into()),
        ("KAFKA_HOSTS", bootstrap.into()),
        (
            "KAFKA_CONSUMER_CONFIG",
            // The mock cluster holds a rejoining member back for the session timeout less a
            // second; below 6 s it never answers the join.
            "session.timeout.ms=6000,heartbeat.interval.ms=1000".into(),
        ),
    ]
}

pub fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}
