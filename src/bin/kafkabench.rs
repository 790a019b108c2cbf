//! Kafka → SQLite benchmark: fills a topic of librdkafka's mock cluster (the real Kafka
//! protocol on a local port) with PostHog capture messages, starts the `appliance` built beside
//! it with the Kafka source on, and prints the rate at which the events reach the sink.
//!
//! `cargo run --release --bin kafkabench -- --messages 200000`

mod shared;

use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;

const TOKEN: &str = "phc_kafkabenchProjectToken0";
const TOPIC: &str = "events_plugin_ingestion";

#[derive(Parser, Debug)]
#[command(about = "Kafka → SQLite: events/s from a topic into the sink")]
struct Args {
    /// Messages to put on the topic before the appliance starts
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Partitions of the topic
    #[arg(long, default_value_t = 4)]
    partitions: i32,
}

/// PostHog's Rust capture message for event `n`.
fn message(n: u64) -> String {
    let uuid = uuid::Uuid::from_u128(u128::from(n) + 1).to_string();
    let distinct_id = format!("user{}", n % 1000);
    let data = json!({"event": "$pageview", "distinct_id": distinct_id, "uuid": uuid,
        "properties": {"$current_url": "https://example.com/pricing", "$browser": "Firefox",
                       "$os": "Linux", "n": n},
        "timestamp": "2026-11-02T10:00:00Z"});
    json!({"uuid": uuid, "distinct_id": distinct_id, "ip": "203.0.113.7",
           "data": data.to_string(), "now": "2026-11-02T10:00:01Z",
           "sent_at": "2026-11-02T10:00:01Z", "token": TOKEN,
           "event": "$pageview", "timestamp": "2026-11-02T10:00:00Z"})
    .to_string()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args).await {
        eprintln!("kafkabench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let cluster = MockCluster::new(1).map_err(|e| e.to_string())?;
    cluster
        .create_topic(TOPIC, args.partitions, 1)
        .map_err(|e| e.to_string())?;
    let bootstrap = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut pending = Vec::new();
    for n in 0..args.messages {
        let (payload, key) = (message(n), format!("{TOKEN}:user{}", n % 1000));
        let record = FutureRecord::to(TOPIC).payload(&payload).key(&key);
        pending.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e.to_string())?,
        );
    }
    for delivery in pending {
        delivery
            .await
            .map_err(|_| "a delivery was cancelled".to_owned())?
            .map_err(|(e, _)| e.to_string())?;
    }
    println!(
        "produced {} messages to {TOPIC} ({} partitions) in {:.2} s",
        args.messages,
        args.partitions,
        started.elapsed().as_secs_f64()
    );

    // The appliance inherits this environment (as loadgen's does).
    std::env::set_var("KAFKA_ENABLED", "true");
    std::env::set_var("KAFKA_HOSTS", &bootstrap);
    let exe = shared::appliance_exe()?;
    let dir = shared::data_dir(&exe, "kafkabench", TOKEN)?;
    let (_server, base) = shared::spawn(&exe, dir)?;
    let client = reqwest::Client::new();
    // The clock starts at the first stored event: the consumer group's join (about 3 s on the
    // mock) is not the source's speed.
    let first = loop {
        if shared::events_stored(&shared::ready(&client, &base).await) > 0 {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let deadline = first + Duration::from_secs(600);
    loop {
        let now = shared::events_stored(&shared::ready(&client, &base).await);
        if now >= args.messages {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {now} of {} events stored in 600 s",
                args.messages
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = first.elapsed().as_secs_f64();
    println!(
        "Kafka → SQLite: {} events stored in {took:.2} s = {:.0} events/s (from the first stored event)",
        args.messages,
        args.messages as f64 / took
    );
    Ok(())
}
